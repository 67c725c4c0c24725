// build/train_mpi_cuda: examples/train.cpp over MPI on the GPU backend (`make mpi-cuda`), one process per rank, the
// k-th rank of a machine on its GPU k mod (GPUs of the machine): `mpirun -np 2 build/train_mpi_cuda [--ep]`, with a
// hostfile for several machines. The header's MpiCommunicator moves host buffers; the device buffers of the gradient
// all-reduce and of EP's dispatch and combine are staged through host memory by cuda/comm.cuh (not CUDA-aware MPI).
#define DSV3_BACKEND_CUDA
#define DSV3_MPI
// The header is host code; nvcc's front end does not know GCC's "#pragma GCC unroll" in it: silence that warning.
#pragma nv_diag_suppress 1675
#include "../examples/train.cpp"
