"""train/export.py in one process: the trainer's HF and adapter exports are what save_hf_model / save_model_adapter
write (LoRA merged, tied heads), shards are cut and named as save_hf_model cuts them, and a failed or impossible
export leaves nothing behind and says why in one line. The layouts are in parallel/test_export_layouts.py."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from unittest import mock

import pytest

from common import write_counting_corpus
from export_helpers import (assert_same_adapter, assert_same_hf, lora_args, lora_config, reference_adapter,
                            reference_hf, set_adapters, tokenizer_dir, write_init)
from qwenlink.checkpoint.hf import save_hf_model
from qwenlink.errors import QwenlinkError
from qwenlink.train.config import load_config
from qwenlink.train.export import export_hf
from qwenlink.train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(tmp_path_factory.mktemp("corpus"), 20)


@pytest.fixture(scope="module")
def inits(tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("init")
    return {tied: write_init(root / str(tied), tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def plain(corpus, inits, tmp_path_factory) -> Trainer:
    """A trainer without LoRA (untied), shared by the tests that only export it."""
    return _trainer(corpus, inits[False], tmp_path_factory.mktemp("plain"))


def _trainer(corpus: str, init: Path, out: Path, *extra: str) -> Trainer:
    cfg = load_config(None, [f"--model.init_from={init}", f"--data.path={corpus}",
                             f"--data.tokenizer={tokenizer_dir()}", "--data.seq_length=16", "--train.micro_batch_size=1", "--train.global_batch_size=2",
                             "--train.train_iters=1", "--train.device=cpu", f"--job.output_dir={out}",
                             "--metrics.tensorboard=false", "--metrics.progress=lines", *extra])
    return Trainer(cfg, stream=io.StringIO())


@pytest.mark.parametrize("tied, saved", [(False, "lm_head"), (True, "embed_tokens")], ids=["untied", "tied"])
def test_lora_exports_equal_the_merged_model_and_the_adapter(corpus, inits, tmp_path, tied, saved):
    """The adapters folded in per weight as it streams equal merge_lora of the whole model; the adapter file lists a
    trained tied embedding under both names, as PEFT does."""
    trainer = _trainer(corpus, inits[tied], tmp_path / "run", *lora_args(saved), "--train.activation_checkpoint=full")
    assert set_adapters(trainer.model) > 0
    trainer.export_hf(str(tmp_path / "hf"))
    trainer.export_adapter(str(tmp_path / "adapter"))
    lora = lora_config(saved)
    assert_same_hf(tmp_path / "hf", reference_hf(inits[tied], tmp_path / "ref", lora))
    assert_same_adapter(tmp_path / "adapter", reference_adapter(inits[tied], tmp_path / "ref-adapter", lora))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_shards_are_cut_and_named_as_save_hf_model_does(plain, tmp_path):
    """Above max_shard_bytes the export writes model-0000i-of-0000n files and the index exactly as save_hf_model."""
    trainer = plain
    export_hf(trainer.chunks, trainer.layout, tmp_path / "hf", tokenizer=lambda: None, max_shard_bytes=8 * 2**20)
    save_hf_model(trainer.model, tmp_path / "ref", max_shard_bytes=8 * 2**20)
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len([f for f in files if f.startswith("model-")]) > 2
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == files
    for name in files:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_a_failed_write_keeps_the_previous_export_and_leaves_no_staging(plain, tmp_path):
    trainer = plain
    target = tmp_path / "hf"
    trainer.export_hf(str(target))
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch("qwenlink.checkpoint.hf.save_file", full_disk), pytest.raises(QwenlinkError) as err:
        trainer.export_hf(str(target))
    assert str(err.value) == f"HF export to {target} failed ([Errno 28] No space left on device); nothing was written"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging directory left


def test_an_export_path_under_a_file_is_one_line(plain, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(QwenlinkError, match=r"HF export to .* failed \(.*file/hf: checkpoint.export_hf cannot be "
                                            r"created: .*file is a file, not a directory\); nothing was written"):
        plain.export_hf(str(tmp_path / "file" / "hf"))


def test_an_export_replaces_a_previous_export_but_never_other_files(plain, tmp_path):
    """The export renames its staging directory onto the target: only a previous export (or nothing) may be there."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    with pytest.raises(QwenlinkError, match=r"photos: checkpoint.export_hf holds other files .* left alone"):
        plain.export_hf(str(photos))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no staging directory left either
    assert (photos / "cat.jpg").read_bytes() == b"\xff\xd8 a cat"
    target = tmp_path / "hf"
    plain.export_hf(str(target))
    (target / "stale.txt").write_text("from an older export")
    plain.export_hf(str(target))  # a recognised HF directory is replaced whole
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()
