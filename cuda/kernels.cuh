// cuda/kernels.cuh — the CUDA backend of deepseek_v3.hpp: the same kernels, on one GPU.
//
// Every function here has the SAME name and the SAME parameter list as the CPU kernel of the header (section 3,
// "KERNELS", and the FP8 functions of section 8), in namespace dsv3::cuda instead of dsv3, and every
// pointer is a DEVICE pointer. So the model logic, written once against the header's kernels, can run on the GPU by
// switching a namespace (see "How a model calls these" at the end of this comment).
//
//   3.1  matmul_forward / matmul_backward ........ cuBLAS, BF16 copies of the inputs (weights: their BF16 shadows,
//                                                  written by adamw_update), FP32 accumulation and output
//   3.2  rmsnorm_forward / rmsnorm_backward
//   3.3  rope_forward / rope_backward ............ the YaRN table is the header's RopeTable (host), uploaded once
//   3.4  attention_forward / attention_backward .. causal softmax attention of training: flash kernels (BF16 tensor
//                                                  cores, no stored probabilities), or FP32 cuBLAS with them stored
//   3.5  swiglu_forward / swiglu_backward
//   3.6  embedding_forward / embedding_backward
//   3.7  cross_entropy_forward / cross_entropy_backward
//   3.8  router_scores_*, router_select (group-limited top-k), router_gates_*
//   3.9  sequence_balance_loss, expert_balance_loss (values to the host, gradients on the device)
//   3.10 moe_permute_plan (on the device, the CPU's plan bit for bit; one copy of the offsets back per layer),
//        moe_permute_*, moe_unpermute_*
//   3.10b grouped_matmul_forward / grouped_matmul_backward: every expert's GEMM in one launch per product, BF16
//        operands in memory, cp.async-pipelined wgmma tiles on Hopper (WMMA elsewhere), FP32 accumulation
//   3.11 adamw_update (also refreshes the weights' BF16 shadows)
//   FP8  quantize_tiles_1x128, quantize_blocks_128x128, quantize_tiles_128x1_transposed, fp8_gemm (Hopper FP8
//        tensor cores, bit-exact with the header's dsv3::fp8_gemm), fp8_matmul_forward / fp8_matmul_backward (V3's
//        FP8 linear layer: Fprop, Dgrad, Wgrad, bit-exact with the header's), fp8_grouped_matmul_forward / _backward
//        (the routed experts' FP8 layers, every expert's product in one launch)
//   7.x  mla_decode_absorbed: one new token per sequence over the latent KV cache (absorbed MLA, V3 §2.1.1)
//
// Conventions (the header's): row-major, shapes next to each pointer, backward functions ACCUMULATE (+=) into input
// gradients, no floating-point atomics (every reduction runs in a fixed order, so a result is bitwise the same from
// run to run for a given shape). All work is queued on the default stream (stream 0) in call order; functions that
// must return a host value (cross_entropy_forward) or check data on the host (token ids, targets) synchronise.
//
// Accuracy against the CPU kernels. Plain float kernels (norms, softmax, router, AdamW, ...) sum in a different order
// than the CPU (trees instead of chains) and the GPU contracts a*b+c into FMAs: relative differences of a few float32
// ulps (≈1e-6). matmul rounds its inputs to BF16 (8 significant bits, unit roundoff 2^-9), so its outputs differ from
// the float32 CPU GEMM by about 2^-9·sqrt(2) ≈ 3e-3 in relative Frobenius norm on random data (BF16 operands
// typically land between 1e-3 and 1e-2). The FP8 functions are bitwise equal to the CPU ones (quantization is exact
// arithmetic plus one IEEE division; the FP8 GEMM is the hardware the header simulates).
//
// How a model calls these: the header's Model (sections 5-6) calls backend::matmul_forward(...), ... and keeps its
// parameters, gradients, AdamW moments and activations in backend::Buffer / backend::Arena (header section 3.13). A
// translation unit that defines DSV3_BACKEND_CUDA before including deepseek_v3.hpp gets `namespace backend =
// dsv3::cuda`: the header includes this file in the middle (after its section 3), and backend.cuh adds the buffers,
// the device arena and the model's plumbing kernels (section 3.12). cuda/train_cuda.cu is examples/train.cpp built
// that way. Three kernels take host-side structures, exactly as on the CPU: rope_* take the header's RopeTable
// (uploaded to the device on first use and cached), router_* take the Config, and the MoE permutation, planned on
// the device, keeps a host copy (cuda::MoePermutation: the device plan and the host one).
//
// Build: nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a (wgmma needs the "a" target; with plain -arch=sm_90
// fp8_gemm falls back to a CUDA-core emulation of the tensor core that gives the same bits, slowly). Link -lcublas.
// `make cuda` builds cuda/test_cuda.cu (every kernel against the CPU kernel) and cuda/bench_cuda.cu (FP8 GEMM vs
// torch._scaled_mm, absorbed decoding vs the copy bandwidth); every kernel version, with its figures,
// is in dev_fp8_gemm.cu and dev_mla_decode.cu.
//
// Files: kernels.cuh (this: errors, device memory, section-3 kernels), fp8.cuh (quantization, fp8_gemm), backend.cuh
// (what the model needs besides the kernels). Include kernels.cuh only.
#pragma once

// The header is host code; nvcc's front end does not know GCC's "#pragma GCC unroll" in it: silence that warning.
#pragma nv_diag_suppress 1675
#include "../deepseek_v3.hpp"
#pragma nv_diag_default 1675

#include <cub/device/device_radix_sort.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace dsv3 {
namespace cuda {

// =====================================================================================================================
// 0. Errors and device memory
// =====================================================================================================================
// Every CUDA runtime and cuBLAS call is checked; a failure throws dsv3::Error naming the call, the source line and the
// CUDA error string ("cudaMalloc(&p, bytes) at cuda/kernels.cuh:123: out of memory"). Kernel launches are checked
// with DSV3_CUDA_CHECK_LAUNCH() right after the launch (configuration errors appear there; faults inside a kernel
// appear at the next synchronising call, or at once with CUDA_LAUNCH_BLOCKING=1).
#define DSV3_CUDA_CHECK(call)                                                                                    \
    do {                                                                                                         \
        const cudaError_t dsv3_err_ = (call);                                                                    \
        if (dsv3_err_ != cudaSuccess)                                                                            \
            ::dsv3::fail(#call, " at ", __FILE__, ":", __LINE__, ": ", cudaGetErrorName(dsv3_err_), ": ",        \
                         cudaGetErrorString(dsv3_err_));                                                         \
    } while (0)
#define DSV3_CUDA_CHECK_LAUNCH() DSV3_CUDA_CHECK(cudaGetLastError())
#define DSV3_CUBLAS_CHECK(call)                                                                                  \
    do {                                                                                                         \
        const cublasStatus_t dsv3_st_ = (call);                                                                  \
        if (dsv3_st_ != CUBLAS_STATUS_SUCCESS)                                                                   \
            ::dsv3::fail(#call, " at ", __FILE__, ":", __LINE__, ": cuBLAS status ", int(dsv3_st_), " (",        \
                         cublasGetStatusString(dsv3_st_), ")");                                                  \
    } while (0)

// BF16 shadows of the parameters (used by 3.1 and 3.10b, written by 3.11). The GEMMs multiply BF16 copies of their FP32
// inputs; for a weight, that copy only changes when the weight does. So adamw_update, which is the only kernel that
// changes parameters during training, writes bf16(p) next to p in the same pass, and the GEMMs look the weight's
// address up here instead of converting it on every call. An entry is keyed by the address of the FP32 range that
// adamw_update was given and covers its n floats; a lookup may ask for any part of it. It is dropped (or marked stale)
// by every other way device memory can change from the host: DeviceBuffer::upload, fill_bytes, resize, reset and
// cuda::to_device invalidate every entry that overlaps the range they write or free, so a checkpoint load or a bias
// update is never read through a stale shadow; an entry is valid again after the next adamw_update of that tensor. (A
// kernel other than adamw_update that wrote into a parameter would need to call shadow::invalidate itself; the header's
// model has none.) DSV3_BF16_SHADOW=0 in the environment turns the shadows off (for timing).
// The same registry keeps the FP8 codes of weights (cuda/fp8.cuh, weight_codes): a weight's 128×128 blocks are
// quantized once in a step's Fprop, with their transpose, and its Dgrad reads them back. Every hook above marks the
// codes of the bytes it touches stale, and so does every adamw_update, with or without shadows.
// Thread-safe (one registry for all host threads: device addresses are unique across GPUs).
namespace shadow {
struct Entry {
    size_t n = 0;                     // floats covered
    __nv_bfloat16* bf16 = nullptr;    // n values, cudaMalloc'd on the device that holds the tensor
    bool valid = false;
};
struct Codes {                        // the FP8 codes of `count` weight matrices (fp8.cuh, weight_codes)
    size_t n = 0;                     // floats covered, from the key: count matrices w_stride apart
    int64_t w_stride = 0;
    int count = 0, rows = 0, cols = 0;
    uint8_t* bytes = nullptr;         // cudaMalloc'd: codes, transposed codes, scales, transposed scales
    std::vector<char> done;           // which matrices hold codes of the weight as it is now
};
struct Registry {
    std::mutex mu;
    std::map<uintptr_t, Entry> entries;   // key: address of the FP32 tensor
    std::map<uintptr_t, Codes> codes;     // key: address of the first weight matrix
};
inline Registry& registry() {
    static Registry* r = new Registry;    // never destroyed: buffers freed at exit still call invalidate
    return *r;
}
inline bool env_off(const char* name) {   // NAME=0 in the environment turns a cache off (for timing)
    const char* e = std::getenv(name);
    return e && std::string(e) == "0";
}
inline bool enabled() {
    static const bool on = !env_off("DSV3_BF16_SHADOW");
    return on;
}
// Codes overlapping [lo, hi): marked stale (no matrix done), or erased (their storage freed) when `release`.
inline void codes_stale_locked(Registry& r, uintptr_t lo, uintptr_t hi, bool release) {
    for (auto it = r.codes.begin(); it != r.codes.end() && it->first < hi;) {   // few entries: one per FP8 weight
        if (it->first + it->second.n * sizeof(float) <= lo) { ++it; continue; }
        if (!release) {
            std::fill(it->second.done.begin(), it->second.done.end(), 0);
            ++it;
            continue;
        }
        if (it->second.bytes) cudaFree(it->second.bytes);
        it = r.codes.erase(it);
    }
}
// Entries overlapping [lo, hi) except `keep`: marked stale, or erased (their storage freed) when `release`.
inline void drop_overlapping_locked(Registry& r, uintptr_t lo, uintptr_t hi, bool release, uintptr_t keep = 0) {
    auto it = r.entries.upper_bound(lo);
    if (it != r.entries.begin()) --it;   // the entry that may start before lo and reach into the range
    while (it != r.entries.end() && it->first < hi) {
        const bool overlaps = it->first + it->second.n * sizeof(float) > lo && it->first != keep;
        if (overlaps && release) {
            if (it->second.bf16) cudaFree(it->second.bf16);   // no check: called from destructors
            it = r.entries.erase(it);
            continue;
        }
        if (overlaps) it->second.valid = false;
        ++it;
    }
    codes_stale_locked(r, lo, hi, release);
}
// Device bytes [p, p + bytes) were written from the host (release = false) or freed (release = true).
inline void invalidate(const void* p, size_t bytes, bool release = false) {
    if (!p || !bytes) return;
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (r.entries.empty() && r.codes.empty()) return;
    drop_overlapping_locked(r, uintptr_t(p), uintptr_t(p) + bytes, release);
}
// The valid BF16 shadow of the n floats at p, or null. [p, p + n) may lie inside an entry: adamw_update covers runs
// of neighbouring tensors (all of a layer's experts, say) and a GEMM asks for one of them.
inline const __nv_bfloat16* find(const float* p, size_t n) {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.entries.upper_bound(uintptr_t(p));
    if (it == r.entries.begin()) return nullptr;
    --it;   // the last entry that starts at or before p
    const uintptr_t bytes = uintptr_t(p) - it->first;
    if (!it->second.valid || bytes % sizeof(float) || bytes / sizeof(float) + n > it->second.n) return nullptr;
    return it->second.bf16 + bytes / sizeof(float);
}
// Storage for the shadow of the n floats at p, which the caller's next kernel (on stream 0) writes in full; marks it
// valid and every other entry overlapping it stale (and, shadows on or off, the FP8 codes overlapping it). Null when
// shadows are off.
inline __nv_bfloat16* prepare(float* p, size_t n);
}  // namespace shadow

// DeviceBuffer<T>: n elements of device memory, freed by the destructor (RAII, move-only). upload/download copy
// whole host vectors; the copies synchronise with the default stream.
template <class T>
class DeviceBuffer {
  public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t n) { resize(n); }
    explicit DeviceBuffer(const std::vector<T>& host) { upload(host); }
    ~DeviceBuffer() { reset(); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        if (this != &o) { reset(); p_ = o.p_; n_ = o.n_; o.p_ = nullptr; o.n_ = 0; }
        return *this;
    }
    void resize(size_t n) {   // discards the contents
        if (n == n_) return;
        reset();
        if (n) DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
        n_ = n;
    }
    void reset() {
        if (p_) shadow::invalidate(p_, n_ * sizeof(T), true);
        if (p_) cudaFree(p_);   // no check: destructors must not throw, and a failed free leaves nothing to do
        p_ = nullptr;
        n_ = 0;
    }
    void upload(const T* host, size_t n) {
        resize(n);
        shadow::invalidate(p_, n * sizeof(T));
        if (n) DSV3_CUDA_CHECK(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice));
    }
    void upload(const std::vector<T>& host) { upload(host.data(), host.size()); }
    std::vector<T> download() const {
        std::vector<T> host(n_);
        if (n_) DSV3_CUDA_CHECK(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
        return host;
    }
    void fill_bytes(int byte) {
        shadow::invalidate(p_, n_ * sizeof(T));
        if (n_) DSV3_CUDA_CHECK(cudaMemset(p_, byte, n_ * sizeof(T)));
    }
    T* data() { return p_; }
    const T* data() const { return p_; }
    size_t size() const { return n_; }

  private:
    T* p_ = nullptr;
    size_t n_ = 0;
};

// Scratch memory of the backend: a few named slots that grow on demand and are reused by later calls (BF16 copies
// of GEMM inputs, attention's dscore matrix, decoding's partial sums). One set per host thread, and so per GPU when
// each GPU has its own thread (build/train_multi_gpu).
// Slot contents are dead after the function that took them returns.
enum class Slot { bf16_a, bf16_b, bf16_c, attn_dscore, attn_bf16, reduce, decode_partial, decode_stats, fp8_a, fp8_b,
                  fp8_sa, fp8_sb, fp8_list, fp8_maps, fp8_experts, group_offsets, group_units, sort, plan, plan_offsets,
                  embedding_pieces, count };
inline void* scratch(Slot slot, size_t bytes) {
    static thread_local DeviceBuffer<unsigned char> slots[int(Slot::count)];
    DeviceBuffer<unsigned char>& b = slots[int(slot)];
    if (b.size() < bytes) b.resize(bytes + bytes / 4);   // grow with some headroom, never shrink
    return b.data();
}

// The cuBLAS handle of the backend (created on first use, bound to the default stream), one per host thread: a handle
// belongs to the GPU that was current when it was created.
inline cublasHandle_t cublas() {
    static thread_local cublasHandle_t h = [] {
        cublasHandle_t handle;
        DSV3_CUBLAS_CHECK(cublasCreate(&handle));
        // Pedantic math: no reduced-precision shortcuts beyond what we ask for explicitly (BF16 inputs).
        DSV3_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_PEDANTIC_MATH));
        return handle;
    }();
    return h;
}

inline __nv_bfloat16* shadow::prepare(float* p, size_t n) {
    if (n == 0) return nullptr;
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (!enabled()) { codes_stale_locked(r, uintptr_t(p), uintptr_t(p) + n * sizeof(float), false); return nullptr; }
    drop_overlapping_locked(r, uintptr_t(p), uintptr_t(p) + n * sizeof(float), false, uintptr_t(p));
    Entry& e = r.entries[uintptr_t(p)];
    if (e.n != n) {
        if (e.bf16) cudaFree(e.bf16);
        e.bf16 = nullptr;
        e.n = 0;
        DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&e.bf16), n * sizeof(__nv_bfloat16)));
        e.n = n;
    }
    e.valid = true;
    return e.bf16;
}

// Small host arrays (a few KB: grouped-GEMM offsets) to the device without a synchronising cudaMemcpy: the bytes
// travel as a kernel's parameters, so the copy is queued on stream 0 in order like any kernel.
namespace detail {
constexpr int kParamBytes = 3072;
struct ParamBytes { unsigned char b[kParamBytes]; };
__global__ void param_copy_kernel(unsigned char* dst, ParamBytes src, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src.b[i];
}
}  // namespace detail
inline void upload_async(void* dst, const void* src, size_t bytes) {
    for (size_t at = 0; at < bytes; at += detail::kParamBytes) {
        detail::ParamBytes pb;
        const size_t n = std::min(bytes - at, size_t(detail::kParamBytes));
        std::memcpy(pb.b, static_cast<const unsigned char*>(src) + at, n);
        detail::param_copy_kernel<<<1, 256>>>(static_cast<unsigned char*>(dst) + at, pb, int(n));
        DSV3_CUDA_CHECK_LAUNCH();
    }
}

inline int grid_for(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 1 << 20)); }

namespace detail {
// 16 bytes global → shared, asynchronously; src_bytes < 16 zero-fills the rest (0: all zeros, nothing read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Hopper's warpgroup MMA (wgmma, PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"), used by the
// routed experts' grouped GEMM (3.10b) and the FP8 GEMM (fp8.cuh). The 4 warps of a warpgroup (128 threads) multiply
// a 64-row tile of A by a tile of B, both read by the tensor cores straight from shared memory through descriptors,
// into FP32 accumulators spread over the warpgroup's registers, asynchronously: the threads issue, commit a group,
// and later wait for it. Only in sm_90a code (nvcc -gencode=arch=compute_90a,code=sm_90a).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSV3_HAS_WGMMA 1
#endif
// The descriptor of a K-major operand tile in shared memory with the 128-byte swizzle (PTX ISA, "Matrix Descriptor
// Format"): bits 0-13 start address / 16, bits 16-29 leading byte offset / 16 (unused with this swizzle), bits
// 32-45 stride byte offset / 16 (1024: the next 8 rows), bits 62-63 swizzle mode (1 = 128 bytes).
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* p) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Shared memory written by the generic proxy (cp.async, st.shared) and read next by wgmma (the async proxy) needs this
// fence in the writing threads before the barrier (PTX ISA, memory consistency model: wgmma reads its shared-memory
// operands through the async proxy, which does not see generic-proxy writes without a proxy fence).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#ifdef DSV3_HAS_WGMMA
// Tells the compiler that the accumulator registers may change here: code that reads them cannot be moved above a
// wgmma wait (the registers are written asynchronously by the tensor cores), nor code that writes them below an issue.
template <int R>
__device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) asm volatile("" : "+f"(d[r])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
#endif
__global__ void wgmma_probe_kernel(int* out) {
#ifdef DSV3_HAS_WGMMA
    *out = 1;
#else
    *out = 0;
#endif
}
}  // namespace detail

// Whether this binary holds sm_90a code and runs on a Hopper GPU (asked once, then cached): the wgmma kernels run.
inline bool wgmma_available() {
    static const bool available = [] {
        int dev = 0, major = 0, minor = 0;
        DSV3_CUDA_CHECK(cudaGetDevice(&dev));
        DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
        if (major != 9 || minor != 0) return false;
        DeviceBuffer<int> flag(1);
        detail::wgmma_probe_kernel<<<1, 1>>>(flag.data());
        if (cudaGetLastError() != cudaSuccess) return false;   // no loadable image for this device
        return flag.download()[0] == 1;
    }();
    return available;
}

