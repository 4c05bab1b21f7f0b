"""The quickstart: a complete small story on a CPU in a few minutes, with nothing downloaded.

1. the bundled digit-task dataset (examples/data, made by examples/make_data.py) is preprocessed with the real
   Qwen1.5 vocabulary (`qwenlink preprocess --handler alpaca --template chatml`);
2. a tiny Qwen-architecture model is fine-tuned on it (configs/tiny-sft-cpu.toml) while the loss is printed;
3. the model is checkpointed (DCP) and exported as a chat-ready HF directory;
4. greedy answers to held-out prompts are scored before and after training (exact match), six of them are shown,
   the loss curve is written as a PNG, and the commands to try next are printed (each works right after
   `make quickstart`; tests/train/test_quickstart.py runs them).

    python examples/quickstart.py [--steps N] [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


def prompt_ids(tokenizer, instruction: str, input_: str) -> list[int]:
    """The prompt exactly as training saw it: the chatml template's segments before the reply, tokenized apart."""
    from qwenlink.data.templates import get_template

    ids: list[int] = []
    for seg in get_template("chatml").render_alpaca(instruction, input_, ""):
        if seg.trainable:
            break
        ids.extend(tokenizer.encode(seg.text))
    return ids


def score(model, tokenizer, records: list[dict]) -> tuple[float, dict[str, float], list[tuple[dict, str]]]:
    """Exact-match accuracy of greedy answers (overall, per task) and the answers themselves."""
    from qwenlink.inference.generate import SamplingParams, generate

    model.eval()
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_ids=frozenset(tokenizer.stop_ids()))
    prompts = [prompt_ids(tokenizer, r["instruction"], r["input"]) for r in records]
    with torch.no_grad():
        results, _ = generate(model, prompts, params, pad_id=tokenizer.pad_id or 0)
    answers, hits = [], defaultdict(list)
    for r, res in zip(records, results):
        tokens = res.tokens[:-1] if res.finish_reason == "stop" else res.tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        answers.append((r, text))
        hits[r["task"]].append(text == r["output"])
    per_task = {t: sum(h) / len(h) for t, h in hits.items()}
    overall = sum(sum(h) for h in hits.values()) / len(records)
    model.train()
    return overall, per_task, answers


def examples(answers: list, count: int) -> list:
    """`count` answers spread evenly over the held-out set (every task appears: the set is grouped by task)."""
    step = max(len(answers) / count, 1)
    return [answers[int(i * step)] for i in range(min(count, len(answers)))]


def qwenlink_command() -> list[str]:
    """How to run the CLI from this environment: the `qwenlink` script installed next to this Python (what
    `make quickstart` installs into .venv/bin, on PATH or not), else `python -m qwenlink.cli`."""
    script = Path(sys.executable).parent / "qwenlink"
    if script.is_file():
        try:
            return [str(script.relative_to(Path.cwd()))]
        except ValueError:
            return [str(script)]
    return [sys.executable, "-m", "qwenlink.cli"]


def next_commands(out: Path) -> list[list[str]]:
    """What to try next, as argument lists (printed for the user; tests/train/test_quickstart.py runs each)."""
    cli = qwenlink_command()
    heldout = json.loads((DATA / "tasks_heldout.jsonl").read_text().splitlines()[0])
    prompt = f"{heldout['instruction']}\n{heldout['input']}"  # the training prompt: instruction and input
    return [cli + ["plot", str(out / "run")],
            cli + ["generate", "--model", str(out / "hf"), "--chat", "--max-new-tokens", "8", "--prompt", prompt],
            cli + ["info", str(out / "hf")]]


