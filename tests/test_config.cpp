// Config tests: every validate() rule, the presets, the published figures the counters must reproduce, the text
// round trip of Config, and training checkpoints (round trip, errors, atomic replacement).
//
// Tolerances: the counters are integers and are compared exactly with the figures published for DeepSeek-V3
// (V3 report Table 1; Insights into DeepSeek-V3, arXiv 2505.09343, Table 2); the training-FLOPs estimate is a
// double and is compared with its defining formula to 1e-12 relative and with the published "≈ 250 GFLOPs" to 1%;
// V2-Lite's "15.7B" is a rounded figure, checked to ±0.05B.
// Config round trips and checkpoints must be exact (bitwise).
//
// A rule "breaks" when validate() throws dsv3::Error whose message names the field; each case below starts from a
// valid config and changes only what is needed to break that one rule, and also checks a phrase of that rule's
// message, so a case cannot pass by tripping a different rule on the same field.
#include "gradcheck.hpp"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

using namespace dsv3;

namespace {

// The message of the Error that f() throws ("" when it throws nothing; other exception types fail the test).
template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const dsv3::Error& e) {
        return e.what();
    }
    return "";
}

struct Rule {
    const char* name;
    std::function<void(Config&)> broke;
    const char* field;   // must appear in the message
    const char* phrase;  // and so must this part of the rule's wording
};

TEST_CASE("config: all five presets validate") {
    CHECK_NOTHROW(Config::tiny().validate());
    CHECK_NOTHROW(Config::small().validate());
    CHECK_NOTHROW(Config::large().validate());
    // the torchtitan peer's --preset large: about 1.66B parameters (ours count the 15 layers' routing biases too)
    CHECK(count_parameters(Config::large()).total == 1659875264);
    CHECK_NOTHROW(Config::v2_lite().validate());
    CHECK_NOTHROW(Config::v3_671b().validate());
}

