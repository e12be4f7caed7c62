"""The training recipe, top-down: build → fit (accumulate, clip, log, eval, save) → report.

    mixtune train                          # the offline tiny default (configs/tiny.yaml's values)
    mixtune train configs/mixtral-8x7b-qlora.yaml --train.output_dir runs/mixtral
    python -c "from mixtune.config import load_config; from mixtune import train; train.main(load_config())"

`main(cfg)` reads like the recipe it runs (no Trainer class): resolve the model → tokenizer → data → load the
(4-bit) base → inject LoRA → AdamW over the adapter only → warm-up + cosine/linear/constant schedule →
loop over optimizer steps (gradient accumulation with exact token normalisation, clipping, optional bf16
autocast and activation checkpointing, Mixtral's router aux loss) with evaluation, JSONL/TensorBoard metrics
and atomic checkpoints → final PEFT adapter → optional merge → before/after generations → loss PNG → report.

Output dir layout: config.yaml, metrics.jsonl, tb/, checkpoints/step-N/, adapter/, generations.jsonl, loss.png,
report.md, merged/ (optional). `--resume auto|DIR` continues a killed run to the same final weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import Callable, Iterator, Optional

import torch

from . import checkpoint as ckpt
from .optim import make_optimizer
from .config import Config, ConfigError
from .evaluate import autocast_context, batch_to, evaluate_loss, generate_texts, generation_metrics

# --------------------------------------------------------------------------------------------------
# small helpers (device, precision, schedule, data stream)
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """auto → cuda if available else cpu; otherwise the named device (must exist: ConfigError if not)."""
    from .model.loading import resolve_device as _resolve

    return _resolve(name)


def use_bf16(cfg: Config, device: torch.device, model_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether to run forward passes under bf16 autocast. train.bf16: auto = on for CUDA devices that support
    bf16, off on CPU (fp32); true/false force it. Never when the model already computes in bfloat16 (the
    default on CUDA): its frozen weights are bf16 and LoRA casts its fp32 parameters to the input dtype, so
    autocast adds nothing there but it does push the grouped-MoE products to fp32 — measured 4.3x slower
    (17,141 vs 73,581 tok/s per step, bench/results/2026-11-29-call10-train-step-diag.log)."""
    if model_dtype == torch.bfloat16:
        return False
    if cfg.train.bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg.train.bf16 == "true"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after `step` scheduler steps: linear warm-up over `warmup` steps, then
    cosine decay to 0, linear decay to 0, or constant, until `total`."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def warmup_steps(cfg: Config, total: int) -> int:
    return cfg.train.warmup_steps if cfg.train.warmup_steps > 0 else int(math.ceil(cfg.train.warmup_ratio * total))


def batches_per_epoch(rows: list, batch_size: int) -> int:
    """Micro-batches iterate_batches yields over one epoch of `rows` (the last one may be smaller)."""
    from .data import num_batches
    return num_batches(len(rows), batch_size)


