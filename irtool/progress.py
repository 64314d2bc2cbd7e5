"""Progress bars for long work (calibration batches, sensitivity sweeps), drawn by tqdm on stderr.

Off unless asked for: the CLI asks when stderr is a terminal (or with --progress), so build logs and CI
stay clean; the API takes optimize(progress=True).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable


def bar(iterable: Iterable, enabled: bool, desc: str, unit: str, total: int | None = None) -> Iterable:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, file=sys.stderr)
