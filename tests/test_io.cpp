// Checkpoint I/O tests: JSON, safetensors (every dtype, every corrupt-file case), sharded checkpoints, config.json,
// save_hf/load_hf, DeepSeek's FP8 block-scaled weights, the MTP copies, and the transformers-style forward. When
// tests/reference/<case>/ directories made by tests/reference/make_reference.py exist, the model's logits and
// gradients are also checked against transformers' (llm.c style); without them that test checks nothing.
#include <doctest/doctest.h>

#include "../deepseek_v3.hpp"

#include <chrono>
#include <filesystem>
#include <fstream>

using namespace dsv3;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
    fs::path path;
    explicit TempDir(const std::string& tag) {
        const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
        path = fs::temp_directory_path() / ("dsv3_test_io_" + tag + "_" + std::to_string(ticks));
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string file(const std::string& name) const { return (path / name).string(); }
    std::string str() const { return path.string(); }
};

template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "<no error>";
}
bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void write_bytes(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), std::streamsize(bytes.size()));
}
// A hand-made safetensors file: the 8-byte length, the header text as given, then `data_bytes` bytes (value 1).
std::string raw_safetensors(const std::string& header, size_t data_bytes) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[size_t(i)] = char((uint64_t(header.size()) >> (8 * i)) & 0xFF);
    return s + header + std::string(data_bytes, '\x01');
}
std::string read_text(const std::string& path) { return dsv3::read_file_bytes(path); }

// Small, every structural feature: query LoRA, a dense and a MoE layer, shared + routed experts with a group limit,
// MTP depth 1, YaRN.
Config io_config() {
    Config c;
    c.vocab_size = 23; c.dim = 16; c.inter_dim = 24; c.moe_inter_dim = 8;
    c.n_layers = 2; c.n_dense_layers = 1; c.n_heads = 2;
    c.n_routed_experts = 6; c.n_shared_experts = 1; c.n_activated_experts = 2;
    c.n_expert_groups = 3; c.n_limited_groups = 2; c.route_scale = 1.5f;
    c.q_lora_rank = 8; c.kv_lora_rank = 8; c.qk_nope_head_dim = 4; c.qk_rope_head_dim = 4; c.v_head_dim = 6;
    c.max_seq_len = 32; c.rope_factor = 4; c.original_seq_len = 8; c.mscale = 0.707f;
    c.n_mtp_depth = 1; c.init_std = 0.2f;
    return c;
}
// A model whose every tensor is distinct (random norms and routing bias too), so a tensor loaded into the wrong slot
// would show.
Model io_model(const Config& c, uint64_t seed = 5) {
    Model m(c, seed);
    Rng rng(seed + 100);
    for (const ParamEntry& e : m.layout.entries)
        if (e.kind != ParamKind::matrix)
            for (size_t i = 0; i < e.size; ++i) m.params[e.offset + i] = float(e.kind == ParamKind::gain ? 1 + 0.1 * rng.normal() : 0.05 * rng.uniform());
    return m;
}
TokenRows some_rows(const Config& c, int B, int T, uint64_t seed) {
    TokenRows r;
    r.B = B;
    r.T = T;
    Rng rng(seed);
    for (int i = 0; i < B * T; ++i) r.tokens.push_back(int32_t(rng.below(uint64_t(c.vocab_size))));
    return r;
}

// Compares our forward/backward on a transformers reference case directory (see make_reference.py).
void check_reference_case(const std::string& dir) {
    INFO("reference case ", dir);
    Model model = load_hf(dir);
    std::string text = read_text(dir + "/tokens.txt");
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    const TokenRows rows = parse_token_rows(text);
    const double loss = forward_like_transformers(model, rows, true);
    std::vector<int64_t> shape;
    const std::vector<float> ref = read_npy(dir + "/logits.npy", &shape);
    REQUIRE(shape == std::vector<int64_t>{rows.B, rows.T, model.cfg.vocab_size});
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        max_diff = std::max(max_diff, double(std::fabs(ref[i] - model.logits()[i])));
        max_ref = std::max(max_ref, double(std::fabs(ref[i])));
    }
    INFO("logits: max |ours - transformers| = ", max_diff, " (max |logit| ", max_ref, ")");
    CHECK(max_diff <= 1e-4 * std::max(1.0, max_ref));
    if (fs::exists(dir + "/loss.txt")) {
        const double ref_loss = std::stod(read_text(dir + "/loss.txt"));
        INFO("loss ours ", loss, " transformers ", ref_loss);
        CHECK(std::fabs(loss - ref_loss) <= 1e-5 * std::max(1.0, std::fabs(ref_loss)));
    }
    SafetensorsFile grads(dir + "/grads.safetensors");
    int compared = 0;
    for (const ParamEntry& e : model.layout.entries) {
        if (e.mtp_module >= 0 || e.kind == ParamKind::routing_bias) continue;
        const TensorInfo* t = grads.find(e.name);
        INFO("gradient ", e.name);
        REQUIRE(t != nullptr);
        REQUIRE(t->shape == e.shape);
        std::vector<float> g(e.size);
        grads.read_floats(*t, g.data());
        double diff2 = 0, ref2 = 0;
        for (size_t i = 0; i < e.size; ++i) {
            const double d = double(g[i]) - model.grads[e.offset + i];
            diff2 += d * d;
            ref2 += double(g[i]) * g[i];
        }
        INFO("relative error ", std::sqrt(diff2 / std::max(ref2, 1e-30)));
        CHECK(std::sqrt(diff2) <= 1e-4 * std::sqrt(ref2) + 1e-7);
        ++compared;
    }
    CHECK(compared > 0);
}

}  // namespace

