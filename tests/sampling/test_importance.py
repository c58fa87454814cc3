"""Importance plans: exact expected counts, unbiased weighted means (also for very skewed scores), floors."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.sampling.importance import importance_plan, probabilities, score_from


def _problem(n: int, seed: int, skew: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    scores = g.lognormal(0.0, skew, n)
    alpha = g.lognormal(0.0, 1.0, n)
    f = g.standard_normal(n) + 3.0 * (scores > np.median(scores))  # f correlated with the score
    return scores, alpha, f


@pytest.mark.parametrize("skew", [0.5, 3.0])
def test_weighted_mean_is_unbiased_over_many_epochs(skew: float) -> None:
    n, m, reps = 400, 400, 3000
    scores, alpha, f = _problem(n, seed=1, skew=skew)
    truth = (alpha * f).sum() / alpha.sum()
    ratio = np.empty(reps)
    hansen_hurwitz = np.empty(reps)
    for epoch in range(reps):
        idx, w = importance_plan(scores, alpha, m, seed=7, epoch=epoch)
        w = w.astype(np.float64)
        ratio[epoch] = (w * f[idx]).sum() / w.sum()
        hansen_hurwitz[epoch] = (w * f[idx]).sum() / m
    se = ratio.std(ddof=1) / np.sqrt(reps)
    assert abs(ratio.mean() - truth) <= 4 * se + 1e-12
    hh_truth = (alpha * f).sum() / n
    assert abs(hansen_hurwitz.mean() - hh_truth) <= 4 * hansen_hurwitz.std(ddof=1) / np.sqrt(reps) + 1e-12


def test_expected_counts_are_exact_and_counts_are_floor_or_ceil() -> None:
    n, m, reps = 50, 137, 4000
    scores, alpha, _ = _problem(n, seed=2, skew=1.5)
    p = probabilities(scores)
    counts = np.zeros((reps, n))
    for epoch in range(reps):
        idx, _ = importance_plan(scores, alpha, m, seed=3, epoch=epoch)
        assert idx.size == m and idx.dtype == np.int64
        counts[epoch] = np.bincount(idx, minlength=n)
    assert np.isin(counts - np.floor(m * p), [0, 1]).all()
    # the mean count of every row is m p within 5 standard errors (Bernoulli on the fractional part)
    frac = m * p - np.floor(m * p)
    se = np.sqrt(frac * (1 - frac) / reps) + 1e-9
    assert (np.abs(counts.mean(axis=0) - m * p) <= 5 * se + 1e-9).all()


def test_systematic_resampling_beats_multinomial_variance() -> None:
    n, m, reps = 300, 300, 1000
    scores, alpha, f = _problem(n, seed=4, skew=1.0)
    p = probabilities(scores)
    ours, multinomial = [], []
    for epoch in range(reps):
        idx, w = importance_plan(scores, alpha, m, seed=5, epoch=epoch)
        ours.append((w * f[idx]).sum() / w.sum())
        j = np.random.default_rng(epoch).choice(n, size=m, p=p)
        wj = alpha[j] / (n * p[j])
        multinomial.append((wj * f[j]).sum() / wj.sum())
    assert np.var(ours) < np.var(multinomial)


def test_uniform_scores_draw_every_row_once_with_unit_weights() -> None:
    idx, w = importance_plan(np.ones(1000), np.ones(1000), 1000, seed=0, epoch=3)
    np.testing.assert_array_equal(np.sort(idx), np.arange(1000))
    np.testing.assert_array_equal(w, np.ones(1000, np.float32))
    assert not (idx == np.arange(1000)).all()  # shuffled


def test_floor_keeps_every_row_alive() -> None:
    scores = np.zeros(1000)
    scores[0] = 1e9
    p = probabilities(scores, floor=0.1)
    assert p.min() >= 0.1 / 1.1 / 1000 * (1 - 1e-12)
    assert p.argmax() == 0 and probabilities(np.zeros(10)).tolist() == [0.1] * 10


def test_plans_are_pure_functions_of_seed_and_epoch() -> None:
    scores, alpha, _ = _problem(200, seed=6, skew=1.0)
    a = importance_plan(scores, alpha, 500, seed=1, epoch=2)
    b = importance_plan(scores, alpha, 500, seed=1, epoch=2)
    c = importance_plan(scores, alpha, 500, seed=1, epoch=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert importance_plan(scores, alpha, 0, 1, 2)[0].size == 0


def test_score_from_modes() -> None:
    kappa = np.array([10.0, 100.0, 1000.0])
    np.testing.assert_allclose(score_from("kappa", kappa=kappa), [0.1, 0.01, 0.001])
    np.testing.assert_array_equal(score_from("alpha", alpha=[1, 2, 3]), [1, 2, 3])
    np.testing.assert_array_equal(score_from("loss", priorities=np.array([0.5, 0.0, 2.0])), [0.5, 0.0, 2.0])
    np.testing.assert_array_equal(score_from("quality", column=np.array([3, 1, 2])), [3, 1, 2])
    # diffuse (low kappa) rows are drawn more often
    idx, _ = importance_plan(score_from("kappa", kappa=kappa), np.ones(3), 3000, 0, 0)
    assert np.bincount(idx, minlength=3).tolist() == sorted(np.bincount(idx, minlength=3).tolist(), reverse=True)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: score_from("kappa"), ConfigError),
        (lambda: score_from("kappa", kappa=[1.0, 0.0]), InvalidEmbeddingError),
        (lambda: score_from("kappa", kappa=[1.0, np.nan]), InvalidEmbeddingError),
        (lambda: score_from("loss"), ConfigError),
        (lambda: score_from("quality"), ConfigError),
        (lambda: importance_plan([1.0, -1.0], [1.0, 1.0], 2, 0, 0), InvalidEmbeddingError),
        (lambda: importance_plan([1.0, 1.0], [1.0, 0.0], 2, 0, 0), InvalidEmbeddingError),
        (lambda: importance_plan([1.0, 1.0], [1.0], 2, 0, 0), InvalidEmbeddingError),
        (lambda: importance_plan([1.0, 1.0], [1.0, 1.0], -1, 0, 0), ConfigError),
        (lambda: importance_plan([1.0, 1.0], [1.0, 1.0], 2, -1, 0), ConfigError),
        (lambda: importance_plan([1.0, 1.0], [1.0, 1.0], 2, 0, 0, floor=0.0), ConfigError),
        (lambda: importance_plan([], [], 3, 0, 0), ConfigError),
    ],
)
def test_invalid_arguments(call, error) -> None:
    with pytest.raises(error):
        call()
