"""The typed contract: no public callable returns `Any` or leaves its return unannotated.

Public: every name in `m2m.__all__` (functions of the exported modules ``vmf``/``langevin``
included), the public methods and properties of the exported classes, `Snapshot`, `StreamLoader`,
and the CLI entry point.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from typing import Any, Callable, Iterator

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch

import m2m
from m2m.cli.main import main as cli_main
from m2m.lake.reader import Snapshot
from m2m.stream.loader import StreamLoader


def annotation_namespace() -> dict[str, Any]:
    """Names that m2m modules import only under ``TYPE_CHECKING``, so string annotations resolve."""
    for module in ("m2m.lake.compact", "m2m.consolidation.groups", "m2m.stream.options", "m2m.stream.loader"):
        importlib.import_module(module)
    ns: dict[str, Any] = {"pa": pa, "np": np, "npt": npt, "torch": torch}
    for name, mod in list(sys.modules.items()):
        if name.startswith("m2m.") and mod is not None:
            ns.update({k: v for k, v in vars(mod).items() if inspect.isclass(v) and v.__module__.startswith("m2m")})
    return ns


def public_callables() -> Iterator[tuple[str, Callable[..., Any]]]:
    roots: dict[str, Any] = {n: getattr(m2m, n) for n in m2m.__all__}
    roots.update(Snapshot=Snapshot, StreamLoader=StreamLoader, cli_main=cli_main)
    for name, obj in roots.items():
        if inspect.ismodule(obj):
            for attr in getattr(obj, "__all__", [a for a in vars(obj) if not a.startswith("_")]):
                value = getattr(obj, attr)
                if inspect.isfunction(value) and value.__module__ == obj.__name__:
                    yield f"{name}.{attr}", value
        elif inspect.isclass(obj):
            if issubclass(obj, BaseException):
                continue  # the error classes add no methods (tests/test_errors.py)
            for attr, value in vars(obj).items():
                if attr.startswith("_") and attr not in ("__getitem__", "__iter__", "__len__", "__enter__"):
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                elif isinstance(value, property):
                    value = value.fget
                if inspect.isfunction(value):
                    yield f"{name}.{attr}", value
        elif inspect.isfunction(obj) or hasattr(obj, "__wrapped__"):
            yield name, obj


def test_the_walk_sees_the_public_api():
    names = {n for n, _ in public_callables()}
    for expected in ("Lake.export_to_dataloader", "Lake.consolidate", "Lake.to_arrow", "Lake.take", "open_lake",
                     "Snapshot.read_all", "StreamLoader.update_priorities", "vmf.sample", "cli_main"):
        assert expected in names, expected


def test_no_public_callable_returns_any():
    ns = annotation_namespace()
    bad = []
    for name, fn in public_callables():
        target = inspect.unwrap(fn)
        if "return" not in getattr(target, "__annotations__", {}):
            bad.append(f"{name}: no return annotation")
            continue
        ret = typing.get_type_hints(target, localns=ns)["return"]
        if ret is Any:
            bad.append(f"{name} -> Any")
    assert not bad, "\n".join(bad)


def test_the_check_catches_any():
    def returns_any() -> Any:
        return None

    assert typing.get_type_hints(returns_any)["return"] is Any
