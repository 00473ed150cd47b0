"""Progress bars that show on a terminal and stay quiet in pipes and CI, and the libraries' own output kept
out of ours unless `--verbose`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

# The libraries we drive print notices, warnings and bars of their own (diffusers and transformers through
# their verbosity settings, read when they are imported; huggingface_hub's retries through logging, whose level
# it resets from HF_HUB_VERBOSITY when it is imported).
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_LIBRARIES = ("diffusers", "transformers", "peft", "huggingface_hub", "accelerate", "torch", "safetensors")


def enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def bar(total: int | None = None, desc: str = "", unit: str = "B", **kwargs) -> "tqdm":
    """A tqdm bar on stderr; disabled unless stderr is a terminal (and not under CI). tqdm is imported here, not
    at start-up: it costs more than a header-only command's whole work."""
    from tqdm import tqdm

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                disable=not enabled(), file=sys.stderr, leave=False, **kwargs)


def quiet_libraries() -> None:
    """Keep the libraries' notices, warnings and retry messages out of our output (the CLI calls this unless
    --verbose). Set before they are imported, so it costs nothing at start-up."""
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for library in _LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
        logging.getLogger(library).setLevel(logging.ERROR)


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers' and diffusers' own progress bars (save_pretrained's "Writing model shards") off for a block."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(lib, lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _ in before:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in before:
            if was:
                lib.enable_progress_bar()
