"""Training checkpoints: written atomically, found safely, restored exactly, and never executed.

A checkpoint is a directory `<output_dir>/checkpoints/step-N/` holding

    adapter/               the adapter in PEFT format (what a user would load)
    trainable.safetensors  every trainable tensor by its module name (what resume restores, bit-exact)
    optimizer.json         the optimizer's state dict: its structure and numbers in JSON, each tensor a reference
    optimizer.safetensors  ... into this file (AdamW moments and steps; AdamW8bit's uint8 states, qmaps, absmax)
    scheduler.json         the LR scheduler's state dict (numbers only)
    rng.json               python `random`, numpy, and (in rng.safetensors) torch CPU / CUDA generator states
    state.json             step, data position (epoch, micro-batches consumed), rows, ranks, metrics so far
    config.yaml            the resolved config the checkpoint was trained with (resume checks against it)
    COMPLETE               written last: a directory without it was interrupted and is never loaded

Nothing is pickled: tensors are safetensors, the rest is JSON (`loop.safe_state`). Checkpoints of older
versions (optimizer.pt, scheduler.pt, rng.pt) are read with `torch.load(weights_only=True)`, which loads tensors
and plain containers and refuses anything that could run code (a one-line CheckpointError).

It is written under a temporary name in the same directory and renamed into place, so a reader sees either
no `step-N` or a complete one; a failed write (disk full) removes its temporary and names the path. The last
`save_total_limit` complete checkpoints are kept.

    path = save_checkpoint(out_dir, step, model=..., optimizer=..., scheduler=..., state={...}, config=cfg)
    ckpt = load_checkpoint(find_latest_checkpoint(out_dir))
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from typing import Any, Callable, Optional

import torch

from .._fs import publish_mode, writing
from ..config import Config, ConfigError, load_config
from .safe_state import STATE_FORMAT, CheckpointError, check_state, load_state, save_state, unreadable_error

__all__ = ["STATE_FORMAT", "CheckpointError", "load_state", "save_state"]  # re-exported: the checkpoint's API

MARKER = "COMPLETE"
SHARDED_DIR = "sharded"  # train.distributed fsdp: adapter + optimizer shards (torch.distributed.checkpoint)
CONFIG_NAME = "config.yaml"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    return state


def restore_rng_state(state: dict, source: str = "rng state") -> None:
    """Set the python, torch CPU (and CUDA) and numpy generators; a malformed state is a CheckpointError."""
    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]) if isinstance(py, (list, tuple)) and len(py) == 3 else py)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "numpy" in state:
            import numpy as np
            np.random.set_state(tuple(state["numpy"]))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"checkpoint file {source} is not a valid random state ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}); resume from an earlier checkpoint") from None


# --------------------------------------------------------------------------------------------------
# trainable tensors
# --------------------------------------------------------------------------------------------------


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module name: tensor} of every parameter that requires grad (the adapter), detached, contiguous, CPU."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy `sd` into the model's trainable parameters; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(sd))
    extra = sorted(set(sd) - set(params))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not match this model's adapter (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); was it written with other lora settings?")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != sd[n].shape:
                raise CheckpointError(f"checkpoint tensor {n} has shape {tuple(sd[n].shape)}, model has "
                                      f"{tuple(p.shape)}; was it written with other lora settings?")
            p.copy_(sd[n].to(p.device, p.dtype))


# --------------------------------------------------------------------------------------------------
# save / find / load
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str, step: int, *, model: torch.nn.Module, optimizer, scheduler, state: dict,
                    total_limit: int = 2, save_adapter_fn: Optional[Callable[[str], None]] = None,
                    config: Optional[Config] = None, sharded_fn: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoint `step` atomically and prune old ones; returns its final path.

    `state` is JSON-serialisable (step, data position, metrics). `save_adapter_fn(dir)` writes the PEFT
    adapter into `dir` (skipped when None); `config` is stored as the checkpoint's config.yaml. A failed write
    (disk full, read-only) removes the temporary directory and raises an OSError naming the checkpoint.
    `sharded_fn(tmp)` (fsdp, `loop.fsdp`) writes the adapter and the sharded training state with the other
    ranks instead of adapter/, trainable.safetensors and optimizer.*."""
    from safetensors.torch import save_file

    root = checkpoints_dir(output_dir)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}-{os.getpid()}")
    try:
        with writing(final):
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
            if sharded_fn is not None:
                sharded_fn(tmp)
            else:
                if save_adapter_fn is not None:
                    save_adapter_fn(os.path.join(tmp, "adapter"))
                save_file(trainable_state_dict(model), os.path.join(tmp, "trainable.safetensors"))
                save_state(optimizer.state_dict(), tmp, "optimizer")
            save_state(scheduler.state_dict(), tmp, "scheduler")
            save_state(capture_rng_state(), tmp, "rng")
            with open(os.path.join(tmp, "state.json"), "w") as fh:
                json.dump(dict(state, step=step), fh, indent=2)
            if config is not None:
                config.save(os.path.join(tmp, CONFIG_NAME))
            with open(os.path.join(tmp, MARKER), "w") as fh:
                fh.write(f"step {step}\n")
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):  # a stale checkpoint of the same step (e.g. re-saved after resume)
                shutil.rmtree(final)
            publish_mode(tmp)
            os.rename(tmp, final)
            _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(output_dir, total_limit)
    return final


