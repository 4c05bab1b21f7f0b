"""KV-cache generation: equals HF generate (greedy), equals cache-free decoding, batches like single prompts."""

from __future__ import annotations

import pytest
import torch

from common import run_cli
from hf_helpers import hf_greedy_left_padded, make_hf_model
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.inference.generate import SamplingParams, generate

PROMPTS = [[5, 17, 42, 99, 3], [7, 8], [250, 11, 12, 13, 14, 15, 16, 19, 200]]


def _cache_free_greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([tokens]))[0, -1].argmax())
            out.append(nxt)
            tokens.append(nxt)
    return out


@pytest.fixture
def tiny(tmp_path):
    hf, path = make_hf_model(tmp_path, kv_heads=2)
    return hf, load_hf_model(path).eval()


def test_kv_cache_equals_cache_free_decoding(tiny):
    _, model = tiny
    for prompt in PROMPTS:
        results, _ = generate(model, [prompt], SamplingParams(max_new_tokens=12))
        assert results[0].tokens == _cache_free_greedy(model, prompt, 12)
        assert results[0].finish_reason == "length"


def test_batched_left_padded_equals_single(tiny):
    _, model = tiny
    batched, stats = generate(model, PROMPTS, SamplingParams(max_new_tokens=10))
    for prompt, result in zip(PROMPTS, batched):
        alone, _ = generate(model, [prompt], SamplingParams(max_new_tokens=10))
        assert result.tokens == alone[0].tokens
    assert stats.generated_tokens == 30 and stats.prompt_tokens == sum(map(len, PROMPTS))


def test_greedy_equals_transformers_generate(tiny):
    hf, model = tiny
    for prompt in PROMPTS:
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours, _ = generate(model, [prompt], SamplingParams(max_new_tokens=15))
        assert ours[0].tokens == ref[0, len(prompt):].tolist()


def test_stop_token_ends_one_sequence_only(tiny):
    _, model = tiny
    free = [_cache_free_greedy(model, p, 8) for p in PROMPTS]
    stop = free[0][2]  # the third token the first prompt produces
    results, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, stop_ids=frozenset({stop})))
    assert results[0].tokens == free[0][:free[0].index(stop) + 1] and results[0].finish_reason == "stop"
    for result, expected in zip(results[1:], free[1:]):
        cut = expected.index(stop) + 1 if stop in expected else len(expected)
        assert result.tokens == expected[:cut]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    _, model = tiny
    a, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=3))
    b, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=3))
    c, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=4))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    greedy, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=10))
    top1, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.7, top_k=1, seed=5))
    tiny_p, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=5))
    assert [r.tokens for r in top1] == [r.tokens for r in greedy] == [r.tokens for r in tiny_p]


def test_cli_greedy_on_fixture_equals_transformers(tiny_fixture_hf):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_fixture_hf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_fixture_hf).eval()
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt")
    ref = hf.generate(**ids, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    new = ref[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    result = run_cli("generate", "--model", str(tiny_fixture_hf), "--prompt", prompt, "--greedy",
                     "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout == tok.decode(new) + "\n"
    assert "tokens/s" in result.stderr


def test_batched_greedy_equals_transformers_left_padded_batch(tiny):
    hf, model = tiny
    ours, _ = generate(model, PROMPTS, SamplingParams(max_new_tokens=12))
    assert [r.tokens for r in ours] == hf_greedy_left_padded(hf, PROMPTS, 12)


def test_repetition_penalty_equals_transformers(tiny):
    hf, model = tiny
    prompt = PROMPTS[0]
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=20, do_sample=False, repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)
    ours, _ = generate(model, [prompt], SamplingParams(max_new_tokens=20, repetition_penalty=1.5))
    assert ours[0].tokens == ref[0, len(prompt):].tolist()


def test_stop_strings_cut_text_and_logprobs_are_returned(tiny_fixture_hf):
    from qwenlink.tokenizer import Tokenizer

    model = load_hf_model(tiny_fixture_hf).eval()
    tok = Tokenizer.from_dir(tiny_fixture_hf)
    prompt = tok.encode("hello world")
    full, _ = generate(model, [prompt], SamplingParams(max_new_tokens=20, logprobs=True), decode=tok.decode)
    text = full[0].text
    assert len(full[0].logprobs) == len(full[0].tokens) and all(lp <= 0 for lp in full[0].logprobs)
    stop = text[4:6]
    cut, _ = generate(model, [prompt], SamplingParams(max_new_tokens=20, stop_strings=(stop,)), decode=tok.decode)
    assert cut[0].text == text[:text.index(stop)] and cut[0].finish_reason == "stop"
    # The reported log-probs are the model's: the first equals log_softmax of the prefill logits.
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)[full[0].tokens[0]]
    assert abs(float(first) - full[0].logprobs[0]) < 1e-5


def test_continuous_batching_admits_requests_mid_flight(tiny):
    """A request joining while others decode gets exactly the tokens it gets alone."""
    from qwenlink.inference.engine import Engine, Request

    _, model = tiny
    engine = Engine(model, max_batch=2, max_length=64)
    first = engine.submit(Request(PROMPTS[0], SamplingParams(max_new_tokens=10)))
    for _ in range(4):
        engine.step()
    second = engine.submit(Request(PROMPTS[2], SamplingParams(max_new_tokens=6)))
    third = engine.submit(Request(PROMPTS[1], SamplingParams(max_new_tokens=5)))  # waits for a free row
    while engine.busy:
        engine.step()
    for request, prompt, n in ((first, PROMPTS[0], 10), (second, PROMPTS[2], 6), (third, PROMPTS[1], 5)):
        assert request.tokens == _cache_free_greedy(model, prompt, n)


def test_generate_cli_jsonl_in_and_out(tmp_path, tiny_fixture_hf):
    import json

    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "hello"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", "--model", str(tiny_fixture_hf), "--input", str(src), "--output", str(out),
                     "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["prompt"].startswith("<|im_start|>system")
    assert all(len(r["tokens"]) <= 4 for r in rows)
    src.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    bad = run_cli("generate", "--model", str(tiny_fixture_hf), "--input", str(src), "--output", str(tmp_path / "x"))
    assert bad.returncode != 0 and "prompts.jsonl:2" in bad.stderr and not (tmp_path / "x").exists()


def test_generate_reads_megatron_and_qwenlink_checkpoints(tmp_path, tiny_fixture_hf):
    """`--model` takes a Megatron checkpoint (any TP/PP) or a qwenlink training checkpoint as well as an HF dir."""
    from common import fixture_dir

    args = ["--prompt", "hello world", "--greedy", "--max-new-tokens", "8", "--tokenizer", str(tiny_fixture_hf)]
    reference = run_cli("generate", "--model", str(tiny_fixture_hf), *args)
    assert reference.returncode == 0, reference.stderr
    for layout in ("mcore-tp2", "mcore-tp1-pp2"):
        got = run_cli("generate", "--model", str(fixture_dir("megatron-core-tiny-qwen2", layout)), *args)
        assert got.returncode == 0, got.stderr
        assert got.stdout == reference.stdout
    converted = run_cli("convert", "--input", str(tiny_fixture_hf), "--output", str(tmp_path / "ql"), "--to", "qwenlink")
    assert converted.returncode == 0, converted.stderr
    got = run_cli("generate", "--model", str(tmp_path / "ql"), *args)
    assert got.returncode == 0, got.stderr
    assert got.stdout == reference.stdout
