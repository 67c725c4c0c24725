// Kernel tests: every backward of section 3 (kernels) against finite differences, and the forwards against formulas
// written out here independently (in double, from the equations of the papers, not from the header's code).
//
// Gradients: each check turns a kernel's output y into the scalar loss Σ w ⊙ y with fixed random weights w (so the
// upstream gradient is w) and compares the backward's result with central differences, through gradcheck::check.
// Its default tolerances (|analytic − numeric| ≤ 2e-3 + 2e-2·|numeric| per entry, and the norm of all differences
// within 1% of the gradient's norm) are explained in gradcheck.hpp: float32 kernels, ε = 1e-2 on O(1) inputs. Every
// gradient buffer except rope's in-place one is pre-filled with a non-zero constant first, which is subtracted
// before the comparison: that also checks the ACCUMULATE (+=) convention of the header.
//
// Forwards: compared in double with tolerances a few float32 ulps wide times the size of the sums (1e-5 absolute
// on O(1) values), or exactly where the result is discrete (routing, permutation, bias updates) or a float formula
// with the same rounding (LR schedule endpoints, compared to within 1e-6 relative).
//
// Determinism: matmul, attention and RMSNorm backward must give bitwise identical results on 1 and 2 threads.
//
// All sizes are tiny: the whole file runs in well under a second.
#include "gradcheck.hpp"

#include <cstring>
#include <set>
#ifdef _OPENMP
#include <omp.h>
#endif

using namespace dsv3;

namespace {

// ----------------------------------------------------------------------------------------------------------------
// helpers
// ----------------------------------------------------------------------------------------------------------------
constexpr float kPrefill = 0.25f;  // gradients are accumulated onto this, then it is subtracted

std::vector<float> filled(size_t n, float v = kPrefill) { return std::vector<float>(n, v); }
std::vector<float> minus_prefill(std::vector<float> g, float v = kPrefill) {
    for (float& x : g) x -= v;
    return g;
}

void expect_gradient(float* x, size_t n, const std::vector<float>& analytic, const std::function<double()>& loss,
                     const char* what, int samples = 0) {
    REQUIRE(analytic.size() == n);
    gradcheck::Result r = gradcheck::check(x, n, analytic, loss, samples);
    INFO(what, ": max abs err ", r.max_abs_err, ", max rel err ", r.max_rel_err, ", rel norm err ", r.rel_norm_err,
         ", checked ", r.checked);
    CHECK(r.checked > 0);
    CHECK(r.failed == 0);
    CHECK(r.rel_norm_err < 1e-2);
}

// Positive values in (lo, hi), e.g. router scores.
std::vector<float> random_positive(size_t n, uint64_t seed, float lo, float hi) {
    Rng rng(seed);
    std::vector<float> v(n);
    for (float& x : v) x = lo + float(rng.uniform()) * (hi - lo);
    return v;
}

// K distinct experts out of N for each of T tokens (a random choice; the kernels do not care how it was made).
std::vector<int32_t> random_choice(int T, int K, int N, uint64_t seed) {
    Rng rng(seed);
    std::vector<int32_t> chosen;
    for (int t = 0; t < T; ++t) {
        std::vector<int32_t> all(static_cast<size_t>(N));
        for (int i = 0; i < N; ++i) all[size_t(i)] = i;
        for (int k = 0; k < K; ++k) {  // partial Fisher-Yates
            size_t j = size_t(k) + size_t(rng.below(uint64_t(N - k)));
            std::swap(all[size_t(k)], all[j]);
            chosen.push_back(all[size_t(k)]);
        }
    }
    return chosen;
}

Config router_config(int N, int K, int G, int limited, const char* score_func, bool norm, float route_scale) {
    Config c;
    c.n_routed_experts = N; c.n_activated_experts = K; c.n_expert_groups = G; c.n_limited_groups = limited;
    c.score_func = score_func; c.norm_topk_prob = norm; c.route_scale = route_scale;
    c.validate();
    return c;
}

// Runs f() with `threads` OpenMP threads and restores the previous setting.
template <class F>
auto with_threads(int threads, F f) {
#ifdef _OPENMP
    const int previous = omp_get_max_threads();
    omp_set_num_threads(threads);
    auto result = f();
    omp_set_num_threads(previous);
    return result;
#else
    (void)threads;
    return f();
#endif
}
bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Naive causal attention in double: out[b,t,h] = Σ_{s≤t} softmax_s(scale · q_t·k_s) v_s.
std::vector<double> naive_attention(const std::vector<float>& q, const std::vector<float>& k,
                                    const std::vector<float>& v, int B, int T, int H, int dqk, int dv, double scale) {
    std::vector<double> out(size_t(B) * T * H * dv, 0.0);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int t = 0; t < T; ++t) {
                std::vector<double> w(size_t(t) + 1);
                double mx = -1e300, sum = 0;
                for (int s = 0; s <= t; ++s) {
                    double dot = 0;
                    for (int i = 0; i < dqk; ++i)
                        dot += double(q[((size_t(b) * T + t) * H + h) * dqk + i]) *
                               double(k[((size_t(b) * T + s) * H + h) * dqk + i]);
                    w[size_t(s)] = dot * scale;
                    mx = std::max(mx, w[size_t(s)]);
                }
                for (double& x : w) sum += (x = std::exp(x - mx));
                for (int s = 0; s <= t; ++s)
                    for (int i = 0; i < dv; ++i)
                        out[((size_t(b) * T + t) * H + h) * dv + i] +=
                            w[size_t(s)] / sum * double(v[((size_t(b) * T + s) * H + h) * dv + i]);
            }
    return out;
}

// YaRN frequencies written out from YaRN (Peng et al. 2023, arXiv 2309.00071: the NTK-by-parts ramp between the
// correction dimensions of beta_fast and beta_slow) and the official inference code's find_correction_range
// (DeepSeek-V3 inference/model.py).
std::vector<double> yarn_theta_reference(int D, double base, double factor, int original_len, double beta_fast,
                                         double beta_slow) {
    const double pi = 3.14159265358979323846;
    std::vector<double> theta(size_t(D / 2));
    for (int i = 0; i < D / 2; ++i) theta[size_t(i)] = std::pow(base, -2.0 * i / D);
    if (factor <= 1) return theta;
    auto find_dim = [&](double r) { return D * std::log(original_len / (2 * pi * r)) / (2 * std::log(base)); };
    double low = std::floor(find_dim(beta_fast)), high = std::ceil(find_dim(beta_slow));
    low = std::max(low, 0.0);
    high = std::min(high, double(D - 1));
    if (high == low) high += 0.001;
    for (int i = 0; i < D / 2; ++i) {
        double ramp = std::min(1.0, std::max(0.0, (i - low) / (high - low)));
        theta[size_t(i)] = theta[size_t(i)] / factor * ramp + theta[size_t(i)] * (1 - ramp);
    }
    return theta;
}

// ================================================================================================================
// 3.1 matmul
// ================================================================================================================
TEST_CASE("kernels: matmul forward matches a double loop, backward (dx, dW) matches finite differences") {
    const int T = 5, in = 7, out = 3;  // odd shapes
    std::vector<float> x = gradcheck::random_vector(size_t(T) * in, 1), W = gradcheck::random_vector(size_t(out) * in, 2);
    std::vector<float> w = gradcheck::random_vector(size_t(T) * out, 3), y(size_t(T) * out);
    matmul_forward(y.data(), x.data(), W.data(), T, in, out);
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < out; ++o) {
            double s = 0;
            for (int i = 0; i < in; ++i) s += double(x[size_t(t) * in + i]) * W[size_t(o) * in + i];
            CHECK(y[size_t(t) * out + o] == doctest::Approx(s).epsilon(1e-5));
        }
    auto loss = [&] {
        matmul_forward(y.data(), x.data(), W.data(), T, in, out);
        return gradcheck::weighted_sum(y.data(), w);
    };
    std::vector<float> dx = filled(x.size()), dW = filled(W.size());
    matmul_backward(dx.data(), dW.data(), w.data(), x.data(), W.data(), T, in, out);
    expect_gradient(x.data(), x.size(), minus_prefill(dx), loss, "matmul dx");
    expect_gradient(W.data(), W.size(), minus_prefill(dW), loss, "matmul dW");
    // either gradient may be null
    std::vector<float> dx_only(x.size(), 0.0f), dW_only(W.size(), 0.0f);
    matmul_backward(dx_only.data(), nullptr, w.data(), x.data(), W.data(), T, in, out);
    matmul_backward(nullptr, dW_only.data(), w.data(), x.data(), W.data(), T, in, out);
    for (size_t i = 0; i < dx.size(); ++i) CHECK(dx_only[i] == doctest::Approx(dx[i] - kPrefill).epsilon(1e-5));
    for (size_t i = 0; i < dW.size(); ++i) CHECK(dW_only[i] == doctest::Approx(dW[i] - kPrefill).epsilon(1e-5));
}

