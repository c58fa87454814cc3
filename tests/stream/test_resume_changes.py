"""A state resumed by a loader whose options differ: exact, or one line naming what differs — found by
probing combinations (importance mode × resume, loss state × Lightning checkpoint, augmentation ×
layout fields, clumsy priority feedback)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

import m2m
from m2m import M2MConfig, create_m2m
from m2m.errors import ConfigError, InvalidEmbeddingError, StateMismatchError

N, D, BS = 1001, 8, 64


@pytest.fixture(scope="module")
def lake():
    with create_m2m(M2MConfig(latent_dim=D, knn_k=4)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((N, D)).astype(np.float32))
        lk.estimate_kappa(threads=1)
        yield lk


def _loader(lake, **kw):
    return lake.export_to_dataloader(batch_size=BS, seed=3, columns=("id",), **kw)


def _saved_after(dl, k: int) -> tuple[list[int], dict]:
    it = iter(dl)
    seen = [i for _ in range(k) for i in next(it)["id"].tolist()]
    return seen, dl.state_dict()


MODES = [False, "kappa", "alpha", "loss"]


@pytest.mark.parametrize("saved_mode, resumed_mode", [(a, b) for a in MODES for b in MODES if a != b])
def test_a_mid_epoch_state_of_another_importance_mode_is_refused(lake, saved_mode, resumed_mode):
    # observed: accepted silently; the epoch then lost 154 ids and repeated 153 (kappa -> plain)
    _, state = _saved_after(_loader(lake, importance_sampling=saved_mode), 3)
    other = _loader(lake, importance_sampling=resumed_mode)
    want = f"importance={m2m.stream.state.importance_name(saved_mode)!r} vs " \
           f"{m2m.stream.state.importance_name(resumed_mode)!r}"
    with pytest.raises(StateMismatchError, match=want) as info:
        other.load_state_dict(state)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_the_same_importance_mode_resumes_exactly(lake, mode):
    whole = [i for b in _loader(lake, importance_sampling=mode) for i in b["id"].tolist()]
    first, state = _saved_after(_loader(lake, importance_sampling=mode), 3)
    resumed = _loader(lake, importance_sampling=mode)
    resumed.load_state_dict(state)
    assert first + [i for b in resumed for i in b["id"].tolist()] == whole


def test_an_epoch_boundary_state_resumes_with_another_importance_mode(lake):
    dl = _loader(lake, importance_sampling="kappa")
    list(dl)
    state = dl.state_dict()
    plain = _loader(lake)
    plain.load_state_dict(state)
    assert sorted(i for b in plain for i in b["id"].tolist()) == list(range(N))


def test_a_state_from_before_the_importance_field_is_not_checked_for_it(lake):
    _, state = _saved_after(_loader(lake), 3)
    del state["importance"]
    _loader(lake).load_state_dict(state)


def test_a_loss_state_survives_a_weights_only_checkpoint(lake):
    # observed: Lightning's fit(ckpt_path=...) failed: torch.load(weights_only=True) refused the numpy arrays
    dl = lake.export_to_dataloader(batch_size=BS, seed=3, columns=("id",), importance_sampling="loss")
    it = iter(dl)
    for _ in range(3):
        b = next(it)
        dl.update_priorities(b["id"], torch.rand(len(b["id"])) * 5)
    state = dl.state_dict()
    buf = io.BytesIO()
    torch.save({"loader": state}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["loader"]
    resumed = lake.export_to_dataloader(batch_size=BS, seed=3, columns=("id",), importance_sampling="loss")
    resumed.load_state_dict(back)
    rest = [i for b in resumed for i in b["id"].tolist()]
    reference = lake.export_to_dataloader(batch_size=BS, seed=3, columns=("id",), importance_sampling="loss")
    reference.load_state_dict(state)
    assert rest == [i for b in reference for i in b["id"].tolist()] and len(rest) > 0
    assert torch.equal(resumed.plan_sampler.priorities.tensor, dl.plan_sampler.priorities.tensor)


def test_turning_augmentation_on_resumes_a_full_shuffle(tmp_path):
    # observed: refused naming window_blocks (the in-memory geometry changed the row size), though a
    # full shuffle's order does not depend on it
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:  # no estimate_kappa
        lk.add_splats(np.random.default_rng(1).standard_normal((N, D)).astype(np.float32))
        whole = [i for b in lk.export_to_dataloader(batch_size=BS, seed=3, columns=("id",)) for i in b["id"].tolist()]
        first, state = _saved_after(lk.export_to_dataloader(batch_size=BS, seed=3, columns=("id",)), 4)
        aug = lk.export_to_dataloader(batch_size=BS, seed=3, columns=("id", "embedding"), generate_samples="vmf")
        aug.load_state_dict(state)
        assert first + [i for b in aug for i in b["id"].tolist()] == whole
        # a block shuffle's order does depend on its window: still refused there
        _, block = _saved_after(lk.export_to_dataloader(batch_size=BS, seed=3, columns=("id",), shuffle_mode="block",
                                                        warm_bytes=1 << 20), 2)
        with pytest.raises(StateMismatchError, match="window_blocks"):
            lk.export_to_dataloader(batch_size=BS, seed=3, columns=("id",), shuffle_mode="block",
                                    warm_bytes=4 << 20).load_state_dict(block)


def test_a_loss_state_on_a_grown_lake_says_how_to_resume(tmp_path):
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:
        lk.add_splats(np.random.default_rng(1).standard_normal((300, D)).astype(np.float32))
        dl = lk.export_to_dataloader(batch_size=BS, columns=("id",), importance_sampling="loss")
        list(dl)
        state = dl.state_dict()
        lk.add_splats(np.random.default_rng(2).standard_normal((50, D)).astype(np.float32))
        grown = lk.export_to_dataloader(batch_size=BS, columns=("id",), importance_sampling="loss")
        with pytest.raises(StateMismatchError, match=r"300 loss priorities, the lake has 350 rows.*drop state\['sampler'\]"):
            grown.load_state_dict(state)
        del state["sampler"]
        grown.load_state_dict(state)
        assert sum(len(b["id"]) for b in grown) == 350


@pytest.mark.parametrize("ids, match", [
    ([0.7, 2.9], r"ids must be integers .*got dtype float64 \(first: 0.7\)"),
    (torch.tensor([0.0, 2.0]), r"ids must be integers .*got dtype float32"),
    ([True], r"ids must be integers .*got dtype bool"),
    (np.array([2**64 - 1], dtype=np.uint64), r"id 18446744073709551615 is not a row"),
])
def test_update_priorities_refuses_ids_that_are_not_integers(lake, ids, match):
    # observed: [0.7, 2.9] updated rows 0 and 2 (truncated), True updated row 1
    dl = lake.export_to_dataloader(batch_size=BS, columns=("id",), importance_sampling="loss")
    before = dl.plan_sampler.priorities.tensor.clone()
    with pytest.raises(InvalidEmbeddingError, match=match):
        dl.update_priorities(ids, [50.0] * len(ids))
    assert torch.equal(dl.plan_sampler.priorities.tensor, before)


def test_update_priorities_refuses_a_loss_float32_cannot_hold(lake):
    # observed: 1e39 accepted (stored as inf); the next pass failed with "scores must be finite"
    dl = lake.export_to_dataloader(batch_size=BS, columns=("id",), importance_sampling="loss")
    with pytest.raises(InvalidEmbeddingError, match="within float32; got 1e[+]39"):
        dl.update_priorities([3], np.array([1e39]))


def test_a_mixture_refuses_lake_names_or_floats_as_source(lake):
    # observed: a raw torch ValueError/TypeError for names, and 0.5 truncated to lake 0
    with create_m2m(M2MConfig(latent_dim=D)) as other:
        other.add_splats(np.random.default_rng(5).standard_normal((100, D)).astype(np.float32))
        mix = m2m.mix({"web": lake, "books": other}, {"web": 1, "books": 1}, columns=("id",))
        dl = mix.export_to_dataloader(batch_size=BS, importance_sampling="loss")
        for source, shown in ((["web", "books"], "<U5"), ("web", "<U3"), (np.array([0.5, 1.0]), "float64")):
            with pytest.raises(ConfigError, match=f"source= takes the batch's 'source' column .*got dtype {shown}"):
                dl.update_priorities([0, 1], [1.0, 2.0], source=source)
        dl.update_priorities([0, 1], [1.0, 2.0], source=torch.tensor([0, 1]))


def test_masked_metadata_becomes_the_column_types_null_or_is_refused():
    # observed: a masked bool column was stored with nulls, then a stream refused it as "strings"
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        x = np.ones((3, D), np.float32)
        with pytest.raises(InvalidEmbeddingError, match=r"metadata\['flag'\] row 1 is masked in a bool column"):
            lk.add_splats(x, metadata={"flag": np.ma.masked_array([True, False, True], mask=[0, 1, 0])})
        lk.add_splats(x, metadata={"f": np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0])})
        assert np.isnan(lk.splats()["f"][1]) and lk.splats()["f"][2] == 3.0


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_an_error_in_a_worker_is_one_line_naming_the_worker(context):
    # observed: torch's multi-line "Caught CorruptShardError in DataLoader worker process 0. Original
    # Traceback ..." as the message, and "(if `vacuum` ... ran)" for a temporary lake closed under its loader
    from m2m.errors import CorruptShardError

    lk = create_m2m(M2MConfig(latent_dim=16, shard_bytes=1 << 16, warm_bytes=1 << 16))
    for i in range(3):
        lk.add_splats(np.random.default_rng(i).standard_normal((1000, 16)).astype(np.float32))
    dl = lk.export_to_dataloader(batch_size=100, num_workers=2, multiprocessing_context=context, columns=("id",))
    assert sorted(i for b in dl for i in b["id"].tolist()) == list(range(3000))
    lk.close()  # a temporary lake: its folder goes now
    with pytest.raises(CorruptShardError, match=r"is missing: its folder .* is gone \(moved or removed since the "
                                                r"lake was opened; a temporary lake is removed when it is closed"
                                                r".*\(in DataLoader worker process \d\)$") as info:
        list(dl)
    assert "\n" not in str(info.value) and info.value.__cause__ is not None


def _loss_epochs(peek: str, workers: int = 0, stop: int | None = None) -> list[list[int]]:
    """Two auto-advancing epochs (no set_epoch) of a loss-sampled stream fed a fixed per-row loss;
    ``peek``: "len" or "state_dict" read after each batch; ``stop``: resume epoch 1 after that many
    batches from a saved state in a new loader."""
    with create_m2m(M2MConfig(latent_dim=16)) as lk:
        lk.add_splats(torch.randn(1000, 16, generator=torch.Generator().manual_seed(0)))

        def make():
            return lk.export_to_dataloader(batch_size=100, columns=("id",), importance_sampling="loss",
                                           num_workers=workers, persistent_workers=bool(workers))

        dl = make()
        epochs: list[list[int]] = []
        for epoch in range(2):
            ids: list[int] = []
            for j, b in enumerate(dl):
                ids += b["id"].tolist()
                if peek == "state_dict":
                    dl.state_dict()
                elif peek == "len":
                    len(dl)
                dl.update_priorities(b["id"], (b["id"] % 10).float() + 0.1)
                if epoch == 1 and stop is not None and j + 1 == stop:
                    state = dl.state_dict()
                    dl.close()
                    dl = make()
                    dl.load_state_dict(state)
                    for b2 in dl:
                        ids += b2["id"].tolist()
                        dl.update_priorities(b2["id"], (b2["id"] % 10).float() + 0.1)
                    break
            epochs.append(ids)
        dl.close()
        return epochs


@pytest.mark.parametrize("peek", ["len", "state_dict"])
def test_reading_len_or_the_state_does_not_freeze_the_next_loss_plan_early(peek):
    # observed: len(dl) or dl.state_dict() during epoch 0 froze epoch 1's loss priorities at that moment
    # (with len() each step epoch 1 was the uniform plan: all of epoch 0's feedback thrown away)
    plain = _loss_epochs("none")
    assert len(set(plain[1])) < 900  # the feedback changed the plan
    assert _loss_epochs(peek) == plain


def test_a_loss_resume_with_persistent_workers_continues_the_delivered_plan():
    # observed: the main process froze epoch 1's plan at a len(dl) in epoch 0, its workers at the pass's
    # start; the state saved the main process's plan, so the resumed half dropped and repeated rows
    plain = _loss_epochs("none")
    assert _loss_epochs("len", workers=2, stop=5) == plain


def _high_loss_share_of_epoch_1(kind: str, peek: str | None, feed: bool = True, **kw: Any) -> tuple[float, int, int]:
    """Rows with id % 10 == 0 get loss 100, others 0.01, during epoch 0 (``peek`` read at its first batch);
    returns epoch 1's share of them, len(dl) and the batches epoch 1 delivered."""
    g = np.random.default_rng(0)
    lakes = []
    for n in (103, 57) if kind == "mixture" else (600,):
        lk = create_m2m(M2MConfig(latent_dim=8))
        for part in np.array_split(np.arange(n), 3):
            lk.add_splats(g.standard_normal((len(part), 8)))
        lakes.append(lk)
    src = m2m.mix({"a": lakes[0], "b": lakes[1]}, {"a": 1, "b": 1}) if kind == "mixture" else lakes[0]
    opts = dict(shuffle_mode="block", block_rows=20, shard_affinity=True) if kind == "affinity" else {}
    dl = src.export_to_dataloader(batch_size=10, importance_sampling="loss", seed=1, columns=("id",), **opts, **kw)
    for j, b in enumerate(dl):
        if j == 0 and peek == "len":
            len(dl)
        elif j == 0 and peek == "state_dict":
            dl.state_dict()
        if feed:
            loss = torch.where(b["id"] % 10 == 0, 100.0, 0.01).double()
            dl.update_priorities(b["id"], loss, **({"source": b["source"]} if kind == "mixture" else {}))
    ids = [b["id"] for b in dl]
    dl.close()
    for lk in lakes:
        lk.close()
    return float((torch.cat(ids) % 10 == 0).double().mean()), len(dl), len(ids)


