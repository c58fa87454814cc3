"""Peers side by side: m2m vs litdata, mosaicml-streaming, Lance, webdataset and the numpy memmap loop.

Every system writes the same rows (``ids`` 0..n-1, unit vectors, an int64 label) with its own writer,
then streams them as torch batches of ``batch`` rows, shuffled, with 0 workers. Phases, each in a fresh
process (``python -m m2m_bench.peers SYSTEM PHASE DATA DIR``, JSON on stdout):

- ``write``: the system's own writer, from the shared ``.npy`` files (seconds).
- ``epoch``: a new loader, one shuffled epoch (rows/s; every id seen exactly once is checked).
- ``epochs3``: one loader, three shuffled epochs (rows/s over the three; the order must change).
- ``resume``: a loader stopped after half an epoch saves its state; a new process restores it and
  streams the rest (seconds to the first batch after restoring; the union must be the epoch).
- ``rank0``/``rank1``: rank r of 2 (torchrun's environment variables), one epoch each, run at once;
  the union over both ranks must be every row exactly once.

Each process imports torch and the system's modules before it times anything (on a loaded machine an
import takes seconds, which is not the loader's speed); a loader's construction is timed (``build_s``).
A system without a phase (no resume API, no rank sharding) reports ``unsupported`` with the reason.
The peers install into their own virtual environment (they pin torchvision/numpy versions that the
project does not take): see benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

BATCH = 256
SEED = 0
SYSTEMS = ("numpy", "m2m", "litdata", "mosaic", "lance", "webdataset")


class Unsupported(Exception):
    """The system has no API for this phase."""


# ------------------------------------------------------------------------------------------- data
def make_data(out: Path, rows: int, dim: int, dtype: str) -> None:
    """``x.npy`` (unit rows, ``dtype``) and ``y.npy`` (int64 labels), seeded, written in chunks."""
    out.mkdir(parents=True, exist_ok=True)
    x = np.lib.format.open_memmap(out / "x.npy", mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))
    rng = np.random.default_rng(SEED)
    for s in range(0, rows, 65_536):
        e = min(rows, s + 65_536)
        v = rng.standard_normal((e - s, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        x[s:e] = v.astype(dtype)
    x.flush()
    np.save(out / "y.npy", rng.integers(0, 100, rows).astype(np.int64))


def load(data: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(data / "x.npy", mmap_mode="r"), np.load(data / "y.npy")


# ------------------------------------------------------------------------------------------- systems
def _torch_batches(x: np.ndarray, y: np.ndarray, order: np.ndarray) -> Iterator[dict[str, Any]]:
    import torch

    for s in range(0, len(order), BATCH):
        idx = np.sort(order[s:s + BATCH])
        yield {"x": torch.from_numpy(np.asarray(x[idx])), "y": torch.from_numpy(y[idx]), "id": torch.from_numpy(idx)}


class NumpyLoop:
    """What a user writes: np.load(mmap_mode='r'), a permutation per epoch, fancy-index gathers."""

    def imports(self) -> None:
        """Import what the loader needs (run before any timing: imports are not the loader's speed)."""

    def write(self, data: Path, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("x.npy", "y.npy"):
            src = np.load(data / name, mmap_mode="r")
            np.save(out / name, np.asarray(src))

    def loader(self, out: Path, rank: int = 0, world: int = 1) -> Any:
        x, y = np.load(out / "x.npy", mmap_mode="r"), np.load(out / "y.npy")

        class Loader:
            epoch = 0
            skip = 0

            def __iter__(self) -> Iterator[dict[str, Any]]:
                order = np.random.default_rng([SEED, self.epoch]).permutation(len(y))[rank::world]
                start, self.skip = self.skip, 0
                self.epoch += 1
                return _torch_batches(x, y, order[start * BATCH:])

        return Loader()

    def state(self, loader: Any, batches: int) -> Any:
        return {"epoch": loader.epoch - 1, "batches": batches}

    def restore(self, loader: Any, state: Any) -> None:
        loader.epoch, loader.skip = state["epoch"], state["batches"]


class M2M:
    def imports(self) -> None:
        import pyarrow.compute  # noqa: F401  (0.8-1.1 s on first use here; opening a lake imports it)

        import m2m.stream.from_lake  # noqa: F401
        import m2m.stream.loader  # noqa: F401

    def write(self, data: Path, out: Path) -> None:
        from m2m import M2MConfig, create_m2m

        x, y = load(data)
        storage = "float16" if x.dtype == np.float16 else "float32"
        with create_m2m(M2MConfig(path=str(out), latent_dim=x.shape[1], storage_dtype=storage)) as lake:
            for s in range(0, len(y), 131_072):
                lake.add_splats(np.asarray(x[s:s + 131_072], dtype=np.float32), labels=y[s:s + 131_072])

    def loader(self, out: Path, rank: int = 0, world: int = 1) -> Any:
        from m2m import open_lake

        lake = open_lake(str(out))
        # "stored": float16 data arrives as float16, as every other system here delivers it
        return lake.export_to_dataloader(batch_size=BATCH, shuffle=True, seed=SEED, columns=("embedding", "label", "id"),
                                         rank=rank, world_size=world, embedding_dtype="stored")

    def state(self, loader: Any, batches: int) -> Any:
        return loader.state_dict()

    def restore(self, loader: Any, state: Any) -> None:
        loader.load_state_dict(state)


class LitData:
    def imports(self) -> None:
        import litdata  # noqa: F401

    def write(self, data: Path, out: Path) -> None:
        from litdata import optimize

        x, y = load(data)
        optimize(fn=_litdata_row, inputs=[(str(data), i) for i in range(len(y))], output_dir=str(out),
                 chunk_bytes="64MB", num_workers=1, mode="overwrite")

    def loader(self, out: Path, rank: int = 0, world: int = 1) -> Any:
        from litdata import StreamingDataLoader, StreamingDataset

        ds = StreamingDataset(str(out), shuffle=True, seed=SEED)
        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=0)

    def state(self, loader: Any, batches: int) -> Any:
        return loader.state_dict()

    def restore(self, loader: Any, state: Any) -> None:
        loader.load_state_dict(state)


_ROWS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _litdata_row(item: tuple[str, int]) -> dict[str, Any]:
    path, i = item
    if path not in _ROWS:
        _ROWS[path] = load(Path(path))
    x, y = _ROWS[path]
    return {"x": np.asarray(x[i]), "y": int(y[i]), "id": i}


def _mosaic() -> Any:
    """``streaming.base`` without ``streaming/__init__``: the package's init imports its vision datasets,
    and torchvision has no wheel here that loads with the CPU torch (``torchvision::nms does not
    exist``); the MDS writer, dataset and loader do not need it."""
    import importlib.util
    import types

    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError("mosaicml-streaming is not installed")
        pkg = types.ModuleType("streaming")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = pkg
    import streaming.base

    return streaming.base


class Mosaic:
    def imports(self) -> None:
        _mosaic()

    def write(self, data: Path, out: Path) -> None:
        MDSWriter = _mosaic().MDSWriter

        x, y = load(data)
        cols = {"x": f"ndarray:{x.dtype.name}:{x.shape[1]}", "y": "int64", "id": "int64"}
        with MDSWriter(out=str(out), columns=cols, size_limit="64mb") as w:
            for i in range(len(y)):
                w.write({"x": np.asarray(x[i]), "y": int(y[i]), "id": i})

    def loader(self, out: Path, rank: int = 0, world: int = 1) -> Any:
        base = _mosaic()
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        StreamingDataLoader, StreamingDataset = base.StreamingDataLoader, base.StreamingDataset
        ds = StreamingDataset(local=str(out), shuffle=True, shuffle_seed=SEED, batch_size=BATCH)
        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=0)

    def state(self, loader: Any, batches: int) -> Any:
        return loader.state_dict()

    def restore(self, loader: Any, state: Any) -> None:
        loader.load_state_dict(state)


