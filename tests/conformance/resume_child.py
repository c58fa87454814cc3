"""A fresh process of the conformance matrix: open a lake, load each rank's saved state into a new loader
and write the batches it yields (the rest of the epoch) to a file. Usage: resume_child.py SPEC.json"""

from __future__ import annotations

import json
import sys


def main(spec_path: str) -> None:
    import torch
    from conformance_helpers import epoch_of, loader_of

    from m2m import open_lake

    with open(spec_path) as f:
        spec = json.load(f)
    states = torch.load(spec["states"], weights_only=False)
    out = []
    with open_lake(spec["path"], **spec["open_kw"]) as lake:
        for kw, state in zip(spec["kws"], states):
            dl = loader_of(lake, kw)
            dl.load_state_dict(state)
            out.append(epoch_of(dl))
            dl.close()
    torch.save(out, spec["out"])


if __name__ == "__main__":  # spawned DataLoader workers import this module: nothing runs at import
    main(sys.argv[1])
