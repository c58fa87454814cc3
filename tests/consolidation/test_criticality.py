"""Redundancy estimate vs the exact fraction consolidation removes; criticality bands."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.consolidation.criticality import (
    criticality_state,
    duplicate_degree,
    estimate_redundancy,
)
from m2m.consolidation.groups import find_duplicate_groups
from m2m.errors import ConfigError
from tests.consolidation.conftest import planted


def _exact_fraction(x: np.ndarray, labels, similarity: float) -> float:
    group = find_duplicate_groups(x, labels, similarity)
    return 1.0 - (group.max() + 1) / len(x)


def test_full_sample_is_exact_when_groups_are_cliques() -> None:
    x, _ = planted(3000, 32, 1500, seed=0, noise=0.05)  # copies within cos 0.998: cliques at 0.95
    assert estimate_redundancy(x, None, 0.95, sample=10_000) == pytest.approx(_exact_fraction(x, None, 0.95), abs=1e-12)


def test_sampled_estimate_is_within_a_few_percent() -> None:
    x, _ = planted(15_000, 48, 5_000, seed=1, noise=0.1)
    exact = _exact_fraction(x, None, 0.95)
    estimates = [estimate_redundancy(x, None, 0.95, sample=2000, seed=s) for s in range(3)]
    assert exact > 0.1
    for est in estimates:
        assert abs(est - exact) <= 3 * 0.5 / np.sqrt(2000)  # three standard errors at most
    assert len(set(estimates)) > 1  # the seed changes the sample


def test_labels_split_duplicates() -> None:
    x, _ = planted(1000, 16, 1000, seed=2, noise=0.05)
    labels = np.arange(len(x)) % 2
    no_labels = estimate_redundancy(x, None, 0.95, sample=5000)
    with_labels = estimate_redundancy(x, labels, 0.95, sample=5000)
    assert with_labels == pytest.approx(_exact_fraction(x, labels, 0.95), abs=0.02)
    assert with_labels < no_labels


def test_duplicate_degree_matches_brute_force() -> None:
    x, _ = planted(400, 8, 300, seed=3, noise=0.3)
    rows = np.array([0, 5, 17, 399, 650])
    s = x.astype(np.float64)[rows] @ x.astype(np.float64).T
    s[np.arange(len(rows)), rows] = -1
    np.testing.assert_array_equal(duplicate_degree(x, rows, None, 0.9), (s >= 0.9).sum(axis=1))


def test_redundancy_without_duplicates_is_zero() -> None:
    x, _ = planted(500, 32, 0, seed=4)
    assert estimate_redundancy(x, None, 0.95) == 0.0
    assert estimate_redundancy(np.zeros((0, 4), np.float32), None, 0.95) == 0.0


@pytest.mark.parametrize(
    "redundancy, state",
    [(0.0, "subcritical"), (0.179, "subcritical"), (0.18, "critical"), (0.2, "critical"), (0.22, "critical"),
     (0.221, "supercritical"), (1.0, "supercritical")],
)
def test_criticality_state_bands(redundancy: float, state: str) -> None:
    assert criticality_state(redundancy, 0.2) == state


@pytest.mark.parametrize("args", [(1.5, 0.2), (float("nan"), 0.2), (0.1, 0.0), (0.1, 1.0), (0.1, 0.2, 1.0)])
def test_criticality_state_validates(args) -> None:
    with pytest.raises(ConfigError):
        criticality_state(*args)


@pytest.mark.parametrize("kwargs", [{"exact_max_rows": -1}, {"exact_max_rows": 2.5}, {"sample": 0},
                                    {"sample": True}, {"exact_max_rows": "10"}])
def test_lake_criticality_refuses_bad_sizes_naming_them(kwargs) -> None:
    # observed: exact_max_rows=-1 was accepted silently (and took the sampled path)
    from m2m import M2MConfig, create_m2m
    from m2m.errors import ConfigError

    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((20, 8)))
        name = next(iter(kwargs))
        with pytest.raises(ConfigError, match=f"{name} must be an int >= "):
            lake.criticality(**kwargs)
