"""Error types of m2m. Each subclasses a built-in so `except ValueError` / `except OSError` keep working."""

from __future__ import annotations


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
