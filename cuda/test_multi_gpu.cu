// cuda/test_multi_gpu.cu — the peer-copy Communicator (cuda/comm.cuh) against the header's CPU collectives (doctest).
//     make build/test_multi_gpu && ./build/test_multi_gpu      (needs a GPU; uses all visible GPUs)
//
// What is checked, and why it can be bitwise:
//   - device_all_reduce == the header's all_reduce run on InProcessComm ranks (run_ranks), BIT FOR BIT, for sizes
//     that do not divide by R (chunks of unequal length, empty chunks when n < R), sum and mean. The two follow the
//     same ring schedule and add in the same order (incoming + mine); float addition and IEEE division are exactly
//     rounded on both CPU and GPU, so the same operations in the same order give the same bits.
//   - with one rank per GPU, and with 3 and 4 ranks sharing the GPUs (rank r on GPU r mod G: the R ≥ 3 ring, whose
//     chunk orders are rotations, runs even on a 2-GPU machine), and with transfers forced through pinned host
//     memory (the HFReduce staging path taken when peer access is missing).
//   - device_all_to_all with uneven counts (zeros included), counts exchanged first by the header's exchange_counts
//     on the same PeerComm (host buffers), every received row checked against what its sender wrote.
//   - a sendrecv whose sizes disagree fails with an error on every rank instead of hanging.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "comm.cuh"

#include <cstring>
#include <vector>

namespace {

namespace cu = dsv3::cuda;
using dsv3::ReduceOp;
using dsv3::Rng;

int gpu_count() {
    int n = 0;
    DSV3_CUDA_CHECK(cudaGetDeviceCount(&n));
    return n;
}

// Inputs of rank r: normals with a per-rank scale spanning 2^-6 .. 2^6, so that the order of the sum matters (a
// wrong order changes the low bits, which the bitwise check sees).
std::vector<float> rank_input(size_t n, int r, uint64_t seed) {
    Rng rng = Rng(seed).fork(uint64_t(r));
    const float scale = std::ldexp(1.0f, (r * 5) % 13 - 6);
    std::vector<float> v(n);
    for (float& x : v) x = float(rng.normal()) * scale;
    return v;
}

// The CPU reference: the header's ring all_reduce on R in-process ranks. Returns every rank's result.
std::vector<std::vector<float>> cpu_all_reduce(int R, size_t n, ReduceOp op, uint64_t seed) {
    std::vector<std::vector<float>> out(static_cast<size_t>(R));
    for (int r = 0; r < R; ++r) out[size_t(r)] = rank_input(n, r, seed);
    dsv3::run_ranks(R, [&](dsv3::Communicator& comm) { dsv3::all_reduce(comm, out[size_t(comm.rank())].data(), n, op); });
    return out;
}

std::vector<std::vector<float>> gpu_all_reduce(cu::PeerGroup& group, size_t n, ReduceOp op, uint64_t seed) {
    const int R = group.world_size();
    std::vector<std::vector<float>> out(static_cast<size_t>(R));
    cu::run_gpu_ranks(group, [&](cu::PeerComm& comm) {
        const int r = comm.rank();
        cu::DeviceBuffer<float> d(rank_input(n, r, seed));   // [n] on this rank's GPU (synchronous upload)
        comm.barrier();
        cu::device_all_reduce(comm, d.data(), n, op);
        comm.synchronize();
        out[size_t(r)] = d.download();
        comm.barrier();   // nobody frees its buffer while a peer may still read it
    });
    return out;
}

size_t mismatches(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return std::max(a.size(), b.size());
    size_t bad = 0;
    for (size_t i = 0; i < a.size(); ++i) bad += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return bad;
}

void check_all_reduce(int R, bool force_staging) {
    cu::PeerGroup group(R, force_staging, /*verbose=*/false);
    const size_t sizes[] = {0, 1, 2, 3, 5, 7, 1000, 4099, 65537, (size_t(1) << 20) + 3};
    uint64_t seed = 100;
    for (size_t n : sizes)
        for (ReduceOp op : {ReduceOp::sum, ReduceOp::mean}) {
            ++seed;
            const auto cpu = cpu_all_reduce(R, n, op, seed);
            const auto gpu = gpu_all_reduce(group, n, op, seed);
            for (int r = 0; r < R; ++r) {
                INFO("R=", R, " staging=", force_staging, " n=", n, " op=", op == ReduceOp::sum ? "sum" : "mean",
                     " rank=", r);
                CHECK(mismatches(gpu[size_t(r)], cpu[size_t(r)]) == 0);
                CHECK(mismatches(gpu[size_t(r)], gpu[0]) == 0);   // every rank holds the same bits
            }
        }
}

}  // namespace

TEST_CASE("start-up report: GPUs and peer access") {
    cu::PeerGroup group;   // prints the GPUs and, per pair, direct peer copies or staging through pinned host memory
    CHECK(group.world_size() == gpu_count());
}

TEST_CASE("device all_reduce == header CPU ring all_reduce, bitwise, one rank per GPU") {
    check_all_reduce(gpu_count(), false);
}

TEST_CASE("device all_reduce == header CPU ring all_reduce, bitwise, 3 and 4 ranks sharing the GPUs") {
    check_all_reduce(3, false);
    check_all_reduce(4, false);
}

