"""Image folders: layouts, every kind of bad file, ADM crops, determinism across workers."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadFileStats,
    CenterCrop,
    ImageFolderDataset,
    RandomCropFlip,
    RandomTenCrop,
    SkipImage,
    TenCrop,
    arr_to_tensor,
    center_crop_arr,
    collate_skip_bad,
    decode_rgb,
    random_crop_arr,
    scan_image_folder,
    ten_crop_arrs,
)
from dataset.sampler import ResumableDistributedSampler
from dataset.seeding import sample_generator


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _decoded(path: Path, min_size: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
    image, notes = decode_rgb(path, min_size)
    assert image.mode == "RGB"
    return np.asarray(image), notes


# ---------------------------------------------------------------- conversions keep values right


def test_rgb_png_is_untouched(tmp_path: Path) -> None:
    arr = _noise(9, 7)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out, notes = _decoded(tmp_path / "a.png")
    assert notes == ()
    np.testing.assert_array_equal(out, arr)


def test_grayscale_replicates_channels(tmp_path: Path) -> None:
    gray = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out, notes = _decoded(tmp_path / "g.png")
    assert notes == ("grayscale",)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))


def test_16bit_grayscale_scales_not_clips(tmp_path: Path) -> None:
    values = np.array([[0, 257, 257 * 128, 257 * 200, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out, notes = _decoded(tmp_path / "g16.png")
    assert set(notes) == {"16bit", "grayscale"}
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 200, 255, 3])
    assert (out == out[..., :1]).all()


def test_16bit_rgb_scales_not_clips(tmp_path: Path) -> None:
    arr = np.array([[[65535, 0, 257 * 77], [257, 514, 1000]]], dtype=np.uint16)
    (tmp_path / "c16.png").write_bytes(_png16_rgb(arr))
    out, notes = _decoded(tmp_path / "c16.png")
    assert notes == ("16bit",)
    np.testing.assert_array_equal(out, [[[255, 0, 77], [1, 2, 3]]])


def test_rgba_composites_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [0, 0, 0, 51]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out, notes = _decoded(tmp_path / "a.png")
    assert notes == ("rgba",)
    np.testing.assert_array_equal(out[0], [[200, 100, 50], [255, 255, 255], [204, 204, 204]])


def test_opaque_rgba_is_not_counted(tmp_path: Path) -> None:
    rgba = np.concatenate([_noise(4, 4), np.full((4, 4, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out, notes = _decoded(tmp_path / "a.png")
    assert notes == ()
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    out, notes = _decoded(tmp_path / "c.jpg")
    assert notes == ("cmyk",)
    # Pure magenta + yellow ink is red; JPEG allows a few levels of error.
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 4


def test_palette_and_bilevel_and_float(tmp_path: Path) -> None:
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    pal.save(tmp_path / "p.png")
    out, notes = _decoded(tmp_path / "p.png")
    assert notes == ("palette",)
    assert (out == [10, 20, 30]).all()

    Image.new("1", (4, 4), 1).save(tmp_path / "b.bmp")
    out, notes = _decoded(tmp_path / "b.bmp")
    assert notes == ("grayscale",) and (out == 255).all()

    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tiff")
    out, notes = _decoded(tmp_path / "f.tiff")
    assert notes == ("grayscale",)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])

    Image.fromarray(np.array([[-5.0, 300.0]], dtype=np.float32)).save(tmp_path / "bad.tiff")
    with pytest.raises(SkipImage) as err:
        decode_rgb(tmp_path / "bad.tiff")
    assert err.value.reason == "unsupported"


# ---------------------------------------------------------------- skips


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_skipped(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(_noise(64, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SkipImage) as err:
        decode_rgb(path)
    assert err.value.reason == "truncated"


def test_not_an_image_and_too_small(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.raises(SkipImage) as err:
        decode_rgb(tmp_path / "x.jpg")
    assert err.value.reason == "not_image"
    Image.fromarray(_noise(20, 30)).save(tmp_path / "s.png")
    with pytest.raises(SkipImage) as err:
        decode_rgb(tmp_path / "s.png", min_size=21)
    assert err.value.reason == "too_small"
    assert decode_rgb(tmp_path / "s.png", min_size=20)[0].size == (30, 20)


def test_images_over_the_pixel_limit_are_skipped_from_the_header_alone(tmp_path: Path) -> None:
    Image.fromarray(_noise(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(SkipImage) as err:
        decode_rgb(tmp_path / "big.png", max_pixels=5000)
    assert err.value.reason == "too_large" and "100x100" in str(err.value)
    assert decode_rgb(tmp_path / "big.png", max_pixels=10000)[0].size == (100, 100)
    # Half the pixel data gone: only decoding would notice, so "too_large" proves nothing was decoded.
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SkipImage) as err:
        decode_rgb(tmp_path / "cut.png", max_pixels=5000)
    assert err.value.reason == "too_large"
    with pytest.raises(SkipImage) as err:
        decode_rgb(tmp_path / "cut.png")
    assert err.value.reason == "truncated"
    # The dataset counts such files as skips, like any other bad file.
    Image.fromarray(_noise(50, 50)).save(tmp_path / "small.png")
    dataset = ImageFolderDataset(tmp_path, CenterCrop(16), max_image_pixels=5000)
    batch = collate_skip_bad([dataset[i] for i in range(len(dataset))])
    assert batch.images.shape == (1, 3, 16, 16) and batch.stats.skipped["too_large"] == 2


def test_default_pixel_limit_is_below_pillows_thresholds() -> None:
    # Pillow warns (and still decodes) above MAX_IMAGE_PIXELS and refuses only above twice that.
    assert 0 < DEFAULT_MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS < 2 * Image.MAX_IMAGE_PIXELS
    assert ImageFolderDataset.__init__.__defaults__[-1] == DEFAULT_MAX_IMAGE_PIXELS


def test_missing_or_file_root_is_a_user_error(tmp_path: Path) -> None:
    from utils.errors import UserError

    with pytest.raises(UserError, match=f"{tmp_path / 'nope'} does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        scan_image_folder(tmp_path / "x.png")


def _bad_folder(root: Path) -> dict[str, str]:
    """One file of every kind; returns name -> expected outcome."""
    Image.fromarray(_noise(40, 48, 1)).save(root / "a_ok.jpg")
    Image.fromarray(_noise(40, 48, 2)[..., 0]).save(root / "b_gray.png")
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(root / "c_cmyk.jpg")
    rgba = np.concatenate([_noise(40, 40, 3), np.full((40, 40, 1), 9, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(root / "d_rgba.png")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "e_16bit.png")
    Image.fromarray(_noise(12, 40, 4)).save(root / "f_small.png")
    Image.fromarray(_noise(40, 40, 5)).save(root / "g_trunc.jpg")
    data = (root / "g_trunc.jpg").read_bytes()
    (root / "g_trunc.jpg").write_bytes(data[: len(data) // 3])
    (root / "h_text.jpg").write_text("hello")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return {"a_ok.jpg": "ok", "b_gray.png": "grayscale", "c_cmyk.jpg": "cmyk", "d_rgba.png": "rgba",
            "e_16bit.png": "16bit", "f_small.png": "too_small", "g_trunc.jpg": "truncated",
            "h_text.jpg": "not_image"}


def test_bad_folder_counts_and_batches(tmp_path: Path) -> None:
    expected = _bad_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, RandomCropFlip(16), min_size=16)
    assert [p.name for p in dataset.files] == sorted(expected)
    batch = collate_skip_bad([dataset[i] for i in range(len(dataset))])
    assert batch.images.shape == (5, 3, 16, 16)
    assert batch.indices.tolist() == [0, 1, 2, 3, 4]
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    stats = batch.stats
    assert stats.seen == 8 and stats.converted_items == 4 and stats.num_skipped == 3
    assert stats.conversions == {
        "grayscale": 2, "palette": 0, "cmyk": 1, "rgba": 1, "16bit": 1, "other_mode": 0}
    assert stats.skipped == {"truncated": 1, "not_image": 1, "too_small": 1, "too_large": 0, "unsupported": 0}
    summary = stats.summary()
    assert "8 read" in summary and "3 skipped" in summary and "cmyk 1" in summary


def test_all_bad_batch_is_empty_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("no")
    dataset = ImageFolderDataset(tmp_path, CenterCrop(8))
    batch = collate_skip_bad([dataset[0]])
    assert batch.images.numel() == 0 and batch.labels.shape == (0,)
    assert batch.stats.skipped["not_image"] == 1


def test_stats_update_and_all_reduce_single_process() -> None:
    a, b = BadFileStats(), BadFileStats()
    a.record(("grayscale",), ok=True)
    b.record(("truncated",), ok=False)
    b.record((), ok=True)
    a.update(b)
    reduced = a.all_reduce()
    assert reduced.to_dict() == a.to_dict()
    assert reduced.to_dict()["seen"] == 3 and reduced.to_dict()["skipped/truncated"] == 1


# ---------------------------------------------------------------- layouts


def test_class_folders_sorted_and_recursive(tmp_path: Path) -> None:
    for cls, n in (("zebra", 2), ("ant", 3)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_noise(8, 8, i)).save(tmp_path / cls / "sub" / f"{i}.PNG")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(_noise(8, 8)).save(tmp_path / ".hidden" / "x.png")
    files, labels, classes = scan_image_folder(tmp_path)
    assert classes == ("ant", "zebra")
    assert labels == [0, 0, 0, 1, 1]
    assert [f.relative_to(tmp_path).as_posix() for f in files][:2] == ["ant/sub/0.PNG", "ant/sub/1.PNG"]
    flat = scan_image_folder(tmp_path, with_labels=False)
    assert flat[2] == () and flat[1] == [0] * 5 and flat[0] == files


def test_flat_folder_recursive(tmp_path: Path) -> None:
    (tmp_path / "deep" / "er").mkdir(parents=True)
    for name in ("b.jpg", "deep/a.webp", "deep/er/c.tif", "A.JPEG"):
        Image.fromarray(_noise(8, 8)).save(tmp_path / name)
    dataset = ImageFolderDataset(tmp_path, CenterCrop(8))
    assert dataset.classes == () and dataset.labels.tolist() == [0] * 4
    assert [f.relative_to(tmp_path).as_posix() for f in dataset.files] == [
        "A.JPEG", "b.jpg", "deep/a.webp", "deep/er/c.tif"]


def test_empty_class_folder_and_empty_root_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no images"):
        scan_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(_noise(8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match="holds no images"):
        scan_image_folder(tmp_path)


# ---------------------------------------------------------------- crops


def test_center_crop_matches_manual_resize() -> None:
    image = Image.fromarray(_noise(300, 500))
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3)
    # 300 >= 2*64 twice: BOX to 250x150 then to 125x75, then BICUBIC to 107x64.
    small = image.resize((250, 150), Image.BOX).resize((125, 75), Image.BOX).resize((107, 64), Image.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(small)[:, 21:85])


def test_small_image_is_upsampled() -> None:
    out = center_crop_arr(Image.fromarray(_noise(28, 28)), 32)
    assert out.shape == (32, 32, 3)


def test_random_crop_deterministic_and_varied() -> None:
    image = Image.fromarray(_noise(70, 90))
    first = random_crop_arr(image, 32, generator=sample_generator(0, 0, 5))
    again = random_crop_arr(image, 32, generator=sample_generator(0, 0, 5))
    np.testing.assert_array_equal(first, again)
    others = [random_crop_arr(image, 32, generator=sample_generator(0, e, 5)) for e in range(1, 6)]
    assert all(o.shape == (32, 32, 3) for o in others)
    assert any(not np.array_equal(first, o) for o in others)
    with pytest.raises(ValueError, match="generator"):
        random_crop_arr(image, 32)
    with pytest.raises(ValueError, match="crop_frac"):
        random_crop_arr(image, 32, 0.9, 0.8, generator=sample_generator(0, 0, 0))


def test_ten_crop_views() -> None:
    image = Image.fromarray(_noise(300, 320))
    crops = ten_crop_arrs(image, 64, crop_ratio=1.1)
    base = center_crop_arr(image, 70)
    assert len(crops) == 10 and all(c.shape == (64, 64, 3) for c in crops)
    np.testing.assert_array_equal(crops[0], base[:64, :64])
    np.testing.assert_array_equal(crops[3], base[6:, 6:])
    np.testing.assert_array_equal(crops[5], crops[1][:, ::-1])  # mirrored top-left = mirror of top-right
    stacked = TenCrop(64)(image, sample_generator(0, 0, 0))
    assert stacked.shape == (10, 3, 64, 64)
    one = RandomTenCrop(64)(image, sample_generator(0, 0, 0))
    assert any(torch.equal(one, view) for view in stacked)


@pytest.mark.parametrize(("height", "width", "size"), [(300, 320, 64), (41, 57, 32), (50, 50, 23)])
def test_ten_crop_views_equal_torchvision(height: int, width: int, size: int) -> None:
    import torchvision.transforms.functional as TF

    image = Image.fromarray(_noise(height, width))
    base = center_crop_arr(image, int(size * 1.1))
    expected = [np.asarray(view) for view in TF.ten_crop(Image.fromarray(base), [size, size])]
    got = ten_crop_arrs(image, size, crop_ratio=1.1)
    assert len(got) == 10
    for ours, theirs in zip(got, expected):
        np.testing.assert_array_equal(ours, theirs)


def test_tensor_range_and_layout() -> None:
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = [255, 0, 128]
    t = arr_to_tensor(arr)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))


def test_same_tensors_for_any_worker_count(tmp_path: Path) -> None:
    _bad_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, RandomCropFlip(16), seed=3)
    dataset.set_epoch(2)
    runs = []
    for workers in (0, 2):
        sampler = ResumableDistributedSampler(len(dataset), seed=1, drop_last=False)
        loader = DataLoader(dataset, 3, sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad)
        runs.append(list(loader))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
        assert a.stats == b.stats
    total = BadFileStats()
    for batch in runs[1]:
        total.update(batch.stats)
    assert total.seen == 8 and total.num_skipped == 2  # min_size=0: the small image is upsampled


def _reduce_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        stats = BadFileStats()
        stats.record(("grayscale", "16bit"), ok=True)
        stats.record(("truncated",) if rank == 0 else ("too_small",), ok=False)
        total = stats.all_reduce()
        if rank == 0:
            Path(out_file).write_text(json.dumps(total.to_dict()))
    finally:
        torch.distributed.destroy_process_group()


def test_stats_all_reduce_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "total.json"
    args = (str(tmp_path / "init"), str(out))
    torch.multiprocessing.start_processes(_reduce_worker, args=args, nprocs=2, start_method="fork")
    total = json.loads(out.read_text())
    assert total["seen"] == 4 and total["converted"] == 2
    assert total["converted/16bit"] == 2 and total["skipped/truncated"] == 1 and total["skipped/too_small"] == 1
