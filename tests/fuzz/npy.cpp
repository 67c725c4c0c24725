// Fuzz target: a .npy file (NumPy format 1.0 to 3.0: magic, header length, the dict, the data it declares).
#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = fuzz::as_file(data, size, "array.npy");
    return fuzz::run([&] {
        std::vector<int64_t> shape;
        const std::vector<float> values = dsv3::read_npy(path, &shape);
        int64_t numel = 1;
        for (int64_t d : shape) numel *= d;
        fuzz::require(int64_t(values.size()) == numel, "read_npy returns the elements of its shape");
    });
}
