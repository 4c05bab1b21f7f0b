"""Write the bad-input corpus: one small, deterministic file or directory per way an input can be wrong.

    python tests/bad_inputs/make_corpus.py OUT_DIR      # writes OUT_DIR/<name> for every entry of CORPUS

The corpus is generated rather than committed (a few hundred KB of binary model files would be noise in the
repository); every byte is determined by this script. `CORPUS` maps each entry's name to a one-line description of
what is wrong with it; test_bad_inputs.py runs the commands that read each kind of input on it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CORPUS: dict[str, str] = {
    # HF model directories
    "model_corrupt_safetensors": "model.safetensors is random bytes (no valid header)",
    "model_truncated_safetensors": "model.safetensors cut to half its length (header promises more data)",
    "model_pickle_bin": "weights only as pytorch_model.bin, a pickle whose payload would create a marker file",
    "model_config_typo": "config.json misspells a required field (num_hiden_layers)",
    "model_config_wrong_type": "config.json has hidden_size as a string and num_attention_heads as a list",
    "model_config_not_json": "config.json is not JSON",
    "model_config_non_utf8": "config.json contains bytes that are not UTF-8",
    "model_config_empty": "config.json is an empty file",
    "model_unsupported_arch": "config.json describes a Mixtral (mixture of experts) model",
    "model_shape_mismatch": "config.json says hidden_size 64, the tensors were saved for hidden_size 32",
    "model_vocab_mismatch": "a 320-token model without a tokenizer (the default tokenizer has 151646 ids)",
    "model_empty_dir": "an empty directory",
    # qwenlink (DCP) checkpoints
    "ckpt_malicious_metadata": "a qwenlink checkpoint whose .metadata pickle would run os.system",
    "ckpt_truncated_shards": "a qwenlink checkpoint whose __0_0.distcp is cut to a third",
    "ckpt_incomplete": "a qwenlink checkpoint without its COMPLETE marker (a save that was interrupted)",
    # Megatron checkpoints
    "megatron_malicious": "a Megatron checkpoint whose model_optim_rng.pt pickle would run os.system",
    "megatron_truncated": "a Megatron checkpoint whose model_optim_rng.pt is cut to half",
    # raw data for preprocess
    "data_non_utf8.jsonl": "a JSONL file with a line that is not UTF-8",
    "data_empty.jsonl": "an empty file",
    "data_not_json.jsonl": "a JSONL file whose second line is not JSON",
    "data_huge_line.jsonl": "one 4 MB line that is not valid JSON (cut off), no newline",
    "data_missing_key.jsonl": "JSONL records without the 'text' field",
    "data_alpaca_wrong_type.jsonl": "alpaca records whose 'output' is a number",
    "data_binary.parquet": "a .parquet file that is random bytes",
    # indexed datasets (.bin/.idx) for train and preprocess --inspect
    "idx_wrong_magic": "PREFIX.idx starts with the wrong magic bytes",
    "idx_truncated_bin": "PREFIX.bin is shorter than PREFIX.idx says",
    "idx_truncated_idx": "PREFIX.idx is cut in the middle of its size table",
    "idx_empty": "PREFIX.bin and PREFIX.idx are empty files",
    # training job configs
    "config_typo.toml": "a job config with optim.lrr instead of optim.lr",
    "config_wrong_type.toml": "a job config with train.train_iters = \"ten\"",
    "config_not_toml.toml": "a job config that is not TOML",
    "config_non_utf8.toml": "a job config with bytes that are not UTF-8",
    "config_unknown_section.toml": "a job config with a [trainer] section (should be [train])",
    # tokenizers
    "tokenizer_corrupt": "a tokenizer directory whose tokenizer.json is not JSON",
    # evaluation tasks
    "task_typo.toml": "an eval task file with 'questions' instead of 'data'",
    "task_non_utf8_data": "an eval task whose questions file is not UTF-8",
    # generate --input
    "prompts_non_utf8.jsonl": "a prompts file that is not UTF-8",
    "prompts_wrong_shape.jsonl": "a prompts file whose records have neither 'prompt' nor 'messages'",
}

TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 320, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "hidden_act": "silu"}


class _Payload:
    """Pickles as a call to os.system(command): what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def marker_path(root: Path) -> Path:
    """The file a payload would create if it ever ran."""
    return root / "PAYLOAD_RAN"


