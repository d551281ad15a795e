"""FID / IS / precision-recall against closed forms and constructed answers (small dims, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluations import metrics
from evaluations.metrics import feature_statistics, frechet_distance, inception_score, precision_recall


def _gaussian_w2_diagonal(mu1, var1, mu2, var2) -> float:
    """Closed form for commuting covariances: ||mu1-mu2||^2 + sum (sqrt(l1) - sqrt(l2))^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(sigma)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def test_frechet_diagonal_and_commuting_match_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = _gaussian_w2_diagonal(mu1, var1, mu2, var2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    # Same eigenbasis, rotated away from the axes: the products still commute.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    sigma1, sigma2 = q @ np.diag(var1) @ q.T, q @ np.diag(var2) @ q.T
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_general_covariances_match_symmetric_form() -> None:
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2): an independent, eigh-based computation.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    root1 = _psd_sqrt(sigma1)
    tr_covmean = np.trace(_psd_sqrt(root1 @ sigma2 @ root1))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_near_singular_covariance() -> None:
    mu = np.zeros(5)
    var1 = np.array([2.0, 1.0, 0.5, 0.0, 0.0])  # rank 3
    var2 = np.array([1.0, 3.0, 1e-12, 0.0, 1e-14])
    got = frechet_distance(mu, np.diag(var1), mu + 0.5, np.diag(var2))
    assert math.isfinite(got)
    assert got == pytest.approx(_gaussian_w2_diagonal(mu, var1, mu + 0.5, var2), abs=1e-5)


def test_frechet_eigh_method_agrees_with_adm_sqrtm() -> None:
    rng = np.random.default_rng(3)
    # Full-rank statistics, and rank-deficient ones from fewer samples than dimensions (the demo's case).
    for n, dim in ((400, 24), (20, 48)):
        feats1 = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
        feats2 = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + 0.3
        mu1, sigma1 = feature_statistics(feats1)
        mu2, sigma2 = feature_statistics(feats2)
        adm = frechet_distance(mu1, sigma1, mu2, sigma2)
        fast = frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh")
        assert fast == pytest.approx(adm, rel=1e-7), (n, dim)
        same = frechet_distance(mu1, sigma1, mu1, sigma1, method="eigh")
        assert same == pytest.approx(0.0, abs=1e-7 * np.trace(sigma1))
    var1, var2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = _gaussian_w2_diagonal(np.zeros(6), var1, np.ones(6), var2)
    got = frechet_distance(np.zeros(6), np.diag(var1), np.ones(6), np.diag(var2), method="eigh")
    assert got == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2), method="eigh")
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]), method="eigh")
    with pytest.raises(ValueError, match="unknown FID method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_frechet_offset_fallback_and_imaginary_error(monkeypatch: pytest.MonkeyPatch) -> None:
    sigma1, sigma2 = np.diag([1.0, 2.0, 3.0]), np.diag([2.0, 2.0, 0.5])
    calls = []
    real_sqrt = metrics._matrix_sqrt

    def first_call_not_finite(matrix: np.ndarray) -> np.ndarray:
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrt(matrix)

    monkeypatch.setattr(metrics, "_matrix_sqrt", first_call_not_finite)
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        got = frechet_distance(np.zeros(3), sigma1, np.zeros(3), sigma2)
    # The retry uses (sigma1 + eps I)(sigma2 + eps I), exactly as ADM.
    np.testing.assert_allclose(calls[1], (sigma1 + 1e-6 * np.eye(3)) @ (sigma2 + 1e-6 * np.eye(3)))
    cross = np.sum(np.sqrt((np.diag(sigma1) + 1e-6) * (np.diag(sigma2) + 1e-6)))
    expected = np.trace(sigma1) + np.trace(sigma2) - 2 * cross
    assert got == pytest.approx(expected, rel=1e-12)
    monkeypatch.undo()

    # A non-PSD "covariance" has a matrix root with an imaginary diagonal: refused, never clipped.
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_frechet_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="equal in length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_feature_statistics_unbiased() -> None:
    feats = np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False, ddof=1))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(feats[:1])


def test_inception_score_uniform_and_confident() -> None:
    assert inception_score(np.zeros((20, 1008))) == pytest.approx(1.0, abs=1e-12)
    classes = 10
    confident = np.zeros((100, classes))
    confident[np.arange(100), np.arange(100) % classes] = 60.0
    assert inception_score(confident) == pytest.approx(classes, rel=1e-9)
    # Logit gaps far beyond float32 softmax range stay finite (ADM would produce NaN here).
    confident[np.arange(100), np.arange(100) % classes] = 1e4
    assert inception_score(confident) == pytest.approx(classes, rel=1e-9)


def test_inception_score_splits_include_the_short_last_one() -> None:
    logits = np.zeros((12, 5))
    logits[np.arange(10), np.arange(10) % 5] = 80.0  # two splits of 5, each balanced over 5 classes
    logits[10, 0] = logits[11, 1] = 80.0  # last split of 2: balanced over 2 classes
    assert inception_score(logits, split_size=5) == pytest.approx((5 + 5 + 2) / 3, rel=1e-9)
    with pytest.raises(ValueError, match="non-finite"):
        inception_score(np.full((3, 4), np.nan))


def _brute_force_pr(ref: np.ndarray, sample: np.ndarray, k: int) -> tuple[float, float]:
    def sq(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    def radii(x):
        d = sq(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d = sq(sample, ref)  # (Ns, Nr)
    precision = np.mean((d <= radii(ref)[None, :]).any(1))
    recall = np.mean((d <= radii(sample)[:, None]).any(0))
    return float(precision), float(recall)


def test_precision_recall_constructed_clouds() -> None:
    # Reference: 0..9 on a line. Samples: 0..4 on the reference points plus 5 far away points.
    # Sample balls (3rd-NN radii 3,2,2,2,3) reach reference points 0..7 (7 exactly on the boundary
    # of sample 4's ball); only the 5 on-reference samples lie in reference balls.
    ref = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    sample = np.stack([np.r_[np.arange(5.0), 1000.0 + np.arange(5.0)], np.zeros(10)], axis=1)
    assert precision_recall(ref, sample, k=3, device="cpu") == pytest.approx((0.5, 0.8))
    assert precision_recall(ref, ref, device="cpu") == (1.0, 1.0)
    assert precision_recall(ref, ref + 1e4, device="cpu") == (0.0, 0.0)


def test_precision_recall_blocks_match_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = np.random.default_rng(3).normal(size=(60, 8)).astype(np.float32)
    sample = (np.random.default_rng(4).normal(size=(45, 8)) * 0.8 + 1.0).astype(np.float32)
    expected = _brute_force_pr(ref.astype(np.float64), sample.astype(np.float64), k=3)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    assert precision_recall(ref, sample, device="cpu") == pytest.approx(expected)
    assert precision_recall(ref, sample, device="cpu", batch_size=7) == pytest.approx(expected)
    monkeypatch.setattr(metrics, "MAX_DISTANCE_BLOCK_ELEMENTS", 100)  # forces ~2-row blocks
    assert precision_recall(ref, sample, device="cpu") == pytest.approx(expected)
    assert precision_recall(ref, sample, k=5, device="cpu") == pytest.approx(_brute_force_pr(ref, sample, k=5))


def test_precision_recall_input_checks() -> None:
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