namespace detail {

// V consecutive floats as one access: V = 4 is a 16-byte load or store, which the memory-bound kernels below use
// when every row they touch is 16-byte aligned (`vec_ok`), since one float a thread reaches about half the copy
// bandwidth; V = 1 serves every other shape. Each element's arithmetic is the same either way.
template <int V>
struct alignas(4 * V) Floats { float v[V]; };
template <int V>
__device__ __forceinline__ Floats<V> load(const float* p) { return *reinterpret_cast<const Floats<V>*>(p); }
template <int V>
__device__ __forceinline__ void store(float* p, const Floats<V>& f) { *reinterpret_cast<Floats<V>*>(p) = f; }
// Rows of `width` floats, `stride` floats apart, starting at each pointer: all 16-byte aligned?
inline bool vec_ok(int64_t width, int64_t stride, std::initializer_list<const void*> ptrs) {
    if (width % 4 || stride % 4) return false;
    for (const void* p : ptrs)
        if (reinterpret_cast<uintptr_t>(p) % 16) return false;
    return true;
}
// Threads for a row kernel of `quads` accesses a row: whole warps, at most 256.
inline int row_threads(int64_t quads) { return int(std::min<int64_t>(256, (quads + 31) / 32 * 32)); }

// Block-wide reductions in a fixed tree order (deterministic). `red` is shared scratch of blockDim.x/32 entries.
__device__ inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ inline double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <class T, class Op>
__device__ inline T block_reduce(T v, T* red, Op op, T (*warp_op)(T)) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_op(v);
    __syncthreads();                      // red may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    T r = red[0];
    for (int w = 1; w < warps; ++w) r = op(r, red[w]);   // every thread sums the warps in the same order
    return r;
}
__device__ inline float block_sum(float v, float* red) {
    return block_reduce<float>(v, red, [](float a, float b) { return a + b; }, warp_sum);
}
__device__ inline float block_max(float v, float* red) {
    return block_reduce<float>(v, red, [](float a, float b) { return fmaxf(a, b); }, warp_max);
}
__device__ inline double block_sum_d(double v, double* red) {
    return block_reduce<double>(v, red, [](double a, double b) { return a + b; }, warp_sum_d);
}
}  // namespace detail

// =====================================================================================================================
// 3.1 matmul: y = x Wᵀ on cuBLAS, BF16 inputs, FP32 accumulation
// =====================================================================================================================
// V3 keeps FP32 master weights and computes in BF16 (FP8 for the linear layers in FP8 mode). The tensor cores take
// BF16 operands and accumulate in FP32, so each call first rounds its two inputs to BF16 copies (one pass over them,
// into scratch memory), then runs cublasGemmEx with FP32 output and FP32 compute type. The result is deterministic
// for a given shape (cuBLAS picks the same algorithm and never splits K with atomics unless asked to).
// Why not TF32 on the FP32 data directly: it would skip the copies, but the issue asks for BF16 compute (the numbers
// V3 trains with); the copies cost O(T·in + out·in) against the O(T·in·out) product.
//
// cuBLAS is column-major. A row-major [r, c] matrix is a column-major [c, r] one, so each product below is written
// for the transposes: y[T,out] row-major = yᵀ [out, T] column-major = W(col-major [in,out])ᵀ · x(col-major [in,T]).
namespace detail {
// Four elements a thread when `in` is 16-byte aligned (a 16-byte load, an 8-byte store: the pass is bound by memory,
// and one float a thread reached about half the copy bandwidth), the rest one at a time. Rounds to nearest even,
// like dsv3::bf16_round.
__global__ void to_bf16_kernel(__nv_bfloat16* out, const float* in, int64_t n, int64_t quads) {
    const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, threads = int64_t(gridDim.x) * blockDim.x;
    for (int64_t q = tid; q < quads; q += threads) {
        const float4 v = reinterpret_cast<const float4*>(in)[q];
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out + 4 * q);
        o[0] = __floats2bfloat162_rn(v.x, v.y);
        o[1] = __floats2bfloat162_rn(v.z, v.w);
    }
    for (int64_t i = 4 * quads + tid; i < n; i += threads) out[i] = __float2bfloat16_rn(in[i]);
}
inline __nv_bfloat16* bf16_copy(Slot slot, const float* x, int64_t n) {
    auto* out = static_cast<__nv_bfloat16*>(scratch(slot, size_t(n) * sizeof(__nv_bfloat16)));
    if (n > 0) {
        const int64_t quads = reinterpret_cast<uintptr_t>(x) % 16 == 0 ? n / 4 : 0;
        to_bf16_kernel<<<std::min(grid_for(std::max<int64_t>(quads, n - 4 * quads), 256), 4096), 256>>>(out, x, n,
                                                                                                          quads);
        DSV3_CUDA_CHECK_LAUNCH();
    }
    return out;
}
// C(col-major m×n, ldc) = alpha·op(A)·op(B) + beta·C with BF16 A, B and FP32 C.
inline void gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const __nv_bfloat16* A,
                      int lda, const __nv_bfloat16* B, int ldb, float beta, float* C, int ldc,
                      cublasHandle_t handle = nullptr) {
    const float alpha = 1.0f;
    DSV3_CUBLAS_CHECK(cublasGemmEx(handle ? handle : cublas(), ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B,
                                   CUDA_R_16BF, ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
}
// A weight's BF16 copy: its shadow when adamw_update keeps one (no work), else converted now into `slot`.
inline const __nv_bfloat16* weight_bf16(Slot slot, const float* W, int64_t n) {
    if (const __nv_bfloat16* s = shadow::find(W, size_t(n))) return s;
    return bf16_copy(slot, W, n);
}
}  // namespace detail

// y[T,out] = x[T,in] · W[out,in]ᵀ   (overwrites y)
inline void matmul_forward(float* y, const float* x, const float* W, int T, int in, int out) {
    DSV3_PROFILE_KERNEL();
    if (T < 0 || in < 0 || out < 0) fail("cuda::matmul_forward: negative size T=", T, " in=", in, " out=", out);
    if (int64_t(T) * out == 0) return;
    if (in == 0) { DSV3_CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(float) * size_t(T) * out)); return; }
    const __nv_bfloat16* xb = detail::bf16_copy(Slot::bf16_a, x, int64_t(T) * in);
    const __nv_bfloat16* wb = detail::weight_bf16(Slot::bf16_b, W, int64_t(out) * in);
    detail::gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, wb, in, xb, in, 0.0f, y, out);
}

// dx[T,in] += dy[T,out] · W[out,in];   dW[out,in] += dy[T,out]ᵀ · x[T,in]   (either may be null)
inline void matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int in,
                            int out) {
    DSV3_PROFILE_KERNEL();
    if (T < 0 || in < 0 || out < 0) fail("cuda::matmul_backward: negative size T=", T, " in=", in, " out=", out);
    if (int64_t(T) * in * out == 0) return;   // every product below is empty (or adds zero)
    const __nv_bfloat16* dyb = detail::bf16_copy(Slot::bf16_a, dy, int64_t(T) * out);
    if (dx) {   // dxᵀ [in, T] = W(col-major [in, out]) · dyᵀ(col-major [out, T])
        const __nv_bfloat16* wb = detail::weight_bf16(Slot::bf16_b, W, int64_t(out) * in);
        detail::gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, in, T, out, wb, in, dyb, out, 1.0f, dx, in);
    }
    if (dW) {   // dWᵀ [in, out] = xᵀ(col-major [in, T]) · (dyᵀ(col-major [out, T]))ᵀ
        const __nv_bfloat16* xb = detail::bf16_copy(Slot::bf16_c, x, int64_t(T) * in);
        detail::gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, in, out, T, xb, in, dyb, out, 1.0f, dW, in);
    }
}

// =====================================================================================================================
// 3.2 RMSNorm: y = x / sqrt(mean(x²) + ε) ⊙ g        x, y: [T, d]; g: [d]; rstd: [T]
// =====================================================================================================================
namespace detail {
template <int V>
__global__ void rmsnorm_forward_kernel(float* y, float* rstd, const float* x, const float* g, int d, float eps) {
    __shared__ float red[32];
    const int64_t t = blockIdx.x;
    const float* xr = x + t * d;
    float ss = 0.0f;
    for (int i = V * threadIdx.x; i < d; i += V * blockDim.x) {
        const Floats<V> a = load<V>(xr + i);
        for (int e = 0; e < V; ++e) ss += a.v[e] * a.v[e];
    }
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / d + eps);
    if (threadIdx.x == 0) rstd[t] = r;
    for (int i = V * threadIdx.x; i < d; i += V * blockDim.x) {
        const Floats<V> a = load<V>(xr + i), gg = load<V>(g + i);
        Floats<V> o;
        for (int e = 0; e < V; ++e) o.v[e] = a.v[e] * r * gg.v[e];
        store<V>(y + t * d + i, o);
    }
}
template <int V>
__global__ void rmsnorm_backward_dx_kernel(float* dx, const float* dy, const float* x, const float* g,
                                           const float* rstd, int d) {
    __shared__ float red[32];
    const int64_t t = blockIdx.x;
    const float* xr = x + t * d;
    const float* dyr = dy + t * d;
    const float r = rstd[t];
    float dot = 0.0f;
    for (int i = V * threadIdx.x; i < d; i += V * blockDim.x) {
        const Floats<V> a = load<V>(xr + i), gg = load<V>(g + i), b = load<V>(dyr + i);
        for (int e = 0; e < V; ++e) dot += gg.v[e] * b.v[e] * a.v[e] * r;
    }
    dot = block_sum(dot, red) / d;
    for (int i = V * threadIdx.x; i < d; i += V * blockDim.x) {
        const Floats<V> a = load<V>(xr + i), gg = load<V>(g + i), b = load<V>(dyr + i);
        Floats<V> o = load<V>(dx + t * d + i);
        for (int e = 0; e < V; ++e) o.v[e] += r * (gg.v[e] * b.v[e] - a.v[e] * r * dot);
        store<V>(dx + t * d + i, o);
    }
}
// dg[i] += Σ_t dy[t,i]·x[t,i]·rstd[t], in two deterministic passes (one thread per column would leave most of the GPU
// idle for T·d work): pass 1, block (column tile, row chunk c) sums its chunk's rows in order into partial[c, i];
// pass 2 adds the chunks' partials in order of c. Coalesced over i in both.
constexpr int kNormChunks = 256;   // 256 chunks of T/256 rows: enough blocks to fill the GPU at T = 8192
__global__ void rmsnorm_backward_dg_partial_kernel(float* partial, const float* dy, const float* x, const float* rstd,
                                                   int T, int d) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y;
    if (i >= d) return;
    const int rows = (T + kNormChunks - 1) / kNormChunks, t0 = c * rows, t1 = min(T, t0 + rows);
    float s = 0.0f;
    for (int t = t0; t < t1; ++t) s += dy[int64_t(t) * d + i] * x[int64_t(t) * d + i] * rstd[t];
    partial[int64_t(c) * d + i] = s;
}
__global__ void rmsnorm_backward_dg_sum_kernel(float* dg, const float* partial, int d) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float s = 0.0f;
    for (int c = 0; c < kNormChunks; ++c) s += partial[int64_t(c) * d + i];
    dg[i] += s;
}
}  // namespace detail

inline void rmsnorm_forward(float* y, float* rstd, const float* x, const float* g, int T, int d, float eps) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || d <= 0) return;
    if (detail::vec_ok(d, d, {y, x, g}))
        detail::rmsnorm_forward_kernel<4><<<T, detail::row_threads(d / 4)>>>(y, rstd, x, g, d, eps);
    else detail::rmsnorm_forward_kernel<1><<<T, 256>>>(y, rstd, x, g, d, eps);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void rmsnorm_backward(float* dx, float* dg, const float* dy, const float* x, const float* g,
                             const float* rstd, int T, int d) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || d <= 0) return;
    if (detail::vec_ok(d, d, {dx, dy, x, g}))
        detail::rmsnorm_backward_dx_kernel<4><<<T, detail::row_threads(d / 4)>>>(dx, dy, x, g, rstd, d);
    else detail::rmsnorm_backward_dx_kernel<1><<<T, 256>>>(dx, dy, x, g, rstd, d);
    DSV3_CUDA_CHECK_LAUNCH();
    if (dg) {
        float* partial = static_cast<float*>(scratch(Slot::reduce, sizeof(float) * size_t(detail::kNormChunks) * d));
        detail::rmsnorm_backward_dg_partial_kernel<<<dim3(grid_for(d, 128), detail::kNormChunks), 128>>>(
            partial, dy, x, rstd, T, d);
        DSV3_CUDA_CHECK_LAUNCH();
        detail::rmsnorm_backward_dg_sum_kernel<<<grid_for(d, 128), 128>>>(dg, partial, d);
        DSV3_CUDA_CHECK_LAUNCH();
    }
}

// =====================================================================================================================
// 3.3 RoPE with YaRN [V3 §2.1.1 eqs. 3, 7]: in-place pairwise rotation, same arguments as the CPU kernel
// =====================================================================================================================
// The table (cos, sin: [max_pos, half]) is the header's RopeTable, built once on the host by make_rope_table (YaRN
// included). Its device copy is made on first use and cached by the table's address, data pointers and sizes, so a
// model that builds its table once uploads it once. A fingerprint of 64 sampled entries is compared on every call, so
// a different table that happens to reuse the same memory is uploaded again (a change confined to unsampled entries
// would not be seen: make a new table rather than editing one in place).
namespace detail {
struct DeviceRope { DeviceBuffer<float> cos, sin; uint64_t fingerprint = 0; };
inline uint64_t rope_fingerprint(const RopeTable& rt) {
    uint64_t h = 0xcbf29ce484222325ull;   // FNV-1a over the bits of 64 evenly spaced cos and sin entries
    const size_t n = rt.cos.size();
    for (size_t i = 0; n && i < 64; ++i) {
        const size_t j = i * (n - 1) / 63;
        uint32_t a, b;
        std::memcpy(&a, &rt.cos[j], 4);
        std::memcpy(&b, &rt.sin[j], 4);
        h = (h ^ a) * 0x100000001b3ull;
        h = (h ^ b) * 0x100000001b3ull;
    }
    return h;
}
inline const DeviceRope& device_rope(const RopeTable& rt) {
    static std::map<std::tuple<const void*, const void*, const void*, int, int>, DeviceRope> cache;
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    if (rt.cos.size() != size_t(rt.max_pos) * rt.half || rt.sin.size() != rt.cos.size())
        fail("cuda::rope: RopeTable holds ", rt.cos.size(), " cos and ", rt.sin.size(), " sin values, expected max_pos * half = ",
             size_t(rt.max_pos) * rt.half);
    auto key = std::make_tuple(static_cast<const void*>(&rt), static_cast<const void*>(rt.cos.data()),
                               static_cast<const void*>(rt.sin.data()), rt.half, rt.max_pos);
    const uint64_t fp = rope_fingerprint(rt);
    DeviceRope& d = cache[key];
    if (d.cos.size() != rt.cos.size() || d.fingerprint != fp) {
        d.cos.upload(rt.cos);
        d.sin.upload(rt.sin);
        d.fingerprint = fp;
    }
    return d;
}
__global__ void rope_kernel(float* x, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0,
                            int seq_len, const float* cos_t, const float* sin_t, int half, float sign) {
    const int64_t total = int64_t(T) * n_vec * half;
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int i = int(idx % half);
        const int j = int((idx / half) % n_vec);
        const int64_t t = idx / (int64_t(half) * n_vec);
        const int pos = pos0 + int(t % seq_len);
        const float c = cos_t[int64_t(pos) * half + i], s = sign * sin_t[int64_t(pos) * half + i];
        float* v = x + t * row_stride + offset + int64_t(j) * vec_stride;
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
    }
}
inline void rope_apply(float* x, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0, int seq_len,
                       const RopeTable& rt, bool inverse) {
    if (T <= 0 || n_vec <= 0 || rt.half <= 0) return;
    const int last = pos0 + std::min(T, seq_len) - 1;
    if (last >= rt.max_pos) fail("cuda::rope: position ", last, " beyond the table's max_pos ", rt.max_pos);
    const DeviceRope& d = device_rope(rt);
    const int64_t total = int64_t(T) * n_vec * rt.half;
    rope_kernel<<<std::min(grid_for(total, 256), 8192), 256>>>(x, T, row_stride, offset, n_vec, vec_stride, pos0,
                                                               seq_len, d.cos.data(), d.sin.data(), rt.half,
                                                               inverse ? -1.0f : 1.0f);
    DSV3_CUDA_CHECK_LAUNCH();
}
}  // namespace detail

inline void rope_forward(float* x, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0,
                         int seq_len, const RopeTable& rt) {
    DSV3_PROFILE_KERNEL();
    detail::rope_apply(x, T, row_stride, offset, n_vec, vec_stride, pos0, seq_len, rt, false);
}
inline void rope_backward(float* dx, int T, int row_stride, int offset, int n_vec, int vec_stride, int pos0,
                          int seq_len, const RopeTable& rt) {
    DSV3_PROFILE_KERNEL();
    detail::rope_apply(dx, T, row_stride, offset, n_vec, vec_stride, pos0, seq_len, rt, true);
}

