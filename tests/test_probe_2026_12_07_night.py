"""What the night's probes of 2026-12-07 found, each checked the way it was found."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from m2m import M2MConfig, create_m2m, vmf
from m2m.cli.main import cli
from m2m.errors import ConfigError


def _m2m(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_a_lake_path_with_a_tilde_gets_the_checks_of_the_path_it_names(tmp_path, monkeypatch):
    # the lake handle expands "~"; the CLI's checks compared "~/lake" as "./~/lake": an export into the
    # lake's _data passed, a lake inside SRC was accepted, a failed first ingest left its new lake behind
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    np.save(home / "src" / "a.npy", np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    assert _m2m("ingest", str(home / "src" / "a.npy"), "--lake", "~/lake", "-q").exit_code == 0
    r = _m2m("export", "~/lake", str(home / "lake" / "_data" / "x.arrow"))
    assert r.exit_code == 1 and "inside the lake's own _data" in r.output
    assert not (home / "lake" / "_data" / "x.arrow").exists()
    r = _m2m("export", "~/lake", "~/out.arrow", "-q")
    assert r.exit_code == 0, r.output
    assert (home / "out.arrow").is_file() and not (tmp_path / "~").exists()
    r = _m2m("ingest", str(home / "src"), "--lake", "~/src/lake", "-q")
    assert r.exit_code == 1 and "inside SRC" in r.output and not (home / "src" / "lake").exists()
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]] * 3, np.float32))
    r = _m2m("ingest", str(tmp_path / "nan.npy"), "--lake", "~/newlake", "-q")
    assert r.exit_code == 1 and "NaN" in r.output
    assert not (home / "newlake").exists() and sorted(os.listdir(tmp_path)) == ["home", "nan.npy"]


@pytest.mark.parametrize("d", [2, 3])
def test_vmf_draws_in_few_dimensions_are_unit_to_float32_precision(d):
    # z nearly parallel to mu kept a part along mu after one projection: rows 1 +- 4e-4 at d = 2
    g = torch.Generator().manual_seed(0)
    mu = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    for kappa in (0.1, 5.0, 1e4):
        x = vmf.sample(mu, kappa, 20_000, generator=g)
        assert float((x.double().norm(dim=1) - 1).abs().max()) < 5e-7, kappa


def test_a_similarity_closer_to_1_than_float32_tells_apart_is_refused_not_rounded():
    # 0.9999999 was taken as 1 - 1e-6: rows at cosine 0.9999995 merged
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.9999995, np.sqrt(1 - 0.9999995**2), 0.0])
    with create_m2m(M2MConfig(latent_dim=3)) as lake:
        lake.add_splats(np.stack([a, b]).astype(np.float32))
        for bad in (0.9999999, 1 - 5e-7):
            with pytest.raises(ConfigError, match=f"similarity {bad!r} lies between 1 - 1e-6 and 1"):
                lake.consolidate(bad)
            with pytest.raises(ConfigError, match="similarity"):
                lake.criticality(bad)
        assert lake.consolidate(1.0).rows_after == 1 and lake.version == 2  # identical up to rounding
    with pytest.raises(ConfigError, match=r"consolidate_similarity must be a float in \(0, 0.999999\] or 1.0"):
        M2MConfig(latent_dim=3, consolidate_similarity=0.9999999)


def test_pairs_at_the_threshold_are_decided_by_the_cosine_of_the_stored_rows():
    # the float64 re-check took the stored float32 rows' product unnormalised (norms 1 +- 6e-8): a pair at
    # cosine 0.99998997 merged at similarity 0.99999
    rng = np.random.default_rng(9)
    x = rng.standard_normal((25_000, 3))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    y = x.astype(np.float64)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    c = y @ y[13579]
    c[13579] = -2
    j = int(np.argmax(c))
    assert 0.99998 < c[j] < 0.99999
    with create_m2m(M2MConfig(latent_dim=3)) as lake:
        lake.add_splats(x[[13579, j]])
        assert lake.consolidate(0.99999).rows_after == 2
        assert lake.consolidate(float(c[j]) - 1e-9).rows_after == 1


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_cache_dir_is_refused_naming_it(empty):
    # M2MConfig took it; the remote lake's cache then failed in os.makedirs with a bare FileNotFoundError: ''
    from m2m.lake.fs import open_fs

    with pytest.raises(ConfigError, match="M2MConfig.cache_dir must be None or a directory path"):
        M2MConfig(path="s3://bucket/lake", cache_dir=empty)
    with pytest.raises(ConfigError, match=f"cache_dir {empty!r} names no folder"):
        open_fs("memory://m2m-night-empty-cache", cache_dir=empty).cache


@pytest.mark.parametrize("args", [["--help"], ["export", "--help"], ["--version"]])
def test_help_and_version_into_a_reader_that_has_gone_exit_141_quietly(args):
    # click's own broken-pipe handling exited 1 (`m2m --help | true` failed a pipefail script)
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-c", "from m2m.cli.main import main; main()", *args], stdout=w,
                           stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, b"")


@pytest.fixture
def exported(tmp_path):
    """A lake of non-unit vectors with labels, compacted (its _data holds two versions' files), exported."""
    x = np.random.default_rng(0).standard_normal((6000, 8)).astype(np.float32) * 3
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8, shard_bytes=1 << 16)) as lake:
        lake.add_splats(x, labels=np.arange(6000) % 3)
        report = lake.compact(target_bytes=1 << 20)
        assert report.shards_after < report.shards_before
    assert _m2m("export", str(tmp_path / "lake"), str(tmp_path / "e.parquet"), "-q").exit_code == 0
    return tmp_path, x


