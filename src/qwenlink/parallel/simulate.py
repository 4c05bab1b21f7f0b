"""One rank of a layout, simulated in one process: fake tensors on the training device and a fake process group.

    run_simulation("pkg.module:function", *args)   # a fresh interpreter, prepared for fake `cuda` tensors
        def function(...):
            with simulated_rank(world_size=8, rank=3) as sim:   # no accelerator, no other process, no memory
                ... build the model and run a step on sim.device ...

Inside `simulated_rank`, tensors on `sim.device` ("cuda:0" by default, on a CPU-only build too) are FakeTensors:
shapes, dtypes and devices are tracked, no data exists and nothing is computed. The default process group is torch's
fake one (FakeStore, backend "fake"): collectives return at once. A guard (`DeviceGuard`) checks what a real
accelerator run depends on:

- every tensor a collective receives is on the training device (NCCL has no CPU path): `CollectiveDeviceError`;
- nothing makes the host wait for the device: reading a value (`.item()`, `float(t)`, `bool(t)`, `.tolist()`), a
  copy to the host (`.cpu()`, `.to("cpu")`), an op whose output shape depends on the data (`nonzero`, boolean
  indexing), a blocking host-to-device copy (`torch.tensor(x, device=...)`, `.to(device)` without non_blocking), a
  barrier or a stream/device synchronize: `HostSyncError`.

Host work stays real: an op whose tensors are all ordinary CPU (or meta) tensors runs normally, so counting labels of
the loader's CPU batches or building a model on the meta device behaves as in training. `pipeline_handshake` answers
the metadata torch.distributed.pipelining exchanges with the neighbouring ranks at its first step, which a fake
process group cannot deliver.

One simulated world per process (`run_simulation` starts a fresh one per call): torch.distributed keeps process-wide
caches that outlive a process group, and a second world with a device mesh in the same process fails to resolve the
first one's (destroyed) groups. Worlds of size 1 have no mesh and can follow one another.

Why a fresh interpreter: autograd needs the device's runtime (a device guard, the accelerator hooks) even for fake
tensors, and a CPU-only build of torch has none for "cuda". `run_simulation` then loads a small stand-in (c10's own
FakeGuardImpl as the device guard, and CUDA hooks that report "built"), compiled once with the C++ compiler against the
headers torch ships; it must be loaded before torch is imported, and it changes what the process believes about
CUDA, so it never goes into a process that does other work. With a CUDA build, nothing is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qwenlink.errors import QwenlinkError


class SimulationError(QwenlinkError):
    """The simulation could not run, or the simulated code failed (the child's error and traceback attached)."""


class HostSyncError(SimulationError):
    """The simulated code made the host wait for the device."""


class CollectiveDeviceError(SimulationError):
    """A collective received a tensor that is not on the training device."""


# ---- the guard ------------------------------------------------------------------------------------------------------
def _collective_ops() -> tuple[frozenset, frozenset]:
    """(collectives, host-blocking ones): torch.distributed's c10d ops and the functional ones DTensor and FSDP2 use."""
    from torch.distributed._tools.fake_collectives import collective_ops

    c10d = torch.ops.c10d
    blocking = frozenset({c10d.barrier.default, c10d.monitored_barrier_.default})
    waits = frozenset({torch.ops._c10d_functional.wait_tensor.default})  # the stream waits, not the host
    return frozenset(collective_ops) - blocking - waits, blocking


_TORCH_DIR, _STDLIB_DIR = os.path.dirname(torch.__file__), os.path.dirname(contextlib.__file__)


def _where() -> str:
    """' (at file:line in function)': the innermost frame of the simulated code (not torch's, the standard
    library's or this module's), which is where a problem was made."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name.startswith((_TORCH_DIR, "<")) or name == __file__ or \
                (name.startswith(_STDLIB_DIR) and "-packages" not in name):
            continue
        return f" (at {name}:{frame.lineno} in {frame.name})"
    return ""


@dataclass
class Record:
    """What the guard saw: collectives by op name, and how many ops ran for real on the host."""

    collectives: Counter = field(default_factory=Counter)
    host_ops: int = 0


class DeviceGuard(TorchDispatchMode):
    """Above FakeTensorMode: runs pure host work for real and checks collectives and host synchronisation."""

    def __init__(self, device: torch.device, record: Record) -> None:
        super().__init__()
        self.device, self.record = device, record
        self.collectives, self.blocking = _collective_ops()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in self.collectives:
            self.record.collectives[str(func)] += 1
            for t in tensors:
                if t.device.type != self.device.type:
                    raise CollectiveDeviceError(
                        f"{func}{_where()} received a tensor on {t.device} ({list(t.shape)}, {t.dtype}); the "
                        f"training device is {self.device.type} (NCCL cannot reduce, gather or send host tensors)")
            return func(*args, **kwargs)
        if func in self.blocking:
            self._sync(func, "a barrier blocks the host until every rank (and its device) gets there")
        if self._host_only(tensors, kwargs):
            self.record.host_ops += 1
            with unset_fake_temporarily():  # real tensors, real results: the loader's batches, a meta model
                return func(*args, **kwargs)
        self._check_sync(func, args, kwargs, tensors)
        return func(*args, **kwargs)

    @staticmethod
    def _sync(func, why: str) -> None:
        raise HostSyncError(f"{func}{_where()}: {why}")

    @staticmethod
    def _host_only(tensors: list, kwargs: dict) -> bool:
        from torch._subclasses.fake_tensor import FakeTensor

        target = kwargs.get("device")
        if target is not None and torch.device(target).type not in ("cpu", "meta"):
            return False
        return all(not isinstance(t, FakeTensor) and t.device.type in ("cpu", "meta") for t in tensors)

    def _check_sync(self, func, args, kwargs, tensors) -> None:
        kind = self.device.type
        aten = torch.ops.aten
        upload = (f"a blocking host-to-{kind} copy waits for everything queued on the device (use "
                  f".to(device, non_blocking=True), or torch.full(..., device=...) instead of "
                  f"torch.tensor(value, device=...))")
        if func is aten._to_copy.default:
            source, target = args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type
            if source == kind and target == "cpu":
                self._sync(func, f"copying a {kind} tensor to the host (.cpu(), .to('cpu'), .numpy()) waits for "
                                 f"the device")
            if source == "cpu" and target == kind and not kwargs.get("non_blocking", False):
                self._sync(func, upload)
            return
        if func is aten.copy_.default:
            dst, src = args[0].device.type, args[1].device.type
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if src == kind and dst == "cpu":
                self._sync(func, f"copying a {kind} tensor into a host tensor waits for the device")
            if src == "cpu" and dst == kind and not non_blocking:
                self._sync(func, upload)
            return
        if not any(t.device.type == kind for t in tensors):
            return
        tags = getattr(func, "tags", ())
        if torch.Tag.data_dependent_output in tags or func is aten.is_nonzero.default:
            self._sync(func, f"reads a {kind} tensor's value on the host (.item(), float(), int(), bool(), "
                             f".tolist()): the host waits for the device")
        if torch.Tag.dynamic_output_shape in tags:
            if func is aten.index.Tensor and not any(isinstance(i, torch.Tensor) and
                                                     i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                return  # integer indices: the output has the indices' shape
            self._sync(func, f"on a {kind} tensor, its output shape depends on the values (boolean indexing, "
                             f"nonzero, masked_select, unique...), so the host waits for the device")


# ---- the device runtime's Python side, for a build without it --------------------------------------------------------
class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _Event()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        raise HostSyncError(f"Stream.synchronize(){_where()}: the host waits for the device")

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> "_Event":
        return self

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        raise HostSyncError(f"Event.synchronize(){_where()}: the host waits for the device")


def _synchronize(*args: Any, **kwargs: Any) -> None:
    raise HostSyncError(f"synchronize(){_where()}: the host waits for the device")


def device_handle(device_type: str) -> types.SimpleNamespace:
    """What torch.distributed asks of `torch.<device_type>` (streams, events, the current device) when this build
    has no runtime for it. Synchronising calls raise HostSyncError."""
    stream = _Stream()
    return types.SimpleNamespace(
        Stream=_Stream, Event=_Event, current_stream=lambda *a, **k: stream, default_stream=lambda *a, **k: stream,
        stream=lambda s=None: contextlib.nullcontext(), synchronize=_synchronize, is_available=lambda: True,
        is_initialized=lambda: True, device_count=lambda: 1, current_device=lambda: 0, set_device=lambda i: None,
        device=lambda i=None: contextlib.nullcontext(), is_bf16_supported=lambda *a, **k: True,
        memory_allocated=lambda *a, **k: 0, max_memory_allocated=lambda *a, **k: 0,
        get_rng_state=lambda *a, **k: torch.zeros(16, dtype=torch.uint8), set_rng_state=lambda *a, **k: None,
        manual_seed=lambda *a, **k: None, __name__=f"simulated {device_type}")


def _has_runtime(device_type: str) -> bool:
    module = getattr(torch, device_type, None)
    return bool(module is not None and getattr(module, "is_available", lambda: False)())


def _stand_in_loaded(device_type: str) -> bool:
    if device_type != "cuda" or torch.version.cuda is not None:
        return False
    accelerator = torch.accelerator.current_accelerator(check_available=False)
    return accelerator is not None and accelerator.type == "cuda"


@contextlib.contextmanager
def _runtime(device_type: str) -> Iterator[None]:
    """torch.distributed's device handles (and torch.cuda's few functions the step calls) pointed at a stand-in,
    when this build has no runtime for the device; with a real runtime, only `synchronize` is replaced (it raises
    HostSyncError)."""
    if _has_runtime(device_type):  # its streams and events work with fake tensors as they are
        device_module = getattr(torch, device_type)
        real_synchronize = device_module.synchronize
        device_module.synchronize = _synchronize
        try:
            yield
        finally:
            device_module.synchronize = real_synchronize
        return
    if not _stand_in_loaded(device_type):
        raise SimulationError(f"this torch build has no {device_type} runtime: run the simulation through "
                              f"qwenlink.parallel.simulate.run_simulation, which prepares a process for it")
    import torch.distributed.device_mesh as device_mesh

    handle = device_handle(device_type)
    real = device_mesh._get_device_handle

    def get_handle(kind: str = "cuda") -> Any:
        return handle if kind == device_type else real(kind)

    patched: list[tuple[Any, str, Any]] = []
    for name, module in list(sys.modules.items()):
        if name.startswith("torch.distributed") and getattr(module, "_get_device_handle", None) is real:
            patched.append((module, "_get_device_handle", real))
    device_module = getattr(torch, device_type)
    for attr in ("synchronize", "is_bf16_supported", "current_device", "set_device", "Stream", "Event",
                 "current_stream", "memory_allocated", "max_memory_allocated", "get_rng_state", "set_rng_state"):
        patched.append((device_module, attr, getattr(device_module, attr, None)))
    try:
        for module, attr, _ in patched:
            setattr(module, attr, get_handle if attr == "_get_device_handle" else getattr(handle, attr))
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


# ---- one simulated rank ----------------------------------------------------------------------------------------------
@dataclass
class SimulatedRank:
    rank: int
    world_size: int
    device: torch.device
    record: Record


@contextlib.contextmanager
def simulated_rank(world_size: int, rank: int, *, device_type: str = "cuda") -> Iterator[SimulatedRank]:
    """Rank `rank` of `world_size` in this process: torch's fake process group as the default group, FakeTensorMode
    for tensors on `device_type` (index 0: the rank's own device), and the guard (see the module docstring). In a
    build without that device's runtime, call it inside `run_simulation`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise SimulationError("simulated_rank: a process group is already initialised in this process")
    if not 0 <= rank < world_size:
        raise SimulationError(f"simulated_rank: rank {rank} is not in a world of {world_size}")
    device = torch.device(device_type, 0)
    record = Record()
    with _runtime(device_type):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), DeviceGuard(device, record):
                yield SimulatedRank(rank, world_size, device, record)
        finally:
            dist.destroy_process_group()


