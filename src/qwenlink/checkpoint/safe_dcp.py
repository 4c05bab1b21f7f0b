"""Reading DCP checkpoints without letting them run code.

torch.distributed.checkpoint reads a checkpoint's `.metadata` with a plain `pickle.load` and every non-tensor value
(optimizer hyper-parameters, ...) with `torch.load(weights_only=False)`: a downloaded qwenlink checkpoint could run
any function while it is opened. qwenlink therefore never hands a checkpoint to DCP's own reader and planner:

- `SafeFileSystemReader` unpickles `.metadata` with an allow-list of the plain record classes DCP writes there
  (Metadata, TensorStorageMetadata, ChunkStorageMetadata, ..., torch.Size, dtypes, pathlib paths); any other global
  is refused with one line naming the file and the global, before anything from the file runs;
- `SafeLoadPlanner` reads non-tensor values with `torch.load(weights_only=True)` (tensors already are).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from qwenlink.errors import QwenlinkError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# (module, name) pairs that DCP's `.metadata` pickle refers to: inert records, plus helpers that only map a string or
# an integer to a value (`_get_layout`, the memory-format enum).
ALLOWED_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(_DCP_METADATA, n) for n in ("Metadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
                                  "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                                  "_MEM_FORMAT_ENCODING")]
    # megatron-core's torch_dist saves also keep every rank's save plan in `.metadata` (`all_local_plans`, a cache
    # for its next save): more dataclass records and one enum.
    + [("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType",
                                                               "TensorWriteData")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
    + [("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")]
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"disallowed global {module}.{name}")


def load_dcp_metadata(path: str | os.PathLike) -> Any:
    """A DCP `.metadata` file, unpickled with the allow-list above; errors are one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise QwenlinkError(f"{path}: DCP metadata file not found")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if text.startswith("disallowed global"):
            raise QwenlinkError(f"{path}: refused to load checkpoint metadata: {text} (only DCP's metadata records "
                                f"are admitted; nothing from the file was executed)") from None
        raise QwenlinkError(f"{path}: unreadable DCP metadata ({text.splitlines()[0] if text else 'corrupt'})") \
            from None
    except Exception as exc:  # truncated / corrupt: EOFError, ValueError, AttributeError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QwenlinkError(f"{path}: unreadable DCP metadata ({first[:200]})") from None
    if type(metadata).__name__ != "Metadata" or not hasattr(metadata, "state_dict_metadata"):
        raise QwenlinkError(f"{path}: unreadable DCP metadata (not a torch.distributed.checkpoint Metadata record)")
    return metadata


def safe_reader(checkpoint_dir: str | os.PathLike):
    """A FileSystemReader for `checkpoint_dir` whose metadata goes through `load_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            metadata = load_dcp_metadata(Path(checkpoint_dir) / name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeFileSystemReader(str(checkpoint_dir))


def safe_planner(checkpoint_dir: str | os.PathLike):
    """A DefaultLoadPlanner that reads non-tensor values with torch.load(weights_only=True)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as exc:
                text = str(exc)
                what = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
                what = what or (text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__)
                raise QwenlinkError(f"{checkpoint_dir}: refused to load value {fqn!r}: {what} (only tensors and "
                                    f"plain values are admitted; nothing from the file was executed)") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeLoadPlanner()


def rank_failures(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside DCP's CheckpointException (its `failures` maps rank -> (exception, traceback))."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return []
    found = []
    for value in failures.values():
        inner = value[0] if isinstance(value, tuple) and value else value
        if isinstance(inner, BaseException):
            found.append(inner)
    return found


def user_error_in(exc: BaseException) -> QwenlinkError | None:
    """The QwenlinkError a DCP call wrapped (DCP collects each rank's exception into a CheckpointException)."""
    if isinstance(exc, QwenlinkError):
        return exc
    for failure in rank_failures(exc):
        found = user_error_in(failure)
        if found is not None:
            return found
    cause = exc.__cause__ or exc.__context__
    return user_error_in(cause) if cause is not None and cause is not exc else None
