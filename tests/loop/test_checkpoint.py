"""Checkpoints: atomic writes, half-written ones never loaded, pruning, exact restore, resume resolution."""

import os
import random

import pytest
import torch

from mixtune.loop import checkpoint as ckpt
from mixtune.loop.schedule import lr_lambda


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)  # a frozen "base" weight is not part of the checkpoint
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10))
    return model, opt, sched


def _step(model, opt, sched):
    x = torch.randn(5, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_save_load_roundtrip_restores_training_exactly(tmp_path):
    model, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt, scheduler=sched,
                                state={"epoch": 0, "batches_in_epoch": 3})
    assert os.path.basename(path) == "step-3" and ckpt.is_complete(path)
    assert "1.weight" not in ckpt.load_checkpoint(path)["trainable"]  # frozen weights are not saved
    # continue the original for 2 steps (uses the global RNG for data)
    for _ in range(2):
        _step(model, opt, sched)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, opt2, sched2 = _setup(seed=123)  # different init, RNG elsewhere
    model2[1].weight.data.copy_(model[1].weight.data)  # same frozen base
    state = ckpt.load_checkpoint(path)
    ckpt.load_trainable_state_dict(model2, state["trainable"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    ckpt.restore_rng_state(state["rng"])
    assert state["state"]["step"] == 3 and state["state"]["batches_in_epoch"] == 3
    for _ in range(2):
        _step(model2, opt2, sched2)
    for n, p in model2.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=0, atol=0)


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    model, opt, sched = _setup()
    out = str(tmp_path)
    ckpt.save_checkpoint(out, 2, model=model, optimizer=opt, scheduler=sched, state={})
    # a later checkpoint interrupted while being written: the directory exists, the marker does not
    half = tmp_path / "checkpoints" / "step-4"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"garbage")
    (tmp_path / "checkpoints" / ".tmp-step-6-99999").mkdir()  # a temp dir of a killed writer
    assert ckpt.find_latest_checkpoint(out).endswith("step-2")
    assert ckpt.resolve_resume(out, "auto").endswith("step-2")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(str(half))
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_resume(out, str(half))
    assert [os.path.basename(p) for p in ckpt.remove_stale_temporaries(out)] == [".tmp-step-6-99999"]


def test_fresh_run_refuses_dir_with_checkpoints_and_resume_resolution(tmp_path):
    out = str(tmp_path)
    assert ckpt.resolve_resume(out, "") is None  # empty dir: fresh run ok
    assert ckpt.resolve_resume(out, "auto") is None  # nothing to resume: start fresh
    model, opt, sched = _setup()
    ckpt.save_checkpoint(out, 1, model=model, optimizer=opt, scheduler=sched, state={})
    with pytest.raises(ckpt.CheckpointError, match="--resume"):
        ckpt.resolve_resume(out, "")
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_resume(out, str(tmp_path / "nope"))
    # --resume RUN_DIR (not a checkpoint): say so and name the way to resume it, not "interrupted while written"
    with pytest.raises(ckpt.CheckpointError, match="is a run directory, not a checkpoint.*step-1"):
        ckpt.resolve_resume(out, out)


def test_keeps_last_k(tmp_path):
    model, opt, sched = _setup()
    out = str(tmp_path)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(out, step, model=model, optimizer=opt, scheduler=sched, state={}, total_limit=2)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 4]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]


def test_mismatched_adapter_is_refused(tmp_path):
    model, opt, sched = _setup()
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt, scheduler=sched, state={})
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    with pytest.raises(ckpt.CheckpointError, match="lora settings"):
        ckpt.load_trainable_state_dict(other, ckpt.load_checkpoint(path)["trainable"])


def test_rng_state_roundtrip():
    random.seed(1)
    torch.manual_seed(1)
    s = ckpt.capture_rng_state()
    a = (random.random(), torch.rand(3))
    ckpt.restore_rng_state(s)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_schedule_shapes():
    f = lr_lambda("cosine", 2, 10)
    assert f(0) < f(1) < 1.0 and f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)
    g = lr_lambda("linear", 0, 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 3, 10)(9) == 1.0


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_damaged_file_in_a_complete_checkpoint_is_a_clear_error(tmp_path, name):
    model, opt, sched = _setup()
    path = ckpt.save_checkpoint(str(tmp_path), 2, model=model, optimizer=opt, scheduler=sched, state={})
    with open(os.path.join(path, name), "wb") as fh:
        fh.write(b"\x00damaged")
    with pytest.raises(ckpt.CheckpointError, match=f"{name} cannot be read.*--resume DIR"):
        ckpt.load_checkpoint(path)
