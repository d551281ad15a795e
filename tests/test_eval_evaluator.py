"""The ADM-style evaluator: .npz reading, metric assembly, and the CLI under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations.evaluator import (
    IS_UNAVAILABLE,
    PR_UNAVAILABLE,
    _metrics,
    _shard_bounds,
    extract_features,
    format_results,
    load_images,
    open_npz_array,
    read_statistics,
    reference_features,
)
from evaluations.inception import load_fid_inception
from evaluations.metrics import feature_statistics, precision_recall

REPO = Path(__file__).resolve().parents[1]


def test_npz_arrays_memory_mapped_or_loaded(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", arr_0=images, arr_1=np.arange(5))
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=images)
    stored = open_npz_array(tmp_path / "stored.npz")
    assert isinstance(stored, np.memmap)
    np.testing.assert_array_equal(stored, images)
    np.testing.assert_array_equal(stored[3:5], images[3:5])
    deflated = open_npz_array(tmp_path / "deflated.npz")
    np.testing.assert_array_equal(deflated, images)
    with pytest.raises(KeyError, match="no array 'mu'"):
        open_npz_array(tmp_path / "stored.npz", "mu")
    (tmp_path / "images.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(ValueError, match="not an .npz file"):
        open_npz_array(tmp_path / "images.npy")
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        open_npz_array(tmp_path / "missing.npz")
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        load_images(tmp_path / "nchw.npz")


def test_stored_statistics_all_or_none(tmp_path: Path) -> None:
    assert read_statistics(_write(tmp_path / "none.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))) is None
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    got = read_statistics(_write(tmp_path / "all.npz", **stats))
    assert set(got) == set(stats) and got["sigma_s"].shape == (2023, 2023)
    with pytest.raises(ValueError, match="not all of"):
        read_statistics(_write(tmp_path / "partial.npz", mu=stats["mu"], sigma=stats["sigma"]))
    with pytest.raises(ValueError, match="mu_s/sigma_s"):
        read_statistics(_write(tmp_path / "shape.npz", **dict(stats, mu_s=np.zeros(7))))


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_shards_are_contiguous_and_cover_in_order() -> None:
    for n, world in [(10, 3), (2, 4), (50000, 8)]:
        bounds = _shard_bounds(n, world)
        sizes = np.diff(bounds)
        assert bounds[0] == 0 and bounds[-1] == n and (sizes >= 0).all() and sizes.max() - sizes.min() <= 1


def test_metric_assembly_and_unavailable_lines() -> None:
    """Low-dimensional stand-in features exercise the ADM assembly without 2048-d matrix roots."""
    rng = np.random.default_rng(0)
    ref = {"pool": rng.normal(size=(30, 4)), "spatial": rng.normal(size=(30, 3))}
    sample = {"pool": rng.normal(size=(20, 4)) + 0.5, "spatial": rng.normal(size=(20, 3))}
    results = _metrics(ref, None, sample, None, device="cpu")
    assert results["inception_score"] is None and results["notes"]["inception_score"] == IS_UNAVAILABLE
    expected_pr = precision_recall(ref["pool"], sample["pool"], device="cpu")
    assert (results["precision"], results["recall"]) == pytest.approx(expected_pr)
    assert format_results(results) == [
        f"Inception Score: {IS_UNAVAILABLE}",
        f"FID: {results['fid']}",
        f"sFID: {results['sfid']}",
        f"Precision: {results['precision']}",
        f"Recall: {results['recall']}",
    ]
    # Stored reference statistics replace the reference features' own, as in ADM.
    mu, sigma = feature_statistics(sample["pool"])
    mu_s, sigma_s = feature_statistics(sample["spatial"])
    stored = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    sample["logits"] = np.zeros((20, 10))
    results = _metrics(None, stored, sample, None, device="cpu")
    assert results["fid"] == pytest.approx(0.0, abs=1e-9) and results["sfid"] == pytest.approx(0.0, abs=1e-9)
    assert results["inception_score"] == pytest.approx(1.0)
    assert results["precision"] is None and results["notes"]["recall"] == PR_UNAVAILABLE
    assert format_results(results)[3] == f"Precision: {PR_UNAVAILABLE}"


def _images(seed: int, n: int, size: int) -> np.ndarray:
    """Smooth random colour fields: spread-out Inception features, unlike white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3))
    fine = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
    return np.clip(fine + rng.normal(0, 12, fine.shape), 0, 255).astype(np.uint8)


def test_default_batch_size_depends_on_the_device_and_not_the_features() -> None:
    from evaluations.evaluator import DEFAULT_BATCH_SIZE, DEFAULT_CPU_BATCH_SIZE, default_batch_size

    assert default_batch_size(torch.device("cuda", 0)) == DEFAULT_BATCH_SIZE == 128
    assert default_batch_size(torch.device("cpu")) == DEFAULT_CPU_BATCH_SIZE == 10
    model = load_fid_inception(None, device="cpu")
    images = _images(1, 12, 32)  # two CPU batches of the default size: 10 + 2
    by_default, whole = extract_features(model, images), extract_features(model, images, batch_size=12)
    for key in whole:
        np.testing.assert_allclose(by_default[key], whole[key], rtol=1e-4, atol=1e-5)


