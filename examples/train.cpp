// build/train: trains a DeepSeek-V3 model (the `tiny` preset by default: MLA, DeepSeekMoE with loss-free balancing,
// MTP) on a text file, bytes as tokens, the last 10% of the file held out for validation (nanoGPT's split), or on
// the BPE token files of build/prepare_data (`make data`).
//
//   build/train                                   Tiny Shakespeare if data/tinyshakespeare.txt exists
//   build/train --data FILE --steps 2000 --out runs/tiny
//   build/train --tokens data/tinyshakespeare_v512_train.bin    BPE tokens (tokenizer and validation file found
//                                                 beside it: data/tinyshakespeare_v512{.tokenizer,_val.bin})
//   build/train --resume runs/tiny/checkpoint.bin  continue bit for bit where a run stopped, with its flags
//   build/train_cuda --preset small                the same program on the GPU (`make cuda`; cuda/train_cuda.cu)
//   build/train_cuda --preset large --batch 8 --seq 1024   the ~1.66B shape of the torchtitan peer's --preset large
//   mpirun -np 4 build/train_mpi --ep             the same program over MPI, one process per rank (`make mpi`):
//                                                 DP, or DP x EP with --ep (header section 9); add --hostfile FILE
//                                                 to spread the processes over machines
//
// Prints progress (step, loss, tokens/s, ETA), validation loss and MaxVio every --eval-every steps, and at the end
// saves the checkpoint (also at every evaluation and on Ctrl-C, so that --resume can continue a stopped run), the
// run's history (train_log.txt: every step's losses and every evaluation, which the plots are drawn from), a Hugging
// Face directory that transformers loads, three PNGs (loss curves, expert load, attention), and a short sample.
// A resumed run is a continuation: the same flags (recorded in the checkpoint; flags given again override them), the
// step counter, the learning-rate schedule, the log and the plots go on from the checkpoint's step.
// Under MPI (DSV3_MPI) every rank reads the data and takes its rows of the same batches; rank 0 alone prints,
// evaluates and saves (under --ep after gathering every expert from its owner).
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "../deepseek_v3.hpp"

using namespace dsv3;

// The command that resumes this program's run (printed when Ctrl-C stops it).
#if defined(DSV3_MPI)
constexpr const char* kResume = "mpirun -np RANKS build/train_mpi --resume";
#elif defined(DSV3_BACKEND_CUDA)
constexpr const char* kResume = "build/train_cuda --resume";
#else
constexpr const char* kResume = "build/train --resume";
#endif

struct Args {
    std::string data, tokens, val_tokens, tokenizer, out, resume, preset = "tiny", loss_log, attention_prompt;
    int steps = 2000, batch = 16, seq = 64, warmup = 100, eval_every = 200, eval_windows = 64, seed = 1, sample = 300;
    int attention_layer = -1, attention_head = 0;  // -1: the last layer
    float lr = 3e-3f, min_lr = 3e-4f, mtp_lambda = 0.3f, bias_speed = -1, balance_alpha = 0.0001f;
    int mtp_depth = -1;               // -1: the preset's
    std::string schedule = "cosine", balance = "none";
    bool bias_update = true, save = true, fp8 = false, profile = false, ep = false, help = false;
    double time_limit = 0;            // seconds; 0 = none
    std::vector<std::string> record;  // the words of the options a resumed run continues with (not the session's)
};

