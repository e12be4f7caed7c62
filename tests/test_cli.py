"""The CLI contract: verbs, help, aliases, and user errors as one line with exit code 2."""

import json

import pytest
import torch

from mixtune import cli
from mixtune.config import load_config


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, msg", [
    (["train", "--train.lr", "1"], "unknown config key 'train.lr'"),
    (["train", "--train.max_steps", "many"], "train.max_steps: expected an integer, got 'many'"),
    (["train", "--model", "a", "--model.name_or_path", "b"], "clashing options: --model 'a' and"),
    (["generate", "--greedy", "--generate.greedy", "false"], "clashing options"),
    (["train", "--train.bf16", "true", "--dtype", "float16"], "clashes with model.dtype float16"),
    (["eval", "--resume"], "--resume is not an option of `mixtune eval`"),
    (["train", "--out", "runs/a", "--output_dir", "runs/a"], "merge.out clashes with train.output_dir"),
    (["train", "--adapter", "x"], "--adapter is not an option of `mixtune train`"),
    (["train", "--lr", "1"], "unknown option --lr"),
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "a.yaml", "b.yaml"], "unexpected argument 'b.yaml'"),
    (["merge"], "mixtune merge needs --adapter DIR"),
    (["merge", "--adapter", "/nonexistent/adapter"], "--adapter: directory not found"),
    (["generate"], "needs at least one --prompt"),
    (["trian"], "unknown verb 'trian' (did you mean train?)"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, msg):
    rc, out, err = _run(capsys, argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mixtune: error: ") and msg in lines[0], lines[0]
    assert "Traceback" not in err


def test_help_lists_verbs_and_every_key(capsys):
    rc, out, _ = _run(capsys, ["--help"])
    assert rc == 0 and all(v in out for v in cli.VERBS)
    rc, out, _ = _run(capsys, ["train", "--help"])
    assert rc == 0
    for key in ("--train.max_steps", "--lora.targets", "--data.template", "--merge.out", "--resume",
                "--output_dir"):
        assert key in out


def test_aliases_map_to_config_keys():
    a = cli.parse_args("generate", ["cfg.yaml", "--model", "m", "--quant", "none", "--dtype", "float32",
                                    "--max-new-tokens", "5", "--greedy", "--prompt", "p1", "--prompt", "p2",
                                    "--adapter", "ad", "--json", "--train.seed=3"])
    assert a.config == "cfg.yaml" and a.prompts == ["p1", "p2"] and a.adapter == "ad" and a.json
    c = load_config(None, a.overrides)
    assert (c.model.name_or_path, c.model.quant, c.model.dtype) == ("m", "none", "float32")
    assert c.generate.max_new_tokens == 5 and c.generate.greedy and c.train.seed == 3
    m = cli.parse_args("merge", ["--dtype", "float32", "--out", "o", "--output_dir", "d"])
    c = load_config(None, m.overrides)
    assert c.merge.dtype == "float32" and c.merge.out == "o" and c.train.output_dir == "d"
    t = cli.parse_args("train", ["--resume"])
    assert load_config(None, t.overrides).train.resume == "auto"
    t = cli.parse_args("train", ["--resume", "configs/tiny.yaml"])
    assert t.config == "configs/tiny.yaml" and load_config(None, t.overrides).train.resume == "auto"
    t = cli.parse_args("train", ["--resume", "runs/x/checkpoints/step-2", "--json"])
    assert load_config(None, t.overrides).train.resume == "runs/x/checkpoints/step-2"


def test_bench_verb_is_wired_or_says_why(capsys, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("mixtune.bench") is None:
        rc, _, err = _run(capsys, ["bench"])
        assert rc == 2 and "mixtune bench" in err
    else:
        import mixtune.bench as bench
        seen = []
        monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
        assert cli.main(["bench", "--x", "1"]) == 0 and seen == [["--x", "1"]]


def test_ci_runs_exactly_the_readme_test_command():
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as fh:
        readme = fh.read()
    with open(os.path.join(root, ".ci", "run")) as fh:
        ci = fh.read()
    m = re.search(r'^TEST_COMMAND="(.+)"$', ci, re.M)
    assert m and m.group(1) in readme and "torch==2.13.0" in ci and "torch==2.13.0" in readme
    assert os.access(os.path.join(root, ".ci", "run"), os.X_OK)


def test_adapter_brings_its_run_config_or_base_model(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "org/base", "r": 4}')
    assert cli._adapter_defaults(str(run / "adapter"), []) == (None, {"model": {"name_or_path": "org/base"}})
    assert cli._adapter_defaults(str(run / "adapter"), [("model.name_or_path", "x")]) == (None, None)
    (run / "config.yaml").write_text("data:\n  max_seq_length: 64\n")
    path, base = cli._adapter_defaults(str(run / "adapter"), [])
    assert path == str(run / "config.yaml") and base is None
    # a checkpoint's adapter also evaluates/merges with its run's config (same model, data and template)
    ck = run / "checkpoints" / "step-2" / "adapter"
    ck.mkdir(parents=True)
    (ck / "adapter_config.json").write_text('{"base_model_name_or_path": "org/base", "r": 4}')
    path, base = cli._adapter_defaults(str(ck), [])
    assert path == str(run / "config.yaml") and base is None


@pytest.mark.parametrize("damage", ["weights", "config-list", "sidecar"])
def test_damaged_adapter_is_one_line_exit_2(capsys, tmp_path, damage):
    ad = tmp_path / "adapter"
    ad.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (ad / "adapter_config.json").write_text("[1, 2]" if damage == "config-list" else json.dumps(cfg))
    (ad / "adapter_model.safetensors").write_bytes(b"not a safetensors file" if damage == "weights" else b"")
    if damage == "sidecar":
        from safetensors.torch import save_file
        save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 8)},
                  str(ad / "adapter_model.safetensors"))
        (ad / "mixtune_adapter.json").write_text("{truncated")
    rc, out, err = _run(capsys, ["merge", "--adapter", str(ad), "--out", str(tmp_path / "merged")])
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("mixtune: error: adapter: ") and str(ad) in err, err
    assert not (tmp_path / "merged").exists()


