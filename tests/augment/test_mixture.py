"""The neighbourhood-mixture augmenter (``generate_samples="mixture"``) against closed-form laws.

Fixed seeds; tolerances are 4 standard errors of the estimates (estimated from the samples).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m2m import vmf
from m2m.augment.augmenter import MixtureAugmenter
from m2m.augment.energy import component_log_weights
from m2m.errors import ConfigError, InvalidEmbeddingError

F64 = torch.float64
KAPPA = np.array([1800.0, 2500.0, 1200.0])
ALPHA = np.array([1.0, 2.0, 0.5])


def _means(d: int, cos01: float, cos02: float, seed: int = 0) -> torch.Tensor:
    """Three unit vectors with mu0.mu1 = cos01, mu0.mu2 = cos02 (mu1, mu2 otherwise independent)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=F64))
    e0, e1, e2 = q.T
    mu1 = cos01 * e0 + math.sqrt(1 - cos01 ** 2) * e1
    mu2 = cos02 * e0 + math.sqrt(1 - cos02 ** 2) * e2
    return torch.stack([e0, mu1, mu2]).float()


def _gather(table: torch.Tensor):
    reads: list[int] = []

    def gather(pos: torch.Tensor) -> torch.Tensor:
        reads.append(int(pos.numel()))
        return table.index_select(0, pos.cpu())
    gather.reads = reads  # type: ignore[attr-defined]
    return gather


def _draw(d: int, b: int, seed: int, temperature: float = 1.0):
    mu = _means(d, 0.97, 0.95)
    aug = MixtureAugmenter(np.array([[1, 2], [0, 2], [0, 1]]), KAPPA, ALPHA, temperature=temperature)
    rows = torch.zeros(b, dtype=torch.int64)                 # b copies of row 0 in one batch
    out = aug(mu[rows], rows, _gather(mu), torch.Generator().manual_seed(seed))
    return mu, aug, out


@pytest.mark.parametrize("d", [16, 384])
def test_mean_responsibilities_are_the_masses(d):
    # the example: kappa (1800, 2500, 1200), alpha (1, 2, 0.5), cos(mu0, mu1) = 0.97.
    # The posterior responsibility of component j at x is r_j(x) = softmax_j(log alpha_j + log C_d(kappa_j)
    # + kappa_j mu_j.x); under the exact mixture E[r_j] = alpha_j / sum alpha (0.286, 0.571, 0.143).
    b = 20000
    mu, _, out = _draw(d, b, seed=1)
    x = out.double()
    logits = component_log_weights(torch.from_numpy(KAPPA), torch.from_numpy(ALPHA), d) + torch.from_numpy(KAPPA) * (
        x @ mu.double().T)
    r = torch.softmax(logits, 1)
    want = ALPHA / ALPHA.sum()
    se = r.std(0) / math.sqrt(b)
    assert torch.all((r.mean(0) - torch.from_numpy(want)).abs() < 4 * se + 1e-4), (r.mean(0), want, se)
    assert torch.allclose(out.norm(dim=1), torch.ones(b), atol=1e-5)


@pytest.mark.parametrize("d", [16, 384])
def test_cosine_law_to_each_component_and_to_the_source(d):
    b = 20000
    mu, aug, out = _draw(d, b, seed=2)
    x = out.double()
    m = mu.double()
    # the component each row came from: nearest in the kappa-weighted sense is not needed; the
    # augmenter's own pick is checked against the masses, and the cosine law given the pick against Wood
    prepared = aug.prepare(torch.zeros(b, dtype=torch.int64), d, torch.Generator().manual_seed(2))
    picked = prepared.source
    share = torch.bincount(picked, minlength=3).double() / b
    want = torch.from_numpy(ALPHA / ALPHA.sum())
    assert torch.all((share - want).abs() < 4 * torch.sqrt(want * (1 - want) / b))
    for j in range(3):
        c = (x[picked == j] * m[j]).sum(1)
        a = vmf.mean_resultant_length(float(KAPPA[j]), d).item()
        var = 1.0 - a * a - (d - 1) * a / KAPPA[j]
        assert abs(c.mean().item() - a) < 4 * math.sqrt(var / c.numel())
        assert c.var().item() == pytest.approx(var, rel=0.1)
    # mean cosine to the source mu_0: sum_j w_j A_d(kappa_j) mu_0.mu_j (E[x | j] = A_d(kappa_j) mu_j)
    a = torch.tensor([vmf.mean_resultant_length(float(k), d).item() for k in KAPPA], dtype=F64)
    expect = float((want * a * (m @ m[0])).sum())
    c0 = x @ m[0]
    assert abs(c0.mean().item() - expect) < 4 * c0.std().item() / math.sqrt(b)


def test_prepared_draws_and_determinism():
    d, b = 64, 300
    mu = torch.nn.functional.normalize(torch.randn(50, d, generator=torch.Generator().manual_seed(3)), dim=1)
    nb = np.random.default_rng(0).integers(-1, 50, (50, 6))
    aug = MixtureAugmenter(nb, np.full(50, 400.0), np.random.default_rng(1).uniform(0.5, 2, 50))
    rows = torch.from_numpy(np.random.default_rng(2).integers(0, 50, b))
    g = _gather(mu)
    inline = aug(mu[rows], rows, g, torch.Generator().manual_seed(9))
    again = aug(mu[rows], rows, g, torch.Generator().manual_seed(9))
    for draw_gaussian in (True, False):
        gen = torch.Generator().manual_seed(9)
        prep = aug.prepare(rows, d, gen, torch.float32, None, draw_gaussian)
        ahead = aug(mu[rows], rows, g, gen, prepared=prep)
        assert torch.equal(inline, ahead)
    assert torch.equal(inline, again)
    other = aug(mu[rows], rows, g, torch.Generator().manual_seed(10))
    assert not torch.equal(inline, other)
    with pytest.raises(InvalidEmbeddingError):
        aug(mu[rows][:, :10], rows, g, torch.Generator(), prepared=prep)


