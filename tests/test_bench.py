"""`mixtune bench --cpu-tiny` end to end (numerics checks + timed tiny steps), its options, and the random
full-geometry builder on a tiny config."""

import json

import pytest
import torch

from mixtune import bench
from mixtune.model.config import MixtralConfig


def test_cpu_tiny_bench_runs_checks_and_prints_json(capsys):
    rc = bench.main(["--cpu-tiny"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[check] MoE layer" in out and "PASS" in out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is True and res["check"]["moe_pass"] and res["check"]["model_pass"]
    rows = res["rows"]
    assert [r["setting"] for r in rows] == ["grouped, ckpt=none", "reference, ckpt=all"]
    for r in rows:
        assert r["error"] == "" and r["tok_s"] > 0 and r["tflops6"] == pytest.approx(1.5 * r["tflops4"])
    # the memory planner's estimate rides along for the grouped row (the reference loop is not modelled)
    import math
    assert rows[0]["est_gib"] > 0 and math.isnan(rows[1]["est_gib"])
    # both paths train the same model from the same seed: same loss to bf16-ish accuracy
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-2)


def test_bad_settings_are_one_line_errors(capsys):
    assert bench.main(["--cpu-tiny", "--settings", "mb=2,bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert bench.main(["--stock", "mb=8,ckpt=1"]) == 2  # the stock stack runs from bench/ only
    assert "bench/train_throughput.py" in capsys.readouterr().err


def test_parse_settings_and_flop_accounting():
    s = bench.parse_settings("mb=8,ckpt=0;mb=16,accum=2,ckpt=32,backend=grouped_lowmem")
    base = dict(mb=8, accum=1, ckpt=0, backend="grouped", attn="auto", opt="adamw", actk=0, gqa=1, prec="bf16",
                dist="ddp", r=64, shared=0, nf4="", gmm=1)
    assert s == [base, dict(base, mb=16, accum=2, ckpt=32, backend="grouped_lowmem")]
    assert bench.parse_settings("attn=flex")[0]["attn"] == "flex"
    assert bench.parse_settings("shared=1,attn=varlen")[0] == dict(base, shared=1, attn="varlen")
    assert bench.parse_settings("opt=adamw_8bit,actk=1,gqa=0,prec=fp8,dist=fsdp,r=8")[0] == dict(
        base, opt="adamw_8bit", actk=1, gqa=0, prec="fp8", dist="fsdp", r=8)
    assert bench.parse_settings("nf4=words")[0] == dict(base, nf4="words")
    assert bench.parse_settings("gmm=0")[0] == dict(base, gmm=0)
    for bad, msg in (("r=0", "r must be >= 1"), ("dist=zero3", "dist must be ddp or fsdp"), ("rank=8", "unknown key"),
                     ("nf4=bytes", "nf4 must be words or blocks")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_settings(bad)
    full = MixtralConfig()
    # SPEC.md: about 12.75 B active matmul parameters per token for Mixtral-8x7B
    assert bench.active_params(full, 32) == pytest.approx(12.75e9, rel=0.01)
    assert bench.ckpt_label(0, 4) == "none" and bench.ckpt_label(4, 4) == "all" and bench.ckpt_label(3, 4) == "3/4"


def test_packed_batch_masks_example_starts():
    ids, lab, pos = bench.packed_batch(3, 64, 100, "cpu", seed=1, min_doc=8)
    assert ids.shape == lab.shape == pos.shape == (3, 64)
    starts = pos == 0
    assert starts[:, 0].all() and (lab[starts] == -100).all() and (lab[~starts] == ids[~starts]).all()


def test_random_nf4_model_builds_every_tensor():
    from mixtune.model.nf4 import NF4Linear, NF4Weight
    from mixtune.model.random_init import build_random_nf4_model
    cfg = MixtralConfig(**bench.TINY)
    m = build_random_nf4_model(cfg, device="cpu", seed=3)
    layer = m.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, NF4Linear)
    assert all(isinstance(getattr(layer.block_sparse_moe.experts, n), NF4Weight) for n in ("w1", "w2", "w3"))
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    w = layer.block_sparse_moe.experts.w2.dequantize(torch.float32)
    assert w.shape == (4, 128, 256) and 0.01 < w.std() < 0.03  # N(0, 0.02²) survives quantization
    m2 = build_random_nf4_model(cfg, device="cpu", seed=3)
    assert torch.equal(m2.model.layers[1].block_sparse_moe.experts.w1.packed,
                       m.model.layers[1].block_sparse_moe.experts.w1.packed)  # seeded
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = m(ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_unsloth_bench_dry_run_on_cpu(tmp_path):
    """bench/unsloth_bench.py --dry-cpu: everything but Unsloth itself (checkpoint in the real layout, the same
    LoRA through plain peft with the adapter-count check, the timing loop, and the document-masking check, which
    must find transformers' packed rows masked per example)."""
    import os
    import subprocess
    import sys

    from mixtune.data import load_tokenizer
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tok = tmp_path / "tok"
    load_tokenizer("").save_pretrained(str(tok))
    env = {**os.environ, "PYTHONPATH": os.path.join(root, "src")}
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "unsloth_bench.py"), "--dry-cpu",
                        "--tokenizer-dir", str(tok), "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ok"] is True and len(res["rows"]) == 3
    for r in res["rows"]:
        assert r["masking"]["verdict"] == "document-masked" and r["masking"]["packed"] < 1e-3
        assert r["masking"]["causal_reference"] > 1e-2  # the check can tell a leak


@pytest.mark.parametrize("argv, msg", [
    (["--steps", "-1"], "--steps: must be >= 1, got -1"),
    (["--cpu-tiny", "--warmup", "-2"], "--warmup: must be >= 0"),
    (["--seq", "0"], "--seq: must be >= 2"),
    (["--layers", "0"], "--layers: must be >= 1"),
    (["--settings", "mb=-1"], "--settings: mb must be >= 1"),
    (["--settings", "mb=x"], "--settings: mb='x'"),
    (["--cpu-tiny", "--device", "cuda"], "cannot be combined with --device cuda"),
])
def test_bad_numbers_are_one_line_errors(capsys, argv, msg):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_gpu_sized_benchmark_is_refused_without_a_gpu(capsys, monkeypatch):
    """Without --cpu-tiny the benchmark is Mixtral-8x7B-sized: on a CPU it is refused at once, naming the
    small CPU mode (the issue: minutes and 9 GB of RSS before)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in ([], ["--device", "cpu"], ["--device", "cuda"]):
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert "--cpu-tiny" in err and len(err.strip().splitlines()) == 1, err
    from mixtune import cli
    assert cli.main(["bench", "--steps", "3"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_settings_with_another_lora_rank_rebuild_the_adapter():
    """r= in --settings: the model is rebuilt with that rank (the planner's estimate follows the adapter size);
    settings of one rank share one model."""
    cfg = MixtralConfig(**bench.TINY)
    rows = {"seq": 32, "out": []}
    settings = bench.parse_settings("mb=1,r=4;mb=1,r=4,ckpt=2;mb=1,r=32")
    bench.run_settings(cfg, 2, settings, "cpu", 1, 0, rows, "tiny")
    a, b, c = rows["out"]
    assert [r.setting for r in rows["out"]] == ["grouped, ckpt=none, r=4", "grouped, ckpt=all, r=4",
                                                "grouped, ckpt=none, r=32"]
    assert a.build_s == b.build_s != c.build_s  # one build per rank
    assert c.est_gib > a.est_gib and all(r.loss == r.loss and not r.error for r in rows["out"])
