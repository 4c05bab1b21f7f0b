"""LoRA adapters in PEFT's file format: `adapter_config.json` + `adapter_model.safetensors`.

Why PEFT's format: it is what `peft.PeftModel.from_pretrained`, vLLM and the Hub exchange, so an adapter trained here
serves anywhere and a PEFT-made adapter runs here. Key names are PEFT's for transformers' Qwen2ForCausalLM:

    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight   [r, in]    <-> layers.N.self_attn.q_proj.lora_A
    base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight   [out, r]   <-> layers.N.self_attn.q_proj.lora_B
    base_model.model.model.embed_tokens.weight / base_model.model.lm_head.weight    (modules_to_save)

Reading never guesses: every tensor must belong to a module the config targets and the model has, every targeted
module must have both matrices, and every shape must match the model; the first violation is a one-line error that
names the tensor (ModelLink once ran inference without an adapter it could not match; this must not).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from qwenlink.checkpoint.dtypes import check_float
from qwenlink.checkpoint.safetensors_io import save_file
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path, read_json_object
from qwenlink.models.config import ModelConfig
from qwenlink.models.lora import PROJECTIONS, LoraConfig, apply_lora, iter_lora_modules, merged_weight

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)$")
# adapter_config.json fields whose non-default values change the maths in ways qwenlink does not implement.
_UNSUPPORTED: dict[str, Any] = {"use_dora": False, "fan_in_fan_out": False, "layers_to_transform": None,
                                "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
                                "target_parameters": None, "trainable_token_indices": None,
                                "layer_replication": None, "use_qalora": False}


def peft_key(name: str) -> str:
    """qwenlink tensor name -> PEFT's key (HF module path under `base_model.model.`, `.weight` on adapters)."""
    hf = name if name.startswith("lm_head.") else f"model.{name}"
    return PEFT_PREFIX + (hf + ".weight" if hf.endswith((".lora_A", ".lora_B")) else hf)


def qwenlink_key(key: str) -> Optional[str]:
    """PEFT key -> qwenlink name (adapter names such as `.default` tolerated), or None if it is not PEFT's form."""
    if not key.startswith(PEFT_PREFIX):
        return None
    name = key[len(PEFT_PREFIX):].replace(".modules_to_save.default.", ".")
    name = re.sub(r"\.(lora_[AB])(\.[A-Za-z0-9_]+)?\.weight$", r".\1", name)  # lora_A.default.weight -> lora_A
    return name[len("model."):] if name.startswith("model.") else name


def expected_shapes(config: ModelConfig, r: int) -> dict[str, tuple[int, int]]:
    """Shape of every possible adapter matrix of a model: A [r, in], B [out, r] per projection and layer."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}  # (in, out)
    out = {}
    for i in range(config.num_hidden_layers):
        for proj, (fan_in, fan_out) in dims.items():
            base = f"layers.{i}.{PROJECTIONS[proj]}.{proj}"
            out[f"{base}.lora_A"] = (r, fan_in)
            out[f"{base}.lora_B"] = (fan_out, r)
    return out


@dataclass
class Adapter:
    """A LoRA adapter read from disk: its hyper-parameters, the modules it adapts and its tensors (qwenlink names)."""

    lora: LoraConfig
    modules: list[str]  # adapted projections, e.g. "layers.0.self_attn.q_proj"
    state: dict[str, torch.Tensor]
    base_model: Optional[str]
    path: Path
    keys: dict[str, str]  # qwenlink name -> key in the file (for messages)


def adapter_config_dict(lora: LoraConfig, *, base_model: Optional[str] = None,
                        modules_to_save: tuple[str, ...] = ()) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a LoRA on a causal LM (HF module names)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else float(lora.alpha)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.r, "lora_alpha": alpha, "lora_dropout": float(lora.dropout), "use_rslora": lora.use_rslora,
            "target_modules": list(lora.targets()), "modules_to_save": list(modules_to_save) or None,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "revision": None}


def save_peft_adapter(directory: str | os.PathLike, state: dict[str, torch.Tensor], lora: LoraConfig,
                      config: ModelConfig, *, base_model: Optional[str] = None,
                      dtype: Optional[torch.dtype] = None) -> Path:
    """Write `state` (qwenlink names: `...lora_A/B` + modules_to_save weights) as a PEFT adapter directory.

    The state is validated against `config` first, so a written adapter always loads back onto its model.
    """
    directory = Path(directory)
    saved = tuple(m for m in ("embed_tokens", "lm_head") if f"{m}.weight" in state)
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".lora_A", ".lora_B"))})
    if not modules:
        raise QwenlinkError("no LoRA adapter tensors to save (is LoRA enabled for this model?)")
    feed_forward = [m for m in modules if ".mlp." in m]
    if config.is_moe and feed_forward:
        raise QwenlinkError(f"{directory}: adapters on a mixture of experts' feed-forward ({feed_forward[0]}, ...) "
                            f"have no PEFT format; merge them instead (`qwenlink convert --to hf`)")
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, config, lora.r, modules, saved, where=str(directory))
    tensors = {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[peft_key(name)] = t.contiguous()
    with atomic_path(directory, is_dir=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = adapter_config_dict(lora, base_model=base_model, modules_to_save=saved)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return directory


def save_model_adapter(model: torch.nn.Module, directory: str | os.PathLike, lora: LoraConfig, *,
                       base_model: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Export the trainable tensors of a LoRA model (single process or gathered DTensors) as a PEFT adapter."""
    from qwenlink.models.lora import trainable_state_dict

    return save_peft_adapter(directory, trainable_state_dict(model), lora, model.config, base_model=base_model,
                             dtype=dtype)


