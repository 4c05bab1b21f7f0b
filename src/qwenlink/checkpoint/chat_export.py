"""Chat-ready HF exports: the generation config and tokenizer files a model trained on ChatML needs elsewhere.

Why: transformers' `generate`, vLLM and TGI stop at the ids `generation_config.json` lists. Qwen1.5-Chat lists
`[<|im_end|>, <|endoftext|>]`; a ChatML fine-tune exported with only `<|endoftext|>` runs past the end of its turn to
the token limit. So every HF writer (the trainer's export, `convert --to hf`, `--merge-lora`) asks this module what
the model is:

- chat (trained with ChatML): `eos_token_id` [im_end, endoftext] and the tokenizer's `eos_token` <|im_end|>, as
  Qwen1.5-Chat ships them;
- base: `eos_token_id` endoftext, as Qwen1.5 base ships it.

Both carry Qwen1.5's chat template in tokenizer_config.json (Qwen1.5 base ships it too). Sampling settings are left to
the user: Qwen1.5-Chat's (top_p 0.8, temperature 0.7) were tuned for that model, not for a fine-tune of any size.

How a model is known to be chat: a training run in sft mode whose data holds `<|im_start|>` (preprocess --template
chatml, ModelLink's --prompt-type qwen), or a run initialised from a chat model; a converted model keeps the
generation config of its input (an HF directory, the `--config-from` directory of a Megatron input, a merged
adapter's directory), and `convert --chat yes|no` decides when nothing records it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from qwenlink.errors import QwenlinkError
from qwenlink.tokenizer import ENDOFTEXT, IM_END, IM_START, QWEN_CHAT_TEMPLATE, Tokenizer, load_tokenizer

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
CHAT_CHOICES = ("auto", "yes", "no")
_SCAN_DOCUMENTS = 64  # documents of an sft dataset read to tell its template (every ChatML sample has <|im_start|>)


def generation_config(tokenizer: Optional[Tokenizer], chat: bool) -> dict[str, Any]:
    """generation_config.json as Qwen1.5 ships it: base {bos, eos endoftext, greedy, 2048 new tokens}; chat adds
    <|im_end|> before <|endoftext|> in eos and a pad id."""
    if tokenizer is None:
        if chat:
            raise QwenlinkError("a chat (ChatML) export needs the tokenizer to name its end-of-turn ids; give one "
                                "(convert --tokenizer DIR)")
        return {}
    end = tokenizer.token_to_id(ENDOFTEXT)
    end = end if end is not None else tokenizer.eos_id
    gen: dict[str, Any] = {"bos_token_id": end, "do_sample": False, "eos_token_id": end, "max_new_tokens": 2048}
    im_end = tokenizer.token_to_id(IM_END)
    if chat:
        if im_end is None:
            raise QwenlinkError(f"tokenizer {tokenizer.source!r} has no {IM_END} token: a chat (ChatML) export "
                                f"needs it to end a turn")
        gen["eos_token_id"] = [im_end] + ([end] if end is not None and end != im_end else [])
        gen["pad_token_id"] = tokenizer.pad_id if tokenizer.pad_id is not None else end
    return {k: v for k, v in gen.items() if v is not None}


def is_chat_generation_config(gen: dict[str, Any], tokenizer: Optional[Tokenizer]) -> bool:
    """Does this generation config stop at <|im_end|> (a chat model's)?"""
    im_end = tokenizer.token_to_id(IM_END) if tokenizer is not None else None
    eos = gen.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return im_end is not None and im_end in ids


def read_generation_config(directory: str | os.PathLike | None) -> Optional[dict[str, Any]]:
    """A directory's generation_config.json, or None when it has none (a malformed one is one error line)."""
    if directory is None:
        return None
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise QwenlinkError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise QwenlinkError(f"{path}: expected a JSON object")
    return data


# ---- was this model trained with ChatML? ----------------------------------------------------------------------------
def dataset_uses_chatml(prefix: str, tokenizer: Tokenizer, key: str = "input_ids") -> bool:
    """An sft dataset (preprocess's PREFIX; a pairwise one with key "chosen_input_ids") is ChatML when its first
    documents hold <|im_start|>."""
    from qwenlink.data.indexed import IndexedDataset

    im_start = tokenizer.token_to_id(IM_START)
    if im_start is None:
        return False
    data = IndexedDataset(f"{prefix}_packed_{key}_document")
    return any((data.get(i) == im_start).any() for i in range(min(len(data), _SCAN_DOCUMENTS)))


def run_is_chat(mode: str, data_paths: Sequence[Any], init_from: str, tokenizer: Tokenizer) -> bool:
    """A training run's model is chat when it fine-tuned on ChatML data, or started from a chat model (an HF
    directory whose generation config stops at <|im_end|>)."""
    if mode == "sft" and data_paths:
        prefix = str(data_paths[0])
        for suffix in ("_packed_input_ids_document", "_packed_labels_document", "_packed_attention_mask_document"):
            prefix = prefix[: -len(suffix)] if prefix.endswith(suffix) else prefix  # as train/data.py accepts it
        if dataset_uses_chatml(prefix, tokenizer):
            return True
    if mode == "dpo" and data_paths:  # preference pairs (`preprocess --handler pairwise`)
        from qwenlink.data.preference import preference_prefix

        if dataset_uses_chatml(preference_prefix(data_paths[0]), tokenizer, "chosen_input_ids"):
            return True
    if init_from and os.path.isdir(init_from):
        gen = read_generation_config(init_from)
        return gen is not None and is_chat_generation_config(gen, tokenizer)
    return False


def checkpoint_run_is_chat(step_dir: Path, tokenizer: Tokenizer) -> bool:
    """Whether the run that wrote a qwenlink checkpoint (its job.toml) trained a chat model; False when the job
    config or its data is gone (a weights-only conversion, a moved dataset)."""
    job = _job(step_dir)
    try:
        mode = str(job.get("job", {}).get("mode", "pretrain"))
        paths = job.get("data", {}).get("path", [])
        paths = [paths] if isinstance(paths, str) else list(paths)
        init_from = str(job.get("model", {}).get("init_from", "") or "")
        return run_is_chat(mode, paths, init_from, tokenizer)
    except (OSError, ValueError, AttributeError, QwenlinkError):
        return False


def _job(step_dir: Path) -> dict[str, Any]:
    """A qwenlink checkpoint's job.toml as a dict ({} when absent or unreadable: a weights-only conversion)."""
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        job = tomllib.loads((step_dir / "job.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return job if isinstance(job, dict) else {}


def checkpoint_tokenizer(step_dir: Path) -> Optional[Tokenizer]:
    """The tokenizer the run that wrote a qwenlink checkpoint trained with (None when it is not available)."""
    spec = _job(step_dir).get("data", {}).get("tokenizer", "default")
    try:
        return load_tokenizer(str(spec))
    except QwenlinkError:
        return None


def resolve_chat(choice: str, carried: Optional[dict[str, Any]], detected: bool,
                 tokenizer: Optional[Tokenizer]) -> tuple[bool, Optional[dict[str, Any]]]:
    """(chat?, generation config to keep as is): `choice` yes/no wins; else an input's own generation config is
    kept (and says whether it is chat), else what was `detected`."""
    if choice not in CHAT_CHOICES:
        raise QwenlinkError(f"--chat {choice!r}: expected one of {', '.join(CHAT_CHOICES)}")
    if choice != "auto":
        return choice == "yes", None
    if carried is not None:
        return is_chat_generation_config(carried, tokenizer), carried
    return detected, None


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Does a directory hold tokenizer files (a model directory may have weights and config only)?"""
    d = Path(directory)
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


# ---- writing --------------------------------------------------------------------------------------------------------
def _tokenizer_config(config: dict[str, Any], tokenizer: Tokenizer, chat: bool) -> dict[str, Any]:
    """Qwen1.5's tokenizer_config.json fields for the kind of model: the chat template (when the vocabulary has
    ChatML's tokens and none is set), and eos <|im_end|> for a chat model."""
    out = dict(config)
    has_chatml = tokenizer.token_to_id(IM_START) is not None and tokenizer.token_to_id(IM_END) is not None
    if has_chatml and not isinstance(out.get("chat_template"), str):
        out["chat_template"] = QWEN_CHAT_TEMPLATE
    if chat:
        out["eos_token"] = IM_END
        if not out.get("pad_token"):
            out["pad_token"] = ENDOFTEXT
    return out


def write_tokenizer(tmp: Path, *, tokenizer_dir: str | os.PathLike | None, tokenizer: Optional[Tokenizer],
                    chat: bool) -> Optional[Tokenizer]:
    """The tokenizer files (copied from `tokenizer_dir`, else saved from `tokenizer`) with tokenizer_config.json
    made to match the model kind; returns the tokenizer written (None when there is none)."""
    if tokenizer_dir is not None and has_tokenizer(tokenizer_dir):
        tokenizer = load_tokenizer(tokenizer_dir)
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)  # contents only: the copy gets the umask's mode, not the source's
        if not (tmp / TOKENIZER_CONFIG).is_file():
            tokenizer.save(tmp)
    elif tokenizer is not None:
        tokenizer.save(tmp)
    else:
        return None
    path = tmp / TOKENIZER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:
        raise QwenlinkError(f"{Path(tokenizer_dir or tmp) / TOKENIZER_CONFIG}: not valid JSON") from None
    if not isinstance(config, dict):
        raise QwenlinkError(f"{Path(tokenizer_dir or tmp) / TOKENIZER_CONFIG}: expected a JSON object")
    path.write_text(json.dumps(_tokenizer_config(config, tokenizer, chat), indent=2, ensure_ascii=False) + "\n")
    return tokenizer


def write_generation_config(tmp: Path, tokenizer: Optional[Tokenizer], chat: bool,
                            carried: Optional[dict[str, Any]] = None) -> None:
    """generation_config.json: the input's own when one is `carried`, else Qwen1.5's for the model kind."""
    gen = dict(carried) if carried is not None else generation_config(tokenizer, chat)
    (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
