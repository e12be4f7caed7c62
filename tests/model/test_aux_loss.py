"""The router's load-balancing loss counts only real tokens: padding (collate's right padding, a packed row's
tail) stays out of its statistics; with an attention mask it equals transformers' load_balancing_loss_func."""

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixtune.data import IGNORE, collate, pack_examples
from mixtune.model import load_model
from mixtune.kernels import moe_route
from mixtune.model.modeling import load_balancing_loss


def _stats(logits, k, mask=None):
    """One layer's router statistics (RouterStats), the attention mask weighing its tokens."""
    return moe_route(logits, k, False, None if mask is None else mask.reshape(-1))[2]


def test_equals_transformers_with_and_without_a_mask():
    g = torch.Generator().manual_seed(0)
    B, T, E, k, L = 3, 7, 8, 2, 4
    logits = tuple(torch.randn(B * T, E, generator=g) for _ in range(L))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    stats = [_stats(x, k) for x in logits]
    masked = [_stats(x, k, mask) for x in logits]
    want = load_balancing_loss_func(logits, E, k, mask)
    torch.testing.assert_close(load_balancing_loss(masked, E), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(load_balancing_loss(stats, E), load_balancing_loss_func(logits, E, k, None),
                               rtol=1e-6, atol=1e-7)
    assert not torch.allclose(load_balancing_loss(stats, E), want)  # the mask matters here


def test_padding_does_not_change_the_models_aux_loss(tiny_ckpt, tiny_config):
    model = load_model(tiny_ckpt, quant="none", dtype=torch.float32, report=None)
    model.train()
    g = torch.Generator().manual_seed(1)
    exs = []
    for n in (9, 6, 11):
        ids = [1] + torch.randint(3, tiny_config.vocab_size, (n - 1,), generator=g).tolist()
        exs.append((ids, [IGNORE] * 3 + ids[3:]))
    rows = [{"input_ids": torch.tensor(i), "labels": torch.tensor(l), "position_ids": torch.arange(len(i))}
            for i, l in exs]

    def aux(batch):
        with torch.no_grad():
            return model(batch["input_ids"], batch["position_ids"], batch["labels"], return_logits=False,
                         attention_mask=batch.get("attention_mask")).aux_loss

    exact, _ = pack_examples(exs, 26, pad_id=0)  # all three in one row of exactly 26 tokens: no padding at all
    assert len(exact) == 1 and collate(exact)["attention_mask"].all()
    base = aux(collate(exact))
    right = collate(rows)  # right-padded to the longest (11)
    assert right["attention_mask"].sum() == 26 and right["attention_mask"][1, 6:].eq(0).all()
    torch.testing.assert_close(aux(right), base, rtol=1e-5, atol=1e-6)
    tails = collate([_padded(r, 25) for r in rows])  # a packer-style tail of 14-19 padding tokens per row
    assert tails["attention_mask"].sum() == 26
    torch.testing.assert_close(aux(tails), base, rtol=1e-5, atol=1e-6)
    packed, _ = pack_examples(exs, 40, pad_id=0)  # the packer's own row tails
    pb = collate(packed)
    assert pb["attention_mask"].sum() == 26 and pb["input_ids"].numel() > 26
    torch.testing.assert_close(aux(pb), base, rtol=1e-5, atol=1e-6)
    unmasked = aux({k: v for k, v in tails.items() if k != "attention_mask"})
    assert not torch.allclose(unmasked, base, rtol=1e-4)  # counting the padding would change it


def _padded(row, T):
    n = len(row["input_ids"])
    return {"input_ids": torch.cat([row["input_ids"], torch.zeros(T - n, dtype=torch.long)]),
            "labels": torch.cat([row["labels"], torch.full((T - n,), IGNORE)]),
            "position_ids": torch.cat([row["position_ids"], torch.arange(T - n)])}
