"""Data-parallel training under torchrun (CPU, gloo): 2 ranks with accumulation 1 make the same updates as one
process with accumulation 2 over the same micro-batch stream; rank 0 alone writes; evaluation covers every row."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mixtune import train
from mixtune.config import load_config
from mixtune.loop.report import read_metrics
from mixtune.distributed import Dist, step_generator_seed, world_from_env

COMMON = ["--train.max_steps", "3", "--train.save_steps", "2", "--train.eval_steps", "2",
          "--train.generate_after", "0", "--train.tensorboard", "false", "--train.progress", "false",
          "--train.logging_steps", "1", "--data.max_seq_length", "128", "--train.per_device_train_batch_size", "2",
          "--lora.dropout", "0.0", "--lora.r", "4", "--train.router_aux_loss_coef", "0.01"]


@pytest.mark.torchrun
def test_two_ranks_equal_one_process_with_twice_the_accumulation(tmp_path):
    single = tmp_path / "single"
    res = train.main(load_config(None, COMMON + ["--train.gradient_accumulation_steps", "2",
                                                 "--train.output_dir", str(single)]))
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "mixtune", "train", *COMMON, "--train.gradient_accumulation_steps", "1",
                        "--train.output_dir", str(ddp)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x 2 ranks" in p.stderr and p.stderr.count("mixtune: done in") == 1  # rank 0 alone speaks

    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    m1, m2 = read_metrics(os.path.join(single, "metrics.jsonl")), read_metrics(os.path.join(ddp, "metrics.jsonl"))
    assert [r["step"] for r in m2 if r["kind"] == "train"] == [1, 2, 3]  # one writer, no duplicates
    for r1, r2 in zip(m1, m2):
        assert r1["kind"] == r2["kind"] and r1["step"] == r2["step"]
        key = "loss" if r1["kind"] == "train" else "eval_loss"
        assert r2[key] == pytest.approx(r1[key], rel=1e-5)
        if r1["kind"] == "train":  # summed, not averaged, gradients (Adam alone would hide a mean)
            assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
        if r1["kind"] == "eval":
            assert r2["eval_tokens"] == r1["eval_tokens"]  # the sharded evaluation saw every row
    assert res["steps"] == 3 and os.path.exists(ddp / "checkpoints" / "step-2" / "COMPLETE")

    # resume under torchrun: drop the last checkpoint and the adapter, continue from step 2 on both ranks
    import shutil
    shutil.rmtree(ddp / "checkpoints" / "step-3")
    shutil.rmtree(ddp / "adapter")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "mixtune", "train", *COMMON, "--train.gradient_accumulation_steps", "1",
                        "--train.output_dir", str(ddp), "--train.resume", "auto"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming from" in p.stderr and "step 2/3" in p.stderr
    c = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-6)
    assert [r["step"] for r in read_metrics(os.path.join(ddp, "metrics.jsonl")) if r["kind"] == "train"] == [1, 2, 3]

    # the same checkpoint resumed by a single process would change the step's batch: refused, clearly
    from mixtune.loop.checkpoint import CheckpointError
    shutil.rmtree(ddp / "checkpoints" / "step-3")
    with pytest.raises(CheckpointError, match="trained on 2 rank"):
        train.main(load_config(None, COMMON + ["--train.gradient_accumulation_steps", "1", "--train.output_dir",
                                               str(ddp), "--train.resume", "auto"]))


def test_single_process_helpers():
    assert world_from_env() == (1, 0, 0) or "WORLD_SIZE" in os.environ
    d = Dist()
    assert not d.enabled and d.is_main and d.sum(1.5, 2) == [1.5, 2]
    with d.main_first():
        pass
    assert len({step_generator_seed(7, s, r) for s in range(4) for r in range(3)}) == 12


FAILING_RANK = '''
import os, sys
from mixtune import cli, train
main = train.main

def failing_main(cfg, **kw):
    def on_step(step):
        if os.environ["RANK"] == "1" and step == 2:
            raise OSError("the disk under rank 1 went away (injected)")
    kw["on_step"] = on_step
    return main(cfg, **kw)

train.main = failing_main
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.torchrun
def test_a_failing_rank_takes_the_job_down_with_its_one_line_error(tmp_path):
    """Rank 1 fails after its second step (of 3): the job ends (no rank left waiting at a collective) with a non-zero
    code, and rank 1's error is one line that names the rank."""
    import time
    script = tmp_path / "fail_rank1.py"
    script.write_text(FAILING_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), "train", *COMMON, "--train.ddp_timeout", "120",
                        "--train.output_dir", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 300  # not the collective timeout, let alone a hang
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("mixtune: error (rank 1 of 2): ")]
    assert len(err) == 1 and "the disk under rank 1 went away (injected)" in err[0], p.stderr[-3000:]
    assert "mixtune: done in" not in p.stderr
