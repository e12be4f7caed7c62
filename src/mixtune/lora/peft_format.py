"""Adapter files in PEFT format, and the mapping between our LoRA modules and PEFT's tensor names.

    save_adapter(model, "out/adapter", cfg.lora, "mistralai/Mixtral-8x7B-v0.1")
    load_adapter(fresh_model, "out/adapter")                    # applies LoRA with the adapter's config

Adapter files follow PEFT's naming with the real checkpoint's module names, experts per expert
(`base_model.model.model.layers.{l}.block_sparse_moe.experts.{e}.w1.lora_A.weight`), which stock peft 0.21 loads
onto transformers 5.x (it fuses the experts itself).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from typing import Iterable, Optional

import torch
from torch import nn

from .._fs import publish_mode
from ..config import ConfigError, LoraConfig
from .modules import ExpertLoRA, LoRALinear
from .targets import (EXPERT_NAMES, LINEAR_NAMES, PARAM_LINEAR_NAMES, LoraReport, _candidates, apply_lora,
                      family_of_model)

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "mixtune_adapter.json"  # our own notes next to the PEFT files (peft ignores it)


# --------------------------------------------------------------------------------------------------
# adapter state in PEFT naming
# --------------------------------------------------------------------------------------------------


def _expert_key(fam, exp_path: str, e: int, role: str, ab: str) -> str:
    """The PEFT key of expert e's `role` (w1/w3/w2) matrix, in the family's checkpoint naming."""
    return f"{PEFT_PREFIX}{fam.checkpoint_name(f'{exp_path}.{e}.{role}')}.lora_{ab}.weight"


def _adapter_slots(model: nn.Module) -> dict[str, tuple[nn.Parameter, Optional[int]]]:
    """PEFT key -> (our parameter, expert index or None). Expert keys address one expert's slice. Keys use the
    family's checkpoint names (Mixtral `block_sparse_moe.experts.{e}.w1`, Qwen `mlp.experts.{e}.gate_proj`)."""
    fam = family_of_model(model)
    slots = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            slots[f"{PEFT_PREFIX}{fam.checkpoint_name(name)}.lora_A.weight"] = (mod.lora_A, None)
            slots[f"{PEFT_PREFIX}{fam.checkpoint_name(name)}.lora_B.weight"] = (mod.lora_B, None)
        elif isinstance(mod, ExpertLoRA):
            exp_path = name.rsplit(".", 1)[0]  # ...block_sparse_moe.experts
            for w in mod.A:
                for e in range(mod.num_experts):
                    slots[_expert_key(fam, exp_path, e, w, "A")] = (mod.A[w], e)
                    slots[_expert_key(fam, exp_path, e, w, "B")] = (mod.B[w], e)
    return slots


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT keys (CPU, contiguous): linears (r, in) / (out, r); experts per expert."""
    out = {}
    for key, (p, e) in _adapter_slots(model).items():
        t = p.detach() if e is None else p.detach()[e]
        out[key] = t.to("cpu").contiguous().clone()
    return out


def set_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], skip_leaves: Iterable[str] = (),
                           origin: str = "adapter") -> None:
    """Copy PEFT-named adapter tensors into a model that already has its LoRA modules (e.g. to resume).
    Every adapter slot must be filled and every tensor used (tensors of `skip_leaves`, e.g. zero padding
    for peft's w1/w3 fusion, are ignored); shapes must agree. Errors name the keys."""
    skip = set(skip_leaves)
    slots = _adapter_slots(model)
    unknown, loaded = [], set()
    first: dict = {}  # (parameter id, expert) -> the key that filled it (a shared gate/up A has two keys)
    with torch.no_grad():
        for key, t in tensors.items():
            if key not in slots:
                leaf = key.split(".lora_")[0].rsplit(".", 1)[-1]
                if leaf not in skip:
                    unknown.append(key)
                continue
            p, e = slots[key]
            dst = p if e is None else p[e]
            if tuple(dst.shape) != tuple(t.shape):
                raise ConfigError(f"adapter: {key} has shape {tuple(t.shape)} but the model expects "
                                  f"{tuple(dst.shape)}; is {origin} an adapter for this base model and rank?")
            twin = first.setdefault((id(p), e), key)
            if twin != key and not torch.equal(dst, t.to(dst.dtype)):
                raise ConfigError(f"adapter: {key} and {twin} differ, but this model's gate and up adapters share "
                                  f"one A (lora.shared_gate_up_a); {origin} was trained with separate ones: "
                                  "set lora.shared_gate_up_a false to load it")
            dst.copy_(t.to(dst.dtype))
            loaded.add(key)
    if unknown:
        raise ConfigError(f"adapter: {len(unknown)} tensors in {origin} match nothing in this model, e.g. "
                          f"{', '.join(sorted(unknown)[:3])}")
    missing = sorted(set(slots) - loaded)
    if missing:
        raise ConfigError(f"adapter: {len(missing)} adapter tensors missing from {origin}, e.g. "
                          f"{', '.join(missing[:3])}")


# --------------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------------


def _peft_config_dict(lora_cfg: LoraConfig, target_modules: list[str], base_model: str,
                      has_param_targets: bool) -> dict:
    # peft refuses lora_dropout != 0 on parameter targets (the router and experts on transformers 5.x): the
    # training dropout goes to our sidecar instead; it has no effect at inference anyway.
    dropout = 0.0 if has_param_targets else float(lora_cfg.dropout)
    alpha = float(lora_cfg.alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": int(lora_cfg.r), "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": dropout,
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "target_parameters": None, "revision": None,
    }


def _target_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules for adapter_config.json, expert roles written only as zeros). Whenever any expert matrix is
    adapted, all three (w1/w2/w3) are written for every expert: vLLM's `pack_moe` needs all of them, and stock
    peft fuses w1 with w3; the untrained ones are zeros, so the update stays exact."""
    linears, experts = _candidates(model)
    adapted_lin = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    adapted_exp = {}
    for n, m in model.named_modules():
        if isinstance(m, ExpertLoRA):
            adapted_exp[n.rsplit(".", 1)[0]] = list(m.A.keys())
    # linear module paths inside a LoRALinear end in ".base"; map back to the wrapped path
    all_lin = {(n[:-5] if n.endswith(".base") else n) for n in linears}
    names: list[str] = []
    for leaf in LINEAR_NAMES:
        paths = [p for p in adapted_lin if p.rsplit(".", 1)[-1] == leaf]
        if not paths:
            continue
        every = sorted(p for p in all_lin if p.rsplit(".", 1)[-1] == leaf)
        names += [leaf] if sorted(paths) == every else sorted(paths)
    ws = sorted({w for v in adapted_exp.values() for w in v})
    pad = sorted({w for v in adapted_exp.values() for w in EXPERT_NAMES if w not in v})
    fam = family_of_model(model)
    names += sorted(fam.checkpoint_name_of_role(w) for w in set(ws) | set(pad))
    return names, [fam.checkpoint_name_of_role(w) for w in pad]


def _zero_padding(model: nn.Module, sd: dict) -> None:
    """Add zero A and B for every expert matrix a module with expert LoRA does not adapt (see _target_modules)."""
    fam = family_of_model(model)
    for name, mod in model.named_modules():
        if not isinstance(mod, ExpertLoRA):
            continue
        exp_path = name.rsplit(".", 1)[0]
        experts = model.get_submodule(exp_path)
        ref = next(iter(mod.A.values()))
        for w in EXPERT_NAMES:
            if w in mod.A:
                continue
            fout, fin = getattr(experts, w).shape[1:]
            for e in range(mod.num_experts):
                sd[_expert_key(fam, exp_path, e, w, "A")] = torch.zeros(mod.r, fin, dtype=ref.dtype)
                sd[_expert_key(fam, exp_path, e, w, "B")] = torch.zeros(fout, mod.r, dtype=ref.dtype)


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, lora_cfg: LoraConfig,
                 base_model_name_or_path: str = "", report: Optional[LoraReport] = None) -> str:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) and `mixtune_adapter.json`.

    Atomic: files are written under temporary names and moved into place (a new directory appears whole)."""
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    sd = adapter_state_dict(model)
    if not sd:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    target_modules, pad = _target_modules(model)
    if pad:  # zeros for the expert matrices not trained: vLLM and stock peft both load the adapter
        _zero_padding(model, sd)
    has_param_targets = any(isinstance(m, ExpertLoRA) for m in model.modules()) or any(
        n.rsplit(".", 1)[-1] in PARAM_LINEAR_NAMES for n, m in model.named_modules() if isinstance(m, LoRALinear))
    cfg = _peft_config_dict(lora_cfg, target_modules, base_model_name_or_path, has_param_targets)
    side = {"format": 1, "targets": list(lora_cfg.targets), "lora_dropout": float(lora_cfg.dropout),
            "r": int(lora_cfg.r), "alpha": float(lora_cfg.alpha), "zero_padding_targets": pad,
            "adapted": [t for t in target_modules if t not in pad],
            "adapted_paths": _adapted_paths(model),
            "report": report.to_dict() if report is not None else None}
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-tmp-", dir=parent)
    try:
        save_file(sd, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as fh:
            json.dump(cfg, fh, indent=2)
        with open(os.path.join(tmp, SIDECAR), "w") as fh:
            json.dump(side, fh, indent=2)
        publish_mode(tmp)
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
        else:  # existing dir (other files may live there): replace ours one by one, config last
            for f in (ADAPTER_WEIGHTS, SIDECAR, ADAPTER_CONFIG):
                os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _adapted_paths(model: nn.Module) -> list[str]:
    """Every adapted matrix as a path `apply_lora` matches exactly: linear module paths, and expert stacks as
    `<experts path>.<family name>` (so loading adapts exactly these, e.g. not a Qwen2-MoE shared expert's
    gate_proj when only the routed experts' gate_proj was trained)."""
    fam = family_of_model(model)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            out.append(name)
        elif isinstance(mod, ExpertLoRA):
            exp_path = name.rsplit(".", 1)[0]
            out += [f"{exp_path}.{fam.checkpoint_name_of_role(w)}" for w in mod.A]
    return out


def _no_duplicate_keys(pairs: list) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ConfigError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def _read_json_object(path: str, what: str) -> dict:
    """A JSON object from `path` (a key given twice is an error, not "the last wins"), or a ConfigError naming
    the file."""
    try:
        with open(path) as fh:
            obj = json.load(fh, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"adapter: {path} is not valid JSON ({e})") from None
    except ConfigError as e:
        raise ConfigError(f"adapter: {path}: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"adapter: {path} is not a JSON object ({what})")
    return obj


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(adapter_config dict, tensors under PEFT keys, sidecar dict or {}) with clear errors."""
    from safetensors.torch import load_file

    d = os.fspath(adapter_dir)
    if not os.path.isdir(d):
        raise ConfigError(f"adapter: directory not found: {d}")
    cfg_path = os.path.join(d, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"adapter: {cfg_path} not found (not a PEFT adapter directory)")
    cfg = _read_json_object(cfg_path, "not a PEFT adapter config")
    wpath = os.path.join(d, ADAPTER_WEIGHTS)
    bin_path = os.path.join(d, "adapter_model.bin")
    try:
        if os.path.isfile(wpath):
            tensors = load_file(wpath)
        elif os.path.isfile(bin_path):
            wpath = bin_path
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"adapter: {wpath} not found")
    except ConfigError:
        raise
    except Exception as e:  # safetensors' SafetensorError, unpickling errors: a damaged or foreign file
        raise ConfigError(f"adapter: {wpath} cannot be read ({type(e).__name__}: {e})") from None
    side_path = os.path.join(d, SIDECAR)
    side = _read_json_object(side_path, "mixtune's adapter sidecar") if os.path.isfile(side_path) else {}
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"adapter: {cfg_path} has peft_type {cfg.get('peft_type')!r}; only LORA is supported")
    for key in ("use_dora", "use_rslora", "lora_bias"):
        if cfg.get(key):
            raise ConfigError(f"adapter: {cfg_path} sets {key}: true, which mixtune does not support")
    check_adapter(cfg, tensors, side, cfg_path, wpath)
    return cfg, tensors, side


# --------------------------------------------------------------------------------------------------
# what an adapter claims against what it holds
# --------------------------------------------------------------------------------------------------


def _number(cfg: dict, key: str, cfg_path: str, integer: bool) -> float:
    v = cfg.get(key)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"adapter: {cfg_path}: {key} must be a positive {'integer' if integer else 'number'}, "
                          f"got {v!r}")
    return v


def module_of(key: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> 'model.layers.0.self_attn.q_proj'
    (the module name peft matches rank_pattern / alpha_pattern against)."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return name.split(".lora_", 1)[0]


def _pattern_value(pattern: dict, module: str, default):
    """peft's rule: the first pattern key that matches the end of the module name (at a '.' boundary)."""
    for pat, v in pattern.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return v
    return default


def module_rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
    """(r, alpha) of one adapted module: adapter_config.json's r / lora_alpha, or its rank_pattern /
    alpha_pattern entry for that module."""
    return (int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])),
            float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])))


