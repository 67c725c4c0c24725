// Fuzz target: a tokenizer file (Tokenizer::save's text: merges and special tokens). Property: a tokenizer it
// accepts encodes and decodes a text back exactly.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = fuzz::as_file(data, size, "tokenizer.txt");
    return fuzz::run([&] {
        const dsv3::Tokenizer tok = dsv3::Tokenizer::load(path);
        const std::string text = std::string("ROMEO:\nWhat light through yonder window breaks? \xC3\xA9") + '\0' + '\xFF';
        fuzz::require(tok.decode(tok.encode(text)) == text, "decode(encode(text)) == text");
    });
}
