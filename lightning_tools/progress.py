"""Progress bars that show on a terminal and stay quiet in pipes and CI."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def bar(total: int | None = None, desc: str = "", unit: str = "B", **kwargs) -> tqdm:
    """A tqdm bar on stderr; disabled unless stderr is a terminal (and not under CI)."""
    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                disable=not enabled(), file=sys.stderr, leave=False, **kwargs)