def adapter_scaling(cfg: dict, module: Optional[str] = None) -> float:
    """alpha / r: of the whole adapter, or of one module when rank_pattern / alpha_pattern say otherwise."""
    if module is None:
        return float(cfg["lora_alpha"]) / int(cfg["r"])
    r, alpha = module_rank_alpha(cfg, module)
    return alpha / r


def check_adapter(cfg: dict, tensors: dict, side: dict, cfg_path: str, wpath: str) -> None:
    """Refuse an adapter whose r / lora_alpha (and rank_pattern / alpha_pattern) disagree with its tensors or
    with mixtune's sidecar, or that holds a non-finite value; every error names the key or the tensor."""
    _number(cfg, "r", cfg_path, integer=True)
    _number(cfg, "lora_alpha", cfg_path, integer=False)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise ConfigError(f"adapter: {cfg_path}: {key} must be a mapping of module pattern -> value")
        for pat in pattern:
            _number(pattern, pat, f"{cfg_path} {key}", integer=key == "rank_pattern")
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"adapter: {cfg_path}: {key} {pat!r} is not a valid pattern ({e})") from None
    for key, name in (("r", "r"), ("alpha", "lora_alpha")):  # our notes, written with the same numbers
        if isinstance(side.get(key), (int, float)) and not math.isclose(float(side[key]), float(cfg[name])):
            raise ConfigError(f"adapter: {cfg_path} says {name}={cfg[name]} but {SIDECAR} next to it says "
                              f"{key}={side[key]}: one of them was edited; the adapter was trained with one value")
    ranks: dict[str, dict[str, int]] = {}
    for key, t in tensors.items():
        if not torch.is_tensor(t):
            raise ConfigError(f"adapter: {wpath}: {key} is not a tensor ({type(t).__name__})")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConfigError(f"adapter: {wpath}: tensor {key} has {bad} non-finite value(s) (nan/inf) of "
                              f"{t.numel()}: the adapter is unusable (did its training diverge?)")
        m = re.search(r"\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            continue
        if t.dim() != 2:
            raise ConfigError(f"adapter: {wpath}: {key} has shape {tuple(t.shape)}; LoRA matrices are 2-D")
        # lora_A (r, in), lora_B (out, r)
        ranks.setdefault(module_of(key), {})[m.group(1)] = t.shape[0] if m.group(1) == "A" else t.shape[1]
    for module, ab in sorted(ranks.items()):
        r, _ = module_rank_alpha(cfg, module)
        for which, got in sorted(ab.items()):
            if got != r:
                said = "rank_pattern gives" if r != cfg["r"] else "says"
                raise ConfigError(f"adapter: {cfg_path} {said} r={r} for {module} but its lora_{which} has rank "
                                  f"{got}: the config does not describe these tensors (merging or loading them "
                                  f"would scale the update by alpha/{r} instead of alpha/{got})")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, seed: int = 0) -> LoraReport:
    """Apply LoRA with the adapter's own config (r, alpha, targets) and load its weights into `model`."""
    cfg, tensors, side = read_adapter(adapter_dir)
    own = sorted({(m, module_rank_alpha(cfg, m)) for m in map(module_of, tensors)
                  if module_rank_alpha(cfg, m) != (int(cfg["r"]), float(cfg["lora_alpha"]))})
    if own:  # our LoRA modules share one r and alpha
        m, (r, alpha) = own[0]
        raise ConfigError(f"adapter: {adapter_dir}: rank_pattern / alpha_pattern give {len(own)} module(s) their "
                          f"own rank or alpha (e.g. {m}: r={r}, alpha={alpha:g}); eval and generate load one r "
                          f"and alpha for all modules: fold it with `mixtune merge` and use the merged model")
    targets = side.get("adapted_paths") or side.get("adapted") or cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    pad = set(side.get("zero_padding_targets") or [])
    lcfg = LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                      dropout=float(side.get("lora_dropout", cfg.get("lora_dropout", 0.0)) or 0.0),
                      targets=list(targets), strict_targets=False)
    report = apply_lora(model, lcfg, seed)
    set_adapter_state_dict(model, tensors, skip_leaves=pad, origin=os.fspath(adapter_dir))
    return report