def main() -> int:
    parser = argparse.ArgumentParser(description="qwenlink quickstart: fine-tune a tiny Qwen on digit tasks (CPU)")
    parser.add_argument("--out", default=str(REPO / "runs" / "quickstart"))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        print(f"removing the previous quickstart outputs in {out}")
        shutil.rmtree(out)

    from qwenlink.checkpoint.hf import load_hf_model
    from qwenlink.commands.plot import plot_run
    from qwenlink.tokenizer import Tokenizer
    from qwenlink.train.config import load_config
    from qwenlink.train.trainer import Trainer

    # 1. data: generated by the project itself, preprocessed with the real Qwen1.5 vocabulary
    if not (DATA / "tasks_train.jsonl").is_file():
        subprocess.run([sys.executable, str(REPO / "examples" / "make_data.py")], check=True)
    prefix = out / "data" / "tasks"
    print(f"\n== 1/4 preprocess {DATA / 'tasks_train.jsonl'} -> {prefix}_packed_*_document")
    cmd = [sys.executable, "-m", "qwenlink.cli", "preprocess", "--input", str(DATA / "tasks_train.jsonl"),
           "--output-prefix", str(prefix), "--handler", "alpaca", "--template", "chatml"]
    subprocess.run(cmd, check=True)
    heldout = [json.loads(line) for line in (DATA / "tasks_heldout.jsonl").read_text().splitlines()]

    # 2. the model before training
    overrides = [f"--data.path={prefix}", f"--job.output_dir={out / 'run'}",
                 f"--checkpoint.export_hf={out / 'hf'}", "--metrics.progress=lines"]
    if args.steps:
        overrides.append(f"--train.train_iters={args.steps}")
    cfg = load_config(REPO / "configs" / "tiny-sft-cpu.toml", overrides)
    if args.steps:  # a shortened run still logs enough points to draw a curve
        cfg.metrics.log_interval = max(1, min(cfg.metrics.log_interval, args.steps // 8))
    trainer = Trainer(cfg)
    tokenizer = Tokenizer.default()
    before, before_tasks, _ = score(trainer.model, tokenizer, heldout)
    print(f"\n== 2/4 held-out exact match BEFORE training: {100 * before:.1f}% "
          + ", ".join(f"{t} {100 * a:.0f}%" for t, a in before_tasks.items()))

    # 3. fine-tune (loss printed every log interval), checkpoint, export to HF
    print(f"\n== 3/4 fine-tune {cfg.model.preset} ({trainer.model_config.num_params() / 1e6:.1f}M parameters, "
          f"{cfg.train.train_iters} steps x {cfg.train.global_batch_size} samples)")
    t0, c0 = time.perf_counter(), time.process_time()
    code = trainer.train()
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    if code:
        return code

    # 4. the exported HF directory, loaded back as a user would, answers the held-out prompts
    model = load_hf_model(out / "hf")
    after, after_tasks, answers = score(model, Tokenizer.from_dir(out / "hf"), heldout)
    print(f"\n== 4/4 held-out exact match AFTER training: {100 * after:.1f}% "
          + ", ".join(f"{t} {100 * a:.0f}%" for t, a in after_tasks.items()))
    for r, text in examples(answers, 6):
        mark = "ok " if text == r["output"] else "bad"
        print(f"   [{mark}] {r['instruction']} {r['input']} -> {text!r} (expected {r['output']!r})")
    losses = [h["loss"] for h in trainer.history]
    curve = plot_run(out / "run", out / "loss.png")  # matplotlib if installed, else qwenlink's own PNG writer
    commands = next_commands(out)
    summary = {"accuracy_before": before, "accuracy_after": after, "per_task_before": before_tasks,
               "per_task_after": after_tasks, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "train_seconds": round(train_seconds, 1),
               "train_cpu_seconds": round(train_cpu, 1), "total_seconds": round(time.perf_counter() - started, 1),
               "steps": len(losses), "torch_threads": torch.get_num_threads(), "next_commands": commands}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nloss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} in {train_seconds:.0f}s of training "
          f"({train_cpu:.0f} CPU-seconds on {torch.get_num_threads()} threads), {summary['total_seconds']:.0f}s in total")
    print("outputs:")
    print(f"  preprocessed data    {prefix}_packed_*_document.bin/.idx")
    print(f"  loss curve           {curve}")
    print(f"  metrics              {out / 'run' / 'metrics.jsonl'}")
    print(f"  DCP checkpoints      {cfg.checkpoint_dir}")
    print(f"  HF model             {out / 'hf'}  (chat-ready: transformers' generate stops at <|im_end|>)")
    print(f"  summary              {out / 'summary.json'}")
    print("next:")
    for argv in commands:
        print("  " + " ".join(shlex.quote(a) for a in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
