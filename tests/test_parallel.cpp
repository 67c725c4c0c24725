// Section 9, parallelism, on simulated ranks (threads of this process): the collectives, data parallelism (DP),
// expert parallelism (EP) and both together, each against the single-rank computation.
#include <doctest/doctest.h>

#include "parallel_helpers.hpp"

using namespace dsv3;
using namespace parallel_test;  // parallel_config, random_rows, train_single, train_parallel, ...

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

// Training: train_single (one Model on the whole batch) against train_parallel (R thread ranks, each with a Model
// from the same seed and its rows of the same batch), in parallel_helpers.hpp.

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
    for (const std::pair<int, bool>& ranks_fp8 : {std::pair{2, false}, std::pair{4, false}, std::pair{2, true}}) {
        const int R = ranks_fp8.first;  // (not a structured binding: INFO captures it, which clang 14 refuses)
        const bool fp8 = ranks_fp8.second;
        Config c = parallel_config(R, R / 2);  // one group per rank; a token touches at most R/2 ranks
        c.fp8_training = fp8;  // FP8 GEMMs quantize per row (1x128) and per 128 rows of the same expert: still exact
        const int B = 2 * R;
        const std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 5);
        Model full(c, 11);
        set_bias(full);
        full.forward_backward(tokens.data(), B, T, loss_options());
        std::vector<EpRankResult> ep_out(static_cast<size_t>(R));
        run_ranks(R, [&](Communicator& comm) { ep_out[size_t(comm.rank())] = ep_forward_backward(comm, c, tokens, B, T); });
        for (int r = 0; r < R; ++r) {
            INFO("ranks ", R, ", fp8 ", fp8, ", rank ", r);
            const EpRankResult& got = ep_out[size_t(r)];
            const EpCheck k = ep_check(c, tokens, B, T, R, r, got, full);
            CHECK(k.loss);
            CHECK(k.logits);
            CHECK(k.outside_experts);
            CHECK(k.own_experts);
            CHECK(k.others_zero);
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

// ---------------------------------------------------------------------------------------------------------------------
// Gradient buckets and their overlap with the backward (section 9.5).

// The contract the overlap rests on: at each report, no gradient at or above the offset changes any more.
TEST_CASE("parallel: the backward reports final gradients from the end of the flat buffer down to 0") {
    const Config c = parallel_config(4, 2);
    const int B = 2, T = 6;
    Model model(c, 11);
    set_bias(model);
    const std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 3);
    std::vector<size_t> offsets;
    std::vector<std::vector<float>> tails;  // grads[offset:] at each report
    model.on_gradients_final = [&](size_t o) {
        offsets.push_back(o);
        tails.emplace_back(model.grads.begin() + long(o), model.grads.end());
    };
    model.forward_backward(tokens.data(), B, T, loss_options());
    REQUIRE(offsets.size() == size_t(c.n_mtp_depth + 1 + c.n_layers + 1));  // MTP modules, head, blocks, embedding
    CHECK(offsets.back() == 0);
    for (size_t i = 1; i < offsets.size(); ++i) CHECK(offsets[i] < offsets[i - 1]);
    for (size_t i = 0; i < offsets.size(); ++i)
        CHECK(bitwise_equal(tails[i].data(), model.grads.data() + offsets[i], tails[i].size()));
}

