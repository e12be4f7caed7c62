"""`mixtune inspect` on a config.json alone (meta device): the reference recipe's counts on Mixtral-8x7B, its
unmatched expert names, and the memory estimate; then the real geometries of every family (Qwen3-30B-A3B,
OLMoE-1B-7B, Qwen2-57B-A14B, Mixtral-8x22B, and variants with dense layers / tied embeddings): total, active and
trainable counts, weight bytes and training-step peaks against arithmetic written out in this file, the published
totals, stock transformers' own count, and STACK.md's LoRA anchor."""

from __future__ import annotations

import json

import pytest
import torch

from mixtune.config import ConfigError, load_config
from mixtune.inspect_model import inspect_main
from mixtune.model import MIXTRAL_8X7B_CONFIG

RECIPE = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral-8x7b-config")
    MIXTRAL_8X7B_CONFIG.save(str(d))
    return str(d)


def test_inspect_json_recipe_count(config_only_dir, capsys):
    cfg = load_config(overrides=["--model.name_or_path", config_only_dir, "--lora.targets", RECIPE,
                                 "--lora.r", "64", "--lora.alpha", "16", "--lora.dropout", "0.1"])
    res = inspect_main(cfg, json_out=True)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj == json.loads(json.dumps(res))
    assert obj["trainable_params"] == 56836096
    assert obj["peft_all_params"] == 23539437568
    assert obj["total_params"] == 46_702_792_704 + 56836096
    assert obj["unmatched_targets"] == ["gate_proj", "up_proj", "down_proj"]
    assert "w1 (gate_proj)" in obj["unmatched_messages"][0]
    assert obj["matched_targets"]["lm_head"] == 1
    mem = obj["memory_bytes"]
    assert mem["adapter_fp32"] == 4 * 56836096 and mem["optimizer_adamw_fp32"] == 8 * 56836096
    assert mem["weights_bf16"] == 2 * 46_702_792_704
    # NF4: ~0.5 byte per quantized weight + 1/64 byte absmax (+ tiny second-level stats); rest bf16
    quantized = 32 * (41_943_040 + 3 * 8 * 4096 * 14336)
    dense = 46_702_792_704 - quantized
    stats2 = mem["weights_nf4"] - (quantized // 2 + quantized // 64 + 2 * dense)  # fp32 absmax2 + code2 tables
    assert 4 * (quantized // 64 // 256) <= stats2 < 4 * (quantized // 64 // 256) + 32 * 7 * (4 + 1024)


def test_inspect_text_with_experts(config_only_dir, capsys):
    cfg = load_config(overrides=["--model.name_or_path", config_only_dir, "--lora.targets", "q_proj,v_proj,experts",
                                 "--lora.r", "8"])
    res = inspect_main(cfg, json_out=False)
    out = capsys.readouterr().out
    assert "32 layers" in out and "experts 8" in out
    # q (4096x4096) and v (4096x1024) + three expert matrices of every expert, r=8
    per_layer = 8 * (8192 + 5120) + 8 * 8 * (3 * (4096 + 14336))
    assert res["trainable_params"] == 32 * per_layer
    assert f"{32 * per_layer:,}" in out
    assert res["unmatched_targets"] == []


def test_inspect_nothing_matches(config_only_dir):
    cfg = load_config(overrides=["--model.name_or_path", config_only_dir, "--lora.targets", "gate_proj,up_proj"])
    with pytest.raises(ConfigError, match="none of gate_proj,up_proj"):
        inspect_main(cfg, json_out=True)


def test_unmatched_target_warning_is_said_once(config_only_dir, capsys, caplog):
    """The report carries the warning (text: a WARNING line; JSON: unmatched_messages); it is not logged a
    second time."""
    cfg = load_config(overrides=["--model.name_or_path", config_only_dir, "--lora.targets", "q_proj,gate_proj"])
    with caplog.at_level("WARNING"):
        inspect_main(cfg, json_out=False)
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("'gate_proj' matches no module") == 1
    assert not [r for r in caplog.records if "gate_proj" in r.getMessage()]
    with caplog.at_level("WARNING"):
        inspect_main(cfg, json_out=True)
    obj = json.loads(capsys.readouterr().out.strip())
    assert len(obj["unmatched_messages"]) == 1 and "gate_proj" in obj["unmatched_messages"][0]
    assert not [r for r in caplog.records if "gate_proj" in r.getMessage()]


def test_inspect_estimates_the_training_peak_and_plans_a_budget(config_only_dir, capsys):
    over = ["--model.name_or_path", config_only_dir, "--lora.targets", "q_proj,k_proj,v_proj,o_proj,experts",
            "--lora.r", "64", "--train.per_device_train_batch_size", "8", "--data.max_seq_length", "1024",
            "--train.optim", "adamw_8bit"]
    res = inspect_main(load_config(overrides=over + ["--model.memory_budget_gib", "48"]), json_out=True)
    tp = res["training_peak"]
    peaks = [p["bytes"] for p in tp["policies"]]
    assert peaks == sorted(peaks, reverse=True)  # more recomputation, less memory
    assert [p["relative_work"] for p in tp["policies"]][0] == 1.0
    assert tp["plan"]["bytes"] <= 48 * 2**30 and tp["accum"] == 1  # train.gradient_accumulation_steps
    assert (tp["plan"]["full"], tp["plan"]["attention"], tp["plan"]["backend"]) != (0, False, "grouped")
    out = inspect_main(load_config(overrides=over + ["--model.memory_budget_gib", "10"]), json_out=False)
    assert "nothing fits 10.0 GiB" in out["training_peak"]["plan"]["error"]
    assert "estimated peak GPU memory of a training step" in capsys.readouterr().out


# ==================================================================================================
# Real geometries of every family, on the meta device: counts and memory against arithmetic written out here
# ==================================================================================================

# config.json as each checkpoint ships it on the Hub, in its family's own spelling (num_experts /
# moe_intermediate_size / qkv_bias ...; test_hub_spelling_is_what_stock_transformers_reads checks the names).
HUB_CONFIGS = {
    "Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304},
    "Qwen2-57B-A14B": {  # no qkv_bias key: Qwen2-MoE always had q/k/v biases (transformers' default: true)
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "qwen2_moe", "moe_intermediate_size": 2560, "norm_topk_prob": False,
        "num_attention_heads": 28, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "Mixtral-8x22B-v0.1": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.02, "intermediate_size": 16384,
        "max_position_embeddings": 65536, "model_type": "mixtral", "num_attention_heads": 48,
        "num_experts_per_tok": 2, "num_hidden_layers": 56, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32768},
}
# variants no published checkpoint has, for the paths the four above do not take: dense MLP layers, tied embeddings
HUB_CONFIGS["Qwen3-30B-A3B, layers 0 and 47 dense"] = dict(HUB_CONFIGS["Qwen3-30B-A3B"], mlp_only_layers=[0, 47])
HUB_CONFIGS["OLMoE-1B-7B, tied embeddings"] = dict(HUB_CONFIGS["OLMoE-1B-7B-0924"], tie_word_embeddings=True)
# published (total, active) parameters in billions: model cards / papers
PUBLISHED = {"Qwen3-30B-A3B": (30.5, 3.3), "OLMoE-1B-7B-0924": (6.9, 1.3), "Qwen2-57B-A14B": (57.4, 14.0),
             "Mixtral-8x22B-v0.1": (141.0, 39.0)}
# transformers 5.x config classes read these keys without declaring them as fields
UNDECLARED_OK = {"head_dim", "max_window_layers", "rope_scaling", "rope_theta", "torch_dtype"}
R, MB, SEQ = 64, 4, 1024  # LoRA rank; micro-batch x row length of the training-peak estimates


def geometry(d: dict) -> dict:
    """The numbers the counts depend on, read from a Hub config.json in its family's own spelling."""
    mt = d["model_type"]
    H, nh = d["hidden_size"], d["num_attention_heads"]
    g = {"H": H, "L": d["num_hidden_layers"], "V": d["vocab_size"], "k": d["num_experts_per_tok"], "nh": nh,
         "nkv": d.get("num_key_value_heads") or nh, "hd": d.get("head_dim") or H // nh,
         "tie": d.get("tie_word_embeddings", False)}
    if mt == "mixtral":
        g.update(E=d["num_local_experts"], I=d["intermediate_size"], Id=0)
    elif mt == "olmoe":
        g.update(E=d["num_experts"], I=d["intermediate_size"], Id=0)
    else:  # qwen3_moe / qwen2_moe: intermediate_size is the dense MLP's
        g.update(E=d["num_experts"], I=d["moe_intermediate_size"], Id=d["intermediate_size"])
    step, only = d.get("decoder_sparse_step") or 1, d.get("mlp_only_layers") or []
    g["moe"] = [l not in only and (l + 1) % step == 0 for l in range(g["L"])]
    g["Is"] = d.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0
    g["bias"] = mt == "qwen2_moe" and d.get("qkv_bias", True)  # on q, k, v (not o)
    g["qk_norm"] = {"qwen3_moe": "head", "olmoe": "proj"}.get(mt, "none")
    return g


def nf4_bytes(n: int) -> int:
    """One NF4 tensor of n weights: 4-bit codes, a uint8 absmax per 64, an fp32 absmax2 per 256 blocks, code2."""
    return n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4 * 256


def expected(g: dict, r: int = R) -> dict:
    """Counts and memory from the geometry alone, LoRA r on q/k/v/o + every expert's three matrices."""
    H, L, V, E, I, k, Is, Id = (g[x] for x in ("H", "L", "V", "E", "I", "k", "Is", "Id"))
    qd, kvd = g["nh"] * g["hd"], g["nkv"] * g["hd"]  # query / key-value widths (head_dim x heads, not H)
    attn_mats = [qd * H, kvd * H, kvd * H, H * qd]  # q, k, v, o
    attn = sum(attn_mats) + (qd + 2 * kvd if g["bias"] else 0)
    attn += {"head": 2 * g["hd"], "proj": qd + kvd, "none": 0}[g["qk_norm"]]  # q_norm + k_norm weights
    experts = E * 3 * H * I  # w1 (gate), w3 (up): I x H; w2 (down): H x I; per expert
    shared = 3 * H * Is + H if Is else 0  # shared SwiGLU + its (1 x H) sigmoid gate
    n_moe = sum(g["moe"])
    n_dense = L - n_moe
    base = {"embeddings": V * H, "lm_head": 0 if g["tie"] else V * H, "norms": 2 * H * L + H,
            "attention": attn * L, "router": E * H * n_moe, "experts": experts * n_moe,
            "shared_expert": shared * n_moe, "dense_mlp": 3 * H * Id * n_dense}
    total = sum(base.values())
    active = total - base["experts"] + k * 3 * H * I * n_moe  # k of the E routed experts per token
    lora_attn = r * ((H + qd) + 2 * (H + kvd) + (qd + H))  # A (r x in) + B (out x r) per projection
    lora_experts = E * 3 * r * (H + I)  # w1, w3: r (H + I); w2: r (I + H); every expert
    trainable = L * lora_attn + n_moe * lora_experts
    quantized = L * attn_mats + n_moe * [E * I * H] * 3 + n_moe * [Is * H] * 3 * bool(Is) + n_dense * [Id * H] * 3
    nf4 = sum(nf4_bytes(n) for n in quantized) + 2 * (total - sum(quantized))
    # the training-step peak (mixtune.memory_plan's accounting, bf16 activations, adamw_8bit, no dropout)
    T = MB * SEQ
    attn_kept = 2 * (2 * H + 2 * qd + 2 * kvd) + 4 * g["nh"] + 4 * r * 2  # norm in, normed x, q|k|v, o in, lse, LoRA
    attn_kept += {"head": 2 * (qd + kvd) + 4 * (g["nh"] + g["nkv"]), "proj": 2 * (qd + kvd) + 8, "none": 0}[
        g["qk_norm"]]  # q/k norm inputs + rstd per normed row
    # residual, normed x, the router's bf16 logits and top-k weights/ids, LoRA inner products, h13 (not the
    # expert outputs y since session 7: the routing weights' gradient comes from the SwiGLU backward)
    moe_kept = 2 * 2 * H + E * 2 + k * 12 + k * 3 * r * 2 + k * 2 * I * 2
    moe_kept += 2 * (4 * Is + H + 1) + 4 + 3 * r * 2 if Is else 0
    dense_kept = 2 * (2 * H + 4 * Id) + 3 * r * 2
    fixed = nf4 + trainable * 4 + trainable * 2.02  # fp32 adapter, 8-bit moments
    grads = trainable * 4  # fp32; accumulation 1: the top layer's (1/L) at the activation peak, all at the step
    # the loss: one reused bf16 logits buffer of the largest power-of-two rows <= 4096 within 1 GiB, + 4 (T x H)
    rows = 4096
    while rows * V * 2 > 2**30:
        rows //= 2
    loss = min(T, rows) * V * 2 + 4 * T * H * 2
    M = T * k
    phases = (M * ((H + r) * 2 + I * 2) + E * (H + r) * I * 2,  # w2: [dy|du2], dg, W2 with A2 rows
              M * (3 * I + 2 * r) * 2,  # SwiGLU: dg, [dh13|du13]
              M * ((2 * I + 2 * r) * 2 + H * 2) + E * (2 * I + 2 * r) * H * 2)  # w1|w3: [dh13|du13], dxs, W13+A13
    h13 = k * 2 * I * 2
    shared_t = Is * H * 2 + T * (3 * Is + H) * 2 if Is else 0

    def transient(moe, recomputed):  # one layer's backward (+ the layer output's gradient)
        if not moe:
            return Id * H * 2 + T * (3 * Id + H) * 2 + (T * (attn_kept + dense_kept - H * 2) if recomputed else 0) \
                + T * H * 2
        rebuilt = T * (attn_kept + moe_kept - H * 2) if recomputed else 0  # less the input the checkpoint keeps
        moe_t = max(phases[0] + rebuilt, phases[1] + rebuilt, phases[2] + rebuilt - (T * h13 if recomputed else 0),
                    shared_t + rebuilt if Is else 0)
        return moe_t + T * H * 2

    def peak(recomputed):
        """Accumulation 1: the loss; layer l's backward with the gradients of layers l..L-1 and the activations
        of layers 0..l; the optimizer step."""
        kept = [T * (H * 2 if recomputed else attn_kept + (moe_kept if m else dense_kept)) for m in g["moe"]]
        best = max(fixed + sum(kept) + loss, fixed + grads)
        for l in range(L):
            best = max(best, fixed + grads * (L - l) / L + sum(kept[:l + 1]) + transient(g["moe"][l], recomputed))
        return best

    peak_none, peak_full = peak(False), peak(True)
    return {"total": total, "active": active, "trainable": trainable, "by_part": base, "weights_nf4": nf4,
            "weights_bf16": 2 * total, "peak_none": peak_none, "peak_full": peak_full}


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    out = {}
    for name, d in HUB_CONFIGS.items():
        p = tmp_path_factory.mktemp("hub") / name.replace(" ", "_").replace(",", "")
        p.mkdir()
        (p / "config.json").write_text(json.dumps(d))
        out[name] = str(p)
    return out


def _inspect(path, *extra):
    over = ["--model.name_or_path", path, "--lora.targets", "q_proj,k_proj,v_proj,o_proj,experts", "--lora.r",
            str(R), "--lora.dropout", "0", "--train.per_device_train_batch_size", str(MB), "--data.max_seq_length",
            str(SEQ), "--train.optim", "adamw_8bit", *extra]
    return inspect_main(load_config(overrides=over), json_out=True)


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_real_geometry_counts_and_memory(name, hub_dirs, capsys):
    d = HUB_CONFIGS[name]
    g, want = geometry(d), expected(geometry(d))
    res = _inspect(hub_dirs[name])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(res))  # one JSON object, as returned
    assert res["family"] == d["model_type"]
    p = res["params"]
    assert p["by_part"] == want["by_part"]
    assert (p["total"], p["active"], p["trainable"]) == (want["total"], want["active"], want["trainable"])
    assert res["trainable_params"] == want["trainable"] and res["total_params"] == want["total"] + want["trainable"]
    mem = res["memory_bytes"]
    assert (mem["weights_nf4"], mem["weights_bf16"]) == (want["weights_nf4"], want["weights_bf16"])
    assert mem["adapter_fp32"] == 4 * want["trainable"] and mem["optimizer_adamw_fp32"] == 8 * want["trainable"]
    peaks = {row["policy"]: row["bytes"] for row in res["training_peak"]["policies"]}
    assert peaks["no recomputation, MoE backend grouped"] == pytest.approx(want["peak_none"], abs=2)
    assert peaks["every layer recomputed in backward, MoE backend grouped"] == pytest.approx(want["peak_full"], abs=2)
    # matched matrices: the attention projections of every layer, three per expert of every MoE layer
    n_moe = sum(g["moe"])
    assert res["matched_targets"] == {"q_proj": g["L"], "k_proj": g["L"], "v_proj": g["L"], "o_proj": g["L"],
                                      "experts": 3 * g["E"] * n_moe}
    if name in PUBLISHED:  # sanity: the arithmetic describes the published model
        total_b, active_b = PUBLISHED[name]
        assert abs(want["total"] / 1e9 - total_b) / total_b < 0.03, want["total"]
        assert abs(want["active"] / 1e9 - active_b) / active_b < 0.03, want["active"]


def test_real_geometry_published_numbers():
    """The derived counts, written down (billions): near each model card's total / active."""
    got = {n: (expected(geometry(HUB_CONFIGS[n]))["total"], expected(geometry(HUB_CONFIGS[n]))["active"])
           for n in PUBLISHED}
    assert got == {"Qwen3-30B-A3B": (30_532_122_624, 3_353_032_704),
                   "OLMoE-1B-7B-0924": (6_919_161_856, 1_282_017_280),
                   "Qwen2-57B-A14B": (57_408_658_944, 14_249_270_784),
                   "Mixtral-8x22B-v0.1": (140_630_071_296, 39_161_468_928)}


def test_hub_spelling_is_what_stock_transformers_reads(hub_dirs):
    """Every key is a field of the family's transformers config class (or one it reads without declaring), and
    stock transformers builds a model of the same total on the meta device."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
    for name, d in HUB_CONFIGS.items():
        cls = CONFIG_MAPPING[d["model_type"]]
        declared = {a for c in cls.__mro__ for a in getattr(c, "__annotations__", {})}
        assert set(d) - declared <= UNDECLARED_OK, (name, set(d) - declared - UNDECLARED_OK)
        stock = AutoConfig.from_pretrained(hub_dirs[name])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(stock)
        assert sum(p.numel() for p in model.parameters()) == expected(geometry(d))["total"], name


def test_stack_md_lora_anchor(tmp_path, capsys):
    """STACK.md's Qwen3-30B-A3B anchor: 4 of 48 layers, r=64 on q/k/v/o + all experts = 214,171,648 adapter
    parameters in peft's target_parameters layout, where gate and up share one A (the fused (E, 2I, H)
    gate_up_proj). mixtune's per-expert gate_proj/up_proj/down_proj adapters (the layout vLLM and peft's per-expert
    keys load) give gate and up an A each: r*E*H more per layer."""
    (tmp_path / "config.json").write_text(json.dumps(dict(HUB_CONFIGS["Qwen3-30B-A3B"], num_hidden_layers=4)))
    res = _inspect(str(tmp_path))
    capsys.readouterr()
    H, I, E, qd, kvd, r = 2048, 768, 128, 32 * 128, 4 * 128, 64
    attention = r * ((H + qd) + (H + kvd) + (H + kvd) + (qd + H))  # 1,114,112
    peft_fused = E * r * ((H + 2 * I) + (I + H))  # gate_up (E, 2I, H) + down (E, H, I): 52,428,800
    assert 4 * (attention + peft_fused) == 214_171_648
    assert res["trainable_params"] == 214_171_648 + 4 * r * E * H == 281_280_512
