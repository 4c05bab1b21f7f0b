"""The OpenAI API layer of the server: request bodies in, response objects and OpenAI errors out; no sockets.

Why a module of its own: what the OpenAI protocol says (which fields are valid, what each error looks like, what a
completion or a streamed chunk holds) is a different concern from how bytes travel (server.py). Kept free of I/O, every
validation rule and every response shape can be tested by calling functions, and the HTTP handler stays a thin pipe.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with these statuses: 400 malformed JSON or
a body that is not an object; 401 missing or wrong API key; 404 unknown model; 413 prompt beyond the server's limit, or
prompt + max_tokens beyond the context; 422 invalid parameter values; 500 the engine failed the request.
"""

from __future__ import annotations

import json
import math
import queue
import secrets
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

from qwenlink.errors import QwenlinkError
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.sampling import SamplingParams
from qwenlink.tokenizer import Tokenizer


@dataclass
class ServerLimits:
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 8192
    max_concurrent: int = 64  # requests in flight (running + queued) before 429
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    # The engine's context (prompt + completion tokens); a request that omits max_tokens gets at most the room its
    # prompt leaves in it, as OpenAI's and vLLM's servers do (None: no such cut).
    context: Optional[int] = None


class ApiError(Exception):
    """A refusal the client is told about: an HTTP status plus OpenAI's error object (`body()`)."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, kind: str = "invalid_request_error",
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def internal_error(exc: BaseException) -> ApiError:
    """A bug surfaced to the client as a 500 naming the exception, so the server can keep serving others."""
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


# ---- requests ------------------------------------------------------------------------------------------------------
def check_api_key(authorization: str, api_key: Optional[str]) -> None:
    """Accept `Authorization: Bearer KEY` when a key is configured (compared in constant time)."""
    if api_key is None:
        return
    if not secrets.compare_digest(authorization.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object; anything else is a 400 (the client sent something that is not a request)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object")
    return body


def _number(body: dict, name: str, default: float, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(422, f"'{name}' must be a number, got {type(value).__name__}", param=name)
    if not math.isfinite(value):  # Python's JSON reader accepts NaN and Infinity; no sampling knob means either
        raise ApiError(422, f"'{name}' must be a finite number, got {value}", param=name)
    if low is not None and (value < low or (low_open and value == low)):
        raise ApiError(422, f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", param=name)
    if high is not None and value > high:
        raise ApiError(422, f"'{name}' must be <= {high}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], *, low: int = 0) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"'{name}' must be an integer, got {type(value).__name__}", param=name)
    if value < low:
        raise ApiError(422, f"'{name}' must be >= {low}, got {value}", param=name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(422, "'stop' must be a string or a list of at most 4 strings", param="stop")
    if any(not s for s in stops):
        raise ApiError(422, "'stop' strings must not be empty", param="stop")
    return stops


def sampling_from_body(body: dict, tokenizer: Tokenizer, limits: ServerLimits, *, chat: bool) -> SamplingParams:
    """OpenAI request fields -> SamplingParams (plus qwenlink's top_k and repetition_penalty extensions)."""
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    default = min(limits.default_max_tokens, limits.max_tokens)
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", default, low=1)
    if max_tokens > limits.max_tokens:
        raise ApiError(422, f"'max_tokens' is {max_tokens}, above this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    n = _integer(body, "n", 1, low=1)
    if n != 1:
        raise ApiError(422, "only n=1 is supported", param="n")
    for unsupported in ("presence_penalty", "frequency_penalty"):
        if body.get(unsupported) not in (None, 0, 0.0):
            raise ApiError(422, f"'{unsupported}' is not supported (use 'repetition_penalty')", param=unsupported)
    stops = _stop_strings(body)
    if chat:
        want_logprobs = body.get("logprobs") is True
    else:
        want_logprobs = _integer(body, "logprobs", None, low=0) is not None
    seed = _integer(body, "seed", None, low=0)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        top_k=int(_number(body, "top_k", 0, low=0)),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, low=0.0, low_open=True),
        seed=seed,
        stop_ids=frozenset(tokenizer.stop_ids()),
        stop_strings=stops,
        logprobs=want_logprobs,
    )


def _chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(422, f"messages[{i}] must have a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(422, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise ApiError(422, f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": m["role"], "content": content})
    return clean


