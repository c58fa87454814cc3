"""`m2m.mix`: exact proportions per epoch over ranks and workers, resume, epoch length, each lake's own
sampler and augmenter, and the one-line errors (docs/stream.md, "Mixing lakes")."""

from __future__ import annotations

import copy
import itertools
import os

import numpy as np
import pytest
import torch

import m2m
from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import ConfigError, M2MError, StateMismatchError
from m2m.stream import mixing

D, BS = 8, 50


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(path: str, n: int, seed: int, chunks: int = 2, dim: int = D, geometry: bool = False,
          **add: object) -> np.ndarray:
    """A lake of ``n`` rows in ``chunks`` commits (shards), with kappa/neighbours persisted when
    ``geometry`` (a loader then skips the in-memory kNN); returns its mu in id order."""
    x = unit(n, seed) if dim == D else np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    with create_m2m(M2MConfig(path=path, latent_dim=dim, seed=1)) as lake:
        for part in np.array_split(np.arange(n), chunks):
            extra = {k: np.asarray(v)[part] for k, v in add.items()}
            lake.add_splats(x[part], labels=(np.arange(n)[part] % 5), **extra)
        if geometry:
            lake.estimate_kappa()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def lakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mix")
    paths = {"web": str(root / "web"), "books": str(root / "books"), "code": str(root / "code")}
    build(paths["web"], 1200, 0, chunks=3, geometry=True)
    build(paths["books"], 300, 1, geometry=True)
    build(paths["code"], 90, 2, chunks=1, geometry=True)
    return paths


WEIGHTS = {"web": 0.6, "books": 0.3, "code": 0.1}
COLS = ("id", "embedding", "label", "weight")


def epoch(dl: object) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in b.items()} for b in dl]  # type: ignore[attr-defined]


def cat(batches: list[dict[str, torch.Tensor]], key: str) -> np.ndarray:
    return torch.cat([b[key] for b in batches]).numpy()


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_proportions_exact_per_epoch_over_two_ranks_and_two_workers(lakes: dict[str, str]) -> None:
    """2 ranks (rank=/world_size=) x 2 real DataLoader workers, two epochs: each lake's share is its
    weight within 1% (in fact exact: the counts are fixed per epoch), every rank yields the same
    batches, and the batches equal those of the worker-free loader."""
    mx = m2m.mix(lakes, WEIGHTS, epoch_rows=2000)
    assert mx.counts == {"web": 1200, "books": 600, "code": 200}
    try:
        for e in range(2):
            per_rank, ref = [], []
            for r in range(2):
                kw = dict(batch_size=BS, columns=COLS, seed=5, rank=r, world_size=2)
                dl = mx.export_to_dataloader(num_workers=2, multiprocessing_context="fork", timeout=60, **kw)
                dl.set_epoch(e)
                per_rank.append(epoch(dl))
                dl.close()
                dl0 = mx.export_to_dataloader(**kw)
                dl0.set_epoch(e)
                ref.append(epoch(dl0))
                same(per_rank[r], ref[r])
            assert [len(b) for b in per_rank] == [20, 20]
            src = np.concatenate([cat(b, "source") for b in per_rank])
            assert len(src) == 2000
            share = np.bincount(src, minlength=3) / len(src)
            for j, name in enumerate(mx.names):
                assert abs(share[j] - WEIGHTS[name]) <= 0.01 * WEIGHTS[name]
            assert np.bincount(src, minlength=3).tolist() == [1200, 600, 200]
            for r in range(2):  # each rank is itself close to the proportions (a shuffled mix)
                share_r = np.bincount(cat(per_rank[r], "source"), minlength=3) / 1000
                assert np.abs(share_r - np.array([0.6, 0.3, 0.1])).max() < 0.05
    finally:
        mx.close()


def test_rows_and_values_come_from_their_lake(lakes: dict[str, str], tmp_path: object) -> None:
    """Every delivered row is the stored row of the lake its ``source`` names; names map codes to lakes."""
    mx = m2m.mix(lakes, WEIGHTS)
    assert mx.names == ("web", "books", "code") and mx.epoch_rows == 1590  # default: the lakes' rows summed
    stored = {}
    for name, path in lakes.items():
        with open_lake(path) as lake:
            s = lake.splats()
            stored[name] = dict(zip(s["id"].tolist(), s["mu"].astype(np.float32)))
    batches = epoch(mx.export_to_dataloader(batch_size=BS, columns=("id", "embedding"), seed=3))
    for b in batches:
        for i, code, emb in zip(b["id"].tolist(), b["source"].tolist(), b["embedding"].numpy()):
            np.testing.assert_array_equal(emb, stored[mx.names[code]][i])
    mx.close()


def test_default_batches_are_dicts_with_source(lakes: dict[str, str]) -> None:
    with m2m.mix(lakes, WEIGHTS) as mx:
        b = next(iter(mx.export_to_dataloader(batch_size=BS)))
        assert set(b) == {"embedding", "source"} and b["source"].dtype == torch.int64
        assert m2m.mix(lakes, WEIGHTS, columns=("label",)).export_to_dataloader(batch_size=BS).spec.columns[-1].name \
            == "source"


