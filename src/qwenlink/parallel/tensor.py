"""Tensor (+ sequence) parallelism for Qwen2Model with DTensor's `parallelize_module`.

Megatron's layout: q/k/v and gate/up are column-parallel (each rank holds whole heads / a slice of the FFN), o and
down are row-parallel, the embedding and lm_head are split over the vocabulary. With sequence parallelism the residual
stream and the RMSNorms hold 1/tp of the sequence between blocks (all-gather before attention/MLP, reduce-scatter
after), as ModelLink always runs. The lm_head returns this rank's vocabulary slice of the logits; `vocab_parallel_loss`
computes cross entropy on it with `loss_parallel`, never gathering the full [tokens x vocab] logits.
A mixture of experts' sparse block splits only its shared expert this way; router and routed experts see the whole
sequence on every tp rank (`_moe_plan`). LoRA adapters (models/lora.py) follow their base projection: column-parallel bases split B on the output dim and
replicate A; row-parallel bases split A on the input dim and replicate B.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel, loss_parallel, parallelize_module)

from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.models.qwen2_moe import SparseMoeBlock

IGNORE_INDEX = -100


def _distribute_parameters(module: nn.Module, mesh, placements: dict[str, object]) -> None:
    """Replace each named direct parameter of `module` by a DTensor with the given placement (missing ones skipped)."""
    for name, placement in placements.items():
        param = getattr(module, name, None)
        if param is None:
            continue
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placement]),
                                                     requires_grad=param.requires_grad))


class LoraColwiseParallel(ColwiseParallel):
    """ColwiseParallel that also places LoRA adapters (models/lora.py): base W [out, in] and B [out, r] are split on
    the output dim, A [r, in] is replicated, so each rank computes its slice of x A^T B^T with no extra collective."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute_parameters(module, device_mesh, {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(),
                                                     "lora_B": Shard(0)})


class LoraRowwiseParallel(RowwiseParallel):
    """RowwiseParallel that also places LoRA adapters: base W and A [r, in] are split on the input dim (x A^T is then
    a partial sum, reduced together with the base output by the usual all-reduce / reduce-scatter), B is
    replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute_parameters(module, device_mesh, {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1),
                                                     "lora_B": Replicate()})


def apply_tensor_parallel(model: Qwen2Model, tp_mesh, *, sequence_parallel: bool = True,
                          full_logits: bool = False) -> Qwen2Model:
    """Shard `model` (possibly a pipeline stage with some modules removed) over `tp_mesh` in place.

    Works on a meta model (training: materialise afterwards) or on a loaded one (inference: every rank holds the
    full weights and keeps its shards). `full_logits` all-gathers the head's output so each rank gets [B, T, V]
    (generation samples from the whole vocabulary); training keeps the vocabulary slice for `vocab_parallel_loss`.
    """
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    _shard_model(model, tp_mesh, sequence_parallel, full_logits)
    # SequenceParallel re-creates norm weights as new Parameters with requires_grad=True; keep frozen ones (LoRA's
    # base) frozen, or the optimizer would silently train them.
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return model


def _shard_model(model: Qwen2Model, tp_mesh, sequence_parallel: bool, full_logits: bool = False) -> None:
    residual = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, object] = {}
    if model.embed_tokens is not None:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.lm_head is not None:
        # Local logits hold this rank's vocabulary slice [B, T, V / tp], or all of it with full_logits.
        plan["lm_head"] = ColwiseParallel(input_layouts=residual,
                                          output_layouts=Replicate() if full_logits else Shard(-1),
                                          use_local_output=True)
    tied = model.config.tie_word_embeddings and model.embed_tokens is not None and model.lm_head is not None
    if plan:
        parallelize_module(model, tp_mesh, plan)
    if tied:
        # Both shard the [V, H] weight on dim 0, so one DTensor parameter serves both modules.
        model.lm_head.weight = model.embed_tokens.weight
    for layer in model.layers.values():
        layer_plan: dict[str, object] = {
            # (x, rope, mask): only x changes layout; the rotary tables and mask are plain Python / tensors.
            "self_attn": PrepareModuleInput(input_layouts=(residual, None, None), desired_input_layouts=(Replicate(),
                                                                                                          None, None)),
            "self_attn.q_proj": LoraColwiseParallel(),
            "self_attn.k_proj": LoraColwiseParallel(),
            "self_attn.v_proj": LoraColwiseParallel(),
            "self_attn.o_proj": LoraRowwiseParallel(output_layouts=residual),
        }
        if isinstance(layer.mlp, SparseMoeBlock):
            layer_plan.update(_moe_plan(residual))
        else:
            layer_plan.update({
                "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
                "mlp.gate_proj": LoraColwiseParallel(),
                "mlp.up_proj": LoraColwiseParallel(),
                "mlp.down_proj": LoraRowwiseParallel(output_layouts=residual),
            })
        if sequence_parallel:
            layer_plan["input_layernorm"] = SequenceParallel()
            layer_plan["post_attention_layernorm"] = SequenceParallel()
        parallelize_module(layer, tp_mesh, layer_plan)


def _moe_plan(residual) -> dict[str, object]:
    """A mixture of experts' sparse block under tp: the shared expert is split like the dense MLP (gate/up
    column-parallel, down row-parallel, all-reduced to the whole sequence); the router, the shared expert's gate and the
    routed experts (split by expert parallelism, if at all, never by tp) see the whole gathered sequence as a plain
    tensor and compute the same values on every tp rank, so routing and the load-balancing loss are one process's.
    The block's output is cut back to this rank's part of the sequence (its backward all-gathers the gradient, which
    makes every tp rank's copy of the router and experts receive the same, whole gradient). Why not route only this
    rank's T / tp tokens: the aux loss is not a sum over tokens (it needs the counts of all of them), and the router's
    and experts' gradients would then need a sum over tp - kept for later; the routed experts' work is repeated tp
    times instead."""
    return {
        "mlp": PrepareModuleInputOutput(input_layouts=(residual,), desired_input_layouts=(Replicate(),),
                                        use_local_input=True, output_layouts=(Replicate(),),
                                        desired_output_layouts=(residual,), use_local_output=True),
        # the plain (whole-sequence) input as a replicated DTensor: its partial gradient from the column-parallel
        # projections is all-reduced on the way back
        "mlp.shared_expert": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
        "mlp.shared_expert.gate_proj": LoraColwiseParallel(),
        "mlp.shared_expert.up_proj": LoraColwiseParallel(),
        "mlp.shared_expert.down_proj": LoraRowwiseParallel(output_layouts=Replicate()),
    }


def vocab_parallel_loss(local_logits: torch.Tensor, labels: torch.Tensor, tp_mesh, *, scale: float) -> torch.Tensor:
    """Summed cross entropy x scale from this rank's vocabulary slice of the logits [B, T, V/tp].

    The slice is viewed as a DTensor sharded on the vocabulary and `loss_parallel` computes the softmax statistics
    with all-reduces over tp, so no rank ever holds the full logits. labels: [B, T], IGNORE_INDEX where masked.
    Must run (forward and backward) inside `loss_parallel()`; see `loss_context`.
    """
    logits = DTensor.from_local(local_logits.float(), tp_mesh, [Shard(-1)], run_check=False)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(local_logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    if isinstance(loss, DTensor):
        loss = loss.full_tensor()
    return loss * scale


def loss_context(tp_mesh):
    """`loss_parallel()` when the head is vocabulary-parallel, else a no-op context."""
    import contextlib

    return loss_parallel() if tp_mesh is not None else contextlib.nullcontext()