def test_labels_and_lone_rows_and_gathers():
    # a row whose neighbours all carry another label never moves to them and reads nothing
    d, b = 32, 4000
    mu = _means(d, 0.5, 0.3)
    aug = MixtureAugmenter(np.array([[1, 2], [0, 2], [0, 1]]), np.array([300.0, 300.0, 300.0]), np.ones(3),
                           labels=np.array([0, 1, 1]))
    rows = torch.zeros(b, dtype=torch.int64)
    g = _gather(mu)
    out = aug(mu[rows], rows, g, torch.Generator().manual_seed(4))
    assert g.reads == []
    c = (out.double() @ mu[0].double())
    a = vmf.mean_resultant_length(300.0, d).item()
    assert abs(c.mean().item() - a) < 0.01
    assert torch.allclose(aug.responsibilities(torch.tensor([0, 1])),
                          torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64))
    # rows 1 and 2 share a label: a draw for row 1 reads only row 2's mean (about half of the rows)
    rows = torch.ones(b, dtype=torch.int64)
    g = _gather(mu)
    aug(mu[rows], rows, g, torch.Generator().manual_seed(5))
    assert len(g.reads) == 1 and abs(g.reads[0] - b / 2) < 4 * math.sqrt(b / 4)


def test_temperature_flattens_components_and_keeps_masses():
    d, b = 16, 20000
    mu, aug, out = _draw(d, b, seed=6, temperature=2.0)
    prepared = aug.prepare(torch.zeros(b, dtype=torch.int64), d, torch.Generator().manual_seed(6))
    share = torch.bincount(prepared.source, minlength=3).double() / b
    want = torch.from_numpy(ALPHA / ALPHA.sum())
    assert torch.all((share - want).abs() < 4 * torch.sqrt(want * (1 - want) / b))
    c = (out.double()[prepared.source == 1] * mu[1].double()).sum(1)
    a = vmf.mean_resultant_length(KAPPA[1] / 2.0, d).item()
    var = 1.0 - a * a - (d - 1) * a / (KAPPA[1] / 2.0)
    assert abs(c.mean().item() - a) < 4 * math.sqrt(var / c.numel())


def test_validation():
    with pytest.raises(ConfigError):
        MixtureAugmenter(np.zeros((3, 2), dtype=np.int64), np.ones(3), np.zeros(3))
    with pytest.raises(ConfigError):
        MixtureAugmenter(np.full((3, 2), 5), np.ones(3), np.ones(3))
    with pytest.raises(ConfigError):
        MixtureAugmenter(np.zeros((3, 2), dtype=np.int64), np.ones(3), np.ones(3), temperature=0.0)
    with pytest.raises(ConfigError):
        MixtureAugmenter(np.zeros((3, 2), dtype=np.int64), np.ones(3), np.ones(3), labels=np.zeros(2))


def test_mixture_stream_through_a_lake_is_resumable_and_keeps_labels(tmp_path):
    from m2m import M2MConfig, create_m2m

    rng = np.random.default_rng(7)
    centres = rng.standard_normal((8, 32))
    lab = rng.integers(0, 8, 1200)
    x = centres[lab] + 0.3 * rng.standard_normal((1200, 32))
    with create_m2m(M2MConfig(path=str(tmp_path / "lake"), latent_dim=32, knn_k=8)) as lake:
        lake.add_splats(x.astype(np.float32), labels=lab)
        cols = ("embedding", "label", "id")

        def epoch(e: int, prefetch: int) -> list[dict]:
            dl = lake.export_to_dataloader(batch_size=100, generate_samples="mixture", columns=cols, seed=3,
                                           prefetch=prefetch)
            dl.set_epoch(e)
            return list(dl)

        a, b, c = epoch(1, 2), epoch(1, 0), epoch(2, 2)
        for p, q in zip(a, b):
            assert torch.equal(p["embedding"], q["embedding"]) and torch.equal(p["id"], q["id"])
        assert not torch.equal(a[0]["embedding"], c[0]["embedding"])
        emb = torch.cat([p["embedding"] for p in a])
        ids = torch.cat([p["id"] for p in a])
        labels = torch.cat([p["label"] for p in a])
        sp = lake.splats()
        mu, stored_ids = torch.from_numpy(sp["mu"]), torch.from_numpy(sp["id"])
        assert torch.all(stored_ids[1:] > stored_ids[:-1])
        pos = torch.searchsorted(stored_ids, ids)
        assert torch.equal(stored_ids[pos], ids)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-4, rtol=0)
        assert (emb * mu[pos]).sum(1).mean() > 0.5                  # near its own neighbourhood
        assert (emb @ mu.T).max(1).values.max() < 1 - 1e-6          # never a stored splat
        assert torch.equal(labels.long(), torch.from_numpy(lab.astype(np.int64))[pos])