@pytest.mark.parametrize("kind", ["mixture", "affinity"])
@pytest.mark.parametrize("peek", ["len", "state_dict"])
def test_reading_len_or_the_state_of_a_mixture_or_affinity_stream_keeps_the_loss_feedback(kind, peek):
    # observed: on a mixture (its sampler takes no num_draws) and with shard affinity, one len(dl) (affinity: or
    # state_dict()) in epoch 0 drew epoch 1's plan then, before any loss was fed back: epoch 1 was drawn as if
    # update_priorities had never been called (share 0.11 against 0.90)
    fed, n_len, n_iter = _high_loss_share_of_epoch_1(kind, None)
    never, _, _ = _high_loss_share_of_epoch_1(kind, None, feed=False)
    assert fed > 0.5 > never and n_len == n_iter
    assert _high_loss_share_of_epoch_1(kind, peek)[0] == fed


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("kind", ["mixture", "affinity"])
def test_the_counted_batches_of_a_loss_stream_are_the_delivered_ones(kind, drop_last):
    for world_size in (1, 3):
        counts = [_high_loss_share_of_epoch_1(kind, None, rank=r, world_size=world_size, drop_last=drop_last)[1:]
                  for r in range(world_size)]
        assert all(n_len == n_iter for n_len, n_iter in counts) and len({c[0] for c in counts}) == 1


