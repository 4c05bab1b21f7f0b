"""LoRA adapters for Qwen2Model: low-rank updates on chosen projections, with the base weights frozen.

A targeted `nn.Linear` is replaced by `LoraLinear`, a subclass that *keeps its base parameters* (`weight`, `bias`) and
adds two more on the same module:

    y = x W^T + b + scaling * (dropout(x) A^T) B^T        A: [r, in], B: [out, r], scaling = alpha / r (or / sqrt(r))

Why a subclass with flat parameters and not a wrapper module or a parametrization:
- base names stay exactly HF's (`layers.0.self_attn.q_proj.weight`), so HF / Megatron loaders and DCP keys do not
  change; the adapter adds `...q_proj.lora_A` / `...q_proj.lora_B`, which map one-to-one onto PEFT's file keys;
- it is still an `nn.Linear`, so the model's `init_weights`, the tensor-parallel styles and FSDP treat it as one;
- the low-rank product is never materialised ([out, in] per step would cost as much as full fine-tuning).

Target names may be HF's (q_proj ... down_proj) or ModelLink / Megatron's (query_key_value -> q, k, v; dense -> o;
dense_h_to_4h -> gate, up; dense_4h_to_h -> down; megatron-core's linear_qkv / linear_proj / linear_fc1 / linear_fc2).
`modules_to_save` (embed_tokens / lm_head, or Megatron's word_embeddings / output_layer) are trained in full.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qwenlink.errors import QwenlinkError
from qwenlink.models.lora_experts import LoraStackedLinear
from qwenlink.models.qwen2 import InitRule
from qwenlink.models.qwen2_moe import StackedLinear

Tensor = torch.Tensor

# HF projection name -> its parent inside a decoder layer, in the order the layer runs them.
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
# Names used by ModelLink (legacy Megatron) and megatron-core for the same (fused) matrices.
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("gate_proj", "up_proj"),
    "dense_4h_to_h": ("down_proj",),
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
    "all-linear": tuple(PROJECTIONS),
}
SAVE_ALIASES: dict[str, str] = {
    "embed_tokens": "embed_tokens", "word_embeddings": "embed_tokens",
    "lm_head": "lm_head", "output_layer": "lm_head",
}
# Column-parallel projections (output dim split under TP); the others are row-parallel.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def _valid_targets() -> str:
    return ", ".join(list(PROJECTIONS) + list(TARGET_ALIASES))


@dataclass
class LoraConfig:
    """What to adapt and how strongly; the same fields as the `[lora]` job section (minus `enabled`)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # The seed's ModelLink recipe: all attention and MLP projections.
    target_modules: list = field(default_factory=lambda: ["query_key_value", "dense", "dense_h_to_4h",
                                                          "dense_4h_to_h"])
    modules_to_save: list = field(default_factory=list)
    use_rslora: bool = False  # scaling alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail on values that would train nothing or something else than asked, naming the field."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise QwenlinkError(f"lora.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise QwenlinkError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise QwenlinkError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.targets()
        self.saved_modules()

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self) -> tuple[str, ...]:
        """The HF projection names the target_modules mean, in layer order (aliases expanded, duplicates merged)."""
        if not self.target_modules:
            raise QwenlinkError(f"lora.target_modules is empty (valid names: {_valid_targets()})")
        chosen: set[str] = set()
        for name in self.target_modules:
            short = str(name).rsplit(".", 1)[-1]  # "self_attn.q_proj" and "q_proj" mean the same
            if short in PROJECTIONS:
                chosen.add(short)
            elif short in TARGET_ALIASES:
                chosen.update(TARGET_ALIASES[short])
            else:
                close = difflib.get_close_matches(short, list(PROJECTIONS) + list(TARGET_ALIASES), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise QwenlinkError(f"lora.target_modules: {name!r} matches no projection of a Qwen2 layer{hint} "
                                    f"(valid names: {_valid_targets()})")
        return tuple(p for p in PROJECTIONS if p in chosen)

    def saved_modules(self) -> tuple[str, ...]:
        """Canonical names of the fully trained modules (embed_tokens, lm_head)."""
        out: list[str] = []
        for name in self.modules_to_save:
            canonical = SAVE_ALIASES.get(str(name).rsplit(".", 1)[-1])
            if canonical is None:
                raise QwenlinkError(f"lora.modules_to_save: {name!r} is not a module qwenlink can train in full "
                                    f"(valid names: {', '.join(SAVE_ALIASES)})")
            if canonical not in out:
                out.append(canonical)
        return tuple(m for m in ("embed_tokens", "lm_head") if m in out)


class LoraLinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update; `weight` / `bias` are the (frozen) base parameters."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, r: int, scaling: float,
                 dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: Optional[torch.dtype] = None, adapter_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        adapter_dtype = adapter_dtype or self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=adapter_dtype))  # [r, in]
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=adapter_dtype))  # [out, r]
        self.r, self.scaling, self.dropout = r, scaling, dropout
        if self.lora_A.device.type != "meta":
            self.reset_adapter_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LoraConfig,
                    adapter_dtype: Optional[torch.dtype] = None) -> "LoraLinear":
        """Wrap an existing linear layer, reusing its weight/bias Parameter objects (nothing is copied)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, r=cfg.r,
                     scaling=cfg.scaling, dropout=float(cfg.dropout), device="meta", dtype=linear.weight.dtype,
                     adapter_dtype=adapter_dtype or linear.weight.dtype)
        module.weight = linear.weight
        if linear.bias is not None:
            module.bias = linear.bias
        device = linear.weight.device
        if device.type != "meta":
            module.lora_A = nn.Parameter(torch.empty_like(module.lora_A, device=device))
            module.lora_B = nn.Parameter(torch.empty_like(module.lora_B, device=device))
            module.reset_adapter_parameters()
        return module

    def init_rule(self, param_name: str, std: float) -> Optional[InitRule]:
        """PEFT's default for the adapters: A like nn.Linear's init (kaiming uniform with a = sqrt(5), i.e. uniform
        in +-1/sqrt(in_features)), B = 0, so the adapted model starts as the base. None: the base's own rule."""
        if param_name == "lora_A":
            return InitRule("uniform", 1.0 / math.sqrt(self.in_features))
        if param_name == "lora_B":
            return InitRule("zeros")
        return None

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Fresh adapters (see `init_rule`), drawn from torch's global generator."""
        for name in ("lora_A", "lora_B"):
            self.init_rule(name, 0.0).apply_(getattr(self, name))

    # True while a DPO reference pass runs (train/dpo.py `adapters_off`): the base alone, no second copy of it.
    adapter_disabled = False

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.adapter_disabled:
            return out
        h = x if x.dtype == self.lora_A.dtype or torch.is_autocast_enabled() else x.to(self.lora_A.dtype)
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, self.dropout)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B)  # [..., r] -> [..., out]
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """scaling x B @ A: [out, in], the update a merge adds to `weight` (computed in fp32)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}"


def _layer_body(layer: nn.Module) -> nn.Module:
    """The decoder layer inside an activation-checkpoint wrapper (names are the block's own)."""
    return getattr(layer, "_checkpoint_wrapped_module", layer)


def _slots(body: nn.Module, proj: str) -> Iterator[tuple[str, nn.Module, str]]:
    """(path inside the layer, parent module, attribute) of each matrix a projection name means in one layer: one
    for attention and a dense MLP; in a mixture of experts' layer, the routed experts' stacked projection and the
    shared expert's (both are "gate_proj" / "up_proj" / "down_proj" in HF's names)."""
    parent_name = PROJECTIONS[proj]
    parent = getattr(body, parent_name)
    if parent_name == "mlp" and not hasattr(parent, proj):  # models/qwen2_moe.py's SparseMoeBlock
        yield f"mlp.experts.{proj}", parent.experts, proj
        yield f"mlp.shared_expert.{proj}", parent.shared_expert, proj
    else:
        yield f"{parent_name}.{proj}", parent, proj


def _adapted(module: nn.Module, cfg: LoraConfig, adapter_dtype: Optional[torch.dtype]) -> nn.Module:
    if isinstance(module, StackedLinear):
        return LoraStackedLinear(module, r=cfg.r, scaling=cfg.scaling, dropout=float(cfg.dropout),
                                 adapter_dtype=adapter_dtype)
    return LoraLinear.from_linear(module, cfg, adapter_dtype)


def iter_lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear | LoraStackedLinear]]:
    """(qwenlink module name, module) of every adapted projection, e.g. ('layers.3.mlp.up_proj', ...)."""
    for layer_id, layer in model.layers.items():
        body = _layer_body(layer)
        for proj in PROJECTIONS:
            for path, parent, attr in _slots(body, proj):
                module = getattr(parent, attr)
                if isinstance(module, (LoraLinear, LoraStackedLinear)):
                    yield f"layers.{layer_id}.{path}", module


