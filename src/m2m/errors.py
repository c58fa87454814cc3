"""Error types of m2m. Each subclasses a built-in so `except ValueError` / `except OSError` keep working."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

__all__ = [
    "M2MError",
    "InvalidEmbeddingError",
    "DimensionMismatchError",
    "ConfigError",
    "CorruptShardError",
    "LakeNotFoundError",
    "LakeLockedError",
    "DeviceUnavailableError",
    "StreamError",
    "ConfigTypeError",
    "LakeClosedError",
    "CommitConflictError",
    "UnknownIdError",
    "UnknownColumnError",
    "StateMismatchError",
    "NumericalError",
    "PathNotFoundError",
    "MissingDependencyError",
    "ObjectStoreError",
    "InvalidManifestError",
    "WriteFailedError",
    "ReadOnlyLakeError",
    "AlreadyExistsError",
    "InternalError",
    "CacheTimeoutError",
    "SignatureError",
    "PositionError",
]  # (the error types; `in_chunk` is a helper of the ingest modules)


class M2MError(Exception):
    """Base class of every error m2m raises on purpose."""


class InvalidEmbeddingError(M2MError, ValueError):
    """Input vectors or their companion columns are malformed (shape, dtype, NaN/Inf, zero rows, ...)."""


class DimensionMismatchError(InvalidEmbeddingError):
    """Vectors (or a reopened lake) do not have the lake's dimension."""


class ConfigError(M2MError, ValueError):
    """An `M2MConfig` field or call argument is out of range."""


class CorruptShardError(M2MError, OSError):
    """A shard or manifest file on disk does not match its recorded checksum or cannot be decoded."""


class LakeNotFoundError(M2MError, FileNotFoundError):
    """No lake exists at the given path."""


class LakeLockedError(M2MError, RuntimeError):
    """Another writer holds the lake's write lock."""


class DeviceUnavailableError(M2MError, RuntimeError):
    """The configured device (e.g. CUDA) is not available on this machine."""


class StreamError(M2MError, RuntimeError):
    """A background stage of the stream failed; the original exception is chained as `__cause__`."""


class ConfigTypeError(ConfigError, TypeError):
    """A call argument has the wrong type (e.g. ``create_m2m`` given something other than an `M2MConfig`)."""


class LakeClosedError(M2MError, RuntimeError):
    """The lake handle was closed; open the lake again to use it."""


class CommitConflictError(LakeLockedError):
    """A commit could not be published because the lake moved underneath it (another writer won):
    it was rebased and retried up to its bound, or the store cannot make commits safe for several
    writers. Nothing of it was published."""


class UnknownIdError(M2MError, KeyError):
    """A splat id is not in the lake version that was asked."""

    def __str__(self) -> str:  # KeyError quotes its message; this error's message is a sentence
        return str(self.args[0]) if self.args else ""


class UnknownColumnError(M2MError, KeyError):
    """A column name is not in the lake."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateMismatchError(M2MError, ValueError):
    """A saved stream or sampler state does not belong to this loader (other seed, rows, batch size, ...)."""


class NumericalError(M2MError, RuntimeError):
    """A numerical routine did not converge within its bound (never expected; please report it)."""


class PathNotFoundError(M2MError, FileNotFoundError):
    """A file or folder the caller named (an ingest source, an export's target folder, a bundled
    data file) does not exist."""


class MissingDependencyError(M2MError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the pip command."""


class ObjectStoreError(M2MError, OSError):
    """A remote object-store request failed (unreachable, timed out, refused) after bounded retries;
    the message names the object and the cause is chained."""


class InvalidManifestError(M2MError, ValueError):
    """A manifest field is missing or out of range (reported as `CorruptShardError` naming the file)."""


class WriteFailedError(M2MError, OSError):
    """Writing a file failed (e.g. the disk is full); the message names the file and that nothing was committed."""


class ReadOnlyLakeError(WriteFailedError, PermissionError):
    """The file system refused a write to the lake (permissions, a read-only mount); nothing was committed."""


class AlreadyExistsError(M2MError, FileExistsError):
    """A file that must be created fresh already exists (a lost race for a version or an id range)."""


class InternalError(M2MError, RuntimeError):
    """An internal invariant failed: a bug in m2m, please report it with the message."""


class CacheTimeoutError(M2MError, TimeoutError):
    """Waiting for the node-local shard cache (another process's download, or room in its budget) timed out."""


class SignatureError(M2MError, PermissionError):
    """A signed lake's manifest is unsigned or wrongly signed, or a signed lake is read without its key."""


class PositionError(M2MError, IndexError):
    """A row position is outside the lake version that was asked (negative or >= its rows)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


#: errno values of this machine's own disk (a full or read-only one under a download's local file):
#: never an object store's answer, never transient
LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@contextlib.contextmanager
def in_chunk(start: int) -> Iterator[None]:
    """Prefix an `InvalidEmbeddingError` raised inside with where its chunk starts in the input (its row
    numbers count within the chunk: chunked ingest); nothing for the first chunk."""
    try:
        yield
    except InvalidEmbeddingError as exc:
        if not start:
            raise
        raise InvalidEmbeddingError(f"in the chunk starting at row {start}: {exc}") from exc


def describe(exc: BaseException) -> str:
    """``Type: message`` of an error wrapped into another's message: an ``OSError``'s repr drops the file
    it names ("OSError(28, 'No space left on device')"), its str keeps it."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
