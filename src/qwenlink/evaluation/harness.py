"""Log-likelihood of continuations given contexts, computed the way lm-evaluation-harness computes it.

Why it is built like this: accuracy numbers are only comparable with published ones (and with lm-eval runs) when every
step that can move a score is the same as lm-eval 0.4's `HFLM.loglikelihood`:

* tokenisation (`encode_pair`): trailing whitespace of the context is moved to the front of the continuation; then
  `context + continuation` is encoded as one string and the context is encoded alone, and the continuation tokens are
  the whole encoding minus the first len(context tokens) ids. (Encoding the two parts separately gives different ids
  whenever BPE merges across the boundary.) An empty context is replaced by the prefix token (bos, else eos).
* truncation: the model input is `(context + continuation)[-(max_length + 1):][:-1]`, i.e. cut from the left.
* score: sum of the log-softmax of the continuation tokens; `is_greedy` is whether every continuation token is the
  argmax at its position.

What is ours is only how the forward passes are arranged, which does not change the numbers beyond float rounding:
requests whose model input is identical (the 4 one-token answers " A".." D" of a question) share one forward pass;
inputs are sorted so that prompts sharing a few-shot prefix sit together, and a batch's common prefix is run once and
kept as a KV cache for the next batches that start with it; the remaining suffixes are left-padded so that every row
ends at the last position and only the logits of the last few positions are computed (the LM head over a 152k
vocabulary is most of the cost on small models).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from qwenlink.inference.prefill import DEFAULT_PREFILL_CHUNK, check_prefill_chunk, prefill
from qwenlink.models.qwen2 import KVCache, Qwen2Model, local_kv_heads

Tensor = torch.Tensor


class TextEncoder(Protocol):
    """What the harness needs of a tokenizer (qwenlink.tokenizer.Tokenizer satisfies it)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair to score, as in lm-eval's `loglikelihood` requests."""

    context: str
    continuation: str


@dataclass(frozen=True)
class TokenRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(continuation token) over the continuation
    is_greedy: bool  # every continuation token is the model's argmax


@dataclass
class ScoringStats:
    """How much work a scoring run did (for the report's timing section and the throughput figure)."""

    requests: int = 0
    forward_rows: int = 0  # distinct model inputs actually run
    tokens: int = 0  # input tokens fed to the model (prefix-cache hits not counted)
    prefix_tokens_reused: int = 0
    seconds: float = 0.0  # model work (loglikelihood_tokens)
    tokenize_seconds: float = 0.0
    batches: int = 0


