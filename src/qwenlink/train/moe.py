"""Training a mixture of experts (Qwen1.5-MoE): the router's load-balancing loss in the trainer's loss, and what a MoE
job may not combine yet (expert parallelism itself is parallel/experts.py).

The loss a MoE step minimises is, as transformers' `Qwen2MoeForCausalLM(labels=..., output_router_logits=True)`
computes it for one batch, LM loss + router_aux_loss_coef x aux, where aux is the Switch load-balancing loss over all
sparse layers of that forward (models/qwen2_moe.py). The trainer normalises the LM loss over the whole global batch
(sum of token losses / valid tokens, train/step.py); each micro batch's aux enters with the weight of its valid
tokens in that batch, so one micro batch gives exactly transformers' loss and gradient accumulation averages aux
the way it averages the LM loss. The LM loss and aux are reported separately (`loss`, `aux_loss`); the reported
aux is that token-weighted mean, without the coefficient. Padding (right-padded SFT rows) is left out of aux through
the batch's token mask, as transformers leaves it out through the attention mask.

Expert load: every sparse layer's tokens per expert (top-k assignments of real tokens) are summed on the device over
the step's micro batches and, in the same all-reduce as aux, over all ranks; the metrics report per layer the busiest
expert's load over the mean load (1.0 = perfectly balanced; E / k = every token on the same k experts), read with the
loss once per log interval. Under expert parallelism the busiest expert's rank computes that many times the average
rows, which is what bounds an ep step's time.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2_moe import (SparseMoeBlock, balance_loss, block_routing, load_balancing_loss,
                                       record_routing)
from qwenlink.parallel.pipeline import MicroBatchInputs

Tensor = torch.Tensor


def layer_index(module_name: str) -> int:
    """The decoder layer of a module name: `layers.3.mlp` (wrappers in between allowed) -> 3."""
    parts = module_name.split(".")
    return int(parts[parts.index("layers") + 1])


@torch.no_grad()
def expert_load(model: nn.Module, token_mask: Optional[Tensor], layers: list[int], num_experts: int) -> Tensor:
    """Tokens routed to each expert in the last forward, per sparse layer: [len(layers), E] fp32 on the device (a
    layer this module does not hold stays 0). `token_mask` [B, T] (1 = real token) leaves padding out."""
    row = {layer: i for i, layer in enumerate(layers)}
    load = None
    for name, block in model.named_modules():
        if not isinstance(block, SparseMoeBlock) or block.routing is None:
            continue
        _, expert_ids = block.routing  # [N, k]
        if load is None:
            load = torch.zeros(len(layers), num_experts, dtype=torch.float32, device=expert_ids.device)
        ones = torch.ones(expert_ids.numel(), dtype=torch.float32, device=expert_ids.device)
        if token_mask is not None:  # non_blocking: the loader's host mask, no wait for the device
            ones = token_mask.reshape(-1).to(expert_ids.device, non_blocking=True).to(torch.float32) \
                .repeat_interleave(expert_ids.shape[1])
        load[row[layer_index(name)]].scatter_add_(0, expert_ids.reshape(-1), ones)
    return load


def sparse_layers(config: ModelConfig) -> list[int]:
    """The global indices of the model's sparse (mixture-of-experts) layers."""
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


