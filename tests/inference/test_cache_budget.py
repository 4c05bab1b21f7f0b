"""Sizing the server's KV cache (inference/cache_budget.py, commands/serve.py): arithmetic on the real Qwen1.5 shapes
(nothing allocated), the budget from free memory, fewer rows when they do not fit, refusal when one row does not."""

from __future__ import annotations

import argparse

import pytest
import torch

from qwenlink.cli import main
from qwenlink.commands.serve import serving_context
from qwenlink.errors import QwenlinkError
from qwenlink.inference.cache_budget import (GiB, KiB, CachePlan, MemoryBudget, agree_across_ranks,
                                             available_host_memory, kv_bytes_per_token, memory_budget, parse_size,
                                             plan_cache)
from qwenlink.inference.engine import Engine
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model


def test_kv_bytes_per_token_of_the_real_presets():
    # layers x 2 x kv heads x head dim x dtype bytes
    assert kv_bytes_per_token(get_preset("qwen1.5-1.8b"), torch.bfloat16) == 24 * 2 * 16 * 128 * 2 == 192 * KiB
    assert kv_bytes_per_token(get_preset("qwen1.5-7b"), torch.bfloat16) == 32 * 2 * 32 * 128 * 2 == 512 * KiB
    assert kv_bytes_per_token(get_preset("qwen1.5-7b"), torch.float32) == 1024 * KiB
    assert kv_bytes_per_token(get_preset("qwen1.5-32b"), torch.bfloat16) == 64 * 2 * 8 * 128 * 2  # 8 kv heads (GQA)
    # Under tensor parallelism a rank holds its share of the kv heads.
    assert kv_bytes_per_token(get_preset("qwen1.5-7b"), torch.bfloat16, kv_heads=32 // 4) == 128 * KiB
    # The old default (16 rows of the full 32768 positions) is the issue's ~103 GB and ~275 GB.
    old = {name: 16 * 32768 * kv_bytes_per_token(get_preset(name), torch.bfloat16)
           for name in ("qwen1.5-1.8b", "qwen1.5-7b")}
    assert round(old["qwen1.5-1.8b"] / 1e9) == 103 and round(old["qwen1.5-7b"] / 1e9) == 275


def test_engine_bytes_per_token_is_what_the_cache_allocates():
    model = build_model(get_preset("test-tiny"), seed=0)
    engine = Engine(model, max_batch=8, max_length=40, prepack=False)
    engine.allocate(3)
    allocated = sum(t.numel() * t.element_size() for t in [*engine.cache.keys.values(), *engine.cache.values.values()])
    assert engine.max_batch == 3 and allocated == engine.cache_bytes == 3 * 40 * engine.kv_bytes_per_token
    engine.allocate()  # already allocated: nothing changes
    with pytest.raises(QwenlinkError, match="already allocated"):
        engine.allocate(4)


@pytest.mark.parametrize("preset,context,budget_gib,rows", [
    ("qwen1.5-1.8b", 10240, 20, 10),   # a row of 10240 tokens is 1.875 GiB: 10 of 16 fit 20 GiB
    ("qwen1.5-1.8b", 4096, 20, 16),    # 0.75 GiB a row: all 16 fit
    ("qwen1.5-7b", 10240, 20, 4),      # 5 GiB a row
    ("qwen1.5-7b", 32768, 57.6, 3),    # 16 GiB a row: 0.9 x 64 GiB free on an 80 GB GPU after the weights
    ("qwen1.5-7b", 32768, 16, 1),      # exactly one row
])
def test_rows_that_fit_a_budget_on_the_real_presets(preset, context, budget_gib, rows):
    per_token = kv_bytes_per_token(get_preset(preset), torch.bfloat16)
    plan = plan_cache(per_token, rows=16, max_context=context, budget=MemoryBudget(int(budget_gib * GiB), "test"))
    assert plan.check().rows == rows
    assert plan.cache_bytes <= budget_gib * GiB < (rows + 1) * plan.row_bytes or rows == 16
    assert plan.lowered == (rows < 16)


def test_lowered_rows_are_said_in_one_line():
    per_token = kv_bytes_per_token(get_preset("qwen1.5-7b"), torch.bfloat16)
    budget = MemoryBudget(20 * GiB, "0.9 x 22.2 GiB free on cuda:0")
    plan = plan_cache(per_token, rows=16, max_context=10240, budget=budget)
    notice = plan.notice()
    assert "\n" not in notice
    assert notice == ("KV cache: --max-batch 16 rows of 10240 tokens would take 80.0 GiB but the cache may use "
                      "20.0 GiB (0.9 x 22.2 GiB free on cuda:0); serving 4 requests at a time (20.0 GiB); lower "
                      "--max-context for more")
    fits = plan_cache(per_token, rows=2, max_context=10240, budget=MemoryBudget(20 * GiB, "x"))
    assert fits.rows == 2 and fits.notice() is None


def test_refused_in_one_line_when_one_row_does_not_fit():
    per_token = kv_bytes_per_token(get_preset("qwen1.5-7b"), torch.bfloat16)
    plan = plan_cache(per_token, rows=16, max_context=32768, budget=MemoryBudget(12 * GiB, "--cache-memory 12.0 GiB"))
    assert plan.rows == 0 and plan.notice() is None
    with pytest.raises(QwenlinkError) as refused:
        plan.check()
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("the KV cache cannot hold one request of --max-context 32768 tokens: that takes 16.0 GiB "
                       "(512.0 KiB a token) and the cache may use 12.0 GiB (--cache-memory 12.0 GiB); use "
                       "--max-context 24576 or less, or give the cache more memory (--cache-memory-fraction, "
                       "--cache-memory)")


def test_budget_from_free_accelerator_memory(monkeypatch):
    """On CUDA the budget is a fraction of what is free after loading (cached allocator blocks released first)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (calls.append(device) or 64 * GiB, 80 * GiB))
    budget = memory_budget(torch.device("cuda:1"), fraction=0.9)
    assert calls == ["empty_cache", torch.device("cuda:1")]
    assert budget == MemoryBudget(int(0.9 * 64 * GiB), "0.9 x 64.0 GiB free on cuda:1")
    assert memory_budget(torch.device("cuda:0"), size=8 * GiB) == MemoryBudget(8 * GiB, "--cache-memory 8.0 GiB")
    with pytest.raises(QwenlinkError, match="--cache-memory-fraction must be in"):
        memory_budget(torch.device("cuda:0"), fraction=1.5)


def test_budget_from_host_memory_and_container_limits(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20971520 kB\n")  # 20 GiB
    none = tmp_path / "no-cgroup"
    assert available_host_memory(meminfo=meminfo, cgroup=none) == (20 * GiB, "cpu")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 * GiB}\n")
    (v2 / "memory.current").write_text(f"{3 * GiB}\n")
    (v2 / "memory.stat").write_text(f"anon 123\ninactive_file {1 * GiB}\n")  # page cache the kernel can reclaim
    assert available_host_memory(meminfo=meminfo, cgroup=v2) == (6 * GiB, "cpu (the container's memory limit)")
    (v2 / "memory.max").write_text("max\n")
    assert available_host_memory(meminfo=meminfo, cgroup=v2) == (20 * GiB, "cpu")
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 * GiB}\n")
    assert available_host_memory(meminfo=meminfo, cgroup=tmp_path / "v1")[0] == 3 * GiB
    # Tensor-parallel ranks on one host's CPU share it.
    import qwenlink.inference.cache_budget as cache_budget

    monkeypatch.setattr(cache_budget, "available_host_memory", lambda: (20 * GiB, "cpu"))
    budget = memory_budget(torch.device("cpu"), fraction=0.5, processes=2)
    assert budget == MemoryBudget(5 * GiB, "0.5 x 20.0 GiB free on cpu shared by 2 processes")


@pytest.mark.parametrize("text,value", [("8589934592", 8 * GiB), ("8G", 8 * GiB), ("8GiB", 8 * GiB), ("8gb", 8 * GiB),
                                        ("1.5G", 3 * GiB // 2), ("512M", 512 << 20), ("100K", 100 * KiB)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "eight", "8X", "-1G", "0", "8 G B"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(QwenlinkError, match="--cache-memory"):
        parse_size(text)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"max_context": None, "max_prompt_tokens": None, "max_tokens_limit": 2048, **kw})


def test_serving_context_defaults():
    # Default: the longest request the limits accept, within the model's positions.
    assert serving_context(_args(), 32768) == (8192 + 2048, 8192)
    assert serving_context(_args(), 4096) == (4096, 8192)
    assert serving_context(_args(max_prompt_tokens=1000, max_tokens_limit=24), 32768) == (1024, 1000)
    # Given a context, prompts may fill it (unless --max-prompt-tokens says otherwise).
    assert serving_context(_args(max_context=32768), 32768) == (32768, 32768)
    assert serving_context(_args(max_context=512, max_prompt_tokens=100), 32768) == (512, 100)
    with pytest.raises(QwenlinkError, match="exceeds the model's max_position_embeddings 4096"):
        serving_context(_args(max_context=8192), 4096)


def test_serve_refuses_in_one_line_before_listening(tiny_fixture_hf, capsys):
    code = main(["serve", "--model", str(tiny_fixture_hf), "--device", "cpu", "--port", "0", "--max-context", "64",
                 "--cache-memory", "10K"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("qwenlink serve: error: the KV cache cannot hold one request of --max-context 64 tokens")
    assert "use --max-context 20 or less" in err  # 2 layers x 2 x 2 kv heads x 16 x 4 bytes = 512 B a token


def test_ranks_agree_on_the_fewest_rows(tmp_path):
    """Under tensor parallelism every rank serves the rows the tightest rank fits, and all refuse together."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_on_rank, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def _agree_on_rank(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        budget = MemoryBudget((5 if rank == 0 else 3) * 1000, "test")
        plan = agree_across_ranks(plan_cache(10, rows=8, max_context=100, budget=budget), torch.device("cpu"))
        assert plan.rows == 3 and plan.limited_elsewhere == (rank == 0)
        if rank == 0:
            assert "another rank's memory holds fewer" in plan.notice()
        none = MemoryBudget(500 if rank == 1 else 5000, "test")
        refused = agree_across_ranks(plan_cache(10, rows=8, max_context=100, budget=none), torch.device("cpu"))
        assert refused.rows == 0
        with pytest.raises(QwenlinkError, match="another tensor-parallel rank" if rank == 0 else "500 B"):
            refused.check()
    finally:
        dist.destroy_process_group()


def test_plan_arguments_are_checked():
    with pytest.raises(QwenlinkError, match="--max-batch must be at least 1"):
        plan_cache(10, rows=0, max_context=100, budget=MemoryBudget(10**6, "x"))
    with pytest.raises(QwenlinkError, match="--max-context must be at least 2"):
        plan_cache(10, rows=4, max_context=1, budget=MemoryBudget(10**6, "x"))
    assert isinstance(plan_cache(10, rows=4, max_context=100, budget=MemoryBudget(10**6, "x")), CachePlan)