@pytest.mark.parametrize("kind", ["lake", "mixture"])
def test_a_loss_epoch_revisited_with_set_epoch_resumes_the_plan_it_served(kind):
    # observed: epochs 1, 0, 2, 0: the second pass of epoch 0 was served from the loader's cached plan while
    # epoch 0's frozen priorities had been dropped (kept by epoch number, not by when they were frozen): a
    # state saved mid-pass lacked them and the resumed loader drew another plan (rows repeated and missed)
    g = np.random.default_rng(3)
    lakes = [create_m2m(M2MConfig(latent_dim=8)) for _ in range(2 if kind == "mixture" else 1)]
    for lk, n in zip(lakes, (103, 57)):
        lk.add_splats(g.standard_normal((n, 8)))
    src = m2m.mix({"a": lakes[0], "b": lakes[1]}, {"a": 1, "b": 1}) if kind == "mixture" else lakes[0]

    def make():  # type: ignore[no-untyped-def]
        return src.export_to_dataloader(batch_size=10, importance_sampling="loss", seed=5, columns=("id",))

    def train(dl, stop=None):  # type: ignore[no-untyped-def]
        seen = []
        for k, epoch in enumerate([1, 0, 2, 0]):
            dl.set_epoch(epoch)
            for j, b in enumerate(dl):
                seen.append(b["id"].clone())
                extra = {"source": b["source"]} if kind == "mixture" else {}
                dl.update_priorities(b["id"], ((b["id"] * (k + 3)) % 13).double() + 0.1, **extra)
                if (k, j) == stop:
                    buf = io.BytesIO()
                    torch.save(dl.state_dict(), buf)
                    buf.seek(0)
                    return seen, torch.load(buf, weights_only=True)
        return seen, None

    full, _ = train(make())
    part, state = train(make(), stop=(3, 4))
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["id"] for b in resumed]
    assert torch.equal(torch.cat(part + rest), torch.cat(full))
    for lk in lakes:
        lk.close()


