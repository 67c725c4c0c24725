// deepseek_v3.hpp — DeepSeek-V3 in one header: read it, run it, change it.
//
// This file implements the whole DeepSeek-V3 architecture (arXiv 2412.19437, "V3" below) on the CPU, in plain
// C++17 with OpenMP: Multi-head Latent Attention with decoupled RoPE and YaRN, DeepSeekMoE with shared and
// fine-grained routed experts, auxiliary-loss-free load balancing, Multi-Token Prediction, and training with
// AdamW. Every kernel has its forward and its backward next to each other, with the equation it implements.
//
// USAGE
//     #include "deepseek_v3.hpp"          // nothing to link but OpenMP (-fopenmp); works without it, single-threaded
//     dsv3::Config cfg = dsv3::Config::tiny();
//     dsv3::Model model(cfg, /*seed=*/1);
//     float loss = model.forward_backward(tokens, /*batch=*/B, /*seq_len=*/T);   // tokens: [B, T+1]
//     dsv3::adamw_step(model, optimizer_state, lr, ...);
// The examples in examples/ show whole programs: train, params, bench.
//
// TABLE OF CONTENTS (read in this order; paper sections in brackets)
//   0. Errors ................................ how every failure is reported
//   1. Config and counters ................... [V3 §2, §4.2, Table 1; Insights paper Table 2]
//   2. Foundations ........................... RNG, parallel loops, timers and progress, the activation arena
//   3. Kernels ............................... forward/backward pairs: matmul, RMSNorm, RoPE+YaRN [V3 §2.1.1],
//                                              causal attention, SwiGLU, embedding, cross-entropy
//   4. Parameters ............................ one flat buffer, named views with Hugging Face names [MODEL.md §7]
//   5. Modules ............................... MLA [V3 §2.1.1, eqs. 1-11], dense FFN, block, model
//   6. Training .............................. AdamW, clipping, LR schedules [V3 §4.2]
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
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace dsv3 {

// =====================================================================================================================
// 0. ERRORS
// =====================================================================================================================
// Every error the library raises is a dsv3::Error whose message names the file, tensor or field, what was expected
// and what was found. Examples catch it, print it and exit non-zero.
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

// =====================================================================================================================
// 1. CONFIG AND COUNTERS
// =====================================================================================================================
// One struct carries the architecture. Field names follow DeepSeek's official inference code
// (inference/model.py, ModelArgs); the Hugging Face config.json name is given where it differs.
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

    int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
    bool is_moe_layer(int layer) const { return layer >= n_dense_layers && n_routed_experts > 0; }
    bool yarn_active() const { return rope_factor > 1.0f; }

    // The presets. `tiny` keeps every structural feature (query LoRA, a dense layer, shared + routed experts with a
    // group limit, MTP) at a size that trains in minutes on two cores.
    static Config tiny() { return Config{}; }
    static Config small();    // about 100M parameters, for a GPU
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
        f("balance_loss_alpha", balance_loss_alpha);
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
    // Sets one field from text; `where` names the source for the error message.
    void set(const std::string& name, const std::string& value, const std::string& where) {
        bool found = false;
        visit([&](const char* field, auto& v) {
            if (name != field) return;
            found = true;
            std::istringstream in(value);
            in >> v;
            if (in.fail() || !(in >> std::ws).eof())
                fail(where, ": field ", name, ": cannot parse \"", value, "\" as its type");
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
    auto positive = [](const char* field, long long v) {
        if (v <= 0) fail("Config.", field, ": must be > 0, found ", v);
    };
    positive("vocab_size", vocab_size); positive("dim", dim); positive("n_layers", n_layers);
    positive("n_heads", n_heads); positive("kv_lora_rank", kv_lora_rank);
    positive("qk_nope_head_dim", qk_nope_head_dim); positive("qk_rope_head_dim", qk_rope_head_dim);
    positive("v_head_dim", v_head_dim); positive("max_seq_len", max_seq_len);
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
// Counting is done on the same list of named shapes the model allocates (section 4: param_layout), so the counters
// and the model can never disagree. These functions are defined after that list.
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

// Training FLOPs per token (Insights paper, Table 2): 6 per activated parameter that does a multiply-add (the
// embedding is a lookup), plus causal attention: scores and weighted sum, forward and backward, over T/2 keys on
// average: 6 * layers * heads * (d_h + d_h^R + d_v) * T/2.
inline double training_flops_per_token(const Config& c, int seq_len) {
    ParamCounts n = count_parameters(c);
    double matmul = 6.0 * double(n.activated - n.embedding);
    double attention = 6.0 * c.n_layers * c.n_heads * double(c.qk_head_dim() + c.v_head_dim) * seq_len / 2.0;
    return matmul + attention;
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

// parallel_for(n, body): body(i) for i in [0, n), split over OpenMP threads by a fixed static partition. Each i must
// write only its own outputs, so the result is the same for any thread count.
template <class Body>
inline void parallel_for(int64_t n, const Body& body) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
}

// parallel_sum(n, term): sum of term(i) for i in [0, n) in double, bitwise independent of the thread count: the
// terms are summed in fixed chunks of 256, then the chunk sums in order.
template <class Term>
inline double parallel_sum(int64_t n, const Term& term) {
    const int64_t chunk = 256, n_chunks = (n + chunk - 1) / chunk;
    std::vector<double> partial(size_t(std::max<int64_t>(n_chunks, 0)), 0.0);
    parallel_for(n_chunks, [&](int64_t c) {
        double s = 0;
        for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) s += term(i);
        partial[size_t(c)] = s;
    });
    double total = 0;
    for (double p : partial) total += p;
    return total;
}

inline int thread_count() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

inline double now_seconds() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// The activation arena: forward activations and backward temporaries are bump-allocated from large blocks. After
// the first step every take() is served from memory already owned, so a training step allocates nothing. Pointers
// stay valid until release()/reset() (blocks never move).
class Arena {
  public:
    // n floats, uninitialised, 64-byte aligned.
    float* take(size_t n) {
        n = (n + 15) & ~size_t(15);
        while (true) {
            if (block_ == blocks_.size()) {  // no block left: add one large enough
                size_t size = std::max(n, size_t(1) << 22);
                blocks_.push_back({std::unique_ptr<float[]>(new float[size + 16]), size});
            }
            Block& b = blocks_[block_];
            if (used_ + n <= b.size) {
                float* base = b.data.get();
                float* aligned = base + ((16 - (reinterpret_cast<uintptr_t>(base) / 4) % 16) % 16);
                float* p = aligned + used_;
                used_ += n;
                return p;
            }
            if (used_ == 0) {  // an empty block that is too small: replace it with a large enough one
                size_t size = std::max(n, size_t(1) << 22);
                b = {std::unique_ptr<float[]>(new float[size + 16]), size};
                continue;
            }
            ++block_;
            used_ = 0;
        }
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
    size_t capacity_floats() const {
        size_t s = 0;
        for (const Block& b : blocks_) s += b.size;
        return s;
    }

  private:
    struct Block { std::unique_ptr<float[]> data; size_t size; };
    std::vector<Block> blocks_;
    size_t block_ = 0, used_ = 0;
};

// =====================================================================================================================
// 3. KERNELS
// =====================================================================================================================
// Each kernel is a forward/backward pair on raw row-major arrays. Backward functions accumulate (+=) into the
// gradients of their inputs. Shapes use T for "rows" (tokens of the whole batch, B * seq_len).

// --- 3.1 matmul: the linear layer y = x Wᵀ ----------------------------------------------------------------------
// y[T,out] = x[T,in] · W[out,in]ᵀ          (overwrites y)
inline void matmul_forward(float* y, const float* x, const float* W, int T, int in, int out) {
    parallel_for(T, [&](int64_t t) {
        const float* xr = x + t * in;
        for (int o = 0; o < out; ++o) {
            const float* wr = W + int64_t(o) * in;
            float s = 0;
            for (int i = 0; i < in; ++i) s += xr[i] * wr[i];
            y[t * out + o] = s;
        }
    });
}
// dx[T,in] += dy[T,out] · W[out,in];   dW[out,in] += dy[T,out]ᵀ · x[T,in]     (either may be null)
inline void matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int in,
                            int out) {
    if (dx) parallel_for(T, [&](int64_t t) {
        float* dxr = dx + t * in;
        for (int o = 0; o < out; ++o) {
            const float g = dy[t * out + o];
            const float* wr = W + int64_t(o) * in;
            for (int i = 0; i < in; ++i) dxr[i] += g * wr[i];
        }
    });
    if (dW) parallel_for(out, [&](int64_t o) {
        float* dwr = dW + o * in;
        for (int t = 0; t < T; ++t) {
            const float g = dy[int64_t(t) * out + o];
            const float* xr = x + int64_t(t) * in;
            for (int i = 0; i < in; ++i) dwr[i] += g * xr[i];
        }
    });
}

// --- 3.2 RMSNorm: y = x / sqrt(mean(x²) + ε) ⊙ g   (Zhang & Sennrich 2019; used before every sub-layer) ---------
// x, y: [T, d]; g: [d]; rstd: [T] saved for backward.
inline void rmsnorm_forward(float* y, float* rstd, const float* x, const float* g, int T, int d, float eps) {
    parallel_for(T, [&](int64_t t) {
        const float* xr = x + t * d;
        float* yr = y + t * d;
        float ss = 0;
        for (int i = 0; i < d; ++i) ss += xr[i] * xr[i];
        const float r = 1.0f / std::sqrt(ss / d + eps);
        rstd[t] = r;
        for (int i = 0; i < d; ++i) yr[i] = xr[i] * r * g[i];
    });
}
// With n = x·r (r = rstd): dx = r·(g⊙dy) − r·n·mean(g⊙dy⊙n);  dg = Σ_t dy⊙n.
inline void rmsnorm_backward(float* dx, float* dg, const float* dy, const float* x, const float* g,
                             const float* rstd, int T, int d) {
    parallel_for(T, [&](int64_t t) {
        const float* xr = x + t * d;
        const float* dyr = dy + t * d;
        const float r = rstd[t];
        float dot = 0;
        for (int i = 0; i < d; ++i) dot += g[i] * dyr[i] * xr[i] * r;
        dot /= d;
        float* dxr = dx + t * d;
        for (int i = 0; i < d; ++i) dxr[i] += r * (g[i] * dyr[i] - xr[i] * r * dot);
    });
    if (dg) parallel_for(d, [&](int64_t i) {  // one column per task: the sum over t runs in a fixed order
        float s = 0;
        for (int t = 0; t < T; ++t) s += dy[int64_t(t) * d + i] * x[int64_t(t) * d + i] * rstd[t];
        dg[i] += s;
    });
}

// --- 3.3 RoPE with YaRN [V3 §2.1.1 eqs. 3 and 7; YaRN, Peng et al. 2023] ----------------------------------------
// The decoupled RoPE part of queries and keys is rotated pairwise: (x_2i, x_2i+1) by the angle pos·θ_i with
// θ_i = base^(−2i/D), D = qk_rope_head_dim. (DeepSeek's code views consecutive pairs as complex numbers; Hugging
// Face stores the same weights and de-interleaves inside its rotary function: the dot products are identical.)
// YaRN extends the context by slowing the low frequencies: frequencies that turn fewer than beta_slow times over
// the original context are divided by s (= rope_factor), those turning more than beta_fast times are kept, and a
// linear ramp blends in between. The attention scale is then multiplied by m² with m = 0.1·mscale·ln(s) + 1.
struct RopeTable {
    int half = 0, max_pos = 0;
    std::vector<float> cos, sin;  // [max_pos, half]
};
inline std::vector<double> rope_frequencies(const Config& c) {
    const int D = c.qk_rope_head_dim, half = D / 2;
    std::vector<double> theta(static_cast<size_t>(half));
    for (int i = 0; i < half; ++i) theta[size_t(i)] = std::pow(double(c.rope_theta), -2.0 * i / D);
    if (!c.yarn_active()) return theta;
    // find_dim(r): the dimension whose wavelength fits r rotations into the original context.
    auto find_dim = [&](double rotations) {
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
    RopeTable r;
    r.half = c.qk_rope_head_dim / 2;
    r.max_pos = max_pos;
    r.cos.resize(size_t(max_pos) * r.half);
    r.sin.resize(size_t(max_pos) * r.half);
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
    float scale = 1.0f / std::sqrt(float(c.qk_head_dim()));
    if (c.yarn_active()) {
        float m = 0.1f * c.mscale * std::log(c.rope_factor) + 1.0f;
        scale *= m * m;
    }
    return scale;
}
// In place: x holds T rows of row_stride floats; in each row, n_vec vectors of D = 2·half floats start at
// offset + j·vec_stride. Row t is at position pos0 + t % seq_len. backward = rotation by the opposite angle.
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
    rope_apply(x, T, row_stride, offset, n_vec, vec_stride, pos0, seq_len, rt, false);
}
// The rotation is orthogonal, so its backward is the inverse rotation of the gradient (in place).
inline void rope_backward(float* dx, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0,
                          int seq_len, const RopeTable& rt) {
    rope_apply(dx, T, row_stride, offset, n_vec, vec_stride, pos0, seq_len, rt, true);
}

// --- 3.4 causal softmax attention -----------------------------------------------------------------------------
// q, k: [B·T, H, dqk]; v: [B·T, H, dv]; out: [B·T, H, dv]; probs: [B, H, T, T] (row t holds weights over s ≤ t).
// o_t = Σ_{s≤t} softmax_s(q_t·k_s · scale) v_s       [V3 eq. 10]
inline void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v, int B, int T,
                              int H, int dqk, int dv, float scale) {
    parallel_for(int64_t(B) * H * T, [&](int64_t job) {
        const int t = int(job % T), h = int((job / T) % H), b = int(job / (int64_t(T) * H));
        const float* qt = q + ((int64_t(b) * T + t) * H + h) * dqk;
        float* p = probs + ((int64_t(b) * H + h) * T + t) * T;
        float mx = -INFINITY;
        for (int s = 0; s <= t; ++s) {
            const float* ks = k + ((int64_t(b) * T + s) * H + h) * dqk;
            float dot = 0;
            for (int i = 0; i < dqk; ++i) dot += qt[i] * ks[i];
            p[s] = dot * scale;
            mx = std::max(mx, p[s]);
        }
        float sum = 0;
        for (int s = 0; s <= t; ++s) sum += (p[s] = std::exp(p[s] - mx));
        const float inv = 1.0f / sum;
        for (int s = 0; s <= t; ++s) p[s] *= inv;
        for (int s = t + 1; s < T; ++s) p[s] = 0;
        float* ot = out + ((int64_t(b) * T + t) * H + h) * dv;
        for (int i = 0; i < dv; ++i) ot[i] = 0;
        for (int s = 0; s <= t; ++s) {
            const float* vs = v + ((int64_t(b) * T + s) * H + h) * dv;
            for (int i = 0; i < dv; ++i) ot[i] += p[s] * vs[i];
        }
    });
}
// Backward: dp_s = dout_t·v_s; dscore_s = p_s (dp_s − Σ_r p_r dp_r); dq_t += scale Σ_s dscore_s k_s;
// dk_s += scale Σ_t dscore_s q_t; dv_s += Σ_t p_s dout_t. One task per (b, h) walks t in order, so the sums over t
// into dk and dv are in a fixed order.
inline void attention_backward(float* dq, float* dk, float* dv_, const float* dout, const float* probs,
                               const float* q, const float* k, const float* v, int B, int T, int H, int dqk, int dv,
                               float scale) {
    parallel_for(int64_t(B) * H, [&](int64_t job) {
        const int h = int(job % H), b = int(job / H);
        std::vector<float> dscore(static_cast<size_t>(T));
        for (int t = 0; t < T; ++t) {
            const float* p = probs + ((int64_t(b) * H + h) * T + t) * T;
            const float* dot_ = dout + ((int64_t(b) * T + t) * H + h) * dv;
            float weighted = 0;
            for (int s = 0; s <= t; ++s) {
                const float* vs = v + ((int64_t(b) * T + s) * H + h) * dv;
                float dp = 0;
                for (int i = 0; i < dv; ++i) dp += dot_[i] * vs[i];
                dscore[size_t(s)] = dp;
                weighted += p[s] * dp;
                float* dvs = dv_ + ((int64_t(b) * T + s) * H + h) * dv;
                for (int i = 0; i < dv; ++i) dvs[i] += p[s] * dot_[i];
            }
            const float* qt = q + ((int64_t(b) * T + t) * H + h) * dqk;
            float* dqt = dq + ((int64_t(b) * T + t) * H + h) * dqk;
            for (int s = 0; s <= t; ++s) {
                const float ds = p[s] * (dscore[size_t(s)] - weighted) * scale;
                const float* ks = k + ((int64_t(b) * T + s) * H + h) * dqk;
                float* dks = dk + ((int64_t(b) * T + s) * H + h) * dqk;
                for (int i = 0; i < dqk; ++i) {
                    dqt[i] += ds * ks[i];
                    dks[i] += ds * qt[i];
                }
            }
        }
    });
}

// --- 3.5 SwiGLU: h = silu(gate) ⊙ up, silu(z) = z·σ(z)   (Shazeer 2020; every FFN and expert of V3) ------------
// gate, up, h: [n]
inline void swiglu_forward(float* h, const float* gate, const float* up, int64_t n) {
    parallel_for((n + 1023) / 1024, [&](int64_t c) {
        for (int64_t i = c * 1024, e = std::min(n, i + 1024); i < e; ++i) {
            const float z = gate[i], sig = 1.0f / (1.0f + std::exp(-z));
            h[i] = z * sig * up[i];
        }
    });
}
// d silu(z)/dz = σ(z)(1 + z(1 − σ(z))).
inline void swiglu_backward(float* dgate, float* dup, const float* dh, const float* gate, const float* up, int64_t n) {
    parallel_for((n + 1023) / 1024, [&](int64_t c) {
        for (int64_t i = c * 1024, e = std::min(n, i + 1024); i < e; ++i) {
            const float z = gate[i], sig = 1.0f / (1.0f + std::exp(-z));
            dgate[i] += dh[i] * up[i] * sig * (1.0f + z * (1.0f - sig));
            dup[i] += dh[i] * z * sig;
        }
    });
}

// --- 3.6 embedding ------------------------------------------------------------------------------------------------
// out[t] = E[tokens[t]];  E: [vocab, d], out: [T, d]
inline void embedding_forward(float* out, const int32_t* tokens, const float* E, int T, int d, int vocab) {
    for (int t = 0; t < T; ++t)
        if (tokens[t] < 0 || tokens[t] >= vocab)
            fail("embedding: token id ", tokens[t], " at position ", t, " outside [0, ", vocab, ")");
    parallel_for(T, [&](int64_t t) {
        std::memcpy(out + t * d, E + int64_t(tokens[t]) * d, sizeof(float) * size_t(d));
    });
}
// dE[tokens[t]] += dout[t]. Rows of equal tokens collide, so this runs serially in t order (deterministic, cheap).
inline void embedding_backward(float* dE, const float* dout, const int32_t* tokens, int T, int d) {
    for (int t = 0; t < T; ++t) {
        float* row = dE + int64_t(tokens[t]) * d;
        const float* g = dout + int64_t(t) * d;
        for (int i = 0; i < d; ++i) row[i] += g[i];
    }
}

// --- 3.7 cross-entropy ------------------------------------------------------------------------------------------
// logits: [T, V]; targets: [T] (ignore_index skips a row). Returns the mean over the counted rows of
// −log softmax(logits)[target], in nats.
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
    const int64_t counted = cross_entropy_count(targets, T, V);
    if (counted == 0) return 0.0;
    double total = parallel_sum(T, [&](int64_t t) {
        const int32_t y = targets[t];
        if (y == kIgnore) return 0.0;
        const float* z = logits + t * V;
        float mx = z[0];
        for (int i = 1; i < V; ++i) mx = std::max(mx, z[i]);
        double sum = 0;
        for (int i = 0; i < V; ++i) sum += std::exp(double(z[i] - mx));
        return std::log(sum) + mx - z[y];
    });
    return total / double(counted);
}
// dlogits[t] += dloss · (softmax(logits[t]) − onehot(target)) / counted.
inline void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, int T, int V,
                                   float dloss) {
    const int64_t counted = cross_entropy_count(targets, T, V);
    if (counted == 0) return;
    const float w = dloss / float(counted);
    parallel_for(T, [&](int64_t t) {
        const int32_t y = targets[t];
        if (y == kIgnore) return;
        const float* z = logits + t * V;
        float* dz = dlogits + t * V;
        float mx = z[0];
        for (int i = 1; i < V; ++i) mx = std::max(mx, z[i]);
        float sum = 0;
        for (int i = 0; i < V; ++i) sum += std::exp(z[i] - mx);
        const float inv = 1.0f / sum;
        for (int i = 0; i < V; ++i) dz[i] += w * (std::exp(z[i] - mx) * inv - (i == y ? 1.0f : 0.0f));
    });
}

