"""The downstream benchmark module runs and reports (tiny sizes; accuracy figures are its job, not the test's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from m2m_bench import downstream  # noqa: E402


def test_weighted_loss_and_feedback_reach_the_sampler(monkeypatch):
    """train_epoch weights the loss by batch["weight"] and feeds per-row losses back when asked."""
    calls = []

    class FakeLoader:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.batches = [{"embedding": torch.randn(8, 4, generator=g), "label": torch.arange(8) % 3,
                             "id": torch.arange(8) + 8 * i, "weight": torch.rand(8, generator=g) + 0.5}
                            for i in range(3)]

        def __iter__(self):
            return iter(self.batches)

        def update_priorities(self, ids, losses):
            calls.append((ids.clone(), losses.clone()))

    dl = FakeLoader()
    model = downstream.make_model("linear", 4, 3, seed=0)
    ref = downstream.make_model("linear", 4, 3, seed=0)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = downstream.train_epoch(model, opt, dl, weighted=True, feedback=True)
    assert rows == 24 and len(calls) == 3
    assert torch.equal(calls[0][0], torch.arange(8))
    # first step by hand: the gradient of sum(w * l) / sum(w)
    b = dl.batches[0]
    per_row = torch.nn.functional.cross_entropy(ref(b["embedding"]), b["label"], reduction="none")
    np.testing.assert_allclose(calls[0][1].numpy(), per_row.detach().numpy(), rtol=1e-5)
    loss = (b["weight"] * per_row).sum() / b["weight"].sum()
    loss.backward()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_opt.step()
    again = downstream.make_model("linear", 4, 3, seed=0)
    opt2 = torch.optim.SGD(again.parameters(), lr=0.1)
    dl.batches = dl.batches[:1]
    downstream.train_epoch(again, opt2, dl, weighted=True, feedback=False)
    for p, q in zip(again.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_make_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = downstream.make_model("mlp", 8, 3, seed=5)
    b = downstream.make_model("mlp", 8, 3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="model kind"):
        downstream.make_model("transformer", 8, 3, seed=0)


def test_quick_run_reports_every_method_and_a_table():
    res = downstream.run(quick=True, datasets=("digits",), epochs=1, models=("linear",),
                         methods=("uniform", "importance: loss", "consolidated ~50% + alpha IS"))
    assert {s["method"] for s in res["summary"]} == {"uniform", "importance: loss", "consolidated ~50% + alpha IS"}
    for s in res["summary"]:
        assert 0.1 < s["acc_mean"] <= 1.0 and s["sec_mean"] > 0
    cons = [lk for lk in res["lakes"] if lk["consolidated"]]
    assert cons and 0.35 < cons[0]["rows_after"] / cons[0]["rows_before"] < 0.65
    table = downstream.format_table(res)
    assert "digits:" in table and "importance: loss" in table and "consolidation: seed 0" in table


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        downstream.run(quick=True, datasets=("digits",), methods=("magic",))
