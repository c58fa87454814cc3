"""m2m.ray on a real local Ray cluster writing to a remote lake (moto S3 on 127.0.0.1): the Ray tasks'
files are the commit's own, so a vacuum that removed them fails the commit, and a failed or lost
attempt leaves none behind (a probing user, 2026-12-08: a published version whose files were gone;
5 of 12 objects referenced by no version after a lost race; a failed task's shard left)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")

SCRIPT = textwrap.dedent('''
    import json, os, sys, threading
    import numpy as np, ray, s3fs
    opts, url, case = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    hooks = os.path.dirname(os.path.abspath(__file__))
    env = {"PYTHONPATH": os.pathsep.join([hooks, os.environ.get("PYTHONPATH", "")]), "M2M_FAIL": case}
    from fail_hook import setup
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": setup, "env_vars": env})
    import m2m.lake.commit as commit
    import m2m.ray
    from m2m import CommitConflictError, M2MConfig, create_m2m, open_lake

    def objects():
        fs = s3fs.S3FileSystem(**opts)
        fs.invalidate_cache()
        root = url[len("s3://"):]
        return {p[len(root) + 1:] for p in fs.find(root)}

    def referenced():
        with open_lake(url, storage_options=opts) as lake:
            out = set()
            for v in lake.versions():
                with open_lake(url, storage_options=opts, version=v) as old:
                    out |= {f.path for f in old.manifest.files()}
            return out

    rng = np.random.default_rng(0)
    cfg = M2MConfig(path=url, latent_dim=8, shard_bytes=1 << 16, storage_options=opts)
    with create_m2m(cfg) as lake:
        lake.add_splats(rng.normal(size=(10, 8)))
    ds = ray.data.from_items([{"embedding": v} for v in rng.normal(size=(3000, 8)).astype(np.float32)],
                             override_num_blocks=3)
    out = {}
    if case == "vacuum":          # another process vacuums (min_age_s=0) right before the version's put
        put = commit.write_manifest

        def vacuum_then_put(fs, new, *a, **kw):
            with open_lake(url, storage_options=opts) as other:
                other.vacuum(min_age_s=0)
            return put(fs, new, *a, **kw)
        commit.write_manifest = vacuum_then_put
        try:
            m2m.ray.write_lake(ds, cfg).close()
            out["raised"] = None
        except CommitConflictError:
            out["raised"] = "CommitConflictError"
        commit.write_manifest = put
    elif case == "race":          # another writer commits while the tasks run: the first attempt loses
        build = commit.commit_remote
        state = {"n": 0}

        def racing(fs, operation, builder, *a, **kw):
            def wrapped(base):
                new = builder(base)
                if state["n"] == 0:
                    state["n"] += 1
                    with open_lake(url, storage_options=opts) as other:
                        other.add_splats(rng.normal(size=(5, 8)))
                return new
            return build(fs, operation, wrapped, *a, **kw)
        commit.commit_remote = racing
        m2m.ray.write_lake(ds, cfg).close()
        commit.commit_remote = build
        out["raised"] = None
    else:                         # a task fails after its shards were uploaded
        try:
            m2m.ray.write_lake(ds, cfg).close()
            out["raised"] = None
        except Exception as exc:
            out["raised"] = type(exc).__name__
    with open_lake(url, storage_options=opts) as lake:
        lake.to_arrow()
        out["rows"] = len(lake)
    out["stray"] = sorted(o for o in objects() - referenced() if o.startswith("_data/"))
    ray.shutdown()
    print(json.dumps(out))
''')

HOOK = textwrap.dedent('''
    import os

    def setup():
        if os.environ.get("M2M_FAIL") != "task":
            return
        import m2m.ray.ingest as ingest
        write = ingest.write_splats

        def flaky(fs, batches, first_id, *a, **kw):
            out = write(fs, batches, first_id, *a, **kw)   # the task's shards are in the store ...
            if first_id > 10:
                raise OSError("simulated failure after the task's upload")   # ... then it fails
            return out
        ingest.write_splats = flaky
''')


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case, raised, rows", [("vacuum", "CommitConflictError", 10), ("race", None, 3015),
                                                ("task", "RayTaskError(OSError)", 10)])
def test_ray_writes_to_a_remote_lake_leave_no_unreferenced_file(s3_server, tmp_path, case, raised, rows):
    (tmp_path / "fail_hook.py").write_text(HOOK)
    (tmp_path / "job.py").write_text(SCRIPT)
    p = subprocess.run([sys.executable, str(tmp_path / "job.py"), json.dumps(s3_server.storage_options),
                        s3_server.lake_url(), case], capture_output=True, text=True, timeout=540,
                       env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["raised"] == raised and out["rows"] == rows and out["stray"] == [], out
