"""The per-family presets (configs/*-qlora.yaml beyond Mixtral-8x7B): each loads, starts with the command that runs
it, names its family's checkpoint, chat format and targets, and goes through `mixtune inspect` on a meta model of
its checkpoint's real geometry (a config.json the test writes: nothing is downloaded) — every target matches, and
the recomputation plan fits the preset's memory_budget_gib."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from mixtune.config import load_config
from mixtune.inspect_model import inspect_main
from mixtune.memory_plan import GiB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hub_configs() -> dict:
    """The real-geometry config.json dicts of tests/test_inspect.py (one definition, loaded by path)."""
    spec = importlib.util.spec_from_file_location("_inspect_geometries", os.path.join(ROOT, "tests", "test_inspect.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HUB_CONFIGS


HUB = _hub_configs()
# preset -> (Hub id it trains, the geometry's name in HUB, data.template, model.tokenizer)
PRESETS = {
    "qwen3-30b-a3b-qlora.yaml": ("Qwen/Qwen3-30B-A3B", "Qwen3-30B-A3B", "chat-template", ""),
    "olmoe-1b-7b-qlora.yaml": ("allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B-0924", "alpaca", ""),
    "mixtral-8x22b-qlora.yaml": ("mistralai/Mixtral-8x22B-v0.1", "Mixtral-8x22B-v0.1", "mixtral-v3-chat",
                                 "mistral-common:v3"),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_family_preset_through_inspect(preset, tmp_path, capsys):
    hub_id, geometry, template, tokenizer = PRESETS[preset]
    path = os.path.join(ROOT, "configs", preset)
    with open(path) as fh:
        assert fh.readline().strip() == f"# mixtune train configs/{preset}"
    cfg = load_config(path)
    assert cfg.model.name_or_path == hub_id and cfg.model.quant == "nf4"
    assert (cfg.data.template, cfg.model.tokenizer) == (template, tokenizer)
    assert cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "experts"] and cfg.lora.strict_targets
    assert cfg.model.memory_budget_gib > 0 and cfg.data.packing and not cfg.data.train_on_prompt
    # the same preset on a meta model of the checkpoint's geometry
    (tmp_path / "config.json").write_text(json.dumps(HUB[geometry]))
    cfg = load_config(path, ["--model.name_or_path", str(tmp_path)])
    res = inspect_main(cfg, json_out=True)
    capsys.readouterr()
    assert res["family"] == HUB[geometry]["model_type"]
    assert res["unmatched_targets"] == [] and res["trainable_params"] > 0
    a = res["architecture"]
    assert res["matched_targets"]["experts"] == 3 * a["experts"] * (a["layers"] - len(a["dense_layers"]))
    plan = res["training_peak"]["plan"]
    assert "error" not in plan and plan["bytes"] <= cfg.model.memory_budget_gib * GiB
