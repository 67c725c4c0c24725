// deepseek_v3.hpp — DeepSeek-V3 in one header: read it, run it, change it.
//
// The whole DeepSeek-V3 architecture (arXiv 2412.19437, "V3" below) on the CPU, in plain C++17 with OpenMP:
// Multi-head Latent Attention with decoupled RoPE and YaRN, DeepSeekMoE with shared and fine-grained routed experts,
// auxiliary-loss-free load balancing, Multi-Token Prediction, V3's FP8 recipe simulated bit for bit, training with
// AdamW, inference with the latent KV cache and MTP speculative decoding, data and expert parallelism over ranks, and
// Hugging Face checkpoints. Every kernel has its forward and backward side by side, with the equation it implements.
//
// USAGE
//     #include "deepseek_v3.hpp"          // link nothing but OpenMP (-fopenmp); needs the stb headers (libstb-dev)
//     dsv3::Config cfg = dsv3::Config::tiny();
//     dsv3::Model model(cfg, /*seed=*/1);
//     dsv3::AdamW opt;
//     dsv3::StepResult r = dsv3::train_step(model, opt, tokens, B, T, lr, dsv3::LossOptions{});  // tokens: [B, T+1]
//     std::vector<int32_t> out = dsv3::generate(model, prompt, 100, dsv3::SamplingOptions{}, seed, /*use_mtp=*/true);
// The programs in examples/ show whole runs: train, generate, balance, fp8_error, fp8_train, params, bench, ...
//
// TABLE OF CONTENTS (paper sections in brackets)
// START HERE. Part 1 is the model, and a learner reads it from top to bottom, in an evening. Part 2 is the systems
// of the report. Part 3 is machinery a learner may skip: it is called through the declarations at the top of
// section 3, which say what each piece does.
//
// PART 1, THE MODEL
//    1. Config and counters .................. Error, architecture, presets, validate(), counters [V3 §2, Table 1]
//    2. Foundations .......................... RNG, fixed-order parallel loops, the --profile of a step, arena
//    3. Kernels .............................. forward/backward pairs after a reference matmul: matmul, RMSNorm,
//                                              RoPE+YaRN [V3 §2.1.1], attention, SwiGLU, embedding, cross-entropy, the
//                                              MoE router and balance losses [V3 §2.1.2], MoE permutation, grouped
//                                              expert GEMMs, AdamW, the model's plumbing, the backend (or cuda/'s)
//    4. Parameters ........................... one flat buffer, named views with Hugging Face names
//    5. Modules .............................. 5.1 MLA [V3 §2.1.1, eqs. 1-11], 5.2 FFN, 5.3 DeepSeekMoE [eqs. 12-16],
//                                              5.4 block, 5.5 MTP module [V3 §2.2, eqs. 21-25], 5.6 the model
//    6. Training ............................. LR schedules, AdamW, clipping, loss-free balancing, one step [V3 §4.2]
//    7. Inference ............................ KV cache, absorption, sampling, MTP speculation, threads [§2.1.1, 5.4.3]
// PART 2, THE SYSTEMS OF THE REPORT
//    8. FP8 numerics and the FP8 recipe ...... E4M3/E5M2, BF16, tile scaling, Hopper's accumulator, FP8 linears [§3.3],
//                                              LogFMT for communication [Insights into DeepSeek-V3 §3.2]
//    9. Parallelism .......................... thread or MPI ranks, ring all-reduce, all-to-all, DP and EP [V3 §3.2],
//                                              gradient buckets overlapped with the backward, the FP8 dispatch [§3.3.3]
// PART 3, APPENDIX (machinery; skip on a first reading)
//   10. The fast packed GEMM ................. what matmul_forward/backward of section 3.1 run on
//   11. Files and data ....................... parse_int/parse_float, memory budget, sleeping threads, atomic files,
//                                              byte-level BPE tokenizer, datasets, FIM, synthetic corpus
//   12. Pictures and progress ................ PNG plots, the progress line
//   13. Checkpoint I/O ....................... training checkpoint, JSON, safetensors, config.json, HF dirs, .npy
//
// CONVENTIONS
//   - Row-major tensors; shapes are written next to them: `x: [T, dim]` means T rows of dim floats.
//   - Linear weights are [out, in] as in PyTorch and the checkpoints: y = x Wᵀ.
//   - Backward functions ACCUMULATE (+=) into gradients, so a tensor used twice simply receives both.
//   - Determinism: no floating-point atomics; every parallel loop writes disjoint outputs and every reduction
//     runs in a fixed order, so results are bitwise identical for any OMP_NUM_THREADS.
#pragma once
#define DSV3_HEADER_INCLUDED

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cfloat>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <unistd.h>

// stb (libstb-dev) draws section 12's PNG plots, compiled in as static functions; a program using stb itself includes
// it before this header, or defines DSV3_STB_IMAGE_WRITE_EXTERN and compiles it in one of its own files.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wconversion"
#endif
#ifndef INCLUDE_STB_IMAGE_WRITE_H  // not included yet by this translation unit
#if !defined(DSV3_STB_IMAGE_WRITE_EXTERN) && !defined(STB_IMAGE_WRITE_IMPLEMENTATION)
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define DSV3_STB_IMAGE_WRITE_DEFINED_HERE
#endif
#include <stb/stb_image_write.h>
#ifdef DSV3_STB_IMAGE_WRITE_DEFINED_HERE  // the implementation part of stb_image_write.h has no include guard
#undef STB_IMAGE_WRITE_STATIC
#undef STB_IMAGE_WRITE_IMPLEMENTATION
#undef DSV3_STB_IMAGE_WRITE_DEFINED_HERE
#endif
#endif
#include <stb/stb_easy_font.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace dsv3 {

// #####################################################################################################################
// PART 1, THE MODEL: everything a learner needs to follow DeepSeek-V3 from a token to its loss and back.
// #####################################################################################################################
// =====================================================================================================================
// 1. CONFIG AND COUNTERS
// =====================================================================================================================
// Every error the library raises is a dsv3::Error whose message names the file, tensor or field, what was expected
// and what was found; the examples catch it, print it and exit non-zero.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// fail("tensor ", name, ": expected ", a, " bytes, found ", b) throws Error with the parts concatenated.
template <class... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
    std::ostringstream message;
    (message << ... << parts);
    throw Error(message.str());
}

inline std::string escape_bytes(std::string_view s);  // section 11.1: bytes shown safely in a message

// Every flag and number field of a file is read by these: the whole text, in a range, errors naming it (11.1).
inline long long parse_int(std::string_view text, std::string_view what, long long lo, long long hi);
inline double parse_float(std::string_view text, std::string_view what, double lo, double hi);

// The architecture. Field names follow DeepSeek's inference/model.py (ModelArgs), with config.json's where it differs.
struct Config {
    // --- sizes ---
    int vocab_size = 256;
    int dim = 128;                   // hidden_size: the model width d
    int inter_dim = 384;             // intermediate_size: width of the dense SwiGLU FFN
    int moe_inter_dim = 64;          // moe_intermediate_size: width of ONE expert (fine-grained: small)
    int n_layers = 4;                // num_hidden_layers
    int n_dense_layers = 1;          // first_k_dense_replace: the first blocks use a dense FFN, the rest MoE
    int n_heads = 4;                 // num_attention_heads
    // --- DeepSeekMoE [V3 §2.1.2] ---
    int n_routed_experts = 8;        // N_r
    int n_shared_experts = 1;        // N_s: always active, fused into one SwiGLU of width N_s * moe_inter_dim
    int n_activated_experts = 2;     // num_experts_per_tok: K_r, the routed top-k
    int n_expert_groups = 4;         // n_group: experts are split into groups (nodes, in V3's deployment)
    int n_limited_groups = 2;        // topk_group: a token may only use experts of this many groups
    std::string score_func = "sigmoid";  // scoring_func: V3 "sigmoid"; V2 "softmax"
    float route_scale = 1.0f;        // routed_scaling_factor: multiplies the routed experts' sum
    bool norm_topk_prob = true;      // normalise the chosen gates to sum 1 (V3 eq. 13)
    // --- Multi-head Latent Attention [V3 §2.1.1] ---
    int q_lora_rank = 64;            // d_c': query compression (0 = a direct query projection, as in V2-Lite)
    int kv_lora_rank = 32;           // d_c: the compressed KV latent, the only thing cached besides k_rope
    int qk_nope_head_dim = 32;       // d_h: per-head query/key part without position
    int qk_rope_head_dim = 16;       // d_h^R: per-head decoupled RoPE part (the key part is shared by all heads)
    int v_head_dim = 32;             // value head dim
    // --- RoPE and YaRN ---
    float rope_theta = 10000.0f;     // RoPE base
    int original_seq_len = 4096;     // rope_scaling.original_max_position_embeddings
    float rope_factor = 1.0f;        // rope_scaling.factor: YaRN's s; YaRN is active when > 1 (as in HF)
    float beta_fast = 32.0f, beta_slow = 1.0f;  // YaRN's ramp bounds (in rotations over the original length)
    float mscale = 1.0f;             // rope_scaling.mscale_all_dim: attention-scale coefficient under YaRN
    int max_seq_len = 256;           // max_position_embeddings: the longest sequence this model will see
    float rms_norm_eps = 1e-6f;
    // --- Multi-Token Prediction [V3 §2.2] ---
    int n_mtp_depth = 1;             // num_nextn_predict_layers: D
    // --- training-time constants that belong to the architecture ---
    float init_std = 0.006f;         // V3 §4.2: weights ~ N(0, 0.006²)
    float bias_update_speed = 0.001f;// γ of auxiliary-loss-free balancing [V3 §2.1.2]
    float balance_loss_alpha = 0.0001f;  // α of the sequence-wise balance loss [V3 eq. 17]
    bool fp8_training = false;       // V3's FP8 recipe [§3.3]: linear GEMMs in simulated FP8, AdamW moments in BF16

    int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
    bool is_moe_layer(int layer) const { return layer >= n_dense_layers && n_routed_experts > 0; }
    bool yarn_active() const { return rope_factor > 1.0f; }

    // Presets. `tiny` has every structural feature (query LoRA, a dense layer, shared + grouped routed experts, MTP)
    // at a size that trains in minutes on two cores.
    static Config tiny() { return Config{}; }
    static Config small();    // about 100M parameters, for a GPU
    static Config large();    // about 1.66B parameters (d 1024, 16 layers, 64 experts), for one large GPU
    static Config v2_lite();  // the official 16B config (DeepSeek-V2-Lite shape)
    static Config v3_671b();  // DeepSeek-V3 itself

    void validate() const;

    // visit(f) calls f(name, field) for every field: one list for printing, saving, loading and comparing configs.
    template <class F>
    void visit(F&& f) {
        f("vocab_size", vocab_size); f("dim", dim); f("inter_dim", inter_dim); f("moe_inter_dim", moe_inter_dim);
        f("n_layers", n_layers); f("n_dense_layers", n_dense_layers); f("n_heads", n_heads);
        f("n_routed_experts", n_routed_experts); f("n_shared_experts", n_shared_experts);
        f("n_activated_experts", n_activated_experts); f("n_expert_groups", n_expert_groups);
        f("n_limited_groups", n_limited_groups); f("score_func", score_func); f("route_scale", route_scale);
        f("norm_topk_prob", norm_topk_prob); f("q_lora_rank", q_lora_rank); f("kv_lora_rank", kv_lora_rank);
        f("qk_nope_head_dim", qk_nope_head_dim); f("qk_rope_head_dim", qk_rope_head_dim);
        f("v_head_dim", v_head_dim); f("rope_theta", rope_theta); f("original_seq_len", original_seq_len);
        f("rope_factor", rope_factor); f("beta_fast", beta_fast); f("beta_slow", beta_slow); f("mscale", mscale);
        f("max_seq_len", max_seq_len); f("rms_norm_eps", rms_norm_eps); f("n_mtp_depth", n_mtp_depth);
        f("init_std", init_std); f("bias_update_speed", bias_update_speed);
        f("balance_loss_alpha", balance_loss_alpha); f("fp8_training", fp8_training);
    }
    template <class F>
    void visit(F&& f) const { const_cast<Config*>(this)->visit([&](const char* n, const auto& v) { f(n, v); }); }
    // "name=value" lines; floats printed exactly (hexfloat-free: 9 significant digits round-trip a float).
    std::string to_text() const {
        std::ostringstream out;
        out.precision(9);
        visit([&](const char* name, const auto& v) { out << name << '=' << v << '\n'; });
        return out.str();
    }
    void set(const std::string& name, const std::string& value, const std::string& where) {  // where: for errors
        bool found = false;
        visit([&](const char* field, auto& v) {
            if (name != field) return;
            found = true;
            using T = std::decay_t<decltype(v)>;
            const std::string what = where + ": field " + name;  // a bad value throws and leaves the field as it was
            if constexpr (std::is_same_v<T, bool>) {
                if (value != "1" && value != "true" && value != "0" && value != "false")
                    fail(what, ": expected 1, 0, true or false, got '", escape_bytes(value), "'");
                v = value == "1" || value == "true";
            } else if constexpr (std::is_same_v<T, int>) {
                v = int(parse_int(value, what, INT_MIN, INT_MAX));
            } else if constexpr (std::is_same_v<T, float>) {
                v = float(parse_float(value, what, -FLT_MAX, FLT_MAX));
            } else {  // a string: one word, as to_text writes it
                if (value.empty() || value.find_first_of(" \t\r\n") != std::string::npos)
                    fail(what, ": expected one word, got '", escape_bytes(value), "'");
                v = value;
            }
        });
        if (!found) fail(where, ": unknown config field \"", name, "\"");
    }
};

inline Config Config::small() {
    Config c;
    c.vocab_size = 8192; c.dim = 512; c.inter_dim = 1536; c.moe_inter_dim = 256;
    c.n_layers = 8; c.n_dense_layers = 1; c.n_heads = 8;
    c.n_routed_experts = 32; c.n_shared_experts = 1; c.n_activated_experts = 4;
    c.n_expert_groups = 4; c.n_limited_groups = 2;
    c.q_lora_rank = 192; c.kv_lora_rank = 128; c.qk_nope_head_dim = 64; c.qk_rope_head_dim = 32; c.v_head_dim = 64;
    c.max_seq_len = 1024; c.init_std = 0.02f;
    return c;
}

// The shape of the `--preset large` of torchtitan's DeepSeek-V3 peer: a ~1.66B-total model where the GEMMs dominate.
inline Config Config::large() {
    Config c;
    c.vocab_size = 32768; c.dim = 1024; c.inter_dim = 4096; c.moe_inter_dim = 512;
    c.n_layers = 16; c.n_dense_layers = 1; c.n_heads = 16;
    c.n_routed_experts = 64; c.n_shared_experts = 1; c.n_activated_experts = 6;
    c.n_expert_groups = 8; c.n_limited_groups = 4;
    c.q_lora_rank = 384; c.kv_lora_rank = 256; c.qk_nope_head_dim = 64; c.qk_rope_head_dim = 32; c.v_head_dim = 64;
    c.max_seq_len = 1024; c.init_std = 0.02f;
    return c;
}

inline Config Config::v2_lite() {  // inference/configs/config_16B.json
    Config c;
    c.vocab_size = 102400; c.dim = 2048; c.inter_dim = 10944; c.moe_inter_dim = 1408;
    c.n_layers = 27; c.n_dense_layers = 1; c.n_heads = 16;
    c.n_routed_experts = 64; c.n_shared_experts = 2; c.n_activated_experts = 6;
    c.n_expert_groups = 1; c.n_limited_groups = 1; c.score_func = "softmax"; c.route_scale = 1.0f;
    c.norm_topk_prob = false;
    c.q_lora_rank = 0; c.kv_lora_rank = 512; c.qk_nope_head_dim = 128; c.qk_rope_head_dim = 64; c.v_head_dim = 128;
    c.rope_factor = 40; c.mscale = 0.707f; c.max_seq_len = 16384; c.n_mtp_depth = 0;
    return c;
}

inline Config Config::v3_671b() {  // inference/configs/config_671B.json
    Config c;
    c.vocab_size = 129280; c.dim = 7168; c.inter_dim = 18432; c.moe_inter_dim = 2048;
    c.n_layers = 61; c.n_dense_layers = 3; c.n_heads = 128;
    c.n_routed_experts = 256; c.n_shared_experts = 1; c.n_activated_experts = 8;
    c.n_expert_groups = 8; c.n_limited_groups = 4; c.route_scale = 2.5f;
    c.q_lora_rank = 1536; c.kv_lora_rank = 512; c.qk_nope_head_dim = 128; c.qk_rope_head_dim = 64; c.v_head_dim = 128;
    c.rope_factor = 40; c.mscale = 1.0f; c.max_seq_len = 163840; c.n_mtp_depth = 1;
    return c;
}

// validate(): every rule the rest of the code relies on, each failure naming the field and the rule.
inline void Config::validate() const {
    auto positive = [](const char* name, int64_t v) { if (v <= 0) fail("Config.", name, ": must be > 0, found ", v); };
    positive("vocab_size", vocab_size); positive("dim", dim); positive("n_layers", n_layers);
    positive("n_heads", n_heads); positive("kv_lora_rank", kv_lora_rank);
    positive("qk_nope_head_dim", qk_nope_head_dim); positive("qk_rope_head_dim", qk_rope_head_dim);
    positive("v_head_dim", v_head_dim); positive("max_seq_len", max_seq_len);
    // Upper bounds, far above every published DeepSeek model and small enough that every size product of the
    // parameter layout (in int: H·(d_h + d_v), n_shared·moe_inter_dim, 2·dim, ...) fits, whatever a file declares.
    auto at_most = [](const char* field, long long v, long long hi) {
        if (v > hi) fail("Config.", field, ": must be <= ", hi, ", found ", v);
    };
    at_most("vocab_size", vocab_size, 1 << 24); at_most("dim", dim, 1 << 16); at_most("inter_dim", inter_dim, 1 << 20);
    at_most("moe_inter_dim", moe_inter_dim, 1 << 20); at_most("n_layers", n_layers, 1 << 12);
    at_most("n_heads", n_heads, 1 << 12); at_most("q_lora_rank", q_lora_rank, 1 << 16);
    at_most("kv_lora_rank", kv_lora_rank, 1 << 16); at_most("qk_nope_head_dim", qk_nope_head_dim, 1 << 12);
    at_most("qk_rope_head_dim", qk_rope_head_dim, 1 << 12); at_most("v_head_dim", v_head_dim, 1 << 12);
    at_most("max_seq_len", max_seq_len, 1 << 22); at_most("n_routed_experts", n_routed_experts, 1 << 14);
    at_most("n_shared_experts", n_shared_experts, 1 << 10); at_most("n_mtp_depth", n_mtp_depth, 64);
    // Three layout entries per routed expert and block (V3: 61 x 256), listed before any check of memory: bounded.
    if (int64_t(n_layers + n_mtp_depth) * n_routed_experts > (1 << 17))
        fail("Config.n_routed_experts: (n_layers + n_mtp_depth) x n_routed_experts must be <= ", 1 << 17, ", found ",
             n_layers + n_mtp_depth, " x ", n_routed_experts);
    if (q_lora_rank < 0) fail("Config.q_lora_rank: must be >= 0 (0 = direct query projection), found ", q_lora_rank);
    if (qk_rope_head_dim % 2 != 0)
        fail("Config.qk_rope_head_dim: RoPE rotates pairs, so it must be even, found ", qk_rope_head_dim);
    if (n_dense_layers < 0 || n_dense_layers > n_layers)
        fail("Config.n_dense_layers: must be in [0, n_layers=", n_layers, "], found ", n_dense_layers);
    if (n_dense_layers > 0) positive("inter_dim", inter_dim);
    if (n_mtp_depth < 0) fail("Config.n_mtp_depth: must be >= 0, found ", n_mtp_depth);
    if (!(rms_norm_eps > 0)) fail("Config.rms_norm_eps: must be > 0, found ", rms_norm_eps);
    if (!(rope_theta > 1)) fail("Config.rope_theta: must be > 1, found ", rope_theta);
    if (!(rope_factor >= 1)) fail("Config.rope_factor: must be >= 1 (1 = no YaRN), found ", rope_factor);
    if (yarn_active()) {
        positive("original_seq_len", original_seq_len);
        if (!(beta_fast > beta_slow) || !(beta_slow > 0))
            fail("Config.beta_fast/beta_slow: YaRN needs beta_fast > beta_slow > 0, found ", beta_fast, " and ",
                 beta_slow);
    }
    if (!(init_std > 0)) fail("Config.init_std: must be > 0, found ", init_std);
    const bool has_moe = n_layers > n_dense_layers || n_mtp_depth > 0;
    if (!has_moe) return;
    positive("n_routed_experts", n_routed_experts); positive("moe_inter_dim", moe_inter_dim);
    positive("n_activated_experts", n_activated_experts); positive("n_expert_groups", n_expert_groups);
    if (n_shared_experts < 0) fail("Config.n_shared_experts: must be >= 0, found ", n_shared_experts);
    if (score_func != "sigmoid" && score_func != "softmax")
        fail("Config.score_func: must be \"sigmoid\" or \"softmax\", found \"", score_func, "\"");
    if (n_routed_experts % n_expert_groups != 0)
        fail("Config.n_routed_experts: must be divisible by n_expert_groups=", n_expert_groups, ", found ",
             n_routed_experts);
    if (n_limited_groups < 1 || n_limited_groups > n_expert_groups)
        fail("Config.n_limited_groups: must be in [1, n_expert_groups=", n_expert_groups, "], found ",
             n_limited_groups);
    const int reachable = n_limited_groups * (n_routed_experts / n_expert_groups);
    if (n_activated_experts > reachable)
        fail("Config.n_activated_experts: top-k must not exceed the experts the group limit allows (n_limited_groups "
             "* experts per group = ", reachable, "), found ", n_activated_experts);
    if (score_func == "sigmoid" && n_expert_groups > 1 && n_routed_experts / n_expert_groups < 2)
        fail("Config.n_expert_groups: a group's score is the sum of its top-2 experts, so groups need >= 2 experts, "
             "found ", n_routed_experts / n_expert_groups);
    if (!(route_scale > 0)) fail("Config.route_scale: must be > 0, found ", route_scale);
}

// --- counters -------------------------------------------------------------------------------------------------------
// Counted on the named shapes the model allocates (section 4's param_layout), so counters and model never disagree.
struct ParamCounts {
    int64_t total = 0;              // main model: embedding and head counted once each, MTP excluded
    int64_t activated = 0;          // per token: all but the routed experts a token does not use
    int64_t embedding = 0;          // the embedding table (a lookup, no FLOPs)
    int64_t mtp = 0;                // the MTP modules' own parameters
    int64_t mtp_in_checkpoint = 0;  // as stored by DeepSeek: MTP modules + their copies of embedding and head
};
inline ParamCounts count_parameters(const Config& cfg);

// KV cache per token, in bytes. MLA caches only the latent c_KV and the shared RoPE key [V3 eq. 1-5].
inline int64_t kv_cache_bytes_mla(const Config& c, int bytes_per_value = 2) {
    return int64_t(c.n_layers) * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_value;
}
// Standard multi-head attention of the same shape caches every head's key and value.
inline int64_t kv_cache_bytes_mha(const Config& c, int bytes_per_value = 2) {
    return int64_t(c.n_layers) * c.n_heads * (c.qk_head_dim() + c.v_head_dim) * bytes_per_value;
}
// Grouped-query attention (LLaMA, Qwen): n_kv_heads keys and values of head_dim each, per layer.
inline int64_t kv_cache_bytes_gqa(int n_layers, int n_kv_heads, int head_dim, int bytes_per_value = 2) {
    return int64_t(n_layers) * 2 * n_kv_heads * head_dim * bytes_per_value;
}

// Training FLOPs per token (Insights paper, Table 2): 6 per activated parameter doing a multiply-add (the embedding is
// a lookup), plus causal attention over T/2 keys on average: 6 * layers * heads * (d_h + d_h^R + d_v) * T/2.
inline double training_flops_per_token(const Config& c, int seq_len) {
    const ParamCounts n = count_parameters(c);
    return 6.0 * double(n.activated - n.embedding) +
           6.0 * c.n_layers * c.n_heads * double(c.qk_head_dim() + c.v_head_dim) * seq_len / 2.0;
}

// =====================================================================================================================
// 2. FOUNDATIONS
// =====================================================================================================================

// Deterministic random numbers: splitmix64 (Steele et al. 2014). Same seed, same stream, on every machine.
struct Rng {
    uint64_t state;
    explicit Rng(uint64_t seed = 0) : state(seed) {}
    uint64_t next_u64() {
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }          // [0, 1)
    uint64_t below(uint64_t n) { return n ? next_u64() % n : 0; }               // [0, n), tiny bias irrelevant here
    double normal() {                                                           // Box-Muller, one value per call
        double u1 = uniform(), u2 = uniform();
        if (u1 < 1e-300) u1 = 1e-300;
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
    // An independent stream for sub-task `stream` (e.g. one row): results never depend on thread scheduling.
    Rng fork(uint64_t stream) const { Rng r(state ^ (0xD1B54A32D192ED03ull * (stream + 1))); r.next_u64(); return r; }
};

// parallel_for(n, body): body(i) for i in [0, n), a fixed static partition over OpenMP threads (each i writes its own
// outputs). Loops under kParallelMinWork (n · work_per_item) stay on the calling thread: on a shared CPU a region
// waits for descheduled threads, and decoding a token runs hundreds of tiny loops.
constexpr int64_t kParallelMinWork = int64_t(1) << 15;
template <class Body>
inline void parallel_for(int64_t n, const Body& body, int64_t work_per_item = kParallelMinWork) {
#pragma omp parallel for schedule(static) if (n > 1 && n * work_per_item >= kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) body(i);
}

// parallel_sum(n, term): Σ_i term(i) in double, in fixed chunks of 256, then the chunk sums in order: any thread count.
template <class Term>
inline double parallel_sum(int64_t n, const Term& term) {
    const int64_t chunk = 256, n_chunks = (n + chunk - 1) / chunk;
    std::vector<double> partial(size_t(std::max<int64_t>(n_chunks, 0)), 0.0);
    parallel_for(n_chunks, [&](int64_t c) {
        double s[4] = {0, 0, 0, 0};  // 4 independent chains (one was a long chain of dependent additions)
        int64_t i = c * chunk;
        const int64_t e = std::min(n, i + chunk);
        for (; i + 4 <= e; i += 4)
            for (int j = 0; j < 4; ++j) s[j] += term(i + j);
        for (; i < e; ++i) s[0] += term(i);
        partial[size_t(c)] = (s[0] + s[1]) + (s[2] + s[3]);
    });
    double total = 0;
    for (double p : partial) total += p;
    return total;
}

// OpenMP threads that spin only briefly, then sleep, while they wait: for CPUs shared with other programs (11.1).
inline void prefer_sleeping_threads(char** argv);

inline int thread_count() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

inline double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// --- where a step's time goes: the profile of build/train --profile ---------------------------------------------
// Scopes name a module of section 5 (DSV3_PROFILE_MODULE("MLA forward")) or a kernel of section 3 or cuda/
// (DSV3_PROFILE_KERNEL(): its function). While on, each adds its wall time to a row: a module's holds all it contains
// (MTP's block is in "MLA forward" too), a kernel's is keyed by the innermost module (a nested kernel is its caller's
// time). A queueing backend (CUDA) passes its synchronize, run at each scope's ends: a kernel gets its own time.
struct Profile {
    struct Row { double seconds = 0; int64_t calls = 0; };
    bool on = false;
    void (*sync)() = nullptr;
    std::map<std::string, Row> modules, kernels;  // kernels: "module | kernel"
    std::string module = "(model)";               // the innermost open module scope
    bool in_kernel = false;
    std::thread::id owner;                        // scopes of other threads (ranks) are not counted
    void start(void (*synchronize)()) {
        *this = Profile();
        on = true, sync = synchronize, owner = std::this_thread::get_id();
    }
    // Two tables, per step over `steps` steps, each row's share of the row `total` (a module scope around the step).
    std::string table(int steps, const std::string& total = "training step") const {
        const double whole = modules.count(total) ? modules.at(total).seconds : 0;
        std::ostringstream out;
        char line[160];
        auto rows = [&](const char* title, const std::map<std::string, Row>& m) {
            std::vector<std::pair<std::string, Row>> v(m.begin(), m.end());
            std::sort(v.begin(), v.end(),
                      [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
            std::snprintf(line, sizeof line, "%-58s %9s %9s %7s\n", title, "calls", "ms", "share");
            out << line;
            for (const auto& [name, r] : v) {
                std::snprintf(line, sizeof line, "  %-56s %9.1f %9.3f %6.1f%%\n", name.c_str(), double(r.calls) / steps,
                              1e3 * r.seconds / steps, whole > 0 ? 100 * r.seconds / whole : 0.0);
                out << line;
            }
        };
        rows("module (inclusive: a module's row holds what it calls), per step", modules);
        rows("kernel, by innermost module (module | kernel), per step", kernels);
        return out.str();
    }
};
inline Profile& profile() { static Profile p; return p; }

struct ProfileScope {
    ProfileScope(const char* name, bool kernel) {
        Profile& p = profile();
        if (!p.on || (kernel && p.in_kernel) || std::this_thread::get_id() != p.owner) return;
        if (p.sync) p.sync();
        name_ = name, kernel_ = kernel, active_ = true, outer_module_ = p.module, t0_ = now_seconds();
        if (kernel) p.in_kernel = true; else p.module = name;
    }
    ~ProfileScope() {
        if (!active_) return;
        Profile& p = profile();
        if (p.sync) p.sync();
        Profile::Row& r = kernel_ ? p.kernels[p.module + " | " + name_] : p.modules[name_];
        r.seconds += now_seconds() - t0_, r.calls += 1;
        if (kernel_) p.in_kernel = false; else p.module = outer_module_;
    }
    ProfileScope(const ProfileScope&) = delete;
    ProfileScope& operator=(const ProfileScope&) = delete;
    const char* name_ = nullptr;
    std::string outer_module_;
    bool kernel_ = false, active_ = false;
    double t0_ = 0;
};
#define DSV3_PROFILE_KERNEL() ::dsv3::ProfileScope dsv3_profile_scope_(__func__, true)
#define DSV3_PROFILE_MODULE(name) ::dsv3::ProfileScope dsv3_profile_scope_(name, false)

// The memory budget: a size a file or a config declares, checked against physical memory first (section 11.1).
inline void require_memory(std::string_view what, double bytes);

// The first 64-byte boundary (a cache line) at or after p, at most 15 floats on.
inline float* align64(float* p) { return p + (16 - (reinterpret_cast<uintptr_t>(p) / 4) % 16) % 16; }

// The activation arena: activations and backward temporaries, bump-allocated from large blocks that never move (valid
// until release()/reset()). After the first step every take() reuses memory owned: a training step allocates nothing.
class Arena {
  public:
    float* take(size_t n) {  // n floats, uninitialised, 64-byte aligned
        n = (n + 15) & ~size_t(15);
        while (block_ < blocks_.size() && used_ + n > blocks_[block_].size && used_ > 0) ++block_, used_ = 0;
        const size_t size = std::max(n, size_t(1) << 22);  // a new block, or one replacing an empty one too small
        if (block_ == blocks_.size()) blocks_.emplace_back();
        Block& b = blocks_[block_];
        if (!b.data || used_ + n > b.size) b = {std::unique_ptr<float[]>(new float[size + 16]), size};
        float* p = align64(b.data.get()) + used_;
        used_ += n;
        return p;
    }
    float* zeros(size_t n) {
        float* p = take(n);
        std::memset(p, 0, n * sizeof(float));
        return p;
    }
    struct Mark { size_t block, used; };
    Mark mark() const { return {block_, used_}; }
    void release(Mark m) { block_ = m.block; used_ = m.used; }
    void reset() { release({0, 0}); }

  private:
    struct Block { std::unique_ptr<float[]> data; size_t size = 0; };
    std::vector<Block> blocks_;
    size_t block_ = 0, used_ = 0;
};

// --- a named view of a tensor ---------------------------------------------------------------------------------------
// Pointer + shape + name, owning nothing: how a reader looks at any parameter or gradient of the flat buffers by its
// Hugging Face name, e.g. model.param("model.layers.1.mlp.gate.weight").at(expert, channel).
struct TensorView {
    float* data = nullptr;
    std::vector<int64_t> shape;
    std::string name;
    int64_t numel() const { return std::accumulate(shape.begin(), shape.end(), int64_t(1), std::multiplies<>()); }
    float& at(int64_t i) const {
        if (shape.size() != 1 || i < 0 || i >= shape[0]) fail("tensor ", name, ": index [", i, "] outside its shape");
        return data[i];
    }
    float& at(int64_t i, int64_t j) const {
        if (shape.size() != 2 || i < 0 || j < 0 || i >= shape[0] || j >= shape[1])
            fail("tensor ", name, ": index [", i, ", ", j, "] outside its shape");
        return data[i * shape[1] + j];
    }
};

// =====================================================================================================================
// 3. KERNELS
// =====================================================================================================================
// Forward/backward pairs on raw row-major arrays (backward accumulates: CONVENTIONS); T counts rows, B * seq_len.
// Section 8's FP8 linear layer (every linear layer under Config.fp8_training [V3 §3.3]), and its BF16 rounding.

inline float bf16_round(float x);
inline void fp8_matmul_forward(float* y, const float* x, const float* W, int T, int in, int out);
inline void fp8_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int in,
                                int out);
inline void fp8_grouped_matmul_forward(float* y, const float* x, const float* W, int64_t w_stride,
                                       const int64_t* offsets, int groups, int in, int out);
inline void fp8_grouped_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                                        int64_t w_stride, const int64_t* offsets, int groups, int in, int out);
// The Hopper FP8 GEMM's accumulator model and the 1x128 tile count, which cuda/'s FP8 kernels also take (section 8).
struct Fp8Accum {
    int block = 32;          // products per tensor-core block (K of one FP8 WGMMA instruction on Hopper)
    int frac_bits = 13;      // fraction bits kept when aligning (the accumulator keeps frac_bits + 1 significant bits)
    int promote_every = 128; // N_C: copy to FP32 (times the scales) every this many k; 0 = never ("fast accumulation")
    bool exact = false;      // reference: exact products and 128-chunk sums (E4M3), scaled and summed in double
};
inline int fp8_tiles(int n) { return (n + 127) / 128; }   // number of 128-wide tiles covering n (last one partial)

// Σ_i term(i) in 8 partial sums, then the remainder and the partials in order: 8 independent chains in one SIMD
// register (one running sum, a long chain of dependent additions, was the slowest kernel of a CPU step). The order
// depends on n alone. dot8 is Σ a_i b_i; RMSNorm, softmax and the cross-entropies sum their rows the same way.
template <class Term>
inline float sum8(int n, const Term& term) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += term(i + j);
    float s = 0;
    for (; i < n; ++i) s += term(i);
    for (float x : acc) s += x;
    return s;
}
inline float dot8(const float* a, const float* b, int n) { return sum8(n, [&](int i) { return a[i] * b[i]; }); }
// e^x to about 1 ulp in plain arithmetic, so that a loop over it vectorizes (std::exp is a library call an element:
// in softmax, SwiGLU and the cross-entropies it took a tenth of a CPU step). Cody and Waite's reduction x = n·ln2 + r,
// |r| ≤ ln2/2, with ln2 in two parts; e^r by Cephes' degree-6 polynomial (Moshier 1989); 2^n added to the exponent
// bits. x is clamped to [−87, 88] (there 2^n · e^r stays a normal float); below −87, e^x is taken as 0. The clamp
// sends NaN to −87 (std::max(a, b) returns a unless a < b), so that int32_t(n) is always defined; NaN is returned.
inline float exp_fast(float x) {
    const float c = std::min(std::max(-87.0f, x), 88.0f), shifter = 12582912.0f;  // + 1.5·2^23 rounds to an integer
    const float n = (c * 1.44269504f + shifter) - shifter;
    const float r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e_r = p * r * r + r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &e_r, 4);
    bits += int32_t(n) * (1 << 23);
    float y;
    std::memcpy(&y, &bits, 4);
    return x < -87.0f ? 0.0f : x != x ? x : y;
}

// --- 3.1 matmul: the linear layer y = x Wᵀ --------------------------------------------------------------------------
// Almost all of a transformer's FLOPs are in its linear layers. DeepSeek's weights are stored [out, in] (PyTorch's
// nn.Linear convention) and have no bias. A linear layer is three products:
//     forward   y [T,out]  = x [T,in] · Wᵀ
//     backward  dx[T,in]  += dy[T,out] · W          dW[out,in] += dy[T,out]ᵀ · x
// each C[M,N] (+)= A[M,K]·B[K,N] over strided views (Wᵀ: W, strides swapped). The tests compare everything with the
// reference (the definition, in double); the model calls section 10's fast gemm::multiply, whose summation order
// depends on K alone: bitwise the same for any thread count, and a row of y the same whatever batch it is in.
namespace gemm {
// A matrix view with arbitrary strides: element (r, c) is data[r * row_stride + c * col_stride].
template <class T>
struct StridedView {
    T* data;
    int64_t row_stride, col_stride;
    T& at(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};
using View = StridedView<const float>;   // an operand
using OutView = StridedView<float>;      // the result
// C[M,N] = A[M,K]·B[K,N] (accumulate = false) or C += A·B (accumulate = true), for any strides of A, B and C.
inline void multiply(int M, int N, int K, const View& A, const View& B, const OutView& C, bool accumulate);
constexpr int FEW_ROWS = 4;  // y = x Wᵀ for at most this many rows of x: a matrix-vector kernel, bitwise the same
inline void multiply_few_rows(float* y, const float* x, const float* W, int T, int in, int out);
}  // namespace gemm
// C[M,N] = A·B, or C += A·B (accumulate), summed in double over k in order.
inline void multiply_reference(int M, int N, int K, const gemm::View& A, const gemm::View& B, const gemm::OutView& C,
                               bool accumulate) {
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) {
            double s = accumulate ? double(C.at(r, c)) : 0.0;
            for (int k = 0; k < K; ++k) s += double(A.at(r, k)) * B.at(k, c);
            C.at(r, c) = float(s);
        }
}
inline void matmul_forward_reference(float* y, const float* x, const float* W, int T, int in, int out) {
    multiply_reference(T, out, in, {x, in, 1}, {W, 1, in}, {y, out, 1}, false);
}
inline void matmul_backward_reference(float* dx, float* dW, const float* dy, const float* x, const float* W, int T,
                                      int in, int out) {
    if (dx) multiply_reference(T, in, out, {dy, out, 1}, {W, in, 1}, {dx, in, 1}, true);
    if (dW) multiply_reference(out, in, T, {dy, 1, out}, {x, in, 1}, {dW, in, 1}, true);
}

// y[T,out] = x[T,in] · W[out,in]ᵀ (overwrites y). With many rows, W is packed once for all of them. With few (decoding)
// packing W costs more than the product: up to FEW_ROWS rows run a matrix-vector kernel reading W in place, up to 63
// the GEMM computing yᵀ = W · xᵀ (only x packed). Every path is the same FMA chain over k: bitwise the same result.
inline void matmul_forward(float* y, const float* x, const float* W, int T, int in, int out) {
    DSV3_PROFILE_KERNEL();
    if (T <= gemm::FEW_ROWS)
        gemm::multiply_few_rows(y, x, W, T, in, out);
    else if (T < 64)
        gemm::multiply(out, T, in, gemm::View{W, in, 1}, gemm::View{x, 1, in}, gemm::OutView{y, 1, out}, false);
    else
        gemm::multiply(T, out, in, gemm::View{x, in, 1}, gemm::View{W, 1, in}, gemm::OutView{y, out, 1}, false);
}

// dx[T,in] += dy[T,out] · W[out,in];   dW[out,in] += dy[T,out]ᵀ · x[T,in]     (accumulate; either may be null)
inline void matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int in,
                            int out) {
    DSV3_PROFILE_KERNEL();
    if (dx) gemm::multiply(T, in, out, gemm::View{dy, out, 1}, gemm::View{W, in, 1}, gemm::OutView{dx, in, 1}, true);
    if (dW) gemm::multiply(out, in, T, gemm::View{dy, 1, out}, gemm::View{x, in, 1}, gemm::OutView{dW, in, 1}, true);
}

// --- 3.2 RMSNorm: y = x / sqrt(mean(x²) + ε) ⊙ g   (Zhang & Sennrich 2019; used before every sub-layer) ---------
// x, y: [T, d]; g: [d]; rstd: [T] saved for backward.
inline void rmsnorm_forward(float* y, float* rstd, const float* x, const float* g, int T, int d, float eps) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        const float* xr = x + t * d;
        float* yr = y + t * d;
        const float r = 1.0f / std::sqrt(dot8(xr, xr, d) / d + eps);
        rstd[t] = r;
        for (int i = 0; i < d; ++i) yr[i] = xr[i] * r * g[i];
    });
}
// With n = x·r (r = rstd): dx = r·(g⊙dy) − r·n·mean(g⊙dy⊙n);  dg = Σ_t dy⊙n.
inline void rmsnorm_backward(float* dx, float* dg, const float* dy, const float* x, const float* g,
                             const float* rstd, int T, int d) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        const float* xr = x + t * d;
        const float* dyr = dy + t * d;
        const float r = rstd[t];
        const float dot = sum8(d, [&](int i) { return g[i] * dyr[i] * xr[i] * r; }) / d;
        float* dxr = dx + t * d;
        for (int i = 0; i < d; ++i) dxr[i] += r * (g[i] * dyr[i] - xr[i] * r * dot);
    });
    constexpr int W = 16;  // dg: W columns a task, in one SIMD register; each column's sum over t runs in t's order
    if (dg) parallel_for((d + W - 1) / W, [&](int64_t task) {
        const int i0 = int(task) * W, w = std::min(W, d - i0);
        float s[W] = {};
        for (int64_t t = 0; t < T; ++t)
            for (int j = 0; j < w; ++j) s[j] += dy[t * d + i0 + j] * x[t * d + i0 + j] * rstd[t];
        for (int j = 0; j < w; ++j) dg[i0 + j] += s[j];
    });
}

// --- 3.3 RoPE with YaRN [V3 §2.1.1 eqs. 3 and 7; YaRN, Peng et al. 2023] ----------------------------------------
// The decoupled RoPE part of queries and keys is rotated pairwise: (x_2i, x_2i+1) by the angle pos·θ_i with
// θ_i = base^(−2i/D), D = qk_rope_head_dim. (DeepSeek's code views the pairs as complex numbers; Hugging Face stores
// the same weights and de-interleaves in its rotary function: same dot products.) YaRN extends the context by slowing
// the low frequencies: those turning fewer than beta_slow times over the original context are divided by s
// (= rope_factor), those turning more than beta_fast times kept, a linear ramp between. The attention scale is then
// multiplied by m² with m = 0.1·mscale·ln(s) + 1.
struct RopeTable {
    int half = 0, max_pos = 0;
    std::vector<float> cos, sin;  // [max_pos, half]
};
inline std::vector<double> rope_frequencies(const Config& c) {
    const int D = c.qk_rope_head_dim, half = D / 2;
    std::vector<double> theta(static_cast<size_t>(half));
    for (int i = 0; i < half; ++i) theta[size_t(i)] = std::pow(double(c.rope_theta), -2.0 * i / D);
    if (!c.yarn_active()) return theta;
    auto find_dim = [&](double rotations) {  // the dimension turning `rotations` times over the original context
        return D * std::log(c.original_seq_len / (rotations * 2 * M_PI)) / (2 * std::log(double(c.rope_theta)));
    };
    double low = std::max(std::floor(find_dim(c.beta_fast)), 0.0);
    double high = std::min(std::ceil(find_dim(c.beta_slow)), double(D - 1));
    if (high == low) high += 0.001;
    for (int i = 0; i < half; ++i) {
        double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);  // 0: keep (fast), 1: interpolate (slow)
        theta[size_t(i)] = theta[size_t(i)] / c.rope_factor * ramp + theta[size_t(i)] * (1 - ramp);
    }
    return theta;
}
inline RopeTable make_rope_table(const Config& c, int max_pos) {
    const size_t n = size_t(max_pos) * size_t(c.qk_rope_head_dim / 2);
    RopeTable r{c.qk_rope_head_dim / 2, max_pos, std::vector<float>(n), std::vector<float>(n)};
    std::vector<double> theta = rope_frequencies(c);
    for (int p = 0; p < max_pos; ++p)
        for (int i = 0; i < r.half; ++i) {
            double a = p * theta[size_t(i)];
            r.cos[size_t(p) * r.half + i] = float(std::cos(a));
            r.sin[size_t(p) * r.half + i] = float(std::sin(a));
        }
    return r;
}
// Softmax scale of MLA: 1/sqrt(d_h + d_h^R), times m² under YaRN (V3 code: softmax_scale *= mscale²).
inline float attention_scale(const Config& c) {
    const float m = c.yarn_active() ? 0.1f * c.mscale * std::log(c.rope_factor) + 1.0f : 1.0f;
    return 1.0f / std::sqrt(float(c.qk_head_dim())) * (m * m);
}
// In place: x holds T rows of row_stride floats, each with n_vec vectors of D = 2·half floats at offset + j·vec_stride.
// Row t is at position pos0 + t % seq_len. inverse (the backward, rotation being orthogonal): the opposite angle.
inline void rope_apply(float* x, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0,
                       int seq_len, const RopeTable& rt, bool inverse) {
    const float sign = inverse ? -1.0f : 1.0f;
    // (Checks run before the parallel loop: an exception must never leave an OpenMP region.)
    const int last = pos0 + std::min(T, seq_len) - 1;
    if (T > 0 && last >= rt.max_pos) fail("rope: position ", last, " beyond the table's max_pos ", rt.max_pos);
    parallel_for(T, [&](int64_t t) {
        const int pos = pos0 + int(t % seq_len);
        const float* cs = rt.cos.data() + size_t(pos) * rt.half;
        const float* sn = rt.sin.data() + size_t(pos) * rt.half;
        for (int j = 0; j < n_vec; ++j) {
            float* v = x + t * row_stride + offset + int64_t(j) * vec_stride;
            for (int i = 0; i < rt.half; ++i) {
                const float a = v[2 * i], b = v[2 * i + 1], c = cs[i], s = sign * sn[i];
                v[2 * i] = a * c - b * s;
                v[2 * i + 1] = a * s + b * c;
            }
        }
    });
}
inline void rope_forward(float* x, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0,
                         int seq_len, const RopeTable& rt) {
    DSV3_PROFILE_KERNEL();
    rope_apply(x, T, row_stride, offset, n_vec, vec_stride, pos0, seq_len, rt, false);
}
inline void rope_backward(float* dx, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0,
                          int seq_len, const RopeTable& rt) {
    DSV3_PROFILE_KERNEL();
    rope_apply(dx, T, row_stride, offset, n_vec, vec_stride, pos0, seq_len, rt, true);
}

// --- 3.4 causal softmax attention -----------------------------------------------------------------------------
// q, k: [B·T, H, dqk]; v: [B·T, H, dv]; out: [B·T, H, dv]; probs: [B, H, T, T] (row t holds weights over s ≤ t).
// o_t = Σ_{s≤t} softmax_s(q_t·k_s · scale) v_s       [V3 eq. 10]
// Floats the forward saves for the backward: the probabilities (the GPU's flash kernels keep a log-sum-exp per row).
inline size_t attention_saved_floats(int B, int T, int H, int /*dqk*/, int /*dv*/) { return size_t(B) * H * T * T; }
// One task per (b, h), whose rows are T × d matrices H·d floats apart: the scores, the output and every gradient are
// matrix products on section 10's GEMM over strided views (on the calling thread: the tasks are the parallelism).
// The causal half above the diagonal is computed too and multiplied by its zero probabilities: twice the
// multiply-adds, at several times the rate of dot products over short rows. Sums run in a fixed order: any thread count.
inline void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v, int B, int T,
                              int H, int dqk, int dv, float scale) {
    DSV3_PROFILE_KERNEL();
    parallel_for(int64_t(B) * H, [&](int64_t job) {
        const int64_t h = job % H, row0 = (job / H) * T * H + h;  // (b·T + 0)·H + h: this head's first row
        float* p = probs + job * T * T;                                            // [T, T]
        const gemm::View Q{q + row0 * dqk, H * dqk, 1}, Kt{k + row0 * dqk, 1, H * dqk}, V{v + row0 * dv, H * dv, 1};
        gemm::multiply(T, T, dqk, Q, Kt, {p, T, 1}, false);                        // p = q kᵀ
        for (int t = 0; t < T; ++t) {                                              // row t: softmax over s ≤ t
            float* pt = p + int64_t(t) * T;
            float mx = -INFINITY;
            for (int s = 0; s <= t; ++s) mx = std::max(mx, pt[s] *= scale);
            for (int s = 0; s <= t; ++s) pt[s] = exp_fast(pt[s] - mx);
            const float inv = 1.0f / sum8(t + 1, [&](int s) { return pt[s]; });
            for (int s = 0; s <= t; ++s) pt[s] *= inv;
            for (int s = t + 1; s < T; ++s) pt[s] = 0;
        }
        gemm::multiply(T, dv, T, {p, T, 1}, V, {out + row0 * dv, H * dv, 1}, false);  // out = p v
    });
}
// Backward, per (b, h): dp = dout vᵀ; dscore_ts = p_ts (dp_ts − D_t) · scale, with D_t = Σ_s p_ts dp_ts =
// dout_t · out_t (FlashAttention's D; `out` is the forward's output); dq += dscore k; dk += dscoreᵀ q; dv += pᵀ dout.
inline void attention_backward(float* dq, float* dk, float* dv_, const float* dout, const float* out,
                               const float* probs, const float* q, const float* k, const float* v, int B, int T, int H,
                               int dqk, int dv, float scale) {
    DSV3_PROFILE_KERNEL();
    parallel_for(int64_t(B) * H, [&](int64_t job) {
        const int64_t h = job % H, row0 = (job / H) * T * H + h;
        const float* p = probs + job * T * T;
        std::vector<float> ds(size_t(T) * T);                                      // dp, then dscore: [T, T]
        const gemm::View dO{dout + row0 * dv, H * dv, 1}, Q{q + row0 * dqk, H * dqk, 1}, K{k + row0 * dqk, H * dqk, 1};
        gemm::multiply(T, T, dv, dO, {v + row0 * dv, 1, H * dv}, {ds.data(), T, 1}, false);  // dp = dout vᵀ
        for (int t = 0; t < T; ++t) {
            const float D = dot8(dout + (row0 + int64_t(t) * H) * dv, out + (row0 + int64_t(t) * H) * dv, dv);
            float* dst = ds.data() + int64_t(t) * T;
            const float* pt = p + int64_t(t) * T;
            for (int s = 0; s < T; ++s) dst[s] = s <= t ? pt[s] * (dst[s] - D) * scale : 0.0f;
        }
        gemm::multiply(T, dqk, T, {ds.data(), T, 1}, K, {dq + row0 * dqk, H * dqk, 1}, true);   // dq += ds k
        gemm::multiply(T, dqk, T, {ds.data(), 1, T}, Q, {dk + row0 * dqk, H * dqk, 1}, true);   // dk += dsᵀ q
        gemm::multiply(T, dv, T, {p, 1, T}, dO, {dv_ + row0 * dv, H * dv, 1}, true);            // dv += pᵀ dout
    });
}

// --- 3.5 SwiGLU: h = silu(gate) ⊙ up, silu(z) = z·σ(z)   (Shazeer 2020; every FFN and expert of V3) ------------
// h: [rows, w]; gate, up (and dgate, dup): rows ld apart, ld = w, or 2w for the halves of one [gate; up] product
inline void swiglu_forward(float* h, const float* gate, const float* up, int64_t rows, int w, int ld) {
    DSV3_PROFILE_KERNEL();
    parallel_for(rows, [&](int64_t r) {
        for (int64_t j = 0; j < w; ++j) {
            const float z = gate[r * ld + j], sig = 1.0f / (1.0f + exp_fast(-z));
            h[r * w + j] = z * sig * up[r * ld + j];
        }
    }, w);
}
inline void swiglu_backward(float* dgate, float* dup, const float* dh, const float* gate, const float* up,
                            int64_t rows, int w, int ld) {
    DSV3_PROFILE_KERNEL();
    parallel_for(rows, [&](int64_t r) {
        for (int64_t j = 0, i = r * ld; j < w; ++j, ++i) {
            const float z = gate[i], sig = 1.0f / (1.0f + exp_fast(-z));
            dgate[i] += dh[r * w + j] * up[i] * sig * (1.0f + z * (1.0f - sig));   // silu' = σ(1 + z(1 − σ))
            dup[i] += dh[r * w + j] * z * sig;
        }
    }, w);
}

// --- 3.6 embedding ------------------------------------------------------------------------------------------------
// out[t] = E[tokens[t]];  E: [vocab, d], out: [T, d]
inline void embedding_forward(float* out, const int32_t* tokens, const float* E, int T, int d, int vocab) {
    DSV3_PROFILE_KERNEL();
    for (int t = 0; t < T; ++t)
        if (tokens[t] < 0 || tokens[t] >= vocab)
            fail("embedding: token id ", tokens[t], " at position ", t, " outside [0, ", vocab, ")");
    parallel_for(T, [&](int64_t t) { std::memcpy(out + t * d, E + int64_t(tokens[t]) * d, sizeof(float) * d); });
}
// dE[tokens[t]] += dout[t]. Rows of equal tokens collide, so this runs serially in t order (deterministic, cheap).
inline void embedding_backward(float* dE, const float* dout, const int32_t* tokens, int T, int d) {
    DSV3_PROFILE_KERNEL();
    for (int t = 0; t < T; ++t) {
        float* row = dE + int64_t(tokens[t]) * d;
        const float* g = dout + int64_t(t) * d;
        for (int i = 0; i < d; ++i) row[i] += g[i];
    }
}

// --- 3.7 cross-entropy ------------------------------------------------------------------------------------------
// logits: [T, V]; targets: [T] (kIgnore skips a row). Returns the mean of −log softmax(logits)[target], in nats.
constexpr int32_t kIgnore = -1;
inline int64_t cross_entropy_count(const int32_t* targets, int T, int V) {  // counted rows; checks the targets
    int64_t counted = 0;
    for (int t = 0; t < T; ++t) {
        if (targets[t] == kIgnore) continue;
        if (targets[t] < 0 || targets[t] >= V)
            fail("cross_entropy: target ", targets[t], " at row ", t, " outside [0, ", V, ")");
        ++counted;
    }
    return counted;
}
inline double cross_entropy_forward(const float* logits, const int32_t* targets, int T, int V) {
    DSV3_PROFILE_KERNEL();
    const int64_t counted = cross_entropy_count(targets, T, V);
    if (counted == 0) return 0.0;
    double total = parallel_sum(T, [&](int64_t t) {
        const int32_t y = targets[t];
        if (y == kIgnore) return 0.0;
        const float* z = logits + t * V;
        const float mx = *std::max_element(z, z + V);
        return std::log(double(sum8(V, [&](int i) { return exp_fast(z[i] - mx); }))) + mx - z[y];
    });
    return total / double(counted);
}
// dlogits[t] += dloss · (softmax(logits[t]) − onehot(target)) / counted.
inline void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, int T, int V,
                                   float dloss) {
    DSV3_PROFILE_KERNEL();
    const int64_t counted = cross_entropy_count(targets, T, V);
    if (counted == 0) return;
    const float w = dloss / float(counted);
    parallel_for(T, [&](int64_t t) {
        const int32_t y = targets[t];
        if (y == kIgnore) return;
        const float* z = logits + t * V;
        float* dz = dlogits + t * V;
        const float mx = *std::max_element(z, z + V);
        const float inv = 1.0f / sum8(V, [&](int i) { return exp_fast(z[i] - mx); });
        for (int i = 0; i < V; ++i) dz[i] += w * (exp_fast(z[i] - mx) * inv - (i == y ? 1.0f : 0.0f));
    });
}

// --- 3.8 the MoE router [V3 §2.1.2, eqs. 13-16] ------------------------------------------------------------------
// scores s_{i,t} = σ(u_tᵀ e_i) (sigmoid; V2 used softmax over experts). Selection uses the biased score s + b, in two
// stages: the N_r experts form n_group groups, a group's score the sum of its two best biased scores (max for softmax
// routing); the topk_group best groups stay, and the top-K experts among them are chosen. The gates use the UNBIASED
// scores: g_i = s_i / Σ_{j chosen} s_j (eq. 13), times route_scale: the bias steers which experts are chosen, not how
// much they contribute — the point of loss-free balancing.
// logits, scores: [T, N]; bias: [N] (may be null); chosen: [T, K] expert ids (ascending by rank); gates: [T, K].
inline void router_scores_forward(float* scores, const float* logits, int T, int N, bool softmax) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        const float* z = logits + t * N;
        float* s = scores + t * N;
        if (!softmax) {
            for (int i = 0; i < N; ++i) s[i] = 1.0f / (1.0f + std::exp(-z[i]));
            return;
        }
        float mx = z[0], sum = 0;
        for (int i = 1; i < N; ++i) mx = std::max(mx, z[i]);
        for (int i = 0; i < N; ++i) sum += (s[i] = std::exp(z[i] - mx));
        for (int i = 0; i < N; ++i) s[i] /= sum;
    });
}
// dlogits[t] += ∂/∂logits of Σ dscores·scores.  sigmoid: ds·s(1−s);  softmax: s ⊙ (ds − Σ ds·s).
inline void router_scores_backward(float* dlogits, const float* dscores, const float* scores, int T, int N,
                                   bool softmax) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        const float* s = scores + t * N;
        const float* ds = dscores + t * N;
        float* dz = dlogits + t * N;
        if (!softmax) {
            for (int i = 0; i < N; ++i) dz[i] += ds[i] * s[i] * (1.0f - s[i]);
            return;
        }
        float dot = 0;
        for (int i = 0; i < N; ++i) dot += ds[i] * s[i];
        for (int i = 0; i < N; ++i) dz[i] += s[i] * (ds[i] - dot);
    });
}
// The choice (no gradient flows through it). Ties go to the lower expert id, so the choice is deterministic.
inline void router_select(int32_t* chosen, const float* scores, const float* bias, int T, const Config& c) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts, G = c.n_expert_groups, per_group = N / G;
    const bool softmax = c.score_func == "softmax";
    parallel_for(T, [&](int64_t t) {
        std::vector<float> biased(static_cast<size_t>(N));
        for (int i = 0; i < N; ++i) biased[size_t(i)] = scores[t * N + i] + (bias ? bias[i] : 0.0f);
        if (G > 1) {  // group limit: keep the topk_group best groups, mask the others out
            std::vector<std::pair<float, int>> group_score;
            for (int g = 0; g < G; ++g) {
                const float* b = biased.data() + g * per_group;
                float best = -INFINITY, second = -INFINITY;
                for (int i = 0; i < per_group; ++i) {
                    if (b[i] > best) { second = best; best = b[i]; }
                    else if (b[i] > second) second = b[i];
                }
                group_score.push_back({softmax ? best : best + second, g});
            }
            std::stable_sort(group_score.begin(), group_score.end(),
                             [](auto& a, auto& b) { return a.first > b.first; });
            for (int r = c.n_limited_groups; r < G; ++r)
                std::fill_n(biased.begin() + group_score[size_t(r)].second * per_group, per_group, -INFINITY);
        }
        std::vector<int> order(static_cast<size_t>(N));
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int a, int b) {
            return biased[size_t(a)] > biased[size_t(b)] || (biased[size_t(a)] == biased[size_t(b)] && a < b);
        });
        for (int k = 0; k < K; ++k) chosen[t * K + k] = order[size_t(k)];
    });
}
// gates[t,k] = route_scale · s_{chosen} / (Σ_k s_{chosen_k} + 1e-20)   (without norm_topk_prob: route_scale · s)
inline void router_gates_forward(float* gates, const float* scores, const int32_t* chosen, int T, const Config& c) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts;
    parallel_for(T, [&](int64_t t) {
        float sum = 0;
        for (int k = 0; k < K; ++k) sum += scores[t * N + chosen[t * K + k]];
        const float norm = c.norm_topk_prob ? 1.0f / (sum + 1e-20f) : 1.0f;
        for (int k = 0; k < K; ++k) gates[t * K + k] = c.route_scale * scores[t * N + chosen[t * K + k]] * norm;
    });
}
// dscores[t, chosen] += ∂/∂s of Σ dgates·gates. With S = Σ_k s_k: ∂g_k/∂s_j = rs·(δ_kj/S − s_k/S²).
inline void router_gates_backward(float* dscores, const float* dgates, const float* scores, const int32_t* chosen,
                                  int T, const Config& c) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts;
    parallel_for(T, [&](int64_t t) {
        if (!c.norm_topk_prob) {
            for (int k = 0; k < K; ++k) dscores[t * N + chosen[t * K + k]] += c.route_scale * dgates[t * K + k];
            return;
        }
        float S = 1e-20f, dot = 0;
        for (int k = 0; k < K; ++k) {
            const float s = scores[t * N + chosen[t * K + k]];
            S += s;
            dot += dgates[t * K + k] * s;
        }
        for (int k = 0; k < K; ++k)
            dscores[t * N + chosen[t * K + k]] += c.route_scale * (dgates[t * K + k] / S - dot / (S * S));
    });
}

// --- 3.9 balance losses ------------------------------------------------------------------------------------------
// Sequence-wise balance loss [V3 eqs. 17-20], per sequence of T tokens, averaged over the B sequences:
//   f_i = N_r/(K·T) Σ_t 1[i ∈ TopK_t],  s'_{i,t} = s_{i,t} / Σ_j s_{j,t},  P_i = (1/T) Σ_t s'_{i,t},  L = α Σ_i f_i P_i
// f is a count (no gradient); the gradient flows through P into every score.
inline double sequence_balance_loss(float* dscores, const float* scores, const int32_t* chosen, int B, int T,
                                    const Config& c, float alpha) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts;
    std::vector<double> per_seq(static_cast<size_t>(B));
    parallel_for(B, [&](int64_t b) {
        std::vector<double> f(static_cast<size_t>(N), 0.0), P(static_cast<size_t>(N), 0.0);
        for (int t = 0; t < T; ++t)
            for (int k = 0; k < K; ++k) f[size_t(chosen[(b * T + t) * K + k])] += double(N) / (double(K) * T);
        for (int t = 0; t < T; ++t) {
            const float* s = scores + (b * T + t) * N;
            double S = 0;
            for (int i = 0; i < N; ++i) S += s[i];
            for (int i = 0; i < N; ++i) P[size_t(i)] += s[i] / S / T;
            if (!dscores) continue;
            // ∂L/∂s'_i = α f_i / (T·B);  ∂s'_i/∂s_j = (δ_ij − s'_i) / S
            double dot = 0;
            for (int i = 0; i < N; ++i) dot += alpha * f[size_t(i)] / (double(T) * B) * s[i] / S;
            float* ds = dscores + (b * T + t) * N;
            for (int j = 0; j < N; ++j) ds[j] += float((alpha * f[size_t(j)] / (double(T) * B) - dot) / S);
        }
        double L = 0;
        for (int i = 0; i < N; ++i) L += f[size_t(i)] * P[size_t(i)];
        per_seq[size_t(b)] = alpha * L;
    });
    return std::accumulate(per_seq.begin(), per_seq.end(), 0.0) / B;
}
// The classic expert-level auxiliary loss (DeepSeekMoE eqs. 12-14, GShard form) over the whole batch of T tokens:
//   f_i = N_r/(K·T) Σ_t 1[i ∈ TopK_t],  P_i = (1/T) Σ_t p_{i,t} with p = softmax(logits),  L = α Σ_i f_i P_i
// The gradient goes straight to the router logits: ∂L/∂z_{i,t} = p_i (c_i − Σ_j c_j p_j), c_i = α f_i / T.
inline double expert_balance_loss(float* dlogits, const float* logits, const int32_t* chosen, int T, const Config& c,
                                  float alpha) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts;
    std::vector<double> f(static_cast<size_t>(N), 0.0);
    for (int64_t i = 0; i < int64_t(T) * K; ++i) f[size_t(chosen[i])] += double(N) / (double(K) * T);
    std::vector<double> P_partial(static_cast<size_t>(T) * N);
    parallel_for(T, [&](int64_t t) {
        const float* z = logits + t * N;
        const float mx = *std::max_element(z, z + N);
        double sum = 0;
        std::vector<double> p(static_cast<size_t>(N));
        for (int i = 0; i < N; ++i) sum += (p[size_t(i)] = std::exp(double(z[i] - mx)));
        double dot = 0;
        for (int i = 0; i < N; ++i) {
            p[size_t(i)] /= sum;
            P_partial[size_t(t) * N + i] = p[size_t(i)];
            dot += alpha * f[size_t(i)] / T * p[size_t(i)];
        }
        if (dlogits)
            for (int i = 0; i < N; ++i) dlogits[t * N + i] += float(p[size_t(i)] * (alpha * f[size_t(i)] / T - dot));
    });
    double L = 0;
    for (int i = 0; i < N; ++i) {
        double P = 0;
        for (int t = 0; t < T; ++t) P += P_partial[size_t(t) * N + i];
        L += f[size_t(i)] * P / T;
    }
    return alpha * L;
}

// --- 3.10 MoE permutation and the experts' grouped GEMMs -------------------------------------------------------------
// Tokens are grouped by expert with a stable counting sort, so each expert runs one dense matmul over its rows.
// slot[t·K + k] = row of (token t, choice k) in the permuted order; token_of[row] = t; expert e: offsets[e] .. [e+1].
struct MoePermutation {
    std::vector<int32_t> slot, token_of;
    std::vector<int64_t> offsets, counts;
};
inline void moe_permute_plan(MoePermutation& p, const int32_t* chosen, int T, int K, int N) {
    DSV3_PROFILE_KERNEL();
    p.counts.assign(size_t(N), 0);
    for (int64_t i = 0; i < int64_t(T) * K; ++i) p.counts[size_t(chosen[i])]++;
    p.offsets.assign(size_t(N) + 1, 0);
    std::partial_sum(p.counts.begin(), p.counts.end(), p.offsets.begin() + 1);
    std::vector<int64_t> cursor(p.offsets.begin(), p.offsets.end() - 1);
    p.slot.resize(size_t(T) * K);
    p.token_of.resize(size_t(T) * K);
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            int64_t row = cursor[size_t(chosen[t * K + k])]++;
            p.slot[size_t(t) * K + k] = int32_t(row);
            p.token_of[size_t(row)] = t;
        }
}
// xe[row] = x[token_of[row]]        x: [T, d], xe: [T·K, d]
inline void moe_permute_forward(float* xe, const float* x, const MoePermutation& p, int d) {
    DSV3_PROFILE_KERNEL();
    parallel_for(int64_t(p.token_of.size()), [&](int64_t r) {
        std::memcpy(xe + r * d, x + int64_t(p.token_of[size_t(r)]) * d, sizeof(float) * size_t(d));
    });
}
// dx[t] += Σ_k dxe[slot[t,k]]  (k in order: deterministic)
inline void moe_permute_backward(float* dx, const float* dxe, const MoePermutation& p, int T, int K, int d) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        for (int k = 0; k < K; ++k) {
            const float* src = dxe + int64_t(p.slot[size_t(t) * K + k]) * d;
            for (int i = 0; i < d; ++i) dx[t * d + i] += src[i];
        }
    });
}
// y[t] += Σ_k gates[t,k] · ye[slot[t,k]]      ye: [T·K, d]; y: [T, d]
inline void moe_unpermute_forward(float* y, const float* ye, const float* gates, const MoePermutation& p, int T, int K,
                                  int d) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        for (int k = 0; k < K; ++k) {
            const float g = gates[t * K + k];
            const float* src = ye + int64_t(p.slot[size_t(t) * K + k]) * d;
            for (int i = 0; i < d; ++i) y[t * d + i] += g * src[i];
        }
    });
}
// dye[slot] = gates · dy[t] (OVERWRITES dye: each slot has one source, no zeroing);  dgates[t,k] += dy[t] · ye[slot]
inline void moe_unpermute_backward(float* dye, float* dgates, const float* dy, const float* ye, const float* gates,
                                   const MoePermutation& p, int T, int K, int d) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        for (int k = 0; k < K; ++k) {
            const int64_t row = p.slot[size_t(t) * K + k];
            const float g = gates[t * K + k];
            float dot = 0;
            for (int i = 0; i < d; ++i) {
                dye[row * d + i] = g * dy[t * d + i];
                dot += dy[t * d + i] * ye[row * d + i];
            }
            dgates[t * K + k] += dot;
        }
    });
}
// The experts' GEMMs, grouped: one call runs one projection of a layer's experts. Rows offsets[g] .. offsets[g+1] of x
// (expert-contiguous) go through weight g at W + g·w_stride ([out, in]; an expert's gate, up and down are stored
// together, so a projection is evenly strided). Here a loop over matmul; on the GPU one launch over all experts' tiles,
// where a GEMM per expert would be launch overhead. offsets: [groups + 1], host memory, from 0, non-decreasing.
inline void check_group_offsets(const char* who, const int64_t* offsets, int groups, int in, int out) {
    if (groups < 0 || in < 0 || out < 0) fail(who, ": negative size groups=", groups, " in=", in, " out=", out);
    if (offsets[0] != 0) fail(who, ": offsets[0] must be 0, found ", offsets[0]);
    for (int g = 0; g < groups; ++g)
        if (offsets[g + 1] < offsets[g])
            fail(who, ": offsets must not decrease, found offsets[", g, "]=", offsets[g], " > offsets[", g + 1, "]=",
                 offsets[g + 1]);
}
//   y[rows_g, out] = x[rows_g, in] · W_gᵀ      (overwrites y)
inline void grouped_matmul_forward(float* y, const float* x, const float* W, int64_t w_stride, const int64_t* offsets,
                                   int groups, int in, int out) {
    DSV3_PROFILE_KERNEL();
    check_group_offsets("grouped_matmul_forward", offsets, groups, in, out);
    for (int g = 0; g < groups; ++g) {
        const int64_t begin = offsets[g], rows = offsets[g + 1] - begin;
        if (rows > 0) matmul_forward(y + begin * out, x + begin * in, W + g * w_stride, int(rows), in, out);
    }
}
//   dx[rows_g, in] += dy[rows_g, out] · W_g;   dW_g += dy[rows_g, out]ᵀ · x[rows_g, in]   (dW_g at dW + g·w_stride)
inline void grouped_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                                    int64_t w_stride, const int64_t* offsets, int groups, int in, int out) {
    DSV3_PROFILE_KERNEL();
    check_group_offsets("grouped_matmul_backward", offsets, groups, in, out);
    for (int g = 0; g < groups; ++g) {
        const int64_t begin = offsets[g], rows = offsets[g + 1] - begin;
        if (rows > 0)
            matmul_backward(dx + begin * in, dW + g * w_stride, dy + begin * out, x + begin * in, W + g * w_stride,
                            int(rows), in, out);
    }
}

// --- 3.11 AdamW (Loshchilov & Hutter 2019) ------------------------------------------------------------------------
// m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  p ← p − lr·( m̂/(√v̂ + ε) + wd·p ), m̂, v̂ bias-corrected by step.
// g is taken times grad_scale (6.2's clipping factor, saving a pass); bf16_states: m, v stored rounded to BF16 (6.2).
constexpr int64_t kElementwiseWork = 8;  // parallel_for's work_per_item of the element-wise kernels: 4096 go parallel
inline void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                         float eps, float weight_decay, int step, float grad_scale = 1.0f, bool bf16_states = false) {
    DSV3_PROFILE_KERNEL();
    const float c1 = 1.0f / (1.0f - std::pow(beta1, float(step))), c2 = 1.0f / (1.0f - std::pow(beta2, float(step)));
    auto update = [&](auto round) {  // round: the moments' storage, BF16 or FP32 (a branch outside the loop vectorizes)
        parallel_for(n, [&](int64_t i) {
            const float gi = g[i] * grad_scale;
            const float mi = beta1 * m[i] + (1 - beta1) * gi, vi = beta2 * v[i] + (1 - beta2) * gi * gi;
            p[i] -= lr * (mi * c1 / (std::sqrt(vi * c2) + eps) + weight_decay * p[i]);
            m[i] = round(mi), v[i] = round(vi);
        }, kElementwiseWork);
    };
    if (bf16_states) update([](float x) { return bf16_round(x); });
    else update([](float x) { return x; });
}

// --- 3.12 the model's plumbing: copies, concatenations, residual adds, the optimizer's reductions --------------------
// The few fixed patterns in which section 5 moves data between kernels, each a named kernel in every backend: the
// model never touches an array element itself, and runs unchanged on a GPU.
inline void fill_zero(float* x, int64_t n) { // x = 0
    DSV3_PROFILE_KERNEL();
    std::memset(x, 0, sizeof(float) * size_t(n));
}
inline void copy_values(float* y, const float* x, int64_t n) { // y = x
    DSV3_PROFILE_KERNEL();
    std::memcpy(y, x, sizeof(float) * size_t(n));
}
// y += x: the residual connections, and gradients that meet at a fork.
inline void add_inplace(float* y, const float* x, int64_t n) {
    DSV3_PROFILE_KERNEL();
    parallel_for(n, [&](int64_t i) { y[i] += x[i]; }, kElementwiseWork);
}
inline void scale_inplace(float* x, int64_t n, float s) {  // x *= s (gradient clipping)
    DSV3_PROFILE_KERNEL();
    parallel_for(n, [&](int64_t i) { x[i] *= s; }, kElementwiseWork);
}
inline double sum_of_squares(const float* x, int64_t n) {  // Σ x², in double, in a fixed order
    DSV3_PROFILE_KERNEL();
    return parallel_sum(n, [&](int64_t i) { return double(x[i]) * x[i]; });
}
// Row copies by an index list (rows: backend memory), for expert parallelism's send and receive buffers (9.4):
// gather_rows: dst[i] = src[rows[i]];  scatter_rows: dst[rows[i]] = src[i];  i < n, rows of d floats.
inline void gather_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int d) {
    DSV3_PROFILE_KERNEL();
    parallel_for(n, [&](int64_t i) { std::memcpy(dst + i * d, src + int64_t(rows[i]) * d, sizeof(float) * d); });
}
inline void scatter_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int d) {
    DSV3_PROFILE_KERNEL();
    parallel_for(n, [&](int64_t i) { std::memcpy(dst + int64_t(rows[i]) * d, src + i * d, sizeof(float) * d); });
}
// out[t] = [a[t] ; b[t]]     a: [T, da], b: [T, db], out: [T, da + db]   (split_columns is its backward, and back)
inline void concat_columns(float* out, const float* a, const float* b, int T, int da, int db) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        std::memcpy(out + t * (da + db), a + t * da, sizeof(float) * size_t(da));
        std::memcpy(out + t * (da + db) + da, b + t * db, sizeof(float) * size_t(db));
    });
}
inline void split_columns(float* a, float* b, const float* in, int T, int da, int db) {  // [a[t] ; b[t]] = in[t]
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        std::memcpy(a + t * da, in + t * (da + db), sizeof(float) * size_t(da));
        std::memcpy(b + t * db, in + t * (da + db) + da, sizeof(float) * size_t(db));
    });
}
// MLA's per-head keys and values [V3 eqs. 4-5]: kv: [T, H, d_h + d_v] (W^UKV c^KV), k_rope: [T, d_h^R] shared by all
// heads  ->  k: [T, H, d_h + d_h^R] = [k^C ; k^R], v: [T, H, d_v].
inline void mla_keys_values_forward(float* k, float* v, const float* kv, const float* k_rope, int T, int H, int dh,
                                    int dr, int dv) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        for (int h = 0; h < H; ++h) {
            const float* src = kv + (t * H + h) * (dh + dv);
            float* kh = k + (t * H + h) * (dh + dr);
            std::memcpy(kh, src, sizeof(float) * size_t(dh));
            std::memcpy(kh + dh, k_rope + t * dr, sizeof(float) * size_t(dr));
            std::memcpy(v + (t * H + h) * dv, src + dh, sizeof(float) * size_t(dv));
        }
    });
}
// dkv = [dk^C ; dv] per head (overwritten); dk_rope += Σ_h dk^R_h (the shared key sums its heads' gradients).
inline void mla_keys_values_backward(float* dkv, float* dk_rope, const float* dk, const float* dv, int T, int H,
                                     int dh, int dr, int dv_) {
    DSV3_PROFILE_KERNEL();
    parallel_for(T, [&](int64_t t) {
        for (int h = 0; h < H; ++h) {
            float* dst = dkv + (t * H + h) * (dh + dv_);
            const float* dkh = dk + (t * H + h) * (dh + dr);
            std::memcpy(dst, dkh, sizeof(float) * size_t(dh));
            std::memcpy(dst + dh, dv + (t * H + h) * dv_, sizeof(float) * size_t(dv_));
            for (int i = 0; i < dr; ++i) dk_rope[t * dr + i] += dkh[dh + i];
        }
    });
}

// --- 3.13 the backend: where the model's kernels and buffers come from -------------------------------------------
// Sections 5 and 6 are written once, against `backend`: they call backend::kernel(...) and keep parameters, gradients,
// AdamW's moments and activations in backend::Buffer and backend::Arena, by default this header's (host memory). With
// DSV3_BACKEND_CUDA defined before the include they are cuda/kernels.cuh's: the same names and parameters on the device
// (`make cuda`). Through the calls below token ids go down; losses, the routing plan and bias come back.
template <class T> using Buffer = std::vector<T>;
constexpr bool host_memory = true;  // false on a GPU backend: model.params etc. are device pointers
template <class T> void upload(Buffer<T>& dst, const std::vector<T>& host) { dst = host; }
template <class T> std::vector<T> download(const Buffer<T>& src) { return src; }
template <class T> void to_device(T* dst, const T* host, size_t n) { std::copy(host, host + n, dst); }
template <class T> void to_host(T* host, const T* src, size_t n) { std::copy(src, src + n, host); }
inline const MoePermutation& host_plan(const MoePermutation& p) { return p; }  // slot, token_of, offsets, counts
inline void synchronize() {}  // waits for queued work (the GPU's); the CPU's kernels have finished when they return
}  // namespace dsv3
#if defined(DSV3_BACKEND_CUDA)
#include "cuda/kernels.cuh"
namespace dsv3 { namespace backend = ::dsv3::cuda; }
#else
namespace dsv3 { namespace backend = ::dsv3; }
#endif
namespace dsv3 {

// =====================================================================================================================
// 4. PARAMETERS: ONE FLAT BUFFER, NAMED VIEWS
// =====================================================================================================================
// The parameters live in one float buffer, the gradients and AdamW's two moments in others of the same layout; modules
// store offsets. The optimizer, clipping, checkpoints, the all-reduce work on flat memory; tensors keep their HF names.
enum class ParamKind {
    matrix,     // linear weights and the embedding: initialised N(0, init_std²), weight decay applies
    gain,       // RMSNorm gains: initialised to 1, no weight decay
    routing_bias// e_score_correction_bias: no gradient; updated by the loss-free balancing rule [V3 §2.1.2]
};
struct ParamEntry {
    std::string name;              // Hugging Face name, e.g. "model.layers.3.self_attn.kv_b_proj.weight"
    std::vector<int64_t> shape;    // [out, in] for linears
    size_t offset = 0, size = 0;   // where it lives in the flat buffer, and how many floats
    ParamKind kind = ParamKind::matrix;
    int mtp_module = -1;           // -1: main model; k-1: the k-th MTP module
    bool routed_expert = false;    // a routed expert's weight (not activated for every token)
};

// A module holds offsets: data = params.data() + offset, gradient = grads.data() + offset.
struct Linear {  // weight [out, in]: y = x Wᵀ
    size_t w = 0;
    int out = 0, in = 0;
    bool fp8 = true;  // in FP8 training, its three GEMMs run in FP8; false for the output head and the router [V3 §3.3.1]
};
struct Norm { size_t g = 0; int dim = 0; };            // gain [dim]
struct Ffn { Linear gate, up, down; };                 // SwiGLU: down(silu(gate x) ⊙ up x)
struct MLA {  // Multi-head Latent Attention [V3 §2.1.1, eqs. 1-11]
    Linear q_a, q_b;  // W^DQ [q_lora, d] and W^UQ [H·(d_h+d_h^R), q_lora]  (q_lora_rank > 0)
    Linear q;         // W^Q  [H·(d_h+d_h^R), d]                              (q_lora_rank == 0)
    Norm q_norm;      // RMSNorm on c^Q
    Linear kv_a;      // [W^DKV; W^KR]: [d_c + d_h^R, d]  ("kv_a_proj_with_mqa")
    Norm kv_norm;     // RMSNorm on c^KV
    Linear kv_b;      // [W^UK; W^UV] per head: [H·(d_h + d_v), d_c]
    Linear o;         // W^O [d, H·d_v]
};
struct MoE {                                           // DeepSeekMoE [V3 eqs. 12-16]
    Linear router;                // e_i as rows: [N_r, d]  ("mlp.gate.weight")
    size_t bias = 0;              // b_i: [N_r]  ("mlp.gate.e_score_correction_bias")
    std::vector<Ffn> experts;     // N_r routed experts of width moe_inter_dim
    size_t expert_stride = 0;     // floats from one expert's weights to the next's (gate, up, down stored together)
    Ffn shared;                   // the N_s shared experts as one SwiGLU of width N_s·moe_inter_dim
    bool has_shared = false;
};
struct Block {
    Norm attn_norm, ffn_norm;     // "input_layernorm", "post_attention_layernorm"
    MLA attn;
    bool is_moe = false;
    Ffn ffn;                      // dense layers
    MoE moe;                      // MoE layers
};
struct MtpModule {                                     // [V3 §2.2, eq. 21-23]
    Norm enorm, hnorm;            // RMSNorm of the next token's embedding, and of the previous depth's hidden state
    Linear eh_proj;               // M_k: [d, 2d], input [enorm(emb) ; hnorm(h)] (embedding first, as stored)
    Block block;                  // TRM_k
    Norm norm;                    // "shared_head.norm": the final norm before the shared output head
};
struct ParamLayout {
    std::vector<ParamEntry> entries;
    size_t total = 0;
    size_t embed = 0;             // [vocab, d]  "model.embed_tokens.weight"
    std::vector<Block> blocks;
    Norm final_norm;              // "model.norm.weight"
    Linear head;                  // [vocab, d]  "lm_head.weight" (not tied to the embedding)
    std::vector<MtpModule> mtp;
    const ParamEntry& find(const std::string& name) const {
        for (const ParamEntry& e : entries)
            if (e.name == name) return e;
        fail("parameter \"", name, "\": no such tensor in this config's layout");
    }
};

// Builds the layout: names, shapes and offsets, in the order of the Hugging Face checkpoint.
inline ParamLayout param_layout(const Config& c) {
    c.validate();
    ParamLayout L;
    int mtp_index = -1;
    bool in_expert = false;
    auto add = [&](const std::string& name, std::vector<int64_t> shape, ParamKind kind) {
        const size_t size = std::accumulate(shape.begin(), shape.end(), size_t(1), std::multiplies<>());
        L.entries.push_back(ParamEntry{name, std::move(shape), L.total, size, kind, mtp_index, in_expert});
        L.total += size;
        return L.entries.back().offset;
    };
    auto linear = [&](const std::string& name, int out, int in) {
        return Linear{add(name + ".weight", {out, in}, ParamKind::matrix), out, in};
    };
    auto norm = [&](const std::string& name, int dim) { return Norm{add(name + ".weight", {dim}, ParamKind::gain), dim}; };
    auto ffn = [&](const std::string& p, int width) {  // gate, up, down in this order: braces evaluate left to right
        return Ffn{linear(p + ".gate_proj", width, c.dim), linear(p + ".up_proj", width, c.dim),
                   linear(p + ".down_proj", c.dim, width)};
    };
    const int H = c.n_heads, dqk = c.qk_head_dim();
    auto block = [&](int layer) {
        const std::string p = "model.layers." + std::to_string(layer);
        Block b;
        b.attn_norm = norm(p + ".input_layernorm", c.dim);
        MLA& a = b.attn;
        if (c.q_lora_rank > 0) {
            a.q_a = linear(p + ".self_attn.q_a_proj", c.q_lora_rank, c.dim);
            a.q_norm = norm(p + ".self_attn.q_a_layernorm", c.q_lora_rank);
            a.q_b = linear(p + ".self_attn.q_b_proj", H * dqk, c.q_lora_rank);
        } else {
            a.q = linear(p + ".self_attn.q_proj", H * dqk, c.dim);
        }
        a.kv_a = linear(p + ".self_attn.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.dim);
        a.kv_norm = norm(p + ".self_attn.kv_a_layernorm", c.kv_lora_rank);
        a.kv_b = linear(p + ".self_attn.kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
        a.o = linear(p + ".self_attn.o_proj", c.dim, H * c.v_head_dim);
        b.ffn_norm = norm(p + ".post_attention_layernorm", c.dim);
        b.is_moe = c.is_moe_layer(layer);
        if (!b.is_moe) {
            b.ffn = ffn(p + ".mlp", c.inter_dim);
        } else {
            MoE& m = b.moe;
            m.router = linear(p + ".mlp.gate", c.n_routed_experts, c.dim);
            m.router.fp8 = false;
            m.bias = add(p + ".mlp.gate.e_score_correction_bias", {c.n_routed_experts}, ParamKind::routing_bias);
            const size_t matrix = size_t(c.moe_inter_dim) * c.dim;  // the grouped GEMMs (3.10) rely on this stride
            m.expert_stride = 3 * matrix;
            in_expert = true;
            for (int e = 0; e < c.n_routed_experts; ++e) {
                const Ffn& f = m.experts.emplace_back(ffn(p + ".mlp.experts." + std::to_string(e), c.moe_inter_dim));
                const size_t at = m.experts[0].gate.w + size_t(e) * m.expert_stride;
                if (f.gate.w != at || f.up.w != at + matrix || f.down.w != at + 2 * matrix)
                    fail("param_layout: ", p, ".mlp.experts.", e, " is not stored where the grouped GEMMs expect it");
            }
            in_expert = false;
            m.has_shared = c.n_shared_experts > 0;
            if (m.has_shared) m.shared = ffn(p + ".mlp.shared_experts", c.n_shared_experts * c.moe_inter_dim);
        }
        return b;
    };
    L.embed = add("model.embed_tokens.weight", {c.vocab_size, c.dim}, ParamKind::matrix);
    for (int l = 0; l < c.n_layers; ++l) L.blocks.push_back(block(l));
    L.final_norm = norm("model.norm", c.dim);
    L.head = linear("lm_head", c.vocab_size, c.dim);
    L.head.fp8 = false;
    for (int k = 0; k < c.n_mtp_depth; ++k) {  // stored as the layers after the main ones: model.layers.{n_layers+k}
        mtp_index = k;
        const std::string p = "model.layers." + std::to_string(c.n_layers + k);
        L.mtp.push_back({norm(p + ".enorm", c.dim), norm(p + ".hnorm", c.dim), linear(p + ".eh_proj", c.dim, 2 * c.dim),
                         block(c.n_layers + k), norm(p + ".shared_head.norm", c.dim)});  // in this order (as ffn)
    }
    return L;
}

inline ParamCounts count_parameters(const Config& c) {
    ParamLayout L = param_layout(c);
    ParamCounts n;
    int64_t routed_main = 0;
    for (const ParamEntry& e : L.entries) {
        if (e.mtp_module >= 0) { n.mtp += int64_t(e.size); continue; }
        n.total += int64_t(e.size);
        if (e.routed_expert) routed_main += int64_t(e.size);
    }
    // Each token uses K of the N_r routed experts in every MoE layer: count K experts' worth instead of N_r.
    n.activated = n.total - routed_main;
    if (c.n_routed_experts > 0) n.activated += routed_main / c.n_routed_experts * c.n_activated_experts;
    n.embedding = int64_t(c.vocab_size) * c.dim;
    // DeepSeek's checkpoint stores, for each MTP module, its own copy of the embedding and of the output head.
    n.mtp_in_checkpoint = n.mtp + int64_t(c.n_mtp_depth) * 2 * int64_t(c.vocab_size) * c.dim;
    return n;
}

// =====================================================================================================================
// 5. MODULES: MLA, FFN, MoE, BLOCK, MTP, MODEL
// =====================================================================================================================
// Each module of the paper is a forward/backward pair of Model members named after it (mla_forward, ...), composing
// section 3's kernels on section 4's parameters; a forward saves what its backward needs in a cache (arena pointers).

enum class BalanceLoss { none, sequence_wise, expert_level };

// What the training loss is made of [V3 §2.1.2 and §2.2]: L = L_main + (λ/D) Σ_k L_MTP^k + balance loss.
struct LossOptions {
    bool with_mtp = true;            // inference drops the MTP modules
    float mtp_lambda = 0.3f;         // λ: 0.3 for V3's first 10T tokens, then 0.1
    BalanceLoss balance = BalanceLoss::none;
    float balance_alpha = 0.0001f;   // α (V3: 0.0001 for the sequence-wise loss)
};
struct Losses {
    double main = 0;                 // next-token cross-entropy, nats per token
    std::vector<double> mtp;         // per depth k: cross-entropy of token t+k+1
    double balance = 0;              // sum over MoE layers of the balance loss
    double total = 0;                // what backward() differentiates
};

struct MlaCache {
    const float* x = nullptr;        // [BT, d]  the block's normalised input
    float *cq = nullptr, *cq_rstd = nullptr, *cq_n = nullptr;  // [BT, d_c'], [BT], [BT, d_c']   (query LoRA)
    float* q = nullptr;              // [BT, H, d_h + d_h^R]  queries, RoPE applied to the last d_h^R of each head
    float *ckv_raw = nullptr, *ckv_rstd = nullptr, *ckv = nullptr;  // [BT, d_c]: c^KV before/after its RMSNorm
    float* k_rope = nullptr;         // [BT, d_h^R]  k^R: RoPE(W^KR h), ONE key part shared by all heads
    float* kv = nullptr;             // [BT, H, d_h + d_v]  W^UKV c^KV
    float *k = nullptr, *v = nullptr;// [BT, H, d_h + d_h^R], [BT, H, d_v]
    float* probs = nullptr;          // [B, H, T, T] (what attention_forward saves: attention_saved_floats)
    float* o = nullptr;              // [BT, H·d_v]
};
struct FfnCache {
    const float* x = nullptr;  int ld = 0;               // x: [n, d]; gate and up rows ld apart (section 5.2)
    float *gate = nullptr, *up = nullptr, *h = nullptr;  // [n, ld], [n, ld], [n, width]
};
struct MoeCache {
    const float* x = nullptr;        // [BT, d]
    float *logits = nullptr, *scores = nullptr, *gates = nullptr;  // [BT, N_r], [BT, N_r], [BT, K]
    backend::Buffer<int32_t> chosen; // [BT, K]
    backend::MoePermutation perm;    // the plan is made on the host: backend::host_plan(perm)
    float *xe = nullptr, *ye = nullptr;  // [BT·K, d] tokens in expert order, and the experts' outputs
    FfnCache experts;                // the routed experts, over all of c.xe's rows
    FfnCache shared;
    std::vector<int64_t> load;       // [N_r] tokens routed to each expert in this batch
};
struct BlockCache {
    const float* h_in = nullptr;     // [BT, d]
    float *xn1 = nullptr, *rstd1 = nullptr, *h_mid = nullptr, *xn2 = nullptr, *rstd2 = nullptr, *h_out = nullptr;
    MlaCache attn;
    FfnCache ffn;
    MoeCache moe;
};
struct MtpCache {
    backend::Buffer<int32_t> emb_tokens, targets;  // [BT]: t_{i+k} and t_{i+k+1} (kIgnore past the end)
    const float* h_prev = nullptr;   // [BT, d]  h^{k-1}
    float *emb = nullptr, *en = nullptr, *en_rstd = nullptr, *hn = nullptr, *hn_rstd = nullptr;
    float *cat = nullptr, *h_proj = nullptr;   // [BT, 2d], [BT, d]
    BlockCache block;
    float *out_n = nullptr, *out_rstd = nullptr, *logits = nullptr;
};

struct KvCache;  // section 7

// Who runs a MoE layer's routed experts (from c.xe to c.ye): by default the model, all N_r (experts_forward); expert
// parallelism (9) installs a runner sending each token to the ranks owning its experts and back [V3 §3.2].
class Model;
struct ExpertRunner {
    virtual ~ExpertRunner() = default;
    // c.x, c.chosen, c.gates, c.perm and c.xe: [n·K, d] are set; fill c.ye: [n·K, d] (rows in c.perm's order).
    virtual void forward(Model& model, const MoE& m, MoeCache& c) = 0;
    // dye: [n·K, d], c.ye's gradient; write dxe: [n·K, d] (zeroed by the caller), add the weights' into model.grads.
    virtual void backward(Model& model, const MoE& m, MoeCache& c, const float* dye, float* dxe) = 0;
};

// The model: the config, the flat buffers, the RoPE table; 5.6 composes its modules into forward() and backward().
class Model {
  public:
    // --- the model and its parameters (section 4) ---
    Config cfg;
    ParamLayout layout;
    backend::Buffer<float> params, grads;  // the two flat buffers (device memory on a GPU backend)
    RopeTable rope;

    Model(const Config& c, uint64_t seed);
    float* param_at(size_t offset) { return params.data() + offset; }  // a tensor of `layout`, by its offset
    float* grad_at(size_t offset) { return grads.data() + offset; }
    // By Hugging Face name, e.g. param("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"), and its gradient
    TensorView param(const std::string& name) {
        const ParamEntry& e = layout.find(name);
        return {param_at(e.offset), e.shape, e.name};
    }
    TensorView grad(const std::string& name) {
        const ParamEntry& e = layout.find(name);
        return {grad_at(e.offset), e.shape, e.name + " (gradient)"};
    }
    std::vector<Block*> moe_blocks();  // every MoE block: the main blocks first, then the MTP modules'

    // --- training (section 5.6; the optimizer step is section 6) ---
    // tokens: [B, T+1]: position t of row b reads token t and predicts token t+1.
    Losses forward(const int32_t* tokens, int B, int T, const LossOptions& opt = {});
    void backward();  // gradients of the last forward's total loss, written into `grads` (zeroed first)
    Losses forward_backward(const int32_t* tokens, int B, int T, const LossOptions& opt = {}) {
        Losses l = forward(tokens, B, T, opt);
        backward();
        return l;
    }
    bool reuse_routing = false;  // gradient checks: keep the last forward's expert choice fixed
    // Called by backward() with o each time every gradient at flat offsets >= o is final: the backward runs the layout
    // (forward order) in reverse, so o only falls (after each MTP module, the head, each block; 0 after the embedding,
    // which MTP also uses). Data parallelism (9.5) all-reduces a bucket once o passes below it, during the backward.
    std::function<void(size_t offset)> on_gradients_final;
    // What the last forward computed: logits [B·T, vocab] (main model, MTP module k+1), main block `layer`'s attention
    // weights [B, H, T, T], and the expert loads, one vector [N_r] per MoE block (moe_blocks() order).
    const float* logits() const { return logits_; }
    const float* mtp_logits(int k) const { return mtp_.at(size_t(k)).logits; }
    const float* attention_probs(int layer) const {  // null where the backend keeps none (the GPU's flash kernels)
        const size_t n = size_t(B_) * cfg.n_heads * T_ * T_;
        const bool kept = backend::attention_saved_floats(B_, T_, cfg.n_heads, cfg.qk_head_dim(), cfg.v_head_dim) == n;
        return kept ? blocks_.at(size_t(layer)).attn.probs : nullptr;
    }
    std::vector<std::vector<int64_t>> expert_loads() const;

    // --- inference (section 7) ---
    // Run n new tokens at the cache's next positions; logits: [n, vocab]; hidden: [n, dim] (optional) the last block's
    // output, which the MTP module reads; absorbed: attention in the latent space. All host memory on every backend.
    void decode(const int32_t* tokens, int n, KvCache& cache, float* logits, float* hidden = nullptr,
                bool absorbed = true);
    void decode_mtp(const float* h, const int32_t* next_tokens, int n, KvCache& cache, float* logits,
                    bool absorbed = true);

    // --- expert parallelism (section 9) ---
    ExpertRunner* expert_runner = nullptr;  // null: this model runs every routed expert itself
    // Routed experts first .. first+count-1 of layer m: rows offsets[i] .. offsets[i+1] of xe: [rows, d] (offsets[0]
    // = 0) through expert first+i into ye; the backward adds dxe (+=) and the weights' gradients, from dye and c.
    void experts_forward(const MoE& m, int first, int count, const int64_t* offsets, const float* xe, float* ye,
                         FfnCache& c);
    void experts_backward(const MoE& m, int first, int count, const int64_t* offsets, const float* dye, float* dxe,
                          const FfnCache& c);

  private:
    // --- the modules (section 5), named after the paper ---
    void mla_forward(MlaCache& c, const MLA& a, const float* x, float* out);                         // 5.1
    void mla_backward(const MlaCache& c, const MLA& a, const float* dout, float* dx);
    void ffn_forward(FfnCache& c, const Ffn& f, const float* x, float* out, int n);                  // 5.2
    void ffn_backward(const FfnCache& c, const Ffn& f, const float* dout, float* dx, int n);
    template <class Proj>
    void swiglu_ffn_forward(FfnCache& c, const Ffn& f, const float* x, float* out, int64_t rows, const Proj& proj);
    template <class Proj>
    void swiglu_ffn_backward(const FfnCache& c, const Ffn& f, const float* dout, float* dx, int64_t rows,
                             const Proj& proj);
    void gate_forward(MoeCache& c, const MoE& m, const float* x, double* balance);                   // 5.3
    void gate_backward(const MoeCache& c, const MoE& m, const float* dgates, float* dx);
    void moe_forward(MoeCache& c, const MoE& m, const float* x, float* out, double* balance);
    void moe_backward(MoeCache& c, const MoE& m, const float* dout, float* dx);
    void block_forward(BlockCache& c, const Block& b, const float* h_in, double* balance);          // 5.4
    void block_backward(BlockCache& c, const Block& b, const float* dh_out, float* dh_in);
    double mtp_forward(MtpCache& c, const MtpModule& m, int k, const int32_t* tokens, const float* h_prev,
                       double* balance);                                                             // 5.5
    void mtp_backward(MtpCache& c, const MtpModule& m, int D, const float* dh_next, float* dh_prev);
    void begin_decode(int n, const KvCache& cache, int layers, const char* who);  // decoding (section 7)
    void mla_decode(const MLA& a, const float* x, float* out, int n, KvCache& cache, int layer, bool absorbed);
    void block_decode(BlockCache& c, const Block& b, const float* h_in, float* h_out, int n, KvCache& cache,
                      int layer, bool absorbed);

    // --- every linear layer and RMSNorm goes through these ---
    // In FP8 training a linear layer's GEMMs (Fprop, Dgrad, Wgrad) run on section 8's FP8 layer; not the head, router.
    bool fp8(const Linear& w) const { return cfg.fp8_training && w.fp8; }
    void linear_forward(float* y, const float* x, const Linear& w, int n) {
        if (fp8(w)) backend::fp8_matmul_forward(y, x, param_at(w.w), n, w.in, w.out);
        else backend::matmul_forward(y, x, param_at(w.w), n, w.in, w.out);
    }
    void linear_backward(float* dx, const float* dy, const float* x, const Linear& w, int n) {
        if (fp8(w)) backend::fp8_matmul_backward(dx, grad_at(w.w), dy, x, param_at(w.w), n, w.in, w.out);
        else backend::matmul_backward(dx, grad_at(w.w), dy, x, param_at(w.w), n, w.in, w.out);
    }
    void norm_forward(float* y, float* rstd, const float* x, const Norm& n, int rows) {
        backend::rmsnorm_forward(y, rstd, x, param_at(n.g), rows, n.dim, cfg.rms_norm_eps);
    }
    void norm_backward(float* dx, const float* dy, const float* x, const float* rstd, const Norm& n, int rows) {
        backend::rmsnorm_backward(dx, grad_at(n.g), dy, x, param_at(n.g), rstd, rows, n.dim);
    }
    // The same into new arena arrays: linear(x, w, n) = x Wᵀ [n, w.out]; norm(x, g, n, rstd) = RMSNorm(x) [n, g.dim]
    float* linear(const float* x, const Linear& w, int n) {
        float* y = arena_.take(size_t(n) * w.out);
        linear_forward(y, x, w, n);
        return y;
    }
    float* norm(const float* x, const Norm& g, int n, float*& rstd) {
        float* y = arena_.take(size_t(n) * g.dim);
        rstd = arena_.take(size_t(n));
        norm_forward(y, rstd, x, g, n);
        return y;
    }

    // --- the last forward pass ---
    backend::Arena arena_;
    int B_ = 0, T_ = 0;
    LossOptions opt_;
    backend::Buffer<int32_t> inputs_, targets_;  // [BT]
    float *h0_ = nullptr, *hn_ = nullptr, *final_rstd_ = nullptr, *logits_ = nullptr;
    std::vector<BlockCache> blocks_;
    std::vector<MtpCache> mtp_;
    bool has_forward_ = false;
    int BT() const { return B_ * T_; }
};

inline Model::Model(const Config& c, uint64_t seed) : cfg(c), layout(param_layout(c)) {
    // Parameters, gradients, AdamW's moments (16 bytes a parameter) and the RoPE table, checked against the memory
    // budget before anything is allocated: a 671B model on a laptop is an error that says so.
    if (backend::host_memory)
        require_memory("Model: " + std::to_string(layout.total) + " parameters (parameters, gradients, AdamW moments)"
                       " and the RoPE table of " + std::to_string(cfg.max_seq_len) + " positions",
                       16.0 * double(layout.total) + 8.0 * double(cfg.max_seq_len) * (cfg.qk_rope_head_dim / 2));
    std::vector<float> init(layout.total, 0.0f);
    rope = make_rope_table(cfg, cfg.max_seq_len);
    parallel_for(int64_t(layout.entries.size()), [&](int64_t i) {  // each tensor from its own stream: any order
        const ParamEntry& e = layout.entries[size_t(i)];
        Rng rng = Rng(seed).fork(i);
        float* p = init.data() + e.offset;
        for (size_t j = 0; j < e.size; ++j)
            p[j] = e.kind == ParamKind::matrix ? float(rng.normal() * cfg.init_std)
                                               : (e.kind == ParamKind::gain ? 1.0f : 0.0f);
    });
    backend::upload(params, init);
    backend::upload(grads, std::vector<float>(layout.total, 0.0f));
    blocks_.resize(layout.blocks.size());
    mtp_.resize(layout.mtp.size());
}
inline std::vector<Block*> Model::moe_blocks() {
    std::vector<Block*> out;
    for (Block& b : layout.blocks) if (b.is_moe) out.push_back(&b);
    for (MtpModule& m : layout.mtp) if (m.block.is_moe) out.push_back(&m.block);
    return out;
}
inline std::vector<std::vector<int64_t>> Model::expert_loads() const {
    std::vector<std::vector<int64_t>> loads;
    for (size_t l = 0; l < blocks_.size(); ++l) if (layout.blocks[l].is_moe) loads.push_back(blocks_[l].moe.load);
    for (size_t k = 0; k < mtp_.size(); ++k) if (layout.mtp[k].block.is_moe) loads.push_back(mtp_[k].block.moe.load);
    return loads;
}

// --- 5.1 Multi-head Latent Attention [V3 §2.1.1] -----------------------------------------------------------------
// Keys and values are compressed jointly into a small latent c^KV (eq. 1), from which per-head keys and values are
// up-projected (eqs. 2, 5); only c^KV and the decoupled RoPE key k^R (eq. 3, shared by all heads) would be cached
// at inference. Queries get a low-rank compression too (eqs. 6-8), which saves activation memory in training.
inline void Model::mla_forward(MlaCache& c, const MLA& a, const float* x, float* out) {
    DSV3_PROFILE_MODULE("MLA forward");
    const int n = BT(), H = cfg.n_heads, dh = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim,
              dqk = cfg.qk_head_dim(), dv = cfg.v_head_dim, dc = cfg.kv_lora_rank;
    c.x = x;
    // queries: q = W^UQ RMSNorm(W^DQ h)  (eqs. 6-7), then RoPE on each head's last d_h^R values (eq. 8)
    if (cfg.q_lora_rank > 0) {
        c.cq = linear(x, a.q_a, n);
        c.cq_n = norm(c.cq, a.q_norm, n, c.cq_rstd);
        c.q = linear(c.cq_n, a.q_b, n);
    } else {
        c.q = linear(x, a.q, n);
    }
    backend::rope_forward(c.q, n, H * dqk, dh, H, dqk, 0, T_, rope);
    // keys and values: [c^KV ; k^R_raw] = [W^DKV ; W^KR] h  (eqs. 1, 3), c^KV normalised, k^R rotated
    const float* kv_a = linear(x, a.kv_a, n);
    c.ckv_raw = arena_.take(size_t(n) * dc);
    c.k_rope = arena_.take(size_t(n) * dr);
    backend::split_columns(c.ckv_raw, c.k_rope, kv_a, n, dc, dr);
    c.ckv = norm(c.ckv_raw, a.kv_norm, n, c.ckv_rstd);
    backend::rope_forward(c.k_rope, n, dr, 0, 1, dr, 0, T_, rope);
    // per-head [k^C ; v] = W^UKV c^KV (eqs. 2, 5); k = [k^C ; k^R] (eq. 4)
    c.kv = linear(c.ckv, a.kv_b, n);
    c.k = arena_.take(size_t(n) * H * dqk);
    c.v = arena_.take(size_t(n) * H * dv);
    backend::mla_keys_values_forward(c.k, c.v, c.kv, c.k_rope, n, H, dh, dr, dv);
    // o = softmax(q kᵀ · scale) v per head (eqs. 9-10), u = W^O o (eq. 11)
    c.probs = arena_.take(backend::attention_saved_floats(B_, T_, H, dqk, dv));
    c.o = arena_.take(size_t(n) * H * dv);
    backend::attention_forward(c.o, c.probs, c.q, c.k, c.v, B_, T_, H, dqk, dv, attention_scale(cfg));
    linear_forward(out, c.o, a.o, n);
}

inline void Model::mla_backward(const MlaCache& c, const MLA& a, const float* dout, float* dx) {
    DSV3_PROFILE_MODULE("MLA backward");
    const int n = BT(), H = cfg.n_heads, dh = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim,
              dqk = cfg.qk_head_dim(), dv = cfg.v_head_dim, dc = cfg.kv_lora_rank;
    auto mark = arena_.mark();
    float* d_o = arena_.zeros(size_t(n) * H * dv);
    linear_backward(d_o, dout, c.o, a.o, n);
    float* dq = arena_.zeros(size_t(n) * H * dqk);
    float* dk = arena_.zeros(size_t(n) * H * dqk);
    float* dvv = arena_.zeros(size_t(n) * H * dv);
    backend::attention_backward(dq, dk, dvv, d_o, c.o, c.probs, c.q, c.k, c.v, B_, T_, H, dqk, dv,
                                attention_scale(cfg));
    // un-assemble k and v: d(kv) per head, and the shared rope key sums its heads' gradients
    float* dkv = arena_.take(size_t(n) * H * (dh + dv));
    float* dkv_a = arena_.take(size_t(n) * (dc + dr));
    float* dk_rope = arena_.zeros(size_t(n) * dr);
    backend::mla_keys_values_backward(dkv, dk_rope, dk, dvv, n, H, dh, dr, dv);
    float* dckv = arena_.zeros(size_t(n) * dc);
    linear_backward(dckv, dkv, c.ckv, a.kv_b, n);
    backend::rope_backward(dk_rope, n, dr, 0, 1, dr, 0, T_, rope);
    float* dckv_raw = arena_.zeros(size_t(n) * dc);
    norm_backward(dckv_raw, dckv, c.ckv_raw, c.ckv_rstd, a.kv_norm, n);
    backend::concat_columns(dkv_a, dckv_raw, dk_rope, n, dc, dr);
    linear_backward(dx, dkv_a, c.x, a.kv_a, n);
    backend::rope_backward(dq, n, H * dqk, dh, H, dqk, 0, T_, rope);
    if (cfg.q_lora_rank > 0) {
        float* dcq_n = arena_.zeros(size_t(n) * cfg.q_lora_rank);
        linear_backward(dcq_n, dq, c.cq_n, a.q_b, n);
        float* dcq = arena_.zeros(size_t(n) * cfg.q_lora_rank);
        norm_backward(dcq, dcq_n, c.cq, c.cq_rstd, a.q_norm, n);
        linear_backward(dx, dcq, c.x, a.q_a, n);
    } else {
        linear_backward(dx, dq, c.x, a.q, n);
    }
    arena_.release(mark);
}

// --- 5.2 SwiGLU feed-forward: dense layers, every expert, and the shared experts ---------------------------------
// The gate and up weights lie next to each other (section 4), so [W_gate; W_up] is one [2w, d] weight and both products
// one GEMM of width 2w (row r: gate then up, ld = 2w): x is read (on a GPU, converted to BF16) once, and dx is one
// product over K = 2w. In FP8 training only when w is a multiple of 128: then the 128×128 blocks of [W_gate; W_up] are
// each matrix's (V3 quantizes each weight in its own blocks), and so are the output gradient's 1×128 tiles.
inline Linear gate_up(const Ffn& f) {   // [gate; up] as one linear layer, or out = 0 where they are not neighbours
    Linear l = f.gate;
    l.out = f.up.w == f.gate.w + size_t(f.gate.out) * f.gate.in && f.up.in == f.gate.in ? 2 * f.gate.out : 0;
    return l;
}
// One SwiGLU over `rows` rows of x, a dense FFN's or the routed experts' (5.3): proj(y, x, w) runs projection w of f
// (or [gate; up]); in the backward proj(dx, dy, x, w) adds dx and the weight's gradient.
template <class Proj>
inline void Model::swiglu_ffn_forward(FfnCache& c, const Ffn& f, const float* x, float* out, int64_t rows,
                                      const Proj& proj) {
    const int w = f.gate.out;
    const Linear gu = gate_up(f);
    c.x = x;
    c.ld = gu.out && (!fp8(gu) || w % 128 == 0) ? 2 * w : w;   // 128: the FP8 tile (section 8)
    c.gate = arena_.take(size_t(rows) * c.ld);
    c.up = c.ld == w ? arena_.take(size_t(rows) * w) : c.gate + w;
    c.h = arena_.take(size_t(rows) * w);
    proj(c.gate, x, c.ld == w ? f.gate : gu);   // the gate, or [gate; up] in one product
    if (c.ld == w) proj(c.up, x, f.up);
    backend::swiglu_forward(c.h, c.gate, c.up, rows, w, c.ld);
    proj(out, c.h, f.down);
}
template <class Proj>
inline void Model::swiglu_ffn_backward(const FfnCache& c, const Ffn& f, const float* dout, float* dx, int64_t rows,
                                       const Proj& proj) {
    const int w = f.gate.out;
    auto mark = arena_.mark();
    float* dh = arena_.zeros(size_t(rows) * w);
    proj(dh, dout, c.h, f.down);
    float* dgate = arena_.zeros(size_t(rows) * c.ld);   // [rows, ld] like the forward's gate and up
    float* dup = c.ld == w ? arena_.zeros(size_t(rows) * w) : dgate + w;
    backend::swiglu_backward(dgate, dup, dh, c.gate, c.up, rows, w, c.ld);
    proj(dx, dgate, c.x, c.ld == w ? f.gate : gate_up(f));
    if (c.ld == w) proj(dx, dup, c.x, f.up);
    arena_.release(mark);
}
inline void Model::ffn_forward(FfnCache& c, const Ffn& f, const float* x, float* out, int n) {
    DSV3_PROFILE_MODULE("FFN forward");
    swiglu_ffn_forward(c, f, x, out, n, [&](float* y, const float* in, const Linear& w) {
        linear_forward(y, in, w, n);
    });
}
inline void Model::ffn_backward(const FfnCache& c, const Ffn& f, const float* dout, float* dx, int n) {
    DSV3_PROFILE_MODULE("FFN backward");
    swiglu_ffn_backward(c, f, dout, dx, n, [&](float* d_in, const float* dy, const float* in, const Linear& w) {
        linear_backward(d_in, dy, in, w, n);
    });
}

// --- 5.3 DeepSeekMoE [V3 §2.1.2, eq. 12]: h' = u + Σ_shared FFN_s(u) + Σ_routed g_i FFN_i(u) ----------------------
// The gate (the router, "Gate" in DeepSeek's code) [V3 eqs. 13-16]: section 3.8's kernels; the bias b (6.3) steers.
inline void Model::gate_forward(MoeCache& c, const MoE& m, const float* x, double* balance) {
    DSV3_PROFILE_MODULE("MoE gate forward");
    const int n = BT(), N = cfg.n_routed_experts, K = cfg.n_activated_experts;
    c.x = x;
    c.logits = linear(x, m.router, n);
    c.scores = arena_.take(size_t(n) * N);
    c.gates = arena_.take(size_t(n) * K);
    backend::router_scores_forward(c.scores, c.logits, n, N, cfg.score_func == "softmax");
    if (!reuse_routing || c.chosen.size() != size_t(n) * K) {
        c.chosen.resize(size_t(n) * K);
        backend::router_select(c.chosen.data(), c.scores, param_at(m.bias), n, cfg);
    }
    backend::router_gates_forward(c.gates, c.scores, c.chosen.data(), n, cfg);
    const float alpha = opt_.balance_alpha;
    if (opt_.balance == BalanceLoss::sequence_wise)
        *balance += backend::sequence_balance_loss(nullptr, c.scores, c.chosen.data(), B_, T_, cfg, alpha);
    else if (opt_.balance == BalanceLoss::expert_level)
        *balance += backend::expert_balance_loss(nullptr, c.logits, c.chosen.data(), n, cfg, alpha);
}
// gates -> scores (-> + the sequence-wise loss) -> logits (+ the expert-level loss) -> the router's weight and dx.
inline void Model::gate_backward(const MoeCache& c, const MoE& m, const float* dgates, float* dx) {
    DSV3_PROFILE_MODULE("MoE gate backward");
    const int n = BT(), N = cfg.n_routed_experts;
    auto mark = arena_.mark();
    float* dscores = arena_.zeros(size_t(n) * N);
    backend::router_gates_backward(dscores, dgates, c.scores, c.chosen.data(), n, cfg);
    if (opt_.balance == BalanceLoss::sequence_wise)
        backend::sequence_balance_loss(dscores, c.scores, c.chosen.data(), B_, T_, cfg, opt_.balance_alpha);
    float* dlogits = arena_.zeros(size_t(n) * N);
    backend::router_scores_backward(dlogits, dscores, c.scores, n, N, cfg.score_func == "softmax");
    if (opt_.balance == BalanceLoss::expert_level)
        backend::expert_balance_loss(dlogits, c.logits, c.chosen.data(), n, cfg, opt_.balance_alpha);
    linear_backward(dx, dlogits, c.x, m.router, n);
    arena_.release(mark);
}

// Route, group the tokens by expert, run the experts (here or on their ranks), add the shared experts, and scatter
// the experts' outputs back weighted by the gates.
inline void Model::moe_forward(MoeCache& c, const MoE& m, const float* x, float* out, double* balance) {
    DSV3_PROFILE_MODULE("MoE forward");
    const int n = BT(), N = cfg.n_routed_experts, K = cfg.n_activated_experts, d = cfg.dim;
    gate_forward(c, m, x, balance);
    backend::moe_permute_plan(c.perm, c.chosen.data(), n, K, N);
    c.load = backend::host_plan(c.perm).counts;
    c.xe = arena_.take(size_t(n) * K * d);
    c.ye = arena_.take(size_t(n) * K * d);
    backend::moe_permute_forward(c.xe, x, c.perm, d);
    if (expert_runner) expert_runner->forward(*this, m, c);  // expert parallelism: the experts live on other ranks
    else experts_forward(m, 0, N, backend::host_plan(c.perm).offsets.data(), c.xe, c.ye, c.experts);
    if (m.has_shared) ffn_forward(c.shared, m.shared, x, out, n);
    else backend::fill_zero(out, int64_t(n) * d);
    backend::moe_unpermute_forward(out, c.ye, c.gates, c.perm, n, K, d);
}

inline void Model::moe_backward(MoeCache& c, const MoE& m, const float* dout, float* dx) {
    DSV3_PROFILE_MODULE("MoE backward");
    const int n = BT(), N = cfg.n_routed_experts, K = cfg.n_activated_experts, d = cfg.dim;
    auto mark = arena_.mark();
    if (m.has_shared) ffn_backward(c.shared, m.shared, dout, dx, n);
    float* dye = arena_.take(size_t(n) * K * d);
    float* dgates = arena_.zeros(size_t(n) * K);
    backend::moe_unpermute_backward(dye, dgates, dout, c.ye, c.gates, c.perm, n, K, d);
    float* dxe = arena_.zeros(size_t(n) * K * d);
    if (expert_runner) expert_runner->backward(*this, m, c, dye, dxe);
    else experts_backward(m, 0, N, backend::host_plan(c.perm).offsets.data(), dye, dxe, c.experts);
    backend::moe_permute_backward(dx, dxe, c.perm, n, K, d);
    gate_backward(c, m, dgates, dx);
    arena_.release(mark);
}

// The routed experts (all N_r, or under expert parallelism a rank's own): 5.2's SwiGLU on each expert's rows, each
// projection one grouped GEMM (3.10; w is the first expert's, the others expert_stride floats on), or its FP8 twin.
inline void Model::experts_forward(const MoE& m, int first, int count, const int64_t* offsets, const float* xe,
                                   float* ye, FfnCache& c) {
    DSV3_PROFILE_MODULE("routed experts forward");
    swiglu_ffn_forward(c, m.experts[size_t(first)], xe, ye, offsets[count], [&](float* y, const float* x, Linear w) {
        (fp8(w) ? backend::fp8_grouped_matmul_forward : backend::grouped_matmul_forward)(
            y, x, param_at(w.w), int64_t(m.expert_stride), offsets, count, w.in, w.out);
    });
}
inline void Model::experts_backward(const MoE& m, int first, int count, const int64_t* offsets, const float* dye,
                                    float* dxe, const FfnCache& c) {
    DSV3_PROFILE_MODULE("routed experts backward");
    swiglu_ffn_backward(c, m.experts[size_t(first)], dye, dxe, offsets[count],
                        [&](float* dx, const float* dy, const float* x, Linear w) {
        (fp8(w) ? backend::fp8_grouped_matmul_backward : backend::grouped_matmul_backward)(
            dx, grad_at(w.w), dy, x, param_at(w.w), int64_t(m.expert_stride), offsets, count, w.in, w.out);
    });
}

// --- 5.4 the pre-norm block: h ← h + Attn(RMSNorm(h)); h ← h + FFN(RMSNorm(h)) ------------------------------------
inline void Model::block_forward(BlockCache& c, const Block& b, const float* h_in, double* balance) {
    const int n = BT(), d = cfg.dim;
    c.h_in = h_in;
    c.xn1 = norm(h_in, b.attn_norm, n, c.rstd1);
    c.h_mid = arena_.take(size_t(n) * d);
    mla_forward(c.attn, b.attn, c.xn1, c.h_mid);
    backend::add_inplace(c.h_mid, h_in, int64_t(n) * d);
    c.xn2 = norm(c.h_mid, b.ffn_norm, n, c.rstd2);
    c.h_out = arena_.take(size_t(n) * d);
    if (b.is_moe) moe_forward(c.moe, b.moe, c.xn2, c.h_out, balance);
    else ffn_forward(c.ffn, b.ffn, c.xn2, c.h_out, n);
    backend::add_inplace(c.h_out, c.h_mid, int64_t(n) * d);
}
// dh_in (+=) from dh_out.
inline void Model::block_backward(BlockCache& c, const Block& b, const float* dh_out, float* dh_in) {
    const int n = BT(), d = cfg.dim;
    auto mark = arena_.mark();
    float* dxn2 = arena_.zeros(size_t(n) * d);
    if (b.is_moe) moe_backward(c.moe, b.moe, dh_out, dxn2);
    else ffn_backward(c.ffn, b.ffn, dh_out, dxn2, n);
    float* dh_mid = arena_.take(size_t(n) * d);
    backend::copy_values(dh_mid, dh_out, int64_t(n) * d);
    norm_backward(dh_mid, dxn2, c.h_mid, c.rstd2, b.ffn_norm, n);
    float* dxn1 = arena_.zeros(size_t(n) * d);
    mla_backward(c.attn, b.attn, dh_mid, dxn1);
    backend::add_inplace(dh_in, dh_mid, int64_t(n) * d);
    norm_backward(dh_in, dxn1, c.h_in, c.rstd1, b.attn_norm, n);
    arena_.release(mark);
}

// --- 5.5 the Multi-Token Prediction module [V3 §2.2, eqs. 21-23] ----------------------------------------------------
// MTP module k (k = 1..D) at position i: h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)] (eq. 21),
// h^k = TRM_k(h'^k) (eq. 22), P^k_{i+k+1} = OutHead(h^k_i) (eq. 23), with the main model's embedding and output head.
// Positions whose token t_{i+k} or target t_{i+k+1} is past the row's end are ignored (the causal mask keeps that
// filler from earlier positions). Returns L_MTP^k, the cross-entropy of eq. 24; h^k is c.block.h_out.
inline double Model::mtp_forward(MtpCache& c, const MtpModule& m, int k, const int32_t* tokens, const float* h_prev,
                                 double* balance) {
    DSV3_PROFILE_MODULE("MTP forward");
    const int B = B_, T = T_, n = BT(), d = cfg.dim, V = cfg.vocab_size;
    std::vector<int32_t> emb_tokens(size_t(n), 0), mtp_targets(size_t(n), 0);
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < T; ++i) {
            const int64_t row = int64_t(b) * (T + 1);
            emb_tokens[size_t(b) * T + i] = tokens[row + std::min(i + k, T)];
            mtp_targets[size_t(b) * T + i] = i + k + 1 <= T ? tokens[row + i + k + 1] : kIgnore;
        }
    backend::upload(c.emb_tokens, emb_tokens);
    backend::upload(c.targets, mtp_targets);
    c.h_prev = h_prev;
    c.emb = arena_.take(size_t(n) * d);
    backend::embedding_forward(c.emb, c.emb_tokens.data(), param_at(layout.embed), n, d, V);
    c.en = norm(c.emb, m.enorm, n, c.en_rstd);
    c.hn = norm(h_prev, m.hnorm, n, c.hn_rstd);
    c.cat = arena_.take(size_t(n) * 2 * d);
    backend::concat_columns(c.cat, c.en, c.hn, n, d, d);
    c.h_proj = linear(c.cat, m.eh_proj, n);
    block_forward(c.block, m.block, c.h_proj, balance);
    c.out_n = norm(c.block.h_out, m.norm, n, c.out_rstd);
    c.logits = linear(c.out_n, layout.head, n);
    return backend::cross_entropy_forward(c.logits, c.targets.data(), n, V);
}
// dh_next: the gradient into h^k from module k+1 (null for the last); adds the gradient of h^{k-1} into dh_prev.
inline void Model::mtp_backward(MtpCache& c, const MtpModule& m, int D, const float* dh_next, float* dh_prev) {
    DSV3_PROFILE_MODULE("MTP backward");
    const int n = BT(), d = cfg.dim, V = cfg.vocab_size;
    auto mark = arena_.mark();
    float* dlogits = arena_.zeros(size_t(n) * V);
    backend::cross_entropy_backward(dlogits, c.logits, c.targets.data(), n, V, opt_.mtp_lambda / D);
    float* dnorm = arena_.zeros(size_t(n) * d);
    linear_backward(dnorm, dlogits, c.out_n, layout.head, n);
    float* dh = arena_.zeros(size_t(n) * d);
    if (dh_next) backend::copy_values(dh, dh_next, int64_t(n) * d);
    norm_backward(dh, dnorm, c.block.h_out, c.out_rstd, m.norm, n);
    float* dproj = arena_.zeros(size_t(n) * d);
    block_backward(c.block, m.block, dh, dproj);
    float* dcat = arena_.zeros(size_t(n) * 2 * d);
    linear_backward(dcat, dproj, c.cat, m.eh_proj, n);
    float* den = arena_.take(size_t(n) * d);
    float* dhn = arena_.take(size_t(n) * d);
    backend::split_columns(den, dhn, dcat, n, d, d);
    float* demb = arena_.zeros(size_t(n) * d);
    norm_backward(demb, den, c.emb, c.en_rstd, m.enorm, n);
    backend::embedding_backward(grad_at(layout.embed), demb, c.emb_tokens.data(), n, d);
    norm_backward(dh_prev, dhn, c.h_prev, c.hn_rstd, m.hnorm, n);
    arena_.release(mark);
}

// --- 5.6 the model [V3 §2.1, §2.2] ----------------------------------------------------------------------------------
// Embedding, the blocks, the final RMSNorm, the output head and the cross-entropy on the next token; then the D MTP
// modules in sequence, each reading the previous depth's h. L = L_main + (λ/D) Σ_k L_MTP^k (eq. 25) + balance loss.
inline Losses Model::forward(const int32_t* tokens, int B, int T, const LossOptions& opt) {
    if (B <= 0 || T <= 0) fail("Model::forward: batch ", B, " x sequence ", T, ": both must be > 0");
    if (T > cfg.max_seq_len) fail("Model::forward: sequence length ", T, " exceeds Config.max_seq_len ", cfg.max_seq_len);
    B_ = B; T_ = T; opt_ = opt;
    const int n = BT(), d = cfg.dim, V = cfg.vocab_size;
    arena_.reset();
    std::vector<int32_t> inputs(size_t(n), 0), targets(size_t(n), 0);  // on the host, then to the backend
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) {
            inputs[size_t(b) * T + t] = tokens[int64_t(b) * (T + 1) + t];
            targets[size_t(b) * T + t] = tokens[int64_t(b) * (T + 1) + t + 1];
        }
    backend::upload(inputs_, inputs);
    backend::upload(targets_, targets);
    Losses loss;
    h0_ = arena_.take(size_t(n) * d);
    backend::embedding_forward(h0_, inputs_.data(), param_at(layout.embed), n, d, V);
    const float* h = h0_;
    for (size_t l = 0; l < layout.blocks.size(); ++l) {
        block_forward(blocks_[l], layout.blocks[l], h, &loss.balance);
        h = blocks_[l].h_out;
    }
    hn_ = norm(h, layout.final_norm, n, final_rstd_);
    logits_ = linear(hn_, layout.head, n);
    loss.main = backend::cross_entropy_forward(logits_, targets_.data(), n, V);
    loss.total = loss.main;
    const int D = opt.with_mtp ? int(layout.mtp.size()) : 0;
    for (int k = 1; k <= D; ++k) {
        MtpCache& c = mtp_[size_t(k - 1)];
        loss.mtp.push_back(mtp_forward(c, layout.mtp[size_t(k - 1)], k, tokens, h, &loss.balance));
        loss.total += opt.mtp_lambda / D * loss.mtp.back();
        h = c.block.h_out;
    }
    loss.total += loss.balance;
    has_forward_ = true;
    return loss;
}

inline void Model::backward() {
    if (!has_forward_) fail("Model::backward: call forward first");
    const int n = BT(), d = cfg.dim, V = cfg.vocab_size;
    backend::fill_zero(grads.data(), int64_t(grads.size()));
    auto mark = arena_.mark();
    const int D = opt_.with_mtp ? int(layout.mtp.size()) : 0;
    // dh_top: gradient w.r.t. the output of the last main block; the MTP modules add into it through hnorm.
    float* dh_top = arena_.zeros(size_t(n) * d);
    float* dh_next = nullptr;  // gradient flowing into h^k from module k+1
    auto final_from = [&](size_t offset) { if (on_gradients_final) on_gradients_final(offset); };
    for (int k = D; k >= 1; --k) {
        float* dh_prev = k == 1 ? dh_top : arena_.zeros(size_t(n) * d);
        mtp_backward(mtp_[size_t(k - 1)], layout.mtp[size_t(k - 1)], D, dh_next, dh_prev);
        dh_next = dh_prev;
        final_from(layout.mtp[size_t(k - 1)].enorm.g);  // MTP module k: from its first tensor to the end
    }
    float* dlogits = arena_.zeros(size_t(n) * V);  // the main head
    backend::cross_entropy_backward(dlogits, logits_, targets_.data(), n, V, 1.0f);
    float* dnorm = arena_.zeros(size_t(n) * d);
    linear_backward(dnorm, dlogits, hn_, layout.head, n);
    const float* h_last = layout.blocks.empty() ? h0_ : blocks_.back().h_out;
    norm_backward(dh_top, dnorm, h_last, final_rstd_, layout.final_norm, n);
    final_from(layout.final_norm.g);  // the final norm and the head (the MTP modules have added theirs)
    float* dh = dh_top;
    for (size_t l = layout.blocks.size(); l-- > 0;) {
        float* dh_in = arena_.zeros(size_t(n) * d);
        block_backward(blocks_[l], layout.blocks[l], dh, dh_in);
        dh = dh_in;
        final_from(layout.blocks[l].attn_norm.g);  // block l: its first tensor is input_layernorm
    }
    backend::embedding_backward(grad_at(layout.embed), dh, inputs_.data(), n, d);
    final_from(0);
    arena_.release(mark);
}

// =====================================================================================================================
// 6. TRAINING [V3 §4.2]
// =====================================================================================================================

// --- 6.1 learning-rate schedules ----------------------------------------------------------------------------------
// kind cosine:     linear warmup to max_lr, then cosine decay to min_lr at the last step (the usual small-model choice).
// kind v3:         V3 §4.2: warmup, constant until constant_until·steps, cosine to min_lr until decay_until·steps,
//                  then constant min_lr (V3 ends with two constant stages; one is kept here).
// kind multi_step: DeepSeek LLM (arXiv 2401.02954 §3.1): warmup, max_lr until 80% of the steps, 31.6% until 90%, 10%.
struct LrSchedule {
    enum Kind { cosine, v3, multi_step } kind = cosine;
    float max_lr = 1e-3f, min_lr = 1e-4f;
    int warmup_steps = 100, total_steps = 1000;
    float constant_until = 0.5f, decay_until = 0.9f;  // kind v3, as fractions of total_steps
    float at(int step) const {  // step counts from 0
        if (step < warmup_steps) return max_lr * float(step + 1) / float(warmup_steps);
        const float x = float(step) / float(std::max(total_steps, 1));
        auto cosine_at = [&](float r) {  // r in [0, 1]: max_lr at 0, min_lr at 1
            return min_lr + 0.5f * (max_lr - min_lr) * (1.0f + std::cos(float(M_PI) * std::clamp(r, 0.0f, 1.0f)));
        };
        switch (kind) {
            case cosine:  // from max_lr at step warmup_steps to exactly min_lr at the last step, total_steps - 1
                return cosine_at(float(step - warmup_steps) / float(std::max(total_steps - 1 - warmup_steps, 1)));
            case v3:
                if (x < constant_until) return max_lr;
                return cosine_at((x - constant_until) / std::max(decay_until - constant_until, 1e-9f));
            case multi_step: return x < 0.8f ? max_lr : (x < 0.9f ? 0.316f * max_lr : 0.1f * max_lr);
        }
        return max_lr;
    }
};

// --- 6.2 optimizer state, clipping, AdamW ------------------------------------------------------------------------
struct AdamW {
    float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;  // V3 §4.2
    float clip_norm = 1.0f;                                               // global-norm clipping (0: off)
    backend::Buffer<float> m, v;                                          // moments, same layout as params
    int step = 0;
};

inline double gradient_norm(const backend::Buffer<float>& g) {  // the global L2 norm, summed in a fixed order
    return std::sqrt(backend::sum_of_squares(g.data(), int64_t(g.size())));
}

// Clip, then one AdamW step on every trainable tensor (weight decay on matrices only; the routing bias has no
// gradient). Returns the norm before clipping; grad_norm >= 0 gives it (expert parallelism spreads it, section 9).
inline double adamw_step(Model& model, AdamW& opt, float lr, double grad_norm = -1) {
    DSV3_PROFILE_MODULE("AdamW step");
    if (opt.m.size() != model.params.size()) {
        backend::upload(opt.m, std::vector<float>(model.params.size(), 0.0f));
        backend::upload(opt.v, std::vector<float>(model.params.size(), 0.0f));
    }
    const double norm = grad_norm >= 0 ? grad_norm : gradient_norm(model.grads);
    if (!std::isfinite(norm)) fail("adamw_step: gradient norm is ", norm, " (non-finite): the step was not applied");
    // Clipping: every gradient times clip_norm / norm, applied inside the update (model.grads keeps the unclipped ones)
    const float clip = opt.clip_norm > 0 && norm > opt.clip_norm ? float(opt.clip_norm / norm) : 1.0f;
    ++opt.step;
    // One update per run of neighbouring tensors with the same weight decay: the same arithmetic in far fewer calls (a
    // layer's experts are hundreds of tensors; on a GPU a call is a launch). FP8 training keeps the moments in BF16
    // [V3 §3.3.3 "Low-Precision Optimizer States"], rounded as each update stores them (weights, gradients stay FP32).
    const bool bf16_states = model.cfg.fp8_training;
    const std::vector<ParamEntry>& es = model.layout.entries;
    auto decay = [&](const ParamEntry& e) { return e.kind == ParamKind::matrix ? opt.weight_decay : 0.0f; };
    for (size_t i = 0, j; i < es.size(); i = j) {
        j = i + 1;
        if (es[i].kind == ParamKind::routing_bias) continue;
        while (j < es.size() && es[j].kind != ParamKind::routing_bias && decay(es[j]) == decay(es[i]) &&
               es[j].offset == es[j - 1].offset + es[j - 1].size)
            ++j;
        const size_t o = es[i].offset, n = es[j - 1].offset + es[j - 1].size - o;
        backend::adamw_update(model.params.data() + o, model.grads.data() + o, opt.m.data() + o, opt.v.data() + o,
                              int64_t(n), lr, opt.beta1, opt.beta2, opt.eps, decay(es[i]), opt.step, clip,
                              bf16_states);
    }
    return norm;
}

// --- 6.3 auxiliary-loss-free load balancing [V3 §2.1.2; Wang et al. 2024, arXiv 2408.15664] -----------------------
// After each step: b_i ← b_i + γ·sign(c̄ − c_i), c_i = tokens routed to expert i over the whole batch, c̄ their mean.
// Overloaded experts become less attractive to the selection, underloaded ones more, with no gradient interference.
inline void update_routing_bias(Model& model, const std::vector<std::vector<int64_t>>& loads, float gamma) {
    DSV3_PROFILE_MODULE("routing bias update");
    std::vector<Block*> blocks = model.moe_blocks();
    if (loads.size() != blocks.size())
        fail("update_routing_bias: ", loads.size(), " load vectors for ", blocks.size(), " MoE blocks");
    for (size_t l = 0; l < blocks.size(); ++l) {
        const std::vector<int64_t>& c = loads[l];
        const double mean = std::accumulate(c.begin(), c.end(), 0.0) / double(c.size());
        std::vector<float> b(c.size());  // N_r values: the rule runs on the host
        backend::to_host(b.data(), model.param_at(blocks[l]->moe.bias), b.size());
        for (size_t i = 0; i < c.size(); ++i) b[i] += gamma * float((mean > c[i]) - (mean < c[i]));
        backend::to_device(model.param_at(blocks[l]->moe.bias), b.data(), b.size());
    }
}
// MaxVio = (max_i c_i − c̄) / c̄ [Wang et al. 2024, eq. 7]: how much the most loaded expert exceeds a perfect balance.
inline double max_violation(const std::vector<int64_t>& load) {
    double mean = 0, mx = 0;
    for (int64_t x : load) { mean += double(x); mx = std::max(mx, double(x)); }
    mean /= double(std::max<size_t>(load.size(), 1));
    return mean > 0 ? (mx - mean) / mean : 0.0;
}
// Adds b's loads into a (for accumulating over micro-batches or a whole validation set).
inline void add_loads(std::vector<std::vector<int64_t>>& a, const std::vector<std::vector<int64_t>>& b) {
    if (a.empty()) { a = b; return; }
    for (size_t l = 0; l < a.size(); ++l)
        for (size_t i = 0; i < a[l].size(); ++i) a[l][i] += b[l][i];
}
// --- 6.4 one training step: forward + backward, clip + AdamW, the loss-free bias update with the batch's loads -----
struct StepResult {
    Losses loss;
    double grad_norm = 0;                        // before clipping
    std::vector<std::vector<int64_t>> loads;     // per MoE block, tokens routed to each expert
    double max_violation = 0;                    // MaxVio_batch, the worst MoE block
};
inline StepResult train_step(Model& model, AdamW& opt, const int32_t* tokens, int B, int T, float lr,
                             const LossOptions& loss_options, bool bias_update = true) {
    StepResult r;
    r.loss = model.forward_backward(tokens, B, T, loss_options);
    r.grad_norm = adamw_step(model, opt, lr);
    r.loads = model.expert_loads();
    if (bias_update) update_routing_bias(model, r.loads, model.cfg.bias_update_speed);
    for (const auto& load : r.loads) r.max_violation = std::max(r.max_violation, max_violation(load));
    return r;
}

// --- 6.5 data windows and evaluation --------------------------------------------------------------------------
// B random windows of T+1 tokens; the windows of step s depend only on (seed, s), so a resumed run sees the same data.
inline void sample_batch(const std::vector<int32_t>& data, int B, int T, uint64_t seed, int step, int32_t* out) {
    Rng rng = Rng(seed).fork(uint64_t(step));
    for (int b = 0; b < B; ++b) {
        const size_t start = size_t(rng.below(data.size() - size_t(T) - 1));
        std::copy(data.begin() + long(start), data.begin() + long(start + T + 1), out + size_t(b) * (T + 1));
    }
}

// Mean next-token loss over `windows` evenly spaced windows of the validation split (all when windows <= 0), and
// the expert loads summed over them (for MaxVio_global).
inline double evaluate(Model& model, const std::vector<int32_t>& val, int T, int windows, int B,
                       std::vector<std::vector<int64_t>>* loads) {
    const int64_t available = int64_t((val.size() - 1) / size_t(T));
    const int64_t n = windows <= 0 ? available : std::min<int64_t>(windows, available);
    if (n <= 0) fail("validation split: ", val.size(), " tokens, fewer than one window of ", T + 1);
    const LossOptions opt{/*with_mtp=*/false};
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

// =====================================================================================================================
// 7. INFERENCE: THE LATENT KV CACHE, WEIGHT ABSORPTION, SAMPLING, MTP SPECULATIVE DECODING   [V3 §2.1.1, §2.2, §5.4.3]
// =====================================================================================================================
// Generation runs the model a step at a time: a step feeds new tokens at positions len .. len+n-1 and attends over
// everything before, whose keys and values are kept in a cache. MLA's point [V3 §2.1.1]: "for MLA, only c^KV_t and
// k^R_t need to be cached during generation": kv_lora_rank + qk_rope_head_dim values per layer and token (512 + 64
// in V3) instead of 2·H·d_h (2·128·128 in an MHA of that shape), 70,272 bytes a token in BF16 for V3's 61 layers.

// --- 7.1 the latent KV cache -----------------------------------------------------------------------------------------
// One per stack of blocks (the main model's, an MTP module's one). Positions [0, len) are valid; a step that writes
// beyond len and is then rejected (speculative decoding) just sets len back.
struct KvCache {
    int n_layers = 0, max_len = 0, dc = 0, dr = 0;
    int len = 0;
    backend::Buffer<float> ckv;     // [n_layers, max_len, dc]   c^KV_t after its RMSNorm (eq. 1)
    backend::Buffer<float> k_rope;  // [n_layers, max_len, dr]   k^R_t after RoPE (eq. 3)
    KvCache() = default;
    KvCache(const Config& c, int layers, int max_positions)
        : n_layers(layers), max_len(max_positions), dc(c.kv_lora_rank), dr(c.qk_rope_head_dim) {
        backend::upload(ckv, std::vector<float>(size_t(layers) * max_positions * dc, 0.0f));
        backend::upload(k_rope, std::vector<float>(size_t(layers) * max_positions * dr, 0.0f));
    }
    float* ckv_at(int layer, int pos) { return ckv.data() + (size_t(layer) * max_len + pos) * dc; }
    float* k_rope_at(int layer, int pos) { return k_rope.data() + (size_t(layer) * max_len + pos) * dr; }
    // What this cache holds per token in V3's BF16: equals kv_cache_bytes_mla(cfg) for the main model.
    int64_t bytes_per_token(int bytes_per_value = 2) const { return int64_t(n_layers) * (dc + dr) * bytes_per_value; }
};

// --- 7.2 attention over the latent cache ---------------------------------------------------------------------------
// Absorbed attention [DeepSeek-V2 §2.1.2 "we can absorb W^UK into W^Q, and W^UV into W^O"]. For head h, with
// W^UK_h [d_h, d_c] and W^UV_h [d_v, d_c] the head's rows of kv_b (= W^UKV, eqs. 2, 5):
//     q^C·k^C_s = q^C·(W^UK_h c_s) = (W^UK_hᵀ q^C)·c_s = q_lat·c_s            q_lat: [d_c], computed once per query
//     o = Σ_s p_s W^UV_h c_s = W^UV_h (Σ_s p_s c_s) = W^UV_h o_lat            o_lat: [d_c], up-projected once
// so attention reads each cached c_s once for all heads, forming no per-head keys or values: a step costs
// O(L·H·(d_c + d_R)) multiply-adds on L·(d_c + d_R) cached floats, not O(L·d_c·H·(d_h + d_v)) to up-project them.
// One query over L keys, for both decoding paths: o[dim] = Σ_s softmax_s(scale · score(s)) · value(s) (dim floats).
template <class Score, class Value>
inline void attend_one(float* o, int L, int dim, float scale, const Score& score, const Value& value) {
    std::vector<float> p(static_cast<size_t>(L));
    float mx = -INFINITY;
    for (int s = 0; s < L; ++s) mx = std::max(mx, p[size_t(s)] = score(s) * scale);
    for (int s = 0; s < L; ++s) p[size_t(s)] = exp_fast(p[size_t(s)] - mx);
    const float inv = 1.0f / sum8(L, [&](int s) { return p[size_t(s)]; });  // as attention_forward (3.4) sums them
    for (int i = 0; i < dim; ++i) o[i] = 0;
    for (int s = 0; s < L; ++s) {
        const float w = p[size_t(s)] * inv;
        const float* vs = value(s);
        for (int i = 0; i < dim; ++i) o[i] += w * vs[i];
    }
}

// The kernel: rows t = 0..n-1 are new queries at positions pos0 + t; row t attends over cache positions 0..pos0+t.
//   o_lat[n, H, dc] = Σ_s softmax_s(scale·(q_lat[t,h]·ckv[s] + q_rope[t,h]·k_rope[s])) ckv[s]
// q_lat: [n, H, dc]; q_rope: [n, H, dr]; ckv: [L, dc]; k_rope: [L, dr]. A row's scores, all heads at once, are one
// multiply_few_rows with the cache (section 10: it reads the cache once). Every (t, h) is computed alone, in the same
// order whatever n is: a position's output does not depend on its step's size (speculative decoding rests on this).
inline void mla_attend_latent(float* o_lat, const float* q_lat, const float* q_rope, const float* ckv,
                                const float* k_rope, int n, int pos0, int H, int dc, int dr, float scale) {
    DSV3_PROFILE_KERNEL();
    // the two parts of row t's scores, [H, L] with L = pos0 + t + 1: sized once for the longest row
    std::vector<float> s_c(size_t(H) * (pos0 + n)), s_r(size_t(H) * (pos0 + n));
    for (int t = 0; t < n; ++t) {
        const int L = pos0 + t + 1;
        gemm::multiply_few_rows(s_c.data(), q_lat + int64_t(t) * H * dc, ckv, H, dc, L);
        gemm::multiply_few_rows(s_r.data(), q_rope + int64_t(t) * H * dr, k_rope, H, dr, L);
        parallel_for(H, [&](int64_t h) {
            attend_one(o_lat + (int64_t(t) * H + h) * dc, L, dc, scale,
                       [&](int s) { return s_c[size_t(h) * L + s] + s_r[size_t(h) * L + s]; },
                       [&](int s) { return ckv + int64_t(s) * dc; });
        }, int64_t(L) * dc / 32);  // a team is woken only for a million multiply-adds (section 10)
    }
}
// The naive path: q: [n, H, dh + dr] (RoPE applied); k: [L, H, dh + dr], v: [L, H, dv] from the cache; o: [n, H, dv]
inline void attention_decode_naive(float* o, const float* q, const float* k, const float* v, int n, int pos0, int H,
                                   int dqk, int dv, float scale) {
    DSV3_PROFILE_KERNEL();
    parallel_for(int64_t(n) * H, [&](int64_t job) {
        const int t = int(job / H), h = int(job % H);
        const float* qt = q + job * dqk;
        auto score = [&](int s) { return std::inner_product(qt, qt + dqk, k + (int64_t(s) * H + h) * dqk, 0.0f); };
        attend_one(o + job * dv, pos0 + t + 1, dv, scale, score, [&](int s) { return v + (int64_t(s) * H + h) * dv; });
    }, int64_t(pos0 + n) * (dqk + dv));
}

// The two absorptions, per row t and head h; W_ukv: [H·(dh+dv), dc] (kv_b_proj): head h's rows are W^UK_h [dh, dc],
// then W^UV_h [dv, dc]. q: [n, H, dh + dr] -> q_lat[t,h] = W^UK_hᵀ q^C[t,h]: [n, H, dc], q_rope: [n, H, dr] (a copy).
inline void mla_absorb_query(float* q_lat, float* q_rope, const float* q, const float* W_ukv, int n, int H, int dh,
                             int dr, int dv, int dc) {
    DSV3_PROFILE_KERNEL();
    parallel_for(int64_t(n) * H, [&](int64_t job) {
        const int h = int(job % H);
        const float* qc = q + job * (dh + dr);
        const float* Wk = W_ukv + int64_t(h) * (dh + dv) * dc;
        float* ql = q_lat + job * dc;
        for (int j = 0; j < dc; ++j) ql[j] = 0;
        for (int i = 0; i < dh; ++i)
            for (int j = 0; j < dc; ++j) ql[j] += qc[i] * Wk[int64_t(i) * dc + j];
        std::memcpy(q_rope + job * dr, qc + dh, sizeof(float) * size_t(dr));
    }, int64_t(dh) * dc / 32);
}
// o[t,h] = W^UV_h o_lat[t,h]: o_lat [n, H, dc] -> o [n, H, dv]
inline void mla_absorb_output(float* o, const float* o_lat, const float* W_ukv, int n, int H, int dh, int dv, int dc) {
    DSV3_PROFILE_KERNEL();
    parallel_for(int64_t(n) * H, [&](int64_t job) {
        const int h = int(job % H);
        gemm::multiply_few_rows(o + job * dv, o_lat + job * dc, W_ukv + (int64_t(h) * (dh + dv) + dh) * dc, 1, dc, dv);
    }, int64_t(dv) * dc / 32);
}

// --- 7.3 the model on new tokens -----------------------------------------------------------------------------------
// One MLA layer on new rows x: [n, d] at positions cache.len ..: writes their c^KV and k^R into the cache; out: [n, d]
inline void Model::mla_decode(const MLA& a, const float* x, float* out, int n, KvCache& cache, int layer,
                                     bool absorbed) {
    const int H = cfg.n_heads, dh = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim, dqk = cfg.qk_head_dim(),
              dv = cfg.v_head_dim, dc = cfg.kv_lora_rank, pos0 = cache.len, L = pos0 + n;
    const float scale = attention_scale(cfg);
    // queries, exactly as in training: q = W^UQ RMSNorm(W^DQ h) or W^Q h (eqs. 6-8), at positions pos0 + t
    float *q = nullptr, *q_rstd = nullptr;
    if (cfg.q_lora_rank > 0) q = linear(norm(linear(x, a.q_a, n), a.q_norm, n, q_rstd), a.q_b, n);
    else q = linear(x, a.q, n);
    backend::rope_forward(q, n, H * dqk, dh, H, dqk, pos0, n, rope);
    // the new tokens' cache entries, written in place: c^KV = RMSNorm(W^DKV h), k^R = RoPE(W^KR h)   (eqs. 1, 3)
    const float* kv_a = linear(x, a.kv_a, n);
    float* ckv_raw = arena_.take(size_t(n) * dc);
    float* rstd = arena_.take(size_t(n));
    backend::split_columns(ckv_raw, cache.k_rope_at(layer, pos0), kv_a, n, dc, dr);
    norm_forward(cache.ckv_at(layer, pos0), rstd, ckv_raw, a.kv_norm, n);
    backend::rope_forward(cache.k_rope_at(layer, pos0), n, dr, 0, 1, dr, pos0, n, rope);
    const float* ckv = cache.ckv_at(layer, 0);      // [L, dc]
    const float* k_rope = cache.k_rope_at(layer, 0);  // [L, dr]
    const float* W_ukv = param_at(a.kv_b.w);              // [H·(dh+dv), dc]: head h is rows h·(dh+dv) .. (h+1)·(dh+dv)
    float* o = arena_.take(size_t(n) * H * dv);    // [n, H·dv]
    if (absorbed) {
        float* q_lat = arena_.take(size_t(n) * H * dc);
        float* q_rope = arena_.take(size_t(n) * H * dr);
        float* o_lat = arena_.take(size_t(n) * H * dc);
        backend::mla_absorb_query(q_lat, q_rope, q, W_ukv, n, H, dh, dr, dv, dc);
        backend::mla_attend_latent(o_lat, q_lat, q_rope, ckv, k_rope, n, pos0, H, dc, dr, scale);
        backend::mla_absorb_output(o, o_lat, W_ukv, n, H, dh, dv, dc);
    } else {
        const float* kv = linear(ckv, a.kv_b, L);  // the whole cache up-projected, then ordinary attention
        float* k = arena_.take(size_t(L) * H * dqk);
        float* v = arena_.take(size_t(L) * H * dv);
        backend::mla_keys_values_forward(k, v, kv, k_rope, L, H, dh, dr, dv);
        backend::attention_decode_naive(o, q, k, v, n, pos0, H, dqk, dv, scale);
    }
    linear_forward(out, o, a.o, n);
}

// One pre-norm block on n new rows; the FFN/MoE part is the training code itself (every row is independent there).
inline void Model::block_decode(BlockCache& c, const Block& b, const float* h_in, float* h_out, int n, KvCache& cache,
                                 int layer, bool absorbed) {
    const int d = cfg.dim;
    float* rstd = nullptr;
    float* h_mid = arena_.take(size_t(n) * d);
    mla_decode(b.attn, norm(h_in, b.attn_norm, n, rstd), h_mid, n, cache, layer, absorbed);
    backend::add_inplace(h_mid, h_in, int64_t(n) * d);
    const float* xn = norm(h_mid, b.ffn_norm, n, rstd);
    double unused = 0;
    if (b.is_moe) moe_forward(c.moe, b.moe, xn, h_out, &unused);
    else ffn_forward(c.ffn, b.ffn, xn, h_out, n);
    backend::add_inplace(h_out, h_mid, int64_t(n) * d);
}

inline void Model::begin_decode(int n, const KvCache& cache, int layers, const char* who) {
    if (n <= 0) fail(who, ": need at least one new token, got ", n);
    if (cache.n_layers != layers || cache.dc != cfg.kv_lora_rank || cache.dr != cfg.qk_rope_head_dim)
        fail(who, ": the KvCache was made for ", cache.n_layers, " layers of (", cache.dc, " + ", cache.dr,
             "), this model needs ", layers, " layers of (", cfg.kv_lora_rank, " + ", cfg.qk_rope_head_dim, ")");
    if (cache.len + n > cache.max_len || cache.len + n > rope.max_pos)
        fail(who, ": positions up to ", cache.len + n, " do not fit the cache (", cache.max_len,
             ") or Config.max_seq_len (", rope.max_pos, ")");
    arena_.reset();  // decoding reuses the activation arena: the last training forward is gone
    has_forward_ = false;
    B_ = 1; T_ = n;
    opt_ = LossOptions{/*with_mtp=*/false};  // and no balance loss
}

inline void Model::decode(const int32_t* tokens, int n, KvCache& cache, float* logits, float* hidden, bool absorbed) {
    begin_decode(n, cache, int(layout.blocks.size()), "Model::decode");
    const int d = cfg.dim, V = cfg.vocab_size;
    for (int t = 0; t < n; ++t)
        if (tokens[t] < 0 || tokens[t] >= V) fail("Model::decode: token ", tokens[t], " outside the vocabulary [0, ", V, ")");
    backend::upload(inputs_, std::vector<int32_t>(tokens, tokens + n));  // (to the GPU on a GPU backend)
    float* h = arena_.take(size_t(n) * d);
    backend::embedding_forward(h, inputs_.data(), param_at(layout.embed), n, d, V);
    for (size_t l = 0; l < layout.blocks.size(); ++l) {
        float* h_next = arena_.take(size_t(n) * d);
        block_decode(blocks_[l], layout.blocks[l], h, h_next, n, cache, int(l), absorbed);
        h = h_next;
    }
    if (hidden) backend::to_host(hidden, h, size_t(n) * d);
    float* rstd = nullptr;
    const float* z = linear(norm(h, layout.final_norm, n, rstd), layout.head, n);
    backend::to_host(logits, z, size_t(n) * V);
    cache.len += n;
}

// MTP module 1 on n new positions i: h: [n, d] the main model's last hidden states, next_tokens: [n] the t_{i+1};
// logits: [n, V] predict t_{i+2} (eqs. 21-23). Its block has a one-layer cache of its own.
inline void Model::decode_mtp(const float* h, const int32_t* next_tokens, int n, KvCache& cache, float* logits,
                              bool absorbed) {
    if (layout.mtp.empty()) fail("Model::decode_mtp: this model has no MTP module (n_mtp_depth = 0)");
    begin_decode(n, cache, 1, "Model::decode_mtp");
    const int d = cfg.dim, V = cfg.vocab_size;
    const MtpModule& m = layout.mtp[0];
    backend::upload(targets_, std::vector<int32_t>(next_tokens, next_tokens + n));
    float* emb = arena_.take(size_t(n) * d);
    float* hd = arena_.take(size_t(n) * d);
    float* cat = arena_.take(size_t(n) * 2 * d);
    float* out = arena_.take(size_t(n) * d);
    float* rstd = nullptr;
    backend::embedding_forward(emb, targets_.data(), param_at(layout.embed), n, d, V);
    backend::to_device(hd, h, size_t(n) * d);
    const float* en = norm(emb, m.enorm, n, rstd);  // [RMSNorm(Emb(t_{i+1})) ; RMSNorm(h_i)]
    const float* hn = norm(hd, m.hnorm, n, rstd);
    backend::concat_columns(cat, en, hn, n, d, d);
    block_decode(mtp_[0].block, m.block, linear(cat, m.eh_proj, n), out, n, cache, 0, absorbed);
    const float* z = linear(norm(out, m.norm, n, rstd), layout.head, n);
    backend::to_host(logits, z, size_t(n) * V);
    cache.len += n;
}

// --- 7.4 sampling ----------------------------------------------------------------------------------------------------
// temperature 0 is greedy (argmax; the lowest id wins a tie). Otherwise p ∝ exp(z / temperature) over the top_k most
// likely tokens (0: all), then the fewest whose mass reaches top_p (nucleus sampling, Holtzman et al. 2020),
// renormalised; one uniform draw from rng picks the token.
struct SamplingOptions {
    float temperature = 0.0f;
    int top_k = 0;
    float top_p = 1.0f;
};
inline int argmax(const float* z, int n) { return int(std::max_element(z, z + n) - z); }  // the first of the largest
inline int sample_token(const float* logits, int V, const SamplingOptions& o, Rng& rng) {
    if (o.temperature < 0 || o.top_k < 0 || !(o.top_p > 0 && o.top_p <= 1))
        fail("sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; found ", o.temperature, ", ", o.top_k,
             ", ", o.top_p);
    if (o.temperature == 0) return argmax(logits, V);
    std::vector<int> ids(static_cast<size_t>(V));
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    const int keep_k = o.top_k > 0 ? std::min(o.top_k, V) : V;
    std::vector<double> p(static_cast<size_t>(keep_k));
    double sum = 0;
    for (int i = 0; i < keep_k; ++i)
        sum += (p[size_t(i)] = std::exp(double(logits[ids[size_t(i)]] - logits[ids[0]]) / o.temperature));
    int keep = 0;  // the first `keep` tokens whose mass reaches top_p (or all keep_k)
    for (double mass = 0; keep < keep_k && mass < o.top_p; ++keep) mass += p[size_t(keep)] / sum;
    double u = rng.uniform() * std::accumulate(p.begin(), p.begin() + keep, 0.0);
    for (int i = 0; i < keep; ++i)
        if ((u -= p[size_t(i)]) < 0) return ids[size_t(i)];
    return ids[size_t(keep - 1)];
}

// --- 7.5 generation, plain and speculative [V3 §5.4.3] --------------------------------------------------------------
// The thread count for a loop of many steps on a shared CPU, where a team can be slower than one thread (a thread
// waiting for a descheduled one loses its time slice); no result depends on it. Each window (>= 2 steps, 25 ms) runs
// the fastest count so far (all threads, half, ..., one; each tried first); a probe window tries another after 8
// windows, twice as many after each losing probe (at most 64). tick() once a step; the destructor restores the count.
class ThreadTuner {
  public:
    ThreadTuner() : max_(thread_count()) {
        for (int n = max_; n >= 1; n /= 2) counts_.push_back({n, 0.0});
    }
    ThreadTuner(const ThreadTuner&) = delete;
    ThreadTuner& operator=(const ThreadTuner&) = delete;
    ~ThreadTuner() { set(max_); }
    void tick() {
        const double t = now_seconds();
        if (steps_ > 0 || window_start_ > 0) ++steps_;
        if (steps_ == 0) window_start_ = t;
        if (steps_ < 2 || t - window_start_ < 0.025) return;
        Count& c = counts_[at_];
        const double per_step = (t - window_start_) / steps_;
        c.seconds = c.seconds > 0 ? 0.5 * (c.seconds + per_step) : per_step;   // recent windows weigh most
        const size_t best = fastest();
        if (probing_) interval_ = best == at_ ? 8 : std::min(2 * interval_, 64);   // the probe won, or lost
        probing_ = ++windows_ % interval_ == 0 && counts_.size() > 1;
        if (probing_) {   // the counts other than the fastest, in turn
            probe_ = (probe_ + 1) % counts_.size();
            if (probe_ == best) probe_ = (probe_ + 1) % counts_.size();
        }
        at_ = probing_ ? probe_ : best;
        set(counts_[at_].threads);
        steps_ = 0, window_start_ = t;
    }
  private:
    struct Count { int threads; double seconds; };   // seconds a step, 0 until measured
    size_t fastest() const {   // an unmeasured count first (so each is tried once), else the fastest
        size_t best = 0;
        for (size_t i = 0; i < counts_.size(); ++i) {
            if (counts_[i].seconds == 0) return i;
            if (counts_[i].seconds < counts_[best].seconds) best = i;
        }
        return best;
    }
    static void set([[maybe_unused]] int n) {
#ifdef _OPENMP
        omp_set_num_threads(n);
#endif
    }
    int max_;
    std::vector<Count> counts_;
    size_t at_ = 0, probe_ = 0;   // the count running now, the last one probed
    int steps_ = 0, windows_ = 0, interval_ = 8;
    bool probing_ = false;
    double window_start_ = 0;
};

// Speculative decoding with the MTP module: after the main model produced t_{i+1} at position i, MTP module 1 turns
// (h_i, t_{i+1}) into a draft d of t_{i+2}. The next main step feeds t_{i+1} and d: its output at i+1 is the real
// distribution of t_{i+2}, sampled as plain decoding would (same sampler, same draw). If t_{i+2} == d, the output at
// i+2 gives t_{i+3} too: two tokens a main forward; if not, i+2 leaves the cache. The tokens are plain decoding's (a
// position's logits do not depend on its step's size: 10, 7.2). V3 reports 85-90% acceptance, about 1.8x the tokens/s.
struct GenerationStats {
    int prompt_tokens = 0, generated = 0;
    int main_forwards = 0;          // calls of the main model, the prompt's and restarts' included
    int drafted = 0, accepted = 0;  // MTP drafts verified, and those that were right
    int restarts = 0;               // times the context was full and restarted from its last half
    double seconds = 0;             // the whole call
    double first_token_seconds = 0; // the prompt's prefill and the first token: the rest is decoding
    double decode_tokens_per_second() const {
        return seconds > first_token_seconds ? (generated - 1) / (seconds - first_token_seconds) : 0.0;
    }
    double acceptance() const { return drafted ? double(accepted) / drafted : 0.0; }
    double tokens_per_forward() const { return main_forwards ? double(generated) / main_forwards : 0.0; }
};

// The context holds Config.max_seq_len positions (build/train: its training length). When full, generation restarts
// from the last half of the tokens in one step; plain and speculative decoding restart at the same token.
inline std::vector<int32_t> generate(Model& model, const std::vector<int32_t>& prompt, int n_new,
                                     const SamplingOptions& sampling, uint64_t seed, bool use_mtp,
                                     GenerationStats* stats = nullptr, bool absorbed = true) {
    const Config& c = model.cfg;
    const int P = int(prompt.size()), V = c.vocab_size, d = c.dim, window = c.max_seq_len;
    if (P == 0) fail("generate: the prompt is empty (give at least one token)");
    if (window < 4) fail("generate: Config.max_seq_len ", window, " is too short for a context (need >= 4)");
    if (use_mtp && c.n_mtp_depth == 0) fail("generate: --mtp needs a model with an MTP module (n_mtp_depth >= 1)");
    if (n_new <= 0) return {};
    const double t0 = now_seconds();
    KvCache cache(c, c.n_layers, window), mtp_cache(c, 1, window);
    std::vector<float> logits(size_t(window) * V), hidden(size_t(window) * d), mtp_logits(size_t(window) * V);
    Rng rng(seed);
    GenerationStats st{/*prompt_tokens=*/P};
    std::vector<int32_t> all = prompt, out;  // every token so far; the last one is not in the cache yet
    int32_t draft = -1;
    auto prefill = [&](const int32_t* ctx, int n) {  // a fresh start: ctx[0..n) in one step, logits in row n-1
        cache.len = mtp_cache.len = 0;
        model.decode(ctx, n, cache, logits.data(), hidden.data(), absorbed);
        st.main_forwards++;
    };
    auto run_mtp = [&](const int32_t* next_tokens, int n) {  // (h_i, t_{i+1}), the n newest: t_{i+1} is now known
        model.decode_mtp(hidden.data(), next_tokens, n, mtp_cache, mtp_logits.data(), absorbed);
        draft = argmax(mtp_logits.data() + int64_t(n - 1) * V, V);  // the draft of the token after next
    };
    auto emit = [&](int32_t t) { out.push_back(t); all.push_back(t); };
    const int keep0 = P <= window - 1 ? P : window / 2;  // the prompt, or its last window/2 tokens if it does not fit
    prefill(all.data() + P - keep0, keep0);
    emit(sample_token(logits.data() + int64_t(keep0 - 1) * V, V, sampling, rng));
    if (use_mtp) run_mtp(all.data() + P - keep0 + 1, keep0);
    st.first_token_seconds = now_seconds() - t0;
    ThreadTuner threads;  // a shared CPU may decode faster on fewer threads (above)
    while (int(out.size()) < n_new) {
        threads.tick();
        const int32_t next = all.back();
        if (cache.len == window - 1) {  // full: keep the last window/2 tokens before `next`, start again
            const int keep = window / 2;
            const int32_t* ctx = all.data() + all.size() - 1 - keep;
            prefill(ctx, keep);
            if (use_mtp) run_mtp(ctx + 1, keep);
            st.restarts++;
        }
        // Speculate only when an accepted draft still lands on or before the restart point (same restarts as plain).
        const bool speculate = use_mtp && cache.len + 2 <= window - 1;
        const int32_t step[2] = {next, draft};  // plain decoding feeds `next` alone
        model.decode(step, speculate ? 2 : 1, cache, logits.data(), hidden.data(), absorbed);
        st.main_forwards++;
        const int32_t t1 = sample_token(logits.data(), V, sampling, rng);
        emit(t1);
        if (speculate) {
            st.drafted++;
            st.accepted += t1 == draft;
            if (t1 == draft && int(out.size()) < n_new) {  // the draft was right: position i+2 is valid too
                emit(sample_token(logits.data() + V, V, sampling, rng));
                run_mtp(all.data() + all.size() - 2, 2);
                continue;
            }
            cache.len -= 1;  // forget position i+2 (fed the wrong token, or not needed)
        }
        if (use_mtp) run_mtp(&all.back(), 1);
    }
    st.generated = int(out.size());
    st.seconds = now_seconds() - t0;
    if (stats) *stats = st;
    return out;
}

// #####################################################################################################################
// PART 2, THE SYSTEMS OF THE REPORT
// How DeepSeek-V3 was trained at scale: FP8 mixed precision, and the data and expert parallelism of its cluster.
// #####################################################################################################################
// =====================================================================================================================
// 8. NUMERICS: FP8 TRAINING (DeepSeek-V3 report §3.3), BF16 AND FP16
// =====================================================================================================================
// DeepSeek-V3 runs the three GEMMs of every linear layer, Fprop y = x·Wᵀ, Dgrad dx = dy·W and Wgrad dW = dyᵀ·x, on
// 8-bit inputs (report §3.3). What is sensitive or cheap stays in BF16/FP32: embedding, output head, MoE router,
// norms, the attention core, the FP32 master weights and gradients; AdamW's moments are stored in BF16 (bf16_round).
// The formats (OCP 8-bit floating point specification; the bits are sign | exponent | mantissa):
//          bits        bias  max finite    min normal  min subnormal  special values
//   E4M3   s eeee mmm     7  448   (0x7E)  2^-6        2^-9           NaN = s.1111.111 only, no infinities ("fn")
//   E5M2   s eeeee mm    15  57344 (0x7B)  2^-14       2^-16          IEEE: ±inf = s.11111.00, NaN = s.11111.(≠0)
// E4M3 has one more mantissa bit (neighbours at most 12.5% apart) but spans only about 18 binades. V3 uses it for
// every tensor, gradients included (earlier recipes used E5M2 there), and gets the range back by fine-grained scaling
// (§3.3.2): one scale per tensor would push most values, under activation outliers, into the subnormals or to zero;
// instead each 1×128 tile (a token × 128 channels) of activations and gradients and each 128×128 block of weights
// gets its own scale from its amax (8.2). The groups run along the reduction dimension K, so the scales must be
// applied inside the accumulation, and promotion every 128 (§3.3.2 "Increasing Accumulation Precision") does it:
// Hopper's FP8 tensor cores accumulate with about 14 significant bits (8.3: errors near 2% over K = 4096), so every
// N_C = 128 elements of K V3 adds the partial sum, times the two group scales, into FP32 registers on the CUDA cores
// (nearly free: the scales are applied there anyway). examples/fp8_error.cpp reproduces the "nearly 2%" and shows
// promotion removing it.

// --- 8.1 bit-level helpers, BF16 and FP16, the FP8 codecs ------------------------------------------------------------
namespace fp8_detail {
inline uint32_t bits_of(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float float_of(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float pow2f(int n) { return float_of(uint32_t(n + 127) << 23); }   // 2^n for n in [-126, 127]: exact, no libm
inline int bit_length(uint32_t v) {   // significant bits of v > 0 (bit_length(1) = 1)
#if defined(__GNUC__) || defined(__clang__)
    return 32 - __builtin_clz(v);
#else
    int n = 0;
    for (; v; v >>= 1) ++n;
    return n;
#endif
}
// Rounds a non-negative float (bits `a`; NaN excluded, +inf allowed) to nearest even in a format of `man_bits` mantissa
// bits and bias `bias`: the unsigned code (exponent field << man_bits) | mantissa, unbounded above (the caller
// saturates or makes inf). For a = sig · 2^(e - 23), q = sig >> shift rounded to even counts the target's spacings
// 2^(te - man_bits), te = max(e, emin), and the code is ((te + bias - 1) << man_bits) + q for normals and subnormals
// alike: a carry into the next binade, or from the subnormals into the normals, lands on the right code by itself.
inline int64_t round_to_code(uint32_t a, int man_bits, int bias) {
    if (a == 0) return 0;
    const int fexp = std::max(int(a >> 23), 1);   // float32 subnormals: the 2^-126 scale, no implicit bit
    const uint32_t sig = (a & 0x7FFFFFu) | (a >> 23 ? 0x800000u : 0u);
    const int e = fexp - 127, emin = 1 - bias;
    const int te = e > emin ? e : emin;
    const int shift = 23 + te - e - man_bits;   // >= 23 - man_bits > 0
    if (shift > 25) return 0;                   // below half of the smallest subnormal: rounds to zero
    uint32_t q = sig >> shift;
    const uint32_t rem = sig & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (int64_t(te + bias - 1) << man_bits) + int64_t(q);
}
// x to a `bits`-wide format (sign on top): NaN becomes sign | nan_code; otherwise x is rounded and a code past `top`
// becomes `top`, which is the largest finite code for a saturating format and the infinity code for IEEE overflow.
inline uint32_t encode(float x, int bits, int man_bits, int bias, uint32_t nan_code, uint32_t top) {
    const uint32_t u = bits_of(x), a = u & 0x7FFFFFFFu, sign = (u >> (32 - bits)) & (1u << (bits - 1));
    if (a > 0x7F800000u) return sign | nan_code;
    const int64_t code = round_to_code(a, man_bits, bias);
    return sign | (code > int64_t(top) ? top : uint32_t(code));
}
// The inverse: codes from `special` up are infinity (`special` itself, when the format has_inf) or NaN. A finite code
// (exponent field ef, mantissa m) is m·2^(1 - bias - man_bits) for subnormals (ef = 0), else (2^man_bits + m)·2^(ef -
// bias - man_bits); ldexp is exact here.
inline float decode(uint32_t h, int bits, int man_bits, int bias, uint32_t special, bool has_inf) {
    const float sign = (h >> (bits - 1)) & 1u ? -1.0f : 1.0f;
    const uint32_t code = h & ((1u << (bits - 1)) - 1), m = code & ((1u << man_bits) - 1);
    const int ef = int(code >> man_bits);
    if (code >= special) return has_inf && code == special ? sign * INFINITY : std::copysign(NAN, sign);
    return std::copysign(std::ldexp(float(ef ? m | (1u << man_bits) : m), std::max(ef, 1) - bias - man_bits), sign);
}
}  // namespace fp8_detail
// BF16: float32's sign, exponent and top 7 mantissa bits; rounding drops the low 16 bits (to nearest, ties to even).
// V3 stores AdamW's moments in BF16 (§3.3.3); bf16_round(x) is what such a store-and-reload does to x.
inline uint16_t float_to_bf16_bits(float x) {
    uint32_t u = fp8_detail::bits_of(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN: keep the sign, force quiet
    u += 0x7FFFu + ((u >> 16) & 1u);   // round to nearest, ties to even: a carry may ripple into the exponent (to inf)
    return uint16_t(u >> 16);
}
inline float bf16_bits_to_float(uint16_t h) { return fp8_detail::float_of(uint32_t(h) << 16); }
inline float bf16_round(float x) { return bf16_bits_to_float(float_to_bf16_bits(x)); }
// FP16 (IEEE binary16, bias 15, 10 mantissa bits, max 65504), which some checkpoints use: round to nearest even, and
// a value that rounds past 65504 becomes ±inf (0x7C00).
inline uint16_t float_to_f16_bits(float x) { return uint16_t(fp8_detail::encode(x, 16, 10, 15, 0x7E00u, 0x7C00u)); }
inline float f16_bits_to_float(uint16_t h) { return fp8_detail::decode(h, 16, 10, 15, 0x7C00u, true); }
// FP8 codecs: round to nearest even, subnormals kept, saturating: past the largest finite value is ±max (the
// hardware's "satfinite"; PyTorch's plain cast does not saturate), ±inf too (E4M3 has none; E5M2's ±57344 keeps an
// overflow from poisoning a GEMM). NaN stays NaN with its sign (E5M2: the quiet s.11111.10); -0 encodes to 0x80.
inline uint8_t fp8_e4m3_encode(float x) { return uint8_t(fp8_detail::encode(x, 8, 3, 7, 0x7Fu, 0x7Eu)); }
inline uint8_t fp8_e5m2_encode(float x) { return uint8_t(fp8_detail::encode(x, 8, 2, 15, 0x7Eu, 0x7Bu)); }
inline float fp8_e4m3_decode(uint8_t q) { return fp8_detail::decode(q, 8, 3, 7, 0x7Fu, false); }
inline float fp8_e5m2_decode(uint8_t q) { return fp8_detail::decode(q, 8, 2, 15, 0x7Cu, true); }
enum class Fp8Format { e4m3, e5m2 };   // for the functions below that accept either
inline float fp8_decode(uint8_t q, Fp8Format f) {
    return f == Fp8Format::e4m3 ? fp8_e4m3_decode(q) : fp8_e5m2_decode(q);
}
inline bool fp8_is_finite(uint8_t q, Fp8Format f) { return (q & 0x7Fu) < (f == Fp8Format::e4m3 ? 0x7Fu : 0x7Cu); }
// An FP8 input's exponent as the tensor core aligns it: unbiased, subnormals at the minimum normal exponent (-6 E4M3,
// -14 E5M2). Meaningless for zero (zeros take no part).
inline int fp8_input_exponent(uint8_t q, Fp8Format f) {
    const int man_bits = f == Fp8Format::e4m3 ? 3 : 2, bias = f == Fp8Format::e4m3 ? 7 : 15;
    return std::max((q & 0x7F) >> man_bits, 1) - bias;   // the exponent field, 1 for subnormals
}

// --- 8.2 fine-grained quantization (§3.3.2, Figure 7a) ---------------------------------------------------------------
// Dequantization scales: x ≈ decode(q) · scale, with scale = amax / 448 so the tile's largest magnitude lands on E4M3's
// largest value. pow2_scale rounds it UP to a power of two (exact to multiply by), as V3 does where a tensor is
// re-scaled or re-quantized (the input of the linear after attention, MoE dispatch), for up to a binade of range.
// amax is the largest FINITE magnitude (NaN stays NaN, ±inf saturates to ±448·scale). An all-zero tile gets scale 1;
// a scale that would underflow is FLT_MIN.
inline float fp8_scale_for_amax(float amax, bool pow2_scale = false) {
    if (!(amax > 0.0f)) return 1.0f;
    float s = amax / 448.0f;
    if (s < FLT_MIN) s = FLT_MIN;
    int e = 0;   // s = m · 2^e, m in [0.5, 1): unless m = 0.5, 2^e is the next power of two up
    if (pow2_scale && std::frexp(s, &e) != 0.5f) s = std::ldexp(1.0f, e);
    return s;
}
namespace fp8_detail {
inline void check_quant_args(const char* who, const void* in, int rows, int cols, const void* q, const float* scales) {
    if (rows < 0 || cols < 0) fail(who, ": shape must be non-negative, found [", rows, ", ", cols, "]");
    if (int64_t(rows) * cols > 0 && (!in || !q || !scales))
        fail(who, ": null pointer for a [", rows, ", ", cols, "] tensor (input, codes and scales are all required)");
}
inline float amax_finite(float acc, float v) {
    const float a = std::fabs(v);
    return (a <= FLT_MAX && a > acc) ? a : acc;   // NaN and inf compare false: left out
}
// x: [rows, cols] in tiles of tile_rows × 128 (partial at the bottom and right edges), each with its own amax and
// scale: scales [ceil(rows/tile_rows), ceil(cols/128)]. Tiles in parallel: each writes only its own codes and scale.
inline void quantize_tiles(const char* who, const float* x, int rows, int cols, int tile_rows, uint8_t* q,
                           float* scales, bool pow2) {
    check_quant_args(who, x, rows, cols, q, scales);
    const int ct = fp8_tiles(cols);
    parallel_for(int64_t((rows + tile_rows - 1) / tile_rows) * ct, [&](int64_t b) {
        const int r0 = int(b / ct) * tile_rows, r1 = std::min(rows, r0 + tile_rows);
        const int c0 = int(b % ct) * 128, c1 = std::min(cols, c0 + 128);
        float amax = 0.0f;
        for (int r = r0; r < r1; ++r)
            for (int c = c0; c < c1; ++c) amax = amax_finite(amax, x[int64_t(r) * cols + c]);
        const float s = scales[b] = fp8_scale_for_amax(amax, pow2);
        for (int r = r0; r < r1; ++r)
            for (int c = c0; c < c1; ++c) q[int64_t(r) * cols + c] = fp8_e4m3_encode(x[int64_t(r) * cols + c] / s);
    });
}
// The inverse, for tiles of tile_rows × tile_cols (also DeepSeek's block-scaled FP8 checkpoints, section 13.5).
inline void dequantize_tiles(const char* who, const uint8_t* q, const float* scales, int rows, int cols, int tile_rows,
                             float* x, int tile_cols = 128, Fp8Format f = Fp8Format::e4m3) {
    check_quant_args(who, q, rows, cols, x, scales);
    float table[256];
    for (int i = 0; i < 256; ++i) table[i] = fp8_decode(uint8_t(i), f);
    const int ct = (cols + tile_cols - 1) / tile_cols;
    parallel_for(rows, [&](int64_t r) {
        const float* srow = scales + (r / tile_rows) * ct;
        for (int c = 0; c < cols; ++c) x[r * cols + c] = table[q[r * cols + c]] * srow[c / tile_cols];
    });
}
template <class T>  // xt: [cols, rows] = xᵀ for x: [rows, cols]
inline std::vector<T> transposed(const T* x, int rows, int cols) {
    std::vector<T> xt(size_t(rows) * size_t(cols));
    parallel_for(cols, [&](int64_t c) {
        for (int r = 0; r < rows; ++r) xt[size_t(c) * rows + r] = x[int64_t(r) * cols + c];
    });
    return xt;
}
}  // namespace fp8_detail
// x: [rows, cols] → q: [rows, cols] E4M3 codes, scales: [rows, ceil(cols/128)], one per 1×128 tile (a row's last tile
// is partial when cols % 128 != 0: it has its own amax over the columns it covers).
inline void quantize_tiles_1x128(const float* x, int rows, int cols, uint8_t* q, float* scales,
                                 bool pow2_scale = false) {
    fp8_detail::quantize_tiles("quantize_tiles_1x128", x, rows, cols, 1, q, scales, pow2_scale);
}
// w: [rows, cols] (a weight [out, in]) → q: [rows, cols], scales: [ceil(rows/128), ceil(cols/128)], one per 128×128
// block (blocks at the bottom and right edges are partial).
inline void quantize_blocks_128x128(const float* w, int rows, int cols, uint8_t* q, float* scales,
                                    bool pow2_scale = false) {
    fp8_detail::quantize_tiles("quantize_blocks_128x128", w, rows, cols, 128, q, scales, pow2_scale);
}
// Wgrad's operands are tiled along the token dimension, the reduction dimension of dW = dyᵀ·x: 128×1 tiles (128
// tokens × one channel). x: [rows, cols] → qt: [cols, rows] (transposed, so each tile becomes a 1×128 tile of a row,
// the layout fp8_gemm reads), scales: [cols, ceil(rows/128)].
inline void quantize_tiles_128x1_transposed(const float* x, int rows, int cols, uint8_t* qt, float* scales,
                                            bool pow2_scale = false) {
    const char* who = "quantize_tiles_128x1_transposed";
    fp8_detail::check_quant_args(who, x, rows, cols, qt, scales);
    const std::vector<float> xt = fp8_detail::transposed(x, rows, cols);   // [cols, rows]
    fp8_detail::quantize_tiles(who, xt.data(), cols, rows, 1, qt, scales, pow2_scale);
}
// Inverses (up to rounding): x[r, c] = decode(q[r, c]) · scale of its tile / block.
inline void dequantize_tiles_1x128(const uint8_t* q, const float* scales, int rows, int cols, float* x) {
    fp8_detail::dequantize_tiles("dequantize_tiles_1x128", q, scales, rows, cols, 1, x);
}
inline void dequantize_blocks_128x128(const uint8_t* q, const float* scales, int rows, int cols, float* w) {
    fp8_detail::dequantize_tiles("dequantize_blocks_128x128", q, scales, rows, cols, 128, w);
}

// --- 8.3 FP8 GEMM on the H100 tensor core's accumulator [V3 §3.3.2; arXiv 2505.09343] --------------------------------
// C[M, N] = A[M, K] · B[N, K]ᵀ, A and B E4M3 codes, B in the weight layout [out, in]. The accumulator model (after
// Khattak & Mikaitis and "Insights into DeepSeek-V3"; Fp8Accum, its parameters: section 3), for one output element:
//   c = 0                                    the tensor core's accumulator: at most 14 significant bits
//   for each block of 32 consecutive k:      one WGMMA instruction's K for FP8
//       E = max over the block's non-zero products of ea_k + eb_k (exponents of the FP8 INPUTS, subnormals at the
//           minimum normal exponent; not the exponent of the product itself), and floor(log2|c|) if c != 0
//       q = 2^(E - 13)                       every addend is cut to 13 fraction bits below 2^E ...
//       s = Σ trunc(p_k / q)·q + trunc(c / q)·q      ... by truncation toward zero; the sum itself is exact
//       c = s truncated toward zero to 14 significant bits
//   promotion every N_C = 128 (V3): at the end of each 128-chunk of K and at the very end of K:
//       acc32 = fmaf(c, (float)(sa · sb), acc32);  c = 0      sa·sb rounded to float once, then one fused rounding
//   result = acc32                           no promotion ("fast accumulation") = one promotion at the very end
// scale_a: [M, ceil(K/128)], one per 1×128 tile of A; scale_b: [ceil(N/128), ceil(K/128)], one per 128×128 block of
// B; null = all ones. A promotion applies one 128-tile's scale pair, so a chunk spanning several (promote_every = 0 or
// > 128) needs equal scales over them (e.g. per tensor), else fp8_gemm throws. cuBLAS's per-tensor scaling (not V3's)
// is C = acc32 · (float)(sa·sb): pass null scales and multiply C afterwards. A NaN input (or an E5M2 ±inf) makes its
// row's outputs NaN (the model does not follow IEEE infinities through the truncating accumulator). Bit for bit an
// H100's (torch 2.11 _scaled_mm → cuBLASLt; use_fast_accum: no promotion) on Gaussian, uniform, all-codes and sparse
// inputs, K = 32 … 4096 with tails (96, 160, 1040), E4M3 × E5M2, 1×128 / 128×128 scales. Every detail matters:
// flooring instead of truncation matches 0% of the outputs, 14 fraction bits instead of 13 2%, aligning on the
// product's exponent 91%.
namespace fp8_detail {
// The scale of (row, 128-tile t): s[(row / rows_per_scale) * tiles + t], 1 when s is null. rows_per_scale is 1 for
// fp8_gemm's A (1×128 tiles) and Wgrad's B (128×1 tiles, transposed), 128 for fp8_gemm's B (128×128 blocks).
struct ScaleMap {
    const float* s = nullptr;
    int rows_per_scale = 1, tiles = 0;
    float at(int row, int t) const { return s ? s[int64_t(row / rows_per_scale) * tiles + t] : 1.0f; }
};
// Everything one GEMM needs; `accumulate` makes it C += A·Bᵀ (the backward pass's dx and dW accumulate).
struct GemmProblem {
    const uint8_t* A; Fp8Format fa; ScaleMap sa;
    const uint8_t* B; Fp8Format fb; ScaleMap sb;
    float* C; int M, N, K;
    Fp8Accum acc; bool accumulate;
};
inline const GemmProblem& check_gemm(const GemmProblem& p, const char* who) {   // returns p
    if (p.M < 0 || p.N < 0 || p.K < 0) fail(who, ": sizes must be non-negative, found M=", p.M, " N=", p.N, " K=", p.K);
    if (int64_t(p.M) * p.N > 0 && !p.C) fail(who, ": C is null for a [", p.M, ", ", p.N, "] output");
    if (int64_t(p.M) * p.K > 0 && !p.A) fail(who, ": A is null for a [", p.M, ", ", p.K, "] input");
    if (int64_t(p.N) * p.K > 0 && !p.B) fail(who, ": B is null for a [", p.N, ", ", p.K, "] input");
    const Fp8Accum& a = p.acc;
    if (a.exact) return p;
    if (a.block < 1) fail(who, ": Fp8Accum.block must be >= 1, found ", a.block);
    if (a.frac_bits < 1 || a.frac_bits > 23)
        fail(who, ": Fp8Accum.frac_bits must be in [1, 23] (the accumulator must fit a float32 significand), found ",
             a.frac_bits);
    if (a.promote_every < 0) fail(who, ": Fp8Accum.promote_every must be >= 0 (0 = never), found ", a.promote_every);
    // The fast path sums a block in int32: addends below 2^(frac_bits+2), the carried c below 2^(frac_bits+1).
    if ((int64_t(a.block) << (a.frac_bits + 2)) + (int64_t(1) << (a.frac_bits + 1)) >= (int64_t(1) << 31))
        fail(who, ": Fp8Accum.block = ", a.block, " with frac_bits = ", a.frac_bits,
             " overflows the 32-bit block sum (need block * 2^(frac_bits+2) < 2^31)");
    // A promotion chunk applies one scale pair: the 128-tiles it spans must agree.
    const int chunk = a.promote_every > 0 ? a.promote_every : std::max(p.K, 1);
    if (chunk <= 128 && 128 % chunk == 0) return p;
    auto same_scales = [&](const ScaleMap& m, int rows, const char* name, int t0, int t, int t1) {
        for (int i = 0; m.s && i < rows; i += m.rows_per_scale)
            if (m.at(i, t) != m.at(i, t0))
                fail(who, ": promote_every = ", a.promote_every, " lets one promotion span 128-tiles ", t0, "..", t1,
                     " of K, but ", name, " differs between them (row ", i, "); the tensor core can apply a scale "
                     "only at a promotion: use promote_every = 128 or equal scales along K");
    };
    for (int k0 = 0; k0 < p.K; k0 += chunk) {
        const int t0 = k0 / 128, t1 = (std::min(p.K, k0 + chunk) - 1) / 128;
        for (int t = t0 + 1; t <= t1; ++t) {
            same_scales(p.sa, p.M, "scale_a", t0, t, t1);
            same_scales(p.sb, p.N, "scale_b", t0, t, t1);
        }
    }
    return p;
}
inline bool row_finite(const uint8_t* x, int K, Fp8Format f) {
    return std::all_of(x, x + K, [f](uint8_t q) { return fp8_is_finite(q, f); });
}
inline void store(const GemmProblem& p, int64_t idx, float v) { p.C[idx] = p.accumulate ? p.C[idx] + v : v; }
// A format's 256 codes decoded: values (exact; 0 for NaN and inf, whose rows give NaN outputs anyway) and alignment
// exponents (a very low sentinel for zeros, which never win a block's max).
constexpr int kZeroExponent = -1000;
struct CodeTable {
    float v[256];
    int32_t e[256];
    explicit CodeTable(Fp8Format f) {
        for (int c = 0; c < 256; ++c) {
            const float x = fp8_decode(uint8_t(c), f);
            v[c] = std::isfinite(x) ? x : 0.0f;
            e[c] = x == 0.0f || !std::isfinite(x) ? kZeroExponent : fp8_input_exponent(uint8_t(c), f);
        }
    }
};
struct CodeTables { CodeTable a, b; };  // of the two operands
// The plain version: the pseudo-code above, literally, in double arithmetic (every step below is exact in double:
// products of two FP8 values have at most 8 significant bits, and all sums are multiples of q spanning < 53 bits).
// Fp8Accum.exact: exact products and 128-chunk sums; each chunk scaled by sa·sb (exact in double).
inline float reference_exact(const GemmProblem& p, const CodeTables& t, const uint8_t* a, const uint8_t* b, int i,
                             int j) {
    double total = 0.0;
    for (int k0 = 0; k0 < p.K; k0 += 128) {
        double chunk = 0.0;
        for (int k = k0; k < std::min(p.K, k0 + 128); ++k) chunk += double(t.a.v[a[k]]) * t.b.v[b[k]];
        total = std::fma(chunk, double(p.sa.at(i, k0 / 128)) * double(p.sb.at(j, k0 / 128)), total);
    }
    return float(total);
}
// One block of products k in [b0, b1) into the tensor core's accumulator c: align, truncate, sum, truncate.
inline double reference_block(const GemmProblem& p, const CodeTables& t, const uint8_t* a, const uint8_t* b, int b0,
                              int b1, double c) {
    bool any = c != 0.0;
    int E = any ? std::ilogb(c) : INT_MIN;     // ilogb = floor(log2|c|)
    for (int k = b0; k < b1; ++k) {
        if (t.a.v[a[k]] == 0.0f || t.b.v[b[k]] == 0.0f) continue;   // zero products take no part
        E = std::max(E, t.a.e[a[k]] + t.b.e[b[k]]);
        any = true;
    }
    if (!any) return c;                        // only zeros and c == 0: c stays 0
    const double q = std::ldexp(1.0, E - p.acc.frac_bits);
    double s = std::trunc(c / q) * q;
    for (int k = b0; k < b1; ++k)   // toward zero: sign·floor(|p|/q)
        s += std::trunc(double(t.a.v[a[k]]) * t.b.v[b[k]] / q) * q;
    if (s != 0.0) {                            // keep frac_bits + 1 significant bits, toward zero
        const double unit = std::ldexp(1.0, std::ilogb(s) - p.acc.frac_bits);
        s = std::trunc(s / unit) * unit;
    }
    return s;
}
// One output: blocks restart at every promotion chunk; each promotion adds c · (sa·sb) to the FP32 accumulator.
inline float reference_output(const GemmProblem& p, const CodeTables& t, const uint8_t* a, const uint8_t* b, int i,
                              int j) {
    const int chunk_len = p.acc.promote_every > 0 ? p.acc.promote_every : std::max(p.K, 1);
    float acc32 = 0.0f;
    for (int k0 = 0; k0 < p.K; k0 += chunk_len) {
        const int k1 = std::min(p.K, k0 + chunk_len);
        double c = 0.0;                                                  // the tensor core's accumulator
        for (int b0 = k0; b0 < k1; b0 += p.acc.block)
            c = reference_block(p, t, a, b, b0, std::min(k1, b0 + p.acc.block), c);
        const float sab = p.sa.at(i, k0 / 128) * p.sb.at(j, k0 / 128);   // rounded to float once
        acc32 = std::fma(float(c), sab, acc32);                          // c is exact in float
    }
    return acc32;
}
inline void gemm_reference(const GemmProblem& p) {
    const CodeTables t{CodeTable(p.fa), CodeTable(p.fb)};
    for (int i = 0; i < p.M; ++i) {
        const uint8_t* a = p.A + int64_t(i) * p.K;
        for (int j = 0; j < p.N; ++j) {
            const uint8_t* b = p.B + int64_t(j) * p.K;
            const int64_t out = int64_t(i) * p.N + j;
            if (!row_finite(a, p.K, p.fa) || !row_finite(b, p.K, p.fb)) store(p, out, NAN);
            else store(p, out, p.acc.exact ? reference_exact(p, t, a, b, i, j) : reference_output(p, t, a, b, i, j));
        }
    }
}
// The fast version. One operand decoded (values and exponents of CodeTable), and whether each row is free of NaN/inf.
struct Decoded { std::vector<float> v; std::vector<int32_t> e; std::vector<uint8_t> finite; };
inline Decoded decode_operand(const uint8_t* X, int rows, int K, Fp8Format f) {
    const CodeTable t(f);
    Decoded d{std::vector<float>(size_t(rows) * size_t(K)), std::vector<int32_t>(size_t(rows) * size_t(K)),
              std::vector<uint8_t>(size_t(rows))};
    parallel_for(rows, [&](int64_t r) {
        for (int64_t k = r * K; k < (r + 1) * K; ++k) { d.v[size_t(k)] = t.v[X[k]]; d.e[size_t(k)] = t.e[X[k]]; }
        d.finite[size_t(r)] = row_finite(X + r * K, K, f);
    });
    return d;
}
// The tensor core's accumulator c = cm · 2^(E - frac_bits) as a float (exact: at most 24 significant bits), and
// ec = floor(log2|c|) (kZeroExponent while c == 0, so it never wins the alignment).
struct TensorCoreAcc { float c = 0.0f; int32_t ec = kZeroExponent; };
// One block of LEN products (LEN = 0: `len` at run time), in integers: with u = 2^(frac_bits - E) every addend x·u is
// an exact float below 2^(frac_bits+2), and float→int truncates toward zero, exactly trunc(x / q). The loops vectorize
// (max, mul, cvttps2dq, add); the rest is branch-free (random signs would mispredict a branch per block).
template <int LEN>
inline void tc_block(TensorCoreAcc& t, const float* av, const int32_t* ae, const float* bv, const int32_t* be, int len,
                     int frac_bits) {
    const int n = LEN > 0 ? LEN : len;
    int32_t E = t.ec;
    for (int k = 0; k < n; ++k) E = std::max(E, ae[k] + be[k]);
    // Only zeros and c == 0 leave E at the sentinel: then s = 0 whatever u is; -100 keeps u a normal float. Real
    // exponents are far above it (inputs >= -28, a non-zero c >= 2^(-28-23)).
    E = std::max(E, int32_t(-100));
    const float u = pow2f(frac_bits - E);
    int32_t s = int32_t(t.c * u);
    for (int k = 0; k < n; ++k) s += int32_t(av[k] * bv[k] * u);
    const int32_t neg = s >> 31;                          // 0 or -1
    uint32_t mag = uint32_t((s ^ neg) - neg);             // |s|
    const int len_bits = bit_length(mag | 1u);
    const int drop = std::max(len_bits - (frac_bits + 1), 0);
    mag = (mag >> drop) << drop;                          // truncate toward zero to frac_bits + 1 significant bits
    const int32_t kept = (int32_t(mag) ^ neg) - neg;
    t.c = float(kept) * pow2f(E - frac_bits);             // exact: at most 24 significant bits
    t.ec = kept != 0 ? E - frac_bits + len_bits - 1 : kZeroExponent;
}
// JB outputs (i, j0 .. j0+JB-1) at once: each block waits for the previous one's floor(log2|c|), ~60 cycles per 32
// products, and interleaving JB independent chains overlaps those latencies (about 3x faster than one at a time).
template <int JB>
inline void gemm_fast_outputs(const GemmProblem& p, const Decoded& da, const Decoded& db, int i, int j0) {
    const int K = p.K, block = p.acc.block, frac_bits = p.acc.frac_bits;
    const int chunk_len = p.acc.promote_every > 0 ? p.acc.promote_every : K;
    const float* av = da.v.data() + int64_t(i) * K;
    const int32_t* ae = da.e.data() + int64_t(i) * K;
    const float* bv[JB];
    const int32_t* be[JB];
    for (int jj = 0; jj < JB; ++jj) {
        bv[jj] = db.v.data() + int64_t(j0 + jj) * K;
        be[jj] = db.e.data() + int64_t(j0 + jj) * K;
    }
    float acc32[JB] = {};
    TensorCoreAcc t[JB];
    for (int k0 = 0; k0 < K; k0 += chunk_len) {
        const int k1 = std::min(K, k0 + chunk_len);
        for (int b0 = k0; b0 < k1; b0 += block) {
            const int n = std::min(block, k1 - b0);
            for (int jj = 0; jj < JB; ++jj) {
                if (n == 32) tc_block<32>(t[jj], av + b0, ae + b0, bv[jj] + b0, be[jj] + b0, 32, frac_bits);
                else tc_block<0>(t[jj], av + b0, ae + b0, bv[jj] + b0, be[jj] + b0, n, frac_bits);
            }
        }
        for (int jj = 0; jj < JB; ++jj) {   // promotion: c · (sa·sb) into the FP32 accumulator, c = 0
            const float sab = p.sa.at(i, k0 / 128) * p.sb.at(j0 + jj, k0 / 128);
            acc32[jj] = std::fma(t[jj].c, sab, acc32[jj]);
            t[jj] = TensorCoreAcc();
        }
    }
    for (int jj = 0; jj < JB; ++jj) store(p, int64_t(i) * p.N + j0 + jj, db.finite[size_t(j0 + jj)] ? acc32[jj] : NAN);
}
// Fp8Accum.exact for row i of C. Four partial sums per 128-chunk in a fixed order: for E4M3 every partial sum is
// exact (products are multiples of 2^-18 below 2^18), so the order cannot change the result.
inline void fast_exact_row(const GemmProblem& p, const Decoded& da, const Decoded& db, int i) {
    const int K = p.K;
    const float* av = da.v.data() + int64_t(i) * K;
    for (int j = 0; j < p.N; ++j) {
        const float* bv = db.v.data() + int64_t(j) * K;
        double total = 0.0;
        for (int k0 = 0; k0 < K; k0 += 128) {
            double part[4] = {0.0, 0.0, 0.0, 0.0};
            const int k1 = std::min(K, k0 + 128);
            int k = k0;
            for (; k + 4 <= k1; k += 4)
                for (int l = 0; l < 4; ++l) part[l] += double(av[k + l]) * double(bv[k + l]);
            for (; k < k1; ++k) part[0] += double(av[k]) * double(bv[k]);
            const double chunk = (part[0] + part[1]) + (part[2] + part[3]);
            total = std::fma(chunk, double(p.sa.at(i, k0 / 128)) * double(p.sb.at(j, k0 / 128)), total);
        }
        store(p, int64_t(i) * p.N + j, db.finite[size_t(j)] ? float(total) : NAN);
    }
}
// Same results bit for bit (K = 0 too: every output 0); rows of C in parallel, each written by one thread.
inline void gemm_fast(const GemmProblem& p) {
    if (int64_t(p.M) * p.N == 0) return;
    const Decoded da = decode_operand(p.A, p.M, p.K, p.fa), db = decode_operand(p.B, p.N, p.K, p.fb);
    parallel_for(p.M, [&](int64_t i64) {
        const int i = int(i64);
        if (!da.finite[size_t(i)]) {
            for (int j = 0; j < p.N; ++j) store(p, int64_t(i) * p.N + j, NAN);
        } else if (p.acc.exact) {
            fast_exact_row(p, da, db, i);
        } else {
            int j = 0;
            for (; j + 4 <= p.N; j += 4) gemm_fast_outputs<4>(p, da, db, i, j);
            for (; j < p.N; ++j) gemm_fast_outputs<1>(p, da, db, i, j);
        }
    });
}
inline GemmProblem make_problem(const uint8_t* A, Fp8Format fa, const float* scale_a, const uint8_t* B, Fp8Format fb,
                                const float* scale_b, float* C, int M, int N, int K, const Fp8Accum& acc) {
    const int kt = fp8_tiles(std::max(K, 0));
    return GemmProblem{A, fa, ScaleMap{scale_a, 1, kt}, B, fb, ScaleMap{scale_b, 128, kt}, C, M, N, K, acc, false};
}
}  // namespace fp8_detail
// C[M, N] = A[M, K] · B[N, K]ᵀ with E4M3 A and B, simulated on the H100 accumulator model above.
// scale_a: [M, ceil(K/128)] per 1×128 tile, scale_b: [ceil(N/128), ceil(K/128)] per 128×128 block (null = ones).
inline void fp8_gemm(const uint8_t* A, const float* scale_a, const uint8_t* B, const float* scale_b, float* C, int M,
                     int N, int K, const Fp8Accum& acc = {}) {
    using namespace fp8_detail;
    gemm_fast(check_gemm(make_problem(A, Fp8Format::e4m3, scale_a, B, Fp8Format::e4m3, scale_b, C, M, N, K, acc),
                         "fp8_gemm"));
}
// The same, written plainly for reading and for the tests (slow: one double-precision pass per block).
inline void fp8_gemm_reference(const uint8_t* A, const float* scale_a, const uint8_t* B, const float* scale_b, float* C,
                               int M, int N, int K, const Fp8Accum& acc = {}) {
    using namespace fp8_detail;
    gemm_reference(check_gemm(make_problem(A, Fp8Format::e4m3, scale_a, B, Fp8Format::e4m3, scale_b, C, M, N, K, acc),
                              "fp8_gemm_reference"));
}
// Mixed formats (Hopper's FP8 WGMMA also takes E4M3 × E5M2; E5M2 × E5M2 is simulated the same way). The accumulator
// model is unchanged: E5M2 values enter with their own exponents (subnormals at -14).
inline void fp8_gemm_mixed(const uint8_t* A, Fp8Format format_a, const float* scale_a, const uint8_t* B,
                           Fp8Format format_b, const float* scale_b, float* C, int M, int N, int K,
                           const Fp8Accum& acc = {}) {
    using namespace fp8_detail;
    gemm_fast(check_gemm(make_problem(A, format_a, scale_a, B, format_b, scale_b, C, M, N, K, acc), "fp8_gemm_mixed"));
}

// --- 8.4 the FP8 linear layer (V3 recipe, §3.3 and Figure 6) ---------------------------------------------------------
// The three GEMMs of y = x·Wᵀ in E4M3, promotion every 128, float32 outputs, as the model's float matmul:
//   y[T,out] = x[T,in] · W[out,in]ᵀ;  dx[T,in] += dy[T,out] · W[out,in];  dW[out,in] += dy[T,out]ᵀ · x[T,in]
// (dx or dW may be null). Fprop: x in 1×128 tiles along in, W in 128×128 blocks. Dgrad: dy in 1×128 tiles along out,
// W's codes and block scales transposed, the blocks still 128×128 (why V3 chose square weight blocks). Wgrad: dy and
// x in 128×1 tiles along the tokens, the reduction dimension (V3 re-quantizes its FP8 cache of x; here the float x is
// quantized directly, one rounding fewer).
namespace fp8_detail {
inline void check_linear(const char* who, int T, int in, int out) {
    if (T < 0 || in < 0 || out < 0) fail(who, ": sizes must be non-negative, found T=", T, " in=", in, " out=", out);
}
struct Quantized { std::vector<uint8_t> q; std::vector<float> s; };   // one operand's codes and scales
// x: [rows, cols] in 1×128 tiles (tile_rows = 1) or 128×128 blocks (tile_rows = 128).
inline Quantized quantize(const float* x, int rows, int cols, int tile_rows) {
    Quantized r{std::vector<uint8_t>(size_t(rows) * size_t(cols)),
                std::vector<float>(size_t((rows + tile_rows - 1) / tile_rows) * size_t(fp8_tiles(cols)))};
    quantize_tiles("fp8 linear layer", x, rows, cols, tile_rows, r.q.data(), r.s.data(), false);
    return r;
}
// x: [rows, cols] in 128×1 tiles, transposed: [cols, rows] in 1×128 tiles (Wgrad's operands).
inline Quantized quantize_transposed(const float* x, int rows, int cols) {
    return quantize(transposed(x, rows, cols).data(), cols, rows, 1);
}
// Wᵀ: [in, out] for the blocks of W: [out, in]: the same codes and block scales, both transposed.
inline Quantized transposed_blocks(const Quantized& w, int out, int in) {
    return {transposed(w.q.data(), out, in), transposed(w.s.data(), fp8_tiles(out), fp8_tiles(in))};
}
// C[M, N] (+)= A·Bᵀ with promotion every 128; A in 1×128 tiles, B's scales cover b_rows_per_scale rows each.
inline void linear_gemm(const char* who, const Quantized& a, const Quantized& b, int b_rows_per_scale, float* C, int M,
                        int N, int K, bool accumulate) {
    const int kt = fp8_tiles(K);
    gemm_fast(check_gemm(GemmProblem{a.q.data(), Fp8Format::e4m3, ScaleMap{a.s.data(), 1, kt}, b.q.data(),
                                     Fp8Format::e4m3, ScaleMap{b.s.data(), b_rows_per_scale, kt}, C, M, N, K,
                                     Fp8Accum{}, accumulate},
                         who));
}
}  // namespace fp8_detail
inline void fp8_matmul_forward(float* y, const float* x, const float* W, int T, int in, int out) {
    DSV3_PROFILE_KERNEL();
    using namespace fp8_detail;
    check_linear("fp8_matmul_forward", T, in, out);
    if (int64_t(T) * out == 0) return;
    if (!y || (int64_t(T) * in > 0 && (!x || !W))) fail("fp8_matmul_forward: null y, x or W");
    linear_gemm("fp8_gemm", quantize(x, T, in, 1), quantize(W, out, in, 128), 128, y, T, out, in, false);
}
inline void fp8_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int in,
                                int out) {
    DSV3_PROFILE_KERNEL();
    using namespace fp8_detail;
    check_linear("fp8_matmul_backward", T, in, out);
    if (dx && int64_t(T) * in > 0) {   // Dgrad: dx[T, in] += dy[T, out] · W[out, in]; K = out
        if (int64_t(out) > 0 && (!dy || !W)) fail("fp8_matmul_backward: null dy or W for dx");
        linear_gemm("fp8_matmul_backward (Dgrad)", quantize(dy, T, out, 1),
                    transposed_blocks(quantize(W, out, in, 128), out, in), 128, dx, T, in, out, true);
    }
    if (dW && int64_t(out) * in > 0) {  // Wgrad: dW[out, in] += dy[T, out]ᵀ · x[T, in]; K = T
        if (T > 0 && (!dy || !x)) fail("fp8_matmul_backward: null dy or x for dW");
        linear_gemm("fp8_matmul_backward (Wgrad)", quantize_transposed(dy, T, out), quantize_transposed(x, T, in), 1,
                    dW, out, in, T, true);
    }
}
// The routed experts' FP8 layers: fp8_matmul_forward / _backward on each expert's rows, with the offsets and weight
// layout of grouped_matmul (section 3.10). Each expert's product is quantized on its own (the Wgrad's 128×1 tiles
// start at the expert's first row), so this loop is the definition; cuda/fp8.cuh runs every expert's product in one
// launch of its FP8 GEMM and gives the same bits.
inline void fp8_grouped_matmul_forward(float* y, const float* x, const float* W, int64_t w_stride,
                                       const int64_t* offsets, int groups, int in, int out) {
    check_group_offsets("fp8_grouped_matmul_forward", offsets, groups, in, out);
    for (int g = 0; g < groups; ++g) {
        const int64_t begin = offsets[g], rows = offsets[g + 1] - begin;
        if (rows > 0) fp8_matmul_forward(y + begin * out, x + begin * in, W + g * w_stride, int(rows), in, out);
    }
}
inline void fp8_grouped_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                                        int64_t w_stride, const int64_t* offsets, int groups, int in, int out) {
    check_group_offsets("fp8_grouped_matmul_backward", offsets, groups, in, out);
    for (int g = 0; g < groups; ++g) {
        const int64_t begin = offsets[g], rows = offsets[g + 1] - begin;
        if (rows > 0)
            fp8_matmul_backward(dx ? dx + begin * in : nullptr, dW ? dW + g * w_stride : nullptr, dy + begin * out,
                                x + begin * in, W + g * w_stride, int(rows), in, out);
    }
}

// --- 8.5 LogFMT: a logarithmic format for communication ["Insights into DeepSeek-V3", arXiv 2505.09343, §3.2] ------
// LogFMT-nBit codes an element of a 1×128 tile as a sign bit S and an (n−1)-bit integer K, the tile's magnitudes
// spaced evenly in LOG space between its smallest and largest nonzero ones, min = log|x|_min and max = log|x|_max:
//     K = 0: zero;   K = 1 .. L (L = 2^(n−1) − 1):   |x| = exp(min + step·(K − 1)),   step = (max − min) / (L − 1)
// min is clamped to at least max − log(2^32), a range like a float's with 5 exponent bits. Rounding is in LINEAR
// space, "for unbiased activation quantization": to the nearer level (ties to the even K); below the smallest level,
// to it or zero. Unlike E4M3's levels, fixed up to the tile's scale, these follow the tile's own range. The paper
// found LogFMT-8 more accurate than E4M3 and E5M2 and LogFMT-10 close to BF16 (examples/logfmt.cpp compares them),
// but did not deploy it: a log and exps per element cost too much of the GPU's bandwidth (cuda/dev_logfmt.cu measures
// it). A tile keeps min and step as floats; ±inf saturate to the largest level; a NaN makes step NaN, and so every
// nonzero element of its tile.
struct LogFmtTile { float min = 0, step = 0; };
namespace logfmt_detail {
constexpr float kRange = 22.18070977791825f;   // log(2^32) = 32·ln 2: the widest tile, max − min
inline float level(const LogFmtTile& t, int K) { return std::exp(t.min + t.step * float(K - 1)); }
// The tile of x[0, n) for L levels.
inline LogFmtTile tile_of(const float* x, int n, int L) {
    float amax = 0, amin = FLT_MAX;
    bool nan = false, inf = false;
    for (int i = 0; i < n; ++i) {
        const float a = std::fabs(x[i]);
        nan |= a != a;
        inf |= a > FLT_MAX;
        if (a > 0 && a <= FLT_MAX) amax = std::max(amax, a), amin = std::min(amin, a);
    }
    if (amax == 0 && inf) amax = amin = FLT_MAX;   // only zeros and infinities: one level, the largest float
    LogFmtTile t;
    if (amax > 0) {
        const float hi = std::log(amax);
        t.min = std::max(std::log(amin), hi - kRange);
        t.step = (hi - t.min) / float(L - 1);
    }
    if (nan) t.step = NAN;
    return t;
}
// K of a magnitude a > 0: the level at or below a (from the log, corrected by one where its rounding misses), then
// the nearer of it and the next, in linear space.
inline int encode_magnitude(float a, const LogFmtTile& t, int L) {
    if (!(t.step >= 0)) return 1;                      // a NaN tile
    a = std::min(a, FLT_MAX);
    int K = t.step > 0 ? int(std::clamp((std::log(a) - t.min) / t.step, -1.0f, float(L))) + 1 : 1;
    K = std::clamp(K, 1, L);
    while (K > 1 && level(t, K) > a) --K;
    while (K < L && t.step > 0 && level(t, K + 1) <= a) ++K;
    const float lo = level(t, K);
    if (a < lo) return 2 * a <= lo ? 0 : 1;            // below the smallest level: zero or it, whichever is nearer
    if (K == L || t.step == 0) return K;
    const float dlo = a - lo, dhi = level(t, K + 1) - a;
    return dlo < dhi || (dlo == dhi && K % 2 == 0) ? K : K + 1;
}
inline void check(const char* who, int rows, int cols, int bits, const void* a, const void* b, const void* c) {
    if (rows < 0 || cols < 0) fail(who, ": shape must be non-negative, found [", rows, ", ", cols, "]");
    if (bits < 3 || bits > 16) fail(who, ": bits must be in [3, 16] (the paper's n = 8 or 10), found ", bits);
    if (int64_t(rows) * cols > 0 && (!a || !b || !c)) fail(who, ": null pointer for a [", rows, ", ", cols, "] tensor");
}
}  // namespace logfmt_detail
// x: [rows, cols] → codes: [rows, cols] (the low `bits` bits of each: S at bit bits−1, then K), tiles: [rows,
// ceil(cols/128)] (a row's last tile is partial when cols % 128 != 0). Tiles in parallel, each on its own.
inline void logfmt_encode(const float* x, int rows, int cols, int bits, uint16_t* codes, LogFmtTile* tiles) {
    logfmt_detail::check("logfmt_encode", rows, cols, bits, x, codes, tiles);
    const int ct = fp8_tiles(cols), L = (1 << (bits - 1)) - 1;
    parallel_for(int64_t(rows) * ct, [&](int64_t b) {
        const int64_t at = b / ct * cols + b % ct * 128;
        const int n = std::min(128, cols - int(b % ct) * 128);
        const LogFmtTile t = tiles[b] = logfmt_detail::tile_of(x + at, n, L);
        for (int i = 0; i < n; ++i) {
            const float v = x[at + i], a = std::fabs(v);
            const int K = a == 0 ? 0 : logfmt_detail::encode_magnitude(a, t, L);
            codes[at + i] = uint16_t((std::signbit(v) ? 1u << (bits - 1) : 0u) | unsigned(K));
        }
    });
}
inline void logfmt_decode(const uint16_t* codes, const LogFmtTile* tiles, int rows, int cols, int bits, float* x) {
    logfmt_detail::check("logfmt_decode", rows, cols, bits, codes, tiles, x);
    const int ct = fp8_tiles(cols);
    const unsigned sign = 1u << (bits - 1);
    parallel_for(rows, [&](int64_t r) {
        for (int c = 0; c < cols; ++c) {
            const unsigned q = codes[r * cols + c], K = q & (sign - 1);
            const float a = K == 0 ? 0.0f : logfmt_detail::level(tiles[r * ct + c / 128], int(K));
            x[r * cols + c] = q & sign ? -a : a;
        }
    });
}

// =====================================================================================================================
// 9. PARALLELISM: DATA PARALLEL AND EXPERT PARALLEL OVER RANKS   [V3 §3.2; Fire-Flyer AI-HPC §IV, arXiv 2408.14158]
// =====================================================================================================================
// A "rank" is one worker with its own memory (one GPU in a real run); ranks cooperate only through the collectives
// below, so every byte that moves between them is visible here. Data parallel (DP): every rank holds a replica, runs
// forward/backward on its share of the batch, and sums gradients and expert loads over the ranks, so every replica
// takes the same AdamW step and bias update [V3 §2.1.2] (9.5). Expert parallel (EP): rank r owns the routed experts
// [r·N/R, (r+1)·N/R), and the tokens travel to their experts and back (9.4); all else stays data parallel.
// One primitive, sendrecv (9.1), carries the collectives (9.2): in-process (9.3), over MPI between processes on any
// machines (9.3b), and in cuda/ as cudaMemcpyPeerAsync between GPUs. No floating-point atomics anywhere: every sum
// has a fixed order.

// --- 9.1 the communication interface ---------------------------------------------------------------------------------
class Communicator {
  public:
    virtual ~Communicator() = default;
    virtual int rank() const = 0;
    virtual int world_size() const = 0;
    virtual void barrier() = 0;  // every rank waits until all have arrived
    // By all ranks together: send `send_bytes` to rank `to`, receive `recv_bytes` (exactly what it sends: checked)
    // from rank `from` into `recv`. Returns when both are done, so the send buffer may be reused at once.
    virtual void sendrecv(const void* send, size_t send_bytes, int to, void* recv, size_t recv_bytes, int from) = 0;
};

// --- 9.2 collectives, written once on sendrecv ---------------------------------------------------------------------
enum class ReduceOp { sum, mean };
inline int ring_mod(int a, int R) { return ((a % R) + R) % R; }
// all_reduce: data[i] ← Σ_ranks data[i] (÷ R for mean) on every rank; data: [n], any n (chunks may be empty).
// Ring algorithm (Patarasuk & Yuan 2009; NCCL's ring) over R chunks, chunk c = [n·c/R, n·(c+1)/R):
//   reduce-scatter, R−1 steps: at step s rank r sends its partial sum of chunk r−s to rank r+1 and adds the one of
//     chunk r−s−1 arriving from rank r−1 to its own values; then rank r holds chunk r+1 complete.
//   all-gather, R−1 steps: each complete chunk travels once around the ring, copied, not added.
// Each rank sends and receives 2(R−1)/R of the buffer, whatever R: the ring is bandwidth-optimal.
// Determinism. Chunk c is summed in the fixed order ((x_c + x_{c+1}) + x_{c+2}) + … + x_{c−1} (ranks mod R), the
// arriving partial sum always the left operand, and the all-gather copies that one result everywhere: all ranks hold
// bitwise the same sums, on every run. Chunk 0 is the serial sum ((x_0 + x_1) + x_2) + …; the others rotate its order,
// which float addition keeps only for R ≤ 2: bitwise the serial sum for 1 or 2 ranks, else within a few ulps of Σ|x|.
template <class T>
inline void all_reduce(Communicator& comm, T* data, size_t n, ReduceOp op = ReduceOp::sum) {
    const int R = comm.world_size(), r = comm.rank();
    if (R > 1) {
        auto begin = [&](int c) { return n * size_t(c) / size_t(R); };
        auto bytes = [&](int c) { return (begin(c + 1) - begin(c)) * sizeof(T); };
        const int next = ring_mod(r + 1, R), prev = ring_mod(r - 1, R);
        std::vector<T> incoming(n / size_t(R) + 1);  // [largest chunk]: the receive buffer of one step
        for (int s = 0; s < R - 1; ++s) {            // reduce-scatter
            const int send_c = ring_mod(r - s, R), recv_c = ring_mod(r - s - 1, R);
            comm.sendrecv(data + begin(send_c), bytes(send_c), next, incoming.data(), bytes(recv_c), prev);
            T* mine = data + begin(recv_c);
            for (size_t i = 0, e = begin(recv_c + 1) - begin(recv_c); i < e; ++i) mine[i] = incoming[i] + mine[i];
        }
        for (int s = 0; s < R - 1; ++s) {            // all-gather
            const int send_c = ring_mod(r + 1 - s, R), recv_c = ring_mod(r - s, R);
            comm.sendrecv(data + begin(send_c), bytes(send_c), next, data + begin(recv_c), bytes(recv_c), prev);
        }
    }
    if (op == ReduceOp::mean) {
        if constexpr (std::is_floating_point_v<T>) for (size_t i = 0; i < n; ++i) data[i] /= T(R);
        else fail("all_reduce: mean of integers is not supported (reduce with sum and divide where needed)");
    }
}
// all_to_all: every rank sends send_rows[q] rows of `row` elements to every rank q and receives recv_rows[q] rows
// (from exchange_counts, or known to both sides) from every rank q. send: [Σ send_rows, row] grouped by destination,
// recv: [Σ recv_rows, row] grouped by source, in rank order. Pairwise exchange in R−1 rounds: in round s rank r sends
// to r+s and receives from r−s, one message each way, so no round can deadlock; a rank's own rows are a local copy.
template <class T>
inline void all_to_all(Communicator& comm, const T* send, const std::vector<int64_t>& send_rows, int64_t row, T* recv,
                       const std::vector<int64_t>& recv_rows) {
    const int R = comm.world_size(), r = comm.rank();
    std::vector<int64_t> send_at(size_t(R) + 1, 0), recv_at(size_t(R) + 1, 0);  // row offsets per rank
    std::partial_sum(send_rows.begin(), send_rows.begin() + R, send_at.begin() + 1);
    std::partial_sum(recv_rows.begin(), recv_rows.begin() + R, recv_at.begin() + 1);
    if (send_rows[size_t(r)] != recv_rows[size_t(r)]) fail("all_to_all: rank ", r, " sends itself a different count");
    std::copy(send + send_at[size_t(r)] * row, send + send_at[size_t(r) + 1] * row, recv + recv_at[size_t(r)] * row);
    for (int s = 1; s < R; ++s) {
        const int to = ring_mod(r + s, R), from = ring_mod(r - s, R);
        comm.sendrecv(send + send_at[size_t(to)] * row, size_t(send_rows[size_t(to)] * row) * sizeof(T), to,
                      recv + recv_at[size_t(from)] * row, size_t(recv_rows[size_t(from)] * row) * sizeof(T), from);
    }
}
// exchange_counts: counts[q] = rows this rank will send to rank q; returns the rows each rank will send to this one.
// The first half of every all-to-all (a receiver must know the sizes first), itself an all-to-all of one count a rank.
inline std::vector<int64_t> exchange_counts(Communicator& comm, const std::vector<int64_t>& counts) {
    const int R = comm.world_size();
    if (int(counts.size()) != R) fail("exchange_counts: ", counts.size(), " counts for ", R, " ranks");
    const std::vector<int64_t> one(size_t(R), 1);
    std::vector<int64_t> incoming(size_t(R), 0);
    all_to_all(comm, counts.data(), one, 1, incoming.data(), one);
    return incoming;
}

// --- 9.3 ranks in one process: threads with their own buffers --------------------------------------------------------
// R ranks are R std::threads (run_ranks), each with its own Model, buffers and InProcessComm. A sendrecv posts the
// send buffer, barrier, copies what the peer posted for it, barrier (nobody reuses a buffer a peer is still reading);
// the barrier's mutex orders the memory accesses. A rank that throws aborts the others' barriers (no hang).
struct RankAborted : Error {
    explicit RankAborted(int rank) : Error("rank " + std::to_string(rank) + ": stopped because another rank failed") {}
};
class InProcessGroup {
  public:
    explicit InProcessGroup(int world) : world_(world), posted_(size_t(std::max(world, 1))) {
        if (world < 1) fail("InProcessGroup: world size must be >= 1, found ", world);
    }
    int world_size() const { return world_; }
    void barrier(int rank) {
        std::unique_lock<std::mutex> lock(mu_);
        if (aborted_) throw RankAborted(rank);
        const uint64_t generation = generation_;
        if (++arrived_ == world_) {
            arrived_ = 0;
            ++generation_;
            cv_.notify_all();
            return;
        }
        cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
        if (generation_ == generation) throw RankAborted(rank);
    }
    void abort() {
        std::lock_guard<std::mutex> lock(mu_);
        aborted_ = true;
        cv_.notify_all();
    }
  private:
    friend class InProcessComm;
    struct Posted { const void* data = nullptr; size_t bytes = 0; int to = -1; };
    int world_;
    std::vector<Posted> posted_;  // [R]: what each rank offers in the current sendrecv
    std::mutex mu_;
    std::condition_variable cv_;
    int arrived_ = 0;
    uint64_t generation_ = 0;
    bool aborted_ = false;
};
class InProcessComm : public Communicator {
  public:
    InProcessComm(InProcessGroup& group, int rank) : group_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int world_size() const override { return group_.world_size(); }
    void barrier() override { group_.barrier(rank_); }
    void sendrecv(const void* send, size_t send_bytes, int to, void* recv, size_t recv_bytes, int from) override {
        group_.posted_[size_t(rank_)] = {send, send_bytes, to};
        barrier();
        const InProcessGroup::Posted& p = group_.posted_[size_t(from)];
        if (p.to != rank_ || p.bytes != recv_bytes)
            fail("sendrecv: rank ", rank_, " expects ", recv_bytes, " bytes from rank ", from, ", which sends ",
                 p.bytes, " bytes to rank ", p.to);
        if (recv_bytes) std::memcpy(recv, p.data, recv_bytes);
        bytes_received += recv_bytes;
        barrier();
    }
    int64_t bytes_received = 0;  // traffic counter: what arrived from other ranks
  private:
    InProcessGroup& group_;
    int rank_;
};
// Runs body(comm) for ranks 0..world−1, one thread each, and waits for all. The OpenMP threads are shared out (at
// least one each); results do not depend on it (section 2). The first error of any rank is rethrown here.
template <class Body>
inline void run_ranks(int world, const Body& body) {
    InProcessGroup group(world);
    std::vector<std::exception_ptr> errors(static_cast<size_t>(world));
    std::vector<std::thread> threads;
    [[maybe_unused]] const int omp_threads = std::max(1, thread_count() / world);
    for (int r = 0; r < world; ++r)
        threads.emplace_back([&, r] {
#ifdef _OPENMP
            omp_set_num_threads(omp_threads);
#endif
            try {
                InProcessComm comm(group, r);
                body(comm);
            } catch (...) {
                errors[size_t(r)] = std::current_exception();
                group.abort();
            }
        });
    for (std::thread& t : threads) t.join();
    std::exception_ptr first_aborted;
    for (std::exception_ptr& e : errors) {
        if (!e) continue;
        try { std::rethrow_exception(e); }
        catch (const RankAborted&) { if (!first_aborted) first_aborted = e; }
        catch (...) { throw; }  // the rank that actually failed
    }
    if (first_aborted) std::rethrow_exception(first_aborted);
}
// Rows [first, first + count) of a batch of B rows that rank r of R works on: contiguous, sizes differing by at most
// one, in rank order, so that "all ranks' rows" are the whole batch in order.
struct RowShare { int first = 0, count = 0; };
inline RowShare row_share(int B, int R, int r) {
    const int first = int(int64_t(B) * r / R), last = int(int64_t(B) * (r + 1) / R);
    return {first, last - first};
}

// --- 9.3b ranks in separate processes, on one machine or many: MPI (optional: compiled only with -DDSV3_MPI) ---------
// One process per rank (Open MPI: Debian's libopenmpi-dev and openmpi-bin; `make mpi` builds build/train_mpi).
// sendrecv is MPI_Sendrecv on a private copy of MPI_COMM_WORLD, on host memory (the GPU build stages device buffers:
// cuda/comm.cuh); everything above runs on it unchanged, bitwise as on thread ranks. run_mpi is run_ranks for this
// process's rank: a rank that throws prints its error and calls MPI_Abort, ending the whole job (exit code 1).
#ifdef DSV3_MPI
}  // namespace dsv3
#define OMPI_SKIP_MPICXX 1  // MPI's C API only (its C++ bindings are deprecated)
#include <mpi.h>
namespace dsv3 {
class MpiCommunicator : public Communicator {
  public:
    explicit MpiCommunicator(MPI_Comm parent = MPI_COMM_WORLD) {
        check(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
        MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);  // MPI errors come back as codes and become Errors
        MPI_Comm_rank(comm_, &rank_);
        MPI_Comm_size(comm_, &world_);
    }
    ~MpiCommunicator() override { int done = 0; MPI_Finalized(&done); if (!done) MPI_Comm_free(&comm_); }
    MpiCommunicator(const MpiCommunicator&) = delete;
    MpiCommunicator& operator=(const MpiCommunicator&) = delete;
    int rank() const override { return rank_; }
    int world_size() const override { return world_; }
    void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }
    // MPI counts are ints: pieces of at most 1 GiB (a side with fewer pieces idles: MPI_PROC_NULL). A receive size
    // that is not the sender's is reported (MPI reports a longer message as truncated).
    void sendrecv(const void* send, size_t send_bytes, int to, void* recv, size_t recv_bytes, int from) override {
        constexpr size_t piece = size_t(1) << 30;
        for (size_t at = 0; at == 0 || at < std::max(send_bytes, recv_bytes); at += piece) {
            const bool s_on = at == 0 || at < send_bytes, r_on = at == 0 || at < recv_bytes;
            const int s = s_on ? int(std::min(piece, send_bytes - at)) : 0;
            const int r = r_on ? int(std::min(piece, recv_bytes - at)) : 0;
            MPI_Status status;
            int got = -1;
            const int e = MPI_Sendrecv(static_cast<const char*>(send) + (s_on ? at : 0), s, MPI_BYTE,
                                       s_on ? to : MPI_PROC_NULL, 0, static_cast<char*>(recv) + (r_on ? at : 0), r,
                                       MPI_BYTE, r_on ? from : MPI_PROC_NULL, 0, comm_, &status);
            if (e == MPI_SUCCESS) MPI_Get_count(&status, MPI_BYTE, &got);
            if (got != r)
                fail("sendrecv: rank ", rank_, " expects ", recv_bytes, " bytes from rank ", from, e == MPI_SUCCESS
                     ? ", which sends " + std::to_string(at + size_t(got)) + " bytes" : ": " + error_text(e));
        }
        bytes_received += int64_t(recv_bytes);
    }
    int64_t bytes_received = 0;  // traffic counter, as InProcessComm's
  private:
    MPI_Comm comm_ = MPI_COMM_NULL;
    int rank_ = 0, world_ = 1;
    static std::string error_text(int code) {
        char text[MPI_MAX_ERROR_STRING];
        int n = 0;
        MPI_Error_string(code, text, &n);
        return std::string(text, size_t(n));
    }
    void check(int code, const char* what) const {
        if (code != MPI_SUCCESS) fail(what, ": rank ", rank_, ": ", error_text(code));
    }
};
// body(comm) as this process's rank, between MPI_Init and MPI_Finalize. A machine's OpenMP threads are shared out
// among its ranks (unless OMP_NUM_THREADS is set); on the GPU backend its k-th rank takes GPU k mod (its GPUs).
template <class Body>
inline void run_mpi(int& argc, char**& argv, const Body& body) {
    // The overlapped gradient all-reduce (9.5) calls MPI from its communication thread, never while the rank's own
    // thread does: MPI_THREAD_SERIALIZED.
    int provided = MPI_THREAD_SINGLE;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
    int rank = 0, local = 0, per_machine = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    try {
        if (provided < MPI_THREAD_SERIALIZED)
            fail("run_mpi: this MPI provides thread level ", provided, ", below MPI_THREAD_SERIALIZED (",
                 MPI_THREAD_SERIALIZED, "), which the overlapped gradient all-reduce needs");
        MPI_Comm machine;
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &machine);
        MPI_Comm_rank(machine, &local);
        MPI_Comm_size(machine, &per_machine);
        MPI_Comm_free(&machine);
#ifdef _OPENMP
        if (!std::getenv("OMP_NUM_THREADS")) omp_set_num_threads(std::max(1, thread_count() / per_machine));
#endif
#ifdef DSV3_BACKEND_CUDA
        int gpus = 0;
        DSV3_CUDA_CHECK(cudaGetDeviceCount(&gpus));
        if (gpus > 0) DSV3_CUDA_CHECK(cudaSetDevice(local % gpus));
#endif
        MpiCommunicator comm;
        body(comm);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: rank %d: %s\n", rank, e.what());
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Finalize();
}
#endif  // DSV3_MPI
// 9.4-9.5 move activations and gradients with backend::all_reduce / all_to_all: 9.2's on the CPU, cuda/comm.cuh's
// (the same schedules over peer copies) with DSV3_BACKEND_CUDA. Host data (counts, ids, losses) uses 9.2's everywhere.
}  // namespace dsv3
#if defined(DSV3_BACKEND_CUDA)
#include "cuda/comm.cuh"
#endif
namespace dsv3 {

// --- 9.4 expert parallelism: dispatch, local experts, combine   [V3 §3.2] ------------------------------------------
// Per MoE layer, on rank r, with n tokens routed locally (chosen: [n, K], perm: the grouping of section 3.10), the
// forward 1. plans, for each rank q, the tokens with a chosen expert on q (each listed ONCE) and the (token, choice)
// pairs of those experts, in (token, choice) order; 2. dispatches the token rows x: [sent, d] and their expert ids
// [sent, K] (counts first); 3. on the owner, groups the received pairs by local expert (3.10's counting sort, experts
// owned elsewhere in one extra bucket that never runs) and runs the local experts; 4. combines: every pair's output
// row goes back to its source, in step 1's order, into the row of c.ye the single-rank layer uses, which weights and
// sums them (moe_unpermute_forward, unchanged). The backward reverses the two transfers: the owner runs its experts'
// backward (weight gradients stay there), and the input-gradient rows come back to be summed in choice order
// (moe_permute_backward, unchanged).
// The plan is host work on small integer arrays; the rows stay in backend memory. Traffic per token: one dispatched
// row per destination rank (with n_expert_groups = R, group-limited routing allows at most n_limited_groups: V3's
// node-limited routing, M = 4, §2.1.2), and K combined rows. V3's combine accumulates on the way back (§3.2
// "NVLink-to-IB forwarding and accumulation"), in a sum order that depends on where the experts live; returning every
// row keeps the result BITWISE the single-rank layer's (tested), since (a) a matmul row does not depend on the other
// rows (3.1), (b) each expert sees its rows in global token order (ranks hold consecutive rows, receivers concatenate
// by source rank, the counting sort is stable), and (c) with equal shares over R = 2^k ranks the per-rank loss
// gradient (1/n_r) is exactly R times the full-batch one (1/n), a power of two.
// Rows travel in FP32 unless fp8_dispatch or dispatch_codec says otherwise. FP8 dispatch [V3 §3.3.3 "Low-Precision
// Communication"]: V3 dispatches the inputs of the MoE up-projections in FP8 (1x128 tiles, power-of-two scales; the
// combine stays BF16). A row of d values travels as d E4M3 codes and per tile its scale's exponent in a byte (as MX's
// E8M0 scales): fp8_row_bytes(d) = d + ceil(d/128), 0.504 of BF16's 2d at d = 7168; the receiver decodes exactly what
// quantize_tiles_1x128 + dequantize_tiles_1x128 (pow2_scale) give the sender. rows: [n, d]; packed: [n, row].
inline int64_t fp8_row_bytes(int d) { return int64_t(d) + fp8_tiles(d); }
inline void fp8_pack_rows(const float* rows, int64_t n, int d, uint8_t* packed) {
    const int tiles = fp8_tiles(d);
    std::vector<uint8_t> q(size_t(n) * size_t(d));
    std::vector<float> scales(size_t(n) * size_t(tiles));
    quantize_tiles_1x128(rows, int(n), d, q.data(), scales.data(), /*pow2_scale=*/true);
    for (int64_t i = 0; i < n; ++i) {
        uint8_t* out = packed + i * fp8_row_bytes(d);
        std::memcpy(out, q.data() + i * d, size_t(d));
        for (int t = 0; t < tiles; ++t)   // scale = 2^k, k in [-126, 120] (FLT_MIN .. FLT_MAX/448 rounded up): k + 127
            out[d + t] = uint8_t(std::ilogb(scales[size_t(i * tiles + t)]) + 127);
    }
}
inline void fp8_unpack_rows(const uint8_t* packed, int64_t n, int d, float* rows) {
    const int tiles = fp8_tiles(d);
    std::vector<uint8_t> q(size_t(n) * size_t(d));
    std::vector<float> scales(size_t(n) * size_t(tiles));
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* in = packed + i * fp8_row_bytes(d);
        std::memcpy(q.data() + i * d, in, size_t(d));
        for (int t = 0; t < tiles; ++t) scales[size_t(i * tiles + t)] = std::ldexp(1.0f, int(in[d + t]) - 127);
    }
    dequantize_tiles_1x128(q.data(), scales.data(), int(n), d, rows);
}
class ExpertParallel : public ExpertRunner {
  public:
    ExpertParallel(Communicator& comm, const Config& c) : comm_(comm), n_experts_(c.n_routed_experts) {
        if (n_experts_ < comm.world_size())
            fail("ExpertParallel: ", n_experts_, " routed experts cannot be split over ", comm.world_size(), " ranks");
    }
    int first_expert(int r) const { return int(int64_t(r) * n_experts_ / comm_.world_size()); }
    // The rank r with first_expert(r) <= e < first_expert(r + 1): r·N/R <= e exactly when r < (e + 1)·R/N.
    int owner(int e) const { return int((int64_t(e + 1) * comm_.world_size() - 1) / n_experts_); }
    bool owns(int e) const { return owner(e) == comm_.rank(); }
    // Traffic of the forwards since the caller last reset it (stats = {}), summed over the MoE layers.
    struct Stats {
        int64_t dispatched_rows = 0;  // token rows this rank sent to other ranks
        int64_t combined_rows = 0;    // expert-output rows it received back from other ranks
        int max_ranks_per_token = 0;  // the most ranks any of its tokens went to (itself included)
        int64_t bytes_moved = 0;      // bytes it sent to other ranks, forward and backward (dispatch and combine)
        int64_t dispatch_bytes = 0;   // of those, the dispatched token rows: 4d bytes a row, fp8_row_bytes(d) in FP8
        double seconds_moving = 0;    // wall time of those all-to-alls (each ends when its data has arrived)
    } stats;
    // Optional: what the dispatched rows become on the wire (build/logfmt compares codecs with it), applied in place
    // to the rows [n, d] going to each other rank before the all-to-all.
    std::function<void(float* rows, int64_t n, int d)> dispatch_codec;
    // V3's FP8 dispatch (above): rows to other ranks travel as FP8 bytes, decoded on receipt; a rank's rows to itself
    // cross no link and stay FP32. With either, the backward is straight-through (gradients pass unchanged).
    bool fp8_dispatch = false;
    void forward(Model& model, const MoE& m, MoeCache& c) override {
        const int K = model.cfg.n_activated_experts, d = model.cfg.dim;
        Layer& L = layers_[&c];
        const Outgoing out = plan(L, backend::download(c.chosen), backend::host_plan(c.perm).slot, K);   // 1. plan
        // 2. dispatch: counts first, then the token rows and their expert ids, grouped by source rank
        const std::vector<int64_t> tokens_from = exchange_counts(comm_, out.tokens_to);
        const int64_t n_recv = total(tokens_from);
        const backend::Buffer<int32_t> rows(out.tokens);
        backend::Buffer<float> recv_x(size_t(n_recv) * d);   // [n_recv, d]
        if (fp8_dispatch && dispatch_codec) fail("ExpertParallel: fp8_dispatch and dispatch_codec: choose one");
        stats.dispatch_bytes += fp8_dispatch ? dispatch_fp8(c.x, rows.data(), out.tokens_to, recv_x, tokens_from, d)
            : move_rows(c.x, rows.data(), out.tokens_to, recv_x.data(), nullptr, tokens_from, d, dispatch_codec);
        std::vector<int32_t> recv_ids(size_t(n_recv) * K);   // [n_recv, K]
        all_to_all(comm_, out.ids.data(), out.tokens_to, K, recv_ids.data(), tokens_from);
        // 3. the local experts, on the received pairs
        const backend::Buffer<float> y_local = run_local_experts(model, m, L, recv_ids, tokens_from, recv_x.data(), d);
        // 4. combine: every pair's output row back to its source, into the row of c.ye the single-rank layer uses
        move_rows(y_local.data(), L.return_rows_dev.data(), L.pairs_from, c.ye, L.pair_slot_dev.data(), L.pairs_to, d);
        stats.combined_rows += total(L.pairs_to) - L.pairs_to[size_t(comm_.rank())];
    }
    void backward(Model& model, const MoE& m, MoeCache& c, const float* dye, float* dxe) override {
        auto it = layers_.find(&c);
        if (it == layers_.end()) fail("ExpertParallel::backward: no forward for this MoE layer");
        Layer& L = it->second;
        const int d = model.cfg.dim;
        const int64_t local_rows = L.local.offsets[size_t(L.n_local)];
        backend::Buffer<float> dy_local(size_t(local_rows) * d), dx_local(size_t(local_rows) * d);  // [local rows, d]
        backend::fill_zero(dx_local.data(), local_rows * d);
        // 1. the gradient of every pair's output goes to the expert's owner (the adjoint of the combine)
        move_rows(dye, L.pair_slot_dev.data(), L.pairs_to, dy_local.data(), L.return_rows_dev.data(), L.pairs_from, d);
        // 2. the local experts' backward: input gradients into dx_local, weight gradients into this rank's grads
        model.experts_backward(m, first_expert(comm_.rank()), L.n_local, L.local.offsets.data(), dy_local.data(),
                               dx_local.data(), L.experts);
        // 3. every pair's input gradient back to its source (the adjoint of the dispatch), in the same pair order
        move_rows(dx_local.data(), L.return_rows_dev.data(), L.pairs_from, dxe, L.pair_slot_dev.data(), L.pairs_to, d);
    }
  private:
    struct Layer {
        // this rank as the source of its tokens
        std::vector<int64_t> pairs_to;       // [R]: (token, choice) pairs whose expert lives on rank q
        std::vector<int32_t> pair_slot;      // [Σ pairs_to]: their rows in c.ye / c.xe, grouped by rank q
        // this rank as the owner of experts first_expert(r) .. first_expert(r+1)−1
        std::vector<int64_t> pairs_from;     // [R]: pairs received from rank q
        std::vector<int32_t> local_chosen;   // [n_recv, K]: local expert index, or n_local when owned elsewhere
        MoePermutation local;                // the received pairs grouped by local expert (host plan)
        std::vector<int32_t> return_rows;    // rows of the local grouping in the order of the return trip
        backend::Buffer<float> x_local;      // [local rows, d]: expert inputs, local expert order (kept for backward)
        backend::Buffer<int32_t> pair_slot_dev, return_rows_dev;  // the two row lists above, in backend memory
        int n_local = 0;                     // experts on this rank
        FfnCache experts;                    // their activations, kept for the backward
    };
    struct Outgoing {                        // step 1's plan of the dispatch, grouped by destination rank
        std::vector<int64_t> tokens_to;      // [R]: tokens sent to rank q
        std::vector<int32_t> tokens;         // [Σ tokens_to]: the token of each row to send
        std::vector<int32_t> ids;            // [Σ tokens_to, K]: its chosen experts
    };
    Communicator& comm_;
    int n_experts_;
    std::map<const MoeCache*, Layer> layers_;  // one entry per MoE layer of the model (keyed by its cache)
    static int64_t total(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t(0)); }
    // Step 1 of the forward: the tokens to send to each rank, and this rank's pairs_to and pair_slot.
    Outgoing plan(Layer& L, const std::vector<int32_t>& chosen, const std::vector<int32_t>& slot, int K) {
        const int R = comm_.world_size(), n = int(chosen.size()) / K;
        Outgoing out;
        out.tokens_to.assign(size_t(R), 0);
        L.pairs_to.assign(size_t(R), 0);
        L.pair_slot.clear();
        std::vector<int> ranks_of_token(size_t(n), 0);
        for (int q = 0; q < R; ++q)
            for (int t = 0; t < n; ++t) {
                bool to_q = false;
                for (int k = 0; k < K; ++k)
                    if (owner(chosen[size_t(t) * K + k]) == q) {
                        to_q = true;
                        L.pair_slot.push_back(slot[size_t(t) * K + k]);
                        ++L.pairs_to[size_t(q)];
                    }
                if (!to_q) continue;
                ++out.tokens_to[size_t(q)];
                ++ranks_of_token[size_t(t)];
                out.tokens.push_back(t);
                out.ids.insert(out.ids.end(), chosen.begin() + int64_t(t) * K, chosen.begin() + int64_t(t + 1) * K);
            }
        backend::upload(L.pair_slot_dev, L.pair_slot);
        for (int v : ranks_of_token) stats.max_ranks_per_token = std::max(stats.max_ranks_per_token, v);
        stats.dispatched_rows += total(out.tokens_to) - out.tokens_to[size_t(comm_.rank())];
        return out;
    }
    // Step 3 on the received ids [n_recv, K] and rows x [n_recv, d]: the outputs [local rows, d] in local expert order;
    // plans the return trip: per source rank, its pairs with a local expert, in its order (pair_slot).
    backend::Buffer<float> run_local_experts(Model& model, const MoE& m, Layer& L, const std::vector<int32_t>& ids,
                                             const std::vector<int64_t>& tokens_from, const float* x, int d) {
        const int lo = first_expert(comm_.rank()), K = model.cfg.n_activated_experts;
        L.n_local = first_expert(comm_.rank() + 1) - lo;
        L.local_chosen.resize(ids.size());
        for (size_t i = 0; i < ids.size(); ++i)
            L.local_chosen[i] = (ids[i] >= lo && ids[i] < lo + L.n_local) ? ids[i] - lo : L.n_local;
        moe_permute_plan(L.local, L.local_chosen.data(), int(ids.size()) / K, K, L.n_local + 1);
        const int64_t local_rows = L.local.offsets[size_t(L.n_local)];
        const backend::Buffer<int32_t> rows(L.local.token_of);   // row -> received token; the first local_rows are run
        L.x_local.resize(size_t(local_rows) * d);
        backend::gather_rows(L.x_local.data(), x, rows.data(), local_rows, d);
        backend::Buffer<float> y_local(size_t(local_rows) * d);
        model.experts_forward(m, lo, L.n_local, L.local.offsets.data(), L.x_local.data(), y_local.data(), L.experts);
        L.pairs_from.assign(tokens_from.size(), 0);
        L.return_rows.clear();
        size_t i = 0;
        for (size_t q = 0; q < tokens_from.size(); ++q)
            for (const size_t end = i + size_t(tokens_from[q]) * K; i < end; ++i)
                if (L.local_chosen[i] < L.n_local) {
                    ++L.pairs_from[q];
                    L.return_rows.push_back(L.local.slot[i]);
                }
        backend::upload(L.return_rows_dev, L.return_rows);
        return y_local;
    }
    // One all-to-all of rows of d floats, counted in stats: the rows `take` of src go out, send_rows[q] to rank q
    // (through `codec` when given, except those to this rank); the rows arriving, recv_rows[q] from rank q, land in
    // dst at the rows `put` (null: in arrival order). Returns the bytes sent to other ranks.
    int64_t move_rows(const float* src, const int32_t* take, const std::vector<int64_t>& send_rows, float* dst,
                      const int32_t* put, const std::vector<int64_t>& recv_rows, int d,
                      const std::function<void(float*, int64_t, int)>& codec = nullptr) {
        const int64_t n_send = total(send_rows), n_recv = total(recv_rows);
        backend::Buffer<float> send(size_t(n_send) * d), recv(put ? size_t(n_recv) * d : 0);
        backend::gather_rows(send.data(), src, take, n_send, d);
        if (codec) {   // on host memory (a GPU build copies the rows there and back)
            std::vector<float> rows = backend::download(send);
            for (int q = 0, at = 0; q < comm_.world_size(); at += int(send_rows[size_t(q)]), ++q)
                if (q != comm_.rank()) codec(rows.data() + int64_t(at) * d, send_rows[size_t(q)], d);
            backend::upload(send, rows);
        }
        const double t0 = now_seconds();
        backend::all_to_all(comm_, send.data(), send_rows, d, put ? recv.data() : dst, recv_rows);
        stats.seconds_moving += now_seconds() - t0;
        const int64_t bytes = (n_send - send_rows[size_t(comm_.rank())]) * d * int64_t(sizeof(float));
        stats.bytes_moved += bytes;
        if (put) backend::scatter_rows(dst, recv.data(), put, n_recv, d);
        return bytes;
    }
    // The dispatch in FP8 (fp8_dispatch), as move_rows without `put`: the rows to other ranks, those before and after
    // this rank's own in all_to_all's order, go out packed by fp8_pack_rows (row by row: two ranges pack as one) and
    // are unpacked on arrival; the own rows are copied as they are. Packing runs on host memory (a GPU build copies
    // the rows there and back; cuda/fp8.cuh's 1x128 quantizer could pack on the device).
    int64_t dispatch_fp8(const float* src, const int32_t* take, const std::vector<int64_t>& send_rows,
                         backend::Buffer<float>& dst, const std::vector<int64_t>& recv_rows, int d) {
        const int r = comm_.rank();
        const int64_t row = fp8_row_bytes(d), n_send = total(send_rows), n_recv = total(recv_rows);
        const int64_t own = send_rows[size_t(r)];   // the own rows: after `sent` rows sent, `got` rows received
        const int64_t sent = std::accumulate(send_rows.begin(), send_rows.begin() + r, int64_t(0));
        const int64_t got = std::accumulate(recv_rows.begin(), recv_rows.begin() + r, int64_t(0));
        backend::Buffer<float> gathered(size_t(n_send) * d);
        backend::gather_rows(gathered.data(), src, take, n_send, d);
        const std::vector<float> x = backend::download(gathered);
        std::vector<int64_t> wire_send = send_rows, wire_recv = recv_rows;   // the own rows take no wire
        wire_send[size_t(r)] = wire_recv[size_t(r)] = 0;
        std::vector<uint8_t> packed(size_t((n_send - own) * row)), arrived(size_t((n_recv - own) * row));
        fp8_pack_rows(x.data(), sent, d, packed.data());
        fp8_pack_rows(x.data() + (sent + own) * d, n_send - sent - own, d, packed.data() + sent * row);
        const double t0 = now_seconds();
        all_to_all(comm_, packed.data(), wire_send, row, arrived.data(), wire_recv);
        stats.seconds_moving += now_seconds() - t0;
        std::vector<float> y(size_t(n_recv) * d);
        fp8_unpack_rows(arrived.data(), got, d, y.data());
        std::copy_n(x.begin() + sent * d, own * d, y.begin() + got * d);
        fp8_unpack_rows(arrived.data() + got * row, n_recv - got - own, d, y.data() + (got + own) * d);
        backend::upload(dst, y);
        stats.bytes_moved += int64_t(packed.size());
        return int64_t(packed.size());
    }
};

// --- 9.5 the parallel training step: DP, or DP × EP --------------------------------------------------------------
// The tensors this rank holds: all under DP; under EP all but other ranks' routed experts (which keep their place in
// the flat buffers, for the layout's sake, but are never used).
struct HeldParams {
    std::vector<const ParamEntry*> replicated;   // identical on every rank: gradients are all-reduced
    std::vector<const ParamEntry*> own_experts;  // routed experts this rank owns: gradients complete already
};
inline HeldParams held_params(Model& model, const ExpertParallel* ep) {
    std::map<size_t, int> expert_of;  // offset of a routed expert's weight -> expert index
    for (Block* b : model.moe_blocks())
        for (size_t e = 0; e < b->moe.experts.size(); ++e)
            for (const Linear* w : {&b->moe.experts[e].gate, &b->moe.experts[e].up, &b->moe.experts[e].down})
                expert_of[w->w] = int(e);
    HeldParams h;
    for (const ParamEntry& e : model.layout.entries) {
        if (!ep || !e.routed_expert) h.replicated.push_back(&e);
        else if (ep->owns(expert_of.at(e.offset))) h.own_experts.push_back(&e);
    }
    return h;
}
// Gradient buckets: the all-reduce overlapped with the backward [V3 §3.2.1; PyTorch DDP, arXiv 2006.15704 §3.2.3].
// One all-reduce after the backward leaves the links idle during the backward and the cores idle during it. The
// backward finishes the gradients from the END of the flat buffer (Model::on_gradients_final), so the replicated
// gradients are cut from the end into buckets of about bucket_bytes, and with overlap a communication thread (on a GPU:
// a stream) reduces each bucket, in the same order on every rank, as soon as the backward has passed below it.
// The sums: each bucket is one ring all-reduce (9.2), weighted by w first, as in one all-reduce of everything. On 1 or
// 2 ranks an element's sum is x_0 + x_1 whatever its chunk (two terms commute): every bucketing gives bitwise the one
// all-reduce's gradients. On more ranks a bucket's chunks differ from the whole buffer's, so an element's ring sum may
// start at another rank: a few ulps away (9.2), yet bitwise the same on every rank and run, as the buckets depend only
// on the layout and bucket_bytes, never on timing or threads.
struct GradientSync {
    size_t bucket_bytes = SIZE_MAX;  // about this many bytes of gradients per all-reduce; SIZE_MAX: one bucket
    bool overlap = false;            // reduce the buckets in a communication thread during the backward
};
struct GradientBucket {
    std::vector<std::pair<size_t, size_t>> pieces;  // [offset, floats] ranges of the flat buffer, increasing offsets
    size_t floats = 0;                              // Σ piece sizes
    size_t first() const { return pieces.front().first; }  // ready once every gradient from here on is final
};
// The buckets in the order the backward completes them (from the end of the buffer). A bucket closes once it holds
// bucket_bytes or more (0: one tensor per bucket); adjacent tensors merge into one piece (under DP a bucket is one
// piece; under EP the routed experts, which are not all-reduced, split it).
inline std::vector<GradientBucket> gradient_buckets(const HeldParams& held, size_t bucket_bytes) {
    std::vector<GradientBucket> buckets;
    for (auto e = held.replicated.rbegin(); e != held.replicated.rend(); ++e) {  // held_params is in layout order
        if (buckets.empty() || buckets.back().floats * sizeof(float) >= bucket_bytes) buckets.emplace_back();
        GradientBucket& b = buckets.back();
        if (!b.pieces.empty() && (*e)->offset + (*e)->size == b.first())
            b.pieces.front() = {(*e)->offset, (*e)->size + b.pieces.front().second};
        else b.pieces.insert(b.pieces.begin(), {(*e)->offset, (*e)->size});
        b.floats += (*e)->size;
    }
    return buckets;
}
namespace parallel_detail {
// One bucket of this rank's gradients, weighted by w, summed over the ranks: in place when it is one piece, else
// copied into one buffer and back (as DDP does), so that it travels as one all-reduce.
inline void reduce_bucket(Communicator& comm, Model& model, const GradientBucket& b, float w) {
    const bool staged = b.pieces.size() > 1;
    backend::Buffer<float> buffer(staged ? b.floats : 0);  // [b.floats] when staged
    auto copy = [&](bool into_buffer) {
        float* at = buffer.data();
        for (const auto& [offset, n] : b.pieces) {
            float* g = model.grad_at(offset);
            backend::copy_values(into_buffer ? at : g, into_buffer ? g : at, int64_t(n));
            at += n;
        }
    };
    if (staged) copy(true);
    float* data = staged ? buffer.data() : model.grad_at(b.first());
    backend::scale_inplace(data, int64_t(b.floats), w);
    backend::all_reduce(comm, data, b.floats);
    if (staged) copy(false);
}
}  // namespace parallel_detail
// Steps 1 and 2 of the parallel step: forward and backward on this rank's rows, and the replicated gradients weighted
// by w and summed over the ranks, bucket by bucket (sync); the gradients of the experts this rank owns are complete
// already and are only weighted. sync.overlap needs a backward free of communication: data parallelism alone.
inline Losses forward_backward_reduced(Communicator& comm, Model& model, const int32_t* tokens, int B, int T,
                                       const LossOptions& options, const HeldParams& held, float w,
                                       const GradientSync& sync = {}) {
    const std::vector<GradientBucket> buckets = gradient_buckets(held, sync.bucket_bytes);
    Losses local;
    if (!sync.overlap) {
        local = model.forward_backward(tokens, B, T, options);
        for (const GradientBucket& b : buckets) parallel_detail::reduce_bucket(comm, model, b, w);
    } else {
        if (model.expert_runner)
            fail("GradientSync::overlap: expert parallelism communicates during the backward on the same "
                 "communicator; overlap the gradient all-reduce under data parallelism alone");
#ifdef DSV3_BACKEND_CUDA
        fail("GradientSync::overlap: not on the GPU backend yet (it needs a communication stream that waits on an "
             "event per bucket, not a host thread); use overlap = false");
#endif
        std::mutex mu;
        std::condition_variable cv;
        size_t final_from = SIZE_MAX;  // every gradient at offsets >= final_from is final
        bool stop = false;             // the forward or backward failed: reduce nothing more
        std::exception_ptr error;
        std::thread reducer([&] {
#ifdef _OPENMP
            omp_set_num_threads(1);    // leave the cores to the backward
#endif
            try {
                for (const GradientBucket& b : buckets) {
                    std::unique_lock<std::mutex> lock(mu);
                    cv.wait(lock, [&] { return stop || final_from <= b.first(); });
                    if (stop) return;
                    lock.unlock();
                    parallel_detail::reduce_bucket(comm, model, b, w);
                }
            } catch (...) {
                error = std::current_exception();
            }
        });
        auto post = [&](size_t offset, bool failed) {  // the mutex also publishes the gradients written before
            std::lock_guard<std::mutex> lock(mu);
            final_from = offset;
            stop = failed;
            cv.notify_one();
        };
        model.on_gradients_final = [&](size_t offset) { post(offset, false); };
        try {
            local = model.forward_backward(tokens, B, T, options);  // ends with on_gradients_final(0)
        } catch (...) {
            model.on_gradients_final = nullptr;
            post(0, true);
            reducer.join();
            throw;
        }
        model.on_gradients_final = nullptr;
        reducer.join();
        if (error) std::rethrow_exception(error);
    }
    for (const ParamEntry* e : held.own_experts) backend::scale_inplace(model.grad_at(e->offset), int64_t(e->size), w);
    return local;
}
namespace parallel_detail {
// Step 3: the expert loads of the whole batch, [MoE block][expert], so that every rank makes the same bias update.
inline std::vector<std::vector<int64_t>> batch_loads(Communicator& comm, const Model& model) {
    std::vector<std::vector<int64_t>> loads = model.expert_loads();
    std::vector<int64_t> flat;
    for (const auto& l : loads) flat.insert(flat.end(), l.begin(), l.end());
    all_reduce(comm, flat.data(), flat.size());
    size_t at = 0;
    for (auto& l : loads)
        for (int64_t& x : l) x = flat[at++];
    return loads;
}
// Step 4 under EP: the gradient norm must include every rank's experts, so their squares are summed over the ranks.
inline double grad_norm_over_experts(Communicator& comm, Model& model, const HeldParams& held) {
    auto sum_squares = [&](const std::vector<const ParamEntry*>& list) {
        double s = 0;
        for (const ParamEntry* e : list) s += backend::sum_of_squares(model.grad_at(e->offset), int64_t(e->size));
        return s;
    };
    double experts_sq = sum_squares(held.own_experts);
    all_reduce(comm, &experts_sq, 1);
    return std::sqrt(sum_squares(held.replicated) + experts_sq);
}
// Step 5: the whole batch's losses, for printing: Σ_r w_r L_r.
inline Losses batch_losses(Communicator& comm, const Losses& local, double w) {
    std::vector<double> l = {local.main, local.balance, local.total};
    l.insert(l.end(), local.mtp.begin(), local.mtp.end());
    for (double& x : l) x *= w;
    all_reduce(comm, l.data(), l.size());
    return Losses{l[0], std::vector<double>(l.begin() + 3, l.end()), l[1], l[2]};   // main, mtp, balance, total
}
}  // namespace parallel_detail
// One training step of rank comm.rank(), called by every rank together on its rows tokens: [B_local, T+1]
// (row_share) of the whole batch. With ep, installs it as the model's expert runner (null: pure DP, every rank runs
// all experts on its own tokens). Returns the WHOLE batch's losses, gradient norm and expert loads; afterwards every
// rank holds the same replicated parameters and routing biases, bit for bit. sync: the gradient buckets (above).
// Weighting. The loss is a mean over tokens, so the full-batch gradient is Σ_r (n_r/n) ∇L_r. Only MTP's last k
// positions of each row (no target) are left out of a mean, as many in every row, so every loss term's counted
// positions (main, each MTP depth, the sequence-wise balance loss, a mean over sequences) are proportional to the
// rows: one weight w_r = B_r/B fits them all (1/R for equal shares; the expert-level balance loss uses batch-wide
// frequencies f_i, which under DP each rank computes on its own rows). Under EP every owner sums expert gradients
// from all ranks' tokens, each scaled by its source's 1/n_r, so EP requires equal shares (checked).
inline StepResult parallel_train_step(Communicator& comm, Model& model, AdamW& opt, const int32_t* tokens,
                                      int B_local, int T, float lr, const LossOptions& options,
                                      ExpertParallel* ep = nullptr, bool bias_update = true,
                                      const GradientSync& sync = {}) {
    using namespace parallel_detail;
    const int R = comm.world_size();
    int64_t B_total = B_local;
    all_reduce(comm, &B_total, 1);
    if (ep && int64_t(B_local) * R != B_total)
        fail("parallel_train_step: expert parallelism needs equal shares of the batch; rank ", comm.rank(), " has ",
             B_local, " of ", B_total, " rows over ", R, " ranks");
    model.expert_runner = ep;
    const double w = double(B_local) / double(B_total);
    // 1. forward and backward on this rank's rows (under EP the MoE layers talk to the other ranks in between),
    // 2. and the gradients: weight w_r, the replicated ones summed over the ranks (during the backward with overlap)
    const HeldParams held = held_params(model, ep);
    const Losses local = forward_backward_reduced(comm, model, tokens, B_local, T, options, held, float(w), sync);
    // 3. the expert loads of the whole batch
    StepResult result;
    result.loads = batch_loads(comm, model);
    // 4. clip and AdamW, the single-rank step on the whole buffer. DP: the whole, identical gradient. EP: the norm
    // covers every rank's experts; those a rank does not own have zero gradients and are never read (need no memory).
    result.grad_norm = adamw_step(model, opt, lr, ep ? grad_norm_over_experts(comm, model, held) : -1.0);  // -1: local
    if (bias_update) update_routing_bias(model, result.loads, model.cfg.bias_update_speed);
    for (const auto& load : result.loads) result.max_violation = std::max(result.max_violation, max_violation(load));
    // 5. the whole batch's losses
    result.loss = batch_losses(comm, local, w);
    return result;
}
// Under EP each rank keeps only its own experts up to date. gather_experts copies every routed expert's weights and
// AdamW moments from its owner to every rank, so one rank can evaluate and save the whole model (expert_runner =
// nullptr, as build/train_mpi --ep does): exact, the owners' bits summed as integers with zeros (the whole buffer
// travels, for brevity: it runs only before an evaluation or a save).
inline void gather_experts(Communicator& comm, Model& model, AdamW& opt, const ExpertParallel& ep) {
    const std::vector<const ParamEntry*> own = held_params(model, &ep).own_experts;
    for (backend::Buffer<float>* buffer : {&model.params, &opt.m, &opt.v}) {
        if (buffer->size() != model.params.size()) continue;  // no AdamW moments before the first step
        std::vector<float> host = backend::download(*buffer);
        std::vector<int32_t> bits(host.size(), 0);  // this rank's experts, bit for bit; zeros elsewhere
        for (const ParamEntry* e : own) std::memcpy(bits.data() + e->offset, host.data() + e->offset, e->size * 4);
        all_reduce(comm, bits.data(), bits.size());
        for (const ParamEntry& e : model.layout.entries)
            if (e.routed_expert) std::memcpy(host.data() + e.offset, bits.data() + e.offset, e.size * 4);
        backend::upload(*buffer, host);
    }
}

// #####################################################################################################################
// PART 3, APPENDIX: machinery a learner may skip (the fast GEMM, files, tokenizer and datasets, plots, checkpoints,
// Hugging Face I/O), which Part 1 calls through declarations (gemm::multiply in section 3.1) and the examples use.
// #####################################################################################################################
// =====================================================================================================================
// 10. THE FAST PACKED GEMM
// =====================================================================================================================
// The fast GEMM behind matmul_forward / matmul_backward: gemm::multiply, C[M,N] (+)= A[M,K] · B[K,N] on strided
// views, covers the three products of section 3.1 (y = x·Wᵀ: A = x, B(k,j) = W[j,k]; dx += dy·W: A = dy, B = W;
// dW += dyᵀ·x: A(i,k) = dy[k,i], B = x). A naive triple loop loads operands for every multiply-add (a few percent of
// peak); a fast GEMM reuses every loaded value from a register or cache (Goto & van de Geijn 2008, "Anatomy of
// high-performance matrix multiplication"; the BLIS papers):
// * Register tile: MR x NR tiles of C (6 x 64 with AVX-512: 24 vectors of 16 floats). For each k the micro-kernel
//   loads 4 vectors of B, broadcasts MR values of A and does 24 FMAs: every load feeds 4 or 6 FMAs, 24 independent
//   chains hide the FMA latency (4 cycles x 2 units), and C moves once per tile.
// * Packing: B in k-major panels of NR columns, zero-padded to whole vectors (one stream, no edge case; O(K·N) work
//   against O(M·N·K)). A is read in place (a copy of x or dy would cost as much as the arithmetic of narrow layers,
//   out = 48 or 64); only a last, partial row panel is copied.
// * Blocking: B in 2 MiB blocks that stay in L2 while a thread sweeps A's row panels over them; k in blocks of
//   KC = 128, so an MR x KC sliver of A stays in L1. Threads: a fixed static split of a block's tiles.
// Determinism: C[i,j] is the in-order sum of K-block sums, each an FMA chain over increasing k; threads decide who
// computes a tile, never how, and K is never split. So the bits are the same for any thread count and a row of y the
// same in any batch (speculative decoding checks exactly against plain); the price, no parallelism over K, matters
// only when M and N are both tiny. (Builds differ where the compiler may or may not fuse a*b+c.)
// Accuracy: an output is a chain of at most min(K,KC) + ceil(K/KC) (+1 when accumulating) roundings, so |error| <=
// that count · 2⁻²⁴ · Σ_k |A(i,k) B(k,j)| to first order, the bound the tests check (K = 1024: 136, not 1024).
// Portability: GCC/Clang vector extensions map onto AVX-512, AVX2, SSE or NEON as -march allows; other compilers (or
// -DDSV3_GEMM_PORTABLE) get a plain-array kernel with the same summation order.
namespace gemm {
// Vector width (floats per register), register tile MR x NR, cache blocks. MR·NR/VEC accumulators + NR/VEC vectors
// of B + 1 broadcast must fit the registers (32 with AVX-512 and NEON, 16 with AVX2 and SSE).
#if defined(__AVX512F__)
#define DSV3_GEMM_VEC 16
constexpr int MR = 6, NR = 64;
#elif defined(__AVX__)
#define DSV3_GEMM_VEC 8
constexpr int MR = 6, NR = 16;
#elif defined(__aarch64__)
#define DSV3_GEMM_VEC 4
constexpr int MR = 8, NR = 12;
#else
#define DSV3_GEMM_VEC 4
constexpr int MR = 6, NR = 8;
#endif
constexpr int VEC = DSV3_GEMM_VEC;
constexpr int KC = 128;  // K block: part of the summation order, so changing it changes the bits of the results
constexpr int64_t B_BLOCK_FLOATS = 1 << 19;  // packed block of B: 2 MiB, about one core's L2
static_assert(NR % VEC == 0, "NR must be a whole number of vectors");
// Rows [k0, k0+kc), columns [j0, j0+n) of B into panel[k*NR + j], 0 up to whole vectors (those the kernel reads).
inline void pack_b_panel(float* panel, const View& B, int k0, int kc, int j0, int n) {
    const int n_padded = (n + VEC - 1) / VEC * VEC;
    if (B.col_stride == 1) {  // rows of B contiguous (W in dx, x in dW): copy row pieces
        for (int k = 0; k < kc; ++k) {
            float* row = panel + int64_t(k) * NR;
            std::fill(std::copy_n(&B.at(k0 + k, j0), n, row), row + n_padded, 0.0f);
        }
    } else {  // columns of B contiguous (B = Wᵀ or xᵀ in the forward): a transpose, reading each column in order
        for (int j = 0; j < n_padded; ++j) {
            const float* src = j < n ? &B.at(k0, j0 + j) : nullptr;
            for (int k = 0; k < kc; ++k) panel[int64_t(k) * NR + j] = src ? src[k * B.row_stride] : 0.0f;
        }
    }
}
// Write the m x n valid part of a tile (row-major, row length NR): C = tile (overwrite) or C += tile.
inline void store_tile(const OutView& C, const float* tile, int m, int n, bool overwrite) {
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) C.at(i, j) = overwrite ? tile[i * NR + j] : C.at(i, j) + tile[i * NR + j];
}

#if (defined(__GNUC__) || defined(__clang__)) && !defined(DSV3_GEMM_PORTABLE)
#ifdef __NVCC__
#pragma nv_diag_suppress 1675  // nvcc's front end does not know "#pragma GCC unroll"; the host compiler does
#endif
#define DSV3_UNROLL _Pragma("GCC unroll 64")
#if defined(__clang__) && DSV3_GEMM_VEC == 16
// Clang splits 64-byte vectors in two where it prefers 256-bit code (GCC only in auto-vectorisation), unless told.
#define DSV3_GEMM_FULL_WIDTH __attribute__((min_vector_width(512)))
#else
#define DSV3_GEMM_FULL_WIDTH
#endif
typedef float vfloat __attribute__((vector_size(DSV3_GEMM_VEC * sizeof(float))));
constexpr int NV = NR / VEC;  // vectors per tile row
// The micro-kernel: C[0:m, 0:n] (=|+=) Σ_{k<kc} A(i,k) · bp[k*NR + j] over the first U vectors of columns (U·VEC >= n:
// a narrow last panel, 48 of 64, does not pay for its padding). A(i,k) = a[i*lda + k] when A_ROWS (x, dy, W), else
// a[k*lda + i] (dyᵀ, packed panels); MR rows of A must exist (the caller packs partial panels); bp: a panel of B.
template <bool A_ROWS, int U>
DSV3_GEMM_FULL_WIDTH inline void micro_kernel(int kc, const float* a, int64_t lda, const float* bp, const OutView& C,
                                              int m, int n, bool overwrite) {
    vfloat acc[MR][U];  // the C tile, in registers (the loops below are fully unrolled, so the array disappears)
    DSV3_UNROLL for (int i = 0; i < MR; ++i)
        DSV3_UNROLL for (int v = 0; v < U; ++v) acc[i][v] = vfloat{};
    for (int k = 0; k < kc; ++k) {
        vfloat b[U];
        DSV3_UNROLL for (int v = 0; v < U; ++v) std::memcpy(&b[v], bp + int64_t(k) * NR + v * VEC, sizeof(vfloat));
        DSV3_UNROLL for (int i = 0; i < MR; ++i) {
            const float ai = A_ROWS ? a[i * lda + k] : a[int64_t(k) * lda + i];
            DSV3_UNROLL for (int v = 0; v < U; ++v) acc[i][v] += ai * b[v];  // broadcast times vector: one FMA
        }
    }
    if (m == MR && n == U * VEC && C.col_stride == 1) {  // a full tile of a row-major C: straight from registers
        DSV3_UNROLL for (int i = 0; i < MR; ++i)
            DSV3_UNROLL for (int v = 0; v < U; ++v) {
                float* c = &C.at(i, v * VEC);
                vfloat sum = acc[i][v];
                if (!overwrite) {
                    vfloat old;
                    std::memcpy(&old, c, sizeof(vfloat));
                    sum = old + sum;
                }
                std::memcpy(c, &sum, sizeof(vfloat));
            }
    } else {  // edge tile, or a transposed C: through a buffer
        alignas(64) float tile[MR * NR];
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < U; ++v) std::memcpy(tile + i * NR + v * VEC, &acc[i][v], sizeof(vfloat));
        store_tile(C, tile, m, n, overwrite);
    }
}
// The kernel with the fewest vectors that cover n columns: micro_kernel<A_ROWS, ceil(n / VEC)>.
template <bool A_ROWS, int U = NV>
inline void run_kernel(int kc, const float* a, int64_t lda, const float* bp, const OutView& C, int m, int n,
                       bool overwrite) {
    if constexpr (U > 1)
        if (n <= (U - 1) * VEC) return run_kernel<A_ROWS, U - 1>(kc, a, lda, bp, C, m, n, overwrite);
    micro_kernel<A_ROWS, U>(kc, a, lda, bp, C, m, n, overwrite);
}
// r[0..VEC) transposed in registers (lane i of r[j] swaps with lane j of r[i]) in log2(VEC) butterfly stages: stage S
// swaps bit S of the vector's index with bit S of the lane's. (nvcc's host front end, which reads this header for the
// CUDA programs, mistypes __builtin_shufflevector over a parameter pack; there this CPU path moves element by element.)
#ifdef __CUDACC__
inline void transpose(vfloat* r) {
    vfloat t[VEC];
    std::memcpy(t, r, sizeof(t));
    for (int i = 0; i < VEC; ++i)
        for (int j = 0; j < VEC; ++j) r[i][j] = t[j][i];
}
#else
template <int S, size_t... I>
inline void transpose_stage(vfloat* r, std::index_sequence<I...>) {
    DSV3_UNROLL for (int i = 0; i < VEC; ++i)
        if (!(i & S)) {
            const vfloat a = r[i], b = r[i + S];
            r[i] = __builtin_shufflevector(a, b, (I & S ? VEC + I - S : I)...);
            r[i + S] = __builtin_shufflevector(a, b, (I & S ? VEC + I : I + S)...);
        }
}
template <int S = 1>
inline void transpose(vfloat* r) {
    if constexpr (S < VEC) transpose_stage<S>(r, std::make_index_sequence<VEC>{}), transpose<2 * S>(r);
}
#endif
// Outputs o0 .. o0+VEC-1 (those below `out`) of y[t] = x[t] Wᵀ for the T rows of x, y: [T, out] (few_rows below).
template <int T>
DSV3_GEMM_FULL_WIDTH inline void few_rows_block(float* y, const float* x, const float* W, int in, int out, int o0) {
    const float* w[VEC];  // the block's rows of W; past the last row the last again (computed, never stored)
    for (int r = 0; r < VEC; ++r) w[r] = W + int64_t(std::min(o0 + r, out - 1)) * in;
    vfloat c[T] = {};  // (in = 0: an empty sum)
    for (int pc = 0; pc < in; pc += KC) {
        const int end = std::min(in, pc + KC);
        vfloat acc[T] = {};
        int k = pc;
        for (; k + VEC <= end; k += VEC) {
            vfloat col[VEC];
            DSV3_UNROLL for (int r = 0; r < VEC; ++r) std::memcpy(&col[r], w[r] + k, sizeof(vfloat));
            transpose(col);  // col[j] = W[o0 .. o0+VEC-1, k+j]
            DSV3_UNROLL for (int j = 0; j < VEC; ++j)
                DSV3_UNROLL for (int t = 0; t < T; ++t) acc[t] += col[j] * x[int64_t(t) * in + k + j];
        }
        for (; k < end; ++k) {  // the last few k of a row that is not a whole number of vectors
            vfloat col;
            for (int r = 0; r < VEC; ++r) col[r] = w[r][k];
            for (int t = 0; t < T; ++t) acc[t] += col * x[int64_t(t) * in + k];
        }
        for (int t = 0; t < T; ++t) c[t] = pc == 0 ? acc[t] : c[t] + acc[t];  // K blocks in order, as store_tile
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < std::min(VEC, out - o0); ++r) y[int64_t(t) * out + o0 + r] = c[t][r];
}
#else
// Portable kernel: the same arithmetic, in the same order, on plain arrays.
template <bool A_ROWS>
inline void run_kernel(int kc, const float* a, int64_t lda, const float* bp, const OutView& C, int m, int n,
                       bool overwrite) {
    const int n_padded = (n + VEC - 1) / VEC * VEC;  // the packed columns (the rest of the panel is not written)
    float acc[MR * NR] = {};
    for (int k = 0; k < kc; ++k) {
        const float* bk = bp + int64_t(k) * NR;
        for (int i = 0; i < MR; ++i) {
            const float ai = A_ROWS ? a[i * lda + k] : a[int64_t(k) * lda + i];
            for (int j = 0; j < n_padded; ++j) acc[i * NR + j] += ai * bk[j];
        }
    }
    store_tile(C, acc, m, n, overwrite);
}
template <int T>
inline void few_rows_block(float* y, const float* x, const float* W, int in, int out, int o0) {
    for (int o = o0; o < std::min(out, o0 + VEC); ++o)
        for (int t = 0; t < T; ++t) {
            float c = 0;
            for (int pc = 0; pc < in; pc += KC) {
                float acc = 0;
                for (int k = pc; k < std::min(in, pc + KC); ++k) acc += W[int64_t(o) * in + k] * x[int64_t(t) * in + k];
                c = pc == 0 ? acc : c + acc;
            }
            y[int64_t(t) * out + o] = c;
        }
}
#endif

// C (+)= A·B, declared in section 3.1.
inline void multiply(int M, int N, int K, const View& A, const View& B, const OutView& C, bool accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // an empty sum: zero
        for (int i = 0; i < M && !accumulate; ++i)
            for (int j = 0; j < N; ++j) C.at(i, j) = 0.0f;
        return;
    }
    // Columns per packed block of B: K x block_n floats fit in the budget (at least one panel).
    const int block_n = int(std::max<int64_t>(1, B_BLOCK_FLOATS / (int64_t(K) * NR)) * NR);
    // The packed block of B, uninitialised (packing writes all that the kernel reads), 16 floats more to align it.
    const std::unique_ptr<float[]> packed_b(new float[size_t(K) * std::min((N + NR - 1) / NR * NR, block_n) + 16]);
    float* bpack = align64(packed_b.get());
    // One parallel region for the whole product (on the calling thread alone inside another region, or when too small
    // to wake the team). The barriers (the `omp for`'s and the explicit one) let no thread read a block of B before it
    // is fully packed, nor overwrite it before it is fully used.
#pragma omp parallel if (int64_t(M) * N * K >= 8 * kParallelMinWork)
    {
        alignas(64) float a_pack[MR * KC];  // this thread's copy of a partial row panel of A (one K block)
        for (int jc = 0; jc < N; jc += block_n) {
            const int nc = std::min(block_n, N - jc);
            const int64_t n_jr = (nc + NR - 1) / NR;
#pragma omp for schedule(static)
            for (int64_t jr = 0; jr < n_jr; ++jr)  // panel jr holds B[0:K, jc + jr*NR : +NR], k-major
                pack_b_panel(bpack + jr * NR * K, B, 0, K, jc + int(jr) * NR, std::min(NR, nc - int(jr) * NR));
            // This thread's tiles: a contiguous range in row-panel-major order (a fixed static partition), walking
            // along a row panel of A across the column panels of the packed block of B.
            const int64_t n_tiles = (M + MR - 1) / MR * n_jr;
            int64_t t_begin = 0, t_end = n_tiles;
#ifdef _OPENMP
            t_begin = n_tiles * omp_get_thread_num() / omp_get_num_threads();
            t_end = n_tiles * (omp_get_thread_num() + 1) / omp_get_num_threads();
#endif
            // K block [pc, pc + KC) of tile t (row panel t / n_jr, column panel t % n_jr): a tile's blocks run in
            // increasing pc (the summation order), tiles in any order.
            auto block = [&](int64_t t, int pc) {
                const int i0 = int(t / n_jr) * MR, m = std::min(MR, M - i0), jr = int(t % n_jr);
                const int j0 = jc + jr * NR, n = std::min(NR, N - j0), kc = std::min(KC, K - pc);
                const float* bp = bpack + (int64_t(jr) * K + pc) * NR;
                const OutView Ct{&C.at(i0, j0), C.row_stride, C.col_stride};
                const bool overwrite = !accumulate && pc == 0;
                if (m == MR && A.col_stride == 1)  // rows of A contiguous (x, dy, W): read in place
                    run_kernel<true>(kc, &A.at(i0, pc), A.row_stride, bp, Ct, m, n, overwrite);
                else if (m == MR && A.row_stride == 1)  // columns of A contiguous (dyᵀ): read in place
                    run_kernel<false>(kc, &A.at(i0, pc), A.col_stride, bp, Ct, m, n, overwrite);
                else {  // a partial row panel (MR rows in place would overrun A), or no unit stride: a packed copy
                    for (int k = 0; k < kc; ++k)  // a_pack[k*MR + i] = A(i0 + i, pc + k), 0 for i >= m
                        for (int i = 0; i < MR; ++i) a_pack[int64_t(k) * MR + i] = i < m ? A.at(i0 + i, pc + k) : 0.0f;
                    run_kernel<false>(kc, a_pack, MR, bp, Ct, m, n, overwrite);
                }
            };
            if (A.col_stride == 1) {
                // Rows of A contiguous: tile by tile, each row of A one long stream (a big W read once, in decoding).
                for (int64_t t = t_begin; t < t_end; ++t)
                    for (int pc = 0; pc < K; pc += KC) block(t, pc);
            } else {
                // A = dyᵀ: a K block at a time, so the MR x KC sliver of A (KC cache lines `out` floats apart) is
                // reused from L1 across the column panels.
                for (int pc = 0; pc < K; pc += KC)
                    for (int64_t t = t_begin; t < t_end; ++t) block(t, pc);
            }
#pragma omp barrier
        }
    }
}
// y[T,out] = x[T,in] · W[out,in]ᵀ for a few rows (decoding), declared in section 3.1. Each weight is used once per
// row, so the speed is how fast W streams from memory; multiply's tile would waste all but one lane of every vector
// of B (x). Here the lanes hold VEC outputs: VEC rows of W, read in place VEC floats at a time, transposed in registers
// (vector j holds column k+j) and multiplied by the broadcast x[t, k+j]: multiply's FMA chains, the same bits. Rows of
// x go FEW_ROWS at a time over a block, which stays in cache, so W is read from memory once for any T. Threads from
// about 32k multiply-adds: the team spins a moment after each region (section 11.1), so the next starts in µs.
inline void multiply_few_rows(float* y, const float* x, const float* W, int T, int in, int out) {
    static constexpr void (*kBlock[])(float*, const float*, const float*, int, int, int) = {
        few_rows_block<1>, few_rows_block<2>, few_rows_block<3>, few_rows_block<4>};  // by the number of rows
    static_assert(std::size(kBlock) == FEW_ROWS, "one few_rows_block per row count");
    parallel_for((out + VEC - 1) / VEC, [&](int64_t b) {
        for (int t = 0; t < T; t += FEW_ROWS)
            kBlock[std::min(FEW_ROWS, T - t) - 1](y + int64_t(t) * out, x + int64_t(t) * in, W, in, out, int(b) * VEC);
    }, int64_t(VEC) * in * T);
}

}  // namespace gemm

// =====================================================================================================================
// 11. FILES AND DATA
// =====================================================================================================================
//   11.1  Small text helpers.
//   11.2  Files: read a whole file, write one atomically (write a temporary file, then rename it).
//   11.3  Byte-level BPE tokenizer (DeepSeek-V3 report §4.1): train, encode, decode, save, load.
//   11.4  Token files and datasets: a small binary format, train/validation split, random batches, evaluation windows.
//   11.5  FIM, fill in the middle, PSM mode (DeepSeek-Coder, DeepSeek-Coder-V2 §2.2; Bavarian et al. 2022).
//   11.6  A synthetic corpus whose entropy is known exactly, so that a loss can be compared with the best possible one.

// --- 11.1 Small text helpers -----------------------------------------------------------------------------------------
// A byte string shown safely in a message or a file: printable ASCII as is, the rest as \n, \t, \\, \" or \xNN.
// unescape_bytes inverts it (a prompt or a path on one line of a checkpoint header); `what` names the text in errors.
constexpr std::string_view kEscapedBytes = "\n\t\\\"", kEscapeLetters = "nt\\\"";  // '\n' is written \n, ...
inline std::string escape_bytes(std::string_view s) {
    std::string out;
    for (unsigned char c : s) {
        if (const size_t k = kEscapedBytes.find(char(c)); k != s.npos) out += {'\\', kEscapeLetters[k]};
        else if (c >= 32 && c < 127) out += char(c);
        else out += {'\\', 'x', "0123456789abcdef"[c >> 4], "0123456789abcdef"[c & 15]};
    }
    return out;
}
inline std::string unescape_bytes(std::string_view s, const std::string& what) {
    auto hex = [&](size_t at) {  // the value of the hex digit s[at], or -1
        const char h = at < s.size() ? char(s[at] | 32) : 'z';
        return h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : -1;
    };
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] != '\\') { out += s[i]; continue; }
        const char c = ++i < s.size() ? s[i] : '\0';
        if (const size_t k = kEscapeLetters.find(c); k != s.npos) out += kEscapedBytes[k];
        else if (c == 'x' && hex(i + 1) >= 0 && hex(i + 2) >= 0) { out += char(hex(i + 1) * 16 + hex(i + 2)); i += 2; }
        else fail(what, ": malformed escape at byte ", i - 1, " of \"", std::string(s.substr(0, 60)), "\"");
    }
    return out;
}
// Numbers read from text (every command-line flag, every number in a text field of a file; "3e-4" too): a value
// outside [lo, hi] (NaN and infinities are outside every range) or text that is not wholly the number (no spaces, no
// '+'; std::from_chars reads it the same in every locale) is an Error naming what was read, the range and the text,
// "--batch: expected an integer in [1, 65536], got '-1'": never std::stoi's bare "stoi", nor a count of -1 let through.
template <class T>
inline T parse_number(std::string_view text, std::string_view what, T lo, T hi, const char* kind) {
    T v = 0;
    const char* end = text.data() + text.size();
    const auto r = std::from_chars(text.data(), end, v);
    if (r.ec != std::errc() || r.ptr != end || !(v >= lo && v <= hi))
        fail(what, ": expected ", kind, " in [", lo, ", ", hi, "], got '", escape_bytes(text.substr(0, 64)), "'");
    return v;
}
inline long long parse_int(std::string_view text, std::string_view what, long long lo, long long hi) {
    return parse_number(text, what, lo, hi, "an integer");
}
inline double parse_float(std::string_view text, std::string_view what, double lo, double hi) {
    return parse_number(text, what, lo, hi, "a number");
}
// The memory budget: sizes that a file or a config declares are checked against physical memory before anything is
// allocated, so a lying header or the 671B model on a laptop is an error naming the sizes, not std::bad_alloc or swap.
inline void require_memory(std::string_view what, double bytes) {
    const double have = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
    if (have > 0 && bytes > have)
        fail(what, ": ", bytes / 1e9, " GB, more than this machine's ", have / 1e9, " GB of memory");
}
// OpenMP threads that spin only briefly, then sleep. libgomp's threads spin 300000 turns (GOMP_SPINCOUNT) after every
// parallel region; on a shared CPU a spinning thread holds a core that the thread it waits for needs (on 2 cores beside
// two busy processes, `generate` ran 57x slower with 2 threads than with 1). Threads that sleep at once
// (OMP_WAIT_POLICY=passive) cost about 85 µs to wake for every region instead, which made training 1.6x slower on a
// quiet machine; 1000 turns (a few µs) cover the gap between one region and the next, and are short enough that beside
// busy processes two threads still run as fast as one (README, "Shared CPUs"). libgomp reads its settings only at load
// time, so the examples call this first in main: unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set, it sets
// GOMP_SPINCOUNT=1000 and execs /proc/self/exe again with the same arguments (Linux); where that fails, it runs on.
inline void prefer_sleeping_threads(char** argv) {
#if defined(_OPENMP) && defined(__linux__)
    if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
    if (setenv("GOMP_SPINCOUNT", "1000", 0) == 0) execv("/proc/self/exe", argv);
#else
    (void)argv;
#endif
}
// printf into a std::string (labels, durations, rates), up to 255 characters.
template <class... Args>
inline std::string format_printf(const char* format, Args... args) {
    char buf[256];
    std::snprintf(buf, sizeof buf, format, args...);
    return buf;
}
// Little-endian integers of n bytes (every binary format here is little-endian, whatever the machine).
inline uint64_t load_le(const void* p, int n) {
    uint64_t v = 0;
    for (int i = n; i-- > 0;) v = (v << 8) | static_cast<const uint8_t*>(p)[i];
    return v;
}
inline void store_le(void* p, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) static_cast<uint8_t*>(p)[i] = uint8_t(v >> (8 * i));
}

// --- 11.2 files: read a whole file; write one atomically -------------------------------------------------------------
namespace io_detail {
struct FileCloser { void operator()(std::FILE* f) const { std::fclose(f); } };  // unique_ptr never passes null
using File = std::unique_ptr<std::FILE, FileCloser>;                            // a FILE* that closes itself
}  // namespace io_detail
// The whole file as bytes; the error names the file and the reason. A regular file's size meets require_memory first.
inline std::string read_file_bytes(const std::string& path) {
    const io_detail::File f(std::fopen(path.c_str(), "rb"));
    if (!f) fail("cannot open '", path, "' for reading: ", std::strerror(errno));
    std::string data;
    std::error_code ec;
    if (const std::uintmax_t size = std::filesystem::file_size(path, ec); !ec) {  // (a pipe has no size)
        require_memory("file '" + path + "'", double(size));
        data.reserve(size_t(size));
    }
    char buffer[1 << 16];
    for (size_t n; (n = std::fread(buffer, 1, sizeof buffer, f.get())) > 0;) data.append(buffer, n);
    if (std::ferror(f.get())) fail("error while reading '", path, "'");
    return data;
}
// Writes `path` so that a reader never sees half a file and a crash or a full disk never destroys the old version:
// write(FILE*) fills "<path>.tmp" (false: a failed write), renamed over `path` (atomic on POSIX) only when every byte
// is out. Checkpoints, token files, safetensors and PNGs are written this way; `what` names the kind of file.
template <class Writer>
inline void write_file_atomic_stream(const std::string& path, const char* what, const Writer& write) {
    const std::string tmp = path + ".tmp";
    io_detail::File f(std::fopen(tmp.c_str(), "wb"));
    if (!f) fail(what, " ", path, ": cannot create '", tmp, "': ", std::strerror(errno));
    const auto remove = [](const char* name) { std::remove(name); };  // on every way out but the rename
    std::unique_ptr<const char, decltype(remove)> cleanup(tmp.c_str(), remove);
    const bool ok = write(f.get());
    if (std::fclose(f.release()) != 0 || !ok)  // fclose flushes, and reports a failed flush
        fail(what, " ", path, ": writing '", tmp, "' failed (disk full?)");
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
        fail(what, " ", path, ": renaming '", tmp, "' to it failed: ", std::strerror(errno));
    cleanup.release();
}
// Creates a directory and its missing parents (like mkdir -p); the error names the directory.
inline void make_directories(const std::string& dir) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) fail("cannot create the directory '", dir, "': ", ec.message());
}
inline bool write_bytes(FILE* f, const void* p, size_t n) { return n == 0 || std::fwrite(p, 1, n, f) == n; }
inline void write_file_atomic(const std::string& path, const std::string& data, const char* what = "file") {
    write_file_atomic_stream(path, what, [&](FILE* f) { return write_bytes(f, data.data(), data.size()); });
}

// --- 11.3 Byte-level BPE tokenizer -----------------------------------------------------------------------------------
// DeepSeek-V3 tokenizes with byte-level BPE (128K tokens): the alphabet is the 256 byte values, so every byte string
// (valid UTF-8 or not, NUL included) has an encoding and decode(encode(s)) == s. Training starts from single bytes and
// repeatedly adds the most frequent adjacent pair of tokens as a new token (a "merge"); encoding replays the merges in
// the order they were learned. Ids: 0..255 the bytes, 256 + i merge i, then the special tokens, spelt as in DeepSeek's
// vocabularies (BOS, EOS, the FIM tokens of 11.5), which encode(text) never makes (their spelling is encoded as bytes,
// so no document can forge one) and encode_with_specials() does.
// Pre-tokenization, as in GPT-2 and DeepSeek: merges never cross a chunk boundary, so tokens are pieces of words, not
// spans such as "e, t". Bytes are letters (A-Z, a-z and every byte >= 0x80, so that UTF-8 characters stay inside
// words), digits, whitespace or punctuation. A chunk, cut at 256 bytes (bounding the cost of pathological input), is
//   - a word: an optional single leading space and a run of letters             " thou", "ROMEO"
//   - a number: an optional leading space and 1 to 3 digits                      " 123", "4"   (V3: \p{N}{1,3})
//   - punctuation: an optional leading space, a run of punctuation and the line breaks after it, ":\n", ".\n\n"
//     (V3's pre-tokenizer also makes tokens that combine punctuation and line breaks, report §4.1)
//   - whitespace: a run of spaces and line breaks, except that the last space before a word goes with the word.
// Training counts pairs incrementally over the distinct chunks (Tiny Shakespeare: ~30K for 1.1M bytes), weighted by
// their counts, and remembers the chunks where each pair occurs: a merge touches only those (old pairs out, merge, new
// pairs in). A heap of (count, pair) with lazy deletion (an entry is valid while its count is current) picks the
// next merge; ties go to the smallest (left id, right id), so training is deterministic.
// File format (text, one item per line; '#' starts a comment on every line except the special-token lines):
//   dsv3-bpe-tokenizer 1
//   pretokenizer dsv3-chunks-1
//   merges M       then M lines "LEFT RIGHT": token ids; line i creates token 256 + i from two smaller ids
//   specials K     then K lines, one spelling each (UTF-8, no spaces); ids n_ordinary() ... + K - 1
//   end
struct Tokenizer {
    static constexpr const char* kBosText = "<｜begin▁of▁sentence｜>";  // ｜ is U+FF5C, ▁ is U+2581 (UTF-8 bytes)
    static constexpr const char* kEosText = "<｜end▁of▁sentence｜>";
    static constexpr const char* kFimBeginText = "<｜fim▁begin｜>";
    static constexpr const char* kFimHoleText = "<｜fim▁hole｜>";
    static constexpr const char* kFimEndText = "<｜fim▁end｜>";
    static constexpr int kMaxChunk = 256;
    std::vector<std::pair<uint32_t, uint32_t>> merges;  // merges[i] = (left, right) makes token 256 + i
    std::vector<std::string> specials, pieces;          // special tokens' spellings in id order; every token's bytes
    std::unordered_map<uint64_t, uint32_t> merge_of;    // (left << 32 | right) -> merged token id
    uint32_t bos = 0, eos = 0, fim_begin = 0, fim_hole = 0, fim_end = 0;
    int n_ordinary() const { return 256 + int(merges.size()); }
    int vocab_size() const { return n_ordinary() + int(specials.size()); }  // what the model's embedding needs
    bool is_special(uint32_t id) const { return id >= uint32_t(n_ordinary()) && id < uint32_t(vocab_size()); }
    static Tokenizer bytes_only() {  // no merges: one token per byte (plus the special tokens)
        Tokenizer t;
        t.specials = {kBosText, kEosText, kFimBeginText, kFimHoleText, kFimEndText};
        t.build_tables("Tokenizer::bytes_only");
        return t;
    }
    // ---- pre-tokenizer -----------------------------------------------------------------------------------------
    enum ByteClass : uint8_t { kLetter, kDigit, kSpace, kLineBreak, kPunct };
    static ByteClass byte_class(uint8_t c) {
        if (c >= 0x80 || ((c | 32) >= 'a' && (c | 32) <= 'z')) return kLetter;
        if (c >= '0' && c <= '9') return kDigit;
        if (c == ' ' || c == '\t' || c == '\v' || c == '\f') return kSpace;
        return c == '\n' || c == '\r' ? kLineBreak : kPunct;
    }
    // f(begin, end) for every chunk of `text`, in order; the chunks tile the text exactly.
    template <class F>
    static void for_each_chunk(std::string_view text, const F& f) {
        auto is_space = [](ByteClass k) { return k == kSpace || k == kLineBreak; };
        const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
        const size_t n = text.size();
        for (size_t i = 0, j; i < n; i = j) {  // the chunk [i, j)
            j = i;
            ByteClass k = byte_class(s[i]);
            if (s[i] == ' ' && i + 1 < n && !is_space(byte_class(s[i + 1]))) k = byte_class(s[++j]);
            if (k == kDigit) {
                for (int d = 0; d < 3 && j < n && byte_class(s[j]) == kDigit; ++d) ++j;
            } else if (!is_space(k)) {  // a word; or punctuation, with the line breaks right after it
                while (j < n && byte_class(s[j]) == k) ++j;
                while (k == kPunct && j < n && byte_class(s[j]) == kLineBreak) ++j;
            } else {  // whitespace; a run longer than one byte leaves its last space to the word after it
                while (j < n && is_space(byte_class(s[j]))) ++j;
                if (j < n && j - i >= 2 && s[j - 1] == ' ') --j;
            }
            j = std::min(j, i + size_t(kMaxChunk));
            f(i, j);
        }
    }
    // ---- training ---------------------------------------------------------------------------------------------
    static uint64_t pair_key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }
    // Replaces every occurrence of the pair (a, b) in sym by c: left to right, non-overlapping ("aaa" -> "Ca").
    static void replace_pair(std::vector<uint32_t>& sym, uint32_t a, uint32_t b, uint32_t c) {
        size_t out = 0;
        for (size_t i = 0; i < sym.size();) {
            if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) sym[out++] = c, i += 2;
            else sym[out++] = sym[i++];
        }
        sym.resize(out);
    }
    // The state of training: the distinct chunks as token sequences with their counts, count[pair] (weighted by
    // chunk count), where[pair] (the chunks that contain, or contained, it), and the heap of (count, pair).
    struct BpeTrainer {
        std::vector<std::vector<uint32_t>> words;
        std::vector<int64_t> freq;
        std::unordered_map<uint64_t, int64_t> count, count_before;  // count_before: pairs this merge touched
        std::unordered_map<uint64_t, std::vector<uint32_t>> where;
        using Entry = std::pair<int64_t, uint64_t>;  // (-count, pair): the top is the largest count, then smallest pair
        std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
        std::vector<uint32_t> last_merge;  // a chunk is rewritten once per merge
        explicit BpeTrainer(std::string_view text) {
            // Distinct chunks, sorted so that chunk indices (and everything after) do not depend on hashing.
            std::unordered_map<std::string_view, int64_t> chunk_counts;
            for_each_chunk(text, [&](size_t b, size_t e) { ++chunk_counts[text.substr(b, e - b)]; });
            std::vector<std::pair<std::string_view, int64_t>> chunks(chunk_counts.begin(), chunk_counts.end());
            std::sort(chunks.begin(), chunks.end());
            for (const auto& [chunk, n] : chunks) {
                words.emplace_back(reinterpret_cast<const uint8_t*>(chunk.data()),
                                   reinterpret_cast<const uint8_t*>(chunk.data()) + chunk.size());
                freq.push_back(n);
            }
            last_merge.assign(words.size(), UINT32_MAX);
            for (uint32_t w = 0; w < words.size(); ++w)
                for (size_t i = 0; i + 1 < words[w].size(); ++i) {
                    const uint64_t k = pair_key(words[w][i], words[w][i + 1]);
                    count[k] += freq[w];
                    note(k, w);
                }
            for (const auto& [k, c] : count) heap.push({-c, k});
        }
        void note(uint64_t k, uint32_t w) {
            auto& list = where[k];
            if (list.empty() || list.back() != w) list.push_back(w);
        }
        void add(uint64_t k, int64_t delta) {
            int64_t& n = count[k];
            count_before.emplace(k, n);  // keeps the first (pre-merge) value
            n += delta;
        }
        // The most frequent pair, skipping stale heap entries (outdated counts); false if none occurs min_count times.
        bool next_pair(int64_t min_count, uint64_t* pair) {
            while (!heap.empty()) {
                const auto [minus_count, top] = heap.top();
                heap.pop();
                auto it = count.find(top);
                if (it == count.end() || it->second != -minus_count) continue;
                if (-minus_count < min_count) return false;
                *pair = top;
                return true;
            }
            return false;
        }
        // Merges `pair` into token c in the chunks that hold it: subtract their old pairs, merge, add the new ones.
        void merge(uint64_t pair, uint32_t c) {
            const uint32_t a = uint32_t(pair >> 32), b = uint32_t(pair & 0xFFFFFFFFu);
            std::vector<uint32_t> chunks_with_pair = std::move(where[pair]);
            where.erase(pair);
            count_before.clear();
            for (uint32_t w : chunks_with_pair) {
                std::vector<uint32_t>& sym = words[w];
                if (last_merge[w] == c) continue;
                last_merge[w] = c;
                auto is_pair = [&](uint32_t x, uint32_t y) { return x == a && y == b; };
                if (std::adjacent_find(sym.begin(), sym.end(), is_pair) == sym.end()) continue;
                for (size_t i = 0; i + 1 < sym.size(); ++i) add(pair_key(sym[i], sym[i + 1]), -freq[w]);
                replace_pair(sym, a, b, c);
                for (size_t i = 0; i + 1 < sym.size(); ++i) {
                    add(pair_key(sym[i], sym[i + 1]), freq[w]);
                    if (sym[i] == c || sym[i + 1] == c) note(pair_key(sym[i], sym[i + 1]), w);  // new to this chunk
                }
            }
            for (const auto& [k, old] : count_before) {
                const int64_t now = count[k];
                if (now == 0) count.erase(k);
                else if (now != old) heap.push({-now, k});
            }
        }
    };
    // Learns merges on `text` up to n_ordinary_tokens (256 + merges), or until no pair occurs min_pair_count times.
    static Tokenizer train(std::string_view text, int n_ordinary_tokens, int64_t min_pair_count = 2) {
        if (n_ordinary_tokens < 256)
            fail("Tokenizer::train: vocabulary of ", n_ordinary_tokens,
                 " ordinary tokens requested; expected at least 256 (the byte alphabet)");
        Tokenizer tok = bytes_only();
        BpeTrainer trainer(text);
        uint64_t pair = 0;
        while (tok.n_ordinary() < n_ordinary_tokens && trainer.next_pair(min_pair_count, &pair)) {
            trainer.merge(pair, uint32_t(tok.n_ordinary()));  // the new token's id
            tok.merges.push_back({uint32_t(pair >> 32), uint32_t(pair & 0xFFFFFFFFu)});
        }
        tok.build_tables("Tokenizer::train");
        return tok;
    }
    // ---- encoding and decoding --------------------------------------------------------------------------------
    // BPE of one chunk: apply the earliest-learned merge present, everywhere in the chunk, until none applies.
    void encode_chunk(const uint8_t* s, size_t n, std::vector<uint32_t>& sym) const {
        sym.assign(s, s + n);
        while (sym.size() >= 2) {
            uint32_t best = UINT32_MAX;
            for (size_t i = 0; i + 1 < sym.size(); ++i) {
                auto it = merge_of.find(pair_key(sym[i], sym[i + 1]));
                if (it != merge_of.end() && it->second < best) best = it->second;
            }
            if (best == UINT32_MAX) break;
            replace_pair(sym, merges[best - 256].first, merges[best - 256].second, best);
        }
    }
    // Appends the tokens of `text` (never special tokens); a per-call cache makes a repeated chunk one hash lookup.
    void encode_append(std::string_view text, std::vector<uint32_t>& out) const {
        const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
        if (merges.empty()) { out.insert(out.end(), s, s + text.size()); return; }
        std::unordered_map<std::string_view, std::vector<uint32_t>> cache;  // chunk -> its tokens
        for_each_chunk(text, [&](size_t b, size_t e) {
            const auto [it, fresh] = cache.try_emplace(text.substr(b, e - b));
            if (fresh) encode_chunk(s + b, e - b, it->second);
            out.insert(out.end(), it->second.begin(), it->second.end());
        });
    }
    std::vector<uint32_t> encode(std::string_view text) const {
        std::vector<uint32_t> out;
        out.reserve(text.size() / 3 + 16);
        encode_append(text, out);
        return out;
    }
    // Like encode(), but the spellings of the special tokens in `text` become the special tokens.
    std::vector<uint32_t> encode_with_specials(std::string_view text) const {
        std::vector<uint32_t> out;
        size_t start = 0;
        for (size_t i = 0; i < text.size(); ++i) {
            if (text[i] != '<') continue;
            for (size_t k = 0; k < specials.size(); ++k)
                if (text.compare(i, specials[k].size(), specials[k]) == 0) {
                    encode_append(text.substr(start, i - start), out);
                    out.push_back(uint32_t(n_ordinary() + int(k)));
                    i += specials[k].size() - 1;
                    start = i + 1;
                    break;
                }
        }
        encode_append(text.substr(start), out);
        return out;
    }
    template <class Id>  // uint32_t or int32_t
    std::string decode(const Id* ids, size_t n) const {
        std::string out;
        for (size_t i = 0; i < n; ++i) {
            const uint32_t id = uint32_t(ids[i]);
            if (id >= pieces.size())
                fail("Tokenizer::decode: token id ", id, " at position ", i, " is outside the vocabulary of ",
                     pieces.size(), " tokens");
            out += pieces[id];
        }
        return out;
    }
    template <class Id> std::string decode(const std::vector<Id>& ids) const { return decode(ids.data(), ids.size()); }
    // A token as printable text, e.g. for tables: " thou", "\n", "\xe2".
    std::string token_text(uint32_t id) const {
        if (id >= pieces.size())
            fail("Tokenizer::token_text: token id ", id, " outside the vocabulary of ", pieces.size());
        return is_special(id) ? pieces[id] : escape_bytes(pieces[id]);
    }
    // ---- save and load ----------------------------------------------------------------------------------------
    void save(const std::string& path) const {
        std::string s;
        s += "dsv3-bpe-tokenizer 1  # byte-level BPE; ids 0-255 = bytes, 256+i = merge i, then the specials\n";
        s += "pretokenizer dsv3-chunks-1\n";
        s += "merges " + std::to_string(merges.size()) + "  # each line: LEFT RIGHT -> new token\n";
        for (size_t i = 0; i < merges.size(); ++i)
            s += std::to_string(merges[i].first) + " " + std::to_string(merges[i].second) + "  # " +
                 std::to_string(256 + i) + " \"" + escape_bytes(pieces[256 + i]) + "\"\n";
        s += "specials " + std::to_string(specials.size()) + "  # ids from " + std::to_string(n_ordinary()) + "\n";
        for (const std::string& sp : specials) s += sp + "\n";
        s += "end\n";
        write_file_atomic(path, s);
    }
    static Tokenizer load(const std::string& path) {
        std::istringstream in(read_file_bytes(path));
        size_t line_no = 0;  // of the line last read
        auto where = [&] { return "tokenizer file '" + path + "' line " + std::to_string(line_no); };
        // The next line that is not empty once trimmed and, unless it is a special-token line, stripped of comments.
        auto next = [&](const char* expected, bool comments = true) {
            for (std::string s; std::getline(in, s);) {
                ++line_no;
                if (comments) s = s.substr(0, s.find('#'));
                const size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t\r");
                if (e != std::string::npos) return s.substr(b, e - b + 1);  // (then b <= e)
            }
            fail("tokenizer file '", path, "' ends after line ", line_no, "; expected ", expected);
        };
        auto expect_line = [&](const char* want, const char* note) {
            const std::string s = next((std::string("'") + want + "'").c_str());
            if (s != want)
                fail(where(), ": expected '", want, "'", note, ", found '", escape_bytes(s.substr(0, 60)), "'");
        };
        auto keyword_count = [&](const std::string& keyword, const char* expected, long long most) {
            const std::string s = next(expected);
            if (s.compare(0, keyword.size(), keyword) != 0)
                fail(where(), ": expected ", expected, ", found '", escape_bytes(s), "'");
            return size_t(parse_int(std::string_view(s).substr(keyword.size()), where() + ": the count of " + expected,
                                    0, most));
        };
        expect_line("dsv3-bpe-tokenizer 1", " (this is not a dsv3 tokenizer file, or another version)");
        expect_line("pretokenizer dsv3-chunks-1", "");
        Tokenizer tok;
        const size_t n_merges = keyword_count("merges ", "'merges <count>'", 1 << 24);
        // Piece lengths, so that merges that double a piece at every step (0 0, 256 256, 257 257, ...: 4.4 GB of
        // pieces from a 520-byte file) are an error here: at most 65,536 bytes a piece and 256 MiB in all.
        std::vector<uint32_t> piece_len(256, 1);
        uint64_t piece_bytes = 256;
        for (size_t i = 0; i < n_merges; ++i) {
            const std::string s = next("a merge line 'LEFT RIGHT'");
            const size_t gap = s.find_first_of(" \t"), right = s.find_first_not_of(" \t", gap);
            if (gap == std::string::npos || s.find_first_of(" \t", right) != std::string::npos)
                fail(where(), ": expected merge ", i, " of ", n_merges, " as two token ids 'LEFT RIGHT', found '",
                     escape_bytes(s), "'");
            const std::string what = where() + ": merge " + std::to_string(i) + ", ";
            const size_t a = size_t(parse_int(std::string_view(s).substr(0, gap), what + "left token id", 0, INT_MAX));
            const size_t b = size_t(parse_int(std::string_view(s).substr(right), what + "right token id", 0, INT_MAX));
            if (a >= 256 + i || b >= 256 + i)
                fail(where(), ": merge ", i, " refers to token ", std::max(a, b), ", but only tokens below ", 256 + i,
                     " exist before it");
            const uint64_t len = uint64_t(piece_len[a]) + piece_len[b];
            piece_bytes += len;
            if (len > (1u << 16) || piece_bytes > (uint64_t(1) << 28))
                fail(where(), ": merge ", i, " makes a piece of ", len, " bytes (", piece_bytes, " bytes of pieces in "
                     "all); at most 65536 bytes a piece and 268435456 in all");
            piece_len.push_back(uint32_t(len));
            tok.merges.push_back({uint32_t(a), uint32_t(b)});
        }
        const size_t n_specials = keyword_count("specials ", "'specials <count>'", 1 << 16);
        for (size_t i = 0; i < n_specials; ++i) {
            tok.specials.push_back(next("a special token spelling", false));
            if (tok.specials.back().find_first_of(" \t") != std::string::npos)
                fail(where(), ": expected one special token spelling without spaces, found '",
                     escape_bytes(tok.specials.back()), "'");
        }
        expect_line("end", "");
        tok.build_tables(("tokenizer file '" + path + "'").c_str());
        return tok;
    }
    // Fills pieces, merge_of and the special ids from merges and specials; `origin` names the source in errors.
    void build_tables(const char* origin) {
        pieces.clear();
        for (int b = 0; b < 256; ++b) pieces.push_back(std::string(1, char(b)));
        merge_of.clear();
        for (size_t i = 0; i < merges.size(); ++i) {
            const auto [a, b] = merges[i];
            if (const auto [it, fresh] = merge_of.emplace(pair_key(a, b), uint32_t(256 + i)); !fresh)
                fail(origin, ": merge ", i, " (", a, " ", b, ") repeats merge ", it->second - 256);
            pieces.push_back(pieces[a] + pieces[b]);
        }
        pieces.insert(pieces.end(), specials.begin(), specials.end());
        const std::pair<uint32_t*, const char*> ids[] = {
            {&bos, kBosText}, {&eos, kEosText}, {&fim_begin, kFimBeginText}, {&fim_hole, kFimHoleText},
            {&fim_end, kFimEndText}};
        for (const auto& [id, spelling] : ids) {
            const auto k = std::find(specials.begin(), specials.end(), spelling);
            if (k == specials.end())
                fail(origin, ": the special token ", spelling, " is missing; expected it among the ", specials.size(),
                     " special tokens");
            *id = uint32_t(n_ordinary() + (k - specials.begin()));
        }
    }
};

// --- 11.4 Token files and datasets -----------------------------------------------------------------------------------
// Token file (binary, little-endian), written by write_tokens and examples/prepare_data:
//   offset  0  8 bytes   magic "DSV3TOKS"
//   offset  8  uint32    version = 1
//   offset 12  uint32    token width in bytes: 2 (uint16, when vocab_size <= 65536) or 4 (uint32)
//   offset 16  uint64    number of tokens N
//   offset 24  uint32    vocab_size of the tokenizer that wrote them (every token is below it)
//   offset 28  uint32    reserved, 0
//   offset 32  N tokens of the given width
constexpr char kTokenFileMagic[9] = "DSV3TOKS";
constexpr size_t kTokenFileHeaderBytes = 32;
inline void write_tokens(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size) {
    const uint32_t width = vocab_size <= 65536 ? 2 : 4;
    std::string bytes(kTokenFileHeaderBytes + tokens.size() * width, '\0');
    std::memcpy(&bytes[0], kTokenFileMagic, 8);
    store_le(&bytes[8], 1, 4);
    store_le(&bytes[12], width, 4);
    store_le(&bytes[16], tokens.size(), 8);
    store_le(&bytes[24], vocab_size, 4);
    for (size_t i = 0; i < tokens.size(); ++i) {
        if (tokens[i] >= vocab_size)
            fail("write_tokens '", path, "': token ", tokens[i], " at position ", i, " is outside the vocabulary of ",
                 vocab_size);
        store_le(&bytes[kTokenFileHeaderBytes + i * width], tokens[i], int(width));
    }
    write_file_atomic(path, bytes);
}
// A sequence of tokens to train or evaluate on. `name` (usually the file) appears in every error.
struct TokenDataset {
    std::string name;
    std::vector<uint32_t> tokens;
    uint32_t vocab_size = 0;
    static TokenDataset from_tokens(std::string name, std::vector<uint32_t> tokens, uint32_t vocab_size) {
        return TokenDataset{std::move(name), std::move(tokens), vocab_size};
    }
    // Reads a token file; with seq_len > 0 also checks that it holds at least one sequence of seq_len + 1 tokens.
    static TokenDataset load(const std::string& path, int seq_len = 0) {
        const std::string bytes = read_file_bytes(path), what = "token file '" + path;
        if (bytes.empty())
            fail(what, "' is empty (0 bytes); expected a ", kTokenFileHeaderBytes,
                 "-byte header starting with \"DSV3TOKS\" (write it with examples/prepare_data)");
        if (bytes.compare(0, 8, kTokenFileMagic, std::min<size_t>(8, bytes.size())) != 0)
            fail(what, "' has the wrong magic: expected \"DSV3TOKS\", found \"", escape_bytes(bytes.substr(0, 8)),
                 "\"; it is not a token file written by write_tokens");
        if (bytes.size() < kTokenFileHeaderBytes)
            fail(what, "' is truncated: ", bytes.size(), " bytes, shorter than its ", kTokenFileHeaderBytes,
                 "-byte header");
        auto get = [&](size_t at, int n) { return load_le(&bytes[at], n); };
        const uint64_t version = get(8, 4), width = get(12, 4), count = get(16, 8), vocab = get(24, 4);
        if (version != 1) fail(what, "': version ", version, " in the header, expected 1");
        if (width != 2 && width != 4) fail(what, "': token width ", width, " bytes in the header, expected 2 or 4");
        if (vocab == 0 || (width == 2 && vocab > 65536))
            fail(what, "': vocab_size ", vocab, " in the header does not fit tokens of ", width, " bytes");
        const uint64_t have = bytes.size() - kTokenFileHeaderBytes;
        if (count > have / width)
            fail(what, "' is truncated: its header promises ", count, " tokens of ", width, " bytes (", count * width,
                 " bytes), but only ", have, " bytes follow the header");
        if (count * width != have)
            fail(what, "' has ", have - count * width, " unexpected bytes after its ", count, " tokens");
        TokenDataset d{path, std::vector<uint32_t>(size_t(count)), uint32_t(vocab)};
        for (size_t i = 0; i < count; ++i) {
            d.tokens[i] = uint32_t(get(kTokenFileHeaderBytes + i * width, int(width)));
            if (d.tokens[i] >= vocab)
                fail(what, "': token ", d.tokens[i], " at position ", i, " is outside its vocabulary of ", vocab);
        }
        if (seq_len > 0) d.require_sequence(seq_len);
        return d;
    }
    void save(const std::string& path) const { write_tokens(path, tokens, vocab_size); }
    // Throws unless one training window (T + 1 tokens: T inputs and, shifted by one, T targets) fits.
    void require_sequence(int T) const {
        if (T <= 0) fail("dataset '", name, "': sequence length ", T, ", expected a positive length");
        if (tokens.size() < size_t(T) + 1)
            fail("dataset '", name, "' holds ", tokens.size(),
                 " tokens, shorter than one sequence: a window of T + 1 = ", T + 1, " tokens is needed");
    }
    // B random windows of T + 1 consecutive tokens into inputs[B, T + 1]: the model reads positions 0..T-1 and
    // predicts 1..T. Every start is equally likely; the same Rng state gives the same batch.
    void sample_batch(Rng& rng, int B, int T, int32_t* inputs) const {
        require_sequence(T);
        for (int b = 0; b < B; ++b) {
            const auto start = tokens.begin() + long(rng.below(tokens.size() - size_t(T)));
            std::copy(start, start + T + 1, inputs + size_t(b) * size_t(T + 1));
        }
    }
};
// The first (1 - val_fraction) of a dataset for training, the rest for validation (nanoGPT's: 90% and the last 10%).
inline size_t train_val_split_point(size_t n, double val_fraction = 0.1) {
    if (!(val_fraction >= 0 && val_fraction < 1))
        fail("train/val split: val_fraction ", val_fraction, ", expected [0, 1)");
    return size_t(double(n) * (1.0 - val_fraction));
}
inline std::pair<TokenDataset, TokenDataset> split_train_val(const TokenDataset& all, double val_fraction = 0.1) {
    const auto cut = all.tokens.begin() + long(train_val_split_point(all.tokens.size(), val_fraction));
    return {TokenDataset::from_tokens(all.name + " (train)", {all.tokens.begin(), cut}, all.vocab_size),
            TokenDataset::from_tokens(all.name + " (val)", {cut, all.tokens.end()}, all.vocab_size)};
}
// Evaluation over a whole split, deterministically: window w holds tokens [w*T, w*T + T] (T inputs, T targets), so
// every target 1..N-1 is predicted exactly once across the non-overlapping windows, but for the last (N - 1) mod T;
// with cover_tail these get one more window, the last T + 1 tokens, whose `scored` mask marks the targets not yet
// counted. Usage:  EvalBatches it(val, T);  while (int rows = it.next(B, inputs, scored)) { loss over rows ... }
struct EvalBatches {
    const TokenDataset* data;
    int T;
    int64_t n_full;      // complete non-overlapping windows
    bool has_tail;       // one more, overlapping, window covers the remaining targets (cover_tail)
    int64_t next_window = 0;
    EvalBatches(const TokenDataset& d, int seq_len, bool cover_tail = false) : data(&d), T(seq_len) {
        d.require_sequence(seq_len);
        n_full = int64_t((d.tokens.size() - 1) / size_t(T));
        has_tail = cover_tail && (d.tokens.size() - 1) % size_t(T) != 0;
    }
    int64_t n_windows() const { return n_full + (has_tail ? 1 : 0); }
    int64_t n_scored_targets() const { return has_tail ? int64_t(data->tokens.size()) - 1 : n_full * T; }
    void reset() { next_window = 0; }
    // Fills up to B rows of inputs[B, T + 1] (and scored[B, T] if not null: 1 = count this target) and returns the
    // number of rows filled; 0 when the split is done. Rows past the returned count hold token 0 and scored 0.
    int next(int B, int32_t* inputs, uint8_t* scored = nullptr) {
        if (has_tail && !scored)
            fail("EvalBatches over '", data->name, "': cover_tail needs the `scored` mask (the last window overlaps "
                 "the one before it)");
        const size_t W = size_t(T) + 1, N = data->tokens.size();
        std::fill(inputs, inputs + size_t(B) * W, 0);
        if (scored) std::fill(scored, scored + size_t(B) * size_t(T), uint8_t(0));
        int rows = 0;
        for (; rows < B && next_window < n_windows(); ++rows, ++next_window) {
            const bool tail = next_window == n_full;
            const size_t start = tail ? N - W : size_t(next_window) * size_t(T);
            std::copy(data->tokens.begin() + long(start), data->tokens.begin() + long(start + W), inputs + rows * W);
            for (size_t t = 0; scored && t < size_t(T); ++t)  // target t is token start + 1 + t
                scored[size_t(rows) * size_t(T) + t] = uint8_t(!tail || start + 1 + t > size_t(n_full) * size_t(T));
        }
        return rows;
    }
};

// --- 11.5 FIM: fill in the middle (PSM: prefix, suffix, middle) ------------------------------------------------------
// DeepSeek-Coder trains with FIM so that a left-to-right model can fill a hole given what comes after it: a document
// is cut at two random points into prefix, middle, suffix and rearranged, so that the model sees both sides first, as
//     <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>
// or, with probability 1 - rate, kept as it is, followed by <｜end▁of▁sentence｜>. Rate 0.5 in DeepSeek-Coder and
// Coder-V2, 0.1 in V3. The cut points are character positions (UTF-8 boundaries: no character is cut in two), uniform
// and sorted; the three parts are tokenized separately, as a tokenizer would see them at inference time.
struct FimSplit { std::string prefix, middle, suffix; };
inline FimSplit fim_split(const std::string& doc, Rng& rng) {
    std::vector<size_t> boundaries;  // byte offsets where a character starts, plus the end
    for (size_t i = 0; i <= doc.size(); ++i)
        if (i == doc.size() || (uint8_t(doc[i]) & 0xC0) != 0x80) boundaries.push_back(i);
    size_t p = boundaries[size_t(rng.below(boundaries.size()))];
    size_t q = boundaries[size_t(rng.below(boundaries.size()))];
    if (p > q) std::swap(p, q);
    return {doc.substr(0, p), doc.substr(p, q - p), doc.substr(q)};
}
// All documents, in order, each FIM-transformed with probability `rate`; they are encoded in parallel, document i
// drawing from Rng(seed).fork(i), so the result is the same for any thread count.
inline std::vector<uint32_t> fim_encode_documents(const Tokenizer& tok, const std::vector<std::string>& docs,
                                                  double rate, uint64_t seed) {
    if (!(rate >= 0 && rate <= 1)) fail("FIM rate ", rate, ", expected a probability in [0, 1]");
    std::vector<std::vector<uint32_t>> parts(docs.size());
    const Rng base(seed);
    parallel_for(int64_t(docs.size()), [&](int64_t i) {
        Rng rng = base.fork(uint64_t(i));
        std::vector<uint32_t>& out = parts[size_t(i)];
        if (rng.uniform() < rate) {
            const FimSplit s = fim_split(docs[size_t(i)], rng);
            for (const auto& [special, part] : {std::pair(tok.fim_begin, &s.prefix), std::pair(tok.fim_hole, &s.suffix),
                                                std::pair(tok.fim_end, &s.middle)}) {
                out.push_back(special);
                tok.encode_append(*part, out);
            }
        } else {
            tok.encode_append(docs[size_t(i)], out);
        }
        out.push_back(tok.eos);
    });
    std::vector<uint32_t> out;
    for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
}
// Documents of a plain text: the pieces between occurrences of `separator` (for plays, "\n\n" separates speeches).
// The separator stays at the end of each piece, so concatenating the documents gives the text back.
inline std::vector<std::string> split_documents(const std::string& text, const std::string& separator = "\n\n") {
    std::vector<std::string> docs;
    for (size_t b = 0, e; b < text.size(); b = e) {
        e = separator.empty() ? std::string::npos : text.find(separator, b);
        e = e == std::string::npos ? text.size() : e + separator.size();
        docs.push_back(text.substr(b, e - b));
    }
    return docs;
}

// --- 11.6 Synthetic corpus with exactly known entropy ----------------------------------------------------------------
// On real text nobody knows the best achievable loss. This corpus comes from a program whose probabilities we know:
// every line is drawn independently by random choices c_1, c_2, ... of known probabilities, which can be read back
// from the text (the tag names the sub-language, numbers and words end at a delimiter, answers are computed from the
// question). An invertible function loses no information, so -log p(line) = Σ -log p(c_i), and a byte-level model
// loses at best that over a line, however it spreads it over the bytes. Over a long corpus the best loss is then
//     E[-log p(line)] / E[bytes per line]      (nats per byte; the expectation ratio of a renewal process)
// which entropy() computes from the generator's probabilities (in closed form, by enumeration, or for the Markov
// language by summing a geometric series of matrix-vector products to machine precision). score() parses any text of
// this language and returns its exact -log p, the ideal model's loss on the same bytes. Deterministic answers (sums,
// copies, sorted lists) cost the ideal model nothing: a model's distance to the bound is how well it learnt them.
// Sub-languages, one per line, tagged by the first word (lines are printable ASCII):
//   talk   a Markov "word" language: 48 pseudo-words, each followed by one of 4 successors with probabilities
//          1/2, 1/4, 1/8, 1/8; after each word the sentence ends with probability 1/8 ("." instead of " ")
//   math   a op b = result, op uniform in {+, -, *}, a and b uniform in 0..99
//   copy   a string of 4..12 random lowercase letters, " > ", the same string
//   rev    the same with the string reversed
//   sort   3..8 numbers in 0..99, " > ", the same numbers sorted
//   count  an arithmetic progression: start 0..89, step 1..4, 3..8 terms
// The tables (words, successors) are fixed (built from a constant seed), the same for every corpus seed.
struct SyntheticSubLanguage {
    std::string name, example;  // the tag, and one line of it
    double probability;      // of a line being of this kind
    double nats_per_line;    // E[-log p(line) | kind], including -log probability of the kind
    double bytes_per_line;   // E[bytes | kind], including the tag and the newline
    double nats_per_byte;    // nats_per_line / bytes_per_line: the best loss on lines of this kind
};
struct SyntheticEntropy {
    double nats_per_byte, bits_per_byte;  // the best possible loss (cross-entropy per byte) on the corpus
    double bytes_per_line;
    std::vector<SyntheticSubLanguage> parts;
};

struct SyntheticCorpus {
    enum Kind { kTalk, kMath, kCopy, kRev, kSort, kCount, kKinds };
    static constexpr const char* kNames[kKinds] = {"talk", "math", "copy", "rev", "sort", "count"};
    static constexpr double kProb[kKinds] = {0.25, 0.15, 0.15, 0.15, 0.15, 0.15};
    static constexpr int kWords = 48;
    static constexpr double kStop = 0.125;                                 // talk: P(sentence ends after a word)
    static constexpr double kSuccessorProb[4] = {0.5, 0.25, 0.125, 0.125};  // talk: P(k-th successor)
    std::vector<std::string> words;                        // talk vocabulary
    std::vector<std::array<uint32_t, 4>> successors;       // talk transitions
    std::unordered_map<std::string, uint32_t> word_index;
    SyntheticCorpus() {
        Rng rng(0x5EED0F5EA5EEDull);  // fixed: the language is the same for every corpus seed
        while (int(words.size()) < kWords) {
            std::string w;  // 1 to 3 syllables of a consonant and a vowel (a braced list is evaluated in order)
            for (int n = 1 + int(rng.below(3)); n > 0; --n)
                w += {"bdfgklmnprstvz"[rng.below(14)], "aeiou"[rng.below(5)]};
            if (word_index.emplace(w, uint32_t(words.size())).second) words.push_back(w);
        }
        successors.resize(kWords);
        for (auto& next : successors) {  // 4 distinct successors: a partial Fisher-Yates shuffle
            std::vector<uint32_t> all(kWords);
            std::iota(all.begin(), all.end(), 0u);
            for (size_t k = 0; k < 4; ++k) std::swap(all[k], all[k + size_t(rng.below(uint64_t(kWords) - k))]);
            std::copy_n(all.begin(), 4, next.begin());
        }
    }
    static int pick(Rng& rng, const double* p, int n) {  // categorical draw
        double u = rng.uniform(), acc = 0;
        for (int i = 0; i < n - 1; ++i)
            if (u < (acc += p[i])) return i;
        return n - 1;
    }
    static int apply(int op, int a, int b) { return op == 0 ? a + b : op == 1 ? a - b : a * b; }
    static std::string join(const std::vector<int>& v) {
        std::string s;
        for (size_t i = 0; i < v.size(); ++i) s += (i ? " " : "") + std::to_string(v[i]);
        return s;
    }
    // One line, with its newline; of the given kind, or (kind < 0) of a random one.
    void append_line(Rng& rng, std::string& out, int kind = -1) const {
        if (kind < 0) kind = pick(rng, kProb, kKinds);
        out += kNames[kind] + std::string(" ");
        if (kind == kTalk) {
            uint32_t w = uint32_t(rng.below(kWords));
            out += words[w];
            while (rng.uniform() >= kStop) {
                w = successors[w][size_t(pick(rng, kSuccessorProb, 4))];
                out += ' ' + words[w];
            }
            out += '.';
        } else if (kind == kMath) {
            const int op = int(rng.below(3)), a = int(rng.below(100)), b = int(rng.below(100));
            out += std::to_string(a) + "+-*"[op] + std::to_string(b) + "=" + std::to_string(apply(op, a, b));
        } else if (kind == kCopy || kind == kRev) {
            std::string s(4 + size_t(rng.below(9)), ' ');
            for (char& c : s) c = char('a' + rng.below(26));
            out += s + " > " + (kind == kCopy ? s : std::string(s.rbegin(), s.rend()));
        } else if (kind == kSort) {
            std::vector<int> v(3 + size_t(rng.below(6)));
            for (int& x : v) x = int(rng.below(100));
            out += join(v) + " > ";
            std::sort(v.begin(), v.end());
            out += join(v);
        } else {  // kCount
            const int start = int(rng.below(90)), step = 1 + int(rng.below(4)), n = 3 + int(rng.below(6));
            for (int i = 0; i < n; ++i) out += (i ? " " : "") + std::to_string(start + i * step);
        }
        out += '\n';
    }
    // Exactly n_bytes of corpus (the last line is cut short), the same for the same seed.
    std::string generate(size_t n_bytes, uint64_t seed) const {
        Rng rng(seed);
        std::string out;
        out.reserve(n_bytes + 128);
        while (out.size() < n_bytes) append_line(rng, out);
        out.resize(n_bytes);
        return out;
    }
    // The exact -log p (nats) of the complete lines of `text` (not an unfinished last one); *bytes_scored: their bytes,
    // nats_by_kind/bytes_by_kind: the same per sub-language. A line the generator cannot produce is an Error naming it.
    double score(std::string_view text, int64_t* bytes_scored = nullptr, std::vector<double>* nats_by_kind = nullptr,
                 std::vector<double>* bytes_by_kind = nullptr) const {
        double total = 0;
        std::vector<double> nats_k(kKinds, 0.0), bytes_k(kKinds, 0.0);
        size_t b = 0;
        for (size_t e, line_no = 0; (e = text.find('\n', b)) != std::string_view::npos; b = e + 1, ++line_no) {
            int kind = -1;
            const double nats = score_line(text.substr(b, e - b), line_no, &kind);
            total += nats;
            nats_k[size_t(kind)] += nats;
            bytes_k[size_t(kind)] += double(e - b + 1);
        }
        if (bytes_scored) *bytes_scored = int64_t(b);
        if (nats_by_kind) *nats_by_kind = nats_k;
        if (bytes_by_kind) *bytes_by_kind = bytes_k;
        return total;
    }
    // One line being scored: errors name it; number() and numbers() read canonical decimals (no leading zeros).
    struct LineReader {
        std::string_view line;
        size_t line_no;
        [[noreturn]] void bad(const char* why) const {
            fail("synthetic corpus line ", line_no + 1, ": ", why, ": '", escape_bytes(line.substr(0, 120)), "'");
        }
        long number(std::string_view& s, bool allow_minus = false) const {  // the number at the front of s, removed
            const size_t from = allow_minus && !s.empty() && s[0] == '-' ? 1 : 0;
            const size_t end = std::min(s.find_first_not_of("0123456789", from), s.size());
            if (end == from || end - from > 9 || (end - from > 1 && s[from] == '0')) bad("expected a number");
            const long v = std::stol(std::string(s.substr(0, end)));
            s.remove_prefix(end);
            return v;
        }
        std::vector<long> numbers(std::string_view s) const {  // numbers separated by single spaces
            std::vector<long> v{number(s)};
            for (; !s.empty(); v.push_back(number(s))) {
                if (s[0] != ' ') bad("expected numbers separated by single spaces");
                s.remove_prefix(1);
            }
            return v;
        }
        // "question > answer"
        std::pair<std::string_view, std::string_view> split(std::string_view body, const char* expected) const {
            const size_t gt = body.find(" > ");
            if (gt == std::string_view::npos) bad(expected);
            return {body.substr(0, gt), body.substr(gt + 3)};
        }
    };
    // The exact -log p of one line (no newline), in the generator's order of choices; *kind_out: its sub-language.
    double score_line(std::string_view line, size_t line_no, int* kind_out) const {
        const LineReader r{line, line_no};
        const auto tagged = [&](const char* tag) { return line.rfind(std::string(tag) + ' ', 0) == 0; };
        const int kind = int(std::find_if(kNames, kNames + kKinds, tagged) - kNames);
        if (kind == kKinds) r.bad("expected a line starting with talk, math, copy, rev, sort or count");
        *kind_out = kind;
        std::string_view body = line.substr(std::strlen(kNames[kind]) + 1);
        double nats = -std::log(kProb[kind]);
        if (kind == kTalk) {
            if (body.empty() || body.back() != '.') r.bad("expected a sentence ending with '.'");
            body.remove_suffix(1);
            int64_t prev = -1, n = 0;
            while (true) {
                const size_t sp = body.find(' ');
                const auto it = word_index.find(std::string(body.substr(0, sp)));
                if (it == word_index.end()) r.bad("expected words of the talk vocabulary");
                if (prev < 0) nats += std::log(double(kWords));
                else {
                    int k = 0;
                    while (k < 4 && successors[size_t(prev)][size_t(k)] != it->second) ++k;
                    if (k == 4) r.bad("a word follows a word it can never follow");
                    nats -= std::log(kSuccessorProb[k]);
                }
                prev = it->second, ++n;
                if (sp == std::string_view::npos) break;
                body.remove_prefix(sp + 1);
            }
            nats += -double(n - 1) * std::log(1 - kStop) - std::log(kStop);
        } else if (kind == kMath) {
            const long a = r.number(body);
            if (body.empty()) r.bad("expected an operator");
            const int op = int(std::string_view("+-*").find(body[0]));
            if (op < 0) r.bad("expected +, - or *");
            body.remove_prefix(1);
            const long b = r.number(body);
            if (body.empty() || body[0] != '=') r.bad("expected '='");
            body.remove_prefix(1);
            const long result = r.number(body, true);
            if (!body.empty() || a > 99 || b > 99) r.bad("expected a op b=c with a, b in 0..99");
            if (result != apply(op, int(a), int(b))) r.bad("wrong result");
            nats += std::log(3.0) + 2 * std::log(100.0);
        } else if (kind == kCopy || kind == kRev) {
            const auto [q, answer] = r.split(body, "expected 'letters > letters'");
            const std::string s(q);
            if (s.size() < 4 || s.size() > 12) r.bad("expected 4 to 12 letters");
            if (!std::all_of(s.begin(), s.end(), [](char c) { return c >= 'a' && c <= 'z'; }))
                r.bad("expected lowercase letters");
            if (answer != (kind == kRev ? std::string(s.rbegin(), s.rend()) : s)) r.bad("wrong answer");
            nats += std::log(9.0) + double(s.size()) * std::log(26.0);
        } else if (kind == kSort) {
            const auto [q, answer] = r.split(body, "expected 'numbers > numbers'");
            std::vector<long> v = r.numbers(q), w = r.numbers(answer);
            if (v.size() < 3 || v.size() > 8) r.bad("expected 3 to 8 numbers");
            if (*std::max_element(v.begin(), v.end()) > 99) r.bad("expected numbers in 0..99");
            std::sort(v.begin(), v.end());
            if (v != w) r.bad("wrong answer");
            nats += std::log(6.0) + double(v.size()) * std::log(100.0);
        } else {  // kCount
            const std::vector<long> v = r.numbers(body);
            if (v.size() < 3 || v.size() > 8 || v[0] > 89 || v[1] - v[0] < 1 || v[1] - v[0] > 4)
                r.bad("expected 3 to 8 terms, start 0..89, step 1..4");
            for (size_t i = 2; i < v.size(); ++i)
                if (v[i] - v[i - 1] != v[1] - v[0]) r.bad("not an arithmetic progression");
            nats += std::log(90.0) + std::log(4.0) + std::log(6.0);
        }
        return nats;
    }
    // The exact expected -log p and length of a line of each kind, and the best loss per byte.
    SyntheticEntropy entropy() const {
        // Per kind: the expected -log p without the choice of the kind, and the length with the tag and newline.
        double nats[kKinds], bytes[kKinds];
        auto digits = [](long v) { return double(std::to_string(v).size()); };
        for (int k = 0; k < kKinds; ++k) bytes[k] = double(std::strlen(kNames[k])) + 2;  // tag, space, newline
        // talk: every successor row has the same entropy h_T, so E[nats] = log 48 (first word) + h(stop)/q (one stop
        // decision per word; E[words] = 1/q) + h_T (1/q - 1) (one transition per word after the first). The length
        // needs the distribution p_i of the i-th word: p_1 uniform, p_{i+1} = p_i P, and word i exists with
        // probability (1-q)^(i-1); the series converges geometrically and is summed until its terms vanish.
        const double q = kStop, h_stop = -q * std::log(q) - (1 - q) * std::log(1 - q);
        double h_T = 0;
        for (double p : kSuccessorProb) h_T -= p * std::log(p);
        nats[kTalk] = std::log(double(kWords)) + h_stop / q + h_T * (1 / q - 1);
        std::vector<double> p(kWords, 1.0 / kWords), next(kWords);
        double len = 0;
        for (double reach = 1; reach > 1e-18; reach *= 1 - q) {
            for (int w = 0; w < kWords; ++w) len += reach * p[size_t(w)] * double(words[size_t(w)].size() + 1);
            std::fill(next.begin(), next.end(), 0.0);
            for (int w = 0; w < kWords; ++w)
                for (int k = 0; k < 4; ++k) next[successors[size_t(w)][size_t(k)]] += p[size_t(w)] * kSuccessorProb[k];
            p.swap(next);
        }
        bytes[kTalk] += len;  // each word with the ' ' or '.' after it
        len = 0;  // math: enumerate the 30,000 equally likely questions for the answer's length
        for (int op = 0; op < 3; ++op)
            for (int a = 0; a < 100; ++a)
                for (int b = 0; b < 100; ++b) len += digits(a) + digits(b) + 2 + digits(apply(op, a, b));
        nats[kMath] = std::log(3.0) + 2 * std::log(100.0);
        bytes[kMath] += len / 30000;
        for (int k : {kCopy, kRev}) {  // length L uniform in 4..12: 2L letters and " > "
            nats[k] = std::log(9.0) + 8 * std::log(26.0);
            bytes[k] += 2 * 8 + 3;
        }
        // sort: n uniform in 3..8 numbers, twice, with n - 1 spaces each and " > "; 1.9 digits on average in 0..99
        nats[kSort] = std::log(6.0) + 5.5 * std::log(100.0);
        bytes[kSort] += 2 * (5.5 * 1.9 + 4.5) + 3;
        len = 0;  // count: enumerate the 90 * 4 * 6 equally likely progressions
        for (int s = 0; s < 90; ++s)
            for (int d = 1; d <= 4; ++d)
                for (int n = 3; n <= 8; ++n)
                    for (int i = 0; i < n; ++i) len += digits(s + i * d) + (i ? 1 : 0);
        nats[kCount] = std::log(90.0 * 4 * 6);
        bytes[kCount] += len / (90 * 4 * 6);

        SyntheticEntropy e{};  // nats_per_byte first sums E[nats per line]
        Rng example_rng(7);
        for (int k = 0; k < kKinds; ++k) {
            std::string example;
            append_line(example_rng, example, k);
            example.pop_back();  // the newline
            const double nats_per_line = nats[k] - std::log(kProb[k]);
            e.parts.push_back({kNames[k], example, kProb[k], nats_per_line, bytes[k], nats_per_line / bytes[k]});
            e.nats_per_byte += kProb[k] * nats_per_line;
            e.bytes_per_line += kProb[k] * bytes[k];
        }
        e.nats_per_byte /= e.bytes_per_line;
        e.bits_per_byte = e.nats_per_byte / std::log(2.0);
        return e;
    }
};
inline std::string synthetic_corpus(size_t n_bytes, uint64_t seed) { return SyntheticCorpus().generate(n_bytes, seed); }
inline double synthetic_corpus_entropy_nats_per_byte() { return SyntheticCorpus().entropy().nats_per_byte; }
// The text `build/train` and `build/balance` learn from, as byte tokens (vocabulary 256): the file at `path` if one is
// given; else data/tinyshakespeare.txt when `make data` has fetched it; else 1 MiB of the synthetic corpus above, so
// that training works on a machine with no network. `source` receives a description for the log.
inline std::vector<int32_t> training_bytes(const std::string& path, std::string* source = nullptr) {
    std::string what = path.empty() ? "data/tinyshakespeare.txt" : path, text;
    if (!path.empty() || io_detail::File(std::fopen(what.c_str(), "rb"))) {
        text = read_file_bytes(what);
    } else {
        text = synthetic_corpus(size_t(1) << 20, 1);
        what = format_printf("built-in synthetic corpus (1 MiB; best possible loss %.4f nats/byte; `make data` fetches "
                             "Tiny Shakespeare)", synthetic_corpus_entropy_nats_per_byte());
    }
    if (text.empty()) fail("training text ", what, ": the file is empty");
    if (source) *source = what;
    return std::vector<int32_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                reinterpret_cast<const uint8_t*>(text.data()) + text.size());
}

// =====================================================================================================================
// 12. PICTURES AND PROGRESS
// =====================================================================================================================
// --- 12.1 PNG plots --------------------------------------------------------------------------------------------------
// A tiny raster canvas: filled rectangles, anti-aliased lines (a pixel's coverage is how much of it lies within half
// the line width of the segment), and stb_easy_font's text, whose glyphs are axis-aligned quads (cap height 7 units,
// descenders to 9, about 6 a character), drawn as rectangles scaled by an integer so they stay crisp.
struct Rgb { uint8_t r, g, b; };
struct Canvas {
    int width, height;
    std::vector<uint8_t> rgb;  // [height, width, 3]
    Canvas(int w, int h, Rgb background = {255, 255, 255}) : width(w), height(h), rgb(size_t(w) * size_t(h) * 3) {
        fill_rect(0, 0, w, h, background);
    }
    uint8_t* pixel(int x, int y) { return &rgb[(size_t(y) * size_t(width) + size_t(x)) * 3]; }
    void blend(int x, int y, Rgb c, double alpha) {  // alpha 1: the colour itself, exactly
        if (x < 0 || y < 0 || x >= width || y >= height || alpha <= 0) return;
        const uint8_t to[3] = {c.r, c.g, c.b};
        uint8_t* p = pixel(x, y);
        for (int k = 0; k < 3; ++k) p[k] = uint8_t(std::lround(p[k] + (to[k] - p[k]) * std::min(alpha, 1.0)));
    }
    void fill_rect(int x0, int y0, int x1, int y1, Rgb c) {  // pixels [x0, x1) x [y0, y1), clipped to the canvas
        for (int y = std::max(y0, 0); y < std::min(y1, height); ++y)
            for (int x = std::max(x0, 0); x < std::min(x1, width); ++x) blend(x, y, c, 1.0);
    }
    void outline_rect(int x0, int y0, int x1, int y1, Rgb c) {  // 1-pixel border inside [x0, x1) x [y0, y1)
        fill_rect(x0, y0, x1, y0 + 1, c), fill_rect(x0, y1 - 1, x1, y1, c);  // top, bottom
        fill_rect(x0, y0, x0 + 1, y1, c), fill_rect(x1 - 1, y0, x1, y1, c);  // left, right
    }
    // A polyline of `line_width` pixels through (xs[i], ys[i]) (pixel coordinates; a NaN point breaks the line, a
    // point alone is a dot), drawn only inside the clip box [x0, x1) x [y0, y1). Coverage is accumulated as a maximum
    // over segments, then blended once, so joints are not darker than the line.
    void polyline(const std::vector<double>& xs, const std::vector<double>& ys, Rgb c, double line_width, int x0,
                  int y0, int x1, int y1) {
        x0 = std::max(x0, 0), y0 = std::max(y0, 0), x1 = std::min(x1, width), y1 = std::min(y1, height);
        std::vector<float> cover(size_t(width) * size_t(height), 0.0f);
        const double r = line_width / 2;
        auto ok = [&](size_t i) { return std::isfinite(xs[i]) && std::isfinite(ys[i]); };
        for (size_t i = 0; i < xs.size(); ++i) {
            const size_t j = i > 0 && ok(i - 1) ? i - 1 : i;  // the segment from point j to point i
            if (!ok(i) || (j == i && i + 1 < xs.size() && ok(i + 1))) continue;
            const double ax = xs[j], ay = ys[j], dx = xs[i] - ax, dy = ys[i] - ay, len2 = dx * dx + dy * dy;
            const int bx0 = std::max(x0, int(std::floor(std::min(ax, xs[i]) - r - 1)));
            const int bx1 = std::min(x1, int(std::ceil(std::max(ax, xs[i]) + r + 1)));
            for (int y = std::max(y0, int(std::floor(std::min(ay, ys[i]) - r - 1)));
                 y < std::min(y1, int(std::ceil(std::max(ay, ys[i]) + r + 1))); ++y)
                for (int x = bx0; x < bx1; ++x) {
                    const double px = x + 0.5 - ax, py = y + 0.5 - ay;
                    const double t = len2 > 0 ? std::clamp((px * dx + py * dy) / len2, 0.0, 1.0) : 0.0;
                    float& cv = cover[size_t(y) * size_t(width) + size_t(x)];
                    cv = std::max(cv, float(std::clamp(r + 0.5 - std::hypot(px - t * dx, py - t * dy), 0.0, 1.0)));
                }
        }
        for (int y = y0; y < y1; ++y)
            for (int x = x0; x < x1; ++x) blend(x, y, c, cover[size_t(y) * size_t(width) + size_t(x)]);
    }
    void disc(double cx, double cy, double radius, Rgb c) {
        for (int y = int(cy - radius - 1); y <= int(cy + radius + 1); ++y)
            for (int x = int(cx - radius - 1); x <= int(cx + radius + 1); ++x)
                blend(x, y, c, std::clamp(radius + 0.5 - std::hypot(x + 0.5 - cx, y + 0.5 - cy), 0.0, 1.0));
    }
    static std::string printable(std::string s) {  // stb_easy_font knows printable ASCII only; the rest shows as '?'
        std::replace_if(s.begin(), s.end(), [](char ch) { return ch < 32 || ch > 126; }, '?');
        return s;
    }
    static int text_width(const std::string& s, int scale) {  // stb counts the gap after the last character
        return s.empty() ? 0 : (stb_easy_font_width(&printable(s)[0]) - 1) * scale;
    }
    static int text_height(int scale) { return 7 * scale; }  // cap height; descenders reach 9 * scale
    // Text with its top-left corner at (x, y). Rotated text reads from bottom to top: it starts at (x, y) and grows
    // upwards, with the tops of the letters facing left (x is the left edge of the rotated box).
    void text(int x, int y, const std::string& s, Rgb c, int scale = 2, bool rotated = false) {
        std::string t = printable(s);  // (empty: no quads)
        std::vector<char> vertices(t.size() * 1024 + 64);
        const int quads = stb_easy_font_print(0, 0, &t[0], nullptr, vertices.data(), int(vertices.size()));
        for (int q = 0; q < quads; ++q) {
            float v[10];  // vertices of 16 bytes (x, y, z, rgba); 0 and 2 are opposite corners: v[0..1], v[8..9]
            std::memcpy(v, &vertices[size_t(q) * 64], sizeof v);
            const int qx0 = int(std::lround(v[0])), qy0 = int(std::lround(v[1]));
            const int qx1 = int(std::lround(v[8])), qy1 = int(std::lround(v[9]));
            if (!rotated) fill_rect(x + qx0 * scale, y + qy0 * scale, x + qx1 * scale, y + qy1 * scale, c);
            else fill_rect(x + qy0 * scale, y - qx1 * scale, x + qy1 * scale, y - qx0 * scale, c);
        }
    }
    // Text aligned on (x, y): halign -1 left, 0 centre, 1 right; valign -1 top, 0 middle (of the capitals), 1 bottom.
    void text_at(int x, int y, const std::string& s, Rgb c, int scale, int halign, int valign) {
        const int w = text_width(s, scale), h = text_height(scale);
        text(x - (halign + 1) * w / 2, y - (valign + 1) * h / 2, s, c, scale);
    }
    void text_vertical_centered(int x, int y, const std::string& s, Rgb c, int scale) {  // rotated, centred on (x, y)
        const int w = text_width(s, scale), h = text_height(scale);
        text(x - h / 2, y + w / 2, s, c, scale, true);
    }
    void save_png(const std::string& path) const {  // stb_image_write into memory, then an atomic write
        std::string png;
        auto sink = [](void* context, void* data, int size) {
            static_cast<std::string*>(context)->append(static_cast<const char*>(data), size_t(size));
        };
        if (!stbi_write_png_to_func(sink, &png, width, height, 3, rgb.data(), width * 3))
            fail("cannot write PNG '", path, "': encoding a ", width, "x", height, " image failed");
        write_file_atomic(path, png);
    }
};
// Colours: a categorical palette for lines (the "tab10" hues) and a perceptually ordered ramp for heatmaps,
// dark blue -> teal -> green -> yellow (anchor colours of the viridis map), linear between anchors.
inline Rgb series_color(size_t i) {
    static constexpr Rgb palette[10] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44}, {214, 39, 40}, {148, 103, 189},
                                        {140, 86, 75}, {227, 119, 194}, {127, 127, 127}, {188, 189, 34},
                                        {23, 190, 207}};
    return palette[i % 10];
}
inline Rgb ramp_color(double t) {
    static constexpr Rgb anchors[5] = {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
    t = std::clamp(std::isfinite(t) ? t : 0.0, 0.0, 1.0) * 4;
    const int i = std::min(3, int(t));
    const double f = t - i;
    const Rgb a = anchors[i], b = anchors[i + 1];
    auto mix = [&](uint8_t from, uint8_t to) { return uint8_t(std::lround(from + (to - from) * f)); };
    return {mix(a.r, b.r), mix(a.g, b.g), mix(a.b, b.b)};
}
// About `target` round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]; *step gets the spacing.
inline std::vector<double> nice_ticks(double lo, double hi, int target = 6, double* step_out = nullptr) {
    if (!(hi > lo)) { if (step_out) *step_out = 1; return {lo}; }
    const double raw = (hi - lo) / std::max(target, 1), magnitude = std::pow(10.0, std::floor(std::log10(raw)));
    double step = 10 * magnitude;
    for (double m : {5.0, 2.0, 1.0})  // the smallest that is large enough
        if (m * magnitude >= raw * 0.999) step = m * magnitude;
    std::vector<double> ticks;
    for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
        ticks.push_back(std::fabs(v) < step * 1e-9 ? 0.0 : v);
    if (step_out) *step_out = step;
    return ticks;
}
// A tick label with as many decimals as the spacing needs: 0.5 -> "0.5", 2000 -> "2000", 1e-5 -> "1e-05".
inline std::string format_tick(double v, double step) {
    if (v != 0 && (std::fabs(v) >= 1e6 || std::fabs(v) < 1e-3)) return format_printf("%.3g", v);
    return format_printf("%.*f", std::max(0, int(std::ceil(-std::log10(step) - 1e-9))), v);
}
// One line of a line plot. Series with few points (at most 40, e.g. validation loss every N steps) get dots.
struct PlotSeries { std::string name; std::vector<double> x, y; };
// Heatmap options: value range (NaN = from the data), square cells (for T x T maps), numbers in the cells
// (-1: when they fit), a label for the colour bar, and the colour of NaN cells (masked, e.g. future positions).
struct HeatmapOptions {
    double vmin = NAN, vmax = NAN;
    bool square_cells = false;
    int annotate = -1;
    std::string colorbar_label;
    Rgb masked{225, 225, 225};
};
namespace plot_detail {
constexpr Rgb kInk{30, 30, 30}, kGrid{225, 225, 225}, kFrame{120, 120, 120};
using Ticks = std::vector<std::pair<double, std::string>>;  // positions in axis space, and their labels
struct Box { int x0, y0, x1, y1; };                          // pixels [x0, x1) x [y0, y1)
inline Ticks linear_ticks(double lo, double hi, int target) {
    double step = 1;
    Ticks t;
    for (double v : nice_ticks(lo, hi, target, &step)) t.push_back({v, format_tick(v, step)});
    return t;
}
// Ticks of a log axis (lo, hi: log10 of the values): values m x 10^k, most important first (m = 1; then 2, 5; then 3,
// 4, 6, 7, 8, 9; then the halves), each kept if 26 pixels from all kept so far, levels added until there are 4 ticks.
inline Ticks log_ticks(double lo, double hi, double px_per_decade) {
    static const std::vector<std::vector<double>> levels = {
        {1}, {2, 5}, {3, 4, 6, 7, 8, 9}, {1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5}};
    std::vector<double> kept;
    for (size_t l = 0; l < levels.size() && kept.size() < 4; ++l)
        for (int k = int(std::floor(lo)) - 1; k <= int(std::ceil(hi)); ++k)
            for (double m : levels[l]) {
                const double a = std::log10(m) + k;
                auto far = [&](double b) { return std::fabs(a - b) * px_per_decade >= 26; };
                if (a >= lo && a <= hi && std::all_of(kept.begin(), kept.end(), far)) kept.push_back(a);
            }
    std::sort(kept.begin(), kept.end());
    Ticks t;
    for (double a : kept) t.push_back({a, format_printf("%g", std::pow(10.0, a))});
    return t;
}
// A line plot, laid out once (ranges, ticks, legend size); render() draws it.
struct LinePlot {
    static constexpr int W = 960, H = 600, S = 2, kLegendRow = 24;
    const std::vector<PlotSeries>& series;
    bool log_y, empty = false;
    double x_lo = INFINITY, x_hi = -INFINITY, y_lo = INFINITY, y_hi = -INFINITY;
    Ticks xt, yt;
    int y_label_w = 0, n_named = 0, legend_w = 0, legend_h = 0;
    double ty(double y) const { return log_y ? (y > 0 ? std::log10(y) : NAN) : y; }  // y in axis space
    LinePlot(const std::string& path, const std::vector<PlotSeries>& s, bool log) : series(s), log_y(log) {
        for (const PlotSeries& p : series) {
            if (p.x.size() != p.y.size())
                fail("plot '", path, "': series '", p.name, "' has ", p.x.size(), " x values but ", p.y.size(),
                     " y values");
            for (size_t i = 0; i < p.x.size(); ++i)
                if (std::isfinite(p.x[i]) && std::isfinite(ty(p.y[i])))
                    x_lo = std::min(x_lo, p.x[i]), x_hi = std::max(x_hi, p.x[i]),
                    y_lo = std::min(y_lo, ty(p.y[i])), y_hi = std::max(y_hi, ty(p.y[i]));
        }
        empty = !(x_lo <= x_hi);
        if (empty) x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;
        if (x_hi == x_lo) x_lo -= 0.5, x_hi += 0.5;
        if (x_lo > 0 && x_lo < 0.05 * (x_hi - x_lo)) x_lo = 0;  // steps 1..N: start the axis at 0
        if (y_hi == y_lo) { const double d = std::max(std::fabs(y_lo) * 0.1, 0.5); y_lo -= d, y_hi += d; }
        const double pad = (y_hi - y_lo) * 0.05;
        y_lo -= pad, y_hi += pad;
        xt = linear_ticks(x_lo, x_hi, 8);
        yt = log_y ? log_ticks(y_lo, y_hi, (H - 200.0) / (y_hi - y_lo)) : linear_ticks(y_lo, y_hi, 6);
        for (const auto& t : yt) y_label_w = std::max(y_label_w, Canvas::text_width(t.second, S));
        for (const PlotSeries& p : series)  // (legend_w matters only when some series are named)
            if (!p.name.empty()) legend_w = std::max(legend_w, Canvas::text_width(p.name, S) + 56), ++n_named;
        legend_h = n_named * kLegendRow + 12;
    }
    double X(const Box& b, double x) const { return b.x0 + (x - x_lo) / (x_hi - x_lo) * (b.x1 - 1 - b.x0); }
    double Y(const Box& b, double y) const { return b.y1 - 1 - (y - y_lo) / (y_hi - y_lo) * (b.y1 - 1 - b.y0); }
    // Title, grid, ticks, frame and axis labels around the plot area b.
    void draw_axes(Canvas& c, const Box& b, const std::string& title, const std::string& xlabel,
                   const std::string& ylabel) const {
        c.text_at(W / 2, 20, title, kInk, Canvas::text_width(title, 3) + 20 <= W ? 3 : 2, 0, -1);  // long: smaller
        for (const auto& [v, label] : xt) {
            const int x = int(std::lround(X(b, v)));
            c.fill_rect(x, b.y0, x + 1, b.y1, kGrid);
            c.fill_rect(x, b.y1, x + 1, b.y1 + 6, kFrame);
            c.text_at(x, b.y1 + 12, label, kInk, S, 0, -1);
        }
        for (const auto& [v, label] : yt) {
            const int y = int(std::lround(Y(b, v)));
            c.fill_rect(b.x0, y, b.x1, y + 1, kGrid);
            c.fill_rect(b.x0 - 6, y, b.x0, y + 1, kFrame);
            c.text_at(b.x0 - 10, y, label, kInk, S, 1, 0);
        }
        c.outline_rect(b.x0, b.y0, b.x1, b.y1, kFrame);
        c.text_at((b.x0 + b.x1) / 2, H - 14, xlabel, kInk, S, 0, 1);
        c.text_vertical_centered(16 + Canvas::text_height(S) / 2, (b.y0 + b.y1) / 2, ylabel, kInk, S);
        if (empty) c.text_at((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2, "no data", kFrame, S, 0, 0);
    }
    void draw_series(Canvas& c, const Box& b) const {
        for (size_t k = 0; k < series.size(); ++k) {
            const PlotSeries& s = series[k];
            std::vector<double> xs(s.x.size()), ys(s.y.size());  // pixels; NaN where the point is skipped
            for (size_t i = 0; i < s.x.size(); ++i)
                if (std::isfinite(s.x[i]) && std::isfinite(ty(s.y[i]))) xs[i] = X(b, s.x[i]), ys[i] = Y(b, ty(s.y[i]));
                else xs[i] = ys[i] = NAN;
            c.polyline(xs, ys, series_color(k), 2.0, b.x0 + 1, b.y0 + 1, b.x1 - 1, b.y1 - 1);
            if (std::count_if(xs.begin(), xs.end(), [](double x) { return std::isfinite(x); }) <= 40)
                for (size_t i = 0; i < xs.size(); ++i)
                    if (std::isfinite(xs[i])) c.disc(xs[i], ys[i], 3.5, series_color(k));
        }
    }
    // A swatch and the name of every named series, in a box with its top-left corner at (bx, by).
    void draw_legend(Canvas& c, int bx, int by) const {
        c.fill_rect(bx, by, bx + legend_w, by + legend_h, {255, 255, 255});
        c.outline_rect(bx, by, bx + legend_w, by + legend_h, kFrame);
        int i = 0;
        for (size_t k = 0; k < series.size(); ++k) {
            if (series[k].name.empty()) continue;
            const int y = by + 6 + i++ * kLegendRow + kLegendRow / 2;
            c.fill_rect(bx + 10, y - 2, bx + 38, y + 2, series_color(k));
            c.text_at(bx + 46, y, series[k].name, kInk, S, -1, 0);
        }
    }
    // The legend into the corner of the plot area with the fewest curve pixels (coloured, unlike the grey grid and
    // text) under it; *crowded when even that corner hides more than 2% of the box.
    void place_legend(Canvas& c, const Box& b, bool* crowded) const {
        auto ink_under = [&](int bx, int by) {
            int64_t n = 0;
            for (int y = std::max(by, 0); y < std::min(by + legend_h, H); ++y)
                for (int x = std::max(bx, 0); x < std::min(bx + legend_w, W); ++x) {
                    const uint8_t* p = c.pixel(x, y);
                    n += std::max({p[0], p[1], p[2]}) - std::min({p[0], p[1], p[2]}) > 30;
                }
            return n;
        };
        const int corners[4][2] = {{b.x1 - 12 - legend_w, b.y0 + 12}, {b.x0 + 12, b.y0 + 12},
                                   {b.x1 - 12 - legend_w, b.y1 - 12 - legend_h}, {b.x0 + 12, b.y1 - 12 - legend_h}};
        int64_t ink[4];
        for (int i = 0; i < 4; ++i) ink[i] = ink_under(corners[i][0], corners[i][1]);
        const int best = int(std::min_element(ink, ink + 4) - ink);
        if (ink[best] > int64_t(legend_w) * legend_h / 50 && crowded) *crowded = true;
        draw_legend(c, corners[best][0], corners[best][1]);
    }
    // The legend goes inside the plot area (place_legend) or, with legend_outside, to the right of it.
    Canvas render(const std::string& title, const std::string& xlabel, const std::string& ylabel, bool legend_outside,
                  bool* crowded) const {
        const int last_x_label_half = xt.empty() ? 0 : Canvas::text_width(xt.back().second, S) / 2;
        const Box b{16 + Canvas::text_height(S) + 14 + y_label_w + 10, 20 + Canvas::text_height(3) + 20,
                    W - std::max(24, last_x_label_half + 8) - (legend_outside ? legend_w + 16 : 0),
                    H - (12 + Canvas::text_height(S) + 16 + Canvas::text_height(S) + 18)};
        Canvas c(W, H);
        draw_axes(c, b, title, xlabel, ylabel);
        draw_series(c, b);
        if (n_named > 0 && legend_outside) draw_legend(c, b.x1 + 16, b.y0);
        else if (n_named > 0) place_legend(c, b, crowded);
        return c;
    }
};
// The smallest k of 1, 2, 4, 5, 8, 10, ... such that every k-th label (need_px) fits in k cells of cell_px.
inline int label_every(int need_px, int cell_px) {
    for (int k : {1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 250, 500, 1000})
        if (k * cell_px >= need_px) return k;
    return (need_px + cell_px - 1) / cell_px;
}
// A heatmap, laid out once; the draw_ functions paint it. Labels are drawn at scale 2, every k-th with k chosen for
// the typical (median) label width, skipping one that would still touch the one before. Column labels are horizontal
// unless rotating them lets many more of them be shown.
struct Heatmap {
    static constexpr int S = 2;
    const std::vector<float>& values;
    int rows, cols;
    const std::vector<std::string> &row_labels, &col_labels;
    const HeatmapOptions& opt;
    double lo, hi, step = 1;          // colour range; colour bar tick spacing
    int cw, ch, gw, gh;               // cell and grid sizes
    int row_every, row_w = 0, col_every, col_h;
    bool col_horizontal;
    std::vector<int> col_widths;
    std::vector<double> bar_ticks;
    int bar_h, bar_label_w = 0, gx0, gy0, bar_x0, bar_x1, xlabel_y, W, H;
    static std::string label(const std::vector<std::string>& l, int i) { return l.empty() ? std::to_string(i) : l[i]; }
    Heatmap(const std::vector<float>& v, int r, int c, const std::vector<std::string>& rl,
            const std::vector<std::string>& cl, const std::string& title, const HeatmapOptions& o)
        : values(v), rows(r), cols(c), row_labels(rl), col_labels(cl), opt(o), lo(o.vmin), hi(o.vmax) {
        double dlo = INFINITY, dhi = -INFINITY;  // the data's range, for the limits not given
        for (float x : values)
            if (std::isfinite(x)) dlo = std::min(dlo, double(x)), dhi = std::max(dhi, double(x));
        if (!(dlo <= dhi)) dlo = 0, dhi = 1;
        if (std::isnan(lo)) lo = dlo;
        if (std::isnan(hi)) hi = dhi;
        if (!(hi > lo)) hi = lo + (lo == 0 ? 1 : std::fabs(lo) * 0.01);
        cw = std::clamp(900 / cols, 2, 72), ch = std::clamp(600 / rows, 2, 64);
        if (opt.square_cells) cw = ch = std::clamp(std::min(900 / cols, 700 / rows), 2, 64);
        gw = cw * cols, gh = ch * rows;
        row_every = label_every(Canvas::text_height(S) + 6, ch);
        for (int i = 0; i < rows; i += row_every) row_w = std::max(row_w, Canvas::text_width(label(row_labels, i), S));
        for (int j = 0; j < cols; ++j) col_widths.push_back(Canvas::text_width(label(col_labels, j), S));
        std::vector<int> sorted = col_widths;
        std::sort(sorted.begin(), sorted.end());
        const int every_h = label_every(sorted[sorted.size() / 2] + 8, cw);
        const int every_v = label_every(Canvas::text_height(S) + 6, cw);
        col_horizontal = every_h <= 2 * every_v;
        col_every = col_horizontal ? every_h : every_v;
        col_h = col_horizontal ? Canvas::text_height(S) : 0;
        for (int j = 0; !col_horizontal && j < cols; j += col_every) col_h = std::max(col_h, col_widths[size_t(j)]);
        bar_h = std::max(gh, 160);
        bar_ticks = nice_ticks(lo, hi, std::clamp(bar_h / 25, 4, 10), &step);
        for (double t : bar_ticks) bar_label_w = std::max(bar_label_w, Canvas::text_width(format_tick(t, step), S));
        gx0 = 16 + Canvas::text_height(S) + 14 + row_w + 10;
        gy0 = 20 + Canvas::text_height(3) + 24;
        bar_x0 = gx0 + gw + 24, bar_x1 = bar_x0 + 20;
        W = bar_x1 + 10 + bar_label_w + (opt.colorbar_label.empty() ? 0 : 12 + Canvas::text_height(S)) + 20;
        W = std::max(W, Canvas::text_width(title, 3) + 40);
        xlabel_y = gy0 + gh + 8 + col_h + 18;  // top of the x label, under the column labels
        H = std::max(xlabel_y + Canvas::text_height(S) + 18, gy0 + bar_h + 24);
    }
    // The cells, with their numbers (2 significant digits, one text size for the whole map) when they fit.
    void draw_cells(Canvas& c) const {
        const bool annotate = opt.annotate == 1 || (opt.annotate < 0 && ch >= 14 && cw >= 30 && rows * cols <= 400);
        std::vector<std::string> text(annotate ? values.size() : 0);
        int scale = 2;
        for (size_t i = 0; i < text.size(); ++i) {
            const double v = values[i];
            if (!std::isfinite(v)) continue;
            text[i] = format_printf(std::fabs(v) >= 100 || v == std::round(v) ? "%.0f" : "%.2g", v);
            if (Canvas::text_width(text[i], 2) + 12 > cw || ch < 22) scale = 1;
        }
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < cols; ++j) {
                const size_t i = size_t(r) * size_t(cols) + size_t(j);
                const int x = gx0 + j * cw, y = gy0 + r * ch;
                const Rgb col = std::isfinite(values[i]) ? ramp_color((values[i] - lo) / (hi - lo)) : opt.masked;
                c.fill_rect(x, y, x + cw, y + ch, col);
                if (annotate && !text[i].empty() && Canvas::text_width(text[i], scale) + 4 <= cw) {
                    const bool dark = 0.299 * col.r + 0.587 * col.g + 0.114 * col.b < 140;
                    c.text_at(x + cw / 2, y + ch / 2, text[i], dark ? Rgb{255, 255, 255} : kInk, scale, 0, 0);
                }
            }
        c.outline_rect(gx0 - 1, gy0 - 1, gx0 + gw + 1, gy0 + gh + 1, kFrame);
    }
    void draw_labels(Canvas& c, const std::string& xlabel, const std::string& ylabel) const {
        for (int r = 0; r < rows; r += row_every)
            c.text_at(gx0 - 8, gy0 + r * ch + ch / 2, label(row_labels, r), kInk, S, 1, 0);
        int last_right = -1000000;
        for (int j = 0; j < cols; j += col_every) {
            const int x = gx0 + j * cw + cw / 2;
            const std::string s = label(col_labels, j);
            if (!col_horizontal) {
                c.text(x - Canvas::text_height(S) / 2, gy0 + gh + 8 + Canvas::text_width(s, S), s, kInk, S, true);
            } else if (x - col_widths[size_t(j)] / 2 >= last_right + 6) {
                last_right = x - col_widths[size_t(j)] / 2 + col_widths[size_t(j)];
                c.text_at(x, gy0 + gh + 8, s, kInk, S, 0, -1);
            }
        }
        c.text_at(gx0 + gw / 2, xlabel_y, xlabel, kInk, S, 0, -1);
        c.text_vertical_centered(16 + Canvas::text_height(S) / 2, gy0 + gh / 2, ylabel, kInk, S);
    }
    // The colour bar: the ramp from hi (top) to lo (bottom), with tick labels.
    void draw_colorbar(Canvas& c) const {
        for (int y = 0; y < bar_h; ++y)
            c.fill_rect(bar_x0, gy0 + y, bar_x1, gy0 + y + 1, ramp_color(1.0 - (y + 0.5) / bar_h));
        c.outline_rect(bar_x0 - 1, gy0 - 1, bar_x1 + 1, gy0 + bar_h + 1, kFrame);
        for (double v : bar_ticks) {
            const int y = gy0 + int(std::lround((1.0 - (v - lo) / (hi - lo)) * (bar_h - 1)));
            c.fill_rect(bar_x1, y, bar_x1 + 5, y + 1, kFrame);
            c.text_at(bar_x1 + 9, y, format_tick(v, step), kInk, S, -1, 0);
        }
        if (!opt.colorbar_label.empty())
            c.text_vertical_centered(bar_x1 + 10 + bar_label_w + 12 + Canvas::text_height(S) / 2, gy0 + bar_h / 2,
                                     opt.colorbar_label, kInk, S);
    }
};
}  // namespace plot_detail
// Line plot: loss curves and the like. log_y plots y on a logarithmic axis (non-positive values are skipped). The
// legend goes where it covers the least of the curves, or, when every corner is crowded, right of the plot area.
inline void plot_lines(const std::string& path, const std::string& title, const std::string& xlabel,
                       const std::string& ylabel, const std::vector<PlotSeries>& series, bool log_y = false) {
    const plot_detail::LinePlot plot(path, series, log_y);
    bool crowded = false;
    Canvas c = plot.render(title, xlabel, ylabel, false, &crowded);
    if (crowded) c = plot.render(title, xlabel, ylabel, true, nullptr);
    c.save_png(path);
}
// Heatmap of values[rows, cols] (row-major): e.g. expert load with rows = layers, cols = experts. Labels may be
// empty (then indices are shown); labels that would overlap are thinned to every k-th.
inline void plot_heatmap(const std::string& path, const std::string& title, const std::vector<float>& values, int rows,
                         int cols, const std::vector<std::string>& row_labels,
                         const std::vector<std::string>& col_labels, const std::string& xlabel,
                         const std::string& ylabel, const HeatmapOptions& opt = {}) {
    if (rows <= 0 || cols <= 0 || values.size() != size_t(rows) * size_t(cols))
        fail("heatmap '", path, "': ", values.size(), " values, expected rows x cols = ", rows, " x ", cols);
    if (!row_labels.empty() && row_labels.size() != size_t(rows))
        fail("heatmap '", path, "': ", row_labels.size(), " row labels for ", rows, " rows");
    if (!col_labels.empty() && col_labels.size() != size_t(cols))
        fail("heatmap '", path, "': ", col_labels.size(), " column labels for ", cols, " columns");
    const plot_detail::Heatmap map(values, rows, cols, row_labels, col_labels, title, opt);
    Canvas c(map.W, map.H);
    c.text_at(map.W / 2, 20, title, plot_detail::kInk, 3, 0, -1);
    map.draw_cells(c);
    map.draw_labels(c, xlabel, ylabel);
    map.draw_colorbar(c);
    c.save_png(path);
}
// A token as a short printable tick label: space -> '_', newline -> "\n", other control bytes -> '?'.
inline std::string tick_label(const std::string& token) {
    std::string s;
    for (char ch : token)
        s += ch == ' ' ? "_" : ch == '\n' ? "\\n" : ch == '\t' ? "\\t" : ch < 32 || ch > 126 ? "?" : std::string(1, ch);
    return s;
}
// Attention map of one head for a prompt: weights[T, T], row = query position, column = key position, labelled
// with the prompt's tokens. With `causal`, the future (column > row) is shown as masked rather than as zeros.
inline void plot_attention(const std::string& path, const std::string& title, const std::vector<float>& weights,
                           const std::vector<std::string>& tokens, bool causal = true) {
    const int T = int(tokens.size());
    if (weights.size() != size_t(T) * size_t(T))
        fail("attention plot '", path, "': ", weights.size(), " weights for ", T, " tokens, expected T x T = ",
             size_t(T) * size_t(T));
    std::vector<float> v = weights;
    if (causal)
        for (int i = 0; i < T; ++i)
            for (int j = i + 1; j < T; ++j) v[size_t(i) * size_t(T) + size_t(j)] = NAN;
    std::vector<std::string> labels;
    for (const std::string& t : tokens) labels.push_back(tick_label(t));
    const HeatmapOptions opt{/*vmin=*/0, /*vmax=*/NAN, /*square_cells=*/true, /*annotate=*/0, "attention weight"};
    plot_heatmap(path, title, v, T, T, labels, labels, "key (attended to)", "query (attending)", opt);
}

// --- 12.2 Progress line ----------------------------------------------------------------------------------------------
// "step 120/5000 (2.4%) | loss 2.3456 | lr 3.0e-04 | 12.3k tok/s | 0:12 elapsed | ETA 8:03", printed by every long
// run (an experiment names its own metric and unit: "max rel. error", "outputs"). A terminal gets it rewritten in
// place ('\r') at most 10 times a second; a file or a pipe (CI logs), a plain line every `every_steps` steps or
// `every_seconds` seconds, whichever comes first, and at the last step. A resumed run counts steps from the start of
// the whole run (step 1201/2000); its rate and ETA come from the steps this process ran (after first_step).
struct Progress {
    using Clock = std::chrono::steady_clock;
    int64_t total_steps;
    FILE* out;
    bool tty;
    int64_t every_steps;
    double every_seconds;
    int64_t first_step = 0;                      // steps done before this process started (a resumed run)
    std::string label, metric = "loss", unit = "tok";  // "label step ... | metric 2.34 | ... | 12k unit/s"
    Clock::time_point start, last_print;
    size_t last_len = 0;
    bool printed_any = false, line_open = false;  // line_open: a terminal line not ended by '\n' yet
    explicit Progress(int64_t total, FILE* stream = stdout, int64_t every_n_steps = 0, double every_n_seconds = 30)
        : total_steps(total), out(stream), tty(isatty(fileno(stream)) != 0),
          every_steps(every_n_steps > 0 ? every_n_steps : std::max<int64_t>(1, total / 20)),
          every_seconds(every_n_seconds), start(Clock::now()), last_print(start) {}
    static std::string format_duration(double seconds) {
        if (!std::isfinite(seconds) || seconds < 0) return "?";
        const long s = long(seconds + 0.5);
        if (s >= 3600) return format_printf("%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
        return format_printf("%ld:%02ld", s / 60, s % 60);
    }
    static std::string format_rate(double per_second) {
        if (per_second >= 1e6) return format_printf("%.2fM", per_second / 1e6);
        if (per_second >= 1e3) return format_printf("%.1fk", per_second / 1e3);
        return format_printf("%.0f", per_second);
    }
    static std::string format_value(double v) {
        const double a = std::fabs(v);
        return format_printf(v == 0 ? "0" : (a >= 1e5 || a < 1e-2) ? "%.2e" : "%.4f", v);
    }
    // The line itself (pure, for tests): step of total, the metric, extras, units/s, elapsed, ETA. `counted`: the
    // units (tokens) processed by this process, over elapsed_s.
    std::string format_line(int64_t step, double value, int64_t counted, double elapsed_s,
                            const std::vector<std::pair<std::string, double>>& extra = {}) const {
        std::string s = label + format_printf("step %lld/%lld (%.1f%%)", (long long)step, (long long)total_steps,
                                              total_steps > 0 ? 100.0 * double(step) / double(total_steps) : 0.0);
        s += " | " + metric + " " + format_value(value);  // NaN and inf show as such: a diverged run is visible
        for (const auto& [name, v] : extra) s += " | " + name + " " + format_value(v);
        if (counted > 0 && elapsed_s > 0) s += " | " + format_rate(double(counted) / elapsed_s) + " " + unit + "/s";
        s += " | " + format_duration(elapsed_s) + " elapsed";
        const int64_t done = step - first_step;
        if (done > 0 && step < total_steps)
            s += " | ETA " + format_duration(elapsed_s / double(done) * double(total_steps - step));
        return s;
    }
    // Call after step `step` (1-based, counted from the start of the whole run) with the metric and the number of
    // units processed by this process so far.
    void update(int64_t step, double value, int64_t counted_so_far = 0,
                const std::vector<std::pair<std::string, double>>& extra = {}) {
        const Clock::time_point now = Clock::now();
        const double since_print = std::chrono::duration<double>(now - last_print).count();
        const bool last = step >= total_steps;
        const bool due = tty ? since_print >= 0.1 : step % every_steps == 0 || since_print >= every_seconds;
        if (!due && !last && printed_any) return;
        const std::string line =
            format_line(step, value, counted_so_far, std::chrono::duration<double>(now - start).count(), extra);
        // In a terminal, '\r' goes back to the start of the line, and spaces erase the rest of a longer line before.
        const int erase = tty && last_len > line.size() ? int(last_len - line.size()) : 0;
        std::fprintf(out, "%s%s%*s%s", tty ? "\r" : "", line.c_str(), erase, "", tty && !last ? "" : "\n");
        line_open = tty && !last;
        std::fflush(out);
        last_len = line.size();
        last_print = now;
        printed_any = true;
    }
    // Ends an unfinished line in a terminal (before other output: an evaluation, an interruption).
    void break_line() {
        if (line_open) std::fputc('\n', out);
        line_open = false;
        last_len = 0;
    }
};

// =====================================================================================================================
// 13. CHECKPOINT I/O: the training checkpoint, JSON, safetensors, config.json, Hugging Face directories, .npy
// =====================================================================================================================
// 13.1 is the project's own training checkpoint and log. A Hugging Face model directory, the format DeepSeek publishes
// V3 in, holds config.json (the architecture, which 13.4 maps to Config; 13.2 reads JSON) and the weights (13.3):
// model.safetensors, or shards model-00001-of-00163.safetensors ... listed by model.safetensors.index.json. Tensor
// names are the Hugging Face names ParamLayout carries ("model.layers.3.mlp.gate.weight"), so loading (13.5) is: read
// config.json, build the model, copy every tensor into its slot of the flat parameter buffer, converting BF16/F16/FP8
// to float32. Everything read from a file is validated before it is used: a corrupt or hostile file produces an Error
// naming the file, the tensor and what was expected, never a crash. 13.6: .npy, and transformers' forward pass.

namespace io_detail {
inline File open_file(const std::string& path, const char* what) {
    File f(std::fopen(path.c_str(), "rb"));
    if (!f) fail(what, " ", path, ": cannot open: ", std::strerror(errno));
    return f;
}
// n bytes at a 64-bit file offset (safetensors shards are often larger than 2 GiB; fseeko is POSIX, like unistd.h).
inline bool read_at(std::FILE* f, uint64_t offset, void* out, size_t n) {
    return fseeko(f, off_t(offset), SEEK_SET) == 0 && (n == 0 || std::fread(out, 1, n, f) == n);
}
inline uint64_t file_size(const std::string& path) {
    std::error_code ec;
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) fail(path, ": cannot determine the file size: ", ec.message());
    return uint64_t(size);
}
inline std::string join_path(const std::string& dir, const std::string& name) {
    return (std::filesystem::path(dir) / name).string();
}
inline bool file_exists(const std::string& p) { std::error_code ec; return std::filesystem::is_regular_file(p, ec); }
inline bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
inline int64_t numel(const std::vector<int64_t>& shape) {
    return std::accumulate(shape.begin(), shape.end(), int64_t(1), std::multiplies<>());
}
inline std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}
// "a", "b", "c" ... (and 7 more): lists of names in error messages stay readable.
inline std::string name_list(const std::vector<std::string>& names, size_t show = 6) {
    std::string s;
    for (size_t i = 0; i < names.size() && i < show; ++i) s += (i ? ", \"" : "\"") + names[i] + "\"";
    if (names.size() > show) s += " ... (and " + std::to_string(names.size() - show) + " more)";
    return s;
}
}  // namespace io_detail

// --- 13.1 checkpoints ------------------------------------------------------------------------------------------------
// A training checkpoint holds everything a resumed run needs to continue bit for bit: the config, the step, the
// parameters (the routing bias included) and AdamW's moments. Text header, then raw little-endian float32 (written
// atomically: a crash never leaves a torn file):
//     dsv3-checkpoint 1
//     <Config::to_text() lines>
//     step=<optimizer steps taken>
//     run.<key>=<value>        zero or more: what the run was (RunInfo below)
//     floats=<parameter count>
//     end
//     params[floats] m[floats] v[floats]
// RunInfo: what a run records beside the weights, so that a later program needs only the checkpoint: build/train
// writes its flags (run.arg, one word each, in order: --resume continues with them), its data, the tokenizer file and
// a prompt that fits its corpus (build/generate's default). Keys may repeat; values are escaped.
struct RunInfo {
    std::vector<std::pair<std::string, std::string>> entries;
    void add(const std::string& key, const std::string& value) { entries.emplace_back(key, value); }
    std::string get(const std::string& key, const std::string& otherwise = "") const {  // the last value of key
        const auto e = std::find_if(entries.rbegin(), entries.rend(), [&](const auto& kv) { return kv.first == key; });
        return e == entries.rend() ? otherwise : e->second;
    }
    std::vector<std::string> all(const std::string& key) const {
        std::vector<std::string> out;
        for (const auto& [k, v] : entries)
            if (k == key) out.push_back(v);
        return out;
    }
};
inline void save_checkpoint(const std::string& path, const Model& model, const AdamW& opt, const RunInfo& run = {}) {
    const size_t n = model.params.size();
    std::string h = "dsv3-checkpoint 1\n" + model.cfg.to_text() + "step=" + std::to_string(opt.step) + "\n";
    for (const auto& [key, value] : run.entries) {
        if (key.empty() || key.find_first_of("=\n") != std::string::npos)
            fail("checkpoint ", path, ": run key \"", escape_bytes(key), "\" is empty or holds '=' or a line break");
        h += "run." + key + "=" + escape_bytes(value) + "\n";
    }
    h += "floats=" + std::to_string(n) + "\nend\n";
    std::vector<float> arrays[] = {backend::download(model.params), backend::download(opt.m), backend::download(opt.v)};
    for (std::vector<float>& a : arrays)  // copies in host memory; an optimizer that never stepped has no moments
        if (a.size() != n) a.assign(n, 0.0f);
    write_file_atomic_stream(path, "checkpoint", [&](FILE* f) {
        auto write = [&](const std::vector<float>& a) { return write_bytes(f, a.data(), 4 * n); };
        return write_bytes(f, h.data(), h.size()) && std::all_of(std::begin(arrays), std::end(arrays), write);
    });
}
// Reads the config a checkpoint was saved with (and its step, header size and RunInfo, where asked), checking before
// anything is allocated that floats= is the config's parameter count, that the file is exactly the header and three
// arrays of floats (the size is divided, never multiplied: no overflow) and that such a model fits in memory.
inline Config read_checkpoint_config(const std::string& path, int* step = nullptr, size_t* header_bytes = nullptr,
                                     RunInfo* run = nullptr) {
    const io_detail::File f = io_detail::open_file(path, "checkpoint");
    const std::string where = "checkpoint " + path;
    std::string line;
    auto next_line = [&] {  // false at the end of the file
        line.clear();
        int ch;
        while ((ch = std::fgetc(f.get())) != EOF && ch != '\n') {
            line.push_back(char(ch));
            if (line.size() > 4096) fail(where, ": header line too long (not a checkpoint?)");
        }
        return ch != EOF;
    };
    if (!next_line() || line != "dsv3-checkpoint 1")
        fail(where, ": expected first line \"dsv3-checkpoint 1\", found \"", escape_bytes(line.substr(0, 40)), "\"");
    Config c;
    long long steps = -1, floats = -1;
    while (true) {
        if (!next_line()) fail(where, ": header ends before its \"end\" line");
        if (line == "end") break;
        const size_t eq = line.find('=');
        if (eq == std::string::npos)
            fail(where, ": header line \"", escape_bytes(line.substr(0, 60)), "\" is not name=value");
        const std::string name = line.substr(0, eq), value = line.substr(eq + 1);
        if (name == "step") steps = parse_int(value, where + ": step", 0, INT_MAX);
        else if (name == "floats") floats = parse_int(value, where + ": floats", 0, LLONG_MAX);
        else if (!io_detail::starts_with(name, "run.")) c.set(name, value, where);
        else if (run) run->add(name.substr(4), unescape_bytes(value, where + ": header line " + name));
    }
    if (steps < 0) fail(where, ": header has no step= line");
    if (floats < 0) fail(where, ": header has no floats= line");
    const uint64_t header = uint64_t(std::ftell(f.get())), size = io_detail::file_size(path);
    if (size < header || (size - header) / 12 != uint64_t(floats) || (size - header) % 12 != 0)
        fail(where, ": its header declares ", floats, " floats (", header, " header bytes + 3 x 4 x floats), but the "
             "file has ", size, " bytes");
    require_memory(where + ": a model of " + std::to_string(floats) + " parameters", 16.0 * double(floats));
    const size_t expected = param_layout(c).total;  // validates the config
    if (size_t(floats) != expected)
        fail(where, ": floats=", floats, " in the header, but its config has ", expected, " parameters");
    if (header_bytes) *header_bytes = size_t(header);
    if (step) *step = int(steps);
    return c;
}
// Loads parameters and optimizer state into a model built with the same config (and the RunInfo, where asked).
inline void load_checkpoint(const std::string& path, Model& model, AdamW& opt, RunInfo* run = nullptr) {
    int step = 0;
    size_t header = 0;
    const Config c = read_checkpoint_config(path, &step, &header, run);  // the file holds header + 3 x 4 x params bytes
    std::istringstream a(c.to_text()), b(model.cfg.to_text());
    for (std::string la, lb; std::getline(a, la) && std::getline(b, lb);)
        if (la != lb)
            fail("checkpoint ", path, ": config differs from the model's: checkpoint has ", la, ", model has ", lb);
    const size_t n = model.params.size();
    const io_detail::File f = io_detail::open_file(path, "checkpoint");
    std::vector<float> host(n);
    for (backend::Buffer<float>* buffer : {&model.params, &opt.m, &opt.v}) {  // in the file's order
        if (!io_detail::read_at(f.get(), header, host.data(), 4 * n)) fail("checkpoint ", path, ": read failed");
        backend::upload(*buffer, host);
        header += 4 * n;
    }
    opt.step = step;
}
// The history of a training run: the losses of every step and the results of every evaluation. build/train keeps it
// beside the checkpoint (train_log.txt), saved with it, and draws its plots from it, so a run resumed from step s
// keeps steps 1..s, and its plots show the whole run, from the same values (%.17g reads back to the same double):
//     dsv3-training-log 1
//     step STEP LOSS MTP_LOSS GRAD_NORM LR MAXVIO_BATCH
//     eval STEP VAL_LOSS MAXVIO_GLOBAL WINDOWS BLOCKS EXPERTS c_1 ... c_(BLOCKS·EXPERTS)   (validation loads by block)
struct TrainingLog {
    struct Step { int step = 0; double loss = 0, mtp = 0, grad_norm = 0, lr = 0, max_violation = 0; };
    struct Eval {
        int step = 0;
        double loss = 0, max_violation = 0;
        int64_t windows = 0;                      // validation windows evaluated
        std::vector<std::vector<int64_t>> loads;  // tokens routed to each expert, one vector per MoE block
    };
    std::vector<Step> steps;
    std::vector<Eval> evals;
    // Forgets the records after `step`: a run resumed from the checkpoint of step `step` does those steps again.
    void keep_until(int step) {
        auto after = [&](const auto& r) { return r.step > step; };
        steps.erase(std::remove_if(steps.begin(), steps.end(), after), steps.end());
        evals.erase(std::remove_if(evals.begin(), evals.end(), after), evals.end());
    }
    std::string to_text() const {
        std::string out = "dsv3-training-log 1\n";
        for (const Step& r : steps)
            out += format_printf("step %d %.17g %.17g %.17g %.17g %.17g\n", r.step, r.loss, r.mtp, r.grad_norm, r.lr,
                                 r.max_violation);
        for (const Eval& e : evals) {
            out += format_printf("eval %d %.17g %.17g %lld %zu %zu", e.step, e.loss, e.max_violation,
                                 (long long)e.windows, e.loads.size(), e.loads.empty() ? size_t(0) : e.loads[0].size());
            for (const auto& block : e.loads)
                for (int64_t c : block) out += " " + std::to_string(c);
            out += "\n";
        }
        return out;
    }
    static TrainingLog parse(const std::string& text, const std::string& name) {
        std::istringstream in(text);
        std::string line;
        if (!std::getline(in, line) || line != "dsv3-training-log 1")
            fail("training log ", name, ": expected first line \"dsv3-training-log 1\", found \"",
                 escape_bytes(line.substr(0, 40)), "\"");
        TrainingLog log;
        for (int number = 2; std::getline(in, line); ++number) {
            std::istringstream words(line);
            std::vector<std::string> w{std::istream_iterator<std::string>(words), std::istream_iterator<std::string>()};
            auto bad = [&](const char* what) {
                fail("training log ", name, " line ", number, ": ", what, ": \"", escape_bytes(line.substr(0, 80)),
                     "\"");
            };
            auto number_at = [&](size_t i) {  // strtod: also "nan" and "inf", which a diverging run may log
                char* end = nullptr;
                const double x = std::strtod(w[i].c_str(), &end);  // (i < w.size(): the caller checked the count)
                if (*end) bad("expected a number");
                return x;
            };
            auto count_at = [&](size_t i) {
                const double x = number_at(i);
                if (!(x >= 0 && x <= 1e15) || x != std::floor(x)) bad("expected a whole number");
                return int64_t(x);
            };
            if (w.empty()) continue;
            if (w[0] == "step" && w.size() == 7) {
                log.steps.push_back({int(std::min<int64_t>(count_at(1), INT_MAX)), number_at(2), number_at(3),
                                     number_at(4), number_at(5), number_at(6)});
            } else if (w[0] == "eval" && w.size() >= 7) {
                Eval e{int(std::min<int64_t>(count_at(1), INT_MAX)), number_at(2), number_at(3), count_at(4), {}};
                const int64_t blocks = count_at(5), experts = count_at(6);
                const int64_t n = int64_t(w.size()) - 7;  // (no product: BLOCKS x EXPERTS may overflow)
                if (blocks == 0 || experts == 0 ? blocks || experts || n : n % experts || n / experts != blocks)
                    bad("the number of loads differs from BLOCKS x EXPERTS");
                e.loads.assign(size_t(blocks), std::vector<int64_t>(size_t(experts)));
                for (size_t i = 7; i < w.size(); ++i)
                    e.loads[(i - 7) / size_t(experts)][(i - 7) % size_t(experts)] = count_at(i);
                log.evals.push_back(std::move(e));
            } else {
                bad("expected \"step\" and 6 numbers, or \"eval\" and at least 6");
            }
        }
        return log;
    }
    void save(const std::string& path) const { write_file_atomic(path, to_text()); }
    static TrainingLog load(const std::string& path) { return parse(read_file_bytes(path), path); }
};

// --- 13.2 JSON -------------------------------------------------------------------------------------------------------
// config.json, the safetensors header and the shard index are JSON (RFC 8259), read strictly: anything the grammar
// does not allow (trailing commas, comments, single quotes, NaN, unescaped control characters, lone UTF-16 surrogates,
// duplicate keys) is an error naming the source, the byte offset and what was expected there. Objects keep their
// members in file order (a vector of pairs), which also makes the writer's output deterministic.
struct Json {
    enum class Type { null, boolean, number, string, array, object };
    Type type = Type::null;
    bool boolean = false;
    double number = 0;          // every number, as a double
    bool is_integer = false;    // an integer literal (no '.', no exponent) that fits int64_t: `integer` is exact
    int64_t integer = 0;
    std::string string;
    std::vector<Json> array;
    std::vector<std::pair<std::string, Json>> object;
    static Json of_bool(bool b) { Json j; j.type = Type::boolean; j.boolean = b; return j; }
    static Json of_int(int64_t v) { Json j = of_double(double(v)); j.is_integer = true; j.integer = v; return j; }
    static Json of_double(double v) { Json j; j.type = Type::number; j.number = v; return j; }
    // The shortest decimal that reads back as the same float: 1e-6f is written "1e-06", not "9.99999997e-07".
    static Json of_float(float v) {
        char buf[32];
        double d = v;
        if (std::isfinite(v)) std::from_chars(buf, std::to_chars(buf, buf + 32, v, std::chars_format::general).ptr, d);
        return of_double(d);
    }
    static Json of_string(std::string s) { Json j; j.type = Type::string; j.string = std::move(s); return j; }
    static Json new_array() { Json j; j.type = Type::array; return j; }
    static Json new_object() { Json j; j.type = Type::object; return j; }
    bool is_null() const { return type == Type::null; }
    bool is_number() const { return type == Type::number; }
    bool is_string() const { return type == Type::string; }
    bool is_array() const { return type == Type::array; }
    bool is_object() const { return type == Type::object; }
    // The member named key, or null (linear: config.json has a few dozen keys; safetensors headers are only walked).
    const Json* find(const std::string& key) const {
        auto it = std::find_if(object.begin(), object.end(), [&](const auto& member) { return member.first == key; });
        return it == object.end() ? nullptr : &it->second;
    }
    // Appends a member (the caller keeps keys unique).
    Json& add(const std::string& key, Json value) { return object.emplace_back(key, std::move(value)).second; }
    Json& push(Json value) { array.push_back(std::move(value)); return array.back(); }
    const char* type_name() const {
        static const char* const names[] = {"null", "a boolean", "a number", "a string", "an array", "an object"};
        return names[int(type)];
    }
};

namespace io_detail {
inline void append_utf8(std::string& out, uint32_t cp) {  // code point cp as UTF-8 (1 to 4 bytes)
    if (cp < 0x80) { out += char(cp); return; }
    static const uint8_t lead[5] = {0, 0, 0xC0, 0xE0, 0xF0};  // 110xxxxx, 1110xxxx, 11110xxx; then n - 1 bytes 10xxxxxx
    const int n = cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    out += char(lead[n] | (cp >> (6 * (n - 1))));
    for (int i = n - 2; i >= 0; --i) out += char(0x80 | ((cp >> (6 * i)) & 0x3F));
}
// JSON's two-character escapes: \" \\ \/ \b \f \n \r \t stand for the characters of json_unescaped.
inline constexpr char json_escapes[] = "\"\\/bfnrt", json_unescaped[] = "\"\\/\b\f\n\r\t";
// Recursive descent over the JSON grammar, over n_ bytes at p_. base_ is added to reported offsets (the safetensors
// header starts at byte 8 of its file, so errors give offsets in the file).
struct JsonParser {
    const char* p_;
    size_t n_;
    std::string source_;
    uint64_t base_;
    size_t pos_ = 0;
    int depth_ = 0;

    Json parse_document() {
        skip_ws();
        Json v = value();
        skip_ws();
        if (pos_ != n_) error("the end of the document");
        return v;
    }
    std::string found() const {
        if (pos_ >= n_) return "the end of the input";
        const unsigned char c = static_cast<unsigned char>(p_[pos_]);
        return c >= 0x20 && c < 0x7F ? std::string("'") + char(c) + "'" : format_printf("byte 0x%02X", c);
    }
    [[noreturn]] void error(const char* expected, size_t at = SIZE_MAX) {  // at pos_, or at `at`
        if (at != SIZE_MAX) pos_ = at;
        fail(source_, ": invalid JSON at byte ", base_ + pos_, ": expected ", expected, ", found ", found());
    }
    void skip_ws() {
        while (pos_ < n_ && (p_[pos_] == ' ' || p_[pos_] == '\t' || p_[pos_] == '\n' || p_[pos_] == '\r')) ++pos_;
    }
    bool at(char c) const { return pos_ < n_ && p_[pos_] == c; }
    bool eat(char c) { return at(c) ? (++pos_, true) : false; }
    void expect(char c, const char* expected) { if (!eat(c)) error(expected); }
    void literal(const char* word) {  // true, false, null
        for (const char* w = word; *w; ++w, ++pos_)
            if (!at(*w)) error(word);
    }
    Json value() {
        if (pos_ >= n_) error("a value");
        switch (p_[pos_]) {
            case '{': return object();
            case '[': return array();
            case '"': return Json::of_string(string());
            case 't': literal("true"); return Json::of_bool(true);
            case 'f': literal("false"); return Json::of_bool(false);
            case 'n': literal("null"); return Json{};
            default:
                if (p_[pos_] == '-' || (p_[pos_] >= '0' && p_[pos_] <= '9')) return number();
                error("a value (object, array, string, number, true, false or null)");
        }
    }
    // '[' or '{' at pos_, then element() for each element or member, separated by ',' and closed by `close`.
    template <class F>
    void sequence(char close, const char* expected_after, const F& element) {
        if (++depth_ > 128) error("at most 128 nested arrays and objects");
        ++pos_;
        skip_ws();
        if (!eat(close)) {
            do { skip_ws(); element(); skip_ws(); } while (eat(','));
            expect(close, expected_after);
        }
        --depth_;
    }
    Json object() {
        Json obj = Json::new_object();
        std::unordered_set<std::string> keys;
        sequence('}', "',' or '}' after an object member", [&] {
            if (!at('"')) error("a string key");
            const size_t key_pos = pos_;
            std::string key = string();
            if (!keys.insert(key).second)
                fail(source_, ": invalid JSON at byte ", base_ + key_pos, ": duplicate key \"", key, "\"");
            skip_ws();
            expect(':', "':' after an object key");
            skip_ws();
            obj.add(key, value());
        });
        return obj;
    }
    Json array() {
        Json arr = Json::new_array();
        sequence(']', "',' or ']' after an array element", [&] { arr.push(value()); });
        return arr;
    }
    uint32_t hex4() {
        uint32_t v = 0;
        const char* digits = p_ + pos_;
        pos_ = size_t(std::from_chars(digits, p_ + std::min(n_, pos_ + 4), v, 16).ptr - p_);
        if (p_ + pos_ != digits + 4) error("4 hex digits after \\u");
        return v;
    }
    // After "\u": 4 hex digits, or a UTF-16 surrogate pair for a character beyond U+FFFF: \uD83D\uDE00.
    uint32_t code_point() {
        const uint32_t cp = hex4();
        if (cp >= 0xDC00 && cp <= 0xDFFF) error("a character, not a lone low surrogate", pos_ - 6);
        if (cp < 0xD800 || cp > 0xDBFF) return cp;
        if (!(at('\\') && pos_ + 1 < n_ && p_[pos_ + 1] == 'u'))
            error("a low surrogate \\uDC00-\\uDFFF after a high surrogate");
        pos_ += 2;
        const uint32_t low = hex4();
        if (low < 0xDC00 || low > 0xDFFF) error("a low surrogate \\uDC00-\\uDFFF after a high surrogate", pos_ - 6);
        return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    std::string string() {
        ++pos_;  // opening quote
        std::string out;
        while (true) {
            if (pos_ >= n_) error("'\"' to close the string");
            const unsigned char c = static_cast<unsigned char>(p_[pos_]);
            if (c == '"') { ++pos_; return out; }
            if (c < 0x20) error("a string character (control characters must be escaped)");
            ++pos_;
            if (c != '\\') { out += char(c); continue; }
            if (pos_ >= n_) error("an escape character");
            const char e = p_[pos_++];
            const char* k = e ? std::strchr(json_escapes, e) : nullptr;
            if (e == 'u') append_utf8(out, code_point());
            else if (k) out += json_unescaped[k - json_escapes];
            else --pos_, error("one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u after a backslash");
        }
    }
    Json number() {
        const size_t start = pos_;
        auto digits = [&] {
            const size_t s = pos_;
            while (pos_ < n_ && p_[pos_] >= '0' && p_[pos_] <= '9') ++pos_;
            return pos_ > s;
        };
        eat('-');
        if (!eat('0') && !digits()) error("a digit");  // no leading zeros: "0" or [1-9][0-9]*
        const bool fraction = eat('.');
        if (fraction && !digits()) error("a digit after the decimal point");
        const bool exponent = eat('e') || eat('E');
        if (exponent && !eat('+')) eat('-');
        if (exponent && !digits()) error("a digit in the exponent");
        const std::string text(p_ + start, pos_ - start);
        Json j = Json::of_double(std::strtod(text.c_str(), nullptr));  // the C locale (programs do not call setlocale)
        if (!std::isfinite(j.number)) error("a number within the range of a double", start);
        // an integer literal also keeps its exact value when it fits int64_t (offsets and shapes must be exact)
        j.is_integer = !fraction && !exponent && std::from_chars(p_ + start, p_ + pos_, j.integer).ec == std::errc();
        return j;
    }
};
// Builders for the writers: an array of integers; members appended to an object.
inline Json json_ints(const std::vector<int64_t>& values) {
    Json array = Json::new_array();
    for (int64_t v : values) array.push(Json::of_int(v));
    return array;
}
inline void add_members(Json& object, std::initializer_list<std::pair<const char*, Json>> members) {
    for (const auto& [key, value] : members) object.add(key, value);
}
inline void write_json_string(std::string& out, const std::string& s) {
    out += '"';
    for (const char ch : s) {
        const unsigned char c = static_cast<unsigned char>(ch);
        const char* k = c && c != '/' ? std::strchr(json_unescaped, c) : nullptr;  // '/' needs no escape
        if (k) out += {'\\', json_escapes[k - json_unescaped]};
        else if (c < 0x20) out += format_printf("\\u%04X", c);
        else out += char(c);  // UTF-8 passes through unchanged
    }
    out += '"';
}
inline void write_json_number(std::string& out, const Json& j) {
    if (j.is_integer) { out += std::to_string(j.integer); return; }
    if (!std::isfinite(j.number)) fail("JSON writer: ", j.number, " cannot be written (JSON has no NaN or infinity)");
    // Integral doubles stay recognisable as floats for Python (40.0, not 40 or 4e+01): types survive a round trip.
    // Other numbers: the shortest text that reads back as the same double.
    const bool integral = std::floor(j.number) == j.number && std::fabs(j.number) < 1e15;
    char buf[40];
    for (int precision = 1; precision <= 17; ++precision) {
        std::snprintf(buf, sizeof buf, integral ? "%.*f" : "%.*g", integral ? 1 : precision, j.number);
        if (std::strtod(buf, nullptr) == j.number) break;
    }
    out += buf;
}
inline void write_json(std::string& out, const Json& j, int indent, int level) {
    auto newline = [&](int lvl) { if (indent >= 0) out += '\n' + std::string(size_t(indent) * size_t(lvl), ' '); };
    switch (j.type) {
        case Json::Type::null: out += "null"; return;
        case Json::Type::boolean: out += j.boolean ? "true" : "false"; return;
        case Json::Type::number: write_json_number(out, j); return;
        case Json::Type::string: write_json_string(out, j.string); return;
        default: {  // an array or an object; short arrays of scalars stay on one line: "shape": [64, 32]
            const bool object = j.is_object();
            const size_t n = object ? j.object.size() : j.array.size();
            auto scalar = [](const Json& e) { return !e.is_array() && !e.is_object(); };
            const bool inline_ = !object && std::all_of(j.array.begin(), j.array.end(), scalar);
            out += object ? '{' : '[';
            for (size_t i = 0; i < n; ++i) {
                if (i) out += inline_ && indent >= 0 ? ", " : ",";
                if (!inline_) newline(level + 1);
                if (object) {
                    write_json_string(out, j.object[i].first);
                    out += indent >= 0 ? ": " : ":";
                }
                write_json(out, object ? j.object[i].second : j.array[i], indent, level + 1);
            }
            if (!inline_ && n > 0) newline(level);
            out += object ? '}' : ']';
        }
    }
}
}  // namespace io_detail
// Parses a whole JSON document; `source` (a file name) starts every error message.
inline Json json_parse(const std::string& text, const std::string& source, uint64_t base_offset = 0) {
    return io_detail::JsonParser{text.data(), text.size(), source, base_offset}.parse_document();
}
inline Json json_read_file(const std::string& path) { return json_parse(read_file_bytes(path), path); }
// indent < 0: compact, one line; indent >= 0: pretty-printed with that many spaces per level.
inline std::string json_dump(const Json& j, int indent = -1) {
    std::string out;
    io_detail::write_json(out, j, indent, 0);
    return out;
}
// A short description for error messages: 32 (a number), "abc" (a string), ...
inline std::string json_describe(const Json& j) {
    std::string text = json_dump(j);
    if (text.size() > 48) text = text.substr(0, 45) + "...";
    return j.is_null() ? "null" : text + " (" + j.type_name() + ")";
}

// --- 13.3 safetensors ------------------------------------------------------------------------------------------------
// The format (github.com/huggingface/safetensors), all integers little-endian:
//     bytes 0..7        N, the header length (uint64)
//     bytes 8..8+N      JSON: {"__metadata__": {"format": "pt"},                            (optional, string values)
//                              "model.norm.weight": {"dtype": "BF16", "shape": [7168], "data_offsets": [0, 14336]},
//                              ...}                                                        (may be padded with spaces)
//     bytes 8+N..       the data section; each tensor's bytes are [begin, end) relative to its start, row-major
// No code runs while loading (unlike pickle), and everything is checked before the data is touched: the header length
// against the file, every field's type, shape × dtype size against the byte range, every range inside the data
// section, no two ranges overlapping. Bytes of no tensor are counted in uncovered_bytes (the reference rejects them).
enum class DType { F32, BF16, F16, F8_E4M3, F8_E5M2 };
inline constexpr const char* kDTypeNames[] = {"F32", "BF16", "F16", "F8_E4M3", "F8_E5M2"};  // in the order of DType
inline const char* dtype_name(DType d) { return kDTypeNames[int(d)]; }
inline int dtype_size(DType d) { return d == DType::F32 ? 4 : (d == DType::BF16 || d == DType::F16) ? 2 : 1; }
inline bool dtype_from_name(const std::string& name, DType* out) {
    for (int d = 0; d < int(std::size(kDTypeNames)); ++d)
        if (name == kDTypeNames[d]) { *out = DType(d); return true; }
    return false;
}
inline bool dtype_is_fp8(DType d) { return d == DType::F8_E4M3 || d == DType::F8_E5M2; }
// n values: bytes (little-endian, `dtype`) -> float32 (exact for every format here), and back: float32 to BF16, F16
// or FP8 rounds to nearest even (FP8 saturates at its largest finite value).
inline void decode_to_float(DType dtype, const uint8_t* b, int64_t n, float* out) {
    const int size = dtype_size(dtype);
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = uint32_t(load_le(b + i * size, size));
        out[i] = dtype == DType::BF16      ? bf16_bits_to_float(uint16_t(u))
                 : dtype == DType::F16     ? f16_bits_to_float(uint16_t(u))
                 : dtype == DType::F8_E4M3 ? fp8_e4m3_decode(uint8_t(u))
                 : dtype == DType::F8_E5M2 ? fp8_e5m2_decode(uint8_t(u)) : fp8_detail::float_of(u);
    }
}
inline void encode_from_float(DType dtype, const float* x, int64_t n, uint8_t* out) {
    const int size = dtype_size(dtype);
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = dtype == DType::BF16      ? float_to_bf16_bits(x[i])
                           : dtype == DType::F16     ? float_to_f16_bits(x[i])
                           : dtype == DType::F8_E4M3 ? fp8_e4m3_encode(x[i])
                           : dtype == DType::F8_E5M2 ? fp8_e5m2_encode(x[i]) : fp8_detail::bits_of(x[i]);
        store_le(out + i * size, u, size);
    }
}
struct TensorInfo {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    int64_t numel = 0;
    uint64_t begin = 0, end = 0;  // byte range [begin, end) in the data section
};
// An open safetensors file whose header has been read and validated. Tensors are read on demand.
struct SafetensorsFile {
    std::string path;
    uint64_t file_size = 0, data_start = 0;                     // data_start = 8 + N
    std::vector<TensorInfo> tensors;                             // in header order
    std::vector<std::pair<std::string, std::string>> metadata;  // "__metadata__"
    uint64_t uncovered_bytes = 0;                                // data-section bytes no tensor covers
    explicit SafetensorsFile(const std::string& file_path)
        : path(file_path), file_(io_detail::open_file(file_path, "safetensors")) { read_header(); }
    const TensorInfo* find(const std::string& name) const {
        auto it = index_.find(name);
        return it == index_.end() ? nullptr : &tensors[it->second];
    }
    std::vector<uint8_t> read_bytes(const TensorInfo& t) const {
        require_memory(path + ": tensor \"" + t.name + "\"", double(t.end - t.begin));
        std::vector<uint8_t> bytes(size_t(t.end - t.begin));
        if (!io_detail::read_at(file_.get(), data_start + t.begin, bytes.data(), bytes.size()))
            fail(path, ": tensor \"", t.name, "\": cannot read bytes [", data_start + t.begin, ", ", data_start + t.end,
                 ") (file truncated or unreadable)");
        return bytes;
    }
    // The tensor converted to float32: out must hold t.numel floats.
    void read_floats(const TensorInfo& t, float* out) const {
        decode_to_float(t.dtype, read_bytes(t).data(), t.numel, out);
    }
    std::vector<float> read_floats(const std::string& name) const {
        const TensorInfo* t = find(name);
        if (!t) fail(path, ": no tensor named \"", name, "\"");
        std::vector<float> out(size_t(t->numel));
        read_floats(*t, out.data());
        return out;
    }
  private:
    io_detail::File file_;
    std::unordered_map<std::string, size_t> index_;

    void read_header() {
        file_size = io_detail::file_size(path);
        if (file_size < 8) fail(path, ": the file has ", file_size, " bytes, fewer than the 8-byte header length");
        uint8_t len_bytes[8];
        if (!io_detail::read_at(file_.get(), 0, len_bytes, 8)) fail(path, ": cannot read the header length");
        const uint64_t n = load_le(len_bytes, 8);
        if (n > file_size - 8)
            fail(path, ": header length ", n, " extends beyond the file (only ", file_size - 8,
                 " bytes follow the length field): not a safetensors file, or truncated");
        if (n > (uint64_t(100) << 20)) fail(path, ": header length ", n, " exceeds the format's limit of 100 MiB");
        std::string text(size_t(n), '\0');
        if (!io_detail::read_at(file_.get(), 8, &text[0], text.size()))
            fail(path, ": cannot read the ", n, "-byte header");
        data_start = 8 + n;
        const Json header = json_parse(text, path + " (header)", 8);
        if (!header.is_object()) fail(path, ": header: expected a JSON object, found ", json_describe(header));
        for (const auto& [name, entry] : header.object) {
            if (name != "__metadata__") {
                index_[name] = tensors.size();
                tensors.push_back(parse_entry(name, entry));
                continue;
            }
            if (!entry.is_object())
                fail(path, ": __metadata__: expected an object of strings, found ", json_describe(entry));
            for (const auto& [key, value] : entry.object) {
                if (!value.is_string())
                    fail(path, ": __metadata__.", key, ": expected a string, found ", json_describe(value));
                metadata.emplace_back(key, value.string);
            }
        }
        check_overlaps();
    }
    // One tensor's {dtype, shape, data_offsets}, validated against the data section.
    TensorInfo parse_entry(const std::string& name, const Json& entry) const {
        using io_detail::shape_str;
        const std::string where = path + ": tensor \"" + name + "\"";
        if (!entry.is_object())
            fail(where, ": expected an object {dtype, shape, data_offsets}, found ", json_describe(entry));
        auto field = [&](const char* key) -> const Json& {
            const Json* v = entry.find(key);
            if (!v) fail(where, ": missing field \"", key, "\"");
            return *v;
        };
        TensorInfo t;
        t.name = name;
        const Json& dtype = field("dtype");
        if (!dtype.is_string()) fail(where, ": dtype: expected a string, found ", json_describe(dtype));
        if (!dtype_from_name(dtype.string, &t.dtype))
            fail(where, ": dtype \"", dtype.string,
                 "\" is not supported (expected F32, BF16, F16, F8_E4M3 or F8_E5M2)");
        const Json& shape = field("shape");
        if (!shape.is_array()) fail(where, ": shape: expected an array of integers, found ", json_describe(shape));
        // Element count, overflow-safe: the byte count must stay below 2^62. The count saturates at limit + 1 (a zero
        // dimension still makes it 0).
        const int64_t limit = (int64_t(1) << 62) / dtype_size(t.dtype);
        t.numel = 1;
        for (size_t i = 0; i < shape.array.size(); ++i) {
            const Json& d = shape.array[i];
            if (!d.is_integer || d.integer < 0)
                fail(where, ": shape[", i, "]: expected a non-negative integer, found ", json_describe(d));
            t.shape.push_back(d.integer);
            t.numel = d.integer == 0 ? 0 : t.numel > limit / d.integer ? limit + 1 : t.numel * d.integer;
        }
        if (t.numel > limit) fail(where, ": shape ", shape_str(t.shape), " is too large (over 2^62 bytes)");
        const Json& offsets = field("data_offsets");
        if (!offsets.is_array() || offsets.array.size() != 2)
            fail(where, ": data_offsets: expected an array [begin, end], found ", json_describe(offsets));
        for (const Json& o : offsets.array)
            if (!o.is_integer || o.integer < 0)
                fail(where, ": data_offsets: expected non-negative integers, found ", json_describe(o));
        t.begin = uint64_t(offsets.array[0].integer), t.end = uint64_t(offsets.array[1].integer);
        if (t.begin > t.end) fail(where, ": data_offsets [", t.begin, ", ", t.end, "]: begin is after end");
        if (t.end > file_size - data_start)
            fail(where, ": data_offsets [", t.begin, ", ", t.end, "] extend beyond the data section (",
                 file_size - data_start, " bytes)");
        const uint64_t expected = uint64_t(t.numel) * uint64_t(dtype_size(t.dtype));
        if (t.end - t.begin != expected)
            fail(where, ": shape ", shape_str(t.shape), " of ", dtype_name(t.dtype), " (", dtype_size(t.dtype),
                 " bytes each) needs ", expected, " bytes, but data_offsets [", t.begin, ", ", t.end, "] span ",
                 t.end - t.begin);
        return t;
    }
    // Overlaps: sorted by start, each range that is not empty must begin at or after the end of the one before.
    void check_overlaps() {
        std::vector<const TensorInfo*> order;
        for (const TensorInfo& t : tensors) order.push_back(&t);
        std::sort(order.begin(), order.end(),
                  [](auto a, auto b) { return std::tie(a->begin, a->end) < std::tie(b->begin, b->end); });
        auto empty = [](const TensorInfo* t) { return t->begin == t->end; };  // empty tensors occupy no bytes
        order.erase(std::remove_if(order.begin(), order.end(), empty), order.end());
        const auto o = std::adjacent_find(order.begin(), order.end(), [](auto a, auto b) { return b->begin < a->end; });
        if (o != order.end())
            fail(path, ": tensors \"", o[0]->name, "\" [", o[0]->begin, ", ", o[0]->end, ") and \"", o[1]->name, "\" [",
                 o[1]->begin, ", ", o[1]->end, ") overlap in the data section");
        uncovered_bytes = file_size - data_start;
        for (const TensorInfo* t : order) uncovered_bytes -= t->end - t->begin;
    }
};
// One tensor to write: `data` holds numel float32 values, stored as `dtype` (usually F32 or BF16).
struct TensorToWrite {
    std::string name;
    std::vector<int64_t> shape;
    const float* data = nullptr;
    DType dtype = DType::F32;
};
// Writes a safetensors file (atomically). transformers refuses files whose __metadata__ lacks "format": "pt", hence
// the default. The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata = {{"format", "pt"}}) {
    Json header = Json::new_object();
    if (!metadata.empty()) {
        Json& m = header.add("__metadata__", Json::new_object());
        for (const auto& kv : metadata) m.add(kv.first, Json::of_string(kv.second));
    }
    std::unordered_set<std::string> names;
    int64_t offset = 0;
    for (const TensorToWrite& t : tensors) {
        const std::string where = "safetensors " + path + ": tensor \"" + t.name + "\"";
        if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second)
            fail("safetensors ", path, ": tensor name \"", t.name, "\" is empty, reserved or repeated");
        if (std::any_of(t.shape.begin(), t.shape.end(), [](int64_t d) { return d < 0; }))
            fail(where, ": negative dimension in ", io_detail::shape_str(t.shape));
        if (io_detail::numel(t.shape) > 0 && !t.data) fail(where, ": no data");
        const int64_t bytes = io_detail::numel(t.shape) * dtype_size(t.dtype);
        io_detail::add_members(header.add(t.name, Json::new_object()), {
            {"dtype", Json::of_string(dtype_name(t.dtype))}, {"shape", io_detail::json_ints(t.shape)},
            {"data_offsets", io_detail::json_ints({offset, offset + bytes})}});
        offset += bytes;
    }
    std::string text = json_dump(header);
    text.append((8 - text.size() % 8) % 8, ' ');
    write_file_atomic_stream(path, "safetensors", [&](std::FILE* f) {
        uint8_t len[8];
        store_le(len, text.size(), 8);
        if (!write_bytes(f, len, 8) || !write_bytes(f, text.data(), text.size())) return false;
        std::vector<uint8_t> buf;
        for (const TensorToWrite& t : tensors) {
            const int64_t numel = io_detail::numel(t.shape), chunk = int64_t(1) << 20;  // no full-size copy of a tensor
            for (int64_t i = 0; i < numel; i += chunk) {
                const int64_t n = std::min(chunk, numel - i);
                buf.resize(size_t(n) * size_t(dtype_size(t.dtype)));
                encode_from_float(t.dtype, t.data + i, n, buf.data());
                if (!write_bytes(f, buf.data(), buf.size())) return false;
            }
        }
        return true;
    });
}
// model.safetensors.index.json: {"metadata": {...}, "weight_map": {"tensor name": "shard file name", ...}}.
// Returns (tensor, file) pairs. Shard names must stay inside the directory (no absolute paths, no "..").
inline std::vector<std::pair<std::string, std::string>> read_safetensors_index(const std::string& path) {
    const Json j = json_read_file(path);
    if (!j.is_object()) fail(path, ": expected a JSON object, found ", json_describe(j));
    const Json* map = j.find("weight_map");
    if (!map) fail(path, ": missing key \"weight_map\"");
    if (!map->is_object()) fail(path, ": weight_map: expected an object {tensor: file}, found ", json_describe(*map));
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& kv : map->object) {
        if (!kv.second.is_string())
            fail(path, ": weight_map: tensor \"", kv.first, "\": expected a file name, found ",
                 json_describe(kv.second));
        const std::string& file = kv.second.string;
        const std::filesystem::path p(file);
        if (file.empty() || p.is_absolute() || std::count(p.begin(), p.end(), "..") > 0)
            fail(path, ": weight_map: tensor \"", kv.first, "\": file \"", file,
                 "\" must be a path inside the directory");
        out.emplace_back(kv.first, file);
    }
    return out;
}
// All tensors of a checkpoint directory: model.safetensors (first, as in transformers), or the shards of the index.
struct HfCheckpoint {
    struct Source { const SafetensorsFile* file = nullptr; const TensorInfo* info = nullptr; };
    std::string dir, description;  // description: the file(s) the tensors come from, for messages
    std::vector<std::unique_ptr<SafetensorsFile>> files;
    std::map<std::string, Source> tensors;  // ordered: deterministic messages, prefix queries
    explicit HfCheckpoint(const std::string& directory) : dir(directory) {
        const std::string single = io_detail::join_path(dir, "model.safetensors");
        const std::string index = io_detail::join_path(dir, "model.safetensors.index.json");
        if (io_detail::file_exists(single)) {
            files.push_back(std::make_unique<SafetensorsFile>(single));
            for (const TensorInfo& t : files.back()->tensors) tensors[t.name] = {files.back().get(), &t};
            description = single;
            return;
        }
        if (!io_detail::file_exists(index))
            fail(dir, ": no model.safetensors or model.safetensors.index.json (is this a Hugging Face model ",
                 "directory?)");
        std::map<std::string, const SafetensorsFile*> opened;
        for (const auto& entry : read_safetensors_index(index)) {
            const SafetensorsFile*& file = opened[entry.second];
            if (!file) {
                files.push_back(std::make_unique<SafetensorsFile>(io_detail::join_path(dir, entry.second)));
                file = files.back().get();
            }
            const TensorInfo* t = file->find(entry.first);
            if (!t)
                fail(index, ": weight_map puts tensor \"", entry.first, "\" in ", file->path,
                     ", which has no such tensor");
            tensors[entry.first] = {file, t};
        }
        description = index + " (" + std::to_string(files.size()) + " shard" + (files.size() == 1 ? "" : "s") + ")";
    }
    const Source* find(const std::string& name) const {
        auto it = tensors.find(name);
        return it == tensors.end() ? nullptr : &it->second;
    }
    bool has_prefix(const std::string& prefix) const {
        auto it = tensors.lower_bound(prefix);
        return it != tensors.end() && io_detail::starts_with(it->first, prefix);
    }
};

// --- 13.4 config.json <-> Config -------------------------------------------------------------------------------------
// DeepSeek's config.json <-> Config (whose fields carry inference/model.py's names): most fields map one to one (the
// table below); the rest need care:
//   q_lora_rank       null in config.json when the query is projected directly (V2-Lite); 0 in Config.
//   rope_theta        top level, or inside "rope_parameters" (transformers >= 5 writes that).
//   YaRN              under "rope_scaling" (DeepSeek's files, older transformers) or "rope_parameters":
//                     {"type"/"rope_type": "yarn", factor, original_max_position_embeddings, beta_fast, beta_slow,
//                      mscale, mscale_all_dim}; mscale_all_dim is Config.mscale (the attention-scale coefficient).
//   quantization_config  DeepSeek's FP8 release: reported in HfConfigInfo, used when loading weights.
// An absent key takes transformers' DeepseekV3Config default (mostly the 671B values), so a file reads the way
// transformers reads it; keys this model does not use are ignored; a key of the wrong type is an error naming it.
struct HfQuantization {
    bool fp8 = false;                   // quantization_config.quant_method == "fp8"
    std::string fmt = "e4m3", activation_scheme = "dynamic";
    int block_out = 128, block_in = 128;  // weight_block_size: one scale per block of [out, in] weights
};
struct HfConfigInfo {
    HfQuantization quant;
    std::vector<std::string> notes;     // where transformers' forward will differ for this file, and other remarks
};
// transformers' DeepseekV3Config defaults, i.e. what an absent key means.
inline Config hf_config_defaults() {
    Config c = Config::v3_671b();
    c.max_seq_len = 4096;                      // max_position_embeddings
    c.rope_factor = c.mscale = 1.0f;           // no rope_scaling: plain RoPE
    c.n_mtp_depth = 0;                         // transformers has no MTP; DeepSeek's files say 1
    c.init_std = 0.02f;                        // initializer_range
    return c;
}

namespace io_detail {
// Config field -> config.json key, for the fields read and written one to one; with `any`, also those handled by hand
// (nested ones written as "rope_scaling.factor"), for naming keys in errors.
inline const char* hf_key_of(const char* field, bool any = false) {
    static const char* const table[][2] = {
        {"vocab_size", "vocab_size"}, {"dim", "hidden_size"}, {"inter_dim", "intermediate_size"},
        {"moe_inter_dim", "moe_intermediate_size"}, {"n_layers", "num_hidden_layers"},
        {"n_dense_layers", "first_k_dense_replace"}, {"n_heads", "num_attention_heads"},
        {"n_routed_experts", "n_routed_experts"}, {"n_shared_experts", "n_shared_experts"},
        {"n_activated_experts", "num_experts_per_tok"}, {"n_expert_groups", "n_group"},
        {"n_limited_groups", "topk_group"}, {"score_func", "scoring_func"}, {"route_scale", "routed_scaling_factor"},
        {"norm_topk_prob", "norm_topk_prob"}, {"kv_lora_rank", "kv_lora_rank"},
        {"qk_nope_head_dim", "qk_nope_head_dim"}, {"qk_rope_head_dim", "qk_rope_head_dim"},
        {"v_head_dim", "v_head_dim"}, {"max_seq_len", "max_position_embeddings"}, {"rms_norm_eps", "rms_norm_eps"},
        {"n_mtp_depth", "num_nextn_predict_layers"},
        {"init_std", "initializer_range"},             // transformers' name for the init standard deviation
        {"balance_loss_alpha", "aux_loss_alpha"},      // DeepSeek's name for the balance-loss coefficient α
        {"bias_update_speed", "bias_update_speed"},    // γ of loss-free balancing; not in DeepSeek's files
        // handled by hand:
        {"q_lora_rank", "q_lora_rank"}, {"rope_theta", "rope_theta"}, {"rope_factor", "rope_scaling.factor"},
        {"original_seq_len", "rope_scaling.original_max_position_embeddings"}, {"beta_fast", "rope_scaling.beta_fast"},
        {"beta_slow", "rope_scaling.beta_slow"}, {"mscale", "rope_scaling.mscale_all_dim"}};
    const size_t n = any ? std::size(table) : std::size(table) - 7;
    for (size_t i = 0; i < n; ++i)
        if (std::strcmp(table[i][0], field) == 0) return table[i][1];
    return nullptr;
}
// A value of the field's type (int, float, bool, string); errors name the key, the type expected, the value found.
template <class T>
inline void from_json(const Json& v, T& out, const std::string& where, const std::string& key) {
    auto bad = [&](const auto&... expected) {
        fail(where, ": key \"", key, "\": expected ", expected..., ", found ", json_describe(v));
    };
    if constexpr (std::is_same_v<T, int>) {
        if (!v.is_number() || std::floor(v.number) != v.number || v.number < INT_MIN || v.number > INT_MAX)
            bad("an integer in [", INT_MIN, ", ", INT_MAX, "]");
        out = int(v.number);
    } else if constexpr (std::is_same_v<T, float>) {
        if (!v.is_number() || std::fabs(v.number) > double(FLT_MAX)) bad("a number in [", -FLT_MAX, ", ", FLT_MAX, "]");
        out = float(v.number);
    } else if constexpr (std::is_same_v<T, bool>) {
        if (v.type != Json::Type::boolean) bad("true or false");
        out = v.boolean;
    } else {
        if (!v.is_string()) bad("a string");
        out = v.string;
    }
}
inline Json to_json(int v) { return Json::of_int(v); }
inline Json to_json(float v) { return Json::of_float(v); }
inline Json to_json(bool v) { return Json::of_bool(v); }
inline Json to_json(const std::string& v) { return Json::of_string(v); }
// YaRN's attention-scale function: m(s, c) = 0.1·c·ln(s) + 1 (1 when s <= 1).
inline double yarn_mscale(double s, double c) { return s <= 1 ? 1.0 : 0.1 * c * std::log(s) + 1.0; }
// Reads o[key] into `out` if present: true if it was. Null counts as absent only with null_is_absent (rope and
// quantization fields); elsewhere it is an error, "expected an integer in [...], found null". Errors name `name`.
template <class T>
inline bool read_key(const Json& o, const std::string& key, T& out, const std::string& where, const std::string& name,
                     bool null_is_absent = true) {
    const Json* v = o.find(key);
    if (!v || (null_is_absent && v->is_null())) return false;
    from_json(*v, out, where, name);
    return true;
}
// Features of transformers' DeepseekV3 this implementation does not have: refuse rather than compute wrongly.
inline void require_supported_hf_keys(const Json& j, const Config& c, const std::string& where) {
    struct Only { const char* key; Json value; const char* why; };
    const Only only[] = {
        {"num_key_value_heads", Json::of_int(c.n_heads), "MLA has one key/value head per query head"},
        {"hidden_act", Json::of_string("silu"), "SwiGLU"},
        {"attention_bias", Json::of_bool(false), "the projections have no bias"},
        {"tie_word_embeddings", Json::of_bool(false), "the output head is not tied to the embedding"},
        {"rope_interleave", Json::of_bool(true), "RoPE rotates consecutive pairs, DeepSeek's layout"},
        {"moe_layer_freq", Json::of_int(1), "every layer after first_k_dense_replace is MoE"},
        // transformers saves these derived values, and a saved value overrides the one it would compute.
        {"head_dim", Json::of_int(c.qk_rope_head_dim), "transformers' RoPE dimension, qk_rope_head_dim"},
        {"qk_head_dim", Json::of_int(c.qk_head_dim()), "qk_nope_head_dim + qk_rope_head_dim"}};
    for (const Only& o : only) {
        const Json* v = j.find(o.key);
        if (!v || v->is_null()) continue;
        const bool same = v->type == o.value.type && json_dump(*v) == json_dump(o.value);
        if (!same && !(v->is_number() && o.value.is_number() && v->number == o.value.number))
            fail(where, ": key \"", o.key, "\": only ", json_dump(o.value), " is supported (", o.why, "), found ",
                 json_describe(*v));
    }
}
// YaRN under rope_scaling / rope_parameters (`rope_key`): factor, original length, β's, mscale [V3 §4.3].
inline void read_yarn(const Json& rope, const std::string& rope_key, Config& c, const std::string& where,
                      std::vector<std::string>& notes) {
    auto get = [&](const char* k, auto& out) { return read_key(rope, k, out, where, rope_key + "." + k); };
    if (!get("original_max_position_embeddings", c.original_seq_len)) c.original_seq_len = c.max_seq_len;
    if (!get("factor", c.rope_factor)) c.rope_factor = float(double(c.max_seq_len) / c.original_seq_len);  // tf >= 5
    float beta_fast = 32, beta_slow = 1, mscale = 0, mscale_all_dim = 0;  // transformers: `or 32`, `or 1`
    get("beta_fast", beta_fast), get("beta_slow", beta_slow), get("mscale", mscale);
    get("mscale_all_dim", mscale_all_dim);
    c.beta_fast = beta_fast != 0 ? beta_fast : 32.0f;
    c.beta_slow = beta_slow != 0 ? beta_slow : 1.0f;
    c.mscale = mscale_all_dim;  // transformers scales attention only when mscale_all_dim is non-zero: m(s, 0) = 1
    // transformers also multiplies cos and sin by mscale(s, mscale)/mscale(s, mscale_all_dim) (1 in DeepSeek's configs,
    // where both are equal), or by attention_factor, or by mscale(s, 1) when either is missing. We never do: say so.
    double cos_sin_factor = yarn_mscale(c.rope_factor, 1.0);
    float attention_factor = 1;
    if (get("attention_factor", attention_factor)) cos_sin_factor = attention_factor;
    else if (mscale != 0 && mscale_all_dim != 0)
        cos_sin_factor = yarn_mscale(c.rope_factor, mscale) / yarn_mscale(c.rope_factor, mscale_all_dim);
    if (std::fabs(cos_sin_factor - 1.0) > 1e-6)
        notes.push_back("transformers multiplies RoPE's cos and sin by " + std::to_string(cos_sin_factor) + " for this "
                        + rope_key + " (mscale " + std::to_string(mscale) + ", mscale_all_dim " +
                        std::to_string(mscale_all_dim) + "); this implementation does not, so logits differ");
    if (std::fabs(double(c.rope_factor) * c.original_seq_len - c.max_seq_len) > 0.5)
        notes.push_back("YaRN factor " + std::to_string(c.rope_factor) + " x original_max_position_embeddings " +
                        std::to_string(c.original_seq_len) + " != max_position_embeddings " +
                        std::to_string(c.max_seq_len) + ": transformers 4.5x derives the frequencies' factor from "
                        "max_position_embeddings / original_max_position_embeddings instead, so it may differ");
}
// rope_theta and YaRN. rope_scaling wins over rope_parameters when both are given, as in transformers.
inline void read_rope(const Json& j, Config& c, const std::string& where, std::vector<std::string>& notes) {
    const Json* rope = nullptr;
    std::string rope_key;
    for (const char* key : {"rope_scaling", "rope_parameters"}) {
        const Json* v = j.find(key);
        if (!v || v->is_null()) continue;
        if (!v->is_object()) fail(where, ": key \"", key, "\": expected an object or null, found ", json_describe(*v));
        rope = v, rope_key = key;
        break;
    }
    const Json* theta_top = j.find("rope_theta");
    const Json* theta_in = rope ? rope->find("rope_theta") : nullptr;
    if (theta_top && theta_in &&
        !(theta_top->is_number() && theta_in->is_number() && theta_top->number == theta_in->number))
        fail(where, ": \"rope_theta\" (", json_describe(*theta_top), ") and \"", rope_key, ".rope_theta\" (",
             json_describe(*theta_in), ") disagree");
    if (theta_in) from_json(*theta_in, c.rope_theta, where, rope_key + ".rope_theta");
    else if (theta_top) from_json(*theta_top, c.rope_theta, where, "rope_theta");
    if (!rope) return;
    std::string type = "default";
    if (!read_key(*rope, "rope_type", type, where, rope_key + ".rope_type"))
        read_key(*rope, "type", type, where, rope_key + ".type");
    if (type == "yarn") read_yarn(*rope, rope_key, c, where, notes);
    else if (type != "default")
        fail(where, ": key \"", rope_key, ".rope_type\": only \"yarn\" and \"default\" are supported, found \"", type,
             "\"");
}
// DeepSeek's FP8 release: quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
inline void read_quantization(const Json& j, HfQuantization& quant, const std::string& where) {
    const Json* q = j.find("quantization_config");
    if (!q || q->is_null()) return;
    const std::string key = "quantization_config";
    auto bad = [&](const char* sub, const auto&... what) { fail(where, ": key \"", key, sub, "\": ", what...); };
    if (!q->is_object()) bad("", "expected an object, found ", json_describe(*q));
    std::string method;
    if (!read_key(*q, "quant_method", method, where, key + ".quant_method", false)) bad(".quant_method", "missing");
    if (method != "fp8")
        bad(".quant_method", "only \"fp8\" (DeepSeek's block-scaled FP8) is supported, found \"", method, "\"");
    quant.fp8 = true;
    read_key(*q, "fmt", quant.fmt, where, key + ".fmt", false);
    if (quant.fmt != "e4m3") bad(".fmt", "only \"e4m3\" is supported, found \"", quant.fmt, "\"");
    read_key(*q, "activation_scheme", quant.activation_scheme, where, key + ".activation_scheme", false);
    const Json* b = q->find("weight_block_size");
    if (!b) return;
    if (!b->is_array() || b->array.size() != 2)
        bad(".weight_block_size", "expected [out, in], found ", json_describe(*b));
    from_json(b->array[0], quant.block_out, where, key + ".weight_block_size[0]");
    from_json(b->array[1], quant.block_in, where, key + ".weight_block_size[1]");
    if (quant.block_out <= 0 || quant.block_in <= 0)
        bad(".weight_block_size", "expected positive sizes, found ", json_describe(*b));
}
// c.validate(), with the config.json keys of the Config fields its message names added to the error.
inline void validate_hf_config(const Config& c, const std::string& where) {
    try {
        c.validate();
    } catch (const Error& e) {
        const std::string message = e.what();
        auto is_word = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
        std::string keys;
        c.visit([&](const char* field, const auto&) {
            const std::string f = field;
            bool found = false;
            for (size_t at = message.find(f); at != std::string::npos && !found; at = message.find(f, at + 1))
                found = (at == 0 || !is_word(message[at - 1])) &&
                        (at + f.size() == message.size() || !is_word(message[at + f.size()]));
            if (!found) return;
            if (const char* key = hf_key_of(field, true)) keys += (keys.empty() ? "" : ", ") + std::string(key);
        });
        fail(where, ": the config is not a valid model", keys.empty() ? "" : " (config.json keys: " + keys + ")", ": ",
             message);
    }
}
}  // namespace io_detail
// config.json (already parsed) -> Config. `where` (the file name) starts every error message.
inline Config config_from_hf_json(const Json& j, const std::string& where, HfConfigInfo* info = nullptr) {
    HfConfigInfo local;
    HfConfigInfo& out = info ? *info : local;
    out = HfConfigInfo{};
    if (!j.is_object()) fail(where, ": expected a JSON object, found ", json_describe(j));
    const Json* model_type = j.find("model_type");
    if (!model_type || !model_type->is_string() || model_type->string != "deepseek_v3")
        fail(where, ": key \"model_type\": expected \"deepseek_v3\", found ",
             model_type ? json_describe(*model_type) : std::string("no such key"));
    Config c = hf_config_defaults();
    c.visit([&](const char* field, auto& value) {
        if (const char* key = io_detail::hf_key_of(field)) io_detail::read_key(j, key, value, where, key, false);
    });
    if (const Json* v = j.find("q_lora_rank")) {
        if (v->is_null()) c.q_lora_rank = 0;
        else io_detail::from_json(*v, c.q_lora_rank, where, "q_lora_rank");
    }
    io_detail::require_supported_hf_keys(j, c, where);
    io_detail::read_rope(j, c, where, out.notes);
    io_detail::read_quantization(j, out.quant, where);
    if (c.score_func == "softmax")
        out.notes.push_back("scoring_func \"softmax\": transformers' DeepseekV3 always scores experts with a sigmoid");
    io_detail::validate_hf_config(c, where);
    return c;
}
// Config -> config.json for transformers' DeepseekV3ForCausalLM, with the keys it needs beyond the architecture:
// num_key_value_heads (its default, 128, would break attention for other head counts), and this implementation's
// fixed choices (silu, no attention bias, untied head, interleaved RoPE pairs).
inline Json config_to_hf_json(const Config& c, const std::string& torch_dtype = "float32") {
    c.validate();
    Json j = Json::new_object();
    j.add("architectures", Json::new_array()).push(Json::of_string("DeepseekV3ForCausalLM"));
    j.add("model_type", Json::of_string("deepseek_v3"));
    c.visit([&](const char* field, const auto& value) {
        if (const char* key = io_detail::hf_key_of(field)) j.add(key, io_detail::to_json(value));
    });
    // mscale == mscale_all_dim makes transformers' cos/sin factor 1, as in our RoPE (see the reader above).
    Json yarn = Json::new_object();
    io_detail::add_members(yarn, {{"type", Json::of_string("yarn")}, {"rope_type", Json::of_string("yarn")},
        {"factor", Json::of_float(c.rope_factor)},
        {"original_max_position_embeddings", Json::of_int(c.original_seq_len)},
        {"beta_fast", Json::of_float(c.beta_fast)}, {"beta_slow", Json::of_float(c.beta_slow)},
        {"mscale", Json::of_float(c.mscale)}, {"mscale_all_dim", Json::of_float(c.mscale)}});
    if (c.mscale == 0.0f) yarn.add("attention_factor", Json::of_double(1.0));
    const char* topk_method = c.score_func == "sigmoid"  ? "noaux_tc"
                              : c.n_expert_groups > 1 ? "group_limited_greedy" : "greedy";
    io_detail::add_members(j, {{"q_lora_rank", c.q_lora_rank > 0 ? Json::of_int(c.q_lora_rank) : Json{}},
        {"rope_theta", Json::of_float(c.rope_theta)}, {"rope_scaling", c.yarn_active() ? yarn : Json{}},
        {"num_key_value_heads", Json::of_int(c.n_heads)}, {"hidden_act", Json::of_string("silu")},
        {"attention_bias", Json::of_bool(false)}, {"attention_dropout", Json::of_double(0.0)},
        {"rope_interleave", Json::of_bool(true)}, {"tie_word_embeddings", Json::of_bool(false)},
        {"topk_method", Json::of_string(topk_method)}, {"use_cache", Json::of_bool(true)},
        {"torch_dtype", Json::of_string(torch_dtype)}});
    return j;
}
inline Config read_hf_config(const std::string& path, HfConfigInfo* info = nullptr) {
    return config_from_hf_json(json_read_file(path), path, info);
}
inline void write_hf_config(const std::string& path, const Config& c, const std::string& torch_dtype = "float32") {
    write_file_atomic(path, json_dump(config_to_hf_json(c, torch_dtype), 2) + "\n", "config.json");
}

// --- 13.5 Model <-> Hugging Face directory ---------------------------------------------------------------------------
// Names: every ParamEntry carries its HF name. Two things are special in DeepSeek's checkpoints [V3 §2.2, §3.3]:
//  * MTP module k (k = 1..D) is stored as layer n_layers+k-1 with its OWN copies of the shared embedding and output
//    head: model.layers.{n_layers+k-1}.embed_tokens.weight and .shared_head.head.weight. save_hf writes them (as
//    DeepSeek's directory has them); load_hf checks their shapes and that they equal the shared tensors.
//    transformers has no MTP: it skips layer 61's weights silently (its ignore list names model.layers.61 only) and
//    warns of other layers beyond num_hidden_layers as unused weights.
//  * FP8 weights (DeepSeek's official release): each linear *_proj.weight is F8_E4M3 with a float32 companion
//    <name>_scale_inv [ceil(out/128), ceil(in/128)], one scale per 128×128 block: real = fp8 × scale_inv (load_hf
//    dequantizes them to float32).
inline std::string mtp_embed_copy_name(const Config& c, int k) {  // k = 0..D-1
    return "model.layers." + std::to_string(c.n_layers + k) + ".embed_tokens.weight";
}
inline std::string mtp_head_copy_name(const Config& c, int k) {
    return "model.layers." + std::to_string(c.n_layers + k) + ".shared_head.head.weight";
}
// Writes dir/config.json and dir/model.safetensors. dtype F32 (exact) or BF16 (half the size; the routing bias stays
// F32, as in DeepSeek's files: a bias of 1e-3 steps must not be rounded to BF16's 8 bits).
inline void save_hf(const std::string& dir, const Model& model, DType dtype = DType::F32) {
    if (dtype != DType::F32 && dtype != DType::BF16)
        fail("save_hf ", dir, ": dtype must be F32 or BF16, found ", dtype_name(dtype));
    make_directories(dir);
    if (io_detail::file_exists(io_detail::join_path(dir, "model.safetensors.index.json")))
        fail("save_hf ", dir, ": the directory holds a sharded checkpoint (model.safetensors.index.json); ",
             "use another one");
    const Config& c = model.cfg;
    const std::vector<float> params = backend::download(model.params);  // a copy in host memory
    std::vector<TensorToWrite> out;
    for (const ParamEntry& e : model.layout.entries)
        out.push_back({e.name, e.shape, params.data() + e.offset,
                       e.kind == ParamKind::routing_bias ? DType::F32 : dtype});
    const int64_t V = c.vocab_size, d = c.dim;
    for (int k = 0; k < int(model.layout.mtp.size()); ++k) {
        out.push_back({mtp_embed_copy_name(c, k), {V, d}, params.data() + model.layout.embed, dtype});
        out.push_back({mtp_head_copy_name(c, k), {V, d}, params.data() + model.layout.head.w, dtype});
    }
    write_hf_config(io_detail::join_path(dir, "config.json"), c, dtype == DType::BF16 ? "bfloat16" : "float32");
    write_safetensors(io_detail::join_path(dir, "model.safetensors"), out);
}

namespace io_detail {
// One tensor of the checkpoint into `out` (numel floats), FP8 dequantized with its block scales; `used` collects the
// names consumed (the tensor and its scale).
inline void read_checkpoint_tensor(const HfCheckpoint& ckpt, const HfCheckpoint::Source& src, const HfQuantization& q,
                                   float* out, std::unordered_set<std::string>& used) {
    const TensorInfo& t = *src.info;
    used.insert(t.name);
    if (!dtype_is_fp8(t.dtype)) return src.file->read_floats(t, out);
    const std::string scale_name = t.name + "_scale_inv";  // block-scaled FP8 [V3 §3.3.2], as 13.5's intro says
    const HfCheckpoint::Source* s = ckpt.find(scale_name);
    if (!s) fail(src.file->path, ": tensor \"", t.name, "\" is ", dtype_name(t.dtype), " but its scale \"", scale_name,
                 "\" is missing from ", ckpt.description);
    if (t.shape.size() != 2)
        fail(src.file->path, ": tensor \"", t.name, "\": FP8 with block scales needs a matrix, found shape ",
             shape_str(t.shape));
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const std::vector<int64_t> blocks = {(rows + q.block_out - 1) / q.block_out, (cols + q.block_in - 1) / q.block_in};
    if (s->info->shape != blocks)
        fail(s->file->path, ": tensor \"", scale_name, "\": expected shape ", shape_str(blocks), " (one scale per ",
             q.block_out, "x", q.block_in, " block of ", shape_str(t.shape), "), found ", shape_str(s->info->shape));
    const std::vector<float> scale = s->file->read_floats(scale_name);
    used.insert(scale_name);
    const Fp8Format f = t.dtype == DType::F8_E4M3 ? Fp8Format::e4m3 : Fp8Format::e5m2;
    fp8_detail::dequantize_tiles("load_hf", src.file->read_bytes(t).data(), scale.data(), int(rows), int(cols),
                                 q.block_out, out, q.block_in, f);
}
// Every tensor of the layout is in the checkpoint, with its shape: checked on the headers alone, so load_hf runs it
// before the model is allocated (a config.json that declares a huge model next to a small file is an error here).
inline void check_hf_tensors(const HfCheckpoint& ckpt, const ParamLayout& layout) {
    std::vector<std::string> missing;
    for (const ParamEntry& e : layout.entries) {
        const HfCheckpoint::Source* src = ckpt.find(e.name);
        if (!src) missing.push_back(e.name);
        else if (src->info->shape != e.shape)
            fail(ckpt.dir, ": tensor \"", e.name, "\" in ", src->file->path, ": expected shape ", shape_str(e.shape),
                 " (from config.json), found ", shape_str(src->info->shape));
    }
    if (!missing.empty())
        fail(ckpt.dir, ": ", missing.size(), " tensor", missing.size() == 1 ? " is" : "s are", " missing from ",
             ckpt.description, ": ", name_list(missing));
}
}  // namespace io_detail
// Copies every tensor of a checkpoint directory into `model` (whose config must match the checkpoint). Errors: a
// tensor missing, a shape differing from the config's, a tensor this config does not have; notes go to `notes`.
inline void load_hf_weights(const HfCheckpoint& ckpt, Model& model, const HfQuantization& quant,
                            std::vector<std::string>* notes = nullptr) {
    if (!backend::host_memory) fail("load_hf_weights: runs on the CPU backend only (it reads into host memory)");
    using io_detail::shape_str;
    const Config& c = model.cfg;
    io_detail::check_hf_tensors(ckpt, model.layout);
    std::unordered_set<std::string> used;
    for (const ParamEntry& e : model.layout.entries)
        io_detail::read_checkpoint_tensor(ckpt, *ckpt.find(e.name), quant, model.params.data() + e.offset, used);
    // The MTP modules' copies of the embedding and head: same shape, and (normally) the same values.
    const int64_t V = c.vocab_size, d = c.dim;
    for (int k = 0; k < int(model.layout.mtp.size()); ++k)
        for (int which = 0; which < 2; ++which) {
            const std::string name = which == 0 ? mtp_embed_copy_name(c, k) : mtp_head_copy_name(c, k);
            const HfCheckpoint::Source* src = ckpt.find(name);
            if (!src) continue;
            if (src->info->shape != std::vector<int64_t>{V, d})
                fail(ckpt.dir, ": tensor \"", name, "\" in ", src->file->path, ": expected shape ", shape_str({V, d}),
                     " (a copy of the shared ", which == 0 ? "embedding" : "output head", "), found ",
                     shape_str(src->info->shape));
            std::vector<float> copy(size_t(V * d));
            io_detail::read_checkpoint_tensor(ckpt, *src, quant, copy.data(), used);
            const float* shared = model.params.data() + (which == 0 ? model.layout.embed : model.layout.head.w);
            double max_diff = 0;
            for (size_t i = 0; i < copy.size(); ++i)
                max_diff = std::max(max_diff, double(std::fabs(copy[i] - shared[i])));
            if (max_diff > 0 && notes)
                notes->push_back("\"" + name + "\" differs from the shared tensor (max |diff| " +
                                 std::to_string(max_diff) + "); the model shares one, so the copy is ignored");
        }
    std::vector<std::string> extra;
    bool extra_layers = false;
    for (const auto& [name, src] : ckpt.tensors) {
        if (used.count(name)) continue;
        extra.push_back(name);
        const char* layer = "model.layers.";
        extra_layers |= io_detail::starts_with(name, layer) &&
                        std::atoi(name.c_str() + std::strlen(layer)) >= c.n_layers + int(model.layout.mtp.size());
    }
    const std::string mtp_hint = " (layers beyond num_hidden_layers: MTP weights? config.json declares "
                                 "num_nextn_predict_layers = " + std::to_string(c.n_mtp_depth) + ")";
    if (!extra.empty())
        fail(ckpt.dir, ": ", extra.size(), " tensor", extra.size() == 1 ? " in " : "s in ", ckpt.description,
             extra.size() == 1 ? " is" : " are", " not part of the model config.json describes: ",
             io_detail::name_list(extra), extra_layers ? mtp_hint : "");
}
// A Hugging Face directory (config.json + model.safetensors or shards, any mix of F32/BF16/F16/FP8) as a new Model.
// MTP modules config.json declares (num_nextn_predict_layers) but the checkpoint lacks are left out (n_mtp_depth =
// the modules present), with a note. Notes go to stderr.
inline Model load_hf(const std::string& dir, uint64_t seed = 0) {
    HfConfigInfo info;
    Config cfg = read_hf_config(io_detail::join_path(dir, "config.json"), &info);
    HfCheckpoint ckpt(dir);
    int present = 0;
    while (present < cfg.n_mtp_depth && ckpt.has_prefix("model.layers." + std::to_string(cfg.n_layers + present) + "."))
        ++present;
    if (present < cfg.n_mtp_depth) {
        info.notes.push_back("config.json declares num_nextn_predict_layers = " + std::to_string(cfg.n_mtp_depth) +
                             " but " + ckpt.description + " holds weights for " + std::to_string(present) +
                             " MTP module(s): loading with n_mtp_depth = " + std::to_string(present));
        cfg.n_mtp_depth = present;
    }
    io_detail::check_hf_tensors(ckpt, param_layout(cfg));  // before the model is allocated
    Model model(cfg, seed);
    load_hf_weights(ckpt, model, info.quant, &info.notes);
    for (const auto& f : ckpt.files)
        if (f->uncovered_bytes > 0)
            info.notes.push_back(f->path + ": " + std::to_string(f->uncovered_bytes) +
                                 " bytes of the data section belong to no tensor");
    for (const auto& note : info.notes) std::fprintf(stderr, "load_hf %s: note: %s\n", dir.c_str(), note.c_str());
    return model;
}

// --- 13.6 .npy files, and the forward pass as transformers computes it -----------------------------------------------
// .npy (NumPy format 1.0): "\x93NUMPY", version 1 0, a little-endian uint16 header length, a Python dict literal
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 8, 64), } padded with spaces and a newline so that the data
// starts at a multiple of 64 bytes, then the raw little-endian float32 values in C (row-major) order.
inline void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
    const std::string dims = io_detail::shape_str(shape);  // "[2, 8, 64]": the tuple is "(2, 8, 64)", "(5,)" or "()"
    if (std::any_of(shape.begin(), shape.end(), [](int64_t d) { return d < 0; }))
        fail("npy ", path, ": negative dimension in ", dims);
    const int64_t numel = io_detail::numel(shape);
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims.substr(1, dims.size() - 2) +
                       (shape.size() == 1 ? ",), }" : "), }");
    dict.append((64 - (10 + dict.size() + 1) % 64) % 64, ' ');  // magic(6) + version(2) + length(2) + dict + '\n'
    dict += '\n';
    write_file_atomic_stream(path, "npy", [&](std::FILE* f) {
        const uint8_t head[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, uint8_t(dict.size() & 0xFF),
                                  uint8_t(dict.size() >> 8)};
        if (!write_bytes(f, head, 10) || !write_bytes(f, dict.data(), dict.size())) return false;
        std::vector<uint8_t> bytes(size_t(numel) * 4);
        encode_from_float(DType::F32, data, numel, bytes.data());
        return write_bytes(f, bytes.data(), bytes.size());
    });
}
// Reads a float32 C-order .npy (version 1 or 2), as numpy.save writes it; `shape` receives the dimensions.
inline std::vector<float> read_npy(const std::string& path, std::vector<int64_t>* shape = nullptr) {
    const std::string bytes = read_file_bytes(path);
    auto bad = [&](const auto&... what) { fail("npy ", path, ": ", what...); };
    if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) bad("not a .npy file (bad magic)");
    const int major = uint8_t(bytes[6]);
    if (major < 1 || major > 3) bad("unsupported format version ", major);
    const size_t start = major == 1 ? 10 : 12;  // the header length: uint16 in version 1, uint32 in versions 2 and 3
    if (bytes.size() < start) bad("truncated header");
    const size_t header_len = size_t(load_le(&bytes[8], int(start) - 8));
    if (header_len > bytes.size() - start) bad("header length ", header_len, " beyond the file");
    const std::string dict = bytes.substr(start, header_len);
    auto value_after = [&](const char* key) {  // where the value of `key` starts in the dict
        const size_t k = dict.find(key), colon = k == std::string::npos ? k : dict.find(':', k);
        if (k == std::string::npos) bad("header has no ", key);
        if (colon == std::string::npos) bad("malformed header");
        return std::min(dict.find_first_not_of(' ', colon + 1), dict.size());
    };
    size_t v = value_after("'descr'");
    if (dict.compare(v, 5, "'<f4'") != 0) bad("expected dtype '<f4' (float32), found ", dict.substr(v, 8));
    if (dict.compare(value_after("'fortran_order'"), 5, "False") != 0) bad("Fortran order is not supported");
    v = value_after("'shape'");
    const size_t close = v < dict.size() && dict[v] == '(' ? dict.find(')', v) : std::string::npos;
    if (close == std::string::npos) bad("malformed shape");
    // A Python tuple of dimensions: "()", "(5,)", "(2, 8, 64)". At most 2^40 elements (4 TiB), so numel * 4 fits.
    std::vector<int64_t> dims;
    int64_t numel = 1;
    const std::string_view tuple = std::string_view(dict).substr(v + 1, close - v - 1);
    for (size_t i = 0; i < tuple.size();) {
        const size_t comma = std::min(tuple.find(',', i), tuple.size());
        std::string_view item = tuple.substr(i, comma - i);
        item.remove_prefix(std::min(item.find_first_not_of(' '), item.size()));
        item.remove_suffix(item.size() - std::min(item.find_last_not_of(' ') + 1, item.size()));
        i = comma + 1;
        if (item.empty() && comma == tuple.size() && !dims.empty()) break;  // the trailing comma of "(5,)"
        const int64_t d = parse_int(item, "npy " + path + ": shape[" + std::to_string(dims.size()) + "]", 0,
                                    int64_t(1) << 40);
        if (d > 0 && numel > (int64_t(1) << 40) / d) bad("shape ", tuple, " has more than 2^40 elements");
        dims.push_back(d);
        numel *= d;
    }
    const size_t data = start + header_len;
    if (bytes.size() - data != size_t(numel) * 4)
        bad("shape ", io_detail::shape_str(dims), " needs ", numel * 4, " bytes of data, found ", bytes.size() - data);
    std::vector<float> out(static_cast<size_t>(numel));
    decode_to_float(DType::F32, reinterpret_cast<const uint8_t*>(bytes.data() + data), numel, out.data());
    if (shape) *shape = dims;
    return out;
}
// Token rows as text: "1,2,3;4,5,6" (rows separated by ';', all of the same length).
struct TokenRows { int B = 0, T = 0; std::vector<int32_t> tokens; };  // tokens: [B, T]
inline TokenRows parse_token_rows(const std::string& text) {
    TokenRows r;
    std::vector<std::vector<int32_t>> rows(1);
    const char* separators = ";, \t\n\r";
    for (size_t i = 0; i < text.size();) {
        if (text[i] == ';') rows.emplace_back();
        if (std::strchr(separators, text[i]) && text[i]) { ++i; continue; }
        const size_t end = std::min(text.find_first_of(separators, i), text.size());
        const std::string what = "token rows: the token id at character " + std::to_string(i);  // (not the whole text)
        rows.back().push_back(int32_t(parse_int(std::string_view(text).substr(i, end - i), what, 0, INT32_MAX)));
        i = end;
    }
    r.B = int(rows.size());
    r.T = int(rows[0].size());
    for (size_t b = 0; b < rows.size(); ++b) {
        if (rows[b].empty()) fail("tokens \"", text, "\": row ", b, " is empty");
        if (int(rows[b].size()) != r.T)
            fail("tokens \"", text, "\": row ", b, " has ", rows[b].size(), " tokens, row 0 has ", r.T,
                 " (rows must be equal)");
        r.tokens.insert(r.tokens.end(), rows[b].begin(), rows[b].end());
    }
    return r;
}
// The forward pass of transformers' DeepseekV3ForCausalLM(input_ids, labels=input_ids): logits for all T positions
// of each row, and the mean cross-entropy of the B·(T−1) next-token predictions (labels shifted by one). Model::forward
// predicts token t+1 at position t of rows of T+1 tokens, so each row gets one extra token, kIgnore, whose target the
// cross-entropy skips. No MTP, no balance loss (transformers has neither); the routing bias selects experts, as in
// transformers. Returns the loss; logits: model.logits(), [B·T, vocab]; with `gradients`, model.grads: its gradient.
inline double forward_like_transformers(Model& model, const TokenRows& rows, bool gradients) {
    for (size_t i = 0; i < rows.tokens.size(); ++i)
        if (rows.tokens[i] < 0 || rows.tokens[i] >= model.cfg.vocab_size)
            fail("tokens: row ", i / size_t(rows.T), " position ", i % size_t(rows.T), ": id ", rows.tokens[i],
                 " outside the vocabulary [0, ", model.cfg.vocab_size, ")");
    std::vector<int32_t> padded(size_t(rows.B) * (rows.T + 1), kIgnore);
    for (int b = 0; b < rows.B; ++b)
        std::copy_n(rows.tokens.begin() + int64_t(b) * rows.T, rows.T, padded.begin() + int64_t(b) * (rows.T + 1));
    LossOptions opt;
    opt.with_mtp = false, opt.balance = BalanceLoss::none;
    const Losses loss = model.forward(padded.data(), rows.B, rows.T, opt);
    if (gradients) model.backward();
    return loss.main;
}
// The gradients of the main model's parameters under their HF names, as F32 safetensors (the routing bias, which has
// no gradient, and the MTP modules, which transformers does not have, are left out).
inline void write_gradients_hf(const std::string& path, const Model& model) {
    const std::vector<float> grads = backend::download(model.grads);  // a copy in host memory
    std::vector<TensorToWrite> out;
    for (const ParamEntry& e : model.layout.entries)
        if (e.mtp_module < 0 && e.kind != ParamKind::routing_bias)
            out.push_back({e.name, e.shape, grads.data() + e.offset, DType::F32});
    write_safetensors(path, out);
}

}  // namespace dsv3
