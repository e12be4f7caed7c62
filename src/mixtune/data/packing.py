"""Packing tokenized examples into fixed-length rows, and batching rows.

Packing is best-fit decreasing: examples are taken longest first and each goes into the open row with the
least room that still fits it (a new row when none does). Every token of every example is kept, examples are
never split, and each example's position ids restart at 0, so the model's document mask (a new document
starts wherever the position id is 0) keeps examples from attending to each other. The tail of a row is
padding: input id `pad_id` (unk, never eos), label -100, position ids 0, 1, 2, ... so it is its own document.

Without packing, each row is one example (variable length); `iterate_batches` right-pads every batch to its
longest row the same way.
"""

from __future__ import annotations

import bisect
from typing import Iterator

import torch

IGNORE = -100


def _row(ids: list, labels: list, positions: list) -> dict:
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long)}


def pack_examples(examples: list, max_len: int, pad_id: int) -> tuple[list, dict]:
    """examples: [(input_ids, labels)] each no longer than max_len -> (rows of length max_len, stats).

    Rows list examples in the order they were placed; the row order follows the first (longest) example.
    """
    for i, (ids, labels) in enumerate(examples):
        if len(ids) > max_len or len(labels) != len(ids):  # would silently make a row longer than max_len
            raise ValueError(f"pack_examples: example {i} has {len(ids)} ids and {len(labels)} labels; each "
                             f"needs equal counts <= max_len={max_len} (truncate or drop it first: fit_length)")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    bins: list[list[int]] = []          # example indices per row
    free: list[tuple[int, int]] = []    # sorted (room left, row index) of rows that still have room
    for i in order:
        n = len(examples[i][0])
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            bins[r].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        else:
            bins.append([i])
            if max_len - n > 0:
                bisect.insort(free, (max_len - n, len(bins) - 1))
    rows, real = [], 0
    for members in bins:
        ids, labels, pos = [], [], []
        for i in members:
            e_ids, e_labels = examples[i]
            ids += e_ids
            labels += e_labels
            pos += range(len(e_ids))
        real += len(ids)
        pad = max_len - len(ids)
        ids += [pad_id] * pad
        labels += [IGNORE] * pad
        pos += range(pad)
        rows.append(_row(ids, labels, pos))
    slots = len(rows) * max_len
    stats = {"rows": len(rows), "real_tokens": real, "slots": slots,
             "packing_efficiency": round(real / slots, 4) if slots else 0.0,
             "examples_per_row": round(sum(len(b) for b in bins) / len(bins), 2) if bins else 0.0}
    return rows, stats


def single_rows(examples: list) -> tuple[list, dict]:
    """One example per row, unpadded (iterate_batches pads each batch to its longest row)."""
    rows = [_row(ids, labels, list(range(len(ids)))) for ids, labels in examples if ids]
    real = sum(len(r["input_ids"]) for r in rows)
    return rows, {"rows": len(rows), "real_tokens": real, "slots": real, "packing_efficiency": None,
                  "examples_per_row": 1.0 if rows else 0.0}


def real_token_mask(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(T,) 1 on real tokens, 0 on the padding of a packed row: its trailing segment (from the last position id
    0) when that segment has no label -- every kept example has at least one label (`dropped_no_labels`)."""
    starts = (position_ids == 0).nonzero().flatten()
    mask = torch.ones_like(labels)
    if len(starts):
        s = int(starts[-1])
        if bool((labels[s:] == IGNORE).all()):
            mask[s:] = 0
    return mask


def collate(rows: list, pad_id: int = 0) -> dict:
    """Stack rows into (B, T) LongTensors, right-padding to the longest (label -100, positions restarting at
    0 so the padding is its own document). `attention_mask` (B, T): 1 on real tokens, 0 on padding (this right
    padding and a packed row's tail; a row's own "attention_mask" is used where it has one); the model uses it
    only to keep padding out of the router's load-balancing statistics."""
    T = max(len(r["input_ids"]) for r in rows)
    keys = ("input_ids", "labels", "position_ids", "attention_mask")
    out = {k: torch.empty(len(rows), T, dtype=torch.long) for k in keys}
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][b, :n] = r["input_ids"]
        out["labels"][b, :n] = r["labels"]
        out["position_ids"][b, :n] = r["position_ids"]
        out["attention_mask"][b, :n] = r["attention_mask"] if "attention_mask" in r else \
            real_token_mask(r["labels"], r["position_ids"])
        out["input_ids"][b, n:] = pad_id
        out["labels"][b, n:] = IGNORE
        out["position_ids"][b, n:] = torch.arange(T - n)
        out["attention_mask"][b, n:] = 0
    return out


def batch_order(n_rows: int, *, shuffle: bool, seed: int, epoch: int = 0) -> list:
    """The row order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n_rows))
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n_rows, generator=g).tolist()


def num_batches(n_rows: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be smaller: nothing is dropped)."""
    return (n_rows + batch_size - 1) // batch_size


def iterate_batches(rows: list, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0, start: int = 0,
                    pad_id: int = 0) -> Iterator[dict]:
    """Yield {"input_ids", "labels", "position_ids"}: LongTensors (B, T), B = batch_size (the last batch of an
    epoch may be smaller). `start` skips that many batches of this epoch (exact resume): the order depends only
    on (seed, epoch), so batch k is the same whether or not earlier batches were consumed."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = batch_order(len(rows), shuffle=shuffle, seed=seed, epoch=epoch)
    for b in range(start, num_batches(len(rows), batch_size)):
        yield collate([rows[i] for i in order[b * batch_size:(b + 1) * batch_size]], pad_id)
