"""The one resume model of a stream: `StreamState` (what ``dl.state_dict()`` returns) and `Cursor`
(where a loader's passes start).

A state is rank-agnostic. Every rank yields the same number of batches per epoch, so "each rank
has yielded ``batches_yielded`` batches of epoch ``epoch``" is a global position: the state saved
by any rank (Lightning saves rank 0's only) resumes every rank at its own next unseen batch. A
state names the rows it was taken on (the lake's identity and snapshot version, the row count);
`check` refuses, with one line, a state from another lake, a position outside the epoch, or a
mid-epoch state from another snapshot or world size (a state at an epoch boundary resumes on a
grown lake, or another world size, at the next epoch).
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, Generator, Protocol, runtime_checkable

from m2m._validate import check_int
from m2m.errors import StateMismatchError, StreamError

STATE_VERSION = 2

#: Fields that must match whatever the position (they fix which batches an epoch has). ``shuffle`` is
#: the layout a state's epoch used; between states that record what was asked (``shuffle_asked``), only
#: shuffling on or off is compared at every position and the layout only mid-epoch: ``shuffle_mode="auto"``
#: picks the layout from the lake's size against ``warm_bytes``, and a lake that grew (or gained geometry
#: columns) since an epoch-boundary state may get the other one for its next epoch.
ALWAYS = ("seed", "batch_size", "drop_last", "shuffle")
#: Fields that must match to resume mid-epoch (the layout of this epoch's order, its importance plan).
#: ``geometry`` is compared where both loaders computed geometry in memory (`check`).
MID_EPOCH = ("num_rows", "shuffle", "block_rows", "window_blocks", "shard_affinity", "affinity_group_blocks",
             "importance", "snapshot")
#: Of those, the ones only a block shuffle's order depends on.
BLOCK_ONLY = ("block_rows", "window_blocks")


def importance_name(value: Any) -> str:
    """The importance mode a state records for ``importance_sampling=value``: "none" (False/None),
    "kappa" (True), else the mode or column name as given."""
    return "none" if value is False or value is None else "kappa" if value is True else str(value)


@runtime_checkable
class StatefulSampler(Protocol):
    """A plan sampler whose own state (e.g. loss priorities) travels in the stream's state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class StreamState:
    """Where a stream is: ``batches_yielded`` batches (per rank) of ``epoch``, and what fixes the order."""

    epoch: int
    batches_yielded: int
    epoch_pinned: bool
    seed: int
    world_size: int
    batch_size: int
    drop_last: bool
    num_rows: int
    shuffle: str
    block_rows: int
    window_blocks: int
    shard_affinity: bool = False
    affinity_group_blocks: int = 0
    epoch_batches: int | None = None  # batches per rank of the saved epoch (where it ends)
    lake: str | None = None
    version: int | str | None = None
    rank: int = 0  # the rank that saved it (informational: any rank's state resumes every rank)
    sampler: dict[str, Any] | None = None
    importance: str | None = None  # importance_name of the saved loader (None: a state from before it)
    shuffle_asked: str | None = None  # "none" or the shuffle_mode asked ("auto", ...); None: a state from before it
    geometry: str | None = None  # in-memory geometry's key (`from_lake.Geometry.key`), "none"; None: an older state
    snapshot: str | None = None  # the pinned versions with their commit times (`Snapshot.snapshot_key`); None: unknown
    pinned_epoch: int | None = None  # the epoch `set_epoch` pinned (set while a pass ran: not that pass's); None: older

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state_version"] = STATE_VERSION
        out["samples_seen"] = self.batches_yielded * self.batch_size * self.world_size  # all ranks together
        if self.sampler is None:
            del out["sampler"]
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> "StreamState":
        if not isinstance(doc, dict):
            raise StateMismatchError(f"a stream state is a dict (dl.state_dict()), got {type(doc).__name__}")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in doc]
        if missing:
            raise StateMismatchError(f"stream state lacks {missing}")
        saved_by = doc.get("state_version", STATE_VERSION)
        if not isinstance(saved_by, numbers.Integral) or isinstance(saved_by, bool) or int(saved_by) > STATE_VERSION:
            raise StateMismatchError(f"stream state has state_version={saved_by!r}; this m2m reads states up to "
                                     f"version {STATE_VERSION} (saved by a newer m2m?)")
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in doc.items() if k in known}
        try:
            kept["epoch"] = check_int(kept["epoch"], "epoch", 0)
            kept["batches_yielded"] = check_int(kept["batches_yielded"], "batches_yielded", 0)
            if kept.get("pinned_epoch") is not None:
                kept["pinned_epoch"] = check_int(kept["pinned_epoch"], "pinned_epoch", 0)
        except ValueError as exc:
            raise StateMismatchError(f"stream state: {exc}") from None
        return cls(**kept)


