"""The stream's conformance matrix (issue 17): every path a user can pick, through the public API only.

Factors: source {local, moto S3 with a node cache} x workers {0, 2 forked, 2 spawned} (the start
method only exists with workers) x ranks {1, 2} (simulated in one process with ``rank=``/``world_size=``)
x shuffle {full, block} x mode {plain, importance kappa, importance loss, vmf, mixture, langevin} x
interruption {none (two epochs of one loader), ``state_dict`` after 3 batches resumed in a fresh process, rank 0's state loaded on
every rank, a peeked pass kept live (``it = iter(dl); next(it)``) while a whole epoch runs beside it} x mu {float32, float16, float16 delivered as stored (``embedding_dtype="stored"``)} x labels {int, str} x a metadata column {bool, int, uint64, float, str}
x mixing {one lake, ``m2m.mix`` of the cell's lake and a local one (conformance_helpers: "mix" cells)}.

Every cell asserts, against an uninterrupted in-process reference (``num_workers=0``) of the same lake,
ranks, shuffle and mode: each row exactly once per epoch across the ranks (plus the documented padding
row), or for importance modes the documented systematic draws and weights (docs/soc.md); equal batch
counts and sizes per rank; every column's values; the same batches, bit for bit, whatever the workers
or the interruption; a bounded time (per-cell timeout, DataLoader ``timeout`` with workers). A
combination may only be refused where the contract allows it, with a one-line `M2MError`: a string
column in ``columns=`` (naming ``to_arrow()``) and a uint64 column at ingest. Loss-based importance
sampling on a mixture runs like any cell (each lake's own loss sampler).

Default suite: an all-pairs subset of the 2 x 3 x 2 x 2 x 6 x 4 x 2 x 3 x 5 x 2 = 34,560 cells, made by the
deterministic greedy pairwise generator below (DEFAULT_CELLS; ``pytest -s -k cell_count`` prints how many). Slow suite: the full product
where it is cheap: (a) local, 0 workers, interruption {none, rank 0's state} over every other factor
(1,440 cells); (b) source x workers x interruption x mode with 2 ranks, block shuffle, float32/int/float
columns (72 cells for the modes plain, loss and mixture; all 144 with ``M2M_MATRIX_FULL=1``): the cells
beyond the default ones (1,500 today). ``pytest -s -k cell_count`` prints the counts.
"""

from __future__ import annotations

import copy
import itertools
import os
from typing import Any, Callable, NamedTuple

import pytest
from conformance_helpers import (
    BS,
    DELIVERED,
    K_RESUME,
    MIX_ROWS,
    STORAGE,
    Built,
    build_lake,
    cell_columns,
    check_epoch,
    epoch_of,
    loader_kwargs,
    loader_of,
    one_line_error,
    resume_in_child,
    same_batches,
    snapshot,
    take,
)

from m2m import open_lake
from m2m.errors import M2MError

CELL_TIMEOUT_S = 300

FACTORS: dict[str, tuple[Any, ...]] = {  # the widest factors first: the greedy generator then needs fewer cells
    "mode": ("plain", "kappa", "loss", "vmf", "mixture", "langevin"),
    "meta": ("bool", "int", "uint", "float", "str"),
    "source": ("local", "s3"),
    "workers": ("0", "2-fork", "2-spawn"),
    "interrupt": ("none", "child", "rank0", "kept"),
    "ranks": (1, 2),
    "shuffle": ("full", "block"),
    "mu": ("float32", "float16", "float16-stored"),
    "label": ("int", "str"),
    "mix": ("one", "mix"),
}


class Cell(NamedTuple):
    mode: str
    meta: str
    source: str
    workers: str
    interrupt: str
    ranks: int
    shuffle: str
    mu: str
    label: str
    mix: str = "one"

    @property
    def id(self) -> str:
        return "-".join(str(v) for v in self)


