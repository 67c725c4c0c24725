// prepare_data: text -> tokenizer + train/validation token files.
//
//   build/prepare_data --text data/tinyshakespeare.txt --vocab 512 --out data/
//   build/prepare_data --synthetic 1000000 --vocab 256 --out data/      (the built-in synthetic corpus)
//   build/prepare_data --help                                           every option and its default
//
// The text is split by bytes like nanoGPT: the first 90% for training, the last 10% for validation. With
// --vocab 256 there are no merges (one token per byte, as nanoGPT's character-level Shakespeare); with a larger
// vocabulary a byte-level BPE tokenizer is trained on the training split only, so validation text never shapes
// the tokenizer. Writes, with STEM the text file's name without extension (or "synthetic"):
//   OUT/STEM_vN.tokenizer    the tokenizer (text format, see Tokenizer::save)
//   OUT/STEM_vN_train.bin    training tokens       (token file format, see write_tokens)
//   OUT/STEM_vN_val.bin      validation tokens
#include "../deepseek_v3.hpp"

#include <chrono>
#include <cstdio>
#include <string>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void usage() {
    std::printf(
        "usage: prepare_data [options]\n"
        "Tokenizes a text (bytes or a BPE trained on its training split) into train and validation token files.\n"
        "  --text FILE           text to tokenize, e.g. data/tinyshakespeare.txt from data/download.sh (default:\n"
        "                        none; give --text or --synthetic)\n"
        "  --synthetic BYTES     the built-in synthetic corpus of that many bytes instead (default: none)\n"
        "  --seed S              the synthetic corpus's seed (default 1)\n"
        "  --vocab N             ordinary tokens: 256 = bytes only (no training), more = BPE merges (default 256)\n"
        "  --out DIR             where the files go (default data); --out-dir DIR is the same\n"
        "  --val-fraction F      last fraction kept for validation (default 0.1)\n"
        "  --help, -h            this text\n");
}

}  // namespace

int main(int argc, char** argv) {
    try {
        std::string text_path, out_dir = "data";
        long long synthetic_bytes = 0;
        unsigned long long seed = 1;
        int vocab = 256;
        double val_fraction = 0.1;
        for (int i = 1; i < argc; ++i) {
            const std::string k = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) dsv3::fail(k, ": expected a value");
                return argv[++i];
            };
            if (k == "--text") text_path = value();
            else if (k == "--synthetic") synthetic_bytes = dsv3::parse_int(value(), k, 1, 1LL << 36);
            else if (k == "--seed") seed = (unsigned long long)dsv3::parse_int(value(), k, 0, LLONG_MAX);
            else if (k == "--vocab") vocab = int(dsv3::parse_int(value(), k, 256, 1 << 20));
            else if (k == "--out" || k == "--out-dir") out_dir = value();  // --out-dir: the Makefile's older name
            else if (k == "--val-fraction") val_fraction = dsv3::parse_float(value(), k, 0.0, 0.999);
            else if (k == "--help" || k == "-h") { usage(); return 0; }
            else dsv3::fail("unknown option \"", k, "\" (see prepare_data --help)");
        }
        if (text_path.empty() == (synthetic_bytes <= 0))
            dsv3::fail("give exactly one of --text FILE and --synthetic BYTES (see prepare_data --help)");
        const auto t_start = std::chrono::steady_clock::now();
        std::string text, stem;
        if (!text_path.empty()) {
            try {
                text = dsv3::read_file_bytes(text_path);
            } catch (const dsv3::Error& e) {
                dsv3::fail(e.what(), "\n(for Tiny Shakespeare run data/download.sh, or make data)");
            }
            stem = text_path.substr(text_path.find_last_of('/') + 1);
            stem = stem.substr(0, stem.find('.'));
            std::printf("text        %s: %zu bytes\n", text_path.c_str(), text.size());
        } else {
            text = dsv3::synthetic_corpus(size_t(synthetic_bytes), seed);
            stem = "synthetic";
            std::printf("text        synthetic corpus, seed %llu: %zu bytes, best possible loss %.4f nats/byte\n", seed,
                        text.size(), dsv3::synthetic_corpus_entropy_nats_per_byte());
        }
        if (text.empty()) dsv3::fail("text '", text_path, "' is empty; nothing to tokenize");
        const size_t cut = dsv3::train_val_split_point(text.size(), val_fraction);
        const std::string_view train_text = std::string_view(text).substr(0, cut), val_text = std::string_view(text).substr(cut);
        std::printf("split       train %zu bytes, validation %zu bytes (last %.0f%%)\n", train_text.size(), val_text.size(),
                    100 * val_fraction);

        auto t0 = std::chrono::steady_clock::now();
        const dsv3::Tokenizer tok = vocab == 256 ? dsv3::Tokenizer::bytes_only() : dsv3::Tokenizer::train(train_text, vocab);
        const double t_train = seconds_since(t0);
        if (vocab != 256)
            std::printf("tokenizer   byte-level BPE, %d merges learned on the training split in %.2f s%s\n",
                        int(tok.merges.size()), t_train,
                        tok.n_ordinary() < vocab ? " (stopped early: no pair occurs twice)" : "");
        else
            std::printf("tokenizer   bytes only (vocab 256: one token per byte, no training)\n");
        std::printf("vocabulary  %d tokens = %d ordinary + %zu special (BOS, EOS, FIM begin/hole/end)\n", tok.vocab_size(),
                    tok.n_ordinary(), tok.specials.size());

        t0 = std::chrono::steady_clock::now();
        const std::vector<uint32_t> train = tok.encode(train_text), val = tok.encode(val_text);
        const double t_encode = seconds_since(t0);
        std::printf("encoded     train %zu tokens, validation %zu tokens in %.2f s (%.1f MB/s)\n", train.size(), val.size(),
                    t_encode, double(text.size()) / 1e6 / std::max(t_encode, 1e-9));
        std::printf("compression %.3f bytes per token (train), %.3f (validation)\n",
                    double(train_text.size()) / double(std::max<size_t>(train.size(), 1)),
                    double(val_text.size()) / double(std::max<size_t>(val.size(), 1)));

        const std::string base = out_dir + "/" + stem + "_v" + std::to_string(vocab);
        tok.save(base + ".tokenizer");
        dsv3::write_tokens(base + "_train.bin", train, uint32_t(tok.vocab_size()));
        dsv3::write_tokens(base + "_val.bin", val, uint32_t(tok.vocab_size()));
        std::printf("wrote       %s.tokenizer\n            %s_train.bin\n            %s_val.bin\n", base.c_str(),
                    base.c_str(), base.c_str());
        std::printf("time        %.2f s\n", seconds_since(t_start));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "prepare_data: error: %s\n", e.what());
        return 1;
    } catch (...) {  // not a std::exception: still a message and a non-zero exit, not std::terminate
        std::fprintf(stderr, "prepare_data: error: unknown exception\n");
        return 1;
    }
    return 0;
}
