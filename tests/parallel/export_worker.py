"""One torchrun launch of test_export_layouts (2 processes, gloo): for each case, the real Trainer under the case's
layout loads model.init_from (host memory measured), gets the deterministic adapter values when LoRA is on, and
exports (host memory measured). Each rank writes OUT/CASE/rank{R}.json.

Usage: python -m torch.distributed.run --nproc-per-node=2 export_worker.py OUT SPEC_JSON
SPEC: {"base": [trainer args], "cases": [{"name", "args", "lora": bool, "fail_rank": int | null}]}
"""

from __future__ import annotations

import errno
import gc
import io
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export_helpers import LORA, model_config, set_adapters  # noqa: E402
from heap_bytes import HeapPeak  # noqa: E402

from qwenlink.errors import QwenlinkError  # noqa: E402
from qwenlink.checkpoint.peft import expected_shapes  # noqa: E402
from qwenlink.models.lora import is_adapter_key, merged_weight  # noqa: E402
from qwenlink.train.config import load_config  # noqa: E402
from qwenlink.train.distributed import DistInfo, init_distributed  # noqa: E402
from qwenlink.train.trainer import Trainer  # noqa: E402

# Where a loader or exporter holds the most: sampled on every call, besides the poller.
LOAD_POINTS = ("qwenlink.checkpoint.hf.copy_into", "qwenlink.checkpoint.sources.copy_into")
WRITE_POINTS = ("qwenlink.checkpoint.hf.save_file",)


def _unique(trainer: Trainer) -> list[tuple[str, torch.Tensor]]:
    """This rank's parameters (its stages, each tied weight once) by checkpoint name."""
    return [(name.replace("_checkpoint_wrapped_module.", ""), p) for name, p in trainer.model.named_parameters()]


def local_bytes(trainer: Trainer) -> int:
    """Bytes of this rank's own shards of the model (what loading should allocate)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for _, p in _unique(trainer))


def stage_bytes(trainer: Trainer) -> int:
    """Full (unsharded) bytes of the HF tensors this rank's pipeline stages export: its stages' share of the model."""
    tied = trainer.model_config.tie_word_embeddings
    return sum(p.numel() * p.element_size() for name, p in _unique(trainer)
               if not is_adapter_key(name) and not (tied and name == "lm_head.weight"))


def _failing_write(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def run_case(out: Path, case: dict, base: list[str], info: DistInfo) -> None:
    cfg = load_config(None, [*base, f"--job.output_dir={out / 'run'}", *case["args"]])
    gc.collect()
    with HeapPeak(patch=LOAD_POINTS) as load:
        trainer = Trainer(cfg, rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                          stream=io.StringIO())
    if case.get("lora"):
        assert set_adapters(trainer.model) > 0
    record = {"rank": info.rank, "local_bytes": local_bytes(trainer),
              "stage_bytes": stage_bytes(trainer), "load_growth": load.growth}
    gc.collect()
    if case.get("fail_rank") is not None:
        fails = info.rank == case["fail_rank"]
        with mock.patch("qwenlink.checkpoint.hf.save_file", _failing_write) if fails else nullcontext():
            try:
                trainer.export_hf(str(out / "hf"))
                record["error"] = None
            except QwenlinkError as exc:
                record["error"] = str(exc)
    else:
        with HeapPeak(patch=WRITE_POINTS) as export:
            trainer.export_hf(str(out / "hf"))
        record["export_growth"] = export.growth
        if case.get("lora"):
            trainer.export_adapter(str(out / "adapter"))
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    del trainer
    gc.collect()


def warm_up() -> None:
    """The CPU GEMM library keeps ~10 MB of buffers after its first product of a shape: merge once per LoRA shape
    before measuring, so a LoRA case measures what the export holds, not the library's one-time setup."""
    shapes = expected_shapes(model_config(False), LORA["r"])
    for name, (rank, fan_in) in shapes.items():
        if name.startswith("layers.0.") and name.endswith("lora_A"):
            fan_out = shapes[name[:-1] + "B"][0]
            merged_weight(torch.zeros(fan_out, fan_in), torch.ones(rank, fan_in), torch.ones(fan_out, rank), 1.0)


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    warm_up()
    info = init_distributed("cpu")
    for case in spec["cases"]:
        (out / case["name"]).mkdir(parents=True, exist_ok=True)
        run_case(out / case["name"], case, spec["base"], info)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