def list_checkpoints(output_dir: str, complete_only: bool = True) -> list[tuple[int, str]]:
    """[(step, path)] sorted by step; only those with the completion marker unless complete_only is False."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and (not complete_only or is_complete(path)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def has_checkpoints(output_dir: str) -> bool:
    """True if output_dir holds any checkpoint directory, complete or not (a fresh run must not reuse it)."""
    root = checkpoints_dir(output_dir)
    return os.path.isdir(root) and any(_STEP_RE.match(n) for n in os.listdir(root))


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint with the highest step, or None. Half-written ones are ignored."""
    ck = list_checkpoints(output_dir)
    return ck[-1][1] if ck else None


def prune_checkpoints(output_dir: str, total_limit: int) -> None:
    """Keep the newest `total_limit` complete checkpoints; remove older ones, incomplete ones older than the
    newest complete one, and leftover temporary directories of this process."""
    ck = list_checkpoints(output_dir)
    for _, path in ck[:-total_limit] if total_limit > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    if ck:
        newest = ck[-1][0]
        for step, path in list_checkpoints(output_dir, complete_only=False):
            if step < newest and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
    root = checkpoints_dir(output_dir)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-step-") and name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Delete `.tmp-step-*` directories left by a writer that was killed mid-save (one run owns a directory
    at a time, so at start-up every temporary is stale). Returns the removed paths."""
    root = checkpoints_dir(output_dir)
    removed = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-step-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    return removed


def resolve_resume(output_dir: str, resume: str) -> Optional[str]:
    """Map train.resume to a checkpoint path: '' -> None (and refuse a dir that already has checkpoints),
    'auto' -> latest complete checkpoint or None, else the given directory (must be complete)."""
    if not resume:
        if has_checkpoints(output_dir):
            raise CheckpointError(f"{output_dir} already holds checkpoints from an earlier run: pass --resume "
                                  f"(or --resume auto) to continue it, or choose another --output_dir")
        return None
    if resume == "auto":
        return find_latest_checkpoint(output_dir)
    path = resume
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume: checkpoint directory not found: {path}")
    if not is_complete(path) and os.path.isdir(checkpoints_dir(path)):
        latest = find_latest_checkpoint(path)
        raise CheckpointError(f"--resume: {path} is a run directory, not a checkpoint; pass --resume auto "
                              f"--output_dir {path}" + (f", or --resume {latest}" if latest else ""))
    if not is_complete(path):
        raise CheckpointError(f"--resume: {path} is incomplete (no {MARKER} marker: it was interrupted while "
                              f"being written); use an earlier checkpoint or --resume auto")
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a complete checkpoint: {'path', 'state', 'trainable', 'optimizer', 'scheduler', 'rng'}. Nothing in
    it is unpickled; a damaged or unsafe file is a one-line CheckpointError naming it."""
    from safetensors.torch import load_file

    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker); refusing to load it")
    out: dict[str, Any] = {"path": path}
    sharded = is_sharded(path)
    for key, name, read in (("state", "state.json", _read_state_json),
                            ("trainable", "trainable.safetensors", load_file))[:1 if sharded else 2]:
        f = os.path.join(path, name)
        try:
            out[key] = read(f)
        except Exception as e:  # missing or damaged file despite the marker (disk trouble, manual edits)
            raise unreadable_error(f, e) from None
    for key in ("scheduler", "rng") if sharded else ("optimizer", "scheduler", "rng"):
        out[key] = load_state(path, key)
    return out


def is_sharded(path: str) -> bool:
    """A checkpoint of an fsdp run: its adapter and optimizer state are shards under sharded/ (loop.fsdp)."""
    return os.path.isdir(os.path.join(path, SHARDED_DIR))


