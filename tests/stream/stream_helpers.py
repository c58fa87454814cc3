"""Shared helpers of the stream tests: small sources and the one save/load (resume) harness."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from m2m.stream.source import ArraySource
from m2m.stream.stages.base import Stage, Work


def make_source(n: int = 1000, d: int = 8, dtype: Any = np.float32, shard_rows: int | None = None,
                seed: int = 0, extra: bool = True) -> ArraySource:
    """Unit vectors plus id/label/kappa/alpha (and a 2-D neighbours column) as an ArraySource."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n, d))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    columns: dict[str, np.ndarray] = {"mu": mu.astype(dtype)}
    if extra:
        columns.update({
            "id": np.arange(n, dtype=np.int64) + 10_000,
            "label": rng.integers(0, 7, n).astype(np.int64),
            "kappa": rng.uniform(10, 100, n).astype(np.float32),
            "alpha": np.ones(n, dtype=np.float32),
            "neighbors": rng.integers(0, max(n, 1), (n, 3)).astype(np.int64),
        })
    return ArraySource(columns, shard_rows=shard_rows)


def clustered_lake(path: str, rows: int, clusters: int, spread: float, seed: int, dim: int = 64) -> str:
    """A lake at ``path`` of unit rows around ``clusters`` random centres (noise ``spread``), labels in
    {0, 1, 2}, kappa estimated: close neighbours, so the Langevin reruns run (the span chain when
    dim > K + S + 1)."""
    from m2m import M2MConfig, create_m2m

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, rows)] + spread * rng.standard_normal((rows, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    with create_m2m(M2MConfig(path=path, latent_dim=dim)) as lake:
        lake.add_splats(torch.from_numpy(x), labels=rng.integers(0, 3, rows))
        lake.estimate_kappa()
    return path


def item_key(work: Work) -> tuple[Any, ...]:
    return (work.epoch, work.first, work.end, work.rows.tobytes())


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality of batches / items (tensors compared exactly)."""
    if isinstance(a, Work):
        assert item_key(a) == item_key(b), where
        assert_same(a.tensors, b.tensors, where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def midpoints(n: int) -> list[int]:
    return sorted({0, 1, n // 3, n // 2, max(n - 1, 0), n})


def run_stage(stage: Stage) -> list[Any]:
    """Every item of a stage chain (a Prefetcher is started first), then shut it down."""
    if hasattr(stage, "start") and callable(stage.start):
        stage.start()
    out = list(stage)
    stage.shutdown()
    return out


def check_stage_start(make: Callable[[int], Stage]) -> int:
    """A chain built to start at the first batch of item m yields exactly the items from m of one whole run."""
    full = run_stage(make(0))
    for m in midpoints(len(full)):
        start = full[m].first if m < len(full) else (full[-1].end if full else 0)
        tail = run_stage(make(start))
        assert len(tail) == len(full) - m, f"midpoint {m}: {len(tail)} items, expected {len(full) - m}"
        for i, (x, y) in enumerate(zip(tail, full[m:])):
            assert_same(x, y, f"midpoint {m}, item {i}")
    return len(full)


def take(loader: Iterable[Any], k: int) -> list[Any]:
    """The first ``k`` batches of one iteration, leaving the iteration unfinished."""
    out = []
    it = iter(loader)
    for _ in range(k):
        out.append(next(it))
    del it
    return out


def check_loader_resume(make: Callable[[], Any], epochs: int = 2, points: Sequence[int] | None = None) -> None:
    """The loader harness: save mid-epoch, at epoch end, and in the next epoch; restore; compare.

    The uninterrupted run iterates ``epochs`` times (the loader advances the epoch itself). An
    interrupted run stops after ``k`` batches without finishing the iteration, saves, and a fresh
    loader restored from that state must yield exactly the remaining batches, iteration by iteration.
    """
    ref = make()
    per_epoch = [list(ref) for _ in range(epochs)]
    nb = len(per_epoch[0])
    flat = [b for ep in per_epoch for b in ep]
    if points is None:
        points = sorted({0, 1, nb // 2, max(nb - 1, 0), nb, nb + 1, nb + nb // 2, len(flat)} - {len(flat) + 1})
    for k in points:
        k = min(k, len(flat))
        dl = make()
        head: list[Any] = []
        epoch = 0
        while len(head) + nb <= k and epoch < epochs and nb:
            head.extend(list(dl))  # whole iterations, finished
            epoch += 1
        if len(head) < k:
            head.extend(take(dl, k - len(head)))
        state = dl.state_dict()
        dl2 = make()
        dl2.load_state_dict(state)
        tail: list[Any] = []
        for _ in range(epochs + 1):  # the first pass may be an empty remainder (saved at an epoch's end)
            if len(head) + len(tail) >= len(flat):
                break
            tail.extend(list(dl2))
        assert len(head) + len(tail) == len(flat), f"save after {k}: {len(head)} + {len(tail)} != {len(flat)}"
        for i, (x, y) in enumerate(zip(head + tail, flat)):
            assert_same(x, y, f"save after {k}, batch {i}")
