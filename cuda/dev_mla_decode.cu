// cuda/dev_mla_decode.cu — the versions of absorbed MLA decoding, one at a time (llm.c's dev/cuda style).
//     make cuda && build/dev_mla_decode [N]        N = 1..4: that version only; no argument: every version
//
// The kernel the library launches is cuda::mla_decode_absorbed (cuda/mla_decode.cuh), which picks version 2 for
// dc 128 / dr 32 (H a multiple of 8), version 3 for dc 512 / dr 64 (H a multiple of 16) and version 1 otherwise. This
// program runs each version alone on the shapes it handles:
//   check: against the header's CPU absorbed decoding, dsv3::mla_attend_latent (header section 7: the one new token of
//          a sequence of T cached tokens is row 0 at position T−1, attending over positions 0..T−1), on ragged shapes
//          (every sequence) and on the benchmark shapes (three sequences: first, middle, last). Both sides sum in
//          float32 over up to 32768 tokens, in different orders (online softmax over splits here, plain loops there):
//          relative Frobenius error ≈ 1e-6; bound 1e-4 (a wrong index or a lost tile gives > 1e-2).
//   time:  CUDA events, 3 warm-up calls, the median of 20; bytes = the cache read once (T·(dc + dr) floats per
//          sequence) plus the queries read and the output written; GB/s and its share of the device's copy bandwidth
//          (cudaMemcpy device to device, read + write), measured in the same run.
//
// The work: o_latent[b,h] = Σ_t softmax_t(scale·(q_latent[b,h]·c_kv[b,t] + q_rope[b,h]·k_rope[b,t])) · c_kv[b,t]
// (DeepSeek-V3 §2.1.1, weight absorption: DeepSeek-V2 §2.1.3). All heads read the same cache rows, so each version
// reads every row once for all the heads of a CTA: decoding is a stream over the cache, and its speed is a fraction of
// the memory bandwidth. The work per cached float is 4·H FLOPs (scores and output), so with many heads decoding stops
// being a pure stream.
//
// The versions (each split-T "flash decoding": one CTA per (head group, split of T, sequence), one full wave of CTAs,
// tiles through shared memory by cp.async double-buffering, online softmax, then a merge of the splits in order):
//   v1  any shape: one thread per score and per output element, FP32, everything through shared memory; as many heads
//       per CTA as fit in shared memory. (mla_decode.cuh: mla_decode_split_kernel, launch_decode_plain)
//   v2  register-blocked FP32 for the shapes that matter (8 heads with dc 128 / dr 32, 16 heads with dc 512 / dr 64).
//       v1 reads shared memory once per multiply-add; here each value read from shared memory feeds several: scores
//       in 4-head × 4-token blocks (8 reads for 64 FMAs), and each thread keeps HB heads × CB float4 columns of o in
//       registers; tiles of 32 tokens, the softmax one warp per head. (mla_decode.cuh: mla_decode_v2_kernel; the
//       library launches it for dc 128 only, the 16-head instantiation <16, 512, 64, 4, 2> exists only here)
//   v3  tensor cores for 16 heads with dc 512 / dr 64: with 16 heads the two products of a tile cost 8 multiply-adds
//       per cached byte, more than the CUDA cores sustain at full memory speed, so they go to mma.sync m16n8k8 in
//       TF32, each FP32 operand split hi + lo ("3xTF32", about FP32 accuracy), 16 warps. (mla_decode.cuh:
//       mla_decode_v3_kernel)
//   v4  v3 with 8 warps (phase 1: two column halves instead of four slices; phase 3: 64 output columns per warp),
//       kept for comparison: defined below, the library does not launch it.
// Measured on an H100 SXM (bench_cuda when it still looped over the versions; copy bandwidth 2990 GB/s, read + write):
//   small preset   (H = 8,   dc 128, dr 32, B 128, T 4096)  v2: 1835-1867 GB/s = 61-62% of copy
//   V2-Lite shape  (H = 16,  dc 512, dr 64, B 32,  T 4096)  v3: 1368 GB/s = 46%  (v2 35%, v1 14%)
//   V3 shape       (H = 128, dc 512, dr 64, B 32,  T 4096)  v3: 205 GB/s = 7%: compute-bound, 8 head groups each
//                  redo a tile's 3xTF32 products; FlashMLA-style wgmma over 64-head tiles (with BF16 or FP8 caches,
//                  as DeepSeek's inference does) would be the next version.
//   v4 (8 warps): no figure was recorded; the library's v3 uses 16 warps.
#include "dev_common.cuh"

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

