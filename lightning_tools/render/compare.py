"""Several models side by side: a grid of models x (prompt, seed), and how far each pair of models is apart on
every image, so choosing a strength, a family or a dtype is a look at one picture and one table, not a script."""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lightning_tools.render.checks import image_difference

SHEET = "compare.png"  # one sheet; more are compare-001.png, compare-002.png, ...
COLUMNS_PER_SHEET = 16  # (prompt, seed) columns per sheet: hundreds of prompts make many sheets, not one huge one
MAX_CELL = 192
_LABEL_WIDTH = 126  # the model names' column: 21 characters of the 6 px bitmap font
_LINE = 11
_PAD = 4


@dataclass(frozen=True)
class Rendered:
    """One model's image of one column: its file and whether it passed its checks."""

    path: Path
    passed: bool


@dataclass(frozen=True)
class ImageDifference:
    prompt: str
    seed: int
    mean_abs_diff: float
    psnr_db: float | None


@dataclass
class PairDifference:
    """Two models over every image they both rendered. `mean_abs_diff` is in 8-bit levels, averaged over the
    images; `psnr_db` averages the images that differ (an identical image has no PSNR) and is None when all are
    identical."""

    a: str
    b: str
    images: int
    identical: int
    mean_abs_diff: float
    max_mean_abs_diff: float
    psnr_db: float | None
    per_image: list[ImageDifference] = field(default_factory=list)

    def describe(self) -> str:
        psnr = "identical" if self.psnr_db is None else f"PSNR {self.psnr_db:.2f} dB"
        return (f"{self.a} vs {self.b}: mean abs diff {self.mean_abs_diff:g} levels (max {self.max_mean_abs_diff:g}),"
                f" {psnr}, {self.identical} of {self.images} images identical")


@dataclass
class Comparison:
    sheets: list[str]
    pairs: list[PairDifference]


def compare(out: Path, names: Sequence[str], columns: Sequence[tuple[str, int]],
            images: Sequence[Sequence[Rendered]]) -> Comparison:
    """Write the grid sheets into `out` and measure every pair of models. `columns`: the (prompt, seed) every
    model rendered, in order; `images[m][c]`: model m's image of column c. Holds one sheet's images at a time,
    and reads and measures them on threads (see `read_images`)."""
    pairs = list(itertools.combinations(range(len(names)), 2))
    found: dict[tuple[int, int], list[ImageDifference]] = {pair: [] for pair in pairs}
    pages = math.ceil(len(columns) / COLUMNS_PER_SHEET)
    sheets = []
    with ThreadPoolExecutor() as pool:
        for page in range(pages):
            shown = range(page * COLUMNS_PER_SHEET, min((page + 1) * COLUMNS_PER_SHEET, len(columns)))
            pixels = [read_images([images[m][c].path for c in shown]) for m in range(len(names))]
            tasks = [(a, b, i) for a, b in pairs for i in range(len(shown))]
            measured = pool.map(lambda t: image_difference(pixels[t[0]][t[2]], pixels[t[1]][t[2]]), tasks)
            for (a, b, i), d in zip(tasks, measured):
                prompt, seed = columns[shown[i]]
                found[(a, b)].append(ImageDifference(prompt, seed, d["mean_abs_diff"], d["psnr_db"]))
            passed = [[images[m][c].passed for c in shown] for m in range(len(names))]
            sheet = SHEET if pages == 1 else f"{Path(SHEET).stem}-{page + 1:03d}.png"
            grid(names, [columns[c] for c in shown], pixels, passed).save(out / sheet)
            sheets.append(sheet)
    return Comparison(sheets, [_summary(names[a], names[b], found[(a, b)]) for a, b in pairs])


def read_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """The RGB pixels of each file, decoded on threads: the main process reads back every image of a run to check
    and compare it, and PNG decoding (like numpy) releases the GIL, so this uses every core it has."""
    with ThreadPoolExecutor() as pool:
        return list(pool.map(_read, paths))


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _summary(a: str, b: str, per_image: list[ImageDifference]) -> PairDifference:
    diffs = [d.mean_abs_diff for d in per_image]
    psnrs = [d.psnr_db for d in per_image if d.psnr_db is not None]
    return PairDifference(a, b, len(per_image), len(per_image) - len(psnrs), round(sum(diffs) / len(diffs), 4),
                          max(diffs), round(sum(psnrs) / len(psnrs), 3) if psnrs else None, per_image)


def grid(names: Sequence[str], columns: Sequence[tuple[str, int]], pixels: Sequence[Sequence[np.ndarray]],
         passed: Sequence[Sequence[bool]], max_cell: int = MAX_CELL) -> Image.Image:
    """One row per model (its name on the left), one column per (prompt, seed) (the caption on top), failed
    images framed in red."""
    h, w = pixels[0][0].shape[:2]
    scale = min(1.0, max_cell / max(h, w))
    cell_w, cell_h = max(1, round(w * scale)), max(1, round(h * scale))
    col_w = max(cell_w, 96)  # captions of tiny images still get a readable column
    chars = max(8, col_w // 6)  # the default bitmap font is 6 px wide
    captions = [textwrap.wrap(f"seed {seed}: {prompt}", chars, max_lines=4, placeholder=" ...") for prompt, seed
                in columns]
    head_h = max(len(lines) for lines in captions) * _LINE + _PAD
    row_h = max(cell_h, 4 * _LINE)
    sheet = Image.new("RGB", (_LABEL_WIDTH + len(columns) * (col_w + _PAD) + _PAD,
                              head_h + len(names) * (row_h + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(captions):
        for j, line in enumerate(lines):
            draw.text((_LABEL_WIDTH + c * (col_w + _PAD), _PAD + j * _LINE), line, fill="black")
    for m, name in enumerate(names):
        y = head_h + m * (row_h + _PAD)
        for j, line in enumerate(textwrap.wrap(name, _LABEL_WIDTH // 6 - 1, max_lines=4, placeholder=" ...")):
            draw.text((_PAD, y + j * _LINE), line, fill="black")
        for c in range(len(columns)):
            x = _LABEL_WIDTH + c * (col_w + _PAD) + (col_w - cell_w) // 2
            sheet.paste(Image.fromarray(pixels[m][c]).resize((cell_w, cell_h)), (x, y))
            if not passed[m][c]:
                draw.rectangle([x - 1, y - 1, x + cell_w, y + cell_h], outline="red", width=2)
    return sheet
