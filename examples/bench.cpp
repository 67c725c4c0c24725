// bench: how fast is the CPU matmul, compared with the machine's peak and with OpenBLAS?
//
//   g++ -O3 -march=native -fopenmp -std=c++17 examples/bench.cpp -o build/bench
//   g++ -O3 -march=native -fopenmp -std=c++17 -DDSV3_BENCH_OPENBLAS examples/bench.cpp -o build/bench -lopenblas
//   OMP_NUM_THREADS=2 build/bench
//
// For each linear layer of the `tiny` model (and one bigger one), it times the forward y = x Wᵀ (2·T·in·out FLOPs)
// and the backward dx = dy W, dW = dyᵀ x (4·T·in·out FLOPs), and prints GFLOP/s: the median of several timed
// repetitions after a warm-up. The peak is measured in the same run by a loop of independent FMAs on vector
// registers (no memory traffic), on every thread at once: no real kernel can beat it.
#include "../deepseek_v3.hpp"

#include <chrono>
#include <ctime>
#include <fstream>
#include <functional>
#include <thread>

#if defined(DSV3_BENCH_OPENBLAS) && __has_include(<cblas.h>)
#include <cblas.h>
#define DSV3_HAVE_OPENBLAS 1
extern "C" void openblas_set_num_threads(int);
#else
#define DSV3_HAVE_OPENBLAS 0
#endif

using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

static int thread_count() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static std::string cpu_model() {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("model name", 0) == 0) {
            size_t p = line.find(':');
            return p == std::string::npos ? line : line.substr(p + 2);
        }
    return "unknown CPU";
}

// Peak FP32 FMA throughput: CHAINS independent accumulators per thread, each a vector register, updated by
// acc = acc * m + a (one FMA) in a loop; nothing is loaded or stored inside the loop. Same vector width as the kernel.
#if defined(DSV3_UNROLL)  // the vector-extension kernel is in use
typedef dsv3::gemm::vfloat vpeak;
// Enough chains to cover latency x ports (4-5 cycles x 2 FMA units: at least 10 in flight), few enough that the
// chains and the two constants stay in registers: 12 + 2 of AVX2's 16, 24 + 2 of AVX-512's 32. (16 chains on AVX2
// spilled to the stack, and the "peak" came out below what the GEMM reached.)
constexpr int CHAINS = DSV3_GEMM_VEC == 16 ? 24 : 12;
DSV3_GEMM_FULL_WIDTH static void fma_chains(long iters, float* sink) {
    vpeak acc[CHAINS];
    const vpeak m = vpeak{} + 0.999999f, a = vpeak{} + 1e-7f;
    DSV3_UNROLL for (int c = 0; c < CHAINS; ++c) acc[c] = vpeak{} + float(c);
    for (long it = 0; it < iters; ++it)  // fully unrolled, so that acc[] lives in registers
        DSV3_UNROLL for (int c = 0; c < CHAINS; ++c) acc[c] = acc[c] * m + a;
    float s = 0;
    for (int c = 0; c < CHAINS; ++c)
        for (int l = 0; l < DSV3_GEMM_VEC; ++l) s += acc[c][l];
    *sink = s;
}
static double peak_gflops(int threads) {
    const long iters = 5000000;  // 80 M FMA instructions per thread: about 15-40 ms; the best of 10 runs is kept
    double best = 0;
    for (int rep = 0; rep < 10; ++rep) {
        std::vector<float> sink(size_t(threads), 0.0f);
        auto t0 = Clock::now();
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            fma_chains(iters, &sink[size_t(omp_get_thread_num())]);
#else
            fma_chains(iters, &sink[0]);
#endif
        }
        const double t = seconds_since(t0);
        volatile float keep = sink[0];
        (void)keep;
        best = std::max(best, 2.0 * DSV3_GEMM_VEC * CHAINS * double(iters) * threads / t / 1e9);
    }
    return best;
}
#else
static double peak_gflops(int) { return 0; }
#endif

// Median seconds per call of f: one warm-up call, then `samples` timings, each of enough calls to last >= 2 ms. The
// median ignores the samples in which another process took our core.
static double time_median(const std::function<void()>& f, int samples = 15) {
    f();
    auto t0 = Clock::now();
    f();
    const double one = std::max(seconds_since(t0), 1e-7);
    const int calls = std::max(1, int(0.002 / one));
    std::vector<double> s;
    for (int r = 0; r < samples; ++r) {
        t0 = Clock::now();
        for (int c = 0; c < calls; ++c) f();
        s.push_back(seconds_since(t0) / calls);
    }
    std::sort(s.begin(), s.end());
    return s[s.size() / 2];
}

struct Shape { const char* name; int T, in, out; };