def pairwise(factors: dict[str, tuple[Any, ...]],
             known_bug: Callable[[dict[str, Any]], bool] = lambda levels: False,
             refusing: dict[str, set[Any]] | None = None) -> list[tuple[int, ...]]:
    """A deterministic greedy all-pairs covering: rows of level indices such that every pair of levels
    of every two factors occurs in some row. Each row starts from the first uncovered pair and fills the
    other factors, in order, with the level that covers most uncovered pairs; ties go to a level that
    does not make the row a known-bug cell (so xfails hide few pairs), then to the first level.
    ``refusing`` names levels whose cells end at a refusal (a uint64 column at ingest): such a level
    is only used where its own pair seeds the row, and that row covers only the pairs it is part of
    (the rest of the row never runs)."""
    names = list(factors)
    sizes = [len(v) for v in factors.values()]
    nf = len(sizes)
    refused = {(f, v) for f, n in enumerate(names) for v, level in enumerate(factors[n])
               if level in (refusing or {}).get(n, set())}
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(nf), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}
    rows: list[tuple[int, ...]] = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row: dict[int, int] = {i: a, j: b}
        seeds = {(i, a), (j, b)}
        for f in range(nf):
            if f in row:
                continue

            def gain(v: int, f: int = f) -> int:
                return sum(((g, row[g], f, v) if g < f else (f, v, g, row[g])) in uncovered for g in row)

            def clean(v: int, f: int = f) -> bool:
                levels = {names[g]: factors[names[g]][w] for g, w in {**row, f: v}.items()}
                return not known_bug(levels)

            levels = [v for v in range(sizes[f]) if (f, v) not in refused]
            row[f] = max(levels, key=lambda v: (gain(v), clean(v), -v))
        full = tuple(row[f] for f in range(nf))
        ends = refused & seeds
        uncovered -= {(p, full[p], q, full[q]) for p, q in itertools.combinations(range(nf), 2)
                      if not ends or (p, full[p]) in ends or (q, full[q]) in ends}
        rows.append(full)
    return rows


def cells_of(rows: list[tuple[int, ...]]) -> list[Cell]:
    levels = list(FACTORS.values())
    return [Cell(*(levels[f][v] for f, v in enumerate(r))) for r in rows]


def known_bug(levels: dict[str, Any]) -> bool:
    """Cells the generator must avoid (a known open bug); none today."""
    return False


REFUSING = {"meta": {"uint"}}  # a uint64 column is refused at ingest: the cell ends there
DEFAULT_CELLS = cells_of(pairwise(FACTORS, known_bug, REFUSING))
SLOW_CHEAP = [Cell(mode, meta, "local", "0", interrupt, ranks, shuffle, mu, label)
              for mode, meta, interrupt, ranks, shuffle, mu, label in itertools.product(
                  FACTORS["mode"], FACTORS["meta"], ("none", "rank0"), FACTORS["ranks"], FACTORS["shuffle"],
                  FACTORS["mu"], FACTORS["label"])]
# The costly cells start worker processes, a fresh resume process or the S3 server (~10-25 s each):
# CI runs them for one mode of each kind (uniform, importance with loss feedback, an augmentation);
# M2M_MATRIX_FULL=1 runs every mode.
COSTLY_MODES = FACTORS["mode"] if os.environ.get("M2M_MATRIX_FULL") == "1" else ("plain", "loss", "mixture")
SLOW_COSTLY = [Cell(mode, "float", source, workers, interrupt, 2, "block", "float32", "int")
               for mode, source, workers, interrupt in itertools.product(
                   COSTLY_MODES, FACTORS["source"], FACTORS["workers"], FACTORS["interrupt"])]
SLOW_CELLS = [c for c in dict.fromkeys(SLOW_CHEAP + SLOW_COSTLY) if c not in set(DEFAULT_CELLS)]


def marks(cell: Cell) -> list[Any]:
    """Marks for cells with a known open bug (xfail, not strict); none today."""
    return []


def params(cells: list[Cell], *extra: Any) -> list[Any]:
    return [pytest.param(c, id=c.id, marks=[*marks(c), *extra]) for c in cells]


