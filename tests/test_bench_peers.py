"""The benchmark peers of bench/ on the Qwen3-30B-A3B geometry as well as Mixtral's (issue 13): the stock stack
(bench/stock_stack.py: transformers + bitsandbytes 4-bit + peft) and bench/unsloth_bench.py's --dry-cpu path
(everything but Unsloth itself), on tiny CPU versions. In-process: no extra interpreter, nothing downloaded."""

import importlib.util
import json
import os
import sys

import pytest

from mixtune.bench import Row
from mixtune.model.config import GEOMETRIES, MoEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_STOCK = {
    "mixtral": MoEConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    # head_dim 32 with hidden 64 and 4 heads, as in the real model (head_dim independent of hidden / heads)
    "qwen3_moe": MoEConfig(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=32,
                           dense_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=4,
                           norm_topk_prob=True, rms_norm_eps=1e-6),
}


def test_stock_stack_adapter_counts_at_the_anchor_geometries():
    ss = _load("stock_stack")
    assert ss.expected_trainable(GEOMETRIES["qwen3-30b-a3b"], 4) == 214_171_648
    assert ss.expected_trainable(GEOMETRIES["mixtral-8x7b"], 4) == 111_673_344
    with pytest.raises(ValueError, match="olmoe"):
        ss.hf_model(GEOMETRIES["olmoe-1b-7b"], 1)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_stock_stack_trains_each_family_on_cpu(family):
    """run_stock builds the family's transformers model, 4-bit q/k/v/o, LoRA on attention and the fused experts
    (the adapter count is checked inside), and times a step: on CPU too."""
    ss = _load("stock_stack")
    cfg = TINY_STOCK[family]
    row = ss.run_stock(Row, cfg, 2, {"mb": 1, "ckpt": 0}, 128, "cpu", 1, 1)
    assert row.error == "", row.error
    assert family in row.setting and row.tok_s > 0 and 5.0 < row.loss < 7.5  # ~ln(512) = 6.24
    assert row.trainable == ss.expected_trainable(cfg, 2) > 0
    hc, cls = ss.hf_model(cfg, 2)
    assert cls.__name__ == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]
    if family == "qwen3_moe":
        assert (hc.num_experts, hc.moe_intermediate_size, hc.head_dim, hc.norm_topk_prob) == (8, 32, 32, True)


def test_unsloth_bench_geometries_match_mixtune_and_the_anchor_adapter_counts():
    ub = _load("unsloth_bench")
    for name in ("mixtral-8x7b", "qwen3-30b-a3b"):
        ub.check_geometry(name)  # equal to mixtune's GEOMETRIES[name]; LoRA count at 4 layers as measured
    assert ub.expected_adapter_params(ub.QWEN3_GEOMETRY, 4)["total"] == 214_171_648
    assert ub.build_parser().parse_args([]).geometry == "mixtral-8x7b"  # the default is unchanged


def test_unsloth_bench_qwen3_dry_run_in_process(tmp_path, monkeypatch, capsys):
    """--dry-cpu --geometry qwen3-30b-a3b: a tiny Qwen3MoeForCausalLM checkpoint with the real 151,936-row
    vocabulary next to the 32,000-piece Mixtral tokenizer loads, gets the LoRA (count checked), trains and is
    document-masked. The checkpoint is written in-process first (main() then reuses it instead of spawning the
    writer), so the test costs no interpreter start."""
    ub = _load("unsloth_bench")
    from mixtune.data import load_tokenizer
    tok = tmp_path / "tok"
    load_tokenizer("").save_pretrained(str(tok))
    work = tmp_path / "w"
    work.mkdir()
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS",
              "HF_HUB_DISABLE_TELEMETRY", "TOKENIZERS_PARALLELISM", "UNSLOTH_COMPILE_LOCATION", "HF_HOME",
              "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(k, raising=False)  # main() sets them; restored after the test
    info = ub.write_checkpoint(str(work / "ckpt-qwen3-30b-a3b-L1-tiny"), dict(ub.QWEN3_TINY), 1, 0, str(tok), "cpu",
                               "qwen3_moe")
    assert info["model_type"] == "qwen3_moe" and info["tokenizer_files"] >= 2
    rc = ub.main(["--dry-cpu", "--geometry", "qwen3-30b-a3b", "--tokenizer-dir", str(tok), "--workdir", str(work),
                  "--settings", "mb=1,ckpt=0", "--seq", "128"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is True and res["checkpoint"]["reused"] is True and res["model_type"] == "qwen3_moe"
    dry = res["dry"]
    assert dry["model_class"] == "Qwen3MoeForCausalLM" and dry["embedding_rows"] == 151_936
    assert dry["tokenizer_len"] == 32_000 and dry["trainable"] == dry["trainable_expected"]
    (row,) = res["rows"]
    assert row["masking"]["verdict"] == "document-masked" and row["masking"]["causal_reference"] > 1e-2
    assert abs(row["loss_first"] - 11.93) < 0.5  # ~ln(151936): the full vocabulary is in the model


def test_unsloth_bench_rejects_an_unknown_geometry(capsys):
    ub = _load("unsloth_bench")
    with pytest.raises(SystemExit):
        ub.main(["--dry-cpu", "--geometry", "olmoe-1b-7b"])
    assert "invalid choice" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
