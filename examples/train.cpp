// build/train: trains a DeepSeek-V3 model (the `tiny` preset by default: MLA, DeepSeekMoE with loss-free balancing,
// MTP) on a text file, bytes as tokens, the last 10% of the file held out for validation (nanoGPT's split).
//
//   build/train                                   Tiny Shakespeare if data/tinyshakespeare.txt exists
//   build/train --data FILE --steps 2000 --out runs/tiny
//   build/train --resume runs/tiny/checkpoint.bin  continue bit for bit where a run stopped
//   build/train_cuda --preset small                the same program on the GPU (`make cuda`; cuda/train_cuda.cu)
//   build/train_cuda --preset large --batch 8 --seq 1024   the ~1.66B shape of the torchtitan peer's --preset large
//   mpirun -np 4 build/train_mpi --ep             the same program over MPI, one process per rank (`make mpi`):
//                                                 DP, or DP x EP with --ep (header section 9); add --hostfile FILE
//                                                 to spread the processes over machines
//
// Prints progress (step, loss, tokens/s, ETA), validation loss and MaxVio every --eval-every steps, and at the end
// saves the checkpoint (also at every evaluation, so that --resume can continue a stopped run), a Hugging Face
// directory that transformers loads, three PNGs (loss curves, expert load, attention), and a short sample.
// Under MPI (DSV3_MPI) every rank reads the data and takes its rows of the same batches; rank 0 alone prints,
// evaluates and saves (under --ep after gathering every expert from its owner).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "../deepseek_v3.hpp"

using namespace dsv3;

struct Args {
    std::string data, out = "runs/tiny", resume, preset = "tiny", loss_log;
    int steps = 2000, batch = 16, seq = 64, warmup = 100, eval_every = 200, eval_windows = 64, seed = 1, sample = 300;
    float lr = 3e-3f, min_lr = 3e-4f, mtp_lambda = 0.3f, bias_speed = -1, balance_alpha = 0.0001f;
    std::string schedule = "cosine", balance = "none";
    bool bias_update = true, save = true, fp8 = false, profile = false, ep = false, help = false;
    double time_limit = 0;  // seconds; 0 = none
};

static void usage() {
    std::printf(
        "usage: train [--preset tiny|small|large] [--data FILE] [--out DIR] [--resume CKPT] [--steps N] [--batch B] [--seq T]\n"
        "             [--lr X] [--loss-log FILE]\n"
        "             [--min-lr X] [--warmup N] [--schedule cosine|v3|multi_step] [--eval-every N]\n"
        "             [--eval-windows N] [--balance none|sequence|expert] [--balance-alpha A] [--bias-speed G]\n"
        "             [--no-bias-update] [--mtp-lambda L] [--seed S] [--sample N] [--time-limit SECONDS]\n"
        "             [--no-save]   (no checkpoint, Hugging Face directory or plots: for timing runs)\n"
        "             [--fp8]       V3's FP8 recipe (Config.fp8_training): every linear layer but the head and router in FP8\n"
        "             [--profile]   time every module and kernel of the steps after the first, and print the tables\n"
        "             [--ep]        build/train_mpi: expert parallelism (the routed experts split over the ranks)\n");
}

static Args parse(int argc, char** argv, bool print_usage) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) fail("argument ", k, ": expected a value");
            return argv[++i];
        };
        // Counts and numbers through the header's parse_int / parse_float: an error names the flag, the range and
        // the value ("--batch: expected an integer in [1, 65536], got '-1'"); counts start at 1 (0 steps or an
        // evaluation every 0 steps means nothing).
        auto count = [&](long long lo, long long hi) { return int(parse_int(value(), k, lo, hi)); };
        auto number = [&](double lo, double hi) { return parse_float(value(), k, lo, hi); };
        if (k == "--data") a.data = value();
        else if (k == "--preset") a.preset = value();
        else if (k == "--no-save") a.save = false;
        else if (k == "--fp8") a.fp8 = true;
        else if (k == "--profile") a.profile = true;
        else if (k == "--ep") a.ep = true;
        else if (k == "--loss-log") a.loss_log = value();
        else if (k == "--out") a.out = value();
        else if (k == "--resume") a.resume = value();
        else if (k == "--steps") a.steps = count(1, 1000000000);
        else if (k == "--batch") a.batch = count(1, 65536);
        else if (k == "--seq") a.seq = count(1, 1 << 22);
        else if (k == "--lr") a.lr = float(number(0, 10));
        else if (k == "--min-lr") a.min_lr = float(number(0, 10));
        else if (k == "--warmup") a.warmup = count(0, 1000000000);
        else if (k == "--schedule") a.schedule = value();
        else if (k == "--eval-every") a.eval_every = count(1, 1000000000);
        else if (k == "--eval-windows") a.eval_windows = count(1, 1000000000);
        else if (k == "--balance") a.balance = value();
        else if (k == "--balance-alpha") a.balance_alpha = float(number(0, 10));
        else if (k == "--bias-speed") a.bias_speed = float(number(0, 10));
        else if (k == "--no-bias-update") a.bias_update = false;
        else if (k == "--mtp-lambda") a.mtp_lambda = float(number(0, 100));
        else if (k == "--seed") a.seed = count(0, INT_MAX);
        else if (k == "--sample") a.sample = count(0, 1000000);
        else if (k == "--time-limit") a.time_limit = number(0, 1e9);
        else if (k == "--help" || k == "-h") a.help = true;
        else {
            if (print_usage) usage();
            fail("unknown argument \"", k, "\"");
        }
    }
    return a;
}

