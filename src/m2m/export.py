"""Former home of the lake -> stream wiring, now `m2m.stream.from_lake` (kept as an alias for imports)."""

from __future__ import annotations

from m2m.stream.from_lake import (  # noqa: F401
    GENERATE_MODES,
    Geometry,
    GeometryOverlay,
    build_augmenter,
    build_sampler,
    computed_geometry,
    export_to_dataloader,
    filled_kappa,
    generate_mode,
    importance_mode,
    stored_geometry,
)
from m2m.stream.options import REFUSED_KEYWORDS  # noqa: F401
