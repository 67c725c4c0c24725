// cuda/bench_cuda.cu — GPU benchmarks, each measured side by side with its peer in the same run.
//     make cuda && ./build/bench_cuda [--quick]
//
// (a) FP8 block-scaled GEMM (1×128 activation tiles, 128×128 weight blocks, promotion every 128, FP32 output):
//     dsv3::cuda::fp8_gemm vs torch._scaled_mm (cuBLASLt) at M = N = K = 4096, 6144, 8192. The peer runs through
//     tests/reference/bench_scaled_mm.py (popen) when python3 with torch is there, else "peer skipped". Target ≥ 50%.
// (b) absorbed MLA decoding (one token per sequence over the latent cache): achieved GB/s (cache bytes read + query
//     and output bytes) vs the device's copy bandwidth (cudaMemcpy device-to-device, bytes read + written) measured
//     in the same run. Target ≥ 60%.
// (c) the routed experts' grouped GEMM at the `large` preset's shapes (64 experts of width 512, d = 1024, 8,192
//     tokens × top-6, balanced and collapsed routing): forward, dx and dW of the gate+up and down projections, every
//     path of cuda/kernels.cuh section 3.10b, vs one dense cuBLAS BF16 GEMM with the same FLOPs (its upper bound: no
//     groups).
//     `--grouped` runs only this part and (d).
// (d) causal flash attention at the `large` preset's shape, forward and backward, in TFLOP/s (`--attention`: only
//     this).
// Each benchmark times what the model launches (fp8_gemm picks its tile by size, mla_decode_absorbed its kernel by
// shape); the sweeps over every kernel version, with their checks against the CPU, are build/dev_fp8_gemm and
// build/dev_mla_decode (cuda/dev_*.cu).
// Timing (cuda/dev_common.cuh): CUDA events, warm-up first, the median of repeated runs, random non-zero inputs,
// buffers larger than the L2 cache.
#include "dev_common.cuh"

#include <algorithm>
#include <cmath>
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

// (c) every grouped-GEMM path against a dense cuBLAS GEMM of the same FLOPs, with balanced routing and with the
// collapsed routing of early training (all rows on 6 of the 64 experts, 8,192 each: what the `large` runs see).
void grouped_gemm_bench() {
    using cu::detail::GroupedPath;
    const int groups = 64, rows_each = 768;   // 8192 tokens × 6 / 64 experts
    struct Routing { const char* name; std::vector<int64_t> offsets; };
    std::vector<Routing> routings(2);
    routings[0].name = "balanced (768 +- 8 rows each)";
    routings[1].name = "collapsed (8192 rows on each of 6 experts, none on 58)";
    for (Routing& r : routings) r.offsets.assign(size_t(groups) + 1, 0);
    for (int g = 0; g < groups; ++g) {
        routings[0].offsets[size_t(g) + 1] = routings[0].offsets[size_t(g)] + rows_each - 8 + 16 * (g % 2);
        routings[1].offsets[size_t(g) + 1] = routings[1].offsets[size_t(g)] + (g % 10 == 3 && g < 60 ? 8192 : 0);
    }
    const int64_t rows = routings[0].offsets.back();
    std::printf("\n(c) grouped expert GEMM, %d experts, %lld rows in all, BF16 operands, FP32 out (each call converts "
                "its FP32 activations to BF16; the weights are BF16 shadows, as in training)\n",
                groups, (long long)rows);
    struct Proj { const char* name; int in, out; };
    // gate and up run as one product of width 2 x 512 (header section 5.2)
    for (const Proj& pr : {Proj{"gate+up (1024 -> 2x512)", 1024, 1024}, Proj{"down (512 -> 1024)", 512, 1024}}) {
        const int64_t stride = int64_t(pr.in) * pr.out;
        auto x = random_floats(size_t(rows) * pr.in, 21, -1, 1), dy = random_floats(size_t(rows) * pr.out, 22, -1, 1);
        auto W = random_floats(size_t(stride) * groups, 23, -0.05f, 0.05f);
        // the model's weights have BF16 shadows written by AdamW: make them here the same way (lr 0: W unchanged)
        cu::DeviceBuffer<float> zero_g(W.size()), m(W.size()), v(W.size());
        zero_g.fill_bytes(0), m.fill_bytes(0), v.fill_bytes(0);
        cu::adamw_update(W.data(), zero_g.data(), m.data(), v.data(), int64_t(W.size()), 0.0f, 0.9f, 0.95f, 1e-8f,
                         0.0f, 1);
        cu::DeviceBuffer<float> y(size_t(rows) * pr.out), dx(size_t(rows) * pr.in), dW(size_t(stride) * groups);
        const double flop = 2.0 * double(rows) * pr.in * pr.out;
        auto tf = [&](double ms) { return flop / (ms * 1e-3) / 1e12; };
        // the dense bound: one cuBLAS GEMM [rows, in] x [in, out] on BF16 copies (the conversions not timed)
        const __nv_bfloat16* xb = cu::detail::bf16_copy(cu::Slot::bf16_c, x.data(), rows * pr.in);
        const __nv_bfloat16* wb = cu::detail::bf16_copy(cu::Slot::bf16_b, W.data(), stride);
        const double dense = time_ms([&] {
            cu::detail::gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, pr.out, int(rows), pr.in, wb, pr.in, xb, pr.in, 0.0f,
                                  y.data(), pr.out);
        }, 3, 20);
        std::printf("  %-22s dense cuBLAS bound %7.1f TFLOP/s\n", pr.name, tf(dense));
        struct Path { GroupedPath path; int tile; const char* name; };
        for (const Routing& r : routings) {
            std::printf("  %s:\n", r.name);
            const int64_t* offsets = r.offsets.data();
            for (const Path& path : {Path{GroupedPath::hopper, 256, "wgmma 128x256"},
                                     Path{GroupedPath::hopper, 128, "wgmma 128x128"},
                                     Path{GroupedPath::pipelined, 0, "wmma pipelined"}}) {
                if (path.path == GroupedPath::hopper && !cu::wgmma_available()) continue;
                cu::detail::grouped_path() = path.path;
                cu::detail::hopper_tile() = path.tile;
                const double f = time_ms([&] {
                    cu::grouped_matmul_forward(y.data(), x.data(), W.data(), stride, offsets, groups, pr.in, pr.out);
                }, 3, 20);
                const double bx = time_ms([&] {
                    cu::grouped_matmul_backward(dx.data(), nullptr, dy.data(), x.data(), W.data(), stride, offsets,
                                                groups, pr.in, pr.out);
                }, 3, 20);
                const double bw = time_ms([&] {
                    cu::grouped_matmul_backward(nullptr, dW.data(), dy.data(), x.data(), W.data(), stride, offsets,
                                                groups, pr.in, pr.out);
                }, 3, 20);
                std::printf("    %-22s %-15s forward %6.1f  dx %6.1f  dW %6.1f TFLOP/s (%.2f / %.2f / %.2f of dense)\n",
                            pr.name, path.name, tf(f), tf(bx), tf(bw), dense / f, dense / bx, dense / bw);
            }
        }
        cu::detail::grouped_path() = GroupedPath::automatic;
        cu::detail::hopper_tile() = 0;
    }
}

