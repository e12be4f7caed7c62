"""Fold a LoRA adapter into 16-bit base weights and write an HF checkpoint that stock transformers loads.

    mixtune merge --model mistralai/Mixtral-8x7B-v0.1 --adapter runs/x/adapter --out runs/x/merged
    result = merge_main(cfg, "runs/x/adapter", "runs/x/merged")

Never folds into 4-bit weights. `merge.base` picks what the deltas are added to:
- "original" (default): the checkpoint's own tensors, streamed shard by shard, one tensor at a time;
- "dequantized": the NF4 weights the adapter was trained against, rebuilt exactly as `load_model` builds them
  (each tensor cast to the training compute dtype `model.dtype`, q/k/v/o quantized per matrix, each layer's
  experts quantized as one (E, out, in) stack), then dequantized to fp32.
W' = W + (alpha / r) · B @ A is computed in fp32 and written in `merge.dtype` ("auto" = each tensor's stored
dtype), in the real key layout (per-expert `experts.{e}.w1.weight`, ...), sharded by `merge.max_shard_size`,
with config.json, generation_config.json and the tokenizer files. The output appears atomically (written to a
temporary sibling directory, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator, Optional

import torch

from ._fs import as_os_error, publish_mode, writing
from .config import Config, ConfigError
from .lora import adapter_deltas, merge_into_state_dict, read_adapter
from .lora.merge import merge_scaling

MARKER = "mixtune_merge.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _check_out_dir(out_dir: str, model: str = "") -> None:
    """Refuse to replace a non-empty directory that is not an earlier mixtune merge, or the directory the base
    model is read from (`model`, when it is a local directory; an earlier merge included)."""
    if model and os.path.isdir(model):
        a, b = os.path.realpath(out_dir), os.path.realpath(model)
        if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
            raise ConfigError(f"merge.out: {out_dir} is {'inside ' if a.startswith(b + os.sep) else ''}the "
                              f"directory the base model is read from ({model}); a merge never writes there: "
                              f"choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"merge.out: {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MARKER)):
        raise ConfigError(f"merge.out: {out_dir} exists and is not an earlier mixtune merge; choose another "
                          f"directory or remove it")


def _dequantized_stream(path: str, qdtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, fp32 tensor) of the weights a `load_model(quant="nf4", dtype=qdtype)` model holds, dequantized.

    Attention projections: quantized per matrix; experts: each layer's (E, out, in) stack quantized as one
    tensor (as load_model does: per-expert blocks, but the double-quantization statistics span the stack);
    everything else: cast to qdtype, as training saw it."""
    from .model import iter_checkpoint, load_config_only
    from .model.layout import EXPERT_RE, quantized_linear, to_internal
    from .quant.nf4 import NF4Weight

    config = load_config_only(path)
    E, fam, internal = config.num_local_experts, config.family, to_internal(config)
    stacks: dict[tuple[int, str], list] = {}  # (layer, w) -> [stack (E, out, in) in qdtype, experts seen]
    for key, t in iter_checkpoint(path):
        m = EXPERT_RE.match(internal.get(key, key))  # our naming: ...block_sparse_moe.experts.{e}.w1.weight
        if m:
            l, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
            slot = stacks.get((l, w))
            if slot is None:
                slot = stacks[(l, w)] = [torch.empty((E,) + tuple(t.shape), dtype=qdtype, device=device), set()]
            slot[0][e].copy_(t)
            slot[1].add(e)
            if len(slot[1]) == E:
                q = NF4Weight.quantize(stacks.pop((l, w))[0])
                for j in range(E):
                    yield fam.checkpoint_name(f"model.layers.{l}.block_sparse_moe.experts.{j}.{w}.weight"), \
                        q.dequantize_expert(j, torch.float32).cpu()
                del q
            continue
        w = t.to(device=device, dtype=qdtype)
        mod, _, leaf = internal.get(key, key).rpartition(".")
        if leaf == "weight" and quantized_linear(mod):
            yield key, NF4Weight.quantize(w).dequantize(torch.float32).cpu()
        else:
            yield key, w.float().cpu()
    if stacks:
        raise ConfigError(f"checkpoint {path}: incomplete expert stacks {sorted(stacks)}")


