"""Instruction data: label masking (decode what is trained on), templates, padding, packing, label shift."""

from __future__ import annotations

import numpy as np

from qwenlink.data.instruction import (InstructionDataset, PackedInstructionDataset, pack_bins,
                                       packed_attention_mask, pad_collate)
from qwenlink.data.templates import ALPACA_SYSTEM

from data_helpers import write_jsonl

ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "Hi there!"},
    {"instruction": "Add the numbers", "input": "2 + 2", "output": "The sum is 4."},
    {"instruction": "Translate to French", "input": "good morning", "output": "Bonjour."},
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
                  {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Blue."}]},
]


def _prep(cli, tmp_path, records, handler, template, *extra):
    src = write_jsonl(tmp_path / "in.jsonl", records)
    rc, out, err = cli("preprocess", "--input", src, "--output-prefix", tmp_path / "sft", "--handler", handler,
                       "--template", template, *extra)
    assert rc == 0, err
    return InstructionDataset(tmp_path / "sft")


def _trained_text(tok, ds, i) -> str:
    _, labels = ds.raw(i)
    return tok.decode([x for x in labels if x != -100])


def test_alpaca_masking_trains_only_on_the_response(tmp_path, cli, tok):
    ds = _prep(cli, tmp_path, ALPACA, "alpaca", "alpaca", "--append-eod")
    assert len(ds) == 3
    for i, rec in enumerate(ALPACA):
        ids, labels = ds.raw(i)
        assert _trained_text(tok, ds, i) == rec["output"] + "\n<|endoftext|>"
        # The masked part is exactly ModelLink's prompt; the trained part follows it directly.
        prompt = tok.decode(ids[labels == -100])
        assert prompt == f"\n{ALPACA_SYSTEM}\n### Instruction:\n{rec['instruction']}\n{rec['input']}\n### Response:\n"
        first_trained = int(np.argmax(labels != -100))
        assert (labels[first_trained:] != -100).all()  # one contiguous response at the end
        np.testing.assert_array_equal(labels[first_trained:], ids[first_trained:])


def test_chatml_masking_trains_only_on_assistant_turns(tmp_path, cli, tok):
    ds = _prep(cli, tmp_path, CHAT, "chat", "chatml")
    for i, rec in enumerate(CHAT):
        ids, _ = ds.raw(i)
        # The full text is exactly Qwen1.5's chat template of the conversation.
        assert tok.decode(ids) == tok.apply_chat_template(rec["messages"], add_generation_prompt=False)
        replies = [m["content"] + "<|im_end|>" for m in rec["messages"] if m["role"] == "assistant"]
        assert _trained_text(tok, ds, i) == "".join(replies)
    # Every user / system token is masked: no <|im_start|> is ever a label.
    for i in range(len(ds)):
        assert tok.token_to_id("<|im_start|>") not in ds.raw(i)[1].tolist()


def test_sharegpt_records_and_chatml_for_alpaca(tmp_path, cli, tok):
    ds = _prep(cli, tmp_path, SHAREGPT, "sharegpt", "chatml")
    assert _trained_text(tok, ds, 0) == "Blue.<|im_end|>"
    ds = _prep(cli, tmp_path, ALPACA[1:2], "alpaca", "chatml")
    ids, _ = ds.raw(0)
    want = tok.apply_chat_template([{"role": "user", "content": "Add the numbers\n2 + 2"},
                                    {"role": "assistant", "content": "The sum is 4."}], add_generation_prompt=False)
    assert tok.decode(ids) == want
    assert _trained_text(tok, ds, 0) == "The sum is 4.<|im_end|>"


def test_instruction_outputs_use_modellink_names_and_agree(tmp_path, cli):
    _prep(cli, tmp_path, ALPACA, "alpaca", "alpaca")
    for key in ("input_ids", "attention_mask", "labels"):
        assert (tmp_path / f"sft_packed_{key}_document.bin").is_file()
        assert (tmp_path / f"sft_packed_{key}_document.idx").is_file()
    from qwenlink.data.indexed import IndexedDataset
    mask = IndexedDataset(tmp_path / "sft_packed_attention_mask_document")
    ids = IndexedDataset(tmp_path / "sft_packed_input_ids_document")
    np.testing.assert_array_equal(mask.sequence_lengths, ids.sequence_lengths)
    assert all((m == 1).all() for m in mask)


