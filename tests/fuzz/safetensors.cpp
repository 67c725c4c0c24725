// Fuzz target: a safetensors file, its header (length, JSON, every tensor's dtype, shape and byte range) and the
// reads of every tensor it accepts, converted to float32 as load_hf does.
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = fuzz::as_file(data, size, "model.safetensors");
    return fuzz::run([&] {
        const dsv3::SafetensorsFile f(path);
        for (const dsv3::TensorInfo& t : f.tensors) {
            std::vector<float> values(size_t(t.numel));
            f.read_floats(t, values.data());
        }
    });
}
