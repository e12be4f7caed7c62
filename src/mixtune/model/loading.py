"""Load a checkpoint into mixtune's model: build it on the meta device, stream the safetensors shard by shard,
quantize to NF4 on the target device as tensors arrive (SPEC.md §3).

    model = load_model(path, quant="nf4", dtype=torch.bfloat16, device="cuda")
    skeleton = build_model_on_meta(config, "nf4")      # no memory: counts, names, planning

Each tensor is materialised on the target device in the compute dtype and, with `quant="nf4"`, quantized there
at once (q/k/v/o and the stacked experts; router, embeddings, norms and lm_head stay 16-bit). Per-expert keys
`...experts.{e}.w1.weight` are copied into a preallocated (E, out, in) stack, so at most the layers whose
experts are still arriving are held unquantized. Every checkpoint key must be consumed and every model tensor
filled; anything else is a `CheckpointError` naming the keys. Locating a model is `hub.py`; the key layout
`layout.py`; the files `safetensors_io.py`; writing the tiny default `tiny.py`.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Optional

import torch
from torch import nn

from ..config import ConfigError
from ..runtime import resolve_device, resolve_dtype
from .config import MoEConfig
from .hub import load_config_only, resolve_model_path
from .layout import EXPERT_RE, EXPERT_W, quantized_linear, to_internal
from .modeling import MoEForCausalLM
from .nf4 import NF4Linear, NF4Weight
from .safetensors_io import CheckpointError, _natural, _some, checkpoint_files, iter_checkpoint


# --------------------------------------------------------------------------------------------------
# the model skeleton
# --------------------------------------------------------------------------------------------------


def _quantizable_linears(model: nn.Module) -> list[str]:
    """Module paths of the linears quant="nf4" stores in 4-bit (layout.quantized_linear)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and quantized_linear(n)]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def build_model_on_meta(config: MoEConfig, quant: str = "none", dtype: torch.dtype = torch.bfloat16
                        ) -> MoEForCausalLM:
    """The module tree on the meta device (no memory). quant="nf4" puts NF4 placeholders where load_model
    puts NF4 weights (attention and dense-MLP linears -> NF4Linear, expert stacks -> NF4Weight), so counts and
    names match."""
    if quant not in ("none", "nf4"):
        raise ConfigError(f"model.quant: unknown quantization {quant!r} (nf4, none)")
    with torch.device("meta"):
        model = MoEForCausalLM(config)
        model.to(dtype)
        if quant == "nf4":
            for path in _quantizable_linears(model):
                lin = model.get_submodule(path)
                _replace(model, path, NF4Linear(NF4Weight((lin.out_features, lin.in_features), dtype), lin.bias))
            for layer in model.model.layers:
                if not hasattr(layer, "block_sparse_moe"):
                    continue
                ex = layer.block_sparse_moe.experts
                for name in EXPERT_W:
                    shape = tuple(getattr(ex, name).shape)
                    delattr(ex, name)
                    setattr(ex, name, NF4Weight(shape, dtype))
    return model


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _set_param(module: nn.Module, name: str, t: torch.Tensor) -> None:
    if isinstance(getattr(module, name, None), NF4Weight):
        delattr(module, name)
    setattr(module, name, nn.Parameter(t, requires_grad=False))


def check_checkpoint(path: str, shapes: bool = True) -> MoEConfig:
    """The config of the model directory `path`, after checking that its safetensors hold exactly the keys its
    config.json implies and (shapes=True) with the shapes it implies, from the file headers alone (no tensor is
    read). A contradiction (expert count, head_dim, sizes) is a CheckpointError naming the keys: a run can call
    this before it writes anything."""
    from .safetensors_io import safe_open

    config = load_config_only(path)
    files = checkpoint_files(path)
    internal = to_internal(config)
    have = {k for ks in files.values() for k in ks}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(internal) - have - optional, key=_natural)
    unexpected = sorted(have - set(internal), key=_natural)
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match its config.json ({config.model_type}, "
               f"{config.num_local_experts} experts, head_dim {config.head_dim})"]
        if missing:
            msg.append(f"missing keys: {_some(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_some(unexpected)}")
        raise CheckpointError("; ".join(msg))
    if shapes:
        with torch.device("meta"):
            want = {config.family.checkpoint_name(k): tuple(t.shape) for k, t in _meta_state(config).items()}
        for fname, keys in files.items():
            with safe_open(os.path.join(path, fname), framework="pt") as f:
                for k in keys:
                    got = tuple(f.get_slice(k).get_shape())
                    if k in want and got != want[k]:
                        raise CheckpointError(f"{k}: shape {got} in the checkpoint, {want[k]} expected from "
                                              f"{os.path.join(path, 'config.json')} (config.json and the "
                                              f"weights disagree)")
    return config


