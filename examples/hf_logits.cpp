// hf_logits: run a Hugging Face-format DeepSeek-V3 directory the way transformers does, and write what it computes.
//
//     build/hf_logits --model DIR --tokens 1,2,3[;4,5,6...] --out logits.npy [--grads grads.safetensors]
//
// DIR holds config.json and model.safetensors (or shards with model.safetensors.index.json), in any mix of
// F32/BF16/F16 and DeepSeek's block-scaled FP8, as written by transformers' save_pretrained, by DeepSeek, or by
// dsv3::save_hf. Token rows are separated by ';' and must have equal lengths. The program writes
//   logits.npy          float32 [B, T, vocab]: the logits at every position, as DeepseekV3ForCausalLM(input_ids)
//   grads.safetensors   (with --grads) F32 gradients, under their HF names, of the loss transformers computes for
//                       model(input_ids, labels=input_ids): the mean next-token cross-entropy over the B·(T−1)
//                       predictions. No MTP loss and no balance loss (transformers has neither); the routing bias,
//                       which has no gradient, is not written.
// tests/reference/make_reference.py compares these files with transformers' own (its --check-ours mode).
#include "../deepseek_v3.hpp"

#include <cstdio>
#include <string>

static void usage() {
    std::printf(
        "usage: hf_logits [options]\n"
        "Runs a Hugging Face DeepSeek-V3 directory as transformers does and writes its logits (and gradients).\n"
        "  --model DIR           config.json and model.safetensors (or shards) (required)\n"
        "  --tokens ROWS         token ids, rows separated by ';' of equal lengths: 1,2,3;4,5,6 (required)\n"
        "  --out FILE            the logits, float32 [B, T, vocab] .npy (required)\n"
        "  --grads FILE          also the loss's F32 gradients, as safetensors under their HF names (default: none)\n"
        "  --help, -h            this text\n");
}

int main(int argc, char** argv) {
    try {
        std::string model_dir, tokens, out, grads;
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) dsv3::fail(k, ": expected a value");
                return argv[++i];
            };
            if (k == "--model") model_dir = value();
            else if (k == "--tokens") tokens = value();
            else if (k == "--out") out = value();
            else if (k == "--grads") grads = value();
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else dsv3::fail("unknown option \"", k, "\" (see hf_logits --help)");
        }
        if (model_dir.empty() || tokens.empty() || out.empty())
            dsv3::fail("--model, --tokens and --out are required (see hf_logits --help)");
        const double t0 = dsv3::now_seconds();
        dsv3::Model model = dsv3::load_hf(model_dir);
        const dsv3::TokenRows rows = dsv3::parse_token_rows(tokens);
        const double t1 = dsv3::now_seconds();
        const double loss = dsv3::forward_like_transformers(model, rows, !grads.empty());
        const double t2 = dsv3::now_seconds();
        const dsv3::Config& c = model.cfg;
        dsv3::write_npy(out, model.logits(), {rows.B, rows.T, c.vocab_size});
        if (!grads.empty()) dsv3::write_gradients_hf(grads, model);
        std::printf("model %s: %d layers (%d dense), dim %d, %d routed experts, %zu parameters; loaded in %.2f s\n",
                    model_dir.c_str(), c.n_layers, c.n_dense_layers, c.dim, c.n_routed_experts, model.params.size(),
                    t1 - t0);
        std::printf("tokens: %d row(s) x %d; mean next-token cross-entropy over %d predictions: %.6f nats (%.2f s)\n",
                    rows.B, rows.T, rows.B * (rows.T - 1), loss, t2 - t1);
        std::printf("wrote %s [%d, %d, %d]%s%s\n", out.c_str(), rows.B, rows.T, c.vocab_size,
                    grads.empty() ? "" : " and ", grads.c_str());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "hf_logits: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "hf_logits: error: unknown exception\n");
        return 1;
    }
    return 0;
}
