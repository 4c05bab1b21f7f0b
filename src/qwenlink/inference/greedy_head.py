"""Exact greedy decoding that reads an int8 copy of the output head instead of the whole weight.

On CPU a decode step is bound by memory reads, and the head is the largest matrix: 151936 x 512 for qwen-bench is
78M weights, 311 MB in fp32 and 155 MB in bf16, read once per step whatever the batch. A greedy step needs only the
argmax of each row's logits, not the logits themselves, so it can be found in two passes:

1. screen: multiply by an int8 copy of the head (oneDNN's u8 x s8 GEMM; a quarter of the fp32 bytes, half of bf16)
   and keep every token whose screened logit is within a proven error bound of the row's best;
2. check: recompute those few candidates exactly in the model's dtype and take the first maximum, as argmax does.

The bound (per row, in the row's own units) covers the quantisation of both operands, the rounding of the screened
output and the rounding the full-precision head itself would make, so the token chosen is one that the full head
could have chosen (the same token except where two logits tie within the model dtype's rounding, as for any change
of kernel). With codes c and error e_x for the hidden row h = c + e_x, and int8 row q_v with error e_v for the weight
row W_v = q_v + e_v (scales folded in):
    h.W_v - c.q_v = c.e_v + e_x.q_v + e_x.e_v,  |.| <= |c| |e_v| + |e_x| (|q_v| + |e_v|)   (Cauchy-Schwarz),
with |e_v| and |q_v| maximised over the vocabulary once when the copy is made and |c|, |e_x| measured per row.
With random weights (qwen-bench) ~70 tokens a row survive the screen, 0.05% of the vocabulary.

Only the x86 oneDNN kernels with exact 32-bit integer accumulation are used: a self-check against exact integer
arithmetic runs when the copy is made, and on any mismatch (e.g. a CPU whose kernel saturates 16-bit sums) the
engine keeps using the full head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qwenlink.inference.prepack import PrepackedLinear, weight_key

Tensor = torch.Tensor

_CHUNK = 128  # screened logits are reduced in blocks of this many tokens, then only the blocks that can win are read
_ROW_BLOCK = 16384  # vocabulary rows quantised at a time (bounds the temporary fp32 copy)
_MAX_CANDIDATES_PER_ROW = 4096  # beyond this the bound is too loose to pay off: use the full head for the step


def screening_available() -> bool:
    """Whether this PyTorch build has oneDNN's int8 linear (the kernels inductor uses for quantised x86 models)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_prepack") and hasattr(torch.ops.onednn, "qlinear_pointwise"))


