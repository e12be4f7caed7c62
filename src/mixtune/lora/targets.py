"""Which modules get LoRA: the per-family name tables (data), then target resolution, injection and counts.

    report = apply_lora(model, cfg.lora, seed=cfg.train.seed)   # wraps targets, freezes the base
    print(report.format())                                      # matched / unmatched, counts

Everything model-family specific is in the name tables below; the logic under them only reads the tables, so a
new model family adds names there, not code paths here. `peft_format` reads the same tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..config import ConfigError, LoraConfig
from ..model.family import MIXTRAL, Family
from ..model.modeling import MixtralExperts
from ..model.nf4 import NF4Linear
from ..quant.nf4 import NF4Weight, nf4_storage_ids
from .modules import ExpertLoRA, LoRALinear

log = logging.getLogger("mixtune.lora")  # the package's name: warnings keep the logger they always had


# ==================================================================================================
# name tables: data only (each family's own names come from mixtune.model.family)
# ==================================================================================================

FAMILY = "Mixtral"  # how messages name the model when it has no config (a bare module tree)
# leaves adapted by LoRALinear, in report order: attention, output, router, dense SwiGLU (dense layers and
# Qwen2-MoE's shared expert), the shared expert's gate
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head", "gate", "gate_proj", "up_proj", "down_proj",
                "shared_expert_gate")
EXPERT_NAMES = ("w1", "w2", "w3")  # stacked expert matrices (roles) adapted by ExpertLoRA, in adapter order
OUTPUT_NAME = "lm_head"  # the output layer: the one linear peft's "all-linear" leaves out
# family-neutral names: each selects module paths by a regular expression over OUR module tree
GROUPS = {
    "attention": r".*\.self_attn\.[qkvo]_proj",
    "router": r".*\.block_sparse_moe\.gate",
    "shared_expert": r".*\.block_sparse_moe\.shared_expert\.(gate|up|down)_proj",
}
KNOWN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head", "gate") + EXPERT_NAMES + (
    "experts", "attention", "router", "shared_expert", "all-linear")
ALIASES = {"router": "gate"}  # kept for callers: "router" selects every MoE block's gate (GROUPS)
# Names from Llama-style MLPs that users (and the reference recipe) pass for Mixtral's experts.
LLAMA_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
EXPERT_HINT = "Mixtral's experts are w1 (gate_proj), w3 (up_proj), w2 (down_proj); use w1,w2,w3 or experts"
# Matrices a transformers-4.x + bitsandbytes 4-bit model stores packed (every nn.Linear except lm_head).
_PACKED_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj",
                  "shared_expert_gate")
# Linear leaves transformers 5.x stores as parameters, adapted by peft's target_parameters (as the experts are).
PARAM_LINEAR_NAMES = ("gate",)
# Expert matrices peft fuses into one parameter: an adapter file needs both or neither.
FUSED_EXPERT_NAMES = ("w1", "w3")


# ==================================================================================================
# report
# ==================================================================================================


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


# ==================================================================================================
# target resolution
# ==================================================================================================


def family_of_model(model: nn.Module) -> Family:
    """The model's family description (Mixtral for a bare module tree without a config)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "family", None) or MIXTRAL


def _candidates(model: nn.Module) -> tuple[dict, dict]:
    """Every adaptable matrix: linear module paths -> module, and `<experts path>.<name>` -> experts module,
    where <name> is the family's checkpoint name of the matrix (Mixtral w1, Qwen/OLMoE gate_proj, ...)."""
    fam = family_of_model(model)
    linears, experts = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, NF4Linear)):
            linears[name] = mod
        elif isinstance(mod, MixtralExperts):
            for w in EXPERT_NAMES:
                experts[f"{name}.{fam.checkpoint_name_of_role(w)}"] = mod
    return linears, experts


def _match(target: str, names: Iterable[str]) -> list[str]:
    """Candidate paths a target selects: a bare name matches the last path component; a dotted name matches
    a path suffix; a family-neutral group (attention, router, shared_expert) its pattern; anything else is tried
    as a regular expression over the full path."""
    t = GROUPS.get(target, target)
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


def known_names(fam: Family) -> tuple:
    """The target names that mean something for a family: its linears, its expert names, the groups."""
    ex = tuple(fam.checkpoint_name_of_role(w) for w in EXPERT_NAMES)
    lin = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head", "gate")
    return tuple(dict.fromkeys(lin + ex + ("experts", "attention", "router")
                               + (("shared_expert",) if fam.shared_expert else ()) + ("all-linear",)))


def unmatched_message(target: str, fam: Family = MIXTRAL) -> str:
    """One line naming an unmatched target and suggesting the real names."""
    name = FAMILY if fam is MIXTRAL else fam.model_type
    base = f"lora.targets: {target!r} matches no module of this {name} model"
    if fam is MIXTRAL and target in LLAMA_EXPERT_NAMES:
        return f"{base}; {EXPERT_HINT}"
    names = known_names(fam)
    near = difflib.get_close_matches(target, names, n=2)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    experts = "/".join(fam.checkpoint_name_of_role(w) for w in ("w1", "w3", "w2"))
    return f"{base}{hint} (names: {' '.join(names)}; router = gate; experts = every expert's {experts})"


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
            lin, ex = [p for p in linears if p.rsplit(".", 1)[-1] != OUTPUT_NAME], list(experts)
        else:
            lin, ex = _match(t, linears), _match(t, experts)
        if not lin and not ex:
            unmatched.append(t)
            continue
        matched[t] = len(lin) + sum(experts[p].num_experts for p in ex)
        lin_sel += [p for p in lin if p not in lin_sel]
        exp_sel += [p for p in ex if p not in exp_sel]
    return linears, experts, lin_sel, exp_sel, matched, unmatched


