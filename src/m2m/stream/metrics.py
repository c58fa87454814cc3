"""Counters of one stream: rows delivered, bytes moved per tier, stalls, cache hits."""

from __future__ import annotations

from dataclasses import dataclass, field

COUNTERS = ("rows", "batches", "cold_bytes", "warm_bytes", "warm_hit_rows", "warm_miss_rows",
            "hot_bytes", "stall_s", "busy_s", "worker_items", "worker_fresh_items")


@dataclass
class StreamStats:
    """Accumulates the per-item deltas that stages attach to their work (also across workers)."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))

    def add(self, deltas: dict[str, float]) -> None:
        for key, value in deltas.items():
            self.values[key] = self.values.get(key, 0.0) + value

    def report(self, hot_mode: str, warm_mode: str, layout: str) -> dict[str, object]:
        v = self.values
        looked_up = v["warm_hit_rows"] + v["warm_miss_rows"]
        return {
            "rows": int(v["rows"]),
            "batches": int(v["batches"]),
            "seconds": v["busy_s"],
            "rows_per_s": v["rows"] / v["busy_s"] if v["busy_s"] > 0 else 0.0,
            "bytes_cold": int(v["cold_bytes"]),
            "bytes_warm": int(v["warm_bytes"]),
            "bytes_hot": int(v["hot_bytes"]),
            "prefetch_stall_s": v["stall_s"],
            "warm_hit_rate": v["warm_hit_rows"] / looked_up if looked_up else None,
            "hot_mode": hot_mode,
            "warm_mode": warm_mode,
            "shuffle": layout,
            # items DataLoader workers sent, and those that crossed in fresh shared memory instead of a
            # reused buffer of the worker's ring (m2m.stream.transport: every one when torch pins them)
            "worker_items": int(v["worker_items"]),
            "worker_fresh_items": int(v["worker_fresh_items"]),
        }
