"""The OpenAI API layer of the server: request bodies in, response objects and OpenAI errors out; no sockets.

Why a module of its own: what the OpenAI protocol says (which fields are valid, what each error looks like, what a
completion or a streamed chunk holds) is a different concern from how bytes travel (server.py). Kept free of I/O, every
validation rule and every response shape can be tested by calling functions, and the HTTP handler stays a thin pipe.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with these statuses: 400 malformed JSON or
a body that is not an object; 401 missing or wrong API key; 404 unknown model; 413 prompt beyond the server's limit, or
prompt + max_tokens beyond the context; 422 a field outside the request schema (openai_schema.py, naming the field);
500 the engine failed the request.
"""

from __future__ import annotations

import json
import queue
import secrets
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

from qwenlink.errors import QwenlinkError
from qwenlink.inference.api_error import ApiError
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.openai_schema import CheckedRequest, check_request
from qwenlink.inference.sampling import SamplingParams
from qwenlink.tokenizer import Tokenizer


@dataclass
class ServerLimits:
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 8192
    max_concurrent: int = 64  # requests in flight (running + queued) before 429
    max_body_bytes: int = 1 << 20
    read_timeout: float = 30.0  # seconds a client may stall mid-request before a 408 and a closed connection
    default_max_tokens: int = 256
    # The engine's context (prompt + completion tokens); a request that omits max_tokens gets at most the room its
    # prompt leaves in it, as OpenAI's and vLLM's servers do (None: no such cut).
    context: Optional[int] = None


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


def check_api_key_setting(api_key: Optional[str]) -> None:
    """Refuse, at start-up, a key no client could ever send: HTTP header values are ISO-8859-1 and clients send
    ASCII, so a key with other characters (or control characters, or surrounding spaces) would lock everyone out."""
    if api_key is None:
        return
    if not api_key:
        raise QwenlinkError("--api-key / QWENLINK_API_KEY is empty; unset it to serve without a key")
    bad = next((c for c in api_key if not " " < c < "\x7f"), None)
    if bad is not None:
        raise QwenlinkError(f"--api-key / QWENLINK_API_KEY holds {bad!r} (U+{ord(bad):04X}); an API key must be "
                            f"printable ASCII without spaces, as HTTP clients send it in the Authorization header")


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object; anything else is a 400 (the client sent something that is not a request)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object")
    return body


def sampling_from_request(checked: CheckedRequest, tokenizer: Tokenizer, limits: ServerLimits) -> SamplingParams:
    """A schema-checked request -> SamplingParams (plus qwenlink's top_k and repetition_penalty extensions)."""
    max_tokens = checked.max_tokens
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    elif max_tokens > limits.max_tokens:
        raise ApiError(422, f"'max_tokens' is {max_tokens}, above this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=checked.temperature, top_p=checked.top_p, top_k=checked.top_k,
        repetition_penalty=checked.repetition_penalty, seed=checked.seed, stop_ids=frozenset(tokenizer.stop_ids()),
        stop_strings=checked.stop, logprobs=checked.logprobs)


def prompt_from_request(checked: CheckedRequest, tokenizer: Tokenizer, limits: ServerLimits) -> list[int]:
    """The prompt's token ids: chat messages through the chat template, or a completion prompt (text or ids)."""
    if checked.chat:
        ids = tokenizer.encode(tokenizer.apply_chat_template(checked.messages))
    elif isinstance(checked.prompt, str):
        ids = tokenizer.encode(checked.prompt)
    else:
        ids = list(checked.prompt)
    if not ids:
        raise ApiError(422, "'prompt' is empty after tokenisation", param="prompt")
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
    """Check a request body against the schema (openai_schema.py), then the model, the server's limits and the
    prompt, into a CompletionCall."""
    checked = check_request(body, chat=chat)
    if checked.model is not None and checked.model != model_name:
        raise ApiError(404, f"model {checked.model!r} not found (this server serves {model_name!r})",
                       param="model", code="model_not_found")
    params = sampling_from_request(checked, tokenizer, limits)
    prompt = prompt_from_request(checked, tokenizer, limits)
    if checked.max_tokens is None and limits.context is not None \
            and 1 <= limits.context - len(prompt) < params.max_new_tokens:
        params = replace(params, max_new_tokens=limits.context - len(prompt))
    return CompletionCall(chat, prompt, params, checked.stream, checked.include_usage)


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
    A request the engine failed ends with one OpenAI error object ({"error": {...}}, which OpenAI's clients raise).
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
        if request.finish_reason == "error":  # the engine failed it: an error event, never the message as text
            yield ApiError(500, request.text, kind="server_error").body()
            return
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
