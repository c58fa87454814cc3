"""Summary statistics of kappa and alpha, kept in the manifest and merged on append."""

from __future__ import annotations

from typing import Any

import numpy as np


def summarize(kappa: np.ndarray, alpha: np.ndarray) -> dict[str, Any]:
    """Summary of one set of rows: alpha sum/min/max, kappa count/sum/min/max over non-NaN values."""
    k = kappa[~np.isnan(kappa)]
    return {
        "alpha": {"sum": float(alpha.sum(dtype=np.float64)) if len(alpha) else 0.0,
                  "min": float(alpha.min()) if len(alpha) else None,
                  "max": float(alpha.max()) if len(alpha) else None},
        "kappa": {"count": int(len(k)), "sum": float(k.sum(dtype=np.float64)) if len(k) else 0.0,
                  "min": float(k.min()) if len(k) else None, "max": float(k.max()) if len(k) else None},
    }


def _mn(a: float | None, b: float | None, f: Any) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return f(a, b)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Summary of the union of two row sets."""
    if not a:
        return b
    out = {}
    for key in ("alpha", "kappa"):
        x, y = a[key], b[key]
        m = {"sum": x["sum"] + y["sum"], "min": _mn(x["min"], y["min"], min), "max": _mn(x["max"], y["max"], max)}
        if key == "kappa":
            m["count"] = x["count"] + y["count"]
        out[key] = m
    return out


def describe(stats: dict[str, Any], rows: int) -> dict[str, Any]:
    """Human-facing summary: means instead of sums."""
    if not stats:
        return {"kappa": {"estimated": 0, "min": None, "mean": None, "max": None},
                "alpha": {"total": 0.0, "min": None, "max": None, "mean": None}}
    k, a = stats["kappa"], stats["alpha"]
    return {
        "kappa": {"estimated": k["count"], "min": k["min"], "max": k["max"],
                  "mean": (k["sum"] / k["count"]) if k["count"] else None},
        "alpha": {"total": a["sum"], "min": a["min"], "max": a["max"], "mean": (a["sum"] / rows) if rows else None},
    }