def test_epoch_length_down_and_up_sampling(lakes: dict[str, str]) -> None:
    """epoch_rows below a lake's share of rows: a subset without replacement (fresh each epoch);
    above: whole passes plus a subset."""
    with m2m.mix(lakes, WEIGHTS, epoch_rows=500) as mx:  # web 300 of 1200, books 150 of 300, code 50 of 90
        dl = mx.export_to_dataloader(batch_size=BS, columns=("id",), seed=1)
        seen = []
        for e in range(2):
            dl.set_epoch(e)
            b = epoch(dl)
            src, ids = cat(b, "source"), cat(b, "id")
            assert np.bincount(src, minlength=3).tolist() == [300, 150, 50]
            for j in range(3):
                assert len(set(ids[src == j].tolist())) == int((src == j).sum())  # no row twice
            seen.append(set(ids[src == 0].tolist()))
        assert seen[0] != seen[1]  # a fresh subset each epoch
    with m2m.mix(lakes, WEIGHTS, epoch_rows=6000) as mx:  # code: 600 draws of 90 rows
        b = epoch(mx.export_to_dataloader(batch_size=500, columns=("id",), seed=1))
        src, ids = cat(b, "source"), cat(b, "id")
        assert np.bincount(src, minlength=3).tolist() == [3600, 1800, 600]
        per_row = np.unique(ids[src == 2], return_counts=True)[1]
        assert len(per_row) == 90 and per_row.min() == 6 and per_row.max() == 7


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(lakes: dict[str, str], workers: int) -> None:
    """A state saved after k batches resumes in a new mixture at batch k, bit for bit, on every rank
    (rank 0's state loaded on both), and the next epoch follows as in an uninterrupted run."""
    kw = dict(batch_size=BS, columns=COLS, seed=9, world_size=2, num_workers=workers, generate_samples="vmf")
    if workers:
        kw.update(multiprocessing_context="fork", timeout=60)
    with m2m.mix(lakes, WEIGHTS, epoch_rows=1000) as mx:
        ref = []
        for r in range(2):
            dl = mx.export_to_dataloader(rank=r, **kw)
            ref.append([epoch(dl), epoch(dl)])  # epochs 0 and 1
        dl0 = mx.export_to_dataloader(rank=0, **kw)
        head = list(itertools.islice(iter(dl0), 4))
        state = dl0.state_dict()
        assert state["batches_yielded"] == 4 and "web=" in state["lake"] and "*0.6" in state["lake"]
    with m2m.mix(lakes, WEIGHTS, epoch_rows=1000) as again:
        for r in range(2):
            dl = again.export_to_dataloader(rank=r, **kw)
            dl.load_state_dict(copy.deepcopy(state))
            same(epoch(dl), ref[r][0][4:])
            same(epoch(dl), ref[r][1])
        assert all(torch.equal(head[0][k], ref[0][0][0][k]) for k in head[0])


@pytest.mark.parametrize("change", ["weights", "epoch_rows", "lakes"])
def test_a_state_of_another_mixture_is_refused(lakes: dict[str, str], change: str) -> None:
    with m2m.mix(lakes, WEIGHTS, epoch_rows=1000) as mx:
        dl = mx.export_to_dataloader(batch_size=BS, seed=1)
        next(iter(dl))
        state = dl.state_dict()
    other = {"weights": ({**WEIGHTS, "code": 0.2}, 1000), "epoch_rows": (WEIGHTS, 900)}
    if change == "lakes":
        mixed = m2m.mix({k: lakes[k] for k in ("web", "books")}, {"web": 0.6, "books": 0.4}, epoch_rows=1000)
    else:
        w, rows = other[change]
        mixed = m2m.mix(lakes, w, epoch_rows=rows)
    with mixed, pytest.raises(StateMismatchError) as info:
        mixed.export_to_dataloader(batch_size=BS, seed=1).load_state_dict(state)
    msg = str(info.value)
    assert "\n" not in msg and "mix[" in msg


def test_a_state_of_a_newer_lake_version_is_refused(tmp_path: object) -> None:
    a, b = os.path.join(str(tmp_path), "a"), os.path.join(str(tmp_path), "b")
    build(a, 200, 0)
    build(b, 100, 1)
    with m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}) as mx:
        dl = mx.export_to_dataloader(batch_size=BS, seed=1)
        next(iter(dl))
        state = dl.state_dict()
    assert "@v2" in state["version"] and "@v" not in state["lake"]
    with open_lake(b) as lake:
        lake.add_splats(unit(10, 5), labels=np.zeros(10, np.int64))
    with m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}) as mx, pytest.raises(StateMismatchError) as info:
        mx.export_to_dataloader(batch_size=BS, seed=1).load_state_dict(state)
    assert "@v3" in str(info.value) and "\n" not in str(info.value)


