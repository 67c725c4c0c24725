// cuda/dev_logfmt.cu — LogFMT encode and decode on the GPU ("Insights into DeepSeek-V3", arXiv 2505.09343, §3.2;
// the CPU codec and its definition: header section 8.5), to put a number on the paper's reason for not deploying it:
// "the log and exp operations ... cost too much of the GPU's bandwidth".
//     make cuda && build/dev_logfmt [rows]          (default 16384 rows of 7168, V3's hidden size: 470 MB of FP32)
//
//   check: against the header's logfmt_encode / logfmt_decode, LogFMT-8 and LogFMT-10, on Gaussian and heavy-tailed
//          rows (Student's t, 3 degrees of freedom), 512 rows of 7168. The tile parameters min and step are the
//          CPU's bit for bit where logf agrees (both sides round every operation on its own: no FMA contraction);
//          codes may differ where logf or expf of the two libraries differ by an ulp next to a rounding boundary:
//          at most 1 in 10^4 codes, and never by more than one level.
//   time:  encode (read FP32, write the codes as uint16 and one {min, step} per 1×128 tile) and decode (the reverse),
//          CUDA events, 3 warm-up calls, the median of 20, in GB/s of bytes read + written, against the copy
//          bandwidth (cudaMemcpy device to device) and the FP8 1×128 quantizer of V3's recipe (cuda/fp8.cuh) on the
//          same rows, all in the same run.
//
// The kernels: one warp per 1×128 tile, 4 elements a lane. Encode: the tile's largest and smallest nonzero magnitudes
// by warp reductions, then per element one logf for the first guess of the level and two or three expf for the levels
// around it (rounding in linear space needs the levels' values, not their logs). Decode: one expf per element.
#include "dev_common.cuh"   // kernels.cuh, and with it fp8.cuh: the FP8 quantizer measured beside LogFMT

#include <cstdio>
#include <string>
#include <vector>

namespace cu = dsv3::cuda;
using dsv3::LogFmtTile;

namespace {

// The header's logfmt_detail::level and encode_magnitude, with every operation rounded on its own, as on the CPU.
__device__ float level(LogFmtTile t, int K) { return expf(__fadd_rn(t.min, __fmul_rn(t.step, float(K - 1)))); }
__device__ int encode_magnitude(float a, LogFmtTile t, int L) {
    if (!(t.step >= 0)) return 1;
    a = fminf(a, FLT_MAX);
    int K = t.step > 0 ? int(fminf(fmaxf(__fdiv_rn(__fsub_rn(logf(a), t.min), t.step), -1.0f), float(L))) + 1 : 1;
    K = min(max(K, 1), L);
    while (K > 1 && level(t, K) > a) --K;
    while (K < L && t.step > 0 && level(t, K + 1) <= a) ++K;
    const float lo = level(t, K);
    if (a < lo) return 2 * a <= lo ? 0 : 1;
    if (K == L || t.step == 0) return K;
    const float dlo = __fsub_rn(a, lo), dhi = __fsub_rn(level(t, K + 1), a);
    return dlo < dhi || (dlo == dhi && K % 2 == 0) ? K : K + 1;
}

__global__ void encode_kernel(uint16_t* codes, LogFmtTile* tiles, const float* x, int rows, int cols, int bits) {
    const int ct = (cols + 127) / 128, lane = threadIdx.x & 31;
    const int64_t tile = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
    if (tile >= int64_t(rows) * ct) return;   // whole warps leave together
    const int64_t at = tile / ct * cols + tile % ct * 128;
    const int n = min(128, cols - int(tile % ct) * 128), L = (1 << (bits - 1)) - 1;
    float v[4], amax = 0, amin = FLT_MAX;
    bool nan = false, inf = false;
    for (int j = 0; j < 4; ++j) {
        const int i = lane + 32 * j;
        v[j] = i < n ? x[at + i] : 0.0f;
        const float a = fabsf(v[j]);
        nan |= a != a;
        inf |= a > FLT_MAX;
        if (a > 0 && a <= FLT_MAX) amax = fmaxf(amax, a), amin = fminf(amin, a);
    }
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        amin = fminf(amin, __shfl_xor_sync(0xffffffffu, amin, o));
    }
    nan = __any_sync(0xffffffffu, nan);
    inf = __any_sync(0xffffffffu, inf);
    if (amax == 0 && inf) amax = amin = FLT_MAX;
    LogFmtTile t;
    if (amax > 0) {
        const float hi = logf(amax);
        t.min = fmaxf(logf(amin), __fsub_rn(hi, dsv3::logfmt_detail::kRange));
        t.step = __fdiv_rn(__fsub_rn(hi, t.min), float(L - 1));
    }
    if (nan) t.step = NAN;
    if (lane == 0) tiles[tile] = t;
    for (int j = 0; j < 4; ++j) {
        const int i = lane + 32 * j;
        if (i >= n) continue;
        const float a = fabsf(v[j]);
        const int K = a == 0 ? 0 : encode_magnitude(a, t, L);
        codes[at + i] = uint16_t((signbit(v[j]) ? 1u << (bits - 1) : 0u) | unsigned(K));
    }
}

