// cuda/fp8.cuh — FP8 on the GPU (DeepSeek-V3 report §3.3): 1×128 / 128×128 quantization and the block-scaled FP8 GEMM
// on Hopper's FP8 tensor cores with promotion to FP32 every 128 along K. Included by cuda/kernels.cuh.
//
// The CPU header simulates the H100 tensor core's accumulator bit for bit (header section 8; the limited accumulator
// is DeepSeek-V3 report arXiv 2412.19437 §3.3.2, "Increasing Accumulation Precision", and "Insights into DeepSeek-V3",
// arXiv 2505.09343): within a promotion chunk of 128 values of K, each block of 32 products (one FP8 WGMMA
// instruction, K = 32) is aligned to the largest input exponent and truncated, and the running sum keeps 14
// significant bits; at the end of every chunk the partial sum c is promoted: acc32 = fmaf(c, (float)(sa·sb), acc32).
// This file runs the real thing:
//
//   fp8_gemm (fast path, sm_90a): per 128-chunk, 4 × wgmma.m64nNk32.e4m3 chained in the tensor core's accumulator
//     (the first with scale-d = 0: c starts at 0), then on the CUDA cores acc32 = fmaf(c, sa·sb, acc32). Same
//     promotion interval, same order of additions, same scale multiplication: the same bits as dsv3::fp8_gemm.
//   fp8_gemm_emulated (plain path, any GPU): the header's integer model of the accumulator, one thread per output.
//     The reference the fast path is checked against on the GPU, and what a plain -arch=sm_90 build runs.
// Only the kernels the model launches live here. The other versions of the fast kernel (5 stages, ping-pong
// accumulators), with their measured figures, are in cuda/dev_fp8_gemm.cu (build/dev_fp8_gemm N), which also times
// and checks these.
#pragma once

#include <cuda.h>           // CUtensorMap (the TMA's tensor maps)
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled
#include <cuda_fp8.h>

namespace dsv3 {
namespace cuda {

// =====================================================================================================================
// Quantization (scales are dequantization scales: x ≈ decode(q) · scale, scale = amax / 448, V3 §3.3.2)
// =====================================================================================================================
namespace detail {
// E4M3 encode: round to nearest even, saturating (the hardware's cvt.rn.satfinite.e4m3x2.f32), NaN kept with sign,
// as dsv3::fp8_e4m3_encode.
__device__ inline uint8_t e4m3_encode(float x) {
    if (isnan(x)) return uint8_t((__float_as_uint(x) >> 24) & 0x80u) | 0x7Fu;
    return uint8_t(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}
// dsv3::fp8_scale_for_amax on the device: amax/448 (IEEE division), at least FLT_MIN, optionally rounded UP to a
// power of two (a normal float's next power of two: exponent + 1, mantissa cleared).
__device__ inline float scale_for_amax(float amax, bool pow2_scale) {
    if (!(amax > 0.0f)) return 1.0f;
    float s = __fdiv_rn(amax, 448.0f);
    if (s < FLT_MIN) s = FLT_MIN;
    if (pow2_scale) {
        const uint32_t u = __float_as_uint(s);
        if (u & 0x7FFFFFu) s = __uint_as_float(((u >> 23) + 1u) << 23);
    }
    return s;
}
__device__ inline float amax_finite(float acc, float v) {
    const float a = fabsf(v);
    return (a <= FLT_MAX && a > acc) ? a : acc;   // NaN and inf are left out
}
// One warp per 1×128 tile (row r, tile t): lane l holds the tile's columns 4l .. 4l + 3 in registers (one read of x),
// max across the warp (exact, order free), then encodes x / scale. vec: whole 16-byte-aligned tiles (cols % 128 == 0),
// so every lane loads 16 bytes and stores its 4 codes at once.
__global__ void quantize_tiles_1x128_kernel(const float* x, int rows, int cols, uint8_t* q, float* scales,
                                            bool pow2_scale, bool vec) {
    const int kt = (cols + 127) / 128;
    const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= int64_t(rows) * kt) return;
    const int64_t r = warp / kt;
    const int t = int(warp % kt), c = t * 128 + 4 * lane, n = max(0, min(4, cols - c));
    const int64_t at = r * cols + c;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (vec) v = *reinterpret_cast<const float4*>(x + at);
    else if (n > 0) {
        v.x = x[at];
        if (n > 1) v.y = x[at + 1];
        if (n > 2) v.z = x[at + 2];
        if (n > 3) v.w = x[at + 3];
    }
    const float amax = amax_finite(amax_finite(amax_finite(amax_finite(0.0f, v.x), v.y), v.z), v.w);
    const float s = scale_for_amax(warp_max(amax), pow2_scale);
    if (lane == 0) scales[r * kt + t] = s;
    const uint32_t code = uint32_t(e4m3_encode(__fdiv_rn(v.x, s))) | uint32_t(e4m3_encode(__fdiv_rn(v.y, s))) << 8 |
                          uint32_t(e4m3_encode(__fdiv_rn(v.z, s))) << 16 |
                          uint32_t(e4m3_encode(__fdiv_rn(v.w, s))) << 24;
    if (vec) *reinterpret_cast<uint32_t*>(q + at) = code;
    else
        for (int i = 0; i < n; ++i) q[at + i] = uint8_t(code >> (8 * i));
}
// The 128×128 blocks of weight matrices [rows, cols], one CTA (256 threads) per block: matrix e = experts[y] (or y)
// at W + e·w_stride, its codes at q + e·rows·cols and its scales [ceil(rows/128), ceil(cols/128)] at
// qs + e·blocks. The codes are staged in shared memory, so the transpose that Dgrad needs (qt: [cols, rows], qts:
// [ceil(cols/128), ceil(rows/128)]; the square blocks serve both directions) is written in the same pass, coalesced.
// Either output may be null.
__global__ void __launch_bounds__(256) quantize_weight_blocks_kernel(const float* W, int64_t w_stride,
                                                                     const int* experts, int rows, int cols,
                                                                     uint8_t* q, float* qs, uint8_t* qt, float* qts,
                                                                     bool pow2_scale) {
    __shared__ float red[32];
    __shared__ uint8_t tile[128][129];
    const int e = experts ? experts[blockIdx.y] : int(blockIdx.y);
    const int rt = (rows + 127) / 128, ct = (cols + 127) / 128, br = blockIdx.x / ct, bc = blockIdx.x % ct;
    const int r0 = br * 128, c0 = bc * 128, h = min(rows - r0, 128), w = min(cols - c0, 128);
    const float* src = W + e * w_stride;
    float v[64];   // this thread's elements: rows i/128 of i = threadIdx.x + 256 j, column i mod 128
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 64; ++j) {
        const int r = (threadIdx.x >> 7) + 2 * j, c = threadIdx.x & 127;
        v[j] = r < h && c < w ? src[int64_t(r0 + r) * cols + c0 + c] : 0.0f;
        amax = amax_finite(amax, v[j]);
    }
    amax = block_max(amax, red);
    const float s = scale_for_amax(amax, pow2_scale);
    const int64_t m = int64_t(e) * rows * cols, blocks = int64_t(rt) * ct;
    if (threadIdx.x == 0 && qs) qs[e * blocks + int64_t(br) * ct + bc] = s;
    if (threadIdx.x == 0 && qts) qts[e * blocks + int64_t(bc) * rt + br] = s;
#pragma unroll
    for (int j = 0; j < 64; ++j) {
        const int r = (threadIdx.x >> 7) + 2 * j, c = threadIdx.x & 127;
        tile[r][c] = e4m3_encode(__fdiv_rn(v[j], s));
        if (q && r < h && c < w) q[m + int64_t(r0 + r) * cols + c0 + c] = tile[r][c];
    }
    if (!qt) return;
    __syncthreads();
    for (int i = threadIdx.x; i < 128 * 128; i += 256) {   // row c of the transpose: consecutive threads, consecutive r
        const int c = i >> 7, r = i & 127;
        if (r < h && c < w) qt[m + int64_t(c0 + c) * rows + r0 + r] = tile[r][c];
    }
}
// Wgrad's 128×1 tiles along the tokens, transposed (the token dimension becomes each row's K). One CTA per 128-token
// tile and 32 columns: the tile is read row by row (coalesced) into shared memory, then each warp quantizes 4
// columns, lane l holding tokens l, l + 32, l + 64, l + 96 (no bank conflicts), and writes 32 consecutive codes at a
// time. The tiles come from a list, so one launch serves a dense layer (one group of T rows) and every expert's rows
// at once (one group each, its tiles starting at its first row).
struct TokenTile {
    int row0;    // the tile's first row of x
    int rows;    // rows of it that exist (the rest are zeros)
    int first;   // the group's first tile: its codes start at qt + cols·128·first, its scales at scales + cols·first
    int count;   // the group's tiles: its scales are [cols, count]
    int ld;      // the group's row length in qt: its rows (dense) or 128·count (padded with zero codes: 16-byte rows)
};
__global__ void __launch_bounds__(256) quantize_token_tiles_kernel(const float* x, int cols, const TokenTile* tiles,
                                                                   uint8_t* qt, float* scales, bool pow2_scale) {
    __shared__ float t[128][33];
    const TokenTile u = tiles[blockIdx.x];
    const int c0 = blockIdx.y * 32, tile = int(blockIdx.x) - u.first;
    for (int i = threadIdx.x; i < 128 * 32; i += 256) {
        const int r = i >> 5, c = i & 31;
        t[r][c] = r < u.rows && c0 + c < cols ? x[int64_t(u.row0 + r) * cols + c0 + c] : 0.0f;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int c = (threadIdx.x >> 5) * 4; c < (threadIdx.x >> 5) * 4 + 4 && c0 + c < cols; ++c) {
        float amax = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) amax = amax_finite(amax, t[lane + 32 * k][c]);
        const float s = scale_for_amax(warp_max(amax), pow2_scale);
        const int64_t col = c0 + c;
        if (lane == 0) scales[int64_t(cols) * u.first + col * u.count + tile] = s;
        uint8_t* row = qt + int64_t(cols) * 128 * u.first + col * u.ld;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int at = 128 * tile + lane + 32 * k;   // position along the group's tokens
            if (at < u.ld) row[at] = e4m3_encode(__fdiv_rn(t[lane + 32 * k][c], s));
        }
    }
}
// The token tiles of groups offsets[g] .. offsets[g + 1] (host), uploaded; padded: every group's rows in qt are
// 128·count long (else one group, ld = its rows). Returns the device list and the total count of tiles.
inline std::pair<const TokenTile*, int> token_tiles(const int64_t* offsets, int groups, bool padded) {
    std::vector<TokenTile> list;
    for (int g = 0; g < groups; ++g) {
        const int R = int(offsets[g + 1] - offsets[g]), count = (R + 127) / 128, first = int(list.size());
        for (int t = 0; t < count; ++t)
            list.push_back({int(offsets[g]) + 128 * t, min(128, R - 128 * t), first, count, padded ? 128 * count : R});
    }
    if (list.empty()) return {nullptr, 0};
    auto* d = static_cast<TokenTile*>(scratch(Slot::group_units, sizeof(TokenTile) * list.size()));
    upload_async(d, list.data(), sizeof(TokenTile) * list.size());
    return {d, int(list.size())};
}
inline void quantize_token_tiles(const float* x, int cols, const std::pair<const TokenTile*, int>& tiles, uint8_t* qt,
                                 float* scales, bool pow2_scale = false) {
    if (tiles.second == 0 || cols == 0) return;
    quantize_token_tiles_kernel<<<dim3(unsigned(tiles.second), unsigned((cols + 31) / 32)), 256>>>(
        x, cols, tiles.first, qt, scales, pow2_scale);
    DSV3_CUDA_CHECK_LAUNCH();
}
// Weight blocks of `count` matrices (experts: a device list of their indices, or null for 0 .. count − 1).
inline void quantize_weight_blocks(const float* W, int64_t w_stride, const int* experts, int count, int rows, int cols,
                                   uint8_t* q, float* qs, uint8_t* qt, float* qts, bool pow2_scale = false) {
    const int64_t blocks = int64_t(fp8_tiles(rows)) * fp8_tiles(cols);
    if (blocks == 0 || count == 0) return;
    quantize_weight_blocks_kernel<<<dim3(unsigned(blocks), unsigned(count)), 256>>>(W, w_stride, experts, rows, cols,
                                                                                    q, qs, qt, qts, pow2_scale);
    DSV3_CUDA_CHECK_LAUNCH();
}
}  // namespace detail

