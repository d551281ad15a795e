"""dataset.shards: webdataset-style tar shards read map-style, equal to the same images in a folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataset.shards as shards
from dataset.images import (
    CenterCrop,
    ImageFolderDataset,
    RandomCropFlip,
    TenCrop,
    arr_to_tensor,
    collate_skip_bad,
    scan_image_folder,
    to_model_range,
)
from dataset.sampler import ResumableDistributedSampler
from dataset.shards import (
    ShardError,
    TarShardDataset,
    expand_braces,
    index_cache_path,
    open_images,
    require_data_path,
)
from tests.cli_testing import assert_user_error, run_module_cli
from tests.extraction_testing import IMAGE_SIZE, make_image_folder, make_tokenizer, run_module
from utils.errors import UserError

BAD = "c1/img_002.png"  # a text file with an image name: skipped as not_image in both sources


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack_shards(images: Path, out: Path, per_shard: int, labels: bool = True, extra: bool = True) -> list[Path]:
    """The folder's images in its sorted order, ``per_shard`` samples per shard: KEY.png (+ .cls, .json)."""
    files, classes, _ = scan_image_folder(images)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(files), per_shard):
        path = out / f"train-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, len(files))):
                key = f"{i:06d}"
                if extra:  # members before the image must not change the sample order
                    add_bytes(tar, f"{key}.json", b'{"source": "test"}')
                tar.add(files[i], arcname=f"{key}{files[i].suffix}")
                if labels:
                    add_bytes(tar, f"{key}.cls", f"{classes[i]}\n".encode())
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tars")
    images = make_image_folder(root / "images", bad=BAD)  # 13 images, 3 classes
    pack_shards(images, root / "shards", per_shard=5)  # 3 shards: 5 + 5 + 3
    pack_shards(images, root / "single", per_shard=100)
    return {"root": root, "images": images, "shards": root / "shards", "single": root / "single" / "train-000000.tar",
            "tokenizer": make_tokenizer(root / "tokenizer")}


def items(dataset, indices=None) -> list[tuple]:
    indices = range(len(dataset)) if indices is None else indices
    out = []
    for i in indices:
        item = dataset[i]
        out.append((None if item.image is None else item.image.numpy().tobytes(), item.label, item.index, item.notes))
    return out


# ---------------------------------------------------------------- paths and the index


def test_brace_patterns_expand_ranges_lists_and_products() -> None:
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("source", ["single", "folder", "pattern"])
def test_shards_read_exactly_like_the_folder(assets: dict[str, Path], source: str) -> None:
    path = {"single": str(assets["single"]), "folder": str(assets["shards"]),
            "pattern": str(assets["shards"] / "train-{000000..000002}.tar")}[source]
    folder = ImageFolderDataset(assets["images"], CenterCrop(IMAGE_SIZE))
    tars = open_images(path, CenterCrop(IMAGE_SIZE))
    assert isinstance(tars, TarShardDataset)
    assert len(tars) == len(folder) == 13 and len(tars.shards) == (1 if source == "single" else 3)
    assert tars.labels.tolist() == folder.labels.tolist() and tars.classes == ("0", "1", "2") and tars.num_classes == 3
    assert items(tars) == items(folder)  # pixels, labels, indices, conversion / skip notes
    # Every index entry is the byte range of its image member, read by one seek + read.
    member = tars.files[3]
    assert str(member).endswith("train-000000.tar:000003.png")
    assert member.read_bytes() == folder.files[3].read_bytes()
    assert tars.files[:2] == [tars.files[0], tars.files[1]] and list(tars.files)[-1] == tars.files[-1]


def test_bad_members_are_skipped_and_counted_like_bad_files(assets: dict[str, Path], tmp_path: Path) -> None:
    # The shard ends inside the last image: its member is cut short (the header still lists it).
    shard = pack_shards(assets["images"], tmp_path / "cut", per_shard=100, extra=False)[0]
    files, _, _ = scan_image_folder(assets["images"])
    data = shard.read_bytes()
    last_png = files[-1].read_bytes()
    end = data.index(last_png) + len(last_png) // 2
    shard.write_bytes(data[:end])
    dataset = open_images(shard, CenterCrop(IMAGE_SIZE), with_labels=False, index_dir=tmp_path / "index")
    batch = collate_skip_bad([dataset[i] for i in range(len(dataset))])
    assert batch.stats.seen == 13 and batch.stats.skipped["not_image"] == 1 and batch.stats.skipped["truncated"] == 1
    assert batch.images.shape == (11, 3, IMAGE_SIZE, IMAGE_SIZE)
    bad = [i for i, f in enumerate(files) if f.relative_to(assets["images"]).as_posix() == BAD]
    assert dataset[bad[0]].notes == ("not_image",) and dataset[12].notes == ("truncated",)
    assert dataset[12].image is None and (tmp_path / "index").is_dir()


