"""Per-row training-loss priorities in shared memory, read by importance sampling ("loss" mode)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from m2m._validate import as_numpy, beyond_int64, check_int, integer_problem
from m2m.errors import ConfigError, InvalidEmbeddingError

__all__ = ["IdPositions", "LossPriorities"]


class LossPriorities:
    """A bias-corrected exponential moving average of each row's training loss, shared across processes.

    After a row's n-th update its priority is ``m_n / (1 - ema^n)`` with ``m_n = ema m_{n-1} + (1 - ema)
    loss_n``, ``m_0 = 0`` (Adam's correction): the first reported loss replaces ``initial``, later ones
    are averaged with weights ema^(n-k) (normalised). A row never updated keeps ``initial``. So one
    epoch of feedback is enough for the sampler to react: an uncorrected EMA started at ``initial``
    would keep most of the prior after one epoch (the worked example: docs/tuning.md).

    The values live in one float32 torch tensor in shared memory (``share_memory_()``):
    DataLoader worker processes -- forked or spawned, persistent or not -- that received this
    object see every later ``update`` made in the main process, since pickling through
    ``torch.multiprocessing`` passes the shared storage, not a copy. Updates are meant to come
    from one process (the training loop); readers may run anywhere.

    Args:
        n: number of rows.
        ema: weight of the old value in each update (0 keeps only the latest loss).
        initial: starting priority of every row (>= 0; a row never seen keeps it).
        ids: optional ``int64 [n]`` row ids (any order, unique), or a callable mapping an ``int64``
            array of ids to their positions (-1 for an id that is not a row; e.g. `IdPositions` over
            a lake snapshot, which needs no id column in memory); ``update`` then takes ids,
            otherwise positions ``0..n-1``.
    """

    def __init__(self, n: int, ema: float = 0.9, initial: float = 1.0, ids: Any = None) -> None:
        # updates per row (int32, shared): the bias correction needs how many losses a row has seen
        check_int(n, "n", 0)
        if not isinstance(ema, (int, float)) or isinstance(ema, bool) or not 0.0 <= ema < 1.0:
            raise ConfigError(f"ema must be a float in [0, 1), got {ema!r}")
        if not isinstance(initial, (int, float)) or not np.isfinite(initial) or initial < 0:
            raise ConfigError(f"initial must be a finite float >= 0, got {initial!r}")
        self.ema = float(ema)
        self._values = torch.full((int(n),), float(initial), dtype=torch.float32).share_memory_()
        self._counts = torch.zeros((int(n),), dtype=torch.int32).share_memory_()
        self._sorted_ids: torch.Tensor | None = None
        self._id_pos: torch.Tensor | None = None
        self._locate: Callable[[np.ndarray], np.ndarray] | None = None
        if callable(ids):
            self._locate = ids
        elif ids is not None:
            arr = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
            if arr.shape != (int(n),):
                raise ConfigError(f"ids must have shape ({n},), got {tuple(arr.shape)}")
            sorted_ids, order = torch.sort(arr)
            if n > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
                raise ConfigError("ids must be unique")
            self._sorted_ids = sorted_ids.share_memory_()
            self._id_pos = order.share_memory_()

    def __len__(self) -> int:
        return int(self._values.shape[0])

    @property
    def counts(self) -> torch.Tensor:
        """The shared int32 ``[n]`` number of updates each row has received."""
        return self._counts

    @property
    def tensor(self) -> torch.Tensor:
        """The shared float32 ``[n]`` tensor of priorities (read it; update through ``update``)."""
        return self._values

    def positions(self, ids_or_positions: Any) -> torch.Tensor:
        """Row positions (int64) of the given ids (when built with ids) or positions, validated."""
        arr = as_numpy(ids_or_positions, "ids")
        problem = integer_problem(arr)  # float32 ids above 2**24 are not even exact
        if problem is not None:
            raise InvalidEmbeddingError(f"ids must be integers (the batch's 'id' column), got {problem}")
        big = beyond_int64(arr)
        if big is not None:
            raise InvalidEmbeddingError(f"id {big} is not a row of this lake")
        keys = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)).reshape(-1)
        n = len(self)
        if self._locate is not None:
            pos = np.asarray(self._locate(keys.numpy()), dtype=np.int64).reshape(-1)
            outside = (pos < 0) | (pos >= n)
            if pos.shape != tuple(keys.shape) or outside.any():
                first = int(keys[int(np.argmax(outside))]) if pos.shape == tuple(keys.shape) else int(keys[0])
                raise InvalidEmbeddingError(f"id {first} is not a row of this lake")
            return torch.from_numpy(pos)
        if self._sorted_ids is None:
            bad = (keys < 0) | (keys >= n)
            if bool(bad.any()):
                raise InvalidEmbeddingError(f"position {int(keys[bad][0])} is outside [0, {n})")
            return keys
        assert self._id_pos is not None  # set together with _sorted_ids
        where = torch.searchsorted(self._sorted_ids, keys).clamp_(max=max(n - 1, 0))
        found = (self._sorted_ids[where] == keys) if n else torch.zeros_like(keys, dtype=torch.bool)
        if not bool(found.all()):
            raise InvalidEmbeddingError(f"id {int(keys[~found][0])} is not a row of this lake")
        return self._id_pos[where]

    def update(self, ids_or_positions: Any, losses: Any) -> None:
        """Fold losses into the priorities (vectorised): the bias-corrected EMA of the class doc, i.e.
        ``p = p + (loss - p) (1 - ema) / (1 - ema^n)`` at a row's n-th update (n = 1: ``p = loss``).

        A row listed several times in one call is updated once, with the mean of its losses
        (deterministic whatever the order). Losses must be finite and >= 0.
        """
        pos, loss = self.checked(ids_or_positions, losses)
        if pos.numel() == 0:
            return
        rows, inverse = torch.unique(pos, return_inverse=True)
        total = torch.zeros(rows.shape, dtype=torch.float64).index_add_(0, inverse, loss)
        count = torch.bincount(inverse, minlength=rows.numel()).to(torch.float64)
        old = self._values[rows].to(torch.float64)
        seen = self._counts[rows].to(torch.float64) + 1.0
        # 1 - ema^n without cancellation; n = 1 gives gain 1 (the first loss replaces the initial value)
        gain = (1.0 - self.ema) / -torch.expm1(seen * torch.log(torch.tensor(self.ema, dtype=torch.float64))) \
            if self.ema > 0 else torch.ones_like(old)
        self._values[rows] = (old + gain * (total / count - old)).to(torch.float32)
        self._counts[rows] = torch.clamp(seen, max=2**31 - 1).to(torch.int32)

    def checked(self, ids_or_positions: Any, losses: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, float64 losses) of an `update`, or the error it raises; changes nothing."""
        pos = self.positions(ids_or_positions)
        loss = as_losses(losses)
        if loss.shape != pos.shape:
            raise InvalidEmbeddingError(f"got {pos.numel()} rows but {loss.numel()} losses")
        bad = ~torch.isfinite(loss) | (loss < 0) | (loss > torch.finfo(torch.float32).max)  # stored as float32
        if bool(bad.any()):
            raise InvalidEmbeddingError(f"losses must be finite, >= 0 and within float32; got {float(loss[bad][0])}")
        return pos, loss

    def scores(self) -> np.ndarray:
        """A float64 copy of the current priorities (scores for ``importance_plan``)."""
        return self._values.numpy().astype(np.float64)


def as_losses(losses: Any) -> torch.Tensor:
    """``losses`` as a flat float64 CPU tensor, or one `InvalidEmbeddingError` naming what they are (None,
    strings and objects were a builtin TypeError or RuntimeError)."""
    if torch.is_tensor(losses):
        loss = losses.detach()
    else:
        arr = np.asarray(losses)
        if arr.dtype.kind not in "iufb":
            raise InvalidEmbeddingError(f"losses must be numbers, got {type(losses).__name__} of dtype {arr.dtype} "
                                        f"(first: {arr.reshape(-1)[0] if arr.size else None!r})")
        loss = torch.as_tensor(arr)
    if loss.dtype == torch.bool or loss.is_complex():
        raise InvalidEmbeddingError(f"losses must be real numbers, got a tensor of {loss.dtype}")
    return loss.to("cpu", torch.float64).reshape(-1)


class IdPositions:
    """``ids -> positions`` of a lake snapshot, for `LossPriorities`:
    `m2m.lake.reader.Snapshot.positions` maps ids by the manifest's id ranges (an appended shard by
    arithmetic), so the loss sampler holds no copy of the id column (8 B a row, plus 16 B sorted).
    An unknown id raises `InvalidEmbeddingError` naming it and the lake version.
    Picklable (a snapshot pickles): DataLoader workers carry it."""

    def __init__(self, snap: Any) -> None:
        self.snap = snap

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        from m2m.errors import UnknownIdError

        try:
            return np.asarray(self.snap.positions(ids), dtype=np.int64)
        except UnknownIdError as e:  # the loss sampler's error for an id it does not know (a ValueError)
            raise InvalidEmbeddingError(str(e)) from None
