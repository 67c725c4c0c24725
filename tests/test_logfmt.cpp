// Tests of section 8.5 (LogFMT, "Insights into DeepSeek-V3" §3.2): the levels, the rounding in linear space, the
// max − log(2^32) clamp, zeros and signs, error bounds, and the argument checks. Expected values come from the
// definition itself: the tile's min and step from its magnitudes, and the nearest level found by brute force over the
// levels exp(min + step·(K − 1)) (the header's own `level`, so that a level compares equal to itself bit for bit).
#include <doctest/doctest.h>

#include "../deepseek_v3.hpp"

#include <cfloat>
#include <cmath>
#include <functional>
#include <vector>

namespace {

using namespace dsv3;

float level(const LogFmtTile& t, int K) { return logfmt_detail::level(t, K); }

// Encode then decode one row of n values.
struct RoundTrip {
    std::vector<uint16_t> codes;
    std::vector<LogFmtTile> tiles;
    std::vector<float> y;
};
RoundTrip round_trip(const std::vector<float>& x, int bits, int rows = 1) {
    const int cols = int(x.size()) / rows;
    RoundTrip r{std::vector<uint16_t>(x.size()), std::vector<LogFmtTile>(size_t(rows) * size_t(fp8_tiles(cols))),
                std::vector<float>(x.size())};
    logfmt_encode(x.data(), rows, cols, bits, r.codes.data(), r.tiles.data());
    logfmt_decode(r.codes.data(), r.tiles.data(), rows, cols, bits, r.y.data());
    return r;
}

std::vector<float> gaussian(uint64_t seed, int n, float sigma = 1.0f) {
    Rng rng(seed);
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = float(rng.normal()) * sigma;
    return x;
}

}  // namespace

TEST_CASE("logfmt: the tile's levels run from its smallest to its largest magnitude, K = 0 is zero") {
    for (int bits : {8, 10}) {
        CAPTURE(bits);
        const int L = (1 << (bits - 1)) - 1;
        const std::vector<float> x = gaussian(1, 128);
        const RoundTrip r = round_trip(x, bits);
        float amax = 0, amin = FLT_MAX;
        for (float v : x) amax = std::max(amax, std::fabs(v)), amin = std::min(amin, std::fabs(v));
        const LogFmtTile t = r.tiles[0];
        CHECK(t.min == std::log(amin));
        CHECK(t.step == (std::log(amax) - std::log(amin)) / float(L - 1));
        // the smallest and the largest magnitude take K = 1 and K = L
        for (size_t i = 0; i < x.size(); ++i) {
            const unsigned K = r.codes[i] & ((1u << (bits - 1)) - 1);
            if (std::fabs(x[i]) == amin) CHECK(K == 1);
            if (std::fabs(x[i]) == amax) CHECK(K == unsigned(L));
        }
    }
}

TEST_CASE("logfmt: every representable value encodes to its own code (exact round trip), both signs") {
    for (int bits : {8, 10}) {
        CAPTURE(bits);
        const int L = (1 << (bits - 1)) - 1;
        // a tile fixed by its two end values (K = 1 and K = L); then every level between them, re-encoded beside them
        std::vector<float> x(128, 0.0f);
        x[0] = 3.0f;
        x[1] = -0.002f;
        const LogFmtTile t = round_trip(x, bits).tiles[0];
        for (int K0 = 2; K0 < L; K0 += 32) {
            std::vector<float> y = x;
            for (int j = 0; j < 32 && K0 + j < L; ++j) y[size_t(2 + 3 * j)] = (j % 2 ? -1.0f : 1.0f) * level(t, K0 + j);
            const RoundTrip r = round_trip(y, bits);
            REQUIRE(r.tiles[0].min == t.min);
            REQUIRE(r.tiles[0].step == t.step);
            for (int j = 0; j < 32 && K0 + j < L; ++j) {
                const size_t i = size_t(2 + 3 * j);
                CHECK((r.codes[i] & ((1u << (bits - 1)) - 1)) == unsigned(K0 + j));
                CHECK(bool(r.codes[i] >> (bits - 1)) == (j % 2 == 1));
                CHECK(r.y[i] == y[i]);   // bit for bit
            }
        }
        // and random tiles: decode, re-encode: the same codes (the ends, and so min and step, may move by an ulp)
        const RoundTrip a = round_trip(gaussian(2, 4 * 128), bits, 4);
        const RoundTrip b = round_trip(a.y, bits, 4);
        CHECK(b.codes == a.codes);
        for (size_t i = 0; i < a.y.size(); ++i) CHECK(b.y[i] == doctest::Approx(a.y[i]).epsilon(1e-6));
    }
}

