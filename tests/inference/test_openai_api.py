"""The server's OpenAI API layer called directly, without sockets: request validation (every field's refusal names
that field), and response objects shaped as the official `openai` client parses them."""

from __future__ import annotations

import json

import pytest

from common import fixture_dir
from qwenlink.inference import openai_api as api
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.sampling import SamplingParams
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model
from qwenlink.tokenizer import Tokenizer

LIMITS = api.ServerLimits(max_tokens=64, max_prompt_tokens=200, default_max_tokens=256)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(fixture_dir("megatron-core-tiny-qwen2", "hf"))


def _parse(tok: Tokenizer, body: dict, *, chat: bool) -> api.CompletionCall:
    return api.parse_completion(body, chat=chat, tokenizer=tok, limits=LIMITS, model_name="tiny")


# ---- valid requests ------------------------------------------------------------------------------------------------
def test_chat_request_becomes_template_ids_and_sampling(tok):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    call = _parse(tok, {"model": "tiny", "messages": messages, "max_tokens": 5, "max_completion_tokens": 7,
                        "temperature": 0.5, "top_p": 0.9, "top_k": 3, "repetition_penalty": 1.1, "seed": 4,
                        "stop": "\n", "logprobs": True, "stream": True,
                        "stream_options": {"include_usage": True}}, chat=True)
    expected = tok.encode(tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "hello"}]))
    assert call.chat and call.prompt == expected
    p = call.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.seed) == (7, 0.5, 0.9, 3, 1.1, 4)
    assert p.stop_strings == ("\n",) and p.stop_ids == frozenset(tok.stop_ids()) and p.logprobs
    assert call.stream and call.include_usage


def test_completion_prompt_forms_and_defaults(tok):
    text = _parse(tok, {"prompt": "hello world"}, chat=False)
    assert text.prompt == tok.encode("hello world")
    assert _parse(tok, {"prompt": ["hello world"]}, chat=False).prompt == text.prompt
    assert _parse(tok, {"prompt": [5, 6, 7]}, chat=False).prompt == [5, 6, 7]
    p = text.params
    # OpenAI's defaults: temperature 1, top_p 1; max_tokens falls back to the smaller of the default and the limit.
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.logprobs) == (64, 1.0, 1.0, 0, None, False)
    assert not text.stream and not text.include_usage
    # max_completion_tokens is a chat field; completions read max_tokens only.
    assert _parse(tok, {"prompt": "x", "max_tokens": 3, "max_completion_tokens": 9}, chat=False) \
        .params.max_new_tokens == 3
    assert _parse(tok, {"prompt": "x", "logprobs": 0}, chat=False).params.logprobs  # completions: an integer


def test_omitted_max_tokens_is_cut_to_the_room_left_in_the_context(tok):
    """As OpenAI's and vLLM's servers do: a request without max_tokens never overruns the context by default."""
    import dataclasses

    limits = dataclasses.replace(LIMITS, context=100)

    def parse(body, chat=False):
        return api.parse_completion(body, chat=chat, tokenizer=tok, limits=limits, model_name="tiny").params

    assert parse({"prompt": [5] * 90}).max_new_tokens == 10
    assert parse({"prompt": [5] * 10}).max_new_tokens == 64  # the default when it fits
    assert parse({"prompt": [5] * 90, "max_tokens": 30}).max_new_tokens == 30  # asked for: refused later (413)
    assert parse({"messages": USER, "max_completion_tokens": 50}, chat=True).max_new_tokens == 50
    assert parse({"prompt": [5] * 100}).max_new_tokens == 64  # no room at all: the engine's 413
    assert _parse(tok, {"prompt": [5] * 190}, chat=False).params.max_new_tokens == 64  # no context known: no cut
    assert _parse(tok, {"prompt": "x", "stop": ["a", "b"], "n": 1, "presence_penalty": 0}, chat=False) \
        .params.stop_strings == ("a", "b")
    # stream_options only matters for a stream (include_usage is off without one).
    assert not _parse(tok, {"prompt": "x", "stream_options": {"include_usage": True}}, chat=False).include_usage


