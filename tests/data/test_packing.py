"""Packing conserves tokens, never lets an example see another, keeps labels aligned; batches resume exactly."""

import random

import pytest
import torch

from mixtune.data import IGNORE, collate, iterate_batches, num_batches, pack_examples
from mixtune.data.packing import single_rows
from mixtune.kernels import document_causal_mask


def _examples(n=60, seed=0, max_len=64):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        L = rng.randint(2, max_len)
        ids = [1] + [rng.randint(3, 31999) for _ in range(L - 2)] + [2]
        p = rng.randint(1, L - 1)  # prompt length: labels on the rest
        labels = [IGNORE] * p + ids[p:]
        out.append((ids, labels))
    return out


def _split_row(row):
    """(input_ids, labels) segments of a packed row, cut where position ids restart at 0."""
    pos = row["position_ids"].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("T", [64, 100, 256])
def test_packing_conserves_tokens_and_keeps_labels_aligned(T):
    exs = _examples(max_len=min(T, 64))
    rows, stats = pack_examples(exs, T, pad_id=0)
    assert all(len(r["input_ids"]) == T for r in rows)
    real = sum(len(e[0]) for e in exs)
    assert stats["real_tokens"] == real and stats["slots"] == len(rows) * T
    assert stats["packing_efficiency"] == pytest.approx(real / (len(rows) * T), abs=1e-4)
    # every example appears exactly once, intact, with its own labels; the rest is padding
    seen = []
    for r in rows:
        segs = _split_row(r)
        pad_tail = sum(len(s[0]) for s in segs) - sum(len(e[0]) for e in segs if e[0] and e[0][0] == 1)
        for ids, labels in segs:
            if ids[0] == 1:
                seen.append((tuple(ids), tuple(labels)))
            else:  # padding: unk ids, no labels, never eos
                assert set(ids) == {0} and set(labels) == {IGNORE}
        assert pad_tail == (r["input_ids"] == 0).sum().item()
    assert sorted(seen) == sorted((tuple(i), tuple(l)) for i, l in exs)
    # best-fit: no two rows could have been merged
    fill = sorted(T - (r["input_ids"] == 0).sum().item() for r in rows)
    assert len(fill) < 2 or fill[0] + fill[1] > T


def test_no_attention_across_example_boundaries():
    exs = _examples(n=20, seed=1, max_len=40)
    rows, _ = pack_examples(exs, 128, pad_id=0)
    batch = collate(rows)
    mask = document_causal_mask(batch["position_ids"])  # the model's own mask: (B, [1,] T, T) True = may attend
    mask = mask.reshape(len(rows), 128, 128)
    for b, r in enumerate(rows):
        pos = r["position_ids"]
        doc = torch.cumsum((pos == 0).long(), 0)  # (T,) example index within the row
        same = doc[:, None] == doc[None, :]
        assert not (mask[b] & ~same).any(), "a token attends to another example"
        causal_same = same & torch.ones(128, 128, dtype=torch.bool).tril()
        assert torch.equal(mask[b], causal_same)


def test_overlong_example_fills_a_row_alone_and_empty_input():
    rows, stats = pack_examples([([1] + [5] * 62 + [2], [IGNORE] + [5] * 62 + [2]), ([1, 7, 2], [IGNORE, 7, 2])],
                                64, pad_id=0)
    assert stats["rows"] == 2 and stats["real_tokens"] == 67
    assert pack_examples([], 64, 0)[1]["rows"] == 0


def test_unpacked_rows_pad_to_longest_in_batch():
    exs = _examples(n=5, seed=2)
    rows, stats = single_rows(exs)
    assert stats["packing_efficiency"] is None and len(rows) == 5
    batch = next(iterate_batches(rows, 5, shuffle=False, seed=0))
    T = max(len(e[0]) for e in exs)
    assert batch["input_ids"].shape == (5, T) and batch["input_ids"].dtype == torch.long
    for b, (ids, labels) in enumerate(exs):
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids and batch["labels"][b, :n].tolist() == labels
        assert (batch["labels"][b, n:] == IGNORE).all() and (batch["input_ids"][b, n:] == 0).all()
        assert batch["position_ids"][b].tolist() == list(range(n)) + list(range(T - n))  # padding = own document


def test_iterate_batches_order_seed_epoch_and_exact_resume():
    rows, _ = pack_examples(_examples(n=80, seed=3), 96, pad_id=0)
    n = len(rows)
    bs = 3
    full = list(iterate_batches(rows, bs, shuffle=True, seed=7, epoch=0))
    assert len(full) == num_batches(n, bs) == (n + bs - 1) // bs
    assert sum(b["input_ids"].shape[0] for b in full) == n  # nothing dropped, last batch may be short
    resumed = list(iterate_batches(rows, bs, shuffle=True, seed=7, epoch=0, start=2))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = list(iterate_batches(rows, bs, shuffle=True, seed=7, epoch=0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, again))
    other = list(iterate_batches(rows, bs, shuffle=True, seed=7, epoch=1))
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, other))
    ordered = list(iterate_batches(rows, bs, shuffle=False, seed=7))
    assert torch.equal(ordered[0]["input_ids"][0], rows[0]["input_ids"])


def test_adversarial_lengths_and_inputs_that_cannot_be_packed():
    T = 16
    exact = ([1] + [9] * 14 + [2], [IGNORE] + [9] * 14 + [2])
    tiny = [([1], [IGNORE])] * 40 + [([1, 2], [IGNORE, 2])] * 7
    rows, stats = pack_examples([exact] + tiny, T, pad_id=0)
    assert all(len(r["input_ids"]) == T for r in rows)
    assert stats["real_tokens"] == 16 + 40 + 14 and stats["slots"] == len(rows) * T
    assert stats["rows"] == 1 + 4  # the exact one alone; 54 tiny tokens in ceil(54 / 16) rows
    segs = [s for r in rows for s in _split_row(r)]
    assert segs.count(exact) == 1 and segs.count(([1], [IGNORE])) == 40 and segs.count(([1, 2], [IGNORE, 2])) == 7
    # an example longer than the row (or with mismatched labels) is a caller error, never an over-long row
    with pytest.raises(ValueError, match="example 1 has 17 ids"):
        pack_examples([exact, ([1] * 17, [IGNORE] * 17)], T, pad_id=0)
    with pytest.raises(ValueError, match="example 0 has 3 ids and 2 labels"):
        pack_examples([([1, 2, 3], [IGNORE, 2])], T, pad_id=0)