// x: [rows, cols] → q: [rows, cols] E4M3, scales: [rows, ceil(cols/128)] (dsv3::quantize_tiles_1x128, bit for bit)
inline void quantize_tiles_1x128(const float* x, int rows, int cols, uint8_t* q, float* scales, bool pow2_scale = false) {
    if (rows < 0 || cols < 0) fail("cuda::quantize_tiles_1x128: negative shape [", rows, ", ", cols, "]");
    const int64_t warps = int64_t(rows) * fp8_tiles(cols);
    if (warps == 0) return;
    const bool vec =
        cols % 128 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 4 == 0;
    detail::quantize_tiles_1x128_kernel<<<grid_for(warps * 32, 256), 256>>>(x, rows, cols, q, scales, pow2_scale,
                                                                            vec);
    DSV3_CUDA_CHECK_LAUNCH();
}
// w: [rows, cols] → q: [rows, cols], scales: [ceil(rows/128), ceil(cols/128)] (dsv3::quantize_blocks_128x128)
inline void quantize_blocks_128x128(const float* w, int rows, int cols, uint8_t* q, float* scales,
                                    bool pow2_scale = false) {
    if (rows < 0 || cols < 0) fail("cuda::quantize_blocks_128x128: negative shape [", rows, ", ", cols, "]");
    detail::quantize_weight_blocks(w, 0, nullptr, 1, rows, cols, q, scales, nullptr, nullptr, pow2_scale);
}
// x: [rows, cols] → qt: [cols, rows], scales: [cols, ceil(rows/128)] (dsv3::quantize_tiles_128x1_transposed)
inline void quantize_tiles_128x1_transposed(const float* x, int rows, int cols, uint8_t* qt, float* scales,
                                            bool pow2_scale = false) {
    if (rows < 0 || cols < 0) fail("cuda::quantize_tiles_128x1_transposed: negative shape [", rows, ", ", cols, "]");
    const int64_t offsets[2] = {0, rows};
    detail::quantize_token_tiles(x, cols, detail::token_tiles(offsets, 1, false), qt, scales, pow2_scale);
}

