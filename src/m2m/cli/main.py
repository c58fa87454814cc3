"""The `m2m` command line: ingest, export, info, verify, rollback, repair, vacuum, compact, consolidate, kappa,
bench, demo."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import select
import shlex
import signal
import sys
from typing import Any, Callable, TypeVar

import click

from m2m.cli.progress import Bar
from m2m.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\+?\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_MAX_SIZE = (1 << 63) - 1  # sizes are int64 downstream (numpy, Arrow)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'128MB', '64MiB', '1e6' style sizes in bytes (whole numbers exactly; at most 2**63 - 1)."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 128MB or 64MiB")
    number, unit = m.group(1), _UNITS[(m.group(2) or "").lower()]
    if number.isdigit():
        size = int(number) * int(unit)  # exact: no float rounding of long digit strings
    else:
        value = float(number) * unit
        size = int(value) if math.isfinite(value) and value <= _MAX_SIZE else _MAX_SIZE + 1
    if size > _MAX_SIZE:
        raise click.BadParameter(f"{text!r} is too large a size (at most {_MAX_SIZE:,} bytes)")
    return size


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A size option's bytes (`parse_size`): its errors name the option ("Invalid value for '--shard-size'")."""
    return None if value is None else parse_size(value)


def user_errors(fn: F) -> F:
    """Turn the errors a user can cause into one clear line and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from m2m.errors import M2MError

        try:
            return fn(*args, **kwargs)
        except BrokenPipeError as exc:
            if not _stdout_closed():
                click.echo(f"m2m: error: {exc}", err=True)
                sys.exit(1)
            # the reader of our output went away (`m2m info L | head -1`): stop quietly, as tools killed
            # by SIGPIPE do (it printed "m2m: error: [Errno 32] Broken pipe", exit 1), and keep the
            # interpreter's last flush of stdout from raising again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        # not KeyError/IndexError/TypeError: outside M2MError those are bugs and keep their traceback
        except (M2MError, ValueError, OSError) as exc:
            click.echo(f"m2m: error: {exc}", err=True)
            sys.exit(1)
        except MemoryError as exc:  # (numpy's names the allocation); the lake keeps its last version
            click.echo(f"m2m: error: out of memory: {exc or 'an allocation failed'}; nothing was committed "
                       "by this command (lower --chunk-size, --shard-size or the data asked for)", err=True)
            sys.exit(1)

    # functools.wraps keeps fn's signature at runtime; mypy sees the wrapper's (*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _stdout_closed() -> bool:
    """Whether standard output is a pipe or socket whose reader has gone (its write end polls POLLERR)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # (no fileno: captured output; no poll: not POSIX)
        return False


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``key=value`` pairs -> fsspec storage options; values are JSON when they parse as JSON
    (``anon=true``, ``client_kwargs={"region_name": "eu-west-1"}``), else strings; a dotted key
    (``client_kwargs.region_name=eu-west-1``) sets a nested entry."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--storage-option")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise click.BadParameter(f"{key!r}: {part!r} is already a value", param_hint="--storage-option")
        node[leaf] = value
    return out


def storage_option(fn: F) -> F:
    """The repeatable ``--storage-option key=value`` of every command that takes a lake."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        callback=lambda ctx, param, value: parse_storage_options(value),
                        help="fsspec option of a remote lake (repeatable), e.g. endpoint_url=http://host:9000, "
                             "key=..., secret=..., client_kwargs.region_name=eu-west-1.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="m2m")
def cli(verbose: int) -> None:
    """m2m: an embedding training data lake for PyTorch."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("--lake", "lake_dir", required=True, help="Lake directory or fsspec URL (created if missing).")
@click.option("--column", default=None, help="Embedding column (Parquet/Arrow); default: the first list column.")
@click.option("--label-column", default=None, help="Label column (Parquet/Arrow).")
@click.option("--meta-column", "meta_columns", multiple=True,
              help="Keep this input column as metadata (repeatable; partition keys of a hive directory too).")