TEST_CASE("parallel: gradient buckets cover the replicated gradients once, from the end of the buffer") {
    const Config c = parallel_config(2, 1);
    Model model(c, 1);
    const size_t block_bytes = (model.layout.blocks[1].attn_norm.g - model.layout.blocks[0].attn_norm.g) * 4;
    for (bool with_ep : {false, true})
        run_ranks(2, [&](Communicator& comm) {
            Model m(c, 1);
            ExpertParallel ep(comm, c);
            const HeldParams held = held_params(m, with_ep ? &ep : nullptr);
            for (size_t bytes : {size_t(0), block_bytes, size_t(SIZE_MAX)}) {
                const std::vector<GradientBucket> buckets = gradient_buckets(held, bytes);
                std::vector<int> covered(m.params.size(), 0);
                for (size_t i = 0; i < buckets.size(); ++i) {
                    const GradientBucket& b = buckets[i];
                    size_t floats = 0;
                    for (size_t p = 0; p < b.pieces.size(); ++p) {
                        floats += b.pieces[p].second;
                        for (size_t k = 0; k < b.pieces[p].second; ++k) ++covered[b.pieces[p].first + k];
                        if (p) CHECK(b.pieces[p].first > b.pieces[p - 1].first + b.pieces[p - 1].second);  // merged
                    }
                    CHECK(floats == b.floats);
                    if (i) CHECK(b.first() < buckets[i - 1].first());     // the order the backward completes them
                    if (i + 1 < buckets.size()) CHECK(b.floats * 4 >= bytes);  // only the last may be smaller
                    CHECK((b.pieces.size() == 1 || with_ep));            // DP: one piece each
                }
                std::vector<int> want(m.params.size(), 0);
                for (const ParamEntry* e : held.replicated) std::fill_n(want.begin() + long(e->offset), e->size, 1);
                CHECK(covered == want);
                if (bytes == SIZE_MAX) CHECK(buckets.size() == 1);
                if (bytes == 0) CHECK(buckets.size() == held.replicated.size());
            }
        });
}

// One forward/backward and the reduction of the gradients on R ranks, for several GradientSync: every rank's
// reduced gradients.
static std::vector<std::vector<float>> reduced_gradients(const Config& c, int R, int B, int T,
                                                         const GradientSync& sync) {
    const std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 8);
    std::vector<std::vector<float>> out(static_cast<size_t>(R));
    run_ranks(R, [&](Communicator& comm) {
        Model model(c, 11);
        set_bias(model);
        const RowShare share = row_share(B, R, comm.rank());
        forward_backward_reduced(comm, model, tokens.data() + size_t(share.first) * (T + 1), share.count, T,
                                 loss_options(), held_params(model, nullptr), float(share.count) / float(B), sync);
        out[size_t(comm.rank())] = model.grads;
    });
    return out;
}

// Tolerance on 3 ranks: the ring sums of one element in two bucketings are two orders of the same three terms x_r
// (section 9.2), each within 2 roundings of the exact sum, so at most 2·FLT_EPSILON·Σ_r |x_r| apart; a bucket
// reduced twice or not at all is off by 100%. x_r, rank r's weighted gradient, is a single model's on its rows.
TEST_CASE("parallel: bucketed all-reduce during the backward = one all-reduce after it, bitwise on 1 and 2 ranks") {
    const Config c = parallel_config(4, 2);
    Model shape(c, 0);
    const size_t block_bytes = (shape.layout.blocks[1].attn_norm.g - shape.layout.blocks[0].attn_norm.g) * 4;
    for (int R : {1, 2, 3}) {
        const int B = 6, T = 6;
        const std::vector<std::vector<float>> one = reduced_gradients(c, R, B, T, GradientSync{});
        std::vector<double> abs_sum(shape.params.size(), 0.0);  // Σ_r |x_r|
        const std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 8);
        for (int r = 0; r < R; ++r) {
            Model m(c, 11);
            set_bias(m);
            const RowShare share = row_share(B, R, r);
            m.forward_backward(tokens.data() + size_t(share.first) * (T + 1), share.count, T, loss_options());
            for (size_t i = 0; i < abs_sum.size(); ++i)
                abs_sum[i] += std::fabs(m.grads[i] * (float(share.count) / float(B)));
        }
        for (size_t bytes : {size_t(SIZE_MAX), block_bytes, size_t(1000), size_t(0)}) {
            const std::vector<std::vector<float>> overlapped = reduced_gradients(c, R, B, T, GradientSync{bytes, true});
            const std::vector<std::vector<float>> after = reduced_gradients(c, R, B, T, GradientSync{bytes, false});
            INFO("ranks ", R, ", bucket bytes ", bytes);
            for (int r = 0; r < R; ++r) {
                CHECK(overlapped[size_t(r)] == overlapped[0]);   // replicas bitwise identical
                CHECK(overlapped[size_t(r)] == after[size_t(r)]);  // timing changes nothing
            }
            if (R <= 2) CHECK(overlapped[0] == one[0]);
            bool close = true;
            for (size_t i = 0; i < one[0].size(); ++i)
                close &= std::fabs(overlapped[0][i] - one[0][i]) <= 2 * FLT_EPSILON * abs_sum[i];
            CHECK(close);
        }
    }
}

