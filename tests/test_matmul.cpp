// Tests of the CPU matmul (forward and backward) against the plain triple-loop reference, and of its determinism.
#include <doctest/doctest.h>

#include "../deepseek_v3.hpp"

namespace {

std::vector<float> random_vector(size_t n, uint64_t seed) {
    dsv3::Rng rng(seed);
    std::vector<float> v(n);
    for (float& e : v) e = float(rng.normal());
    return v;
}

// Rigorous bound on the float32 rounding error of one output. In our summation order an output sees at most
// min(K, KC) roundings in its block's FMA chain, ceil(K / KC) more when the block sums are added into C, and the
// float rounding of the double reference adds one more: n ≈ KC + K/KC + 1 roundings of relative size <= 2⁻²⁴ each,
// so |ours - reference| <= n · 2⁻²⁴ · (Σ_k |terms| + |initial value|) to first order, with or without FMA (the 1.01
// covers the second order). For K = 1000 that is 137 · 2⁻²⁴ ≈ 8e-6 relative to
// Σ|terms|; typical errors are ~√n smaller. The test cannot flake, and a wrong product (a term missing, doubled or
// misplaced) is off by O(|term|), orders of magnitude above it.
double tolerance(int K, double abs_sum) {
    const int n_add = std::min(K, dsv3::gemm::KC) + (K + dsv3::gemm::KC - 1) / dsv3::gemm::KC + 1;
    return 1.01 * n_add * 0x1p-24 * abs_sum + 1e-30;
}

struct Problem {
    int T, in, out;
    std::vector<float> x, W, dy;
    Problem(int T_, int in_, int out_, uint64_t seed)
        : T(T_), in(in_), out(out_), x(random_vector(size_t(T) * in, seed)),
          W(random_vector(size_t(out) * in, seed + 1)), dy(random_vector(size_t(T) * out, seed + 2)) {}
};

// Largest |error| / tolerance over all outputs of forward, dx and dW (each accumulating onto a random start).
double worst_error_ratio(const Problem& p) {
    const int T = p.T, in = p.in, out = p.out;
    double worst = 0;
    std::vector<float> y(size_t(T) * out, 123.0f), y_ref(size_t(T) * out);
    dsv3::matmul_forward(y.data(), p.x.data(), p.W.data(), T, in, out);
    dsv3::matmul_forward_reference(y_ref.data(), p.x.data(), p.W.data(), T, in, out);
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < out; ++o) {
            double abs_sum = 0;
            for (int i = 0; i < in; ++i) abs_sum += std::fabs(double(p.x[size_t(t) * in + i]) * p.W[size_t(o) * in + i]);
            const double err = std::fabs(double(y[size_t(t) * out + o]) - y_ref[size_t(t) * out + o]);
            worst = std::max(worst, err / tolerance(in, abs_sum));
        }

    const std::vector<float> dx0 = random_vector(size_t(T) * in, 7), dW0 = random_vector(size_t(out) * in, 8);
    std::vector<float> dx = dx0, dW = dW0, dx_ref = dx0, dW_ref = dW0;
    dsv3::matmul_backward(dx.data(), dW.data(), p.dy.data(), p.x.data(), p.W.data(), T, in, out);
    dsv3::matmul_backward_reference(dx_ref.data(), dW_ref.data(), p.dy.data(), p.x.data(), p.W.data(), T, in, out);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < in; ++i) {
            double abs_sum = std::fabs(dx0[size_t(t) * in + i]);
            for (int o = 0; o < out; ++o) abs_sum += std::fabs(double(p.dy[size_t(t) * out + o]) * p.W[size_t(o) * in + i]);
            const double err = std::fabs(double(dx[size_t(t) * in + i]) - dx_ref[size_t(t) * in + i]);
            worst = std::max(worst, err / tolerance(out, abs_sum));
        }
    for (int o = 0; o < out; ++o)
        for (int i = 0; i < in; ++i) {
            double abs_sum = std::fabs(dW0[size_t(o) * in + i]);
            for (int t = 0; t < T; ++t) abs_sum += std::fabs(double(p.dy[size_t(t) * out + o]) * p.x[size_t(t) * in + i]);
            const double err = std::fabs(double(dW[size_t(o) * in + i]) - dW_ref[size_t(o) * in + i]);
            worst = std::max(worst, err / tolerance(T, abs_sum));
        }
    return worst;
}

#ifdef _OPENMP
struct Threads {  // set the OpenMP thread count for a scope
    int saved = omp_get_max_threads();
    explicit Threads(int n) { omp_set_num_threads(n); }
    ~Threads() { omp_set_num_threads(saved); }
};
#endif

struct Outputs { std::vector<float> y, dx, dW; };
Outputs run_all(const Problem& p) {
    Outputs r{std::vector<float>(size_t(p.T) * p.out), random_vector(size_t(p.T) * p.in, 11),
              random_vector(size_t(p.out) * p.in, 12)};
    dsv3::matmul_forward(r.y.data(), p.x.data(), p.W.data(), p.T, p.in, p.out);
    dsv3::matmul_backward(r.dx.data(), r.dW.data(), p.dy.data(), p.x.data(), p.W.data(), p.T, p.in, p.out);
    return r;
}
bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("matmul: forward and backward match the reference on small, odd and model shapes") {
    const int sizes[] = {1, 3, 17, 65};
    uint64_t seed = 100;
    for (int T : sizes)
        for (int in : sizes)
            for (int out : sizes) {
                CAPTURE(T); CAPTURE(in); CAPTURE(out);
                CHECK(worst_error_ratio(Problem(T, in, out, seed++)) <= 1.0);
            }
    // Edge tiles in every direction, many K blocks (KC = 128), more than one packed block of B (K x N > 2^19), the
    // few-rows forward (T < 64), and shapes of the tiny model.
    const int shapes[][3] = {{129, 1000, 33}, {1000, 129, 31}, {29, 300, 1030}, {70, 1000, 600},
                             {1024, 128, 48}, {256, 64, 128},  {16, 513, 130},  {300, 17, 1}};
    for (const auto& s : shapes) {
        CAPTURE(s[0]); CAPTURE(s[1]); CAPTURE(s[2]);
        CHECK(worst_error_ratio(Problem(s[0], s[1], s[2], seed++)) <= 1.0);
    }
}

