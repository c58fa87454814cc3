"""What probing users found on the afternoon of 2026-12-07 (each failed on the code before):
``M2MConfig(auto_consolidate="false")`` turned merging on (strings were taken as truthy);
``lake.splats([1.5])`` returned row 1; wrong-type arguments raised plain ValueErrors;
``open_lake(path, config={...})`` and an uncreatable lake path gave raw Python errors; an unknown or
uninstalled fsspec protocol was a 64-line traceback in the CLI; a float16 lake's export re-ingested into
a float32 lake moved its vectors by up to 2e-4; click usage errors were three lines."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import m2m
from m2m import M2MConfig, StreamOptions, create_m2m, open_lake
from m2m.errors import (
    ConfigError,
    ConfigTypeError,
    InvalidEmbeddingError,
    M2MError,
    MissingDependencyError,
    UnknownIdError,
    WriteFailedError,
)

D = 8


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m2m.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("field", ["auto_consolidate", "verify_reads"])
@pytest.mark.parametrize("value", ["false", "no", "", 2, 1.0, None])
def test_config_flags_refuse_what_is_not_a_bool(field, value):
    with pytest.raises(ConfigTypeError, match=f"M2MConfig.{field} must be True or False"):
        M2MConfig(latent_dim=D, **{field: value})


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (np.True_, True), (0, False), (1, True)])
def test_config_flags_take_bools_and_store_a_bool(value, expected):
    cfg = M2MConfig(latent_dim=D, auto_consolidate=value)
    assert cfg.auto_consolidate is expected


def test_a_string_false_no_longer_merges_rows(tmp_path):
    with pytest.raises(ConfigTypeError):
        M2MConfig(path=tmp_path / "l", latent_dim=D, auto_consolidate="false", soc_threshold=0.05)
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D, auto_consolidate=False)) as lk:
        base = np.random.default_rng(0).standard_normal(D)
        lk.add_splats(base + 1e-4 * np.random.default_rng(1).standard_normal((200, D)))
        assert len(lk) == 200


@pytest.mark.parametrize("kw", [dict(latent_dim="640"), dict(path=5), dict(seed=1.5), dict(langevin_dt="0.1"),
                                dict(storage_dtype=16), dict(storage_options=[("a", 1)]), dict(cache_bytes="1G")])
def test_config_wrong_types_are_type_errors(kw):
    with pytest.raises(ConfigTypeError) as info:
        M2MConfig(**({"latent_dim": D} | kw))
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)  # both, for old callers


@pytest.mark.parametrize("kw", [dict(latent_dim=1), dict(seed=-1), dict(langevin_dt=2.0), dict(storage_dtype="int8")])
def test_config_values_out_of_range_stay_value_errors(kw):
    with pytest.raises(ConfigError) as info:
        M2MConfig(**({"latent_dim": D} | kw))
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize("kw", [dict(batch_size="8"), dict(shard_affinity="x"), dict(shuffle="no"), dict(shuffle=2),
                                dict(drop_last=-1), dict(pin_memory=np.int64(5)),
                                dict(shuffle_mode=3), dict(columns="label"), dict(timeout="1")])
def test_stream_options_wrong_types_are_type_errors(kw):
    with pytest.raises(ConfigTypeError):
        StreamOptions(**kw)


def test_stream_options_keep_bool_flags_and_unknown_keywords_are_type_errors():
    assert StreamOptions(shard_affinity=np.False_).shard_affinity is False
    # the flags' rule is the config's: bool, numpy bool, or the ints 0 and 1
    assert StreamOptions(shuffle=0).shuffle is False and StreamOptions(drop_last=np.int8(1)).drop_last is True
    assert StreamOptions(shard_affinity=None).shard_affinity is None
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((10, D)))
        with pytest.raises(ConfigTypeError, match="unknown stream option"):
            lk.export_to_dataloader(bach_size=3)
        with pytest.raises(ConfigTypeError, match="options must be a StreamOptions"):
            lk.export_to_dataloader(options={"batch_size": 3})


@pytest.mark.parametrize("ids", [[1.5], np.array([2.9]), ["3"], [[1, 2]], ["a"], [2**64]])
def test_splats_refuses_ids_that_are_not_integers(ids):
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((10, D)))
        assert list(lk.splats([1, 2])["id"]) == [1, 2]
        assert list(lk.splats(np.uint64(3))["id"]) == [3]
        with pytest.raises(UnknownIdError):
            lk.splats(ids)


def test_open_lake_names_wrong_arguments(tmp_path):
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D)) as lk:
        lk.add_splats(np.ones((2, D)))
    for call, match in [(lambda: open_lake(tmp_path / "l", config={"latent_dim": D}), "takes an M2MConfig, got dict"),
                        (lambda: open_lake(tmp_path / "l", "cfg"), "takes an M2MConfig, got str"),
                        (lambda: open_lake(5), "takes a lake path or URL, got 5"),
                        (lambda: open_lake(None), "got None"),
                        (lambda: open_lake(tmp_path / "l", bogus=1), r"unknown setting\(s\) \['bogus'\]")]:
        with pytest.raises(ConfigTypeError, match=match):
            call()


def test_a_lake_path_that_cannot_be_made_is_one_error(tmp_path):
    blocked = tmp_path / "ro"
    blocked.mkdir()
    blocked.chmod(0o500)
    try:
        path = Path("/proc/m2m-lake") if Path("/proc").is_dir() else blocked / "x" / "lake"
        with pytest.raises(WriteFailedError, match="cannot create a lake at"):
            create_m2m(M2MConfig(path=path, latent_dim=D))
    finally:
        blocked.chmod(0o700)


def test_unknown_or_uninstalled_filesystems_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="'nosuchproto' is not a filesystem fsspec knows"):
        open_lake("nosuchproto://b/lake")
    r = _run("info", "nosuchproto://b/lake")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="'gs' filesystem needs a package"):
            open_lake("gs://b/lake")
        r = _run("verify", "gs://b/lake")
        assert r.returncode == 1 and r.stderr.startswith("m2m: error: lake gs://b/lake") and "Traceback" not in r.stderr


def test_float16_export_into_a_float32_lake_keeps_the_original_vectors(tmp_path):
    rng = np.random.default_rng(0)
    with create_m2m(M2MConfig(path=tmp_path / "src", latent_dim=D, storage_dtype="float16")) as lk:
        lk.add_splats(rng.standard_normal((100, D)) * 5)
        want = np.stack(lk.to_arrow(original=True).column("mu").to_numpy(zero_copy_only=False))
        want_mu = lk.splats()["mu"]
    assert _run("export", tmp_path / "src", tmp_path / "e.parquet", "-q").returncode == 0
    for dtype in ("float32", "float16"):
        r = _run("ingest", tmp_path / "e.parquet", "--lake", tmp_path / dtype, "--all-columns", "--dtype", dtype, "-q")
        assert r.returncode == 0, r.stderr
        with open_lake(tmp_path / dtype) as lk:
            got = np.stack(lk.to_arrow(original=True).column("mu").to_numpy(zero_copy_only=False))
            if dtype == "float16":  # the export's own dtype: bit for bit, mu and the original vectors
                assert np.array_equal(got, want) and np.array_equal(lk.splats()["mu"], want_mu)
            else:  # within 1 ulp of float32 (was up to 3,584 ulp: 2e-4 relative)
                ulp = np.spacing(np.abs(want).astype(np.float32))
                assert np.all(np.abs(got - want) <= ulp), np.max(np.abs(got - want) / ulp)


def test_cli_usage_errors_are_one_line_exit_2():
    for args, text in [(["ingest"], "Missing argument 'SRC'"), (["consolidate", "/x", "--similarity", "abc"],
                                                                   "'abc' is not a valid float"),
                       (["nosuch"], "No such command 'nosuch'")]:
        r = _run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("m2m: error: ") and text in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _run("--version")
    assert r.returncode == 0 and "0.1.0" in r.stdout


@pytest.mark.parametrize("meta, match", [({"m": [{"a": 1}, {"a": 2}]}, r"row 0 is \{'a': 1\} \(dict\); a metadata "
                                                                     "column holds strings or numbers"),
                                         ({"m": np.array(["x", 1], dtype=object)},
                                          "row 1 is 1 \\(int\\), but the column holds str")])
def test_metadata_of_unsupported_kinds_is_named_once(meta, match):
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        with pytest.raises(InvalidEmbeddingError, match=match):
            lk.add_splats(np.ones((2, D)), metadata=meta)


def test_ragged_rows_and_null_vectors_name_the_row():
    import pyarrow as pa

    with create_m2m(M2MConfig(latent_dim=4)) as lk:
        with pytest.raises(InvalidEmbeddingError, match="row 1 has 2 values, row 0 has 4"):
            lk.add_splats([[1.0, 2, 3, 4], [1.0, 2]])
        with pytest.raises(InvalidEmbeddingError, match=r"1 null rows \(the first: row 1\)"):
            lk.add_splats(pa.table({"v": pa.array([[1.0, 2, 3, 4], None])}))
        with pytest.raises(InvalidEmbeddingError, match=r"add_table\(data, column=...\)"):
            lk.add_splats(pa.table({"x": [1, 2]}))


def test_mix_refuses_a_string_weight(tmp_path):
    with create_m2m(M2MConfig(latent_dim=D)) as a:
        a.add_splats(np.ones((4, D)))
        with pytest.raises(ConfigError, match="must be a number, got '1'"):
            m2m.mix({"a": a}, {"a": "1"})


def test_the_loader_and_mixture_are_typed_for_users():
    from m2m.lake.lake import Lake
    from m2m.stream.dataset import StreamDataset
    from m2m.stream.loader import StreamLoader
    from m2m.stream.mixture import Mixture

    assert StreamLoader.__annotations__["dataset"] in ("StreamDataset", StreamDataset)
    lake_sig = inspect.signature(Lake.export_to_dataloader).parameters
    mix_sig = inspect.signature(Mixture.export_to_dataloader).parameters
    assert {k: str(p.annotation) for k, p in mix_sig.items()} == {k: str(p.annotation) for k, p in lake_sig.items()}


USER_SCRIPT = '''
import m2m
from m2m import M2MConfig, StreamOptions, create_m2m

lake = create_m2m(M2MConfig(latent_dim=8))
dl = lake.export_to_dataloader(batch_size=4)
n: int = len(dl.dataset)
mixture = m2m.mix({"a": lake}, {"a": 1.0})
dl2 = mixture.export_to_dataloader(options=StreamOptions(batch_size=2))
'''


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_user_script_type_checks_strictly_and_a_wrong_option_does_not(tmp_path):
    if shutil.which("mypy") is None:
        pytest.skip("mypy is not installed")
    src = Path(__file__).resolve().parents[1] / "src"
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(USER_SCRIPT)
    bad.write_text(USER_SCRIPT + "dl3 = mixture.export_to_dataloader(options=3)\n")
    for path, ok in ((good, True), (bad, False)):
        proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
                              capture_output=True, text=True, timeout=850, env={"MYPYPATH": str(src), "PATH": "/usr/bin:/bin"}
                              | {k: v for k, v in __import__("os").environ.items() if k in ("PATH", "HOME")})
        assert (proc.returncode == 0) is ok, proc.stdout[-3000:]
        if not ok:
            assert "bad.py:10" in proc.stdout, proc.stdout


def test_m2m_errors_are_still_their_builtins():
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigTypeError, M2MError)
    assert issubclass(WriteFailedError, OSError)


def test_a_stream_uses_the_stored_geometry_whatever_the_handles_knn_k(tmp_path):
    """A lake estimated at k = 8, opened with knn_k = 16: vMF and a plain kappa column read the stored
    kappa, the mixture and Langevin modes recomputed it at 16 in memory (another kappa, other draws)."""
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=16, knn_k=8)) as lk:
        lk.add_splats(x, labels=np.arange(300) % 3)
        lk.estimate_kappa(threads=1)
        stored = lk.snapshot.read_all("kappa")
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=16)) as lk:  # knn_k 16 by default
        assert lk.config.knn_k == 16
        drawn = {}
        for gen in (False, "vmf", "mixture", "langevin"):
            batches = list(lk.export_to_dataloader(batch_size=50, shuffle=False, generate_samples=gen,
                                                   columns=("embedding", "id", "kappa")))
            kappa = np.concatenate([b["kappa"].numpy() for b in batches])
            ids = np.concatenate([b["id"].numpy() for b in batches])
            np.testing.assert_array_equal(kappa, stored[ids])
        for gen in ("vmf", "mixture"):
            batches = list(lk.export_to_dataloader(batch_size=50, seed=2, generate_samples=gen,
                                                   importance_sampling="kappa", columns=("embedding", "id")))
            drawn[gen] = np.sort(np.concatenate([b["id"].numpy() for b in batches]))
        np.testing.assert_array_equal(drawn["vmf"], drawn["mixture"])


def test_a_metadata_column_named_loss_is_kept_and_the_loss_mode_says_it_does_not_use_it(caplog):
    """'loss' is a mode and may be a column (a lake with one stays appendable); the mode says which it takes."""
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        lk.add_splats(np.ones((3, D)) + np.eye(3, D), metadata={"loss": [1.0, 2.0, 3.0]})
        lk.add_splats(np.ones((3, D)) - np.eye(3, D), metadata={"loss": [1.0, 2.0, 3.0]})
        with caplog.at_level("WARNING", logger="m2m.stream.from_lake"):
            list(lk.export_to_dataloader(batch_size=3, importance_sampling="loss"))
        assert "has a metadata column 'loss', which it does not sample by" in caplog.text


def test_scores_near_the_float64_limit_keep_their_law():
    """mean(s) overflowed to inf, every s / mean was 0 and the floor made the draws uniform."""
    from m2m.sampling.importance import probabilities
    from m2m.sampling.sharded import ShardedImportance

    s = np.array([1e308, 1e308, 1e306, 1e306])
    p = probabilities(s)
    np.testing.assert_allclose(p, probabilities(s / 1e300), rtol=1e-12)
    assert p[0] > 0.45
    sharded = ShardedImportance(np.array([0, 2, 4]), lambda shard: s[2 * shard: 2 * shard + 2],
                                lambda shard: np.ones(2), seed=0)
    q, mean = sharded.masses()
    assert np.isfinite(mean) and np.isfinite(q).all() and q[0] > 5 * q[1]


@pytest.mark.parametrize("value", [1, 2.5, ("kappa",), object()])
def test_importance_sampling_of_the_wrong_type_is_refused_when_the_options_are_made(value):
    with pytest.raises(ConfigTypeError, match="importance_sampling must be"):
        StreamOptions(importance_sampling=value)
    with pytest.raises(ConfigError, match="empty string"):
        StreamOptions(importance_sampling=" ")


def test_consolidating_a_float16_lake_estimates_geometry_on_the_stored_rows(tmp_path):
    from m2m.index.rows import rows_f32

    rng = np.random.default_rng(0)
    base = rng.standard_normal((150, 16))
    x = np.concatenate([base, base[:30] + 1e-4 * rng.standard_normal((30, 16))])
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=16, storage_dtype="float16", knn_k=8)) as lk:
        lk.add_splats(x)
        lk.estimate_kappa(threads=1)
        lk.consolidate(0.999)
        snap = lk.snapshot
        # the stored float16 rows renormalised, as estimate_kappa reads them (since 2026-12-07 evening)
        mu = rows_f32(snap.read_all("mu"), slice(None))
        nb, cos = snap.read_all("neighbors"), snap.read_all("neighbor_cos")
        pos = snap.positions(nb[:, 0])
        np.testing.assert_allclose(cos[:, 0], np.sum(mu * mu[pos], axis=1), atol=1e-6)  # (was 4e-4 off)
        kappa = snap.read_all("kappa")
        lk.estimate_kappa(threads=1)
        np.testing.assert_allclose(lk.snapshot.read_all("kappa"), kappa, rtol=1e-4)


@pytest.mark.parametrize("op", ["repair", "rollback"])
def test_repair_and_rollback_leave_a_folder_that_is_no_lake_untouched(tmp_path, op):
    from m2m.errors import LakeNotFoundError
    from m2m.lake.recovery import repair, rollback

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"x")
    for path in (photos, tmp_path / "missing"):
        with pytest.raises(LakeNotFoundError, match="no m2m lake at"):
            repair(str(path)) if op == "repair" else rollback(str(path), 0)
        r = _run(op, path, *(["--to", "0"] if op == "rollback" else []))
        assert r.returncode == 1 and r.stderr.startswith("m2m: error: no m2m lake at"), r.stderr
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"] and not (tmp_path / "missing").exists()


def test_a_repair_that_fails_before_its_copy_is_committed_moves_nothing(tmp_path, monkeypatch):
    """Killed between moving the bad head aside and committing its copy, a repair left the old head, and
    the next append reused the moved version's number and ids (a probing user, by SIGKILL)."""
    import m2m.lake.recovery as rec

    path = tmp_path / "l"
    with create_m2m(M2MConfig(path=path, latent_dim=4)) as lk:
        lk.add_splats(np.eye(4))            # v1: ids 0..3
        lk.add_splats(np.ones((3, 4)))      # v2: ids 4..6
    head = path / "_manifests" / "v0000000002.json"
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 1
    head.write_bytes(bytes(data))

    def killed(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(rec, "_republish", killed)
    with pytest.raises(OSError, match="killed"):
        rec.repair(str(path))
    assert head.exists()  # nothing moved aside before the copy exists
    monkeypatch.undo()
    report = rec.repair(str(path))
    assert report["head"] == 3 and [m[0] for m in report["moved"]] == [2]
    with open_lake(path) as lk:
        ids = lk.add_splats(np.full((3, 4), 2.0))
        assert lk.version == 4 and ids.min() >= 7


def test_hot_mode_cpu_is_accepted_where_auto_would_pick_it():
    """docs/stream.md names "cpu" among the hot modes (what "auto" picks off CUDA); it was refused."""
    assert StreamOptions(hot_mode="cpu").hot_mode == "cpu"
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((10, D)))
        batches = list(lk.export_to_dataloader(batch_size=4, hot_mode="cpu", shuffle=False))
        assert [len(b) for b in batches] == [4, 4, 2]


