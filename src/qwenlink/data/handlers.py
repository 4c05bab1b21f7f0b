"""Handlers: turn one `RecordBatch` of raw records into token arrays for each output indexed dataset.

A handler is pure (records + tokenizer in, numpy arrays + counters out) so the same code runs in the main process or
in a worker process, and the output cannot depend on how many workers there are.

- `pretrain`: each `--json-keys` column becomes `PREFIX_{key}_document` (one document per record, optional EOD).
- `alpaca` / `sharegpt` (`chat`): `PREFIX_packed_{input_ids,attention_mask,labels}_document`; labels are -100 on every
  prompt / system / user token and equal to the ids on assistant tokens (+ the end token).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from qwenlink.data.counts import DocumentCounts
from qwenlink.data.readers import RecordBatch
from qwenlink.data.templates import Segment, Template, Turn, get_template
from qwenlink.errors import QwenlinkError
from qwenlink.tokenizer import Tokenizer

IGNORE_INDEX = -100
PACKED_KEYS = ("input_ids", "attention_mask", "labels")
# ShareGPT's `from` values and chat `role` values -> canonical role.
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


@dataclass
class HandlerOptions:
    """Everything that decides the token output (and nothing that doesn't, e.g. the worker count)."""

    handler: str = "pretrain"
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    seq_length: int | None = None
    overlong: str = "drop"           # "drop" or "truncate" samples longer than seq_length
    template: str = "chatml"


@dataclass
class BatchResult(DocumentCounts):
    """Token arrays for each output name: (tokens [sum(lengths)], lengths [n_docs]) + this batch's counts."""

    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _concat(ids: Sequence[Sequence[int]], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """List of token lists -> (flat [total], lengths [n]) without a Python loop over tokens."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _as_text(batch: RecordBatch, i: int, key: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise QwenlinkError(f"{batch.path}: row {batch.first_row + i}: field {key!r} must be a string, "
                            f"got {type(value).__name__}")
    return value


class Handler:
    """Base class; subclasses define `output_names`, `columns` and `process`."""

    def __init__(self, options: HandlerOptions, tokenizer: Tokenizer) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.eod = tokenizer.eos_id
        if options.append_eod and self.eod is None:
            raise QwenlinkError(f"tokenizer {tokenizer.source!r} has no end-of-document token for --append-eod")
        encode_fast = getattr(tokenizer.hf, "encode_batch_fast", None)  # no offsets: faster (tokenizers >= 0.20)
        self._encode = encode_fast or tokenizer.hf.encode_batch

    @property
    def output_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def required_columns(self) -> list[str]:
        raise NotImplementedError

    @property
    def optional_columns(self) -> list[str]:
        return []

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    def process(self, batch: RecordBatch) -> BatchResult:
        raise NotImplementedError


class PretrainHandler(Handler):
    """Raw text -> one document per record and key; empty texts are skipped and counted."""

    @property
    def output_names(self) -> list[str]:
        return [f"{k}_document" for k in self.options.json_keys]

    @property
    def required_columns(self) -> list[str]:
        return list(self.options.json_keys)

    def process(self, batch: RecordBatch) -> BatchResult:
        res = BatchResult(records=batch.num_rows)
        opts = self.options
        for key in opts.json_keys:
            texts = [_as_text(batch, i, key, v) for i, v in enumerate(batch.columns[key])]
            flat, lengths = _concat(self.encode(texts))
            keep = lengths > 0
            res.empty += int((~keep).sum())
            if not keep.all():  # drop empty documents: select the kept tokens with a per-token mask
                flat = flat[np.repeat(keep, lengths)]
                lengths = lengths[keep]
            if opts.append_eod:
                flat, lengths = _append_token(flat, lengths, self.eod)
            if opts.seq_length is not None and (lengths > opts.seq_length).any():
                flat, lengths, dropped, truncated = _limit_length(flat, lengths, opts.seq_length, opts.overlong)
                res.dropped_overlong += dropped
                res.truncated += truncated
            res.outputs[f"{key}_document"] = (flat, lengths)
            res.documents += int(lengths.size)
            res.tokens += int(flat.size)
        return res


def _append_token(flat: np.ndarray, lengths: np.ndarray, token: int) -> tuple[np.ndarray, np.ndarray]:
    """Insert `token` after every document: [total] -> [total + n]."""
    new_lengths = lengths + 1
    out = np.full(int(new_lengths.sum()), token, dtype=flat.dtype)
    is_text = np.ones(out.size, dtype=bool)
    is_text[np.cumsum(new_lengths) - 1] = False
    out[is_text] = flat
    return out, new_lengths


def _limit_length(flat: np.ndarray, lengths: np.ndarray, seq_length: int, policy: str,
                  *extra: np.ndarray) -> tuple:
    """Drop or truncate documents longer than seq_length; `extra` arrays aligned with `flat` get the same cut."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if policy == "drop":
        keep_doc = lengths <= seq_length
        per_token = np.repeat(keep_doc, lengths)
        new_lengths = lengths[keep_doc]
        dropped, truncated = int((~keep_doc).sum()), 0
    else:
        new_lengths = np.minimum(lengths, seq_length)
        pos_in_doc = np.arange(flat.size) - np.repeat(starts, lengths)
        per_token = pos_in_doc < seq_length
        dropped, truncated = 0, int((lengths > seq_length).sum())
    return (flat[per_token], new_lengths, dropped, truncated, *[a[per_token] for a in extra])


class InstructionHandler(Handler):
    """Instruction records -> packed input_ids / attention_mask / labels with prompt tokens masked to -100."""

    def __init__(self, options: HandlerOptions, tokenizer: Tokenizer) -> None:
        super().__init__(options, tokenizer)
        self.template: Template = get_template(options.template)
        self._constant_ids: dict[str, list[int]] = {}

    @property
    def output_names(self) -> list[str]:
        return [f"packed_{k}_document" for k in PACKED_KEYS]

    def record_segments(self, batch: RecordBatch, i: int) -> list[Segment]:
        raise NotImplementedError

    def tokenize_segments(self, samples: list[list[Segment]]) -> list[tuple[list[int], list[int]]]:
        """Segments -> (ids, aligned labels) per sample, prompt tokens masked to -100, EOD appended if asked.
        Every non-constant segment of the batch is tokenized in one call; constants come from a cache."""
        new = {s.text for segs in samples for s in segs if s.constant} - self._constant_ids.keys()
        for text in new:
            self._constant_ids[text] = self.encode([text])[0]
        encoded = iter(self.encode([s.text for segs in samples for s in segs if not s.constant]))
        out = []
        for segs in samples:
            ids: list[int] = []
            labels: list[int] = []
            for s in segs:
                seg_ids = self._constant_ids[s.text] if s.constant else next(encoded)
                ids.extend(seg_ids)
                labels.extend(seg_ids if s.trainable else [IGNORE_INDEX] * len(seg_ids))
            if self.options.append_eod:
                ids.append(self.eod)
                labels.append(self.eod)
            out.append((ids, labels))
        return out

    def process(self, batch: RecordBatch) -> BatchResult:
        res = BatchResult(records=batch.num_rows)
        per_record = [self.record_segments(batch, i) for i in range(batch.num_rows)]
        samples = self.tokenize_segments(per_record)
        ids_out = [ids for ids, _ in samples]
        label_out = [labels for _, labels in samples]
        flat, lengths = _concat(ids_out)
        flat_labels, _ = _concat(label_out)
        # A sample without a single trainable token (e.g. empty reply) teaches nothing: skip and count as empty.
        trainable = np.add.reduceat(flat_labels != IGNORE_INDEX, np.concatenate([[0], np.cumsum(lengths)[:-1]])) \
            if flat.size else np.zeros(lengths.size, dtype=np.int64)
        keep = (lengths > 0) & (trainable > 0)
        if not keep.all():
            per_token = np.repeat(keep, lengths)
            flat, flat_labels, lengths = flat[per_token], flat_labels[per_token], lengths[keep]
            res.empty += int((~keep).sum())
        opts = self.options
        if opts.seq_length is not None and (lengths > opts.seq_length).any():
            flat, lengths, dropped, truncated, flat_labels = _limit_length(
                flat, lengths, opts.seq_length, opts.overlong, flat_labels)
            res.dropped_overlong += dropped
            res.truncated += truncated
        res.outputs["packed_input_ids_document"] = (flat, lengths)
        res.outputs["packed_attention_mask_document"] = (np.ones_like(flat), lengths)
        res.outputs["packed_labels_document"] = (flat_labels, lengths)
        res.documents = int(lengths.size)
        res.tokens = int(flat.size)
        return res


class AlpacaHandler(InstructionHandler):
    """Records with `instruction`, `output` and optionally `input`."""

    @property
    def required_columns(self) -> list[str]:
        return ["instruction", "output"]

    @property
    def optional_columns(self) -> list[str]:
        return ["input"]

    def record_segments(self, batch: RecordBatch, i: int) -> list[Segment]:
        cols = batch.columns
        instruction = _as_text(batch, i, "instruction", cols["instruction"][i])
        output = _as_text(batch, i, "output", cols["output"][i])
        input_ = _as_text(batch, i, "input", cols["input"][i]) if "input" in cols else ""
        return self.template.render_alpaca(instruction, input_, output)


class ChatHandler(InstructionHandler):
    """Multi-turn records: `messages` [{role, content}] or ShareGPT `conversations` [{from, value}]."""

    @property
    def required_columns(self) -> list[str]:
        return []

    @property
    def optional_columns(self) -> list[str]:
        return ["messages", "conversations"]

    def record_segments(self, batch: RecordBatch, i: int) -> list[Segment]:
        row = batch.first_row + i
        msgs = batch.columns.get("messages", [None] * batch.num_rows)[i]
        role_key, text_key = "role", "content"
        if msgs is None:
            msgs = batch.columns.get("conversations", [None] * batch.num_rows)[i]
            role_key, text_key = "from", "value"
        if msgs is None:
            raise QwenlinkError(f"{batch.path}: row {row}: no 'messages' or 'conversations' field")
        if not isinstance(msgs, list):
            raise QwenlinkError(f"{batch.path}: row {row}: expected a list of messages, got {type(msgs).__name__}")
        turns: list[Turn] = []
        for j, m in enumerate(msgs, start=1):
            if not isinstance(m, dict) or role_key not in m or text_key not in m:
                raise QwenlinkError(f"{batch.path}: row {row}: message {j} must be an object with "
                                    f"{role_key!r} and {text_key!r}")
            role = ROLE_ALIASES.get(m[role_key]) if isinstance(m[role_key], str) else None
            if role is None:
                raise QwenlinkError(f"{batch.path}: row {row}: message {j} has unknown role {m[role_key]!r} "
                                    f"(expected one of {', '.join(ROLE_ALIASES)})")
            turns.append(Turn(role, _as_text(batch, i, f"message {j} {text_key}", m[text_key])))
        return self.template.render(turns)


HANDLERS: dict[str, type[Handler]] = {
    "pretrain": PretrainHandler, "alpaca": AlpacaHandler, "sharegpt": ChatHandler, "chat": ChatHandler,
}


def make_handler(options: HandlerOptions, tokenizer: Tokenizer,
                 handlers: dict[str, type[Handler]] | None = None) -> Handler:
    """The handler named by options.handler among `handlers` (default: this module's; data/preprocess.py adds the
    pairwise one of data/pairwise.py, which builds on this module)."""
    handlers = HANDLERS if handlers is None else handlers
    try:
        cls = handlers[options.handler]
    except KeyError:
        raise QwenlinkError(f"unknown --handler {options.handler!r} (expected one of {', '.join(handlers)})") from None
    return cls(options, tokenizer)
