"""tokenizer.reconstruct: npz pair + grid + PSNR/SSIM; results independent of batch size and world size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.images import CenterCrop, ImageFolderDataset
from evaluations.recon import psnr
from tests.extraction_testing import IMAGE_SIZE, make_image_folder, make_tokenizer, run_module
from tokenizer.model import DARTokenizer
from tokenizer.reconstruct import main, parse_args, per_image_noise
from utils.images import to_uint8

BAD = "c1/img_001.png"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recon")
    return {"images": make_image_folder(root / "images", per_class=(3, 3), bad=BAD),
            "tokenizer": make_tokenizer(root / "tokenizer")}


def reconstruct(assets: dict[str, Path], out: Path, *extra: str) -> dict:
    argv = ["--ckpt", str(assets["tokenizer"]), "--data-path", str(assets["images"]), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--num-workers", "0", "--device", "cpu", *extra]
    return main(parse_args(argv))


def test_writes_the_npz_pair_grid_and_metrics(assets: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    metrics = reconstruct(assets, tmp_path / "recon.npz", "--batch-size", "2", "--seed", "3", "--grid-images", "3")
    recon = np.load(tmp_path / "recon.npz")["arr_0"]
    ref = np.load(tmp_path / "recon_ref.npz")["arr_0"]
    assert recon.shape == ref.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and recon.dtype == ref.dtype == np.uint8
    # The reference rows are the ADM centre crops of the good files, in file order.
    dataset = ImageFolderDataset(assets["images"], CenterCrop(IMAGE_SIZE), with_labels=False)
    good = [i for i, f in enumerate(dataset.files) if f.relative_to(assets["images"]).as_posix() != BAD]
    np.testing.assert_array_equal(ref, to_uint8(torch.stack([dataset[i].image for i in good])))
    # Row i is the decode of image i from the noise of (seed, i), whatever the batching.
    model = DARTokenizer.from_pretrained(assets["tokenizer"])
    images = torch.stack([dataset[i].image for i in good])
    noise = per_image_noise(model, torch.tensor(good), 3, IMAGE_SIZE)
    np.testing.assert_array_equal(recon, to_uint8(model.decode(model.encode(images), noise=noise)))
    expected_psnr = psnr(torch.from_numpy(ref).permute(0, 3, 1, 2), torch.from_numpy(recon).permute(0, 3, 1, 2))
    assert metrics["psnr"] == pytest.approx(expected_psnr.mean().item())
    assert 0 < metrics["ssim"] < 1 and metrics["num_images"] == 5 and metrics["bad_files"]["skipped"] == 1
    assert json.loads((tmp_path / "recon.json").read_text())["psnr"] == metrics["psnr"]
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "SSIM" in printed and "1 skipped" in printed
    # Grid: 3 rows of input | reconstruction | S previews, 2 px padding.
    grid = np.asarray(Image.open(tmp_path / "recon.png"))
    columns = 2 + model.config.num_denoising_steps
    assert grid.shape == (2 + 3 * (IMAGE_SIZE + 2), 2 + columns * (IMAGE_SIZE + 2), 3)


def test_grid_rows_spread_over_the_set_and_previews_use_the_chosen_sampler(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    reconstruct(assets, tmp_path / "recon.npz", "--sampler", "euler", "--grid-images", "3")
    recon = np.load(tmp_path / "recon.npz")["arr_0"]
    ref = np.load(tmp_path / "recon_ref.npz")["arr_0"]
    grid = np.asarray(Image.open(tmp_path / "recon.png"))
    columns = 2 + DARTokenizer.from_pretrained(assets["tokenizer"]).config.num_denoising_steps

    def cell(row: int, column: int) -> np.ndarray:
        y, x = 2 + row * (IMAGE_SIZE + 2), 2 + column * (IMAGE_SIZE + 2)
        return grid[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE]

    assert grid.shape[1] == 2 + columns * (IMAGE_SIZE + 2)
    for row, image in enumerate([0, 2, 4]):  # 5 good images, 3 rows: first, middle, last
        np.testing.assert_array_equal(cell(row, 0), ref[image])
        np.testing.assert_array_equal(cell(row, 1), recon[image])
        # The last preview is the reconstruction itself (same noise, same sampler).
        np.testing.assert_array_equal(cell(row, columns - 1), recon[image])


def test_batch_size_steps_and_sampler_options(assets: dict[str, Path], tmp_path: Path) -> None:
    reconstruct(assets, tmp_path / "a.npz", "--batch-size", "1", "--num-images", "4", "--grid-images", "0")
    reconstruct(assets, tmp_path / "b.npz", "--batch-size", "3", "--num-images", "4", "--grid-images", "0")
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert len(a) == 4 and not (tmp_path / "a.png").exists()
    np.testing.assert_array_equal(a, b)
    reconstruct(assets, tmp_path / "c.npz", "--num-images", "4", "--steps", "2", "--sampler", "euler", "--grid-images", "0")
    assert not np.array_equal(np.load(tmp_path / "c.npz")["arr_0"], a)
    with pytest.raises(ValueError, match="--steps"):
        reconstruct(assets, tmp_path / "d.npz", "--steps", "9")



def test_labels_option_stores_class_indices_and_changes_nothing_else(assets: dict[str, Path], tmp_path: Path) -> None:
    common = ("--num-images", "6", "--grid-images", "0", "--batch-size", "4")
    reconstruct(assets, tmp_path / "plain.npz", *common)
    reconstruct(assets, tmp_path / "labelled.npz", *common, "--labels")
    dataset = ImageFolderDataset(assets["images"], CenterCrop(IMAGE_SIZE))
    good = [i for i, f in enumerate(dataset.files) if f.relative_to(assets["images"]).as_posix() != BAD]
    for suffix in (".npz", "_ref.npz"):
        plain, labelled = np.load(tmp_path / f"plain{suffix}"), np.load(tmp_path / f"labelled{suffix}")
        assert "labels" not in plain.files
        np.testing.assert_array_equal(plain["arr_0"], labelled["arr_0"])
        np.testing.assert_array_equal(labelled["labels"], [dataset.labels[i] for i in good])
    assert sorted(set(np.load(tmp_path / "labelled.npz")["labels"].tolist())) == [0, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(dataset.files[:2]):
        (flat / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="class-folder"):
        main(parse_args(["--ckpt", str(assets["tokenizer"]), "--data-path", str(flat), "--out",
                         str(tmp_path / "flat.npz"), "--image-size", str(IMAGE_SIZE), "--num-workers", "0",
                         "--labels"]))

@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(assets: dict[str, Path], tmp_path: Path) -> None:
    common = ["--ckpt", str(assets["tokenizer"]), "--data-path", str(assets["images"]), "--image-size",
              str(IMAGE_SIZE), "--num-workers", "0", "--grid-images", "2", "--batch-size", "2"]
    one = run_module("tokenizer.reconstruct", [*common, "--out", str(tmp_path / "one.npz")])
    run_module("tokenizer.reconstruct", [*common, "--out", str(tmp_path / "two.npz")], nproc=2)
    for suffix in (".npz", "_ref.npz"):
        np.testing.assert_array_equal(np.load(tmp_path / f"one{suffix}")["arr_0"],
                                      np.load(tmp_path / f"two{suffix}")["arr_0"])
    assert "PSNR" in one.stdout
    assert not list(tmp_path.glob(".*rank*"))


def test_progress_bar_counts_every_image(assets: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    reconstruct(assets, tmp_path / "recon.npz", "--batch-size", "2", "--steps", "1", "--grid-images", "0")
    err = capsys.readouterr().err
    # All six files are counted (the unreadable one too), so the bar ends at its total.
    assert "reconstruct: 100%" in err and "6/6" in err, err
