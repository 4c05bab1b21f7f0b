"""Output paths that never destroy inputs: every command checks its output against its inputs before any work.

Why: writes are atomic (fileio.atomic_path), and replacing a directory removes the old one, so an output path that
is an input (`generate --input p.jsonl --output p.jsonl`), contains one (`convert --input parent/model --output parent
--overwrite`) or lies inside one would replace or delete what the command reads, together with unrelated files. Paths
are compared after resolving symlinks, and files also by identity (a hard link is the same file). Inputs that are not
paths (a preset name such as `test-tiny`) are skipped.

`--overwrite` removes only a directory that holds an output qwenlink recognises (an HF, Megatron, qwenlink or PEFT
directory): a directory of anything else is someone's data, and a wrong `--output` must not delete it. Recognising one
needs the checkpoint formats, so that check lives in checkpoint/replaceable.py (this module sits below data/).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

from qwenlink.errors import QwenlinkError

PathLike = Union[str, os.PathLike]


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_clobbering(output: PathLike, inputs: Mapping[str, Optional[PathLike]], *, option: str = "--output",
                      replaced: bool = True) -> None:
    """Refuse an output that is, contains, or lies inside one of `inputs` ({description: path or None}).

    `replaced=False`: a directory that is written into but never replaced as a whole (train's output_dir and
    checkpoint.dir) may contain an input (`output_dir = .` next to `data/`); it still may not be or lie inside one."""
    out = _resolved(output)
    for label, value in inputs.items():
        if value is None or not Path(value).expanduser().exists():
            continue
        source = _resolved(value)
        if out == source or _same_file(out, source):
            raise QwenlinkError(f"{output}: {option} is the {label} ({value}); writing it would replace the input "
                                f"(choose another {option})")
        if replaced and out in source.parents:
            raise QwenlinkError(f"{output}: {option} contains the {label} ({value}); replacing it would delete the "
                                f"input (choose another {option})")
        if source.is_dir() and source in out.parents:
            raise QwenlinkError(f"{output}: {option} lies inside the {label} ({value}); write outside the input "
                                f"(choose another {option})")


def check_creatable_dir(path: PathLike, *, option: str) -> None:
    """A directory that is there and writable, or can be made: its nearest existing ancestor is a writable directory.

    Why: a train job writes its outputs after hours of work; a file where a directory belongs, or a read-only parent,
    must fail before the first step, in one line naming the setting."""
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise QwenlinkError(f"{path}: {option} exists and is not a directory")
        if not os.access(target, os.W_OK | os.X_OK):
            raise QwenlinkError(f"{path}: {option} is not writable (permission denied)")
        return
    parent = target.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QwenlinkError(f"{path}: {option} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QwenlinkError(f"{path}: {option} cannot be created: {parent} is not writable (permission denied)")
