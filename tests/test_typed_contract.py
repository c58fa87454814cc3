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


USER_CODE = '''
from __future__ import annotations

import numpy as np
import torch
from m2m import M2MConfig, StreamOptions, create_m2m


def to_pair(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return b["embedding"], b["id"]


def run(table: object) -> int:
    with create_m2m(M2MConfig(latent_dim=4)) as lake:
        lake.add_splats(table, labels="lab", metadata=["src"])
        lake.add_splats(table, metadata=True)
        dl = lake.export_to_dataloader(batch_size=2)
        steps: int = len(lake) // dl.batch_size
        opts = StreamOptions(batch_size=2, columns=["embedding", "id"], collate_fn=to_pair,
                             device=torch.device("cpu"))
        return steps + len(lake.export_to_dataloader(options=opts))
'''


def test_documented_user_code_type_checks_strictly(tmp_path):
    # each line is documented and runs; each failed `mypy --strict` (a probing user, 2026-12-08):
    # metadata as a list of names or True, dl.batch_size (torch's is Optional), collate_fn given the whole
    # batch, columns as a list, device as a torch.device
    mypy_api = __import__("pytest").importorskip("mypy.api")
    script = tmp_path / "user.py"
    script.write_text(USER_CODE)
    out, err, status = mypy_api.run(["--strict", "--ignore-missing-imports", "--no-incremental",
                                     "--cache-dir", str(tmp_path / "cache"), str(script)])
    assert status == 0, out + err