static void usage() {
    std::printf(
        "usage: train [options]\n"
        "Trains a DeepSeek-V3 model on a text file or BPE token files; saves a checkpoint, its log, plots, a sample.\n"
        "data (bytes of a text file, or BPE token files from build/prepare_data):\n"
        "  --data FILE           text, one token a byte (default data/tinyshakespeare.txt, else the built-in\n"
        "                        synthetic corpus); the last 10%% is the validation split\n"
        "  --tokens FILE         train on a token file of build/prepare_data (STEM_vN_train.bin) instead\n"
        "  --val-tokens FILE     its validation tokens (default STEM_vN_val.bin beside it, else its last 10%%)\n"
        "  --tokenizer FILE      its tokenizer (default STEM_vN.tokenizer beside it); recorded in the checkpoint\n"
        "model and optimisation:\n"
        "  --preset NAME         tiny, small or large (default tiny)\n"
        "  --steps N             total optimizer steps of the run (default 2000)\n"
        "  --batch B             sequences per step (default 16)\n"
        "  --seq T               tokens per sequence, the model's context (default 64)\n"
        "  --lr X                peak learning rate (default 3e-3)\n"
        "  --min-lr X            final learning rate (default 3e-4)\n"
        "  --warmup N            linear warm-up steps (default 100)\n"
        "  --schedule NAME       cosine, v3 or multi_step (default cosine)\n"
        "  --balance NAME        auxiliary balance loss: none, sequence or expert (default none)\n"
        "  --balance-alpha A     its weight (default 1e-4)\n"
        "  --bias-speed G        loss-free balancing's bias step gamma (default: the preset's, 1e-3)\n"
        "  --no-bias-update      no loss-free balancing\n"
        "  --mtp-lambda L        weight of the MTP loss (default 0.3)\n"
        "  --mtp-depth D         MTP modules (default: the preset's, 1; 0: none, like the GPU peers)\n"
        "  --fp8                 V3's FP8 recipe (Config.fp8_training): every linear layer but the head and router in FP8\n"
        "  --seed S              initialisation and batches (default 1)\n"
        "evaluation and output:\n"
        "  --eval-every N        validate (on --eval-windows windows) and save a checkpoint every N steps (default 200)\n"
        "  --eval-windows N      validation windows of the periodic evaluations (default 64; the last one: all)\n"
        "  --out DIR             run directory (default runs/tiny; with --resume: the checkpoint's directory)\n"
        "  --sample N            bytes or tokens sampled at the end (default 300; 0: none)\n"
        "  --attention-prompt S  the text of attention.png (default: the start of the training text)\n"
        "  --attention-layer L   its layer, 0 .. layers-1 (default the last)\n"
        "  --attention-head H    its head (default 0)\n"
        "  --no-save             no checkpoint, log, Hugging Face directory or plots: for timing runs\n"
        "this session only (a resumed run does not inherit them):\n"
        "  --resume CKPT         continue the run of this checkpoint (its flags, step, schedule, log and plots)\n"
        "  --time-limit SECONDS  stop early enough that the final evaluation, saves and sample end within it\n"
        "                        (default 0: none); the final evaluation then uses as many windows as fit\n"
        "  --loss-log FILE       also write \"step loss mtp_loss grad_norm\" of this session's steps to FILE\n"
        "  --profile             time every module and kernel of the steps after the first, and print the tables\n"
        "  --ep                  build/train_mpi: expert parallelism (the routed experts split over the ranks)\n"
        "  --help, -h            this text\n"
        "Ctrl-C saves a checkpoint and the log, draws the plots and exits (status 130); --resume continues.\n");
}

static Args parse(const std::vector<std::string>& words) {
    Args a;
    const int n = int(words.size());
    for (int i = 0; i < n; ++i) {
        const int first = i;
        const std::string k = words[size_t(i)];
        auto value = [&]() -> std::string {
            if (i + 1 >= n) fail(k, ": expected a value");
            return words[size_t(++i)];
        };
        // Counts and numbers through the header's parse_int / parse_float: an error names the flag, the range and
        // the value ("--batch: expected an integer in [1, 65536], got '-1'"); counts start at 1 (0 steps or an
        // evaluation every 0 steps means nothing).
        auto count = [&](long long lo, long long hi) { return int(parse_int(value(), k, lo, hi)); };
        auto number = [&](double lo, double hi) { return parse_float(value(), k, lo, hi); };
        bool session = false;  // an option of this process alone: not recorded for --resume
        if (k == "--data") a.data = value();
        else if (k == "--tokens") a.tokens = value();
        else if (k == "--val-tokens") a.val_tokens = value();
        else if (k == "--tokenizer") a.tokenizer = value();
        else if (k == "--preset") a.preset = value();
        else if (k == "--no-save") a.save = false;
        else if (k == "--fp8") a.fp8 = true;
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
        else if (k == "--mtp-depth") a.mtp_depth = count(0, 64);
        else if (k == "--seed") a.seed = count(0, INT_MAX);
        else if (k == "--sample") a.sample = count(0, 1000000);
        else if (k == "--attention-prompt") a.attention_prompt = value();
        else if (k == "--attention-layer") a.attention_layer = count(0, 1 << 16);
        else if (k == "--attention-head") a.attention_head = count(0, 1 << 16);
        else {
            session = true;
            if (k == "--out") a.out = value();
            else if (k == "--resume") a.resume = value();
            else if (k == "--time-limit") a.time_limit = number(0, 1e9);
            else if (k == "--loss-log") a.loss_log = value();
            else if (k == "--profile") a.profile = true;
            else if (k == "--ep") a.ep = true;
            else if (k == "--help" || k == "-h") a.help = true;
            else fail("unknown option \"", k, "\" (see train --help)");
        }
        if (!session) a.record.insert(a.record.end(), words.begin() + first, words.begin() + i + 1);
    }
    return a;
}