def _completion_prompt(body: dict, tokenizer: Tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ApiError(422, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       param="prompt")
    if not ids:
        raise ApiError(422, "'prompt' is empty", param="prompt")
    return ids


def prompt_from_body(body: dict, tokenizer: Tokenizer, limits: ServerLimits, *, chat: bool) -> list[int]:
    """The prompt's token ids: chat messages through the chat template, or a completion prompt (text or ids)."""
    if chat:
        ids = tokenizer.encode(tokenizer.apply_chat_template(_chat_messages(body)))
    else:
        ids = _completion_prompt(body, tokenizer)
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(413, f"prompt has {len(ids)} tokens, above this server's limit of "
                            f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    return ids


@dataclass
class CompletionCall:
    """A validated /v1/completions or /v1/chat/completions request, ready to become an engine `Request`."""

    chat: bool
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage and no choices


def parse_completion(body: dict, *, chat: bool, tokenizer: Tokenizer, limits: ServerLimits,
                     model_name: str) -> CompletionCall:
    """Check a request body field by field (the model first, then sampling, then the prompt) into a CompletionCall."""
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"model {model!r} not found (this server serves {model_name!r})",
                       param="model", code="model_not_found")
    params = sampling_from_body(body, tokenizer, limits, chat=chat)
    prompt = prompt_from_body(body, tokenizer, limits, chat=chat)
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if stream and options is not None and not isinstance(options, dict):
        raise ApiError(422, f"'stream_options' must be an object, got {type(options).__name__}", param="stream_options")
    include_usage = stream and bool((options or {}).get("include_usage"))
    omitted = body.get("max_tokens") is None and not (chat and body.get("max_completion_tokens") is not None)
    if omitted and limits.context is not None and 1 <= limits.context - len(prompt) < params.max_new_tokens:
        params = replace(params, max_new_tokens=limits.context - len(prompt))
    return CompletionCall(chat, prompt, params, stream, include_usage)


def response_decoder(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """How generated ids become response text (special tokens kept: stop strings may name them)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def engine_request(call: CompletionCall, tokenizer: Tokenizer) -> Request:
    return Request(call.prompt, call.params, decode=response_decoder(tokenizer))


def check_fits(engine: Engine, request: Request) -> None:
    """The engine's own refusal (too long for a cache row, token ids outside the vocabulary) as an OpenAI error."""
    try:
        engine.check(request)
    except QwenlinkError as exc:
        if "context length" in str(exc):
            raise ApiError(413, str(exc), param="max_tokens", code="context_length_exceeded") from None
        raise ApiError(422, str(exc)) from None


# ---- responses -----------------------------------------------------------------------------------------------------
def model_card(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "qwenlink"}


def model_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_name, created)]}


def response_id(request: Request, *, chat: bool) -> str:
    """OpenAI-style id: unique across restarts (the random part), traceable to the engine request (its id)."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{request.id}-{secrets.token_hex(6)}"


def usage(request: Request) -> dict:
    return {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.tokens),
            "total_tokens": len(request.prompt) + len(request.tokens)}


def finish_reason(request: Request) -> str:
    """OpenAI knows only "length" and "stop"; an aborted request reads as stopped."""
    return "length" if request.finish_reason == "length" else "stop"


def _logprobs(request: Request, tokenizer: Tokenizer, *, chat: bool) -> Optional[dict]:
    if not request.params.logprobs:
        return None
    pairs = list(zip(request.tokens, request.logprobs))
    if chat:
        return {"content": [{"token": tokenizer.decode([t]), "logprob": lp,
                             "bytes": list(tokenizer.decode([t]).encode()), "top_logprobs": []} for t, lp in pairs]}
    return {"tokens": [tokenizer.decode([t]) for t, _ in pairs], "token_logprobs": [lp for _, lp in pairs],
            "top_logprobs": None, "text_offset": None}


def completion_response(request: Request, *, rid: str, created: int, model_name: str, tokenizer: Tokenizer,
                        chat: bool) -> dict:
    """A finished request as a `chat.completion` or `text_completion` object; an engine failure is a 500."""
    if request.finish_reason == "error":
        raise ApiError(500, request.text, kind="server_error")
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": request.text},
                  "logprobs": _logprobs(request, tokenizer, chat=True), "finish_reason": finish_reason(request)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": request.text, "logprobs": _logprobs(request, tokenizer, chat=False),
                  "finish_reason": finish_reason(request)}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
            "usage": usage(request)}


def stream_chunks(request: Request, events: "queue.Queue[Request]", *, rid: str, created: int, model_name: str,
                  chat: bool, include_usage: bool) -> Iterator[dict]:
    """The streamed objects of one request, each yielded as soon as it can be sent (one SSE event each).

    Chat opens with a role-only delta; each engine update that makes text visible becomes one chunk (updates that
    arrived together are coalesced); a last choice carries the finish reason, then optionally a usage-only chunk.
    """
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: Optional[dict], extra_usage: Optional[dict] = None) -> dict:
        out = {"id": rid, "object": obj, "created": created, "model": model_name,
               "choices": [choice] if choice else []}
        if extra_usage is not None:
            out["usage"] = extra_usage
        return out

    def choice(text: str, finish: Optional[str]) -> dict:
        if chat:
            return {"index": 0, "delta": {} if finish else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if chat:
        yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
    sent = 0
    while True:
        events.get()
        while not events.empty():  # coalesce bursts into one chunk
            events.get_nowait()
        visible = request.stream_text()
        delta = visible[sent:]
        if delta:
            sent = len(visible)
            yield chunk(choice(delta, None))
        if request.done:
            break
    yield chunk(choice("", finish_reason(request)))
    if include_usage:
        yield chunk(None, usage(request))