// =====================================================================================================================
// 3.4 causal softmax attention (training) [V3 eq. 10]
// =====================================================================================================================
// q, k: [B·T, H, dqk]; v: [B·T, H, dv]; out: [B·T, H, dv]. Two implementations, the same arithmetic up to rounding:
// the flash kernels below (the default: BF16 tensor-core products, the probabilities never stored, one log-sum-exp
// per row saved for the backward), and the materialised path, which stores probs [B, H, T, T] as the CPU does and is
// five FP32 matrix products per head with two row-wise kernels between them:
//   forward   S = scale·Q Kᵀ (into probs)  →  causal softmax of each row, in place  →  O = P V
//   backward  dP = dO Vᵀ  →  dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale, in place  →  dQ += dS K,  dK += dSᵀ Q,  dV += Pᵀ dO
// Its products run on cuBLAS in FP32 (pedantic math: no TF32), as strided batches over the sequences of one head:
// for a fixed head h, sequence b's matrices are a constant stride apart (q + b·T·H·dqk, probs + b·H·T·T, ...), so one
// call per head and product covers the whole batch. The full T×T products compute the masked half too. It runs where
// the flash kernels are not built for the head dims (above 96 and 64), or with DSV3_ATTENTION=materialised.
namespace detail {
// Row-major strided-batched FP32 GEMM: for each of `batch` items, C = alpha·op(A)·op(B) + beta·C, where op(A) is
// [M, K], op(B) is [K, N] and C is [M, N], all row-major with leading dimensions lda, ldb, ldc. cuBLAS is
// column-major: a row-major C is a column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so the operands swap places.
inline void row_gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                             int64_t stride_a, const float* B, int ldb, int64_t stride_b, float beta, float* C, int ldc,
                             int64_t stride_c, int batch) {
    DSV3_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        cublas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B,
        CUDA_R_32F, ldb, stride_b, A, CUDA_R_32F, lda, stride_a, &beta, C, CUDA_R_32F, ldc, stride_c, batch,
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
// One block per row (b, h, t) of probs, holding the scaled scores: p_s = exp(S_s − max) / Σ for s ≤ t, 0 after.
__global__ void causal_softmax_rows_kernel(float* probs, int T) {
    __shared__ float red[32];
    const int64_t row = blockIdx.x;
    const int t = int(row % T);
    float* p = probs + row * T;
    float mx = -INFINITY;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) mx = fmaxf(mx, p[s]);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) sum += (p[s] = expf(p[s] - mx));
    sum = block_sum(sum, red);   // its __syncthreads also orders the writes above before the reads below
    const float inv = 1.0f / sum;
    for (int s = threadIdx.x; s < T; s += blockDim.x) p[s] = s <= t ? p[s] * inv : 0.0f;
}
// One block per row: D holds dP; w = Σ_s p_s dp_s; D becomes dS = p_s (dp_s − w)·scale (0 where p is).
__global__ void softmax_backward_rows_kernel(float* D, const float* probs, int T, float scale) {
    __shared__ float red[32];
    const int64_t row = blockIdx.x;
    const float* p = probs + row * T;
    float* dr = D + row * T;
    float w = 0.0f;
    for (int s = threadIdx.x; s < T; s += blockDim.x) w += p[s] * dr[s];
    w = block_sum(w, red);
    for (int s = threadIdx.x; s < T; s += blockDim.x) dr[s] = p[s] * (dr[s] - w) * scale;
}
inline void check_attention(const char* who, int B, int T, int H) {
    if (int64_t(B) * H * T > (int64_t(1) << 31) - 1) fail("cuda::", who, ": B·H·T must fit in a grid, found B=", B,
                                                           " H=", H, " T=", T);
}
// --- the flash kernels (the default): the probabilities are never written ------------------------------------------
// FlashAttention-2 (Dao 2023, arXiv 2307.08691): BF16 operands on the tensor cores, FP32 accumulation, FP32 softmax.
// A block (4 warps) owns 64 rows, 16 per warp, and walks the other side in tiles of 64, so memory traffic is
// O(T·d) per block instead of the O(T²) of the probabilities, and the masked half is skipped. Every product is a
// warp's mma.sync m16n8k16 (PTX ISA, "Warp-level matrix multiply-accumulate"): operands come from shared memory
// through ldmatrix, and the accumulators stay in registers, where the softmax works on them directly. The trick
// that makes this possible (FlashAttention-2 §3.1): the accumulator layout of a 16×16 block of S (two m16n8 tiles) is,
// once rounded to BF16 and packed in pairs, the layout of an A operand, so P goes into P·V without leaving the
// registers. The exponentials are exp2 of scores premultiplied by log2(e) (one FFMA fewer per element).
//   forward  per query tile: m = running max, l = running Σ exp, O = running Σ exp·v, each rescaled by exp(m_old −
//            m_new) when a new key tile raises the max; at the end o = O / l and lse = m + log l (saved: [B, H, T]).
//   backward P is recomputed from lse: p = exp(s·scale − lse); with D = rowsum(dO ⊙ O) (= Σ_s p_s dp_s),
//            dS = P ⊙ (dP − D). dK, dV: one block per key tile over the query tiles at or after it (each warp's 16
//            keys as the rows: Sᵀ = K Qᵀ); dQ: one block per query tile over the key tiles at or before it. Two
//            kernels instead of FlashAttention-2's atomic adds into dQ: every output is summed by one block in a fixed
//            order, so the result is deterministic.
// The streamed tiles are double-buffered: the copy of tile n + 1 (cp.async) runs while the warps compute on tile n.
// The head dims are template parameters (registers hold 16 rows × DQ or DV accumulators a warp): DQ × DV = 64 × 64
// or 96 × 64 (the presets' 64 + 32 and 64); q, k, v and dO are copied to BF16 [B·H, Tp, DQ or DV] with zeros past
// T and past the true dims, so the zero columns add nothing. Larger head dims take the materialised path.
namespace flash {
constexpr int kTile = 64, kThreads = 128;
using bf16 = __nv_bfloat16;
struct Args {
    int B, T, H, dqk, dv;
    int Tp;              // T rounded up to 64 (zero rows)
    float scale;
    float scale_log2;    // scale · log2(e)
};
// A head-dim pair the kernels are built for: the smallest that holds (dqk, dv), or {0, 0}.
struct Dims { int dq, dv; };
inline Dims dims_for(int dqk, int dv) {
    if (dqk <= 64 && dv <= 64) return {64, 64};
    if (dqk <= 96 && dv <= 64) return {96, 64};
    return {0, 0};
}
// The kernels read BF16 copies of q, k, v and dout, one [Tp, D] matrix per (b, h), zero past T and d: a tile is then
// 64 contiguous rows, copied into shared memory by 16-byte asynchronous copies with no bounds to test.
// One thread per four neighbouring outputs (D, 64 or 96, is a multiple of 4), a grid-stride loop over all
// B·H·Tp·D/4 of them: a 16-byte load where the four lie inside the head's d values and every row is 16-byte aligned,
// an 8-byte store. (A block per (t, head) of D threads was 131,072 tiny blocks at `large`, a launch-bound pass.)
__global__ void to_heads_bf16_kernel(__nv_bfloat162* xb, const float* x, int T, int H, int d, int Tp, int D,
                                     int64_t quads, bool vec) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < quads; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t e = 4 * i, row = e / D;   // row = bh·Tp + t
        const int c = int(e - row * D), t = int(row % Tp), bh = int(row / Tp), b = bh / H, h = bh % H;
        const float* src = x + ((int64_t(b) * T + t) * H + h) * d + c;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (t < T && c + 3 < d && vec) {
            v = *reinterpret_cast<const float4*>(src);
        } else if (t < T) {
            v.x = c < d ? src[0] : 0.0f;
            v.y = c + 1 < d ? src[1] : 0.0f;
            v.z = c + 2 < d ? src[2] : 0.0f;
            v.w = c + 3 < d ? src[3] : 0.0f;
        }
        xb[2 * i] = __floats2bfloat162_rn(v.x, v.y);
        xb[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
    }
}
// Rows r0 .. r0 + 63 of one head's copy xb (row length D) into shared memory, rows D + 8 apart (the 16-byte pad
// puts the 8 rows an ldmatrix reads in 8 different bank groups). Not committed: the caller commits and waits.
template <int D>
__device__ void load_tile(bf16* s, const bf16* xb, int r0) {
    for (int e = threadIdx.x; e < kTile * D / 8; e += kThreads) {
        const int r = e / (D / 8), c = 8 * (e % (D / 8));
        cp_async_16(s + r * (D + 8) + c, xb + int64_t(r0 + r) * D + c, 16);
    }
}
// --- warp-level tensor-core products (mma.sync m16n8k16, BF16 in, FP32 accumulators) ---
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and t = lane mod 4:
//   A 16×16: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same), a[2] = (row g, cols 2t+8, 2t+9), a[3] = (g+8, ..)
//   B 16×8:  b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g)
//   C 16×8:  c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, cols 2t, 2t+1)
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);   // lo in the low half: the element of the lower column
    return *reinterpret_cast<const uint32_t*>(&v);
}
// A[16, K] (16 rows at a, row-major, lda) as the A fragments of its K/16 slices: loaded once by a kernel whose A
// stays the same over the whole loop (the queries of the forward and of dQ), so each tile reads only B.
template <int K>
__device__ __forceinline__ void load_fragments(uint32_t (&af)[K / 16][4], const bf16* a, int lda) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) ldmatrix_x4(af[kk], a + (lane % 16) * lda + 16 * kk + (lane / 16) * 8);
}
// c[16, 8·NT] += A[16, K] · Bᵀ: A as fragments, B's 8·NT rows at b (row-major [n][k], ldb).
template <int NT, int K>
__device__ __forceinline__ void mma_abt(float (&c)[NT][4], const uint32_t (&af)[K / 16][4], const bf16* b, int ldb) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
        for (int n = 0; n < NT; n += 2) {   // two n8 tiles per ldmatrix: (n, k), (n, k+8), (n+8, k), (n+8, k+8)
            uint32_t bf[4];
            ldmatrix_x4(bf, b + (8 * n + lane % 8 + (lane / 16) * 8) * ldb + 16 * kk + ((lane / 8) % 2) * 8);
            mma_16816(c[n], af[kk], bf[0], bf[1]);
            mma_16816(c[n + 1], af[kk], bf[2], bf[3]);
        }
}
// The same with A's 16 rows read from shared memory (a, row-major, lda) slice by slice.
template <int NT, int K>
__device__ __forceinline__ void mma_abt(float (&c)[NT][4], const bf16* a, int lda, const bf16* b, int ldb) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t af[1][4];
        ldmatrix_x4(af[0], a + (lane % 16) * lda + 16 * kk + (lane / 16) * 8);
        mma_abt<NT, 16>(c, af, b + 16 * kk, ldb);
    }
}
// c[16, 8·NT] += A · B: A[16, 16·KT] in registers (fragments), B at b row-major [k][n] (ldb), read transposed.
template <int NT, int KT>
__device__ __forceinline__ void mma_ab(float (&c)[NT][4], const uint32_t (&a)[KT][4], const bf16* b, int ldb) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk)
#pragma unroll
        for (int n = 0; n < NT; n += 2) {   // matrices (k, n), (k+8, n), (k, n+8), (k+8, n+8)
            uint32_t bf[4];
            ldmatrix_x4_trans(bf, b + (16 * kk + lane % 8 + ((lane / 8) % 2) * 8) * ldb + 8 * n + (lane / 16) * 8);
            mma_16816(c[n], a[kk], bf[0], bf[1]);
            mma_16816(c[n + 1], a[kk], bf[2], bf[3]);
        }
}
// The accumulators of a 16 × 64 block (8 n8 tiles) as the A fragments of its 4 k16 slices, rounded to BF16.
__device__ __forceinline__ void to_fragments(uint32_t (&a)[4][4], const float (&c)[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        a[kk][0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}
template <int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
    for (int n = 0; n < NT; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
}
// dst[row, c] (+)= factor · acc for this warp's 16 rows from row0 (rows past T and columns past d skipped).
template <int NT>
__device__ __forceinline__ void store_rows(float* dst, int64_t stride, const float (&acc)[NT][4], int row0, int T,
                                           int d, float factor, bool add) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + lane / 4 + 8 * (e / 2), c = 8 * n + 2 * (lane % 4) + e % 2;
            if (row >= T || c >= d) continue;
            float* p = dst + int64_t(row) * stride + c;
            *p = (add ? *p : 0.0f) + factor * acc[n][e];
        }
}

// grid (query tiles, B·H)
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreads) forward_kernel(float* out, float* lse, const bf16* q, const bf16* k,
                                                           const bf16* v, Args a) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int LQ = DQ + 8, LV = DV + 8;
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* Ks = Qs + kTile * LQ;          // [2][64][LQ]
    bf16* Vs = Ks + 2 * kTile * LQ;      // [2][64][LV]
    const int i0 = blockIdx.x * kTile, b = blockIdx.y / a.H, h = blockIdx.y % a.H;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w16 = 16 * warp;
    const bf16* qb = q + int64_t(blockIdx.y) * a.Tp * DQ;
    const bf16* kb = k + int64_t(blockIdx.y) * a.Tp * DQ;
    const bf16* vb = v + int64_t(blockIdx.y) * a.Tp * DV;
    const int last = min(i0 + kTile - 1, a.T - 1);   // the last key any row of this tile sees
    load_tile<DQ>(Qs, qb, i0);
    load_tile<DQ>(Ks, kb, 0);
    load_tile<DV>(Vs, vb, 0);
    cp_async_commit();
    float o[DV / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};   // rows g and g + 8 of the warp
    zero(o);
    const int row_g = i0 + w16 + lane / 4;
    uint32_t qf[DQ / 16][4];   // this warp's 16 queries, as A fragments for every tile
    for (int j0 = 0, st = 0; j0 <= last; j0 += kTile, st ^= 1) {
        cp_async_wait<0>();
        __syncthreads();   // tile j0 is in; every warp is done with the tile before it (its stage is free)
        if (j0 == 0) load_fragments<DQ>(qf, Qs + w16 * LQ, LQ);
        if (j0 + kTile <= last) {
            load_tile<DQ>(Ks + (st ^ 1) * kTile * LQ, kb, j0 + kTile);
            load_tile<DV>(Vs + (st ^ 1) * kTile * LV, vb, j0 + kTile);
        }
        cp_async_commit();
        float s[8][4];
        zero(s);
        mma_abt<8, DQ>(s, qf, Ks + st * kTile * LQ, LQ);
        // scale (log2 units) and mask; every row has a key in every tile it visits (key j0 ≤ i), so m_new is finite.
        // Only the diagonal tile and a last partial one have keys to mask (the same test for the whole block).
        const bool edge = j0 + kTile > i0 || j0 + kTile > a.T;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row_g + 8 * (e / 2), j = j0 + 8 * n + 2 * (lane % 4) + e % 2;
                s[n][e] = !edge || (j <= i && j < a.T) ? s[n][e] * a.scale_log2 : -INFINITY;
                mx[e / 2] = fmaxf(mx[e / 2], s[n][e]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {   // the row's max over the 4 lanes that hold it
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);
            alpha[r] = exp2f(m[r] - m_new);   // 0 on the first tile (m = −∞)
            m[r] = m_new;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = exp2f(s[n][e] - m[e / 2]);
                l[e / 2] += s[n][e];   // this lane's part of the row sum (summed over the 4 lanes at the end)
            }
#pragma unroll
        for (int n = 0; n < DV / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e / 2];
        uint32_t p[4][4];
        to_fragments(p, s);
        mma_ab<DV / 8, 4>(o, p, Vs + st * kTile * LV, LV);
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.0f / l[r];
    }
#pragma unroll
    for (int n = 0; n < DV / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] *= inv[e / 2];
    store_rows(out + int64_t(b) * a.T * a.H * a.dv + h * a.dv, int64_t(a.H) * a.dv, o, i0 + w16, a.T, a.dv, 1.0f,
               false);
    if (lane % 4 == 0)
        for (int r = 0; r < 2; ++r) {
            const int i = row_g + 8 * r;
            if (i < a.T) lse[int64_t(blockIdx.y) * a.T + i] = m[r] * 0.69314718f + logf(l[r]);   // m: log2 units
        }
}

// D[(b·H + h)·T + t] = Σ_c dout[t, h, c] · out[t, h, c]: one warp per (b, t, h), a fixed shuffle tree.
__global__ void row_dot_kernel(float* D, const float* dout, const float* out, int B, int T, int H, int dv) {
    const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;   // (b·T + t)·H + h
    const int lane = threadIdx.x % 32;
    if (row >= int64_t(B) * T * H) return;
    float s = 0.0f;
    for (int c = lane; c < dv; c += 32) s += dout[row * dv + c] * out[row * dv + c];
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int64_t h = row % H, t = (row / H) % T, b = row / (int64_t(H) * T);
    if (lane == 0) D[(b * H + h) * T + t] = s;
}
// lse·log2(e) and D of the 64 queries from i0 into shared memory (0 past T: those rows are masked anyway).
__device__ void load_stats(float* st, const float* lse, const float* D, int64_t bh, int i0, int T) {
    for (int e = threadIdx.x; e < kTile; e += kThreads) {
        st[e] = i0 + e < T ? lse[bh * T + i0 + e] * 1.44269504f : 0.0f;
        st[kTile + e] = i0 + e < T ? D[bh * T + i0 + e] : 0.0f;
    }
}
// From S and dP (16 rows × 64, accumulators): P = exp(S·scale − lse) where the query i sees the key j (else 0), and
// dS = P ⊙ (dP − D), both as A fragments. lse2_of / D_of give the query's lse·log2(e) and D.
template <class I, class J, class L, class Dd>
__device__ __forceinline__ void softmax_backward(uint32_t (&p)[4][4], uint32_t (&ds)[4][4], float (&s)[8][4],
                                                 float (&dp)[8][4], I query, J key, L lse2_of, Dd D_of, bool edge,
                                                 const Args& a) {
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = query(n, e), j = key(n, e);
            const bool seen = !edge || (j <= i && i < a.T);   // away from the diagonal and T, every pair is seen
            const float pe = seen ? exp2f(s[n][e] * a.scale_log2 - lse2_of(n, e)) : 0.0f;
            s[n][e] = pe;
            dp[n][e] = pe * (dp[n][e] - D_of(n, e));
        }
    to_fragments(p, s);
    to_fragments(ds, dp);
}

// grid (key tiles, B·H): dK += scale·Σ_i dS_ij q_i, dV += Σ_i p_ij dO_i over the query tiles i0 ≥ j0
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(float* dk, float* dv, const bf16* dout, const float* lse,
                                                        const float* D, const bf16* q, const bf16* k, const bf16* v,
                                                        Args a) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int LQ = DQ + 8, LV = DV + 8;
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + kTile * LQ;
    bf16* Qs = Vs + kTile * LV;          // [2][64][LQ]
    bf16* dOs = Qs + 2 * kTile * LQ;     // [2][64][LV]
    float* st = reinterpret_cast<float*>(dOs + 2 * kTile * LV);   // [2][lse2 64, D 64]
    const int j0 = blockIdx.x * kTile, b = blockIdx.y / a.H, h = blockIdx.y % a.H;
    const int lane = threadIdx.x % 32, w16 = 16 * (threadIdx.x / 32);
    const int64_t hq = int64_t(blockIdx.y) * a.Tp * DQ, hv = int64_t(blockIdx.y) * a.Tp * DV;   // this head
    load_tile<DQ>(Ks, k + hq, j0);
    load_tile<DV>(Vs, v + hv, j0);
    load_tile<DQ>(Qs, q + hq, j0);
    load_tile<DV>(dOs, dout + hv, j0);
    load_stats(st, lse, D, blockIdx.y, j0, a.T);
    cp_async_commit();
    float dk_acc[DQ / 8][4], dv_acc[DV / 8][4];
    zero(dk_acc);
    zero(dv_acc);
    const int key_g = j0 + w16 + lane / 4;
    for (int i0 = j0, sb = 0; i0 < a.T; i0 += kTile, sb ^= 1) {
        cp_async_wait<0>();
        __syncthreads();
        if (i0 + kTile < a.T) {
            load_tile<DQ>(Qs + (sb ^ 1) * kTile * LQ, q + hq, i0 + kTile);
            load_tile<DV>(dOs + (sb ^ 1) * kTile * LV, dout + hv, i0 + kTile);
            load_stats(st + (sb ^ 1) * 2 * kTile, lse, D, blockIdx.y, i0 + kTile, a.T);
        }
        cp_async_commit();
        const bf16 *Qt = Qs + sb * kTile * LQ, *dOt = dOs + sb * kTile * LV;
        const float* stt = st + sb * 2 * kTile;
        float s[8][4], dp[8][4];   // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: rows keys, columns queries
        zero(s);
        zero(dp);
        mma_abt<8, DQ>(s, Ks + w16 * LQ, LQ, Qt, LQ);
        mma_abt<8, DV>(dp, Vs + w16 * LV, LV, dOt, LV);
        auto col = [&](int n, int e) { return 8 * n + 2 * (lane % 4) + e % 2; };
        uint32_t p[4][4], ds[4][4];
        softmax_backward(p, ds, s, dp, [&](int n, int e) { return i0 + col(n, e); },
                         [&](int, int e) { return key_g + 8 * (e / 2); },
                         [&](int n, int e) { return stt[col(n, e)]; }, [&](int n, int e) { return stt[kTile + col(n, e)]; },
                         i0 == j0 || i0 + kTile > a.T, a);
        mma_ab<DV / 8, 4>(dv_acc, p, dOt, LV);   // dV[key, :] += Σ_query Pᵀ · dO
        mma_ab<DQ / 8, 4>(dk_acc, ds, Qt, LQ);   // dK[key, :] += Σ_query dSᵀ · Q
    }
    store_rows(dk + int64_t(b) * a.T * a.H * a.dqk + h * a.dqk, int64_t(a.H) * a.dqk, dk_acc, j0 + w16, a.T, a.dqk,
               a.scale, true);
    store_rows(dv + int64_t(b) * a.T * a.H * a.dv + h * a.dv, int64_t(a.H) * a.dv, dv_acc, j0 + w16, a.T, a.dv, 1.0f,
               true);
}
// grid (query tiles, B·H): dQ += scale·Σ_j dS_ij k_j over the key tiles j0 ≤ i0
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreads) dq_kernel(float* dq, const bf16* dout, const float* lse, const float* D,
                                                      const bf16* q, const bf16* k, const bf16* v, Args a) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int LQ = DQ + 8, LV = DV + 8;
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* dOs = Qs + kTile * LQ;
    bf16* Ks = dOs + kTile * LV;         // [2][64][LQ]
    bf16* Vs = Ks + 2 * kTile * LQ;      // [2][64][LV]
    float* st = reinterpret_cast<float*>(Vs + 2 * kTile * LV);
    const int i0 = blockIdx.x * kTile, b = blockIdx.y / a.H, h = blockIdx.y % a.H;
    const int lane = threadIdx.x % 32, w16 = 16 * (threadIdx.x / 32);
    const int64_t hq = int64_t(blockIdx.y) * a.Tp * DQ, hv = int64_t(blockIdx.y) * a.Tp * DV;
    const int last = min(i0 + kTile - 1, a.T - 1);
    load_tile<DQ>(Qs, q + hq, i0);
    load_tile<DV>(dOs, dout + hv, i0);
    load_tile<DQ>(Ks, k + hq, 0);
    load_tile<DV>(Vs, v + hv, 0);
    load_stats(st, lse, D, blockIdx.y, i0, a.T);
    cp_async_commit();
    float dq_acc[DQ / 8][4];
    zero(dq_acc);
    const int row_g = i0 + w16 + lane / 4;
    float lse2[2], Dr[2];
    uint32_t qf[DQ / 16][4], dof[DV / 16][4];   // this warp's 16 queries and their dO, for every tile
    for (int j0 = 0, sb = 0; j0 <= last; j0 += kTile, sb ^= 1) {
        cp_async_wait<0>();
        __syncthreads();
        if (j0 == 0) {
            for (int r = 0; r < 2; ++r) lse2[r] = st[w16 + lane / 4 + 8 * r], Dr[r] = st[kTile + w16 + lane / 4 + 8 * r];
            load_fragments<DQ>(qf, Qs + w16 * LQ, LQ);
            load_fragments<DV>(dof, dOs + w16 * LV, LV);
        }
        if (j0 + kTile <= last) {
            load_tile<DQ>(Ks + (sb ^ 1) * kTile * LQ, k + hq, j0 + kTile);
            load_tile<DV>(Vs + (sb ^ 1) * kTile * LV, v + hv, j0 + kTile);
        }
        cp_async_commit();
        const bf16 *Kt = Ks + sb * kTile * LQ, *Vt = Vs + sb * kTile * LV;
        float s[8][4], dp[8][4];   // S = Q Kᵀ and dP = dO Vᵀ: rows queries, columns keys
        zero(s);
        zero(dp);
        mma_abt<8, DQ>(s, qf, Kt, LQ);
        mma_abt<8, DV>(dp, dof, Vt, LV);
        uint32_t p[4][4], ds[4][4];   // (p is not needed here: the compiler drops it)
        softmax_backward(p, ds, s, dp, [&](int, int e) { return row_g + 8 * (e / 2); },
                         [&](int n, int e) { return j0 + 8 * n + 2 * (lane % 4) + e % 2; },
                         [&](int, int e) { return lse2[e / 2]; }, [&](int, int e) { return Dr[e / 2]; },
                         j0 == i0 || i0 + kTile > a.T, a);
        mma_ab<DQ / 8, 4>(dq_acc, ds, Kt, LQ);   // dQ[query, :] += Σ_key dS · K
    }
    store_rows(dq + int64_t(b) * a.T * a.H * a.dqk + h * a.dqk, int64_t(a.H) * a.dqk, dq_acc, i0 + w16, a.T, a.dqk,
               a.scale, true);
}

