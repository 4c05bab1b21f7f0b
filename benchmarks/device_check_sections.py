"""The sections of benchmarks/device_check.py: each a function of the settings returning a JSON-able dict.

A result may hold `checks` (name -> bool: every one must hold for the section to pass) and `skipped` (a reason: the
section could not run here, e.g. transformers is not installed). Exceptions are the runner's business.
Shapes and sizes come from `Settings`: the device run's, or the CPU smoke run's (tiny, no compilation), so the same
code runs in CI and on the device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import device_check_kernels
import device_check_moe

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

ORDER = ["environment", "parity", "moe", "kernels", "packing", "trainer_eager", "train", "train_ac",
         "compiled_decode", "decode", "trainer_compiled", "train_shapes"]


@dataclasses.dataclass
class Settings:
    """Every shape and size the sections use; `for_device()` for one CUDA device, `for_smoke()` for CI on a CPU."""

    device: str
    smoke: bool
    compile: bool                      # torch.compile where a section measures it (off in smoke: minutes on a CPU)
    parity_presets: list[str]
    parity_tokens: tuple[int, int]     # batch, length
    train_preset: str
    train_seq: int
    train_micro_batch: int
    train_warmup: int                  # untimed steps (the first one compiles)
    train_steps: int                   # timed steps
    train_lr: float
    check_preset: str                  # compiled-vs-eager decode check (fp32)
    check_new_tokens: int
    decode_preset: str
    decode_batches: list[int]
    decode_prompt: int
    decode_new_tokens: int
    decode_repeats: int
    trainer_preset: str
    trainer_seq: int
    trainer_micro_batch: int
    trainer_steps: int
    shapes: list[tuple[str, str]]      # (preset, activation checkpointing) for the MFU-per-shape table
    moe_parity_tokens: tuple[int, int]  # batch, length (device_check_moe.py)
    moe_shape: str                     # a benchmarks/bench_moe.py shape
    moe_batch: int
    moe_seq: int
    moe_warmup: int
    moe_steps: int
    moe_decode_batch: int
    moe_new_tokens: int
    kernel_vocabs: list[int]           # in-place (log-)softmax widths (device_check_kernels.py)
    kernel_tokens: int                 # the linear cross entropy's rows
    kernel_hidden: int
    packing_seq: int                   # packed-document attention (two rows of this length)
    packing_heads: tuple[int, int, int]  # query heads, kv heads, head dim
    workdir: str = ""                  # scratch space (corpus, run directories); set by the runner

    @classmethod
    def for_device(cls) -> "Settings":
        return cls(device="cuda", smoke=False, compile=True,
                   parity_presets=["qwen-small", "qwen1.5-1.8b"], parity_tokens=(2, 256),
                   train_preset="qwen1.5-1.8b", train_seq=4096, train_micro_batch=2, train_warmup=2, train_steps=4,
                   train_lr=3e-4, check_preset="qwen-small", check_new_tokens=24,
                   decode_preset="qwen1.5-1.8b", decode_batches=[1, 8], decode_prompt=32, decode_new_tokens=128,
                   decode_repeats=2, trainer_preset="qwen1.5-1.8b", trainer_seq=4096, trainer_micro_batch=2,
                   trainer_steps=6, shapes=[("qwen1.5-0.5b", "none"), ("qwen1.5-4b", "full")],
                   moe_parity_tokens=(2, 256), moe_shape="a2.7b-4l", moe_batch=2, moe_seq=2048, moe_warmup=2,
                   moe_steps=4, moe_decode_batch=8, moe_new_tokens=64, kernel_vocabs=[1000, 151936],
                   kernel_tokens=4096, kernel_hidden=2048, packing_seq=8192, packing_heads=(16, 16, 128))

    @classmethod
    def for_smoke(cls) -> "Settings":
        return cls(device="cpu", smoke=True, compile=False,
                   parity_presets=["test-tiny"], parity_tokens=(2, 16),
                   train_preset="test-tiny", train_seq=64, train_micro_batch=2, train_warmup=1, train_steps=3,
                   train_lr=3e-3, check_preset="test-tiny", check_new_tokens=8,
                   decode_preset="test-tiny", decode_batches=[1, 2], decode_prompt=8, decode_new_tokens=8,
                   decode_repeats=1, trainer_preset="qwen-tiny", trainer_seq=32, trainer_micro_batch=1,
                   trainer_steps=2, shapes=[("qwen-tiny", "none")],
                   moe_parity_tokens=(2, 16), moe_shape="tiny", moe_batch=1, moe_seq=32, moe_warmup=0,
                   moe_steps=1, moe_decode_batch=1, moe_new_tokens=4, kernel_vocabs=[1000, 4096],
                   kernel_tokens=1500, kernel_hidden=64, packing_seq=512, packing_heads=(4, 2, 16))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- helpers ----------------------------------------------------------------------------------------------------
def release_memory() -> None:
    """Between sections: drop compiled graphs (CUDA graph pools hold memory) and cached blocks, reset the peak."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # only when something compiled (importing dynamo takes seconds)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    from qwenlink.train.metrics import peak_memory_gb

    return round(peak_memory_gb(device), 3)


