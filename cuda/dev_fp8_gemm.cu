// cuda/dev_fp8_gemm.cu — the versions of the block-scaled FP8 GEMM, one at a time (llm.c's dev/cuda style).
//     make cuda && build/dev_fp8_gemm [N[,N...] [S ...]]   N = 1..6: those versions only (0 or none: all); S: sizes
//                                                          M = N = K (default 4096 8192)
//
// C[M, N] = A[M, K] · B[N, K]ᵀ, E4M3 codes, A's scales per 1×128 tile, B's per 128×128 block, promotion to FP32 every
// 128 along K (DeepSeek-V3 report, arXiv 2412.19437 §3.3.2; the accumulator model is the header's section 8). The
// library's entry points are cuda::fp8_gemm and fp8_matmul_forward / _backward (cuda/fp8.cuh), which run version 6
// on 16-byte rows with at least one 128 × 128 tile an SM, and version 2 (or its 64-wide tile) otherwise (version 1
// where the binary has no wgmma, i.e. not built for sm_90a, or the GPU is not Hopper). This program runs each alone:
//   check: BIT-EXACT against the header's CPU dsv3::fp8_gemm (0 differing outputs, else FAIL with the count and the
//          largest difference), on ragged shapes (test_cuda's: partial tiles, K not a multiple of 16, unit scales with
//          raw codes of every magnitude, V3-style quantized Gaussians) and on 96 rows of each benchmark size (rows
//          0-31, M/2+48 .. M/2+79 across a warpgroup boundary, the last 32), every column.
//   time:  CUDA events, 3 warm-up calls, the median of 20 (version 1: 1 and 3, it is slow); random finite codes, scales
//          in [0.5, 1.5); TFLOP/s = 2·M·N·K / time.
//
// The versions (2-6 are wgmma kernels: a CTA computes a 128 × BN tile of C with two warpgroups of 64 rows; K advances
// in tiles of 128 = one promotion chunk = 4 wgmma.m64nBNk32.e4m3, chained in the tensor core's accumulator, then on
// the CUDA cores acc32 = fmaf(c, sa·sb, acc32); the tiles sit in shared memory in the 128-byte swizzle wgmma reads
// without bank conflicts):
//   v1  the emulation (cuda::fp8_gemm_emulated): the header's integer model of the tensor core's accumulator on the
//       CUDA cores, one thread per output. Runs on any GPU; the reference the fast path was first checked against.
//   v2  128×128 tile, 4 stages of cp.async by all 256 threads, one __syncthreads a K-tile (fp8_gemm_wgmma_kernel).
//   v3  128×192 tile, 4 stages (the same kernel): fewer bytes per FLOP.
//   v4  128×128, 5 stages, ping-pong accumulators: chunk kt's four wgmma run into c[kt % 2] while the CUDA cores
//       promote chunk kt-1 from the other one. Defined below; the library does not launch it.
//   v5  128×192, 5 stages: a deeper pipeline. Defined below; the library does not launch it.
//   v6  warp-specialized (fp8_gemm_ws_kernel): a producer thread feeds 6 stages by TMA, two consumer warpgroups wait
//       on per-stage mbarriers instead of __syncthreads, so they drift apart and one's promotion overlaps the other's
//       wgmma; persistent grid; setmaxnreg.
// Measured on an H200 (2026-12-04, one run of `build/dev_fp8_gemm 2,3,6 4096 6144 8192`, then in the same lease
// cuBLASLt through torch._scaled_mm, tests/reference/bench_scaled_mm.py: 995 / 1177 / 1181 TFLOP/s):
//   v2: 648 / 681 / 703 TFLOP/s      v3: 582 / 701 / 730 (an earlier lease)      v6: 852 / 912 / 954
// and on an H100 SXM (earlier; cuBLASLt 860-990 / 1125-1190 at 4096 / 8192): v2 ~650 / 716, v3 ~588 / 743,
// v4 ~660 / 660-700: ptxas serialises the wgmma (warning C7514: the promotion reads one accumulator while the other's
// wgmma is in flight, which it cannot prove safe), so the overlap it was written for does not happen; v5 ~585 /
// 656-667 (a deeper pipeline does not help: the loads were not the limit of v2).
// On the way to v6 (H200, same sizes, not kept): the same warp-specialized kernel with a producer WARPGROUP issuing
// cp.async (each thread 16 copies a stage, then cp.async.wait_group, a proxy fence and an mbarrier arrival for the
// stage before) reached 775 / 827 / 852 with 72 producer registers and 656 / 691 / 716 with 40 and its loops partly
// unrolled: the producer's issue rate limits it, which TMA (one instruction a box) removes. With 192-wide tiles
// (TMA, 4 stages) 689 / 830 / 860: slower than 128. What would close the rest of the gap to cuBLASLt: TMA
// multicast across a cluster of 2 (one operand's L2 → SM bytes halved) and an epilogue that overlaps the next tile's
// wgmma (two accumulator sets, which need the registers a third consumer would take).
#include "dev_common.cuh"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace dsv3 {
namespace cuda {
namespace detail {
// ---- versions 4 and 5: the wgmma kernel with STAGES and PINGPONG as parameters (the library's kernel is this one
// with STAGES = 4 and no ping-pong). The helpers (wgmma wrappers, descriptors, gemm_load_tile, cp.async) are fp8.cuh's.
// PINGPONG (two tensor-core accumulators): chunk kt's four wgmma run into c[kt % 2] while the CUDA cores promote
// chunk kt-1 from the other one, so the promotion and the wait for the tensor cores overlap the next chunk's math.
// The price: a third register tile (BN/2 more registers), and the stage of chunk kt-1 is free only one iteration
// later (prefetch depth STAGES-2 instead of STAGES-1).
template <int BN, bool VEC16, int STAGES, bool PINGPONG>
__global__ void __launch_bounds__(kGemmThreads, 1)
    fp8_gemm_wgmma_dev_kernel(const uint8_t* __restrict__ A, const float* __restrict__ sa, const uint8_t* __restrict__ B,
                          const float* __restrict__ sb, float* __restrict__ C, int M, int N, int K, int sb_rows,
                          int accumulate) {
#ifdef DSV3_HAS_WGMMA
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    constexpr int kStageBytes = (kGemmBM + BN) * kGemmBK;
    constexpr int R = BN / 2;                       // accumulator registers per thread
    constexpr int AHEAD = PINGPONG ? STAGES - 2 : STAGES - 1;   // tiles in flight ahead of the one computed

    // Tile of this CTA, in groups of kGemmGroupM row tiles so that neighbouring CTAs share B tiles in L2.
    const int tiles_m = (M + kGemmBM - 1) / kGemmBM, tiles_n = (N + BN - 1) / BN;
    const int id = blockIdx.x, per_group = kGemmGroupM * tiles_n, group = id / per_group;
    const int first_m = group * kGemmGroupM, group_m = min(tiles_m - first_m, kGemmGroupM);
    const int tm = first_m + (id % per_group) % group_m, tn = (id % per_group) / group_m;
    const int m0 = tm * kGemmBM, n0 = tn * BN;
    const int KT = (K + kGemmBK - 1) / kGemmBK;

    const int wg = threadIdx.x / 128, w = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int row0 = m0 + wg * 64 + w * 16 + lane / 4, row1 = row0 + 8;   // the two rows this thread holds
    // B's 128×128 scale blocks: a BN-wide tile spans at most two (BN <= 192).
    const int nb0 = n0 / 128, nt = (N + 127) / 128;

    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    float c0[R], c1[PINGPONG ? R : 1];

    auto stage_a = [&](int s) { return smem + s * kStageBytes; };
    auto stage_b = [&](int s) { return smem + s * kStageBytes + kGemmBM * kGemmBK; };
    // The four scale products of chunk kt for this thread's two rows and (at most) two column blocks.
    struct Scales { float s00, s01, s10, s11, sa0, sa1; };
    auto scales_of = [&](int kt) {
        const float sa0 = sa ? (row0 < M ? sa[int64_t(row0) * KT + kt] : 0.0f) : 1.0f;
        const float sa1 = sa ? (row1 < M ? sa[int64_t(row1) * KT + kt] : 0.0f) : 1.0f;
        const bool blocks = sb && sb_rows == 128;
        const float sb0 = blocks ? sb[int64_t(nb0) * KT + kt] : 1.0f;
        const float sb1 = blocks ? (nb0 + 1 < nt ? sb[int64_t(nb0 + 1) * KT + kt] : 0.0f) : 1.0f;
        // sa·sb rounded to float first, as dsv3::fp8_gemm
        return Scales{__fmul_rn(sa0, sb0), __fmul_rn(sa0, sb1), __fmul_rn(sa1, sb0), __fmul_rn(sa1, sb1), sa0, sa1};
    };
    // Promotion (V3 §3.3.2): acc32 = fmaf(c, sa·sb, acc32).
    auto promote = [&](const float (&c)[R], const Scales& s, int kt) {
        if (sb && sb_rows == 1) {   // Wgrad: one scale per row of B, i.e. per output column
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int col = n0 + 8 * (r / 4) + 2 * (lane % 4) + (r % 2);
                const float sbv = col < N ? sb[int64_t(col) * KT + kt] : 0.0f;
                acc[r] = fmaf(c[r], __fmul_rn((r / 2) % 2 ? s.sa1 : s.sa0, sbv), acc[r]);
            }
            return;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            // A 128-wide tile starts on a block boundary: one column block (known at compile time).
            const bool second_block = BN > 128 && (n0 + 8 * (r / 4)) / 128 != nb0;
            const bool second_row = (r / 2) % 2;
            const float sab = second_row ? (second_block ? s.s11 : s.s10) : (second_block ? s.s01 : s.s00);
            acc[r] = fmaf(c[r], sab, acc[r]);
        }
    };
    // c = A[64, 128] · B[BN, 128]ᵀ of chunk kt in 4 blocks of K = 32, chained in the tensor core's accumulator.
    auto issue = [&](float (&c)[R], int kt) {
        const uint8_t* a_tile = stage_a(kt % STAGES) + wg * 64 * 128;
        const uint8_t* b_tile = stage_b(kt % STAGES);
        fence_operands(c);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j)
            wgmma_k32<BN>(c, smem_desc_sw128(a_tile + 32 * j), smem_desc_sw128(b_tile + 32 * j), j > 0 ? 1 : 0);
        wgmma_commit();
    };
    // Top of each iteration: tile kt has landed (everyone's part of it), then refill the stage freed for tile kt+AHEAD.
    auto wait_and_prefetch = [&](int kt) {
        cp_async_wait<AHEAD - 1>();
        fence_proxy_async();
        __syncthreads();
        const int nk = kt + AHEAD;
        if (nk < KT) gemm_load_tile<BN, VEC16>(stage_a(nk % STAGES), stage_b(nk % STAGES), A, B, M, N, K, m0, n0, nk);
        cp_async_commit();
    };

#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
        if (s < KT) gemm_load_tile<BN, VEC16>(stage_a(s), stage_b(s), A, B, M, N, K, m0, n0, s);
        cp_async_commit();
    }
    if constexpr (!PINGPONG) {
        for (int kt = 0; kt < KT; ++kt) {
            wait_and_prefetch(kt);
            const Scales s = scales_of(kt);   // read while the tensor cores work
            issue(c0, kt);
            wgmma_wait<0>();
            fence_operands(c0);
            promote(c0, s, kt);
        }
    } else {
        // Iteration kt: issue chunk kt into c[kt % 2]; wait until only it is pending (chunk kt-1 is done); promote
        // chunk kt-1. Unrolled by two so that each accumulator is named at compile time (registers, not memory).
        Scales prev{};
        for (int kt = 0; kt < KT; kt += 2) {
            wait_and_prefetch(kt);
            Scales cur = scales_of(kt);
            issue(c0, kt);
            if (kt > 0) { wgmma_wait<1>(); fence_operands(c1); promote(c1, prev, kt - 1); }
            prev = cur;
            if (kt + 1 < KT) {
                wait_and_prefetch(kt + 1);
                cur = scales_of(kt + 1);
                issue(c1, kt + 1);
                wgmma_wait<1>(); fence_operands(c0); promote(c0, prev, kt);
                prev = cur;
            }
        }
        wgmma_wait<0>();
        if ((KT - 1) % 2 == 0) { fence_operands(c0); promote(c0, prev, KT - 1); }
        else { fence_operands(c1); promote(c1, prev, KT - 1); }
    }
    cp_async_wait<0>();
    // Epilogue: FP32 C, two adjacent columns per store where possible.
