"""Files and directories written atomically get the same permissions a plain write would give them."""

from __future__ import annotations

import os
import stat

from qwenlink.fileio import atomic_path, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_text(tmp_path / "a.txt", "y")  # replacing keeps the plain-write mode too
        with atomic_path(tmp_path / "d", is_dir=True) as d:
            (d / "f").write_text("z")
        plain = tmp_path / "plain.txt"
        plain.write_text("p")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == _mode(plain) == 0o640
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain_dir") == 0o750
