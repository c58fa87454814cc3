"""A process that cuts a lake's shard files short the moment they are opened, then runs one read path.

Run as ``python truncate_victim.py LAKE PATH`` (by tests/lake/test_truncate_on_open.py). Once armed
(``M2M_TEST_CUT_DIR`` set, inherited by forked or spawned loader workers), every open of a ``.arrow``
or ``.npy`` file under that folder for reading -- ``os.open``, ``open``, ``pyarrow.memory_map``,
``pyarrow.OSFile``, ``mmap.mmap``; only the two maps with ``M2M_TEST_CUT_DIR_ON=map`` -- truncates
the file to half its size right after the open returns: the
descriptor or mapping the reader holds now refers to a shorter file (what ``cp`` over a shard does).
A memory-mapped read of the lost part kills the process with SIGBUS; the parent checks that the
return code is not negative and that the last line is ``CORRUPT <message>`` (lake reads) or
``ERROR <error class> <message>`` (ingest of a user's file: ``ingest_npy``, ``ingest_arrow``; the
``_mid`` variants cut the input after its first chunk was read instead of at an open).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import mmap
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa

ENV = "M2M_TEST_CUT_DIR"


def _cut(path: Any, how: str = "open") -> None:
    if os.environ.get(ENV + "_ON", "open") == "map" and how != "map":
        return
    where = os.environ.get(ENV)
    if not where or isinstance(path, int):
        return
    try:
        p = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return
    if p.endswith((".arrow", ".npy")) and p.startswith(where) and os.path.isfile(p):
        os.truncate(p, os.path.getsize(p) // 2)


def _install() -> None:
    real_os_open, real_open = os.open, builtins.open
    real_map, real_osfile, real_mmap = pa.memory_map, pa.OSFile, mmap.mmap

    def os_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        fd = real_os_open(path, flags, *args, **kw)
        if not flags & (os.O_WRONLY | os.O_RDWR):
            _cut(path)
        return fd

    def open_(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        f = real_open(file, mode, *args, **kw)
        if not set(mode) & set("wax+"):
            _cut(file)
        return f

    def memory_map(path: Any, mode: str = "r") -> Any:
        m = real_map(path, mode)
        _cut(path, "map")
        return m

    def osfile(path: Any, mode: str = "r", **kw: Any) -> Any:
        f = real_osfile(path, mode, **kw)
        if mode == "r":
            _cut(path)
        return f

    def mmap_(fileno: int, *args: Any, **kw: Any) -> Any:  # numpy's np.load(mmap_mode=...) maps with this
        m = real_mmap(fileno, *args, **kw)
        if fileno >= 0:
            _cut(os.readlink(f"/proc/self/fd/{fileno}"), "map")
        return m

    os.open = os_open  # type: ignore[assignment]
    builtins.open = open_  # type: ignore[assignment]
    io.open = open_  # type: ignore[assignment]
    pa.memory_map = memory_map  # type: ignore[assignment]
    pa.OSFile = osfile  # type: ignore[assignment,misc]
    mmap.mmap = mmap_  # type: ignore[assignment,misc]


def arm(lake: str) -> None:
    os.environ[ENV] = os.path.join(os.path.abspath(lake), "")


def run(lake: str, path: str) -> str:
    """Run read path ``path`` over ``lake`` with cutting armed; returns a one-line outcome."""
    import m2m
    from m2m.api import open_lake
    from m2m.errors import CorruptShardError
    from m2m.stream.loader import make_loader

    if path.startswith("ingest_"):
        return ingest(lake, path)
    if path == "open_lake":
        arm(lake)
        open_lake(lake).close()
        return "OK"
    if path.startswith("cli_"):
        from m2m.cli.main import cli

        real = m2m.open_lake

        def armed_open(*args: Any, **kw: Any) -> Any:  # cut what the command reads, not the footer checks
            handle = real(*args, **kw)
            arm(lake)
            return handle

        m2m.open_lake = armed_open  # type: ignore[assignment]
        args = {"cli_verify": ["verify", lake, "-q"],
                "cli_export": ["export", lake, os.path.join(os.path.dirname(lake), "out.parquet"), "-q"]}[path]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                cli.main(args, prog_name="m2m", standalone_mode=False)
            except SystemExit as exc:
                if exc.code:
                    raise CorruptShardError(err.getvalue().strip().splitlines()[-2 if path == "cli_verify" else -1])
        return "OK"
    lake_h = open_lake(lake)
    snap = lake_h.snapshot
    arm(lake)
    if path.startswith("stream"):
        dl = make_loader(snap, batch_size=64, columns=("embedding", "label", "id"), num_workers=int(path[-1]),
                         warm_bytes=1 << 30, hot_bytes=0)
        n = sum(len(b["id"]) for b in dl)
        return f"OK {n}"
    if path == "verify":
        problems = lake_h.verify()
        if problems:
            raise CorruptShardError(problems[0])
        return "OK"
    if path == "to_arrow":
        return f"OK {lake_h.to_arrow().num_rows}"
    if path == "to_arrow_stream":
        return f"OK {sum(b.num_rows for b in lake_h.to_arrow(stream=True))}"
    if path == "export":
        from m2m.lake.export import export_lake

        export_lake(lake_h.to_arrow(stream=True), os.path.join(os.path.dirname(lake), "out.arrow"), "arrow")
        return "OK"
    if path == "splats":
        return f"OK {len(lake_h.splats()['id'])}"
    if path == "read_all":
        return f"OK {snap.read_all('mu').shape}"
    if path == "gather":
        return f"OK {snap.gather('mu', np.arange(0, snap.num_rows, 7)).shape}"
    if path == "ids":
        return f"OK {len(snap.ids())}"
    raise SystemExit(f"unknown path {path!r}")


def ingest(lake: str, path: str) -> str:
    """Ingest a user's .npy or .arrow file (written next to ``lake``) into a new lake, the input cut
    at the open that reads its rows (``ingest_npy``), or after its first chunk (``ingest_npy_mid``)."""
    import pyarrow.feather as feather

    from m2m import M2MConfig, create_m2m
    from m2m.lake.ingest import open_source

    folder = os.path.join(os.path.dirname(lake), "input")
    os.makedirs(folder, exist_ok=True)
    x = np.random.default_rng(1).standard_normal((3000, 64)).astype(np.float32)
    if "_npy" in path:
        src = os.path.join(folder, "x.npy")
        np.save(src, x)
    else:
        src = os.path.join(folder, "x.arrow")
        table = pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)})
        feather.write_feather(table, src, chunksize=500, compression="uncompressed")
    source = open_source(src, chunk_bytes=64 << 10)
    rows, dim = source.rows(), source.dim()

    def chunks() -> Any:
        for i, c in enumerate(source.chunks()):
            yield c
            if i == 0 and path.endswith("_mid"):
                os.truncate(src, os.path.getsize(src) // 2)

    if not path.endswith("_mid"):
        arm(folder)
    with create_m2m(M2MConfig(path=os.path.join(os.path.dirname(lake), "new"), latent_dim=dim)) as new:
        n = len(new.add_splat_chunks(chunks))
    return f"OK {n} of {rows}"


def main() -> None:
    from m2m.errors import CorruptShardError, M2MError

    _install()
    lake, path = os.path.abspath(sys.argv[1]), sys.argv[2]
    try:
        out = run(lake, path)
    except CorruptShardError as exc:
        out = "CORRUPT " + str(exc).strip().splitlines()[-1]
    except M2MError as exc:
        lines = str(exc).strip().splitlines()
        out = f"ERROR {type(exc).__name__} {lines[-1] if lines else ''}" + (" (MORE THAN ONE LINE)" if len(lines) > 1 else "")
    print(out, flush=True)


if __name__ == "__main__":
    main()
