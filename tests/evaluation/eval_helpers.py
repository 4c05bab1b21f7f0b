"""Helpers for the evaluation tests: lm-evaluation-harness tasks built from its own installed YAML over local files,
and tiny random transformers models saved as HF directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import pytest

# lm-eval and `datasets` must never try the network: the tests read local files only.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lm_eval_tasks_dir() -> Path:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")
    return Path(lm_eval.__file__).parent / "tasks"


def load_lm_eval_yaml(relative: str) -> dict[str, Any]:
    """An lm-eval task config with its `include`s resolved, by lm-eval's own YAML loader."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks_dir() / relative)


def _mmlu_docs(dataset):
    """CSV rows -> the schema of the HF dataset lm-eval's mmlu task reads (question, choices, answer index)."""
    def convert(row: dict) -> dict:
        return {"question": row["question"], "choices": [row["A"], row["B"], row["C"], row["D"]],
                "answer": "ABCD".index(row["label"])}

    return dataset.map(convert, remove_columns=["A", "B", "C", "D", "label"])


def _string_features(names: list[str]):
    from datasets import Features, Value

    return Features({n: Value("string") for n in names})


def lm_eval_mmlu_task(subject: str, data_dir: Path, shots: int):
    """lm-eval's own `mmlu_{subject}` task (its installed YAML), reading the original CSVs instead of the hub copy.

    Only the data source is replaced: pandas reads the CSVs as strings (no NaN for "None"), and a process_docs turns a
    row into the hub dataset's schema; every prompt field comes from lm-eval's YAML.
    """
    from lm_eval.api.task import ConfigurableTask

    cfg = load_lm_eval_yaml(f"mmlu/default/mmlu_{subject}.yaml")
    names = ["question", "A", "B", "C", "D", "label"]
    cfg.update(dataset_path="csv", dataset_name=None, process_docs=_mmlu_docs,
               dataset_kwargs={"data_files": {"dev": str(data_dir / "dev" / f"{subject}_dev.csv"),
                                              "test": str(data_dir / "test" / f"{subject}_test.csv")},
                               "column_names": names, "features": _string_features(names),
                               "keep_default_na": False})
    cfg.pop("tag", None)
    cfg["num_fewshot"] = shots
    return ConfigurableTask(config=cfg)


def lm_eval_ceval_task(subject: str, data_dir: Path, shots: int):
    """lm-eval's own `ceval-valid_{subject}` task over local C-Eval-layout CSVs (with their header)."""
    from lm_eval.api.task import ConfigurableTask

    cfg = load_lm_eval_yaml(f"ceval/ceval-valid_{subject}.yaml")
    names = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    cfg.update(dataset_path="csv", dataset_name=None,
               dataset_kwargs={"data_files": {"dev": str(data_dir / "dev" / f"{subject}_dev.csv"),
                                              "val": str(data_dir / "val" / f"{subject}_val.csv")},
                               "features": _string_features(names), "keep_default_na": False})
    cfg.pop("tag", None)
    cfg["num_fewshot"] = shots
    return ConfigurableTask(config=cfg)


def lm_eval_requests(task, limit: Optional[int]) -> list[tuple[int, tuple[str, str]]]:
    """(doc id, (context, continuation)) for every loglikelihood request lm-eval builds, in its order."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, inst.args) for inst in task.instances]


def make_random_hf_model(directory: Path, tokenizer_dir: Path, *, seed: int = 0, std: float = 0.2,
                         vocab: int = 258, max_positions: int = 4096) -> Path:
    """A tiny random transformers Qwen2ForCausalLM saved with `tokenizer_dir`'s tokenizer.

    The weights are drawn wider than HF's default init (std 0.02) so the model is confident enough that two choices
    are never within float rounding of each other, which would make an exact argmax comparison meaningless.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         initializer_range=std, bos_token_id=1, eos_token_id=1)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, directory / f.name)
    return directory


# ---- C-Eval-layout files made by the tests (the real data is not in the repository) ----------------------------------
CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]


def ceval_rows(subject: str, n: int, *, offset: int = 0) -> list[list[str]]:
    """Questions shaped like C-Eval's: Chinese text, full-width punctuation, commas and quotes inside fields, a line
    break inside a question, leading/trailing spaces that the template's strip() must remove."""
    rows = []
    for i in range(n):
        k = i + offset
        question = [f"关于{subject}的第{k}题：下列说法，哪一项是“正确”的？",
                    f"  已知 x = {k}, y = \"{k + 1}\"，求 x+y 的值。  ",
                    f"第一行\n第二行，{k}：选出正确答案"][k % 3]
        choices = [f"{k}", f"选项, 含逗号 {k}", f"“引号” {k}", f"{k + 3}.5%"]
        rows.append([str(k), question, *choices, "ABCD"[k % 4], f"解析{k}，略"])
    return rows


def write_ceval(root: Path, subjects: dict[str, tuple[int, int]]) -> Path:
    """root/{dev,val}/{subject}_{split}.csv for {subject: (dev rows, val rows)}; returns root."""
    import csv

    for subject, (n_dev, n_val) in subjects.items():
        for split, n, offset in (("dev", n_dev, 100), ("val", n_val, 0)):
            path = root / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(CEVAL_HEADER)
                writer.writerows(ceval_rows(subject, n, offset=offset))
    return root


def run_cli(*args: str, timeout: float = 300):
    """`qwenlink ARGS...` in a fresh interpreter, as a user runs it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qwenlink.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
