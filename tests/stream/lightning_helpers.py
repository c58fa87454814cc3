"""A Lightning module that records the row ids each epoch trains on (used by the Lightning tests and
the DDP script, which Lightning re-executes once per extra rank)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import lightning as L
import torch


class Recorder(L.LightningModule):
    """Trains a linear probe on ``batch["embedding"]`` and records ``batch["id"]`` per epoch and batch."""

    def __init__(self, make_loader: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.make_loader = make_loader
        self.seen: dict[int, list[list[int]]] = {}
        self.lengths: dict[int, int] = {}

    def train_dataloader(self) -> Any:
        if self.make_loader is None:
            raise RuntimeError("no loader factory: pass train_dataloaders to fit")
        return self.make_loader()

    def on_train_epoch_start(self) -> None:
        self.lengths[self.current_epoch] = int(self.trainer.num_training_batches)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).append(batch["id"].tolist())
        return self.layer(batch["embedding"]).square().mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def trainer(**kw: Any) -> L.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    opts.update(kw)
    return L.Trainer(**opts)


def ddp_main(lake_path: str, out_dir: str, mode: str) -> None:
    """One rank of a 2-process gloo DDP fit; writes what it saw to ``out_dir/{mode}_rank{r}.json``."""
    from m2m import open_lake

    lake = open_lake(lake_path)

    def make() -> Any:
        return lake.export_to_dataloader(batch_size=64, columns=("id", "embedding"))

    model = Recorder(make if mode == "inside" else None)
    dl = make() if mode == "before" else None  # built before the process group exists
    t = trainer(devices=2, strategy="ddp")
    t.fit(model, train_dataloaders=dl)
    with open(os.path.join(out_dir, f"{mode}_rank{t.global_rank}.json"), "w") as f:
        json.dump({"seen": model.seen, "lengths": model.lengths, "world": t.world_size}, f)


if __name__ == "__main__":
    ddp_main(*sys.argv[1:4])