def test_each_lake_draws_from_its_own_importance_sampler(lakes: dict[str, str]) -> None:
    """importance_sampling='alpha': lake j's draws of an epoch are exactly the plan of that lake's own
    sampler for its count (same rows), with the weights its own stream delivers over its mean alpha
    (alpha / (N_j p mean_alpha_j))."""
    from m2m.stream import mixing
    from m2m.stream.from_lake import build_sampler

    with m2m.mix(lakes, WEIGHTS, epoch_rows=1000) as mx:
        dl = mx.export_to_dataloader(batch_size=BS, columns=("id", "weight"), seed=4, importance_sampling="alpha")
        b = epoch(dl)
        src, ids, w = cat(b, "source"), cat(b, "id"), cat(b, "weight")
        for j, name in enumerate(mx.names):
            lake = mx.lakes[name]
            own = build_sampler(lake, "alpha", mixing.lake_seed(4, j))
            rows, weights = own.plan(0, num_draws=mx.counts[name])
            lake_ids = lake.snapshot.ids()[rows]
            got = sorted(zip(ids[src == j].tolist(), w[src == j].tolist()))
            mean_alpha = float(lake.snapshot.read_main("alpha").astype(np.float64).mean())
            # its own stream's weights over its mean alpha: every lake's average 1
            weights = (weights.astype(np.float64) * (mx.counts[name] / len(lake) / mean_alpha)).astype(np.float32)
            assert got == sorted(zip(lake_ids.tolist(), weights.tolist()))


def test_each_lake_keeps_its_own_augmentation_geometry(tmp_path: object) -> None:
    """generate_samples='vmf' draws each row from its own lake's kappa: a lake of very concentrated
    splats stays near its rows, a diffuse one moves far."""
    tight, loose = os.path.join(str(tmp_path), "tight"), os.path.join(str(tmp_path), "loose")
    x_t = build(tight, 200, 0, kappa=np.full(200, 1e5, np.float32))
    x_l = build(loose, 200, 1, kappa=np.full(200, 2.0, np.float32))
    with m2m.mix({"tight": tight, "loose": loose}, {"tight": 1, "loose": 1}) as mx:
        b = epoch(mx.export_to_dataloader(batch_size=BS, columns=("id", "embedding"), generate_samples="vmf"))
    src, ids, emb = cat(b, "source"), cat(b, "id"), cat(b, "embedding")
    cos = {}
    for j, x in enumerate((x_t, x_l)):
        with open_lake((tight, loose)[j]) as lake:
            pos = {int(i): k for k, i in enumerate(lake.snapshot.ids())}
        rows = np.array([pos[i] for i in ids[src == j]])
        cos[j] = float(np.mean(np.sum(emb[src == j] * x[rows], axis=1)))
    assert cos[0] > 0.99 and cos[1] < 0.7


def test_errors_are_one_line(lakes: dict[str, str], tmp_path: object) -> None:
    other = os.path.join(str(tmp_path), "wide")
    build(other, 50, 0, dim=16)
    cases = [
        (lambda: m2m.mix({"web": lakes["web"], "wide": other}, {"web": 1, "wide": 1}), ["web=8", "wide=16"]),
        (lambda: m2m.mix(lakes, {"web": 1, "books": 1}), ["code"]),
        (lambda: m2m.mix(lakes, {**WEIGHTS, "news": 1}), ["news"]),
        (lambda: m2m.mix(lakes, {**WEIGHTS, "web": -1}), ["web"]),
        (lambda: m2m.mix(lakes, WEIGHTS, epoch_rows=0), ["epoch_rows"]),
        (lambda: m2m.mix(lakes, WEIGHTS, columns=("nope",)), ["nope", "web"]),
        (lambda: m2m.mix({}, {}), ["non-empty"]),
        (lambda: m2m.mix(lakes, WEIGHTS).export_to_dataloader(importance_sampling="loss").update_priorities(
            torch.arange(3), torch.ones(3)), ["source"]),
        (lambda: m2m.mix(lakes, WEIGHTS).export_to_dataloader(importance_sampling="loss").update_priorities(
            torch.arange(3), torch.ones(3), source=torch.tensor([0, 1, 7])), ["source 7"]),
        (lambda: m2m.open_lake(lakes["web"]).export_to_dataloader(importance_sampling="loss").update_priorities(
            torch.arange(3), torch.ones(3), source=torch.zeros(3)), ["source=", "one lake"]),
        (lambda: m2m.mix(lakes, WEIGHTS).export_to_dataloader(columns=("nope",)), ["nope"]),
    ]
    for make, words in cases:
        with pytest.raises(ConfigError) as info:
            make()
        msg = str(info.value)
        assert isinstance(info.value, (M2MError, ValueError)) and "\n" not in msg, msg
        for word in words:
            assert word in msg, (word, msg)


def test_a_lake_moved_after_mix_is_refused(tmp_path: object) -> None:
    a, b = os.path.join(str(tmp_path), "a"), os.path.join(str(tmp_path), "b")
    build(a, 100, 0)
    build(b, 100, 1)
    with open_lake(a) as la, open_lake(b) as lb:
        mx = m2m.mix({"a": la, "b": lb}, {"a": 1, "b": 1})
        la.add_splats(unit(5, 9), labels=np.zeros(5, np.int64))
        with pytest.raises(ConfigError, match="another version"):
            mx.export_to_dataloader(batch_size=BS)


def test_epochs_differ_and_repeat(lakes: dict[str, str]) -> None:
    with m2m.mix(lakes, WEIGHTS, epoch_rows=400) as mx:
        dl = mx.export_to_dataloader(batch_size=BS, columns=("id",), seed=2)
        e0, e1 = epoch(dl), epoch(dl)
        dl.set_epoch(0)
        same(epoch(dl), e0)
        assert not np.array_equal(cat(e0, "id"), cat(e1, "id"))
        assert len(dl) == 8 and len(dl.dataset) == 400


