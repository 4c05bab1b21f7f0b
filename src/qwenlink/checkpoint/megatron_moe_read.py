"""The mixture-of-experts part of reading a Megatron checkpoint (megatron-core naming): expert ranks and config.

Megatron writes one file per (tensor, pipeline, expert) rank; each expert rank's file repeats every non-expert tensor
and holds its own block of routed experts numbered from 0 (`local_experts.{i}`). `merge_expert_ranks` turns the files
of one (tensor, pipeline) rank into one view with global expert numbers, so the rest of the reader (megatron_read.py)
sees a single file per (tensor, pipeline) rank as for a dense model. `moe_config` derives the Qwen2-MoE fields of the
model config from the tensors and Megatron's MoE arguments, refusing settings under which megatron-core would compute
something other than Qwen2-MoE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from qwenlink.checkpoint.megatron_layout import Layout
from qwenlink.checkpoint.megatron_names import MOE_ROLES, Key, expert_role, key_name, parse_expert_role
from qwenlink.errors import QwenlinkError

Chunk = tuple[str, str, dict[Key, torch.Tensor]]  # (entry name `model`/`modelN`, naming, {(role, layer): tensor})


def _router_rows(flat: dict[Key, torch.Tensor]) -> Optional[int]:
    rows = [t.shape[0] for (role, _), t in flat.items() if role == "router" and t.dim() == 2]
    return rows[0] if rows else None


def merge_expert_ranks(per_rank: Sequence[list[Chunk]], files: Sequence[Path]) -> list[Chunk]:
    """The chunks of one (tensor, pipeline) rank's expert-rank files -> one list of chunks whose routed experts carry
    global numbers (expert rank e's local expert i is expert e x E/EP + i, E the router's rows).

    Non-expert tensors are taken from expert rank 0; the other ranks' copies must hold the same names and shapes."""
    ep = len(per_rank)
    base = per_rank[0]
    for e, chunks in enumerate(per_rank):
        if len(chunks) != len(base):
            raise QwenlinkError(f"{files[e]}: holds {len(chunks)} model chunk(s), expert rank 0 ({files[0]}) holds "
                                f"{len(base)}")
    out: list[Chunk] = []
    for c, (entry, naming, flat) in enumerate(base):
        num_experts = _router_rows(flat)
        if num_experts is not None and num_experts % ep:
            raise QwenlinkError(f"{files[0]}: the router holds {num_experts} experts, which {ep} expert-parallel "
                                f"ranks cannot split evenly")
        per_rank_experts = num_experts // ep if num_experts is not None else None
        merged = {k: v for k, v in flat.items() if parse_expert_role(k[0]) is None}
        replicated = dict(merged)  # expert rank 0's non-expert tensors, which every expert rank repeats
        for e in range(ep):
            _, _, rank_flat = per_rank[e][c]
            shared = {k: v for k, v in rank_flat.items() if parse_expert_role(k[0]) is None}
            if set(shared) != set(replicated):
                diff = sorted(set(shared) ^ set(replicated), key=str)[0]
                raise QwenlinkError(f"{files[e]}: inconsistent expert-parallel copies: {key_name(naming, *diff)} is "
                                    f"present in one expert rank's file and not another")
            for k, tensor in shared.items():
                if tuple(tensor.shape) != tuple(replicated[k].shape):
                    raise QwenlinkError(f"{files[e]}: inconsistent expert-parallel copies: {key_name(naming, *k)} has "
                                        f"shape {list(tensor.shape)} but {list(replicated[k].shape)} in {files[0]}")
            for (role, j), tensor in rank_flat.items():
                expert = parse_expert_role(role)
                if expert is None:
                    continue
                if per_rank_experts is None:
                    if ep > 1:
                        raise QwenlinkError(f"{files[e]}: routed expert {key_name(naming, role, j)} but no router "
                                            f"(decoder.layers.{j}.mlp.router.weight) in the chunk")
                    merged[(role, j)] = tensor
                    continue
                if expert[0] >= per_rank_experts:
                    raise QwenlinkError(f"{files[e]}: tensor {key_name(naming, role, j)} is beyond the "
                                        f"{per_rank_experts} experts each expert rank holds ({num_experts} experts "
                                        f"over EP {ep})")
                merged[(expert_role(e * per_rank_experts + expert[0], expert[1]), j)] = tensor
        out.append((entry, naming, merged))
    return out


def expert_location(role: str, num_experts: int, ep: int) -> tuple[int, str]:
    """(expert rank, role inside that rank's file) of a routed expert's global role; other roles: (0, role)."""
    expert = parse_expert_role(role)
    if expert is None or ep == 1:
        return 0, role
    per_rank = num_experts // ep
    return expert[0] // per_rank, expert_role(expert[0] % per_rank, expert[1])