# ---- bad requests --------------------------------------------------------------------------------------------------
BAD_FIELDS = [  # (body, chat, status, param)
    ({"model": "gpt-4", "prompt": "x"}, False, 404, "model"),
    ({"prompt": "x", "max_tokens": "5"}, False, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, False, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, False, 422, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 1000}, True, 422, "max_tokens"),
    ({"prompt": "x", "n": 2}, False, 422, "n"),
    ({"prompt": "x", "n": True}, False, 422, "n"),
    ({"prompt": "x", "presence_penalty": 0.5}, False, 422, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": 1}, False, 422, "frequency_penalty"),
    ({"prompt": "x", "stop": 5}, False, 422, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, False, 422, "stop"),
    ({"prompt": "x", "stop": ""}, False, 422, "stop"),
    ({"prompt": "x", "logprobs": -1}, False, 422, "logprobs"),
    ({"prompt": "x", "seed": -1}, False, 422, "seed"),
    ({"prompt": "x", "seed": 1.5}, False, 422, "seed"),
    ({"prompt": "x", "temperature": "hot"}, False, 422, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, False, 422, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, False, 422, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, False, 422, "temperature"),
    ({"prompt": "x", "top_p": 0}, False, 422, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, False, 422, "top_p"),
    ({"prompt": "x", "top_k": -1}, False, 422, "top_k"),
    ({"prompt": "x", "top_k": float("inf")}, False, 422, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, False, 422, "repetition_penalty"),
    ({"messages": "hello"}, True, 422, "messages"),
    ({"messages": []}, True, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, True, 422, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, True, 422, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": 5}]}, True, 422, "messages[0].content"),
    # From issue 22: each of these reached a 500 (or garbage) before the schema layer.
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, True, 422,
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}, True, 422,
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, True, 422, "messages[0].content"),
    ({"messages": ["hi"]}, True, 422, "messages[0]"),
    ({"prompt": "x\udfff"}, False, 422, "prompt"),
    ({"prompt": "x", "seed": 2**64}, False, 422, "seed"),
    ({"prompt": "x", "top_k": 1e400}, False, 422, "top_k"),
    ({"prompt": "x", "top_k": 2.0}, False, 422, "top_k"),
    ({"prompt": "x", "repetition_penalty": float("nan")}, False, 422, "repetition_penalty"),
    ({"prompt": "x", "max_tokens": 10**30}, False, 422, "max_tokens"),
    ({"prompt": "x", "temperature": 10**400}, False, 422, "temperature"),
    ({"prompt": "x", "stream_options": "yes"}, False, 422, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, False, 422,
     "stream_options.include_usage"),
    ({"prompt": "x", "stream": "yes"}, False, 422, "stream"),
    ({"prompt": "x", "stop": ["a", 5]}, False, 422, "stop[1]"),
    ({"prompt": "x", "stop": "\ud800"}, False, 422, "stop"),
    ({"prompt": [1, 2**40]}, False, 422, "prompt[1]"),
    ({"prompt": "x", "model": 5}, False, 422, "model"),  # a type error, named as the field
    ({"prompt": {"text": "x"}}, False, 422, "prompt"),
    ({"prompt": ["a", "b"]}, False, 422, "prompt"),
    ({"prompt": [True, 1]}, False, 422, "prompt[0]"),
    ({"prompt": ""}, False, 422, "prompt"),
    ({}, False, 422, "prompt"),
    ({"prompt": [1] * 201}, False, 413, "prompt"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, True, 413, "prompt"),
    ({"prompt": "x", "stream": True, "stream_options": ["include_usage"]}, False, 422, "stream_options"),
]


@pytest.mark.parametrize("body,chat,status,param", BAD_FIELDS)
def test_each_bad_field_is_refused_naming_it(tok, body, chat, status, param):
    with pytest.raises(api.ApiError) as info:
        _parse(tok, body, chat=chat)
    err = info.value
    assert (err.status, err.param) == (status, param)
    assert (param if status != 404 else "gpt-4") in err.message
    payload = err.body()["error"]
    assert set(payload) == {"message", "type", "param", "code"}
    assert payload["type"] == "invalid_request_error" and payload["param"] == param
    json.dumps(err.body())  # what the transport writes must be JSON


def test_model_and_context_errors_carry_openai_codes(tok):
    with pytest.raises(api.ApiError) as info:
        _parse(tok, {"model": "other", "prompt": "x"}, chat=False)
    assert info.value.code == "model_not_found"
    with pytest.raises(api.ApiError) as info:
        _parse(tok, {"prompt": [1] * 201}, chat=False)
    assert info.value.code == "context_length_exceeded" and "201 tokens" in info.value.message


@pytest.mark.parametrize("raw,needle", [(b"{not json", "malformed JSON"), (b"", "malformed JSON"),
                                        (b"\xff\xfe", "malformed JSON"), (b"[1, 2]", "must be an object"),
                                        (b'"text"', "must be an object")])
