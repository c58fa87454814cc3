"""Late-bound implementations the lake package calls without importing them.

The lake package knows nothing of the stream or of Ray (it sits below them); `m2m` registers the
wiring (`m2m._wiring`) when the package is imported, and a lake method looks it up by name here.
"""

from __future__ import annotations

from typing import Any, Callable

from m2m.errors import ConfigError

_IMPL: dict[str, Callable[..., Any]] = {}


def register(name: str, fn: Callable[..., Any]) -> None:
    """Make ``fn`` the implementation of ``name`` (e.g. "stream.export", "ray.estimate")."""
    _IMPL[name] = fn


def implementation(name: str) -> Callable[..., Any]:
    """The implementation registered for ``name``; `ConfigError` when none is."""
    try:
        return _IMPL[name]
    except KeyError:
        raise ConfigError(f"no implementation of {name!r} is registered (import m2m registers them)") from None