// Greedy-free sampling: temperature 0.8 from the model's next-token distribution, recomputing the whole window.
// A few lines of text from the trained model: the latent KV cache and temperature sampling of section 7.
static std::string sample_text(Model& model, const std::string& prompt, int n, uint64_t seed) {
    std::vector<int32_t> ids(prompt.begin(), prompt.end());
    SamplingOptions s;
    s.temperature = 0.8f;
    std::string out = prompt;
    for (int32_t t : generate(model, ids, n, s, seed, /*use_mtp=*/false)) out.push_back(char(t));
    return out;
}

// The three pictures of a run: loss curves, expert load over training, and attention on a prompt.
static void write_plots(Model& model, const std::string& dir, const std::vector<PlotSeries>& curves,
                        const std::vector<std::vector<float>>& load_rows, const std::vector<std::string>& load_labels) {
    plot_lines(dir + "/loss.png", "DeepSeek-V3 tiny: loss", "step", "cross-entropy (nats per byte)", curves);
    if (!load_rows.empty()) {
        // load_rows holds one row per MoE block at every evaluation; show at most 6 evaluations, evenly spread,
        // the last included, so that every row keeps its label.
        const int cols = int(load_rows[0].size()), per_eval = int(model.expert_loads().size());
        const int evals = int(load_rows.size()) / per_eval, shown = std::min(evals, 6);
        std::vector<float> values;
        std::vector<std::string> labels;
        for (int i = 0; i < shown; ++i) {
            const int e = shown == 1 ? evals - 1 : int(int64_t(i) * (evals - 1) / (shown - 1));
            for (int r = e * per_eval; r < (e + 1) * per_eval; ++r) {
                values.insert(values.end(), load_rows[size_t(r)].begin(), load_rows[size_t(r)].end());
                labels.push_back(load_labels[size_t(r)]);
            }
        }
        std::vector<std::string> col_labels;
        for (int e = 0; e < cols; ++e) col_labels.push_back(std::to_string(e));
        HeatmapOptions ho;
        ho.colorbar_label = "share of routed tokens";
        plot_heatmap(dir + "/expert_load.png", "Expert load on validation data (rows: MoE layer @ step)", values,
                     int(labels.size()), cols, labels, col_labels, "routed expert", "layer @ step", ho);
    }
    std::string prompt = "ROMEO:\nWhat light through yonder window";
    prompt.resize(std::min(prompt.size(), size_t(model.cfg.max_seq_len)));  // the model's context (a short --seq)
    std::vector<int32_t> row;
    for (char ch : prompt) row.push_back(int32_t(uint8_t(ch)));
    row.push_back(0);
    LossOptions opt;
    opt.with_mtp = false;
    const int T = int(prompt.size());
    model.forward(row.data(), 1, T, opt);
    const float* probs = model.attention_probs(model.cfg.n_layers - 1);  // head 0 of the last layer
    if (!probs) {
        std::printf("attention.png: not drawn (the GPU's flash attention keeps no probabilities)\n");
        return;
    }
    std::vector<float> w(size_t(T) * T);
    backend::to_host(w.data(), probs, w.size());  // (device memory on the GPU backend)
    std::vector<std::string> labels;
    for (char ch : prompt) labels.push_back(ch == '\n' ? "\\n" : std::string(1, ch));
    plot_attention(dir + "/attention.png", "Attention, last layer, head 0", w, labels);
}