class Lance:
    def imports(self) -> None:
        import lance.torch.data  # noqa: F401

    def write(self, data: Path, out: Path) -> None:
        import lance
        import pyarrow as pa

        x, y = load(data)

        def batches() -> Iterator[pa.RecordBatch]:
            for s in range(0, len(y), 65_536):
                v = np.ascontiguousarray(x[s:s + 65_536])
                vec = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), x.shape[1])
                yield pa.record_batch([vec, pa.array(y[s:s + 65_536]), pa.array(np.arange(s, s + len(v)))],
                                      names=["x", "y", "id"])

        schema = pa.schema([("x", pa.list_(pa.from_numpy_dtype(x.dtype), x.shape[1])), ("y", pa.int64()),
                            ("id", pa.int64())])
        lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(out), mode="overwrite")

    def loader(self, out: Path, rank: int = 0, world: int = 1) -> Any:
        from lance.torch.data import LanceDataset

        # Lance's torch dataset reads batches in storage order (its samplers shard fragments or
        # batches, they do not shuffle rows); shuffle=True is not offered for a full scan.
        return LanceDataset(str(out), batch_size=BATCH, rank=rank if world > 1 else None,
                            world_size=world if world > 1 else None, shard_granularity="batch",
                            columns=["x", "y", "id"])

    def state(self, loader: Any, batches: int) -> Any:
        raise Unsupported("lance.torch.data.LanceDataset has no state_dict")

    restore = state


