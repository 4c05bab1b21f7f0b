"""The quickstart's bundled data: deterministic, correct, held-out disjoint, and scored with the training prompt."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bundled_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    make_data = _load("make_data")
    train, heldout = make_data.generate(6000, 40)
    make_data.write_jsonl(tmp_path / "train.jsonl", train)
    make_data.write_jsonl(tmp_path / "heldout.jsonl", heldout)
    assert (tmp_path / "train.jsonl").read_bytes() == (REPO / "examples/data/tasks_train.jsonl").read_bytes()
    assert (tmp_path / "heldout.jsonl").read_bytes() == (REPO / "examples/data/tasks_heldout.jsonl").read_bytes()
    seen = {(r["task"], r["input"]) for r in train}
    assert not any((r["task"], r["input"]) in seen for r in heldout)
    for r in train[:200] + heldout:
        assert r["output"] == make_data.solve(r["task"], r["input"])


def test_scoring_prompt_equals_the_trained_prompt() -> None:
    from qwenlink.data.handlers import HandlerOptions, make_handler
    from qwenlink.data.readers import RecordBatch
    from qwenlink.tokenizer import Tokenizer

    quickstart = _load("quickstart")
    records = [json.loads(x) for x in (REPO / "examples/data/tasks_heldout.jsonl").read_text().splitlines()[::40]]
    tokenizer = Tokenizer.default()
    handler = make_handler(HandlerOptions(handler="alpaca", template="chatml"), tokenizer)
    columns = {k: [r[k] for r in records] for k in ("instruction", "input", "output")}
    result = handler.process(RecordBatch("heldout.jsonl", 1, columns))
    ids, lengths = result.outputs["packed_input_ids_document"]
    labels, _ = result.outputs["packed_labels_document"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for r, start, n in zip(records, starts, lengths):
        sample_ids, sample_labels = ids[start:start + n], labels[start:start + n]
        prompt_len = int(np.argmax(sample_labels != -100))
        assert quickstart.prompt_ids(tokenizer, r["instruction"], r["input"]) == sample_ids[:prompt_len].tolist()
        trained = sample_labels[sample_labels != -100].tolist()  # the reply and its <|im_end|>
        reply = tokenizer.decode(trained, skip_special_tokens=True)
        assert reply == r["output"]