@contextlib.contextmanager
def _tf32_off():
    """fp32 comparisons in true fp32 (TF32 matmuls differ from a CPU reference by ~1e-3 relative)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _transformers_missing() -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no reference here
        return f"transformers is not importable here ({type(exc).__name__}: {exc})"
    return None


def hf_twin(model, dtype: torch.dtype):
    """transformers' Qwen2ForCausalLM with `model`'s config and weights, on its device, in `dtype`.

    Built on the device directly (not on meta): its rotary inverse frequencies are buffers outside the state dict,
    which a meta build would leave uninitialised."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = {k: v for k, v in model.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    hf_config = Qwen2Config(**config)
    hf_config._attn_implementation = "sdpa"
    device = next(model.parameters()).device
    with torch.device(device):
        hf = Qwen2ForCausalLM(hf_config)
    hf = hf.to(dtype)
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF twin: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def _copy_model(model, dtype: torch.dtype):
    """The same weights in another dtype, in a model of its own (the engine may swap a model's layers)."""
    from qwenlink.models.qwen2 import build_model

    twin = build_model(model.config, device=next(model.parameters()).device, dtype=dtype, init=False)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


# ---- environment --------------------------------------------------------------------------------------------------
def _launch_microseconds(launches: int = 2000) -> float:
    """Microseconds per launch of a trivial kernel, launches queued back to back then waited for: what an eager step
    pays per op when its kernels are short. It differs between the lent machines' runtimes (the kernel release tells
    gVisor, 4.4.0, from a VM) and decides how launch-bound small-model eager figures are."""
    x = torch.zeros(8, device="cuda")
    for _ in range(50):
        x.add_(1.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(launches):
        x.add_(1.0)
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / launches * 1e6, 2)


def environment(settings: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "kernel": platform.release(),
                            "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "machine": platform.machine(), "cuda_available": torch.cuda.is_available()}
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    missing = _transformers_missing()
    if missing is None:
        import transformers

        info["transformers"] = transformers.__version__
    else:
        info["transformers"] = missing
    import qwenlink

    info["qwenlink_path"] = str(Path(qwenlink.__file__).parent)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    device_memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported(), launch_us=_launch_microseconds())
        with contextlib.suppress(Exception):
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return info