TEST_CASE("parallel: DP training with the all-reduce overlapped = without, bitwise, for any bucket size") {
    const int T = 8, steps = 3, B = 4;
    const Config c = parallel_config(4, 2);
    Model shape(c, 0);
    const size_t block_bytes = (shape.layout.blocks[1].attn_norm.g - shape.layout.blocks[0].attn_norm.g) * 4;
    for (int R : {2, 4}) {
        const std::vector<Trained> plain = train_parallel(c, R, B, T, steps, false);
        for (size_t bytes : {size_t(SIZE_MAX), block_bytes, size_t(0)}) {  // one bucket, one-layer, one-tensor buckets
            const std::vector<Trained> over = train_parallel(c, R, B, T, steps, false, GradientSync{bytes, true});
            INFO("ranks ", R, ", bucket bytes ", bytes);
            CHECK(over[0].replicas_identical);
            if (R == 2) {
                CHECK(over[0].losses == plain[0].losses);
                CHECK(over[0].params == plain[0].params);
            } else {  // other ring chunks: sums a few ulps apart, which AdamW's first steps pass on (see above)
                CHECK(max_abs_diff(over[0].params, plain[0].params) <= 1e-3 * kLr * steps);
                for (int s = 0; s < steps; ++s)
                    CHECK(over[0].losses[size_t(s)] == doctest::Approx(plain[0].losses[size_t(s)]).epsilon(1e-5));
            }
        }
    }
}

TEST_CASE("parallel: the overlapped all-reduce refuses expert parallelism, which talks during the backward") {
    const Config c = parallel_config(2, 1);
    CHECK_THROWS_WITH_AS(run_ranks(2, [&](Communicator& comm) {
        Model model(c, 1);
        AdamW opt;
        ExpertParallel ep(comm, c);
        std::vector<int32_t> tokens = random_rows(2, 4, c.vocab_size, 1);
        parallel_train_step(comm, model, opt, tokens.data() + comm.rank() * 5, 1, 4, kLr, loss_options(), &ep, true,
                            GradientSync{SIZE_MAX, true});
    }), doctest::Contains("data parallelism alone"), Error);
}

// ---------------------------------------------------------------------------------------------------------------------
// The FP8 dispatch of expert parallelism [V3 §3.3.3].

static std::vector<float> fp8_round_trip(const std::vector<float>& x, int d) {
    const int n = int(x.size()) / d;
    std::vector<uint8_t> q(x.size());
    std::vector<float> s(size_t(n) * fp8_tiles(d)), back(x.size());
    quantize_tiles_1x128(x.data(), n, d, q.data(), s.data(), /*pow2_scale=*/true);
    dequantize_tiles_1x128(q.data(), s.data(), n, d, back.data());
    return back;
}

TEST_CASE("parallel: FP8 dispatch rows: d + ceil(d/128) bytes, unpacked = the 1x128 power-of-two round trip") {
    for (int d : {16, 128, 200, 7168}) {
        const int n = 5;
        std::vector<float> x(size_t(n) * d);
        Rng rng{uint64_t(d)};
        for (size_t i = 0; i < x.size(); ++i) x[i] = float(rng.normal()) * std::ldexp(1.0f, int(i % 7) * 9 - 30);
        std::fill_n(x.begin() + d, d, 0.0f);                         // a row of zeros: scale 1
        x[2 * size_t(d)] = FLT_MAX;                                  // the largest scale, 2^120
        for (int j = 0; j < d; ++j) x[3 * size_t(d) + j] = 1e-40f * float(j % 5);  // subnormals: scale FLT_MIN
        const int64_t row = fp8_row_bytes(d);
        CHECK(row == d + (d + 127) / 128);
        std::vector<uint8_t> packed(size_t(n * row));
        std::vector<float> got(x.size());
        fp8_pack_rows(x.data(), n, d, packed.data());
        fp8_unpack_rows(packed.data(), n, d, got.data());
        INFO("d ", d);
        const std::vector<float> want = fp8_round_trip(x, d);
        CHECK(bitwise_equal(got.data(), want.data(), x.size()));
        CHECK(got != x);  // FP8 is lossy: the test sees the wire
        CHECK(double(row) / (2.0 * d) <= (d >= 128 ? 0.51 : 0.54));  // against BF16: about half
    }
}

