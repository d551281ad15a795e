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


def global_layout(n: int, replicas: int, batch: int, epoch: int = 0) -> list[list[int]]:
    samplers = [ResumableDistributedSampler(n, replicas, r, seed=3, global_batch_size=batch) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("epoch", [0, 2])
def test_global_batches_are_the_same_at_any_world_size(epoch: int) -> None:
    n, batch = 103, 8  # 12 whole global batches; the last 7 items of the permutation are dropped
    one = global_layout(n, 1, batch, epoch)[0]
    assert len(one) == 96 and len(set(one)) == 96
    for replicas in (2, 4):
        ranks = global_layout(n, replicas, batch, epoch)
        share = batch // replicas
        for step in range(12):
            # Step `step` trains on the same samples whatever the world size: the ranks' shares in order.
            assert [i for r in ranks for i in r[step * share:(step + 1) * share]] == one[step * batch:(step + 1) * batch]
    s = ResumableDistributedSampler(n, 4, 3, seed=3, global_batch_size=batch)
    s.set_epoch(epoch)
    order = list(s)
    positions = s.global_positions(0, len(order)).tolist()
    assert [one[p] for p in positions] == order  # each sample's place in the global order


def test_global_position_resumes_at_another_world_size() -> None:
    n, batch = 50, 8
    two = ResumableDistributedSampler(n, 2, 1, seed=3, global_batch_size=batch)
    two.set_epoch(1)
    state = two.state_dict(consumed=3 * 4)  # three global batches done
    assert state["global_position"] == 24
    one = ResumableDistributedSampler(n, 1, 0, seed=3, global_batch_size=batch)
    one.load_state_dict(state)
    assert one.epoch == 1 and list(one) == global_layout(n, 1, batch, 1)[0][24:]
    four = ResumableDistributedSampler(n, 4, 2, seed=3, global_batch_size=batch)
    four.load_state_dict(one.state_dict(consumed=8))
    assert list(four) == global_layout(n, 4, batch, 1)[2][8:]
    # Inside a global batch only the same world size knows where each rank stands.
    with pytest.raises(ValueError, match="inside a global batch"):
        one.load_state_dict(two.state_dict(consumed=14))
    same = ResumableDistributedSampler(n, 2, 1, seed=3, global_batch_size=batch)
    same.load_state_dict(two.state_dict(consumed=14))
    assert list(same) == global_layout(n, 2, batch, 1)[1][14:]
    with pytest.raises(ValueError, match="global_batch_size: saved 8, now 16"):
        ResumableDistributedSampler(n, 2, 0, seed=3, global_batch_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableDistributedSampler(n, 2, 0, seed=3).load_state_dict(state)
