"""Helpers of the conformance matrix: the small lakes, a cell's loader keywords, and the checks every
cell makes (exact epoch coverage or the documented importance draws, column values, equal batch
counts per rank, bit-equal batches). Used by the tests and by `resume_child.py` (a fresh process).

A "mix" cell streams `m2m.mix` of the cell's lake ("main", local or remote) and a local lake of
`MIX_ROWS` other rows ("other") with weights `MIX_WEIGHTS` and ``epoch_rows=N``, so its epochs have
the one-lake shape: exact per-lake counts (main down-sampled, other one whole pass) plus the padding."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

N, D, BS = 1001, 8, 64   # 1001 rows: one padding row over 2 ranks, a short last batch on every rank
CHUNKS = (400, 400, 201)  # three commits: three shards (node cache and shard affinity have work to do)
SEED = 7
K_RESUME = 3              # batches taken before the state is saved
WORKER_TIMEOUT_S = 60     # DataLoader timeout with workers: a stuck worker is an error, never a hang
CHILD_TIMEOUT_S = 240
HERE = os.path.dirname(os.path.abspath(__file__))

MIX_ROWS = 300
MIX_WEIGHTS = {"main": 0.7, "other": 0.3}
MIX_COUNTS = (701, 300)    # largest remainder of 0.7 / 0.3 x 1001
GENERATE = {"plain": False, "kappa": False, "loss": False, "vmf": "vmf", "mixture": "mixture", "langevin": "langevin"}
#: ``mu`` levels: the lake's storage dtype, and the delivered embedding dtype when it is not float32
#: ("float16-stored": a float16 lake streamed with ``embedding_dtype="stored"``: float16 batches)
STORAGE = {"float32": "float32", "float16": "float16", "float16-stored": "float16"}
DELIVERED = {"float32": torch.float32, "float16": torch.float32, "float16-stored": torch.float16}
IMPORTANCE = {"plain": False, "kappa": "kappa", "loss": "loss", "vmf": False, "mixture": False, "langevin": False}


# ----------------------------------------------------------------------------- lakes
def lake_columns(mu: str, label: str, meta: str, n: int = N, seed: int = 11) -> dict[str, np.ndarray]:
    """The rows of a lake (deterministic): ``mu`` [n, D] float32, ``label``, ``meta``."""
    g = np.random.default_rng(seed)
    centers = g.standard_normal((6, D)).astype(np.float32)
    lab = g.integers(0, 6, n)
    x = centers[lab] + 0.35 * g.standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels: np.ndarray = np.array([f"class-{v}" for v in lab]) if label == "str" else lab.astype(np.int64)
    i = np.arange(n)
    metas = {
        "bool": i % 3 == 0,
        "int": (i * 7 - 3000).astype(np.int64),
        "uint": i.astype(np.uint64) + np.uint64(1 << 63),  # only an unsigned 64-bit dtype holds these
        "float": (i / 7.0).astype(np.float64),
        "str": np.array([f"s{v}" for v in i]),
    }
    return {"mu": x.astype(np.float32), "label": labels, "meta": metas[meta]}


@dataclass
class Built:
    """A lake of the matrix, or the one-line error its ingest gave."""

    key: tuple[str, str, str, str]           # (source, mu, label, meta)
    path: str = ""
    open_kw: dict[str, Any] = field(default_factory=dict)  # storage_options / cache_dir for open_lake
    ingest_error: BaseException | None = None
    expected: dict[str, dict[int, Any]] = field(default_factory=dict)  # column -> id -> value
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def build_lake(key: tuple[str, str, str, str], path: str, open_kw: dict[str, Any], n: int = N, seed: int = 11,
               chunks: tuple[int, ...] = CHUNKS) -> Built:
    from m2m import M2MConfig, create_m2m, open_lake
    from m2m.errors import M2MError

    _, mu, label, meta = key
    data = lake_columns(mu, label, meta, n, seed)
    built = Built(key=key, path=path, open_kw=open_kw)
    cfg = M2MConfig(path=path, latent_dim=D, storage_dtype=STORAGE[mu], seed=3, **open_kw)
    with create_m2m(cfg) as lake:
        start = 0
        try:
            for rows in chunks:
                sl = slice(start, start + rows)
                lake.add_splats(data["mu"][sl], labels=data["label"][sl], metadata={"meta": data["meta"][sl]})
                start += rows
        except M2MError as e:  # a type the lake refuses at ingest (allowed for uint64, with one line)
            built.ingest_error = e
            return built
        # persisted kappa and neighbours: loaders skip the in-memory kNN (tested in tests/stream), which
        # would otherwise dominate the matrix's time
        lake.estimate_kappa()
    with open_lake(path, **open_kw) as lake:
        s = lake.splats()
        built.ids = s["id"].astype(np.int64)
        built.expected = {
            "embedding": dict(zip(built.ids.tolist(), s["mu"].astype(np.float32))),
            "label": dict(zip(built.ids.tolist(), data["label"].tolist())),
            "meta": dict(zip(built.ids.tolist(), data["meta"].tolist())),
        }
    return built


# ----------------------------------------------------------------------------- loaders
def loader_kwargs(mode: str, shuffle: str, workers: str, rank: int, world: int, columns: tuple[str, ...],
                  mix_with: str | None = None, mu: str = "float32") -> dict[str, Any]:
    """The `export_to_dataloader` keywords of a cell (JSON-able: the fresh process rebuilds the same loader);
    ``mix_with``: the path of the "other" lake of a mix cell (kept under the key ``"mix"``)."""
    kw: dict[str, Any] = dict(batch_size=BS, columns=list(columns), seed=SEED, rank=rank, world_size=world,
                              generate_samples=GENERATE[mode], importance_sampling=IMPORTANCE[mode])
    if mix_with is not None:
        kw["mix"] = mix_with
    if DELIVERED[mu] != torch.float32:
        kw["embedding_dtype"] = "stored"
    if shuffle == "block":  # blocks of 64 rows, windows of a few blocks: the block order really is local
        kw.update(shuffle_mode="block", block_rows=64, warm_bytes=1 << 16)
    else:
        kw.update(shuffle_mode="full")
    if workers != "0":
        n, ctx = workers.split("-")
        kw.update(num_workers=int(n), multiprocessing_context=ctx, timeout=WORKER_TIMEOUT_S)
    return kw


def cell_columns(mode: str, meta: str) -> tuple[str, ...]:
    cols = ("id", "embedding", "label")
    if meta != "str":  # strings are refused in columns= (checked on their own)
        cols += ("meta",)
    if IMPORTANCE[mode]:
        cols += ("weight",)
    return cols


def loader_of(lake: Any, kw: dict[str, Any]) -> Any:
    import m2m

    kw = dict(kw)
    kw["columns"] = tuple(kw["columns"])
    other = kw.pop("mix", None)
    if other is None:
        return lake.export_to_dataloader(**kw)
    # the mixture opens "other" from its path and keeps it open as long as the loader needs it
    return m2m.mix({"main": lake, "other": other}, MIX_WEIGHTS, epoch_rows=N).export_to_dataloader(**kw)


def snapshot(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's tensors, copied to the CPU (outputs may be pooled and reused by the stream)."""
    return {k: v.detach().to("cpu").clone() for k, v in batch.items()}


