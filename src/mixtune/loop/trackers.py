"""Run trackers beyond TensorBoard (`train.report_to`): Weights & Biases and MLflow, each through its own API.

    start(cfg, out_dir)             # rank 0, once the run's directory exists: opens the runs, records the config
    log({"kind": "train", "step": 3, "loss": 2.1})   # every metrics.jsonl record (MetricsLog.log calls it)
    finish(adapter_dir, loss_png, summary)            # the loss plot, the final adapter, the summary; closes

Both are optional extras (`pip install 'mixtune[wandb]'`, `'mixtune[mlflow]'`) and run without a server:
W&B offline with WANDB_MODE=offline (records under output_dir/wandb, `wandb sync` uploads them later);
MLflow into MLFLOW_TRACKING_URI, by default the local file store file://<output_dir>/mlruns (MLflow 3.x keeps
that store behind MLFLOW_ALLOW_FILE_STORE=true, which mixtune sets for its default).
TensorBoard itself stays in `metrics.MetricsLog` (tb/).

A resumed run continues the same tracker runs: their ids are kept in output_dir/trackers.json (written when
they open), and `start(..., resume=True)` reopens them (W&B `resume="allow"` with that id; MLflow
`start_run(run_id=...)`). Config values that changed on resume (e.g. a longer train.max_steps) update W&B's
config and become MLflow tags `resumed.<key>` (MLflow refuses to change a logged parameter).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from .._fs import atomic_write

TRACKERS = ("tensorboard", "wandb", "mlflow")
RUNS_FILE = "trackers.json"  # {"wandb": run id, "mlflow": run id}: what a resumed run reopens
_active: list = []


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's finite numbers under TensorBoard's names (train/loss, eval/loss, ...)."""
    kind = record.get("kind")
    prefix = {"eval": "eval", "generation": f"generation_{record.get('when')}"}.get(kind, "train")
    out = {}
    for k, v in record.items():
        if k in ("step", "kind", "epoch", "when") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            name = k if k.startswith("eval_") else f"{prefix}/{k}"
            out[name.replace("eval_", "eval/")] = float(v)
    return out


class _Wandb:
    name = "wandb"

    def __init__(self, config: dict, out_dir: str, run_id: Optional[str] = None):
        import wandb

        self.wandb = wandb
        kw = dict(project=os.environ.get("WANDB_PROJECT") or "mixtune", dir=out_dir,
                  name=os.path.basename(os.path.abspath(out_dir)), settings=wandb.Settings(silent=True))
        if run_id:  # a resumed run: the same W&B run, its config updated where the resume changed it
            self.run = wandb.init(id=run_id, resume="allow", **kw)
            self.run.config.update(config, allow_val_change=True)
        else:
            self.run = wandb.init(config=config, **kw)
        self.id = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, adapter_dir: Optional[str], loss_png: Optional[str], summary: dict) -> None:
        if loss_png and os.path.isfile(loss_png):
            self.run.log({"loss_plot": self.wandb.Image(loss_png)})
        if adapter_dir and os.path.isdir(adapter_dir):
            art = self.wandb.Artifact("adapter", type="model")
            art.add_dir(adapter_dir)
            self.run.log_artifact(art)
        for k, v in summary.items():
            self.run.summary[k] = v
        self.run.finish()


class _Mlflow:
    name = "mlflow"

    def __init__(self, config: dict, out_dir: str, run_id: Optional[str] = None):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the local file store: MLflow 3.x asks for an explicit opt-in to it
            uri = "file://" + os.path.join(os.path.abspath(out_dir), "mlruns")
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mixtune")
        params = {k: str(v)[:5000] for k, v in _flat(config).items()}
        if run_id:  # a resumed run: the same MLflow run; a changed value becomes a tag (params are immutable)
            self.run = mlflow.start_run(run_id=run_id)
            old = mlflow.get_run(run_id).data.params
            mlflow.log_params({k: v for k, v in params.items() if k not in old})
            changed = {f"resumed.{k}": v for k, v in params.items() if k in old and old[k] != v}
            if changed:
                mlflow.set_tags(changed)
        else:
            self.run = mlflow.start_run(run_name=os.path.basename(os.path.abspath(out_dir)))
            mlflow.log_params(params)
        self.id = self.run.info.run_id

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(values, step=step)

    def finish(self, adapter_dir: Optional[str], loss_png: Optional[str], summary: dict) -> None:
        if loss_png and os.path.isfile(loss_png):
            self.mlflow.log_artifact(loss_png)
        if adapter_dir and os.path.isdir(adapter_dir):
            self.mlflow.log_artifacts(adapter_dir, artifact_path="adapter")
        self.mlflow.set_tags({f"summary.{k}": str(v) for k, v in summary.items()})
        self.mlflow.end_run()


def _saved_ids(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, RUNS_FILE)) as fh:
            ids = json.load(fh)
    except (OSError, ValueError):  # none yet (or unreadable): the trackers start new runs
        return {}
    return ids if isinstance(ids, dict) else {}


def start(cfg, out_dir: str, resume: bool = False) -> list:
    """Open the trackers named in cfg.train.report_to (tensorboard aside) and record the config; resume=True
    reopens the runs recorded in out_dir/trackers.json. Their ids are written there (atomically)."""
    close()
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else _asdict(cfg)
    ids = _saved_ids(out_dir) if resume else {}
    for name in cfg.train.report_to:
        if name == "wandb":
            _active.append(_Wandb(config, out_dir, ids.get("wandb")))
        elif name == "mlflow":
            _active.append(_Mlflow(config, out_dir, ids.get("mlflow")))
    if _active:
        runs = {**ids, **{t.name: t.id for t in _active}}

        def write(path: str) -> None:
            with open(path, "w") as fh:
                json.dump(runs, fh, indent=1)
        atomic_write(os.path.join(out_dir, RUNS_FILE), write)
    return _active


def _asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def log(record: dict) -> None:
    """Send one metrics record (its finite numbers) to every open tracker."""
    if not _active:
        return
    values = _scalars(record)
    if values:
        for t in _active:
            t.log(int(record.get("step", 0)), values)


def finish(adapter_dir: Optional[str], loss_png: Optional[str], summary: dict) -> None:
    """Record the loss plot, the final adapter and the summary's numbers, then close every tracker."""
    keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    while _active:
        _active.pop(0).finish(adapter_dir, loss_png, keep)


def close() -> None:
    """Close open trackers without recording more (a run that stopped early)."""
    while _active:
        t = _active.pop(0)
        try:
            t.finish(None, None, {})
        except Exception:  # closing must not hide the error that stopped the run
            pass


class session:
    """`with session(cfg, out_dir, is_main, resume):` opens the trackers (rank 0 only; resume: the runs of
    trackers.json) and closes any still open at exit (a run that failed or stopped early); a finished run has
    closed them through `finish`."""

    def __init__(self, cfg, out_dir: str, is_main: bool = True, resume: bool = False):
        self.args = (cfg, out_dir, resume) if is_main else None

    def __enter__(self):
        if self.args is not None:
            start(*self.args)
        return self

    def __exit__(self, *exc) -> None:
        close()