inline Args args(int B, int T, int H, int dqk, int dv, float scale) {
    return {B, T, H, dqk, dv, (T + kTile - 1) / kTile * kTile, scale, scale * 1.44269504f};
}
inline const bf16* heads_bf16(Slot slot, const float* x, const Args& a, int d, int D) {
    const int64_t quads = int64_t(a.B) * a.H * a.Tp * D / 4;
    auto* xb = static_cast<__nv_bfloat162*>(scratch(slot, sizeof(__nv_bfloat162) * 2 * size_t(quads)));
    const bool vec = d % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;   // every row 16-byte aligned
    to_heads_bf16_kernel<<<std::min(grid_for(quads, 256), 4096), 256>>>(xb, x, a.T, a.H, d, a.Tp, D, quads, vec);
    DSV3_CUDA_CHECK_LAUNCH();
    return reinterpret_cast<const bf16*>(xb);
}
// Shared memory of each kernel: the fixed tile and the double-buffered streamed tiles (+ statistics).
inline size_t smem_bytes(Dims d, bool forward) {
    const size_t q = sizeof(bf16) * kTile * (d.dq + 8), v = sizeof(bf16) * kTile * (d.dv + 8);
    return forward ? q + 2 * (q + v) : (q + v) + 2 * (q + v) + 2 * 2 * kTile * sizeof(float);
}
template <class K, class... P>
void launch(K kernel, size_t bytes, const Args& a, P... params) {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    const dim3 grid(unsigned(a.Tp / kTile), unsigned(a.B * a.H));
    kernel<<<grid, kThreads, bytes>>>(params..., a);
    DSV3_CUDA_CHECK_LAUNCH();
}
template <int DQ, int DV>
void forward(float* out, float* lse, const float* q, const float* k, const float* v, const Args& a) {
    const bf16* qb = heads_bf16(Slot::bf16_a, q, a, a.dqk, DQ);
    const bf16* kb = heads_bf16(Slot::bf16_b, k, a, a.dqk, DQ);
    const bf16* vb = heads_bf16(Slot::bf16_c, v, a, a.dv, DV);
    launch(forward_kernel<DQ, DV>, smem_bytes({DQ, DV}, true), a, out, lse, qb, kb, vb);
}
template <int DQ, int DV>
void backward(float* dq, float* dk, float* dv, const float* dout, const float* lse, const float* D, const float* q,
              const float* k, const float* v, const Args& a) {
    const bf16* qb = heads_bf16(Slot::bf16_a, q, a, a.dqk, DQ);
    const bf16* kb = heads_bf16(Slot::bf16_b, k, a, a.dqk, DQ);
    const bf16* vb = heads_bf16(Slot::bf16_c, v, a, a.dv, DV);
    const bf16* dob = heads_bf16(Slot::attn_bf16, dout, a, a.dv, DV);
    const size_t bytes = smem_bytes({DQ, DV}, false);
    launch(dkdv_kernel<DQ, DV>, bytes, a, dk, dv, dob, lse, D, qb, kb, vb);
    launch(dq_kernel<DQ, DV>, bytes, a, dq, dob, lse, D, qb, kb, vb);
}
}  // namespace flash
// The path: flash (the default), or the materialised one above where the head dims are too large for the flash
// kernels' registers, or when DSV3_ATTENTION=materialised (or a caller, the tests) asks for it.
inline bool& attention_materialised() {
    static bool m = [] {
        const char* e = std::getenv("DSV3_ATTENTION");
        return e && std::string(e) == "materialised";
    }();
    return m;
}
inline bool use_flash(int dqk, int dv) { return !attention_materialised() && flash::dims_for(dqk, dv).dq > 0; }
}  // namespace detail

// Floats that attention_forward saves for the backward (the model allocates them): one log-sum-exp per row with the
// flash kernels, the probabilities [B, H, T, T] on the materialised path (the CPU's).
inline size_t attention_saved_floats(int B, int T, int H, int dqk, int dv) {
    return size_t(B) * H * T * (detail::use_flash(dqk, dv) ? 1 : size_t(T));
}
// saved: attention_saved_floats(B, T, H, dqk, dv) floats, written here and read by attention_backward.
inline void attention_forward(float* out, float* saved, const float* q, const float* k, const float* v, int B, int T,
                              int H, int dqk, int dv, float scale) {
    DSV3_PROFILE_KERNEL();
    if (B <= 0 || T <= 0 || H <= 0) return;
    detail::check_attention("attention_forward", B, T, H);
    if (detail::use_flash(dqk, dv)) {
        namespace fl = detail::flash;
        const fl::Args a = fl::args(B, T, H, dqk, dv, scale);
        if (fl::dims_for(dqk, dv).dq == 64) return fl::forward<64, 64>(out, saved, q, k, v, a);
        return fl::forward<96, 64>(out, saved, q, k, v, a);
    }
    float* probs = saved;
    const int64_t q_seq = int64_t(T) * H * dqk, v_seq = int64_t(T) * H * dv, p_seq = int64_t(H) * T * T;
    for (int h = 0; h < H; ++h)   // S = scale · Q Kᵀ: [T, T] per sequence
        detail::row_gemm_batched(false, true, T, T, dqk, scale, q + h * dqk, H * dqk, q_seq, k + h * dqk, H * dqk,
                                 q_seq, 0.0f, probs + int64_t(h) * T * T, T, p_seq, B);
    detail::causal_softmax_rows_kernel<<<unsigned(int64_t(B) * H * T), 256>>>(probs, T);
    DSV3_CUDA_CHECK_LAUNCH();
    for (int h = 0; h < H; ++h)   // O = P V: [T, dv] per sequence
        detail::row_gemm_batched(false, false, T, dv, T, 1.0f, probs + int64_t(h) * T * T, T, p_seq, v + h * dv,
                                 H * dv, v_seq, 0.0f, out + h * dv, H * dv, v_seq, B);
}
// out: the forward's output (the flash kernels need D = rowsum(dout ⊙ out)).
inline void attention_backward(float* dq, float* dk, float* dv_, const float* dout, const float* out,
                               const float* saved, const float* q, const float* k, const float* v, int B, int T, int H,
                               int dqk, int dv, float scale) {
    DSV3_PROFILE_KERNEL();
    if (B <= 0 || T <= 0 || H <= 0) return;
    detail::check_attention("attention_backward", B, T, H);
    if (detail::use_flash(dqk, dv)) {
        namespace fl = detail::flash;
        const fl::Args a = fl::args(B, T, H, dqk, dv, scale);
        float* D = static_cast<float*>(scratch(Slot::attn_dscore, sizeof(float) * size_t(B) * H * T));
        const int64_t rows = int64_t(B) * T * H;
        fl::row_dot_kernel<<<unsigned((rows * 32 + 255) / 256), 256>>>(D, dout, out, B, T, H, dv);
        DSV3_CUDA_CHECK_LAUNCH();
        if (fl::dims_for(dqk, dv).dq == 64) return fl::backward<64, 64>(dq, dk, dv_, dout, saved, D, q, k, v, a);
        return fl::backward<96, 64>(dq, dk, dv_, dout, saved, D, q, k, v, a);
    }
    const float* probs = saved;
    const int64_t q_seq = int64_t(T) * H * dqk, v_seq = int64_t(T) * H * dv, p_seq = int64_t(H) * T * T;
    float* D = static_cast<float*>(scratch(Slot::attn_dscore, sizeof(float) * size_t(B) * H * T * T));
    for (int h = 0; h < H; ++h)   // dP = dO Vᵀ
        detail::row_gemm_batched(false, true, T, T, dv, 1.0f, dout + h * dv, H * dv, v_seq, v + h * dv, H * dv, v_seq,
                                 0.0f, D + int64_t(h) * T * T, T, p_seq, B);
    detail::softmax_backward_rows_kernel<<<unsigned(int64_t(B) * H * T), 256>>>(D, probs, T, scale);
    DSV3_CUDA_CHECK_LAUNCH();
    for (int h = 0; h < H; ++h) {
        const float* Dh = D + int64_t(h) * T * T;
        const float* Ph = probs + int64_t(h) * T * T;
        detail::row_gemm_batched(false, false, T, dqk, T, 1.0f, Dh, T, p_seq, k + h * dqk, H * dqk, q_seq, 1.0f,
                                 dq + h * dqk, H * dqk, q_seq, B);   // dQ += dS K
        detail::row_gemm_batched(true, false, T, dqk, T, 1.0f, Dh, T, p_seq, q + h * dqk, H * dqk, q_seq, 1.0f,
                                 dk + h * dqk, H * dqk, q_seq, B);   // dK += dSᵀ Q
        detail::row_gemm_batched(true, false, T, dv, T, 1.0f, Ph, T, p_seq, dout + h * dv, H * dv, v_seq, 1.0f,
                                 dv_ + h * dv, H * dv, v_seq, B);    // dV += Pᵀ dO
    }
}

// =====================================================================================================================
// 3.5 SwiGLU: h = silu(gate) ⊙ up        h: [rows, w]; gate, up (dgate, dup): rows ld apart (ld = w or 2w)
// =====================================================================================================================
namespace detail {
// One block per row (a grid-stride loop over rows), its threads along the row: no division per element.
template <int V>
__global__ void swiglu_forward_kernel(float* h, const float* gate, const float* up, int64_t rows, int w, int ld) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        for (int j = V * threadIdx.x; j < w; j += V * blockDim.x) {
            const Floats<V> z = load<V>(gate + r * ld + j), u = load<V>(up + r * ld + j);
            Floats<V> o;
            for (int e = 0; e < V; ++e) {
                const float sig = 1.0f / (1.0f + expf(-z.v[e]));
                o.v[e] = z.v[e] * sig * u.v[e];
            }
            store<V>(h + r * w + j, o);
        }
}
template <int V>
__global__ void swiglu_backward_kernel(float* dgate, float* dup, const float* dh, const float* gate, const float* up,
                                       int64_t rows, int w, int ld) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        for (int j = V * threadIdx.x; j < w; j += V * blockDim.x) {
            const int64_t a = r * ld + j;
            const Floats<V> z = load<V>(gate + a), u = load<V>(up + a), g = load<V>(dh + r * w + j);
            Floats<V> dg = load<V>(dgate + a), du = load<V>(dup + a);
            for (int e = 0; e < V; ++e) {
                const float sig = 1.0f / (1.0f + expf(-z.v[e]));
                dg.v[e] += g.v[e] * u.v[e] * sig * (1.0f + z.v[e] * (1.0f - sig));
                du.v[e] += g.v[e] * z.v[e] * sig;
            }
            store<V>(dgate + a, dg);
            store<V>(dup + a, du);
        }
}
}  // namespace detail
inline void swiglu_forward(float* h, const float* gate, const float* up, int64_t rows, int w, int ld) {
    DSV3_PROFILE_KERNEL();
    if (rows <= 0 || w <= 0) return;
    const unsigned blocks = unsigned(std::min<int64_t>(rows, 16384));
    if (detail::vec_ok(w, ld, {h, gate, up}))
        detail::swiglu_forward_kernel<4><<<blocks, detail::row_threads(w / 4)>>>(h, gate, up, rows, w, ld);
    else detail::swiglu_forward_kernel<1><<<blocks, detail::row_threads(w)>>>(h, gate, up, rows, w, ld);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void swiglu_backward(float* dgate, float* dup, const float* dh, const float* gate, const float* up,
                            int64_t rows, int w, int ld) {
    DSV3_PROFILE_KERNEL();
    if (rows <= 0 || w <= 0) return;
    const unsigned blocks = unsigned(std::min<int64_t>(rows, 16384));
    if (detail::vec_ok(w, ld, {dgate, dup, dh, gate, up}))
        detail::swiglu_backward_kernel<4><<<blocks, detail::row_threads(w / 4)>>>(dgate, dup, dh, gate, up, rows, w,
                                                                                   ld);
    else detail::swiglu_backward_kernel<1><<<blocks, detail::row_threads(w)>>>(dgate, dup, dh, gate, up, rows, w, ld);
    DSV3_CUDA_CHECK_LAUNCH();
}

// =====================================================================================================================
// 3.6 embedding: out[t] = E[tokens[t]]     E: [vocab, d]; out: [T, d]; tokens: [T] (device)
// =====================================================================================================================
namespace detail {
// Finds the first row whose id is outside [lo, hi) (ignore: an id equal to `skip` is allowed). Writes T if none.
// One block, ids scanned in order of t by strided threads, minimum taken: deterministic.
__global__ void first_bad_id_kernel(int* first_bad, const int32_t* ids, int T, int lo, int hi, int skip) {
    __shared__ int best;
    if (threadIdx.x == 0) best = T;
    __syncthreads();
    for (int t = threadIdx.x; t < T; t += blockDim.x)
        if (ids[t] != skip && (ids[t] < lo || ids[t] >= hi)) atomicMin(&best, t);   // integer min: order-free
    __syncthreads();
    if (threadIdx.x == 0) *first_bad = best;
}
// Returns the index of the first bad id (T if none) and the number of ids equal to `skip`... as a pair, synchronising.
inline int first_bad_id(const int32_t* ids, int T, int lo, int hi, int skip, int32_t* bad_value) {
    int* d = static_cast<int*>(scratch(Slot::reduce, sizeof(int) * 2));
    first_bad_id_kernel<<<1, 1024>>>(d, ids, T, lo, hi, skip);
    DSV3_CUDA_CHECK_LAUNCH();
    int first = T;
    DSV3_CUDA_CHECK(cudaMemcpy(&first, d, sizeof(int), cudaMemcpyDeviceToHost));
    if (first < T && bad_value) DSV3_CUDA_CHECK(cudaMemcpy(bad_value, ids + first, sizeof(int32_t), cudaMemcpyDeviceToHost));
    return first;
}
__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* E, int d) {
    const int64_t t = blockIdx.x;
    const float* src = E + int64_t(tokens[t]) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[t * d + i] = src[i];
}
// dE[tokens[t]] += dout[t] for t in order, as the CPU does it, but parallel over the distinct tokens: a stable radix
// sort (CUB, in the CUDA Toolkit) lists the positions t grouped by token id, t ascending within a token; then the
// block of sorted position j, if j starts a token's run, adds that run's rows in order. The same additions in the
// same order as the CPU: bitwise equal to it, and no atomics.
__global__ void iota_kernel(int32_t* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = i;
}
// The rows of one token are a run of the sorted positions; a run can be thousands of rows long (a space, a common
// word), too long for one thread to sum alone. So the sorted rows are cut into segments of kEmbedSegment: first
// every piece of a run inside one segment is summed (pieces[first row of the piece] = Σ of its rows, in order),
// then each run adds its pieces, one per segment, in order. Fixed order, no atomics: deterministic.
constexpr int kEmbedSegment = 32;
__global__ void embedding_backward_pieces_kernel(float* pieces, const float* dout, const int32_t* sorted_token,
                                                 const int32_t* sorted_t, int T, int d) {
    const int r0 = blockIdx.x * kEmbedSegment, r1 = min(r0 + kEmbedSegment, T);
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float acc = 0.0f;
    for (int r = r0, start = r0; r < r1; ++r) {
        acc += dout[int64_t(sorted_t[r]) * d + c];
        if (r + 1 == r1 || sorted_token[r + 1] != sorted_token[r]) {   // the piece ends here
            pieces[int64_t(start) * d + c] = acc;
            acc = 0.0f;
            start = r + 1;
        }
    }
}
__global__ void embedding_backward_runs_kernel(float* dE, const float* pieces, const int32_t* sorted_token, int T,
                                               int d) {
    const int j = blockIdx.x;
    const int32_t token = sorted_token[j];
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if ((j > 0 && sorted_token[j - 1] == token) || c >= d) return;   // not the start of a run
    float acc = dE[int64_t(token) * d + c];
    for (int r = j; r < T && sorted_token[r] == token; r = (r / kEmbedSegment + 1) * kEmbedSegment)
        acc += pieces[int64_t(r) * d + c];   // the piece that starts at r (the run's start, then each segment's)
    dE[int64_t(token) * d + c] = acc;
}
}  // namespace detail

inline void embedding_forward(float* out, const int32_t* tokens, const float* E, int T, int d, int vocab) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0) return;
    int32_t bad = 0;
    const int first = detail::first_bad_id(tokens, T, 0, vocab, INT32_MIN, &bad);
    if (first < T) fail("cuda::embedding: token id ", bad, " at position ", first, " outside [0, ", vocab, ")");
    detail::embedding_forward_kernel<<<T, 128>>>(out, tokens, E, d);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void embedding_backward(float* dE, const float* dout, const int32_t* tokens, int T, int d) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || d <= 0) return;
    // scratch: sorted tokens, positions 0..T-1, sorted positions [T] each, then CUB's temporary storage
    size_t cub_bytes = 0;
    DSV3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, tokens, static_cast<int32_t*>(nullptr),
                                                    static_cast<const int32_t*>(nullptr),
                                                    static_cast<int32_t*>(nullptr), T));
    const size_t ints = (size_t(3) * T + 63) / 64 * 64;   // keeps CUB's storage 256-byte aligned
    auto* base = static_cast<int32_t*>(scratch(Slot::sort, ints * sizeof(int32_t) + cub_bytes));
    int32_t *sorted_token = base, *position = base + T, *sorted_t = base + 2 * size_t(T);
    detail::iota_kernel<<<std::min(grid_for(T, 256), 1024), 256>>>(position, T);
    DSV3_CUDA_CHECK_LAUNCH();
    DSV3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(base + ints, cub_bytes, tokens, sorted_token, position, sorted_t,
                                                    T));
    auto* pieces = static_cast<float*>(scratch(Slot::embedding_pieces, sizeof(float) * size_t(T) * d));
    const unsigned col_blocks = unsigned((d + 127) / 128);
    detail::embedding_backward_pieces_kernel<<<dim3(unsigned((T + detail::kEmbedSegment - 1) / detail::kEmbedSegment),
                                                    col_blocks), 128>>>(pieces, dout, sorted_token, sorted_t, T, d);
    DSV3_CUDA_CHECK_LAUNCH();
    detail::embedding_backward_runs_kernel<<<dim3(unsigned(T), col_blocks), 128>>>(dE, pieces, sorted_token, T, d);
    DSV3_CUDA_CHECK_LAUNCH();
}