#pragma unroll
    for (int r = 0; r < R; r += 2) {
        const int row = (r / 2) % 2 ? row1 : row0;
        const int col = n0 + 8 * (r / 4) + 2 * (lane % 4);
        if (row >= M) continue;
        float* dst = C + int64_t(row) * N + col;
        if (col + 1 < N && (N % 2 == 0)) {
            float2 v = make_float2(acc[r], acc[r + 1]);
            if (accumulate) { const float2 old = *reinterpret_cast<const float2*>(dst); v.x = old.x + v.x; v.y = old.y + v.y; }
            *reinterpret_cast<float2*>(dst) = v;
        } else {
            if (col < N) dst[0] = accumulate ? dst[0] + acc[r] : acc[r];
            if (col + 1 < N) dst[1] = accumulate ? dst[1] + acc[r + 1] : acc[r + 1];
        }
    }
#else
    __trap();   // built without sm_90a: the host never launches this (see fp8_gemm_fast_available)
#endif
}

// Versions 4 and 5 on 16-byte rows (K % 16 == 0, aligned pointers; the caller checks).
template <int BN, int STAGES, bool PINGPONG>
void launch_dev_wgmma(const uint8_t* A, const float* sa, const uint8_t* B, const float* sb, float* C, int M, int N,
                      int K) {
    constexpr int smem = gemm_smem_bytes<BN, STAGES>();
    static const bool attr = [] {   // more than 48 KB of dynamic shared memory must be asked for, once per kernel
        DSV3_CUDA_CHECK(cudaFuncSetAttribute(fp8_gemm_wgmma_dev_kernel<BN, true, STAGES, PINGPONG>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        return true;
    }();
    (void)attr;
    const int64_t tiles = int64_t((M + kGemmBM - 1) / kGemmBM) * ((N + BN - 1) / BN);
    fp8_gemm_wgmma_dev_kernel<BN, true, STAGES, PINGPONG><<<unsigned(tiles), kGemmThreads, smem>>>(A, sa, B, sb, C, M,
                                                                                                  N, K, 128, 0);
    DSV3_CUDA_CHECK_LAUNCH();
}
}  // namespace detail
}  // namespace cuda
}  // namespace dsv3

