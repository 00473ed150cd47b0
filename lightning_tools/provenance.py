"""What our output files say about themselves: Stability's ModelSpec keys plus our provenance keys.

Every file we write carries both, so `inspect`, `render` and `publish` can tell what it is, where it came from
and how to sample it, without side files. This module also answers the reverse question for any input:
how must this file be sampled (`settings_for`: its family's profile), and what is its identity for provenance
(`source_sha256`).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_tools import __version__, hub
from lightning_tools import families as fams
from lightning_tools.errors import UserError
from lightning_tools.sampling import Sampling, for_file, from_name
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
FAMILY = "lightning.family"                 # "hyper_sd": the few-step family (lightning_tools/families)
PROFILE = "lightning.profile"               # "ddim-trailing": the family's sampling profile
SETTINGS = "lightning.settings"             # JSON: how to sample it (sampling.Sampling.as_dict())
SOURCES = "lightning.sources"               # JSON list of Source dicts
TOOL = "lightning.tool"                     # "lightning-tools 0.1.0 merge"
EXTRACT = "lightning.extract"               # JSON: an extracted LoRA's rank and error report
LOWRANK = "lightning.lowrank"               # JSON: a resized or combined LoRA's ranks and error report
BLOCKS = "lightning.blocks"                 # JSON: a merge's per-block strengths ({"BASE": 1, "IN00": 0.5, ...})
FP8 = "lightning.fp8"                       # JSON: an fp8 UNet's error against fp16 (checkpoint.Fp8Loss)

_HEX64 = re.compile(r"[0-9a-f]{64}")
SOURCE_FIELDS = ("role", "file", "sha256", "strength", "sha256_of")


@dataclass(frozen=True)
class Source:
    """One input of a file we wrote: its role (base, lora, unet, source, tuned, add_difference, minus), name,
    sha256 and what that sha256 is of: "file" (the whole file, as `sha256sum` and the hub show it) or "data"
    (ModelSpec's hash of the data after the header, which survives metadata edits). `strength` is a LoRA's
    strength, or a difference's alpha on both of its inputs."""

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


def lightning_provenance(command: str, sources: Sequence[Source], sampling: Sampling | None = None
                         ) -> dict[str, str]:
    """Our keys: the command and its inputs, and for a few-step model its family, profile, steps and the whole
    sampler setup (None: nothing says how it samples)."""
    meta = {TOOL: f"lightning-tools {__version__} {command}",
            SOURCES: json.dumps([{k: v for k, v in asdict(s).items() if v is not None} for s in sources])}
    if sampling is not None:
        meta |= {STEPS: str(sampling.steps), PREDICTION_TYPE: sampling.prediction_type,
                 FAMILY: sampling.profile.family, PROFILE: sampling.profile.name,
                 SETTINGS: json.dumps(sampling.as_dict())}
    return meta


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


# --- how a file wants to be sampled ----------------------------------------------------------------------------

def settings_from_metadata(metadata: Mapping[str, str]) -> Sampling | None:
    """What our keys say: the settings JSON, else family/profile/steps, else steps alone (files written before
    the families: SDXL-Lightning). None when absent or unreadable, or naming a family this version lacks."""
    try:
        if SETTINGS in metadata:
            return Sampling.from_dict(json.loads(metadata[SETTINGS]))
        if STEPS in metadata:
            data = {"steps": metadata[STEPS], "prediction_type": metadata.get(PREDICTION_TYPE)}
            if FAMILY in metadata:
                data |= {"family": metadata[FAMILY], "profile": metadata.get(PROFILE)}
            return Sampling.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError, UserError):
        return None  # fall back to what the catalogue or the name says
    return None


def identify(path: Path | str, sha256: str | None = None) -> tuple[fams.FamilyFile, str] | None:
    """The catalogued file whose sampling profile this file has, and how that is known: its `sha256` (when given)
    proves it; else its name, when the name identifies one file. A name with another hash is still taken (a
    re-saved or converted copy keeps the name and the way it samples), and said so."""
    if sha256:
        found = fams.by_sha256(sha256)
        if found is not None:
            return found, "sha256"
    named = fams.by_filename(Path(path).name)
    if named is None:
        return None
    return named, "file name, not the published bytes" if sha256 and named.sha256_pinned else "file name"


def settings_for(path: Path | str, metadata: Mapping[str, str], sha256: str | None = None
                 ) -> tuple[Sampling, str] | None:
    """How a file must be sampled, and why: our own metadata keys (what the writer knew), the catalogue (by
    `sha256` when given, else by file name), then a step count in the name (taken as SDXL-Lightning)."""
    found = settings_from_metadata(metadata)
    if found:
        return found, "metadata"
    known = identify(path, sha256)
    if known:
        file, how = known
        return for_file(file), f"catalog ({how}: {fams.family(file.family).title} {file.name})"
    guessed = from_name(path)
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