# ---- parity with transformers -------------------------------------------------------------------------------------
@torch.no_grad()
def parity(settings: Settings) -> dict[str, Any]:
    """Logits of qwenlink and transformers on the same random weights and tokens.

    fp32 (TF32 off): equal to rounding. bf16: both differ from the fp32 logits by rounding; qwenlink's error is held
    to at most twice transformers' own (a wrong cast or an fp32 accumulation lost would show as much more)."""
    reason = _transformers_missing()
    if reason:
        return {"skipped": reason}
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    device = torch.device(settings.device)
    batch, length = settings.parity_tokens
    shapes, checks = {}, {}
    with _tf32_off():
        for preset in settings.parity_presets:
            config = get_preset(preset)
            ours = build_model(config, device=device, seed=0).eval()
            ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
            ids = ids.to(device)
            hf = hf_twin(ours, torch.float32)
            ref = ours(ids).float()
            theirs = hf(ids).logits.float()
            scale = max(float(ref.abs().max()), 1.0)
            fp32_max = float((ref - theirs).abs().max())
            ours16 = _copy_model(ours, torch.bfloat16)
            del ours
            hf = hf.to(torch.bfloat16)
            got16, theirs16 = ours16(ids).float(), hf(ids).logits.float()
            err_ours, err_hf = float((got16 - ref).abs().mean()), float((theirs16 - ref).abs().mean())
            shapes[preset] = {
                "tokens": [batch, length], "logit_abs_max": scale, "fp32_max_abs_diff": fp32_max,
                "bf16_max_abs_diff_vs_hf_bf16": float((got16 - theirs16).abs().max()),
                "bf16_mean_abs_err_vs_fp32": {"qwenlink": err_ours, "transformers": err_hf},
                "bf16_top1_agreement_with_hf_bf16": float((got16.argmax(-1) == theirs16.argmax(-1)).float().mean()),
                "bf16_top1_agreement_with_fp32": float((got16.argmax(-1) == ref.argmax(-1)).float().mean())}
            checks[f"{preset}_fp32_equal"] = fp32_max <= 1e-3 * scale
            checks[f"{preset}_bf16_error_within_2x_transformers"] = err_ours <= 2 * err_hf + 1e-6 * scale
            del ours16, hf, ref, theirs, got16, theirs16
            release_memory()
    return {"shapes": shapes, "checks": checks}


# ---- the trainer's step in this process ---------------------------------------------------------------------------
def _plan_args(device: torch.device) -> list[str]:
    """`qwenlink plan`'s device options for this device (a known name, else its memory)."""
    if device.type != "cuda":
        return ["--device", "cpu"]
    name = torch.cuda.get_device_name(device).lower()
    for key, flag in (("h200", "h200"), ("h100", "h100"), ("a100", "a100-80g")):
        if key in name:
            return ["--device", flag]
    return ["--device-memory", f"{torch.cuda.get_device_properties(device).total_memory // 2**30}GiB"]


def start_plan(job_toml: str, device: torch.device, workdir: Path) -> subprocess.Popen | dict:
    """Start `qwenlink plan --json` for the job in the background (CPU work while the device trains)."""
    path = workdir / f"plan-{time.monotonic_ns()}.toml"
    path.write_text(job_toml)
    cmd = [sys.executable, "-m", "qwenlink.cli", "plan", "--config", str(path), "--world-size", "1",
           *_plan_args(device), "--json"]
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_child_env(threads=2))
    except OSError as exc:
        return {"available": False, "reason": f"could not start qwenlink plan: {exc}"}


def finish_plan(handle: subprocess.Popen | dict, timeout: float) -> dict[str, Any]:
    """The plan's prediction (peak bytes and the first rank's parts), or why there is none."""
    if isinstance(handle, dict):
        return handle
    try:
        out, err = handle.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        handle.kill()
        handle.communicate()
        return {"available": False, "reason": f"qwenlink plan did not finish within {timeout:.0f} s"}
    if handle.returncode != 0:
        lines = (err or out).strip().splitlines()
        return {"available": False, "reason": "plan unavailable: " + (lines[-1] if lines else
                                                                     f"exit code {handle.returncode}")}
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError as exc:
        return {"available": False, "reason": f"plan unavailable: unreadable --json output ({exc})"}
    ranks = data.get("ranks") or [{}]
    return {"available": True, "peak_bytes": data.get("peak_bytes"), "fits": data.get("fits"),
            "rank0": {k: ranks[0].get(k) for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                                   "activations_bytes", "peak_bytes")}}


