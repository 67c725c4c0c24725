// cuda/comm.cuh — the header's Communicator (deepseek_v3.hpp section 9) on real GPUs, over peer copies, without NCCL.
//
// One process, one host thread per rank, one CUDA stream per rank, rank r on GPU r (with more ranks than GPUs, rank r
// shares GPU r mod G: that only exists so that the 3- and 4-rank code paths can be tested on a 2-GPU machine). Every
// byte that moves between GPUs moves in ONE place, PeerComm::sendrecv, with one call:
//
//     cudaMemcpyPeerAsync(recv, my_gpu, send, peer_gpu, bytes, my_stream)
//
// where the two GPUs can address each other's memory (peer access, cudaDeviceEnablePeerAccess: the copy runs over
// NVLink, or PCIe, directly from one GPU's memory into the other's). Where they cannot, the bytes are staged through
// pinned (page-locked) host memory: the sender copies device → host into its "outbox", the receiver copies host →
// device. That is the data path of Fire-Flyer's HFReduce (arXiv 2408.14158 §IV: GPU → pinned host buffer by D2H
// copy, then host → GPU; HFReduce also sums on the CPU while the data sits there, here only the copy is staged and
// the sum stays on the GPU). PeerGroup prints which path each pair of GPUs uses when it starts.
//
// What this file gives, on top of the header (which stays the CPU reference):
//   PeerGroup                 the GPUs, their streams, the peer-access table, a host barrier (the header's
//                             InProcessGroup), the staging buffers
//   PeerComm : Communicator   rank, world_size, barrier, sendrecv; the buffers of sendrecv are DEVICE pointers
//                             (or host pointers on both sides, see below)
//   run_gpu_ranks(group, body)  body(PeerComm&) on every rank, one host thread each (the header's run_ranks pattern)
//   device_all_reduce         the header's ring all_reduce, same schedule and same summation order, with the
//                             element-wise add done by a small kernel: results are BITWISE equal to the CPU's
//   device_all_to_all         the header's pairwise-exchange all_to_all, own rows copied on the device
//   all_reduce, all_to_all    the two above for any Communicator that is a PeerComm, synchronous: what the header's
//                             sections 9.4-9.5 call as backend::all_reduce / backend::all_to_all in a GPU build
//   the header's exchange_counts works unchanged on a PeerComm: its int64 counts are host memory, and sendrecv copies
//   host buffers with memcpy (a receiver must know the sizes before the payload arrives, V3 §3.2's dispatch too).
//
// Why the collectives are written again here. The header's all_reduce adds the incoming chunk with a host loop
// (mine[i] = incoming[i] + mine[i]) and all_to_all copies a rank's own rows with std::copy: on device pointers both
// would read GPU memory from the CPU. The device versions below are line-for-line the header's schedule with those
// two lines replaced by a kernel and a cudaMemcpyAsync. (Passing those two operations to the header's functions as
// an argument would let both backends share one copy of each algorithm; not done yet.)
//
// Stream semantics. sendrecv is stream-ordered: it returns once the copy is QUEUED on this rank's stream after
// everything queued there before (the sender's data is ready: the receiver's stream waits on the sender's "ready"
// event), and the sender's stream waits on the receiver's "done" event, so any later work on the sender's stream may
// overwrite the send buffer. "The send buffer may be reused at once" (the interface's promise) thus holds for work
// queued on the rank's stream (comm.stream()); host code that reads the results calls comm.synchronize() or
// barrier() first. Two host barriers per sendrecv (post, then copy) are the only host-side synchronisation; the GPUs
// are never idle waiting for the host unless the host is late.
//
// No floating-point atomics and no reduction whose order depends on timing: each sum has the order of the header's
// ring (section 9.2), so results are bitwise the same on every run and equal to the CPU implementation.
#pragma once

#include "kernels.cuh"

