"""The Triton kernels compile for the GPU (sm_90, Hopper) without one: Triton's front end and its bundled ptxas run
offline, so typing errors the CPU interpreter lets through (it runs the kernels as Python) are caught here, before
a GPU machine is asked for. The compilation runs in a subprocess because the interpreter, once on in this process
(conftest), replaces every kernel with its interpreted form."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixtune.kernels import _tl
from mixtune.kernels.swiglu import _kernels as swiglu_kernels
from mixtune.kernels.route import _kernels as route_kernels

def compile_one(fn, types, const):
    sig = {n: ("constexpr" if n in const else types.get(n, "i64")) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))

dq = {"words_ptr": "*i32", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "code_ptr": "*fp32",
      "offset_ptr": "*fp32", "out_ptr": "*bf16", "inv_ptr": "*fp32", "x_ptr": "*fp32", "x_scale": "fp32"}
cases = []
for words in (False, True):
    for extra, has_x, fp8 in ((False, False, False), (True, True, False), (True, False, False), (False, False, True)):
        types = dict(dq, out_ptr="*fp8e4nv" if fp8 else "*bf16")
        cases.append((f"nf4_dequant words={words} extra={extra} x={has_x} fp8={fp8}", _tl.nf4_dequant_kernel, types,
                      dict(R=32, FP8=fp8, SOFT_ROUND=False, EXTRA=extra, HAS_X=has_x, XBP=32, XBQ=64, WORDS=words)))
fwd, bwd = swiglu_kernels()
sw = {"h_ptr": "*bf16", "dg_ptr": "*bf16", "dh_ptr": "*bf16", "g_ptr": "*bf16", "w_ptr": "*fp32", "dot_ptr": "*fp32"}
for write_g, scale, dot in ((False, False, False), (True, True, True), (True, False, False)):
    cases.append((f"swiglu bwd g={write_g} scale={scale} dot={dot}", bwd, sw,
                  dict(WRITE_G=write_g, SCALE=scale, DOT=dot, BLOCK=1024)))
cases.append(("swiglu fwd", fwd, {"h_ptr": "*bf16", "g_ptr": "*bf16"}, dict(BLOCK=1024)))
gather, combine = route_kernels()
cases.append(("gather", gather, {"x_ptr": "*bf16", "idx_ptr": "*i64", "out_ptr": "*bf16"}, dict(BLOCK=1024)))
cases.append(("combine", combine, {"y_ptr": "*bf16", "inv_ptr": "*i64", "w_ptr": "*bf16", "out_ptr": "*bf16"},
              dict(K=8, HAS_W=True, BLOCK=1024)))
from mixtune.kernels.gather_mm import _kernels as gmm_kernels
glr, glw = gmm_kernels()
gl = {"x_ptr": "*bf16", "tok_ptr": "*i64", "offs_ptr": "*i32", "tstart_ptr": "*i32", "xs_ptr": "*bf16",
      "u_ptr": "*bf16", "u2_ptr": "*bf16", "scale": "fp32"}
for wt, store_x, two in (("*fp32", True, True), ("*bf16", False, False)):
    cases.append((f"gather_lowrank w={wt} x={store_x} u2={two}", glr, dict(gl, w_ptr=wt),
                  dict(EP=128, BM=128, BK=64, BR=64, STORE_X=store_x, HAS_U2=two, IEEE=False)))
cases.append(("gather_lowrank_wgrad", glw, {"d_ptr": "*bf16", "x_ptr": "*bf16", "tok_ptr": "*i64", "offs_ptr": "*i32",
                                            "out_ptr": "*fp32"}, dict(BM=64, BR=64, BH=128, IEEE=False)))
failed = {}
for name, fn, types, const in cases:
    try:
        compile_one(fn, types, const)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {str(e)[:400]}"
print(json.dumps({"n": len(cases), "failed": failed}))
"""


def test_triton_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 and "GPUTarget" in out.stderr and "ImportError" in out.stderr:
        pytest.skip("this Triton has no offline compiler API")
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] >= 8
    assert not res["failed"], res["failed"]