TEST_CASE("matmul: forward overwrites y, backward accumulates, null gradients are skipped, empty shapes are safe") {
    Problem p(5, 7, 3, 1);
    std::vector<float> y(15, std::nanf("")), y_ref(15);
    dsv3::matmul_forward(y.data(), p.x.data(), p.W.data(), 5, 7, 3);  // NaNs in y must not leak in
    dsv3::matmul_forward_reference(y_ref.data(), p.x.data(), p.W.data(), 5, 7, 3);
    for (int i = 0; i < 15; ++i) CHECK(y[i] == doctest::Approx(y_ref[i]).epsilon(1e-5));

    std::vector<float> dx(35, 1.0f), dW(21, 2.0f);
    dsv3::matmul_backward(dx.data(), nullptr, p.dy.data(), p.x.data(), p.W.data(), 5, 7, 3);
    dsv3::matmul_backward(nullptr, dW.data(), p.dy.data(), p.x.data(), p.W.data(), 5, 7, 3);
    std::vector<float> dx_ref(35, 1.0f), dW_ref(21, 2.0f);
    dsv3::matmul_backward_reference(dx_ref.data(), dW_ref.data(), p.dy.data(), p.x.data(), p.W.data(), 5, 7, 3);
    for (int i = 0; i < 35; ++i) CHECK(dx[i] == doctest::Approx(dx_ref[i]).epsilon(1e-5));
    for (int i = 0; i < 21; ++i) CHECK(dW[i] == doctest::Approx(dW_ref[i]).epsilon(1e-5));

    std::vector<float> z(6, 5.0f);
    dsv3::matmul_forward(z.data(), nullptr, nullptr, 2, 0, 3);  // in = 0: an empty sum, y = 0
    for (float v : z) CHECK(v == 0.0f);
    dsv3::matmul_forward(nullptr, nullptr, nullptr, 0, 4, 3);  // T = 0: nothing to do
    dsv3::matmul_backward(z.data(), z.data(), nullptr, nullptr, nullptr, 0, 2, 3);
    for (float v : z) CHECK(v == 0.0f);
}

TEST_CASE("matmul: a row's result does not depend on the batch around it") {
    // Every row has the same summation order, whether the forward packs W (many rows) or x (a few rows): decoding a
    // token alone gives bitwise the logits it gets inside a batch.
    const int T = 150, in = 300, out = 70;
    Problem p(T, in, out, 5);
    std::vector<float> y(size_t(T) * out), y_part(size_t(T) * out);
    dsv3::matmul_forward(y.data(), p.x.data(), p.W.data(), T, in, out);
    for (int t0 = 0, n = 1; t0 < T; t0 += n, n = std::min(2 * n + 1, T - t0))  // batches of 1, 3, 7, ..., 63, rest
        dsv3::matmul_forward(y_part.data() + size_t(t0) * out, p.x.data() + size_t(t0) * in, p.W.data(), n, in, out);
    CHECK(bitwise_equal(y, y_part));
}

#ifdef _OPENMP
TEST_CASE("matmul: results are bitwise identical for 1, 2 and 3 threads") {
    const int shapes[][3] = {{1, 3, 17},      {65, 129, 17},  {129, 65, 1000},
                             {1000, 300, 33}, {17, 1000, 65}, {70, 1000, 600}};
    for (const auto& s : shapes) {
        CAPTURE(s[0]); CAPTURE(s[1]); CAPTURE(s[2]);
        Problem p(s[0], s[1], s[2], 9);
        Outputs one, two, three;
        { Threads th(1); one = run_all(p); }
        { Threads th(2); two = run_all(p); }
        { Threads th(3); three = run_all(p); }
        CHECK(bitwise_equal(one.y, two.y));
        CHECK(bitwise_equal(one.dx, two.dx));
        CHECK(bitwise_equal(one.dW, two.dW));
        CHECK(bitwise_equal(one.y, three.y));
        CHECK(bitwise_equal(one.dx, three.dx));
        CHECK(bitwise_equal(one.dW, three.dW));
    }
}

TEST_CASE("matmul: called from inside a parallel loop (e.g. one expert per thread), results are unchanged") {
    Problem p(65, 129, 33, 4);
    const Outputs alone = run_all(p);
    std::vector<Outputs> nested(4);
    Threads th(2);
    dsv3::parallel_for(4, [&](int64_t e) { nested[size_t(e)] = run_all(p); });
    for (const Outputs& r : nested) {
        CHECK(bitwise_equal(alone.y, r.y));
        CHECK(bitwise_equal(alone.dx, r.dx));
        CHECK(bitwise_equal(alone.dW, r.dW));
    }
}
#endif