class ScreenedGreedyHead:
    """Greedy token choice for a bias-free head `[V, H]` (model dtype fp32 or bf16) from final hidden states."""

    def __init__(self, head: nn.Linear, batch_hint: int) -> None:
        self.head = head
        self.batch_hint = batch_hint
        # Totals over calls, for judging how well the screen narrows on a given model.
        self.rows_screened = self.candidates = self.fallbacks = 0
        self._key: Optional[tuple] = None
        self._build()

    @classmethod
    def create(cls, head: Optional[nn.Module], batch_hint: int) -> Optional["ScreenedGreedyHead"]:
        """A screen for `head`, or None where it does not apply (no oneDNN int8, non-CPU, sharded, biased, fp16,
        adapter-wrapped, or a kernel that failed the self-check)."""
        weight = getattr(head, "weight", None)
        # Exact types only: an adapter-wrapped head (LoRA) adds to the weight's output, which the copy would miss.
        if (not screening_available() or type(head) not in (nn.Linear, PrepackedLinear) or weight is None
                or getattr(head, "bias", None) is not None or hasattr(weight, "to_local")
                or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
                or weight.dim() != 2):
            return None
        # One copy per head, kept on the module like a prepacked weight: engines built one after another on the
        # same model (`generate()` in a loop, chat sessions) reuse it; it requantises itself if the weight changes.
        screen = head.__dict__.get("_greedy_screen")
        if screen is None:
            screen = cls(head, batch_hint)
            head.__dict__["_greedy_screen"] = screen
        return screen if screen.usable else None

    # ---- the int8 copy ----------------------------------------------------------------------------------------------
    def _weight_key(self) -> tuple:
        return weight_key(self.head.weight)

    @torch.no_grad()
    def _build(self) -> None:
        weight = self.head.weight.detach()
        vocab, hidden = weight.shape
        padded = -(-vocab // _CHUNK) * _CHUNK  # whole blocks; padding rows are zero and masked out of every step
        quantised = torch.zeros((padded, hidden), dtype=torch.int8)
        scales = torch.ones(padded, dtype=torch.float32)
        weight_norm = quantised_norm = error_norm = 0.0
        for start in range(0, vocab, _ROW_BLOCK):
            block = weight[start:start + _ROW_BLOCK].float()  # [n, H]
            scale = block.abs().amax(dim=1) / 127.0  # [n] symmetric per-token scale
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(block / scale[:, None]).clamp_(-127, 127)  # [n, H], integers
            error = block - q * scale[:, None]
            quantised[start:start + len(block)] = q.to(torch.int8)
            scales[start:start + len(block)] = scale
            weight_norm = max(weight_norm, float(block.norm(dim=1).max()))
            quantised_norm = max(quantised_norm, float((q * scale[:, None]).norm(dim=1).max()))
            error_norm = max(error_norm, float(error.norm(dim=1).max()))
        self.vocab, self.hidden, self.padded = vocab, hidden, padded
        self._scales = scales
        self._zero_points = torch.zeros(padded, dtype=torch.long)
        self._packed = torch.ops.onednn.qlinear_prepack(quantised, [self.batch_hint, hidden])
        self._weight_norm, self._quantised_norm, self._error_norm = weight_norm, quantised_norm, error_norm
        # Relative rounding of the full head's output in the model dtype (a bf16 or fp32 unit roundoff).
        self._output_rounding = 2.0 ** -8 if weight.dtype == torch.bfloat16 else 2.0 ** -24
        self._key = self._weight_key()
        self.usable = self._self_check(quantised)

    def _screen(self, codes: Tensor) -> Tensor:
        """u8 codes [b, H] (zero point 128) -> screened logits [b, padded] = sum(code * q_v) * scale_v, in bf16."""
        return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, self._packed, self._scales, self._zero_points,
                                                  None, 1.0, 0, torch.bfloat16, "none", [], "")

    def _self_check(self, quantised: Tensor) -> bool:
        """Compare the int8 kernel with exact integer arithmetic on extreme inputs: all codes at +-127 with the
        signs of a few vocabulary rows (the case that overflows 16-bit pair sums on kernels without VNNI), checked
        on those rows and the first 2048."""
        picked = torch.arange(0, self.vocab, max(1, self.vocab // 4))[:4]
        signs = torch.where(quantised[picked] >= 0, 127, -127)  # [4, H]
        codes = torch.cat([signs, -signs, torch.full_like(signs[:1], 127)])  # [9, H]
        columns = torch.cat([picked, torch.arange(min(self.vocab, 2048))])
        exact = (codes.double() @ quantised[columns].double().t()) * self._scales[columns].double()  # [9, n]
        got = self._screen((codes + 128).to(torch.uint8))[:, columns].double()
        # bf16 output: each value within half a bf16 ulp of the exact product.
        return bool(((got - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all())

    # ---- choosing tokens ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def screen(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Screened logits of hidden [b, H], each row in its own units (scaled by 127 / max |h|).

        Returns (logits [b, padded] in bf16, padding at -inf; their maxima per 128-token block [b, C]; margin [b]:
        how far a screened logit of a token that can win may be from the full head's, in the same units)."""
        x = hidden.float()  # [b, H]
        b = x.shape[0]
        # Per-row symmetric quantisation to codes in [-127, 127].
        amplitude = x.abs().amax(dim=1, keepdim=True)  # [b, 1]
        amplitude = torch.where(amplitude > 0, amplitude, torch.ones_like(amplitude))
        x_units = x * (127.0 / amplitude)  # [b, H]
        codes = torch.round(x_units)
        x_error = x_units - codes  # [b, H], |.| <= 1/2
        screened = self._screen((codes + 128).to(torch.uint8))  # [b, padded]
        if self.padded != self.vocab:
            screened[:, self.vocab:] = float("-inf")
        block_max = screened.view(b, -1, _CHUNK).amax(dim=-1).float()  # [b, C]
        row_max = block_max.amax(dim=-1)  # [b]
        # Quantisation (Cauchy-Schwarz on codes.e_v + e_x.q_v + e_x.e_v), the fp32 accumulation of the reference,
        # and the relative roundings of the bf16 screened output and of the reference's output for the logits that
        # can win (|logit| <= |max| + 4 margin).
        x_norm, c_norm, e_norm = x_units.norm(dim=1), codes.norm(dim=1), x_error.norm(dim=1)  # [b]
        quant = c_norm * self._error_norm + e_norm * (self._quantised_norm + self._error_norm)
        accumulation = x_norm * self._weight_norm * (self.hidden * 2.0 ** -24)
        relative = 2.0 ** -8 + self._output_rounding
        margin = (quant + accumulation + relative * row_max.abs()) / (1 - 4 * relative) * 1.01  # [b]
        return screened, block_max, margin

    @torch.no_grad()
    def argmax(self, hidden: Tensor) -> Optional[list[int]]:
        """hidden [b, H] (final-normed, the head's input) -> the greedy token of each row, or None when the screen
        would keep too many candidates (then the caller applies the full head)."""
        if self._weight_key() != self._key:
            self._build()  # the head was changed in place or replaced since the copy was made
        if not self.usable or not bool(torch.isfinite(hidden).all()):
            return None  # non-finite states: leave them to the full head, which propagates them as it always did
        b = hidden.shape[0]
        screened, block_max, margin = self.screen(hidden)
        threshold = block_max.amax(dim=-1) - 2 * margin  # [b]; the full head's choice scores at least this
        blocks = screened.view(b, -1, _CHUNK)  # [b, C, 128]
        row_idx, block_idx = (block_max >= threshold[:, None]).nonzero(as_tuple=True)  # blocks that may win
        values = blocks[row_idx, block_idx].float()  # [k, 128]
        keep_k, keep_j = (values >= threshold[row_idx, None]).nonzero(as_tuple=True)
        if len(keep_k) > b * _MAX_CANDIDATES_PER_ROW:
            self.fallbacks += 1
            return None
        self.rows_screened += b
        self.candidates += len(keep_k)
        rows = row_idx[keep_k]  # [n] candidate (row, token) pairs
        tokens = block_idx[keep_k] * _CHUNK + keep_j
        # Exact logits of the candidates, rounded to the model dtype like the full head's output.
        weight = self.head.weight.detach()
        # index_select: a few hundred scattered rows, ~5x faster than advanced indexing here
        exact = (hidden.index_select(0, rows).float() * weight.index_select(0, tokens).float()).sum(dim=-1)
        exact = exact.to(weight.dtype).float()  # [n]
        best = torch.full((b,), float("-inf")).scatter_reduce(0, rows, exact, "amax")  # [b]
        first = torch.where(exact == best[rows], tokens, self.vocab)
        chosen = torch.full((b,), self.vocab, dtype=torch.long).scatter_reduce(0, rows, first, "amin")  # [b]
        return chosen.tolist()
