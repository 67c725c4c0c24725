// build/logfmt: LogFMT ("Insights into DeepSeek-V3", arXiv 2505.09343, §3.2; header section 8.5) against the 8-bit
// floats of V3's recipe and BF16, as the format of the MoE dispatch (V3 §3.3 sends the dispatch in FP8).
//   1. The error of each codec on Gaussian rows, heavy-tailed rows (Student's t with 3 degrees of freedom) and the
//      rows that the expert-parallel dispatch of a trained tiny model sends to the other rank (captured on the wire,
//      through ExpertParallel::dispatch_codec).
//   2. The tiny model trained on 2 CPU ranks with expert parallelism, its dispatch through each codec: the same seeds
//      and batches for every codec, the losses after the same steps. Any rounding sends a short run down a slightly
//      different path, so the loss moves by a percent or two whatever the codec; --seeds N averages N runs a codec
//      and shows their spread, against which a codec's effect can be read.
// The paper: LogFMT-8 is more accurate than E4M3 and E5M2, LogFMT-10 close to BF16. This program checks that here.
//
//   build/logfmt [--checkpoint FILE] [--steps 200] [--seeds 1] [--warm-steps 300] [--data FILE]   (--help)
#include <cstdio>
#include <functional>
#include <mutex>
#include <string>

#include "../deepseek_v3.hpp"

using namespace dsv3;

static void usage() {
    std::printf(
        "usage: logfmt [options]\n"
        "Compares LogFMT-8 and LogFMT-10 with E4M3, E5M2 (1x128 scales) and BF16: their error on Gaussian,\n"
        "heavy-tailed and real MoE dispatch rows, and the tiny model's losses trained with its expert-parallel\n"
        "dispatch (2 CPU ranks) through each.\n"
        "  --checkpoint FILE     a tiny model's checkpoint (build/train) whose dispatch rows are measured (default\n"
        "                        runs/tiny/checkpoint.bin when it exists, else a model trained here for --warm-steps)\n"
        "  --warm-steps N        steps of that model when there is no checkpoint (default 300)\n"
        "  --steps N             training steps of each codec's run (default 200)\n"
        "  --seeds N             runs a codec, seeds 1..N (model and batches), averaged (default 1)\n"
        "  --data FILE           text, one token a byte (default data/tinyshakespeare.txt, else the built-in\n"
        "                        synthetic corpus); the last 10%% is the validation split\n"
        "  --help, -h            this text\n");
}

// A codec: what a [n, d] block of rows becomes after a trip on the wire, in place.
struct Codec {
    std::string name;
    double bits;   // per element, the scales or tile parameters included (one per 128 elements)
    std::function<void(float*, int64_t, int)> apply;
};

// FP8 with one scale per 1×128 tile, amax / (the format's largest value): E4M3 by the header's quantizer, E5M2 here.
static void fp8_round_trip(float* x, int64_t n, int d, Fp8Format f) {
    if (f == Fp8Format::e4m3) {
        std::vector<uint8_t> q(size_t(n) * size_t(d));
        std::vector<float> s(size_t(n) * size_t(fp8_tiles(d)));
        quantize_tiles_1x128(x, int(n), d, q.data(), s.data());
        dequantize_tiles_1x128(q.data(), s.data(), int(n), d, x);
        return;
    }
    for (int64_t r = 0; r < n; ++r)
        for (int c0 = 0; c0 < d; c0 += 128) {
            float* t = x + r * d + c0;
            const int len = std::min(128, d - c0);
            float amax = 0;
            for (int i = 0; i < len; ++i) amax = std::max(amax, std::fabs(t[i]));
            const float s = amax > 0 ? amax / 57344.0f : 1.0f;
            for (int i = 0; i < len; ++i) t[i] = fp8_e5m2_decode(fp8_e5m2_encode(t[i] / s)) * s;
        }
}
static void logfmt_round_trip(float* x, int64_t n, int d, int bits) {
    std::vector<uint16_t> q(size_t(n) * size_t(d));
    std::vector<LogFmtTile> t(size_t(n) * size_t(fp8_tiles(d)));
    logfmt_encode(x, int(n), d, bits, q.data(), t.data());
    logfmt_decode(q.data(), t.data(), int(n), d, bits, x);
}