class RouterAuxLoss:
    """The aux term of each micro batch's loss, the step's token-weighted mean aux and the step's expert load for the
    metrics."""

    def __init__(self, coef: float, layers: Optional[list[int]] = None, num_experts: int = 0, copies: int = 1) -> None:
        self.coef = coef
        # ranks that route the same tokens (tp: every tp rank routes the whole sequence, parallel/tensor.py), whose
        # identical sums the all-reduce adds `copies` times
        self.copies = copies
        self.layers = list(layers or [])  # the model's sparse layers (global indices)
        self.num_experts = num_experts
        self._weighted: Optional[Tensor] = None  # this rank's sum over micro batches of aux x valid tokens
        self._load: Optional[Tensor] = None  # [len(layers), E] this rank's tokens per expert, summed over the step
        self.step_load: Optional[Tensor] = None  # the same summed over all ranks, after `step_mean`

    @classmethod
    def for_model(cls, model: nn.Module, config: ModelConfig, copies: int = 1) -> Optional["RouterAuxLoss"]:
        """None for a dense model; for a MoE model, also makes its sparse layers keep their routing. `copies`: the
        tensor-parallel size (tp ranks route the same tokens)."""
        if not config.is_moe:
            return None
        record_routing(model)
        return cls(config.router_aux_loss_coef, sparse_layers(config), config.num_experts, copies)

    def begin_step(self, device: torch.device) -> None:
        self._weighted = torch.zeros((), dtype=torch.float32, device=device)
        self._load = torch.zeros(len(self.layers), self.num_experts, dtype=torch.float32, device=device)

    def term(self, model: nn.Module, token_mask: Optional[Tensor], valid: int, scale: Tensor | float) -> Tensor:
        """coef x aux x valid x scale for the forward just run (scale: the trainer's dp / valid tokens in the global
        batch), the micro batch's share of coef x (token-weighted mean aux). 0 without a sparse layer (a pipeline
        stage that holds only dense layers)."""
        aux = load_balancing_loss(model, token_mask)
        if aux is None:
            return torch.zeros((), dtype=torch.float32, device=self._weighted.device)
        self._weighted = self._weighted + aux.detach() * valid
        if self.layers:
            self._load += expert_load(model, token_mask, self.layers, self.num_experts)
        return aux * (self.coef * valid) * scale

    def carried_term(self, carry: Tensor, scale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """The pipeline's last stage: (coef x aux x valid x scale, aux x valid detached, expert load [layers, E]) of
        one micro batch from the totals every stage added to its carry (`RoutingCarry`). Pure: the schedule also
        calls the loss once on uninitialised tensors to learn shapes, so the step adds only its micro batches'
        results (`add`)."""
        probs_sum, load, rows, valid = RoutingCarry.unpack(carry, len(self.layers), self.num_experts)
        aux = balance_loss(load.sum(0), probs_sum, rows)
        return aux * (self.coef * valid) * scale, aux.detach() * valid, load.detach()

    def add(self, weighted: Tensor, load: Tensor) -> None:
        """Count one micro batch's `carried_term` results in the step."""
        self._weighted = self._weighted + weighted
        self._load += load

    def step_mean(self, total_valid: Tensor) -> Tensor:
        """The step's aux (token-weighted mean over the global batch's micro batches), a device tensor. The same
        all-reduce sums the expert load over the ranks (`step_load`, `load_max_over_mean`)."""
        packed = torch.cat([self._weighted.reshape(1), self._load.flatten()])  # [1 + layers x E]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        if self.copies > 1:
            packed = packed / self.copies
        self.step_load = packed[1:].view(len(self.layers), self.num_experts)
        return packed[0] / total_valid.clamp(min=1)

    def load_max_over_mean(self) -> Tensor:
        """Per sparse layer, the busiest expert's tokens over the mean tokens per expert in the step just reduced:
        [len(layers)] on the device (1.0 balanced; 0 for a layer that saw no token)."""
        load = self.step_load
        return load.amax(dim=1) / load.mean(dim=1).clamp(min=1e-9) * (load.sum(dim=1) > 0)


class RoutingCarry:
    """Pipeline parallelism: a micro batch's routing totals so far, sent from stage to stage with the hidden states.

    aux is not a sum of per-layer terms: it multiplies totals over all sparse layers of the forward, and each stage
    holds some of the layers. So every stage adds its layers' totals to the ones it received and sends the sum on as
    a second output next to the hidden states; the last stage computes aux from the whole model's totals in its
    loss (`RouterAuxLoss.carried_term`), and the schedule's backward returns d loss / d totals to the earlier stages
    with the hidden states' gradient, reaching their routers through the probability sums (the counts and rows are
    not differentiable, as in transformers). Exact: the stages add layer by layer in the order one process does.

    The carry is one fp32 tensor [E + L x E + 2] (L: the model's sparse layers): router probability summed per expert
    [E] | tokens per expert per sparse layer [L, E] (summed over layers: aux's counts; per layer: the expert load
    metrics, so they reach the last stage too and nothing is counted twice) | rows | the micro batch's labelled
    tokens (aux's weight in the step, counted on the host by the first stage).

    Forward hooks on the stage module after FSDP2, not model arguments: FSDP2 casts a module's floating inputs to
    its compute dtype, and bf16 would round the counts; the pre-hook is prepended, so it takes the carry off the
    arguments before FSDP2 sees them. `inputs` (the step's per micro batch selection) gives the token mask and the
    labelled tokens of the micro batch being computed."""

    def __init__(self, layers: list[int], num_experts: int, inputs: MicroBatchInputs) -> None:
        self.row = {layer: i for i, layer in enumerate(layers)}
        self.num_experts = num_experts
        self.inputs = inputs

    @property
    def size(self) -> int:
        return self.num_experts * (1 + len(self.row)) + 2

    @staticmethod
    def unpack(carry: Tensor, layers: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(probs_sum [E], load [L, E], rows, valid) views of a carry."""
        e = num_experts
        return carry[:e], carry[e:e * (1 + layers)].view(layers, e), carry[-2], carry[-1]

    def attach(self, module: nn.Module) -> None:
        """Make a stage module take (hidden, carry) - or token ids on the first stage - and return (output, carry)."""
        first = getattr(module, "embed_tokens", None) is not None
        received: list[Tensor] = []

        def take(_module: nn.Module, args: tuple, kwargs: dict):
            if first:
                return None
            hidden, carry = args  # [B, T, H], [size]
            received.append(carry)
            return (hidden,), kwargs

        def add(_module: nn.Module, _args: tuple, _kwargs: dict, output: Tensor):
            carry = received.pop() if received else None
            return output, self.add_stage(_module, carry, output.device)

        module.register_forward_pre_hook(take, prepend=True, with_kwargs=True)
        module.register_forward_hook(add, with_kwargs=True)

    def add_stage(self, module: nn.Module, carry: Optional[Tensor], device: torch.device) -> Tensor:
        """`carry` (None on the first stage) plus the routing of `module`'s sparse layers in their last forward."""
        e, layers = self.num_experts, len(self.row)
        token_mask = self.inputs.extra.get("token_mask")
        if carry is None:
            carry = torch.zeros(self.size, dtype=torch.float32, device=device)
            valid = torch.full((1,), float(self.inputs.extra.get("valid", 0)), device=device)  # a kernel, no copy
        else:
            valid = carry[-1:]
        probs_sum, load, rows, _ = self.unpack(carry, layers, e)
        own = torch.zeros(layers, e, dtype=torch.float32, device=device)  # this stage's layers' rows
        for name, block in module.named_modules():
            if not isinstance(block, SparseMoeBlock) or block.routing is None:
                continue
            counts, layer_probs, n = block_routing(block, token_mask)
            own[self.row[layer_index(name)]] = counts
            probs_sum = probs_sum + layer_probs
            rows = rows + n
        return torch.cat([probs_sum, (load + own).flatten(), rows.reshape(1), valid])  # [size]


def check_moe_job(model_config: ModelConfig, plan, lora_targets: tuple[str, ...], export_adapter: str) -> None:
    """Refuse, before anything is built, what a MoE job cannot run yet (one line naming the setting)."""
    if not model_config.is_moe:
        return
    cp = getattr(plan, "cp", 1)
    if cp > 1:
        raise QwenlinkError(f"parallel.cp = {cp}: a mixture-of-experts model ({model_config.num_experts} experts) "
                            f"trains with data, expert, tensor and pipeline parallelism only so far (context "
                            f"parallelism for MoE is not implemented)")
    mlp = [t for t in lora_targets if t in ("gate_proj", "up_proj", "down_proj")]
    if export_adapter and mlp:
        raise QwenlinkError(f"lora.export_adapter: adapters on a mixture of experts' feed-forward ({', '.join(mlp)}: "
                            f"routed and shared experts) have no PEFT format; export the merged model with "
                            f"checkpoint.export_hf, or target attention projections only")
