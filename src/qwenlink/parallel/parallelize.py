"""One rank's share of a model under any layout: the device mesh, pipeline stages, and `parallelize`.

The trainer always takes the same path, whatever the world size (one process is the plan with every size 1):

    full model on meta -> (LoRA adapters) -> this rank's pipeline stages -> parallelize(stage):
        tensor / sequence parallel -> activation checkpointing -> torch.compile -> FSDP2
    -> materialise on the device -> layout-independent init (parallel/init.py) -> load initial weights

Tensor parallelism comes first so that the modules it rewrites are the plain ones; checkpointing and compilation
then wrap whole (already sharded) blocks, and FSDP2 goes last, over the compiled blocks (its hooks are marked for
dynamo to skip, so they run eagerly at each block's entry and exit).
Nothing here runs a training step; train/step.py does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.parallel.context import apply_context_parallel
from qwenlink.parallel.data import apply_fsdp
from qwenlink.parallel.experts import apply_expert_parallel, shard_experts
from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.parallel.pipeline import split_stages, tied_embedding_group
from qwenlink.parallel.tensor import apply_tensor_parallel

ModuleHook = Callable[[Qwen2Model], object]


# ---- the mesh -------------------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """A plan's device mesh and the sub-meshes / groups the step needs; in one process every handle is None."""

    plan: ParallelPlan
    device: torch.device
    mesh: Optional[object] = None  # DeviceMesh (pp, dp_replicate, dp_shard[, cp], tp), size-1 dims included
    tp_mesh: Optional[object] = None
    cp_mesh: Optional[object] = None  # with cp > 1 (the mesh then has a cp dim)
    dp_mesh: Optional[object] = None
    ep_mesh: Optional[object] = None  # with ep > 1: the ranks that split the routed experts (part of dp_shard)
    expert_dp_mesh: Optional[object] = None  # with ep > 1: what FSDP2 shards the experts over (dp / ep ranks)
    pp_group: Optional[object] = None
    tied_group: Optional[object] = None  # first + last pipeline rank, when the head is tied to the embedding

    def _coordinate(self, dim: str) -> int:
        if self.mesh is None or dim not in self.mesh.mesh_dim_names:
            return 0
        return self.mesh.get_coordinate()[list(self.mesh.mesh_dim_names).index(dim)]

    @property
    def dp_rank(self) -> int:
        """This rank's index among data-parallel replicas (ranks with the same index see the same data)."""
        # with ep the mesh splits dp_shard into (dp_shard_mod_ep, ep), flattened back to dp_shard in that order
        shard = self._coordinate("dp_shard_mod_ep") * self.plan.ep + self._coordinate("ep") \
            if self.plan.ep > 1 else self._coordinate("dp_shard")
        return self._coordinate("dp_replicate") * self.plan.dp_shard + shard

    @property
    def pp_rank(self) -> int:
        return self._coordinate("pp")

    @property
    def tp_rank(self) -> int:
        return self._coordinate("tp")

    @property
    def cp_rank(self) -> int:
        return self._coordinate("cp")


def build_layout(plan: ParallelPlan, device: torch.device, config: ModelConfig, *,
                 mixed_precision: bool = False) -> Layout:
    """The mesh of `plan` on `device`'s type (collective: every rank calls it).

    `mixed_precision` (bf16 compute): FSDP2's policy applies to every layout, so even a plan without data
    parallelism gets a (size-1) FSDP mesh, and one process gets a one-rank process group for it. Without it, one
    process builds nothing."""
    if plan.world_size == 1 and not mixed_precision:
        return Layout(plan, device)
    from torch.distributed.device_mesh import init_device_mesh

    if plan.world_size == 1:
        ensure_local_process_group(device)
    # A cp dim only when there is context parallelism: every other layout keeps its 4-D mesh.
    cp = (plan.cp,) if plan.cp > 1 else ()
    if plan.ep > 1:
        return _expert_layout(plan, device, config, mixed_precision)
    mesh = init_device_mesh(device.type, (plan.pp, plan.dp_replicate, plan.dp_shard, *cp, plan.tp),
                            mesh_dim_names=("pp", "dp_replicate", "dp_shard", *(("cp",) if cp else ()), "tp"))
    return Layout(plan, device, mesh=mesh,
                  tp_mesh=mesh["tp"] if plan.tp > 1 else None,
                  cp_mesh=mesh["cp"] if cp else None,
                  dp_mesh=_data_parallel_mesh(mesh, plan, mixed_precision),
                  pp_group=mesh["pp"].get_group() if plan.pp > 1 else None,
                  tied_group=tied_embedding_group(mesh, plan) if config.tie_word_embeddings else None)


