"""ResumableDistributedSampler: torch's order, exact coverage, mid-epoch resume."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from dataset.sampler import ResumableDistributedSampler


@pytest.mark.parametrize("num_items", [1, 7, 12, 13])
@pytest.mark.parametrize("replicas", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_same_order_as_torch(num_items: int, replicas: int, drop_last: bool, shuffle: bool) -> None:
    if drop_last and num_items < replicas:
        with pytest.raises(ValueError, match="leaves nothing"):
            ResumableDistributedSampler(num_items, replicas, 0, drop_last=drop_last)
        return
    for rank in range(replicas):
        kwargs = {"seed": 5, "shuffle": shuffle, "drop_last": drop_last}
        ours = ResumableDistributedSampler(num_items, replicas, rank, **kwargs)
        ref = DistributedSampler(range(num_items), replicas, rank, **kwargs)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)


def test_ranks_cover_epoch_exactly_once() -> None:
    n, replicas = 103, 4
    samplers = [ResumableDistributedSampler(n, replicas, r, seed=1) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(2)
    seen = [i for s in samplers for i in s]
    assert len(seen) == len(set(seen)) == 100  # three tail items dropped to stay divisible
    padded = [ResumableDistributedSampler(n, replicas, r, seed=1, drop_last=False) for r in range(replicas)]
    seen = [i for s in padded for i in s]
    assert set(seen) == set(range(n)) and len(seen) == 104


def test_epochs_differ() -> None:
    s = ResumableDistributedSampler(50, 2, 1, seed=0)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first


def test_mid_epoch_resume_yields_the_rest() -> None:
    s = ResumableDistributedSampler(40, 2, 1, seed=7)
    s.set_epoch(4)
    full = list(s)
    state = s.state_dict(consumed=6)
    resumed = ResumableDistributedSampler(40, 2, 1, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 4 and len(resumed) == len(full) - 6
    assert list(resumed) == full[6:]
    # A second interruption counts from the resumed position.
    again = ResumableDistributedSampler(40, 2, 1, seed=7)
    again.load_state_dict(resumed.state_dict(consumed=5))
    assert list(again) == full[11:]
    again.set_epoch(5)
    assert len(list(again)) == 20


def test_resume_refuses_a_different_setup() -> None:
    state = ResumableDistributedSampler(40, 2, 0, seed=7).state_dict()
    with pytest.raises(ValueError, match="num_replicas"):
        ResumableDistributedSampler(40, 4, 0, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ResumableDistributedSampler(40, 2, 0, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        ResumableDistributedSampler(40, 2, 0, seed=7).state_dict(consumed=21)
