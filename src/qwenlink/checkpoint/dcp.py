"""Training checkpoints in torch.distributed.checkpoint (DCP) format: the complete state needed to resume exactly.

Layout of a checkpoint directory (CKPT = `checkpoint.dir`, by default RUN_DIR/checkpoints):

    CKPT/latest                      text: the name of the newest complete step directory (replaced atomically)
    CKPT/step_00000100/.metadata     DCP: {"model": model state, "optimizer": optimizer state}, sharded per rank
    CKPT/step_00000100/__0_0.distcp
    CKPT/step_00000100/config.json   the model architecture (HF config.json), so the weights can be used alone
    CKPT/step_00000100/job.toml      the resolved job config of the run that wrote it
    CKPT/step_00000100/train_state.json  step, data position (consumed samples), counters, scheduler
    CKPT/step_00000100/rng/rank_00000.pt RNG states (torch, accelerator, numpy, python) of each rank
    CKPT/step_00000100/COMPLETE      written last: a directory without it is ignored

Why this shape: DCP writes every rank's shards in parallel and can reload them under a different parallel layout
(issue 5 reshards on load). Everything is written into `.tmp-step_N` and renamed when done, so a crash mid-save
leaves the previous checkpoint and the `latest` pointer untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from qwenlink.checkpoint import safe_dcp
from qwenlink.checkpoint.dtypes import check_float
from qwenlink.checkpoint.safe_load import safe_torch_load
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_write_text
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model, build_model

COMPLETE = "COMPLETE"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every call that it runs without a process group; a single process is a supported use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# ---- finding checkpoints ------------------------------------------------------------------------------------------
def is_complete(step_dir: str | os.PathLike) -> bool:
    return (Path(step_dir) / COMPLETE).is_file() and (Path(step_dir) / ".metadata").is_file()


def complete_steps(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories, oldest first (incomplete or temporary ones are ignored)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_latest(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """The step directory `latest` names if it is complete, else the newest complete one, else None."""
    root = Path(ckpt_dir)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(target):
            return target
    steps = complete_steps(root)
    return steps[-1] if steps else None


def interrupted_save(path: str | os.PathLike) -> Optional[Path]:
    """A step directory under `path` (or `path` itself, or its `checkpoints/`) that a crash left without its
    COMPLETE marker, for error messages about directories that hold no complete checkpoint."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / ".metadata").is_file() and not is_complete(root):
            return root
        if root.is_dir():
            for child in sorted(root.iterdir()):
                if (child.name.startswith(".tmp-step_") or STEP_RE.match(child.name)) and \
                        (child / ".metadata").is_file() and not is_complete(child):
                    return child
    return None


def is_qwenlink_checkpoint(path: str | os.PathLike) -> bool:
    """True for a complete step directory, or a checkpoint directory holding at least one."""
    p = Path(path)
    if not p.is_dir():
        return False
    if is_complete(p) and (p / "config.json").is_file():
        return True
    return find_latest(p) is not None


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """A step directory, or the newest complete one inside a checkpoint directory (or a run's `checkpoints/`)."""
    p = Path(path)
    if not p.is_dir():
        raise QwenlinkError(f"{p}: checkpoint directory not found")
    if is_complete(p):
        return p
    for root in (p, p / "checkpoints"):
        latest = find_latest(root)
        if latest is not None:
            return latest
    if (p / ".metadata").is_file():
        raise QwenlinkError(f"{p}: checkpoint is incomplete (no {COMPLETE} marker; the save was interrupted)")
    raise QwenlinkError(f"{p}: no complete qwenlink checkpoint found (expected step_NNNNNNNN/{COMPLETE})")


# ---- saving -------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors/ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own device only: a rank drives one GPU, and a resume may see fewer GPUs per process.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):  # older checkpoints held every visible device's state
            saved = saved[torch.cuda.current_device()] if torch.cuda.current_device() < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(saved)  # the current device: each rank's own (torch.cuda.set_device)