namespace dsv3 {
namespace cuda {
namespace detail {
// ---- version 4: version 3 with WARPS warps (8 here). The comments below describe the 8-warp layout.
//   Phase 1: warp w computes the 16 × 8 scores of tokens 8·(w mod 4) .. +8 over half of the 576 columns (w / 4);
//            the two halves are added in phase 2, in a fixed order.
//   Phase 3: warp w owns output columns 64·w .. +64 (8 MMA tiles, 32 accumulator registers per thread).
// Fragment layouts (PTX ISA, "mma.m16n8k8" for .tf32), g = lane / 4, t = lane % 4:
//   A (16×8, row):  a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   B (8×8, col):   b0 = B[t][g], b1 = B[t+4][g]
//   C (16×8):       c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
template <int WARPS>
struct Decode4 {
    static constexpr int HG = 16, DC = 512, DR = 64, D = DC + DR, DP = D + 4, TT = 32, THREADS = 32 * WARPS, PP = TT + 4;
    static constexpr int HEADS = HG;                // heads per CTA (launch_decode_fixed)
    static constexpr int KS = WARPS / 4;            // phase 1: the 4 token tiles × KS slices of the 576 columns
    static constexpr int NT3 = DC / 8 / WARPS;      // phase 3: 8-column MMA tiles per warp
    static_assert(WARPS % 4 == 0 && (D / KS) % 16 == 0 && NT3 >= 1, "layout");
    static constexpr size_t smem_floats = size_t(HG) * DP + 2 * size_t(TT) * DP + size_t(KS) * HG * TT +
                                          2 * size_t(HG) * PP + 3 * HG;
    static constexpr size_t smem_bytes = smem_floats * sizeof(float);
};

template <int WARPS>
__global__ void __launch_bounds__(Decode4<WARPS>::THREADS, 1)
    mla_decode_v4_kernel(float* part_o, float* part_ml, const float* __restrict__ q_latent,
                         const float* __restrict__ q_rope, const float* __restrict__ c_kv,
                         const float* __restrict__ k_rope, DecodeShape sh, float scale) {
    using S = Decode4<WARPS>;
    constexpr int HG = S::HG, DC = S::DC, DR = S::DR, D = S::D, DP = S::DP, TT = S::TT, PP = S::PP, D4 = D / 4;
    constexpr int KS = S::KS, NT3 = S::NT3;
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4);   // [HG, DP]
    float* tile = qs + HG * DP;                    // [2, TT, DP]
    float* sc = tile + 2 * TT * DP;                // [KS, HG, TT] partial scores of the KS column slices
    float* ph = sc + KS * HG * TT;                 // [HG, PP] probabilities, TF32 hi part
    float* pl = ph + HG * PP;                      // [HG, PP] and lo part
    float* m_s = pl + HG * PP;
    float* l_s = m_s + HG;
    float* alpha_s = l_s + HG;
    const int hgroup = blockIdx.x, split = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
    const int h0 = hgroup * HG, nh = min(HG, sh.H - h0);
    const int t_begin = split * sh.tokens_per_split, t_end = min(sh.T, t_begin + sh.tokens_per_split);

