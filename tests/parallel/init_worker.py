"""Initialise a model the way the trainer does under one layout (launched by torchrun); write the full weights.

Usage: torchrun --nproc-per-node N init_worker.py OUT_DIR JSON_SPEC
The spec gives the layout, whether the head is tied, whether LoRA adapters are added, and the seed. Nothing is
loaded: the weights are the layout-independent random initialisation (parallel/init.py) of this rank's shards.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qwenlink.models.lora import LoraConfig, apply_lora
from qwenlink.models.presets import get_preset
from qwenlink.parallel.init import init_weights
from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.parallel.parallelize import ParallelizeOptions, build_layout, build_model_chunks, full_state_dict


def initial_state(spec: dict) -> tuple[dict[str, torch.Tensor], object]:
    """This rank's stages' full tensors after initialisation under spec["layout"] (collective when distributed)."""
    config = dataclasses.replace(get_preset("test-tiny"), num_hidden_layers=4, tie_word_embeddings=spec["tied"],
                                 vocab_size=spec.get("vocab", 320))
    plan = ParallelPlan(**spec["layout"])
    layout = build_layout(plan, torch.device("cpu"), config)
    lora = LoraConfig(r=4, alpha=8, target_modules=["all-linear"]) if spec["lora"] else None
    chunks = build_model_chunks(config, layout, ParallelizeOptions(),
                                adapt=(lambda model: apply_lora(model, lora)) if lora else None)
    chunks.materialize(torch.device("cpu"))
    init_weights(chunks.modules, seed=spec["seed"])
    return full_state_dict(chunks), layout


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    state, layout = initial_state(spec)
    if list(layout.mesh.get_coordinate())[1:] == [0, 0, 0]:  # one rank per pipeline stage writes its stages
        torch.save(state, out / f"pp{layout.pp_rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
