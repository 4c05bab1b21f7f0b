"""Random initialisation that does not depend on the layout: every rank draws its own shard of the same full tensor.

A plain `torch.manual_seed(seed); model.init_weights()` gives different weights in one process, at tp2 or at pp2:
each layout visits parameters in a different order and holds differently shaped pieces, so the shared generator
hands out different numbers. Here every parameter is drawn from generators keyed by (run seed, parameter name,
row block), over its *full* shape: a rank computes only the row blocks that overlap its shard and keeps its slice.
The result is bitwise the same for one process, TP, FSDP2, PP and their products on one kind of device (CUDA
random kernels size their work by the GPU's core count, so an A100 and an H100 draw differently), and no rank
ever holds more than one block (about 4 MB) beyond its own shards, which keeps a 72B initialisation cheap.

What each parameter is drawn from (normal, zeros, ones, uniform) is the model's knowledge: `models.qwen2.init_rule`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import torch
from torch import nn

from qwenlink.models.qwen2 import InitRule, init_rule

BLOCK_ELEMENTS = 1 << 20  # values drawn per generator; bounds the scratch memory of one draw (4 MB in fp32)


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers parallelism adds (checkpoint wrapper, torch.compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _block_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit seed from the run seed, the parameter's name and the block index (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def local_box(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, offsets, sizes): where this rank's piece sits inside the full parameter."""
    if hasattr(param, "to_local"):  # DTensor: tensor parallel and/or FSDP2 shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"cannot place the shard {list(local.shape)} of {list(param.shape)} "
                               f"({param.placements}) in the full tensor")
        return local, tuple(offset), tuple(shape)
    return param, (0,) * param.dim(), tuple(param.shape)


def _draw(rule: InitRule, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if rule.kind == "normal":
        return out.normal_(0.0, rule.scale, generator=generator)
    return out.uniform_(-rule.scale, rule.scale, generator=generator)  # "uniform"


@torch.no_grad()
def init_parameter(param: torch.Tensor, name: str, rule: InitRule, seed: int) -> None:
    """Fill this rank's piece of `param` with the values the full tensor would hold (see the module docstring)."""
    local, offsets, sizes = local_box(param)
    if local.numel() == 0:
        return
    if rule.kind in ("zeros", "ones"):
        local.fill_(0.0 if rule.kind == "zeros" else 1.0)
        return
    full = tuple(param.shape)
    if param.dim() > 2:
        # Stacked weights (a mixture of experts' [E, out, in]) are drawn as the 2-D [E x out, in] they flatten to;
        # a shard may split the leading (expert) and the last dimension only, which keeps its rows contiguous.
        inner = math.prod(full[1:-1])
        if any(offsets[d] != 0 or sizes[d] != full[d] for d in range(1, param.dim() - 1)):
            raise ValueError(f"{name}: layout-independent init of {list(full)} sharded inside its middle dimensions")
        full, local = (full[0] * inner, full[-1]), local.view(sizes[0] * inner, sizes[-1])
        offsets, sizes = (offsets[0] * inner, offsets[-1]), (sizes[0] * inner, sizes[-1])
    width = full[1] if len(full) == 2 else 1
    rows_per_block = max(1, BLOCK_ELEMENTS // width)
    row_start, row_stop = offsets[0], offsets[0] + sizes[0]
    columns = slice(offsets[1], offsets[1] + sizes[1]) if len(full) == 2 else None
    generator = torch.Generator(device=local.device)
    for block in range(row_start // rows_per_block, (row_stop - 1) // rows_per_block + 1):
        first = block * rows_per_block
        block_rows = min(rows_per_block, full[0] - first)
        generator.manual_seed(_block_seed(seed, name, block))
        values = _draw(rule, (block_rows, width) if columns is not None else (block_rows,), generator,
                       local.device)  # [rows, full width] or [rows]
        lo, hi = max(first, row_start), min(first + block_rows, row_stop)
        piece = values[lo - first:hi - first]
        if columns is not None:
            piece = piece[:, columns]
        local[lo - row_start:hi - row_start].copy_(piece)


def named_parameter_rules(modules: list[nn.Module], std: float) -> Iterator[tuple[str, nn.Parameter, InitRule]]:
    """(canonical name, parameter, rule) for every parameter of `modules`, each shared parameter once."""
    seen: set[int] = set()
    for module in modules:
        for module_name, sub in module.named_modules():
            for param_name, param in sub.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                name = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
                yield name, param, init_rule(sub, param_name, std)


def init_weights(modules: list[nn.Module], *, seed: int, std: Optional[float] = None) -> None:
    """Initialise this rank's model chunks (materialised, possibly sharded) independently of the layout.

    A head tied to the embedding is drawn under the embedding's name, so a last pipeline stage that holds only the
    head gets the same values as the first stage's embedding.
    """
    for module in modules:
        config = module.config
        scale = config.initializer_range if std is None else std
        tied = config.tie_word_embeddings
        for name, param, rule in named_parameter_rules([module], scale):
            if tied and name == "lm_head.weight":
                name = "embed_tokens.weight"
            init_parameter(param, name, rule, seed)
