"""Megatron checkpoint directories: write (either naming, any TP/PP/VPP) and find/read their files.

Directory layout (torch format, what Megatron's and ModelLink's converters write and `--load` reads):
    DIR/latest_checkpointed_iteration.txt      "1" or "release"
    DIR/iter_0000001/ (or release/)
        mp_rank_TT/model_optim_rng.pt          when PP == 1
        mp_rank_TT_PPP/model_optim_rng.pt      when PP > 1
        mp_rank_TT_EEE, mp_rank_TT_PPP_EEE     with expert parallelism (EP > 1): Megatron appends the expert rank
Each file holds `args` (an argparse.Namespace), `checkpoint_version` 3.0, `iteration`, and `model` or `model0..` (one
per virtual chunk) with layer numbers local to the chunk. The tensor math lives in megatron_layout.py, the names in
megatron_names.py, reading in megatron_read.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import torch

from qwenlink.checkpoint import megatron_layout as ml
from qwenlink.checkpoint.dtypes import dtype_name
from qwenlink.checkpoint.megatron_names import IMPLS, NAMINGS, Key, build_chunk, expert_role, parse_expert_role
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path
from qwenlink.models.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
DEFAULT_DIVISIBLE_BY = 128  # Megatron's --make-vocab-size-divisible-by default
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")

Iteration = Union[int, str]  # a number or "release"


def notice_to_stderr(message: str) -> None:
    print(f"qwenlink: {message}", file=sys.stderr)


class TensorSource(Protocol):
    """Where a conversion reads weights from: qwenlink parameter names (HF names without `model.`)."""

    config: ModelConfig

    def get(self, name: str) -> torch.Tensor: ...


# ---- directory names ------------------------------------------------------------------------------------------------
def iteration_dir_name(iteration: Iteration) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron-LM's get_checkpoint_name: `_PPP` only when PP > 1, then `_EEE` only when EP > 1 (so with PP 1 and
    EP > 1 the second number is the expert rank; the checkpoint's args tell the two apart)."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name + (f"_{ep_rank:03d}" if ep > 1 else "")


def parse_iteration(text: str, source: str = "--iteration") -> Iteration:
    text = text.strip()
    if text == "release":
        return "release"
    if not text.isdigit():
        raise QwenlinkError(f"{source}: expected an iteration number or 'release', got {text!r}")
    return int(text)


def is_megatron_dir(path: str | os.PathLike) -> bool:
    """A Megatron checkpoint root (tracker file or iteration dirs) or one iteration dir (mp_rank_* inside)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / TRACKER).is_file():
        return True
    if (path / "metadata.json").is_file() and (path / "common.pt").is_file():
        return True  # an iteration directory of a torch_dist checkpoint (megatron_dist.is_torch_dist_dir decides)
    return any(_RANK_DIR.match(p.name) or p.name == "release" or p.name.startswith("iter_") for p in path.iterdir())


def find_iteration_dir(root: str | os.PathLike, iteration: Optional[Iteration] = None) -> tuple[Path, Iteration]:
    """The iteration directory to read: `iteration` if given, else what the tracker file names."""
    root = Path(root)
    if any(_RANK_DIR.match(p.name) for p in root.iterdir()) or (root / "metadata.json").is_file():
        name = root.name
        it: Iteration = "release" if name == "release" else (int(name[5:]) if name[5:].isdigit() else 0)
        return root, it
    if iteration is None:
        tracker = root / TRACKER
        if not tracker.is_file():
            found = sorted(p.name for p in root.iterdir() if p.name.startswith("iter_") or p.name == "release")
            hint = f" (found {', '.join(found[:3])}; pass --input-iteration to pick one)" if found else ""
            raise QwenlinkError(f"{tracker}: missing; cannot tell which iteration to load{hint}")
        iteration = parse_iteration(tracker.read_text(encoding="utf-8", errors="replace"), str(tracker))
    directory = root / iteration_dir_name(iteration)
    if not directory.is_dir():
        raise QwenlinkError(f"{directory}: iteration directory missing (named by {root / TRACKER})")
    return directory, iteration


