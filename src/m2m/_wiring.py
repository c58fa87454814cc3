"""Registers the stream and Ray implementations that lake methods call (`m2m.plugins`).

Each one imports its module when first called, so ``import m2m`` stays cheap.
"""

from __future__ import annotations

from typing import Any, Callable

from m2m.plugins import register


def _export_to_dataloader(lake: Any, options: Any = None, **overrides: Any) -> Any:
    from m2m.stream.from_lake import export_to_dataloader

    return export_to_dataloader(lake, options, **overrides)


def _ray_geometry(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        from m2m.ray import geometry

        return getattr(geometry, name)(*args, **kwargs)

    call.__name__ = name
    return call


register("stream.export", _export_to_dataloader)
for _name in ("estimate", "duplicate_groups", "geometry_fields", "local_max_rows"):
    register(f"ray.{_name}", _ray_geometry(_name))
