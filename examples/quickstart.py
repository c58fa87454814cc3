"""Quick start: the seed snippet, runnable on the CPU or a CUDA GPU.

    python examples/quickstart.py [--device cpu|cuda] [--rows 10000]

A temporary lake receives 10,000 random 640-d vectors, and a linear model consumes one epoch of
the stream with SOC importance sampling and Langevin augmentation (kappa is estimated on first use).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from m2m import M2MConfig, create_m2m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where batches are delivered (default: cuda if available)")
    parser.add_argument("--rows", type=int, default=10_000, help="random vectors to add")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    vectors = torch.randn(args.rows, 640, generator=torch.Generator().manual_seed(0))

    # --- the seed snippet -------------------------------------------------------------------
    with create_m2m(M2MConfig(device=args.device, latent_dim=640)) as m2m:   # a temporary lake
        m2m.add_splats(vectors)
        dataloader = m2m.export_to_dataloader(batch_size=256, generate_samples=True, importance_sampling=True)
        model = torch.nn.Linear(640, 10).to(args.device)
        t0 = time.perf_counter()
        rows, shapes = 0, set()
        for batch in dataloader:            # float32 [256, 640] on cfg.device
            model(batch)
            rows += batch.shape[0]
            shapes.add(tuple(batch.shape))
        seconds = time.perf_counter() - t0
        # The stream estimated kappa in memory for its own use and stored nothing (a stream never
        # writes); estimate_kappa() stores it in the lake, as a new version.
        m2m.estimate_kappa()
        kappa = m2m.splats()["kappa"]
    # -----------------------------------------------------------------------------------------

    print(f"streamed {rows:,} Langevin samples in {len(dataloader)} batches (shapes {sorted(shapes, reverse=True)}, "
          f"{batch.dtype} on {batch.device}) into Linear(640, 10) in {seconds:.2f} s ({rows / seconds:,.0f} rows/s)")
    print(f"kappa (lake.estimate_kappa(), from each splat's nearest neighbours): median "
          f"{float(np.median(kappa)):,.1f}; min {float(kappa.min()):,.1f}, max {float(kappa.max()):,.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
