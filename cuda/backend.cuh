// cuda/backend.cuh — what the header's model (sections 5-6) needs from a backend besides the kernels of section 3:
// buffers and an activation arena in device memory, the host transfers, and the plumbing kernels of section 3.12
// (fill, copy, residual add, scale, sum of squares, BF16 rounding, column concat/split, MLA's key/value assembly).
// Included by kernels.cuh; a translation unit that defines DSV3_BACKEND_CUDA before including deepseek_v3.hpp runs
// the header's Model on these (namespace dsv3::backend = dsv3::cuda).
#pragma once

namespace dsv3 {
namespace cuda {

// --- buffers, transfers, the host plan -------------------------------------------------------------------------------
template <class T> using Buffer = DeviceBuffer<T>;
constexpr bool host_memory = false;
template <class T> void upload(Buffer<T>& dst, const std::vector<T>& host) { dst.upload(host); }
template <class T> std::vector<T> download(const Buffer<T>& src) { return src.download(); }
template <class T> void to_device(T* dst, const T* host, size_t n) {
    shadow::invalidate(dst, n * sizeof(T));   // a parameter written from the host: its BF16 shadow is stale
    if (n) DSV3_CUDA_CHECK(cudaMemcpy(dst, host, n * sizeof(T), cudaMemcpyHostToDevice));
}
template <class T> void to_host(T* host, const T* src, size_t n) {
    if (n) DSV3_CUDA_CHECK(cudaMemcpy(host, src, n * sizeof(T), cudaMemcpyDeviceToHost));
}
inline const dsv3::MoePermutation& host_plan(const MoePermutation& p) { return p.host; }
inline void synchronize() { DSV3_CUDA_CHECK(cudaDeviceSynchronize()); }

// The activation arena of section 2 in device memory: the same take / zeros / mark / release, blocks of cudaMalloc'd
// memory that are kept and reused from step to step (no allocation after the first step). All work is on stream 0,
// in order, so memory released and taken again is only written after the kernels that read it before.
class Arena {
  public:
    float* take(size_t n) {
        n = (n + 63) & ~size_t(63);  // 256-byte aligned
        while (true) {
            if (block_ == blocks_.size()) blocks_.emplace_back(std::max(n, kBlock));
            DeviceBuffer<float>& b = blocks_[block_];
            if (used_ + n <= b.size()) {
                float* p = b.data() + used_;
                used_ += n;
                return p;
            }
            if (used_ == 0) { b.resize(std::max(n, kBlock)); continue; }  // an empty block that is too small
            ++block_;
            used_ = 0;
        }
    }
    float* zeros(size_t n) {
        float* p = take(n);
        DSV3_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(float), 0));
        return p;
    }
    struct Mark { size_t block, used; };
    Mark mark() const { return {block_, used_}; }
    void release(Mark m) { block_ = m.block; used_ = m.used; }
    void reset() { release({0, 0}); }

  private:
    static constexpr size_t kBlock = size_t(1) << 26;  // 256 MiB
    std::vector<DeviceBuffer<float>> blocks_;
    size_t block_ = 0, used_ = 0;
};

