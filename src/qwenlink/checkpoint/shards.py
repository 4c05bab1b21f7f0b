"""Which part of a checkpoint tensor a (possibly tensor-parallel or FSDP-sharded) parameter holds.

Readers of whole-tensor formats (HF safetensors, Megatron rank files) copy into a DTensor parameter only the slice
its local shard covers, so a rank never materialises more than its shards; the mapping from placements to file
offsets is the same for every format, so it lives here once.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def local_index(param: torch.Tensor) -> Optional[tuple[slice, ...]]:
    """The slice of the global tensor that `param`'s local shard holds; None for an ordinary (unsharded) tensor.

    Raises ValueError for a sharding whose local shard is not one rectangular slice of the global tensor.
    """
    if not hasattr(param, "to_local"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(shape) != tuple(local.shape):
        raise ValueError(f"cannot map the shard {list(local.shape)} of {list(param.shape)} ({param.placements}) "
                         f"to a slice of the checkpoint tensor")
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def copy_into(param: torch.Tensor, read: Callable[[Optional[tuple[slice, ...]]], torch.Tensor],
              row: Optional[int] = None) -> None:
    """Copy into `param` (its local shard, for a DTensor) what `read(index)` returns for that slice (None: all).

    `row`: the checkpoint tensor is `param[row]` (one expert of a stacked [E, ...] parameter); a shard whose rows
    do not include it copies nothing, and `read` gets the slice of the remaining dimensions."""
    index = local_index(param)
    if row is not None:
        if index is None:
            param[row].copy_(read(None))
        elif index[0].start <= row < index[0].stop:
            param.to_local()[row - index[0].start].copy_(read(index[1:]))
    elif index is None:
        param.copy_(read(None))
    else:
        param.to_local().copy_(read(index))
