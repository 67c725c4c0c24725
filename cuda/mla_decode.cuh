// cuda/mla_decode.cuh — absorbed MLA decoding over the latent KV cache (DeepSeek-V3 §2.1.1; DeepSeek-V2 §2.1.3).
// The batched decoding kernel for the bandwidth benchmark: the model's own decoding (header section 7) runs
// mla_attend_latent of cuda/backend.cuh. Included by bench_cuda, test_cuda and dev_mla_decode after kernels.cuh.
//
// At inference MLA caches per token only the normalised latent c_kv [kv_lora_rank] and the shared RoPE key k_rope
// [qk_rope_head_dim]. Absorbing W^UK into the query and W^UV into the output projection turns every head's attention
// into attention over the latents themselves:
//   q_latent[h] = W^UK_hᵀ q_nope[h]                         [H, dc]    (computed by the caller)
//   score_t[h]  = scale · (q_latent[h]·c_kv[t] + q_rope[h]·k_rope[t])
//   o_latent[h] = Σ_t softmax_t(score[h])_t · c_kv[t]        [H, dc]    (W^UV_h then gives the head's output)
// All heads read the same cache rows, so a kernel that reads each row once for all heads moves
// T·(dc + dr)·4 bytes per sequence: decoding is a stream over the cache, and its speed is a fraction of the memory
// bandwidth. That is the figure bench_cuda reports (achieved GB/s over the device's copy bandwidth).
//
// Shapes (one new token per sequence, B sequences, all with T cached tokens, float32):
//   q_latent [B, H, dc], q_rope [B, H, dr], c_kv [B, T, dc], k_rope [B, T, dr]  →  o_latent [B, H, dc]
//
// Kernels (split-T "flash decoding"): the T tokens of a sequence are cut into splits, one CTA per (head group, split,
// sequence), so that even a few sequences fill the GPU (one full wave, sized from the kernel's occupancy). A CTA
// streams its tokens in tiles through shared memory (cp.async, two buffers: the next tile loads while this one is
// used) and keeps the online-softmax state (running max m, running sum l, unnormalised o) of its heads. A second
// kernel merges the splits of each (sequence, head) in split order: deterministic. mla_decode_absorbed picks, by shape:
//   dc 128, dr 32, H a multiple of 8     register-blocked FP32, 8 heads per CTA           (dev version 2)
//   dc 512, dr 64, H a multiple of 16    tensor cores, mma.sync 3xTF32, 16 heads, 16 warps (dev version 3)
//   any other shape                      the plain kernel: one thread per score / output element (dev version 1)
// Every version of these kernels (with the variants nothing here launches: version 2 with 16 heads per CTA, version 4
// = version 3 with 8 warps), its check against the header's CPU absorbed decoding (header section 7) and its measured
// bandwidth are in cuda/dev_mla_decode.cu (build/dev_mla_decode N). The work per cached float is 4·H FLOPs (scores
// and output), so with many heads decoding stops being a pure stream.
#pragma once

namespace dsv3 {
namespace cuda {

namespace detail {
constexpr int kDecodeTile = 16, kDecodeThreads = 256;

struct DecodeShape {
    int B, T, H, dc, dr, hg, n_hgroups, splits, tokens_per_split;
    __host__ __device__ int D() const { return dc + dr; }
    __host__ __device__ int DP() const { return dc + dr + 4; }   // padded row: 16-byte aligned, rows 4 banks apart
    size_t smem_bytes() const {
        return sizeof(float) * (size_t(hg) * D() + size_t(hg) * dc + 2 * size_t(kDecodeTile) * DP() +
                                size_t(hg) * kDecodeTile + 3 * size_t(hg));
    }
};

__global__ void __launch_bounds__(kDecodeThreads)
    mla_decode_split_kernel(float* part_o, float* part_ml, const float* __restrict__ q_latent,
                            const float* __restrict__ q_rope, const float* __restrict__ c_kv,
                            const float* __restrict__ k_rope, DecodeShape sh, float scale) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    const int split = blockIdx.x, hgroup = blockIdx.y, b = blockIdx.z;
    const int D = sh.D(), DP = sh.DP(), dc = sh.dc, dr = sh.dr, HG = sh.hg, TT = kDecodeTile;
    const int h0 = hgroup * HG, nh = min(HG, sh.H - h0);
    float* qs = smem;                      // [HG, D]   q_latent ; q_rope of this CTA's heads
    float* os = qs + HG * D;               // [HG, dc]  unnormalised output
    float* tile = os + HG * dc;            // [2, TT, DP] cache rows c_kv ; k_rope
    float* sc = tile + 2 * TT * DP;        // [HG, TT]  scores, then probabilities
    float* m_s = sc + HG * TT;             // [HG] running max
    float* l_s = m_s + HG;                 // [HG] running sum
    float* alpha_s = l_s + HG;             // [HG] rescale of this tile

