"""The embedded Qwen1.5 tokenizer equals tiktoken with the same ranks and regex; HF dirs load; ChatML is exact."""

from __future__ import annotations

import json
import unicodedata

import pytest

from qwenlink.tokenizer import (QWEN_PRETOKENIZE_REGEX, QWEN_SPECIAL_TOKENS, Tokenizer, _tiktoken_ranks_path,
                                load_tokenizer, read_tiktoken_ranks)

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it; DON'T you THINK it's fine? She'd agree.",
    "通义千问是阿里云研发的大语言模型。今天天气很好，我们去公园散步吧！",
    "混合 English 和中文 mixed text，标点：「引号」《书名》……",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C code\r\n",
    "Digits: 0 12 345 6789 3.14159265358979 1,000,000 2024-05-17 +86-10-12345678",
    "    leading spaces, trailing spaces    ",
    "runs\n\n\n\nof newlines\n \n \t\t tabs\t and   many     spaces         end",
    "emoji 😀🎉👍🏽👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 symbols ©®™ ∑∫√∞",
    "Ünïcödé àccents, naïve café, Straße, ǅ, ﬁ ligature, e\u0301 combining",
    "Русский текст, ελληνικά, العربية, עברית, हिन्दी, 日本語のテキスト, 한국어 텍스트",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
    " ",
    "a" * 300 + " " + "ab" * 200,
    "URL https://example.com/path?q=1&b=2#frag and e-mail foo.bar@example.org",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
]


@pytest.fixture(scope="module")
def default_tokenizer() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is a test dependency (pip install -e .[test])")
    return tiktoken.Encoding("qwen", pat_str=QWEN_PRETOKENIZE_REGEX,
                             mergeable_ranks=read_tiktoken_ranks(_tiktoken_ranks_path()),
                             special_tokens=QWEN_SPECIAL_TOKENS)


def test_vocabulary_size_and_special_ids(default_tokenizer):
    assert default_tokenizer.vocab_size == 151646
    assert default_tokenizer.token_to_id("<|endoftext|>") == 151643
    assert default_tokenizer.token_to_id("<|im_start|>") == 151644
    assert default_tokenizer.token_to_id("<|im_end|>") == 151645
    assert default_tokenizer.eos_id == 151643


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_encoding_equals_tiktoken(default_tokenizer, tiktoken_encoding, index):
    text = CORPUS[index]
    expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    ids = default_tokenizer.encode(text)
    assert ids == expected
    assert default_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_batch_encoding_equals_single(default_tokenizer):
    assert default_tokenizer.encode_batch(CORPUS) == [default_tokenizer.encode(t) for t in CORPUS]


def test_chat_template_multi_turn(default_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert default_tokenizer.apply_chat_template(messages) == expected
    with_system = [{"role": "system", "content": "Be brief."}] + messages[:2]
    assert default_tokenizer.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n")


def test_saved_tokenizer_loads_in_transformers_with_same_ids_and_template(default_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    default_tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:13]:
        assert hf.encode(text, add_special_tokens=False) == default_tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        default_tokenizer.apply_chat_template(messages)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(CORPUS[2]) == default_tokenizer.encode(CORPUS[2])
    assert reloaded.eos_id == 151643


def test_vocab_json_and_merges_txt_directory(default_tokenizer, tmp_path):
    """Qwen1.5's HF repos ship vocab.json + merges.txt; loading that form gives the same ids."""
    model = json.loads(default_tokenizer.hf.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {str(i): {"content": t, "special": True} for t, i in QWEN_SPECIAL_TOKENS.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added,
                                                                "eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(tmp_path)
    for text in CORPUS:
        assert tok.encode(text) == default_tokenizer.encode(text)


def test_fixture_tokenizer_matches_transformers(tiny_fixture_hf):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_fixture_hf)
    ours = load_tokenizer(tiny_fixture_hf)
    for text in CORPUS[:8]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.eos_id == hf.eos_token_id


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from qwenlink.errors import QwenlinkError

    with pytest.raises(QwenlinkError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(QwenlinkError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")
