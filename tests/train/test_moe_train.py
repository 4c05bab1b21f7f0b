"""Training Qwen1.5-MoE through the trainer (issue #18, deliverable 3): the step's gradients equal transformers'
Qwen2MoeForCausalLM loss + router_aux_loss_coef x aux, the aux loss is reported apart, SFT leaves padding out of it,
LoRA adapts the experts, and what a MoE job cannot combine yet is refused in one line."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from moe_helpers import VOCAB, make_hf_moe_model
from qwenlink.errors import QwenlinkError
from qwenlink.models.lora_experts import LoraStackedLinear
from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.train.data import MicroBatch
from qwenlink.train.moe import check_moe_job
from qwenlink.train.trainer import Trainer


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    return make_hf_moe_model(tmp_path_factory.mktemp("hf_moe_train"))


def _quiet(cfg) -> Trainer:
    return Trainer(cfg, stream=io.StringIO())


def test_step_gradients_equal_transformers_loss_plus_aux(make_config, hf_moe) -> None:
    """One micro batch: LM loss, aux and every gradient (attention, router, experts, shared expert) as transformers
    computes them for loss = CE + 0.001 x aux."""
    hf, path = hf_moe
    t = _quiet(make_config(f"model.init_from={path}", "model.preset=", "train.global_batch_size=2",
                           "checkpoint.save_final=false"))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    step = t.step_fn
    total = step.count_valid([MicroBatch(ids, labels)])
    loss = step.forward_backward([MicroBatch(ids, labels)], total)
    aux = step.router_aux.step_mean(total)
    hf.zero_grad()
    out = hf(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert abs(aux.item() - out.aux_loss.item()) <= 1e-6
    assert abs(loss.item() - (out.loss.item() - 0.001 * out.aux_loss.item())) <= 1e-5
    grads = {n: p.grad for n, p in t.model.named_parameters()}
    ref = {n: p.grad for n, p in hf.named_parameters()}
    ffn = hf.config.moe_intermediate_size
    pairs = [("layers.1.self_attn.q_proj.weight", ref["model.layers.1.self_attn.q_proj.weight"]),
             ("layers.0.mlp.gate.weight", ref["model.layers.0.mlp.gate.weight"]),
             ("layers.0.mlp.shared_expert_gate.weight", ref["model.layers.0.mlp.shared_expert_gate.weight"]),
             ("layers.1.mlp.shared_expert.up_proj.weight", ref["model.layers.1.mlp.shared_expert.up_proj.weight"]),
             ("layers.0.mlp.experts.gate_proj.weight", ref["model.layers.0.mlp.experts.gate_up_proj"][:, :ffn]),
             ("layers.0.mlp.experts.up_proj.weight", ref["model.layers.0.mlp.experts.gate_up_proj"][:, ffn:]),
             ("layers.1.mlp.experts.down_proj.weight", ref["model.layers.1.mlp.experts.down_proj"])]
    for name, expected in pairs:
        assert (grads[name] - expected).abs().max().item() <= 1e-6, name


def test_pretrain_cli_dp2_equals_one_process_and_logs_aux_apart(make_config, hf_moe, tmp_path) -> None:
    """`qwenlink train --nproc 2` (FSDP2, gloo) from the HF MoE checkpoint: per-step LM and aux losses equal the
    one-process trainer's; aux is in the log line and in metrics.jsonl."""
    import os
    import subprocess
    import sys

    _, path = hf_moe
    common = ["model.preset=", f"model.init_from={path}", "train.micro_batch_size=1", "train.train_iters=3",
              "optim.implementation=foreach", "metrics.log_interval=1", "checkpoint.save_final=false"]
    single = _quiet(make_config(*common, out="single"))
    single.train()
    cfg = make_config(*common, out="dp2")
    args = [f"--data.path={cfg.data.path[0]}", "--data.seq_length=16", "--train.global_batch_size=4",
            "--train.device=cpu", "--optim.lr=5e-3", "--optim.min_lr=5e-4", "--optim.warmup_iters=1",
            "--metrics.tensorboard=false", "--metrics.progress=lines", f"--job.output_dir={cfg.job.output_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "qwenlink.cli", "train", *args, *[f"--{o}" for o in common],
                             "--nproc=2"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert " | aux " in result.stdout
    rows = [json.loads(line) for line in (Path(cfg.job.output_dir) / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, ref in zip(rows, single.history):
        assert abs(row["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]
        assert abs(row["aux_loss"] - ref["aux_loss"]) <= 1e-5 and row["aux_loss"] >= 1.0 - 1e-6
        # expert load summed over both ranks' tokens: the one-process step's, per layer and worst
        loads = [k for k in ref if k.startswith("moe/load_max_over_mean")]
        assert sorted(loads) == ["moe/load_max_over_mean", "moe/load_max_over_mean/layer_0",
                                 "moe/load_max_over_mean/layer_1"]
        for key in loads:
            assert abs(row[key] - ref[key]) <= 1e-6 and 1.0 <= row[key] <= 8 / 2, key
    assert " | load " in result.stdout


def test_expert_load_counts_transformers_top_k_choices(make_config, hf_moe) -> None:
    """The step's per-layer tokens per expert (real tokens only) are the counts of transformers' top-k router choices,
    and the metric is each layer's max / mean of them."""
    hf, path = hf_moe
    t = _quiet(make_config(f"model.init_from={path}", "model.preset=", "train.global_batch_size=2",
                           "checkpoint.save_final=false"))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[1, 10:] = -100
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # right padding: left out of the load as of aux
    step = t.step_fn
    batch = MicroBatch(ids, labels, token_mask=mask)
    total = step.count_valid([batch])
    step.forward_backward([batch], total)
    step.router_aux.step_mean(total)
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask, output_router_logits=True).router_logits  # per layer [B x T, E]
    keep = mask.reshape(-1).bool()
    for layer, got in zip(step.router_aux.layers, step.router_aux.step_load):
        chosen = logits[layer].softmax(-1).topk(2, dim=-1).indices[keep]
        expected = torch.bincount(chosen.reshape(-1), minlength=8).float()
        assert torch.equal(got, expected), layer
    ratio = step.router_aux.load_max_over_mean()
    assert torch.allclose(ratio, step.router_aux.step_load.amax(1) / step.router_aux.step_load.mean(1))


def test_sft_leaves_padding_out_of_aux(make_config, sft_prefix: str, hf_moe) -> None:
    """Right-padded SFT rows carry a token mask; aux over the real tokens only, as transformers with the attention
    mask. Full fine-tuning from the HF checkpoint runs to the end."""
    from qwenlink.models.qwen2_moe import load_balancing_loss

    hf, path = hf_moe
    t = _quiet(make_config("job.mode=sft", f"data.path={sft_prefix}", "data.seq_length=32", "data.pad_id=0",
                           f"model.init_from={path}", "model.preset=", "train.train_iters=2",
                           "checkpoint.save_final=false"))
    batch = t.data.next()
    assert batch.token_mask is not None and 0 < int(batch.token_mask.sum()) < batch.token_mask.numel()
    with torch.no_grad():
        ref = hf(batch.input_ids, attention_mask=batch.token_mask, output_router_logits=True).aux_loss
        t.model(batch.input_ids)  # right padding: the real tokens' routing does not depend on the pads
        got = load_balancing_loss(t.model, batch.token_mask)
    assert abs(got.item() - ref.item()) <= 1e-6
    t.train()
    assert len(t.history) == 2 and all(math.isfinite(r["aux_loss"]) for r in t.history)


def test_lora_on_experts_trains_adapters_only_and_exports_merged(make_config, hf_moe, tmp_path) -> None:
    from transformers import Qwen2MoeForCausalLM

    _, path = hf_moe
    t = _quiet(make_config(f"model.init_from={path}", "model.preset=", "lora.enabled=true", "lora.r=4",
                           "lora.target_modules=[\"q_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]",
                           "optim.lr=5e-2", "train.train_iters=2", "checkpoint.save_final=false",
                           f"checkpoint.export_hf={tmp_path / 'merged'}"))
    experts = t.model.layers["0"].mlp.experts
    assert isinstance(experts.down_proj, LoraStackedLinear) and experts.down_proj.lora_A.shape == (8, 4, 32)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}
    assert "layers.0.mlp.experts.gate_proj.lora_B" in changed and "layers.1.mlp.shared_expert.up_proj.lora_B" in changed
    assert all(n.endswith((".lora_A", ".lora_B")) for n in changed)
    assert all(math.isfinite(r["aux_loss"]) for r in t.history)
    merged = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    t.model.eval()
    with torch.no_grad():
        assert (merged(ids).logits - t.model(ids)).abs().max().item() <= 1e-5


def test_unsupported_moe_layouts_and_peft_export_refused(make_config, hf_moe) -> None:
    _, path = hf_moe
    from qwenlink.checkpoint.loader import read_config

    moe = read_config(path)
    with pytest.raises(QwenlinkError, match=r"^parallel.cp = 2: a mixture-of-experts model \(8 experts\) trains "
                                            r"with data, expert, tensor and pipeline parallelism only so far"):
        check_moe_job(moe, ParallelPlan(cp=2), (), "")
    for plan in (ParallelPlan(tp=2, ep=2, dp_shard=2), ParallelPlan(pp=2, ep=2, dp_shard=2)):
        check_moe_job(moe, plan, (), "")  # tests/parallel/test_expert_parallel.py
    with pytest.raises(QwenlinkError, match=r"^lora.export_adapter: adapters on a mixture of experts' feed-forward"):
        _quiet(make_config(f"model.init_from={path}", "model.preset=", "lora.enabled=true",
                           "lora.target_modules=[\"gate_proj\"]", "lora.export_adapter=/tmp/never-written"))
