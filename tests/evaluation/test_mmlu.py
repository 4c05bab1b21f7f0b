"""MMLU: the real data files, the subject -> category map and the prompt fields, checked against lm-eval's YAML."""

from __future__ import annotations

from collections import Counter

import pytest

from eval_helpers import lm_eval_tasks_dir, load_lm_eval_yaml

from qwenlink.errors import QwenlinkError
from qwenlink.evaluation import mmlu


def test_reads_the_full_original_layout(mmlu_data):
    task = mmlu.load_mmlu(mmlu_data, shots=5)
    assert len(task.subjects) == 57
    assert sum(len(s.questions) for s in task.subjects) == 14042
    assert sum(len(s.fewshot) for s in task.subjects) == 285
    # The parent of data/ is accepted too (the unpacked archive's top level).
    assert len(mmlu.load_mmlu(mmlu_data.parent, subjects=["anatomy"]).subjects[0].questions) == 135


def test_category_map_covers_every_subject_and_equals_lm_eval(mmlu_data):
    on_disk = {p.name.removesuffix("_test.csv") for p in (mmlu_data / "test").glob("*_test.csv")}
    assert set(mmlu.SUBJECT_CATEGORY) == on_disk and len(on_disk) == 57
    names = {"stem": "STEM", "humanities": "humanities", "social_sciences": "social sciences", "other": "other"}
    for path in sorted(lm_eval_tasks_dir().glob("mmlu/default/mmlu_*.yaml")):
        cfg = load_lm_eval_yaml(f"mmlu/default/{path.name}")
        subject = cfg["dataset_name"]
        assert mmlu.SUBJECT_CATEGORY[subject] == names[cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks")]
        assert mmlu.description(subject) == cfg["description"]
    assert Counter(mmlu.SUBJECT_CATEGORY.values()) == {"STEM": 19, "humanities": 13, "social sciences": 12,
                                                       "other": 13}


def test_template_fields_equal_lm_eval_yaml():
    cfg = load_lm_eval_yaml("mmlu/default/_default_template_yaml")
    jinja = mmlu.PROMPT.template.replace("{question}", "{{question.strip()}}")
    for i, label in enumerate("ABCD"):
        jinja = jinja.replace(f"{{{label}}}", f"{{{{choices[{i}]}}}}")
    assert jinja == cfg["doc_to_text"]
    assert list(mmlu.PROMPT.labels) == cfg["doc_to_choice"]
    assert (cfg["test_split"], cfg["fewshot_split"], cfg["fewshot_config"]["sampler"]) == ("test", "dev", "first_n")
    from lm_eval.config.task import TaskConfig

    defaults = TaskConfig()
    assert (mmlu.PROMPT.target_delimiter, mmlu.PROMPT.fewshot_delimiter) == (defaults.target_delimiter,
                                                                             defaults.fewshot_delimiter)


def test_prompt_layout_by_hand(tmp_path):
    """Independent of lm-eval: the issue's written definition of the prompt, on a file with quoting and unicode."""
    for split, rows in (("dev", ['"Dev q, one?",1,2,3,4,B', 'Dev two,x,y,z,w,D']),
                        ("test", ['"  Été: ""quoted"", ok?\n",α,β,"γ, δ",ε,C'])):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"virology_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    task = mmlu.load_mmlu(tmp_path, subjects=["virology"], shots=2)
    s = task.subjects[0]
    q = s.questions[0]
    assert q.choices == ("α", "β", "γ, δ", "ε") and q.answer == 2
    assert task.fmt.context(s.description, s.fewshot, q) == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "Dev q, one?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Dev two\nA. x\nB. y\nC. z\nD. w\nAnswer: D\n\n"
        'Été: "quoted", ok?\nA. α\nB. β\nC. γ, δ\nD. ε\nAnswer:')
    assert task.fmt.continuations(q) == [" A", " B", " C", " D"]


def _write(tmp_path, name: str, text: str):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir(exist_ok=True)
    (tmp_path / "dev" / f"{name}_dev.csv").write_text("q,a,b,c,d,A\n" * 5, encoding="utf-8")
    path = tmp_path / "test" / f"{name}_test.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_rows_name_file_and_line(tmp_path):
    path = _write(tmp_path, "anatomy", 'q1,a,b,c,d,A\n"multi\nline",a,b,c,d,B\nq3,a,b,c,A\n')
    with pytest.raises(QwenlinkError, match=rf"{path}:4: expected 6 columns, got 5"):
        mmlu.load_mmlu(tmp_path, subjects=["anatomy"])
    path.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(QwenlinkError, match=rf"{path}:2: answer 'E' is not one of A, B, C, D"):
        mmlu.load_mmlu(tmp_path, subjects=["anatomy"])


def test_bad_directories_and_subjects(tmp_path, mmlu_data):
    with pytest.raises(QwenlinkError, match="MMLU data directory not found"):
        mmlu.load_mmlu(tmp_path / "nope")
    with pytest.raises(QwenlinkError, match=r"expected dev/ and test/ with \{subject\}_dev.csv"):
        mmlu.load_mmlu(tmp_path)
    with pytest.raises(QwenlinkError, match="unknown subject 'anatomie'; did you mean 'anatomy'"):
        mmlu.load_mmlu(mmlu_data, subjects=["anatomie"])
    _write(tmp_path, "anatomy", "q,a,b,c,d,A\n")
    with pytest.raises(QwenlinkError, match=r"test/astronomy_test\.csv: missing"):
        mmlu.load_mmlu(tmp_path, subjects=["anatomy", "astronomy"])
