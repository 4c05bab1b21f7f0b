"""`preprocess --handler pairwise`: preference records -> aligned chosen / rejected indexed datasets with label masks;
records that cannot make a whole pair are skipped and reported with their file and row."""

from __future__ import annotations

import numpy as np

from data_helpers import write_jsonl
from qwenlink.data.indexed import IndexedDataset
from qwenlink.data.pairwise import PAIR_KEYS
from qwenlink.data.preference import PreferenceDataset

IM_END = "<|im_end|>"


def _read(prefix) -> dict[str, list[list[int]]]:
    return {k: [s.tolist() for s in IndexedDataset(f"{prefix}_packed_{k}_document")] for k in PAIR_KEYS}


def test_record_forms_give_whole_pairs_with_masked_prompts(tmp_path, cli, tok):
    records = [
        {"instruction": "Add", "input": "2+2", "chosen": "4", "rejected": "5"},                       # alpaca
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}],
         "chosen": {"role": "assistant", "content": "blue"}, "rejected": {"role": "assistant", "content": "red"}},
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"},
         "rejected": {"from": "gpt", "value": "Go away."}},                                          # ShareGPT
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},   # TRL
        {"prompt": "Name a fruit", "chosen": "apple", "rejected": "rock"},
    ]
    rc, out, err = cli("preprocess", "--input", write_jsonl(tmp_path / "p.jsonl", records), "--output-prefix",
                       tmp_path / "out", "--handler", "pairwise")
    assert rc == 0, err
    data = _read(tmp_path / "out")
    assert all(len(v) == len(records) for v in data.values())
    replies = [("4", "5"), ("blue", "red"), ("Hello!", "Go away."), ("good", "bad"), ("apple", "rock")]
    for i, (good, bad) in enumerate(replies):
        for side, text in (("chosen", good), ("rejected", bad)):
            ids, labels = data[f"{side}_input_ids"][i], data[f"{side}_labels"][i]
            assert len(ids) == len(labels)
            trained = [t for t, y in zip(ids, labels) if y != -100]
            assert tok.decode(trained) == text + IM_END  # the reply and the end of its turn, nothing else
            start = next(j for j, y in enumerate(labels) if y != -100)
            assert labels[start:start + len(trained)] == ids[start:start + len(trained)]  # one contiguous reply
        prompt = next(j for j, y in enumerate(data["chosen_labels"][i]) if y != -100)
        assert data["chosen_input_ids"][i][:prompt] == data["rejected_input_ids"][i][:prompt]  # one shared prompt
    assert "Be brief." in tok.decode(data["chosen_input_ids"][1])
    pairs = PreferenceDataset(tmp_path / "out")
    assert len(pairs) == len(records) and pairs[0]["chosen_labels"][-1] == -100  # shifted for training
    from qwenlink.checkpoint.chat_export import run_is_chat

    assert run_is_chat("dpo", [str(tmp_path / "out")], "", tok)  # a DPO run on ChatML pairs exports a chat model


def test_bad_records_are_reported_per_file_and_row_and_never_half_written(tmp_path, cli):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "chosen": "yes", "rejected": "no"},
        {"instruction": "no rejected", "chosen": "yes"},
        {"instruction": "empty chosen", "chosen": "  ", "rejected": "no"},
        {"instruction": "long", "chosen": "word " * 200, "rejected": "no"},
        {"chosen": "no prompt", "rejected": "at all"},
        {"instruction": "ok too", "chosen": "sure", "rejected": "never"},
    ])
    rc, out, err = cli("preprocess", "--input", path, "--output-prefix", tmp_path / "out", "--handler", "pairwise",
                       "--seq-length", "64")
    assert rc == 0, err
    assert f"skipped {path}: row 2: missing field 'rejected'" in out
    assert f"skipped {path}: row 3: empty chosen reply" in out
    assert f"skipped {path}: row 4: longer than --seq-length 64" in out
    assert f"skipped {path}: row 5: no prompt" in out
    data = _read(tmp_path / "out")
    assert [len(v) for v in data.values()] == [2, 2, 2, 2]
    # --overlong truncate keeps the long pair, both halves cut to 64 tokens
    rc, out, err = cli("preprocess", "--input", path, "--output-prefix", tmp_path / "cut", "--handler", "pairwise",
                       "--seq-length", "64", "--overlong", "truncate")
    assert rc == 0, err
    data = _read(tmp_path / "cut")
    assert len(data["chosen_input_ids"]) == 3 and max(map(len, data["chosen_input_ids"])) == 64


def test_structural_errors_stop_with_one_line(tmp_path, cli):
    path = write_jsonl(tmp_path / "roles.jsonl", [
        {"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}])
    rc, out, err = cli("preprocess", "--input", path, "--output-prefix", tmp_path / "out", "--handler-name",
                       "AlpacaStylePairwiseHandler")
    assert rc != 0
    assert f"{path}: row 1: messages message 1 has unknown role 'robot'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


def test_label_dtype_holds_the_mask(tmp_path, cli):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "a", "chosen": "b", "rejected": "c"}])
    assert cli("preprocess", "--input", path, "--output-prefix", tmp_path / "out", "--handler", "pairwise")[0] == 0
    labels = IndexedDataset(f"{tmp_path / 'out'}_packed_rejected_labels_document")
    assert labels.dtype == np.int32 and (labels[0] == -100).any()