#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace dsv3 {
namespace cuda {

// Pinned host memory, grown on demand (the staging "outbox" of one rank when peer access is missing).
class PinnedBuffer {
  public:
    PinnedBuffer() = default;
    ~PinnedBuffer() { if (p_) cudaFreeHost(p_); }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    void* get(size_t bytes) {   // caller guarantees no copy still uses the old buffer
        if (bytes > n_) {
            if (p_) DSV3_CUDA_CHECK(cudaFreeHost(p_));
            p_ = nullptr;
            n_ = 0;
            DSV3_CUDA_CHECK(cudaHostAlloc(&p_, bytes, cudaHostAllocPortable));   // portable: usable from every GPU
            n_ = bytes;
        }
        return p_;
    }

  private:
    void* p_ = nullptr;
    size_t n_ = 0;
};

// =====================================================================================================================
// PeerGroup: what the ranks share
// =====================================================================================================================
class PeerComm;

class PeerGroup {
  public:
    // world: number of ranks (<= 0: one per visible GPU). force_staging: never use peer access, stage every transfer
    // through pinned host memory (to test and measure the HFReduce path on machines that do have peer access).
    explicit PeerGroup(int world = 0, bool force_staging = false, bool verbose = true) {
        DSV3_CUDA_CHECK(cudaGetDeviceCount(&gpus_));
        if (gpus_ < 1) fail("PeerGroup: no CUDA device visible");
        world_ = world > 0 ? world : gpus_;
        direct_.assign(size_t(gpus_) * size_t(gpus_), 0);
        // Peer access is a property of a pair of GPUs and, once enabled, of the whole process (a second group finds
        // it already enabled). Enabling is one-directional: i may read/write j's memory; we enable both ways.
        for (int i = 0; i < gpus_; ++i)
            for (int j = 0; j < gpus_; ++j) {
                if (i == j) { direct_[size_t(i) * size_t(gpus_) + size_t(j)] = 1; continue; }  // same GPU: a D2D copy
                int can = 0;
                DSV3_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, i, j));
                if (!can || force_staging) continue;
                DSV3_CUDA_CHECK(cudaSetDevice(i));
                const cudaError_t e = cudaDeviceEnablePeerAccess(j, 0);
                if (e == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();   // clear the sticky-free error
                else DSV3_CUDA_CHECK(e);
                direct_[size_t(i) * size_t(gpus_) + size_t(j)] = 1;
            }
        // One stream and two events per rank, created on the rank's GPU. Events without timing are the cheap kind.
        // The streams are ordinary (blocking) ones: they order with the legacy default stream that kernels.cuh and
        // DeviceBuffer's upload/download/fill use, so a buffer filled there is ready for the collectives here.
        streams_.resize(size_t(world_));
        ready_.resize(size_t(world_));
        done_.resize(size_t(world_));
        outbox_ = std::vector<PinnedBuffer>(size_t(world_));
        posted_.resize(size_t(world_));
        for (int r = 0; r < world_; ++r) {
            DSV3_CUDA_CHECK(cudaSetDevice(device(r)));
            DSV3_CUDA_CHECK(cudaStreamCreate(&streams_[size_t(r)]));
            DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&ready_[size_t(r)], cudaEventDisableTiming));
            DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&done_[size_t(r)], cudaEventDisableTiming));
        }
        if (verbose) std::fputs(describe().c_str(), stdout);
    }
    ~PeerGroup() {
        for (int r = 0; r < world_; ++r) {   // no checks: destructors must not throw
            cudaSetDevice(device(r));
            cudaStreamSynchronize(streams_[size_t(r)]);
            cudaEventDestroy(ready_[size_t(r)]);
            cudaEventDestroy(done_[size_t(r)]);
            cudaStreamDestroy(streams_[size_t(r)]);
        }
    }
    PeerGroup(const PeerGroup&) = delete;
    PeerGroup& operator=(const PeerGroup&) = delete;

    int world_size() const { return world_; }
    int gpu_count() const { return gpus_; }
    int device(int rank) const { return rank % gpus_; }
    cudaStream_t stream(int rank) const { return streams_[size_t(rank)]; }
    // true when rank a's GPU copies straight into rank b's (peer access, or the same GPU); false: staged via the host.
    bool direct(int a, int b) const { return direct_[size_t(device(a)) * size_t(gpus_) + size_t(device(b))] != 0; }
    bool all_direct() const {
        for (int a = 0; a < world_; ++a)
            for (int b = 0; b < world_; ++b)
                if (!direct(a, b)) return false;
        return true;
    }

    // The start-up report: GPUs, and per pair of GPUs whether copies are direct or staged through the host.
    std::string describe() const {
        std::string s = "PeerGroup: " + std::to_string(world_) + " rank(s) on " + std::to_string(gpus_) + " GPU(s)\n";
        for (int g = 0; g < gpus_; ++g) {
            cudaDeviceProp p{};
            DSV3_CUDA_CHECK(cudaGetDeviceProperties(&p, g));
            s += "  GPU " + std::to_string(g) + ": " + p.name + ", " +
                 std::to_string(p.totalGlobalMem >> 30) + " GiB, PCI " + std::to_string(p.pciBusID) + "\n";
        }
        for (int i = 0; i < gpus_; ++i)
            for (int j = 0; j < gpus_; ++j) {
                if (i == j) continue;
                int can = 0;
                DSV3_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, i, j));
                const bool d = direct_[size_t(i) * size_t(gpus_) + size_t(j)] != 0;
                s += "  GPU " + std::to_string(i) + " -> GPU " + std::to_string(j) + ": peer access " +
                     (can ? "available" : "NOT available") + "; transfers " +
                     (d ? "direct (cudaMemcpyPeerAsync)"
                        : "STAGED through pinned host memory (HFReduce pattern: D2H copy, then H2D copy)") +
                     "\n";
            }
        return s;
    }

  private:
    friend class PeerComm;
    template <class Body>
    friend void run_gpu_ranks(PeerGroup& group, const Body& body);

    // What a rank offers in the current sendrecv (written before the first barrier, read after it).
    struct Posted {
        const void* data = nullptr;   // device pointer, its pinned outbox (staged), or a host pointer
        size_t bytes = 0;
        int to = -1;
        bool host = false;            // a host buffer on both sides: plain memcpy (exchange_counts)
        bool staged = false;          // device data staged in the sender's pinned outbox
    };
    int gpus_ = 0, world_ = 0;
    std::vector<char> direct_;                  // [G, G]: 1 when GPU i copies straight into GPU j
    std::vector<cudaStream_t> streams_;         // [R]: the one stream of each rank
    std::vector<cudaEvent_t> ready_, done_;     // [R]: "my send data is ready", "I have read what was sent to me"
    std::vector<PinnedBuffer> outbox_;          // [R]: staging buffers, used only without peer access
    std::vector<Posted> posted_;                // [R]
    std::unique_ptr<InProcessGroup> host_;      // the host barrier (header 9.3), fresh for every run_gpu_ranks
};