TEST_CASE("logfmt: rounding in linear space picks the nearer level (brute force), ties and the zero boundary") {
    for (int bits : {8, 10}) {
        CAPTURE(bits);
        const int L = (1 << (bits - 1)) - 1;
        const std::vector<float> x = gaussian(3, 64 * 128, 2.0f);
        const RoundTrip r = round_trip(x, bits, 64);
        int wrong = 0, log_space_differs = 0;
        for (size_t i = 0; i < x.size(); ++i) {
            const LogFmtTile& t = r.tiles[i / 128];
            const float a = std::fabs(x[i]);
            int best = 0;
            float best_d = a;   // K = 0: zero
            for (int K = 1; K <= L; ++K)
                if (std::fabs(level(t, K) - a) < best_d) best = K, best_d = std::fabs(level(t, K) - a);
            wrong += int(r.codes[i] & ((1u << (bits - 1)) - 1)) != best;
            // rounding in log space would differ for some elements: the midpoint in log space is below the linear one
            const int log_K = std::clamp(int(std::lround((std::log(a) - t.min) / t.step)) + 1, 1, L);
            log_space_differs += log_K != best;
        }
        CHECK(wrong == 0);
        CHECK(log_space_differs > 0);
    }
    // below the smallest level: zero or the level, whichever is nearer (the clamp makes such values exist)
    std::vector<float> x(128, 0.0f);
    x[0] = 1.0f;
    x[1] = 1e-12f;   // log ratio 27.6 > log(2^32) = 22.2: min is clamped to log(1) − log(2^32)
    x[2] = 1.0f / 4294967296.0f * 0.49f;
    x[3] = 1.0f / 4294967296.0f * 0.51f;
    const RoundTrip r = round_trip(x, 8);
    CHECK(r.tiles[0].min == 0.0f - 32 * std::log(2.0f));   // log(1) − 32·ln 2
    CHECK(logfmt_detail::kRange == 32 * std::log(2.0f));
    CHECK(r.codes[1] == 0);
    CHECK(r.codes[2] == 0);
    CHECK(r.codes[3] == 1);
}

TEST_CASE("logfmt: zeros, signs, partial tiles, a tile of zeros, infinities saturate, NaN tiles") {
    std::vector<float> x = gaussian(4, 3 * 200);   // 3 rows of 200: tiles of 128 and 72
    for (int i = 0; i < 600; i += 7) x[size_t(i)] = i % 2 ? -0.0f : 0.0f;
    for (int i = 128; i < 200; ++i) x[size_t(i)] = 0.0f;   // row 0's second tile: all zeros
    const RoundTrip r = round_trip(x, 10, 3);
    REQUIRE(r.tiles.size() == 6);
    CHECK(r.tiles[1].min == 0.0f);
    CHECK(r.tiles[1].step == 0.0f);
    for (size_t i = 0; i < x.size(); ++i) {
        CHECK(std::signbit(r.y[i]) == std::signbit(x[i]));
        CHECK((r.y[i] == 0) == (x[i] == 0));
    }
    std::vector<float> s(128, 1.0f);
    s[5] = INFINITY;
    s[6] = -INFINITY;
    s[7] = 2.0f;
    const RoundTrip ri = round_trip(s, 8);
    CHECK(ri.codes[5] == 127);
    CHECK(ri.codes[6] == 255);
    CHECK(ri.y[5] == ri.y[7]);
    s[9] = NAN;
    const RoundTrip rn = round_trip(s, 8);
    CHECK(std::isnan(rn.y[0]));
    CHECK(std::isnan(rn.y[9]));
    std::vector<float> z(128, 0.0f);
    z[3] = 5.0f;   // one nonzero magnitude: one level
    CHECK(round_trip(z, 8).y[3] == doctest::Approx(5.0f).epsilon(1e-6));
}

