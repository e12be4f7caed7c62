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
    pc = _load("peer_common")  # the geometries and the adapter count, shared with bench/experts4bit_bench.py
    assert pc.expected_adapter_params(pc.QWEN3_GEOMETRY, 4)["total"] == 214_171_648
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
    tiny = dict(_load("peer_common").QWEN3_TINY)
    info = ub.write_checkpoint(str(work / "ckpt-qwen3-30b-a3b-L1-tiny"), tiny, 1, 0, str(tok), "cpu", "qwen3_moe")
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



# ---------------------------------------------------------- bench/experts4bit_bench.py (experts4bit-qlora 0.58.1)
def test_experts4bit_bench_settings_and_usage_errors(capsys):
    """--settings parsing and the usage errors (exit 2) need neither experts4bit-qlora nor a model."""
    eb = _load("experts4bit_bench")
    (a, b, c) = eb.parse_settings("mb=8;mb=16,accum=2;mb=8,ckpt=1,keep=all")
    assert (a["mb"], a["ckpt"], a["keep"], a["kernel"], a["attn4"], a["flat"]) == (8, 0, "0", "grouped", 1, 0)
    assert (b["mb"], b["accum"]) == (16, 2) and eb.group_key(a) == eb.group_key(b) != eb.group_key(c)
    assert "keep MoE all" in eb.label(c) and "fused grouped-nf4" in eb.label(a)
    for bad in ("mb=8,flat=1", "mb=8,keep=all", "mb=8,kernel=fast", "mb=0", "mb=8,ckpt=1,keep=all,kernel=reference"):
        with pytest.raises(ValueError):
            eb.parse_settings(bad)
    assert eb.main(["--dry-cpu", "--settings", "mb=8,keep=2"]) == 2
    assert "needs ckpt=1" in capsys.readouterr().err
    # the full geometries are mixtune's, and e4b's LoRA (one A for gate|up per expert) has peft's count
    model_type, g = eb.geometry("qwen3-30b-a3b", dry=False)
    assert model_type == "qwen3_moe" and g["num_local_experts"] == GEOMETRIES["qwen3-30b-a3b"].num_local_experts
    assert eb.pc.expected_adapter_params(g, 4)["total"] == 214_171_648
    assert eb.geometry("mixtral-8x7b", dry=True)[1]["intermediate_size"] % 64 == 0  # e4b's blocksize


@pytest.mark.parametrize("geometry,settings", [("qwen3-30b-a3b", "mb=8;mb=8,ckpt=1,keep=all"),
                                               ("mixtral-8x7b", "mb=16,attn4=0")])
def test_experts4bit_bench_dry_run_in_process(geometry, settings, capsys):
    """--dry-cpu: the tiny model built by the GPU code path (NF4 experts through e4b's Experts4bit + ExpertsLoRA, NF4
    q/k/v/o, fp32 LoRA), adapter count asserted, one step on e4b's reference expert path, document masking, and
    enable_fast_train patching every wrapper (no fused kernel runs on CPU). Needs experts4bit-qlora and
    grouped-nf4-gemm importable (e.g. PYTHONPATH=.whl/e4b), else skipped."""
    pytest.importorskip("experts4bit_qlora")
    pytest.importorskip("nf4_qlora")
    eb = _load("experts4bit_bench")
    rc = eb.main(["--dry-cpu", "--geometry", geometry, "--settings", settings, "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is True and res["layers"] == 1 and res["versions"]["experts4bit-qlora"]
    for row in res["rows"]:
        assert row["trainable"] == row["trainable_expected"] > 0 and row["lora_dtypes"] == ["torch.float32"]
        assert row["masking"]["verdict"] == "document-masked" and row["masking"]["causal_reference"] > 1e-2
        assert abs(row["loss_first"] - 6.24) < 0.6  # ~ln(512), the tiny vocabulary
        assert row.get("fast_train_patched") == 1
    builds = res["builds"]
    assert all(b["experts_nf4"] == 1 for b in builds.values())
    firsts = {eb.group_key(s): s for s in reversed(res["settings"])}  # the first setting of each model group
    assert sorted(b.get("attention_nf4", 0) for b in builds.values()) == sorted(4 * s["attn4"] for s in firsts.values())

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