// The run. comm: this process's rank under MPI (build/train_mpi); null: one process, the single-rank train_step.
static void run(int argc, char** argv, Communicator* comm) {
    const int R = comm ? comm->world_size() : 1;
    const bool lead = !comm || comm->rank() == 0;  // prints, evaluates and saves
    Args a = parse(argc, argv, lead);
    if (a.help) {
        if (lead) usage();
        return;
    }
    if (a.ep && !comm) fail("--ep: expert parallelism needs several processes: build/train_mpi (make mpi)");
    if (a.preset != "tiny" && a.preset != "small" && a.preset != "large")
        fail("--preset: unknown \"", a.preset, "\" (tiny, small or large)");
    Config cfg = a.preset == "small" ? Config::small() : (a.preset == "large" ? Config::large() : Config::tiny());
    if (a.bias_speed >= 0) cfg.bias_update_speed = a.bias_speed;
    if (a.fp8) cfg.fp8_training = true;
    if (a.seq > cfg.max_seq_len) fail("--seq ", a.seq, " exceeds the preset's max_seq_len ", cfg.max_seq_len);
    cfg.max_seq_len = a.seq;  // the model's context is what it is trained on (generation slides past it)
    std::string source;
    std::vector<int32_t> tokens = training_bytes(a.data, &source);
    const size_t split = tokens.size() * 9 / 10;
    std::vector<int32_t> train(tokens.begin(), tokens.begin() + long(split)), val(tokens.begin() + long(split), tokens.end());
    if (val.size() < size_t(a.seq) + 2) fail("training text ", source, ": ", tokens.size(), " bytes is too short for --seq ", a.seq);

    Model model(cfg, uint64_t(a.seed));
    AdamW opt;
    if (!a.resume.empty()) {
        load_checkpoint(a.resume, model, opt);  // on every rank (each machine needs the file)
        if (lead) std::printf("resumed from %s at step %d\n", a.resume.c_str(), opt.step);
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

    std::unique_ptr<ExpertParallel> ep(a.ep && comm ? new ExpertParallel(*comm, cfg) : nullptr);
    const RowShare share = row_share(a.batch, R, comm ? comm->rank() : 0);  // this rank's rows of every batch
    const ParamCounts pc = count_parameters(cfg);
    if (lead)
        std::printf("data: %s\n  %zu train / %zu validation bytes | model %.2fM params (%.2fM activated per token, "
                    "%.2fM in MTP) | batch %d x %d | %d threads%s\n", source.c_str(), train.size(), val.size(),
                    pc.total / 1e6, pc.activated / 1e6, pc.mtp / 1e6, a.batch, a.seq, thread_count(),
                    comm ? (" per rank, " + std::to_string(R) + " MPI ranks, " + (ep ? "DP x EP" : "DP")).c_str()
                         : "");
    if (lead) make_directories(a.out);
    if (lead && !backend::host_memory) std::printf("  backend: CUDA (model and optimizer in GPU memory)\n");
    FILE* loss_log = a.loss_log.empty() || !lead ? nullptr : std::fopen(a.loss_log.c_str(), "w");
    if (lead && !a.loss_log.empty() && !loss_log) fail("--loss-log ", a.loss_log, ": cannot open for writing");
    double train_seconds = 0;  // the training steps alone, the first one (warm-up) excluded
    std::vector<int32_t> batch(size_t(a.batch) * (a.seq + 1));
    std::vector<PlotSeries> curves = {{"train", {}, {}}, {"validation", {}, {}}, {"MTP (train, depth 1)", {}, {}}};
    std::vector<std::vector<float>> load_rows;
    std::vector<std::string> load_labels;
    const double start = now_seconds();
    const int first_step = opt.step;
    Progress progress(a.steps - first_step);
    double smooth = 0;
    for (int step = opt.step; step < a.steps; ++step) {
        sample_batch(train, a.batch, a.seq, uint64_t(a.seed), step, batch.data());  // every rank: the same batch
        const float lr = sched.at(step);
        const double step_start = now_seconds();
        const int32_t* rows = batch.data() + size_t(share.first) * (a.seq + 1);
        if (a.profile && step == first_step + 1) profile().start(backend::synchronize);  // after the warm-up step
        profile().on = a.profile && step > first_step;
        StepResult r;
        {
            DSV3_PROFILE_MODULE("training step");
            r = comm ? parallel_train_step(*comm, model, opt, rows, share.count, a.seq, lr, lopt, ep.get(), a.bias_update)
                     : train_step(model, opt, batch.data(), a.batch, a.seq, lr, lopt, a.bias_update);
        }
        profile().on = false;
        if (step > first_step) train_seconds += now_seconds() - step_start;
        if (loss_log) std::fprintf(loss_log, "%d %.9g %.9g %.9g\n", step + 1, r.loss.main,
                                   r.loss.mtp.empty() ? 0.0 : r.loss.mtp[0], r.grad_norm);
        smooth = step == first_step ? r.loss.main : 0.9 * smooth + 0.1 * r.loss.main;
        if (step % 10 == 9) {
            curves[0].x.push_back(step + 1); curves[0].y.push_back(smooth);
            if (!r.loss.mtp.empty()) { curves[2].x.push_back(step + 1); curves[2].y.push_back(r.loss.mtp[0]); }
        }
        const int done = step + 1 - first_step;
        if (lead)
            progress.update(done, r.loss.main, int64_t(done) * a.batch * a.seq,
                            {{"mtp", r.loss.mtp.empty() ? 0.0 : r.loss.mtp[0]}, {"maxvio", r.max_violation},
                             {"lr", lr}, {"gnorm", r.grad_norm}});
        const double elapsed = now_seconds() - start;
        bool last = step + 1 == a.steps || (a.time_limit > 0 && elapsed > a.time_limit);
        if (comm && a.time_limit > 0) {  // the ranks' clocks differ: all stop when one is out of time
            int64_t out_of_time = last;
            all_reduce(*comm, &out_of_time, 1);
            last = out_of_time > 0;
        }
        if (ep && ((step + 1) % a.eval_every == 0 || last)) {  // rank 0 evaluates the whole model, alone
            gather_experts(*comm, model, opt, *ep);
            model.expert_runner = nullptr;
        }
        if (lead && ((step + 1) % a.eval_every == 0 || last)) {
            std::vector<std::vector<int64_t>> vloads;
            const double vl = evaluate(model, val, a.seq, last ? 0 : a.eval_windows, a.batch, &vloads);
            double vio = 0;
            for (size_t l = 0; l < vloads.size(); ++l) {
                vio = std::max(vio, max_violation(vloads[l]));
                int64_t total = 0;
                for (int64_t c : vloads[l]) total += c;
                std::vector<float> share;
                for (int64_t c : vloads[l]) share.push_back(float(double(c) / double(std::max<int64_t>(total, 1))));
                load_rows.push_back(share);
                const int main_moe = cfg.n_layers - cfg.n_dense_layers;  // loads: main MoE blocks, then MTP
                load_labels.push_back((int(l) < main_moe ? "L" + std::to_string(cfg.n_dense_layers + int(l))
                                                         : "MTP" + std::to_string(int(l) - main_moe + 1)) +
                                      " @" + std::to_string(step + 1));
            }
            curves[1].x.push_back(step + 1); curves[1].y.push_back(vl);
            std::printf("%seval step %d: val loss %.4f (%s) | MaxVio_global %.3f | %.0fs\n", progress.tty ? "\n" : "",
                        step + 1, vl, last ? "whole validation split" : "subset", vio, now_seconds() - start);
            std::fflush(stdout);
            if (!last && a.save) save_checkpoint(a.out + "/checkpoint.bin", model, opt);  // --resume continues here
        }
        if (last) {
            if (done > 1 && lead)
                std::printf("training: %.0f tokens/s over steps %d-%d (%.3f s per step)\n",
                            double(done - 1) * a.batch * a.seq / train_seconds, first_step + 2, step + 1,
                            train_seconds / (done - 1));
            if (a.profile && done > 1 && lead)
                std::printf("profile of steps %d-%d (%s%s):\n%s", first_step + 2, step + 1,
                            backend::host_memory ? "CPU" : "GPU, synchronised at every scope", comm ? ", rank 0" : "",
                            profile().table(done - 1).c_str());
            if (ep && lead)
                std::printf("expert parallel, rank 0: %.2f MB per step sent to other ranks (dispatch and combine, forward "
                            "and backward) in %.1f ms per step of all-to-alls\n", double(ep->stats.bytes_moved) / 1e6 / done,
                            ep->stats.seconds_moving * 1e3 / done);
            if (!a.save || !lead) break;
            save_checkpoint(a.out + "/checkpoint.bin", model, opt);
            save_hf(a.out + "/hf", model);  // config.json + model.safetensors: transformers loads it
            write_plots(model, a.out, curves, load_rows, load_labels);
            std::printf("saved %s/checkpoint.bin, the Hugging Face directory %s/hf and %s/{loss,expert_load,attention}.png\n",
                        a.out.c_str(), a.out.c_str(), a.out.c_str());
            break;
        }
    }
    if (loss_log) std::fclose(loss_log);
    if (a.sample > 0 && lead) std::printf("\nsample:\n%s\n", sample_text(model, "\n", a.sample, uint64_t(a.seed)).c_str());
}

int main(int argc, char** argv) {
#ifdef DSV3_MPI
    run_mpi(argc, argv, [&](Communicator& comm) { run(argc, argv, &comm); });  // an error: printed, then MPI_Abort
    return 0;
#else
    try {
        run(argc, argv, nullptr);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "train: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "train: error: unknown exception\n");
        return 1;
    }
#endif
}