// =====================================================================================================================
// fp8_gemm, plain version: the header's accumulator model on the CUDA cores (any GPU), one thread per output
// =====================================================================================================================
namespace detail {
constexpr int kZeroExponent = -1000;   // alignment exponent of a zero input: never wins the block's max
// An E4M3 code's value (exact in float) and alignment exponent (subnormals at -6), as the header's decode_operand.
__device__ inline float e4m3_value(uint8_t q) {
    const uint32_t code = q & 0x7Fu, ef = code >> 3, m = code & 7u;
    const float mag = ef == 0 ? float(m) * 0x1p-9f : float(8u + m) * __uint_as_float((ef - 10u + 127u) << 23);
    return (q & 0x80u) ? -mag : mag;
}
__device__ inline int e4m3_exponent(uint8_t q) {
    const int code = q & 0x7F, ef = code >> 3;
    return code == 0 ? kZeroExponent : (ef == 0 ? 1 : ef) - 7;
}
__device__ inline float pow2f(int n) { return __uint_as_float(uint32_t(n + 127) << 23); }

// One block of up to 32 products into the accumulator (c, ec): the header's tc_block, integer form.
__device__ inline void tc_block(float& c, int& ec, const uint8_t* a, const uint8_t* b, int n) {
    int E = ec;
    for (int k = 0; k < n; ++k) {
        const int ea = e4m3_exponent(a[k]), eb = e4m3_exponent(b[k]);
        if (ea != kZeroExponent && eb != kZeroExponent) E = max(E, ea + eb);
    }
    E = max(E, -100);
    const float u = pow2f(13 - E);
    int32_t s = int32_t(c * u);                                       // truncation toward zero
    for (int k = 0; k < n; ++k) s += int32_t(e4m3_value(a[k]) * e4m3_value(b[k]) * u);
    const int32_t neg = s >> 31;
    uint32_t mag = uint32_t((s ^ neg) - neg);
    const int len_bits = 32 - __clz(int(mag | 1u));
    const int drop = max(len_bits - 14, 0);
    mag = (mag >> drop) << drop;                                      // keep 14 significant bits, toward zero
    const int32_t kept = (int32_t(mag) ^ neg) - neg;
    c = float(kept) * pow2f(E - 13);
    ec = kept != 0 ? E - 13 + len_bits - 1 : kZeroExponent;
}
// sb_rows: rows of B per scale (128: 128×128 blocks; 1: one scale per row, Wgrad's 128×1 tiles); accumulate: C += A·Bᵀ.
__global__ void fp8_gemm_emulated_kernel(const uint8_t* A, const float* sa, const uint8_t* B, const float* sb, float* C,
                                         int M, int N, int K, int sb_rows, int accumulate) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (j >= N || i >= M) return;
    const int kt = (K + 127) / 128;
    const uint8_t* a = A + int64_t(i) * K;
    const uint8_t* b = B + int64_t(j) * K;
    bool finite = true;
    for (int k = 0; k < K; ++k) finite &= (a[k] & 0x7F) != 0x7F && (b[k] & 0x7F) != 0x7F;
    float acc32 = 0.0f;
    for (int k0 = 0; k0 < K; k0 += 128) {
        float c = 0.0f;
        int ec = kZeroExponent;
        for (int b0 = k0; b0 < min(K, k0 + 128); b0 += 32) tc_block(c, ec, a + b0, b + b0, min(32, min(K, k0 + 128) - b0));
        const float s_a = sa ? sa[int64_t(i) * kt + k0 / 128] : 1.0f;
        const float s_b = sb ? sb[int64_t(j / sb_rows) * kt + k0 / 128] : 1.0f;
        acc32 = fmaf(c, __fmul_rn(s_a, s_b), acc32);                  // promotion: the header's order exactly
    }
    const float v = finite ? acc32 : NAN;
    C[int64_t(i) * N + j] = accumulate ? C[int64_t(i) * N + j] + v : v;
}
}  // namespace detail