// (d) causal flash attention at the `large` preset's shape (B 8, T 1024, 16 heads, q/k dims 64 + 32, v 64), forward
// and backward, in TFLOP/s of the causal half (the masked half is not counted), and the BF16 head-major copies it
// makes of q, k, v (and dO) against the copy bandwidth.
void attention_bench() {
    const int B = 8, T = 1024, H = 16, dqk = 96, dv = 64;
    const size_t nq = size_t(B) * T * H * dqk, nv = size_t(B) * T * H * dv;
    auto q = random_floats(nq, 31, -1, 1), k = random_floats(nq, 32, -1, 1), v = random_floats(nv, 33, -1, 1);
    auto dout = random_floats(nv, 34, -1, 1);
    cu::DeviceBuffer<float> out(nv), saved(cu::attention_saved_floats(B, T, H, dqk, dv)), dq(nq), dk(nq), dvv(nv);
    const float scale = 1.0f / std::sqrt(float(dqk));
    const double causal = double(B) * H * T * (T + 1) / 2;   // the (query, key) pairs each product covers
    // forward: S = QKᵀ and PV; backward: S, dP = dO Vᵀ, dV, dK, dQ (the recomputation of S and dP in both backward
    // kernels not counted)
    const double f_flop = 2.0 * causal * (dqk + dv), b_flop = 2.0 * causal * (3 * dqk + 2 * dv);
    const double f = time_ms([&] {
        cu::attention_forward(out.data(), saved.data(), q.data(), k.data(), v.data(), B, T, H, dqk, dv, scale);
    }, 3, 20);
    const double b = time_ms([&] {
        cu::attention_backward(dq.data(), dk.data(), dvv.data(), dout.data(), out.data(), saved.data(), q.data(),
                               k.data(), v.data(), B, T, H, dqk, dv, scale);
    }, 3, 20);
    namespace fl = cu::detail::flash;
    const fl::Args a = fl::args(B, T, H, dqk, dv, scale);
    const double c = time_ms([&] { fl::heads_bf16(cu::Slot::bf16_a, q.data(), a, dqk, 96); }, 3, 20);
    std::printf("\n(d) causal attention, B %d, T %d, %d heads, dims %d / %d (flash kernels)\n", B, T, H, dqk, dv);
    std::printf("  forward  %.3f ms  %6.1f TFLOP/s\n  backward %.3f ms  %6.1f TFLOP/s\n", f, f_flop / (f * 1e-3) / 1e12,
                b, b_flop / (b * 1e-3) / 1e12);
    std::printf("  BF16 head-major copy of q: %.3f ms, %.0f GB/s (bytes read + written)\n", c,
                double(nq) * 6 / (c * 1e-3) / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
        const bool grouped_only = argc > 1 && std::string(argv[1]) == "--grouped";
        const bool attention_only = argc > 1 && std::string(argv[1]) == "--attention";
        const cudaDeviceProp prop = cu::bench::print_device("bench_cuda");
        if (!attention_only) grouped_gemm_bench();
        attention_bench();
        if (attention_only) return 0;
        if (grouped_only) return 0;

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
            const char* tile = cu::fp8_gemm_fast_available() ? "warp-specialized, TMA" : "emulation";
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
