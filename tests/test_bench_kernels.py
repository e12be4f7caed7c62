"""bench_kernels.sweep_gather_mm end to end on CPU (Triton's interpreter, fp32, a tiny geometry): every tile
runs, the fused results are checked against the unfused path, the fastest tile is kept in gather_mm.CONFIG."""

import dataclasses
import os
import sys

import pytest
import torch

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton was imported before the interpreter could be enabled", allow_module_level=True)


def test_sweep_gather_mm_checks_and_keeps_the_fastest_tile(monkeypatch):
    from mixtune.bench_kernels import sweep_gather_mm
    from mixtune.kernels import _triton, gather_mm
    from mixtune.model.config import GEOMETRIES
    monkeypatch.setattr(_triton, "FORCE", True)
    monkeypatch.setattr(gather_mm, "CONFIG", dict(gather_mm.CONFIG))
    cfg = dataclasses.replace(GEOMETRIES["qwen3-30b-a3b"], hidden_size=64, num_local_experts=4, num_experts_per_tok=2)
    calls = []

    def timer(fn):  # a fake clock: each call "takes" its index, so the first tile of each sweep wins
        fn()
        calls.append(1)
        return float(len(calls))

    res = sweep_gather_mm(cfg, "cpu", timer, tokens=40, r=16, dtype=torch.float32)
    assert res["ok"], res
    assert res["gather_equal"] and res["u_rel"] < 1e-5 and res["wgrad_rel"] < 1e-5
    assert set(res["kinds_rel"]) == {"A13_2r", "A13_2r_float32", "B2t_r", "wgrad_2r"} and max(res["kinds_rel"].values()) < 1e-5
    assert len(res["fused_ms"]) == 5 and len(res["fused_wgrad_ms"]) == 5
    assert res["config"] == dict(BM=64, BK=64, warps=4, BMW=32, BH=128, warps_w=4)
    assert gather_mm.CONFIG["BM"] == 64 and gather_mm.CONFIG["on"]
