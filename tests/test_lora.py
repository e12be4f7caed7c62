"""LoRA: injection by name, B=0 is a no-op, gradients reach every adapter (experts and router included), the
base stays frozen, the recipe's counts on Mixtral-8x7B, PEFT-format files that stock peft loads onto stock
transformers with our logits, and mixtune's own round trip."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from mixtune.config import ConfigError, LoraConfig
from mixtune.lora import (LoRALinear, adapter_state_dict, apply_lora, load_adapter, lora_parameters,
                          save_adapter)
from mixtune.model import MIXTRAL_8X7B_CONFIG, NF4Linear
from mixtune.model import build_model_on_meta, load_model
from mixtune.quant.nf4 import NF4Weight

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head", "gate", "experts"]
RECIPE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _ids(vocab: int, B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fp32_model_factory(tiny_ckpt):
    def make(quant="none"):
        return load_model(tiny_ckpt, quant=quant, dtype=torch.float32, report=None)
    return make


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_zero_b_changes_no_logit(fp32_model_factory, tiny_config, quant):
    model = fp32_model_factory(quant)
    ids = _ids(tiny_config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
    rep = apply_lora(model, LoraConfig(r=4, alpha=8, targets=ALL), seed=0)
    assert rep.adapted == ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head", "gate", "w1", "w2", "w3"]
    assert not rep.unmatched
    if quant == "nf4":
        assert isinstance(model.model.layers[0].self_attn.q_proj.base, NF4Linear)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)


def test_grads_reach_every_adapter_and_base_stays_frozen(fp32_model_factory, tiny_config):
    model = fp32_model_factory("nf4")
    rep = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets=ALL), seed=0)
    model.train()
    routed = {}

    def hook(layer_idx):
        def fn(_mod, _inp, out):
            routed[layer_idx] = out[1].counts.detach()  # (E,) top-k assignments per expert (RouterStats)
        return fn

    for l, layer in enumerate(model.model.layers):
        layer.block_sparse_moe.register_forward_hook(hook(l))
    ids = _ids(tiny_config.vocab_size, B=2, T=32)
    params = lora_parameters(model)
    assert sum(p.numel() for p in params) == rep.trainable_params
    opt = torch.optim.AdamW(params, lr=1e-2)

    out = model(ids, labels=ids)
    out.loss.backward()
    # base frozen: no base parameter wants or got a gradient; NF4 buffers never do
    adapter_ids = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) not in adapter_ids:
            assert not p.requires_grad and p.grad is None, name
    for name, b in model.named_buffers():
        assert b.grad is None, name
    assert any(isinstance(m, NF4Weight) for m in model.modules())
    # B gets a gradient everywhere (A's is exactly zero while B = 0)
    n_lin = 0
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            n_lin += 1
            assert mod.lora_B.grad is not None and mod.lora_B.grad.abs().sum() > 0, name
            assert mod.lora_A.grad.abs().sum() == 0, name
    assert n_lin == 4 * 2 + 2 + 1  # attention x layers, router x layers, lm_head
    for l, layer in enumerate(model.model.layers):
        lora = layer.block_sparse_moe.experts.lora
        got = set(routed[l].nonzero().flatten().tolist())  # the experts that received tokens
        assert got, "no expert received tokens"
        for w in ("w1", "w2", "w3"):
            g = lora.B[w].grad  # (E, out, r)
            for e in range(lora.num_experts):
                nz = bool(g[e].abs().sum() > 0)
                assert nz == (e in got), (l, w, e)
    opt.step()
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            assert mod.lora_A.grad.abs().sum() > 0, name
    for l, layer in enumerate(model.model.layers):
        lora = layer.block_sparse_moe.experts.lora
        for w in ("w1", "w2", "w3"):
            for e in routed[l].nonzero().flatten().tolist():
                assert lora.A[w].grad[e].abs().sum() > 0, (l, w, e)


def test_same_seed_same_adapter(tiny_config):
    from mixtune.model import MixtralForCausalLM

    def make(seed):
        m = MixtralForCausalLM(tiny_config)
        m.init_weights(0)
        apply_lora(m, LoraConfig(r=4, alpha=8, targets=ALL), seed=seed)
        return adapter_state_dict(m)

    a, b, c = make(3), make(3), make(4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_recipe_count_on_mixtral_8x7b(caplog, quant):
    model = build_model_on_meta(MIXTRAL_8X7B_CONFIG, quant=quant)
    with caplog.at_level(logging.WARNING, logger="mixtune.lora"):
        rep = apply_lora(model, LoraConfig(r=64, alpha=16, dropout=0.1, targets=RECIPE), seed=0)
    assert rep.trainable_params == 56836096
    assert rep.peft_all_params == 23539437568
    assert rep.peft_line().startswith("trainable params: 56836096 || all params: 23539437568")
    assert rep.total_params == 46_440_382_464 + 262_410_240 + 56836096
    assert rep.unmatched == ["gate_proj", "up_proj", "down_proj"]
    assert rep.matched == {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 32, "lm_head": 1}
    text = caplog.text
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"'{name}' matches no module" in text
    assert "w1 (gate_proj), w3 (up_proj), w2 (down_proj)" in text


def test_unmatched_target_strict_and_nothing_matched(tiny_config):
    from mixtune.model import MixtralForCausalLM

    with torch.device("meta"):
        m = MixtralForCausalLM(tiny_config)
    with pytest.raises(ConfigError, match="'up_proj' matches no module.*w3 \\(up_proj\\)"):
        apply_lora(m, LoraConfig(targets=["q_proj", "up_proj"], strict_targets=True), seed=0)
    with pytest.raises(ConfigError, match="none of qproj,mlp"):
        apply_lora(m, LoraConfig(targets=["qproj", "mlp"]), seed=0)
    rep = apply_lora(m, LoraConfig(targets=["qproj", "router", r"model\.layers\.1\.self_attn\.v_proj"]), seed=0)
    assert rep.unmatched == ["qproj"] and "did you mean q_proj" in rep.messages[0]
    assert rep.matched == {"router": 2, r"model\.layers\.1\.self_attn\.v_proj": 1}
    assert isinstance(m.model.layers[1].self_attn.v_proj, LoRALinear)
    assert not isinstance(m.model.layers[0].self_attn.v_proj, LoRALinear)
    with torch.device("meta"):
        m2 = MixtralForCausalLM(tiny_config)
    rep = apply_lora(m2, LoraConfig(targets=["all-linear"]), seed=0)
    assert rep.adapted == ["q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"]


def _assert_all_expert_matrices(out, tiny_config, targets):
    """vLLM's pack_moe needs w1, w2 AND w3 for every expert: all three are written, the untrained ones as zeros,
    and the sidecar lists those so mixtune's own load skips them."""
    from safetensors.torch import load_file

    t = load_file(os.path.join(out, "adapter_model.safetensors"))
    side = json.load(open(os.path.join(out, "mixtune_adapter.json")))
    trained = [w for w in ("w1", "w2", "w3") if w in targets or "experts" in targets]
    assert sorted(side["zero_padding_targets"]) == sorted({"w1", "w2", "w3"} - set(trained))
    for l in range(tiny_config.num_hidden_layers):
        for e in range(tiny_config.num_local_experts):
            for w in ("w1", "w2", "w3"):
                key = f"base_model.model.model.layers.{l}.block_sparse_moe.experts.{e}.{w}.lora_"
                a, b = t[key + "A.weight"], t[key + "B.weight"]
                fin, fout = (tiny_config.intermediate_size, tiny_config.hidden_size) if w == "w2" else \
                    (tiny_config.hidden_size, tiny_config.intermediate_size)
                assert a.shape == (4, fin) and b.shape == (fout, 4)
                assert (a.abs().sum() == 0 and b.abs().sum() == 0) == (w not in trained)


