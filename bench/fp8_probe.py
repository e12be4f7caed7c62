"""Probe: torch._scaled_grouped_mm (FP8 rowwise) vs bf16 grouped_mm at Mixtral expert shapes on this GPU.
python bench/fp8_probe.py  -> table + final JSON line."""
import json, sys, time
import torch
import torch.nn.functional as F

torch.manual_seed(0)
dev = "cuda"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
print("has _scaled_grouped_mm", hasattr(torch, "_scaled_grouped_mm"), "F.grouped_mm", hasattr(F, "grouped_mm"),
      "F.scaled_grouped_mm", hasattr(F, "scaled_grouped_mm"))
GMM = getattr(F, "grouped_mm", None) or torch._grouped_mm
E = 8
F8 = torch.float8_e4m3fn


def q_rows(x):
    s = x.abs().amax(1).float().clamp(min=1e-12) / 448
    return (x.float() / s[:, None]).to(F8), s


def q_w(w):  # (E, N, K) -> fp8 (E, N, K), scale (E, N)
    s = w.abs().amax(2).float().clamp(min=1e-12) / 448
    return (w.float() / s[..., None]).to(F8), s


def timeit(f, n=10):
    f(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


res = {}
# correctness with odd group sizes
M = 1000
counts = torch.tensor([0, 7, 130, 1, 250, 333, 179, 100])
offs = counts.cumsum(0).to(torch.int32).to(dev)
K, N = 256, 384
a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.02
a8, sa = q_rows(a)
w8, sw = q_w(w)
for fa in (False, True):
    try:
        out = torch._scaled_grouped_mm(a8, w8.transpose(1, 2), sa, sw, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=fa)
        ref = GMM(a8.to(torch.bfloat16).float().mul(sa[:, None]).to(torch.float32).to(torch.bfloat16),
                  (w8.float() * sw[..., None]).to(torch.bfloat16).transpose(1, 2), offs=offs)
        ex = torch.cat([(a8[s:t].float() * sa[s:t, None]) @ (w8[e].float() * sw[e][:, None]).t()
                        for e, (s, t) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
        err = ((out.float() - ex).norm() / ex.norm()).item()
        full = torch.cat([a[s:t].float() @ w[e].float().t() for e, (s, t) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
        err_full = ((out.float() - full).norm() / full.norm()).item()
        print(f"odd groups fast_accum={fa}: rel err vs exact-dequant {err:.2e}, vs unquantized {err_full:.2e}")
        res[f"odd_err_fa{int(fa)}"] = err
        res[f"quant_err_fa{int(fa)}"] = err_full
    except Exception as ex_:
        print("odd groups failed", fa, repr(ex_)[:400])
        res[f"odd_fail_fa{int(fa)}"] = repr(ex_)[:200]

# triton fp8 cast
try:
    import triton, triton.language as tl

    @triton.jit
    def k(x_ptr, y_ptr, n, B: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        m = i < n
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=m).to(tl.float8e4nv), mask=m)
    x = torch.randn(4096, device=dev) * 10
    y = torch.empty(4096, device=dev, dtype=F8)
    k[(4,)](x, y, 4096, B=1024)
    print("triton fp8 cast matches torch:", torch.equal(y.view(torch.uint8), x.to(F8).view(torch.uint8)),
          "mismatch count", (y.view(torch.uint8) != x.to(F8).view(torch.uint8)).sum().item())
except Exception as ex_:
    print("triton fp8 failed", repr(ex_)[:300])

rows = []
Mtok = 14 * 1024 * 2
probs = torch.full((E,), 1.0 / E)
cnt = torch.distribution = torch.multinomial(probs, Mtok, replacement=True).bincount(minlength=E)
offs = cnt.cumsum(0).to(torch.int32).to(dev)
H, I, r = 4096, 14336, 64
for name, K, N in (("up  [x|u]@[W13|B]", H + 2 * r, 2 * I), ("down [g|u]@[W2|B]", I + r, H),
                   ("dg  [dy|du]@[W2;A]", H + r, I), ("dx [dh|du]@[W13;A]", 2 * I + 2 * r, H)):
    a = torch.randn(Mtok, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.02
    fl = 2 * Mtok * K * N
    tb = timeit(lambda: GMM(a, w.transpose(1, 2), offs=offs))
    wr = w.transpose(1, 2).contiguous()  # (E, K, N) row-major: the other bf16 layout
    tb2 = timeit(lambda: GMM(a, wr, offs=offs))
    a8, sa = q_rows(a)
    w8, sw = q_w(w)
    t8 = timeit(lambda: torch._scaled_grouped_mm(a8, w8.transpose(1, 2), sa, sw, offs=offs, out_dtype=torch.bfloat16))
    t8f = timeit(lambda: torch._scaled_grouped_mm(a8, w8.transpose(1, 2), sa, sw, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True))
    tq = timeit(lambda: q_rows(a))
    row = dict(gemm=name, M=Mtok, K=K, N=N, bf16_ms=tb * 1e3, bf16_rowmajor_ms=tb2 * 1e3, fp8_ms=t8 * 1e3, fp8_fast_ms=t8f * 1e3,
               bf16_tflops=fl / tb / 1e12, fp8_tflops=fl / t8 / 1e12, fp8_fast_tflops=fl / t8f / 1e12, torch_quant_ms=tq * 1e3)
    rows.append(row)
    print(" | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    del a, w, wr, a8, w8
res["rows"] = rows
print(json.dumps(res))
