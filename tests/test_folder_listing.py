"""dataset.images.load_folder_listing: an image folder listed once per node, cached, equal to a fresh scan."""

from __future__ import annotations

import json
import logging
import os
import pickle
import pickletools
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import dataset.images as images
from dataset.images import (
    CenterCrop,
    FolderFiles,
    ImageFolderDataset,
    NoImagesError,
    listing_cache_path,
    load_folder_listing,
    remove_stale_listings,
    scan_image_folder,
)
from dataset.node_cache import CACHE_ENV, cache_file_path
from dataset.shards import open_images

PAST = time.time() - 3600  # folder mtimes set well before any scan: listings made from them are settled


@pytest.fixture(autouse=True)
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The roots scanned by ``load_folder_listing`` (a listing read from the cache adds nothing)."""
    calls: list[str] = []
    real = images._scan
    monkeypatch.setattr(images, "_scan", lambda root, *a: calls.append(root.name) or real(root, *a))
    return calls


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # listing never decodes: names are enough


def settle(root: Path, when: float = PAST) -> None:
    """Every folder of the tree gets mtime ``when`` (as if the data had been written long ago)."""
    for folder, _, _ in os.walk(root):
        os.utime(folder, (when, when))


def make_tree(root: Path) -> Path:
    """Two class folders, one with a nested sub-folder, plus names the listing must skip or keep intact."""
    for rel in ("b_cls/img1.png", "b_cls/deep/er/img0.JPG", "a_cls/x.jpeg", "a_cls/ünï cödé.png",
                "a_cls/.hidden.png", "a_cls/notes.txt", "a_cls/.cache/img.png"):
        touch(root / rel)
    # A name that is not UTF-8 (Linux allows any bytes but "/" and NUL).
    with open(os.fsencode(root / "b_cls") + b"/caf\xe9.png", "wb"):
        pass
    settle(root)
    return root


def make_flat(root: Path) -> Path:
    for rel in ("z.png", "a.png", "sub/m.webp", ".hidden/h.png"):
        touch(root / rel)
    settle(root)
    return root


def assert_same_as_scan(root: Path, with_labels: bool = True, index_dir: Path | None = None) -> None:
    assert load_folder_listing(root, with_labels, index_dir) == scan_image_folder(root, with_labels)


def test_a_cached_listing_equals_a_fresh_scan_for_class_and_flat_folders(
    tmp_path: Path, scans: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, flat = make_tree(tmp_path / "tree"), make_flat(tmp_path / "flat")
    for root, with_labels in ((tree, True), (tree, False), (flat, True)):
        scans.clear()
        fresh = load_folder_listing(root, with_labels)
        assert scans == [root.name] and listing_cache_path(root, with_labels).is_file()
        cached = load_folder_listing(root, with_labels)
        assert scans == [root.name]  # the second start reads the cache
        assert cached == fresh == scan_image_folder(root, with_labels)
    files, labels, classes = load_folder_listing(tree)
    assert classes == ("a_cls", "b_cls") and labels == [0, 0, 1, 1, 1]
    assert [f.relative_to(tree).as_posix() for f in files][1:4] == ["a_cls/ünï cödé.png", "b_cls/caf\udce9.png",
                                                                    "b_cls/deep/er/img0.JPG"]
    # Beside the folder by default; plain arrays that load without pickle.
    cache = listing_cache_path(tree)
    assert cache.parent == tmp_path and cache.name.startswith(".dar-folder-listing-")
    with np.load(cache, allow_pickle=False) as data:
        assert data["labels"].tolist() == labels
    # A relative root gives relative paths, as a scan does.
    monkeypatch.chdir(tmp_path)
    assert load_folder_listing(Path("tree")) == scan_image_folder("tree")
    # The datasets use it, with the cache folder as argument or environment variable.
    dataset = open_images(tree, CenterCrop(8), index_dir=tmp_path / "arg_cache")
    assert (list(dataset.files), dataset.labels.tolist(), dataset.classes) == scan_image_folder(tree)
    assert (tmp_path / "arg_cache" / cache.name).is_file()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env_cache"))
    ImageFolderDataset(tree, CenterCrop(8))
    assert (tmp_path / "env_cache" / cache.name).is_file()


def test_adding_or_removing_a_file_anywhere_in_the_tree_invalidates_the_listing(
    tmp_path: Path, scans: list[str]
) -> None:
    tree = make_tree(tmp_path / "tree")
    load_folder_listing(tree)
    changes = [
        lambda: touch(tree / "b_cls" / "deep" / "er" / "img9.png"),  # two levels below a class folder
        lambda: (tree / "a_cls" / "x.jpeg").unlink(),
        lambda: (tree / "b_cls" / "img1.png").rename(tree / "b_cls" / "img2.png"),
        lambda: touch(tree / "c_cls" / "new.png"),  # a new class
    ]
    for step, change in enumerate(changes):
        change()
        # Back-dated mtimes, all different: only the recorded mtimes can tell the change, not the clock.
        settle(tree, PAST + 10 * (step + 1))
        scans.clear()
        assert_same_as_scan(tree)
        assert scans == ["tree", "tree"]  # listed again (then once more by the reference scan)
    scans.clear()
    load_folder_listing(tree)
    assert scans == []
    # Editing a file in place moves no folder's mtime: the listing (names only) stays, rightly.
    (tree / "c_cls" / "new.png").write_bytes(b"other bytes")
    settle(tree, PAST + 100)
    load_folder_listing(tree)
    assert scans == ["tree"]  # settle() moved the folders' mtimes, so it was listed again...
    scans.clear()
    (tree / "c_cls" / "new.png").write_bytes(b"edited again")
    load_folder_listing(tree)
    assert scans == []  # ...but an edit alone keeps it
    # A folder changed within the last seconds may change again unseen within the same mtime tick: a new
    # run lists it again until it has settled.
    touch(tree / "a_cls" / "fresh.png")
    assert_same_as_scan(tree)
    scans.clear()
    assert_same_as_scan(tree)
    assert scans == ["tree", "tree"]


def test_a_permission_change_lists_the_folder_again(tmp_path: Path, scans: list[str]) -> None:
    """os.walk skips a folder it cannot read without a word; making it readable moves its ctime, not its mtime."""
    tree = make_tree(tmp_path / "tree")
    load_folder_listing(tree)
    scans.clear()
    deep = tree / "b_cls" / "deep"
    before = deep.stat().st_mtime_ns
    deep.chmod(0o700)
    assert deep.stat().st_mtime_ns == before
    load_folder_listing(tree)
    assert scans == ["tree"]


def test_a_cache_inside_the_listed_folder_is_not_written(tmp_path: Path, scans: list[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Writing there would move a recorded mtime: the listing would be stale the moment it exists."""
    tree = make_tree(tmp_path / "tree")
    for inside in (tree, tree / "a_cls"):
        scans.clear()
        assert_same_as_scan(tree, index_dir=inside)
        assert_same_as_scan(tree, index_dir=inside)
        assert scans == ["tree"] * 4  # listed every time, nothing cached
        assert not list(inside.glob(".dar-folder-listing-*"))
    assert "inside the listed folder" in caplog.text
    hidden = tree / ".listing"  # a hidden folder is not read by the scan: caching there works
    scans.clear()
    assert_same_as_scan(tree, index_dir=hidden)
    settle(tree)
    assert_same_as_scan(tree, index_dir=hidden)
    load_folder_listing(tree, index_dir=hidden)
    # Creating the folder moved the root's mtime once (listed again after settle), then the cache holds.
    assert scans == ["tree"] * 4 and list(hidden.glob(".dar-folder-listing-*"))