def test_m2m_alone_shows_its_help_and_filesystems_that_cannot_start_are_one_short_line(tmp_path):
    r = _run()
    assert r.returncode == 2 and "Commands:" in r.stderr + r.stdout and "m2m: error" not in r.stderr
    r = _run("info", "zip://nosuchzip")
    assert r.returncode == 1 and r.stderr.startswith("m2m: error: lake zip://nosuchzip") and r.stderr.count("\n") == 1
    assert len(r.stderr) < 700


def test_export_rows_refuses_norms_that_do_not_match_and_takes_lists():
    from m2m.lake.ingest import export_rows

    vectors, norms = export_rows([[1.0, 0.0], [0.0, 2.0]], [2.0, 1.0], "float32")
    assert norms is None and vectors.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    with pytest.raises(InvalidEmbeddingError, match="mu_norm has 1 values for vectors of shape"):
        export_rows(np.ones((2, 4), np.float32), [1.0], "float32")


def test_a_dangling_lock_folder_link_is_refused_in_one_line(tmp_path):
    from m2m.errors import CorruptShardError
    from m2m.lake.cache import ShardCache

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".locks").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CorruptShardError, match="is a symlink"):
        ShardCache(None, "/r", "memory://r", str(tmp_path / "c"), 1 << 20)
    assert not (tmp_path / "nowhere").exists()