# ----------------------------------------------------------------------------- shared lakes and references
class Lakes:
    """The module's lakes, built on first use and shared by the cells, and their in-process references."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.built: dict[tuple[str, ...], Built] = {}
        self.others: dict[tuple[str, ...], Built] = {}
        self.refs: dict[tuple[Any, ...], list[list[dict[str, Any]]]] = {}

    def get(self, cell: Cell, server: Any) -> Built:
        key = (cell.source, STORAGE[cell.mu], cell.label, cell.meta)  # "float16-stored" streams the float16 lake
        if key not in self.built:
            name = "-".join(key)
            if cell.source == "s3":
                url = f"{server.bucket('conf')}/lake"
                open_kw = {"storage_options": server.storage_options,
                           "cache_dir": os.path.join(self.root, "cache-" + name)}
                self.built[key] = build_lake(key, url, open_kw)
            else:
                self.built[key] = build_lake(key, os.path.join(self.root, name), {})
        return self.built[key]

    def other(self, cell: Cell) -> Built:
        """The local lake a mix cell mixes the cell's lake with (same kinds of columns, other rows)."""
        key = ("local", STORAGE[cell.mu], cell.label, cell.meta)
        if key not in self.others:
            path = os.path.join(self.root, "other-" + "-".join(key))
            self.others[key] = build_lake(key, path, {}, n=MIX_ROWS, seed=12, chunks=(MIX_ROWS,))
        return self.others[key]

    def reference(self, lake: Any, built: Built, cell: Cell, other: Built | None = None,
                  epoch: int = 0) -> list[list[dict[str, Any]]]:
        """One uninterrupted ``epoch`` per rank, in process, without workers, each by a new loader
        (checked against the contract)."""
        key = (built.key, cell.ranks, cell.shuffle, cell.mode, cell.mix, cell.mu, epoch)
        if key not in self.refs:
            cols = cell_columns(cell.mode, cell.meta)
            mix_with = None if other is None else other.path
            per_rank = []
            for r in range(cell.ranks):
                dl = loader_of(lake, loader_kwargs(cell.mode, cell.shuffle, "0", r, cell.ranks, cols, mix_with,
                                                   cell.mu))
                dl.set_epoch(epoch)
                per_rank.append(epoch_of(dl))
                dl.close()
            check_epoch(per_rank, built, cell.mode, cell.ranks, other, DELIVERED[cell.mu])
            self.refs[key] = per_rank
        return self.refs[key]


@pytest.fixture(scope="module")
def lakes(tmp_path_factory: pytest.TempPathFactory) -> Lakes:
    return Lakes(str(tmp_path_factory.mktemp("matrix")))


