"""Importance sampling through the real stream: unbiased weights, loss feedback, resume, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import M2MConfig, create_m2m


@pytest.fixture
def lake(rng):
    lk = create_m2m(M2MConfig(latent_dim=16, knn_k=4))
    x = rng.standard_normal((2000, 16))
    lk.add_splats(x, alpha=rng.uniform(0.2, 5.0, 2000), metadata={"f": rng.standard_normal(2000) + 3,
                                                                   "score": rng.uniform(0.01, 1.0, 2000)})
    yield lk
    lk.close()


@pytest.mark.parametrize("mode", ["kappa", "alpha", "score"])
def test_weighted_epoch_mean_is_unbiased_for_the_alpha_weighted_mean(lake, mode):
    s = lake.splats()
    truth = np.sum(s["alpha"] * s["f"]) / np.sum(s["alpha"])
    estimates = []
    for epoch in range(30):
        dl = lake.export_to_dataloader(batch_size=500, importance_sampling=mode, columns=("f", "weight"),
                                       epoch=epoch, seed=7)
        batches = list(dl)  # one pass (the loader moves to the next epoch after a full pass)
        f = torch.cat([b["f"] for b in batches]).double()
        w = torch.cat([b["weight"] for b in batches]).double()
        estimates.append(float((w * f).sum() / w.sum()))
    est = np.asarray(estimates)
    sem = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - truth) < 4 * sem + 1e-3
    uniform = np.mean(s["f"])  # the unweighted mean differs: weights matter
    assert abs(truth - uniform) > 0.005


def test_loss_feedback_shifts_draws_toward_high_loss_rows(lake):
    dl = lake.export_to_dataloader(batch_size=200, importance_sampling="loss", columns=("id", "weight"))
    fractions = []
    for _ in range(4):
        drawn = []
        for batch in dl:  # ids 0..99 always report a 100x higher loss
            ids = batch["id"]
            dl.update_priorities(ids, torch.where(ids < 100, torch.tensor(10.0), torch.tensor(0.1)))
            drawn.append(ids)
        fractions.append(float((torch.cat(drawn) < 100).double().mean()))
    assert fractions[0] == pytest.approx(100 / 2000, abs=0.02)  # epoch 0: uniform priorities
    assert fractions[1] > 1.5 * fractions[0] and fractions[3] > fractions[2] > fractions[1]
    assert fractions[3] > 0.15


def test_update_priorities_needs_the_loss_mode(lake):
    dl = lake.export_to_dataloader(batch_size=200, importance_sampling="alpha", columns=("id",))
    with pytest.raises(ValueError, match="loss"):
        dl.update_priorities(torch.arange(3), torch.ones(3))


def test_loss_sampler_resume_is_exact(lake):
    def run(stop_at: int | None):
        dl = lake.export_to_dataloader(batch_size=128, importance_sampling="loss", columns=("id",), seed=3)
        out, state = [], None
        for epoch in range(2):
            for j, b in enumerate(dl):
                dl.update_priorities(b["id"], (b["id"] % 7).float())
                out.append(b["id"].clone())
                if stop_at is not None and epoch == 1 and j == stop_at:
                    return out, dl.state_dict()
        return out, state

    full, _ = run(None)
    head, state = run(5)
    dl = lake.export_to_dataloader(batch_size=128, importance_sampling="loss", columns=("id",), seed=3)
    dl.load_state_dict(state)
    tail = [b["id"].clone() for b in dl]
    resumed = head + tail
    assert len(resumed) == len(full)
    for a, b in zip(resumed, full):
        torch.testing.assert_close(a, b)


def test_importance_sampling_with_workers_covers_the_plan(lake):
    dl0 = lake.export_to_dataloader(batch_size=250, importance_sampling="kappa", columns=("id", "weight"))
    dl2 = lake.export_to_dataloader(batch_size=250, importance_sampling="kappa", columns=("id", "weight"),
                                    num_workers=2)
    a = torch.sort(torch.cat([b["id"] for b in dl0])).values
    b = torch.sort(torch.cat([b["id"] for b in dl2])).values
    torch.testing.assert_close(a, b)


def test_kappa_importance_survives_zero_kappa():
    from m2m import M2MConfig, create_m2m

    x = np.array([[1.0, 0.0], [-0.5, np.sqrt(3) / 2], [-0.5, -np.sqrt(3) / 2]])  # 120 degrees apart: kappa 0
    with create_m2m(M2MConfig(latent_dim=2, knn_k=2)) as lk:
        lk.add_splats(x)
        dl = lk.export_to_dataloader(batch_size=3, importance_sampling="kappa", columns=("weight",), prefetch=0)
        w = torch.cat([b["weight"] for b in dl])
        assert len(w) == 3 and torch.isfinite(w).all() and (w > 0).all()


def test_loss_feedback_reaches_dataloader_workers(lake):
    def second_epoch(num_workers: int) -> torch.Tensor:
        dl = lake.export_to_dataloader(batch_size=250, importance_sampling="loss", columns=("id",),
                                       num_workers=num_workers, seed=5)
        for b in dl:  # epoch 0: rows with id < 100 report a high loss
            dl.update_priorities(b["id"], torch.where(b["id"] < 100, 50.0, 0.01))
        return torch.cat([b["id"] for b in dl])  # epoch 1, drawn from the updated priorities

    ids0, ids2 = second_epoch(0), second_epoch(2)
    torch.testing.assert_close(torch.sort(ids0).values, torch.sort(ids2).values)
    assert float((ids2 < 100).double().mean()) > 3 * 100 / 2000


@pytest.mark.parametrize("consolidated", [False, True])
def test_loss_feedback_maps_ids_without_an_id_column(rng, tmp_path, consolidated):
    """The loss sampler maps ids by the snapshot (`IdPositions`): no id column is read on a lake of
    appended shards, and on a consolidated lake (ids with gaps) each id lands on its own row."""
    from m2m.errors import InvalidEmbeddingError
    from m2m.sampling.priorities import IdPositions

    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=8, knn_k=4)) as lk:
        x = rng.standard_normal((900, 8))
        for part in range(3):
            lk.add_splats(x[part * 300:(part + 1) * 300])
        if consolidated:
            lk.add_splats(x[:100] + 1e-5)                 # near-duplicates merged away: gaps in the ids
            assert lk.consolidate(0.9999).rows_after < 1000
        dl = lk.export_to_dataloader(batch_size=64, importance_sampling="loss", columns=("id",), seed=1)
        pri = dl.dataset.sampler.priorities
        assert isinstance(pri._locate, IdPositions) and pri._sorted_ids is None
        snap = lk.snapshot
        ids = snap.ids() if consolidated else None
        snap._ids = None                                    # nothing read so far on the appended lake
        first = next(iter(dl))["id"]
        dl.update_priorities(first, torch.full((len(first),), 7.0))
        values = pri.tensor.numpy()
        assert snap._ids is None or consolidated
        all_ids = lk.snapshot.ids() if ids is None else ids
        np.testing.assert_array_equal(np.flatnonzero(values == 7.0), np.sort(np.searchsorted(all_ids, first.numpy())))
        with pytest.raises(InvalidEmbeddingError, match="id 123456789 is not"):
            dl.update_priorities(torch.tensor([123456789]), torch.ones(1))
