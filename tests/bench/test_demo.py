"""`m2m demo`: the main job end to end, in a quick mode (small data, two epochs)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from m2m_bench.demo import ORIGINAL_README, REPORT_NAME, run_demo  # noqa: E402

from m2m import open_lake  # noqa: E402
from m2m.cli.main import cli  # noqa: E402

QUICK = ["--rows", "1500", "--epochs", "2"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(cli, ["demo", *QUICK, "--out", str(out)])
    return out, result


def test_demo_runs_and_writes_the_report(quick_run):
    out, result = quick_run
    assert result.exit_code == 0, result.output
    png = out / REPORT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000            # three panels, not an empty canvas
    assert f"report: {png}" in result.output


def test_demo_table_has_measured_and_published_rows(quick_run):
    _, result = quick_run
    text = result.output
    for label in ("ingest, rows/s", "stream, standard (SOC importance)", "stream, generative (SOC + Langevin)",
                  "test accuracy, SOC + Langevin (", "test accuracy, uniform, raw lake (",
                  "stream, mixture augmentation", "what each augmentation produces",
                  "rows to 99% of uniform's final accuracy", "time-to-accuracy speed-up"):
        assert label in text
    for published in ORIGINAL_README.values():
        assert f"{published:,}" in text             # quoted beside ours, labelled as the original's
    assert "original M2M README" in text


def test_demo_figures_are_measured_in_the_run(tmp_path):
    res = run_demo(rows=1200, dim=64, epochs=2, out_dir=str(tmp_path), seed=1)
    for v in (res["ingest_rows_s"], res["stream_rows_s"]["standard"], res["stream_rows_s"]["generative"]):
        assert math.isfinite(v) and v > 0
        assert v not in ORIGINAL_README.values()
    assert min(res["stream_rows_s"]["vmf"], res["stream_rows_s"]["mixture"]) > 0
    law = res["augmentation_law"]["modes"]
    # measured in the run: the mixture moves rows into their neighbours' splats, the short chain does not
    assert set(law) == {"vmf", "mixture", "langevin"}
    assert law["mixture"]["own_responsibility"] < law["langevin"]["own_responsibility"]
    assert law["langevin"]["mean_cos_to_source"] > law["vmf"]["mean_cos_to_source"]
    assert len(res["accuracy"]["uniform"]) == 2
    # SOC + Langevin streams the consolidated (smaller) lake for at least the uniform run's row budget
    assert sum(res["rows_per_epoch"]["soc_langevin"]) >= sum(res["rows_per_epoch"]["uniform"])
    tta = res["time_to_accuracy"]
    assert tta["target"] == pytest.approx(0.99 * res["accuracy"]["uniform"][-1])
    assert tta["uniform"] is not None and tta["uniform"]["rows"] <= sum(res["rows_per_epoch"]["uniform"])
    if tta["soc_langevin"] is not None:
        assert tta["speedup_rows"] == pytest.approx(tta["uniform"]["rows"] / tta["soc_langevin"]["rows"])
    assert all(len(c) >= 4 * 2 - 1 for c in res["curves"].values())  # scored ~4x per epoch
    # ten balanced classes: chance is 10%; a linear head on digits must do far better
    assert res["accuracy"]["uniform"][-1] > 0.5 and res["accuracy"]["soc_langevin"][-1] > 0.5
    c = res["consolidation"]
    assert c["rows_before"] == res["train_rows"] and 0 < c["rows_after"] <= c["rows_before"]
    assert 0.0 <= res["criticality"]["redundancy"] <= 1.0
    assert res["criticality"]["state"] in ("subcritical", "critical", "supercritical")
    assert res["kappa"]["min"] <= res["kappa"]["median"] <= res["kappa"]["max"]


def test_demo_keeps_the_lake_when_asked(tmp_path):
    lake_dir = tmp_path / "lake"
    result = CliRunner().invoke(cli, ["demo", *QUICK, "--dim", "64", "--out", str(tmp_path), "--lake", str(lake_dir)])
    assert result.exit_code == 0, result.output
    rows_after = int(re.search(r"-> ([\d,]+) splats", result.output).group(1).replace(",", ""))
    with open_lake(lake_dir) as lake:
        assert len(lake) == rows_after and lake.dim == 64
    # running again into the same lake is refused with one clear line
    again = CliRunner().invoke(cli, ["demo", *QUICK, "--dim", "64", "--out", str(tmp_path), "--lake", str(lake_dir)])
    assert again.exit_code == 1
    assert "already holds" in again.output and "Traceback" not in again.output


@pytest.mark.parametrize("args, message", [(["--rows", "10"], "--rows"), (["--epochs", "0"], "--epochs")])
def test_demo_rejects_bad_options(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["demo", *args, "--out", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_demo_cuda_without_cuda_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["demo", *QUICK, "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "CUDA" in result.output and "Traceback" not in result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_on_cuda(tmp_path):
    res = run_demo(rows=1500, dim=640, epochs=2, device="cuda", out_dir=str(tmp_path))
    assert res["accuracy"]["soc_langevin"][-1] > 0.5


@pytest.mark.slow
def test_full_demo_default_size(tmp_path):
    res = run_demo(out_dir=str(tmp_path))
    assert res["train_rows"] + res["test_rows"] == 10_000
    assert res["accuracy"]["soc_langevin"][-1] > 0.8
