"""What makes a rendered image pass: sanity checks on the decoded values, a comparison with the image of the same
(prompt, seed, size, steps) in a reference render, and the contact sheet people look at."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_tools.errors import UserError

DEFAULT_MAX_DIFF = 3.0  # mean absolute difference to the reference, in 8-bit levels (0-255)
# The VAE decodes to [-1, 1]; real SDXL images overshoot a little (white backgrounds reach ~1.1), while an fp16
# overflow, a wrong prediction type or a broken merge gives NaNs, flat images or values far out.
RANGE_LIMIT = 1.5
MAX_OUT_OF_RANGE = 0.05  # fraction of values allowed beyond +-RANGE_LIMIT
MIN_STD = 0.01  # pixel standard deviation on a 0-1 scale; below it the image is blank


@dataclass(frozen=True)
class Job:
    """One image to render: what identifies it in a reference render too."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int

    def describe(self) -> str:
        return f"prompt {self.prompt!r} seed {self.seed} ({self.width}x{self.height}, {self.steps} steps)"


def image_checks(decoded: torch.Tensor) -> dict[str, dict]:
    """Sanity of one decoded image (3 x H x W): finite, not blank, values in the VAE's range."""
    finite = bool(torch.isfinite(decoded).all())
    x = torch.nan_to_num(decoded.float(), nan=0.0, posinf=0.0, neginf=0.0)
    std = float((x / 2 + 0.5).clamp(0, 1).std())
    out_of_range = float((x.abs() > RANGE_LIMIT).float().mean())
    return {
        "finite": {"passed": finite},
        "not_blank": {"passed": std >= MIN_STD, "std": round(std, 5), "min_std": MIN_STD},
        "value_range": {"passed": out_of_range <= MAX_OUT_OF_RANGE, "min": round(float(x.min()), 4),
                        "max": round(float(x.max()), 4), "out_of_range": round(out_of_range, 5),
                        "limit": RANGE_LIMIT, "max_out_of_range": MAX_OUT_OF_RANGE},
    }


def to_pixels(decoded: torch.Tensor) -> np.ndarray:
    """3 x H x W in [-1, 1] -> H x W x 3 uint8, rounded the way diffusers' image processor does."""
    x = torch.nan_to_num(decoded.float(), nan=0.0)
    return (x / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def image_difference(pixels: np.ndarray, reference: np.ndarray) -> dict:
    """Mean absolute difference in 8-bit levels and PSNR in dB (None when identical)."""
    diff = pixels.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff ** 2))
    psnr = None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 3)
    return {"mean_abs_diff": round(float(np.mean(np.abs(diff))), 4), "psnr_db": psnr}


@dataclass(frozen=True)
class ReferenceImage:
    job: Job
    file: str
    pixels: np.ndarray | None


def read_reference(folder: Path) -> dict[Job, ReferenceImage]:
    """A previous render's images by (prompt, seed, size, steps), with pixels read now, so the reference may even
    be the output being replaced. Reports written before images carried their size and steps use the report's."""
    report_path = Path(folder) / "report.json"
    try:
        report = json.loads(report_path.read_text())
        entries = report["images"]
        out = {}
        for entry in entries:
            job = Job(entry["prompt"], int(entry["seed"]), int(entry.get("width", report.get("width"))),
                      int(entry.get("height", report.get("height"))), int(entry.get("steps", report.get("steps"))))
            path = Path(folder) / entry["file"]
            pixels = np.asarray(Image.open(path).convert("RGB")) if path.is_file() else None
            out[job] = ReferenceImage(job, entry["file"], pixels)
    except FileNotFoundError:
        raise UserError("not found; --reference takes the output folder of an earlier render",
                        path=report_path) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError):
        raise UserError("not a render report (no images list with prompt, seed and file)", path=report_path) from None
    return out


def compare_with_reference(job: Job, pixels: np.ndarray, reference: dict[Job, ReferenceImage],
                           max_diff: float) -> dict:
    """The image against the reference image of the same job; a job the reference lacks fails on its own."""
    entry = reference.get(job)
    if entry is None:
        return {"passed": False, "problem": f"no reference image for prompt {job.prompt!r} seed {job.seed}"
                                            f" ({job.width}x{job.height}, {job.steps} steps)"}
    if entry.pixels is None:
        return {"passed": False, "problem": f"reference image {entry.file} is missing", "file": entry.file}
    result = image_difference(pixels, entry.pixels)
    result.update(passed=result["mean_abs_diff"] <= max_diff, max_diff=max_diff, file=entry.file)
    return result


def contact_sheet(tiles: Sequence[tuple[np.ndarray, str, bool]], max_cell: int = 256) -> Image.Image:
    """All images in a grid, each with its caption (wrapped) underneath and a red frame when it failed.

    `tiles`: (pixels, caption, passed). Cells are the size of the images, shrunk to `max_cell` at most."""
    if not tiles:
        return Image.new("RGB", (1, 1), "white")
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / cols)
    h, w = tiles[0][0].shape[:2]
    scale = min(1.0, max_cell / max(h, w))
    cell_w, cell_h = max(1, round(w * scale)), max(1, round(h * scale))
    text_w = max(cell_w, 96)  # captions of tiny images still get a readable column
    chars = max(8, text_w // 6)  # the default bitmap font is 6 px wide
    captions = [textwrap.wrap(caption, chars, max_lines=4, placeholder=" ...") or [""] for _, caption, _ in tiles]
    line_h = 11
    text_h = max(len(lines) for lines in captions) * line_h + 4
    pad = 4
    sheet = Image.new("RGB", (cols * (text_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((pixels, _, passed), lines) in enumerate(zip(tiles, captions)):
        x = pad + (i % cols) * (text_w + pad)
        y = pad + (i // cols) * (cell_h + text_h + pad)
        tile = Image.fromarray(pixels).resize((cell_w, cell_h))
        sheet.paste(tile, (x + (text_w - cell_w) // 2, y))
        if not passed:
            draw.rectangle([x + (text_w - cell_w) // 2 - 1, y - 1, x + (text_w + cell_w) // 2, y + cell_h],
                           outline="red", width=2)
        for j, line in enumerate(lines):
            draw.text((x, y + cell_h + 2 + j * line_h), line, fill="red" if not passed else "black")
    return sheet