# ---- the pipeline's first-step handshake -----------------------------------------------------------------------------
StageInputs = Callable[[int], Sequence[torch.Tensor]]


@contextlib.contextmanager
def pipeline_handshake(stage_inputs: StageInputs) -> Iterator[None]:
    """torch.distributed.pipelining's first-step handshake with the neighbouring pipeline ranks, answered here.

    At its first step a schedule (torch 2.13) has every stage vote over P2P on whether all shapes were given up
    front (and reads the vote on the host), then passes each stage's output metadata to the next stage and each
    stage's input-gradient metadata to the previous one, as pickled objects. The fake process group delivers
    nothing, so in the simulation:
    - the vote comes out as it does when no stage declares its shapes (dynamic inference, as qwenlink builds them);
    - what a stage receives from the previous rank's stage is the metadata of `stage_inputs(stage_index)`, example
      tensors of its inputs (the caller computes them, e.g. by running the previous stages itself);
    - the gradient metadata from the next rank's stage is derived from this stage's outputs (a plain tensor's
      gradient has its shape and dtype), as torch derives it for stages that declare their shapes.
    The handshake's own host reads happen once, before any micro batch; they are not the step's.
    """
    try:
        from torch.distributed.pipelining import _utils as pp_utils
        from torch.distributed.pipelining.schedules import _PipelineSchedule
        from torch.distributed.pipelining.stage import PipelineStage

        forward_meta, backward_meta = pp_utils._StageForwardMeta, pp_utils._StageBackwardMeta
        dynamic = pp_utils.InferenceMode.DYNAMIC
        extract, derive = pp_utils.extract_tensor_metas, pp_utils._derive_grad_metas
        originals = (_PipelineSchedule._warmup_p2p, PipelineStage._recv_meta, PipelineStage._send_meta)
    except (ImportError, AttributeError) as exc:
        raise SimulationError(f"simulating pipeline parallelism relies on torch.distributed.pipelining's first-step "
                              f"handshake as torch 2.13 has it; this torch ({torch.__version__}) differs: {exc}") \
            from None

    def warmup_p2p(self, stages, has_backward, p2p_done) -> None:
        for stage in stages:
            stage._inference_mode = dynamic

    def recv_meta(self, src_stage: int):
        if src_stage == self.stage_index - 1:
            return forward_meta(forward_metas=extract(tuple(stage_inputs(self.stage_index))))
        if src_stage == self.stage_index + 1:
            return backward_meta(backward_metas=derive(self._stage_meta.outputs))
        raise SimulationError(f"pipeline stage {self.stage_index} asked stage {src_stage} for metadata")

    def send_meta(self, meta, dst_stage: int) -> None:
        pass

    _PipelineSchedule._warmup_p2p, PipelineStage._recv_meta, PipelineStage._send_meta = \
        warmup_p2p, recv_meta, send_meta
    try:
        yield
    finally:
        _PipelineSchedule._warmup_p2p, PipelineStage._recv_meta, PipelineStage._send_meta = originals