def rank_dir_numbers(iteration_dir: Path) -> dict[tuple[int, ...], Path]:
    """{numbers in the name: model_optim_rng.pt} of every mp_rank_* directory, e.g. (1,) or (0, 1) or (0, 1, 3)."""
    found: dict[tuple[int, ...], Path] = {}
    for entry in sorted(iteration_dir.iterdir()):
        match = _RANK_DIR.match(entry.name)
        if not match:
            if entry.name.startswith("mp_rank_"):
                raise QwenlinkError(f"{entry}: unsupported rank directory (expected mp_rank_TT, mp_rank_TT_PPP or "
                                    f"mp_rank_TT_PPP_EEE)")
            continue
        found[tuple(int(g) for g in match.groups() if g is not None)] = entry / MODEL_FILE
    return found


def find_rank_files(iteration_dir: Path, expert_parallel: bool = False) -> dict[tuple[int, int, int], Path]:
    """{(tp_rank, pp_rank, ep_rank): model_optim_rng.pt}; a missing rank or file is named.

    `expert_parallel` (the checkpoint's args say EP > 1) decides what the second number of mp_rank_TT_NNN is: the
    expert rank (PP 1) or the pipeline rank."""
    ranks: dict[tuple[int, int, int], Path] = {}
    kinds = set()
    for numbers, file in rank_dir_numbers(iteration_dir).items():
        kinds.add(len(numbers))
        if len(numbers) == 3 and not expert_parallel:
            raise QwenlinkError(f"{file.parent}: an expert-parallel rank directory, but the checkpoint's args say "
                                f"expert_model_parallel_size 1")
        if len(numbers) == 1 and expert_parallel:
            raise QwenlinkError(f"{file.parent}: no expert rank in the name, but the checkpoint's args say "
                                f"expert_model_parallel_size > 1 (expected mp_rank_TT_EEE or mp_rank_TT_PPP_EEE)")
        if len(numbers) == 2 and expert_parallel:
            numbers = (numbers[0], 0, numbers[1])
        ranks[(numbers + (0, 0))[:3]] = file
    if not ranks:
        if any(p.suffix == ".distcp" or p.name == ".metadata" for p in iteration_dir.iterdir()):
            raise QwenlinkError(f"{iteration_dir}: a torch_dist (distributed) Megatron checkpoint without a "
                                f"metadata.json naming its backend (megatron-core writes it last: an interrupted "
                                f"save?)")
        raise QwenlinkError(f"{iteration_dir}: no mp_rank_* directories")
    if len(kinds) > 1:
        raise QwenlinkError(f"{iteration_dir}: mixes mp_rank_TT, mp_rank_TT_NNN and mp_rank_TT_PPP_EEE directories")
    tp, pp, ep = (max(r[i] for r in ranks) + 1 for i in range(3))
    kind = kinds.pop()
    names_pp = kind == 3 or (kind == 2 and not expert_parallel)  # whether names carry the pipeline rank
    for p in range(pp):
        for t in range(tp):
            for e in range(ep):
                if (t, p, e) not in ranks:
                    name = rank_dir_name(t, p, 2 if names_pp else 1, e, 2 if expert_parallel else 1)
                    raise QwenlinkError(f"{iteration_dir / name}: missing (tensor rank {t}, pipeline rank {p}"
                                        f"{f', expert rank {e}' if expert_parallel else ''} of TP {tp} x PP {pp}"
                                        f"{f' x EP {ep}' if expert_parallel else ''})")
    for file in ranks.values():
        if not file.is_file():
            raise QwenlinkError(f"{file}: missing")
    return ranks