// --- 4.12 the model's plumbing ---------------------------------------------------------------------------------------
namespace detail {
// y += x, four elements a thread (16-byte accesses) when both are 16-byte aligned, the rest one at a time.
__global__ void add_inplace_kernel(float* y, const float* x, int64_t n, int64_t quads) {
    const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, threads = int64_t(gridDim.x) * blockDim.x;
    for (int64_t q = tid; q < quads; q += threads) {
        Floats<4> a = load<4>(y + 4 * q);
        const Floats<4> b = load<4>(x + 4 * q);
        for (int e = 0; e < 4; ++e) a.v[e] += b.v[e];
        store<4>(y + 4 * q, a);
    }
    for (int64_t i = 4 * quads + tid; i < n; i += threads) y[i] += x[i];
}
__global__ void scale_inplace_kernel(float* x, int64_t n, float s) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] *= s;
}
// Fixed grid, grid-stride partial sums in double, a fixed-order tree per block: deterministic for a given n.
__global__ void sum_of_squares_kernel(double* partial, const float* x, int64_t n) {
    __shared__ double red[32];
    double acc = 0;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        acc += double(x[i]) * x[i];
    acc = block_sum_d(acc, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
// One block per listed row: dst[i] = src[rows[i]] (gather) or dst[rows[i]] = src[i] (scatter).
__global__ void gather_rows_kernel(float* dst, const float* src, const int32_t* rows, int d) {
    const int64_t i = blockIdx.x, r = rows[i];
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[i * d + j] = src[r * d + j];
}
__global__ void scatter_rows_kernel(float* dst, const float* src, const int32_t* rows, int d) {
    const int64_t i = blockIdx.x, r = rows[i];
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[r * d + j] = src[i * d + j];
}
// One block per row t: out[t] = [a[t] ; b[t]] (concat) or the reverse (split).
__global__ void concat_columns_kernel(float* out, const float* a, const float* b, int da, int db) {
    const int64_t t = blockIdx.x;
    for (int i = threadIdx.x; i < da + db; i += blockDim.x)
        out[t * (da + db) + i] = i < da ? a[t * da + i] : b[t * db + i - da];
}
__global__ void split_columns_kernel(float* a, float* b, const float* in, int da, int db) {
    const int64_t t = blockIdx.x;
    for (int i = threadIdx.x; i < da + db; i += blockDim.x) {
        const float x = in[t * (da + db) + i];
        if (i < da) a[t * da + i] = x;
        else b[t * db + i - da] = x;
    }
}
// One block per token t, all heads.
__global__ void mla_keys_values_forward_kernel(float* k, float* v, const float* kv, const float* k_rope, int H, int dh,
                                               int dr, int dv) {
    const int64_t t = blockIdx.x;
    for (int j = threadIdx.x; j < H * (dh + dr); j += blockDim.x) {
        const int h = j / (dh + dr), i = j % (dh + dr);
        k[t * H * (dh + dr) + j] = i < dh ? kv[(t * H + h) * (dh + dv) + i] : k_rope[t * dr + i - dh];
    }
    for (int j = threadIdx.x; j < H * dv; j += blockDim.x) {
        const int h = j / dv, i = j % dv;
        v[t * H * dv + j] = kv[(t * H + h) * (dh + dv) + dh + i];
    }
}
__global__ void mla_keys_values_backward_kernel(float* dkv, float* dk_rope, const float* dk, const float* dv, int H,
                                                int dh, int dr, int dv_) {
    const int64_t t = blockIdx.x;
    for (int j = threadIdx.x; j < H * (dh + dv_); j += blockDim.x) {
        const int h = j / (dh + dv_), i = j % (dh + dv_);
        dkv[t * H * (dh + dv_) + j] = i < dh ? dk[(t * H + h) * (dh + dr) + i] : dv[(t * H + h) * dv_ + i - dh];
    }
    for (int i = threadIdx.x; i < dr; i += blockDim.x) {
        float acc = dk_rope[t * dr + i];
        for (int h = 0; h < H; ++h) acc += dk[(t * H + h) * (dh + dr) + dh + i];  // heads in order, like the CPU
        dk_rope[t * dr + i] = acc;
    }
}
}  // namespace detail

inline void fill_zero(float* x, int64_t n) {
    DSV3_PROFILE_KERNEL();
    if (n > 0) DSV3_CUDA_CHECK(cudaMemsetAsync(x, 0, size_t(n) * sizeof(float), 0));
}
inline void copy_values(float* y, const float* x, int64_t n) {
    DSV3_PROFILE_KERNEL();
    if (n > 0) DSV3_CUDA_CHECK(cudaMemcpyAsync(y, x, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, 0));
}
inline void add_inplace(float* y, const float* x, int64_t n) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return;
    const int64_t quads = detail::vec_ok(4, 4, {y, x}) ? n / 4 : 0;
    detail::add_inplace_kernel<<<std::min(grid_for(std::max<int64_t>(quads, n - 4 * quads), 256), 8192), 256>>>(
        y, x, n, quads);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void scale_inplace(float* x, int64_t n, float s) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return;
    detail::scale_inplace_kernel<<<std::min(grid_for(n, 256), 8192), 256>>>(x, n, s);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline double sum_of_squares(const float* x, int64_t n) {  // synchronises: the sum comes back to the host
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return 0.0;
    const int blocks = std::min(grid_for(n, 256), 1024);
    double* partial = static_cast<double*>(scratch(Slot::reduce, sizeof(double) * size_t(blocks)));
    detail::sum_of_squares_kernel<<<blocks, 256>>>(partial, x, n);
    DSV3_CUDA_CHECK_LAUNCH();
    std::vector<double> host(size_t(blocks), 0.0);
    DSV3_CUDA_CHECK(cudaMemcpy(host.data(), partial, sizeof(double) * size_t(blocks), cudaMemcpyDeviceToHost));
    double total = 0;
    for (double p : host) total += p;  // blocks in order
    return total;
}
inline void gather_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int d) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0 || d <= 0) return;
    detail::gather_rows_kernel<<<unsigned(n), 128>>>(dst, src, rows, d);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void scatter_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int d) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0 || d <= 0) return;
    detail::scatter_rows_kernel<<<unsigned(n), 128>>>(dst, src, rows, d);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void concat_columns(float* out, const float* a, const float* b, int T, int da, int db) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || da + db <= 0) return;
    detail::concat_columns_kernel<<<T, 128>>>(out, a, b, da, db);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void split_columns(float* a, float* b, const float* in, int T, int da, int db) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || da + db <= 0) return;
    detail::split_columns_kernel<<<T, 128>>>(a, b, in, da, db);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void mla_keys_values_forward(float* k, float* v, const float* kv, const float* k_rope, int T, int H, int dh,
                                    int dr, int dv) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || H <= 0) return;
    detail::mla_keys_values_forward_kernel<<<T, 256>>>(k, v, kv, k_rope, H, dh, dr, dv);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void mla_keys_values_backward(float* dkv, float* dk_rope, const float* dk, const float* dv, int T, int H,
                                     int dh, int dr, int dv_) {
    DSV3_PROFILE_KERNEL();
    if (T <= 0 || H <= 0) return;
    detail::mla_keys_values_backward_kernel<<<T, 256>>>(dkv, dk_rope, dk, dv, H, dh, dr, dv_);
    DSV3_CUDA_CHECK_LAUNCH();
}

