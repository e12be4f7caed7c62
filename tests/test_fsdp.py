"""train.distributed fsdp under torchrun (CPU, gloo, 2 ranks): FSDP2 over the 4-bit base makes the updates of one
process with twice the accumulation (adapter, losses, gradient norms); its checkpoints (adapter in PEFT format by
rank 0, training state through torch.distributed.checkpoint) resume to the same adapter; a resume on another
number of ranks is refused before anything is rewritten. Two torchrun launches in all."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mixtune import train
from mixtune.config import load_config
from mixtune.loop.report import read_metrics
from mixtune.loop.checkpoint import CheckpointError

FSDP = ["--train.max_steps", "3", "--train.save_steps", "2", "--train.eval_steps", "2",
        "--train.generate_after", "0", "--train.tensorboard", "false", "--train.progress", "false",
        "--train.logging_steps", "1", "--data.max_seq_length", "128", "--train.per_device_train_batch_size", "2",
        "--lora.dropout", "0.0", "--lora.r", "4", "--train.router_aux_loss_coef", "0.01",
        "--train.distributed", "fsdp"]


def _torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mixtune", "train", *args], capture_output=True, text=True, env=env, timeout=900)


def _adapter(d):
    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


@pytest.mark.torchrun
def test_fsdp_two_ranks_equal_one_process_then_resume_and_refuse_another_world(tmp_path, capsys):
    single = tmp_path / "single"
    train.main(load_config(None, FSDP + ["--train.gradient_accumulation_steps", "2",
                                         "--train.output_dir", str(single)]))
    assert "single-process run; training as one" in capsys.readouterr().err

    run = tmp_path / "fsdp"
    p = _torchrun(*FSDP, "--train.gradient_accumulation_steps", "1", "--train.output_dir", str(run))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "sharded over 2 ranks" in p.stderr and p.stderr.count("mixtune: done in") == 1

    a, b = _adapter(single), _adapter(run)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    m1, m2 = read_metrics(os.path.join(single, "metrics.jsonl")), read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in m2 if r["kind"] == "train"] == [1, 2, 3]
    for r1, r2 in zip(m1, m2):
        assert r1["kind"] == r2["kind"] and r1["step"] == r2["step"]
        key = "loss" if r1["kind"] == "train" else "eval_loss"
        assert r2[key] == pytest.approx(r1[key], rel=1e-5)
        if r1["kind"] == "train":  # summed, not averaged, by the reduce-scatter; the global norm
            assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)

    def trainable(d):  # the report counts the gathered adapter as trainable, as one process does
        return [l for l in (d / "report.md").read_text().splitlines() if "lora trainable params" in l]
    assert trainable(run) == trainable(single) and trainable(run)

    step2 = run / "checkpoints" / "step-2"
    assert (step2 / "COMPLETE").exists() and (step2 / "sharded" / ".metadata").exists()
    assert not (step2 / "trainable.safetensors").exists()
    assert json.loads((step2 / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ck = load_file(str(step2 / "adapter" / "adapter_model.safetensors"))  # whole tensors, PEFT keys
    assert ck.keys() == a.keys() and all(ck[k].shape == a[k].shape for k in a)

    # kill after step 2 (its checkpoint is the last one left), resume on 2 ranks: the same final adapter. The
    # resumed run computes the experts with the grouped low-memory kernels under full recomputation (both may
    # change on resume): their autograd functions re-read the NF4 storage in backward, which FSDP2 has
    # resharded after the forward and all-gathers again before the layer's backward
    shutil.rmtree(run / "checkpoints" / "step-3")
    shutil.rmtree(run / "adapter")
    p = _torchrun(*FSDP, "--train.gradient_accumulation_steps", "1", "--train.output_dir", str(run),
                  "--train.resume", "auto", "--model.moe_backend", "grouped_lowmem",
                  "--model.gradient_checkpointing", "true")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming from" in p.stderr and "step 2/3" in p.stderr
    c = _adapter(run)
    for k in a:
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-6)
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl")) if r["kind"] == "train"] == [1, 2, 3]

    # the sharded checkpoint on one process: refused naming both numbers, nothing in the run dir rewritten
    shutil.rmtree(run / "checkpoints" / "step-3")
    before = {f: (run / f).stat().st_mtime_ns for f in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(CheckpointError, match=r"trained on 2 rank\(s\), this run has 1.*sharded"):
        train.main(load_config(None, FSDP + ["--train.gradient_accumulation_steps", "1", "--train.output_dir",
                                             str(run), "--train.resume", "auto"]))
    assert {f: (run / f).stat().st_mtime_ns for f in before} == before


@pytest.mark.torchrun
def test_fsdp_with_a_shared_gate_up_a_equals_one_process_and_resumes(tmp_path):
    """lora.shared_gate_up_a under fsdp: the one A under two names is sharded, gathered for the adapter files
    (once, into both names: gathering per name hung the ranks) and checkpointed once; the run equals one
    process and a resume from its sharded checkpoint ends with the same adapter."""
    shared = ["--lora.shared_gate_up_a", "true"]
    single = tmp_path / "single"
    train.main(load_config(None, FSDP + shared + ["--train.gradient_accumulation_steps", "2",
                                                  "--train.output_dir", str(single)]))
    run = tmp_path / "fsdp"
    args = [*FSDP, *shared, "--train.gradient_accumulation_steps", "1", "--train.output_dir", str(run),
            "--train.ddp_timeout", "120"]
    p = _torchrun(*args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = _adapter(single), _adapter(run)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    w1 = [k for k in b if ".experts.1.w1.lora_A" in k]
    assert w1 and all(torch.equal(b[k], b[k.replace(".w1.", ".w3.")]) for k in w1)
    shutil.rmtree(run / "checkpoints" / "step-3")
    shutil.rmtree(run / "adapter")
    p = _torchrun(*args, "--train.resume", "auto")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming from" in p.stderr
    c = _adapter(run)
    for k in a:
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-6)


def test_nf4_storage_as_parameters_counts_once_and_computes_the_same():
    """What fsdp shards: NF4Weight's packed codes / absmax / absmax2 as frozen 1-D Parameters. Counts and memory
    estimates see each NF4 weight once, by its logical shape, before and after; the output is unchanged."""
    from mixtune.lora import apply_lora
    from mixtune.lora.targets import count_params
    from mixtune.memory_plan import memory_estimate, param_counts
    from mixtune.model import MIXTRAL_8X7B_CONFIG, build_model_on_meta
    from mixtune.quant.nf4 import NF4Weight

    model = build_model_on_meta(MIXTRAL_8X7B_CONFIG, "nf4", torch.bfloat16)
    apply_lora(model, load_config(None, ["--lora.targets", "q_proj,experts"]).lora, 0, warn=False)
    before = count_params(model), memory_estimate(model), param_counts(model)
    for m in model.modules():
        if isinstance(m, NF4Weight):
            m.as_parameters()
    assert count_params(model) == before[0] and memory_estimate(model) == before[1]
    assert param_counts(model) == before[2]
    w = NF4Weight.quantize(torch.randn(64, 128))
    y = w.dequantize(torch.float32)
    w.as_parameters()
    stored = [w._parameters[n] for n in NF4Weight.SHARDABLE]  # uint8 storage is held as float16 (torch 2.11)
    assert all(p.ndim == 1 and not p.requires_grad and p.dtype.is_floating_point for p in stored)
    assert w.packed.dtype == torch.uint8 and w.absmax.dtype == torch.uint8  # readers see the bytes
    assert torch.equal(w.dequantize(torch.float32), y)


def test_memory_plan_per_gpu_under_fsdp():
    """The per-GPU estimate divides the weights and the adapter's state by the ranks under fsdp, not under ddp;
    activations stay per GPU; a budget plans per GPU."""
    from mixtune.memory_plan import GiB, Policy, estimate_bytes, plan
    from mixtune.model import MIXTRAL_8X7B_CONFIG as c

    args = (c, 24 * GiB, 900_000_000, 1, 1024, 64, "adamw", Policy(0, False, "grouped"))
    one = estimate_bytes(*args)
    assert estimate_bytes(*args, ranks=2, strategy="ddp") == one == estimate_bytes(*args, ranks=1, strategy="fsdp")
    two, eight = estimate_bytes(*args, ranks=2, strategy="fsdp"), estimate_bytes(*args, ranks=8, strategy="fsdp")
    fixed = 24 * GiB + 900_000_000 * 16
    assert eight < two < one and one - two > 0.4 * fixed  # about half of weights + adapter state is gone
    with pytest.raises(ValueError, match="per GPU"):
        plan(20 * GiB, *args[:7])
    pol, est = plan(20 * GiB, *args[:7], ranks=8, strategy="fsdp")
    assert est <= 20 * GiB and pol.full == 0


def test_adamw_8bit_under_fsdp_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """bitsandbytes' 8-bit AdamW cannot step FSDP's DTensor shards: one line at preflight, no run directory."""
    from mixtune.config import ConfigError
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, FSDP + ["--train.optim", "adamw_8bit", "--train.output_dir", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="adamw_8bit with train.distributed fsdp"):
        train.preflight(cfg)
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: plain training, any optimizer
    train.preflight(cfg)