// =====================================================================================================================
// 3.7 cross-entropy      logits: [T, V]; targets: [T] (device; kIgnore skips a row); mean over counted rows, nats
// =====================================================================================================================
namespace detail {
// Per row: loss_t = log Σ exp(z − max) + max − z_y, the sum in double like the CPU (of float exponentials: exp in
// double was the kernel's largest cost), 0 for ignored rows. Two passes over the row (max, then the sum); the
// second mostly hits L2.
template <int VEC>
__global__ void cross_entropy_rows_kernel(double* loss, const float* logits, const int32_t* targets, int V) {
    __shared__ float redf[32];
    __shared__ double redd[32];
    const int64_t t = blockIdx.x;
    const int32_t y = targets[t];
    const float* z = logits + t * V;
    float mx = -INFINITY;
    for (int i = VEC * threadIdx.x; i < V; i += VEC * blockDim.x) {
        const Floats<VEC> a = load<VEC>(z + i);
        for (int e = 0; e < VEC; ++e) mx = fmaxf(mx, a.v[e]);
    }
    mx = block_max(mx, redf);
    double sum = 0.0;
    for (int i = VEC * threadIdx.x; i < V; i += VEC * blockDim.x) {
        const Floats<VEC> a = load<VEC>(z + i);
        for (int e = 0; e < VEC; ++e) sum += double(expf(a.v[e] - mx));
    }
    sum = block_sum_d(sum, redd);
    if (threadIdx.x == 0) loss[t] = y == kIgnore ? 0.0 : log(sum) + mx - z[y];
}
// Sum of T doubles by one block in a fixed order.
__global__ void sum_doubles_kernel(double* out, const double* x, int64_t n) {
    __shared__ double red[32];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum_d(s, red);
    if (threadIdx.x == 0) *out = s;
}
// dz += w·(softmax(z) − onehot(y)). One pass finds the row's max and its sum of exponentials together (each thread
// keeps a running max m and a sum s scaled to it, rescaling s when m grows; the block then scales every thread's s
// to the row's max), a second writes.
template <int VEC>
__global__ void cross_entropy_backward_kernel(float* dlogits, const float* logits, const int32_t* targets, int V,
                                              float w) {
    __shared__ float red[32];
    const int64_t t = blockIdx.x;
    const int32_t y = targets[t];
    if (y == kIgnore) return;   // the whole block leaves together: no barrier is skipped by some threads only
    const float* z = logits + t * V;
    float* dz = dlogits + t * V;
    float m = -INFINITY, s = 0.0f;
    for (int i = VEC * threadIdx.x; i < V; i += VEC * blockDim.x) {
        const Floats<VEC> a = load<VEC>(z + i);
        for (int e = 0; e < VEC; ++e) {
            if (a.v[e] > m) {
                s = s * expf(m - a.v[e]) + 1.0f;
                m = a.v[e];
            } else if (m != -INFINITY) {   // (−∞ − −∞ would be NaN; a −∞ logit adds nothing)
                s += expf(a.v[e] - m);
            }
        }
    }
    const float mx = block_max(m, red);
    const float sum = block_sum(m == -INFINITY ? 0.0f : s * expf(m - mx), red);
    const float inv = 1.0f / sum;
    for (int i = VEC * threadIdx.x; i < V; i += VEC * blockDim.x) {
        const Floats<VEC> a = load<VEC>(z + i);
        Floats<VEC> o = load<VEC>(dz + i);
        for (int e = 0; e < VEC; ++e) o.v[e] += w * (expf(a.v[e] - mx) * inv - (i + e == y ? 1.0f : 0.0f));
        store<VEC>(dz + i, o);
    }
}
__global__ void count_not_ignored_kernel(int* out, const int32_t* targets, int T) {
    __shared__ float red[32];
    float c = 0.0f;   // exact as a float up to 2^24 rows
    for (int t = threadIdx.x; t < T; t += blockDim.x) c += targets[t] != kIgnore ? 1.0f : 0.0f;
    c = block_sum(c, red);
    if (threadIdx.x == 0) *out = int(c);
}
// The CPU's cross_entropy_count: checks the targets (throws on an id outside [0, V) other than kIgnore) and returns
// the number of counted rows. Synchronises.
inline int64_t cross_entropy_count(const int32_t* targets, int T, int V) {
    if (T <= 0) return 0;
    int32_t bad = 0;
    const int first = first_bad_id(targets, T, 0, V, kIgnore, &bad);
    if (first < T) fail("cuda::cross_entropy: target ", bad, " at row ", first, " outside [0, ", V, ")");
    int* d = static_cast<int*>(scratch(Slot::reduce, sizeof(int) * 2));
    count_not_ignored_kernel<<<1, 1024>>>(d, targets, T);
    DSV3_CUDA_CHECK_LAUNCH();
    int counted = 0;
    DSV3_CUDA_CHECK(cudaMemcpy(&counted, d, sizeof(int), cudaMemcpyDeviceToHost));
    return counted;
}
}  // namespace detail

inline double cross_entropy_forward(const float* logits, const int32_t* targets, int T, int V) {
    DSV3_PROFILE_KERNEL();
    const int64_t counted = detail::cross_entropy_count(targets, T, V);
    if (counted == 0) return 0.0;
    double* rows = static_cast<double*>(scratch(Slot::decode_stats, sizeof(double) * (size_t(T) + 1)));
    if (detail::vec_ok(V, V, {logits})) detail::cross_entropy_rows_kernel<4><<<T, 256>>>(rows, logits, targets, V);
    else detail::cross_entropy_rows_kernel<1><<<T, 256>>>(rows, logits, targets, V);
    DSV3_CUDA_CHECK_LAUNCH();
    detail::sum_doubles_kernel<<<1, 1024>>>(rows + T, rows, T);
    DSV3_CUDA_CHECK_LAUNCH();
    double total = 0.0;
    DSV3_CUDA_CHECK(cudaMemcpy(&total, rows + T, sizeof(double), cudaMemcpyDeviceToHost));
    return total / double(counted);
}
inline void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, int T, int V,
                                   float dloss) {
    DSV3_PROFILE_KERNEL();
    const int64_t counted = detail::cross_entropy_count(targets, T, V);
    if (counted == 0) return;
    const float w = dloss / float(counted);   // the CPU's w, bit for bit
    if (detail::vec_ok(V, V, {dlogits, logits}))
        detail::cross_entropy_backward_kernel<4><<<T, 256>>>(dlogits, logits, targets, V, w);
    else detail::cross_entropy_backward_kernel<1><<<T, 256>>>(dlogits, logits, targets, V, w);
    DSV3_CUDA_CHECK_LAUNCH();
}

// =====================================================================================================================
// 3.8 the MoE router [V3 §2.1.2, eqs. 13-16]      logits, scores: [T, N]; bias: [N]; chosen, gates: [T, K]
// =====================================================================================================================
// One thread per token: N is small (8 … 256) and each token's work is a few hundred operations, in the CPU's order.
namespace detail {
__global__ void router_scores_forward_kernel(float* scores, const float* logits, int T, int N, bool softmax) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= T) return;
    const float* z = logits + t * N;
    float* s = scores + t * N;
    if (!softmax) {
        for (int i = 0; i < N; ++i) s[i] = 1.0f / (1.0f + expf(-z[i]));
        return;
    }
    float mx = z[0], sum = 0.0f;
    for (int i = 1; i < N; ++i) mx = fmaxf(mx, z[i]);
    for (int i = 0; i < N; ++i) sum += (s[i] = expf(z[i] - mx));
    for (int i = 0; i < N; ++i) s[i] /= sum;
}
__global__ void router_scores_backward_kernel(float* dlogits, const float* dscores, const float* scores, int T, int N,
                                              bool softmax) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= T) return;
    const float* s = scores + t * N;
    const float* ds = dscores + t * N;
    float* dz = dlogits + t * N;
    if (!softmax) {
        for (int i = 0; i < N; ++i) dz[i] += ds[i] * s[i] * (1.0f - s[i]);
        return;
    }
    float dot = 0.0f;
    for (int i = 0; i < N; ++i) dot += ds[i] * s[i];
    for (int i = 0; i < N; ++i) dz[i] += s[i] * (ds[i] - dot);
}
// Group-limited top-k, the CPU's rules exactly: biased = s + b; a group's score is the sum of its two best biased
// scores (the best alone for softmax); the topk_group best groups stay (ties: lower group id, like stable_sort);
// then the K best experts among them (ties: lower expert id), in rank order. Masked experts count as -inf, so if K
// exceeds the experts left they are taken in id order, as partial_sort over -inf values does.
constexpr int kMaxGroups = 64;
__global__ void router_select_kernel(int32_t* chosen, const float* scores, const float* bias, int T, int N, int K,
                                     int G, int topk_group, bool softmax) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= T) return;
    const float* s = scores + t * N;
    auto biased = [&](int i) { return s[i] + (bias ? bias[i] : 0.0f); };
    uint64_t keep = ~0ull;   // bit g: group g allowed
    const int per_group = N / G;
    if (G > 1) {
        float gscore[kMaxGroups];
        for (int g = 0; g < G; ++g) {
            float best = -INFINITY, second = -INFINITY;
            for (int i = g * per_group; i < (g + 1) * per_group; ++i) {
                const float b = biased(i);
                if (b > best) { second = best; best = b; }
                else if (b > second) second = b;
            }
            gscore[g] = softmax ? best : best + second;
        }
        keep = 0;
        for (int r = 0; r < topk_group; ++r) {   // r-th best group not yet kept; ties to the lower id
            int arg = -1;
            for (int g = 0; g < G; ++g)
                if (!((keep >> g) & 1ull) && (arg < 0 || gscore[g] > gscore[arg])) arg = g;
            keep |= 1ull << arg;
        }
    }
    // The k-th best expert, in the order (biased score descending, id ascending) that the CPU's loop defines: the ones
    // chosen so far are exactly the first k in that order, so the next is the best one after the last chosen
    // (prev_b, prev_i). No list of chosen ids to search (it was re-read from memory for every candidate).
    int32_t* out = chosen + t * K;
    float prev_b = INFINITY;
    int prev_i = -1;
    for (int k = 0; k < K; ++k) {
        int arg = -1;
        float best = 0.0f;
        for (int i = 0; i < N; ++i) {
            const float b = ((keep >> (i / per_group)) & 1ull) ? biased(i) : -INFINITY;
            if (!(b < prev_b || (b == prev_b && i > prev_i))) continue;   // chosen already
            if (arg < 0 || b > best) { arg = i; best = b; }
        }
        out[k] = arg;
        prev_b = best, prev_i = arg;
    }
}
__global__ void router_gates_forward_kernel(float* gates, const float* scores, const int32_t* chosen, int T, int N,
                                            int K, bool norm_topk, float route_scale) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= T) return;
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += scores[t * N + chosen[t * K + k]];
    const float norm = norm_topk ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (int k = 0; k < K; ++k) gates[t * K + k] = route_scale * scores[t * N + chosen[t * K + k]] * norm;
}
__global__ void router_gates_backward_kernel(float* dscores, const float* dgates, const float* scores,
                                             const int32_t* chosen, int T, int N, int K, bool norm_topk,
                                             float route_scale) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= T) return;
    if (!norm_topk) {
        for (int k = 0; k < K; ++k) dscores[t * N + chosen[t * K + k]] += route_scale * dgates[t * K + k];
        return;
    }
    float S = 1e-20f, dot = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float s = scores[t * N + chosen[t * K + k]];
        S += s;
        dot += dgates[t * K + k] * s;
    }
    for (int k = 0; k < K; ++k)
        dscores[t * N + chosen[t * K + k]] += route_scale * (dgates[t * K + k] / S - dot / (S * S));
}
}  // namespace detail

inline void router_scores_forward(float* scores, const float* logits, int T, int N, bool softmax) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || N <= 0) return;
    detail::router_scores_forward_kernel<<<grid_for(T, 128), 128>>>(scores, logits, T, N, softmax);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void router_scores_backward(float* dlogits, const float* dscores, const float* scores, int T, int N,
                                   bool softmax) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || N <= 0) return;
    detail::router_scores_backward_kernel<<<grid_for(T, 128), 128>>>(dlogits, dscores, scores, T, N, softmax);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void router_select(int32_t* chosen, const float* scores, const float* bias, int T, const Config& c) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts, G = c.n_expert_groups;
    if (T <= 0) return;
    if (G < 1 || G > detail::kMaxGroups || N % G != 0 || K > N || c.n_limited_groups < 1 || c.n_limited_groups > G)
        fail("cuda::router_select: need 1 <= n_expert_groups <= ", detail::kMaxGroups, " dividing n_routed_experts, ",
             "K <= N and 1 <= n_limited_groups <= n_expert_groups; found N=", N, " K=", K, " G=", G,
             " topk_group=", c.n_limited_groups);
    detail::router_select_kernel<<<grid_for(T, 64), 64>>>(chosen, scores, bias, T, N, K, G, c.n_limited_groups,
                                                          c.score_func == "softmax");
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void router_gates_forward(float* gates, const float* scores, const int32_t* chosen, int T, const Config& c) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0) return;
    detail::router_gates_forward_kernel<<<grid_for(T, 128), 128>>>(gates, scores, chosen, T, c.n_routed_experts,
                                                                   c.n_activated_experts, c.norm_topk_prob,
                                                                   c.route_scale);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void router_gates_backward(float* dscores, const float* dgates, const float* scores, const int32_t* chosen,
                                  int T, const Config& c) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0) return;
    detail::router_gates_backward_kernel<<<grid_for(T, 128), 128>>>(dscores, dgates, scores, chosen, T,
                                                                    c.n_routed_experts, c.n_activated_experts,
                                                                    c.norm_topk_prob, c.route_scale);
    DSV3_CUDA_CHECK_LAUNCH();
}

// =====================================================================================================================
// 3.9 balance losses [V3 eqs. 17-20; DeepSeekMoE eqs. 12-14]: the CPU's formulas, summed in double. The expert
// fractions f count the choices of each group of rows (a sequence, or the whole batch) in row order; the losses
// come back to the host as one double per group, summed there in group order like the CPU's.
namespace detail {
// f[g, i] = N/(K·T) · (times expert i is among the T·K choices of rows g·T .. g·T+T-1): one thread per expert.
__global__ void expert_fraction_kernel(double* f, const int32_t* chosen, int T, int K, int N) {
    const int64_t first = int64_t(blockIdx.x) * T * K, last = first + int64_t(T) * K;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        int64_t count = 0;
        for (int64_t e = first; e < last; ++e) count += chosen[e] == i;
        f[int64_t(blockIdx.x) * N + i] = double(N) / (double(K) * T) * double(count);
    }
}
// One block per sequence b: P_i = (1/T) Σ_t s_{t,i} / Σ_j s_{t,j}; loss[b] = α Σ_i f_i P_i; and, when dscores is
// given, ∂L/∂s_{t,j} += (α f_j / (T·B) − Σ_i α f_i / (T·B) · s_{t,i} / S_t) / S_t.
__global__ void sequence_balance_kernel(double* loss, float* dscores, const float* scores, const double* f_all, int T,
                                        int N, int B, float alpha) {
    extern __shared__ double P[];  // [N]
    const int b = blockIdx.x;
    const double* f = f_all + int64_t(b) * N;
    const float* s_b = scores + int64_t(b) * T * N;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        double p = 0;
        for (int t = 0; t < T; ++t) {
            const float* s = s_b + int64_t(t) * N;
            double S = 0;
            for (int j = 0; j < N; ++j) S += s[j];
            p += s[i] / S / T;
        }
        P[i] = p;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double L = 0;
        for (int i = 0; i < N; ++i) L += f[i] * P[i];
        loss[b] = alpha * L;
    }
    if (!dscores) return;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const float* s = s_b + int64_t(t) * N;
        double S = 0, dot = 0;
        for (int j = 0; j < N; ++j) S += s[j];
        for (int i = 0; i < N; ++i) dot += alpha * f[i] / (double(T) * B) * s[i] / S;
        float* ds = dscores + (int64_t(b) * T + t) * N;
        for (int j = 0; j < N; ++j) ds[j] += float((alpha * f[j] / (double(T) * B) - dot) / S);
    }
}
// One thread per row t: p = softmax(logits_t) in double, kept for the sum; dlogits += p_i (α f_i / T − Σ_j α f_j / T p_j).
__global__ void expert_balance_rows_kernel(double* p_all, float* dlogits, const float* logits, const double* f, int T,
                                           int N, float alpha) {
    const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* z = logits + t * N;
    double* p = p_all + t * N;
    float mx = z[0];
    for (int i = 1; i < N; ++i) mx = fmaxf(mx, z[i]);
    double sum = 0, dot = 0;
    for (int i = 0; i < N; ++i) sum += (p[i] = exp(double(z[i] - mx)));
    for (int i = 0; i < N; ++i) {
        p[i] /= sum;
        dot += alpha * f[i] / T * p[i];
    }
    if (dlogits)
        for (int i = 0; i < N; ++i) dlogits[t * N + i] += float(p[i] * (alpha * f[i] / T - dot));
}
// One block: P_i = Σ_t p_{t,i} (thread i, rows in order), then loss = α Σ_i f_i P_i / T (thread 0, experts in order).
__global__ void expert_balance_sum_kernel(double* loss, const double* p, const double* f, int T, int N, float alpha) {
    extern __shared__ double P[];  // [N]
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        double s = 0;
        for (int t = 0; t < T; ++t) s += p[int64_t(t) * N + i];
        P[i] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double L = 0;
        for (int i = 0; i < N; ++i) L += f[i] * P[i] / T;
        *loss = alpha * L;
    }
}
}  // namespace detail

// scores: [B·T, N], chosen: [B·T, K] (device); dscores: [B·T, N] (+=) or null. Returns the loss (synchronises).
inline double sequence_balance_loss(float* dscores, const float* scores, const int32_t* chosen, int B, int T,
                                    const Config& c, float alpha) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts;
    if (B <= 0 || T <= 0) return 0.0;
    DeviceBuffer<double> f{size_t(B) * N}, loss{size_t(B)};
    detail::expert_fraction_kernel<<<B, 128>>>(f.data(), chosen, T, K, N);
    DSV3_CUDA_CHECK_LAUNCH();
    detail::sequence_balance_kernel<<<B, 128, sizeof(double) * size_t(N)>>>(loss.data(), dscores, scores, f.data(), T,
                                                                          N, B, alpha);
    DSV3_CUDA_CHECK_LAUNCH();
    double total = 0;
    for (double v : loss.download()) total += v;
    return total / B;
}
// logits: [T, N], chosen: [T, K] (device); dlogits: [T, N] (+=) or null. Returns the loss (synchronises).
inline double expert_balance_loss(float* dlogits, const float* logits, const int32_t* chosen, int T, const Config& c,
                                  float alpha) {
    DSV3_PROFILE_KERNEL();
    const int N = c.n_routed_experts, K = c.n_activated_experts;
    if (T <= 0) return 0.0;
    DeviceBuffer<double> f{size_t(N)}, p{size_t(T) * N}, loss{size_t(1)};
    detail::expert_fraction_kernel<<<1, 128>>>(f.data(), chosen, T, K, N);
    DSV3_CUDA_CHECK_LAUNCH();
    detail::expert_balance_rows_kernel<<<grid_for(T, 128), 128>>>(p.data(), dlogits, logits, f.data(), T, N, alpha);
    DSV3_CUDA_CHECK_LAUNCH();
    detail::expert_balance_sum_kernel<<<1, 128, sizeof(double) * size_t(N)>>>(loss.data(), p.data(), f.data(), T, N,
                                                                            alpha);
    DSV3_CUDA_CHECK_LAUNCH();
    return loss.download()[0];
}

