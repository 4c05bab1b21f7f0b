"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut from a meta-device model, and schedules.

A stage is a copy of the (meta) model with the layers of other stages deleted; the embedding stays only in the first
stage and norm + lm_head only in the last. Layer names keep their global index, so checkpoints written by any layout
hold the same keys. Virtual stages are placed like Megatron (stage = chunk x pp + pipeline rank).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from qwenlink.errors import QwenlinkError
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.parallel.mesh import ParallelPlan, stage_layers, stages_of_rank


def split_stages(model: Qwen2Model, plan: ParallelPlan, pp_rank: int) -> list[tuple[int, Qwen2Model]]:
    """(stage index, stage module) for every model chunk this pipeline rank runs. `model` should be on meta."""
    layout = stage_layers(plan, model.config.num_hidden_layers)
    last = plan.num_stages - 1
    stages = []
    for index in stages_of_rank(plan, pp_rank):
        stage = copy.deepcopy(model)
        keep = {str(i) for i in layout[index]}
        for name in list(stage.layers.keys()):
            if name not in keep:
                del stage.layers[name]
        if index != 0:
            stage.embed_tokens = None
        if index != last:
            stage.norm = None
            stage.lm_head = None
        stages.append((index, stage))
    return stages


class MicroBatchInputs:
    """Per micro batch keyword inputs of the stage modules that cannot travel between stages: documents (a
    `DocumentMask`, whose boundaries are host integers) and their restarting positions.

    torch.distributed.pipelining sends only the hidden states from stage to stage (and keyword inputs reach the first
    stage only), but every pipeline rank of a replica loads the same micro batches, so each rank hands its stages the
    inputs of the micro batch they are computing: the stage (`_stage_class`) selects micro batch i before its forward
    of chunk i, and a forward pre-hook on the module adds the selection to the call. The selection stays put for
    anything else that runs the module (the schedule's first-step shape inference: micro batch 0's inputs, same
    shapes), and activation checkpointing recomputes a layer from the arguments it was called with.

    `extras`: per micro batch values that stage hooks read but the module is not called with (a mixture of experts'
    token mask and labelled tokens, train/moe.py `RoutingCarry`), selected with the inputs."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.current: dict = {}
        self.extras: list[dict] = []
        self.extra: dict = {}

    def load(self, items: list[dict], extras: Optional[list[dict]] = None) -> None:
        """This step's inputs, one dict of keyword arguments per micro batch (empty dicts: nothing to add)."""
        self.items = list(items)
        self.current = self.items[0] if self.items else {}
        self.extras = list(extras or [])
        self.extra = self.extras[0] if self.extras else {}

    def select(self, index: int) -> None:
        if self.items:
            self.current = self.items[index]
        if self.extras:
            self.extra = self.extras[index]

    def attach(self, module: nn.Module) -> None:
        """Add the selected inputs to every call of `module`, replacing what an earlier attach installed there (a
        stale selection must never reach a forward)."""

        def add_inputs(_module: nn.Module, args: tuple, kwargs: dict):
            return (args, {**kwargs, **self.current}) if self.current else None

        previous = getattr(module, "_micro_batch_inputs_hook", None)
        if previous is not None:
            previous.remove()
        module._micro_batch_inputs_hook = module.register_forward_pre_hook(add_inputs, with_kwargs=True)


def _stage_class(inputs: "MicroBatchInputs | None"):
    """PipelineStage, selecting the micro batch's inputs (if any) before each forward chunk."""
    from torch.distributed import pipelining as pl

    if inputs is None:
        return pl.PipelineStage

    class MicroBatchStage(pl.PipelineStage):
        def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
            inputs.select(fwd_chunk_id)
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    return MicroBatchStage


def build_schedule(plan: ParallelPlan, stages: list[tuple[int, nn.Module]], *, device: torch.device, pp_group,
                   n_microbatches: int, loss_fn: Callable, inputs: "MicroBatchInputs | None" = None):
    """Wrap the stage modules in PipelineStages and build the configured schedule.

    Gradients are not rescaled by the schedule (scale_grads=False): the loss of each micro batch is already divided
    by the number of valid tokens of the whole global batch, so summing micro batches is the exact global mean.
    `inputs`: per micro batch keyword inputs for every stage (documents), attached to the modules by the caller.
    """
    from torch.distributed import pipelining as pl

    stage_cls = _stage_class(inputs)
    pipeline_stages = [stage_cls(module, index, plan.num_stages, device, group=pp_group)
                       for index, module in stages]
    single = {"gpipe": getattr(pl, "ScheduleGPipe"), "1f1b": getattr(pl, "Schedule1F1B")}
    multi = {"interleaved-1f1b": getattr(pl, "ScheduleInterleaved1F1B"),
             "interleaved-zero-bubble": getattr(pl, "ScheduleInterleavedZeroBubble", None)}
    if plan.schedule in single:
        return single[plan.schedule](pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                                     scale_grads=False)
    schedule_cls = multi.get(plan.schedule)
    if schedule_cls is None:
        raise QwenlinkError(f"parallel.schedule {plan.schedule} is not available in torch {torch.__version__}")
    return schedule_cls(pipeline_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def tied_embedding_group(mesh, plan: ParallelPlan):
    """The process group joining the first and last pipeline rank of this rank's (dp, tp) coordinate.

    With tied embeddings the first stage's embedding and the last stage's lm_head are two copies of one weight;
    summing their gradients over this group before each optimizer step keeps the copies identical (Megatron's
    embedding group). Every rank must call this (group creation is collective); ranks in no group get None.
    """
    if plan.pp == 1:
        return None
    ranks = mesh.mesh  # [pp, ...] global ranks
    columns = ranks.reshape(plan.pp, -1)
    mine = None
    me = dist.get_rank()
    for j in range(columns.shape[1]):
        members = sorted({int(columns[0, j]), int(columns[-1, j])})
        group = dist.new_group(members)
        if me in members:
            mine = group
    return mine