# ==================================================================================================
# counts
# ==================================================================================================


def count_params(model: nn.Module) -> tuple[int, int, int]:
    """(adapter params, true total params, base params a transformers-4.x bitsandbytes 4-bit model packs).

    NF4-stored weights count by their logical shape. "Packed" = every nn.Linear but lm_head on transformers 4.x
    (attention, router gate, experts), whatever mixtune itself quantizes."""
    adapter_ids = {id(p) for p in lora_parameters(model)}
    storage = nf4_storage_ids(model)  # NF4 storage as parameters (FSDP): counted below, by logical shape
    trainable = total = packed = 0
    for path, p in model.named_parameters():
        if id(p) in storage:
            continue
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


# ==================================================================================================
# injection
# ==================================================================================================


def check_targets(model: nn.Module, lora_cfg: LoraConfig) -> None:
    """Raise the ConfigError `apply_lora` would raise for these targets (an unmatched one under strict_targets,
    or none matching), without changing `model` or logging. On a meta-device model: a check before loading."""
    targets = [t.strip() for t in lora_cfg.targets if t.strip()]
    _, _, lin_sel, exp_sel, _, unmatched = _resolve_targets(model, targets)
    if unmatched and lora_cfg.strict_targets:
        raise ConfigError("; ".join(unmatched_message(t, family_of_model(model)) for t in unmatched)
                          + " (lora.strict_targets is on)")
    if not lin_sel and not exp_sel:
        raise ConfigError(f"lora.targets: none of {','.join(targets)} matches a module of this model; "
                          f"names: {' '.join(known_names(family_of_model(model)))}")


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, seed: int = 0, warn: bool = True) -> LoraReport:
    """Wrap the targets of `lora_cfg.targets` with LoRA, freeze every other parameter, return the report.

    Same model + config + seed -> the same adapter. Works on the meta device (no initialisation there).
    warn=False: do not log the unmatched-target warnings (for callers that print `report.format()`, which
    carries them)."""
    if any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in model.modules()):
        raise ValueError("apply_lora: this model already has LoRA adapters")
    targets = [t.strip() for t in lora_cfg.targets if t.strip()]
    linears, experts, lin_sel, exp_sel, matched, unmatched = _resolve_targets(model, targets)
    fam = family_of_model(model)
    messages = [unmatched_message(t, fam) for t in unmatched]
    for m in messages if warn else ():
        log.warning(m)
    if unmatched and lora_cfg.strict_targets:
        raise ConfigError("; ".join(messages) + " (lora.strict_targets is on)")
    if not lin_sel and not exp_sel:
        raise ConfigError(f"lora.targets: none of {','.join(targets)} matches a module of this model; "
                          f"names: {' '.join(known_names(fam))}")
    if exp_sel and lora_cfg.dropout > 0:
        log.warning("lora.dropout=%g applies to linear targets only; expert adapters (%s) use none "
                    "(as peft's target_parameters require)", lora_cfg.dropout, "/".join(EXPERT_NAMES))
    r, alpha = lora_cfg.r, float(lora_cfg.alpha)
    gen = torch.Generator().manual_seed(int(seed))
    for p in model.parameters():
        p.requires_grad_(False)
    # Walk in module order so the random stream (and thus the adapter) depends only on model, targets and seed.
    exp_by_module: dict[str, list[str]] = {}
    for path in exp_sel:
        mod_path, name = path.rsplit(".", 1)
        exp_by_module.setdefault(mod_path, []).append(fam.expert_role(name))  # Qwen gate_proj -> role w1
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
            # in EXPERT_NAMES order, whatever the order of the targets (the adapter depends only on which)
            el = ExpertLoRA(mod, [w for w in EXPERT_NAMES if w in exp_by_module[name]], r, alpha,
                            shared_gate_up_a=lora_cfg.shared_gate_up_a)
            el.reset_parameters(gen)
            mod.lora = el
            adapted.update(fam.checkpoint_name_of_role(w) for w in exp_by_module[name])
    order = {n: i for i, n in enumerate(LINEAR_NAMES + tuple(fam.checkpoint_name_of_role(w) for w in EXPERT_NAMES))}
    return build_report(model, matched, unmatched, messages, sorted(adapted, key=lambda n: order.get(n, 99)),
                        r, alpha)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer updates), each once (a shared gate/up A is one parameter)."""
    out = []
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            out += [mod.lora_A, mod.lora_B]
        elif isinstance(mod, ExpertLoRA):
            out += list({id(p): p for p in mod.A.values()}.values()) + list(mod.B.values())
    return out
