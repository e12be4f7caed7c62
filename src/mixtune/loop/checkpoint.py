"""Training checkpoints: written atomically, found safely, restored exactly.

A checkpoint is a directory `<output_dir>/checkpoints/step-N/` holding

    adapter/               the adapter in PEFT format (what a user would load)
    trainable.safetensors  every trainable tensor by its module name (what resume restores, bit-exact)
    optimizer.pt           AdamW state
    scheduler.pt           LR scheduler state
    rng.pt                 python / torch CPU / CUDA random states
    state.json             step, data position (epoch, micro-batches consumed), metrics so far
    COMPLETE               written last: a directory without it was interrupted and is never loaded

It is written under a temporary name in the same directory and renamed into place, so a reader sees either
no `step-N` or a complete one. The last `save_total_limit` complete checkpoints are kept.

    path = save_checkpoint(out_dir, step, model=..., optimizer=..., scheduler=..., state={...})
    ckpt = load_checkpoint(find_latest_checkpoint(out_dir))
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Callable, Optional

import torch

from .._fs import publish_mode
from ..config import Config, ConfigError, load_config

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, or from a different run)."""


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


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


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
                    total_limit: int = 2, save_adapter_fn: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoint `step` atomically and prune old ones; returns its final path.

    `state` is JSON-serialisable (step, data position, metrics). `save_adapter_fn(dir)` writes the PEFT
    adapter into `dir` (skipped when None)."""
    from safetensors.torch import save_file

    root = checkpoints_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    if save_adapter_fn is not None:
        save_adapter_fn(os.path.join(tmp, "adapter"))
    save_file(trainable_state_dict(model), os.path.join(tmp, "trainable.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(capture_rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as fh:
        json.dump(dict(state, step=step), fh, indent=2)
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
    """Read a complete checkpoint: {'path', 'state', 'trainable', 'optimizer', 'scheduler', 'rng'}."""
    from safetensors.torch import load_file

    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker); refusing to load it")
    out: dict[str, Any] = {"path": path}
    def read_json(f):
        with open(f) as fh:
            return json.load(fh)
    readers = [("state", "state.json", read_json),
               ("trainable", "trainable.safetensors", load_file)]
    readers += [(k, f"{k}.pt", lambda f: torch.load(f, map_location="cpu", weights_only=False))
                for k in ("optimizer", "scheduler", "rng")]
    for key, name, read in readers:
        f = os.path.join(path, name)
        try:
            out[key] = read(f)
        except Exception as e:  # missing or damaged file despite the marker (disk trouble, manual edits)
            raise CheckpointError(f"checkpoint file {f} cannot be read ({type(e).__name__}: "
                                  f"{str(e).strip()[:200]}); resume from an earlier checkpoint with "
                                  f"--resume DIR") from None
    return out


# keys that may differ between a run and its resumption: they change no trained weight (bookkeeping,
# output after training, where files go, and numerically equivalent implementations)
RESUME_MAY_CHANGE = {
    "train.resume", "train.output_dir", "train.progress", "train.tensorboard", "train.logging_steps",
    "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.generate_after", "train.merge_after",
    "train.per_device_eval_batch_size", "model.device", "model.cache_dir", "model.attn_implementation",
    "model.moe_backend", "model.gradient_checkpointing", "model.checkpoint_layers", "model.checkpoint_attention",
    "model.memory_budget_gib",
    "data.cache_dir", "data.eval_max_rows",
}


def check_resume_config(cfg: Config, saved_path: str) -> None:
    """A resumed run must train what the killed run trained: compare `cfg` with the run's saved config.yaml and
    raise ConfigError naming every key that differs (except RESUME_MAY_CHANGE and the generate/merge
    sections). Checked before anything in the output dir is rewritten, so the run's record stays intact."""
    if not os.path.isfile(saved_path):
        return
    saved = load_config(saved_path).to_dict()
    now = cfg.to_dict()
    diff = [f"{s}.{k} {saved[s][k]!r} -> {now[s][k]!r}" for s in now if s not in ("generate", "merge")
            for k in now[s] if f"{s}.{k}" not in RESUME_MAY_CHANGE and now[s][k] != saved[s].get(k)]
    if diff:
        raise ConfigError(f"--resume: the config differs from the run's {saved_path}: {'; '.join(diff)}; resume "
                          f"with the same settings (e.g. `mixtune train {saved_path} --resume`) or start a new "
                          f"--output_dir")