// =====================================================================================================================
// PeerComm: one rank's view, the header's Communicator interface
// =====================================================================================================================
inline bool is_host_pointer(const void* p) {
    if (!p) return true;
    cudaPointerAttributes a{};
    DSV3_CUDA_CHECK(cudaPointerGetAttributes(&a, p));
    return a.type == cudaMemoryTypeHost || a.type == cudaMemoryTypeUnregistered;
}

class PeerComm : public Communicator {
  public:
    PeerComm(PeerGroup& group, int rank) : g_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int world_size() const override { return g_.world_; }
    int device() const { return g_.device(rank_); }
    cudaStream_t stream() const { return g_.stream(rank_); }
    void synchronize() { DSV3_CUDA_CHECK(cudaStreamSynchronize(stream())); }
    // All GPU work queued on every rank's stream before the barrier is finished after it.
    void barrier() override {
        synchronize();
        g_.host_->barrier(rank_);
    }

    void sendrecv(const void* send, size_t send_bytes, int to, void* recv, size_t recv_bytes, int from) override {
        const int R = g_.world_;
        if (to < 0 || to >= R || from < 0 || from >= R) fail("sendrecv: rank ", rank_, ": peer out of range");
        cudaStream_t s = stream();
        PeerGroup::Posted p;
        p.data = send;
        p.bytes = send_bytes;
        p.to = to;
        p.host = is_host_pointer(send);
        if (send_bytes && !p.host) {
            if (!g_.direct(rank_, to)) {   // no peer access: copy into my pinned outbox first (HFReduce §IV)
                synchronize();             // the receiver of the previous staged message has finished reading it
                void* box = g_.outbox_[size_t(rank_)].get(send_bytes);
                DSV3_CUDA_CHECK(cudaMemcpyAsync(box, send, send_bytes, cudaMemcpyDeviceToHost, s));
                p.data = box;
                p.staged = true;
            }
            DSV3_CUDA_CHECK(cudaEventRecord(g_.ready_[size_t(rank_)], s));   // my data (or outbox) is ready
        }
        g_.posted_[size_t(rank_)] = p;
        g_.host_->barrier(rank_);   // ---- every rank has posted
        const PeerGroup::Posted& q = g_.posted_[size_t(from)];
        if (q.to != rank_ || q.bytes != recv_bytes)
            fail("sendrecv: rank ", rank_, " expects ", recv_bytes, " bytes from rank ", from, ", which sends ",
                 q.bytes, " bytes to rank ", q.to);
        if (recv_bytes) {
            if (q.host != is_host_pointer(recv))
                fail("sendrecv: rank ", rank_, ": host and device buffers mixed between ranks ", from, " and ", rank_);
            if (q.host) {
                std::memcpy(recv, q.data, recv_bytes);   // host data (counts): the header's in-process copy
            } else {
                // Wait (on the GPU, not the host) until the sender's data is ready, then pull it.
                DSV3_CUDA_CHECK(cudaStreamWaitEvent(s, g_.ready_[size_t(from)], 0));
                if (q.staged)
                    DSV3_CUDA_CHECK(cudaMemcpyAsync(recv, q.data, recv_bytes, cudaMemcpyHostToDevice, s));
                else
                    DSV3_CUDA_CHECK(cudaMemcpyPeerAsync(recv, device(), q.data, g_.device(from), recv_bytes, s));
                DSV3_CUDA_CHECK(cudaEventRecord(g_.done_[size_t(rank_)], s));
            }
        }
        bytes_received += int64_t(recv_bytes);
        g_.host_->barrier(rank_);   // ---- every rank has queued its copy (and recorded "done")
        // Later work on my stream (a kernel overwriting the send buffer) must wait until `to` has read it.
        if (send_bytes && !p.host) DSV3_CUDA_CHECK(cudaStreamWaitEvent(s, g_.done_[size_t(to)], 0));
    }

