"""Job config: TOML + overrides, typed values, one-line errors with suggestions, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenlink.errors import QwenlinkError
from qwenlink.train.config import accumulation_steps, data_parallel_size, load_config, parse_override
from qwenlink.train.trainer import resolve_model_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_toml_then_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[optim]\nlr = 1e-4\n[train]\nmicro_batch_size = 2\n[model]\npreset = "test-tiny"\n'
                    '[model.arch]\nnum_hidden_layers = 3\n')
    cfg = load_config(path, ["--optim.lr=3e-4", "--train.dtype=bf16", "--data.path=a/b_text_document",
                             "--model.arch.hidden_size=128"])
    assert cfg.optim.lr == 3e-4 and cfg.train.micro_batch_size == 2 and cfg.train.dtype == "bf16"
    assert cfg.data.path == ["a/b_text_document"]  # a scalar becomes a one-element list
    assert cfg.model.arch == {"num_hidden_layers": 3, "hidden_size": 128}
    assert resolve_model_config(cfg).num_hidden_layers == 3


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["--optim.lr=2e-5", "--data.path=x", "--data.weights=[0.5]", "--job.name=a \"b\""])
    saved = tmp_path / "resolved.toml"
    saved.write_text(cfg.to_toml())
    assert load_config(saved).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, expected", [
    ("--optim.lrr=1", "unknown key optim.lrr; did you mean 'optim.lr'?"),
    ("--train.lr=1", "unknown key train.lr; did you mean 'optim.lr'?"),
    ("--optimm.lr=1", "unknown section [optimm]; did you mean 'optim'?"),
    ("--train.dtype=bf15", "train.dtype = 'bf15' is not one of fp32, bf16; did you mean 'bf16'?"),
    ("--train.micro_batch_size=two", "train.micro_batch_size: expected int, got 'two'"),
    ("--train.micro_batch_size=0", "train.micro_batch_size must be positive"),
])
def test_bad_overrides_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(QwenlinkError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[train]\nglobal_batchsize = 8\n")
    with pytest.raises(QwenlinkError, match=r"job.toml: unknown key train.global_batchsize; did you mean "
                                            r"'train.global_batch_size'\?"):
        load_config(path)


def test_unknown_arch_field_suggests() -> None:
    cfg = load_config(None, ["--model.preset=test-tiny", "--model.arch.num_layers=2"])
    with pytest.raises(QwenlinkError, match="model.arch.num_layers; did you mean 'model.arch.num_hidden_layers'"):
        resolve_model_config(cfg)


def test_override_values_parse_as_toml() -> None:
    assert parse_override("--optim.lr=1e-4") == ("optim", "lr", 1e-4)
    assert parse_override("--checkpoint.resume=false") == ("checkpoint", "resume", False)
    assert parse_override("--data.path=[\"a\", \"b\"]") == ("data", "path", ["a", "b"])
    assert parse_override("--job.output_dir=runs/x y") == ("job", "output_dir", "runs/x y")


def test_batch_geometry() -> None:
    cfg = load_config(None, ["--train.micro_batch_size=2", "--train.global_batch_size=16"])
    assert accumulation_steps(cfg, dp_size=2) == 4
    with pytest.raises(QwenlinkError, match=r"global_batch_size \(16\) is not divisible by train.micro_batch_size "
                                            r"\(2\) x data-parallel size \(3\)"):
        accumulation_steps(cfg, dp_size=3)
    tp = load_config(None, ["--parallel.tp=8"])
    with pytest.raises(QwenlinkError, match=r"layout needs 8 processes .* but 1 process\(es\) are running"):
        data_parallel_size(tp, world_size=1)
    assert data_parallel_size(tp, world_size=16) == 2


RECIPES = {  # size: (TP, PP, micro, global) from ModelLink's examples/qwen15 scripts
    "0.5b": (1, 1, 1, 64), "1.8b": (1, 1, 1, 64), "4b": (1, 2, 1, 64), "7b": (8, 1, 2, 64), "14b": (4, 2, 1, 256),
    "32b": (8, 4, 1, 64), "72b": (8, 8, 1, 64),
}


@pytest.mark.parametrize("size", ["0.5b", "1.8b", "4b", "7b", "14b", "32b", "72b", "110b"])
@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_shipped_size_configs_follow_modellink(size: str, mode: str) -> None:
    cfg = load_config(CONFIGS / f"qwen1.5-{size}-{mode}.toml")
    assert cfg.job.mode == mode
    assert resolve_model_config(cfg).num_params() > 0.4e9
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_fraction) == (1.25e-6, 1.25e-7, 0.01)
    assert (cfg.optim.weight_decay, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.clip_grad) == (0.1, 0.9, 0.95, 1.0)
    assert cfg.data.seq_length == 8192 and cfg.train.dtype == "bf16" and cfg.model.init_std == 0.01
    assert cfg.train.finetune == (mode == "sft")
    if size in RECIPES:
        tp, pp, micro, global_ = RECIPES[size]
        assert (cfg.parallel.tp, cfg.parallel.pp) == (tp, pp)
        assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (micro, global_)


def test_tiny_cpu_configs_load() -> None:
    tiny = sorted(CONFIGS.glob("tiny-*.toml"))
    assert tiny, "expected tiny CPU configs in configs/"
    for path in tiny:
        cfg = load_config(path)
        assert cfg.train.device in ("cpu", "auto")
        resolve_model_config(cfg)


def test_compile_defaults_to_on_for_cuda_only() -> None:
    from qwenlink.train.trainer import compile_blocks

    unset = load_config(None, ["--data.path=x"])
    assert unset.parallel.compile is None
    assert compile_blocks(unset, torch.device("cuda", 0)) and not compile_blocks(unset, torch.device("cpu"))
    off = load_config(None, ["--data.path=x", "--parallel.compile=false"])
    on = load_config(None, ["--data.path=x", "--parallel.compile=true"])
    assert not compile_blocks(off, torch.device("cuda")) and compile_blocks(on, torch.device("cpu"))
    assert load_config(None, ["--data.path=x"]).to_toml()  # an unset value writes (and reads back) as absent
