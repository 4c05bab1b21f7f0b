"""Generation throughput: qwenlink's engine vs HF transformers `generate` (KV cache), same weights, same run.

Measures generated tokens per second (prefill of the 32-token prompts included, greedy, no early stop) at batch 1
and batch 8, each side run alternately `--repeats` times and the best kept (the machine is shared and noisy), plus
the server's throughput with 16 concurrent clients. Same dtype on both sides. On CPU a third column runs qwenlink
with `prepack=False` (plain `F.linear` and the full head for greedy steps, as `--no-prepack`) to show what the
oneDNN-prepacked weights and the int8-screened greedy head contribute.

    python benchmarks/bench_generate.py                      # CPU: qwen-bench and the Qwen1.5-0.5B shape, fp32 + bf16
    python benchmarks/bench_generate.py --dtypes bf16        # CPU, bf16 only
    python benchmarks/bench_generate.py --compiled           # plus a column with the compiled decode step
    python benchmarks/bench_generate.py --gpu                # GPU section: Qwen1.5-1.8B shape, bf16
    python benchmarks/bench_generate.py --shapes qwen-bench --new-tokens 32 --repeats 1   # quick check
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import time

import torch

from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.sampling import SamplingParams
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _hf_twin(model):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = model.config
    hf_cfg = Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hf_cfg)
    hf = hf.to_empty(device=next(model.parameters()).device).to(dtype)
    state = {("model." + k if not k.startswith("lm_head") else k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(model, prompts: torch.Tensor, new_tokens: int, prepack: bool = True,
             engine: Engine | None = None) -> float:
    """Timed generation on a fresh engine, or on `engine` (the compiled one, built and compiled once)."""
    device = next(model.parameters()).device
    if engine is None:
        engine = Engine(model, max_batch=prompts.shape[0], max_length=prompts.shape[1] + new_tokens, prepack=prepack)
    params = SamplingParams(max_new_tokens=new_tokens)
    requests = [Request(p, params) for p in prompts.tolist()]
    _sync(device)
    start = time.perf_counter()
    engine.run(requests)
    _sync(device)
    elapsed = time.perf_counter() - start
    assert all(len(r.tokens) == new_tokens for r in requests)
    return prompts.shape[0] * new_tokens / elapsed


@torch.inference_mode()
def run_hf(hf, prompts: torch.Tensor, new_tokens: int) -> float:
    device = prompts.device
    _sync(device)
    start = time.perf_counter()
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    _sync(device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return prompts.shape[0] * new_tokens / elapsed


def bench_shape(name: str, *, device: torch.device, dtype: torch.dtype, batches: list[int], prompt_len: int,
                new_tokens: int, repeats: int, compiled: bool = False) -> list[dict]:
    config = get_preset(name)
    model = build_model(config, device=device, dtype=dtype, seed=0).eval()
    hf = _hf_twin(model)
    # The no-prepack column needs its own copy: once an engine has prepacked `model`, its layers stay swapped.
    plain = build_model(config, device=device, dtype=dtype, seed=0).eval() if device.type == "cpu" else None
    # The compiled engine's warm-up compiles its decode step (not timed); same weights, its own copy.
    twin = build_model(config, device=device, dtype=dtype, seed=0).eval() if compiled else None
    rows = []
    for batch in batches:
        prompts = torch.randint(0, 150000, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
        prompts = prompts.to(device)
        run_ours(model, prompts[:, :8], 4)  # warm-up all sides
        run_hf(hf, prompts[:, :8], 4)
        if plain is not None:
            run_ours(plain, prompts[:, :8], 4, prepack=False)
        compiled_engine = None
        if twin is not None:  # compiled once, outside the timed runs, then reused
            compiled_engine = Engine(twin, max_batch=batch, max_length=prompt_len + new_tokens, compile=True)
            run_ours(twin, prompts, 2, engine=compiled_engine)
        ours, unpacked, compiled_rates, theirs = [], [], [], []
        for _ in range(repeats):
            ours.append(run_ours(model, prompts, new_tokens))
            if plain is not None:
                unpacked.append(run_ours(plain, prompts, new_tokens, prepack=False))
            if twin is not None:
                compiled_rates.append(run_ours(twin, prompts, new_tokens, engine=compiled_engine))
            theirs.append(run_hf(hf, prompts, new_tokens))
        row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
               "qwenlink_tok_s": max(ours), "qwenlink_no_prepack_tok_s": max(unpacked) if unpacked else None,
               "qwenlink_compiled_tok_s": max(compiled_rates) if compiled_rates else None,
               "hf_tok_s": max(theirs), "ratio": max(ours) / max(theirs)}
        rows.append(row)
        plain_text = f"no-prepack {row['qwenlink_no_prepack_tok_s']:8.1f} | " if unpacked else ""
        if compiled_rates:
            plain_text += (f"compiled {row['qwenlink_compiled_tok_s']:8.1f} "
                           f"({row['qwenlink_compiled_tok_s'] / row['hf_tok_s']:.2f}x) | ")
        print(f"{name:14s} {row['dtype']:8s} batch {batch:2d}: qwenlink {row['qwenlink_tok_s']:8.1f} tok/s | "
              f"{plain_text}HF generate {row['hf_tok_s']:8.1f} tok/s | ratio {row['ratio']:.2f}x", flush=True)
    del hf, model, plain, twin
    return rows


def bench_server(name: str, *, device: torch.device, dtype: torch.dtype, clients: int, new_tokens: int) -> dict:
    """16 clients each sending 2 completion requests at once; tokens/s over the whole burst."""
    import urllib.request

    from qwenlink.inference.server import ServerLimits, make_server, serve_in_thread
    from qwenlink.tokenizer import Tokenizer

    model = build_model(get_preset(name), device=device, dtype=dtype, seed=0).eval()
    engine = Engine(model, max_batch=clients, max_length=256)
    server = make_server(engine, Tokenizer.default(), "bench", port=0, limits=ServerLimits(max_tokens=new_tokens))
    serve_in_thread(server)
    host, port = server.server_address[:2]

    def call(i: int) -> int:
        body = json.dumps({"prompt": f"Request {i}: tell me a story about the number {i}.", "max_tokens": new_tokens,
                           "temperature": 0.8, "seed": i, "stop": []}).encode()
        req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    call(0)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(call, range(clients * 2)))
    elapsed = time.perf_counter() - start
    server.shutdown()
    server.state.worker.stop()
    result = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "clients": clients, "requests": clients * 2, "tokens": tokens,
              "tok_s": tokens / elapsed, "seconds": elapsed}
    print(f"server {name} {str(dtype).removeprefix('torch.')}: {clients} concurrent clients, {clients * 2} requests, {tokens} tokens in "
          f"{elapsed:.1f}s = {result['tok_s']:.1f} tok/s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU section: Qwen1.5-1.8B shape in bf16 on cuda")
    parser.add_argument("--shapes", nargs="*", default=None)
    parser.add_argument("--dtypes", nargs="*", choices=sorted(_DTYPES), default=None,
                        help="CPU dtypes to compare in (default: fp32 and bf16; the GPU section is bf16)")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--compiled", action="store_true",
                        help="add a column for the engine with compile=True (--compile; compile time not timed)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        device, dtypes = torch.device("cuda"), [_DTYPES[d] for d in args.dtypes or ["bf16"]]
        shapes = args.shapes or ["qwen1.5-1.8b"]
    else:
        device, dtypes = torch.device("cpu"), [_DTYPES[d] for d in args.dtypes or ["fp32", "bf16"]]
        shapes = args.shapes or ["qwen-bench", "qwen1.5-0.5b"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()} torch "
          f"{torch.__version__} threads {torch.get_num_threads()} device {device}", flush=True)
    results = {"generate": [], "server": []}
    for dtype in dtypes:
        for shape in shapes:
            results["generate"] += bench_shape(shape, device=device, dtype=dtype, batches=args.batches,
                                               prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                               repeats=args.repeats, compiled=args.compiled)
        if not args.no_server:
            results["server"].append(bench_server(shapes[0], device=device, dtype=dtype, clients=16,
                                                  new_tokens=min(64, args.new_tokens)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
