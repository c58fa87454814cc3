"""A Lightning callback that restores the stream's state from any checkpoint, epoch-end ones included.

Lightning saves each stateful training loader's ``state_dict()`` in every checkpoint
(``["loops"]["fit_loop"]["state_dict"]["combined_loader"]``) but loads it back only when the run
stopped inside an epoch: from a checkpoint taken at an epoch's end (``ModelCheckpoint``'s default) it
skips ``load_state_dict``. The next epoch is still the right one (Lightning calls ``set_epoch``), but
whatever else the state carries is lost silently, e.g. ``importance_sampling="loss"`` priorities start
again from uniform. ``RestoreStreamState`` keeps the saved states when the checkpoint is loaded and
hands them to the m2m loaders (`m2m.stream.loader.StreamLoader`, mixtures included) at
``on_train_start``, before the first batch of the resumed run is drawn; other loaders are left to
Lightning. A mid-epoch state, which Lightning has already loaded, loads to the same position again,
moved back to where the training stood: a batch yielded to a step that raised (``OnExceptionCheckpoint``)
is yielded again, and an epoch Lightning ended early (``limit_train_batches``) counts as finished.

    trainer = lightning.pytorch.Trainer(callbacks=[m2m.lightning.RestoreStreamState()], ...)
    trainer.fit(model, train_dataloaders=dl, ckpt_path="epoch=3.ckpt")

Importing this module needs Lightning (``pip install lightning``); nothing else in m2m does.
"""

from __future__ import annotations

from typing import Any

from m2m.errors import ConfigError
from m2m.stream.loader import StreamLoader

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities.combined_loader import CombinedLoader
except ImportError as exc:  # pragma: no cover - the test extra installs Lightning
    raise ConfigError(f"m2m.lightning needs Lightning (pip install lightning): {exc}") from exc

__all__ = ["RestoreStreamState"]


def _saved_states(checkpoint: dict[str, Any]) -> list[Any] | None:
    """The training loaders' states in a Lightning checkpoint, or None where it holds none."""
    try:
        states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    except (KeyError, TypeError):
        return None
    return list(states) if isinstance(states, (list, tuple)) else None


def _progress(checkpoint: dict[str, Any]) -> tuple[int | None, int | None]:
    """(epochs Lightning had processed, batches of the current epoch it had processed) in a checkpoint,
    None where it does not say."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    try:
        epochs = int(fit["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        epochs = None
    try:
        batches = int(fit["epoch_loop.batch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        batches = None
    return epochs, batches


def _as_trained(state: Any, epochs: int | None, batches: int | None, single: bool) -> Any:
    """``state`` moved to where the training stood, which may lie behind what the loader yielded: an epoch
    Lightning finished early (``limit_train_batches``, a ``min_size`` combination) is a finished epoch, not
    a mid-epoch position a grown lake refuses; and a batch yielded to a step that raised (the checkpoint
    of ``OnExceptionCheckpoint``) was not trained, so the resume yields it again (it was dropped: 64 rows
    of the epoch never trained, a probing user, 2026-12-08). Only where the loader's epoch is Lightning's."""
    if not isinstance(state, dict) or epochs is None or "batches_yielded" not in state or "epoch" not in state:
        return state
    epoch, yielded = state["epoch"], state["batches_yielded"]
    if not (isinstance(epoch, int) and isinstance(yielded, int)) or yielded == 0:
        return state
    if epoch < epochs:            # Lightning processed this epoch: the next pass is a new epoch's start
        return {**state, "batches_yielded": 0}
    if epoch == epochs and single and batches is not None and 0 <= batches < yielded:
        return {**state, "batches_yielded": batches}   # yielded, never trained
    return state


def _is_stateful(loader: Any) -> bool:
    # Lightning's rule for which loaders' states it saves, in order (CombinedLoader._state_dicts)
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


class RestoreStreamState(Callback):
    """Loads the saved state of every m2m training loader when ``fit`` resumes from a checkpoint,
    whether or not the checkpoint was taken inside an epoch (Lightning itself restores loaders only
    then). Add it to the ``Trainer``'s callbacks; it changes nothing in a run that does not resume."""

    def __init__(self) -> None:
        self._states: list[Any] | None = None
        self._progress: tuple[int | None, int | None] = (None, None)
        self.restored = 0
        """How many m2m loaders the last resumed ``fit`` restored (0: nothing to restore)."""

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning restores callbacks for validate/test too: a later fit without ckpt_path is no resume
        # (it was given the checkpoint's position and skipped its first batches, found by a probing user)
        fitting = getattr(getattr(getattr(trainer, "state", None), "fn", None), "value", "fit") == "fit"
        self._states = _saved_states(checkpoint) if fitting else None
        self._progress = _progress(checkpoint)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # a resumed fit that had nothing left to train never reaches on_train_start: its states must not
        # reach a later fit of the same callback that does not resume (found in review)
        self._states = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states, self._states = self._states, None
        self.restored = 0
        if not states:
            return
        loaders = CombinedLoader(trainer.train_dataloader, "max_size_cycle").flattened
        stateful = [dl for dl in loaders if _is_stateful(dl)]
        if len(stateful) != len(states):
            raise ConfigError(f"RestoreStreamState: the checkpoint holds {len(states)} training loader state(s) and "
                              f"this run has {len(stateful)} stateful training loader(s); pass the same loaders")
        epochs, batches = self._progress
        for loader, state in zip(stateful, states):
            if isinstance(loader, StreamLoader):
                loader.load_state_dict(_as_trained(state, epochs, batches, len(stateful) == 1))
                self.restored += 1
