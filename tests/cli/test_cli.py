"""The m2m command line: ingest from every format, info, verify, consolidate, kappa; clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m2m import M2MConfig, create_m2m, open_lake
from m2m.cli.main import cli, parse_size


@pytest.fixture
def data(rng):
    return rng.standard_normal((500, 24)).astype(np.float32), np.arange(500) % 4


def _table(x, y):
    return pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
                     "cls": pa.array(y)})


def run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    return result


def test_ingest_npy_info_verify(tmp_path, data):
    x, _ = data
    np.save(tmp_path / "x.npy", x)
    r = run("ingest", tmp_path / "x.npy", "--lake", tmp_path / "lake", "-q")
    assert r.exit_code == 0, r.output
    assert "ingested 500 rows x 24" in r.output
    r = run("info", tmp_path / "lake", "--json")
    assert json.loads(r.output)["rows"] == 500
    r = run("verify", tmp_path / "lake", "-q")
    assert r.exit_code == 0 and "ok: 1 files" in r.output


@pytest.mark.parametrize("fmt", ["parquet", "feather", "dir"])
def test_ingest_tables_with_labels(tmp_path, data, fmt):
    x, y = data
    t = _table(x, y)
    if fmt == "parquet":
        src = tmp_path / "x.parquet"
        pq.write_table(t, src)
    elif fmt == "feather":
        src = tmp_path / "x.feather"
        feather.write_feather(t, src)
    else:
        src = tmp_path / "parts"
        src.mkdir()
        pq.write_table(t.slice(0, 200), src / "a.parquet")
        pq.write_table(t.slice(200), src / "b.parquet")
    r = run("ingest", src, "--lake", tmp_path / "lake", "--label-column", "cls", "--dtype", "float16", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "lake") as lake:
        s = lake.splats()
        assert lake.version == 1 and lake.manifest.dtype == "float16"  # one commit for the whole source
        assert s["label"].tolist() == y.tolist()
        np.testing.assert_allclose(s["mu"], x / np.linalg.norm(x, axis=1, keepdims=True), atol=2e-3)


def test_bad_row_in_a_later_chunk_writes_nothing(tmp_path, data):
    x, _ = data
    x = np.concatenate([x] * 300)  # 150k rows: several ingest chunks
    x[140_000, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    r = run("ingest", tmp_path / "x.npy", "--lake", tmp_path / "lake", "-q")
    assert r.exit_code == 1
    assert "row 140000" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "lake").exists()  # the empty lake this first ingest made is removed
    (tmp_path / "lake").mkdir()  # into a folder the user made: the folder is kept, empty as it was
    r = run("ingest", tmp_path / "x.npy", "--lake", tmp_path / "lake", "-q")
    assert r.exit_code == 1
    assert os.listdir(tmp_path / "lake") == []  # (the empty lake left there blocked a corrected retry)


def test_verify_reports_corruption_and_exits_non_zero(tmp_path, data):
    x, _ = data
    np.save(tmp_path / "x.npy", x)
    run("ingest", tmp_path / "x.npy", "--lake", tmp_path / "lake", "-q")
    shard = next((tmp_path / "lake" / "_data").iterdir())
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    shard.write_bytes(bytes(raw))
    r = run("verify", tmp_path / "lake", "-q")
    assert r.exit_code == 1 and "CORRUPT" in r.output and shard.name in r.output


def test_consolidate_and_kappa_commands(tmp_path, data):
    x, y = data
    x = np.concatenate([x, x[:50] + 1e-4])
    y = np.concatenate([y, y[:50]])
    pq.write_table(_table(x.astype(np.float32), y), tmp_path / "x.parquet")
    run("ingest", tmp_path / "x.parquet", "--lake", tmp_path / "lake", "--label-column", "cls", "-q")
    r = run("kappa", tmp_path / "lake", "-q", "--threads", "0")
    assert r.exit_code == 1 and "threads must be an int >= 1" in r.output
    r = run("kappa", tmp_path / "lake", "-q", "--threads", "1")
    assert r.exit_code == 0 and "kappa estimated for 550" in r.output
    with open_lake(str(tmp_path / "lake")) as lake:
        one_thread = np.asarray(lake.snapshot.read_all("kappa"))
    r = run("kappa", tmp_path / "lake", "-q")                  # default: every usable core
    assert r.exit_code == 0 and "kappa estimated for 550" in r.output
    with open_lake(str(tmp_path / "lake")) as lake:            # exact path: the thread count changes nothing
        np.testing.assert_array_equal(np.asarray(lake.snapshot.read_all("kappa")), one_thread)
    r = run("consolidate", tmp_path / "lake", "--similarity", "0.999", "-q")
    assert r.exit_code == 0, r.output
    assert "550 -> 500 rows (50 groups merged)" in r.output


@pytest.mark.parametrize("args,needle", [
    (["info", "/nonexistent/lake"], "no m2m lake"),
    (["verify", "/nonexistent/lake"], "no m2m lake"),
    (["ingest", "README.md", "--lake", "/tmp/never"], "unsupported file type"),
])
def test_user_errors_are_one_line_without_traceback(args, needle):
    r = run(*args)
    assert r.exit_code == 1
    assert needle in r.output and "Traceback" not in r.output


def test_a_file_where_a_lake_would_be_is_named_in_one_line_and_left_alone(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    junk = tmp_path / "notes.txt"
    junk.write_text("precious")
    half = tmp_path / "half"
    half.mkdir()
    (half / "_manifests").write_text("not a folder")
    for args, needle in [(["info", junk], f"{junk} is a file, not a folder"),
                         (["verify", junk], f"{junk} is a file, not a folder"),
                         (["info", half], f"{half}/_manifests is a file, not a folder"),
                         (["ingest", tmp_path / "x.npy", "--lake", junk], "a file is in the way"),
                         (["ingest", tmp_path / "x.npy", "--lake", half], "a file is in the way")]:
        r = run(*args)
        assert r.exit_code == 1 and needle in r.output, (args, r.output)
        assert "Errno" not in r.output and len(r.output.strip().splitlines()) == 1
    assert junk.read_text() == "precious" and (half / "_manifests").read_text() == "not a folder"


def test_wrong_column_is_named(tmp_path, data):
    x, y = data
    pq.write_table(_table(x, y), tmp_path / "x.parquet")
    r = run("ingest", tmp_path / "x.parquet", "--lake", tmp_path / "lake", "--column", "nope")
    assert r.exit_code == 1 and "no column 'nope'" in r.output


def test_parse_size():
    assert parse_size("128MiB") == 128 << 20 and parse_size("1.5GB") == 1_500_000_000 and parse_size("4096") == 4096


def test_vacuum_min_age_keeps_young_unreferenced_files(tmp_path, data):
    x, _ = data
    np.save(tmp_path / "x.npy", x)
    assert run("ingest", tmp_path / "x.npy", "--lake", tmp_path / "lake", "-q").exit_code == 0
    young = tmp_path / "lake" / "_data" / ("ab" * 16 + ".arrow")
    young.write_bytes(b"x")
    r = run("vacuum", tmp_path / "lake", "--min-age", 3600)
    assert r.exit_code == 0 and young.exists(), r.output
    r = run("vacuum", tmp_path / "lake", "--min-age", -5)
    assert r.exit_code != 0 and "min_age_s must be a finite number" in r.output and young.exists()
    r = run("vacuum", tmp_path / "lake")
    assert r.exit_code == 0 and "and 1 files" in r.output and not young.exists(), r.output


@pytest.mark.parametrize("where", ["_manifests/v0000000002.json", "_data/x.arrow", "_lock"])
def test_export_into_the_lakes_own_folders_is_refused(tmp_path, data, where):
    # observed: `m2m export LAKE LAKE/_manifests/v0000000002.json --format arrow` wrote the export as the
    # next version's manifest: the lake's head became unreadable
    x, _ = data
    np.save(tmp_path / "x.npy", x)
    assert run("ingest", tmp_path / "x.npy", "--lake", tmp_path / "lake", "-q").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "lake").rglob("*"))
    r = run("export", tmp_path / "lake", tmp_path / "lake" / where, "--format", "arrow", "--force")
    assert r.exit_code != 0 and "inside the lake's own" in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "lake").rglob("*")) == before
    assert run("verify", tmp_path / "lake", "-q").exit_code == 0


@pytest.mark.parametrize("where", ["inside", "same", "symlinked"])
def test_ingest_refuses_a_lake_inside_its_source_folder(tmp_path, where):
    # observed: the second `m2m ingest SRC --lake SRC/lake` read the lake's own shards as a partitioned
    # dataset and blamed them ("a partitioned directory must hold one table format")
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "x.npy", np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32))
    lake = {"inside": src / "lake", "same": src, "symlinked": tmp_path / "link" / "lake"}[where]
    if where == "symlinked":
        (tmp_path / "link").symlink_to(src)
    result = CliRunner().invoke(cli, ["ingest", str(src), "--lake", str(lake), "-q"])
    assert result.exit_code == 1 and "is inside SRC" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in src.iterdir()) == ["x.npy"]  # nothing written


def test_ingest_refuses_one_column_as_vectors_and_labels(tmp_path):
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(40, np.float32)), 4)
    pq.write_table(pa.table({"vec": vec}), tmp_path / "a.parquet")
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "a.parquet"), "--lake", str(tmp_path / "lake"),
                                      "--column", "vec", "--label-column", "vec", "-q"])
    assert result.exit_code == 1 and "cannot be both the vectors and the labels" in result.output


def _npy(path, rows=20, dim=8, nan_row=None):
    x = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    if nan_row is not None:
        x[nan_row] = np.nan
    np.save(path, x)
    return path


@pytest.mark.parametrize("target", ["file-url-manifests", "segments-file", "ids-file", "empty"])
def test_export_refuses_targets_inside_the_lake_or_naming_no_file(tmp_path, target):
    # observed: a file:// lake URL skipped the check (an export into _manifests made the lake unreadable);
    # a file named _segments at the lake's top was written (every later format-3 commit failed: File
    # exists); OUT "" was written beside the current folder, then failed with a raw error
    lake = tmp_path / "lake"
    assert CliRunner().invoke(cli, ["ingest", str(_npy(tmp_path / "x.npy")), "--lake", str(lake), "-q"]).exit_code == 0
    before = sorted(p.name for p in lake.rglob("*"))
    lake_arg, out = {"file-url-manifests": (f"file://{lake}", str(lake / "_manifests" / "v0000000009.json")),
                     "segments-file": (str(lake), str(lake / "_segments")),
                     "ids-file": (str(lake), str(lake / "_ids")), "empty": (str(lake), "")}[target]
    result = CliRunner().invoke(cli, ["export", lake_arg, out, "--format", "arrow"])
    assert result.exit_code == 1 and ("is inside the lake's own" in result.output or "names no file" in result.output)
    assert sorted(p.name for p in lake.rglob("*")) == before and not list(tmp_path.glob(".tmp-*"))


def test_ingest_keeps_an_existing_lakes_dtype_and_a_failed_first_ingest_leaves_no_lake(tmp_path):
    # observed: appending to a float16 lake without --dtype was refused (the float32 default asked for
    # another dtype); a first ingest that failed left an empty lake that refused the fixed retry
    # ("lake has latent_dim 8, the config asks for 16")
    run = CliRunner().invoke
    lake = tmp_path / "lake"
    assert run(cli, ["ingest", str(_npy(tmp_path / "a.npy")), "--lake", str(lake), "--dtype", "float16", "-q"]).exit_code == 0
    result = run(cli, ["ingest", str(_npy(tmp_path / "b.npy")), "--lake", str(lake), "-q"])
    assert result.exit_code == 0, result.output
    assert open_lake(str(lake)).manifest.dtype == "float16" and len(open_lake(str(lake))) == 40
    new = tmp_path / "new"
    result = run(cli, ["ingest", str(_npy(tmp_path / "bad.npy", dim=8, nan_row=5)), "--lake", str(new), "-q"])
    assert result.exit_code == 1 and "NaN" in result.output and not new.exists()
    result = run(cli, ["ingest", str(_npy(tmp_path / "good.npy", dim=16)), "--lake", str(new), "-q"])
    assert result.exit_code == 0 and open_lake(str(new)).dim == 16
    existing = tmp_path / "existing"
    existing.mkdir()  # a folder the user made: kept (only a folder this command created goes)
    run(cli, ["ingest", str(tmp_path / "bad.npy"), "--lake", str(existing), "-q"])
    assert existing.exists()


def test_repair_dry_run_takes_no_lock(tmp_path, monkeypatch):
    # observed: `m2m repair --dry-run` ("report only") took the write lock and failed on a read-only lake
    lake = tmp_path / "lake"
    assert CliRunner().invoke(cli, ["ingest", str(_npy(tmp_path / "x.npy")), "--lake", str(lake), "-q"]).exit_code == 0
    import m2m.lake.lake as lake_module

    def no_lock(fs, *args, **kwargs):
        raise PermissionError(30, "Read-only file system", str(lake / "_lock"))

    monkeypatch.setattr(lake_module, "write_lock", no_lock)
    result = CliRunner().invoke(cli, ["repair", str(lake), "--dry-run"])
    assert result.exit_code == 0 and "head is version 1" in result.output
    assert CliRunner().invoke(cli, ["repair", str(lake)]).exit_code == 1  # a real repair still locks


@pytest.mark.parametrize("how", [["repair"], ["rollback", "--to", "2"]])
def test_recovery_past_a_head_cut_short_never_hands_out_its_ids(tmp_path, how):
    # observed: with the head's version file cut in half (no JSON left to state its next_id), repair and
    # rollback --to 2 handed out its ids again: the next append got 20..22, ids of acknowledged rows.
    # The head's appends left shard files stamped with next_id; a planted file of another lake counts not
    lake = tmp_path / "lake"
    with create_m2m(M2MConfig(path=str(lake), latent_dim=4)) as lk:
        for k in range(3):
            lost = lk.add_splats(np.random.default_rng(k).standard_normal((10, 4)))
    with create_m2m(M2MConfig(path=str(tmp_path / "other"), latent_dim=4)) as other:
        other.add_splats(np.ones((100, 4)))
        planted = [f.path for f in other.manifest.files()]
    shutil.copy(tmp_path / "other" / planted[0], lake / "_data" / ("f" * 32 + ".arrow"))
    head = lake / "_manifests" / "v0000000003.json"
    head.write_bytes(head.read_bytes()[: len(head.read_bytes()) // 2])
    r = CliRunner().invoke(cli, [how[0], str(lake), *how[1:]])
    assert r.exit_code == 0, r.output
    with open_lake(str(lake)) as reopened:
        assert len(reopened) == 20 and reopened.add_splats(np.ones((2, 4))).tolist() == [30, 31]
    assert lost.tolist() == list(range(20, 30))


def test_repair_never_hands_out_the_ids_of_a_version_it_moves_aside(tmp_path):
    # observed: repair moved aside a head whose version file was intact (a file of it broken) and the next
    # append reused that version's ids, which rollback never does
    lake = tmp_path / "lake"
    for seed in (0, 1):
        assert CliRunner().invoke(cli, ["ingest", str(_npy(tmp_path / f"x{seed}.npy")), "--lake", str(lake),
                                        "-q"]).exit_code == 0
    head = json.loads((lake / "_manifests" / "v0000000002.json").read_text())
    assert head["next_id"] == 40
    head["shards"][-1]["rows"] += 1  # version 2's file stays JSON with its next_id, but fails its checksum
    (lake / "_manifests" / "v0000000002.json").write_text(json.dumps(head))
    r = CliRunner().invoke(cli, ["repair", str(lake)])
    assert r.exit_code == 0 and "hands out ids from 40 on" in r.output, r.output
    with open_lake(str(lake)) as reopened:
        assert len(reopened) == 20 and reopened.add_splats(np.ones((2, 8)))[0] == 40


def test_export_takes_a_file_url_and_refuses_an_object_store_url_in_one_line(tmp_path):
    # observed: OUT as a URL was joined to the current folder: "m2m: error: /cwd/s3:/bucket does not exist
    # (the folder of s3://bucket/out.parquet)"; file:// likewise ("/cwd/file:/tmp/...")
    lake = tmp_path / "lake"
    with create_m2m(M2MConfig(path=str(lake), latent_dim=4)) as lk:
        lk.add_splats(np.eye(4))
    out = tmp_path / "out.parquet"
    r = CliRunner().invoke(cli, ["export", str(lake), f"file://{out}", "-q"])
    assert r.exit_code == 0 and pq.read_table(out).num_rows == 4, r.output
    r = CliRunner().invoke(cli, ["export", str(lake), f"file://localhost{tmp_path / 'two.parquet'}", "-q"])
    assert r.exit_code == 0 and pq.read_table(tmp_path / "two.parquet").num_rows == 4, r.output
    r = CliRunner().invoke(cli, ["export", str(lake), "s3://bucket/out.parquet", "-q"])
    assert r.exit_code == 1 and "OUT 's3://bucket/out.parquet' is not a local file" in r.output, r.output


def test_a_reader_that_closes_the_pipe_early_gets_no_error_line(tmp_path):
    # observed: `m2m info LAKE | head -1` printed "m2m: error: [Errno 32] Broken pipe" and exited 1
    import subprocess
    import sys

    lake = tmp_path / "lake"
    with create_m2m(M2MConfig(path=str(lake), latent_dim=4)) as lk:
        lk.add_splats(np.eye(4))
    read, write = os.pipe()
    os.close(read)             # the reader is gone before the command writes anything
    try:
        r = subprocess.run([sys.executable, "-m", "m2m.cli.main", "info", str(lake)], stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == "", r.stderr


def test_ingest_says_its_rows_are_committed_when_only_the_kappa_step_fails(tmp_path, monkeypatch):
    # observed: with the disk full during --estimate-kappa, `m2m ingest` exited 1 with only the ENOSPC line
    # after its rows were committed: a script that retried the failed command ingested every row twice
    import errno

    from m2m.lake.lake import Lake

    for k, problem in enumerate([OSError(errno.ENOSPC, "No space left on device"), MemoryError("kNN")]):
        def fail(self, *args, _problem=problem, **kwargs):
            raise _problem

        monkeypatch.setattr(Lake, "estimate_kappa", fail)
        lake = tmp_path / f"lake{k}"
        r = CliRunner().invoke(cli, ["ingest", str(_npy(tmp_path / "x.npy")), "--lake", str(lake),
                                     "--estimate-kappa", "-q"])
        said = "OSError: [Errno 28] No space left on device" if k == 0 else "MemoryError: kNN"
        assert r.exit_code == 1 and "the ingest is committed (version 1, 20 rows); estimating kappa failed: " \
            f"{said} (retry with `m2m kappa" in r.output, r.output
        assert "nothing was committed" not in r.output   # (a MemoryError said so, though the rows were)
        with open_lake(str(lake)) as reopened:
            assert len(reopened) == 20


def test_a_npy_file_of_format_3_is_ingested(tmp_path):
    # observed: a valid .npy of format version 3.0 (np.lib.format.write_array(..., version=(3, 0))) raised a raw
    # "AttributeError: module 'numpy.lib.format' has no attribute '_read_array_header'" (numpy 2.4)
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    with open(tmp_path / "v3.npy", "wb") as fh:
        np.lib.format.write_array(fh, x, version=(3, 0))
    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "v3.npy"), "--lake", str(tmp_path / "lake"), "-q"])
    assert r.exit_code == 0, r.output
    with open_lake(str(tmp_path / "lake")) as lake:
        mu = lake.splats()["mu"]
    np.testing.assert_allclose(mu, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)


def test_ctrl_c_while_the_command_loads_is_one_line_not_a_traceback():
    # the console script imports torch and pyarrow before any command runs; a Ctrl-C there printed a
    # traceback (a clumsy user, 2026-12-07). Here the interrupt is raised by the import of the command module.
    import importlib.metadata

    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "m2m"]
    assert ep.value == "m2m.cli:run"
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'm2m.cli.main':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.argv = ['m2m', '--version']\n"
            "from m2m.cli import run\n"
            "run()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr == "m2m: aborted\n", (p.returncode, p.stderr)


def test_ctrl_c_during_a_command_is_one_line_and_exit_130(tmp_path):
    code = ("import sys, m2m.cli.main as cm\n"
            "def boom(*a, **k):\n"
            "    raise KeyboardInterrupt\n"
            "cm.open_lake_for_cli = boom\n"
            "import m2m\n"
            "m2m.open_lake = boom\n"
            f"sys.argv = ['m2m', 'info', {str(tmp_path)!r}]\n"
            "cm.main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr.strip().splitlines()[-1] == "m2m: aborted", (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
