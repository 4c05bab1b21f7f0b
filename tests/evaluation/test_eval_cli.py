"""`qwenlink eval` end to end: a small run's JSON and table, and bad inputs (one line, exit 2, no results file)."""

from __future__ import annotations

import json

import pytest

from eval_helpers import run_cli, write_ceval


def _assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_mmlu_run_writes_json_and_table(tmp_path, mmlu_data, random_hf_model):
    out = tmp_path / "results.json"
    proc = run_cli("eval", "--model", str(random_hf_model), "--data", str(mmlu_data), "--subjects",
                   "anatomy,philosophy,virology", "--limit", "3", "--shots", "1", "--output", str(out),
                   "--log-samples", "--compare")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["config"]["shots"] == 1 and report["config"]["subjects"] == ["anatomy", "philosophy", "virology"]
    results = report["results"]
    assert set(results["categories"]) == {"STEM", "humanities", "other"}
    assert results["overall"]["n"] == 9 and results["overall"]["subjects"] == 3
    assert results["overall"]["correct"] == sum(s["correct"] for s in results["subjects"].values())
    assert len(report["samples"]) == 9 and all(len(s["logprobs"]) == 4 for s in report["samples"])
    assert report["samples"][0]["source"].endswith("anatomy_test.csv:1")
    assert report["timing"]["questions"] == 9 and report["comparison"] is None  # not a Qwen1.5 size
    assert "| anatomy | STEM | 3 |" in proc.stdout and "**overall**" in proc.stdout


def test_ceval_run(tmp_path, random_hf_model):
    data = write_ceval(tmp_path / "ceval", {"logic": (2, 3), "physician": (2, 2)})
    proc = run_cli("eval", "--task", "ceval", "--model", str(random_hf_model), "--data", str(data), "--subjects",
                   "logic,physician", "--shots", "2")
    assert proc.returncode == 0, proc.stderr
    assert "| logic (逻辑学) | Humanities | 3 |" in proc.stdout
    assert "| physician (医师资格) | Other | 2 |" in proc.stdout


@pytest.fixture
def small_mmlu(tmp_path):
    root = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
    (root / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,A\n" * 5, encoding="utf-8")
    (root / "test" / "anatomy_test.csv").write_text("q1,a,b,c,d,A\nq2,a,b,c,d,B\n", encoding="utf-8")
    return root


def _eval(small_mmlu, tmp_path, *extra: str):
    out = tmp_path / "out.json"
    proc = run_cli("eval", "--model", "test-tiny", "--data", str(small_mmlu), "--subjects", "anatomy",
                   "--output", str(out), *extra)
    assert not out.exists() and not list(tmp_path.glob(".out.json*")), "a failed run left a results file"
    return proc


def test_missing_data_dir(tmp_path, small_mmlu):
    _assert_one_line_error(_eval(tmp_path / "nowhere", tmp_path), "nowhere: MMLU data directory not found",
                           "dev/ and test/")
    _assert_one_line_error(_eval(tmp_path, tmp_path), "not an MMLU data directory", "dev/abstract_algebra_dev.csv")


def test_wrong_number_of_columns(tmp_path, small_mmlu):
    path = small_mmlu / "test" / "anatomy_test.csv"
    path.write_text('q1,a,b,c,d,A\n"q2, with comma",a,b,c,B\n', encoding="utf-8")
    _assert_one_line_error(_eval(small_mmlu, tmp_path), f"{path}:2: expected 6 columns, got 5")


def test_unknown_subject(tmp_path, small_mmlu):
    proc = run_cli("eval", "--model", "test-tiny", "--data", str(small_mmlu), "--subjects", "anatomy,virologgy")
    _assert_one_line_error(proc, "unknown subject 'virologgy'; did you mean 'virology'?")


def test_answer_not_a_to_d(tmp_path, small_mmlu):
    path = small_mmlu / "test" / "anatomy_test.csv"
    path.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,e\n", encoding="utf-8")
    _assert_one_line_error(_eval(small_mmlu, tmp_path), f"{path}:2: answer 'e' is not one of A, B, C, D")


def test_fewer_dev_rows_than_shots(tmp_path, small_mmlu):
    (small_mmlu / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,A\n" * 3, encoding="utf-8")
    _assert_one_line_error(_eval(small_mmlu, tmp_path), "subject anatomy has 3 few-shot rows, fewer than --shots 5")


def test_unknown_task_and_bad_numbers(tmp_path, small_mmlu):
    _assert_one_line_error(_eval(small_mmlu, tmp_path, "--task", "mmlu-pro"), "unknown task 'mmlu-pro'")
    _assert_one_line_error(_eval(small_mmlu, tmp_path, "--shots", "-1"), "--shots must be >= 0")
