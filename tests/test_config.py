"""The typed config: defaults = configs/tiny.yaml, every preset loads, errors name the key."""

import glob
import os

import pytest

from mixtune.config import Config, ConfigError, config_help, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"tiny.yaml", "mixtral-8x7b-recipe.yaml", "mixtral-8x7b-qlora.yaml", "qwen3-30b-a3b-qlora.yaml",
            "olmoe-1b-7b-qlora.yaml", "mixtral-8x22b-qlora.yaml"} <= names  # the families: tests/test_presets.py


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    with open(path) as fh:
        first = fh.readline().strip()
    rel = os.path.relpath(path, ROOT)
    assert first.startswith("# mixtune ") and rel in first, f"{rel}: first line must be the command that runs it"


def test_tiny_yaml_equals_the_code_defaults():
    assert load_config(os.path.join(ROOT, "configs", "tiny.yaml")).to_dict() == load_config().to_dict()


def test_recipe_preset_is_the_reference_recipe():
    c = load_config(os.path.join(ROOT, "configs", "mixtral-8x7b-recipe.yaml"))
    assert c.model.name_or_path == "mistralai/Mixtral-8x7B-v0.1" and c.model.quant == "nf4"
    assert c.data.source == "mosaicml/instruct-v3" and c.data.template == "backtranslate"
    assert c.data.train_on_prompt and c.data.packing and c.data.max_seq_length == 1024
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (64, 16.0, 0.1)
    assert c.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                              "lm_head"]
    t = c.train
    assert (t.learning_rate, t.per_device_train_batch_size * t.gradient_accumulation_steps, t.max_steps) == \
        (2.5e-5, 32, 1000)
    assert (t.warmup_ratio, t.logging_steps, t.eval_steps, t.bf16) == (0.03, 10, 10, "true")
    assert c.generate.max_new_tokens == 512 and not c.generate.greedy


def test_qlora_preset_adapts_experts_with_answer_only_loss():
    c = load_config(os.path.join(ROOT, "configs", "mixtral-8x7b-qlora.yaml"))
    assert "experts" in c.lora.targets and not c.data.train_on_prompt and c.data.packing
    assert c.train.router_aux_loss_coef == 0.02 and c.model.gradient_checkpointing


def test_overrides_coerce_types_and_beat_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1e-3\n  max_steps: 7\nlora:\n  targets: [q_proj]\n")
    c = load_config(str(p), ["--train.learning_rate", "2e-5", "--lora.targets", "q_proj,v_proj",
                             "--model.gradient_checkpointing"])
    assert c.train.learning_rate == 2e-5 and c.train.max_steps == 7
    assert c.lora.targets == ["q_proj", "v_proj"] and c.model.gradient_checkpointing is True


@pytest.mark.parametrize("args, msg", [
    (["--train.lr", "1"], "unknown config key 'train.lr'"),
    (["--train.max_step", "1"], "did you mean train.max_steps"),
    (["--nope.key", "1"], "unknown config section 'nope'"),
    (["--train.max_steps", "ten"], "train.max_steps: expected an integer, got 'ten'"),
    (["--train.bf16", "maybe"], "train.bf16: 'maybe' is not one of auto, true, false"),
    (["--train.bf16", "true", "--model.dtype", "float16"], "clashes with model.dtype float16"),
    (["--train.eval_steps", "5", "--data.eval_fraction", "0"], "train.eval_steps > 0 needs evaluation data"),
    (["--train.learning_rate", "nan"], "train.learning_rate: expected a finite number, got 'nan'"),
    (["--lora.alpha", "inf"], "lora.alpha: expected a finite number, got 'inf'"),
    (["--generate.top_p", "2"], "generate.top_p: must be in (0, 1]"),
    (["--generate.top_k", "-5"], "generate.top_k: must be >= 0"),
    (["--model.checkpoint_layers", "-2"], "model.checkpoint_layers: must be -1 (all layers) or >= 0"),
    (["--train.optim", "adam8"], "train.optim: 'adam8' is not one of adamw, adamw_8bit"),
    (["--model.moe_backend", "triton"], "model.moe_backend: 'triton' is not one of"),
    (["--model.expert_precision", "int4"], "model.expert_precision: 'int4' is not one of bf16, fp8"),
    (["--model.expert_precision", "fp8", "--model.moe_backend", "reference"],
     "model.expert_precision fp8 runs on the grouped MoE backends"),
])
def test_errors_name_the_key(args, msg):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, args)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*train.max_stepz"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_resolved_config_roundtrips(tmp_path):
    c = load_config(None, ["--train.max_steps", "3", "--model.revision", "main"])
    c.save(tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).to_dict() == c.to_dict()


def test_help_documents_every_key():
    text = config_help()
    for section, body in Config().to_dict().items():
        for key in body:
            assert f"--{section}.{key} " in text


def test_readme_config_reference_is_the_current_help():
    """README's "Config reference" says it is generated from `mixtune train --help`: keep it so."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    assert config_help() in readme, "README.md's config reference is stale: paste config_help() again"


@pytest.mark.parametrize("args, msg", [
    (["--lora.alpha", "0"], "lora.alpha: must be positive"),
    (["--lora.alpha", "-16"], "lora.alpha: must be positive"),
    (["--train.max_bad_steps", "0"], "train.max_bad_steps: must be at least 1"),
    (["--train.output_dir", ""], "train.output_dir: empty"),
    (["--data.columns", "{prompt: 3}"], "data.columns: 'prompt' must map to a column name"),
    (["--data.columns", "{prompt: [a, b]}"], "got a list"),
    (["--data.columns", "{prompt: q, prompt: r}"], "duplicate key 'prompt'"),
])
def test_validation_of_issue_11(args, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_output_dir_empty_is_one_line_through_the_cli(capsys):
    from mixtune import cli
    assert cli.main(["train", "--output_dir", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtune: error: train.output_dir: empty") and len(err.strip().splitlines()) == 1


ALIAS_BOMB = ('data:\n  columns:\n    a: &a ["x","x","x","x","x","x","x","x","x"]\n'
              + "".join(f"    {n}: &{n} [{','.join([f'*{p}'] * 9)}]\n"
                        for p, n in zip("abcdefgh", "bcdefghi")))


@pytest.mark.parametrize("name, text, msg", [
    ("bomb.yaml", ALIAS_BOMB, "once its aliases (*name) are expanded"),
    ("deep.yaml", "train: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 32 levels deep"),
    ("dup.yaml", "train:\n  max_steps: 3\nlora:\n  r: 4\ntrain:\n  max_steps: 5\n",
     "duplicate key 'train' at line 5 (first at line 1)"),
    ("dupinner.yaml", "train:\n  max_steps: 3\n  max_steps: 5\n", "duplicate key 'max_steps' at line 3"),
    ("dup.json", '{"train": {"max_steps": 3, "max_steps": 5}}', "duplicate key 'max_steps'"),
])
def test_hostile_yaml_fails_fast_with_one_line(tmp_path, name, text, msg):
    import time
    assert len(ALIAS_BOMB) < 400  # the issue's bomb was 354 bytes
    p = tmp_path / name
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert time.perf_counter() - t0 < 5
    assert msg in str(e.value) and name in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_yaml_merge_keys_may_override_and_non_utf8_names_the_file(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  <<: {max_steps: 3, logging_steps: 1}\n  max_steps: 5\n")
    c = load_config(str(ok))
    assert c.train.max_steps == 5 and c.train.logging_steps == 1
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  output_dir: runs/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9"):
        load_config(str(bad))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="big.yaml: refused: larger than 1 MiB"):
        load_config(str(big))
