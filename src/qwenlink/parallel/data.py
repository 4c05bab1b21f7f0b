"""Data parallelism with FSDP2 (`fully_shard`): sharded (ZeRO-3 like), replicated, or both (HSDP).

Each decoder layer is its own FSDP unit (all-gathered just before use, freed after), so is an untied embedding; the
root unit holds the final norm and lm_head (and a tied embedding: one parameter, one unit). The head stays in the root
because the chunked loss applies its weight outside the module's forward, where FSDP2's hooks would not run. With bf16, parameters are gathered
and computed in bf16 while the sharded master weights, gradients' reduction and optimizer state stay fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qwenlink.models.qwen2 import Qwen2Model


def apply_fsdp(model: Qwen2Model, dp_mesh, *, param_dtype: Optional[torch.dtype] = None,
               reshard_after_forward: bool = True) -> Qwen2Model:
    """Shard `model` (or a pipeline stage of it) over `dp_mesh` in place; a 2-D mesh means replicate x shard."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    embedding = model.embed_tokens
    if embedding is not None and not model.config.tie_word_embeddings and embedding.weight.requires_grad:
        # Its own unit: gathered for the first op of the forward and freed right after, instead of held with the
        # head for the whole step (151936 x hidden: 1.2 GB in bf16 at 7B). Backward gathers it again at the end.
        # A frozen one (LoRA's base) stays in the root: it has no backward, but FSDP2 would prefetch it there for
        # nothing (an unshard no one waits for until the end of backward).
        fully_shard(model.embed_tokens, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for layer in model.layers.values():
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root unit (embedding, final norm, lm_head) stays unsharded after forward: its parameters are needed again at
    # once in backward, and the chunked loss applies lm_head's weight right after the forward returns.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def set_gradient_sync(modules: list[nn.Module], enabled: bool) -> None:
    """Skip the gradient reduce-scatter for all but the last micro batch of a step (they accumulate locally)."""
    for module in modules:
        setter = getattr(module, "set_requires_gradient_sync", None)
        if setter is not None:
            setter(enabled)
