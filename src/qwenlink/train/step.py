"""One optimizer step's computation for every layout: micro batches -> loss -> backward -> global gradient norm.

The same `TrainStep` serves one process and any pp x dp x tp layout; what differs is data, not code paths:
- the loss: the chunked head + cross entropy (train/loss.py) when this rank holds the whole vocabulary, the
  vocabulary-parallel cross entropy when the head is tensor parallel; or, with an `objective` (job.mode = "dpo",
  train/dpo.py), its loss over the same two paths, counted in its own units (pairs) instead of tokens;
- backward: micro batches one by one (FSDP2 reduces gradients only after the last), or all of them through the
  pipeline schedule when pp > 1.
Each micro batch's loss is its summed token cross entropy x dp x cp / (valid tokens in the whole global batch):
FSDP2 averages gradients over the dp x cp ranks (a context-parallel rank holds its own tokens of every micro batch,
`context_shard`), so the result is exactly the gradient of the global-batch mean loss, as one process computes it. Reductions are made on tensors on the training device (NCCL has no CPU path).

Nothing in a step synchronises the host with the device: labels are counted and masked on the host (they come from
the loader's CPU tensors), batches are copied with non_blocking, and the loss, the gradient norm and the decision to
skip a non-finite update stay device tensors (`step_if_finite`); the trainer reads them once per log interval.
tests/parallel/test_fake_cuda_step.py holds the step to that on fake CUDA tensors (qwenlink.parallel.simulate).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qwenlink.errors import QwenlinkError
from qwenlink.models.documents import DocumentMask
from qwenlink.parallel.context import pad_multiple, shard_sequence
from qwenlink.parallel.data import set_gradient_sync
from qwenlink.parallel.parallelize import Layout, ModelChunks
from qwenlink.parallel.pipeline import MicroBatchInputs, build_schedule
from qwenlink.parallel.tensor import loss_context, vocab_parallel_loss
from qwenlink.train.data import MicroBatch
from qwenlink.train.loss import IGNORE_INDEX, model_loss
from qwenlink.train.moe import RouterAuxLoss, RoutingCarry

Tensor = torch.Tensor


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum a device tensor over all processes (identity in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value


def pad_to_length(batches: Sequence[MicroBatch], length: int, pad_id: int, *,
                  keep_documents: bool = False) -> list[MicroBatch]:
    """Right-pad micro batches to exactly `length` tokens: a pipeline schedule splits one tensor into equal micro
    batches and its stages fix their send/receive shapes at the first step, so every step must have the same shape.
    Columns past `length` (SFT rounds widths up to data.pad_to_multiple_of) hold only padding and are cut.
    keep_documents: a `DocumentMask` and positions are padded / cut along (the pads form a document of their own);
    otherwise both are dropped (right padding needs no mask: causal attention never looks ahead at the pads).
    The token mask (what a mixture of experts' aux loss counts) leaves the added pads out."""
    out = []
    for b in batches:
        extra = length - b.input_ids.shape[1]
        ids, labels = b.input_ids[:, :length], b.labels[:, :length]
        token_mask = b.token_mask[:, :length] if b.token_mask is not None else None
        if extra > 0:
            ids = F.pad(ids, (0, extra), value=pad_id)
            labels = F.pad(labels, (0, extra), value=IGNORE_INDEX)
            real = token_mask if token_mask is not None else torch.ones(b.input_ids.shape, dtype=torch.long)
            token_mask = F.pad(real, (0, extra), value=0)  # [B, length]
        docs = b.attention_mask if keep_documents and isinstance(b.attention_mask, DocumentMask) else None
        positions = b.position_ids if keep_documents else None
        if docs is not None:
            docs = pad_documents(docs, length)
        if positions is not None:
            positions = F.pad(positions[:, :length], (0, max(extra, 0)), value=0)
        out.append(dataclasses.replace(b, input_ids=ids, labels=labels, position_ids=positions, attention_mask=docs,
                                       token_mask=token_mask))
    return out


def pad_documents(docs: DocumentMask, length: int) -> DocumentMask:
    """`docs` [B, T] as [B, length]: cut, or extended by one more document of pads (host boundaries, no sync)."""
    ids = docs.doc_ids[:, :length]  # [B, min(T, length)]
    extra = length - ids.shape[1]
    if extra > 0:
        ids = torch.cat([ids, (ids[:, -1:] + 1).expand(-1, extra)], dim=1)  # [B, length]
    bounds = [sorted({min(x, length) for x in row} | {length}) for row in docs.bounds]
    return DocumentMask(ids, bounds)


class TrainStep:
    """Forward and backward of one optimizer step's micro batches, gradient clipping and the validation loss."""

    def __init__(self, chunks: ModelChunks, layout: Layout, *, chunk_size: int, seq_length: int,
                 pad_id: int, objective: object = None) -> None:
        self.chunks, self.layout, self.plan = chunks, layout, layout.plan
        # None: token cross entropy; job.mode = "dpo": train/dpo.py's PreferenceObjective (pairs, not tokens)
        self.objective = objective
        self.device = layout.device
        self.chunk_size, self.seq_length, self.pad_id = chunk_size, seq_length, pad_id
        self._schedules: dict[int, object] = {}
        self._stage_inputs = MicroBatchInputs()  # per micro batch documents / positions for the pipeline stages
        if self.plan.pp > 1:
            for module in chunks.modules:
                self._stage_inputs.attach(module)
        self._scale: Tensor | float = 1.0
        # A mixture of experts' load-balancing term (train/moe.py), set by the trainer for MoE models.
        self.router_aux: Optional[RouterAuxLoss] = None
        # Under a pipeline: the routing totals the stages carry (attached at the first pipelined step), and per call
        # of the last stage's loss its (LM loss, aux x valid, expert load)
        self._routing_carry: Optional[RoutingCarry] = None
        self._carried: list[tuple[Tensor, Tensor, Tensor]] = []

    # ---- the loss ---------------------------------------------------------------------------------------------------
    def count_valid(self, batches: Sequence[MicroBatch]) -> Tensor:
        """Tokens with a label in the whole global batch (every tp/pp rank of a replica sees the same batches)."""
        mine = self.objective.units(batches) if self.objective is not None else \
            sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)  # the loader's host labels: no sync
        # torch.full writes the value with a kernel; torch.tensor(value, device=...) would be a blocking copy.
        # Counted in int64 (exact, and reducible on every backend), used as fp32.
        total = all_reduce_sum(torch.full((), mine, dtype=torch.int64, device=self.device))
        return total.to(torch.float32) / (self.plan.tp * self.plan.pp * self.plan.cp)  # cp ranks count whole batches

    def context_shard(self, batch: MicroBatch) -> MicroBatch:
        """This context-parallel rank's tokens of a host micro batch (a head and a tail chunk, parallel/context.py);
        the batch itself without cp. Unpacked SFT widths are right-padded to a multiple of 2 x cp (x tp under
        sequence parallelism) first: pads carry no label and causal attention never looks ahead at them."""
        cp = self.plan.cp
        if cp == 1:
            return batch
        extra = -batch.input_ids.shape[1] % pad_multiple(cp, self.plan.tp, self.plan.sequence_parallel)
        if extra:
            if batch.attention_mask is not None or batch.position_ids is not None:
                raise ValueError(f"context parallelism: a {batch.input_ids.shape[1]}-token batch with documents or "
                                 f"positions cannot be padded (data.seq_length is validated to split evenly)")
            batch = dataclasses.replace(batch, input_ids=F.pad(batch.input_ids, (0, extra), value=self.pad_id),
                                        labels=F.pad(batch.labels, (0, extra), value=IGNORE_INDEX))
        rank = self.layout.cp_rank
        return dataclasses.replace(batch, input_ids=shard_sequence(batch.input_ids, cp, rank),
                                   labels=shard_sequence(batch.labels, cp, rank),
                                   position_ids=shard_sequence(batch.position_ids, cp, rank))

    def _head_loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """Scaled summed CE of the last stage's logits: vocabulary-parallel with tp, full logits otherwise."""
        if self.objective is not None:
            return self.objective.head_loss(self, output, labels)
        if self.layout.tp_mesh is not None:
            return vocab_parallel_loss(output, labels, self.layout.tp_mesh, scale=self._scale)
        return F.cross_entropy(output.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") * self._scale

    def _micro_loss(self, batch: MicroBatch, host_labels: Tensor) -> Tensor:
        """`batch` on the device; `host_labels` the same labels where the loader made them (the chunked loss finds
        the valid positions there, without waiting for the device)."""
        module = self.chunks.modules[0]
        if self.objective is not None:
            return self.objective.micro_loss(self, module, batch, host_labels)
        if self.layout.tp_mesh is not None:
            logits = module(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
            return self._head_loss(logits, batch.labels)  # logits: this rank's vocabulary slice [B, T, V/tp]
        loss, _ = model_loss(module, batch.input_ids, host_labels, scale=self._scale, chunk_size=self.chunk_size,
                             position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        return loss

    # ---- forward and backward ---------------------------------------------------------------------------------------
    def forward_backward(self, batches: Sequence[MicroBatch], total_valid: Tensor) -> Tensor:
        """Accumulate the gradients of the global-batch mean loss over this rank's micro batches; returns that loss
        (the same on every rank, a device tensor: reading it is the caller's one host synchronisation)."""
        self._scale = self.plan.dp_cp / total_valid.clamp(min=1).to(torch.float32)
        if self.router_aux is not None:
            self.router_aux.begin_step(self.device)
        if self.objective is not None:
            batches = self.objective.prepare(self, batches)  # e.g. the reference model's log-probabilities
        if self.plan.pp > 1:
            share = self._pipeline(batches)
        else:
            share = torch.zeros((), dtype=torch.float32, device=self.device)
            modules = self.chunks.modules
            for i, host in enumerate(batches):
                host = self.context_shard(host)
                batch = host.to(self.device)  # non_blocking
                set_gradient_sync(modules, i == len(batches) - 1)  # FSDP2: reduce-scatter after the last only
                with loss_context(self.layout.tp_mesh):
                    loss = self._micro_loss(batch, host.labels)
                objective = loss
                if self.router_aux is not None:  # reported apart: `share` stays the LM loss
                    objective = loss + self.router_aux.term(modules[0], host.token_mask,
                                                            int((host.labels != IGNORE_INDEX).sum()), self._scale)
                with loss_context(self.layout.tp_mesh):
                    objective.backward()
                share += loss.detach().float()
        self._sync_tied_gradients()
        # Each replica's (and cp shard's) share is dp x cp x its part of the mean; every tp and pp rank of a replica
        # holds the same value.
        # A preference objective's loss is a function of whole rows, summed over cp first: every cp rank holds all of it.
        copies = self.plan.cp if self.objective is not None else 1
        return all_reduce_sum(share / (self.plan.dp_cp * copies)) / (self.plan.tp * self.plan.pp)

    def load_stage_inputs(self, batches: Sequence[MicroBatch]) -> None:
        """Documents and positions reach every stage from its own copy of the micro batches (parallel/pipeline.py):
        load those of the schedule about to run, one entry per micro batch. A mixture of experts' stages also read
        each micro batch's token mask and labelled tokens (host values: no synchronisation) for the routing carry."""
        move = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        extras = [{"token_mask": move(b.token_mask), "valid": int((b.labels != IGNORE_INDEX).sum())}
                  for b in batches] if self.router_aux is not None else None
        self._stage_inputs.load([{k: v.to(self.device, non_blocking=True)
                                  for k, v in (("attention_mask", b.attention_mask), ("position_ids", b.position_ids))
                                  if v is not None}
                                 for b in batches], extras)

    def carry_routing(self) -> None:
        """A mixture of experts under a pipeline: make every stage module send its routing totals on with the hidden
        states (train/moe.py `RoutingCarry`), once, before the first schedule runs."""
        if self.router_aux is None or self._routing_carry is not None:
            return
        if self.objective is not None:
            raise QwenlinkError("parallel.pp > 1: a preference objective (job.mode = dpo) on a mixture-of-experts "
                                "model is not pipelined yet; use parallel.pp = 1")
        self._routing_carry = RoutingCarry(self.router_aux.layers, self.router_aux.num_experts, self._stage_inputs)
        for module in self.chunks.modules:
            self._routing_carry.attach(module)

    def _stage_loss(self, output: Tensor | tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        """The pipeline's loss on the last stage: the head's, plus a mixture of experts' aux term from the routing
        totals the stages carried to it. Each call's LM loss and aux parts are kept for `_pipeline`."""
        if not isinstance(output, tuple):
            return self._head_loss(output, target)
        output, carry = output
        loss = self._head_loss(output, target)
        term, weighted, load = self.router_aux.carried_term(carry, self._scale)
        self._carried.append((loss.detach().float(), weighted, load))
        return loss + term

    def _pipeline(self, batches: Sequence[MicroBatch]) -> Tensor:
        """All micro batches through the schedule at once. Documents and their positions do not cross stage
        boundaries: every stage gets them from this rank's copy of the micro batch it computes; right padding needs no
        mask (causal attention never looks ahead at the pads). Returns the summed scaled loss (on every pipeline
        rank)."""
        batches = [self.context_shard(b) for b in pad_to_length(batches, self.seq_length, self.pad_id,
                                                                 keep_documents=True)]
        self.carry_routing()
        self._carried.clear()
        self.load_stage_inputs(batches)
        input_ids = torch.cat([b.input_ids for b in batches]).to(self.device, non_blocking=True)  # [n x b, T]
        labels = torch.cat([b.labels for b in batches]).to(self.device, non_blocking=True) \
            if self.objective is None else self.objective.pipeline_target(batches, self.device)
        schedule = self.schedule_for(len(batches))
        losses: list[Tensor] = []
        # The last stage would otherwise keep every micro batch's logits for the whole step and concatenate them
        # (at 72B: [1, 8192, V/tp] bf16 = 311 MiB each, x the micro batches, twice); only the losses are needed.
        keep = {"return_outputs": False} if "return_outputs" in inspect.signature(schedule.step).parameters else {}
        with loss_context(self.layout.tp_mesh):
            if self.chunks.has_first_stage:
                schedule.step(input_ids, target=labels if self.chunks.has_last_stage else None, losses=losses,
                              **keep)
            elif self.chunks.has_last_stage:
                schedule.step(target=labels, losses=losses, **keep)
            else:
                schedule.step(**keep)
        if self._routing_carry is not None and self.chunks.has_last_stage:
            # the schedule's first step also ran the loss once on uninitialised tensors (shape inference), before
            # the micro batches: only the last len(batches) calls are theirs
            calls = self._carried[-len(batches):]
            for _, weighted, load in calls:
                self.router_aux.add(weighted, load)
            losses = [lm for lm, _, _ in calls]  # the LM loss alone (aux is reported apart)
            self._carried.clear()
        total = torch.stack([loss.detach().float() for loss in losses]).sum() if losses else \
            torch.zeros((), dtype=torch.float32, device=self.device)
        dist.all_reduce(total, group=self.layout.pp_group)  # only the last stage had it
        return total

    def schedule_for(self, n: int):
        """The pipeline schedule of this rank's chunks for `n` micro batches (built once per count)."""
        schedule = self._schedules.get(n)
        if schedule is None:
            stages = list(zip(self.chunks.stage_ids, self.chunks.modules))
            schedule = build_schedule(self.plan, stages, device=self.device, pp_group=self.layout.pp_group,
                                      n_microbatches=n, loss_fn=self._stage_loss, inputs=self._stage_inputs)
            self._schedules[n] = schedule
        return schedule

    def _sync_tied_gradients(self) -> None:
        """Sum the gradients of the first stage's embedding and the last stage's (tied) lm_head."""
        if self.layout.tied_group is None:
            return
        for module in self.chunks.modules:
            for part in (module.embed_tokens, module.lm_head):
                grad = part.weight.grad if part is not None else None
                if grad is not None:
                    dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad,
                                    group=self.layout.tied_group)

    # ---- clipping ---------------------------------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """The global L2 norm of all gradients (every stage and shard; a head tied across stages counted once),
        clipped to `max_norm` when it is finite and positive.

        One all-reduce of one number per step, over all ranks: each rank adds the squares of its local gradient
        shards, each weighted by 1 / (how many ranks hold the same shard: the sizes of the mesh dimensions it is
        replicated over), so the sum over the world counts every element once. Gradients still pending a sum over
        tensor-parallel ranks (Partial: norm weights under sequence parallelism) are summed first - the optimizer
        needs them summed anyway. Scaling is computed on the device too (no host synchronisation)."""
        from torch.distributed.tensor import DTensor, Partial, Replicate

        duplicate = self.chunks.tied_head_copy() if self.layout.tied_group is not None else None
        groups: dict[tuple, list[Tensor]] = {}  # local gradients by their weight and kind (one foreach norm each)
        params = []
        for _, param in self.chunks.named_parameters():
            grad = param.grad
            if grad is None:
                continue
            params.append(param)
            if param is duplicate:
                continue
            weight = 1.0
            if isinstance(grad, DTensor):
                if any(isinstance(p, Partial) for p in grad.placements):
                    grad = param.grad = grad.redistribute(
                        placements=[Replicate() if isinstance(p, Partial) else p for p in grad.placements])
                for size, placement in zip(grad.device_mesh.shape, grad.placements):
                    if isinstance(placement, Replicate):
                        weight /= size
                if self.plan.tp > 1 and "tp" not in (grad.device_mesh.mesh_dim_names or ()):
                    weight /= self.plan.tp  # FSDP2 over dp only, the same on every tp rank (MoE router, experts)
                grad = grad.to_local()
            elif self.plan.world_size > 1:
                weight /= self.plan.tp  # a plain tensor under tp (a norm without sequence parallelism): on every tp rank
            groups.setdefault((weight, grad.dtype, grad.device), []).append(grad)
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for (weight, _, _), grads in groups.items():
            norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
            squares = squares + norm.float() ** 2 * weight
        total = all_reduce_sum(squares).sqrt()
        if 0 < max_norm < float("inf"):
            by_kind: dict[tuple, list[torch.nn.Parameter]] = {}  # foreach needs one tensor type / mesh per call
            for param in params:
                grad = param.grad
                key = (type(grad), getattr(grad, "device_mesh", None), tuple(getattr(grad, "placements", ())))
                by_kind.setdefault(key, []).append(param)
            for same in by_kind.values():
                torch.nn.utils.clip_grads_with_norm_(same, max_norm, total, foreach=True)
        return total

    # ---- validation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, batch: MicroBatch) -> tuple[Tensor, Tensor]:
        """Summed validation loss and valid-token count of one micro batch, this rank's share (pp must be 1)."""
        host = self.context_shard(batch)
        batch = host.to(self.device)
        saved, self._scale = self._scale, 1.0
        try:
            with loss_context(self.layout.tp_mesh):
                loss = self._micro_loss(batch, host.labels).float()
        finally:
            self._scale = saved
        count = (batch.labels != IGNORE_INDEX).sum().to(torch.float32)
        return loss, count


# ---- the update -----------------------------------------------------------------------------------------------------
def step_if_finite(optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
    """`optimizer.step()`, which changes nothing (parameters, moments, step count) when the 0-dim device tensor
    `finite` is False, decided on the device.

    The fused Adam(W) kernels take GradScaler's `found_inf` tensor and skip the update themselves, so the host never
    waits. The foreach / for-loop implementations (optim.implementation) cannot: for them the flag is read on the
    host, one synchronisation per step.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False) and \
            all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = (~finite).to(torch.float32)  # the attribute GradScaler sets for these optimizers
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()