TEST_CASE("config: every validate() rule throws an Error naming its field") {
    const float nan = std::nanf("");
    const std::vector<Rule> rules = {
        {"vocab_size > 0", [](Config& c) { c.vocab_size = 0; }, "vocab_size", "> 0"},
        {"dim > 0", [](Config& c) { c.dim = 0; }, "Config.dim:", "> 0"},
        {"n_layers > 0", [](Config& c) { c.n_layers = 0; c.n_dense_layers = 0; }, "n_layers", "> 0"},
        {"n_heads > 0", [](Config& c) { c.n_heads = 0; }, "n_heads", "> 0"},
        {"kv_lora_rank > 0", [](Config& c) { c.kv_lora_rank = 0; }, "kv_lora_rank", "> 0"},
        {"qk_nope_head_dim > 0", [](Config& c) { c.qk_nope_head_dim = 0; }, "qk_nope_head_dim", "> 0"},
        {"qk_rope_head_dim > 0", [](Config& c) { c.qk_rope_head_dim = 0; }, "qk_rope_head_dim", "> 0"},
        {"qk_rope_head_dim even", [](Config& c) { c.qk_rope_head_dim = 15; }, "qk_rope_head_dim", "even"},
        {"v_head_dim > 0", [](Config& c) { c.v_head_dim = 0; }, "v_head_dim", "> 0"},
        {"max_seq_len > 0", [](Config& c) { c.max_seq_len = 0; }, "max_seq_len", "> 0"},
        // upper bounds (huge values that made param_layout's int products overflow, or allocated before any check)
        {"vocab_size bounded", [](Config& c) { c.vocab_size = 1 << 30; }, "vocab_size", "<= 16777216"},
        {"dim bounded", [](Config& c) { c.dim = 1 << 20; }, "Config.dim:", "<= 65536"},
        {"n_heads bounded", [](Config& c) { c.n_heads = 1 << 20; }, "n_heads", "<= 4096"},
        {"v_head_dim bounded", [](Config& c) { c.v_head_dim = 1 << 20; }, "v_head_dim", "<= 4096"},
        {"n_routed_experts bounded", [](Config& c) { c.n_routed_experts = 1 << 20; }, "n_routed_experts", "<= 16384"},
        {"max_seq_len bounded", [](Config& c) { c.max_seq_len = 1 << 30; }, "max_seq_len", "<= 4194304"},
        // 4096 layers of 16384 experts, each bound respected: 200M layout entries (gigabytes) before any check
        {"layers x experts bounded",
         [](Config& c) { c.n_layers = 4096; c.n_routed_experts = 16384; c.n_expert_groups = 1; c.n_limited_groups = 1; },
         "n_routed_experts", "(n_layers + n_mtp_depth) x n_routed_experts must be <= 131072"},
        {"q_lora_rank >= 0", [](Config& c) { c.q_lora_rank = -1; }, "q_lora_rank", ">= 0"},
        {"n_dense_layers >= 0", [](Config& c) { c.n_dense_layers = -1; }, "n_dense_layers", "must be in"},
        {"n_dense_layers <= n_layers", [](Config& c) { c.n_dense_layers = c.n_layers + 1; }, "n_dense_layers", "must be in"},
        {"inter_dim > 0 with dense layers", [](Config& c) { c.inter_dim = 0; }, "inter_dim", "> 0"},
        {"n_mtp_depth >= 0", [](Config& c) { c.n_mtp_depth = -1; }, "n_mtp_depth", ">= 0"},
        {"rms_norm_eps > 0", [](Config& c) { c.rms_norm_eps = 0; }, "rms_norm_eps", "> 0"},
        {"rms_norm_eps not NaN", [nan](Config& c) { c.rms_norm_eps = nan; }, "rms_norm_eps", "> 0"},
        {"rope_theta > 1", [](Config& c) { c.rope_theta = 1; }, "rope_theta", "> 1"},
        {"rope_factor >= 1", [](Config& c) { c.rope_factor = 0.5f; }, "rope_factor", ">= 1"},
        {"YaRN: original_seq_len > 0", [](Config& c) { c.rope_factor = 40; c.original_seq_len = 0; }, "original_seq_len", "> 0"},
        {"YaRN: beta_fast > beta_slow", [](Config& c) { c.rope_factor = 40; c.beta_fast = 1; c.beta_slow = 1; }, "beta_fast", "beta_fast > beta_slow"},
        {"YaRN: beta_slow > 0", [](Config& c) { c.rope_factor = 40; c.beta_slow = 0; }, "beta_slow", "beta_slow > 0"},
        {"init_std > 0", [](Config& c) { c.init_std = 0; }, "init_std", "> 0"},
        {"n_routed_experts > 0", [](Config& c) { c.n_routed_experts = 0; }, "n_routed_experts", "> 0"},
        {"moe_inter_dim > 0", [](Config& c) { c.moe_inter_dim = 0; }, "moe_inter_dim", "> 0"},
        {"n_activated_experts > 0", [](Config& c) { c.n_activated_experts = 0; }, "n_activated_experts", "> 0"},
        {"n_expert_groups > 0", [](Config& c) { c.n_expert_groups = 0; }, "n_expert_groups", "> 0"},
        {"n_shared_experts >= 0", [](Config& c) { c.n_shared_experts = -1; }, "n_shared_experts", ">= 0"},
        {"score_func sigmoid|softmax", [](Config& c) { c.score_func = "relu"; }, "score_func", "\"relu\""},
        {"n_routed_experts divisible by groups", [](Config& c) { c.n_routed_experts = 10; }, "n_routed_experts", "divisible"},
        {"n_limited_groups >= 1", [](Config& c) { c.n_limited_groups = 0; }, "n_limited_groups", "must be in"},
        {"n_limited_groups <= n_expert_groups", [](Config& c) { c.n_limited_groups = 5; }, "n_limited_groups", "must be in"},
        {"top-k reachable under the group limit", [](Config& c) { c.n_activated_experts = 5; }, "n_activated_experts", "group limit"},
        {"sigmoid groups have >= 2 experts", [](Config& c) { c.n_expert_groups = 8; }, "n_expert_groups", "top-2"},
        {"route_scale > 0", [](Config& c) { c.route_scale = 0; }, "route_scale", "> 0"},
        {"route_scale not NaN", [nan](Config& c) { c.route_scale = nan; }, "route_scale", "> 0"},
    };
    const Config base = Config::tiny();  // 8 experts in 4 groups of 2, top-2 of 2 groups, one dense layer, YaRN off
    REQUIRE_NOTHROW(base.validate());
    for (const Rule& r : rules) {
        CAPTURE(r.name);
        Config c = base;
        r.broke(c);
        const std::string message = error_of([&] { c.validate(); });
        CAPTURE(message);
        CHECK(message.find(r.field) != std::string::npos);
        CHECK(message.find(r.phrase) != std::string::npos);
    }
    // doctest's own form of the same check, for one rule
    Config odd = base;
    odd.qk_rope_head_dim = 7;
    CHECK_THROWS_WITH_AS(odd.validate(), doctest::Contains("qk_rope_head_dim"), dsv3::Error);
}

