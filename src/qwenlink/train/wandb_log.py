"""Weights & Biases as an optional mirror of the TensorBoard scalars (`metrics.wandb = true`).

Why a module of its own: W&B is an optional package with a network behind it, and both must stay out of the way of
training. So this module
- checks the package before any work (`require_wandb`, from `check_outputs`): a job configured for W&B on a machine
  without it fails in one line, not after building the model;
- picks the mode without touching the network for long (`choose_mode`): the user's `WANDB_MODE` wins; otherwise a run
  with no API key, or whose W&B host cannot be reached within a few seconds, logs offline (`wandb sync` uploads it
  later) and says so in one line; a failure to start online falls back to offline, and a failure to start at all
  turns W&B off with one line, never stopping training;
- keeps one W&B run per training run across restarts: the run id is stored in OUTPUT_DIR/wandb_run_id and a resumed
  job opens the same run (`resume="allow"`); a fresh start (step 0) begins a new run, as metrics.jsonl starts over.

What is logged is `metrics.scalars(record)` at the record's step, exactly what TensorBoard gets. Only rank 0 calls
this (MetricsLogger is disabled elsewhere).
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
import socket
import string
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from qwenlink.errors import QwenlinkError

RUN_ID_FILE = "wandb_run_id"
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0


@dataclass
class WandbOptions:
    """What `wandb.init` needs from the job config."""

    project: str
    name: str
    entity: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def options_from_config(cfg: Any) -> Optional[WandbOptions]:
    """The job's W&B settings, or None when `metrics.wandb` is off."""
    m = cfg.metrics
    if not m.wandb:
        return None
    return WandbOptions(project=m.wandb_project or "qwenlink", name=m.wandb_name or cfg.job.name,
                        entity=m.wandb_entity, config=cfg.to_dict())


def require_wandb() -> None:
    """Raise one line when `metrics.wandb = true` but the package is absent (checked before any work)."""
    if importlib.util.find_spec("wandb") is None:
        raise QwenlinkError("config: metrics.wandb = true needs the wandb package, which is not installed "
                            "(pip install wandb, or pip install 'qwenlink[wandb]'; or set metrics.wandb = false)")


# ---- mode -----------------------------------------------------------------------------------------------------------
def api_key_configured(base_url: str) -> bool:
    """Whether wandb will find credentials: WANDB_API_KEY, an identity token file, or a .netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(base_url).hostname or ""
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host (or the HTTPS proxy in between) opens within `timeout` seconds.

    Runs in a daemon thread so that a name lookup with no network (which `socket`'s timeout does not cover) cannot
    hold training up for longer than `timeout`."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parsed = urlparse(proxy or url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def choose_mode(probe: Callable[[str], bool] = reachable) -> tuple[Optional[str], str]:
    """(mode to pass to wandb.init, why): None leaves the user's WANDB_MODE to wandb; "offline" without credentials or
    without a reachable host; "online" otherwise."""
    if os.environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    base_url = os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    if not api_key_configured(base_url):
        return "offline", "no W&B API key is configured (`wandb login` or WANDB_API_KEY)"
    if not probe(base_url):
        return "offline", f"{urlparse(base_url).hostname} is unreachable"
    return "online", ""


# ---- run id ---------------------------------------------------------------------------------------------------------
def run_id_for(run_dir: Path, resume_step: int) -> str:
    """The W&B run id of this training run: the stored one when resuming, a new one (stored) when starting at 0."""
    from qwenlink.fileio import atomic_write_text

    path = run_dir / RUN_ID_FILE
    if resume_step > 0 and path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb's own ids
    atomic_write_text(path, run_id + "\n")
    return run_id


# ---- the run --------------------------------------------------------------------------------------------------------
class WandbSink:
    """One W&B run receiving the scalar records; `start` returns None (after one line) when W&B cannot be used."""

    def __init__(self, run: Any, first_new_step: int) -> None:
        self.run = run
        self.first_new_step = first_new_step  # steps below it are already in a resumed online run's history

    @classmethod
    def start(cls, run_dir: str | os.PathLike, options: WandbOptions, *, resume_step: int,
              info: Callable[[str], None]) -> Optional["WandbSink"]:
        import wandb

        run_dir = Path(run_dir)
        run_id = run_id_for(run_dir, resume_step)
        mode, why = choose_mode()
        kwargs = dict(project=options.project, name=options.name, entity=options.entity or None, id=run_id,
                      resume="allow", config=options.config, dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                      settings=wandb.Settings(console="off", silent=True))
        run = None
        try:
            run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a logger must never stop training
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if mode == "offline":
                info(f"W&B: could not start a run ({reason}); W&B logging is off for this run")
                return None
            why = f"the run could not start online ({reason})"
            try:
                run = wandb.init(mode="offline", **kwargs)
            except Exception as again:  # noqa: BLE001
                info(f"W&B: could not start an offline run either ({again}); W&B logging is off for this run")
                return None
        first_new = resume_step + 1
        if resume_step > 0 and not getattr(run, "offline", True) and run.step > first_new:
            info(f"W&B: run {run.id} already holds steps up to {run.step - 1}; W&B history is append-only, so steps "
                 f"{first_new}..{run.step - 1} keep the values logged before this restart")
            first_new = run.step
        if getattr(run, "offline", False):
            sync_dir = run.settings.sync_dir
            info(f"W&B: offline run {run.id} in {sync_dir}, because {why}; upload it later with "
                 f"`wandb sync {sync_dir}`")
        elif getattr(run, "url", None):
            info(f"W&B: {run.url}")
        return cls(run, first_new)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step >= self.first_new_step and scalars:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
