"""The one name map between Megatron checkpoints (legacy ModelLink naming and megatron-core naming) and roles.

A *role* is what a tensor is, independent of naming: per layer `input_norm`, `qkv.weight`, `qkv.bias`, `proj`,
`post_norm`, `fc1`, `fc2`; per model `embed`, `final_norm`, `head` (and `head_copy`, legacy's tied
`word_embeddings_for_head`). Reading maps every known alias to a role; writing picks one spelling per naming.

A mixture-of-experts layer (megatron-core naming only: legacy ModelLink had no MoE layout qwenlink writes) has
`router`, `shared.fc1`, `shared.fc2`, `shared.gate` and per routed expert `experts.{i}.fc1` / `experts.{i}.fc2`, where
i is the expert's number inside its file (megatron-core's `local_experts.{i}`: local to the expert-parallel rank) in
place of `fc1` / `fc2`. Names are those of megatron-core's `MoELayer` with `SequentialMLP` experts (the local spec
with moe_grouped_gemm off) and `SharedExpertMLP` with moe_shared_expert_gate.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

NAMINGS = ("core", "legacy")
IMPLS = ("local", "transformer_engine")

LAYER_ROLES = ("input_norm", "qkv.weight", "qkv.bias", "proj", "post_norm", "fc1", "fc2")

# megatron-core: key suffix after `decoder.layers.{j}.` (local spec first; Transformer Engine fuses the norms into
# the following linear layer).
_CORE_LAYER = {
    "input_norm": "input_layernorm.weight",
    "qkv.weight": "self_attention.linear_qkv.weight",
    "qkv.bias": "self_attention.linear_qkv.bias",
    "proj": "self_attention.linear_proj.weight",
    "post_norm": "pre_mlp_layernorm.weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
}
_CORE_TE_NORMS = {
    "input_norm": "self_attention.linear_qkv.layer_norm_weight",
    "post_norm": "mlp.linear_fc1.layer_norm_weight",
}
# Modules that carry an `_extra_state` entry in megatron-core's local spec (written as None, like Megatron does).
_CORE_EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
# megatron-core MoE layer: key suffix after `decoder.layers.{j}.`; routed experts are matched by _CORE_EXPERT.
_CORE_MOE = {
    "router": "mlp.router.weight",
    "shared.gate": "mlp.shared_experts.gate_weight",
    "shared.fc1": "mlp.shared_experts.linear_fc1.weight",
    "shared.fc2": "mlp.shared_experts.linear_fc2.weight",
}
MOE_ROLES = tuple(_CORE_MOE)
_CORE_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
# Transformer Engine's grouped GEMM (TEGroupedMLP, Megatron-LM's default with --moe-grouped-gemm under TE) keeps each
# local expert's weight as its own parameter `weight{i}`, laid out as SequentialMLP's: read, not written.
_TE_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.linear_fc([12])\.weight(\d+)$")
_EXPERT_ROLE = re.compile(r"^experts\.(\d+)\.(fc[12])$")
# The legacy GroupedMLP's experts fused into two tensors: another layout, named in the refusal.
_GROUPED_EXPERTS = re.compile(r"^mlp\.experts\.weight[12]$")
_CORE_TOP = {"embed": "embedding.word_embeddings.weight", "final_norm": "decoder.final_layernorm.weight",
             "head": "output_layer.weight"}

# Legacy (ModelLink-era) keys inside model['language_model']['encoder'], after `layers.{j}.`.
_LEGACY_LAYER = {
    "input_norm": "input_norm.weight",
    "qkv.weight": "self_attention.query_key_value.weight",
    "qkv.bias": "self_attention.query_key_value.bias",
    "proj": "self_attention.dense.weight",
    "post_norm": "post_attention_norm.weight",
    "fc1": "mlp.dense_h_to_4h.weight",
    "fc2": "mlp.dense_4h_to_h.weight",
}
_LEGACY_ALIASES = {"input_layernorm.weight": "input_norm", "post_attention_layernorm.weight": "post_norm"}
_LEGACY_FINAL = ("final_norm.weight", "final_layernorm.weight")

_READ_LAYER: dict[str, str] = {}
for _role, _suffix in list(_CORE_LAYER.items()) + list(_CORE_TE_NORMS.items()):
    _READ_LAYER[_suffix] = _role
_READ_MOE: dict[str, str] = {suffix: role for role, suffix in _CORE_MOE.items()}
_READ_LEGACY_LAYER: dict[str, str] = {suffix: role for role, suffix in _LEGACY_LAYER.items()} | _LEGACY_ALIASES
_LAYER_KEY = re.compile(r"^(?:decoder\.)?layers\.(\d+)\.(.+)$")

Key = tuple[str, Optional[int]]  # (role, local layer number or None)


class UnknownKey(Exception):
    """A checkpoint entry that no role matches (reported with its file by the caller); args[1], when given, says
    why it is not supported."""


def expert_role(index: int, kind: str) -> str:
    """The role of routed expert `index` (local to its file) and projection `kind` ('fc1' or 'fc2')."""
    return f"experts.{index}.{kind}"


def parse_expert_role(role: str) -> Optional[tuple[int, str]]:
    """(local expert number, 'fc1' | 'fc2') of a routed expert's role; None for any other role."""
    match = _EXPERT_ROLE.match(role)
    return (int(match.group(1)), match.group(2)) if match else None