TEST_CASE("config: a model larger than the machine's memory is an error before any allocation") {
    // The 671B preset (what a config.json with only model_type gave): 16 bytes a parameter is about 11 TB.
    try {
        Model m(Config::v3_671b(), 1);
        FAIL("the 671B model was built");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("more than this machine's") != std::string::npos);
        CHECK(std::string(e.what()).find("GB") != std::string::npos);
    }
}

TEST_CASE("config: rules that must NOT fire") {
    Config c = Config::tiny();
    SUBCASE("no MoE anywhere: the MoE fields are not checked") {
        c.n_dense_layers = c.n_layers; c.n_mtp_depth = 0;
        c.n_routed_experts = 0; c.n_activated_experts = 0; c.n_expert_groups = 0; c.score_func = "none";
        CHECK_NOTHROW(c.validate());
    }
    SUBCASE("no dense layer: inter_dim is not needed") {
        c.n_dense_layers = 0; c.inter_dim = 0;
        CHECK_NOTHROW(c.validate());
    }
    SUBCASE("q_lora_rank 0 is the direct query projection") {
        c.q_lora_rank = 0;
        CHECK_NOTHROW(c.validate());
    }
    SUBCASE("YaRN fields are only checked when YaRN is on") {
        c.original_seq_len = 0; c.beta_slow = 0;
        CHECK_NOTHROW(c.validate());
    }
    SUBCASE("softmax routing allows groups of one expert (group score = max)") {
        c.score_func = "softmax"; c.n_expert_groups = 8;
        CHECK_NOTHROW(c.validate());
    }
    SUBCASE("top-k exactly the reachable experts") {
        c.n_activated_experts = 4;  // 2 groups × 2 experts
        CHECK_NOTHROW(c.validate());
    }
}

// ----------------------------------------------------------------------------------------------------------------
// counters
// ----------------------------------------------------------------------------------------------------------------
TEST_CASE("config: the counters reproduce DeepSeek-V3's published figures exactly") {
    const Config v3 = Config::v3_671b();
    const ParamCounts n = count_parameters(v3);
    CHECK(n.total == 671026419200LL);
    CHECK(n.activated == 37552297472LL);
    CHECK(n.mtp_in_checkpoint == 13463426304LL);
    CHECK(double(n.total + n.mtp_in_checkpoint) == doctest::Approx(684.5e9).epsilon(1e-3));  // the "685B" checkpoint
    CHECK(n.embedding == 129280LL * 7168);
    CHECK(kv_cache_bytes_mla(v3) == 70272);                    // 61 × (512 + 64) × 2
    CHECK(kv_cache_bytes_gqa(80, 8, 128) == 327680);           // Qwen-2.5 72B
    CHECK(kv_cache_bytes_gqa(126, 8, 128) == 516096);          // LLaMA-3.1 405B
    const double flops = training_flops_per_token(v3, 4096);
    const double want = 6.0 * double(n.activated - n.embedding) + 6.0 * 61 * 128 * (128 + 64 + 128) * 4096 / 2.0;
    CHECK(flops == doctest::Approx(want).epsilon(1e-12));
    CHECK(flops == doctest::Approx(250e9).epsilon(0.01));
    const ParamCounts lite = count_parameters(Config::v2_lite());
    CHECK(double(lite.total) > 15.65e9);  // "15.7B"
    CHECK(double(lite.total) < 15.75e9);
    CHECK(lite.mtp == 0);
    CHECK(lite.mtp_in_checkpoint == 0);
}

