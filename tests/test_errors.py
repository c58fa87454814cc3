"""The error promise: every error m2m raises on purpose is an `M2MError` that is also the builtin.

Like httpx pinning its public surface, a scan of the source fails on any ``raise ValueError(...)``
(or another bare builtin exception) in the library, so a new error cannot slip past the contract.
"""

from __future__ import annotations

import ast
import builtins
import inspect
from pathlib import Path

import pytest

import m2m.errors as errors

SRC = Path(__file__).resolve().parents[1] / "src" / "m2m"
BUILTIN_EXCEPTIONS = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
# protocol exceptions, not errors: abstract methods, module __getattr__, iteration, exits
ALLOWED = {"NotImplementedError", "AttributeError", "StopIteration", "SystemExit", "KeyboardInterrupt"}


def bare_builtin_raises() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in BUILTIN_EXCEPTIONS - ALLOWED:
                    found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: raise {exc.id}")
    return found


def test_no_bare_builtin_raise_in_the_library():
    found = bare_builtin_raises()
    assert not found, "raise an m2m.errors class (M2MError + the builtin) instead:\n" + "\n".join(found)


def error_classes() -> list[type]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_an_m2m_error_and_a_builtin(cls):
    assert issubclass(cls, errors.M2MError)
    if cls is not errors.M2MError:
        assert any(b.__module__ == "builtins" and b is not Exception for b in cls.__mro__[1:]), cls.__mro__


def test_key_errors_read_as_sentences():
    assert str(errors.UnknownIdError("id 7 is not in lake version 3")) == "id 7 is not in lake version 3"
    with pytest.raises(KeyError):
        raise errors.UnknownColumnError("column 'x' is not in this lake")
