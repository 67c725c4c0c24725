// Tests of sections 11-12 (data, plots and progress): tokenizer, token files and datasets, FIM, synthetic corpus,
// plots, progress line. Tiny Shakespeare is used when it is found (DSV3_TINYSHAKESPEARE, data/tinyshakespeare.txt or
// ../shared/data/tinyshakespeare.txt); tests that need it fall back to the synthetic corpus or say they skipped.
#include <doctest/doctest.h>

#include "../deepseek_v3.hpp"

#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

namespace fs = std::filesystem;

std::string shakespeare_path() {
    std::vector<std::string> candidates = {"data/tinyshakespeare.txt", "../shared/data/tinyshakespeare.txt"};
    if (const char* env = std::getenv("DSV3_TINYSHAKESPEARE")) candidates.insert(candidates.begin(), env);
    for (const std::string& p : candidates)
        if (fs::exists(p)) return p;
    return "";
}

// A slice of Tiny Shakespeare if present, else of the synthetic corpus (so that every test still runs).
std::string training_text(size_t n_bytes) {
    const std::string path = shakespeare_path();
    if (!path.empty()) return dsv3::read_file_bytes(path).substr(0, n_bytes);
    return dsv3::synthetic_corpus(n_bytes, 123);
}

// A fresh directory for the files of one test.
std::string temp_dir(const std::string& name) {
    const fs::path p = fs::temp_directory_path() / ("dsv3_test_data_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(p);
    fs::create_directories(p);
    return p.string();
}

template <class F>
std::string error_of(const F& f) {
    try {
        f();
    } catch (const dsv3::Error& e) {
        return e.what();
    }
    return "<no error>";
}
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string random_bytes(dsv3::Rng& rng, size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = char(rng.below(256));
    return s;
}

// Reference BPE: recount every pair of every chunk occurrence before each merge. Slow, obviously right.
std::vector<std::pair<uint32_t, uint32_t>> naive_bpe(std::string_view text, int n_ordinary, int64_t min_count) {
    std::vector<std::vector<uint32_t>> words;
    dsv3::Tokenizer::for_each_chunk(text, [&](size_t b, size_t e) {
        words.emplace_back(reinterpret_cast<const uint8_t*>(text.data()) + b, reinterpret_cast<const uint8_t*>(text.data()) + e);
    });
    std::vector<std::pair<uint32_t, uint32_t>> merges;
    while (256 + int(merges.size()) < n_ordinary) {
        std::map<std::pair<uint32_t, uint32_t>, int64_t> counts;
        for (const auto& w : words)
            for (size_t i = 0; i + 1 < w.size(); ++i) ++counts[{w[i], w[i + 1]}];
        std::pair<uint32_t, uint32_t> best{};
        int64_t best_count = 0;
        for (const auto& [p, c] : counts)
            if (c > best_count) best = p, best_count = c;  // ascending order: ties keep the smallest pair
        if (best_count < min_count || best_count == 0) break;
        const uint32_t id = uint32_t(256 + merges.size());
        merges.push_back(best);
        for (auto& w : words) {
            std::vector<uint32_t> out;
            for (size_t i = 0; i < w.size();) {
                if (i + 1 < w.size() && w[i] == best.first && w[i + 1] == best.second) out.push_back(id), i += 2;
                else out.push_back(w[i++]);
            }
            w = out;
        }
    }
    return merges;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("tokenizer: bytes-only tokenizer and DeepSeek's special tokens") {
    const dsv3::Tokenizer tok = dsv3::Tokenizer::bytes_only();
    CHECK(tok.n_ordinary() == 256);
    CHECK(tok.vocab_size() == 261);
    CHECK(std::string(dsv3::Tokenizer::kBosText) == "<｜begin▁of▁sentence｜>");
    CHECK(std::string(dsv3::Tokenizer::kEosText) == "<｜end▁of▁sentence｜>");
    CHECK(std::string(dsv3::Tokenizer::kFimBeginText) == "<｜fim▁begin｜>");
    CHECK(std::string(dsv3::Tokenizer::kFimHoleText) == "<｜fim▁hole｜>");
    CHECK(std::string(dsv3::Tokenizer::kFimEndText) == "<｜fim▁end｜>");
    CHECK(tok.bos == 256);
    CHECK(tok.eos == 257);
    CHECK(tok.fim_begin == 258);
    CHECK(tok.fim_hole == 259);
    CHECK(tok.fim_end == 260);
    const std::string s("a\0\xff", 3);
    CHECK(tok.encode(s) == std::vector<uint32_t>{'a', 0, 255});
    CHECK(tok.decode(tok.encode(s)) == s);
    CHECK(tok.decode(std::vector<uint32_t>{tok.eos}) == "<｜end▁of▁sentence｜>");
    CHECK(contains(error_of([&] { tok.decode(std::vector<uint32_t>{261}); }), "outside the vocabulary of 261"));
}

TEST_CASE("tokenizer: pre-tokenizer chunks") {
    auto chunks = [](const std::string& s) {
        std::vector<std::string> out;
        dsv3::Tokenizer::for_each_chunk(s, [&](size_t b, size_t e) { out.push_back(s.substr(b, e - b)); });
        return out;
    };
    using V = std::vector<std::string>;
    CHECK(chunks("ROMEO:\nBut soft, what light") == V{"ROMEO", ":\n", "But", " soft", ",", " what", " light"});
    CHECK(chunks("  hello\n\n  world.\n\n") == V{" ", " hello", "\n\n ", " world", ".\n\n"});
    CHECK(chunks("x 12345!") == V{"x", " 123", "45", "!"});
    CHECK(chunks("caf\xc3\xa9 ok") == V{"caf\xc3\xa9", " ok"});  // UTF-8 stays inside the word
    CHECK(chunks("").empty());
    dsv3::Rng rng(5);  // chunks tile any byte string, and none is longer than the cap
    for (int i = 0; i < 50; ++i) {
        std::string s = random_bytes(rng, 600);
        if (i % 2) s += std::string(1000, 'a');
        std::string joined;
        for (const std::string& c : chunks(s)) {
            CHECK(!c.empty());
            CHECK(c.size() <= size_t(dsv3::Tokenizer::kMaxChunk));
            joined += c;
        }
        CHECK(joined == s);
    }
}

TEST_CASE("tokenizer: incremental training gives the same merges as recounting every pair") {
    const std::string text = training_text(20000);
    const auto tok = dsv3::Tokenizer::train(text, 400);
    const auto reference = naive_bpe(text, 400, 2);
    REQUIRE(tok.merges.size() == reference.size());
    CHECK(tok.merges == reference);
    // A text with many ties: every pair occurs equally often.
    const std::string ties = "abcd abcd dcba dcba xyzw xyzw ";
    CHECK(dsv3::Tokenizer::train(ties, 300).merges == naive_bpe(ties, 300, 2));
    // Repeated symbols (overlapping pairs "aaaa").
    const std::string runs = "aaaaaaa aaa aaaa baaab aa";
    CHECK(dsv3::Tokenizer::train(runs, 270, 1).merges == naive_bpe(runs, 270, 1));
}

TEST_CASE("tokenizer: training is deterministic, stops at the requested size, and compresses") {
    const std::string text = training_text(200000);
    const auto a = dsv3::Tokenizer::train(text, 1024), b = dsv3::Tokenizer::train(text, 1024);
    CHECK(a.merges == b.merges);
    CHECK(a.n_ordinary() == 1024);
    CHECK(a.vocab_size() == 1029);
    CHECK(a.bos == 1024);
    CHECK(a.fim_end == 1028);
    const auto ids = a.encode(text);
    CHECK(double(text.size()) / double(ids.size()) > 2.0);  // bytes per token
    CHECK(a.decode(ids) == text);
    // The training text encodes to the merges' own tokens: each merge's bytes encode to the merged token.
    for (int id = 256; id < a.n_ordinary(); id += 37) {
        std::string piece = a.pieces[size_t(id)];
        std::vector<uint32_t> one;
        a.encode_chunk(reinterpret_cast<const uint8_t*>(piece.data()), piece.size(), one);
        CHECK(one == std::vector<uint32_t>{uint32_t(id)});
    }
    CHECK(contains(error_of([&] { dsv3::Tokenizer::train(text, 100); }), "at least 256"));
    // Stops early when no pair repeats.
    CHECK(dsv3::Tokenizer::train("abcdef", 1000).n_ordinary() == 256);
}

TEST_CASE("tokenizer: exact round trip on random bytes, invalid UTF-8 and NUL") {
    const auto tok = dsv3::Tokenizer::train(training_text(100000), 1024);
    dsv3::Rng rng(11);
    for (int i = 0; i < 300; ++i) {
        std::string s = random_bytes(rng, size_t(rng.below(i < 100 ? 20 : 3000)));
        if (i % 3 == 0)  // mix in text so that merges apply
            s += training_text(5000).substr(size_t(rng.below(4000)), 500) + std::string("\0\xc3(\xe2\x82", 5);
        const std::vector<uint32_t> ids = tok.encode(s);
        for (uint32_t id : ids) CHECK(id < uint32_t(tok.n_ordinary()));
        REQUIRE(tok.decode(ids) == s);
    }
    CHECK(tok.encode("").empty());
    CHECK(tok.decode(tok.encode(std::string(5000, '\0'))) == std::string(5000, '\0'));
}

TEST_CASE("tokenizer: special tokens only when asked for") {
    const auto tok = dsv3::Tokenizer::train(training_text(50000), 600);
    const std::string text = std::string("def f():") + dsv3::Tokenizer::kFimHoleText + "return 1" + dsv3::Tokenizer::kEosText;
    const auto plain = tok.encode(text);
    for (uint32_t id : plain) CHECK(!tok.is_special(id));  // a document cannot forge a special token
    CHECK(tok.decode(plain) == text);
    const auto with = tok.encode_with_specials(text);
    CHECK(std::count(with.begin(), with.end(), tok.fim_hole) == 1);
    CHECK(with.back() == tok.eos);
    CHECK(tok.decode(with) == text);
    CHECK(tok.token_text(tok.fim_begin) == "<｜fim▁begin｜>");
    CHECK(tok.token_text('\n') == "\\n");
}

TEST_CASE("tokenizer: save and load") {
    const std::string dir = temp_dir("tokenizer");
    const auto tok = dsv3::Tokenizer::train(training_text(50000), 700);
    const std::string path = dir + "/tok.txt";
    tok.save(path);
    const std::string file = dsv3::read_file_bytes(path);
    CHECK(file.rfind("dsv3-bpe-tokenizer 1", 0) == 0);
    const auto back = dsv3::Tokenizer::load(path);
    CHECK(back.merges == tok.merges);
    CHECK(back.specials == tok.specials);
    CHECK(back.vocab_size() == tok.vocab_size());
    CHECK(back.eos == tok.eos);
    const std::string sample = training_text(3000);
    CHECK(back.encode(sample) == tok.encode(sample));

    // Bad files: the error names the file, the line, and what was expected.
    auto load_text = [&](const std::string& name, const std::string& text) {
        const std::string p = dir + "/" + name;
        dsv3::write_file_atomic(p, text);
        return std::make_pair(p, error_of([&] { dsv3::Tokenizer::load(p); }));
    };
    const std::string header = "dsv3-bpe-tokenizer 1\npretokenizer dsv3-chunks-1\n";
    std::string specials = "specials 5\n";
    for (const auto& s : tok.specials) specials += s + "\n";
    {
        const std::string p = load_text("missing.txt", "").first;
        std::remove(p.c_str());
        const std::string e = error_of([&] { dsv3::Tokenizer::load(p); });
        CHECK(contains(e, p));
        CHECK(contains(e, "cannot open"));
    }
    {
        auto [p, e] = load_text("magic.txt", "hello world\n");
        CHECK(contains(e, p));
        CHECK(contains(e, "line 1"));
        CHECK(contains(e, "expected 'dsv3-bpe-tokenizer 1'"));
    }
    {
        auto [p, e] = load_text("count.txt", header + "merges many\n");
        CHECK(contains(e, p));
        CHECK(contains(e, "line 3"));
        CHECK(contains(e, "'merges <count>'"));
    }
    {
        auto [p, e] = load_text("mergeline.txt", header + "merges 2\n97 98\n97 x\n" + specials + "end\n");
        CHECK(contains(e, p));
        CHECK(contains(e, "line 5"));
        CHECK(contains(e, "merge 1, right token id: expected an integer in [0, 2147483647], got 'x'"));
    }
    {
        auto [p, e] = load_text("mergewords.txt", header + "merges 2\n97 98\n97 98 99\n" + specials + "end\n");
        CHECK(contains(e, "line 5"));
        CHECK(contains(e, "two token ids"));
    }
    {
        auto [p, e] = load_text("toomany.txt", header + "merges 99999999999\n");
        CHECK(contains(e, "line 3"));
        CHECK(contains(e, "expected an integer in [0, 16777216], got '99999999999'"));
    }
    {
        auto [p, e] = load_text("future.txt", header + "merges 2\n97 98\n97 300\n" + specials + "end\n");
        CHECK(contains(e, "line 5"));
        CHECK(contains(e, "refers to token 300"));
    }
    {   // merges that double a piece at every step: a 520-byte file once built gigabytes of pieces
        std::string doubling = header + "merges 40\n0 0\n";
        for (int i = 0; i < 39; ++i) doubling += std::to_string(256 + i) + " " + std::to_string(256 + i) + "\n";
        auto [p, e] = load_text("doubling.txt", doubling + specials + "end\n");
        CHECK(contains(e, p));
        CHECK(contains(e, "merge 16 makes a piece of 131072 bytes"));
    }
    {
        auto [p, e] = load_text("short.txt", header + "merges 3\n97 98\n");
        CHECK(contains(e, p));
        CHECK(contains(e, "ends after line 4"));
        CHECK(contains(e, "merge line"));
    }
    {
        auto [p, e] = load_text("noend.txt", header + "merges 0\n" + specials);
        CHECK(contains(e, p));
        CHECK(contains(e, "expected 'end'"));
    }
    {
        auto [p, e] = load_text("nospecial.txt", header + "merges 0\nspecials 1\n<bos>\nend\n");
        CHECK(contains(e, p));
        CHECK(contains(e, "is missing"));
    }
    {
        auto [p, e] = load_text("dup.txt", header + "merges 2\n97 98\n97 98\n" + specials + "end\n");
        CHECK(contains(e, p));
        CHECK(contains(e, "repeats merge 0"));
    }
    fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------------------------
// Token files and datasets
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("dataset: token files round trip with 2- and 4-byte tokens") {
    const std::string dir = temp_dir("tokens");
    for (uint32_t vocab : {261u, 65536u, 100000u}) {
        dsv3::Rng rng(vocab);
        std::vector<uint32_t> tokens(1000);
        for (auto& t : tokens) t = uint32_t(rng.below(vocab));
        tokens[0] = vocab - 1;
        const std::string path = dir + "/t" + std::to_string(vocab) + ".bin";
        dsv3::write_tokens(path, tokens, vocab);
        CHECK(fs::file_size(path) == 32 + 1000 * (vocab <= 65536 ? 2 : 4));
        const auto d = dsv3::TokenDataset::load(path);
        CHECK(d.tokens == tokens);
        CHECK(d.vocab_size == vocab);
        CHECK(d.name == path);
    }
    CHECK(contains(error_of([&] { dsv3::write_tokens(dir + "/bad.bin", {5, 300}, 261); }), "token 300 at position 1"));
    fs::remove_all(dir);
}

TEST_CASE("dataset: each broken token file gives an error naming the file and the problem") {
    const std::string dir = temp_dir("broken");
    const std::string good_path = dir + "/good.bin";
    dsv3::write_tokens(good_path, std::vector<uint32_t>(100, 7), 512);
    const std::string good = dsv3::read_file_bytes(good_path);
    auto error_for = [&](const std::string& name, const std::string& bytes, int seq_len = 0) {
        const std::string p = dir + "/" + name;
        dsv3::write_file_atomic(p, bytes);
        const std::string e = error_of([&] { dsv3::TokenDataset::load(p, seq_len); });
        CHECK(contains(e, p));
        return e;
    };
    CHECK(contains(error_for("empty.bin", ""), "is empty"));
    CHECK(contains(error_for("text.bin", "First Citizen:\nBefore we proceed"), "wrong magic"));
    CHECK(contains(error_for("header.bin", good.substr(0, 20)), "shorter than its 32-byte header"));
    CHECK(contains(error_for("data.bin", good.substr(0, 32 + 150)), "truncated: its header promises 100 tokens"));
    CHECK(contains(error_for("extra.bin", good + "xyz"), "3 unexpected bytes"));
    std::string v2 = good;
    v2[8] = 2;
    CHECK(contains(error_for("version.bin", v2), "version 2"));
    std::string w3 = good;
    w3[12] = 3;
    CHECK(contains(error_for("width.bin", w3), "token width 3"));
    std::string big = good;
    big[32 + 2 * 5] = char(0xff), big[32 + 2 * 5 + 1] = char(0x7f);
    CHECK(contains(error_for("vocab.bin", big), "token 32767 at position 5 is outside its vocabulary of 512"));
    CHECK(contains(error_for("short.bin", good, 128), "shorter than one sequence"));
    CHECK(contains(error_of([&] { dsv3::TokenDataset::load(dir + "/nothere.bin"); }), dir + "/nothere.bin"));
    // One sequence exactly fits: 100 tokens = T + 1 for T = 99.
    CHECK(dsv3::TokenDataset::load(good_path, 99).tokens.size() == 100);
    fs::remove_all(dir);
}

TEST_CASE("dataset: train/validation split and deterministic batches") {
    std::vector<uint32_t> tokens(1000);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = uint32_t(i % 500);
    const auto all = dsv3::TokenDataset::from_tokens("toy", tokens, 500);
    const auto [train, val] = dsv3::split_train_val(all);
    CHECK(train.tokens.size() == 900);
    CHECK(val.tokens.size() == 100);
    CHECK(val.tokens.front() == 900 % 500);
    CHECK(dsv3::train_val_split_point(1115394) == 1003854);  // nanoGPT: int(n * 0.9)

    const int B = 4, T = 16;
    std::vector<int32_t> a(size_t(B) * (T + 1)), b(a.size());
    dsv3::Rng r1(42), r2(42);
    train.sample_batch(r1, B, T, a.data());
    train.sample_batch(r2, B, T, b.data());
    CHECK(a == b);
    train.sample_batch(r1, B, T, b.data());
    CHECK(a != b);
    for (int row = 0; row < B; ++row)  // each row is a contiguous window
        for (int t = 1; t <= T; ++t) CHECK((a[size_t(row * (T + 1) + t)] - a[size_t(row * (T + 1) + t - 1)] + 500) % 500 == 1);
    // Every start is possible, including the last one.
    std::set<int32_t> firsts;
    dsv3::Rng r3(1);
    const auto tiny = dsv3::TokenDataset::from_tokens("tiny", {0, 1, 2, 3, 4}, 5);
    std::vector<int32_t> w(6);  // room for the T = 5 request below, which must throw before writing
    for (int i = 0; i < 200; ++i) tiny.sample_batch(r3, 1, 3, w.data()), firsts.insert(w[0]);
    CHECK(firsts == std::set<int32_t>{0, 1});
    CHECK(contains(error_of([&] { tiny.sample_batch(r3, 1, 5, w.data()); }), "'tiny' holds 5 tokens, shorter than one sequence"));
}

TEST_CASE("dataset: evaluation windows cover the split exactly once") {
    std::vector<uint32_t> tokens(103);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = uint32_t(i);
    const auto val = dsv3::TokenDataset::from_tokens("val", tokens, 200);
    const int T = 10, B = 4;
    std::vector<int32_t> in(size_t(B) * (T + 1));
    std::vector<uint8_t> scored(size_t(B) * T);
    for (bool tail : {false, true}) {
        dsv3::EvalBatches it(val, T, tail);
        CHECK(it.n_windows() == (tail ? 11 : 10));
        std::vector<int> times_scored(tokens.size(), 0);
        int rows_total = 0;
        while (int rows = it.next(B, in.data(), scored.data())) {
            rows_total += rows;
            for (int r = 0; r < B; ++r)
                for (int t = 0; t < T; ++t) {
                    const size_t target = size_t(in[size_t(r * (T + 1) + t + 1)]);
                    if (r >= rows) CHECK(scored[size_t(r * T + t)] == 0);
                    else if (scored[size_t(r * T + t)]) ++times_scored[target];
                }
        }
        CHECK(rows_total == it.n_windows());
        CHECK(times_scored[0] == 0);
        int64_t n_scored = 0;
        for (size_t i = 1; i < tokens.size(); ++i) {
            CHECK(times_scored[i] == (tail || i <= 100 ? 1 : 0));
            n_scored += times_scored[i];
        }
        CHECK(n_scored == it.n_scored_targets());
        it.reset();
        CHECK(it.next(B, in.data(), scored.data()) == B);
    }
    dsv3::EvalBatches needs_mask(val, T, true);
    CHECK(contains(error_of([&] { needs_mask.next(B, in.data()); }), "needs the `scored` mask"));
}

// ---------------------------------------------------------------------------------------------------------------
// FIM
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("FIM: rate 0 keeps documents, rate 1 rearranges every one as prefix, suffix, middle") {
    const auto tok = dsv3::Tokenizer::train(training_text(50000), 600);
    std::vector<std::string> docs = dsv3::split_documents(training_text(20000));
    if (docs.size() < 20) docs = dsv3::split_documents(training_text(5000), "\n");  // synthetic: one line each
    REQUIRE(docs.size() > 20);
    docs.push_back("");
    docs.push_back("x");
    docs.push_back("na\xc3\xafve caf\xc3\xa9 \xe2\x82\xac");  // multi-byte characters must not be cut

    std::vector<uint32_t> expected;
    for (const auto& d : docs) {
        tok.encode_append(d, expected);
        expected.push_back(tok.eos);
    }
    CHECK(dsv3::fim_encode_documents(tok, docs, 0.0, 1) == expected);

    const std::vector<uint32_t> fim = dsv3::fim_encode_documents(tok, docs, 1.0, 1);
    size_t pos = 0;
    for (const std::string& doc : docs) {
        // <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>
        REQUIRE(fim[pos] == tok.fim_begin);
        auto find = [&](uint32_t id, size_t from) { return size_t(std::find(fim.begin() + long(from), fim.end(), id) - fim.begin()); };
        const size_t hole = find(tok.fim_hole, pos), end = find(tok.fim_end, pos), eos = find(tok.eos, pos);
        REQUIRE(hole < end);
        REQUIRE(end < eos);
        const std::string prefix = tok.decode(fim.data() + pos + 1, hole - pos - 1);
        const std::string suffix = tok.decode(fim.data() + hole + 1, end - hole - 1);
        const std::string middle = tok.decode(fim.data() + end + 1, eos - end - 1);
        CHECK(prefix + middle + suffix == doc);
        for (const std::string* part : {&prefix, &middle, &suffix})  // cut at character boundaries
            if (!part->empty()) CHECK((uint8_t((*part)[0]) & 0xC0) != 0x80);
        pos = eos + 1;
    }
    CHECK(pos == fim.size());
}

TEST_CASE("FIM: split points, rate 0.5, determinism across thread counts") {
    dsv3::Rng rng(3);
    const std::string doc = "abcdefghij";
    std::set<std::pair<size_t, size_t>> seen;
    for (int i = 0; i < 3000; ++i) {
        const auto s = dsv3::fim_split(doc, rng);
        CHECK(s.prefix + s.middle + s.suffix == doc);
        seen.insert({s.prefix.size(), s.prefix.size() + s.middle.size()});
    }
    CHECK(seen.size() == 66);  // every 0 <= p <= q <= 10 occurs

    const auto tok = dsv3::Tokenizer::bytes_only();
    const std::vector<std::string> docs(2000, "some document text");
    const auto out = dsv3::fim_encode_documents(tok, docs, 0.5, 9);
    const auto n_fim = std::count(out.begin(), out.end(), tok.fim_begin);
    CHECK(n_fim > 900);  // binomial(2000, 0.5): mean 1000, sd 22
    CHECK(n_fim < 1100);
    CHECK(std::count(out.begin(), out.end(), tok.eos) == 2000);
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const auto one = dsv3::fim_encode_documents(tok, docs, 0.5, 9);
    omp_set_num_threads(threads);
    CHECK(one == out);
#endif
    CHECK(contains(error_of([&] { dsv3::fim_encode_documents(tok, docs, 1.5, 9); }), "FIM rate 1.5"));
    const auto parts = dsv3::split_documents("a\n\nb\n\n\nc");
    CHECK(parts == std::vector<std::string>{"a\n\n", "b\n\n", "\nc"});
}

// ---------------------------------------------------------------------------------------------------------------
// Synthetic corpus
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("synthetic corpus: deterministic, printable, fast") {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string a = dsv3::synthetic_corpus(1 << 20, 1);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(seconds < 1.0);
    CHECK(a.size() == size_t(1) << 20);
    CHECK(dsv3::synthetic_corpus(1 << 20, 1) == a);
    CHECK(dsv3::synthetic_corpus(1 << 20, 2) != a);
    CHECK(dsv3::synthetic_corpus(1000, 1) == a.substr(0, 1000));
    CHECK(std::all_of(a.begin(), a.end(), [](char c) { return c == '\n' || (c >= 32 && c < 127); }));
    std::set<std::string> tags;
    for (size_t b = 0; b < 100000;) {
        const size_t sp = a.find(' ', b);
        tags.insert(a.substr(b, sp - b));
        b = a.find('\n', b) + 1;
    }
    CHECK(tags == std::set<std::string>{"talk", "math", "copy", "rev", "sort", "count"});
}

TEST_CASE("synthetic corpus: the exact entropy matches the measured log-probability and bounds simple estimates") {
    const dsv3::SyntheticCorpus corpus;
    const dsv3::SyntheticEntropy e = corpus.entropy();
    double p_sum = 0;
    for (const auto& part : e.parts) {
        p_sum += part.probability;
        CHECK(part.nats_per_byte > 0.2);
        CHECK(part.nats_per_byte < 2.0);
        CHECK(!part.example.empty());
        CHECK(part.example.rfind(part.name + " ", 0) == 0);
    }
    CHECK(p_sum == doctest::Approx(1.0));
    CHECK(e.nats_per_byte == doctest::Approx(dsv3::synthetic_corpus_entropy_nats_per_byte()));
    CHECK(e.bits_per_byte == doctest::Approx(e.nats_per_byte / std::log(2.0)));

    // The scorer reads only the text: the choices are recoverable from it, and the log-probability per byte of a
    // long sample converges to the exact figure (law of large numbers; 1 MB holds ~36,000 lines).
    const std::string text = dsv3::synthetic_corpus(1 << 20, 2024);
    int64_t bytes = 0;
    std::vector<double> nats_k, bytes_k;
    const double nats = corpus.score(text, &bytes, &nats_k, &bytes_k);
    CHECK(bytes > int64_t(text.size()) - 200);
    CHECK(nats / double(bytes) == doctest::Approx(e.nats_per_byte).epsilon(0.015));
    for (size_t k = 0; k < e.parts.size(); ++k)
        CHECK(nats_k[k] / bytes_k[k] == doctest::Approx(e.parts[k].nats_per_byte).epsilon(0.03));

    // No model can beat the entropy rate; plug-in estimates of H(X_t | previous k bytes) are upper bounds of it
    // (up to a small sampling bias for k = 2 on 1 MB).
    for (int k = 0; k <= 2; ++k) {
        std::map<uint32_t, std::map<uint8_t, int64_t>> counts;
        for (size_t i = size_t(k); i < text.size(); ++i) {
            uint32_t ctx = 0;
            for (int j = 1; j <= k; ++j) ctx = ctx * 256 + uint8_t(text[i - size_t(j)]);
            ++counts[ctx][uint8_t(text[i])];
        }
        double h = 0, n = double(text.size() - size_t(k));
        for (const auto& [ctx, next] : counts) {
            double total = 0;
            for (const auto& [byte, c] : next) total += double(c);
            for (const auto& [byte, c] : next) h -= double(c) / n * std::log(double(c) / total);
        }
        CHECK(h > e.nats_per_byte * 1.2);
    }
}

TEST_CASE("synthetic corpus: the scorer rejects lines the generator cannot produce") {
    const dsv3::SyntheticCorpus corpus;
    CHECK(corpus.score("math 2+2=4\ncopy abcd > abcd\n") > 0);
    CHECK(contains(error_of([&] { corpus.score("math 2+2=4\nmath 2+2=5\n"); }), "line 2: wrong result"));
    CHECK(contains(error_of([&] { corpus.score("copy abcd > abce\n"); }), "wrong answer"));
    CHECK(contains(error_of([&] { corpus.score("hello world\n"); }), "line 1: expected a line starting with"));
    CHECK(contains(error_of([&] { corpus.score("sort 5 3 1 > 1 3 5 \n"); }), "expected a number"));
    CHECK(contains(error_of([&] { corpus.score("count 1 2 4\n"); }), "not an arithmetic progression"));
    CHECK(contains(error_of([&] { corpus.score("talk zzzzzz.\n"); }), "talk vocabulary"));
    CHECK(corpus.score("math 2+2=4\nmath 3+") == doctest::Approx(std::log(1 / 0.15) + std::log(3.0) + 2 * std::log(100.0)));
}

// ---------------------------------------------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("plots: line plot, heatmap and attention map write PNG files; errors name the path") {
    const std::string dir = temp_dir("plots");
    auto is_png = [](const std::string& path) {
        const std::string b = dsv3::read_file_bytes(path);
        return b.size() > 1000 && b.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0;
    };
    dsv3::PlotSeries train{"train", {}, {}}, val{"val", {1, 50, 100}, {4.0, 2.0, NAN}};
    for (int i = 1; i <= 100; ++i) train.x.push_back(i), train.y.push_back(4.0 / std::sqrt(i));
    dsv3::plot_lines(dir + "/loss.png", "loss", "step", "loss", {train, val});
    CHECK(is_png(dir + "/loss.png"));
    dsv3::plot_lines(dir + "/loss_log.png", "loss", "step", "loss", {train, val}, true);
    CHECK(is_png(dir + "/loss_log.png"));
    dsv3::plot_lines(dir + "/empty.png", "nothing", "x", "y", {});
    CHECK(is_png(dir + "/empty.png"));
    CHECK(!fs::exists(dir + "/loss.png.tmp"));

    std::vector<float> load(4 * 16, 1.0f);
    load[5] = 3.0f;
    dsv3::plot_heatmap(dir + "/load.png", "expert load", load, 4, 16, {}, {}, "expert", "layer");
    CHECK(is_png(dir + "/load.png"));
    std::vector<float> att(9 * 9, 1.0f / 9);
    dsv3::plot_attention(dir + "/att.png", "attention", att, {"R", "O", "M", "E", "O", ":", "\n", " ", "B"});
    CHECK(is_png(dir + "/att.png"));

    const std::string nowhere = dir + "/no/such/dir/plot.png";
    CHECK(contains(error_of([&] { dsv3::plot_lines(nowhere, "t", "x", "y", {train}); }), nowhere));
    CHECK(contains(error_of([&] { dsv3::plot_heatmap(dir + "/h.png", "t", load, 5, 16, {}, {}, "x", "y"); }),
                   "64 values, expected rows x cols = 5 x 16"));
    CHECK(contains(error_of([&] { dsv3::plot_lines(dir + "/l.png", "t", "x", "y", {{"bad", {1, 2}, {1}}}); }),
                   "series 'bad' has 2 x values but 1 y values"));
    CHECK(contains(error_of([&] { dsv3::plot_attention(dir + "/a.png", "t", att, {"a", "b"}); }), "81 weights for 2 tokens"));

    double step = 0;
    CHECK(dsv3::nice_ticks(0, 5000, 6, &step) == std::vector<double>{0, 1000, 2000, 3000, 4000, 5000});
    CHECK(step == 1000);
    CHECK(dsv3::format_tick(0.5, 0.5) == "0.5");
    CHECK(dsv3::format_tick(2000, 1000) == "2000");
    fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------------------------
// Progress line
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("progress: the line and when it is printed to a file") {
    const std::string line = dsv3::Progress(200).format_line(50, 2.345678, 128000, 10.0, {{"lr", 3e-4}});
    CHECK(contains(line, "step 50/200 (25.0%)"));
    CHECK(contains(line, "loss 2.3457"));
    CHECK(contains(line, "lr 3.00e-04"));
    CHECK(contains(line, "12.8k tok/s"));
    CHECK(contains(line, "0:10 elapsed"));
    CHECK(contains(line, "ETA 0:30"));
    dsv3::Progress resumed(200);  // a run resumed at step 40: the ETA from this process's 10 steps in 10 s
    resumed.first_step = 40;
    CHECK(contains(resumed.format_line(50, 2.0, 1000, 10.0), "step 50/200 (25.0%)"));
    CHECK(contains(resumed.format_line(50, 2.0, 1000, 10.0), "ETA 2:30"));
    dsv3::Progress other(8);  // another program's metric and unit
    other.label = "none: ";
    other.metric = "max rel. error";
    other.unit = "outputs";
    CHECK(other.format_line(2, 0.0125, 2000000, 1.0) ==
          "none: step 2/8 (25.0%) | max rel. error 0.0125 | 2.00M outputs/s | 0:01 elapsed | ETA 0:03");
    CHECK(dsv3::Progress::format_duration(3725) == "1:02:05");
    CHECK(dsv3::Progress::format_duration(65) == "1:05");

    const std::string dir = temp_dir("progress");
    const std::string path = dir + "/log.txt";
    FILE* f = std::fopen(path.c_str(), "w");
    REQUIRE(f);
    {
        dsv3::Progress progress(20, f, 5, 1e9);
        CHECK(!progress.tty);
        for (int step = 1; step <= 20; ++step) progress.update(step, 3.0 - 0.1 * step, step * 1000);
    }
    std::fclose(f);
    const std::string log = dsv3::read_file_bytes(path);
    CHECK(std::count(log.begin(), log.end(), '\n') == 5);  // steps 1, 5, 10, 15, 20
    CHECK(std::count(log.begin(), log.end(), '\r') == 0);
    CHECK(contains(log, "step 1/20"));
    CHECK(contains(log, "step 20/20 (100.0%)"));
    CHECK(!contains(log, "step 2/20"));
    fs::remove_all(dir);
}
