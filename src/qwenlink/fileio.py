"""Crash-safe file writing: write under a temporary name next to the target, then rename.

A reader therefore sees either the old complete file/directory or the new complete one, never a half-written one,
and a failed command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it onto `target`, on failure remove it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create 0600/0700 entries; give the result the mode a plain open()/mkdir() would have had.
        os.chmod(tmp, _default_mode(is_dir))
        publish(tmp, target, is_dir=is_dir)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def publish(tmp: Path, target: Path, *, is_dir: bool = False) -> None:
    """Rename a finished `tmp` onto `target`. A previous directory is moved aside first, so the swap is two renames
    (a reader never sees a mix of old and new files), then deleted. Also for temporaries that several processes
    fill (a multi-rank export), which cannot come from `atomic_path`'s private name."""
    if is_dir and target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing with other threads) where Linux says."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(is_dir: bool) -> int:
    return (0o777 if is_dir else 0o666) & ~_current_umask()


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json_object(path: str | os.PathLike) -> dict:
    """Read a JSON file that must hold an object (config.json, adapter_config.json, ...), failing in one line."""
    from qwenlink.errors import QwenlinkError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()
        raise QwenlinkError(f"{path}: not valid JSON ({first[0] if first else type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise QwenlinkError(f"{path}: expected a JSON object")
    return data