@pytest.mark.parametrize("change", ["consolidate+append", "rollback+append", "kappa", "compact"])
def test_a_loss_state_resumes_on_its_own_rows_only(tmp_path, change):
    """A state of as many rows but other ones was loaded position by position (a probing user: another
    row drawn 181 times of 200); adding kappa sidecars keeps the rows, so the state still resumes."""
    x = np.random.default_rng(1).standard_normal((200, D)).astype(np.float32)
    x[150:160] = x[150]  # 10 duplicates that consolidate merges into row 150
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:
        lk.add_splats(x[:100])
        lk.add_splats(x[100:])
        dl = lk.export_to_dataloader(batch_size=BS, columns=("id",), importance_sampling="loss", seed=1)
        for b in dl:
            dl.update_priorities(b["id"], (b["id"] == 170).float() * 100 + 0.01)
        state = dl.state_dict()
        assert "rows" in state["sampler"]
        if change == "consolidate+append":
            lk.consolidate(0.999)
            lk.add_splats(np.random.default_rng(2).standard_normal((200 - len(lk), D)).astype(np.float32))
        elif change == "rollback+append":
            from m2m.lake.recovery import rollback

            rollback(lk._fs, 0)
            lk.refresh()
            lk.add_splats(np.random.default_rng(3).standard_normal((200, D)).astype(np.float32))
        elif change == "compact":  # the same rows in fewer shards
            assert lk.compact(target_bytes=1 << 20).version is not None and len(lk.manifest.shards) == 1
        else:
            lk.estimate_kappa(threads=1)
        assert len(lk) == 200
        again = lk.export_to_dataloader(batch_size=BS, columns=("id",), importance_sampling="loss", seed=1)
        if change in ("kappa", "compact"):
            again.load_state_dict(state)
            drawn = np.concatenate([b["id"].numpy() for b in again])
            assert (drawn == 170).sum() > 50  # the high-loss row keeps its priority
            return
        with pytest.raises(StateMismatchError, match="other rows than this snapshot's.*same rows only"):
            again.load_state_dict(state)