def apply_lora(model: nn.Module, cfg: LoraConfig, *, adapter_dtype: Optional[torch.dtype] = None,
               modules: Optional[set[str]] = None) -> nn.Module:
    """Replace the target projections of every layer present (a pipeline stage may hold a few) by LoraLinear, then
    freeze everything except the adapters and modules_to_save. Works on the meta device (before parallelism).

    `modules` (e.g. {"layers.0.self_attn.q_proj"}) restricts the targets to those exact modules (an imported adapter
    may adapt only some layers). With tied embeddings, embed_tokens and lm_head are one parameter: saving either
    trains (and saves) both.
    """
    if any(True for _ in iter_lora_modules(model)):
        raise QwenlinkError("LoRA adapters are already applied to this model")
    targets = cfg.targets()
    for layer_id, layer in model.layers.items():
        body = _layer_body(layer)
        for proj in targets:
            for path, parent, attr in list(_slots(body, proj)):
                if modules is None or f"layers.{layer_id}.{path}" in modules:
                    setattr(parent, attr, _adapted(getattr(parent, attr), cfg, adapter_dtype))
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in iter_lora_modules(model):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    for name in saved_module_names(model, cfg):
        module = getattr(model, name, None)
        if module is not None:
            module.weight.requires_grad_(True)
    return model


