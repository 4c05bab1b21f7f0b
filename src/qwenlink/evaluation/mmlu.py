"""MMLU (Hendrycks et al.) from the layout its authors distribute: data/{dev,val,test}/{subject}_{split}.csv.

The CSVs have no header; columns are question, A, B, C, D, answer letter. The prompt is lm-eval 0.4's `mmlu` default
task: the description names the subject with spaces, few-shot examples are the first k dev rows, each question is
"{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" and the choices are scored as " A".." D".
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from qwenlink.errors import QwenlinkError
from qwenlink.evaluation.subject_csv import SubjectCsvLayout
from qwenlink.evaluation.tasks import PromptFormat, Subject, Task, pick_subjects

# The standard subject -> category map (MMLU's categories.py; lm-eval's mmlu_{category}_tasks tags).
_CATEGORY_SUBJECTS = {
    "STEM": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
                       "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
CATEGORIES: tuple[str, ...] = tuple(_CATEGORY_SUBJECTS)
SUBJECT_CATEGORY: dict[str, str] = {s: c for c, names in _CATEGORY_SUBJECTS.items() for s in names.split()}
SUBJECTS: tuple[str, ...] = tuple(sorted(SUBJECT_CATEGORY))  # 57, alphabetical as in the data folders

PROMPT = PromptFormat(template="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:")
SPLITS = ("test", "val")
# No header; columns question, A, B, C, D, answer letter.
LAYOUT = SubjectCsvLayout("MMLU", "an", SPLITS, "dev/abstract_algebra_dev.csv", len(SUBJECTS), columns=6)


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def load_mmlu(data_dir: str | os.PathLike, *, subjects: Optional[Sequence[str]] = None, split: str = "test",
              shots: int = 5) -> Task:
    """Read the chosen subjects' `split` questions and the dev rows used as shots (all files checked up front)."""
    if split not in SPLITS:
        raise QwenlinkError(f"mmlu: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    root = LAYOUT.find_data_dir(data_dir)
    out = [Subject(name, SUBJECT_CATEGORY[name], description(name), *LAYOUT.read_subject(root, name, split, shots))
           for name in pick_subjects(SUBJECTS, subjects, "mmlu")]
    return Task("mmlu", PROMPT, out, CATEGORIES, split)
