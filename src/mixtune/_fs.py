"""Small filesystem helpers shared by the writers of adapters, checkpoints and merged models."""

from __future__ import annotations

import os


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
