"""The seed's training loop, as its README wrote it, runnable on the CPU or a CUDA GPU.

    python examples/m2m_training_loop.py [--device cpu|cuda] [--rows 100000] [--epochs 1]

100,000 random 640-d embeddings go into a temporary lake, and a small model trains on the stream
with importance sampling and generative augmentation switched on, exactly as the seed's 10 lines do.
The first batch waits for the lake's geometry (kappa and neighbours), computed in memory for this
loader: the stream never writes to the lake (persist it with ``lake.estimate_kappa()``).
"""

from __future__ import annotations

import argparse
import time

import torch

from m2m import M2MConfig, create_m2m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    embeddings = torch.randn(args.rows, 640, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Linear(640, 256), torch.nn.ReLU(), torch.nn.Linear(256, 640))
    model = model.to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    t0 = time.perf_counter()
    first = None
    rows = 0
    # --- the seed's loop ------------------------------------------------------------------
    config = M2MConfig(device=args.device)
    m2m = create_m2m(config)
    m2m.add_splats(embeddings)
    dataloader = m2m.export_to_dataloader(batch_size=256, generate_samples=True, importance_sampling=True)
    for epoch in range(args.epochs):
        for batch in dataloader:
            first = first or time.perf_counter() - t0
            loss = (model(batch) - batch).pow(2).sum(dim=1).mean()   # a denoising-style objective
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rows += batch.shape[0]
    # ---------------------------------------------------------------------------------------
    seconds = time.perf_counter() - t0
    m2m.close()
    print(f"trained {args.epochs} epoch(s) on {rows:,} rows ({len(dataloader)} batches per epoch) on "
          f"{args.device}: first batch after {first:.1f} s, {seconds:.1f} s in all, final loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
