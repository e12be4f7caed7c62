"""One typed run configuration: the only place defaults live.

A run is described by a `Config` with sections `model`, `lora`, `data`, `train`, `generate`, `merge`.
It is built from (lowest to highest precedence) the defaults below, an optional YAML file, and dotted
command-line overrides such as `--train.learning_rate 2e-5`.

The defaults ARE the offline tiny run (`configs/tiny.yaml` spells out the same values): the embedded tiny
random Mixtral, the bundled dataset, CPU-sized rows and steps. The Mixtral-8x7B presets override them.

    cfg = load_config("configs/tiny.yaml", ["--train.max_steps", "20"])

An unknown key or a value of the wrong type raises `ConfigError` naming it (never a silent default).
The docs after each field (the `help` metadata) become `mixtune <verb> --help`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from ._yaml import YAMLRefused, parse_yaml, read_yaml_file


class ConfigError(ValueError):
    """A user error in a configuration: the message names the key and says what is wrong."""


def _f(default, help: str, choices: tuple | None = None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "Hub id (e.g. mistralai/Mixtral-8x7B-v0.1) or local HF directory. Empty: the "
                              "embedded tiny random Mixtral, built once and cached.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) when name_or_path is a Hub id.")
    family: str = _f("mixtral", "With an empty name_or_path: which family's tiny random model to build and use "
                                "offline (mixtral, qwen3_moe, olmoe, qwen2_moe). A real checkpoint's family is "
                                "read from its config.json.", ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe"))
    quant: str = _f("nf4", "Base-weight storage: nf4 (4-bit NormalFloat, double-quantized, blocks of 64) or none.",
                    ("nf4", "none"))
    dtype: str = _f("auto", "Compute dtype: auto (bfloat16 where supported, else float32), bfloat16, float16, float32.",
                    ("auto", "bfloat16", "float16", "float32"))
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    attn_implementation: str = _f("auto", "Attention: auto (varlen where FlashAttention runs, else sdpa), varlen "
                                          "(FlashAttention over the packed examples, no mask), sdpa (dense "
                                          "document mask), flex (FlexAttention block mask, GPU), eager.",
                                  ("auto", "varlen", "sdpa", "flex", "eager"))
    moe_backend: str = _f("auto", "Expert computation: auto (grouped on CUDA, reference elsewhere), reference "
                                  "(pure PyTorch loop), grouped (sorted tokens + grouped matmuls over 4-bit "
                                  "weights; keeps the (tokens x 2 x intermediate) pre-activations for backward), "
                                  "grouped_lowmem (recomputes them in backward: less memory, one more expert "
                                  "matmul).", ("auto", "reference", "grouped", "grouped_lowmem"))
    expert_precision: str = _f("bf16", "Precision of the experts' large matrix products in training: bf16, or "
                                       "fp8 (e4m3, row-wise scales; 1.6-1.8x faster products on GPUs with FP8 "
                                       "tensor cores, compute capability >= 8.9; slightly noisier gradients — "
                                       "see BENCHMARKS.md). Needs a grouped moe_backend; evaluation and "
                                       "generation always run bf16. Emulated (slowly) on CPU.", ("bf16", "fp8"))
    gradient_checkpointing: bool = _f(False, "Recompute decoder layers in the backward pass (saves memory); "
                                             "how many: checkpoint_layers.")
    checkpoint_layers: int = _f(-1, "With gradient_checkpointing: recompute the first N decoder layers "
                                    "(-1 = all); the others keep their activations (selective checkpointing).")
    checkpoint_attention: bool = _f(False, "Layers that are not fully recomputed recompute their attention "
                                           "block (keeping only its input); pairs well with grouped_lowmem.")
    memory_budget_gib: float = _f(0.0, "> 0: choose the recomputation (layers, attention blocks, grouped or "
                                       "grouped_lowmem MoE) with the least extra work whose estimated peak GPU "
                                       "memory fits this many GiB at the configured micro-batch; it replaces "
                                       "gradient_checkpointing, checkpoint_layers, checkpoint_attention and "
                                       "moe_backend, and is printed at the start. 0: use those keys.")
    tokenizer: str = _f("", "Tokenizer: empty = the model directory's own, else the Mixtral v1 tokenizer shipped "
                           "in mistral-common; or a Hub id / local directory / 'mistral-common:v1' / "
                           "'mistral-common:v3' (Mixtral-8x22B's, for data.template mixtral-v3-chat).")
    cache_dir: str = _f("", "Cache for the tiny default and prepared data (empty: $MIXTUNE_CACHE or "
                           "~/.cache/mixtune); when set, Hub downloads go under it too, else to the standard "
                           "Hugging Face cache (HF_HOME), where other tools' downloads are reused.")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = _f(0.0, "Dropout on the LoRA input of linear targets (attention, lm_head, router). Expert "
                             "adapters use none (as peft's target_parameters require).")
    targets: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "experts", "lm_head"],
                       "Modules to adapt, by name: q_proj k_proj v_proj o_proj lm_head gate (router) w1 w2 w3 "
                       "(every expert's) or experts (= w1 w2 w3). Comma-separated on the command line.")
    strict_targets: bool = _f(False, "Make a target name that matches nothing an error instead of a warning.")
    shared_gate_up_a: bool = _f(False, "Experts' gate (w1/gate_proj) and up (w3/up_proj) adapters share one LoRA A "
                                       "per expert, as peft's adapter on the fused gate_up_proj does: r x hidden "
                                       "fewer parameters per expert (Qwen3-30B-A3B r=64: 24% fewer adapter "
                                       "parameters), one rank-r product for both; as fast or faster at r=64, but "
                                       "22% slower at r=8 under full recomputation (BENCHMARKS.md, session 6). "
                                       "The adapter files stay per matrix (w1 and w3 carry the same A).")
    bias: str = _f("none", "Bias training (only 'none' is supported: Mixtral has no biases).", ("none",))
    init_seed: Optional[int] = _f(None, "Seed for LoRA A initialisation (default: train.seed).")


@dataclass
class DataConfig:
    source: str = _f("bundled", "Where rows come from: 'bundled' (the packaged instruct-v3-schema sample), "
                                "'bundled-alpaca', 'bundled-chat', a Hub dataset id (e.g. mosaicml/instruct-v3), "
                                "or empty when path is set.")
    path: str = _f("", "Local .jsonl/.json/.csv/.parquet file (overrides source).")
    train_split: str = _f("train", "Training split name (Hub datasets).")
    eval_split: str = _f("", "Evaluation split name (e.g. test). Empty: hold out eval_fraction of train.")
    eval_fraction: float = _f(0.05, "Fraction of rows held out for evaluation when no eval split is given.")
    eval_max_rows: int = _f(0, "Cap on evaluation rows (0 = no cap).")
    max_rows: int = _f(0, "Cap on training rows read (0 = all).")
    template: str = _f("backtranslate", "Prompt format: backtranslate (the reference recipe), mixtral-chat "
                                        "(mistral-common v1), mixtral-v3-chat (mistral-common v3, Mixtral-8x22B), "
                                        "alpaca, chat-template (the tokenizer's own; ids = transformers' "
                                        "apply_chat_template), text (raw text: continued pretraining, loss on "
                                        "every token, eos after each document, a document longer than "
                                        "max_seq_length split into rows, not truncated).",
                       ("backtranslate", "mixtral-chat", "mixtral-v3-chat", "alpaca", "chat-template", "text"))
    columns: dict = _f({}, "Column mapping, e.g. {prompt: question, response: answer}; keys: prompt, response, "
                           "source, instruction, input, output, messages (OpenAI chat), conversations "
                           "(ShareGPT from/value), tools, text.")
    chat_template_kwargs: dict = _f({}, "Extra variables for the chat template (chat-template), as "
                                        "apply_chat_template takes them, e.g. {enable_thinking: false}.")
    datasets: list[dict] = _f([], "A mixture instead of source/path: [{path: a.jsonl, weight: 2}, {source: "
                                  "org/ds, template: text, columns: {text: body}, max_rows: 1000}]; keys source|path, "
                                  "split, template, columns, weight (> 0, the share of training tokens), max_rows. "
                                  "Mixed by weight (data.mixture says how the shares are met).")
    mixture: str = _f("down", "How data.datasets meets its weights: down (no row repeated: the source scarcest "
                              "for its weight is used whole, the others sampled down to their share) or up (no "
                              "row dropped: the most plentiful source for its weight is used whole, the others "
                              "repeated whole and topped up with a seeded sample). Evaluation rows are never "
                              "repeated.", ("down", "up"))
    streaming: bool = _f(False, "Read Hub datasets as a stream (datasets' streaming=True): rows are read as "
                                "needed (max_rows stops early) instead of downloading the whole split first.")
    train_on_prompt: bool = _f(False, "Compute the loss on the whole text (the recipe) instead of the answer + eos.")
    max_seq_length: int = _f(256, "Packed row length (tokens).")
    packing: bool = _f(True, "Pack examples into rows of max_seq_length with per-example attention.")
    overlong: str = _f("truncate", "An example longer than max_seq_length is truncated or dropped.",
                       ("truncate", "drop"))
    skip_bad_rows: bool = _f(False, "Skip and count malformed rows instead of stopping with an error.")
    seed: int = _f(42, "Seed for the held-out split and shuffling.")
    cache_dir: str = _f("", "Cache for prepared data. Empty: <model cache>/data.")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/tiny", "Every file of the run goes under this directory.")
    max_steps: int = _f(100, "Optimizer steps to run; -1 = derive from num_train_epochs.")
    num_train_epochs: float = _f(1.0, "Epochs over the packed training rows (when max_steps is -1).")
    per_device_train_batch_size: int = _f(4, "Packed rows per micro-batch.")
    per_device_eval_batch_size: int = _f(4, "Packed rows per evaluation batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(2e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    optim: str = _f("adamw", "Optimizer: adamw (fp32 moments, fused on CUDA) or adamw_8bit (bitsandbytes' "
                             "blockwise 8-bit moments: a quarter of the state memory).", ("adamw", "adamw_8bit"))
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    warmup_ratio: float = _f(0.05, "Fraction of steps spent warming up linearly (ignored if warmup_steps > 0); "
                                   "the ramp is (step + 1) / (warm-up steps + 1), never lr 0.")
    warmup_steps: float = _f(0, "Warm-up steps (> 0 overrides warmup_ratio; 0 = use warmup_ratio, so set both to "
                                "0 for none). A fraction below 1 is read as transformers 4.x read the tutorial's "
                                "warmup_steps=0.03: no warm-up, the first step at lr 0, then decay over total - "
                                "0.03 steps (4.x's exact schedule). transformers 5.x reads such a fraction as a "
                                "ratio: that is warmup_ratio here.")
    lr_scheduler_type: str = _f("cosine", "Schedule after warm-up.", ("cosine", "linear", "constant"))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    max_bad_steps: int = _f(3, "Divergence guard: a step whose loss or gradient norm is not finite updates "
                               "nothing (the step still counts: its data is consumed, the lr schedule advances) "
                               "and is logged in metrics.jsonl; this many such steps in a row stop the run with "
                               "an error (the last good checkpoint stays, no adapter is written).")
    logging_steps: int = _f(10, "Log every N optimizer steps.")
    eval_steps: int = _f(20, "Evaluate every N optimizer steps (0 = only at the start and the end).")
    save_steps: int = _f(50, "Checkpoint every N optimizer steps (0 = only at the end).")
    save_total_limit: int = _f(2, "Keep the last K checkpoints.")
    bf16: str = _f("auto", "bf16 autocast over a float32 model: auto (on where the device supports it), true, "
                           "false. A bfloat16 model (model.dtype auto on CUDA) already computes in bf16: no autocast.",
                   ("auto", "true", "false"))
    seed: int = _f(42, "Seed for LoRA initialisation (unless lora.init_seed) and dropout; the data order follows data.seed.")
    router_aux_loss_coef: float = _f(0.0, "Weight of Mixtral's router load-balancing loss (Mixtral used 0.02; "
                                         "0 with a frozen router).")
    resume: str = _f("", "'' (fresh run; refuses a non-empty output_dir with checkpoints), 'auto' (latest "
                         "checkpoint in output_dir if any) or a checkpoint directory.")
    tensorboard: bool = _f(True, "Write TensorBoard event files under output_dir/tb (false = drop tensorboard "
                                 "from train.report_to).")
    report_to: list = _f(["tensorboard"], "Run trackers, any of: tensorboard (event files under output_dir/tb), "
                                          "wandb (pip install 'mixtune[wandb]'; WANDB_MODE=offline keeps the run "
                                          "under output_dir/wandb), mlflow (pip install 'mixtune[mlflow]'; "
                                          "MLFLOW_TRACKING_URI, default file://OUTPUT_DIR/mlruns). wandb and mlflow "
                                          "record the config, per-step and eval metrics, the loss plot and the "
                                          "final adapter. '' (empty) = none.")
    merge_after: bool = _f(False, "Merge the adapter into a bf16/fp32 HF checkpoint at the end.")
    push_to_hub: str = _f("", "Hub repo id (user/name) to upload the adapter to at the end, with a model card naming "
                              "the base model, data, config and final eval loss (huggingface_hub; needs HF_TOKEN or "
                              "`hf auth login`, checked before training). Empty: no push.")
    push_merged: bool = _f(False, "With push_to_hub: also merge the adapter and upload the merged model under "
                                  "merged/ in the same repo.")
    generate_after: int = _f(3, "Before/after generations on N held-out examples (0 = none).")
    progress: bool = _f(True, "Show a progress bar.")
    distributed: str = _f("ddp", "Under torchrun: ddp (every rank holds the whole model, adapter and optimizer "
                                 "state; gradients summed) or fsdp (FSDP2: the 4-bit base, the adapter, its "
                                 "gradients and optimizer state sharded per decoder layer over the ranks). On one "
                                 "process both are plain training.", ("ddp", "fsdp"))
    ddp_timeout: int = _f(3600, "Under torchrun: seconds any rank waits in a collective (a barrier, a gradient "
                                "sum) before it gives up with an error, e.g. when another rank died outside "
                                "torchrun's watch (srun-style launchers). It must cover rank 0's longest solo "
                                "work the others wait for: checkpoint writes and train.merge_after.")


@dataclass
class GenerateConfig:
    max_new_tokens: int = _f(48, "Maximum tokens to generate per prompt; capped, with a notice, so that prompt + "
                                 "new tokens fit the model's max_position_embeddings (a prompt that fills the "
                                 "context by itself is refused).")
    greedy: bool = _f(False, "Greedy decoding instead of sampling.")
    temperature: float = _f(0.7, "Sampling temperature; below 1e-5 decoding is greedy (the limit of T -> 0).")
    top_p: float = _f(0.95, "Nucleus sampling threshold (1 = off).")
    top_k: int = _f(0, "Top-k sampling (0 = off).")
    seed: int = _f(0, "Sampling seed.")


@dataclass
class MergeConfig:
    base: str = _f("original", "Weights the deltas are added to: original (the checkpoint's 16-bit weights) or "
                               "dequantized (the NF4 weights the adapter was trained against).",
                   ("original", "dequantized"))
    dtype: str = _f("auto", "Written dtype: auto (the checkpoint's), bfloat16, float16, float32.",
                    ("auto", "bfloat16", "float16", "float32"))
    out: str = _f("", "Output directory of the merged checkpoint (default: <train.output_dir>/merged for train, "
                          "the adapter's sibling directory 'merged' for mixtune merge, <run>/merged-step-N for a "
                          "checkpoint's adapter).")
    max_shard_size: str = _f("5GB", "Largest safetensors shard.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (loadable by `load_config`)."""
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
    "generate": GenerateConfig, "merge": MergeConfig,
}