TEST_CASE("kernels: grouped_matmul runs each group's rows through its own strided weight; backward matches finite differences") {
    const int in = 5, out = 3, groups = 3;
    const std::vector<int64_t> offsets = {0, 2, 2, 6};  // group 1 has no rows
    const int64_t stride = int64_t(out) * in + 4, T = offsets.back();  // 4 unrelated floats between the weights
    std::vector<float> x = gradcheck::random_vector(size_t(T) * in, 11), W = gradcheck::random_vector(size_t(stride) * groups, 12);
    std::vector<float> w = gradcheck::random_vector(size_t(T) * out, 13), y(size_t(T) * out);
    grouped_matmul_forward(y.data(), x.data(), W.data(), stride, offsets.data(), groups, in, out);
    for (int g = 0; g < groups; ++g)
        for (int64_t t = offsets[size_t(g)]; t < offsets[size_t(g) + 1]; ++t)
            for (int o = 0; o < out; ++o) {
                double s = 0;
                for (int i = 0; i < in; ++i) s += double(x[size_t(t) * in + i]) * W[size_t(g * stride + o * in + i)];
                CHECK(y[size_t(t) * out + o] == doctest::Approx(s).epsilon(1e-5));
            }
    auto loss = [&] {
        grouped_matmul_forward(y.data(), x.data(), W.data(), stride, offsets.data(), groups, in, out);
        return gradcheck::weighted_sum(y.data(), w);
    };
    std::vector<float> dx = filled(x.size()), dW = filled(W.size());
    grouped_matmul_backward(dx.data(), dW.data(), w.data(), x.data(), W.data(), stride, offsets.data(), groups, in, out);
    expect_gradient(x.data(), x.size(), minus_prefill(dx), loss, "grouped matmul dx");
    expect_gradient(W.data(), W.size(), minus_prefill(dW), loss, "grouped matmul dW");  // the gaps' gradient: 0
    // bad offsets are named, not skipped silently
    const std::vector<int64_t> decreasing = {0, 4, 2, 6}, shifted = {1, 2, 2, 6};
    CHECK_THROWS_WITH_AS(grouped_matmul_forward(y.data(), x.data(), W.data(), stride, decreasing.data(), groups, in, out),
                         doctest::Contains("offsets must not decrease"), dsv3::Error);
    CHECK_THROWS_WITH_AS(grouped_matmul_backward(dx.data(), dW.data(), w.data(), x.data(), W.data(), stride,
                                                 shifted.data(), groups, in, out),
                         doctest::Contains("offsets[0] must be 0"), dsv3::Error);
}

TEST_CASE("kernels: gather_rows and scatter_rows copy whole rows by an index list") {
    const int d = 3;
    const std::vector<float> src = {0, 1, 2, 10, 11, 12, 20, 21, 22};
    const std::vector<int32_t> rows = {2, 0, 2};
    std::vector<float> got(rows.size() * d);
    gather_rows(got.data(), src.data(), rows.data(), int64_t(rows.size()), d);
    CHECK(got == std::vector<float>{20, 21, 22, 0, 1, 2, 20, 21, 22});
    std::vector<float> back(9, -1.0f);
    const std::vector<int32_t> to = {1, 2};
    scatter_rows(back.data(), got.data(), to.data(), 2, d);
    CHECK(back == std::vector<float>{-1, -1, -1, 20, 21, 22, 0, 1, 2});
}

// ================================================================================================================
// 3.2 RMSNorm
// ================================================================================================================
TEST_CASE("kernels: RMSNorm forward matches the double formula, backward (dx, dg) matches finite differences") {
    const int T = 4, d = 9;
    const float eps = 1e-6f;
    std::vector<float> x = gradcheck::random_vector(size_t(T) * d, 11), g = gradcheck::random_vector(d, 12);
    for (float& v : g) v += 1.0f;  // gains around 1, as trained
    std::vector<float> w = gradcheck::random_vector(size_t(T) * d, 13), y(x.size()), rstd(T);
    rmsnorm_forward(y.data(), rstd.data(), x.data(), g.data(), T, d, eps);
    for (int t = 0; t < T; ++t) {
        double ms = 0;
        for (int i = 0; i < d; ++i) ms += double(x[size_t(t) * d + i]) * x[size_t(t) * d + i];
        const double r = 1.0 / std::sqrt(ms / d + eps);
        CHECK(rstd[size_t(t)] == doctest::Approx(r).epsilon(1e-5));
        for (int i = 0; i < d; ++i) CHECK(y[size_t(t) * d + i] == doctest::Approx(x[size_t(t) * d + i] * r * g[size_t(i)]).epsilon(1e-5));
    }
    auto loss = [&] {
        rmsnorm_forward(y.data(), rstd.data(), x.data(), g.data(), T, d, eps);
        return gradcheck::weighted_sum(y.data(), w);
    };
    loss();
    std::vector<float> dx = filled(x.size()), dg = filled(g.size());
    rmsnorm_backward(dx.data(), dg.data(), w.data(), x.data(), g.data(), rstd.data(), T, d);
    expect_gradient(x.data(), x.size(), minus_prefill(dx), loss, "rmsnorm dx");
    expect_gradient(g.data(), g.size(), minus_prefill(dg), loss, "rmsnorm dg");
}

// ================================================================================================================
// 3.3 RoPE and YaRN
// ================================================================================================================
Config rope_config(bool yarn) {
    Config c;
    c.qk_rope_head_dim = 8;
    if (yarn) { c.rope_factor = 40; c.original_seq_len = 64; }  // find_dim: low 0, high 2: a real ramp over 4 pairs
    c.validate();
    return c;
}

TEST_CASE("kernels: RoPE rotates consecutive pairs by pos·θ_i, θ_i = base^(-2i/D), and its backward is exact") {
    for (bool yarn : {false, true}) {
        CAPTURE(yarn);
        const Config c = rope_config(yarn);
        const int D = c.qk_rope_head_dim, H = 2, nope = 3, dqk = nope + D, row = H * dqk;
        const int B = 2, seq = 3, T = B * seq, pos0 = 2;
        RopeTable rt = make_rope_table(c, pos0 + seq);
        const std::vector<double> theta =
            yarn_theta_reference(D, c.rope_theta, c.rope_factor, c.original_seq_len, c.beta_fast, c.beta_slow);
        std::vector<float> x = gradcheck::random_vector(size_t(T) * row, 21), w = gradcheck::random_vector(x.size(), 22);
        std::vector<float> y = x;
        rope_forward(y.data(), T, row, nope, H, dqk, pos0, seq, rt);
        for (int t = 0; t < T; ++t) {
            const int pos = pos0 + t % seq;
            for (int h = 0; h < H; ++h) {
                const size_t base = size_t(t) * row + size_t(h) * dqk;
                for (int i = 0; i < nope; ++i) CHECK(y[base + i] == x[base + i]);  // the nope part is untouched
                for (int i = 0; i < D / 2; ++i) {
                    const double a = x[base + nope + 2 * i], b = x[base + nope + 2 * i + 1], ang = pos * theta[size_t(i)];
                    CHECK(y[base + nope + 2 * i] == doctest::Approx(a * std::cos(ang) - b * std::sin(ang)).epsilon(1e-5));
                    CHECK(y[base + nope + 2 * i + 1] == doctest::Approx(a * std::sin(ang) + b * std::cos(ang)).epsilon(1e-5));
                }
            }
        }
        auto loss = [&] {
            y = x;
            rope_forward(y.data(), T, row, nope, H, dqk, pos0, seq, rt);
            return gradcheck::weighted_sum(y.data(), w);
        };
        std::vector<float> dx = w;  // rope_backward works in place on the incoming gradient
        rope_backward(dx.data(), T, row, nope, H, dqk, pos0, seq, rt);
        expect_gradient(x.data(), x.size(), dx, loss, yarn ? "rope dx (YaRN)" : "rope dx");
        // positions beyond the table are an error, not a silent read past the end
        CHECK_THROWS_AS(rope_forward(y.data(), T, row, nope, H, dqk, pos0 + 1, seq, rt), dsv3::Error);
    }
}

