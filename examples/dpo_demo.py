"""DPO demonstration on a CPU: preference pairs where the chosen answer is right and the rejected one wrong raise the
quickstart model's held-out exact match and reward accuracy.

1. the starting point is a quickstart model (`--sft DIR`, or the quickstart is run first, shortened to
   `--sft-steps`: the full quickstart answers nearly every held-out prompt right, leaving DPO nothing to correct);
2. pairs are built from training prompts: chosen = the right answer, rejected = the model's own wrong greedy answer
   (on-policy), or, where it was right, a plausible wrong one (another digit of the input; the unsorted digits);
   the held-out prompts get pairs the same way, for the reward accuracy;
3. `qwenlink preprocess --handler pairwise`, then `job.mode = "dpo"` (full fine-tuning, frozen reference copy);
4. held-out exact match before / after, and the held-out reward accuracy (chosen reward above rejected) of the final
   model against the reference, go to OUT/summary.json.

    python examples/dpo_demo.py [--sft runs/quickstart/hf | --sft-steps 100] [--steps 100] [--out runs/dpo-demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
sys.path.insert(0, str(REPO / "examples"))


def wrong_answer(record: dict, answer: str) -> str:
    """The model's answer when it is wrong, else a plausible wrong one."""
    if answer != record["output"] and answer:
        return answer
    digits = record["input"]
    if record["task"] == "max":
        return min(digits) if min(digits) != record["output"] else digits[0]
    if record["task"] == "min":
        return max(digits) if max(digits) != record["output"] else digits[-1]
    return digits if digits != record["output"] else "".join(sorted(digits, reverse=True))


def build_pairs(model, tokenizer, records: list[dict], path: Path) -> list[dict]:
    from quickstart import score

    _, _, answers = score(model, tokenizer, records)
    pairs = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
              "rejected": wrong_answer(r, text), "task": r["task"], "model_was_right": text == r["output"]}
             for r, text in answers]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


