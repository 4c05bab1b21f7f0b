"""User tasks: a TOML description over JSONL or CSV questions; prompts equal lm-eval's for the equivalent YAML."""

from __future__ import annotations

import json

import pytest

from qwenlink.errors import QwenlinkError
from qwenlink.evaluation.runner import build_requests
from qwenlink.evaluation.tasks import load_task_file

QUESTIONS = [
    {"question": "Capital of France?", "choices": ["Paris", "Lyon", "Nice"], "answer": 0, "topic": "geo"},
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": "B", "topic": "math"},
    {"question": "Largest ocean?", "choices": ["Indian", "Arctic", "Pacific"], "answer": 2, "topic": "geo"},
]
SHOTS = [{"question": "Colour of the sky?", "choices": ["blue", "red", "green"], "answer": 0, "topic": "geo"}]


def _write_task(tmp_path, toml: str, questions=QUESTIONS, shots=SHOTS):
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    (tmp_path / "shots.jsonl").write_text("".join(json.dumps(q) + "\n" for q in shots), encoding="utf-8")
    (tmp_path / "task.toml").write_text(toml, encoding="utf-8")
    return tmp_path / "task.toml"


def test_label_task_prompts_by_hand(tmp_path):
    path = _write_task(tmp_path, 'name = "quiz"\ndata = "q.jsonl"\nfewshot_data = "shots.jsonl"\n'
                       'labels = ["A", "B", "C"]\nchoices_field = "choices"\n'
                       'description = "Answer these.\\n\\n"\n')
    task = load_task_file(path)
    items = build_requests(task, shots=1)
    context = items[1][3][0].context
    assert context == ("Answer these.\n\nColour of the sky?\nA. blue\nB. red\nC. green\nAnswer: A\n\n"
                       "2 + 2 =\nA. 3\nB. 4\nC. 5\nAnswer:")
    assert [r.continuation for r in items[1][3]] == [" A", " B", " C"]
    assert items[1][2].answer == 1  # "B" as a label


def test_text_task_prompts_equal_lm_eval(tmp_path):
    """continuation = "text" scores each choice's text, like lm-eval's doc_to_choice: "{{choices}}" tasks."""
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency")
    from lm_eval.api.task import ConfigurableTask

    numeric = [dict(q, answer=q["answer"] if isinstance(q["answer"], int) else "ABC".index(q["answer"]))
               for q in QUESTIONS]
    path = _write_task(tmp_path, 'data = "q.jsonl"\nfewshot_data = "shots.jsonl"\nlabels = ["A", "B", "C"]\n'
                       'choices_field = "choices"\ncontinuation = "text"\nsubject_field = "topic"\n'
                       'template = "Question: {question}\\nAnswer:"\n', questions=numeric)
    task = load_task_file(path)
    assert [s.name for s in task.subjects] == ["geo", "math"]
    ours = [(r.context, r.continuation) for s_items in [build_requests(task, shots=1)] for *_, reqs in s_items
            for r in reqs]
    cfg = {"task": "quiz", "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
           "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}, "num_fewshot": 1,
           "dataset_kwargs": {"data_files": {"test": str(tmp_path / "q.jsonl"), "dev": str(tmp_path / "shots.jsonl")}},
           "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "answer"}
    lm_task = ConfigurableTask(config=cfg)
    lm_task.build_all_requests(limit=None, rank=0, world_size=1)
    theirs = {inst.doc_id: [] for inst in lm_task.instances}
    for inst in lm_task.instances:
        theirs[inst.doc_id].append(inst.args)
    # Ours are grouped by subject (geo: docs 0 and 2, then math: doc 1).
    expected = [a for doc in (0, 2, 1) for a in theirs[doc]]
    assert ours == expected


def test_csv_task_and_errors(tmp_path):
    (tmp_path / "q.csv").write_text('question,A,B,answer\n"Is it, really?",yes,no,A\nSure?,yes,no,C\n',
                                    encoding="utf-8")
    toml = tmp_path / "t.toml"
    toml.write_text('data = "q.csv"\nlabels = ["A", "B"]\n', encoding="utf-8")
    with pytest.raises(QwenlinkError, match=r"q\.csv:3: answer 'C' is not one of A, B"):
        load_task_file(toml)
    (tmp_path / "q.csv").write_text('question,A,B,answer\n"Is it, really?",yes,no,A\n', encoding="utf-8")
    task = load_task_file(toml)
    assert task.subjects[0].questions[0].choices == ("yes", "no")
    toml.write_text('data = "q.csv"\nlabel = ["A", "B"]\n', encoding="utf-8")
    with pytest.raises(QwenlinkError, match="unknown key 'label'"):
        load_task_file(toml)
    toml.write_text('data = "q.csv"\nlabels = ["A", "B"]\ntemplate = "{question} {E}"\n', encoding="utf-8")
    with pytest.raises(QwenlinkError, match="template field 'E' is not available"):
        load_task_file(toml)
    (tmp_path / "q.jsonl").write_text('{"question": "x", "choices": ["a"], "answer": 0}\n', encoding="utf-8")
    toml.write_text('data = "q.jsonl"\nlabels = ["A", "B"]\nchoices_field = "choices"\n', encoding="utf-8")
    with pytest.raises(QwenlinkError, match=r"q\.jsonl:1: field 'choices' must be a list of 2 choices"):
        load_task_file(toml)


def test_chat_template_only_when_asked(tmp_path):
    """Without `chat` no template is applied (ModelLink once scored 0 because one was applied by accident); with it,
    the prompt is the user turn and the bare labels are scored after the assistant header."""
    from qwenlink.tokenizer import ENDOFTEXT, IM_START, Tokenizer

    path = _write_task(tmp_path, 'data = "q.jsonl"\nlabels = ["A", "B", "C"]\nchoices_field = "choices"\n')
    task = load_task_file(path)
    plain = build_requests(task, shots=0)
    assert all(IM_START not in r.context and ENDOFTEXT not in r.context for *_, reqs in plain for r in reqs)
    tok = Tokenizer.__new__(Tokenizer)  # apply_chat_template needs no vocabulary
    chat = build_requests(task, shots=0, chat=lambda text: tok.apply_chat_template([{"role": "user", "content": text}]))
    first = chat[0][3]
    assert first[0].context == (f"{IM_START}system\nYou are a helpful assistant.<|im_end|>\n{IM_START}user\n"
                                f"{plain[0][3][0].context}<|im_end|>\n{IM_START}assistant\n")
    assert [r.continuation for r in first] == ["A", "B", "C"]
