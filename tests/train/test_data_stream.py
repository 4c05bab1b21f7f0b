"""The trainer's micro-batch stream: reading ahead in a thread changes nothing about what it hands out."""

from __future__ import annotations

import pytest
import torch

from qwenlink.errors import QwenlinkError
from qwenlink.train.config import load_config
from qwenlink.train.data import MicroBatchStream


class Samples(torch.utils.data.Dataset):
    """Sample i is the tokens i, i+1, ... (so every batch says where it came from); reading `bad` fails."""

    def __init__(self, n: int, bad: int = -1) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.bad:
            raise QwenlinkError(f"sample {i}: corrupt")
        ids = torch.arange(i, i + 4)
        return {"input_ids": ids, "labels": ids + 1}


def stream(dataset, **kwargs) -> MicroBatchStream:
    cfg = load_config(None, ["--job.mode=pretrain", "--data.seq_length=4", "--data.path=unused"])
    return MicroBatchStream(dataset, cfg, micro_batch_size=2, dp_rank=1, dp_size=2, consumed_samples=4, **kwargs)


def test_read_ahead_hands_out_the_same_batches_across_close_and_restart() -> None:
    plain = stream(Samples(64))
    expected = [plain.next().input_ids for _ in range(20)]
    ahead = stream(Samples(64), prefetch=3)
    got = [ahead.next().input_ids for _ in range(7)]
    ahead.close()  # as train() does when it returns; a later train() continues where this one stopped
    assert ahead._thread is None and len(ahead._ready) >= 1  # what was read ahead is kept, not dropped
    got += [ahead.next().input_ids for _ in range(13)]
    ahead.close()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_a_read_error_is_raised_by_the_next_that_would_return_that_batch() -> None:
    order = [stream(Samples(64)).next().input_ids[:, 0].tolist() for _ in range(1)]  # first batch's samples
    bad = stream(Samples(64)).sampler  # the third batch holds the sample made unreadable below
    batches = iter(bad)
    third = [next(batches) for _ in range(3)][2]
    ahead = stream(Samples(64, bad=third[0]), prefetch=4)
    assert ahead.next().input_ids[:, 0].tolist() == order[0]
    ahead.next()
    with pytest.raises(QwenlinkError, match=f"sample {third[0]}: corrupt"):
        ahead.next()
    assert ahead._thread is None  # the reader stopped