def total_optimizer_steps(cfg: Config, n_rows: int, per_epoch: Optional[int] = None, world: int = 1) -> int:
    """train.max_steps, or ceil(num_train_epochs × micro-batches per epoch / (accumulation × ranks))."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if per_epoch is None:
        per_epoch = math.ceil(n_rows / cfg.train.per_device_train_batch_size)
    return max(1, math.ceil(cfg.train.num_train_epochs * per_epoch
                            / (cfg.train.gradient_accumulation_steps * world)))


def micro_batch_stream(rows: list, batch_size: int, seed: int, epoch: int, start: int
                       ) -> Iterator[tuple[int, int, dict]]:
    """Endless micro-batches over epochs, starting at micro-batch `start` of `epoch` (resume skips what was
    consumed). Yields (epoch, micro-batches consumed in that epoch after this one, batch)."""
    from .data import iterate_batches

    while True:
        n = 0
        for batch in iterate_batches(rows, batch_size, shuffle=True, seed=seed, epoch=epoch, start=start):
            start += 1
            n += 1
            yield epoch, start, batch
        if n == 0 and start == 0:
            raise ValueError(f"no training batches: {len(rows)} packed rows for "
                             f"train.per_device_train_batch_size {batch_size}")
        epoch, start = epoch + 1, 0


def label_tokens(batch: dict) -> int:
    """Label tokens the model's shifted cross-entropy counts: labels[:, 1:] != -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def forward_backward(model, batches: list[dict], device: torch.device, bf16: bool, aux_coef: float,
                     n_step: Optional[int] = None) -> tuple[float, int, float, int]:
    """Forward + backward over the micro-batches of ONE optimizer step, accumulating into .grad.

    Exact accumulation: the step's loss is (sum of token losses over all micro-batches) / (label tokens of
    the whole step), so every token weighs the same however the rows are split (not a mean of per-batch
    means). The router aux loss of each micro-batch is weighted by its share of the step's label tokens.
    n_step: the step's label tokens when `batches` are only this rank's share of the step (data parallel).
    Returns (sum of token CE, label tokens, token-weighted aux loss, input tokens)."""
    n_step = max(1, n_step if n_step is not None else sum(label_tokens(b) for b in batches))
    loss_sum, aux, n_in = 0.0, 0.0, 0
    for batch in batches:
        b = batch_to(batch, device)  # (B, T) each
        with autocast_context(device, bf16):
            out = model(b["input_ids"], b["position_ids"], b["labels"], return_logits=False)
        loss = out.loss_sum / n_step
        share = int(out.n_tokens) / n_step
        if aux_coef > 0 and out.aux_loss is not None:
            loss = loss + aux_coef * out.aux_loss * share
        loss.backward()
        loss_sum += float(out.loss_sum.detach())
        if out.aux_loss is not None:
            aux += float(out.aux_loss.detach()) * share
        n_in += b["input_ids"].numel()
    return loss_sum, n_step, aux, n_in


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard scalars under tb/."""

    def __init__(self, out_dir: str, tensorboard: bool, resume_step: Optional[int]):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # drop what the killed run logged after its last checkpoint: it will be logged again
            keep = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in keep)
        elif resume_step is None:
            open(self.path, "w").close()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for k, v in record.items():
                if k not in ("step", "kind", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    name = k if k.startswith("eval_") else f"{prefix}/{k}"
                    self.tb.add_scalar(name.replace("eval_", "eval/"), v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _NoMetrics:
    """Ranks other than 0 log nothing."""
    path = ""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _evaluate(model, rows: list, batch_size: int, bf16: bool, dist) -> dict:
    """evaluate_loss over all `rows`; with several ranks each takes every N-th row and the token sums are added."""
    if not dist.enabled:
        return evaluate_loss(model, rows, batch_size, autocast=bf16)
    part = evaluate_loss(model, rows[dist.rank::dist.world], batch_size, autocast=bf16)
    n = part["eval_tokens"]
    loss_sum, n = dist.sum(part["eval_loss"] * n if n else 0.0, n)
    if n == 0:
        return {"eval_loss": float("nan"), "eval_perplexity": float("nan"), "eval_tokens": 0}
    loss = loss_sum / n
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(n)}


def _checked_precision(precision: str, device) -> str:
    """model.expert_precision, refused on a GPU without FP8 tensor cores (announced as emulated on CPU)."""
    if precision == "fp8":
        from .kernels.fp8 import fp8_supported
        dev = torch.device(device)
        if dev.type == "cuda" and not fp8_supported(dev):
            cc = ".".join(map(str, torch.cuda.get_device_capability(dev)))
            raise ConfigError(f"model.expert_precision fp8 needs FP8 tensor cores (compute capability >= 8.9: "
                              f"Ada, Hopper, Blackwell) and torch._scaled_grouped_mm; this GPU is {cc}. "
                              "Use bf16.")
        if dev.type != "cuda":
            _say("mixtune: expert_precision fp8 on CPU: the FP8 products are emulated (correct, slow)")
    return precision


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


_QUIET = False  # set on ranks other than 0 of a torchrun job


def _say(msg: str, bar=None) -> None:
    if _QUIET:
        return
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


# keys that may differ between a run and its resumption: they change no trained weight (bookkeeping,
# output after training, where files go, and numerically equivalent implementations)
RESUME_MAY_CHANGE = {
    "train.resume", "train.output_dir", "train.progress", "train.tensorboard", "train.logging_steps",
    "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.generate_after", "train.merge_after",
    "train.per_device_eval_batch_size", "model.device", "model.cache_dir", "model.attn_implementation",
    "model.moe_backend", "model.gradient_checkpointing", "model.checkpoint_layers", "model.checkpoint_attention",
    "model.memory_budget_gib",
    "data.cache_dir", "data.eval_max_rows",
}


def check_resume_config(cfg: Config, saved_path: str) -> None:
    """A resumed run must train what the killed run trained: compare `cfg` with the run's saved config.yaml and
    raise ConfigError naming every key that differs (except RESUME_MAY_CHANGE and the generate/merge
    sections). Checked before anything in the output dir is rewritten, so the run's record stays intact."""
    if not os.path.isfile(saved_path):
        return
    from .config import load_config

    saved = load_config(saved_path).to_dict()
    now = cfg.to_dict()
    diff = [f"{s}.{k} {saved[s][k]!r} -> {now[s][k]!r}" for s in now if s not in ("generate", "merge")
            for k in now[s] if f"{s}.{k}" not in RESUME_MAY_CHANGE and now[s][k] != saved[s].get(k)]
    if diff:
        raise ConfigError(f"--resume: the config differs from the run's {saved_path}: {'; '.join(diff)}; resume "
                          f"with the same settings (e.g. `mixtune train {saved_path} --resume`) or start a new "
                          f"--output_dir")


