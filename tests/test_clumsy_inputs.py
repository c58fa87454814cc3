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
