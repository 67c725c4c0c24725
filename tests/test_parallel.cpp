// Section 9, parallelism, on simulated ranks (threads of this process): the collectives, data parallelism (DP),
// expert parallelism (EP) and both together, each against the single-rank computation.
#include <doctest/doctest.h>

#include "../deepseek_v3.hpp"

using namespace dsv3;

namespace {

// Small enough that every test runs in well under a second on two cores, with every structural feature: query
// LoRA, one dense and one MoE layer, an MTP module (a second MoE layer), shared + routed experts, and group-limited
// routing with one group per rank (n_expert_groups = R), so a token touches at most n_limited_groups ranks.
Config parallel_config(int groups, int limited) {
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

std::vector<int32_t> random_rows(int B, int T, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<int32_t> t(size_t(B) * (T + 1));
    for (auto& x : t) x = int32_t(rng.below(uint64_t(vocab)));
    return t;
}

// A model with a non-zero routing bias, so that the biased selection is exercised from the first step.
void set_bias(Model& m) {
    for (Block* b : m.moe_blocks())
        for (int i = 0; i < m.cfg.n_routed_experts; ++i) m.param_at(b->moe.bias)[i] = 0.05f * float(i % 3);
}

LossOptions loss_options() {
    LossOptions o;
    o.balance = BalanceLoss::sequence_wise;
    o.balance_alpha = 0.01f;
    return o;
}

bool bitwise_equal(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

}  // namespace

TEST_CASE("parallel: ring all-reduce on 1..5 ranks, uneven sizes: deterministic, same on every rank") {
    for (int R = 1; R <= 5; ++R)
        for (size_t n : {size_t(0), size_t(1), size_t(3), size_t(7), size_t(1000), size_t(1001)}) {
            auto input = [&](int r, size_t i) { return float(Rng(uint64_t(r) * 7919 + i).normal()); };
            std::vector<std::vector<float>> out(static_cast<size_t>(R)), out_mean(static_cast<size_t>(R));
            std::vector<std::vector<int64_t>> out_int(static_cast<size_t>(R));
            run_ranks(R, [&](Communicator& comm) {
                const int r = comm.rank();
                std::vector<float> x(n), xm(n);
                std::vector<int64_t> xi(n);
                for (size_t i = 0; i < n; ++i) xm[i] = x[i] = input(r, i), xi[i] = int64_t(r * 1000 + i);
                all_reduce(comm, x.data(), n);
                all_reduce(comm, xm.data(), n, ReduceOp::mean);
                all_reduce(comm, xi.data(), n);
                out[size_t(r)] = x, out_mean[size_t(r)] = xm, out_int[size_t(r)] = xi;
            });
            INFO("ranks ", R, ", n ", n);
            for (int r = 1; r < R; ++r) CHECK(out[size_t(r)] == out[0]);  // bitwise the same on every rank
            bool ring_order = true, serial_bitwise = true, serial_close = true, ints = true, mean = true;
            for (size_t i = 0; i < n; ++i) {
                // chunk c = [n·c/R, n·(c+1)/R) is summed starting at rank c: ((x_c + x_{c+1}) + …) + x_{c−1}
                int c = 0;
                while (n * size_t(c + 1) / size_t(R) <= i) ++c;
                float ring = input(c, i), serial = input(0, i), abs_sum = std::fabs(input(0, i));
                for (int s = 1; s < R; ++s) {
                    ring = ring + input((c + s) % R, i);
                    serial = serial + input(s, i);
                    abs_sum += std::fabs(input(s, i));
                }
                ring_order &= out[0][i] == ring;
                serial_bitwise &= out[0][i] == serial;
                serial_close &= std::fabs(out[0][i] - serial) <= 2 * R * FLT_EPSILON * abs_sum;
                mean &= out_mean[0][i] == out[0][i] / float(R);
                int64_t sum_int = 0;
                for (int s = 0; s < R; ++s) sum_int += s * 1000 + int64_t(i);
                ints &= out_int[0][i] == sum_int;
            }
            CHECK(ring_order);
            CHECK(serial_close);
            if (R <= 2) CHECK(serial_bitwise);  // x_1 + x_0 == x_0 + x_1: a rotation of two terms changes nothing
            CHECK(mean);
            CHECK(ints);
        }
}

TEST_CASE("parallel: all-to-all on 1..5 ranks with uneven and empty counts") {
    for (int R = 1; R <= 5; ++R) {
        const int row = 3;
        auto rows = [](int src, int dst) { return int64_t((src * 7 + dst * 3) % 5); };  // 0..4 rows, some empty
        auto value = [](int src, int dst, int64_t i, int j) { return int32_t(src * 100000 + dst * 1000 + i * 10 + j); };
        std::vector<std::vector<int64_t>> got_counts(static_cast<size_t>(R));
        std::vector<std::vector<int32_t>> got(static_cast<size_t>(R));
        run_ranks(R, [&](Communicator& comm) {
            const int r = comm.rank();
            std::vector<int64_t> counts(static_cast<size_t>(R));
            std::vector<int32_t> send;
            for (int q = 0; q < R; ++q) {
                counts[size_t(q)] = rows(r, q);
                for (int64_t i = 0; i < counts[size_t(q)]; ++i)
                    for (int j = 0; j < row; ++j) send.push_back(value(r, q, i, j));
            }
            std::vector<int64_t> recv_counts = exchange_counts(comm, counts);
            const int64_t n_recv = std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t(0));
            std::vector<int32_t> recv(size_t(n_recv * row));
            all_to_all(comm, send.data(), counts, row, recv.data(), recv_counts);
            got_counts[size_t(r)] = recv_counts;
            got[size_t(r)] = recv;
        });
        for (int r = 0; r < R; ++r) {
            std::vector<int64_t> want_counts;
            std::vector<int32_t> want;
            for (int q = 0; q < R; ++q) {  // grouped by source rank, in rank order
                want_counts.push_back(rows(q, r));
                for (int64_t i = 0; i < rows(q, r); ++i)
                    for (int j = 0; j < row; ++j) want.push_back(value(q, r, i, j));
            }
            INFO("ranks ", R, ", rank ", r);
            CHECK(got_counts[size_t(r)] == want_counts);
            CHECK(got[size_t(r)] == want);
        }
    }
}

TEST_CASE("parallel: barrier: nobody passes before everybody has arrived") {
    for (int R = 1; R <= 5; ++R) {
        std::vector<int> arrived(static_cast<size_t>(R), 0), saw_all(static_cast<size_t>(R), 0);
        run_ranks(R, [&](Communicator& comm) {
            std::this_thread::sleep_for(std::chrono::milliseconds(2 * comm.rank()));  // arrive at different times
            arrived[size_t(comm.rank())] = 1;
            comm.barrier();
            saw_all[size_t(comm.rank())] = std::accumulate(arrived.begin(), arrived.end(), 0) == R;
        });
        CHECK(std::accumulate(saw_all.begin(), saw_all.end(), 0) == R);
    }
}

TEST_CASE("parallel: a rank that fails stops the others instead of hanging") {
    CHECK_THROWS_WITH_AS(run_ranks(3, [&](Communicator& comm) {
        float x[4] = {};
        if (comm.rank() == 1) comm.sendrecv(x, 8, 2, x + 2, 8, 0);  // sends 8 bytes where 16 are expected
        else comm.sendrecv(x, 16, (comm.rank() + 1) % 3, x, 16, (comm.rank() + 2) % 3);
    }), doctest::Contains("bytes from rank"), Error);  // rank 1 or rank 2 notices first: both are right
}

// ---------------------------------------------------------------------------------------------------------------------
// Training. The reference is one Model on the whole batch with the single-rank train_step; the parallel runs give
// each rank a Model built from the same seed and its rows of the same batch.
namespace {

struct Trained {
    std::vector<float> params;   // the whole flat buffer; under EP assembled from the experts' owners
    std::vector<double> losses;  // total loss of each step (whole batch)
    bool replicas_identical = true;  // every rank holds bitwise the same replicated parameters
    int max_ranks_per_token = 0;     // EP: the most ranks a token was dispatched to
};

constexpr float kLr = 1e-2f;

Trained train_single(const Config& c, int B, int T, int steps) {
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

// Trains on R simulated ranks; with_ep splits the routed experts too. Returns every rank's result; under EP each
// rank's params have the routed experts copied in from their owners, so they compare with the single-rank model.
std::vector<Trained> train_parallel(const Config& c, int R, int B, int T, int steps, bool with_ep) {
    std::vector<Trained> out(static_cast<size_t>(R));
    run_ranks(R, [&](Communicator& comm) {
        const int r = comm.rank();
        Model model(c, 11);
        set_bias(model);
        AdamW opt;
        std::unique_ptr<ExpertParallel> ep(with_ep ? new ExpertParallel(comm, c) : nullptr);
        for (int s = 0; s < steps; ++s) {
            std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 100 + uint64_t(s));
            const RowShare share = row_share(B, R, r);
            StepResult res = parallel_train_step(comm, model, opt, tokens.data() + size_t(share.first) * (T + 1),
                                                 share.count, T, kLr, loss_options(), ep.get());
            out[size_t(r)].losses.push_back(res.loss.total);
        }
        if (ep) out[size_t(r)].max_ranks_per_token = ep->stats.max_ranks_per_token;
        out[size_t(r)].params = model.params;
    });
    Model shape(c, 0);
    for (const ParamEntry& e : shape.layout.entries)  // replicated: everything but (under EP) the routed experts
        if (!(with_ep && e.routed_expert))
            for (int r = 1; r < R; ++r)
                out[0].replicas_identical &= bitwise_equal(out[size_t(r)].params.data() + e.offset,
                                                           out[0].params.data() + e.offset, e.size);
    if (with_ep) {  // each routed expert's weights from the rank that owns it
        std::vector<float> assembled = out[0].params;
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
    return out;
}

// max |a − b| over all parameters
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double d = 0;
    for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::fabs(a[i] - b[i])));
    return d;
}

}  // namespace

