"""Data-parallel training through one lake: every rank streams a disjoint part of each epoch.

    torchrun --nproc_per_node 2 examples/ddp_train.py [--epochs 3] [--rows 10000] [--lake DIR]

Backend: NCCL with one GPU per rank when CUDA is available, gloo on the CPU otherwise. Rank 0
builds the lake (digits in the seed protocol, kappa estimated once); after a barrier every rank
opens it and exports its stream: `export_to_dataloader` reads rank and world size from
torch.distributed, every rank gets the same number of batches, and together the ranks cover each
splat once per epoch (without importance sampling). The script checks both and prints the test
accuracy of the trained DDP model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from m2m_bench.datasets import digits_embeddings
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from m2m import M2MConfig, create_m2m, open_lake


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--importance", choices=["kappa", "alpha", "none"], default="none",
                   help="importance sampling (the loss mode is per rank and is not shown here)")
    p.add_argument("--augment", choices=["langevin", "vmf", "none"], default="none")
    p.add_argument("--lake", default=None, help="lake directory (default: a temporary one, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    data = digits_embeddings(rows=args.rows, dim=640, seed=args.seed)   # every rank builds the same split

    # Rank 0 creates the lake; the others wait, then open it.
    path = [args.lake or (tempfile.mkdtemp(prefix="m2m-ddp-") if rank == 0 else None)]
    dist.broadcast_object_list(path, src=0)
    lake_dir = os.path.join(path[0], "lake")
    if rank == 0:
        with create_m2m(M2MConfig(path=lake_dir, latent_dim=640, seed=args.seed)) as lake:
            if len(lake) == 0:
                lake.add_splats(data.train_x, labels=data.train_y)
                lake.estimate_kappa()
    dist.barrier()

    with open_lake(lake_dir, device=device, seed=args.seed) as lake:
        importance = False if args.importance == "none" else args.importance
        augment = False if args.augment == "none" else args.augment
        dl = lake.export_to_dataloader(batch_size=args.batch_size, shuffle=True, importance_sampling=importance,
                                       generate_samples=augment, columns=("embedding", "label", "id", "weight"))
        torch.manual_seed(args.seed)                      # same initial weights on every rank
        model = DDP(nn.Linear(640, 10).to(device), device_ids=[local] if cuda else None)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for epoch in range(args.epochs):
            dl.set_epoch(epoch)
            seen = []
            batches = 0
            for batch in dl:
                per_row = nn.functional.cross_entropy(model(batch["embedding"]), batch["label"], reduction="none")
                w = batch["weight"]
                loss = (w * per_row).sum() / w.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()                           # gradients all-reduced across ranks by DDP
                opt.step()
                seen.append(batch["id"].cpu())
                batches += 1
            counts = [None] * world
            dist.all_gather_object(counts, (batches, torch.cat(seen)))
            if rank == 0:
                ids = torch.cat([c[1] for c in counts])
                line = (f"epoch {epoch}: batches per rank {[c[0] for c in counts]}, rows {len(ids):,}, "
                        f"distinct {len(torch.unique(ids)):,} of {len(lake):,} splats")
                if importance is False and len(torch.unique(ids)) != len(lake):
                    raise RuntimeError(f"ranks did not cover the lake exactly once: {line}")
                if len({c[0] for c in counts}) != 1:
                    raise RuntimeError(f"ranks yielded different numbers of batches: {line}")
                print(line, flush=True)
        if rank == 0:
            with torch.no_grad():
                pred = model.module(torch.from_numpy(data.test_x).to(device)).argmax(1).cpu()
            acc = float((pred == torch.from_numpy(data.test_y)).float().mean())
            print(f"world size {world} ({'nccl' if cuda else 'gloo'}): test accuracy {100 * acc:.2f}% "
                  f"on {len(data.test_y):,} rows of held-out images", flush=True)
        dl.close()
        del model, opt  # the DDP reducer must go before its process group (gloo aborts otherwise)
    dist.barrier()
    if rank == 0 and args.lake is None:
        shutil.rmtree(path[0], ignore_errors=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
