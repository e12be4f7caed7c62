"""Checkpoints: atomic writes, half-written ones never loaded, pruning, exact restore, resume resolution; the
training state in JSON + safetensors only (no pickle runs, older .pt files load only with weights_only), the
config saved with each checkpoint, hand-edited state refused in one line, a full disk leaves nothing behind."""

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


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.json", "optimizer.safetensors",
                                  "scheduler.json", "rng.json", "rng.safetensors", "state.json"])
def test_damaged_file_in_a_complete_checkpoint_is_a_clear_error(tmp_path, name):
    model, opt, sched = _setup()
    _step(model, opt, sched)  # the optimizer has tensors to store
    path = ckpt.save_checkpoint(str(tmp_path), 2, model=model, optimizer=opt, scheduler=sched, state={})
    with open(os.path.join(path, name), "wb") as fh:
        fh.write(b"\x00damaged")
    with pytest.raises(ckpt.CheckpointError, match=f"{name} cannot be read.*--resume DIR"):
        ckpt.load_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# safe formats: nothing in a checkpoint is unpickled
# --------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates `marker`: the proof that a pickle in a checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _continue(model, opt, sched, n=2):
    for _ in range(n):
        _step(model, opt, sched)
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _restore_into_fresh(path, optim=None):
    model2, opt2, sched2 = _setup(seed=123)
    if optim is not None:
        opt2 = optim([p for p in model2.parameters() if p.requires_grad])
        sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda("cosine", 2, 10))
    return model2, opt2, sched2


def _restore(path, model2, opt2, sched2):
    state = ckpt.load_checkpoint(path)
    ckpt.load_trainable_state_dict(model2, state["trainable"])
    ckpt.restore_optimizer(opt2, state["optimizer"], os.path.join(path, "optimizer.json"))
    ckpt.restore_scheduler(sched2, state["scheduler"], os.path.join(path, "scheduler.json"))
    ckpt.restore_rng_state(state["rng"], os.path.join(path, "rng.json"))
    return state


def test_checkpoint_holds_no_pickle_and_its_state_is_json_plus_safetensors(tmp_path):
    import json
    model, opt, sched = _setup()
    _step(model, opt, sched)
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt, scheduler=sched, state={})
    names = set(os.listdir(path))
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl"))], names
    assert {"optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json", "rng.safetensors"} <= names
    doc = json.load(open(os.path.join(path, "rng.json")))
    assert doc["format"] == ckpt.STATE_FORMAT and len(doc["value"]["python"]["__tuple__"][1]["__tuple__"]) == 625


@pytest.mark.parametrize("optim", ["adamw_fused", "adamw_8bit"])
def test_fused_and_8bit_optimizer_states_roundtrip_bit_exactly(tmp_path, optim):
    """AdamW8bit's state holds uint8 moments plus qmaps (one tensor shared by every parameter) and absmax."""
    from mixtune.loop.optim import make_optimizer
    if optim == "adamw_fused":
        make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)  # noqa: E731
    else:
        make = lambda ps: make_optimizer(ps, "adamw_8bit", lr=1e-2)  # noqa: E731
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 2))  # 8192 weights: 8-bit state
    opt = make(list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10))

    def step(m, o, s):
        m(torch.randn(5, 64)).pow(2).mean().backward()
        o.step()
        s.step()
        o.zero_grad()
    for _ in range(3):
        step(model, opt, sched)
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt, scheduler=sched, state={})
    if optim == "adamw_8bit":
        saved = ckpt.load_state(path, "optimizer")
        q = saved["state"][0]["__bnb_optimizer_quant_state__"]
        assert q["state1"].dtype == torch.uint8 and {"qmap1", "absmax1", "qmap2", "absmax2"} <= set(q)
    for _ in range(2):
        step(model, opt, sched)
    want = {k: p.detach().clone() for k, p in model.named_parameters()}

    torch.manual_seed(7)
    model2 = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 2))
    opt2 = make(list(model2.parameters()))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda("cosine", 2, 10))
    _restore(path, model2, opt2, sched2)
    for _ in range(2):
        step(model2, opt2, sched2)
    for k, p in model2.named_parameters():
        assert torch.equal(p, want[k]), k


