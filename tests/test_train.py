"""The training recipe: kill-and-resume reaches the same adapter as one uninterrupted run; a fresh run
refuses a directory with checkpoints; accumulation normalises by the step's tokens."""

import functools
import os

import pytest
import torch
from safetensors.torch import load_file

from mixtune.loop import checkpoint as ckpt
from mixtune import train
from mixtune.loop import schedule, step as loop_step, stream
from mixtune.loop.report import read_metrics
from mixtune.config import load_config

FAST = ["--train.max_steps", "6", "--train.save_steps", "2", "--train.eval_steps", "0",
        "--train.generate_after", "0", "--train.tensorboard", "false", "--train.progress", "false",
        "--train.logging_steps", "1", "--data.max_seq_length", "128", "--train.per_device_train_batch_size", "2",
        "--train.gradient_accumulation_steps", "2", "--lora.dropout", "0.1", "--lora.r", "4",
        "--train.router_aux_loss_coef", "0.01"]


DATA: list = []
FAST = FAST + DATA


class Killed(RuntimeError):
    pass


def _cfg(out_dir, *extra):
    return load_config(None, FAST + ["--train.output_dir", str(out_dir), *extra])


def _cfg_opt(out_dir, *extra, optim="adamw"):
    return _cfg(out_dir, "--train.optim", optim, *extra)


@pytest.mark.parametrize("optim", ["adamw", "adamw_8bit", "adamw+shared_a"])
def test_kill_and_resume_gives_the_same_adapter(tmp_path, optim):
    """adamw+shared_a: lora.shared_gate_up_a, whose one A under two names is saved and restored once."""
    if optim == "adamw+shared_a":
        optim = "adamw"

        def _cfg(out_dir, *extra):
            return _cfg_opt(out_dir, "--lora.shared_gate_up_a", "true", *extra, optim="adamw")
    else:
        _cfg = functools.partial(_cfg_opt, optim=optim)
    full = tmp_path / "full"
    train.main(_cfg(full))
    if optim == "adamw_8bit":  # the checkpoint really holds 8-bit moments (lm_head's LoRA B is large enough)
        saved = ckpt.load_state(str(full / "checkpoints" / "step-6"), "optimizer")
        flat = [v for st in saved["state"].values() for v in
                (list(st.values()) + list(st.get("__bnb_optimizer_quant_state__", {}).values()))]
        assert any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in flat)

    part = tmp_path / "part"

    def kill_at_3(step):
        if step == 3:
            raise Killed("simulated kill after step 3")

    with pytest.raises(Killed):
        train.main(_cfg(part), on_step=kill_at_3)
    assert [s for s, _ in ckpt.list_checkpoints(str(part))] == [2]
    # the kill also left a checkpoint half-written (no completion marker): it must never be loaded
    half = part / "checkpoints" / "step-4"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"not a tensor file")
    assert ckpt.find_latest_checkpoint(str(part)).endswith("step-2")

    # a fresh run into that directory is refused with a clear message
    with pytest.raises(ckpt.CheckpointError, match="--resume"):
        train.main(_cfg(part))

    result = train.main(_cfg(part, "--train.resume", "auto"))
    assert result["steps"] == 6
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # the metrics of the resumed run continue the killed one without duplicates
    steps = [r["step"] for r in read_metrics(str(part / "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert os.path.exists(part / "checkpoints" / "step-6" / ckpt.MARKER)


def test_same_seed_same_loss_curve(tmp_path):
    r1 = train.main(_cfg(tmp_path / "a", "--train.max_steps", "2", "--train.save_steps", "0"))
    r2 = train.main(_cfg(tmp_path / "b", "--train.max_steps", "2", "--train.save_steps", "0"))
    l1 = [r["loss"] for r in read_metrics(str(tmp_path / "a" / "metrics.jsonl")) if r["kind"] == "train"]
    l2 = [r["loss"] for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl")) if r["kind"] == "train"]
    assert l1 == l2 and r1["eval_loss"] == r2["eval_loss"]


def test_schedule_and_step_planning():
    cfg = load_config(None, ["--train.max_steps", "-1", "--train.num_train_epochs", "2",
                             "--train.gradient_accumulation_steps", "3"])
    assert schedule.total_optimizer_steps(cfg, 100, per_epoch=25) == 17  # ceil(2 * 25 / 3)
    assert schedule.warmup_steps(cfg, 100) == 5  # ceil(0.05 * 100)
    f = schedule.lr_lambda("cosine", 5, 100)
    assert f(4) < 1.0 and f(5) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-12)


def test_label_tokens_match_the_shifted_loss():
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, -100, 3]])
    # position t predicts labels[t + 1]: the first label of each row is never a target
    assert stream.label_tokens({"labels": labels}) == 4


