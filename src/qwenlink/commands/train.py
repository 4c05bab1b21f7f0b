"""`qwenlink train --config FILE.toml [--section.key=value ...]`: resolve the job config, print it, run the trainer."""

from __future__ import annotations

import argparse
import sys

from qwenlink.train.config import load_config


def check_layout(cfg, world_size: int) -> None:
    """Validate the parallel layout for `world_size` processes against the model's shape and the batch."""
    from qwenlink.train.config import parallel_plan
    from qwenlink.train.trainer import resolve_model_config

    parallel_plan(cfg, world_size, resolve_model_config(cfg))


def run_train(args: argparse.Namespace) -> int:
    from qwenlink.train import distributed

    if getattr(args, "nproc", None) and not distributed.launched_by_torchrun():
        # A bad config, layout or output path fails here, once, before N processes start (and before any model is
        # allocated).
        from qwenlink.train.output_paths import check_outputs

        cfg = load_config(args.config, args.overrides)
        check_layout(cfg, args.nproc)
        check_outputs(cfg)
        argv = [a for a in sys.argv[1:] if a != "--debug"]
        i = argv.index("--nproc") if "--nproc" in argv else None
        argv = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--nproc=")]
        return distributed.launch_with_torchrun(args.nproc, argv)
    cfg = load_config(args.config, args.overrides)
    info = distributed.init_distributed(cfg.train.device)
    if info.rank == 0:
        print("# resolved job config", flush=True)
        print(cfg.to_toml(), flush=True)
    if args.dry_run:
        return 0
    from qwenlink.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, stream=sys.stdout, rank=info.rank, world_size=info.world_size,
                          local_rank=info.local_rank)
        return trainer.train()
    except BaseException as exc:
        distributed.record_failure(exc)  # under torchrun: the launcher's last line names the rank that failed first
        raise
    finally:
        if info.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
