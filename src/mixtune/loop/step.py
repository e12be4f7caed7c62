"""One optimizer step: forward + backward over the step's micro-batches with exact accumulation, then the
gradient norm, the divergence check, and the update (clipped when asked) or its skip, and the schedule.

    loss_sum, n_tok, aux, n_in = forward_backward(model, batches, device, bf16, aux_coef)
    loss_sum, aux, n_in, norm, grad_norm = reduce_step(dist, params, loss_sum, aux, n_in)  # over ranks; norm
    lr = optimizer_step(params, optimizer, scheduler, max_grad_norm, norm)   # or skip_step(optimizer, scheduler)
    guard = DivergenceGuard(max_bad_steps=3, vocab_size=32000)    # what the loop does with a non-finite step

The divergence guard: a step whose loss or gradient norm is not finite updates nothing (no optimizer step, the
gradients are dropped) but still counts as a step: the data it read is consumed and the lr schedule advances,
so step N of any run (interrupted and resumed or not) uses the same lr and the same micro-batches.
`train.max_bad_steps` such steps in a row stop the run (`TrainingDiverged`). An update that leaves a non-finite
adapter parameter stops it at once. A run whose gradient norm is exactly 0 for several steps with a positive
loss has collapsed (e.g. lr 1e3: the output saturates to a uniform distribution, loss = ln(vocab)): reported.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..runtime import autocast_context, batch_to
from .fsdp import is_dtensor, local
from .stream import label_tokens


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
            out = model(b["input_ids"], b["position_ids"], b["labels"], return_logits=False,
                        attention_mask=b.get("attention_mask"))  # padding stays out of the router aux loss
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


def grad_norm_of(params: list) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, () fp32, unclipped (inf / nan when a gradient is).
    Under torchrun call it after the gradients are summed: it is then the same on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def reduce_step(dist, params: list, loss: float, aux: float, n_in: int
                ) -> tuple[float, float, int, torch.Tensor, float]:
    """Under torchrun sum the gradients and the step's (loss, aux, input tokens) over the ranks, then take the
    gradient norm -> (loss, aux, n_in, norm () fp32, norm as float). Every rank ends with the same numbers and
    so takes the same skip / stop decision; whether any rank saw a non-finite norm is summed in as well, so
    ranks could not split even if their norms differed. Without torchrun: the norm only."""
    if dist.enabled and not getattr(dist, "sharded", False):  # (fsdp: its reduce-scatter already summed)
        dist.sum_grads(params)  # each rank's loss is already over the whole step's tokens: sum, not mean
    norm = grad_norm_of(params)  # fsdp: a DTensor reduced over the shards, the global norm
    grad_norm = float(norm.full_tensor() if is_dtensor(norm) else norm)
    if dist.enabled:
        loss, aux, n_in, bad_norms = dist.sum(loss, aux, n_in, float(not math.isfinite(grad_norm)))
        n_in = int(n_in)
        grad_norm = float("nan") if bad_norms else grad_norm
    return loss, aux, n_in, norm, grad_norm


def optimizer_step(params: list, optimizer, scheduler, max_grad_norm: float,
                   grad_norm: Optional[torch.Tensor] = None) -> float:
    """Clip to max_grad_norm (when > 0) with the norm already computed, update, schedule, zero the gradients.
    Returns the lr this update used."""
    if grad_norm is None:
        grad_norm = grad_norm_of(params)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm)  # = clip_grad_norm_, norm reused
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def skip_step(optimizer, scheduler) -> float:
    """A skipped update (non-finite loss or gradient norm): drop the gradients, leave the weights and the
    optimizer state alone, advance the schedule (the step still counts). Returns the lr the step would have
    used."""
    import warnings

    lr = scheduler.get_last_lr()[0]
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return lr


def params_finite(params: list) -> bool:
    """True when every element of every parameter is finite (one device sync)."""
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(local(p.detach())).all() for p in params]).all())


class TrainingDiverged(ValueError):
    """Training stopped because it diverged (non-finite losses / gradients, or a non-finite update). A user
    error: the CLI prints its one line and exits 2; the last good checkpoint stays, no adapter is written."""


COLLAPSE_STEPS = 3  # optimizer steps in a row with gradient norm 0 and a positive loss: a collapsed model


class DivergenceGuard:
    """The loop's bookkeeping of non-finite steps and of a collapsed model.

    bad(...) counts a skipped step and returns its metrics record; `stop` is true at max_bad_steps in a row
    and `diverged(...)` is then the error to raise. good(...) watches for a collapse and returns a warning line
    once. `notes()` are the report.md lines."""

    def __init__(self, max_bad_steps: int, vocab_size: int = 0, history: Optional[dict] = None):
        history = history or {}
        self.max_bad = max(1, int(max_bad_steps))
        self.vocab_size = int(vocab_size or 0)
        self.skipped = int(history.get("skipped_steps", 0))   # over the whole run (restored on resume)
        self.collapsed_at = history.get("collapsed_at")       # first step of a collapse, once seen
        self.collapse_loss = history.get("collapse_loss")
        self.in_a_row: list[int] = []                         # steps of the current non-finite streak
        self.zero_grad_steps = int(history.get("zero_grad_steps", 0))
        self.what: list[str] = []

    @staticmethod
    def is_bad(loss: float, aux: float, grad_norm: float) -> bool:
        return not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm))

    def bad(self, step: int, loss: float, aux: float, grad_norm: float, lr: float) -> dict:
        """Count the skipped step `step` -> its metrics record. Then `stop` says whether the streak is long
        enough to stop (max_bad_steps in a row)."""
        self.skipped += 1
        self.in_a_row.append(step)
        self.zero_grad_steps = 0
        self.what = [n for n, v in (("loss", loss), ("router aux loss", aux), ("gradient norm", grad_norm))
                     if not math.isfinite(v)]
        return {"kind": "skipped", "step": step, "nonfinite": self.what, "lr": lr,
                "in_a_row": len(self.in_a_row), "skipped_steps": self.skipped}

    @property
    def stop(self) -> bool:
        return len(self.in_a_row) >= self.max_bad

    def diverged(self, lr: float, last_good: Optional[str]) -> TrainingDiverged:
        """The one-line error of a run stopped by a streak of non-finite steps."""
        steps = self.in_a_row
        span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        return TrainingDiverged(
            f"training diverged at step {steps[-1]}: {span} had a non-finite {' / '.join(self.what)} "
            f"({len(steps)} in a row = train.max_bad_steps); their updates were skipped and the run stopped "
            f"without writing an adapter; last good checkpoint: {last_good or 'none'}. Lower "
            f"train.learning_rate (lr was {lr:.3g}) or check the data")

    def good(self, step: int, loss_per_token: float, grad_norm: float) -> Optional[str]:
        """A finite step: ends a non-finite streak; returns a warning line the first time the model looks
        collapsed (gradient norm exactly 0 for COLLAPSE_STEPS steps in a row with a positive loss)."""
        self.in_a_row = []
        self.zero_grad_steps = self.zero_grad_steps + 1 if (grad_norm == 0.0 and loss_per_token > 0) else 0
        if self.zero_grad_steps < COLLAPSE_STEPS or self.collapsed_at is not None:
            return None
        self.collapsed_at = step - COLLAPSE_STEPS + 1
        self.collapse_loss = loss_per_token
        return f"mixtune: warning: {self.collapse_note(loss_per_token)}"

    def collapse_note(self, loss: Optional[float] = None) -> str:
        msg = (f"the model collapsed at step {self.collapsed_at}: gradient norm 0 for {COLLAPSE_STEPS}+ steps in "
               f"a row")
        if loss is not None:
            msg += f" with loss {loss:.4f}"
            if self.vocab_size and abs(loss - math.log(self.vocab_size)) < 0.05:
                msg += f" = ln(vocab {self.vocab_size}), a uniform prediction"
        return msg + "; the adapter learns nothing more (train.learning_rate too high?)"

    def history(self) -> dict:
        """What a checkpoint keeps, so a resumed run reports the same counts."""
        return {"skipped_steps": self.skipped, "collapsed_at": self.collapsed_at,
                "collapse_loss": self.collapse_loss, "zero_grad_steps": self.zero_grad_steps}

    def notes(self) -> dict:
        """report.md lines ({} for a clean run)."""
        out = {}
        if self.skipped:
            out["skipped steps (non-finite loss or gradient)"] = self.skipped
        if self.collapsed_at is not None:
            out["warning"] = self.collapse_note(self.collapse_loss)
        return out
