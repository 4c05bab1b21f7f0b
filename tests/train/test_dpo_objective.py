"""The DPO objective equals TRL's DPOTrainer (loss, rewards, log-probabilities, gradients) on the same tiny Qwen2 and
batch in fp32; SimPO and label-smoothed DPO equal their papers' formulas."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_helpers import make_hf_model
from qwenlink.checkpoint.hf import hf_name, load_hf_model
from qwenlink.train.dpo import DpoOptions, PairMicroBatch, PreferenceObjective, preference_losses

# Two pairs (rows: chosen 0, chosen 1, rejected 0, rejected 1); prompts of 2 and 3 tokens, right padding with 0.
PROMPTS = [[5, 6], [7, 8, 9]]
CHOSEN = [[10, 11, 12], [13, 14]]
REJECTED = [[15], [16, 17, 18, 19]]
BETA = 0.1


def _rows() -> list[tuple[list[int], int]]:
    rows = [(p + c, len(p)) for p, c in zip(PROMPTS, CHOSEN)] + [(p + r, len(p)) for p, r in zip(PROMPTS, REJECTED)]
    return rows


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and TRL's completion_mask [4, T]."""
    rows = _rows()
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (seq, prompt) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        completion[i, prompt:len(seq)] = 1
    return ids, attention, completion


