"""The training loop body: optimizer and schedule over the adapter, resume, then optimizer steps with logging,
periodic evaluation and atomic checkpoints.

    steps = fit(cfg, run, model, params, data, save_adapter_fn, eval_before=...)

`run` (a `Run`) says where and how: device, ranks, bf16 autocast, output dir, the checkpoint to resume, and
where to print. The recipe (`mixtune.train.main`) builds the model and data and calls this once.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..config import Config
from . import checkpoint as ckpt
from . import fsdp
from .evaluation import evaluate_ranks
from .metrics import MetricsLog, NoMetrics
from .optim import make_optimizer
from .schedule import lr_lambda, total_optimizer_steps, warmup_steps
from .step import (DivergenceGuard, TrainingDiverged, forward_backward, optimizer_step, params_finite, reduce_step,
                   skip_step)
from .stream import batches_per_epoch, label_tokens, micro_batch_stream


@dataclass
class Run:
    """Where and how one training job runs (set up by the recipe before the model is built)."""
    out_dir: str
    device: torch.device
    dist: object                       # mixtune.distributed.Dist
    resume_path: Optional[str] = None
    lock: object = None                # the output dir's runlock.RunLock (held by rank 0 for the whole run)
    bf16: bool = False
    quiet: bool = False                # ranks other than 0 print nothing
    t_start: float = field(default_factory=time.time)

    def say(self, msg: str, bar=None) -> None:
        if self.quiet:
            return
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


@dataclass
class Fitted:
    """What the loop leaves for the finish: steps done and the open metrics log (the final eval goes there)."""
    step: int
    total: int
    metrics: object                    # MetricsLog on rank 0, NoMetrics elsewhere
    seconds: float
    notes: dict = field(default_factory=dict)  # report.md lines: skipped steps, a collapse warning


def _restore(run: Run, model, optimizer, scheduler, total: int, train_rows: Optional[int] = None
             ) -> tuple[int, int, int, dict]:
    """Adapter, optimizer, scheduler, RNG and data position from run.resume_path -> (step, epoch, consumed,
    history). Refuses a checkpoint of another number of ranks, another planned length or other data."""
    path = run.resume_path
    state = ckpt.load_checkpoint(path)  # JSON + safetensors only: nothing in a checkpoint is executed
    s = state["state"]
    step, epoch, consumed = ckpt.training_position(state)
    ckpt.check_world_size(path, run.dist.world)
    if s.get("total_steps") not in (None, total):
        raise ckpt.CheckpointError(f"--resume: {path} belongs to a run of {s['total_steps']} steps, "
                                   f"this config plans {total}; resume with the same config")
    if train_rows is not None and s.get("train_rows") not in (None, train_rows):
        raise ckpt.CheckpointError(f"--resume: {path} was trained on {s['train_rows']} packed rows, this run "
                                   f"prepared {train_rows}: the data changed, so its data position does not "
                                   f"apply; resume with the same data or start a new --output_dir")
    if "trainable" in state:
        ckpt.load_trainable_state_dict(model, state["trainable"])
        ckpt.restore_optimizer(optimizer, state["optimizer"], f"{path}/optimizer.json")
    else:  # an fsdp checkpoint: every rank reads its shards
        fsdp.load_sharded(path, model, optimizer)
    ckpt.restore_scheduler(scheduler, state["scheduler"], f"{path}/scheduler.json")
    ckpt.restore_rng_state(state["rng"], f"{path}/rng.json")
    run.say(f"mixtune: resuming from {path} (step {step}/{total}, epoch {epoch}, micro-batch {consumed})")
    return step, epoch, consumed, s.get("history", {})


def fit(cfg: Config, run: Run, model, params: list, data, save_adapter_fn: Callable[[str], None], *,
        eval_before: Optional[dict] = None, on_step: Optional[Callable[[int], None]] = None) -> Fitted:
    """Train `params` of `model` on data.train_rows as cfg.train says; returns when the planned steps are done.
    `on_step(step)` is called after every optimizer step (and its checkpoint), e.g. by tests that simulate a
    kill."""
    from ..distributed import step_generator_seed

    t, dist = cfg.train, run.dist
    micro_bs, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
    per_epoch = batches_per_epoch(data.train_rows, micro_bs)
    total = total_optimizer_steps(cfg, len(data.train_rows), per_epoch, dist.world)
    optimizer = make_optimizer(params, t.optim, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                               eps=t.adam_epsilon, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.lr_scheduler_type, warmup_steps(cfg, total), total))

    step, epoch, consumed, history = 0, 0, 0, {}
    torch.manual_seed(t.seed)
    if run.resume_path:
        step, epoch, consumed, history = _restore(run, model, optimizer, scheduler, total, len(data.train_rows))
    metrics = MetricsLog(run.out_dir, t.tensorboard, step if run.resume_path else None) if dist.is_main \
        else NoMetrics()
    if eval_before is not None and not run.resume_path:
        metrics.log({"kind": "eval", "step": 0, **eval_before})
    n_trainable = sum(p.numel() for p in params)
    run.say(f"mixtune: {len(data.train_rows)} train rows × {cfg.data.max_seq_length} tokens, "
            f"{len(data.eval_rows)} eval rows; {total} steps of {micro_bs}×{accum} rows; "
            f"{n_trainable:,} trainable parameters; device {run.device}"
            f"{f' x {dist.world} ranks' if dist.enabled else ''}, "
            f"{'bf16 autocast' if run.bf16 else str(model.dtype).replace('torch.', '')}"
            f"{'; expert products fp8 (e4m3)' if cfg.model.expert_precision == 'fp8' else ''}")

    stream = micro_batch_stream(data.train_rows, micro_bs, cfg.data.seed, epoch, consumed)
    model.train()
    bar = None
    if t.progress and dist.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5)
    win = _Window()
    tokens_seen = history.get("tokens_seen", 0)
    guard = DivergenceGuard(t.max_bad_steps, getattr(model.config, "vocab_size", 0), history)

    def stop(err: TrainingDiverged) -> TrainingDiverged:  # what a diverged run leaves: metrics, no adapter
        if bar is not None:
            bar.close()
        metrics.close()
        return err

    while step < total:
        # [(epoch, consumed after it, batch (B, T))]: the step's micro-batches; rank r runs r, r + N, ...
        micro = [next(stream) for _ in range(accum * dist.world)]
        if dist.enabled:
            torch.manual_seed(step_generator_seed(t.seed, step, dist.rank))  # this rank's dropout masks
        step_loss, n_step, step_aux, n_in = forward_backward(
            model, [b for _, _, b in micro[dist.rank::dist.world]], run.device, run.bf16, t.router_aux_loss_coef,
            n_step=sum(label_tokens(b) for _, _, b in micro))
        # summed over ranks (the same numbers, hence the same decisions, on every rank); the gradient norm
        step_loss, step_aux, n_in, norm, grad_norm = reduce_step(dist, params, step_loss, step_aux, n_in)
        step += 1
        tokens_seen += n_in
        epoch, consumed = micro[-1][0], micro[-1][1]
        if guard.is_bad(step_loss, step_aux, grad_norm):  # skip the update, count it; a streak stops the run
            lr = skip_step(optimizer, scheduler)
            rec = guard.bad(step, step_loss, step_aux, grad_norm, lr)
            metrics.log({**rec, "tokens_seen": tokens_seen})
            if guard.stop:
                raise stop(guard.diverged(lr, ckpt.find_latest_checkpoint(run.out_dir)))
            run.say(f"mixtune: warning: step {step}: non-finite {' / '.join(rec['nonfinite'])}; update skipped "
                    f"({rec['in_a_row']} in a row; train.max_bad_steps {t.max_bad_steps} in a row stop the run)", bar)
        else:
            lr = optimizer_step(params, optimizer, scheduler, t.max_grad_norm, norm)
            if not _all_ranks(dist, params_finite(params)):
                raise stop(TrainingDiverged(
                    f"training diverged at step {step}: its update made adapter parameters non-finite (lr "
                    f"{lr:.3g}); the run stopped without writing an adapter; last good checkpoint: "
                    f"{ckpt.find_latest_checkpoint(run.out_dir) or 'none'}. Lower train.learning_rate"))
            win.add(step_loss, n_step, step_aux, n_in)
            warning = guard.good(step, step_loss / max(1, n_step), grad_norm)
            if warning:
                run.say(warning, bar)
                metrics.log({"kind": "warning", "step": step, "message": warning})
        if bar is not None:
            bar.update(1)

        if (step % t.logging_steps == 0 or step == total) and win.steps:
            rec = {"kind": "train", "step": step, "epoch": round(epoch + consumed / max(1, per_epoch), 4),
                   **win.take(), "lr": lr, "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                   **({"skipped_steps": guard.skipped} if guard.skipped else {})}
            metrics.log(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            else:
                run.say(f"step {step}/{total} loss {rec['loss']:.4f} lr {lr:.3g} {rec['tokens_per_s']:.0f} tok/s")

        if data.eval_rows and t.eval_steps and step % t.eval_steps == 0 and step != total:
            ev = evaluate_ranks(model, data.eval_rows, t.per_device_eval_batch_size, run.bf16, dist)
            metrics.log({"kind": "eval", "step": step, **ev})
            run.say(f"step {step}: eval loss {ev['eval_loss']:.4f} perplexity {ev['eval_perplexity']:.2f}", bar)

        # no checkpoint right after a skipped step (the weights just gave a non-finite loss), except the last one
        if ((t.save_steps and step % t.save_steps == 0) or step == total) and (not guard.in_a_row or step == total):
            state = {"epoch": epoch, "batches_in_epoch": consumed, "total_steps": total, "world_size": dist.world,
                     "train_rows": len(data.train_rows), "history": {"tokens_seen": tokens_seen, **guard.history()}}
            if dist.sharded:  # fsdp: every rank writes its shards, rank 0 the rest
                fsdp.save_checkpoint(dist, run.out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     state=state, total_limit=t.save_total_limit, save_adapter_fn=save_adapter_fn,
                                     config=cfg)
            elif dist.is_main:  # every rank holds the same adapter and optimizer state; config.yaml beside it
                ckpt.save_checkpoint(run.out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     state=state, total_limit=t.save_total_limit, save_adapter_fn=save_adapter_fn,
                                     config=cfg)
            dist.barrier()
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    if guard.in_a_row:
        run.say(f"mixtune: warning: the last {len(guard.in_a_row)} step(s) had non-finite values (updates skipped); "
                f"the adapter holds the weights after step {guard.in_a_row[0] - 1}")
    return Fitted(step=step, total=total, metrics=metrics, seconds=time.time() - run.t_start, notes=guard.notes())


def _all_ranks(dist, ok: bool) -> bool:
    """True when `ok` holds on every rank (one collective under torchrun)."""
    if not dist.enabled:
        return ok
    return dist.sum(float(not ok))[0] == 0


class _Window:
    """Loss, aux loss and throughput summed since the last log line."""

    def __init__(self):
        self.loss, self.tok, self.aux, self.tokens_in, self.steps, self.t0 = 0.0, 0, 0.0, 0, 0, time.time()

    def add(self, loss_sum: float, n_tok: int, aux: float, n_in: int) -> None:
        self.loss += loss_sum
        self.tok += n_tok
        self.aux += aux
        self.tokens_in += n_in
        self.steps += 1

    def take(self) -> dict:
        """{"loss", "tokens_per_s"[, "aux_loss"]} over the window, which then starts again."""
        dt = max(1e-9, time.time() - self.t0)
        rec = {"loss": self.loss / max(1, self.tok), "tokens_per_s": self.tokens_in / dt}
        if self.aux:
            rec["aux_loss"] = self.aux / self.steps
        self.__init__()
        return rec
