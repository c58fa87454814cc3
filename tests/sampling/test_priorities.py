"""Loss priorities: vectorised EMA, deterministic duplicates, ids, visible in worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp
from torch.utils.data import DataLoader, Dataset

from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.sampling.importance import importance_plan, score_from
from m2m.sampling.priorities import LossPriorities


def test_ema_update_and_duplicates_are_averaged_deterministically() -> None:
    p = LossPriorities(5, ema=0.5, initial=1.0)
    p.update(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))
    np.testing.assert_allclose(p.scores(), [2.0, 4.0, 1, 1, 1])      # the first loss replaces the initial 1.0
    p.update(torch.tensor([0]), torch.tensor([5.0]))
    # bias-corrected: (0.5 * 0.5 * 2 + 0.5 * 5) / (1 - 0.25) = 4
    np.testing.assert_allclose(p.scores(), [4.0, 4.0, 1, 1, 1])
    assert p.counts.tolist() == [2, 1, 0, 0, 0]
    q = LossPriorities(5, ema=0.5, initial=1.0)
    q.update(np.array([3, 3, 3]), np.array([1.0, 2.0, 6.0]))  # one update with the mean, 3
    r = LossPriorities(5, ema=0.5, initial=1.0)
    r.update([3, 3, 3], [6.0, 1.0, 2.0])
    assert q.scores()[3] == pytest.approx(3.0) and q.scores()[3] == r.scores()[3]
    p.update([], [])
    assert p.tensor.is_shared() and p.counts.is_shared() and len(p) == 5


def test_bias_corrected_ema_is_the_normalised_weighted_mean() -> None:
    ema, losses = 0.9, [3.0, 1.0, 7.0, 2.0]
    p = LossPriorities(1, ema=ema)
    for n, loss in enumerate(losses, 1):
        p.update([0], [loss])
        w = ema ** np.arange(n - 1, -1, -1)
        assert p.scores()[0] == pytest.approx(float(np.dot(w, losses[:n]) / w.sum()), rel=1e-6)


def test_one_epoch_of_feedback_moves_the_draws() -> None:
    # the example: after one epoch in which 10% of the rows report loss 10 and the rest 0.1,
    # those rows get >= 40% of the next epoch's draws at the default floor (the old EMA gave 19%)
    n = 5000
    hard = np.zeros(n, dtype=bool)
    hard[np.random.default_rng(0).choice(n, n // 10, replace=False)] = True
    p = LossPriorities(n)
    p.update(np.arange(n), np.where(hard, 10.0, 0.1))
    rows, _ = importance_plan(p.scores(), np.ones(n), num_draws=n, seed=0, epoch=1)
    share = hard[rows].mean()
    assert share >= 0.4
    assert share == pytest.approx(0.917 / 1.007, abs=0.002)    # q = 10/1.09 vs the floor 0.1: 91%


def test_ids_are_mapped_to_positions() -> None:
    p = LossPriorities(3, ema=0.0, initial=0.0, ids=np.array([10, 5, 7]))
    p.update([7, 10], [3.0, 1.0])
    np.testing.assert_array_equal(p.scores(), [1.0, 0.0, 3.0])
    with pytest.raises(InvalidEmbeddingError):
        p.update([6], [1.0])


@pytest.mark.parametrize(
    "positions, losses",
    [([5], [1.0]), ([-1], [1.0]), ([0], [float("nan")]), ([0], [-1.0]), ([0, 1], [1.0])],
)
def test_invalid_updates(positions, losses) -> None:
    with pytest.raises(InvalidEmbeddingError):
        LossPriorities(3).update(positions, losses)


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 3, "ema": 1.0}, {"n": 3, "initial": -1.0},
                                    {"n": 3, "ids": [1, 1, 2]}, {"n": 3, "ids": [1, 2]}])
def test_invalid_construction(kwargs) -> None:
    with pytest.raises(ConfigError):
        LossPriorities(**kwargs)


def test_high_losses_shift_the_next_plan_towards_their_rows() -> None:
    n = 1000
    p = LossPriorities(n, ema=0.5)
    before, _ = importance_plan(score_from("loss", priorities=p.scores()), np.ones(n), n, seed=0, epoch=0)
    p.update(np.arange(50), np.full(50, 40.0))
    after, w = importance_plan(score_from("loss", priorities=p.scores()), np.ones(n), n, seed=0, epoch=1)
    assert (before < 50).mean() == pytest.approx(0.05, abs=0.01)
    assert (after < 50).mean() > 0.4
    assert w[after < 50].max() < w[after >= 50].min()  # their weights go down accordingly


def _read_after_update(priorities: LossPriorities, ready, done, out) -> None:
    ready.set()
    done.wait(60)
    out.put(priorities.scores()[:3].tolist())


def test_spawned_process_sees_updates_made_after_it_started() -> None:
    ctx = tmp.get_context("spawn")
    p = LossPriorities(10, ema=0.0, initial=1.0)
    ready, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_read_after_update, args=(p, ready, done, out))
    proc.start()
    try:
        assert ready.wait(60)
        p.update([1], [7.0])
        done.set()
        assert out.get(timeout=60) == [1.0, 7.0, 1.0]
    finally:
        proc.join(60)
    assert proc.exitcode == 0


class _PriorityReader(Dataset):
    def __init__(self, priorities: LossPriorities) -> None:
        self.priorities = priorities

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.priorities.tensor[i].clone()


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("persistent", [True, False])
def test_dataloader_workers_see_updates_between_epochs(context: str, persistent: bool) -> None:
    p = LossPriorities(4, ema=0.0, initial=1.0)
    loader = DataLoader(_PriorityReader(p), batch_size=4, num_workers=1, persistent_workers=persistent,
                        multiprocessing_context=context)
    first = next(iter(loader))
    p.update([0, 3], [5.0, 9.0])
    second = next(iter(loader))
    assert first.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert second.tolist() == [5.0, 1.0, 1.0, 9.0]
