"""Terminal chat: history kept as tokens, ChatML prompt equals the template, /clear and trimming."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.inference.chat import ChatSession, run_chat
from qwenlink.inference.sampling import SamplingParams
from qwenlink.tokenizer import Tokenizer


@pytest.fixture
def session(tiny_fixture_hf):
    model = load_hf_model(tiny_fixture_hf).eval()
    tok = Tokenizer.from_dir(tiny_fixture_hf)
    params = SamplingParams(max_new_tokens=6, stop_ids=frozenset(tok.stop_ids()))
    return model, tok, params


def test_history_is_the_chatml_conversation(session):
    model, tok, params = session
    chat = ChatSession(model, tok, params, system="Be brief.")
    first = chat.reply("hello")
    second = chat.reply("again")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "again"},
                    {"role": "assistant", "content": second}]
    rendered = tok.apply_chat_template(conversation, add_generation_prompt=False)
    assert tok.decode(chat.history_tokens()) == rendered
    chat.clear()
    assert chat.history_tokens() == tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_reply_streams_the_same_text(session):
    model, tok, params = session
    pieces: list[str] = []
    text = ChatSession(model, tok, params).reply("stream me", on_text=pieces.append)
    assert "".join(pieces) == text


def test_old_turns_are_dropped_beyond_the_budget(session):
    model, tok, params = session
    chat = ChatSession(model, tok, params, max_history_tokens=250)
    for i in range(6):
        chat.reply(f"message number {i}")
        # The prompt of each turn fits the budget; the reply just produced comes on top.
        assert len(chat.history_tokens()) - len(chat.turns[-1]) <= 250
    assert "message number 0" not in tok.decode(chat.history_tokens())
    assert "message number 5" in tok.decode(chat.history_tokens())


def test_run_chat_commands(tiny_fixture_hf):
    args = SimpleNamespace(model=str(tiny_fixture_hf), tokenizer=None, device="cpu", dtype="fp32", seed=0,
                           greedy=True, temperature=None, top_k=0, top_p=1.0, repetition_penalty=1.0, stop=[],
                           max_new_tokens=4, system="sys", max_history_tokens=256, prepack=True)
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("hi\n/clear\n/system new\nyo\n/quit\nignored\n"), stdout=out) == 0
    text = out.getvalue()
    assert text.count("assistant> ") == 2
    assert "[conversation cleared]" in text and "[system prompt set" in text
