"""LoRA for Mixtral: linear targets (attention, lm_head, router) AND every expert, by name; PEFT-format files.

    report = apply_lora(model, cfg.lora, seed=cfg.train.seed)   # wraps targets, freezes the base
    print(report.format())                                      # matched / unmatched, counts
    save_adapter(model, "out/adapter", cfg.lora, "mistralai/Mixtral-8x7B-v0.1")
    load_adapter(fresh_model, "out/adapter")                    # applies LoRA with the adapter's config

Linear targets (`q_proj k_proj v_proj o_proj lm_head gate`) become `LoRALinear`:
y = base(x) + (dropout(x) @ A^T) @ B^T * alpha / r, with A (r, in) kaiming-uniform (as peft) and B (out, r) zero.
Expert targets (`w1 w2 w3`, or `experts` for all three) add one `ExpertLoRA` per layer as `experts.lora`:
A[name] (E, r, in), B[name] (E, out, r); `mixtune.kernels.moe_experts` applies them without forming B·A.

Adapter files follow PEFT's naming with the real checkpoint's module names, experts per expert
(`base_model.model.model.layers.{l}.block_sparse_moe.experts.{e}.w1.lora_A.weight`), which stock peft 0.21 loads
onto transformers 5.x (it fuses the experts itself). `merge_into_state_dict` folds an adapter into checkpoint
tensors (W + s·B·A in fp32, per expert) and is what `mixtune.merge` streams through.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from ._fs import publish_mode
from .config import ConfigError, LoraConfig
from .model.modeling import MixtralExperts
from .model.nf4 import NF4Linear, NF4Weight

log = logging.getLogger("mixtune.lora")

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "mixtune_adapter.json"  # our own notes next to the PEFT files (peft ignores it)

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head", "gate")
EXPERT_NAMES = ("w1", "w2", "w3")
KNOWN_NAMES = LINEAR_NAMES + EXPERT_NAMES + ("experts", "all-linear")
ALIASES = {"router": "gate"}
# Names from Llama-style MLPs that users (and the reference recipe) pass for Mixtral's experts.
LLAMA_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
EXPERT_HINT = "Mixtral's experts are w1 (gate_proj), w3 (up_proj), w2 (down_proj); use w1,w2,w3 or experts"
# Matrices a transformers-4.x + bitsandbytes 4-bit model stores packed (every nn.Linear except lm_head).
_PACKED_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3")


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------


def _uniform_kaiming(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """peft's A init: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on CPU in fp32."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` / `NF4Linear` plus a trainable low-rank update. x (..., in) -> (..., out).

    The adapter tensors (fp32 by default) are cast to the input's dtype for the product, as the expert kernel does.
    No `.weight` attribute on purpose: code that reads `weight` directly would silently drop the adapter."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        if getattr(base, "bias", None) is not None:
            raise ValueError("LoRALinear: biased linears are not supported (Mixtral has none)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        if self.lora_A.device.type != "meta":
            self.lora_A.copy_(_uniform_kaiming(tuple(self.lora_A.shape), self.in_features, gen))
            self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s · B @ A, (out, in) fp32 (for merging and tests; the forward never forms it)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.to(x.dtype)  # (r, in)
        b = self.lora_B.to(x.dtype)  # (out, r)
        u = self.dropout(x) @ a.t()  # (..., r)
        # y + s·u·Bᵀ in one GEMM whose epilogue adds y (one pass over the (..., out) output, not three)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.t(), alpha=self.scaling)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class ExpertLoRA(nn.Module):
    """LoRA for one layer's stacked experts, read by `mixtune.kernels.moe_experts(..., lora=...)`.

    A[name] (E, r, in), B[name] (E, out, r) for name in any subset of w1, w2, w3 (w1/w3: in=H, out=I;
    w2: in=I, out=H); `scaling` = alpha / r. No dropout (as peft's target_parameters require)."""

    def __init__(self, experts: MixtralExperts, names: Iterable[str], r: int, alpha: float,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        E, H, I = experts.num_experts, experts.hidden_size, experts.intermediate_size
        self.num_experts, self.r, self.alpha, self.scaling = E, r, float(alpha), float(alpha) / r
        device = experts.w1.device  # a Parameter or an NF4Weight
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in EXPERT_NAMES:
            if name not in names:
                continue
            fin, fout = (I, H) if name == "w2" else (H, I)
            self.A[name] = nn.Parameter(torch.zeros(E, r, fin, device=device, dtype=dtype))  # (E, r, in)
            self.B[name] = nn.Parameter(torch.zeros(E, fout, r, device=device, dtype=dtype))  # (E, out, r)

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        for name in self.A:
            A = self.A[name]
            if A.device.type != "meta":
                A.copy_(_uniform_kaiming(tuple(A.shape), A.shape[-1], gen))
                self.B[name].zero_()

    def delta_weight(self, name: str, e: int) -> torch.Tensor:
        """s · B_e @ A_e for expert e's `name` matrix, (out, in) fp32."""
        return (self.B[name][e].float() @ self.A[name][e].float()) * self.scaling

    def extra_repr(self) -> str:
        return f"targets={list(self.A.keys())}, experts={self.num_experts}, r={self.r}, alpha={self.alpha:g}"


# --------------------------------------------------------------------------------------------------
# injection
# --------------------------------------------------------------------------------------------------


@dataclass
class LoraReport:
    """What `apply_lora` / `load_adapter` did. Counts are parameters (elements), not bytes."""
    matched: dict = field(default_factory=dict)  # target as given -> adapted (out, in) matrices (experts: per expert)
    unmatched: list = field(default_factory=list)  # targets that matched nothing
    messages: list = field(default_factory=list)  # one warning line per unmatched target (with the suggestion)
    adapted: list = field(default_factory=list)  # real names adapted: q_proj ... lm_head gate w1 w2 w3
    trainable_params: int = 0  # adapter parameters
    total_params: int = 0  # true count: every base weight element (4-bit or not) + adapter
    peft_all_params: int = 0  # what peft + bitsandbytes (transformers 4.x) print as "all params"
    packed_4bit_params: int = 0  # base elements such a model stores 4-bit (attention, router, experts)
    r: int = 0
    alpha: float = 0.0
    scaling: float = 0.0

    def peft_line(self) -> str:
        """The line `peft`'s print_trainable_parameters prints on a 4-bit model."""
        pct = 100.0 * self.trainable_params / max(self.peft_all_params, 1)
        return (f"trainable params: {self.trainable_params} || all params: {self.peft_all_params} "
                f"|| trainable%: {pct:.4f}")

    def format(self) -> str:
        lines = [f"LoRA r={self.r} alpha={self.alpha:g} (scaling {self.scaling:g})"]
        for name, n in self.matched.items():
            lines.append(f"  matched {name}: {n} matrices")
        lines.extend(f"  WARNING: {m}" for m in self.messages)
        lines.append(f"  trainable params: {self.trainable_params:,} of {self.total_params:,} "
                     f"({100.0 * self.trainable_params / max(self.total_params, 1):.4f}%)")
        lines.append(f"  as peft prints it on a 4-bit model: {self.peft_line()}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _candidates(model: nn.Module) -> tuple[dict, dict]:
    """Every adaptable matrix: linear module paths -> module, and `<experts path>.wN` -> experts module."""
    linears, experts = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, NF4Linear)):
            linears[name] = mod
        elif isinstance(mod, MixtralExperts):
            for w in EXPERT_NAMES:
                experts[f"{name}.{w}"] = mod
    return linears, experts


def _match(target: str, names: Iterable[str]) -> list[str]:
    """Candidate paths a target selects: a bare name matches the last path component; a dotted name matches
    a path suffix; anything else is tried as a regular expression over the full path."""
    t = ALIASES.get(target, target)
    names = list(names)
    if re.fullmatch(r"\w+", t):
        return [n for n in names if n.rsplit(".", 1)[-1] == t]
    out = [n for n in names if n == t or n.endswith("." + t)]
    if out:
        return out
    try:
        rx = re.compile(t)
    except re.error:
        return []
    # peft-style: the pattern must match the whole path or a whole dotted suffix of it
    return [n for n in names if rx.fullmatch(n) or re.search(rf"(?:^|\.)(?:{t})$", n)]


def unmatched_message(target: str) -> str:
    """One line naming an unmatched target and suggesting the real names."""
    base = f"lora.targets: {target!r} matches no module of this Mixtral model"
    if target in LLAMA_EXPERT_NAMES:
        return f"{base}; {EXPERT_HINT}"
    near = difflib.get_close_matches(target, KNOWN_NAMES, n=2)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"{base}{hint} (names: {' '.join(KNOWN_NAMES)}; router = gate; {EXPERT_HINT})"


def _resolve_targets(model: nn.Module, targets: list[str]):
    linears, experts = _candidates(model)
    matched: dict[str, int] = {}
    unmatched: list[str] = []
    lin_sel: list[str] = []
    exp_sel: list[str] = []
    for t in targets:
        if t == "experts":
            lin, ex = [], list(experts)
        elif t == "all-linear":  # peft's shorthand: every linear but the output layer (experts included)
            lin, ex = [p for p in linears if p.rsplit(".", 1)[-1] != "lm_head"], list(experts)
        else:
            lin, ex = _match(t, linears), _match(t, experts)
        if not lin and not ex:
            unmatched.append(t)
            continue
        matched[t] = len(lin) + sum(experts[p].num_experts for p in ex)
        lin_sel += [p for p in lin if p not in lin_sel]
        exp_sel += [p for p in ex if p not in exp_sel]
    return linears, experts, lin_sel, exp_sel, matched, unmatched


def count_params(model: nn.Module) -> tuple[int, int, int]:
    """(adapter params, true total params, base params a transformers-4.x bitsandbytes 4-bit model packs).

    NF4-stored weights count by their logical shape. "Packed" = every nn.Linear but lm_head on transformers 4.x
    (attention, router gate, experts), whatever mixtune itself quantizes."""
    adapter_ids = {id(p) for p in lora_parameters(model)}
    trainable = total = packed = 0
    for path, p in model.named_parameters():
        n = p.numel()
        total += n
        if id(p) in adapter_ids:
            trainable += n
        elif _is_packed(path):
            packed += n
    for path, mod in model.named_modules():
        if isinstance(mod, NF4Weight):
            n = math.prod(mod.shape)
            total += n
            packed += n if _is_packed(path) else 0
    return trainable, total, packed


def _is_packed(path: str) -> bool:
    parts = [x for x in path.split(".") if x != "base"]
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    return bool(parts) and parts[-1] in _PACKED_LEAVES


def build_report(model: nn.Module, matched=None, unmatched=None, messages=None, adapted=None,
                 r=0, alpha=0.0) -> LoraReport:
    trainable, total, packed = count_params(model)
    return LoraReport(matched=dict(matched or {}), unmatched=list(unmatched or []), messages=list(messages or []),
                      adapted=list(adapted or []), trainable_params=trainable, total_params=total,
                      peft_all_params=total - packed + packed // 2, packed_4bit_params=packed, r=r, alpha=alpha,
                      scaling=alpha / r if r else 0.0)


def check_targets(model: nn.Module, lora_cfg: LoraConfig) -> None:
    """Raise the ConfigError `apply_lora` would raise for these targets (an unmatched one under strict_targets,
    or none matching), without changing `model` or logging. On a meta-device model: a check before loading."""
    targets = [t.strip() for t in lora_cfg.targets if t.strip()]
    _, _, lin_sel, exp_sel, _, unmatched = _resolve_targets(model, targets)
    if unmatched and lora_cfg.strict_targets:
        raise ConfigError("; ".join(unmatched_message(t) for t in unmatched) + " (lora.strict_targets is on)")
    if not lin_sel and not exp_sel:
        raise ConfigError(f"lora.targets: none of {','.join(targets)} matches a module of this model; "
                          f"names: {' '.join(KNOWN_NAMES)}")


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, seed: int = 0, warn: bool = True) -> LoraReport:
    """Wrap the targets of `lora_cfg.targets` with LoRA, freeze every other parameter, return the report.

    Same model + config + seed -> the same adapter. Works on the meta device (no initialisation there).
    warn=False: do not log the unmatched-target warnings (for callers that print `report.format()`, which
    carries them)."""
    if any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in model.modules()):
        raise ValueError("apply_lora: this model already has LoRA adapters")
    targets = [t.strip() for t in lora_cfg.targets if t.strip()]
    linears, experts, lin_sel, exp_sel, matched, unmatched = _resolve_targets(model, targets)
    messages = [unmatched_message(t) for t in unmatched]
    for m in messages if warn else ():
        log.warning(m)
    if unmatched and lora_cfg.strict_targets:
        raise ConfigError("; ".join(messages) + " (lora.strict_targets is on)")
    if not lin_sel and not exp_sel:
        raise ConfigError(f"lora.targets: none of {','.join(targets)} matches a module of this model; "
                          f"names: {' '.join(KNOWN_NAMES)}")
    if exp_sel and lora_cfg.dropout > 0:
        log.warning("lora.dropout=%g applies to linear targets only; expert adapters (w1/w2/w3) use none "
                    "(as peft's target_parameters require)", lora_cfg.dropout)
    r, alpha = lora_cfg.r, float(lora_cfg.alpha)
    gen = torch.Generator().manual_seed(int(seed))
    for p in model.parameters():
        p.requires_grad_(False)
    # Walk in module order so the random stream (and thus the adapter) depends only on model, targets and seed.
    exp_by_module: dict[str, list[str]] = {}
    for path in exp_sel:
        mod_path, w = path.rsplit(".", 1)
        exp_by_module.setdefault(mod_path, []).append(w)
    adapted = set()
    for name, mod in list(model.named_modules()):
        if name in lin_sel:
            lora = LoRALinear(mod, r, alpha, lora_cfg.dropout)
            lora.reset_parameters(gen)
            parent_path, leaf = name.rpartition(".")[0], name.rpartition(".")[2]
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, lora)
            adapted.add(leaf)
        elif name in exp_by_module:
            el = ExpertLoRA(mod, exp_by_module[name], r, alpha)
            el.reset_parameters(gen)
            mod.lora = el
            adapted.update(exp_by_module[name])
    order = {n: i for i, n in enumerate(LINEAR_NAMES + EXPERT_NAMES)}
    return build_report(model, matched, unmatched, messages, sorted(adapted, key=lambda n: order.get(n, 99)),
                        r, alpha)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer updates)."""
    out = []
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            out += [mod.lora_A, mod.lora_B]
        elif isinstance(mod, ExpertLoRA):
            out += list(mod.A.values()) + list(mod.B.values())
    return out


# --------------------------------------------------------------------------------------------------
# adapter state in PEFT naming
# --------------------------------------------------------------------------------------------------


def _adapter_slots(model: nn.Module) -> dict[str, tuple[nn.Parameter, Optional[int]]]:
    """PEFT key -> (our parameter, expert index or None). Expert keys address one expert's slice."""
    slots = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            slots[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (mod.lora_A, None)
            slots[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (mod.lora_B, None)
        elif isinstance(mod, ExpertLoRA):
            exp_path = name.rsplit(".", 1)[0]  # ...block_sparse_moe.experts
            for w in mod.A:
                for e in range(mod.num_experts):
                    slots[f"{PEFT_PREFIX}{exp_path}.{e}.{w}.lora_A.weight"] = (mod.A[w], e)
                    slots[f"{PEFT_PREFIX}{exp_path}.{e}.{w}.lora_B.weight"] = (mod.B[w], e)
    return slots


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT keys (CPU, contiguous): linears (r, in) / (out, r); experts per expert."""
    out = {}
    for key, (p, e) in _adapter_slots(model).items():
        t = p.detach() if e is None else p.detach()[e]
        out[key] = t.to("cpu").contiguous().clone()
    return out


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
    """(target_modules for adapter_config.json, expert names added only so peft can fuse w1 with w3)."""
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
    pad = []
    if ("w1" in ws) != ("w3" in ws):  # peft fuses w1 and w3 into one parameter: it needs both or neither
        pad = ["w3" if "w1" in ws else "w1"]
    names += sorted(set(ws) | set(pad))
    return names, pad


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
    if pad:  # zero A and B for the missing partner of w1/w3: stock peft can fuse them, the update stays exact
        for name, mod in model.named_modules():
            if isinstance(mod, ExpertLoRA):
                src = "w1" if "w1" in mod.A else "w3"
                exp_path = name.rsplit(".", 1)[0]
                for e in range(mod.num_experts):
                    a, b = sd[f"{PEFT_PREFIX}{exp_path}.{e}.{src}.lora_A.weight"], \
                        sd[f"{PEFT_PREFIX}{exp_path}.{e}.{src}.lora_B.weight"]
                    sd[f"{PEFT_PREFIX}{exp_path}.{e}.{pad[0]}.lora_A.weight"] = torch.zeros_like(a)
                    sd[f"{PEFT_PREFIX}{exp_path}.{e}.{pad[0]}.lora_B.weight"] = torch.zeros_like(b)
    has_param_targets = any(isinstance(m, ExpertLoRA) for m in model.modules()) or any(
        n.rsplit(".", 1)[-1] == "gate" for n, m in model.named_modules() if isinstance(m, LoRALinear))
    cfg = _peft_config_dict(lora_cfg, target_modules, base_model_name_or_path, has_param_targets)
    side = {"format": 1, "targets": list(lora_cfg.targets), "lora_dropout": float(lora_cfg.dropout),
            "r": int(lora_cfg.r), "alpha": float(lora_cfg.alpha), "zero_padding_targets": pad,
            "adapted": [t for t in target_modules if t not in pad],
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


def _read_json_object(path: str, what: str) -> dict:
    """A JSON object from `path`, or a ConfigError naming the file."""
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"adapter: {path} is not valid JSON ({e})") from None
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
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ConfigError(f"adapter: {cfg_path} sets {key}; per-module ranks are not supported")
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise ConfigError(f"adapter: {cfg_path} lacks r or lora_alpha")
    return cfg, tensors, side


def adapter_scaling(cfg: dict) -> float:
    return float(cfg["lora_alpha"]) / int(cfg["r"])


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, seed: int = 0) -> LoraReport:
    """Apply LoRA with the adapter's own config (r, alpha, targets) and load its weights into `model`."""
    cfg, tensors, side = read_adapter(adapter_dir)
    targets = side.get("adapted") or cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    pad = set(side.get("zero_padding_targets") or [])
    lcfg = LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                      dropout=float(side.get("lora_dropout", cfg.get("lora_dropout", 0.0)) or 0.0),
                      targets=list(targets), strict_targets=False)
    report = apply_lora(model, lcfg, seed)
    set_adapter_state_dict(model, tensors, skip_leaves=pad, origin=os.fspath(adapter_dir))
    return report


def set_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], skip_leaves: Iterable[str] = (),
                           origin: str = "adapter") -> None:
    """Copy PEFT-named adapter tensors into a model that already has its LoRA modules (e.g. to resume).
    Every adapter slot must be filled and every tensor used (tensors of `skip_leaves`, e.g. zero padding
    for peft's w1/w3 fusion, are ignored); shapes must agree. Errors name the keys."""
    skip = set(skip_leaves)
    slots = _adapter_slots(model)
    unknown, loaded = [], set()
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
# merging (pure functions over checkpoint tensors)
# --------------------------------------------------------------------------------------------------


