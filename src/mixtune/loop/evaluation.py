"""Evaluation inside and after training: token-weighted loss / perplexity over packed rows (summed over ranks
when data-parallel), generations on held-out examples, and their scores against references.

    metrics = evaluate_loss(model, rows, batch_size=4)      # {"eval_loss", "eval_perplexity", "eval_tokens"}
    texts = generate_texts(model, tokenizer, examples, cfg.generate)

The loss is the mean cross-entropy over every label token of the evaluation set (sum of token losses / number
of label tokens), not a mean of per-batch means.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..data import iterate_batches
from ..model.sampling import generate
from ..runtime import autocast_context, batch_to


@torch.no_grad()
def evaluate_loss(model, rows: list, batch_size: int, *, autocast: bool = False,
                  max_batches: Optional[int] = None) -> dict[str, float]:
    """Mean token cross-entropy of `model` over packed `rows` (each {input_ids, labels, position_ids} (T,)).

    Returns eval_loss (nats/token), eval_perplexity (exp of it), eval_tokens (label tokens counted)."""
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


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Scores of generations against their references, through the libraries everyone reports with:
    exact_match (after whitespace/case/punctuation normalisation, mean over examples), chrf and bleu (sacrebleu's
    corpus-level chrF and BLEU with its default settings, 0-100) and rouge_l (rouge-score's ROUGE-L F-measure with
    its stemmer, mean over examples, 0-1)."""
    if not predictions:
        return {}
    import sacrebleu
    from rouge_score import rouge_scorer

    em = [float(_words(p) == _words(r)) for p, r in zip(predictions, references)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rl = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"exact_match": sum(em) / len(em),
            "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
            "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
            "rouge_l": sum(rl) / len(rl)}


def evaluate_ranks(model, rows: list, batch_size: int, bf16: bool, dist) -> dict:
    """evaluate_loss over all `rows`; with several ranks each takes every N-th row and the token sums are added."""
    if not dist.enabled or getattr(dist, "sharded", False):  # fsdp: every rank runs every batch (collectives)
        return evaluate_loss(model, rows, batch_size, autocast=bf16)
    part = evaluate_loss(model, rows[dist.rank::dist.world], batch_size, autocast=bf16)
    n = part["eval_tokens"]
    loss_sum, n = dist.sum(part["eval_loss"] * n if n else 0.0, n)
    if n == 0:
        return {"eval_loss": float("nan"), "eval_perplexity": float("nan"), "eval_tokens": 0}
    loss = loss_sum / n
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(n)}
