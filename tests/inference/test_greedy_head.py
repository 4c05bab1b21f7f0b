"""The int8-screened greedy head chooses what the full head chooses, and steps aside where it cannot narrow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_helpers import hf_greedy_left_padded, make_hf_model
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.inference import greedy_head
from qwenlink.inference.generate import SamplingParams, generate
from qwenlink.inference.greedy_head import ScreenedGreedyHead
from qwenlink.models.lora import LoraLinear

pytestmark = pytest.mark.skipif(not greedy_head.screening_available(),
                                reason="this PyTorch build has no oneDNN int8 linear")

VOCAB, HIDDEN = 20000, 256  # not a multiple of the 128-token blocks: the padding must never win


def _head(dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)
    nn.init.normal_(head.weight, std=0.02)
    return head


def _full_logits(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.linear(hidden, head.weight).float()  # [b, V], in the model dtype's rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chooses_the_full_heads_argmax(dtype):
    head = _head(dtype)
    screen = ScreenedGreedyHead.create(head, batch_hint=8)
    assert screen is not None
    torch.manual_seed(1)
    hidden = torch.randn(64, HIDDEN) * torch.logspace(-2, 2, 64)[:, None]  # rows of very different amplitude
    hidden[3, 7] = 40.0  # one outlier dominates that row's quantisation scale
    hidden = hidden.to(dtype)
    chosen = screen.argmax(hidden)
    logits = _full_logits(head, hidden)
    best = logits.max(dim=-1)
    if dtype == torch.float32:
        assert chosen == best.indices.tolist()
    else:  # bf16 logits tie often; the choice must be a maximal one, and the first such where ties are exact
        assert all(logits[i, c] == best.values[i] for i, c in enumerate(chosen))
    assert screen.rows_screened == 64 and screen.fallbacks == 0
    assert screen.candidates / 64 < 0.01 * VOCAB  # it narrows the choice to a sliver of the vocabulary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_bound_holds_for_worst_case_rows(dtype):
    """The margin must cover the real gap between screened and full logits, including for hidden rows built to
    make one token's quantisation errors add up (codes at +-127 with the signs of that row's int8 errors), where the
    Cauchy-Schwarz bound is nearly reached."""
    head = _head(dtype)
    screen = ScreenedGreedyHead.create(head, batch_hint=8)
    weight = head.weight.detach().float()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    error = weight - torch.round(weight / scale) * scale  # [V, H] each token's int8 error
    worst = error.norm(dim=1).topk(4).indices
    torch.manual_seed(4)
    hidden = torch.cat([torch.sign(error[worst]), -torch.sign(error[worst]), torch.randn(8, HIDDEN)]).to(dtype)
    screened, _, margin = screen.screen(hidden)
    units = 127 / hidden.float().abs().amax(dim=1, keepdim=True)  # [b, 1]
    full = _full_logits(head, hidden).double() * units.double()  # [b, V] in the screen's row units
    gap = (screened[:, :VOCAB].double() - full).abs()
    near_top = full.abs() <= screened.float().amax(dim=1, keepdim=True).abs()  # the tokens the margin is for
    assert bool((gap[near_top] <= margin.double()[:, None].expand_as(gap)[near_top]).all())
    worst_rows = torch.arange(4)
    assert float((gap[worst_rows, worst] / margin[worst_rows].double()).max()) > 0.5  # the bound is not slack


@pytest.mark.parametrize("larger_first", [False, True])
def test_near_tie_below_int8_resolution_is_decided_exactly(larger_first):
    """Two tokens whose logits differ by ~1e-5 of their size look equal to the int8 copy; the fp32 check decides."""
    head = _head(torch.float32)
    torch.manual_seed(2)
    hidden = torch.randn(1, HIDDEN)
    direction = hidden[0] / hidden[0].norm()
    low, high = (900, 17) if larger_first else (17, 900)
    with torch.no_grad():
        head.weight[low] = 0.5 * direction + 0.01 * torch.randn(HIDDEN)
        head.weight[high] = head.weight[low] + 1e-5 * direction
    screen = ScreenedGreedyHead.create(head, batch_hint=1)
    logits = _full_logits(head, hidden)
    assert logits[0, high] > logits[0, low] and logits[0].topk(2).indices.sort().values.tolist() == sorted([17, 900])
    assert screen.argmax(hidden) == [high]
    assert screen.candidates >= 2  # both survived the screen


def test_all_negative_logits_never_pick_the_padding():
    torch.manual_seed(3)
    head = nn.Linear(HIDDEN, 1000, bias=False)  # padded to 1024 rows inside the screen
    with torch.no_grad():
        head.weight.copy_(-torch.rand(1000, HIDDEN))
    hidden = torch.rand(4, HIDDEN) + 0.1
    screen = ScreenedGreedyHead.create(head, batch_hint=4)
    assert screen.argmax(hidden) == _full_logits(head, hidden).argmax(dim=-1).tolist()


def test_changed_head_is_requantised():
    head = _head(torch.float32)
    screen = ScreenedGreedyHead.create(head, batch_hint=2)
    hidden = torch.randn(2, HIDDEN)
    with torch.no_grad():
        head.weight[123] = hidden[0] / hidden[0].norm()  # now by far the best token for row 0
    assert screen.argmax(hidden)[0] == 123


def test_one_copy_per_head_shared_by_later_engines():
    head = _head(torch.float32)
    first = ScreenedGreedyHead.create(head, batch_hint=4)
    assert ScreenedGreedyHead.create(head, batch_hint=4) is first
    assert "_greedy_screen" not in head.state_dict() and ScreenedGreedyHead.create(_head(torch.float32), 4) is not first


def test_flat_logits_fall_back_to_the_full_head():
    head = _head(torch.float32)
    screen = ScreenedGreedyHead.create(head, batch_hint=1)
    assert screen.argmax(torch.zeros(1, HIDDEN)) is None  # every token ties at 0: nothing to screen out
    assert screen.fallbacks == 1
    assert screen.argmax(torch.full((1, HIDDEN), float("nan"))) is None


def test_a_kernel_that_does_not_compute_exactly_is_refused(monkeypatch):
    real = ScreenedGreedyHead._screen
    monkeypatch.setattr(ScreenedGreedyHead, "_screen", lambda self, codes: real(self, codes) * 0.99)
    assert ScreenedGreedyHead.create(_head(torch.float32), batch_hint=1) is None


def test_heads_it_cannot_stand_for_are_left_alone():
    assert ScreenedGreedyHead.create(nn.Linear(HIDDEN, 500, bias=True), batch_hint=1) is None
    assert ScreenedGreedyHead.create(nn.Linear(HIDDEN, 500, bias=False).half(), batch_hint=1) is None
    lora = LoraLinear(HIDDEN, 500, bias=False, r=4, scaling=2.0)
    assert ScreenedGreedyHead.create(lora, batch_hint=1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_through_the_screen_equals_transformers(tmp_path, dtype):
    hf, path = make_hf_model(tmp_path, vocab=3000, hidden=128, dtype=dtype)
    model = load_hf_model(path).eval()
    prompts = [[5, 17, 42, 99, 3], [7, 8], [250, 11, 12, 13, 14, 15, 16, 19, 200]]
    ours, stats = generate(model, prompts, SamplingParams(max_new_tokens=12))
    assert stats.screened_tokens == stats.generated_tokens == 36
    # Sampling, log-probs and repetition penalties need the full logits: those steps never use the screen, so the
    # full head's greedy tokens come from a run with log-probs.
    full, stats = generate(model, prompts, SamplingParams(max_new_tokens=12, logprobs=True))
    assert stats.screened_tokens == 0
    assert [r.tokens for r in ours] == [r.tokens for r in full]
    if dtype == torch.float32:
        # In bf16 a near-tie can go either way between two correct implementations: torch 2.11's CPU kernels made
        # transformers and qwenlink (screen or not) part at one step of these 36, torch 2.13's did not.
        assert [r.tokens for r in ours] == hf_greedy_left_padded(hf, prompts, 12)
