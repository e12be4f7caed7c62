"""Every MoE family against its stock transformers class, on tiny random checkpoints written by stock
`save_pretrained` (fp32, CPU): logits on packed rows, greedy generation, NF4 storage, PEFT adapters loaded by
stock peft, merged checkpoints loaded by stock transformers, parameter counts against peft's."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mixtune.config import LoraConfig, load_config
from mixtune.lora import apply_lora, save_adapter
from mixtune.model import CheckpointError, load_model, make_tiny_checkpoint
from mixtune.model.config import TINY_FAMILY_CONFIGS
from mixtune.model.modeling import KVCache
from mixtune.model.sampling import generate

FAMILIES = ["qwen3_moe", "olmoe", "qwen2_moe", "mixtral"]
EXPERTS = {"mixtral": "w1,w2,w3", "qwen3_moe": "gate_proj,up_proj,down_proj", "olmoe": "experts",
           "qwen2_moe": "experts"}


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _stock_class(fam):
    import transformers
    return getattr(transformers, TINY_FAMILY_CONFIGS[fam].family.architecture)


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    """(family, dir of a checkpoint written by stock save_pretrained, the stock model): norms and biases are
    random too, so every tensor matters; OLMoE also clips q/k/v."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    fam = request.param
    root = tmp_path_factory.mktemp(f"fam-{fam}")
    ours_dir = str(root / "ours")
    make_tiny_checkpoint(ours_dir, TINY_FAMILY_CONFIGS[fam], seed=0, shards=2, dtype=torch.float32,
                         tokenizer=False)
    if fam == "olmoe":
        with open(os.path.join(ours_dir, "config.json")) as fh:
            c = json.load(fh)
        c["clip_qkv"] = 0.6  # clamps a good share of q/k/v at this scale
        with open(os.path.join(ours_dir, "config.json"), "w") as fh:
            json.dump(c, fh)
    stock = _stock_class(fam).from_pretrained(ours_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1.0 * (name.endswith(".bias") is False) + 0.3 * torch.randn(p.shape, generator=g))
    stock_dir = str(root / "stock")
    stock.save_pretrained(stock_dir)
    return fam, stock_dir, stock


@pytest.fixture(scope="module")
def ours(family_ckpt):
    return load_model(family_ckpt[1], quant="none", dtype=torch.float32, report=None)


def test_config_round_trips_in_the_family_spelling(family_ckpt, ours):
    fam, path, stock = family_ckpt
    assert ours.config.model_type == fam
    hf = ours.config.to_hf_dict()
    assert hf["model_type"] == fam and hf["architectures"] == [stock.__class__.__name__]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert hf[key] == getattr(stock.config, key)


def test_packed_rows_equal_stock_on_separate_sequences(family_ckpt, ours):
    _, _, stock = family_ckpt
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 32000, (n,), generator=g) for n in (7, 11, 4)]
    row = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]  # restarts at 0 per example
    with torch.no_grad():
        packed = ours(row, position_ids=pos).logits[0]
        refs = torch.cat([stock(s[None]).logits[0] for s in seqs])
        batch = torch.randint(3, 32000, (2, 13), generator=g)
        assert rel_err(ours(batch).logits, stock(batch).logits) <= 1e-5
    assert rel_err(packed, refs) <= 1e-5


def test_loss_and_kv_cache(family_ckpt, ours):
    _, _, stock = family_ckpt
    ids = torch.randint(3, 32000, (2, 15), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels), stock(ids, labels=labels)
        assert abs(float(a.loss) - float(b.loss)) <= 1e-5 * float(b.loss)
        full = a.logits
        cache = KVCache(ours.config, 2, 32, ours.device, ours.dtype)
        parts = [ours(ids[:, :6], kv_cache=cache).logits]
        parts += [ours(ids[:, t:t + 1], kv_cache=cache).logits for t in range(6, 15)]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


def test_greedy_ids_equal_stock_generate(family_ckpt, ours):
    _, _, stock = family_ckpt
    prompt = [1, 415, 2936, 9060, 285, 1142, 28705]
    ids = generate(ours, [prompt], max_new_tokens=12, greedy=True, eos_id=-1)[0]
    with torch.no_grad():
        ref = stock.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert ids == ref


