"""`mixtune bench` under torchrun (mixtune.bench_dist): ddp and fsdp rows on two gloo CPU ranks (--cpu-tiny),
the same code path the 2-GPU benchmark runs; and its refusals."""

import json
import os
import subprocess
import sys

import pytest

from mixtune import bench_dist


@pytest.mark.torchrun
def test_two_ranks_time_ddp_and_fsdp_on_the_same_model_and_rows():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "mixtune", "bench", "--cpu-tiny", "--layers", "2", "--steps", "1", "--warmup", "1",
                        "--settings", "mb=2,ckpt=0,dist=ddp;mb=2,ckpt=2,dist=fsdp;mb=2,ckpt=0,dist=fsdp,prec=fp8;"
                        "mb=2,dist=fsdp,backend=grouped_lowmem,actk=1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("mixtune bench on 2 ranks") == 1  # rank 0 alone prints
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["ranks"] == 2 and res["geometry"] == "tiny"
    ddp, fsdp, fp8, lowmem = res["rows"]
    assert fp8["setting"].endswith("fp8") and not fp8["error"]  # FP8 experts under fsdp (emulated on CPU)
    # the low-memory MoE backend with attention recomputation under fsdp: the same numbers as ddp's grouped
    assert "grouped_lowmem" in lowmem["setting"] and lowmem["loss"] == pytest.approx(ddp["loss"], rel=1e-4)
    assert ddp["setting"].startswith("ddp x2") and fsdp["setting"].startswith("fsdp x2, grouped, ckpt=all")
    for r in (ddp, fsdp):
        assert not r["error"] and r["tok_s"] > 0
        # tokens/s counts both ranks' rows: 2 ranks x mb 2 x 64 tokens per step
        assert r["tok_s"] == pytest.approx(2 * 2 * 64 / r["step_s"], rel=1e-6)
    # the same model, adapter and rows: the second step's loss (after one update) agrees under both strategies
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-4)
    # the planner's per-GPU estimate: fsdp holds half the layers' weights and adapter state
    assert fsdp["est_gib"] < ddp["est_gib"]


@pytest.mark.torchrun
@pytest.mark.parametrize("geometry", ["qwen3-30b-a3b", "olmoe-1b-7b", "qwen2-57b-a14b"])
def test_every_family_trains_the_same_under_ddp_and_fsdp(geometry):
    """fsdp composes with every family (Qwen3's per-head q/k norms and dense layer, OLMoE's q/k norm over the
    projection, Qwen2-MoE's shared expert and biases): on the family's tiny model the second step's loss equals
    ddp's on the same model and rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "mixtune", "bench", "--cpu-tiny", "--geometry", geometry, "--layers", "3",
                        "--steps", "1", "--warmup", "1", "--settings", "mb=2,dist=ddp;mb=2,dist=fsdp"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["model"] == bench_dist.GEOMETRIES[geometry].model_type
    ddp, fsdp = res["rows"]
    assert not ddp["error"] and not fsdp["error"]
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-4)


@pytest.mark.parametrize("argv, msg", [
    (["--stock", "mb=8,ckpt=1"], "no --stock or --full"),
    (["--settings", "mb=8,dist=zero3"], "dist must be ddp or fsdp"),
    (["--steps", "0"], "--steps >= 1"),
])
def test_refusals_under_torchrun(argv, msg, capsys):
    assert bench_dist.main(["--cpu-tiny"] + argv) == 2
    assert msg in capsys.readouterr().err