// =====================================================================================================================
// fp8_gemm, fast version: wgmma on Hopper's FP8 tensor cores (sm_90a)
// =====================================================================================================================
// Tiling. A CTA computes a 128 × BN tile of C with two warpgroups (256 threads), each owning 64 rows: wgmma's M is 64
// per warpgroup. K advances in tiles of 128 = one promotion chunk = 4 wgmma instructions of K = 32. The A tile
// [128, 128] and the B tile [BN, 128] (both K-major: rows of 128 bytes) are copied into shared memory by cp.async in a
// ring of kGemmStages buffers, so the copies of the next tiles overlap the tensor-core work on this one.
//
// Shared-memory layout: the 128-byte swizzle that wgmma reads without bank conflicts. Row r of a tile occupies bytes
// [128 r, 128 r + 128); its 16-byte chunk c is stored at chunk position c XOR (r mod 8). The descriptor of an operand
// gives the start address, the stride between 8-row groups (1024 bytes) and the swizzle mode; stepping K by 32 inside
// the 128-byte rows is a +32-byte change of the start address (the hardware applies the XOR to the final address,
// which is why every tile starts on a 1024-byte boundary).
//
// Per chunk, per warpgroup:   c = Σ_{4 blocks of 32} (tensor core, c kept in registers between the instructions)
//                             acc32 = fmaf(c, sa[row]·sb[col block], acc32)     (CUDA cores: V3's promotion)
// so each thread holds two register tiles: c (BN/2 floats) and acc32 (BN/2 floats).
//
// Accumulator fragment of wgmma m64nN (f32): thread (warp w of the warpgroup, lane l), register r holds row
// 16 w + l/4 + 8·((r/2) mod 2) and column 8·(r/4) + 2·(l mod 4) + (r mod 2) of the warpgroup's 64 × BN tile.
namespace detail {

#ifdef DSV3_HAS_WGMMA
// D[64 x 64] (+)= A[64 x 32] · B[64 x 32]ᵀ, E4M3 inputs from shared memory, FP32 registers.
__device__ __forceinline__ void wgmma_m64n64k32_e4m3(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// D[64 x 128] (+)= A[64 x 32] · B[128 x 32]ᵀ, E4M3 inputs from shared memory, FP32 registers.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// D[64 x 192] (+)= A[64 x 32] · B[192 x 32]ᵀ, E4M3 inputs from shared memory, FP32 registers.
__device__ __forceinline__ void wgmma_m64n192k32_e4m3(float (&d)[96], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
        "}, %96, %97, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <int BN>
__device__ __forceinline__ void wgmma_k32(float (&d)[BN / 2], uint64_t da, uint64_t db, int scale_d) {
    if constexpr (BN == 64) wgmma_m64n64k32_e4m3(d, da, db, scale_d);
    else if constexpr (BN == 128) wgmma_m64n128k32_e4m3(d, da, db, scale_d);
    else wgmma_m64n192k32_e4m3(d, da, db, scale_d);
}
#endif


constexpr int kGemmBM = 128, kGemmBK = 128, kGemmThreads = 256, kGemmGroupM = 8, kGemmStages = 4;
template <int BN, int STAGES = kGemmStages>
constexpr int gemm_smem_bytes() { return STAGES * (kGemmBM + BN) * kGemmBK + 1024; }

// Copies K-tile kt of A rows [m0, m0+128) and B rows [n0, n0+BN) into one stage, swizzled. VEC16: K % 16 == 0 and
// 16-byte aligned rows, so every 16-byte chunk is either wholly inside K (cp.async) or wholly outside (zero fill).
// Otherwise bytes are loaded one by one (slow, correct for any K).
template <int BN, bool VEC16>
__device__ __forceinline__ void gemm_load_tile(uint8_t* sA, uint8_t* sB, const uint8_t* A, const uint8_t* B, int M,
                                               int N, int K, int m0, int n0, int kt) {
    const int k0 = kt * kGemmBK;
    if constexpr (VEC16) {
        // Thread t always copies chunk c = t mod 8 of rows t/8 + 32 i: the swizzled chunk position is the same for
        // all its rows (32 i does not change r mod 8), and the unrolled loop knows which rows belong to A.
        const int c = threadIdx.x & 7, rb = threadIdx.x >> 3, swz = (c ^ (rb & 7)) << 4;
        const int k = k0 + c * 16;
        const bool k_ok = k < K;
#pragma unroll
        for (int i = 0; i < (kGemmBM + BN) / 32; ++i) {
            const bool is_a = i < kGemmBM / 32;
            const int r = is_a ? rb + 32 * i : rb + 32 * i - kGemmBM;
            const int g = (is_a ? m0 : n0) + r;
            const bool ok = k_ok && g < (is_a ? M : N);
            const uint8_t* src = (is_a ? A : B) + (ok ? int64_t(g) * K + k : 0);
            cp_async_16((is_a ? sA : sB) + r * 128 + swz, src, ok ? 16 : 0);
        }
    } else {
    for (int id = threadIdx.x; id < (kGemmBM + BN) * 8; id += kGemmThreads) {
        const int row = id >> 3, c = id & 7;
        const bool is_a = row < kGemmBM;
        const int r = is_a ? row : row - kGemmBM;
        const int g = is_a ? m0 + r : n0 + r;
        const bool row_ok = g < (is_a ? M : N);
        const uint8_t* src_row = (is_a ? A : B) + int64_t(row_ok ? g : 0) * K;
        uint8_t* dst = (is_a ? sA : sB) + r * 128 + ((c ^ (r & 7)) << 4);
        const int k = k0 + c * 16;
        uint32_t w[4] = {0, 0, 0, 0};
        if (row_ok)
            for (int e = 0; e < 16; ++e)
                if (k + e < K) w[e >> 2] |= uint32_t(src_row[k + e]) << (8 * (e & 3));
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    }
}


// One product of a launch, C (+)= A·Bᵀ: A [M, K] and B [N, K] codes, sa [M, ceil(K/128)], sb per sb_rows rows of B
// (the launch's), C [M, N]. A launch runs one product (`one`) or `count` of them from a device list (the routed
// experts', fp8_grouped_matmul_*), whose CTA tiles are numbered product after product from first_tile.
struct Fp8Gemm {
    const uint8_t* A; const float* sa; const uint8_t* B; const float* sb; float* C;
    int M, N, K, first_tile;
};
struct Fp8Gemms { Fp8Gemm one; const Fp8Gemm* list; int count; };
// The product CTA blockIdx.x works on: the last whose first_tile is at or before it (binary search of the list).
__device__ __forceinline__ Fp8Gemm gemm_of_cta(const Fp8Gemms& g) {
    if (!g.list) return g.one;
    int lo = 0, hi = g.count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (g.list[mid].first_tile <= int(blockIdx.x)) lo = mid;
        else hi = mid - 1;
    }
    return g.list[lo];
}

// The epilogue of both fast kernels: C (+)= acc for this thread's two rows and R/2 column pairs of the tile at n0,
// two adjacent columns per access where possible. With accumulate, all of the thread's old values are loaded first
// (into `old`, a free register tile), so the loads wait on memory once, not once each.
template <int R>
__device__ __forceinline__ void store_tile(float* __restrict__ C, const float (&acc)[R], float (&old)[R], int M, int N,
                                           int row0, int row1, int n0, int lane, int accumulate) {
    const bool pairs = N % 2 == 0;
    auto at = [&](int r) {
        return C + int64_t((r / 2) % 2 ? row1 : row0) * N + n0 + 8 * (r / 4) + 2 * (lane % 4);
    };
    auto inside = [&](int r, int i) {   // element i (0, 1) of pair r lies in C
        return ((r / 2) % 2 ? row1 : row0) < M && n0 + 8 * (r / 4) + 2 * (lane % 4) + i < N;
    };
    if (accumulate) {
#pragma unroll
        for (int r = 0; r < R; r += 2) {
            if (pairs && inside(r, 1)) {
                const float2 o = *reinterpret_cast<const float2*>(at(r));
                old[r] = o.x, old[r + 1] = o.y;
            } else {
                old[r] = inside(r, 0) ? at(r)[0] : 0.0f;
                old[r + 1] = inside(r, 1) ? at(r)[1] : 0.0f;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r += 2) {
        const float v0 = accumulate ? old[r] + acc[r] : acc[r], v1 = accumulate ? old[r + 1] + acc[r + 1] : acc[r + 1];
        if (pairs && inside(r, 1)) {
            *reinterpret_cast<float2*>(at(r)) = make_float2(v0, v1);
        } else {
            if (inside(r, 0)) at(r)[0] = v0;
            if (inside(r, 1)) at(r)[1] = v1;
        }
    }
}

// The fast kernel: BN = 64, 128 or 192 (the tile width, fp8_gemm_auto_tile), VEC16 = 16-byte loads
// (gemm_load_tile). The 64-wide tile is for products of few tiles (a dense layer's Wgrad: K is the tokens, the output
// only a weight): twice the CTAs, two of them on an SM (half the registers each), so one's epilogue and pipeline
// start overlap the other's tensor-core work.
template <int BN, bool VEC16>
__global__ void __launch_bounds__(kGemmThreads, BN == 64 ? 2 : 1)
    fp8_gemm_wgmma_kernel(const Fp8Gemms gemms, int sb_rows, int accumulate) {
#ifdef DSV3_HAS_WGMMA
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    constexpr int kStageBytes = (kGemmBM + BN) * kGemmBK;
    constexpr int R = BN / 2;                       // accumulator registers per thread
    constexpr int STAGES = kGemmStages;
    constexpr int AHEAD = STAGES - 1;                // tiles in flight ahead of the one computed
    const Fp8Gemm p = gemm_of_cta(gemms);
    const uint8_t* __restrict__ A = p.A;
    const uint8_t* __restrict__ B = p.B;
    const float* __restrict__ sa = p.sa;
    const float* __restrict__ sb = p.sb;
    float* __restrict__ C = p.C;
    const int M = p.M, N = p.N, K = p.K;

    // Tile of this CTA, in groups of kGemmGroupM row tiles so that neighbouring CTAs share B tiles in L2.
    const int tiles_m = (M + kGemmBM - 1) / kGemmBM, tiles_n = (N + BN - 1) / BN;
    const int id = int(blockIdx.x) - p.first_tile, per_group = kGemmGroupM * tiles_n, group = id / per_group;
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
    float c0[R];                                    // the tensor core's accumulator of one chunk

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
    // Wgrad (sb_rows 1): one scale of B per output column. This thread's columns n0 + 8 j + 2 (lane mod 4) + i
    // (j < BN/8, i < 2) are read into registers before the tensor cores start, so the loads overlap their work. Only
    // the 64- and 128-wide tiles have the registers to spare (launch_fp8_gemm_wgmma never gives Wgrad the 192-wide).
    const bool column_scales = BN <= 128 && sb && sb_rows == 1;
    constexpr int kColumns = BN <= 128 ? R / 2 : 1;
    float sbc[kColumns];
    auto load_column_scales = [&](int kt) {
#pragma unroll
        for (int j = 0; j < kColumns; ++j) {
            const int col = n0 + 8 * (j / 2) + 2 * (lane % 4) + (j % 2);
            sbc[j] = col < N ? sb[int64_t(col) * KT + kt] : 0.0f;
        }
    };
    // Promotion (V3 §3.3.2): acc32 = fmaf(c, sa·sb, acc32).
    auto promote = [&](const float (&c)[R], const Scales& s) {
        if (column_scales) {   // register r holds column 8 (r/4) + 2 (lane mod 4) + (r mod 2): sbc[2 (r/4) + r mod 2]
#pragma unroll
            for (int r = 0; r < R; ++r)
                acc[r] = fmaf(c[r], __fmul_rn((r / 2) % 2 ? s.sa1 : s.sa0, sbc[2 * (r / 4) + r % 2]), acc[r]);
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
    for (int kt = 0; kt < KT; ++kt) {
        wait_and_prefetch(kt);
        const Scales s = scales_of(kt);   // read while the tensor cores work
        if (column_scales) load_column_scales(kt);
        issue(c0, kt);
        wgmma_wait<0>();
        fence_operands(c0);
        promote(c0, s);
    }
    cp_async_wait<0>();
    store_tile<R>(C, acc, c0, M, N, row0, row1, n0, lane, accumulate);
#else
    __trap();   // built without sm_90a: the host never launches this (see fp8_gemm_fast_available)
#endif
}

// ---- the warp-specialized kernel: what the model runs on 16-byte rows (the form of DeepGEMM's and CUTLASS's Hopper
// GEMMs). Three warpgroups: one thread of warpgroup 0 feeds a ring of kWsStages shared-memory stages by TMA (the
// tensor memory accelerator copies a whole 128 × 128-byte box of A and of B per instruction, already in the 128-byte
// swizzle, zeros outside the matrix); warpgroups 1 and 2 only compute, 64 rows of the 128 × 128 tile each. In place
// of one __syncthreads a K-tile, each stage has two mbarriers: `full` (its bytes have landed: the TMA unit counts
// them) and `empty` (both consumers have read it: one arrival per consumer warp). So the two consumers drift apart,
// and while one promotes its chunk on the CUDA cores the other's wgmma keeps the tensor cores busy: the library
// kernel above stalls them for every promotion. The grid is persistent (one CTA an SM, tiles t, t + grid, ...), so
// the producer fetches the next tile's first stages while the consumers store this one's. setmaxnreg moves registers
// from the producer warpgroup, which needs few, to the consumers (64 accumulator and 64 chunk registers each).
// Per output the arithmetic is the kernel's above, chunk by chunk in the same order: dsv3::fp8_gemm's bits.
// H200, M = N = K = 4096 / 6144 / 8192 (build/dev_fp8_gemm, same run): 852 / 912 / 954 TFLOP/s against the kernel
// above's 648 / 681 / 703 and cuBLASLt's 995 / 1177 / 1181.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar))
                 : "memory");
}
// One arrival that also expects `bytes` of TMA writes before the phase can complete.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, int bytes) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n"
                 ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Waits until the barrier's phase of this parity has completed (the u-th use of a stage: parity u mod 2).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
// TMA: the box at (byte column x, row y) of a 2D tensor map into shared memory; its bytes complete on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_addr(bar)) : "memory");
}

constexpr int kWsStages = 6;
constexpr int kWsSmemBytes = kWsStages * (kGemmBM + 128) * kGemmBK + 1024 + 2 * kWsStages * 8;

// A product's two tensor maps (A's and B's rows), and the product tile number `tile` of a launch belongs to.
struct Fp8Maps { CUtensorMap a, b; };
struct WsTile { Fp8Gemm p; const Fp8Maps* maps; int m0, n0, KT; };
__device__ __forceinline__ WsTile ws_tile(const Fp8Gemms& g, const Fp8Maps* maps, const Fp8Maps* one, int tile) {
    WsTile t{g.one, one, 0, 0, 0};
    if (g.list) {
        int lo = 0, hi = g.count - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (g.list[mid].first_tile <= tile) lo = mid;
            else hi = mid - 1;
        }
        t.p = g.list[lo], t.maps = maps + lo;
    }
    const Fp8Gemm& p = t.p;
    const int tiles_m = (p.M + kGemmBM - 1) / kGemmBM, tiles_n = (p.N + 127) / 128;
    const int id = tile - p.first_tile, per_group = kGemmGroupM * tiles_n, group = id / per_group;
    const int first_m = group * kGemmGroupM, group_m = min(tiles_m - first_m, kGemmGroupM);
    t.m0 = (first_m + (id % per_group) % group_m) * kGemmBM;
    t.n0 = (id % per_group) / group_m * 128;
    t.KT = (p.K + kGemmBK - 1) / kGemmBK;
    return t;
}

// maps: a device array, one Fp8Maps per product of gemms.list (null for gemms.one, whose maps are `one`).
__global__ void __launch_bounds__(384, 1)
    fp8_gemm_ws_kernel(const Fp8Gemms gemms, const Fp8Maps* maps, int tiles, int sb_rows, int accumulate,
                       const __grid_constant__ Fp8Maps one) {
#ifdef DSV3_HAS_WGMMA
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    constexpr int kStageBytes = (kGemmBM + 128) * kGemmBK, R = 64;
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kWsStages * kStageBytes);
    uint64_t* empty = full + kWsStages;
    if (threadIdx.x == 0)
        for (int s = 0; s < kWsStages; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], 8);
    __syncthreads();
    auto stage_a = [&](int s) { return smem + s * kStageBytes; };
    auto stage_b = [&](int s) { return smem + s * kStageBytes + kGemmBM * kGemmBK; };

    if (threadIdx.x < 128) {   // ---- the producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x != 0) return;
        int it = 0;   // K-tiles loaded, over all of this CTA's tiles: stage it % kWsStages, its use it / kWsStages
        const Fp8Maps* fenced = nullptr;
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            const WsTile t = ws_tile(gemms, maps, &one, tile);
            if (maps && t.maps != fenced) {   // maps written to global memory (by a kernel): the TMA unit's view
                asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(&t.maps->a) : "memory");
                asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(&t.maps->b) : "memory");
                fenced = t.maps;
            }
            for (int kt = 0; kt < t.KT; ++kt, ++it) {
                const int s = it % kWsStages, u = it / kWsStages;
                if (u > 0) mbar_wait(&empty[s], (u - 1) & 1);
                mbar_expect_tx(&full[s], kStageBytes);
                tma_load_2d(stage_a(s), &t.maps->a, kt * kGemmBK, t.m0, &full[s]);
                tma_load_2d(stage_b(s), &t.maps->b, kt * kGemmBK, t.n0, &full[s]);
            }
        }
        return;
    }

    // ---- the consumers: warpgroup cw owns rows 64 cw .. 64 cw + 63 of each tile
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int ct = threadIdx.x - 128, cw = ct / 128, w = (ct % 128) / 32, lane = ct % 32;
    int it = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const WsTile t = ws_tile(gemms, maps, &one, tile);
        const float* __restrict__ sa = t.p.sa;
        const float* __restrict__ sb = t.p.sb;
        const int M = t.p.M, N = t.p.N, KT = t.KT, m0 = t.m0, n0 = t.n0;
        const int row0 = m0 + cw * 64 + w * 16 + lane / 4, row1 = row0 + 8;   // the two rows this thread holds
        const bool column_scales = sb && sb_rows == 1, block_scales = sb && sb_rows == 128;
        float acc[R], c0[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = 0.0f;
        for (int kt = 0; kt < KT; ++kt, ++it) {
            const int s = it % kWsStages, u = it / kWsStages;
            // The chunk's scales: global loads issued before the waits, so that they overlap them.
            const float sa0 = sa ? (row0 < M ? sa[int64_t(row0) * KT + kt] : 0.0f) : 1.0f;
            const float sa1 = sa ? (row1 < M ? sa[int64_t(row1) * KT + kt] : 0.0f) : 1.0f;
            const float sb0 = block_scales ? sb[int64_t(n0 / 128) * KT + kt] : 1.0f;
            // Wgrad: one scale per column; register r holds column 8 (r/4) + 2 (lane mod 4) + r mod 2.
            float sbc[R / 2];
            if (column_scales) {
#pragma unroll
                for (int j = 0; j < R / 2; ++j) {
                    const int col = n0 + 8 * (j / 2) + 2 * (lane % 4) + (j % 2);
                    sbc[j] = col < N ? sb[int64_t(col) * KT + kt] : 0.0f;
                }
            }
            mbar_wait(&full[s], u & 1);
            const uint8_t* a_tile = stage_a(s) + cw * 64 * 128;
            const uint8_t* b_tile = stage_b(s);
            fence_operands(c0);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < 4; ++j)
                wgmma_k32<128>(c0, smem_desc_sw128(a_tile + 32 * j), smem_desc_sw128(b_tile + 32 * j), j > 0 ? 1 : 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(c0);
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty[s]);   // the stage is free for the producer
            // Promotion (V3 §3.3.2): acc32 = fmaf(c, sa·sb, acc32), sa·sb rounded to float first.
            if (column_scales) {
#pragma unroll
                for (int r = 0; r < R; ++r)
                    acc[r] = fmaf(c0[r], __fmul_rn((r / 2) % 2 ? sa1 : sa0, sbc[2 * (r / 4) + r % 2]), acc[r]);
            } else {
                const float s0 = __fmul_rn(sa0, sb0), s1 = __fmul_rn(sa1, sb0);
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r] = fmaf(c0[r], (r / 2) % 2 ? s1 : s0, acc[r]);
            }
        }
        store_tile<R>(t.p.C, acc, c0, M, N, row0, row1, n0, lane, accumulate);
    }