def saved_module_names(model: nn.Module, cfg: LoraConfig) -> tuple[str, ...]:
    """modules_to_save, widened to both ends of a tied embedding (one parameter cannot be half trained)."""
    names = cfg.saved_modules()
    if names and model.config.tie_word_embeddings:
        return ("embed_tokens", "lm_head")
    return names


def is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter and modules_to_save tensors (what a LoRA run produces), keyed by qwenlink names, on CPU.

    A tied lm_head is listed under both names (PEFT saves both modules_to_save copies). DTensors are gathered.
    """
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            out[name] = tensor.to("cpu").clone()
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should hold under LoRA (shared ones once)."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def init_adapters(model: nn.Module, seed: Optional[int] = None) -> None:
    """(Re-)initialise every adapter (A random, B = 0); needed after `to_empty` materialises a meta model."""
    if seed is not None:
        torch.manual_seed(seed)
    for _, module in iter_lora_modules(model):
        module.reset_adapter_parameters()


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """weight + scaling x B @ A in fp32, returned in weight's dtype. weight: [out, in], A: [r, in], B: [out, r]
    (or stacked experts: [E, out, in], [E, r, in], [E, out, r], one product per expert)."""
    return (weight.float() + scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear modules back (in place; returns the model).

    The result has exactly the base model's parameter names and is trainable again as a whole.
    """
    for name, module in list(iter_lora_modules(model)):
        _, layer_id, path = name.split(".", 2)
        parent_path, attr = path.rsplit(".", 1)
        if isinstance(module, LoraStackedLinear):
            with torch.device("meta"):
                plain = StackedLinear(module.num_experts, module.in_features, module.out_features)
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                              dtype=module.weight.dtype)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().clone())
        plain.weight = nn.Parameter(merged_weight(module.weight, module.lora_A, module.lora_B, module.scaling))
        setattr(_layer_body(model.layers[layer_id]).get_submodule(parent_path), attr, plain)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@torch.no_grad()
def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen (base) parameters in `dtype` (e.g. bf16) while trainable ones keep theirs (fp32 master weights).

    Halves the base's memory; the forward then runs the base in `dtype` (a bf16 compute policy - the trainer's, or
    autocast - runs the mixed matmuls).
    """
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad and param.dtype != dtype and param.is_floating_point():
                param.data = param.data.to(dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shared parameters once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
