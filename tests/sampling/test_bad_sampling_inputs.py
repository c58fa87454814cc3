"""Bad inputs to importance sampling, loss feedback and mixing: one typed line naming the value
(found by a probing helper, 2026-12-07: these raised builtin ValueError/TypeError/RuntimeError, or failed
only at the next epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import m2m
from m2m import M2MConfig, create_m2m
from m2m.errors import M2MError


@pytest.fixture(scope="module")
def lakes():  # type: ignore[no-untyped-def]
    g = np.random.default_rng(0)
    out = []
    for n in (30, 20):
        lk = create_m2m(M2MConfig(latent_dim=4))
        lk.add_splats(g.standard_normal((n, 4)), metadata={"score": g.standard_normal(n)})
        out.append(lk)
    yield out
    for lk in out:
        lk.close()


def _one_line(call):  # type: ignore[no-untyped-def]
    with pytest.raises(M2MError) as exc:
        call()
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("weight", ["x", None, torch.tensor([1.0, 2.0]), True])
def test_a_mix_weight_that_is_not_a_number(lakes, weight):
    assert "weight of lake 'a'" in _one_line(lambda: m2m.mix({"a": lakes[0], "b": lakes[1]}, {"a": weight, "b": 1}))


@pytest.mark.parametrize("losses", [None, ["x"] * 10, [object()] * 10])
@pytest.mark.parametrize("mixed", [False, True])
def test_losses_that_are_not_numbers(lakes, losses, mixed):
    src = m2m.mix({"a": lakes[0], "b": lakes[1]}, {"a": 1, "b": 1}) if mixed else lakes[0]
    dl = src.export_to_dataloader(batch_size=10, importance_sampling="loss", columns=("id",))
    b = next(iter(dl))
    extra = {"source": b["source"]} if mixed else {}
    assert "losses must be numbers" in _one_line(lambda: dl.update_priorities(b["id"], losses, **extra))
    dl.close()


def test_a_negative_importance_column_is_named_when_the_loader_is_made(lakes):
    assert "importance column 'score' must be >= 0" in _one_line(
        lambda: lakes[0].export_to_dataloader(batch_size=10, importance_sampling="score"))


@pytest.mark.parametrize("bad", ["garbage", {"priorities": [float("nan")] * 30},
                                 {"priorities": [1.0] * 30, "frozen": {0: [1.0] * 7}}])
def test_a_sampler_state_that_is_not_one_is_refused_when_loaded(lakes, bad):
    dl = lakes[0].export_to_dataloader(batch_size=10, importance_sampling="loss", columns=("id",))
    state = dl.state_dict()
    state["sampler"] = bad
    _one_line(lambda: dl.load_state_dict(state))
    dl.close()
