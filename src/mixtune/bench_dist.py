"""`mixtune bench` under torchrun: training steps on N GPUs, data-parallel (ddp) and FSDP2 (fsdp) side by side.

    torchrun --standalone --nproc_per_node 2 -m mixtune bench --no-check --layers 32 \
        --settings "mb=8,ckpt=32,dist=ddp;mb=8,ckpt=32,dist=fsdp"

For each setting every rank builds the same random NF4 model with the benchmark's adapter (seed-for-seed the
one-GPU bench's), then trains as `mixtune train` does on that many ranks: ddp keeps everything on every rank
and sums the adapter gradients after the backward passes (`Dist.sum_grads`); fsdp parks each decoder layer on
the CPU as it is built, keeping only this rank's chunk of its NF4 storage, and shards it when it comes back
(`loop.fsdp.shard_model`: the NF4 base, the adapter, its gradients and the AdamW state), so no rank ever holds
the whole 4-bit model — what lets Mixtral-8x22B train on cards smaller than it. Each rank trains its own packed
rows; tokens/s counts all ranks' tokens; the peak is the largest rank's `max_memory_allocated` over the timed
steps (as in the one-GPU bench) and, on its own, over building and sharding (`build peak`); the planner's
per-GPU estimate for the strategy sits beside it. The one-GPU figure to compare with is `mixtune bench` with the
same settings in the same call (bench/fsdp_bench.sh). A model is built per setting (an FSDP-sharded model cannot
be un-sharded). The numerics checks belong to the one-GPU run: here they are skipped. Rank 0 prints the table
and one JSON line last. A refused setting (the same on every rank, before any collective) is reported and the
next one runs; any other failure (out of memory, ...) may strike one rank alone, mid-collective, so it ends the
job, naming the rank, rather than leave the others waiting.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from .bench import (HEADER, TINY, Row, build_parser, ckpt_label, free, parse_settings, planned_peak_gib, print_row,
                    time_mixtune, versions)
from .bench_checks import LORA_ALPHA, LORA_R, LORA_TARGETS, build_model
from .distributed import setup
from .model.config import GEOMETRIES, TINY_FAMILY_CONFIGS, MixtralConfig


def label(s: dict, world: int) -> str:
    return (f"{s['dist']} x{world}, {s['backend']}, ckpt={{}}" + (f", r={s['r']}" if s["r"] != LORA_R else "")
            + (f", {s['opt']}" if s.get("opt", "adamw") != "adamw" else "")
            + (", attn-ckpt" if s.get("actk") else "") + (", fp8" if s.get("prec", "bf16") != "bf16" else ""))


def run_one(cfg: MixtralConfig, s: dict, seq: int, dist, device, steps: int, warmup: int, seed: int) -> Row:
    """One setting on every rank: build (and shard), time, free. Errors become the row's error on every rank."""
    from .loop.fsdp import check_optimizer, shard_model
    fsdp = s["dist"] == "fsdp"
    L = cfg.num_hidden_layers
    row = Row(f"mixtune {L}L", L, s["mb"], seq, s["accum"], label(s, dist.world).format(ckpt_label(s["ckpt"], L)))
    model = None
    try:
        if fsdp:
            check_optimizer(s.get("opt", "adamw"))
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model = build_model(cfg, device, seed, r=s["r"], offload_layers=fsdp, shared_a=bool(s.get("shared", 0)),
                            shard_of=(dist.rank, dist.world) if fsdp else None)
        row.est_gib = planned_peak_gib(model, cfg, s, seq, ranks=dist.world)  # before sharding: whole counts
        if fsdp:
            shard_model(model, dist)
        if cuda:
            torch.cuda.synchronize(device)
            build_peak = torch.tensor([torch.cuda.max_memory_allocated(device)], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(build_peak, op=torch.distributed.ReduceOp.MAX)
            row.build_peak_gib = float(build_peak[0]) / 2**30
        row.build_s = time.perf_counter() - t0
        time_mixtune(model, cfg, row, device, s["backend"], s["ckpt"], steps, warmup, seed, attn=s.get("attn", "auto"),
                     optim=s.get("opt", "adamw"), actk=s.get("actk", 0), gqa=s.get("gqa", 1),
                     prec=s.get("prec", "bf16"), dist=dist)
    except ValueError as e:  # a refused combination (every rank, before any collective): the next setting runs
        row.error = "refused: " + str(e).split(":")[0]
    except (torch.OutOfMemoryError, RuntimeError) as e:  # maybe this rank alone: end the job, do not hang it
        what = "OOM: " + str(e).split("\n")[0][:120] if isinstance(e, torch.OutOfMemoryError) else \
            f"{type(e).__name__}: {str(e)[:200]}"
        print(f"mixtune bench: rank {dist.rank} of {dist.world}, {row.setting}: {what}; ending the job",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        del model
        free(device)
    return row


def main_dist(args, cfg: MixtralConfig, settings: list[dict]) -> int:
    """`mixtune bench` on every rank of a torchrun job (WORLD_SIZE > 1). Returns the exit code."""
    dist, device = setup(torch.device(args.device or "cuda"), timeout_s=900)  # no wait in a collective is longer
    say = print if dist.is_main else (lambda *a, **k: None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, gloo"
    say(f"mixtune bench on {dist.world} ranks ({where}); numerics checks: run the one-GPU bench (skipped here)",
        flush=True)
    say(HEADER, flush=True)
    c = MixtralConfig(**{**cfg.__dict__, "num_hidden_layers": args.layers})
    out = []
    t_start = time.perf_counter()
    for s in settings:
        row = run_one(c, s, args.seq, dist, device, args.steps, args.warmup, args.seed)
        out.append(row)
        if dist.is_main:
            print_row(row)
    ok = not any(r.error for r in out)
    if dist.is_main:
        print()
        print(HEADER)
        for r in out:
            print_row(r)
        print(json.dumps({"versions": versions(), "ranks": dist.world, "model": cfg.model_type,
                          "geometry": "tiny" if args.cpu_tiny else args.geometry, "layers": args.layers,
                          "seq": args.seq,
                          "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS},
                          "rows": [r.__dict__ for r in out], "ok": ok,
                          "seconds": round(time.perf_counter() - t_start, 1)}, default=str), flush=True)
    dist.close()
    return 0 if ok else 1


def main(argv=None) -> int:
    """`mixtune bench` when torchrun started this process (the cli sends it here): same options."""
    args = build_parser().parse_args(argv)
    try:
        settings = parse_settings(args.settings)
        if args.stock or args.full:
            raise ValueError("under torchrun the benchmark times --settings at --layers only (no --stock or "
                             "--full: run those as one process)")
        if args.steps < 1 or args.warmup < 0 or args.layers < 1:
            raise ValueError("--steps >= 1, --warmup >= 0 and --layers >= 1")
        if not args.cpu_tiny and not torch.cuda.is_available():
            raise ValueError("the multi-GPU benchmark needs CUDA GPUs (one per rank); --cpu-tiny runs the tiny "
                             "geometry on CPU ranks (gloo)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cpu_tiny:  # a tiny model of the geometry's family on CPU ranks (gloo): the code path, in seconds
        args.device, args.seq = "cpu", min(args.seq, 64)
        family = GEOMETRIES[args.geometry].model_type
        return main_dist(args, MixtralConfig(**TINY) if family == "mixtral" else TINY_FAMILY_CONFIGS[family],
                         settings)
    return main_dist(args, GEOMETRIES[args.geometry], settings)
