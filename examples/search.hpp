// examples/search.hpp — the pieces of build/search (examples/search.cpp) that its tests check (tests/test_search.cpp):
// the search space, the FLOPs budget, the time plan and the Pareto front.
//
// The space, in the spirit of Syno and Canvas (search fine-grained choices, score each candidate on both accuracy and
// measured speed), over the choices DeepSeekMoE and MLA make: around the tiny model (d 128, 4 layers), the routed
// experts keep their total size (8 × 64 = 512 channels of width) and are cut into finer pieces by a segmentation
// factor m (DeepSeekMoE §3.1: m× as many experts, each 1/m as wide, m× as many chosen); 0 to 2 shared experts of the
// same width (§3.2); the top-k then follows from the activated width, which is held at the tiny model's (2 routed
// + 1 shared of width 64 = 192), so that every candidate does about the same FLOPs per token; expert groups and
// limited groups (V3 §2.1.2); the MLA ranks (query and KV latents, the decoupled RoPE dimension, V3 §2.1.1); and the
// MTP depth (V3 §2.2). A candidate counts when its training FLOPs per token (the header's counter) lie within
// kFlopsTolerance of the tiny model's.
#pragma once
#include <algorithm>
#include <string>
#include <vector>

#include "../deepseek_v3.hpp"

namespace search {
using namespace dsv3;

constexpr int kRoutedChannels = 512;    // routed experts' total width, n_routed_experts × moe_inter_dim
constexpr int kActivatedWidth = 192;    // (top-k + shared) × moe_inter_dim, as in Config::tiny()
constexpr double kFlopsTolerance = 0.10;

// One point of the space, and the Config it stands for.
struct Choice {
    int m = 2, shared = 1, groups = 4, limited = 2, q_lora = 64, kv_lora = 32, rope = 16, mtp = 1;
    std::string name() const {
        return "m" + std::to_string(m) + " s" + std::to_string(shared) + " g" + std::to_string(groups) + "/" +
               std::to_string(limited) + " q" + std::to_string(q_lora) + " kv" + std::to_string(kv_lora) + " r" +
               std::to_string(rope) + " mtp" + std::to_string(mtp);
    }
};
inline Config config_of(const Choice& ch) {
    Config c = Config::tiny();
    c.moe_inter_dim = 128 / ch.m;
    c.n_routed_experts = kRoutedChannels / c.moe_inter_dim;
    c.n_shared_experts = ch.shared;
    c.n_activated_experts = kActivatedWidth / c.moe_inter_dim - ch.shared;
    c.n_expert_groups = ch.groups;
    c.n_limited_groups = ch.limited;
    c.q_lora_rank = ch.q_lora;
    c.kv_lora_rank = ch.kv_lora;
    c.qk_rope_head_dim = ch.rope;
    c.n_mtp_depth = ch.mtp;
    return c;
}
// GShard-style routing at the same activated FLOPs: top-2 of 16 equal experts, each as wide as 2 fine ones would
// need to be (192 / 2 = 96), no shared expert (DeepSeekMoE §4's comparison); everything else as in `like`, so that
// only the MoE layer differs.
inline Config gshard_config(const Config& like = Config::tiny()) {
    Config c = like;
    c.moe_inter_dim = kActivatedWidth / 2;
    c.n_routed_experts = 16;
    c.n_shared_experts = 0;
    c.n_activated_experts = 2;
    c.n_expert_groups = 1;
    c.n_limited_groups = 1;
    return c;
}

inline double flops_per_token(const Config& c, int T) { return training_flops_per_token(c, T); }
// Within the FLOPs budget, and a model the header accepts (top-k ≥ 1 and no more than the experts of the allowed
// groups, groups dividing the experts)?
inline bool admissible(const Config& c, int T) {
    if (c.n_activated_experts < 1 || c.n_routed_experts % c.n_expert_groups) return false;
    if (c.n_activated_experts > c.n_limited_groups * (c.n_routed_experts / c.n_expert_groups)) return false;
    try {
        c.validate();
    } catch (const Error&) {
        return false;
    }
    const double f0 = flops_per_token(Config::tiny(), T);
    return std::abs(flops_per_token(c, T) - f0) <= kFlopsTolerance * f0;
}
// n distinct admissible choices drawn at random (fixed seed: the same list every run).
inline std::vector<Choice> sample(int n, int T, uint64_t seed) {
    Rng rng(seed);
    auto pick = [&](std::initializer_list<int> v) { return *(v.begin() + rng.below(v.size())); };
    std::vector<Choice> out;
    std::vector<std::string> seen;
    for (int tries = 0; int(out.size()) < n && tries < 100000; ++tries) {
        Choice ch;
        ch.m = pick({2, 4, 8});   // m = 1 (4 experts of 128) cannot hold the activated width: GShard's baseline
        ch.shared = pick({0, 1, 2});
        ch.groups = pick({1, 2, 4});
        ch.limited = 1 + int(rng.below(uint64_t(ch.groups)));
        ch.q_lora = pick({32, 64, 96});
        ch.kv_lora = pick({16, 32, 64});
        ch.rope = pick({8, 16, 32});
        ch.mtp = pick({0, 1});
        if (!admissible(config_of(ch), T) || std::count(seen.begin(), seen.end(), ch.name())) continue;
        seen.push_back(ch.name());
        out.push_back(ch);
    }
    return out;
}

// The time plan: successive halving over n candidates (all train for the first round's time; the better half by
// validation loss goes on for another round, and so on down to one), then the final comparison. The search gets
// 70% of the budget, split evenly over its rounds; the final comparison the rest.
struct Round { int candidates = 0; double seconds_each = 0; };
struct Plan {
    std::vector<Round> rounds;
    double final_seconds = 0;   // for the two models of the DeepSeekMoE check together
    double total() const {
        double s = final_seconds;
        for (const Round& r : rounds) s += r.candidates * r.seconds_each;
        return s;
    }
};
inline Plan plan(double budget_seconds, int n) {
    Plan p;
    std::vector<int> sizes;
    for (int k = n; k >= 1; k = k > 1 ? (k + 1) / 2 : 0) {
        sizes.push_back(k);
        if (k == 1) break;
    }
    const double per_round = 0.7 * budget_seconds / double(sizes.size());
    for (int k : sizes) p.rounds.push_back({k, per_round / k});
    p.final_seconds = 0.3 * budget_seconds;
    return p;
}

// Indices of the points not dominated by another (higher speed AND lower loss, one of them strictly), by speed.
inline std::vector<size_t> pareto_front(const std::vector<double>& speed, const std::vector<double>& loss) {
    std::vector<size_t> front;
    for (size_t i = 0; i < speed.size(); ++i) {
        bool dominated = false;
        for (size_t j = 0; j < speed.size() && !dominated; ++j)
            dominated = j != i && speed[j] >= speed[i] && loss[j] <= loss[i] &&
                        (speed[j] > speed[i] || loss[j] < loss[i]);
        if (!dominated) front.push_back(i);
    }
    std::sort(front.begin(), front.end(), [&](size_t a, size_t b) { return speed[a] < speed[b]; });
    return front;
}

}  // namespace search