    // Device scratch of this rank (the receive buffer of one all-reduce step); grows, never shrinks.
    void* scratch(size_t bytes) {
        if (scratch_.size() < bytes) {
            synchronize();   // earlier steps queued on my stream may still read the old buffer
            scratch_.resize(bytes);
        }
        return scratch_.data();
    }

    int64_t bytes_received = 0;   // traffic counter, as InProcessComm's: what arrived from other ranks

  private:
    PeerGroup& g_;
    int rank_;
    DeviceBuffer<unsigned char> scratch_;
};

// Runs body(comm) on every rank of the group, one host thread each (bound to the rank's GPU), and waits for all. As
// the header's run_ranks: the first real error of any rank is rethrown here, the other ranks stop at their next
// barrier instead of hanging.
template <class Body>
void run_gpu_ranks(PeerGroup& group, const Body& body) {
    const int R = group.world_size();
    group.host_ = std::make_unique<InProcessGroup>(R);
    std::vector<std::exception_ptr> errors(static_cast<size_t>(R));
    std::vector<std::thread> threads;
    for (int r = 0; r < R; ++r)
        threads.emplace_back([&, r] {
            try {
                DSV3_CUDA_CHECK(cudaSetDevice(group.device(r)));   // the current device is per host thread
                PeerComm comm(group, r);
                body(comm);
                comm.synchronize();
            } catch (...) {
                errors[size_t(r)] = std::current_exception();
                group.host_->abort();
            }
        });
    for (std::thread& t : threads) t.join();
    for (int r = 0; r < R; ++r) {   // leave no rank's work running into the next run (a failed rank's included)
        cudaSetDevice(group.device(r));
        cudaStreamSynchronize(group.stream(r));
    }
    std::exception_ptr first_aborted;
    for (std::exception_ptr& e : errors) {
        if (!e) continue;
        try { std::rethrow_exception(e); }
        catch (const RankAborted&) { if (!first_aborted) first_aborted = e; }
        catch (...) { throw; }
    }
    if (first_aborted) std::rethrow_exception(first_aborted);
}