TEST_CASE("kernels: YaRN frequencies follow YaRN (Peng et al. 2023) (low/high/ramp recomputed here in double)") {
    struct Case { const char* name; int D; double base, factor; int L; };
    const Case cases[] = {
        {"V3 (D 64, L 4096, s 40)", 64, 10000, 40, 4096},
        {"small (D 8, L 64)", 8, 10000, 40, 64},
        {"high == low (D 16, L 4)", 16, 10000, 40, 4},
        {"other base (D 16, L 512, base 500)", 16, 500, 8, 512},
        {"no YaRN", 16, 10000, 1, 4096},
    };
    for (const Case& k : cases) {
        CAPTURE(k.name);
        Config c;
        c.qk_rope_head_dim = k.D; c.rope_theta = float(k.base); c.rope_factor = float(k.factor);
        c.original_seq_len = k.L;
        c.validate();
        const std::vector<double> got = rope_frequencies(c);
        const std::vector<double> want =
            yarn_theta_reference(k.D, c.rope_theta, c.rope_factor, k.L, c.beta_fast, c.beta_slow);
        REQUIRE(got.size() == want.size());
        for (size_t i = 0; i < got.size(); ++i) {
            CAPTURE(i);
            CHECK(got[i] == doctest::Approx(want[i]).epsilon(1e-12));
        }
    }
    // Hand-derived anchors for V3: find_dim(32) = 10.47 → low 10, find_dim(1) = 22.51 → high 23. Pairs up to 10 keep
    // their frequency, pairs from 23 on are slowed by exactly s = 40.
    const Config v3 = Config::v3_671b();
    const std::vector<double> th = rope_frequencies(v3);
    REQUIRE(th.size() == 32);
    for (int i = 0; i <= 10; ++i) CHECK(th[size_t(i)] == doctest::Approx(std::pow(10000.0, -2.0 * i / 64)).epsilon(1e-12));
    for (int i = 23; i < 32; ++i)
        CHECK(th[size_t(i)] == doctest::Approx(std::pow(10000.0, -2.0 * i / 64) / 40).epsilon(1e-12));
    CHECK(th[16] < std::pow(10000.0, -32.0 / 64));  // inside the ramp: slowed, but by less than s
    CHECK(th[16] > std::pow(10000.0, -32.0 / 64) / 40);
}

TEST_CASE("kernels: attention_scale is (d_h + d_h^R)^-1/2, times m² under YaRN, m = 0.1·mscale·ln(s) + 1") {
    Config v3 = Config::v3_671b();
    const double m3 = 0.1 * 1.0 * std::log(40.0) + 1;
    CHECK(attention_scale(v3) == doctest::Approx(m3 * m3 / std::sqrt(192.0)).epsilon(1e-6));
    Config v2 = Config::v2_lite();
    const double m2 = 0.1 * double(0.707f) * std::log(40.0) + 1;
    CHECK(attention_scale(v2) == doctest::Approx(m2 * m2 / std::sqrt(192.0)).epsilon(1e-6));
    Config plain = Config::tiny();  // rope_factor 1: no YaRN, no mscale
    CHECK(attention_scale(plain) == doctest::Approx(1.0 / std::sqrt(48.0)).epsilon(1e-6));
}

// ================================================================================================================
// 3.4 causal attention
// ================================================================================================================
TEST_CASE("kernels: attention forward matches naive double attention and is causal") {
    const int B = 2, T = 5, H = 2, dqk = 6, dv = 4;
    const float scale = 0.4f;
    std::vector<float> q = gradcheck::random_vector(size_t(B) * T * H * dqk, 31, 1.5f);
    std::vector<float> k = gradcheck::random_vector(q.size(), 32, 1.5f), v = gradcheck::random_vector(size_t(B) * T * H * dv, 33);
    std::vector<float> out(v.size()), probs(size_t(B) * H * T * T);
    attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), B, T, H, dqk, dv, scale);
    const std::vector<double> ref = naive_attention(q, k, v, B, T, H, dqk, dv, scale);
    for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == doctest::Approx(ref[i]).epsilon(1e-5));
    for (int b = 0; b < B; ++b)  // each probability row sums to 1 over s ≤ t and is 0 beyond
        for (int h = 0; h < H; ++h)
            for (int t = 0; t < T; ++t) {
                const float* p = probs.data() + ((size_t(b) * H + h) * T + t) * T;
                double s = 0;
                for (int j = 0; j <= t; ++j) s += p[j];
                CHECK(s == doctest::Approx(1.0).epsilon(1e-6));
                for (int j = t + 1; j < T; ++j) CHECK(p[j] == 0.0f);
            }
    // causality: changing key and value at position 3 of sequence 0 leaves positions 0..2 (and sequence 1) unchanged
    const int changed = 3;
    std::vector<float> k2 = k, v2 = v, out2(out.size()), probs2(probs.size());
    for (int h = 0; h < H; ++h) {
        for (int i = 0; i < dqk; ++i) k2[((size_t(0) * T + changed) * H + h) * dqk + i] += 0.7f;
        for (int i = 0; i < dv; ++i) v2[((size_t(0) * T + changed) * H + h) * dv + i] -= 0.9f;
    }
    attention_forward(out2.data(), probs2.data(), q.data(), k2.data(), v2.data(), B, T, H, dqk, dv, scale);
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < H; ++h) {
                const size_t o = ((size_t(b) * T + t) * H + h) * dv;
                const bool same = std::memcmp(&out[o], &out2[o], sizeof(float) * dv) == 0;
                CAPTURE(b); CAPTURE(t); CAPTURE(h);
                CHECK(same == (b == 1 || t < changed));
            }
}

TEST_CASE("kernels: attention backward (dq, dk, dv) matches finite differences") {
    const int B = 2, T = 5, H = 2, dqk = 6, dv = 4;  // dqk != dv on purpose
    const float scale = 0.45f;
    std::vector<float> q = gradcheck::random_vector(size_t(B) * T * H * dqk, 41, 1.5f);
    std::vector<float> k = gradcheck::random_vector(q.size(), 42, 1.5f), v = gradcheck::random_vector(size_t(B) * T * H * dv, 43);
    std::vector<float> w = gradcheck::random_vector(v.size(), 44), out(v.size()), probs(size_t(B) * H * T * T);
    auto loss = [&] {
        attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), B, T, H, dqk, dv, scale);
        return gradcheck::weighted_sum(out.data(), w);
    };
    loss();
    std::vector<float> dq = filled(q.size()), dk = filled(k.size()), dvv = filled(v.size());
    attention_backward(dq.data(), dk.data(), dvv.data(), w.data(), out.data(), probs.data(), q.data(), k.data(),
                       v.data(), B, T, H, dqk, dv, scale);
    expect_gradient(q.data(), q.size(), minus_prefill(dq), loss, "attention dq");
    expect_gradient(k.data(), k.size(), minus_prefill(dk), loss, "attention dk");
    expect_gradient(v.data(), v.size(), minus_prefill(dvv), loss, "attention dv");
}