    const int t_begin = split * sh.tokens_per_split, t_end = min(sh.T, t_begin + sh.tokens_per_split);
    for (int i = threadIdx.x; i < HG * D; i += blockDim.x) {
        const int h = i / D, c = i % D, gh = h0 + h;
        float v = 0.0f;
        if (h < nh) v = c < dc ? q_latent[(int64_t(b) * sh.H + gh) * dc + c] : q_rope[(int64_t(b) * sh.H + gh) * dr + c - dc];
        qs[i] = v;
    }
    for (int i = threadIdx.x; i < HG * dc; i += blockDim.x) os[i] = 0.0f;
    for (int h = threadIdx.x; h < HG; h += blockDim.x) { m_s[h] = -INFINITY; l_s[h] = 0.0f; }

    const int D4 = D / 4, dc4 = dc / 4;
    auto load_tile = [&](int buf, int t0) {
        float* dst = tile + buf * TT * DP;
        for (int i = threadIdx.x; i < TT * D4; i += blockDim.x) {
            const int r = i / D4, c = (i % D4) * 4, t = t0 + r;
            const bool ok = t < t_end;
            const float* src = c < dc ? c_kv + (int64_t(b) * sh.T + (ok ? t : 0)) * dc + c
                                      : k_rope + (int64_t(b) * sh.T + (ok ? t : 0)) * dr + (c - dc);
            cp_async_16(dst + r * DP + c, src, ok ? 16 : 0);
        }
        cp_async_commit();
    };
    const int n_tiles = (t_end - t_begin + TT - 1) / TT;
    if (n_tiles > 0) load_tile(0, t_begin);
    // Threads per score: enough that all threads work even when HG·TT < 256 (partial dots reduced by shuffles).
    const int pairs = HG * TT;
    int G = kDecodeThreads / pairs;
    G = G < 1 ? 1 : (G > 32 ? 32 : G);
    for (int it = 0; it < n_tiles; ++it) {
        const int t0 = t_begin + it * TT;
        if (it + 1 < n_tiles) { load_tile((it + 1) & 1, t0 + TT); cp_async_wait<1>(); }
        else cp_async_wait<0>();
        __syncthreads();
        const float* tl = tile + (it & 1) * TT * DP;
        // Phase 1: scores s[h, t] = scale · q[h]·row[t]   (float4 reads; -inf past the end)
        for (int base = threadIdx.x / G; base < pairs; base += kDecodeThreads / G) {
            const int h = base / TT, t = base % TT, part = threadIdx.x % G;
            const float4* q4 = reinterpret_cast<const float4*>(qs + h * D);
            const float4* r4 = reinterpret_cast<const float4*>(tl + t * DP);
            float dot = 0.0f;
            for (int c = part; c < D4; c += G) {
                const float4 a = q4[c], x = r4[c];
                dot += a.x * x.x + a.y * x.y + a.z * x.z + a.w * x.w;
            }
            for (int o = G / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            if (part == 0) sc[h * TT + t] = t0 + t < t_end ? dot * scale : -INFINITY;
        }
        __syncthreads();
        // Phase 2: online softmax per head: new max, rescale factor, probabilities, running sum.
        for (int h = threadIdx.x; h < HG; h += blockDim.x) {
            float mx = m_s[h];
            for (int t = 0; t < TT; ++t) mx = fmaxf(mx, sc[h * TT + t]);
            const float alpha = expf(m_s[h] - mx);   // 0 on the first tile (m = -inf)
            float sum = 0.0f;
            for (int t = 0; t < TT; ++t) { const float p = expf(sc[h * TT + t] - mx); sc[h * TT + t] = p; sum += p; }
            m_s[h] = mx;
            l_s[h] = l_s[h] * alpha + sum;
            alpha_s[h] = alpha;
        }
        __syncthreads();
        // Phase 3: o[h] = alpha·o[h] + Σ_t p[h, t] · c_kv[t]   (float4 columns)
        for (int i = threadIdx.x; i < HG * dc4; i += blockDim.x) {
            const int h = i / dc4, c = i % dc4;
            float4 o = reinterpret_cast<float4*>(os + h * dc)[c];
            const float a = alpha_s[h];
            o.x *= a; o.y *= a; o.z *= a; o.w *= a;
#pragma unroll 4
            for (int t = 0; t < TT; ++t) {
                const float p = sc[h * TT + t];
                const float4 x = reinterpret_cast<const float4*>(tl + t * DP)[c];
                o.x += p * x.x; o.y += p * x.y; o.z += p * x.z; o.w += p * x.w;
            }
            reinterpret_cast<float4*>(os + h * dc)[c] = o;
        }
        __syncthreads();   // the buffer of this tile is overwritten by the load issued next iteration
    }
    // Partial results of this split: o [B, n_hgroups·HG, splits, dc] and (m, l).
    for (int i = threadIdx.x; i < nh * dc; i += blockDim.x) {
        const int h = i / dc, c = i % dc;
        part_o[((int64_t(b) * sh.H + h0 + h) * sh.splits + split) * dc + c] = os[h * dc + c];
    }
    for (int h = threadIdx.x; h < nh; h += blockDim.x) {
        float* ml = part_ml + ((int64_t(b) * sh.H + h0 + h) * sh.splits + split) * 2;
        ml[0] = n_tiles > 0 ? m_s[h] : -INFINITY;
        ml[1] = l_s[h];
    }
}
// Merge the splits of one (sequence, head): o = Σ_s e^{m_s − M} o_s / Σ_s e^{m_s − M} l_s, s in order.
__global__ void mla_decode_combine_kernel(float* o_latent, const float* part_o, const float* part_ml, int splits,
                                          int dc) {
    const int64_t bh = blockIdx.x;   // b·H + h
    const float* ml = part_ml + bh * splits * 2;
    float M = -INFINITY;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, ml[2 * s]);
    float L = 0.0f;
    for (int s = 0; s < splits; ++s) L += ml[2 * s] == -INFINITY ? 0.0f : expf(ml[2 * s] - M) * ml[2 * s + 1];
    const float inv = 1.0f / L;
    for (int c = threadIdx.x; c < dc; c += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < splits; ++s)
            if (ml[2 * s] != -INFINITY) o += expf(ml[2 * s] - M) * part_o[(bh * splits + s) * dc + c];
        o_latent[bh * dc + c] = o * inv;
    }
}

// ---- version 2: register-blocked, for the shapes that matter (small preset: 8 heads, dc 128, dr 32; V2/V3: 16 heads
// per CTA, dc 512, dr 64). Version 1 above reads shared memory once per multiply-add; here each value read from
// shared memory feeds several: scores are computed in 4-head × 4-token blocks (8 reads for 64 FMAs), and each thread
// keeps HB heads × CB float4 columns of o in registers (per token: CB tile reads and one read of HB probabilities for
// 4·HB·CB FMAs). Tiles of 32 tokens; the softmax runs one warp per head, one token per lane.
constexpr int kDecodeTile2 = 32;
template <int HG, int DC, int DR, int HB, int CB>
struct Decode2 {
    static constexpr int D = DC + DR, DP = D + 4, D4 = D / 4;
    static constexpr int COLS = DC / (4 * CB);                 // column owners per head block
    static constexpr int THREADS = (HG / HB) * COLS;          // one thread per (head block, column group)
    static constexpr int TT = kDecodeTile2, HEADS = HG;       // HEADS: heads per CTA (launch_decode_fixed)
    static constexpr int BLOCKS = (HG / 4) * (TT / 4);        // 4×4 score blocks
    static constexpr int G = THREADS / BLOCKS;                 // threads per score block (slices of D)
    static_assert(HG % 4 == 0 && HG % HB == 0 && DC % (4 * CB) == 0 && D % 4 == 0, "shape");
    static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0 && THREADS % 32 == 0 && THREADS <= 1024, "thread layout");
    static constexpr size_t smem_floats = size_t(HG) * D + 2 * size_t(TT) * DP + 2 * size_t(HG) * TT + 3 * HG;
    static constexpr size_t smem_bytes = smem_floats * sizeof(float);
};