#else
    __trap();   // built without sm_90a: the host never launches this (see fp8_gemm_fast_available)
#endif
}

// The tensor map of E4M3 rows [rows, K] (K % 16 == 0, 16-byte aligned): boxes of 128 rows × 128 bytes in the 128-byte
// swizzle, zeros outside. cuTensorMapEncodeTiled is a driver function, reached through the runtime (no -lcuda).
inline CUtensorMap tensor_map(const uint8_t* p, int rows, int K) {
    static const auto encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult q{};
        DSV3_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
        if (!fn || q != cudaDriverEntryPointSuccess) fail("cuda::fp8_gemm: the driver has no cuTensorMapEncodeTiled");
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    CUtensorMap m{};
    const cuuint64_t dims[2] = {cuuint64_t(K), cuuint64_t(rows)}, strides[1] = {cuuint64_t(K)};
    const cuuint32_t box[2] = {128, 128}, steps[2] = {1, 1};
    const CUresult r = encode(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(p), dims, strides, box, steps,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        fail("cuda::fp8_gemm: cuTensorMapEncodeTiled failed (", int(r), ") for ", rows, " rows of ", K);
    return m;
}

}  // namespace detail

// Whether the fast path runs: this binary holds sm_90a code and runs on a Hopper GPU (kernels.cuh, wgmma_available).
inline bool fp8_gemm_fast_available() { return wgmma_available(); }

