"""m2m.cli: the ``m2m`` command (`m2m.cli.main`).

The console script enters through `run`, which imports the command's module itself: that import
(torch, pyarrow) takes a noticeable fraction of a second, and a Ctrl-C during it printed a traceback
instead of the one line a Ctrl-C anywhere else prints.
"""

from __future__ import annotations

import sys

__all__ = ["run"]


def run() -> None:
    """The ``m2m`` console script: `m2m.cli.main.main`, a Ctrl-C while it loads included."""
    try:
        from m2m.cli.main import main
    except KeyboardInterrupt:
        sys.stderr.write("m2m: aborted\n")
        sys.exit(130)
    main()
