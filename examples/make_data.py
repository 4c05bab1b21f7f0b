"""Generate the quickstart's bundled instruction dataset: digit tasks a tiny model can visibly learn on a CPU.

Three tasks over four-digit strings (Qwen's tokenizer splits numbers into single digits, so every digit is one
token): name the largest digit, name the smallest digit, sort the digits ascending. 6000 random inputs per task
(repeats allowed: about 4,500 of the 10,000 possible inputs occur; docs/training.md has what fewer gave).
Records are alpaca-style JSON lines (instruction / input / output). The held-out prompts never occur in the
training file, so accuracy on them measures generalisation, not recall. Deterministic: the same seed always writes
byte-identical files.

    python examples/make_data.py [--out examples/data] [--train-per-task 6000] [--heldout-per-task 40]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS = {
    "max": "What is the largest digit?",
    "min": "What is the smallest digit?",
    "sort": "Sort the digits in ascending order.",
}


def make_input(task: str, rng: random.Random) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(4))


def solve(task: str, text: str) -> str:
    if task == "max":
        return max(text)
    if task == "min":
        return min(text)
    return "".join(sorted(text))


def generate(train_per_task: int, heldout_per_task: int, seed: int = 2024) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records); held-out inputs are drawn first and excluded from training."""
    rng = random.Random(seed)
    train, heldout = [], []
    for task, instruction in TASKS.items():
        held: set[str] = set()
        while len(held) < heldout_per_task:
            held.add(make_input(task, rng))
        for text in sorted(held):
            heldout.append({"task": task, "instruction": instruction, "input": text, "output": solve(task, text)})
        count = 0
        while count < train_per_task:
            text = make_input(task, rng)
            if text in held:
                continue
            train.append({"task": task, "instruction": instruction, "input": text, "output": solve(task, text)})
            count += 1
    rng.shuffle(train)
    return train, heldout


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "data"))
    parser.add_argument("--train-per-task", type=int, default=6000)
    parser.add_argument("--heldout-per-task", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    train, heldout = generate(args.train_per_task, args.heldout_per_task, args.seed)
    write_jsonl(Path(args.out) / "tasks_train.jsonl", train)
    write_jsonl(Path(args.out) / "tasks_heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out records to {args.out}")


if __name__ == "__main__":
    main()
