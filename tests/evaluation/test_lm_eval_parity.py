"""Agreement with lm-evaluation-harness itself: its own task YAML builds the prompts, its own HFLM scores them.

Nothing here compares against numbers qwenlink computed: the reference side is always lm-eval's code (prompt strings
from `ConfigurableTask`, log-likelihoods from `HFLM.loglikelihood` on transformers' Qwen2ForCausalLM, accuracy from
the task's `process_results`).
"""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")

from eval_helpers import lm_eval_mmlu_task, lm_eval_requests  # noqa: E402

from qwenlink.evaluation.harness import LoglikelihoodScorer, Request, encode_pair  # noqa: E402
from qwenlink.evaluation.mmlu import load_mmlu  # noqa: E402
from qwenlink.evaluation.runner import build_requests, run_task  # noqa: E402

# Short and long prompts, plain ASCII and text with quotes, commas and unicode.
PROMPT_SUBJECTS = ["abstract_algebra", "world_religions", "high_school_european_history", "moral_scenarios"]
SCORE_SUBJECTS = ["abstract_algebra", "world_religions"]


def _ours(mmlu_data, subject: str, shots: int, limit: int) -> list[tuple[int, tuple[str, str]]]:
    task = load_mmlu(mmlu_data, subjects=[subject], shots=shots)
    return [(index, (r.context, r.continuation)) for _, index, _, reqs in build_requests(task, shots=shots, limit=limit)
            for r in reqs]


@pytest.mark.parametrize("shots", [0, 5])
@pytest.mark.parametrize("subject", PROMPT_SUBJECTS)
def test_mmlu_prompts_equal_lm_eval(mmlu_data, subject, shots):
    theirs = lm_eval_requests(lm_eval_mmlu_task(subject, mmlu_data, shots), limit=8)
    ours = _ours(mmlu_data, subject, shots, limit=8)
    assert len(theirs) == len(ours) == 8 * 4
    for (their_doc, their_args), (our_doc, our_args) in zip(theirs, ours):
        assert their_doc == our_doc
        assert our_args == their_args  # exact strings: context and continuation


def _lm_eval_scores(hflm, task, limit):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    instances = task.instances
    outputs = hflm.loglikelihood(instances, disable_tqdm=True)
    return instances, outputs


@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_scores_equal_lm_eval(mmlu_data, hflm, qwenlink_model, shots):
    model, tokenizer = qwenlink_model
    limit = 4
    for subject in SCORE_SUBJECTS:
        task = lm_eval_mmlu_task(subject, mmlu_data, shots)
        instances, theirs = _lm_eval_scores(hflm, task, limit)
        requests = [Request(*inst.args) for inst in instances]
        layouts = [dict(padding_side="left", share_prefix=True, batch_size=3, min_prefix=4),
                   dict(padding_side="left", share_prefix=False, batch_size=2),
                   dict(padding_side="right", batch_size=4)]
        for layout in layouts:
            scorer = LoglikelihoodScorer(model, tokenizer, prefix_token_id=hflm.prefix_token_id, **layout)
            ours = scorer.loglikelihood(requests)
            for (their_ll, their_greedy), score in zip(theirs, ours):
                assert score.logprob == pytest.approx(their_ll, abs=1e-4), layout
                assert score.is_greedy == their_greedy
            if layout.get("share_prefix"):
                assert scorer.stats.prefix_tokens_reused > 0, "the prefix-cache path was not exercised"
            # One forward row per question: the 4 answers share their input (lm-eval's one-token-continuation cache).
            assert scorer.stats.forward_rows == len(requests) // 4
        # Per-question accuracy: lm-eval's own metric on its numbers vs qwenlink's whole pipeline.
        docs = {inst.doc_id: inst.doc for inst in instances}
        their_acc, their_pred = {}, {}
        for doc_id, doc in docs.items():
            lls = [out for inst, out in zip(instances, theirs) if inst.doc_id == doc_id]
            their_acc[doc_id] = task.process_results(doc, lls)["acc"]
            their_pred[doc_id] = max(range(4), key=lambda i: (lls[i][0], -i))
            top, second = sorted((x[0] for x in lls), reverse=True)[:2]
            assert top - second > 1e-3, "two choices within rounding of each other: an argmax comparison is moot"
        scorer = LoglikelihoodScorer(model, tokenizer, prefix_token_id=hflm.prefix_token_id, batch_size=4)
        per_subject, results = run_task(load_mmlu(mmlu_data, subjects=[subject], shots=shots), scorer, shots=shots,
                                        limit=limit)
        assert [r.prediction for r in results] == [their_pred[i] for i in range(limit)]
        assert [float(r.prediction == r.answer) for r in results] == [their_acc[i] for i in range(limit)]
        assert per_subject[0].correct == sum(their_acc.values())


def test_left_truncation_equals_lm_eval(mmlu_data, random_hf_model, qwenlink_model):
    """Prompts longer than max_length are cut from the left exactly as HFLM cuts them."""
    from lm_eval.models.huggingface import HFLM

    short = HFLM(pretrained=str(random_hf_model), device="cpu", batch_size=4, dtype="float32", max_length=96)
    task = lm_eval_mmlu_task("world_religions", mmlu_data, 2)
    instances, theirs = _lm_eval_scores(short, task, 3)
    assert all(len(inst.args[0]) > 200 for inst in instances)  # byte-level tokenizer: well over 96 tokens
    model, tokenizer = qwenlink_model
    for layout in (dict(padding_side="left", min_prefix=4), dict(padding_side="right")):
        scorer = LoglikelihoodScorer(model, tokenizer, prefix_token_id=short.prefix_token_id, batch_size=2,
                                     max_length=96, **layout)
        ours = scorer.loglikelihood([Request(*inst.args) for inst in instances])
        for (their_ll, their_greedy), score in zip(theirs, ours):
            assert score.logprob == pytest.approx(their_ll, abs=1e-4)
            assert score.is_greedy == their_greedy


TRICKY_PAIRS = [
    ("Answer:", " A"),
    ("Answer: ", "A"),  # trailing space moves to the continuation
    ("Question?\n\n", "Yes"),  # trailing newlines move too
    ("以下是中国关于计算机网络的单项选择题\n答案：", " B"),
    ("tabs and spaces \t ", " x y"),
    ("It's", "'s"),  # BPE contractions across the boundary
    ("The number is 12", "345"),  # digits split one by one
    ("hello", " world!!\n"),
]


def test_encode_pair_equals_lm_eval_with_qwen_vocabulary(tmp_path):
    """With the real Qwen1.5 BPE (merges across the context/continuation boundary), token ids equal HFLM's."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from qwenlink.tokenizer import Tokenizer

    ours_tok = Tokenizer.default()
    ours_tok.save(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    lm = HFLM(pretrained=model, tokenizer=hf_tok, device="cpu", batch_size=1)
    for context, continuation in TRICKY_PAIRS:
        theirs = lm._encode_pair(context, continuation)
        ours = encode_pair(ours_tok, context, continuation, prefix_token_id=lm.prefix_token_id)
        assert (list(ours.context), list(ours.continuation)) == (list(theirs[0]), list(theirs[1])), context
    # An empty context is conditioned on the prefix token (HFLM.loglikelihood's special case).
    ours = encode_pair(ours_tok, "", "hello", prefix_token_id=lm.prefix_token_id)
    assert ours.context == (lm.prefix_token_id,)
    assert list(ours.continuation) == lm.tok_encode("hello", add_special_tokens=False)