TEST_CASE("parallel: FP8 dispatch on 2 ranks: half of BF16's bytes, rows received = the FP8 round trip, EP trains") {
    Config c = parallel_config(2, 1);
    c.dim = 128;         // one full 1x128 tile per row
    c.init_std = 0.1f;   // about 0.3·√(16/128): logits of the size parallel_config's 16 wide model has
    const int B = 4, T = 6, R = 2;
    const std::vector<int32_t> tokens = random_rows(B, T, c.vocab_size, 5);
    // One EP forward/backward with fp8_dispatch, and with a codec that applies the FP8 round trip in place (and
    // sends FP32): if every received row is the round trip of the row sent, both runs compute the same bits.
    struct Out { std::vector<float> logits, grads; double loss = 0; ExpertParallel::Stats stats; };
    auto run = [&](bool fp8, bool codec) {
        std::vector<Out> out(static_cast<size_t>(R));
        run_ranks(R, [&](Communicator& comm) {
            Model model(c, 11);
            set_bias(model);
            ExpertParallel ep(comm, c);
            ep.fp8_dispatch = fp8;
            if (codec)
                ep.dispatch_codec = [](float* x, int64_t n, int d) {
                    const std::vector<float> back = fp8_round_trip(std::vector<float>(x, x + n * d), d);
                    std::copy(back.begin(), back.end(), x);
                };
            model.expert_runner = &ep;
            const RowShare share = row_share(B, R, comm.rank());
            Out& o = out[size_t(comm.rank())];
            o.loss = model.forward_backward(tokens.data() + size_t(share.first) * (T + 1), share.count, T,
                                            loss_options()).total;
            o.logits.assign(model.logits(), model.logits() + int64_t(share.count) * T * c.vocab_size);
            o.grads = model.grads;
            o.stats = ep.stats;
        });
        return out;
    };
    const std::vector<Out> fp8 = run(true, false), simulated = run(false, true), plain = run(false, false);
    for (int r = 0; r < R; ++r) {
        INFO("rank ", r);
        const Out &f = fp8[size_t(r)], &s = simulated[size_t(r)];
        CHECK(f.loss == s.loss);
        CHECK(f.logits == s.logits);
        CHECK(f.grads == s.grads);
        CHECK(f.loss != plain[size_t(r)].loss);  // the round trip does change the rows
        REQUIRE(f.stats.dispatched_rows > 0);
        CHECK(f.stats.dispatched_rows == s.stats.dispatched_rows);
        CHECK(s.stats.dispatch_bytes == f.stats.dispatched_rows * 4 * c.dim);                   // FP32
        CHECK(f.stats.dispatch_bytes == f.stats.dispatched_rows * (c.dim + 1));                 // FP8 + exponent
        const int64_t bf16 = f.stats.dispatched_rows * 2 * c.dim;
        CHECK(double(f.stats.dispatch_bytes) / double(bf16) == doctest::Approx(129.0 / 256.0));  // 0.504
        CHECK(s.stats.bytes_moved - f.stats.bytes_moved == s.stats.dispatch_bytes - f.stats.dispatch_bytes);
    }
    // DP × EP training with the FP8 dispatch: the losses stay close to the FP32 dispatch's
    const int steps = 3;
    const std::vector<Trained> with = train_parallel(c, R, 8, T, steps, true, GradientSync{}, true);
    const std::vector<Trained> without = train_parallel(c, R, 8, T, steps, true);
    CHECK(with[0].replicas_identical);
    for (int s = 0; s < steps; ++s) {
        CHECK(std::isfinite(with[0].losses[size_t(s)]));
        CHECK(with[0].losses[size_t(s)] == doctest::Approx(without[0].losses[size_t(s)]).epsilon(1e-2));
    }
    CHECK(with[0].losses != without[0].losses);
}