def _loss_of(ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(ids.sum()))
    return torch.rand(len(ids), generator=g) * 5 + 0.01


def _loss_epoch(dl, n: int | None = None) -> list[list[int]]:
    out = []
    for b in dl:
        out.append(b["id"].tolist())
        dl.update_priorities(b["id"], _loss_of(b["id"]))
        if n is not None and len(out) == n:
            break
    return out


@pytest.fixture
def loss_lake():
    with create_m2m(M2MConfig(latent_dim=8)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32))
        yield lk


@pytest.mark.parametrize("sharded", [False, True])
def test_a_loss_state_loaded_into_a_loader_that_went_on_resumes_as_a_fresh_one(loss_lake, monkeypatch, sharded):
    # rolling back to a checkpoint in the same process: the loader had cached the next epoch's plan,
    # drawn from priorities the state replaces, and served it (a probing user, 2026-12-07)
    if sharded:
        import m2m.stream.order as order
        monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 100)   # the per-shard loss sampler of 2**24+ rows
    kw = dict(batch_size=50, columns=("id",), seed=3, importance_sampling="loss")
    ref = loss_lake.export_to_dataloader(**kw)
    want = [_loss_epoch(ref) for _ in range(3)]
    dl = loss_lake.export_to_dataloader(**kw)
    _loss_epoch(dl)
    part = _loss_epoch(dl, 5)
    state = dl.state_dict()
    _loss_epoch(dl, 3)                                    # training goes on into epoch 2, then rolls back
    dl.load_state_dict(state)
    assert part + _loss_epoch(dl) == want[1]
    assert _loss_epoch(dl) == want[2]


