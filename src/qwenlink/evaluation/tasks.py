"""Multiple-choice tasks: questions, prompt formats (lm-eval's multiple_choice layout) and data-file reading.

A prompt is built the way lm-eval 0.4 builds a `multiple_choice` request without a chat template:

    description + (text(shot) + target_delimiter + target(shot) + fewshot_delimiter) for each shot + text(question)

and each choice is scored as the continuation `target_delimiter + label` (or `+ choice text`). MMLU and C-Eval are
two instances (mmlu.py, ceval.py); `load_task_file` reads a user's own task from a small TOML description.

Data files are read strictly: a malformed row is an error naming the file and line, never a silently skipped question,
because a skipped question changes the accuracy without anyone noticing.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from qwenlink.errors import QwenlinkError

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    """One multiple-choice item. `answer` indexes `choices`; `source` is "file:line" for messages and samples."""

    question: str
    choices: tuple[str, ...]
    answer: int
    source: str = ""


@dataclass(frozen=True)
class PromptFormat:
    """How questions become text. `template` uses str.format fields: {question} (stripped, as lm-eval's templates
    do), one field per label ({A}, {B}...) holding that choice's text, and {options} ("A. ...\\nB. ..." lines)."""

    template: str
    labels: tuple[str, ...] = LETTERS
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    continuation: str = "label"  # "label": score " A"; "text": score " {choice text}"

    def render(self, q: Question) -> str:
        fields: dict[str, Any] = {"question": q.question.strip(),
                                  "options": "\n".join(f"{l}. {c}" for l, c in zip(self.labels, q.choices))}
        fields.update(zip(self.labels, q.choices))
        return self.template.format_map(fields)

    def choice_texts(self, q: Question) -> list[str]:
        return list(self.labels[:len(q.choices)]) if self.continuation == "label" else list(q.choices)

    def context(self, description: str, shots: Sequence[Question], q: Question) -> str:
        """The full prompt for `q`: description, the solved shots, then `q` ending where the answer would go."""
        parts = [description]
        for shot in shots:
            parts.append(self.render(shot) + self.target_delimiter + self.choice_texts(shot)[shot.answer]
                         + self.fewshot_delimiter)
        parts.append(self.render(q))
        return "".join(parts)

    def continuations(self, q: Question) -> list[str]:
        return [self.target_delimiter + c for c in self.choice_texts(q)]


@dataclass
class Subject:
    """A scored unit of a task (an MMLU subject, a C-Eval subject, or a whole user task)."""

    name: str
    category: str
    description: str
    questions: list[Question]
    fewshot: list[Question] = field(default_factory=list)
    display_name: str = ""


@dataclass
class Task:
    name: str
    fmt: PromptFormat
    subjects: list[Subject]
    categories: tuple[str, ...] = ()  # report order; empty means the order of first appearance
    split: str = "test"
    files: tuple[Path, ...] = ()  # the data files it was read from (an --output must never replace one)