// What the model reads: token ids of the training and validation splits, and the tokenizer that maps them to text
// (bytes only, when the tokens are the bytes of a text file).
struct Corpus {
    std::vector<int32_t> train, val;
    Tokenizer tokenizer = Tokenizer::bytes_only();
    std::string source, tokenizer_path;  // tokenizer_path: empty for bytes
    double val_bytes_per_token = 1;      // converts a loss per token into a loss per byte (character, in ASCII text)
    std::string prompt;                  // the first line of the training text: a prompt that fits the corpus
};

static std::string sibling(const std::string& path, const std::string& suffix, const std::string& replacement) {
    if (path.size() < suffix.size() || path.compare(path.size() - suffix.size(), suffix.size(), suffix) != 0) return "";
    return path.substr(0, path.size() - suffix.size()) + replacement;
}

static Corpus load_corpus(const Args& a) {
    Corpus c;
    std::vector<int32_t> all;
    if (a.tokens.empty()) {
        if (!a.val_tokens.empty() || !a.tokenizer.empty()) fail("--val-tokens and --tokenizer go with --tokens FILE");
        all = training_bytes(a.data, &c.source);
    } else {
        if (!a.data.empty()) fail("--data and --tokens: give one of them (text, or token files)");
        const TokenDataset train = TokenDataset::load(a.tokens);
        c.tokenizer_path = a.tokenizer.empty() ? sibling(a.tokens, "_train.bin", ".tokenizer") : a.tokenizer;
        if (c.tokenizer_path.empty())
            fail("--tokens ", a.tokens, ": give its tokenizer with --tokenizer FILE (found by itself beside "
                 "STEM_train.bin only)");
        c.tokenizer = Tokenizer::load(c.tokenizer_path);
        if (uint32_t(c.tokenizer.vocab_size()) != train.vocab_size)
            fail("--tokens ", a.tokens, " has a vocabulary of ", train.vocab_size, " tokens, the tokenizer ",
                 c.tokenizer_path, " ", c.tokenizer.vocab_size());
        std::string val_path = a.val_tokens.empty() ? sibling(a.tokens, "_train.bin", "_val.bin") : a.val_tokens;
        if (a.val_tokens.empty() && !std::filesystem::exists(val_path)) val_path.clear();
        c.source = a.tokens + " (tokenizer " + c.tokenizer_path + ", " + std::to_string(train.vocab_size) + " tokens)";
        all.assign(train.tokens.begin(), train.tokens.end());
        if (!val_path.empty()) {
            const TokenDataset val = TokenDataset::load(val_path);
            if (val.vocab_size != train.vocab_size)
                fail("--val-tokens ", val_path, " has a vocabulary of ", val.vocab_size, ", --tokens ",
                     train.vocab_size);
            c.train = std::move(all);
            c.val.assign(val.tokens.begin(), val.tokens.end());
            c.source += ", validation " + val_path;
        }
    }
    if (c.val.empty()) {  // one sequence: its last 10% for validation
        const size_t split = all.size() * 9 / 10;
        c.train.assign(all.begin(), all.begin() + long(split));
        c.val.assign(all.begin() + long(split), all.end());
    }
    if (c.val.size() < size_t(a.seq) + 2)
        fail("training data ", c.source, ": ", c.val.size(), " validation tokens, too few for --seq ", a.seq);
    size_t val_bytes = 0;
    for (int32_t t : c.val) val_bytes += c.tokenizer.pieces.at(size_t(t)).size();
    c.val_bytes_per_token = double(val_bytes) / double(c.val.size());
    const size_t head = std::min<size_t>(c.train.size(), 64);
    c.prompt = c.tokenizer.decode(std::vector<int32_t>(c.train.begin(), c.train.begin() + long(head)));
    const size_t line_end = c.prompt.find('\n');  // the first line, or its first 16 bytes (at most 40)
    c.prompt.resize(std::min({line_end == std::string::npos ? size_t(16) : line_end + 1, size_t(40), c.prompt.size()}));
    return c;
}

