"""One rank of test_loader's tensor-parallel case (run by torchrun, 2 processes, gloo): Megatron TP2 weights loaded
into a meta-built, TP-sharded model through `load_into`; writes OUT/rank{R}.txt = "ok" when every check passes.

Usage: python -m torch.distributed.run --nproc-per-node=2 load_into_worker.py MEGATRON_DIR HF_DIR OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from qwenlink.checkpoint.hf import load_hf_model, read_hf_config
from qwenlink.checkpoint.loader import load_into, read_config
from qwenlink.checkpoint.shards import local_index
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.parallel.tensor import apply_tensor_parallel


def main() -> None:
    megatron, hf_dir, out = (Path(a) for a in sys.argv[1:4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    # The HF config supplies what Megatron's args do not record exactly (rms_norm_eps), so the logits can agree.
    config = read_config(megatron, reference=read_hf_config(hf_dir))
    with torch.device("meta"):
        model = Qwen2Model(config)
    apply_tensor_parallel(model, mesh, sequence_parallel=False, full_logits=True)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    load_into(model, megatron, notice=lambda message: None)

    reference = load_hf_model(hf_dir).eval()
    want = dict(reference.named_parameters())
    sharded = 0
    for name, param in model.named_parameters():
        index = local_index(param)
        local = param.to_local() if index is not None else param
        expected = want[name] if index is None else want[name][index]
        assert torch.equal(local.detach(), expected.detach()), f"rank {rank}: {name} differs"
        sharded += int(local.numel() < want[name].numel())
    assert sharded >= 4 * config.num_hidden_layers, f"rank {rank}: only {sharded} parameters are sharded"
    tokens = torch.tensor([[1, 5, 77, 257, 3, 9, 120, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    (out / f"rank{rank}.txt").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