TEST_CASE("io: JSON parses the whole grammar and writes it back") {
    const std::string text =
        R"({"a": [1, -2, 3.5, -0.25e-3, 1E+2, true, false, null], "s": "q\"\\\/\b\f\n\r\t\u00e9\u4e2d\ud83d\ude00",)"
        R"( "big": 12345678901234567890, "o": {"x": {}, "y": []}})";
    const Json j = json_parse(text, "test.json");
    REQUIRE(j.is_object());
    const Json* a = j.find("a");
    REQUIRE(a);
    REQUIRE(a->array.size() == 8);
    CHECK(a->array[0].is_integer);
    CHECK(a->array[0].integer == 1);
    CHECK(a->array[1].integer == -2);
    CHECK(!a->array[2].is_integer);
    CHECK(a->array[2].number == 3.5);
    CHECK(a->array[3].number == -0.25e-3);
    CHECK(a->array[4].number == 100.0);
    CHECK(!a->array[4].is_integer);
    CHECK(a->array[5].boolean);
    CHECK(a->array[7].is_null());
    CHECK(j.find("s")->string == "q\"\\/\b\f\n\r\t\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80");
    CHECK(!j.find("big")->is_integer);  // beyond int64: a double only
    CHECK(j.find("missing") == nullptr);
    // round trip, compact and pretty
    for (int indent : {-1, 2}) {
        const std::string once = json_dump(j, indent);
        CHECK(json_dump(json_parse(once, "again"), indent) == once);
    }
    CHECK(json_dump(Json::of_float(1e-6f)) == "1e-06");
    CHECK(json_dump(Json::of_float(0.1f)) == "0.1");
    CHECK(json_dump(Json::of_float(40.0f)) == "40.0");
    CHECK(json_dump(Json::of_string(std::string("a\x01") + "b")) == "\"a\\u0001b\"");
    CHECK(float(json_parse(json_dump(Json::of_float(0.707f)), "x").number) == 0.707f);
}

TEST_CASE("io: JSON errors name the source, the byte offset and what was expected") {
    struct Case { const char* text; const char* expect; };
    const Case cases[] = {
        {"{\"a\": 1,}", "a string key"},
        {"{\"a\" 1}", "':'"},
        {"[1 2]", "',' or ']'"},
        {"{\"a\": 1, \"a\": 2}", "duplicate key \"a\""},
        {"\"\\x\"", "after a backslash"},
        {"\"\\ud800\"", "low surrogate"},
        {"\"\\udc00\"", "lone low surrogate"},
        {"\"a\nb\"", "control characters"},
        {"01", "the end of the document"},
        {"1.", "a digit after the decimal point"},
        {"-", "a digit"},
        {"[1] x", "the end of the document"},
        {"\"abc", "to close the string"},
        {"tru", "true"},
        {"NaN", "a value"},
        {"1e999", "range of a double"},
        {"", "a value"},
    };
    for (const Case& c : cases) {
        const std::string msg = error_of([&] { json_parse(c.text, "bad.json"); });
        INFO("input ", c.text, " -> ", msg);
        CHECK(has(msg, "bad.json: invalid JSON at byte "));
        CHECK(has(msg, c.expect));
    }
    CHECK(has(error_of([] { json_parse("{\"a\" 1}", "f.json"); }), "at byte 5"));
    CHECK(has(error_of([] { json_parse(std::string(200, '['), "deep.json"); }), "nested"));
}

TEST_CASE("io: safetensors round trip in every dtype") {
    TempDir tmp("dtypes");
    std::vector<float> x(300);
    Rng rng(3);
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(rng.normal() * (i % 7 == 0 ? 100 : 1));
    x[1] = 0.0f; x[2] = -0.0f; x[3] = 1e-30f;
    const DType all[] = {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3, DType::F8_E5M2};
    std::vector<TensorToWrite> out;
    for (DType d : all) out.push_back({std::string("t_") + dtype_name(d), {3, 100}, x.data(), d});
    out.push_back({"empty", {0, 5}, nullptr, DType::F32});
    out.push_back({"scalar", {}, x.data(), DType::F32});
    const std::string path = tmp.file("all.safetensors");
    write_safetensors(path, out, {{"format", "pt"}, {"note", "unicode \xC3\xA9"}});
    CHECK(!fs::exists(path + ".tmp"));
    SafetensorsFile f(path);
    REQUIRE(f.tensors.size() == 7);
    CHECK(f.uncovered_bytes == 0);
    CHECK(f.data_start % 8 == 0);
    REQUIRE(f.metadata.size() == 2);
    CHECK(f.metadata[1].second == "unicode \xC3\xA9");
    for (DType d : all) {
        const TensorInfo* t = f.find(std::string("t_") + dtype_name(d));
        REQUIRE(t);
        CHECK(t->dtype == d);
        CHECK(t->shape == std::vector<int64_t>{3, 100});
        std::vector<float> back(300);
        f.read_floats(*t, back.data());
        for (size_t i = 0; i < x.size(); ++i) {
            float expected = x[i];
            if (d == DType::BF16) expected = bf16_bits_to_float(float_to_bf16_bits(x[i]));
            if (d == DType::F16) expected = f16_bits_to_float(float_to_f16_bits(x[i]));
            if (d == DType::F8_E4M3) expected = fp8_e4m3_decode(fp8_e4m3_encode(x[i]));
            if (d == DType::F8_E5M2) expected = fp8_e5m2_decode(fp8_e5m2_encode(x[i]));
            INFO(dtype_name(d), " element ", i, " = ", x[i]);
            REQUIRE(std::memcmp(&back[i], &expected, 4) == 0);  // bitwise, -0 included
        }
    }
    CHECK(f.find("empty")->numel == 0);
    CHECK(f.read_floats("scalar") == std::vector<float>{x[0]});
    CHECK(has(error_of([&] { f.read_floats("nope"); }), "no tensor named \"nope\""));
    CHECK(has(error_of([&] { write_safetensors(tmp.file("dup.safetensors"), {{"a", {1}, x.data()}, {"a", {1}, x.data()}}); }),
              "repeated"));
}