def test_reading_the_state_at_an_epochs_last_batch_leaves_a_per_shard_loss_plan_alone(loss_lake, monkeypatch):
    # ShardedLoss (lakes of 2**24 rows or more): state_dict() / len(dl) on the last batch, before its
    # losses were fed back, drew the next epoch's plan and froze its priorities early
    import m2m.stream.order as order
    monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 100)
    kw = dict(batch_size=50, columns=("id",), seed=3, importance_sampling="loss")

    def run(peek: bool) -> list[list[int]]:
        dl = loss_lake.export_to_dataloader(**kw)
        n, out = len(dl), []
        for _ in range(2):
            for i, b in enumerate(dl):
                out.append(b["id"].tolist())
                if peek and i == n - 1:
                    dl.state_dict()
                    len(dl)
                dl.update_priorities(b["id"], _loss_of(b["id"]))
        assert type(dl.plan_sampler).__name__ == "ShardedLoss"
        return out

    assert run(True) == run(False)


def test_an_epoch_boundary_state_resumes_when_auto_picks_another_layout(tmp_path):
    # shuffle_mode="auto" picks a full shuffle while the lake fits warm_bytes and a block shuffle once it
    # grew past it: an epoch-boundary state was refused ("shuffle='full' vs 'block'") though nothing the
    # user asked changed (a probing user, 2026-12-07); mid-epoch the layout still has to match
    lake = create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=16, warm_bytes=200_000))
    rng = np.random.default_rng(0)
    lake.add_splats(rng.standard_normal((2000, 16)).astype(np.float32))
    kw = dict(batch_size=100, columns=("id",), seed=1)
    dl = lake.export_to_dataloader(**kw)
    for _ in dl:
        pass
    boundary = dl.state_dict()
    it = iter(dl)
    next(it)
    mid = dl.state_dict()
    del it
    dl.close()
    assert boundary["shuffle"] == "full" and boundary["shuffle_asked"] == "auto"
    lake.add_splats(rng.standard_normal((2000, 16)).astype(np.float32))   # now beyond warm_bytes
    dl2 = lake.export_to_dataloader(**kw)
    dl2.load_state_dict(boundary)
    ids = [i for b in dl2 for i in b["id"].tolist()]
    assert dl2.state_dict()["shuffle"] == "block" and sorted(ids) == list(range(4000))
    with pytest.raises(StateMismatchError, match="mid-epoch"):
        lake.export_to_dataloader(**kw).load_state_dict(mid)
    # shuffling on or off still counts at a boundary; the mode asked only through the layout it gives
    with pytest.raises(StateMismatchError, match="shuffle=True vs False"):
        lake.export_to_dataloader(**kw, shuffle=False).load_state_dict(boundary)
    lake.export_to_dataloader(**kw, shuffle_mode="full").load_state_dict(boundary)
    old = {k: v for k, v in boundary.items() if k != "shuffle_asked"}    # a state from before: as it was
    with pytest.raises(StateMismatchError, match="shuffle='full' vs 'block'"):
        lake.export_to_dataloader(**kw).load_state_dict(old)
    lake.close()