namespace detail {
inline void check_fp8_gemm(const char* who, int M, int N, int K, const Fp8Accum& acc) {
    if (M < 0 || N < 0 || K < 0) fail(who, ": sizes must be non-negative, found M=", M, " N=", N, " K=", K);
    const Fp8Accum d{};
    if (acc.block != d.block || acc.frac_bits != d.frac_bits || acc.promote_every != d.promote_every || acc.exact)
        fail(who, ": the GPU runs the hardware accumulator only: Fp8Accum must be the default (block 32, frac_bits 13, ",
             "promote_every 128, exact false); found block ", acc.block, ", frac_bits ", acc.frac_bits,
             ", promote_every ", acc.promote_every, ", exact ", acc.exact);
}
template <int BN, bool VEC16>
inline void launch_wgmma(const Fp8Gemms& gemms, int64_t tiles, int sb_rows, int accumulate) {
    constexpr int smem = gemm_smem_bytes<BN>();
    static const bool attr = [] {   // more than 48 KB of dynamic shared memory must be asked for, once per kernel
        DSV3_CUDA_CHECK(cudaFuncSetAttribute(fp8_gemm_wgmma_kernel<BN, VEC16>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        return true;
    }();
    (void)attr;
    fp8_gemm_wgmma_kernel<BN, VEC16><<<unsigned(tiles), kGemmThreads, smem>>>(gemms, sb_rows, accumulate);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline int64_t gemm_tiles(const Fp8Gemm& g, int BN) {
    return int64_t((g.M + kGemmBM - 1) / kGemmBM) * ((g.N + BN - 1) / BN);
}
// 16-byte loads need K % 16 == 0 and 16-byte aligned operands.
inline bool gemm_vec16(const Fp8Gemm& g) {
    return g.K % 16 == 0 && reinterpret_cast<uintptr_t>(g.A) % 16 == 0 && reinterpret_cast<uintptr_t>(g.B) % 16 == 0;
}
// The fast kernel with tiles 128 × tile_n (64, 128 or 192). Rows that are not 16-byte chunks (K % 16 != 0, or
// unaligned pointers) take the byte-wise loads with the 128-wide tile; Wgrad (sb_rows 1), with its column scales in
// registers, takes the 128-wide tile for a 192 request.
inline void launch_fp8_gemm_wgmma(int tile_n, const uint8_t* A, const float* sa, const uint8_t* B, const float* sb,
                                  float* C, int M, int N, int K, int sb_rows, int accumulate) {
    const Fp8Gemm g{A, sa, B, sb, C, M, N, K, 0};
    const Fp8Gemms one{g, nullptr, 1};
    if (!gemm_vec16(g)) launch_wgmma<128, false>(one, gemm_tiles(g, 128), sb_rows, accumulate);
    else if (tile_n == 64) launch_wgmma<64, true>(one, gemm_tiles(g, 64), sb_rows, accumulate);
    else if (tile_n == 192 && sb_rows != 1) launch_wgmma<192, true>(one, gemm_tiles(g, 192), sb_rows, accumulate);
    else launch_wgmma<128, true>(one, gemm_tiles(g, 128), sb_rows, accumulate);
}

inline int gpu_sm_count() {   // of the current device (every GPU of a build/train_multi_gpu run is the same kind)
    static const int n = [] {
        int dev = 0, sms = 0;
        DSV3_CUDA_CHECK(cudaGetDevice(&dev));
        DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        return sms;
    }();
    return n;
}
// The warp-specialized kernel over the products of `gemms` (first_tile set, `tiles` in all). maps: the list's tensor
// maps on the device, one Fp8Maps per product (null: gemms.one's are made here and passed by value).
inline void launch_ws(const Fp8Gemms& gemms, const Fp8Maps* maps, int64_t tiles, int sb_rows, int accumulate) {
    static const bool attr = [] {   // more than 48 KB of dynamic shared memory must be asked for
        DSV3_CUDA_CHECK(cudaFuncSetAttribute(fp8_gemm_ws_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             kWsSmemBytes));
        return true;
    }();
    (void)attr;
    Fp8Maps one{};
    const Fp8Gemm& g = gemms.one;
    if (!maps) one = {tensor_map(g.A, g.M, g.K), tensor_map(g.B, g.N, g.K)};
    const int grid = int(std::min<int64_t>(tiles, gpu_sm_count()));
    fp8_gemm_ws_kernel<<<grid, 384, kWsSmemBytes>>>(gemms, maps, int(tiles), sb_rows, accumulate, one);
    DSV3_CUDA_CHECK_LAUNCH();
}
// DSV3_FP8_WS=0 in the environment keeps the model on the first kernel (for timing the two side by side).
inline bool ws_on() {
    static const bool on = !shadow::env_off("DSV3_FP8_WS");
    return on;
}
// Which kernel fp8_gemm_general runs: automatic (what the model runs: the emulation without the fast path; else, for
// fewer 128 × 128 tiles than SMs, the 64-wide tile, twice the CTAs and two an SM; else the warp-specialized kernel on
// 16-byte rows, the 128-wide tile of the first kernel on other rows), the emulation, one tile width of the first
// kernel, or the warp-specialized one (test_cuda checks each on small shapes; without the fast path they all run the
// emulation). The first kernel's 192-wide tile, faster than its 128-wide one from 6144² outputs (H100: 743 vs 716
// TFLOP/s at 8192), is slower than the warp-specialized kernel everywhere measured, so the model no longer picks it.
enum class Fp8Kernel { automatic, emulated, wgmma_64, wgmma_128, wgmma_192, ws };
// The general product of both paths: C (+)= A·Bᵀ, B's scales per sb_rows rows (128 or 1).
inline void fp8_gemm_general(const uint8_t* A, const float* sa, const uint8_t* B, const float* sb, int sb_rows, float* C,
                             int M, int N, int K, bool accumulate, Fp8Kernel kernel = Fp8Kernel::automatic) {
    if (int64_t(M) * N == 0) return;
    if (K == 0) {
        if (!accumulate) DSV3_CUDA_CHECK(cudaMemsetAsync(C, 0, sizeof(float) * size_t(M) * N));
        return;
    }
    if (kernel == Fp8Kernel::emulated || !fp8_gemm_fast_available()) {
        if (M > 65535) fail("cuda::fp8_gemm_emulated: M must be <= 65535, found ", M);
        fp8_gemm_emulated_kernel<<<dim3((N + 127) / 128, M), 128>>>(A, sa, B, sb, C, M, N, K, sb_rows, accumulate);
        DSV3_CUDA_CHECK_LAUNCH();
        return;
    }
    const Fp8Gemm g{A, sa, B, sb, C, M, N, K, 0};
    if (kernel == Fp8Kernel::automatic)
        kernel = gemm_tiles(g, 128) < gpu_sm_count() ? Fp8Kernel::wgmma_64
                 : gemm_vec16(g) && ws_on()          ? Fp8Kernel::ws
                                                     : Fp8Kernel::wgmma_128;
    if (kernel == Fp8Kernel::ws && gemm_vec16(g))
        return launch_ws({g, nullptr, 1}, nullptr, gemm_tiles(g, 128), sb_rows, accumulate);
    const int tile_n = kernel == Fp8Kernel::wgmma_192 ? 192 : kernel == Fp8Kernel::wgmma_64 ? 64 : 128;
    launch_fp8_gemm_wgmma(tile_n, A, sa, B, sb, C, M, N, K, sb_rows, accumulate);
}
}  // namespace detail

// The plain version on any GPU (slow: one thread per output). Same arguments and bits as dsv3::fp8_gemm.
inline void fp8_gemm_emulated(const uint8_t* A, const float* scale_a, const uint8_t* B, const float* scale_b, float* C,
                              int M, int N, int K, const Fp8Accum& acc = {}) {
    detail::check_fp8_gemm("cuda::fp8_gemm_emulated", M, N, K, acc);
    detail::fp8_gemm_general(A, scale_a, B, scale_b, 128, C, M, N, K, false, detail::Fp8Kernel::emulated);
}

// C[M, N] = A[M, K] · B[N, K]ᵀ, E4M3 codes, scale_a: [M, ceil(K/128)] (1×128 tiles), scale_b: [ceil(N/128),
// ceil(K/128)] (128×128 blocks), null = ones. Bit for bit dsv3::fp8_gemm with the default Fp8Accum (the only
// accumulator the hardware has). Tensor cores when fp8_gemm_fast_available(), else the emulation.
inline void fp8_gemm(const uint8_t* A, const float* scale_a, const uint8_t* B, const float* scale_b, float* C, int M,
                     int N, int K, const Fp8Accum& acc = {}) {
    detail::check_fp8_gemm("cuda::fp8_gemm", M, N, K, acc);
    detail::fp8_gemm_general(A, scale_a, B, scale_b, 128, C, M, N, K, false);
}

// =====================================================================================================================
// FP8 linear layer (V3 recipe, §3.3, Figure 6): the header's fp8_matmul_forward / fp8_matmul_backward on the GPU,
// bit for bit. Fprop: x in 1×128 tiles, W in 128×128 blocks. Dgrad: dy in 1×128 tiles along out, W's codes and
// block scales transposed (the square blocks serve both directions). Wgrad: dy and x in 128×1 tiles along the tokens
// (transposed, so the token dimension becomes each row's K). Quantized activations live in scratch memory; the
// weights' codes, from Fprop to Dgrad, in weight_codes below.
// =====================================================================================================================
namespace detail {
template <class T>
T* scratch_of(Slot slot, size_t n) { return static_cast<T*>(scratch(slot, n * sizeof(T))); }
// Every product of the list in one launch of the fast kernel (128-wide tiles; the warp-specialized kernel on 16-byte
// rows), or one emulated launch each without the fast path.
inline void fp8_gemms(std::vector<Fp8Gemm>& list, int sb_rows, bool accumulate) {
    if (list.empty()) return;
    if (!fp8_gemm_fast_available()) {
        for (const Fp8Gemm& g : list)
            fp8_gemm_general(g.A, g.sa, g.B, g.sb, sb_rows, g.C, g.M, g.N, g.K, accumulate, Fp8Kernel::emulated);
        return;
    }
    int64_t tiles = 0;
    bool vec16 = true;
    for (Fp8Gemm& g : list) {
        g.first_tile = int(tiles);
        tiles += gemm_tiles(g, 128);
        vec16 = vec16 && gemm_vec16(g);
    }
    if (tiles > INT32_MAX) fail("cuda::fp8_gemms: ", tiles, " tiles, over the grid's 2^31 - 1");
    Fp8Gemm* d = scratch_of<Fp8Gemm>(Slot::fp8_list, list.size());
    upload_async(d, list.data(), sizeof(Fp8Gemm) * list.size());
    const Fp8Gemms gemms{list[0], d, int(list.size())};
    if (!vec16) return launch_wgmma<128, false>(gemms, tiles, sb_rows, accumulate);
    if (!ws_on()) return launch_wgmma<128, true>(gemms, tiles, sb_rows, accumulate);
    std::vector<Fp8Maps> maps;   // each product's tensor maps, beside the list
    for (const Fp8Gemm& g : list) maps.push_back({tensor_map(g.A, g.M, g.K), tensor_map(g.B, g.N, g.K)});
    Fp8Maps* dm = scratch_of<Fp8Maps>(Slot::fp8_maps, maps.size());
    upload_async(dm, maps.data(), sizeof(Fp8Maps) * maps.size());
    launch_ws(gemms, dm, tiles, sb_rows, accumulate);
}
// The 128×128 block codes of `count` weight matrices W_e [rows, cols] (at W + e·w_stride) and of their transposes,
// kept from step to step in the registry of kernels.cuh (shadow::Codes). A weight only changes in the optimizer
// step, so a step's Fprop quantizes it once, writing the codes and their transpose in the same pass, and its Dgrad
// reads the transpose back: one read of the FP32 weight a step instead of two. `needed` (host) lists the matrices
// wanted now (the experts with rows); only those without valid codes are quantized. Matrix e's codes are at
// q + e·rows·cols, its scales [ceil(rows/128), ceil(cols/128)] at qs + e·blocks (qt, qts: the transpose).
// DSV3_FP8_WEIGHT_CODES=0 in the environment quantizes on every call instead (for timing).
struct WeightCodes { uint8_t* q; float* qs; uint8_t* qt; float* qts; };
inline WeightCodes weight_codes(const float* W, int64_t w_stride, int count, int rows, int cols,
                                const std::vector<int>& needed) {
    static const bool keep = !shadow::env_off("DSV3_FP8_WEIGHT_CODES");
    const int64_t n = int64_t(rows) * cols, blocks = int64_t(fp8_tiles(rows)) * fp8_tiles(cols);
    const int64_t part = (count * n + 255) / 256 * 256;   // the codes, padded: qt and qs start 256-byte aligned
    std::vector<int> todo;
    uint8_t* bytes = nullptr;
    {
        shadow::Registry& r = shadow::registry();
        std::lock_guard<std::mutex> lock(r.mu);
        shadow::Codes& c = r.codes[uintptr_t(W)];
        if (c.count != count || c.rows != rows || c.cols != cols || c.w_stride != w_stride) {   // new, or reshaped
            if (c.bytes) cudaFree(c.bytes);
            c = shadow::Codes{};
            DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&c.bytes), size_t(2 * part + 8 * count * blocks)));
            c.n = size_t(int64_t(count - 1) * w_stride + n);
            c.w_stride = w_stride, c.count = count, c.rows = rows, c.cols = cols;
            c.done.assign(size_t(count), 0);
        }
        for (int e : needed)
            if (!c.done[size_t(e)]) todo.push_back(e), c.done[size_t(e)] = keep;   // the launch below writes them
        bytes = c.bytes;
    }
    float* qs = reinterpret_cast<float*>(bytes + 2 * part);
    const WeightCodes codes{bytes, qs, bytes + part, qs + count * blocks};
    if (todo.empty()) return codes;
    int* d = scratch_of<int>(Slot::fp8_experts, todo.size());
    upload_async(d, todo.data(), sizeof(int) * todo.size());
    quantize_weight_blocks(W, w_stride, d, int(todo.size()), rows, cols, codes.q, codes.qs, codes.qt, codes.qts);
    return codes;
}
}  // namespace detail

