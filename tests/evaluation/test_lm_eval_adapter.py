"""The lm-eval model adapter (`--model qwenlink`) answers lm-eval's requests as lm-eval's own HFLM does on the same
weights: log-likelihoods of a real task's requests, empty contexts, rolling windows past max_length, generation."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")

from eval_helpers import lm_eval_mmlu_task  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from qwenlink.evaluation.lm_eval_model import QwenlinkLM  # noqa: E402


def _instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


@pytest.fixture(scope="module")
def short_pair(random_hf_model):
    """Both models with a 32-token window, so truncation and rolling windows are exercised."""
    from lm_eval.models.huggingface import HFLM

    return (HFLM(pretrained=str(random_hf_model), device="cpu", batch_size=2, dtype="float32", max_length=32),
            QwenlinkLM(pretrained=str(random_hf_model), batch_size=3, max_length=32))


def test_registered_under_its_name():
    from lm_eval.api.registry import get_model

    assert get_model("qwenlink") is QwenlinkLM


def test_task_loglikelihoods_equal_hflm(mmlu_data, hflm, random_hf_model):
    task = lm_eval_mmlu_task("world_religions", mmlu_data, 2)
    task.build_all_requests(limit=3, rank=0, world_size=1)
    theirs = hflm.loglikelihood(task.instances, disable_tqdm=True)
    ours = QwenlinkLM(pretrained=str(random_hf_model), batch_size=5).loglikelihood(task.instances, disable_tqdm=True)
    assert len(ours) == len(theirs) == 12
    for (their_ll, their_greedy), (our_ll, our_greedy) in zip(theirs, ours):
        assert our_ll == pytest.approx(their_ll, abs=1e-4) and our_greedy == their_greedy


def test_empty_context_truncation_and_rolling_equal_hflm(short_pair):
    hflm, ours = short_pair
    pairs = _instances("loglikelihood", [("", "Hello world"), ("Answer: ", "A"),
                                         ("a long context " * 12, " that is cut from the left")])
    for (their_ll, their_greedy), (our_ll, our_greedy) in zip(hflm.loglikelihood(pairs, disable_tqdm=True),
                                                              ours.loglikelihood(pairs, disable_tqdm=True)):
        assert our_ll == pytest.approx(their_ll, abs=1e-4) and our_greedy == their_greedy
    texts = _instances("loglikelihood_rolling", [("one two three " * 20,), ("short",)])
    theirs = hflm.loglikelihood_rolling(texts, disable_tqdm=True)
    assert ours.loglikelihood_rolling(texts) == pytest.approx(theirs, abs=1e-3)


def test_generate_until_equals_hflm(short_pair):
    hflm, ours = short_pair
    requests = _instances("generate_until", [
        ("Question: what comes next?\nAnswer:", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
        ("The list: a, b,", {"until": [","], "max_gen_toks": 6}),
        ("x " * 40, {"until": ["zz"], "max_gen_toks": 8}),  # longer than the window: cut from the left
    ])
    theirs = hflm.generate_until(requests, disable_tqdm=True)
    assert ours.generate_until(requests) == theirs
    assert any(theirs)


def test_lm_eval_command_line_runs_a_task_with_the_qwenlink_model(tmp_path, random_hf_model):
    """`python -m qwenlink.evaluation.lm_eval_model run --model qwenlink ...` on a local multiple-choice task gives the
    per-document log-likelihoods and accuracy of `lm_eval run --model hf` on the same directory."""
    import json
    import os
    import subprocess
    import sys

    rows = [{"question": f"Which number follows {i}?", "choices": [str(i + 1), str(i + 2), "zebra"], "answer": 0}
            for i in range(5)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: qwenlink_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "HF_DATASETS_CACHE": str(tmp_path)}
    samples = {}
    for name, entry, model_args in [("qwenlink", "qwenlink.evaluation.lm_eval_model", f"pretrained={random_hf_model}"),
                                    ("hf", "lm_eval", f"pretrained={random_hf_model},dtype=float32")]:
        out = tmp_path / name
        run = subprocess.run([sys.executable, "-m", entry, "run", "--model", name, "--model_args", model_args,
                              "--device", "cpu", "--tasks", "qwenlink_tiny_mc", "--include_path",
                              str(tmp_path / "tasks"), "--output_path", str(out), "--log_samples"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        (file,) = out.rglob("samples_qwenlink_tiny_mc_*.jsonl")
        samples[name] = [json.loads(line) for line in file.read_text().splitlines()]
    assert len(samples["qwenlink"]) == len(samples["hf"]) == 5
    for ours, theirs in zip(samples["qwenlink"], samples["hf"]):
        assert ours["doc_id"] == theirs["doc_id"] and ours["acc"] == theirs["acc"]
        for (our_ll, _), (their_ll, _) in zip(ours["filtered_resps"], theirs["filtered_resps"]):
            assert float(our_ll) == pytest.approx(float(their_ll), abs=1e-4)