def test_a_mid_epoch_state_over_in_memory_geometry_needs_the_same_k_and_seed(tmp_path):
    # no stored kappa: a "kappa" importance plan comes from geometry computed at the handle's knn_k;
    # open_lake(path) (knn_k 16) took a state of a knn_k=4 handle and served another plan, silently
    # (198 of 1,000 draws: a probing user, 2026-12-07)
    p = tmp_path / "l"
    with create_m2m(M2MConfig(path=p, latent_dim=8, knn_k=4)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32))
        kw = dict(batch_size=50, columns=("id",), seed=2, importance_sampling="kappa")
        want = [i for b in lk.export_to_dataloader(**kw) for i in b["id"].tolist()]
        dl = lk.export_to_dataloader(**kw)
        got, state = _saved_after(dl, 7)
        assert state["geometry"] == "k=4"              # (an exact search: no seed in it)
    with m2m.open_lake(p) as lk:                       # knn_k 16 (nothing stored says 4)
        with pytest.raises(StateMismatchError, match="geometry='k=4' vs 'k=16'"):
            lk.export_to_dataloader(**kw).load_state_dict(state)
        # a loader that needs no geometry reads the same order: it resumes (review, 2026-12-07)
        plain = lk.export_to_dataloader(batch_size=50, columns=("id",), seed=2)
        plain_state = _saved_after(plain, 3)[1]
        assert plain_state["geometry"] == "none"
        lk.export_to_dataloader(batch_size=50, columns=("id",), seed=2).load_state_dict(
            dict(plain_state, geometry="k=4"))
    with m2m.open_lake(p, knn_k=4, seed=1) as lk:      # another config seed: the exact search is the same
        dl = lk.export_to_dataloader(**kw)
        dl.load_state_dict(state)
        assert got + [i for b in dl for i in b["id"].tolist()] == want
    with m2m.open_lake(p, knn_k=4) as lk:
        dl = lk.export_to_dataloader(**kw)
        dl.load_state_dict(state)
        assert got + [i for b in dl for i in b["id"].tolist()] == want


def test_an_older_mid_epoch_state_over_float16_geometry_computed_in_memory_is_refused(tmp_path):
    # float16 rows are renormalised before the in-memory kNN since 2026-12-07: an older state's "kappa"
    # plan was drawn from other kappa and resumed onto the new plan silently (review, 2026-12-07)
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=8, storage_dtype="float16")) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32))
        kw = dict(batch_size=50, columns=("id",), seed=2, importance_sampling="kappa")
        state = _saved_after(lk.export_to_dataloader(**kw), 3)[1]
        assert "float16" in state["geometry"]
        older = {k: v for k, v in state.items() if k not in ("geometry", "shuffle_asked")}
        with pytest.raises(StateMismatchError, match="before 2026-12-07 over geometry computed in memory"):
            lk.export_to_dataloader(**kw).load_state_dict(older)
        lk.export_to_dataloader(**kw).load_state_dict(state)          # a state of today's: resumes


def test_a_copy_of_a_lake_that_diverged_refuses_the_originals_mid_epoch_state(tmp_path):
    # a copied folder (a restored backup) appended to on both sides: version 2 with 600 rows and the same
    # lake id on each, other vectors under the same ids; the original's state was accepted on the copy
    # (a probing user, 2026-12-07). States record each version's commit time (`snapshot`).
    import shutil

    rng = np.random.default_rng(0)
    with create_m2m(M2MConfig(path=tmp_path / "a", latent_dim=8)) as lk:
        lk.add_splats(rng.standard_normal((500, 8)).astype(np.float32))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("a", "b"):
        with m2m.open_lake(tmp_path / name) as lk:
            lk.add_splats(rng.standard_normal((100, 8)).astype(np.float32))
    kw = dict(batch_size=50, columns=("id",), seed=1)
    with m2m.open_lake(tmp_path / "a") as lk:
        got, state = _saved_after(lk.export_to_dataloader(**kw), 3)
        assert state["snapshot"].startswith("v2@")
        dl = lk.export_to_dataloader(**kw)
        dl.load_state_dict(state)                      # the original: resumes
        assert len(got) + sum(len(b["id"]) for b in dl) == 600
    with m2m.open_lake(tmp_path / "b") as lk:
        assert lk.version == 2 and len(lk) == 600
        with pytest.raises(StateMismatchError, match="snapshot="):
            lk.export_to_dataloader(**kw).load_state_dict(state)
        lk.export_to_dataloader(**kw).load_state_dict(dict(state, batches_yielded=0))   # a boundary: fine