// --- decoding (header section 7): the absorbed projections and attention over the cache, one block per (row, head) -
// Plain kernels in the order of the CPU loops (each output is one thread's sum, in the same order), so a position's
// result does not depend on how many rows its step decodes. Small and simple: decoding the tiny and small models is
// dominated by the model's other kernels; cuda/mla_decode.cuh has the bandwidth-tuned batched kernel.
namespace detail {
__global__ void mla_absorb_query_kernel(float* q_lat, float* q_rope, const float* q, const float* W_ukv, int H, int dh,
                                        int dr, int dv, int dc) {
    const int64_t job = blockIdx.x;  // (t, h)
    const int h = int(job % H);
    const float* qc = q + job * (dh + dr);
    const float* Wk = W_ukv + int64_t(h) * (dh + dv) * dc;
    for (int j = threadIdx.x; j < dc; j += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < dh; ++i) acc = fmaf(qc[i], Wk[int64_t(i) * dc + j], acc);
        q_lat[job * dc + j] = acc;
    }
    for (int i = threadIdx.x; i < dr; i += blockDim.x) q_rope[job * dr + i] = qc[dh + i];
}
__global__ void mla_absorb_output_kernel(float* o, const float* o_lat, const float* W_ukv, int H, int dh, int dv, int dc) {
    const int64_t job = blockIdx.x;
    const int h = int(job % H);
    const float* Wv = W_ukv + (int64_t(h) * (dh + dv) + dh) * dc;
    for (int i = threadIdx.x; i < dv; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < dc; ++j) acc = fmaf(Wv[int64_t(i) * dc + j], o_lat[job * dc + j], acc);
        o[job * dv + i] = acc;
    }
}
// softmax over p[0..L) in shared memory, in place (one thread, in order: L is at most the context length)
__device__ void softmax_in_order(float* p, int L) {
    if (threadIdx.x == 0) {
        float mx = -INFINITY, sum = 0.0f;
        for (int s = 0; s < L; ++s) mx = fmaxf(mx, p[s]);
        for (int s = 0; s < L; ++s) sum += (p[s] = expf(p[s] - mx));
        for (int s = 0; s < L; ++s) p[s] = p[s] / sum;
    }
    __syncthreads();
}
__global__ void mla_attend_latent_kernel(float* o_lat, const float* q_lat, const float* q_rope, const float* ckv,
                                         const float* k_rope, int pos0, int H, int dc, int dr, float scale) {
    extern __shared__ float p[];
    const int64_t job = blockIdx.x;
    const int L = pos0 + int(job / H) + 1;
    const float* ql = q_lat + job * dc;
    const float* qr = q_rope + job * dr;
    for (int s = threadIdx.x; s < L; s += blockDim.x) {
        float dot = 0.0f;
        for (int i = 0; i < dc; ++i) dot = fmaf(ql[i], ckv[int64_t(s) * dc + i], dot);
        for (int i = 0; i < dr; ++i) dot = fmaf(qr[i], k_rope[int64_t(s) * dr + i], dot);
        p[s] = dot * scale;
    }
    __syncthreads();
    softmax_in_order(p, L);
    for (int i = threadIdx.x; i < dc; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < L; ++s) acc = fmaf(p[s], ckv[int64_t(s) * dc + i], acc);
        o_lat[job * dc + i] = acc;
    }
}
__global__ void attention_decode_naive_kernel(float* o, const float* q, const float* k, const float* v, int pos0, int H,
                                              int dqk, int dv, float scale) {
    extern __shared__ float p[];
    const int64_t job = blockIdx.x;
    const int h = int(job % H), L = pos0 + int(job / H) + 1;
    const float* qt = q + job * dqk;
    for (int s = threadIdx.x; s < L; s += blockDim.x) {
        const float* ks = k + (int64_t(s) * H + h) * dqk;
        float dot = 0.0f;
        for (int i = 0; i < dqk; ++i) dot = fmaf(qt[i], ks[i], dot);
        p[s] = dot * scale;
    }
    __syncthreads();
    softmax_in_order(p, L);
    for (int i = threadIdx.x; i < dv; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < L; ++s) acc = fmaf(p[s], v[(int64_t(s) * H + h) * dv + i], acc);
        o[job * dv + i] = acc;
    }
}
}  // namespace detail

