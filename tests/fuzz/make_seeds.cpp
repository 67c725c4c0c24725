// build/fuzz/make_seeds DIR: the fuzzers' first inputs, written by the project's own writers into DIR/<target>/
// (json, safetensors, checkpoint, tokens, tokenizer, npy), so that every run starts from valid files of each format
// and mutates them. The model is small (a few thousand parameters) so that the files stay small and fast to mutate.
#include <cstdio>
#include <string>

#include "../../deepseek_v3.hpp"

using namespace dsv3;

static Config small_config() {  // every structural feature: query LoRA, a dense and an MoE layer, groups, YaRN, MTP
    Config c;
    c.vocab_size = 13; c.dim = 8; c.inter_dim = 12; c.moe_inter_dim = 4;
    c.n_layers = 2; c.n_dense_layers = 1; c.n_heads = 2;
    c.n_routed_experts = 4; c.n_activated_experts = 2; c.n_expert_groups = 2; c.n_limited_groups = 1;
    c.q_lora_rank = 4; c.kv_lora_rank = 4; c.qk_nope_head_dim = 2; c.qk_rope_head_dim = 2; c.v_head_dim = 2;
    c.max_seq_len = 16; c.rope_factor = 4; c.original_seq_len = 4; c.mscale = 0.707f;
    return c;
}

int main(int argc, char** argv) {
    try {
        if (argc != 2) fail("usage: make_seeds DIR");
        const std::string dir = argv[1];
        auto target = [&](const char* name) {
            make_directories(dir + "/" + name);
            return dir + "/" + name + "/";
        };
        const Config c = small_config();
        const Model model(c, 1);

        std::string d = target("json");  // config.json of the small model, the 671B preset, and other JSON
        write_hf_config(d + "config.json", c);
        write_hf_config(d + "config_671b.json", Config::v3_671b(), "bfloat16");
        write_hf_config(d + "config_v2_lite.json", Config::v2_lite());
        write_file_atomic(d + "grammar.json", std::string(R"({"a": [1, -2.5e-3, true, false, null], "s": "\u00e9\ud83d\ude00\n"})"));

        d = target("safetensors");  // the model's weights, and every dtype with an empty and a scalar tensor
        save_hf(d + "hf", model);
        std::rename((d + "hf/model.safetensors").c_str(), (d + "model.safetensors").c_str());
        std::filesystem::remove_all(d + "hf");
        const std::vector<float> x = {1.5f, -2, 0, 3e-5f, 448, -0.0f};
        std::vector<TensorToWrite> all;
        for (DType t : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3, DType::F8_E5M2})
            all.push_back({std::string("t_") + dtype_name(t), {2, 3}, x.data(), t});
        all.push_back({"empty", {0, 4}, nullptr, DType::F32});
        all.push_back({"scalar", {}, x.data(), DType::F32});
        write_safetensors(d + "dtypes.safetensors", all);

        d = target("checkpoint");
        AdamW opt;
        opt.step = 3;
        save_checkpoint(d + "checkpoint.bin", model, opt);

        d = target("tokens");
        write_tokens(d + "bytes.bin", {0, 1, 255, 7, 7, 42}, 256);
        write_tokens(d + "wide.bin", {0, 70000, 5}, 70001);
        write_tokens(d + "empty.bin", {}, 300);

        d = target("tokenizer");
        Tokenizer::bytes_only().save(d + "bytes.tokenizer");
        Tokenizer::train(synthetic_corpus(4000, 1), 300).save(d + "bpe300.tokenizer");

        d = target("npy");
        write_npy(d + "matrix.npy", x.data(), {2, 3});
        write_npy(d + "vector.npy", x.data(), {6});
        write_npy(d + "scalar.npy", x.data(), {});
        write_npy(d + "empty.npy", nullptr, {0, 3});
        std::printf("make_seeds: seeds for json, safetensors, checkpoint, tokens, tokenizer and npy in %s\n", dir.c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "make_seeds: error: %s\n", e.what());
        return 1;
    }
}