# ---- a process prepared for it ---------------------------------------------------------------------------------------
_STAND_IN_SOURCE = r"""
// The CUDA runtime's process-wide registrations that autograd and DeviceGuard need, for a CPU-only torch build:
// c10's FakeGuardImpl as the device guard, and CUDA hooks that say "built" (so the accelerator is cuda) and hand out
// CPU generators. Nothing here can allocate or run anything on a device: FakeTensorMode provides the tensors.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

namespace at {
namespace {
struct StandInCUDAHooks final : CUDAHooksInterface {
  explicit StandInCUDAHooks(CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  DeviceIndex current_device() const override { return 0; }
  const Generator& getDefaultGenerator(DeviceIndex) const override { return detail::getDefaultCPUGenerator(); }
  Generator getNewGenerator(DeviceIndex) const override { return detail::createCPUGenerator(); }
};
}  // namespace
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, StandInCUDAHooks);
}  // namespace at
"""


def _cache_dir() -> Path:
    base = os.environ.get("QWENLINK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qwenlink")
    return Path(base) / "simulate"


def stand_in_library(device_type: str = "cuda") -> Optional[Path]:
    """None when this build has `device_type`'s runtime; else the stand-in (built once per torch build, cached)."""
    if _has_runtime(device_type):
        return None
    if device_type == "cuda" and torch.version.cuda is not None:
        # A CUDA build registers its own runtime, which the stand-in cannot replace, and that runtime needs a GPU
        # for what the step asks of it (the attention kernel's choice reads the device's properties).
        raise SimulationError(f"simulating CUDA needs a visible GPU or a CPU-only build of torch; this is torch "
                              f"{torch.__version__}, a CUDA build, and no GPU is visible: run it where a GPU is, "
                              f"or in an environment with the CPU build (pip install torch --index-url "
                              f"https://download.pytorch.org/whl/cpu)")
    if device_type != "cuda":
        raise SimulationError(f"simulating {device_type} needs torch's {device_type} runtime (only cuda has a "
                              f"stand-in)")
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None or not (include / "c10" / "core" / "impl" / "FakeGuardImpl.h").is_file():
        raise SimulationError("simulating cuda on this CPU-only torch build needs a C++ compiler (c++, g++ or "
                              "$CXX) and torch's C++ headers")
    abi = int(torch.compiled_with_cxx11_abi())
    key = hashlib.sha256(f"{_STAND_IN_SOURCE}|{torch.__version__}|{root}|{compiler}|{abi}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"stand_in_cuda_{key}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=target.parent))
    except OSError:
        target = Path(tempfile.mkdtemp()) / target.name
        work = target.parent
    source = work / "stand_in.cpp"
    source.write_text(_STAND_IN_SOURCE)
    built = work / target.name
    cmd = [compiler, "-shared", "-fPIC", "-O1", "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{include}", str(source), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}", "-o", str(built)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SimulationError(f"building the cuda stand-in failed ({' '.join(cmd[:2])} ...): "
                              f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    os.replace(built, target)  # atomic: concurrent builders leave one complete file
    shutil.rmtree(work, ignore_errors=True)
    return target


