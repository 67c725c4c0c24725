// plots_demo: draws the three kinds of plots of deepseek_v3.hpp from synthetic numbers, to see what they look like.
//   build/plots_demo [--out DIR]   writes loss.png, loss_log.png, expert_load{,_time,_small}.png, attention.png
#include "../deepseek_v3.hpp"

#include <cmath>
#include <cstdio>

static void usage() {
    std::printf(
        "usage: plots_demo [options]\n"
        "Draws the header's three kinds of plots (loss curves, expert load, attention) from synthetic numbers.\n"
        "  --out DIR             where the PNGs go (default .)\n"
        "  --help, -h            this text\n");
}

int main(int argc, char** argv) {
    try {
        std::string dir = ".";
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) dsv3::fail(k, ": expected a value");
                return argv[++i];
            };
            if (k == "--out") dir = value();
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else dsv3::fail("unknown option \"", k, "\" (see plots_demo --help)");
        }
        dsv3::Rng rng(1);

        // (a) Loss curves: a noisy training loss every step, a validation loss every 250 steps.
        dsv3::PlotSeries train{"train", {}, {}}, val{"validation", {}, {}};
        for (int step = 1; step <= 5000; ++step) {
            const double loss = 1.2 + 3.3 * std::exp(-step / 700.0) + 0.15 * std::exp(-step / 4000.0);
            train.x.push_back(step);
            train.y.push_back(loss + 0.05 * rng.normal());
            if (step % 250 == 0) val.x.push_back(step), val.y.push_back(loss + 0.08 + 0.00002 * step);
        }
        dsv3::plot_lines(dir + "/loss.png", "Tiny Shakespeare, tiny model", "step", "loss (nats/token)", {train, val});
        dsv3::PlotSeries bound{"best possible", {0, 5000}, {0.72, 0.72}};
        dsv3::plot_lines(dir + "/loss_log.png", "Synthetic corpus (log y)", "step", "loss (nats/byte)",
                         {train, val, bound}, true);

        // (b) Expert load: fraction of tokens routed to each of 64 experts, 4 layers (imbalanced at first).
        const int layers = 4, experts = 64;
        std::vector<float> load(size_t(layers) * experts);
        std::vector<std::string> row_labels;
        for (int l = 0; l < layers; ++l) {
            row_labels.push_back("layer " + std::to_string(l + 1));
            double sum = 0;
            for (int e = 0; e < experts; ++e) sum += load[size_t(l * experts + e)] = float(std::exp(0.6 * rng.normal()));
            for (int e = 0; e < experts; ++e) load[size_t(l * experts + e)] = float(load[size_t(l * experts + e)] / sum * experts);
        }
        dsv3::HeatmapOptions opt;
        opt.colorbar_label = "load / mean load";
        dsv3::plot_heatmap(dir + "/expert_load.png", "Expert load per layer", load, layers, experts, row_labels, {},
                           "expert", "layer", opt);

        // Load over training: rows = time (every 250 steps), 16 experts of one layer, balancing as the bias adapts.
        const int snapshots = 40, n_exp = 16;
        std::vector<float> over_time(size_t(snapshots) * n_exp);
        std::vector<std::string> times;
        for (int t = 0; t < snapshots; ++t) {
            times.push_back("step " + std::to_string((t + 1) * 250));
            for (int e = 0; e < n_exp; ++e)
                over_time[size_t(t * n_exp + e)] = float(1.0 + (e % 5 == 0 ? 2.5 : -0.4) * std::exp(-t / 8.0) + 0.1 * rng.normal());
        }
        dsv3::plot_heatmap(dir + "/expert_load_time.png", "Layer 2 expert load during training", over_time, snapshots,
                           n_exp, times, {}, "expert", "training step", opt);

        // A small matrix with numbers in the cells (8 experts x 3 layers).
        std::vector<float> small(24);
        for (auto& v : small) v = float(0.125 * std::exp(0.3 * rng.normal()));
        dsv3::plot_heatmap(dir + "/expert_load_small.png", "Routing fractions", small, 3, 8, {"L1", "L2", "L3"}, {},
                           "expert", "layer");

        // (c) Attention map of a prompt: each query attends mostly to itself, the previous character and the
        // start of the current word.
        const std::string prompt = "ROMEO:\nBut soft, what light";
        const int T = int(prompt.size());
        std::vector<float> att(size_t(T) * T, 0.0f);
        std::vector<std::string> tokens;
        for (int i = 0; i < T; ++i) {
            tokens.push_back(std::string(1, prompt[size_t(i)]));
            int word_start = i;
            while (word_start > 0 && prompt[size_t(word_start - 1)] != ' ' && prompt[size_t(word_start - 1)] != '\n') --word_start;
            double sum = 0;
            std::vector<double> s(size_t(i) + 1);
            for (int j = 0; j <= i; ++j) {
                s[size_t(j)] = 0.05 + (j == i) * 1.0 + (j == i - 1) * 0.6 + (j == word_start) * 0.8 + (j == 0) * 0.5;
                sum += s[size_t(j)];
            }
            for (int j = 0; j <= i; ++j) att[size_t(i) * T + size_t(j)] = float(s[size_t(j)] / sum);
        }
        dsv3::plot_attention(dir + "/attention.png", "Layer 1, head 3", att, tokens);
        std::printf("wrote %s/{loss,loss_log,expert_load,expert_load_time,expert_load_small,attention}.png\n",
                    dir.c_str());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "plots_demo: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "plots_demo: error: unknown exception\n");
        return 1;
    }
    return 0;
}