// Tolerance. DP changes one thing only: the ORDER of the sums over tokens that make the weight gradients (per rank,
// then over the ranks). Every per-token quantity (activations, logits, per-token gradients) is computed identically:
// a matmul row does not depend on the other rows of its batch (section 3.1), and the per-rank loss scale 1/n_r is
// R/n, exact for equal shares on 2^k ranks (uneven shares add one rounding, in the weight B_r/B). So the gradients
// differ from the single-rank ones by a few roundings of the sums, ~1e-7 relative. AdamW's first steps divide m by
// √v ≈ |g|, so most updates change by about the same relative amount; where a gradient is nearly a cancellation,
// its relative error is larger and AdamW passes it on at full size (up to 2·lr per step if its sign flips).
// Tolerance: 1e-3 of lr·steps per parameter. Measured (x86-64, -O3 -march=native): at most 5.2e-5 of lr·steps for DP,
// 1.3e-5 for DP×EP. A real bug shows at O(lr): forgetting the expert-gradient weight w_r under EP gives 3e-2.
TEST_CASE("parallel: data parallel on 2 and 4 ranks = one rank on the whole batch after 3 AdamW steps") {
    const int T = 8, steps = 3;
    for (int B : {4, 6}) {  // 6 rows on 4 ranks: shares 1,2,1,2 (uneven), weighted B_r/B
        const Config c = parallel_config(4, 2);
        const Trained single = train_single(c, B, T, steps);
        for (int R : {2, 4}) {
            std::vector<Trained> dp = train_parallel(c, R, B, T, steps, false);
            INFO("B ", B, ", ranks ", R);
            CHECK(dp[0].replicas_identical);
            const double d = max_abs_diff(dp[0].params, single.params);
            INFO("max |param diff| ", d, " = ", d / (kLr * steps), " lr·steps");
            CHECK(d <= 1e-3 * kLr * steps);
            for (int s = 0; s < steps; ++s)
                CHECK(dp[0].losses[size_t(s)] == doctest::Approx(single.losses[size_t(s)]).epsilon(1e-5));
            // the routing biases: integer loads summed over ranks, the same ±γ steps as on one rank
            Model shape(c, 0);
            for (Block* b : shape.moe_blocks())
                CHECK(bitwise_equal(dp[0].params.data() + b->moe.bias, single.params.data() + b->moe.bias,
                                    size_t(c.n_routed_experts)));
        }
    }
}