# ---- reading --------------------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise QwenlinkError(f"{path}: LoRA adapter directory not found")
    if not file.is_file():
        raise QwenlinkError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    data = read_json_object(file)
    if data.get("peft_type", "LORA") != "LORA":
        raise QwenlinkError(f"{file}: peft_type {data.get('peft_type')!r} is not supported (only LORA)")
    for key, default in _UNSUPPORTED.items():
        if data.get(key, default) not in (default, None, {}, False):
            raise QwenlinkError(f"{file}: {key} = {data[key]!r} is not supported by qwenlink (expected "
                                f"{default!r})")
    if data.get("bias", "none") != "none":
        raise QwenlinkError(f"{file}: bias = {data['bias']!r} is not supported (expected 'none')")
    return data


def _targeted_modules(spec: Any, config: ModelConfig, file: Path) -> list[str]:
    """The qwenlink module names an adapter_config's target_modules select on a model of `config`.

    A list names module suffixes (HF or ModelLink names); a string is PEFT's regex over full HF module names.
    """
    candidates = [f"layers.{i}.{parent}.{proj}" for i in range(config.num_hidden_layers)
                  for proj, parent in PROJECTIONS.items()]
    if isinstance(spec, str):
        chosen = [c for c in candidates if re.fullmatch(spec, f"model.{c}")]
        if not chosen:
            raise QwenlinkError(f"{file}: target_modules regex {spec!r} matches no projection of this model")
        return chosen
    if not isinstance(spec, list) or not spec:
        raise QwenlinkError(f"{file}: target_modules must be a non-empty list or a regex string, got {spec!r}")
    try:
        projections = LoraConfig(r=1, target_modules=list(spec)).targets()
    except QwenlinkError as exc:
        raise QwenlinkError(f"{file}: {exc}") from None
    return [c for c in candidates if c.rsplit(".", 1)[-1] in projections]


def check_tensors(shapes: dict[str, tuple[int, ...]], config: ModelConfig, r: int, modules: list[str],
                  saved: tuple[str, ...], *, where: str, keys: Optional[dict[str, str]] = None) -> None:
    """Every tensor belongs to a targeted module of this model with the right shape, and nothing is missing."""
    keys = keys or {}
    possible = expected_shapes(config, r)
    wanted = {f"{m}.{ab}" for m in modules for ab in ("lora_A", "lora_B")}
    full_shape = (config.vocab_size, config.hidden_size)
    for name, shape in sorted(shapes.items(), key=lambda item: _model_order(item[0])):
        shown = keys.get(name, name)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            if name.split(".")[0] not in saved:
                raise QwenlinkError(f"{where}: tensor {shown!r} is not listed in modules_to_save")
            if tuple(shape) != full_shape:
                raise QwenlinkError(f"{where}: tensor {shown!r} has shape {list(shape)}, but the model's "
                                    f"{name.split('.')[0]} is {list(full_shape)} (vocab_size x hidden_size)")
            continue
        match = _LORA_KEY.match(name)
        if match is None or name not in possible:
            raise QwenlinkError(f"{where}: tensor {shown!r} does not belong to any projection of this model "
                                f"({config.num_hidden_layers} layers; projections "
                                f"{', '.join(PROJECTIONS)})")
        if name not in wanted:
            raise QwenlinkError(f"{where}: tensor {shown!r} adapts {name.rsplit('.', 1)[0]}, which target_modules "
                                f"does not select")
        if tuple(shape) != possible[name]:
            raise QwenlinkError(f"{where}: tensor {shown!r} has shape {list(shape)}, expected {list(possible[name])} "
                                f"for r={r} on this model (hidden_size {config.hidden_size}, intermediate_size "
                                f"{config.intermediate_size}); the adapter was made for a different model or rank")
    for name in sorted(wanted - set(shapes), key=_model_order):
        raise QwenlinkError(f"{where}: adapter has no tensor {peft_key(name)!r} although target_modules selects "
                            f"{name.rsplit('.', 1)[0]}")
    for module in saved:
        if f"{module}.weight" not in shapes:
            raise QwenlinkError(f"{where}: modules_to_save lists {module!r} but the adapter has no "
                                f"{peft_key(module + '.weight')!r}")


