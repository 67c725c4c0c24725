// build/generate: loads a trained model and continues a prompt, with the latent KV cache (section 7 of the header).
//
//   build/generate                                        runs/tiny/checkpoint.bin (what `make train` saves)
//   build/generate --checkpoint runs/tiny/checkpoint.bin --prompt "ROMEO:" --tokens 200 --temperature 0.8 --top-k 40
//   build/generate --model runs/tiny/hf                   a Hugging Face directory (config.json + safetensors)
//   build/generate --mtp                                  MTP speculative decoding [V3 §5.4.3]: same tokens, fewer
//                                                         main-model forwards; prints the draft acceptance rate
//   build/generate --naive                                attention over up-projected keys/values instead of the
//                                                         absorbed latent attention (same output, slower)
//
// Tokens are bytes (vocab 256, as build/train uses), or BPE tokens with --tokenizer FILE (see build/prepare_data).
#include <cstdio>
#include <string>

#include "../deepseek_v3.hpp"

using namespace dsv3;

static void usage() {
    std::printf(
        "usage: generate [--checkpoint FILE | --model HF_DIR] [--prompt TEXT] [--tokens N] [--temperature T]\n"
        "                [--top-k K] [--top-p P] [--seed S] [--mtp] [--naive] [--tokenizer FILE]\n");
}

int main(int argc, char** argv) {
    try {
        std::string checkpoint = "runs/tiny/checkpoint.bin", hf_dir, prompt = "ROMEO:\n", tokenizer_path;
        int n_tokens = 200;
        uint64_t seed = 1;
        bool mtp = false, absorbed = true;
        SamplingOptions s;
        s.temperature = 0.8f;
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) fail("option ", k, " needs a value");
                return argv[++i];
            };
            if (k == "--checkpoint") checkpoint = value();
            else if (k == "--model") hf_dir = value();
            else if (k == "--prompt") prompt = value();
            else if (k == "--tokens") n_tokens = int(parse_int(value(), k, 1, 1 << 24));
            else if (k == "--temperature") s.temperature = float(parse_float(value(), k, 0, 100));  // 0: greedy
            else if (k == "--top-k") s.top_k = int(parse_int(value(), k, 0, 1 << 24));             // 0: all tokens
            else if (k == "--top-p") s.top_p = float(parse_float(value(), k, 0, 1));
            else if (k == "--seed") seed = uint64_t(parse_int(value(), k, 0, LLONG_MAX));
            else if (k == "--tokenizer") tokenizer_path = value();
            else if (k == "--mtp") mtp = true;
            else if (k == "--naive") absorbed = false;
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else { usage(); fail("unknown option '", k, "'"); }
        }
        Model model = hf_dir.empty() ? Model(read_checkpoint_config(checkpoint), 0) : load_hf(hf_dir);
        if (hf_dir.empty()) {
            AdamW unused;
            load_checkpoint(checkpoint, model, unused);
        }
        Tokenizer tokenizer;
        if (!tokenizer_path.empty()) tokenizer = Tokenizer::load(tokenizer_path);
        std::vector<int32_t> ids;
        if (tokenizer_path.empty()) {
            if (model.cfg.vocab_size < 256) fail("the model's vocabulary has ", model.cfg.vocab_size, " tokens: bytes need 256 (give --tokenizer)");
            for (unsigned char ch : prompt) ids.push_back(int32_t(ch));
        } else {
            for (uint32_t t : tokenizer.encode(prompt)) ids.push_back(int32_t(t));
            if (int(tokenizer.vocab_size()) > model.cfg.vocab_size)
                fail("tokenizer ", tokenizer_path, " has ", tokenizer.vocab_size(), " tokens, the model only ", model.cfg.vocab_size);
        }
        GenerationStats st;
        const std::vector<int32_t> out = generate(model, ids, n_tokens, s, seed, mtp, &st, absorbed);
        std::string text;
        if (tokenizer_path.empty())
            for (int32_t t : out) text.push_back(char(t));
        else
            text = tokenizer.decode(out);
        std::printf("%s%s\n\n", prompt.c_str(), text.c_str());
        std::printf("%d tokens in %.3f s: %.1f tokens/s (%s attention, %d threads; context %d, %d restarts)\n",
                    st.generated, st.seconds, st.generated / st.seconds, absorbed ? "absorbed" : "naive",
                    thread_count(), model.cfg.max_seq_len, st.restarts);
        if (mtp)
            std::printf("MTP speculative decoding: %d of %d drafts accepted (%.1f%%), %.2f tokens per main-model forward\n",
                        st.accepted, st.drafted, 100 * st.acceptance(), st.tokens_per_forward());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "generate: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "generate: error: unknown exception\n");
        return 1;
    }
}
