"""Live tensor memory of one rank, by what holds it, and the bytes its collectives move: one tracker for fake and
real tensors.

    tracker = MemoryTracker("cuda", groups={"...group name...": "tp"})
    tracker.mark(chunks, optimizer)              # parameters (and whatever already exists) before the step
    with tracker:
        run_step(...)                            # every tensor the step allocates is seen, DTensor's local ops too
    report = tracker.report()                    # peak bytes and what was live at the peak, by category

Why a dispatch mode of our own and not torch.distributed._tools' MemTracker: the plan must give the same number for a
fake-tensor simulation and a real CPU run (that is how it is tested), and it must tell FSDP2's gathered parameter
copies and its accumulated unsharded gradients apart from activations, which MemTracker files under activations.
The accounting is MemTracker's (storages counted once, by weak reference, freed when Python drops the storage;
`UntypedStorage.resize_`, which FSDP2 uses to free and re-allocate gathered parameters, followed; DTensor ops
desugared to their local ops first), on torch 2.11 and 2.13 alike.

Categories of the bytes live at the peak:
- params: this rank's parameters and buffers (FSDP2's shards, TP's shards);
- gathered: FSDP2's unsharded parameter copies (all-gather outputs, in the compute dtype);
- grads: gradients, sharded ones and FSDP2's unsharded accumulators between micro batches;
- optimizer: optimizer state;
- activations: everything else - saved activations, temporaries, communication buffers, the loss's chunks.
A storage's category is the last role it was seen in (a gradient computed as a temporary and then accumulated
into `.grad` is a gradient for its whole life). Sizes are rounded up to 512 bytes, the CUDA caching allocator's
smallest block; the allocator's own slack (fragmentation, cached free blocks) is not a tensor and is left to the
fit check's headroom.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("params", "gathered", "grads", "optimizer", "activations")
_BLOCK = 512  # the CUDA caching allocator's smallest block
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def block_bytes(nbytes: int) -> int:
    """What a storage of `nbytes` occupies: whole 512-byte blocks (nothing for an empty storage)."""
    return 0 if nbytes <= 0 else -(-nbytes // _BLOCK) * _BLOCK


def general_name(name: str) -> str:
    """A module or parameter name with layer indices as `*` and wrapper segments dropped, so that the same part of
    every layer adds up to one contributor: `layers.12._checkpoint_wrapped_module.mlp` -> `layers.*.mlp`."""
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return _LAYER_INDEX.sub(".*", name)


def storages(t: Any) -> list[tuple[torch.UntypedStorage, torch.device]]:
    """(storage, device) of each storage a tensor holds: its own, or for a wrapper subclass (DTensor) its inner
    tensors' (recursively). The device is the tensor's: a FakeTensor's storage is on meta."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    out, todo = [], [t]
    while todo:
        x = todo.pop()
        if not isinstance(x, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(x):
            names, _ = x.__tensor_flatten__()
            todo.extend(getattr(x, n) for n in names)
        else:
            out.append((x.untyped_storage(), x.device))
    return out


# ---- collectives ------------------------------------------------------------------------------------------------
def _collective_bytes(func, args: tuple, out: Any, group_size: int) -> int:
    """Bytes this rank sends for one collective, with ring algorithms: all-gather (n-1)/n of the gathered tensor,
    reduce-scatter (n-1)/n of its input, all-reduce 2(n-1)/n, all-to-all (n-1)/n, send / broadcast the tensor, a
    receive nothing (its sender counts it)."""
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    op = name.split(".")[0]
    tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]

    def size(ts: Iterable[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    n = max(group_size, 1)
    ring = (n - 1) / n
    if op.startswith("recv") or op in ("irecv", "barrier", "monitored_barrier_", "wait_tensor"):
        return 0
    if op in ("send", "isend", "broadcast", "broadcast_"):
        return size(tensors[:1])
    if "all_gather" in op or "allgather" in op:
        gathered = size(outs) if "out" not in op and op != "_allgather_base_" else size(tensors[:1])
        if op in ("allgather_", "_allgather_base_"):  # (outputs, input, ...): the gathered one is the output
            gathered = size(tensors[:1]) if op == "_allgather_base_" else size(tensors[:-1])
        return int(gathered * ring)
    if "reduce_scatter" in op:
        source = tensors[1:2] if op in ("_reduce_scatter_base_", "reduce_scatter_") else tensors[:1]
        return int(size(source) * ring)
    if "all_reduce" in op or "allreduce" in op:
        return int(2 * size(tensors if "coalesced" in op else tensors[:1]) * ring)
    if "all_to_all" in op or "alltoall" in op:
        return int(size(tensors[:1]) * ring)
    return size(tensors[:1])


def _group_of(func, args: tuple) -> Any:
    """The ProcessGroup a collective runs on (torch's own lookup; None when it cannot tell)."""
    try:
        from torch.distributed._tools.fake_collectives import CollectiveOp

        return CollectiveOp.get_process_group(func, args)
    except Exception:  # noqa: BLE001 - an op torch's table does not know: counted under "other"
        return None


def _not_sending() -> frozenset:
    c10d, functional = torch.ops.c10d, torch.ops._c10d_functional
    return frozenset({functional.wait_tensor.default, c10d.barrier.default, c10d.monitored_barrier_.default})


_NOT_SENDING = _not_sending()


# ---- the tracker ------------------------------------------------------------------------------------------------
@dataclass
class MemoryReport:
    """The peak of live tensor bytes on one rank and what held them at that moment."""

    peak_bytes: int
    by_category: dict[str, int]
    top: list[dict[str, Any]]                     # [{"category", "what", "bytes", "tensors"}], largest first
    comm_bytes: dict[str, int]                    # mesh dimension -> bytes this rank sent
    comm_calls: dict[str, int]
    final_bytes: int = 0                          # live after the last step (parameters, grads, state)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "by_category": self.by_category, "top": self.top,
                "comm_bytes": self.comm_bytes, "comm_calls": self.comm_calls, "final_bytes": self.final_bytes,
                **self.extra}


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of every live storage on `device_type` that an op made while this mode is active (plus
    those registered with `mark`), keeps what was live at the highest total, and adds up collectives' bytes by
    the mesh dimension of their process group (`groups`: group name -> dimension name)."""

    def __init__(self, device_type: str, groups: Optional[dict[str, str]] = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.groups = dict(groups or {})
        self._keys: "weakref.WeakKeyDictionary" = _WeakStorageKeys()
        self._refs: dict[int, weakref.ref] = {}
        self.live: dict[int, int] = {}               # storage key -> bytes now
        self.label: dict[int, str] = {}              # storage key -> what made it (module or parameter name)
        self.role: dict[int, str] = {}               # storage key -> category, when not "activations"
        self.current = 0
        self.peak = 0
        self._peak_live: dict[int, int] = {}
        self._rising = False                          # a new peak was reached and not yet recorded
        self._next = 0
        self.comm_bytes: Counter = Counter()
        self.comm_calls: Counter = Counter()
        self._module_names: dict[int, str] = {}
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self._resize = None
        self._post_backward = None
        self._propagation = None
        self._propagating = 0                         # > 0 inside DTensor's shape derivation (nothing is allocated)
        self._fake = False

    # ---- counting -----------------------------------------------------------------------------------------------
    def _key(self, st: torch.UntypedStorage, device: torch.device, label: str) -> Optional[int]:
        if device.type != self.device_type:
            return None
        key = self._keys.get(st)
        if key is None:
            key = self._next
            self._next += 1
            self._keys[st] = key
            self._refs[key] = weakref.ref(st, partial(self._freed, key))
            self.label[key] = label
            self._set(key, block_bytes(st.nbytes()))
        return key

    def _set(self, key: int, nbytes: int) -> None:
        old = self.live.get(key, 0)
        if nbytes < old and self._rising:  # about to fall from a new peak: keep what is live at it
            self._peak_live = dict(self.live)
            self._rising = False
        self.live[key] = nbytes
        self.current += nbytes - old
        if self.current > self.peak:
            self.peak = self.current
            self._rising = True

    def _freed(self, key: int, _ref: Any) -> None:
        if key in self.live:
            self._set(key, 0)
            del self.live[key]
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (the next step's peak, not the last one's)."""
        self.peak, self._peak_live, self._rising = self.current, dict(self.live), False

    def track(self, t: Any, label: str) -> list[int]:
        return [k for st, device in storages(t) if (k := self._key(st, device, label)) is not None]

    def assign(self, t: Any, role: str, name: str) -> None:
        """Register `t`'s storages (if new) and file them under `role`, named `name`."""
        for key in self.track(t, name):
            self.role[key] = role
            self.label[key] = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor turn it into local ops, which come back here
        kwargs = kwargs or {}
        from torch.distributed._tools.fake_collectives import collective_ops

        out = func(*args, **kwargs)
        if self._propagating:
            return out
        if func in collective_ops and func not in _NOT_SENDING:
            self._count_collective(func, args, out)
        label = self._stack[-1] if self._stack else ("backward" if torch._C._current_graph_task_id() != -1
                                                     else "step")
        label = f"{label} ({func.__name__.split('.')[0]})" if label in ("backward", "step") else label
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, label)
        return out

    def _count_collective(self, func, args: tuple, out: Any) -> None:
        group = _group_of(func, args)
        name = getattr(group, "group_name", None) if group is not None else None
        dim = self.groups.get(name, "other") if name is not None else "other"
        size = group.size() if group is not None else 1
        self.comm_bytes[dim] += _collective_bytes(func, args, out, size)
        self.comm_calls[dim] += 1

    # ---- roles ----------------------------------------------------------------------------------------------------
    def mark(self, modules: Iterable[nn.Module], optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """File parameters, buffers, gradients, FSDP2's gathered copies and optimizer state under their categories
        (call before the step; hooks keep doing it during the step)."""
        modules = list(modules)
        for module in modules:
            for name, sub in module.named_modules():
                self._module_names[id(sub)] = general_name(name) or "model"
            for name, p in module.named_parameters():
                self.assign(p, "params", general_name(name))
                if p.grad is not None:
                    self.assign(p.grad, "grads", general_name(name))
            for name, b in module.named_buffers():
                self.assign(b, "params", general_name(name))
        self._modules = modules
        self._params = {id(p): general_name(n) for m in modules for n, p in m.named_parameters()}
        if optimizer is not None:
            self._optimizer = optimizer
            self._mark_optimizer(optimizer)

    def _mark_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for p, state in optimizer.state.items():
            name = self._params.get(id(p), "?")
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self.assign(value, "optimizer", f"{name} ({key})")

    def _mark_grads(self) -> None:
        for module in getattr(self, "_modules", []):
            for name, p in module.named_parameters():
                if p.grad is not None:
                    self.assign(p.grad, "grads", general_name(name))

    def _mark_fsdp_group(self, group: Any) -> None:
        """FSDP2's per-parameter buffers of one group: gathered copies and unsharded (accumulated) gradients."""
        for fp in getattr(group, "fsdp_params", []):
            name = general_name(getattr(fp, "_param_fqn", None) or "fsdp")
            for t in getattr(fp, "all_gather_outputs", []) or []:
                self.assign(t, "gathered", name)
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                self.assign(unsharded, "gathered", name)
                if unsharded.grad is not None:
                    self.assign(unsharded.grad, "grads", name)
            accumulated = getattr(fp, "unsharded_accumulated_grad", None)
            if accumulated is not None:
                self.assign(accumulated, "grads", name)

    # ---- hooks --------------------------------------------------------------------------------------------------
    def __enter__(self) -> "MemoryTracker":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._enter_module),
            nn.modules.module.register_module_forward_hook(self._leave_module, always_call=True),
            register_optimizer_step_pre_hook(lambda *a: self._mark_grads()),
            register_optimizer_step_post_hook(lambda opt, *a: self._mark_optimizer(opt)),
        ]
        self._patch()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unpatch()

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        self._stack.append(self._module_names.get(id(module), self._stack[-1] if self._stack else "model"))

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _patch(self) -> None:
        """Follow `UntypedStorage.resize_` (FSDP2 frees and re-allocates gathered parameters with it; a dispatch
        mode does not see it) and FSDP2's post-backward (the moment its unsharded gradients exist)."""
        tracker = self
        original = torch.UntypedStorage.resize_

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = original(st, size)
            key = tracker._keys.get(st)
            if key is not None:
                tracker._set(key, block_bytes(st.nbytes()))
            elif size > 0 and st.device.type in (tracker.device_type, "meta"):
                tracker._key(st, torch.device(tracker.device_type), tracker._stack[-1] if tracker._stack else "resize")
            return out

        self._resize = original
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        except ImportError:  # pragma: no cover - a torch without FSDP2's internals: its buffers count as activations
            return
        post_backward = FSDPParamGroup.post_backward

        def wrapped(group: Any, *args: Any) -> Any:
            tracker._mark_fsdp_group(group)
            out = post_backward(group, *args)
            tracker._mark_fsdp_group(group)
            return out

        self._post_backward = (FSDPParamGroup, post_backward)
        FSDPParamGroup.post_backward = wrapped  # type: ignore[method-assign]
        self._patch_sharding_propagation()

    def _patch_sharding_propagation(self) -> None:
        """Ignore what DTensor's sharding propagation makes: to learn an op's output shape it runs the op on fake
        tensors of the *global* shapes (e.g. the whole vocabulary's [tokens, V] log-softmax of a vocabulary-parallel
        loss). On a real device those allocate nothing; in a simulation they looked like tensors tp times the size
        of the real local ones, and the plan of a tp job counted them at its peak."""
        try:
            from torch.distributed.tensor._sharding_prop import ShardingPropagator
        except ImportError:  # pragma: no cover - a torch without it has nothing to ignore
            return
        name = "_propagate_tensor_meta_non_cached"
        original = getattr(ShardingPropagator, name, None)
        if original is None:  # pragma: no cover
            return
        tracker = self

        def propagate(prop: Any, *args: Any, **kwargs: Any) -> Any:
            tracker._propagating += 1
            try:
                return original(prop, *args, **kwargs)
            finally:
                tracker._propagating -= 1

        self._propagation = (ShardingPropagator, name, original)
        setattr(ShardingPropagator, name, propagate)

    def _unpatch(self) -> None:
        if self._resize is not None:
            torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
            self._resize = None
        if self._post_backward is not None:
            cls, original = self._post_backward
            cls.post_backward = original
            self._post_backward = None
        if self._propagation is not None:
            cls, name, original = self._propagation
            setattr(cls, name, original)
            self._propagation = None

    # ---- the result ---------------------------------------------------------------------------------------------
    def report(self, top: int = 8) -> MemoryReport:
        """The peak, and what was live at it by category and by contributor (its largest `top`)."""
        at_peak = self._peak_live if not self._rising else dict(self.live)
        by_category = {c: 0 for c in CATEGORIES}
        contributors: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for key, nbytes in at_peak.items():
            if nbytes == 0:
                continue
            category = self.role.get(key, "activations")
            by_category[category] += nbytes
            entry = contributors[(category, self.label.get(key, "?"))]
            entry[0] += nbytes
            entry[1] += 1
        ranked = sorted(contributors.items(), key=lambda kv: -kv[1][0])[:top]
        return MemoryReport(
            peak_bytes=sum(by_category.values()), by_category=by_category,
            top=[{"category": c, "what": w, "bytes": b, "tensors": n} for (c, w), (b, n) in ranked],
            comm_bytes=dict(self.comm_bytes), comm_calls=dict(self.comm_calls), final_bytes=self.current)


class _WeakStorageKeys:
    """A dict keyed by storages without keeping them alive (UntypedStorage python objects are unique per storage
    and weak-referenceable)."""

    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._d = WeakIdKeyDictionary()

    def get(self, st: torch.UntypedStorage) -> Optional[int]:
        return self._d.get(st)

    def __setitem__(self, st: torch.UntypedStorage, key: int) -> None:
        self._d[st] = key


def gib(nbytes: float) -> str:
    """Bytes as GiB with two decimals (the unit accelerator memory is quoted in)."""
    return f"{nbytes / 2**30:.2f} GiB" if not math.isnan(nbytes) else "?"
