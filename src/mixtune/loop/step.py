"""One optimizer step: forward + backward over the step's micro-batches with exact accumulation, then the
gradient norm (clipped when asked), the update and the schedule.

    loss_sum, n_tok, aux, n_in = forward_backward(model, batches, device, bf16, aux_coef)
    grad_norm, lr = optimizer_step(params, optimizer, scheduler, max_grad_norm)
"""

from __future__ import annotations

from typing import Optional

import torch

from ..runtime import autocast_context, batch_to
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


def grad_norm_of(params: list, max_grad_norm: float) -> float:
    """The global L2 norm of the parameters' gradients; clipped to max_grad_norm in place when it is > 0."""
    if max_grad_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def optimizer_step(params: list, optimizer, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Gradient norm (clipped when max_grad_norm > 0), update, schedule, zero the gradients.
    Returns (grad_norm before clipping, the lr this update used)."""
    grad_norm = grad_norm_of(params, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