_BOOT = """
import ctypes, json, sys
payload = json.loads(sys.argv[1])
if payload["library"]:
    assert "torch" not in sys.modules
    ctypes.CDLL(payload["library"], mode=ctypes.RTLD_GLOBAL)  # before torch: its registrations must come first
sys.path[:0] = payload["path"]
from qwenlink.parallel.simulate import _child_main
sys.exit(_child_main(payload))
"""

_ERRORS = {cls.__name__: cls for cls in (SimulationError, HostSyncError, CollectiveDeviceError)}


def run_simulation(target: str, *args: Any, device_type: str = "cuda", path: Sequence[str | Path] = (),
                   timeout: float = 600.0) -> Any:
    """Call `target` ("package.module:function") with JSON-able `args` in a fresh interpreter prepared for fake
    `device_type` tensors, and return its JSON-able result. `path` entries are put in front of the child's sys.path.
    A HostSyncError or CollectiveDeviceError in the child is raised here as the same class (its traceback in the
    message); any other failure as SimulationError."""
    library = stand_in_library(device_type)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        payload = {"target": target, "args": list(args), "library": str(library) if library else None,
                   "path": [str(p) for p in path], "result": str(result_file)}
        try:
            done = subprocess.run([sys.executable, "-c", _BOOT, json.dumps(payload)], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SimulationError(f"simulation {target} did not finish in {timeout:.0f} s") from None
        if not result_file.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise SimulationError(f"simulation {target} ended with exit code {done.returncode} and no result:\n"
                                  f"{tail}")
        result = json.loads(result_file.read_text())
    if result["ok"]:
        return result["value"]
    error = _ERRORS.get(result["error"], SimulationError)
    prefix = "" if error is not SimulationError else f"{result['error']}: "
    raise error(f"{prefix}{result['message']}\n--- in the simulated process:\n{result['traceback']}")


def _child_main(payload: dict) -> int:
    """The child's side of `run_simulation`: call the target, write {"ok", "value"} or the error to the result."""
    import importlib

    module_name, _, function = payload["target"].partition(":")
    try:
        value = getattr(importlib.import_module(module_name), function)(*payload["args"])
        result = {"ok": True, "value": value}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        error = next((cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in _ERRORS), type(exc).__name__)
        result = {"ok": False, "error": error, "message": str(exc).split("\n--- in the simulated process:")[0],
                  "traceback": "".join(traceback.format_exception(exc)[-60:])}
    Path(payload["result"]).write_text(json.dumps(result))
    return 0
