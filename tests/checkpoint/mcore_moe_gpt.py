"""megatron-core's own MoE GPTModel, in a child process: load one `model_optim_rng.pt` that qwenlink wrote into it with
`load_state_dict(strict=True)` and write its logits.

Run as `python mcore_moe_gpt.py SPEC.json` (spec: file, model shape, tokens, logits output). The model is megatron-
core's local layer spec with SequentialMLP experts (moe_grouped_gemm off), configured as Qwen2-MoE computes: softmax
over all experts before top-k (moe_router_pre_softmax, no renormalisation: norm_topk_prob false), a shared expert
scaled by sigmoid(gate_weight . x) (moe_shared_expert_gate), q/k/v bias, SwiGLU, RMSNorm, rotary, untied head. The
setup (gloo world of one, CPU stubs) is mcore_gpt.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mcore_gpt import _logits, _setup  # noqa: E402


def _model(m: dict):
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
        moe_grouped_gemm=False)
    spec = get_gpt_layer_local_spec(num_experts=m["experts"], moe_grouped_gemm=False, normalization="RMSNorm")
    return GPTModel(cfg, spec, vocab_size=m["padded_vocab"], max_sequence_length=128, position_embedding_type="rope",
                    rotary_base=m["theta"], share_embeddings_and_output_weights=False).eval()


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    _setup()
    from qwenlink.checkpoint.safe_load import safe_torch_load

    model = _model(spec["model"])
    state = safe_torch_load(spec["file"], mmap=False)["model"]
    model.load_state_dict(state, strict=True)
    torch.save(_logits(model, torch.tensor(spec["tokens"])), spec["logits"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
