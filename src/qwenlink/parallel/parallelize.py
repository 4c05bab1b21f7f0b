"""Put the pieces together: one rank's share of a model under any pp x dp x tp layout, and its training step.

`build_parallel_model` cuts pipeline stages from a meta-device model, applies activation checkpointing, tensor
(+ sequence) parallelism and FSDP2 to each, and materialises them. `ParallelModel.forward_backward` runs one optimizer
step's micro batches (through the pipeline schedule when pp > 1), `clip_grad_norm_` computes the global norm across
all layouts, and the full-state-dict helpers move weights in and out layout-independently.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.parallel.data import apply_fsdp, set_gradient_sync
from qwenlink.parallel.mesh import ParallelPlan, build_mesh, submesh, validate_plan
from qwenlink.parallel.pipeline import build_schedule, split_stages, tied_embedding_group
from qwenlink.parallel.tensor import IGNORE_INDEX, apply_tensor_parallel, loss_context, vocab_parallel_loss

ModuleHook = Callable[[Qwen2Model], None]
MicroBatchTensors = tuple  # (input_ids, labels, position_ids | None, attention_mask | None)


class ModelParts(nn.Module):
    """This rank's model chunks seen as one module with the full model's parameter names.

    Optimizer, checkpoints (DCP reshards by these names) and exports work on it; it is never called forward
    (the chunks run through the pipeline schedule).
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
        raise RuntimeError("ModelParts holds pipeline chunks; run them through ParallelModel.forward_backward")


@dataclass
class ParallelModel:
    plan: ParallelPlan
    config: ModelConfig
    device: torch.device
    mesh: object
    modules: list[Qwen2Model]  # this rank's model chunks, in stage order
    stage_ids: list[int]
    tp_mesh: Optional[object]
    dp_mesh: Optional[object]
    pp_group: Optional[object]
    tied_group: Optional[object]
    chunk_size: int = 1024
    _schedules: dict = field(default_factory=dict, repr=False)
    _scale: float = 1.0

    # ---- ranks ----------------------------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        """This rank's index among data-parallel replicas (ranks with the same index see the same data)."""
        coords = self.mesh.get_coordinate()
        names = list(self.mesh.mesh_dim_names)
        rep = coords[names.index("dp_replicate")]
        shard = coords[names.index("dp_shard")]
        return rep * self.plan.dp_shard + shard

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_coordinate()[list(self.mesh.mesh_dim_names).index("pp")]

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.plan.num_stages - 1 in self.stage_ids

    @property
    def state_module(self) -> nn.Module:
        """One module with the full model's parameter names for optimizer, checkpoints and export."""
        return self.modules[0] if len(self.modules) == 1 else ModelParts(self.modules, self.config)

    def parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        seen, out = set(), []
        for module in self.modules:
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    # ---- weights in and out ---------------------------------------------------------------------------------------
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Distribute full (unsharded) tensors, keyed like Qwen2Model.state_dict(), into this rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        for module in self.modules:
            own = module.state_dict().keys()
            subset = {k: v for k, v in state.items() if k in own}
            missing = sorted(set(own) - set(subset))
            if missing:
                raise KeyError(f"state dict lacks {missing[0]}")
            set_model_state_dict(module, subset, options=StateDictOptions(full_state_dict=True, strict=True))
            module.tie_weights()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter of this rank's chunks as a full CPU tensor (collective over tp and dp)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        out: dict[str, torch.Tensor] = {}
        for module in self.modules:
            sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
            for k, v in sd.items():
                if hasattr(v, "full_tensor"):
                    v = v.full_tensor()
                out[k] = v.detach().to("cpu").clone()
        return out

    # ---- one optimizer step's forward and backward ---------------------------------------------------------------
    def forward_backward(self, micro_batches: list[MicroBatchTensors], *, scale: float) -> torch.Tensor:
        """Accumulate gradients for this data-parallel rank's micro batches of one global batch.

        Each micro batch is (input_ids [b, T], labels [b, T], position_ids or None, attention_mask or None), labels
        aligned with inputs (IGNORE_INDEX where masked). `scale` multiplies each summed token loss; the caller passes
        dp / (valid tokens in the global batch) so that FSDP's averaging over data-parallel ranks yields the exact
        global mean. Returns this rank's share of the global mean loss (equal on every tp and pp rank).
        """
        self._scale = scale
        if self.plan.pp == 1:
            total = self._forward_backward_local(micro_batches)
        else:
            total = self._forward_backward_pipeline(micro_batches)
        self._sync_tied_gradients()
        return total / self.plan.dp

    def _loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled summed CE of the last stage's output: vocab-parallel logits with tp, full logits otherwise."""
        if self.tp_mesh is not None:
            return vocab_parallel_loss(output, labels, self.tp_mesh, scale=self._scale)
        return F.cross_entropy(output.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") * self._scale

    def _forward_backward_local(self, micro_batches: list[MicroBatchTensors]) -> torch.Tensor:
        from qwenlink.train.loss import model_loss

        module = self.modules[0]
        total = torch.zeros((), dtype=torch.float32)
        for i, (ids, labels, positions, mask) in enumerate(micro_batches):
            ids, labels = ids.to(self.device), labels.to(self.device)
            positions = positions.to(self.device) if positions is not None else None
            mask = mask.to(self.device) if mask is not None else None
            set_gradient_sync([module], i == len(micro_batches) - 1)
            with loss_context(self.tp_mesh):
                if self.tp_mesh is not None:
                    loss = self._loss(module(ids, position_ids=positions, attention_mask=mask), labels)
                else:
                    loss, _ = model_loss(module, ids, labels, scale=self._scale, chunk_size=self.chunk_size,
                                         position_ids=positions, attention_mask=mask)
                loss.backward()
            total += loss.detach().float().cpu()
        return total

    def _forward_backward_pipeline(self, micro_batches: list[MicroBatchTensors]) -> torch.Tensor:
        """All micro batches go through the schedule at once; they must share one length (padded by the caller).
        Per-sample positions / masks cannot cross stage boundaries, so packed samples are refused upstream and right
        padding needs no mask (causal attention never looks ahead at the pads)."""
        input_ids = torch.cat([mb[0] for mb in micro_batches]).to(self.device)  # [n x b, T]
        labels = torch.cat([mb[1] for mb in micro_batches]).to(self.device)
        n_microbatches = len(micro_batches)
        schedule = self._schedules.get(n_microbatches)
        if schedule is None:
            schedule = build_schedule(self.plan, list(zip(self.stage_ids, self.modules)), device=self.device,
                                      pp_group=self.pp_group, n_microbatches=n_microbatches, loss_fn=self._loss)
            self._schedules[n_microbatches] = schedule
        losses: list[torch.Tensor] = []
        with loss_context(self.tp_mesh):
            if self.has_first_stage:
                schedule.step(input_ids, target=labels if self.has_last_stage else None, losses=losses)
            elif self.has_last_stage:
                schedule.step(target=labels, losses=losses)
            else:
                schedule.step()
        total = torch.stack([l.detach().float() for l in losses]).sum().cpu() if losses else torch.zeros(())
        dist.all_reduce(total, group=self.pp_group)  # only the last stage had it
        return total

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, labels: torch.Tensor, positions=None, mask=None) -> tuple[float, int]:
        """Summed validation loss and valid-token count of one micro batch (no pipeline: pp must be 1)."""
        module = self.modules[0]
        ids, labels = ids.to(self.device), labels.to(self.device)
        with loss_context(self.tp_mesh):
            if self.tp_mesh is not None:
                saved, self._scale = self._scale, 1.0
                loss = self._loss(module(ids, position_ids=positions, attention_mask=mask), labels)
                self._scale = saved
            else:
                from qwenlink.train.loss import model_loss

                loss, _ = model_loss(module, ids, labels, scale=1.0, chunk_size=self.chunk_size,
                                     position_ids=positions, attention_mask=mask)
        return float(loss), int((labels != IGNORE_INDEX).sum())

    def _sync_tied_gradients(self) -> None:
        """Sum the gradients of the first stage's embedding and the last stage's (tied) lm_head."""
        if self.tied_group is None or not self.config.tie_word_embeddings:
            return
        for module in self.modules:
            for p in (module.embed_tokens.weight if module.embed_tokens is not None else None,
                      module.lm_head.weight if module.lm_head is not None else None):
                if p is not None and p.grad is not None:
                    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    dist.all_reduce(grad, group=self.tied_group)

    # ---- clipping ---------------------------------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float) -> float:
        if max_norm == float("inf"):
            max_norm = 0.0
        """Global gradient norm over all stages and shards (a tied weight counted once), clipped to max_norm."""
        grads = []
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            duplicate = (self.config.tie_word_embeddings and self.plan.pp > 1 and name == "lm_head.weight")
            if not duplicate:
                grads.append(p.grad)
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            n = torch.linalg.vector_norm(g.float())
            if hasattr(n, "full_tensor"):
                n = n.full_tensor()
            sq = sq + n * n
        if self.pp_group is not None:
            dist.all_reduce(sq, group=self.pp_group)
        total = float(sq.sqrt())
        if max_norm > 0 and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total


