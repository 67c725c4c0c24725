// build/train: trains a DeepSeek-V3 model (the `tiny` preset by default: MLA, DeepSeekMoE with loss-free balancing,
// MTP) on a text file, bytes as tokens, the last 10% of the file held out for validation (nanoGPT's split).
//
//   build/train                                   Tiny Shakespeare if data/tinyshakespeare.txt exists
//   build/train --data FILE --steps 2000 --out runs/tiny
//   build/train --resume runs/tiny/checkpoint.bin  continue bit for bit where a run stopped
//
// Prints progress (step, loss, tokens/s, ETA), validation loss and MaxVio every --eval-every steps, and at the end
// saves the checkpoint and writes a short sample.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <sys/stat.h>

#include "../deepseek_v3.hpp"

using namespace dsv3;

struct Args {
    std::string data, out = "runs/tiny", resume, preset = "tiny";
    int steps = 2000, batch = 16, seq = 64, warmup = 100, eval_every = 200, eval_windows = 64, seed = 1, sample = 300;
    float lr = 3e-3f, min_lr = 3e-4f, mtp_lambda = 0.3f, bias_speed = -1, balance_alpha = 0.0001f;
    std::string schedule = "cosine", balance = "none";
    bool bias_update = true;
    double time_limit = 0;  // seconds; 0 = none
};

static void usage() {
    std::printf(
        "usage: train [--data FILE] [--out DIR] [--resume CKPT] [--steps N] [--batch B] [--seq T] [--lr X]\n"
        "             [--min-lr X] [--warmup N] [--schedule cosine|v3|multi_step] [--eval-every N]\n"
        "             [--eval-windows N] [--balance none|sequence|expert] [--balance-alpha A] [--bias-speed G]\n"
        "             [--no-bias-update] [--mtp-lambda L] [--seed S] [--sample N] [--time-limit SECONDS]\n");
}

static Args parse(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) fail("argument ", k, ": expected a value");
            return argv[++i];
        };
        if (k == "--data") a.data = value();
        else if (k == "--out") a.out = value();
        else if (k == "--resume") a.resume = value();
        else if (k == "--steps") a.steps = std::stoi(value());
        else if (k == "--batch") a.batch = std::stoi(value());
        else if (k == "--seq") a.seq = std::stoi(value());
        else if (k == "--lr") a.lr = std::stof(value());
        else if (k == "--min-lr") a.min_lr = std::stof(value());
        else if (k == "--warmup") a.warmup = std::stoi(value());
        else if (k == "--schedule") a.schedule = value();
        else if (k == "--eval-every") a.eval_every = std::stoi(value());
        else if (k == "--eval-windows") a.eval_windows = std::stoi(value());
        else if (k == "--balance") a.balance = value();
        else if (k == "--balance-alpha") a.balance_alpha = std::stof(value());
        else if (k == "--bias-speed") a.bias_speed = std::stof(value());
        else if (k == "--no-bias-update") a.bias_update = false;
        else if (k == "--mtp-lambda") a.mtp_lambda = std::stof(value());
        else if (k == "--seed") a.seed = std::stoi(value());
        else if (k == "--sample") a.sample = std::stoi(value());
        else if (k == "--time-limit") a.time_limit = std::stod(value());
        else if (k == "--help" || k == "-h") { usage(); std::exit(0); }
        else { usage(); fail("unknown argument \"", k, "\""); }
    }
    return a;
}

static std::vector<int32_t> read_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("data file ", path, ": cannot open");
    std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<int32_t> tokens(s.size());
    for (size_t i = 0; i < s.size(); ++i) tokens[i] = int32_t(uint8_t(s[i]));
    return tokens;
}

// B random windows of T+1 tokens; the windows of step s depend only on (seed, s), so a resumed run sees the same data.
static void sample_batch(const std::vector<int32_t>& data, int B, int T, uint64_t seed, int step, int32_t* out) {
    Rng rng = Rng(seed).fork(uint64_t(step));
    for (int b = 0; b < B; ++b) {
        const size_t start = size_t(rng.below(data.size() - size_t(T) - 1));
        std::copy(data.begin() + long(start), data.begin() + long(start + T + 1), out + size_t(b) * (T + 1));
    }
}

