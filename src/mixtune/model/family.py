"""The MoE families mixtune trains, each a small declarative description — not a copy of the model.

    fam = family_of("qwen3_moe")                       # -> QWEN3_MOE
    fam.checkpoint_name("model.layers.0.block_sparse_moe.experts.3.w1.weight")
    #   -> "model.layers.0.mlp.experts.3.gate_proj.weight"

One decoder (`modeling.py`) serves every family. Its module tree is the same for all of them (Mixtral's
names: `self_attn.{q,k,v,o}_proj`, `block_sparse_moe.{gate, experts.{w1,w3,w2}}`, plus `shared_expert`,
`shared_expert_gate`, `self_attn.{q,k}_norm` and a dense `mlp.{gate_proj,up_proj,down_proj}` where a family has
them); a family says how its Hub checkpoint names those tensors, which attention and router variant it uses,
whether it has a shared expert and dense layers, and how its config.json spells the hyper-parameters. The
loader, the writer, the PEFT key mapping, merge, LoRA target names, `inspect` and the planner read it.

Roles of the expert matrices: w1 = gate (silu branch), w3 = up, w2 = down.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    model_type: str                     # config.json "model_type"
    architecture: str                   # config.json "architectures"[0] (the stock transformers class)
    moe_module: str                     # checkpoint name of a layer's MoE block: block_sparse_moe | mlp
    expert_names: tuple                 # checkpoint names of the expert matrices in role order (w1, w3, w2)
    n_experts_key: str                  # config.json key of the expert count
    expert_size_key: str                # config.json key of one expert's intermediate size
    qk_norm: str = "none"               # none | head (RMSNorm over head_dim, per head) | proj (over the projection)
    bias_key: str = ""                  # config.json key of the attention biases ("" = none)
    bias_on: tuple = ()                 # which projections that key puts a bias on
    shared_expert: bool = False         # a dense shared expert with a sigmoid gate beside the routed ones
    dense_layers: bool = False          # decoder_sparse_step / mlp_only_layers make some layers dense
    norm_topk_default: bool = True      # renormalise the top-k routing weights (config: norm_topk_prob)
    has_clip_qkv: bool = False          # config clip_qkv clamps q, k, v after the projections (and q/k norms)
    chat_format: str = ""               # the data template that matches the checkpoint's chat format
    hints: dict = field(default_factory=dict)  # family's LoRA target names -> our module names

    def checkpoint_name(self, internal: str) -> str:
        """A tensor/module path of our module tree -> the checkpoint's name for it (identity for Mixtral)."""
        name = internal.replace(".block_sparse_moe.", f".{self.moe_module}.")
        if ".experts." in name:
            head, _, leaf = name.rpartition(".experts.")
            parts = leaf.split(".")  # e, w, weight  (or w, weight for a stack)
            role_i = 1 if parts[0].isdigit() else 0
            if parts[role_i] in ROLES:
                parts[role_i] = self.expert_names[ROLES.index(parts[role_i])]
            name = head + ".experts." + ".".join(parts)
        return name

    def checkpoint_name_of_role(self, role: str) -> str:
        """w1 / w3 / w2 -> the checkpoint's name of that expert matrix (Mixtral: itself; Qwen: gate_proj, ...)."""
        return self.expert_names[ROLES.index(role)]

    def expert_role(self, checkpoint_leaf: str) -> str:
        """The checkpoint's name of an expert matrix -> its role (w1, w3, w2); a role name passes through."""
        if checkpoint_leaf in self.expert_names:
            return ROLES[self.expert_names.index(checkpoint_leaf)]
        return checkpoint_leaf

    def is_moe_layer(self, layer: int, config) -> bool:
        """Whether decoder layer `layer` has the MoE block (else a dense MLP)."""
        if not self.dense_layers:
            return True
        step = max(1, int(config.decoder_sparse_step or 1))
        return layer not in (config.mlp_only_layers or []) and config.num_local_experts > 0 \
            and (layer + 1) % step == 0


ROLES = ("w1", "w3", "w2")  # gate, up, down: the order of Family.expert_names

_QWEN_EXPERTS = ("gate_proj", "up_proj", "down_proj")
_QWEN_HINTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

MIXTRAL = Family(
    model_type="mixtral", architecture="MixtralForCausalLM", moe_module="block_sparse_moe",
    expert_names=("w1", "w3", "w2"), n_experts_key="num_local_experts", expert_size_key="intermediate_size",
    chat_format="mixtral-chat")
QWEN3_MOE = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", moe_module="mlp", expert_names=_QWEN_EXPERTS,
    n_experts_key="num_experts", expert_size_key="moe_intermediate_size", qk_norm="head",
    bias_key="attention_bias", bias_on=("q_proj", "k_proj", "v_proj", "o_proj"), dense_layers=True,
    norm_topk_default=False, chat_format="chat-template", hints=_QWEN_HINTS)
OLMOE = Family(
    model_type="olmoe", architecture="OlmoeForCausalLM", moe_module="mlp", expert_names=_QWEN_EXPERTS,
    n_experts_key="num_experts", expert_size_key="intermediate_size", qk_norm="proj",
    bias_key="attention_bias", bias_on=("q_proj", "k_proj", "v_proj", "o_proj"), norm_topk_default=False,
    has_clip_qkv=True, chat_format="chat-template", hints=_QWEN_HINTS)
QWEN2_MOE = Family(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", moe_module="mlp", expert_names=_QWEN_EXPERTS,
    n_experts_key="num_experts", expert_size_key="moe_intermediate_size", bias_key="qkv_bias",
    bias_on=("q_proj", "k_proj", "v_proj"), shared_expert=True, dense_layers=True, norm_topk_default=False,
    chat_format="chat-template", hints=_QWEN_HINTS)

FAMILIES = {f.model_type: f for f in (MIXTRAL, QWEN3_MOE, OLMOE, QWEN2_MOE)}


class UnsupportedModel(ValueError):
    """A checkpoint whose model_type no family describes."""


def family_of(model_type: str) -> Family:
    """The family for a config.json model_type; UnsupportedModel names it and the supported ones."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported; mixtune supports "
                               f"{', '.join(sorted(FAMILIES))}")
    return fam