inline void mla_absorb_query(float* q_lat, float* q_rope, const float* q, const float* W_ukv, int n, int H, int dh,
                             int dr, int dv, int dc) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return;
    detail::mla_absorb_query_kernel<<<n * H, 128>>>(q_lat, q_rope, q, W_ukv, H, dh, dr, dv, dc);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void mla_absorb_output(float* o, const float* o_lat, const float* W_ukv, int n, int H, int dh, int dv, int dc) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return;
    detail::mla_absorb_output_kernel<<<n * H, 128>>>(o, o_lat, W_ukv, H, dh, dv, dc);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void mla_attend_latent(float* o_lat, const float* q_lat, const float* q_rope, const float* ckv,
                              const float* k_rope, int n, int pos0, int H, int dc, int dr, float scale) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return;
    const size_t smem = sizeof(float) * size_t(pos0 + n);
    if (smem > 48 * 1024) fail("cuda::mla_attend_latent: ", pos0 + n, " positions exceed this kernel's 12288");
    detail::mla_attend_latent_kernel<<<n * H, 128, smem>>>(o_lat, q_lat, q_rope, ckv, k_rope, pos0, H, dc, dr, scale);
    DSV3_CUDA_CHECK_LAUNCH();
}
inline void attention_decode_naive(float* o, const float* q, const float* k, const float* v, int n, int pos0, int H,
                                   int dqk, int dv, float scale) {
    DSV3_PROFILE_KERNEL();
    if (n <= 0) return;
    const size_t smem = sizeof(float) * size_t(pos0 + n);
    if (smem > 48 * 1024) fail("cuda::attention_decode_naive: ", pos0 + n, " positions exceed this kernel's 12288");
    detail::attention_decode_naive_kernel<<<n * H, 128, smem>>>(o, q, k, v, pos0, H, dqk, dv, scale);
    DSV3_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace dsv3
