"""Training state without pickle: a state dict (optimizer, scheduler, RNG) as `NAME.json` — its structure and
numbers — plus `NAME.safetensors` for its tensors. Loading it never runs code: JSON and safetensors hold data
only. An older checkpoint's `NAME.pt` is read with `torch.load(weights_only=True)` (tensors and plain
containers; numpy's random-state array for rng.pt), and anything else in it is refused in one line.

    save_state(optimizer.state_dict(), "ckpt/step-4", "optimizer")   # optimizer.json + optimizer.safetensors
    sd = load_state("ckpt/step-4", "optimizer")                      # CheckpointError if damaged or unsafe

JSON value encoding: containers and scalars as themselves; {"__tensor__": key} (into the safetensors file; a
tensor object shared by several entries, like AdamW8bit's qmaps, is stored once and stays shared),
{"__tuple__": [...]}, {"__items__": [[key, value], ...]} (a dict with non-string keys, e.g. parameter ids),
{"__float__": "nan" | "inf" | "-inf"}, {"__ndarray__": {"dtype", "shape", "data"}} (numeric numpy arrays).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch

STATE_FORMAT = "mixtune-state/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, damaged, unsafe, or from a different run)."""


_MARKERS = ("__tensor__", "__tuple__", "__items__", "__float__", "__ndarray__")


def _encode(obj: Any, tensors: dict, seen: dict) -> Any:
    """A JSON value for `obj`; tensors go to `tensors` under a key the value refers to (one per tensor object,
    so a tensor shared by several entries, like AdamW8bit's qmaps, stays shared)."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if torch.is_tensor(obj):
        if id(obj) not in seen:
            seen[id(obj)] = f"t{len(tensors)}"
            tensors[seen[id(obj)]] = obj
        return {"__tensor__": seen[id(obj)]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    import numpy as np
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, seen)
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(v: Any, tensors: dict) -> Any:
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) == 1 and next(iter(v)) in _MARKERS:
        kind, x = next(iter(v.items()))
        if kind == "__tensor__":
            if not isinstance(x, str) or x not in tensors:
                raise ValueError(f"reference to a missing tensor {x!r}")
            return tensors[x]
        if kind == "__tuple__" and isinstance(x, list):
            return tuple(_decode(e, tensors) for e in x)
        if kind == "__items__" and isinstance(x, list) and all(isinstance(e, list) and len(e) == 2 for e in x):
            return {_hashable(_decode(k, tensors)): _decode(e, tensors) for k, e in x}
        if kind == "__float__" and x in ("nan", "inf", "-inf"):
            return float(x)
        if kind == "__ndarray__" and isinstance(x, dict):
            import numpy as np
            dt = np.dtype(str(x.get("dtype")))
            if dt.kind not in "biuf":
                raise ValueError(f"array dtype {dt} is not numeric")
            return np.asarray(x["data"], dtype=dt).reshape([int(n) for n in x["shape"]])
        raise ValueError(f"malformed {kind} entry")
    return {k: _decode(e, tensors) for k, e in v.items()}


def _hashable(k: Any) -> Any:
    if k is None or isinstance(k, (bool, int, float, str)):
        return k
    if isinstance(k, tuple) and all(_hashable(e) is e for e in k):
        return k
    raise ValueError(f"a dict key of type {type(k).__name__}")


def _for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors refuses shared or partial storage)."""
    out, storages = {}, set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() == 0 or ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_state(obj: Any, directory: str, name: str) -> list[str]:
    """Write `obj` (a state dict: containers, numbers, strings, tensors, numpy arrays) as `name`.json, its
    tensors as `name`.safetensors. Returns the file names written."""
    from safetensors.torch import save_file

    tensors: dict = {}
    value = _encode(obj, tensors, {})
    files = [f"{name}.json"]
    if tensors:
        files.append(f"{name}.safetensors")
        save_file(_for_safetensors(tensors), os.path.join(directory, files[1]), metadata={"format": STATE_FORMAT})
    with open(os.path.join(directory, files[0]), "w") as fh:
        json.dump({"format": STATE_FORMAT, "tensors": files[1] if tensors else None, "value": value}, fh,
                  allow_nan=False)
    return files


def load_state(directory: str, name: str) -> Any:
    """Read what `save_state` wrote; a checkpoint of an older version has `name`.pt instead, read with
    torch.load(weights_only=True). Raises CheckpointError (one line) for anything damaged or unsafe."""
    from safetensors.torch import load_file

    jpath = os.path.join(directory, f"{name}.json")
    if not os.path.isfile(jpath) and os.path.isfile(os.path.join(directory, f"{name}.pt")):
        return _load_legacy(os.path.join(directory, f"{name}.pt"), name)
    f = jpath
    try:
        doc = _read_doc(jpath, name)
        tensors = {}
        if doc["tensors"] is not None:
            f = os.path.join(directory, doc["tensors"])
            tensors = load_file(f)
        return _decode(doc["value"], tensors)
    except Exception as e:  # missing, damaged, hand-edited, too deep (RecursionError)
        raise unreadable_error(f, e) from None


def _read_doc(jpath: str, name: str) -> dict:
    with open(jpath, "rb") as fh:
        doc = json.loads(fh.read().decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or "value" not in doc:
        raise ValueError(f"not a {STATE_FORMAT} file")
    if doc.get("tensors") not in (None, f"{name}.safetensors"):  # a fixed sibling: never a path from the file
        raise ValueError(f"unexpected tensor file {doc['tensors']!r}")
    doc.setdefault("tensors", None)
    return doc


def unreadable_error(f: str, e: BaseException) -> CheckpointError:
    msg = " ".join(str(e).split())[:200]
    return CheckpointError(f"checkpoint file {f} cannot be read ({type(e).__name__}: {msg}); resume from an "
                           f"earlier checkpoint with --resume DIR")


def _load_legacy(f: str, name: str) -> Any:
    """An older checkpoint's pickle, loaded only if it holds tensors and plain containers (and, in rng.pt,
    numpy's random-state array)."""
    allowed = []
    if name == "rng":
        import numpy as np
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # pragma: no cover - numpy < 2
            from numpy.core.multiarray import _reconstruct
        allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # MT19937's key array
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        m = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(e))
        if m or "weights_only" in str(e).lower() or "Weights only load failed" in str(e):
            raise CheckpointError(f"checkpoint file {f} (an older pickle format) holds more than tensors "
                                  f"({m.group(0) if m else 'not loadable with weights_only'}); it was not loaded, "
                                  f"since unpickling it could run code: resume from a checkpoint you wrote "
                                  f"with this version, or start a new run") from None
        raise unreadable_error(f, e) from None


def check_state(directory: str, name: str) -> None:
    """What `load_state` checks, without reading the tensors' data (safetensors headers only): a cheap test of
    a checkpoint before the model is built. An older `.pt` is loaded (safely) in full."""
    from safetensors import safe_open

    jpath = os.path.join(directory, f"{name}.json")
    if not os.path.isfile(jpath) and os.path.isfile(os.path.join(directory, f"{name}.pt")):
        _load_legacy(os.path.join(directory, f"{name}.pt"), name)
        return
    f = jpath
    try:
        doc = _read_doc(jpath, name)
        if doc["tensors"] is not None:
            f = os.path.join(directory, doc["tensors"])
            with safe_open(f, framework="pt") as sf:
                keys = set(sf.keys())
        else:
            keys = set()
        _decode(doc["value"], {k: None for k in keys})
    except Exception as e:
        raise unreadable_error(f, e) from None