template <int HG, int DC, int DR, int HB, int CB>
__global__ void __launch_bounds__(Decode2<HG, DC, DR, HB, CB>::THREADS)
    mla_decode_v2_kernel(float* part_o, float* part_ml, const float* __restrict__ q_latent,
                         const float* __restrict__ q_rope, const float* __restrict__ c_kv,
                         const float* __restrict__ k_rope, DecodeShape sh, float scale) {
    using S = Decode2<HG, DC, DR, HB, CB>;
    constexpr int D = S::D, DP = S::DP, D4 = S::D4, TT = S::TT, G = S::G;
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4);   // [HG, D]
    float* tile = qs + HG * D;                     // [2, TT, DP]
    float* sc = tile + 2 * TT * DP;                // [HG, TT] scores
    float* pt = sc + HG * TT;                      // [TT, HG] probabilities, token-major for phase 3
    float* m_s = pt + HG * TT;                     // [HG]
    float* l_s = m_s + HG;                         // [HG]
    float* alpha_s = l_s + HG;                     // [HG]
    const int hgroup = blockIdx.x, split = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const int h0 = hgroup * HG, nh = min(HG, sh.H - h0);
    const int t_begin = split * sh.tokens_per_split, t_end = min(sh.T, t_begin + sh.tokens_per_split);

    for (int i = tid; i < HG * D; i += S::THREADS) {
        const int h = i / D, c = i % D, gh = h0 + h;
        float v = 0.0f;
        if (h < nh) v = c < DC ? q_latent[(int64_t(b) * sh.H + gh) * DC + c] : q_rope[(int64_t(b) * sh.H + gh) * DR + c - DC];
        qs[i] = v;
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

    // Phase 3 ownership: heads hq·HB .. +HB, float4 columns cq + j·COLS.
    const int hq = tid / S::COLS, cq = tid % S::COLS;
    float4 o[HB][CB];
#pragma unroll
    for (int h = 0; h < HB; ++h)
#pragma unroll
        for (int j = 0; j < CB; ++j) o[h][j] = make_float4(0.f, 0.f, 0.f, 0.f);
    // Phase 1 ownership: score block (hb, tb) of 4 heads × 4 tokens, slice `part` of the float4 columns.
    const int part = tid % G, blk = tid / G, hb = blk / (TT / 4), tb = blk % (TT / 4);
    const int warp = tid / 32, lane = tid % 32;

    const int n_tiles = (t_end - t_begin + TT - 1) / TT;
    if (n_tiles > 0) load_tile(0, t_begin);
    for (int it = 0; it < n_tiles; ++it) {
        const int t0 = t_begin + it * TT;
        if (it + 1 < n_tiles) { load_tile((it + 1) & 1, t0 + TT); cp_async_wait<1>(); }
        else cp_async_wait<0>();
        __syncthreads();
        const float* tl = tile + (it & 1) * TT * DP;
        // Phase 1: a 4×4 block of scores per G threads.
        {
            float acc[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
            for (int c = part; c < D4; c += G) {
                float4 q[4], x[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) q[i] = reinterpret_cast<const float4*>(qs + (hb * 4 + i) * D)[c];
#pragma unroll
                for (int j = 0; j < 4; ++j) x[j] = reinterpret_cast<const float4*>(tl + (tb * 4 + j) * DP)[c];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        acc[i][j] += q[i].x * x[j].x + q[i].y * x[j].y + q[i].z * x[j].z + q[i].w * x[j].w;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float v = acc[i][j];
                    for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                    acc[i][j] = v;
                }
            if (part == 0)
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int t = tb * 4 + j;
                        sc[(hb * 4 + i) * TT + t] = t0 + t < t_end ? acc[i][j] * scale : -INFINITY;
                    }
        }
        __syncthreads();
        // Phase 2: online softmax, one warp per head, lane = token.
        for (int h = warp; h < HG; h += S::THREADS / 32) {
            const float s = sc[h * TT + lane];
            const float m_old = m_s[h], mx = fmaxf(m_old, warp_max(s));
            const float p = expf(s - mx);
            const float sum = warp_sum(p);
            pt[lane * HG + h] = p;
            __syncwarp();   // every lane has read m_s[h] before lane 0 overwrites it
            if (lane == 0) {
                const float alpha = expf(m_old - mx);   // 0 on the first tile
                alpha_s[h] = alpha;
                m_s[h] = mx;
                l_s[h] = l_s[h] * alpha + sum;
            }
        }
        __syncthreads();
        // Phase 3: o = alpha·o + Σ_t p_t · c_kv[t] on registers.
        {
            float a[HB];
#pragma unroll
            for (int h = 0; h < HB; ++h) a[h] = alpha_s[hq * HB + h];
#pragma unroll
            for (int h = 0; h < HB; ++h)
#pragma unroll
                for (int j = 0; j < CB; ++j) { o[h][j].x *= a[h]; o[h][j].y *= a[h]; o[h][j].z *= a[h]; o[h][j].w *= a[h]; }
#pragma unroll 4
            for (int t = 0; t < TT; ++t) {
                float p[HB];
#pragma unroll
                for (int h = 0; h < HB; ++h) p[h] = pt[t * HG + hq * HB + h];
#pragma unroll
                for (int j = 0; j < CB; ++j) {
                    const float4 x = reinterpret_cast<const float4*>(tl + t * DP)[cq + j * S::COLS];
#pragma unroll
                    for (int h = 0; h < HB; ++h) {
                        o[h][j].x += p[h] * x.x; o[h][j].y += p[h] * x.y; o[h][j].z += p[h] * x.z; o[h][j].w += p[h] * x.w;
                    }
                }
            }
        }
        __syncthreads();   // this tile's buffer is refilled by the load issued next iteration
    }
#pragma unroll
    for (int h = 0; h < HB; ++h) {
        const int hh = hq * HB + h;
        if (hh >= nh) continue;
#pragma unroll
        for (int j = 0; j < CB; ++j)
            reinterpret_cast<float4*>(part_o + ((int64_t(b) * sh.H + h0 + hh) * sh.splits + split) * DC)[cq + j * S::COLS] = o[h][j];
    }
    for (int h = tid; h < nh; h += S::THREADS) {
        float* ml = part_ml + ((int64_t(b) * sh.H + h0 + h) * sh.splits + split) * 2;
        ml[0] = n_tiles > 0 ? m_s[h] : -INFINITY;
        ml[1] = l_s[h];
    }
}

