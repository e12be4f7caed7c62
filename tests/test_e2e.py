"""End to end on the offline tiny default, every verb through `mixtune.cli.main` in-process:
prepare → inspect → train → eval → merge → generate (merged == adapter, greedy)."""

import json
import os

import pytest
import torch

from mixtune import cli

DATA: list = []


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"mixtune {' '.join(argv)} failed ({rc}): {err[-2000:]}"
    return out, err


def _json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def test_every_verb_on_the_tiny_default(capsys, run_dir):
    out_dir = str(run_dir / "run")

    # prepare: statistics as JSON
    out, _ = _run(capsys, ["prepare", "--json", *DATA])
    stats = _json_lines(out)[-1]
    assert stats.get("train_rows", 0) > 0 or stats.get("stats", {}).get("train_rows", 0) > 0

    # inspect: counts as JSON
    out, _ = _run(capsys, ["inspect", "--json"])
    info = _json_lines(out)[-1]
    assert info["trainable_params"] > 0 and info["unmatched_targets"] == []

    # train: a short run of the default recipe
    out, err = _run(capsys, ["train", "--output_dir", out_dir, "--train.max_steps", "12", "--data.max_seq_length", "192",
                             "--train.eval_steps", "6", "--train.save_steps", "6", "--train.logging_steps", "3",
                             "--train.generate_after", "1", "--generate.max_new_tokens", "8",
                             "--train.progress", "false", "--train.merge_after", "true", "--merge.dtype", "float32",
                             "--json", *DATA])
    result = _json_lines(out)[-1]
    for name in ("config.yaml", "metrics.jsonl", "tb", "adapter/adapter_config.json", "merged/config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/step-12/COMPLETE", "checkpoints/step-6/COMPLETE",
                 "generations.jsonl", "loss.png", "report.md"):
        assert os.path.exists(os.path.join(out_dir, name)), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(out_dir, "tb")))
    records = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl"))]
    evals = [r["eval_loss"] for r in records if r["kind"] == "eval"]
    assert len(evals) >= 3 and evals[-1] < evals[0] - 0.1, evals  # the eval loss falls
    assert result["eval_loss"] == pytest.approx(evals[-1]) and result["steps"] == 12
    gens = [json.loads(x) for x in open(os.path.join(out_dir, "generations.jsonl"))]
    assert len(gens) == 1 and {"prompt", "reference", "before", "after"} <= gens[0].keys()
    with open(os.path.join(out_dir, "report.md")) as fh:
        report = fh.read()
    assert "after training" in report and "loss.png" in report and "| chrF | BLEU | ROUGE-L |" in report
    assert set(result["generation_scores"]) == {"before", "after"}
    with open(os.path.join(out_dir, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    # a second fresh run into the same directory is refused (one line, exit 2)
    assert cli.main(["train", "--output_dir", out_dir, *DATA]) == 2
    assert "--resume" in capsys.readouterr().err

    # eval: the adapter's loss (with the run's own config.yaml, found next to the adapter: same rows) equals
    # the run's final eval loss, and beats the base model
    adapter = os.path.join(out_dir, "adapter")
    out, _ = _run(capsys, ["eval", "--adapter", adapter, "--json", *DATA])
    ev = _json_lines(out)[-1]
    assert ev["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-4)
    out, _ = _run(capsys, ["eval", *DATA])
    assert "eval loss" in out and "perplexity" in out and "base model" in out
    base_loss = float(out.split("eval loss")[1].split()[0])
    assert base_loss > ev["eval_loss"] + 0.1

    # merge (fp32) and generate: the merged model generates exactly what base + adapter generates (greedy)
    merged = os.path.join(out_dir, "merged-cli")
    _run(capsys, ["merge", "--adapter", adapter, "--out", merged, "--dtype", "float32", "--json"])
    assert os.path.exists(os.path.join(merged, "config.json"))
    from safetensors.torch import load_file
    import glob
    def _weights(d):
        return {k: v for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))) for k, v in load_file(f).items()}
    w_cli, w_train = _weights(merged), _weights(os.path.join(out_dir, "merged"))
    assert w_cli.keys() == w_train.keys() and all(torch.equal(w_cli[k], w_train[k]) for k in w_cli)
    prompt = ["--prompt", "Write a haiku about the sea.", "--prompt", "Explain what a packed row is.",
              "--greedy", "--max-new-tokens", "12", "--quant", "none", "--dtype", "float32", "--json"]
    out, _ = _run(capsys, ["generate", "--adapter", adapter, *prompt])
    with_adapter = [r["token_ids"] for r in _json_lines(out)]
    out, _ = _run(capsys, ["generate", "--model", merged, *prompt])
    from_merged = [r["token_ids"] for r in _json_lines(out)]
    assert len(with_adapter) == 2 and all(with_adapter)
    assert from_merged == with_adapter


def test_python_dash_m_entry_point():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "mixtune", "train", "--train.max_steps", "x"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "mixtune: error: train.max_steps: expected an integer, got 'x'"]


def test_bench_verb_small_cpu_mode(capsys):
    out, _ = _run(capsys, ["bench", "--cpu-tiny"])
    last = json.loads(out.strip().splitlines()[-1])  # benchmarks print a table, then one JSON line
    assert last["ok"] is True and last["rows"] and all(r["tok_s"] > 0 for r in last["rows"])