TEST_CASE("config: the counters agree with the layout a Model allocates") {
    const Config c = Config::tiny();
    Model m(c, 1);
    const ParamCounts n = count_parameters(c);
    CHECK(int64_t(m.params.size()) == n.total + n.mtp);
    CHECK(n.activated < n.total);
}

// ----------------------------------------------------------------------------------------------------------------
// to_text / set
// ----------------------------------------------------------------------------------------------------------------
TEST_CASE("config: to_text / set round trip every preset exactly") {
    for (const Config& c : {Config::tiny(), Config::small(), Config::large(), Config::v2_lite(), Config::v3_671b()}) {
        const std::string text = c.to_text();
        Config back;
        back.vocab_size = 1; back.score_func = "x"; back.norm_topk_prob = !c.norm_topk_prob; back.mscale = 123;
        std::istringstream in(text);
        std::string line;
        int lines = 0;
        while (std::getline(in, line)) {
            const size_t eq = line.find('=');
            REQUIRE(eq != std::string::npos);
            back.set(line.substr(0, eq), line.substr(eq + 1), "test");
            ++lines;
        }
        CHECK(lines >= 30);
        CHECK(back.to_text() == text);
        // floats exactly, not just their printed form
        CHECK(back.mscale == c.mscale);
        CHECK(back.rms_norm_eps == c.rms_norm_eps);
        CHECK(back.route_scale == c.route_scale);
        CHECK(back.init_std == c.init_std);
        CHECK(back.norm_topk_prob == c.norm_topk_prob);
        CHECK(back.score_func == c.score_func);
        CHECK(count_parameters(back).total == count_parameters(c).total);
    }
}

TEST_CASE("config: set() parses each type and its errors name the field") {
    Config c;
    c.set("dim", "96", "test");
    c.set("score_func", "softmax", "test");
    c.set("rope_factor", "40", "test");
    c.set("norm_topk_prob", "0", "test");
    CHECK(c.dim == 96);
    CHECK(c.score_func == "softmax");
    CHECK(c.rope_factor == 40.0f);
    CHECK(c.norm_topk_prob == false);
    CHECK_THROWS_WITH_AS(c.set("no_such_field", "1", "cfg.txt"), doctest::Contains("no_such_field"), dsv3::Error);
    CHECK_THROWS_WITH_AS(c.set("no_such_field", "1", "cfg.txt"), doctest::Contains("cfg.txt"), dsv3::Error);
    for (const char* bad : {"abc", "12x", "", "1.5", "1e3"}) {
        CAPTURE(bad);
        CHECK_THROWS_WITH_AS(c.set("n_heads", bad, "cfg.txt"), doctest::Contains("n_heads"), dsv3::Error);
    }
    CHECK_THROWS_WITH_AS(c.set("rope_theta", "ten", "cfg.txt"), doctest::Contains("rope_theta"), dsv3::Error);
    CHECK_THROWS_WITH_AS(c.set("norm_topk_prob", "2", "cfg.txt"), doctest::Contains("norm_topk_prob"), dsv3::Error);
    CHECK_THROWS_WITH_AS(c.set("score_func", "sig moid", "cfg.txt"), doctest::Contains("score_func"), dsv3::Error);
}