def _ddp_worker(rank: int, world_size: int, init_file: str, paths: dict[str, str], out_dir: str) -> None:
    import json

    import torch.distributed as dist

    import m2m as m

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with m.mix(paths, WEIGHTS, epoch_rows=1001) as mx:
            dl = mx.export_to_dataloader(batch_size=BS, columns=("id",), seed=6)  # rank from torch.distributed
            result: dict[str, object] = {"len": len(dl), "epochs": []}
            for e in range(2):
                dl.set_epoch(e)
                src, n = [], 0
                for batch in dl:
                    total = torch.tensor([len(batch["id"])])
                    dist.all_reduce(total)  # a collective per batch: hangs if a rank ran out early
                    src.extend(batch["source"].tolist())
                    n += 1
                result["epochs"].append({"batches": n, "source": src})  # type: ignore[attr-defined]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~35 s here
@pytest.mark.timeout(180)
def test_two_gloo_ranks_mix_in_proportion_with_equal_batch_counts(lakes: dict[str, str], tmp_path: object) -> None:
    """A real 2-process gloo run: the ranks read the topology from torch.distributed, yield the same
    number of batches, and together deliver each lake's exact count (plus one padding row)."""
    import json

    import torch.multiprocessing as mp

    here = os.path.dirname(os.path.abspath(__file__))
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = here + (os.pathsep + old if old else "")
    try:
        mp.spawn(_ddp_worker, args=(2, os.path.join(str(tmp_path), "init"), lakes, str(tmp_path)), nprocs=2,
                 join=True)
    finally:
        os.environ["PYTHONPATH"] = old
    results = [json.loads(open(os.path.join(str(tmp_path), f"rank{r}.json")).read()) for r in range(2)]
    assert results[0]["len"] == results[1]["len"] == -(-501 // BS)
    for e in range(2):
        assert results[0]["epochs"][e]["batches"] == results[1]["epochs"][e]["batches"] == results[0]["len"]
        src = np.array(results[0]["epochs"][e]["source"] + results[1]["epochs"][e]["source"])
        counts = np.bincount(src, minlength=3)
        assert len(src) == 1002 and counts.sum() - 1 == 1001  # W ceil(E / W): one padding row
        share = counts / counts.sum()
        assert np.all(np.abs(share - np.array([0.6, 0.3, 0.1])) <= 0.01 * np.array([0.6, 0.3, 0.1]))


def test_loss_sampling_keeps_each_lakes_own_priorities(lakes: dict[str, str]) -> None:
    """importance_sampling='loss': losses go to the row's own lake by ``source`` (the lakes share ids
    0..89); lake j's draws of the next epoch are exactly its own loss sampler's plan with those
    priorities, and the other lakes' priorities are untouched."""
    from m2m.sampling.samplers import LossSampler
    from m2m.stream import mixing

    with m2m.mix(lakes, WEIGHTS, epoch_rows=1000) as mx:
        dl = mx.export_to_dataloader(batch_size=BS, columns=("id", "weight"), seed=5, importance_sampling="loss")
        first = epoch(dl)
        src = cat(first, "source")
        assert sorted(np.unique(src).tolist()) == [0, 1, 2]
        hot = torch.arange(10)                              # ids 0..9 exist in every lake
        dl.update_priorities(hot, torch.full((10,), 50.0), source=torch.full((10,), 1))  # books only
        second = epoch(dl)
        src2, ids2, w2 = cat(second, "source"), cat(second, "id"), cat(second, "weight")
        for j, name in enumerate(mx.names):
            lake = mx.lakes[name]
            own = LossSampler(lake.snapshot.read_all("alpha"), lake.snapshot.ids(), seed=mixing.lake_seed(5, j))
            if name == "books":
                own.update_priorities(hot, torch.full((10,), 50.0))
            rows, weights = own.plan(1, num_draws=mx.counts[name])
            weights = (weights.astype(np.float64) * (mx.counts[name] / len(lake))).astype(np.float32)
            want = sorted(zip(lake.snapshot.ids()[rows].tolist(), weights.tolist()))
            assert sorted(zip(ids2[src2 == j].tolist(), w2[src2 == j].tolist())) == want, name
        books = ids2[src2 == 1]
        assert np.isin(books, np.arange(10)).mean() > 0.5   # 10 of 300 rows, now most of the draws
        web = ids2[src2 == 0]
        assert np.isin(web, np.arange(10)).mean() < 0.05    # 10 of 1,200 rows: untouched


@pytest.mark.parametrize("workers", [0, 2])
def test_loss_sampling_resumes_exactly_with_its_priorities(lakes: dict[str, str], workers: int) -> None:
    with m2m.mix(lakes, WEIGHTS, epoch_rows=600) as mx:
        def make() -> object:
            return mx.export_to_dataloader(batch_size=BS, columns=("id", "weight"), seed=6,
                                           importance_sampling="loss", num_workers=workers)

        dl = make()
        for b in dl:
            dl.update_priorities(b["id"], b["id"].float() % 7, source=b["source"])
        it = iter(dl)
        head = [{k: v.clone() for k, v in next(it).items()} for _ in range(4)]
        state = copy.deepcopy(dl.state_dict())
        rest = [{k: v.clone() for k, v in b.items()} for b in it]
        assert len(head) * BS + sum(len(b["id"]) for b in rest) == 600
        again = make()
        again.load_state_dict(state)
        same(rest, epoch(again))


# ----------------------------------------------------------------------------- found by probing (2026-12-06)
@pytest.fixture
def two(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build(a, 20, 1)
    with create_m2m(M2MConfig(path=b, latent_dim=D, seed=1)) as lake:
        lake.add_splats(unit(10, 2), labels=np.arange(10) % 5, metadata={"lang": np.arange(10) % 3})
    with open_lake(a) as la, open_lake(b) as lb:
        yield la, lb


def test_a_failing_update_changes_no_lake(two):
    # observed: a bad id routed to lake 1 raised after lake 0's loss was applied (a retry applied it twice)
    a, b = two
    dl = m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}).export_to_dataloader(batch_size=8, importance_sampling="loss")
    before = copy.deepcopy(dl.state_dict()["sampler"])
    with pytest.raises(M2MError, match="999"):
        dl.update_priorities(torch.tensor([0, 999]), torch.tensor([1000.0, 1.0]), source=torch.tensor([0, 1]))
    after = dl.state_dict()["sampler"]
    for lake_before, lake_after in zip(before["lakes"], after["lakes"]):
        assert torch.equal(lake_before["priorities"], lake_after["priorities"])
        assert torch.equal(lake_before["counts"], lake_after["counts"])