# ---- files ----------------------------------------------------------------------------------------------------------
def read_csv(path: Path, *, columns: Optional[int] = None, header: bool = False,
             required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, str] | list[str]]]:
    """Yield (line number where the record starts, row) from a UTF-8 CSV.

    Without a header, rows are lists and must have exactly `columns` fields; with one, rows are dicts, the header must
    name every `required` column and each row must have as many fields as the header.
    """
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise QwenlinkError(f"{path}: cannot read ({exc.strerror})") from None
    with fh:
        reader = csv.reader(fh)
        names: Optional[list[str]] = None
        start = 1
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if header and names is None:
                    names = [n.strip() for n in row]
                    missing = [c for c in required if c not in names]
                    if missing:
                        raise QwenlinkError(f"{path}:{line}: header {','.join(names)} lacks column(s) "
                                            f"{', '.join(missing)} (expected {','.join(required)})")
                    continue
                expected = len(names) if names is not None else columns
                if expected is not None and len(row) != expected:
                    what = f"header's {expected}" if names is not None else str(expected)
                    raise QwenlinkError(f"{path}:{line}: expected {what} columns, got {len(row)}")
                yield line, (dict(zip(names, row)) if names is not None else row)
        except UnicodeDecodeError as exc:
            raise QwenlinkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            raise QwenlinkError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise QwenlinkError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise QwenlinkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise QwenlinkError(f"{path}:{line_no}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise QwenlinkError(f"{path}:{line_no}: expected a JSON object per line")
        yield line_no, record


def parse_answer(value: Any, labels: Sequence[str], where: str) -> int:
    """An answer given as a label ("B") or a 0-based index (1, "1") -> index; anything else is an error."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip() in labels:
        return list(labels).index(value.strip())
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if 0 <= index < len(labels):
            return index
    raise QwenlinkError(f"{where}: answer {value!r} is not one of {', '.join(labels)}")


def letter_question(row: Sequence[str] | dict[str, str], where: str) -> Question:
    """A row with question, A, B, C, D, answer letter (MMLU's columns; C-Eval's by name)."""
    if isinstance(row, dict):
        fields = [row["question"], row["A"], row["B"], row["C"], row["D"], row["answer"]]
    else:
        fields = list(row)
    if fields[5] not in LETTERS:
        raise QwenlinkError(f"{where}: answer {fields[5]!r} is not one of A, B, C, D")
    answer = LETTERS.index(fields[5])
    return Question(fields[0], tuple(fields[1:5]), answer, where)


def pick_subjects(known: Sequence[str], wanted: Optional[Sequence[str]], task: str) -> list[str]:
    """The subjects to run, in the task's order; an unknown name is an error with the closest known one."""
    if not wanted:
        return list(known)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise QwenlinkError(f"{task}: unknown subject {unknown[0]!r}{hint} ({len(known)} subjects; see "
                            f"`qwenlink eval --task {task} --list-subjects`)")
    return [k for k in known if k in set(wanted)]


def check_shots(subjects: Sequence[Subject], shots: int, where: str) -> None:
    for s in subjects:
        if len(s.fewshot) < shots:
            raise QwenlinkError(f"{where}: subject {s.name} has {len(s.fewshot)} few-shot rows, fewer than "
                                f"--shots {shots}")


# ---- user tasks from TOML -------------------------------------------------------------------------------------------
def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a leading byte order mark is dropped
    except OSError as exc:
        raise QwenlinkError(f"{path}: cannot read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QwenlinkError(f"{path}: not valid TOML ({exc})") from None


_TASK_KEYS = {"name", "data", "fewshot_data", "description", "template", "labels", "question_field", "choices_field",
              "choice_fields", "answer_field", "subject_field", "continuation", "target_delimiter",
              "fewshot_delimiter"}


def load_task_file(path: str | os.PathLike, *, data_override: Optional[str] = None) -> Task:
    """A user task: TOML description + JSONL/CSV questions (paths relative to the TOML file). See docs/evaluation.md."""
    path = Path(path)
    spec = _load_toml(path)
    unknown = sorted(set(spec) - _TASK_KEYS)
    if unknown:
        raise QwenlinkError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TASK_KEYS))})")
    for key in ("data",) if data_override is None else ():
        if key not in spec:
            raise QwenlinkError(f"{path}: missing key {key!r} (the questions file, JSONL or CSV)")
    labels = tuple(spec.get("labels", LETTERS))
    if not labels or not all(isinstance(l, str) and l for l in labels):
        raise QwenlinkError(f"{path}: labels must be a non-empty list of strings")
    continuation = spec.get("continuation", "label")
    if continuation not in ("label", "text"):
        raise QwenlinkError(f"{path}: continuation must be \"label\" or \"text\", got {continuation!r}")
    fmt = PromptFormat(template=spec.get("template", "{question}\n{options}\nAnswer:"), labels=labels,
                       target_delimiter=spec.get("target_delimiter", " "),
                       fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"), continuation=continuation)
    name = spec.get("name", path.stem)
    base = path.parent
    data = Path(data_override) if data_override else base / spec["data"]
    if data.is_dir():
        raise QwenlinkError(f"{data}: expected a .jsonl or .csv file of questions, got a directory")
    fields = _FieldSpec.from_spec(spec, labels, path)
    questions = _read_records(data, fields)
    fewshot_file = base / spec["fewshot_data"] if spec.get("fewshot_data") else None
    fewshot = _read_records(fewshot_file, fields) if fewshot_file else []
    try:
        fmt.render(questions[0][0])
    except (KeyError, IndexError, ValueError) as exc:
        raise QwenlinkError(f"{path}: template field {exc} is not available (use {{question}}, {{options}} or "
                            f"a label such as {{{labels[0]}}})") from None
    description = spec.get("description", "")
    groups: dict[str, list[Question]] = {}
    for q, subject in questions:
        groups.setdefault(subject or name, []).append(q)
    shots: dict[str, list[Question]] = {}
    for q, subject in fewshot:
        shots.setdefault(subject or name, []).append(q)
    subjects = [Subject(s, "all", description.replace("{subject}", s.replace("_", " ")), qs,
                        shots.get(s, shots.get(name, [q for q, _ in fewshot])), s)
                for s, qs in groups.items()]
    return Task(name, fmt, subjects, ("all",), files=tuple(f for f in (data, fewshot_file) if f is not None))


@dataclass
class _FieldSpec:
    question: str
    choices: Optional[str]
    choice_fields: Optional[list[str]]
    answer: str
    subject: Optional[str]
    labels: tuple[str, ...]

    @classmethod
    def from_spec(cls, spec: dict[str, Any], labels: tuple[str, ...], where: Path) -> "_FieldSpec":
        choice_fields = spec.get("choice_fields")
        choices = spec.get("choices_field")
        if choice_fields is None and choices is None:
            choice_fields = list(labels)
        if choice_fields is not None and len(choice_fields) != len(labels):
            raise QwenlinkError(f"{where}: choice_fields has {len(choice_fields)} entries but labels has {len(labels)}")
        return cls(spec.get("question_field", "question"), choices, choice_fields,
                   spec.get("answer_field", "answer"), spec.get("subject_field"), labels)


def _read_records(data: Path, f: _FieldSpec) -> list[tuple[Question, Optional[str]]]:
    if not data.is_file():
        raise QwenlinkError(f"{data}: questions file not found")
    suffix = data.suffix.lower()
    if suffix == ".csv":
        required = [f.question, f.answer] + (f.choice_fields or [])
        rows: Iterator[tuple[int, Any]] = read_csv(data, header=True, required=required)
    elif suffix in (".jsonl", ".json"):
        rows = read_jsonl(data)
    else:
        raise QwenlinkError(f"{data}: unsupported questions file (expected .jsonl or .csv)")
    out = []
    for line, rec in rows:
        where = f"{data}:{line}"
        for key in [f.question, f.answer] + (f.choice_fields or [f.choices or ""]):
            if key not in rec:
                raise QwenlinkError(f"{where}: missing field {key!r}")
        if f.choice_fields is not None:
            choices = [rec[k] for k in f.choice_fields]
        else:
            choices = rec[f.choices]
            if isinstance(choices, str):
                try:
                    choices = json.loads(choices)
                except ValueError:
                    choices = None
            if not isinstance(choices, list) or len(choices) != len(f.labels):
                raise QwenlinkError(f"{where}: field {f.choices!r} must be a list of {len(f.labels)} choices")
        if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
            raise QwenlinkError(f"{where}: choices must be strings")
        question = rec[f.question]
        if not isinstance(question, str):
            raise QwenlinkError(f"{where}: field {f.question!r} must be a string")
        answer = parse_answer(rec[f.answer], f.labels, where)
        subject = str(rec[f.subject]) if f.subject and rec.get(f.subject) is not None else None
        out.append((Question(question, tuple(str(c) for c in choices), answer, where), subject))
    if not out:
        raise QwenlinkError(f"{data}: no questions")
    return out
