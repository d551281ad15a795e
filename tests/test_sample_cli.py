"""The grid / previews / GIF sampling CLI and the shared 8-bit image helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive import GPT, sample_images
from autoregressive.sample import main as sample_main
from autoregressive.stream import image_seed
from tests.extraction_testing import REPO, make_tokenizer
from tests.gpt_testing import random_gpt
from tokenizer import DARTokenizer
from utils.images import make_grid, to_uint8

TILE, PAD = 32, 2  # tiny tokenizer resolution, make_grid's default padding


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return random_gpt().save_pretrained(root / "gpt"), make_tokenizer(root / "tok")


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """PIL (width, height) of a make_grid of rows x cols tiles."""
    return PAD + cols * (TILE + PAD), PAD + rows * (TILE + PAD)


def tile(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    top, left = PAD + row * (TILE + PAD), PAD + col * (TILE + PAD)
    return grid[top : top + TILE, left : left + TILE]


def test_to_uint8_uses_the_official_conversion() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    # clamp(127.5 x + 128, 0, 255), truncated: note 0 → 128, not 127.
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(1, 4, 2, 2))


def test_make_grid_layout() -> None:
    rows = [np.full((2, 4, 4, 3), 10, np.uint8), np.full((1, 4, 4, 3), 20, np.uint8)]
    grid = make_grid(rows, pad=1)
    assert grid.shape == (1 + 2 * 5, 1 + 2 * 5, 3)
    assert (grid[1:5, 6:10] == 10).all() and (grid[6:10, 1:5] == 20).all() and (grid[6:10, 6:10] == 255).all()


def test_cli_writes_grid_previews_and_gif(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    gpt_dir, tok_dir = ckpts
    common = ["--gpt-ckpt", str(gpt_dir), "--tokenizer-ckpt", str(tok_dir), "--labels", "1,2,3",
              "--samples-per-label", "2", "--cfg-scale", "1.5,3.0", "--seed", "4", "--device", "cpu",
              "--batch-size", "4"]
    sample_main([*common, "--out", str(tmp_path / "grid.png"), "--previews", str(tmp_path / "prev.png"),
                 "--gif", str(tmp_path / "s.gif")])
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert Image.open(tmp_path / "grid.png").size == grid_size(3, 2)
    assert Image.open(tmp_path / "prev.png").size == grid_size(6, 4)  # 6 samples x 4 groups
    gif = Image.open(tmp_path / "s.gif")
    assert gif.size == grid_size(3, 2) and gif.n_frames == 4

    # The grid holds exactly the non-streamed samples (same seeds), label-major.
    gpt, tokenizer = GPT.from_pretrained(gpt_dir), DARTokenizer.from_pretrained(tok_dir)
    labels = torch.tensor([1, 1, 2, 2, 3, 3])
    _, images = sample_images(gpt, tokenizer, labels, cfg_scale=(1.5, 3.0), seeds=[image_seed(4, i) for i in range(6)])
    expected = to_uint8(images)
    for i in range(6):
        assert np.array_equal(tile(grid, i // 2, i % 2), expected[i])
    previews = np.asarray(Image.open(tmp_path / "prev.png").convert("RGB"))
    assert np.array_equal(tile(previews, 5, 3), expected[5])  # the last preview column is the final image

    # Without previews the plain path runs; the grid must not change.
    sample_main([*common, "--out", str(tmp_path / "plain.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")), grid)

    # --previews-per-label 1: one strip row per label, each the first sample of that label (images 0, 2, 4).
    sample_main([*common, "--out", str(tmp_path / "grid1.png"), "--previews", str(tmp_path / "prev1.png"),
                 "--previews-per-label", "1"])
    assert Image.open(tmp_path / "prev1.png").size == grid_size(3, 4)
    short = np.asarray(Image.open(tmp_path / "prev1.png").convert("RGB"))
    for row, sample in enumerate((0, 2, 4)):
        for col in range(4):
            assert np.array_equal(tile(short, row, col), tile(previews, sample, col)), (row, col)
    for bad in (["--previews-per-label", "3", "--previews", str(tmp_path / "p.png")],  # > --samples-per-label
                ["--previews-per-label", "0", "--previews", str(tmp_path / "p.png")],
                ["--previews-per-label", "1"]):  # without --previews
        with pytest.raises(SystemExit):
            sample_main([*common, "--out", str(tmp_path / "x.png"), *bad])


def test_cli_rejects_bad_labels(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    gpt_dir, tok_dir = ckpts
    with pytest.raises(SystemExit):
        sample_main(["--gpt-ckpt", str(gpt_dir), "--tokenizer-ckpt", str(tok_dir), "--labels", "a,b",
                     "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="labels must be in"):
        sample_main(["--gpt-ckpt", str(gpt_dir), "--tokenizer-ckpt", str(tok_dir), "--labels", "99",
                     "--out", str(tmp_path / "x.png"), "--device", "cpu"])


@pytest.mark.slow
def test_launcher_script_runs_without_pythonpath(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    gpt_dir, tok_dir = ckpts
    env = {**os.environ, "GPT_CKPT": str(gpt_dir), "GPT_PRESET": "", "TOKENIZER_CKPT": str(tok_dir),
           "LABELS": "1,2", "OUT": str(tmp_path / "run"), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}  # the interpreter running the tests, whatever PATH holds
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "sample_c2i.sh"), "L", "--samples-per-label", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert Image.open(tmp_path / "run.png").size == grid_size(2, 1)
    assert Image.open(tmp_path / "run.gif").n_frames == 4


def test_llamagen_flag_names_carry_over():
    from autoregressive import sample, sample_ddp

    common = ["--gpt-ckpt", "g", "--gpt-model", "GPT-L", "--vq-ckpt", "t", "--global-seed", "3",
              "--mixed-precision", "bf16"]
    args = sample_ddp.parse_args([*common, "--num-fid-samples", "10", "--sample-dir", "out"])
    assert (args.gpt_preset, args.tokenizer_ckpt, args.seed, args.precision) == ("GPT-L", "t", 3, "bf16")
    assert (args.num_samples, args.out) == (10, "out")
    args = sample.parse_args([*common, "--labels", "1,2", "--out", "grid.png"])
    assert (args.gpt_preset, args.tokenizer_ckpt, args.seed) == ("GPT-L", "t", 3)