TEST_CASE("kernels: exp_fast is within 2 ulp of e^x on [-87, 88], 0 below, NaN stays NaN; sum8 is a sum") {
    double worst = 0;  // relative error against e^x in double, over 2^22 evenly spaced points
    for (int i = 0; i <= (1 << 22); ++i) {
        const float x = -87.0f + 175.0f * float(i) / float(1 << 22);
        const double want = std::exp(double(x));
        worst = std::max(worst, std::abs(double(exp_fast(x)) - want) / want);
    }
    CHECK(worst < 2 * 0x1p-23);  // 2 ulp of a float in [1, 2)
    CHECK(exp_fast(0.0f) == 1.0f);
    CHECK(exp_fast(-88.0f) == 0.0f);
    CHECK(exp_fast(-INFINITY) == 0.0f);
    CHECK(std::isfinite(exp_fast(1000.0f)));  // clamped at e^88: softmax and sigmoid never meet inf
    CHECK(std::isnan(exp_fast(NAN)));
    const std::vector<float> a = gradcheck::random_vector(37, 7);
    double want = 0;
    for (float x : a) want += x;
    CHECK(sum8(37, [&](int i) { return a[size_t(i)]; }) == doctest::Approx(want).epsilon(1e-6));
}

// ================================================================================================================
// 3.5 SwiGLU, 3.6 embedding, 3.7 cross-entropy
// ================================================================================================================
TEST_CASE("kernels: SwiGLU forward is silu(gate)·up, backward matches finite differences, for separate gate and "
          "up (ld = w) and for the halves of one [gate; up] product (ld = 2w)") {
    const int64_t rows = 30;
    const int w = 50;
    for (int ld : {w, 2 * w}) {
        CAPTURE(ld);
        // gu: both inputs in one buffer; ld = w: gate is its first rows·w floats, up the rest; ld = 2w: row r holds
        // gate then up
        std::vector<float> gu = gradcheck::random_vector(size_t(rows) * 2 * w, 51, 4.0f);
        std::vector<float> wt = gradcheck::random_vector(size_t(rows) * w, 53), h(size_t(rows) * w);
        const size_t up_at = ld == w ? size_t(rows) * w : size_t(w);
        swiglu_forward(h.data(), gu.data(), gu.data() + up_at, rows, w, ld);
        for (int64_t r = 0; r < rows; ++r)
            for (int j = 0; j < w; ++j) {
                const double z = gu[size_t(r * ld + j)], u = gu[up_at + size_t(r * ld + j)];
                CHECK(h[size_t(r * w + j)] == doctest::Approx(z / (1 + std::exp(-z)) * u).epsilon(1e-5));
            }
        auto loss = [&] {
            swiglu_forward(h.data(), gu.data(), gu.data() + up_at, rows, w, ld);
            return gradcheck::weighted_sum(h.data(), wt);
        };
        std::vector<float> dgu = filled(gu.size());
        swiglu_backward(dgu.data(), dgu.data() + up_at, wt.data(), gu.data(), gu.data() + up_at, rows, w, ld);
        expect_gradient(gu.data(), gu.size(), minus_prefill(dgu), loss, "swiglu dgate, dup");
    }
}

TEST_CASE("kernels: embedding backward with repeated tokens matches finite differences") {
    const int vocab = 7, d = 5, T = 9;
    const std::vector<int32_t> tokens = {3, 1, 3, 0, 6, 3, 1, 2, 3};  // 4 and 5 unused, 3 four times
    std::vector<float> E = gradcheck::random_vector(size_t(vocab) * d, 61), w = gradcheck::random_vector(size_t(T) * d, 62);
    std::vector<float> out(size_t(T) * d);
    auto loss = [&] {
        embedding_forward(out.data(), tokens.data(), E.data(), T, d, vocab);
        return gradcheck::weighted_sum(out.data(), w);
    };
    loss();
    for (int t = 0; t < T; ++t)
        CHECK(std::memcmp(&out[size_t(t) * d], &E[size_t(tokens[size_t(t)]) * d], sizeof(float) * d) == 0);
    std::vector<float> dE = filled(E.size());
    embedding_backward(dE.data(), w.data(), tokens.data(), T, d);
    const std::vector<float> g = minus_prefill(dE);
    for (int i = 0; i < d; ++i) CHECK(dE[size_t(4) * d + i] == kPrefill);  // unused rows untouched
    expect_gradient(E.data(), E.size(), g, loss, "embedding dE");
    const std::vector<int32_t> bad = {1, 7};
    CHECK_THROWS_AS(embedding_forward(out.data(), bad.data(), E.data(), 2, d, vocab), dsv3::Error);
}

TEST_CASE("kernels: cross-entropy is the mean over counted rows of -log softmax, backward matches") {
    const int T = 6, V = 7;
    const std::vector<int32_t> targets = {2, kIgnore, 0, 6, kIgnore, 3};
    std::vector<float> logits = gradcheck::random_vector(size_t(T) * V, 71, 3.0f);
    double want = 0;
    int counted = 0;
    for (int t = 0; t < T; ++t) {
        if (targets[size_t(t)] == kIgnore) continue;
        double mx = -1e300, sum = 0;
        for (int i = 0; i < V; ++i) mx = std::max(mx, double(logits[size_t(t) * V + i]));
        for (int i = 0; i < V; ++i) sum += std::exp(double(logits[size_t(t) * V + i]) - mx);
        want += -(double(logits[size_t(t) * V + size_t(targets[size_t(t)])]) - mx - std::log(sum));
        ++counted;
    }
    want /= counted;
    CHECK(cross_entropy_count(targets.data(), T, V) == 4);
    CHECK(cross_entropy_forward(logits.data(), targets.data(), T, V) == doctest::Approx(want).epsilon(1e-6));
    const float dloss = 0.7f;
    auto loss = [&] { return dloss * cross_entropy_forward(logits.data(), targets.data(), T, V); };
    std::vector<float> dlogits = filled(logits.size());
    cross_entropy_backward(dlogits.data(), logits.data(), targets.data(), T, V, dloss);
    for (int t : {1, 4})  // ignored rows receive nothing
        for (int i = 0; i < V; ++i) CHECK(dlogits[size_t(t) * V + i] == kPrefill);
    expect_gradient(logits.data(), logits.size(), minus_prefill(dlogits), loss, "cross-entropy dlogits");
    // all rows ignored: loss 0, no gradient; a target out of range is an error
    const std::vector<int32_t> none(size_t(T), kIgnore);
    CHECK(cross_entropy_forward(logits.data(), none.data(), T, V) == 0.0);
    std::vector<float> zero(logits.size(), 0.0f);
    cross_entropy_backward(zero.data(), logits.data(), none.data(), T, V, 1.0f);
    CHECK(std::all_of(zero.begin(), zero.end(), [](float x) { return x == 0.0f; }));
    const std::vector<int32_t> bad = {0, 7, 0, 0, 0, 0};
    CHECK_THROWS_AS(cross_entropy_forward(logits.data(), bad.data(), T, V), dsv3::Error);
}

// ================================================================================================================
// 3.8 router
// ================================================================================================================
TEST_CASE("kernels: router_scores_backward (sigmoid and softmax) matches finite differences") {
    const int T = 3, N = 6;
    for (bool softmax : {false, true}) {
        CAPTURE(softmax);
        std::vector<float> logits = gradcheck::random_vector(size_t(T) * N, 81, 2.0f), w = gradcheck::random_vector(logits.size(), 82);
        std::vector<float> scores(logits.size());
        router_scores_forward(scores.data(), logits.data(), T, N, softmax);
        for (int t = 0; t < T; ++t) {  // forward against the formulas
            double sum = 0;
            for (int i = 0; i < N; ++i) sum += std::exp(double(logits[size_t(t) * N + i]));
            for (int i = 0; i < N; ++i) {
                const double z = logits[size_t(t) * N + i];
                const double want = softmax ? std::exp(z) / sum : 1 / (1 + std::exp(-z));
                CHECK(scores[size_t(t) * N + i] == doctest::Approx(want).epsilon(1e-5));
            }
        }
        auto loss = [&] {
            router_scores_forward(scores.data(), logits.data(), T, N, softmax);
            return gradcheck::weighted_sum(scores.data(), w);
        };
        loss();
        std::vector<float> dlogits = filled(logits.size());
        router_scores_backward(dlogits.data(), w.data(), scores.data(), T, N, softmax);
        expect_gradient(logits.data(), logits.size(), minus_prefill(dlogits), loss,
                        softmax ? "router scores (softmax)" : "router scores (sigmoid)");
    }
}