def required_moe_roles(num_experts: int) -> list[str]:
    """Every role an MoE layer must hold (Qwen2-MoE: router, gated shared expert, all routed experts)."""
    return list(MOE_ROLES) + [expert_role(g, kind) for g in range(num_experts) for kind in ("fc1", "fc2")]


def moe_shapes(hidden: int, num_experts: int, expert_ffn: int, shared_ffn: int, tp: int) -> dict[str, tuple]:
    """Per-TP-rank shapes of the MoE roles; routed experts under the key `experts.fc1` / `experts.fc2`."""
    return {"router": (num_experts, hidden), "shared.gate": (1, hidden), "shared.fc1": (2 * shared_ffn // tp, hidden),
            "shared.fc2": (hidden, shared_ffn // tp), "experts.fc1": (2 * expert_ffn // tp, hidden),
            "experts.fc2": (hidden, expert_ffn // tp)}


def moe_config(args: Any, chunks: dict[tuple[int, int, int], dict[Key, torch.Tensor]], layout: Layout, first: Path,
               base: dict[str, Any]) -> dict[str, Any]:
    """The HF Qwen2MoeConfig fields of an MoE checkpoint ({} for a dense one), from the tensors and args.

    `base` (qwenlink's own record or a reference config) supplies what neither holds and keeps the original
    decoder_sparse_step / mlp_only_layers spelling when it places the MoE layers where the tensors do."""
    sparse = sorted(layout.global_layers(p, c)[j] for (t, p, c), flat in chunks.items() if t == 0
                    for (role, j) in flat if role == "router")
    if not sparse:
        return {}
    (t0, p0, c0), flat0 = next((k, f) for k, f in chunks.items() if k[0] == 0 and _router_rows(f) is not None)
    num_experts = _router_rows(flat0)
    j0 = next(j for (role, j) in flat0 if role == "router")

    def arg(name: str) -> Any:
        return getattr(args, name, None)

    if arg("num_experts") is not None and arg("num_experts") != num_experts:
        raise QwenlinkError(f"{first}: args.num_experts is {arg('num_experts')} but the router holds {num_experts} "
                            f"experts")
    refusals = (("moe_router_score_function", lambda v: v not in (None, "softmax"), "a softmax router"),
                ("moe_router_topk_scaling_factor", lambda v: v not in (None, 1, 1.0), "unscaled top-k weights"),
                ("moe_shared_expert_gate", lambda v: v is False, "a sigmoid-gated shared expert"),
                ("moe_router_enable_expert_bias", lambda v: bool(v), "no expert bias in routing"),
                ("moe_router_num_groups", lambda v: v not in (None, 0, 1), "no group-limited routing"))
    for name, bad, why in refusals:
        if bad(arg(name)):
            raise QwenlinkError(f"{first}: args.{name}={arg(name)!r} is not supported (Qwen2-MoE has {why})")
    top_k = arg("moe_router_topk") if arg("moe_router_topk") is not None else base.get("num_experts_per_tok")
    if top_k is None:
        raise QwenlinkError(f"{first}: args.moe_router_topk missing (the number of experts each token is routed to)")
    pre_softmax = arg("moe_router_pre_softmax")
    norm_topk = (not pre_softmax) if pre_softmax is not None else bool(base.get("norm_topk_prob", False))
    expert_fc1 = flat0.get((expert_role(0, "fc1"), j0))
    shared_fc1 = flat0.get(("shared.fc1", j0))
    expert_ffn = arg("moe_ffn_hidden_size") or (expert_fc1.shape[0] * layout.tp // 2 if expert_fc1 is not None
                                                 else base.get("moe_intermediate_size"))
    shared_ffn = arg("moe_shared_expert_intermediate_size") or (
        shared_fc1.shape[0] * layout.tp // 2 if shared_fc1 is not None else base.get("shared_expert_intermediate_size"))
    aux = arg("moe_aux_loss_coeff")
    if isinstance(aux, (list, tuple)):
        aux = aux[0] if aux else None
    out = dict(model_type="qwen2_moe", num_experts=num_experts, num_experts_per_tok=top_k,
               moe_intermediate_size=expert_ffn, shared_expert_intermediate_size=shared_ffn, norm_topk_prob=norm_topk,
               router_aux_loss_coef=float(aux if aux is not None else base.get("router_aux_loss_coef", 0.001)))
    n = layout.num_layers
    step, only = base.get("decoder_sparse_step", 1), list(base.get("mlp_only_layers") or [])
    if isinstance(step, int) and step > 0 and \
            [i for i in range(n) if i not in only and (i + 1) % step == 0] == sparse:
        out.update(decoder_sparse_step=step, mlp_only_layers=only)
    else:
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i in range(n) if i not in sparse])
    return out
