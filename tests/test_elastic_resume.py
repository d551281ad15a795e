"""Checkpoints that resume anywhere: elastic DDP resume (GPT and tokenizer), sharded (DCP) FSDP checkpoints, their export, --init-from.

Each global step trains on the same samples with the same per-sample random draws at any world size,
so a run stopped on 2 ranks and continued on 1 (or the reverse) logs the losses of an uninterrupted
run, up to float summation order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from autoregressive import GPT
from autoregressive.export_checkpoint import main as export_main
from autoregressive.export_checkpoint import parse_args as export_args
from autoregressive.train import main, parse_args
from dataset.codes import write_manifest, write_shard
from tests.extraction_testing import REPO, make_image_folder, run_module
from tests.gpt_testing import random_gpt
import tokenizer.train
from tokenizer import DARTokenizer
from utils.checkpoint import CheckpointManager, follow_pointer
from utils.errors import UserError
from utils.run import read_metrics
from utils.training import resolve_resume

TINY = str(REPO / "configs" / "ar" / "tiny.yaml")
# 30 rows at global batch 8: 3 steps per epoch (6 rows dropped per epoch); step 4 is mid-epoch.
STEPS = ["--max-steps", "8", "--keep-last", "10"]


@pytest.fixture(scope="module")
def codes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 rows of 2 views of 16 codes over 10 classes (the tiny GPT's shapes), with some structure to learn."""
    root = tmp_path_factory.mktemp("codes")
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 10
    rows = (labels[:, None, None] * 6 + rng.integers(0, 4, size=(30, 2, 16))) % 64
    write_shard(root, 0, rows, labels, np.arange(30), vocab_size=64)
    write_manifest(root, seq_len=16, vocab_size=64, num_augs=2)
    return root


def args(codes: Path, results: Path, *extra: str) -> list[str]:
    return ["--config", TINY, "--code-path", str(codes), "--results-dir", str(results), "--device", "cpu",
            *STEPS, *extra]


def losses(results: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(results / "metrics.jsonl")]


def assert_same_losses(ours: Path, reference: Path, rel: float) -> None:
    a, b = losses(ours), losses(reference)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=rel)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return GPT.from_pretrained(path).state_dict()


