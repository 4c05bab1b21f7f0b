"""C-Eval: the 52 subjects as facts, prompts equal to lm-eval's `ceval-valid` task, scores equal to its HFLM."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from eval_helpers import lm_eval_ceval_task, lm_eval_requests, lm_eval_tasks_dir, load_lm_eval_yaml, write_ceval

from qwenlink.errors import QwenlinkError
from qwenlink.evaluation import ceval
from qwenlink.evaluation.harness import LoglikelihoodScorer, Request
from qwenlink.evaluation.runner import build_requests, run_task


def test_52_subjects_in_four_categories():
    assert len(ceval.SUBJECTS) == 52
    counts = Counter(category for _, category in ceval.SUBJECTS.values())
    # C-Eval's paper: 20 STEM, 10 social science, 11 humanities, 11 other subjects.
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert set(counts) == set(ceval.CATEGORIES)


def test_chinese_names_and_descriptions_equal_lm_eval():
    files = sorted(lm_eval_tasks_dir().glob("ceval/ceval-valid_*.yaml"))
    theirs = {f.stem.removeprefix("ceval-valid_"): load_lm_eval_yaml(f"ceval/{f.name}")["description"] for f in files}
    assert set(theirs) == set(ceval.SUBJECTS)
    for subject, description in theirs.items():
        assert ceval.description(subject) == description
        assert re.search(f"关于{re.escape(ceval.SUBJECTS[subject][0])}的", description)


def test_template_fields_equal_lm_eval_yaml():
    cfg = load_lm_eval_yaml("ceval/_default_ceval_yaml")
    assert cfg["doc_to_text"] == "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    assert ceval.PROMPT.template.replace("{question}", "{{question.strip()}}").replace("{A}", "{{A}}") \
        .replace("{B}", "{{B}}").replace("{C}", "{{C}}").replace("{D}", "{{D}}") == cfg["doc_to_text"]
    assert list(ceval.PROMPT.labels) == cfg["doc_to_choice"]
    assert (cfg["validation_split"], cfg["fewshot_split"], cfg["fewshot_config"]["sampler"]) == ("val", "dev", "first_n")


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    return write_ceval(tmp_path_factory.mktemp("ceval"), {"computer_network": (5, 6), "marxism": (5, 4),
                                                          "mao_zedong_thought": (3, 3)})


@pytest.mark.parametrize("shots", [0, 3])
@pytest.mark.parametrize("subject", ["computer_network", "mao_zedong_thought"])
def test_ceval_prompts_equal_lm_eval(ceval_dir, subject, shots):
    theirs = lm_eval_requests(lm_eval_ceval_task(subject, ceval_dir, shots), limit=None)
    task = ceval.load_ceval(ceval_dir, subjects=[subject], shots=shots)
    ours = [(i, (r.context, r.continuation)) for _, i, _, reqs in build_requests(task, shots=shots) for r in reqs]
    assert len(ours) == len(theirs) == 4 * len(task.subjects[0].questions)
    assert ours == theirs


def test_ceval_scores_equal_lm_eval(ceval_dir, hflm, qwenlink_model):
    model, tokenizer = qwenlink_model
    lm_task = lm_eval_ceval_task("marxism", ceval_dir, 2)
    lm_task.build_all_requests(limit=None, rank=0, world_size=1)
    theirs = hflm.loglikelihood(lm_task.instances, disable_tqdm=True)
    scorer = LoglikelihoodScorer(model, tokenizer, prefix_token_id=hflm.prefix_token_id, batch_size=3, min_prefix=4)
    ours = scorer.loglikelihood([Request(*inst.args) for inst in lm_task.instances])
    for (ll, greedy), score in zip(theirs, ours):
        assert score.logprob == pytest.approx(ll, abs=1e-4)
        assert score.is_greedy == greedy
    their_acc = []
    for doc_id in sorted({inst.doc_id for inst in lm_task.instances}):
        lls = [out for inst, out in zip(lm_task.instances, theirs) if inst.doc_id == doc_id]
        their_acc.append(lm_task.process_results(lm_task.instances[4 * doc_id].doc, lls)["acc"])
    scores, results = run_task(ceval.load_ceval(ceval_dir, subjects=["marxism"], shots=2), scorer, shots=2)
    assert [float(r.prediction == r.answer) for r in results] == their_acc
    assert scores[0].category == "Social Science" and scores[0].display_name == "马克思主义基本原理"


def test_ceval_errors(ceval_dir, tmp_path):
    with pytest.raises(QwenlinkError, match="unknown subject 'marxim'; did you mean 'marxism'"):
        ceval.load_ceval(ceval_dir, subjects=["marxim"])
    with pytest.raises(QwenlinkError, match=r"physician_val\.csv: missing"):
        ceval.load_ceval(ceval_dir, subjects=["physician"])
    with pytest.raises(QwenlinkError, match="test answers are not public"):
        ceval.load_ceval(ceval_dir, split="test")
    bad = write_ceval(tmp_path, {"law": (1, 2)})
    path = bad / "val" / "law_val.csv"
    path.write_text("id,question,A,B,C,D,answr\n1,q,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(QwenlinkError, match=r"law_val\.csv:1: header .* lacks column\(s\) answer"):
        ceval.load_ceval(bad, subjects=["law"], shots=0)