TEST_CASE("logfmt: error bounds, relative to the element: (e^step − 1)/2 inside the range; 10 bits beat 8") {
    for (int bits : {8, 10}) {
        CAPTURE(bits);
        const std::vector<float> x = gaussian(5, 64 * 128);
        const RoundTrip r = round_trip(x, bits, 64);
        double worst = 0, sq = 0, sq_x = 0;
        for (size_t i = 0; i < x.size(); ++i) {
            const LogFmtTile& t = r.tiles[i / 128];
            sq += double(r.y[i] - x[i]) * double(r.y[i] - x[i]);
            sq_x += double(x[i]) * double(x[i]);
            if (std::fabs(x[i]) < level(t, 1)) continue;
            const double rel = std::fabs(double(r.y[i]) - x[i]) / std::fabs(x[i]);
            worst = std::max(worst, rel / ((std::exp(double(t.step)) - 1) / 2));
        }
        CHECK(worst <= 1.0 + 1e-5);
        CHECK(std::sqrt(sq / sq_x) < (bits == 8 ? 0.03 : 0.008));   // measured: 0.0140 and 0.0035
    }
}

TEST_CASE("logfmt: argument checks name the function and the field") {
    std::vector<float> x(128, 1.0f);
    std::vector<uint16_t> q(128);
    std::vector<LogFmtTile> t(1);
    CHECK_THROWS_WITH_AS(logfmt_encode(x.data(), 1, 128, 2, q.data(), t.data()),
                         "logfmt_encode: bits must be in [3, 16] (the paper's n = 8 or 10), found 2", Error);
    CHECK_THROWS_WITH_AS(logfmt_decode(q.data(), t.data(), -1, 128, 8, x.data()),
                         "logfmt_decode: shape must be non-negative, found [-1, 128]", Error);
    CHECK_THROWS_WITH_AS(logfmt_encode(nullptr, 1, 128, 8, q.data(), t.data()),
                         "logfmt_encode: null pointer for a [1, 128] tensor", Error);
}

TEST_CASE("logfmt: the expert-parallel dispatch through a codec (ExpertParallel::dispatch_codec)") {
    // 2 ranks, one EP forward/backward: an identity codec sees exactly the rows each rank sends to the other and
    // changes no bit; LogFMT-8 on the wire changes the loss a little, not much.
    Config c = Config::tiny();
    c.n_layers = 2;
    const int B = 4, T = 16;
    std::vector<int32_t> tokens(size_t(B) * (T + 1));
    Rng rng(9);
    for (auto& t : tokens) t = int32_t(rng.below(uint64_t(c.vocab_size)));
    using Codec = std::function<void(float*, int64_t, int)>;
    int64_t seen[2] = {0, 0}, sent[2] = {0, 0};
    auto run = [&](const std::function<Codec(int rank)>& codec_of) {
        double loss[2] = {0, 0};
        run_ranks(2, [&](Communicator& comm) {
            Model model(c, 3);
            ExpertParallel ep(comm, c);
            ep.dispatch_codec = codec_of(comm.rank());
            model.expert_runner = &ep;
            const RowShare share = row_share(B, 2, comm.rank());
            loss[comm.rank()] =
                model.forward_backward(tokens.data() + size_t(share.first) * (T + 1), share.count, T, {}).main;
            sent[comm.rank()] = ep.stats.dispatched_rows;
        });
        return loss[0] + loss[1];
    };
    const double plain = run([](int) { return Codec(); });
    bool width_ok[2] = {true, true};
    const double identity = run([&](int r) {
        return Codec([&, r](float*, int64_t n, int d) {   // each rank's own counters: no race
            width_ok[r] &= d == c.dim;
            seen[r] += n;
        });
    });
    CHECK(identity == plain);
    CHECK((width_ok[0] && width_ok[1]));
    for (int r = 0; r < 2; ++r) {
        CHECK(sent[r] > 0);
        CHECK(seen[r] == sent[r]);
    }
    const double lossy = run([](int) {
        return Codec([](float* x, int64_t n, int d) {
            std::vector<uint16_t> q(size_t(n) * size_t(d));
            std::vector<LogFmtTile> t(size_t(n) * size_t(fp8_tiles(d)));
            logfmt_encode(x, int(n), d, 8, q.data(), t.data());
            logfmt_decode(q.data(), t.data(), int(n), d, 8, x);
        });
    });
    CHECK(lossy != plain);
    CHECK(std::fabs(lossy - plain) < 1e-2 * std::fabs(plain));
}
