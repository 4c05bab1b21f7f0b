"""Which output directories `--overwrite` (and an export) may replace: only one holding a model qwenlink wrote.

A directory of anything else is someone's data, and a wrong `--output` must not delete it (qwenlink/outputs.py has the
path rules that need no knowledge of checkpoint formats).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qwenlink.checkpoint.loader import detect_format
from qwenlink.errors import QwenlinkError
from qwenlink.outputs import PathLike


def recognised_output(directory: Path) -> Optional[str]:
    """The kind of qwenlink output `directory` holds ('hf', 'megatron', 'qwenlink', 'qwenlink-lora', 'peft'), or
    None for an empty directory or anything else."""
    if (directory / "adapter_config.json").is_file():
        return "peft"
    try:
        return detect_format(directory)
    except QwenlinkError:
        return None


def check_replaceable_dir(output: PathLike, *, overwrite: bool, option: str = "--output") -> None:
    """An output directory may be written when it is absent or empty, or (with --overwrite) holds a recognised
    qwenlink output; a file there, or a directory of other things, is refused and never deleted."""
    path = Path(output)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise QwenlinkError(f"{output}: {option} exists and is not a directory")
    if not any(path.iterdir()):
        return
    kind = recognised_output(path)
    if not overwrite:
        raise QwenlinkError(f"{output}: already exists and is not empty (pass --overwrite to replace it)")
    if kind is None:
        raise QwenlinkError(f"{output}: --overwrite replaces only a directory holding a model qwenlink wrote (HF, "
                            f"Megatron, qwenlink or PEFT); this one holds other files, so it is left alone (choose "
                            f"another {option} or empty it yourself)")
