// Whole-model tests: the gradient of the full loss (main + MTP + balance loss) against finite differences, and
// bitwise determinism across thread counts.
#include <unistd.h>

#include "gradcheck.hpp"

using namespace dsv3;

// A config small enough for finite differences that still has every structural feature: query LoRA, one dense and
// one MoE layer, shared + routed experts with a group limit, MTP depth 2, YaRN.
inline Config micro_config() {
    Config c;
    c.vocab_size = 19; c.dim = 16; c.inter_dim = 24; c.moe_inter_dim = 8;
    c.n_layers = 2; c.n_dense_layers = 1; c.n_heads = 2;
    c.n_routed_experts = 6; c.n_shared_experts = 1; c.n_activated_experts = 2;
    c.n_expert_groups = 3; c.n_limited_groups = 2;
    c.q_lora_rank = 8; c.kv_lora_rank = 8; c.qk_nope_head_dim = 4; c.qk_rope_head_dim = 4; c.v_head_dim = 6;
    c.max_seq_len = 16; c.n_mtp_depth = 2; c.init_std = 0.3f; c.route_scale = 1.5f;
    c.rope_factor = 4; c.original_seq_len = 8;
    return c;
}

inline std::vector<int32_t> random_tokens(int B, int T, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<int32_t> t(size_t(B) * (T + 1));
    for (auto& x : t) x = int32_t(rng.below(uint64_t(vocab)));
    return t;
}

TEST_CASE("model: gradient of the whole loss matches finite differences") {
    for (BalanceLoss balance : {BalanceLoss::sequence_wise, BalanceLoss::expert_level}) {
        for (int q_lora : {8, 0}) {
            Config c = micro_config();
            c.q_lora_rank = q_lora;
            Model model(c, 7);
            // non-zero routing bias, so the biased selection is exercised
            for (Block* b : model.moe_blocks())
                for (int i = 0; i < c.n_routed_experts; ++i) model.param_at(b->moe.bias)[i] = 0.05f * float(i % 3);
            const int B = 2, T = 6;
            std::vector<int32_t> tokens = random_tokens(B, T, c.vocab_size, 3);
            LossOptions opt;
            opt.balance = balance;
            opt.balance_alpha = 0.1f;  // large, so its gradient is visible in the check
            model.forward_backward(tokens.data(), B, T, opt);
            model.reuse_routing = true;  // the choice of experts is discrete: hold it fixed for the differences
            std::vector<float> analytic = model.grads;
            auto loss = [&] { return model.forward(tokens.data(), B, T, opt).total; };
            gradcheck::Result r = gradcheck::check(model.params.data(), model.params.size(), analytic, loss, 1500);
            INFO("balance ", int(balance), " q_lora ", q_lora, ": max abs err ", r.max_abs_err, ", rel norm err ",
                 r.rel_norm_err, ", checked ", r.checked);
            CHECK(r.failed == 0);
            CHECK(r.rel_norm_err < 1e-2);
        }
    }
}

// Runs `steps` training steps of the micro model on fixed random data and returns every loss.
static std::vector<double> train_losses(int steps, int threads, const std::string& save_at_path = "", int save_at = -1,
                                        const std::string& resume_from = "") {
#ifdef _OPENMP
    const int saved_threads = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    Config c = micro_config();
    c.init_std = 0.05f;
    c.bias_update_speed = 0.01f;
    Model model(c, 11);
    AdamW opt;
    if (!resume_from.empty()) load_checkpoint(resume_from, model, opt);
    LossOptions lo;
    lo.balance = BalanceLoss::sequence_wise;
    std::vector<double> losses;
    const int B = 3, T = 8;
    for (int step = opt.step; step < steps; ++step) {
        std::vector<int32_t> tokens = random_tokens(B, T, c.vocab_size, 100 + uint64_t(step % 2));  // two batches: learnable
        StepResult r = train_step(model, opt, tokens.data(), B, T, 3e-3f, lo, true);
        losses.push_back(r.loss.total);
        if (step + 1 == save_at) save_checkpoint(save_at_path, model, opt);
    }
#ifdef _OPENMP
    omp_set_num_threads(saved_threads);
#endif
    return losses;
}

TEST_CASE("model: 20 training steps give bitwise identical losses with 1 and 2 threads") {
    std::vector<double> one = train_losses(20, 1), two = train_losses(20, 2);
    REQUIRE(one.size() == 20);
    for (size_t i = 0; i < one.size(); ++i) CHECK(one[i] == two[i]);  // exact: no tolerance
    CHECK(one.back() < one.front());  // and it learns
}

TEST_CASE("model: resuming from a checkpoint gives bitwise the same losses as never stopping") {
    const std::string path = "/tmp/dsv3_test_resume_" + std::to_string(::getpid()) + ".bin";
    std::vector<double> straight = train_losses(12, 2, path, 5);
    std::vector<double> resumed = train_losses(12, 2, "", -1, path);
    std::remove(path.c_str());
    REQUIRE(resumed.size() == 7);
    for (size_t i = 0; i < resumed.size(); ++i) CHECK(resumed[i] == straight[5 + i]);
}