// =====================================================================================================================
// Collectives on device buffers: the header's algorithms (section 9.2), the data touched only by the GPU
// =====================================================================================================================
namespace detail {
// The one arithmetic line of the ring all-reduce: the partial sum arriving is the LEFT operand, the local value the
// right one, exactly as the header's host loop, so the float results are bitwise the same.
template <class T>
__global__ void ring_add_kernel(T* __restrict__ mine, const T* __restrict__ incoming, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        mine[i] = incoming[i] + mine[i];
}
template <class T>
__global__ void divide_kernel(T* data, size_t n, T divisor) {   // IEEE division, as the header's data[i] /= T(R)
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        data[i] = data[i] / divisor;
}
inline int stride_grid(size_t n) { return int(std::min<size_t>((n + 255) / 256, 132 * 16)); }   // ≈16 blocks/SM
}  // namespace detail

// device_all_reduce: data: [n] device floats (any n), summed (or averaged) over the ranks in the ring order of the
// header's all_reduce (read its comment for the schedule and the determinism argument). Traffic per rank: 2(R−1)/R·n
// elements sent and received, the bandwidth optimum (V3 §3.2 relies on the same ring/tree collectives of NCCL).
template <class T>
void device_all_reduce(PeerComm& comm, T* data, size_t n, ReduceOp op = ReduceOp::sum) {
    const int R = comm.world_size(), r = comm.rank();
    cudaStream_t s = comm.stream();
    if (R > 1 && n) {
        auto begin = [&](int c) { return n * size_t(c) / size_t(R); };
        auto bytes = [&](int c) { return (begin(c + 1) - begin(c)) * sizeof(T); };
        const int next = ring_mod(r + 1, R), prev = ring_mod(r - 1, R);
        T* incoming = static_cast<T*>(comm.scratch((n / size_t(R) + 1) * sizeof(T)));   // [largest chunk]
        for (int st = 0; st < R - 1; ++st) {   // reduce-scatter
            const int send_c = ring_mod(r - st, R), recv_c = ring_mod(r - st - 1, R);
            comm.sendrecv(data + begin(send_c), bytes(send_c), next, incoming, bytes(recv_c), prev);
            const size_t e = begin(recv_c + 1) - begin(recv_c);
            if (e) {
                detail::ring_add_kernel<T><<<detail::stride_grid(e), 256, 0, s>>>(data + begin(recv_c), incoming, e);
                DSV3_CUDA_CHECK_LAUNCH();
            }
        }
        for (int st = 0; st < R - 1; ++st) {   // all-gather
            const int send_c = ring_mod(r + 1 - st, R), recv_c = ring_mod(r - st, R);
            comm.sendrecv(data + begin(send_c), bytes(send_c), next, data + begin(recv_c), bytes(recv_c), prev);
        }
    }
    if (op == ReduceOp::mean) {
        if constexpr (std::is_floating_point_v<T>) {
            if (n) {
                detail::divide_kernel<T><<<detail::stride_grid(n), 256, 0, s>>>(data, n, T(R));
                DSV3_CUDA_CHECK_LAUNCH();
            }
        } else {
            fail("device_all_reduce: mean of integers is not supported (reduce with sum and divide where needed)");
        }
    }
}

