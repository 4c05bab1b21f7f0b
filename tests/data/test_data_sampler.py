"""The resumable data-parallel batch sampler."""

from __future__ import annotations

import itertools

import pytest

from qwenlink.data.sampler import ResumableBatchSampler
from qwenlink.errors import QwenlinkError


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_continues_exactly(shuffle):
    full = list(ResumableBatchSampler(103, micro_batch_size=4, dp_rank=1, dp_size=2, shuffle=shuffle, seed=3,
                                      num_epochs=3))
    first = ResumableBatchSampler(103, micro_batch_size=4, dp_rank=1, dp_size=2, shuffle=shuffle, seed=3,
                                  num_epochs=3)
    head = list(itertools.islice(iter(first), 17))  # stop mid-epoch 2 (12 steps per epoch)
    state = first.state_dict()
    assert state["consumed_samples"] == 17 * 8
    resumed = ResumableBatchSampler(103, micro_batch_size=4, dp_rank=1, dp_size=2, shuffle=shuffle, seed=3,
                                    num_epochs=3)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - 17
    assert head + list(resumed) == full


def test_ranks_split_each_global_batch_without_overlap():
    per_rank = [list(ResumableBatchSampler(50, micro_batch_size=3, dp_rank=r, dp_size=4)) for r in range(4)]
    assert all(len(b) == 4 for b in per_rank)  # 50 // 12 = 4 steps, the tail of 2 is dropped
    for step in range(4):
        together = [i for r in range(4) for i in per_rank[r][step]]
        assert together == list(range(step * 12, step * 12 + 12))


def test_shuffle_changes_per_epoch_and_covers_everything():
    s = ResumableBatchSampler(24, micro_batch_size=4, shuffle=True, seed=0, num_epochs=2)
    batches = list(s)
    epoch0 = [i for b in batches[:6] for i in b]
    epoch1 = [i for b in batches[6:] for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert epoch0 != epoch1 and epoch0 != list(range(24))


def test_mismatched_state_is_refused():
    s = ResumableBatchSampler(40, micro_batch_size=2, dp_size=2)
    state = s.state_dict()
    other = ResumableBatchSampler(40, micro_batch_size=4, dp_size=2)
    with pytest.raises(QwenlinkError, match="global_batch"):
        other.load_state_dict(state)
