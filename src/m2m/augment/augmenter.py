"""Stream hooks that replace each batch row by a sample around its splat (``m2m.stream.hooks.Augment``).

``LangevinAugmenter``: row i's components are its own splat (mu_i, kappa_i, alpha_i) and its
neighbours (same label only, when labels exist); the row becomes the end point of the Langevin chain
of ``m2m.augment.langevin`` started at mu_i. Every row first runs the exact one-component chain in
two coordinates (it reads nothing but its own row); splats whose neighbours are negligible whatever
the path (``negligible_neighbours``, decided once per splat) stop there, the others are checked on
their realised path (``negligible_on_path``) and, if a neighbour may matter, rerun exactly with all
components and the same noise (``coupled_full_chain``, run in the span of the means: ``m2m.augment.span``), gathering their neighbours (unique
positions only). The step of row i is set by its own kappa only (h = step_size / max(kappa_i / T,
d - 1)), so neighbours do not change how far a row moves. ``VMFAugmenter``: one exact vMF(mu_i,
kappa_i) draw per row. ``MixtureAugmenter``: one exact draw from the row's neighbourhood mixture (a
component picked with probability alpha_j / sum alpha, then a Wood vMF draw). Ids and labels are
untouched (the stream keeps them).

Tables live on the CPU and are copied to each device on first use (or ``.to(device)``).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from m2m.augment import span as _span
from m2m.augment import tables as _tables
from m2m.augment.energy import (
    DEFAULT_STEP_SIZE,
    component_log_weights,
    step_length,
    validate_chain_args,
)
from m2m.augment.langevin import (
    OwnChain,
    negligible_neighbours,
    negligible_on_path,
    own_component_chain,
    path_terms,
)
from m2m.augment.span import span_coupled_chain
from m2m.augment.tables import (
    DEFAULT_TERMS_BYTES,
    ShardCache,
    SplatTerms,
    by_shard,
    check_terms,
    tensor_bytes,
    tensor_bytes_of,
)
from m2m.errors import ConfigError, InternalError, InvalidEmbeddingError
from m2m.geometry.noise import HostNoise, Source, normal_
from m2m.geometry.span import SpanFactor, exact_bmm, span_factor
from m2m.geometry.sphere import random_point_at_cosine
from m2m.geometry.vmf import sample_cosine

__all__ = ["LangevinAugmenter", "LangevinDraws", "MixtureAugmenter", "MixtureDraws", "VMFAugmenter", "VMFDraws"]

log = logging.getLogger(__name__)

Gather = Callable[[Tensor], Tensor]

_COS_CHUNK_ROWS = 256
_STATIC_CHUNK_ROWS = 1 << 16
_FRAME_CACHE_BYTES = 256 << 20   # largest per-splat span factor table kept (N x (k+1)^2 float64)


def _check_table(name: str, values: np.ndarray, n: int, positive: bool) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ConfigError(f"{name} must have shape [{n}], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"{name} must be numeric, got {arr.dtype}")
    arr = arr.astype(np.float64)
    ok = np.isfinite(arr) & ((arr > 0) if positive else (arr >= 0))
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        raise ConfigError(f"{name} must be finite and {'> 0' if positive else '>= 0'}; row {first} is {arr[first]!r}")
    return arr


def _check_rows(rows: Tensor) -> None:
    if rows.dim() != 1:
        raise InvalidEmbeddingError(f"expected rows [B], got {tuple(rows.shape)}")


def _check_prepared(prepared: "VMFDraws | LangevinDraws | MixtureDraws", x: Tensor) -> None:
    if (prepared.batch, prepared.dim, prepared.dtype) != (x.shape[0], x.shape[1], x.dtype):
        raise InvalidEmbeddingError(f"prepared draws are for {prepared.batch} x {prepared.dim} {prepared.dtype}, "
                                    f"got x {tuple(x.shape)} {x.dtype}")


def _check_x(x: Tensor, rows: Tensor) -> None:
    if x.dim() != 2 or rows.dim() != 1 or rows.shape[0] != x.shape[0]:
        raise InvalidEmbeddingError(f"expected x [B, d] and rows [B], got {tuple(x.shape)} and {tuple(rows.shape)}")


@dataclass
class VMFDraws:
    """A batch's vMF draws made before its vectors are read: cosines to the mean and the direction
    Gaussians (CPU float32 only; else drawn when applied, from ``noise``: the batch's stream)."""
    batch: int
    dim: int
    dtype: torch.dtype
    cos: Tensor
    sin: Tensor
    gaussian: Tensor | None
    noise: Source = None


class VMFAugmenter:
    """Replace each row by one exact draw from its splat's vMF(mu_i, kappa_i) (Wood 1994)."""

    #: the rows' means are unit vectors in their own precision (False: a float16 lake's rows, which the
    #: draw normalises first; `m2m.stream.from_lake.build_augmenter` sets it)
    unit_means = True
    in_workers = True  # a CPU stream's DataLoader workers may apply it (`m2m.stream.hooks.Augment`)

    def __init__(self, kappa: np.ndarray) -> None:
        k = np.asarray(kappa)
        self._kappa = torch.from_numpy(_check_table("kappa", k, k.shape[0] if k.ndim == 1 else -1, False))
        self._terms: SplatTerms | None = None
        self._terms_bytes = 0
        self._sharded: _ShardedRows | None = None
        self._cache: dict[torch.device, Tensor] = {}
        self._lock = threading.Lock()

    @classmethod
    def by_shard(cls, terms: SplatTerms, terms_bytes: int = DEFAULT_TERMS_BYTES) -> "VMFAugmenter":
        """The same augmenter reading each shard's kappa from ``terms`` when first used (kept within
        ``terms_bytes``, least recently used dropped); its draws equal the whole-lake augmenter's."""
        aug = cls.__new__(cls)
        aug._kappa = torch.zeros(0, dtype=torch.float64)
        aug._terms, aug._terms_bytes, aug._sharded = terms, int(terms_bytes), None
        aug._cache, aug._lock = {}, threading.Lock()
        return aug

    def _by_shard(self) -> "_ShardedRows":
        return _sharded_rows(self, self._shard_kappa)

    def _shard_kappa(self, shard: int) -> np.ndarray:
        assert self._terms is not None
        offsets = self._terms.shard_offsets
        n = int(offsets[shard + 1] - offsets[shard])
        return _check_table(f"kappa of shard {shard}", self._terms.kappa(shard), n, False)

    def __getstate__(self) -> dict[str, Any]:
        """Tables only (a stream loader pickles for spawn launchers): locks and per-device/per-thread
        caches are rebuilt by the receiver."""
        return _plain_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _restore_state(self, state)

    def to(self, device: torch.device | str) -> "VMFAugmenter":
        """Copy the table to ``device`` now (otherwise on first use there)."""
        self._table(torch.device(device))
        return self

    def _table(self, device: torch.device) -> Tensor:
        with self._lock:
            if device not in self._cache:
                self._cache[device] = self._kappa.to(device)
            return self._cache[device]

    def prepare(self, rows: Tensor, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                gather: Gather | None = None, draw_gaussian: bool = True) -> VMFDraws:
        """The batch's draws made before its vectors are read (the stream's prefetch thread runs this);
        ``self(x, rows, gather, generator, prepared=...)`` then equals ``self(x, rows, gather, generator)``.
        ``draw_gaussian=False`` leaves the direction Gaussians to the call (same result)."""
        _check_rows(rows)
        if self._terms is not None:
            kappa = self._by_shard().take(rows, lambda t, r: t[r])
        else:
            kappa = self._table(rows.device)[rows]
        noise = _batch_noise(generator, rows.device, dtype)
        w, s = sample_cosine(kappa, dim, 1, noise)
        gaussian = None
        if draw_gaussian and noise is not generator:
            gaussian = normal_(torch.empty((rows.shape[0], dim), dtype=dtype), noise)
        return VMFDraws(rows.shape[0], dim, dtype, w[:, 0], s[:, 0], gaussian, noise)

    def __call__(self, x: Tensor, rows: Tensor, gather: Gather, generator: torch.Generator,
                 prepared: VMFDraws | None = None) -> Tensor:
        _check_x(x, rows)
        if prepared is None:
            prepared = self.prepare(rows.to(x.device), x.shape[1], generator, x.dtype)
        else:
            _check_prepared(prepared, x)
        return random_point_at_cosine(x, prepared.cos.to(x.device), prepared.sin.to(x.device),
                                      generator=generator if prepared.noise is None else prepared.noise,
                                      gaussian=prepared.gaussian, unit=self.unit_means)


@dataclass
class _Tables:
    """Per-device tables of one (dim) configuration over the whole lake."""
    packed: Tensor       # [N, 3] float64 (h = step length, kappa / T, 1 - fast): a batch's values in one gather;
                         # fast: neighbours negligible whatever the path -> one-component chain
    kappa: Tensor        # [N] float64
    log_w: Tensor        # [N] float64 log alpha + log C_d(kappa)
    neighbors: Tensor    # [N, k] int32 positions, -1 = absent (missing, self or another label)
    room: Tensor         # [N, k] float32 } constants of the path check (``path_terms``)
    slope: Tensor        # [N, k] float32 }
    scale: Tensor        # [N, k] float32 }

    def per_row(self, rows: Tensor) -> Tensor:
        return self.packed.index_select(0, rows)

    def path(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.room.index_select(0, rows), self.slope.index_select(0, rows), self.scale.index_select(0, rows)

    def components(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(neighbour positions [f, k] int64, -1 absent; kappa [f, 1 + k] and log weights [f, 1 + k],
        float64, the row's own first) of ``rows``."""
        nb = self.neighbors.index_select(0, rows).long()
        valid = nb >= 0
        idx = nb.clamp(min=0)
        kap = torch.cat([self.kappa[rows].unsqueeze(1), torch.where(valid, self.kappa[idx], 0.0)], 1)
        a = torch.cat([self.log_w[rows].unsqueeze(1), torch.where(valid, self.log_w[idx], -math.inf)], 1)
        return nb, kap, a


@dataclass
class _ShardTables:
    """`_Tables` of one shard's rows (``LangevinAugmenter.by_shard``; rows are the shard's own
    positions), compact: every row's ``packed`` values, and only for the rows whose neighbours may
    matter (``slot`` >= 0; the others never reach ``path`` or ``components``) their neighbours'
    positions and cosines and the kappa and log weight of every component, kept per row since a
    neighbour's own row may lie in a shard this process never loads. The path constants are derived
    for the rows asked (elementwise, the same values as `_Tables` keeps): 360 B per such row at
    k = 16 instead of 420. numpy views of one allocation: a batch's rows are gathered shard by shard,
    and numpy's indexing of a few rows costs a fraction of torch's."""
    packed: np.ndarray       # [n, 3] float64, as `_Tables`
    slot: np.ndarray         # [n] int32: the row's index in the arrays below, -1 on the one-component path
    neighbors: np.ndarray    # [m, k] int32 positions, -1 = absent
    cos: np.ndarray          # [m, k] float32 cosines to the neighbours, 0 where absent
    kappa: np.ndarray        # [m, 1 + k] float32: the row's own, then its neighbours' (0 where absent)
    log_w: np.ndarray        # [m, 1 + k] float64 log alpha + log C_d(kappa) (-inf where absent)

    def slots(self, rows: np.ndarray) -> np.ndarray:
        return self.slot[rows]


def _checked_slots(slots: np.ndarray) -> np.ndarray:
    if slots.size and int(slots.min()) < 0:     # only rows whose neighbours may matter have terms
        raise InternalError("path terms asked for a row on the one-component path")
    return slots


class _ShardedRows:
    """Per-shard values (a `ShardCache` of numpy arrays) looked up by global row positions; results
    as tensors on the rows' device."""

    def __init__(self, offsets: np.ndarray, cache: ShardCache[Any]) -> None:
        self.offsets, self.cache = offsets, cache

    def take_all(self, rows: Tensor, pick: Callable[[Any, np.ndarray], tuple[np.ndarray, ...]]) -> tuple[Tensor, ...]:
        """``pick(value, local rows)`` of each shard's rows, put back in the order of ``rows``."""
        groups = by_shard(rows, self.offsets)
        values = self.cache.get_many([g[0] for g in groups])
        outs: list[np.ndarray] | None = None
        for (_, where, local), v in zip(groups, values):
            parts = pick(v, local)
            if outs is None:
                outs = [np.empty((rows.shape[0],) + p.shape[1:], dtype=p.dtype) for p in parts]
            for o, p in zip(outs, parts):
                o[where] = p
        if outs is None:   # no rows: the shapes of an empty pick
            outs = list(pick(self.cache.get_many([0])[0], np.zeros(0, dtype=np.int64)))
        return tuple(torch.from_numpy(o).to(rows.device) for o in outs)

    def take(self, rows: Tensor, pick: Callable[[Any, np.ndarray], np.ndarray]) -> Tensor:
        return self.take_all(rows, lambda v, r: (pick(v, r),))[0]


def _sharded_rows(aug: "VMFAugmenter | MixtureAugmenter", build: Callable[[int], Any]) -> _ShardedRows:
    """``aug``'s per-shard lookups (``by_shard``), made on first use from its ``_terms`` and budget:
    not pickled, so a worker builds its own."""
    with aug._lock:
        if aug._sharded is None:
            assert aug._terms is not None
            offsets = np.asarray(aug._terms.shard_offsets, dtype=np.int64)
            aug._sharded = _ShardedRows(offsets, ShardCache(build, tensor_bytes_of, aug._terms_bytes))
        return aug._sharded


class _ShardedTables(_ShardedRows):
    """`_ShardTables` of the shards a process uses, built from `SplatTerms` on first use and kept within
    a byte budget (`m2m.augment.tables.ShardCache`); the methods of `_Tables`, global row positions.
    Built and kept on the CPU."""

    def __init__(self, offsets: np.ndarray, cache: ShardCache[Any], temperature: float) -> None:
        super().__init__(offsets, cache)
        self.temperature = temperature

    def per_row(self, rows: Tensor) -> Tensor:
        return self.take(rows, lambda t, r: t.packed[r])

    def path(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # gathered shard by shard, derived once for the whole call (per-shard calls on a few rows each
        # cost more than the arithmetic)
        def pick(t: _ShardTables, r: np.ndarray) -> tuple[np.ndarray, ...]:
            s = _checked_slots(t.slots(r))
            return t.cos[s], t.kappa[s], t.log_w[s]
        cos, kap, a = self.take_all(rows, pick)
        k64 = kap.double()
        return path_terms(cos, k64[:, 1:], a[:, 1:], k64[:, 0], a[:, 0], self.temperature)

    def components(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        def pick(t: _ShardTables, r: np.ndarray) -> tuple[np.ndarray, ...]:
            s = _checked_slots(t.slots(r))
            return t.neighbors[s], t.kappa[s], t.log_w[s]
        nb, kap, a = self.take_all(rows, pick)
        return nb.long(), kap.double(), a


@dataclass
class _Frames:
    """Per-splat span factors (``m2m.geometry.span.span_factor`` of [mu_i; its neighbours]), filled
    the first time a splat is rerun: the means of a splat never change, so neither does its Gram
    matrix, which is most of a rerun's cost (K^2 d per row)."""
    coords: Tensor       # [N, K, K] float64, valid where ``have``
    kept: Tensor         # [N, K] bool
    float32_ok: Tensor     # [N] bool
    have: Tensor         # [N] bool


@dataclass
class LangevinDraws:
    """A batch's draws made before its vectors are read (``LangevinAugmenter.prepare``).

    The one-component chains (``own``), the direction Gaussians (``gaussian``, CPU float32 only; else
    drawn from ``noise`` when applied), the rows whose neighbours may matter on their realised path
    (``fail``) and their recorded runs (``rerun``), which are re-run exactly with all components.
    """
    batch: int
    dim: int
    dtype: torch.dtype
    h: Tensor
    own: OwnChain
    noise: Source
    gaussian: Tensor | None
    fail: Tensor
    rerun: OwnChain | None
    exact: Tensor | None = None     # the rerun rows' outputs, when run ahead (``rerun_ahead``)


class LangevinAugmenter:
    """Replace each row by a Langevin sample over its own and its neighbours' splats.

    Args:
        neighbors: [N, k] int64 row positions of each splat's neighbours, -1 for none.
        kappa, alpha: [N] splat concentrations (>= 0) and masses (> 0).
        labels: [N] int64 or None; neighbours with another label are left out.
        steps, step_size, temperature, metropolis: the chain (``m2m.augment.langevin.sample``).
        neighbor_cos: optional [N, k] cosines mu_i . mu_neighbour (a kNN search returns them); when
            omitted they are computed once, on first use, through the stream's ``gather``.
    """

    unit_means = True  # (see VMFAugmenter.unit_means)
    in_workers = True  # a CPU stream's DataLoader workers may apply it (`m2m.stream.hooks.Augment`)

    def __init__(self, neighbors: np.ndarray, kappa: np.ndarray, alpha: np.ndarray,
                 labels: np.ndarray | None = None, steps: int = 5, step_size: float = DEFAULT_STEP_SIZE,
                 temperature: float = 1.0, metropolis: bool = False,
                 neighbor_cos: np.ndarray | None = None) -> None:
        validate_chain_args(steps, step_size, temperature)
        nb = np.asarray(neighbors)
        if nb.ndim != 2 or not np.issubdtype(nb.dtype, np.integer):
            raise ConfigError(f"neighbors must be an int64 array [N, k], got {nb.dtype} {nb.shape}")
        n, k = nb.shape
        nb = nb.astype(np.int64)
        if n and k and (nb.min() < -1 or nb.max() >= n):
            bad = int(np.flatnonzero(((nb < -1) | (nb >= n)).any(1))[0])
            raise ConfigError(f"neighbors holds positions outside [-1, {n}) (first at row {bad})")
        self._kappa = _check_table("kappa", kappa, n, False)
        self._alpha = _check_table("alpha", alpha, n, True)
        valid = (nb >= 0) & (nb != np.arange(n)[:, None])
        if labels is not None:
            lab = np.asarray(labels)
            if lab.shape != (n,):
                raise ConfigError(f"labels must have shape [{n}], got {lab.shape}")
            valid &= lab[np.maximum(nb, 0)] == lab[:, None]
        if n >= 2**31:
            raise ConfigError(f"LangevinAugmenter supports up to 2**31 - 1 splats, got {n}")
        self._neighbors = torch.from_numpy(np.where(valid, nb, -1).astype(np.int32))
        self._valid = torch.from_numpy(valid)
        if neighbor_cos is not None:
            cos = np.asarray(neighbor_cos, dtype=np.float64)
            if cos.shape != (n, k) or not np.isfinite(cos[valid]).all():
                raise ConfigError(f"neighbor_cos must be finite [N={n}, k={k}], got {cos.shape}")
            self._cos: Tensor | None = torch.from_numpy(np.where(valid, cos, 0.0).astype(np.float32))
        else:
            self._cos = None
        self._terms: SplatTerms | None = None
        self._terms_bytes = 0
        self._n, self._k = n, k
        self._init_chain(steps, step_size, temperature, metropolis)

    def _init_chain(self, steps: int, step_size: float, temperature: float, metropolis: bool) -> None:
        self.steps, self.metropolis = steps, metropolis
        self.step_size, self.temperature = float(step_size), float(temperature)
        self._static: dict[int, _Tables] = {}
        self._by_dim: dict[int, _ShardedTables] = {}     # by shard: tables per vector width
        self._cache: dict[tuple[torch.device, int], _Tables] = {}
        self._frames: dict[tuple[torch.device, int, torch.dtype], _Frames | None] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        # the exact rerun: in the span of the row's means (same law as ``coupled_full_chain``, which
        # tests swap in as the reference)
        self._rerun_kernel: Callable[..., Tensor] = span_coupled_chain

    @classmethod
    def by_shard(cls, terms: SplatTerms, steps: int = 5, step_size: float = DEFAULT_STEP_SIZE,
                 temperature: float = 1.0, metropolis: bool = False,
                 terms_bytes: int = DEFAULT_TERMS_BYTES) -> "LangevinAugmenter":
        """The same augmenter reading its terms shard by shard from ``terms`` (`m2m.augment.tables`):
        a shard's tables are built the first time one of its rows is augmented and the least recently
        used are dropped beyond ``terms_bytes``. Its draws equal those of the whole-lake augmenter
        over the same terms up to float64 rounding of the tables (tests/augment/test_tables.py)."""
        validate_chain_args(steps, step_size, temperature)
        offsets = np.asarray(terms.shard_offsets, dtype=np.int64)
        n, k = int(offsets[-1]), int(terms.k)
        if n >= 2**31:
            raise ConfigError(f"LangevinAugmenter supports up to 2**31 - 1 splats, got {n}")
        self = cls.__new__(cls)
        self._terms, self._terms_bytes = terms, int(terms_bytes)
        self._n, self._k = n, k
        self._neighbors = torch.zeros(0, k, dtype=torch.int32)   # whole-lake tables: none
        self._valid = torch.zeros(0, k, dtype=torch.bool)
        self._kappa = self._alpha = np.zeros(0)
        self._cos = None
        self._init_chain(steps, step_size, temperature, metropolis)
        return self

    # ------------------------------------------------------------------ tables

    def __getstate__(self) -> dict[str, Any]:
        """Tables only (a stream loader pickles for spawn launchers): locks and per-device/per-thread
        caches are rebuilt by the receiver."""
        return _plain_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _restore_state(self, state)

    def to(self, device: torch.device | str, dim: int, gather: Gather | None = None) -> "LangevinAugmenter":
        """Build the tables for vectors of width ``dim`` on ``device`` now (needs ``gather`` when
        ``neighbor_cos`` was not given)."""
        self._tables(torch.device(device), dim, gather)
        return self

    def build_tables(self, dim: int, gather: Gather | None) -> None:
        """The CPU tables for vectors of width ``dim``, built now (`m2m.stream.hooks.Augment`: a
        stream calls this before it forks workers, which then inherit them)."""
        self.to("cpu", dim, gather)

    @property
    def fast_fraction(self) -> float | None:
        """Fraction of splats on the one-component path (None before the tables exist)."""
        if not self._static:   # (by-shard augmenters keep no whole-lake tables: None)
            return None
        slow = next(iter(self._static.values())).packed[:, 2]
        return 1.0 - float(slow.mean()) if slow.numel() else 1.0

    def _tables(self, device: torch.device, dim: int, gather: Gather | None) -> "_Tables | _ShardedTables":
        if self._terms is not None:
            return self._sharded(dim)
        key = (device, dim)
        with self._lock:
            if key not in self._cache:
                if dim not in self._static:
                    self._static[dim] = self._build(dim, gather)
                st = self._static[dim]
                moved: dict[str, Any] = {}
                for f in fields(_Tables):
                    v = getattr(st, f.name)
                    moved[f.name] = None if v is None else v.to(device)
                self._cache[key] = _Tables(**moved)
            return self._cache[key]

    def _neighbour_cosines(self, gather: Gather | None) -> Tensor:
        if self._cos is not None:
            return self._cos
        if gather is None:
            raise ConfigError("LangevinAugmenter needs neighbor_cos or a gather function to compute them")
        n, k = self._neighbors.shape
        out = torch.zeros(n, k, dtype=torch.float32)
        for start in range(0, n if k else 0, _COS_CHUNK_ROWS):   # no neighbours: nothing to read
            stop = min(n, start + _COS_CHUNK_ROWS)
            own = gather(torch.arange(start, stop))
            idx = self._neighbors[start:stop].clamp(min=0).to(device=own.device, dtype=torch.int64)
            nb = gather(idx.reshape(-1)).reshape(stop - start, k, -1)
            cos = exact_bmm(nb, own.unsqueeze(2)).squeeze(2).to("cpu", torch.float32)
            out[start:stop] = torch.where(self._valid[start:stop], cos, torch.zeros((), dtype=torch.float32))
        self._cos = out
        return out

    def _build(self, dim: int, gather: Gather | None) -> _Tables:
        cos = self._neighbour_cosines(gather)
        n, k = self._neighbors.shape
        kappa = torch.from_numpy(self._kappa)
        log_w = component_log_weights(kappa, torch.from_numpy(self._alpha), dim)
        h = torch.empty(n, dtype=torch.float64)
        fast = torch.empty(n, dtype=torch.bool)
        room, slope, scale = (torch.empty(n, k, dtype=torch.float32) for _ in range(3))
        for start in range(0, n, _STATIC_CHUNK_ROWS):
            sl = slice(start, min(n, start + _STATIC_CHUNK_ROWS))
            valid = self._valid[sl]
            idx = self._neighbors[sl].clamp(min=0).long()
            k_nb = torch.where(valid, kappa[idx], torch.zeros((), dtype=torch.float64))
            a_nb = torch.where(valid, log_w[idx], torch.full((), -math.inf, dtype=torch.float64))
            h[sl], fast[sl], room[sl], slope[sl], scale[sl] = self._row_terms(cos[sl], k_nb, a_nb, kappa[sl],
                                                                              log_w[sl], dim)
        log.info("LangevinAugmenter: %d splats, k=%d, d=%d; %.2f%% on the one-component path",
                 n, k, dim, 100.0 * float(fast.double().mean()) if n else 100.0)
        packed = torch.stack([h, kappa / self.temperature, (~fast).double()], 1)
        return _Tables(packed, kappa, log_w, self._neighbors, room, slope, scale)

    def _row_terms(self, cos: Tensor, k_nb: Tensor, a_nb: Tensor, kappa: Tensor, log_w: Tensor,
                   dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(h, fast, room, slope, scale) of rows from their own and their neighbours' terms."""
        # the step depends on the row's own kappa only: a neighbour's concentration does not change
        # how far a row moves (with a much more concentrated neighbour that does carry weight, ULA's
        # discretisation of that component is coarser; metropolis=True keeps the law exact)
        h = step_length(self.step_size, kappa.unsqueeze(1), None, dim, self.temperature)
        fast = negligible_neighbours(cos, k_nb, a_nb, kappa, log_w, h, self.steps, dim, self.temperature,
                                     self.metropolis)
        room, slope, scale = path_terms(cos, k_nb, a_nb, kappa, log_w, self.temperature)
        return h, fast, room, slope, scale

    def _sharded(self, dim: int) -> _ShardedTables:
        with self._lock:
            tab = self._by_dim.get(dim)
            if tab is None:
                terms = self._terms
                assert terms is not None
                offsets = np.asarray(terms.shard_offsets, dtype=np.int64)
                cache: ShardCache[_ShardTables] = ShardCache(functools.partial(self._build_shard, dim=dim), tensor_bytes,
                                                        self._terms_bytes)
                tab = self._by_dim[dim] = _ShardedTables(offsets, cache, self.temperature)
            return tab

    def _build_shard(self, shard: int, dim: int) -> _ShardTables:
        """The `_ShardTables` of one shard's rows, from its terms alone (``by_shard``)."""
        terms = self._terms
        assert terms is not None
        offsets = terms.shard_offsets
        first, rows = int(offsets[shard]), int(offsets[shard + 1] - offsets[shard])
        t = terms.terms(shard)
        check_terms(t, rows, self._k, self._n, shard, first)
        valid_all = t.valid(first)
        packed, slots, parts = [], [], []
        # in chunks of rows: the float64 temporaries stay small, so the heap reuses them
        for lo in range(0, rows, _STATIC_CHUNK_ROWS):
            sl = slice(lo, min(rows, lo + _STATIC_CHUNK_ROWS))
            valid = torch.from_numpy(valid_all[sl])
            kappa = torch.from_numpy(t.kappa[sl].astype(np.float64))
            k_nb = torch.where(valid, torch.from_numpy(t.neighbor_kappa[sl].astype(np.float64)), 0.0)
            # a neighbour's alpha is 1 where it is no component: its log weight is masked to -inf anyway
            a_in = torch.where(valid, torch.from_numpy(t.neighbor_alpha[sl].astype(np.float64)), 1.0)
            log_w, a_nb = _log_weights_once(kappa, torch.from_numpy(t.alpha[sl].astype(np.float64)), k_nb, a_in,
                                            dim)
            a_nb = torch.where(valid, a_nb, -math.inf)
            cos = torch.where(valid, torch.from_numpy(np.asarray(t.neighbor_cos[sl], dtype=np.float32)), 0.0)
            h, fast, _, _, _ = self._row_terms(cos, k_nb, a_nb, kappa, log_w, dim)
            packed.append(torch.stack([h, kappa / self.temperature, (~fast).double()], 1))
            slow = torch.nonzero(~fast).squeeze(1)
            slots.append(slow + lo)
            nb = torch.from_numpy(np.where(valid_all[sl], t.neighbors[sl], -1)[slow.numpy()].astype(np.int32))
            kap = torch.cat([kappa[slow].unsqueeze(1), k_nb[slow]], 1).float()   # float32 values: exact
            a = torch.cat([log_w[slow].unsqueeze(1), a_nb[slow]], 1)
            parts.append((nb, cos[slow], kap, a))
        slow_rows = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)
        slot = torch.full((rows,), -1, dtype=torch.int32)
        slot[slow_rows] = torch.arange(slow_rows.numel(), dtype=torch.int32)
        k = self._k
        nb, cos, kap, a = (torch.cat([p[i] for p in parts]) if parts else torch.zeros(0, w, dtype=dt)
                           for i, (w, dt) in enumerate([(k, torch.int32), (k, torch.float32), (k + 1, torch.float32),
                                                        (k + 1, torch.float64)]))
        table = torch.cat(packed) if packed else torch.zeros(0, 3, dtype=torch.float64)
        t_packed, t_slot, t_nb, t_cos, t_kap, t_a = (v.numpy() for v in _tables.packed(table, slot, nb, cos, kap, a))
        return _ShardTables(t_packed, t_slot, t_nb, t_cos, t_kap, t_a)

    def _scratch(self, x: Tensor) -> Tensor:
        """A per-thread temporary of x's shape (fresh large allocations fault pages on every batch)."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.shape != x.shape or buf.device != x.device or buf.dtype != x.dtype:
            buf = torch.empty_like(x)
            self._local.scratch = buf
        return buf

    # ------------------------------------------------------------------ the hook
    def prepare(self, rows: Tensor, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                gather: Gather | None = None, draw_gaussian: bool = True) -> LangevinDraws:
        """Everything of a batch's augmentation that does not read its vectors (see ``LangevinDraws``).

        ``self(x, rows, gather, generator, prepared=self.prepare(rows, d, generator, x.dtype))`` returns
        exactly ``self(x, rows, gather, generator)``; the stream runs ``prepare`` in its prefetch
        thread. ``gather`` is needed only if the tables are not built yet and ``neighbor_cos`` was
        not given. ``draw_gaussian=False`` leaves the direction Gaussians (the largest draw) to the
        call: the result is the same, since nothing else draws from the batch's noise stream between.
        """
        _check_rows(rows)
        device = rows.device
        tab = self._tables(device, dim, gather)
        per_row = tab.per_row(rows)
        h = per_row[:, 0]
        cand = torch.nonzero(per_row[:, 2]).squeeze(1)       # rows whose neighbours might matter
        noise = HostNoise.of(generator) if device.type == "cpu" else generator  # one seeding per batch
        own = own_component_chain(h, per_row[:, 1], self.steps, dim, noise, self.metropolis,
                                  record=cand.numel() > 0)
        gaussian = None
        if draw_gaussian and device.type == "cpu" and dtype == torch.float32:  # the direction draw (noise.normal_)
            gaussian = normal_(torch.empty((rows.shape[0], dim), dtype=dtype), noise)
        fail = cand[:0]
        rerun = None
        if cand.numel():
            r = rows.index_select(0, cand)
            sub = own if cand.numel() == rows.numel() else own.rows(cand)
            ok = negligible_on_path(sub, *tab.path(r), dim)
            bad = torch.nonzero(~ok).squeeze(1)
            if bad.numel():
                fail, rerun = cand.index_select(0, bad), sub.rows(bad)
        return LangevinDraws(rows.shape[0], dim, dtype, h, own, noise, gaussian, fail, rerun)

    def __call__(self, x: Tensor, rows: Tensor, gather: Gather, generator: torch.Generator,
                 prepared: LangevinDraws | None = None) -> Tensor:
        _check_x(x, rows)
        if self.steps == 0:   # the chain stays at its start, the row's mean (unit to float32 rounding)
            if self.unit_means:
                return x.clone()
            return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        d = x.shape[1]
        rows = rows.to(x.device)
        if prepared is None:
            prepared = self.prepare(rows, d, generator, x.dtype, gather)
        else:
            _check_prepared(prepared, x)
        own = prepared.own
        out = random_point_at_cosine(x, own.t, own.rho, generator=prepared.noise, scratch=self._scratch(x),
                                     gaussian=prepared.gaussian, unit=self.unit_means)
        self.rerun_ahead([(prepared, x, rows, generator)], gather)   # unless the stream ran it already
        if prepared.exact is not None:
            out[prepared.fail.to(x.device)] = prepared.exact.to(device=x.device, dtype=out.dtype)
        return out

    def rerun_ahead(self, batches: Sequence[tuple[LangevinDraws, Tensor, Tensor, torch.Generator]],
                    gather: Gather) -> None:
        """Run the exact reruns of prepared batches now, ``batches`` = ``[(prepared, x, rows, generator),
        ...]`` with x the batch's vectors: each call then only combines, and returns exactly what it
        returns without this (a batch's rerun draws from its ``generator`` next, as the call would).
        The batches' reruns share one chain (``span.RowBlocks``: each batch draws from its own
        generator, and a row's result does not depend on the rows it is run with), which spreads the
        chain's per-call cost. The stream runs this in its prefetch thread for each item
        (``m2m.stream.stages.draw_ahead``); a call given draws without them runs it for its batch."""
        todo = [(p, x, r, g) for p, x, r, g in batches if p.rerun is not None and p.exact is None]
        if not todo:
            return
        for p, x, r, _ in todo:
            _check_x(x, r)
            _check_prepared(p, x)
        x0 = todo[0][1]
        dev, d = x0.device, x0.shape[1]
        tab = self._tables(dev, d, gather)
        width = self._k + 2 + self.steps       # the span chain's coordinates
        if (len(todo) == 1 or self._rerun_kernel is not _span.span_coupled_chain or d <= width
                or any(x.device != dev or x.dtype != x0.dtype for _, x, _, _ in todo)):
            groups: list[list[tuple[LangevinDraws, Tensor, Tensor, torch.Generator]]] = [[t] for t in todo]
        else:
            groups = [todo]
        for group in groups:
            fails = [p.fail.to(dev) for p, _, _, _ in group]
            xs = torch.cat([x[f] for (_, x, _, _), f in zip(group, fails)])
            rs = torch.cat([r.to(dev)[f] for (_, _, r, _), f in zip(group, fails)])
            hs = torch.cat([p.h.to(dev)[f] for (p, _, _, _), f in zip(group, fails)])
            runs = [p.rerun for p, _, _, _ in group if p.rerun is not None]
            own = runs[0] if len(runs) == 1 else OwnChain.cat(runs)
            source: torch.Generator | _span.RowBlocks = (group[0][3] if len(group) == 1 else
                                                         _span.RowBlocks([(g, int(f.numel()))
                                                                          for (_, _, _, g), f in zip(group, fails)]))
            out = self._exact(xs, rs, hs, tab, gather, source, own).to(x0.dtype)
            for (p, _, _, _), piece in zip(group, out.split([int(f.numel()) for f in fails])):
                p.exact = piece

    def _exact(self, x: Tensor, rows: Tensor, h: Tensor, tab: "_Tables | _ShardedTables", gather: Gather,
               generator: "torch.Generator | _span.RowBlocks", own: OwnChain) -> Tensor:
        """The exact chain over all components of the given rows, coupled to their recorded run."""
        f, d = x.shape
        nb, kap, a = tab.components(rows)
        valid = nb >= 0
        uniq, inv = torch.unique(nb[valid], return_inverse=True)
        span = self._rerun_kernel is _span.span_coupled_chain
        # table = [x rows; unique neighbours; a zero row], then one gather builds mu [f, 1 + k, d] in
        # x's dtype (the span kernel's products with float32 means run in float32 where the frame allows it)
        table = x.new_empty(f + uniq.numel() + 1, d)
        table[:f] = x
        if uniq.numel():
            table[f:-1] = gather(uniq).to(device=x.device)
        table[-1] = 0.0
        pos = torch.full(nb.shape, f + uniq.numel(), dtype=torch.int64, device=x.device)
        pos[valid] = inv + f
        pos = torch.cat([torch.arange(f, device=x.device).unsqueeze(1), pos], 1)
        mu = table.index_select(0, pos.reshape(-1)).view(f, 1 + nb.shape[1], d)
        a = a - a[:, :1]                      # softmax is shift-free; keeps float32 logits small
        if span:
            return self._rerun_kernel(x, mu, kap.to(x.dtype), a.to(x.dtype), h, self.temperature, generator, own,
                                      factor=self._factor(rows, mu))
        return self._rerun_kernel(x, mu, kap.to(x.dtype), a.to(x.dtype), h, self.temperature, generator, own)

    def _factor(self, rows: Tensor, mu: Tensor) -> SpanFactor | None:
        """The span factors of ``mu`` [f, K, d] (the means of splats ``rows``, x rows being the splats'
        own vectors as in the stream) from the per-splat table, computing the missing ones; None when
        the table would exceed ``_FRAME_CACHE_BYTES`` (the kernel then forms every Gram matrix)."""
        if self._terms is not None:   # by shard: no whole-lake table (each rerun forms its Gram matrices)
            return None
        n, k1 = self._n, mu.shape[1]
        key = (mu.device, mu.shape[2], mu.dtype)
        with self._lock:
            if key not in self._frames:
                fits = n * k1 * k1 * 8 <= _FRAME_CACHE_BYTES
                # empty, not zeros: rows are written (and their pages touched) only when first rerun
                self._frames[key] = _Frames(torch.empty(n, k1, k1, dtype=torch.float64, device=mu.device),
                                            torch.empty(n, k1, dtype=torch.bool, device=mu.device),
                                            torch.empty(n, dtype=torch.bool, device=mu.device),
                                            torch.zeros(n, dtype=torch.bool, device=mu.device)) if fits else None
            fr = self._frames[key]
        if fr is None:
            return None
        miss = torch.nonzero(~fr.have.index_select(0, rows)).squeeze(1)
        if miss.numel():
            new = span_factor(mu.index_select(0, miss))
            r = rows.index_select(0, miss)
            fr.coords[r] = new.coords.to(mu.device)
            fr.kept[r] = new.kept.to(mu.device)
            fr.float32_ok[r] = new.float32_ok.to(mu.device)
            fr.have[r] = True             # after the factors: a concurrent reader never sees a stale row
        return SpanFactor(fr.coords.index_select(0, rows), fr.kept.index_select(0, rows),
                          fr.float32_ok.index_select(0, rows))


def _log_weights_once(kappa: Tensor, alpha: Tensor, k_nb: Tensor, a_nb: Tensor,
                      dim: int) -> tuple[Tensor, Tensor]:
    """`component_log_weights` of rows [n] and of their neighbours [n, k] (float64 tensors holding
    float32 values), each distinct (kappa, alpha) pair evaluated once: a splat is the neighbour of ~k
    rows, and the Bessel terms dominate a shard's build (0.85 s per 1.1M values against 0.24 s to find
    the distinct pairs by their float32 bits). Elementwise, so the values are those of every entry."""
    k32 = torch.cat([kappa, k_nb.reshape(-1)]).float().numpy()
    a32 = torch.cat([alpha, a_nb.reshape(-1)]).float().numpy()
    key = (k32.view(np.uint32).astype(np.uint64) << np.uint64(32)) | a32.view(np.uint32).astype(np.uint64)
    uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    w = component_log_weights(torch.from_numpy(k32[first].astype(np.float64)),
                              torch.from_numpy(a32[first].astype(np.float64)), dim)
    w = w[torch.from_numpy(inverse.reshape(-1))]
    n = kappa.shape[0]
    return w[:n], w[n:].view(k_nb.shape)


def _batch_noise(generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Source:
    """One ``HostNoise`` stream for a CPU float32 batch's cosines and direction Gaussians (one seeding
    per batch, not one per draw), else ``generator`` itself."""
    if device.type == "cpu" and dtype == torch.float32:
        return HostNoise.of(generator)
    return generator


def _plain_state(obj: Any) -> dict[str, Any]:
    """``obj.__dict__`` without its lock, thread-local scratch and device caches (see ``__getstate__``)."""
    state = obj.__dict__.copy()
    for name in ("_lock", "_local"):
        state.pop(name, None)
    for name in ("_cache", "_frames", "_by_dim"):
        if name in state:
            state[name] = {}
    if "_sharded" in state:       # by-shard tables: rebuilt by the receiver from ``_terms``
        state["_sharded"] = None
    return state


def _restore_state(obj: Any, state: dict[str, Any]) -> None:
    obj.__dict__.update(state)
    obj._lock = threading.Lock()
    if isinstance(obj, LangevinAugmenter):
        obj._local = threading.local()


@dataclass
class MixtureDraws:
    """A batch's mixture draws made before its vectors are read (``MixtureAugmenter.prepare``): the
    chosen component of each row (``slot``: 0 = the row itself, j >= 1 its j-th listed same-label
    neighbour; ``source``: that component's row position), the cosines to its mean and the direction
    Gaussians (CPU float32 only; else drawn when applied, from ``noise``: the batch's stream)."""
    batch: int
    dim: int
    dtype: torch.dtype
    slot: Tensor
    source: Tensor
    cos: Tensor
    sin: Tensor
    gaussian: Tensor | None
    noise: Source = None


def _present_first(present: np.ndarray) -> np.ndarray:
    """The column order that moves each row's present slots to the front (stable)."""
    return np.argsort(~present, axis=1, kind="stable")


def _mixture_rows(own: np.ndarray, neighbours: np.ndarray, alpha_own: np.ndarray,
                  alpha_nb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(components [n, 1 + k] int64, their cumulative masses [n, 1 + k] float64, present [n, 1 + k]) of
    rows at positions ``own`` with ``neighbours`` (-1: not a component) of masses ``alpha_nb``: slot 0
    = the row, then its components moved to the front; the last present slot's mass exactly 1.0 and
    absent slots 2.0 (never picked)."""
    n = len(own)
    comp = np.concatenate([own[:, None], neighbours], 1)
    present = comp >= 0
    order = _present_first(present)
    comp = np.take_along_axis(comp, order, 1)
    present = np.take_along_axis(present, order, 1)
    w = np.concatenate([alpha_own[:, None], alpha_nb], 1)
    w = np.where(present, np.take_along_axis(w, order, 1), 0.0)
    cdf = np.cumsum(w, 1) / w.sum(1, keepdims=True)
    last = present.sum(1) - 1
    cdf[np.arange(n), last] = 1.0
    cdf[~present] = 2.0
    return comp, cdf, present


@dataclass
class _MixtureShard:
    comp: np.ndarray     # [n, 1 + k] int64 positions, -1 absent
    cdf: np.ndarray      # [n, 1 + k] float64
    kappa: np.ndarray    # [n, 1 + k] float64 kappa / T of each slot


class MixtureAugmenter:
    """Replace each row by an exact draw from its neighbourhood's vMF mixture.

    Row i's mixture has the components j in {i} and its neighbours (same label only, when labels
    exist): p_i(x) = sum_j alpha_j C_d(kappa_j) exp(kappa_j mu_j.x) / sum_j alpha_j. Each normalised
    component carries mass alpha_j, so a draw picks j with probability alpha_j / sum alpha (one
    uniform per row against the row's precomputed cumulative weights) and returns one exact Wood
    vMF(mu_j, kappa_j / T) draw around mu_j (gathered only for rows whose pick is a neighbour).
    No chain: the draw is exact, vectorised over the batch, and a function of the batch's generator.

    ``temperature`` T flattens every component to vMF(mu_j, kappa_j / T) and keeps the masses
    alpha_j. That is not p_i^(1/T) (the tempered density the Langevin chain samples): where the
    components do not overlap, p_i^(1/T) gives component j a mass proportional to
    (alpha_j C_d(kappa_j))^(1/T) / C_d(kappa_j / T), which at d >= 64 puts nearly all of it on the
    least concentrated component. T = 1 is the exact mixture.

    Args:
        neighbors: [N, k] int64 row positions of each splat's neighbours, -1 for none.
        kappa, alpha: [N] splat concentrations (>= 0) and masses (> 0).
        labels: [N] or None; neighbours with another label are left out.
        temperature: > 0, see above.
    """

    unit_means = True  # (see VMFAugmenter.unit_means)
    in_workers = True  # a CPU stream's DataLoader workers may apply it (`m2m.stream.hooks.Augment`)

    def __init__(self, neighbors: np.ndarray, kappa: np.ndarray, alpha: np.ndarray,
                 labels: np.ndarray | None = None, temperature: float = 1.0) -> None:
        validate_chain_args(0, DEFAULT_STEP_SIZE, temperature)
        nb = np.asarray(neighbors)
        if nb.ndim != 2 or not np.issubdtype(nb.dtype, np.integer):
            raise ConfigError(f"neighbors must be an int64 array [N, k], got {nb.dtype} {nb.shape}")
        n, k = nb.shape
        nb = nb.astype(np.int64)
        if n and k and (nb.min() < -1 or nb.max() >= n):
            bad = int(np.flatnonzero(((nb < -1) | (nb >= n)).any(1))[0])
            raise ConfigError(f"neighbors holds positions outside [-1, {n}) (first at row {bad})")
        kap = _check_table("kappa", kappa, n, False)
        alp = _check_table("alpha", alpha, n, True)
        valid = (nb >= 0) & (nb != np.arange(n)[:, None])
        if labels is not None:
            lab = np.asarray(labels)
            if lab.shape != (n,):
                raise ConfigError(f"labels must have shape [{n}], got {lab.shape}")
            valid &= lab[np.maximum(nb, 0)] == lab[:, None]
        if n >= 2**31:
            raise ConfigError(f"MixtureAugmenter supports up to 2**31 - 1 splats, got {n}")
        self.temperature = float(temperature)
        comp, cdf, present = _mixture_rows(np.arange(n), np.where(valid, nb, -1), alp, alp[np.maximum(nb, 0)])
        self._slots = int(present.sum(1).max()) if n else 1
        self._comp = torch.from_numpy(np.ascontiguousarray(comp[:, :self._slots]).astype(np.int32))
        self._cdf = torch.from_numpy(np.ascontiguousarray(cdf[:, :self._slots]))
        self._kappa = torch.from_numpy(kap / self.temperature)
        self._terms: SplatTerms | None = None
        self._terms_bytes = 0
        self._sharded: _ShardedRows | None = None
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self._lock = threading.Lock()

    @classmethod
    def by_shard(cls, terms: SplatTerms, temperature: float = 1.0,
                 terms_bytes: int = DEFAULT_TERMS_BYTES) -> "MixtureAugmenter":
        """The same augmenter reading its terms shard by shard from ``terms`` (`m2m.augment.tables`),
        kept within ``terms_bytes``; its draws equal the whole-lake augmenter's (its
        ``responsibilities`` have k + 1 slots, the whole-lake one's as many as the largest mixture)."""
        validate_chain_args(0, DEFAULT_STEP_SIZE, temperature)
        aug = cls.__new__(cls)
        aug.temperature = float(temperature)
        k = int(terms.k)
        aug._slots = k + 1
        aug._comp = torch.zeros(0, k + 1, dtype=torch.int32)
        aug._cdf = torch.zeros(0, k + 1, dtype=torch.float64)
        aug._kappa = torch.zeros(0, dtype=torch.float64)
        aug._terms, aug._terms_bytes, aug._sharded = terms, int(terms_bytes), None
        aug._cache, aug._lock = {}, threading.Lock()
        return aug

    def _by_shard(self) -> "_ShardedRows":
        return _sharded_rows(self, self._build_shard)

    def _build_shard(self, shard: int) -> "_MixtureShard":
        """One shard's components, cumulative masses and component kappa / T, from its terms alone."""
        terms = self._terms
        assert terms is not None
        offsets = terms.shard_offsets
        first, n = int(offsets[shard]), int(offsets[shard + 1] - offsets[shard])
        t = terms.terms(shard)
        check_terms(t, n, int(terms.k), int(offsets[-1]), shard, first)
        valid = t.valid(first)
        comp, cdf, present = _mixture_rows(np.arange(first, first + n), np.where(valid, t.neighbors, -1),
                                           t.alpha.astype(np.float64), t.neighbor_alpha.astype(np.float64))
        kap = np.concatenate([t.kappa[:, None], np.where(valid, t.neighbor_kappa, 0.0)], 1).astype(np.float64)
        order = _present_first(np.concatenate([np.ones((n, 1), bool), valid], 1))
        kap = np.where(present, np.take_along_axis(kap, order, 1), 0.0) / self.temperature
        m_comp, m_cdf, m_kap = (v.numpy() for v in _tables.packed(torch.from_numpy(comp), torch.from_numpy(cdf),
                                                                    torch.from_numpy(kap)))
        return _MixtureShard(m_comp, m_cdf, m_kap)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without its lock and device caches (DataLoader workers, spawned ranks)."""
        return _plain_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _restore_state(self, state)

    def to(self, device: torch.device | str) -> "MixtureAugmenter":
        """Copy the tables to ``device`` now (otherwise on first use there)."""
        self._tables(torch.device(device))
        return self

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        with self._lock:
            if device not in self._cache:
                self._cache[device] = (self._comp.to(device), self._cdf.to(device), self._kappa.to(device))
            return self._cache[device]

    def responsibilities(self, rows: Tensor) -> Tensor:
        """[B, S] the probability of each component slot of ``rows`` (the mixture weights drawn from)."""
        if self._terms is not None:
            c = self._by_shard().take(rows, lambda t, r: t.cdf[r]).clamp(max=1.0)
        else:
            c = self._tables(rows.device)[1].index_select(0, rows).clamp(max=1.0)
        return torch.diff(c, dim=1, prepend=torch.zeros_like(c[:, :1]))

    def prepare(self, rows: Tensor, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                gather: Gather | None = None, draw_gaussian: bool = True) -> MixtureDraws:
        """The batch's draws made before its vectors are read (the stream's prefetch thread runs this);
        ``self(x, rows, gather, generator, prepared=...)`` then equals ``self(x, rows, gather, generator)``.
        ``draw_gaussian=False`` leaves the direction Gaussians to the call (same result)."""
        _check_rows(rows)
        u = torch.rand(rows.shape[0], dtype=torch.float64, device=rows.device, generator=generator)
        if self._terms is not None:
            cdf_r, comp_r, kap_r = self._by_shard().take_all(rows, lambda t, r: (t.cdf[r], t.comp[r], t.kappa[r]))
            slot = (cdf_r <= u.unsqueeze(1)).sum(1)
            source = comp_r.gather(1, slot.unsqueeze(1)).squeeze(1).long()
            kappa_src = kap_r.gather(1, slot.unsqueeze(1)).squeeze(1)
        else:
            comp, cdf, kappa = self._tables(rows.device)
            slot = (cdf.index_select(0, rows) <= u.unsqueeze(1)).sum(1)
            source = comp.index_select(0, rows).gather(1, slot.unsqueeze(1)).squeeze(1).long()
            kappa_src = kappa.index_select(0, source)
        noise = _batch_noise(generator, rows.device, dtype)
        w, s = sample_cosine(kappa_src, dim, 1, noise)
        gaussian = None
        if draw_gaussian and noise is not generator:
            gaussian = normal_(torch.empty((rows.shape[0], dim), dtype=dtype), noise)
        return MixtureDraws(rows.shape[0], dim, dtype, slot, source, w[:, 0], s[:, 0], gaussian, noise)

    def __call__(self, x: Tensor, rows: Tensor, gather: Gather, generator: torch.Generator,
                 prepared: MixtureDraws | None = None) -> Tensor:
        _check_x(x, rows)
        if prepared is None:
            prepared = self.prepare(rows.to(x.device), x.shape[1], generator, x.dtype)
        else:
            _check_prepared(prepared, x)
        mean = x
        slot = prepared.slot.to(x.device)
        moved = torch.nonzero(slot > 0).squeeze(1)
        if 2 * moved.numel() > x.shape[0]:
            # most rows move (with k equal neighbours all but 1 / (k + 1)): one gather of every row's
            # source, the rows that stay copied back, instead of a copy of x and a scatter of the others
            mean = gather(prepared.source.to(x.device)).to(device=x.device, dtype=x.dtype).contiguous()
            stay = torch.nonzero(slot == 0).squeeze(1)
            mean[stay] = x[stay]
        elif moved.numel():
            mean = x.clone()
            mean[moved] = gather(prepared.source.to(x.device)[moved]).to(device=x.device, dtype=x.dtype)
        return random_point_at_cosine(mean, prepared.cos.to(x.device), prepared.sin.to(x.device),
                                      generator=generator if prepared.noise is None else prepared.noise,
                                      gaussian=prepared.gaussian, unit=self.unit_means)
