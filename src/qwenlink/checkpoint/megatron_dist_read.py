"""Reading a megatron-core `torch_dist` checkpoint as qwenlink tensors, one layer at a time.

The format (megatron_dist.py) stores global tensors, so the reader is the torch-format reader (MegatronSource) seen
at TP 1 / PP 1: the roles and shapes come from DCP's `.metadata` (read through safe_dcp's allow-list) and `args` from
`common.pt` (read through safe_load, Megatron's enums as stand-ins), then MegatronSource's own config derivation and
shape checks run unchanged. A tensor is fetched when asked for: one layer's slice of a stacked key, read by DCP's
own reader with a planner that asks for just that slice (chunks saved at any TP are reassembled by DCP).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from qwenlink.checkpoint import megatron_layout as ml
from qwenlink.checkpoint.megatron import Iteration, find_iteration_dir, notice_to_stderr
from qwenlink.checkpoint.megatron_dist import (COMMON_FILE, DCP_METADATA, LAYER_KEYS, LAYER_PREFIX, TOP_KEYS,
                                              is_torch_dist_dir)
from qwenlink.checkpoint.megatron_names import Key
from qwenlink.checkpoint.megatron_read import MegatronSource
from qwenlink.checkpoint.safe_dcp import load_dcp_metadata, safe_reader, user_error_in
from qwenlink.checkpoint.safe_load import safe_torch_load
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_LAYER_ROLES = {suffix: role for role, suffix in LAYER_KEYS.items()} | {
    "input_layernorm.weight": "input_norm", "pre_mlp_layernorm.weight": "post_norm"}
_TOP_ROLES = {key: role for role, key in TOP_KEYS.items()}


def open_megatron(directory: str | os.PathLike, *, iteration: Optional[Iteration] = None,
                  reference: Optional[ModelConfig] = None,
                  notice: Callable[[str], None] = notice_to_stderr) -> MegatronSource:
    """A Megatron checkpoint of either storage format (torch: mp_rank_* files; torch_dist: DCP), detected."""
    it_dir, _ = find_iteration_dir(directory, iteration)
    if is_torch_dist_dir(it_dir):
        return TorchDistSource(directory, iteration=iteration, reference=reference, notice=notice)
    return MegatronSource(directory, iteration=iteration, reference=reference, notice=notice)


def _role_of(key: str) -> Optional[tuple[str, bool]]:
    """(role, stacked over layers?) of a model tensor's sharded key, or None if qwenlink has no such tensor."""
    if key in _TOP_ROLES:
        return _TOP_ROLES[key], False
    if key.startswith(LAYER_PREFIX) and key[len(LAYER_PREFIX):] in _LAYER_ROLES:
        return _LAYER_ROLES[key[len(LAYER_PREFIX):]], True
    return None


