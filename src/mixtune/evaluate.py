"""Evaluation: token-weighted loss / perplexity over packed rows, and generations on held-out examples.

    metrics = evaluate_loss(model, rows, batch_size=4)      # {"eval_loss", "eval_perplexity", "eval_tokens"}
    mixtune eval [CONFIG] --adapter runs/tiny/adapter [--json]

The loss is the mean cross-entropy over every label token of the evaluation set (sum of token losses / number
of label tokens), not a mean of per-batch means.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any, Optional

import torch


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model, rows: list, batch_size: int, *, autocast: bool = False,
                  max_batches: Optional[int] = None) -> dict[str, float]:
    """Mean token cross-entropy of `model` over packed `rows` (each {input_ids, labels, position_ids} (T,)).

    Returns eval_loss (nats/token), eval_perplexity (exp of it), eval_tokens (label tokens counted)."""
    from .data import iterate_batches

    was_training = model.training
    model.eval()
    device = model.device
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_tok = 0
    try:
        for i, batch in enumerate(iterate_batches(rows, batch_size, shuffle=False, seed=0)):
            if max_batches is not None and i >= max_batches:
                break
            b = batch_to(batch, device)
            with autocast_context(device, autocast):
                out = model(b["input_ids"], b["position_ids"], b["labels"], return_logits=False)
            loss_sum += out.loss_sum.detach().double().cpu()
            n_tok += int(out.n_tokens)
    finally:
        model.train(was_training)
    if n_tok == 0:
        return {"eval_loss": float("nan"), "eval_perplexity": float("nan"), "eval_tokens": 0}
    loss = float(loss_sum / n_tok)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": n_tok}


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list, gen_cfg, *, max_new_tokens: Optional[int] = None,
                   greedy: Optional[bool] = None) -> list[dict[str, Any]]:
    """Continue each prompt with `mixtune.generate.generate` and gen_cfg's decoding settings. A prompt is a
    formatted text (bos is prepended here) or an example dict with "prompt" and "prompt_ids" (the exact ids
    the model saw in training, e.g. PreparedData.eval_examples).

    Returns [{"prompt", "text", "token_ids"}] (token_ids: the new ids, eos included if emitted)."""
    from .generate import generate

    out = []
    for p in prompts:
        if isinstance(p, dict):
            ids = list(p.get("prompt_ids") or tokenizer.encode(p["prompt"], bos=True))
            p = p["prompt"]
        else:
            ids = tokenizer.encode(p, bos=True)
        new = generate(model, [ids],
                       max_new_tokens=gen_cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
                       greedy=gen_cfg.greedy if greedy is None else greedy, temperature=gen_cfg.temperature,
                       top_p=gen_cfg.top_p, top_k=gen_cfg.top_k, seed=gen_cfg.seed, eos_id=tokenizer.eos_id)[0]
        out.append({"prompt": p, "text": tokenizer.decode(new), "token_ids": list(new)})
    return out


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style word-overlap F1 between two texts (lower-cased alphanumeric words), in [0, 1]."""
    from collections import Counter

    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after whitespace/case normalisation) and mean word F1 of generations against references."""
    if not predictions:
        return {}
    em = [float(_words(p) == _words(r)) for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
    return {"exact_match": sum(em) / len(em), "word_f1": sum(f1) / len(f1)}


# --------------------------------------------------------------------------------------------------
# `mixtune eval`
# --------------------------------------------------------------------------------------------------


def eval_main(cfg, adapter: Optional[str] = None, json_out: bool = False) -> dict[str, Any]:
    """Evaluation loss / perplexity of the base model (or base + adapter) on the configured eval split."""
    import os

    from .data import load_tokenizer, prepare_data
    from .model.loading import load_model, resolve_dtype, resolve_model_path
    from .train import resolve_device, use_bf16

    t0 = time.time()
    if adapter and not os.path.isdir(adapter):
        raise FileNotFoundError(f"--adapter: directory not found: {adapter}")
    model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model.tokenizer, model_path)
    data = prepare_data(cfg, tokenizer)
    if not data.eval_rows:
        raise ValueError("no evaluation rows: set data.eval_fraction > 0 or data.eval_split")
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    bf16 = use_bf16(cfg, device, dtype)
    report = (lambda msg: print(msg, file=sys.stderr)) if json_out else print
    model = load_model(model_path, quant=cfg.model.quant, dtype=dtype,
                       device=device, cache_dir=cfg.model.cache_dir, revision=cfg.model.revision, report=report)
    model.set_moe_backend(cfg.model.moe_backend)
    model.attn_implementation = cfg.model.attn_implementation
    if adapter:
        from .lora import load_adapter
        load_adapter(model, adapter)
    metrics = evaluate_loss(model, data.eval_rows, cfg.train.per_device_eval_batch_size, autocast=bf16)
    result = {"model": cfg.model.name_or_path or "tiny-default", "adapter": adapter or None,
              "eval_rows": len(data.eval_rows), **metrics, "seconds": round(time.time() - t0, 2)}
    if json_out:
        print(json.dumps(result))
    else:
        print(f"eval loss {metrics['eval_loss']:.4f}  perplexity {metrics['eval_perplexity']:.2f}  "
              f"({metrics['eval_tokens']} tokens, {len(data.eval_rows)} rows"
              f"{', adapter ' + adapter if adapter else ', base model'})", file=sys.stdout)
    return result
