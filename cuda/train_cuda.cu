// build/train_cuda: examples/train.cpp, the same program, with the header's model on the CUDA backend (parameters,
// gradients, AdamW's moments and activations in device memory; every kernel from cuda/kernels.cuh). Same options;
// the closing sample is decoded on the GPU too.
#define DSV3_BACKEND_CUDA
// The header is host code; nvcc's front end does not know GCC's "#pragma GCC unroll" in it: silence that warning.
#pragma nv_diag_suppress 1675
#include "../examples/train.cpp"