def check(saved: StreamState, mine: StreamState, num_batches: Callable[[int], int]) -> tuple[int, int]:
    """Where a loader described by ``mine`` resumes ``saved``: ``(epoch, first batch)``, or one-line
    `StateMismatchError`. ``num_batches(epoch)``: batches per rank of ``epoch`` in this loader."""
    if saved.lake is not None and mine.lake is not None and saved.lake != mine.lake:
        raise StateMismatchError(f"stream state is from lake {saved.lake}, this loader streams lake {mine.lake}")
    asked = saved.shuffle_asked is not None and mine.shuffle_asked is not None
    always = [k for k in ALWAYS if not (asked and k == "shuffle")]
    diff = {k: (getattr(saved, k), getattr(mine, k)) for k in always if getattr(saved, k) != getattr(mine, k)}
    if asked and (saved.shuffle_asked == "none") != (mine.shuffle_asked == "none"):
        diff["shuffle"] = (saved.shuffle_asked != "none", mine.shuffle_asked != "none")
    if diff:
        raise StateMismatchError("stream state does not match this loader (saved vs current): "
                                 + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    epoch, yielded = saved.epoch, saved.batches_yielded
    comparable = saved.num_rows == mine.num_rows and saved.version == mine.version \
        and saved.world_size == mine.world_size
    # this loader's own count where the rows are the same (a saved epoch_batches of 100 let an edited position
    # 30 of a 25-batch epoch through: the pass yielded nothing)
    total = num_batches(epoch) if comparable else saved.epoch_batches
    if total is not None and yielded > total:
        raise StateMismatchError(f"stream state position {yielded} is outside epoch {epoch}, which has "
                                 f"{total} batches per rank")
    if yielded == 0 or yielded == total:  # an epoch boundary: the next epoch is planned on these rows
        return (epoch if yielded == 0 or saved.epoch_pinned else epoch + 1), 0
    same_rows = saved.num_rows == mine.num_rows and saved.version == mine.version
    if saved.world_size != mine.world_size:
        raise StateMismatchError(f"stream state was saved mid-epoch with world_size={saved.world_size}, this loader "
                                 f"has world_size={mine.world_size}: resume with {saved.world_size} ranks, or from "
                                 "a state saved at an epoch boundary")
    if not same_rows:
        if saved.version is None and mine.version is not None:  # the rows cannot be told to be the same ones
            raise StateMismatchError(f"stream state was saved mid-epoch without a snapshot version (an older or "
                                     f"edited state); this loader streams version {mine.version}: a mid-epoch "
                                     "state resumes its own snapshot only (a state saved at an epoch boundary "
                                     "resumes any)")
        if saved.version == mine.version:
            raise StateMismatchError(f"stream state was saved mid-epoch over {saved.num_rows} rows, this loader "
                                     f"streams {mine.num_rows}")
        raise StateMismatchError(f"stream state was saved mid-epoch on snapshot version {saved.version} "
                                 f"({saved.num_rows} rows), this loader streams version {mine.version} "
                                 f"({mine.num_rows} rows): a mid-epoch state resumes the same snapshot only")
    diff = {k: (getattr(saved, k), getattr(mine, k)) for k in MID_EPOCH if getattr(saved, k) != getattr(mine, k)
            and getattr(saved, k) is not None and (k not in BLOCK_ONLY or saved.shuffle == "block")}
    computed = (saved.geometry or "none") != "none" and (mine.geometry or "none") != "none"
    if computed and saved.geometry != mine.geometry:  # both planned or drew on geometry computed in memory
        diff["geometry"] = (saved.geometry, mine.geometry)
    if saved.geometry is None and "float16" in (mine.geometry or ""):
        raise StateMismatchError("stream state was saved mid-epoch by an m2m before 2026-12-07 over geometry "
                                 "computed in memory from float16 rows, which are now renormalised first (other "
                                 "kappa): resume from a state saved at an epoch boundary, or after "
                                 "lake.estimate_kappa() from a new one")
    if diff:
        raise StateMismatchError("mid-epoch stream state does not match this loader's order (saved vs current): "
                                 + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    return epoch, yielded


def pinned_after(saved: StreamState, epoch: int) -> int | None:
    """The epoch pinned once a resume at ``epoch`` is done: the saved loader's (a `set_epoch` while its pass
    ran pins another epoch than that pass's: the resumed loader read that pass's epoch again), or for a
    state from before `StreamState.pinned_epoch`, ``epoch``."""
    if not saved.epoch_pinned:
        return None
    return saved.pinned_epoch if saved.pinned_epoch is not None else epoch


class Cursor:
    """Which epoch and batch each pass of one loader starts at (the epoch contract of `StreamLoader`).

    The epoch of a pass is chosen when it yields its first batch: a loaded state (once), else the
    epoch pinned by `set_epoch` (every pass), else the epoch after that of the last pass that started.
    The position saved is that of the pass that yielded last (one loader for Lightning's training and
    validation: the training pass again once it yields after an in-epoch validation pass; a kept
    iterator that stopped early does not hold it). ``elsewhere()`` lists live passes at another
    position, where a saved state may not be the one meant.
    """

    def __init__(self, epoch: int = 0) -> None:
        self.next_epoch = epoch
        self.pinned: int | None = None
        self.resume: tuple[int, int] | None = None
        self.pos: tuple[int, int] | None = None  # (epoch, batches yielded) of the pass that yielded last
        self.passes = 0
        self._live: dict[int, tuple[int, int]] = {}  # token of each live pass -> (epoch, batches yielded)

    @property
    def epoch(self) -> int:
        """The epoch the next pass will read."""
        if self.resume is not None:
            return self.resume[0]
        return self.next_epoch if self.pinned is None else self.pinned

    def set_epoch(self, epoch: int) -> None:
        self.pinned = epoch
        if self.resume is not None and self.resume[0] != epoch:
            self.resume = None

    def begin_pass(self) -> tuple[int, int, int]:
        """(epoch, first batch, pass token) of a pass about to yield its first batch."""
        if self.resume is not None:
            epoch, start = self.resume
            self.resume = None
        elif self.pinned is not None:
            epoch, start = self.pinned, 0
        else:
            epoch, start = self.next_epoch, 0
        self.next_epoch = epoch + 1
        self.passes += 1
        self.pos = (epoch, start)
        self._live[self.passes] = (epoch, start)
        return epoch, start, self.passes

    def advance(self, token: int, epoch: int, yielded: int) -> None:
        if token in self._live:  # (not a pass from before a restore)
            self._live[token] = (epoch, yielded)
            self.pos = (epoch, yielded)

    def end_pass(self, token: int) -> None:
        """A pass is over (exhausted, closed or collected)."""
        self._live.pop(token, None)

    def elsewhere(self, num_batches: Callable[[int], int]) -> list[tuple[int, int]]:
        """(epoch, batches yielded) of the live passes with batches left that are not where the saved
        position is (a pass that yielded all its batches but was not asked for more has none left)."""
        here = self.position(num_batches)
        return [(e, y) for e, y in list(self._live.values()) if y < num_batches(e) and (e, y) != here]

    def __getstate__(self) -> dict[str, Any]:
        """A copy has no live passes (they stay with the loader that runs them)."""
        return {**self.__dict__, "_live": {}}

    def position(self, num_batches: Callable[[int], int]) -> tuple[int, int]:
        """(epoch, batches yielded) to save: a finished pass is the start of the epoch after it."""
        if self.resume is not None:
            return self.resume
        if self.pos is None:
            return self.epoch, 0
        epoch, yielded = self.pos
        if yielded >= num_batches(epoch):
            return (epoch + 1 if self.pinned is None else self.pinned), 0
        return epoch, yielded

    def restore(self, epoch: int, start: int, pinned: int | None) -> None:
        self.pinned = pinned
        self.resume = (epoch, start)
        self.pos = None
        self.next_epoch = epoch
        self._live.clear()  # passes from before the restore no longer move the position


class Pass:
    """The iterator of one pass (what ``iter(loader)`` returns): its generator's batches, and once a
    ``next`` raised (Ctrl-C in a notebook, a damaged shard), one line on every later ``next``. A
    generator that raised is finished, and ``next`` on it raises StopIteration: a loop going on over
    the same iterator (a caught KeyboardInterrupt) saw a short epoch end as if it were whole."""

    __slots__ = ("_gen", "_yielded", "_failed", "__weakref__")

    def __init__(self, gen: Generator[Any, None, None]) -> None:
        self._gen, self._yielded, self._failed = gen, 0, ""

    def __iter__(self) -> "Pass":
        return self

    def __next__(self) -> Any:
        if self._failed:
            raise StreamError(f"this pass stopped with {self._failed} after {self._yielded} batches and yields no "
                              "more; to resume its epoch at the next unseen batch, call "
                              "loader.load_state_dict(loader.state_dict()) and iterate the loader again")
        try:
            batch = next(self._gen)
        except StopIteration:
            raise
        except BaseException as exc:
            if inspect.getgeneratorstate(self._gen) == inspect.GEN_CLOSED:  # it ended the generator (a
                # second thread's concurrent next did not)
                self._failed = type(exc).__name__
            raise
        self._yielded += 1
        return batch

    def close(self) -> None:
        """Stop the pass (its workers and threads); a later ``next`` raises StopIteration."""
        self._gen.close()
