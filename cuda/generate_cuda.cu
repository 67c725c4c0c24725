// build/generate_cuda: examples/generate.cpp, the same program, with the header's model on the CUDA backend (the
// weights, the latent KV cache and every kernel on the GPU; tokens and logits cross to the host for sampling).
#define DSV3_BACKEND_CUDA
// The header is host code; nvcc's front end does not know GCC's "#pragma GCC unroll" in it: silence that warning.
#pragma nv_diag_suppress 1675
#include "../examples/generate.cpp"
