// Finite-difference gradient checks shared by the tests.
//
// Why these tolerances: the kernels compute in float32. A central difference (f(x+ε) − f(x−ε)) / 2ε has a truncation
// error O(ε²·f''') and a rounding error of about (|f|·2^-24) / ε. With ε = 1e-2 on O(1) inputs both are near 1e-4
// relative, so a gradient entry passes when |analytic − numeric| ≤ 2e-3 + 2e-2·|numeric|; a wrong formula is off by
// O(1) relative and fails by orders of magnitude. The norm of all differences is checked too.
#pragma once
#include <doctest/doctest.h>
#include <functional>
#include <vector>

#include "../deepseek_v3.hpp"

namespace gradcheck {

struct Result { double max_abs_err = 0, max_rel_err = 0, rel_norm_err = 0; int checked = 0, failed = 0; };

// loss(): a scalar computed from the current contents of x. analytic: ∂loss/∂x as computed by the code under test.
// Checks `samples` entries (all if samples <= 0 or >= n), chosen by a fixed RNG.
inline Result check(float* x, size_t n, const std::vector<float>& analytic, const std::function<double()>& loss,
                    int samples = 0, float eps = 1e-2f, double abs_tol = 2e-3, double rel_tol = 2e-2) {
    Result r;
    std::vector<size_t> idx;
    if (samples <= 0 || size_t(samples) >= n) {
        for (size_t i = 0; i < n; ++i) idx.push_back(i);
    } else {
        dsv3::Rng rng(12345);
        for (int s = 0; s < samples; ++s) idx.push_back(size_t(rng.below(n)));
    }
    double diff2 = 0, ref2 = 0;
    for (size_t i : idx) {
        const float saved = x[i];
        x[i] = saved + eps;
        const double up = loss();
        x[i] = saved - eps;
        const double down = loss();
        x[i] = saved;
        const double numeric = (up - down) / (2.0 * eps), a = analytic[i], err = std::fabs(a - numeric);
        diff2 += err * err;
        ref2 += numeric * numeric;
        r.max_abs_err = std::max(r.max_abs_err, err);
        if (std::fabs(numeric) > 1e-3) r.max_rel_err = std::max(r.max_rel_err, err / std::fabs(numeric));
        if (err > abs_tol + rel_tol * std::fabs(numeric)) {
            if (r.failed < 5) MESSAGE("entry ", i, ": analytic ", a, " numeric ", numeric);
            ++r.failed;
        }
        ++r.checked;
    }
    r.rel_norm_err = std::sqrt(diff2 / std::max(ref2, 1e-30));
    return r;
}

// Random inputs in [-1, 1) from a fixed seed.
inline std::vector<float> random_vector(size_t n, uint64_t seed, float scale = 1.0f) {
    dsv3::Rng rng(seed);
    std::vector<float> v(n);
    for (float& x : v) x = float(rng.uniform() * 2 - 1) * scale;
    return v;
}
// Σ w ⊙ y in double: a scalar whose gradient w.r.t. y is w, to turn any kernel's output into a loss.
inline double weighted_sum(const float* y, const std::vector<float>& w) {
    double s = 0;
    for (size_t i = 0; i < w.size(); ++i) s += double(y[i]) * w[i];
    return s;
}

}  // namespace gradcheck
