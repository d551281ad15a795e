"""Code shards: write -> manifest -> CodeDataset round trip, and the writer's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.codes import CodeDataset, completed_shards, read_manifest, write_manifest, write_shard

SEQ_LEN, VOCAB = 6, 4096


def _write_example(root: Path, num_augs: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, VOCAB, (7, num_augs, SEQ_LEN))
    labels = rng.integers(0, 10, (7,))
    # Shard 1 covers a source range where every image was skipped: it is empty but still complete.
    write_shard(root, 0, codes[:4], labels[:4], np.arange(4), VOCAB)
    write_shard(root, 1, codes[:0], labels[:0], np.arange(0), VOCAB)
    write_shard(root, 2, torch.from_numpy(codes[4:]), torch.from_numpy(labels[4:]), np.arange(10, 13), VOCAB)
    return codes, labels


def test_round_trip(tmp_path: Path) -> None:
    codes, labels = _write_example(tmp_path)
    manifest = write_manifest(tmp_path, SEQ_LEN, VOCAB, num_augs=3, meta={"image_size": 256})
    assert manifest == read_manifest(tmp_path)
    assert manifest["num_items"] == 7
    assert [(s["file"], s["start"], s["count"]) for s in manifest["shards"]] == [
        ("codes_00000.npy", 0, 4), ("codes_00001.npy", 4, 0), ("codes_00002.npy", 4, 3)]
    assert np.load(tmp_path / "codes_00000.npy").dtype == np.int16
    dataset = CodeDataset(tmp_path, seed=1)
    assert len(dataset) == 7
    picked = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for i in range(7):
            row, label = dataset[i]
            assert row.dtype == torch.int64 and row.shape == (SEQ_LEN,)
            assert label == labels[i]
            matches = [a for a in range(3) if np.array_equal(row.numpy(), codes[i, a])]
            assert matches
            picked.add(matches[0])
    assert picked == {0, 1, 2}


def test_augmentation_is_deterministic_across_workers(tmp_path: Path) -> None:
    _write_example(tmp_path)
    write_manifest(tmp_path, SEQ_LEN, VOCAB, num_augs=3)
    dataset = CodeDataset(tmp_path, seed=4)
    dataset.set_epoch(3)
    runs = [
        [torch.cat([c, l[:, None]], 1) for c, l in DataLoader(dataset, batch_size=2, num_workers=w)]
        for w in (0, 2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    again = CodeDataset(tmp_path, seed=4)
    again.set_epoch(3)
    assert torch.equal(again[5][0], dataset[5][0])


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    ok = np.zeros((2, 1, SEQ_LEN), np.int64)
    with pytest.raises(ValueError, match="outside"):
        write_shard(tmp_path, 0, ok + VOCAB, np.zeros(2), np.arange(2), VOCAB)
    with pytest.raises(ValueError, match="must both be"):
        write_shard(tmp_path, 0, ok, np.zeros(3), np.arange(2), VOCAB)
    with pytest.raises(ValueError, match="count, num_augs, seq_len"):
        write_shard(tmp_path, 0, ok[:, 0], np.zeros(2), np.arange(2), VOCAB)
    assert completed_shards(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no complete code shards"):
        write_manifest(tmp_path, SEQ_LEN, VOCAB, 1)


def test_manifest_checks_shapes_and_duplicates(tmp_path: Path) -> None:
    ok = np.zeros((2, 1, SEQ_LEN), np.int64)
    write_shard(tmp_path, 0, ok, np.zeros(2), np.arange(2), VOCAB)
    with pytest.raises(ValueError, match="expected"):
        write_manifest(tmp_path, SEQ_LEN + 1, VOCAB, 1)
    write_shard(tmp_path, 1, ok, np.zeros(2), np.arange(1, 3), VOCAB)
    with pytest.raises(ValueError, match="more than one shard"):
        write_manifest(tmp_path, SEQ_LEN, VOCAB, 1)


def test_incomplete_shard_is_invisible_and_large_vocab_uses_int32(tmp_path: Path) -> None:
    big = 70000
    write_shard(tmp_path, 3, np.full((1, 1, SEQ_LEN), big - 1), np.zeros(1), np.arange(1), big)
    # A crash between the labels and the codes file leaves a shard that does not count.
    np.save(tmp_path / "labels_00004.npy", np.zeros(1, np.int64))
    assert completed_shards(tmp_path) == [3]
    write_manifest(tmp_path, SEQ_LEN, big, 1)
    dataset = CodeDataset(tmp_path)
    assert dataset[0][0].tolist() == [big - 1] * SEQ_LEN


def test_reader_rejects_other_formats(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="extract codes first"):
        CodeDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="dar-codes"):
        CodeDataset(tmp_path)