static std::vector<Codec> codecs() {
    return {{"FP32 (none)", 32, nullptr},
            {"BF16", 16, [](float* x, int64_t n, int d) {
                 for (int64_t i = 0; i < n * d; ++i) x[i] = bf16_round(x[i]);
             }},
            {"E4M3, 1x128", 8.25, [](float* x, int64_t n, int d) { fp8_round_trip(x, n, d, Fp8Format::e4m3); }},
            {"E5M2, 1x128", 8.25, [](float* x, int64_t n, int d) { fp8_round_trip(x, n, d, Fp8Format::e5m2); }},
            {"LogFMT-8", 8.5, [](float* x, int64_t n, int d) { logfmt_round_trip(x, n, d, 8); }},
            {"LogFMT-10", 10.5, [](float* x, int64_t n, int d) { logfmt_round_trip(x, n, d, 10); }}};
}

// Relative RMS error ||x̂ − x|| / ||x|| and the mean of |x̂ − x| / |x| over the nonzero elements.
struct CodecError { double rms = 0, mean_rel = 0; };
static CodecError error_of(const Codec& c, const std::vector<float>& x, int d) {
    std::vector<float> y = x;
    if (c.apply) c.apply(y.data(), int64_t(x.size()) / d, d);
    double sq = 0, sq_x = 0, rel = 0;
    int64_t nonzero = 0;
    for (size_t i = 0; i < x.size(); ++i) {
        sq += double(y[i] - x[i]) * double(y[i] - x[i]);
        sq_x += double(x[i]) * double(x[i]);
        if (x[i] != 0) rel += std::fabs(double(y[i]) - x[i]) / std::fabs(x[i]), ++nonzero;
    }
    return {std::sqrt(sq / std::max(sq_x, 1e-300)), rel / double(std::max<int64_t>(nonzero, 1))};
}

// The rows rank 0's MoE layers send to rank 1 in one forward over `batch` (B rows of T + 1 tokens) on 2 ranks.
static std::vector<float> dispatched_rows(const Config& c, const std::vector<float>& params,
                                          const std::vector<int32_t>& batch, int B, int T) {
    std::vector<float> rows;
    run_ranks(2, [&](Communicator& comm) {
        Model model(c, 0);
        model.params = params;
        ExpertParallel ep(comm, c);
        if (comm.rank() == 0)
            ep.dispatch_codec = [&](float* x, int64_t n, int d) { rows.insert(rows.end(), x, x + n * d); };
        model.expert_runner = &ep;
        const RowShare share = row_share(B, 2, comm.rank());
        model.forward(batch.data() + size_t(share.first) * (T + 1), share.count, T, LossOptions{});
    });
    return rows;
}

struct RunResult { double train = 0, val = 0, seconds = 0; };
// The tiny model from `seed` trained for `steps` on 2 ranks with expert parallelism (batches from the same seed), the
// dispatch through `codec`; the mean training loss of the last 10% of the steps and the validation loss (whole split).
static RunResult train_with(const Codec& codec, const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                            int steps, int B, int T, int seed, const std::string& label) {
    RunResult out;
    const double t0 = now_seconds();
    std::mutex mu;
    Progress progress(steps);
    progress.metric = codec.name + " loss (" + label + ")";
    run_ranks(2, [&](Communicator& comm) {
        const Config c = Config::tiny();
        Model model(c, uint64_t(seed));
        AdamW opt;
        ExpertParallel ep(comm, c);
        ep.dispatch_codec = codec.apply;
        LrSchedule sched;
        sched.max_lr = 3e-3f; sched.min_lr = 3e-4f; sched.warmup_steps = std::min(100, steps / 10);
        sched.total_steps = steps;
        std::vector<int32_t> batch(size_t(B) * (T + 1));
        const RowShare share = row_share(B, 2, comm.rank());
        double tail = 0;
        for (int step = 0; step < steps; ++step) {
            sample_batch(train, B, T, uint64_t(seed), step, batch.data());
            const StepResult r = parallel_train_step(comm, model, opt, batch.data() + size_t(share.first) * (T + 1),
                                                     share.count, T, sched.at(step), LossOptions{}, &ep);
            if (step >= steps - std::max(1, steps / 10)) tail += r.loss.main;
            if (comm.rank() == 0) {
                std::lock_guard<std::mutex> lock(mu);
                progress.update(step + 1, r.loss.main, int64_t(step + 1) * B * T);
            }
        }
        gather_experts(comm, model, opt, ep);   // every rank now holds the whole model
        if (comm.rank() == 0) {
            model.expert_runner = nullptr;
            out.train = tail / std::max(1, steps / 10);
            out.val = evaluate(model, val, T, 0, B, nullptr);
        }
    });
    out.seconds = now_seconds() - t0;
    return out;
}

