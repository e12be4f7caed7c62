"""The lr schedule: the recipe preset's warm-up (transformers 5.x's reading of the tutorial's warmup_steps=0.03),
the exact transformers 4.x schedule with `--train.warmup_steps 0.03`, and the defaults unchanged."""

import math
import os

import pytest
import torch

from mixtune.config import ConfigError, load_config
from mixtune.loop.schedule import lr_lambda, warmup_steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "configs", "mixtral-8x7b-recipe.yaml")


# transformers 4.x (optimization.py, read in 4.36.2 and 4.57.1), re-stated: TrainingArguments.get_warmup_steps
# returns warmup_steps when > 0 (the tutorial's 0.03 stays 0.03: nothing rounds it), else ceil(ratio × total);
# the Trainer's LambdaLR multiplies the peak lr by these after `step` scheduler steps.
def tf4_warmup(steps: float, ratio: float, total: int) -> float:
    return steps if steps > 0 else math.ceil(total * ratio)


def tf4_linear(step: int, warmup: float, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def tf4_cosine(step: int, warmup: float, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _recipe(*overrides):
    return load_config(RECIPE, list(overrides))


def test_tutorial_warmup_steps_003_is_transformers_4x_schedule_exactly():
    cfg = _recipe("--train.warmup_steps", "0.03")
    total = cfg.train.max_steps
    assert (total, cfg.train.lr_scheduler_type) == (1000, "linear")
    w = warmup_steps(cfg, total)
    assert w == tf4_warmup(0.03, cfg.train.warmup_ratio, total) == 0.03
    f = lr_lambda(cfg.train.lr_scheduler_type, w, total)
    # 4.x: no warm-up, the first step at lr 0, then (total - s) / (total - 0.03)
    assert f(0) == 0.0 == tf4_linear(0, 0.03, 1000)
    assert f(1) == pytest.approx(999 / 999.97, rel=1e-14)
    assert f(500) == pytest.approx(500 / 999.97, rel=1e-14)
    for s in range(total + 1):
        assert f(s) == pytest.approx(tf4_linear(s, 0.03, total), rel=1e-12, abs=1e-15), s
    assert f(total) == 0.0


@pytest.mark.parametrize("kind,ref", [("linear", tf4_linear), ("cosine", tf4_cosine)])
@pytest.mark.parametrize("total", [2, 7, 1000])
@pytest.mark.parametrize("frac", [0.03, 0.5, 0.999])
def test_fractional_warmup_matches_4x_arithmetic(kind, ref, total, frac):
    f = lr_lambda(kind, frac, total)
    for s in range(total + 1):
        assert f(s) == pytest.approx(ref(s, frac, total), rel=1e-12, abs=1e-15), (kind, total, frac, s)


def test_the_first_optimizer_step_runs_at_lr_0_like_the_4x_trainer():
    """As loop/fit.py builds it: LambdaLR over the optimizer, stepped after every optimizer step."""
    cfg = _recipe("--train.warmup_steps", "0.03")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=cfg.train.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.train.lr_scheduler_type, warmup_steps(cfg, 1000), 1000))
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(2.5e-5 * 999 / 999.97, rel=1e-12)
    assert lrs[2] == pytest.approx(2.5e-5 * 998 / 999.97, rel=1e-12)


def test_recipe_preset_is_the_5x_reading():
    """warmup_ratio 0.03 of 1000 steps: 30 warm-up steps (what transformers 5.x makes of warmup_steps=0.03, a
    ratio), mixtune's ramp (step + 1) / 31 (never lr 0), then linear decay to 0."""
    cfg = _recipe()
    assert cfg.train.warmup_steps == 0 and cfg.train.warmup_ratio == 0.03
    w = warmup_steps(cfg, 1000)
    assert w == 30 == math.ceil(1000 * 0.03)  # transformers 5.x: ceil(num_training_steps * warmup_steps)
    f = lr_lambda("linear", w, 1000)
    assert f(0) == 1 / 31 and f(29) == 30 / 31 and f(30) == 1.0
    assert f(515) == pytest.approx(0.5) and f(1000) == 0.0


def test_warmup_steps_0_alone_keeps_the_ratio_both_0_switch_warmup_off():
    assert warmup_steps(_recipe("--train.warmup_steps", "0"), 1000) == 30
    cfg = _recipe("--train.warmup_steps", "0", "--train.warmup_ratio", "0")
    w = warmup_steps(cfg, 1000)
    assert w == 0
    f = lr_lambda("linear", w, 1000)
    # = transformers 4.x with an integer warmup_steps 0: full lr at step 0, linear decay
    for s in (0, 1, 500, 999, 1000):
        assert f(s) == pytest.approx(tf4_linear(s, 0, 1000), rel=1e-12, abs=1e-15)


def test_whole_warmup_steps_unchanged():
    assert warmup_steps(load_config(), 100) == 5  # the default: ceil(0.05 * 100)
    cfg = load_config(None, ["--train.warmup_steps", "30"])
    w = warmup_steps(cfg, 1000)
    assert w == 30 and isinstance(w, int)
    f = lr_lambda("cosine", w, 1000)
    assert [f(0), f(29), f(30)] == [1 / 31, 30 / 31, 1.0]
    assert f(1000) == pytest.approx(0.0, abs=1e-15)
    c = lr_lambda("constant", 3, 10)
    assert [c(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_warmup_steps_validation():
    assert load_config(None, ["--train.warmup_steps", "0.5"]).train.warmup_steps == 0.5
    with pytest.raises(ConfigError, match="train.warmup_steps: a whole number of steps"):
        load_config(None, ["--train.warmup_steps", "2.5"])
    with pytest.raises(ConfigError, match="train.warmup_steps: must be >= 0"):
        load_config(None, ["--train.warmup_steps", "-1"])