TEST_CASE("io: every corrupt safetensors file is an Error naming the file and the tensor") {
    TempDir tmp("corrupt");
    struct Case { const char* name; std::string bytes; const char* tensor; const char* expect; };
    const std::string ok_entry = R"("w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]})";
    std::string huge_len(8, '\xFF');
    huge_len += "{}";
    const Case cases[] = {
        {"short", "abcde", nullptr, "fewer than the 8-byte header length"},
        {"empty", "", nullptr, "fewer than the 8-byte header length"},
        {"huge_header_len", huge_len, nullptr, "extends beyond the file"},
        {"not_json", raw_safetensors("{\"w\": [", 0), nullptr, "invalid JSON at byte"},
        {"not_object", raw_safetensors("[1, 2]", 0), nullptr, "expected a JSON object"},
        {"entry_not_object", raw_safetensors(R"({"w": 3})", 0), "w", "expected an object {dtype, shape, data_offsets}"},
        {"no_dtype", raw_safetensors(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4), "w", "missing field \"dtype\""},
        {"no_shape", raw_safetensors(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 4), "w", "missing field \"shape\""},
        {"no_offsets", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [1]}})", 4), "w", "missing field \"data_offsets\""},
        {"dtype_type", raw_safetensors(R"({"w": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}})", 4), "w", "dtype: expected a string"},
        {"unknown_dtype", raw_safetensors(R"({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8), "w", "dtype \"I64\" is not supported"},
        {"negative_dim", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}})", 8), "w", "shape[0]: expected a non-negative integer"},
        {"fractional_dim", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", 8), "w", "shape[0]: expected a non-negative integer"},
        {"overflow_dims", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 8]}})", 8), "w", "too large"},
        {"dim_beyond_int64", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [99999999999999999999], "data_offsets": [0, 8]}})", 8), "w", "non-negative integer"},
        {"shape_not_array", raw_safetensors(R"({"w": {"dtype": "F32", "shape": 3, "data_offsets": [0, 12]}})", 12), "w", "shape: expected an array"},
        {"offsets_arity", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4), "w", "expected an array [begin, end]"},
        {"offsets_negative", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 4), "w", "non-negative integers"},
        {"begin_after_end", raw_safetensors(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8), "w", "begin is after end"},
        {"size_mismatch", raw_safetensors(R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]}})", 24), "w", "needs 12 bytes, but data_offsets [0, 24] span 24"},
        {"beyond_data", raw_safetensors("{" + ok_entry + "}", 20), "w", "extend beyond the data section (20 bytes)"},
        {"overlap", raw_safetensors("{" + ok_entry + R"(, "v": {"dtype": "F32", "shape": [2], "data_offsets": [20, 28]}})", 28), "v", "overlap"},
        {"metadata_type", raw_safetensors(R"({"__metadata__": {"format": 1}})", 0), nullptr, "__metadata__.format: expected a string"},
    };
    for (const Case& c : cases) {
        const std::string path = tmp.file(std::string(c.name) + ".safetensors");
        write_bytes(path, c.bytes);
        const std::string msg = error_of([&] { SafetensorsFile f(path); });
        INFO(c.name, ": ", msg);
        CHECK(has(msg, path));
        if (c.tensor) CHECK(has(msg, std::string("\"") + c.tensor + "\""));
        CHECK(has(msg, c.expect));
    }
    // The overlap message names both tensors.
    CHECK(has(error_of([&] { SafetensorsFile f(tmp.file("overlap.safetensors")); }), "\"w\" [0, 24)"));
    // A data section with bytes no tensor covers is accepted and counted.
    const std::string gap = tmp.file("gap.safetensors");
    write_bytes(gap, raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}})", 20));
    SafetensorsFile f(gap);
    CHECK(f.uncovered_bytes == 12);
    CHECK(f.tensors.size() == 2);
    // A header padded with trailing spaces (as writers align it) is fine.
    const std::string padded = tmp.file("padded.safetensors");
    write_bytes(padded, raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}    )", 4));
    CHECK(SafetensorsFile(padded).tensors.size() == 1);
    // A missing file.
    CHECK(has(error_of([&] { SafetensorsFile m(tmp.file("none.safetensors")); }), "cannot open"));
}