def _stored_dtypes(path: str) -> dict[str, torch.dtype]:
    """Each tensor's stored dtype, read from the safetensors headers (no data)."""
    from safetensors import safe_open

    from .model import checkpoint_files

    out = {}
    for fname, keys in checkpoint_files(path).items():
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for k in keys:
                out[k] = f.get_slice(k).get_dtype()
    return out


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def merge_main(cfg: Config, adapter_dir: str, out_dir: str) -> dict:
    """Merge `adapter_dir` into the base model `cfg.model.name_or_path`; write an HF checkpoint to `out_dir`.
    Returns a summary dict (JSON-serialisable)."""
    from .model import checkpoint_files, load_config_only, iter_checkpoint, resolve_model_path, save_hf_checkpoint
    from .runtime import resolve_device, resolve_dtype

    t0 = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir, cfg.model.name_or_path)
    path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision,
                              family=cfg.model.family)
    _check_out_dir(out_dir, path)  # the resolved base too (the tiny default, a Hub snapshot)
    config = load_config_only(path)
    acfg, tensors, _ = read_adapter(adapter_dir)
    deltas = adapter_deltas(tensors)
    scaling = merge_scaling(acfg, deltas)  # alpha / r; per weight when rank_pattern / alpha_pattern say so
    del tensors
    have = {k for ks in checkpoint_files(path).values() for k in ks}
    stray = sorted(set(deltas) - have)
    if stray:
        raise ConfigError(f"adapter {adapter_dir}: {len(stray)} deltas name weights the base model {path} does "
                          f"not have, e.g. {', '.join(stray[:3])}")
    out_dtype = None if cfg.merge.dtype == "auto" else _DTYPES[cfg.merge.dtype]
    stored = {k: _ST_DTYPES.get(v, None) for k, v in _stored_dtypes(path).items()}
    consumed: set = set()

    if cfg.merge.base == "original":
        source = iter_checkpoint(path)
    else:
        device = resolve_device(cfg.model.device)
        qdtype = resolve_dtype(cfg.model.dtype, device)
        source = _dequantized_stream(path, qdtype, device)

    counts = {"tensors": 0, "merged": 0, "bytes": 0}

    def merged_stream():
        for key, t in source:
            odt = out_dtype or stored.get(key) or t.dtype
            out = merge_into_state_dict({key: t}, deltas, scaling, dtype=odt, consumed=consumed)[key]
            counts["tensors"] += 1
            counts["bytes"] += out.numel() * out.element_size()
            yield key, out

    parent = os.path.dirname(out_dir)
    with writing(parent):
        os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent)
    tmp, held = _locked_temporary(parent)
    try:
        files = save_hf_checkpoint(merged_stream(), tmp, config, max_shard_size=cfg.merge.max_shard_size)
        missing = sorted(set(deltas) - consumed)
        if missing:  # cannot happen after the key check, unless a shard lies about its keys
            raise ConfigError(f"merge: {len(missing)} adapter deltas were not applied, e.g. {missing[:3]}")
        counts["merged"] = len(consumed)
        written = _written_dtype(out_dtype, stored)
        _write_config(path, tmp, written)
        files += _copy_tokenizer(cfg, path, tmp)
        summary = {"out_dir": out_dir, "model": path, "adapter": os.path.abspath(adapter_dir),
                   "base": cfg.merge.base, "dtype": written, "scaling": scaling,
                   "merged_matrices": counts["merged"], "tensors": counts["tensors"], "bytes": counts["bytes"],
                   "files": sorted(set(files))}
        if cfg.merge.base == "dequantized":
            summary["quantized_from"] = str(qdtype).replace("torch.", "")
        with open(os.path.join(tmp, MARKER), "w") as fh:
            json.dump(summary, fh, indent=2)
        _swap_into_place(tmp, out_dir)
    except Exception as e:  # disk full, read-only, permission: one OSError naming the output
        err = as_os_error(e, out_dir)
        if err is None:
            raise
        raise err from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(held)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _written_dtype(out_dtype: Optional[torch.dtype], stored: dict) -> str:
    if out_dtype is not None:
        return str(out_dtype).replace("torch.", "")
    floats = {d for d in stored.values() if d is not None}
    return str(floats.pop()).replace("torch.", "") if len(floats) == 1 else "mixed"


def _write_config(src_dir: str, out_dir: str, dtype_name: str) -> None:
    """The base model's own config.json (every field kept), with the written dtype."""
    with open(os.path.join(src_dir, "config.json")) as fh:
        hf = json.load(fh)
    if dtype_name != "mixed":
        hf["torch_dtype"] = dtype_name
        if "dtype" in hf:
            hf["dtype"] = dtype_name
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)


def _copy_tokenizer(cfg: Config, model_dir: str, out_dir: str) -> list[str]:
    """Tokenizer + generation config next to the weights: copied from the model dir, or written by
    mixtune.data's tokenizer (when `model.tokenizer` names one, or the model dir has none)."""
    copied = []
    for f in TOKENIZER_FILES:
        src = os.path.join(model_dir, f)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, f))
            copied.append(f)
    has_tok = any(f.startswith("tokenizer") for f in copied)
    if cfg.model.tokenizer or not has_tok:
        from .data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.model.tokenizer, model_dir)
        copied += list(tok.save_pretrained(out_dir) or [])
    return copied


def _locked_temporary(parent: str) -> tuple[str, int]:
    """A fresh `.merge-tmp-*` directory in `parent` and the flock that marks it live (see
    `_remove_stale_temporaries`): (path, fd to close when done)."""
    from .runlock import try_lock_dir

    while True:
        tmp = tempfile.mkdtemp(prefix=".merge-tmp-", dir=parent)
        fd = try_lock_dir(tmp)  # None: another merge's clean-up took it in between (it was unlocked): again
        if fd is not None and os.path.isdir(tmp):
            return tmp, fd
        if fd is not None:
            os.close(fd)


def _remove_stale_temporaries(parent: str) -> None:
    """Remove the `.merge-tmp-*` / `.merge-old-*` directories of merges that died (a live merge holds a flock
    on its temporary; the kernel drops it when the process dies)."""
    from .runlock import try_lock_dir

    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith((".merge-tmp-", ".merge-old-")) or not os.path.isdir(path) or os.path.islink(path):
            continue
        fd = try_lock_dir(path)
        if fd is None:
            continue  # a live merge's
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        print(f"mixtune: removed {path}, left by a merge that did not finish", file=sys.stderr)


def _swap_into_place(tmp: str, out_dir: str) -> None:
    publish_mode(tmp)
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=".merge-old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)  # an earlier merge (checked by _check_out_dir): moved aside, then removed
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
