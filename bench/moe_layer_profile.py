"""Where one MoE layer's expert step goes: the grouped NF4 + LoRA experts of one layer (forward + backward) at a
family's real geometry, timed whole and then broken down by op and input shape, with the achieved TF/s of every
grouped product. Random NF4 weights, uniform random top-k routing, fp32 LoRA (r=64, alpha=16) on w1/w3/w2.

    PYTHONPATH=src:/tmp/site python3 bench/moe_layer_profile.py --geometry qwen3-30b-a3b --tokens 8192,16384 \
        --shared 1,0 --out $OUT/moe-layer.txt

Prints, per (tokens, shared) case: the fwd+bwd time (CUDA events, median of --reps), then the profiler's table
grouped by input shape with the grouped products' rates, then every GPU kernel (Triton's too) by its own time
and how much of the wall no kernel ran; a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch

DEVICE = "cuda"


def _flops(name: str, shapes) -> float:
    """Multiply-add FLOPs of an aten::_grouped_mm / aten::mm call from its input shapes (0 if unknown)."""
    try:
        a, b = shapes[0], shapes[1]
        if name.endswith("_grouped_mm"):
            if len(b) == 3:  # row-grouped: (M, K) x (E, K, N)
                return 2.0 * a[0] * a[1] * b[2]
            return 2.0 * a[0] * a[1] * b[1]  # K-grouped: (P, M) x (M, Q)
        if name.endswith("::mm"):
            return 2.0 * a[0] * a[1] * b[1]
    except (IndexError, TypeError):
        pass
    return 0.0


def case(geo, N: int, shared: bool, r: int, reps: int, backend: str, out_lines: list) -> dict:
    from mixtune import kernels
    from mixtune.quant.nf4 import NF4Weight
    from torch.profiler import ProfilerActivity, profile

    E, H, I, k = geo.num_local_experts, geo.hidden_size, geo.intermediate_size, geo.num_experts_per_tok
    dev, dt = DEVICE, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, device=dev)  # noqa: E731
    ws = [NF4Weight.quantize((rn(E, I, H) * 0.02).to(dt)), NF4Weight.quantize((rn(E, I, H) * 0.02).to(dt)),
          NF4Weight.quantize((rn(E, H, I) * 0.02).to(dt))]
    A = {n: (rn(E, r, H if n != "w2" else I) * 0.02).requires_grad_() for n in ("w1", "w3", "w2")}
    B = {n: (rn(E, I if n != "w2" else H, r) * 0.02).requires_grad_() for n in ("w1", "w3", "w2")}
    if shared:
        A["w3"] = A["w1"]
    lora = types.SimpleNamespace(A=A, B=B, scaling=16.0 / r, dropout=0.0)
    x = (rn(N, H)).to(dt).requires_grad_()
    idx = torch.rand(N, E, generator=g, device=dev).topk(k, dim=1).indices  # uniform random routing
    tw = torch.rand(N, k, generator=g, device=dev).to(dt).requires_grad_()
    go = rn(N, H).to(dt)

    def step():
        y = kernels.moe_experts(x, idx, tw, *ws, lora=lora, backend=backend)
        y.backward(go)
        for t in [x, tw, *A.values(), *B.values()]:
            t.grad = None

    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        step()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(1e3 * (time.perf_counter() - t0))
    ms = sorted(ts)[len(ts) // 2]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(3):
            step()
        sync()
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        cuda_us = (getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)) if cuda \
            else ev.self_cpu_time_total
        if not ev.key.startswith("aten::") or cuda_us <= 0:
            continue
        shapes = [list(s) for s in ev.input_shapes if s]
        per = cuda_us / 3  # us per step
        f = _flops(ev.key, shapes) * ev.count / 3
        rows.append(dict(op=ev.key, shapes=shapes[:3], calls=ev.count // 3, us=per,
                         tflops=(f / (per * 1e-6) / 1e12) if f and per else None))
    rows.sort(key=lambda d: -d["us"])
    head = (f"== {geo_name(geo)} N={N} k={k} M={N * k} shared={int(shared)} r={r} {backend}: fwd+bwd {ms:.3f} ms "
            f"(host-synchronized wall, median of {reps})")
    out_lines.append(head)
    print(head, flush=True)
    for d in rows[:40]:
        tf = f"{d['tflops']:7.1f}" if d["tflops"] else "       "
        line = f"  {d['us']:9.1f} us  {tf} TF/s  x{d['calls']:<3} {d['op']:<28} {d['shapes']}"
        out_lines.append(line)
        print(line, flush=True)
    gmm = sum(d["us"] for d in rows if d["op"].endswith("_grouped_mm"))
    kern = _kernel_rows(prof, 3) if cuda else []
    busy = sum(d["us"] for d in kern) / 1e3
    tail = (f"  -- by GPU kernel (Triton ones included): {busy:.3f} ms of kernels per step against {ms:.3f} ms wall, "
            f"so {max(ms - busy, 0.0):.3f} ms with no kernel running (host, launches, syncs)")
    out_lines.append(tail)
    print(tail, flush=True)
    for d in kern[:25]:
        line = f"  {d['us']:9.1f} us  x{d['calls']:<3} {d['name'][:110]}"
        out_lines.append(line)
        print(line, flush=True)
    return {"tokens": N, "shared": int(shared), "r": r, "ms": ms, "grouped_mm_ms": gmm / 1e3,
            "ops_ms": sum(d["us"] for d in rows) / 1e3, "kernels_ms": busy,
            "kernels": [{k: d[k] for k in ("name", "calls", "us")} for d in kern[:25]]}


def _kernel_rows(prof, steps: int) -> list:
    """The profile's GPU kernels (aten's and Triton's alike) by self device time per step, largest first."""
    from torch.autograd import DeviceType
    rows = []
    for ev in prof.key_averages():
        if getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append(dict(name=ev.key, calls=ev.count // steps, us=us / steps))
    rows.sort(key=lambda d: -d["us"])
    return rows


def geo_name(geo) -> str:
    return f"E={geo.num_local_experts} H={geo.hidden_size} I={geo.intermediate_size}"


def main():
    from mixtune.bench import GEOMETRIES
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="qwen3-30b-a3b", choices=sorted(GEOMETRIES))
    p.add_argument("--tokens", default="8192,16384")
    p.add_argument("--shared", default="1,0")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--backend", default="grouped")
    p.add_argument("--out", default="")
    a = p.parse_args()
    geo = GEOMETRIES[a.geometry]
    lines, res = [], []
    for N in (int(t) for t in a.tokens.split(",")):
        for sh in (int(t) for t in a.shared.split(",")):
            res.append(case(geo, N, bool(sh), a.r, a.reps, a.backend, lines))
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print(json.dumps({"geometry": a.geometry, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cases": res}))


if __name__ == "__main__":
    main()