// =====================================================================================================================
// 3.10 MoE permutation: tokens grouped by expert (stable sort, on the device), so each expert runs one GEMM
// =====================================================================================================================
// The plan is made on the device, and is the CPU's exactly. The CPU's counting sort gives entry i = t·K + k (expert
// e = chosen[i]) the row offsets[e] + (number of entries j < i with chosen[j] = e): entries grouped by expert, in
// order of i within an expert. A STABLE sort of the entries by expert id is that same order, so: CUB's radix sort
// (stable) sorts the pairs (chosen[i], i); the entry at sorted position r gets row r (slot[i] = r, token_of[r] = i/K);
// offsets[e] is the first r whose expert is >= e (one thread per boundary between runs writes the offsets of the
// experts it separates). Integer work with no atomics: bitwise the CPU's plan. The expert GEMMs that follow are
// launched from the host with each expert's row range, so the offsets come back to the host: ONE device-to-host
// copy per MoE layer (N+1 integers, plus the first bad id that the same pass checks for), which also brings
// slot and token_of back into p.host (asynchronously, into pinned memory, before it) for host-side users of the
// plan (expert parallelism's dispatch, section 9).
struct MoePermutation {
    dsv3::MoePermutation host;          // slot, token_of, offsets [N+1], counts [N] on the host
    DeviceBuffer<int32_t> slot;         // [T·K]: row of (token t, choice k) in the permuted order
    DeviceBuffer<int32_t> token_of;     // [T·K]: token of each permuted row
};
namespace detail {
__global__ void plan_offsets_kernel(int64_t* offsets, const uint32_t* sorted_expert, int rows, int N) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r <= rows; r += gridDim.x * blockDim.x) {
        const int64_t prev = r > 0 ? int64_t(sorted_expert[r - 1]) : -1, cur = r < rows ? int64_t(sorted_expert[r]) : N;
        const int64_t lo = prev + 1 > 0 ? prev + 1 : 0, hi = cur < N ? cur : N;   // clamped: bad ids fail later
        for (int64_t e = lo; e <= hi; ++e) offsets[e] = r;
    }
}
__global__ void plan_rows_kernel(int32_t* slot, int32_t* token_of, const int32_t* sorted_entry, int rows, int K) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        const int32_t i = sorted_entry[r];
        slot[i] = r;
        token_of[r] = i / K;
    }
}
// Page-locked host memory that grows on demand (one per host thread), for asynchronous device-to-host copies.
inline void* pinned(size_t bytes) {
    struct Pinned {
        void* p = nullptr;
        size_t n = 0;
        ~Pinned() { if (p) cudaFreeHost(p); }
    };
    static thread_local Pinned b;
    if (b.n < bytes) {
        if (b.p) DSV3_CUDA_CHECK(cudaFreeHost(b.p));
        b.p = nullptr;
        b.n = 0;
        DSV3_CUDA_CHECK(cudaMallocHost(&b.p, bytes + bytes / 4));
        b.n = bytes + bytes / 4;
    }
    return b.p;
}
}  // namespace detail
inline void moe_permute_plan(MoePermutation& p, const int32_t* chosen, int T, int K, int N) {
    DSV3_PROFILE_KERNEL();
    if (T < 0 || K < 0 || N <= 0) fail("cuda::moe_permute_plan: need T, K >= 0 and N > 0, found T=", T, " K=", K, " N=", N);
    const int64_t rows64 = int64_t(T) * K;
    if (rows64 >= (int64_t(1) << 31)) fail("cuda::moe_permute_plan: T·K = ", rows64, " rows exceed 2^31 - 1");
    const int rows = int(rows64);
    p.host.counts.assign(size_t(N), 0);
    p.host.offsets.assign(size_t(N) + 1, 0);
    p.host.slot.resize(size_t(rows));
    p.host.token_of.resize(size_t(rows));
    p.slot.resize(size_t(rows));
    p.token_of.resize(size_t(rows));
    if (rows == 0) return;
    int end_bit = 1;
    while (end_bit < 32 && (uint64_t(1) << end_bit) < uint64_t(N)) ++end_bit;   // ids < N fit in end_bit bits
    const auto* keys = reinterpret_cast<const uint32_t*>(chosen);   // valid ids are >= 0: same order as int32
    size_t cub_bytes = 0;
    DSV3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, keys, static_cast<uint32_t*>(nullptr),
                                                    static_cast<const int32_t*>(nullptr),
                                                    static_cast<int32_t*>(nullptr), rows, 0, end_bit));
    const size_t ints = (size_t(3) * rows + 63) / 64 * 64;   // keeps CUB's storage 256-byte aligned
    auto* base = static_cast<int32_t*>(scratch(Slot::plan, ints * sizeof(int32_t) + cub_bytes));
    auto* sorted_key = reinterpret_cast<uint32_t*>(base);
    int32_t *entry = base + rows, *sorted_entry = base + 2 * size_t(rows);
    // [0]: the first bad entry (int32, rows if none); [1 ..]: offsets, N + 1 int64
    auto* out = static_cast<int64_t*>(scratch(Slot::plan_offsets, sizeof(int64_t) * (size_t(N) + 2)));
    detail::first_bad_id_kernel<<<1, 1024>>>(reinterpret_cast<int*>(out), chosen, rows, 0, N, INT32_MIN);
    DSV3_CUDA_CHECK_LAUNCH();
    detail::iota_kernel<<<std::min(grid_for(rows, 256), 1024), 256>>>(entry, rows);
    DSV3_CUDA_CHECK_LAUNCH();
    DSV3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(base + ints, cub_bytes, keys, sorted_key, entry, sorted_entry, rows,
                                                    0, end_bit));
    detail::plan_offsets_kernel<<<std::min(grid_for(rows + 1, 256), 1024), 256>>>(out + 1, sorted_key, rows, N);
    DSV3_CUDA_CHECK_LAUNCH();
    detail::plan_rows_kernel<<<std::min(grid_for(rows, 256), 1024), 256>>>(p.slot.data(), p.token_of.data(),
                                                                           sorted_entry, rows, K);
    DSV3_CUDA_CHECK_LAUNCH();
    // slot and token_of to pinned memory (queued), then the offsets (this copy waits for all of it)
    auto* staged = static_cast<int32_t*>(detail::pinned(sizeof(int32_t) * 2 * size_t(rows)));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(staged, p.slot.data(), sizeof(int32_t) * size_t(rows), cudaMemcpyDeviceToHost, 0));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(staged + rows, p.token_of.data(), sizeof(int32_t) * size_t(rows),
                                    cudaMemcpyDeviceToHost, 0));
    std::vector<int64_t> back(size_t(N) + 2);
    DSV3_CUDA_CHECK(cudaMemcpy(back.data(), out, sizeof(int64_t) * back.size(), cudaMemcpyDeviceToHost));
    int first_bad = 0;
    std::memcpy(&first_bad, back.data(), sizeof(int));
    if (first_bad < rows) {
        int32_t bad = 0;
        DSV3_CUDA_CHECK(cudaMemcpy(&bad, chosen + first_bad, sizeof(int32_t), cudaMemcpyDeviceToHost));
        fail("cuda::moe_permute_plan: expert id ", bad, " at entry ", first_bad, " outside [0, ", N, ")");
    }
    std::copy(back.begin() + 1, back.end(), p.host.offsets.begin());
    for (int e = 0; e < N; ++e) p.host.counts[size_t(e)] = p.host.offsets[size_t(e) + 1] - p.host.offsets[size_t(e)];
    std::memcpy(p.host.slot.data(), staged, sizeof(int32_t) * size_t(rows));
    std::memcpy(p.host.token_of.data(), staged + rows, sizeof(int32_t) * size_t(rows));
}
namespace detail {
template <int V>
__global__ void moe_permute_forward_kernel(float* xe, const float* x, const int32_t* token_of, int d) {
    const int64_t r = blockIdx.x;
    const float* src = x + int64_t(token_of[r]) * d;
    for (int i = V * threadIdx.x; i < d; i += V * blockDim.x) store<V>(xe + r * d + i, load<V>(src + i));
}
template <int V>
__global__ void moe_permute_backward_kernel(float* dx, const float* dxe, const int32_t* slot, int K, int d) {
    const int64_t t = blockIdx.x;
    for (int i = V * threadIdx.x; i < d; i += V * blockDim.x) {
        Floats<V> acc = load<V>(dx + t * d + i);
        for (int k = 0; k < K; ++k) {   // k in order, like the CPU
            const Floats<V> a = load<V>(dxe + int64_t(slot[t * K + k]) * d + i);
            for (int e = 0; e < V; ++e) acc.v[e] += a.v[e];
        }
        store<V>(dx + t * d + i, acc);
    }
}
template <int V>
__global__ void moe_unpermute_forward_kernel(float* y, const float* ye, const float* gates, const int32_t* slot,
                                             int K, int d) {
    const int64_t t = blockIdx.x;
    for (int i = V * threadIdx.x; i < d; i += V * blockDim.x) {
        Floats<V> acc = load<V>(y + t * d + i);
        for (int k = 0; k < K; ++k) {
            const float g = gates[t * K + k];
            const Floats<V> a = load<V>(ye + int64_t(slot[t * K + k]) * d + i);
            for (int e = 0; e < V; ++e) acc.v[e] += g * a.v[e];
        }
        store<V>(y + t * d + i, acc);
    }
}
// One warp per (t, k): dye[slot] = g·dy[t] and dgates[t,k] += dy[t]·ye[slot] (warp-reduced).
template <int V>
__global__ void moe_unpermute_backward_kernel(float* dye, float* dgates, const float* dy, const float* ye,
                                              const float* gates, const int32_t* slot, int T, int K, int d) {
    const int64_t pair = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (pair >= int64_t(T) * K) return;   // whole warps leave together
    const int64_t t = pair / K, row = slot[pair];
    const float g = gates[pair];
    float dot = 0.0f;
    for (int i = V * lane; i < d; i += V * 32) {
        const Floats<V> a = load<V>(dy + t * d + i), b = load<V>(ye + row * d + i);
        Floats<V> o;
        for (int e = 0; e < V; ++e) {
            o.v[e] = g * a.v[e];
            dot += a.v[e] * b.v[e];
        }
        store<V>(dye + row * d + i, o);
    }
    dot = warp_sum(dot);
    if (lane == 0) dgates[pair] += dot;
}
}  // namespace detail

// xe[row] = x[token_of[row]]        x: [T, d], xe: [T·K, d]
inline void moe_permute_forward(float* xe, const float* x, const MoePermutation& p, int d) {
    DSV3_PROFILE_KERNEL();
    const int64_t rows = int64_t(p.token_of.size());
    if (rows == 0 || d <= 0) return;
    if (detail::vec_ok(d, d, {xe, x}))
        detail::moe_permute_forward_kernel<4><<<unsigned(rows), detail::row_threads(d / 4)>>>(xe, x, p.token_of.data(),
                                                                                              d);
    else detail::moe_permute_forward_kernel<1><<<unsigned(rows), 128>>>(xe, x, p.token_of.data(), d);
    DSV3_CUDA_CHECK_LAUNCH();
}
// dx[t] += Σ_k dxe[slot[t,k]]
inline void moe_permute_backward(float* dx, const float* dxe, const MoePermutation& p, int T, int K, int d) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || K <= 0 || d <= 0) return;
    if (detail::vec_ok(d, d, {dx, dxe}))
        detail::moe_permute_backward_kernel<4><<<T, detail::row_threads(d / 4)>>>(dx, dxe, p.slot.data(), K, d);
    else detail::moe_permute_backward_kernel<1><<<T, 128>>>(dx, dxe, p.slot.data(), K, d);
    DSV3_CUDA_CHECK_LAUNCH();
}
// y[t] += Σ_k gates[t,k] · ye[slot[t,k]]      ye: [T·K, d]; y: [T, d]; gates: [T, K]
inline void moe_unpermute_forward(float* y, const float* ye, const float* gates, const MoePermutation& p, int T, int K,
                                  int d) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || K <= 0 || d <= 0) return;
    if (detail::vec_ok(d, d, {y, ye}))
        detail::moe_unpermute_forward_kernel<4><<<T, detail::row_threads(d / 4)>>>(y, ye, gates, p.slot.data(), K, d);
    else detail::moe_unpermute_forward_kernel<1><<<T, 128>>>(y, ye, gates, p.slot.data(), K, d);
    DSV3_CUDA_CHECK_LAUNCH();
}
// dye[slot] = gates · dy[t];  dgates[t,k] += dy[t] · ye[slot]
inline void moe_unpermute_backward(float* dye, float* dgates, const float* dy, const float* ye, const float* gates,
                                   const MoePermutation& p, int T, int K, int d) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || K <= 0 || d <= 0) return;
    const int64_t threads = int64_t(T) * K * 32;
    const int32_t* slot = p.slot.data();
    if (detail::vec_ok(d, d, {dye, dy, ye}))
        detail::moe_unpermute_backward_kernel<4><<<grid_for(threads, 256), 256>>>(dye, dgates, dy, ye, gates, slot, T,
                                                                                  K, d);
    else detail::moe_unpermute_backward_kernel<1><<<grid_for(threads, 256), 256>>>(dye, dgates, dy, ye, gates, slot, T,
                                                                                   K, d);
    DSV3_CUDA_CHECK_LAUNCH();
}

// =====================================================================================================================
// 3.10b the experts' grouped GEMMs: one projection of all of a layer's experts in ONE launch
// =====================================================================================================================
// After the permutation, expert g owns rows offsets[g] .. offsets[g+1] of x, and its weight sits at W + g·w_stride.
// Calling matmul_forward once per expert would cost 2 conversions + 1 cuBLAS call per expert and projection, each a
// tiny GEMM when the experts are many and narrow (V3: 256 experts of width 2048, ~32 tokens each per 4096-token
// micro-batch): launch overhead, not arithmetic, would set the time. This kernel covers every expert's output tiles
// in one grid: blockIdx.y is one (expert, row tile) pair of a list made on the host (grouped_grid, below),
// blockIdx.x a column tile, each a 64×64 tile of that expert's output. Each block walks K in steps of 32: it loads a
// 64×32 slice of A and a 32×64 slice of B from FP32 memory, rounding to BF16 on the way into shared memory (so no
// separate conversion pass), and its 4 warps multiply them
// on the tensor cores with WMMA 16×16×16 BF16 fragments, accumulating in FP32. Same numerics as matmul_forward
// (BF16 inputs, FP32 accumulation and output); each output is summed by one block in a fixed k order: deterministic.
//
// The three products of a linear layer, for expert g with r0 = offsets[g] and R = offsets[g+1] − r0 rows:
//   forward  y[r0+m, n]  = Σ_k x[r0+m, k] · W_g[n, k]       M = R,   N = out, K = in
//   dx       dx[r0+m, n] += Σ_k dy[r0+m, k] · W_g[k, n]     M = R,   N = in,  K = out
//   dW       dW_g[m, n]  += Σ_k dy[r0+k, m] · x[r0+k, n]    M = out, N = in,  K = R
// A simple kernel (no double buffering, no wgmma), a plain example of what a grouped GEMM is; the pipelined kernel
// below (BF16 operands in memory, 128×128 tiles, cp.async) is the default, and this one runs the shapes it does not
// take (in or out not a multiple of 8). Needs sm_80 or newer (BF16 WMMA).
namespace detail {
enum class Grouped { forward, dx, dW };
struct GroupedArgs {
    const float* a;        // x (forward) or dy (dx, dW)
    const float* b;        // W (forward, dx) or x (dW)
    float* c;              // y, dx or dW
    const int64_t* offsets;  // [groups + 1], device
    const int2* units;     // [grid.y] the expert and row tile of each CTA row (grouped_grid)
    int64_t w_stride;      // floats between consecutive experts' weights (and weight gradients)
    int in, out;
};
constexpr int kGroupedTile = 64, kGroupedK = 32;

template <Grouped kind>
__global__ void __launch_bounds__(128) grouped_gemm_kernel(GroupedArgs p) {
    using namespace nvcuda;
    const int2 unit = p.units[blockIdx.y];
    const int g = unit.x;
    const int64_t r0 = p.offsets[g], R = p.offsets[g + 1] - r0;
    const int64_t M = kind == Grouped::dW ? p.out : R;
    const int N = kind == Grouped::forward ? p.out : p.in;
    const int64_t K = kind == Grouped::forward ? p.in : (kind == Grouped::dx ? p.out : R);
    const int64_t m0 = int64_t(unit.y) * kGroupedTile;
    const int n0 = blockIdx.x * kGroupedTile;
    // A(m, k) and B(k, n) of this expert, as the table above defines them
    auto A = [&](int64_t m, int64_t k) -> float {
        if (kind == Grouped::dW) return p.a[(r0 + k) * p.out + m];
        return p.a[(r0 + m) * K + k];
    };
    auto B = [&](int64_t k, int64_t n) -> float {
        if (kind == Grouped::forward) return p.b[g * p.w_stride + n * p.in + k];
        if (kind == Grouped::dx) return p.b[g * p.w_stride + k * p.in + n];
        return p.b[(r0 + k) * p.in + n];
    };
    __shared__ __align__(32) __nv_bfloat16 As[kGroupedTile][kGroupedK + 8];   // +8: fewer bank conflicts
    __shared__ __align__(32) __nv_bfloat16 Bs[kGroupedK][kGroupedTile + 8];
    __shared__ __align__(32) float Cs[kGroupedTile][kGroupedTile + 4];
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's 32×32 quarter
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (auto& row : acc)
        for (auto& f : row) wmma::fill_fragment(f, 0.0f);
    // Loads run along the operand's contiguous dimension (coalesced): k for x, dy and W in forward; m for dyᵀ in dW;
    // n for W in dx and x in dW.
    constexpr bool a_k_contiguous = kind != Grouped::dW, b_k_contiguous = kind == Grouped::forward;
    for (int64_t k0 = 0; k0 < K; k0 += kGroupedK) {
        for (int i = threadIdx.x; i < kGroupedTile * kGroupedK; i += blockDim.x) {
            const int mm = a_k_contiguous ? i / kGroupedK : i % kGroupedTile;
            const int kk = a_k_contiguous ? i % kGroupedK : i / kGroupedTile;
            const bool in_range = m0 + mm < M && k0 + kk < K;
            As[mm][kk] = __float2bfloat16_rn(in_range ? A(m0 + mm, k0 + kk) : 0.0f);
        }
        for (int i = threadIdx.x; i < kGroupedK * kGroupedTile; i += blockDim.x) {
            const int nn = b_k_contiguous ? i / kGroupedK : i % kGroupedTile;
            const int kk = b_k_contiguous ? i % kGroupedK : i / kGroupedTile;
            const bool in_range = n0 + nn < N && k0 + kk < K;
            Bs[kk][nn] = __float2bfloat16_rn(in_range ? B(k0 + kk, n0 + nn) : 0.0f);
        }
        __syncthreads();
        for (int kk = 0; kk < kGroupedK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wm + 16 * i][kk], kGroupedK + 8);
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[kk][wn + 16 * j], kGroupedTile + 8);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], acc[i][j], kGroupedTile + 4, wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < kGroupedTile * kGroupedTile; i += blockDim.x) {
        const int mm = i / kGroupedTile, nn = i % kGroupedTile;
        if (m0 + mm >= M || n0 + nn >= N) continue;
        float* c = kind == Grouped::dW ? p.c + g * p.w_stride + (m0 + mm) * N + n0 + nn
                                       : p.c + (r0 + m0 + mm) * N + n0 + nn;
        *c = kind == Grouped::forward ? Cs[mm][nn] : *c + Cs[mm][nn];   // forward overwrites, backward accumulates
    }
}
// The offsets go to the device once per call (groups + 1 integers), queued on stream 0 (no synchronisation).
inline const int64_t* device_offsets(const int64_t* host_offsets, int groups) {
    auto* d = static_cast<int64_t*>(scratch(Slot::group_offsets, sizeof(int64_t) * size_t(groups + 1)));
    upload_async(d, host_offsets, sizeof(int64_t) * size_t(groups + 1));
    return d;
}
// The grid of a grouped product in BM × BN tiles, x the column tiles and y the CTA rows, listed in `units` (uploaded,
// one (expert, row tile) pair per y): forward and dx, every row tile of every expert in turn (ceil(R_g / BM) each);
// dW, the row tiles of `out` for each expert that has rows (K = R_g > 0). So no CTA is launched for an expert's
// missing rows: with the collapsed routing of early training (6 of 64 experts hold all the rows) a grid sized by
// the largest expert for every expert was 90% CTAs with nothing to do. Empty (x = 0) when there is nothing to compute.
struct GroupedGrid { dim3 grid; const int2* units; };
inline GroupedGrid grouped_grid(Grouped kind, const int64_t* offsets, int groups, int in, int out, int BM, int BN) {
    std::vector<int2> units;
    for (int g = 0; g < groups; ++g) {
        const int64_t R = offsets[g + 1] - offsets[g];
        const int64_t tiles = kind == Grouped::dW ? (R > 0 ? (out + BM - 1) / BM : 0) : (R + BM - 1) / BM;
        for (int64_t t = 0; t < tiles; ++t) units.push_back(make_int2(g, int(t)));
    }
    const int N = kind == Grouped::forward ? out : in;
    if (units.empty() || N == 0) return {dim3(0, 1, 1), nullptr};
    if (units.size() > 65535) fail("cuda grouped GEMM: ", units.size(), " row tiles, over the grid's 65,535");
    auto* d = static_cast<int2*>(scratch(Slot::group_units, sizeof(int2) * units.size()));
    upload_async(d, units.data(), sizeof(int2) * units.size());
    return {dim3(unsigned((N + BN - 1) / BN), unsigned(units.size()), 1), d};
}
template <Grouped kind>
void grouped_gemm(GroupedArgs args, const int64_t* host_offsets, int groups) {
    const GroupedGrid gg = grouped_grid(kind, host_offsets, groups, args.in, args.out, kGroupedTile, kGroupedTile);
    if (gg.grid.x == 0) return;
    args.units = gg.units;
    grouped_gemm_kernel<kind><<<gg.grid, 128>>>(args);
    DSV3_CUDA_CHECK_LAUNCH();
}

