# Makes the H100 test vectors of tests/test_fp8.cpp ("fp8_gemm: reproduces outputs recorded on an H100").
# Run on a machine with an H100 and PyTorch (optional; the test suite never needs Python):
#     python3 tests/reference/fp8_h100_vectors.py
# Inputs come from splitmix64 (dsv3::Rng) replicated below, the products from torch._scaled_mm (cuBLASLt), with
# use_fast_accum (no promotion) or without, or with 1x128 / 128x128 block scales; each output matrix is hashed
# (FNV-1a over its float32 bytes) and printed as one C++ initializer line for the test.
import struct, torch
dev = 'cuda'
M64 = (1 << 64) - 1
class Rng:
    def __init__(s, seed): s.state = seed
    def next(s):
        s.state = (s.state + 0x9E3779B97F4A7C15) & M64
        z = s.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
def gen(rng, rows, K, kind, fmt):
    if kind == 'uniform':
        v = [float(rng.next() >> 40) * 2.0**-24 for _ in range(rows * K)]
        return torch.tensor(v, dtype=torch.float32).view(rows, K).to(fmt).to(dev)
    c = []
    for _ in range(rows * K):
        x = rng.next() & 0xFF
        if fmt == E4 and (x & 0x7F) == 0x7F: x = 0
        if fmt == E5 and (x & 0x7F) >= 0x7C: x = 0
        c.append(x)
    return torch.tensor(c, dtype=torch.uint8).view(rows, K).view(fmt).to(dev)
def scales(rng, n):
    return torch.tensor([float(0x800000 + (rng.next() >> 40)) * 2.0**-24 for _ in range(n)], dtype=torch.float32, device=dev)
def fnv(C):
    h = 0xcbf29ce484222325
    for b in C.contiguous().cpu().numpy().tobytes():
        h = ((h ^ b) * 0x100000001b3) & M64
    return h
one = torch.tensor(1.0, device=dev)
cases = [  # seed, M, N, K, kindA, fmtA, kindB, fmtB, fast, blockwise
    (11, 16, 16, 4096, 'uniform', E4, 'uniform', E4, True, False),
    (11, 16, 16, 4096, 'uniform', E4, 'uniform', E4, False, False),
    (12, 16, 16, 1040, 'codes', E4, 'codes', E4, True, False),
    (12, 16, 16, 1040, 'codes', E4, 'codes', E4, False, False),
    (13, 16, 32, 1024, 'codes', E4, 'codes', E5, False, False),
    (14, 16, 256, 512, 'codes', E4, 'codes', E4, False, True),
]
for (seed, M, N, K, ka, fa, kb, fb, fast, bw) in cases:
    rng = Rng(seed)
    A = gen(rng, M, K, ka, fa); B = gen(rng, N, K, kb, fb)
    if bw:
        kt = K // 128
        sa = scales(rng, M * kt).view(M, kt); sb = scales(rng, ((N + 127) // 128) * kt).view(-1, kt)
        C = torch._scaled_mm(A, B.t(), scale_a=sa.t().contiguous().t(), scale_b=sb.t(), out_dtype=torch.float32)
    else:
        C = torch._scaled_mm(A, B.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast)
    c = C.flatten()[:3].tolist()
    print(f'{{{seed}, {M}, {N}, {K}, {int(ka=="uniform")}, {int(fa==E5)}, {int(kb=="uniform")}, {int(fb==E5)}, {int(not fast)}, {int(bw)}, 0x{fnv(C):016x}ull, {{{", ".join(float(x).hex() + "f" for x in c)}}}}},')
