"""Shared training machinery: LR schedules, EMA, non-finite guard, optimizer groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from utils.training import NonFiniteGuard, OptimConfig, build_optimizer, create_ema, learning_rate, update_ema


def test_warmup_then_constant() -> None:
    cfg = OptimConfig(lr=2e-4, warmup_steps=4)
    assert [learning_rate(s, 100, cfg) for s in range(5)] == pytest.approx([5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4])


def test_cosine_reaches_min_lr() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", min_lr=0.1)
    assert learning_rate(0, 10, cfg) == pytest.approx(1.0)
    assert learning_rate(5, 10, cfg) == pytest.approx(0.55)
    assert learning_rate(10, 10, cfg) == pytest.approx(0.1)


def test_linear_decay_over_the_tail() -> None:
    cfg = OptimConfig(lr=4e-4, schedule="linear", min_lr=1e-5, decay_start_step=250)
    assert learning_rate(249, 300, cfg) == pytest.approx(4e-4)
    assert learning_rate(275, 300, cfg) == pytest.approx((4e-4 + 1e-5) / 2)
    assert learning_rate(300, 300, cfg) == pytest.approx(1e-5)


def test_weight_decay_only_on_matrices() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05), torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_cpu_optimizer_is_fused_and_steps_like_the_reference_adamw() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    reference = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.05)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert opt.defaults["fused"]
    ref_opt = torch.optim.AdamW(
        [{"params": [reference[0].weight], "weight_decay": 0.05},
         {"params": [reference[0].bias, *reference[1].parameters()], "weight_decay": 0.0}],
        lr=1e-2, betas=cfg.betas, eps=cfg.eps, foreach=False,
    )
    x = torch.randn(8, 3)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ema_update_is_a_lerp() -> None:
    model = nn.Linear(2, 2)
    ema = create_ema(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.weight.clone()
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    assert not ema.weight.requires_grad


def test_non_finite_guard_skips_then_aborts() -> None:
    guard = NonFiniteGuard(max_bad_steps=2)
    assert guard.check(torch.tensor(1.0))
    assert not guard.check(torch.tensor(math.nan))
    assert guard.check(torch.tensor(1.0))
    assert not guard.check(torch.tensor(math.inf))
    with pytest.raises(FloatingPointError, match="max-bad-steps"):
        guard.check(torch.tensor(math.nan))


def test_infinite_loader_resumes_mid_epoch_exactly() -> None:
    from dataset.sampler import ResumableDistributedSampler
    from utils.training import InfiniteLoader

    class Items(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> int:
            return i

    def make(items: Items) -> InfiniteLoader:
        sampler = ResumableDistributedSampler(10, num_replicas=1, rank=0, seed=3)
        return InfiniteLoader(items, sampler, batch_size=3, world_size=1)

    full_items = Items()
    full = make(full_items)
    reference = [next(full).tolist() for _ in range(7)]
    assert full_items.epochs == [0, 1, 2]

    first = make(Items())
    head = [next(first).tolist() for _ in range(4)]
    state = first.state_dict()
    resumed = make(Items())
    resumed.load_state_dict(state)
    tail = [next(resumed).tolist() for _ in range(3)]
    assert head + tail == reference


class _TaggedItems(torch.utils.data.Dataset):
    """Returns (index, epoch the item was asked for, process id) and never learns the epoch otherwise."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        raise AssertionError("the loader must ask for item_at(index, epoch)")

    def item_at(self, index: int, epoch: int) -> tuple[int, int, int]:
        import os

        return index, epoch, os.getpid()


def test_infinite_loader_keeps_persistent_workers_and_sends_each_index_its_epoch() -> None:
    import os

    from dataset.sampler import ResumableDistributedSampler
    from utils.training import InfiniteLoader

    def batches(num_workers: int) -> list[list[tuple[int, int, int]]]:
        sampler = ResumableDistributedSampler(10, num_replicas=1, rank=0, seed=3)
        loader = InfiniteLoader(_TaggedItems(), sampler, batch_size=5, world_size=1, num_workers=num_workers,
                                collate_fn=list)
        rows = [next(loader) for _ in range(6)]  # three epochs of two batches
        before = {pid for _, _, pid in rows[-1]}
        loader.close()  # stops the workers; the next batch comes from new ones, at the same position
        rows.append(next(loader))
        if num_workers:
            for pid in before:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        loader.close()
        return rows

    inline, workers = batches(0), batches(2)
    strip = lambda rows: [[(i, e) for i, e, _ in batch] for batch in rows]  # noqa: E731
    assert strip(workers) == strip(inline)  # same samples, same epochs, whatever the worker count
    assert [{e for _, e, _ in batch} for batch in workers] == [{0}, {0}, {1}, {1}, {2}, {2}, {3}]
    pids = [{pid for _, _, pid in batch} for batch in workers]
    first_epoch = pids[0] | pids[1]
    assert os.getpid() not in first_epoch and len(first_epoch) == 2
    assert all(p <= first_epoch for p in pids[2:6])  # later epochs reuse the same two workers
    assert not pids[6] & first_epoch  # after close(): new workers


def test_infinite_loader_refuses_workers_for_a_dataset_that_learns_its_epoch_only_from_set_epoch() -> None:
    from dataset.sampler import ResumableDistributedSampler
    from utils.training import InfiniteLoader

    class OldStyle(torch.utils.data.Dataset):
        def set_epoch(self, epoch: int) -> None: ...
        def __len__(self) -> int:
            return 4
        def __getitem__(self, index: int) -> int:
            return index

    sampler = ResumableDistributedSampler(4, num_replicas=1, rank=0)
    with pytest.raises(TypeError, match="item_at"):
        InfiniteLoader(OldStyle(), sampler, batch_size=2, world_size=1, num_workers=1)
    InfiniteLoader(OldStyle(), sampler, batch_size=2, world_size=1, num_workers=0)  # in-process: set_epoch reaches it


def test_datasets_draw_from_the_epoch_given_with_the_index(tmp_path) -> None:  # noqa: ANN001
    import numpy as np

    from dataset.codes import CodeDataset, write_manifest, write_shard

    rng = np.random.default_rng(0)
    write_shard(tmp_path, 0, rng.integers(0, 64, (6, 4, 16)), rng.integers(0, 10, 6), np.arange(6), 64)
    write_manifest(tmp_path, seq_len=16, vocab_size=64, num_augs=4)
    dataset = CodeDataset(tmp_path, seed=1)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(6):
            codes, label = dataset.item_at(index, epoch)
            assert torch.equal(codes, dataset[index][0]) and label == dataset[index][1]
    draws = {tuple(dataset.item_at(0, epoch)[0].tolist()) for epoch in range(12)}
    assert len(draws) > 1  # the epoch given with the index changes the augmentation drawn