def train(settings: Settings, activation_checkpoint: str, preset: Optional[str] = None) -> dict[str, Any]:
    """The trainer's own step (build_step_parts / run_step: FSDP2's bf16 policy over a one-rank mesh, per-block
    compile) on random tokens, the same batch every step (so the loss must fall): tokens/s, MFU, peak memory."""
    preset = preset or settings.train_preset
    from qwenlink.train.config import load_config, parallel_plan
    from qwenlink.train.data import MicroBatch
    from qwenlink.train.metrics import peak_tflops
    from qwenlink.train.trainer import build_step_parts, resolve_model_config, run_step, step_flops

    device = torch.device(settings.device)
    seq, micro = settings.train_seq, settings.train_micro_batch
    cfg = load_config(None, [f"--model.preset={preset}", f"--data.seq_length={seq}",
                             f"--train.micro_batch_size={micro}", f"--train.global_batch_size={micro}",
                             "--train.dtype=bf16", f"--train.device={settings.device}",
                             f"--parallel.compile={'true' if settings.compile else 'false'}",
                             f"--train.activation_checkpoint={activation_checkpoint}", f"--optim.lr={settings.train_lr}",
                             "--optim.warmup_iters=0", "--job.seed=0"])
    model_config = resolve_model_config(cfg)
    plan = parallel_plan(cfg, 1, model_config)
    planned = start_plan(cfg.to_toml(), device, Path(settings.workdir))
    release_memory()
    t0 = time.perf_counter()
    parts = build_step_parts(cfg, model_config, plan, device)
    _sync(device)
    build_s = time.perf_counter() - t0
    tokens = torch.randint(0, model_config.vocab_size, (micro, seq + 1), generator=torch.Generator().manual_seed(0))
    batches = [MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())]
    losses, warmup_s = [], []
    for step in range(1, settings.train_warmup + 1):
        t0 = time.perf_counter()
        result = run_step(parts, batches, step, clip_grad=1.0)
        losses.append(float(result.loss))  # waits for the device
        warmup_s.append(time.perf_counter() - t0)
    results = []
    _sync(device)
    t0 = time.perf_counter()
    for step in range(settings.train_warmup + 1, settings.train_warmup + settings.train_steps + 1):
        results.append(run_step(parts, batches, step, clip_grad=1.0))
    _sync(device)
    elapsed = time.perf_counter() - t0
    losses += [float(r.loss) for r in results]
    peak_gb = _peak_memory_gb(device)
    flops = step_flops(model_config, batches) * settings.train_steps
    peak, peak_source = peak_tflops(device, "bf16")
    del parts, results
    release_memory()
    prediction = finish_plan(planned, timeout=60)
    if prediction.get("peak_bytes"):
        prediction["measured_over_planned"] = round(peak_gb * 2**30 / prediction["peak_bytes"], 3)
    tokens_per_s = settings.train_steps * micro * seq / elapsed
    return {"preset": preset, "seq_length": seq, "micro_batch": micro, "dtype": "bf16",
            "compile": settings.compile, "activation_checkpoint": activation_checkpoint,
            "build_seconds": round(build_s, 2), "warmup_step_seconds": [round(s, 2) for s in warmup_s],
            "step_seconds": round(elapsed / settings.train_steps, 4), "tokens_per_s": round(tokens_per_s, 1),
            "tflops": round(flops / elapsed / 1e12, 2), "peak_tflops": peak, "peak_tflops_source": peak_source,
            "mfu": round(flops / elapsed / (peak * 1e12), 4) if peak else None,
            "peak_memory_gb": peak_gb, "plan": prediction, "losses": losses,
            "checks": {"losses_finite": all(math.isfinite(x) for x in losses),
                       "first_loss_near_ln_vocab": abs(losses[0] - math.log(model_config.vocab_size)) < 1.0,
                       "loss_falls_on_a_repeated_batch": losses[-1] < losses[0]}}


