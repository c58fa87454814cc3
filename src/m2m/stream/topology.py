"""Who is reading: the (rank, world_size, worker, num_workers) of one stream consumer.

The topology is detected once, at the edge (`detect`), and passed as plain numbers everywhere
else, so orders and partitions can be checked for 8 ranks x 4 workers inside one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from m2m.errors import ConfigError


@dataclass(frozen=True)
class World:
    """One reader's place: DDP rank among ``world_size`` and DataLoader worker among ``num_workers``.

    ``num_workers`` counts reading processes per rank: 0 DataLoader workers is ``num_workers=1``.
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "worker", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"World.{name} must be an int, got {value!r}")
        if self.world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers (reading processes per rank) must be >= 1, got {self.num_workers}")
        if not 0 <= self.worker < self.num_workers:
            raise ConfigError(f"worker must be in [0, {self.num_workers}), got {self.worker}")

    def with_worker(self, worker: int, num_workers: int) -> "World":
        """The same rank seen from one of ``num_workers`` reading processes."""
        return World(self.rank, self.world_size, worker, num_workers)


def detect_rank(rank: int | None = None, world_size: int | None = None) -> World:
    """The DDP part of the topology, read now: explicit values win, else torch.distributed when it is
    initialised, else torchrun's ``RANK``/``WORLD_SIZE`` environment (both set), else (0, 1).

    Loaders call this when an iteration starts (and for ``len``), not when they are built: Lightning
    and many launchers create the process group after the loader exists.
    """
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            env_rank, env_world = dist.get_rank(), dist.get_world_size()
        else:
            env_rank, env_world = _torchrun_env()
        world_size = env_world if world_size is None else world_size
        rank = env_rank if rank is None else rank
    return World(rank=int(rank), world_size=int(world_size))


def _torchrun_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment torchrun sets, (0, 1) when either is missing."""
    raw = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE")}
    if raw["RANK"] is None or raw["WORLD_SIZE"] is None:
        return 0, 1
    try:
        return int(raw["RANK"]), int(raw["WORLD_SIZE"])
    except ValueError as exc:
        raise ConfigError(f"environment RANK={raw['RANK']!r} WORLD_SIZE={raw['WORLD_SIZE']!r} are not integers") from exc


def detect_worker(world: World) -> World:
    """Add the DataLoader worker of the calling process (``get_worker_info``) to ``world``."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is None:
        return world.with_worker(0, 1)
    return world.with_worker(int(info.id), int(info.num_workers))
