"""Pairwise preference data (DPO): one prompt, a chosen and a rejected reply -> two aligned indexed datasets each.

Outputs (MindSpeed-LLM's pairwise names: its `chosen_input_ids`, `chosen_labels`, ... keys, each written as
`PREFIX_packed_{key}_document`):

    PREFIX_packed_chosen_input_ids_document     PREFIX_packed_chosen_labels_document
    PREFIX_packed_rejected_input_ids_document   PREFIX_packed_rejected_labels_document

Sample i of the chosen files and sample i of the rejected files are the two halves of one pair; labels are aligned
with the ids (-100 on every prompt / system / role-header token, the id on the reply and its end token), as for SFT.

Why a record is skipped rather than half-written: the four files must stay aligned sample for sample, so every
check (missing field, empty reply, longer than --seq-length) decides for the whole pair, and a skipped pair is
reported with its file and row. Structural errors (a field of the wrong type, an unknown role) stop the run with one
line naming the file and row, as for the other handlers.

Accepted records:
- alpaca style: `instruction`, optional `input` (and `system`), `chosen`, `rejected` (strings);
- chat style: `messages` (role/content) or ShareGPT `conversations` (from/value), or `prompt` (a string or a list of
  messages), with `chosen` / `rejected` each a string, one message, or a list of messages whose last is the reply
  (earlier messages are prompt turns shared by both, e.g. TRL's conversational format without a `prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwenlink.data.handlers import IGNORE_INDEX, ROLE_ALIASES, BatchResult, InstructionHandler, _as_text, _concat
from qwenlink.data.readers import RecordBatch
from qwenlink.data.templates import Segment, Turn
from qwenlink.errors import QwenlinkError

SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{side}_{key}" for side in SIDES for key in ("input_ids", "labels"))
MAX_REPORTED = 20  # skipped pairs listed one by one in the summary; the rest are counted


def pairwise_output_names() -> list[str]:
    """`packed_{chosen,rejected}_{input_ids,labels}_document`, the four files of a pairwise dataset."""
    return [f"packed_{k}_document" for k in PAIR_KEYS]


class Skip(Exception):
    """This record cannot make a pair; the message says why (reported with its file and row)."""


@dataclass
class PairBatchResult(BatchResult):
    """A batch's pairs, plus `skipped`: one "FILE: row N: why" line per skipped pair."""

    skipped: list[str] = field(default_factory=list)