TEST_CASE("config: set() accepts true/false for booleans and leaves the field unchanged on a bad value") {
    dsv3::Config c;
    c.set("fp8_training", "true", "test");
    CHECK(c.fp8_training);
    c.set("fp8_training", "0", "test");
    CHECK(!c.fp8_training);
    CHECK_THROWS_AS(c.set("fp8_training", "yes", "test"), dsv3::Error);
    CHECK(!c.fp8_training);
    const int dim = c.dim;
    CHECK_THROWS_AS(c.set("dim", "12abc", "test"), dsv3::Error);
    CHECK(c.dim == dim);
}

// ----------------------------------------------------------------------------------------------------------------
// checkpoints
// ----------------------------------------------------------------------------------------------------------------
Config checkpoint_config() {
    Config c;
    c.vocab_size = 13; c.dim = 8; c.inter_dim = 12; c.moe_inter_dim = 4;
    c.n_layers = 2; c.n_dense_layers = 1; c.n_heads = 2;
    c.n_routed_experts = 4; c.n_activated_experts = 2; c.n_expert_groups = 2; c.n_limited_groups = 1;
    c.q_lora_rank = 4; c.kv_lora_rank = 4; c.qk_nope_head_dim = 2; c.qk_rope_head_dim = 2; c.v_head_dim = 2;
    c.max_seq_len = 8; c.route_scale = 1.5f; c.mscale = 0.707f;
    return c;
}

struct TempDir {
    std::filesystem::path path;
    TempDir() {
        char tmpl[] = "/tmp/dsv3_test_config_XXXXXX";
        const char* p = mkdtemp(tmpl);
        REQUIRE(p != nullptr);
        path = p;
    }
    ~TempDir() { std::error_code ec; std::filesystem::remove_all(path, ec); }
    std::string file(const char* name) const { return (path / name).string(); }
};

std::string read_all(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}
void write_all(const std::string& path, const std::string& data) {
    std::ofstream f(path, std::ios::binary);
    f.write(data.data(), std::streamsize(data.size()));
}

