"""Asynchronous checkpoints (`checkpoint.async = true`): training goes on while the previous save is written.

A save copies this rank's model and optimizer state to host memory (DCP's `async_save` staging: the one part the
step waits for) and writes it from a background thread; the next step starts at once. Crash safety is the
synchronous save's (checkpoint/dcp.py): everything goes into `.tmp-step_N`, and only when DCP's write has finished on
every rank (rank 0's write completes after it gathered every rank's results and wrote `.metadata`) does rank 0 add
the small files and the COMPLETE marker, rename the directory and move `latest`. A kill at any moment before that
leaves the previous complete checkpoint as the one a rerun resumes from.

One save is in flight at a time: a save (and the end of training) first waits for the previous one. The write's
collectives run on a gloo process group of their own, so that they neither need a CPU path in NCCL nor interleave
with the training step's collectives on the default group. Host memory holds one extra copy of this rank's shard of
the model and optimizer state while a save is in flight.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from qwenlink.checkpoint import dcp as ckpt
from qwenlink.models.qwen2 import Qwen2Model


@dataclass
class _Pending:
    """A save whose shards are being written."""

    step: int
    root: Path
    tmp: Path
    rank: int
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None


class AsyncCheckpointer:
    """Saves like `dcp.save_checkpoint`, but returns once the state is staged; `wait()` finishes the last save."""

    def __init__(self) -> None:
        self._pending: Optional[_Pending] = None
        self._group: Any = None
        # DCP warns on every save without a process group, from the writing thread (outside dcp._quiet's reach); a
        # single process is a supported use.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

    def _process_group(self) -> Any:
        """A gloo group over every rank for the background write (created once; collective on first use)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def save(self, ckpt_dir: str | os.PathLike, step: int, model: Qwen2Model,
             optimizer: Optional[torch.optim.Optimizer], *, train_state: dict[str, Any], job_toml: str,
             keep_last: int, rank: int = 0, barrier: Callable[[], None] = lambda: None,
             trainable_only: bool = False, extra_files: Optional[dict[str, str]] = None) -> Path:
        """Start saving `step` (every rank calls it); returns the step directory it will be once complete."""
        from torch.distributed.checkpoint import async_save

        self.wait()
        root, tmp, final = ckpt.step_paths(ckpt_dir, step)
        pending = _Pending(step, root, tmp, rank)
        try:
            state = ckpt.begin_step(root, tmp, model, optimizer, rank=rank, barrier=barrier,
                                    trainable_only=trainable_only)
            # Before the write starts: once rank 0's write is done, every rank has passed this point.
            ckpt.write_rng(tmp, rank)
            with ckpt._quiet():
                response = async_save(state, checkpoint_id=str(tmp), process_group=self._process_group())
        except BaseException as exc:
            raise ckpt.save_failed(root, tmp, step, exc, rank) from None
        future = getattr(response, "upload_completion", response)  # newer torch returns staging + upload futures
        config = model.config

        def written(result) -> None:
            try:
                result.result()
                if rank == 0:
                    ckpt.finish_step(root, tmp, final, step, config, train_state=train_state, job_toml=job_toml,
                                     keep_last=keep_last, extra_files=extra_files)
            except BaseException as exc:  # reported by wait(), in the training thread
                pending.error = exc
            finally:
                pending.done.set()

        self._pending = pending
        future.add_done_callback(written)
        return final

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done.is_set()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; a failed write raises as a synchronous save would
        (its partial directory removed, the previous checkpoint named intact)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.done.wait()
        if pending.error is not None:
            raise ckpt.save_failed(pending.root, pending.tmp, pending.step, pending.error, pending.rank) from None
