"""benchmarks/device_check.py: the CPU smoke mode runs every section the CPU can run and writes one JSON file; a
section's exception, a failed check, the time budget and a hang are each recorded without losing the others."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from common import REPO

SCRIPT = REPO / "benchmarks" / "device_check.py"


def _load_runner():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_runs_every_section_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert report["summary"]["ok"] == ["environment", "parity", "moe", "kernels", "packing", "trainer_eager", "train",
                                       "train_ac", "decode", "train_shapes"]
    # Compilation is off in smoke mode: the two compiled sections say so instead of running.
    assert report["summary"]["skipped"] == ["compiled_decode", "trainer_compiled"]
    assert all("compil" in sections[n]["reason"] for n in report["summary"]["skipped"])
    assert sections["parity"]["result"]["checks"] and all(sections["parity"]["result"]["checks"].values())
    for name, ac in (("train", "none"), ("train_ac", "full")):
        result = sections[name]["result"]
        assert result["activation_checkpoint"] == ac and result["tokens_per_s"] > 0 and result["peak_memory_gb"] > 0
        assert len(result["losses"]) == 4 and "available" in result["plan"]
    [shape] = sections["train_shapes"]["result"]["rows"]
    assert shape["preset"] == "qwen-tiny" and shape["tokens_per_s"] > 0 and len(shape["losses"]) == 4
    trainer = sections["trainer_eager"]["result"]
    assert trainer["exit_code"] == 0 and len(trainer["losses"]) == 2 and trainer["tokens_per_s"] > 0
    assert trainer["command"].startswith("torchrun --standalone --nproc-per-node 1 -m qwenlink.cli train")
    for name in ("moe", "kernels", "packing"):
        checks = sections[name]["result"]["checks"]
        assert checks and all(checks.values()), (name, checks)
    bench = sections["moe"]["result"]["bench"]
    assert set(bench["qwenlink_speedup_over"]) == {f"{kind}-qwenlink / {kind}-{hf}" for kind in ("train", "decode")
                                                   for hf in ("hf", "hf-loop")}
    assert bench["sides"]["train-hf-loop"]["experts_implementation"] == "eager"
    assert all(bench["sides"][side]["profile"]["top"] for side in ("train-qwenlink", "train-hf"))
    assert len(sections["kernels"]["result"]["in_place"]) == 2
    rows = sections["decode"]["result"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["eager_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in rows)


def test_errors_failed_checks_and_the_budget_are_recorded_and_the_run_goes_on(tmp_path):
    runner = _load_runner()
    out = tmp_path / "check.json"
    report = runner.Report(out, budget_s=60, settings={"device": "cpu"})

    def broken() -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    report.run("broken", broken, min_seconds=0)
    report.run("wrong", lambda: {"checks": {"tokens_equal": False, "finite": True}}, min_seconds=0)
    report.run("too_long", lambda: {"checks": {}}, min_seconds=10_000)
    report.run("fine", lambda: {"value": 1, "checks": {"finite": True}}, min_seconds=0)
    report.run("absent", lambda: {"skipped": "transformers is not importable here"}, min_seconds=0)
    data = json.loads(out.read_text())
    sections = data["sections"]
    assert sections["broken"]["status"] == "error" and "illegal memory access" in sections["broken"]["error"]
    assert "RuntimeError" in sections["broken"]["traceback"]
    assert sections["wrong"]["status"] == "failed" and sections["wrong"]["result"]["checks"]["tokens_equal"] is False
    assert sections["too_long"]["status"] == "skipped" and "time budget" in sections["too_long"]["reason"]
    assert sections["fine"]["status"] == "ok" and sections["fine"]["result"]["value"] == 1
    assert sections["absent"] == {"status": "skipped", "reason": "transformers is not importable here",
                                  "result": {}, "seconds": sections["absent"]["seconds"]}
    assert data["summary"] == {"ok": ["fine"], "failed": ["wrong"], "error": ["broken"],
                               "skipped": ["too_long", "absent"], "aborted": []}


def test_the_watchdog_ends_a_hung_section_with_the_json_written(tmp_path):
    out = tmp_path / "check.json"
    code = (f"import sys, time; sys.path.insert(0, {str(SCRIPT.parent)!r}); import device_check as d; "
            f"r = d.Report(d.Path({str(out)!r}), 5.0, {{}}); r.watchdog(1.0); "
            "r.run('done', lambda: {}, 0); r.run('hang', lambda: time.sleep(120) or {}, 0)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    data = json.loads(out.read_text())
    assert data["sections"]["done"]["status"] == "ok"
    assert data["sections"]["hang"]["status"] == "aborted" and data["summary"]["aborted"] == ["hang"]
