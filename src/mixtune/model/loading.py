"""Find, load and write Mixtral checkpoints in the real Hugging Face layout (safetensors, SPEC.md §3).

    path = resolve_model_path("")                      # the embedded tiny default (built once, cached)
    model = load_model(path, quant="nf4", dtype=torch.bfloat16, device="cuda")
    save_hf_checkpoint(iter_model_state(model), out_dir, model.config, max_shard_size="5GB")

Loading builds the model on the meta device and streams the checkpoint shard by shard, tensor by tensor:
each tensor is materialised on the target device in the compute dtype and, with `quant="nf4"`, quantized there
at once (q/k/v/o and the stacked experts; router, embeddings, norms and lm_head stay 16-bit). Per-expert keys
`...experts.{e}.w1.weight` are copied into a preallocated (E, out, in) stack, so at most the layers whose
experts are still arriving are held unquantized. Every checkpoint key must be consumed and every model tensor
filled; anything else is a `CheckpointError` naming the keys.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from .._fs import publish_mode
from ..config import ConfigError
from .config import MixtralConfig
from .modeling import MixtralForCausalLM
from .nf4 import NF4Linear, NF4Weight

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TINY_NAME = "tiny-mixtral-v1"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_W = ("w1", "w2", "w3")

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ConfigError):
    """A model directory or checkpoint that cannot be used (the message names the path / keys)."""


# --------------------------------------------------------------------------------------------------
# locating a model
# --------------------------------------------------------------------------------------------------


def default_cache_dir(cache_dir: str = "") -> str:
    """cache_dir, else $MIXTUNE_CACHE, else ~/.cache/mixtune."""
    return os.path.abspath(os.path.expanduser(cache_dir or os.environ.get("MIXTUNE_CACHE")
                                              or os.path.join("~", ".cache", "mixtune")))


def _looks_local(name: str) -> bool:
    """A Hub id is exactly "owner/name"; anything else (absolute, relative, ~) is a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or "\\" in name