def take(dl: Any, k: int) -> list[dict[str, torch.Tensor]]:
    it = iter(dl)
    out = [snapshot(b) for b in itertools.islice(it, k)]
    del it
    return out


def epoch_of(dl: Any) -> list[dict[str, torch.Tensor]]:
    return [snapshot(b) for b in dl]


# ----------------------------------------------------------------------------- the fresh process
def resume_in_child(path: str, open_kw: dict[str, Any], kws: list[dict[str, Any]], states: list[Any],
                    workdir: str) -> list[list[dict[str, torch.Tensor]]]:
    """Open the lake in a new interpreter, build each rank's loader, load its state, return the rest."""
    spec = os.path.join(workdir, "child.json")
    states_path = os.path.join(workdir, "states.pt")
    out = os.path.join(workdir, "out.pt")
    torch.save(states, states_path)
    with open(spec, "w") as f:
        json.dump({"path": path, "open_kw": open_kw, "kws": kws, "states": states_path, "out": out}, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "resume_child.py"), spec], env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, f"fresh-process resume failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return torch.load(out, weights_only=False)


# ----------------------------------------------------------------------------- checks
def same_batches(got: list[dict[str, torch.Tensor]], ref: list[dict[str, torch.Tensor]], where: str) -> None:
    assert len(got) == len(ref), f"{where}: {len(got)} batches, the uninterrupted reference has {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.keys() == b.keys(), f"{where}, batch {i}: columns {list(a)} vs {list(b)}"
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), \
                f"{where}, batch {i}, column {k!r} differs from the uninterrupted reference"


