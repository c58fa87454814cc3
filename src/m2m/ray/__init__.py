"""Ray for the work one machine cannot do: distributed ingest and geometry (``pip install m2m[ray]``).

- `write_lake(ds, path_or_config, ...)`: write a Ray Dataset into a lake, shards written in parallel by
  Ray tasks, committed by the driver as one snapshot.
- ``lake.estimate_kappa(engine="ray")`` and ``lake.consolidate(similarity, engine="ray")`` run their
  IVF list searches as Ray tasks (`m2m.ray.geometry`).

Ray is imported only when one of these is used: ``import m2m`` and ``import m2m.ray`` never load it.
Everything runs on the Ray cluster this process is connected to (``ray.init(...)`` beforehand;
otherwise Ray starts a local one on first use, as for any Ray call). Workers read and write the
lake's files themselves, so the lake must be reachable from every node (a shared filesystem or an
object store URL).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from m2m.errors import MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover
    from m2m.lake.lake import Lake

__all__ = ["require_ray", "write_lake"]

INSTALL_HINT = "pip install 'm2m[ray]'  (or: pip install 'ray[data]')"


def require_ray() -> Any:
    """Import and return the ``ray`` module, or raise ImportError saying how to install it."""
    try:
        import ray
        import ray.data  # write_lake needs Ray Data, not only Ray core
    except ImportError as exc:
        raise MissingDependencyError(f"m2m.ray needs Ray with Ray Data; install it with: {INSTALL_HINT}") from exc
    return ray


CANCEL_WAIT_S = 30.0  # how long a failed or interrupted job waits for its cancelled tasks to end


def gather(ray: Any, refs: list[Any]) -> list[Any]:
    """``ray.get(refs)``; when a task fails (or the driver is interrupted) the others still running are
    cancelled (`cancel_pending`), and a task's own m2m error is raised as itself: Ray's wrapper
    (``RayTaskError(InvalidEmbeddingError)``) prints nine lines of remote traceback before the one line."""
    from m2m.errors import M2MError

    try:
        return list(ray.get(refs))
    except BaseException as exc:
        cancel_pending(ray, refs)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, M2MError):
            raise cause from None
        raise


def cancel_pending(ray: Any, refs: list[Any]) -> None:
    """Cancel the tasks of ``refs`` that have not finished, then wait (at most `CANCEL_WAIT_S`) until
    none runs. Only unfinished ones: ``ray.cancel(force=True)`` of a task that had already failed
    aborted the driver process about one run in two (Ray's "Check failed: ... Tried to complete task
    that was not pending"); with finished tasks left alone, 0 of 12 runs (docs/ray.md)."""
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in pending:
        with contextlib.suppress(Exception):  # finished since: nothing to cancel
            ray.cancel(ref, force=True)
    if pending:
        ray.wait(pending, num_returns=len(pending), timeout=CANCEL_WAIT_S)


def write_lake(ds: Any, path_or_config: Any, vector_column: str = "embedding", label_column: str | None = None,
               metadata_columns: Any = ()) -> Lake:
    """Append a Ray Dataset to a lake as one snapshot; see `m2m.ray.ingest.write_lake`."""
    from m2m.ray.ingest import write_lake as _write_lake

    return _write_lake(ds, path_or_config, vector_column=vector_column, label_column=label_column,
                       metadata_columns=metadata_columns)
