"""The architecture hyper-parameters of a Qwen1.5 (HF `Qwen2ForCausalLM`) model and what follows from them.

One dataclass is the single source of truth for sizes; parameter counts and FLOPs are computed here, and the HF
`config.json` is read and written here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qwenlink.errors import QwenlinkError

# HF architectures qwenlink can load: Qwen2 (Qwen1.5's HF class), Llama (same blocks, no q/k/v bias by default) and
# Qwen2-MoE (Qwen1.5-MoE: the same attention, routed + shared experts in place of the dense MLP).
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen2_moe")
HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# Qwen2-MoE fields (HF Qwen2MoeConfig names); num_experts = 0 is a dense model.
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef")


@dataclass
class ModelConfig:
    """Hyper-parameters named as in HF's Qwen2Config so the mapping to config.json is one-to-one."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    initializer_range: float = 0.02
    model_type: str = "qwen2"
    # Mixture of experts (model_type qwen2_moe); num_experts = 0 means every layer has the dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # Unmodelled config.json entries (e.g. transformers_version) kept so a round trip does not lose them.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Reject impossible shapes with a message that names the fields involved."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise QwenlinkError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise QwenlinkError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                                f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenlinkError(f"model config: num_attention_heads {self.num_attention_heads} is not divisible by "
                                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise QwenlinkError(f"model config: head dim {self.head_dim} must be even for rotary embeddings")
        if self.num_experts:
            self._validate_moe()

    def _validate_moe(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                     "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise QwenlinkError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise QwenlinkError(f"model config: num_experts_per_tok {self.num_experts_per_tok} is above num_experts "
                                f"{self.num_experts} (top-k must pick among the experts)")
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise QwenlinkError(f"model config: mlp_only_layers entry {bad[0]!r} is not a layer index "
                                f"(0..{self.num_hidden_layers - 1})")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """HF's rule: a layer is sparse unless listed in mlp_only_layers or skipped by decoder_sparse_step."""
        return self.num_experts > 0 and index not in self.mlp_only_layers and \
            (index + 1) % self.decoder_sparse_step == 0

    # ---- sizes ------------------------------------------------------------------------------------------------------
    def _mlp_params(self, index: int, active: bool) -> int:
        """One layer's feed-forward parameters; `active`: only the experts one token runs through (top-k)."""
        h = self.hidden_size
        if not self.is_moe_layer(index):
            return 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        shared = 3 * h * self.shared_expert_intermediate_size + h  # the shared expert and its gate
        return h * self.num_experts + experts * 3 * h * self.moe_intermediate_size + shared

    def num_params(self, active: bool = False) -> int:
        """Total parameters (a tied lm_head shares the embedding and is counted once); `active`: those one token
        uses (for a mixture of experts, the router, the top-k routed experts and the shared expert)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h + (h + 2 * kv if self.qkv_bias else 0)
        layers = sum(attention + self._mlp_params(i, active) + 2 * h for i in range(self.num_hidden_layers))
        embedding = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embedding + layers + h + head

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + 12 x layers x hidden x seq_length (attention scores).

        The input embedding is a lookup, not a matmul, so it is excluded; the output projection is a matmul and is
        counted even when it shares weights with the embedding (torchtitan's convention, corrected for tying). For a
        mixture of experts only the parameters a token is routed through count (`num_params(active=True)`).
        """
        matmul_params = self.num_params(active=True) - self.vocab_size * self.hidden_size
        if self.tie_word_embeddings:
            matmul_params += self.vocab_size * self.hidden_size
        return 6.0 * matmul_params + 12.0 * self.num_hidden_layers * self.hidden_size * seq_length

    # ---- HF config.json -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from an HF config.json dict, refusing architectures and options qwenlink does not implement."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures")
            raise QwenlinkError(f"{source}: unsupported architecture model_type={model_type!r} "
                                f"(architectures={archs}); qwenlink supports Qwen2ForCausalLM (Qwen1.5) and Llama")
        if hf.get("rope_scaling") not in (None, {}) and (hf.get("rope_scaling") or {}).get("rope_type", "default") != "default":
            raise QwenlinkError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported (expected null)")
        if hf.get("hidden_act", "silu") != "silu":
            raise QwenlinkError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (expected 'silu')")
        if hf.get("use_sliding_window"):
            raise QwenlinkError(f"{source}: use_sliding_window=true is not supported")
        if model_type == "llama" and hf.get("mlp_bias"):
            raise QwenlinkError(f"{source}: mlp_bias=true is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in hf:
                raise QwenlinkError(f"{source}: missing field {key!r}")
        rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        known = {f.name for f in dataclasses.fields(cls)} | {"architectures", "rope_parameters", "torch_dtype",
                                                             "dtype", "attention_bias"}
        moe = _moe_fields(hf, source) if model_type == "qwen2_moe" else {}
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=_qkv_bias(hf, model_type),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                model_type=model_type,
                extra={k: v for k, v in hf.items() if k not in known},
                **moe,
            )
        except QwenlinkError as exc:
            raise QwenlinkError(f"{source}: {exc}") from None

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The config.json transformers expects for this architecture."""
        out: dict[str, Any] = dict(self.extra)
        out.update({
            "architectures": [HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": dtype,
        })
        if self.model_type == "qwen2_moe":
            out.update({name: getattr(self, name) for name in MOE_FIELDS})
            out["qkv_bias"] = self.qkv_bias
            out.setdefault("output_router_logits", False)
        if self.model_type in ("qwen2", "qwen2_moe"):
            out.setdefault("use_sliding_window", False)
            out.setdefault("sliding_window", None)
            out.setdefault("max_window_layers", self.num_hidden_layers)
        else:
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        out.pop("rope_scaling", None)
        out["rope_scaling"] = None
        return out


def _qkv_bias(hf: dict[str, Any], model_type: str) -> bool:
    """Qwen2 always has q/k/v biases; Qwen2-MoE says so in `qkv_bias` (default true); Llama in `attention_bias`."""
    if model_type == "qwen2":
        return True
    if model_type == "qwen2_moe":
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", False))


def _moe_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The Qwen2-MoE fields of a config.json (HF's defaults where absent), refusing what qwenlink does not run."""
    if "num_experts" not in hf:
        raise QwenlinkError(f"{source}: missing field 'num_experts' (model_type qwen2_moe)")
    num_experts = hf["num_experts"]
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise QwenlinkError(f"{source}: num_experts must be a positive integer, got {num_experts!r}")
    top_k = hf.get("num_experts_per_tok", 4)
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > num_experts:
        raise QwenlinkError(f"{source}: num_experts_per_tok {top_k} is above num_experts {num_experts} "
                            f"(top-k must pick among the experts)")
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": hf.get("moe_intermediate_size", 1408),
        "shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size", 5632),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "decoder_sparse_step": hf.get("decoder_sparse_step", 1),
        "mlp_only_layers": list(hf.get("mlp_only_layers") or []),
        "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
    }
