"""One writer process of the concurrent-append test: ``python _writer.py URL OPTIONS_JSON WRITER CALLS ROWS``.

Appends ``CALLS`` batches of ``ROWS`` rows whose alpha encodes (writer, call, row), and prints one JSON
line per call: the version it reported and the ids it got.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from m2m import open_lake


def main() -> None:
    url, options, writer, calls, rows = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
    rng = np.random.default_rng(writer)
    with open_lake(url, storage_options=options) as lake:
        for call in range(calls):
            alpha = (writer * 10_000 + call * 100 + np.arange(rows) + 1).astype(np.float32)
            ids = lake.add_splats(rng.standard_normal((rows, lake.dim)), alpha=alpha)
            print(json.dumps({"writer": writer, "call": call, "version": lake.version, "ids": ids.tolist()}),
                  flush=True)


if __name__ == "__main__":
    main()
