"""`qwenlink plan` over every shipped config: each one's per-rank peak, whether it fits, and what planning cost.

Each config runs as `qwenlink plan --config FILE --json` in its own process, with the world size and device its
`# plan:` header names (as a user would run it). Measured: the wall time, and the host memory of the plan's whole
process tree (the parent and its concurrent simulation processes; resident set sizes summed, sampled every 0.2 s).
Printed as Markdown rows for BENCHMARKS.md.

    python benchmarks/bench_plan.py [--configs 'configs/qwen1.5-*.toml'] [--device h100] [--json FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (processes only: threads share their process's memory)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def plan_one(config: str, device: str | None) -> dict:
    """Run the plan of one config; its JSON plus wall seconds and the process tree's peak host memory."""
    command = [sys.executable, "-m", "qwenlink.cli", "plan", "--config", config, "--json"]
    if device:
        command += ["--device", device]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.2)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        return {"config": config, "error": (err or out).strip().splitlines()[-1:], "seconds": seconds}
    return {"config": config, "seconds": seconds, "host_peak_bytes": peak, "plan": data}


def row(result: dict) -> str:
    name = Path(result["config"]).stem
    if "error" in result:
        return f"| {name} | - | - | error: {' '.join(result['error'])} | {result['seconds']:.0f} s | - |"
    plan = result["plan"]
    peaks = ", ".join(f"{r['peak_bytes'] / 2**30:.1f}" for r in plan["ranks"])
    layout = plan["layout"]
    shape = f"{plan['world_size']} x {plan['device']} (tp{layout['tp']} pp{layout['pp']} dp{layout['dp_shard']})"
    return (f"| {name} | {shape} | {peaks} | {'yes' if plan['fits'] else 'NO'} "
            f"({plan['usable_bytes'] / 2**30:.1f} usable) | {result['seconds']:.0f} s | "
            f"{result['host_peak_bytes'] / 2**30:.2f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/qwen1.5-*.toml")
    parser.add_argument("--device", default=None, help="instead of each config's header device")
    parser.add_argument("--json", default=None, help="also write every plan here")
    args = parser.parse_args()
    configs = sorted(glob.glob(args.configs))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| config | devices (layout) | peak per pipeline rank, GiB | fits | plan time | host memory |")
    print("|---|---|---|---|---|---|")
    results = []
    for config in configs:
        result = plan_one(config, args.device)
        results.append(result)
        print(row(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