class WebDataset:
    def imports(self) -> None:
        import webdataset  # noqa: F401

    def write(self, data: Path, out: Path) -> None:
        import webdataset as wds

        x, y = load(data)
        out.mkdir(parents=True, exist_ok=True)
        # at least 16 shards: shards are what its shuffle and its rank split permute
        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=64 << 20, maxcount=max(1, -(-len(y) // 16)),
                             verbose=0) as sink:
            for i in range(len(y)):
                sink.write({"__key__": f"{i:09d}", "x.npy": np.asarray(x[i]), "y.cls": int(y[i]), "id.cls": i})

    def loader(self, out: Path, rank: int = 0, world: int = 1) -> Any:
        import torch
        import webdataset as wds

        urls = sorted(str(p) for p in out.glob("shard-*.tar"))
        if world > 1:
            urls = urls[rank::world]
        # the shards are split by rank above; webdataset refuses a distributed environment (RANK and
        # WORLD_SIZE set) unless told how nodes split them: here, already split
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=SEED, empty_check=False,
                             nodesplitter=_already_split).shuffle(1000)
              .decode().to_tuple("x.npy", "y.cls", "id.cls").batched(BATCH))

        def collate(batches: Iterator[Any]) -> Iterator[dict[str, Any]]:
            for xs, ys, ids in batches:
                yield {"x": torch.from_numpy(np.stack(xs)), "y": torch.tensor(ys), "id": torch.tensor(ids)}

        class Loader:
            def __iter__(self) -> Iterator[dict[str, Any]]:
                return collate(iter(ds))

        return Loader()

    def state(self, loader: Any, batches: int) -> Any:
        raise Unsupported("webdataset has no state_dict (resume means re-reading up to the position)")

    restore = state


def phase_cell(d: dict[str, Any] | None, key: str, fmt: str, missing: str = "-") -> str:
    """One phase's figure ``d[key]`` in a results table (``bench_peers.py``, the README's peers table):
    ``missing`` when the phase did not run, "no API", "timed out" or "error" when it could not measure."""
    if not d:
        return missing
    if "unsupported" in d:
        return "no API"
    if "error" in d:
        return "timed out" if "timed out" in d["error"] else "error"
    v = d.get(key)
    return missing if v is None else format(v, fmt)


