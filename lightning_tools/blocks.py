"""Per-block strengths: SDXL's 20 blocks by the names merge tools use, mapped onto our diffusers keys.

The names are kohya's `--lbws` and supermerger's for SDXL: `BASE` (both text encoders), `IN00`-`IN08` (the
single-file UNet's `input_blocks.0`-`8`), `MID` (`middle_block`) and `OUT00`-`OUT08` (`output_blocks.0`-`8`). A
diffusers key finds its block through the config's own single-file name map (`sdxl.keys.unet_names`), so the
mapping follows the model rather than a table of diffusers names:

    IN00        conv_in, and the time and add (label) embeddings, as kohya's lbws place them
    IN01-IN08   down_blocks.{0,1,2}: resnets and attentions two by two, the downsamplers as IN03 and IN06
    MID         mid_block
    OUT00-OUT08 up_blocks.{0,1,2}: resnet and attention three by three, each level's upsampler with its last
    OUT08       also conv_norm_out and conv_out, which read OUT08's output, as supermerger places them

The VAE has no block: nothing here scales it (merges never change it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from lightning_tools.errors import UsageError
from lightning_tools.sdxl.keys import unet_names

INPUT_BLOCKS = tuple(f"IN{i:02d}" for i in range(9))
OUTPUT_BLOCKS = tuple(f"OUT{i:02d}" for i in range(9))
BLOCKS: tuple[str, ...] = ("BASE", *INPUT_BLOCKS, "MID", *OUTPUT_BLOCKS)  # kohya's order for 20 numbers
GROUPS: dict[str, tuple[str, ...]] = {"IN": INPUT_BLOCKS, "OUT": OUTPUT_BLOCKS, "MID": ("MID",), "BASE": ("BASE",)}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

_SINGLE = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")
_BEFORE_INPUT = ("time_embed.", "label_emb.", "input_blocks.0.")
_SPEC_ITEM = re.compile(r"\s*([A-Za-z]+)(\d*)\s*[:=]\s*(\S+)\s*")


def block_of(component: str, key: str, unet_config: Mapping) -> str | None:
    """The block a tensor (or module) in diffusers naming belongs to; None for the VAE. A UNet key outside
    every block is an error: the caller's key maps and this table disagree."""
    if component in TEXT_ENCODERS:
        return "BASE"
    if component != "unet":
        return None
    single = unet_names(unet_config).to_single(key)
    if single is None:
        raise ValueError(f"unet key {key} has no single-file name, so no block")
    single += "."
    if single.startswith(_BEFORE_INPUT):
        return "IN00"
    if single.startswith("middle_block."):
        return "MID"
    if single.startswith("out."):
        return OUTPUT_BLOCKS[-1]
    found = _SINGLE.match(single)
    if found is None:
        raise ValueError(f"unet key {key} ({single[:-1]}) is in no SDXL block")
    names = INPUT_BLOCKS if found[1] == "input_blocks" else OUTPUT_BLOCKS
    index = int(found[2])
    if index >= len(names):
        raise UsageError(f"this UNet has more blocks than SDXL's ({single[:-1]}); per-block strengths name SDXL's "
                         "20 blocks")
    return names[index]


@dataclass(frozen=True)
class BlockWeights:
    """A strength multiplier for each of the 20 blocks (1 where the spec said nothing)."""

    weights: Mapping[str, float]

    def of(self, component: str, key: str, unet_config: Mapping) -> float:
        block = block_of(component, key, unet_config)
        return 1.0 if block is None else self.weights[block]

    @property
    def identity(self) -> bool:
        return all(w == 1 for w in self.weights.values())

    def to_json(self) -> dict[str, float]:
        return {name: self.weights[name] for name in BLOCKS}

    def describe(self) -> str:
        """The weights compactly, groups where a whole group agrees: "BASE 0, IN 0.5, MID 1, OUT00 1, ..."."""
        parts = [f"BASE {self.weights['BASE']:g}"]
        for group in (INPUT_BLOCKS, ("MID",), OUTPUT_BLOCKS):
            values = {self.weights[b] for b in group}
            if len(values) == 1:
                parts.append(f"{group[0].rstrip('0123456789') if len(group) > 1 else group[0]} {values.pop():g}")
            else:
                parts += [f"{b} {self.weights[b]:g}" for b in group]
        return ", ".join(parts)


def parse_blocks(spec: str | None, option: str = "--blocks") -> BlockWeights | None:
    """`--blocks` as weights: NAME:VALUE pairs, comma separated, where NAME is a block (IN04, OUT08, MID, BASE) or
    a group (IN, OUT), later pairs winning over earlier ones ("IN:0.5,IN04:1"); or 20 numbers in kohya's order
    (BASE, IN00-IN08, MID, OUT00-OUT08), optionally as a JSON list. None or blank: no per-block strengths."""
    if spec is None or not spec.strip():
        return None
    text = spec.strip()
    if text.startswith("["):
        try:
            numbers = json.loads(text)
        except json.JSONDecodeError:
            raise UsageError(f"{option} {spec}: not a JSON list of numbers") from None
        return _from_numbers(numbers, spec, option)
    items = [item for item in text.split(",") if item.strip()]
    if all(_number(item) is not None for item in items):
        return _from_numbers([_number(item) for item in items], spec, option)
    weights = dict.fromkeys(BLOCKS, 1.0)
    for item in items:
        found = _SPEC_ITEM.fullmatch(item)
        value = _number(found[3]) if found else None
        if found is None or value is None:
            raise UsageError(f"{option} {spec}: {item.strip()!r} is not NAME:VALUE (e.g. IN:0.5, IN04:0.3, BASE:0)")
        weights.update(dict.fromkeys(_names(found[1].upper(), found[2], spec, option), value))
    return BlockWeights(weights)


def _names(letters: str, digits: str, spec: str, option: str) -> tuple[str, ...]:
    if not digits:
        if letters in GROUPS:
            return GROUPS[letters]
    elif letters in ("IN", "OUT") and int(digits) < 9:
        return (f"{letters}{int(digits):02d}",)
    elif letters == "M" and int(digits) == 0:
        return ("MID",)  # supermerger's name for it
    raise UsageError(f"{option} {spec}: no block {letters}{digits}; SDXL's are BASE (text encoders), IN00-IN08, MID, "
                     "OUT00-OUT08, and the groups IN and OUT")


def _from_numbers(numbers: object, spec: str, option: str) -> BlockWeights:
    if not isinstance(numbers, list) or not all(isinstance(n, (int, float)) and not isinstance(n, bool)
                                                for n in numbers):
        raise UsageError(f"{option} {spec}: expected a list of numbers")
    if len(numbers) != len(BLOCKS):
        raise UsageError(f"{option} {spec}: {len(numbers)} numbers; give {len(BLOCKS)} (BASE, IN00-IN08, MID, "
                         "OUT00-OUT08, as kohya's --lbws for SDXL) or NAME:VALUE pairs such as IN:0.5,OUT04:0")
    return BlockWeights(dict(zip(BLOCKS, map(float, numbers))))


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None
