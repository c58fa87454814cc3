"""`StreamOptions`: every knob of a stream, in one frozen, validated object.

A knob has one source of truth: `StreamOptions`. `Lake.export_to_dataloader(options=..., **overrides)`
and `make_loader(source, options=..., **overrides)` both go through `StreamOptions.merged`, which
applies keyword overrides to the options object; the budgets a lake's `M2MConfig` provides
(``device``, ``seed``, ``warm_bytes``, ``hot_bytes``, ``prefetch``) only fill the fields left at
None (`StreamOptions.with_defaults`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from multiprocessing.context import BaseContext
from typing import Any, Callable, Mapping, Sequence

import torch

from m2m._validate import check_int, check_threads, is_flag
from m2m.errors import ConfigError, ConfigTypeError

SHUFFLE_MODES = ("auto", "full", "block")
WARM_MODES = ("auto", "arena", "cold")
HOT_MODES = ("auto", "cpu", "resident", "staged")
GENERATE_MODES = ("langevin", "vmf", "mixture")
START_METHODS = ("fork", "spawn", "forkserver")
#: What ``embedding_dtype`` accepts besides None (float32) and "stored" (the lake's storage dtype).
EMBEDDING_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: DataLoader keywords that cannot apply: the stream orders, batches and shards rows itself.
REFUSED_KEYWORDS = {
    "sampler": "the stream orders and shards rows itself (use shuffle=, seed=/generator=, rank=/world_size=, "
               "importance_sampling=)",
    "batch_sampler": "the stream cuts whole batches itself (use batch_size=, drop_last=)",
    "pin_memory_device": "batches already arrive on config.device (pin_memory=True pins CPU batches)",
}

#: Fields a lake's `M2MConfig` fills when they are None.
CONFIG_DEFAULTS = ("device", "seed", "warm_bytes", "hot_bytes", "prefetch")


def generate_mode(generate_samples: Any) -> str | None:
    """False -> None, True -> "langevin", "langevin"/"vmf"/"mixture" as is; anything else is a ConfigError."""
    if generate_samples is False or generate_samples is None:
        return None
    if generate_samples is True:
        return "langevin"
    if isinstance(generate_samples, str) and generate_samples in GENERATE_MODES:
        return generate_samples
    raise ConfigError(f"generate_samples must be False, True, 'langevin', 'vmf' or 'mixture', got {generate_samples!r}")


@dataclass(frozen=True)
class StreamOptions:
    """Every stream knob (see docs/stream.md). Invalid values raise `ConfigError` when the object is made.

    Batching and order: ``batch_size``, ``shuffle``, ``drop_last``, ``columns`` (None: each batch is
    the float32 embedding tensor; names: a dict), ``seed`` (None: the lake's ``config.seed``),
    ``epoch`` (of the first pass), ``rank``/``world_size`` (None: read when iteration starts),
    ``shuffle_mode`` ("auto" | "full" | "block"), ``block_rows``, ``shard_affinity``.
    Sampling and augmentation: ``importance_sampling``, ``generate_samples`` (lake streams only).
    Tiers: ``device`` (None: the lake's ``config.device``), ``warm_bytes``/``hot_bytes``/``prefetch``
    (None: the lake's config), ``warm_mode``, ``hot_mode``, ``chunk_batches``, ``intra_op_threads``,
    ``huge_pages``, ``background_fill``, ``embedding_dtype`` (None: float32 batches, as the contract
    says; "stored": the lake's storage dtype, so a float16 lake is delivered without a conversion;
    or torch.float32 / torch.float16 / torch.bfloat16, by dtype or name).
    DataLoader workers (torch meaning): ``num_workers``, ``multiprocessing_context`` (a start method
    name or context), ``persistent_workers``, ``prefetch_factor``, ``timeout``, ``worker_init_fn``,
    ``pin_memory``, ``generator`` (its ``initial_seed()`` is the seed), ``collate_fn``, ``in_order``.

    Example: ``opts = StreamOptions(batch_size=512, shuffle_mode="block")``, then
    ``lake.export_to_dataloader(options=opts, num_workers=2)`` (a keyword overrides that field).
    """

    batch_size: int = 256
    shuffle: bool = True
    drop_last: bool = False
    columns: Sequence[str] | None = None
    seed: int | None = None
    epoch: int = 0
    rank: int | None = None
    world_size: int | None = None
    shuffle_mode: str = "auto"
    block_rows: int | None = None
    shard_affinity: bool | None = None
    importance_sampling: bool | str = False
    generate_samples: bool | str = False
    device: str | torch.device | None = None
    warm_bytes: int | None = None
    hot_bytes: int | None = None
    prefetch: int | None = None
    warm_mode: str = "auto"
    hot_mode: str = "auto"
    chunk_batches: int | None = None
    intra_op_threads: int | None = 1
    huge_pages: bool = True
    background_fill: bool = True
    embedding_dtype: torch.dtype | str | None = None
    num_workers: int = 0
    multiprocessing_context: str | BaseContext | None = None
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    timeout: float = 0.0
    worker_init_fn: Callable[[int], None] | None = None
    pin_memory: bool = False
    generator: torch.Generator | None = None
    collate_fn: Callable[[Any], Any] | None = None
    in_order: bool = True

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "batch_size", check_int(self.batch_size, "batch_size", 1))
        put(self, "epoch", check_int(self.epoch, "epoch", 0))
        put(self, "num_workers", check_int(self.num_workers, "num_workers", 0))
        for name, low in (("warm_bytes", 0), ("hot_bytes", 0), ("prefetch", 0), ("block_rows", 1),
                          ("chunk_batches", 1), ("rank", 0), ("world_size", 1)):
            value = getattr(self, name)
            if value is not None:
                put(self, name, check_int(value, name, low))
        if self.intra_op_threads is not None:
            put(self, "intra_op_threads", check_threads(self.intra_op_threads, "intra_op_threads"))
        for name in ("shuffle", "drop_last", "huge_pages", "background_fill", "persistent_workers", "pin_memory",
                     "shard_affinity"):
            value = getattr(self, name)
            if value is None and name == "shard_affinity":
                continue
            if not is_flag(value):
                raise ConfigTypeError(f"{name} must be True or False, got {value!r}")
            put(self, name, bool(value))
        for name, allowed in (("shuffle_mode", SHUFFLE_MODES), ("warm_mode", WARM_MODES), ("hot_mode", HOT_MODES)):
            if getattr(self, name) not in allowed:
                cls = ConfigError if isinstance(getattr(self, name), str) else ConfigTypeError
                raise cls(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        put(self, "columns", _columns(self.columns))
        put(self, "seed", seed_from(self.seed, self.generator))
        generate_mode(self.generate_samples)
        imp = self.importance_sampling
        if not (imp is None or isinstance(imp, (bool, str))):
            raise ConfigTypeError(f"importance_sampling must be False, True, 'kappa', 'alpha', 'loss' or a metadata "
                                  f"column's name, got {imp!r}")
        if isinstance(imp, str) and not imp.strip():
            raise ConfigError("importance_sampling must name a mode or a column, got an empty string")
        put(self, "embedding_dtype", _embedding_dtype(self.embedding_dtype))
        if self.device is not None:  # (a torch.device is kept as its name, as the field's readers take it)
            put(self, "device", _device_name(self.device))
        self._check_workers()

    def _check_workers(self) -> None:
        """The standard DataLoader keywords, checked the way torch checks them (as `ConfigError`)."""
        n = self.num_workers
        if self.persistent_workers and n == 0:
            raise ConfigError("persistent_workers=True needs num_workers > 0 (as in torch's DataLoader)")
        if self.prefetch_factor is not None:
            if n == 0:
                raise ConfigError(f"prefetch_factor={self.prefetch_factor!r} needs num_workers > 0; "
                                  "with num_workers=0 use prefetch= (batches a background thread keeps ready)")
            object.__setattr__(self, "prefetch_factor", check_int(self.prefetch_factor, "prefetch_factor", 1))
        ctx = self.multiprocessing_context
        if ctx is not None:
            if n == 0:
                raise ConfigError(f"multiprocessing_context={ctx!r} needs num_workers > 0 "
                                  "(as in torch's DataLoader)")
            if isinstance(ctx, str) and ctx not in START_METHODS:
                raise ConfigError(f"multiprocessing_context must be one of {START_METHODS} or a context, got {ctx!r}")
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ConfigTypeError(f"timeout must be a number >= 0, got {t!r}")
        if not t >= 0:
            raise ConfigError(f"timeout must be a number >= 0, got {t!r}")
        object.__setattr__(self, "timeout", float(t))
        for name in ("worker_init_fn", "collate_fn"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ConfigTypeError(f"{name} must be callable, got {type(fn).__name__}")
        if self.in_order is not True:
            raise ConfigError(f"in_order={self.in_order!r} cannot apply: the stream's batch order is a "
                              "deterministic function of (seed, epoch, rank), whatever the number of workers")

    # ------------------------------------------------------------------ building
    @classmethod
    def merged(cls, options: "StreamOptions | None", overrides: Mapping[str, Any]) -> "StreamOptions":
        """``options`` (default: all defaults) with ``overrides`` applied: the one way keywords become options."""
        if options is not None and not isinstance(options, StreamOptions):
            raise ConfigTypeError(f"options must be a StreamOptions, got {type(options).__name__}")
        for name, why in REFUSED_KEYWORDS.items():
            if name in overrides:
                raise ConfigError(f"{name}=... cannot apply to a stream: {why}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            # a TypeError, as an unknown keyword of StreamOptions(...) itself is
            raise ConfigTypeError(f"unknown stream option(s) {unknown}; StreamOptions has {sorted(known)}")
        base = options or cls()
        changes = dict(overrides)
        if "generator" in changes and "seed" not in changes:
            changes["seed"] = None  # the generator's seed replaces the options' one
        return dataclasses.replace(base, **changes) if changes else base

    def with_defaults(self, defaults: Mapping[str, Any]) -> "StreamOptions":
        """Fill the fields in `CONFIG_DEFAULTS` that are None from ``defaults`` (a lake's config)."""
        changes = {k: defaults[k] for k in CONFIG_DEFAULTS if k in defaults and getattr(self, k) is None}
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def start_method(self) -> str | None:
        """The workers' start method by name (None: torch's default for this platform)."""
        ctx = self.multiprocessing_context
        if ctx is None or isinstance(ctx, str):
            return ctx
        name = getattr(ctx, "get_start_method", None)
        return str(name()) if callable(name) else None

    def torch_device(self) -> torch.device:
        """``device`` as a torch device ("cpu" when unset)."""
        return torch.device(_device_name(self.device or "cpu"))


def _columns(columns: Any) -> tuple[str, ...] | None:
    if columns is None:
        return None
    if isinstance(columns, str):
        raise ConfigTypeError(f"columns must be a tuple of names, not the string {columns!r}")
    try:
        names = tuple(columns)
    except TypeError:
        raise ConfigTypeError(f"columns must be None or a tuple of names, got {columns!r}") from None
    if not names:
        raise ConfigError("columns must name at least one column (None: the embedding tensor)")
    if not all(isinstance(c, str) for c in names):
        raise ConfigTypeError(f"columns must be a tuple of names, got {columns!r}")
    return names


def _embedding_dtype(value: Any) -> torch.dtype | str | None:
    """None, "stored", or one of `EMBEDDING_DTYPES` (by name or dtype; a name becomes the dtype)."""
    if value is None or value == "stored":
        return value
    if isinstance(value, str) and value in EMBEDDING_DTYPES:
        return EMBEDDING_DTYPES[value]
    if isinstance(value, torch.dtype) and value in EMBEDDING_DTYPES.values():
        return value
    raise ConfigError(f"embedding_dtype must be None, 'stored', or one of {sorted(EMBEDDING_DTYPES)}, got {value!r}")


def _device_name(device: Any) -> str:
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device") from exc


def seed_from(seed: int | None, generator: Any) -> int | None:
    """The stream's seed: ``seed``, else a torch ``generator``'s ``initial_seed()`` (None: not given)."""
    if generator is None:
        return None if seed is None else check_int(seed, "seed", 0)
    if not isinstance(generator, torch.Generator):
        raise ConfigTypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    from_gen = int(generator.initial_seed())
    if seed is not None and check_int(seed, "seed", 0) != from_gen:
        raise ConfigError(f"seed={seed} and generator (initial_seed {from_gen}) disagree: pass one of them")
    return from_gen
