"""`m2m.mix`: one training stream over several lakes, drawn in fixed proportions each epoch.

A `Mixture` pins each lake's current snapshot. Its loader is the usual `StreamLoader` over a
`MixtureSource` (the lakes' shards concatenated) with a `MixtureSampler` as its importance plan, so
ordering, DDP/worker sharding, the epoch contract and resume are those of one lake (docs/stream.md,
"Mixing lakes"). Each lake keeps its own importance sampler and augmenter, built over its own
snapshot and geometry exactly as ``lake.export_to_dataloader`` builds them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.stream import mixing
from m2m.stream.columns import EMBEDDING, WEIGHT, delivered_dtype
from m2m.stream.from_lake import GEOMETRY_COLUMNS, config_defaults, importance_mode, lake_parts, stream_layout
from m2m.stream.hooks import Augment, Gather
from m2m.stream.loader import StreamLoader, make_loader
from m2m.stream.mixture_source import SOURCE, MixtureSource
from m2m.stream.options import StreamOptions, generate_mode
from m2m.stream.shuffle import FULL

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from m2m.lake.lake import Lake

__all__ = ["SOURCE", "Mixture", "MixtureAugment", "mix"]


def mix(lakes: Mapping[str, "Lake | str | os.PathLike[str]"], weights: Mapping[str, float], *,
        epoch_rows: int | None = None, columns: Sequence[str] | None = None) -> "Mixture":
    """A `Mixture` of ``lakes`` (name -> an open `m2m.Lake` or a lake path, opened here and closed by
    `Mixture.close`) drawn in the proportions ``weights`` (name -> a finite weight >= 0, not all 0;
    read as shares, `mixing.shares`: 0.4 : 0.6 is 2 : 3, and ``mix.weights`` sum to 1 up to rounding).

    Each epoch holds ``epoch_rows`` draws (default: the lakes' rows summed); lake ``name`` gets
    exactly ``round(weights[name] / sum(weights) * epoch_rows)`` of them (largest remainder, so the
    counts sum to ``epoch_rows``): a lake with more rows than its count is down-sampled (a fresh
    subset without replacement each epoch), one with fewer is up-sampled (whole passes plus a
    subset). Every lake must have the same ``latent_dim`` and storage dtype. ``columns``: what
    batches carry (default: ``embedding``); every name must be a column of every lake; the
    ``source`` column (index into `Mixture.names`) is always added. Raises `ConfigError` (one line)
    for a bad weight, lake, dimension or column.
    """
    if not isinstance(lakes, Mapping) or not lakes:
        raise ConfigError(f"mix: lakes must be a non-empty mapping of name -> lake, got {lakes!r}")
    if not isinstance(weights, Mapping):
        raise ConfigError(f"mix: weights must be a mapping of name -> weight, got {type(weights).__name__}")
    names = list(lakes)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ConfigError(f"mix: lake names must be non-empty strings, got {bad}")
    w = mixing.check_weights(names, dict(weights))
    if epoch_rows is not None and (isinstance(epoch_rows, bool) or not isinstance(epoch_rows, (int, np.integer))
                                   or epoch_rows < 1):
        raise ConfigError(f"mix: epoch_rows must be an int >= 1 or None, got {epoch_rows!r}")
    opened: list[Any] = []
    try:
        handles = {}
        for name, lake in lakes.items():
            if isinstance(lake, (str, os.PathLike)):
                from m2m.api import open_lake

                lake = open_lake(lake)
                opened.append(lake)
            if not callable(getattr(lake, "export_to_dataloader", None)) or not hasattr(lake, "snapshot"):
                raise ConfigError(f"mix: lake {name!r} must be an m2m.Lake or a lake path, got {type(lake).__name__}")
            handles[name] = lake
        return Mixture(handles, w, epoch_rows, columns, opened)
    except BaseException:
        for lake in opened:
            lake.close()
        raise


class Mixture:
    """Several lakes' pinned snapshots drawn in fixed proportions (made by `m2m.mix`).

    ``names``: the lakes' names; a batch's ``source`` column holds the index of each row's lake in
    this tuple. ``weights``: the normalised weights; ``epoch_rows``: draws per epoch (all ranks);
    ``counts``: draws per lake per epoch (a dict, summing to ``epoch_rows``); ``num_rows``: the
    lakes' rows per lake.
    """

    def __init__(self, lakes: dict[str, "Lake"], weights: np.ndarray, epoch_rows: int | None,
                 columns: Sequence[str] | None, opened: list[Any]) -> None:
        self.lakes = dict(lakes)
        self.names: tuple[str, ...] = tuple(lakes)
        self._opened = opened
        dims = {n: int(lake.dim) for n, lake in lakes.items()}
        if len(set(dims.values())) > 1:
            raise ConfigError("mix: the lakes' latent_dim differ (" + ", ".join(f"{n}={d}" for n, d in dims.items())
                              + "); a mixture needs one dimension")
        self._snaps = {n: lake.snapshot for n, lake in lakes.items()}  # pinned now
        dtypes = {n: np.dtype(s.storage_dtype).name for n, s in self._snaps.items()}
        if len(set(dtypes.values())) > 1:
            raise ConfigError("mix: the lakes' storage dtypes differ (" + ", ".join(f"{n}={d}" for n, d in dtypes.items())
                              + "); a mixture needs one")
        shadowed = [n for n, s in self._snaps.items() if SOURCE in s.column_names]
        if shadowed:  # (a lake like the README's, with metadata "source", could not be mixed; one had it shadowed silently)
            logger.warning("mix: lake(s) %s have a column named %r: in a mixture's batches %r is each row's lake "
                           "index (mix.names), and their own %r column is not delivered", shadowed, SOURCE, SOURCE,
                           SOURCE)
        self.num_rows = {n: int(s.num_rows) for n, s in self._snaps.items()}
        self._w = mixing.shares(weights)
        self.weights = {n: float(x) for n, x in zip(self.names, self._w)}
        # what states saved until 2026-12-08 were planned and named with: the counts of `check_weights`'s
        # weights (relative to the largest), the name of their unrounded shares (`_unrounded`)
        self._legacy_w = weights
        self.epoch_rows = int(sum(self.num_rows.values()) if epoch_rows is None else epoch_rows)
        self._epoch_rows_given = epoch_rows is not None  # else it follows the lakes' rows (not in the identity)
        empty = [n for n in self.names if self.num_rows[n] == 0]
        if empty:  # (with weight 0 it was accepted, then every export refused it: "lake ... is empty")
            raise ConfigError(f"mix: lake(s) {empty} are empty: a stream needs rows in every lake; leave them out")
        self.counts = dict(zip(self.names, (int(c) for c in mixing.counts(self._w, self.epoch_rows))))
        self.columns = None if columns is None else self._check_columns(columns)

    def _check_columns(self, columns: Sequence[str]) -> tuple[str, ...]:
        if isinstance(columns, str):
            raise ConfigError(f"mix: columns must be a tuple of names, not the string {columns!r}")
        names = tuple(columns)
        for col in names:
            if col in (EMBEDDING, WEIGHT, SOURCE) or col in GEOMETRY_COLUMNS:
                continue  # (a lake without stored geometry computes it for the stream, as alone: lake_parts)
            lacking = [n for n, s in self._snaps.items() if col not in s.column_names]
            if lacking:
                raise ConfigError(f"mix: column {col!r} is missing from lake(s) {lacking}; name columns every lake has")
        return names

    def _check_kinds(self, source: MixtureSource, columns: Sequence[str]) -> None:
        """One-line ConfigError when a delivered column has another dtype or shape in some lake (a
        batch holds one tensor per column)."""
        for col in columns:
            if col in (WEIGHT, SOURCE):
                continue
            stored = "mu" if col == EMBEDDING else col
            kinds = {}
            for name, part in zip(self.names, source.parts):
                if part.num_rows == 0 or stored not in part.column_names:
                    continue  # unknown names are refused by the stream with the valid ones
                # from the manifest where it says (reading shard 0's column downloaded that whole shard of
                # a remote lake on every rank before the first batch, 2026-12-08)
                described = part.column_sample(stored)
                sample = described if described is not None else part.column(0, stored)
                # what a batch holds (int32 and int64 metadata both arrive as int64, float32 and float64 as
                # float32: refused until 2026-12-08; `MixtureSource.dtype_of` reads them alike), and the
                # stored type where the unit or meaning differs: timestamp[s] and timestamp[ms], a duration
                # and an int64, string-label codes and int labels all arrive as int64 and would mix silently
                what = sample.dtype if stored == "mu" else delivered_dtype(sample.dtype)
                kinds[name] = f"{what}{list(sample.shape[1:]) if sample.ndim > 1 else ''}"
                manifest = self._snaps[name].manifest
                stored_type = (manifest.label_type if stored == "label" else manifest.metadata.get(stored))
                if stored_type is not None and (stored == "label" or stored_type.startswith(_UNIT_TYPES)):
                    kinds[name] += f" (stored {stored_type})"
            if len(set(kinds.values())) > 1:
                raise ConfigError(f"mix: column {col!r} differs between the lakes ("
                                  + ", ".join(f"{n}={k}" for n, k in kinds.items()) + "); deliver columns of one kind")

    def decode_labels(self, codes: Any, source: Any) -> np.ndarray:
        """The labels of a mixed batch: ``codes`` its ``label`` column, ``source`` its ``source`` column
        (each row's lake index in `names`); each code is read in its own lake's vocabulary (the same code
        means different strings in two lakes), as of the pinned snapshots. An object array: strings, and
        the ints of a lake with int labels; `ConfigError` for a lake without labels or a code out of range.

        Example: ``mix.decode_labels(batch["label"], batch["source"])``."""
        from m2m._validate import as_numpy, decode_codes, integer_problem

        code, src = as_numpy(codes, "codes"), as_numpy(source, "source")
        if code.shape != src.shape or code.ndim != 1:
            raise ConfigError(f"decode_labels: codes {code.shape} and source {src.shape} must be one value per row")
        # (a float or NaN source matched no lake and left its rows None; float codes of an int-label lake
        # came back as labels)
        for what, arr in (("source", src), ("label codes", code)):
            problem = integer_problem(arr)
            if problem is not None:
                raise ConfigError(f"decode_labels: {what} must be integers, got {problem}")
        out = np.empty(len(code), dtype=object)
        bad = (src < 0) | (src >= len(self.names))
        if bad.any():
            raise ConfigError(f"decode_labels: source {src[bad][0]!r} is not a lake index (0..{len(self.names) - 1})")
        for j, name in enumerate(self.names):
            sel = np.flatnonzero(src == j)
            if not len(sel):
                continue
            m = self._snaps[name].manifest
            if m.label_type is None:
                raise ConfigError(f"decode_labels: lake {name!r} has no labels")
            if m.label_type != "string":
                out[sel] = code[sel].tolist()
                continue
            out[sel] = decode_codes(m.label_vocabulary, code[sel], f"lake {name!r}'s")
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {self.weights[n]:.3g} ({self.counts[n]} of {self.num_rows[n]} rows)"
                          for n in self.names)
        return f"Mixture({parts}; epoch_rows={self.epoch_rows})"

    def identity(self, ids: Sequence[str], shares: Sequence[float] | None = None) -> str:
        """The name a stream state keeps: every lake's id, the weights (``shares``, default the
        mixture's) and the epoch length (the lakes' versions are the state's ``version``, `versions`)."""
        # the shares exactly (repr): at 6 significant digits 1 : 1 and 1 : 1.0000008 were one name, and a
        # state of one resumed the other's plan (their counts differ at 10M rows an epoch)
        given = self._w if shares is None else shares
        lakes = ",".join(f"{n}={i}*{float(w)!r}" for n, i, w in zip(self.names, ids, given))
        # the default epoch length is the lakes' rows: it grows with an append, as one lake's epoch does
        return f"mix[{lakes};epoch_rows={self.epoch_rows if self._epoch_rows_given else 'rows'}]"

    def _unrounded(self) -> np.ndarray:
        return self._legacy_w / self._legacy_w.sum()

    def legacy_identity(self, versions: Sequence[int], ids: Sequence[str]) -> str:
        """The name states of this mixture had until 2026-12-07 (versions in it, version None); see
        `legacy_identities` for which of the older names a loader accepts."""
        lakes = ",".join(f"{n}={i}@v{v}*{float(w)!r}" for n, i, v, w in zip(self.names, ids, versions,
                                                                               self._unrounded()))
        return f"mix[{lakes};epoch_rows={self.epoch_rows}]"

    def legacy_identities(self, versions: Sequence[int], ids: Sequence[str]) -> tuple[str, ...]:
        """The names older states of this mixture have, where their plan is this mixture's: until
        2026-12-07 versions in the name (version None) and, until 2026-12-08, the shares unrounded
        (when those give the same counts)."""
        if not np.array_equal(mixing.counts(self._legacy_w, self.epoch_rows), mixing.counts(self._w, self.epoch_rows)):
            return ()   # (their plan was another: a state of it must not resume this one)
        unrounded = self.identity(ids, self._unrounded().tolist())
        return (self.legacy_identity(versions, ids),) + ((unrounded,) if unrounded != self.identity(ids) else ())

    def versions(self, versions: Sequence[int]) -> str:
        """The snapshot versions of a mixture's lakes, as a state's ``version``: a state saved mid-epoch
        resumes these versions only; one saved at an epoch boundary resumes after appends too."""
        return ",".join(f"{n}@v{v}" for n, v in zip(self.names, versions))

    def export_to_dataloader(self, batch_size: int | None = None, shuffle: bool | None = None,
                             drop_last: bool | None = None, generate_samples: bool | str | None = None,
                             importance_sampling: bool | str | None = None, columns: Sequence[str] | None = None,
                             num_workers: int | None = None, rank: int | None = None, world_size: int | None = None,
                             seed: int | None = None, epoch: int | None = None, *, options: StreamOptions | None = None,
                             **overrides: Any) -> StreamLoader:
        """The usual `StreamLoader` over this mixture: the knobs of `m2m.Lake.export_to_dataloader`
        (``device``/``seed``/budgets default to the first lake's config).

        Batches are dicts: the named ``columns`` (default ``embedding``, or the mixture's columns)
        plus ``source``. ``importance_sampling`` ("kappa", "alpha", a metadata column every lake has)
        draws each lake's count from that lake's own sampler (``weight`` is that sampler's weight);
        ``generate_samples`` augments each row with its own lake's augmenter and geometry.
        With ``importance_sampling="loss"`` each lake keeps its own loss priorities; feed them with
        ``dl.update_priorities(batch["id"], loss, source=batch["source"])`` (lakes may share ids).
        """
        named = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last,
                 "generate_samples": generate_samples, "importance_sampling": importance_sampling,
                 "columns": columns, "num_workers": num_workers, "rank": rank, "world_size": world_size,
                 "seed": seed, "epoch": epoch}
        given = {k: v for k, v in named.items() if v is not None}
        first = self.lakes[self.names[0]]
        opts = StreamOptions.merged(options, {**given, **overrides}).with_defaults(config_defaults(first))
        chosen = self._check_columns(opts.columns) if opts.columns is not None else self.columns
        chosen = (EMBEDDING,) if chosen is None else chosen
        if SOURCE not in chosen:
            chosen = (*chosen, SOURCE)
        opts = dataclasses.replace(opts, columns=chosen)
        gen = generate_mode(opts.generate_samples)
        imp = None
        for name, snap in self._snaps.items():
            try:
                imp = importance_mode(opts.importance_sampling, list(snap.manifest.metadata))
            except ConfigError as exc:  # (the error listed one lake's columns and named no lake)
                raise ConfigError(f"mix: lake {name!r}: {exc}") from exc
        seed_ = int(opts.seed or 0)
        # augmenters read their terms by shard (large lakes) unless the mixture is fully shuffled
        shard_local = gen is not None and stream_layout(MixtureSource(list(self._snaps.values())), opts).mode != FULL
        parts = []
        for j, n in enumerate(self.names):
            try:
                parts.append(lake_parts(self.lakes[n], gen, imp, mixing.lake_seed(seed_, j), shard_local=shard_local,
                                        columns=chosen))
            except (ConfigError, InvalidEmbeddingError) as exc:
                # (a negative or NaN importance column of one lake said "row 5 is -1.0" of no lake)
                raise type(exc)(f"mix: lake {n!r}: {exc}") from exc
        changed = [n for n, p in zip(self.names, parts) if p.version != int(self._snaps[n].version)]
        if changed:
            raise ConfigError(f"mix: lake(s) {changed} moved to another version since m2m.mix pinned them; "
                              "call m2m.mix again to mix the new versions")
        source = MixtureSource([p.source for p in parts])
        self._check_kinds(source, chosen)
        kind = mixing.LossMixtureSampler if imp == "loss" else mixing.MixtureSampler
        sampler = kind([self.num_rows[n] for n in self.names], self._w, self.epoch_rows, seed_,
                       [p.sampler for p in parts], [_mean_alpha(self._snaps[n].manifest) for n in self.names],
                       self.names)
        augment = None if gen is None else MixtureAugment([p.augment for p in parts], source.bases)
        ids, versions = [p.identity for p in parts], [p.version for p in parts]
        loader = make_loader(source, opts, sampler=sampler, augment=augment, lake=self.identity(ids),
                             version=self.versions(versions))
        loader.legacy_lakes = self.legacy_identities(versions, ids)   # older states' names resume
        return loader

    def close(self) -> None:
        """Close the lakes `m2m.mix` opened from paths (lakes passed open stay open)."""
        for lake in self._opened:
            lake.close()
        self._opened = []

    def __enter__(self) -> "Mixture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MixtureAugment:
    """The augmentation of a mixture: each row goes through its own lake's augmenter, with rows and
    neighbour reads in that lake's positions. The lakes are augmented in order with the batch's one
    generator, so a resumed pass draws the same samples."""

    def __init__(self, augments: Sequence[Augment | None], bases: np.ndarray) -> None:
        self.augments = list(augments)
        self.bases = torch.as_tensor(np.asarray(bases, dtype=np.int64))

    @property
    def in_workers(self) -> bool:
        """Applied in a CPU stream's workers when every lake's augmenter is (`m2m.stream.hooks.Augment`)."""
        return all(getattr(a, "in_workers", False) is True for a in self.augments if a is not None)

    def build_tables(self, dim: int, gather: Gather) -> None:
        """Each lake's ``build_tables``, with neighbour reads in that lake's positions."""
        for aug, base in zip(self.augments, self.bases.tolist()):
            build = getattr(aug, "build_tables", None)
            if callable(build):
                build(dim, lambda r, base=int(base): gather(r + base))

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, gather: Gather,
                 generator: torch.Generator) -> torch.Tensor:
        bases = self.bases.to(rows.device)
        part = torch.searchsorted(bases, rows, right=True) - 1
        out = x.clone()
        for j, aug in enumerate(self.augments):
            if aug is None:
                continue
            sel = torch.nonzero(part == j).flatten()
            if len(sel) == 0:
                continue
            base = int(self.bases[j])

            def local_gather(r: torch.Tensor, base: int = base) -> torch.Tensor:
                return gather(r + base)

            out[sel] = aug(x[sel], rows[sel] - base, local_gather, generator).to(out.dtype)
        return out


#: Arrow types whose int64 values carry a unit: two lakes' columns of these mix only at the same type
_UNIT_TYPES = ("timestamp", "duration", "date", "time")


def _mean_alpha(manifest: Any) -> float:
    """A version's mean alpha from its manifest's summary (checked with the manifest; 1.0 without one)."""
    total = ((manifest.stats or {}).get("alpha") or {}).get("sum")
    rows = int(manifest.rows)
    return float(total) / rows if isinstance(total, (int, float)) and rows and total > 0 else 1.0