def train_shapes(settings: Settings, remaining: Callable[[], float]) -> dict[str, Any]:
    """`train` on further model shapes (MFU per shape for docs/training.md), each while the budget holds one."""
    rows, checks = [], {}
    needed = 5 if settings.smoke else 75
    for preset, activation_checkpoint in settings.shapes:
        if remaining() < needed:
            rows.append({"preset": preset, "skipped": f"time budget: {remaining():.0f} s left"})
            continue
        try:
            row = train(settings, activation_checkpoint, preset)
        except Exception as exc:  # noqa: BLE001 - one shape's failure (say, out of memory) must not hide the others
            row = {"preset": preset, "activation_checkpoint": activation_checkpoint,
                   "error": f"{type(exc).__name__}: {exc}"[:1500]}
            checks[f"{preset}_ran"] = False
        else:
            checks.update({f"{preset}_{k}": v for k, v in row.pop("checks").items()})
        rows.append(row)
        release_memory()
    return {"rows": rows, "checks": checks}


# ---- decoding ------------------------------------------------------------------------------------------------------
def _greedy_tokens(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from qwenlink.inference.engine import Request
    from qwenlink.inference.sampling import SamplingParams

    requests = [Request(p, SamplingParams(max_new_tokens=new_tokens)) for p in prompts]
    engine.run(requests)
    return [r.tokens for r in requests]


@torch.no_grad()
def compiled_decode(settings: Settings) -> dict[str, Any]:
    """The compiled decode step (on CUDA: the whole cache, captured as a CUDA graph) gives eager's greedy tokens in
    fp32, for prompts of different lengths decoded together."""
    if not settings.compile:
        return {"skipped": "compilation is off (smoke mode: inductor's CPU compile alone takes ~30 s)"}
    from qwenlink.inference.engine import Engine
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    device = torch.device(settings.device)
    config = get_preset(settings.check_preset)
    model = build_model(config, device=device, seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 2)]
    max_length = 17 + settings.check_new_tokens + 1
    with _tf32_off():
        eager = _greedy_tokens(Engine(_copy_model(model, torch.float32), max_batch=3, max_length=max_length,
                                      prepack=False), prompts, settings.check_new_tokens)
        t0 = time.perf_counter()
        compiled = _greedy_tokens(Engine(model, max_batch=3, max_length=max_length, compile=True), prompts,
                                  settings.check_new_tokens)
        compile_and_run_s = time.perf_counter() - t0
    first_difference = next(((row, i) for row, (a, b) in enumerate(zip(eager, compiled))
                             for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"preset": settings.check_preset, "dtype": "fp32", "rows": 3, "new_tokens": settings.check_new_tokens,
            "compile_and_run_seconds": round(compile_and_run_s, 1), "first_difference": first_difference,
            "checks": {"compiled_tokens_equal_eager": compiled == eager and all(eager)}}


@torch.no_grad()
def decode(settings: Settings) -> dict[str, Any]:
    """Generated tokens/s (32-token prompts prefilled, greedy, no early stop) at each batch size in bf16: the eager
    engine, the compiled one (one engine of max(batches) rows, compiled once, untimed; smaller batches run through
    its rows, as a server's would), and transformers' generate; best of `decode_repeats`."""
    from bench_generate import run_hf, run_ours

    from qwenlink.inference.engine import Engine
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    device = torch.device(settings.device)
    model = build_model(get_preset(settings.decode_preset), device=device, dtype=torch.bfloat16, seed=0).eval()
    hf_reason = _transformers_missing()
    hf = hf_twin(model, torch.bfloat16) if hf_reason is None else None
    new, prompt_len = settings.decode_new_tokens, settings.decode_prompt
    compiled_engine = None
    if settings.compile:
        compiled_engine = Engine(_copy_model(model, torch.bfloat16), max_batch=max(settings.decode_batches),
                                 max_length=prompt_len + new, compile=True)
    rows = []
    for batch in settings.decode_batches:
        prompts = torch.randint(0, min(150000, model.config.vocab_size), (batch, prompt_len),
                                generator=torch.Generator().manual_seed(batch)).to(device)
        run_ours(model, prompts[:, :8], 4)  # warm-up
        if hf is not None:
            run_hf(hf, prompts[:, :8], 4)
        if compiled_engine is not None:
            t0 = time.perf_counter()
            run_ours(compiled_engine.model, prompts, 2, engine=compiled_engine)  # compiles on the first use
            compile_s = time.perf_counter() - t0
        eager_rates, compiled_rates, hf_rates = [], [], []
        for _ in range(settings.decode_repeats):
            eager_rates.append(run_ours(model, prompts, new))
            if compiled_engine is not None:
                compiled_rates.append(run_ours(compiled_engine.model, prompts, new, engine=compiled_engine))
            if hf is not None:
                hf_rates.append(run_hf(hf, prompts, new))
        row: dict[str, Any] = {"batch": batch, "eager_tok_s": round(max(eager_rates), 1)}
        if compiled_rates:
            row.update(compiled_tok_s=round(max(compiled_rates), 1), compiled_first_use_seconds=round(compile_s, 1))
        if hf_rates:
            row.update(hf_tok_s=round(max(hf_rates), 1), eager_over_hf=round(max(eager_rates) / max(hf_rates), 3))
            if compiled_rates:
                row["compiled_over_hf"] = round(max(compiled_rates) / max(hf_rates), 3)
        rows.append(row)
    return {"preset": settings.decode_preset, "dtype": "bf16", "prompt_tokens": prompt_len, "new_tokens": new,
            "compiled_engine_rows": max(settings.decode_batches) if compiled_engine is not None else None,
            "transformers": "measured" if hf is not None else hf_reason, "rows": rows}


# ---- the trainer under torchrun -------------------------------------------------------------------------------------
def _child_env(threads: Optional[int] = None) -> dict[str, str]:
    """The environment of a child process: qwenlink importable from ../src even where it is not installed."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def synthetic_corpus(settings: Settings) -> str:
    """A small pretraining corpus made by `qwenlink preprocess` itself (once per run; returns the dataset prefix).
    Sentences over a small word list, so the loss can fall within a few steps."""
    root = Path(settings.workdir) / "corpus"
    done = root / "prefix.txt"
    if done.is_file():
        return done.read_text()
    root.mkdir(parents=True, exist_ok=True)
    import random

    rng = random.Random(0)
    words = ("the model reads a long sequence of tokens and learns to predict the next one from all that came "
             "before while the device keeps every number in bfloat16").split()
    needed = settings.trainer_steps * settings.trainer_micro_batch * (settings.trainer_seq + 1)
    documents = max(8, needed // 150 + 8)  # ~200 tokens each: twice what the steps read
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(180))}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "qwenlink.cli", "preprocess", "--input", str(root / "corpus.jsonl"),
                           "--output-prefix", str(root / "synthetic"), "--append-eod"],
                          capture_output=True, text=True, timeout=300, env=_child_env())
    if proc.returncode:
        raise RuntimeError(f"qwenlink preprocess failed: {proc.stderr.strip()[-2000:]}")
    idx = sorted(root.glob("synthetic_*.idx"))
    if not idx:
        raise RuntimeError(f"qwenlink preprocess wrote no .idx under {root}: {proc.stdout[-1000:]}")
    prefix = str(idx[0].with_suffix(""))
    done.write_text(prefix)
    return prefix


def trainer(settings: Settings, compile: bool, timeout: float) -> dict[str, Any]:
    """`torchrun --standalone --nproc-per-node 1 -m qwenlink.cli train` on the synthetic corpus (bf16; NCCL on a
    CUDA device): the user's path end to end, including the final checkpoint when compilation is off.
    Throughput is the median of the per-step records after the first two (compilation, allocator warm-up)."""
    prefix = synthetic_corpus(settings)
    out = Path(settings.workdir) / f"trainer-{'compiled' if compile else 'eager'}"
    steps = settings.trainer_steps
    args = [f"--model.preset={settings.trainer_preset}", f"--data.path={prefix}",
            f"--data.seq_length={settings.trainer_seq}", f"--train.micro_batch_size={settings.trainer_micro_batch}",
            f"--train.global_batch_size={settings.trainer_micro_batch}", f"--train.train_iters={steps}",
            f"--train.device={settings.device}", "--train.dtype=bf16",
            f"--parallel.compile={'true' if compile else 'false'}", "--optim.lr=3e-4", "--optim.warmup_iters=1",
            f"--job.output_dir={out}", "--metrics.tensorboard=false", "--metrics.progress=lines",
            "--metrics.log_interval=1", "--checkpoint.interval=0",
            f"--checkpoint.save_final={'false' if compile else 'true'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "qwenlink.cli", "train", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = None
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.perf_counter() - t0
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    steps_seen = [r for r in records if r.get("loss") is not None]
    losses = [r["loss"] for r in steps_seen]
    steady = steps_seen[2:] or steps_seen

    def median(key: str) -> Optional[float]:
        values = [r[key] for r in steady if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    checkpoint = out / "checkpoints" / f"step_{steps:08d}"
    result: dict[str, Any] = {
        "command": " ".join(["torchrun --standalone --nproc-per-node 1 -m qwenlink.cli train", *args]),
        "compile": compile, "exit_code": returncode, "seconds": round(seconds, 1), "losses": losses,
        "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"),
        "peak_memory_gb": max((r.get("peak_memory_gb") or 0 for r in steps_seen), default=None),
        "first_step_seconds": steps_seen[0].get("step_time") if steps_seen else None,
        "log": [line for line in stdout.splitlines() if line.startswith(("model:", "step ", "saved "))][-12:]}
    if returncode != 0:
        result["stderr_tail"] = stderr.strip()[-4000:]
    checks = {"exit_code_0": returncode == 0, "every_step_logged": len(losses) == steps,
              "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses)}
    if not compile:
        checks["final_checkpoint_complete"] = (checkpoint / "COMPLETE").is_file()
    result["checks"] = checks
    return result


# ---- the runner's view ------------------------------------------------------------------------------------------
def plan_section(name: str, settings: Settings,
                 remaining: Callable[[], float]) -> tuple[Callable[[], dict[str, Any]], float]:
    """(the section as a function of nothing, about how many seconds it needs on the device)."""
    def subprocess_timeout() -> float:
        return max(remaining() - 5.0, 10.0)

    def compiled_trainer() -> dict[str, Any]:
        if not settings.compile:
            return {"skipped": "compilation is off (smoke mode)"}
        return trainer(settings, True, subprocess_timeout())

    def moe() -> dict[str, Any]:
        reason = _transformers_missing()
        return {"skipped": reason} if reason else device_check_moe.moe(settings, remaining)

    def kernels() -> dict[str, Any]:
        return device_check_kernels.loss_kernels(settings.device, settings.kernel_vocabs, settings.kernel_tokens,
                                                 settings.kernel_hidden)

    def packing() -> dict[str, Any]:
        heads, kv_heads, head_dim = settings.packing_heads
        return device_check_kernels.packing(settings.device, settings.packing_seq, heads, kv_heads, head_dim,
                                            compiled=settings.compile)

    table: dict[str, tuple[Callable[[], dict[str, Any]], float, float]] = {
        "environment": (lambda: environment(settings), 0, 0),
        "parity": (lambda: parity(settings), 30, 1),
        "moe": (moe, 200, 1),
        "kernels": (kernels, 15, 0),
        "packing": (packing, 40, 0),
        "trainer_eager": (lambda: trainer(settings, False, subprocess_timeout()), 60, 5),
        "train": (lambda: train(settings, "none"), 90, 1),
        "train_ac": (lambda: train(settings, "full"), 60, 1),
        "compiled_decode": (lambda: compiled_decode(settings), 45, 0),
        "decode": (lambda: decode(settings), 60, 1),
        "trainer_compiled": (compiled_trainer, 90, 0),
        "train_shapes": (lambda: train_shapes(settings, remaining), 75, 1),
    }
    fn, device_seconds, smoke_seconds = table[name]
    return fn, smoke_seconds if settings.smoke else device_seconds