TEST_CASE("checkpoint: save / load round trip is bitwise, atomic, and its errors name the problem") {
    TempDir dir;
    const std::string path = dir.file("model.ckpt");
    const Config c = checkpoint_config();
    Model model(c, 3);
    for (Block* b : model.moe_blocks())  // a non-zero routing bias must be saved too
        for (int i = 0; i < c.n_routed_experts; ++i) model.param_at(b->moe.bias)[i] = 0.01f * float(i + 1);
    AdamW opt;
    opt.m = gradcheck::random_vector(model.params.size(), 5);
    opt.v = gradcheck::random_vector(model.params.size(), 6, 0.01f);
    opt.step = 7;
    save_checkpoint(path, model, opt);
    CHECK(std::filesystem::exists(path));
    CHECK_FALSE(std::filesystem::exists(path + ".tmp"));  // written aside, then renamed

    SUBCASE("round trip") {
        Model other(c, 99);  // different seed: different parameters until loaded
        REQUIRE(other.params != model.params);
        AdamW fresh;
        load_checkpoint(path, other, fresh);
        CHECK(other.params == model.params);
        CHECK(fresh.m == opt.m);
        CHECK(fresh.v == opt.v);
        CHECK(fresh.step == 7);
        int step = -1;
        const Config read = read_checkpoint_config(path, &step);
        CHECK(step == 7);
        CHECK(read.to_text() == c.to_text());
        CHECK(read.mscale == c.mscale);
        // saving again over an existing file replaces it and leaves no .tmp behind
        opt.step = 8;
        save_checkpoint(path, model, opt);
        CHECK_FALSE(std::filesystem::exists(path + ".tmp"));
        load_checkpoint(path, other, fresh);
        CHECK(fresh.step == 8);
    }
    SUBCASE("the run's record (RunInfo) round trips, escaped; older checkpoints have none") {
        RunInfo run;
        run.add("arg", "--steps");
        run.add("arg", "12");
        run.add("prompt", "First Citizen:\n\"quoted\" \\ \x01\xff");
        save_checkpoint(path, model, opt, run);
        RunInfo back;
        Model other(c, 99);
        AdamW fresh;
        load_checkpoint(path, other, fresh, &back);
        CHECK(back.entries == run.entries);
        CHECK(back.all("arg") == std::vector<std::string>{"--steps", "12"});
        CHECK(back.get("prompt") == run.get("prompt"));
        CHECK(back.get("tokenizer", "none") == "none");
        CHECK(other.params == model.params);
        CHECK(read_all(path).find("run.prompt=First Citizen:\\n") != std::string::npos);  // one readable line
        RunInfo bad;
        bad.add("a=b", "x");
        CHECK_THROWS_WITH_AS(save_checkpoint(path, model, opt, bad), doctest::Contains("a=b"), dsv3::Error);
        std::string data = read_all(path);
        const size_t at = data.find("run.prompt=");
        REQUIRE(at != std::string::npos);
        write_all(dir.file("esc.ckpt"), data.substr(0, at) + "run.prompt=\\q\n" + data.substr(at));
        CHECK_THROWS_WITH_AS(read_checkpoint_config(dir.file("esc.ckpt"), nullptr, nullptr, &back),
                             doctest::Contains("malformed escape"), dsv3::Error);
    }
    SUBCASE("optimizer state not yet allocated is saved as zeros") {
        AdamW empty;
        save_checkpoint(path, model, empty);
        Model other(c, 99);
        AdamW fresh;
        fresh.step = 5;
        load_checkpoint(path, other, fresh);
        CHECK(other.params == model.params);
        CHECK(fresh.step == 0);
        CHECK(fresh.m == std::vector<float>(model.params.size(), 0.0f));
    }
    SUBCASE("wrong first line") {
        const std::string bad = dir.file("bad.ckpt");
        write_all(bad, "not a checkpoint\nvocab_size=13\n");
        Model other(c, 1);
        AdamW fresh;
        CHECK_THROWS_WITH_AS(load_checkpoint(bad, other, fresh), doctest::Contains("dsv3-checkpoint 1"), dsv3::Error);
        CHECK_THROWS_WITH_AS(load_checkpoint(bad, other, fresh), doctest::Contains(bad.c_str()), dsv3::Error);
    }
    SUBCASE("a header line too long is an error, not a double free (the file is closed once)") {
        const std::string bad = dir.file("long.ckpt");
        write_all(bad, "dsv3-checkpoint 1\n" + std::string(5000, 'a') + "\n");
        CHECK_THROWS_WITH_AS(read_checkpoint_config(bad), doctest::Contains("header line too long"), dsv3::Error);
    }
    SUBCASE("a step out of range names the field and the value") {
        std::string data = read_all(path);
        const size_t at = data.find("step=7\n");
        REQUIRE(at != std::string::npos);
        const std::string bad = dir.file("step.ckpt");
        write_all(bad, data.substr(0, at) + "step=99999999999\n" + data.substr(at + 7));
        CHECK_THROWS_WITH_AS(read_checkpoint_config(bad),
                             doctest::Contains("step: expected an integer in [0, 2147483647], got '99999999999'"), dsv3::Error);
        write_all(bad, data.substr(0, at) + "step=abc\n" + data.substr(at + 7));
        CHECK_THROWS_WITH_AS(read_checkpoint_config(bad), doctest::Contains("step: expected an integer"), dsv3::Error);
        CHECK_THROWS_WITH_AS(read_checkpoint_config(bad), doctest::Contains("got 'abc'"), dsv3::Error);
    }
    SUBCASE("a header that declares more than the file holds is an error before any allocation") {
        // build/generate runs Model(read_checkpoint_config(path)): a 200-byte header of the 671B model, whose floats=
        // agrees with its config, once allocated 11 TB (or failed with "std::bad_alloc", naming no file).
        const Config big = Config::v3_671b();
        const std::string bad = dir.file("big.ckpt");
        write_all(bad, "dsv3-checkpoint 1\n" + big.to_text() + "step=0\nfloats=" +
                           std::to_string(param_layout(big).total) + "\nend\n");
        CHECK_THROWS_WITH_AS(read_checkpoint_config(bad), doctest::Contains("floats ("), dsv3::Error);
        CHECK_THROWS_WITH_AS(read_checkpoint_config(bad), doctest::Contains("but the file has"), dsv3::Error);
        // floats= that agrees with the file but not with the config
        const std::string data = read_all(path), n = std::to_string(model.params.size());
        const size_t at = data.find("floats=" + n + "\n");
        REQUIRE(at != std::string::npos);
        write_all(bad, data.substr(0, at) + "floats=" + std::to_string(model.params.size() - 1) +
                           data.substr(at + 7 + n.size(), data.size() - (at + 7 + n.size()) - 12));
        const std::string expected = "but its config has " + n + " parameters";
        CHECK_THROWS_WITH_AS(read_checkpoint_config(bad), doctest::Contains(expected.c_str()), dsv3::Error);
    }
    SUBCASE("truncated data") {
        const std::string data = read_all(path), cut = dir.file("cut.ckpt");
        write_all(cut, data.substr(0, data.size() - 10));
        Model other(c, 1);
        const std::vector<float> before = other.params;
        AdamW fresh;
        CHECK_THROWS_WITH_AS(load_checkpoint(cut, other, fresh), doctest::Contains("bytes"), dsv3::Error);
        CHECK(other.params == before);  // nothing loaded from a bad file
    }
    SUBCASE("truncated header") {
        const std::string data = read_all(path), cut = dir.file("cut.ckpt");
        write_all(cut, data.substr(0, 60));
        Model other(c, 1);
        AdamW fresh;
        CHECK_THROWS_WITH_AS(load_checkpoint(cut, other, fresh), doctest::Contains("header ends"), dsv3::Error);
    }
    SUBCASE("config mismatch names the field") {
        Config different = c;
        different.route_scale = 2.5f;
        Model other(different, 1);
        AdamW fresh;
        CHECK_THROWS_WITH_AS(load_checkpoint(path, other, fresh), doctest::Contains("route_scale"), dsv3::Error);
        Config wider = c;
        wider.moe_inter_dim = 6;
        Model other2(wider, 1);
        CHECK_THROWS_WITH_AS(load_checkpoint(path, other2, fresh), doctest::Contains("moe_inter_dim"), dsv3::Error);
    }
    SUBCASE("missing file") {
        Model other(c, 1);
        AdamW fresh;
        CHECK_THROWS_WITH_AS(load_checkpoint(dir.file("nope.ckpt"), other, fresh), doctest::Contains("nope.ckpt"),
                             dsv3::Error);
    }
    SUBCASE("a failed save leaves the previous checkpoint intact") {
        const std::string before = read_all(path);
        std::filesystem::create_directory(path + ".tmp");  // the temporary file cannot be created
        opt.step = 9;
        CHECK_THROWS_AS(save_checkpoint(path, model, opt), dsv3::Error);
        CHECK(read_all(path) == before);
        std::filesystem::remove(path + ".tmp");
        CHECK_THROWS_AS(save_checkpoint(dir.file("no_such_dir/model.ckpt"), model, opt), dsv3::Error);
        CHECK_FALSE(std::filesystem::exists(dir.file("no_such_dir")));
    }
}