def test_help_into_a_closed_pipe_is_quiet():
    """`mixtune train --help | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "mixtune", "train", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)
    assert p.stdout.read(10).startswith(b"usage")
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("verb", [["generate", "--prompt", "hi"], ["eval"], ["train"]])
def test_bad_device_is_one_line_exit_2(capsys, tmp_path, verb):
    extra = ["--output_dir", str(tmp_path / "run")] if verb == ["train"] else []
    rc, out, err = _run(capsys, verb + extra + ["--model.device", "gpu"])
    assert rc == 2 and err.startswith("mixtune: error: model.device: unknown device 'gpu'"), err
    assert len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        rc, out, err = _run(capsys, verb + extra + ["--model.device", "cuda"])
        assert rc == 2 and "model.device: 'cuda' requested but no CUDA device is available" in err, err
        assert len(err.strip().splitlines()) == 1


def test_merge_default_out_dir(capsys, tmp_path, monkeypatch):
    import mixtune.merge
    seen = []
    monkeypatch.setattr(mixtune.merge, "merge_main", lambda cfg, adapter, out: seen.append(out) or {"out": out})
    run = tmp_path / "run"
    for ad in (run / "adapter", run / "checkpoints" / "step-4" / "adapter"):
        ad.mkdir(parents=True)
        (ad / "adapter_config.json").write_text('{"r": 4}')
        assert cli.main(["merge", "--adapter", str(ad), "--json"]) == 0
    # beside the adapter; for a checkpoint's adapter beside the checkpoints (pruning must not delete it)
    assert seen == [str(run / "merged"), str(run / "merged-step-4")]
