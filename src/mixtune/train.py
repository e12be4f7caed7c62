"""The training recipe, top-down: set up → model files, tokenizer, data → base model + LoRA → fit → finish.

    mixtune train                          # the offline tiny default (configs/tiny.yaml's values)
    mixtune train configs/mixtral-8x7b-qlora.yaml --train.output_dir runs/mixtral
    python -c "from mixtune.config import load_config; from mixtune import train; train.main(load_config())"

`main(cfg)` reads like the recipe it runs (no Trainer class): each step is a function below, each short enough
to read at once; the loop body is `mixtune.loop.fit`. The base is loaded 4-bit by default, LoRA goes on the
configured targets, AdamW trains the adapter only under a warm-up + cosine/linear/constant schedule with exact
gradient accumulation, clipping, evaluation, JSONL/TensorBoard metrics and atomic checkpoints; then the PEFT
adapter, an optional merge, before/after generations, a loss PNG and a report.

Output dir layout: config.yaml, metrics.jsonl, tb/, checkpoints/step-N/, adapter/, generations.jsonl, loss.png,
report.md, merged/ (optional). `--resume auto|DIR` continues a killed run to the same final weights.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional

import torch

from . import runlock
from ._fs import atomic_write, write_text_atomic, writing
from .config import Config, ConfigError
from .data import load_tokenizer, prepare_data
from .distributed import setup as join_ranks, world_from_env
from .lora import apply_lora, check_targets, save_adapter
from .loop import checkpoint as ckpt
from .loop.evaluation import evaluate_ranks, generate_texts, generation_metrics
from .loop import trackers
from .loop.hub_push import check_credentials, push_run
from .loop.fit import Fitted, Run, fit
from .loop.fsdp import check_optimizer as check_fsdp_optimizer
from .loop.fsdp import gather_adapter, shard_model
from .loop.report import plot_losses, read_metrics, side_by_side, write_report
from .model import build_model_on_meta, check_checkpoint, load_config_only, load_model, resolve_model_path
from .runtime import resolve_device, resolve_dtype, seed_everything, use_bf16


def main(cfg: Config, *, on_step: Optional[Callable[[int], None]] = None, command: str = "") -> dict:
    """Run one training job described by `cfg`; returns the final metrics. `on_step(step)` is called after
    every optimizer step (and its checkpoint), e.g. by tests that simulate a kill."""
    preflight(cfg)
    run = set_up(cfg)
    with run.lock, trackers.session(cfg, run.out_dir, run.dist.is_main, resume=run.resume_path is not None):
        model_path, tokenizer, data = prepare(cfg, run)
        model, params, lora_report = build_model(cfg, run, model_path)
        eval_before = evaluate_ranks(model, data.eval_rows, cfg.train.per_device_eval_batch_size, run.bf16,
                                     run.dist) if data.eval_rows else None
        examples = list(data.eval_examples[: cfg.train.generate_after]) if run.dist.is_main else []
        if examples and run.dist.sharded:  # rank 0 alone would decode through layers sharded over all ranks
            run.say("mixtune: train.generate_after skipped under fsdp; run `mixtune generate` on the adapter")
            examples = []
        before = generate_texts(model, tokenizer, examples, cfg.generate) if examples else []
        base_name = cfg.model.name_or_path or model_path
        fitted = fit(cfg, run, model, params, data, lambda d: save_adapter(model, d, cfg.lora, base_name),
                     eval_before=eval_before, on_step=on_step)
        return finish(cfg, run, fitted, model, tokenizer, data, examples, before, eval_before, lora_report,
                      model_path, command)


def preflight(cfg: Config) -> None:
    """Before anything is written: a local model directory must be a supported family whose config.json and
    weights agree (keys and shapes, from the file headers), so such an error leaves the run directory as it was."""
    check_credentials(cfg)  # train.push_to_hub without a Hub token: one line, nothing written
    if cfg.train.distributed == "fsdp" and world_from_env()[0] > 1:
        try:
            check_fsdp_optimizer(cfg.train.optim)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    name = cfg.model.name_or_path
    if name and os.path.isdir(os.path.expanduser(name)):
        path = os.path.abspath(os.path.expanduser(name))
        # LoRA target errors first: they need only config.json (a damaged shard must not hide them)
        check_targets(build_model_on_meta(load_config_only(path), cfg.model.quant), cfg.lora)
        check_checkpoint(path)


def set_up(cfg: Config) -> Run:
    """The output dir: its lock first (one writer: a second run into it is refused before anything is written),
    then refuse to mix a fresh run into an old one, check a resume against the config saved with its
    checkpoint, remove a killed writer's temporaries; the ranks of a torchrun job, the device, config.yaml, the
    seeds. The returned run holds the lock (`with run.lock:` releases it)."""
    t, out_dir = cfg.train, cfg.train.output_dir
    rank0 = world_from_env()[1] == 0  # rank 0 alone writes (and locks), before joining the other ranks
    lock = runlock.acquire(out_dir, lambda m: print(m, file=sys.stderr, flush=True)) if rank0 else runlock.RunLock()
    try:
        resume_path = ckpt.resolve_resume(out_dir, t.resume)
        if resume_path:
            ckpt.check_resume_config(cfg, resume_path)  # the config saved with the checkpoint, wherever it is
            ckpt.verify_checkpoint(resume_path)  # damaged or unsafe files: refused before anything is rewritten
            ckpt.check_world_size(resume_path, world_from_env()[0])
        if t.merge_after or t.push_merged:  # a merge.out that the final merge would refuse: say so now, not after training
            from .merge import _check_out_dir
            _check_out_dir(os.path.abspath(cfg.merge.out or os.path.join(out_dir, "merged")), cfg.model.name_or_path)
        dist, device = join_ranks(resolve_device(cfg.model.device), t.ddp_timeout)  # rank r -> cuda:LOCAL_RANK
        run = Run(out_dir=out_dir, device=device, dist=dist, resume_path=resume_path, quiet=not dist.is_main,
                  lock=lock)
        dist.barrier()  # every rank has checked the output dir before rank 0 writes into it
        if not resume_path and t.resume == "auto":  # allowed (a requeued job died before its first save); said
            run.say(f"mixtune: --resume: no complete checkpoint in {ckpt.checkpoints_dir(out_dir)}; starting a "
                    f"fresh run")
        if dist.is_main:
            for path in ckpt.remove_stale_temporaries(out_dir):
                run.say(f"mixtune: removed {path}, a checkpoint left half-written by a killed run")
            atomic_write(os.path.join(out_dir, "config.yaml"), cfg.save)
    except BaseException:
        lock.release()
        raise
    seed_everything(t.seed)
    return run


def prepare(cfg: Config, run: Run):
    """Model files, LoRA targets checked on the meta device, tokenizer, prepared data -> (model_path,
    tokenizer, data). Rank 0 goes first: it fills the caches the others then read."""
    with run.dist.main_first():
        model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision,
                                        family=cfg.model.family)
        # LoRA target errors now, on the meta device, not after data preparation and loading the base (minutes)
        check_targets(build_model_on_meta(load_config_only(model_path), cfg.model.quant), cfg.lora)
        tokenizer = load_tokenizer(cfg.model.tokenizer, model_path)
        data = prepare_data(cfg, tokenizer)
    if not data.train_rows:
        raise ValueError("no training rows after preparation (see `mixtune prepare` for the statistics)")
    return model_path, tokenizer, data


def build_model(cfg: Config, run: Run, model_path: str):
    """The base model (4-bit by default) with its kernels and recomputation policy, and the adapter on it ->
    (model, trainable params, LoRA report). Sets run.bf16 (autocast only over a non-bf16 model)."""
    dtype = resolve_dtype(cfg.model.dtype, run.device)
    run.bf16 = use_bf16(cfg, run.device, dtype)
    fsdp = cfg.train.distributed == "fsdp" and run.dist.enabled  # layers parked on the CPU until sharded
    model = load_model(model_path, quant=cfg.model.quant, dtype=dtype, device=run.device,
                       cache_dir=cfg.model.cache_dir, revision=cfg.model.revision, report=run.say,
                       offload_layers=fsdp, shard_of=(run.dist.rank, run.dist.world) if fsdp else None)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.data.max_seq_length > max_pos:
        raise ConfigError(f"data.max_seq_length {cfg.data.max_seq_length} exceeds the model's "
                          f"max_position_embeddings {max_pos}")
    model.set_checkpointing(cfg.model.checkpoint_layers if cfg.model.gradient_checkpointing else 0,
                            cfg.model.checkpoint_attention)
    model.set_moe_backend(cfg.model.moe_backend, _checked_precision(cfg.model.expert_precision, run.device, run.say))
    model.attn_implementation = cfg.model.attn_implementation
    seed = cfg.lora.init_seed if cfg.lora.init_seed is not None else cfg.train.seed
    lora_report = apply_lora(model, cfg.lora, seed, warn=False)  # the report printed here carries the warnings
    run.say(lora_report.format())
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("lora.targets: nothing is trainable (no target matched a module)")
    if cfg.model.memory_budget_gib > 0:
        _plan_recomputation(cfg, run, model, sum(p.numel() for p in params))
    if cfg.train.distributed == "fsdp":
        params = shard_model(model, run.dist, run.say)
    return model, params, lora_report


def _plan_recomputation(cfg: Config, run: Run, model, n_trainable: int) -> None:
    """model.memory_budget_gib: the least recomputation whose estimated peak fits the budget."""
    from .memory_plan import memory_estimate
    from .memory_plan import GiB, plan

    t = cfg.train
    try:
        policy, est = plan(cfg.model.memory_budget_gib * GiB, model.config, memory_estimate(model)["weights_nf4"],
                           n_trainable, t.per_device_train_batch_size, cfg.data.max_seq_length, cfg.lora.r,
                           t.optim, cfg.lora.dropout, cfg.model.expert_precision, run.dist.world, t.distributed,
                           accum=t.gradient_accumulation_steps, shared_a=cfg.lora.shared_gate_up_a)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model.set_checkpointing(policy.full, policy.attention)
    model.set_moe_backend(policy.backend)
    run.say(f"mixtune: memory budget {cfg.model.memory_budget_gib:g} GiB -> "
            f"{policy.describe(model.config.num_hidden_layers)} (estimated peak {est / GiB:.1f} GiB)")


def _checked_precision(precision: str, device, say=None) -> str:
    """model.expert_precision, refused on a GPU without FP8 tensor cores (announced as emulated on CPU)."""
    if precision == "fp8":
        from .kernels.fp8 import fp8_supported
        dev = torch.device(device)
        if dev.type == "cuda" and not fp8_supported(dev):
            cc = ".".join(map(str, torch.cuda.get_device_capability(dev)))
            raise ConfigError(f"model.expert_precision fp8 needs FP8 tensor cores (compute capability >= 8.9: "
                              f"Ada, Hopper, Blackwell) and torch._scaled_grouped_mm; this GPU is {cc}. "
                              "Use bf16.")
        if dev.type != "cuda" and say is not None:
            say("mixtune: expert_precision fp8 on CPU: the FP8 products are emulated (correct, slow)")
    return precision


def finish(cfg: Config, run: Run, fitted: Fitted, model, tokenizer, data, examples, before, eval_before,
           lora_report, model_path: str, command: str) -> dict:
    """Final eval; then rank 0 writes the adapter, the before/after generations, the merge (if asked), the loss
    plot and report.md, and returns the summary."""
    t, out_dir, dist = cfg.train, run.out_dir, run.dist
    eval_after = evaluate_ranks(model, data.eval_rows, t.per_device_eval_batch_size, run.bf16, dist) \
        if data.eval_rows else None
    gather_adapter(model, dist)  # fsdp: every rank takes part, rank 0 keeps the whole adapter
    if not dist.is_main:  # rank 0 writes the adapter, generations, merge and report
        fitted.metrics.close()
        dist.close()
        return {"steps": fitted.step, "eval_loss": eval_after["eval_loss"] if eval_after else None,
                "rank": dist.rank}
    if eval_after is not None:
        fitted.metrics.log({"kind": "eval", "step": fitted.step, **eval_after})
    adapter_dir = os.path.join(out_dir, "adapter")
    with writing(adapter_dir):  # disk full, read-only: one OSError naming the adapter dir
        save_adapter(model, adapter_dir, cfg.lora, cfg.model.name_or_path or model_path)
    gens, gen_scores = _generations(cfg, run, model, tokenizer, examples, before)
    for when, sc in gen_scores.items():  # metrics.jsonl: {"kind": "generation", "when": "before"|"after", ...}
        fitted.metrics.log({"kind": "generation", "step": fitted.step, "when": when, **sc})
    fitted.metrics.close()
    merged_dir = None
    if t.merge_after or t.push_merged:
        from .merge import merge_main
        merged_dir = cfg.merge.out or os.path.join(out_dir, "merged")
        merge_main(cfg, adapter_dir, merged_dir)

    records = read_metrics(fitted.metrics.path)
    plot_losses(records, os.path.join(out_dir, "loss.png"), title=f"mixtune: {cfg.model.name_or_path or 'tiny default'}")
    train_losses = [r["loss"] for r in records if r.get("kind") == "train"]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "steps": fitted.step, "train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_before": eval_before["eval_loss"] if eval_before else None,
        "eval_loss": eval_after["eval_loss"] if eval_after else None,
        "eval_perplexity": eval_after["eval_perplexity"] if eval_after else None,
        "trainable_params": n_trainable, "seconds": round(_elapsed(run), 1),
        "output_dir": out_dir, "adapter": adapter_dir, "merged": merged_dir, "generation_scores": gen_scores,
    }
    write_report(os.path.join(out_dir, "report.md"), {
        "title": f"mixtune run: {out_dir}", "command": command,
        "model": cfg.model.name_or_path or f"tiny default ({model_path})", "device": str(run.device),
        "dtype": "bf16 autocast" if run.bf16 else str(model.dtype).replace("torch.", ""), "quant": cfg.model.quant,
        "expert_precision": cfg.model.expert_precision,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": ", ".join(cfg.lora.targets),
                 "trainable params": f"{n_trainable:,}", **_report_fields(lora_report)},
        "data": {k: v for k, v in (data.stats or {}).items() if isinstance(v, (int, float, str))},
        "train": {"steps": fitted.step, "micro-batch × accumulation": f"{t.per_device_train_batch_size} × "
                  f"{t.gradient_accumulation_steps}" + (f" × {dist.world} ranks" if dist.enabled else ""),
                  "learning rate": t.learning_rate, "schedule": t.lr_scheduler_type,
                  "final train loss": result["train_loss"], "wall time (s)": round(fitted.seconds, 1),
                  **fitted.notes},
        "eval_before": eval_before, "eval_after": eval_after, "loss_png": "loss.png", "generation_scores": gen_scores,
        "generations": gens,
        "files": sorted({f for f in os.listdir(out_dir) if not f.startswith(".")} | {"report.md"})})
    trackers.finish(adapter_dir, os.path.join(out_dir, "loss.png"), result)
    if t.push_to_hub:
        result["hub"] = push_run(cfg, adapter_dir, merged_dir, result, cfg.model.name_or_path or model_path,
                                 run.say)
    run.say(f"mixtune: done in {result['seconds']}s; eval loss "
            f"{_fmt_opt(result['eval_loss_before'])} → {_fmt_opt(result['eval_loss'])}; adapter: {adapter_dir}; "
            f"report: {os.path.join(out_dir, 'report.md')}")
    dist.close()
    return result


def _generations(cfg: Config, run: Run, model, tokenizer, examples, before) -> tuple[list, dict]:
    """After-training generations beside the before ones -> generations.jsonl, their scores, a side-by-side."""
    after = generate_texts(model, tokenizer, examples, cfg.generate) if examples else []
    gens = [{"prompt": e["prompt"], "reference": e.get("reference", ""), "before": b["text"], "after": a["text"]}
            for e, b, a in zip(examples, before, after)]
    refs = [g["reference"] for g in gens]
    scores = {"before": generation_metrics([g["before"] for g in gens], refs),
              "after": generation_metrics([g["after"] for g in gens], refs)} if gens else {}
    write_text_atomic(os.path.join(run.out_dir, "generations.jsonl"), "".join(json.dumps(g) + "\n" for g in gens))
    if gens:
        run.say(side_by_side(gens))
    return gens, scores


def _elapsed(run: Run) -> float:
    import time
    return time.time() - run.t_start


def _fmt_opt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _report_fields(lora_report) -> dict:
    """Unmatched targets and peft's own trainable-parameter line, from apply_lora's report."""
    out = {}
    if lora_report.unmatched:
        out["unmatched targets"] = ", ".join(map(str, lora_report.unmatched)) + " (matched nothing: not adapted)"
    out["as peft prints it (4-bit)"] = lora_report.peft_line()
    return out