class PairwiseHandler(InstructionHandler):
    """Preference records -> chosen and rejected samples with prompt tokens masked to -100 (whole pairs only).
    Template, constant-segment cache and tokenization are the instruction handler's."""

    @property
    def output_names(self) -> list[str]:
        return pairwise_output_names()

    @property
    def required_columns(self) -> list[str]:
        return []  # a record without `chosen` / `rejected` is skipped and reported, not fatal

    @property
    def optional_columns(self) -> list[str]:
        return ["chosen", "rejected", "instruction", "input", "system", "prompt", "messages", "conversations"]

    # ---- records -> turns -------------------------------------------------------------------------------------------
    def _turns(self, batch: RecordBatch, i: int, value: Any, what: str) -> list[Turn]:
        """A list of messages (role/content or from/value) -> turns; wrong shapes stop the run (file, row)."""
        where = f"{batch.path}: row {batch.first_row + i}"
        if not isinstance(value, list):
            raise QwenlinkError(f"{where}: {what} must be a list of messages, got {type(value).__name__}")
        turns = []
        for j, m in enumerate(value, start=1):
            turns.append(self._message(batch, i, m, f"{what} message {j}"))
        return turns

    def _message(self, batch: RecordBatch, i: int, m: Any, what: str) -> Turn:
        where = f"{batch.path}: row {batch.first_row + i}"
        keys = ("role", "content") if isinstance(m, dict) and "role" in m else ("from", "value")
        if not isinstance(m, dict) or keys[0] not in m or keys[1] not in m:
            raise QwenlinkError(f"{where}: {what} must be an object with 'role' and 'content' (or 'from' and "
                                f"'value')")
        role = ROLE_ALIASES.get(m[keys[0]]) if isinstance(m[keys[0]], str) else None
        if role is None:
            raise QwenlinkError(f"{where}: {what} has unknown role {m[keys[0]]!r} (expected one of "
                                f"{', '.join(ROLE_ALIASES)})")
        return Turn(role, _as_text(batch, i, f"{what} {keys[1]}", m[keys[1]]))

    def _prompt(self, batch: RecordBatch, i: int) -> list[Turn]:
        cols = batch.columns
        get = lambda name: cols[name][i] if name in cols else None  # noqa: E731
        turns: list[Turn] = []
        system = get("system")
        if system:
            turns.append(Turn("system", _as_text(batch, i, "system", system)))
        for name in ("messages", "conversations"):
            if get(name) is not None:
                return turns + self._turns(batch, i, get(name), name)
        prompt = get("prompt")
        if isinstance(prompt, list):
            return turns + self._turns(batch, i, prompt, "prompt")
        if prompt is not None:
            text = _as_text(batch, i, "prompt", prompt)
            if not text.strip():
                raise Skip("empty prompt")
            return turns + [Turn("user", text)]
        instruction = get("instruction")
        if instruction is None:
            return turns  # the prompt may come with the replies (lists of messages)
        instruction = _as_text(batch, i, "instruction", instruction)
        input_ = _as_text(batch, i, "input", get("input"))
        if not (instruction.strip() or input_.strip()):
            raise Skip("empty instruction")
        return turns + [Turn("user", f"{instruction}\n{input_}" if input_ else instruction)]

    def _reply(self, batch: RecordBatch, i: int, side: str) -> tuple[list[Turn], str]:
        """(prompt turns carried by the reply itself, the reply text) of `chosen` or `rejected`."""
        value = batch.columns[side][i] if side in batch.columns else None
        if value is None:
            raise Skip(f"missing field {side!r}")
        if isinstance(value, str):
            turns = [Turn("assistant", value)]
        elif isinstance(value, dict):
            turns = [self._message(batch, i, value, side)]
        else:
            turns = self._turns(batch, i, value, side)
        if not turns:
            raise Skip(f"empty {side} reply")
        if turns[-1].role != "assistant":
            raise QwenlinkError(f"{batch.path}: row {batch.first_row + i}: the last message of {side} must be the "
                                f"assistant's reply, got role {turns[-1].role!r}")
        if not turns[-1].content.strip():
            raise Skip(f"empty {side} reply")
        return turns[:-1], turns[-1].content

    def record_pair(self, batch: RecordBatch, i: int) -> tuple[list[Segment], list[Segment]]:
        """The chosen and rejected conversations of record i as template segments (raises Skip)."""
        prompt = self._prompt(batch, i)
        (c_prefix, chosen), (r_prefix, rejected) = self._reply(batch, i, "chosen"), self._reply(batch, i, "rejected")
        if c_prefix != r_prefix:
            raise Skip("chosen and rejected carry different prompt messages")
        prompt = prompt + c_prefix
        if not any(t.role == "user" for t in prompt):
            raise Skip("no prompt (expected instruction, prompt, messages or conversations)")
        return (self.template.render(prompt + [Turn("assistant", chosen)]),
                self.template.render(prompt + [Turn("assistant", rejected)]))

    # ---- tokens -----------------------------------------------------------------------------------------------------
    def _limit(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """One side of a pair cut to --seq-length (--overlong truncate); Skip when no reply token is left."""
        n = self.options.seq_length
        ids, labels = ids[:n], labels[:n]
        if all(x == IGNORE_INDEX for x in labels):
            raise Skip(f"no reply token within --seq-length {n} (--overlong truncate)")
        return ids, labels

    def process(self, batch: RecordBatch) -> PairBatchResult:
        res = PairBatchResult(records=batch.num_rows)
        rows: list[int] = []
        conversations: list[list[Segment]] = []
        for i in range(batch.num_rows):
            try:
                chosen, rejected = self.record_pair(batch, i)
            except Skip as why:
                res.empty += 1
                res.skipped.append(f"{batch.path}: row {batch.first_row + i}: {why}")
                continue
            rows.append(i)
            conversations += [chosen, rejected]
        tokens = self.tokenize_segments(conversations)
        opts = self.options
        kept: dict[str, list[list[int]]] = {k: [] for k in PAIR_KEYS}
        for k, i in enumerate(rows):
            (c_ids, c_labels), (r_ids, r_labels) = tokens[2 * k], tokens[2 * k + 1]
            where = f"{batch.path}: row {batch.first_row + i}"
            if opts.seq_length is not None and max(len(c_ids), len(r_ids)) > opts.seq_length:
                if opts.overlong == "drop":
                    res.dropped_overlong += 1
                    res.skipped.append(f"{where}: longer than --seq-length {opts.seq_length} (chosen {len(c_ids)}, "
                                       f"rejected {len(r_ids)} tokens)")
                    continue
                try:
                    (c_ids, c_labels), (r_ids, r_labels) = self._limit(c_ids, c_labels), self._limit(r_ids, r_labels)
                except Skip as why:
                    res.empty += 1
                    res.skipped.append(f"{where}: {why}")
                    continue
                res.truncated += 1
            for key, value in zip(PAIR_KEYS, (c_ids, c_labels, r_ids, r_labels)):
                kept[key].append(value)
        for key, values in kept.items():
            res.outputs[f"packed_{key}_document"] = _concat(values)
        res.documents = len(kept["chosen_input_ids"])
        res.tokens = int(sum(res.outputs[f"packed_{s}_input_ids_document"][0].size for s in SIDES))
        return res
