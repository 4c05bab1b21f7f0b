"""Every command that reads an input, on every kind of bad input it reads (the corpus of make_corpus.py).

For each (command, bad input): exit code != 0, exactly one line on stderr that names the bad file and the problem,
no traceback, nothing written where the command was asked to write, and no payload executed. Each case runs the
real `qwenlink` entry point in a forked process (torch is already imported, so a case takes a fraction of a second
instead of a fresh interpreter's seconds) with stdout/stderr captured at the file-descriptor level.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from make_corpus import CORPUS, make_corpus, marker_path

# command -> argument template; {bad} is the corpus entry, {out} a fresh directory the command may write into
COMMANDS = {
    "info": ["info", "{bad}"],
    "generate": ["generate", "--model", "{bad}", "--prompt", "hi", "--max-new-tokens", "2",
                 "--output", "{out}/gen.jsonl"],
    "generate-tokenizer": ["generate", "--model", "test-tiny", "--tokenizer", "{bad}", "--prompt", "hi",
                           "--output", "{out}/gen.jsonl"],
    "generate-input": ["generate", "--model", "qwen-tiny", "--input", "{bad}", "--max-new-tokens", "1",
                       "--output", "{out}/gen.jsonl"],
    "convert-hf": ["convert", "--input", "{bad}", "--output", "{out}/converted", "--to", "hf"],
    "convert-megatron": ["convert", "--input", "{bad}", "--output", "{out}/converted", "--to", "megatron"],
    "preprocess": ["preprocess", "--input", "{bad}", "--output-prefix", "{out}/data", "--tokenizer", "{tok}"],
    "preprocess-alpaca": ["preprocess", "--input", "{bad}", "--output-prefix", "{out}/data", "--handler", "alpaca",
                          "--tokenizer", "{tok}"],
    "preprocess-tokenizer": ["preprocess", "--input", "{good_jsonl}", "--output-prefix", "{out}/data",
                             "--tokenizer", "{bad}"],
    "preprocess-inspect": ["preprocess", "--inspect", "{bad}/data_text_document", "--tokenizer", "{tok}"],
    "train-config": ["train", "--config", "{bad}", "--data.path={good_prefix}", "--job.output_dir={out}/run"],
    "train-data": ["train", "--model.preset=test-tiny", "--data.path={bad}/data_text_document",
                   "--data.seq_length=16", "--train.global_batch_size=2", "--train.device=cpu",
                   "--job.output_dir={out}/run"],
    "train-init-from": ["train", "--model.init_from={bad}", "--data.path={good_prefix}", "--data.seq_length=16",
                        "--train.global_batch_size=2", "--train.device=cpu", "--job.output_dir={out}/run"],
    "eval": ["eval", "--model", "{bad}", "--task", "{good_task}", "--shots", "0", "--output", "{out}/results.json"],
    "eval-task": ["eval", "--model", "qwen-tiny", "--task", "{bad}", "--shots", "0", "--output", "{out}/results.json"],
    "eval-task-dir": ["eval", "--model", "qwen-tiny", "--task", "{bad}/task.toml", "--shots", "0",
                      "--output", "{out}/results.json"],
    "serve": ["serve", "--model", "{bad}", "--port", "0"],
}


@dataclass(frozen=True)
class Case:
    command: str
    entry: str          # corpus entry
    names: str          # the path (relative to the corpus) the error line must name
    problem: str        # regex the error line must match (the problem, in words)


def _cases() -> list[Case]:
    c: list[Case] = []

    def add(commands: str, entry: str, problem: str, names: str | None = None) -> None:
        for command in commands.split():
            c.append(Case(command, entry, names or entry, problem))

    hf_readers = "generate convert-hf convert-megatron eval serve train-init-from"
    add(hf_readers, "model_corrupt_safetensors", r"unreadable safetensors file",
        "model_corrupt_safetensors/model.safetensors")
    add(hf_readers, "model_truncated_safetensors", r"unreadable safetensors file|tensor .* unreadable",
        "model_truncated_safetensors/model.safetensors")
    add(hf_readers, "model_pickle_bin", r"only pickle \(\.bin\) weights found; qwenlink reads safetensors only")
    add("info " + hf_readers, "model_config_typo", r"missing field 'num_hidden_layers'",
        "model_config_typo/config.json")
    add("info " + hf_readers, "model_config_wrong_type", r"hidden_size|num_attention_heads",
        "model_config_wrong_type/config.json")
    add("info " + hf_readers, "model_config_not_json", r"not valid JSON", "model_config_not_json/config.json")
    add("info " + hf_readers, "model_config_non_utf8", r"not valid JSON|UTF-8|utf-8",
        "model_config_non_utf8/config.json")
    add("info " + hf_readers, "model_config_empty", r"not valid JSON|empty", "model_config_empty/config.json")
    add("info " + hf_readers, "model_unsupported_arch", r"unsupported architecture model_type='mixtral'",
        "model_unsupported_arch/config.json")
    add(hf_readers, "model_shape_mismatch", r"has shape \[320, 32\], expected \[320, 64\]",
        "model_shape_mismatch/model.safetensors")
    add("generate eval serve", "model_vocab_mismatch", r"tokenizer .*has 151646 ids but the model's vocab_size is 320")
    add("info generate convert-hf eval serve train-init-from", "model_empty_dir",
        r"missing config\.json|not an HF model|no complete qwenlink checkpoint|neither an HF directory|"
        r"unknown checkpoint format")
    add("generate convert-hf train-init-from", "ckpt_malicious_metadata",
        r"refused to load checkpoint metadata: disallowed global .*system.*nothing from the file was executed",
        "ckpt_malicious_metadata/step_00000001/.metadata")
    add("generate convert-hf train-init-from", "ckpt_truncated_shards", r"unreadable checkpoint",
        "ckpt_truncated_shards/step_00000001")
    add("generate convert-hf train-init-from", "ckpt_incomplete", r"qwenlink checkpoint is incomplete \(no COMPLETE marker",
        "ckpt_incomplete/step_00000001")
    add("generate convert-hf", "megatron_malicious", r"refused to load pickle: disallowed global .*system",
        "megatron_malicious/iter_0000001/mp_rank_00/model_optim_rng.pt")
    add("generate convert-hf", "megatron_truncated", r"unreadable checkpoint file|unreadable",
        "megatron_truncated/iter_0000001/mp_rank_00/model_optim_rng.pt")
    add("preprocess", "data_non_utf8.jsonl", r"UTF-8|utf-8", "data_non_utf8.jsonl")
    add("preprocess generate-input", "data_empty.jsonl", r"empty|no (records|prompts|documents)")
    add("preprocess", "data_not_json.jsonl", r"JSON", "data_not_json.jsonl")
    add("preprocess", "data_huge_line.jsonl", r"JSON", "data_huge_line.jsonl")
    add("preprocess", "data_missing_key.jsonl", r"'text'", "data_missing_key.jsonl")
    add("preprocess-alpaca", "data_alpaca_wrong_type.jsonl", r"'output'", "data_alpaca_wrong_type.jsonl")
    add("preprocess", "data_binary.parquet", r"parquet|Parquet", "data_binary.parquet")
    for entry in ("idx_wrong_magic", "idx_truncated_bin", "idx_truncated_idx", "idx_empty"):
        add("preprocess-inspect train-data", entry, r"magic|truncated|size|empty|short|expected|bytes",
            f"{entry}/data_text_document")
    add("train-config", "config_typo.toml", r"unknown key optim\.lrr; did you mean 'optim\.lr'\?")
    add("train-config", "config_wrong_type.toml", r"train\.train_iters.*int")
    add("train-config", "config_not_toml.toml", r"TOML")
    add("train-config", "config_non_utf8.toml", r"UTF-8|utf-8")
    add("train-config", "config_unknown_section.toml", r"unknown (section|key) .*trainer")
    add("generate-tokenizer preprocess-tokenizer", "tokenizer_corrupt", r"tokenizer",
        "tokenizer_corrupt/tokenizer.json")
    add("eval-task", "task_typo.toml", r"unknown key 'questions'")
    add("eval-task-dir", "task_non_utf8_data", r"UTF-8|utf-8", "task_non_utf8_data/q.jsonl")
    add("generate-input", "prompts_non_utf8.jsonl", r"not UTF-8")
    add("generate-input", "prompts_wrong_shape.jsonl", r"expected an object with a 'prompt' string")
    return c


CASES = _cases()


def test_every_corpus_entry_is_used() -> None:
    assert {c.entry for c in CASES} == set(CORPUS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """The corpus plus the good inputs each command needs besides the bad one."""
    import numpy as np

    from qwenlink.data.indexed import write_documents
    from qwenlink.tokenizer import Tokenizer

    root = make_corpus(tmp_path_factory.mktemp("corpus"))
    good = tmp_path_factory.mktemp("good")
    write_documents(str(good / "good_text_document"), [[11, 12, 13, 14, 15] * 8] * 10, dtype=np.uint16)
    (good / "good.jsonl").write_text('{"text": "hello world"}\n', encoding="utf-8")
    (good / "q.jsonl").write_text('{"question": "1+1?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}\n',
                                  encoding="utf-8")
    (good / "task.toml").write_text('data = "q.jsonl"\n', encoding="utf-8")
    Tokenizer.default().save(good / "tokenizer")
    return {"root": str(root), "good_prefix": str(good / "good_text_document"), "good_jsonl": str(good / "good.jsonl"),
            "good_task": str(good / "task.toml"), "tok": str(good / "tokenizer")}


def _run_cli(args: list[str], out: Path) -> tuple[int, str, str]:
    """`qwenlink ARGS` in a forked child: (exit code, stdout, stderr)."""
    sys.stdout.flush()
    sys.stderr.flush()
    stdout, stderr = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 99
        try:
            fd_out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fd_err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd_out, 1)
            os.dup2(fd_err, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            sys.argv = ["qwenlink", *args]
            import torch

            torch.set_num_threads(1)
            from qwenlink import cli

            code = cli.main(args)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}-{c.entry}" for c in CASES])
def test_bad_input(case: Case, corpus: dict[str, str], tmp_path: Path) -> None:
    root = Path(corpus["root"])
    out = tmp_path / "out"
    out.mkdir()
    values = {**corpus, "bad": str(root / case.entry), "out": str(out)}
    args = [a.format(**values) for a in COMMANDS[case.command]]
    code, stdout, stderr = _run_cli(args, tmp_path / "cli")
    lines = [line for line in stderr.splitlines() if line.strip()]
    detail = f"\n$ qwenlink {' '.join(args)}\n--- stderr:\n{stderr}"
    assert code not in (0, 99) and code > 0, f"exit code {code}{detail}"
    assert "Traceback" not in stderr, detail
    assert len(lines) == 1, f"expected one line on stderr{detail}"
    line = lines[0]
    assert line.startswith(f"qwenlink {args[0]}: error: "), f"not a user error (exit {code}){detail}"
    assert str(root / case.names) in line, f"the line does not name {case.names}{detail}"
    assert re.search(case.problem, line), f"the line does not say /{case.problem}/{detail}"
    assert not list(out.iterdir()), f"files were written: {sorted(p.name for p in out.iterdir())}{detail}"
    assert not marker_path(root).exists(), f"a payload ran{detail}"


def test_serve_refuses_an_api_key_no_client_can_send(tmp_path: Path) -> None:
    """Issue 22: a non-ASCII --api-key was accepted though no Authorization header could ever match it."""
    code, _, stderr = _run_cli(["serve", "--model", "test-tiny", "--port", "0", "--api-key", "cl\u00e9"],
                               tmp_path / "cli")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("qwenlink serve: error: ") and "U+00E9" in lines[0] and "printable ASCII" in lines[0]