TEST_CASE("kernels: router_gates_backward (norm_topk_prob on/off, route_scale != 1) matches finite differences") {
    const int T = 4, N = 6, K = 3;
    for (bool norm : {true, false}) {
        CAPTURE(norm);
        const Config c = router_config(N, K, 1, 1, "sigmoid", norm, 2.5f);
        std::vector<float> scores = random_positive(size_t(T) * N, 91, 0.1f, 0.9f);
        const std::vector<int32_t> chosen = random_choice(T, K, N, 92);  // held fixed: the choice is discrete
        std::vector<float> w = gradcheck::random_vector(size_t(T) * K, 93), gates(size_t(T) * K);
        auto loss = [&] {
            router_gates_forward(gates.data(), scores.data(), chosen.data(), T, c);
            return gradcheck::weighted_sum(gates.data(), w);
        };
        loss();
        for (int t = 0; t < T; ++t) {  // forward: route_scale · s / Σ_chosen s  (or route_scale · s)
            double S = 0;
            for (int k = 0; k < K; ++k) S += scores[size_t(t) * N + size_t(chosen[size_t(t) * K + k])];
            for (int k = 0; k < K; ++k) {
                const double s = scores[size_t(t) * N + size_t(chosen[size_t(t) * K + k])];
                CHECK(gates[size_t(t) * K + k] == doctest::Approx(2.5 * s / (norm ? S : 1.0)).epsilon(1e-6));
            }
        }
        std::vector<float> dscores = filled(scores.size());
        router_gates_backward(dscores.data(), w.data(), scores.data(), chosen.data(), T, c);
        expect_gradient(scores.data(), scores.size(), minus_prefill(dscores), loss,
                        norm ? "router gates (normalised)" : "router gates (not normalised)");
    }
}

TEST_CASE("kernels: router_select keeps the group limit and takes the top-K biased scores among allowed experts") {
    const int T = 60, N = 16, K = 3, G = 4, limited = 2, per = N / G;
    for (const char* func : {"sigmoid", "softmax"}) {
        CAPTURE(func);
        const bool softmax = std::string(func) == "softmax";
        const Config c = router_config(N, K, G, limited, func, true, 2.5f);
        std::vector<float> logits = gradcheck::random_vector(size_t(T) * N, 101, 3.0f), scores(logits.size());
        router_scores_forward(scores.data(), logits.data(), T, N, softmax);
        std::vector<float> bias = gradcheck::random_vector(size_t(N), 102, softmax ? 0.05f : 0.2f);
        std::vector<int32_t> chosen(size_t(T) * K);
        router_select(chosen.data(), scores.data(), bias.data(), T, c);
        int bias_mattered = 0;
        for (int t = 0; t < T; ++t) {
            CAPTURE(t);
            std::vector<float> biased(static_cast<size_t>(N));
            for (int i = 0; i < N; ++i) biased[size_t(i)] = scores[size_t(t) * N + i] + bias[size_t(i)];
            // group score: sum of the two largest biased scores (sigmoid), or the largest (softmax)
            std::vector<std::pair<double, int>> gs;
            for (int g = 0; g < G; ++g) {
                std::vector<float> m(biased.begin() + g * per, biased.begin() + (g + 1) * per);
                std::sort(m.begin(), m.end(), std::greater<float>());
                gs.push_back({softmax ? double(m[0]) : double(m[0]) + double(m[1]), g});
            }
            std::sort(gs.begin(), gs.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
            std::set<int> allowed_groups;
            for (int r = 0; r < limited; ++r) allowed_groups.insert(gs[size_t(r)].second);
            std::vector<int> allowed;
            for (int i = 0; i < N; ++i)
                if (allowed_groups.count(i / per)) allowed.push_back(i);
            std::stable_sort(allowed.begin(), allowed.end(), [&](int a, int b) { return biased[size_t(a)] > biased[size_t(b)]; });
            std::set<int> distinct;
            for (int k = 0; k < K; ++k) {
                const int e = chosen[size_t(t) * K + k];
                distinct.insert(e);
                CHECK(allowed_groups.count(e / per) == 1);  // the group limit holds
                CHECK(e == allowed[size_t(k)]);             // the k-th best allowed expert, in rank order
            }
            CHECK(distinct.size() == size_t(K));
            // without bias the choice differs for some tokens (the bias steers the selection)
            std::vector<int32_t> unbiased(static_cast<size_t>(K));
            router_select(unbiased.data(), scores.data() + size_t(t) * N, nullptr, 1, c);
            if (!std::equal(unbiased.begin(), unbiased.end(), chosen.begin() + size_t(t) * K)) ++bias_mattered;
        }
        CHECK(bias_mattered > 0);
    }
}

TEST_CASE("kernels: the routing bias changes the choice but not the gate weights; gates sum to route_scale") {
    const Config c = router_config(4, 2, 1, 1, "sigmoid", true, 2.5f);
    const std::vector<float> scores = {0.9f, 0.8f, 0.3f, 0.2f};
    std::vector<int32_t> chosen(2);
    router_select(chosen.data(), scores.data(), nullptr, 1, c);
    CHECK(chosen == std::vector<int32_t>{0, 1});
    const std::vector<float> bias = {0.0f, 0.0f, 0.7f, 0.0f};  // biased: 0.9 0.8 1.0 0.2
    router_select(chosen.data(), scores.data(), bias.data(), 1, c);
    CHECK(chosen == std::vector<int32_t>{2, 0});
    std::vector<float> gates(2);
    router_gates_forward(gates.data(), scores.data(), chosen.data(), 1, c);
    CHECK(gates[0] == doctest::Approx(2.5 * 0.3 / 1.2).epsilon(1e-6));  // from the UNBIASED scores 0.3 and 0.9
    CHECK(gates[1] == doctest::Approx(2.5 * 0.9 / 1.2).epsilon(1e-6));
    // normalised gates of random tokens sum to route_scale; unnormalised ones are route_scale · s
    const int T = 20, N = 8, K = 3;
    for (bool norm : {true, false}) {
        const Config r = router_config(N, K, 4, 2, "sigmoid", norm, 2.5f);
        std::vector<float> s = random_positive(size_t(T) * N, 111, 0.01f, 0.99f), b = gradcheck::random_vector(N, 112, 0.3f);
        std::vector<int32_t> ch(size_t(T) * K);
        std::vector<float> g(size_t(T) * K);
        router_select(ch.data(), s.data(), b.data(), T, r);
        router_gates_forward(g.data(), s.data(), ch.data(), T, r);
        for (int t = 0; t < T; ++t) {
            double sum = 0;
            for (int k = 0; k < K; ++k) sum += g[size_t(t) * K + k];
            if (norm) CHECK(sum == doctest::Approx(2.5).epsilon(1e-6));
            else
                for (int k = 0; k < K; ++k)
                    CHECK(g[size_t(t) * K + k] == doctest::Approx(2.5 * s[size_t(t) * N + size_t(ch[size_t(t) * K + k])]).epsilon(1e-6));
        }
    }
}

TEST_CASE("kernels: router_select breaks ties by the lower expert id and the lower group id, on any thread count") {
    const int N = 8, K = 3;
    const std::vector<float> equal(size_t(N), 0.5f);
    std::vector<int32_t> chosen(static_cast<size_t>(K));
    router_select(chosen.data(), equal.data(), nullptr, 1, router_config(N, K, 1, 1, "sigmoid", true, 1.0f));
    CHECK(chosen == std::vector<int32_t>{0, 1, 2});
    // four groups of two with equal scores: groups 0 and 1 are kept, so experts 0..3 are the candidates
    router_select(chosen.data(), equal.data(), nullptr, 1, router_config(N, K, 4, 2, "sigmoid", true, 1.0f));
    CHECK(chosen == std::vector<int32_t>{0, 1, 2});
    // a tie only between experts 5 and 2: the lower id ranks first
    const std::vector<float> some = {0.1f, 0.2f, 0.7f, 0.3f, 0.1f, 0.7f, 0.6f, 0.2f};
    router_select(chosen.data(), some.data(), nullptr, 1, router_config(N, K, 1, 1, "sigmoid", true, 1.0f));
    CHECK(chosen == std::vector<int32_t>{2, 5, 6});
    // group tie: groups {0,1} score 0.9 each, group 2 0.9 too, group 3 less: the two lowest tied groups are kept
    const std::vector<float> groups = {0.45f, 0.45f, 0.45f, 0.45f, 0.45f, 0.45f, 0.4f, 0.4f};
    router_select(chosen.data(), groups.data(), nullptr, 1, router_config(N, K, 4, 2, "sigmoid", true, 1.0f));
    CHECK(chosen == std::vector<int32_t>{0, 1, 2});
    // the same choice on 1 and 2 threads
    const int T = 64;
    const Config c = router_config(16, 4, 4, 2, "sigmoid", true, 1.0f);
    std::vector<float> s = random_positive(size_t(T) * 16, 121, 0.0f, 1.0f);
    for (size_t i = 0; i < s.size(); i += 3) s[i] = 0.5f;  // plenty of ties
    auto run = [&] {
        std::vector<int32_t> ch(size_t(T) * 4);
        router_select(ch.data(), s.data(), nullptr, T, c);
        return ch;
    };
    CHECK(with_threads(1, run) == with_threads(2, run));
}

// ================================================================================================================
// 3.9 balance losses
// ================================================================================================================
TEST_CASE("kernels: sequence-wise balance loss matches V3 eqs. 17-20 and its dscores matches finite differences") {
    const int B = 2, T = 4, N = 6, K = 2;
    const Config c = router_config(N, K, 1, 1, "sigmoid", true, 1.0f);
    const float alpha = 1.0f;  // large, so the gradient is well above the absolute tolerance
    std::vector<float> scores = random_positive(size_t(B) * T * N, 131, 0.05f, 0.95f);
    const std::vector<int32_t> chosen = random_choice(B * T, K, N, 132);
    double want = 0;  // α Σ_i f_i P_i per sequence, averaged over sequences
    for (int b = 0; b < B; ++b) {
        std::vector<double> f(static_cast<size_t>(N), 0.0), P(static_cast<size_t>(N), 0.0);
        for (int t = 0; t < T; ++t) {
            for (int k = 0; k < K; ++k) f[size_t(chosen[(size_t(b) * T + t) * K + k])] += 1.0;
            double S = 0;
            for (int i = 0; i < N; ++i) S += scores[(size_t(b) * T + t) * N + i];
            for (int i = 0; i < N; ++i) P[size_t(i)] += scores[(size_t(b) * T + t) * N + i] / S / T;
        }
        for (int i = 0; i < N; ++i) want += alpha * (double(N) / (double(K) * T) * f[size_t(i)]) * P[size_t(i)] / B;
    }
    CHECK(sequence_balance_loss(nullptr, scores.data(), chosen.data(), B, T, c, alpha) == doctest::Approx(want).epsilon(1e-9));
    // perfectly uniform scores: P_i = 1/N and Σ f_i = N, so L = α whatever the choice
    const std::vector<float> uniform(scores.size(), 0.3f);
    CHECK(sequence_balance_loss(nullptr, uniform.data(), chosen.data(), B, T, c, alpha) == doctest::Approx(alpha).epsilon(1e-9));
    auto loss = [&] { return sequence_balance_loss(nullptr, scores.data(), chosen.data(), B, T, c, alpha); };
    std::vector<float> dscores = filled(scores.size());
    const double with_grad = sequence_balance_loss(dscores.data(), scores.data(), chosen.data(), B, T, c, alpha);
    CHECK(with_grad == loss());
    expect_gradient(scores.data(), scores.size(), minus_prefill(dscores), loss, "sequence balance loss dscores");
}

TEST_CASE("kernels: expert-level balance loss matches DeepSeekMoE eqs. 12-14 and its dlogits matches finite differences") {
    const int T = 5, N = 6, K = 2;
    const Config c = router_config(N, K, 1, 1, "softmax", false, 1.0f);
    const float alpha = 1.0f;
    std::vector<float> logits = gradcheck::random_vector(size_t(T) * N, 141, 2.0f);
    const std::vector<int32_t> chosen = random_choice(T, K, N, 142);
    std::vector<double> f(static_cast<size_t>(N), 0.0), P(static_cast<size_t>(N), 0.0);
    for (int t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k) f[size_t(chosen[size_t(t) * K + k])] += double(N) / (double(K) * T);
        double S = 0;
        for (int i = 0; i < N; ++i) S += std::exp(double(logits[size_t(t) * N + i]));
        for (int i = 0; i < N; ++i) P[size_t(i)] += std::exp(double(logits[size_t(t) * N + i])) / S / T;
    }
    double want = 0;
    for (int i = 0; i < N; ++i) want += alpha * f[size_t(i)] * P[size_t(i)];
    CHECK(expert_balance_loss(nullptr, logits.data(), chosen.data(), T, c, alpha) == doctest::Approx(want).epsilon(1e-6));
    auto loss = [&] { return expert_balance_loss(nullptr, logits.data(), chosen.data(), T, c, alpha); };
    std::vector<float> dlogits = filled(logits.size());
    expert_balance_loss(dlogits.data(), logits.data(), chosen.data(), T, c, alpha);
    expect_gradient(logits.data(), logits.size(), minus_prefill(dlogits), loss, "expert balance loss dlogits");
}