// device_all_to_all: the header's all_to_all on device buffers. send: [Σ send_rows, row] grouped by destination rank;
// recv: [Σ recv_rows, row] grouped by source rank; recv_rows from the header's exchange_counts (host counts). This is
// the dispatch and the combine of expert parallelism (V3 §3.2): R−1 pairwise rounds, one message each way per round.
template <class T>
void device_all_to_all(PeerComm& comm, const T* send, const std::vector<int64_t>& send_rows, int64_t row, T* recv,
                       const std::vector<int64_t>& recv_rows) {
    const int R = comm.world_size(), r = comm.rank();
    if (int(send_rows.size()) != R || int(recv_rows.size()) != R) fail("device_all_to_all: counts are not [R]");
    std::vector<int64_t> send_at(size_t(R) + 1, 0), recv_at(size_t(R) + 1, 0);   // row offsets per rank
    for (int q = 0; q < R; ++q) {
        send_at[size_t(q) + 1] = send_at[size_t(q)] + send_rows[size_t(q)];
        recv_at[size_t(q) + 1] = recv_at[size_t(q)] + recv_rows[size_t(q)];
    }
    if (send_rows[size_t(r)] != recv_rows[size_t(r)])
        fail("device_all_to_all: rank ", r, " sends itself a different count");
    if (send_rows[size_t(r)])   // own rows: a copy inside this GPU
        DSV3_CUDA_CHECK(cudaMemcpyAsync(recv + recv_at[size_t(r)] * row, send + send_at[size_t(r)] * row,
                                        size_t(send_rows[size_t(r)] * row) * sizeof(T), cudaMemcpyDeviceToDevice,
                                        comm.stream()));
    for (int st = 1; st < R; ++st) {
        const int to = ring_mod(r + st, R), from = ring_mod(r - st, R);
        comm.sendrecv(send + send_at[size_t(to)] * row, size_t(send_rows[size_t(to)] * row) * sizeof(T), to,
                      recv + recv_at[size_t(from)] * row, size_t(recv_rows[size_t(from)] * row) * sizeof(T), from);
    }
}

// The backend's collectives over device memory, for the header's sections 9.4-9.5 in a DSV3_BACKEND_CUDA build
// (backend::all_reduce, backend::all_to_all). On a PeerComm (run_gpu_ranks) they run the device versions above. Every
// rank's queued work is finished first (the model's kernels run on the default stream) and the transfer is waited
// for after, so the calls behave like the header's CPU functions: data in, data out, nothing pending. On any other
// Communicator (the header's MpiCommunicator: ranks in other processes, on other machines) the device buffers are
// staged through host memory: copied to the host, the header's collective there (its sums, so the results are
// bitwise the CPU's), copied back. Not CUDA-aware MPI: the bytes cross PCIe twice per collective.
inline PeerComm* peer_comm(Communicator& comm) { return dynamic_cast<PeerComm*>(&comm); }
template <class T>
std::vector<T> staged(const T* device, size_t n) {   // device -> host copy
    std::vector<T> host(n);
    if (n) DSV3_CUDA_CHECK(cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
}
template <class T>
void all_reduce(Communicator& comm, T* data, size_t n, ReduceOp op = ReduceOp::sum) {
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    if (PeerComm* peer = peer_comm(comm)) {
        device_all_reduce(*peer, data, n, op);
        peer->synchronize();
        return;
    }
    std::vector<T> host = staged(data, n);
    ::dsv3::all_reduce(comm, host.data(), n, op);
    if (n) DSV3_CUDA_CHECK(cudaMemcpy(data, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
}
template <class T>
void all_to_all(Communicator& comm, const T* send, const std::vector<int64_t>& send_rows, int64_t row, T* recv,
                const std::vector<int64_t>& recv_rows) {
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    if (PeerComm* peer = peer_comm(comm)) {
        device_all_to_all(*peer, send, send_rows, row, recv, recv_rows);
        peer->synchronize();
        return;
    }
    auto total = [row](const std::vector<int64_t>& v) {
        return size_t(std::accumulate(v.begin(), v.end(), int64_t(0)) * row);
    };
    const std::vector<T> host_send = staged(send, total(send_rows));
    std::vector<T> host_recv(total(recv_rows));
    ::dsv3::all_to_all(comm, host_send.data(), send_rows, row, host_recv.data(), recv_rows);
    if (!host_recv.empty())
        DSV3_CUDA_CHECK(cudaMemcpy(recv, host_recv.data(), host_recv.size() * sizeof(T), cudaMemcpyHostToDevice));
}

}  // namespace cuda
}  // namespace dsv3
