"""Reading a Megatron checkpoint (legacy or core naming, any TP/PP/VPP, and EP for a mixture of experts) as qwenlink
tensors, layer by layer.

Every rank file is opened through safe_load (no pickled code runs) with its storages memory-mapped, so asking for one
layer touches only that layer's bytes in each file. The layout (TP, PP, virtual chunks, layers per chunk) is read
from the files themselves and cross-checked against `args`; any disagreement is reported naming the file and tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from qwenlink.checkpoint import megatron_layout as ml
from qwenlink.checkpoint.dtypes import check_float
from qwenlink.checkpoint.megatron import (Iteration, find_iteration_dir, find_rank_files, notice_to_stderr,
                                         rank_dir_name, rank_dir_numbers)
from qwenlink.checkpoint.megatron_moe_read import (expert_location, merge_expert_ranks, moe_config, moe_shapes,
                                                   required_moe_roles)
from qwenlink.checkpoint.megatron_names import (MOE_ROLES, Key, UnknownKey, expert_role, flatten_chunk, key_name,
                                                parse_expert_role)
from qwenlink.checkpoint.safe_load import safe_torch_load
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig

_TRAINING_STATE = ("optimizer", "opt_param_scheduler", "rng_state")
# Config fields a reference config must agree on with an MoE checkpoint (0 / False for a dense one).
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
               "norm_topk_prob")


def _arg(args: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def _expert_parallel_size(iteration_dir: Path) -> int:
    """args.expert_model_parallel_size of the all-zero rank's file (1 when absent): whether mp_rank_TT_NNN counts
    pipeline or expert ranks depends on it. The file is memory-mapped, so this reads little more than args."""
    numbers = rank_dir_numbers(iteration_dir)
    if not numbers or not numbers[min(numbers)].is_file():
        return 1  # find_rank_files names what is missing
    ckpt = safe_torch_load(numbers[min(numbers)])
    ep = _arg(ckpt.get("args") if isinstance(ckpt, dict) else None, "expert_model_parallel_size", default=1)
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise QwenlinkError(f"{numbers[min(numbers)]}: args.expert_model_parallel_size must be a positive integer, "
                            f"got {ep!r}")
    return ep


def _chunks_of(ckpt: dict[str, Any], file: Path) -> list[tuple[str, str, dict[Key, torch.Tensor]]]:
    """[(entry name, naming, {(role, local layer): tensor})] for `model` or `model0..modelN` in chunk order."""
    keys = sorted((k for k in ckpt if k == "model" or (k.startswith("model") and k[5:].isdigit())),
                  key=lambda k: int(k[5:] or 0))
    out = []
    for key in keys:
        try:
            naming, flat = flatten_chunk(ckpt[key])
        except UnknownKey as exc:
            why = exc.args[1] if len(exc.args) > 1 else ("not part of a Qwen2/Llama/Qwen2-MoE model: biases on "
                                                         "linear layers, QK norms or MTP are not supported")
            raise QwenlinkError(f"{file}: unexpected tensor {exc.args[0]!r} in {key!r} ({why})") from None
        out.append((key, naming, flat))
    return out


class MegatronSource:
    """A Megatron checkpoint opened for conversion: `config`, `get(qwenlink_name)`, `layout`, `naming`, `iteration`."""

    def __init__(self, directory: str | os.PathLike, *, iteration: Optional[Iteration] = None,
                 reference: Optional[ModelConfig] = None, notice: Callable[[str], None] = notice_to_stderr) -> None:
        """reference: an HF config (e.g. the model the checkpoint came from) that supplies what Megatron's args do
        not record exactly (rms_norm_eps, rope_theta, the true vocab size); its shapes must agree with the tensors."""
        self.root = Path(directory)
        self.dir, self.iteration = find_iteration_dir(self.root, iteration)
        want_ep = _expert_parallel_size(self.dir)
        files = find_rank_files(self.dir, expert_parallel=want_ep > 1)
        self.expert_files = files  # {(tp, pp, ep): file}
        self.files = {(t, p): file for (t, p, e), file in files.items() if e == 0}
        self.ckpts: dict[tuple[int, int, int], dict[str, Any]] = {}
        for rank, file in sorted(files.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
            ckpt = safe_torch_load(file)
            if not isinstance(ckpt, dict) or not any(k.startswith("model") for k in ckpt):
                raise QwenlinkError(f"{file}: not a Megatron model checkpoint (no 'model' entry)")
            self.ckpts[rank] = ckpt
        skipped = sorted({k for c in self.ckpts.values() for k in c if k in _TRAINING_STATE and c[k] is not None})
        if skipped:
            notice(f"{self.dir}: ignoring {', '.join(skipped)} (only model weights are converted)")
        first = files[(0, 0, 0)]
        self.args = self.ckpts[(0, 0, 0)].get("args")
        if self.args is None:
            raise QwenlinkError(f"{first}: no 'args' entry (needed for head counts)")
        tp, pp, ep = (max(r[i] for r in files) + 1 for i in range(3))
        want_tp = _arg(self.args, "tensor_model_parallel_size", default=tp)
        want_pp = _arg(self.args, "pipeline_model_parallel_size", default=pp)
        for p in range(want_pp):
            for t in range(want_tp):
                for e in range(want_ep):
                    if (t, p, e) not in files:
                        raise QwenlinkError(f"{self.dir / rank_dir_name(t, p, want_pp, e, want_ep)}: missing (tensor "
                                            f"rank {t}, pipeline rank {p}, expert rank {e}; args say TP {want_tp} x "
                                            f"PP {want_pp} x EP {want_ep})")
        if (tp, pp, ep) != (want_tp, want_pp, want_ep):
            raise QwenlinkError(f"{first}: args say TP {want_tp} x PP {want_pp} x EP {want_ep} but {self.dir} holds "
                                f"TP {tp} x PP {pp} x EP {ep}")
        self.ep = ep
        self._flatten(tp, pp)
        self.config = self._config(reference)
        self._check_shapes()
        # Drop every mapping; tensors are re-mapped one pipeline stage at a time as get() asks for them, so pages
        # read for earlier stages do not stay resident.
        self.ckpts.clear()
        self.chunks.clear()
        self._stage: Optional[int] = None

    # ---- structure ------------------------------------------------------------------------------------------------
    def _flatten(self, tp: int, pp: int) -> None:
        """Per (tp, pp, chunk): {(role, local layer): tensor}; derive the layer layout; check TP ranks agree."""
        self.chunks: dict[tuple[int, int, int], dict[Key, torch.Tensor]] = {}
        namings = set()
        counts: list[list[int]] = []
        vpp = None
        for p in range(pp):
            row = []
            for t in range(tp):
                file = self.files[(t, p)]
                chunks = self._rank_chunks(t, p, lambda e: self.ckpts[(t, p, e)])
                if vpp is None:
                    vpp = len(chunks)
                elif len(chunks) != vpp:
                    raise QwenlinkError(f"{file}: holds {len(chunks)} model chunk(s), other ranks hold {vpp}")
                for c, (key, naming, flat) in enumerate(chunks):
                    namings.add(naming)
                    self.chunks[(t, p, c)] = flat
                    ref = self.chunks.get((0, p, c))
                    if t > 0 and set(flat) != set(ref):
                        diff = sorted(set(flat) ^ set(ref), key=str)[0]
                        raise QwenlinkError(f"{file}: inconsistent TP shards: {key_name(naming, *diff)} is present "
                                            f"in one tensor rank and not another")
                    if t > 0:
                        for k, tensor in flat.items():
                            if tuple(tensor.shape) != tuple(ref[k].shape):
                                raise QwenlinkError(
                                    f"{file}: inconsistent TP shards: {key_name(naming, *k)} has shape "
                                    f"{list(tensor.shape)} but {list(ref[k].shape)} in {self.files[(0, p)]}")
                    if t == 0:
                        row.append(1 + max((j for (_, j) in flat if j is not None), default=-1))
            counts.append(row)
        if len(namings) > 1:
            raise QwenlinkError(f"{self.dir}: mixes legacy and megatron-core naming across ranks")
        self.naming = namings.pop()
        self.layout = ml.Layout(tp, pp, vpp or 1, tuple(tuple(r) for r in counts), self.ep)
        if ("embed", None) not in self.chunks[(0, 0, 0)]:
            raise QwenlinkError(f"{self.files[(0, 0)]}: no word embeddings on the first pipeline stage")

    def _rank_chunks(self, t: int, p: int, ckpt_of: Callable[[int], dict[str, Any]]) -> list[tuple[str, str, dict]]:
        """The chunks of tensor rank t, pipeline rank p: its expert ranks' files merged (global expert numbers)."""
        per_rank = [_chunks_of(ckpt_of(e), self.expert_files[(t, p, e)]) for e in range(self.ep)]
        return merge_expert_ranks(per_rank, [self.expert_files[(t, p, e)] for e in range(self.ep)])

    def _file_and_name(self, t: int, p: int, role: str, j: Optional[int]) -> tuple[Path, str]:
        """The file that holds a tensor and its name there (a routed expert: its expert rank's file, local number)."""
        ep = getattr(self, "ep", 1)
        if ep == 1 or parse_expert_role(role) is None:
            return self.files[(t, p)], key_name(self.naming, role, j)
        e, local = expert_location(role, self.config.num_experts, ep)
        return self.expert_files[(t, p, e)], key_name(self.naming, local, j)

    def _config(self, reference: Optional[ModelConfig]) -> ModelConfig:
        """Architecture from args (cross-checked with the tensors); `reference` or qwenlink's own record fill gaps."""
        a, first = self.args, self.files[(0, 0)]
        for name, ok, why in (("swiglu", True, "a SwiGLU MLP"), ("add_bias_linear", False, "no linear biases"),
                              ("normalization", "RMSNorm", "RMSNorm"), ("position_embedding_type", "rope", "rope")):
            value = getattr(a, name, None)
            if value is not None and value != ok:
                raise QwenlinkError(f"{first}: args.{name}={value!r} is not supported (qwenlink models use {why})")
        hidden = self.chunks[(0, 0, 0)][("embed", None)].shape[1]
        nh = _arg(a, "num_attention_heads")
        if nh is None:
            raise QwenlinkError(f"{first}: args.num_attention_heads missing")
        ng = _arg(a, "num_query_groups", default=nh) if getattr(a, "group_query_attention", False) else nh
        fc1 = next((f[("fc1", j)] for f in self.chunks.values() for (r, j) in f if r == "fc1"), None)
        ffn = _arg(a, "ffn_hidden_size", default=fc1.shape[0] * self.layout.tp // 2 if fc1 is not None else None)
        padded = self.chunks[(0, 0, 0)][("embed", None)].shape[0] * self.layout.tp
        vocab = _arg(a, "vocab_size", default=padded)
        self.padded_vocab = padded
        want_padded = _arg(a, "padded_vocab_size", default=padded)
        if want_padded != padded:
            raise QwenlinkError(f"{first}: args.padded_vocab_size is {want_padded} but the word embeddings hold "
                                f"{padded} rows over {self.layout.tp} tensor rank(s)")
        for name, want, have in (("hidden_size", _arg(a, "hidden_size", default=hidden), hidden),
                                 ("num_layers", _arg(a, "num_layers", default=self.layout.num_layers),
                                  self.layout.num_layers)):
            if want != have:
                raise QwenlinkError(f"{first}: args.{name} is {want} but the tensors hold {have}")
        kv_channels = _arg(a, "kv_channels", default=hidden // nh)
        if kv_channels * nh != hidden:
            raise QwenlinkError(f"{first}: args.kv_channels {kv_channels} x heads {nh} != hidden_size {hidden} "
                                f"(not supported)")
        qkv_bias = ("qkv.bias", 0) in self.chunks[(0, 0, 0)] or any(
            ("qkv.bias", 0) in ch for ch in self.chunks.values())
        if getattr(a, "add_qkv_bias", None) is not None and bool(a.add_qkv_bias) != qkv_bias and self.layout.num_layers:
            raise QwenlinkError(f"{first}: args.add_qkv_bias is {a.add_qkv_bias} but the tensors "
                                f"{'have' if qkv_bias else 'lack'} a qkv bias")
        untie = getattr(a, "untie_embeddings_and_output_weights", None)
        has_head = any(("head", None) in ch for ch in self.chunks.values())
        tied = (not untie) if untie is not None else not has_head
        record = getattr(a, "qwenlink_hf_config", None)
        base: dict[str, Any] = dict(record) if isinstance(record, dict) else {}
        if not base:
            base = {"model_type": "qwen2" if qkv_bias else "llama", "attention_bias": qkv_bias,
                    "max_position_embeddings": _arg(a, "max_position_embeddings", "seq_length", default=4096),
                    "rope_theta": float(_arg(a, "rotary_base", default=10000.0)),
                    "rms_norm_eps": float(_arg(a, "norm_epsilon", "layernorm_epsilon", default=1e-6))}
        if reference is not None:
            base = reference.to_hf_dict()
        moe = moe_config(a, self.chunks, self.layout, first, base)
        if moe:
            base.update(moe, qkv_bias=qkv_bias)
            base.pop("attention_bias", None)
            # An all-MoE model has no dense MLP to measure; HF's config still carries intermediate_size.
            ffn = ffn or base.get("intermediate_size") or moe["shared_expert_intermediate_size"]
        elif getattr(self, "ep", 1) > 1:
            raise QwenlinkError(f"{first}: args say expert_model_parallel_size {self.ep} but the checkpoint holds no "
                                f"mixture-of-experts layer (no mlp.router.weight)")
        base.update(hidden_size=hidden, num_hidden_layers=self.layout.num_layers, num_attention_heads=nh,
                    num_key_value_heads=ng, intermediate_size=ffn, tie_word_embeddings=tied)
        if reference is None:
            base["vocab_size"] = vocab
        elif reference.vocab_size > padded:
            raise QwenlinkError(f"reference config: vocab_size {reference.vocab_size} exceeds the checkpoint's "
                                f"padded vocab {padded}")
        if reference is not None:
            for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "intermediate_size", "tie_word_embeddings", "qkv_bias") + _MOE_FIELDS:
                ours = qkv_bias if name == "qkv_bias" else moe.get(name, 0) if name in _MOE_FIELDS else base[name]
                if getattr(reference, name) != ours:
                    raise QwenlinkError(f"reference config: {name} is {getattr(reference, name)} but the Megatron "
                                        f"checkpoint {self.root} has {ours}")
        return ModelConfig.from_hf_dict(base, source=str(first))

    def _check_shapes(self) -> None:
        """Every tensor of every rank against the shape the config implies (catches args that lie), and floating
        point (an integer tensor would otherwise be cast into the weights silently)."""
        cfg, tp = self.config, self.layout.tp
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d // tp
        expected = {"embed": (self.padded_vocab // tp, h), "head": (self.padded_vocab // tp, h),
                    "head_copy": (self.padded_vocab // tp, h), "final_norm": (h,), "input_norm": (h,),
                    "post_norm": (h,), "qkv.weight": (qkv_rows, h), "qkv.bias": (qkv_rows,),
                    "proj": (h, cfg.num_attention_heads * d // tp), "fc1": (2 * cfg.intermediate_size // tp, h),
                    "fc2": (h, cfg.intermediate_size // tp)}
        if cfg.is_moe:
            expected.update(moe_shapes(h, cfg.num_experts, cfg.moe_intermediate_size,
                                       cfg.shared_expert_intermediate_size, tp))
        for (t, p, c), flat in self.chunks.items():
            for (role, j), tensor in flat.items():
                expert = parse_expert_role(role)
                want = expected.get(f"experts.{expert[1]}" if expert else role)
                file, name = self._file_and_name(t, p, role, j)
                if want is None:
                    raise QwenlinkError(f"{file}: unexpected tensor {name} (the checkpoint has no MoE router)")
                if tuple(tensor.shape) != want:
                    raise QwenlinkError(f"{file}: tensor {name} has shape {list(tensor.shape)}, expected {list(want)} "
                                        f"from the checkpoint's args (hidden {h}, heads {cfg.num_attention_heads}, "
                                        f"groups {cfg.num_key_value_heads}, ffn {cfg.intermediate_size}"
                                        + (f", experts {cfg.num_experts} of ffn {cfg.moe_intermediate_size}, shared "
                                           f"ffn {cfg.shared_expert_intermediate_size}" if cfg.is_moe else "")
                                        + f", TP {tp})")
                check_float(str(file), name, tensor.dtype)
            for j in {j for (_, j) in flat if j is not None}:
                moe_layer = ("router", j) in flat
                mlp = required_moe_roles(cfg.num_experts) if moe_layer else ["fc1", "fc2"]
                for role in ["input_norm", "qkv.weight", "proj", "post_norm"] + mlp + (
                        ["qkv.bias"] if cfg.qkv_bias else []):
                    if (role, j) not in flat:
                        file, name = self._file_and_name(t, p, role, j)
                        what = " (every routed expert, the router and the gated shared expert must be present)" \
                            if moe_layer else ""
                        raise QwenlinkError(f"{file}: tensor {name} missing{what}")
                for role in (["fc1", "fc2"] if moe_layer else list(MOE_ROLES)):
                    if (role, j) in flat:
                        raise QwenlinkError(f"{self.files[(t, p)]}: tensor {key_name(self.naming, role, j)} in a "
                                            f"layer that {'has' if moe_layer else 'lacks'} an MoE router (a layer's "
                                            f"MLP is either dense or a mixture of experts)")

    # ---- tensors --------------------------------------------------------------------------------------------------
    def _where(self, layer: int) -> tuple[int, int, int]:
        for p in range(self.layout.pp):
            for c in range(self.layout.vpp):
                held = self.layout.global_layers(p, c)
                if layer in held:
                    return p, c, held.index(layer)
        raise QwenlinkError(f"{self.dir}: layer {layer} not found")

    def _load_stage(self, p: int) -> None:
        if self._stage == p:
            return
        self.chunks.clear()  # unmaps the previous stage once its tensors are no longer referenced
        for t in range(self.layout.tp):
            chunks = self._rank_chunks(t, p, lambda e: safe_torch_load(self.expert_files[(t, p, e)]))
            for c, (_, _, flat) in enumerate(chunks):
                self.chunks[(t, p, c)] = flat
        self._stage = p

    def _shards(self, p: int, c: int, key: Key) -> list[torch.Tensor]:
        self._load_stage(p)
        return [self.chunks[(t, p, c)][key] for t in range(self.layout.tp)]

    def _replicated(self, p: int, c: int, key: Key) -> torch.Tensor:
        shards = self._shards(p, c, key)
        for t, s in enumerate(shards[1:], start=1):
            if not torch.equal(s, shards[0]):
                raise QwenlinkError(f"{self.files[(t, p)]}: inconsistent TP shards: replicated tensor "
                                    f"{key_name(self.naming, *key)} differs from tensor rank 0")
        return shards[0]

    def get(self, name: str) -> torch.Tensor:
        """One tensor by qwenlink name, un-fused, un-split and with the vocab padding removed."""
        cfg = self.config
        last = (self.layout.pp - 1, self.layout.vpp - 1)
        if name == "embed_tokens.weight" or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            return torch.cat(self._shards(0, 0, ("embed", None)), dim=0)[: cfg.vocab_size]
        if name == "lm_head.weight":
            return torch.cat(self._shards(*last, ("head", None)), dim=0)[: cfg.vocab_size]
        if name == "norm.weight":
            return self._replicated(*last, ("final_norm", None))
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) < 4:
            raise KeyError(name)
        p, c, j = self._where(int(parts[1]))
        rest = ".".join(parts[2:])
        nh, ng, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if rest == "input_layernorm.weight":
            return self._replicated(p, c, ("input_norm", j))
        if rest == "post_attention_layernorm.weight":
            return self._replicated(p, c, ("post_norm", j))
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            kind = rest.rsplit(".", 1)[1]
            fused = torch.cat(self._shards(p, c, (f"qkv.{kind}", j)), dim=0)
            q, k, v = ml.split_qkv(fused, nh, ng, d)
            return {"q_proj": q, "k_proj": k, "v_proj": v}[rest.split(".")[1]]
        if rest == "self_attn.o_proj.weight":
            return torch.cat(self._shards(p, c, ("proj", j)), dim=1)
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            gate, up = ml.split_gate_up(self._shards(p, c, ("fc1", j)))
            return gate if rest.startswith("mlp.gate") else up
        if rest == "mlp.down_proj.weight":
            return torch.cat(self._shards(p, c, ("fc2", j)), dim=1)
        if rest.startswith("mlp.") and cfg.is_moe_layer(int(parts[1])):
            return self._moe_tensor(p, c, j, rest[4:], name)
        raise KeyError(name)

    def _moe_tensor(self, p: int, c: int, j: int, rest: str, name: str) -> torch.Tensor:
        """An MoE layer's tensor by qwenlink name (after `mlp.`); routed experts stacked [E, ...] as the model holds
        them."""
        if rest == "gate.weight":
            return self._replicated(p, c, ("router", j))
        if rest == "shared_expert_gate.weight":
            return self._replicated(p, c, ("shared.gate", j))
        if rest in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"):
            gate, up = ml.split_gate_up(self._shards(p, c, ("shared.fc1", j)))
            return gate if rest.startswith("shared_expert.gate") else up
        if rest == "shared_expert.down_proj.weight":
            return torch.cat(self._shards(p, c, ("shared.fc2", j)), dim=1)
        experts = range(self.config.num_experts)
        if rest in ("experts.gate_proj.weight", "experts.up_proj.weight"):
            half = 0 if rest.startswith("experts.gate") else 1
            return torch.stack([ml.split_gate_up(self._shards(p, c, (expert_role(g, "fc1"), j)))[half]
                                for g in experts])
        if rest == "experts.down_proj.weight":
            return torch.stack([torch.cat(self._shards(p, c, (expert_role(g, "fc2"), j)), dim=1) for g in experts])
        raise KeyError(name)