def test_bodies_that_are_not_json_objects_are_400(raw, needle):
    with pytest.raises(api.ApiError) as info:
        api.parse_json_body(raw)
    assert info.value.status == 400 and needle in info.value.message


def test_json_body_is_parsed():
    assert api.parse_json_body(b'{"prompt": "x", "max_tokens": 2}') == {"prompt": "x", "max_tokens": 2}


def test_api_key():
    api.check_api_key("", None)  # no key configured: anything passes
    api.check_api_key("Bearer s3cret", "s3cret")
    for given in ("", "Bearer wrong", "s3cret", "Bearer s3cret "):
        with pytest.raises(api.ApiError) as info:
            api.check_api_key(given, "s3cret")
        assert info.value.status == 401
        assert info.value.body()["error"]["type"] == "authentication_error"
        assert info.value.code == "invalid_api_key"


def test_engine_refusals_become_413_and_422(tok):
    engine = Engine(build_model(get_preset("test-tiny"), seed=0), max_batch=1, max_length=32, prepack=False)

    def request(prompt: list[int], max_tokens: int) -> Request:
        return api.engine_request(_parse(tok, {"prompt": prompt, "max_tokens": max_tokens}, chat=False), tok)

    api.check_fits(engine, request([1] * 20, 12))  # exactly the context: fits
    with pytest.raises(api.ApiError) as info:
        api.check_fits(engine, request([1] * 20, 13))
    assert (info.value.status, info.value.param, info.value.code) == (413, "max_tokens", "context_length_exceeded")
    assert "context length 32" in info.value.message
    with pytest.raises(api.ApiError) as info:
        api.check_fits(engine, request([1, 320], 2))  # the vocabulary is 320 ids
    assert info.value.status == 422 and "[0, 320)" in info.value.message


def test_engine_request_decodes_with_special_tokens(tok):
    request = api.engine_request(_parse(tok, {"prompt": "x"}, chat=False), tok)
    stop = sorted(tok.stop_ids())[0]
    assert request.decode([stop]) == tok.decode([stop], skip_special_tokens=False) != ""


# ---- responses -----------------------------------------------------------------------------------------------------
openai_types = pytest.importorskip("openai.types", reason="the openai client is a test dependency")
from openai.types import Completion, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402


def _finished(tok: Tokenizer, text: str, *, finish: str = "stop", logprobs: bool = False,
              stop_strings: tuple[str, ...] = ()) -> Request:
    tokens = tok.encode(text)
    request = Request([1, 2, 3], SamplingParams(max_new_tokens=len(tokens), logprobs=logprobs,
                                                stop_strings=stop_strings), decode=tok.decode)
    request.tokens, request.logprobs = tokens, [-0.5 * (i + 1) for i in range(len(tokens))]
    request.text, request.finish_reason = text, finish
    return request


def test_chat_completion_object(tok):
    request = _finished(tok, "hello there", finish="length", logprobs=True)
    body = api.completion_response(request, rid="chatcmpl-1", created=123, model_name="tiny", tokenizer=tok,
                                   chat=True)
    out = ChatCompletion.model_validate(body)
    assert (out.id, out.object, out.created, out.model) == ("chatcmpl-1", "chat.completion", 123, "tiny")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == "hello there"
    assert choice.finish_reason == "length"
    assert [c.token for c in choice.logprobs.content] == [tok.decode([t]) for t in request.tokens]
    assert [c.logprob for c in choice.logprobs.content] == request.logprobs
    n = len(request.tokens)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, n, 3 + n)


def test_text_completion_object(tok):
    request = _finished(tok, "abc def", finish="abort")
    body = api.completion_response(request, rid="cmpl-1", created=5, model_name="tiny", tokenizer=tok, chat=False)
    out = Completion.model_validate(body)
    assert out.object == "text_completion" and out.choices[0].text == "abc def"
    assert out.choices[0].finish_reason == "stop"  # OpenAI has no "abort"
    assert out.choices[0].logprobs is None  # not asked for
    with_lp = api.completion_response(_finished(tok, "abc", logprobs=True), rid="cmpl-2", created=5,
                                      model_name="tiny", tokenizer=tok, chat=False)
    lp = Completion.model_validate(with_lp).choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in tok.encode("abc")] and len(lp.token_logprobs) == len(lp.tokens)


def test_engine_failure_is_a_500(tok):
    with pytest.raises(api.ApiError) as info:
        api.completion_response(_finished(tok, "internal error: boom", finish="error"), rid="x", created=0,
                                model_name="tiny", tokenizer=tok, chat=True)
    assert info.value.status == 500 and info.value.kind == "server_error" and "boom" in info.value.message
    err = api.internal_error(ValueError("bad"))
    assert err.status == 500 and err.message == "internal error: ValueError: bad"