// A few lines of text from the trained model: the latent KV cache and temperature sampling of section 7.
static std::string sample_text(Model& model, const Corpus& c, int n, uint64_t seed) {
    std::vector<int32_t> ids;
    for (uint32_t t : c.tokenizer.encode(c.prompt)) ids.push_back(int32_t(t));
    SamplingOptions s;
    s.temperature = 0.8f;
    return c.prompt + c.tokenizer.decode(generate(model, ids, n, s, seed, /*use_mtp=*/false));
}

// The three pictures of a run, drawn from its whole history: loss curves, expert load over training, and attention
// on a prompt.
static void write_plots(Model& model, const Args& a, const Corpus& corpus, const TrainingLog& log) {
    const Config& cfg = model.cfg;
    std::vector<PlotSeries> curves = {
        {"train (smoothed)", {}, {}}, {"validation", {}, {}}, {"MTP (train, depth 1)", {}, {}}};
    double smooth = 0;
    for (size_t i = 0; i < log.steps.size(); ++i) {
        const TrainingLog::Step& r = log.steps[i];
        smooth = i == 0 ? r.loss : 0.9 * smooth + 0.1 * r.loss;
        if (r.step % 10 == 0) {
            curves[0].x.push_back(r.step); curves[0].y.push_back(smooth);
            if (cfg.n_mtp_depth > 0) { curves[2].x.push_back(r.step); curves[2].y.push_back(r.mtp); }
        }
    }
    for (const TrainingLog::Eval& e : log.evals) { curves[1].x.push_back(e.step); curves[1].y.push_back(e.loss); }
    const std::string unit = corpus.tokenizer_path.empty() ? "nats per byte" : "nats per token";
    plot_lines(a.out + "/loss.png", "DeepSeek-V3 " + a.preset + ": loss", "step", "cross-entropy (" + unit + ")",
               curves);
    // The expert load at no more than 6 evaluations, evenly spread, the last included, one row per MoE block.
    const int evals = int(log.evals.size()), shown = std::min(evals, 6);
    if (shown > 0 && !log.evals.back().loads.empty()) {
        const int cols = int(log.evals.back().loads[0].size()), main_moe = cfg.n_layers - cfg.n_dense_layers;
        std::vector<float> values;
        std::vector<std::string> labels;
        for (int i = 0; i < shown; ++i) {
            const int k = shown == 1 ? evals - 1 : int(int64_t(i) * (evals - 1) / (shown - 1));
            const TrainingLog::Eval& e = log.evals[size_t(k)];
            for (size_t l = 0; l < e.loads.size(); ++l) {
                int64_t total = 0;
                for (int64_t c : e.loads[l]) total += c;
                for (int64_t c : e.loads[l]) values.push_back(float(double(c) / double(std::max<int64_t>(total, 1))));
                labels.push_back((int(l) < main_moe ? "L" + std::to_string(cfg.n_dense_layers + int(l))
                                                    : "MTP" + std::to_string(int(l) - main_moe + 1)) +
                                 " @" + std::to_string(e.step));
            }
        }
        std::vector<std::string> col_labels;
        for (int e = 0; e < cols; ++e) col_labels.push_back(std::to_string(e));
        HeatmapOptions ho;
        ho.colorbar_label = "share of routed tokens";
        plot_heatmap(a.out + "/expert_load.png", "Expert load on validation data (rows: MoE layer @ step)", values,
                     int(labels.size()), cols, labels, col_labels, "routed expert", "layer @ step", ho);
    }
    std::vector<int32_t> row;
    for (uint32_t t : corpus.tokenizer.encode(a.attention_prompt.empty() ? corpus.prompt : a.attention_prompt))
        row.push_back(int32_t(t));
    row.resize(std::min(row.size(), size_t(cfg.max_seq_len)));  // the model's context (a short --seq)
    const int T = int(row.size()), layer = a.attention_layer < 0 ? cfg.n_layers - 1 : a.attention_layer;
    if (T == 0) fail("--attention-prompt: empty");
    std::vector<std::string> labels;
    for (int32_t t : row) labels.push_back(corpus.tokenizer.pieces.at(size_t(t)));
    row.push_back(0);  // the target of the last position (unused)
    LossOptions opt;
    opt.with_mtp = false;
    model.forward(row.data(), 1, T, opt);
    const float* probs = model.attention_probs(layer);  // [1, H, T, T]
    if (!probs) {
        std::printf("attention.png: not drawn (the GPU's flash attention keeps no probabilities)\n");
        return;
    }
    std::vector<float> w(size_t(T) * T);
    backend::to_host(w.data(), probs + size_t(a.attention_head) * T * T, w.size());  // (device memory on the GPU)
    const std::string title = "Attention, layer " + std::to_string(layer) + ", head " + std::to_string(a.attention_head);
    plot_attention(a.out + "/attention.png", title, w, labels);
}