def test_nf4_equals_bitsandbytes_bit_for_bit(family_ckpt):
    import bitsandbytes.functional as bnbF
    from safetensors.torch import load_file
    from mixtune.model.layout import to_internal
    fam, path, _ = family_ckpt
    model = load_model(path, quant="nf4", dtype=torch.float32, report=None)
    sd = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    internal = to_internal(model.config)
    checked = 0
    for ckey, t in sd.items():
        key = internal[ckey]
        mod = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and mod.endswith(("q_proj", "o_proj")) and ".self_attn." in key:
            q, st = bnbF.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
            ref = bnbF.dequantize_4bit(q, st)
            assert torch.equal(model.get_submodule(mod).weight.dequantize(torch.float32), ref)
            checked += 1
    layer = next(l for l in model.model.layers if hasattr(l, "block_sparse_moe"))
    w2 = layer.block_sparse_moe.experts.w2
    idx = list(model.model.layers).index(layer)
    E = model.config.num_local_experts
    name = model.config.family.checkpoint_name_of_role("w2")
    moe = model.config.family.moe_module
    stack = torch.stack([sd[f"model.layers.{idx}.{moe}.experts.{e}.{name}.weight"] for e in range(E)])
    q, st = bnbF.quantize_4bit(stack, blocksize=64, compress_statistics=True, quant_type="nf4")
    # dequantized as rows of one 64-weight block: bitsandbytes' native CPU kernel (0.50.2, where it loads) is
    # wrong for rows shorter than a block (Qwen3's tiny w2 rows have 32), its quantization is not
    st.shape = torch.Size([stack.numel() // 64, 64])
    assert torch.equal(w2.dequantize(torch.float32), bnbF.dequantize_4bit(q, st).view(stack.shape))
    assert checked == 2 * model.config.num_hidden_layers


def _adapted(fam, path, targets, seed=3):
    model = load_model(path, quant="none", dtype=torch.float32, report=None)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=targets), seed=seed, warn=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _targets(fam):
    return ["attention", "router", EXPERTS[fam]] + (["shared_expert"] if fam == "qwen2_moe" else [])


def test_adapter_gives_our_logits_in_stock_peft(family_ckpt, tmp_path):
    from peft import PeftModel
    fam, path, _ = family_ckpt
    if fam == "qwen2_moe":
        pytest.xfail("peft 0.21 does not convert per-expert adapters onto transformers 5.x Qwen2-MoE experts "
                     "(its shared expert shares the names); see BENCHMARKS/README PEFT table")
    model = _adapted(fam, path, ["attention", EXPERTS[fam]])
    save_adapter(model, str(tmp_path / "ad"), LoraConfig(r=4, alpha=8, targets=["attention", "experts"]), path)
    ids = torch.randint(3, 32000, (2, 11), generator=torch.Generator().manual_seed(8))
    base = _stock_class(fam).from_pretrained(path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        ours_logits = model.eval()(ids).logits
        assert rel_err(peft_model(ids).logits, ours_logits) <= 1e-5


def test_merged_checkpoint_gives_adapter_logits_in_stock_transformers(family_ckpt, tmp_path):
    from mixtune.merge import merge_main
    fam, path, _ = family_ckpt
    targets = _targets(fam)
    model = _adapted(fam, path, targets)
    save_adapter(model, str(tmp_path / "ad"), LoraConfig(r=4, alpha=8, targets=targets), path)
    cfg = load_config(None, ["--model.name_or_path", path, "--merge.dtype", "float32"])
    merge_main(cfg, str(tmp_path / "ad"), str(tmp_path / "merged"))
    merged = _stock_class(fam).from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    ids = torch.randint(3, 32000, (2, 11), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, model.eval()(ids).logits) <= 1e-5
    # and mixtune reads its own merged output back as the same family
    again = load_model(str(tmp_path / "merged"), quant="none", dtype=torch.float32, report=None)
    assert again.config.model_type == fam


def test_trainable_counts_equal_peft_on_the_same_targets(family_ckpt):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    fam, path, stock = family_ckpt
    ours_model = load_model(path, quant="none", dtype=torch.float32, report=None)
    rep = apply_lora(ours_model, LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "lm_head"]), warn=False)
    pm = get_peft_model(_stock_class(fam).from_pretrained(path, dtype=torch.float32),
                        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "lm_head"]))
    assert rep.trainable_params == pm.get_nb_trainable_parameters()[0]
    # the down projections of every expert: peft's target_parameters over the fused (E, H, I) parameter
    down = "experts." + ("w2" if fam == "mixtral" else "down_proj")  # dotted: the experts', not a dense layer's
    ours_model = load_model(path, quant="none", dtype=torch.float32, report=None)
    rep = apply_lora(ours_model, LoraConfig(r=4, alpha=8, targets=[down]), warn=False)
    n_moe = sum(ours_model.config.is_moe_layer(l) for l in range(ours_model.config.num_hidden_layers))
    pm = get_peft_model(_stock_class(fam).from_pretrained(path, dtype=torch.float32),
                        PeftLoraConfig(r=4, lora_alpha=8, target_parameters=["experts.down_proj"]))
    assert pm.get_nb_trainable_parameters()[0] == rep.trainable_params
    c = ours_model.config
    assert rep.trainable_params == n_moe * c.num_local_experts * 4 * (c.intermediate_size + c.hidden_size)
    # gate and up with one shared A (lora.shared_gate_up_a) = peft's LoRA on the fused gate_up_proj
    gate_up = ["experts." + fam_role for fam_role in (("w1", "w3") if fam == "mixtral" else ("gate_proj", "up_proj"))]
    ours_model = load_model(path, quant="none", dtype=torch.float32, report=None)
    rep = apply_lora(ours_model, LoraConfig(r=4, alpha=8, targets=gate_up, shared_gate_up_a=True), warn=False)
    pm = get_peft_model(_stock_class(fam).from_pretrained(path, dtype=torch.float32),
                        PeftLoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj"]))
    assert pm.get_nb_trainable_parameters()[0] == rep.trainable_params
    assert rep.trainable_params == n_moe * c.num_local_experts * 4 * (2 * c.intermediate_size + c.hidden_size)


def test_family_target_names(family_ckpt):
    fam, path, _ = family_ckpt
    model = load_model(path, quant="none", dtype=torch.float32, report=None)
    rep = apply_lora(model, LoraConfig(r=2, alpha=2, targets=["gate_proj", "w9", "q_proj"]), warn=False)
    assert "w9" in rep.unmatched
    if fam == "mixtral":  # the recipe's Llama names match nothing on Mixtral, with the hint
        assert "gate_proj" in rep.unmatched and "w1 (gate_proj)" in rep.messages[0]
    else:  # Qwen/OLMoE: the experts' own name (and a dense layer's / shared expert's gate_proj)
        c = model.config
        n_moe = sum(c.is_moe_layer(l) for l in range(c.num_hidden_layers))
        n_dense = c.num_hidden_layers - n_moe + (n_moe if c.family.shared_expert else 0)
        assert rep.matched["gate_proj"] == n_moe * c.num_local_experts + n_dense


def test_unsupported_model_type_is_one_line(tmp_path):
    make_tiny_checkpoint(str(tmp_path), TINY_FAMILY_CONFIGS["olmoe"], tokenizer=False)
    with open(tmp_path / "config.json") as fh:
        c = json.load(fh)
    c["model_type"] = "deepseek_v3"
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(c, fh)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path), quant="none", report=None)
    msg = str(e.value)
    assert "deepseek_v3" in msg and "qwen3_moe" in msg and "olmoe" in msg and "\n" not in msg