// ---- version 3: tensor cores, for 16 heads per CTA with dc 512, dr 64 (V2-Lite, V3). With 16 heads the two
// products of a tile, S = Q[16, 576] · Tileᵀ and O += P[16, 32] · Tile[32, 512], cost 8 multiply-adds per cached byte:
// more than the CUDA cores sustain at full memory speed. Both are small matrix products, so they go to the tensor
// cores with mma.sync m16n8k8 in TF32 (M = 16 = the heads). TF32 keeps 10 mantissa bits, too few for attention
// scores (their error is exponentiated), so each FP32 operand is split x = hi + lo (hi = TF32(x), lo = TF32(x − hi))
// and a·b ≈ hi_a·hi_b + hi_a·lo_b + lo_a·hi_b: three MMAs, about FP32 accuracy ("3xTF32"), still far above the rate
// the cache streams in.
//   Phase 1: warp w computes the 16 × 8 scores of tokens 8·(w mod 4) .. +8 over a quarter of the 576 columns (w / 4);
//            the KS = 4 slices are added in phase 2, in a fixed order.
//   Phase 3: warp w owns output columns 32·w .. +32 (NT3 = 4 MMA tiles, 16 accumulator registers per thread).
// Fragment layouts (PTX ISA, "mma.m16n8k8" for .tf32), g = lane / 4, t = lane % 4:
//   A (16×8, row):  a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   B (8×8, col):   b0 = B[t][g], b1 = B[t+4][g]
//   C (16×8):       c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
struct Decode3 {
    static constexpr int WARPS = 16;
    static constexpr int HG = 16, DC = 512, DR = 64, D = DC + DR, DP = D + 4, TT = 32, THREADS = 32 * WARPS, PP = TT + 4;
    static constexpr int HEADS = HG;                // heads per CTA (launch_decode_fixed)
    static constexpr int KS = WARPS / 4;            // phase 1: the 4 token tiles × KS slices of the 576 columns
    static constexpr int NT3 = DC / 8 / WARPS;      // phase 3: 8-column MMA tiles per warp
    static_assert(WARPS % 4 == 0 && (D / KS) % 16 == 0 && NT3 >= 1, "layout");
    static constexpr size_t smem_floats = size_t(HG) * DP + 2 * size_t(TT) * DP + size_t(KS) * HG * TT +
                                          2 * size_t(HG) * PP + 3 * HG;
    static constexpr size_t smem_bytes = smem_floats * sizeof(float);
};
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(hi) : "f"(x));
    const float rest = x - __uint_as_float(hi);
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(lo) : "f"(rest));
}
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// c += a·b in 3xTF32: the small cross terms first, then the large one.
__device__ __forceinline__ void mma_3xtf32(float (&c)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                           uint32_t bh0, uint32_t bh1, uint32_t bl0, uint32_t bl1) {
    mma_tf32(c, al, bh0, bh1);
    mma_tf32(c, ah, bl0, bl1);
    mma_tf32(c, ah, bh0, bh1);
}