def _model_order(name: str) -> tuple:
    """Sort key putting tensors in the order the model runs them, so "the first mismatch" is the earliest module."""
    match = _LORA_KEY.match(name)
    if match is None:
        return (0 if name.startswith("embed_tokens") else 2, 0, 0, name)
    proj = list(PROJECTIONS).index(match[3]) if match[3] in PROJECTIONS else len(PROJECTIONS)
    return (1, int(match[1]), proj, match[4])


def read_peft_adapter(directory: str | os.PathLike, config: ModelConfig) -> Adapter:
    """Read and validate a PEFT LoRA adapter against a model architecture; raises on the first mismatch."""
    path = Path(directory)
    data = _read_config(path)
    file = path / CONFIG_FILE
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise QwenlinkError(f"{path}: adapter_model.bin (pickle) is not read; re-save the adapter with "
                                f"safe_serialization=True")
        raise QwenlinkError(f"{path}: no {WEIGHTS_FILE}")
    r = data.get("r")
    try:
        saved_raw = data.get("modules_to_save") or []
        lora = LoraConfig(r=r, alpha=data.get("lora_alpha", 8), dropout=float(data.get("lora_dropout") or 0.0),
                          target_modules=["q_proj"], modules_to_save=list(saved_raw),
                          use_rslora=bool(data.get("use_rslora", False)))
    except (QwenlinkError, TypeError, ValueError) as exc:
        raise QwenlinkError(f"{file}: {exc}") from None
    modules = _targeted_modules(data.get("target_modules"), config, file)
    lora.target_modules = sorted({m.rsplit(".", 1)[-1] for m in modules}, key=list(PROJECTIONS).index)
    saved = lora.saved_modules()
    state, keys = {}, {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = qwenlink_key(key)
                if name is None:
                    raise QwenlinkError(f"{weights}: tensor {key!r} is not a PEFT key for a causal LM "
                                        f"(expected the prefix {PEFT_PREFIX!r})")
                if name in state:
                    raise QwenlinkError(f"{weights}: tensor {key!r} appears twice (as {keys[name]!r})")
                state[name] = f.get_tensor(key)
                keys[name] = key
                check_float(str(weights), key, state[name].dtype)
    except QwenlinkError:
        raise
    except Exception as exc:
        raise QwenlinkError(f"{weights}: unreadable ({str(exc).strip().splitlines()[0]})") from None
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, config, lora.r, modules, saved, where=str(weights),
                  keys=keys)
    return Adapter(lora=lora, modules=modules, state=state, base_model=data.get("base_model_name_or_path"),
                   path=path, keys=keys)


@torch.no_grad()
def apply_peft_adapter(model: torch.nn.Module, directory: str | os.PathLike) -> Adapter:
    """Validate an adapter against `model`, add LoRA modules for exactly its targets and load its tensors.

    The adapter is applied without merging (the base weights are untouched); tensors take the model's dtype.
    """
    adapter = read_peft_adapter(directory, model.config)
    apply_lora(model, adapter.lora, modules=set(adapter.modules))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in adapter.state.items():
        param = params.get(name)
        if param is None:  # a pipeline stage without this module, or a bug: never skip silently on a full model
            raise QwenlinkError(f"{adapter.path}: model has no parameter for adapter tensor {adapter.keys[name]!r}")
        param.copy_(tensor.to(param.dtype))
    if model.config.tie_word_embeddings and {"embed_tokens.weight", "lm_head.weight"} <= set(adapter.state):
        if not torch.equal(adapter.state["embed_tokens.weight"], adapter.state["lm_head.weight"]):
            raise QwenlinkError(f"{adapter.path}: the model ties lm_head to embed_tokens, but the adapter saves "
                                f"different embed_tokens and lm_head weights")
    loaded = {n for n, _ in iter_lora_modules(model)}
    if loaded != set(adapter.modules):  # defensive: what runs must be exactly what the file holds
        raise QwenlinkError(f"{adapter.path}: adapter modules do not match the model's layers")
    return adapter


class MergedLoraSource:
    """A tensor source (checkpoint/convert.py) whose projections have an adapter folded in: W + scaling x B @ A.

    Merging per tensor keeps `qwenlink convert --merge-lora` streaming: one base tensor in memory at a time.
    """

    def __init__(self, source, directory: str | os.PathLike) -> None:
        self.source = source
        self.config = source.config
        self.adapter = read_peft_adapter(directory, source.config)
        self._modules = set(self.adapter.modules)

    def get(self, name: str) -> torch.Tensor:
        module = name.rsplit(".", 1)[0]
        state = self.adapter.state
        if name in ("embed_tokens.weight", "lm_head.weight") and name in state:
            return state[name].to(self.source.get(name).dtype)
        if self.config.tie_word_embeddings and name == "lm_head.weight" and "embed_tokens.weight" in state:
            return state["embed_tokens.weight"].to(self.source.get(name).dtype)
        tensor = self.source.get(name)
        if name.endswith(".weight") and module in self._modules:
            tensor = merged_weight(tensor, state[f"{module}.lora_A"], state[f"{module}.lora_B"],
                                   self.adapter.lora.scaling)
        return tensor