TEST_CASE("training log: text round trip, keep_until for a resumed run, errors name the line") {
    TrainingLog log;
    for (int s = 1; s <= 5; ++s) log.steps.push_back({s, 5.0 / s, 5.1 / s, 1.0 + s, 1e-3 * s, 0.25 * s});
    log.evals.push_back({2, 3.25, 0.5, 4, {{1, 2, 3}, {4, 5, 6}}});
    log.evals.push_back({4, 2.5, 0.25, 4, {{3, 3, 0}, {2, 2, 2}}});
    const std::string text = log.to_text();
    const TrainingLog back = TrainingLog::parse(text, "log");
    CHECK(back.to_text() == text);  // %.17g reads back to the same double
    REQUIRE(back.evals.size() == 2);
    CHECK(back.evals[1].loads == log.evals[1].loads);
    TrainingLog resumed = back;
    resumed.keep_until(3);  // the checkpoint of step 3: steps 4.. and the evaluation at 4 are done again
    CHECK(resumed.steps.size() == 3);
    CHECK(resumed.evals.size() == 1);
    CHECK_THROWS_WITH_AS(TrainingLog::parse("something else\n", "x.txt"), doctest::Contains("dsv3-training-log 1"),
                         dsv3::Error);
    CHECK_THROWS_WITH_AS(TrainingLog::parse("dsv3-training-log 1\nstep 1 2 3\n", "x.txt"),
                         doctest::Contains("x.txt line 2"), dsv3::Error);
    CHECK_THROWS_WITH_AS(TrainingLog::parse("dsv3-training-log 1\neval 1 2 3 4 2 2 1 2 3\n", "x.txt"),
                         doctest::Contains("BLOCKS x EXPERTS"), dsv3::Error);
    CHECK_THROWS_WITH_AS(TrainingLog::parse("dsv3-training-log 1\neval 1 2 3 4 99999999999 99999999999\n", "x.txt"),
                         doctest::Contains("BLOCKS x EXPERTS"), dsv3::Error);
}