// --time-limit covers the whole run: the steps stop early enough for the final evaluation, the saves and the sample
// to end within it, each estimated from what this run has measured so far. The final evaluation gets at most a
// quarter of the limit: the whole validation split when it fits, else as many windows as do.
struct TimeBudget {
    double limit = 0;                             // seconds; 0: none
    int batch = 1;
    double step_s = 0, window_s = 0, save_s = 0;  // measured: a training step, a validation window, a checkpoint save
    double window() const { return window_s > 0 ? window_s : step_s / (2.0 * batch); }  // unmeasured: a forward of a
                                                                                         // row is ~1/3 of its step
    int64_t final_windows(int64_t available) const {
        if (limit <= 0) return available;
        return std::clamp<int64_t>(int64_t(0.25 * limit / window()), 1, available);
    }
    // The time the end of the run needs: evaluation, checkpoint, log, Hugging Face directory, plots, sample (a token
    // of the sample: at most a window's forward; one token a step through tiny matrices runs far below peak speed).
    double reserve(int64_t available, int sample_tokens) const {
        return double(final_windows(available) + sample_tokens) * window() + 3 * std::max(save_s, 0.5);
    }
};

static volatile std::sig_atomic_t interrupted = 0;  // set by Ctrl-C (SIGINT) or SIGTERM; the training loop checks it
static void on_interrupt(int) { interrupted = 1; }

