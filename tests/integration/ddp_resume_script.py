"""One rank of a real 2-process gloo DDP Lightning fit (Lightning re-executes this script for rank 1).

``crash``: checkpoints every ``EVERY`` steps and raises in a callback after step ``CRASH_AT`` (mid-epoch 1).
``resume``: the same fit from a checkpoint (``ckpt_path``). Every training step appends the batch's ids to
``OUT/{phase}_rank{r}.jsonl``. Usage: ddp_resume_script.py LAKE OUT PHASE [CKPT]"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

BS, EVERY, CRASH_AT, EPOCHS = 50, 4, 14, 2


class Recorder(L.LightningModule):
    def __init__(self, out: str, phase: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.out, self.phase = out, phase

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        record = {"epoch": self.current_epoch, "step": self.global_step, "idx": batch_idx, "ids": batch["id"].tolist()}
        with open(os.path.join(self.out, f"{self.phase}_rank{self.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        return self.layer(batch["embedding"]).square().mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Crash(Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == CRASH_AT:
            raise RuntimeError(f"simulated crash after step {CRASH_AT}")


def main(lake_path: str, out: str, phase: str, ckpt: str | None = None) -> None:
    from m2m import open_lake

    lake = open_lake(lake_path)
    dl = lake.export_to_dataloader(batch_size=BS, columns=("id", "embedding"))
    callbacks: list[Callback] = []
    if phase == "crash":
        callbacks = [Crash(), ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=EVERY,
                                              save_top_k=-1, filename="{step}")]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, logger=False,
                        enable_checkpointing=phase == "crash", callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Recorder(out, phase), train_dataloaders=dl, ckpt_path=ckpt)


if __name__ == "__main__":
    main(*sys.argv[1:5])