// --- the same products in one launch on BF16 operands: 128×128 tiles, cp.async double buffering ---------------------
// The kernel above rounds FP32 loads on the fly, one 64×64 tile per block, without overlapping loads and math. This
// one takes BF16 operands that are already in memory (the activations converted once per call for all experts, the
// weights' shadows or one conversion), copies 16-byte chunks of the next 128×32 / 32×128 slices into shared memory
// with cp.async while the 8 warps multiply the current ones (WMMA 16×16×16, FP32 accumulation; each warp a 64×32
// part of the tile), and leaves the layout to the fragments: an operand is copied along its contiguous
// dimension and read as a row- or column-major fragment (forward: x row-major, W column-major; dx: dy row-major,
// W row-major; dW: dyᵀ column-major, x row-major). Same numerics as the other paths; each output summed by one
// block in a fixed k order: deterministic. Needs in and out multiples of 8 and 16-byte aligned expert weights
// (else the kernel above runs). One launch per product, so no per-expert host cost.
namespace pipelined {
constexpr int BM = 128, BN = 128, BK = 32, kThreads = 256;
constexpr int kLdK = BK + 8, kLdMN = BM + 8;      // padded leading dimensions (elements): k-contiguous, m/n-contiguous
constexpr int kStage = BM * kLdK > BK * kLdMN ? BM * kLdK : BK * kLdMN;   // elements per operand and stage
struct Args {
    const __nv_bfloat16* a;                 // x (forward) or dy (dx, dW), BF16, rows in expert order
    const __nv_bfloat16* b;                 // x (dW), BF16
    const __nv_bfloat16* const* w;          // [groups] each expert's BF16 weight [out, in] (forward, dx)
    float* c;
    const int64_t* offsets;                 // [groups + 1], device
    const int2* units;                      // [grid.y] the expert and row tile of each CTA row (grouped_grid)
    int64_t w_stride;                       // dW: floats between experts' weight gradients
    int in, out;
};

template <Grouped kind>
__global__ void __launch_bounds__(kThreads) kernel(Args p) {
    using namespace nvcuda;
    const int2 unit = p.units[blockIdx.y];
    const int g = unit.x;
    const int64_t r0 = p.offsets[g], R = p.offsets[g + 1] - r0;
    const int64_t M = kind == Grouped::dW ? p.out : R;
    const int N = kind == Grouped::forward ? p.out : p.in;
    const int64_t K = kind == Grouped::forward ? p.in : (kind == Grouped::dx ? p.out : R);
    const int64_t m0 = int64_t(unit.y) * BM;
    const int n0 = blockIdx.x * BN;
    __shared__ __align__(128) __nv_bfloat16 As[2][kStage];
    __shared__ __align__(128) __nv_bfloat16 Bs[2][kStage];
    const __nv_bfloat16* W = kind == Grouped::dW ? nullptr : p.w[g];
    // A: forward/dx A(m,k) = a[(r0+m)·K + k] (k contiguous: As[m][k]); dW A(m,k) = a[(r0+k)·out + m] (As[k][m]).
    // B: forward B(k,n) = W[n·in + k] (Bs[n][k]); dx B(k,n) = W[k·in + n]; dW B(k,n) = b[(r0+k)·in + n] (Bs[k][n]).
    auto load = [&](int stage, int64_t k0) {
        for (int c = threadIdx.x; c < BM * BK / 8; c += kThreads) {
            if (kind != Grouped::dW) {
                const int mm = c / (BK / 8), kk = (c % (BK / 8)) * 8;
                const bool ok = m0 + mm < M && k0 + kk < K;
                cp_async_16(&As[stage][mm * kLdK + kk], ok ? p.a + (r0 + m0 + mm) * K + k0 + kk : p.a, ok ? 16 : 0);
            } else {
                const int kk = c / (BM / 8), mm = (c % (BM / 8)) * 8;
                const bool ok = k0 + kk < K && m0 + mm < M;
                cp_async_16(&As[stage][kk * kLdMN + mm], ok ? p.a + (r0 + k0 + kk) * p.out + m0 + mm : p.a,
                            ok ? 16 : 0);
            }
        }
        for (int c = threadIdx.x; c < BN * BK / 8; c += kThreads) {
            if (kind == Grouped::forward) {
                const int nn = c / (BK / 8), kk = (c % (BK / 8)) * 8;
                const bool ok = n0 + nn < N && k0 + kk < K;
                cp_async_16(&Bs[stage][nn * kLdK + kk], ok ? W + int64_t(n0 + nn) * p.in + k0 + kk : W, ok ? 16 : 0);
            } else {
                const int kk = c / (BN / 8), nn = (c % (BN / 8)) * 8;
                const bool ok = k0 + kk < K && n0 + nn < N;
                const __nv_bfloat16* src = kind == Grouped::dx ? W + (k0 + kk) * p.in + n0 + nn
                                                               : p.b + (r0 + k0 + kk) * p.in + n0 + nn;
                cp_async_16(&Bs[stage][kk * kLdMN + nn], ok ? src : (kind == Grouped::dx ? W : p.b), ok ? 16 : 0);
            }
        }
        cp_async_commit();
    };
    using LayoutA = typename std::conditional<kind == Grouped::dW, wmma::col_major, wmma::row_major>::type;
    using LayoutB = typename std::conditional<kind == Grouped::forward, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, wm = (warp / 4) * 64, wn = (warp % 4) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
    for (auto& row : acc)
        for (auto& f : row) wmma::fill_fragment(f, 0.0f);
    const int64_t steps = (K + BK - 1) / BK;
    load(0, 0);
    for (int64_t kt = 0; kt < steps; ++kt) {
        const int st = int(kt & 1);
        if (kt + 1 < steps) {
            load(st ^ 1, (kt + 1) * BK);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB> fb[2];
            for (int i = 0; i < 4; ++i) {
                if (kind == Grouped::dW) wmma::load_matrix_sync(fa[i], &As[st][kk * kLdMN + wm + 16 * i], kLdMN);
                else wmma::load_matrix_sync(fa[i], &As[st][(wm + 16 * i) * kLdK + kk], kLdK);
            }
            for (int j = 0; j < 2; ++j) {
                if (kind == Grouped::forward) wmma::load_matrix_sync(fb[j], &Bs[st][(wn + 16 * j) * kLdK + kk], kLdK);
                else wmma::load_matrix_sync(fb[j], &Bs[st][kk * kLdMN + wn + 16 * j], kLdMN);
            }
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();   // the next iteration's copies overwrite this stage
    }
    // epilogue: each warp stages one 16×16 fragment at a time in shared memory (the A buffers are free now)
    float* stage = reinterpret_cast<float*>(&As[0][0]) + warp * 256;
    const int lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int64_t m = m0 + wm + 16 * i + e / 16;
                const int n = n0 + wn + 16 * j + e % 16;
                if (m >= M || n >= N) continue;
                float* c = kind == Grouped::dW ? p.c + g * p.w_stride + m * N + n : p.c + (r0 + m) * N + n;
                *c = kind == Grouped::forward ? stage[e] : *c + stage[e];   // forward overwrites, backward adds
            }
            __syncwarp();
        }
}
}  // namespace pipelined

// --- the same products on Hopper's wgmma (sm_90a): what the model runs on an H100 or H200 -------------------------
// The WMMA kernels above load 16×16 fragments from shared memory into each warp's registers before every product.
// wgmma (see "Hopper's warpgroup MMA" near the top of this file) lets a warpgroup multiply a 64×256 tile by a K = 16
// slice straight from shared memory, asynchronously, so the copies of later tiles, the issue of the next products and
// the tensor cores' work overlap. Each product is C[M, N] (+)= A[M, K] · B[N, K]ᵀ, and wgmma reads a BF16 operand
// from shared memory either K-major (K contiguous) or MN-major (M or N contiguous: the "transposed" layout), so
// every operand is copied as it lies in memory, with no transposing pass:
//   forward  A(m, k) = x[r0+m, k]    K-major     B(n, k) = W_g[n, k]    K-major    (M = R,   N = out, K = in)
//   dx       A(m, k) = dy[r0+m, k]   K-major     B(n, k) = W_g[k, n]    MN-major   (M = R,   N = in,  K = out)
//   dW       A(m, k) = dy[r0+k, m]   MN-major    B(n, k) = x[r0+k, n]   MN-major   (M = out, N = in,  K = R)
// Shared memory holds an operand's tile as lines of 128 bytes (64 BF16) in the 128-byte swizzle of fp8.cuh's GEMM
// (16-byte chunk c of line L at chunk position c XOR (L mod 8)). K-major: line i is row mn0 + i, its 64 k. MN-major:
// lines 0-63 hold k0 .. k0+63 of columns mn0 .. mn0+63, lines 64-127 the next 64 columns, and so on. Either way
// warpgroup w's 64 rows of A start at line 64 w; a K = 16 step moves 32 bytes along the lines (K-major) or 16 lines
// (MN-major); and each next 64 columns of B (MN-major) are 8 KB on (the descriptor's leading byte offset).
// A CTA (2 warpgroups, 256 threads) computes a 128×BN tile of C, each warpgroup 64 rows (BN/2 FP32 accumulators a
// thread). Two widths (Tiles below): 128×256 reads fewer bytes per FLOP (BM·BN/(BM+BN) = 85 against 64) but needs 193
// KB of shared memory, so one CTA per SM, whose epilogue (the FP32 read-modify-write of dx and dW) leaves the tensor
// cores idle; 128×128 fits two CTAs per SM, and one's epilogue overlaps the other's products. Measured on an H200
// (build/bench_cuda --grouped, `large` shapes, balanced routing): forward 238 vs 235 TFLOP/s, dx 106 vs 151, dW 119
// vs 148 (wide vs narrow), so the forward runs wide and dx and dW narrow. K advances in tiles of 64 through a ring of
// kStages stages filled by cp.async: tile kt + kAhead is copied into the stage of tile kt − 1 − kInflight, after the
// barrier at which both warpgroups have waited for their wgmma of that tile (each keeps kInflight groups in flight),
// so kAhead tiles are on their way while the tensor cores work. Same numerics as the other paths (BF16 operands, FP32
// accumulation); each output is summed by one CTA in a fixed k order: deterministic. In and out must be multiples
// of 8, the experts' BF16 weights 16-byte aligned.
namespace hopper {
constexpr int BM = 128, BK = 64, kThreads = 256;
// The two tile shapes. Wide: 128×256, 4 stages (193 KB: one CTA an SM), one wgmma group kept in flight. Narrow:
// 128×128, 3 stages (97 KB: two CTAs an SM, so one CTA's epilogue, a read-modify-write of FP32 C in dx and dW,
// overlaps the other's products), each wgmma group waited for at once. kAhead tiles are copied ahead.
template <int BN_>
struct Tiles {
    static constexpr int BN = BN_, kStages = BN == 256 ? 4 : 3, kInflight = BN == 256 ? 1 : 0;
    static constexpr int kAhead = kStages - 1 - kInflight, kCtasPerSm = BN == 256 ? 1 : 2;
    static constexpr int kStageBytes = (BM + BN) * BK * 2;          // A's 128 and B's BN lines of 128 bytes
    static constexpr int kSmemBytes = kStages * kStageBytes + 1024; // + room to align the ring to 1024 bytes
};
struct Args {
    const __nv_bfloat16* a;            // forward: x [rows, in]; dx, dW: dy [rows, out]
    const __nv_bfloat16* b;            // dW: x [rows, in]
    const __nv_bfloat16* const* w;     // forward, dx: [groups] each expert's BF16 weight [out, in]
    float* c;                          // y, dx or dW
    const int64_t* offsets;            // [groups + 1] rows of each expert, device
    const int2* units;                 // [grid.y] the expert and row tile of each CTA row (grouped_grid)
    int64_t w_stride;                  // dW: floats between experts' gradients
    int in, out;
};

#ifdef DSV3_HAS_WGMMA
// D[64 × 256] += A[64 × 16] · B[256 × 16]ᵀ, BF16 operands in shared memory (TA, TB: 1 = MN-major), FP32 registers.
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n256k16_bf16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, 1, 1, 1, %130, %131;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "n"(TA), "n"(TB));
}
// D[64 × 128] += A[64 × 16] · B[128 × 16]ᵀ: the same, for the narrow tile.
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, 1, 1, 1, %66, %67;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "n"(TA), "n"(TB));
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_bf16(float (&d)[128], uint64_t da, uint64_t db) {
    wgmma_m64n256k16_bf16<TA, TB>(d, da, db);
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_bf16(float (&d)[64], uint64_t da, uint64_t db) {
    wgmma_m64n128k16_bf16<TA, TB>(d, da, db);
}
// The descriptor of a 128-byte-swizzled tile (PTX ISA, "Matrix Descriptor Format"): start address / 16 (bits 0-13),
// leading byte offset / 16 (bits 16-29: MN-major, the next 64 columns), stride byte offset / 16 (bits 32-45: the next
// 8 lines, 1024 bytes), swizzle mode 1 = 128 bytes (bits 62-63).
__device__ __forceinline__ uint64_t desc_sw128(const void* p, uint32_t leading_bytes) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(leading_bytes >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
           (uint64_t(1) << 62);
}
#endif

template <Grouped kind, int BN_>
__global__ void __launch_bounds__(kThreads, Tiles<BN_>::kCtasPerSm) kernel(Args p) {
#ifdef DSV3_HAS_WGMMA
    using Tl = Tiles<BN_>;
    constexpr int BN = Tl::BN, kStages = Tl::kStages, kAhead = Tl::kAhead, kStageBytes = Tl::kStageBytes;
    constexpr bool a_mn = kind == Grouped::dW, b_mn = kind != Grouped::forward;   // the table above
    // Expert g's product C[M, N] (+)= A[M, K] · B[N, K]ᵀ; lda, ldb: elements between lines of memory
    const int2 unit = p.units[blockIdx.y];
    const int g = unit.x;
    const int64_t r0 = p.offsets[g], R = p.offsets[g + 1] - r0;
    const int64_t M = kind == Grouped::dW ? p.out : R;
    const int N = kind == Grouped::forward ? p.out : p.in;
    const int64_t K = kind == Grouped::forward ? p.in : (kind == Grouped::dx ? p.out : R);
    const __nv_bfloat16* A = p.a + r0 * (kind == Grouped::forward ? p.in : p.out);
    const __nv_bfloat16* B = kind == Grouped::dW ? p.b + r0 * p.in : p.w[g];
    const int64_t lda = kind == Grouped::forward ? p.in : p.out, ldb = p.in;
    float* C = kind == Grouped::dW ? p.c + g * p.w_stride : p.c + r0 * N;
    const int64_t m0 = int64_t(unit.y) * BM;
    const int n0 = blockIdx.x * BN;
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    auto tile_a = [&](int s) { return smem + s * kStageBytes; };
    auto tile_b = [&](int s) { return smem + s * kStageBytes + BM * 128; };
    const int KT = int((K + BK - 1) / BK);
    // Thread t copies 16-byte chunk c = t mod 8 of lines t/8 + 32 i of both tiles, to chunk position c XOR (line
    // mod 8). A chunk is 8 BF16 along the contiguous dimension (k, or m/n: multiples of 8), so it lies wholly inside
    // the matrix or wholly outside (zero-filled).
    const int c = threadIdx.x & 7, rb = threadIdx.x >> 3, swz = (c ^ (rb & 7)) << 4;
    auto copy = [&](auto lines, uint8_t* tile, const __nv_bfloat16* base, int64_t ld, int64_t mn0, int64_t MN,
                    bool mn_major, int64_t k0) {
#pragma unroll
        for (int i = 0; i < decltype(lines)::value / 32; ++i) {
            const int line = rb + 32 * i;
            const int64_t mn = mn_major ? mn0 + (line / 64) * 64 + c * 8 : mn0 + line;
            const int64_t k = mn_major ? k0 + line % 64 : k0 + c * 8;
            const bool ok = mn < MN && k < K;
            cp_async_16(tile + line * 128 + swz, ok ? base + (mn_major ? k * ld + mn : mn * ld + k) : base, ok ? 16 : 0);
        }
    };
    auto load = [&](int kt) {
        if (kt < KT) {
            copy(std::integral_constant<int, BM>(), tile_a(kt % kStages), A, lda, m0, M, a_mn, int64_t(kt) * BK);
            copy(std::integral_constant<int, BN>(), tile_b(kt % kStages), B, ldb, n0, N, b_mn, int64_t(kt) * BK);
        }
        cp_async_commit();   // one group per tile, empty past the end, so the waits below count tiles
    };
    const int wg = threadIdx.x / 128;
    float acc[BN / 2];
#pragma unroll
    for (int r = 0; r < BN / 2; ++r) acc[r] = 0.0f;
    for (int kt = 0; kt < kAhead; ++kt) load(kt);
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<kAhead - 1>();   // this thread's copies of tile kt have landed
        fence_proxy_async();
        __syncthreads();               // everyone's have; and every warpgroup's wgmma of tile kt − 1 − kInflight is
        load(kt + kAhead);             // done: its stage takes tile kt + kAhead
        const uint8_t* a = tile_a(kt % kStages) + wg * 64 * 128;
        const uint8_t* b = tile_b(kt % kStages);
        fence_operands(acc);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < BK / 16; ++j) {   // K = 16 a step
            const int a_step = a_mn ? 16 * 128 * j : 32 * j, b_step = b_mn ? 16 * 128 * j : 32 * j;
            wgmma_bf16<a_mn, b_mn>(acc, desc_sw128(a + a_step, 64 * 128), desc_sw128(b + b_step, 64 * 128));
        }
        wgmma_commit();
        wgmma_wait<Tl::kInflight>();   // the products of tile kt − kInflight are done (kt's may still run)
        fence_operands(acc);
    }
    wgmma_wait<0>();
    fence_operands(acc);
    // Epilogue: register r of thread (warp w, lane l) of the warpgroup holds row 16 w + l/4 + 8·((r/2) mod 2) and
    // column 8·(r/4) + 2·(l mod 4) + (r mod 2) of its 64×BN tile; two neighbouring columns per store.
    const int w = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < BN / 2; r += 2) {
        const int64_t row = m0 + wg * 64 + w * 16 + lane / 4 + 8 * ((r / 2) % 2);
        const int col = n0 + 8 * (r / 4) + 2 * (lane % 4);
        if (row >= M || col >= N) continue;
        float2* dst = reinterpret_cast<float2*>(C + row * N + col);
        float2 v = make_float2(acc[r], acc[r + 1]);
        if (kind != Grouped::forward) {   // forward overwrites, backward adds
            const float2 old = *dst;
            v.x += old.x;
            v.y += old.y;
        }
        *dst = v;
    }
#else
    __trap();   // built without sm_90a: the host never launches this (wgmma_available)
#endif
}
}  // namespace hopper