def test_state_codec_keeps_types_sharing_and_non_finite_numbers(tmp_path):
    import numpy as np
    shared = torch.arange(4.0)
    obj = {"state": {0: {"step": torch.tensor(3.0), "m": shared}, 1: {"m": shared, "x": float("nan")}},
           "groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "flag": None, "inf": float("-inf")}],
           "__odd__": 1, "np": np.arange(5, dtype=np.uint32), "t": (1, (2, None), "s")}
    ckpt.save_state(obj, str(tmp_path), "x")
    back = ckpt.load_state(str(tmp_path), "x")
    assert back["state"][0]["m"] is back["state"][1]["m"] and torch.equal(back["state"][0]["m"], shared)
    assert back["groups"][0]["betas"] == (0.9, 0.999) and back["groups"][0]["inf"] == float("-inf")
    assert back["state"][1]["x"] != back["state"][1]["x"] and back["__odd__"] == 1 and back["t"] == obj["t"]
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.save_state({"f": object()}, str(tmp_path), "y")


def _legacy(path, marker=None):
    """Turn a checkpoint into the older format: optimizer.pt / scheduler.pt / rng.pt (torch.save pickles)."""
    state = ckpt.load_checkpoint(path)
    for name in ("optimizer", "scheduler", "rng"):
        for ext in (".json", ".safetensors"):
            if os.path.exists(os.path.join(path, name + ext)):
                os.remove(os.path.join(path, name + ext))
        torch.save(state[name] if marker is None else {"x": Payload(marker)}, os.path.join(path, name + ".pt"))


def test_older_pt_checkpoint_loads_safely_and_resumes_exactly(tmp_path):
    model, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt, scheduler=sched, state={})
    _legacy(path)  # rng.pt holds numpy's state array: allowed, and nothing else is
    want = _continue(model, opt, sched)
    model2, opt2, sched2 = _restore_into_fresh(path)
    model2[1].weight.data.copy_(model[1].weight.data)
    _restore(path, model2, opt2, sched2)
    got = _continue(model2, opt2, sched2)
    assert all(torch.equal(got[k], want[k]) for k in want)


STATE_FILES = ["optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json", "rng.safetensors",
               "state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"]


@pytest.mark.parametrize("name", STATE_FILES)
def test_a_pickle_payload_in_any_state_file_never_runs(tmp_path, name):
    import pickle
    model, opt, sched = _setup()
    _step(model, opt, sched)
    path = ckpt.save_checkpoint(str(tmp_path / "run"), 1, model=model, optimizer=opt, scheduler=sched, state={})
    marker = tmp_path / "PWNED"
    if name.endswith(".pt"):  # an older checkpoint: the .json is gone, the .pt is a crafted torch.save pickle
        stem = name[:-3]
        for ext in (".json", ".safetensors"):
            if os.path.exists(os.path.join(path, stem + ext)):
                os.remove(os.path.join(path, stem + ext))
        torch.save({"state": Payload(marker)}, os.path.join(path, name))
    else:
        with open(os.path.join(path, name), "wb") as fh:
            pickle.dump(Payload(marker), fh)
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    assert name in str(e.value) and "\n" not in str(e.value)
    if name.endswith(".pt"):
        assert "could run code" in str(e.value)
    # the payload is never unpickled as a side effect either (a planted .pt next to a good .json is ignored)
    _legacy_marker = tmp_path / "PWNED2"
    p2 = ckpt.save_checkpoint(str(tmp_path / "run2"), 1, model=model, optimizer=opt, scheduler=sched, state={})
    torch.save({"x": Payload(_legacy_marker)}, os.path.join(p2, "optimizer.pt"))
    ckpt.load_checkpoint(p2)
    assert not _legacy_marker.exists()


@pytest.mark.parametrize("edit", ["rng-python", "rng-torch", "state-step", "state-list", "state-no-epoch",
                                  "optimizer-groups", "optimizer-moment-shape", "scheduler-keys", "deep-json"])