// The run. comm: this process's rank under MPI (build/train_mpi); null: one process, the single-rank train_step.
// Returns false when it was interrupted.
static bool run(int argc, char** argv, Communicator* comm) {
    const int R = comm ? comm->world_size() : 1;
    const bool lead = !comm || comm->rank() == 0;  // prints, evaluates and saves
    std::vector<std::string> words(argv + 1, argv + argc);
    Args a = parse(words);
    if (a.help) {
        if (lead) usage();
        return true;
    }
    RunInfo resumed;  // the run the checkpoint continues
    if (!a.resume.empty()) {
        read_checkpoint_config(a.resume, nullptr, nullptr, &resumed);
        std::vector<std::string> merged = resumed.all("arg");  // its flags, then this command line's on top
        std::string recorded;
        for (const std::string& w : merged) recorded += " " + w;
        merged.insert(merged.end(), words.begin(), words.end());
        a = parse(merged);
        if (a.out.empty()) a.out = std::filesystem::path(a.resume).parent_path().string();
        if (a.out.empty()) a.out = ".";
        if (lead)
            std::printf("resuming %s with its flags:%s\n", a.resume.c_str(), recorded.empty() ? " (none)" : recorded.c_str());
    }
    if (a.out.empty()) a.out = "runs/tiny";
    if (a.ep && !comm) fail("--ep: expert parallelism needs several processes: build/train_mpi (make mpi)");
    if (a.preset != "tiny" && a.preset != "small" && a.preset != "large")
        fail("--preset: unknown \"", a.preset, "\" (tiny, small or large)");
    Config cfg = a.preset == "small" ? Config::small() : (a.preset == "large" ? Config::large() : Config::tiny());
    if (a.bias_speed >= 0) cfg.bias_update_speed = a.bias_speed;
    if (a.fp8) cfg.fp8_training = true;
    if (a.mtp_depth >= 0) cfg.n_mtp_depth = a.mtp_depth;
    if (a.seq > cfg.max_seq_len) fail("--seq ", a.seq, " exceeds the preset's max_seq_len ", cfg.max_seq_len);
    cfg.max_seq_len = a.seq;  // the model's context is what it is trained on (generation slides past it)
    if (a.attention_layer >= cfg.n_layers)
        fail("--attention-layer ", a.attention_layer, ": the model has layers 0 to ", cfg.n_layers - 1);
    if (a.attention_head >= cfg.n_heads)
        fail("--attention-head ", a.attention_head, ": the model has heads 0 to ", cfg.n_heads - 1);
    const Corpus corpus = load_corpus(a);
    const std::vector<int32_t>& train = corpus.train;
    const std::vector<int32_t>& val = corpus.val;
    const bool token_files = !corpus.tokenizer_path.empty();
    if (token_files) cfg.vocab_size = corpus.tokenizer.vocab_size();  // (bytes: the preset's 256)

    Model model(cfg, uint64_t(a.seed));
    AdamW opt;
    TrainingLog log;  // the whole run's history (a resumed run: the earlier steps, from the checkpoint's directory)
    const std::string log_path = a.out + "/train_log.txt";
    if (!a.resume.empty()) {
        load_checkpoint(a.resume, model, opt);  // on every rank (each machine needs the file)
        const std::string earlier = (std::filesystem::path(a.resume).parent_path() / "train_log.txt").string();
        if (lead && std::filesystem::exists(earlier)) {
            log = TrainingLog::load(earlier);
            log.keep_until(opt.step);  // steps after the checkpoint are done again
        }
        if (lead)
            std::printf("resumed at step %d of %d; %zu earlier steps in the log%s\n", opt.step, a.steps, log.steps.size(),
                        log.steps.size() == size_t(opt.step) ? "" : " (the plots miss the others)");
    }
    RunInfo info;  // recorded in every checkpoint this run saves
    for (const std::string& w : a.record) info.add("arg", w);
    info.add("data", corpus.source);
    if (!corpus.tokenizer_path.empty()) info.add("tokenizer", corpus.tokenizer_path);
    info.add("prompt", corpus.prompt);
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
    char per_token[64] = "";
    if (token_files) std::snprintf(per_token, sizeof per_token, " (%.2f bytes a token)", corpus.val_bytes_per_token);
    if (lead)
        std::printf("data: %s\n  %zu train / %zu validation %s%s | model %.2fM params (%.2fM activated per token, "
                    "%.2fM in MTP) | batch %d x %d | %d threads%s\n", corpus.source.c_str(), train.size(), val.size(),
                    token_files ? "tokens" : "bytes", per_token,
                    pc.total / 1e6, pc.activated / 1e6, pc.mtp / 1e6, a.batch, a.seq, thread_count(),
                    comm ? (" per rank, " + std::to_string(R) + " MPI ranks, " + (ep ? "DP x EP" : "DP")).c_str()
                         : "");
    if (lead && a.save) make_directories(a.out);
    if (lead && !backend::host_memory) std::printf("  backend: CUDA (model and optimizer in GPU memory)\n");
    FILE* loss_log = a.loss_log.empty() || !lead ? nullptr : std::fopen(a.loss_log.c_str(), "w");
    if (lead && !a.loss_log.empty() && !loss_log) fail("--loss-log ", a.loss_log, ": cannot open for writing");
    // The loss per byte beside the loss per token, so that byte and BPE runs compare (per character in ASCII text).
    auto loss_text = [&](double nats_per_token) {
        char buf[128];
        if (token_files) std::snprintf(buf, sizeof buf, "%.4f nats/token = %.4f nats/byte", nats_per_token,
                               nats_per_token / corpus.val_bytes_per_token);
        else std::snprintf(buf, sizeof buf, "%.4f nats/byte", nats_per_token);
        return std::string(buf);
    };
    // The history, then the checkpoint, each written atomically; --resume continues from here. (A crash between the
    // two leaves a log ahead of the checkpoint, which the resumed run cuts back to the checkpoint's step.)
    auto save_run = [&] {
        if (!a.save || !lead) return;
        log.save(log_path);
        save_checkpoint(a.out + "/checkpoint.bin", model, opt, info);
    };
    struct sigaction action = {};
    action.sa_handler = on_interrupt;
    action.sa_flags = SA_RESETHAND;  // a second Ctrl-C ends the program at once
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);

    double train_seconds = 0;  // the training steps alone, the first one (warm-up) excluded
    std::vector<int32_t> batch(size_t(a.batch) * (a.seq + 1));
    const double start = now_seconds();
    const int first_step = opt.step;
    const int64_t available_windows = int64_t((val.size() - 1) / size_t(a.seq));
    TimeBudget budget;
    budget.limit = a.time_limit;
    budget.batch = a.batch;
    Progress progress(a.steps);
    progress.first_step = first_step;
    bool stopped = false;  // by Ctrl-C
    ThreadTuner threads;   // a shared CPU may train faster on fewer threads (the header, section 7.5)
    for (int step = opt.step; step < a.steps; ++step) {
        threads.tick();
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
        const int done = step + 1 - first_step;
        const double step_seconds = now_seconds() - step_start;
        if (step > first_step) train_seconds += step_seconds;
        budget.step_s = done > 1 ? train_seconds / (done - 1) : step_seconds;
        const double mtp = r.loss.mtp.empty() ? 0.0 : r.loss.mtp[0];
        if (loss_log) std::fprintf(loss_log, "%d %.9g %.9g %.9g\n", step + 1, r.loss.main, mtp, r.grad_norm);
        log.steps.push_back({step + 1, r.loss.main, mtp, r.grad_norm, lr, r.max_violation});
        if (lead)
            progress.update(step + 1, r.loss.main, int64_t(done) * a.batch * a.seq,
                            {{"mtp", mtp}, {"maxvio", r.max_violation}, {"lr", lr}, {"gnorm", r.grad_norm}});
        const double elapsed = now_seconds() - start;
        const bool out_of_time = a.time_limit > 0 && step + 1 < a.steps &&
                                 elapsed + budget.step_s + budget.reserve(available_windows, a.sample) > a.time_limit;
        int64_t stop[2] = {out_of_time, interrupted};
        if (comm) all_reduce(*comm, stop, 2);  // the ranks' clocks differ, and a signal may reach one: all stop
        stopped = stop[1] > 0;
        const bool last = step + 1 == a.steps || stop[0] > 0 || stopped;
        // The periodic evaluations, also at the step Ctrl-C stopped (the resumed run's log lacks none); the final one
        // when the run ends.
        const bool periodic = (step + 1) % a.eval_every == 0, final = last && !stopped;
        if (ep && (periodic || last)) {  // rank 0 evaluates (and saves) the whole model, alone
            gather_experts(*comm, model, opt, *ep);
            model.expert_runner = nullptr;
        }
        if (lead && (periodic || final)) {
            const int64_t windows = final ? budget.final_windows(available_windows)
                                          : std::min<int64_t>(a.eval_windows, available_windows);
            const double eval_start = now_seconds();
            TrainingLog::Eval e{step + 1, 0, 0, windows, {}};
            e.loss = evaluate(model, val, a.seq, int(windows), a.batch, &e.loads);
            budget.window_s = (now_seconds() - eval_start) / double(windows);
            for (const auto& l : e.loads) e.max_violation = std::max(e.max_violation, max_violation(l));
            log.evals.push_back(e);
            progress.break_line();
            const std::string part =
                windows == available_windows ? "whole validation split"
                : final ? std::to_string(windows) + " of " + std::to_string(available_windows) + " windows: --time-limit"
                        : "subset";
            std::printf("eval step %d: val loss %s (%s) | MaxVio_global %.3f | %.0fs\n", step + 1,
                        loss_text(e.loss).c_str(), part.c_str(), e.max_violation, now_seconds() - start);
            std::fflush(stdout);
            if (!last) {  // (the last step saves below)
                const double save_start = now_seconds();
                save_run();
                budget.save_s = now_seconds() - save_start;
            }
        }
        if (last) {
            progress.break_line();
            if (done > 1 && lead)
                std::printf("training: %.0f tokens/s over steps %d-%d (%.3f s per step)%s\n",
                            double(done - 1) * a.batch * a.seq / train_seconds, first_step + 2, step + 1,
                            train_seconds / (done - 1), stop[0] > 0 ? ", stopped by --time-limit" : "");
            if (a.profile && done > 1 && lead)
                std::printf("profile of steps %d-%d (%s%s):\n%s", first_step + 2, step + 1,
                            backend::host_memory ? "CPU" : "GPU, synchronised at every scope", comm ? ", rank 0" : "",
                            profile().table(done - 1).c_str());
            if (ep && lead)
                std::printf("expert parallel, rank 0: %.2f MB per step sent to other ranks (dispatch and combine, forward "
                            "and backward) in %.1f ms per step of all-to-alls\n", double(ep->stats.bytes_moved) / 1e6 / done,
                            ep->stats.seconds_moving * 1e3 / done);
            if (!a.save || !lead) break;
            save_run();
            if (stopped) {
                write_plots(model, a, corpus, log);
                std::printf("interrupted after step %d of %d: saved %s/checkpoint.bin, %s and the plots; continue with\n"
                            "  %s %s/checkpoint.bin\n", step + 1, a.steps, a.out.c_str(), log_path.c_str(), kResume,
                            a.out.c_str());
                break;
            }
            save_hf(a.out + "/hf", model);  // config.json + model.safetensors: transformers loads it
            write_plots(model, a, corpus, log);
            std::printf("saved %s/checkpoint.bin, %s, the Hugging Face directory %s/hf and %s/{loss,expert_load,attention}.png\n",
                        a.out.c_str(), log_path.c_str(), a.out.c_str(), a.out.c_str());
            break;
        }
    }
    if (loss_log) std::fclose(loss_log);
    if (a.sample > 0 && lead && !stopped)
        std::printf("\nsample:\n%s\n", sample_text(model, corpus, a.sample, uint64_t(a.seed)).c_str());
    if (lead && a.time_limit > 0)
        std::printf("time: %.1f s of the --time-limit %.0f s\n", now_seconds() - start, a.time_limit);
    return !stopped;
}

int main(int argc, char** argv) {
    prefer_sleeping_threads(argv);  // a shared CPU: OpenMP threads that wait sleep (the header, section 2)
#ifdef DSV3_MPI
    run_mpi(argc, argv, [&](Communicator& comm) { run(argc, argv, &comm); });  // an error: printed, then MPI_Abort
    return 0;
#else
    try {
        return run(argc, argv, nullptr) ? 0 : 130;  // 130 = 128 + SIGINT: the shell's status of an interrupted program
    } catch (const std::exception& e) {
        std::fprintf(stderr, "train: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "train: error: unknown exception\n");
        return 1;
    }
#endif
}