@click.option("--all-columns", is_flag=True, help="Keep every input column other than the vectors/labels.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="Storage dtype of a new lake (default float32; an existing lake keeps its own).")
@click.option("--shard-size", default="128MiB", show_default=True, callback=_size, help="Target shard file size.")
@click.option("--chunk-size", default="4MiB", show_default=True, callback=_size,
              help="Input read per step (bounds memory with the shard size).")
@click.option("--estimate-kappa/--no-estimate-kappa", default=False, help="Estimate kappa after ingest.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@storage_option
@user_errors
def ingest(src: str, lake_dir: str, column: str | None, label_column: str | None, meta_columns: tuple[str, ...],
           all_columns: bool, dtype: str, shard_size: int, chunk_size: int, estimate_kappa: bool,
           quiet: bool, storage_options: dict[str, Any] | None) -> None:
    """Ingest SRC (.npy, .parquet, .arrow/.feather, a directory of them, or a hive-partitioned directory)
    into a lake, in one commit, reading SRC once in bounded memory."""
    import time

    from m2m import M2MConfig, create_m2m
    from m2m.errors import ConfigError, InvalidEmbeddingError
    from m2m.lake.ingest import discarding_new_lake, naming_write_errors, new_local_folder, open_source

    inside = _lake_inside(src, lake_dir)
    if inside:  # (the second ingest read the lake's own shards as a partitioned dataset, then blamed them)
        raise ConfigError(f"the lake {lake_dir} is inside SRC {src}: an ingest would read the lake's own "
                          "files as input; put the lake outside SRC")
    new_folder = new_local_folder(lake_dir)
    existing = _existing(lake_dir, storage_options)
    if dtype is None:  # (an existing float16 lake was refused: the float32 default asked for another dtype)
        dtype = existing.get("storage_dtype", "float32")
    source = open_source(src, column=column, label_column=label_column, meta_columns=meta_columns,
                         all_columns=all_columns, chunk_bytes=chunk_size)
    total = source.rows()
    if total == 0:
        raise InvalidEmbeddingError(f"{src} holds no rows; nothing to ingest")
    # (an existing lake keeps the k it was estimated with: --estimate-kappa re-estimated it at the default)
    cfg = M2MConfig(path=lake_dir, latent_dim=source.dim(), storage_dtype=dtype, shard_bytes=shard_size,
                    storage_options=storage_options, **({"knn_k": existing["knn_k"]} if "knn_k" in existing else {}))
    t0 = time.perf_counter()
    with create_m2m(cfg) as lake:
        with discarding_new_lake(lake, new_folder), Bar(total, "ingest", quiet=quiet) as bar, \
                naming_write_errors(lake.path):
            ids = lake.add_splat_chunks(source.chunks, progress=bar)
        seconds = time.perf_counter() - t0
        click.echo(f"ingested {len(ids):,} rows x {lake.dim} into {lake.path} (version {lake.version}) "
                   f"in {seconds:.2f} s ({len(ids) / seconds:,.0f} rows/s)")
        if estimate_kappa:
            from m2m.errors import describe

            try:
                with Bar(len(lake), "kappa", quiet=quiet) as bar:
                    lake.estimate_kappa(progress=bar)
            except BaseException as exc:
                # the rows are committed: say so, whatever stopped the kappa step (out of memory, Ctrl-C; a
                # script that retried the failed command ingested every row twice)
                why = "was interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {describe(exc)}"
                click.echo(f"m2m: error: the ingest is committed (version {lake.version}, {len(ids):,} rows); "
                           f"estimating kappa {why} (retry with `m2m kappa {shlex.quote(lake.path)}`, with the same "
                           "--storage-option values)", err=True)
                if not isinstance(exc, Exception):
                    raise
                sys.exit(1)
            click.echo(f"estimated kappa (version {lake.version})")


def _existing(lake_dir: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage dtype and estimated ``knn_k`` of the lake at ``lake_dir`` ({} when there is none yet)."""
    from m2m import open_lake
    from m2m.errors import LakeNotFoundError

    try:
        with open_lake(lake_dir, storage_options=storage_options) as lake:  # (it adopts the stored k)
            return {"storage_dtype": str(lake.manifest.dtype), "knn_k": lake.config.knn_k}
    except LakeNotFoundError:
        return {}


def _lake_dirs() -> tuple[str, ...]:
    """The folders of m2m's own at a lake's top."""
    from m2m.lake.commit import RESERVATIONS_DIR
    from m2m.lake.manifest import DATA_DIR, MANIFEST_DIR, SEGMENT_DIR

    return MANIFEST_DIR, DATA_DIR, SEGMENT_DIR, RESERVATIONS_DIR


def _lake_inside(src: str, lake_dir: str) -> bool:
    """Whether the local folder ``lake_dir`` is ``src`` or lies inside the directory ``src``."""
    from m2m.lake.fs import local_path

    local = local_path(lake_dir)
    if local is None or not os.path.isdir(src):
        return False
    here, lake = os.path.realpath(src), os.path.realpath(local)
    return lake == here or lake.startswith(here.rstrip(os.sep) + os.sep)


@cli.command(name="export")
@click.argument("lake_dir")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["parquet", "arrow"]), default=None,
              help="parquet (zstd, one row group per shard) or arrow (an uncompressed Arrow IPC file); "
                   "default: from OUT's suffix (.parquet/.pq, .arrow/.feather/.ipc).")
@click.option("--float32", "float32", is_flag=True,
              help="Write float16 mu and float16 metadata columns as float32 (DuckDB cannot read float16).")
@click.option("--version", "version", type=int, default=None, help="Lake version (default: the latest).")
@click.option("--columns", default=None, help="Comma-separated columns (default: all, sidecars joined).")
@click.option("--original", is_flag=True,
              help="Write each row's original vector (mu times mu_norm, float32) instead of the unit vector.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@storage_option
@user_errors
def export_cmd(lake_dir: str, out: str, fmt: str | None, float32: bool, version: int | None, columns: str | None,
               original: bool, force: bool, quiet: bool, storage_options: dict[str, Any] | None) -> None:
    """Write one version of a lake to OUT as a single Parquet or Arrow file (pyarrow, Polars, DuckDB, HF datasets)."""
    import os

    from m2m import open_lake
    from m2m.errors import AlreadyExistsError, ConfigError
    from m2m.lake.export import export_lake
    from m2m.lake.fs import local_path

    if not out.strip() or out.endswith(os.sep):  # ("" was written beside the current folder, then failed)
        raise ConfigError(f"OUT {out!r} names no file: give the path of the file to write")
    given, out = out, local_path(out) or ""   # (a URL was joined to the current folder: ".../s3:/bucket")
    if not out.strip():
        raise ConfigError(f"OUT {given!r} is not a local file: m2m export writes one (for an object store, "
                          "export to a local file and upload it)")
    if fmt is None:  # a Parquet file named out.arrow would fail every Arrow IPC reader
        suffix = os.path.splitext(out)[1].lower()
        fmt = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}.get(suffix)
        if fmt is None:
            raise ConfigError(f"cannot tell the format from {out!r}: name it .parquet or .arrow, or pass --format")
    if os.path.lexists(out) and not force:  # before opening the lake: nothing is read for a refused export
        raise AlreadyExistsError(f"{out} already exists; pass --force to replace it")
    local = local_path(lake_dir)
    if local is not None:  # a file written among the lake's own would be read (or vacuumed) as the lake's
        root, where = os.path.realpath(local), os.path.realpath(os.path.dirname(os.path.abspath(out)))
        dirs = _lake_dirs()
        inside = [d for d in dirs if os.path.commonpath([where, os.path.join(root, d)]) == os.path.join(root, d)]
        if not inside and where == root and os.path.basename(out) in (*dirs, "_lock"):
            inside = [os.path.basename(out)]  # (a file named _segments blocked the lake's format 3 for good)
        if inside:
            raise ConfigError(f"{out} is inside the lake's own {inside[0]}: export to a path outside the lake's "
                              "m2m folders")
    cols = None if columns is None else [c.strip() for c in columns.split(",") if c.strip()]
    with open_lake(lake_dir, storage_options=storage_options) as lake:
        reader = lake.to_arrow(version=version, columns=cols, stream=True, float32=float32, original=original)
        rows = lake.manifest.rows if version is None else None
        with Bar(rows, "export", quiet=quiet) as bar:
            r = export_lake(reader, out, fmt, progress=bar, overwrite=force)
        v = lake.version if version is None else version
    click.echo(f"exported {r['rows']:,} rows of version {v} to {_printable(r['path'])} ({fmt}, {r['bytes']:,} bytes)")


def _printable(path: str) -> str:
    """``path`` with the bytes of a name in another encoding shown as ``\\xfd`` (a strict UTF-8 output
    refused the line after the file was written)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@cli.command()
@click.argument("lake_dir")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@storage_option
@user_errors
def info(lake_dir: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Summarise a lake: rows, dim, dtype, bytes, shards, version, kappa/alpha, labels."""
    from m2m import open_lake

    with open_lake(lake_dir, storage_options=storage_options) as lake:
        d = lake.info()
    if as_json:
        click.echo(json.dumps(d, indent=1, default=str))
        return
    for key in ("path", "rows", "dim", "dtype", "bytes", "shards"):
        click.echo(f"{key:>10}: {_fmt(d[key])}")
    click.echo(f"{'version':>10}: {d['version']} ({d['versions']} version(s) on disk)")
    k, a = d["kappa"], d["alpha"]
    if not k["estimated"]:
        click.echo(f"{'kappa':>10}: not estimated (m2m kappa {shlex.quote(lake_dir)})")
    else:
        click.echo(f"{'kappa':>10}: estimated for {_fmt(k['estimated'])} rows; min {_fmt(k['min'])}, "
                   f"mean {_fmt(k['mean'])}, max {_fmt(k['max'])}")
    click.echo(f"{'alpha':>10}: total {_fmt(a['total'])}, min {_fmt(a['min'])}, max {_fmt(a['max'])}")
    labels = d["labels"]
    if labels is None:
        click.echo(f"{'labels':>10}: none")
    else:
        classes = labels.get("classes")
        click.echo(f"{'labels':>10}: {labels['type']}" + ("" if classes is None else f", {classes:,} classes"))
    if d["metadata"]:
        click.echo(f"{'metadata':>10}: " + ", ".join(f"{name} ({kind})" for name, kind in d["metadata"].items()))


@cli.command()
@click.argument("lake_dir")
@click.option("--version", "version", type=int, default=None, help="Version to check (default: the latest).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@storage_option
@user_errors
def verify(lake_dir: str, version: int | None, quiet: bool, storage_options: dict[str, Any] | None) -> None:
    """Check a version: its manifest checksum and layout, and every file's size, CRC32, Arrow footer
    and ids against it; exit 1 on any problem."""
    from m2m import open_lake

    with open_lake(lake_dir, version=version, storage_options=storage_options) as lake:
        files = lake.manifest.files()
        with Bar(len(files), "verify", unit="files", quiet=quiet) as bar:
            problems = lake.verify(progress=bar)
        if problems:
            for p in problems:
                click.echo(f"CORRUPT: {p}", err=True)
            click.echo(f"m2m: error: {len(problems)} of {len(files)} files are corrupt in version {lake.version}",
                       err=True)
            sys.exit(1)
        click.echo(f"ok: {len(files)} files, {len(lake):,} rows, version {lake.version}")


@cli.command()
@click.argument("lake_dir")
@click.option("--to", "to", type=int, required=True, help="The version to restore.")
@storage_option
@user_errors
def rollback(lake_dir: str, to: int, storage_options: dict[str, Any] | None) -> None:
    """Commit a copy of version TO as the newest version (nothing is deleted)."""
    from m2m.lake.recovery import rollback as do_rollback

    m = do_rollback(lake_dir, to, storage_options=storage_options)
    if m.version == to:
        click.echo(f"version {to} is already the newest; nothing written")
    else:
        click.echo(f"version {m.version} = version {to} ({m.rows:,} rows)")


@cli.command()
@click.argument("lake_dir")
@click.option("--dry-run", is_flag=True, help="Report only; move nothing.")
@storage_option
@user_errors
def repair(lake_dir: str, dry_run: bool, storage_options: dict[str, Any] | None) -> None:
    """Move unreadable newest manifests aside (renamed *.corrupt-<time>) so the newest readable
    version is the head again; report every unreadable manifest."""
    from m2m.lake.recovery import repair as do_repair

    r = do_repair(lake_dir, dry_run=dry_run, storage_options=storage_options)
    verb = "would move" if dry_run else "moved"
    for v, aside, problem in r["moved"]:
        click.echo(f"{verb} unreadable version {v} aside to {aside}: {problem}")
    for v, problem in r["unreadable"]:
        click.echo(f"older version {v} is unreadable (left in place): {problem}")
    if not r["moved"] and not r["unreadable"]:
        click.echo(f"ok: every manifest is readable; head is version {r['head']}")
    elif r["head"] == r["restored"]:
        click.echo(f"head is version {r['head']}")
    else:
        floor = r.get("id_floor")
        ids = "" if floor is None else f"; it hands out ids from {floor:,} on (the versions moved aside had handed " \
                                       "out those below)"
        click.echo(f"head {'would be' if dry_run else 'is'} version {r['head']}, a copy of version {r['restored']} "
                   f"(no version number moved aside is used again{ids})")


@cli.command()
@click.argument("lake_dir")
@click.option("--keep", default=1, show_default=True, help="Versions to keep.")
@click.option("--allow-symlinked-dirs", is_flag=True,
              help="Vacuum the target of a symlinked _data/_manifests folder (refused otherwise).")
@click.option("--min-age", "min_age_s", type=float, default=None,
              help="Keep unreferenced files younger than this many seconds (a commit in flight may be about to "
                   "publish them). Default: 3600 on an object store, 0 locally.")
@storage_option
@user_errors
def vacuum(lake_dir: str, keep: int, allow_symlinked_dirs: bool, min_age_s: float | None,
           storage_options: dict[str, Any] | None) -> None:
    """Delete old versions and unreferenced m2m files (also those of interrupted commits); other files stay."""
    from m2m import open_lake

    with open_lake(lake_dir, storage_options=storage_options) as lake:
        r = lake.vacuum(keep=keep, min_age_s=min_age_s, allow_symlinked_dirs=allow_symlinked_dirs)
    click.echo(f"removed {r['versions_removed']} versions and {r['files_removed']} files")


@cli.command()
@click.argument("lake_dir")
@click.option("--target", "target", default=None, callback=_size, help="Target shard size, e.g. 128MB (default: 128MiB).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@storage_option
@user_errors
def compact(lake_dir: str, target: int | None, quiet: bool, storage_options: dict[str, Any] | None) -> None:
    """Merge small shards (and their sidecars) into shards of the target size, as a new version.

    Ids, row order and values are kept; readers of older versions are not disturbed (their files
    stay until `m2m vacuum`); appends by other writers may run meanwhile."""
    from m2m import open_lake

    with open_lake(lake_dir, storage_options=storage_options) as lake:
        with Bar(len(lake), "compact", quiet=quiet) as bar:
            r = lake.compact(target_bytes=target, progress=bar)
        if r.version is None:
            why = f" ({r.runs_dropped} runs lost to concurrent commits)" if r.runs_dropped else ""
            click.echo(f"nothing to compact{why}: {r.shards_before:,} shards; version {lake.version}")
        else:
            click.echo(f"{r.shards_before:,} -> {r.shards_after:,} shards ({r.shards_merged:,} merged into "
                       f"{r.shards_written:,}, {r.rows_rewritten:,} rows, {r.bytes_written / 1e6:.1f} MB written) "
                       f"in {r.seconds:.2f} s; version {r.version}")


@cli.command()
@click.argument("lake_dir")
@click.option("--similarity", default=0.95, show_default=True, type=float, help="Cosine of near-duplicates.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@storage_option
@user_errors
def consolidate(lake_dir: str, similarity: float, quiet: bool,
                storage_options: dict[str, Any] | None) -> None:
    """Merge near-duplicate splats (same label) into heavier splats, as a new version."""
    from m2m import open_lake

    with open_lake(lake_dir, storage_options=storage_options) as lake:
        with Bar(len(lake), "consolidate", quiet=quiet) as bar:
            report = lake.consolidate(similarity=similarity, progress=bar)
        click.echo(f"{report.rows_before:,} -> {report.rows_after:,} rows ({report.groups_merged:,} groups merged) "
                   f"in {report.seconds:.2f} s; version {lake.version}")


@cli.command()
@click.argument("lake_dir")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--threads", type=int, default=None,
              help="kNN threads (default: every usable core; 1 when other work needs the cores).")
@storage_option
@user_errors
def kappa(lake_dir: str, quiet: bool, threads: int | None, storage_options: dict[str, Any] | None) -> None:
    """(Re)estimate every splat's kappa from its nearest neighbours."""
    from m2m import open_lake

    with open_lake(lake_dir, storage_options=storage_options) as lake:
        with Bar(len(lake), "kappa", quiet=quiet) as bar:
            lake.estimate_kappa(progress=bar, threads=threads)
        click.echo(f"kappa estimated for {len(lake):,} splats; version {lake.version}")


@cli.command()
@click.option("--quick", is_flag=True, help="Small sizes (79-91 s measured: docs/benchmarks.md).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results on stdout.")
@click.option("--only", default=None,
              help="Comma-separated subset: ingest,ingest_parquet,stream,stream_memmap,first_epoch,quickstart,"
                   "langevin,knn,consolidate,ray_engine (skipped without Ray).")
@user_errors
def bench(quick: bool, as_json: bool, only: str | None) -> None:
    """Run the benchmark suite: ours | what a user would write | physical limit."""
    run_suite = _bench_module("suite").run_suite
    run_suite(quick=quick, as_json=as_json, only=None if only is None else only.split(","))


@cli.command()
@click.option("--rows", default=10_000, show_default=True, help="Rows resampled from the 1,797 digits images.")
@click.option("--dim", default=640, show_default=True, help="Projected dimension.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where m2m-demo-report.png is written.")
@click.option("--lake", "lake_dir", default=None, help="Keep the lake here (default: a temporary lake).")
@click.option("--seed", default=0, show_default=True)
@user_errors
def demo(rows: int, dim: int, epochs: int, device: str, out_dir: str, lake_dir: str | None, seed: int) -> None:
    """The main job on real data (sklearn digits): ingest, kappa, consolidate, SOC + Langevin stream, train."""
    run_demo = _bench_module("demo").run_demo
    run_demo(rows=rows, dim=dim, epochs=epochs, device=device, out_dir=out_dir, lake_dir=lake_dir, seed=seed)


def _bench_module(name: str) -> Any:
    """``m2m_bench.<name>``: the benchmarks and the demo live outside the library, in ./benchmarks."""
    import importlib

    try:
        return importlib.import_module(f"m2m_bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("m2m_bench", f"m2m_bench.{name}"):
            raise
        raise ConfigError("m2m demo and m2m bench need the m2m-bench package: "
                          "pip install -e ./benchmarks (from a source checkout of m2m)") from None


def main() -> None:
    """Console-script entry point: click's usage errors (an unknown option, a missing argument, a value
    of the wrong type) become one ``m2m: error:`` line too, exit status 2 as click gives them."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())  # (click >= 8.2: `m2m` alone shows the help)
    try:
        rc = cli.main(prog_name="m2m", standalone_mode=False)
    except no_args as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "m2m"
        message = " ".join(exc.format_message().split())
        click.echo(f"m2m: error: {message} (see {where} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"m2m: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort as exc:  # Ctrl-C (exit 130, as a shell reports SIGINT) or end of input at a prompt (1)
        click.echo("m2m: aborted", err=True)
        sys.exit(128 + signal.SIGINT if isinstance(exc.__cause__, KeyboardInterrupt) else 1)
    except SystemExit as exc:
        # click's own EPIPE handling (`m2m --help | true`: the help, `--version`) exits 1 after wrapping
        # sys.stdout; a command's output into a gone reader exits 141 quietly (`user_errors`): so do these
        if exc.code == 1 and type(sys.stdout).__name__ == "_PacifyFlushWrapper" and _stdout_closed():
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