__global__ void decode_kernel(float* x, const uint16_t* codes, const LogFmtTile* tiles, int rows, int cols, int bits) {
    const int ct = (cols + 127) / 128;
    const unsigned sign = 1u << (bits - 1);
    const int64_t n = int64_t(rows) * cols;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const unsigned q = codes[i], K = q & (sign - 1);
        const float a = K == 0 ? 0.0f : level(tiles[i / cols * ct + i % cols / 128], int(K));
        x[i] = q & sign ? -a : a;
    }
}

void encode(uint16_t* codes, LogFmtTile* tiles, const float* x, int rows, int cols, int bits) {
    const int64_t warps = int64_t(rows) * ((cols + 127) / 128);
    encode_kernel<<<unsigned((warps + 7) / 8), 256>>>(codes, tiles, x, rows, cols, bits);
    DSV3_CUDA_CHECK_LAUNCH();
}
void decode(float* x, const uint16_t* codes, const LogFmtTile* tiles, int rows, int cols, int bits) {
    decode_kernel<<<cu::grid_for(int64_t(rows) * cols, 256), 256>>>(x, codes, tiles, rows, cols, bits);
    DSV3_CUDA_CHECK_LAUNCH();
}

std::vector<float> rows_of(int rows, int cols, bool heavy, uint64_t seed) {
    dsv3::Rng rng(seed);
    std::vector<float> x(size_t(rows) * size_t(cols));
    for (float& v : x) {
        const double g = rng.normal();
        if (!heavy) { v = float(g); continue; }
        const double a = rng.normal(), b = rng.normal(), c = rng.normal();
        v = float(g / std::sqrt((a * a + b * b + c * c) / 3));
    }
    return x;
}

