"""Train a classifier through a lake: labels, importance sampling, augmentation, metrics.

    python examples/train_classifier.py [--importance kappa|loss|alpha|none] [--augment langevin|vmf|none]
                                        [--consolidate 0.95] [--epochs 5] [--rows 10000] [--device cpu]

Data: sklearn's digits in the seed protocol (m2m_bench.datasets.digits_embeddings): rows resampled from
the 1,797 images and projected 64 -> 640, split by source image, so test images are never seen in
training. The loop is what a PyTorch user writes: batches are dicts of tensors on the lake's
device; with importance sampling the loss is weighted by each row's importance weight
(sum(w * loss) / sum(w) is unbiased), and with ``--importance loss`` the per-row losses are fed back
to the sampler every step.
"""

from __future__ import annotations

import argparse
import time

import torch
from m2m_bench.datasets import digits_embeddings
from torch import nn

from m2m import M2MConfig, create_m2m


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000, help="rows resampled from the digits images")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--importance", choices=["kappa", "loss", "alpha", "none"], default="loss")
    p.add_argument("--augment", choices=["langevin", "vmf", "none"], default="langevin")
    p.add_argument("--consolidate", type=float, default=None, metavar="COS",
                   help="merge near-duplicates (cosine >= COS, same label) before training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return float((logits.argmax(1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    data = digits_embeddings(rows=args.rows, dim=640, seed=args.seed)
    test_x = torch.from_numpy(data.test_x).to(args.device)
    test_y = torch.from_numpy(data.test_y).to(args.device)
    importance = False if args.importance == "none" else args.importance
    augment = False if args.augment == "none" else args.augment

    with create_m2m(M2MConfig(latent_dim=640, device=args.device, seed=args.seed)) as lake:
        lake.add_splats(data.train_x, labels=data.train_y)
        lake.estimate_kappa()
        if args.consolidate is not None:
            r = lake.consolidate(similarity=args.consolidate)
            print(f"consolidated {r.rows_before:,} -> {r.rows_after:,} splats ({r.groups_merged:,} groups merged)")
        print(f"lake: {len(lake):,} splats x {lake.dim}; test: {len(test_y):,} rows of held-out images")

        dl = lake.export_to_dataloader(batch_size=args.batch_size, shuffle=True, importance_sampling=importance,
                                       generate_samples=augment, columns=("embedding", "label", "id", "weight"))
        torch.manual_seed(args.seed)
        model = nn.Linear(640, 10).to(args.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        print(f"{'epoch':>5} {'rows':>8} {'train loss':>11} {'test loss':>10} {'test acc':>9} {'rows/s':>10}")
        for epoch in range(args.epochs):
            dl.set_epoch(epoch)
            t0, rows, total = time.perf_counter(), 0, 0.0
            for batch in dl:
                per_row = nn.functional.cross_entropy(model(batch["embedding"]), batch["label"], reduction="none")
                w = batch["weight"]                      # all 1.0 without importance sampling
                loss = (w * per_row).sum() / w.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if importance == "loss":
                    dl.update_priorities(batch["id"], per_row.detach())
                rows += len(per_row)
                total += float(loss.detach()) * len(per_row)
            seconds = time.perf_counter() - t0
            acc, test_loss = evaluate(model, test_x, test_y)
            print(f"{epoch:>5} {rows:>8,} {total / rows:>11.4f} {test_loss:>10.4f} {100 * acc:>8.2f}% "
                  f"{rows / seconds:>10,.0f}")
    print(f"final test accuracy: {100 * acc:.2f}% (importance={args.importance}, augment={args.augment})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
