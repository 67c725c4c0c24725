// Fuzz target: a token file (the binary format of write_tokens and build/prepare_data): header, counts, widths and
// every token against the vocabulary. Property: a file it accepts is written back byte for byte.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = fuzz::as_file(data, size, "tokens.bin");
    return fuzz::run([&] {
        const dsv3::TokenDataset d = dsv3::TokenDataset::load(path);
        const std::string bytes(reinterpret_cast<const char*>(data), size);
        if (bytes.compare(28, 4, std::string(4, '\0')) != 0) return;  // the reserved field is not checked on reading
        d.save(path);
        const uint32_t width = uint32_t(dsv3::load_le(data + 12, 4));
        if (width == (d.vocab_size <= 65536 ? 2u : 4u))  // the writer picks the width from the vocabulary
            fuzz::require(dsv3::read_file_bytes(path) == bytes, "save(load(file)) == file");
    });
}