// Mean next-token loss over `windows` evenly spaced windows of the validation split (all of it when windows <= 0),
// and the expert loads summed over them (for MaxVio_global).
static double evaluate(Model& model, const std::vector<int32_t>& val, int T, int windows, int B,
                       std::vector<std::vector<int64_t>>* loads) {
    const int64_t available = int64_t((val.size() - 1) / size_t(T));
    const int64_t n = windows <= 0 ? available : std::min<int64_t>(windows, available);
    if (n <= 0) fail("validation split: ", val.size(), " tokens, fewer than one window of ", T + 1);
    LossOptions opt;
    opt.with_mtp = false;
    double sum = 0;
    std::vector<int32_t> batch;
    for (int64_t first = 0; first < n; first += B) {
        const int rows = int(std::min<int64_t>(B, n - first));
        batch.resize(size_t(rows) * (T + 1));
        for (int r = 0; r < rows; ++r) {
            const int64_t w = (first + r) * available / n;  // evenly spaced windows
            std::copy(val.begin() + long(w * T), val.begin() + long(w * T + T + 1), batch.begin() + long(r) * (T + 1));
        }
        sum += model.forward(batch.data(), rows, T, opt).main * rows;
        if (loads) add_loads(*loads, model.expert_loads());
    }
    return sum / double(n);
}

