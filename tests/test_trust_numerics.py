"""Numerics that must not be trusted blindly (issue 11): a diverged run stops (naming the step, with no
non-finite adapter anywhere on disk), a skipped step keeps resume exact, every rank takes the same decision, a
collapsed model is reported, and eval / merge / generate refuse an adapter with non-finite tensors or with an
r / alpha that does not describe its tensors (peft's rank_pattern / alpha_pattern included)."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtune import cli, train
from mixtune.config import ConfigError, LoraConfig, load_config
from mixtune.loop import checkpoint as ckpt
from mixtune.loop import step as loop_step
from mixtune.loop.report import read_metrics
from mixtune.loop.step import DivergenceGuard, TrainingDiverged

FAST = ["--train.max_steps", "6", "--train.save_steps", "2", "--train.eval_steps", "0",
        "--train.generate_after", "0", "--train.tensorboard", "false", "--train.progress", "false",
        "--train.logging_steps", "1", "--data.max_seq_length", "64", "--train.per_device_train_batch_size", "2",
        "--lora.r", "4"]


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _nonfinite_tensors(root) -> list[str]:
    """Every safetensors file under root -> the names of its tensors holding a nan / inf."""
    bad = []
    for f in glob.glob(os.path.join(str(root), "**", "*.safetensors"), recursive=True):
        bad += [f"{f}:{k}" for k, t in load_file(f).items() if t.is_floating_point() and not torch.isfinite(t).all()]
    return bad


# ------------------------------------------------------------------------------------------ divergence guard
def test_lr_1e30_stops_naming_the_step_and_writes_no_nonfinite_adapter(capsys, tmp_path):
    out = tmp_path / "run"
    argv = [a if a != "2" or prev != "--train.save_steps" else "1" for prev, a in zip([""] + FAST, FAST)]
    rc, _, err = _run(capsys, ["train", *argv, "--train.learning_rate", "1e30", "--train.output_dir", str(out)])
    assert rc == 2, err
    line = [l for l in err.splitlines() if l.startswith("mixtune: error:")]
    assert len(line) == 1 and "Traceback" not in err, err
    # step 1 updates with lr 5e29 (finite weights); steps 2-4 give a non-finite loss: skipped, then the stop
    assert "training diverged at step 4" in line[0] and "steps 2-4" in line[0], line[0]
    assert "train.max_bad_steps" in line[0] and str(out / "checkpoints" / "step-1") in line[0]
    assert not (out / "adapter").exists()  # no final adapter from a diverged run
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1]  # the last good checkpoint stays
    assert _nonfinite_tensors(out) == []
    recs = read_metrics(str(out / "metrics.jsonl"))
    skipped = [r for r in recs if r["kind"] == "skipped"]
    assert [r["step"] for r in skipped] == [2, 3, 4] and [r["in_a_row"] for r in skipped] == [1, 2, 3]
    assert "loss" in skipped[0]["nonfinite"]


def _poisoned_forward_backward(monkeypatch, bad_steps, first_step, snaps):
    """fit's forward_backward, except that steps in `bad_steps` return a nan loss and nan gradients; `snaps`
    gets a copy of the trainable parameters as each step starts."""
    real = loop_step.forward_backward
    state = {"step": first_step}

    def fb(model, batches, *a, **k):
        state["step"] += 1
        snaps[state["step"]] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        res = real(model, batches, *a, **k)
        if state["step"] in bad_steps:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return (float("nan"),) + tuple(res[1:])
        return res

    monkeypatch.setattr("mixtune.loop.fit.forward_backward", fb)


def test_skipped_steps_update_nothing_and_resume_stays_exact(monkeypatch, tmp_path):
    """Steps 3 and 4 non-finite (2 < max_bad_steps 3): no update, no checkpoint right after them, the lr
    schedule still advances; resumed from step 2, the run ends with the uninterrupted adapter."""
    from mixtune.loop import schedule

    full, snaps = tmp_path / "full", {}
    _poisoned_forward_backward(monkeypatch, {3, 4}, 0, snaps)
    result = train.main(load_config(None, FAST + ["--train.output_dir", str(full)]))
    assert result["steps"] == 6
    for a, b in zip(snaps[3], snaps[5]):  # the weights step 5 starts from are those step 3 started from
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(snaps[2], snaps[3]))  # step 2 did update
    assert [s for s, _ in ckpt.list_checkpoints(str(full))] == [2, 6]  # no step-4 checkpoint: it was skipped
    recs = read_metrics(str(full / "metrics.jsonl"))
    skipped = [r for r in recs if r["kind"] == "skipped"]
    assert [(r["step"], r["in_a_row"], r["skipped_steps"]) for r in skipped] == [(3, 1, 1), (4, 2, 2)]
    cfg = load_config(None, FAST)
    f = schedule.lr_lambda(cfg.train.lr_scheduler_type, schedule.warmup_steps(cfg, 6), 6)
    lrs = {r["step"]: r["lr"] for r in recs if r["kind"] in ("train", "skipped")}
    assert lrs == pytest.approx({s: cfg.train.learning_rate * f(s - 1) for s in range(1, 7)})
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 5, 6]
    report = (full / "report.md").read_text()
    assert "skipped steps (non-finite loss or gradient) | 2" in report
    assert _nonfinite_tensors(full) == []

    # the same run cut after its step-2 checkpoint (as a kill during steps 3-6 leaves it), then resumed
    import shutil
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-6")
    shutil.rmtree(part / "adapter")
    _poisoned_forward_backward(monkeypatch, {3, 4}, 2, {})  # resumed after step 2: steps 3, 4 bad again
    train.main(load_config(None, FAST + ["--train.output_dir", str(part), "--train.resume", "auto"]))
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    recs = read_metrics(str(part / "metrics.jsonl"))
    assert [r["step"] for r in recs if r["kind"] == "skipped"] == [3, 4]  # logged once, not twice
    assert "skipped steps (non-finite loss or gradient) | 2" in (part / "report.md").read_text()


def test_guard_counts_streaks_and_reports_a_collapse():
    g = DivergenceGuard(2, vocab_size=32000)
    assert DivergenceGuard.is_bad(float("nan"), 0.0, 1.0) and DivergenceGuard.is_bad(1.0, float("inf"), 1.0)
    assert DivergenceGuard.is_bad(1.0, 0.0, float("nan")) and not DivergenceGuard.is_bad(1.0, 0.0, 0.0)
    rec = g.bad(3, 1.0, 0.0, float("inf"), 1e-3)
    assert rec["nonfinite"] == ["gradient norm"] and not g.stop
    assert g.good(4, 2.0, 0.5) is None and g.in_a_row == []  # a good step ends the streak
    g.bad(5, float("nan"), 0.0, 1.0, 1e-3)
    g.bad(6, float("nan"), 0.0, 1.0, 1e-3)
    assert g.stop
    err = g.diverged(1e-3, "/runs/x/checkpoints/step-4")
    assert isinstance(err, ValueError) and "step 6" in str(err) and "steps 5-6" in str(err)
    assert "/runs/x/checkpoints/step-4" in str(err) and "\n" not in str(err)
    assert g.notes() == {"skipped steps (non-finite loss or gradient)": 3}

    c = DivergenceGuard(3, vocab_size=32000)
    msgs = [c.good(s, math.log(32000), 0.0) for s in range(3, 8)]
    assert msgs[:2] == [None, None] and msgs[3:] == [None, None]  # said once
    assert "collapsed at step 3" in msgs[2] and "ln(vocab 32000)" in msgs[2]
    assert "collapsed at step 3" in c.notes()["warning"]
    resumed = DivergenceGuard(3, 32000, c.history())  # a resumed run reports the same
    assert resumed.notes() == c.notes()
    assert DivergenceGuard(3).good(1, 0.0, 0.0) is None  # nothing to learn (zero loss) is not a collapse


def test_lr_1e3_collapse_is_warned_and_reported(capsys, tmp_path):
    out = tmp_path / "run"
    train.main(load_config(None, FAST + ["--train.learning_rate", "1e3", "--train.output_dir", str(out)]))
    err = capsys.readouterr().err
    warn = [l for l in err.splitlines() if "collapsed" in l]
    assert len(warn) == 1 and warn[0].startswith("mixtune: warning:") and "gradient norm 0" in warn[0], err
    assert "the model collapsed at step" in (out / "report.md").read_text()
    assert any(r["kind"] == "warning" for r in read_metrics(str(out / "metrics.jsonl")))


def test_an_update_that_overflows_the_adapter_stops_at_once(monkeypatch, tmp_path):
    """Finite loss and gradients, but the update leaves an inf in a parameter: stop at that step."""
    real = loop_step.optimizer_step

    def overflowing(params, *a, **k):
        lr = real(params, *a, **k)
        with torch.no_grad():
            params[0].view(-1)[0] = float("inf")
        return lr

    monkeypatch.setattr("mixtune.loop.fit.optimizer_step", overflowing)
    with pytest.raises(TrainingDiverged, match="training diverged at step 1: its update made adapter"):
        train.main(load_config(None, FAST + ["--train.output_dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run" / "adapter").exists() and not ckpt.list_checkpoints(str(tmp_path / "run"))


RANKS_SCRIPT = """
import json, torch
from mixtune.distributed import setup
from mixtune.loop.step import DivergenceGuard, reduce_step
dist, _ = setup(torch.device("cpu"))
p = torch.nn.Parameter(torch.zeros(4))
decisions = []
for case in ("loss nan on rank 1", "grad inf on rank 0", "all finite"):
    p.grad = torch.ones(4)
    loss = float("nan") if (case.startswith("loss") and dist.rank == 1) else 1.0
    if case.startswith("grad") and dist.rank == 0:
        p.grad[0] = float("inf")
    loss, aux, n_in, _, g = reduce_step(dist, [p], loss, 0.0, 10)
    decisions.append([DivergenceGuard.is_bad(loss, aux, g), n_in])