TEST_CASE("io: sharded checkpoints through model.safetensors.index.json") {
    TempDir tmp("shards");
    const float a[2] = {1, 2}, b[3] = {3, 4, 5}, c[1] = {6};
    write_safetensors(tmp.file("model-00001-of-00002.safetensors"), {{"a", {2}, a}, {"b", {3}, b, DType::BF16}});
    write_safetensors(tmp.file("model-00002-of-00002.safetensors"), {{"c", {1}, c}});
    write_bytes(tmp.file("model.safetensors.index.json"),
                R"({"metadata": {"total_size": 14}, "weight_map": {"a": "model-00001-of-00002.safetensors",)"
                R"( "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}})");
    HfCheckpoint ckpt(tmp.str());
    CHECK(ckpt.files.size() == 2);
    CHECK(ckpt.tensors.size() == 3);
    CHECK(has(ckpt.description, "2 shards"));
    const HfCheckpoint::Source* s = ckpt.find("c");
    REQUIRE(s);
    std::vector<float> v(1);
    s->file->read_floats(*s->info, v.data());
    CHECK(v[0] == 6);
    s = ckpt.find("b");
    REQUIRE(s);
    CHECK(s->file->read_floats("b") == std::vector<float>{3, 4, 5});
    CHECK(ckpt.has_prefix("b"));
    CHECK(!ckpt.has_prefix("d"));
    // errors: a tensor the shard lacks, a path leaving the directory, a malformed map
    write_bytes(tmp.file("model.safetensors.index.json"), R"({"weight_map": {"z": "model-00002-of-00002.safetensors"}})");
    std::string msg = error_of([&] { HfCheckpoint k(tmp.str()); });
    CHECK(has(msg, "model.safetensors.index.json"));
    CHECK(has(msg, "\"z\""));
    write_bytes(tmp.file("model.safetensors.index.json"), R"({"weight_map": {"a": "../model.safetensors"}})");
    CHECK(has(error_of([&] { HfCheckpoint k(tmp.str()); }), "inside the directory"));
    write_bytes(tmp.file("model.safetensors.index.json"), R"({"weight_map": ["a"]})");
    CHECK(has(error_of([&] { HfCheckpoint k(tmp.str()); }), "weight_map: expected an object"));
    fs::remove(tmp.file("model.safetensors.index.json"));
    CHECK(has(error_of([&] { HfCheckpoint k(tmp.str()); }), "no model.safetensors or model.safetensors.index.json"));
}

TEST_CASE("io: config.json round trip, null q_lora_rank, rope_parameters, quantization_config, type errors") {
    for (int q_lora : {8, 0})
        for (float factor : {4.0f, 1.0f}) {
            Config c = io_config();
            c.q_lora_rank = q_lora;
            c.rope_factor = factor;
            c.score_func = "sigmoid";
            const Json j = config_to_hf_json(c);
            CHECK(j.find("model_type")->string == "deepseek_v3");
            CHECK(j.find("architectures")->array[0].string == "DeepseekV3ForCausalLM");
            CHECK(j.find("num_key_value_heads")->integer == c.n_heads);
            CHECK(j.find("q_lora_rank")->is_null() == (q_lora == 0));
            CHECK(j.find("rope_scaling")->is_null() == (factor == 1.0f));
            CHECK(j.find("torch_dtype")->string == "float32");
            HfConfigInfo info;
            const Config back = config_from_hf_json(json_parse(json_dump(j, 2), "config.json"), "config.json", &info);
            Config expected = c;
            if (factor == 1.0f) {  // unused YaRN fields are not written: they come back as defaults
                expected.original_seq_len = back.original_seq_len;
                expected.beta_fast = back.beta_fast;
                expected.beta_slow = back.beta_slow;
                expected.mscale = back.mscale;
            }
            CHECK(back.to_text() == expected.to_text());
            CHECK(info.notes.empty());  // YaRN factor 4 x original 8 == max_position_embeddings 32
            CHECK(!info.quant.fp8);
        }
    {   // factor x original_max_position_embeddings != max_position_embeddings: transformers 4.5x would differ
        Config c = io_config();
        c.max_seq_len = 40;
        HfConfigInfo info;
        config_from_hf_json(config_to_hf_json(c), "config.json", &info);
        REQUIRE(info.notes.size() == 1);
        CHECK(has(info.notes[0], "transformers 4.5x"));
    }
    // transformers >= 5 style: rope_theta and YaRN inside rope_parameters, DeepSeek's FP8 quantization_config,
    // unknown keys ignored, absent keys take transformers' defaults.
    const std::string text = R"({
      "model_type": "deepseek_v3", "vocab_size": 23, "hidden_size": 16, "intermediate_size": 24,
      "moe_intermediate_size": 8, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
      "n_routed_experts": 6, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 3, "topk_group": 2,
      "q_lora_rank": null, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 6,
      "max_position_embeddings": 40960, "num_nextn_predict_layers": 1, "some_future_key": {"x": [1, 2]},
      "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 40, "original_max_position_embeddings": 1024,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
      "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 64], "activation_scheme": "dynamic"}
    })";
    HfConfigInfo info;
    const Config c = config_from_hf_json(json_parse(text, "config.json"), "config.json", &info);
    CHECK(c.q_lora_rank == 0);
    CHECK(c.rope_theta == 50000.0f);
    CHECK(c.rope_factor == 40.0f);
    CHECK(c.original_seq_len == 1024);
    CHECK(c.mscale == 0.707f);
    CHECK(c.max_seq_len == 40960);
    CHECK(c.n_mtp_depth == 1);
    CHECK(c.route_scale == 2.5f);          // absent: transformers' default
    CHECK(c.rms_norm_eps == 1e-6f);
    CHECK(info.quant.fp8);
    CHECK(info.quant.block_out == 128);
    CHECK(info.quant.block_in == 64);
    CHECK(info.notes.empty());             // mscale == mscale_all_dim and 40 x 1024 == 40960
    // rope_scaling (DeepSeek's own files, older transformers) with "type"
    Json j = json_parse(text, "config.json");
    for (auto& m : j.object)
        if (m.first == "rope_parameters") m.first = "rope_scaling";
    j.add("rope_theta", Json::of_double(50000));
    Config c2 = config_from_hf_json(j, "config.json");
    CHECK(c2.to_text() == c.to_text());
    // cos/sin scaling transformers applies and we do not: a note
    for (auto& m : j.object)
        if (m.first == "rope_scaling")
            for (auto& r : m.second.object)
                if (r.first == "mscale") r.second = Json::of_double(1.0);
    config_from_hf_json(j, "config.json", &info);
    REQUIRE(info.notes.size() == 1);
    CHECK(has(info.notes[0], "cos and sin"));

    // Errors name config.json and the key.
    struct Bad { const char* key; const char* value; const char* expect; };
    const Bad bad[] = {
        {"hidden_size", "\"16\"", "expected an integer"},
        {"hidden_size", "16.5", "expected an integer"},
        {"norm_topk_prob", "1", "expected true or false"},
        {"rms_norm_eps", "\"1e-6\"", "expected a number"},
        {"scoring_func", "3", "expected a string"},
        {"model_type", "\"deepseek_v2\"", "expected \"deepseek_v3\""},
        {"num_key_value_heads", "1", "only 2 is supported"},
        {"tie_word_embeddings", "true", "only false is supported"},
        {"rope_scaling", "{\"type\": \"linear\", \"factor\": 2}", "only \"yarn\" and \"default\""},
        {"rope_scaling", "[1]", "expected an object or null"},
        {"rope_theta", "20000", "disagree"},
        {"quantization_config", "{\"quant_method\": \"gptq\"}", "only \"fp8\""},
        {"quantization_config", "{\"quant_method\": \"fp8\", \"weight_block_size\": [128]}", "expected [out, in]"},
        {"n_group", "4", "not a valid model"},
        {"head_dim", "8", "only 4 is supported"},
        {"qk_head_dim", "9", "only 8 is supported"},
    };
    for (const Bad& b : bad) {
        Json k = json_parse(text, "config.json");
        bool replaced = false;
        for (auto& m : k.object)
            if (m.first == b.key) { m.second = json_parse(b.value, "v"); replaced = true; }
        if (!replaced) k.add(b.key, json_parse(b.value, "v"));
        const std::string msg = error_of([&] { config_from_hf_json(k, "dir/config.json"); });
        INFO(std::string(b.key), " = ", std::string(b.value), " -> ", msg);
        CHECK(has(msg, "dir/config.json"));
        CHECK(has(msg, b.key));
        CHECK(has(msg, b.expect));
    }
}