def _already_split(urls: Any) -> Any:
    return urls


IMPLS: dict[str, Callable[[], Any]] = {"numpy": NumpyLoop, "m2m": M2M, "litdata": LitData, "mosaic": Mosaic,
                                       "lance": Lance, "webdataset": WebDataset}


# ------------------------------------------------------------------------------------------- phases
def _ids(batch: Any) -> np.ndarray:
    b = batch if isinstance(batch, dict) else {"id": batch[2]}
    return np.asarray(b["id"]).reshape(-1)


def _stream(loader: Any, limit: int | None = None) -> tuple[np.ndarray, float, float]:
    """(ids, seconds to the first batch, seconds in all) of one pass, at most ``limit`` batches."""
    t0 = time.perf_counter()
    first = None
    ids = []
    for i, batch in enumerate(loader):
        if first is None:
            first = time.perf_counter() - t0
        ids.append(_ids(batch))
        if limit is not None and i + 1 >= limit:
            break
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), first or 0.0, time.perf_counter() - t0


def run_phase(system: str, phase: str, data: Path, out: Path, state_file: Path | None = None) -> dict[str, Any]:
    import torch  # every system yields torch tensors: its import (seconds on a loaded machine) is not timed

    torch.set_num_threads(1)
    impl = IMPLS[system]()
    impl.imports()
    n = len(np.load(data / "y.npy", mmap_mode="r"))
    if phase == "write":
        t0 = time.perf_counter()
        impl.write(data, out)
        return {"seconds": time.perf_counter() - t0, "rows_per_s": n / (time.perf_counter() - t0)}
    if phase in ("epoch", "epochs3"):
        t0 = time.perf_counter()
        loader = impl.loader(out)
        build = time.perf_counter() - t0
        passes = 1 if phase == "epoch" else 3
        seen, firsts, orders = 0, [], []
        for _ in range(passes):
            ids, first, _ = _stream(loader)
            seen += len(ids)
            firsts.append(first)
            exact = len(ids) == n and np.array_equal(np.sort(ids), np.arange(n))
            orders.append(ids[:BATCH].tolist())
            if not exact:
                return {"error": f"epoch gave {len(ids)} ids for {n} rows (exact coverage failed)"}
        total = time.perf_counter() - t0
        return {"rows_per_s": seen / total, "seconds": total, "build_s": build, "first_batch_s": firsts[0],
                "order_changes": len({tuple(o) for o in orders}) == passes}
    if phase == "resume":
        loader = impl.loader(out)
        half = max(1, n // BATCH // 2)
        head, _, _ = _stream(loader, limit=half)
        try:
            state = impl.state(loader, half)
        except Unsupported as exc:
            return {"unsupported": str(exc)}
        fresh = impl.loader(out)
        t0 = time.perf_counter()
        impl.restore(fresh, state)
        tail, first, total = _stream(fresh)
        union = np.concatenate([head, tail])
        exact = len(union) == n and np.array_equal(np.sort(union), np.arange(n))
        return {"resume_first_batch_s": time.perf_counter() - t0 - total + first, "exact": bool(exact),
                "rows_after_resume": int(len(tail)), "rows_expected": int(n - len(head))}
    if phase.startswith("rank"):
        rank = int(phase[4:])
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"})
        t0 = time.perf_counter()
        ids, _, _ = _stream(impl.loader(out, rank=rank, world=2))
        total = time.perf_counter() - t0
        assert state_file is not None
        np.save(state_file, ids)
        return {"rows": int(len(ids)), "seconds": total, "rows_per_s": len(ids) / total}
    raise ValueError(f"unknown phase {phase!r}")


def main(argv: list[str]) -> int:
    system, phase, data, out = argv[:4]
    extra = Path(argv[4]) if len(argv) > 4 else None
    try:
        res = run_phase(system, phase, Path(data), Path(out), extra)
    except Unsupported as exc:
        res = {"unsupported": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report, not a crash of the bench
        res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
