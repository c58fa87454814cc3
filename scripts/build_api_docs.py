"""Build the API reference (docs/api/) from the docstrings of m2m's public names, with pdoc.

    python scripts/build_api_docs.py            # write docs/api/
    python scripts/build_api_docs.py --check    # fail if docs/api/ differs from a fresh build

Warnings are errors, and every public name must have a docstring. CI runs ``--check``.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api"
MODULES = ["m2m", "m2m.errors", "m2m.lake.reader", "m2m.stream.loader", "m2m.geometry.vmf", "m2m.augment.langevin",
           "m2m.ray", "m2m.lightning"]
# m2m documents M2MConfig and StreamOptions; errors lists every class; Snapshot and StreamLoader have their
# modules; m2m.vmf and m2m.langevin are m2m.geometry.vmf and m2m.augment.langevin; m2m.ray holds write_lake;
# m2m.lightning the Lightning callback


def undocumented() -> list[str]:
    import inspect

    import m2m
    from m2m.lake.reader import Snapshot
    from m2m.stream.loader import StreamLoader

    missing = []
    # Snapshot (lake.snapshot) and StreamLoader (what export_to_dataloader returns) are reached
    # through the exported names, so their public members need docstrings too
    public = {name: getattr(m2m, name) for name in m2m.__all__} | {"Snapshot": Snapshot, "StreamLoader": StreamLoader}
    for name, obj in public.items():
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (callable(member) or isinstance(member, property)):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{attr}")
    return missing


def build(out: Path) -> None:
    import pdoc
    import pdoc.render

    pdoc.render.configure(show_source=False, docformat="markdown")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pdoc.pdoc(*MODULES, output_directory=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/api/ instead of writing it")
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        sys.stderr.write("public names without a docstring: " + ", ".join(missing) + "\n")
        return 1
    if not args.check:
        build(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        fresh = sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file())
        old = sorted(p.relative_to(OUT) for p in OUT.rglob("*") if p.is_file()) if OUT.exists() else []
        stale = [str(p) for p in fresh if p not in old or not filecmp.cmp(Path(tmp) / p, OUT / p, shallow=False)]
        stale += [str(p) for p in old if p not in fresh]
    if stale:
        sys.stderr.write("docs/api is stale (run python scripts/build_api_docs.py): " + ", ".join(stale) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