static int bench() {
    const int threads = thread_count();
#if DSV3_HAVE_OPENBLAS
    openblas_set_num_threads(threads);
#endif
    char date[64];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", std::localtime(&now));
    std::printf("dsv3 matmul benchmark   %s\n", date);
    std::printf("CPU: %s   threads: %d (OMP_NUM_THREADS)   tile %dx%d, KC %d, vector %d floats\n",
                cpu_model().c_str(), threads, dsv3::gemm::MR, dsv3::gemm::NR, dsv3::gemm::KC, DSV3_GEMM_VEC);
    const double peak = peak_gflops(threads);
    std::printf("FP32 FMA peak (register-only loop, %d thread%s): %.1f GFLOP/s\n", threads, threads > 1 ? "s" : "",
                peak);
#if DSV3_HAVE_OPENBLAS
    std::printf("OpenBLAS: cblas_sgemm, %d thread%s\n", threads, threads > 1 ? "s" : "");
#else
    std::printf("OpenBLAS: not built in (build with -DDSV3_BENCH_OPENBLAS ... -lopenblas to compare)\n");
#endif
    std::printf("forward: y = x W^T (2*T*in*out FLOP); backward: dx = dy W and dW = dy^T x (4*T*in*out FLOP)\n\n");

    const Shape shapes[] = {
        {"q down", 1024, 128, 64},      {"q up", 1024, 64, 192},        {"kv down", 1024, 128, 48},
        {"kv up", 1024, 32, 256},       {"attn out", 1024, 128, 128},   {"dense gate/up", 1024, 128, 384},
        {"dense down", 1024, 384, 128}, {"expert up", 256, 128, 64},    {"expert down", 256, 64, 128},
        {"output head", 1024, 128, 256}, {"big", 2048, 256, 1024},
    };
    std::printf("%-32s | %-33s | %s\n", "", "forward (GFLOP/s)", "backward (GFLOP/s)");
    std::printf("%-14s %5s %5s %5s | %8s %8s %6s %7s | %8s %8s %6s %7s\n", "layer", "T", "in", "out", "ours", "BLAS",
                "ratio", "%peak", "ours", "BLAS", "ratio", "%peak");
    double log_fwd = 0, log_bwd = 0;
    int n_shapes = 0;
    for (const Shape& s : shapes) {
        const int T = s.T, in = s.in, out = s.out;
        dsv3::Rng rng(42);
        auto random = [&](size_t n) {
            std::vector<float> v(n);
            for (float& e : v) e = float(rng.normal());
            return v;
        };
        std::vector<float> x = random(size_t(T) * in), W = random(size_t(out) * in), dy = random(size_t(T) * out);
        std::vector<float> y(size_t(T) * out), dx(size_t(T) * in, 0.0f), dW(size_t(out) * in, 0.0f);
        const double flops = 2.0 * T * in * out;

        const double f_ours = flops / time_median([&] {
            dsv3::matmul_forward(y.data(), x.data(), W.data(), T, in, out);
        }) / 1e9;
        const double b_ours = 2 * flops / time_median([&] {
            dsv3::matmul_backward(dx.data(), dW.data(), dy.data(), x.data(), W.data(), T, in, out);
        }) / 1e9;
        double f_blas = 0, b_blas = 0;
#if DSV3_HAVE_OPENBLAS
        std::this_thread::sleep_for(std::chrono::milliseconds(10));  // let our idle OpenMP threads stop spinning
        f_blas = flops / time_median([&] {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1.0f, x.data(), in, W.data(), in, 0.0f,
                        y.data(), out);
        }) / 1e9;
        b_blas = 2 * flops / time_median([&] {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out, 1.0f, dy.data(), out, W.data(), in,
                        1.0f, dx.data(), in);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, T, 1.0f, dy.data(), out, x.data(), in, 1.0f,
                        dW.data(), in);
        }) / 1e9;
        // OpenBLAS's worker threads spin for a while after each call; let them go to sleep before timing ours again.
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        log_fwd += std::log(f_ours / f_blas);
        log_bwd += std::log(b_ours / b_blas);
        ++n_shapes;
#endif
        // A table cell: the value, or "-" where there is nothing to compare with.
        auto cell = [](double value, const char* format) {
            char text[32] = "-";
            if (value > 0 && std::isfinite(value)) std::snprintf(text, sizeof text, format, value);
            return std::string(text);
        };
        std::printf("%-14s %5d %5d %5d | %8.1f %8s %6s %7s | %8.1f %8s %6s %7s\n", s.name, T, in, out, f_ours,
                    cell(f_blas, "%.1f").c_str(), cell(f_blas > 0 ? f_ours / f_blas : 0, "%.2f").c_str(),
                    cell(peak > 0 ? 100 * f_ours / peak : 0, "%.0f%%").c_str(), b_ours, cell(b_blas, "%.1f").c_str(),
                    cell(b_blas > 0 ? b_ours / b_blas : 0, "%.2f").c_str(),
                    cell(peak > 0 ? 100 * b_ours / peak : 0, "%.0f%%").c_str());
    }
    if (n_shapes)
        std::printf("\ngeometric mean of ours/OpenBLAS: forward %.2f, backward %.2f\n", std::exp(log_fwd / n_shapes),
                    std::exp(log_bwd / n_shapes));
    return 0;
}

int main(int argc, char** argv) {
    try {
        // No options: the threads come from OMP_NUM_THREADS. Still --help, and an error for anything else.
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            if (k == "--help" || k == "-h") {
                std::printf(
                    "usage: bench [options]\n"
                    "Times the CPU matmul of every linear layer of the tiny model against the machine's FMA peak%s.\n"
                    "  --help, -h            this text\n"
                    "(no other options; the threads: OMP_NUM_THREADS, default all cores)\n",
                    DSV3_HAVE_OPENBLAS ? " and OpenBLAS" : "");
                return 0;
            }
            dsv3::fail("unknown option \"", k, "\" (see bench --help)");
        }
        return bench();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "bench: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "bench: error: unknown exception\n");
        return 1;
    }
}
