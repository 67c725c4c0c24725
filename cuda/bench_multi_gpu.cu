// cuda/bench_multi_gpu.cu — bandwidth of the peer-copy Communicator (cuda/comm.cuh), next to the raw peer copy.
//     make build/bench_multi_gpu && ./build/bench_multi_gpu [--quick]      (needs 2 or more GPUs)
//
// (a) peer copy alone: cudaMemcpyPeerAsync of 256 MiB between GPU 0 and GPU 1, one direction at a time and both at
//     once (each direction's GB/s). This is the ceiling for everything below.
// (b) all-reduce (device_all_reduce, fp32 sum) of 1 .. 256 MiB per rank on all GPUs: algorithm bandwidth
//     algbw = bytes / time and bus bandwidth busbw = algbw · 2(R−1)/R (NCCL's convention: what each link carries,
//     comparable across R). busbw is printed as a ratio to the BIDIRECTIONAL per-direction peer bandwidth, since in a
//     ring every GPU sends and receives at once.
// (c) dispatch / combine (device_all_to_all, fp32 rows of d = 7168, V3's hidden size): 4096 tokens per rank, each
//     choosing 8 of 256 experts uniformly (experts split evenly over the ranks). Dispatch sends each token ONCE to
//     every rank owning one of its experts; combine returns one row per (token, chosen expert), as the header's
//     ExpertParallel does (V3 §3.2 instead accumulates on the way back). GB/s = bytes this rank sends to OTHER ranks /
//     time, printed as a ratio to the bidirectional per-direction peer bandwidth (all ranks send at once).
//     Target (issue 8): ≥ 70% of the peer bandwidth.
// (d) the same all-reduce and dispatch staged through pinned host memory (the HFReduce path, forced), for scale.
// Timing: warm-up first; every figure is the mean of a batch of back-to-back collectives between two
// barriers (host wall clock, all streams synchronised), the median of 5 batches. Buffers far larger than the L2.
#include "comm.cuh"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace cu = dsv3::cuda;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

struct PeerBw { double one_way_01 = 0, one_way_10 = 0, both = 0; };   // GB/s per direction

// (a) peer copies alone, 256 MiB, issued on the SOURCE GPU's stream (push) and, for comparison, the destination's.
PeerBw peer_bandwidth(size_t bytes, int reps) {
    cudaStream_t s[2];
    void* buf[2][2];   // [gpu][src/dst]
    for (int g = 0; g < 2; ++g) {
        DSV3_CUDA_CHECK(cudaSetDevice(g));
        DSV3_CUDA_CHECK(cudaStreamCreate(&s[g]));
        for (int k = 0; k < 2; ++k) {
            DSV3_CUDA_CHECK(cudaMalloc(&buf[g][k], bytes));
            DSV3_CUDA_CHECK(cudaMemset(buf[g][k], 1 + k, bytes));
        }
        DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    }
    auto copy = [&](int from, int to) {
        DSV3_CUDA_CHECK(cudaMemcpyPeerAsync(buf[to][1], to, buf[from][0], from, bytes, s[from]));
    };
    auto run = [&](bool d01, bool d10) {
        std::vector<double> t;
        for (int b = 0; b < 5; ++b) {
            for (int g = 0; g < 2; ++g) DSV3_CUDA_CHECK(cudaStreamSynchronize(s[g]));
            const double t0 = now();
            for (int i = 0; i < reps; ++i) {
                if (d01) copy(0, 1);
                if (d10) copy(1, 0);
            }
            for (int g = 0; g < 2; ++g) DSV3_CUDA_CHECK(cudaStreamSynchronize(s[g]));
            t.push_back((now() - t0) / reps);
        }
        return double(bytes) / median(t) / 1e9;
    };
    run(true, true);   // warm-up
    PeerBw bw;
    bw.one_way_01 = run(true, false);
    bw.one_way_10 = run(false, true);
    bw.both = run(true, true);   // each direction moved `bytes` in that time
    for (int g = 0; g < 2; ++g) {
        DSV3_CUDA_CHECK(cudaSetDevice(g));
        for (int k = 0; k < 2; ++k) DSV3_CUDA_CHECK(cudaFree(buf[g][k]));
        DSV3_CUDA_CHECK(cudaStreamDestroy(s[g]));
    }
    return bw;
}

