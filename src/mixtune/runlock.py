"""One writer per run directory: an OS-level lock held for the whole run.

    lock = acquire("runs/x", say=print)     # refused with RunDirBusy naming the holder (pid, host, start)
    with lock: ...                          # released (and its file removed) when the run ends

The lock is `fcntl.flock` on `<dir>/.mixtune.lock`, which also records the holder as JSON. The kernel drops a
flock when its process dies, so a lock file whose lock can be taken belongs to a process that is gone (killed,
crashed): it is taken over and said so. A clean release removes the file. `try_lock_dir` is the same lock on a
directory itself (merge uses it to tell its live temporaries from a dead writer's).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Callable, Optional

from .config import ConfigError

LOCK_NAME = ".mixtune.lock"


class RunDirBusy(ValueError):
    """Another live process holds the run directory."""


class RunLock:
    """A held lock (or, for ranks that do not write, an empty one). A context manager that releases it."""

    def __init__(self, path: str = "", fd: Optional[int] = None, created_dir: bool = False):
        self.path, self.fd, self.created_dir = path, fd, created_dir

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting opener then sees another inode and retries
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing drops the flock
        if self.created_dir:  # a run refused at its start leaves no empty directory behind
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.path))
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_text(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) \
        else "an unknown time"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        info = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?"}  # a damaged lock file still names no one
    return info if isinstance(info, dict) else {"pid": "?"}


def _open_no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)


def acquire(out_dir: str, say: Optional[Callable[[str], None]] = None, option: str = "train.output_dir") -> RunLock:
    """Create `out_dir` if needed and take its lock. Raises RunDirBusy when a live process holds it, ConfigError
    when `out_dir` cannot be a run directory (a file, /dev/null, read-only, not permitted)."""
    if not out_dir:
        raise ConfigError(f"{option} is empty: name the directory the run writes into")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{option}: {out_dir} exists and is not a directory")
    path = os.path.join(out_dir, LOCK_NAME)
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        for _ in range(100):  # the holder may release (unlink) between our open and our flock: retry
            fd = _open_no_follow(path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                raise RunDirBusy(f"{option} {out_dir} is in use by another mixtune run ({_holder_text(info)}); "
                                 f"wait for it to finish or choose another --output_dir") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - a lock file replaced 100 times in a row
            raise RunDirBusy(f"{option} {out_dir}: its lock file {path} keeps changing; is another run starting?")
        previous = _read_info(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
    except (RunDirBusy, ConfigError):
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{option}: {path} is a symbolic link; remove it") from None
        raise ConfigError(f"{option}: cannot write in {out_dir} ({e.strerror or e})") from None
    if previous and say is not None:
        say(f"mixtune: took over the stale lock of {out_dir} ({_holder_text(previous)}; that process is gone)")
    return RunLock(path, fd, created)


def try_lock_dir(path: str) -> Optional[int]:
    """flock a directory itself without waiting: its file descriptor (close it to release), or None when
    another live process holds it (or it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