def test_hand_edited_state_is_a_one_line_error(tmp_path, edit):
    import json
    model, opt, sched = _setup()
    _step(model, opt, sched)
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt, scheduler=sched,
                                state={"epoch": 0, "batches_in_epoch": 1})

    def edit_json(name, fn):
        f = os.path.join(path, name)
        doc = json.load(open(f))
        fn(doc)
        json.dump(doc, open(f, "w"))
    if edit == "rng-python":
        edit_json("rng.json", lambda d: d["value"]["python"]["__tuple__"][1]["__tuple__"].pop())
    elif edit == "rng-torch":
        from safetensors.torch import load_file, save_file
        f = os.path.join(path, "rng.safetensors")
        save_file({k: v[:10] for k, v in load_file(f).items()}, f)
    elif edit == "state-step":
        edit_json("state.json", lambda d: d.update(step="three"))
    elif edit == "state-list":
        open(os.path.join(path, "state.json"), "w").write("[1, 2]")
    elif edit == "state-no-epoch":
        edit_json("state.json", lambda d: d.pop("epoch"))
    elif edit == "optimizer-groups":
        edit_json("optimizer.json", lambda d: d["value"]["param_groups"][0].update(lr="fast"))
    elif edit == "optimizer-moment-shape":
        from safetensors.torch import load_file, save_file
        f = os.path.join(path, "optimizer.safetensors")
        save_file({k: (v[:1] if v.dim() else v) for k, v in load_file(f).items()}, f)
    elif edit == "scheduler-keys":
        edit_json("scheduler.json", lambda d: d["value"].update(optimizer=1))
    elif edit == "deep-json":
        open(os.path.join(path, "optimizer.json"), "w").write('{"format": "mixtune-state/1", "value": '
                                                               + "[" * 100000 + "]" * 100000 + "}")
    model2, opt2, sched2 = _setup(seed=3)
    with pytest.raises(ckpt.CheckpointError) as e:
        st = _restore(path, model2, opt2, sched2)
        ckpt.training_position(st)
    assert "\n" not in str(e.value) and path in str(e.value), str(e.value)


def test_disk_full_while_saving_leaves_the_earlier_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    import errno
    from safetensors import SafetensorError
    model, opt, sched = _setup()
    out = str(tmp_path)
    ckpt.save_checkpoint(out, 2, model=model, optimizer=opt, scheduler=sched, state={})
    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        def full(*a, **k):
            raise exc
        monkeypatch.setattr("safetensors.torch.save_file", full)
        with pytest.raises(OSError) as e:
            ckpt.save_checkpoint(out, 4, model=model, optimizer=opt, scheduler=sched, state={})
        assert e.value.errno == errno.ENOSPC and e.value.filename.endswith(os.path.join("checkpoints", "step-4"))
        assert os.listdir(tmp_path / "checkpoints") == ["step-2"]
        assert ckpt.find_latest_checkpoint(out).endswith("step-2") and ckpt.load_checkpoint(
            ckpt.find_latest_checkpoint(out))


def test_resume_checks_the_config_saved_with_the_checkpoint_wherever_it_is(tmp_path):
    import shutil
    from mixtune.config import ConfigError, load_config
    cfg = load_config(None, ["--train.output_dir", str(tmp_path / "run"), "--train.learning_rate", "0.002"])
    model, opt, sched = _setup()
    path = ckpt.save_checkpoint(str(tmp_path / "run"), 2, model=model, optimizer=opt, scheduler=sched, state={},
                                config=cfg)
    assert os.path.isfile(os.path.join(path, "config.yaml"))
    elsewhere = str(tmp_path / "shared" / "step-2")
    shutil.copytree(path, elsewhere)  # outside any run dir, and no run config.yaml beside it
    changed = load_config(None, ["--train.output_dir", str(tmp_path / "new"), "--train.learning_rate", "0.1"])
    for where in (path, elsewhere):
        with pytest.raises(ConfigError, match=r"train.learning_rate 0.002 -> 0.1"):
            ckpt.check_resume_config(changed, where)
        ckpt.check_resume_config(load_config(None, ["--train.output_dir", "x", "--train.learning_rate", "0.002"]),
                                 where)
    os.remove(os.path.join(elsewhere, "config.yaml"))  # an older checkpoint, out of its run dir: cannot check
    with pytest.raises(ckpt.CheckpointError, match="no config.yaml"):
        ckpt.check_resume_config(changed, elsewhere)


def test_a_yaml_payload_in_the_checkpoint_config_never_runs(tmp_path):
    from mixtune.config import load_config
    model, opt, sched = _setup()
    path = ckpt.save_checkpoint(str(tmp_path / "run"), 2, model=model, optimizer=opt, scheduler=sched, state={})
    marker = tmp_path / "PWNED"
    with open(os.path.join(path, "config.yaml"), "w") as fh:
        fh.write(f"train: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ValueError):
        ckpt.check_resume_config(load_config(None, []), path)
    assert not marker.exists()
