// Fuzz target: the project's training checkpoint, as build/generate reads it: the header (config fields, step=,
// floats=, the sizes it declares against the file), then a model of that config and every float loaded into it.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = fuzz::as_file(data, size, "checkpoint.bin");
    return fuzz::run([&] {
        const dsv3::Config c = dsv3::read_checkpoint_config(path);
        // The RoPE table has max_seq_len rows whatever the file holds (the config declares them, legitimately); a
        // table beyond this process's memory limit (-rss_limit_mb) is not a finding of the reader.
        if (double(c.max_seq_len) * c.qk_rope_head_dim * 4 > double(1 << 28)) return;
        dsv3::Model model(c, 0);
        dsv3::AdamW opt;
        dsv3::load_checkpoint(path, model, opt);
    });
}