def test_huge_weights_keep_their_ratio_and_the_epoch_length(two):
    # observed: weights of 1e308 summed to inf, every normalised weight became 0: 2 rows an epoch
    a, b = two
    mix = m2m.mix({"a": a, "b": b}, {"a": 1e308, "b": 1e308}, epoch_rows=60)
    assert mix.counts == {"a": 30, "b": 30} and mix.weights == {"a": 0.5, "b": 0.5}


def test_a_state_names_the_weights_exactly(two):
    # observed: 1 : 1 and 1 : 1.0000008 were one name at 6 significant digits; at 10M rows an epoch their
    # counts differ and a state of one resumed the other's plan
    a, b = two
    m1 = m2m.mix({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, epoch_rows=10_000_000)
    m2 = m2m.mix({"a": a, "b": b}, {"a": 1.0, "b": 1.0000008}, epoch_rows=10_000_000)
    assert m1.counts != m2.counts
    state = m1.export_to_dataloader(batch_size=4096).state_dict()
    with pytest.raises(StateMismatchError, match="stream state is from lake mix"):
        m2.export_to_dataloader(batch_size=4096).load_state_dict(state)


@pytest.mark.parametrize("first, second", [((0.4, 0.6), (2, 3)), ((0.1, 0.3), (1, 3)), ((0.7, 0.1), (7, 1)),
                                           ((5, 12), (5 / 17, 12 / 17))])
def test_one_proportion_written_two_ways_is_one_mixture(two, first, second):
    # observed: 0.4 : 0.6 and 2 : 3 were two mixtures (their quotients differ in the last bit): a state of
    # one was refused by the other ("stream state is from lake mix[...]")
    a, b = two
    m1 = m2m.mix({"a": a, "b": b}, dict(zip("ab", first)), epoch_rows=3000)
    m2 = m2m.mix({"a": a, "b": b}, dict(zip("ab", second)), epoch_rows=3000)
    assert m1.weights == m2.weights and m1.counts == m2.counts
    dl = m1.export_to_dataloader(batch_size=100)
    next(iter(dl))
    other = m2.export_to_dataloader(batch_size=100)
    other.load_state_dict(dl.state_dict())
    assert other.state_dict() == dl.state_dict()


def test_an_empty_lake_is_refused_by_mix_and_importance_errors_name_the_lake(two, tmp_path):
    # observed: an empty lake with weight 0 was accepted, then every export refused it; an importance
    # column missing from one lake listed the other lake's columns and named no lake
    a, b = two
    with create_m2m(M2MConfig(path=str(tmp_path / "e"), latent_dim=D)) as empty:
        with pytest.raises(ConfigError, match=r"mix: lake\(s\) \['e'\] are empty"):
            m2m.mix({"a": a, "e": empty}, {"a": 1, "e": 0})
    with pytest.raises(ConfigError, match=r"mix: lake 'a': importance_sampling must be .*got 'lang'"):
        m2m.mix({"b": b, "a": a}, {"b": 1, "a": 1}).export_to_dataloader(batch_size=8, importance_sampling="lang")



def test_importance_weights_keep_the_mixtures_proportions(tmp_path: object) -> None:
    # observed: 800 and 200 rows mixed 50/50 with importance_sampling="alpha" (alpha 1): each lake's weights
    # summed to its rows (1.6 a row for web, 0.4 for books), so a weighted loss trained on the 80/20 union
    web, books = os.path.join(str(tmp_path), "web"), os.path.join(str(tmp_path), "books")
    build(web, 800, 0)
    build(books, 200, 1)
    with m2m.mix({"web": web, "books": books}, {"web": 1, "books": 1}) as mx:
        for mode in ("alpha", "kappa"):
            b = epoch(mx.export_to_dataloader(batch_size=BS, columns=("id", "weight"), importance_sampling=mode))
            src, w = cat(b, "source"), cat(b, "weight").astype(np.float64)
            assert abs(w[src == 1].sum() / w.sum() - 0.5) < 0.08, mode
            assert abs(w[src == 0].mean() - 1.0) < 0.15 and abs(w[src == 1].mean() - 1.0) < 0.15, mode


# ---------------------------------------------------------------- found by a probing user, 2026-12-07 pm


@pytest.mark.parametrize("mode", ["kappa", "alpha"])
def test_weights_keep_the_proportions_when_a_lake_has_mean_alpha_above_one(tmp_path: object, mode: str) -> None:
    """A consolidated lake (mean alpha 3) mixed 50/50 with a plain one weighed 75/25 in sum(w loss) / sum(w)."""
    heavy, plain = os.path.join(str(tmp_path), "heavy"), os.path.join(str(tmp_path), "plain")
    build(heavy, 200, 0, alpha=np.full(200, 3.0, np.float32))
    build(plain, 200, 1)
    with m2m.mix({"heavy": heavy, "plain": plain}, {"heavy": 0.5, "plain": 0.5}) as mx:
        b = epoch(mx.export_to_dataloader(batch_size=BS, importance_sampling=mode, columns=("id", "weight")))
    src, w = cat(b, "source"), cat(b, "weight").astype(np.float64)
    share = w[src == 0].sum() / w.sum()
    assert abs(share - 0.5) < 0.02, share
    assert abs(w[src == 0].mean() - 1.0) < 0.02 and abs(w[src == 1].mean() - 1.0) < 0.02


@pytest.mark.parametrize("kinds", [("timestamp[s]", "timestamp[ms]"), ("duration[s]", "int64"), ("labels",)])
def test_a_column_stored_as_different_types_is_refused(tmp_path: object, kinds: tuple[str, ...]) -> None:
    """timestamp[s] and timestamp[ms], a duration and an int64, string-label codes and int labels all
    arrive as int64: they were mixed in one tensor, silently."""
    import pyarrow as pa

    paths = [os.path.join(str(tmp_path), n) for n in ("a", "b")]
    for j, path in enumerate(paths):
        with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
            if kinds == ("labels",):
                labels = np.array(["x", "y"] * 5) if j == 0 else np.arange(10) % 2
                lake.add_splats(unit(10, j), labels=labels)
            else:
                values = pa.array(np.arange(10, dtype=np.int64) * 1000).cast(pa.int64())
                lake.add_splats(unit(10, j), metadata={"t": values.cast(pa.type_for_alias(kinds[j]))
                                                       if kinds[j] != "int64" else values})
    column = "label" if kinds == ("labels",) else "t"
    with m2m.mix({"a": paths[0], "b": paths[1]}, {"a": 1, "b": 1}) as mx:
        with pytest.raises(ConfigError, match=f"column '{column}' differs between the lakes") as info:
            mx.export_to_dataloader(batch_size=5, columns=("embedding", column))
    assert "stored" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("mode", [None, "loss"])
def test_an_end_of_epoch_state_resumes_a_mixture_after_an_append(tmp_path: object, mode: str | None) -> None:
    """As for one lake: the mixture's state named its lakes' versions, so an append refused it."""
    a, b = os.path.join(str(tmp_path), "a"), os.path.join(str(tmp_path), "b")
    build(a, 100, 0)
    build(b, 60, 1)
    kw: dict[str, object] = {"batch_size": 20, "seed": 3, "columns": ("id", "weight")}
    if mode:
        kw["importance_sampling"] = mode
    with m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}) as mx:
        dl = mx.export_to_dataloader(**kw)
        for batch in dl:
            if mode:
                dl.update_priorities(batch["id"], torch.rand(len(batch["id"])) + 0.5, source=batch["source"])
        state = dl.state_dict()
    with open_lake(b) as lake:
        lake.add_splats(unit(40, 9), labels=np.zeros(40, np.int64))
    with m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}) as mx:
        dl = mx.export_to_dataloader(**kw)
        if mode == "loss":  # as for one lake: loss priorities resume on the same rows only
            with pytest.raises(StateMismatchError, match="same rows only"):
                dl.load_state_dict(state)
            return
        dl.load_state_dict(state)
        got = epoch(dl)
        assert "b@v3" in dl.state_dict()["version"]
    assert sum(len(x["id"]) for x in got) == 200  # the grown lakes' rows, one epoch