def is_moe_role(role: str) -> bool:
    return role in _CORE_MOE or parse_expert_role(role) is not None


def _role_of(suffix: str, table: dict[str, str], key: str) -> str:
    if suffix not in table:
        raise UnknownKey(key)
    return table[suffix]


def _core_role_of(suffix: str, key: str) -> str:
    """A megatron-core layer key suffix -> its role (dense or mixture of experts)."""
    if suffix in _READ_LAYER:
        return _READ_LAYER[suffix]
    if suffix in _READ_MOE:
        return _READ_MOE[suffix]
    match = _CORE_EXPERT.match(suffix)
    if match:
        return expert_role(int(match.group(1)), f"fc{match.group(2)}")
    match = _TE_GROUPED_EXPERT.match(suffix)
    if match:
        return expert_role(int(match.group(2)), f"fc{match.group(1)}")
    if _GROUPED_EXPERTS.match(suffix):
        raise UnknownKey(key, "the legacy GroupedMLP's fused expert weights are not supported; save with "
                              "moe_grouped_gemm off (SequentialMLP: mlp.experts.local_experts.N) or Transformer "
                              "Engine's grouped GEMM (mlp.experts.linear_fc1.weightN)")
    raise UnknownKey(key)


def flatten_chunk(chunk: dict[str, Any]) -> tuple[str, dict[Key, torch.Tensor]]:
    """One model chunk (`model` or `modelN`) of either naming -> (naming, {(role, local layer): tensor})."""
    out: dict[Key, torch.Tensor] = {}
    if "language_model" in chunk:
        lm = chunk["language_model"]
        embedding = lm.get("embedding") or {}
        if "word_embeddings" in embedding:
            out[("embed", None)] = embedding["word_embeddings"]["weight"]
        if embedding.get("position_embeddings"):
            raise UnknownKey("language_model.embedding.position_embeddings")
        encoder = lm.get("encoder", lm.get("transformer")) or {}
        for key, tensor in encoder.items():
            if key in _LEGACY_FINAL:
                out[("final_norm", None)] = tensor
                continue
            match = _LAYER_KEY.match(key)
            if not match:
                raise UnknownKey(f"language_model.encoder.{key}")
            out[(_role_of(match.group(2), _READ_LEGACY_LAYER, key), int(match.group(1)))] = tensor
        if "output_layer" in lm:
            out[("head", None)] = lm["output_layer"]["weight"]
        if "word_embeddings_for_head" in chunk:
            out[("head_copy", None)] = chunk["word_embeddings_for_head"]["weight"]
        return "legacy", out
    for key, tensor in chunk.items():
        if key.endswith("_extra_state"):
            continue
        top = {v: k for k, v in _CORE_TOP.items()}
        if key in top:
            out[(top[key], None)] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if not match or not key.startswith("decoder."):
            raise UnknownKey(key)
        out[(_core_role_of(match.group(2), key), int(match.group(1)))] = tensor
    return "core", out


def key_name(naming: str, role: str, layer: Optional[int]) -> str:
    """A readable name of a role for messages, in the given naming (MoE roles exist in core naming only)."""
    if layer is not None and is_moe_role(role):
        expert = parse_expert_role(role)
        if expert is not None:
            return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert[0]}.linear_{expert[1]}.weight"
        return f"decoder.layers.{layer}.{_CORE_MOE[role]}"
    if naming == "legacy":
        if layer is not None:
            return f"language_model.encoder.layers.{layer}.{_LEGACY_LAYER[role]}"
        return {"embed": "language_model.embedding.word_embeddings.weight",
                "final_norm": "language_model.encoder.final_norm.weight",
                "head": "language_model.output_layer.weight",
                "head_copy": "word_embeddings_for_head.weight"}[role]
    if layer is not None:
        return f"decoder.layers.{layer}.{_CORE_LAYER[role]}"
    return _CORE_TOP.get(role, "output_layer.weight")


