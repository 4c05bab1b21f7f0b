"""Shared by the export tests (train/test_export.py in one process, parallel/test_export_layouts.py under torchrun):
a model big enough for host memory to be measured, deterministic adapter values any layout can set, the reference
export (what one process writes: `save_hf_model` of the model, LoRA merged with `merge_lora`) and bitwise comparison.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional

import torch

from common import fixture_dir
from qwenlink.checkpoint.hf import iter_hf_tensors, load_hf_model, save_hf_model
from qwenlink.checkpoint.peft import save_model_adapter
from qwenlink.checkpoint.shards import copy_into
from qwenlink.models.config import ModelConfig
from qwenlink.models.lora import LoraConfig, apply_lora, is_adapter_key, merge_lora
from qwenlink.models.qwen2 import build_model

# ~33 MB in fp32, nearly all in the decoder layers, so one pipeline stage holds about half of it.
SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
LORA = dict(r=4, alpha=8.0, target_modules=["all-linear"])


def tokenizer_dir() -> Path:
    """A small tokenizer (the tiny fixture's BPE), so loading it adds next to nothing to the exporter's memory."""
    return fixture_dir("megatron-core-tiny-qwen2", "hf")


def model_config(tied: bool) -> ModelConfig:
    return ModelConfig(**SHAPE, tie_word_embeddings=tied)


def write_init(directory: Path, tied: bool) -> Path:
    """The initial weights every run loads (random init differs between layouts; loaded weights do not)."""
    save_hf_model(build_model(model_config(tied), seed=5), directory)
    return directory


def lora_args(modules_to_save: str) -> list[str]:
    return ["--lora.enabled=true", f"--lora.r={LORA['r']}", f"--lora.alpha={LORA['alpha']}",
            '--lora.target_modules=["all-linear"]', f'--lora.modules_to_save=["{modules_to_save}"]']


def lora_config(modules_to_save: str) -> LoraConfig:
    return LoraConfig(**LORA, modules_to_save=[modules_to_save])


def adapter_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A nonzero value for adapter `name` that depends on nothing but its name (any layout sets the same)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen) * 0.05


@torch.no_grad()
def set_adapters(model: torch.nn.Module) -> int:
    """Give every adapter matrix of `model` (sharded or not) its `adapter_value`; returns how many were set."""
    count = 0
    for raw, param in model.named_parameters():
        name = raw.replace("_checkpoint_wrapped_module.", "")
        if is_adapter_key(name):
            full = adapter_value(name, tuple(param.shape))
            copy_into(param, lambda index: full if index is None else full[index])
            count += 1
    return count


def reference_hf(init: Path, out: Path, lora: Optional[LoraConfig] = None) -> Path:
    """What one process writes for the loaded model: save_hf_model, the adapters merged into a copy first."""
    from qwenlink.tokenizer import load_tokenizer

    model = load_hf_model(init)
    if lora is not None:
        apply_lora(model, lora)
        set_adapters(model)
        model = merge_lora(model)
    return save_hf_model(model, out, tokenizer=load_tokenizer(str(tokenizer_dir())))


def reference_adapter(init: Path, out: Path, lora: LoraConfig) -> Path:
    model = apply_lora(load_hf_model(init), lora)
    set_adapters(model)
    return save_model_adapter(model, out, lora, base_model=str(init))


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (one file or shards with an index)."""
    return {key: f.get_tensor(key) for _, key, f in iter_hf_tensors(directory)}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == want.keys(), f"{where}: {sorted(got.keys() ^ want.keys())[:4]} differ"
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{where}: {name} differs"


def assert_same_hf(got: Path, want: Path) -> None:
    """Bitwise the same tensors under the same names, and the same config, generation config and tokenizer."""
    assert_same_tensors(hf_tensors(got), hf_tensors(want), str(got))
    for name in ("config.json", "generation_config.json"):
        assert json.loads((got / name).read_text()) == json.loads((want / name).read_text()), f"{got}: {name}"
    others = {p.name for p in want.iterdir() if not p.name.startswith("model")}
    assert others <= {p.name for p in got.iterdir()}, f"{got}: missing {others}"


def assert_same_adapter(got: Path, want: Path) -> None:
    from safetensors.torch import load_file

    assert_same_tensors(load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors"),
                        str(got))
    assert json.loads((got / "adapter_config.json").read_text()) == \
        json.loads((want / "adapter_config.json").read_text())
