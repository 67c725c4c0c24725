// fp8_error: the accumulation error of FP8 GEMMs on Hopper tensor cores, and how promotion removes it.
//
// DeepSeek-V3 report §3.3.2: "the accumulation precision of FP8 GEMM on NVIDIA H800 GPUs is limited to retaining
// around 14 bits ... Taking GEMM operations of two random matrices with K = 4096 for example, in our preliminary test,
// the limited accumulation precision in Tensor Cores results in a maximum relative error of nearly 2%." The fix:
// copy the partial sums to FP32 registers every N_C = 128 elements of K ("promotion").
//
// This program multiplies random E4M3 matrices A[M, K] · B[N, K]ᵀ with dsv3::fp8_gemm (the H100 accumulator model of
// the header's section 8, bit-exact against the hardware) without and with promotion, compares them with the exact
// product of the same FP8 inputs, and prints, for K = 128 … 16384:
//   max:  the maximum relative error over the outputs with |exact| >= median(|exact|) (tiny outputs would make any
//         relative error arbitrary),
//   frob: the relative Frobenius error ||C - exact||_F / ||exact||_F.
// Gaussian N(0,1) inputs: errors of both signs, partly cancelling. Uniform [0,1) inputs: every truncation pushes the
// sum down, so the error is a bias that grows linearly with K. It writes a PNG plot of the table (log scale).
// Then it runs the report's experiment at K = 4096 at full size: --draws draws of 10^6 outputs, and as many of 1.7·10^7
// (two to three minutes on two cores).
//
//   build/fp8_error [--out build/fp8_error.png] [--m 256] [--n 256] [--draws 3]   (build/fp8_error --help)
#include "../deepseek_v3.hpp"

#include <algorithm>
#include <chrono>

namespace {

struct Errors { double max_rel, frob; };

// max relative error over outputs with |ref| >= median |ref|, and relative Frobenius error.
Errors measure(const std::vector<float>& c, const std::vector<float>& ref) {
    std::vector<double> mag(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) mag[i] = std::fabs(double(ref[i]));
    std::vector<double> sorted = mag;
    std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
    const double median = sorted[sorted.size() / 2];
    Errors e{0.0, 0.0};
    double num = 0, den = 0;
    for (size_t i = 0; i < c.size(); ++i) {
        const double d = double(c[i]) - double(ref[i]);
        num += d * d;
        den += double(ref[i]) * double(ref[i]);
        if (mag[i] >= median && mag[i] > 0) e.max_rel = std::max(e.max_rel, std::fabs(d) / mag[i]);
    }
    e.frob = std::sqrt(num / den);
    return e;
}

}  // namespace

