"""The CLI's progress bar (tqdm on stderr), used as a progress callback by the commands and the demo."""

from __future__ import annotations

import sys


class Bar:
    """A tqdm progress bar on stderr used as a progress callback, drawn only when stderr is a terminal."""

    def __init__(self, total: int | None, desc: str, unit: str = "rows", quiet: bool = False) -> None:
        from tqdm.auto import tqdm

        # disable=None: tqdm draws only on a terminal, so logs and pipes get no carriage-return noise
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=True if quiet else None,
                         file=sys.stderr, dynamic_ncols=True, leave=False)

    def __call__(self, n: int) -> None:
        self._bar.update(n)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
