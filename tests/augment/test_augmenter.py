"""Stream hooks: the pruned/coupled Langevin augmenter against the exact full chain, tables, gathers,
labels, determinism; the vMF augmenter's moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m2m import langevin, vmf
from m2m.augment.augmenter import LangevinAugmenter, VMFAugmenter
from m2m.errors import ConfigError, InvalidEmbeddingError

D, N, K = 32, 64, 4


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    # cosines on a 2^-20 grid: with MALA ~15% of the rows never move, an atom at cosine 1 that float32
    # rounds to 1 - 6e-8, 1 or 1 + 1e-7 depending on how each side computed its row (the augmenter
    # returns the stored row itself, the reference a renormalised copy); unrounded, the KS statistic
    # compares those roundings, not the laws
    a, b = torch.round(a.double() * 2**20), torch.round(b.double() * 2**20)
    both = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, both, right=True).double() / a.numel()
    fb = torch.searchsorted(b.sort().values, both, right=True).double() / b.numel()
    return (fa - fb).abs().max().item()


def _paired_lake(c: float, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """N unit vectors in pairs at cosine ``c``; neighbour 0 of each row is its partner, the others random."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(N // 2, D, generator=g, dtype=torch.float64), dim=1)
    perp = torch.randn(N // 2, D, generator=g, dtype=torch.float64)
    perp = torch.nn.functional.normalize(perp - (perp * base).sum(1, keepdim=True) * base, dim=1)
    mu = torch.cat([base, c * base + math.sqrt(1 - c * c) * perp]).float()
    nb = np.random.default_rng(seed).integers(0, N, (N, K)).astype(np.int64)
    nb[: N // 2, 0] = np.arange(N // 2) + N // 2
    nb[N // 2:, 0] = np.arange(N // 2)
    return mu, nb


class _Gather:
    """A gather function that records the positions it was asked for."""

    def __init__(self, mu: torch.Tensor) -> None:
        self.mu, self.calls = mu, []

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        self.calls.append(positions.clone())
        return self.mu.index_select(0, positions)


def _reference(mu: torch.Tensor, nb: np.ndarray, kappa: np.ndarray, alpha: np.ndarray, rows: torch.Tensor,
               steps: int, step_size: float, seed: int, metropolis: bool = False) -> torch.Tensor:
    """The exact full chain over each row's own splat and its neighbours (``langevin.sample``)."""
    nbt = torch.from_numpy(nb)[rows]
    valid = (nbt >= 0) & (nbt != rows.unsqueeze(1))
    comp = torch.cat([rows.unsqueeze(1), nbt.clamp(min=0)], 1)
    mask = torch.cat([torch.ones(len(rows), 1, dtype=torch.bool), valid], 1)
    kt, at = torch.from_numpy(kappa).double(), torch.from_numpy(alpha).double()
    return langevin.sample(mu[rows], mu[comp], kt[comp], at[comp], steps, step_size, mask=mask,
                           generator=torch.Generator().manual_seed(seed), metropolis=metropolis,
                           step_kappa=kt[rows])


@pytest.mark.parametrize("c,metropolis", [(0.0, False), (0.65, False), (0.65, True), (0.9, False), (0.99, False),
                                         (0.99, True)])
def test_augmenter_matches_the_exact_chain(c, metropolis):
    # c = 0: neighbours negligible (one-component path); c = 0.65: 30-47% of the rows need the coupled
    # exact rerun after the path check (a rerun with fresh noise fails this test: it biases the law);
    # c = 0.9: nearly all do; c = 0.99: the partner pulls (pruning it would fail this test).
    mu, nb = _paired_lake(c)
    rng = np.random.default_rng(1)
    kappa = rng.uniform(300, 500, N).astype(np.float32)
    alpha = rng.uniform(0.5, 2.0, N).astype(np.float32)
    aug = LangevinAugmenter(nb, kappa, alpha, steps=5, step_size=0.3, metropolis=metropolis)
    rows = torch.arange(N).repeat(150)
    gather = _Gather(mu)
    got = aug(mu[rows], rows, gather, torch.Generator().manual_seed(2))
    want = _reference(mu, nb, kappa, alpha, rows, 5, 0.3, seed=3, metropolis=metropolis).float()
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=1), torch.ones(len(rows)), atol=1e-5)
    partner = torch.from_numpy(nb[:, 0])[rows]
    crit = 1.95 * math.sqrt(2 / len(rows))  # KS at alpha = 1e-3
    assert _ks((got * mu[rows]).sum(1), (want * mu[rows]).sum(1)) < crit
    assert _ks((got * mu[partner]).sum(1), (want * mu[partner]).sum(1)) < crit


def test_negligible_rows_read_nothing_and_others_read_unique_positions():
    mu, nb = _paired_lake(0.9)
    nb[: N // 2, 1:] = -1                       # first half: only the close partner
    nb[N // 2:, :] = -1                         # second half: no neighbour at all
    nb[N // 2:, 0] = np.arange(N // 2) * 0      # ... except row 0, far from most of them
    aug = LangevinAugmenter(nb, np.full(N, 400.0, np.float32), np.ones(N, np.float32), steps=3, step_size=0.2,
                            neighbor_cos=(mu @ mu.T).numpy()[np.arange(N)[:, None], np.maximum(nb, 0)])
    gather = _Gather(mu)
    rows = torch.tensor([0, 0, 1, 40, 41, 42])
    aug(mu[rows], rows, gather, torch.Generator().manual_seed(0))
    assert len(gather.calls) <= 1
    if gather.calls:
        pos = gather.calls[0]
        assert torch.equal(pos, torch.unique(pos))                    # unique positions only
        assert set(pos.tolist()) <= {N // 2, N // 2 + 1}               # partners of the close rows


def test_tables_are_built_once_and_neighbour_cosines_match():
    mu, nb = _paired_lake(0.5)
    kappa, alpha = np.full(N, 300.0, np.float32), np.ones(N, np.float32)
    a = LangevinAugmenter(nb, kappa, alpha)
    gather = _Gather(mu)
    rows = torch.arange(8)
    a(mu[rows], rows, gather, torch.Generator().manual_seed(0))
    n_calls = len(gather.calls)
    a(mu[rows], rows, gather, torch.Generator().manual_seed(0))
    assert len(gather.calls) - n_calls <= 1                            # no second table build
    cos = (mu @ mu.T).numpy()[np.arange(N)[:, None], nb]
    b = LangevinAugmenter(nb, kappa, alpha, neighbor_cos=cos).to("cpu", D)
    ta, tb = a._tables(torch.device("cpu"), D, None), b._tables(torch.device("cpu"), D, None)
    assert torch.allclose(a._cos, b._cos, atol=1e-6)
    assert torch.equal(ta.packed[:, 2], tb.packed[:, 2]) and torch.allclose(ta.packed, tb.packed)
    assert torch.allclose(ta.room, tb.room, atol=1e-3) and torch.allclose(ta.slope, tb.slope, atol=1e-3)


def test_labels_mask_neighbours():
    mu, nb = _paired_lake(0.999)
    kappa, alpha = np.full(N, 2000.0, np.float32), np.ones(N, np.float32)
    labels = np.arange(N) % 2                                          # partners i, i + 32 share a label
    nb[:, 1:] = -1
    same = LangevinAugmenter(nb, kappa, alpha, labels=labels, step_size=0.05).to("cpu", D, _Gather(mu))
    other = LangevinAugmenter(nb, kappa, alpha, labels=np.arange(N), step_size=0.05).to("cpu", D, _Gather(mu))
    assert same.fast_fraction == 0.0                                   # the near-duplicate partner counts
    assert other.fast_fraction == 1.0                                  # every neighbour has another label


@pytest.mark.parametrize("metropolis,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float64)])
def test_draws_made_ahead_give_the_same_rows(metropolis, dtype):
    # the stream's prefetch thread calls prepare(); applying its draws must equal the in-line call,
    # including rows re-run with all components (c = 0.7: about half of them)
    mu, nb = _paired_lake(0.7)
    aug = LangevinAugmenter(nb, np.full(N, 400.0, np.float32), np.ones(N, np.float32), steps=4, step_size=0.3,
                            metropolis=metropolis)
    rows = torch.arange(N).repeat(3)
    x = mu[rows].to(dtype)
    inline = aug(x, rows, _Gather(mu), torch.Generator().manual_seed(9))
    for draw_gaussian in (True, False):   # the direction Gaussians drawn ahead, or left to the call
        gen = torch.Generator().manual_seed(9)
        draws = aug.prepare(rows, D, gen, dtype, _Gather(mu), draw_gaussian=draw_gaussian)
        assert draws.rerun is not None and 0 < draws.fail.numel() < len(rows)
        assert (draws.gaussian is not None) == (dtype == torch.float32 and draw_gaussian)
        ahead = aug(x, rows, _Gather(mu), gen, prepared=draws)
        assert torch.equal(inline, ahead)
    with pytest.raises(InvalidEmbeddingError, match="prepared draws"):
        aug(x[:-1], rows[:-1], _Gather(mu), gen, prepared=draws)


def test_vmf_draws_made_ahead_give_the_same_rows():
    mu, _ = _paired_lake(0.0)
    aug = VMFAugmenter(np.random.default_rng(0).uniform(100, 900, N))
    rows = torch.arange(N)
    inline = aug(mu, rows, _Gather(mu), torch.Generator().manual_seed(4))
    for draw_gaussian in (True, False):
        gen = torch.Generator().manual_seed(4)
        draws = aug.prepare(rows, D, gen, draw_gaussian=draw_gaussian)
        assert (draws.gaussian is not None) == draw_gaussian
        assert torch.equal(inline, aug(mu, rows, _Gather(mu), gen, prepared=draws))


def test_determinism_and_zero_steps():
    mu, nb = _paired_lake(0.7)
    kappa, alpha = np.full(N, 300.0, np.float32), np.ones(N, np.float32)
    aug = LangevinAugmenter(nb, kappa, alpha, steps=4, step_size=0.3)
    rows = torch.arange(N)
    a = aug(mu, rows, _Gather(mu), torch.Generator().manual_seed(5))
    b = aug(mu, rows, _Gather(mu), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    still = LangevinAugmenter(nb, kappa, alpha, steps=0)
    assert torch.equal(still(mu, rows, _Gather(mu), torch.Generator()), mu)


def test_default_strength():
    # realistic concentration (mean cosine 0.9 to the splat's mean at d = 384), default step: ~0.95
    d, n = 384, 2048
    k = vmf.kappa_from_mean_resultant(0.9, d).item()
    mu = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    nb = np.random.default_rng(0).integers(0, n, (n, 16)).astype(np.int64)
    aug = LangevinAugmenter(nb, np.full(n, k, np.float32), np.ones(n, np.float32))
    rows = torch.arange(n)
    y = aug(mu, rows, _Gather(mu), torch.Generator().manual_seed(1))
    assert aug.fast_fraction == 1.0
    assert (y * mu).sum(1).mean().item() == pytest.approx(0.95, abs=0.005)


def test_vmf_augmenter_moments():
    mu, _ = _paired_lake(0.0)
    kappa = np.where(np.arange(N) < N // 2, 50.0, 800.0).astype(np.float32)
    aug = VMFAugmenter(kappa).to("cpu")
    rows = torch.arange(N).repeat(200)
    y = aug(mu[rows], rows, _Gather(mu), torch.Generator().manual_seed(0))
    c = (y * mu[rows]).sum(1)
    lo = rows < N // 2
    assert c[lo].mean().item() == pytest.approx(vmf.mean_resultant_length(50.0, D).item(), abs=0.01)
    assert c[~lo].mean().item() == pytest.approx(vmf.mean_resultant_length(800.0, D).item(), abs=0.002)
    assert torch.allclose(y.norm(dim=1), torch.ones(len(rows)), atol=1e-5)


def test_validation():
    nb = np.zeros((4, 2), np.int64)
    ok = np.ones(4, np.float32)
    with pytest.raises(ConfigError):
        LangevinAugmenter(nb, -ok, ok)
    with pytest.raises(ConfigError):
        LangevinAugmenter(nb, ok, 0 * ok)
    with pytest.raises(ConfigError):
        LangevinAugmenter(nb + 4, ok, ok)
    with pytest.raises(ConfigError):
        LangevinAugmenter(nb, ok, ok, labels=np.zeros(3))
    with pytest.raises(ConfigError):
        LangevinAugmenter(nb.astype(np.float32), ok, ok)
    with pytest.raises(ConfigError):
        LangevinAugmenter(nb, ok, ok, step_size=2.0)
    with pytest.raises(ConfigError):
        VMFAugmenter(np.array([1.0, float("nan")]))


@pytest.mark.parametrize("ratio", [2.0, 5.0, 20.0])
def test_strength_ignores_negligible_neighbours(ratio):
    # a lone row (its neighbour is orthogonal and carries alpha 1e-6: zero weight anywhere near the row)
    # moves exactly as far whatever the neighbour's concentration; the step follows the row's own kappa
    d, n = 384, 192
    k = vmf.kappa_from_mean_resultant(0.9, d).item()
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, 2 * n, generator=g, dtype=torch.float64))
    mu = q.T.float().contiguous()                                     # rows mutually orthogonal
    nb = np.concatenate([np.arange(n, 2 * n), np.arange(n)])[:, None].astype(np.int64)
    alpha = np.concatenate([np.ones(n), np.full(n, 1e-6)]).astype(np.float32)
    rows = torch.arange(n).repeat(10)
    out = {}
    for r in (1.0, ratio):
        kappa = np.concatenate([np.full(n, k), np.full(n, r * k)]).astype(np.float32)
        aug = LangevinAugmenter(nb, kappa, alpha)
        out[r] = aug(mu[rows], rows, _Gather(mu), torch.Generator().manual_seed(1))
        assert aug.fast_fraction is not None
    assert torch.equal(out[1.0], out[ratio])
    # and that move is the documented default: mean cosine 1 - 0.48 (1 - 0.9) ~ 0.952
    assert (out[1.0] * mu[rows]).sum(1).mean().item() == pytest.approx(0.952, abs=0.006)


def test_kept_span_factors_give_the_rerun_of_fresh_ones(monkeypatch):
    # the per-splat span factors filled by one batch serve a later batch (rows repeated, reordered):
    # its rows equal those of an augmenter that forms every Gram matrix again (table over budget)
    import m2m.augment.augmenter as augmenter_mod

    mu, nb = _paired_lake(0.9)
    kappa, alpha = np.full(N, 400.0, np.float32), np.ones(N, np.float32)
    kept = LangevinAugmenter(nb, kappa, alpha, steps=5, step_size=0.3)
    first = torch.arange(0, N, 2)
    kept(mu[first], first, _Gather(mu), torch.Generator().manual_seed(0))
    frames = kept._frames[(torch.device("cpu"), D, torch.float32)]
    assert frames is not None and 0 < int(frames.have.sum()) <= len(first)
    rows = torch.cat([torch.arange(N).flip(0), first])
    got = kept(mu[rows], rows, _Gather(mu), torch.Generator().manual_seed(1))
    assert bool(frames.have.any())
    monkeypatch.setattr(augmenter_mod, "_FRAME_CACHE_BYTES", 0)
    fresh = LangevinAugmenter(nb, kappa, alpha, steps=5, step_size=0.3)
    want = fresh(mu[rows], rows, _Gather(mu), torch.Generator().manual_seed(1))
    assert fresh._frames[(torch.device("cpu"), D, torch.float32)] is None
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.equal(got, mu[rows])                              # the rows did move


@pytest.mark.parametrize("metropolis", [False, True])
def test_reruns_of_several_batches_in_one_chain_equal_each_batch_alone(metropolis):
    # rerun_ahead runs the exact reruns of several prepared batches in one span chain, each batch
    # drawing from its own generator: every batch's output equals, bit for bit, its in-line call
    mu, nb = _paired_lake(0.9)
    rng = np.random.default_rng(3)
    kappa, alpha = rng.uniform(300, 500, N).astype(np.float32), rng.uniform(0.5, 2.0, N).astype(np.float32)
    aug = LangevinAugmenter(nb, kappa, alpha, steps=5, step_size=0.3, metropolis=metropolis)
    gather = _Gather(mu)
    batches = [torch.randperm(N, generator=torch.Generator().manual_seed(s))[: 20 + 7 * s] for s in range(4)]
    inline = [aug(mu[r], r, gather, torch.Generator().manual_seed(10 + i)) for i, r in enumerate(batches)]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(batches))]
    prepared = [aug.prepare(r, D, g, torch.float32, gather) for r, g in zip(batches, gens)]
    assert all(p.rerun is not None for p in prepared)                 # every batch has rows to rerun
    aug.rerun_ahead([(p, mu[r], r, g) for p, r, g in zip(prepared, batches, gens)], gather)
    assert all(p.exact is not None for p in prepared)
    for p, r, g, want in zip(prepared, batches, gens, inline):
        assert torch.equal(aug(mu[r], r, gather, g, prepared=p), want)


def test_langevin_with_no_steps_returns_unit_rows_of_a_float16_lake():
    # steps = 0: the chain stays at the row's mean; a float16 lake's means are unit only to float16
    # rounding and are normalised as every other setting's draws are (a probing user, 2026-12-07)
    mu, nb = _paired_lake(0.9)
    x = mu.half().float()
    aug = LangevinAugmenter(nb, np.full(N, 400.0, np.float32), np.ones(N, np.float32), steps=0)
    aug.unit_means = False
    y = aug(x, torch.arange(N), _Gather(x), torch.Generator().manual_seed(0))
    assert (y.double().norm(dim=1) - 1).abs().max().item() < 1e-6
    aug.unit_means = True
    assert torch.equal(aug(x, torch.arange(N), _Gather(x), torch.Generator().manual_seed(0)), x)


def test_langevin_without_neighbours_draws_each_rows_own_chain():
    # a [N, 0] neighbour table (accepted by the constructor) made the neighbour cosines fail in a reshape
    mu, _ = _paired_lake(0.9)
    aug = LangevinAugmenter(np.zeros((N, 0), np.int64), np.full(N, 400.0, np.float32), np.ones(N, np.float32))
    y = aug(mu, torch.arange(N), _Gather(mu), torch.Generator().manual_seed(0))
    assert y.shape == mu.shape and torch.isfinite(y).all() and not torch.equal(y, mu)
