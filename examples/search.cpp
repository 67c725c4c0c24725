// build/search: a design search in the spirit of Syno and Canvas — sample fine-grained architecture choices, train each
// for a fixed wall-clock time, and score validation loss against measured training speed — over the choices of
// DeepSeekMoE and MLA (expert segmentation, shared experts, top-k, groups, the MLA ranks, MTP depth) at a fixed
// FLOPs-per-token budget (examples/search.hpp has the space and the budget). Then DeepSeekMoE's own comparison at this
// scale: the best fine-grained + shared configuration against GShard-style top-2 of 16 equal experts at the same
// activated FLOPs (and the same attention and MTP), trained for the same steps on the same batches.
//
//   build/search [--budget 30] [--candidates 8] [--seed 1] [--data FILE] [--out runs/search]   (build/search --help)
//
// Writes DIR/search.txt (every candidate: speed, loss after each round it ran) and DIR/pareto.png (validation loss
// against tokens/s after the first round, when every candidate has trained for the same time; the Pareto front
// joined). The default run takes about 30 minutes on 2 cores; --budget scales it.
#include <cstdio>
#include <string>

#include "search.hpp"

using namespace dsv3;

static void usage() {
    std::printf(
        "usage: search [options]\n"
        "Samples DeepSeekMoE / MLA configurations at the tiny model's FLOPs per token, trains each for a fixed time\n"
        "(successive halving: the better half goes on), scores validation loss against measured tokens/s, and\n"
        "compares the best fine-grained + shared one with top-2 of 16 equal experts at the same activated FLOPs.\n"
        "  --budget MINUTES      wall-clock budget of the whole run (default 30)\n"
        "  --candidates N        configurations sampled (default 8)\n"
        "  --seed S              the sample, the models and the batches (default 1)\n"
        "  --data FILE           text, one token a byte (default data/tinyshakespeare.txt, else the built-in\n"
        "                        synthetic corpus); the last 10%% is the validation split\n"
        "  --out DIR             where search.txt and pareto.png go (default runs/search)\n"
        "  --help, -h            this text\n");
}

namespace {
constexpr int B = 16, T = 64, kEvalWindows = 64;

// A model being trained: its optimizer state and schedule position survive from round to round.
struct Candidate {
    std::string name;
    Config cfg;
    std::unique_ptr<Model> model;
    AdamW opt;
    int steps = 0;
    double seconds = 0, first_val = 0, last_val = 0, first_speed = 0;
    std::vector<double> vals;   // validation loss after each round it ran
};

// Trains c for `seconds` of wall time (or `max_steps` steps when > 0), on the batches of `seed` from its current
// step on, with a constant learning rate after warm-up; returns the steps done.
int train_for(Candidate& c, const std::vector<int32_t>& train, double seconds, int max_steps, uint64_t seed,
              Progress* progress) {
    std::vector<int32_t> batch(size_t(B) * (T + 1));
    const double t0 = now_seconds();
    int done = 0;
    while (max_steps > 0 ? done < max_steps : now_seconds() - t0 < seconds) {
        sample_batch(train, B, T, seed, c.steps, batch.data());
        const float lr = 3e-3f * std::min(1.0f, float(c.steps + 1) / 50);
        const double loss = train_step(*c.model, c.opt, batch.data(), B, T, lr, LossOptions{}).loss.main;
        ++c.steps;
        ++done;
        if (progress) progress->update(c.steps, loss, int64_t(c.steps) * B * T);
    }
    c.seconds += now_seconds() - t0;
    return done;
}
}  // namespace