namespace {

namespace cu = dsv3::cuda;
namespace cd = dsv3::cuda::detail;
using cu::bench::time_ms;

constexpr int kVersions = 6;
const char* const kNames[kVersions + 1] = {"", "emulation (CUDA cores)", "128x128, 4 stages", "128x192, 4 stages",
                                           "128x128, 5 stages, ping-pong", "128x192, 5 stages",
                                           "warp-specialized, TMA, 6 stages"};

// Why version v cannot run C = A·Bᵀ of depth K here (nullptr: it can).
const char* unavailable(int v, int K, const void* A, const void* B) {
    if (v == 1) return nullptr;
    if (!cu::fp8_gemm_fast_available()) return "n/a: no wgmma (build for sm_90a, run on Hopper)";
    const bool vec16 = K % 16 == 0 && reinterpret_cast<uintptr_t>(A) % 16 == 0 && reinterpret_cast<uintptr_t>(B) % 16 == 0;
    if (v >= 4 && !vec16) return "n/a: needs K % 16 == 0";
    return nullptr;
}
// C[M, N] = A·Bᵀ by version v (device pointers; scales may be null = ones).
void run_version(int v, const uint8_t* A, const float* sa, const uint8_t* B, const float* sb, float* C, int M, int N,
                 int K) {
    switch (v) {
        case 1: cd::fp8_gemm_general(A, sa, B, sb, 128, C, M, N, K, false, cd::Fp8Kernel::emulated); break;
        case 2: cd::launch_fp8_gemm_wgmma(128, A, sa, B, sb, C, M, N, K, 128, 0); break;
        case 3: cd::launch_fp8_gemm_wgmma(192, A, sa, B, sb, C, M, N, K, 128, 0); break;
        case 4: cd::launch_dev_wgmma<128, 5, true>(A, sa, B, sb, C, M, N, K); break;
        case 5: cd::launch_dev_wgmma<192, 5, false>(A, sa, B, sb, C, M, N, K); break;
        default: cd::fp8_gemm_general(A, sa, B, sb, 128, C, M, N, K, false, cd::Fp8Kernel::ws); break;
    }
}

// Bitwise comparison: outputs whose bits differ, and the largest |gpu − cpu| among them (NaN: infinite).
struct BitCheck {
    size_t differ = 0, total = 0;
    double max_abs = 0;
    void add(const float* gpu, const float* cpu, size_t n) {
        for (size_t i = 0; i < n; ++i) {
            uint32_t a, b;
            std::memcpy(&a, gpu + i, 4);
            std::memcpy(&b, cpu + i, 4);
            if (a == b) continue;
            ++differ;
            const double d = std::fabs(double(gpu[i]) - double(cpu[i]));
            max_abs = std::max(max_abs, std::isnan(d) ? double(INFINITY) : d);
        }
        total += n;
    }
    bool pass() const { return total > 0 && differ == 0; }
    std::string text() const {
        char buf[96];
        if (differ == 0) std::snprintf(buf, sizeof buf, "%s 0 of %zu differ", total ? "PASS" : "none", total);
        else std::snprintf(buf, sizeof buf, "FAIL %zu of %zu differ, max %.1e", differ, total, max_abs);
        return buf;
    }
};

// One product: host operands (scales empty = null) and their device copies.
struct Problem {
    int M, N, K;
    std::vector<uint8_t> A, B;
    std::vector<float> sa, sb;
    cu::DeviceBuffer<uint8_t> dA, dB;
    cu::DeviceBuffer<float> dsa, dsb;
    void upload() {
        dA.upload(A);
        dB.upload(B);
        if (!sa.empty()) { dsa.upload(sa); dsb.upload(sb); }
    }
    const float* sap() const { return sa.empty() ? nullptr : dsa.data(); }
    const float* sbp() const { return sb.empty() ? nullptr : dsb.data(); }
    // The CPU reference of rows [r0, r0 + rows): [rows, N].
    std::vector<float> cpu_rows(int r0, int rows) const {
        const int kt = dsv3::fp8_tiles(K);
        std::vector<float> C(size_t(rows) * N);
        dsv3::fp8_gemm(A.data() + size_t(r0) * K, sa.empty() ? nullptr : sa.data() + size_t(r0) * kt, B.data(),
                       sb.empty() ? nullptr : sb.data(), C.data(), rows, N, K);
        return C;
    }
};

// test_cuda's ragged shapes. quantized: V3's recipe (Gaussian activations in 1×128 tiles with rows of different
// magnitudes, weights in 128×128 blocks); else raw codes of every finite magnitude, zeros included, unit scales.
Problem ragged_problem(dsv3::Rng& rng, int M, int N, int K, bool quantized) {
    Problem p{M, N, K, {}, {}, {}, {}, {}, {}, {}, {}};
    if (quantized) {
        std::vector<float> x(size_t(M) * K), w(size_t(N) * K);
        for (int i = 0; i < M; ++i)
            for (int k = 0; k < K; ++k)
                x[size_t(i) * K + k] = float(rng.normal()) * float(1 + i % 7) * (k >= 128 ? 3.0f : 1.0f);
        for (auto& v : w) v = float(rng.normal()) * 0.02f;
        const int kt = dsv3::fp8_tiles(K);
        p.A.resize(x.size());
        p.B.resize(w.size());
        p.sa.resize(size_t(M) * kt);
        p.sb.resize(size_t(dsv3::fp8_tiles(N)) * kt);
        dsv3::quantize_tiles_1x128(x.data(), M, K, p.A.data(), p.sa.data());
        dsv3::quantize_blocks_128x128(w.data(), N, K, p.B.data(), p.sb.data());
    } else {
        auto codes = [&](size_t n) {
            std::vector<uint8_t> c(n);
            for (auto& v : c) {
                v = uint8_t(rng.below(256));
                if ((v & 0x7F) == 0x7F) v = 0;
            }
            return c;
        };
        p.A = codes(size_t(M) * K);
        p.B = codes(size_t(N) * K);
    }
    p.upload();
    return p;
}

// Runs version v on p (output poisoned with NaN first) and compares rows [r0, r0 + rows) with ref.
void check_rows(BitCheck& c, int v, const Problem& p, const std::vector<std::pair<int, int>>& row_blocks,
                const std::vector<std::vector<float>>& refs) {
    cu::DeviceBuffer<float> C(size_t(p.M) * p.N);
    C.fill_bytes(0xFF);
    run_version(v, p.dA.data(), p.sap(), p.dB.data(), p.sbp(), C.data(), p.M, p.N, p.K);
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> got = C.download();
    for (size_t i = 0; i < row_blocks.size(); ++i)
        c.add(got.data() + size_t(row_blocks[i].first) * p.N, refs[i].data(), size_t(row_blocks[i].second) * p.N);
}

}  // namespace