def check_epoch(per_rank: list[list[dict[str, torch.Tensor]]], built: Built, mode: str, world: int,
                other: Built | None = None, emb_dtype: torch.dtype = torch.float32) -> None:
    """One epoch over ``world`` ranks: the contract of docs/stream.md and docs/soc.md (a mixture with
    ``other``: docs/stream.md, "Mixing lakes")."""
    per_rank_rows = -(-N // world)
    nb = -(-per_rank_rows // BS)
    counts = [len(r) for r in per_rank]
    assert counts == [nb] * world, f"batches per rank {counts}, expected {nb} on each"
    for r, batches in enumerate(per_rank):
        sizes = [len(b["id"]) for b in batches]
        assert sizes == [BS] * (nb - 1) + [per_rank_rows - (nb - 1) * BS], f"rank {r}: batch sizes {sizes}"
    ids = np.concatenate([b["id"].numpy() for r in per_rank for b in r])
    all_ids = set(built.ids.tolist())
    delivered = world * per_rank_rows  # W ceil(N / W): padding rows, or for a plan exactly its draws
    assert len(ids) == delivered
    if other is not None:
        check_mix(per_rank, built, other, mode, delivered, emb_dtype)
        return
    if IMPORTANCE[mode]:
        check_importance(per_rank, ids, delivered, mode, all_ids)
    else:
        assert set(ids.tolist()) == all_ids, "an epoch does not cover every row"
        _, counts_ = np.unique(ids, return_counts=True)
        assert int((counts_ - 1).sum()) == delivered - N and counts_.max() <= 2, \
            f"rows repeated beyond the {delivered - N} padding row(s)"
    check_values(per_rank, built, mode, emb_dtype=emb_dtype)


def check_importance(per_rank: list[list[dict[str, torch.Tensor]]], ids: np.ndarray, draws: int, mode: str,
                     all_ids: set[int]) -> None:
    """docs/soc.md: M = W ceil(N/W) systematic draws, weight alpha / (M p) (alpha = 1 here), so row i is
    drawn floor(M p_i) or ceil(M p_i) times with M p_i = 1 / w_i, and every draw of a row has its weight."""
    w = np.concatenate([b["weight"].numpy() for r in per_rank for b in r]).astype(np.float64)
    assert np.isfinite(w).all() and (w > 0).all()
    by_id: dict[int, set[float]] = {}
    for i, wi in zip(ids.tolist(), w.tolist()):
        by_id.setdefault(i, set()).add(wi)
    assert all(len(v) == 1 for v in by_id.values()), "one row drawn with different weights in one epoch"
    uniq, counts = np.unique(ids, return_counts=True)
    expected = np.array([1.0 / next(iter(by_id[i])) for i in uniq.tolist()])  # M p_i
    assert (counts >= np.floor(expected - 1e-3)).all() and (counts <= np.ceil(expected + 1e-3)).all(), \
        "draw counts are not floor/ceil of M p_i (systematic resampling with weight alpha / (M p))"
    assert expected.sum() <= draws * (1 + 1e-4), "the weights imply more than M draws"
    assert set(uniq.tolist()) <= all_ids
    if mode == "loss":  # no feedback yet: uniform priorities, M p_i = M / N >= 1, every row drawn
        assert set(uniq.tolist()) == all_ids


def check_mix(per_rank: list[list[dict[str, torch.Tensor]]], main: Built, other: Built, mode: str,
              delivered: int, emb_dtype: torch.dtype = torch.float32) -> None:
    """A mixture's epoch: each lake's exact count (plus the padding rows, copies of the epoch's first
    draws), main down-sampled without repeats, other one whole pass; importance weights per lake."""
    src = np.concatenate([b["source"].numpy() for r in per_rank for b in r])
    ids = np.concatenate([b["id"].numpy() for r in per_rank for b in r])
    counts = np.bincount(src, minlength=2)
    pad = delivered - N
    assert counts.sum() == delivered and all(0 <= counts[j] - MIX_COUNTS[j] <= pad for j in range(2)), \
        f"per-lake draws {counts.tolist()}, expected {list(MIX_COUNTS)} plus {pad} padding row(s)"
    for j, built in enumerate((main, other)):
        mine = ids[src == j]
        assert set(mine.tolist()) <= set(built.ids.tolist())
        if IMPORTANCE[mode]:
            w = np.concatenate([b["weight"].numpy() for r in per_rank for b in r])[src == j].astype(np.float64)
            assert np.isfinite(w).all() and (w > 0).all()
            by_id: dict[int, set[float]] = {}
            for i, wi in zip(mine.tolist(), w.tolist()):
                by_id.setdefault(i, set()).add(wi)
            assert all(len(v) == 1 for v in by_id.values()), "one row drawn with different weights in one epoch"
            # weights are the lake's own stream's, alpha / (N_j p): sum of N_j p_i over the drawn rows <= N_j
            implied = sum(1.0 / next(iter(v)) for v in by_id.values())
            assert implied <= len(built.ids) * (1 + 1e-4), "the weights imply a larger lake than it is"
        else:
            _, c = np.unique(mine, return_counts=True)
            assert int((c - 1).sum()) <= pad, f"lake {j}: rows repeated beyond the padding"
            if j == 1:
                assert set(mine.tolist()) == set(built.ids.tolist()), "the up-to-one-pass lake is not covered"
    check_values(per_rank, main, mode, other, emb_dtype)


def check_values(per_rank: list[list[dict[str, torch.Tensor]]], built: Built, mode: str,
                 other: Built | None = None, emb_dtype: torch.dtype = torch.float32) -> None:
    """Every row's columns against its lake (a mixture: each lake's rows against that lake, whose
    string labels have their own codes)."""
    _, _, label_kind, meta_kind = built.key
    lakes = [built] if other is None else [built, other]
    codes: list[dict[Any, int]] = [{} for _ in lakes]
    for batches in per_rank:
        for whole in batches:
            for j, lake in enumerate(lakes):
                b = whole if other is None else {k: v[whole["source"] == j] for k, v in whole.items()}
                if len(b["id"]):
                    check_rows(b, lake, mode, label_kind, meta_kind, codes[j], emb_dtype)
    if label_kind == "str":
        for c in codes:
            assert len(set(c.values())) == len(c), "two label strings share a code"


def check_rows(b: dict[str, torch.Tensor], built: Built, mode: str, label_kind: str, meta_kind: str,
               codes: dict[Any, int], emb_dtype: torch.dtype = torch.float32) -> None:
    ids = b["id"].tolist()
    emb = b["embedding"]
    assert emb.dtype == emb_dtype and emb.shape == (len(ids), D), f"embedding {emb.dtype}, expected {emb_dtype}"
    emb = emb.float()  # a float16 delivery holds the stored float16 values exactly
    want = np.stack([built.expected["embedding"][i] for i in ids])
    if GENERATE[mode]:
        norms = emb.norm(dim=1)
        assert torch.isfinite(emb).all() and torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
        assert not np.array_equal(emb.numpy(), want), f"{mode}: the rows were not replaced by samples"
    else:
        np.testing.assert_array_equal(emb.numpy(), want, err_msg="embedding is not the row's mu")
    lab = b["label"]
    assert lab.dtype == torch.int64
    for i, code in zip(ids, lab.tolist()):
        source = built.expected["label"][i]
        if label_kind == "int":
            assert code == source
        else:  # codes into the label vocabulary: one code per string, one string per code
            assert codes.setdefault(source, code) == code
    if "meta" in b:
        check_meta(b["meta"], [built.expected["meta"][i] for i in ids], meta_kind)


def check_meta(got: torch.Tensor, want: list[Any], kind: str) -> None:
    if kind == "bool":
        assert got.dtype == torch.bool and got.tolist() == want
    elif kind == "int":
        assert got.dtype == torch.int64 and got.tolist() == want
    elif kind == "uint":  # a dtype that holds every value (or the lake refused the column at ingest)
        assert not got.dtype.is_floating_point and [int(v) for v in got.tolist()] == [int(v) for v in want], \
            f"uint64 metadata arrives as {got.dtype} with other values"
    elif kind == "float":
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), np.asarray(want, dtype=np.float32))


def one_line_error(exc: BaseException) -> str:
    from m2m.errors import M2MError

    msg = str(exc)
    assert isinstance(exc, M2MError), f"{type(exc).__name__} is not an M2MError: {msg[:300]}"
    assert msg and "\n" not in msg.strip(), f"not a one-line error: {msg[:300]!r}"
    return msg