// EP alone, one forward/backward, against one rank: BITWISE. Each rank r is compared with a single model on the same
// rows (activations, logits, losses and every gradient outside the routed experts: the rank computes exactly what
// a single model on its rows computes), and each routed expert's gradient on its owner with a single model on the
// whole batch (the owner sees the same rows in the same order; its loss scale is R times larger, exactly).
TEST_CASE("parallel: expert parallel on 2 and 4 ranks = the single-rank MoE layers, forward and backward, bitwise") {
    const int T = 6;
    for (auto [R, fp8] : {std::pair{2, false}, std::pair{4, false}, std::pair{2, true}}) {
        Config c = parallel_config(R, R / 2);  // one group per rank; a token touches at most R/2 ranks
        c.fp8_training = fp8;  // FP8 GEMMs quantize per row (1x128) and per 128 rows of the same expert: still exact
        const int B = 2 * R;
        const std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 5);
        Model full(c, 11);
        set_bias(full);
        full.forward_backward(tokens.data(), B, T, loss_options());
        struct RankResult { std::vector<float> logits, grads; double loss = 0; ExpertParallel::Stats stats; };
        std::vector<RankResult> ep_out(static_cast<size_t>(R));
        const int64_t logits_per_rank = int64_t(B / R) * T * c.vocab_size;
        run_ranks(R, [&](Communicator& comm) {
            const int r = comm.rank();
            Model model(c, 11);
            set_bias(model);
            ExpertParallel ep(comm, c);
            model.expert_runner = &ep;
            const RowShare share = row_share(B, R, r);
            RankResult& out = ep_out[size_t(r)];
            out.loss = model.forward_backward(tokens.data() + size_t(share.first) * (T + 1), share.count, T,
                                              loss_options()).total;
            out.logits.assign(model.logits(), model.logits() + logits_per_rank);
            out.grads = model.grads;
            out.stats = ep.stats;
        });
        Model shape(c, 0);
        std::vector<bool> routed(shape.params.size(), false);
        for (const ParamEntry& e : shape.layout.entries)
            if (e.routed_expert) std::fill_n(routed.begin() + long(e.offset), e.size, true);
        for (int r = 0; r < R; ++r) {
            INFO("ranks ", R, ", fp8 ", fp8, ", rank ", r);
            const RowShare share = row_share(B, R, r);
            Model one(c, 11);  // a single model on this rank's rows
            set_bias(one);
            const double loss = one.forward_backward(tokens.data() + size_t(share.first) * (T + 1), share.count, T,
                                                     loss_options()).total;
            const RankResult& got = ep_out[size_t(r)];
            CHECK(got.loss == loss);
            CHECK(bitwise_equal(got.logits.data(), one.logits(), size_t(logits_per_rank)));
            bool outside_experts = true, own_experts = true, others_zero = true;
            for (Block* b : shape.moe_blocks())
                for (int e = 0; e < c.n_routed_experts; ++e)
                    for (const Linear* w : {&b->moe.experts[size_t(e)].gate, &b->moe.experts[size_t(e)].up,
                                            &b->moe.experts[size_t(e)].down})
                        for (size_t i = w->w; i < w->w + size_t(w->out) * w->in; ++i) {
                            if (e * R / c.n_routed_experts == r)  // the owner; its loss scale is R times larger
                                own_experts &= got.grads[i] / float(R) == full.grads[i];
                            else others_zero &= got.grads[i] == 0.0f;
                        }
            for (size_t i = 0; i < routed.size(); ++i)
                if (!routed[i]) outside_experts &= got.grads[i] == one.grads[i];
            CHECK(outside_experts);
            CHECK(own_experts);
            CHECK(others_zero);
            CHECK(got.stats.max_ranks_per_token <= c.n_limited_groups);  // the group limit bounds the ranks
            CHECK(got.stats.dispatched_rows > 0);
        }
    }
}