# --------------------------------------------------------------------------------------------------
# coercion and validation
# --------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # 'nan' / 'inf' parse as floats: never meant
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if number is not None:
            return number
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML `true` for a str field (e.g. train.bf16)
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list and typing.get_args(tp) == (dict,):  # a list of mappings (data.datasets)
        if isinstance(value, str):
            try:
                value = parse_yaml(value, key) if value.strip() else []
            except YAMLRefused as e:
                raise ConfigError(f"{e}; expected a list of mappings like '[{{path: a.jsonl, weight: 1}}]'") from None
        if isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value):
            return [{str(k): v for k, v in v.items()} for v in value]
        raise ConfigError(f"{key}: expected a list of mappings like '[{{path: a.jsonl, weight: 1}}]', got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ConfigError(f"{key}: expected a list (or a comma-separated string), got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = parse_yaml(value, key) if value.strip() else {}
            except YAMLRefused as e:
                raise ConfigError(f"{e}; expected a mapping like '{{a: b}}'") from None
            value = value or {}
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _check_choices(cfg: Config) -> None:
    for sname, scls in _SECTION_CLASSES.items():
        section = getattr(cfg, sname)
        for f in dataclasses.fields(scls):
            choices = f.metadata.get("choices")
            if choices and getattr(section, f.name) not in choices:
                raise ConfigError(f"{sname}.{f.name}: {getattr(section, f.name)!r} is not one of {', '.join(choices)}")


def _check_columns(columns: dict) -> None:
    """data.columns maps logical names to column names: str -> str (quote a numeric column name)."""
    for k, v in columns.items():
        if not isinstance(v, str) or not v:
            got = repr(v) if isinstance(v, (str, int, float, bool, type(None))) else f"a {type(v).__name__}"
            raise ConfigError(f"data.columns: {k!r} must map to a column name (a non-empty string; quote a "
                              f"numeric name), got {got}")


def _check_report_to(t) -> None:
    import importlib.util

    for name in t.report_to:
        if name not in ("tensorboard", "wandb", "mlflow"):
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; choose from tensorboard, wandb, mlflow")
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to: {name} is not installed: pip install 'mixtune[{name}]'")
    if "tensorboard" not in t.report_to:  # train.tensorboard is the switch the training loop reads
        t.tensorboard = False


def validate(cfg: Config) -> Config:
    """Check values and combinations; raise ConfigError with one clear line."""
    _check_choices(cfg)
    t, d, lo = cfg.train, cfg.data, cfg.lora
    positive = [("lora.r", lo.r), ("data.max_seq_length", d.max_seq_length),
                ("train.per_device_train_batch_size", t.per_device_train_batch_size),
                ("train.per_device_eval_batch_size", t.per_device_eval_batch_size),
                ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                ("generate.max_new_tokens", cfg.generate.max_new_tokens)]
    for name, v in positive:
        if v <= 0:
            raise ConfigError(f"{name}: must be positive, got {v}")
    if not lo.targets:
        raise ConfigError("lora.targets: empty; name at least one module (e.g. q_proj,v_proj,experts)")
    if lo.alpha <= 0:
        raise ConfigError(f"lora.alpha: must be positive (the update is scaled by alpha / r), got {lo.alpha:g}")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate: must be positive, got {t.learning_rate}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_steps > 1 and not float(t.warmup_steps).is_integer():
        raise ConfigError(f"train.warmup_steps: a whole number of steps, or a fraction below 1 (transformers "
                          f"4.x's reading of the tutorial's 0.03), got {t.warmup_steps}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps: must be -1 (use num_train_epochs) or positive, got {t.max_steps}")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        raise ConfigError("train.max_steps and train.num_train_epochs: one of them must be positive")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    if not 0.0 < cfg.generate.top_p <= 1.0:
        raise ConfigError(f"generate.top_p: must be in (0, 1] (1 = off), got {cfg.generate.top_p}")
    if cfg.generate.top_k < 0:
        raise ConfigError(f"generate.top_k: must be >= 0 (0 = off), got {cfg.generate.top_k}")
    if cfg.generate.temperature <= 0 and not cfg.generate.greedy:
        raise ConfigError("generate.temperature: must be positive when sampling (or set generate.greedy true)")
    if cfg.model.memory_budget_gib < 0:
        raise ConfigError(f"model.memory_budget_gib: must be 0 (off) or positive, got {cfg.model.memory_budget_gib}")
    if cfg.model.memory_budget_gib > 0 and cfg.model.moe_backend == "reference":
        raise ConfigError("model.memory_budget_gib plans the grouped MoE backends; it cannot be combined with "
                          "model.moe_backend reference")
    if cfg.model.expert_precision == "fp8" and cfg.model.moe_backend == "reference":
        raise ConfigError("model.expert_precision fp8 runs on the grouped MoE backends; it cannot be combined "
                          "with model.moe_backend reference")
    if cfg.model.checkpoint_layers < -1:
        raise ConfigError(f"model.checkpoint_layers: must be -1 (all layers) or >= 0, got {cfg.model.checkpoint_layers}")
    if t.ddp_timeout < 1:
        raise ConfigError(f"train.ddp_timeout: seconds, at least 1, got {t.ddp_timeout}")
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps: must be at least 1, got {t.max_bad_steps}")
    if not t.output_dir.strip():
        raise ConfigError("train.output_dir: empty; name the run's directory (e.g. --output_dir runs/tiny)")
    _check_report_to(t)
    _check_columns(d.columns)
    if t.save_total_limit < 1:
        raise ConfigError(f"train.save_total_limit: must be at least 1, got {t.save_total_limit}")
    for name, v in [("train.logging_steps", t.logging_steps)]:
        if v <= 0:
            raise ConfigError(f"{name}: must be positive, got {v}")
    for name, v in [("train.eval_steps", t.eval_steps), ("train.save_steps", t.save_steps),
                    ("train.generate_after", t.generate_after), ("train.max_grad_norm", t.max_grad_norm),
                    ("train.warmup_steps", t.warmup_steps), ("train.router_aux_loss_coef", t.router_aux_loss_coef)]:
        if v < 0:
            raise ConfigError(f"{name}: must be >= 0, got {v}")
    # clashing options: say which two keys disagree
    if t.bf16 == "true" and cfg.model.dtype == "float16":
        raise ConfigError("train.bf16 true clashes with model.dtype float16: pick one compute precision")
    if cfg.merge.out and os.path.abspath(cfg.merge.out) == os.path.abspath(t.output_dir):
        raise ConfigError("merge.out clashes with train.output_dir: the merged checkpoint needs its own directory "
                          "(default: <train.output_dir>/merged)")
    if t.eval_steps > 0 and d.eval_fraction == 0 and not d.eval_split:
        raise ConfigError("train.eval_steps > 0 needs evaluation data: set data.eval_fraction > 0 or data.eval_split "
                          "(or train.eval_steps 0)")
    return cfg


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on cfg from a YAML/CLI value, coercing its type; unknown keys raise ConfigError."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"unknown config key {dotted!r}: keys look like section.key, sections are "
                          f"{', '.join(_SECTION_CLASSES)}")
    sname, key = parts
    if sname not in _SECTION_CLASSES:
        raise ConfigError(f"unknown config section {sname!r} in {dotted!r}; sections are {', '.join(_SECTION_CLASSES)}")
    scls = _SECTION_CLASSES[sname]
    hints = _hints(scls)
    if key not in hints:
        import difflib
        near = difflib.get_close_matches(key, list(hints), n=1)
        hint = f" (did you mean {sname}.{near[0]}?)" if near else ""
        raise ConfigError(f"unknown config key {dotted!r}{hint}")
    setattr(getattr(cfg, sname), key, _coerce(dotted, value, hints[key]))