def _peft_logits(ckpt, adapter_dir, ids, hf_model_from):
    import peft

    base = hf_model_from(ckpt, torch.float32)
    pm = peft.PeftModel.from_pretrained(base, adapter_dir)
    pm.eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits


@pytest.mark.parametrize("targets,dropout", [(ALL, 0.0), (["q_proj", "o_proj", "w1", "w2"], 0.1),
                                             (["q_proj", "w1"], 0.0)])
def test_stock_peft_loads_our_adapter(fp32_model_factory, tiny_ckpt, tiny_config, hf_model_from, tmp_path,
                                      targets, dropout, randomize_b):
    model = fp32_model_factory("none")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, targets=targets), seed=0)
    randomize_b(model)
    model.eval()
    ids = _ids(tiny_config.vocab_size)
    with torch.no_grad():
        ours = model(ids).logits
        plain = fp32_model_factory("none")(ids).logits
    out = str(tmp_path / "adapter")
    save_adapter(model, out, LoraConfig(r=4, alpha=8, dropout=dropout, targets=targets), tiny_ckpt)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_dropout"] == 0.0  # peft refuses dropout on the router / expert (parameter) targets
    _assert_all_expert_matrices(out, tiny_config, targets)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = _peft_logits(tiny_ckpt, out, ids, hf_model_from)
    missing = [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not missing, [str(w.message) for w in missing]
    effect = (ours - plain).abs().max()
    assert effect > 1e-2  # the adapter really changes the logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=2e-5)


def test_mixtune_round_trip_and_errors(fp32_model_factory, tiny_config, tmp_path, randomize_b):
    model = fp32_model_factory("nf4")
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.05, targets=["q_proj", "v_proj", "lm_head", "gate", "w3"])
    rep = apply_lora(model, lcfg, seed=0)
    randomize_b(model)
    out = str(tmp_path / "adapter")
    save_adapter(model, out, lcfg, "tiny", report=rep)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["target_modules"] == ["q_proj", "v_proj", "lm_head", "gate", "w1", "w2", "w3"]  # w1, w2: zeros
    model.eval()
    ids = _ids(tiny_config.vocab_size)
    with torch.no_grad():
        ours = model(ids).logits
    fresh = fp32_model_factory("nf4")
    rep2 = load_adapter(fresh, out)
    assert rep2.adapted == rep.adapted and rep2.trainable_params == rep.trainable_params
    assert fresh.model.layers[0].self_attn.q_proj.dropout.p == 0.05
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ours)
    sd1, sd2 = adapter_state_dict(model), adapter_state_dict(fresh)
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # saving again over the same directory replaces the files
    save_adapter(model, out, lcfg, "tiny")
    # without our sidecar (as a plain PEFT adapter): the zero w1/w2 padding loads as a zero adapter, same logits
    plain = str(tmp_path / "plain")
    import shutil
    shutil.copytree(out, plain)
    os.remove(os.path.join(plain, "mixtune_adapter.json"))
    fresh2 = fp32_model_factory("nf4")
    rep3 = load_adapter(fresh2, plain)
    assert rep3.adapted == ["q_proj", "v_proj", "lm_head", "gate", "w1", "w2", "w3"]
    fresh2.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh2(ids).logits, ours, rtol=0, atol=0)

    with pytest.raises(ConfigError, match="directory not found"):
        load_adapter(fp32_model_factory("none"), str(tmp_path / "nope"))
    # keys that match nothing in the model
    from safetensors.torch import load_file, save_file

    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    t = load_file(os.path.join(bad, "adapter_model.safetensors"))
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, tiny_config.hidden_size)
    save_file(t, os.path.join(bad, "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="match nothing in this model.*layers.7"):
        load_adapter(fp32_model_factory("none"), bad)
    # a base model of another shape
    from mixtune.model import MixtralForCausalLM, MixtralConfig

    other = MixtralConfig(**{**tiny_config.__dict__, "intermediate_size": 192, "extra": {}})
    with pytest.raises(ConfigError, match="has shape .* but the model expects"):
        load_adapter(MixtralForCausalLM(other), out)


def test_shared_gate_up_a_is_one_parameter_round_trips_and_stock_peft_agrees(
        fp32_model_factory, tiny_ckpt, tiny_config, hf_model_from, tmp_path, randomize_b):
    """lora.shared_gate_up_a: w1 and w3 share one A per expert (peft's fused gate_up_proj LoRA). The A is one
    parameter (counted, optimized and saved once per matrix key), training reaches it from both products, the
    PEFT files carry it under the w1 and w3 keys, and stock peft, mixtune's own loader (separate A's) and a
    shared model all give the same logits. A separately trained adapter does not load into a shared model."""
    from mixtune.lora.modules import ExpertLoRA
    from mixtune.lora.peft_format import set_adapter_state_dict

    c = tiny_config
    targets = ["q_proj", "experts"]
    sep = apply_lora(fp32_model_factory("none"), LoraConfig(r=4, alpha=8, targets=targets), seed=0)
    model = fp32_model_factory("none")
    lcfg = LoraConfig(r=4, alpha=8, targets=targets, shared_gate_up_a=True)
    rep = apply_lora(model, lcfg, seed=0)
    assert rep.trainable_params == sep.trainable_params - c.num_hidden_layers * c.num_local_experts * 4 * c.hidden_size
    params = lora_parameters(model)
    assert len({id(p) for p in params}) == len(params) and sum(p.numel() for p in params) == rep.trainable_params
    el = [m for m in model.modules() if isinstance(m, ExpertLoRA)]
    assert el and all(m.A["w3"] is m.A["w1"] and m.shared_gate_up_a for m in el)
    randomize_b(model)
    ids = _ids(c.vocab_size)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    ad = str(tmp_path / "shared")
    save_adapter(model, ad, lcfg, tiny_ckpt)
    from safetensors.torch import load_file
    t = load_file(os.path.join(ad, "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1.block_sparse_moe.experts.3"
    assert torch.equal(t[f"{pre}.w1.lora_A.weight"], t[f"{pre}.w3.lora_A.weight"])
    assert not torch.equal(t[f"{pre}.w1.lora_B.weight"], t[f"{pre}.w3.lora_B.weight"])
    fresh = fp32_model_factory("none")
    load_adapter(fresh, ad)  # separate A's, equal values
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ours, rtol=0, atol=0)
    torch.testing.assert_close(_peft_logits(tiny_ckpt, ad, ids, hf_model_from), ours, rtol=1e-5, atol=2e-5)
    # back into a shared model (resume): the same adapter
    again = fp32_model_factory("none")
    apply_lora(again, lcfg, seed=5)
    set_adapter_state_dict(again, t)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(again), params))
    # a separately trained adapter has different w1 / w3 A's: refused, naming the option
    sep_model = fp32_model_factory("none")
    apply_lora(sep_model, LoraConfig(r=4, alpha=8, targets=targets), seed=0)
    with pytest.raises(ConfigError, match="shared_gate_up_a"):
        set_adapter_state_dict(again, adapter_state_dict(sep_model))
