"""What our output files say about themselves: Stability's ModelSpec keys plus our provenance keys.

Every file we write carries both, so `inspect`, `render` and `publish` can tell what it is, where it came from
and how to sample it, without side files.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from lightning_tools import __version__
from lightning_tools.tensors import HASH_KEY

ARCH_BASE = "stable-diffusion-xl-v1-base"
ARCH_LORA = ARCH_BASE + "/lora"
# ModelSpec keys read elsewhere (modelspec.hash_sha256 is tensors.HASH_KEY: the writer fills it in).
TITLE = "modelspec.title"
DESCRIPTION = "modelspec.description"
ARCHITECTURE = "modelspec.architecture"
IMPLEMENTATION = "modelspec.implementation"

# Our own keys. Values are strings (safetensors metadata is str -> str); structured values are JSON.
STEPS = "lightning.steps"                   # "4"
PREDICTION_TYPE = "lightning.prediction_type"  # "epsilon" | "sample"
SETTINGS = "lightning.settings"             # JSON: recommended sampler settings (catalog.Settings.as_dict())
SOURCES = "lightning.sources"               # JSON list of Source dicts
TOOL = "lightning.tool"                     # "lightning-tools 0.1.0 merge"
EXTRACT = "lightning.extract"               # JSON: an extracted LoRA's rank and error report


@dataclass(frozen=True)
class Source:
    """One input of a file we wrote: its role (base, lora, unet, source, tuned), name and sha256."""

    role: str
    file: str
    sha256: str | None = None
    strength: float | None = None


def modelspec(title: str, lora: bool = False, implementation: str = "sgm", resolution: str = "1024x1024",
              description: str | None = None) -> dict[str, str]:
    """ModelSpec 1.0 keys. `modelspec.hash_sha256` is present so the writer fills it with the data hash."""
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        ARCHITECTURE: ARCH_LORA if lora else ARCH_BASE,
        IMPLEMENTATION: "https://github.com/Stability-AI/generative-models" if implementation == "sgm"
        else "https://github.com/huggingface/diffusers",
        TITLE: title,
        "modelspec.resolution": resolution,
        "modelspec.date": _dt.date.today().isoformat(),
        HASH_KEY: "",
    }
    if description:
        spec[DESCRIPTION] = description
    return spec


def provenance(command: str, sources: Sequence[Source], steps: int | None = None,
               prediction_type: str | None = None, settings: Mapping | None = None) -> dict[str, str]:
    """Our keys: the command and its inputs, and for Lightning outputs the steps and sampler settings."""
    meta = {TOOL: f"lightning-tools {__version__} {command}",
            SOURCES: json.dumps([{k: v for k, v in asdict(s).items() if v is not None} for s in sources])}
    if steps is not None:
        meta[STEPS] = str(steps)
    if prediction_type is not None:
        meta[PREDICTION_TYPE] = prediction_type
    if settings is not None:
        meta[SETTINGS] = json.dumps(dict(settings))
    return meta


def lightning_provenance(command: str, sources: Sequence[Source], settings=None) -> dict[str, str]:
    """`provenance` with the Lightning keys taken from a `catalog.Settings` (None: not a Lightning model)."""
    if settings is None:
        return provenance(command, sources)
    return provenance(command, sources, settings.steps, settings.prediction_type, settings.as_dict())


def carried_over(metadata: Mapping[str, str]) -> dict[str, str]:
    """The input's metadata that still applies to a re-encoded copy: everything but the data hash."""
    return {k: v for k, v in metadata.items() if k != HASH_KEY}


def read_sources(metadata: Mapping[str, str]) -> list[dict]:
    try:
        return list(json.loads(metadata.get(SOURCES, "[]")))
    except (json.JSONDecodeError, TypeError):
        return []