def _shifted_labels(ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """qwenlink's labels: target of position t is the completion token at t + 1, else -100."""
    aligned = ids.masked_fill(completion == 0, -100)
    return torch.cat([aligned[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-models")
    policy, policy_dir = make_hf_model(root / "policy", seed=1)
    reference, reference_dir = make_hf_model(root / "reference", seed=0)
    return policy, reference, policy_dir, reference_dir


@pytest.fixture(scope="module")
def trl_trainer(models):
    """One DPOTrainer over the two HF models (its loss type is switched per test: building one takes seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from datasets import Dataset
        from transformers import PreTrainedTokenizerFast
        from trl import DPOConfig, DPOTrainer

        from qwenlink.tokenizer import load_tokenizer

        policy, reference, policy_dir, _ = models
        tok = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer("default").hf, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
        args = DPOConfig(output_dir=str(policy_dir.parent / "trl"), beta=BETA, loss_type=["sigmoid"], report_to=[],
                         use_cpu=True, bf16=False, fp16=False)
        return DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}]))


def _trl(trainer, loss_type: str, ftx: float = 0.0):
    """TRL's loss, its logged metrics and the policy's gradients for our batch (with ftx: its "sft" loss type added
    with that weight)."""
    trainer.loss_types = [loss_type, "sft"] if ftx else [loss_type]
    trainer.loss_weights = [1.0, ftx] if ftx else [1.0]
    ids, attention, completion = _batch()
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "attention_mask": attention,
                                                "completion_mask": completion})
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), metrics, grads


def _ours(models, loss_type: str, ftx: float = 0.0):
    """The trainer's objective on qwenlink models loaded from the same HF directories."""
    _, _, policy_dir, reference_dir = models
    policy, reference = load_hf_model(policy_dir).train(), load_hf_model(reference_dir)
    ids, _, completion = _batch()
    labels = _shifted_labels(ids, completion)
    objective = PreferenceObjective(DpoOptions(beta=BETA, loss_type=loss_type, ftx=ftx), "copy",
                                    reference_chunks=types.SimpleNamespace(modules=[reference]))
    step = types.SimpleNamespace(layout=types.SimpleNamespace(tp_mesh=None), chunk_size=2, _scale=1.0 / 2,
                                 plan=types.SimpleNamespace(tp=1, pp=1, cp=1, dp_cp=1), device=torch.device("cpu"),
                                 chunks=types.SimpleNamespace(modules=[policy]), context_shard=lambda batch: batch)
    batch = PairMicroBatch(ids, labels)
    (batch,) = objective.prepare(step, [batch])
    loss = objective.micro_loss(step, policy, batch, labels)
    loss.backward()
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
    metrics = dict(zip(names, objective.step_metrics(step).tolist()))
    grads = {hf_name(name): p.grad for name, p in policy.named_parameters() if p.grad is not None}
    return float(loss.detach()), metrics, grads


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_rewards_logps_and_gradients_equal_trl(models, trl_trainer, loss_type):
    trl_loss, trl_metrics, trl_grads = _trl(trl_trainer, loss_type)
    loss, metrics, grads = _ours(models, loss_type)
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    for key, value in metrics.items():
        assert value == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    assert metrics["logps/chosen"] < -1.0  # real log-probabilities, not a degenerate zero
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        assert (grad - trl_grads[name]).abs().max() <= 1e-5 * max(1.0, trl_grads[name].abs().max()), name


def test_chosen_nll_term_equals_trl_sft_loss_type(models, trl_trainer):
    """dpo.ftx = TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, ftx]: the chosen replies' NLL as a token
    mean (the two chosen replies have 3 and 2 tokens, so a per-reply mean would differ)."""
    trl_loss, _, trl_grads = _trl(trl_trainer, "sigmoid", ftx=0.5)
    loss, _, grads = _ours(models, "sigmoid", ftx=0.5)
    plain, _, _ = _ours(models, "sigmoid")
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert loss > plain + 0.1  # the NLL term is there (about 0.5 x 5.8 nats per token here)
    for name, grad in grads.items():
        assert (grad - trl_grads[name]).abs().max() <= 1e-5 * max(1.0, trl_grads[name].abs().max()), name


def _plain_logps(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed label log-probabilities from the full logits (the textbook formulation)."""
    logits = model(ids).float()
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_equals_the_paper_formula(models, label_smoothing):
    """SimPO (Meng et al. 2024, eq. 6): -log s(beta / |y_w| log p(y_w|x) - beta / |y_l| log p(y_l|x) - gamma),
    averaged over pairs; with label smoothing the flipped-preference mixture of its reference code."""
    _, _, policy_dir, _ = models
    policy = load_hf_model(policy_dir).train()
    ids, _, completion = _batch()
    labels = _shifted_labels(ids, completion)
    beta, gamma = 2.0, 0.5
    objective = PreferenceObjective(DpoOptions(beta=beta, loss_type="simpo", gamma=gamma,
                                               label_smoothing=label_smoothing), "none")
    step = types.SimpleNamespace(layout=types.SimpleNamespace(tp_mesh=None), chunk_size=1024, _scale=1.0 / 2,
                                 plan=types.SimpleNamespace(tp=1, pp=1, cp=1, dp_cp=1), device=torch.device("cpu"))
    loss = objective.micro_loss(step, policy, PairMicroBatch(ids, labels), labels)
    with torch.no_grad():
        logps = _plain_logps(policy, ids, labels)
        lengths = torch.tensor([float(len(c)) for c in CHOSEN + REJECTED])
        avg = logps / lengths
        m = beta * avg[:2] - beta * avg[2:] - gamma
        expected = (-(1 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    rewards = objective.step_metrics(step)
    assert float(rewards[0]) == pytest.approx(float(beta * avg[:2].mean()), rel=1e-5)


def test_label_smoothed_sigmoid_is_conservative_dpo():
    """cDPO (Mitchell 2023): -(1 - e) log s(beta d) - e log s(-beta d), d the difference of log-ratios."""
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    n = torch.tensor([2.0, 3.0])
    losses, _, _ = preference_losses(DpoOptions(beta=0.5, label_smoothing=0.1), chosen, rejected, ref_c, ref_r, n, n)
    d = 0.5 * ((chosen - ref_c) - (rejected - ref_r))
    expected = -0.9 * torch.log(torch.sigmoid(d)) - 0.1 * torch.log(torch.sigmoid(-d))
    assert torch.allclose(losses, expected, rtol=1e-6)