def test_labels_from_cls_or_none(assets: dict[str, Path], tmp_path: Path) -> None:
    unlabeled = pack_shards(assets["images"], tmp_path / "unlabeled", per_shard=100, labels=False)[0]
    plain = open_images(unlabeled, CenterCrop(IMAGE_SIZE))
    assert plain.classes == () and plain.labels.tolist() == [0] * 13
    labeled = open_images(assets["single"], CenterCrop(IMAGE_SIZE), with_labels=False)
    assert labeled.classes == () and set(labeled.labels.tolist()) == {0}
    # Labels on some samples only would silently give the others label 0.
    partial = tmp_path / "partial.tar"
    with tarfile.open(partial, "w") as tar:
        tar.add(assets["images"] / "c0" / "img_000.png", arcname="a.png")
        add_bytes(tar, "a.cls", b"4")
        tar.add(assets["images"] / "c0" / "img_001.png", arcname="b.png")
    with pytest.raises(ShardError, match=r"partial\.tar:b\.png has no \.cls label"):
        open_images(partial, CenterCrop(IMAGE_SIZE))
    assert open_images(partial, CenterCrop(IMAGE_SIZE), with_labels=False).labels.tolist() == [0, 0]
    with tarfile.open(partial, "w") as tar:
        tar.add(assets["images"] / "c0" / "img_000.png", arcname="dir/a.b.png")  # key dir/a, extension b.png
        add_bytes(tar, "dir/a.cls", b"seven")
    with pytest.raises(ShardError, match=r"partial\.tar:dir/a\.cls is not a class index"):
        open_images(partial, CenterCrop(IMAGE_SIZE))