TEST_CASE("parallel: DP x EP on 2 and 4 ranks = one rank on the whole batch after 3 AdamW steps") {
    const int T = 8, steps = 3;
    for (int R : {2, 4}) {
        const Config c = parallel_config(R, R / 2);
        const int B = 8;
        const Trained single = train_single(c, B, T, steps);
        std::vector<Trained> ep = train_parallel(c, R, B, T, steps, true);
        INFO("ranks ", R);
        CHECK(ep[0].replicas_identical);
        for (const Trained& t : ep) CHECK(t.max_ranks_per_token <= c.n_limited_groups);
        const double d = max_abs_diff(ep[0].params, single.params);
        INFO("max |param diff| ", d, " = ", d / (kLr * steps), " lr·steps");
        CHECK(d <= 1e-3 * kLr * steps);
        for (int s = 0; s < steps; ++s)
            CHECK(ep[0].losses[size_t(s)] == doctest::Approx(single.losses[size_t(s)]).epsilon(1e-5));
    }
}

TEST_CASE("parallel: expert parallelism refuses unequal shares of the batch") {
    const Config c = parallel_config(2, 1);
    CHECK_THROWS_WITH_AS(run_ranks(2, [&](Communicator& comm) {
        Model model(c, 1);
        AdamW opt;
        ExpertParallel ep(comm, c);
        std::vector<int32_t> tokens = random_rows(3, 4, c.vocab_size, 1);
        parallel_train_step(comm, model, opt, tokens.data(), comm.rank() == 0 ? 1 : 2, 4, kLr, loss_options(), &ep);
    }), doctest::Contains("equal shares"), Error);
}
