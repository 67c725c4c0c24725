// build/balance: the Loss-Free Balancing paper's main comparison (Wang et al. 2024, arXiv 2408.15664, Table 2) at
// laptop scale. The same tiny MoE, same seed, same data and steps, trained three ways:
//   none       no balancing at all: routing collapses onto a few experts
//   aux loss   the classic expert-level auxiliary loss (DeepSeekMoE eqs. 12-14), α = --balance-alpha
//   loss-free  V3's bias update b_i += γ·sign(c̄ − c_i) (V3 §2.1.2), γ = --bias-speed, no loss term
// and prints, side by side: final validation loss, MaxVio_global over the validation split, and the per-layer load
// spread (the fraction of routed tokens taken by each layer's busiest and idlest expert).
//
//   build/balance [--data FILE] [--steps N] [--balance-alpha A] [--bias-speed G]   (build/balance --help)
#include <cstdio>
#include <string>

#include "../deepseek_v3.hpp"

using namespace dsv3;

static void usage() {
    std::printf(
        "usage: balance [options]\n"
        "Trains the tiny MoE three ways (no balancing, auxiliary loss, loss-free bias) and compares their loads.\n"
        "  --data FILE           text, one token a byte (default data/tinyshakespeare.txt, else the built-in\n"
        "                        synthetic corpus); the last 10%% is the validation split\n"
        "  --steps N             optimizer steps of each of the three runs (default 600)\n"
        "  --balance-alpha A     the auxiliary loss's weight alpha (default 0.01)\n"
        "  --bias-speed G        loss-free balancing's bias step gamma (default 0.01)\n"
        "  --help, -h            this text\n");
}

struct Outcome {
    std::string name;
    double val_loss = 0, maxvio_global = 0, seconds = 0;
    std::vector<std::vector<int64_t>> loads;  // validation loads per MoE block
};

static Outcome run(const std::string& name, const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                   int steps, BalanceLoss balance, float alpha, float gamma, int B, int T) {
    Config cfg = Config::tiny();
    cfg.bias_update_speed = gamma;
    Model model(cfg, 1);
    AdamW opt;
    LrSchedule sched;
    sched.max_lr = 3e-3f; sched.min_lr = 3e-4f; sched.warmup_steps = std::min(100, steps / 10); sched.total_steps = steps;
    LossOptions lo;
    lo.balance = balance;
    lo.balance_alpha = alpha;
    std::vector<int32_t> batch(size_t(B) * (T + 1));
    Outcome out;
    out.name = name;
    const double start = now_seconds();
    Progress progress(steps);
    progress.label = "  " + name + ": ";
    for (int step = 0; step < steps; ++step) {
        sample_batch(train, B, T, 1, step, batch.data());
        StepResult r = train_step(model, opt, batch.data(), B, T, sched.at(step), lo, gamma > 0);
        progress.update(step + 1, r.loss.main, int64_t(step + 1) * B * T, {{"MaxVio_batch", r.max_violation}});
    }
    const double eval_start = now_seconds();
    out.val_loss = evaluate(model, val, T, 0, B, &out.loads);
    for (const auto& l : out.loads) out.maxvio_global = std::max(out.maxvio_global, max_violation(l));
    out.seconds = now_seconds() - start;
    std::printf("  %s: validation loss %.4f (whole split, %.0f s)\n", name.c_str(), out.val_loss, now_seconds() - eval_start);
    return out;
}

int main(int argc, char** argv) {
    prefer_sleeping_threads(argv);  // a shared CPU: OpenMP threads that wait sleep (the header, section 2)
    try {
        std::string data;
        int steps = 600;
        float alpha = 0.01f, gamma = 0.01f;
        for (int i = 1; i < argc; ++i) {
            std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) fail(k, ": expected a value");
                return argv[++i];
            };
            if (k == "--data") data = value();
            else if (k == "--steps") steps = int(parse_int(value(), k, 1, 1000000000));
            else if (k == "--balance-alpha") alpha = float(parse_float(value(), k, 0, 10));
            else if (k == "--bias-speed") gamma = float(parse_float(value(), k, 0, 10));
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else fail("unknown option \"", k, "\" (see balance --help)");
        }
        std::string source;
        std::vector<int32_t> tokens = training_bytes(data, &source);
        const size_t split = tokens.size() * 9 / 10;
        std::vector<int32_t> train(tokens.begin(), tokens.begin() + long(split)), val(tokens.begin() + long(split), tokens.end());
        const int B = 16, T = 64;
        std::printf("data: %s | tiny preset | %d steps of %d x %d tokens | aux α = %g, loss-free γ = %g\n",
                    source.c_str(), steps, B, T, alpha, gamma);
        std::vector<Outcome> results;
        results.push_back(run("none", train, val, steps, BalanceLoss::none, 0, 0, B, T));
        results.push_back(run("aux loss", train, val, steps, BalanceLoss::expert_level, alpha, 0, B, T));
        results.push_back(run("loss-free", train, val, steps, BalanceLoss::none, 0, gamma, B, T));

        std::printf("\n%-10s | %-9s | %-14s | %s\n", "strategy", "val loss", "MaxVio_global",
                    "per MoE layer: busiest / idlest expert's share of routed tokens");
        std::printf("-----------+-----------+----------------+--------------------------------------------------\n");
        for (const Outcome& o : results) {
            std::printf("%-10s | %9.4f | %14.3f |", o.name.c_str(), o.val_loss, o.maxvio_global);
            for (const auto& l : o.loads) {
                int64_t total = 0, mx = 0, mn = INT64_MAX;
                for (int64_t c : l) { total += c; mx = std::max(mx, c); mn = std::min(mn, c); }
                std::printf(" %.0f%%/%.0f%%", 100.0 * mx / double(total), 100.0 * mn / double(total));
            }
            std::printf("\n");
        }
        std::printf("(perfect balance: every expert takes %.1f%% of the routed tokens; MaxVio 0)\n",
                    100.0 / Config::tiny().n_routed_experts);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "balance: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "balance: error: unknown exception\n");
        return 1;
    }
}