TEST_CASE("io: save_hf / load_hf round trip is bitwise, logits identical") {
    TempDir tmp("roundtrip");
    const Config c = io_config();
    Model a = io_model(c);
    save_hf(tmp.str(), a);
    CHECK(fs::exists(tmp.file("config.json")));
    SafetensorsFile file(tmp.file("model.safetensors"));
    CHECK(file.find(mtp_embed_copy_name(c, 0)) != nullptr);    // model.layers.2.embed_tokens.weight
    CHECK(file.find("model.layers.2.shared_head.head.weight") != nullptr);
    CHECK(file.metadata == std::vector<std::pair<std::string, std::string>>{{"format", "pt"}});
    Model b = load_hf(tmp.str(), 99);
    CHECK(b.cfg.to_text() == a.cfg.to_text());
    REQUIRE(b.params.size() == a.params.size());
    CHECK(std::memcmp(b.params.data(), a.params.data(), a.params.size() * 4) == 0);
    const TokenRows rows = some_rows(c, 2, 7, 1);
    forward_like_transformers(a, rows, false);
    forward_like_transformers(b, rows, false);
    CHECK(std::memcmp(a.logits(), b.logits(), size_t(rows.B) * rows.T * c.vocab_size * 4) == 0);

    // BF16: weights rounded, the routing bias kept in F32
    TempDir tmp16("roundtrip_bf16");
    save_hf(tmp16.str(), a, DType::BF16);
    SafetensorsFile f16(tmp16.file("model.safetensors"));
    CHECK(f16.find("model.embed_tokens.weight")->dtype == DType::BF16);
    CHECK(f16.find("model.layers.1.mlp.gate.e_score_correction_bias")->dtype == DType::F32);
    CHECK(read_hf_config(tmp16.file("config.json")).dim == c.dim);
    Model h = load_hf(tmp16.str());
    for (const ParamEntry& e : a.layout.entries)
        for (size_t i = 0; i < e.size; ++i) {
            const float x = a.params[e.offset + i];
            const float expected = e.kind == ParamKind::routing_bias ? x : bf16_bits_to_float(float_to_bf16_bits(x));
            REQUIRE(h.params[e.offset + i] == expected);
        }
}

