"""Writing safetensors files with the permissions every other output gets.

safetensors' `save_file` creates its file with mode 0600 whatever the umask, so an HF directory written by
`convert --to hf` had private weights next to group-readable config and tokenizer files (a shared model directory
that colleagues could list but not load). This `save_file` is a drop-in replacement that then gives the file the
mode a plain `open()` would have had under the process umask.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import save_file as _save_file

from qwenlink.fileio import _default_mode


def save_file(tensors: dict[str, torch.Tensor], filename: str | os.PathLike,
              metadata: Optional[dict[str, str]] = None) -> None:
    """`safetensors.torch.save_file`, then chmod to 0666 & ~umask."""
    _save_file(tensors, str(filename), metadata=metadata)
    os.chmod(filename, _default_mode(False))
