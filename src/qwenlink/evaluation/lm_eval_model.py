"""qwenlink as an lm-evaluation-harness model (`--model qwenlink`), for any lm-eval task.

`qwenlink eval` covers multiple-choice tasks without lm-eval installed; this adapter runs lm-eval's own task
definitions on a qwenlink-loaded model (HF directory, qwenlink or Megatron checkpoint, LoRA run, preset) with the
KV-cache engine for generative tasks:

    python -m qwenlink.evaluation.lm_eval_model run --model qwenlink --model_args pretrained=DIR,dtype=bf16 --tasks ...

(the module registers the model, then hands its arguments to lm-eval's command line), or from Python after
`import qwenlink.evaluation.lm_eval_model`: `lm_eval.simple_evaluate(model="qwenlink", model_args=...)`.
It follows lm-eval's HF model (`HFLM`) request by request: the same context/continuation split, left truncation to
`max_length`, greedy check, rolling windows and stop sequences (tested against HFLM on the same weights). One process;
lm-eval is a test extra, not a runtime dependency, so this module needs it installed.
"""

from __future__ import annotations

from typing import Optional

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from qwenlink.evaluation.harness import LoglikelihoodScorer, TokenRequest
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.sampling import SamplingParams
from qwenlink.inference.session import open_session


@register_model("qwenlink")
class QwenlinkLM(TemplateLM):
    """model_args: pretrained (what `--model` accepts), dtype (fp32 | bf16 | fp16), device, tokenizer, batch_size,
    max_length (default: the model's context), max_gen_toks (default 256)."""

    def __init__(self, pretrained: str, dtype: str = "fp32", device: Optional[str] = None,
                 tokenizer: Optional[str] = None, batch_size: int | str = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, **_: object) -> None:
        super().__init__()
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's command line asks for cuda by default; like HFLM, use what this machine has
        session = open_session(str(pretrained), tokenizer=tokenizer, device=device, dtype=dtype)
        self.model = session.model.eval()
        self.tok = session.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not probed: 8
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        eos = self.tok.eos_id
        self._eot = eos if eos is not None else self.tok.token_to_id("<|endoftext|>")
        self._engine: Optional[Engine] = None  # built on the first generative request
        self._scorer = LoglikelihoodScorer(self.model, self.tok, batch_size=self.batch_size,
                                           max_length=self.max_length, prefix_token_id=self.prefix_token_id)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **_: object) -> list[int]:
        return self.tok.encode(string)  # Qwen adds no BOS

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)  # generated text, as HFLM decodes it

    # ---- scoring ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None,
                              **_: object) -> list[tuple[float, bool]]:
        """(request, context ids, continuation ids) -> (sum of the continuation's log-probs, all of it greedy), by
        `qwenlink eval`'s scorer (harness.py: the same truncation as lm-eval, few-shot prefixes computed once)."""
        scored = [i for i, (_, _, continuation) in enumerate(requests) if continuation]
        scores = self._scorer.loglikelihood_tokens([TokenRequest(tuple(requests[i][1]), tuple(requests[i][2]))
                                                    for i in scored])
        results = [(0.0, True)] * len(requests)  # an empty continuation: nothing to score, as HFLM
        for i, score in zip(scored, scores):
            results[i] = (score.logprob, score.is_greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring of whole strings in disjoint windows of max_length tokens, as HFLM does."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                               prefix_token=self.prefix_token_id,
                                                               max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    # ---- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations cut at the first stop sequence, all batched through
        one engine (continuous batching). The engine ends a request at the eos token (HFLM's eos stop sequence) and
        cuts its text before the earliest stop string, as HFLM does."""
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]  # left truncation, as HFLM
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                    stop_ids=frozenset({self.eot_token_id}), stop_strings=tuple(s for s in until if s))
            jobs.append(Request(prompt, params, decode=self.tok_decode))
        if not jobs:
            return []
        # The cache is sized to these requests (the longest prompt + its max_gen_toks), not to the model's 32K.
        need = min(self.max_length, max(len(job.prompt) + job.params.max_new_tokens for job in jobs))
        if self._engine is None:
            self._engine = Engine(self.model, max_batch=self.batch_size, max_length=need)
        self._engine.reserve(need)
        self._engine.run(jobs)
        return [request.text for request in jobs]


def main() -> None:
    """`python -m qwenlink.evaluation.lm_eval_model ARGS`: lm-eval's command line with the qwenlink model known."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
