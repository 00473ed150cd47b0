"""What our output files say about themselves: Stability's ModelSpec keys plus our provenance keys.

Every file we write carries both, so `inspect`, `render` and `publish` can tell what it is, where it came from
and how to sample it, without side files. This module also answers the reverse question for any input:
which settings does this file want (`settings_for`), and what is its identity for provenance
(`source_sha256`).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_tools import __version__, catalog, hub
from lightning_tools.catalog import Settings
from lightning_tools.errors import UserError
from lightning_tools.tensors import hash_file

ARCH_BASE = "stable-diffusion-xl-v1-base"
ARCH_LORA = ARCH_BASE + "/lora"
# ModelSpec keys read elsewhere.
TITLE = "modelspec.title"
DESCRIPTION = "modelspec.description"
ARCHITECTURE = "modelspec.architecture"
IMPLEMENTATION = "modelspec.implementation"
HASH_KEY = "modelspec.hash_sha256"  # "0x" + sha256 of the data after the header, filled in by the writer

# Our own keys. Values are strings (safetensors metadata is str -> str); structured values are JSON.
STEPS = "lightning.steps"                   # "4"
PREDICTION_TYPE = "lightning.prediction_type"  # "epsilon" | "sample"
SETTINGS = "lightning.settings"             # JSON: recommended sampler settings (catalog.Settings.as_dict())
SOURCES = "lightning.sources"               # JSON list of Source dicts
TOOL = "lightning.tool"                     # "lightning-tools 0.1.0 merge"
EXTRACT = "lightning.extract"               # JSON: an extracted LoRA's rank and error report

_HEX64 = re.compile(r"[0-9a-f]{64}")
SOURCE_FIELDS = ("role", "file", "sha256", "strength", "sha256_of")


@dataclass(frozen=True)
class Source:
    """One input of a file we wrote: its role (base, lora, unet, source, tuned), name, sha256 and what that
    sha256 is of: "file" (the whole file, as `sha256sum` and the hub show it) or "data" (ModelSpec's hash of the
    data after the header, which survives metadata edits)."""

    role: str
    file: str
    sha256: str | None = None
    strength: float | None = None
    sha256_of: str | None = None

    @classmethod
    def of(cls, role: str, path: Path, metadata: Mapping[str, str], strength: float | None = None) -> "Source":
        """The input at `path` with its identity (see `source_sha256`)."""
        sha, kind = source_sha256(path, metadata)
        return cls(role, path.name, sha, strength, kind)


def modelspec(title: str, lora: bool = False, implementation: str = "sgm", resolution: str = "1024x1024",
              description: str | None = None) -> dict[str, str]:
    """ModelSpec 1.0 keys. `modelspec.hash_sha256` is present: `with_data_hash` has the writer fill it in."""
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


def with_data_hash(metadata: Mapping[str, str]) -> Mapping[str, str] | Callable[[str], Mapping[str, str]]:
    """The metadata to hand a writer: where it has ModelSpec's hash key, a function of the data's sha256 that
    fills it in (the writer calls it when the data is written); otherwise the metadata as it is."""
    if HASH_KEY not in metadata:
        return metadata
    fixed = dict(metadata)
    return lambda sha256: fixed | {HASH_KEY: "0x" + sha256}


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


def lightning_provenance(command: str, sources: Sequence[Source], settings: Settings | None = None) -> dict[str, str]:
    """`provenance` with the Lightning keys taken from `settings` (None: not a Lightning model)."""
    if settings is None:
        return provenance(command, sources)
    return provenance(command, sources, settings.steps, settings.prediction_type, settings.as_dict())


def carried_over(metadata: Mapping[str, str]) -> dict[str, str]:
    """The input's metadata that still applies to a re-encoded copy: everything but the data hash and the
    `format` marker diffusers and transformers put in their own files."""
    return {k: v for k, v in metadata.items() if k not in (HASH_KEY, "format")}


def read_sources(metadata: Mapping[str, str]) -> list[dict]:
    try:
        sources = json.loads(metadata.get(SOURCES, "[]"))
    except (json.JSONDecodeError, TypeError):
        return []
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []


def data_hash(metadata: Mapping[str, str]) -> str | None:
    """The sha256 of the data section a file claims for itself (ModelSpec), if it is a well-formed one."""
    claimed = metadata.get(HASH_KEY, "").lower().removeprefix("0x")
    return claimed if _HEX64.fullmatch(claimed) else None


def source_sha256(path: Path, metadata: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(sha256, "file" or "data"): the input's identity for provenance, without hashing a file twice when it is
    already known.

    The fetch manifest or hub cache gives the whole-file sha256 for free; a file we (or another ModelSpec
    writer) made carries the sha256 of its data; anything else is hashed once. A folder has no one hash.
    """
    if path.is_dir():
        return None, None
    recorded = hub.manifest_entry(path)
    if recorded and recorded.get("sha256"):
        return recorded["sha256"], "file"
    claimed = data_hash(metadata)
    return (claimed, "data") if claimed else (hash_file(path), "file")


# --- which settings a file wants -------------------------------------------------------------------------------

def settings_from_metadata(metadata: Mapping[str, str]) -> Settings | None:
    try:
        if SETTINGS in metadata:
            return Settings.from_dict(json.loads(metadata[SETTINGS]))
        if STEPS in metadata:
            return catalog.recommended_settings(int(metadata[STEPS]), metadata.get(PREDICTION_TYPE, "epsilon"))
    except (ValueError, TypeError, AttributeError, UserError):
        return None  # unreadable keys: fall back to what the catalogue or the name says
    return None


def settings_for(path: Path | str, metadata: Mapping[str, str], sha256: str | None = None
                 ) -> tuple[Settings, str] | None:
    """Recommended settings for a file, and where they came from.

    Order: our own metadata keys (what the writer knew), the catalogue (by `sha256` when given, else by file
    name), then the file name pattern.
    """
    path = Path(path)
    found = settings_from_metadata(metadata)
    if found:
        return found, "metadata"
    entry = catalog.by_sha256(sha256) if sha256 else catalog.by_filename(path.name)
    if entry:
        return entry.settings, f"catalog ({'sha256' if sha256 else 'file name'}: {entry.filename})"
    guessed = catalog.settings_from_name(path.name)
    return (guessed, "file name") if guessed else None


def output_metadata(src: Path, metadata: Mapping[str, str], sources: list[Source], command: str,
                    implementation: str = "sgm", lora: bool = False) -> dict[str, str]:
    """ModelSpec + provenance for a re-encoded copy of `src`, keeping the input's own keys (title,
    description, steps...) and the sources it already recorded (a merge's base and LoRAs stay on record)."""
    title = metadata.get(TITLE) or src.name.removesuffix(".safetensors")
    out = modelspec(title, lora=lora, implementation=implementation)
    out.update({k: v for k, v in carried_over(metadata).items() if k != IMPLEMENTATION})
    found = settings_for(src, metadata, sources[0].sha256 if sources[0].sha256_of == "file" else None)
    earlier = [Source(**{k: v for k, v in s.items() if k in SOURCE_FIELDS}) for s in read_sources(metadata)]
    out.update(lightning_provenance(command, earlier + sources, found[0] if found else None))
    return out