def test_a_failed_first_ingest_into_an_empty_user_folder_can_be_run_again(tmp_path):
    """mkdir L; m2m ingest bad.npy --lake L left an empty lake at the bad file's width in L, and the
    corrected retry was refused ("has latent_dim 4, the config asks for 8")."""
    bad = np.ones((3, 4), np.float32)
    bad[1, 0] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    np.save(tmp_path / "good.npy", np.ones((3, 8), np.float32))
    (tmp_path / "L").mkdir()
    r = _run("ingest", tmp_path / "bad.npy", "--lake", tmp_path / "L", "-q")
    assert r.returncode == 1 and "NaN" in r.stderr
    assert (tmp_path / "L").is_dir() and list((tmp_path / "L").iterdir()) == []  # the user's folder stays
    r = _run("ingest", tmp_path / "good.npy", "--lake", tmp_path / "L", "-q")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["b.pq", "c.PARQUET", "d.parq"])
def test_parquet_files_of_every_suffix_are_read(tmp_path, name):
    """A directory's .pq files were skipped, silently (10 of 20 rows ingested, exit 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    for i, file in enumerate(("a.parquet", name)):
        vecs = np.random.default_rng(i).standard_normal((10, 4)).astype(np.float32)
        pq.write_table(pa.table({"emb": pa.array(list(vecs), type=pa.list_(pa.float32()))}), src / file)
    (src / "README.md").write_text("not data")
    r = _run("ingest", src, "--lake", tmp_path / "L", "-q")
    assert r.returncode == 0, r.stderr
    with open_lake(tmp_path / "L") as lk:
        assert len(lk) == 20
    r = _run("ingest", src / name, "--lake", tmp_path / "M", "-q")
    assert r.returncode == 0, r.stderr


def test_a_parquet_file_with_a_column_name_twice_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.Table.from_arrays([pa.array([[1.0, 2.0]] * 3), pa.array([1, 2, 3]), pa.array([4, 5, 6])],
                             names=["emb", "m", "m"])
    pq.write_table(t, tmp_path / "dup.parquet")
    r = _run("ingest", tmp_path / "dup.parquet", "--lake", tmp_path / "L", "--all-columns")
    assert r.returncode == 1 and "['m'] appear more than once" in r.stderr and r.stderr.count("\n") == 1


def test_a_partitioned_directory_reads_its_table_files_only(tmp_path):
    """A README.md beside the partitions made pyarrow fail ("Could not read schema from README.md")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    for i, part in enumerate(("split=a", "split=b")):
        (src / part).mkdir(parents=True)
        vecs = np.random.default_rng(i).standard_normal((4, 4)).astype(np.float32)
        pq.write_table(pa.table({"emb": pa.array(list(vecs), type=pa.list_(pa.float32()))}), src / part / "x.pq")
    (src / "README.md").write_text("not data")
    (src / "_SUCCESS").write_text("")
    r = _run("ingest", src, "--lake", tmp_path / "L", "--label-column", "split", "-q")
    assert r.returncode == 0, r.stderr
    with open_lake(tmp_path / "L") as lk:
        assert len(lk) == 8 and sorted(set(lk.splats()["label"])) == ["a", "b"]


