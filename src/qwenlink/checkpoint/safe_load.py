"""Loading `.pt` pickles without letting them run code.

A pickle can call any importable function while it is read (`os.system`, `builtins.eval`...), so a checkpoint
downloaded from the internet is a program. Every pickle qwenlink reads goes through `safe_torch_load`, which uses
PyTorch's restricted `weights_only=True` unpickler: it admits tensors, storages, dtypes and plain containers only,
plus the few extra globals listed here.

Megatron checkpoints pickle an `argparse.Namespace` whose values include Megatron enums (`ModelType`, `AttnBackend`,
...). Importing Megatron to rebuild them would execute Megatron's code (and would need Megatron installed), so each
such name is bound to an inert stand-in: a small record of (qualified name, value) that has no behaviour. Any other
global is refused with one line naming the file and the global; nothing from the file runs.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import re
import signal
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from qwenlink.errors import QwenlinkError

# Megatron / ModelLink / MindSpeed enums known to appear in a checkpoint's `args` (module, name).
KNOWN_MEGATRON_ENUMS: tuple[str, ...] = (
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.enums.Fp8Recipe",
    "megatron.model.enums.AttnMaskType",
    "megatron.model.enums.AttnType",
    "megatron.model.enums.LayerType",
    "megatron.model.enums.PositionEmbeddingType",
    "megatron.core.models.common.embeddings.rope_utils.RopeType",
)
# Package prefixes whose enum-like globals also become stand-ins (other Megatron versions add enums over time).
# Safe because a stand-in never imports or calls the real object, whatever it was.
STAND_IN_PREFIXES: tuple[str, ...] = ("megatron.", "modellink.", "mindspeed.", "mindspeed_llm.")

# Harmless standard-library classes that Megatron args contain, admitted as themselves.
_STDLIB_GLOBALS: list[tuple[Any, str]] = [
    (argparse.Namespace, "argparse.Namespace"),
    (signal.Signals, "signal.Signals"),  # args.exit_signal; calling it only looks up an enum member
    (io.BytesIO, "_io.BytesIO"),  # Transformer Engine `_extra_state` blobs
]


class MegatronStandIn:
    """An inert placeholder for a Megatron object named in a pickle: remembers its name and arguments, nothing more."""

    qualified_name: str = "megatron.?"

    def __init__(self, *args: Any) -> None:
        self.args = args

    @property
    def value(self) -> Any:
        return self.args[0] if len(self.args) == 1 else self.args

    @property
    def name(self) -> str:
        return self.qualified_name.rsplit(".", 1)[-1]

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MegatronStandIn) and other.qualified_name == self.qualified_name
                and other.args == self.args)

    def __hash__(self) -> int:
        return hash((self.qualified_name, repr(self.args)))

    def __repr__(self) -> str:
        return f"<stand-in {self.qualified_name}{self.args!r}>"

    def __reduce__(self) -> Any:
        # Re-saving a stand-in would write a qwenlink class into a Megatron file; refuse instead of surprising.
        raise TypeError(f"{self.qualified_name} stand-in cannot be pickled; write plain values instead")


_STAND_INS: dict[str, type[MegatronStandIn]] = {}


def stand_in(qualified_name: str) -> type[MegatronStandIn]:
    """The (cached) stand-in class for one Megatron global, e.g. 'megatron.core.enums.ModelType'."""
    cls = _STAND_INS.get(qualified_name)
    if cls is None:
        cls = type(qualified_name.rsplit(".", 1)[-1], (MegatronStandIn,), {"qualified_name": qualified_name})
        _STAND_INS[qualified_name] = cls
    return cls


def _pickle_bytes(path: Path) -> Iterable[bytes]:
    """The pickle stream(s) inside a torch zip file (data.pkl), or the raw file for a legacy/plain pickle."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("data.pkl"):
                    yield zf.read(name)
    # Legacy (non-zip) torch files hold several pickles back to back; their globals are checked by torch itself.


def _globals_in(data: bytes) -> set[str]:
    """Names referenced by GLOBAL opcodes (protocol <= 3, what torch.save writes). Never executes anything."""
    found: set[str] = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                found.add(arg.replace(" ", "."))
    except Exception:  # a corrupt stream: let torch's unpickler report it
        pass
    return found


def _stand_ins_for(path: Path) -> list[tuple[Any, str]]:
    names = set(KNOWN_MEGATRON_ENUMS)
    for data in _pickle_bytes(path):
        names |= {n for n in _globals_in(data) if n.startswith(STAND_IN_PREFIXES)}
    return [(stand_in(n), n) for n in sorted(names)]


_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")


def _py3_name(name: str) -> str:
    """Protocol-2 pickles spell some Python 3 names the Python 2 way (subprocess.Popen as commands.Popen)."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{attr}" if module else attr


def _refusal(path: Path, exc: Exception) -> QwenlinkError:
    text = str(exc)
    match = _GLOBAL_RE.search(text)
    if match:
        what = f"disallowed global {_py3_name(match.group(1))!r}"
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        what = f"disallowed content ({first[:200]})"
    return QwenlinkError(f"{path}: refused to load pickle: {what}; only tensors, containers, argparse.Namespace and "
                         f"known Megatron enums are admitted (nothing from the file was executed)")


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = True,
                    extra_globals: Iterable[tuple[Callable[..., Any], str]] = ()) -> Any:
    """torch.load(weights_only=True) with Megatron's enum names bound to stand-ins; errors name the file.

    mmap=True maps tensor storages from the file instead of reading them all, so a converter touching one layer at
    a time keeps roughly one layer resident (falls back to a normal read for legacy non-zip files).
    """
    path = Path(path)
    if not path.is_file():
        raise QwenlinkError(f"{path}: file not found")
    allowed = _STDLIB_GLOBALS + _stand_ins_for(path) + list(extra_globals)
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except QwenlinkError:
        raise
    except Exception as exc:
        if "weights_only" in str(exc) or isinstance(exc, pickle.UnpicklingError):
            raise _refusal(path, exc) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QwenlinkError(f"{path}: unreadable checkpoint file ({first[:200]})") from None


def confined_file(directory: Path, name: Any, index: Path) -> Path:
    """The file an untrusted index (model.safetensors.index.json) names, refused unless it stays in `directory`.

    An index is data from the internet like the weights: `"../../home/me/.ssh/id_rsa"`, an absolute path or a symlink
    leading out would make qwenlink open (and report on) files the checkpoint does not contain."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise QwenlinkError(f"{index}: shard name {name!r} is not a file name")
    root = directory.resolve()
    path = (directory / name).resolve()
    if root not in path.parents:
        raise QwenlinkError(f"{index}: shard {name!r} lies outside the model directory {directory}; refused")
    return directory / name