// ================================================================================================================
// 3.10 MoE permutation
// ================================================================================================================
TEST_CASE("kernels: moe_permute_plan is a stable counting sort, slot and token_of are inverse") {
    const int T = 11, K = 3, N = 5;
    const std::vector<int32_t> chosen = random_choice(T, K, N, 151);
    MoePermutation p;
    moe_permute_plan(p, chosen.data(), T, K, N);
    // the expected order, built directly: expert by expert, tokens ascending, (t, k) pairs listed in that order
    std::vector<int32_t> want_slot(size_t(T) * K, -1);
    std::vector<int64_t> want_offsets = {0};
    int32_t row = 0;
    for (int e = 0; e < N; ++e) {
        for (int t = 0; t < T; ++t)
            for (int k = 0; k < K; ++k)
                if (chosen[size_t(t) * K + k] == e) want_slot[size_t(t) * K + k] = row++;
        want_offsets.push_back(row);
    }
    CHECK(p.slot == want_slot);
    CHECK(p.offsets == want_offsets);
    for (int e = 0; e < N; ++e) {
        CHECK(p.counts[size_t(e)] == want_offsets[size_t(e) + 1] - want_offsets[size_t(e)]);
        for (int64_t r = p.offsets[size_t(e)] + 1; r < p.offsets[size_t(e) + 1]; ++r)
            CHECK(p.token_of[size_t(r) - 1] < p.token_of[size_t(r)]);  // ascending within an expert
    }
    std::vector<int> seen(size_t(T) * K, 0);
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            const int32_t r = p.slot[size_t(t) * K + k];
            REQUIRE(r >= 0);
            REQUIRE(r < T * K);
            ++seen[size_t(r)];
            CHECK(p.token_of[size_t(r)] == t);  // token_of ∘ slot = the token
            CHECK(r >= p.offsets[size_t(chosen[size_t(t) * K + k])]);
            CHECK(r < p.offsets[size_t(chosen[size_t(t) * K + k]) + 1]);
        }
    CHECK(std::all_of(seen.begin(), seen.end(), [](int x) { return x == 1; }));  // slot is a permutation
}