__global__ void __launch_bounds__(Decode3::THREADS, 1)
    mla_decode_v3_kernel(float* part_o, float* part_ml, const float* __restrict__ q_latent,
                         const float* __restrict__ q_rope, const float* __restrict__ c_kv,
                         const float* __restrict__ k_rope, DecodeShape sh, float scale) {
    using S = Decode3;
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
        // Phase 1: scores of tokens 8·nt .. +8, columns [kh·D/KS, (kh+1)·D/KS) (144 wide with 16 warps).
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

// ---- launching: checks, the split plan, scratch for the partial results, the merge ----------------------------------
inline void check_decode_args(const char* who, const float* o_latent, const float* q_latent, const float* q_rope,
                              const float* c_kv, const float* k_rope, int T, int dc, int dr) {
    if (T < 1 || dc < 4 || dr < 0 || dc % 4 || dr % 4)
        fail(who, ": need T >= 1 and dc, dr multiples of 4 (dc >= 4); found T=", T, " dc=", dc, " dr=", dr);
    for (const void* p : {static_cast<const void*>(o_latent), static_cast<const void*>(q_latent),
                          static_cast<const void*>(c_kv), static_cast<const void*>(k_rope), static_cast<const void*>(q_rope)})
        if (reinterpret_cast<uintptr_t>(p) % 16) fail(who, ": pointers must be 16-byte aligned");
}
// Splits of T for a kernel of `threads` threads, `smem` bytes of dynamic shared memory and tiles of `tile` tokens
// (sh.hg already set): one full wave of CTAs (as many as fit on the GPU at once, from the kernel's occupancy), each
// split a whole number of tiles: fewer splits leave SMs idle, more add a partial second wave.
inline void plan_decode_splits(DecodeShape& sh, const void* kernel, int threads, size_t smem, int tile) {
    int dev = 0, sms = 0, per_sm = 1;
    DSV3_CUDA_CHECK(cudaGetDevice(&dev));
    DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    DSV3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    per_sm = std::max(per_sm, 1);
    sh.n_hgroups = (sh.H + sh.hg - 1) / sh.hg;
    const int64_t ctas_per_split = int64_t(sh.B) * sh.n_hgroups;
    int64_t want = std::max<int64_t>(1, int64_t(per_sm) * sms / ctas_per_split);
    const int tiles = (sh.T + tile - 1) / tile;
    want = std::min<int64_t>(want, tiles);
    sh.tokens_per_split = int((tiles + want - 1) / want) * tile;
    sh.splits = (sh.T + sh.tokens_per_split - 1) / sh.tokens_per_split;
    if (sh.B > 65535 || sh.n_hgroups > 65535 || sh.splits > 65535) fail("cuda::mla_decode_absorbed: B must be <= 65535");
}
// Partial results of the splits (scratch memory): o [B, H, splits, dc] and (m, l) [B, H, splits, 2].
struct DecodePartials { float* o; float* ml; };
inline DecodePartials decode_partials(const DecodeShape& sh) {
    const size_t bhs = size_t(sh.B) * sh.H * sh.splits;
    return {static_cast<float*>(scratch(Slot::decode_partial, sizeof(float) * bhs * sh.dc)),
            static_cast<float*>(scratch(Slot::decode_stats, sizeof(float) * bhs * 2))};
}
inline void decode_combine(float* o_latent, const DecodePartials& part, const DecodeShape& sh) {
    mla_decode_combine_kernel<<<unsigned(int64_t(sh.B) * sh.H), 128>>>(o_latent, part.o, part.ml, sh.splits, sh.dc);
    DSV3_CUDA_CHECK_LAUNCH();
}
// The plain kernel, any shape: heads per CTA = all of them if they fit in shared memory (the cache is then read once),
// else fewer.
inline void launch_decode_plain(float* o_latent, const float* q_latent, const float* q_rope, const float* c_kv,
                                const float* k_rope, int B, int T, int H, int dc, int dr, float scale) {
    int dev = 0, smem_max = 0;
    DSV3_CUDA_CHECK(cudaGetDevice(&dev));
    DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    DecodeShape sh{B, T, H, dc, dr, H, 1, 1, T};
    const size_t budget = std::min<size_t>(size_t(smem_max), 160 * 1024);
    while (sh.hg > 1 && sh.smem_bytes() > budget) sh.hg = (sh.hg + 1) / 2;
    if (sh.smem_bytes() > size_t(smem_max)) fail("cuda::mla_decode_absorbed: dc=", dc, " dr=", dr, " too large");
    const size_t smem = sh.smem_bytes();
    plan_decode_splits(sh, reinterpret_cast<const void*>(mla_decode_split_kernel), kDecodeThreads, smem, kDecodeTile);
    const DecodePartials part = decode_partials(sh);
    mla_decode_split_kernel<<<dim3(sh.splits, sh.n_hgroups, B), kDecodeThreads, smem>>>(part.o, part.ml, q_latent,
                                                                                       q_rope, c_kv, k_rope, sh, scale);
    DSV3_CUDA_CHECK_LAUNCH();
    decode_combine(o_latent, part, sh);
}
// A kernel with a fixed shape S (S::HEADS heads per CTA, S::THREADS threads, S::smem_bytes, tiles of S::TT
// tokens): the register-blocked and tensor-core kernels. Head groups fastest in the grid: the CTAs that read the same cache rows
// run together (L2 hits for the repeats).
template <class S, class Kernel>
inline void launch_decode_fixed(Kernel kernel, float* o_latent, const float* q_latent, const float* q_rope,
                                const float* c_kv, const float* k_rope, int B, int T, int H, int dc, int dr,
                                float scale) {
    DecodeShape sh{B, T, H, dc, dr, S::HEADS, 1, 1, T};
    plan_decode_splits(sh, reinterpret_cast<const void*>(kernel), S::THREADS, S::smem_bytes, S::TT);
    const DecodePartials part = decode_partials(sh);
    kernel<<<dim3(sh.n_hgroups, sh.splits, B), S::THREADS, S::smem_bytes>>>(part.o, part.ml, q_latent, q_rope, c_kv,
                                                                           k_rope, sh, scale);
    DSV3_CUDA_CHECK_LAUNCH();
    decode_combine(o_latent, part, sh);
}
}  // namespace detail