def test_geometry_columns_are_computed_for_a_mixture_of_lakes_without_them(tmp_path: object) -> None:
    a, b = os.path.join(str(tmp_path), "a"), os.path.join(str(tmp_path), "b")
    build(a, 60, 0)
    build(b, 40, 1)
    with m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}) as mx:
        batches = epoch(mx.export_to_dataloader(batch_size=20, columns=("id", "neighbors", "neighbor_cos", "kappa")))
    nb = cat(batches, "neighbors")
    assert nb.shape[1] == 16 and (nb >= 0).all() and np.isfinite(cat(batches, "kappa")).all()


def test_a_failing_priority_update_names_its_lake(lakes: dict[str, str]) -> None:
    with m2m.mix(lakes, WEIGHTS, epoch_rows=300) as mx:
        dl = mx.export_to_dataloader(batch_size=BS, importance_sampling="loss", columns=("id", "weight"))
        with pytest.raises(M2MError, match=r"lake 'books' \(source 1\): .*id 99999"):
            dl.update_priorities(torch.tensor([0, 99999]), torch.ones(2), source=torch.tensor([0, 1]))


def test_a_loss_state_refused_for_one_lake_names_it_and_loads_no_lake(tmp_path: object) -> None:
    # observed: after an append to the second lake, a mixture's loss state was refused without naming the
    # lake ("sampler state has 100 loss priorities, the lake has 120 rows"), and the first lake's
    # priorities had been loaded already
    a, b = os.path.join(str(tmp_path), "a"), os.path.join(str(tmp_path), "b")
    build(a, 200, 0)
    build(b, 100, 1)
    with m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}) as mx:
        dl = mx.export_to_dataloader(batch_size=50, importance_sampling="loss", columns=("id",))
        for batch in dl:
            dl.update_priorities(batch["id"], torch.rand(len(batch["id"])) + 0.5, source=batch["source"])
        state = dl.state_dict()
    with open_lake(b) as lake:
        lake.add_splats(unit(20, 9), labels=np.zeros(20, dtype=np.int64))
    with m2m.mix({"a": a, "b": b}, {"a": 1, "b": 1}) as mx:
        dl = mx.export_to_dataloader(batch_size=50, importance_sampling="loss", columns=("id",))
        fresh = dl.state_dict()["sampler"]
        with pytest.raises(StateMismatchError, match=r"^mix: lake 'b' \(source 1\): sampler state has 100 loss "):
            dl.load_state_dict(state)
        after = dl.state_dict()["sampler"]
    assert torch.equal(after["lakes"][0]["priorities"], fresh["lakes"][0]["priorities"])