def adapter_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT adapter tensors -> {checkpoint weight key: (A (r, in), B (out, r))}, e.g.
    'model.layers.0.block_sparse_moe.experts.3.w1.weight' -> (A, B)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ConfigError(f"adapter: unexpected tensor name {key!r} (expected ...lora_A.weight / lora_B.weight)")
        pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = t
    out = {}
    for wkey, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"adapter: {wkey[:-7]} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        out[wkey] = (ab["A"], ab["B"])
    return out


def merge_into_state_dict(state_dict: dict[str, torch.Tensor], adapter, scaling: Optional[float] = None,
                          dtype: Optional[torch.dtype] = None, consumed: Optional[set] = None
                          ) -> dict[str, torch.Tensor]:
    """W' = W + scaling · B @ A for every checkpoint weight the adapter touches, computed in fp32 and cast to
    `dtype` (default: W's dtype). Other tensors pass through (cast to `dtype` if given and floating).

    `state_dict` may be any subset of a checkpoint (one shard, one layer) in the real key layout;
    `adapter`: an adapter directory, a dict of PEFT tensors, or the output of `adapter_deltas`.
    Keys merged are added to `consumed` so a streaming caller can check every delta was used."""
    if isinstance(adapter, (str, os.PathLike)):
        cfg, tensors, _ = read_adapter(adapter)
        scaling = adapter_scaling(cfg) if scaling is None else scaling
        deltas = adapter_deltas(tensors)
    elif adapter and isinstance(next(iter(adapter.values())), tuple):
        deltas = adapter
    else:
        deltas = adapter_deltas(adapter)
    if scaling is None:
        raise ValueError("merge_into_state_dict: scaling is required when passing adapter tensors")
    out = {}
    for key, w in state_dict.items():
        odt = dtype if (dtype is not None and w.is_floating_point()) else w.dtype
        if key in deltas:
            A, B = deltas[key]
            A = A.to(device=w.device, dtype=torch.float32)
            B = B.to(device=w.device, dtype=torch.float32)
            if (B.shape[0], A.shape[1]) != tuple(w.shape):
                raise ConfigError(f"adapter: delta for {key} is {(B.shape[0], A.shape[1])}, weight is {tuple(w.shape)}")
            out[key] = (w.float() + scaling * (B @ A)).to(odt)  # (out, in)
            if consumed is not None:
                consumed.add(key)
        else:
            out[key] = w.to(odt)
    return out


merge_lora_weights = merge_into_state_dict
