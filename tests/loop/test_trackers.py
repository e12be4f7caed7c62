"""Run trackers (train.report_to): W&B offline and MLflow's file store record the config, per-step and eval
metrics, the loss plot and the final adapter; the records are read back here. Unknown names are one line."""

import glob
import json
import os
import struct
import time

import pytest

from mixtune.config import ConfigError, load_config
from mixtune.loop import trackers
from mixtune.loop.metrics import MetricsLog
from mixtune.loop.report import plot_losses


def _wandb_records(path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then 32 KiB blocks of chunks, each crc32 (4) +
    length (2, little-endian) + type (1 full, 2 first, 3 middle, 4 last) + a piece of a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, t = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if n == 0 and t == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if t in (1, 4):
            r = pb2.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def _run(tmp_path, monkeypatch, names):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "adapter"))
    with open(os.path.join(out, "adapter", "adapter_config.json"), "w") as fh:
        fh.write("{}")
    cfg = load_config(None, ["--train.report_to", ",".join(names), "--train.output_dir", out,
                             "--lora.r", "4"])
    recs = [{"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-4}, {"kind": "train", "step": 2, "loss": 2.0},
            {"kind": "eval", "step": 2, "eval_loss": 2.25, "eval_perplexity": 9.5},
            {"kind": "generation", "step": 2, "when": "after", "exact_match": 0.5, "chrf": 40.0}]
    with trackers.session(cfg, out):
        log = MetricsLog(out, tensorboard=cfg.train.tensorboard, resume_step=None)
        for r in recs:
            log.log(r)
        log.close()
        png = plot_losses(recs, os.path.join(out, "loss.png"))
        trackers.finish(os.path.join(out, "adapter"), png, {"eval_loss": 2.25, "steps": 2})
    assert not trackers._active
    return out, cfg


def test_wandb_offline_records_read_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    out, cfg = _run(tmp_path, monkeypatch, ["wandb"])
    assert not cfg.train.tensorboard and not os.path.exists(os.path.join(out, "tb"))  # not asked for
    [log] = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    for _ in range(60):  # wandb's service may still be writing the log's tail when finish() returns
        records = _wandb_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            config.update({i.key: json.loads(i.value_json)
                           for i in (r.run.config.update if kind == "run" else r.config.update)})
    assert config["lora"]["r"] == 4 and config["train"]["report_to"] == ["wandb"], \
        (sorted(config), [r.WhichOneof("record_type") for r in records])
    hist = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records
            if r.WhichOneof("record_type") == "history"]
    steps = {}
    for h in hist:
        steps.setdefault(int(h["_step"]), {}).update(h)
    assert sorted(steps) == [1, 2], ([r.WhichOneof("record_type") for r in records], hist)
    assert float(steps[1]["train/loss"]) == 2.5 and float(steps[2]["train/loss"]) == 2.0
    assert float(steps[2]["eval/loss"]) == 2.25 and float(steps[2]["generation_after/chrf"]) == 40.0
    assert json.loads(steps[2]["loss_plot/_type"]) == "image-file"
    [art] = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert art.name == "adapter" and art.type == "model"
    assert [e.path for e in art.manifest.contents] == ["adapter_config.json"]
    summary = {i.key: i.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert float(summary["eval_loss"]) == 2.25


def test_mlflow_file_store_records_read_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, cfg = _run(tmp_path, monkeypatch, ["tensorboard", "mlflow"])
    assert cfg.train.tensorboard and os.path.isdir(os.path.join(out, "tb"))
    client = MlflowClient("file://" + os.path.join(out, "mlruns"))
    [exp] = [e for e in client.search_experiments() if e.name == "mixtune"]
    [run] = client.search_runs([exp.experiment_id])
    assert run.data.params["lora.r"] == "4" and run.data.params["train.report_to"] == "['tensorboard', 'mlflow']"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 2.5), (2, 2.0)]
    assert run.data.metrics["eval/loss"] == 2.25 and run.data.metrics["generation_after/chrf"] == 40.0
    assert run.data.tags["summary.eval_loss"] == "2.25" and run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert arts == {"loss.png", "adapter"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/adapter_config.json"]


def test_unknown_tracker_is_one_line_and_nothing_is_written(tmp_path, capsys):
    from mixtune.cli import main

    with pytest.raises(ConfigError, match="train.report_to: unknown tracker 'neptune'"):
        load_config(None, ["--train.report_to", "tensorboard,neptune"])
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), "--train.report_to", "comet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown tracker 'comet'" in err[0]
    assert not out.exists()
    assert load_config(None, ["--train.report_to", ""]).train.tensorboard is False


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    """A run that stopped after step 2 and resumed (a longer max_steps) logs step 3 into the same W&B and MLflow
    runs (ids kept in trackers.json); MLflow keeps the first max_steps and tags the changed one."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = str(tmp_path / "run")
    os.makedirs(out)
    first = load_config(None, ["--train.report_to", "wandb,mlflow", "--train.output_dir", out,
                               "--train.max_steps", "2"])
    with trackers.session(first, out):
        for step in (1, 2):
            trackers.log({"kind": "train", "step": step, "loss": 3.0 - step})
    # the run stopped here (session exit closes without finishing); it resumes with more steps
    ids = json.load(open(os.path.join(out, trackers.RUNS_FILE)))
    assert set(ids) == {"wandb", "mlflow"}
    again = load_config(None, ["--train.report_to", "wandb,mlflow", "--train.output_dir", out,
                               "--train.max_steps", "3"])
    with trackers.session(again, out, resume=True):
        trackers.log({"kind": "train", "step": 3, "loss": 0.5})
        trackers.finish(None, None, {"steps": 3})
    assert json.load(open(os.path.join(out, trackers.RUNS_FILE))) == ids
    client = MlflowClient("file://" + os.path.join(out, "mlruns"))
    [exp] = [e for e in client.search_experiments() if e.name == "mixtune"]
    [run] = client.search_runs([exp.experiment_id])  # one run, not two
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 2.0), (2, 1.0), (3, 0.5)]
    assert run.data.params["train.max_steps"] == "2" and run.data.tags["resumed.train.max_steps"] == "3"
    logs = sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(logs) == 2 and all(os.path.basename(p) == f"run-{ids['wandb']}.wandb" for p in logs)
    parts = []
    for log in logs:
        for _ in range(60):  # wandb's service may still be writing the log's tail
            records = _wandb_records(log)
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
            time.sleep(0.5)
        parts.append(sorted(int(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
                            for i in r.history.item if (i.key or "/".join(i.nested_key)) == "_step"))
    assert sorted(parts) == [[1, 2], [3]]  # the resumed part carries on at step 3 in the same run
    # a fresh (not resumed) start opens new runs
    with trackers.session(again, out):
        pass
    assert json.load(open(os.path.join(out, trackers.RUNS_FILE)))["mlflow"] != ids["mlflow"]
