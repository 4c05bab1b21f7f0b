"""Long prompts: chunked prefill equals one-shot prefill (logits, cache, greedy tokens, transformers' generate, eval
scores) and never creates an [L, L] tensor.

The model is the tiny HF fixture (hidden 64, 2 layers, GQA 4/2 heads, 4096 positions): a prompt of ~4K tokens is its
"32K", and chunks of 64-512 tokens make many chunks cheaply.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import fixture_dir, run_cli
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.errors import QwenlinkError
from qwenlink.evaluation.harness import LoglikelihoodScorer, TokenRequest
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.generate import SamplingParams, generate
from qwenlink.inference.prefill import prefill
from qwenlink.models.qwen2 import KVCache


FIXTURE = fixture_dir("megatron-core-tiny-qwen2", "hf")


@pytest.fixture(scope="module")
def tiny():
    return load_hf_model(FIXTURE).eval()


@pytest.fixture(scope="module")
def hf():
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(FIXTURE).eval()


def _prompt(n: int, seed: int, vocab: int = 258) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cache(model, rows: int, length: int) -> KVCache:
    return KVCache(model.config, rows, length, dtype=torch.float32, device="cpu", layer_ids=list(model.layers),
                   num_kv_heads=model.config.num_key_value_heads)


@torch.no_grad()
def test_chunked_forward_logits_and_cache_equal_one_shot(tiny):
    """Every position's logits of a prompt run chunk by chunk through the cache (lower-right causal attention over
    the slots so far) equal the cache-free forward of the whole prompt; the cache holds the same keys/values."""
    ids = torch.tensor([_prompt(700, 0)])
    reference = tiny(ids)  # [1, 700, V]
    one_shot = _cache(tiny, 1, 700)
    tiny(ids, kv_cache=one_shot, cache_start=0)
    for chunk in (64, 100):  # dividing and not dividing the prompt
        cache = _cache(tiny, 1, 700)
        logits = torch.cat([tiny(ids[:, s:s + chunk], kv_cache=cache, cache_start=s)
                            for s in range(0, 700, chunk)], dim=1)  # [1, 700, V]
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        for layer in cache.keys:
            torch.testing.assert_close(cache.keys[layer], one_shot.keys[layer], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.values[layer], one_shot.values[layer], rtol=1e-5, atol=1e-5)


def test_batched_prefill_into_scattered_rows_equals_each_alone(tiny):
    """Prompts ending in different chunks, prefilled together into non-consecutive rows (gathered) and consecutive
    rows (read in place), give each prompt's last hidden state and cache row as its one-shot prefill alone."""
    prompts = [_prompt(300, 1), _prompt(70, 2), _prompt(513, 3)]
    alone = []
    for p in prompts:
        cache = _cache(tiny, 1, 513)
        hidden = prefill(tiny, [p], cache, [0], chunk=4096)  # one chunk: the one-shot prefill
        alone.append((hidden[0], cache))
    for rows in ([2, 0, 3], [1, 2, 3]):
        cache = _cache(tiny, 4, 513)
        hidden = prefill(tiny, prompts, cache, rows, chunk=64)  # [3, H]
        for i, (p, row) in enumerate(zip(prompts, rows)):
            ref_hidden, ref_cache = alone[i]
            torch.testing.assert_close(hidden[i], ref_hidden, rtol=1e-5, atol=1e-5)
            for layer in cache.keys:
                torch.testing.assert_close(cache.keys[layer][row, :, :len(p)], ref_cache.keys[layer][0, :, :len(p)],
                                           rtol=1e-5, atol=1e-5)


def test_long_prompts_greedy_equal_transformers_generate(tiny, hf):
    """Prompts filling the model's 4096 positions with the generated tokens, prefilled in chunks of 512 (two long
    ones batched with a short one: rows leave the prefill at different chunks), decode exactly transformers' greedy
    tokens."""
    prompts = [_prompt(4088, 4), _prompt(1500, 5), _prompt(9, 6)]
    refs = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=8,
                        do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    batched, stats = generate(tiny, prompts, SamplingParams(max_new_tokens=8), prefill_chunk=512)
    assert [r.tokens for r in batched] == refs
    assert stats.prompt_tokens == sum(map(len, prompts))


class LargestDims(TorchDispatchMode):
    """Records every tensor an aten op returns with two or more dimensions over `limit` (a vocabulary-sized dimension
    aside: scored continuations' logits are [.., C, V] by definition)."""

    def __init__(self, limit: int, vocab: int = 258) -> None:
        super().__init__()
        self.limit, self.vocab, self.worst = limit, vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                big = [s for s in t.shape if s > self.limit and s != self.vocab]
                if len(big) >= 2:
                    self.worst.append((str(func), tuple(t.shape)))
        return out


def test_no_square_tensor_in_chunked_prefill_or_scoring(tiny):
    """With chunks of 128, no op of a 1024-token prefill (engine) or long-context scoring (eval harness, with and
    without a cached prefix) returns a tensor with two dimensions over 128, i.e. nothing [.., L, L] (or [.., L, S])
    exists; the same detector does see the dense mask of the masked one-shot path."""
    prompt = _prompt(1024, 7)
    engine = Engine(tiny, max_batch=2, max_length=1030, prefill_chunk=128)
    engine.allocate()
    with LargestDims(128) as seen:
        engine.run([Request(prompt, SamplingParams(max_new_tokens=2)), Request(prompt[:700], SamplingParams(
            max_new_tokens=2))])
    assert seen.worst == []
    scorer = LoglikelihoodScorer(tiny, tokenizer=None, batch_size=2, prefill_chunk=128, min_prefix=16)
    requests = [TokenRequest(tuple(prompt[:1000]), (5, 6)), TokenRequest(tuple(prompt[:400] + prompt[500:900]), (7,)),
                TokenRequest((1, 2), tuple(prompt[:300]))]
    with LargestDims(128) as seen:
        scorer.loglikelihood_tokens(requests)
    assert seen.worst == []
    with LargestDims(128) as control, torch.no_grad():
        tiny(torch.tensor([prompt]), attention_mask=torch.ones(1, 1024, dtype=torch.bool), kv_cache=_cache(tiny, 1, 1024))
    assert any(shape[-2:] == (1024, 1024) for _, shape in control.worst)