def test_the_index_file_is_written_once_reused_and_rebuilt_when_a_shard_changes(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = pack_shards(assets["images"], tmp_path / "shards", per_shard=5)
    calls = []
    real = shards._index_shard
    monkeypatch.setattr(shards, "_index_shard", lambda p: calls.append(p.name) or real(p))
    cache = index_cache_path(paths)
    assert cache.parent == paths[0].parent and not cache.exists()
    first = open_images(tmp_path / "shards", CenterCrop(IMAGE_SIZE))
    assert cache.is_file() and sorted(calls) == [p.name for p in paths]
    stamp = cache.stat().st_mtime_ns
    calls.clear()
    again = open_images(tmp_path / "shards", CenterCrop(IMAGE_SIZE))
    assert calls == [] and cache.stat().st_mtime_ns == stamp and items(again) == items(first)
    # The cache is plain arrays: it loads without pickle.
    with np.load(cache, allow_pickle=False) as data:
        assert data["offset"].shape == (13,)
    # A rewritten shard (new size / mtime) invalidates the whole index.
    with tarfile.open(paths[1], "w") as tar:
        tar.add(assets["images"] / "c0" / "img_000.png", arcname="only.png")
    changed = open_images(tmp_path / "shards", CenterCrop(IMAGE_SIZE), with_labels=False)
    assert len(calls) == 3 and len(changed) == 9
    assert changed[5].image is not None and str(changed.files[5]).endswith("train-000001.tar:only.png")
    # A corrupt cache is rebuilt, not trusted.
    cache.write_bytes(b"garbage")
    calls.clear()
    assert len(open_images(tmp_path / "shards", CenterCrop(IMAGE_SIZE), with_labels=False)) == 9 and len(calls) == 3
    # The cache folder can be chosen by argument or environment variable.
    monkeypatch.setenv(shards.INDEX_ENV, str(tmp_path / "env_cache"))
    open_images(tmp_path / "shards", CenterCrop(IMAGE_SIZE), with_labels=False)
    assert (tmp_path / "env_cache" / cache.name).is_file()
    open_images(tmp_path / "shards", CenterCrop(IMAGE_SIZE), with_labels=False, index_dir=tmp_path / "arg_cache")
    assert (tmp_path / "arg_cache" / cache.name).is_file()


def test_writing_an_index_removes_the_ones_that_can_never_load_again(assets: dict[str, Path], tmp_path: Path) -> None:
    """Each new list of shards gets a new index file; the old ones of lists that no longer exist used to stay."""
    a, b, c = pack_shards(assets["images"], tmp_path / "shards", per_shard=5)
    cache_dir = tmp_path / "cache"

    def index(*paths: Path) -> Path:
        shards.load_shard_index(list(paths), cache_dir)
        return index_cache_path(list(paths), cache_dir)

    only_a, a_and_b = index(a), index(a, b)
    unrelated = cache_dir / "notes.txt"
    unrelated.write_text("not an index")
    old_format = cache_dir / ".dar-shard-index-0123456789abcdef.npz"
    with np.load(only_a, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
    np.savez(old_format, meta=np.array(json.dumps({**meta, "version": shards.INDEX_VERSION - 1})))
    unreadable = cache_dir / ".dar-shard-index-fedcba9876543210.npz"
    unreadable.write_bytes(b"garbage")
    elsewhere = tmp_path / "unmounted" / "x.tar"  # its folder is missing: maybe another machine's mount
    off_machine = cache_dir / ".dar-shard-index-00000000000000ff.npz"
    np.savez(off_machine, meta=np.array(json.dumps({"version": shards.INDEX_VERSION,
                                                    "shards": [[str(elsewhere), 1, 1]]})))
    # Still valid indexes of other lists stay: another run may use them.
    assert {only_a, a_and_b} <= set(cache_dir.iterdir())
    assert shards.remove_stale_indexes(cache_dir, keep=a_and_b) == [old_format]  # another format: never loads
    assert not old_format.exists() and {only_a, a_and_b, unreadable, off_machine, unrelated} <= set(cache_dir.iterdir())

    b.unlink()  # a shard gone from its folder: the index of (a, b) can never load again
    a_and_c = index(a, c)
    assert not a_and_b.exists() and only_a.exists() and a_and_c.exists()
    with tarfile.open(a, "w") as tar:  # a rewritten shard: every index built from it is stale
        tar.add(assets["images"] / "c0" / "img_000.png", arcname="only.png")
    only_c = index(c)
    assert sorted(cache_dir.iterdir()) == sorted([only_c, unreadable, off_machine, unrelated])
    # Only writing a new index cleans: loading a valid one touches nothing else.
    stamp = only_c.stat().st_mtime_ns
    index(c)
    assert only_c.stat().st_mtime_ns == stamp


def test_other_local_ranks_wait_for_rank0_and_read_its_index(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = pack_shards(assets["images"], tmp_path / "shards", per_shard=5)
    events = []
    monkeypatch.setattr(shards, "barrier", lambda: events.append("barrier"))
    real = shards._index_shard
    monkeypatch.setattr(shards, "_index_shard", lambda p: events.append("index") or real(p))
    monkeypatch.setenv("LOCAL_RANK", "0")
    rank0 = open_images(paths[0].parent, CenterCrop(IMAGE_SIZE))
    assert events == ["index"] * 3 + ["barrier"]  # built before the others are released
    events.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank1 = open_images(paths[0].parent, CenterCrop(IMAGE_SIZE))
    assert events == ["barrier"] and items(rank1) == items(rank0)  # read, not rebuilt
    # A mistake found by rank 0 still releases the barrier, and is raised on every rank.
    events.clear()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.tar").write_bytes(b"not a tar at all" * 64)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ShardError, match="is not an uncompressed tar"):
        open_images(broken, CenterCrop(IMAGE_SIZE))
    assert events == ["index", "barrier"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ShardError, match="is not an uncompressed tar"):
        open_images(broken, CenterCrop(IMAGE_SIZE))


def test_resumable_sampler_gives_the_same_batches_as_the_folder(assets: dict[str, Path]) -> None:
    transform = RandomCropFlip(IMAGE_SIZE)  # random crops: equal only if the per-sample seeding is equal
    folder = ImageFolderDataset(assets["images"], transform, seed=5)
    tars = open_images(assets["shards"], transform, seed=5)

    def batches(dataset, start: int) -> list[tuple]:
        sampler = ResumableDistributedSampler(len(dataset), num_replicas=2, rank=1, seed=3)
        sampler.set_epoch(1)
        dataset.set_epoch(1)
        sampler.set_start_index(start)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate_skip_bad)
        return [(b.images.numpy().tobytes(), b.labels.tolist(), b.indices.tolist(), b.stats.to_dict())
                for b in loader]

    assert batches(tars, 0) == batches(folder, 0)
    assert batches(tars, 0)[1:] == batches(tars, 2)  # resume after one batch of 2


def test_uint8_transforms_and_to_model_range_are_bit_exact(assets: dict[str, Path]) -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    exact = arr_to_tensor(values)
    assert torch.equal(to_model_range(arr_to_tensor(values, uint8=True)), exact)
    tars = open_images(assets["single"], TenCrop(IMAGE_SIZE, uint8=True))
    floats = open_images(assets["single"], TenCrop(IMAGE_SIZE))
    assert tars[0].image.dtype == torch.uint8 and tars[0].image.shape == (10, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(to_model_range(tars[0].image), floats[0].image)
    with pytest.raises(ValueError, match="expected uint8"):
        to_model_range(exact)


# ---------------------------------------------------------------- the CLIs: folder == shards


def test_extract_codes_from_shards_equals_the_folder(assets: dict[str, Path], tmp_path: Path) -> None:
    from tokenizer.extract_codes import main, parse_args

    def extract(data: str, out: Path) -> dict:
        return main(parse_args(["--tokenizer-ckpt", str(assets["tokenizer"]), "--data-path", data, "--out", str(out),
                                "--image-size", str(IMAGE_SIZE), "--batch-size", "2", "--shard-size", "4",
                                "--num-workers", "0", "--device", "cpu", "--flip"]))

    from_folder = extract(str(assets["images"]), tmp_path / "folder")
    from_tars = extract(str(assets["shards"] / "train-{000000..000002}.tar"), tmp_path / "tars")
    assert from_tars["num_items"] == from_folder["num_items"] == 12
    assert from_tars["meta"]["bad_files"] == from_folder["meta"]["bad_files"]
    assert [s["count"] for s in from_tars["shards"]] == [s["count"] for s in from_folder["shards"]]
    for shard in from_folder["shards"]:
        for key in ("file", "labels", "indices"):
            np.testing.assert_array_equal(np.load(tmp_path / "tars" / shard[key]),
                                          np.load(tmp_path / "folder" / shard[key]))


def test_two_ranks_share_one_index_and_extract_what_one_process_does(assets: dict[str, Path], tmp_path: Path) -> None:
    # Fresh shards, so the index is built under the process group (rank 0 builds, rank 1 waits), and
    # loader workers receive the shard dataset.
    pack_shards(assets["images"], tmp_path / "shards", per_shard=4)
    common = ["--tokenizer-ckpt", str(assets["tokenizer"]), "--image-size", str(IMAGE_SIZE), "--batch-size", "2",
              "--shard-size", "3", "--flip", "--device", "cpu"]
    from tokenizer.extract_codes import main, parse_args

    main(parse_args([*common, "--data-path", str(assets["images"]), "--out", str(tmp_path / "one"),
                     "--num-workers", "0"]))
    pattern = str(tmp_path / "shards" / "train-{000000..000003}.tar")
    run_module("tokenizer.extract_codes",
               [*common, "--data-path", pattern, "--out", str(tmp_path / "two"), "--num-workers", "1"], nproc=2)
    assert len(list((tmp_path / "shards").glob(".dar-shard-index-*.npz"))) == 1
    assert not list((tmp_path / "shards").glob(".*.tmp"))
    one, two = json.loads((tmp_path / "one" / "manifest.json").read_text()), json.loads(
        (tmp_path / "two" / "manifest.json").read_text())
    assert one["shards"] == two["shards"] and one["meta"]["bad_files"] == two["meta"]["bad_files"]
    for shard in one["shards"]:
        for key in ("file", "labels", "indices"):
            np.testing.assert_array_equal(np.load(tmp_path / "one" / shard[key]),
                                          np.load(tmp_path / "two" / shard[key]))


def test_reconstruct_from_shards_equals_the_folder(assets: dict[str, Path], tmp_path: Path) -> None:
    from tokenizer.reconstruct import main, parse_args

    def reconstruct(data: str, out: Path) -> dict:
        return main(parse_args(["--ckpt", str(assets["tokenizer"]), "--data-path", data, "--out", str(out),
                                "--image-size", str(IMAGE_SIZE), "--num-workers", "0", "--device", "cpu",
                                "--num-images", "9", "--batch-size", "3", "--grid-images", "2", "--labels"]))

    from_folder = reconstruct(str(assets["images"]), tmp_path / "folder.npz")
    from_tars = reconstruct(str(assets["single"]), tmp_path / "tars.npz")
    assert from_tars == from_folder and from_folder["num_images"] == 8  # 9 minus the bad file
    for name in ("folder", "tars"):
        assert (tmp_path / f"{name}.png").is_file()
    for suffix in (".npz", "_ref.npz"):
        a, b = np.load(tmp_path / f"folder{suffix}"), np.load(tmp_path / f"tars{suffix}")
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


# ---------------------------------------------------------------- mistakes: one line naming the path


def _argv(data: Path | str, out: Path) -> list[str]:
    return ["--tokenizer-ckpt", "unused", "--data-path", str(data), "--out", str(out), "--device", "cpu"]


def test_user_mistakes_name_the_path(assets: dict[str, Path], tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-{000..003}.tar")
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    not_tar = tmp_path / "photo.tar"
    not_tar.write_bytes(b"\xff\xd8\xff" + b"\x00" * 2000)
    gz = tmp_path / "packed.tar"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(assets["images"] / "c0" / "img_000.png", arcname="a.png")
    no_images = tmp_path / "labels_only.tar"
    with tarfile.open(no_images, "w") as tar:
        add_bytes(tar, "a.cls", b"1")
        add_bytes(tar, "a.txt", b"hello")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.tar").write_bytes(assets["single"].read_bytes())
    (mixed / "b.png").write_bytes((assets["images"] / "c0" / "img_000.png").read_bytes())
    partial = str(assets["shards"] / "train-{000001..000004}.tar")
    cases = [
        (pattern, [pattern, "matches no file"]),
        (partial, [partial, "2 of its 4 shards do not exist", "train-000003.tar"]),
        (empty, [str(empty), "no files"]),
        (not_tar, [str(not_tar), "is not an uncompressed tar file"]),
        (gz, [str(gz), "is not an uncompressed tar file", "without compression"]),
        (no_images, [str(no_images), "holds no images", "KEY.jpg"]),
        (mixed, [str(mixed), "holds both .tar shards and images"]),
        (tmp_path / "missing", [str(tmp_path / "missing"), "does not exist"]),
    ]
    for data, fragments in cases:
        with pytest.raises(UserError) as caught:
            open_images(data, CenterCrop(IMAGE_SIZE))
        message = str(caught.value)
        assert "\n" not in message and all(f in message for f in fragments), message
    assert require_data_path(str(assets["shards"] / "train-{000000..000002}.tar")) is not None
    for data, fragment in ((pattern, "matches no file"), (tmp_path / "missing", "--data-path: ")):
        with pytest.raises(UserError, match="matches no file|does not exist") as caught:
            require_data_path(data)
        assert fragment in str(caught.value)
    out = tmp_path / "codes"
    assert_user_error(run_module_cli("tokenizer.extract_codes", *_argv(pattern, out)), pattern, "matches no file")
    assert_user_error(run_module_cli("tokenizer.reconstruct", "--ckpt", "unused", "--data-path", str(not_tar),
                                     "--out", str(tmp_path / "r.npz"), "--device", "cpu"),
                      str(not_tar), "is not an uncompressed tar file")
    assert not out.exists()
    assert not any(p.name.startswith(".dar-shard-index") for p in tmp_path.iterdir())


def test_tokenizer_training_from_shards_logs_the_losses_of_the_folder(assets: dict[str, Path], tmp_path: Path) -> None:
    """``tokenizer.train --data-path`` takes tar shards; the same images give the same losses."""
    from tests.test_tokenizer_train import losses_by_step, train_args, write_recipe
    from tokenizer.train import main, parse_args

    recipe = write_recipe(tmp_path / "recipe.yaml", global_batch_size=4, max_steps=2, log_every=1, ckpt_every=2,
                          sample_every=2, num_sample_images=0, data={"num_workers": 0})
    pattern = str(assets["shards"] / "train-{000000..000002}.tar")
    for name, data in (("folder", assets["images"]), ("shards", pattern)):
        main(*parse_args(train_args(recipe, data, tmp_path / name)))
    folder = losses_by_step(tmp_path / "folder")
    assert sorted(folder) == [1, 2] and losses_by_step(tmp_path / "shards") == folder
