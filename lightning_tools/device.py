"""The compute device a command runs on, checked before any slow work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_tools.errors import UsageError, UserError

if TYPE_CHECKING:
    import torch


def parse_device(name: str, option: str = "--device") -> "torch.device":
    """`cpu`, `cuda` or `cuda:N` as a torch device; one line when it is not a device or cannot be used here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"{option} {name}: only cuda and cpu are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"{option} {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: there are {torch.cuda.device_count()} CUDA devices here")
    return device