// The GPU against the CPU on one data set and width; returns false on a failed check.
bool check(int bits, bool heavy) {
    const int rows = 512, cols = 7168, ct = cols / 128;
    const std::vector<float> x = rows_of(rows, cols, heavy, heavy ? 12 : 11);
    std::vector<uint16_t> codes(x.size());
    std::vector<LogFmtTile> tiles(size_t(rows) * ct);
    dsv3::logfmt_encode(x.data(), rows, cols, bits, codes.data(), tiles.data());
    std::vector<float> y(x.size());
    dsv3::logfmt_decode(codes.data(), tiles.data(), rows, cols, bits, y.data());
    cu::DeviceBuffer<float> xd(x), yd(x.size());
    cu::DeviceBuffer<uint16_t> cd(x.size());
    cu::DeviceBuffer<LogFmtTile> td(tiles.size());
    encode(cd.data(), td.data(), xd.data(), rows, cols, bits);
    const std::vector<uint16_t> gcodes = cd.download();
    const std::vector<LogFmtTile> gtiles = td.download();
    cu::DeviceBuffer<uint16_t> cpu_codes(codes);
    cu::DeviceBuffer<LogFmtTile> cpu_tiles(tiles);
    decode(yd.data(), cpu_codes.data(), cpu_tiles.data(), rows, cols, bits);   // the CPU's codes, decoded here
    const std::vector<float> gy = yd.download();
    int64_t tile_diff = 0, code_diff = 0, far = 0;
    double max_rel = 0;
    for (size_t i = 0; i < tiles.size(); ++i)
        tile_diff += gtiles[i].min != tiles[i].min || gtiles[i].step != tiles[i].step;
    for (size_t i = 0; i < x.size(); ++i) {
        code_diff += gcodes[i] != codes[i];
        far += std::abs(int(gcodes[i]) - int(codes[i])) > 1;
        if (y[i] != 0) max_rel = std::max(max_rel, std::fabs(double(gy[i]) - y[i]) / std::fabs(y[i]));
    }
    const bool ok = far == 0 && code_diff * 10000 <= int64_t(x.size()) && max_rel < 1e-6;
    std::printf("check LogFMT-%-2d %-10s %lld of %zu tiles' (min, step) differ, %lld of %zu codes (%lld by more than "
                "one level), decode max rel. diff %.1e: %s\n",
                bits, heavy ? "Student t3" : "Gaussian", (long long)tile_diff, tiles.size(), (long long)code_diff,
                x.size(), (long long)far, max_rel, ok ? "ok" : "FAILED");
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const int rows = argc > 1 ? int(dsv3::parse_int(argv[1], "rows", 1, 1 << 20)) : 16384, cols = 7168;
        bool ok = true;
        for (int bits : {8, 10})
            for (bool heavy : {false, true}) ok &= check(bits, heavy);
        const int64_t n = int64_t(rows) * cols, ct = cols / 128;
        const size_t elements = size_t(n), n_tiles = size_t(rows) * size_t(ct);
        cu::DeviceBuffer<float> x(rows_of(rows, cols, false, 13)), y(elements), scales(n_tiles);
        cu::DeviceBuffer<uint16_t> codes(elements);
        cu::DeviceBuffer<LogFmtTile> tiles(n_tiles);
        cu::DeviceBuffer<uint8_t> q8(elements);
        const double copy = cu::bench::copy_bandwidth_gbs();
        auto gbs = [&](double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; };
        std::printf("\n%d rows of %d (%.0f MB of FP32); device copy (cudaMemcpy D2D, read + write): %.0f GB/s\n", rows,
                    cols, 4e-6 * double(n), copy);
        const double fp8_ms = cu::bench::time_ms(
            [&] { cu::quantize_tiles_1x128(x.data(), rows, cols, q8.data(), scales.data()); }, 3, 20);
        const double fp8_bytes = 5.0 * double(n) + 4.0 * double(rows * ct);
        std::printf("%-34s %8.3f ms %8.0f GB/s  %5.1f%% of copy\n", "E4M3 1x128 quantize (fp8.cuh)", fp8_ms,
                    gbs(fp8_bytes, fp8_ms), 100 * gbs(fp8_bytes, fp8_ms) / copy);
        for (int bits : {8, 10}) {
            const double tile_bytes = double(sizeof(LogFmtTile)) * double(rows * ct);
            const double enc = cu::bench::time_ms([&] { encode(codes.data(), tiles.data(), x.data(), rows, cols, bits); },
                                                  3, 20);
            const double dec = cu::bench::time_ms([&] { decode(y.data(), codes.data(), tiles.data(), rows, cols, bits); },
                                                  3, 20);
            const double bytes = 6.0 * double(n) + tile_bytes;   // FP32 in, uint16 codes out (or the reverse)
            std::printf("LogFMT-%-2d encode %-17s %8.3f ms %8.0f GB/s  %5.1f%% of copy\n", bits, "", enc,
                        gbs(bytes, enc), 100 * gbs(bytes, enc) / copy);
            std::printf("LogFMT-%-2d decode %-17s %8.3f ms %8.0f GB/s  %5.1f%% of copy\n", bits, "", dec,
                        gbs(bytes, dec), 100 * gbs(bytes, dec) / copy);
        }
        std::printf("%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED");
        return ok ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dev_logfmt: error: %s\n", e.what());
        return 1;
    }
}
