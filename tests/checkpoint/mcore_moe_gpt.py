"""megatron-core's own MoE GPTModel, in child processes: each rank loads the `model_optim_rng.pt` qwenlink wrote for
its (tensor, expert) rank with `load_state_dict(strict=True)` and writes its logits (gathered over the vocab).

Run as `python mcore_moe_gpt.py SPEC.json` (spec: checkpoint dir, tp, ep, model shape, tokens, logits output), once
per rank with RANK / WORLD_SIZE = tp x ep / MASTER_PORT set (one process: rank 0 of 1). The model is megatron-core's
local layer spec with SequentialMLP experts (moe_grouped_gemm off), configured as Qwen2-MoE computes: softmax over all
experts before top-k (moe_router_pre_softmax; without it, a softmax over the k chosen: norm_topk_prob true), a shared
expert scaled by sigmoid(gate_weight . x) (moe_shared_expert_gate), q/k/v bias, SwiGLU, RMSNorm, rotary, untied head;
tokens reach the experts of other expert ranks through the allgather dispatcher. CPU stubs as in mcore_gpt.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mcore_gpt import _logits  # noqa: E402


def _setup(tp: int, ep: int) -> None:
    """gloo over RANK / WORLD_SIZE, megatron-core's parallel state for TP x EP, and mcore_gpt.py's CPU stubs."""
    import contextlib

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))
    dist.init_process_group("gloo", rank=int(os.environ.get("RANK", 0)),
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
    torch.cuda.current_device = lambda: "cpu"  # megatron-core moves rotary frequencies to "the current device"
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # no dropout in eval


def _model(m: dict, tp: int, ep: int):
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16 reads `te_general_gemm` in the router's gating GEMM but only defines it when Transformer
    # Engine imports; without TE the name is missing (NameError), so bind the "no TE" value it would have had.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=m["layers"], hidden_size=m["hidden"], num_attention_heads=m["heads"], num_query_groups=m["groups"],
        ffn_hidden_size=m["ffn"], normalization="RMSNorm", layernorm_epsilon=m["eps"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
        use_cpu_initialization=True, params_dtype=torch.float32, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        num_moe_experts=m["experts"], moe_router_topk=m["top_k"], moe_ffn_hidden_size=m["moe_ffn"],
        moe_shared_expert_intermediate_size=m["shared_ffn"], moe_shared_expert_gate=True,
        moe_router_pre_softmax=m["pre_softmax"], moe_router_score_function="softmax",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False, tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    spec = get_gpt_layer_local_spec(num_experts=m["experts"], moe_grouped_gemm=False, normalization="RMSNorm")
    return GPTModel(cfg, spec, vocab_size=m["padded_vocab"], max_sequence_length=128, position_embedding_type="rope",
                    rotary_base=m["theta"], share_embeddings_and_output_weights=False,
                    parallel_output=False).eval()


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    tp, ep = spec["tp"], spec["ep"]
    _setup(tp, ep)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from qwenlink.checkpoint.megatron import MODEL_FILE, rank_dir_name
    from qwenlink.checkpoint.safe_load import safe_torch_load

    model = _model(spec["model"], tp, ep)
    t, e = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank()
    file = Path(spec["dir"]) / "iter_0000001" / rank_dir_name(t, 0, 1, e, ep) / MODEL_FILE
    model.load_state_dict(safe_torch_load(file, mmap=False)["model"], strict=True)
    torch.save(_logits(model, torch.tensor(spec["tokens"])), f"{spec['logits']}.{dist.get_rank()}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
