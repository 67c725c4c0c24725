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
// Tokens are bytes (vocab 256, as build/train uses on text), or BPE tokens: the tokenizer recorded in the checkpoint
// by `build/train --tokens`, or --tokenizer FILE. The default prompt is the one the checkpoint records, the start of
// its training text (so it fits the corpus: synthetic, Tiny Shakespeare or another).
//   build/generate --prompt - < prompt.txt                the prompt from standard input
//   build/generate --interactive                          one prompt a line, until end of input (Ctrl-D)
#include <cstdio>
#include <iostream>
#include <string>

#include "../deepseek_v3.hpp"

using namespace dsv3;

static void usage() {
    std::printf(
        "usage: generate [options]\n"
        "Loads a trained model and continues a prompt with the latent KV cache, printing the text and its speed.\n"
        "  --checkpoint FILE     a checkpoint of build/train (default runs/tiny/checkpoint.bin)\n"
        "  --model HF_DIR        a Hugging Face directory (config.json + safetensors) instead\n"
        "  --prompt TEXT         the text to continue (default: the one the checkpoint records, the start of its\n"
        "                        training text; else a line break); \"-\" reads it from standard input\n"
        "  --interactive         read prompts from standard input, one a line (\\n in a line is a line break), and\n"
        "                        continue each, until the end of the input\n"
        "  --tokens N            tokens to generate (default 200)\n"
        "  --temperature T       sampling temperature (default 0.8; 0: greedy)\n"
        "  --top-k K             sample among the K likeliest tokens (default 0: all)\n"
        "  --top-p P             nucleus sampling (default 1: off)\n"
        "  --seed S              sampling seed (default 1; the i-th interactive prompt uses S + i)\n"
        "  --mtp                 MTP speculative decoding\n"
        "  --naive               attention over up-projected keys/values, not the absorbed latent attention\n"
        "  --tokenizer FILE      BPE tokenizer (default: the one the checkpoint records; none: bytes)\n"
        "  --help, -h            this text\n");
}

int main(int argc, char** argv) {
    prefer_sleeping_threads(argv);  // a shared CPU: OpenMP threads that wait sleep (the header, section 2)
    try {
        std::string checkpoint = "runs/tiny/checkpoint.bin", hf_dir, prompt, tokenizer_path;
        int n_tokens = 200;
        uint64_t seed = 1;
        bool mtp = false, absorbed = true, interactive = false, prompt_given = false;
        SamplingOptions s;
        s.temperature = 0.8f;
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) fail(k, ": expected a value");
                return argv[++i];
            };
            if (k == "--checkpoint") checkpoint = value();
            else if (k == "--model") hf_dir = value();
            else if (k == "--prompt") { prompt = value(); prompt_given = true; }
            else if (k == "--interactive") interactive = true;
            else if (k == "--tokens") n_tokens = int(parse_int(value(), k, 1, 1 << 24));
            else if (k == "--temperature") s.temperature = float(parse_float(value(), k, 0, 100));  // 0: greedy
            else if (k == "--top-k") s.top_k = int(parse_int(value(), k, 0, 1 << 24));             // 0: all tokens
            else if (k == "--top-p") s.top_p = float(parse_float(value(), k, 0, 1));
            else if (k == "--seed") seed = uint64_t(parse_int(value(), k, 0, LLONG_MAX));
            else if (k == "--tokenizer") tokenizer_path = value();
            else if (k == "--mtp") mtp = true;
            else if (k == "--naive") absorbed = false;
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else fail("unknown option \"", k, "\" (see generate --help)");
        }
        if (interactive && prompt_given) fail("--interactive reads its prompts from standard input: no --prompt");
        Model model = hf_dir.empty() ? Model(read_checkpoint_config(checkpoint), 0) : load_hf(hf_dir);
        RunInfo run;  // what the checkpoint records of its training run: the tokenizer, a prompt
        if (hf_dir.empty()) {
            AdamW unused;
            load_checkpoint(checkpoint, model, unused, &run);
        }
        if (tokenizer_path.empty()) tokenizer_path = run.get("tokenizer");
        const Tokenizer tokenizer = tokenizer_path.empty() ? Tokenizer::bytes_only() : Tokenizer::load(tokenizer_path);
        if (tokenizer_path.empty() && model.cfg.vocab_size < 256)
            fail("the model's vocabulary has ", model.cfg.vocab_size, " tokens: bytes need 256 (give --tokenizer)");
        if (!tokenizer_path.empty() && tokenizer.vocab_size() > model.cfg.vocab_size)
            fail("tokenizer ", tokenizer_path, " has ", tokenizer.vocab_size(), " tokens, the model only ", model.cfg.vocab_size);
        if (prompt == "-") prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
        else if (!prompt_given) prompt = run.get("prompt", "\n");

        // One continuation: the prompt, the generated text, and the speed.
        auto continue_text = [&](const std::string& text, uint64_t sample_seed) {
            std::vector<int32_t> ids;
            for (uint32_t t : tokenizer.encode(text)) ids.push_back(int32_t(t));
            if (ids.empty()) fail("the prompt is empty: give at least one byte");
            GenerationStats st;
            const std::vector<int32_t> out = generate(model, ids, n_tokens, s, sample_seed, mtp, &st, absorbed);
            // A model may have more ids than its tokenizer (bytes for a vocabulary of 8192): those print as <id N>.
            std::string shown;
            for (int32_t t : out)
                shown += uint32_t(t) < uint32_t(tokenizer.vocab_size()) ? tokenizer.decode(&t, 1)
                                                                        : "<id " + std::to_string(t) + ">";
            std::printf("%s%s\n\n", text.c_str(), shown.c_str());
            std::printf("%d tokens in %.3f s: %.1f tokens/s (%s attention, %d threads; context %d, %d restarts)\n",
                        st.generated, st.seconds, st.generated / st.seconds, absorbed ? "absorbed" : "naive",
                        thread_count(), model.cfg.max_seq_len, st.restarts);
            std::printf("prompt of %d tokens and the first token in %.3f s, then decoding at %.1f tokens/s\n",
                        st.prompt_tokens, st.first_token_seconds, st.decode_tokens_per_second());
            if (mtp)
                std::printf("MTP speculative decoding: %d of %d drafts accepted (%.1f%%), %.2f tokens per main-model "
                            "forward\n", st.accepted, st.drafted, 100 * st.acceptance(), st.tokens_per_forward());
            std::fflush(stdout);
        };
        if (!interactive) {
            continue_text(prompt, seed);
            return 0;
        }
        std::printf("a prompt a line (\\n for a line break), Ctrl-D to end; e.g. %s\n> ", escape_bytes(run.get("prompt", "\n")).c_str());
        std::fflush(stdout);
        std::string line;
        for (uint64_t i = 0; std::getline(std::cin, line); ++i) {
            try {
                if (!line.empty()) continue_text(unescape_bytes(line, "prompt"), seed + i);
            } catch (const Error& e) {  // a malformed line: say so, and read the next one
                std::printf("error: %s\n", e.what());
            }
            std::printf("> ");
            std::fflush(stdout);
        }
        std::printf("\n");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "generate: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "generate: error: unknown exception\n");
        return 1;
    }
}