TEST_CASE("kernels: moe_permute / moe_unpermute backward (dx, dye, dgates) match finite differences") {
    const int T = 5, K = 2, N = 4, d = 3;
    const std::vector<int32_t> chosen = random_choice(T, K, N, 161);
    MoePermutation p;
    moe_permute_plan(p, chosen.data(), T, K, N);
    // permute: xe[slot[t,k]] = x[t]
    std::vector<float> x = gradcheck::random_vector(size_t(T) * d, 162), xe(size_t(T) * K * d);
    std::vector<float> wx = gradcheck::random_vector(xe.size(), 163);
    moe_permute_forward(xe.data(), x.data(), p, d);
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k)
            CHECK(std::memcmp(&xe[size_t(p.slot[size_t(t) * K + k]) * d], &x[size_t(t) * d], sizeof(float) * d) == 0);
    auto loss_p = [&] {
        moe_permute_forward(xe.data(), x.data(), p, d);
        return gradcheck::weighted_sum(xe.data(), wx);
    };
    std::vector<float> dx = filled(x.size());
    moe_permute_backward(dx.data(), wx.data(), p, T, K, d);
    expect_gradient(x.data(), x.size(), minus_prefill(dx), loss_p, "moe_permute dx");
    // unpermute: y[t] += Σ_k gates[t,k] · ye[slot[t,k]]
    std::vector<float> ye = gradcheck::random_vector(size_t(T) * K * d, 164), gates = random_positive(size_t(T) * K, 165, 0.1f, 1.0f);
    std::vector<float> wy = gradcheck::random_vector(size_t(T) * d, 166), y0 = gradcheck::random_vector(size_t(T) * d, 167), y;
    y = y0;
    moe_unpermute_forward(y.data(), ye.data(), gates.data(), p, T, K, d);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < d; ++i) {
            double want = y0[size_t(t) * d + i];  // accumulates onto what y held
            for (int k = 0; k < K; ++k)
                want += double(gates[size_t(t) * K + k]) * ye[size_t(p.slot[size_t(t) * K + k]) * d + i];
            CHECK(y[size_t(t) * d + i] == doctest::Approx(want).epsilon(1e-6));
        }
    auto loss_u = [&] {
        y = y0;
        moe_unpermute_forward(y.data(), ye.data(), gates.data(), p, T, K, d);
        return gradcheck::weighted_sum(y.data(), wy);
    };
    // (moe_unpermute_backward WRITES dye — its comment says "dye[slot] = ..." — and accumulates dgates.)
    std::vector<float> dye(ye.size(), 0.0f), dgates = filled(gates.size());
    moe_unpermute_backward(dye.data(), dgates.data(), wy.data(), ye.data(), gates.data(), p, T, K, d);
    expect_gradient(ye.data(), ye.size(), dye, loss_u, "moe_unpermute dye");
    expect_gradient(gates.data(), gates.size(), minus_prefill(dgates), loss_u, "moe_unpermute dgates");
}

// ================================================================================================================
// 3.11 AdamW, 6.1 LR schedules, 6.3 loss-free balancing
// ================================================================================================================
TEST_CASE("kernels: adamw_update matches a hand computation with bias correction and decoupled weight decay") {
    // one element by hand: p 0.5, g 0.2, m 0.1, v 0.01, step 3, lr 0.01, β 0.9/0.95, ε 1e-8, wd 0.1
    float p = 0.5f, g = 0.2f, m = 0.1f, v = 0.01f;
    adamw_update(&p, &g, &m, &v, 1, 0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 3);
    const double m1 = 0.9 * 0.1 + 0.1 * 0.2;               // 0.11
    const double v1 = 0.95 * 0.01 + 0.05 * 0.2 * 0.2;      // 0.0115
    const double mhat = m1 / (1 - 0.9 * 0.9 * 0.9);        // / 0.271
    const double vhat = v1 / (1 - 0.95 * 0.95 * 0.95);     // / 0.142625
    const double p1 = 0.5 - 0.01 * (mhat / (std::sqrt(vhat) + 1e-8) + 0.1 * 0.5);
    CHECK(m == doctest::Approx(m1).epsilon(1e-6));
    CHECK(v == doctest::Approx(v1).epsilon(1e-6));
    CHECK(p == doctest::Approx(p1).epsilon(1e-6));
    CHECK(p == doctest::Approx(0.48520539).epsilon(1e-6));  // m̂ 0.405904, v̂ 0.0806310: the same number by hand
    // step 1 from zero moments: m̂ = g, v̂ = g², so the step is lr·(sign(g) + wd·p) (up to ε)
    float p2 = -0.3f, g2 = -0.02f, m2 = 0, v2 = 0;
    adamw_update(&p2, &g2, &m2, &v2, 1, 0.1f, 0.9f, 0.95f, 1e-8f, 0.0f, 1);
    CHECK(p2 == doctest::Approx(-0.3 + 0.1).epsilon(1e-5));
    // many elements (over the 4096 chunk) against the scalar formula
    const int64_t n = 5000;
    std::vector<float> P = gradcheck::random_vector(size_t(n), 171), G = gradcheck::random_vector(size_t(n), 172);
    std::vector<float> M = gradcheck::random_vector(size_t(n), 173, 0.1f), Vv = random_positive(size_t(n), 174, 0.0f, 0.05f);
    const std::vector<float> P0 = P, M0 = M, V0 = Vv;
    adamw_update(P.data(), G.data(), M.data(), Vv.data(), n, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7);
    for (size_t i = 0; i < size_t(n); i += 97) {
        const double mm = 0.9 * M0[i] + 0.1 * G[i], vv = 0.95 * V0[i] + 0.05 * double(G[i]) * G[i];
        const double want = P0[i] - 3e-3 * (mm / (1 - std::pow(0.9, 7)) / (std::sqrt(vv / (1 - std::pow(0.95, 7))) + 1e-8) + 0.1 * P0[i]);
        CHECK(P[i] == doctest::Approx(want).epsilon(1e-5));
    }
    // grad_scale (the clipping factor, section 6.2) gives the bits of scaling the gradients first, then updating
    std::vector<float> Pa = P0, Ma = M0, Va = V0, Pb = P0, Mb = M0, Vb = V0, Gs = G;
    for (float& x : Gs) x *= 0.37f;
    adamw_update(Pa.data(), G.data(), Ma.data(), Va.data(), n, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7, 0.37f);
    adamw_update(Pb.data(), Gs.data(), Mb.data(), Vb.data(), n, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7);
    CHECK(Pa == Pb);
    CHECK(Ma == Mb);
    CHECK(Va == Vb);
}

TEST_CASE("kernels: LR schedules: warmup, cosine endpoints, V3 stages, multi-step factors") {
    LrSchedule s;
    s.max_lr = 1e-3f; s.min_lr = 1e-4f; s.warmup_steps = 10; s.total_steps = 100;
    const double mx = 1e-3, mn = 1e-4;
    auto approx = [](double x) { return doctest::Approx(x).epsilon(1e-6); };
    SUBCASE("linear warmup (any kind)") {
        for (auto kind : {LrSchedule::cosine, LrSchedule::v3, LrSchedule::multi_step}) {
            s.kind = kind;
            for (int step = 0; step < 10; ++step) CHECK(s.at(step) == approx(mx * (step + 1) / 10));
        }
    }
    SUBCASE("cosine: max right after warmup, half way at the middle, min at the end, never increasing") {
        s.kind = LrSchedule::cosine;
        CHECK(s.at(10) == approx(mx));
        CHECK(s.at(99) == approx(mn));                    // the last step (0-based) runs at min_lr
        CHECK(s.at(100) == approx(mn));
        CHECK(s.at(54) == doctest::Approx((mx + mn) / 2).epsilon(2e-2));  // about half way (r = 44/89)
        CHECK(s.at(150) == approx(mn));
        for (int step = 10; step < 120; ++step) CHECK(s.at(step + 1) <= s.at(step));
    }
    SUBCASE("v3: constant max, then cosine, then constant min") {
        s.kind = LrSchedule::v3; s.constant_until = 0.5f; s.decay_until = 0.9f;
        for (int step = 10; step < 50; ++step) CHECK(s.at(step) == approx(mx));
        CHECK(s.at(50) == approx(mx));
        CHECK(s.at(70) == approx((mx + mn) / 2));
        CHECK(s.at(60) < s.at(50));
        CHECK(s.at(80) < s.at(70));
        for (int step = 90; step < 100; ++step) CHECK(s.at(step) == approx(mn));
    }
    SUBCASE("multi_step: ×1 until 80%, ×0.316 until 90%, then ×0.1") {
        s.kind = LrSchedule::multi_step;
        s.total_steps = 1000; s.warmup_steps = 20;
        CHECK(s.at(20) == approx(mx));
        CHECK(s.at(799) == approx(mx));
        CHECK(s.at(800) == approx(0.316 * mx));
        CHECK(s.at(899) == approx(0.316 * mx));
        CHECK(s.at(900) == approx(0.1 * mx));
        CHECK(s.at(999) == approx(0.1 * mx));
    }
}