// =====================================================================================================================
// 4. PARAMETERS: ONE FLAT BUFFER, NAMED VIEWS
// =====================================================================================================================
// All parameters live in one float buffer, the gradients in a second of the same layout (and AdamW's moments in two
// more). A module only stores offsets into it. So the optimizer, gradient clipping, checkpoints and the data-parallel
// all-reduce each work on flat memory, and every tensor still has its Hugging Face name for checkpoints.
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

// Views: a module holds offsets; data = params.data() + offset, gradient = grads.data() + offset.
struct Linear { size_t w = 0; int out = 0, in = 0; };  // weight [out, in]: y = x Wᵀ
struct Norm { size_t g = 0; int dim = 0; };            // gain [dim]
struct Ffn { Linear gate, up, down; };                 // SwiGLU: down(silu(gate x) ⊙ up x)
struct Attention {                                     // MLA [V3 eqs. 1-11]
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
    Ffn shared;                   // the N_s shared experts as one SwiGLU of width N_s·moe_inter_dim
    bool has_shared = false;
};
struct Block {
    Norm attn_norm, ffn_norm;     // "input_layernorm", "post_attention_layernorm"
    Attention attn;
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
        ParamEntry e;
        e.name = name;
        e.shape = std::move(shape);
        e.size = 1;
        for (int64_t s : e.shape) e.size *= size_t(s);
        e.offset = L.total;
        e.kind = kind;
        e.mtp_module = mtp_index;
        e.routed_expert = in_expert;
        L.total += e.size;
        L.entries.push_back(std::move(e));
        return L.entries.back().offset;
    };
    auto linear = [&](const std::string& name, int out, int in) {
        return Linear{add(name + ".weight", {out, in}, ParamKind::matrix), out, in};
    };
    auto norm = [&](const std::string& name, int dim) { return Norm{add(name + ".weight", {dim}, ParamKind::gain), dim}; };
    auto ffn = [&](const std::string& p, int width) {
        Ffn f;
        f.gate = linear(p + ".gate_proj", width, c.dim);
        f.up = linear(p + ".up_proj", width, c.dim);
        f.down = linear(p + ".down_proj", c.dim, width);
        return f;
    };
    const int H = c.n_heads, dqk = c.qk_head_dim();
    auto block = [&](int layer) {
        const std::string p = "model.layers." + std::to_string(layer);
        Block b;
        b.attn_norm = norm(p + ".input_layernorm", c.dim);
        Attention& a = b.attn;
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
            m.bias = add(p + ".mlp.gate.e_score_correction_bias", {c.n_routed_experts}, ParamKind::routing_bias);
            in_expert = true;
            for (int e = 0; e < c.n_routed_experts; ++e)
                m.experts.push_back(ffn(p + ".mlp.experts." + std::to_string(e), c.moe_inter_dim));
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
    for (int k = 0; k < c.n_mtp_depth; ++k) {  // stored as the layers after the main ones: model.layers.{n_layers+k}
        mtp_index = k;
        const std::string p = "model.layers." + std::to_string(c.n_layers + k);
        MtpModule m;
        m.enorm = norm(p + ".enorm", c.dim);
        m.hnorm = norm(p + ".hnorm", c.dim);
        m.eh_proj = linear(p + ".eh_proj", c.dim, 2 * c.dim);
        m.block = block(c.n_layers + k);
        m.norm = norm(p + ".shared_head.norm", c.dim);
        L.mtp.push_back(m);
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

// --- 3.8 the MoE router [V3 §2.1.2, eqs. 13-16] ------------------------------------------------------------------
// scores s_{i,t} = σ(u_tᵀ e_i) (sigmoid; V2 used softmax over experts). Selection uses the biased score s + b, in
// two stages: the N_r experts form n_group groups, a group's score is the sum of its two best biased scores (max for
// softmax routing), only the topk_group best groups stay, and the top-K experts among them are chosen. The gates use
// the UNBIASED scores: g_i = s_i / Σ_{j chosen} s_j (normalised, eq. 13), times route_scale. The bias therefore steers
// which experts are chosen without changing how much they contribute — the point of loss-free balancing.
// logits, scores: [T, N]; bias: [N] (may be null); chosen: [T, K] expert ids (ascending by rank); gates: [T, K].
inline void router_scores_forward(float* scores, const float* logits, int T, int N, bool softmax) {
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
                for (int i = 0; i < per_group; ++i) biased[size_t(group_score[size_t(r)].second * per_group + i)] = -INFINITY;
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
    double total = 0;
    for (double v : per_seq) total += v;
    return total / B;
}
// The classic expert-level auxiliary loss (DeepSeekMoE eqs. 12-14, GShard form) over the whole batch of T tokens:
//   f_i = N_r/(K·T) Σ_t 1[i ∈ TopK_t],  P_i = (1/T) Σ_t p_{i,t} with p = softmax(logits),  L = α Σ_i f_i P_i
// The gradient goes straight to the router logits: ∂L/∂z_{i,t} = p_i (c_i − Σ_j c_j p_j), c_i = α f_i / T.
inline double expert_balance_loss(float* dlogits, const float* logits, const int32_t* chosen, int T, const Config& c,
                                  float alpha) {
    const int N = c.n_routed_experts, K = c.n_activated_experts;
    std::vector<double> f(static_cast<size_t>(N), 0.0);
    for (int64_t i = 0; i < int64_t(T) * K; ++i) f[size_t(chosen[i])] += double(N) / (double(K) * T);
    std::vector<double> P_partial(static_cast<size_t>(T) * N);
    parallel_for(T, [&](int64_t t) {
        const float* z = logits + t * N;
        float mx = z[0];
        for (int i = 1; i < N; ++i) mx = std::max(mx, z[i]);
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

// --- 3.10 MoE permutation ---------------------------------------------------------------------------------------
// Tokens are grouped by expert with a counting sort (stable: within an expert, tokens keep their order), so each
// expert runs one dense matmul over its rows. slot[t·K + k] = row of (token t, choice k) in the permuted order;
// token_of[row] = t; offsets[e] .. offsets[e+1] are expert e's rows.
struct MoePermutation {
    std::vector<int32_t> slot, token_of;
    std::vector<int64_t> offsets, counts;
};
inline void moe_permute_plan(MoePermutation& p, const int32_t* chosen, int T, int K, int N) {
    p.counts.assign(size_t(N), 0);
    for (int64_t i = 0; i < int64_t(T) * K; ++i) p.counts[size_t(chosen[i])]++;
    p.offsets.assign(size_t(N) + 1, 0);
    for (int e = 0; e < N; ++e) p.offsets[size_t(e) + 1] = p.offsets[size_t(e)] + p.counts[size_t(e)];
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
    parallel_for(int64_t(p.token_of.size()), [&](int64_t r) {
        std::memcpy(xe + r * d, x + int64_t(p.token_of[size_t(r)]) * d, sizeof(float) * size_t(d));
    });
}
// dx[t] += Σ_k dxe[slot[t,k]]  (k in order: deterministic)
inline void moe_permute_backward(float* dx, const float* dxe, const MoePermutation& p, int T, int K, int d) {
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
    parallel_for(T, [&](int64_t t) {
        for (int k = 0; k < K; ++k) {
            const float g = gates[t * K + k];
            const float* src = ye + int64_t(p.slot[size_t(t) * K + k]) * d;
            for (int i = 0; i < d; ++i) y[t * d + i] += g * src[i];
        }
    });
}
// dye[slot] = gates · dy[t];  dgates[t,k] += dy[t] · ye[slot]
inline void moe_unpermute_backward(float* dye, float* dgates, const float* dy, const float* ye, const float* gates,
                                   const MoePermutation& p, int T, int K, int d) {
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

// --- 3.11 AdamW (Loshchilov & Hutter 2019) ------------------------------------------------------------------------
// m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  p ← p − lr·( m̂/(√v̂ + ε) + wd·p ), m̂, v̂ bias-corrected by step.
inline void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                         float eps, float weight_decay, int step) {
    const float c1 = 1.0f / (1.0f - std::pow(beta1, float(step))), c2 = 1.0f / (1.0f - std::pow(beta2, float(step)));
    parallel_for((n + 4095) / 4096, [&](int64_t c) {
        for (int64_t i = c * 4096, e = std::min(n, i + 4096); i < e; ++i) {
            m[i] = beta1 * m[i] + (1 - beta1) * g[i];
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i];
            p[i] -= lr * (m[i] * c1 / (std::sqrt(v[i] * c2) + eps) + weight_decay * p[i]);
        }
    });
}

// =====================================================================================================================
// 5. MODULES: MLA, FFN, MoE, BLOCK, MTP, MODEL
// =====================================================================================================================
// The model logic is written once here, as forward/backward pairs that compose the kernels of section 3. Each
// forward saves what its backward needs in a cache (pointers into the activation arena).

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

struct AttnCache {
    const float* x = nullptr;        // [BT, d]  the block's normalised input
    float *cq = nullptr, *cq_rstd = nullptr, *cq_n = nullptr;  // [BT, d_c'], [BT], [BT, d_c']   (query LoRA)
    float* q = nullptr;              // [BT, H, d_h + d_h^R]  queries, RoPE applied to the last d_h^R of each head
    float *ckv_raw = nullptr, *ckv_rstd = nullptr, *ckv = nullptr;  // [BT, d_c]: c^KV before/after its RMSNorm
    float* k_rope = nullptr;         // [BT, d_h^R]  k^R: RoPE(W^KR h), ONE key part shared by all heads
    float* kv = nullptr;             // [BT, H, d_h + d_v]  W^UKV c^KV
    float *k = nullptr, *v = nullptr;// [BT, H, d_h + d_h^R], [BT, H, d_v]
    float* probs = nullptr;          // [B, H, T, T]
    float* o = nullptr;              // [BT, H·d_v]
};
struct FfnCache {
    const float* x = nullptr;        // [n, d]
    float *gate = nullptr, *up = nullptr, *h = nullptr;  // [n, width]
};
struct MoeCache {
    const float* x = nullptr;        // [BT, d]
    float *logits = nullptr, *scores = nullptr, *gates = nullptr;  // [BT, N_r], [BT, N_r], [BT, K]
    std::vector<int32_t> chosen;     // [BT, K]
    MoePermutation perm;
    float *xe = nullptr, *ye = nullptr;  // [BT·K, d] tokens in expert order, and the experts' outputs
    std::vector<FfnCache> experts;
    FfnCache shared;
    std::vector<int64_t> load;       // [N_r] tokens routed to each expert in this batch
};
struct BlockCache {
    const float* h_in = nullptr;     // [BT, d]
    float *xn1 = nullptr, *rstd1 = nullptr, *h_mid = nullptr, *xn2 = nullptr, *rstd2 = nullptr, *h_out = nullptr;
    AttnCache attn;
    FfnCache ffn;
    MoeCache moe;
};
struct MtpCache {
    std::vector<int32_t> emb_tokens, targets;  // [BT]: t_{i+k} and t_{i+k+1} (kIgnore past the end)
    const float* h_prev = nullptr;   // [BT, d]  h^{k-1}
    float *emb = nullptr, *en = nullptr, *en_rstd = nullptr, *hn = nullptr, *hn_rstd = nullptr;
    float *cat = nullptr, *h_proj = nullptr;   // [BT, 2d], [BT, d]
    BlockCache block;
    float *out_n = nullptr, *out_rstd = nullptr, *logits = nullptr;
};

class Model {
  public:
    Config cfg;
    ParamLayout layout;
    std::vector<float> params, grads;  // the two flat buffers
    RopeTable rope;
    bool reuse_routing = false;        // gradient checks: keep the last forward's expert choice fixed

    Model(const Config& c, uint64_t seed) : cfg(c), layout(param_layout(c)) {
        params.assign(layout.total, 0.0f);
        grads.assign(layout.total, 0.0f);
        rope = make_rope_table(cfg, cfg.max_seq_len);
        for (size_t i = 0; i < layout.entries.size(); ++i) {  // each tensor from its own stream: order-independent
            const ParamEntry& e = layout.entries[i];
            Rng rng = Rng(seed).fork(i);
            float* p = params.data() + e.offset;
            for (size_t j = 0; j < e.size; ++j)
                p[j] = e.kind == ParamKind::matrix ? float(rng.normal() * cfg.init_std)
                                                   : (e.kind == ParamKind::gain ? 1.0f : 0.0f);
        }
        blocks_.resize(layout.blocks.size());
        mtp_.resize(layout.mtp.size());
    }
    float* P(size_t offset) { return params.data() + offset; }
    float* G(size_t offset) { return grads.data() + offset; }

    // tokens: [B, T+1]: position t of row b reads token t and predicts token t+1.
    Losses forward(const int32_t* tokens, int B, int T, const LossOptions& opt = {});
    // Gradients of the last forward's total loss, written into `grads` (zeroed first).
    void backward();
    Losses forward_backward(const int32_t* tokens, int B, int T, const LossOptions& opt = {}) {
        Losses l = forward(tokens, B, T, opt);
        backward();
        return l;
    }
    const float* logits() const { return logits_; }  // [B·T, vocab] of the last forward
    // Expert loads of the last forward, one vector [N_r] per MoE block (main blocks first, then MTP blocks).
    std::vector<std::vector<int64_t>> expert_loads() const {
        std::vector<std::vector<int64_t>> loads;
        for (size_t l = 0; l < blocks_.size(); ++l)
            if (layout.blocks[l].is_moe) loads.push_back(blocks_[l].moe.load);
        for (size_t k = 0; k < mtp_.size(); ++k)
            if (layout.mtp[k].block.is_moe) loads.push_back(mtp_[k].block.moe.load);
        return loads;
    }
    std::vector<Block*> moe_blocks() {
        std::vector<Block*> out;
        for (Block& b : layout.blocks)
            if (b.is_moe) out.push_back(&b);
        for (MtpModule& m : layout.mtp)
            if (m.block.is_moe) out.push_back(&m.block);
        return out;
    }

  private:
    Arena arena_;
    int B_ = 0, T_ = 0;
    LossOptions opt_;
    std::vector<int32_t> inputs_, targets_;
    float *h0_ = nullptr, *hn_ = nullptr, *final_rstd_ = nullptr, *logits_ = nullptr;
    std::vector<BlockCache> blocks_;
    std::vector<MtpCache> mtp_;
    bool has_forward_ = false;

    int BT() const { return B_ * T_; }
    void linear_forward(float* y, const float* x, const Linear& w, int n) { matmul_forward(y, x, P(w.w), n, w.in, w.out); }
    void linear_backward(float* dx, const float* dy, const float* x, const Linear& w, int n) {
        matmul_backward(dx, G(w.w), dy, x, P(w.w), n, w.in, w.out);
    }
    void norm_forward(float* y, float* rstd, const float* x, const Norm& n, int rows) {
        rmsnorm_forward(y, rstd, x, P(n.g), rows, n.dim, cfg.rms_norm_eps);
    }
    void norm_backward(float* dx, const float* dy, const float* x, const float* rstd, const Norm& n, int rows) {
        rmsnorm_backward(dx, G(n.g), dy, x, P(n.g), rstd, rows, n.dim);
    }

    void attention_forward_(AttnCache& c, const Attention& a, const float* x, float* out);
    void attention_backward_(const AttnCache& c, const Attention& a, const float* dout, float* dx);
    void ffn_forward_(FfnCache& c, const Ffn& f, const float* x, float* out, int n);
    void ffn_backward_(const FfnCache& c, const Ffn& f, const float* dout, float* dx, int n);
    void moe_forward_(MoeCache& c, const MoE& m, const float* x, float* out, double* balance);
    void moe_backward_(MoeCache& c, const MoE& m, const float* dout, float* dx);
    void block_forward_(BlockCache& c, const Block& b, const float* h_in, double* balance);
    void block_backward_(BlockCache& c, const Block& b, const float* dh_out, float* dh_in);
};

// --- 5.1 Multi-head Latent Attention [V3 §2.1.1] -----------------------------------------------------------------
// Keys and values are compressed jointly into a small latent c^KV (eq. 1), from which per-head keys and values are
// up-projected (eqs. 2, 5); only c^KV and the decoupled RoPE key k^R (eq. 3, shared by all heads) would be cached
// at inference. Queries get a low-rank compression too (eqs. 6-8), which saves activation memory in training.
inline void Model::attention_forward_(AttnCache& c, const Attention& a, const float* x, float* out) {
    const int n = BT(), H = cfg.n_heads, dh = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim,
              dqk = cfg.qk_head_dim(), dv = cfg.v_head_dim, dc = cfg.kv_lora_rank;
    c.x = x;
    // queries: q = W^UQ RMSNorm(W^DQ h)  (eqs. 6-7), then RoPE on each head's last d_h^R values (eq. 8)
    c.q = arena_.take(size_t(n) * H * dqk);
    if (cfg.q_lora_rank > 0) {
        c.cq = arena_.take(size_t(n) * cfg.q_lora_rank);
        c.cq_rstd = arena_.take(size_t(n));
        c.cq_n = arena_.take(size_t(n) * cfg.q_lora_rank);
        linear_forward(c.cq, x, a.q_a, n);
        norm_forward(c.cq_n, c.cq_rstd, c.cq, a.q_norm, n);
        linear_forward(c.q, c.cq_n, a.q_b, n);
    } else {
        linear_forward(c.q, x, a.q, n);
    }
    rope_forward(c.q, n, H * dqk, dh, H, dqk, 0, T_, rope);
    // keys and values: [c^KV ; k^R_raw] = [W^DKV ; W^KR] h  (eqs. 1, 3), c^KV normalised, k^R rotated
    float* kv_a = arena_.take(size_t(n) * (dc + dr));
    linear_forward(kv_a, x, a.kv_a, n);
    c.ckv_raw = arena_.take(size_t(n) * dc);
    c.k_rope = arena_.take(size_t(n) * dr);
    parallel_for(n, [&](int64_t t) {
        std::memcpy(c.ckv_raw + t * dc, kv_a + t * (dc + dr), sizeof(float) * size_t(dc));
        std::memcpy(c.k_rope + t * dr, kv_a + t * (dc + dr) + dc, sizeof(float) * size_t(dr));
    });
    c.ckv_rstd = arena_.take(size_t(n));
    c.ckv = arena_.take(size_t(n) * dc);
    norm_forward(c.ckv, c.ckv_rstd, c.ckv_raw, a.kv_norm, n);
    rope_forward(c.k_rope, n, dr, 0, 1, dr, 0, T_, rope);
    // per-head [k^C ; v] = W^UKV c^KV (eqs. 2, 5); k = [k^C ; k^R] (eq. 4)
    c.kv = arena_.take(size_t(n) * H * (dh + dv));
    linear_forward(c.kv, c.ckv, a.kv_b, n);
    c.k = arena_.take(size_t(n) * H * dqk);
    c.v = arena_.take(size_t(n) * H * dv);
    parallel_for(n, [&](int64_t t) {
        for (int h = 0; h < H; ++h) {
            const float* src = c.kv + (t * H + h) * (dh + dv);
            float* k = c.k + (t * H + h) * dqk;
            std::memcpy(k, src, sizeof(float) * size_t(dh));
            std::memcpy(k + dh, c.k_rope + t * dr, sizeof(float) * size_t(dr));
            std::memcpy(c.v + (t * H + h) * dv, src + dh, sizeof(float) * size_t(dv));
        }
    });
    // o = softmax(q kᵀ · scale) v per head (eqs. 9-10), u = W^O o (eq. 11)
    c.probs = arena_.take(size_t(B_) * H * T_ * T_);
    c.o = arena_.take(size_t(n) * H * dv);
    attention_forward(c.o, c.probs, c.q, c.k, c.v, B_, T_, H, dqk, dv, attention_scale(cfg));
    linear_forward(out, c.o, a.o, n);
}

inline void Model::attention_backward_(const AttnCache& c, const Attention& a, const float* dout, float* dx) {
    const int n = BT(), H = cfg.n_heads, dh = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim,
              dqk = cfg.qk_head_dim(), dv = cfg.v_head_dim, dc = cfg.kv_lora_rank;
    Arena::Mark mark = arena_.mark();
    float* d_o = arena_.zeros(size_t(n) * H * dv);
    linear_backward(d_o, dout, c.o, a.o, n);
    float* dq = arena_.zeros(size_t(n) * H * dqk);
    float* dk = arena_.zeros(size_t(n) * H * dqk);
    float* dvv = arena_.zeros(size_t(n) * H * dv);
    attention_backward(dq, dk, dvv, d_o, c.probs, c.q, c.k, c.v, B_, T_, H, dqk, dv, attention_scale(cfg));
    // un-assemble k and v: d(kv) per head, and the shared rope key sums its heads' gradients
    float* dkv = arena_.take(size_t(n) * H * (dh + dv));
    float* dkv_a = arena_.take(size_t(n) * (dc + dr));
    float* dk_rope = arena_.zeros(size_t(n) * dr);
    parallel_for(n, [&](int64_t t) {
        for (int h = 0; h < H; ++h) {
            float* dst = dkv + (t * H + h) * (dh + dv);
            const float* dkh = dk + (t * H + h) * dqk;
            std::memcpy(dst, dkh, sizeof(float) * size_t(dh));
            std::memcpy(dst + dh, dvv + (t * H + h) * dv, sizeof(float) * size_t(dv));
            for (int i = 0; i < dr; ++i) dk_rope[t * dr + i] += dkh[dh + i];
        }
    });
    float* dckv = arena_.zeros(size_t(n) * dc);
    linear_backward(dckv, dkv, c.ckv, a.kv_b, n);
    rope_backward(dk_rope, n, dr, 0, 1, dr, 0, T_, rope);
    float* dckv_raw = arena_.zeros(size_t(n) * dc);
    norm_backward(dckv_raw, dckv, c.ckv_raw, c.ckv_rstd, a.kv_norm, n);
    parallel_for(n, [&](int64_t t) {
        std::memcpy(dkv_a + t * (dc + dr), dckv_raw + t * dc, sizeof(float) * size_t(dc));
        std::memcpy(dkv_a + t * (dc + dr) + dc, dk_rope + t * dr, sizeof(float) * size_t(dr));
    });
    linear_backward(dx, dkv_a, c.x, a.kv_a, n);
    rope_backward(dq, n, H * dqk, dh, H, dqk, 0, T_, rope);
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
inline void Model::ffn_forward_(FfnCache& c, const Ffn& f, const float* x, float* out, int n) {
    const int w = f.gate.out;
    c.x = x;
    c.gate = arena_.take(size_t(n) * w);
    c.up = arena_.take(size_t(n) * w);
    c.h = arena_.take(size_t(n) * w);
    linear_forward(c.gate, x, f.gate, n);
    linear_forward(c.up, x, f.up, n);
    swiglu_forward(c.h, c.gate, c.up, int64_t(n) * w);
    linear_forward(out, c.h, f.down, n);
}
inline void Model::ffn_backward_(const FfnCache& c, const Ffn& f, const float* dout, float* dx, int n) {
    const int w = f.gate.out;
    Arena::Mark mark = arena_.mark();
    float* dh = arena_.zeros(size_t(n) * w);
    linear_backward(dh, dout, c.h, f.down, n);
    float* dgate = arena_.zeros(size_t(n) * w);
    float* dup = arena_.zeros(size_t(n) * w);
    swiglu_backward(dgate, dup, dh, c.gate, c.up, int64_t(n) * w);
    linear_backward(dx, dgate, c.x, f.gate, n);
    linear_backward(dx, dup, c.x, f.up, n);
    arena_.release(mark);
}

// --- 5.3 DeepSeekMoE [V3 §2.1.2, eq. 12]: h' = u + Σ_shared FFN_s(u) + Σ_routed g_i FFN_i(u) ----------------------
inline void Model::moe_forward_(MoeCache& c, const MoE& m, const float* x, float* out, double* balance) {
    const int n = BT(), N = cfg.n_routed_experts, K = cfg.n_activated_experts, d = cfg.dim;
    const bool softmax = cfg.score_func == "softmax";
    c.x = x;
    c.logits = arena_.take(size_t(n) * N);
    c.scores = arena_.take(size_t(n) * N);
    c.gates = arena_.take(size_t(n) * K);
    linear_forward(c.logits, x, m.router, n);
    router_scores_forward(c.scores, c.logits, n, N, softmax);
    if (!reuse_routing || c.chosen.size() != size_t(n) * K) {
        c.chosen.resize(size_t(n) * K);
        router_select(c.chosen.data(), c.scores, P(m.bias), n, cfg);
    }
    router_gates_forward(c.gates, c.scores, c.chosen.data(), n, cfg);
    moe_permute_plan(c.perm, c.chosen.data(), n, K, N);
    c.load = c.perm.counts;
    if (opt_.balance == BalanceLoss::sequence_wise)
        *balance += sequence_balance_loss(nullptr, c.scores, c.chosen.data(), B_, T_, cfg, opt_.balance_alpha);
    else if (opt_.balance == BalanceLoss::expert_level)
        *balance += expert_balance_loss(nullptr, c.logits, c.chosen.data(), n, cfg, opt_.balance_alpha);
    // routed experts: gather each expert's tokens, run its SwiGLU on them, scatter back weighted by the gates
    c.xe = arena_.take(size_t(n) * K * d);
    c.ye = arena_.take(size_t(n) * K * d);
    moe_permute_forward(c.xe, x, c.perm, d);
    c.experts.resize(size_t(N));
    for (int e = 0; e < N; ++e) {
        const int64_t begin = c.perm.offsets[size_t(e)], rows = c.perm.counts[size_t(e)];
        if (rows > 0) ffn_forward_(c.experts[size_t(e)], m.experts[size_t(e)], c.xe + begin * d, c.ye + begin * d, int(rows));
    }
    if (m.has_shared) ffn_forward_(c.shared, m.shared, x, out, n);
    else std::memset(out, 0, sizeof(float) * size_t(n) * d);
    moe_unpermute_forward(out, c.ye, c.gates, c.perm, n, K, d);
}

inline void Model::moe_backward_(MoeCache& c, const MoE& m, const float* dout, float* dx) {
    const int n = BT(), N = cfg.n_routed_experts, K = cfg.n_activated_experts, d = cfg.dim;
    const bool softmax = cfg.score_func == "softmax";
    Arena::Mark mark = arena_.mark();
    if (m.has_shared) ffn_backward_(c.shared, m.shared, dout, dx, n);
    float* dye = arena_.take(size_t(n) * K * d);
    float* dgates = arena_.zeros(size_t(n) * K);
    moe_unpermute_backward(dye, dgates, dout, c.ye, c.gates, c.perm, n, K, d);
    float* dxe = arena_.zeros(size_t(n) * K * d);
    for (int e = 0; e < N; ++e) {
        const int64_t begin = c.perm.offsets[size_t(e)], rows = c.perm.counts[size_t(e)];
        if (rows > 0)
            ffn_backward_(c.experts[size_t(e)], m.experts[size_t(e)], dye + begin * d, dxe + begin * d, int(rows));
    }
    moe_permute_backward(dx, dxe, c.perm, n, K, d);
    // router: gates -> scores (-> + sequence-wise loss) -> logits (+ expert-level loss) -> W_router and x
    float* dscores = arena_.zeros(size_t(n) * N);
    router_gates_backward(dscores, dgates, c.scores, c.chosen.data(), n, cfg);
    if (opt_.balance == BalanceLoss::sequence_wise)
        sequence_balance_loss(dscores, c.scores, c.chosen.data(), B_, T_, cfg, opt_.balance_alpha);
    float* dlogits = arena_.zeros(size_t(n) * N);
    router_scores_backward(dlogits, dscores, c.scores, n, N, softmax);
    if (opt_.balance == BalanceLoss::expert_level)
        expert_balance_loss(dlogits, c.logits, c.chosen.data(), n, cfg, opt_.balance_alpha);
    linear_backward(dx, dlogits, c.x, m.router, n);
    arena_.release(mark);
}

// --- 5.4 the pre-norm block: h ← h + Attn(RMSNorm(h)); h ← h + FFN(RMSNorm(h)) ------------------------------------
inline void Model::block_forward_(BlockCache& c, const Block& b, const float* h_in, double* balance) {
    const int n = BT(), d = cfg.dim;
    c.h_in = h_in;
    c.xn1 = arena_.take(size_t(n) * d);
    c.rstd1 = arena_.take(size_t(n));
    norm_forward(c.xn1, c.rstd1, h_in, b.attn_norm, n);
    c.h_mid = arena_.take(size_t(n) * d);
    attention_forward_(c.attn, b.attn, c.xn1, c.h_mid);
    parallel_for(n, [&](int64_t t) { for (int i = 0; i < d; ++i) c.h_mid[t * d + i] += h_in[t * d + i]; });
    c.xn2 = arena_.take(size_t(n) * d);
    c.rstd2 = arena_.take(size_t(n));
    norm_forward(c.xn2, c.rstd2, c.h_mid, b.ffn_norm, n);
    c.h_out = arena_.take(size_t(n) * d);
    if (b.is_moe) moe_forward_(c.moe, b.moe, c.xn2, c.h_out, balance);
    else ffn_forward_(c.ffn, b.ffn, c.xn2, c.h_out, n);
    parallel_for(n, [&](int64_t t) { for (int i = 0; i < d; ++i) c.h_out[t * d + i] += c.h_mid[t * d + i]; });
}
// dh_in (+=) from dh_out.
inline void Model::block_backward_(BlockCache& c, const Block& b, const float* dh_out, float* dh_in) {
    const int n = BT(), d = cfg.dim;
    Arena::Mark mark = arena_.mark();
    float* dxn2 = arena_.zeros(size_t(n) * d);
    if (b.is_moe) moe_backward_(c.moe, b.moe, dh_out, dxn2);
    else ffn_backward_(c.ffn, b.ffn, dh_out, dxn2, n);
    float* dh_mid = arena_.take(size_t(n) * d);
    std::memcpy(dh_mid, dh_out, sizeof(float) * size_t(n) * d);
    norm_backward(dh_mid, dxn2, c.h_mid, c.rstd2, b.ffn_norm, n);
    float* dxn1 = arena_.zeros(size_t(n) * d);
    attention_backward_(c.attn, b.attn, dh_mid, dxn1);
    parallel_for(n, [&](int64_t t) { for (int i = 0; i < d; ++i) dh_in[t * d + i] += dh_mid[t * d + i]; });
    norm_backward(dh_in, dxn1, c.h_in, c.rstd1, b.attn_norm, n);
    arena_.release(mark);
}

// --- 5.5 the model, with Multi-Token Prediction [V3 §2.2] -----------------------------------------------------------
// Main model: embedding, blocks, final RMSNorm, output head, cross-entropy on the next token.
// MTP module k (k = 1..D) at position i: h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)] (eq. 21),
// h^k = TRM_k(h'^k) (eq. 22), P^k_{i+k+1} = OutHead(h^k_i) (eq. 23), sharing the embedding and the output head with
// the main model. Positions whose token t_{i+k} or target t_{i+k+1} lies past the end of the row are ignored (the
// causal mask keeps the filler there from reaching earlier positions).
inline Losses Model::forward(const int32_t* tokens, int B, int T, const LossOptions& opt) {
    if (B <= 0 || T <= 0) fail("Model::forward: batch ", B, " x sequence ", T, ": both must be > 0");
    if (T > cfg.max_seq_len) fail("Model::forward: sequence length ", T, " exceeds Config.max_seq_len ", cfg.max_seq_len);
    B_ = B; T_ = T; opt_ = opt;
    const int n = BT(), d = cfg.dim, V = cfg.vocab_size;
    arena_.reset();
    inputs_.resize(size_t(n));
    targets_.resize(size_t(n));
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) {
            inputs_[size_t(b) * T + t] = tokens[int64_t(b) * (T + 1) + t];
            targets_[size_t(b) * T + t] = tokens[int64_t(b) * (T + 1) + t + 1];
        }
    Losses loss;
    h0_ = arena_.take(size_t(n) * d);
    embedding_forward(h0_, inputs_.data(), P(layout.embed), n, d, V);
    const float* h = h0_;
    for (size_t l = 0; l < layout.blocks.size(); ++l) {
        block_forward_(blocks_[l], layout.blocks[l], h, &loss.balance);
        h = blocks_[l].h_out;
    }
    hn_ = arena_.take(size_t(n) * d);
    final_rstd_ = arena_.take(size_t(n));
    norm_forward(hn_, final_rstd_, h, layout.final_norm, n);
    logits_ = arena_.take(size_t(n) * V);
    linear_forward(logits_, hn_, layout.head, n);
    loss.main = cross_entropy_forward(logits_, targets_.data(), n, V);
    loss.total = loss.main;
    const int D = opt.with_mtp ? int(layout.mtp.size()) : 0;
    for (int k = 1; k <= D; ++k) {
        MtpCache& c = mtp_[size_t(k - 1)];
        const MtpModule& m = layout.mtp[size_t(k - 1)];
        c.emb_tokens.resize(size_t(n));
        c.targets.resize(size_t(n));
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < T; ++i) {
                const int64_t row = int64_t(b) * (T + 1);
                c.emb_tokens[size_t(b) * T + i] = tokens[row + std::min(i + k, T)];
                c.targets[size_t(b) * T + i] = i + k + 1 <= T ? tokens[row + i + k + 1] : kIgnore;
            }
        c.h_prev = h;
        c.emb = arena_.take(size_t(n) * d);
        embedding_forward(c.emb, c.emb_tokens.data(), P(layout.embed), n, d, V);
        c.en = arena_.take(size_t(n) * d); c.en_rstd = arena_.take(size_t(n));
        c.hn = arena_.take(size_t(n) * d); c.hn_rstd = arena_.take(size_t(n));
        norm_forward(c.en, c.en_rstd, c.emb, m.enorm, n);
        norm_forward(c.hn, c.hn_rstd, h, m.hnorm, n);
        c.cat = arena_.take(size_t(n) * 2 * d);
        parallel_for(n, [&](int64_t t) {
            std::memcpy(c.cat + t * 2 * d, c.en + t * d, sizeof(float) * size_t(d));
            std::memcpy(c.cat + t * 2 * d + d, c.hn + t * d, sizeof(float) * size_t(d));
        });
        c.h_proj = arena_.take(size_t(n) * d);
        linear_forward(c.h_proj, c.cat, m.eh_proj, n);
        block_forward_(c.block, m.block, c.h_proj, &loss.balance);
        h = c.block.h_out;
        c.out_n = arena_.take(size_t(n) * d);
        c.out_rstd = arena_.take(size_t(n));
        norm_forward(c.out_n, c.out_rstd, h, m.norm, n);
        c.logits = arena_.take(size_t(n) * V);
        linear_forward(c.logits, c.out_n, layout.head, n);
        loss.mtp.push_back(cross_entropy_forward(c.logits, c.targets.data(), n, V));
        loss.total += opt.mtp_lambda / D * loss.mtp.back();
    }
    loss.total += loss.balance;
    has_forward_ = true;
    return loss;
}

inline void Model::backward() {
    if (!has_forward_) fail("Model::backward: call forward first");
    const int n = BT(), d = cfg.dim, V = cfg.vocab_size;
    std::fill(grads.begin(), grads.end(), 0.0f);
    Arena::Mark mark = arena_.mark();
    const int D = opt_.with_mtp ? int(layout.mtp.size()) : 0;
    // dh_top: gradient w.r.t. the output of the last main block; MTP modules add into it through hnorm.
    float* dh_top = arena_.zeros(size_t(n) * d);
    float* dlogits = arena_.take(size_t(n) * V);
    float* dnorm = arena_.take(size_t(n) * d);
    float* dh_next = nullptr;  // gradient flowing into h^k from module k+1
    for (int k = D; k >= 1; --k) {
        MtpCache& c = mtp_[size_t(k - 1)];
        const MtpModule& m = layout.mtp[size_t(k - 1)];
        std::memset(dlogits, 0, sizeof(float) * size_t(n) * V);
        cross_entropy_backward(dlogits, c.logits, c.targets.data(), n, V, opt_.mtp_lambda / D);
        std::memset(dnorm, 0, sizeof(float) * size_t(n) * d);
        linear_backward(dnorm, dlogits, c.out_n, layout.head, n);
        float* dh = arena_.zeros(size_t(n) * d);
        if (dh_next) std::memcpy(dh, dh_next, sizeof(float) * size_t(n) * d);
        norm_backward(dh, dnorm, c.block.h_out, c.out_rstd, m.norm, n);
        float* dproj = arena_.zeros(size_t(n) * d);
        block_backward_(c.block, m.block, dh, dproj);
        float* dcat = arena_.zeros(size_t(n) * 2 * d);
        linear_backward(dcat, dproj, c.cat, m.eh_proj, n);
        float* den = arena_.take(size_t(n) * d);
        float* dhn = arena_.take(size_t(n) * d);
        parallel_for(n, [&](int64_t t) {
            std::memcpy(den + t * d, dcat + t * 2 * d, sizeof(float) * size_t(d));
            std::memcpy(dhn + t * d, dcat + t * 2 * d + d, sizeof(float) * size_t(d));
        });
        float* demb = arena_.zeros(size_t(n) * d);
        norm_backward(demb, den, c.emb, c.en_rstd, m.enorm, n);
        embedding_backward(G(layout.embed), demb, c.emb_tokens.data(), n, d);
        float* dprev = k == 1 ? dh_top : arena_.zeros(size_t(n) * d);
        norm_backward(dprev, dhn, c.h_prev, c.hn_rstd, m.hnorm, n);
        dh_next = dprev;
    }
    // main head
    std::memset(dlogits, 0, sizeof(float) * size_t(n) * V);
    cross_entropy_backward(dlogits, logits_, targets_.data(), n, V, 1.0f);
    std::memset(dnorm, 0, sizeof(float) * size_t(n) * d);
    linear_backward(dnorm, dlogits, hn_, layout.head, n);
    const float* h_last = layout.blocks.empty() ? h0_ : blocks_.back().h_out;
    norm_backward(dh_top, dnorm, h_last, final_rstd_, layout.final_norm, n);
    float* dh = dh_top;
    for (size_t l = layout.blocks.size(); l-- > 0;) {
        float* dh_in = arena_.zeros(size_t(n) * d);
        block_backward_(blocks_[l], layout.blocks[l], dh, dh_in);
        dh = dh_in;
    }
    embedding_backward(G(layout.embed), dh, inputs_.data(), n, d);
    arena_.release(mark);
}

// =====================================================================================================================
// 6. TRAINING [V3 §4.2]
// =====================================================================================================================

// --- 6.1 learning-rate schedules ----------------------------------------------------------------------------------
// kind cosine:     linear warmup to max_lr, then cosine decay to min_lr at the last step (the usual small-model choice).
// kind v3:         V3 §4.2: linear warmup, constant until constant_until·steps, cosine to min_lr until
//                  decay_until·steps, then constant min_lr (V3 ends with two constant stages; one is kept here).
// kind multi_step: DeepSeek LLM (arXiv 2401.02954 §3.1): warmup, max_lr until 80% of the steps, 31.6% of it until
//                  90%, then 10%.
struct LrSchedule {
    enum Kind { cosine, v3, multi_step } kind = cosine;
    float max_lr = 1e-3f, min_lr = 1e-4f;
    int warmup_steps = 100, total_steps = 1000;
    float constant_until = 0.5f, decay_until = 0.9f;  // kind v3, as fractions of total_steps
    float at(int step) const {  // step counts from 0
        if (step < warmup_steps) return max_lr * float(step + 1) / float(warmup_steps);
        const float x = float(step) / float(std::max(total_steps, 1));
        auto cosine_between = [&](float from, float to) {
            float r = std::clamp((x - from) / std::max(to - from, 1e-9f), 0.0f, 1.0f);
            return min_lr + 0.5f * (max_lr - min_lr) * (1.0f + std::cos(float(M_PI) * r));
        };
        switch (kind) {
            case cosine: return cosine_between(float(warmup_steps) / float(std::max(total_steps, 1)), 1.0f);
            case v3: return x < constant_until ? max_lr : cosine_between(constant_until, decay_until);
            case multi_step: return x < 0.8f ? max_lr : (x < 0.9f ? 0.316f * max_lr : 0.1f * max_lr);
        }
        return max_lr;
    }
};

// --- 6.2 optimizer state, clipping, AdamW ------------------------------------------------------------------------
struct AdamW {
    float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;  // V3 §4.2
    float clip_norm = 1.0f;                                               // global-norm clipping (0: off)
    std::vector<float> m, v;                                              // moments, same layout as params
    int step = 0;
};

// Global L2 norm of the flat gradient, summed in a fixed order.
inline double gradient_norm(const std::vector<float>& g) {
    return std::sqrt(parallel_sum(int64_t(g.size()), [&](int64_t i) { return double(g[size_t(i)]) * g[size_t(i)]; }));
}

// Clip, then one AdamW step on every trainable tensor: weight decay on matrices only (not on norm gains), and the
// routing bias is left alone (it has no gradient; see update_routing_bias). Returns the norm before clipping.
inline double adamw_step(Model& model, AdamW& opt, float lr) {
    if (opt.m.size() != model.params.size()) {
        opt.m.assign(model.params.size(), 0.0f);
        opt.v.assign(model.params.size(), 0.0f);
    }
    const double norm = gradient_norm(model.grads);
    if (!std::isfinite(norm)) fail("adamw_step: gradient norm is ", norm, " (non-finite): the step was not applied");
    if (opt.clip_norm > 0 && norm > opt.clip_norm) {
        const float s = float(opt.clip_norm / norm);
        for (float& g : model.grads) g *= s;
    }
    ++opt.step;
    for (const ParamEntry& e : model.layout.entries) {
        if (e.kind == ParamKind::routing_bias) continue;
        const float wd = e.kind == ParamKind::matrix ? opt.weight_decay : 0.0f;
        adamw_update(model.params.data() + e.offset, model.grads.data() + e.offset, opt.m.data() + e.offset,
                     opt.v.data() + e.offset, int64_t(e.size), lr, opt.beta1, opt.beta2, opt.eps, wd, opt.step);
    }
    return norm;
}

// --- 6.3 auxiliary-loss-free load balancing [V3 §2.1.2; Wang et al. 2024, arXiv 2408.15664] -----------------------
// After each step: b_i ← b_i + γ·sign(c̄ − c_i), c_i = tokens routed to expert i over the whole batch, c̄ their mean.
// Overloaded experts become less attractive to the selection, underloaded ones more, with no gradient interference.
inline void update_routing_bias(Model& model, const std::vector<std::vector<int64_t>>& loads, float gamma) {
    std::vector<Block*> blocks = model.moe_blocks();
    if (loads.size() != blocks.size())
        fail("update_routing_bias: ", loads.size(), " load vectors for ", blocks.size(), " MoE blocks");
    for (size_t l = 0; l < blocks.size(); ++l) {
        const std::vector<int64_t>& c = loads[l];
        double mean = 0;
        for (int64_t x : c) mean += double(x);
        mean /= double(c.size());
        float* b = model.P(blocks[l]->moe.bias);
        for (size_t i = 0; i < c.size(); ++i) b[i] += gamma * float((mean > c[i]) - (mean < c[i]));
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
// --- 6.4 checkpoints --------------------------------------------------------------------------------------------
// A training checkpoint holds everything a resumed run needs to continue bit for bit: the config, the step, the
// parameters (the routing bias included) and AdamW's moments. Text header, then raw little-endian float32:
//     dsv3-checkpoint 1
//     <Config::to_text() lines>
//     step=<optimizer steps taken>
//     floats=<parameter count>
//     end
//     params[floats] m[floats] v[floats]
// It is written to "<path>.tmp" and renamed over <path> only when complete, so a crash never leaves a torn file.
inline void save_checkpoint(const std::string& path, const Model& model, const AdamW& opt) {
    const std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail("checkpoint ", tmp, ": cannot open for writing: ", std::strerror(errno));
    std::ostringstream header;
    header << "dsv3-checkpoint 1\n" << model.cfg.to_text() << "step=" << opt.step << "\nfloats=" << model.params.size()
           << "\nend\n";
    const std::string h = header.str();
    const size_t n = model.params.size();
    std::vector<float> zeros;
    const float* m = opt.m.size() == n ? opt.m.data() : (zeros.assign(n, 0.0f), zeros.data());
    const float* v = opt.v.size() == n ? opt.v.data() : zeros.data();
    bool ok = std::fwrite(h.data(), 1, h.size(), f) == h.size() && std::fwrite(model.params.data(), 4, n, f) == n &&
              std::fwrite(m, 4, n, f) == n && std::fwrite(v, 4, n, f) == n;
    ok = (std::fclose(f) == 0) && ok;
    if (!ok) { std::remove(tmp.c_str()); fail("checkpoint ", tmp, ": write failed (disk full?)"); }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("checkpoint ", path, ": cannot rename from ", tmp);
}
// Reads the config a checkpoint was saved with.
inline Config read_checkpoint_config(const std::string& path, int* step = nullptr, size_t* header_bytes = nullptr) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("checkpoint ", path, ": cannot open: ", std::strerror(errno));
    std::string line;
    auto next_line = [&]() {
        line.clear();
        int ch;
        while ((ch = std::fgetc(f)) != EOF && ch != '\n') {
            line.push_back(char(ch));
            if (line.size() > 4096) { std::fclose(f); fail("checkpoint ", path, ": header line too long (not a checkpoint?)"); }
        }
        return ch != EOF;
    };
    if (!next_line() || line != "dsv3-checkpoint 1") {
        std::fclose(f);
        fail("checkpoint ", path, ": expected first line \"dsv3-checkpoint 1\", found \"", line.substr(0, 40), "\"");
    }
    Config c;
    int steps = -1;
    try {
        while (true) {
            if (!next_line()) fail("checkpoint ", path, ": header ends before its \"end\" line");
            if (line == "end") break;
            const size_t eq = line.find('=');
            if (eq == std::string::npos) fail("checkpoint ", path, ": header line \"", line, "\" is not name=value");
            const std::string name = line.substr(0, eq), value = line.substr(eq + 1);
            if (name == "step") steps = std::stoi(value);
            else if (name != "floats") c.set(name, value, "checkpoint " + path);
        }
    } catch (...) { std::fclose(f); throw; }
    if (header_bytes) *header_bytes = size_t(std::ftell(f));
    std::fclose(f);
    if (steps < 0) fail("checkpoint ", path, ": header has no step= line");
    if (step) *step = steps;
    return c;
}
// Loads parameters and optimizer state into a model built with the same config.
inline void load_checkpoint(const std::string& path, Model& model, AdamW& opt) {
    int step = 0;
    size_t header = 0;
    Config c = read_checkpoint_config(path, &step, &header);
    if (c.to_text() != model.cfg.to_text()) {
        std::istringstream a(c.to_text()), b(model.cfg.to_text());
        std::string la, lb;
        while (std::getline(a, la) && std::getline(b, lb))
            if (la != lb) fail("checkpoint ", path, ": config differs from the model's: checkpoint has ", la, ", model has ", lb);
    }
    const size_t n = model.params.size();
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("checkpoint ", path, ": cannot open: ", std::strerror(errno));
    std::fseek(f, 0, SEEK_END);
    const long size = std::ftell(f);
    if (size != long(header + 3 * n * 4)) {
        std::fclose(f);
        fail("checkpoint ", path, ": expected ", header + 3 * n * 4, " bytes for ", n, " parameters, found ", size);
    }
    std::fseek(f, long(header), SEEK_SET);
    opt.m.resize(n);
    opt.v.resize(n);
    bool ok = std::fread(model.params.data(), 4, n, f) == n && std::fread(opt.m.data(), 4, n, f) == n &&
              std::fread(opt.v.data(), 4, n, f) == n;
    std::fclose(f);
    if (!ok) fail("checkpoint ", path, ": read failed");
    opt.step = step;
}

}  // namespace dsv3