def _tiny_model(config: dict | None = None):
    import torch

    from qwenlink.models.config import ModelConfig
    from qwenlink.models.qwen2 import build_model

    return build_model(ModelConfig.from_hf_dict(config or TINY), device="cpu", dtype=torch.float32, seed=0)


def _hf_dir(path: Path, config: dict | None = None) -> Path:
    from qwenlink.checkpoint.hf import save_hf_model

    save_hf_model(_tiny_model(config), path)
    return path


def _write_config(path: Path, data: bytes | str | dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(data).encode() if isinstance(data, dict) else data.encode() if isinstance(data, str) else data
    (path / "config.json").write_bytes(raw)


def _qwenlink_ckpt(path: Path) -> Path:
    from qwenlink.checkpoint.dcp import save_checkpoint

    save_checkpoint(path, 1, _tiny_model(), None, train_state={"step": 1}, job_toml="", keep_last=1)
    return path / "step_00000001"


def _megatron(path: Path, payload) -> Path:
    import torch

    rank = path / "iter_0000001" / "mp_rank_00"
    rank.mkdir(parents=True)
    (path / "latest_checkpointed_iteration.txt").write_text("1")
    torch.save({"args": payload, "iteration": 1, "checkpoint_version": 3.0,
                "model": {"language_model": {"embedding": {"word_embeddings": {"weight": torch.zeros(4, 4)}}}}},
               rank / "model_optim_rng.pt")
    return rank / "model_optim_rng.pt"


def _indexed(prefix: Path) -> None:
    import numpy as np

    from qwenlink.data.indexed import write_documents

    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_documents(str(prefix), [[11, 12, 13, 14, 15] * 8] * 10, dtype=np.uint16)


def make_corpus(root: str | os.PathLike) -> Path:
    """Write every entry of CORPUS under `root` (which must not hold a previous corpus); returns root."""
    import numpy as np

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = marker_path(root)
    rng = np.random.default_rng(0)

    # -- HF model directories
    d = _hf_dir(root / "model_corrupt_safetensors")
    (d / "model.safetensors").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    d = _hf_dir(root / "model_truncated_safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    d = root / "model_pickle_bin"
    _write_config(d, TINY)
    import torch

    torch.save({"model.embed_tokens.weight": _Payload(f"touch {marker}")}, d / "pytorch_model.bin")
    _write_config(root / "model_config_typo",
                  {("num_hiden_layers" if k == "num_hidden_layers" else k): v for k, v in TINY.items()})
    _write_config(root / "model_config_wrong_type", {**TINY, "hidden_size": "64", "num_attention_heads": [4]})
    _write_config(root / "model_config_not_json", "model_type = qwen2\nhidden_size: 64\n")
    _write_config(root / "model_config_non_utf8", b'{"model_type": "qwen2", "name": "\xff\xfe\x80"}')
    _write_config(root / "model_config_empty", b"")
    _write_config(root / "model_unsupported_arch", {**TINY, "architectures": ["MixtralForCausalLM"],
                                                    "model_type": "mixtral", "num_local_experts": 8})
    d = _hf_dir(root / "model_shape_mismatch", {**TINY, "hidden_size": 32, "intermediate_size": 80})
    _write_config(d, TINY)
    _hf_dir(root / "model_vocab_mismatch")
    (root / "model_empty_dir").mkdir()

    # -- qwenlink checkpoints
    step = _qwenlink_ckpt(root / "ckpt_malicious_metadata")
    import pickle

    metadata = pickle.loads((step / ".metadata").read_bytes())
    metadata.planner_data = _Payload(f"touch {marker}")
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    step = _qwenlink_ckpt(root / "ckpt_truncated_shards")
    data = (step / "__0_0.distcp").read_bytes()
    (step / "__0_0.distcp").write_bytes(data[: len(data) // 3])
    step = _qwenlink_ckpt(root / "ckpt_incomplete")
    (step / "COMPLETE").unlink()
    (step.parent / "latest").unlink()

    # -- Megatron checkpoints
    _megatron(root / "megatron_malicious", _Payload(f"touch {marker}"))
    import argparse

    f = _megatron(root / "megatron_truncated", argparse.Namespace(num_layers=2))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])

    # -- raw data
    (root / "data_non_utf8.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 \xff"}\n')
    (root / "data_empty.jsonl").write_bytes(b"")
    (root / "data_not_json.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n', encoding="utf-8")
    (root / "data_huge_line.jsonl").write_text('{"text": "' + "a" * (4 << 20), encoding="utf-8")
    (root / "data_missing_key.jsonl").write_text('{"body": "no text field"}\n' * 3, encoding="utf-8")
    (root / "data_alpaca_wrong_type.jsonl").write_text(
        json.dumps({"instruction": "add", "input": "1+1", "output": 2}) + "\n", encoding="utf-8")
    (root / "data_binary.parquet").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())

    # -- indexed datasets
    _indexed(root / "idx_wrong_magic" / "data_text_document")
    idx = root / "idx_wrong_magic" / "data_text_document.idx"
    idx.write_bytes(b"NOTMMIDX\x00" + idx.read_bytes()[9:])
    _indexed(root / "idx_truncated_bin" / "data_text_document")
    b = root / "idx_truncated_bin" / "data_text_document.bin"
    b.write_bytes(b.read_bytes()[:20])
    _indexed(root / "idx_truncated_idx" / "data_text_document")
    idx = root / "idx_truncated_idx" / "data_text_document.idx"
    idx.write_bytes(idx.read_bytes()[:40])
    (root / "idx_empty").mkdir()
    (root / "idx_empty" / "data_text_document.bin").write_bytes(b"")
    (root / "idx_empty" / "data_text_document.idx").write_bytes(b"")

    # -- job configs (otherwise valid tiny jobs: data path and output are given on the command line)
    good = '[model]\npreset = "test-tiny"\n\n[train]\ntrain_iters = 2\ndevice = "cpu"\n'
    (root / "config_typo.toml").write_text(good + "\n[optim]\nlrr = 1e-3\n", encoding="utf-8")
    (root / "config_wrong_type.toml").write_text(good.replace("train_iters = 2", 'train_iters = "ten"'),
                                                 encoding="utf-8")
    (root / "config_not_toml.toml").write_text(good + "\n[optim\nlr = = 3\n", encoding="utf-8")
    (root / "config_non_utf8.toml").write_bytes(good.encode() + b'\n[job]\nname = "\xff\xfe"\n')
    (root / "config_unknown_section.toml").write_text(good.replace("[train]", "[trainer]"), encoding="utf-8")

    # -- tokenizer
    (root / "tokenizer_corrupt").mkdir()
    (root / "tokenizer_corrupt" / "tokenizer.json").write_text('{"version": "1.0", "model": {', encoding="utf-8")

    # -- evaluation tasks
    (root / "task_typo.toml").write_text('questions = "q.jsonl"\n', encoding="utf-8")
    (root / "task_non_utf8_data").mkdir()
    (root / "task_non_utf8_data" / "task.toml").write_text('data = "q.jsonl"\n', encoding="utf-8")
    (root / "task_non_utf8_data" / "q.jsonl").write_bytes(
        b'{"question": "\xff?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A"}\n')

    # -- generate --input
    (root / "prompts_non_utf8.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    (root / "prompts_wrong_shape.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")

    missing = [name for name in CORPUS if not (root / name).exists()]
    assert not missing, f"corpus entries not written: {missing}"
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[2].strip())
    out = make_corpus(sys.argv[1])
    for name, what in CORPUS.items():
        print(f"{out / name}: {what}")