TEST_CASE("io: FP8 weights with 128x128 (or configured) block scales are dequantized") {
    for (int block : {128, 4}) {
        TempDir tmp("fp8");
        Config c = io_config();
        c.n_mtp_depth = 0;
        Model ref = io_model(c);
        // Build DeepSeek's layout by hand: every *_proj.weight as F8_E4M3 with <name>_scale_inv [ceil(out/b), ceil(in/b)]
        // (b x b blocks; block 4 makes several blocks per matrix and partial blocks at the edges), the rest in BF16.
        std::vector<std::vector<float>> keep;
        std::vector<TensorToWrite> out;
        std::vector<float> expected = ref.params;
        int fp8_tensors = 0;
        for (const ParamEntry& e : ref.layout.entries) {
            const float* w = ref.params.data() + e.offset;
            const bool proj = e.name.find("_proj.weight") != std::string::npos;
            if (!proj) {
                out.push_back({e.name, e.shape, w, e.kind == ParamKind::routing_bias ? DType::F32 : DType::BF16});
                for (size_t i = 0; i < e.size; ++i)
                    if (e.kind != ParamKind::routing_bias) expected[e.offset + i] = bf16_bits_to_float(float_to_bf16_bits(w[i]));
                continue;
            }
            ++fp8_tensors;
            const int64_t rows = e.shape[0], cols = e.shape[1], sr = (rows + block - 1) / block, sc = (cols + block - 1) / block;
            std::vector<float> scale(size_t(sr * sc)), codes_as_values(e.size);
            for (int64_t br = 0; br < sr; ++br)
                for (int64_t bc = 0; bc < sc; ++bc) {
                    float amax = 0;
                    for (int64_t r = br * block; r < std::min(rows, (br + 1) * block); ++r)
                        for (int64_t k = bc * block; k < std::min(cols, (bc + 1) * block); ++k) amax = std::max(amax, std::fabs(w[r * cols + k]));
                    scale[size_t(br * sc + bc)] = amax > 0 ? amax / 448.0f : 1.0f;
                }
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t k = 0; k < cols; ++k) {
                    const float s = scale[size_t((r / block) * sc + k / block)];
                    const uint8_t q = fp8_e4m3_encode(w[r * cols + k] / s);
                    codes_as_values[size_t(r * cols + k)] = fp8_e4m3_decode(q);  // exactly representable: re-encodes to q
                    expected[e.offset + size_t(r * cols + k)] = fp8_e4m3_decode(q) * s;
                }
            keep.push_back(std::move(codes_as_values));
            out.push_back({e.name, e.shape, keep.back().data(), DType::F8_E4M3});
            keep.push_back(std::move(scale));
            out.push_back({e.name + "_scale_inv", {sr, sc}, keep.back().data(), DType::F32});
        }
        CHECK(fp8_tensors > 10);
        write_safetensors(tmp.file("model.safetensors"), out);
        Json cfg = config_to_hf_json(c);
        Json& q = cfg.add("quantization_config", Json::new_object());
        q.add("quant_method", Json::of_string("fp8"));
        q.add("fmt", Json::of_string("e4m3"));
        Json& bs = q.add("weight_block_size", Json::new_array());
        bs.push(Json::of_int(block));
        bs.push(Json::of_int(block));
        q.add("activation_scheme", Json::of_string("dynamic"));
        write_bytes(tmp.file("config.json"), json_dump(cfg, 2));
        Model m = load_hf(tmp.str());
        for (size_t i = 0; i < expected.size(); ++i) REQUIRE(m.params[i] == expected[i]);
        // A wrong scale shape and a missing scale are errors naming the tensor.
        keep.emplace_back(99, 1.0f);  // (the data of the new shape: 99 floats, not the one block's scale)
        for (auto& t : out)
            if (t.name == "model.layers.0.self_attn.o_proj.weight_scale_inv") t.shape = {99}, t.data = keep.back().data();
        write_safetensors(tmp.file("model.safetensors"), out);
        std::string msg = error_of([&] { load_hf(tmp.str()); });
        CHECK(has(msg, "model.layers.0.self_attn.o_proj.weight_scale_inv"));
        CHECK(has(msg, "found [99]"));
        out.erase(std::remove_if(out.begin(), out.end(), [](const TensorToWrite& t) { return t.name == "model.layers.0.self_attn.o_proj.weight_scale_inv"; }), out.end());
        write_safetensors(tmp.file("model.safetensors"), out);
        msg = error_of([&] { load_hf(tmp.str()); });
        CHECK(has(msg, "\"model.layers.0.self_attn.o_proj.weight\" is F8_E4M3 but its scale"));
    }
}