# ---- args ------------------------------------------------------------------------------------------------------------
def megatron_args(config: ModelConfig, layout: ml.Layout, *, naming: str, padded_vocab: int, divisible_by: int,
                  dtype: torch.dtype, iteration: Iteration, impl: str) -> argparse.Namespace:
    """The `args` Megatron's checkpoint loader and converters read, with plain values only.

    Plain values (numbers, strings, None, a torch dtype) mean the file loads without Megatron installed and with
    torch.load(weights_only=True) given only argparse.Namespace. `qwenlink_hf_config` keeps the exact HF config so a
    round trip restores fields Megatron has no place for.
    """
    h, nh, ng = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    theta = config.rope_theta
    num_layer_list = None
    if layout.vpp == 1 and len({row[0] for row in layout.layer_counts}) > 1:
        num_layer_list = ",".join(str(row[0]) for row in layout.layer_counts)
    per_chunk = layout.layer_counts[0][0] if layout.vpp > 1 else None
    return argparse.Namespace(
        num_layers=config.num_hidden_layers, encoder_num_layers=config.num_hidden_layers, hidden_size=h,
        ffn_hidden_size=config.intermediate_size, num_attention_heads=nh, num_query_groups=ng,
        group_query_attention=ng != nh, kv_channels=config.head_dim,
        vocab_size=config.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=divisible_by,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        encoder_seq_length=config.max_position_embeddings,
        add_qkv_bias=config.qkv_bias, add_bias_linear=False, swiglu=True, normalization="RMSNorm",
        norm_epsilon=config.rms_norm_eps, layernorm_epsilon=config.rms_norm_eps,
        position_embedding_type="rope", use_rotary_position_embeddings=True, add_position_embedding=True,
        rotary_base=int(theta) if float(theta).is_integer() else theta, rotary_percent=1.0,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=per_chunk, num_layer_list=num_layer_list,
        world_size=layout.tp * layout.pp * layout.ep, data_parallel_size=layout.ep, rank=0,
        iteration=0 if iteration == "release" else int(iteration),
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_legacy_models=naming == "legacy", use_mcore_models=naming == "core",
        transformer_impl=impl, tokenizer_type="HuggingFaceTokenizer" if naming == "core" else "PretrainedFromHF",
        consumed_train_samples=0, consumed_valid_samples=0,
        qwenlink_hf_config=config.to_hf_dict(dtype=dtype_name(dtype)),
        **(_moe_args(config, layout) if config.is_moe else {}),
    )


def _moe_args(config: ModelConfig, layout: ml.Layout) -> dict[str, Any]:
    """Megatron-LM's MoE arguments that make megatron-core compute what Qwen2-MoE does: softmax over all experts
    before top-k (moe_router_pre_softmax) leaves the k weights unnormalised, as norm_topk_prob false does (without
    it megatron-core softmaxes the k chosen logits: norm_topk_prob true); a sigmoid-gated shared expert; SequentialMLP
    experts (moe_grouped_gemm off), whose names these files use; moe_layer_freq marks the dense layers."""
    return dict(
        num_experts=config.num_experts, moe_router_topk=config.num_experts_per_tok,
        moe_ffn_hidden_size=config.moe_intermediate_size,
        moe_shared_expert_intermediate_size=config.shared_expert_intermediate_size, moe_shared_expert_gate=True,
        moe_router_pre_softmax=not config.norm_topk_prob, moe_router_score_function="softmax",
        moe_router_topk_scaling_factor=None, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=config.router_aux_loss_coef, moe_grouped_gemm=False,
        moe_layer_freq=[1 if config.is_moe_layer(i) else 0 for i in range(config.num_hidden_layers)],
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.tp)