def build_parallel_model(config: ModelConfig, plan: ParallelPlan, device: torch.device, *,
                         param_dtype: Optional[torch.dtype] = None, before_parallel: Optional[ModuleHook] = None,
                         seed: int = 0, init_std: Optional[float] = None) -> ParallelModel:
    """This rank's chunks of the model under `plan`, materialised on `device` and randomly initialised.

    `before_parallel` runs on each meta stage first (e.g. activation checkpointing, LoRA adapters).
    """
    validate_plan(plan, config)
    mesh = build_mesh_all_dims(plan, device.type)
    tp_mesh = mesh["tp"] if plan.tp > 1 else None
    dp_mesh = submesh(mesh, "dp_replicate", "dp_shard") if plan.dp > 1 else None
    pp_group = mesh["pp"].get_group() if plan.pp > 1 else None
    with torch.device("meta"):
        full = Qwen2Model(config)
    pp_rank = mesh.get_coordinate()[list(mesh.mesh_dim_names).index("pp")]
    stages = split_stages(full, plan, pp_rank) if plan.pp > 1 else [(0, full)]
    modules = []
    for _, module in stages:
        if before_parallel is not None:
            before_parallel(module)
        if tp_mesh is not None:
            apply_tensor_parallel(module, tp_mesh, sequence_parallel=plan.sequence_parallel)
        if dp_mesh is not None:
            apply_fsdp(module, dp_mesh, param_dtype=param_dtype, reshard_after_forward=plan.pp == 1)
        module.to_empty(device=device)
        module.tie_weights()
        torch.manual_seed(seed)
        module.init_weights(init_std)
        modules.append(module)
    tied = tied_embedding_group(mesh, plan) if config.tie_word_embeddings else None
    return ParallelModel(plan=plan, config=config, device=device, mesh=mesh, modules=modules,
                         stage_ids=[s for s, _ in stages], tp_mesh=tp_mesh, dp_mesh=dp_mesh, pp_group=pp_group,
                         tied_group=tied)


def build_mesh_all_dims(plan: ParallelPlan, device_type: str):
    """A 4-D mesh (pp, dp_replicate, dp_shard, tp), size-1 dims included, so every sub-mesh name always exists."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (plan.pp, plan.dp_replicate, plan.dp_shard, plan.tp),
                            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))