# --------------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------------


def main(cfg: Config, *, on_step: Optional[Callable[[int], None]] = None, command: str = "") -> dict:
    """Run one training job described by `cfg`; returns the final metrics. `on_step(step)` is called after
    every optimizer step (and its checkpoint), e.g. by tests that simulate a kill."""
    from .data import load_tokenizer, prepare_data
    from .lora import apply_lora, check_targets, save_adapter
    from .model.config import MixtralConfig
    from .model.loading import build_model_on_meta, load_model, resolve_dtype, resolve_model_path
    from .distributed import setup, step_generator_seed

    global _QUIET
    t_start = time.time()
    t, out_dir = cfg.train, cfg.train.output_dir

    # 0. the output dir: refuse to mix a fresh run into an old one; save the resolved config first
    resume_path = ckpt.resolve_resume(out_dir, t.resume)
    if resume_path:
        check_resume_config(cfg, os.path.join(out_dir, "config.yaml"))
    if t.merge_after:  # a merge.out that the final merge would refuse: say so now, not after training
        from .merge import _check_out_dir
        _check_out_dir(os.path.abspath(cfg.merge.out or os.path.join(out_dir, "merged")))
    dist, device = setup(resolve_device(cfg.model.device))  # torchrun: join the job; rank r -> cuda:LOCAL_RANK
    _QUIET = not dist.is_main
    dist.barrier()  # every rank has checked the output dir before rank 0 writes into it
    if not resume_path and t.resume == "auto":  # allowed (a requeued job died before its first save); said
        _say(f"mixtune: --resume: no complete checkpoint in {ckpt.checkpoints_dir(out_dir)}; starting a fresh run")
    if dist.is_main:
        ckpt.remove_stale_temporaries(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        cfg.save(os.path.join(out_dir, "config.yaml"))
    seed_everything(t.seed)

    # 1. model files, tokenizer, data (rank 0 first: it fills the caches the others then read)
    with dist.main_first():
        model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision)
        base_name = cfg.model.name_or_path or model_path
        # LoRA target errors now, on the meta device, not after data preparation and loading the base (minutes)
        check_targets(build_model_on_meta(MixtralConfig.from_pretrained(model_path), cfg.model.quant), cfg.lora)
        tokenizer = load_tokenizer(cfg.model.tokenizer, model_path)
        data = prepare_data(cfg, tokenizer)
    if not data.train_rows:
        raise ValueError("no training rows after preparation (see `mixtune prepare` for the statistics)")

    # 2. the base model (4-bit by default) and the adapter
    dtype = resolve_dtype(cfg.model.dtype, device)
    bf16 = use_bf16(cfg, device, dtype)  # autocast only over a non-bf16 model
    model = load_model(model_path, quant=cfg.model.quant, dtype=dtype, device=device,
                       cache_dir=cfg.model.cache_dir, revision=cfg.model.revision, report=_say)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.data.max_seq_length > max_pos:
        raise ConfigError(f"data.max_seq_length {cfg.data.max_seq_length} exceeds the model's "
                          f"max_position_embeddings {max_pos}")
    model.set_checkpointing(cfg.model.checkpoint_layers if cfg.model.gradient_checkpointing else 0,
                            cfg.model.checkpoint_attention)
    model.set_moe_backend(cfg.model.moe_backend, _checked_precision(cfg.model.expert_precision, device))
    model.attn_implementation = cfg.model.attn_implementation
    lora_report = apply_lora(model, cfg.lora, cfg.lora.init_seed if cfg.lora.init_seed is not None else t.seed,
                             warn=False)  # the report printed below carries the warnings
    _say(lora_report.format() if hasattr(lora_report, "format") else str(lora_report))
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if not params:
        raise ValueError("lora.targets: nothing is trainable (no target matched a module)")
    if cfg.model.memory_budget_gib > 0:  # recomputation chosen by memory
        from .inspect_model import memory_estimate
        from .memory_plan import GiB, plan
        try:
            policy, est = plan(cfg.model.memory_budget_gib * GiB, model.config, memory_estimate(model)["weights_nf4"],
                               n_trainable, t.per_device_train_batch_size, cfg.data.max_seq_length, cfg.lora.r,
                               t.optim, cfg.lora.dropout, cfg.model.expert_precision)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model.set_checkpointing(policy.full, policy.attention)
        model.set_moe_backend(policy.backend)
        _say(f"mixtune: memory budget {cfg.model.memory_budget_gib:g} GiB -> "
             f"{policy.describe(model.config.num_hidden_layers)} (estimated peak {est / GiB:.1f} GiB)")

    # 3. before training: eval loss and generations of the base model (fresh LoRA B = 0 changes nothing)
    eval_bs = t.per_device_eval_batch_size
    eval_before = _evaluate(model, data.eval_rows, eval_bs, bf16, dist) if data.eval_rows else None
    examples = list(data.eval_examples[: t.generate_after]) if dist.is_main else []
    before = generate_texts(model, tokenizer, examples, cfg.generate) if examples else []

    # 4. optimizer over the adapter only, schedule
    micro_bs, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
    per_epoch = batches_per_epoch(data.train_rows, micro_bs)
    total = total_optimizer_steps(cfg, len(data.train_rows), per_epoch, dist.world)
    optimizer = make_optimizer(params, t.optim, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                               eps=t.adam_epsilon, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.lr_scheduler_type, warmup_steps(cfg, total), total))

    # 5. resume: adapter, optimizer, scheduler, RNG, data position
    step, epoch, consumed, history = 0, 0, 0, {}
    torch.manual_seed(t.seed)
    if resume_path:
        state = ckpt.load_checkpoint(resume_path)
        ckpt.load_trainable_state_dict(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng_state(state["rng"])
        s = state["state"]
        step, epoch, consumed = s["step"], s["epoch"], s["batches_in_epoch"]
        history = s.get("history", {})
        if s.get("world_size", 1) != dist.world:
            raise ckpt.CheckpointError(
                f"--resume: {resume_path} was trained on {s.get('world_size', 1)} rank(s), this run has {dist.world}; "
                f"an optimizer step takes micro-batch x accumulation x ranks rows, so resume with the same number "
                f"of ranks")
        if s.get("total_steps") not in (None, total):
            raise ckpt.CheckpointError(f"--resume: {resume_path} belongs to a run of {s['total_steps']} steps, "
                                       f"this config plans {total}; resume with the same config")
        _say(f"mixtune: resuming from {resume_path} (step {step}/{total}, epoch {epoch}, "
             f"micro-batch {consumed})")
    metrics = MetricsLog(out_dir, t.tensorboard, step if resume_path else None) if dist.is_main else _NoMetrics()
    if eval_before is not None and not resume_path:
        metrics.log({"kind": "eval", "step": 0, **eval_before})
    _say(f"mixtune: {len(data.train_rows)} train rows × {cfg.data.max_seq_length} tokens, "
         f"{len(data.eval_rows)} eval rows; {total} steps of {micro_bs}×{accum} rows; "
         f"{n_trainable:,} trainable parameters; device {device}"
         f"{f' x {dist.world} ranks' if dist.enabled else ''}, "
         f"{'bf16 autocast' if bf16 else str(dtype).replace('torch.', '')}"
         f"{'; expert products fp8 (e4m3)' if cfg.model.expert_precision == 'fp8' else ''}")

    # 6. the loop
    stream = micro_batch_stream(data.train_rows, micro_bs, cfg.data.seed, epoch, consumed)
    model.train()
    bar = None
    if t.progress and dist.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5)
    win_loss, win_tok, win_aux, win_t0, win_tokens_in, win_steps = 0.0, 0, 0.0, time.time(), 0, 0
    tokens_seen = history.get("tokens_seen", 0)
    last_eval = None
    save_adapter_fn = lambda d: save_adapter(model, d, cfg.lora, base_name)  # noqa: E731
    while step < total:
        # [(epoch, consumed after it, batch (B, T))]: the step's micro-batches; rank r runs r, r + N, ...
        micro = [next(stream) for _ in range(accum * dist.world)]
        if dist.enabled:
            torch.manual_seed(step_generator_seed(t.seed, step, dist.rank))  # this rank's dropout masks
        step_loss, n_step, step_aux, n_in = forward_backward(
            model, [b for _, _, b in micro[dist.rank::dist.world]], device, bf16, t.router_aux_loss_coef,
            n_step=sum(label_tokens(b) for _, _, b in micro))
        if dist.enabled:
            dist.sum_grads(params)  # each rank's loss is already over the whole step's tokens: sum, not mean
            step_loss, step_aux, n_in = dist.sum(step_loss, step_aux, n_in)
            n_in = int(n_in)
        win_tokens_in += n_in
        tokens_seen += n_in
        if t.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None])))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        epoch, consumed = micro[-1][0], micro[-1][1]
        win_loss += step_loss
        win_tok += n_step
        win_aux += step_aux
        win_steps += 1
        if bar is not None:
            bar.update(1)

        if step % t.logging_steps == 0 or step == total:
            dt = max(1e-9, time.time() - win_t0)
            rec = {"kind": "train", "step": step, "epoch": round(epoch + consumed / max(1, per_epoch), 4),
                   "loss": win_loss / max(1, win_tok), "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": win_tokens_in / dt, "tokens_seen": tokens_seen}
            if win_aux:
                rec["aux_loss"] = win_aux / win_steps
            metrics.log(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            else:
                _say(f"step {step}/{total} loss {rec['loss']:.4f} lr {lr:.3g} {rec['tokens_per_s']:.0f} tok/s")
            win_loss, win_tok, win_aux, win_t0, win_tokens_in, win_steps = 0.0, 0, 0.0, time.time(), 0, 0

        if data.eval_rows and t.eval_steps and step % t.eval_steps == 0 and step != total:
            last_eval = _evaluate(model, data.eval_rows, eval_bs, bf16, dist)
            metrics.log({"kind": "eval", "step": step, **last_eval})
            _say(f"step {step}: eval loss {last_eval['eval_loss']:.4f} "
                 f"perplexity {last_eval['eval_perplexity']:.2f}", bar)

        if (t.save_steps and step % t.save_steps == 0) or step == total:
            state = {"epoch": epoch, "batches_in_epoch": consumed, "total_steps": total, "world_size": dist.world,
                     "history": {"tokens_seen": tokens_seen}}
            if dist.is_main:  # every rank holds the same adapter and optimizer state
                ckpt.save_checkpoint(out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     state=state, total_limit=t.save_total_limit, save_adapter_fn=save_adapter_fn)
            dist.barrier()
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    train_seconds = time.time() - t_start

    # 7. after training: final eval, adapter, merge, generations, plot, report
    eval_after = _evaluate(model, data.eval_rows, eval_bs, bf16, dist) if data.eval_rows else None
    if not dist.is_main:  # rank 0 writes the adapter, generations, merge and report
        metrics.close()
        dist.close()
        return {"steps": step, "eval_loss": eval_after["eval_loss"] if eval_after else None, "rank": dist.rank}
    if eval_after is not None:
        metrics.log({"kind": "eval", "step": step, **eval_after})
    metrics.close()
    adapter_dir = os.path.join(out_dir, "adapter")
    save_adapter(model, adapter_dir, cfg.lora, base_name)
    after = generate_texts(model, tokenizer, examples, cfg.generate) if examples else []
    gens = [{"prompt": e["prompt"], "reference": e.get("reference", ""), "before": b["text"], "after": a["text"]}
            for e, b, a in zip(examples, before, after)]
    refs = [g["reference"] for g in gens]
    gen_scores = {"before": generation_metrics([g["before"] for g in gens], refs),
                  "after": generation_metrics([g["after"] for g in gens], refs)} if gens else {}
    with open(os.path.join(out_dir, "generations.jsonl"), "w") as fh:
        fh.writelines(json.dumps(g) + "\n" for g in gens)
    if gens:
        from .report import side_by_side
        _say(side_by_side(gens))
    merged_dir = None
    if t.merge_after:
        from .merge import merge_main
        merged_dir = cfg.merge.out or os.path.join(out_dir, "merged")
        merge_main(cfg, adapter_dir, merged_dir)

    from .report import plot_losses, read_metrics, write_report
    records = read_metrics(metrics.path)
    plot_losses(records, os.path.join(out_dir, "loss.png"), title=f"mixtune: {cfg.model.name_or_path or 'tiny default'}")
    train_losses = [r["loss"] for r in records if r.get("kind") == "train"]
    result = {
        "steps": step, "train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_before": eval_before["eval_loss"] if eval_before else None,
        "eval_loss": eval_after["eval_loss"] if eval_after else None,
        "eval_perplexity": eval_after["eval_perplexity"] if eval_after else None,
        "trainable_params": n_trainable, "seconds": round(time.time() - t_start, 1),
        "output_dir": out_dir, "adapter": adapter_dir, "merged": merged_dir, "generation_scores": gen_scores,
    }
    files = sorted(n for n in os.listdir(out_dir)) + ["report.md"]
    write_report(os.path.join(out_dir, "report.md"), {
        "title": f"mixtune run: {out_dir}", "command": command,
        "model": cfg.model.name_or_path or f"tiny default ({model_path})", "device": str(device),
        "dtype": "bf16 autocast" if bf16 else str(dtype).replace("torch.", ""), "quant": cfg.model.quant,
        "expert_precision": cfg.model.expert_precision,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": ", ".join(cfg.lora.targets),
                 "trainable params": f"{n_trainable:,}", **_report_fields(lora_report)},
        "data": {k: v for k, v in (data.stats or {}).items() if isinstance(v, (int, float, str))},
        "train": {"steps": step, "micro-batch × accumulation": f"{micro_bs} × {accum}"
                  + (f" × {dist.world} ranks" if dist.enabled else ""),
                  "learning rate": t.learning_rate, "schedule": t.lr_scheduler_type,
                  "final train loss": result["train_loss"], "wall time (s)": round(train_seconds, 1)},
        "eval_before": eval_before, "eval_after": eval_after, "loss_png": "loss.png", "generation_scores": gen_scores,
        "generations": gens, "files": files})
    _say(f"mixtune: done in {result['seconds']}s; eval loss "
         f"{_fmt_opt(result['eval_loss_before'])} → {_fmt_opt(result['eval_loss'])}; adapter: {adapter_dir}; "
         f"report: {os.path.join(out_dir, 'report.md')}")
    dist.close()
    return result


def _fmt_opt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _report_fields(lora_report) -> dict:
    """Unmatched targets etc. from apply_lora's report, whatever its exact shape."""
    out = {}
    for key in ("unmatched", "unmatched_targets"):
        v = getattr(lora_report, key, None)
        if v:
            out["unmatched targets"] = ", ".join(map(str, v)) + " (matched nothing: not adapted)"
    if hasattr(lora_report, "peft_line"):
        out["as peft prints it (4-bit)"] = lora_report.peft_line()
    return out