class TorchDistSource(MegatronSource):
    """A `torch_dist` checkpoint opened for conversion: `config`, `get(qwenlink_name)`, `naming` 'core',
    `storage` 'torch_dist', `layout` the global one (TP 1, PP 1), `saved_layout` (TP, PP) from args."""

    storage = "torch_dist"

    def __init__(self, directory: str | os.PathLike, *, iteration: Optional[Iteration] = None,
                 reference: Optional[ModelConfig] = None, notice: Callable[[str], None] = notice_to_stderr) -> None:
        self.root = Path(directory)
        self.dir, self.iteration = find_iteration_dir(self.root, iteration)
        self.metadata_file = self.dir / DCP_METADATA
        self.metadata = load_dcp_metadata(self.metadata_file)
        common = safe_torch_load(self.dir / COMMON_FILE)
        if not isinstance(common, dict) or common.get("args") is None:
            raise QwenlinkError(f"{self.dir / COMMON_FILE}: no 'args' entry (needed for head counts)")
        self.args = common["args"]
        self.files = {(0, 0): self.metadata_file}  # where MegatronSource's checks say a tensor was found
        self.naming = "core"
        self.keys: dict[Key, str] = {}
        self.chunks = {(0, 0, 0): self._roles(notice)}
        self.saved_layout = (int(getattr(self.args, "tensor_model_parallel_size", 1) or 1),
                             int(getattr(self.args, "pipeline_model_parallel_size", 1) or 1))
        self.config = self._config(reference)
        self._check_shapes()
        self._reader = None
        self._cache: OrderedDict[tuple[str, Optional[int]], torch.Tensor] = OrderedDict()

    def _roles(self, notice: Callable[[str], None]) -> dict[Key, torch.Tensor]:
        """{(role, layer): meta tensor of that layer's shape and the stored dtype} from DCP's metadata; sets layout."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        stacked: dict[str, Any] = {}
        flat: dict[Key, torch.Tensor] = {}
        ignored = set()
        for key, md in self.metadata.state_dict_metadata.items():
            if not key.startswith(_MODEL_PREFIXES):
                ignored.add(key.split(".", 1)[0].split("/", 1)[0])  # optimizer, rng_state, ...
                continue
            if "._extra_state" in key:
                continue
            found = _role_of(key)
            if found is None or not isinstance(md, TensorStorageMetadata):
                raise QwenlinkError(f"{self.metadata_file}: unexpected tensor {key!r} (not part of a dense Qwen2/"
                                    f"Llama model: linear-layer biases, MoE, QK norms or MTP are not supported)")
            role, is_stacked = found
            shape = tuple(md.size)
            if is_stacked:
                if not shape:
                    raise QwenlinkError(f"{self.metadata_file}: tensor {key!r} has no layer dimension")
                stacked[key] = (role, shape, md.properties.dtype)
            else:
                flat[(role, None)] = torch.empty(shape, dtype=md.properties.dtype, device="meta")
                self.keys[(role, None)] = key
        if ignored:
            notice(f"{self.dir}: ignoring {', '.join(sorted(ignored))} (only model weights are converted)")
        if ("embed", None) not in flat:
            raise QwenlinkError(f"{self.metadata_file}: no tensor {TOP_KEYS['embed']!r} (word embeddings)")
        layers = {shape[0] for _, shape, _ in stacked.values()}
        if len(layers) > 1:
            raise QwenlinkError(f"{self.metadata_file}: stacked layer tensors disagree on the number of layers "
                                f"({', '.join(f'{k} {list(s)}' for k, (_, s, _) in sorted(stacked.items()))})")
        num_layers = layers.pop() if layers else 0
        for key, (role, shape, dtype) in stacked.items():
            for j in range(num_layers):
                flat[(role, j)] = torch.empty(shape[1:], dtype=dtype, device="meta")
                self.keys[(role, j)] = key
        self.layout = ml.Layout(1, 1, 1, ((num_layers,),))
        return flat

    # ---- tensors --------------------------------------------------------------------------------------------------
    def _shards(self, p: int, c: int, key: Key) -> list[torch.Tensor]:
        """The whole (global) tensor of one role, as a single 'shard': MegatronSource's un-fusing applies as is."""
        cached = self._cache.get(key)
        if cached is None:
            cached = self._read(key)
            self._cache[key] = cached
            while len(self._cache) > 4:  # q, k, v of one layer read one fused tensor: keep it for the next two
                self._cache.popitem(last=False)
        return [cached]

    def _read(self, key: Key) -> torch.Tensor:
        role, layer = key
        if key not in self.keys:
            raise KeyError(role)
        fqn = self.keys[key]
        md = self.metadata.state_dict_metadata[fqn]
        shape = tuple(md.size)
        offsets = (layer,) + (0,) * (len(shape) - 1) if layer is not None else (0,) * len(shape)
        sizes = (1,) + shape[1:] if layer is not None else shape
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        where = f"{fqn}[{layer}]" if layer is not None else fqn
        self._load(fqn, offsets, dest, where)
        return dest[0] if layer is not None else dest

    def _load(self, fqn: str, offsets: tuple[int, ...], dest: torch.Tensor, where: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        if self._reader is None:
            self._reader = safe_reader(self.dir)
            metadata = self.metadata  # parsed once (through the allow-list) for every tensor read
            self._reader.read_metadata = lambda *args, **kwargs: metadata
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({}, storage_reader=self._reader, planner=_slice_planner(fqn, offsets, dest, where,
                                                                                 self.metadata_file), no_dist=True)
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            found = user_error_in(exc)
            if found is not None:
                raise found from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QwenlinkError(f"{self.dir}: cannot read tensor {where} ({first[:200]})") from None


def _slice_planner(fqn: str, offsets: tuple[int, ...], dest: torch.Tensor, where: str, metadata_file: Path):
    """A DCP load planner that reads the region [offsets, offsets + dest.shape) of one global tensor into `dest`."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(LoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
            self.metadata = metadata

        def create_local_plan(self) -> LoadPlan:
            wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items = create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [wanted])
            covered = sum(int(torch.Size(item.lengths).numel()) for item in items)
            if covered != dest.numel():
                raise QwenlinkError(f"{metadata_file}: tensor {where} is not fully stored (its chunks cover "
                                    f"{covered} of {dest.numel()} elements)")
            return LoadPlan(items)

        def create_global_plan(self, global_plan):
            return global_plan

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value) -> None:
            raise QwenlinkError(f"{metadata_file}: unexpected non-tensor item while reading {where}")

        def resolve_tensor(self, read_item) -> torch.Tensor:
            view = dest
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                view = view.narrow(dim, start, length)
            return view

        def commit_tensor(self, read_item, tensor) -> None:
            """resolve_tensor handed out a view of `dest`: the data is already in place."""

    return SlicePlanner()