def check_world_size(path: str, world: int) -> None:
    """A checkpoint resumes on the number of ranks it was trained on (a step takes micro-batch x accumulation x
    ranks rows, and an fsdp checkpoint holds one shard per rank); CheckpointError naming both numbers."""
    s = _read_state_json(os.path.join(path, "state.json"))
    if s.get("world_size", 1) != world:
        raise CheckpointError(
            f"--resume: {path} was trained on {s.get('world_size', 1)} rank(s), this run has {world}; an "
            f"optimizer step takes micro-batch x accumulation x ranks rows"
            f"{' and its training state is sharded over those ranks' if is_sharded(path) else ''}, so resume "
            f"with the same number of ranks")


def verify_checkpoint(path: str) -> None:
    """Every file a resume reads, checked without loading the tensors' data (safetensors headers only), so a
    damaged or unsafe checkpoint is refused in one line before the model is built or the run dir rewritten."""
    from safetensors import safe_open

    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker); refusing to load it")
    sharded = is_sharded(path)
    for name in ("state.json",) if sharded else ("state.json", "trainable.safetensors"):
        f = os.path.join(path, name)
        try:
            if name == "state.json":
                _read_state_json(f)
            else:
                with safe_open(f, framework="pt") as sf:
                    sf.keys()
        except Exception as e:
            raise unreadable_error(f, e) from None
    if sharded and not os.path.isfile(os.path.join(path, SHARDED_DIR, ".metadata")):
        raise unreadable_error(os.path.join(path, SHARDED_DIR, ".metadata"), FileNotFoundError("missing"))
    for key in ("scheduler",) if sharded else ("optimizer", "scheduler"):
        check_state(path, key)
    current = capture_rng_state()  # the random state is small: try it for real, then put ours back
    try:
        restore_rng_state(load_state(path, "rng"), os.path.join(path, "rng.json"))
    finally:
        restore_rng_state(current)


def _read_state_json(f: str) -> dict:
    with open(f, "rb") as fh:
        s = json.loads(fh.read().decode("utf-8"))
    if not isinstance(s, dict):
        raise ValueError("not a JSON object")
    for k in ("step", "epoch", "batches_in_epoch", "total_steps", "world_size", "train_rows"):
        if k in s and not (isinstance(s[k], int) and not isinstance(s[k], bool) and s[k] >= 0):
            raise ValueError(f"{k} is {s[k]!r}, not a count")
    if "step" not in s:
        raise ValueError("no step")
    if not isinstance(s.get("history", {}), dict):
        raise ValueError("history is not an object")
    return s


def training_position(ckpt: dict) -> tuple[int, int, int]:
    """(step, epoch, micro-batches consumed in it) of a loaded checkpoint; CheckpointError when state.json
    lacks them."""
    s = ckpt["state"]
    if "epoch" not in s or "batches_in_epoch" not in s:
        raise CheckpointError(f"checkpoint file {os.path.join(ckpt['path'], 'state.json')} has no data position "
                              f"(epoch, batches_in_epoch); resume from an earlier checkpoint")
    return s["step"], s["epoch"], s["batches_in_epoch"]


def _compatible(saved: Any, now: Any) -> bool:
    """Same kind of value: numbers with numbers, flags with flags, equal-length sequences of compatible items."""
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if num(now) or num(saved):
        return num(now) and num(saved) or (now is None or saved is None)
    if isinstance(now, (bool, type(None))) or isinstance(saved, (bool, type(None))):
        return isinstance(saved, (bool, type(None))) and isinstance(now, (bool, type(None)))
    if isinstance(now, (list, tuple)):
        return type(saved) is type(now) and len(saved) == len(now) and all(map(_compatible, saved, now))
    return type(saved) is type(now)