def _tiny_lora_model(tiny_ckpt, targets="q_proj,v_proj,experts,lm_head"):
    from mixtune.lora import apply_lora
    from mixtune.model import load_model
    model = load_model(tiny_ckpt, quant="none", dtype=torch.float32, device="cpu", report=None)
    cfg = load_config(None, ["--lora.targets", targets, "--lora.r", "4"])
    apply_lora(model, cfg.lora, seed=0)
    with torch.no_grad():  # make B non-zero so every adapter tensor gets a gradient
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    model.train()
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _batches():
    g = torch.Generator().manual_seed(0)
    T = 24
    ids = torch.randint(3, 32000, (4, T), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(T - 10)]).expand(4, T).contiguous()  # two packed examples
    labels = ids.clone()
    labels[0, :20] = -100  # rows with very different numbers of label tokens
    labels[1, :15] = -100
    labels[2, :3] = -100
    rows = [{"input_ids": ids[i:i + 1], "labels": labels[i:i + 1], "position_ids": pos[i:i + 1]} for i in range(4)]
    cat = lambda rs: {k: torch.cat([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
    return cat(rows[:2]), cat(rows[2:]), cat(rows)


def test_accumulation_is_exact_and_checkpointing_changes_nothing(tiny_ckpt):
    model = _tiny_lora_model(tiny_ckpt)
    dev = torch.device("cpu")
    b1, b2, both = _batches()

    loss_a, n_a, _, _ = loop_step.forward_backward(model, [b1, b2], dev, False, 0.0)
    g_accum = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_b, n_b, _, _ = loop_step.forward_backward(model, [both], dev, False, 0.0)
    g_whole = _grads(model)
    model.zero_grad(set_to_none=True)
    assert n_a == n_b == stream.label_tokens(both)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for n in g_whole:
        torch.testing.assert_close(g_accum[n], g_whole[n], rtol=1e-4, atol=1e-7)

    # a mean of per-micro-batch means would weigh the tokens differently: the test can tell
    for b in (b1, b2):
        (model(b["input_ids"], b["position_ids"], b["labels"], return_logits=False).loss / 2).backward()
    g_means = _grads(model)
    model.zero_grad(set_to_none=True)
    assert any(not torch.allclose(g_means[n], g_whole[n], rtol=1e-3, atol=1e-6) for n in g_whole)

    # activation checkpointing recomputes the same values: every layer, the first one only, attention blocks
    # only (with the low-memory grouped MoE), and the first layer in full + the other's attention
    def grads_with(layers, attention, backend, precision):
        model.set_checkpointing(layers, attention)
        model.set_moe_backend(backend, precision)
        loop_step.forward_backward(model, [b1, b2], dev, False, 0.0)
        g = _grads(model)
        model.zero_grad(set_to_none=True)
        return g

    for layers, attention, backend in ((-1, False, "auto"), (1, False, "auto"), (0, True, "grouped_lowmem"),
                                       (1, True, "grouped")):
        g_ckpt = grads_with(layers, attention, backend, "bf16")
        for n in g_whole:
            torch.testing.assert_close(g_ckpt[n], g_accum[n], rtol=1e-5, atol=1e-6)

    # with FP8 experts the recomputation also repeats the same (quantized) products: checkpointed == not
    g_fp8 = grads_with(0, False, "grouped", "fp8")
    assert any(not torch.equal(g_fp8[n], g_accum[n]) for n in g_accum)  # fp8 really ran
    for layers, attention, backend in ((-1, False, "grouped"), (0, True, "grouped_lowmem")):
        g_ckpt = grads_with(layers, attention, backend, "fp8")
        for n in g_fp8:
            torch.testing.assert_close(g_ckpt[n], g_fp8[n], rtol=1e-5, atol=1e-6)
    model.set_checkpointing(0, False)
    model.set_moe_backend("auto", "bf16")

    # the router aux loss adds a gradient when its coefficient is on
    loop_step.forward_backward(model, [b1, b2], dev, False, 0.5)
    g_aux = _grads(model)
    assert any(not torch.allclose(g_aux[n], g_accum[n]) for n in g_accum)


def test_bf16_autocast_runs_on_cpu_when_asked(tmp_path):
    r = train.main(_cfg(tmp_path / "bf16", "--train.max_steps", "2", "--train.save_steps", "0", "--train.bf16",
                        "true"))
    assert r["steps"] == 2 and r["eval_loss"] == r["eval_loss"]  # finite, not NaN


@pytest.mark.parametrize("preset", ["mixtral-8x7b-recipe.yaml", "mixtral-8x7b-qlora.yaml"])
def test_mixtral_presets_run_end_to_end_at_tiny_scale(tmp_path, preset):
    """Each Mixtral preset, shrunk to the tiny model and bundled data, runs its whole path: its targets
    (the recipe's unmatched ones reported), loss mask, schedule, bf16 autocast, checkpointing, aux loss, merge."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", preset), [
        "--model.name_or_path", "", "--data.source", "bundled", "--data.eval_split", "", "--data.eval_max_rows", "8",
        "--data.max_seq_length", "128", "--train.max_steps", "2", "--train.per_device_train_batch_size", "2",
        "--train.per_device_eval_batch_size", "4", "--train.eval_steps", "1", "--train.save_steps", "1",
        "--train.generate_after", "1", "--generate.max_new_tokens", "4", "--train.progress", "false",
        "--train.tensorboard", "false", "--train.output_dir", str(tmp_path / "run")])
    r = train.main(cfg)
    assert r["steps"] == 2 and r["merged"] and os.path.exists(os.path.join(r["merged"], "config.json"))
    report = open(tmp_path / "run" / "report.md").read()
    if "recipe" in preset:
        assert "gate_proj, up_proj, down_proj (matched nothing" in report
    else:
        assert "unmatched" not in report


def test_no_autocast_over_a_bf16_model():
    """Autocast over a bf16 model pushed the grouped-MoE products to fp32 (4.3x slower on the H200): a
    bfloat16 model trains without it; a float32 model still gets bf16 autocast when asked."""
    import torch

    from mixtune.config import load_config
    from mixtune.runtime import use_bf16

    cpu = torch.device("cpu")
    forced = load_config(None, ["--train.bf16", "true"])
    assert use_bf16(forced, cpu, torch.float32) is True
    assert use_bf16(forced, cpu, torch.bfloat16) is False
    assert use_bf16(load_config(None, []), cpu, torch.float32) is False  # auto: off on CPU


def test_resume_with_a_changed_config_is_refused_and_keeps_the_runs_config(tmp_path):
    out = tmp_path / "run"
    first = _cfg(out)
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / ckpt.MARKER).write_text("step 2\n")
    first.save(str(out / "config.yaml"))
    saved = (out / "config.yaml").read_text()
    from mixtune.config import ConfigError
    with pytest.raises(ConfigError, match=r"train.learning_rate 0.002 -> 0.1"):
        train.main(_cfg(out, "--train.resume", "auto", "--train.learning_rate", "0.1"))
    with pytest.raises(ConfigError, match=r"lora.r 4 -> 8"):
        train.main(_cfg(out, "--train.resume", "auto", "--lora.r", "8"))
    assert (out / "config.yaml").read_text() == saved  # the run's record is not overwritten by a refused resume
    # bookkeeping keys may change on resume
    ckpt.check_resume_config(_cfg(out, "--train.resume", "auto", "--train.progress", "true",
                                   "--train.save_total_limit", "5", "--generate.max_new_tokens", "8"),
                              str(out / "config.yaml"))


def test_resume_auto_without_checkpoints_says_it_starts_fresh(tmp_path, capsys):
    result = train.main(_cfg(tmp_path / "new", "--train.resume", "auto", "--train.max_steps", "1",
                             "--train.save_steps", "0"))
    assert result["steps"] == 1
    assert "no complete checkpoint in" in capsys.readouterr().err


def test_lora_target_errors_come_before_loading_the_weights(tmp_path, tiny_ckpt):
    """strict_targets (or no target matching) fails on the meta device, before the weights are read: a model
    whose shard is damaged reports the target, not the shard."""
    import shutil
    from mixtune.config import ConfigError
    cfg_only = tmp_path / "damaged"
    shutil.copytree(tiny_ckpt, cfg_only)
    (cfg_only / "model-00002-of-00002.safetensors").write_bytes(b"damaged")
    with pytest.raises(ConfigError, match="'foo' matches no module.*strict_targets"):
        train.main(_cfg(tmp_path / "a", "--model.name_or_path", str(cfg_only), "--lora.targets", "q_proj,foo",
                        "--lora.strict_targets", "true"))
    with pytest.raises(ConfigError, match="none of foo,bar matches"):
        train.main(_cfg(tmp_path / "b", "--model.name_or_path", str(cfg_only), "--lora.targets", "foo,bar"))


def test_merge_after_into_a_foreign_dir_is_refused_before_training(tmp_path):
    from mixtune.config import ConfigError
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not an earlier mixtune merge"):
        train.main(_cfg(tmp_path / "run", "--train.merge_after", "true", "--merge.out", str(foreign)))
    assert not (tmp_path / "run" / "checkpoints").exists() and (foreign / "keep.txt").read_text() == "keep me"


def test_fp8_experts_train_close_to_bf16_and_evaluate_in_bf16(tmp_path):
    """expert_precision fp8 (emulated on CPU: the same arithmetic as the GPU kernels) really changes the
    training products — the loss curve differs from bf16's — but stays within e4m3 noise of it; evaluation
    runs the experts in bf16, so the untrained model's eval loss is the same number in both runs."""
    args = ["--train.max_steps", "4", "--train.save_steps", "0", "--train.eval_steps", "2"]
    r16 = train.main(_cfg(tmp_path / "bf16", *args))
    r8 = train.main(_cfg(tmp_path / "fp8", *args, "--model.expert_precision", "fp8"))
    recs = {n: read_metrics(str(tmp_path / n / "metrics.jsonl")) for n in ("bf16", "fp8")}
    loss = {n: [r["loss"] for r in recs[n] if r["kind"] == "train"] for n in recs}
    evals = {n: [r["eval_loss"] for r in recs[n] if r["kind"] == "eval"] for n in recs}
    assert len(loss["fp8"]) == 4 and loss["fp8"] != loss["bf16"]
    for a, b in zip(loss["fp8"], loss["bf16"]):
        assert abs(a - b) / b < 0.02, (loss["fp8"], loss["bf16"])
    assert evals["fp8"][0] == evals["bf16"][0]
    assert abs(r8["eval_loss"] - r16["eval_loss"]) / r16["eval_loss"] < 0.02
    assert "| expert_precision | fp8 |" in open(tmp_path / "fp8" / "report.md").read()


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_a_clear_error(monkeypatch):
    from mixtune.config import ConfigError
    from mixtune.kernels import fp8
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match="FP8 tensor cores .* this GPU is 8.0"):
        train._checked_precision("fp8", "cuda")
    assert train._checked_precision("bf16", "cuda") == "bf16"
