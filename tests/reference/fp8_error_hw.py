# The statistic of build/fp8_error, measured on the hardware itself (optional; the product never needs Python):
#     python3 tests/reference/fp8_error_hw.py
# C = A·Bᵀ with E4M3 inputs at K = 4096 through torch._scaled_mm (cuBLASLt on the GPU's FP8 tensor cores), with
# use_fast_accum=True (no promotion) and False (promotion), against the exact product (float64) of the same FP8
# inputs: the max relative error over outputs with |exact| >= median, per independent draw, at 10^6 outputs
# (1024 x 1024, the size of a single H100 draw that measured 1.3%) and at 1.6·10^7 outputs (4096 x 4096). Shows how
# much the maximum, an extreme value, moves from draw to draw and grows with the number of outputs.
import torch
dev, K = 'cuda', 4096
E4 = torch.float8_e4m3fn
one = torch.tensor(1.0, device=dev)
def stat(C, ref):
    mag = ref.abs()
    keep = mag >= mag.median()
    return ((C.double() - ref).abs()[keep] / mag[keep]).max().item()
print(torch.cuda.get_device_name(), torch.__version__)
for size, draws in ((1024, 6), (4096, 3)):
    for scaled in (False, True):
        fast, prom = [], []
        for draw in range(draws):
            g = torch.Generator(device=dev).manual_seed(100 * size + draw)
            a = torch.randn(size, K, device=dev, generator=g)
            b = torch.randn(size, K, device=dev, generator=g)
            if scaled:   # per-tensor scaling so that each matrix's largest magnitude is E4M3's 448
                a, b = a * (448 / a.abs().max()), b * (448 / b.abs().max())
            a8, b8 = a.to(E4), b.to(E4)
            ref = a8.double() @ b8.double().T
            for acc, use_fast in ((fast, True), (prom, False)):
                C = torch._scaled_mm(a8, b8.T, scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=use_fast)
                acc.append(stat(C, ref))
        name = 'Gaussian, amax 448' if scaled else 'Gaussian N(0,1)'
        print(f'{size}x{size} {name:18s} no promotion: ' + ' '.join(f'{100 * e:.2f}%' for e in fast) +
              f' | promotion: largest {100 * max(prom):.3f}%')