def run_cell(cell: Cell, lakes: Lakes, request: pytest.FixtureRequest, workdir: str) -> None:
    server = request.getfixturevalue("conformance_s3") if cell.source == "s3" else None
    built = lakes.get(cell, server)
    if built.ingest_error is not None:  # allowed only for uint64, with one line
        msg = one_line_error(built.ingest_error)
        assert cell.meta == "uint", f"ingest of a {cell.meta} metadata column refused: {msg}"
        return
    other = lakes.other(cell) if cell.mix == "mix" else None
    mix_with = None if other is None else other.path
    with open_lake(built.path, **built.open_kw) as lake:
        ref = lakes.reference(lake, built, cell, other)
        cols = cell_columns(cell.mode, cell.meta)
        kws = [loader_kwargs(cell.mode, cell.shuffle, cell.workers, r, cell.ranks, cols, mix_with, cell.mu)
               for r in range(cell.ranks)]
        if cell.interrupt == "none":
            ref1 = lakes.reference(lake, built, cell, other, epoch=1)
            for r, kw in enumerate(kws):
                dl = loader_of(lake, kw)
                same_batches(epoch_of(dl), ref[r], f"rank {r}, {cell.workers} workers")
                # the same loader's next pass (in line: the chain its last pass started ahead)
                same_batches(epoch_of(dl), ref1[r], f"rank {r}, {cell.workers} workers, epoch 1")
                dl.close()
        elif cell.interrupt == "child":  # each rank saves after K batches; a fresh process resumes them all
            heads, states = [], []
            for r, kw in enumerate(kws):
                dl = loader_of(lake, kw)
                heads.append(take(dl, K_RESUME))
                states.append(dl.state_dict())
                dl.close()
            tails = resume_in_child(built.path, built.open_kw, kws, states, workdir)
            for r in range(cell.ranks):
                same_batches(heads[r] + tails[r], ref[r], f"rank {r}: {K_RESUME} batches + resumed in a fresh process")
        elif cell.interrupt == "kept":  # a peeked pass kept live while a whole epoch runs beside it, then finished
            for r, kw in enumerate(kws):
                dl = loader_of(lake, kw)
                dl.set_epoch(0)
                it = iter(dl)
                head = [snapshot(next(it))]
                same_batches(epoch_of(dl), ref[r], f"rank {r}: a pass beside a kept one")
                same_batches(head + [snapshot(b) for b in it], ref[r], f"rank {r}: the kept pass, finished after")
                dl.close()
        else:  # Lightning DDP: only rank 0's state is saved; every rank resumes at its own next unseen batch
            dl0 = loader_of(lake, kws[0])
            head = take(dl0, K_RESUME)
            state = dl0.state_dict()
            dl0.close()
            same_batches(head, ref[0][:K_RESUME], "rank 0 before the save")
            for r, kw in enumerate(kws):
                dl = loader_of(lake, kw)
                dl.load_state_dict(copy.deepcopy(state))
                same_batches(epoch_of(dl), ref[r][K_RESUME:], f"rank {r} resumed from rank 0's state")
                dl.close()


@pytest.mark.timeout(CELL_TIMEOUT_S)
@pytest.mark.parametrize("cell", params(DEFAULT_CELLS))
def test_cell(cell: Cell, lakes: Lakes, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    run_cell(cell, lakes, request, str(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(CELL_TIMEOUT_S)
@pytest.mark.parametrize("cell", params(SLOW_CELLS))
def test_cell_full_product(cell: Cell, lakes: Lakes, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    run_cell(cell, lakes, request, str(tmp_path))


def test_a_string_column_in_columns_is_refused_naming_to_arrow(lakes: Lakes) -> None:
    built = lakes.get(Cell("plain", "str", "local", "0", "none", 1, "full", "float32", "int"), None)
    with open_lake(built.path) as lake, pytest.raises(M2MError) as info:
        next(iter(lake.export_to_dataloader(batch_size=BS, columns=("id", "meta"))))
    assert "to_arrow" in one_line_error(info.value)


def test_cell_count_and_pairwise_coverage() -> None:
    """The generator covers every pair of levels in cells that run that far (a pair of two other
    factors' levels met only in a cell that ends at a refused ingest is not covered); prints the cell
    counts (``-s``)."""
    levels = list(FACTORS.values())
    names = list(FACTORS)

    def runs(c: Cell) -> bool:
        return not any(getattr(c, n) in refused for n, refused in REFUSING.items())

    for p, q in itertools.combinations(range(len(levels)), 2):
        ending = {names[p], names[q]} & set(REFUSING)
        seen = {(getattr(c, names[p]), getattr(c, names[q])) for c in DEFAULT_CELLS
                if runs(c) or any(getattr(c, n) in REFUSING[n] for n in ending)}
        assert seen == set(itertools.product(levels[p], levels[q])), (names[p], names[q])
    assert cells_of(pairwise(FACTORS, known_bug, REFUSING)) == DEFAULT_CELLS  # deterministic
    product = 1
    for v in levels:
        product *= len(v)
    print(f"\nconformance matrix: {product} cells in the product; default suite {len(DEFAULT_CELLS)} "
          f"(all pairs); slow suite {len(SLOW_CELLS)} more ({len(SLOW_CHEAP)} cheap + {len(SLOW_COSTLY)} costly, "
          f"minus those in the default suite)")
