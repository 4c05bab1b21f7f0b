"""Preference tuning (`job.mode = "dpo"`): the DPO family of objectives as a loss strategy of the one TrainStep.

A micro batch of B pairs is one [2B, T] batch: rows 0..B-1 the chosen replies, rows B..2B-1 the rejected ones, so
the two halves of a pair always share a micro batch and a data-parallel rank (the sampler hands out pairs, not
sequences). Each row's summed log-probability of its reply tokens (train/logprobs.py) is compared with the reference
model's:

    sigmoid (DPO)  -(1 - ls) log s(beta d) - ls log s(-beta d),   d = (c - c_ref) - (r - r_ref)   (ls: cDPO smoothing)
    hinge (SLiC)   relu(1 - beta d)
    ipo            (d / n - 1 / (2 beta))^2, each log-ratio divided by its reply's token count (as TRL computes it)
    simpo          -(1 - ls) log s(m) - ls log s(-m),  m = beta (c / n_c - r / n_r) - gamma   (no reference)

and the step's loss is the mean over the global batch's pairs (scaled per micro batch by dp / pairs, as the token
loss is by dp / tokens). Rewards are beta x the log-ratio (SimPO: beta x the length-normalised log-probability).
`dpo.ftx` adds ftx x the chosen replies' negative log-likelihood, a token mean over the global batch (TRL's
loss_type ["sigmoid", "sft"] with loss_weights [1, ftx]; LLaMA-Factory's pref_ftx, the RPO paper's NLL term): the
pair losses alone may lower the chosen replies' likelihood too, as long as the rejected ones fall faster.

Where the reference log-probabilities come from (`reference_kind`):
- "precomputed" (dpo.precompute_reference): one forward pass over the data before the first step, stored next to
  the data (train/dpo_reference.py) and carried by the micro batches; no second model in memory;
- "adapters-off" (LoRA): the policy itself with its adapters switched off - the base - under no_grad;
- "copy" (full fine-tuning): a frozen copy of the initial model, built and sharded exactly like the policy;
- "none" (simpo).
The reference pass runs through the same code as the policy (chunked head; vocabulary-parallel logits under tp; a
forward-only pass of a pipeline schedule under pp), before the policy's forward and backward of the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qwenlink.errors import QwenlinkError
from qwenlink.parallel.tensor import loss_context
from qwenlink.train.data import MicroBatch, PairMicroBatch
from qwenlink.train.dpo_config import LOSS_TYPES
from qwenlink.train.logprobs import row_logps_from_hidden, row_logps_from_logits
from qwenlink.train.loss import IGNORE_INDEX, head_detached

Tensor = torch.Tensor
# What every log step records (means over the global batch's pairs), in the order step_metrics returns them.
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                "logps/rejected")


@dataclass(frozen=True)
class DpoOptions:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 0.5
    ftx: float = 0.0  # weight of the chosen replies' negative log-likelihood (token mean over the global batch)


def preference_losses(opts: DpoOptions, chosen: Tensor, rejected: Tensor, ref_chosen: Optional[Tensor],
                      ref_rejected: Optional[Tensor], chosen_tokens: Tensor, rejected_tokens: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and the chosen / rejected rewards [B] from summed log-probabilities [B] (fp32) and reply
    token counts [B]."""
    beta, ls = opts.beta, opts.label_smoothing
    if opts.loss_type == "simpo":
        chosen_avg, rejected_avg = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        margin = beta * (chosen_avg - rejected_avg) - opts.gamma
        losses = -(1 - ls) * F.logsigmoid(margin) - ls * F.logsigmoid(-margin)
        return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    if opts.loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)
    elif opts.loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif opts.loss_type == "ipo":
        d = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:  # pragma: no cover - validated with the config
        raise QwenlinkError(f"dpo.loss_type {opts.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---- context parallelism: a row's log-probability is split over the cp ranks' tokens --------------------------------
class _SumOverContext(torch.autograd.Function):
    """Sum of every cp rank's partial row log-probabilities [2B], with an identity backward.

    Each cp rank then holds the whole rows' values and computes the same pair losses from them; its backward sends
    dL/d(row) into its own tokens only. FSDP2 averages the parameter gradients over the cp ranks and each rank's loss
    carries the factor cp of the step's scale (train/step.py), so the sum over ranks of these partial gradients is
    the gradient of the whole rows: an all-reduce in backward would count it cp times."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def sum_over_context(step, partial: Tensor) -> Tensor:
    """This cp rank's partial sums [2B] -> the whole rows' (identity without cp; differentiable)."""
    if step.plan.cp == 1:
        return partial
    return _SumOverContext.apply(partial, step.layout.cp_mesh.get_group())


# ---- where the reference log-probabilities come from --------------------------------------------------------------
@contextlib.contextmanager
def adapters_off(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every LoRA projection of `modules` computes its base output only (the reference of a LoRA run)."""
    from qwenlink.models.lora import LoraLinear

    lora = [m for module in modules for m in module.modules() if isinstance(m, LoraLinear)]
    for m in lora:
        m.adapter_disabled = True
    try:
        yield
    finally:
        for m in lora:
            m.adapter_disabled = False


def reference_kind(cfg, lora: Optional[object]) -> str:
    if cfg.dpo.loss_type == "simpo":
        return "none"
    if cfg.dpo.precompute_reference:
        return "precomputed"
    return "adapters-off" if lora is not None else "copy"


# ---- the objective -------------------------------------------------------------------------------------------------
class PreferenceObjective:
    """The loss strategy TrainStep delegates to for job.mode = "dpo" (see train/step.py): units are pairs, a micro
    batch's loss is its pairs' summed loss x the step's scale, and reward / log-probability sums accumulate on the
    device for `step_metrics`."""

    def __init__(self, opts: DpoOptions, kind: str, *, reference_chunks: Optional[object] = None) -> None:
        self.opts, self.kind = opts, kind
        self.reference_chunks = reference_chunks  # "copy": the frozen model; else None
        self._sums: Optional[Tensor] = None
        self._slot_sums: Optional[Tensor] = None  # under pp: [micro batches, 7], one row per micro batch
        self._reference_pass = False
        self._ref_schedules: dict[int, object] = {}
        self._ftx_scale: Tensor | float = 0.0  # dp x cp / chosen tokens in the global batch (dpo.ftx)

    # ---- units and metrics ----------------------------------------------------------------------------------------
    def units(self, batches: Sequence[MicroBatch]) -> int:
        return sum(b.input_ids.shape[0] // 2 for b in batches)

    def _accumulate(self, chosen: Tensor, rejected: Tensor, chosen_reward: Tensor, rejected_reward: Tensor,
                    slot: Optional[Tensor] = None) -> None:
        values = torch.stack([chosen_reward.sum(), rejected_reward.sum(), (chosen_reward - rejected_reward).sum(),
                              (chosen_reward > rejected_reward).float().sum(), chosen.detach().sum(),
                              rejected.detach().sum(), torch.full((), chosen.numel(), dtype=torch.float32,
                                                                  device=chosen.device)])
        if slot is not None:
            # A pipeline schedule may call the loss once more than there are micro batches (torch >= 2.12 infers
            # backward metadata with it, on placeholder outputs, before the real ones): each micro batch owns a
            # row that its real call writes last.
            self._slot_sums.index_copy_(0, slot, values[None].float())
            return
        self._sums = values if self._sums is None else self._sums + values

    def step_metrics(self, step) -> Tensor:
        """Means over the global batch's pairs of METRIC_NAMES, [6] on the device (every rank the same)."""
        from qwenlink.train.step import all_reduce_sum

        sums = self._sums if self._sums is not None else torch.zeros(7, dtype=torch.float32, device=step.device)
        if self._slot_sums is not None:
            sums = sums + self._slot_sums.sum(0)
        self._sums = self._slot_sums = None
        # Every tp and cp rank of a replica holds the same sums; under pp only the last stage has them.
        total = all_reduce_sum(sums) / (step.plan.tp * step.plan.cp)
        return total[:6] / total[6].clamp(min=1)

    # ---- the loss of one micro batch ------------------------------------------------------------------------------
    def _pair_loss(self, step, logps: Tensor, labels: Tensor, reference: Optional[Tensor],
                   slot: Optional[Tensor] = None) -> Tensor:
        """logps [2B] fp32, labels [2B, T] (host or device), reference [2B] or None -> the scaled summed loss."""
        b = logps.shape[0] // 2
        tokens = (labels != IGNORE_INDEX).sum(-1).to(logps.device, non_blocking=True).float()   # [2B]
        if step.plan.cp > 1:  # this rank's tokens of each row: the whole rows' sums, on every cp rank
            logps = sum_over_context(step, logps)
            tokens = sum_over_context(step, tokens)
        ref = (None, None) if reference is None else (reference[:b].to(logps.device), reference[b:].to(logps.device))
        losses, chosen_reward, rejected_reward = preference_losses(
            self.opts, logps[:b], logps[b:], ref[0], ref[1], tokens[:b], tokens[b:])
        self._accumulate(logps[:b], logps[b:], chosen_reward, rejected_reward, slot)
        loss = losses.sum() * step._scale
        if self.opts.ftx:
            loss = loss - self.opts.ftx * logps[:b].sum() * self._ftx_scale
        return loss

    def _row_logps(self, step, module, batch: MicroBatch, host_labels: Tensor) -> Tensor:
        """[2B] summed reply log-probabilities of one micro batch through `module` (pp = 1)."""
        if step.layout.tp_mesh is not None:
            logits = module(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
            return row_logps_from_logits(logits, batch.labels, step.layout.tp_mesh)   # logits: [2B, T, V/tp]
        with head_detached(module) as head:
            hidden = module(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        return row_logps_from_hidden(hidden, head.weight, host_labels, chunk_size=step.chunk_size)

    def micro_loss(self, step, module, batch: MicroBatch, host_labels: Tensor) -> Tensor:
        logps = self._row_logps(step, module, batch, host_labels)
        return self._pair_loss(step, logps, host_labels, getattr(batch, "reference", None))

    def head_loss(self, step, output: Tensor, target: Tensor) -> Tensor:
        """A pipeline's last-stage loss: `target` [2B, T + 2] float64 = the labels, each row's reference
        log-probability and the micro batch's index in the step (the schedule splits one target tensor per micro
        batch). In the reference pass: the [2B] log-probabilities."""
        labels = target[:, :-2].long()
        logps = row_logps_from_logits(output, labels, step.layout.tp_mesh)
        if self._reference_pass:
            return logps.detach()
        reference = None if self.kind == "none" else target[:, -2].float()
        return self._pair_loss(step, logps, labels, reference, slot=target[:1, -1].long())

    def pipeline_target(self, batches: Sequence[MicroBatch], device: torch.device) -> Tensor:
        """Labels, reference and micro-batch index columns of every micro batch, [n x 2B, T + 2] float64 (ids and
        indices < 2^53 are exact)."""
        parts = []
        for i, b in enumerate(batches):
            rows = b.labels.shape[0]
            # Assembled on the device: a reference computed this step is there already (no copy back to the host).
            ref = b.reference if getattr(b, "reference", None) is not None else torch.zeros(rows)
            slot = torch.full((rows, 1), float(i), dtype=torch.float64, device=device)
            parts.append(torch.cat([b.labels.to(device, non_blocking=True).double(),
                                    ref.to(device, non_blocking=True).double()[:, None], slot], dim=1))
        if not self._reference_pass:
            self._slot_sums = torch.zeros(len(batches), 7, dtype=torch.float32, device=device)
        return torch.cat(parts)

    # ---- the reference pass ---------------------------------------------------------------------------------------
    def prepare(self, step, batches: Sequence[MicroBatch]) -> list[MicroBatch]:
        """The step's micro batches with their reference log-probabilities attached (computed now unless they were
        precomputed or the objective needs none)."""
        if self.opts.ftx:
            self._ftx_scale = self._chosen_token_scale(step, batches)
        if self.kind in ("none", "precomputed"):
            if self.kind == "precomputed" and any(getattr(b, "reference", None) is None for b in batches):
                raise QwenlinkError("dpo.precompute_reference: a micro batch came without its reference "
                                    "log-probabilities (the precomputed file was not attached)")
            return list(batches)
        refs = self.reference_logps(step, batches)
        return [PairMicroBatch(**{f.name: getattr(b, f.name) for f in dataclasses.fields(MicroBatch)}, reference=r)
                for b, r in zip(batches, refs)]

    @staticmethod
    def _chosen_token_scale(step, batches: Sequence[MicroBatch]) -> Tensor:
        """dp x cp / (chosen reply tokens in the whole global batch), like the step's scale for pairs: counted on
        the loader's host labels (whole rows), summed on the device (every tp / pp / cp rank counts its replica's)."""
        from qwenlink.train.step import all_reduce_sum

        mine = sum(int((b.labels[:b.labels.shape[0] // 2] != IGNORE_INDEX).sum()) for b in batches)
        total = all_reduce_sum(torch.full((), mine, dtype=torch.int64, device=step.device)).to(torch.float32)
        total = total / (step.plan.tp * step.plan.pp * step.plan.cp)
        return step.plan.dp_cp / total.clamp(min=1)

    @torch.no_grad()
    def reference_logps(self, step, batches: Sequence[MicroBatch], *, policy: bool = False) -> list[Tensor]:
        """[2B] fp32 reference log-probabilities of each micro batch, on every rank, without gradients. `policy`:
        use the policy model as it is now (the precompute pass, before the first update)."""
        if self.kind == "copy" and not policy:
            chunks, context = self.reference_chunks, contextlib.nullcontext()
        else:
            chunks = step.chunks
            context = adapters_off(chunks.modules) if self.kind in ("adapters-off", "precomputed") else \
                contextlib.nullcontext()
        was_training = [m.training for m in chunks.modules]
        for m in chunks.modules:
            m.eval()  # no LoRA dropout in the reference
        try:
            with context:
                if step.plan.pp > 1:
                    return self._pipeline_reference(step, chunks, batches)
                out = []
                for host in batches:
                    host = step.context_shard(host)
                    batch = host.to(step.device)
                    with loss_context(step.layout.tp_mesh):
                        logps = self._row_logps(step, chunks.modules[0], batch, host.labels).float()
                    out.append(sum_over_context(step, logps))
                return out
        finally:
            for m, training in zip(chunks.modules, was_training):
                m.train(training)

    def _run_forward_only(self, step, chunks, padded: Sequence[MicroBatch]) -> list[Tensor]:
        """One forward-only pass of `chunks`' schedule; the last stage gets one [2B] vector per micro batch."""
        from qwenlink.parallel.pipeline import build_schedule

        input_ids = torch.cat([b.input_ids for b in padded]).to(step.device, non_blocking=True)
        target = self.pipeline_target(padded, step.device)
        n = len(padded)
        if chunks is step.chunks:
            schedule = step.schedule_for(n)
        else:
            key = (id(chunks), n)
            schedule = self._ref_schedules.get(key)
            if schedule is None:
                stages = list(zip(chunks.stage_ids, chunks.modules))
                schedule = build_schedule(step.plan, stages, device=step.device, pp_group=step.layout.pp_group,
                                          n_microbatches=n, loss_fn=step._head_loss)
                self._ref_schedules[key] = schedule
        losses: list[Tensor] = []
        has_backward = schedule._has_backward
        schedule._has_backward = False  # forward only (Schedule.eval does this too, on torch versions that have it)
        try:
            with loss_context(step.layout.tp_mesh):
                if chunks.has_first_stage:
                    schedule.step(input_ids, target=target if chunks.has_last_stage else None, losses=losses)
                elif chunks.has_last_stage:
                    schedule.step(target=target, losses=losses)
                else:
                    schedule.step()
        finally:
            schedule._has_backward = has_backward
        return losses

    def _pipeline_reference(self, step, chunks, batches: Sequence[MicroBatch]) -> list[Tensor]:
        """A forward-only pass of a pipeline schedule over `chunks`; the last stage's [2B] vectors are summed into
        every pipeline rank (zeros elsewhere)."""
        from qwenlink.train.step import pad_to_length

        saved, self._reference_pass = self._reference_pass, True
        try:
            padded = [step.context_shard(b) for b in pad_to_length(batches, step.seq_length, step.pad_id)]
            # The policy's stages select per micro batch inputs; they must be this pass's, not the previous step's
            # (a step with more micro batches than the last one indexed past them: qwenlink plan's second step).
            step.load_stage_inputs(padded)
            losses = self._run_forward_only(step, chunks, padded)
        finally:
            self._reference_pass = saved
        rows = sum(b.input_ids.shape[0] for b in padded)
        flat = torch.cat([x.float() for x in losses]) if losses else \
            torch.zeros(rows, dtype=torch.float32, device=step.device)
        dist.all_reduce(flat, group=step.layout.pp_group)  # only the last stage had them
        flat = sum_over_context(step, flat)  # each cp rank's tokens of the rows
        return list(flat.split([b.input_ids.shape[0] for b in padded]))


def options_of(cfg) -> DpoOptions:
    return DpoOptions(beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type, label_smoothing=cfg.dpo.label_smoothing,
                      gamma=cfg.dpo.gamma, ftx=cfg.dpo.ftx)


def build_objective(cfg, lora: Optional[object], make_reference: Callable[[], object]) -> PreferenceObjective:
    """The job's preference objective; `make_reference` builds the frozen full copy (only called for "copy")."""
    kind = reference_kind(cfg, lora)
    reference_chunks = None
    if kind == "copy":
        reference_chunks = make_reference()
        for param in reference_chunks.state_module.parameters():
            param.requires_grad_(False)
    return PreferenceObjective(options_of(cfg), kind, reference_chunks=reference_chunks)
