// The configuration, data and runs shared by the parallelism tests: tests/test_parallel.cpp (ranks as threads of the
// test binary) and tests/mpi/test_mpi.cpp (ranks as MPI processes). One rank's work is written once, on a
// Communicator, so both run exactly the same code per rank; only what carries the bytes differs.
#pragma once
#include <cstring>
#include <memory>
#include <vector>

#include "../deepseek_v3.hpp"

namespace parallel_test {
using namespace dsv3;

// Small enough that every test runs in well under a second on two cores, with every structural feature: query
// LoRA, one dense and one MoE layer, an MTP module (a second MoE layer), shared + routed experts, and group-limited
// routing with one group per rank (n_expert_groups = R), so a token touches at most n_limited_groups ranks.
inline Config parallel_config(int groups, int limited) {
    Config c;
    c.vocab_size = 32; c.dim = 16; c.inter_dim = 24; c.moe_inter_dim = 8;
    c.n_layers = 2; c.n_dense_layers = 1; c.n_heads = 2;
    c.n_routed_experts = 8; c.n_shared_experts = 1; c.n_activated_experts = 3;
    c.n_expert_groups = groups; c.n_limited_groups = limited;
    c.q_lora_rank = 8; c.kv_lora_rank = 8; c.qk_nope_head_dim = 4; c.qk_rope_head_dim = 4; c.v_head_dim = 6;
    c.max_seq_len = 16; c.n_mtp_depth = 1; c.init_std = 0.3f;
    c.bias_update_speed = 0.01f;
    return c;
}

inline std::vector<int32_t> random_rows(int B, int T, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<int32_t> t(size_t(B) * (T + 1));
    for (auto& x : t) x = int32_t(rng.below(uint64_t(vocab)));
    return t;
}

// A model with a non-zero routing bias, so that the biased selection is exercised from the first step.
inline void set_bias(Model& m) {
    for (Block* b : m.moe_blocks())
        for (int i = 0; i < m.cfg.n_routed_experts; ++i) m.param_at(b->moe.bias)[i] = 0.05f * float(i % 3);
}

inline LossOptions loss_options() {
    LossOptions o;
    o.balance = BalanceLoss::sequence_wise;
    o.balance_alpha = 0.01f;
    return o;
}

inline bool bitwise_equal(const float* a, const float* b, size_t n) {
    return std::memcmp(a, b, n * sizeof(float)) == 0;
}

// ---------------------------------------------------------------------------------------------------------------------
// Training. The reference is one Model on the whole batch with the single-rank train_step; the parallel runs give
// each rank a Model built from the same seed and its rows of the same batch.
struct Trained {
    std::vector<float> params;   // the whole flat buffer; under EP assembled from the experts' owners
    std::vector<double> losses;  // total loss of each step (whole batch)
    bool replicas_identical = true;  // every rank holds bitwise the same replicated parameters
    int max_ranks_per_token = 0;     // EP: the most ranks a token was dispatched to
};

constexpr float kLr = 1e-2f;

inline Trained train_single(const Config& c, int B, int T, int steps) {
    Model model(c, 11);
    set_bias(model);
    AdamW opt;
    Trained out;
    for (int s = 0; s < steps; ++s) {
        std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 100 + uint64_t(s));
        out.losses.push_back(train_step(model, opt, tokens.data(), B, T, kLr, loss_options()).loss.total);
    }
    out.params = model.params;
    return out;
}

// One rank's training (with_ep: the routed experts split over the ranks too, their dispatch in FP8 with
// fp8_dispatch; sync: the gradient buckets): its own, unassembled parameters.
inline Trained train_rank(Communicator& comm, const Config& c, int B, int T, int steps, bool with_ep,
                          const GradientSync& sync = {}, bool fp8_dispatch = false) {
    const int R = comm.world_size(), r = comm.rank();
    Trained out;
    Model model(c, 11);
    set_bias(model);
    AdamW opt;
    std::unique_ptr<ExpertParallel> ep(with_ep ? new ExpertParallel(comm, c) : nullptr);
    if (ep) ep->fp8_dispatch = fp8_dispatch;
    for (int s = 0; s < steps; ++s) {
        std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 100 + uint64_t(s));
        const RowShare share = row_share(B, R, r);
        StepResult res = parallel_train_step(comm, model, opt, tokens.data() + size_t(share.first) * (T + 1),
                                             share.count, T, kLr, loss_options(), ep.get(), true, sync);
        out.losses.push_back(res.loss.total);
    }
    if (ep) out.max_ranks_per_token = ep->stats.max_ranks_per_token;
    out.params = model.params;
    return out;
}