// A model with two MoE blocks (one main, one MTP) for the bias update.
Config bias_config() {
    Config c;
    c.vocab_size = 11; c.dim = 8; c.inter_dim = 12; c.moe_inter_dim = 4;
    c.n_layers = 2; c.n_dense_layers = 1; c.n_heads = 1;
    c.n_routed_experts = 6; c.n_activated_experts = 2; c.n_expert_groups = 3; c.n_limited_groups = 2;
    c.q_lora_rank = 0; c.kv_lora_rank = 4; c.qk_nope_head_dim = 2; c.qk_rope_head_dim = 2; c.v_head_dim = 2;
    c.max_seq_len = 8; c.n_mtp_depth = 1;
    return c;
}

TEST_CASE("kernels: update_routing_bias applies b_i += γ·sign(mean − load_i) exactly") {
    Model model(bias_config(), 1);
    std::vector<Block*> moe = model.moe_blocks();
    REQUIRE(moe.size() == 2);
    for (Block* b : moe)
        for (int i = 0; i < 6; ++i) model.param_at(b->moe.bias)[i] = 0.01f * float(i) - 0.02f;
    std::vector<std::vector<float>> before;
    for (Block* b : moe) before.emplace_back(model.param_at(b->moe.bias), model.param_at(b->moe.bias) + 6);
    // mean 2: loads above it go down, below it go up, equal to it stay exactly where they were
    const std::vector<std::vector<int64_t>> loads = {{3, 1, 2, 2, 4, 0}, {5, 5, 5, 5, 5, 5}};
    const std::vector<std::vector<int>> sign = {{-1, +1, 0, 0, -1, +1}, {0, 0, 0, 0, 0, 0}};
    const float gamma = 0.001f;
    update_routing_bias(model, loads, gamma);
    for (size_t l = 0; l < 2; ++l)
        for (size_t i = 0; i < 6; ++i) {
            CAPTURE(l); CAPTURE(i);
            CHECK(model.param_at(moe[l]->moe.bias)[i] == before[l][i] + gamma * float(sign[l][i]));
            if (sign[l][i] == 0) CHECK(model.param_at(moe[l]->moe.bias)[i] == before[l][i]);
        }
    // a non-integer mean (1.5): one up, one down
    Config two = bias_config();
    two.n_routed_experts = 2; two.n_expert_groups = 1; two.n_limited_groups = 1; two.n_mtp_depth = 0;
    Model m2(two, 2);
    update_routing_bias(m2, {{1, 2}}, 0.5f);
    CHECK(m2.param_at(m2.moe_blocks()[0]->moe.bias)[0] == 0.5f);
    CHECK(m2.param_at(m2.moe_blocks()[0]->moe.bias)[1] == -0.5f);
    // one load vector per MoE block, or an error
    CHECK_THROWS_AS(update_routing_bias(model, {{1, 1, 1, 1, 1, 1}}, gamma), dsv3::Error);
}

TEST_CASE("kernels: max_violation is (max load − mean) / mean") {
    CHECK(max_violation({3, 1, 2, 2, 4, 0}) == doctest::Approx(1.0));  // mean 2, max 4
    CHECK(max_violation({1, 3}) == doctest::Approx(0.5));
    CHECK(max_violation({7, 7, 7}) == 0.0);
    CHECK(max_violation({0, 0}) == 0.0);  // no tokens: defined as balanced
    CHECK(max_violation({10, 0, 0, 0}) == doctest::Approx(3.0));
}

// ================================================================================================================
// determinism across thread counts
// ================================================================================================================
TEST_CASE("kernels: matmul, attention and RMSNorm backward are bitwise identical on 1 and 2 threads") {
    {
        const int T = 37, in = 53, out = 29;
        const std::vector<float> x = gradcheck::random_vector(size_t(T) * in, 181), W = gradcheck::random_vector(size_t(out) * in, 182);
        const std::vector<float> dy = gradcheck::random_vector(size_t(T) * out, 183);
        auto run = [&] {
            std::vector<float> y(size_t(T) * out), dx(x.size(), 0.0f), dW(W.size(), 0.0f);
            matmul_forward(y.data(), x.data(), W.data(), T, in, out);
            matmul_backward(dx.data(), dW.data(), dy.data(), x.data(), W.data(), T, in, out);
            y.insert(y.end(), dx.begin(), dx.end());
            y.insert(y.end(), dW.begin(), dW.end());
            return y;
        };
        CHECK(bitwise_equal(with_threads(1, run), with_threads(2, run)));
    }
    {
        const int B = 2, T = 9, H = 3, dqk = 7, dv = 5;
        const std::vector<float> q = gradcheck::random_vector(size_t(B) * T * H * dqk, 191), k = gradcheck::random_vector(q.size(), 192);
        const std::vector<float> v = gradcheck::random_vector(size_t(B) * T * H * dv, 193), dout = gradcheck::random_vector(v.size(), 194);
        auto run = [&] {
            std::vector<float> out(v.size()), probs(size_t(B) * H * T * T), dq(q.size(), 0.0f), dk(k.size(), 0.0f),
                dvv(v.size(), 0.0f);
            attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), B, T, H, dqk, dv, 0.3f);
            attention_backward(dq.data(), dk.data(), dvv.data(), dout.data(), out.data(), probs.data(), q.data(),
                               k.data(), v.data(), B, T, H, dqk, dv, 0.3f);
            for (auto* part : {&probs, &dq, &dk, &dvv}) out.insert(out.end(), part->begin(), part->end());
            return out;
        };
        CHECK(bitwise_equal(with_threads(1, run), with_threads(2, run)));
    }
    {
        const int T = 17, d = 33;
        const std::vector<float> x = gradcheck::random_vector(size_t(T) * d, 201), g = gradcheck::random_vector(d, 202);
        const std::vector<float> dy = gradcheck::random_vector(x.size(), 203);
        auto run = [&] {
            std::vector<float> y(x.size()), rstd(T), dx(x.size(), 0.0f), dg(size_t(d), 0.0f);
            rmsnorm_forward(y.data(), rstd.data(), x.data(), g.data(), T, d, 1e-6f);
            rmsnorm_backward(dx.data(), dg.data(), dy.data(), x.data(), g.data(), rstd.data(), T, d);
            for (auto* part : {&rstd, &dx, &dg}) y.insert(y.end(), part->begin(), part->end());
            return y;
        };
        CHECK(bitwise_equal(with_threads(1, run), with_threads(2, run)));
    }
#ifdef _OPENMP
    // the helper restored the caller's thread count
    const int before = omp_get_max_threads();
    with_threads(1, [] { return 0; });
    CHECK(omp_get_max_threads() == before);
#endif
}

}  // namespace

#ifdef _OPENMP
TEST_CASE("ThreadTuner: settles on the count whose steps are fastest, probes the others, restores the count") {
    // Steps that take 1 ms on one thread and 4 ms on two (sleeps: what a loaded CPU does to a team of threads). The
    // tuner must try both, run most steps on one thread, and give the count back when it goes.
    const int previous = omp_get_max_threads();
    omp_set_num_threads(2);
    int on_one = 0, on_two = 0;
    {
        ThreadTuner tuner;
        for (int step = 0; step < 300; ++step) {
            tuner.tick();
            const bool one = omp_get_max_threads() == 1;
            (one ? on_one : on_two)++;
            std::this_thread::sleep_for(std::chrono::microseconds(one ? 1000 : 4000));
        }
    }
    CHECK(on_two > 0);                // tried (the first window, and probes)
    CHECK(on_one > 4 * on_two);       // but most steps ran on the faster count
    CHECK(omp_get_max_threads() == 2);
    omp_set_num_threads(previous);
}
#endif
