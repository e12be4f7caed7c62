"""Our Mixtral vs stock transformers' MixtralForCausalLM on the tiny real-layout checkpoint (fp32, CPU)."""

import pytest
import torch

from mixtune.model import load_model
from mixtune.model.modeling import KVCache


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_model(tiny_ckpt, quant="none", dtype=torch.float32, report=None)


@pytest.fixture(scope="module")
def stock(tiny_ckpt, hf_model_from):
    return hf_model_from(tiny_ckpt)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_equal_stock_transformers(ours, stock, impl):
    ids = torch.randint(3, 32000, (2, 23), generator=torch.Generator().manual_seed(1))
    ours.attn_implementation = impl
    try:
        with torch.no_grad():
            a = ours(ids).logits
            b = stock(ids).logits
    finally:
        ours.attn_implementation = "sdpa"
    assert a.shape == b.shape == (2, 23, 32000)
    assert rel_err(a, b) <= 1e-5
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_packed_row_equals_separate_sequences(ours, stock):
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 32000, (n,), generator=g) for n in (7, 11, 4)]
    row = torch.cat(seqs)[None]  # (1, 22) three examples packed in one row
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]  # restarts at 0 per example
    with torch.no_grad():
        packed = ours(row, position_ids=pos).logits[0]
        refs = torch.cat([stock(s[None]).logits[0] for s in seqs])  # each example alone, stock model
        alone = torch.cat([ours(s[None]).logits[0] for s in seqs])
    assert rel_err(packed, refs) <= 1e-5
    assert rel_err(packed, alone) <= 1e-5
    # without the restart the later examples would see the earlier ones: the mask matters
    with torch.no_grad():
        unmasked = ours(row).logits[0]
    assert rel_err(unmasked[7:], refs[7:]) > 1e-3


def test_loss_equals_stock(ours, stock):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 32000, (2, 17), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        a = ours(ids, labels=labels)
        b = stock(ids, labels=labels)
    assert abs(float(a.loss) - float(b.loss)) <= 1e-5 * float(b.loss)
    assert int(a.n_tokens) == 2 * 12  # shifted: 16 targets, 4 masked


def test_kv_cache_decode_equals_full_forward(ours):
    ids = torch.randint(3, 32000, (2, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids).logits  # (2, 15, V)
        cache = KVCache(ours.config, 2, 32, ours.device, ours.dtype)
        parts = [ours(ids[:, :6], kv_cache=cache).logits]  # prefill 6
        parts.append(ours(ids[:, 6:9], kv_cache=cache).logits)  # a 3-token chunk after the cache
        for t in range(9, 15):  # then one token at a time
            parts.append(ours(ids[:, t:t + 1], kv_cache=cache).logits)
    assert cache.length == 15
    assert rel_err(torch.cat(parts, dim=1), full) <= 1e-5


def test_loads_a_checkpoint_saved_by_stock_transformers(stock, tmp_path):
    out = str(tmp_path / "hf-saved")
    stock.save_pretrained(out)  # transformers 5's own config.json (rope_parameters, dtype) and file layout
    model = load_model(out, quant="none", dtype=torch.float32, report=None)
    assert model.config.rope_theta == stock.config.rope_parameters["rope_theta"]
    ids = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(model(ids).logits, stock(ids).logits) <= 1e-5