def apply_mapping(cfg: Config, mapping: dict, origin: str = "config") -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections (model:, lora:, data:, train:, ...)")
    for sname, body in mapping.items():
        if sname not in _SECTION_CLASSES:
            raise ConfigError(f"{origin}: unknown config section {sname!r}; sections are {', '.join(_SECTION_CLASSES)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: section {sname!r} must be a mapping of keys")
        for key, value in body.items():
            try:
                set_key(cfg, f"{sname}.{key}", value)
            except ConfigError as e:
                raise ConfigError(f"{origin}: {e}") from None


def load_yaml(path: str | os.PathLike) -> dict:
    """A config file's mapping, read within mixtune._yaml's budgets (size, depth, aliases; no duplicate keys)."""
    try:
        return read_yaml_file(path) or {}
    except YAMLRefused as e:
        raise ConfigError(str(e)) from None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--train.lr', '2e-5', '--lora.r=8'] -> [('train.lr', '2e-5'), ('lora.r', '8')]. A flag with no value
    (the next token is another flag or the end) is read as 'true'."""
    out, i = [], 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key VALUE")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out.append((key.replace("-", "_") if "." in key else key, value))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | list[tuple[str, Any]] | None = None,
                base: dict | None = None) -> Config:
    """Defaults < `base` mapping < YAML file at `path` < overrides. Returns a validated Config."""
    cfg = Config()
    if base:
        apply_mapping(cfg, base, "defaults")
    if path:
        apply_mapping(cfg, load_yaml(path), str(path))
    if overrides:
        pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else overrides
        for key, value in pairs:
            set_key(cfg, key, value)
    return validate(cfg)


def config_help() -> str:
    """Every key with its type, default and doc, for `--help`."""
    lines = []
    for sname, scls in _SECTION_CLASSES.items():
        lines.append(f"{sname}:")
        hints = _hints(scls)
        default = scls()
        for f in dataclasses.fields(scls):
            tp = hints[f.name]
            args = [x for x in typing.get_args(tp) if x is not type(None)]
            if typing.get_origin(tp) in (Union, types.UnionType) and args:
                tname = f"{args[0].__name__} or null"
            else:
                tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"  --{sname}.{f.name} ({tname}, default {json.dumps(getattr(default, f.name))}){extra}")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