// Every rank's result, as train_rank left it: checks that the replicated parameters are bitwise the same on every
// rank (out[0].replicas_identical), and under EP gives every rank the routed experts copied in from their owners,
// so that each compares with the single-rank model.
inline void assemble(const Config& c, bool with_ep, std::vector<Trained>& out) {
    const int R = int(out.size());
    Model shape(c, 0);
    for (const ParamEntry& e : shape.layout.entries)  // replicated: everything but (under EP) the routed experts
        if (!(with_ep && e.routed_expert))
            for (int r = 1; r < R; ++r)
                out[0].replicas_identical &= bitwise_equal(out[size_t(r)].params.data() + e.offset,
                                                           out[0].params.data() + e.offset, e.size);
    if (!with_ep) return;
    std::vector<float> assembled = out[0].params;  // each routed expert's weights from the rank that owns it
    for (Block* b : shape.moe_blocks())
        for (int e = 0; e < c.n_routed_experts; ++e)
            for (const Linear* w : {&b->moe.experts[size_t(e)].gate, &b->moe.experts[size_t(e)].up,
                                    &b->moe.experts[size_t(e)].down}) {
                const int owner = e * R / c.n_routed_experts;  // rank r owns [r·N/R, (r+1)·N/R); N % R == 0
                std::copy_n(out[size_t(owner)].params.begin() + long(w->w), size_t(w->out) * w->in,
                            assembled.begin() + long(w->w));
            }
    for (Trained& t : out) t.params = assembled;
}

// Trains on R simulated ranks (threads); returns every rank's result, assembled.
inline std::vector<Trained> train_parallel(const Config& c, int R, int B, int T, int steps, bool with_ep,
                                           const GradientSync& sync = {}, bool fp8_dispatch = false) {
    std::vector<Trained> out(static_cast<size_t>(R));
    run_ranks(R, [&](Communicator& comm) {
        out[size_t(comm.rank())] = train_rank(comm, c, B, T, steps, with_ep, sync, fp8_dispatch);
    });
    assemble(c, with_ep, out);
    return out;
}

// max |a − b| over all parameters
inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double d = 0;
    for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::fabs(a[i] - b[i])));
    return d;
}

// ---------------------------------------------------------------------------------------------------------------------
// EP alone, one forward/backward on B rows, against one rank: what one rank computes, and its comparison with single
// models (read the test in test_parallel.cpp for why each equality is exact).
struct EpRankResult { std::vector<float> logits, grads; double loss = 0; ExpertParallel::Stats stats; };

inline EpRankResult ep_forward_backward(Communicator& comm, const Config& c, const std::vector<int32_t>& tokens, int B,
                                        int T) {
    const int R = comm.world_size(), r = comm.rank();
    Model model(c, 11);
    set_bias(model);
    ExpertParallel ep(comm, c);
    model.expert_runner = &ep;
    const RowShare share = row_share(B, R, r);
    EpRankResult out;
    out.loss = model.forward_backward(tokens.data() + size_t(share.first) * (T + 1), share.count, T,
                                      loss_options()).total;
    out.logits.assign(model.logits(), model.logits() + int64_t(B / R) * T * c.vocab_size);
    out.grads = model.grads;
    out.stats = ep.stats;
    return out;
}

struct EpCheck { bool loss = false, logits = false, outside_experts = true, own_experts = true, others_zero = true; };

// Rank r of R against a single model on its rows (everything outside the routed experts) and, for the experts it
// owns, against `full`, a single model after forward_backward on the whole batch (loss scale R times smaller).
inline EpCheck ep_check(const Config& c, const std::vector<int32_t>& tokens, int B, int T, int R, int r,
                        const EpRankResult& got, const Model& full) {
    const RowShare share = row_share(B, R, r);
    Model one(c, 11);
    set_bias(one);
    EpCheck k;
    k.loss = got.loss == one.forward_backward(tokens.data() + size_t(share.first) * (T + 1), share.count, T,
                                              loss_options()).total;
    k.logits = bitwise_equal(got.logits.data(), one.logits(), got.logits.size());
    std::vector<bool> routed(one.params.size(), false);
    for (const ParamEntry& e : one.layout.entries)
        if (e.routed_expert) std::fill_n(routed.begin() + long(e.offset), e.size, true);
    for (Block* b : one.moe_blocks())
        for (int e = 0; e < c.n_routed_experts; ++e)
            for (const Linear* w : {&b->moe.experts[size_t(e)].gate, &b->moe.experts[size_t(e)].up,
                                    &b->moe.experts[size_t(e)].down})
                for (size_t i = w->w; i < w->w + size_t(w->out) * w->in; ++i) {
                    if (e * R / c.n_routed_experts == r)  // the owner; its loss scale is R times larger
                        k.own_experts &= got.grads[i] / float(R) == full.grads[i];
                    else k.others_zero &= got.grads[i] == 0.0f;
                }
    for (size_t i = 0; i < routed.size(); ++i)
        if (!routed[i]) k.outside_experts &= got.grads[i] == one.grads[i];
    return k;
}

}  // namespace parallel_test