// Seconds per call of f(comm) on every rank: mean over a batch of `reps` between barriers, median of 5 batches.
template <class F>
double time_collective(cu::PeerComm& comm, int reps, const F& f) {
    f();   // warm-up
    std::vector<double> t;
    for (int b = 0; b < 5; ++b) {
        comm.barrier();
        const double t0 = now();
        for (int i = 0; i < reps; ++i) f();
        comm.barrier();
        t.push_back((now() - t0) / reps);
    }
    return median(t);
}

void bench_all_reduce(cu::PeerGroup& group, double peer, const std::vector<size_t>& mib, const char* label) {
    const int R = group.world_size();
    std::printf("\n(b) all-reduce, fp32 sum, %d ranks, %s\n", R, label);
    std::printf("  %10s %10s %12s %12s %14s\n", "MiB/rank", "time ms", "algbw GB/s", "busbw GB/s", "busbw / peer");
    for (size_t m : mib) {
        const size_t n = m * (size_t(1) << 20) / sizeof(float);
        double sec = 0;
        cu::run_gpu_ranks(group, [&](cu::PeerComm& comm) {
            cu::DeviceBuffer<float> d(n);   // [n] per rank; the values do not matter for the timing
            d.fill_bytes(0);
            const double t = time_collective(comm, m >= 64 ? 5 : 20, [&] { cu::device_all_reduce(comm, d.data(), n); });
            if (comm.rank() == 0) sec = t;
            comm.barrier();
        });
        const double alg = double(n * sizeof(float)) / sec / 1e9, bus = alg * 2.0 * (R - 1) / R;
        std::printf("  %10zu %10.3f %12.1f %12.1f %13.0f%%\n", m, sec * 1e3, alg, bus, 100.0 * bus / peer);
    }
}