def test_integer_columns_that_stream_alike_still_mix(tmp_path: object) -> None:
    """uint16 and int32 (uint32 and int64) stream as the same int32 (int64) values: the stored-type check
    for unit-carrying columns must not refuse them (a review found it did)."""
    paths = [os.path.join(str(tmp_path), n) for n in ("a", "b")]
    for j, (path, dtype) in enumerate(zip(paths, (np.uint16, np.int32))):
        with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
            lake.add_splats(unit(10, j), metadata={"n": np.arange(10).astype(dtype)})
    with m2m.mix({"a": paths[0], "b": paths[1]}, {"a": 1, "b": 1}) as mx:
        got = epoch(mx.export_to_dataloader(batch_size=5, columns=("embedding", "n")))
    assert sorted(cat(got, "n").tolist()) == sorted(list(range(10)) * 2)


@pytest.mark.parametrize("workers, shuffle_mode, warm", [(0, "full", None), (0, "block", 0), (2, "block", None),
                                                        (2, "full", 0)])
def test_columns_stored_wider_in_one_lake_mix_with_their_values(tmp_path: object, workers: int, shuffle_mode: str,
                                                                 warm: int | None) -> None:
    """int32 and int64 metadata (both stream as int64), float64 and float32 (both as float32) were refused
    ("column 'm' differs between the lakes (a=int32, b=int64)"); now each lake's values arrive cast to what
    a batch holds, through the warm arena and cold gathers, with workers."""
    paths = [os.path.join(str(tmp_path), n) for n in ("a", "b")]
    m = [np.arange(30, dtype=np.int32) - 15, np.arange(30, dtype=np.int64) * 3_000_000_000]
    f = [np.linspace(-1, 1, 30), np.linspace(5, 6, 30).astype(np.float32)]
    for j, path in enumerate(paths):
        with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
            lake.add_splats(unit(30, j), labels=np.arange(30) % 3, metadata={"m": m[j], "f": f[j]})
    kw: dict[str, object] = {"num_workers": workers, "shuffle_mode": shuffle_mode}
    if warm is not None:
        kw["warm_bytes"] = warm
    with m2m.mix({"a": paths[0], "b": paths[1]}, {"a": 1, "b": 1}) as mx:
        got = epoch(mx.export_to_dataloader(batch_size=7, columns=("id", "m", "f"), seed=3, **kw))
    ids, src = cat(got, "id"), cat(got, "source")
    assert got[0]["m"].dtype == torch.int64 and got[0]["f"].dtype == torch.float32 and len(ids) == 60
    for j in (0, 1):
        assert np.array_equal(cat(got, "m")[src == j], m[j][ids[src == j]])
        assert np.array_equal(cat(got, "f")[src == j], f[j][ids[src == j]].astype(np.float32))


@pytest.mark.parametrize("which", ["versions", "unrounded"])
def test_a_state_saved_under_the_older_mixture_name_resumes(lakes: dict[str, str], which: str) -> None:
    """States saved before 2026-12-07 (pm) named the mixture with its versions (mix[web=<id>@v<n>*<w>,...;
    epoch_rows=<E>], version None), and until 2026-12-08 with the shares unrounded (0.6 : 0.3 : 0.1 as
    3 : 2 : 1 as 0.5000000000000001 : 0.33333333333333337 : ...): they resume on the same lakes and versions."""
    weights = WEIGHTS if which == "versions" else {"web": 3, "books": 2, "code": 1}
    with m2m.mix(lakes, weights, epoch_rows=300) as mx:
        dl = mx.export_to_dataloader(batch_size=BS, seed=2, columns=("id",))
        it = iter(dl)
        first = [next(it)["id"].clone() for _ in range(2)]
        state = dl.state_dict()
        rest = [b["id"].clone() for b in it]
        versions = [int(v.split("@v")[1]) for v in state["version"].split(",")]
        ids = [part.split("=")[1].split("*")[0] for part in state["lake"][4:].split(";")[0].split(",")]
        if which == "versions":
            state = dict(state, lake=mx.legacy_identities(versions, ids)[0], version=None)
            assert "@v" in state["lake"] and first
        else:
            w = np.array([weights[n] for n in mx.names], dtype=np.float64)
            w = w / w.max()
            state = dict(state, lake=mx.identity(ids, list(w / w.sum())))
            assert state["lake"] != dl.state_dict()["lake"] and first
        again = mx.export_to_dataloader(batch_size=BS, seed=2, columns=("id",))
        again.load_state_dict(state)
        got = [b["id"] for b in again]
    assert len(got) == len(rest) and all(torch.equal(a, b) for a, b in zip(got, rest))