TEST_CASE("io: MTP declared but absent loads without MTP; contradictions and extras are errors") {
    TempDir tmp("mtp");
    Config c = io_config();
    c.n_mtp_depth = 0;
    Model plain = io_model(c);
    save_hf(tmp.str(), plain);
    // config.json declares one MTP module, the weights have none: loads with n_mtp_depth = 0
    Json cfg = json_read_file(tmp.file("config.json"));
    for (auto& m : cfg.object)
        if (m.first == "num_nextn_predict_layers") m.second = Json::of_int(1);
    write_bytes(tmp.file("config.json"), json_dump(cfg, 2));
    Model m = load_hf(tmp.str());
    CHECK(m.cfg.n_mtp_depth == 0);
    CHECK(m.layout.mtp.empty());
    CHECK(std::memcmp(m.params.data(), plain.params.data(), plain.params.size() * 4) == 0);

    // hidden_size contradicting the tensors: the first tensor's name, expected and found shapes
    for (auto& e : cfg.object)
        if (e.first == "hidden_size") e.second = Json::of_int(32);
    write_bytes(tmp.file("config.json"), json_dump(cfg, 2));
    std::string msg = error_of([&] { load_hf(tmp.str()); });
    CHECK(has(msg, "\"model.embed_tokens.weight\""));
    CHECK(has(msg, "expected shape [23, 32]"));
    CHECK(has(msg, "found [23, 16]"));

    // MTP weights present but config.json says 0: extra tensors, with the hint
    TempDir tmp2("mtp_extra");
    Model with_mtp = io_model(io_config());
    save_hf(tmp2.str(), with_mtp);
    Json cfg2 = json_read_file(tmp2.file("config.json"));
    for (auto& e : cfg2.object)
        if (e.first == "num_nextn_predict_layers") e.second = Json::of_int(0);
    write_bytes(tmp2.file("config.json"), json_dump(cfg2, 2));
    msg = error_of([&] { load_hf(tmp2.str()); });
    CHECK(has(msg, "not part of the model"));
    CHECK(has(msg, "model.layers.2."));
    CHECK(has(msg, "num_nextn_predict_layers = 0"));

    // A missing tensor is listed; a wrong-shaped MTP copy is an error.
    SafetensorsFile f(tmp2.file("model.safetensors"));
    std::vector<std::vector<float>> data;
    std::vector<TensorToWrite> out;
    for (const TensorInfo& t : f.tensors) {
        if (t.name == "model.layers.1.mlp.experts.3.up_proj.weight") continue;
        data.push_back(std::vector<float>(size_t(t.numel)));
        f.read_floats(t, data.back().data());
        out.push_back({t.name, t.shape, data.back().data(), t.dtype});
    }
    write_bytes(tmp2.file("config.json"), json_dump(config_to_hf_json(io_config()), 2));
    write_safetensors(tmp2.file("model.safetensors"), out);
    msg = error_of([&] { load_hf(tmp2.str()); });
    CHECK(has(msg, "1 tensor is missing"));
    CHECK(has(msg, "model.layers.1.mlp.experts.3.up_proj.weight"));
    CHECK(has(msg, tmp2.file("model.safetensors")));
    Model full = io_model(io_config());
    save_hf(tmp2.str(), full);
    SafetensorsFile g(tmp2.file("model.safetensors"));
    data.clear();
    out.clear();
    for (const TensorInfo& t : g.tensors) {
        data.push_back(std::vector<float>(size_t(t.numel)));
        g.read_floats(t, data.back().data());
        out.push_back({t.name, t.shape, data.back().data(), t.dtype});
        if (t.name == "model.layers.2.shared_head.head.weight") out.back().shape = {t.shape[1], t.shape[0]};
    }
    write_safetensors(tmp2.file("model.safetensors"), out);
    msg = error_of([&] { load_hf(tmp2.str()); });
    CHECK(has(msg, "\"model.layers.2.shared_head.head.weight\""));
    CHECK(has(msg, "a copy of the shared output head"));
}

TEST_CASE("io: a config.json that declares more than the safetensors hold is an error before any allocation") {
    // Only model_type: transformers' defaults, the 671B model (11 TB to allocate), next to a file of one tensor.
    TempDir tmp("declared");
    write_bytes(tmp.file("config.json"), R"({"model_type": "deepseek_v3"})");
    const float one = 1;
    write_safetensors(tmp.file("model.safetensors"), {{"model.norm.weight", {1}, &one}});
    const std::string msg = error_of([&] { load_hf(tmp.str()); });
    CHECK(has(msg, "model.norm.weight\" in "));
    CHECK(has(msg, "expected shape [7168] (from config.json), found [1]"));
    CHECK_FALSE(has(msg, "memory"));  // the headers decided it, not an allocation
}

TEST_CASE("io: .npy round trip and token rows") {
    TempDir tmp("npy");
    const std::vector<float> x = {1, -2, 3.5f, 0, 5, 6};
    for (const std::vector<int64_t>& shape : {std::vector<int64_t>{2, 3}, std::vector<int64_t>{6}, std::vector<int64_t>{1, 2, 3}}) {
        write_npy(tmp.file("x.npy"), x.data(), shape);
        const std::string raw = read_text(tmp.file("x.npy"));
        CHECK((raw.size() - 6 * 4) % 64 == 0);  // data aligned to 64 bytes
        CHECK(raw.compare(0, 8, std::string("\x93NUMPY\x01\x00", 8)) == 0);
        std::vector<int64_t> back_shape;
        CHECK(read_npy(tmp.file("x.npy"), &back_shape) == x);
        CHECK(back_shape == shape);
    }
    CHECK(has(read_text(tmp.file("x.npy")), "'shape': (1, 2, 3), }"));
    write_npy(tmp.file("v.npy"), x.data(), {6});
    CHECK(has(read_text(tmp.file("v.npy")), "'shape': (6,), }"));
    const TokenRows r = parse_token_rows("1,2,3;4, 5, 6");
    CHECK(r.B == 2);
    CHECK(r.T == 3);
    CHECK(r.tokens == std::vector<int32_t>{1, 2, 3, 4, 5, 6});
    CHECK(has(error_of([] { parse_token_rows("1,2;3"); }), "row 1 has 1 tokens"));
    CHECK(has(error_of([] { parse_token_rows("1,x"); }), "the token id at character 2: expected an integer in [0, 2147483647], got 'x'"));
    CHECK(has(error_of([] { parse_token_rows("1,-3"); }), "got '-3'"));
    // .npy files that declare more than they hold, or a shape that is not one
    auto npy_error = [&](const std::string& dict, size_t data_bytes) {
        std::string bytes = std::string("\x93NUMPY\x01\x00", 8);
        bytes += char(dict.size() & 0xFF), bytes += char(dict.size() >> 8);
        write_bytes(tmp.file("bad.npy"), bytes + dict + std::string(data_bytes, '\0'));
        return error_of([&] { read_npy(tmp.file("bad.npy")); });
    };
    CHECK(npy_error("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", 24) == "<no error>");
    CHECK(has(npy_error("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }\n", 8), "shape[1]: expected an integer"));
    CHECK(has(npy_error("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }\n", 8), "got '-3'"));
    CHECK(has(npy_error("{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 1048576, 2), }\n", 8), "more than 2^40"));
    CHECK(has(npy_error("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000), }\n", 8),
              "needs 4000000000 bytes of data, found 8"));
    CHECK(has(error_of([] { parse_token_rows("1;;2"); }), "row 1 is empty"));
}