def _meta_state(config: MoEConfig) -> dict:
    """Our key -> meta tensor of the right shape, experts split per expert (as checkpoint keys are)."""
    model = MoEForCausalLM(config)
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        m = re.match(r"^(.*\.experts)\.(w[123])$", name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
        else:
            out[name] = t
    return out


LAYER_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.")


class LayerParking:
    """Moves each decoder layer to the CPU as soon as its last tensor is in place (`offload_layers`), so a
    model larger than one GPU can be built layer by layer on that GPU (quantized there) and sharded later
    (`loop.fsdp.shard_model` brings one layer back at a time): the device holds at most the layers still being
    filled. Call `filled(key)` after placing the tensor of our key `key`; `finish()` parks whatever is left.
    shard_of=(rank, world): a parked layer keeps only this rank's FSDP chunk of its NF4 storage
    (`NF4Weight.park_shard`), so the host holds 1/world of the 4-bit model per rank."""

    def __init__(self, model: MoEForCausalLM, enabled: bool, shard_of: Optional[tuple[int, int]] = None):
        self.model, self.enabled, self.parked = model, enabled, set()
        self.shard_of = shard_of if shard_of and shard_of[1] > 1 else None  # (rank, world)

    def _complete(self, layer: nn.Module) -> bool:
        return not any(t.is_meta for t in list(layer.parameters()) + list(layer.buffers()))

    def filled(self, key: str) -> None:
        m = LAYER_KEY_RE.match(key) if self.enabled else None
        if m is None:
            return
        idx = int(m.group(1))
        layer = self.model.model.layers[idx]
        if idx not in self.parked and self._complete(layer):
            self._park(idx, layer)

    def _park(self, idx: int, layer: nn.Module) -> None:
        layer.to("cpu")
        if self.shard_of:  # only this rank's chunk of the 4-bit storage stays on the host
            for m in layer.modules():
                if isinstance(m, NF4Weight):
                    m.park_shard(*self.shard_of)
        self.parked.add(idx)

    def finish(self) -> None:
        if self.enabled:
            for idx, layer in enumerate(self.model.model.layers):
                if idx not in self.parked and self._complete(layer):
                    self._park(idx, layer)


def load_model(name_or_path: str, *, quant: str = "nf4", dtype: torch.dtype | str = torch.bfloat16,
               device="cpu", cache_dir: str = "", revision: Optional[str] = None, family: str = "mixtral",
               report: Optional[Callable[[str], None]] = print, offload_layers: bool = False,
               shard_of: Optional[tuple[int, int]] = None) -> MoEForCausalLM:
    """Load a Mixtral checkpoint (see module doc). Returns the model in eval mode with every base weight
    frozen (requires_grad=False). dtype: the compute dtype of every 16-bit tensor (and what NF4 dequantizes to).
    `model.load_info` (a dict) records what was quantized, the bytes before/after, and the load time.
    offload_layers: each decoder layer is built (quantized) on `device`, then parked on the CPU as soon as it is
    complete (`LayerParking`; for `train.distributed: fsdp`, which shards layer by layer); the embedding, final
    norm and lm_head stay on `device`. shard_of=(rank, world) with offload_layers: a parked layer keeps only
    this rank's FSDP chunk of its NF4 storage (unreadable until `loop.fsdp.shard_model` shards it).
    """
    t0 = time.perf_counter()
    if quant not in ("nf4", "none"):
        raise ConfigError(f"model.quant: unknown quantization {quant!r} (nf4, none)")
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path, cache_dir, revision, family=family)
    config = check_checkpoint(path, shapes=False)
    internal = to_internal(config)  # {checkpoint key: our key}

    model = build_model_on_meta(config, "none", dtype)
    E = config.num_local_experts
    stacks: dict[tuple[int, str], list] = {}  # (layer, w) -> [stack (E, out, in), experts seen]
    stats = {"quantized": 0, "q_before": 0, "q_after": 0, "dense": 0, "dense_bytes": 0, "max_open_stacks": 0}
    nf4 = quant == "nf4"
    parking = LayerParking(model, offload_layers, shard_of)

    def place_quantized(owner: nn.Module, name: str, w: torch.Tensor, linear: bool):
        q = NF4Weight.quantize(w)
        stats["quantized"] += 1
        stats["q_before"] += w.numel() * 2
        stats["q_after"] += q.nbytes
        if linear:  # the linear's bias (if any, 16-bit) goes along
            setattr(owner, name, NF4Linear(q, getattr(owner, name).bias))
        else:
            delattr(owner, name)
            setattr(owner, name, q)

    for ckey, t in iter_checkpoint(path):
        key = internal.get(ckey, ckey)  # our module tree's name for it
        m = EXPERT_RE.match(key)
        if m:
            l, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
            ex = model.model.layers[l].block_sparse_moe.experts
            shape = tuple(getattr(ex, w).shape)
            if tuple(t.shape) != shape[1:]:
                raise CheckpointError(f"{ckey}: shape {tuple(t.shape)} in the checkpoint, {shape[1:]} expected "
                                      f"(config.json and the weights disagree)")
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
                parking.filled(key)
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head
        modname, _, pname = key.rpartition(".")
        owner = model.get_submodule(modname)
        target = getattr(owner, pname)
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{ckey}: shape {tuple(t.shape)} in the checkpoint, {tuple(target.shape)} "
                                  f"expected (config.json and the weights disagree)")
        w = t.to(device=device, dtype=dtype)
        del t
        if nf4 and pname == "weight" and quantized_linear(modname):
            parent_path, _, leaf = modname.rpartition(".")
            place_quantized(model.get_submodule(parent_path), leaf, w, linear=True)
        else:
            _set_param(owner, pname, w)
            stats["dense"] += 1
            stats["dense_bytes"] += w.numel() * w.element_size()
        parking.filled(key)
    if stacks:  # cannot happen after the key check, unless an index lies
        raise CheckpointError(f"checkpoint {path}: incomplete expert stacks {sorted(stacks)}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {path} left model tensors unfilled: {_some(left)}")
    parking.finish()
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


__all__ = ["CheckpointError", "load_model", "check_checkpoint", "build_model_on_meta", "human_bytes"]