TEST_CASE("device all_reduce == header CPU ring all_reduce, bitwise, staged through pinned host memory") {
    check_all_reduce(std::max(2, gpu_count()), true);
    check_all_reduce(3, true);
}

TEST_CASE("device all_reduce of integers: exact sums") {
    const int R = std::max(2, gpu_count());
    cu::PeerGroup group(R, false, false);
    const size_t n = 12345;
    std::vector<std::vector<int32_t>> out(static_cast<size_t>(R));
    cu::run_gpu_ranks(group, [&](cu::PeerComm& comm) {
        std::vector<int32_t> h(n);
        for (size_t i = 0; i < n; ++i) h[i] = int32_t(i) * (comm.rank() + 1);
        cu::DeviceBuffer<int32_t> d(h);
        comm.barrier();
        cu::device_all_reduce(comm, d.data(), n);
        comm.synchronize();
        out[size_t(comm.rank())] = d.download();
        comm.barrier();
    });
    for (int r = 0; r < R; ++r)
        for (size_t i = 0; i < n; i += 997) CHECK(out[size_t(r)][i] == int32_t(i) * (R * (R + 1) / 2));
}

// all_to_all: rank r sends rows_to(r, q) rows of `row` floats to rank q; row j of those holds value(r, q, j, k).
namespace {
int64_t rows_to(int r, int q, int R) { return int64_t((r * 7 + q * 3 + R) % 5) * 37 + (r == q ? 0 : 1); }  // 0..149
float value(int r, int q, int64_t j, int64_t k) { return float(r * 1000000 + q * 100000) + float(j) * 8.0f + float(k); }

void check_all_to_all(int R, bool force_staging) {
    cu::PeerGroup group(R, force_staging, false);
    const int64_t row = 7;   // an odd row length: rows are not 16-byte aligned
    std::vector<int64_t> bad(size_t(R), -1);
    cu::run_gpu_ranks(group, [&](cu::PeerComm& comm) {
        const int r = comm.rank();
        std::vector<int64_t> send_rows(static_cast<size_t>(R));
        std::vector<float> h_send;   // [Σ send_rows, row], grouped by destination
        for (int q = 0; q < R; ++q) {
            send_rows[size_t(q)] = rows_to(r, q, R);
            for (int64_t j = 0; j < send_rows[size_t(q)]; ++j)
                for (int64_t k = 0; k < row; ++k) h_send.push_back(value(r, q, j, k));
        }
        const std::vector<int64_t> recv_rows = dsv3::exchange_counts(comm, send_rows);   // host counts, same comm
        int64_t total = 0;
        for (int q = 0; q < R; ++q) total += recv_rows[size_t(q)];
        cu::DeviceBuffer<float> d_send(h_send), d_recv(size_t(total * row) + 1);   // [Σ send_rows, row], [Σ recv, row]
        d_recv.fill_bytes(0xFF);   // NaN poison: a row nobody wrote fails
        comm.barrier();
        cu::device_all_to_all(comm, d_send.data(), send_rows, row, d_recv.data(), recv_rows);
        comm.synchronize();
        const std::vector<float> h = d_recv.download();
        int64_t wrong = 0, at = 0;
        for (int q = 0; q < R; ++q) {
            if (recv_rows[size_t(q)] != rows_to(q, r, R)) ++wrong;
            for (int64_t j = 0; j < recv_rows[size_t(q)]; ++j, ++at)
                for (int64_t k = 0; k < row; ++k) wrong += !(h[size_t(at * row + k)] == value(q, r, j, k));
        }
        bad[size_t(r)] = wrong;
        comm.barrier();
    });
    for (int r = 0; r < R; ++r) {
        INFO("R=", R, " staging=", force_staging, " rank=", r);
        CHECK(bad[size_t(r)] == 0);
    }
}
}  // namespace

TEST_CASE("device all_to_all with uneven counts") {
    check_all_to_all(gpu_count(), false);
    check_all_to_all(3, false);
    check_all_to_all(4, false);
    check_all_to_all(std::max(2, gpu_count()), true);
}

TEST_CASE("sendrecv with disagreeing sizes fails on every rank instead of hanging") {
    const int R = std::max(2, gpu_count());
    cu::PeerGroup group(R, false, false);
    // The buffers outlive the run: a peer may still be copying from a failed rank's buffer when that rank unwinds
    // (run_gpu_ranks synchronises every stream before it returns).
    std::vector<cu::DeviceBuffer<float>> keep(static_cast<size_t>(2 * R));
    CHECK_THROWS_AS(cu::run_gpu_ranks(group,
                                      [&](cu::PeerComm& comm) {
                                          const int r = comm.rank(), next = (r + 1) % R, prev = (r + R - 1) % R;
                                          cu::DeviceBuffer<float>& a = keep[size_t(2 * r)];
                                          cu::DeviceBuffer<float>& b = keep[size_t(2 * r + 1)];
                                          a.resize(16);
                                          b.resize(16);
                                          // rank 0 expects 8 bytes, its peer sends 16
                                          comm.sendrecv(a.data(), 16, next, b.data(), r == 0 ? 8 : 16, prev);
                                      }),
                    dsv3::Error);
    // the group is usable again afterwards
    const auto cpu = cpu_all_reduce(R, 1001, ReduceOp::sum, 7);
    const auto gpu = gpu_all_reduce(group, 1001, ReduceOp::sum, 7);
    CHECK(mismatches(gpu[0], cpu[0]) == 0);
}
