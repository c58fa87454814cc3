"""What a clumsy user passes to the Python API: each is refused with one line naming the value, as an
`M2MError`, and the lake is left as it was (found by probing the API on 2026-12-06; the first four were a
raw ValueError, TypeError, TypeError and a misleading "row 0 is 1")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import M2MConfig, create_m2m
from m2m.errors import M2MError


@pytest.fixture(scope="module")
def lake():
    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        lake.add_splats(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)), labels=torch.arange(300) % 3)
        yield lake


CASES = [
    ("consolidate('x')", lambda lk: lk.consolidate("x"), "similarity must be a number in (0, 1], got 'x'"),
    ("vacuum(keep='1')", lambda lk: lk.vacuum(keep="1"), "keep must be an int >= 1, got '1'"),
    ("add_table(None)", lambda lk: lk.add_table(None), "got NoneType"),
    ("labels [1, None, ...]", lambda lk: lk.add_splats(np.ones((3, 8)), labels=[1, None, 2]), "labels row 1 is None"),
    ("lake[1.5]", lambda lk: lk[1.5], "got 1.5"),
    ("take 2-D ids", lambda lk: lk.take(np.zeros((1, 1), dtype=np.int64)), "got shape (1, 1)"),
    ("take(columns='label')", lambda lk: lk.take([0], columns="label"), "not the string 'label'"),
    ("consolidate(1.5)", lambda lk: lk.consolidate(1.5), "similarity must be in (0, 1], got 1.5"),
    ("batch_size='64'", lambda lk: lk.export_to_dataloader(batch_size="64"), "batch_size must be an int >= 1, got '64'"),
    ("columns='embedding'", lambda lk: lk.export_to_dataloader(columns="embedding"), "not the string 'embedding'"),
]


@pytest.mark.parametrize("what, call, needle", CASES, ids=[c[0] for c in CASES])
def test_a_clumsy_input_is_refused_in_one_line_naming_the_value(lake, what, call, needle):
    before = (lake.version, len(lake))
    with pytest.raises(M2MError) as info:
        call(lake)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg
    assert (lake.version, len(lake)) == before


def test_numpy_numbers_are_numbers(lake):
    # np.float32 is not a Python float: the similarity check must not refuse it
    with create_m2m(M2MConfig(latent_dim=8)) as other:
        other.add_splats(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)))
        other.consolidate(np.float32(0.999))
        assert other.vacuum(keep=np.int64(1))["versions_removed"] >= 0


@pytest.mark.timeout(60)  # the code before waited forever on 'nan'
@pytest.mark.parametrize("raw", ["abc", "nan", "-1", "inf"])
def test_a_bad_lock_timeout_is_named_and_never_waits_forever(tmp_path, monkeypatch, raw):
    # observed: 'abc' gave "could not convert string to float" (no variable named); 'nan' with the lock
    # held waited forever
    import fcntl
    import os

    from m2m.errors import ConfigError

    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=4)) as lake:
        lake.add_splats(np.ones((2, 4)))
        fd = os.open(tmp_path / "lake" / "_lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another writer's lock (a separate open file description)
        try:
            monkeypatch.setenv("M2M_LOCK_TIMEOUT", raw)
            with pytest.raises(ConfigError, match=f"M2M_LOCK_TIMEOUT must be a finite number of seconds >= 0, got '{raw}'"):
                lake.add_splats(np.ones((2, 4)))
        finally:
            os.close(fd)
        monkeypatch.setenv("M2M_LOCK_TIMEOUT", "0.5")
        lake.add_splats(np.ones((2, 4)))
        assert len(lake) == 4


def test_a_lock_file_linked_outside_the_lake_is_refused_and_nothing_is_created_there(tmp_path):
    # observed: every append created (or opened read-write) the link's target outside the lake
    import os

    from m2m.errors import CorruptShardError

    outside = tmp_path / "outside"
    outside.mkdir()
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=4)) as lake:
        lake.add_splats(np.ones((2, 4)))
        os.remove(tmp_path / "lake" / "_lock")
        os.symlink(outside / "target", tmp_path / "lake" / "_lock")
        with pytest.raises(CorruptShardError, match="the lake lock .*_lock is a symbolic link .*: remove the link"):
            lake.add_splats(np.ones((2, 4)))
        assert os.listdir(outside) == [] and len(lake) == 2
        os.remove(tmp_path / "lake" / "_lock")
        lake.add_splats(np.ones((2, 4)))
        assert len(lake) == 4


def test_an_unclosed_lake_leaves_no_noise_at_interpreter_exit(tmp_path):
    # observed: "Exception ignored in: <function ShardFile.__del__> ... 'NoneType' object has no attribute
    # 'close'" at exit of a script that left its lake open after reading it
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np
        from m2m import M2MConfig, create_m2m
        lake = create_m2m(M2MConfig(path={str(tmp_path / "lake")!r}, latent_dim=8))
        for i in range(3):
            ids = lake.add_splats(np.random.default_rng(i).standard_normal((4, 8)),
                                  metadata={{"s": np.array(["a", None, "c", "d"], dtype=object)}})
            lake.take(ids)
        lake.add_splats(np.ones((4, 8)), metadata={{"x": np.ones(4)}}) if False else None
        row = lake[0]
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Exception ignored" not in r.stderr, r.stderr


def test_writing_a_read_only_lake_is_a_typed_one_line_error(tmp_path):
    # observed: a bare builtin PermissionError (not an M2MError) from add_splats, compact and vacuum
    import shutil
    import subprocess

    from m2m import open_lake
    from m2m.errors import ReadOnlyLakeError, WriteFailedError

    path = tmp_path / "lake"
    with create_m2m(M2MConfig(path=path, latent_dim=4)) as lake:
        lake.add_splats(np.ones((3, 4)))
        lake.add_splats(np.ones((3, 4)))
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(path)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root on a file system with immutable files)")
    try:
        with open_lake(path) as lake:
            for call in (lambda: lake.add_splats(np.ones((2, 4))), lambda: lake.compact(1 << 20), lake.vacuum):
                with pytest.raises(ReadOnlyLakeError, match="the lake cannot be written here; nothing was committed") as info:
                    call()
                assert isinstance(info.value, PermissionError) and isinstance(info.value, WriteFailedError)
                assert str(path) in str(info.value) and "\n" not in str(info.value)
            assert len(lake) == 6 and lake.verify() == []
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


# ----------------------------------------------------------------------------- masses beyond float32
def test_a_merge_whose_mass_passes_float32_is_refused_and_nothing_changes(tmp_path) -> None:
    # observed: consolidate stored alpha = +inf (each 3e38 alone is valid, their sum is not), verify()
    # passed, and every mixture / Langevin stream over the lake failed afterwards
    import numpy as np

    from m2m import M2MConfig, create_m2m
    from m2m.errors import InvalidEmbeddingError

    v = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    v[1] = v[0]
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8, knn_k=2)) as lake:
        lake.add_splats(v, alpha=np.full(4, 3e38, np.float32))
        version = lake.version
        with pytest.raises(InvalidEmbeddingError, match=r"merging 2 rows \(row 0 .*6e\+38, beyond float32"):
            lake.consolidate(0.999)
        assert lake.version == version and np.isfinite(lake.splats()["alpha"]).all()


@pytest.mark.parametrize("drop_last", [False, True])  # the epoch's draws M = N, or fewer (weights rescaled)
def test_importance_weights_beyond_float32_name_the_row_and_its_alpha(tmp_path, drop_last) -> None:
    # observed: "plan weight inf at position 16 is not finite and >= 0" (a position in the plan, no alpha)
    import numpy as np

    from m2m import M2MConfig, create_m2m
    from m2m.errors import InvalidEmbeddingError

    n = 50
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8, knn_k=3)) as lake:
        # every alpha valid (3e38 < 3.4e38); half the rows are drawn with p = 2/3 of uniform: weight 4.5e38
        lake.add_splats(np.random.default_rng(0).standard_normal((n, 8)), alpha=np.full(n, 3e38, np.float32),
                        metadata={"score": np.where(np.arange(n) % 2 == 0, 0.5, 1.0)})
        with pytest.raises(InvalidEmbeddingError, match=r"of row \d+ is 4.5e\+38 \(its alpha is 3e\+38\), beyond float32") as info:
            list(lake.export_to_dataloader(batch_size=16, drop_last=drop_last, importance_sampling="score",
                                           columns=("id", "weight")))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["int", "uint64", "array", "list"])
def test_a_position_beyond_int64_is_a_position_error_naming_it(tmp_path, kind) -> None:
    # observed: OverflowError for 2**70 and np.uint64(2**63 + 5); a wrapped negative position named for arrays
    import numpy as np

    from m2m import M2MConfig, create_m2m
    from m2m.errors import PositionError

    key, want = {"int": (2**70, 2**70), "uint64": (np.uint64(2**63 + 5), 2**63 + 5),
                 "array": (np.array([2**63 + 5], dtype=np.uint64), 2**63 + 5), "list": ([2**64 - 1], 2**64 - 1)}[kind]
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=4)) as lake:
        lake.add_splats(np.eye(4, dtype=np.float32))
        with pytest.raises(PositionError, match=f"position {want} is out of range"):
            lake[key]


@pytest.mark.parametrize("where", ["estimate_kappa", "intra_op_threads", "cli"])
def test_absurd_thread_counts_are_refused_in_one_line(tmp_path, where) -> None:
    # observed: `m2m kappa --threads 20000` failed to create OpenMP threads, 100000 segfaulted (rc 139)
    import os

    import numpy as np
    from click.testing import CliRunner

    from m2m import M2MConfig, StreamOptions, create_m2m
    from m2m.cli.main import cli
    from m2m.errors import ConfigError

    most = max(8, 4 * (os.cpu_count() or 1))
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((50, 8)))
        if where == "estimate_kappa":
            with pytest.raises(ConfigError, match=f"threads must be an int from 1 to {most} .*got 100000"):
                lake.estimate_kappa(threads=100000)
            lake.estimate_kappa(threads=most)  # the bound itself is accepted
        elif where == "intra_op_threads":
            with pytest.raises(ConfigError, match=f"intra_op_threads must be an int from 1 to {most}"):
                StreamOptions(intra_op_threads=most + 1)
        else:
            result = CliRunner().invoke(cli, ["kappa", str(tmp_path / "lake"), "--threads", "20000"])
            assert result.exit_code == 1 and result.output.strip().startswith("m2m: error: threads must be")