def check_model_dir(path: str, need_weights: bool = True) -> None:
    """Raise CheckpointError unless `path` is a directory with config.json (and safetensors weights)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"model directory {path!r} has no config.json")
    if need_weights and not checkpoint_files(path, check=False):
        raise CheckpointError(f"model directory {path!r} has no safetensors weights "
                              f"({SINGLE_FILE} or {INDEX_FILE} + shards)")


def resolve_model_path(name_or_path: str, cache_dir: str = "", revision: Optional[str] = None,
                       need_weights: bool = True) -> str:
    """A local directory holding config.json + safetensors for `name_or_path`.

    "" = the embedded tiny random Mixtral, built once into <cache>/tiny-mixtral-v1; an existing directory is
    used as is; "owner/name" is downloaded from the Hugging Face Hub (*.json, model*.safetensors, tokenizer.model)."""
    if not name_or_path:
        root = default_cache_dir(cache_dir)
        path = os.path.join(root, TINY_NAME)
        if not os.path.isfile(os.path.join(path, "config.json")):
            _build_tiny_atomically(path)
        return path
    local = os.path.abspath(os.path.expanduser(name_or_path))
    if os.path.exists(local) or _looks_local(name_or_path):
        check_model_dir(local, need_weights)
        return local
    return _download(name_or_path, cache_dir, revision, need_weights)


def _build_tiny_atomically(path: str) -> None:
    import shutil
    import tempfile

    from .tiny import make_tiny_checkpoint

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TINY_NAME + ".tmp-", dir=os.path.dirname(path))
    try:
        make_tiny_checkpoint(tmp)
        publish_mode(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race: use theirs
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _download(repo_id: str, cache_dir: str, revision: Optional[str], need_weights: bool) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{repo_id!r} is not a local directory and huggingface_hub is missing: {e}")
    patterns = ["*.json", "model*.safetensors", "tokenizer.model"] if need_weights else ["*.json", "tokenizer.model"]
    try:
        # model.cache_dir set: download under it; else the standard Hugging Face cache (HF_HOME), so a
        # Mixtral already downloaded by other tools is reused instead of fetched again (93 GB)
        hub_cache = os.path.join(default_cache_dir(cache_dir), "hub") if cache_dir else None
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=hub_cache)
    except Exception as e:  # network, auth, missing repo: one line for the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"model {repo_id!r}: not a local directory, and the Hugging Face Hub download "
                              f"failed ({type(e).__name__}: {first})") from None
    check_model_dir(path, need_weights)
    return path


def resolve_dtype(name, device="cpu") -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA device that supports it, else float32; or the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if name == "auto":
        dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise ConfigError(f"model.dtype: unknown dtype {name!r} (auto, bfloat16, float16, float32)")
    return table[name]


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device: {name!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device: {name!r} requested but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are visible")
    return dev


# --------------------------------------------------------------------------------------------------
# the model skeleton
# --------------------------------------------------------------------------------------------------


def load_config_only(name_or_path: str, cache_dir: str = "", revision: Optional[str] = None) -> MixtralConfig:
    """The MixtralConfig of a model (a directory, a config.json file, or a Hub id); weights not needed."""
    if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        return MixtralConfig.from_pretrained(name_or_path)
    path = resolve_model_path(name_or_path, cache_dir, revision, need_weights=False)
    return MixtralConfig.from_pretrained(path)


def build_model_on_meta(config: MixtralConfig, quant: str = "none", dtype: torch.dtype = torch.bfloat16
                        ) -> MixtralForCausalLM:
    """The module tree on the meta device (no memory). quant="nf4" puts NF4 placeholders where load_model
    puts NF4 weights (q/k/v/o -> NF4Linear, experts' w1/w3/w2 -> NF4Weight), so counts and names match."""
    if quant not in ("none", "nf4"):
        raise ConfigError(f"model.quant: unknown quantization {quant!r} (nf4, none)")
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
        model.to(dtype)
        if quant == "nf4":
            for layer in model.model.layers:
                for name in ATTN_PROJ:
                    lin = getattr(layer.self_attn, name)
                    setattr(layer.self_attn, name, NF4Linear(NF4Weight((lin.out_features, lin.in_features), dtype)))
                ex = layer.block_sparse_moe.experts
                for name in EXPERT_W:
                    shape = tuple(getattr(ex, name).shape)
                    delattr(ex, name)
                    setattr(ex, name, NF4Weight(shape, dtype))
    return model


def expected_keys(config: MixtralConfig) -> list[str]:
    """Every tensor key of a Mixtral checkpoint in the real layout, in the canonical order."""
    keys = ["model.embed_tokens.weight"]
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        keys += [p + f"self_attn.{n}.weight" for n in ATTN_PROJ]
        keys.append(p + "block_sparse_moe.gate.weight")
        keys += [p + f"block_sparse_moe.experts.{e}.{w}.weight"
                 for e in range(config.num_local_experts) for w in EXPERT_W]
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    keys.append("model.norm.weight")
    if not config.tie_word_embeddings:
        keys.append("lm_head.weight")
    return keys


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# --------------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _set_param(module: nn.Module, name: str, t: torch.Tensor) -> None:
    if isinstance(getattr(module, name, None), NF4Weight):
        delattr(module, name)
    setattr(module, name, nn.Parameter(t, requires_grad=False))


def load_model(name_or_path: str, *, quant: str = "nf4", dtype: torch.dtype | str = torch.bfloat16,
               device="cpu", cache_dir: str = "", revision: Optional[str] = None,
               report: Optional[Callable[[str], None]] = print) -> MixtralForCausalLM:
    """Load a Mixtral checkpoint (see module doc). Returns the model in eval mode with every base weight
    frozen (requires_grad=False). dtype: the compute dtype of every 16-bit tensor (and what NF4 dequantizes to).
    `model.load_info` (a dict) records what was quantized, the bytes before/after, and the load time.
    """
    t0 = time.perf_counter()
    if quant not in ("nf4", "none"):
        raise ConfigError(f"model.quant: unknown quantization {quant!r} (nf4, none)")
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path, cache_dir, revision)
    config = MixtralConfig.from_pretrained(path)
    files = checkpoint_files(path)
    want = expected_keys(config)
    have = {k for ks in files.values() for k in ks}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(want) - have, key=_natural)
    unexpected = sorted(have - set(want) - optional, key=_natural)
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match its config.json"]
        if missing:
            msg.append(f"missing keys: {_some(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_some(unexpected)}")
        raise CheckpointError("; ".join(msg))

    model = build_model_on_meta(config, "none", dtype)
    E = config.num_local_experts
    stacks: dict[tuple[int, str], list] = {}  # (layer, w) -> [stack (E, out, in), experts seen]
    stats = {"quantized": 0, "q_before": 0, "q_after": 0, "dense": 0, "dense_bytes": 0, "max_open_stacks": 0}
    nf4 = quant == "nf4"

    def place_quantized(owner: nn.Module, name: str, w: torch.Tensor, linear: bool):
        q = NF4Weight.quantize(w)
        stats["quantized"] += 1
        stats["q_before"] += w.numel() * 2
        stats["q_after"] += q.nbytes
        if linear:
            setattr(owner, name, NF4Linear(q))
        else:
            delattr(owner, name)
            setattr(owner, name, q)

    for key, t in iter_checkpoint(path):
        m = _EXPERT_RE.match(key)
        if m:
            l, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
            ex = model.model.layers[l].block_sparse_moe.experts
            shape = tuple(getattr(ex, w).shape)
            if tuple(t.shape) != shape[1:]:
                raise CheckpointError(f"{key}: shape {tuple(t.shape)} in the checkpoint, {shape[1:]} expected")
            slot = stacks.get((l, w))
            if slot is None:
                slot = stacks[(l, w)] = [torch.empty(shape, dtype=dtype, device=device), set()]
            stats["max_open_stacks"] = max(stats["max_open_stacks"], len(stacks))
            slot[0][e].copy_(t)
            slot[1].add(e)
            del t
            if len(slot[1]) == E:  # the layer's stack is complete: place (and quantize) it
                stack = stacks.pop((l, w))[0]
                if nf4:
                    place_quantized(ex, w, stack, linear=False)
                else:
                    _set_param(ex, w, stack)
                    stats["dense"] += 1
                    stats["dense_bytes"] += stack.numel() * stack.element_size()
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head
        modname, _, pname = key.rpartition(".")
        owner = model.get_submodule(modname)
        target = getattr(owner, pname)
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{key}: shape {tuple(t.shape)} in the checkpoint, {tuple(target.shape)} expected")
        w = t.to(device=device, dtype=dtype)
        del t
        attn_name = modname.rpartition(".")[2]
        if nf4 and attn_name in ATTN_PROJ and ".self_attn." in key:
            parent = model.get_submodule(modname.rpartition(".")[0])
            place_quantized(parent, attn_name, w, linear=True)
        else:
            _set_param(owner, pname, w)
            stats["dense"] += 1
            stats["dense_bytes"] += w.numel() * w.element_size()
    if stacks:  # cannot happen after the key check, unless an index lies
        raise CheckpointError(f"checkpoint {path}: incomplete expert stacks {sorted(stacks)}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {path} left model tensors unfilled: {_some(left)}")
    model.eval()
    seconds = time.perf_counter() - t0
    # what was loaded, for reports: bytes of NF4 storage vs the same tensors in 16-bit, dense bytes, time
    model.load_info = {"path": path, "quant": quant, "dtype": str(dtype).replace("torch.", ""),
                       "device": str(device), "nf4_tensors": stats["quantized"], "nf4_bytes": stats["q_after"],
                       "nf4_bytes_as_16bit": stats["q_before"], "dense_tensors": stats["dense"],
                       "dense_bytes": stats["dense_bytes"], "weight_bytes": stats["q_after"] + stats["dense_bytes"],
                       "max_open_expert_stacks": stats["max_open_stacks"], "seconds": round(seconds, 3)}
    if report is not None:
        report(_load_report(path, quant, dtype, device, stats, seconds))
    return model


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _load_report(path, quant, dtype, device, s, seconds) -> str:
    dname = str(dtype).replace("torch.", "")
    lines = [f"loaded {path} on {device} in {seconds:.1f}s (compute dtype {dname})"]
    if quant == "nf4":
        lines.append(f"  nf4 (double-quantized, blocks of 64): {s['quantized']} tensors (q/k/v/o + expert stacks "
                     f"w1/w3/w2): {human_bytes(s['q_before'])} as 16-bit -> {human_bytes(s['q_after'])}")
    lines.append(f"  {dname} (router, embeddings, norms, lm_head"
                 f"{'' if quant == 'nf4' else ', attention, experts'}): {s['dense']} tensors "
                 f"{human_bytes(s['dense_bytes'])}")
    lines.append(f"  weights in memory: {human_bytes(s['q_after'] + s['dense_bytes'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# writing checkpoints
# --------------------------------------------------------------------------------------------------


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


def iter_model_state(model: MixtralForCausalLM, dtype: Optional[torch.dtype] = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a model's base weights in the real checkpoint layout and order (expert stacks split per
    expert, NF4 weights dequantized one at a time, LoRA adapters NOT folded in), in `dtype` (default: each
    tensor's own; NF4 weights in the model's dtype)."""
    cfg = model.config
    sd_dtype = dtype or model.dtype
    for key in expected_keys(cfg):
        m = _EXPERT_RE.match(key)
        if m:
            l, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
            src = getattr(model.model.layers[l].block_sparse_moe.experts, w)
            t = src.dequantize_expert(e, sd_dtype) if isinstance(src, NF4Weight) else src[e]
        else:
            modname, _, pname = key.rpartition(".")
            mod = model.get_submodule(modname)
            if not hasattr(mod, pname) and hasattr(mod, "base"):  # a LoRA wrapper: its frozen base layer
                mod = mod.base
            src = getattr(mod, pname)
            t = src.dequantize(sd_dtype) if isinstance(src, NF4Weight) else src
        yield key, t.detach().to(dtype or t.dtype)


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


__all__ = ["CheckpointError", "resolve_model_path", "resolve_dtype", "resolve_device", "load_model",
           "load_config_only", "build_model_on_meta", "expected_keys", "checkpoint_files", "iter_checkpoint",
           "iter_model_state", "save_hf_checkpoint", "parse_size", "default_cache_dir", "check_model_dir"]
