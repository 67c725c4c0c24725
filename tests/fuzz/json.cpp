// Fuzz target: the JSON reader (config.json, the safetensors header and the shard index are JSON) and config.json's
// mapping to Config. Properties: what the reader accepts, the writer writes back, and the text written reads back
// as the same document.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    return fuzz::run([&] {
        const dsv3::Json j = dsv3::json_parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json");
        const std::string text = dsv3::json_dump(j);
        fuzz::require(dsv3::json_dump(dsv3::json_parse(text, "dumped")) == text, "json_dump(json_parse(text)) reads back");
        dsv3::config_from_hf_json(j, "config.json");
    });
}