def _options(trainable_only: bool, *, load: bool = False):
    """LoRA runs (trainable_only) save and load only trainable tensors; the frozen base comes from its own files.

    Optimizer state is flattened to one entry per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"):
    under pipeline parallelism each rank holds different parameters, and a per-rank `param_groups` list saved under
    one key would be overwritten by another rank's; per-name entries also let a checkpoint load under any layout.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not trainable_only:
        return StateDictOptions(flatten_optimizer_state_dict=True)
    return StateDictOptions(ignore_frozen_params=True, strict=not load, flatten_optimizer_state_dict=True)


def _state_dicts(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 trainable_only: bool = False) -> dict[str, Any]:
    """Model (+ optimizer) state keyed by parameter names, DTensor/FSDP-aware, ready for DCP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    options = _options(trainable_only)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optimizer": optim_sd}


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: Qwen2Model,
                    optimizer: Optional[torch.optim.Optimizer], *, train_state: dict[str, Any], job_toml: str,
                    keep_last: int, rank: int = 0, barrier: Callable[[], None] = lambda: None,
                    trainable_only: bool = False, extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write step `step` into a temporary directory, mark it complete, rename it, point `latest` at it, prune.

    Every rank calls this (DCP writes each rank's shards); rank 0 writes the small files and does the renames.
    `trainable_only` (LoRA) keeps only trainable tensors and their optimizer state; `extra_files` (name -> text)
    are written next to config.json (e.g. LoRA's reference to its base model).
    """
    root, tmp, final = step_paths(ckpt_dir, step)
    try:
        _write_step(root, tmp, final, step, model, optimizer, train_state=train_state, job_toml=job_toml,
                    rank=rank, barrier=barrier, trainable_only=trainable_only, keep_last=keep_last,
                    extra_files=extra_files)
    except BaseException as exc:  # disk full, quota, permissions...: drop the partial save, keep the previous one
        raise save_failed(root, tmp, step, exc, rank) from None
    barrier()
    return final


def step_paths(ckpt_dir: str | os.PathLike, step: int) -> tuple[Path, Path, Path]:
    """(checkpoint root, the temporary directory a save of `step` writes into, the step directory it becomes)."""
    root = Path(ckpt_dir)
    return root, root / f".tmp-{step_dir_name(step)}", root / step_dir_name(step)


def save_failed(root: Path, tmp: Path, step: int, exc: BaseException, rank: int) -> BaseException:
    """The exception to raise for a save that failed with `exc`, after removing its partial directory (rank 0):
    `exc` itself for an interrupt or exit, else one line with the cause, the free space and the intact previous
    checkpoint."""
    space = _free_space(root)  # before the partial save is removed
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_failure(exc):
        return exc  # KeyboardInterrupt / SystemExit: stop, having removed the partial save
    error = safe_dcp.user_error_in(exc)
    if error is not None:
        return error
    previous = find_latest(root)
    return QwenlinkError(f"{tmp}: saving checkpoint step {step} failed ({_reason(exc)}; {space}); "
                         f"the previous checkpoint ({previous if previous else 'none'}) is intact")


def _is_failure(exc: BaseException) -> bool:
    """An error to report (DCP's CheckpointException derives from BaseException), not an interrupt or exit."""
    return isinstance(exc, Exception) or type(exc).__name__ == "CheckpointException"


def _free_space(root: Path) -> str:
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return "free space unknown"
    # Below 1 MiB the cause is almost surely a full disk (torch's zip writer hides ENOSPC behind "unexpected pos").
    return f"{free / 2**20:.1f} MiB free there" + (": the disk is full" if free < 2**20 else "")


def _reason(exc: BaseException) -> str:
    """The innermost cause of a (possibly DCP-wrapped) exception, in one line."""
    inner = safe_dcp.rank_failures(exc)
    if inner:
        return _reason(inner[0])
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}{': ' + str(exc.filename) if exc.filename else ''}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _write_step(root: Path, tmp: Path, final: Path, step: int, model: Qwen2Model,
                optimizer: Optional[torch.optim.Optimizer], *, train_state: dict[str, Any], job_toml: str,
                rank: int, barrier: Callable[[], None], trainable_only: bool, keep_last: int,
                extra_files: Optional[dict[str, str]]) -> None:
    state = begin_step(root, tmp, model, optimizer, rank=rank, barrier=barrier, trainable_only=trainable_only)
    with _quiet():
        _dcp().save(state, checkpoint_id=str(tmp))
    write_rng(tmp, rank)
    barrier()
    if rank == 0:
        finish_step(root, tmp, final, step, model.config, train_state=train_state, job_toml=job_toml,
                    keep_last=keep_last, extra_files=extra_files)


def begin_step(root: Path, tmp: Path, model: Qwen2Model, optimizer: Optional[torch.optim.Optimizer], *, rank: int,
               barrier: Callable[[], None], trainable_only: bool) -> dict[str, Any]:
    """The part of a save before DCP writes the shards (collective): rank 0 makes a fresh temporary directory;
    returns the state dicts DCP is to write."""
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a crashed save of the same step
        tmp.mkdir()
    barrier()
    return _state_dicts(model, optimizer, trainable_only)


def write_rng(tmp: Path, rank: int) -> None:
    """This rank's RNG states into the save's temporary directory."""
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")


def finish_step(root: Path, tmp: Path, final: Path, step: int, config: ModelConfig, *, train_state: dict[str, Any],
                job_toml: str, keep_last: int, extra_files: Optional[dict[str, str]]) -> None:
    """Rank 0, once every rank's shards and DCP's .metadata are written: the small files, then the COMPLETE marker,
    the rename to the step directory, `latest`, and pruning."""
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    (tmp / "job.toml").write_text(job_toml, encoding="utf-8")
    (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2) + "\n", encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    (tmp / COMPLETE).write_text(f"step {step}\n", encoding="utf-8")
    if final.exists():  # re-saving a step (e.g. after a resume that saved at once): replace it
        _remove_step(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    prune(root, keep_last)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete steps (never the one `latest` names) and stale temp dirs."""
    steps = complete_steps(ckpt_dir)
    latest = find_latest(ckpt_dir)
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != latest:
            _remove_step(old)
    # Left by a crash: saves cut short (only one save runs at a time) and deletions cut short (no COMPLETE marker).
    for stale in [*ckpt_dir.glob(".tmp-step_*"), *(p for p in ckpt_dir.glob("step_*")
                                                   if STEP_RE.match(p.name) and not is_complete(p))]:
        shutil.rmtree(stale, ignore_errors=True)
    for stale in ckpt_dir.glob(f".{LATEST}.tmp-*"):  # a `latest` replacement cut short
        stale.unlink(missing_ok=True)


def _remove_step(step_dir: Path) -> None:
    """Unmark first, then delete: a crash mid-delete leaves an incomplete (ignored) directory, never a step that
    looks complete but lacks shards."""
    (step_dir / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(step_dir, ignore_errors=True)


# ---- loading ------------------------------------------------------------------------------------------------------
def check_shapes(step_dir: Path, model: torch.nn.Module, prefix: str = "model.",
                 trainable_only: bool = False) -> None:
    """Compare the checkpoint's tensor names, shapes and dtypes (an integer tensor where a weight belongs) with the
    model's before loading, naming the first mismatch."""
    metadata = safe_dcp.load_dcp_metadata(Path(step_dir) / ".metadata").state_dict_metadata
    trainable = {n.replace("_checkpoint_wrapped_module.", "")  # state_dict() drops the wrapper's prefix
                 for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    for name, tensor in model.state_dict().items():
        if trainable_only and name not in trainable:
            continue
        key = prefix + name
        meta = metadata.get(key)
        if meta is None:
            raise QwenlinkError(f"{step_dir}: tensor {name!r} missing from the checkpoint")
        shape = tuple(getattr(meta, "size", ()))
        if shape != tuple(tensor.shape):
            raise QwenlinkError(f"{step_dir}: tensor {name!r} has shape {list(shape)} in the checkpoint but "
                                f"{list(tensor.shape)} in the model")
        stored = getattr(getattr(meta, "properties", None), "dtype", None)
        if tensor.is_floating_point() and isinstance(stored, torch.dtype):
            check_float(str(step_dir), name, stored)


def load_checkpoint(step_dir: str | os.PathLike, model: Qwen2Model, optimizer: Optional[torch.optim.Optimizer],
                    *, rank: int = 0, load_rng: bool = True, trainable_only: bool = False) -> dict[str, Any]:
    """Load model (and optimizer, RNG) state in place; returns train_state.json (empty dict for weights only).

    `trainable_only` (LoRA): only trainable tensors are read; frozen ones keep what the model holds (the base)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    step_dir = Path(step_dir)
    if not is_complete(step_dir):
        raise QwenlinkError(f"{step_dir}: not a complete checkpoint (no {COMPLETE} marker)")
    check_shapes(step_dir, model, trainable_only=trainable_only)
    state = _state_dicts(model, optimizer, trainable_only)
    try:  # never DCP's own reader/planner: they unpickle without restriction (see safe_dcp.py)
        with _quiet():
            _dcp().load(state, storage_reader=safe_dcp.safe_reader(step_dir), planner=safe_dcp.safe_planner(step_dir))
    except BaseException as exc:
        if not _is_failure(exc):
            raise
        error = safe_dcp.user_error_in(exc)
        if error is not None:
            raise error from None
        raise QwenlinkError(f"{step_dir}: unreadable checkpoint ({_reason(exc)})") from None
    options = _options(trainable_only, load=True)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
        return {}
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    rng_file = step_dir / "rng" / f"rank_{rank:05d}.pt"
    if load_rng and rng_file.is_file():
        set_rng_state(safe_torch_load(rng_file, mmap=False))
    return json.loads((step_dir / "train_state.json").read_text(encoding="utf-8"))


def read_model_config(step_dir: str | os.PathLike) -> ModelConfig:
    path = Path(step_dir) / "config.json"
    if not path.is_file():
        raise QwenlinkError(f"{path}: missing (not a qwenlink checkpoint directory)")
    return ModelConfig.from_hf_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))


def load_model_from_checkpoint(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.float32,
                               shard: Optional[Callable[[Qwen2Model], object]] = None) -> Qwen2Model:
    """The model of a full-model qwenlink checkpoint (a step dir, a checkpoint dir or a run dir), weights only, for
    inference and conversion: built on meta from its config.json, materialised on `device`, loaded, cast to `dtype`.

    `shard` (tensor parallelism) is applied on the meta device, so each process allocates only its shards and DCP
    reads only the slices they hold (one stored tensor at a time). A LoRA run's checkpoint holds adapters only and
    needs its base: `qwenlink.checkpoint.loader.load_model` loads either kind.
    """
    step_dir = resolve_step_dir(ckpt_dir)
    config = read_model_config(step_dir)
    model = build_model(config, device="meta", dtype=torch.float32)
    if shard is not None:
        shard(model)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_checkpoint(step_dir, model, None)
    return model.to(dtype=dtype)
