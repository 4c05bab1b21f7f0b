"""Process-group setup for `qwenlink train` under torchrun, and the `--nproc N` convenience launcher.

The backend follows the device: NCCL for CUDA, HCCL for Ascend NPUs, gloo for CPU. Collectives get a timeout so
that a crashed rank ends the others with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from qwenlink.device import BACKENDS, backend_for  # noqa: F401  (re-exported: the launcher's backend choice)
from qwenlink.errors import QwenlinkError

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("QWENLINK_COLLECTIVE_TIMEOUT", "600")))


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process); pins each rank to its local device.

    device_kind is what `train.device` says: auto, cpu, cuda, cuda:N, npu... (the backend follows its type, so
    "cuda:0" gets NCCL like "cuda"; under torchrun each rank then uses its own cuda:LOCAL_RANK)."""
    if not launched_by_torchrun():
        return DistInfo()
    import torch.distributed as dist

    from qwenlink.device import resolve_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = resolve_device(None if device_kind == "auto" else device_kind).type
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    elif device_type == "npu":
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device_type), timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """The rank's own accelerator (cuda:LOCAL_RANK), or the given device on CPU."""
    if device.type in ("cuda", "npu") and info.distributed:
        return torch.device(device.type, info.local_rank)
    return device


def all_reduce_max(flag: int, device: torch.device) -> int:
    """Agree across ranks (e.g. on "a signal arrived": everyone saves at the same step). The value travels as a
    tensor on the training device (NCCL has no CPU tensors); reading it back is one host synchronisation, made
    outside the step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag  # alone (a one-rank group too): nothing to agree on
    t = torch.tensor([flag], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def launch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """`qwenlink train --nproc N ...`: re-run the same command under `torchrun --standalone --nproc-per-node N`."""
    if nproc < 1:
        raise QwenlinkError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-c", "import sys; from qwenlink.train.distributed import run_torchrun; "
           "sys.exit(run_torchrun(sys.argv[1:]))", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qwenlink.cli", *argv]
    return subprocess.call(cmd)


def run_torchrun(args: Sequence[str]) -> int:
    """torchrun's main; when a rank fails, its report (a launcher traceback and a table) becomes one line naming the
    rank that failed first and how: its own message when it recorded one (`record_failure`; exit 2 for a user error,
    as one process would), else its exit code or signal. The ranks' own messages are printed above it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(list(args))
    except ChildFailedError as exc:
        rank, failure = first_failure(exc)
        record = rank_record(failure)
        if record is not None:
            print(f"qwenlink train: error: rank {rank} (pid {failure.pid}) failed first: {record['line']} (torchrun "
                  f"stopped the other ranks)", file=sys.stderr, flush=True)
            return 2 if record.get("user_error") else 1
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"qwenlink train: error: rank {rank} (pid {failure.pid}) {how} first; torchrun stopped the other "
              f"ranks (rerun the same command to resume from the latest checkpoint)", file=sys.stderr, flush=True)
        return 1
    return 0


# ---- which rank failed first ----------------------------------------------------------------------------------------
# Why: when one rank fails (a data error), its peers fail a moment later in their next collective ("Connection closed
# by peer"). torchrun orders failures by whole seconds and, on a tie, by rank, so the peer's reset could be reported
# and the real message lay buried mid-log. Each rank therefore records its error with a precise time in the error
# file torchrun gives it (TORCHELASTIC_ERROR_FILE, torchrun's own format, so a plain `torchrun` table shows it too).
RECORD_KEY = "qwenlink"


def record_failure(exc: BaseException) -> None:
    """Write this rank's error (one line, the time, whether it is a user error) where torchrun collects it; a no-op
    outside torchrun. Called as the error leaves `qwenlink train`, before the peers can notice the rank is gone."""
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not isinstance(exc, Exception):
        return
    user_error = isinstance(exc, QwenlinkError)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    line = first if user_error else f"internal error: {type(exc).__name__}: {first}"
    now = time.time()
    data = {"message": {"message": line, "extraInfo": {"py_callstack": "", "timestamp": str(int(now))}},
            RECORD_KEY: {"line": line, "time": now, "user_error": user_error}}
    try:
        with open(path, "w", encoding="utf-8") as fp:
            json.dump(data, fp)
    except OSError:
        pass  # the report then falls back to the exit code; the rank's own message is still on its stderr


def rank_record(failure) -> Optional[dict]:
    """What `record_failure` wrote for a torchrun ProcessFailure, or None (killed, or failed outside the trainer)."""
    data = getattr(failure, "error_file_data", None)
    record = data.get(RECORD_KEY) if isinstance(data, dict) else None
    return record if isinstance(record, dict) and "line" in record and "time" in record else None


def first_failure(exc) -> tuple[int, object]:
    """The rank whose failure caused the others. A rank that died without recording an error (killed by a signal,
    or failed outside the trainer) comes first: it had no chance to record, and its peers record losing it as errors
    of their own (even a user error, a checkpoint save cut short). Otherwise the earliest recorded error by its
    precise time: torchrun orders by whole seconds and gives ties to rank 0, so a peer's "Connection reset by peer" a
    moment after the real failure could win.

    An unrecorded SIGTERM is torchrun's own stop (it sends SIGTERM to every rank still running once one failed, and
    lists them as failures too), so it only counts when nothing else explains the failure (a SIGTERM from outside)."""
    import signal

    failures = exc.failures
    unrecorded = {r: f for r, f in failures.items()
                  if rank_record(f) is None and f.exitcode != -signal.SIGTERM}
    if unrecorded:
        rank = min(unrecorded, key=lambda r: (unrecorded[r].timestamp, r))
        return rank, failures[rank]
    records = {r: rec for r, f in failures.items() if (rec := rank_record(f)) is not None}
    if records:
        rank = min(records, key=lambda r: (records[r]["time"], r))
        return rank, failures[rank]
    return exc.get_first_failure()
