"""Written artifacts (adapters, checkpoints, merged models) get ordinary permissions, not mkdtemp's 0700."""

import os
import stat

from mixtune._fs import publish_mode


def test_publish_mode_opens_private_temp_entries(tmp_path):
    import tempfile

    d = tempfile.mkdtemp(dir=tmp_path)  # 0700
    sub = os.path.join(d, "sub")
    os.mkdir(sub, 0o700)
    f = os.path.join(sub, "w.safetensors")
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    old = os.umask(0o022)
    try:
        publish_mode(d)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(sub).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
