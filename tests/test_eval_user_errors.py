"""User mistakes at the evaluation and data command lines: one ``error:`` line naming the problem, exit 2.

Every test runs the entry point as ``python -m`` would (``tests.cli_testing.run_module_cli``). The
checks run before any model is loaded or any output is created, so most of these need no weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_testing import assert_user_error, run_module_cli
from tests.extraction_testing import IMAGE_SIZE, make_image_folder, make_tokenizer
from utils.errors import UserError


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user_errors")
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "good.npz", arr_0=images)
    return {"images": make_image_folder(root / "images", per_class=(2, 2), bad=None),
            "tokenizer": make_tokenizer(root / "tokenizer"), "good_npz": root / "good.npz", "root": root}


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a machine without a visible GPU reports, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _reconstruct_argv(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(assets["tokenizer"]), "--data-path", str(assets["images"]), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--num-workers", "0", "--device", "cpu", *extra]


def _extract_argv(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--tokenizer-ckpt", str(assets["tokenizer"]), "--data-path", str(assets["images"]), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--num-workers", "0", "--device", "cpu", *extra]


# ---------------------------------------------------------------- 1. --device cuda without a GPU


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("module", ["evaluations.evaluator", "tokenizer.reconstruct", "tokenizer.extract_codes",
                                    "evaluations.make_reference", "evaluations.class_consistency"])
def test_device_cuda_without_gpu_is_said_first(module: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing"  # every other input is wrong too: the device must be the first thing said
    argv = {
        "evaluations.evaluator": [missing / "ref.npz", missing / "sample.npz"],
        "tokenizer.reconstruct": ["--ckpt", missing, "--data-path", missing, "--out", tmp_path / "out" / "r.npz",
                                  "--batch-size", "0"],
        "tokenizer.extract_codes": ["--tokenizer-ckpt", missing, "--data-path", missing, "--out", tmp_path / "out",
                                    "--batch-size", "0"],
        "evaluations.make_reference": ["--data-path", missing, "--out", tmp_path / "out" / "ref.npz", "--num", "1"],
        "evaluations.class_consistency": ["--train-data", missing, "--test-data", missing, "--samples",
                                          missing / "s.npz"],
    }[module]
    assert_user_error(run_module_cli(module, *argv, "--device", "cuda"), "CUDA requested but no GPU is visible",
                      "--device cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_gpu")
def test_load_fid_inception_on_cuda_without_gpu_is_a_user_error() -> None:
    from evaluations.inception import load_fid_inception

    with pytest.raises(UserError, match="CUDA requested but no GPU is visible"):
        load_fid_inception(weights=None, device="cuda")


# ---------------------------------------------------------------- 2. / 7. evaluator .npz files


def _bad_npz(kind: str, root: Path) -> Path:
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    path = root / f"{kind}.npz"
    if kind == "float":
        np.savez(path, arr_0=images.astype(np.float32) / 255)
    elif kind == "no_channels":
        np.savez(path, arr_0=images[..., 0])
    elif kind == "int64":
        np.savez(path, arr_0=images.astype(np.int64))
    elif kind == "channels_first":
        np.savez(path, arr_0=images.transpose(0, 3, 1, 2))
    elif kind == "empty":
        np.savez(path, arr_0=images[:0])
    elif kind == "no_arr_0":
        np.savez(path, images=images)
    elif kind == "not_npz":
        path.write_text("these are not images\n")
    elif kind == "truncated":
        np.savez(path, arr_0=images)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "corrupt_member":
        np.savez_compressed(path, arr_0=images)
        data = bytearray(path.read_bytes())
        data[60:120] = bytes(b ^ 0xFF for b in data[60:120])
        path.write_bytes(bytes(data))
    elif kind == "object_array":
        np.savez(path, arr_0=np.array([images, None], dtype=object))
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, fragments", [
    ("float", ["got float32 (4, 8, 8, 3)", "must be uint8 [N, H, W, 3]", "astype(np.uint8)"]),
    ("no_channels", ["got uint8 (4, 8, 8)", "must be uint8 [N, H, W, 3]", "no channel axis"]),
    ("int64", ["got int64 (4, 8, 8, 3)", "must be uint8 [N, H, W, 3]"]),
    ("channels_first", ["got uint8 (4, 3, 8, 8)", "channels-first"]),
    ("empty", ["holds no images"]),
    ("no_arr_0", ["has no array 'arr_0'", "found: images", "np.savez(path, arr_0=images)"]),
    ("not_npz", ["is not an .npz file"]),
    ("truncated", ["is not an .npz file", "truncated"]),
    ("corrupt_member", ["is truncated or corrupt", "'arr_0' cannot be read"]),
    ("object_array", ["array of Python objects", "not loaded"]),
    ("folder", ["is a folder"]),
])
def test_evaluator_names_a_bad_sample_file(kind: str, fragments: list[str], assets: dict[str, Path],
                                           tmp_path: Path) -> None:
    bad = _bad_npz(kind, tmp_path)
    line = assert_user_error(run_module_cli("evaluations.evaluator", assets["good_npz"], bad, "--device", "cpu"),
                             str(bad), *fragments)
    assert "Traceback" not in line


def test_evaluator_missing_files_and_reference_without_images_or_statistics(assets: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    assert_user_error(run_module_cli("evaluations.evaluator", missing, assets["good_npz"], "--device", "cpu"),
                      f"{missing} does not exist")
    assert_user_error(run_module_cli("evaluations.evaluator", assets["good_npz"], missing, "--device", "cpu"),
                      f"{missing} does not exist")
    np.savez(tmp_path / "labels_only.npz", labels=np.arange(3))
    assert_user_error(run_module_cli("evaluations.evaluator", tmp_path / "labels_only.npz", assets["good_npz"],
                                     "--device", "cpu"), "neither images (arr_0) nor statistics")
    np.savez(tmp_path / "half_stats.npz", mu=np.zeros(2048))
    assert_user_error(run_module_cli("evaluations.evaluator", tmp_path / "half_stats.npz", assets["good_npz"],
                                     "--device", "cpu"), "half_stats.npz stores ['mu'] but not all of")


def test_evaluator_output_and_weights_mistakes(assets: dict[str, Path], tmp_path: Path) -> None:
    good = assets["good_npz"]
    assert_user_error(run_module_cli("evaluations.evaluator", good, good, "--device", "cpu", "--json", tmp_path),
                      "--json", "is a folder")
    assert_user_error(run_module_cli("evaluations.evaluator", good, good, "--device", "cpu", "--weights",
                                     tmp_path / "nope.pth"), f"{tmp_path / 'nope.pth'} does not exist")
    torch.save({"not": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert_user_error(run_module_cli("evaluations.evaluator", good, good, "--device", "cpu", "--weights",
                                     tmp_path / "foreign.pt"), "FID Inception weights do not fit", "missing")
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 truncated")
    assert_user_error(run_module_cli("evaluations.evaluator", good, good, "--device", "cpu", "--weights",
                                     tmp_path / "truncated.pt"), "truncated.pt", "truncated")


# ---------------------------------------------------------------- 5. missing inputs, nothing written


def test_missing_inputs_of_reconstruct_and_extract_write_nothing(assets: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    out = tmp_path / "out"
    argv = _reconstruct_argv(assets, out / "recon.npz")
    argv[argv.index("--data-path") + 1] = str(missing)
    assert_user_error(run_module_cli("tokenizer.reconstruct", *argv), f"{missing} does not exist")
    argv = _reconstruct_argv(assets, out / "recon.npz")
    argv[argv.index("--ckpt") + 1] = str(missing)
    assert_user_error(run_module_cli("tokenizer.reconstruct", *argv), f"{missing} does not exist")
    argv = _extract_argv(assets, out / "codes")
    argv[argv.index("--data-path") + 1] = str(missing)
    assert_user_error(run_module_cli("tokenizer.extract_codes", *argv), f"{missing} does not exist")
    argv = _extract_argv(assets, out / "codes")
    argv[argv.index("--tokenizer-ckpt") + 1] = str(missing)
    assert_user_error(run_module_cli("tokenizer.extract_codes", *argv), f"{missing} does not exist")
    assert not out.exists()  # extraction used to create the folder (and its log) before reading anything


def test_missing_inputs_of_make_reference_and_class_consistency(assets: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    out = tmp_path / "out"
    assert_user_error(run_module_cli("evaluations.make_reference", "--data-path", missing, "--out", out / "ref.npz",
                                     "--device", "cpu"), f"{missing} does not exist")
    image_file = assets["images"] / "c0" / "img_000.png"
    assert_user_error(run_module_cli("evaluations.make_reference", "--data-path", image_file, "--out",
                                     out / "ref.npz", "--device", "cpu"), f"{image_file} is a file")
    assert not out.exists()
    common = ["--device", "cpu", "--image-size", "8", "--epochs", "1"]
    images = assets["images"]
    assert_user_error(run_module_cli("evaluations.class_consistency", "--train-data", missing, "--test-data", images,
                                     "--samples", assets["good_npz"], *common), f"{missing} does not exist")
    assert_user_error(run_module_cli("evaluations.class_consistency", "--train-data", images, "--test-data", images,
                                     "--samples", missing / "s.npz", *common), f"{missing / 's.npz'} does not exist")
    assert_user_error(run_module_cli("evaluations.class_consistency", "--train-data", images, "--test-data", images,
                                     "--samples", assets["good_npz"], *common), "has no array 'labels'")
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, arr_0=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(3, np.int64))
    assert_user_error(run_module_cli("evaluations.class_consistency", "--train-data", images, "--test-data", images,
                                     "--samples", labelled, *common), str(labelled), "got uint8 (3, 8, 8)")
    np.savez(labelled, arr_0=np.zeros((3, 8, 8, 3), np.uint8), labels=np.array([0, None, 1], dtype=object))
    assert_user_error(run_module_cli("evaluations.class_consistency", "--train-data", images, "--test-data", images,
                                     "--samples", labelled, *common), str(labelled), "array of Python objects")


# ---------------------------------------------------------------- 6. malformed numbers


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-2"), ("--num-workers", "-1"),
                                         ("--image-size", "0"), ("--num-images", "0"), ("--grid-images", "-1"),
                                         ("--steps", "0"), ("--max-image-pixels", "0")])
def test_reconstruct_refuses_bad_numbers(flag: str, value: str, assets: dict[str, Path], tmp_path: Path) -> None:
    result = run_module_cli("tokenizer.reconstruct", *_reconstruct_argv(assets, tmp_path / "r.npz", flag, value))
    assert_user_error(result, flag, f"got {value}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--shard-size", "0"), ("--num-workers", "-1"),
                                         ("--max-shards", "-1"), ("--image-size", "-5"),
                                         ("--max-image-pixels", "-1")])
def test_extract_codes_refuses_bad_numbers(flag: str, value: str, assets: dict[str, Path], tmp_path: Path) -> None:
    result = run_module_cli("tokenizer.extract_codes", *_extract_argv(assets, tmp_path / "codes", flag, value))
    assert_user_error(result, flag, f"got {value}")
    assert not (tmp_path / "codes").exists()


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-8")])
def test_evaluator_refuses_bad_batch_size(flag: str, value: str, assets: dict[str, Path]) -> None:
    good = assets["good_npz"]
    assert_user_error(run_module_cli("evaluations.evaluator", good, good, "--device", "cpu", flag, value),
                      flag, f"got {value}")


@pytest.mark.parametrize("flag, value", [("--num", "1"), ("--num-workers", "-1"), ("--batch-size", "0"),
                                         ("--image-size", "0"), ("--max-image-pixels", "0")])
def test_make_reference_refuses_bad_numbers(flag: str, value: str, assets: dict[str, Path], tmp_path: Path) -> None:
    result = run_module_cli("evaluations.make_reference", "--data-path", assets["images"], "--out",
                            tmp_path / "ref.npz", "--device", "cpu", flag, value)
    assert_user_error(result, flag, f"got {value}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--image-size", "-1")])
def test_class_consistency_refuses_bad_numbers(flag: str, value: str, assets: dict[str, Path]) -> None:
    images = assets["images"]
    result = run_module_cli("evaluations.class_consistency", "--train-data", images, "--test-data", images,
                            "--samples", assets["good_npz"], "--device", "cpu", flag, value)
    assert_user_error(result, flag, f"got {value}")


# ---------------------------------------------------------------- 3. / 9. other mistakes


def test_max_image_pixels_flag_reaches_the_dataset(assets: dict[str, Path], tmp_path: Path) -> None:
    # Every test image has at least 32 x 32 = 1024 pixels: a limit of 1000 skips them all, unread.
    result = run_module_cli("tokenizer.reconstruct",
                            *_reconstruct_argv(assets, tmp_path / "r.npz", "--max-image-pixels", "1000"))
    assert_user_error(result, "no image under", "could be decoded", "too_large 4")


def test_other_output_mistakes(assets: dict[str, Path], tmp_path: Path) -> None:
    assert_user_error(run_module_cli("tokenizer.reconstruct", *_reconstruct_argv(assets, tmp_path / "r.png")),
                      "--out must end in .npz")
    (tmp_path / "folder.npz").mkdir()
    assert_user_error(run_module_cli("tokenizer.reconstruct", *_reconstruct_argv(assets, tmp_path / "folder.npz")),
                      "--out", "is a folder")
    (tmp_path / "codes_file").write_text("x")
    assert_user_error(run_module_cli("tokenizer.extract_codes", *_extract_argv(assets, tmp_path / "codes_file")),
                      "--out", "is a file")
    flat = assets["root"] / "flat"
    flat.mkdir(exist_ok=True)
    Image.new("RGB", (40, 40)).save(flat / "a.png")
    argv = _reconstruct_argv(assets, tmp_path / "r.npz", "--labels")
    argv[argv.index("--data-path") + 1] = str(flat)
    assert_user_error(run_module_cli("tokenizer.reconstruct", *argv), "--labels needs a class-folder tree")


def test_corrupt_extraction_settings_are_named(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "codes"
    out.mkdir()
    (out / "extraction.json").write_text('{"image_size": 3')
    assert_user_error(run_module_cli("tokenizer.extract_codes", *_extract_argv(assets, out)),
                      str(out / "extraction.json"), "not JSON")


def test_truncated_shard_labels_are_named(tmp_path: Path) -> None:
    from tokenizer.extract_codes import _num_rows
    from utils.checkpoint import CorruptFileError

    path = tmp_path / "labels_00000.npy"
    np.save(path, np.arange(100, dtype=np.int64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match="labels_00000.npy is truncated or corrupt"):
        _num_rows(path)


def test_settings_pinned_before_the_pixel_limit_existed_still_resume(tmp_path: Path) -> None:
    from tokenizer.extract_codes import pin_settings

    settings = {"image_size": 32, "max_image_pixels": 64_000_000}
    (tmp_path / "extraction.json").write_text(json.dumps({"image_size": 32}))
    pin_settings(tmp_path, settings)  # an older folder: no mismatch
    (tmp_path / "extraction.json").write_text(json.dumps({"image_size": 32, "max_image_pixels": 1000}))
    with pytest.raises(UserError, match="max_image_pixels: 1000 -> 64000000"):
        pin_settings(tmp_path, settings)
