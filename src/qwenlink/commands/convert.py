"""`qwenlink convert`: parse the user's options into ConvertOptions and report what was written."""

from __future__ import annotations

import argparse
import time

from qwenlink.checkpoint.convert import ConvertOptions, convert
from qwenlink.checkpoint.dtypes import parse_dtype
from qwenlink.checkpoint.megatron import parse_iteration
from qwenlink.errors import QwenlinkError


def _layer_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QwenlinkError(f"--num-layer-list {text!r}: expected comma-separated integers, e.g. 6,7,7,6") from None


def run_convert(args: argparse.Namespace) -> int:
    opts = ConvertOptions(
        to=args.to, tp=args.tp, pp=args.pp, vpp=args.vpp, layers_per_virtual_stage=args.layers_per_virtual_stage,
        num_layer_list=_layer_list(args.num_layer_list), dtype=parse_dtype(args.dtype),
        iteration=parse_iteration(args.iteration),
        input_iteration=parse_iteration(args.input_iteration, "--input-iteration") if args.input_iteration else None,
        divisible_by=args.make_vocab_size_divisible_by, transformer_impl=args.transformer_impl,
        config_from=args.config_from, tokenizer_dir=args.tokenizer, overwrite=args.overwrite,
        merge_lora=getattr(args, "merge_lora", None), chat=getattr(args, "chat", "auto"),
        storage=getattr(args, "format", "torch"), ep=getattr(args, "ep", 1))
    start = time.perf_counter()
    out = convert(args.input, args.output, opts)
    print(f"wrote {args.to} checkpoint to {out} in {time.perf_counter() - start:.1f}s")
    return 0
