"""Suite-wide fixtures: a tiny random Mixtral checkpoint in the real layout, and stock transformers loading.

    def test_x(tiny_ckpt, tiny_config, hf_model_from): ...

`tiny_ckpt` is a directory written once per session by `make_tiny_checkpoint` (config.json, two safetensors
shards + model.safetensors.index.json, the v1 tokenizer files; bf16 weights). Treat it as read-only: copy it
(`shutil.copytree`) before changing anything. $MIXTUNE_CACHE points into a session temp dir, so the embedded
tiny default ("" as the model) is built there, never in the user's ~/.cache.
"""

from __future__ import annotations

import os

import pytest
import torch

# No GPU in CI: Triton kernels run under Triton's CPU interpreter (tests/kernels/test_dequant_triton.py). The
# switch must be set before anything imports triton, so set it here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_mixtune_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MIXTUNE_CACHE", str(tmp_path_factory.mktemp("mixtune-cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_config():
    """The MixtralConfig of `tiny_ckpt` (= mixtune.model.TINY_CONFIG)."""
    from mixtune.model import TINY_CONFIG

    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config) -> str:
    """Path of a tiny random Mixtral (seed 0) in the real HF layout: 2 shards + index + tokenizer."""
    from mixtune.model.tiny import make_tiny_checkpoint

    path = str(tmp_path_factory.mktemp("tiny-ckpt"))
    make_tiny_checkpoint(path, tiny_config, seed=0, shards=2, dtype=torch.bfloat16, tokenizer=True)
    return path


def hf_model_from(ckpt: str, dtype: torch.dtype = torch.float32):
    """Stock transformers' MixtralForCausalLM loaded from `ckpt` on CPU in eval mode (the reference)."""
    import transformers
    from transformers import MixtralForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass
    model = MixtralForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="session", name="hf_model_from")
def _hf_model_from_fixture():
    """The `hf_model_from(ckpt, dtype=torch.float32)` helper as a fixture (tests can't import conftest)."""
    return hf_model_from


def randomize_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Give every LoRA B (linears and expert stacks) N(0, std²) values from one seeded stream, so an adapter has
    an effect (B starts at zero)."""
    from mixtune.lora import ExpertLoRA, LoRALinear
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * std)
            elif isinstance(mod, ExpertLoRA):
                for b in mod.B.values():
                    b.copy_(torch.randn(b.shape, generator=g) * std)


@pytest.fixture(scope="session", name="randomize_b")
def _randomize_b_fixture():
    """`randomize_lora_b(model, seed=1, std=0.05)` as a fixture (tests can't import conftest)."""
    return randomize_lora_b


def _can_run_torchrun() -> bool:
    """gloo is built in and loopback TCP works (torchrun's rendezvous): otherwise a 2-rank test cannot run here."""
    import socket
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
            sk.bind(("127.0.0.1", 0))
    except OSError:
        return False
    return True


def pytest_configure(config):
    config.addinivalue_line("markers", "torchrun: launches ranks with torchrun (gloo on loopback); skipped where "
                                       "that cannot run")


def pytest_collection_modifyitems(config, items):
    if _can_run_torchrun():
        return
    skip = pytest.mark.skip(reason="no gloo backend or no loopback TCP for torchrun here")
    for item in items:
        if "torchrun" in item.keywords:
            item.add_marker(skip)
