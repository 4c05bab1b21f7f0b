"""`qwenlink plot RUN_DIR`: loss / learning rate / throughput curves (and a DPO run's rewards, reward accuracy and
log-probabilities) of a run's metrics.jsonl as one PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from qwenlink.errors import QwenlinkError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise QwenlinkError(f"{path}: not found (is {run_dir} a qwenlink run directory?)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise QwenlinkError(f"{path}:{n}: not a JSON line") from None
    if not records:
        raise QwenlinkError(f"{path}: no records yet")
    return records


PANELS = [("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s_per_device", "tokens/s per device"),
          ("grad_norm", "gradient norm")]
# job.mode = "dpo" runs also log these (train/dpo.py): one panel per title, its series drawn together.
DPO_PANELS = [("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margin")),
              ("reward accuracy", ("rewards/accuracy",)), ("log-probabilities", ("logps/chosen", "logps/rejected"))]


def panels_for(records: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """(title, metric keys) of every panel the run's records have data for."""
    panels = [(title, (key,)) for key, title in PANELS]
    if any("rewards/margin" in r for r in records):
        panels += DPO_PANELS
    return panels


def plot_run(run_dir: str | Path, output: Optional[str | Path] = None) -> Path:
    """Write RUN_DIR/metrics.png (or `output`): loss (+ validation), lr, tokens/s per device, grad norm. With
    matplotlib when it is installed, else with qwenlink's own PNG writer (png_chart.py), so it always works."""
    records = read_metrics(run_dir)
    out = Path(output) if output else Path(run_dir) / "metrics.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_builtin(records, out)
    return _plot_matplotlib(plt, records, run_dir, out)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_builtin(records: list[dict], out: Path) -> Path:
    from qwenlink.png_chart import Panel, write_png

    panels = []
    for title, keys in panels_for(records):
        key = keys[0]
        panel = Panel(title, [(k, *_series(records, k)) for k in keys])
        if key == "loss" and _series(records, "val_loss")[0]:
            panel.series.append(("validation", *_series(records, "val_loss")))
        panels.append(panel)
    return write_png(out, panels)


def _plot_matplotlib(plt, records: list[dict], run_dir: str | Path, out: Path) -> Path:
    def series(key: str) -> tuple[list[int], list[float]]:
        return _series(records, key)

    panels = panels_for(records)
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.5 * rows))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels):
        key = keys[0]
        for k in keys:
            xs, ys = series(k)
            ax.plot(xs, ys, label=k)
        if len(keys) > 1:
            ax.legend()
        if key == "loss":
            vx, vy = series("val_loss")
            if vx:
                ax.plot(vx, vy, "o-", label="validation")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    from qwenlink.fileio import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def run_plot(run_dir: str, output: Optional[str]) -> int:
    print(plot_run(run_dir, output))
    return 0
