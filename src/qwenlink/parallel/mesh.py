"""Parallel layout: validated sizes, the layer placement of pipeline stages, and the device mesh.

Every constraint is checked before any process allocates the model, and each failure names the sizes involved, so a
bad launch fails in a second with the reason instead of deep inside a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "interleaved-zero-bubble")


@dataclass
class ParallelPlan:
    """Sizes of each parallel dimension. world = pp x dp_replicate x dp_shard x cp x tp."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages (model chunks) per pipeline rank
    dp_shard: int = 1  # FSDP2 sharding degree (ZeRO-3 like)
    dp_replicate: int = 1  # plain replicas
    sequence_parallel: bool = True  # with tp > 1: shard norms / residual activations over the sequence
    schedule: str = "1f1b"  # pipeline schedule (interleaved ones need vpp > 1)
    num_layer_list: Optional[list[int]] = None  # explicit layers per pipeline rank (ModelLink's --num-layer-list)
    cp: int = 1  # context parallel: each sequence split over cp ranks (parallel/context.py)
    ep: int = 1  # expert parallel: routed experts split over ep of the dp_shard ranks (parallel/experts.py)

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def dp_cp(self) -> int:
        """Ranks a global batch's tokens are divided over (data-parallel replicas x context-parallel shards): each
        holds a disjoint part of the loss, and FSDP2 averages gradients over all of them."""
        return self.dp * self.cp

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp


def plan_from_sizes(*, world_size: int, tp: int = 1, pp: int = 1, vpp: int = 1,
                    layers_per_virtual_stage: int = 0, dp_shard: int = -1, dp_replicate: int = 1, cp: int = 1,
                    num_layers: Optional[int] = None, **kwargs) -> ParallelPlan:
    """Derive the data-parallel size from the world size (dp_shard = -1: what is left) and build a plan.

    `layers_per_virtual_stage` (ModelLink's --num-layers-per-virtual-pipeline-stage) is turned into vpp.
    """
    for name, value in (("tp", tp), ("pp", pp), ("vpp", vpp), ("dp_replicate", dp_replicate), ("cp", cp),
                        ("ep", kwargs.get("ep", 1))):
        if value < 1:
            raise QwenlinkError(f"parallel.{name} must be >= 1, got {value}")
    if layers_per_virtual_stage:
        if num_layers is None:
            raise QwenlinkError("parallel.layers_per_virtual_stage needs the model's number of layers")
        if num_layers % (pp * layers_per_virtual_stage):
            raise QwenlinkError(f"parallel: {num_layers} layers cannot be split into pipeline size {pp} x "
                                f"{layers_per_virtual_stage} layers per virtual stage")
        vpp = num_layers // (pp * layers_per_virtual_stage)
    model_parallel = tp * pp * dp_replicate * cp
    if dp_shard == -1:
        if world_size % model_parallel:
            raise QwenlinkError(f"parallel: tp ({tp}) x pp ({pp}) x dp_replicate ({dp_replicate}) x cp ({cp}) = "
                                f"{model_parallel} does not divide the world size {world_size}")
        dp_shard = world_size // model_parallel
    plan = ParallelPlan(tp=tp, pp=pp, vpp=vpp, dp_shard=dp_shard, dp_replicate=dp_replicate, cp=cp, **kwargs)
    if plan.world_size != world_size:
        raise QwenlinkError(f"parallel: pp ({pp}) x dp_replicate ({dp_replicate}) x dp_shard ({dp_shard}) x cp ({cp}) "
                            f"x tp ({tp}) = {plan.world_size}, but {world_size} process(es) are running")
    return plan


def validate_plan(plan: ParallelPlan, config: ModelConfig, *, micro_batches: Optional[int] = None,
                  seq_length: Optional[int] = None) -> None:
    """Check every divisibility the layout needs, with the exact reason when one fails."""
    if config.num_attention_heads % plan.tp:
        raise QwenlinkError(f"parallel: tp {plan.tp} does not divide num_attention_heads {config.num_attention_heads}")
    if config.num_key_value_heads % plan.tp:
        raise QwenlinkError(f"parallel: tp {plan.tp} does not divide num_key_value_heads "
                            f"{config.num_key_value_heads} (each rank must hold whole kv heads)")
    if config.intermediate_size % plan.tp:
        raise QwenlinkError(f"parallel: tp {plan.tp} does not divide intermediate_size {config.intermediate_size}")
    if config.vocab_size % plan.tp:
        raise QwenlinkError(f"parallel: tp {plan.tp} does not divide vocab_size {config.vocab_size}")
    if plan.schedule not in SCHEDULES:
        raise QwenlinkError(f"parallel.schedule {plan.schedule!r} is unknown (expected one of {', '.join(SCHEDULES)})")
    if plan.vpp > 1 and plan.pp == 1:
        raise QwenlinkError("parallel: virtual pipeline stages (vpp > 1) need pp > 1")
    if plan.vpp > 1 and not plan.schedule.startswith("interleaved"):
        plan.schedule = "interleaved-1f1b"
    if plan.vpp == 1 and plan.schedule.startswith("interleaved"):
        raise QwenlinkError(f"parallel.schedule {plan.schedule} needs virtual stages (vpp > 1)")
    stage_layers(plan, config.num_hidden_layers)  # raises on a bad split
    validate_experts(plan, config)
    if plan.sequence_parallel and plan.tp > 1 and seq_length is not None and seq_length % plan.tp:
        raise QwenlinkError(f"parallel: sequence parallelism needs seq_length {seq_length} divisible by tp {plan.tp}")
    if seq_length is not None:
        validate_context(plan, config, seq_length)
    if micro_batches is not None:  # per optimizer step on each data-parallel rank
        if plan.pp > 1 and micro_batches < plan.pp and plan.schedule != "gpipe":
            raise QwenlinkError(f"parallel: {micro_batches} micro batches per step cannot fill {plan.pp} pipeline "
                                f"stages (raise the global batch or use the gpipe schedule)")
        if plan.vpp > 1 and micro_batches % plan.pp:
            raise QwenlinkError(f"parallel: interleaved schedules need the micro batches per step ({micro_batches}) "
                                f"to be a multiple of pp ({plan.pp})")


