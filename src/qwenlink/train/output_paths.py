"""`train`'s outputs checked before any work: output_dir, checkpoint.dir, checkpoint.export_hf, lora.export_adapter.

Why: the trainer writes these after the first step (metrics), at the first save (after `checkpoint.interval` steps,
possibly hours) or at the very end (the exports). A file where a directory belongs, a read-only parent, or an export
that would replace the model it started from (`export_hf = init_from`) or a directory of someone's files must fail in
one line before the model is built, not as "internal error: FileExistsError" after the run.

Rules (qwenlink/outputs.py): every output must be a directory that exists and is writable or can be created, and may
not be or lie inside `model.init_from` or the tokenizer directory. The exports replace their directory as a whole, so
they also may not contain an input (a data file, init_from, the tokenizer) and may replace only an empty directory or
one holding an output qwenlink recognises (a previous export). output_dir and checkpoint.dir are written into and
never replaced, so they may hold the data (`output_dir = .` next to `data/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qwenlink.errors import QwenlinkError
from qwenlink.checkpoint.replaceable import recognised_output
from qwenlink.outputs import check_creatable_dir, refuse_clobbering
from qwenlink.train.config import JobConfig


def data_files(prefixes: list) -> list[Path]:
    """The files of indexed dataset prefixes: PREFIX.bin/.idx, and for an SFT prefix PREFIX_packed_*_document.*."""
    files = []
    for prefix in prefixes:
        p = Path(str(prefix)).expanduser()
        if p.parent.is_dir():
            files += sorted(f for f in p.parent.glob(f"{p.name}*") if f.suffix in (".bin", ".idx") and f.is_file())
    return files


def train_inputs(cfg: JobConfig) -> dict[str, Optional[str]]:
    """{description: path} of everything the job reads from disk (missing paths are skipped by the checks)."""
    inputs: dict[str, Optional[str]] = {"model.init_from": cfg.model.init_from or None}
    if cfg.data.tokenizer and cfg.data.tokenizer != "default":
        inputs["data.tokenizer"] = cfg.data.tokenizer
    for key, prefixes in (("data.path", cfg.data.path), ("data.valid_path", cfg.data.valid_path)):
        for file in data_files(prefixes):
            inputs[f"{key} file {file.name}"] = str(file)
    return inputs


def check_export_target(path: str, *, option: str) -> None:
    """An export replaces its directory: allowed when it is absent, empty or holds a recognised qwenlink output, and
    its parent takes the staging directory written next to it."""
    check_creatable_dir(path, option=option)
    target = Path(path).expanduser()
    check_creatable_dir(target.absolute().parent, option=f"the directory holding {option}")
    if target.is_dir() and any(target.iterdir()) and recognised_output(target) is None:
        raise QwenlinkError(f"{path}: {option} holds other files (not a model or adapter qwenlink wrote); the export "
                            f"replaces this directory, so it is left alone (choose another {option} or empty it)")


def check_outputs(cfg: JobConfig) -> None:
    """Every output of the job, before any work; raises the first problem as one line naming the setting."""
    inputs = train_inputs(cfg)
    directories = {"job.output_dir": cfg.job.output_dir, "checkpoint.dir": str(cfg.checkpoint_dir)}
    written_into = {k: v for k, v in inputs.items() if not k.startswith(("data.path ", "data.valid_path "))}
    for option, path in directories.items():
        refuse_clobbering(path, written_into, option=option, replaced=False)
        check_creatable_dir(path, option=option)
    exports = {"checkpoint.export_hf": cfg.checkpoint.export_hf,
               "lora.export_adapter": cfg.lora.export_adapter if cfg.lora.enabled else ""}
    for option, path in exports.items():
        if not path:
            continue
        refuse_clobbering(path, inputs, option=option)
        check_export_target(path, option=option)
    if cfg.metrics.wandb:  # the W&B run is an output too: its package must be there before the model is built
        from qwenlink.train.wandb_log import require_wandb

        require_wandb()
