"""The seed API end to end, and the lake-level geometry, search, SOC and export wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import M2MConfig, create_m2m, open_lake
from tests.conftest import clustered


def test_seed_snippet_works_as_written():
    m2m = create_m2m(M2MConfig(device="cpu", latent_dim=64))
    m2m.add_splats(torch.randn(3000, 64))
    dataloader = m2m.export_to_dataloader(batch_size=256, generate_samples=True, importance_sampling=True)
    model = torch.nn.Linear(64, 10)
    source = torch.from_numpy(m2m.splats()["mu"])
    seen = 0
    for batch in dataloader:
        assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32 and batch.shape[1] == 64
        out = model(batch)
        assert out.shape == (batch.shape[0], 10)
        torch.testing.assert_close(batch.norm(dim=1), torch.ones(len(batch)), atol=1e-4, rtol=0)
        # augmented: no row is exactly a stored splat
        assert (batch @ source.T).max(dim=1).values.max() < 1 - 1e-6
        seen += len(batch)
    assert seen == 3000
    m2m.close()


def test_kappa_orders_clusters_of_known_concentration():
    tight, _ = clustered(600, 32, clusters=3, spread=0.05, seed=1)
    loose, _ = clustered(600, 32, clusters=3, spread=0.4, seed=2)
    with create_m2m(M2MConfig(latent_dim=32, knn_k=8)) as lake:
        lake.add_splats(np.concatenate([tight, loose]))
        kappa = lake.estimate_kappa()
        assert kappa.shape == (1200,) and np.isfinite(kappa).all()
        assert np.median(kappa[:600]) > 5 * np.median(kappa[600:])
        info = lake.info()
        assert info["kappa"]["estimated"] == 1200 and info["geometry"]["k"] == 8
        nb = np.concatenate([lake.snapshot.column(s, "neighbors") for s in range(len(lake.manifest.shards))])
        assert nb.shape == (1200, 8) and (nb >= 0).all() and (nb != np.arange(1200)[:, None]).all()


def test_user_kappa_is_kept_and_estimate_fills_the_rest(rng):
    x = rng.standard_normal((300, 16))
    with create_m2m(M2MConfig(latent_dim=16, knn_k=4)) as lake:
        lake.add_splats(x[:100], kappa=np.full(100, 7.0))
        lake.add_splats(x[100:])
        k = lake.estimate_kappa()
        assert (k[:100] == 7.0).all() and not np.isnan(k[100:]).any()
        k2 = lake.estimate_kappa()  # re-estimation does not mistake its own estimate for user input
        np.testing.assert_array_equal(k, k2)


def test_export_computes_kappa_for_appended_rows_in_memory(lake_path, rng):
    with create_m2m(M2MConfig(path=lake_path, latent_dim=16, knn_k=4)) as lake:
        lake.add_splats(rng.standard_normal((200, 16)))
        lake.estimate_kappa()
        lake.add_splats(rng.standard_normal((50, 16)))
        version = lake.version
        dl = lake.export_to_dataloader(batch_size=64, generate_samples="langevin", columns=("embedding", "kappa"))
        kappas = torch.cat([b["kappa"] for b in dl])  # computed in memory for the loader
        assert len(kappas) == 250 and torch.isfinite(kappas).all()
        assert lake.version == version  # a stream never writes (issue 10)
    with open_lake(lake_path) as lake:
        assert lake.info()["kappa"]["estimated"] == 200


def test_search_recall_against_brute_force():
    x, _ = clustered(3000, 32, clusters=20, spread=0.5)
    with create_m2m(M2MConfig(latent_dim=32)) as lake:
        ids = lake.add_splats(x)
        q = x[:50] + 0.01
        scores, found = lake.search(q, k=10)
        assert scores.shape == (50, 10) and found.dtype == np.int64
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        exact = ids[np.argsort(-(qn @ x.T), axis=1)[:, :10]]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
        assert recall >= 0.95
        np.testing.assert_allclose(scores[:, 0], np.max(qn @ x.T, axis=1), atol=1e-5)


def test_consolidate_merges_planted_duplicates_conserving_alpha(rng):
    base, labels = clustered(400, 32, clusters=10, spread=1.0, seed=3)
    dup = base[:100] + 1e-3 * rng.standard_normal((100, 32)).astype(np.float32)
    x = np.concatenate([base, dup])
    lab = np.concatenate([labels, labels[:100]])
    lab[400:420] = (lab[400:420] + 1) % 10  # near-duplicates with another label must not merge
    alpha = rng.uniform(0.5, 2.0, 500)
    with create_m2m(M2MConfig(latent_dim=32, knn_k=4)) as lake:
        ids = lake.add_splats(x, labels=lab, alpha=alpha, metadata={"src": np.arange(500)})
        before = lake.criticality(similarity=0.99)
        report = lake.consolidate(similarity=0.99)
        assert report.rows_before == 500 and report.rows_after == 420 and report.groups_merged == 80
        s = lake.splats()
        assert len(s["id"]) == 420 and lake.version == 2
        np.testing.assert_allclose(s["alpha"].sum(dtype=np.float64), alpha.sum(), rtol=1e-6)
        assert set(s["id"]) <= set(ids) and np.all(np.diff(s["id"]) > 0)
        assert np.isfinite(s["kappa"]).all()
        merged = s["alpha"] > 2.0 + 1e-6
        assert set(s["id"][s["alpha"] > 0]) >= set(ids[120:400])  # untouched rows keep their ids
        assert before["redundancy"] == pytest.approx(80 / 500, abs=1e-9) and before["method"] == "exact"
        sampled = lake.checkout(1)
        assert sampled.num_rows == 500
        after = lake.criticality(similarity=0.99)
        assert lake.criticality(similarity=0.99, exact_max_rows=10, sample=420)["method"].startswith("sampled")
        assert after["redundancy"] < 0.02 and after["state"] == "subcritical"
        assert merged.sum() <= 80


@pytest.mark.parametrize("kwargs,match", [
    (dict(generate_samples="noise"), "generate_samples"),
    (dict(importance_sampling="nope"), "importance_sampling"),
    (dict(columns=("embedding", "bogus")), "bogus"),
    (dict(batch_size=0), "batch_size"),
])
def test_export_rejects_bad_arguments(kwargs, match, rng):
    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        lake.add_splats(rng.standard_normal((10, 8)))
        with pytest.raises(ValueError, match=match):
            lake.export_to_dataloader(**kwargs)


def test_importance_weights_are_delivered(rng):
    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        lake.add_splats(rng.standard_normal((500, 8)), alpha=rng.uniform(1, 5, 500))
        dl = lake.export_to_dataloader(batch_size=100, importance_sampling="alpha", columns=("id", "weight"))
        w = torch.cat([b["weight"] for b in dl])
        assert len(w) == 500 and (w > 0).all()
        dl = lake.export_to_dataloader(batch_size=100, columns=("weight",))
        assert torch.cat([b["weight"] for b in dl]).eq(1.0).all()


def test_auto_consolidate_after_a_supercritical_append(rng):
    base = rng.standard_normal((200, 16)).astype(np.float32)
    cfg = M2MConfig(latent_dim=16, knn_k=4, auto_consolidate=True, soc_threshold=0.2, consolidate_similarity=0.99)
    with create_m2m(cfg) as lake:
        lake.add_splats(base)  # no duplicates: subcritical, nothing merged
        assert len(lake) == 200 and lake.version == 1
        lake.add_splats(base[:150] + 1e-4)  # 150 of 350 rows are near-duplicates: 0.43 > 0.2
        assert len(lake) == 200 and lake.manifest.operation["type"] == "consolidate"
        assert lake.splats()["alpha"].sum() == pytest.approx(350.0)
        assert lake.criticality()["state"] == "subcritical"


def test_estimate_kappa_on_an_empty_lake_is_a_no_op():
    with create_m2m(M2MConfig(latent_dim=4)) as lake:
        assert lake.estimate_kappa().shape == (0,) and lake.version == 0
