"""The OpenAI request schema, checked in one place: every field a client sends is typed, bounded and normalised here.

Why one layer: a value the schema lets through reaches the tokenizer, torch or the engine thread, where a wrong type, a
NaN, an integer beyond int64 or a lone UTF-16 surrogate becomes an exception far from the request (a 500, or a
stream that sends the exception as text). Checking the whole body before anything else runs turns each of those into
a 422 whose `param` and message name the exact field (`messages[1].content[0].text`), and leaves the rest of the
server free to trust its inputs. Fields the server does not use are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from qwenlink.inference.api_error import ApiError

INT64_MAX = 2**63 - 1
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes any unsigned 64-bit value
TOKEN_ID_MAX = 2**31 - 1
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class CheckedRequest:
    """A request body that passed the schema: plain Python values of the right types and ranges."""

    chat: bool
    model: Optional[str]
    messages: Optional[list[dict[str, str]]]  # chat: [{"role", "content"}], content parts joined
    prompt: Optional[Union[str, list[int]]]  # completions: one text or one list of token ids
    max_tokens: Optional[int]  # max_completion_tokens (chat) wins over max_tokens; None: omitted
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: Optional[int]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    n: int


def _refuse(field: str, problem: str) -> ApiError:
    return ApiError(422, f"'{field}' {problem}", param=field)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_text(value: Any, field: str, *, allow_empty: bool = True) -> str:
    """A JSON string that is valid Unicode (JSON escapes can carry a lone surrogate, which no tokenizer encodes)."""
    if not isinstance(value, str):
        raise _refuse(field, f"must be a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _refuse(field, f"is not valid Unicode (a lone surrogate \\u{ord(value[exc.start]):04x} at character "
                             f"{exc.start})") from None
    if not allow_empty and not value:
        raise _refuse(field, "must not be empty")
    return value


def check_integer(value: Any, field: str, *, low: int, high: int) -> int:
    """A JSON integer within [low, high] (booleans and floats such as 1.0 or 1e400 are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(field, f"must be an integer, got {_type_name(value)}")
    if not low <= value <= high:
        raise _refuse(field, f"must be in [{low}, {high}], got {value}")
    return value


def check_number(value: Any, field: str, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """A finite JSON number within its range (Python's JSON reader accepts NaN, Infinity and 1e400 = inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(field, f"must be a number, got {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        raise _refuse(field, f"must be a finite number, got {value}") from None
    if not math.isfinite(number):
        raise _refuse(field, f"must be a finite number, got {value}")
    if number < low or (low_open and number == low):
        raise _refuse(field, f"must be {'>' if low_open else '>='} {low}, got {value}")
    if number > high:
        raise _refuse(field, f"must be <= {high}, got {value}")
    return number


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(field, f"must be true or false, got {_type_name(value)}")
    return value


def _optional(body: dict, name: str, check, **bounds) -> Any:
    value = body.get(name)
    return None if value is None else check(value, name, **bounds)


def _content(value: Any, field: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": str} parts (joined)."""
    if isinstance(value, str):
        return check_text(value, field)
    if not isinstance(value, list):
        raise _refuse(field, f"must be a string or a list of text parts, got {_type_name(value)}")
    texts = []
    for j, part in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise _refuse(where, f"must be an object, got {_type_name(part)}")
        if part.get("type") != "text":
            raise _refuse(f"{where}.type", f"must be 'text' (only text parts are supported), got {part.get('type')!r}")
        texts.append(check_text(part.get("text"), f"{where}.text"))
    return "".join(texts)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _refuse("messages", f"must be a non-empty list, got {_type_name(value) if value != [] else 'empty'}")
    clean = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _refuse(where, f"must be an object, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise _refuse(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        clean.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return clean


def _prompt(value: Any) -> Union[str, list[int]]:
    """One completion prompt: a string, a one-string list, or a non-empty list of token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return check_text(value[0], "prompt[0]", allow_empty=False)
    if isinstance(value, str):
        return check_text(value, "prompt", allow_empty=False)
    if isinstance(value, list) and value and not any(isinstance(t, str) for t in value):
        return [check_integer(t, f"prompt[{i}]", low=0, high=TOKEN_ID_MAX) for i, t in enumerate(value)]
    if value == []:
        raise _refuse("prompt", "is empty")
    raise _refuse("prompt", f"must be a string or a list of token ids (one prompt per request), got "
                            f"{_type_name(value)}")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (check_text(value, "stop", allow_empty=False),)
    if not isinstance(value, list) or len(value) > 4:
        raise _refuse("stop", "must be a string or a list of at most 4 strings")
    return tuple(check_text(s, f"stop[{i}]", allow_empty=False) for i, s in enumerate(value))


def _stream_options(value: Any, stream: bool) -> bool:
    """stream_options: null or {"include_usage": bool}; only a stream reports usage in its own chunk."""
    if value is None:
        return False
    if not isinstance(value, dict):
        raise _refuse("stream_options", f"must be an object, got {_type_name(value)}")
    include = value.get("include_usage")
    include = False if include is None else check_bool(include, "stream_options.include_usage")
    return stream and include


def check_request(body: dict, *, chat: bool) -> CheckedRequest:
    """Check a /v1/chat/completions (chat) or /v1/completions body against the schema; 422 naming the field."""
    model = _optional(body, "model", check_text)
    if chat:
        if "messages" not in body:
            raise _refuse("messages", "is required")
        messages, prompt = _messages(body["messages"]), None
    else:
        if body.get("prompt") is None:
            raise _refuse("prompt", "is required (a string or a list of token ids)")
        messages, prompt = None, _prompt(body["prompt"])
    max_tokens = _optional(body, "max_tokens", check_integer, low=1, high=INT64_MAX)
    if chat:
        completion = _optional(body, "max_completion_tokens", check_integer, low=1, high=INT64_MAX)
        max_tokens = completion if completion is not None else max_tokens
    for unsupported in ("presence_penalty", "frequency_penalty"):
        value = _optional(body, unsupported, check_number, low=-2.0, high=2.0)
        if value not in (None, 0.0):
            raise _refuse(unsupported, "is not supported (use 'repetition_penalty')")
    n = _optional(body, "n", check_integer, low=1, high=INT64_MAX)
    if n not in (None, 1):
        raise _refuse("n", f"must be 1 (only one choice per request is supported), got {n}")
    if chat:
        logprobs = bool(_optional(body, "logprobs", check_bool))
    else:
        logprobs = _optional(body, "logprobs", check_integer, low=0, high=5) is not None
    stream = bool(_optional(body, "stream", check_bool))
    temperature = _optional(body, "temperature", check_number, low=0.0, high=2.0)
    top_p = _optional(body, "top_p", check_number, low=0.0, high=1.0, low_open=True)
    top_k = _optional(body, "top_k", check_integer, low=0, high=TOKEN_ID_MAX)
    penalty = _optional(body, "repetition_penalty", check_number, low=0.0, high=1e6, low_open=True)
    return CheckedRequest(
        chat=chat, model=model, messages=messages, prompt=prompt, max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0, repetition_penalty=1.0 if penalty is None else penalty,
        seed=_optional(body, "seed", check_integer, low=0, high=SEED_MAX), stop=_stop(body.get("stop")),
        stream=stream, include_usage=_stream_options(body.get("stream_options"), stream), logprobs=logprobs,
        n=1)
