"""The one-CSV-per-subject reader shared by MMLU and C-Eval: where it looks, what it reads, and that each benchmark's
messages still name that benchmark, its splits and an example file."""

from __future__ import annotations

import re

import pytest

from qwenlink.errors import QwenlinkError
from qwenlink.evaluation import ceval, mmlu

MMLU_ROW = "q,a,b,c,d,B\n"
CEVAL_ROWS = "id,question,A,B,C,D,answer\n0,q,a,b,c,d,C\n"


def _files(root, rows: str, files: dict[str, str]) -> None:
    for split, subject in files.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / f"{subject}_{split}.csv").write_text(rows, encoding="utf-8")


@pytest.mark.parametrize("layout,missing,wrong", [
    (mmlu.LAYOUT,
     "{root}: MMLU data directory not found (expected a folder with dev/ and test/ holding {{subject}}_dev.csv and "
     "{{subject}}_test.csv)",
     "{root}: not an MMLU data directory (expected dev/ and test/ with {{subject}}_dev.csv and {{subject}}_test.csv, "
     "e.g. dev/abstract_algebra_dev.csv)"),
    (ceval.LAYOUT,
     "{root}: C-Eval data directory not found (expected a folder with dev/ and val/ holding {{subject}}_dev.csv and "
     "{{subject}}_val.csv)",
     "{root}: not a C-Eval data directory (expected dev/ and val/ with {{subject}}_dev.csv and {{subject}}_val.csv, "
     "e.g. val/computer_network_val.csv)"),
])
def test_folder_messages(tmp_path, layout, missing, wrong):
    """The exact wording each benchmark used before the reader was shared."""
    with pytest.raises(QwenlinkError, match=f"^{re.escape(missing.format(root=tmp_path / 'nope'))}$"):
        layout.find_data_dir(tmp_path / "nope")
    (tmp_path / "dev").mkdir()  # dev/ alone is not enough
    with pytest.raises(QwenlinkError, match=f"^{re.escape(wrong.format(root=tmp_path))}$"):
        layout.find_data_dir(tmp_path)


def test_data_folder_is_found_at_top_or_under_data(tmp_path):
    _files(tmp_path / "data", MMLU_ROW, {"dev": "anatomy", "val": "anatomy"})  # MMLU: val/ alone will do
    assert mmlu.LAYOUT.find_data_dir(tmp_path) == tmp_path / "data"
    assert mmlu.LAYOUT.find_data_dir(tmp_path / "data") == tmp_path / "data"
    with pytest.raises(QwenlinkError, match="not a C-Eval data directory"):  # C-Eval needs val/, not test/
        _files(tmp_path / "c", CEVAL_ROWS, {"dev": "law", "test": "law"})
        ceval.LAYOUT.find_data_dir(tmp_path / "c")


def test_reads_headerless_and_headed_files(tmp_path):
    _files(tmp_path / "m", MMLU_ROW * 3, {"dev": "anatomy", "test": "anatomy"})
    questions, shots = mmlu.LAYOUT.read_subject(tmp_path / "m", "anatomy", "test", 5)
    assert len(questions) == len(shots) == 3
    assert questions[0].choices == ("a", "b", "c", "d") and questions[0].answer == 1
    assert questions[2].source == f"{tmp_path / 'm' / 'test' / 'anatomy_test.csv'}:3"
    _files(tmp_path / "c", CEVAL_ROWS, {"dev": "law", "val": "law"})
    (questions,), (shot,) = ceval.LAYOUT.read_subject(tmp_path / "c", "law", "val", 1)
    assert questions.answer == shot.answer == 2 and questions.source.endswith("law_val.csv:2")


def test_no_shots_reads_no_dev_file(tmp_path):
    _files(tmp_path, MMLU_ROW, {"test": "anatomy"})
    assert mmlu.LAYOUT.read_subject(tmp_path, "anatomy", "test", 0) == \
        (mmlu.LAYOUT.read_split(tmp_path, "anatomy", "test"), [])
    with pytest.raises(QwenlinkError, match=r"dev/anatomy_dev\.csv: missing \(MMLU expects "
                                            r"dev/\{subject\}_dev\.csv for each of the 57 subjects"):
        mmlu.LAYOUT.read_subject(tmp_path, "anatomy", "test", 1)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(QwenlinkError, match=r"val/law_val\.csv: missing \(C-Eval expects val/\{subject\}_val\.csv "
                                            r"for each of the 52 subjects; pass --subjects to run fewer\)$"):
        ceval.LAYOUT.read_split(tmp_path, "law", "val")
    _files(tmp_path, "id,question,A,B,C,D,answer\n", {"val": "law"})
    with pytest.raises(QwenlinkError, match=r"law_val\.csv: no questions$"):
        ceval.LAYOUT.read_split(tmp_path, "law", "val")