def validate_experts(plan: ParallelPlan, config: ModelConfig) -> None:
    """A mixture of experts' arithmetic: tp dividing the shared expert's width (split like the dense MLP); ep dividing
    the experts (each rank a contiguous equal range) and the dp_shard ranks it borrows (an ep group is ep
    consecutive dp_shard ranks; FSDP2 shards the experts over the dp_shard / ep groups left)."""
    if config.is_moe and config.shared_expert_intermediate_size % plan.tp:
        raise QwenlinkError(f"parallel: tp {plan.tp} does not divide shared_expert_intermediate_size "
                            f"{config.shared_expert_intermediate_size}")
    if plan.ep == 1:
        return
    if not config.is_moe:
        raise QwenlinkError(f"parallel.ep = {plan.ep}: expert parallelism needs a mixture-of-experts model "
                            f"(this one is dense)")
    if config.num_experts % plan.ep:
        raise QwenlinkError(f"parallel.ep = {plan.ep} does not divide the model's {config.num_experts} experts")
    if plan.dp_shard % plan.ep:
        raise QwenlinkError(f"parallel.ep = {plan.ep} does not divide parallel.dp_shard = {plan.dp_shard} (expert "
                            f"parallelism borrows data-parallel sharding ranks: use a dp_shard that is a multiple "
                            f"of ep)")


def validate_context(plan: ParallelPlan, config: ModelConfig, seq_length: int) -> None:
    """Context parallelism's arithmetic: 2 x cp equal chunks per sequence (a head and a tail per rank), each rank's
    share divisible over tp under sequence parallelism, and no position past the model's (cp splits the work of a
    sequence, it does not lengthen the model's rotary range)."""
    if plan.cp > 1 and seq_length > config.max_position_embeddings:
        raise QwenlinkError(f"parallel: cp {plan.cp} with data.seq_length {seq_length} > the model's "
                            f"max_position_embeddings {config.max_position_embeddings}: context parallelism splits a "
                            f"sequence over ranks but cannot extend the model's positions (lower seq_length to "
                            f"<= {config.max_position_embeddings})")
    if plan.cp == 1:
        return
    chunks = 2 * plan.cp
    if seq_length % chunks:
        raise QwenlinkError(f"parallel: cp {plan.cp} splits each sequence into 2 x cp = {chunks} chunks (a head and a "
                            f"tail per rank), but data.seq_length {seq_length} = {seq_length // chunks} x {chunks} + "
                            f"{seq_length % chunks} (use a multiple of {chunks}, e.g. "
                            f"{(seq_length // chunks + 1) * chunks})")
    local = seq_length // plan.cp
    if plan.sequence_parallel and plan.tp > 1 and local % plan.tp:
        raise QwenlinkError(f"parallel: each cp rank holds data.seq_length {seq_length} / cp {plan.cp} = {local} "
                            f"tokens, which sequence parallelism cannot split over tp {plan.tp}")


def stage_layers(plan: ParallelPlan, num_layers: int) -> list[list[int]]:
    """Global layer indices of every stage, stage s = chunk c x pp + pipeline rank p (Megatron's placement).

    With 8 layers, pp 2, vpp 2: stage 0 (rank 0, chunk 0) = [0, 1], stage 1 (rank 1) = [2, 3], stage 2 (rank 0,
    chunk 1) = [4, 5], stage 3 (rank 1) = [6, 7]. An explicit `num_layer_list` gives the layers per pipeline rank
    (without virtual stages), as ModelLink's --num-layer-list does.
    """
    stages = plan.num_stages
    if plan.num_layer_list is not None:
        if plan.vpp > 1:
            raise QwenlinkError("parallel: num_layer_list cannot be combined with virtual pipeline stages")
        if len(plan.num_layer_list) != plan.pp:
            raise QwenlinkError(f"parallel: num_layer_list has {len(plan.num_layer_list)} entries, expected pp = "
                                f"{plan.pp}")
        if sum(plan.num_layer_list) != num_layers or min(plan.num_layer_list) < 1:
            raise QwenlinkError(f"parallel: num_layer_list {plan.num_layer_list} must be positive and sum to the "
                                f"model's {num_layers} layers")
        out, start = [], 0
        for count in plan.num_layer_list:
            out.append(list(range(start, start + count)))
            start += count
        return out
    if num_layers % stages:
        raise QwenlinkError(f"parallel: {num_layers} layers are not divisible by pp ({plan.pp}) x vpp ({plan.vpp}) "
                            f"= {stages} stages (or give parallel.num_layer_list)")
    per = num_layers // stages
    return [list(range(s * per, (s + 1) * per)) for s in range(stages)]


def stages_of_rank(plan: ParallelPlan, pp_rank: int) -> list[int]:
    """The stage indices a pipeline rank runs, in execution order (its model chunks)."""
    return [chunk * plan.pp + pp_rank for chunk in range(plan.vpp)]
