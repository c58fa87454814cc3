"""One writer process of the concurrent-append test: ``python _writer.py URL OPTIONS_JSON WRITER CALLS ROWS``.

Appends ``CALLS`` batches of ``ROWS`` rows whose alpha encodes (writer, call, row), and prints one JSON
line per call: the version it reported the ids it got, and how many of its commits so far were rebased.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np

from m2m import open_lake


class _Rebases(logging.Handler):
    """Counts commits that lost a race and were rebased (m2m.lake.commit logs each at INFO)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "rebase" in record.getMessage():
            self.count += 1


def main() -> None:
    rebases = _Rebases()
    log = logging.getLogger("m2m.lake.commit")
    log.setLevel(logging.INFO)
    log.addHandler(rebases)
    url, options, writer, calls, rows = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
    rng = np.random.default_rng(writer)
    with open_lake(url, storage_options=options) as lake:
        for call in range(calls):
            alpha = (writer * 10_000 + call * 100 + np.arange(rows) + 1).astype(np.float32)
            ids = lake.add_splats(rng.standard_normal((rows, lake.dim)), alpha=alpha)
            print(json.dumps({"writer": writer, "call": call, "version": lake.version, "ids": ids.tolist(),
                              "rebased": rebases.count}),
                  flush=True)


if __name__ == "__main__":
    main()