def test_the_cache_is_never_trusted_for_another_root_or_with_labels(tmp_path: Path, scans: list[str]) -> None:
    tree = make_tree(tmp_path / "tree")
    twin = tmp_path / "twin"
    shutil.copytree(tree, twin)
    (twin / "a_cls" / "x.jpeg").rename(twin / "a_cls" / "y.jpeg")
    settle(twin)  # same folders, same mtimes, other names
    load_folder_listing(tree)
    shutil.copy(listing_cache_path(tree), listing_cache_path(twin))
    assert listing_cache_path(tree, with_labels=False) != listing_cache_path(tree)
    shutil.copy(listing_cache_path(tree), listing_cache_path(tree, with_labels=False))
    scans.clear()
    assert_same_as_scan(twin)
    assert_same_as_scan(tree, with_labels=False)
    assert scans == ["twin", "twin", "tree", "tree"]  # both listed again, not read from the copies


def test_an_unwritable_or_unreadable_cache_falls_back_to_listing_with_a_warning(
    tmp_path: Path, scans: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tree = make_tree(tmp_path / "tree")
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        assert_same_as_scan(tree, index_dir=tmp_path / "a_file" / "cache")
    assert "cannot write the folder listing" in caplog.text and CACHE_ENV in caplog.text
    # A corrupt cache is listed again and rewritten, not trusted.
    load_folder_listing(tree)
    listing_cache_path(tree).write_bytes(b"garbage")
    caplog.clear()
    scans.clear()
    with caplog.at_level(logging.WARNING):
        assert_same_as_scan(tree)
    assert "is unreadable" in caplog.text and scans == ["tree", "tree"]
    scans.clear()
    load_folder_listing(tree)
    assert scans == []
    # A read-only data folder: the cache goes to the user's cache folder.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert cache_file_path("x.npz", tmp_path, None, "folder_listing") == tmp_path / "xdg/dar/folder_listing/x.npz"
    assert listing_cache_path(tree).parent == tmp_path / "xdg" / "dar" / "folder_listing"


def test_other_local_ranks_wait_for_rank0_and_read_its_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    for rel in ("c0/a.png", "c0/b.png", "c1/sub/c.png"):
        touch(tree / rel)  # just written: unsettled, yet this run's other ranks must take rank 0's listing
    events: list[str] = []
    monkeypatch.setattr(images, "barrier", lambda: events.append("barrier"))
    real = images._scan
    monkeypatch.setattr(images, "_scan", lambda *a: events.append("scan") or real(*a))
    monkeypatch.setenv("LOCAL_RANK", "0")
    rank0 = load_folder_listing(tree)
    assert events == ["scan", "barrier"]  # listed before the others are released
    events.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert load_folder_listing(tree) == rank0
    assert events == ["barrier"]  # read, not listed again
    assert rank0 == scan_image_folder(tree)
    # Without rank 0's file (it could not write it) they list the folder themselves rather than hang.
    listing_cache_path(tree).unlink()
    events.clear()
    assert load_folder_listing(tree) == rank0 and events == ["barrier", "scan"]
    # A mistake found by rank 0 still releases the barrier, and is raised on every rank.
    empty = tmp_path / "empty"
    empty.mkdir()
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        events.clear()
        with pytest.raises(NoImagesError, match="no images"):
            load_folder_listing(empty)
        assert events == (["scan", "barrier"] if rank == "0" else ["barrier", "scan"])


def test_writing_a_listing_removes_the_ones_that_can_never_load_again(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    roots = {name: make_flat(tmp_path / name) for name in ("a", "b", "c", "d")}
    paths = {}
    for name, root in roots.items():
        load_folder_listing(root, index_dir=cache_dir)
        paths[name] = listing_cache_path(root, index_dir=cache_dir)
    unreadable = cache_dir / ".dar-folder-listing-fedcba9876543210.npz"
    unreadable.write_bytes(b"garbage")
    with np.load(paths["a"], allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())

    def fake(name: str, **changes: object) -> Path:
        path = cache_dir / f".dar-folder-listing-{name}.npz"
        text = json.dumps({**meta, **changes}).encode()
        np.savez(path, meta=np.frombuffer(text, dtype=np.uint8))
        return path

    old_format = fake("0123456789abcdef", version=images.LISTING_VERSION - 1)
    off_machine = fake("00000000000000ff", root=str(tmp_path / "unmounted" / "data"))  # maybe another machine's
    shard_index = cache_dir / ".dar-shard-index-0123456789abcdef.npz"
    shard_index.write_bytes(b"not ours")
    assert remove_stale_listings(cache_dir, keep=paths["a"]) == [old_format]
    shutil.rmtree(roots["b"])  # a data set gone from its folder
    touch(roots["c"] / "sub" / "new.png")  # a changed data set: its listing can never load again
    touch(roots["d"] / "new.png")
    load_folder_listing(roots["d"], index_dir=cache_dir)  # writing d's new listing cleans the folder
    assert sorted(cache_dir.iterdir()) == sorted([paths["a"], paths["d"], unreadable, off_machine, shard_index])


# ---------------------------------------------------------------- compact dataset.files


def assert_like_list(files: FolderFiles, expected: list[Path]) -> None:
    """``files`` behaves as the list ``expected`` for every read a data set's users make."""
    n = len(expected)
    assert len(files) == n and list(files) == expected
    assert [files[i] for i in range(n)] == expected and [files[i] for i in range(-n, 0)] == expected
    assert files[np.int64(n - 1)] == expected[-1]  # samplers may hand out numpy integers
    for cut in (slice(None), slice(1, 3), slice(-2, None), slice(None, None, -2), slice(n, n + 5), slice(3, 1)):
        assert files[cut] == expected[cut]
    for outside in (n, -n - 1):
        with pytest.raises(IndexError):
            files[outside]
        with pytest.raises(IndexError):
            expected[outside]


def test_dataset_files_are_a_compact_sequence_equal_to_the_scanned_paths(tmp_path: Path) -> None:
    tree, flat = make_tree(tmp_path / "tree"), make_flat(tmp_path / "flat")
    for root, with_labels in ((tree, True), (tree, False), (flat, True)):
        files, labels, classes = scan_image_folder(root, with_labels)
        for _ in ("listed", "read from the cache"):
            dataset = ImageFolderDataset(root, CenterCrop(8), with_labels)
            assert isinstance(dataset.files, FolderFiles) and dataset.files.root == root
            assert_like_list(dataset.files, files)
            assert dataset.labels.dtype == np.int64 and dataset.labels.tolist() == labels
            assert dataset.classes == classes
    # The name that is not UTF-8 comes back as the same bytes, so the file opens.
    dataset = ImageFolderDataset(tree, CenterCrop(8))
    odd = [f for f in dataset.files if f.name.startswith("caf")]
    assert [os.fsencode(f.name) for f in odd] == [b"caf\xe9.png"] and odd[0].is_file()
    assert repr(dataset.files) == f"FolderFiles({str(tree)!r}, 5 files: 'a_cls/x.jpeg' .. 'b_cls/img1.png')"


def test_folder_files_from_names() -> None:
    root = Path("/data/train")
    names = ["n01/a.JPEG", "n01/deep/b.png", "ünï cödé.png", "caf\udce9.png", "z"]
    assert_like_list(FolderFiles.from_names(root, names), [root / name for name in names])
    assert_like_list(FolderFiles.from_names("rel", names[:1]), [Path("rel") / names[0]])
    empty = FolderFiles.from_names(root, [])
    assert len(empty) == 0 and list(empty) == [] and empty[:] == []
    assert repr(empty) == "FolderFiles('/data/train', 0 files)"
    with pytest.raises(IndexError):
        empty[0]
    for bad in (["a.png", ""], ["a\0b.png"]):  # no file name is empty or holds NUL
        with pytest.raises(ValueError):
            FolderFiles.from_names(root, bad)


def test_a_pickled_dataset_is_its_name_bytes_not_a_path_per_file(tmp_path: Path) -> None:
    """What a data-loader worker receives: the names' bytes and the labels, unpickled as two arrays (a list
    of Paths pickles a class, a tuple and strings per file, and unpickles into an object per file)."""
    root = tmp_path / "train"
    names = [f"n{c:08d}/n{c:08d}_{i:05d}.JPEG" for c in range(5) for i in range(1000)]  # in scan order
    for c in range(5):
        (root / f"n{c:08d}").mkdir(parents=True)
    for name in names:
        (root / name).touch()
    dataset = ImageFolderDataset(root, CenterCrop(8))
    data = pickle.dumps(dataset)
    restored = pickle.loads(data)
    assert isinstance(restored.files, FolderFiles) and list(restored.files) == [root / n for n in names]
    assert restored.labels.dtype == np.int64 and restored.labels.tolist() == [i // 1000 for i in range(5000)]
    assert restored.classes == dataset.classes and restored.transform == dataset.transform

    raw = dataset.files.names.nbytes + dataset.labels.nbytes  # 155,000 + 40,000 bytes
    bound = raw + 4096
    operations = sum(1 for _ in pickletools.genops(data))
    assert len(data) < bound and operations < 300
    as_lists = pickle.dumps(([root / n for n in names], dataset.labels.tolist()))  # what the lists pickled to
    assert len(as_lists) > bound and sum(1 for _ in pickletools.genops(as_lists)) > 10 * len(names)