@torch.no_grad()
def reward_accuracy(policy, reference, prefix: str, beta: float) -> float:
    """Share of held-out pairs whose chosen reward beta (logp - logp_ref) is above the rejected one's."""
    import types

    from qwenlink.data.preference import PreferenceDataset
    from qwenlink.train.data import collate_pairs
    from qwenlink.train.loss import head_detached
    from qwenlink.train.logprobs import row_logps_from_hidden

    data = PreferenceDataset(prefix)
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(seq_length=256, pad_id=0, pad_to_multiple_of=8))
    hits = 0
    for start in range(0, len(data), 32):
        batch = collate_pairs([data[i] for i in range(start, min(start + 32, len(data)))], cfg)
        rewards = []
        for model in (policy, reference):
            model.eval()
            with head_detached(model) as head:
                hidden = model(batch.input_ids)
            rewards.append(row_logps_from_hidden(hidden, head.weight, batch.labels))
        margin = beta * (rewards[0] - rewards[1])
        b = margin.shape[0] // 2
        hits += int((margin[:b] > margin[b:]).sum())
    return hits / len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description="qwenlink DPO demonstration (CPU)")
    parser.add_argument("--out", default=str(REPO / "runs" / "dpo-demo"))
    parser.add_argument("--sft", default=None, help="HF directory of the quickstart model (default: run it)")
    parser.add_argument("--sft-steps", type=int, default=100,
                        help="quickstart steps when --sft is not given (a partly trained model)")
    parser.add_argument("--steps", type=int, default=100, help="DPO steps")
    parser.add_argument("--batch", type=int, default=16, help="pairs per DPO step")
    parser.add_argument("--pairs", type=int, default=1200, help="training prompts turned into pairs")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--ftx", type=float, default=1.0, help="dpo.ftx: weight of the chosen answers' NLL")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from quickstart import score

    from qwenlink.checkpoint.hf import load_hf_model
    from qwenlink.tokenizer import Tokenizer
    from qwenlink.train.config import load_config
    from qwenlink.train.trainer import Trainer

    sft = Path(args.sft) if args.sft else out / "quickstart" / "hf"
    if not args.sft:
        print(f"== 0/4 the quickstart (SFT) first -> {sft.parent}")
        subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--out", str(sft.parent),
                        "--steps", str(args.sft_steps)],
                       check=True)
    tokenizer = Tokenizer.from_dir(sft)
    reference = load_hf_model(sft)
    train = [json.loads(line) for line in (DATA / "tasks_train.jsonl").read_text().splitlines()][:args.pairs]
    heldout = [json.loads(line) for line in (DATA / "tasks_heldout.jsonl").read_text().splitlines()]

    print(f"\n== 1/4 pairs from {len(train)} training and {len(heldout)} held-out prompts (the SFT model's answers)")
    pairs = build_pairs(reference, tokenizer, train, out / "pairs.jsonl")
    build_pairs(reference, tokenizer, heldout, out / "heldout_pairs.jsonl")
    print(f"   the SFT model was right on {sum(p['model_was_right'] for p in pairs)} of {len(pairs)} training prompts")
    for name in ("pairs", "heldout_pairs"):
        subprocess.run([sys.executable, "-m", "qwenlink.cli", "preprocess", "--input", str(out / f"{name}.jsonl"),
                        "--output-prefix", str(out / "data" / name), "--handler", "pairwise"], check=True)
    before, before_tasks, _ = score(reference, tokenizer, heldout)
    ref_acc = reward_accuracy(reference, reference, str(out / "data" / "heldout_pairs"), args.beta)
    print(f"\n== 2/4 held-out exact match BEFORE DPO: {100 * before:.1f}% "
          + ", ".join(f"{t} {100 * a:.0f}%" for t, a in before_tasks.items()))

    print(f"\n== 3/4 DPO: {args.steps} steps x {args.batch} pairs, beta {args.beta}, ftx {args.ftx:g}, lr {args.lr:g}, "
          f"frozen reference copy")
    overrides = ["--job.mode=dpo", f"--model.init_from={sft}", f"--data.path={out / 'data' / 'pairs'}",
                 f"--job.output_dir={out / 'run'}", f"--checkpoint.export_hf={out / 'hf'}",
                 f"--train.train_iters={args.steps}", f"--train.micro_batch_size={args.batch}",
                 f"--train.global_batch_size={args.batch}", f"--optim.lr={args.lr}", f"--optim.min_lr={args.lr / 10}",
                 "--optim.warmup_iters=10", "--optim.weight_decay=0.0", f"--dpo.beta={args.beta}",
                 f"--dpo.ftx={args.ftx}", "--metrics.progress=lines",
                 f"--metrics.log_interval={max(1, args.steps // 20)}", "--checkpoint.interval=0"]
    cfg = load_config(REPO / "configs" / "tiny-sft-cpu.toml", overrides)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    code = trainer.train()
    if code:
        return code
    train_seconds = time.perf_counter() - t0

    policy = load_hf_model(out / "hf")
    after, after_tasks, _ = score(policy, tokenizer, heldout)
    acc = reward_accuracy(policy, reference, str(out / "data" / "heldout_pairs"), args.beta)
    print(f"\n== 4/4 held-out exact match AFTER DPO: {100 * after:.1f}% "
          + ", ".join(f"{t} {100 * a:.0f}%" for t, a in after_tasks.items()))
    print(f"   held-out reward accuracy {100 * acc:.1f}% (the reference itself: {100 * ref_acc:.1f}%, all ties)")
    history = trainer.history
    summary = {"exact_match_before": before, "exact_match_after": after, "per_task_before": before_tasks,
               "per_task_after": after_tasks, "heldout_reward_accuracy": acc,
               "train_reward_accuracy_first": history[0]["rewards/accuracy"],
               "train_reward_accuracy_last": history[-1]["rewards/accuracy"],
               "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"], "steps": len(history),
               "pairs": len(pairs), "beta": args.beta, "ftx": args.ftx, "lr": args.lr,
               "dpo_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
