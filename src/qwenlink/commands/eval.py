"""`qwenlink eval`: multiple-choice accuracy (MMLU, C-Eval, a user task) scored as lm-evaluation-harness scores it.

Everything a user can get wrong (paths, subject names, CSV rows, shot counts) is checked before the model is loaded,
so a bad run fails in seconds with one line and leaves no results file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from qwenlink.errors import QwenlinkError
from qwenlink.evaluation.tasks import Task, check_shots
from qwenlink.outputs import refuse_clobbering

BUILTIN_TASKS = ("mmlu", "ceval")


def load_task(name: str, data: Optional[str], *, subjects: Optional[list[str]], split: Optional[str],
              shots: int) -> Task:
    """mmlu / ceval from --data, or a user task from a .toml description."""
    if name == "mmlu":
        from qwenlink.evaluation.mmlu import load_mmlu

        if data is None:
            raise QwenlinkError("--task mmlu needs --data DIR (the folder with dev/ and test/ CSVs)")
        return load_mmlu(data, subjects=subjects, split=split or "test", shots=shots)
    if name == "ceval":
        from qwenlink.evaluation.ceval import load_ceval

        if data is None:
            raise QwenlinkError("--task ceval needs --data DIR (the folder with dev/ and val/ CSVs)")
        return load_ceval(data, subjects=subjects, split=split or "val", shots=shots)
    if name.endswith(".toml"):
        from qwenlink.evaluation.tasks import load_task_file, pick_subjects

        if not Path(name).is_file():
            raise QwenlinkError(f"{name}: task description not found")
        task = load_task_file(name, data_override=data)
        if subjects:
            keep = pick_subjects([s.name for s in task.subjects], subjects, name)
            task.subjects = [s for s in task.subjects if s.name in keep]
        return task
    raise QwenlinkError(f"unknown task {name!r} (expected mmlu, ceval, or a task description FILE.toml)")


def _list_subjects(task: str) -> int:
    if task == "mmlu":
        from qwenlink.evaluation.mmlu import SUBJECT_CATEGORY

        for s, c in SUBJECT_CATEGORY.items():
            print(f"{s}\t{c}")
    elif task == "ceval":
        from qwenlink.evaluation.ceval import SUBJECTS

        for s, (zh, c) in SUBJECTS.items():
            print(f"{s}\t{zh}\t{c}")
    else:
        raise QwenlinkError("--list-subjects works with --task mmlu or ceval")
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.shots < 0:
        raise QwenlinkError(f"--shots must be >= 0, got {args.shots}")
    if args.limit is not None and args.limit < 1:
        raise QwenlinkError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise QwenlinkError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise QwenlinkError(f"--max-length must be >= 2, got {args.max_length}")
    if args.prefill_chunk < 1:
        raise QwenlinkError(f"--prefill-chunk must be a positive number of tokens, got {args.prefill_chunk}")
    if args.threads is not None and args.threads < 1:
        raise QwenlinkError(f"--threads must be >= 1, got {args.threads}")
    if args.output is not None and Path(args.output).is_dir():
        raise QwenlinkError(f"{args.output}: --output is a directory (expected a .json file path)")


def run_eval(args: argparse.Namespace) -> int:
    if args.list_subjects:
        return _list_subjects(args.task)
    if args.model is None:
        raise QwenlinkError("--model is required (a model directory: HF, qwenlink or Megatron, or a preset name)")
    _check_args(args)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    task = load_task(args.task, args.data, subjects=subjects, split=args.split, shots=args.shots)
    check_shots(task.subjects, args.shots, args.task)
    if args.output is not None:
        inputs = {"--model": args.model, "--task file": args.task, "--data": args.data,
                  "--lora adapter": getattr(args, "lora", None), "--tokenizer": getattr(args, "tokenizer", None)}
        inputs.update({f"task's data file {i}": f for i, f in enumerate(task.files, start=1)})
        refuse_clobbering(args.output, inputs)

    from qwenlink.checkpoint.dtypes import parse_dtype
    from qwenlink.device import resolve_device
    from qwenlink.evaluation.harness import LoglikelihoodScorer
    from qwenlink.evaluation.report import aggregate, comparison_line, format_table, model_size
    from qwenlink.evaluation.runner import run_task
    from qwenlink.inference.session import check_vocab, load_for_inference, pick_tokenizer

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    # Under torchrun: tensor-parallel scoring (each rank reads its shards of an HF checkpoint), rank 0 reports.
    loaded, rank, _ = load_for_inference(args.model, device=device, dtype=parse_dtype(args.dtype), seed=args.seed)
    tokenizer = pick_tokenizer(args.tokenizer, loaded.tokenizer_dir)
    check_vocab(tokenizer, loaded.model.config.vocab_size, args.model)
    load_seconds = time.perf_counter() - t0

    chat = None
    if args.chat_template:
        chat = lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}])  # noqa: E731
    scorer = LoglikelihoodScorer(loaded.model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                                 prefix_token_id=tokenizer.eos_id, padding_side=args.padding_side,
                                 share_prefix=not args.no_prefix_cache, progress=_progress(),
                                 prefill_chunk=args.prefill_chunk)
    scores, samples = run_task(task, scorer, shots=args.shots, limit=args.limit, chat=chat)
    results = aggregate(scores, task.categories)
    size = model_size(loaded.model.config)
    line = comparison_line(task.name, size, results["overall"]["acc"], args.shots) if args.compare else None
    stats = scorer.stats
    questions = len(samples)
    total = stats.seconds + stats.tokenize_seconds  # tokenizing + scoring: what a user waits for
    report: dict[str, Any] = {
        "task": task.name,
        "config": {
            "model": args.model, "tokenizer": tokenizer.source, "shots": args.shots, "split": task.split,
            "subjects": [s.name for s in task.subjects], "limit": args.limit, "batch_size": args.batch_size,
            "max_length": scorer.max_length, "dtype": args.dtype, "device": str(device),
            "chat_template": bool(args.chat_template), "padding_side": args.padding_side,
            "prefix_cache": scorer.share_prefix, "prefill_chunk": scorer.prefill_chunk, "threads": _threads(), "scoring": "lm-evaluation-harness 0.4 loglikelihood, acc",
        },
        "results": results,
        "comparison": line,
        "timing": {
            "load_seconds": round(load_seconds, 3), "tokenize_seconds": round(stats.tokenize_seconds, 3),
            "score_seconds": round(stats.seconds, 3), "questions": questions,
            "questions_per_second": round(questions / total, 3) if total else None,
            "requests": stats.requests, "forward_rows": stats.forward_rows, "tokens_run": stats.tokens,
            "prefix_tokens_reused": stats.prefix_tokens_reused,
        },
    }
    if rank != 0:
        return 0
    if args.log_samples:
        report["samples"] = [{"subject": r.subject, "index": r.index, "source": r.source, "answer": r.answer,
                              "prediction": r.prediction, "logprobs": list(r.logprobs),
                              "is_greedy": list(r.is_greedy)} for r in samples]
    if args.output:
        from qwenlink.fileio import atomic_write_text

        atomic_write_text(args.output, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    title = f"{task.name} ({task.split}, {args.shots}-shot{', limit ' + str(args.limit) if args.limit else ''})"
    print(format_table(results, title=title), end="")
    if line:
        print(line)
    print(f"[{questions} questions in {total:.1f}s ({report['timing']['questions_per_second']} questions/s; "
          f"tokenizing {stats.tokenize_seconds:.1f}s); model load {load_seconds:.1f}s]", file=sys.stderr)
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _progress():
    """A one-line progress counter on a terminal; silent otherwise (logs stay readable)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        print(f"\rscoring: {done}/{total} prompts", end="" if done < total else "\n", file=sys.stderr, flush=True)

    return show