@pytest.mark.parametrize("layout", ["flat", "hive"])
def test_empty_part_files_are_skipped(tmp_path, layout):
    """Spark, Dask and Polars write empty part files: with list vectors the ingest failed ('part-0.parquet
    has no rows') though the directory held rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    for i, rows in enumerate((0, 4, 0)):
        folder = src / (f"k={i}" if layout == "hive" else "")
        folder.mkdir(parents=True, exist_ok=True)
        vecs = np.random.default_rng(i).standard_normal((rows, 3)).astype(np.float32)
        pq.write_table(pa.table({"emb": pa.array(list(vecs), type=pa.list_(pa.float32()))}),
                       folder / f"part-{i}.parquet")
    r = _run("ingest", src, "--lake", tmp_path / "L", "-q")
    assert r.returncode == 0, r.stderr
    with open_lake(tmp_path / "L") as lk:
        assert len(lk) == 4 and lk.dim == 3


def test_to_arrow_float32_converts_float16_metadata_too():
    import pyarrow as pa

    with create_m2m(M2MConfig(latent_dim=D, storage_dtype="float16")) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((4, D)),
                      metadata={"h": np.array([0.5, 1.5, np.nan, 2.0], np.float16)})
        t = lk.to_arrow(float32=True)
        assert t.schema.field("h").type == pa.float32() and t.schema.field("mu").type.value_type == pa.float32()
        np.testing.assert_array_equal(t.column("h").to_numpy(zero_copy_only=False)[[0, 1, 3]], [0.5, 1.5, 2.0])
        assert lk.to_arrow().schema.field("h").type == pa.float16()


def test_review_round_two_ingest_cases(tmp_path):
    """A symlinked partition folder is read (rglob skipped it: rows lost, exit 0); a repeated name the
    ingest does not read is allowed; a value that does not fit names the chunk it is in."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, elsewhere = tmp_path / "part", tmp_path / "elsewhere"
    (src / "label=1").mkdir(parents=True)
    elsewhere.mkdir()
    for folder in (src / "label=1", elsewhere):
        vecs = np.random.default_rng(len(str(folder))).standard_normal((10, 4)).astype(np.float32)
        pq.write_table(pa.table({"emb": pa.array(list(vecs), type=pa.list_(pa.float32()))}), folder / "p.parquet")
    (src / "label=2").symlink_to(elsewhere)
    assert _run("ingest", src, "--lake", tmp_path / "L", "--label-column", "label", "-q").returncode == 0
    with open_lake(tmp_path / "L") as lk:
        assert len(lk) == 20 and sorted(set(lk.splats()["label"].tolist())) == [1, 2]
    t = pa.Table.from_arrays([pa.array([[1.0, 2.0]] * 3), pa.array([1, 2, 3]), pa.array([4, 5, 6])],
                             names=["vec", "x", "x"])
    pq.write_table(t, tmp_path / "dup.parquet")
    assert _run("ingest", tmp_path / "dup.parquet", "--lake", tmp_path / "M", "--column", "vec", "-q").returncode == 0
    with create_m2m(M2MConfig(path=tmp_path / "N", latent_dim=4)) as lk:
        lk.add_splats(np.ones((2, 4)), metadata={"m": np.array([1, 2], np.int32)})
    m = np.arange(3000, dtype=np.int64)
    m[2500] = 2**40
    vecs = np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32)
    pq.write_table(pa.table({"emb": pa.array(list(vecs), type=pa.list_(pa.float32())), "m": m}), tmp_path / "m.parquet")
    r = _run("ingest", tmp_path / "m.parquet", "--lake", tmp_path / "N", "--meta-column", "m", "--chunk-size", "4KiB")
    assert r.returncode == 1
    import re

    found = re.search(r"in the chunk starting at row (\d+): .*which would store row (\d+)'s 1099511627776", r.stderr)
    assert found and int(found.group(1)) + int(found.group(2)) == 2500, r.stderr