import os, sys
with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as fh:  # one file a rank: no interleaving
    json.dump({"rank": dist.rank, "decisions": decisions}, fh)
dist.close()
"""


@pytest.mark.torchrun
def test_every_rank_takes_the_same_skip_decision(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in res) == [0, 1]
    for r in res:  # one rank's nan loss / inf gradient makes every rank skip; input tokens summed
        assert r["decisions"] == [[True, 20], [True, 20], [False, 20]], res


# ------------------------------------------------------------------------------------------ adapters on disk
@pytest.fixture(scope="module")
def adapter16(tiny_ckpt, tmp_path_factory, randomize_b):
    """An r=16 alpha=16 adapter on q_proj / v_proj of the tiny model with non-zero B (the path)."""
    from mixtune.lora import apply_lora, save_adapter
    from mixtune.model import load_model

    model = load_model(tiny_ckpt, quant="none", dtype=torch.float32, report=None)
    lcfg = LoraConfig(r=16, alpha=16, targets=["q_proj", "v_proj"])
    apply_lora(model, lcfg, seed=0)
    randomize_b(model)
    d = str(tmp_path_factory.mktemp("ad16") / "adapter")
    save_adapter(model, d, lcfg, tiny_ckpt)
    return d


def _copy_adapter(src, dst, *, config=None, tensors=None, sidecar=True):
    import shutil
    shutil.copytree(src, dst)
    if config is not None:
        path = os.path.join(dst, "adapter_config.json")
        with open(path) as fh:
            c = json.load(fh)
        c.update(config)
        with open(path, "w") as fh:
            json.dump(c, fh)
    if tensors is not None:
        sd = load_file(os.path.join(dst, "adapter_model.safetensors"))
        tensors(sd)
        save_file(sd, os.path.join(dst, "adapter_model.safetensors"))
    if not sidecar:
        os.remove(os.path.join(dst, "mixtune_adapter.json"))
    return str(dst)


def _poison(sd):
    k = sorted(k for k in sd if "lora_B" in k)[0]
    sd[k][0, 0] = float("nan")


@pytest.mark.parametrize("verb", ["eval", "merge", "generate"])
def test_verbs_refuse_an_adapter_with_a_nan_naming_the_tensor(capsys, tiny_ckpt, adapter16, tmp_path, verb):
    bad = _copy_adapter(adapter16, tmp_path / "bad", tensors=_poison)
    name = sorted(k for k in load_file(os.path.join(bad, "adapter_model.safetensors")) if "lora_B" in k)[0]
    argv = {"eval": ["eval", "--data.eval_max_rows", "2"], "merge": ["merge", "--out", str(tmp_path / "merged")],
            "generate": ["generate", "--prompt", "hi", "--max-new-tokens", "2"]}[verb]
    rc, _, err = _run(capsys, argv + ["--model", tiny_ckpt, "--model.device", "cpu", "--adapter", bad])
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mixtune: error: adapter:") and name in line and "non-finite" in line, err
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_config_rank_that_does_not_match_the_tensors(capsys, tiny_ckpt, adapter16, tmp_path):
    """adapter_config.json saying r=8 over rank-16 tensors would merge twice the delta: refused."""
    lying = _copy_adapter(adapter16, tmp_path / "r8", config={"r": 8}, sidecar=False)
    rc, _, err = _run(capsys, ["merge", "--model", tiny_ckpt, "--adapter", lying, "--out", str(tmp_path / "m")])
    assert rc == 2 and "says r=8" in err and "has rank 16" in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()
    # with mixtune's sidecar still there, the disagreement is named at once
    edited = _copy_adapter(adapter16, tmp_path / "edited", config={"lora_alpha": 32})
    rc, _, err = _run(capsys, ["merge", "--model", tiny_ckpt, "--adapter", edited, "--out", str(tmp_path / "m")])
    assert rc == 2 and "lora_alpha=32" in err and "mixtune_adapter.json" in err, err
    from mixtune.lora import read_adapter
    for change, msg in [({"r": 0}, "r must be a positive integer"), ({"lora_alpha": -1}, "lora_alpha must be"),
                        ({"r": 16.5}, "r must be a positive integer"), ({"rank_pattern": {"q_proj": 8}},
                                                                          "rank_pattern gives r=8")]:
        d = _copy_adapter(adapter16, tmp_path / f"c{len(os.listdir(tmp_path))}", config=change, sidecar=False)
        with pytest.raises(ConfigError, match=msg):
            read_adapter(d)


def test_duplicate_keys_in_adapter_config_are_refused(adapter16, tmp_path):
    from mixtune.lora import read_adapter
    d = _copy_adapter(adapter16, tmp_path / "dup", sidecar=False)
    path = os.path.join(d, "adapter_config.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"r": 16,', '"r": 16, "r": 8,'))
    with pytest.raises(ConfigError, match="duplicate key 'r'"):
        read_adapter(d)


def test_rank_and_alpha_patterns_merge_per_module(tiny_ckpt, adapter16, tmp_path):
    """peft's rank_pattern / alpha_pattern: q_proj at r=8 alpha=4 beside v_proj at r=16 alpha=16 merges each
    with its own alpha / r; eval / generate (one r for every module) refuse it with a pointer to merge."""
    from mixtune.lora import load_adapter, merge_into_state_dict
    from mixtune.model import iter_checkpoint, load_model

    def cut_q(sd):
        for k in list(sd):
            if "q_proj.lora_A" in k:
                sd[k] = sd[k][:8].contiguous()
            elif "q_proj.lora_B" in k:
                sd[k] = sd[k][:, :8].contiguous()

    d = _copy_adapter(adapter16, tmp_path / "pat", tensors=cut_q, sidecar=False,
                      config={"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"q_proj": 4}})
    base = {k: t for k, t in iter_checkpoint(tiny_ckpt) if k.startswith("model.layers.0.self_attn.")}
    merged = merge_into_state_dict(base, d, dtype=torch.float32)
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.0.self_attn."
    for proj, scale in (("q_proj", 4 / 8), ("v_proj", 16 / 16)):
        A, B = sd[f"{pre}{proj}.lora_A.weight"], sd[f"{pre}{proj}.lora_B.weight"]
        want = base[f"model.layers.0.self_attn.{proj}.weight"].float() + scale * (B @ A)
        torch.testing.assert_close(merged[f"model.layers.0.self_attn.{proj}.weight"], want)
    model = load_model(tiny_ckpt, quant="none", dtype=torch.float32, report=None)
    with pytest.raises(ConfigError, match="own rank or alpha.*mixtune merge"):
        load_adapter(model, d)