// The continuation build/train performs on --resume, on the header's functions: 6 steps in one go against 3 steps,
// a checkpoint and its log saved and loaded into a fresh model, then 3 more. The logs (losses, gradient norms and the
// learning rate of every step) must be equal. (tests/train_resume.sh checks the program itself: Ctrl-C, --resume.)
TEST_CASE("resume: a run continued from its checkpoint logs what the uninterrupted run logs") {
    TempDir dir;
    const Config c = checkpoint_config();
    LrSchedule sched;
    sched.warmup_steps = 2;
    sched.total_steps = 6;  // the schedule of the whole run: its cosine part differs from one of 3 steps
    std::vector<int32_t> data(200);
    for (size_t i = 0; i < data.size(); ++i) data[i] = int32_t((i * 7 + i / 5) % size_t(c.vocab_size));
    const int B = 2, T = 6;
    auto run = [&](Model& model, AdamW& opt, TrainingLog& log, int until) {
        std::vector<int32_t> batch(size_t(B) * (T + 1));
        for (int step = opt.step; step < until; ++step) {
            sample_batch(data, B, T, 5, step, batch.data());
            const float lr = sched.at(step);
            const StepResult r = train_step(model, opt, batch.data(), B, T, lr, LossOptions{});
            log.steps.push_back({step + 1, r.loss.main, r.loss.mtp.empty() ? 0.0 : r.loss.mtp[0], r.grad_norm, lr,
                                 r.max_violation});
        }
    };
    Model whole(c, 3);
    AdamW whole_opt;
    TrainingLog whole_log;
    run(whole, whole_opt, whole_log, 6);

    Model first(c, 3);
    AdamW first_opt;
    TrainingLog first_log;
    run(first, first_opt, first_log, 3);
    save_checkpoint(dir.file("ckpt"), first, first_opt);
    run(first, first_opt, first_log, 4);  // a step after the checkpoint: logged, then lost in a crash
    first_log.save(dir.file("log"));
    Model resumed(c, 77);  // any seed: everything comes from the checkpoint
    AdamW resumed_opt;
    load_checkpoint(dir.file("ckpt"), resumed, resumed_opt);
    TrainingLog resumed_log = TrainingLog::load(dir.file("log"));
    resumed_log.keep_until(resumed_opt.step);
    CHECK(resumed_opt.step == 3);
    CHECK(resumed_log.steps.size() == 3);
    run(resumed, resumed_opt, resumed_log, 6);
    CHECK(resumed_log.to_text() == whole_log.to_text());
    CHECK(resumed.params == whole.params);
}

}  // namespace