def _expert_layout(plan: ParallelPlan, device: torch.device, config: ModelConfig, mixed_precision: bool) -> Layout:
    """The mesh with expert parallelism: dp_shard split into (dp_shard_mod_ep, ep), ep the inner (consecutive ranks,
    torchtitan's layout). Non-expert parameters shard over the two flattened back into dp_shard (x dp_replicate);
    the experts are Shard(0) over ep and FSDP2-sharded over dp_shard_mod_ep (x dp_replicate). Context parallelism is
    not combined with ep (refused by train/moe.py)."""
    from torch.distributed.device_mesh import init_device_mesh

    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")
    mesh = init_device_mesh(device.type, (plan.pp, plan.dp_replicate, plan.dp_shard // plan.ep, plan.ep, plan.tp),
                            mesh_dim_names=names)
    shard = mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    if plan.dp_replicate == 1:
        dp_mesh, expert_dp = shard, mesh["dp_shard_mod_ep"]
    else:
        concatenate = getattr(type(mesh), "_concatenate", None)
        dp_mesh = concatenate([mesh["dp_replicate"], shard]) if concatenate else mesh["dp_replicate", "dp_shard"]
        expert_dp = mesh["dp_replicate", "dp_shard_mod_ep"]
    return Layout(plan, device, mesh=mesh, tp_mesh=mesh["tp"] if plan.tp > 1 else None, dp_mesh=dp_mesh,
                  ep_mesh=mesh["ep"], expert_dp_mesh=expert_dp,
                  pp_group=mesh["pp"].get_group() if plan.pp > 1 else None,
                  tied_group=tied_embedding_group(mesh, plan) if config.tie_word_embeddings else None)


def _data_parallel_mesh(mesh, plan: ParallelPlan, mixed_precision: bool = False):
    """What FSDP2 shards over: the dp_shard dim alone (ZeRO-3), or replicate x shard (HSDP; replicate only is DDP-like).
    A size-1 replicate dim is left out: FSDP2 would otherwise run a no-op all-reduce over it for every unit. Without
    data parallelism, the size-1 dp_shard dim when FSDP2 carries the mixed-precision policy, else none.
    With context parallelism the shard dim is (dp_shard, cp) flattened (torchtitan's dp_shard_cp): cp ranks hold the
    same parameters and disjoint tokens, so their gradients are reduced together with data parallelism's."""
    if plan.cp > 1:
        flat = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        if plan.dp_replicate == 1:
            return flat
        # (replicate, dp_shard_cp) for HSDP: joined from the two meshes where torch can (slicing a flattened dim
        # from the root mesh is deprecated in 2.13), sliced from the root mesh otherwise.
        concatenate = getattr(type(mesh), "_concatenate", None)
        return concatenate([mesh["dp_replicate"], flat]) if concatenate else mesh["dp_replicate", "dp_shard_cp"]
    if plan.dp == 1:
        return mesh["dp_shard"] if mixed_precision else None
    return mesh["dp_replicate", "dp_shard"] if plan.dp_replicate > 1 else mesh["dp_shard"]


def ensure_local_process_group(device: torch.device) -> None:
    """A one-rank process group for a single process that needs a device mesh (FSDP2's mixed precision); kept for
    the life of the process, as torchrun's group is, and reused by later jobs in the same process."""
    import torch.distributed as dist

    from qwenlink.device import backend_for

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("a one-process layout inside a multi-process group")
        return
    dist.init_process_group(backend_for(device.type), store=dist.HashStore(), rank=0, world_size=1)


# ---- this rank's model ------------------------------------------------------------------------------------------------
class ModelParts(nn.Module):
    """Several model chunks (virtual pipeline stages) seen as one module with the full model's parameter names.

    Optimizer, checkpoints (DCP reshards by these names) and loaders work on it; it is never called forward (the
    chunks run through the pipeline schedule).
    """

    def __init__(self, chunks: list[Qwen2Model], config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        first = next((m for m in chunks if m.embed_tokens is not None), None)
        last = next((m for m in chunks if m.lm_head is not None), None)
        self.embed_tokens = first.embed_tokens if first is not None else None
        self.layers = nn.ModuleDict({k: v for m in chunks for k, v in m.layers.items()})
        self.norm = last.norm if last is not None else None
        self.lm_head = last.lm_head if last is not None else None

    def forward(self, *args, **kwargs):  # pragma: no cover - a container, not a model
        raise RuntimeError("ModelParts holds pipeline chunks; run them through the pipeline schedule")


@dataclass
class ModelChunks:
    """This rank's model chunks (pipeline stages, in execution order; one chunk without pipeline parallelism)."""

    modules: list[Qwen2Model]
    stage_ids: list[int]
    config: ModelConfig
    num_stages: int

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    @property
    def state_module(self) -> nn.Module:
        """One module with the full model's parameter names for optimizer, checkpoints, loading and export."""
        return self.modules[0] if len(self.modules) == 1 else ModelParts(self.modules, self.config)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        seen, out = set(), []
        for module in self.modules:
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def tied_head_copy(self) -> Optional[nn.Parameter]:
        """The last stage's copy of an embedding tied to the head when the two live on different pipeline ranks
        (a second copy of one weight: counted once in the gradient norm), else None."""
        if not self.config.tie_word_embeddings:
            return None
        for module in self.modules:
            if module.lm_head is not None and module.embed_tokens is None:
                return module.lm_head.weight
        return None

    def materialize(self, device: torch.device) -> None:
        """Allocate every chunk on `device` (values undefined until initialised or loaded)."""
        for module in self.modules:
            module.to_empty(device=device)
            module.tie_weights()


@dataclass
class ParallelizeOptions:
    """What `parallelize` applies besides the layout itself."""

    activation_checkpoint: str = "none"  # none | full | every_n
    activation_checkpoint_every: int = 1
    preserve_rng_state: bool = False  # recompute with the forward's random state (needed with dropout)
    compile: bool = False  # torch.compile each decoder block
    param_dtype: Optional[torch.dtype] = None  # FSDP2's compute dtype for gathered parameters


def checkpointed_layers(model: Qwen2Model, mode: str, every: int) -> list[str]:
    """The names (keys of `model.layers`) of the layers activation checkpointing recomputes: every layer ("full"),
    every `every`-th ("every_n") or none."""
    if mode == "none":
        return []
    return [name for i, name in enumerate(model.layers.keys()) if mode == "full" or i % every == 0]


def apply_activation_checkpointing(model: Qwen2Model, mode: str, every: int, *,
                                   preserve_rng_state: bool = False) -> None:
    """Recompute layer activations in backward: every layer ("full") or every `every`-th layer ("every_n")."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name in checkpointed_layers(model, mode, every):
        model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=preserve_rng_state)


def parallelize(model: Qwen2Model, layout: Layout, options: ParallelizeOptions) -> Qwen2Model:
    """Apply tensor/sequence parallelism -> context parallelism -> activation checkpointing -> compile -> FSDP2 to a
    (meta) model or pipeline stage, in place. Every step is skipped when its size is 1 or it is switched off."""
    plan = layout.plan
    if layout.ep_mesh is not None:  # on the meta model, before anything wraps the experts
        apply_expert_parallel(model, layout.ep_mesh)
    if layout.tp_mesh is not None:
        apply_tensor_parallel(model, layout.tp_mesh, sequence_parallel=plan.sequence_parallel)
    if layout.cp_mesh is not None:  # after TP: its hook sees the attention input sequence parallelism gathered
        apply_context_parallel(model, layout.cp_mesh, checkpointed_layers(
            model, options.activation_checkpoint, options.activation_checkpoint_every))
    apply_activation_checkpointing(model, options.activation_checkpoint, options.activation_checkpoint_every,
                                   preserve_rng_state=options.preserve_rng_state)
    if options.compile:
        for layer in model.layers.values():
            layer.compile()  # in place: parameter names stay those of the checkpoint
    if layout.dp_mesh is not None:
        # Under a pipeline each layer runs once per micro batch: keeping its gathered copy between them saves an
        # all-gather per micro batch. (Freeing them over the precision policy's size-1 mesh was tried and reverted:
        # the pipeline's backward keeps every layer's copy until the last micro batch anyway, so the peak did not
        # fall, and the plan's 2-and-3-layer extrapolation no longer matched a full simulation. Issue #16.)
        if layout.expert_dp_mesh is not None:  # the experts first: their own units over the dp ranks ep leaves
            shard_experts(model, layout.expert_dp_mesh, param_dtype=options.param_dtype,
                          reshard_after_forward=plan.pp == 1)
        apply_fsdp(model, layout.dp_mesh, param_dtype=options.param_dtype, reshard_after_forward=plan.pp == 1)
    return model


def build_model_chunks(config: ModelConfig, layout: Layout, options: ParallelizeOptions, *,
                       adapt: Optional[ModuleHook] = None) -> ModelChunks:
    """This rank's chunks on the meta device, parallelized. `adapt` changes the full meta model first (LoRA)."""
    with torch.device("meta"):
        full = Qwen2Model(config)
    if adapt is not None:
        adapt(full)
    plan = layout.plan
    stages = split_stages(full, plan, layout.pp_rank) if plan.pp > 1 else [(0, full)]
    modules = [parallelize(module, layout, options) for _, module in stages]
    return ModelChunks(modules=modules, stage_ids=[s for s, _ in stages], config=config,
                       num_stages=plan.num_stages)


# ---- full (unsharded) weights out ------------------------------------------------------------------------------
def full_state_dict(chunks: ModelChunks) -> dict[str, torch.Tensor]:
    """Every parameter of this rank's chunks as a full CPU tensor (collective over tp and dp)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out: dict[str, torch.Tensor] = {}
    for module in chunks.modules:
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        for k, v in sd.items():
            out[k] = v.detach().to("cpu").clone()
    return out