def build_chunk(roles: dict[Key, torch.Tensor], naming: str, impl: str = "local",
                holds_head: bool = False) -> dict[str, Any]:
    """{(role, local layer): tensor} -> the state dict Megatron expects for one model chunk, in Megatron's order."""
    layers = sorted({j for (_, j) in roles if j is not None})
    if naming == "legacy":
        chunk: dict[str, Any] = {}
        lm: dict[str, Any] = {}
        if ("embed", None) in roles:
            lm["embedding"] = {"word_embeddings": {"weight": roles[("embed", None)]}}
        encoder: dict[str, torch.Tensor] = {}
        for j in layers:
            for role in LAYER_ROLES:
                if (role, j) in roles:
                    encoder[f"layers.{j}.{_LEGACY_LAYER[role]}"] = roles[(role, j)]
        if ("final_norm", None) in roles:
            encoder["final_norm.weight"] = roles[("final_norm", None)]
        lm["encoder"] = encoder
        if ("head", None) in roles:
            lm["output_layer"] = {"weight": roles[("head", None)]}
        chunk["language_model"] = lm
        if ("head_copy", None) in roles:
            chunk["word_embeddings_for_head"] = {"weight": roles[("head_copy", None)]}
        return chunk
    names = dict(_CORE_LAYER)
    if impl == "transformer_engine":
        names.update(_CORE_TE_NORMS)
    order = ("input_norm", "proj", "qkv.weight", "qkv.bias", "post_norm", "fc1", "fc2")
    if impl == "transformer_engine":
        order = ("proj", "input_norm", "qkv.weight", "qkv.bias", "post_norm", "fc1", "fc2")
    flat: dict[str, Any] = {}
    if ("embed", None) in roles:
        flat[_CORE_TOP["embed"]] = roles[("embed", None)]
    for j in layers:
        prefix = f"decoder.layers.{j}."
        moe = ("router", j) in roles
        for role in order:
            if moe and role in ("post_norm", "fc1", "fc2"):
                continue  # written with the MoE block below
            if (role, j) in roles:
                flat[prefix + names[role]] = roles[(role, j)]
            module = names[role].rsplit(".", 1)[0]
            # The module's extra state follows its last tensor (proj after weight, qkv after bias, ...).
            if module in _CORE_EXTRA_STATE and _is_last_of_module(role, j, roles, names):
                flat[prefix + module + "._extra_state"] = None
        if moe:
            _put_moe_layer(flat, prefix, roles, j)
    if ("final_norm", None) in roles:
        flat[_CORE_TOP["final_norm"]] = roles[("final_norm", None)]
    if ("head", None) in roles or ("head_copy", None) in roles:
        flat[_CORE_TOP["head"]] = roles.get(("head", None), roles.get(("head_copy", None)))
    if holds_head:
        flat["output_layer._extra_state"] = None
    return flat


def _put_moe_layer(flat: dict[str, Any], prefix: str, roles: dict[Key, torch.Tensor], j: int) -> None:
    """One MoE layer's norm, router, routed experts and gated shared expert, in megatron-core's state_dict order.

    The pre-MLP norm keeps its own module under Transformer Engine too: megatron-core's TE spec cannot fuse it into
    a router."""
    flat[prefix + "pre_mlp_layernorm.weight"] = roles[("post_norm", j)]
    flat[prefix + _CORE_MOE["router"]] = roles[("router", j)]
    experts = sorted({e[0] for (role, jj) in roles if jj == j and (e := parse_expert_role(role)) is not None})
    for i in experts:
        for kind in ("fc1", "fc2"):
            module = f"mlp.experts.local_experts.{i}.linear_{kind}"
            flat[prefix + module + ".weight"] = roles[(expert_role(i, kind), j)]
            flat[prefix + module + "._extra_state"] = None
    flat[prefix + _CORE_MOE["shared.gate"]] = roles[("shared.gate", j)]
    for kind in ("fc1", "fc2"):
        module = f"mlp.shared_experts.linear_{kind}"
        flat[prefix + module + ".weight"] = roles[(f"shared.{kind}", j)]
        flat[prefix + module + "._extra_state"] = None


def _is_last_of_module(role: str, j: int, roles: dict[Key, torch.Tensor], names: dict[str, str]) -> bool:
    if role == "qkv.weight" and ("qkv.bias", j) in roles:
        return False
    if role in ("input_norm", "post_norm") and names[role].endswith("layer_norm_weight"):
        return False  # TE: the norm is part of linear_qkv / linear_fc1, whose weight comes next
    return True
