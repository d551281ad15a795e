"""sample_ddp --protocol official: per-rank sequential streams, random labels, index layout, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import autoregressive.sample_ddp as sample_ddp
from autoregressive import GPT, sample_images
from autoregressive.sample_ddp import (SAMPLES, assemble_official, main, official_batches, official_indices,
                                       official_iterations, official_shard_path, write_official_shard)
from tests.cli_testing import assert_user_error, run_module_cli
from tests.extraction_testing import make_tokenizer, run_module
from tests.gpt_testing import random_gpt
from tokenizer import DARTokenizer
from utils.distributed import DistEnv
from utils.errors import UserError
from utils.images import to_uint8

N, BATCH, SEED = 7, 2, 5  # one process: 4 batches = 8 images, the last one cut when packing
CLASSES = 10  # the tiny GPT's


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return random_gpt().save_pretrained(root / "gpt"), make_tokenizer(root / "tok")


@pytest.fixture(scope="module")
def models(ckpts: tuple[Path, Path]) -> tuple[GPT, DARTokenizer]:
    """The models as the official protocol samples with them: GPT weights in bf16, tokenizer fp32."""
    return GPT.from_pretrained(ckpts[0]).to(torch.bfloat16).eval(), DARTokenizer.from_pretrained(ckpts[1]).eval()


def args(ckpts: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["--gpt-ckpt", str(ckpts[0]), "--tokenizer-ckpt", str(ckpts[1]), "--num-samples", str(N),
            "--per-proc-batch-size", str(BATCH), "--seed", str(SEED), "--device", "cpu", "--protocol", "official",
            "--out", str(out), *extra]


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["labels"]


@pytest.fixture(scope="module")
def official_run(ckpts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    return load(main(args(ckpts, tmp_path_factory.mktemp("official") / "run")))


def reference_stream(gpt: GPT, tokenizer: DARTokenizer, seed: int, world_size: int, rank: int,
                     batches: int) -> list[tuple[torch.Tensor, np.ndarray]]:
    """What the official script does on one rank, written out: seed once, then per batch randint + sample."""
    torch.manual_seed(seed * world_size + rank)
    out = []
    for _ in range(batches):
        labels = torch.randint(0, CLASSES, (BATCH,))
        _, images = sample_images(gpt, tokenizer, labels, cfg_scale=(1.2, 8.0))
        out.append((labels, to_uint8(images)))
    return out


def test_sample_count_is_rounded_up_to_whole_global_batches() -> None:
    assert official_iterations(50_000, 64, 8) == 98  # 50,176 images made, 50,000 kept
    assert official_iterations(N, BATCH, 1) == 4 and official_iterations(N, BATCH, 2) == 2
    assert official_indices(3, 1, 8, 4).tolist() == [97, 105, 113, 121]


def test_single_process_draws_everything_from_one_seeded_stream(official_run, models) -> None:
    images, labels = official_run
    assert images.shape == (N, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (N,)
    torch.manual_seed(SEED * 1 + 0)
    assert labels[:BATCH].tolist() == torch.randint(0, CLASSES, (BATCH,)).tolist()
    # All 8 images of the 4 batches, in order, cut to N when packed.
    stream = reference_stream(*models, SEED, 1, 0, official_iterations(N, BATCH, 1))
    assert np.array_equal(labels, torch.cat([l for l, _ in stream]).numpy()[:N])
    assert np.array_equal(images, np.concatenate([i for _, i in stream])[:N])


def test_manifest_records_the_protocol_and_other_protocol_is_refused(ckpts, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(args(ckpts, out, "--max-shards", "0")) is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["protocol"], manifest["cfg_scale"], manifest["top_k"], manifest["top_p"],
            manifest["temperature"], manifest["precision"], manifest["gpt_dtype"], manifest["sampler"],
            manifest["world_size"]) == ("official", [1.2, 8.0], 0, 1.0, 1.0, "fp32", "bf16", "adams2", 1)
    balanced = [a for a in args(ckpts, out) if a not in ("--protocol", "official")]
    with pytest.raises(UserError, match="other settings.*protocol"):
        main(balanced)


def test_two_ranks_interleave_indices_and_use_their_own_streams(models, tmp_path: Path) -> None:
    gpt, tokenizer = models
    world, iterations = 2, official_iterations(N, BATCH, 2)
    (tmp_path / "shards").mkdir()
    per_rank = {}
    for rank in range(world):
        batches = list(official_batches(gpt, tokenizer, seed=SEED, rank=rank, world_size=world, batch_size=BATCH,
                                        num_classes=CLASSES, stop=iterations,
                                        sampling=dict(cfg_scale=(1.2, 8.0))))
        assert [b.indices.tolist() for b in batches] == [[rank, rank + 2], [rank + 4, rank + 6]]
        torch.manual_seed(SEED * world + rank)
        assert batches[0].labels.tolist() == torch.randint(0, CLASSES, (BATCH,)).tolist()
        reference = reference_stream(gpt, tokenizer, SEED, world, rank, iterations)
        assert all(np.array_equal(b.images, r) for b, (_, r) in zip(batches, reference))
        for batch in batches:
            write_official_shard(official_shard_path(tmp_path, batch.iteration, rank), batch)
        per_rank[rank] = batches
    images, labels = load(assemble_official(tmp_path, N, BATCH, world))
    assert images.shape[0] == N  # 8 made, index 7 (rank 1's last) cut
    for rank, batches in per_rank.items():
        for batch in batches:
            for image, label, index in zip(batch.images, batch.labels, batch.indices):
                if index < N:
                    assert np.array_equal(images[index], image) and labels[index] == label


def test_kill_and_resume_continues_the_same_stream(official_run, ckpts, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(args(ckpts, out, "--max-shards", "1")) is None
    assert official_shard_path(out, 0, 0).is_file() and not official_shard_path(out, 1, 0).exists()
    assert not (out / SAMPLES).exists()
    torch.manual_seed(1234)  # whatever the process's RNG did in between must not matter
    assert main(args(ckpts, out, "--max-shards", "2")) is None
    resumed = load(main(args(ckpts, out)))
    assert all(np.array_equal(a, b) for a, b in zip(resumed, official_run))


def test_resume_with_another_world_size_is_refused(ckpts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    # Rank 0 of a 2-process run, as far as the folder is concerned (no process group is needed for it).
    monkeypatch.setattr(sample_ddp, "setup_distributed",
                        lambda device: DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    assert main(args(ckpts, out, "--max-shards", "0")) is None
    monkeypatch.undo()
    result = run_module_cli("autoregressive.sample_ddp", *args(ckpts, out))
    assert_user_error(result, "--protocol official on 2 process(es), not 1", "resume with 2 processes")


@pytest.mark.parametrize("flag, value", [("--cfg-scale", "1.5,3.0"), ("--top-k", "5"), ("--top-p", "0.9"),
                                         ("--temperature", "0.5"), ("--precision", "bf16"),
                                         ("--gpt-dtype", "fp32"), ("--sampler", "euler")])
def test_flags_contradicting_the_protocol_are_one_line(flag: str, value: str, tmp_path: Path) -> None:
    missing = (tmp_path / "gpt", tmp_path / "tok")  # refused before anything is loaded
    result = run_module_cli("autoregressive.sample_ddp", *args(missing, tmp_path / "out"), flag, value)
    assert_user_error(result, f"{flag} {value} contradicts --protocol official", "--protocol balanced")
    assert not (tmp_path / "out").exists()


def test_flags_equal_to_the_protocol_are_accepted(ckpts, tmp_path: Path) -> None:
    extra = ["--cfg-scale", "1.2,8.0", "--top-k", "0", "--top-p", "1", "--temperature", "1", "--precision", "fp32",
             "--gpt-dtype", "bf16", "--sampler", "adams2", "--max-shards", "0"]
    assert main(args(ckpts, tmp_path / "run", *extra)) is None
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["protocol"] == "official"


@pytest.mark.slow
def test_two_process_gloo_run_interleaves_the_ranks(ckpts, tmp_path: Path) -> None:
    # One launch (resuming is covered in-process above): each rank seeds seed × 2 + rank, and rank r's
    # batch holds images r, r + 2, ... of each global batch.
    out = tmp_path / "ddp"
    run_module("autoregressive.sample_ddp", args(ckpts, out), nproc=2)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        f"batch_{it:06d}_rank_{rank:05d}.npz" for it in range(2) for rank in range(2)]
    images, labels = load(out / SAMPLES)
    assert images.shape[0] == N
    for rank in range(2):
        torch.manual_seed(SEED * 2 + rank)
        assert labels[[rank, rank + 2]].tolist() == torch.randint(0, CLASSES, (BATCH,)).tolist()


def test_gpt_dtype_casts_only_the_gpt(ckpts) -> None:
    from autoregressive.sample import add_model_args, load_models
    from utils.cli import OneLineArgumentParser

    parser = OneLineArgumentParser()
    add_model_args(parser)
    base = ["--gpt-ckpt", str(ckpts[0]), "--tokenizer-ckpt", str(ckpts[1])]
    assert parser.parse_args(base).gpt_dtype == "fp32"  # default: the weights as loaded, as before
    gpt, tokenizer = load_models(parser.parse_args([*base, "--gpt-dtype", "bf16"]), torch.device("cpu"))
    assert {p.dtype for p in gpt.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tokenizer.parameters()} == {torch.float32}
