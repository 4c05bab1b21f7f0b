"""A big model's plan from two small simulations: the same job with 2 and with 3 decoder layers per stage.

Why: a step's memory and traffic are sums over a stage's layers, and the layers are identical (same widths, same
shards, same collectives), so every quantity the plan reports is `fixed + per_layer x layers` once a stage has
enough layers for its fixed part to be reached. What is fixed: embedding, head, final norm and the loss (measured as
they are: their widths are the real ones), FSDP2's gathered copies (the layer being computed and the one
prefetched: 2 layers at most), one layer's recomputation and backward transients, the pipeline's receive buffers.
What grows by layer: parameters, gradients, optimizer state, each layer's saved activations for every micro batch
in flight, and each layer's collectives. Simulating at 2 and 3 layers per stage (fixed part already saturated at 2:
one computed, one prefetched) gives `per_layer` as their difference and `fixed` exactly, so the value at the real
count L is `v(3) + (L - 3) x (v(3) - v(2))`. 72B at 40 layers per stage simulates 5 instead of 80 layers.

Kept exact by construction, not assumed: the reduced job is the same config with `model.arch.num_hidden_layers`
(and `parallel.layers_per_virtual_stage` / `parallel.num_layer_list`) changed, so the trainer builds and runs it
with every other setting, width and schedule of the real one; the pipeline's stage count and micro batches stay
the same, so in-flight counts do not change. tests/train/test_plan.py checks the extrapolation against a full
simulation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from qwenlink.models.config import ModelConfig
from qwenlink.parallel.mesh import ParallelPlan, stage_layers, stages_of_rank
from qwenlink.train.config import JobConfig

POINTS = (2, 3)  # layers per stage simulated; see the module docstring for why not 1


def layers_per_rank(layout: ParallelPlan, model_config: ModelConfig) -> list[int]:
    """Layers per stage of each pipeline rank (a rank's virtual stages are equal; num_layer_list may differ by
    rank)."""
    layers = stage_layers(layout, model_config.num_hidden_layers)
    return [len(layers[stages_of_rank(layout, p)[0]]) for p in range(layout.pp)]


def extrapolates(layout: ParallelPlan, model_config: ModelConfig) -> bool:
    """Whether simulating fewer layers saves work: every stage has more layers than the larger point."""
    return min(layers_per_rank(layout, model_config)) > POINTS[-1]


def reduced_config(cfg: JobConfig, layout: ParallelPlan, layers_per_stage: int) -> JobConfig:
    """The same job with `layers_per_stage` decoder layers in every stage (stages, widths, schedule unchanged)."""
    arch = dict(cfg.model.arch)
    arch["num_hidden_layers"] = layers_per_stage * layout.num_stages
    parallel = cfg.parallel
    if parallel.layers_per_virtual_stage:
        parallel = dataclasses.replace(parallel, layers_per_virtual_stage=layers_per_stage)
    if parallel.num_layer_list:
        parallel = dataclasses.replace(parallel, num_layer_list=[layers_per_stage] * layout.pp)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=arch), parallel=parallel)


def _line(small: float, large: float, layers: int) -> int:
    """The value at `layers` on the line through (POINTS[0], small) and (POINTS[1], large), never below 0."""
    k1, k2 = POINTS
    return max(0, round(large + (layers - k2) * (large - small) / (k2 - k1)))


def _dicts(small: dict[str, Any], large: dict[str, Any], layers: int) -> dict[str, int]:
    return {k: _line(small.get(k, 0), large.get(k, 0), layers) for k in set(small) | set(large)}


def _top(small: list[dict], large: list[dict], layers: int) -> list[dict]:
    """Contributors matched by (category, what); one seen at only one point keeps the larger point's figures."""
    before = {(t["category"], t["what"]): t for t in small}
    out = []
    for t in large:
        s = before.get((t["category"], t["what"]))
        if s is None:
            out.append(dict(t))
            continue
        out.append({**t, "bytes": _line(s["bytes"], t["bytes"], layers),
                    "tensors": _line(s["tensors"], t["tensors"], layers)})
    return sorted(out, key=lambda t: -t["bytes"])


def extrapolate(small: dict[str, Any], large: dict[str, Any], layers: int) -> dict[str, Any]:
    """One rank's simulation result (plan_sim.simulate_role's dict) at `layers` per stage, from its results at
    POINTS[0] (`small`) and POINTS[1] (`large`) layers per stage."""
    rs, rl = small["report"], large["report"]
    report = {**rl, "by_category": _dicts(rs["by_category"], rl["by_category"], layers),
              "comm_bytes": _dicts(rs["comm_bytes"], rl["comm_bytes"], layers),
              "comm_calls": _dicts(rs["comm_calls"], rl["comm_calls"], layers),
              "final_bytes": _line(rs["final_bytes"], rl["final_bytes"], layers),
              "top": _top(rs["top"], rl["top"], layers)}
    report["peak_bytes"] = sum(report["by_category"].values())
    extra = large["peak_bytes"] - rl["peak_bytes"]  # the pipeline buffers of micro batches not simulated
    return {**large, "report": report, "comm": _dicts(small["comm"], large["comm"], layers),
            "peak_bytes": report["peak_bytes"] + extra, "layers_per_stage": layers,
            "simulated_layers_per_stage": list(POINTS)}


def reduced_points(layout: ParallelPlan, model_config: ModelConfig) -> Optional[tuple[int, ...]]:
    """The layers per stage to simulate, or None when the full model is simulated as it is."""
    return POINTS if extrapolates(layout, model_config) else None
