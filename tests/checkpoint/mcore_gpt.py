"""megatron-core itself, in a child process: save a GPTModel with `dist_checkpointing.save`, or load a checkpoint into
one with `dist_checkpointing.load`, and write its logits.

Run as `python mcore_gpt.py SPEC.json` (spec: mode save|load, dir, model shape, seed, tokens, logits output). A child
process because megatron-core needs a process group (gloo, world size 1), its global parallel state and, on a CPU-only
torch, `torch.cuda.current_device`/`synchronize` stubbed; none of that may leak into the test process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch


def _setup() -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.cuda.current_device = lambda: "cpu"  # megatron-core moves rotary frequencies to "the current device"
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # no dropout in eval


def _model(spec: dict):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = spec["model"]
    cfg = TransformerConfig(
        num_layers=m["layers"], hidden_size=m["hidden"], num_attention_heads=m["heads"], num_query_groups=m["groups"],
        ffn_hidden_size=m["ffn"], normalization="RMSNorm", layernorm_epsilon=m["eps"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=m["qkv_bias"],
        use_cpu_initialization=True, params_dtype=torch.float32, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=m["padded_vocab"],
                    max_sequence_length=128, position_embedding_type="rope", rotary_base=m["theta"],
                    share_embeddings_and_output_weights=m["tied"]).eval()


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    t = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, t, t), diagonal=1).bool()
    with torch.no_grad():
        return model(tokens, torch.arange(t)[None], mask)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    _setup()
    from megatron.core import dist_checkpointing
    from megatron.core.enums import ModelType

    model = _model(spec)
    root = Path(spec["dir"])
    if spec["mode"] == "save":
        gen = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():  # every tensor random (norms and biases too), so any mix-up changes the logits
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        it_dir = root / "iter_0000001"
        it_dir.mkdir(parents=True)
        args = argparse.Namespace(**spec["args"], model_type=ModelType.encoder_or_decoder)
        state = {"args": args, "iteration": 1, "checkpoint_version": 3.0, "model": model.sharded_state_dict()}
        dist_checkpointing.save(state, str(it_dir))
        (root / "latest_checkpointed_iteration.txt").write_text("1")
    else:
        sharded = model.sharded_state_dict()
        loaded = dist_checkpointing.load(sharded, str(root / "iter_0000001"), strict="raise_all")
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in loaded.items() if k in own}, strict=True)
    torch.save(_logits(model, torch.tensor(spec["tokens"])), spec["logits"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
