"""Merge: W + s·B·A in fp32 per matrix (per expert), written as an HF checkpoint that stock transformers loads
to the adapter model's logits; the "dequantized" base equals the NF4 weights training used plus the delta."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mixtune.config import ConfigError, LoraConfig, load_config
from mixtune.lora import ExpertLoRA, LoRALinear, apply_lora, load_adapter, merge_into_state_dict, save_adapter
from mixtune.merge import merge_main
from mixtune.model import checkpoint_files, iter_checkpoint, iter_model_state, load_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head", "gate", "experts"]


@pytest.fixture(scope="module")
def adapter(tiny_ckpt, tmp_path_factory, randomize_b):
    """(adapter dir, the fp32 adapter model, its logits on `ids`, the base logits, ids)."""
    model = load_model(tiny_ckpt, quant="none", dtype=torch.float32, report=None)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    lcfg = LoraConfig(r=4, alpha=8, targets=ALL)
    apply_lora(model, lcfg, seed=0)
    randomize_b(model, seed=5)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    d = str(tmp_path_factory.mktemp("merge") / "adapter")
    save_adapter(model, d, lcfg, tiny_ckpt)
    return d, model, logits, base, ids


def _cfg(ckpt, *extra):
    return load_config(overrides=["--model.name_or_path", ckpt, *extra])


def test_merged_fp32_loads_in_transformers_with_adapter_logits(adapter, tiny_ckpt, hf_model_from, tmp_path):
    adir, _, logits, base, ids = adapter
    out = str(tmp_path / "merged")
    res = merge_main(_cfg(tiny_ckpt, "--merge.dtype", "float32", "--merge.max_shard_size", "3MB"), adir, out)
    assert res["merged_matrices"] == 2 * (4 + 1 + 3 * 4) + 1 and res["dtype"] == "float32"
    files = checkpoint_files(out)
    assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert {k for ks in files.values() for k in ks} == {k for ks in checkpoint_files(tiny_ckpt).values() for k in ks}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    assert os.path.isfile(os.path.join(out, "tokenizer.model")) or os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".merge-")]  # no temp dirs left behind
    hf = hf_model_from(out, torch.float32)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    assert (logits - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, logits, rtol=1e-5, atol=2e-5)  # measured ~5e-7
    # merging again into the same (earlier-merge) directory replaces it
    merge_main(_cfg(tiny_ckpt, "--merge.dtype", "float32"), adir, out)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_merged_bf16_within_stated_tolerance(adapter, tiny_ckpt, hf_model_from, tmp_path):
    """merge.dtype auto = the checkpoint's bf16. Rounding W + ΔW to bf16 (8 bits of mantissa) is the only
    error. Stated tolerance: logits within 0.02 absolute of the fp32 adapter model and within 5% of the adapter's
    own effect (measured: ~0.0035 absolute, ~0.35% of an effect of ~1.0)."""
    adir, _, logits, base, ids = adapter
    out = str(tmp_path / "merged16")
    res = merge_main(_cfg(tiny_ckpt), adir, out)
    assert res["dtype"] == "bfloat16"
    for _, t in iter_checkpoint(out):
        assert t.dtype == torch.bfloat16
    hf = hf_model_from(out, torch.float32)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    err = (theirs - logits).abs().max()
    effect = (logits - base).abs().max()
    assert err < 0.02, float(err)
    assert err < 0.05 * effect, (float(err), float(effect))


def test_dequantized_base_equals_nf4_weights_plus_delta(adapter, tiny_ckpt, tmp_path):
    adir = adapter[0]
    out = str(tmp_path / "merged-deq")
    merge_main(_cfg(tiny_ckpt, "--merge.base", "dequantized", "--merge.dtype", "float32", "--model.dtype",
                    "float32", "--model.device", "cpu"), adir, out)
    merged = dict(iter_checkpoint(out))
    nf4 = load_model(tiny_ckpt, quant="nf4", dtype=torch.float32, report=None)
    expected = dict(iter_model_state(nf4, torch.float32))  # the dequantized weights training used
    load_adapter(nf4, adir)
    deltas = {}
    for name, mod in nf4.named_modules():
        if isinstance(mod, LoRALinear):
            deltas[f"{name}.weight"] = mod.delta_weight()
        elif isinstance(mod, ExpertLoRA):
            ex = name.rsplit(".", 1)[0]
            for w in mod.A:
                for e in range(mod.num_experts):
                    deltas[f"{ex}.{e}.{w}.weight"] = mod.delta_weight(w, e)
    assert merged.keys() == expected.keys()
    for key, w in expected.items():
        want = w + deltas[key] if key in deltas else w
        assert torch.equal(merged[key], want), key
    # and it is not the same as merging into the original weights
    orig = dict(iter_checkpoint(tiny_ckpt))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], orig[q].float() + deltas[q])


def test_merge_into_state_dict_is_fp32_then_cast():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    A, B = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    other = torch.randn(3, generator=g).to(torch.bfloat16)
    sd = {"model.layers.0.self_attn.q_proj.weight": W, "model.norm.weight": other}
    ad = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": A,
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": B}
    used = set()
    out = merge_into_state_dict(sd, ad, scaling=0.5, consumed=used)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], (W.float() + 0.5 * (B @ A)).to(torch.bfloat16))
    assert torch.equal(out["model.norm.weight"], other)
    assert used == {"model.layers.0.self_attn.q_proj.weight"}
    out32 = merge_into_state_dict(sd, ad, scaling=0.5, dtype=torch.float32)
    assert out32["model.norm.weight"].dtype == torch.float32


def test_merge_refuses_foreign_dir_and_bad_adapter(adapter, tiny_ckpt, tmp_path):
    adir = adapter[0]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier mixtune merge"):
        merge_main(_cfg(tiny_ckpt), adir, str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="directory not found"):
        merge_main(_cfg(tiny_ckpt), str(tmp_path / "no-adapter"), str(tmp_path / "out"))