@pytest.mark.parametrize("bad, match", [(-1.0, "must be >= 0 \\(scores\\); row 5 is -1.0"),
                                        (float("nan"), "must be finite; row 5 is nan"),
                                        (True, "is not numeric \\(dtype bool\\)")])
def test_an_importance_column_one_lake_cannot_take_names_that_lake(tmp_path: object, bad: object, match: str) -> None:
    # observed: "importance column 'q' must be >= 0 (scores); row 5 is -1.0" named no lake: row 5 of which?
    a, b = os.path.join(str(tmp_path), "a"), os.path.join(str(tmp_path), "other")
    q = np.ones(40) if bad is not True else np.zeros(40, dtype=bool)
    for path, seed in ((a, 0), (b, 1)):
        if path == b and bad is not True:
            q[5] = bad
        with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
            lake.add_splats(unit(40, seed), labels=np.arange(40) % 5, metadata={"q": q})
    with m2m.mix({"a": a, "other": b}, {"a": 1, "other": 1}) as mx:
        with pytest.raises(M2MError, match=f"^mix: lake '{'a' if bad is True else 'other'}': .*{match}"):
            mx.export_to_dataloader(batch_size=8, importance_sampling="q")


@pytest.mark.parametrize("which", [("a", "b"), ("a",)])
def test_lakes_with_their_own_source_column_mix_with_a_warning(tmp_path: object, which: tuple[str, ...],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    # observed: two lakes built like the README's quick start (metadata={"source": ...}) passed m2m.mix, then
    # every export refused them ("every lake has a column named 'source'"); with one such lake its column was
    # shadowed by the lake index without a word
    paths = {n: os.path.join(str(tmp_path), n) for n in ("a", "b")}
    for j, (n, path) in enumerate(paths.items()):
        with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
            lake.add_splats(unit(10, j), labels=np.arange(10) % 2,
                            **({"metadata": {"source": np.arange(10) + 100}} if n in which else {}))
    with caplog.at_level("WARNING", logger="m2m.stream.mixture"), m2m.mix(paths, {"a": 1, "b": 1}) as mx:
        got = epoch(mx.export_to_dataloader(batch_size=4, columns=("id", "source")))
    assert sorted(cat(got, "source").tolist()) == [0] * 10 + [1] * 10
    assert f"mix: lake(s) {list(which)} have a column named 'source'" in caplog.text


def test_a_state_of_the_previous_code_with_another_plan_is_refused(lakes: dict[str, str]) -> None:
    # a review found a state named with the previous code's unrounded shares accepted when its counts (drawn
    # from the weights relative to the largest) differed from today's: 0.3 : 3 : 0.3 at 1,000 rows an epoch
    # planned 84/833/83, today 83/834/83, and the resume served other rows
    weights = {"web": 0.3, "books": 3, "code": 0.3}
    with m2m.mix(lakes, weights, epoch_rows=1000) as mx:
        w = np.array([weights[n] for n in mx.names], dtype=np.float64)
        w = w / w.max()
        assert mixing.counts(w, 1000).tolist() != list(mx.counts.values())
        dl = mx.export_to_dataloader(batch_size=BS, columns=("id",))
        next(iter(dl))
        state = dl.state_dict()
        ids = [part.split("=")[1].split("*")[0] for part in state["lake"][4:].split(";")[0].split(",")]
        state = dict(state, lake=mx.identity(ids, list(w / w.sum())))
        with pytest.raises(StateMismatchError, match="stream state is from lake mix"):
            mx.export_to_dataloader(batch_size=BS, columns=("id",)).load_state_dict(state)


def test_a_large_lakes_importance_error_names_the_lake(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # a review found per-shard importance (lakes of RANK_LOCAL_ROWS rows and more, lowered here) reading the
    # scores at the first epoch's plan, where "scores must be finite and >= 0; row 5 is -1.0" named no lake
    import m2m.stream.order as order

    monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 16)
    paths = {n: os.path.join(str(tmp_path), n) for n in ("a", "other")}
    for n, path in paths.items():
        q = np.ones(40)
        q[5] = -1.0 if n == "other" else 1.0
        with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
            for lo in (0, 20):
                lake.add_splats(unit(20, lo), labels=np.zeros(20, np.int64), metadata={"q": q[lo:lo + 20]})
    with m2m.mix(paths, {"a": 1, "other": 1}) as mx:
        with pytest.raises(M2MError, match=r"^mix: lake 'other' \(source 1\): .*row 5 is -1.0"):
            for _ in mx.export_to_dataloader(batch_size=8, importance_sampling="q"):
                pass