def test_reference_feature_cache_is_reused_only_for_the_same_images_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import evaluations.evaluator as evaluator

    model = load_fid_inception(None, device="cpu")
    images = _images(0, 3, 32)
    cache = tmp_path / "ref_features.npz"
    direct = extract_features(model, images, batch_size=3)
    first = reference_features(model, images, batch_size=3, cache=cache)
    assert cache.is_file() and set(first) == set(direct) == {"pool", "spatial"}
    for key in direct:
        np.testing.assert_array_equal(first[key], direct[key])

    calls = []
    real_extract = evaluator.extract_features

    def counting_extract(*args, **kwargs):
        calls.append(1)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(evaluator, "extract_features", counting_extract)
    again = reference_features(model, images, batch_size=3, cache=cache)
    assert calls == []  # served from the cache
    for key in direct:
        np.testing.assert_array_equal(again[key], direct[key])

    # One changed pixel: the cache no longer applies; it is recomputed and rewritten for the new images.
    changed = images.copy()
    changed[1, 5, 5, 0] ^= 0xFF
    with caplog.at_level("WARNING"):
        moved = reference_features(model, changed, batch_size=3, cache=cache)
    assert len(calls) == 1 and "other reference images or Inception weights" in caplog.text
    np.testing.assert_array_equal(moved["pool"][0], direct["pool"][0])
    assert not np.array_equal(moved["pool"][1], direct["pool"][1])
    reference_features(model, changed, batch_size=3, cache=cache)
    assert len(calls) == 1  # the rewritten cache now serves the changed images

    # Other Inception weights (one BatchNorm shift nudged): recomputed as well.
    with torch.no_grad():
        next(b for n, b in model.named_buffers() if n.endswith(".mean")).add_(1e-3)
    reference_features(model, changed, batch_size=3, cache=cache)
    assert len(calls) == 2

    # A damaged cache file is reported and replaced, never trusted.
    cache.write_bytes(b"not an npz")
    caplog.clear()
    with caplog.at_level("WARNING"):
        reference_features(model, changed, batch_size=3, cache=cache)
    assert len(calls) == 3 and "unreadable" in caplog.text
    reference_features(model, changed, batch_size=3, cache=cache)
    assert len(calls) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_under_torchrun_matches_in_process(tmp_path: Path) -> None:
    """2 gloo ranks shard the files; the reference's stored stats (those of the samples, computed
    here in one process) must give FID = sFID = 0, and precision/recall must match ours."""
    ref_images, sample_images = _images(0, 4, 32), _images(1, 5, 32)
    model = load_fid_inception(None, device="cpu")
    ref_feats = extract_features(model, ref_images, batch_size=4)
    sample_feats = extract_features(model, sample_images, batch_size=5)
    mu, sigma = feature_statistics(sample_feats["pool"])
    mu_s, sigma_s = feature_statistics(sample_feats["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "sample.npz", arr_0=sample_images)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "evaluations.evaluator", str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"),
           "--device", "cpu", "--batch-size", "2", "--json", str(tmp_path / "out.json"),
           "--ref-cache", str(tmp_path / "ref_features.npz")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(tmp_path / "torch_home")}  # no IS classifier: the offline line is printed
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.split(":")[0] in
             {"Inception Score", "FID", "sFID", "Precision", "Recall"}]
    results = json.loads((tmp_path / "out.json").read_text())
    assert lines == format_results(results), proc.stdout  # printed once (rank 0), ADM's format
    assert lines[0].startswith("Inception Score: unavailable: no IS classifier here; put pt_inception-2015-12-05")
    # Rank-4 covariances make sqrtm(S @ S) inexact (~2e-6 of the trace here); a real FID is of the
    # order of the trace, so 1e-5 of it still tells "same statistics" from anything else.
    assert abs(results["fid"]) <= 1e-5 * np.trace(sigma), results["fid"]
    assert abs(results["sfid"]) <= 1e-5 * np.trace(sigma_s), results["sfid"]
    expected_pr = precision_recall(ref_feats["pool"], sample_feats["pool"], device="cpu")
    assert (results["precision"], results["recall"]) == pytest.approx(expected_pr)
    assert results["num_reference"] == 4 and results["num_samples"] == 5
    # Rank 0 wrote the gathered reference features to the cache, in reference order.
    with np.load(tmp_path / "ref_features.npz") as cached:
        np.testing.assert_allclose(cached["pool"], ref_feats["pool"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cached["spatial"], ref_feats["spatial"], rtol=1e-4, atol=1e-5)
