// cuda/bench_cuda.cu — GPU benchmarks, each measured side by side with its peer in the same run.
//     make cuda && ./build/bench_cuda [--quick]
//
// (a) FP8 block-scaled GEMM (1×128 activation tiles, 128×128 weight blocks, promotion every 128, FP32 output):
//     dsv3::cuda::fp8_gemm vs torch._scaled_mm (cuBLASLt) at M = N = K = 4096, 6144, 8192. The peer runs through
//     tests/reference/bench_scaled_mm.py (popen) when python3 with torch is there, else "peer skipped". Target ≥ 50%.
// (b) absorbed MLA decoding (one token per sequence over the latent cache): achieved GB/s (cache bytes read + query
//     and output bytes) vs the device's copy bandwidth (cudaMemcpy device-to-device, bytes read + written) measured
//     in the same run. Target ≥ 60%.
// Each benchmark times what the model launches (fp8_gemm picks its tile by size, mla_decode_absorbed its kernel by
// shape); the sweeps over every kernel version, with their checks against the CPU, are build/dev_fp8_gemm and
// build/dev_mla_decode (cuda/dev_*.cu).
// Timing (cuda/dev_common.cuh): CUDA events, warm-up first, the median of repeated runs, random non-zero inputs,
// buffers larger than the L2 cache.
#include "dev_common.cuh"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace cu = dsv3::cuda;

