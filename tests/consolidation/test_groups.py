"""Near-duplicate groups equal the exact components; merging conserves alpha; groups never cross labels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from m2m.consolidation.groups import (
    ConsolidationReport,
    connected_components,
    consolidate_arrays,
    find_duplicate_groups,
    merge_groups,
)
from m2m.errors import ConfigError, InvalidEmbeddingError
from tests.consolidation.conftest import canonical, planted, reference_groups


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), m=st.integers(0, 200), seed=st.integers(0, 2**31))
def test_connected_components_match_scipy(n: int, m: int, seed: int) -> None:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_cc

    g = np.random.default_rng(seed)
    u, v = g.integers(0, n, m), g.integers(0, n, m)
    ours = connected_components(n, u, v)
    _, ref = scipy_cc(coo_matrix((np.ones(m), (u, v)), shape=(n, n)), directed=False)
    np.testing.assert_array_equal(canonical(ours), canonical(ref))
    # ids are 0..G-1 in order of first row
    _, first = np.unique(ours, return_index=True)
    assert (np.diff(first) > 0).all() and ours.max(initial=-1) == first.size - 1


small_sets = dict(
    n_base=st.integers(1, 40),
    dup=st.integers(0, 40),
    d=st.integers(2, 8),
    noise=st.floats(0.01, 0.8),
    sim=st.one_of(st.floats(0.5, 1.0 - 1e-6), st.just(1.0)),  # (between them: refused, test below)
    n_labels=st.integers(0, 3),
    seed=st.integers(0, 2**31),
)


@settings(max_examples=80, deadline=None)
@given(**small_sets)
@example(n_base=1, dup=14, d=2, noise=0.2, sim=1.0, n_labels=0, seed=1)  # a pair at cosine 1 - 1.05e-6
def test_exact_path_equals_reference(n_base, dup, d, noise, sim, n_labels, seed) -> None:
    x, _ = planted(n_base, d, dup, seed=seed, noise=noise)
    labels = None if n_labels == 0 else np.random.default_rng(seed).integers(0, n_labels, len(x))
    group = find_duplicate_groups(x, labels, sim)
    np.testing.assert_array_equal(canonical(group), reference_groups(x, labels, sim))


@settings(max_examples=30, deadline=None)
@given(**small_sets)
def test_ivf_path_probing_every_list_equals_reference(n_base, dup, d, noise, sim, n_labels, seed) -> None:
    x, _ = planted(n_base, d, dup, seed=seed, noise=noise)
    labels = None if n_labels == 0 else np.random.default_rng(seed).integers(0, n_labels, len(x))
    nlist = max(1, min(4, len(x)))
    group = find_duplicate_groups(x, labels, sim, exact_max_rows=0, nlist=nlist, nprobe=nlist)
    np.testing.assert_array_equal(canonical(group), reference_groups(x, labels, sim))


def test_ivf_path_finds_planted_duplicates_without_false_merges() -> None:
    x, truth = planted(16_000, 64, 4_000, seed=1, noise=0.15)  # copies at cos ~0.989
    done: list[int] = []
    group = find_duplicate_groups(x, None, 0.95, exact_max_rows=0, seed=2, progress=done.append)
    assert sum(done) == len(x)
    # recall: planted copies that share a group with their source
    src_row = np.full(truth.max() + 1, -1)
    src_row[truth[::-1]] = np.arange(len(x))[::-1]  # a representative row of each planted group
    planted_rows = np.nonzero(np.bincount(truth)[truth] > 1)[0]
    found = (group[planted_rows] == group[src_row[truth[planted_rows]]]).mean()
    assert found >= 0.95
    # false merges: found groups holding rows of more than one planted group
    pairs = np.unique(np.stack([group, truth], axis=1), axis=0)
    mixed = np.bincount(pairs[:, 0]) > 1
    assert mixed.sum() <= 0.01 * (group.max() + 1)


def test_groups_never_cross_labels() -> None:
    x, truth = planted(500, 16, 500, seed=3, noise=0.05)
    labels = np.random.default_rng(4).choice(np.array(["cat", "dog"]), len(x))
    for kwargs in ({}, {"exact_max_rows": 0}):
        group = find_duplicate_groups(x, labels, 0.9, **kwargs)
        both = np.unique(np.stack([group, (labels == "cat").astype(np.int64)], axis=1), axis=0)
        assert (np.bincount(both[:, 0]) == 1).all()
    assert len(np.unique(find_duplicate_groups(x, None, 0.9))) < len(np.unique(group))


def test_float16_input_and_identical_rows_at_similarity_one() -> None:
    x, _ = planted(300, 32, 0, seed=5)
    x[10] = x[20] = x[30]
    group = find_duplicate_groups(x.astype(np.float16), None, 1.0)
    assert group[10] == group[20] == group[30]
    assert len(np.unique(group)) == 298


@pytest.mark.parametrize("similarity", [0.0, -0.5, 1.5, "high", True])
def test_bad_similarity(similarity) -> None:
    with pytest.raises(ConfigError):
        find_duplicate_groups(planted(10, 4, 0)[0], None, similarity)


def test_bad_labels_and_vectors() -> None:
    x, _ = planted(10, 4, 0)
    with pytest.raises(InvalidEmbeddingError):
        find_duplicate_groups(x, np.zeros(9), 0.9)
    with pytest.raises(InvalidEmbeddingError):
        find_duplicate_groups(x, np.array([None, "a"] * 5, dtype=object), 0.9)
    with pytest.raises(InvalidEmbeddingError):
        find_duplicate_groups(x * 3, None, 0.9)


def test_merge_groups_conserves_alpha_and_means() -> None:
    g = np.random.default_rng(6)
    x, truth = planted(2000, 16, 3000, seed=6, noise=0.2)
    alpha = g.lognormal(0.0, 2.0, len(x)).astype(np.float32)
    kappa = g.uniform(10, 100, len(x)).astype(np.float32)
    group = find_duplicate_groups(x, None, 0.95)
    out = merge_groups(group, x, alpha, kappa)
    total_in = alpha.astype(np.float64).sum()
    total_out = out["alpha"].astype(np.float64).sum()
    assert abs(total_out - total_in) <= np.abs(out["alpha"]).sum() * 2.0**-24 + 1e-9 * total_in
    np.testing.assert_allclose(out["alpha64"].sum(), total_in, rtol=1e-12)
    size, rep, rg = out["size"], out["representative"], out["row_group"]
    assert size.sum() == len(x) and (np.diff(rep) > 0).all() and rep[0] == 0
    np.testing.assert_array_equal(canonical(rg), canonical(group))
    np.testing.assert_array_equal(rg[rep], np.arange(len(rep)))
    single = size == 1
    np.testing.assert_array_equal(out["mu"][single], x[rep[single]])  # bit for bit
    assert np.isnan(out["kappa"][~single]).all()
    np.testing.assert_array_equal(out["kappa"][single], kappa[rep[single]])
    # merged directions: normalised alpha-weighted mean of the members
    for gid in np.nonzero(~single)[0][:50]:
        rows = out["members"][out["member_offsets"][gid]:out["member_offsets"][gid + 1]]
        assert (rg[rows] == gid).all() and (np.diff(rows) > 0).all()
        v = (alpha[rows, None].astype(np.float64) * x[rows]).sum(axis=0)
        np.testing.assert_allclose(out["mu"][gid], v / np.linalg.norm(v), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["mu"], axis=1), 1.0, atol=1e-6)


def test_merge_groups_renumbers_arbitrary_ids_by_first_row() -> None:
    x, _ = planted(6, 4, 0)
    out = merge_groups(np.array([7, 3, 7, 9, 3, 9]), x, np.ones(6))
    np.testing.assert_array_equal(out["row_group"], [0, 1, 0, 2, 1, 2])
    np.testing.assert_array_equal(out["representative"], [0, 1, 3])
    np.testing.assert_array_equal(out["alpha"], [2, 2, 2])
    with pytest.raises(InvalidEmbeddingError):
        merge_groups(np.zeros(6, np.int64), x, -np.ones(6))


def test_consolidate_report() -> None:
    x, _ = planted(1000, 16, 500, seed=7, noise=0.05)
    alpha = np.full(len(x), 0.5, np.float32)
    merged, report = consolidate_arrays(x, alpha, similarity=0.95)
    assert isinstance(report, ConsolidationReport)
    assert report.rows_before == 1500 and report.rows_after == len(merged["mu"]) < 1500
    assert report.groups_merged == int((merged["size"] > 1).sum()) > 0
    assert report.alpha_before == pytest.approx(750.0) and report.alpha_after == pytest.approx(750.0)
    assert report.seconds >= 0
