"""The `qwenlink` command line: argument parsing only; each subcommand calls one function elsewhere.

Each subcommand is declared by a `_add_<name>` function that builds its parser and sets `func` to a runner made by
`_lazy`, which imports the implementing module only when the subcommand runs (so `qwenlink --help` stays fast and a
broken optional feature cannot break the others).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from typing import Callable, Sequence

from qwenlink import __version__
from qwenlink.errors import QwenlinkError
from qwenlink.signals import Terminated, terminate_as_exception


def _lazy(module: str, function: str, *fields: str, **keyword_fields: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand's runner that imports `module` only when that subcommand runs, so `qwenlink --help` stays fast
    and a broken optional feature cannot break the others.

    The runner calls `function(args)`; when `fields` or `keyword_fields` name attributes of `args`, it calls
    `function(*those attributes, **{keyword: that attribute})` instead, for functions that take plain values.
    """

    def run(args: argparse.Namespace) -> int:
        target = getattr(importlib.import_module(module), function)
        if not fields and not keyword_fields:
            return target(args)
        return target(*(getattr(args, f) for f in fields),
                      **{key: getattr(args, name) for key, name in keyword_fields.items()})

    return run


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's architecture, parameter count and training FLOPs per token",
                       description="Show a preset's or a model directory's architecture, parameters and FLOPs/token.")
    p.add_argument("model", nargs="?", help="a preset name (see --list) or an HF model directory")
    p.add_argument("--list", action="store_true", help="list the built-in presets")
    p.add_argument("--seq-length", type=int, default=None, help="sequence length for the attention FLOPs term "
                   "(default: 8192, the ModelLink recipes' length)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p.set_defaults(func=_lazy("qwenlink.commands.info", "run_info", "model", seq_length="seq_length", as_json="json",
                              list_presets="list"))


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory or preset name (random weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or `default` (default: the model "
                   "directory's own tokenizer, else the embedded Qwen vocabulary)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, npu... (default: the best available)")
    p.add_argument("--lora", metavar="ADAPTER_DIR", default=None, help="apply a PEFT LoRA adapter (unmerged); "
                   "fails if it does not match the model")
    p.add_argument("--no-prepack", dest="prepack", action="store_false",
                   help="on CPU, keep the plain linear kernels instead of oneDNN-prepacked weights and the int8 "
                   "screen of the head for greedy steps (both decode faster but hold extra copies of the weights)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd step (CUDA graphs on GPU; compiling takes seconds "
                   "to a minute at start-up; one process only)")
    _add_prefill_chunk(p)


def _add_prefill_chunk(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-chunk", type=int, default=2048, metavar="N",
                   help="prompt tokens one prefill forward takes; longer prompts (up to the model's max positions) "
                   "are prefilled N at a time with the same result, memory linear in the prompt (default 2048)")


def _add_sampling_options(p: argparse.ArgumentParser, *, default_max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=default_max_new)
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="pick the most likely token each step (default)")
    sampling.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style repetition penalty (1: off)")
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from prompts with a KV cache",
                       description="Generate completions for prompts (batched; prefill once, then one token per step).")
    _add_model_options(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input", default=None, help="JSONL file: one {\"prompt\": ...} or {\"messages\": [...]} per line")
    p.add_argument("--output", default=None, help="write JSONL results (text, tokens, timings) to this file")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the ChatML template")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    _add_sampling_options(p, default_max_new=64)

    p.set_defaults(func=_lazy("qwenlink.commands.generate", "run_generate"))


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive terminal chat (ChatML, streaming)",
                       description="Chat with a model in the terminal. Commands: /clear, /system TEXT, /quit.")
    _add_model_options(p)
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--max-history-tokens", type=int, default=4096,
                   help="drop the oldest turns when the conversation grows beyond this many tokens")
    _add_sampling_options(p, default_max_new=512)

    p.set_defaults(func=_lazy("qwenlink.inference.chat", "run_chat"))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                       description="Serve a model over an OpenAI-compatible API with continuous batching. The KV "
                       "cache holds --max-batch rows of --max-context tokens; at start-up it is sized to its memory "
                       "budget (--cache-memory, or --cache-memory-fraction of the memory free once the model is "
                       "loaded): fewer rows are served when they do not all fit (said at start-up), and the server "
                       "refuses to start when not even one does.")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the --model name)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set QWENLINK_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV cache rows); fewer "
                   "when that many rows of --max-context do not fit the cache's memory")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="tokens per request, prompt + completion; longer requests get HTTP 413 (default: "
                   "--max-prompt-tokens + --max-tokens-limit, at most the model's max_position_embeddings)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cache-memory-fraction", type=float, default=None, metavar="F",
                        help="the KV cache may use this fraction of the memory free once the model is loaded: the "
                        "accelerator's, or on CPU the host's available memory (default 0.9)")
    budget.add_argument("--cache-memory", default=None, metavar="SIZE",
                        help="the KV cache's size instead, e.g. 24G or 512M (powers of 1024); per process under "
                        "torchrun")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: --max-context when given, else 8192)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before answering 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)

    p.set_defaults(func=_lazy("qwenlink.commands.serve", "run_serve"))


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="tokenize raw or instruction data into Megatron .bin/.idx files",
                       description="Tokenize parquet / arrow / csv / json / jsonl / txt files into Megatron indexed "
                       "datasets named as ModelLink names them (PREFIX_text_document, PREFIX_packed_*_document).")
    p.add_argument("--input", help="a data file, or a directory of them (read in sorted order)")
    p.add_argument("--tokenizer", default="default", help="HF tokenizer directory or `default` (embedded Qwen1.5)")
    p.add_argument("--tokenizer-name-or-path", dest="tokenizer", help="ModelLink's name for --tokenizer")
    p.add_argument("--output-prefix", help="output path prefix")
    p.add_argument("--handler", default="pretrain", choices=["pretrain", "alpaca", "sharegpt", "chat", "pairwise"],
                   help="pretrain: raw text; alpaca: instruction/input/output; sharegpt/chat: multi-turn messages; "
                   "pairwise: a prompt with chosen / rejected replies (DPO, docs/dpo.md)")
    p.add_argument("--handler-name", dest="handler_alias", default=None,
                   help="ModelLink handler names (GeneralPretrainHandler, AlpacaStyleInstructionHandler, "
                   "SharegptStyleInstructionHandler) are accepted too")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="text columns for --handler pretrain "
                   "(each becomes PREFIX_{key}_document)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    p.add_argument("--seq-length", type=int, default=None, help="longest sample kept, in tokens")
    p.add_argument("--overlong", default="drop", choices=["drop", "truncate"],
                   help="what to do with samples longer than --seq-length (default: drop; the summary counts them)")
    p.add_argument("--template", default="chatml", choices=["chatml", "alpaca"],
                   help="prompt format for instruction data (chatml: Qwen1.5 chat; alpaca: ModelLink's)")
    p.add_argument("--prompt-type", dest="template_alias", default=None, help="ModelLink's name for --template "
                   "(qwen -> chatml, alpaca -> alpaca)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output does not depend on it)")
    p.add_argument("--log-interval", type=int, default=10000, help="records between progress lines off a terminal")
    p.add_argument("--batch-size", type=int, default=1000, help="records per work unit")
    p.add_argument("--inspect", metavar="PREFIX", help="instead: validate an existing PREFIX.bin/.idx and print its "
                   "size, dtype and first document")

    p.set_defaults(func=_lazy("qwenlink.commands.preprocess", "run_preprocess"))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="multiple-choice accuracy (MMLU, C-Eval, your own task) scored as lm-eval does",
                       description="Score MMLU, C-Eval or a user task (FILE.toml) by log-likelihood of each choice, "
                       "with lm-evaluation-harness' prompts and definitions; per-subject and per-category report.")
    p.add_argument("--model", default=None, help="HF model directory or preset name (random weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or `default` (default: the model's own)")
    p.add_argument("--task", default="mmlu", help="mmlu, ceval, or a task description FILE.toml (default: mmlu)")
    p.add_argument("--data", default=None, help="data folder (mmlu: dev/ + test/; ceval: dev/ + val/), or for a "
                   ".toml task a questions file replacing the one it names")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples: the first k dev rows (default: 5)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects to run (default: all)")
    p.add_argument("--split", default=None, help="split to score (mmlu: test or val; ceval: val)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions of each subject")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="longest model input; longer prompts are cut from "
                   "the left as lm-eval does (default: the model's max_position_embeddings)")
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true", help="include per-question log-likelihoods in the JSON")
    p.add_argument("--compare", action="store_true", help="print Qwen's published figure for a known model size")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template "
                   "(for chat models; not lm-eval's convention, so not comparable with base-model numbers)")
    p.add_argument("--list-subjects", action="store_true", help="list the task's subjects and categories")
    p.add_argument("--padding-side", default="left", choices=["left", "right"], help="batch layout (right: "
                   "lm-eval's own, computing every position's logits; slower)")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute the shared few-shot prefix per batch")
    _add_prefill_chunk(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, npu... (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; 1 is "
                   "often fastest for small models on a busy machine)")

    p.set_defaults(func=_lazy("qwenlink.commands.eval", "run_eval"))


class _OverrideParser(argparse.ArgumentParser):
    """A subcommand parser that collects `--section.key=value` / `--section.key value` words into `args.overrides`
    (config overrides cannot be declared as options: the keys are those of the job config)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        words = list(sys.argv[1:] if args is None else args)
        overrides, rest, i = [], [], 0
        while i < len(words):
            word = words[i]
            name = word[2:].split("=", 1)[0]
            if word.startswith("--") and "." in name and not name.startswith("."):
                if "=" not in word and i + 1 < len(words) and not words[i + 1].startswith("--"):
                    word, i = f"{word}={words[i + 1]}", i + 1
                overrides.append(word)
            else:
                rest.append(word)
            i += 1
        namespace, extra = super().parse_known_args(rest, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, extra


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain or fine-tune from a TOML job config",
                       description="Train (pretrain / sft) from a TOML job config; any `--section.key=value` overrides "
                       "a config value (e.g. --optim.lr=3e-4 --train.train_iters=100). Resumes from the run's latest "
                       "checkpoint; SIGTERM/SIGINT saves a checkpoint before exiting.")
    p.__class__ = _OverrideParser
    p.add_argument("--config", default=None, help="TOML job config (see configs/); omitted: defaults + overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--nproc", type=int, default=None, help="start N processes on this machine (runs torchrun "
                   "--standalone --nproc-per-node N for you); multi-node: launch with torchrun, see docs/parallel.md")
    p.set_defaults(overrides=[])

    p.set_defaults(func=_lazy("qwenlink.commands.train", "run_train"))


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="will a training job fit its devices, and how fast will it run",
                       description="Simulate one training step of each rank role of a job (pipeline rank x tensor "
                       "rank) on fake tensors with a fake process group of the job's world size, through the "
                       "trainer's own code, and report per-device memory (parameters, gathered parameters, "
                       "gradients, optimizer state, activations; the largest contributors), whether it fits, the "
                       "estimated step time and tokens/s/device, and the bytes each mesh dimension communicates. "
                       "Allocates nothing. Exit status 3 when it does not fit. Any `--section.key=value` overrides "
                       "a config value.")
    p.__class__ = _OverrideParser
    p.add_argument("--config", required=True, help="TOML job config (see configs/)")
    p.add_argument("--world-size", type=int, default=None, help="processes (default: the config's `# plan:` "
                   "header line, else the layout's smallest world)")
    p.add_argument("--device", default=None, help="h100, h200, a100-80g, 910b or cpu (default: the config's "
                   "`# plan:` header line, else h100)")
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="memory per device instead of the "
                   "device's, e.g. 64GiB")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for the step time "
                   "(default 0.40)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS", help="limit for each rank role's "
                   "simulation (default 900; a 72B tp8 x pp8 role with virtual stages takes minutes on a busy CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(overrides=[])

    p.set_defaults(func=_lazy("qwenlink.commands.plan", "run_plan"))


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot a run's loss / lr / throughput curves to a PNG",
                       description="Read RUN_DIR/metrics.jsonl and write loss, learning rate, tokens/s per device and "
                       "gradient norm curves to RUN_DIR/metrics.png (with matplotlib when installed, else a built-in PNG writer).")
    p.add_argument("run_dir", help="a training run's output directory (job.output_dir)")
    p.add_argument("--output", "-o", default=None, help="PNG path (default: RUN_DIR/metrics.png)")

    p.set_defaults(func=_lazy("qwenlink.commands.plot", "run_plot", "run_dir", "output"))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between HF, qwenlink and Megatron (any TP/PP/VPP)",
                       description="Convert a model between an HF directory, a qwenlink checkpoint and Megatron "
                       "layouts (megatron-core or legacy ModelLink naming). The input format is detected.")
    p.add_argument("--input", required=True, help="HF dir, qwenlink checkpoint, or Megatron dir")
    p.add_argument("--output", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=["hf", "qwenlink", "megatron", "megatron-legacy", "peft"],
                   help="peft: the adapters of a LoRA run's checkpoint as a PEFT adapter directory (other formats "
                   "get a LoRA checkpoint's base with its adapters merged)")
    p.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="Megatron expert-parallel size (mixture of experts: routed "
                   "experts split over EP ranks, mp_rank_TT[_PPP]_EEE directories)")
    vpp = p.add_mutually_exclusive_group()
    vpp.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per pipeline rank")
    vpp.add_argument("--layers-per-virtual-stage", type=int, default=None,
                     help="layers per virtual pipeline chunk (Megatron's --num-layers-per-virtual-pipeline-stage)")
    p.add_argument("--num-layer-list", default=None, help="uneven pipeline stages, e.g. 6,7,7,6 (ModelLink)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="output dtype (default: input's)")
    p.add_argument("--iteration", default="1", help="Megatron output iteration number or `release` (default: 1)")
    p.add_argument("--input-iteration", default=None, help="Megatron input iteration to read (default: the one "
                   "latest_checkpointed_iteration.txt names)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Megatron vocab padding: to a multiple of this x TP (default: 128; ModelLink used 1)")
    p.add_argument("--format", default="torch", choices=["torch", "torch_dist"],
                   help="Megatron output storage (Megatron's --ckpt-format): torch (mp_rank_* files, default) or "
                   "torch_dist (megatron-core's distributed checkpoint); Megatron input is detected")
    p.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                   help="megatron-core norm naming: local spec (default) or Transformer Engine fused norms")
    p.add_argument("--config-from", default=None, help="HF dir whose config.json (and tokenizer) describe a Megatron "
                   "input exactly (eps, rope theta, true vocab size), as ModelLink's --save-dir does")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir to copy into HF output")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--merge-lora", metavar="ADAPTER_DIR", default=None, help="fold a PEFT LoRA adapter "
                   "(adapter_config.json + adapter_model.safetensors) into the input's weights; fails if it does "
                   "not match the model")
    p.add_argument("--chat", default="auto", choices=["auto", "yes", "no"], help="HF output: was the model trained "
                   "with ChatML? yes: generation_config.json stops at <|im_end|> (eos [151645, 151643], as "
                   "Qwen1.5-Chat); no: at <|endoftext|> (as Qwen1.5 base); auto (default): the input's own generation "
                   "config, or what the run that wrote a qwenlink checkpoint trained on")

    p.set_defaults(func=_lazy("qwenlink.commands.convert", "run_convert"))


# Subcommands in the order `qwenlink --help` lists them. Later features append their `_add_<name>` here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_info,
    _add_generate,
    _add_chat,
    _add_serve,
    _add_convert,
    _add_preprocess,
    _add_eval,
    _add_train,
    _add_plan,
    _add_plot,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenlink",
        description="Train, convert, serve and evaluate Qwen1.5-family models on PyTorch's native distributed stack.",
    )
    parser.add_argument("--version", action="version", version=f"qwenlink {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def close_process_group() -> None:
    """Tear down the process group a command joined under torchrun (generate, chat, serve and eval under tensor
    parallelism; train does so itself) before the interpreter exits. Left to interpreter shutdown, gloo's threads
    can be destroyed while still joinable, and the process then aborts after its work is done ("terminate called
    without an active exception": a tp2 `generate` ended with -6 once in CI). Only after success: after an error a
    peer may still be inside a collective, and torchrun ends the ranks anyway."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for a command that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--debug` is accepted anywhere on the line, not only before the subcommand.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # The trainer handles SIGTERM itself (finish the step, save); every other command unwinds as on Ctrl-C.
    handle_signals = terminate_as_exception() if args.command != "train" else contextlib.nullcontext()
    try:
        with handle_signals:
            code = int(args.func(args) or 0)
        if code == 0:
            close_process_group()
        return code
    except Terminated as exc:
        print(f"qwenlink {args.command}: stopped by {exc.name}; partial outputs were removed", file=sys.stderr)
        return exc.exit_code
    except QwenlinkError as exc:
        if debug:
            traceback.print_exc()
        print(f"qwenlink {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwenlink {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or an input problem we failed to name: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"qwenlink {args.command}: internal error: {type(exc).__name__}: {first} "
                  f"(rerun with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