@pytest.mark.parametrize("extra", [[], ["--label-column", "label"]])
def test_an_export_ingested_without_all_columns_keeps_each_rows_length(exported, extra):
    # mu_norm was applied only with --all-columns: naming columns stored the unit vectors, silently
    from m2m import open_lake

    tmp_path, x = exported
    r = _m2m("ingest", str(tmp_path / "e.parquet"), "--lake", str(tmp_path / "new"), "-q", *extra)
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "new") as lake:
        got = np.array(lake.to_arrow(original=True).column("mu").to_pylist())
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", ["", "_data", "_data/file", "_manifests"])
def test_a_lakes_own_folders_are_refused_as_ingest_input(exported, where):
    # `m2m ingest LAKE/_data` read every version's files still on disk: after a compaction, every row twice
    tmp_path, _ = exported
    lake = tmp_path / "lake"
    src = lake / where if where != "_data/file" else next((lake / "_data").iterdir())
    r = _m2m("ingest", str(src), "--lake", str(tmp_path / "new"), "-q")
    assert r.exit_code == 1 and f"the m2m lake {lake}" in r.output and "m2m export" in r.output, r.output
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["npy", "parquet"])
def test_a_bad_row_in_a_directory_names_its_file_and_its_row_there(tmp_path, kind):
    # "vectors row 550 contains NaN or Inf": counted over all files, no file named (it was row 250 of b)
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    x = np.random.default_rng(2).standard_normal((600, 8)).astype(np.float32)
    x[550, 1] = np.nan
    for name, part in (("a", x[:300]), ("b", x[300:])):
        if kind == "npy":
            np.save(src / f"{name}.npy", part)
        else:
            pq.write_table(pa.table({"embedding": list(part)}), src / f"{name}.parquet")
    r = _m2m("ingest", str(src), "--lake", str(tmp_path / "lake"), "-q", "--chunk-size", "1KiB")
    assert r.exit_code == 1 and f"{src / f'b.{kind}'}: vectors row 250 contains NaN or Inf" in r.output, r.output
    assert not (tmp_path / "lake").exists()


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_export_to_a_file_named_in_another_encoding_writes_it(tmp_path, suffix):
    # pyarrow opens only UTF-8 names: "'utf-8' codec can't encode character '\udcfd' ... surrogates not allowed"
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=4)) as lake:
        lake.add_splats(x)
    folder = tmp_path / os.fsdecode(b"\xe9t\xe9")
    folder.mkdir()
    out = folder / os.fsdecode(b"\xfd" + suffix.encode())
    r = _m2m("export", str(tmp_path / "lake"), str(out), "-q")
    assert r.exit_code == 0, r.output
    with open(out, "rb") as f:
        table = pq.read_table(f) if suffix == ".parquet" else pa.ipc.open_file(f).read_all()
    assert table.num_rows == 10 and sorted(os.listdir(folder)) == [out.name]