// y[T,out] = x[T,in] · W[out,in]ᵀ in FP8 (overwrites y)
inline void fp8_matmul_forward(float* y, const float* x, const float* W, int T, int in, int out) {
    DSV3_PROFILE_KERNEL();
    using namespace detail;
    if (T < 0 || in < 0 || out < 0) fail("cuda::fp8_matmul_forward: sizes must be non-negative");
    if (int64_t(T) * out == 0) return;
    uint8_t* xq = scratch_of<uint8_t>(Slot::fp8_a, size_t(T) * in);
    float* xs = scratch_of<float>(Slot::fp8_sa, size_t(T) * fp8_tiles(in));
    quantize_tiles_1x128(x, T, in, xq, xs);
    const WeightCodes w = weight_codes(W, 0, 1, out, in, {0});
    fp8_gemm_general(xq, xs, w.q, w.qs, 128, y, T, out, in, false);
}

// dx[T,in] += dy[T,out] · W[out,in];  dW[out,in] += dy[T,out]ᵀ · x[T,in]   (FP8; either may be null)
inline void fp8_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int in,
                                int out) {
    DSV3_PROFILE_KERNEL();
    using namespace detail;
    if (T < 0 || in < 0 || out < 0) fail("cuda::fp8_matmul_backward: sizes must be non-negative");
    if (dx && int64_t(T) * in > 0) {   // Dgrad, K = out
        uint8_t* dyq = scratch_of<uint8_t>(Slot::fp8_a, size_t(T) * out);
        float* dys = scratch_of<float>(Slot::fp8_sa, size_t(T) * fp8_tiles(out));
        quantize_tiles_1x128(dy, T, out, dyq, dys);
        const WeightCodes w = weight_codes(W, 0, 1, out, in, {0});   // the transpose, from the forward
        fp8_gemm_general(dyq, dys, w.qt, w.qts, 128, dx, T, in, out, true);
    }
    if (dW && int64_t(out) * in > 0) {   // Wgrad, K = T
        uint8_t* dytq = scratch_of<uint8_t>(Slot::fp8_a, size_t(out) * T);
        uint8_t* xtq = scratch_of<uint8_t>(Slot::fp8_b, size_t(in) * T);
        float* dyts = scratch_of<float>(Slot::fp8_sa, size_t(out) * fp8_tiles(T));
        float* xts = scratch_of<float>(Slot::fp8_sb, size_t(in) * fp8_tiles(T));
        quantize_tiles_128x1_transposed(dy, T, out, dytq, dyts);
        quantize_tiles_128x1_transposed(x, T, in, xtq, xts);
        fp8_gemm_general(dytq, dyts, xtq, xts, 1, dW, out, in, T, true);
    }
}