TEST_CASE("model: FP8 training (V3 recipe) stays close to FP32, keeps the head and router in FP32, moments in BF16") {
    Config c = micro_config();
    c.init_std = 0.1f;
    Config c8 = c;
    c8.fp8_training = true;
    Model m32(c, 3), m8(c8, 3);
    const int B = 2, T = 8;
    std::vector<int32_t> tokens = random_tokens(B, T, c.vocab_size, 4);
    const double l32 = m32.forward_backward(tokens.data(), B, T).total;
    const double l8 = m8.forward_backward(tokens.data(), B, T).total;
    CHECK(l8 != l32);                                  // the FP8 path is really taken
    CHECK(std::fabs(l8 - l32) / l32 < 0.01);           // E4M3 keeps 3 mantissa bits: ~3% per value, averaged out
    double dot = 0, n32 = 0, n8 = 0;
    for (size_t i = 0; i < m32.grads.size(); ++i) {
        dot += double(m32.grads[i]) * m8.grads[i];
        n32 += double(m32.grads[i]) * m32.grads[i];
        n8 += double(m8.grads[i]) * m8.grads[i];
    }
    CHECK(dot / std::sqrt(n32 * n8) > 0.99);           // the FP8 gradient points the same way
    AdamW opt;
    adamw_step(m8, opt, 1e-3f);
    for (size_t i = 0; i < opt.m.size(); i += 7) {     // the moments are BF16 values
        CHECK(opt.m[i] == bf16_round(opt.m[i]));
        CHECK(opt.v[i] == bf16_round(opt.v[i]));
    }
    CHECK(!m8.layout.head.fp8);
    for (Block* b : m8.moe_blocks()) CHECK(!b->moe.router.fp8);
}

TEST_CASE("model: adamw_step's runs of neighbouring tensors give the bits of one update per tensor") {
    Model a(micro_config(), 7), b(micro_config(), 7);
    const std::vector<int32_t> tokens = random_tokens(2, 8, a.cfg.vocab_size, 3);
    for (Model* m : {&a, &b}) {
        m->forward(tokens.data(), 2, 8, LossOptions{});
        m->backward();
    }
    AdamW oa, ob;
    oa.clip_norm = ob.clip_norm = 0;  // clipping is the same in both; leave it out
    adamw_step(a, oa, 1e-2f);
    ob.m.assign(b.params.size(), 0.0f), ob.v.assign(b.params.size(), 0.0f), ob.step = 1;
    for (const ParamEntry& e : b.layout.entries) {
        if (e.kind == ParamKind::routing_bias) continue;
        adamw_update(b.params.data() + e.offset, b.grads.data() + e.offset, ob.m.data() + e.offset,
                     ob.v.data() + e.offset, int64_t(e.size), 1e-2f, ob.beta1, ob.beta2, ob.eps,
                     e.kind == ParamKind::matrix ? ob.weight_decay : 0.0f, ob.step);
    }
    CHECK(a.params == b.params);
    CHECK(oa.m == ob.m);
    CHECK(oa.v == ob.v);
}

TEST_CASE("profile: a step's modules and kernels, each kernel under its innermost module") {
    Model m(micro_config(), 7);
    AdamW opt;
    const std::vector<int32_t> tokens = random_tokens(2, 8, m.cfg.vocab_size, 3);
    profile().start(nullptr);
    {
        DSV3_PROFILE_MODULE("training step");
        train_step(m, opt, tokens.data(), 2, 8, 1e-3f, LossOptions{});
    }
    profile().on = false;
    const Profile& p = profile();
    REQUIRE(p.modules.count("training step"));
    const double step = p.modules.at("training step").seconds;
    for (const char* name : {"MLA forward", "MLA backward", "MoE forward", "routed experts backward", "AdamW step"}) {
        CAPTURE(name);
        REQUIRE(p.modules.count(name));
        CHECK(p.modules.at(name).seconds <= step);
    }
    // 2 main blocks and 2 MTP blocks: 4 attentions, each charged to MLA forward, not to the block or the step
    REQUIRE(p.kernels.count("MLA forward | attention_forward"));
    CHECK(p.kernels.at("MLA forward | attention_forward").calls == 4);
    CHECK(p.kernels.count("training step | attention_forward") == 0);
    CHECK(p.table(1).find("MLA backward | attention_backward") != std::string::npos);
    const int64_t updates = p.kernels.at("AdamW step | adamw_update").calls;
    CHECK(updates > 0);
    CHECK(updates < int64_t(m.layout.entries.size()));   // runs, not one call per tensor
}

TEST_CASE("model: named views of parameters and gradients by Hugging Face name") {
    Config c = micro_config();
    Model m(c, 1);
    TensorView gate = m.param("model.layers.1.mlp.gate.weight");  // the router of the first MoE layer
    CHECK(gate.shape == std::vector<int64_t>{c.n_routed_experts, c.dim});
    CHECK(gate.numel() == int64_t(c.n_routed_experts) * c.dim);
    gate.at(2, 3) = 0.5f;
    CHECK(m.params[m.layout.find("model.layers.1.mlp.gate.weight").offset + 2 * size_t(c.dim) + 3] == 0.5f);
    CHECK(m.param("model.norm.weight").at(0) == 1.0f);  // RMSNorm gains start at 1
    CHECK_THROWS_WITH_AS(gate.at(c.n_routed_experts, 0), doctest::Contains("outside its shape"), Error);
    CHECK_THROWS_WITH_AS(m.param("model.no_such.weight"), doctest::Contains("no such tensor"), Error);
    CHECK(m.grad("lm_head.weight").data == m.grads.data() + m.layout.head.w);
}