def encode_pair(tokenizer: TextEncoder, context: str, continuation: str, *, prefix_token_id: Optional[int]
                ) -> TokenRequest:
    """Token ids of (context, continuation) exactly as lm-eval's causal-LM `_encode_pair` / `loglikelihood` make them."""
    return encode_pairs(tokenizer, [(context, continuation)], prefix_token_id=prefix_token_id)[0]


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the front of the continuation before encoding."""
    stripped = context.rstrip()
    if len(stripped) != len(context):
        return stripped, context[len(stripped):] + continuation
    return context, continuation


def encode_pairs(tokenizer: TextEncoder, pairs: Sequence[tuple[str, str]], *, prefix_token_id: Optional[int]
                 ) -> list[TokenRequest]:
    """`encode_pair` for many pairs: each distinct string is encoded once.

    Multiple-choice requests repeat their context (4 pairs per question), so this halves the encoding work without
    changing any id: the strings encoded are exactly the ones lm-eval encodes.
    """
    moved = [_move_trailing_space(c, x) if c else (c, x) for c, x in pairs]
    texts: dict[str, None] = {}
    for context, continuation in moved:
        if context:
            texts[context] = None
            texts[context + continuation] = None
        else:
            texts[continuation] = None
    # One string at a time: `encode_batch`'s thread pool was slower than this on a busy 2-core machine.
    ids = {t: tokenizer.encode(t) for t in texts}
    out = []
    for context, continuation in moved:
        if not context:  # lm-eval conditions an empty context on the prefix token (bos, else eos)
            cont = ids[continuation]
            if prefix_token_id is None:
                raise ValueError("an empty context needs a prefix token (bos or eos) to condition on")
            if cont and cont[0] == prefix_token_id:
                out.append(TokenRequest(tuple(cont[:1]), tuple(cont[1:])))
            else:
                out.append(TokenRequest((prefix_token_id,), tuple(cont)))
            continue
        ctx = ids[context]
        out.append(TokenRequest(tuple(ctx), tuple(ids[context + continuation][len(ctx):])))
    return out


def model_input(req: TokenRequest, max_length: int) -> tuple[int, ...]:
    """The ids fed to the model: context + continuation minus its last token, left-truncated to max_length."""
    return (req.context + req.continuation)[-(max_length + 1):][:-1]


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


@dataclass
class _PrefixCache:
    """The KV cache of one token prefix (batch 1), reused while consecutive batches start with it."""

    tokens: tuple[int, ...] = ()
    keys: dict[str, Tensor] = field(default_factory=dict)  # layer -> [1, Hkv, P, D]
    values: dict[str, Tensor] = field(default_factory=dict)


class LoglikelihoodScorer:
    """Scores lm-eval-style loglikelihood requests with a qwenlink model.

    padding_side "left" (default) right-aligns every row so only the last positions' logits are computed and the
    few-shot prefix can be cached; "right" reproduces lm-eval's own layout (right padding, full logits) for checking.
    prefill_chunk: in the left layout, inputs (and cached prefixes) longer than this run through a KV cache this many
    positions at a time, so a long-context prompt (up to the model's 32K positions) never builds an [L, L] mask; the
    scores are the one-shot forward's up to float rounding. The right layout is not chunked (it computes [L, vocab]
    logits anyway).
    """

    def __init__(self, model: Qwen2Model, tokenizer: TextEncoder, *, batch_size: int = 8,
                 max_length: Optional[int] = None, prefix_token_id: Optional[int] = None,
                 padding_side: str = "left", share_prefix: bool = True, min_prefix: int = 16,
                 progress: Optional[Callable[[int, int], None]] = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.prefix_token_id = prefix_token_id
        self.padding_side = padding_side
        self.share_prefix = share_prefix and padding_side == "left"
        self.min_prefix = min_prefix  # shorter shared prefixes are not worth a cache
        self.progress = progress
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        self.stats = ScoringStats()
        self._prefix = _PrefixCache()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- public API -------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Request]) -> list[Score]:
        """Scores in request order."""
        start = time.perf_counter()
        tokenized = encode_pairs(self.tokenizer, [(r.context, r.continuation) for r in requests],
                                 prefix_token_id=self.prefix_token_id)
        self.stats.tokenize_seconds += time.perf_counter() - start
        return self.loglikelihood_tokens(tokenized)

    @torch.no_grad()
    def loglikelihood_tokens(self, requests: Sequence[TokenRequest]) -> list[Score]:
        start = time.perf_counter()
        for r in requests:
            if not r.context or not r.continuation:
                raise ValueError("every request needs a non-empty context and continuation")
            if len(r.continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(r.continuation)} tokens exceeds max_length {self.max_length}")
        # One forward row per distinct model input; each request reads its positions from that row.
        rows: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            rows.setdefault(model_input(r, self.max_length), []).append(i)
        # Lexicographic order puts prompts with the same few-shot prefix next to each other.
        order = sorted(rows)
        results: list[Optional[Score]] = [None] * len(requests)
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                need = [max(len(requests[i].continuation) for i in rows[inp]) for inp in batch]
                logprobs = self._forward(batch, need)  # per row: [need, V] log-probs of the last `need` positions
                for inp, lp in zip(batch, logprobs):
                    for i in rows[inp]:
                        cont = torch.tensor(requests[i].continuation, device=lp.device)
                        picked = lp[-len(cont):]  # [C, V]
                        token_lp = picked.gather(-1, cont[:, None]).squeeze(-1)
                        greedy = bool((picked.argmax(-1) == cont).all())
                        results[i] = Score(float(token_lp.sum()), greedy)
                self.stats.batches += 1
                if self.progress is not None:
                    self.progress(min(b + self.batch_size, len(order)), len(order))
        finally:
            self.model.train(was_training)
        self.stats.requests += len(requests)
        self.stats.forward_rows += len(order)
        self.stats.seconds += time.perf_counter() - start
        return [r for r in results if r is not None]

    # ---- forward passes ---------------------------------------------------------------------------------------------
    def _forward(self, batch: list[tuple[int, ...]], need: list[int]) -> list[Tensor]:
        if self.padding_side == "right":
            return self._forward_right(batch, need)
        prefix_len = 0
        if self.share_prefix:
            # The prefix must leave every row's scored positions (and at least one token) in the suffix.
            limit = min(len(inp) - n for inp, n in zip(batch, need))
            prefix_len = min(_common_prefix_length(batch), limit)
            # Prefer the cached prefix when this batch shares a worthwhile part of it (no recomputation).
            reuse = _common_prefix_length([self._prefix.tokens, batch[0][:prefix_len]]) if self._prefix.tokens else 0
            if reuse >= self.min_prefix:
                prefix_len = reuse
            elif prefix_len < self.min_prefix:
                prefix_len = 0
        return self._forward_left(batch, need, prefix_len)

    def _forward_right(self, batch: list[tuple[int, ...]], need: list[int]) -> list[Tensor]:
        """lm-eval's layout: right-padded rows, logits everywhere, each row's positions sliced out."""
        width = max(len(x) for x in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for r, inp in enumerate(batch):
            ids[r, :len(inp)] = torch.tensor(inp)
        logits = self.model(ids.to(self.device))  # [B, T, V]; causal, so right padding is invisible to real tokens
        self.stats.tokens += sum(len(x) for x in batch)
        return [torch.log_softmax(logits[r, len(inp) - n:len(inp)].float(), dim=-1)
                for r, (inp, n) in enumerate(zip(batch, need))]

    def _forward_left(self, batch: list[tuple[int, ...]], need: list[int], prefix_len: int) -> list[Tensor]:
        """Rows laid out as [shared prefix (cached)] [pads] [suffix]; every suffix ends at the last position."""
        device = self.device
        suffixes = [inp[prefix_len:] for inp in batch]
        width = max(len(s) for s in suffixes)
        bsz = len(batch)
        ids = torch.zeros(bsz, width, dtype=torch.long)
        real = torch.zeros(bsz, prefix_len + width, dtype=torch.bool)
        real[:, :prefix_len] = True
        positions = torch.zeros(bsz, width, dtype=torch.long)
        for r, s in enumerate(suffixes):
            pad = width - len(s)
            ids[r, pad:] = torch.tensor(s)
            real[r, prefix_len + pad:] = True
            positions[r, pad:] = torch.arange(prefix_len, prefix_len + len(s))
        keep = max(need)
        kv_cache = None
        if prefix_len:
            kv_cache = self._kv_for_prefix(batch[0][:prefix_len], bsz, prefix_len + width)
        if width <= self.prefill_chunk:
            logits = self.model(ids.to(device), position_ids=positions.to(device), attention_mask=real.to(device),
                                kv_cache=kv_cache, cache_start=prefix_len, logits_to_keep=keep)  # [B, keep, V]
        else:
            if kv_cache is None:
                kv_cache = KVCache(self.model.config, bsz, width, dtype=self._dtype(), device=device,
                                   layer_ids=list(self.model.layers), num_kv_heads=local_kv_heads(self.model))
            logits = self._chunked_suffix(ids, positions, real, kv_cache, prefix_len, keep)
        self.stats.tokens += sum(len(s) for s in suffixes)
        self.stats.prefix_tokens_reused += prefix_len * bsz
        return [torch.log_softmax(logits[r, keep - n:].float(), dim=-1) for r, n in enumerate(need)]

    def _chunked_suffix(self, ids: Tensor, positions: Tensor, real: Tensor, kv_cache: KVCache, prefix_len: int,
                        keep: int) -> Tensor:
        """The left-padded suffixes [B, W] through the cache `prefill_chunk` positions at a time: each chunk's mask
        is [B, 1, chunk, prefix + end] (its queries over the keys so far), never [W, W]. Returns the logits of the
        last `keep` positions [B, keep, V], as the one-shot forward does."""
        device, width = self.device, ids.shape[1]
        real = real.to(device)
        kept = []  # final-normed hidden states of the last `keep` positions, chunk by chunk: [B, k, H]
        for s in range(0, width, self.prefill_chunk):
            e = min(s + self.prefill_chunk, width)
            want = e - max(s, width - keep)  # this chunk's positions among the last `keep`
            hidden = self.model(ids[:, s:e].to(device), position_ids=positions[:, s:e].to(device),
                                attention_mask=real, kv_cache=kv_cache, cache_start=prefix_len + s,
                                logits_to_keep=max(want, 1), apply_head=False)  # [B, k, H]
            if want > 0:
                kept.append(hidden)
        return self.model.lm_head(torch.cat(kept, dim=1))  # [B, keep, V]

    def _kv_for_prefix(self, prefix: tuple[int, ...], bsz: int, total: int) -> KVCache:
        """A batch-`bsz` KV cache whose first len(prefix) slots hold the prefix (computed once per distinct prefix)."""
        model = self.model
        p = len(prefix)
        cached = self._prefix
        if cached.tokens[:p] != prefix or len(cached.tokens) < p:
            one = KVCache(model.config, 1, p, dtype=self._dtype(), device=self.device, layer_ids=list(model.layers),
                          num_kv_heads=local_kv_heads(model))
            prefill(model, [prefix], one, [0], chunk=self.prefill_chunk)
            self.stats.tokens += p
            self._prefix = cached = _PrefixCache(prefix, {k: v[:, :, :p] for k, v in one.keys.items()},
                                                 {k: v[:, :, :p] for k, v in one.values.items()})
        cache = KVCache(model.config, bsz, total, dtype=self._dtype(), device=self.device,
                        num_kv_heads=local_kv_heads(model),
                        layer_ids=list(model.layers))
        for layer_id in cache.keys:
            cache.keys[layer_id][:, :, :p] = cached.keys[layer_id][:, :, :p]
            cache.values[layer_id][:, :, :p] = cached.values[layer_id][:, :, :p]
        cache.length = p
        return cache

    def _dtype(self) -> torch.dtype:
        param = next(self.model.parameters())
        return (param.to_local() if hasattr(param, "to_local") else param).dtype
