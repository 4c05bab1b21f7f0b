"""generate / chat (server) / eval with a Qwen1.5-MoE model through the ordinary inference engine (issue #18,
deliverable 5). The engine's MoE logits and greedy batches equal transformers' (tests/models/test_moe_parity.py);
here the commands run on an MoE HF directory with a tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from common import fixture_dir, run_cli
from moe_helpers import make_hf_moe_model
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.errors import QwenlinkError
from qwenlink.inference.engine import Engine
from qwenlink.inference.generate import generate
from qwenlink.inference.sampling import SamplingParams
from qwenlink.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    hf, path = make_hf_moe_model(tmp_path_factory.mktemp("moe_tok"),
                                 tokenizer_from=fixture_dir("megatron-core-tiny-qwen2", "hf"))
    return hf, path


def test_generate_cli_equals_transformers_generate(moe_dir):
    hf, path = moe_dir
    tok = Tokenizer.from_dir(path)
    prompt = "The capital of France is"
    ids = torch.tensor([tok.encode(prompt)])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    stops = [i for i, t in enumerate(ref) if t in tok.stop_ids()]
    ref = ref[:stops[0]] if stops else ref  # generate ends at the tokenizer's end token
    result = run_cli("generate", "--model", str(path), "--prompt", prompt, "--greedy", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == tok.decode(ref) + "\n"


def test_chat_server_with_moe_model(moe_dir):
    """The OpenAI-compatible server's chat completion equals the engine run alone on the chat-templated prompt."""
    openai = pytest.importorskip("openai")
    from qwenlink.inference.server import ServerLimits, make_server, serve_in_thread

    _, path = moe_dir
    model = load_hf_model(path).eval()
    tok = Tokenizer.from_dir(path)
    server = make_server(Engine(model, max_batch=2, max_length=256), tok, "moe", port=0,
                         limits=ServerLimits(max_tokens=16, max_prompt_tokens=200, max_body_bytes=20_000))
    serve_in_thread(server)
    try:
        host, port = server.server_address[:2]
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="moe", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=8, temperature=0)
        text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
        alone, _ = generate(model, [tok.encode(text)], SamplingParams(max_new_tokens=8,
                                                                       stop_ids=frozenset(tok.stop_ids())),
                            decode=tok.decode)
        assert reply.choices[0].message.content == alone[0].text
    finally:
        server.shutdown()
        server.state.worker.stop()


def test_eval_cli_with_moe_model(moe_dir, tmp_path):
    _, path = moe_dir
    out = tmp_path / "results.json"
    proc = run_cli("eval", "--model", str(path), "--data", str(fixture_dir("mmlu", "data")), "--subjects",
                   "anatomy", "--limit", "2", "--shots", "0", "--output", str(out), "--log-samples")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["results"]["overall"]["n"] == 2
    assert all(len(s["logprobs"]) == 4 for s in report["samples"])


def test_compiled_decode_of_fp32_moe_refused(moe_dir):
    _, path = moe_dir
    with pytest.raises(QwenlinkError, match=r"^--compile: a mixture-of-experts model compiles its decode step in "
                                            r"bf16 only \(this one is float32\)"):
        Engine(load_hf_model(path), compile=True)