int main(int argc, char** argv) {
    dsv3::prefer_sleeping_threads(argv);  // a shared CPU: OpenMP threads that wait sleep (the header, section 2)
    try {
        std::string out = "build/fp8_error.png";
        int M = 256, N = 256, draws = 3;
        for (int i = 1; i < argc; ++i) {
            const std::string a = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) dsv3::fail(a, ": expected a value");
                return argv[++i];
            };
            if (a == "--out") out = value();
            else if (a == "--m") M = int(dsv3::parse_int(value(), a, 2, 65536));
            else if (a == "--n") N = int(dsv3::parse_int(value(), a, 1, 65536));
            else if (a == "--draws") draws = int(dsv3::parse_int(value(), a, 0, 1000));
            else if (a == "--help" || a == "-h") {
                std::printf(
                    "usage: fp8_error [options]\n"
                    "Measures the accumulation error of FP8 GEMMs on Hopper tensor cores, without and with promotion.\n"
                    "  --out PNG             the plot of the table over K (default build/fp8_error.png)\n"
                    "  --m M                 rows of A and of the product in the table (default 256)\n"
                    "  --n N                 rows of B, columns of the product in the table (default 256)\n"
                    "  --draws D             draws of the full-size K = 4096 experiment (default 3; 0: skip it)\n"
                    "  --help, -h            this text\n");
                return 0;
            } else dsv3::fail("unknown option \"", a, "\" (see fp8_error --help)");
        }
        std::printf("options: --out %s  --m %d  --n %d  --draws %d   (see fp8_error --help)\n\n", out.c_str(), M, N,
                    draws);
        std::printf("FP8 (E4M3) GEMM C[%d,%d] = A[%d,K]·B[%d,K]^T on the H100 tensor-core accumulator model\n"
                    "(blocks of 32, 13 fraction bits, truncation; DeepSeek-V3 report §3.3.2), against the exact product\n"
                    "of the same FP8 inputs. max = max relative error over outputs with |exact| >= median,\n"
                    "frob = relative Frobenius error.\n\n",
                    M, N, M, N);
        std::printf("%-18s %6s | %-22s | %-22s\n", "inputs", "K", "    no promotion", " promotion every 128");
        std::printf("%-18s %6s | %10s %10s  | %10s %10s\n", "", "", "max", "frob", "max", "frob");
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<int> ks;
        for (int k = 128; k <= 16384; k *= 2) ks.push_back(k);
        // Inputs: Gaussian; Gaussian scaled so that each matrix's largest magnitude is E4M3's 448 (per-tensor
        // scaling, as FP8 GEMMs are fed); one-signed uniform.
        const char* names[3] = {"Gaussian N(0,1)", "Gaussian, amax 448", "uniform [0,1)"};
        std::vector<std::vector<Errors>> fast_err(3), prom_err(3);
        dsv3::Fp8Accum no_promotion, promotion, exact;
        no_promotion.promote_every = 0;
        exact.exact = true;
        auto random_fp8 = [](dsv3::Rng& rng, size_t n, int dist) {
            std::vector<float> x(n);
            for (float& v : x) v = float(dist == 2 ? rng.uniform() : rng.normal());
            float scale = 1;
            if (dist == 1) {
                float amax = 0;
                for (float v : x) amax = std::max(amax, std::fabs(v));
                scale = 448.0f / amax;
            }
            std::vector<uint8_t> q(n);
            for (size_t i = 0; i < n; ++i) q[i] = dsv3::fp8_e4m3_encode(x[i] * scale);
            return q;
        };
        for (int dist = 0; dist < 3; ++dist) {
            for (int K : ks) {
                dsv3::Rng rng(1000 + 10 * uint64_t(dist % 2 == 0 ? dist : 0) + uint64_t(K));  // scaled: Gaussian's draws
                const std::vector<uint8_t> A = random_fp8(rng, size_t(M) * K, dist), B = random_fp8(rng, size_t(N) * K, dist);
                std::vector<float> ref(size_t(M) * N), fast(ref.size()), prom(ref.size());
                dsv3::fp8_gemm(A.data(), nullptr, B.data(), nullptr, ref.data(), M, N, K, exact);
                dsv3::fp8_gemm(A.data(), nullptr, B.data(), nullptr, fast.data(), M, N, K, no_promotion);
                dsv3::fp8_gemm(A.data(), nullptr, B.data(), nullptr, prom.data(), M, N, K, promotion);
                const Errors ef = measure(fast, ref), ep = measure(prom, ref);
                fast_err[size_t(dist)].push_back(ef);
                prom_err[size_t(dist)].push_back(ep);
                std::printf("%-18s %6d | %9.4f%% %9.4f%%  | %9.4f%% %9.4f%%\n", names[dist], K, 100 * ef.max_rel,
                            100 * ef.frob, 100 * ep.max_rel, 100 * ep.frob);
                std::fflush(stdout);
            }
        }
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("\n(%.1f s) The report's \"nearly 2%%\" at K = 4096 is the first column. One draw of\n"
                    "10^6 outputs on an H100: Gaussian 1.3%% max / 0.13%% frob without promotion, 0.09%% / 0.013%%\n"
                    "with; scaled to amax 448 1.7%% / 0.13%%; uniform 7.0%% without (a bias growing with K),\n"
                    "0.05-0.09%% with. The max is an extreme value: it grows slowly with the number of outputs and\n"
                    "varies from seed to seed (%d outputs above the median here%s).\n",
                    secs, M * N / 2, draws > 0 ? "; the K = 4096 experiment below uses more" : "");

        // The report's experiment itself at K = 4096. The max over the outputs above the median is an extreme
        // value: at the sample size of the H100 measurements (10^6 outputs) it moves from draw to draw by ±10%, and it
        // grows with the number of outputs. So: several draws of 1024 x 1024 outputs (spread, and the effect of
        // promotion), then draws of 4096 x 4096. The hardware (tests/reference/fp8_error_hw.py, torch._scaled_mm on
        // an H200) gives the same picture: 1.11-1.32% over six 1024² draws, 1.45-1.70% over three 4096² draws
        // (Gaussian N(0,1)).
        if (draws > 0) {
            const int K = 4096;
            // One progress line over the whole experiment, in GEMMs of 1024 x 1024 outputs (one of 4096 x 4096 counts 16).
            dsv3::Progress progress(2 * draws * 3 + draws * 2 * 16);
            progress.metric = "last max rel. error %";
            progress.unit = "outputs";
            int64_t gemms = 0;
            auto one_gemm = [&](int size, const std::vector<uint8_t>& A, const std::vector<uint8_t>& B, float* C,
                                const dsv3::Fp8Accum& acc, double error) {
                dsv3::fp8_gemm(A.data(), nullptr, B.data(), nullptr, C, size, size, K, acc);
                gemms += int64_t(size / 1024) * (size / 1024);
                progress.update(gemms, error, gemms * 1024 * 1024);
            };
            auto one_draw = [&](int size, int dist, uint64_t seed, bool with_promotion) {
                dsv3::Rng rng(seed);
                const std::vector<uint8_t> A = random_fp8(rng, size_t(size) * K, dist),
                                           B = random_fp8(rng, size_t(size) * K, dist);
                std::vector<float> ref(size_t(size) * size), c(ref.size());
                one_gemm(size, A, B, ref.data(), exact, 0);
                one_gemm(size, A, B, c.data(), no_promotion, 0);
                const double fast = measure(c, ref).max_rel;
                double promoted = 0;
                if (with_promotion) {
                    one_gemm(size, A, B, c.data(), promotion, 100 * fast);
                    promoted = measure(c, ref).max_rel;
                }
                progress.update(gemms, 100 * fast, gemms * 1024 * 1024);
                return std::make_pair(fast, promoted);
            };
            std::printf("\nK = %d, C[1024,1024] (10^6 outputs, one H100 draw's size), %d independent draws:\n", K,
                        draws);
            std::printf("%-18s | %-34s | %8s | %s\n", "inputs", "max rel. error, no promotion", "mean",
                        "promotion every 128 (largest)");
            for (int dist = 0; dist < 2; ++dist) {
                std::string per_draw;
                double mean = 0, largest = 0, largest_promoted = 0;
                for (int draw = 0; draw < draws; ++draw) {
                    const auto [fast, promoted] = one_draw(1024, dist, 4096 + uint64_t(draw), true);
                    mean += fast / draws;
                    largest = std::max(largest, fast);
                    largest_promoted = std::max(largest_promoted, promoted);
                    char buf[32];
                    std::snprintf(buf, sizeof buf, "%.2f%% ", 100 * fast);
                    per_draw += buf;
                }
                progress.break_line();
                std::printf("%-18s | %-34s | %7.2f%% | %.3f%% (%.0fx less than the largest)\n", names[dist],
                            per_draw.c_str(), 100 * mean, 100 * largest_promoted, largest / largest_promoted);
                std::fflush(stdout);
            }
            double mean = 0;
            std::string per_draw;
            for (int draw = 0; draw < draws; ++draw) {
                const double e = one_draw(4096, 0, 8192 + uint64_t(draw), false).first;
                mean += e / draws;
                char buf[32];
                std::snprintf(buf, sizeof buf, "%.2f%% ", 100 * e);
                per_draw += buf;
            }
            progress.break_line();
            std::printf("K = %d, C[4096,4096] (1.7·10^7 outputs), Gaussian N(0,1), no promotion, %d draws: %s| mean "
                        "%.2f%%   <- the report's \"nearly 2%%\"\n", K, draws, per_draw.c_str(), 100 * mean);
            std::printf("(Hopper hardware, tests/reference/fp8_error_hw.py on an H200: mean 1.20%% over six 1024² "
                        "draws, 1.58%% over three 4096² draws)\n");
        }

        // The plot: x = log2 K, y = error in percent (log scale); one line per inputs x promotion x measure.
        std::vector<dsv3::PlotSeries> series;
        const char* mode[2] = {"no promotion", "promote/128"};
        for (int dist : {0, 2})
            for (int m = 0; m < 2; ++m)
                for (int frob = 0; frob < 2; ++frob) {
                    const auto& e = m == 0 ? fast_err[size_t(dist)] : prom_err[size_t(dist)];
                    dsv3::PlotSeries s;
                    s.name = std::string(dist == 0 ? "Gauss, " : "unif., ") + mode[m] + (frob ? ", frob" : ", max");
                    for (size_t i = 0; i < ks.size(); ++i) {
                        s.x.push_back(std::log2(double(ks[i])));
                        s.y.push_back(100 * (frob ? e[i].frob : e[i].max_rel));
                    }
                    series.push_back(s);
                }
        dsv3::plot_lines(out, "FP8 E4M3 GEMM error, H100 accumulator model (M=" + std::to_string(M) + ", N=" +
                                  std::to_string(N) + ")",
                         "log2 K", "relative error, % (log scale)", series, /*log_y=*/true);
        std::printf("wrote %s\n", out.c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "fp8_error: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "fp8_error: error: unknown exception\n");
        return 1;
    }
}