def test_shifted_labels_predict_the_next_token(tmp_path, cli):
    ds = _prep(cli, tmp_path, ALPACA, "alpaca", "alpaca", "--append-eod")
    item = ds[1]
    ids, raw = ds.raw(1)
    # labels[t] is the target for position t: the stored label of t + 1; the last position predicts nothing.
    np.testing.assert_array_equal(item["labels"][:-1], raw[1:])
    assert item["labels"][-1] == -100
    trained = item["labels"] != -100
    np.testing.assert_array_equal(item["labels"][trained], ids[1:][trained[:-1]])


def test_pad_collate_pads_to_a_multiple_of_8(tmp_path, cli, tok):
    ds = _prep(cli, tmp_path, ALPACA, "alpaca", "alpaca")
    batch = pad_collate([ds[0], ds[1]], pad_id=tok.pad_id)
    longest = max(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    B, L = batch["input_ids"].shape
    assert B == 2 and L % 8 == 0 and longest <= L < longest + 8
    n0 = len(ds[0]["input_ids"])
    assert batch["attention_mask"][0].sum() == n0
    assert (batch["labels"][0, n0:] == -100).all() and (batch["input_ids"][0, n0:] == tok.pad_id).all()
    assert batch["position_ids"][0, :n0].tolist() == list(range(n0))


def test_packing_restarts_positions_and_never_crosses_samples(tmp_path, cli, tok):
    ds = _prep(cli, tmp_path, ALPACA * 4, "alpaca", "alpaca", "--append-eod")
    lengths = ds.lengths
    seq = int(lengths[0] + lengths[1] + 5)  # two samples fit in the first sequence, not three
    packed = PackedInstructionDataset(ds, seq_length=seq, pad_id=tok.pad_id)
    assert packed.bins[0] == [0, 1]
    assert sorted(k for b in packed.bins for k in b) == list(range(len(ds)))
    item = packed[0]
    n0, n1 = int(lengths[0]), int(lengths[1])
    assert item["input_ids"].shape == (seq,)
    assert item["position_ids"][:n0].tolist() == list(range(n0))
    assert item["position_ids"][n0:n0 + n1].tolist() == list(range(n1))
    assert item["segment_ids"].tolist() == [1] * n0 + [2] * n1 + [0] * (seq - n0 - n1)
    assert item["cu_seqlens"].tolist() == [0, n0, n0 + n1, seq]
    # The last token of sample 1 must not be trained to predict the first token of sample 2.
    assert item["labels"][n0 - 1] == -100 and item["labels"][n0 + n1 - 1] == -100
    np.testing.assert_array_equal(item["labels"][:n0].numpy(), ds[0]["labels"])
    np.testing.assert_array_equal(item["labels"][n0:n0 + n1].numpy(), ds[1]["labels"])
    mask = packed_attention_mask(item["segment_ids"][None])  # [1, 1, L, L]
    assert mask.shape == (1, 1, seq, seq)
    assert not mask[0, 0, n0:n0 + n1, :n0].any()  # sample 2 cannot see sample 1
    assert mask[0, 0, n0 + 3, n0:n0 + 4].all() and not mask[0, 0, n0 + 3, n0 + 4:].any()  # causal in sample 2


def test_pack_bins_keeps_order_and_isolates_long_samples():
    assert pack_bins(np.array([3, 3, 3, 10, 1]), 6) == [[0, 1], [2], [3], [4]]


def test_unmasked_tokens_cover_every_reply_with_multi_turn_alpaca(tmp_path, cli, tok):
    ds = _prep(cli, tmp_path, CHAT[:1], "chat", "alpaca")
    assert _trained_text(tok, ds, 0) == "Hi! How can I help?\nNo.\n"


def test_conversation_without_a_reply_is_skipped_and_counted(tmp_path, cli, tok):
    records = CHAT[:1] + [{"messages": [{"role": "user", "content": "anyone there?"}]}]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    rc, out, err = cli("preprocess", "--input", src, "--output-prefix", tmp_path / "sft", "--handler", "chat")
    assert rc == 0, err
    assert len(InstructionDataset(tmp_path / "sft")) == 1
    assert "skipped 1 empty documents" in out
