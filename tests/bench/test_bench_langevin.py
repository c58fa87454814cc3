"""The Langevin benchmark runs end to end at a small size and its methods sample the same strength."""

from __future__ import annotations

import pytest
from m2m_bench import langevin


@pytest.mark.slow  # 34 s on CI's 2 cores; CI runs the slow suite too
def test_quick_langevin_bench_runs_and_agrees_with_the_naive_chain():
    res = langevin.run(quick=True, rows=5000)
    table = langevin.format_table(res)
    for key in ("limit", "naive", "ours", "vmf", "mixture"):
        assert res["f32"][key] > 0 and res["f16"][key] > 0
    st = res["stream"]
    assert min(st["plain"], st["langevin"], st["langevin_inline"], st["vmf"], st["mixture"]) > 0
    assert min(st["training"].values()) > 0 and "feeding an MLP training step" in table
    assert "goal >= 300,000 rows/s (Langevin stream through a lake)" in table
    # the fast exact path and the straightforward full chain give the same mean cosine to the source
    cos = res["f32"]["mean_cos_to_source"]
    assert abs(cos["ours"] - cos["naive"]) < 0.01
    assert 0.93 < cos["ours"] < 0.97          # the documented default strength (~0.95)
