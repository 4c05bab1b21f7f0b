"""`qwenlink --help`, `info`, and one-line errors (no traceback, exit != 0) for bad model inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import run_cli
from hf_helpers import make_hf_model

EXPECTED_PARAMS = {"qwen1.5-0.5b": "0.46B", "qwen1.5-1.8b": "1.84B", "qwen1.5-4b": "3.95B", "qwen1.5-7b": "7.72B",
                   "qwen1.5-14b": "14.17B", "qwen1.5-32b": "32.51B", "qwen1.5-72b": "72.29B",
                   "qwen1.5-110b": "111.21B"}


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("info", "generate"):
        assert name in result.stdout


@pytest.mark.parametrize("preset", list(EXPECTED_PARAMS))
def test_info_prints_published_parameter_counts(preset):
    result = run_cli("info", preset)
    assert result.returncode == 0, result.stderr
    assert f"parameters: {EXPECTED_PARAMS[preset]}" in result.stdout
    assert "FLOPs per token" in result.stdout


def test_info_json_flops_follow_the_formula():
    data = json.loads(run_cli("info", "qwen1.5-7b", "--json", "--seq-length", "4096").stdout)
    h, layers, vocab = 4096, 32, 151936
    matmul = data["num_params"] - vocab * h
    assert data["train_flops_per_token"] == 6 * matmul + 12 * layers * h * 4096


def test_info_reads_model_directory(tiny_fixture_hf):
    result = run_cli("info", str(tiny_fixture_hf))
    assert result.returncode == 0 and "2 layers, hidden 64" in result.stdout


def test_subcommands_import_their_modules_only_when_run():
    """Building the parser loads no subcommand's implementation (fast --help; a broken feature breaks only itself)."""
    code = ("import sys; from qwenlink.cli import build_parser; build_parser(); print([m for m in sys.modules if "
            "m.startswith('qwenlink.commands') or m.startswith('qwenlink.inference')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_runner_passes_named_attributes_as_values(tmp_path, capsys):
    from qwenlink.cli import main

    # plot's function takes (run_dir, output) rather than the namespace: both must arrive in their places.
    assert main(["plot", str(tmp_path / "norun"), "-o", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path / 'norun' / 'metrics.jsonl'}: not found" in capsys.readouterr().err


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _gen(model: str, *extra: str):
    return run_cli("generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2", *extra)


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _assert_one_line_error(_gen(str(tmp_path)), str(tmp_path), "config.json")


def test_other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    _assert_one_line_error(_gen(str(tmp_path)), "config.json", "bert")


def test_missing_and_misshaped_tensor(tmp_path):
    _, path = make_hf_model(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(path / "model.safetensors"))
    _assert_one_line_error(_gen(str(path)), "model.layers.0.self_attn.k_proj.weight", "[16, 64]", "[32, 64]")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    _assert_one_line_error(_gen(str(path)), "model.layers.0.self_attn.k_proj.weight", "missing")


def test_truncated_safetensors(tmp_path):
    _, path = make_hf_model(tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_one_line_error(_gen(str(path)), "model.safetensors")


def test_unknown_preset_suggests():
    _assert_one_line_error(_gen("qwen1.5-7"), "unknown preset", "qwen1.5-7b")
    _assert_one_line_error(run_cli("info", "qwen2.5-7b"), "unknown preset")


def test_tokenizer_larger_than_model_vocab(tmp_path, tiny_fixture_hf):
    """A tokenizer whose ids exceed the embedding is refused before anything runs."""
    _, path = make_hf_model(tmp_path / "m", vocab=200)
    _assert_one_line_error(_gen(str(path), "--tokenizer", str(tiny_fixture_hf)), "258", "200")


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "generate", "--model", str(tmp_path), "--prompt", "x")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_generate_with_preset_uses_embedded_tokenizer():
    result = run_cli("generate", "--model", "test-tiny", "--tokenizer", str(_fixture_tok()), "--prompt", "abc",
                     "--max-new-tokens", "3", "--temperature", "0.9", "--top-k", "5", "--seed", "1")
    assert result.returncode == 0, result.stderr


def _fixture_tok():
    from common import fixture_dir

    return fixture_dir("megatron-core-tiny-qwen2", "hf")


def test_a_command_that_succeeds_leaves_no_process_group_to_interpreter_shutdown(tmp_path, capsys):
    """Under torchrun, generate / chat / serve / eval join a process group for tensor parallelism. Left to interpreter
    shutdown, gloo's threads can abort the finished process (a tp2 generate ended with SIGABRT once in CI), so the
    CLI tears the group down after a command succeeds, and leaves it after a failure (a peer may still be inside a
    collective; torchrun ends the ranks)."""
    import torch.distributed as dist

    from qwenlink.cli import main

    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        assert main(["info", "test-tiny"]) == 0
        assert not dist.is_initialized()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        assert main(["info", str(tmp_path / "missing")]) == 2
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    capsys.readouterr()
