"""``embedding_dtype``: batches in float32 by default (the contract), in the lake's storage dtype with
"stored", or converted to float16 / bfloat16; augmentations compute in float32 and deliver that dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import ConfigError
from m2m.stream.options import StreamOptions

N, D = 600, 16


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = {}
    for dtype in ("float32", "float16"):
        paths[dtype] = str(root / dtype)
        with create_m2m(M2MConfig(path=paths[dtype], latent_dim=D, storage_dtype=dtype)) as lake:
            lake.add_splats(x[:400])
            lake.add_splats(x[400:])
    return paths


def stored_by_id(path):
    with open_lake(path) as lake:
        s = lake.splats()
    return dict(zip(s["id"].tolist(), s["mu"]))


@pytest.mark.parametrize("storage,asked,delivered", [
    ("float16", None, torch.float32), ("float16", "stored", torch.float16), ("float32", "stored", torch.float32),
    ("float32", "float16", torch.float16), ("float32", torch.bfloat16, torch.bfloat16),
    ("float16", "bfloat16", torch.bfloat16)])
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_arrive_in_the_asked_dtype_with_the_stored_values(lakes, storage, asked, delivered, workers):
    stored = stored_by_id(lakes[storage])
    with open_lake(lakes[storage]) as lake:
        dl = lake.export_to_dataloader(batch_size=128, columns=("id", "embedding"), embedding_dtype=asked,
                                       num_workers=workers, shuffle_mode="block", block_rows=50, warm_bytes=1 << 14)
        seen = 0
        for b in dl:
            assert b["embedding"].dtype == delivered
            want = torch.from_numpy(np.stack([stored[i] for i in b["id"].tolist()]))
            assert torch.equal(b["embedding"], want.to(delivered))  # exact: one rounding from what is stored
            seen += len(b["id"])
        dl.close()
    assert seen == N


@pytest.mark.parametrize("mode", ["vmf", "mixture", "langevin"])
def test_augmented_batches_are_drawn_in_float32_and_delivered_in_the_asked_dtype(lakes, mode):
    with open_lake(lakes["float16"]) as lake:
        outs = {}
        for asked in (None, "stored"):
            dl = lake.export_to_dataloader(batch_size=100, generate_samples=mode, embedding_dtype=asked, seed=3)
            outs[asked] = [b.clone() for b in dl]
            dl.close()
    for a, b in zip(outs[None], outs["stored"]):
        assert a.dtype == torch.float32 and b.dtype == torch.float16
        assert torch.equal(a.to(torch.float16), b)  # the same draws, rounded once at delivery


def test_embedding_dtype_is_validated_with_one_line_naming_the_value():
    for bad in ("int8", torch.int32, 16, "half"):
        with pytest.raises(ConfigError, match="embedding_dtype must be") as info:
            StreamOptions(embedding_dtype=bad)
        assert repr(bad) in str(info.value) and "\n" not in str(info.value)
    assert StreamOptions(embedding_dtype="float16").embedding_dtype is torch.float16
    assert StreamOptions(embedding_dtype="stored").embedding_dtype == "stored"


@pytest.mark.parametrize("hot_mode,warm_mode", [("resident", "auto"), ("auto", "cold")])
def test_other_tiers_deliver_the_asked_dtype_too(lakes, hot_mode, warm_mode):
    # the resident tier (forced on the CPU) and direct cold gathers convert by the same column dtypes
    stored = stored_by_id(lakes["float16"])
    with open_lake(lakes["float16"]) as lake:
        for asked, delivered in ((None, torch.float32), ("stored", torch.float16), ("bfloat16", torch.bfloat16)):
            dl = lake.export_to_dataloader(batch_size=128, columns=("id", "embedding"), embedding_dtype=asked,
                                           hot_mode=hot_mode, warm_mode=warm_mode)
            for b in dl:
                want = torch.from_numpy(np.stack([stored[i] for i in b["id"].tolist()]))
                assert b["embedding"].dtype == delivered and torch.equal(b["embedding"], want.to(delivered))
            dl.close()
