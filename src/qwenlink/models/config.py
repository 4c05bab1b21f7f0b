"""The architecture hyper-parameters of a Qwen1.5 (HF `Qwen2ForCausalLM`) model and what follows from them.

One dataclass is the single source of truth for sizes; parameter counts and FLOPs are computed here, and the HF
`config.json` is read and written here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qwenlink.errors import QwenlinkError

# HF architectures qwenlink can load: Qwen2 (Qwen1.5's HF class) and Llama (same blocks, no q/k/v bias by default).
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


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

    # ---- sizes ------------------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Total parameters (a tied lm_head shares the embedding and is counted once)."""
        h, f, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h + (h + 2 * kv if self.qkv_bias else 0)
        per_layer = attention + 3 * h * f + 2 * h
        embedding = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embedding + self.num_hidden_layers * per_layer + h + head

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + 12 x layers x hidden x seq_length (attention scores).

        The input embedding is a lookup, not a matmul, so it is excluded; the output projection is a matmul and is
        counted even when it shares weights with the embedding (torchtitan's convention, corrected for tying).
        """
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size
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
                qkv_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                model_type=model_type,
                extra={k: v for k, v in hf.items() if k not in known},
            )
        except QwenlinkError as exc:
            raise QwenlinkError(f"{source}: {exc}") from None

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The config.json transformers expects for this architecture."""
        out: dict[str, Any] = dict(self.extra)
        out.update({
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
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
        if self.model_type == "qwen2":
            out.setdefault("use_sliding_window", False)
            out.setdefault("sliding_window", None)
            out.setdefault("max_window_layers", self.num_hidden_layers)
        else:
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        out.pop("rope_scaling", None)
        out["rope_scaling"] = None
        return out