namespace detail {
// Fprop and Dgrad of every expert with rows: y_g (+)= a_g · B_gᵀ, a [rows, K] in 1×128 tiles, B_g expert g's weight
// W_g [out, in] in 128×128 blocks (Fprop: K = in, N = out) or its transpose (Dgrad: K = out, N = in).
inline void fp8_grouped_rows(float* y, const float* a, const float* W, int64_t w_stride, const int64_t* offsets,
                             int groups, int in, int out, bool dgrad) {
    const int64_t rows = offsets[groups], wn = int64_t(out) * in, wb = int64_t(fp8_tiles(out)) * fp8_tiles(in);
    const int K = dgrad ? out : in, N = dgrad ? in : out, kt = fp8_tiles(K);
    uint8_t* aq = scratch_of<uint8_t>(Slot::fp8_a, size_t(rows) * K);
    float* as = scratch_of<float>(Slot::fp8_sa, size_t(rows) * kt);
    quantize_tiles_1x128(a, int(rows), K, aq, as);
    std::vector<int> experts;   // those with rows: only their weights are quantized
    for (int g = 0; g < groups; ++g)
        if (offsets[g + 1] > offsets[g]) experts.push_back(g);
    const WeightCodes w = weight_codes(W, w_stride, groups, out, in, experts);
    uint8_t* bq = dgrad ? w.qt : w.q;
    float* bs = dgrad ? w.qts : w.qs;
    std::vector<Fp8Gemm> list;
    for (int g = 0; g < groups; ++g) {
        const int64_t r0 = offsets[g];
        if (offsets[g + 1] > r0)
            list.push_back({aq + r0 * K, as + r0 * kt, bq + g * wn, bs + g * wb, y + r0 * N, int(offsets[g + 1] - r0),
                            N, K, 0});
    }
    fp8_gemms(list, 128, dgrad);
}
}  // namespace detail

// The routed experts' FP8 layers (header section 8, fp8_grouped_matmul_forward / _backward, bit for bit): all the
// experts' activations quantized in one launch, the weights of the experts with rows in one launch, and every
// expert's product in one launch of the FP8 GEMM (instead of three quantizations and a GEMM per expert, a few
// thousand launches a step at `large`). Wgrad's K is the expert's rows: its transposed codes are padded to 128·count
// with zero codes, which add nothing (the kernel fills past K with zeros too), so its rows stay 16-byte chunks.
// offsets: HOST, [groups + 1].
inline void fp8_grouped_matmul_forward(float* y, const float* x, const float* W, int64_t w_stride,
                                       const int64_t* offsets, int groups, int in, int out) {
    DSV3_PROFILE_KERNEL();
    dsv3::check_group_offsets("cuda::fp8_grouped_matmul_forward", offsets, groups, in, out);
    const int64_t rows = offsets[groups];
    if (rows == 0 || out == 0) return;
    if (in == 0) { DSV3_CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(float) * size_t(rows) * out)); return; }
    detail::fp8_grouped_rows(y, x, W, w_stride, offsets, groups, in, out, false);
}
inline void fp8_grouped_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                                        int64_t w_stride, const int64_t* offsets, int groups, int in, int out) {
    DSV3_PROFILE_KERNEL();
    using namespace detail;
    dsv3::check_group_offsets("cuda::fp8_grouped_matmul_backward", offsets, groups, in, out);
    const int64_t rows = offsets[groups];
    if (rows == 0 || int64_t(out) * in == 0) return;
    if (dx) fp8_grouped_rows(dx, dy, W, w_stride, offsets, groups, in, out, true);   // Dgrad: dx_g += dy_g · W_g
    if (dW) {   // Wgrad: dW_g += dy_gᵀ · x_g, K = the expert's rows (padded to 128·count)
        const auto tiles = token_tiles(offsets, groups, true);
        const size_t padded = size_t(128) * tiles.second;
        uint8_t* dytq = scratch_of<uint8_t>(Slot::fp8_a, size_t(out) * padded);
        float* dyts = scratch_of<float>(Slot::fp8_sa, size_t(out) * tiles.second);
        uint8_t* xtq = scratch_of<uint8_t>(Slot::fp8_b, size_t(in) * padded);
        float* xts = scratch_of<float>(Slot::fp8_sb, size_t(in) * tiles.second);
        quantize_token_tiles(dy, out, tiles, dytq, dyts);
        quantize_token_tiles(x, in, tiles, xtq, xts);
        std::vector<Fp8Gemm> list;
        for (int g = 0, first = 0; g < groups; ++g) {
            const int count = int((offsets[g + 1] - offsets[g] + 127) / 128);
            if (count > 0)
                list.push_back({dytq + int64_t(out) * 128 * first, dyts + int64_t(out) * first,
                                xtq + int64_t(in) * 128 * first, xts + int64_t(in) * first, dW + g * w_stride, out,
                                in, 128 * count, 0});
            first += count;
        }
        fp8_gemms(list, 1, true);
    }
}

}  // namespace cuda
}  // namespace dsv3
