// Inference (section 7): the latent KV cache, absorbed == naive attention, incremental decoding == the full forward,
// the MTP module in decoding == the MTP module in training, sampling, and speculative decoding == plain decoding.
#include <doctest/doctest.h>

#include "../deepseek_v3.hpp"

using namespace dsv3;

namespace {

// Every structural feature (query LoRA, dense + MoE layers, shared + group-limited routed experts, MTP, YaRN), small.
Config decode_config(int q_lora = 8) {
    Config c;
    c.vocab_size = 23; c.dim = 32; c.inter_dim = 48; c.moe_inter_dim = 16;
    c.n_layers = 3; c.n_dense_layers = 1; c.n_heads = 4;
    c.n_routed_experts = 8; c.n_shared_experts = 1; c.n_activated_experts = 2;
    c.n_expert_groups = 4; c.n_limited_groups = 2;
    c.q_lora_rank = q_lora; c.kv_lora_rank = 16; c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 4; c.v_head_dim = 8;
    c.max_seq_len = 64; c.n_mtp_depth = 1; c.init_std = 0.2f;
    c.rope_factor = 4; c.original_seq_len = 16;
    return c;
}
Model decode_model(const Config& c, uint64_t seed) {
    Model m(c, seed);
    for (Block* b : m.moe_blocks())  // a non-zero routing bias, so the biased choice is exercised
        for (int i = 0; i < c.n_routed_experts; ++i) m.param_at(b->moe.bias)[i] = 0.03f * float(i % 4);
    return m;
}
std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(rng.below(uint64_t(vocab)));
    return t;
}
// max |a - b| / max |b|
double rel_diff(const float* a, const float* b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; ++i) {
        num = std::max(num, std::fabs(double(a[i]) - b[i]));
        den = std::max(den, std::fabs(double(b[i])));
    }
    return num / den;
}

}  // namespace

TEST_CASE("inference: the latent cache holds kv_lora_rank + qk_rope_head_dim values per layer and token") {
    for (const Config& c : {Config::tiny(), Config::v3_671b()}) {
        KvCache cache(c, c.n_layers, 1);
        CHECK(cache.bytes_per_token() == kv_cache_bytes_mla(c));
    }
    CHECK(KvCache(Config::v3_671b(), 61, 1).bytes_per_token() == 70272);
}

TEST_CASE("inference: incremental decoding (naive and absorbed, any chunking) equals the full forward") {
    for (int q_lora : {8, 0}) {
        const Config c = decode_config(q_lora);
        Model model = decode_model(c, 5);
        const int T = 20, V = c.vocab_size;
        std::vector<int32_t> tokens = random_tokens(T + 1, V, 9);
        LossOptions opt;
        opt.with_mtp = false;
        model.forward(tokens.data(), 1, T, opt);
        const std::vector<float> full(model.logits(), model.logits() + size_t(T) * V);
        for (bool absorbed : {false, true})
            for (int chunk : {1, 3, T}) {
                CAPTURE(q_lora); CAPTURE(absorbed); CAPTURE(chunk);
                KvCache cache(c, c.n_layers, T);
                std::vector<float> inc(size_t(T) * V);
                for (int t = 0; t < T; t += chunk) {
                    const int n = std::min(chunk, T - t);
                    model.decode(tokens.data() + t, n, cache, inc.data() + size_t(t) * V, nullptr, absorbed);
                }
                CHECK(cache.len == T);
                CHECK(rel_diff(inc.data(), full.data(), full.size()) < 1e-5);
            }
    }
}

TEST_CASE("inference: absorbed attention equals the naive path within float32 rounding") {
    const Config c = decode_config();
    Model model = decode_model(c, 6);
    const int T = 24, V = c.vocab_size;
    std::vector<int32_t> tokens = random_tokens(T, V, 10);
    std::vector<float> naive(size_t(T) * V), absorbed(size_t(T) * V);
    KvCache c1(c, c.n_layers, T), c2(c, c.n_layers, T);
    model.decode(tokens.data(), T, c1, naive.data(), nullptr, false);
    model.decode(tokens.data(), T, c2, absorbed.data(), nullptr, true);
    CHECK(rel_diff(absorbed.data(), naive.data(), naive.size()) < 1e-5);
    // the first layer's cache is computed before any attention, so it is the same bits on both paths
    CHECK(std::memcmp(c1.ckv_at(0, 0), c2.ckv_at(0, 0), sizeof(float) * size_t(T) * c.kv_lora_rank) == 0);
    CHECK(std::memcmp(c1.k_rope_at(0, 0), c2.k_rope_at(0, 0), sizeof(float) * size_t(T) * c.qk_rope_head_dim) == 0);
}

