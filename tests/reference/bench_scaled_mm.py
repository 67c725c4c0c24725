# The peer of bench_cuda's FP8 GEMM figure: torch._scaled_mm (cuBLASLt) with DeepSeek-V3's block scales, 1x128 tiles
# for A ([M, K/128] scales) and 128x128 blocks for B ([N/128, K/128] scales), E4M3 inputs, float32 output (what
# dsv3::cuda::fp8_gemm writes). Optional: bench_cuda runs it through popen when python3 and torch exist.
#     python3 tests/reference/bench_scaled_mm.py [SIZE ...]        (square M = N = K; default 4096 6144 8192)
# Prints one JSON object: {"device", "torch", "results": [{"M", "N", "K", "ms", "tflops"}, ...]}. Timing: CUDA events
# around each call, 5 warm-up calls, the median of 30 timed calls, random (non-zero) inputs.
import json, sys
import torch

def bench(M, N, K, warmup=5, reps=30):
    dev = 'cuda'
    g = torch.Generator(device=dev).manual_seed(M * 7 + N * 3 + K)
    def codes(rows, cols):
        c = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=dev, generator=g)
        c[(c & 0x7F) == 0x7F] = 0x38          # no NaN codes (0x38 = 1.0)
        return c.view(torch.float8_e4m3fn)
    A, B = codes(M, K), codes(N, K)             # B in the weight layout [N, K]: B.t() is column-major, as cuBLASLt wants
    kt = (K + 127) // 128
    sa = torch.rand(M, kt, device=dev, generator=g) + 0.5
    sb = torch.rand((N + 127) // 128, kt, device=dev, generator=g) + 0.5
    scale_a = sa.t().contiguous().t()            # [M, K/128], column-major (outer dimension contiguous)
    scale_b = sb.t()                             # [K/128, N/128], column-major
    run = lambda: torch._scaled_mm(A, B.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); run(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e))
    ms = sorted(times)[len(times) // 2]
    return {"M": M, "N": N, "K": K, "ms": ms, "tflops": 2.0 * M * N * K / (ms * 1e-3) / 1e12}

def main():
    sizes = [int(a) for a in sys.argv[1:]] or [4096, 6144, 8192]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    for n in sizes:
        try:
            out["results"].append(bench(n, n, n))
        except Exception as exc:  # an unsupported configuration is reported, not fatal
            out["results"].append({"M": n, "N": n, "K": n, "error": str(exc)[:200]})
    print(json.dumps(out))

if __name__ == "__main__":
    main()
