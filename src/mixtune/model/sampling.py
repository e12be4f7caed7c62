"""KV-cache decoding: greedy or sampled (temperature, top-k, top-p), stopping at eos per row.

    ids = generate(model, [[1, 733, ...], [1, 22557]], max_new_tokens=64, greedy=True)  # new ids per prompt

Batched prompts of different lengths are left-aligned: the cache is filled with the shortest prompt's
length in one forward, then every step feeds one token per row — the row's next prompt token while it still
has some, else the token just chosen — so no padding or attention mask is needed and each row sees exactly
its own prompt followed by its own continuation (as if generated alone).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .modeling import KVCache, MixtralForCausalLM


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


def context_limit(model: MixtralForCausalLM) -> int:
    """The longest prompt + continuation the model's positions cover (max_position_embeddings; 0 = unknown)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def sample_next(logits: torch.Tensor, *, greedy: bool, temperature: float, top_p: float, top_k: int,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Greedy = argmax; else softmax(logits / T) truncated to the top_k
    tokens and to the smallest set whose probability reaches top_p, renormalised, then sampled.
    A temperature below GREEDY_BELOW decodes greedily (the limit of T -> 0, without dividing by ~0)."""
    if greedy or temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # <= 0: no overflow to inf / nan
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p  # keeps at least the top token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MixtralForCausalLM, prompt_ids: list[list[int]], *, max_new_tokens: int = 512,
             greedy: bool = False, temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
             eos_id: Optional[int] = None, notice: Optional[Callable[[str], None]] = None) -> list[list[int]]:
    """Continue each prompt (token ids, bos included if wanted) by up to max_new_tokens ids; a row stops
    after it emits eos_id (default: the model config's eos), which is kept as its last id.
    The context rule: a row's prompt + new tokens never exceed the model's max_position_embeddings: its new
    tokens are capped to what fits (`notice(msg)` is told), and a prompt that fills the context by itself is
    refused (ValueError). Returns the generated ids per prompt (prompt excluded)."""
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token (e.g. bos)")
    if max_new_tokens <= 0:
        return [[] for _ in prompt_ids]
    lens = [len(p) for p in prompt_ids]
    limit = context_limit(model)
    if limit:
        if max(lens) >= limit:
            raise ValueError(f"generate: a prompt of {max(lens)} tokens leaves no room in the model's context of "
                             f"{limit} tokens (max_position_embeddings); shorten it")
        if max(lens) + max_new_tokens > limit and notice is not None:
            notice(f"generate: prompt + max_new_tokens ({max(lens)} + {max_new_tokens}) exceed the model's "
                   f"context of {limit} tokens (max_position_embeddings): generating at most "
                   f"{limit - max(lens)} new tokens")
    eos = model.config.eos_token_id if eos_id is None else eos_id
    device = model.device
    B = len(prompt_ids)
    lo, hi = min(lens), max(lens)
    total = min(hi + max_new_tokens, limit) if limit else hi + max_new_tokens
    fill = eos if eos >= 0 else 0  # what finished rows keep feeding (ignored); eos_id=-1 means "never stop"
    tokens = torch.full((B, total), fill, dtype=torch.long, device=device)  # (B, total) prompt + generated
    for i, p in enumerate(prompt_ids):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    plen = torch.tensor(lens, device=device)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    gen = None
    if not greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config, B, total, device, model.dtype)
        logits = model(tokens[:, :lo], kv_cache=cache).logits[:, -1]  # (B, V) predicts position lo
        for pos in range(lo, total):
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("generate: the model produced non-finite logits (nan/inf): its weights or the "
                                 "adapter's overflow; nothing to sample from")
            nxt = sample_next(logits, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                              generator=gen)  # (B,)
            in_prompt = pos < plen  # rows still reading their prompt keep its token
            nxt = torch.where(in_prompt, tokens[:, pos], torch.where(done, torch.full_like(nxt, fill), nxt))
            tokens[:, pos] = nxt
            done = done | (~in_prompt & (nxt == eos))
            # every row has produced its max_new_tokens (or stopped): nothing left to decide
            if bool((done | (pos + 1 >= plen + max_new_tokens)).all()) or pos + 1 == total:
                break
            logits = model(tokens[:, pos:pos + 1], kv_cache=cache).logits[:, -1]
    finally:
        model.train(was_training)
    out = []
    for i, n in enumerate(lens):
        row = tokens[i, n:n + max_new_tokens].tolist()
        if eos in row:
            row = row[:row.index(eos) + 1]
        out.append(row)
    return out