// Greedy-free sampling: temperature 0.8 from the model's next-token distribution, recomputing the whole window.
static std::string sample_text(Model& model, const std::string& prompt, int n, uint64_t seed) {
    std::vector<int32_t> ctx;
    for (char ch : prompt) ctx.push_back(int32_t(uint8_t(ch)));
    Rng rng(seed);
    LossOptions opt;
    opt.with_mtp = false;
    std::string out = prompt;
    const int V = model.cfg.vocab_size;
    for (int i = 0; i < n; ++i) {
        const int T = std::min<int>(int(ctx.size()), model.cfg.max_seq_len);
        std::vector<int32_t> row(ctx.end() - T, ctx.end());
        row.push_back(0);  // a target is required by forward(); its loss is ignored here
        model.forward(row.data(), 1, T, opt);
        const float* z = model.logits() + int64_t(T - 1) * V;
        std::vector<double> p(static_cast<size_t>(V));
        double mx = z[0], sum = 0;
        for (int v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
        for (int v = 0; v < V; ++v) sum += (p[size_t(v)] = std::exp((z[v] - mx) / 0.8));
        double u = rng.uniform() * sum;
        int next = V - 1;
        for (int v = 0; v < V; ++v) {
            if ((u -= p[size_t(v)]) <= 0) { next = v; break; }
        }
        ctx.push_back(next);
        out.push_back(char(next));
    }
    return out;
}

int main(int argc, char** argv) {
    try {
        Args a = parse(argc, argv);
        Config cfg = Config::tiny();
        if (a.bias_speed >= 0) cfg.bias_update_speed = a.bias_speed;
        if (a.seq > cfg.max_seq_len) fail("--seq ", a.seq, " exceeds the preset's max_seq_len ", cfg.max_seq_len);
        if (a.data.empty()) a.data = "data/tinyshakespeare.txt";
        std::vector<int32_t> tokens = read_bytes(a.data);
        const size_t split = tokens.size() * 9 / 10;
        std::vector<int32_t> train(tokens.begin(), tokens.begin() + long(split)), val(tokens.begin() + long(split), tokens.end());
        if (train.size() < size_t(a.seq) + 2) fail("data file ", a.data, ": ", tokens.size(), " bytes is too short for --seq ", a.seq);

        Model model(cfg, uint64_t(a.seed));
        AdamW opt;
        if (!a.resume.empty()) {
            load_checkpoint(a.resume, model, opt);
            std::printf("resumed from %s at step %d\n", a.resume.c_str(), opt.step);
        }
        LrSchedule sched;
        sched.kind = a.schedule == "v3" ? LrSchedule::v3 : a.schedule == "multi_step" ? LrSchedule::multi_step : LrSchedule::cosine;
        if (a.schedule != "v3" && a.schedule != "multi_step" && a.schedule != "cosine") fail("--schedule: unknown \"", a.schedule, "\"");
        sched.max_lr = a.lr; sched.min_lr = a.min_lr; sched.warmup_steps = a.warmup; sched.total_steps = a.steps;
        LossOptions lopt;
        lopt.mtp_lambda = a.mtp_lambda;
        lopt.balance_alpha = a.balance_alpha;
        lopt.balance = a.balance == "sequence" ? BalanceLoss::sequence_wise : a.balance == "expert" ? BalanceLoss::expert_level : BalanceLoss::none;
        if (a.balance != "none" && a.balance != "sequence" && a.balance != "expert") fail("--balance: unknown \"", a.balance, "\"");

        const ParamCounts pc = count_parameters(cfg);
        std::printf("data %s: %zu train / %zu val bytes | model %.2fM params (%.2fM activated, %.2fM MTP) | batch %d x %d | "
                    "%d threads\n", a.data.c_str(), train.size(), val.size(), pc.total / 1e6, pc.activated / 1e6, pc.mtp / 1e6,
                    a.batch, a.seq, thread_count());
        mkdir(a.out.c_str(), 0755);
        std::vector<int32_t> batch(size_t(a.batch) * (a.seq + 1));
        const double start = now_seconds();
        int first_step = opt.step;
        for (int step = opt.step; step < a.steps; ++step) {
            sample_batch(train, a.batch, a.seq, uint64_t(a.seed), step, batch.data());
            const float lr = sched.at(step);
            Losses l = model.forward_backward(batch.data(), a.batch, a.seq, lopt);
            const double gnorm = adamw_step(model, opt, lr);
            auto loads = model.expert_loads();
            if (a.bias_update) update_routing_bias(model, loads, cfg.bias_update_speed);
            double maxvio = 0;
            for (auto& ld : loads) maxvio = std::max(maxvio, max_violation(ld));
            const double elapsed = now_seconds() - start;
            const int done = step + 1 - first_step;
            const double tok_s = double(done) * a.batch * a.seq / elapsed;
            const double eta = elapsed / done * (a.steps - step - 1);
            if (step % 10 == 0 || step + 1 == a.steps)
                std::printf("step %5d/%d | loss %.4f | mtp %.4f | maxvio %.2f | lr %.2e | gnorm %.2f | %.0f tok/s | "
                            "%.0fs elapsed, ETA %.0fs\n", step + 1, a.steps, l.main, l.mtp.empty() ? 0.0 : l.mtp[0],
                            maxvio, lr, gnorm, tok_s, elapsed, eta);
            const bool last = step + 1 == a.steps || (a.time_limit > 0 && elapsed > a.time_limit);
            if ((step + 1) % a.eval_every == 0 || last) {
                std::vector<std::vector<int64_t>> vloads;
                const double vl = evaluate(model, val, a.seq, last ? 0 : a.eval_windows, a.batch, &vloads);
                double vio = 0;
                for (auto& ld : vloads) vio = std::max(vio, max_violation(ld));
                std::printf("  eval step %d: val loss %.4f (%s) | MaxVio_global %.3f | %.0fs\n", step + 1, vl,
                            last ? "whole split" : "subset", vio, now_seconds() - start);
                std::fflush(stdout);
            }
            if (last) {
                save_checkpoint(a.out + "/checkpoint.bin", model, opt);
                std::printf("saved %s/checkpoint.bin\n", a.out.c_str());
                break;
            }
        }
        if (a.sample > 0) std::printf("\nsample:\n%s\n", sample_text(model, "\n", a.sample, uint64_t(a.seed)).c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
