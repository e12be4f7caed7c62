"""Trust in what a run leaves on disk, end to end through `mixtune.cli.main`: a pickle planted in a checkpoint
never runs (in place with --resume auto, and as --resume PATH outside the run); an older .pt checkpoint loads
safely and resumes exactly; one writer per output dir (two real processes: the second is refused before
writing, the first finishes intact; a dead holder's lock is taken over); a full disk is one line and a later
resume is exact; bad output dirs, damaged files, merge into its own base, stale temporaries and symlinked run
files are handled in one line each."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from mixtune import cli, runlock
from mixtune.loop import checkpoint as ckpt
from mixtune.loop.report import read_metrics

ARGS = ["--train.max_steps", "6", "--train.save_steps", "2", "--train.eval_steps", "0",
        "--train.generate_after", "0", "--train.tensorboard", "false", "--train.progress", "false",
        "--train.logging_steps", "1", "--data.max_seq_length", "128", "--train.per_device_train_batch_size", "2",
        "--train.gradient_accumulation_steps", "2", "--lora.dropout", "0.1", "--lora.r", "4",
        "--train.save_total_limit", "3"]


class Payload:
    """Unpickling this creates `marker`: the proof that a pickle in a checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err):
    lines = [ln for ln in err.splitlines() if ln.startswith("mixtune: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _adapter(run_dir):
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def _same_adapter(a_dir, b_dir):
    a, b = _adapter(a_dir), _adapter(b_dir)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _snapshot(d):
    """{relative path: sha256 of its bytes} of every file under d."""
    import hashlib
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 6-step run (checkpoints at steps 2, 4, 6): what every resume must reproduce."""
    out = str(tmp_path_factory.mktemp("trust") / "reference")
    assert cli.main(["train", *ARGS, "--output_dir", out]) == 0
    return out


# --------------------------------------------------------------------------------------------------
# 1. no code runs from a checkpoint
# --------------------------------------------------------------------------------------------------


def _poison(path, how, marker):
    if how == "legacy-pickles":  # an "older" checkpoint whose .pt files are crafted pickles
        for name in ("optimizer", "scheduler", "rng"):
            for ext in (".json", ".safetensors"):
                if os.path.exists(os.path.join(path, name + ext)):
                    os.remove(os.path.join(path, name + ext))
            torch.save({"state": Payload(marker)}, os.path.join(path, name + ".pt"))
    elif how == "pickles-in-new-files":
        import pickle
        for name in ("optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json", "rng.safetensors"):
            with open(os.path.join(path, name), "wb") as fh:
                pickle.dump(Payload(marker), fh)
    elif how == "damaged-state-json":
        with open(os.path.join(path, "state.json"), "w") as fh:
            fh.write('{"step": 4, "epoch": "zero"')
    elif how == "damaged-rng":
        doc = json.load(open(os.path.join(path, "rng.json")))
        doc["value"]["python"] = "not a random state"
        json.dump(doc, open(os.path.join(path, "rng.json"), "w"))


@pytest.mark.parametrize("mode, how", [("auto", "legacy-pickles"), ("path", "pickles-in-new-files"),
                                       ("path", "damaged-state-json"), ("auto", "damaged-rng")])
def test_a_planted_pickle_never_runs_on_resume(reference, tmp_path, capsys, mode, how):
    run = str(tmp_path / "run")
    shutil.copytree(reference, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "step-6"))  # so --resume auto picks step-4
    step4 = os.path.join(run, "checkpoints", "step-4")
    if mode == "path":  # the checkpoint was shared: it lives outside any run dir, its run config is gone
        shared = str(tmp_path / "downloads" / "step-4")
        shutil.copytree(step4, shared)
        os.remove(os.path.join(run, "config.yaml"))
        step4, resume, out = shared, shared, str(tmp_path / "new-run")
    else:
        resume, out = "auto", run
    marker = tmp_path / "PWNED"
    _poison(step4, how, marker)
    before = _snapshot(run)
    rc, _, err = _cli(capsys, "train", *ARGS, "--output_dir", out, "--resume", resume)
    line = _one_line_error(rc, err)
    assert not marker.exists()
    assert step4 in line and ("could run code" in line or "cannot be read" in line or "random state" in line), line
    assert _snapshot(run) == before  # the refused resume rewrote nothing of the run


def test_an_older_pt_checkpoint_resumes_exactly_from_anywhere(reference, tmp_path, capsys):
    """optimizer.pt / scheduler.pt / rng.pt of an older mixtune load with weights_only=True (tensors, plain
    containers, numpy's RNG array); resumed as --resume PATH outside its run, the result is bit-identical."""
    shared = str(tmp_path / "downloads" / "step-4")
    shutil.copytree(os.path.join(reference, "checkpoints", "step-4"), shared)
    state = ckpt.load_checkpoint(shared)
    for name in ("optimizer", "scheduler", "rng"):
        for ext in (".json", ".safetensors"):
            if os.path.exists(os.path.join(shared, name + ext)):
                os.remove(os.path.join(shared, name + ext))
        torch.save(state[name], os.path.join(shared, name + ".pt"))
    out = str(tmp_path / "continued")
    rc, _, err = _cli(capsys, "train", *ARGS, "--output_dir", out, "--resume", shared)
    assert rc == 0, err[-3000:]
    _same_adapter(reference, out)
    # the config saved with the checkpoint is checked even there: another learning rate is refused
    rc, _, err = _cli(capsys, "train", *ARGS, "--output_dir", str(tmp_path / "other"), "--resume", shared,
                      "--train.learning_rate", "0.5")
    assert "train.learning_rate 0.002 -> 0.5" in _one_line_error(rc, err)


# --------------------------------------------------------------------------------------------------
# 2. one writer per run directory
# --------------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import os, sys, time
    from mixtune import train
    from mixtune.config import load_config
    out, ready, go = sys.argv[1:4]
    def hold(step):
        if step == 2:  # checkpoint 2 is written: tell the test, then wait for its go
            open(ready, "w").close()
            t0 = time.time()
            while not os.path.exists(go) and time.time() - t0 < 300:
                time.sleep(0.05)
    train.main(load_config(None, sys.argv[4:] + ["--train.output_dir", out]), on_step=hold)
""")


def test_two_concurrent_runs_the_second_is_refused_the_first_finishes_intact(reference, tmp_path, capsys):
    out, ready, go = str(tmp_path / "run"), str(tmp_path / "ready"), str(tmp_path / "go")
    first = subprocess.Popen([sys.executable, "-c", HOLDER, out, ready, go, *ARGS], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        import time
        t0 = time.time()
        while not os.path.exists(ready) and first.poll() is None and time.time() - t0 < 300:
            time.sleep(0.1)
        assert os.path.exists(ready), first.communicate()[1][-3000:]
        before = _snapshot(out)
        # the second writer: a resume of the same dir would have mixed both runs' records
        for extra in (["--resume", "auto"], []):
            rc, _, err = _cli(capsys, "train", *ARGS, "--output_dir", out, "--train.learning_rate", "0.5", *extra)
            line = _one_line_error(rc, err)
            assert f"in use by another mixtune run (pid {first.pid} on host " in line and "started" in line, line
        assert _snapshot(out) == before  # refused before writing anything
    finally:
        open(go, "w").close()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert "learning_rate: 0.002" in open(os.path.join(out, "config.yaml")).read()
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"] == \
        [1, 2, 3, 4, 5, 6]
    assert ckpt.find_latest_checkpoint(out).endswith("step-6") and not os.path.exists(
        os.path.join(out, runlock.LOCK_NAME))
    _same_adapter(reference, out)


def test_the_lock_is_per_open_file_and_a_dead_holders_lock_is_taken_over(tmp_path):
    d = str(tmp_path / "d")
    held = runlock.acquire(d)
    with pytest.raises(runlock.RunDirBusy, match=f"pid {os.getpid()} on host "):
        runlock.acquire(d)  # even from this process: flock belongs to the open file
    held.release()
    said = []
    with runlock.acquire(d, said.append) as again:
        assert again.held and not said
    assert not os.path.exists(d)  # a refused start leaves no directory it created
    os.makedirs(d)
    with runlock.acquire(d):
        pass
    assert os.path.isdir(d) and not os.listdir(d)  # nor a lock file in one it did not create
    # a run killed with -9 leaves its lock file, but the kernel dropped its flock: taken over, and said
    with open(os.path.join(d, runlock.LOCK_NAME), "w") as fh:
        json.dump({"pid": 4999999, "host": "gone-host", "started": 0}, fh)
    with runlock.acquire(d, said.append):
        assert len(said) == 1 and "took over the stale lock" in said[0] and "pid 4999999 on host gone-host" in said[0]


# --------------------------------------------------------------------------------------------------
# 3. system failures on user paths: one line naming the path and the cause
# --------------------------------------------------------------------------------------------------


def test_disk_full_is_one_line_and_a_later_resume_is_exact(reference, tmp_path, capsys, monkeypatch):
    import safetensors.torch as st
    real = st.save_file

    def full_at_step_4(tensors, filename, *a, **k):
        if "step-4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **k)
    monkeypatch.setattr(st, "save_file", full_at_step_4)
    out = str(tmp_path / "run")
    rc, _, err = _cli(capsys, "train", *ARGS, "--output_dir", out)
    line = _one_line_error(rc, err)
    assert "no space left on device (disk full)" in line and "--resume" in line, line
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".tmp")]
    assert ckpt.find_latest_checkpoint(out).endswith("step-2")
    monkeypatch.setattr(st, "save_file", real)
    # had the run been killed instead, it would have left its lock file and a half-written temporary:
    # the next start takes the lock over and removes the temporary, and says both
    tmp = os.path.join(out, "checkpoints", ".tmp-step-4-12345")
    os.makedirs(tmp)
    with open(os.path.join(out, runlock.LOCK_NAME), "w") as fh:
        json.dump({"pid": 4999999, "host": "gone-host", "started": 0}, fh)
    rc, _, err = _cli(capsys, "train", *ARGS, "--output_dir", out, "--resume")
    assert rc == 0, err[-3000:]
    assert "took over the stale lock" in err and f"removed {tmp}" in err and not os.path.exists(tmp)
    _same_adapter(reference, out)
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"] == \
        [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("case", ["file", "devnull", "read-only", "permission", "empty"])
def test_an_unusable_output_dir_is_one_line(tmp_path, capsys, monkeypatch, case):
    out = str(tmp_path / "out")
    if case == "file":
        open(out, "w").write("notes")
    elif case == "devnull":
        out = os.devnull
    elif case == "empty":
        out = ""
    else:
        code = errno.EROFS if case == "read-only" else errno.EACCES
        os.makedirs(out)

        def refuse(path, flags):
            raise OSError(code, os.strerror(code), path)
        monkeypatch.setattr(runlock, "_open_no_follow", refuse)  # as root, chmod would not stop us
    rc, _, err = _cli(capsys, "train", *ARGS, "--output_dir", out)
    line = _one_line_error(rc, err)
    want = {"file": "is not a directory", "devnull": "is not a directory", "empty": "empty",
            "read-only": "Read-only file system", "permission": "Permission denied"}[case]
    assert want in line and (out in line or not out), line
    if case == "file":
        assert open(out).read() == "notes"


def test_os_errors_and_rust_write_errors_name_path_and_cause():
    from mixtune._fs import writing
    from safetensors import SafetensorError
    with pytest.raises(OSError) as e:
        with writing("/runs/x/adapter"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/runs/x/adapter"
    assert cli._os_line(e.value) == "/runs/x/adapter: no space left on device (disk full)"
    assert cli._os_line(OSError(errno.EROFS, "Read-only file system", "/ro/run")) == "/ro/run: read-only file system"
    assert cli._os_line(PermissionError(errno.EACCES, "Permission denied", "/p")) == "/p: permission denied"


def test_damaged_adapter_bin_and_model_config_json_are_one_line(reference, tmp_path, capsys, tiny_ckpt):
    ad = tmp_path / "adapter"
    shutil.copytree(os.path.join(reference, "adapter"), ad)
    os.remove(ad / "adapter_model.safetensors")
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, ad / "adapter_model.bin")
    rc, _, err = _cli(capsys, "merge", "--adapter", str(ad), "--out", str(tmp_path / "merged"))
    assert "adapter_model.bin" in _one_line_error(rc, err) and not marker.exists()
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    (model / "config.json").write_text('{"hidden_size": 64,')
    rc, _, err = _cli(capsys, "inspect", "--model", str(model))
    assert "config.json" in _one_line_error(rc, err)


# --------------------------------------------------------------------------------------------------
# 4. merge never writes into its base; stale temporaries; symlinked run files
# --------------------------------------------------------------------------------------------------


def test_merge_never_writes_into_the_dir_it_reads_its_base_from(reference, tmp_path, capsys):
    from mixtune.model import resolve_model_path
    base = str(tmp_path / "base")
    shutil.copytree(resolve_model_path(""), base)
    adapter = os.path.join(reference, "adapter")
    merged = str(tmp_path / "merged")
    stale = tmp_path / ".merge-tmp-deadbeef"  # left by a merge that was killed
    stale.mkdir()
    live = tmp_path / ".merge-tmp-live"  # a merge running now holds a flock on its temporary
    live.mkdir()
    fd = runlock.try_lock_dir(str(live))
    try:
        rc, _, err = _cli(capsys, "merge", "--adapter", adapter, "--model", base, "--out", merged)
        assert rc == 0, err[-3000:]
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists() and "removed" in err
    before = {d: _snapshot(d) for d in (base, merged)}
    for model, out in ((base, base), (merged, merged), (base, os.path.join(base, "sub"))):
        rc, _, err = _cli(capsys, "merge", "--adapter", adapter, "--model", model, "--out", out)
        assert "the directory the base model is read from" in _one_line_error(rc, err)
    assert {d: _snapshot(d) for d in (base, merged)} == before


def test_run_files_are_never_written_through_a_symlink(tmp_path):
    from mixtune.loop.metrics import MetricsLog
    from mixtune.loop.report import plot_losses, write_report
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.jsonl", "report.md", "loss.png"):
        os.symlink(victim, out / name)
    log = MetricsLog(str(out), tensorboard=False, resume_step=None)
    log.log({"kind": "train", "step": 1, "loss": 2.0})
    write_report(str(out / "report.md"), {"title": "t"})
    plot_losses([{"kind": "train", "step": 1, "loss": 2.0}], str(out / "loss.png"))
    assert victim.read_text() == "precious\n"
    for name in ("metrics.jsonl", "report.md", "loss.png"):
        assert not os.path.islink(out / name)
    # a symlink planted while the run writes: appends refuse it (one OSError naming it)
    os.remove(out / "metrics.jsonl")
    os.symlink(victim, out / "metrics.jsonl")
    with pytest.raises(OSError, match="symbolic link"):
        log.log({"kind": "train", "step": 2, "loss": 1.0})
    resumed = MetricsLog(str(out), tensorboard=False, resume_step=1)  # on resume the symlink is replaced too
    resumed.log({"kind": "train", "step": 2, "loss": 1.0})
    assert victim.read_text() == "precious\n" and not os.path.islink(out / "metrics.jsonl")