TEST_CASE("inference: a position's logits do not depend on how many tokens its step feeds (bitwise)") {
    const Config c = decode_config();
    Model model = decode_model(c, 7);
    const int T = 12, V = c.vocab_size;
    std::vector<int32_t> tokens = random_tokens(T, V, 11);
    std::vector<float> one_by_one(size_t(T) * V), in_pairs(size_t(T) * V);
    KvCache a(c, c.n_layers, T), b(c, c.n_layers, T);
    for (int t = 0; t < T; ++t) model.decode(tokens.data() + t, 1, a, one_by_one.data() + size_t(t) * V);
    model.decode(tokens.data(), 4, b, in_pairs.data());
    for (int t = 4; t < T; t += 2) model.decode(tokens.data() + t, 2, b, in_pairs.data() + size_t(t) * V);
    CHECK(std::memcmp(one_by_one.data(), in_pairs.data(), one_by_one.size() * sizeof(float)) == 0);
}

TEST_CASE("inference: the MTP module in decoding equals the MTP module of the training forward") {
    const Config c = decode_config();
    Model model = decode_model(c, 8);
    const int T = 16, V = c.vocab_size, d = c.dim;
    std::vector<int32_t> tokens = random_tokens(T + 1, V, 12);
    model.forward(tokens.data(), 1, T);  // MTP logits at position i predict t_{i+2}, from (h_i, t_{i+1})
    const std::vector<float> train_mtp(model.mtp_logits(0), model.mtp_logits(0) + size_t(T) * V);
    KvCache cache(c, c.n_layers, T), mtp_cache(c, 1, T);
    std::vector<float> logits(size_t(T) * V), hidden(size_t(T) * d), mtp(size_t(T) * V);
    model.decode(tokens.data(), T, cache, logits.data(), hidden.data());
    // the last position's next token lies past the row in training (filler), so compare positions 0..T-2
    model.decode_mtp(hidden.data(), tokens.data() + 1, T - 1, mtp_cache, mtp.data());
    CHECK(rel_diff(mtp.data(), train_mtp.data(), size_t(T - 1) * V) < 1e-5);
}

TEST_CASE("inference: sampling is greedy at temperature 0, respects top-k and top-p, and is deterministic") {
    const float z[6] = {0.1f, 2.0f, 1.9f, -1.0f, 2.0f, 0.5f};
    Rng rng(1);
    SamplingOptions greedy;
    CHECK(sample_token(z, 6, greedy, rng) == 1);  // ties: the lowest id
    SamplingOptions top2;
    top2.temperature = 1.0f;
    top2.top_k = 2;
    for (int i = 0; i < 200; ++i) {
        const int t = sample_token(z, 6, top2, rng);
        CHECK((t == 1 || t == 4));
    }
    SamplingOptions nucleus;
    nucleus.temperature = 1.0f;
    nucleus.top_p = 0.5f;  // p(1) = p(4) ≈ 0.33 each: the nucleus is {1, 4}
    int counts[6] = {0};
    for (int i = 0; i < 400; ++i) counts[sample_token(z, 6, nucleus, rng)]++;
    CHECK(counts[1] + counts[4] == 400);
    CHECK(counts[1] > 120);
    CHECK(counts[4] > 120);
    SamplingOptions warm;
    warm.temperature = 0.8f;
    Rng r1(42), r2(42);
    for (int i = 0; i < 50; ++i) CHECK(sample_token(z, 6, warm, r1) == sample_token(z, 6, warm, r2));
    SamplingOptions bad;
    bad.top_p = 0;
    CHECK_THROWS_WITH_AS(sample_token(z, 6, bad, rng), doctest::Contains("top_p"), Error);
}

TEST_CASE("inference: MTP speculative decoding gives exactly the tokens of plain decoding") {
    Config c = decode_config();
    for (int window : {64, 12}) {  // 12: the context fills up and restarts several times
        c.max_seq_len = window;
        Model model = decode_model(c, 9);
        const std::vector<int32_t> prompt = random_tokens(5, c.vocab_size, 13);
        SamplingOptions greedy, warm;
        warm.temperature = 0.9f;
        warm.top_k = 10;
        for (const SamplingOptions& s : {greedy, warm})
            for (bool absorbed : {true, false}) {
                CAPTURE(window); CAPTURE(s.temperature); CAPTURE(absorbed);
                GenerationStats plain_stats, spec_stats;
                const auto plain = generate(model, prompt, 40, s, 3, false, &plain_stats, absorbed);
                const auto spec = generate(model, prompt, 40, s, 3, true, &spec_stats, absorbed);
                CHECK(plain.size() == 40);
                CHECK(plain == spec);
                CHECK(plain_stats.restarts == spec_stats.restarts);
                CHECK((window == 64) == (plain_stats.restarts == 0));
                CHECK(plain_stats.main_forwards == 40 + plain_stats.restarts);  // one token per forward
                CHECK(spec_stats.drafted > 0);
                // every accepted draft saves one forward (the last one may come when no token is needed any more)
                CHECK(spec_stats.main_forwards + spec_stats.accepted >= plain_stats.main_forwards);
                CHECK(spec_stats.main_forwards + spec_stats.accepted <= plain_stats.main_forwards + 1);
            }
    }
}