int main(int argc, char** argv) {
    prefer_sleeping_threads(argv);  // a shared CPU: OpenMP threads that wait sleep (the header, section 2)
    try {
        std::string data, out = "runs/search";
        double budget_minutes = 30;
        int n = 8;
        uint64_t seed = 1;
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) fail(k, ": expected a value");
                return argv[++i];
            };
            if (k == "--data") data = value();
            else if (k == "--budget") budget_minutes = parse_float(value(), k, 0.1, 100000);
            else if (k == "--candidates") n = int(parse_int(value(), k, 2, 1000));
            else if (k == "--seed") seed = uint64_t(parse_int(value(), k, 0, 1000000000));
            else if (k == "--out") out = value();
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else fail("unknown option \"", k, "\" (see search --help)");
        }
        std::string source;
        const std::vector<int32_t> tokens = training_bytes(data, &source);
        const size_t split = tokens.size() * 9 / 10;
        const std::vector<int32_t> train(tokens.begin(), tokens.begin() + long(split)),
            val(tokens.begin() + long(split), tokens.end());
        const std::vector<search::Choice> choices = search::sample(n, T, seed);
        if (int(choices.size()) < n) fail("--candidates ", n, ": only ", choices.size(), " admissible configurations");
        const search::Plan plan = search::plan(0.9 * 60 * budget_minutes, n);   // 10% left for the evaluations
        const double f0 = search::flops_per_token(Config::tiny(), T);
        std::printf("data: %s\nbudget %.1f min: %zu rounds of successive halving (%d candidates, %.0f s each first),"
                    " then %.0f s for the DeepSeekMoE check; FLOPs per token %.2f M +-%.0f%% (the tiny model's)\n",
                    source.c_str(), budget_minutes, plan.rounds.size(), n, plan.rounds[0].seconds_each,
                    plan.final_seconds, f0 / 1e6, 100 * search::kFlopsTolerance);
        std::vector<Candidate> cands(choices.size());
        for (size_t i = 0; i < choices.size(); ++i) {
            cands[i].name = choices[i].name();
            cands[i].cfg = search::config_of(choices[i]);
            cands[i].model = std::make_unique<Model>(cands[i].cfg, seed);
        }
        // 1. successive halving
        std::vector<size_t> alive(cands.size());
        for (size_t i = 0; i < alive.size(); ++i) alive[i] = i;
        for (size_t r = 0; r < plan.rounds.size(); ++r) {
            alive.resize(size_t(plan.rounds[r].candidates));
            std::printf("\nround %zu: %zu candidates, %.0f s each\n", r + 1, alive.size(), plan.rounds[r].seconds_each);
            for (size_t i : alive) {
                Candidate& c = cands[i];
                const int before = c.steps;
                const double t_before = c.seconds;
                train_for(c, train, plan.rounds[r].seconds_each, 0, seed, nullptr);
                c.last_val = evaluate(*c.model, val, T, kEvalWindows, B, nullptr);
                c.vals.push_back(c.last_val);
                const double speed = double(c.steps - before) * B * T / (c.seconds - t_before);
                if (r == 0) c.first_val = c.last_val, c.first_speed = speed;
                std::printf("  %-40s %6d steps %7.0f tok/s  val %.4f\n", c.name.c_str(), c.steps, speed, c.last_val);
                std::fflush(stdout);
            }
            std::stable_sort(alive.begin(), alive.end(), [&](size_t a, size_t b) {
                return cands[a].last_val < cands[b].last_val;
            });
        }
        // 2. the Pareto front after round 1 (equal time for all) and the table
        std::vector<double> speed, loss;
        for (const Candidate& c : cands) speed.push_back(c.first_speed), loss.push_back(c.first_val);
        const std::vector<size_t> front = search::pareto_front(speed, loss);
        make_directories(out);
        std::string table = "candidate, FLOPs/token (M), tokens/s in round 1, val loss after each round (64 windows)\n";
        for (size_t i = 0; i < cands.size(); ++i) {
            char row[200];
            std::snprintf(row, sizeof row, "%-40s %6.2f %8.0f %s", cands[i].name.c_str(),
                          search::flops_per_token(cands[i].cfg, T) / 1e6, speed[i],
                          std::count(front.begin(), front.end(), i) ? "front" : "     ");
            table += row;
            for (double v : cands[i].vals) table += "  " + std::to_string(v).substr(0, 6);
            table += "\n";
        }
        PlotSeries all{"candidates (round 1)", {}, {}}, pf{"Pareto front", {}, {}};
        for (size_t i = 0; i < cands.size(); ++i) {   // points only: NaN between them breaks the line
            all.x.insert(all.x.end(), {speed[i], NAN});
            all.y.insert(all.y.end(), {loss[i], NAN});
        }
        for (size_t i : front) pf.x.push_back(speed[i]), pf.y.push_back(loss[i]);
        plot_lines(out + "/pareto.png", "design search: loss after equal time vs speed", "training tokens/s",
                   "validation loss (nats/byte)", {all, pf});

        // 3. DeepSeekMoE's comparison: the search's best fine-grained (every m >= 2) + shared candidate (the one that
        // survived the most rounds, then the lowest last loss) against GShard top-2 of 16 with the same attention and
        // MTP, both from scratch, the same steps (so the same tokens and about the same FLOPs) and batches.
        int best = -1;
        auto better = [&](size_t i, size_t j) {
            return cands[i].vals.size() != cands[j].vals.size() ? cands[i].vals.size() > cands[j].vals.size()
                                                                : cands[i].last_val < cands[j].last_val;
        };
        for (size_t i = 0; i < cands.size(); ++i)
            if (choices[i].shared >= 1 && (best < 0 || better(i, size_t(best)))) best = int(i);
        if (best < 0) fail("no fine-grained + shared candidate in the sample (try more --candidates)");
        Candidate fine, gshard;
        fine.name = cands[size_t(best)].name;
        fine.cfg = cands[size_t(best)].cfg;
        gshard.name = "GShard top-2 of 16 (width 96, no shared), attention and MTP as " + fine.name;
        gshard.cfg = search::gshard_config(fine.cfg);
        for (Candidate* c : {&fine, &gshard}) c->model = std::make_unique<Model>(c->cfg, seed);
        // the steps that fit: measured on a few steps of each
        train_for(fine, train, 0, 5, seed + 1, nullptr);
        train_for(gshard, train, 0, 5, seed + 1, nullptr);
        const double step_s = (fine.seconds + gshard.seconds) / 10;
        const int steps = std::max(10, int(plan.final_seconds / step_s / 2));
        std::printf("\nDeepSeekMoE check: %d steps each from scratch (seed %llu), the same batches\n", steps,
                    (unsigned long long)seed);
        for (Candidate* c : {&fine, &gshard}) {
            c->model = std::make_unique<Model>(c->cfg, seed);
            c->opt = AdamW{};
            c->steps = 0;
            c->seconds = 0;
            Progress progress(steps);
            progress.metric = c->name + " loss";
            train_for(*c, train, 0, steps, seed + 1, &progress);
            c->last_val = evaluate(*c->model, val, T, 0, B, nullptr);
        }
        char verdict[400];
        std::snprintf(verdict, sizeof verdict,
                      "\nDeepSeekMoE check after %d steps (validation, whole split): %s %.4f, %s %.4f: %s\n"
                      "FLOPs per token: %.2f M and %.2f M; training speed %.0f and %.0f tokens/s\n", steps,
                      fine.name.c_str(), fine.last_val, gshard.name.c_str(), gshard.last_val,
                      fine.last_val < gshard.last_val ? "fine-grained + shared is better, as DeepSeekMoE reports"
                                                      : "GShard is not worse: the claim does not hold at this scale",
                      search::flops_per_token(fine.cfg, T) / 1e6, search::flops_per_token(gshard.cfg, T) / 1e6,
                      steps * double(B * T) / fine.seconds, steps * double(B * T) / gshard.seconds);
        table += verdict;
        write_file_atomic(out + "/search.txt", table);
        std::printf("\n%s", table.c_str());
        std::printf("wrote %s/search.txt and %s/pareto.png\n", out.c_str(), out.c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "search: error: %s\n", e.what());
        return 1;
    } catch (...) {
        std::fprintf(stderr, "search: error: unknown exception\n");
        return 1;
    }
}
