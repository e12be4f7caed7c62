"""`mixtune inspect` on a config.json alone (meta device): the reference recipe's counts on Mixtral-8x7B, its
unmatched expert names, and the memory estimate."""

from __future__ import annotations

import json

import pytest

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
    assert tp["plan"]["bytes"] <= 48 * 2**30 and tp["plan"]["backend"] == "grouped_lowmem"
    out = inspect_main(load_config(overrides=over + ["--model.memory_budget_gib", "10"]), json_out=False)
    assert "nothing fits 10.0 GiB" in out["training_peak"]["plan"]["error"]
    assert "estimated peak GPU memory of a training step" in capsys.readouterr().out