// o_latent[b, h] = Σ_t softmax_t(scale·(q_latent[b,h]·c_kv[b,t] + q_rope[b,h]·k_rope[b,t])) · c_kv[b,t]
// q_latent [B, H, dc], q_rope [B, H, dr], c_kv [B, T, dc], k_rope [B, T, dr], o_latent [B, H, dc]; T >= 1;
// dc and dr multiples of 4 and the pointers 16-byte aligned (float4 loads). The kernel is chosen by shape (see the
// top of this file): register-blocked for dc 128 / dr 32 with H % 8 == 0, tensor cores for dc 512 / dr 64 with
// H % 16 == 0, the plain kernel otherwise.
inline void mla_decode_absorbed(float* o_latent, const float* q_latent, const float* q_rope, const float* c_kv,
                                const float* k_rope, int B, int T, int H, int dc, int dr, float scale) {
    using namespace detail;
    if (B <= 0 || H <= 0) return;
    check_decode_args("cuda::mla_decode_absorbed", o_latent, q_latent, q_rope, c_kv, k_rope, T, dc, dr);
    if (dc == 128 && dr == 32 && H % 8 == 0)
        launch_decode_fixed<Decode2<8, 128, 32, 2, 1>>(mla_decode_v2_kernel<8, 128, 32, 2, 1>, o_latent, q_latent,
                                                       q_rope, c_kv, k_rope, B, T, H, dc, dr, scale);
    else if (dc == 512 && dr == 64 && H % 16 == 0)
        launch_decode_fixed<Decode3>(mla_decode_v3_kernel, o_latent, q_latent, q_rope, c_kv, k_rope, B, T, H, dc, dr,
                                     scale);
    else
        launch_decode_plain(o_latent, q_latent, q_rope, c_kv, k_rope, B, T, H, dc, dr, scale);
}

}  // namespace cuda
}  // namespace dsv3
