"""Small filesystem helpers shared by the writers of adapters, checkpoints, run files and merged models:
published permissions, atomic replacement that never writes through a symlink, appends that refuse one, and
write failures (ENOSPC, EROFS, EACCES, also from Rust writers) turned into an OSError that names the path.

    write_text_atomic("runs/x/report.md", text)
    with writing("runs/x/adapter"): save_file(tensors, "runs/x/adapter/adapter_model.safetensors")
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from typing import Callable, Iterator, Optional


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Give `path` — and, for a directory, everything below it — the permissions a plain mkdir()/open()
    would have (0777/0666 less the umask). `tempfile.mkdtemp` and safetensors create private 0700/0600
    entries, which would leave a merged model unreadable to a server running as another user."""
    mask = _umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    if os.path.isfile(path):
        os.chmod(path, fmode)
        return
    os.chmod(path, dmode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            os.chmod(os.path.join(root, f), fmode)


# --------------------------------------------------------------------------------------------------
# writing without following links, and write failures that name their path
# --------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Produce `path` by `write(tmp)` on a temporary sibling, then rename it into place: readers see the old
    file or the new one, and a symlink at `path` is replaced, never written through."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        with writing(path):
            write(tmp)
            publish_mode(tmp)  # mkstemp's 0600 -> what open() would have given
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a text file."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, write)


def open_append(path: str | os.PathLike):
    """Open `path` for appending text, creating it; a symlink there is refused (ELOOP), not followed."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link; refusing to write through it", os.fspath(path)) \
                from None
        raise
    return os.fdopen(fd, "a")


_OS_ERROR_RE = re.compile(r"os error (\d+)")


def as_os_error(e: BaseException, path: str | os.PathLike) -> Optional[OSError]:
    """`e` as an OSError that names `path` (keeping its own file name when it has one), or None when `e` is
    not an operating-system failure. Rust writers (safetensors) report those as '... (os error 28)'."""
    if isinstance(e, OSError):
        if e.errno is None:
            return None
        return OSError(e.errno, e.strerror or os.strerror(e.errno), e.filename or os.fspath(path))
    m = _OS_ERROR_RE.search(str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), os.fspath(path))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, an operating-system failure (disk full, read-only, permission denied — from Python or
    from a Rust writer) becomes an OSError naming `path` (or the file it names itself)."""
    try:
        yield
    except Exception as e:
        err = as_os_error(e, path)
        if err is None or err is e:
            raise
        raise err from None