TEST_CASE("io: the transformers-style forward equals the loss over T-1 predictions, with its gradient") {
    // transformers: logits for T positions, loss = mean CE of the B·(T−1) next-token predictions. Our row of T tokens
    // plus a final kIgnore must give the same loss and gradients as Model::forward on the first T tokens with T−1
    // positions (causal attention: position T−1 changes nothing before it).
    const Config c = io_config();
    Model a = io_model(c), b = io_model(c);
    const int B = 2, T = 6;
    const TokenRows rows = some_rows(c, B, T, 4);
    const double loss = forward_like_transformers(a, rows, true);
    LossOptions opt;
    opt.with_mtp = false;
    const Losses ref = b.forward_backward(rows.tokens.data(), B, T - 1, opt);
    CHECK(loss == doctest::Approx(ref.main).epsilon(1e-6));
    // manual mean CE from the logits
    double manual = 0;
    for (int bb = 0; bb < B; ++bb)
        for (int t = 0; t + 1 < T; ++t) {
            const float* z = a.logits() + (int64_t(bb) * T + t) * c.vocab_size;
            double mx = z[0], sum = 0;
            for (int i = 1; i < c.vocab_size; ++i) mx = std::max(mx, double(z[i]));
            for (int i = 0; i < c.vocab_size; ++i) sum += std::exp(z[i] - mx);
            manual += std::log(sum) + mx - z[rows.tokens[size_t(bb * T + t + 1)]];
        }
    CHECK(loss == doctest::Approx(manual / (B * (T - 1))).epsilon(1e-6));
    double diff2 = 0, norm2 = 0;
    for (const ParamEntry& e : a.layout.entries) {
        if (e.mtp_module >= 0) continue;
        for (size_t i = 0; i < e.size; ++i) {
            const double d = double(a.grads[e.offset + i]) - b.grads[e.offset + i];
            diff2 += d * d;
            norm2 += double(b.grads[e.offset + i]) * b.grads[e.offset + i];
        }
    }
    CHECK(norm2 > 0);
    CHECK(std::sqrt(diff2 / norm2) < 1e-5);
    // The gradients file holds every main-model tensor but the routing bias.
    TempDir tmp("grads");
    write_gradients_hf(tmp.file("g.safetensors"), a);
    SafetensorsFile g(tmp.file("g.safetensors"));
    CHECK(g.find("model.embed_tokens.weight") != nullptr);
    CHECK(g.find("model.layers.1.mlp.gate.e_score_correction_bias") == nullptr);
    CHECK(g.find("model.layers.2.eh_proj.weight") == nullptr);
    const std::vector<float> ge = g.read_floats("lm_head.weight");
    CHECK(std::memcmp(ge.data(), a.grads.data() + a.layout.head.w, ge.size() * 4) == 0);
    CHECK(has(error_of([&] { TokenRows bad = rows; bad.tokens[3] = c.vocab_size; forward_like_transformers(a, bad, false); }),
              "outside the vocabulary"));
}

TEST_CASE("io: logits and gradients match transformers on tests/reference cases (when present)") {
    // A case written in the reference layout by ourselves checks the comparison itself.
    TempDir tmp("refcase");
    Config c = io_config();
    c.n_mtp_depth = 0;
    Model m = io_model(c);
    save_hf(tmp.str(), m);
    const TokenRows rows = parse_token_rows("0,1,2,3,4;5,6,7,8,9");
    const double loss = forward_like_transformers(m, rows, true);
    write_npy(tmp.file("logits.npy"), m.logits(), {rows.B, rows.T, c.vocab_size});
    write_gradients_hf(tmp.file("grads.safetensors"), m);
    write_bytes(tmp.file("tokens.txt"), "0,1,2,3,4;5,6,7,8,9\n");
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.9g\n", loss);
    write_bytes(tmp.file("loss.txt"), buf);
    check_reference_case(tmp.str());
    // The real cases, produced by transformers.
    int cases = 0;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator("tests/reference", ec)) {
        if (!entry.is_directory() || !fs::exists(entry.path() / "logits.npy")) continue;
        check_reference_case(entry.path().string());
        ++cases;
    }
    MESSAGE(cases, " transformers reference case(s) found under tests/reference");
}