// --- the same products on cuBLAS: one BF16 GEMM per expert, spread over a few side streams ----------------------
// The operands are BF16 in memory: the activations converted once per call (all experts in one pass), the weights
// taken from their BF16 shadows (adamw_update writes them, section 0) or converted once per call. Each expert's GEMM
// is cublasGemmEx with FP32 accumulation and FP32 output, like matmul_forward/backward; one expert's GEMM covers only
// a few of the GPU's SMs, so consecutive experts go to kSideStreams streams (forked from and joined back into stream
// 0 with events) and run side by side. Their outputs are disjoint (rows of y or dx, or the expert's own dW), so the
// order in which they run changes no bit. (cublasGemmGroupedBatchedEx would make it one call, but cuBLAS 13.1
// refuses BF16 inputs with FP32 outputs there: status 15, NOT_SUPPORTED.)
// Measured on one H200 (small preset, batch 16 x 512, whole training steps): the per-expert calls are bound by the
// host (one cublasGemmEx per expert and product, 2,304 per step, each a new shape for cuBLAS's heuristics since
// the row counts change every step): 52-74k tokens/s from run to run, against 133k with the pipelined kernel above
// and 65k with the first WMMA kernel.
// Which path runs: DSV3_GROUPED=hopper|pipelined|wmma|cublas|batched in the environment, or grouped_path() set by a
// caller (the tests). By default (automatic) the wgmma kernel on a Hopper GPU, else the pipelined kernel, and the
// first WMMA kernel where their shape rules (in and out multiples of 8, 16-byte aligned weights) are not met. DSV3_GROUPED=batched tries cublasGemmGroupedBatchedEx
// (one call for all experts, pointer arrays on the device) and falls back to the per-expert calls, once.
enum class GroupedPath { automatic, cublas, wmma, batched, pipelined, hopper };
inline GroupedPath& grouped_path() {
    static GroupedPath p = [] {
        const char* e = std::getenv("DSV3_GROUPED");
        const std::string v = e ? e : "";
        if (v == "batched") return GroupedPath::batched;
        if (v == "pipelined") return GroupedPath::pipelined;
        if (v == "hopper") return GroupedPath::hopper;
        return v == "cublas" ? GroupedPath::cublas : (v == "wmma" ? GroupedPath::wmma : GroupedPath::automatic);
    }();
    return p;
}
constexpr int kSideStreams = 4;
struct SideStreams {
    cudaStream_t stream[kSideStreams];
    cublasHandle_t handle[kSideStreams];
    cudaEvent_t fork, join[kSideStreams];
};
// One set per host thread (and so per GPU, as cublas()); never destroyed, like the handle of cublas().
inline SideStreams& side_streams() {
    static thread_local SideStreams* ss = [] {
        auto* s = new SideStreams;
        DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&s->fork, cudaEventDisableTiming));
        for (int i = 0; i < kSideStreams; ++i) {
            DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&s->stream[i], cudaStreamNonBlocking));
            DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&s->join[i], cudaEventDisableTiming));
            DSV3_CUBLAS_CHECK(cublasCreate(&s->handle[i]));
            DSV3_CUBLAS_CHECK(cublasSetMathMode(s->handle[i], CUBLAS_PEDANTIC_MATH));
            DSV3_CUBLAS_CHECK(cublasSetStream(s->handle[i], s->stream[i]));
        }
        return s;
    }();
    return *ss;
}
inline bool use_cublas() {
    const GroupedPath p = grouped_path();
    return p == GroupedPath::cublas || p == GroupedPath::batched;
}
inline bool use_pipelined() {
    const GroupedPath p = grouped_path();
    return p == GroupedPath::pipelined || p == GroupedPath::automatic || p == GroupedPath::hopper;
}
inline bool use_hopper() {
    const GroupedPath p = grouped_path();
    return p == GroupedPath::hopper || p == GroupedPath::automatic;
}
// Every expert's BF16 weight: its shadow, or (if any expert has none) all of them converted in one pass into `slot`.
inline std::vector<const __nv_bfloat16*> expert_weights_bf16(const float* W, int64_t w_stride, int groups, int in,
                                                             int out) {
    std::vector<const __nv_bfloat16*> w(size_t(groups), nullptr);
    const int64_t n = int64_t(out) * in;
    bool all = true;
    for (int g = 0; g < groups && all; ++g) all = (w[size_t(g)] = shadow::find(W + g * w_stride, size_t(n))) != nullptr;
    if (all) return w;
    const __nv_bfloat16* b = bf16_copy(Slot::bf16_b, W, int64_t(groups - 1) * w_stride + n);
    for (int g = 0; g < groups; ++g) w[size_t(g)] = b + g * w_stride;
    return w;
}
// One GEMM per expert with rows, as one cublasGemmGroupedBatchedEx call (one group of one GEMM each) on stream 0.
// Returns false (and never tries again) if cuBLAS does not support it.
struct ExpertGemm { cublasOperation_t ta, tb; int m, n, k; const void* A; int lda; const void* B; int ldb; void* C; int ldc; };
inline bool grouped_batched(const std::vector<ExpertGemm>& gs, float beta) {
    static bool supported = true;
    if (!supported || gs.empty()) return supported;
    const int n = int(gs.size());
    const size_t count = gs.size();
    std::vector<cublasOperation_t> ta(count), tb(count);
    std::vector<int> m(count), nn(count), k(count), lda(count), ldb(count), ldc(count), size(count, 1);
    std::vector<float> alpha(count, 1.0f), betas(count, beta);
    std::vector<const void*> ptrs(3 * count);
    for (int i = 0; i < n; ++i) {
        const ExpertGemm& g = gs[size_t(i)];
        ta[size_t(i)] = g.ta; tb[size_t(i)] = g.tb; m[size_t(i)] = g.m; nn[size_t(i)] = g.n; k[size_t(i)] = g.k;
        lda[size_t(i)] = g.lda; ldb[size_t(i)] = g.ldb; ldc[size_t(i)] = g.ldc;
        ptrs[size_t(i)] = g.A; ptrs[size_t(n + i)] = g.B; ptrs[size_t(2 * n + i)] = g.C;
    }
    auto* dptrs = static_cast<const void**>(scratch(Slot::group_offsets, sizeof(void*) * ptrs.size()));
    upload_async(dptrs, ptrs.data(), sizeof(void*) * ptrs.size());
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        cublas(), ta.data(), tb.data(), m.data(), nn.data(), k.data(), alpha.data(), dptrs, CUDA_R_16BF, lda.data(),
        dptrs + n, CUDA_R_16BF, ldb.data(), betas.data(), const_cast<void* const*>(dptrs + 2 * n), CUDA_R_32F,
        ldc.data(), n, size.data(), CUBLAS_COMPUTE_32F);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
        std::fprintf(stderr, "cuda: cublasGemmGroupedBatchedEx refused BF16 -> FP32 (status %d): per-expert GEMMs\n",
                     int(st));
        supported = false;
        return false;
    }
    DSV3_CUBLAS_CHECK(st);
    return true;
}
// Runs gemm(g, handle) for every expert with rows, round-robin over the side streams, between a fork and a join.
template <class F>
void for_each_expert_on_side_streams(const int64_t* offsets, int groups, F&& gemm) {
    SideStreams& ss = side_streams();
    DSV3_CUDA_CHECK(cudaEventRecord(ss.fork, 0));
    for (int i = 0; i < kSideStreams; ++i) DSV3_CUDA_CHECK(cudaStreamWaitEvent(ss.stream[i], ss.fork, 0));
    int next = 0;
    for (int g = 0; g < groups; ++g) {
        if (offsets[g + 1] == offsets[g]) continue;
        gemm(g, ss.handle[next]);
        next = (next + 1) % kSideStreams;
    }
    for (int i = 0; i < kSideStreams; ++i) {
        DSV3_CUDA_CHECK(cudaEventRecord(ss.join[i], ss.stream[i]));
        DSV3_CUDA_CHECK(cudaStreamWaitEvent(0, ss.join[i], 0));
    }
}
inline void grouped_forward_cublas(float* y, const float* x, const float* W, int64_t w_stride, const int64_t* offsets,
                                   int groups, int in, int out) {
    const __nv_bfloat16* xb = bf16_copy(Slot::bf16_a, x, offsets[groups] * in);
    const std::vector<const __nv_bfloat16*> wb = expert_weights_bf16(W, w_stride, groups, in, out);
    if (grouped_path() == GroupedPath::batched) {
        std::vector<ExpertGemm> gs;
        for (int g = 0; g < groups; ++g)
            if (offsets[g + 1] > offsets[g])
                gs.push_back({CUBLAS_OP_T, CUBLAS_OP_N, out, int(offsets[g + 1] - offsets[g]), in, wb[size_t(g)], in,
                              xb + offsets[g] * in, in, y + offsets[g] * out, out});
        if (grouped_batched(gs, 0.0f)) return;
    }
    for_each_expert_on_side_streams(offsets, groups, [&](int g, cublasHandle_t h) {
        const int64_t r0 = offsets[g];
        const int R = int(offsets[g + 1] - r0);
        gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, out, R, in, wb[size_t(g)], in, xb + r0 * in, in, 0.0f, y + r0 * out, out,
                  h);
    });
}
inline void grouped_backward_cublas(float* dx, float* dW, const float* dy, const float* x, const float* W,
                                    int64_t w_stride, const int64_t* offsets, int groups, int in, int out) {
    const int64_t rows = offsets[groups];
    const __nv_bfloat16* dyb = bf16_copy(Slot::bf16_a, dy, rows * out);
    std::vector<const __nv_bfloat16*> wb;
    if (dx) wb = expert_weights_bf16(W, w_stride, groups, in, out);
    const __nv_bfloat16* xb = dW ? bf16_copy(Slot::bf16_c, x, rows * in) : nullptr;
    if (grouped_path() == GroupedPath::batched) {
        std::vector<ExpertGemm> gdx, gdw;
        for (int g = 0; g < groups; ++g) {
            const int64_t r0 = offsets[g];
            const int R = int(offsets[g + 1] - r0);
            if (R == 0) continue;
            if (dx) gdx.push_back({CUBLAS_OP_N, CUBLAS_OP_N, in, R, out, wb[size_t(g)], in, dyb + r0 * out, out,
                                   dx + r0 * in, in});
            if (dW) gdw.push_back({CUBLAS_OP_N, CUBLAS_OP_T, in, out, R, xb + r0 * in, in, dyb + r0 * out, out,
                                   dW + g * w_stride, in});
        }
        if (gdx.empty() || grouped_batched(gdx, 1.0f)) {
            if (gdw.empty() || grouped_batched(gdw, 1.0f)) return;
            dx = nullptr;   // dx is done; only dW falls back to the per-expert calls below
        }
    }
    for_each_expert_on_side_streams(offsets, groups, [&](int g, cublasHandle_t h) {
        const int64_t r0 = offsets[g];
        const int R = int(offsets[g + 1] - r0);
        if (dx)   // dx_gᵀ [in, R] += W_g(col-major [in, out]) · dy_gᵀ(col-major [out, R])
            gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, in, R, out, wb[size_t(g)], in, dyb + r0 * out, out, 1.0f,
                      dx + r0 * in, in, h);
        if (dW)   // dW_gᵀ [in, out] += x_gᵀ(col-major [in, R]) · dy_g
            gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, in, out, R, xb + r0 * in, in, dyb + r0 * out, out, 1.0f,
                      dW + g * w_stride, in, h);
    });
}
// The pipelined kernel, when the shapes allow it; false if not (the caller runs another path).
inline bool pipelined_ok(int in, int out) { return in % 8 == 0 && out % 8 == 0; }
// Both BF16 kernels below read every expert's BF16 weight through a device array of pointers: uploaded here, or
// null when a weight is not 16-byte aligned (the 16-byte copies need it; the caller then runs another path).
inline const __nv_bfloat16* const* device_expert_weights(const float* W, int64_t w_stride, int groups, int in,
                                                         int out) {
    const std::vector<const __nv_bfloat16*> wb = expert_weights_bf16(W, w_stride, groups, in, out);
    for (const __nv_bfloat16* w : wb)
        if (reinterpret_cast<uintptr_t>(w) % 16 != 0) return nullptr;
    auto* d = static_cast<const __nv_bfloat16**>(scratch(Slot::plan, sizeof(void*) * size_t(groups)));
    upload_async(d, wb.data(), sizeof(void*) * size_t(groups));
    return d;
}
template <Grouped kind>
bool grouped_pipelined(float* c, const float* a, const float* b, const float* W, int64_t w_stride,
                       const int64_t* offsets, int groups, int in, int out) {
    if (!pipelined_ok(in, out)) return false;
    pipelined::Args args{};
    if (kind != Grouped::dW && !(args.w = device_expert_weights(W, w_stride, groups, in, out))) return false;
    const GroupedGrid gg = grouped_grid(kind, offsets, groups, in, out, pipelined::BM, pipelined::BN);
    if (gg.grid.x == 0) return true;
    args.units = gg.units;
    const int64_t rows = offsets[groups];
    args.a = bf16_copy(Slot::bf16_a, a, rows * (kind == Grouped::forward ? in : out));
    args.b = kind == Grouped::dW ? bf16_copy(Slot::bf16_c, b, rows * in) : nullptr;
    args.c = c;
    args.offsets = device_offsets(offsets, groups);
    args.w_stride = w_stride;
    args.in = in;
    args.out = out;
    pipelined::kernel<kind><<<gg.grid, pipelined::kThreads>>>(args);
    DSV3_CUDA_CHECK_LAUNCH();
    return true;
}
inline bool hopper_ok(int in, int out, int64_t w_stride) {
    return wgmma_available() && pipelined_ok(in, out) && w_stride % 8 == 0;
}
// The tile width of the wgmma kernel: DSV3_HOPPER_TILE=128|256 in the environment, or hopper_tile() set by a caller
// (the benchmark); 0, the default, picks per product (hopper_tile_for).
inline int& hopper_tile() {
    static int t = [] {
        const char* e = std::getenv("DSV3_HOPPER_TILE");
        return e && std::string(e) == "128" ? 128 : (e && std::string(e) == "256" ? 256 : 0);
    }();
    return t;
}
inline int hopper_tile_for(Grouped kind) {
    if (hopper_tile()) return hopper_tile();
    return kind == Grouped::forward ? 256 : 128;
}
template <Grouped kind, int BN>
void launch_hopper(const hopper::Args& args, const GroupedGrid& gg) {
    constexpr int bytes = hopper::Tiles<BN>::kSmemBytes;
    static const bool sized = [] {   // more than 48 KB of dynamic shared memory must be asked for
        DSV3_CUDA_CHECK(cudaFuncSetAttribute(hopper::kernel<kind, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             bytes));
        return true;
    }();
    (void)sized;
    hopper::kernel<kind, BN><<<gg.grid, hopper::kThreads, bytes>>>(args);
    DSV3_CUDA_CHECK_LAUNCH();
}
// The wgmma kernel on BF16 activations a (x or dy) and b (x, for dW), when this is a Hopper GPU with sm_90a code and
// the shapes allow it; false if not (another path runs).
template <Grouped kind>
bool grouped_hopper(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b, const float* W, int64_t w_stride,
                    const int64_t* offsets, int groups, int in, int out) {
    if (!hopper_ok(in, out, w_stride)) return false;
    hopper::Args args{};
    if (kind != Grouped::dW && !(args.w = device_expert_weights(W, w_stride, groups, in, out))) return false;
    const int BN = hopper_tile_for(kind);
    const GroupedGrid gg = grouped_grid(kind, offsets, groups, in, out, hopper::BM, BN);
    if (gg.grid.x == 0) return true;
    args.a = a;
    args.b = b;
    args.c = c;
    args.offsets = device_offsets(offsets, groups);
    args.units = gg.units;
    args.w_stride = w_stride;
    args.in = in;
    args.out = out;
    if (BN == 256) launch_hopper<kind, 256>(args, gg);
    else launch_hopper<kind, 128>(args, gg);
    return true;
}
}  // namespace detail

// y[rows_g, out] = x[rows_g, in] · W_gᵀ for every expert g (overwrites y). offsets: HOST, [groups + 1].
inline void grouped_matmul_forward(float* y, const float* x, const float* W, int64_t w_stride, const int64_t* offsets,
                                   int groups, int in, int out) {
    DSV3_PROFILE_KERNEL();
    dsv3::check_group_offsets("cuda::grouped_matmul_forward", offsets, groups, in, out);
    const int64_t rows = offsets[groups];
    if (rows == 0 || out == 0) return;
    if (in == 0) { DSV3_CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(float) * size_t(rows) * out)); return; }
    if (detail::use_hopper() && detail::hopper_ok(in, out, w_stride)) {
        const __nv_bfloat16* xb = detail::bf16_copy(Slot::bf16_a, x, rows * in);
        if (detail::grouped_hopper<detail::Grouped::forward>(y, xb, nullptr, W, w_stride, offsets, groups, in, out))
            return;
    }
    if (detail::use_pipelined() &&
        detail::grouped_pipelined<detail::Grouped::forward>(y, x, nullptr, W, w_stride, offsets, groups, in, out))
        return;
    if (detail::use_cublas())
        return detail::grouped_forward_cublas(y, x, W, w_stride, offsets, groups, in, out);
    const detail::GroupedArgs args{x, W, y, detail::device_offsets(offsets, groups), nullptr, w_stride, in, out};
    detail::grouped_gemm<detail::Grouped::forward>(args, offsets, groups);
}
// dx[rows_g, in] += dy[rows_g, out] · W_g;   dW_g += dy[rows_g, out]ᵀ · x[rows_g, in]   (either may be null)
inline void grouped_matmul_backward(float* dx, float* dW, const float* dy, const float* x, const float* W,
                                    int64_t w_stride, const int64_t* offsets, int groups, int in, int out) {
    DSV3_PROFILE_KERNEL();
    dsv3::check_group_offsets("cuda::grouped_matmul_backward", offsets, groups, in, out);
    if (offsets[groups] == 0 || in == 0 || out == 0 || (!dx && !dW)) return;
    if (detail::use_hopper() && detail::hopper_ok(in, out, w_stride)) {   // dy converted to BF16 once for both
        const int64_t rows = offsets[groups];
        const __nv_bfloat16* dyb = detail::bf16_copy(Slot::bf16_a, dy, rows * out);
        const bool dw_done = !dW || detail::grouped_hopper<detail::Grouped::dW>(
                                        dW, dyb, detail::bf16_copy(Slot::bf16_c, x, rows * in), W, w_stride, offsets,
                                        groups, in, out);
        const bool dx_done = !dx || detail::grouped_hopper<detail::Grouped::dx>(dx, dyb, nullptr, W, w_stride, offsets,
                                                                                groups, in, out);
        if (dw_done) dW = nullptr;
        if (dx_done) dx = nullptr;
        if (!dx && !dW) return;
    }
    if (detail::use_pipelined() && detail::pipelined_ok(in, out)) {
        // dW first: its conversion of dy (slot bf16_a) is the same as dx's, which then reuses nothing stale
        const bool dw_done = !dW || detail::grouped_pipelined<detail::Grouped::dW>(dW, dy, x, W, w_stride, offsets,
                                                                                   groups, in, out);
        const bool dx_done = !dx || detail::grouped_pipelined<detail::Grouped::dx>(dx, dy, nullptr, W, w_stride,
                                                                                   offsets, groups, in, out);
        if (dw_done && dx_done) return;
        if (dw_done) dW = nullptr;   // the weights were not aligned for dx: it runs below
    }
    if (detail::use_cublas())
        return detail::grouped_backward_cublas(dx, dW, dy, x, W, w_stride, offsets, groups, in, out);
    const int64_t* dev_offsets = detail::device_offsets(offsets, groups);
    using detail::Grouped;
    if (dx) detail::grouped_gemm<Grouped::dx>({dy, W, dx, dev_offsets, nullptr, w_stride, in, out}, offsets, groups);
    if (dW) detail::grouped_gemm<Grouped::dW>({dy, x, dW, dev_offsets, nullptr, w_stride, in, out}, offsets, groups);
}

// =====================================================================================================================
// 3.11 AdamW (Loshchilov & Hutter 2019): the CPU's formula element by element; bias corrections computed on the host
// =====================================================================================================================
namespace detail {
// One element: the CPU's formula, each operation rounded on its own (no FMA contraction where the CPU has none).
__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, float lr, float beta1,
                                              float beta2, float eps, float weight_decay, float c1, float c2,
                                              float grad_scale, bool bf16_states) {
    const float gi = __fmul_rn(g, grad_scale);   // rounded on its own, as on the CPU
    m = beta1 * m + (1 - beta1) * gi;
    v = beta2 * v + (1 - beta2) * gi * gi;
    p = p - lr * (m * c1 / (sqrtf(v * c2) + eps) + weight_decay * p);
    if (bf16_states) m = __bfloat162float(__float2bfloat16_rn(m)), v = __bfloat162float(__float2bfloat16_rn(v));
}
// Four elements a thread (16-byte loads and stores: AdamW reads 16 and writes 14 bytes a parameter, so it is bound
// by memory, and wide accesses move more bytes per instruction), the first `head` elements (up to p's next 16-byte
// boundary) and the tail one at a time. p, g, m and v share their offset into equally aligned buffers, so one head
// aligns all four. Also writes bf16(p) into `shadow` when it is not null (the weight's BF16 shadow, section 0).
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, int head, float lr, float beta1,
                             float beta2, float eps, float weight_decay, float c1, float c2, float grad_scale,
                             bool bf16_states, __nv_bfloat16* shadow) {
    const int64_t quads = (n - head) / 4, tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                  threads = int64_t(gridDim.x) * blockDim.x;
    for (int64_t q = tid; q < quads; q += threads) {
        const int64_t i = head + 4 * q;
        float4 pv = *reinterpret_cast<const float4*>(p + i), mv = *reinterpret_cast<const float4*>(m + i),
               vv = *reinterpret_cast<const float4*>(v + i);
        const float4 gv = *reinterpret_cast<const float4*>(g + i);
        adamw_element(pv.x, gv.x, mv.x, vv.x, lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale, bf16_states);
        adamw_element(pv.y, gv.y, mv.y, vv.y, lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale, bf16_states);
        adamw_element(pv.z, gv.z, mv.z, vv.z, lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale, bf16_states);
        adamw_element(pv.w, gv.w, mv.w, vv.w, lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale, bf16_states);
        *reinterpret_cast<float4*>(p + i) = pv;
        *reinterpret_cast<float4*>(m + i) = mv;
        *reinterpret_cast<float4*>(v + i) = vv;
        if (shadow && head == 0) {   // shadow + i is 8-byte aligned: one store
            __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(shadow + i);
            o[0] = __floats2bfloat162_rn(pv.x, pv.y);
            o[1] = __floats2bfloat162_rn(pv.z, pv.w);
        } else if (shadow) {
            shadow[i] = __float2bfloat16_rn(pv.x);
            shadow[i + 1] = __float2bfloat16_rn(pv.y);
            shadow[i + 2] = __float2bfloat16_rn(pv.z);
            shadow[i + 3] = __float2bfloat16_rn(pv.w);
        }
    }
    const int64_t rest = n - 4 * quads;   // head + tail elements
    for (int64_t r = tid; r < rest; r += threads) {
        const int64_t i = r < head ? r : 4 * quads + r;
        adamw_element(p[i], g[i], m[i], v[i], lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale, bf16_states);
        if (shadow) shadow[i] = __float2bfloat16_rn(p[i]);
    }
}
}  // namespace detail
inline void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                         float eps, float weight_decay, int step, float grad_scale = 1.0f, bool bf16_states = false) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return;
    const float c1 = 1.0f / (1.0f - std::pow(beta1, float(step))), c2 = 1.0f / (1.0f - std::pow(beta2, float(step)));
    __nv_bfloat16* bf16 = shadow::prepare(p, size_t(n));
    const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % 16;
    const bool same = reinterpret_cast<uintptr_t>(g) % 16 == mis && reinterpret_cast<uintptr_t>(m) % 16 == mis &&
                      reinterpret_cast<uintptr_t>(v) % 16 == mis;
    // Not equally aligned (never for the model's buffers): everything in the one-at-a-time loop.
    const int64_t head = same ? std::min<int64_t>(n, int64_t((16 - mis) % 16 / 4)) : n;
    detail::adamw_kernel<<<std::min(grid_for((n + 3) / 4, 256), 8192), 256>>>(
        p, g, m, v, n, int(head), lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale, bf16_states, bf16);
    DSV3_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace dsv3

#include "fp8.cuh"
#include "backend.cuh"