def test_chunked_scoring_equals_one_shot_and_lm_eval_layout(tiny):
    """Long-context log-likelihoods (shared prefix longer than a chunk, suffixes of different lengths, a
    continuation spanning several chunks) equal the unchunked scorer's and lm-eval's right-padded layout's."""
    base = _prompt(1200, 8)
    requests = [TokenRequest(tuple(base[:900]), tuple(base[900:903])),
                TokenRequest(tuple(base[:700] + base[950:1100]), (11,)),
                TokenRequest(tuple(base[:600]), tuple(base[600:860])),
                TokenRequest((3,) * 5, tuple(base[:40]))]
    chunked = LoglikelihoodScorer(tiny, tokenizer=None, batch_size=4, prefill_chunk=64).loglikelihood_tokens(requests)
    one_shot = LoglikelihoodScorer(tiny, tokenizer=None, batch_size=4).loglikelihood_tokens(requests)
    right = LoglikelihoodScorer(tiny, tokenizer=None, batch_size=4, padding_side="right").loglikelihood_tokens(requests)
    for a, b, c in zip(chunked, one_shot, right):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-4)
        assert a.logprob == pytest.approx(c.logprob, rel=1e-5, abs=1e-4)
        assert a.is_greedy == b.is_greedy == c.is_greedy


def test_generate_cli_long_prompt_with_prefill_chunk_equals_transformers(tmp_path, tiny_fixture_hf, hf):
    """`qwenlink generate --prefill-chunk 256` on a prompt of ~4K tokens (the fixture's whole context) prints
    transformers' greedy continuation."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_fixture_hf)
    words = " ".join(f"item{i % 97} is {i * 7 % 13}" for i in range(3000))
    ids = tok(words)["input_ids"][:4080]
    text = tok.decode(ids)
    assert tok(text)["input_ids"] == ids  # the prompt round-trips, so the CLI sees these ids
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": text}) + "\n")
    result = run_cli("generate", "--model", str(tiny_fixture_hf), "--input", str(src), "--output", str(out),
                     "--greedy", "--max-new-tokens", "6", "--prefill-chunk", "256")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["tokens"] == ref.tolist()


@pytest.mark.parametrize("command", ["generate", "serve", "eval"])
def test_bad_prefill_chunk_is_refused_in_one_line(command, capsys):
    """A chunk of 0 is refused before the model loads (in-process: the same `main` as the command line)."""
    from qwenlink.cli import main

    extra = ["--prompt", "hi"] if command == "generate" else ["--data", "unused"] if command == "eval" else []
    assert main([command, "--model", "no-such-model", *extra, "--prefill-chunk", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qwenlink {command}: error: --prefill-chunk must be a positive number of tokens, got 0"]


def test_engine_cache_grows_to_the_requests(tiny):
    """lm-eval's generate_until sizes the engine's cache to its requests (`Engine.reserve`), not to the model's max
    positions: a cache of 16 slots grows for a 500-token prompt between runs, with the tokens of a fresh engine."""
    engine = Engine(tiny, max_batch=2, max_length=16, prefill_chunk=128)
    engine.run([Request(_prompt(8, 9), SamplingParams(max_new_tokens=4))])
    assert engine.cache.max_length == 16
    prompt = _prompt(500, 10)
    engine.reserve(506)
    assert engine.cache is None and engine.max_length == 506
    grown = engine.run([Request(prompt, SamplingParams(max_new_tokens=6))])[0]
    fresh, _ = generate(tiny, [prompt], SamplingParams(max_new_tokens=6), prefill_chunk=4096)
    assert grown.tokens == fresh[0].tokens and engine.cache.max_length == 506
    engine.submit(Request(prompt[:3], SamplingParams(max_new_tokens=2)))
    with pytest.raises(QwenlinkError, match="only be resized while the engine is idle"):
        engine.reserve(1000)


def test_server_answers_long_prompts_as_one_shot_prefill(tiny):
    """The OpenAI server with a 4096-token context and chunks of 256 answers two concurrent completions whose prompts
    (token ids) fill the context with what a one-shot prefill generates."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.request import Request as HttpRequest, urlopen

    from qwenlink.inference.server import ServerLimits, make_server, serve_in_thread
    from qwenlink.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(FIXTURE)
    engine = Engine(tiny, max_batch=2, max_length=4096, prefill_chunk=256)
    server = make_server(engine, tok, "tiny", port=0, limits=ServerLimits(max_tokens=8, max_prompt_tokens=4090,
                                                                          context=4096, max_body_bytes=100_000))
    serve_in_thread(server)
    host, port = server.server_address[:2]
    prompts = [_prompt(4088, 11), _prompt(2600, 12)]

    def complete(prompt: list[int]) -> str:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        request = HttpRequest(f"http://{host}:{port}/v1/completions", data=body,
                              headers={"Content-Type": "application/json"})
        with urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())["choices"][0]["text"]

    try:
        with ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(complete, prompts))
    finally:
        server.shutdown()
        server.state.worker.stop()
    expected, _ = generate(tiny, prompts, SamplingParams(max_new_tokens=8, stop_ids=frozenset(tok.stop_ids())),
                           decode=tok.decode, prefill_chunk=4096)
    assert texts == [r.text for r in expected] and all(texts)