@pytest.mark.parametrize("key,value,needle", [("num_experts", 6, "experts"), ("head_dim", 16, "disagree")])
def test_config_contradicting_the_weights_is_refused(tmp_path, key, value, needle):
    make_tiny_checkpoint(str(tmp_path), TINY_FAMILY_CONFIGS["qwen3_moe"], tokenizer=False)
    with open(tmp_path / "config.json") as fh:
        c = json.load(fh)
    c[key] = value
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(c, fh)
    with pytest.raises(CheckpointError, match=needle):
        load_model(str(tmp_path), quant="none", report=None)


def test_training_on_a_contradicting_checkpoint_writes_nothing(tmp_path):
    from mixtune import train
    from mixtune.config import ConfigError
    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(str(ckpt), TINY_FAMILY_CONFIGS["qwen3_moe"], tokenizer=True)
    with open(ckpt / "config.json") as fh:
        c = json.load(fh)
    c["moe_intermediate_size"] = 48  # the experts on disk are 32 wide
    with open(ckpt / "config.json", "w") as fh:
        json.dump(c, fh)
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    cfg = load_config(None, ["--model.name_or_path", str(ckpt), "--train.output_dir", str(run)])
    with pytest.raises(ConfigError, match="disagree"):
        train.main(cfg)
    assert sorted(os.listdir(run)) == ["keep.txt"]


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_tiny_default_of_each_family_trains_offline(family, tmp_path):
    from mixtune import train
    cfg = load_config(None, ["--model.family", family, "--train.output_dir", str(tmp_path / "run"), "--train.max_steps",
                             "4", "--train.eval_steps", "0", "--train.generate_after", "0", "--train.progress",
                             "false", "--train.tensorboard", "false", "--data.max_rows", "60"])
    r = train.main(cfg)
    assert r["steps"] == 4 and r["eval_loss"] < r["eval_loss_before"]
    from mixtune.lora import read_adapter
    acfg, tensors, _ = read_adapter(r["adapter"])
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert any(f".{moe}.experts.0.gate_proj.lora_A" in k for k in tensors)
