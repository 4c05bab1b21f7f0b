"""Benchmarks distributed as one CSV per subject and split, {root}/{split}/{subject}_{split}.csv (MMLU, C-Eval).

Why shared: both benchmarks find their data folder, read a split strictly and pair each subject's questions with its
dev rows (the few-shot examples) the same way; only the names, the columns and the wording of messages differ, and
those are a `SubjectCsvLayout`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qwenlink.errors import QwenlinkError
from qwenlink.evaluation.tasks import Question, letter_question, read_csv


@dataclass(frozen=True)
class SubjectCsvLayout:
    """One benchmark's folder layout and CSV columns, and how its messages name it."""

    benchmark: str  # "MMLU": how messages name the benchmark
    article: str  # "an" or "a", for "not an MMLU data directory"
    question_splits: tuple[str, ...]  # dev/ beside any of these marks the data folder; messages name the first
    example: str  # one file of a real folder, shown when a folder is not the benchmark's
    subject_count: int
    columns: Optional[int] = None  # files without a header: the fields of every row
    required: tuple[str, ...] = ()  # files with a header: the columns it must name (a header is expected if any)

    def find_data_dir(self, path: str | os.PathLike) -> Path:
        """The folder holding dev/ and a question split: the given one, or its `data/` (an unpacked archive's top)."""
        root = Path(path)
        split = self.question_splits[0]
        expected = f"dev/ and {split}/ holding {{subject}}_dev.csv and {{subject}}_{split}.csv"
        if not root.is_dir():
            raise QwenlinkError(f"{root}: {self.benchmark} data directory not found (expected a folder with "
                                f"{expected})")
        for candidate in (root, root / "data"):
            if (candidate / "dev").is_dir() and any((candidate / s).is_dir() for s in self.question_splits):
                return candidate
        raise QwenlinkError(f"{root}: not {self.article} {self.benchmark} data directory (expected dev/ and {split}/ "
                            f"with {{subject}}_dev.csv and {{subject}}_{split}.csv, e.g. {self.example})")

    def read_split(self, data_dir: Path, subject: str, split: str) -> list[Question]:
        """Every question of one subject's split; a missing file, a malformed row or no rows at all is an error."""
        path = data_dir / split / f"{subject}_{split}.csv"
        if not path.is_file():
            raise QwenlinkError(f"{path}: missing ({self.benchmark} expects {split}/{{subject}}_{split}.csv for each "
                                f"of the {self.subject_count} subjects; pass --subjects to run fewer)")
        rows = read_csv(path, columns=self.columns, header=bool(self.required), required=self.required)
        questions = [letter_question(row, f"{path}:{line}") for line, row in rows]
        if not questions:
            raise QwenlinkError(f"{path}: no questions")
        return questions

    def read_subject(self, data_dir: Path, subject: str, split: str,
                     shots: int) -> tuple[list[Question], list[Question]]:
        """(the split's questions, the dev rows used as shots; none read when shots is 0)."""
        questions = self.read_split(data_dir, subject, split)
        return questions, self.read_split(data_dir, subject, "dev") if shots > 0 else []