@pytest.mark.slow
def test_elastic_resume_two_to_one_and_one_to_two_ranks(codes: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_module("autoregressive.train", args(codes, whole, "--ckpt-every", "100"), nproc=2)
    # 2 ranks → 1 rank.
    cut = tmp_path / "two_to_one"
    run_module("autoregressive.train", args(codes, cut, "--stop-after-step", "4"), nproc=2)
    main(*parse_args(args(codes, cut, "--resume", "auto")))
    assert_same_losses(cut, whole, rel=1e-5)
    # 1 rank → 2 ranks.
    cut = tmp_path / "one_to_two"
    main(*parse_args(args(codes, cut, "--stop-after-step", "4")))
    run_module("autoregressive.train", args(codes, cut, "--resume", "auto"), nproc=2)
    assert_same_losses(cut, whole, rel=1e-5)
    for key, value in weights(whole / "final").items():
        torch.testing.assert_close(weights(cut / "final")[key], value, rtol=1e-4, atol=1e-6)
    # A different global batch cannot continue the same data order: refused before training.
    with pytest.raises(UserError, match="--global-batch-size 8"):
        main(*parse_args(args(codes, cut, "--resume", "auto", "--global-batch-size", "4")))


@pytest.mark.slow
def test_fsdp_writes_sharded_checkpoints_that_resume_and_export(codes: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_module("autoregressive.train", args(codes, whole, "--fsdp", "--ckpt-every", "4"), nproc=2)
    manager = CheckpointManager(whole / "checkpoints")
    assert [p.name for p in manager.all_steps()] == ["step_0000004", "step_0000008"]
    assert all(p.is_dir() for p in manager.all_steps()) and not list(manager.directory.glob("*.pt"))
    assert follow_pointer(whole / "checkpoints" / "latest") == manager.sharded_path_for(8)
    # A run killed during step 6: the step-4 checkpoint, metrics up to a torn line, a half-written folder.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(manager.sharded_path_for(4), cut / "checkpoints" / "step_0000004")
    (cut / "checkpoints" / ".step_0000006.tmp").mkdir()
    lines = (whole / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(lines[:4]) + '{"step": 5, "lo')
    run_module("autoregressive.train", args(codes, cut, "--fsdp", "--ckpt-every", "4", "--resume", "auto"), nproc=2)
    assert_same_losses(cut, whole, rel=1e-6)
    assert not (cut / "checkpoints" / ".step_0000006.tmp").exists()
    # Elastic across sharding: the same shards continue on 4 FSDP ranks and on 2 DDP ranks.
    for name, nproc, extra in (("four_fsdp", 4, ["--fsdp"]), ("two_ddp", 2, [])):
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        shutil.copytree(manager.sharded_path_for(4), folder / "checkpoints" / "step_0000004")
        (folder / "metrics.jsonl").write_text("".join(lines[:4]))
        run_module("autoregressive.train", args(codes, folder, *extra, "--ckpt-every", "100", "--resume", "auto"),
                   nproc=nproc)
        assert_same_losses(folder, whole, rel=1e-5)
    # The same checkpoint resumes without FSDP on one process (DCP reshards the tensors on load).
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copytree(manager.sharded_path_for(4), single / "checkpoints" / "step_0000004")
    (single / "metrics.jsonl").write_text("".join(lines[:4]))
    main(*parse_args(args(codes, single, "--resume", "auto")))
    assert_same_losses(single, whole, rel=1e-5)
    # Export: the sharded step-8 checkpoint becomes what GPT.from_pretrained reads, equal to final/ (the EMA)
    # and, with --raw, to final_raw/.
    for flag, folder in (("", "final"), ("--raw", "final_raw")):
        out = tmp_path / f"export{flag}"
        export_main(export_args([str(whole / "checkpoints" / "latest"), str(out), *([flag] if flag else [])]))
        expected = weights(whole / folder)
        for key, value in weights(out).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_checkpoint_manager_treats_sharded_folders_like_files(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    (tmp_path / "step_0000002.pt").write_bytes(b"x")
    for step in (3, 5):
        temporary = manager.temporary_folder_for(step)
        temporary.mkdir()
        (temporary / "train_state.pt").write_bytes(b"x")
        manager.commit(temporary, step)
    manager.temporary_folder_for(7).mkdir()  # a write killed before its rename: not a checkpoint
    (tmp_path / "step_0000009").mkdir()  # no extras file: not one either
    assert [p.name for p in manager.all_steps()] == ["step_0000003", "step_0000005"]  # step 2 pruned
    assert manager.latest() == manager.sharded_path_for(5)
    assert resolve_resume("auto", manager) == str(manager.sharded_path_for(5))
    assert resolve_resume(str(tmp_path / "latest"), manager) == str(manager.sharded_path_for(5))
    assert manager.sweep() == [manager.temporary_folder_for(7)]
    assert not manager.temporary_folder_for(7).exists()


def test_init_from_starts_fine_tuning_from_the_given_weights(codes: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    random_gpt(seed=5).save_pretrained(tmp_path / "source")  # every weight random: unlike a fresh init
    # No optimizer step: the weights (and so the EMA) stay exactly where --init-from put them.
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    fine = ["--max-steps", "2", "--ckpt-every", "100"]
    main(*parse_args(args(codes, tmp_path / "run", *fine, "--init-from", str(tmp_path / "source"))))
    expected = weights(tmp_path / "source")
    for folder in ("final", "final_raw"):
        for key, value in weights(tmp_path / "run" / folder).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    # A training checkpoint of ours works too (its EMA); when resuming, the checkpoint's weights win.
    out = tmp_path / "again"
    main(*parse_args(args(codes, out, *fine, "--stop-after-step", "1")))
    started = weights_of_checkpoint(out / "checkpoints" / "step_0000001.pt")
    main(*parse_args(args(codes, out, *fine, "--resume", "auto", "--init-from", str(tmp_path / "source"))))
    for key, value in weights(out / "final").items():
        torch.testing.assert_close(value, started[key], rtol=0, atol=0)
    main(*parse_args(args(codes, tmp_path / "from_run", *fine, "--init-from", str(out / "checkpoints" / "latest"))))
    for key, value in weights(tmp_path / "from_run" / "final").items():
        torch.testing.assert_close(value, started[key], rtol=0, atol=0)


def weights_of_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return GPT.from_pretrained(path, ema=True).state_dict()


def test_training_draws_follow_the_sample_not_its_batch() -> None:
    from autoregressive import train_draws

    model = random_gpt(drop_path_rate=0.2).train()  # token/resid/ffn dropout, label dropout, stochastic depth
    keys_source = train_draws.install(model)
    codes, labels = torch.randint(0, 64, (6, 16)), torch.arange(6)
    keys = train_draws.sample_keys(0, 3, torch.arange(10, 16))
    with keys_source.use(keys):
        whole = model(codes, labels)
        swapped = model(codes.flip(0), labels.flip(0))
        assert not torch.equal(model(codes, labels), model.eval()(codes, labels))  # dropout is on
    model.train()
    halves = []
    for i in (0, 3):  # as on two ranks
        with keys_source.use(keys[i:i + 3]):
            halves.append(model(codes[i:i + 3], labels[i:i + 3]))
    torch.testing.assert_close(torch.cat(halves), whole)
    # Draws depend on the key, not on the row: a permuted batch with the same keys order differs.
    assert not torch.allclose(swapped.flip(0), whole)
    with keys_source.use(keys.flip(0)):
        torch.testing.assert_close(model(codes.flip(0), labels.flip(0)).flip(0), whole)


# ------------------------------------------------------------------------------------------------ tokenizer


def tokenizer_args(recipe: Path, images: Path, results: Path, *extra: str) -> list[str]:
    return ["--config", str(recipe), "--data-path", str(images), "--results-dir", str(results), "--device", "cpu",
            "--keep-last", "10", *extra]


def tokenizer_terms(results: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch")}
            for r in read_metrics(results / "metrics.jsonl") if "loss" in r]


def assert_same_terms(ours: Path, reference: Path) -> None:
    a, b = tokenizer_terms(ours), tokenizer_terms(reference)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for mine, theirs in zip(a, b):
        assert set(mine) == set(theirs)
        for key in theirs:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (theirs["step"], key)


@pytest.mark.slow
def test_tokenizer_elastic_resume_two_to_one_and_one_to_two_ranks(tmp_path: Path) -> None:
    # 12 files, one undecodable, at global batch 4: 3 steps per epoch, so the cut at step 2 is mid-epoch
    # and steps 4-6 are a second epoch. The per-rank micro-batch stays 2 images (1 rank: 2 micro-batches),
    # since the pooled VQ means are per micro-batch.
    images = make_image_folder(tmp_path / "images", per_class=(6, 6), bad="c1/img_003.png")
    recipe = yaml.safe_load((REPO / "configs" / "tokenizer" / "train_tiny.yaml").read_text())
    recipe["model"] = "tiny"
    recipe["train"].update(global_batch_size=4, max_steps=6, log_every=1, ckpt_every=100, sample_every=100)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one_rank = ["--grad-accum-steps", "2"]

    def single(results: Path, *extra: str) -> None:
        tokenizer.train.main(*tokenizer.train.parse_args(tokenizer_args(path, images, results, *one_rank, *extra)))

    whole = tmp_path / "whole"
    run_module("tokenizer.train", tokenizer_args(path, images, whole), nproc=2)
    # 2 ranks → 1 rank.
    cut = tmp_path / "two_to_one"
    run_module("tokenizer.train", tokenizer_args(path, images, cut, "--stop-after-step", "2"), nproc=2)
    single(cut, "--resume", "auto")
    assert_same_terms(cut, whole)
    # 1 rank → 2 ranks.
    cut = tmp_path / "one_to_two"
    single(cut, "--stop-after-step", "2")
    run_module("tokenizer.train", tokenizer_args(path, images, cut, "--resume", "auto"), nproc=2)
    assert_same_terms(cut, whole)
    expected = DARTokenizer.from_pretrained(whole / "final").state_dict()
    for key, value in DARTokenizer.from_pretrained(cut / "final").state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)
    # Another global batch cannot continue the same data order: refused before training.
    with pytest.raises(UserError, match="--global-batch-size 4"):
        single(cut, "--resume", "auto", "--global-batch-size", "2")


def test_tokenizer_flow_draws_follow_the_image_not_its_batch() -> None:
    from tokenizer.config import TOKENIZER_PRESETS
    from tokenizer.train import flow_generators

    model = DARTokenizer(TOKENIZER_PRESETS["tiny"]).train()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    indices, cpu = torch.tensor([7, 2, 11, 5]), torch.device("cpu")
    whole = model(images, flow_generators(indices, 1, 0, cpu))
    halves = [model(images[i:i + 2], flow_generators(indices[i:i + 2], 1, 0, cpu)) for i in (0, 2)]  # two ranks
    for name in ("u", "x_t", "velocity"):
        torch.testing.assert_close(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name))
    # An image's draws follow its dataset index wherever it sits in the batch, and change with the epoch.
    flipped = model(images.flip(0), flow_generators(indices.flip(0), 1, 0, cpu))
    torch.testing.assert_close(flipped.x_t.flip(0), whole.x_t)
    assert not torch.equal(model(images, flow_generators(indices, 2, 0, cpu)).u, whole.u)
    assert not torch.equal(model(images, flow_generators(indices.flip(0), 1, 0, cpu)).u, whole.u)


def test_an_elastic_resume_that_changes_the_micro_batch_says_how_to_keep_it(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    from types import SimpleNamespace

    from utils.trainer import warn_micro_batch_change

    logger = logging.getLogger("test.elastic")
    extra = {"world_size": 2, "config": {"train": {"grad_accum_steps": 1}}}

    def ctx(world_size: int, accum: int) -> SimpleNamespace:
        return SimpleNamespace(global_batch_size=8, env=SimpleNamespace(world_size=world_size), logger=logger,
                               config=SimpleNamespace(train=SimpleNamespace(grad_accum_steps=accum)))

    with caplog.at_level(logging.WARNING, logger="test.elastic"):
        warn_micro_batch_change(extra, ctx(1, 2))  # 8 / (1 x 2) = 4 per micro-batch, as saved: silent
        assert caplog.records == []
        warn_micro_batch_change(extra, ctx(1, 1))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "from 4 to 8" in message and "--grad-accum-steps 2 keeps it" in message
