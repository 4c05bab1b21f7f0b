"""`qwenlink preprocess`: raw text / instruction data -> Megatron `.bin/.idx` files named as ModelLink names them."""

from __future__ import annotations

import argparse
import sys

from qwenlink.data.handlers import HandlerOptions
from qwenlink.data.preprocess import PreprocessConfig, preprocess, single_threaded_tokenizers
from qwenlink.errors import QwenlinkError

# ModelLink's names, so existing launch scripts keep working.
MODELLINK_HANDLERS = {"GeneralPretrainHandler": "pretrain", "GeneralInstructionHandler": "alpaca",
                      "AlpacaStyleInstructionHandler": "alpaca", "SharegptStyleInstructionHandler": "sharegpt",
                      "AlpacaStylePairwiseHandler": "pairwise", "SharegptStylePairwiseHandler": "pairwise"}
MODELLINK_PROMPT_TYPES = {"qwen": "chatml", "chatml": "chatml", "alpaca": "alpaca"}


def _alias(value: str | None, table: dict[str, str], option: str, default: str) -> str:
    if value is None:
        return default
    if value not in table:
        raise QwenlinkError(f"{option} {value!r} is not supported (expected one of {', '.join(table)})")
    return table[value]


def run_preprocess(args: argparse.Namespace) -> int:
    """Build the job from parsed arguments, run it, print the summary to stdout."""
    if args.inspect:
        return inspect(args.inspect, args.tokenizer)
    for option, value in (("--input", args.input), ("--output-prefix", args.output_prefix)):
        if not value:
            raise QwenlinkError(f"{option} is required (or use --inspect PREFIX)")
    single_threaded_tokenizers()
    keys = tuple(k for part in args.json_keys for k in part.split(",") if k)
    handler = _alias(getattr(args, "handler_alias", None), MODELLINK_HANDLERS, "--handler-name", args.handler)
    template = _alias(getattr(args, "template_alias", None), MODELLINK_PROMPT_TYPES, "--prompt-type", args.template)
    options = HandlerOptions(handler=handler, json_keys=keys or ("text",), append_eod=args.append_eod,
                             seq_length=args.seq_length, overlong=args.overlong, template=template)
    cfg = PreprocessConfig(input=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                           options=options, workers=args.workers, batch_size=args.batch_size,
                           log_interval=args.log_interval)
    summary = preprocess(cfg)
    for line in summary.lines(options):
        print(line, file=sys.stdout)
    return 0


def inspect(prefix: str, tokenizer_spec: str) -> int:
    """Open (and so validate) an indexed dataset; print its shape and the start of its first document."""
    from qwenlink.data.indexed import IndexedDataset
    from qwenlink.tokenizer import load_tokenizer

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    print(f"{prefix}: {ds.num_documents:,} documents, {len(ds):,} sequences, {ds.num_tokens:,} tokens, "
          f"dtype {ds.dtype}")
    if len(ds):
        print(f"sequence length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
        first = ds[0][:64].tolist()
        print(f"first document (up to 64 tokens): {load_tokenizer(tokenizer_spec).decode(first)!r}")
    return 0