int main(int argc, char** argv) {
    try {
        std::vector<bool> chosen(kVersions + 1, true);   // argv[1]: 0 (all) or versions, comma-separated
        std::vector<int> sizes = {4096, 8192};
        if (argc > 1 && std::strcmp(argv[1], "0") != 0) {
            std::fill(chosen.begin(), chosen.end(), false);
            for (const char* p = argv[1]; *p;) {
                char* end = nullptr;
                const long v = std::strtol(p, &end, 10);
                if (end == p || v < 1 || v > kVersions || (*end && *end != ',')) {
                    std::fprintf(stderr, "usage: %s [N[,N...] [S ...]]   N = 1..%d runs those versions only (0 or none: "
                                 "all), S = sizes M = N = K (default 4096 8192)\n", argv[0], kVersions);
                    return 2;
                }
                chosen[size_t(v)] = true;
                p = *end ? end + 1 : end;
            }
        }
        if (argc > 2) {
            sizes.clear();
            for (int i = 2; i < argc; ++i) sizes.push_back(std::max(1, std::atoi(argv[i])));
        }
        auto selected = [&](int v) { return bool(chosen[size_t(v)]); };
        cu::bench::print_device("dev_fp8_gemm");

        // Ragged shapes, every output.
        struct Shape { int M, N, K; bool quantized; };
        const std::vector<Shape> ragged = {{128, 128, 128, true},  {64, 96, 96, false},    {200, 300, 520, true},
                                           {257, 130, 1040, true}, {300, 200, 200, false}, {129, 385, 4096, true},
                                           {512, 384, 2048, false}, {1, 1, 1, true}};
        std::vector<BitCheck> ragged_check(kVersions + 1);
        std::vector<int> ragged_count(kVersions + 1, 0);
        dsv3::Rng rng(112);
        for (const Shape& s : ragged) {
            const Problem p = ragged_problem(rng, s.M, s.N, s.K, s.quantized);
            const std::vector<std::pair<int, int>> all_rows = {{0, s.M}};
            const std::vector<std::vector<float>> ref = {p.cpu_rows(0, s.M)};
            for (int v = 1; v <= kVersions; ++v)
                if (selected(v) && !unavailable(v, s.K, p.dA.data(), p.dB.data())) {
                    check_rows(ragged_check[size_t(v)], v, p, all_rows, ref);
                    ++ragged_count[size_t(v)];
                }
        }
        bool all_pass = true;
        std::printf("\nragged shapes (M, N, K = 128,128,128  64,96,96  200,300,520  257,130,1040  300,200,200  "
                    "129,385,4096  512,384,2048  1,1,1), every output, bit for bit dsv3::fp8_gemm:\n");
        for (int v = 1; v <= kVersions; ++v) {
            if (!selected(v)) continue;
            const char* why = unavailable(v, 16, nullptr, nullptr);
            if (why) { std::printf("  v%d %-30s %s\n", v, kNames[v], why); continue; }
            std::printf("  v%d %-30s %d shapes  %s\n", v, kNames[v], ragged_count[size_t(v)],
                        ragged_check[size_t(v)].text().c_str());
            all_pass &= ragged_check[size_t(v)].pass();
        }

        // Benchmark sizes: 96 rows checked, the whole product timed.
        std::printf("\n%-6s  %-34s %-34s %10s %9s\n", "M=N=K", "version", "check (96 rows, bit for bit)", "time ms",
                    "TFLOP/s");
        for (int n : sizes) {
            Problem p{n, n, n, {}, {}, {}, {}, {}, {}, {}, {}};
            const int kt = dsv3::fp8_tiles(n);
            p.A = cu::bench::host_random_codes(size_t(n) * n, 1 + n);
            p.B = cu::bench::host_random_codes(size_t(n) * n, 2 + n);
            p.sa = cu::bench::host_random_floats(size_t(n) * kt, 3 + n, 0.5f, 1.5f);
            p.sb = cu::bench::host_random_floats(size_t(kt) * kt, 4 + n, 0.5f, 1.5f);
            p.upload();
            std::vector<std::pair<int, int>> blocks;
            if (n <= 256) blocks = {{0, n}};
            else blocks = {{0, 32}, {n / 2 + 48, 32}, {n - 32, 32}};
            std::vector<std::vector<float>> refs;
            for (auto& [r0, rows] : blocks) refs.push_back(p.cpu_rows(r0, rows));
            cu::DeviceBuffer<float> C(size_t(n) * n);
            for (int v = 1; v <= kVersions; ++v) {
                if (!selected(v)) continue;
                char ver[48];
                std::snprintf(ver, sizeof ver, "v%d %s", v, kNames[v]);
                if (const char* why = unavailable(v, n, p.dA.data(), p.dB.data())) {
                    std::printf("%-6d  %-34s %s\n", n, ver, why);
                    continue;
                }
                BitCheck c;
                check_rows(c, v, p, blocks, refs);
                all_pass &= c.pass();
                const bool slow = v == 1;
                const double ms = time_ms([&] {
                    run_version(v, p.dA.data(), p.sap(), p.dB.data(), p.sbp(), C.data(), n, n, n);
                }, slow ? 1 : 3, slow ? 3 : 20);
                const double tflops = 2.0 * n * double(n) * n / (ms * 1e-3) / 1e12;
                std::printf("%-6d  %-34s %-34s %10.3f %9.1f\n", n, ver, c.text().c_str(), ms, tflops);
            }
        }
        std::printf("\n%s\n", all_pass ? "all checks passed" : "SOME CHECKS FAILED");
        return all_pass ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dev_fp8_gemm: %s\n", e.what());
        return 1;
    }
}