def test_size_options_name_themselves_and_hints_quote_paths(tmp_path):
    # "Invalid value: '-5' is not a size" named no option; "(m2m kappa my lake)" could not be pasted
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    r = _m2m("ingest", str(tmp_path / "a.npy"), "--lake", str(tmp_path / "l"), "--shard-size", "-5")
    assert r.exit_code == 2 and "Invalid value for '--shard-size': '-5' is not a size" in r.output
    r = _m2m("ingest", str(tmp_path / "a.npy"), "--lake", str(tmp_path / "l"), "--chunk-size", "x")
    assert r.exit_code == 2 and "'--chunk-size'" in r.output
    r = _m2m("compact", str(tmp_path / "l"), "--target", "-1")
    assert r.exit_code == 2 and "'--target'" in r.output and not (tmp_path / "l").exists()
    lake = str(tmp_path / "my lake")
    assert _m2m("ingest", str(tmp_path / "a.npy"), "--lake", lake, "-q").exit_code == 0
    r = _m2m("info", lake)
    assert f"not estimated (m2m kappa '{lake}')" in r.output, r.output


def test_a_state_saved_after_set_epoch_mid_pass_resumes_into_the_pinned_epoch(tmp_path):
    # the state said only "pinned": the resumed loader pinned the saved pass's epoch 0, not 7
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32))
        kw = dict(batch_size=40, columns=("id",), seed=2)
        d = lake.export_to_dataloader(**kw)
        it = iter(d)
        head = [next(it)["id"] for _ in range(3)]
        d.set_epoch(7)
        state = d.state_dict()
        rest = [b["id"] for b in it]
        after = [b["id"] for b in d]
        e = lake.export_to_dataloader(**kw)
        e.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip([b["id"] for b in e], rest, strict=True))
        assert e.epoch == 7 and all(torch.equal(a, b) for a, b in zip([b["id"] for b in e], after, strict=True))
        assert len(head) == 3 and (state["epoch"], state["pinned_epoch"]) == (0, 7)


def test_a_position_past_this_loaders_epoch_is_refused_whatever_the_state_says_its_length_is(tmp_path):
    # an edited epoch_batches=100 let position 30 of a 25-batch epoch through: the pass yielded nothing
    from m2m.errors import StateMismatchError

    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32))
        d = lake.export_to_dataloader(batch_size=40, seed=2)
        it = iter(d)
        for _ in range(5):
            next(it)
        state = {**d.state_dict(), "batches_yielded": 30, "epoch_batches": 100}
        with pytest.raises(StateMismatchError, match="position 30 is outside epoch 0, which has 25 batches"):
            lake.export_to_dataloader(batch_size=40, seed=2).load_state_dict(state)


def test_splats_of_an_empty_lake_have_each_columns_dtype_and_shape():
    # every column was float32 [0, d] (Snapshot.gather had no shard to take a dtype from)
    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        for got in (lake.splats(), lake.splats([])):
            assert {k: (str(v.dtype), v.shape) for k, v in got.items()} == {
                "id": ("int64", (0,)), "mu": ("float32", (0, 8)), "kappa": ("float32", (0,)),
                "alpha": ("float32", (0,))}


def test_the_validation_example_counts_the_padding_exactly(tmp_path):
    # its check `len(unique) == len(ids) or ...` could not fail after the set check above it
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "validate_data_lake.py"
    out = subprocess.run([sys.executable, str(example), "--rows", "2001", "--dim", "16", "--lake",
                          str(tmp_path / "lake")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2,001 rows over 2 ranks (1,001 each, 1 row repeated to make them equal)" in out.stdout


def test_a_mixture_decodes_each_rows_label_in_its_own_lakes_vocabulary(tmp_path):
    # the promise "one documented call maps label codes back to strings" had no call for m2m.mix, where the
    # same code means different strings in two lakes
    import m2m

    rng = np.random.default_rng(3)
    with create_m2m(M2MConfig(path=tmp_path / "a", latent_dim=4)) as a, \
            create_m2m(M2MConfig(path=tmp_path / "b", latent_dim=4)) as b:
        a.add_splats(rng.normal(size=(60, 4)), labels=["cat", "dog"] * 30)
        b.add_splats(rng.normal(size=(40, 4)), labels=["dog", "fish", "eel", "cow"] * 10)
        mix = m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1})
        lakes = {"a": a, "b": b}
        seen = 0
        for batch in mix.export_to_dataloader(batch_size=32, columns=("id", "label")):
            got = mix.decode_labels(batch["label"], batch["source"])
            for i, s, label in zip(batch["id"].tolist(), batch["source"].tolist(), got):
                assert label == lakes[mix.names[s]].splats([i])["label"][0]
                seen += 1
        assert seen >= 100
        with pytest.raises(ConfigError, match="outside lake 'a'"):
            mix.decode_labels([5], [0])
        with pytest.raises(ConfigError, match="not a lake index"):
            mix.decode_labels([0], [2])
