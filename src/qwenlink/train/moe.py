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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2_moe import load_balancing_loss, record_routing

Tensor = torch.Tensor


class RouterAuxLoss:
    """The aux term of each micro batch's loss, and the step's token-weighted mean aux for the metrics."""

    def __init__(self, coef: float) -> None:
        self.coef = coef
        self._weighted: Optional[Tensor] = None  # this rank's sum over micro batches of aux x valid tokens

    @classmethod
    def for_model(cls, model: nn.Module, config: ModelConfig) -> Optional["RouterAuxLoss"]:
        """None for a dense model; for a MoE model, also makes its sparse layers keep their routing."""
        if not config.is_moe:
            return None
        record_routing(model)
        return cls(config.router_aux_loss_coef)

    def begin_step(self, device: torch.device) -> None:
        self._weighted = torch.zeros((), dtype=torch.float32, device=device)

    def term(self, model: nn.Module, token_mask: Optional[Tensor], valid: int, scale: Tensor | float) -> Tensor:
        """coef x aux x valid x scale for the forward just run (scale: the trainer's dp / valid tokens in the global
        batch), the micro batch's share of coef x (token-weighted mean aux). 0 without a sparse layer (a pipeline
        stage that holds only dense layers)."""
        aux = load_balancing_loss(model, token_mask)
        if aux is None:
            return torch.zeros((), dtype=torch.float32, device=self._weighted.device)
        self._weighted = self._weighted + aux.detach() * valid
        return aux * (self.coef * valid) * scale

    def step_mean(self, total_valid: Tensor) -> Tensor:
        """The step's aux (token-weighted mean over the global batch's micro batches), a device tensor."""
        total = self._weighted.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return total / total_valid.clamp(min=1)


def check_moe_job(model_config: ModelConfig, plan, lora_targets: tuple[str, ...], export_adapter: str) -> None:
    """Refuse, before anything is built, what a MoE job cannot run yet (one line naming the setting)."""
    if not model_config.is_moe:
        return
    for name in ("tp", "pp", "cp"):
        size = getattr(plan, name, 1)
        if size > 1:
            raise QwenlinkError(f"parallel.{name} = {size}: a mixture-of-experts model ({model_config.num_experts} "
                                f"experts) trains with data and expert parallelism only so far (tensor, pipeline and "
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
