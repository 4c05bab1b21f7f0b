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
from qwenlink.models.qwen2_moe import SparseMoeBlock, load_balancing_loss, record_routing

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
        layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        return cls(config.router_aux_loss_coef, layers, config.num_experts, copies)

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


def check_moe_job(model_config: ModelConfig, plan, lora_targets: tuple[str, ...], export_adapter: str) -> None:
    """Refuse, before anything is built, what a MoE job cannot run yet (one line naming the setting)."""
    if not model_config.is_moe:
        return
    for name in ("pp", "cp"):
        size = getattr(plan, name, 1)
        if size > 1:
            raise QwenlinkError(f"parallel.{name} = {size}: a mixture-of-experts model ({model_config.num_experts} "
                                f"experts) trains with data, expert and tensor parallelism only so far (pipeline and "
                                f"context parallelism for MoE are not implemented)")
    mlp = [t for t in lora_targets if t in ("gate_proj", "up_proj", "down_proj")]
    ep = getattr(plan, "ep", 1)
    if ep > 1 and mlp:
        raise QwenlinkError(f"parallel.ep = {ep}: LoRA adapters on the experts ({', '.join(mlp)}) are not "
                            f"expert-parallel yet; target attention projections only, or use parallel.ep = 1")
    if export_adapter and mlp:
        raise QwenlinkError(f"lora.export_adapter: adapters on a mixture of experts' feed-forward ({', '.join(mlp)}: "
                            f"routed and shared experts) have no PEFT format; export the merged model with "
                            f"checkpoint.export_hf, or target attention projections only")