# ---- writing ---------------------------------------------------------------------------------------------------------
def _layer_roles(source: TensorSource, layer: int, tp: int,
                 dtype: Optional[torch.dtype]) -> list[dict[str, torch.Tensor]]:
    """One decoder layer in Megatron's fused, TP-split form: a {role: tensor} dict per TP rank."""
    cfg = source.config
    pre = f"layers.{layer}."

    def get(name: str) -> torch.Tensor:
        t = source.get(pre + name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    nh, ng = cfg.num_attention_heads, cfg.num_key_value_heads
    qkv = ml.split_rows(ml.fuse_qkv(get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"),
                                    get("self_attn.v_proj.weight"), nh, ng), tp)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    per_rank = {"qkv.weight": qkv, "proj": ml.split_cols(get("self_attn.o_proj.weight"), tp)}
    if cfg.is_moe_layer(layer):
        per_rank.update(_moe_roles(get, cfg.num_experts, tp))
    else:
        per_rank["fc1"] = ml.fuse_gate_up(get("mlp.gate_proj.weight"), get("mlp.up_proj.weight"), tp)
        per_rank["fc2"] = ml.split_cols(get("mlp.down_proj.weight"), tp)
    if cfg.qkv_bias:
        per_rank["qkv.bias"] = ml.split_rows(ml.fuse_qkv(get("self_attn.q_proj.bias"), get("self_attn.k_proj.bias"),
                                                         get("self_attn.v_proj.bias"), nh, ng), tp)
    input_norm, post_norm = get("input_layernorm.weight"), get("post_attention_layernorm.weight")
    for t in range(tp):
        out[t]["input_norm"] = input_norm
        out[t]["post_norm"] = post_norm
        for role, shards in per_rank.items():
            out[t][role] = shards[t]
    return out


def _moe_roles(get: Callable[[str], torch.Tensor], num_experts: int, tp: int) -> dict[str, list[torch.Tensor]]:
    """An MoE layer's router, shared expert (with its gate) and routed experts, per TP rank; the routed experts
    under their global numbers (`experts.{g}.fc1`), each fused and TP-split like a dense MLP. The router and the
    shared expert's gate are replicated."""
    router, gate = get("mlp.gate.weight"), get("mlp.shared_expert_gate.weight")
    out = {"router": [router] * tp, "shared.gate": [gate] * tp,
           "shared.fc1": ml.fuse_gate_up(get("mlp.shared_expert.gate_proj.weight"),
                                         get("mlp.shared_expert.up_proj.weight"), tp),
           "shared.fc2": ml.split_cols(get("mlp.shared_expert.down_proj.weight"), tp)}
    gates, ups = get("mlp.experts.gate_proj.weight"), get("mlp.experts.up_proj.weight")  # [E, I, H]
    for g in range(num_experts):
        out[expert_role(g, "fc1")] = ml.fuse_gate_up(gates[g], ups[g], tp)
    del gates, ups
    downs = get("mlp.experts.down_proj.weight")  # [E, H, I]
    for g in range(num_experts):
        out[expert_role(g, "fc2")] = ml.split_cols(downs[g], tp)
    return out


def ep_rank_roles(roles: dict[Key, torch.Tensor], num_experts: int, ep: int, ep_rank: int) -> dict[Key, torch.Tensor]:
    """What expert-parallel rank `ep_rank` holds of one chunk: every non-expert tensor, and its block of routed
    experts renumbered from 0 (megatron-core's local_experts numbering)."""
    held = ml.local_experts(num_experts, ep, ep_rank)
    out: dict[Key, torch.Tensor] = {}
    for (role, j), tensor in roles.items():
        expert = parse_expert_role(role)
        if expert is None:
            out[(role, j)] = tensor
        elif expert[0] in held:
            out[(expert_role(expert[0] - held.start, expert[1]), j)] = tensor
    return out


def chunk_roles(source: TensorSource, layout: ml.Layout, p: int, c: int, *, padded_vocab: int,
                naming: str, dtype: Optional[torch.dtype] = None) -> list[dict[Key, torch.Tensor]]:
    """Everything chunk c of pipeline rank p holds, per TP rank, as {(role, local layer): tensor}; routed experts
    under their global numbers (ep_rank_roles cuts out one expert-parallel rank's).

    Works on meta tensors, so per-rank shapes of a large model can be checked without memory.
    """
    cfg, tp = source.config, layout.tp
    ranks: list[dict[Key, torch.Tensor]] = [{} for _ in range(tp)]

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def vocab_shards(name: str) -> list[torch.Tensor]:
        return ml.vocab_shards(source.get(name), padded_vocab, tp, dtype)

    if layout.holds_embedding(p, c):
        for t, shard in enumerate(vocab_shards("embed_tokens.weight")):
            ranks[t][("embed", None)] = shard
    for j, layer in enumerate(layout.global_layers(p, c)):
        for t, roles in enumerate(_layer_roles(source, layer, tp, dtype)):
            for role, tensor in roles.items():
                ranks[t][(role, j)] = tensor
    if layout.holds_head(p, c):
        norm = cast(source.get("norm.weight"))
        head: Optional[list[torch.Tensor]] = None
        role = "head"
        if not cfg.tie_word_embeddings:
            head = vocab_shards("lm_head.weight")
        elif not layout.holds_embedding(p, c):
            # Tied and on another stage than the embedding: Megatron keeps a copy of the embedding for the head.
            head, role = vocab_shards("embed_tokens.weight"), ("head_copy" if naming == "legacy" else "head")
        for t in range(tp):
            ranks[t][("final_norm", None)] = norm
            if head is not None:
                ranks[t][(role, None)] = head[t]
    return ranks


def _compact(value: Any) -> Any:
    """Clone views so torch.save writes only their own bytes, not the whole storage they were cut from."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() != value.numel() * value.element_size():
        return value.clone()
    return value


def save_megatron(source: TensorSource, directory: str | os.PathLike, layout: ml.Layout, *, naming: str = "core",
                  impl: str = "local", iteration: Iteration = 1, divisible_by: int = DEFAULT_DIVISIBLE_BY,
                  dtype: Optional[torch.dtype] = None) -> Path:
    """Write a Megatron checkpoint directory, one pipeline stage at a time (peak memory ~ one stage + one layer).

    The directory appears complete or not at all (written under a temporary name, then renamed).
    """
    if naming not in NAMINGS:
        raise QwenlinkError(f"unknown Megatron naming {naming!r} (expected one of {', '.join(NAMINGS)})")
    if impl not in IMPLS:
        raise QwenlinkError(f"unknown transformer impl {impl!r} (expected one of {', '.join(IMPLS)})")
    if naming == "legacy" and impl != "local":
        raise QwenlinkError("legacy naming has no Transformer Engine variant")
    cfg = source.config
    if cfg.is_moe and naming == "legacy":
        raise QwenlinkError(f"a mixture-of-experts model ({cfg.num_experts} experts) has no legacy (ModelLink) "
                            f"Megatron naming in qwenlink; use megatron-core naming (--to megatron)")
    if layout.ep > 1 and not cfg.is_moe:
        raise QwenlinkError(f"--ep {layout.ep} applies to a mixture-of-experts model only (this model is dense)")
    if cfg.is_moe and cfg.num_experts % layout.ep:
        raise QwenlinkError(f"--ep {layout.ep} does not divide num_experts {cfg.num_experts}")
    padded = ml.padded_vocab_size(cfg.vocab_size, divisible_by, layout.tp)
    out_dtype = dtype or source.get("embed_tokens.weight").dtype
    args = megatron_args(cfg, layout, naming=naming, padded_vocab=padded, divisible_by=divisible_by,
                         dtype=out_dtype, iteration=iteration, impl=impl)
    it_number = 0 if iteration == "release" else int(iteration)
    directory = Path(directory)
    with atomic_path(directory, is_dir=True) as tmp:
        it_dir = tmp / iteration_dir_name(iteration)
        for p in range(layout.pp):
            per_chunk = [chunk_roles(source, layout, p, c, padded_vocab=padded, naming=naming, dtype=dtype)
                         for c in range(layout.vpp)]
            for t in range(layout.tp):
                for e in range(layout.ep):
                    state: dict[str, Any] = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                                             "iteration": it_number}
                    for c in range(layout.vpp):
                        key = "model" if layout.vpp == 1 else f"model{c}"
                        roles = per_chunk[c][t]
                        if cfg.is_moe:
                            roles = ep_rank_roles(roles, cfg.num_experts, layout.ep, e)
                        state[key] = _compact(build_chunk(roles, naming, impl, layout.holds_head(p, c)))
                    if naming == "core":
                        state["num_floating_point_operations_so_far"] = 0
                    rank_dir = it_dir / rank_dir_name(t, p, layout.pp, e, layout.ep)
                    rank_dir.mkdir(parents=True)
                    torch.save(state, rank_dir / MODEL_FILE)
            del per_chunk
        (tmp / TRACKER).write_text(str(iteration))
    return directory
