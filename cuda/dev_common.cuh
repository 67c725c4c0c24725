// cuda/dev_common.cuh — what bench_cuda and the dev programs (cuda/dev_*.cu) share: timing, random inputs, the
// device's copy bandwidth. Not part of the backend (the model never includes it).
//
// Timing: CUDA events around each call on the default stream, warm-up calls first, the median of repeated calls.
// Inputs: random non-zero values from the header's seeded Rng (filled on the host, then uploaded), in buffers larger
// than the L2 cache wherever the benchmark shape allows, so a repeated call does not find its inputs in L2.
#pragma once

#include "kernels.cuh"
#include "mla_decode.cuh"  // the batched decoding kernel: measured here, not launched by the model

#include <algorithm>
#include <cstdio>
#include <vector>

namespace dsv3 {
namespace cuda {
namespace bench {

// Median time in milliseconds of `reps` calls of f, after `warmup` calls.
template <class F>
double time_ms(F&& f, int warmup, int reps) {
    for (int i = 0; i < warmup; ++i) f();
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    DSV3_CUDA_CHECK(cudaEventCreate(&a));
    DSV3_CUDA_CHECK(cudaEventCreate(&b));
    std::vector<double> t;
    for (int i = 0; i < std::max(reps, 1); ++i) {
        DSV3_CUDA_CHECK(cudaEventRecord(a));
        f();
        DSV3_CUDA_CHECK(cudaEventRecord(b));
        DSV3_CUDA_CHECK(cudaEventSynchronize(b));
        float ms = 0;
        DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    DSV3_CUDA_CHECK_LAUNCH();
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// Random finite E4M3 codes (a splitmix64 stream, 8 codes per draw, NaN codes replaced by 0x38 = 1.0).
inline std::vector<uint8_t> host_random_codes(size_t n, uint64_t seed) {
    std::vector<uint8_t> h(n);
    Rng rng(seed);
    for (size_t i = 0; i < n; i += 8) {
        uint64_t r = rng.next_u64();
        for (size_t j = i; j < std::min(n, i + 8); ++j, r >>= 8) {
            const uint8_t c = uint8_t(r);
            h[j] = (c & 0x7F) == 0x7F ? 0x38 : c;
        }
    }
    return h;
}
// Uniform floats in [lo, hi).
inline std::vector<float> host_random_floats(size_t n, uint64_t seed, float lo, float hi) {
    std::vector<float> h(n);
    Rng rng(seed);
    for (auto& x : h) x = lo + float(rng.uniform()) * (hi - lo);
    return h;
}
inline DeviceBuffer<uint8_t> random_codes(size_t n, uint64_t seed) {
    return DeviceBuffer<uint8_t>(host_random_codes(n, seed));
}
inline DeviceBuffer<float> random_floats(size_t n, uint64_t seed, float lo, float hi) {
    return DeviceBuffer<float>(host_random_floats(n, seed, lo, hi));
}

// The device's copy bandwidth: cudaMemcpy device to device of `bytes`, bytes read + bytes written per second, in GB/s.
inline double copy_bandwidth_gbs(size_t bytes = size_t(1) << 30) {
    DeviceBuffer<unsigned char> src(bytes), dst(bytes);
    src.fill_bytes(0x3C);
    const double ms = time_ms([&] {
        DSV3_CUDA_CHECK(cudaMemcpy(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice));
    }, 2, 10);
    return 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
}

// One line about the device: name, SMs, L2, and whether this binary runs the FP8 GEMM's wgmma path.
inline cudaDeviceProp print_device(const char* program) {
    cudaDeviceProp prop;
    DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("%s: %s, %d SMs, L2 %d MB, fp8 fast path (wgmma): %s\n", program, prop.name, prop.multiProcessorCount,
                prop.l2CacheSize >> 20, fp8_gemm_fast_available() ? "yes" : "no (emulation)");
    return prop;
}

}  // namespace bench
}  // namespace cuda
}  // namespace dsv3