    for (int i = tid; i < HG * D; i += S::THREADS) {
        const int h = i / D, c = i % D, gh = h0 + h;
        float v = 0.0f;
        if (h < nh) v = c < DC ? q_latent[(int64_t(b) * sh.H + gh) * DC + c] : q_rope[(int64_t(b) * sh.H + gh) * DR + c - DC];
        qs[h * DP + c] = v;
    }
    for (int h = tid; h < HG; h += S::THREADS) { m_s[h] = -INFINITY; l_s[h] = 0.0f; }
    auto load_tile = [&](int buf, int t0) {
        float* dst = tile + buf * TT * DP;
        for (int i = tid; i < TT * D4; i += S::THREADS) {
            const int r = i / D4, c = (i % D4) * 4, t = t0 + r;
            const bool ok = t < t_end;
            const int64_t row = int64_t(b) * sh.T + (ok ? t : 0);
            const float* src = c < DC ? c_kv + row * DC + c : k_rope + row * DR + (c - DC);
            cp_async_16(dst + r * DP + c, src, ok ? 16 : 0);
        }
        cp_async_commit();
    };
    float o[NT3][4];   // phase 3 accumulators: NT3 tiles of 16 × 8 output columns
#pragma unroll
    for (int j = 0; j < NT3; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;

    const int n_tiles = (t_end - t_begin + TT - 1) / TT;
    if (n_tiles > 0) load_tile(0, t_begin);
    for (int it = 0; it < n_tiles; ++it) {
        const int t0 = t_begin + it * TT;
        if (it + 1 < n_tiles) { load_tile((it + 1) & 1, t0 + TT); cp_async_wait<1>(); }
        else cp_async_wait<0>();
        __syncthreads();
        const float* tl = tile + (it & 1) * TT * DP;
        // Phase 1: scores of tokens 8·nt .. +8, columns [kh·288, kh·288 + 288).
        {
            const int nt = warp % 4, kh = warp / 4;
            // Two accumulators over interleaved k-steps: two independent MMA chains instead of one long one.
            float cc[2][4] = {};
            const float* brow = tl + (nt * 8 + g) * DP;   // B[k][n] = tile[token n][column k]
            const int kb = kh * (D / KS);
#pragma unroll 1
            for (int k8 = 0; k8 < D / KS; k8 += 16) {
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int k0 = kb + k8 + 8 * u;
                    uint32_t ah[4], al[4], bh0, bl0, bh1, bl1;
                    split_tf32(qs[g * DP + k0 + t4], ah[0], al[0]);
                    split_tf32(qs[(g + 8) * DP + k0 + t4], ah[1], al[1]);
                    split_tf32(qs[g * DP + k0 + t4 + 4], ah[2], al[2]);
                    split_tf32(qs[(g + 8) * DP + k0 + t4 + 4], ah[3], al[3]);
                    split_tf32(brow[k0 + t4], bh0, bl0);
                    split_tf32(brow[k0 + t4 + 4], bh1, bl1);
                    mma_3xtf32(cc[u], ah, al, bh0, bh1, bl0, bl1);
                }
            }
            float c[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) c[e] = cc[0][e] + cc[1][e];
            float* out = sc + kh * HG * TT;
            out[g * TT + nt * 8 + 2 * t4] = c[0];
            out[g * TT + nt * 8 + 2 * t4 + 1] = c[1];
            out[(g + 8) * TT + nt * 8 + 2 * t4] = c[2];
            out[(g + 8) * TT + nt * 8 + 2 * t4 + 1] = c[3];
        }
        __syncthreads();
        // Phase 2: online softmax, one warp per head, lane = token; probabilities split for phase 3.
        for (int h = warp; h < HG; h += S::THREADS / 32) {
            float raw = 0.0f;
#pragma unroll
            for (int q = 0; q < KS; ++q) raw += sc[q * HG * TT + h * TT + lane];   // slices in order
            raw *= scale;
            const float s = t0 + lane < t_end ? raw : -INFINITY;
            const float m_old = m_s[h], mx = fmaxf(m_old, warp_max(s));
            const float p = expf(s - mx);
            const float sum = warp_sum(p);
            uint32_t hi, lo;
            split_tf32(p, hi, lo);
            ph[h * PP + lane] = __uint_as_float(hi);
            pl[h * PP + lane] = __uint_as_float(lo);
            __syncwarp();   // every lane has read m_s[h] before lane 0 overwrites it
            if (lane == 0) {
                const float alpha = expf(m_old - mx);
                alpha_s[h] = alpha;
                m_s[h] = mx;
                l_s[h] = l_s[h] * alpha + sum;
            }
        }
        __syncthreads();
        // Phase 3: o = alpha·o + P · tile[:, 8·NT3·warp .. +8·NT3]
        {
            const float a_lo = alpha_s[g], a_hi = alpha_s[g + 8];
#pragma unroll
            for (int j = 0; j < NT3; ++j) { o[j][0] *= a_lo; o[j][1] *= a_lo; o[j][2] *= a_hi; o[j][3] *= a_hi; }
#pragma unroll
            for (int k0 = 0; k0 < TT; k0 += 8) {
                uint32_t ah[4], al[4];
                ah[0] = __float_as_uint(ph[g * PP + k0 + t4]);           al[0] = __float_as_uint(pl[g * PP + k0 + t4]);
                ah[1] = __float_as_uint(ph[(g + 8) * PP + k0 + t4]);     al[1] = __float_as_uint(pl[(g + 8) * PP + k0 + t4]);
                ah[2] = __float_as_uint(ph[g * PP + k0 + t4 + 4]);       al[2] = __float_as_uint(pl[g * PP + k0 + t4 + 4]);
                ah[3] = __float_as_uint(ph[(g + 8) * PP + k0 + t4 + 4]); al[3] = __float_as_uint(pl[(g + 8) * PP + k0 + t4 + 4]);
#pragma unroll
                for (int j = 0; j < NT3; ++j) {
                    const int n = warp * 8 * NT3 + j * 8 + g;   // B[k][n] = tile[token k][column n]
                    uint32_t bh0, bl0, bh1, bl1;
                    split_tf32(tl[(k0 + t4) * DP + n], bh0, bl0);
                    split_tf32(tl[(k0 + t4 + 4) * DP + n], bh1, bl1);
                    mma_3xtf32(o[j], ah, al, bh0, bh1, bl0, bl1);
                }
            }
        }
        __syncthreads();   // this tile's buffer is refilled by the load issued next iteration
    }
    // Partial results: rows g and g+8, columns 8·NT3·warp + 8j + 2t (+1).
#pragma unroll
    for (int j = 0; j < NT3; ++j) {
        const int col = warp * 8 * NT3 + j * 8 + 2 * t4;
        if (g < nh)
            *reinterpret_cast<float2*>(part_o + ((int64_t(b) * sh.H + h0 + g) * sh.splits + split) * DC + col) =
                make_float2(o[j][0], o[j][1]);
        if (g + 8 < nh)
            *reinterpret_cast<float2*>(part_o + ((int64_t(b) * sh.H + h0 + g + 8) * sh.splits + split) * DC + col) =
                make_float2(o[j][2], o[j][3]);
    }
    for (int h = tid; h < nh; h += S::THREADS) {
        float* ml = part_ml + ((int64_t(b) * sh.H + h0 + h) * sh.splits + split) * 2;
        ml[0] = n_tiles > 0 ? m_s[h] : -INFINITY;
        ml[1] = l_s[h];
    }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsv3

namespace {

namespace cu = dsv3::cuda;
namespace cd = dsv3::cuda::detail;
using cu::bench::time_ms;

constexpr int kVersions = 4;
const char* const kNames[kVersions + 1] = {"", "plain FP32", "register-blocked FP32", "tensor cores, 16 warps",
                                           "tensor cores, 8 warps"};

struct Shape { int B, T, H, dc, dr; };

// Whether version v handles the shape (v1: every shape).
bool handles(int v, const Shape& s) {
    const bool small = s.dc == 128 && s.dr == 32 && s.H % 8 == 0, wide = s.dc == 512 && s.dr == 64 && s.H % 16 == 0;
    return v == 1 || (v == 2 && (small || wide)) || (v >= 3 && wide);
}
// Runs version v (which handles s) on device pointers.
void run_version(int v, const Shape& s, float* o, const float* ql, const float* qr, const float* ckv, const float* kr,
                 float scale) {
    const int B = s.B, T = s.T, H = s.H, dc = s.dc, dr = s.dr;
    cd::check_decode_args("dev_mla_decode", o, ql, qr, ckv, kr, T, dc, dr);
    if (v == 1) {
        cd::launch_decode_plain(o, ql, qr, ckv, kr, B, T, H, dc, dr, scale);
    } else if (v == 2 && dc == 128) {
        cd::launch_decode_fixed<cd::Decode2<8, 128, 32, 2, 1>>(cd::mla_decode_v2_kernel<8, 128, 32, 2, 1>, o, ql, qr,
                                                               ckv, kr, B, T, H, dc, dr, scale);
    } else if (v == 2) {
        cd::launch_decode_fixed<cd::Decode2<16, 512, 64, 4, 2>>(cd::mla_decode_v2_kernel<16, 512, 64, 4, 2>, o, ql, qr,
                                                                ckv, kr, B, T, H, dc, dr, scale);
    } else if (v == 3) {
        cd::launch_decode_fixed<cd::Decode3>(cd::mla_decode_v3_kernel, o, ql, qr, ckv, kr, B, T, H, dc, dr, scale);
    } else {
        cd::launch_decode_fixed<cd::Decode4<8>>(cd::mla_decode_v4_kernel<8>, o, ql, qr, ckv, kr, B, T, H, dc, dr, scale);
    }
}

// Host inputs of one shape (uniform in [-1, 1), as bench_cuda) and their device copies.
struct Inputs {
    std::vector<float> ql, qr, ckv, kr;
    cu::DeviceBuffer<float> d_ql, d_qr, d_ckv, d_kr;
    Inputs(const Shape& s, uint64_t seed) {
        const size_t nq = size_t(s.B) * s.H, ncache = size_t(s.B) * s.T;
        ql = cu::bench::host_random_floats(nq * s.dc, seed + 1, -1, 1);
        qr = cu::bench::host_random_floats(nq * s.dr, seed + 2, -1, 1);
        ckv = cu::bench::host_random_floats(ncache * s.dc, seed + 3, -1, 1);
        kr = cu::bench::host_random_floats(ncache * s.dr, seed + 4, -1, 1);
        d_ql.upload(ql);
        d_qr.upload(qr);
        d_ckv.upload(ckv);
        d_kr.upload(kr);
    }
};

// The CPU reference of the sequences `seqs`: [seqs.size(), H, dc].
std::vector<float> cpu_reference(const Shape& s, const Inputs& in, const std::vector<int>& seqs, float scale) {
    const size_t per_q = size_t(s.H) * s.dc, per_r = size_t(s.H) * s.dr;
    std::vector<float> o(seqs.size() * per_q);
    for (size_t i = 0; i < seqs.size(); ++i) {
        const size_t b = size_t(seqs[i]);
        dsv3::mla_attend_latent(o.data() + i * per_q, in.ql.data() + b * per_q, in.qr.data() + b * per_r,
                                in.ckv.data() + b * s.T * s.dc, in.kr.data() + b * s.T * s.dr, 1, s.T - 1, s.H, s.dc,
                                s.dr, scale);
    }
    return o;
}

// Accumulated comparison: ‖gpu − cpu‖ / ‖cpu‖ over everything compared, and the largest |gpu − cpu|.
constexpr double kBound = 1e-4;
struct Check {
    double num = 0, den = 0, max_abs = 0;
    bool finite = true;
    void add(const float* gpu, const float* cpu, size_t n) {
        for (size_t i = 0; i < n; ++i) {
            if (!std::isfinite(gpu[i])) { finite = false; continue; }
            const double d = double(gpu[i]) - double(cpu[i]);
            num += d * d;
            den += double(cpu[i]) * cpu[i];
            max_abs = std::max(max_abs, std::fabs(d));
        }
    }
    double rel() const { return !finite ? INFINITY : den > 0 ? std::sqrt(num / den) : std::sqrt(num); }
    bool pass() const { return rel() <= kBound; }
    std::string text() const {
        char buf[96];
        std::snprintf(buf, sizeof buf, "%s rel %.1e, max %.1e", pass() ? "PASS" : "FAIL", rel(), max_abs);
        return buf;
    }
};

// Runs version v on the inputs and adds the comparison of the sequences `seqs` to c.
void check_version(Check& c, int v, const Shape& s, const Inputs& in, const std::vector<int>& seqs,
                   const std::vector<float>& ref, float scale) {
    cu::DeviceBuffer<float> o(size_t(s.B) * s.H * s.dc);
    o.fill_bytes(0xFF);   // NaN: an output the kernel does not write fails the check
    run_version(v, s, o.data(), in.d_ql.data(), in.d_qr.data(), in.d_ckv.data(), in.d_kr.data(), scale);
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> got = o.download();
    const size_t per = size_t(s.H) * s.dc;
    for (size_t i = 0; i < seqs.size(); ++i) c.add(got.data() + size_t(seqs[i]) * per, ref.data() + i * per, per);
}

}  // namespace

int main(int argc, char** argv) {
    try {
        int only = 0;   // 0: every version
        if (argc > 1) {
            only = std::atoi(argv[1]);
            if (only < 1 || only > kVersions) {
                std::fprintf(stderr, "usage: %s [N]   N = 1..%d runs that version only (default: all)\n", argv[0],
                             kVersions);
                return 2;
            }
        }
        auto selected = [&](int v) { return only == 0 || only == v; };
        cu::bench::print_device("dev_mla_decode");
        const double copy_gbs = cu::bench::copy_bandwidth_gbs();
        std::printf("device copy (cudaMemcpy D2D, 1 GiB, read + write): %.1f GB/s; check bound: relative error %.0e\n",
                    copy_gbs, kBound);

        // Ragged shapes, every sequence checked (T not a multiple of the tiles, a single token, few heads, many heads
        // over few tokens). scale 1/sqrt(dc): scores large enough to make the softmax peaked.
        const std::vector<Shape> ragged = {{3, 100, 8, 128, 32}, {2, 1000, 16, 512, 64}, {1, 50, 128, 512, 64},
                                           {4, 1, 4, 32, 8},     {1, 5000, 2, 64, 16}};
        std::vector<Check> ragged_check(kVersions + 1);
        std::vector<int> ragged_count(kVersions + 1, 0);
        for (size_t i = 0; i < ragged.size(); ++i) {
            const Shape& s = ragged[i];
            const float scale = 1.0f / std::sqrt(float(s.dc));
            const Inputs in(s, 100 + 10 * i);
            std::vector<int> seqs;
            for (int b = 0; b < s.B; ++b) seqs.push_back(b);
            const std::vector<float> ref = cpu_reference(s, in, seqs, scale);
            for (int v = 1; v <= kVersions; ++v)
                if (selected(v) && handles(v, s)) {
                    check_version(ragged_check[size_t(v)], v, s, in, seqs, ref, scale);
                    ++ragged_count[size_t(v)];
                }
        }
        bool all_pass = true;
        std::printf("\nragged shapes (B, T, H, dc, dr = 3,100,8,128,32  2,1000,16,512,64  1,50,128,512,64  4,1,4,32,8  "
                    "1,5000,2,64,16), every sequence:\n");
        for (int v = 1; v <= kVersions; ++v)
            if (selected(v)) {
                std::printf("  v%d %-24s %d shapes  %s\n", v, kNames[v], ragged_count[size_t(v)],
                            ragged_check[size_t(v)].text().c_str());
                all_pass &= ragged_check[size_t(v)].pass();
            }

        // The benchmark shapes (bench_cuda's): checked on three sequences (first, middle, last), timed on all.
        struct Case { const char* name; Shape s; };
        const std::vector<Case> cases = {
            {"small preset (H 8, dc 128, dr 32)", {128, 4096, 8, 128, 32}},
            {"V2-Lite (H 16, dc 512, dr 64)", {32, 4096, 16, 512, 64}},
            {"V2-Lite long (H 16, T 32768)", {4, 32768, 16, 512, 64}},
            {"V3 (H 128, dc 512, dr 64)", {32, 4096, 128, 512, 64}},
        };
        std::printf("\n%-34s %3s %5s  %-27s %-28s %9s %8s %7s\n", "shape", "B", "T", "version", "check (3 sequences)",
                    "time ms", "GB/s", "of copy");
        for (size_t ci = 0; ci < cases.size(); ++ci) {
            const Shape& s = cases[ci].s;
            const float scale = 1.0f / std::sqrt(192.0f);   // 1/sqrt(qk_nope + qk_rope) of V3, as bench_cuda
            const Inputs in(s, 11 + 10 * ci);
            std::vector<int> seqs = {0, s.B / 2, s.B - 1};
            seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
            const std::vector<float> ref = cpu_reference(s, in, seqs, scale);
            cu::DeviceBuffer<float> o(size_t(s.B) * s.H * s.dc);
            const double bytes = 4.0 * (double(s.B) * s.T * (s.dc + s.dr) + double(s.B) * s.H * (2 * s.dc + s.dr));
            for (int v = 1; v <= kVersions; ++v) {
                if (!selected(v)) continue;
                char ver[48];
                std::snprintf(ver, sizeof ver, "v%d %s", v, kNames[v]);
                if (!handles(v, s)) {
                    std::printf("%-34s %3d %5d  %-27s %-28s\n", cases[ci].name, s.B, s.T, ver, "n/a for this shape");
                    continue;
                }
                Check c;
                check_version(c, v, s, in, seqs, ref, scale);
                all_pass &= c.pass();
                const double ms = time_ms([&] {
                    run_version(v, s, o.data(), in.d_ql.data(), in.d_qr.data(), in.d_ckv.data(), in.d_kr.data(), scale);
                }, 3, 20);
                const double gbs = bytes / (ms * 1e-3) / 1e9;
                std::printf("%-34s %3d %5d  %-27s %-28s %9.3f %8.1f %6.1f%%\n", cases[ci].name, s.B, s.T, ver,
                            c.text().c_str(), ms, gbs, 100.0 * gbs / copy_gbs);
            }
        }
        std::printf("\n%s\n", all_pass ? "all checks passed" : "SOME CHECKS FAILED");
        return all_pass ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dev_mla_decode: %s\n", e.what());
        return 1;
    }
}