def test_models_and_ids(tok):
    listing = api.model_list("tiny", 42)
    assert listing["object"] == "list"
    assert Model.model_validate(listing["data"][0]) == Model.model_validate(api.model_card("tiny", 42))
    assert Model.model_validate(api.model_card("tiny", 42)).id == "tiny"
    request = _finished(tok, "x")
    ids = {api.response_id(request, chat=True) for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith(f"chatcmpl-{request.id}-") for i in ids)
    assert api.response_id(request, chat=False).startswith(f"cmpl-{request.id}-")


class _ScriptedQueue:
    """Stands in for the worker's per-request queue. Each burst is a list of (text, finish_reason) updates that arrive
    together: `empty()` is False while the burst being read has updates left, so the stream must coalesce them into
    one chunk."""

    def __init__(self, request: Request, bursts: list[list[tuple[str, str | None]]]) -> None:
        self.request, self.bursts = request, [list(b) for b in bursts]

    def get(self) -> Request:
        self.request.text, self.request.finish_reason = self.bursts[0].pop(0)
        return self.request

    get_nowait = get

    def empty(self) -> bool:
        if self.bursts and not self.bursts[0]:
            self.bursts.pop(0)
            return True
        return not self.bursts


def _stream(tok: Tokenizer, bursts, *, chat: bool, include_usage: bool, stop_strings: tuple[str, ...] = ()):
    request = Request([1, 2], SamplingParams(stop_strings=stop_strings), decode=tok.decode)
    chunks = list(api.stream_chunks(request, _ScriptedQueue(request, bursts), rid="r", created=7, model_name="tiny",
                                    chat=chat, include_usage=include_usage))
    return request, chunks


def test_chat_stream_chunks(tok):
    bursts = [[("He", None)], [("Hel", None), ("Hello", None)], [("Hello E", None)], [("Hello ", "stop")]]
    request, chunks = _stream(tok, bursts, chat=True, include_usage=True, stop_strings=("END",))
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert all((p.id, p.object, p.created, p.model) == ("r", "chat.completion.chunk", 7, "tiny") for p in parsed)
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content == ""
    deltas = [p.choices[0].delta.content for p in parsed[1:-2]]
    # One chunk per burst; "Hello E" withholds the "E" that may begin the stop string (the engine then cuts it).
    assert deltas == ["He", "llo", " "] and "".join(deltas) == request.text
    assert parsed[-2].choices[0].finish_reason == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    assert parsed[-1].choices == [] and parsed[-1].usage.prompt_tokens == 2


def test_completion_stream_chunks(tok):
    bursts = [[("ab", None)], [("ab\ufffd", None)], [("abc", None)], [("abcd", "length")]]
    _, chunks = _stream(tok, bursts, chat=False, include_usage=False)
    # Streamed completions carry finish_reason null until the end, which the client reads without validating (and
    # which Completion's strict model refuses), so the running chunks are checked field by field.
    assert all(set(c) == {"id", "object", "created", "model", "choices"} and c["object"] == "text_completion"
               and set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} for c in chunks)
    # The half-decoded character is held back until it is whole; the last update's text comes with no finish.
    assert [c["choices"][0]["text"] for c in chunks] == ["ab", "c", "d", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert Completion.model_validate(chunks[-1]).choices[0].finish_reason == "length"


def test_an_engine_failure_in_a_stream_is_an_error_event_not_text(tok):
    """Issue 22: a request the engine failed mid-stream used to send the exception message as generated text."""
    bursts = [[("ab", None)], [("internal error: ValueError: Overflow", "error")]]
    _, chunks = _stream(tok, bursts, chat=True, include_usage=True)
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:-1]] == ["", "ab"]
    assert chunks[-1] == {"error": {"message": "internal error: ValueError: Overflow", "type": "server_error",
                                    "param": None, "code": None}}


@pytest.mark.parametrize("key,needle", [("kéy", "'é' (U+00E9)"), ("k\u2603", "U+2603"), ("a b", "' '"),
                                        ("key\n", "U+000A"), ("", "empty")])
def test_api_keys_no_client_could_send_are_refused_at_start(key, needle):
    from qwenlink.errors import QwenlinkError

    with pytest.raises(QwenlinkError, match="API key|QWENLINK_API_KEY") as info:
        api.check_api_key_setting(key)
    assert needle in str(info.value)
    api.check_api_key_setting("sk-Proper_key.123~")
    api.check_api_key_setting(None)