def restore_optimizer(optimizer, sd: Any, source: str) -> None:
    """optimizer.load_state_dict(sd) after checking it is this optimizer's kind of state: the same groups
    and hyper-parameter types, moments of each parameter's shape. CheckpointError (naming `source`) if not."""
    now = optimizer.state_dict()
    try:
        if not isinstance(sd, dict) or set(sd) != {"state", "param_groups"} or not isinstance(sd["state"], dict):
            raise ValueError("not an optimizer state dict")
        groups = sd["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(now["param_groups"]):
            raise ValueError("a different number of parameter groups")
        for g, h in zip(groups, now["param_groups"]):
            if not isinstance(g, dict) or set(g) != set(h) or len(g["params"]) != len(h["params"]):
                raise ValueError("parameter groups of another optimizer or adapter")
            bad = [k for k in h if k != "params" and not _compatible(g[k], h[k])]
            if bad:
                raise ValueError(f"hyper-parameter {bad[0]} is {g[bad[0]]!r}")
        ids = {i for h in now["param_groups"] for i in h["params"]}
        if not set(sd["state"]) <= ids:
            raise ValueError("state for parameters the optimizer does not have")
        optimizer.load_state_dict(sd)
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = dict(optimizer.state.get(p, {}))
                st.update(st.pop("__bnb_optimizer_quant_state__", {}) or {})
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "state1", "state2"):
                    if k in st and (not torch.is_tensor(st[k]) or st[k].shape != p.shape):
                        raise ValueError(f"{k} of shape {tuple(getattr(st[k], 'shape', ()))} for a parameter of "
                                         f"shape {tuple(p.shape)}")
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint file {source} does not fit this run's optimizer "
                              f"({' '.join(str(e).split())[:200]}); was it written with another train.optim or "
                              f"other lora settings?") from None


def restore_scheduler(scheduler, sd: Any, source: str) -> None:
    """scheduler.load_state_dict(sd) after checking it holds the same entries, of the same kinds."""
    now = scheduler.state_dict()
    if not isinstance(sd, dict) or set(sd) != set(now) or not all(_compatible(sd[k], now[k]) for k in now) \
            or any(f is not None for f in sd.get("lr_lambdas", [])):
        raise CheckpointError(f"checkpoint file {source} is not a state of this run's LR scheduler; resume from "
                              f"an earlier checkpoint")
    scheduler.load_state_dict(sd)


# keys that may differ between a run and its resumption: they change no trained weight (bookkeeping,
# output after training, where files go, and numerically equivalent implementations)
RESUME_MAY_CHANGE = {
    "train.resume", "train.output_dir", "train.progress", "train.tensorboard", "train.logging_steps",
    "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.generate_after", "train.merge_after",
    "train.per_device_eval_batch_size", "model.device", "model.cache_dir", "model.attn_implementation",
    "model.moe_backend", "model.gradient_checkpointing", "model.checkpoint_layers", "model.checkpoint_attention",
    "model.memory_budget_gib",
    "data.cache_dir", "data.eval_max_rows", "train.report_to", "train.push_to_hub", "train.push_merged",
}


def saved_config_path(checkpoint: str) -> Optional[str]:
    """The config a checkpoint was trained with: its own config.yaml; for a checkpoint of an older version,
    the run's (<run>/checkpoints/step-N -> <run>/config.yaml). A file path is taken as the config itself."""
    if os.path.isfile(checkpoint):
        return checkpoint
    own = os.path.join(checkpoint, CONFIG_NAME)
    if os.path.isfile(own):
        return own
    parent = os.path.dirname(os.path.abspath(checkpoint))
    run_cfg = os.path.join(os.path.dirname(parent), CONFIG_NAME)
    if os.path.basename(parent) == "checkpoints" and os.path.isfile(run_cfg):
        return run_cfg
    return None


def check_resume_config(cfg: Config, checkpoint: str) -> None:
    """A resumed run must train what the killed run trained: compare `cfg` with the config saved with the
    checkpoint (`saved_config_path`) and raise ConfigError naming every key that differs (except
    RESUME_MAY_CHANGE and the generate/merge sections). Checked before anything in the output dir is
    rewritten, so the run's record stays intact. A checkpoint with no config anywhere is refused."""
    saved_path = saved_config_path(checkpoint)
    if saved_path is None:
        raise CheckpointError(f"--resume: {checkpoint} has no {CONFIG_NAME} (written by an older mixtune) and "
                              f"none was found in its run directory, so the settings it was trained with cannot "
                              f"be checked; copy that run's {CONFIG_NAME} into {checkpoint} and resume again")
    saved = load_config(saved_path).to_dict()
    now = cfg.to_dict()
    diff = [f"{s}.{k} {saved[s][k]!r} -> {now[s][k]!r}" for s in now if s not in ("generate", "merge")
            for k in now[s] if f"{s}.{k}" not in RESUME_MAY_CHANGE and now[s][k] != saved[s].get(k)]
    if diff:
        raise ConfigError(f"--resume: the config differs from the one saved with the checkpoint ({saved_path}): "
                          f"{'; '.join(diff)}; resume with the same settings (e.g. `mixtune train {saved_path} "
                          f"--resume {checkpoint}`) or start a new --output_dir")
