"""The inference engine: a static KV cache with one row per running request, and continuous batching.

Every running request owns a cache row and advances at its own position, so requests join and leave between decode
steps without waiting for each other (continuous batching). A step (1) prefills newly admitted requests together
(right-padded, written straight into their rows) and (2) decodes one token for every request already running.
Prompts never see padding and positions always start at 0, so a request produces the same tokens alone or batched.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from qwenlink.errors import QwenlinkError
from qwenlink.inference.cache_budget import kv_bytes_per_token
from qwenlink.inference.greedy_head import ScreenedGreedyHead
from qwenlink.inference.prefill import DEFAULT_PREFILL_CHUNK, check_prefill_chunk, prefill
from qwenlink.inference.prepack import prepack_linears
from qwenlink.inference.sampling import SamplingParams, sample_rows
from qwenlink.models.qwen2 import KVCache, Qwen2Model, local_kv_heads

Tensor = torch.Tensor
_ids = itertools.count()


@dataclass
class Request:
    """One generation: its prompt, how to sample, and (filled in by the engine) its output."""

    prompt: list[int]
    params: SamplingParams
    decode: Optional[Callable[[list[int]], str]] = None  # needed for stop strings and streamed text
    on_update: Optional[Callable[["Request"], None]] = None  # called after each new token and at the end
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decoded output, cut before a stop string when one matched
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    row: int = -1
    next_slot: int = 0
    generator: Optional[torch.Generator] = None
    first_token_time: Optional[float] = None
    submit_time: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def stream_text(self) -> str:
        """The part of `text` that can be shown now: without a trailing partial UTF-8 character and, while still
        running, without a tail that could be the start of a stop string."""
        text = self.text
        if self.done:
            return text
        while text.endswith("\ufffd"):
            text = text[:-1]
        for stop in self.params.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text


@dataclass
class EngineStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0  # compiling the decode step (compile=True), before the first prefill
    prompt_tokens: int = 0
    generated_tokens: int = 0
    screened_tokens: int = 0  # greedy tokens chosen from the int8 head copy (greedy_head.py), not the full head
    decode_steps: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class Engine:
    """Runs requests on a model with a fixed number of cache rows (max_batch) of max_length slots each.

    The cache takes max_batch x max_length x `kv_bytes_per_token` bytes whatever the requests' lengths; a server sizes
    it to its memory first (inference/cache_budget.py, `allocate(rows)`)."""

    def __init__(self, model: Qwen2Model, *, max_batch: int = 8, max_length: Optional[int] = None,
                 prepack: bool = True, compile: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        """prefill_chunk: prompt tokens one prefill forward takes (inference/prefill.py); longer prompts are written
        into the cache chunk by chunk, with the same result.
        prepack: on CPU, swap the model's linear layers for oneDNN-prepacked ones (inference/prepack.py; faster
        decoding for twice the linear weights' memory) and choose greedy tokens from an int8 copy of the head with
        an exact re-check of the candidates (inference/greedy_head.py; a quarter (fp32) or half (bf16) of the head's
        memory). The model's parameters and state dict are unchanged.
        compile: decode with a compiled step (inference/compiled.py; compiled when the first step
        allocates the cache, and it packs the layers' weights itself, so only the head is prepacked)."""
        self.model = model.eval()
        param = next(model.parameters())
        if compile and hasattr(param, "to_local"):
            raise QwenlinkError("compiled decoding does not support tensor-parallel (sharded) models yet")
        param = param.to_local() if hasattr(param, "to_local") else param
        if compile and model.config.is_moe and param.dtype != torch.bfloat16:
            # A compiled step cannot read per-expert token counts on the host, so its experts run as one grouped
            # GEMM, which torch compiles for bf16 only.
            raise QwenlinkError(f"--compile: a mixture-of-experts model compiles its decode step in bf16 only (this "
                                f"one is {str(param.dtype).replace('torch.', '')}); add --dtype bf16 or drop --compile")
        self.device, self.dtype = param.device, param.dtype
        self.compile = compile
        self._decode_step: Optional[Callable[[Tensor, Tensor, int], Tensor]] = None
        self._screen: Optional[ScreenedGreedyHead] = None
        if prepack and self.device.type == "cpu":
            # The compiled step stops before the head (inductor packs what it compiles), so the head is packed here.
            prepack_linears(model, batch_hint=max_batch, only={"lm_head"} if compile else None)
            self._screen = ScreenedGreedyHead.create(model.lm_head, batch_hint=max_batch)
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        self.max_batch = max_batch
        self.max_length = max_length or model.config.max_position_embeddings
        self.cache: Optional[KVCache] = None  # allocated on first use
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # row -> request
        self.stats = EngineStats()

    # ---- the cache ------------------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes a token's keys and values take in this process's cache (its share of the heads under TP)."""
        return kv_bytes_per_token(self.model.config, self.dtype, kv_heads=local_kv_heads(self.model),
                                  layers=len(self.model.layers))

    @property
    def cache_bytes(self) -> int:
        """The cache's size: max_batch rows x max_length slots x bytes a token."""
        return self.max_batch * self.max_length * self.kv_bytes_per_token

    @torch.inference_mode()
    def allocate(self, rows: Optional[int] = None) -> None:
        """Allocate the cache now (otherwise the first step does), with `rows` rows instead of max_batch when given
        (a server sizes it to its memory, cache_budget.py). A compiled decode step is still compiled by the first
        step, in the thread that steps (CUDA graph trees are per thread)."""
        if self.cache is not None:
            if rows is not None and rows != self.max_batch:
                raise QwenlinkError(f"the KV cache is already allocated with {self.max_batch} rows")
            return
        if rows is not None:
            if rows < 1:
                raise QwenlinkError(f"the KV cache needs at least one row, got {rows}")
            self.max_batch = rows
        self.cache = KVCache(self.model.config, self.max_batch, self.max_length, dtype=self.dtype,
                             device=self.device, layer_ids=list(self.model.layers.keys()),
                             num_kv_heads=local_kv_heads(self.model))

    def reserve(self, max_length: int) -> None:
        """Make the cache rows `max_length` slots when they are shorter, so a caller that learns its requests late
        (lm-eval's generate_until) sizes the cache to them rather than to the model's max positions. Only between
        runs (no request waiting or running) and without a compiled step, which holds the cache it was built on."""
        if max_length <= self.max_length and (self.cache is not None or max_length == self.max_length):
            return
        if self.busy or self._decode_step is not None:
            raise QwenlinkError("the KV cache can only be resized while the engine is idle and not compiled")
        self.max_length, self.cache = max_length, None  # allocated again by the next step

    # ---- admission ------------------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Refuse what can never run (too long for a cache row), with a message fit for an API error."""
        request.params.validate()
        if not request.prompt:
            raise QwenlinkError("the prompt is empty")
        need = len(request.prompt) + request.params.max_new_tokens
        if need > self.max_length:
            raise QwenlinkError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.params.max_new_tokens}) "
                                f"= {need} exceeds the context length {self.max_length}")
        vocab = self.model.config.vocab_size
        if max(request.prompt) >= vocab or min(request.prompt) < 0:
            raise QwenlinkError(f"prompt token ids must be in [0, {vocab})")

    def submit(self, request: Request) -> Request:
        self.check(request)
        if request.params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Stop a request (e.g. its client went away) and free its row."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request.row >= 0 and self.running.get(request.row) is request:
            del self.running[request.row]
        if not request.done:
            request.finish_reason = "abort"

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- stepping -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit and prefill waiting requests, then decode one token for the others. Returns requests that ended."""
        if self.cache is None:
            self.allocate()
        if self.compile and self._decode_step is None:
            self._compile_decode_step()
        finished: list[Request] = []
        decoding = list(self.running.values())
        free_rows = [r for r in range(self.max_batch) if r not in self.running]
        admitted = []
        while self.waiting and free_rows:
            request = self.waiting.popleft()
            request.row = free_rows.pop(0)
            self.running[request.row] = request
            admitted.append(request)
        if admitted:
            finished += self._prefill(admitted)
        if decoding:
            finished += self._decode(decoding)
        return finished

    def _prefill(self, requests: list[Request]) -> list[Request]:
        start = time.perf_counter()
        # Chunk by chunk (inference/prefill.py): a 32K prompt never holds an [L, L] buffer or L tokens' activations.
        hidden = prefill(self.model, [r.prompt for r in requests], self.cache, [r.row for r in requests],
                         chunk=self.prefill_chunk)  # [b, H]
        for r in requests:
            r.next_slot = len(r.prompt)
        finished = self._append(requests, hidden)
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.prompt_tokens += sum(len(r.prompt) for r in requests)
        return finished

    def _decode(self, requests: list[Request]) -> list[Request]:
        start = time.perf_counter()
        if self._decode_step is not None:
            hidden = self._decode_static(requests)
        else:
            tokens = torch.tensor([[r.tokens[-1]] for r in requests], device=self.device)  # [b, 1]
            slots = torch.tensor([[r.next_slot] for r in requests], device=self.device)  # [b, 1]
            rows_list = [r.row for r in requests]
            rows = None if rows_list == list(range(self.max_batch)) else torch.tensor(rows_list, device=self.device)
            hidden = self.model(tokens, kv_cache=self.cache, cache_positions=slots, cache_rows=rows,
                                apply_head=False)[:, -1]  # [b, H]
        for r in requests:
            r.next_slot += 1
        finished = self._append(requests, hidden)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_steps += 1
        return finished

    def _compile_decode_step(self) -> None:
        """Compile the static decode step now (an all-idle step), so compilation is not counted as decoding."""
        from qwenlink.inference.compiled import compile_decode_step

        start = time.perf_counter()
        self._decode_step = compile_decode_step(self.model, self.cache)
        self._decode_static([])
        self.stats.compile_seconds += time.perf_counter() - start

    def _decode_static(self, requests: list[Request]) -> Tensor:
        """One compiled step over every cache row; idle rows feed token 0 at the never-used last slot."""
        tokens = [0] * self.max_batch
        slots = [self.max_length - 1] * self.max_batch
        for r in requests:
            tokens[r.row], slots[r.row] = r.tokens[-1], r.next_slot
        span = max((r.next_slot + 1 for r in requests), default=self.max_length // 2)
        hidden = self._decode_step(torch.tensor(tokens, device=self.device)[:, None],
                                   torch.tensor(slots, device=self.device)[:, None], span)  # [max_batch, H]
        return hidden[torch.tensor([r.row for r in requests], dtype=torch.long, device=self.device)]  # [b, H]

    def _choose(self, requests: list[Request], hidden: Tensor) -> tuple[list[int], dict[int, float]]:
        """Each request's next token (and its log-prob where asked) from the final hidden states [b, H]."""
        params = [r.params for r in requests]
        if self._screen is not None and all(p.greedy and not p.logprobs and p.repetition_penalty == 1.0
                                            for p in params):
            chosen = self._screen.argmax(hidden)  # reads the int8 head; None if it cannot narrow the choice
            if chosen is not None:
                self.stats.screened_tokens += len(chosen)
                return chosen, {}
        logits = self.model.lm_head(hidden)  # [b, V]
        seen = [r.prompt + r.tokens if r.params.repetition_penalty != 1.0 else () for r in requests]
        chosen = sample_rows(logits, params, [r.generator for r in requests], seen)
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs]
        logprobs = {}
        if want_logprobs:
            lp = torch.log_softmax(logits[want_logprobs].float(), dim=-1)
            logprobs = {i: float(lp[j, chosen[i]]) for j, i in enumerate(want_logprobs)}
        return chosen, logprobs

    def _append(self, requests: list[Request], hidden: Tensor) -> list[Request]:
        """Choose each request's next token, record it, and end the requests that are complete."""
        chosen, logprobs = self._choose(requests, hidden)
        now = time.perf_counter()
        finished = []
        for i, r in enumerate(requests):
            token = chosen[i]
            r.tokens.append(token)
            if r.first_token_time is None:
                r.first_token_time = now
            if i in logprobs:
                r.logprobs.append(logprobs[i])
            self.stats.generated_tokens += 1
            self._update_text_and_finish(r, token)
            if r.done:
                del self.running[r.row]
                finished.append(r)
            if r.on_update is not None:
                r.on_update(r)
        return finished

    def _update_text_and_finish(self, r: Request, token: int) -> None:
        params = r.params
        if token in params.stop_ids:
            r.finish_reason = "stop"
            if r.decode is not None:
                r.text = r.decode(r.tokens[:-1])
            return
        if r.decode is not None:
            r.text = r.decode(r.tokens)
            if params.stop_strings:
                hits = [(r.text.find(s), s) for s in params.stop_strings if s in r.text]
                if hits:
                    r.text = r.text[:min(hits)[0]]
                    r.finish_reason = "stop"
                    return
        # Ending a request before its next slot is the last one keeps that slot unused by every request, which the
        # compiled decode step relies on (idle rows write there).
        if len(r.tokens) >= params.max_new_tokens or r.next_slot + 1 >= self.max_length:
            r.finish_reason = "length"

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submit requests and step until all of them have ended (offline batch generation)."""
        for request in requests:
            self.submit(request)
        while any(not r.done for r in requests):
            self.step()
        return list(requests)
