"""Safetensors checkpoint files in the Hugging Face layout: find the shards, read tensors one at a time, write
sharded checkpoints atomically per shard (a foundation of the model package: no model code here).

    files = checkpoint_files(path)                     # {shard file: [keys]} (index or one model.safetensors)
    for key, t in iter_checkpoint(path): ...           # shard by shard, one tensor materialised at a time
    save_hf_checkpoint(pairs, out_dir, config, max_shard_size="5GB")
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, Optional

import torch

from .._fs import publish_mode
from ..config import ConfigError
from .config import MixtralConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ConfigError):
    """A model directory or checkpoint that cannot be used (the message names the path / keys)."""


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]

def safe_open(fp: str, framework: str = "pt", device: str = "cpu"):
    """safetensors' safe_open, with a damaged or truncated file reported as a CheckpointError naming it."""
    from safetensors import safe_open as _open

    try:
        return _open(fp, framework=framework, device=device)
    except Exception as e:  # SafetensorError (header too small, incomplete buffer...), OSError
        raise CheckpointError(f"{fp}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def checkpoint_files(path: str, check: bool = True) -> dict[str, list[str]]:
    """{shard file name: [keys]} of a model directory (sharded with an index, or one model.safetensors)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                wmap = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files: dict[str, list[str]] = {}
        for key, fname in wmap.items():
            files.setdefault(fname, []).append(key)
        if check:
            for fname, keys in files.items():
                fp = os.path.join(path, fname)
                if not os.path.isfile(fp):
                    raise CheckpointError(f"{index} names shard {fname!r}, which is missing")
                with safe_open(fp, framework="pt") as f:
                    have = set(f.keys())
                lost = sorted(set(keys) - have, key=_natural)
                if lost:
                    raise CheckpointError(f"shard {fname} lacks keys its index assigns to it: {_some(lost)}")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    if len(others) == 1:
        with safe_open(os.path.join(path, others[0]), framework="pt") as f:
            return {others[0]: list(f.keys())}
    return {}


def _some(keys: list[str], n: int = 6) -> str:
    head = ", ".join(keys[:n])
    return head + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def iter_checkpoint(path: str, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a model directory, shard by shard, keys in layer order within a shard; tensors are
    read one at a time in their stored dtype (only the current tensor is materialised)."""
    files = checkpoint_files(path)
    if not files:
        raise CheckpointError(f"model directory {path!r} has no safetensors weights")
    for fname in sorted(files):  # model-00001-of-N, model-00002-of-N, ...
        with safe_open(os.path.join(path, fname), framework="pt", device=str(device)) as f:
            for key in sorted(files[fname], key=_natural):
                yield key, f.get_tensor(key)

def parse_size(size) -> int:
    """'5GB' / '500MB' / '10KiB' / int bytes -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConfigError(f"merge.max_shard_size: cannot read {size!r} (e.g. 5GB, 500MB)")
    base = 1024 if m.group(3) else 1000
    mult = {"": 1, "K": base, "M": base ** 2, "G": base ** 3, "T": base ** 4}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def save_hf_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]] | dict, out_dir: str, config: MixtralConfig,
                       *, max_shard_size="5GB", dtype: Optional[torch.dtype] = None) -> list[str]:
    """Write (key, tensor) pairs as an HF checkpoint: safetensors shards of at most max_shard_size (a shard
    holds more only when one tensor alone is larger), `model.safetensors.index.json` when there is more than
    one shard (else a single model.safetensors), and config.json (torch_dtype set to the written dtype).

    `tensors` is consumed lazily (an iterator can produce one layer at a time): only the current shard is
    held in memory. dtype: cast every tensor (None = keep each tensor's). Earlier model*.safetensors files and
    the index in out_dir are replaced. Returns the written file names."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if (f.startswith("model") and f.endswith(".safetensors")) or f == INDEX_FILE or f.startswith(".shard-"):
            os.remove(os.path.join(out_dir, f))
    items = tensors.items() if isinstance(tensors, dict) else tensors
    shard: dict[str, torch.Tensor] = {}
    size = 0
    tmp_names: list[str] = []
    keys_of: list[list[str]] = []
    total = 0
    seen_dtype = None

    def flush():
        nonlocal shard, size
        if not shard:
            return
        name = f".shard-{len(tmp_names):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        tmp_names.append(name)
        keys_of.append(list(shard))
        shard, size = {}, 0

    for key, t in items:
        if key in shard or any(key in ks for ks in keys_of):
            raise ValueError(f"save_hf_checkpoint: key {key!r} given twice")
        t = t.detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if t.device.type != "cpu":
            t = t.cpu()
        # a view into a larger storage (e.g. one expert of a stack) is copied so shards never share memory
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        nb = t.numel() * t.element_size()
        if shard and size + nb > limit:
            flush()
        shard[key] = t
        size += nb
        total += nb
        seen_dtype = seen_dtype or t.dtype
    flush()
    if not tmp_names:
        raise ValueError("save_hf_checkpoint: no tensors to write")
    n = len(tmp_names)
    if n == 1:
        finals = [SINGLE_FILE]
    else:
        finals = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(tmp_names, finals):
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        publish_mode(os.path.join(out_dir, final))
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: final for ks, final in zip(keys_of, finals) for k in ks}}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as fh:
            json.dump(index, fh, indent=2)
    cfg = MixtralConfig.from_dict(config.to_hf_dict())
    cfg.torch_dtype = str(dtype or seen_dtype).replace("torch.", "")
    cfg.save(out_dir)
    return finals + ([INDEX_FILE] if n > 1 else []) + ["config.json"]


def shard_size_for(sizes: list[int], shards: int) -> int:
    """The smallest max_shard_size that splits tensors of `sizes` bytes (in order) into at most `shards`."""
    def count(limit):
        n, cur = 1, 0
        for s in sizes:
            if cur and cur + s > limit:
                n, cur = n + 1, 0
            cur += s
        return n

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= shards:
            hi = mid
        else:
            lo = mid + 1
    return lo