namespace {

using cu::bench::random_codes;
using cu::bench::random_floats;
using cu::bench::time_ms;

// The peer's figures, by size, from the JSON line the Python script prints (a tiny ad-hoc reader: the format is ours).
struct Peer { bool ok = false; std::string note; std::vector<std::pair<int, double>> tflops; };
Peer run_peer(const std::vector<int>& sizes) {
    Peer p;
    std::string cmd = "python3 tests/reference/bench_scaled_mm.py";
    for (int s : sizes) cmd += " " + std::to_string(s);
    cmd += " 2>/dev/null";
    FILE* f = popen(cmd.c_str(), "r");
    if (!f) { p.note = "peer skipped (cannot start python3)"; return p; }
    std::string out;
    char buf[4096];
    while (size_t n = fread(buf, 1, sizeof buf, f)) out.append(buf, n);
    const int rc = pclose(f);
    if (rc != 0 || out.find("\"results\"") == std::string::npos) {
        p.note = "peer skipped (python3 with torch not available, or the script failed)";
        return p;
    }
    // Each result: {"M": m, ..., "tflops": x}
    size_t pos = 0;
    while ((pos = out.find("\"M\": ", pos)) != std::string::npos) {
        const int m = std::atoi(out.c_str() + pos + 5);
        const size_t end = out.find('}', pos), tf = out.find("\"tflops\": ", pos);
        if (tf != std::string::npos && tf < end) p.tflops.push_back({m, std::atof(out.c_str() + tf + 10)});
        else p.tflops.push_back({m, -1.0});
        pos = end;
    }
    const size_t dpos = out.find("\"device\": \"");
    if (dpos != std::string::npos) p.note = "peer: torch._scaled_mm on " + out.substr(dpos + 11, out.find('"', dpos + 11) - dpos - 11);
    p.ok = true;
    return p;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
        const cudaDeviceProp prop = cu::bench::print_device("bench_cuda");

        // ---- (a) FP8 block-scaled GEMM -----------------------------------------------------------------------------
        std::vector<int> sizes = quick ? std::vector<int>{4096} : std::vector<int>{4096, 6144, 8192};
        std::vector<std::pair<int, double>> ours;
        std::printf("\n(a) FP8 block-scaled GEMM, C[M,N] = A[M,K]·B[N,K]^T, E4M3, 1x128 / 128x128 scales, FP32 out\n");
        for (int n : sizes) {
            const int kt = dsv3::fp8_tiles(n);
            auto A = random_codes(size_t(n) * n, 1 + n), B = random_codes(size_t(n) * n, 2 + n);
            auto sa = random_floats(size_t(n) * kt, 3 + n, 0.5f, 1.5f);
            auto sb = random_floats(size_t(dsv3::fp8_tiles(n)) * kt, 4 + n, 0.5f, 1.5f);
            cu::DeviceBuffer<float> C(size_t(n) * n);
            // fp8_gemm's own choice of kernel for this size
            const char* tile = !cu::fp8_gemm_fast_available()                ? "emulation"
                               : cu::detail::fp8_gemm_auto_tile(n, n) == 192 ? "128x192 tile, 4 stages"
                                                                             : "128x128 tile, 4 stages";
            const double ms = time_ms([&] {
                cu::fp8_gemm(A.data(), sa.data(), B.data(), sb.data(), C.data(), n, n, n);
            }, 3, quick ? 5 : 20);
            const double best = 2.0 * n * double(n) * n / (ms * 1e-3) / 1e12;
            std::printf("  ours  M=N=K=%5d  (%-24s): %8.3f ms  %7.1f TFLOP/s\n", n, tile, ms, best);
            ours.push_back({n, best});
        }
        const Peer peer = run_peer(sizes);
        std::printf("  %s\n", peer.note.c_str());

        // ---- (b) absorbed MLA decoding ------------------------------------------------------------------------------
        std::printf("\n(b) absorbed MLA decoding over the latent cache (float32), one new token per sequence\n");
        const double copy_gbs = cu::bench::copy_bandwidth_gbs();
        std::printf("  device copy (cudaMemcpy D2D, 1 GiB, read + write): %.1f GB/s\n", copy_gbs);
        struct Case { const char* name; int B, T, H, dc, dr; };
        const std::vector<Case> cases = {
            {"small preset (H=8, dc=128, dr=32)", 128, 4096, 8, 128, 32},
            {"V2-Lite shape (H=16, dc=512, dr=64)", 32, 4096, 16, 512, 64},
            {"V2-Lite shape, long (H=16, T=32768)", 4, 32768, 16, 512, 64},
            {"V3 shape (H=128, dc=512, dr=64)", 32, 4096, 128, 512, 64},
        };
        std::vector<std::pair<std::string, double>> dec;
        for (const Case& c : cases) {
            const size_t nq = size_t(c.B) * c.H, ncache = size_t(c.B) * c.T;
            auto ql = random_floats(nq * c.dc, 11, -1, 1), qr = random_floats(nq * c.dr, 12, -1, 1);
            auto ckv = random_floats(ncache * c.dc, 13, -1, 1), kr = random_floats(ncache * c.dr, 14, -1, 1);
            cu::DeviceBuffer<float> o(nq * c.dc);
            const float scale = 1.0f / std::sqrt(192.0f);
            const double ms = time_ms([&] {
                cu::mla_decode_absorbed(o.data(), ql.data(), qr.data(), ckv.data(), kr.data(), c.B, c.T, c.H, c.dc, c.dr,
                                        scale);
            }, 3, quick ? 5 : 20);
            const double bytes = 4.0 * (double(ncache) * (c.dc + c.dr) + double(nq) * (2 * c.dc + c.dr));
            const double gbs = bytes / (ms * 1e-3) / 1e9;
            std::printf("  %-38s B=%3d T=%6d: %8.3f ms  %7.1f GB/s  = %5.1f%% of copy\n", c.name, c.B, c.T, ms, gbs,
                        100.0 * gbs / copy_gbs);
            dec.push_back({c.name, gbs});
        }

        // ---- summary --------------------------------------------------------------------------------------------------
        std::printf("\nsummary (GPU %s)\n", prop.name);
        for (auto& [n, tf] : ours) {
            double peer_tf = -1;
            for (auto& [m, t] : peer.tflops) if (m == n) peer_tf = t;
            if (peer_tf > 0)
                std::printf("  fp8 gemm %5d: ours %7.1f TFLOP/s, torch._scaled_mm %7.1f TFLOP/s, ratio %.2f (target >= 0.50)\n",
                            n, tf, peer_tf, tf / peer_tf);
            else
                std::printf("  fp8 gemm %5d: ours %7.1f TFLOP/s, peer skipped\n", n, tf);
        }
        for (auto& [name, gbs] : dec)
            std::printf("  mla decode %-38s %7.1f GB/s, copy %7.1f GB/s, ratio %.2f (target >= 0.60)\n", name.c_str(),
                        gbs, copy_gbs, gbs / copy_gbs);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_cuda: %s\n", e.what());
        return 1;
    }
}