int main(int argc, char** argv) {
    prefer_sleeping_threads(argv);  // a shared CPU: OpenMP threads that wait sleep (the header, section 2)
    try {
        std::string data, checkpoint;
        int steps = 200, warm_steps = 300, seeds = 1;
        const int B = 16, T = 64;
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) fail(k, ": expected a value");
                return argv[++i];
            };
            if (k == "--data") data = value();
            else if (k == "--checkpoint") checkpoint = value();
            else if (k == "--steps") steps = int(parse_int(value(), k, 1, 1000000000));
            else if (k == "--warm-steps") warm_steps = int(parse_int(value(), k, 1, 1000000000));
            else if (k == "--seeds") seeds = int(parse_int(value(), k, 1, 1000));
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else fail("unknown option \"", k, "\" (see logfmt --help)");
        }
        std::string source;
        const std::vector<int32_t> tokens = training_bytes(data, &source);
        const size_t split = tokens.size() * 9 / 10;
        const std::vector<int32_t> train(tokens.begin(), tokens.begin() + long(split)),
            val(tokens.begin() + long(split), tokens.end());
        const std::vector<Codec> all = codecs();

        // 1. The error of each codec on three kinds of rows of 128 (one 1×128 tile a row).
        Rng rng(7);
        std::vector<float> gauss(512 * 128), heavy(512 * 128);
        for (float& v : gauss) v = float(rng.normal());
        for (float& v : heavy) {
            const double g = rng.normal(), a = rng.normal(), b = rng.normal(), c = rng.normal();
            v = float(g / std::sqrt((a * a + b * b + c * c) / 3));   // Student's t, 3 degrees of freedom
        }
        const std::string made_by_train = "runs/tiny/checkpoint.bin";   // what `make train` leaves
        if (checkpoint.empty() && std::filesystem::is_regular_file(made_by_train)) checkpoint = made_by_train;
        Config c = Config::tiny();
        std::vector<float> params;
        std::string model_source;
        if (!checkpoint.empty()) {
            c = read_checkpoint_config(checkpoint);
            Model m(c, 0);
            AdamW unused;
            load_checkpoint(checkpoint, m, unused);
            params = m.params;
            model_source = checkpoint;
        } else {
            std::printf("no checkpoint: the tiny model trained for %d steps first; data: %s\n", warm_steps,
                        source.c_str());
            Model m(c, 1);
            AdamW opt;
            std::vector<int32_t> batch(size_t(B) * (T + 1));
            Progress progress(warm_steps);
            for (int step = 0; step < warm_steps; ++step) {
                sample_batch(train, B, T, 1, step, batch.data());
                const float lr = 3e-3f * std::min(1.0f, float(step + 1) / 100);
                progress.update(step + 1, train_step(m, opt, batch.data(), B, T, lr, LossOptions{}).loss.main,
                                int64_t(step + 1) * B * T);
            }
            params = m.params;
            model_source = "tiny, " + std::to_string(warm_steps) + " steps here";
        }
        if (c.n_routed_experts < 2) fail(checkpoint, ": the model needs at least 2 routed experts for 2 ranks");
        std::vector<int32_t> batch(size_t(B) * (T + 1));
        sample_batch(val, B, std::min(T, c.max_seq_len), 2, 0, batch.data());
        const std::vector<float> real = dispatched_rows(c, params, batch, B, std::min(T, c.max_seq_len));
        std::printf("\nerror of one trip (relative RMS ||x' - x|| / ||x||, and the mean of |x' - x| / |x|), rows\n"
                    "  of 128: Gaussian (512 rows), Student's t with 3 degrees of freedom (512 rows), and the %zu\n"
                    "  rows the dispatch of %s (d %d) sends to the other rank\n",
                    real.size() / size_t(c.dim), model_source.c_str(), c.dim);
        std::printf("%-14s %5s %21s %21s %21s\n", "codec", "bits", "Gaussian", "Student t3", "dispatch rows");
        for (const Codec& k : all) {
            if (!k.apply) continue;
            std::printf("%-14s %5.2f", k.name.c_str(), k.bits);
            const std::vector<float>* sets[] = {&gauss, &heavy, &real};
            for (const std::vector<float>* x : sets) {
                const CodecError e = error_of(k, *x, x == &real ? c.dim : 128);
                std::printf("   %8.3e %8.3e", e.rms, e.mean_rel);
            }
            std::printf("\n");
        }
        std::fflush(stdout);

        // 2. Training with the dispatch through each codec.
        std::printf("\nthe tiny model trained on 2 CPU ranks (expert parallel), %d steps of %d x %d, seeds 1..%d, the\n"
                    "dispatch through each codec (the backward passes gradients through unchanged); data: %s\n",
                    steps, B, T, seeds, source.c_str());
        std::vector<std::vector<RunResult>> runs(all.size());   // [codec][seed]
        for (size_t i = 0; i < all.size(); ++i)
            for (int seed = 1; seed <= seeds; ++seed) {
                const std::string label = std::to_string(i * size_t(seeds) + size_t(seed)) + "/" +
                                          std::to_string(all.size() * size_t(seeds));
                runs[i].push_back(train_with(all[i], train, val, steps, B, T, seed, label));
            }
        // Each codec against FP32 run by run (the same seed: the same initial model and batches), then over the seeds.
        struct Summary { double loss = 0, mean = 0, lo = 1e300, hi = -1e300; };
        auto summary = [&](size_t i, double RunResult::*f) {
            Summary out;
            for (int k = 0; k < seeds; ++k) {
                const double x = runs[i][size_t(k)].*f, base = runs[0][size_t(k)].*f, rel = 100 * (x - base) / base;
                out.loss += x / seeds;
                out.mean += rel / seeds;
                out.lo = std::min(out.lo, rel);
                out.hi = std::max(out.hi, rel);
            }
            return out;
        };
        std::printf("\n%-14s %11s %26s %11s %26s %8s\n", "dispatch", "train loss", "vs FP32: mean [min, max]",
                    "val loss", "vs FP32: mean [min, max]", "seconds");
        for (size_t i = 0; i < all.size(); ++i) {
            const Summary tr = summary(i, &RunResult::train), va = summary(i, &RunResult::val);
            double sec = 0;
            for (const RunResult& r : runs[i]) sec += r.seconds / seeds;
            std::printf("%-14s %11.4f %+8.2f%% [%+6.2f%%, %+6.2f%%] %11.4f %+8.2f%% [%+6.2f%%, %+6.2f%%] %8.1f\n",
                        all[i].name.c_str(), tr.loss, tr.mean, tr.lo, tr.hi, va.loss, va.mean, va.lo, va.hi, sec);
        }
        std::printf("(losses: the mean over the seeds; vs FP32: each run against the FP32 run of its seed, in %%)\n");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "logfmt: error: %s\n", e.what());
        return 1;
    } catch (...) {
        std::fprintf(stderr, "logfmt: error: unknown exception\n");
        return 1;
    }
}