void bench_dispatch_combine(cu::PeerGroup& group, double peer, const char* label) {
    const int R = group.world_size(), tokens = 4096, K = 8, experts = 256;
    const int64_t d = 7168;   // row: [d] fp32 = 28 KiB
    std::printf("\n(c) dispatch / combine, %d ranks, %d tokens/rank, top-%d of %d experts, rows of %lld fp32, %s\n", R,
                tokens, K, experts, (long long)d, label);
    std::vector<double> sec_d(static_cast<size_t>(R)), sec_c(static_cast<size_t>(R));
    std::vector<int64_t> off_d(static_cast<size_t>(R)), off_c(static_cast<size_t>(R));
    cu::run_gpu_ranks(group, [&](cu::PeerComm& comm) {
        const int r = comm.rank();
        // Routing: per token, K distinct experts; ranks_of = the ranks owning them (expert e on rank e·R/experts).
        dsv3::Rng rng = dsv3::Rng(42).fork(uint64_t(r));
        std::vector<int64_t> tok_to(static_cast<size_t>(R), 0), pair_to(static_cast<size_t>(R), 0);
        for (int t = 0; t < tokens; ++t) {
            std::vector<int> chosen;
            while (int(chosen.size()) < K) {
                const int e = int(rng.below(uint64_t(experts)));
                if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
            }
            std::vector<char> hit(static_cast<size_t>(R), 0);
            for (int e : chosen) {
                const int q = int(int64_t(e) * R / experts);
                hit[size_t(q)] = 1;
                ++pair_to[size_t(q)];
            }
            for (int q = 0; q < R; ++q) tok_to[size_t(q)] += hit[size_t(q)];
        }
        // Dispatch: tok_to rows out; combine: the owners return pair rows, so this rank RECEIVES pair_to[q] rows from
        // q and SENDS back to each source q the pairs q routed here (counts exchanged first, as a real step would).
        const std::vector<int64_t> tok_from = dsv3::exchange_counts(comm, tok_to);
        const std::vector<int64_t> pair_from = dsv3::exchange_counts(comm, pair_to);
        int64_t n_tok_to = 0, n_tok_from = 0, n_pair_to = 0, n_pair_from = 0;
        for (int q = 0; q < R; ++q) {
            n_tok_to += tok_to[size_t(q)];
            n_tok_from += tok_from[size_t(q)];
            n_pair_to += pair_to[size_t(q)];
            n_pair_from += pair_from[size_t(q)];
        }
        cu::DeviceBuffer<float> x_send(size_t(n_tok_to * d)), x_recv(size_t(n_tok_from * d));    // dispatch
        cu::DeviceBuffer<float> y_send(size_t(n_pair_from * d)), y_recv(size_t(n_pair_to * d));  // combine
        x_send.fill_bytes(0);
        y_send.fill_bytes(0);
        sec_d[size_t(r)] = time_collective(comm, 5, [&] {
            cu::device_all_to_all(comm, x_send.data(), tok_to, d, x_recv.data(), tok_from);
        });
        sec_c[size_t(r)] = time_collective(comm, 5, [&] {
            cu::device_all_to_all(comm, y_send.data(), pair_from, d, y_recv.data(), pair_to);
        });
        off_d[size_t(r)] = (n_tok_to - tok_to[size_t(r)]) * d * int64_t(sizeof(float));
        off_c[size_t(r)] = (n_pair_from - pair_from[size_t(r)]) * d * int64_t(sizeof(float));
        comm.barrier();
    });
    std::printf("  %6s %9s %14s %10s %10s %12s\n", "rank", "phase", "MiB off-rank", "time ms", "GB/s", "GB/s / peer");
    for (int r = 0; r < R; ++r)
        for (int ph = 0; ph < 2; ++ph) {
            const double sec = ph ? sec_c[size_t(r)] : sec_d[size_t(r)];
            const double b = double(ph ? off_c[size_t(r)] : off_d[size_t(r)]);
            std::printf("  %6d %9s %14.1f %10.3f %10.1f %11.0f%%\n", r, ph ? "combine" : "dispatch", b / (1 << 20),
                        sec * 1e3, b / sec / 1e9, 100.0 * b / sec / 1e9 / peer);
        }
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    try {
        int gpus = 0;
        DSV3_CUDA_CHECK(cudaGetDeviceCount(&gpus));
        if (gpus < 2) {
            std::printf("bench_multi_gpu: %d GPU visible, 2 or more needed: skipped\n", gpus);
            return 0;
        }
        cu::PeerGroup group;   // start-up report: GPUs, peer access per pair
        if (!group.all_direct()) std::printf("NOTE: some pairs are staged through host memory; (a) still uses peer copies\n");
        int perf = 0, atomics = 0;
        cudaDeviceGetP2PAttribute(&perf, cudaDevP2PAttrPerformanceRank, 0, 1);
        cudaDeviceGetP2PAttribute(&atomics, cudaDevP2PAttrNativeAtomicSupported, 0, 1);
        std::printf("GPU 0 <-> 1: P2P performance rank %d, native atomics %d\n", perf, atomics);

        const size_t peer_bytes = size_t(256) << 20;
        const PeerBw bw = peer_bandwidth(peer_bytes, quick ? 5 : 20);
        std::printf("\n(a) peer copy alone, cudaMemcpyPeerAsync, 256 MiB\n");
        std::printf("  GPU 0 -> 1 alone:       %8.1f GB/s\n", bw.one_way_01);
        std::printf("  GPU 1 -> 0 alone:       %8.1f GB/s\n", bw.one_way_10);
        std::printf("  both directions at once: %7.1f GB/s each way, %.1f GB/s total\n", bw.both, 2 * bw.both);
        const double peer = bw.both;   // every collective below sends and receives at once
        std::printf("  ratios below are to the both-directions figure, %.1f GB/s per direction\n", peer);

        std::vector<size_t> mib = {1, 2, 4, 8, 16, 32, 64, 128, 256};
        if (quick) mib = {1, 16, 256};
        bench_all_reduce(group, peer, mib, "peer copies");
        bench_dispatch_combine(group, peer, "peer copies");

        cu::PeerGroup staged(0, /*force_staging=*/true, /*verbose=*/false);
        std::printf("\n(d) the same, every transfer staged through pinned host memory (HFReduce path, forced)\n");
        bench_all_reduce(staged, peer, {16, 256}, "staged via host");
        bench_dispatch_combine(staged, peer, "staged via host");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_multi_gpu: %s\n", e.what());
        return 1;
    }
    return 0;
}
