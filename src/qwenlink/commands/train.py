"""`qwenlink train --config FILE.toml [--section.key=value ...]`: resolve the job config, print it, run the trainer."""

from __future__ import annotations

import argparse
import sys

from qwenlink.train.config import load_config


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print("# resolved job config", flush=True)
    print(cfg.to_toml(), flush=True)
    if args.dry_run:
        return 0
    from qwenlink.train.trainer import Trainer

    trainer = Trainer(cfg, stream=sys.stdout)
    return trainer.train()
