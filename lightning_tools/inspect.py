"""What is this checkpoint or LoRA, and what should be done with it?

Reads headers only (plus one sha256 pass with `with_hash`): the format and components come from `sdxl.detect`
and `lora`, the identity (which few-step family's published file it is) from the catalogue in `families`, how to
sample it from `provenance.settings_for`, provenance from our metadata keys.
(The module is `lightning_tools.inspect`; inside the package it cannot shadow the standard library's `inspect`.)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, field
from pathlib import Path

from lightning_tools import families as fams
from lightning_tools import loaders, lora
from lightning_tools import provenance as prov
from lightning_tools.errors import UserError
from lightning_tools.report import Report
from lightning_tools.sdxl import detect
from lightning_tools.sdxl.vocabulary import LAYOUTS, LORA_FORMATS, NEXT_STEP, PREFIXES
from lightning_tools.tensors import hash_file
from lightning_tools.verify import lora_modules_not_in_sdxl

# Our provenance keys whose values are JSON: shown decoded.
_JSON_KEYS = (prov.SOURCES, prov.SETTINGS)


@dataclass
class Counts:
    tensors: int
    parameters: int
    dtypes: dict[str, int]


@dataclass
class LoraSummary:
    modules: int
    modules_per_component: dict[str, int]
    variants: dict[str, int]
    ranks: list[int]
    alphas: list[float]
    alpha_missing: int
    text_encoders: list[str]
    loaders: dict[str, dict]  # per loader (diffusers, ComfyUI, Forge, A1111): what it applies of this file
    loaders_summary: str


@dataclass
class InspectReport(Report):
    """Everything `lightning-tools inspect` says about a path."""

    path: Path
    size: int
    kind: str  # "model" | "lora"
    format: str
    format_description: str
    architecture: str
    architecture_description: str
    supported: bool
    components: list[str]
    tensors: int
    parameters: int
    dtypes: dict[str, int]
    next: str
    per_component: dict[str, Counts] = field(default_factory=dict)
    lora: LoraSummary | None = None
    sha256: str | None = None
    identity: dict | None = None
    settings: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def describe(self) -> str:
        """The short block people read: one labelled line per fact, metadata last."""
        rows = [("format", self.format_description), ("architecture", self.architecture_description),
                ("components", ", ".join(self.components) or "none recognised")]
        tensors = f"{self.tensors}, {_count(self.parameters)} parameters, {_dtypes(self.dtypes)}"
        if len(self.per_component) > 1:
            tensors += " (" + ", ".join(f"{c} {_count(p.parameters)}" for c, p in self.per_component.items()) + ")"
        rows.append(("tensors", tensors))
        if self.lora is not None:
            rows.append(("LoRA", _describe_lora(self.lora)))
            rows.append(("loaders", self.lora.loaders_summary))
        rows.append(("identity", _describe_identity(self.identity)))
        if self.sha256:
            rows.append(("sha256", self.sha256))
        settings = self.settings
        rows.append(("settings", f"{settings['summary']} (from {settings['from']})" if settings
                     else "unknown: no profile or step count in the metadata, catalogue or file name"))
        rows.append(("next", self.next))
        rows += _describe_metadata(self.metadata, self.provenance)
        lines = [f"{self.path}  ({_count(self.size, 'B')})"]
        lines += [f"  {label:<13} {value}" for label, value in rows]
        return "\n".join(lines)


def inspect_path(path: Path | str, *, with_hash: bool = False) -> InspectReport:
    """What `path` is, from headers only unless `with_hash`. A LoRA for another architecture is an error that
    says what it probably is."""
    path = Path(path)
    found = detect.detect(path)  # validates the header of a file; one-line errors for bad input
    if found.layout == "lora":
        report = _lora_report(path, found)
        metadata = dict(found.source.metadata)
    else:
        report = _model_report(path, found)
        metadata = _unet_metadata(found)
    report.sha256 = hash_file(path) if with_hash and path.is_file() else None
    report.identity = _identity(path, report.sha256)
    report.settings = _settings(path, metadata, report.sha256)
    report.metadata = metadata
    report.provenance = _provenance(metadata)
    return report


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _unet_metadata(found: detect.Detection) -> dict[str, str]:
    """A diffusers folder keeps its provenance in the UNet's weights file (what our writers do)."""
    if found.layout == "diffusers":
        return dict(found.sources["unet"].metadata) if "unet" in found.sources else {}
    return dict(found.source.metadata)


def _counts(infos: Iterable) -> Counts:
    infos = list(infos)
    return Counts(len(infos), sum(math.prod(i.shape) for i in infos),
                  dict(Counter(i.dtype for i in infos).most_common()))


def _model_report(path: Path, found: detect.Detection) -> InspectReport:
    if found.layout == "diffusers":
        parts = {c: list(source.values()) for c, source in found.sources.items()}
    else:
        source = found.source
        if found.layout == "single-file":
            parts = {c: [i for k, i in source.items() if k.startswith(PREFIXES[c])] for c in found.components}
            if sum(len(v) for v in parts.values()) < len(source):
                parts["other"] = [i for k, i in source.items() if not k.startswith(tuple(PREFIXES.values()))]
        else:
            parts = {"unet" if found.components else "all": list(source.values())}
    per_component = {c: _counts(infos) for c, infos in parts.items()}
    total = _counts(i for infos in parts.values() for i in infos) if len(parts) != 1 \
        else next(iter(per_component.values()))
    supported = found.architecture == "sdxl-base"
    return InspectReport(
        path, _size(path), "model", found.layout, LAYOUTS.get(found.layout, "not a checkpoint or LoRA layout this "
                                                              "tool recognises"),
        found.architecture, found.description + ("" if supported else ": not supported"), supported,
        list(found.components), total.tensors, total.parameters, total.dtypes,
        NEXT_STEP.get(found.layout, "") if supported else "this tool handles SDXL base models only",
        per_component=per_component)


def _lora_report(path: Path, found: detect.Detection) -> InspectReport:
    shapes = {k: tuple(i.shape) for k, i in found.source.items()}
    other = detect.lora_architecture(shapes)
    if other not in ("sdxl-base", "unknown"):
        raise UserError(f"a LoRA for {detect.ARCHITECTURES[other]}, not SDXL (judged by its module names and "
                        "shapes); this tool handles SDXL LoRAs", path=path)
    lora_file = lora.read_lora(path, source=found.source)
    modules = lora_file.modules
    unknown = lora_modules_not_in_sdxl(lora_file)
    if not modules:
        raise UserError(f"a LoRA with no module of SDXL ({len(unknown)} modules name something else, e.g. "
                        f"{unknown[0] if unknown else '?'}); is it for another model?", path=path)
    per_component = Counter(m.component for m in modules)
    supported = not unknown
    coverages = loaders.coverage(lora_file)
    summary = LoraSummary(len(modules), dict(per_component), dict(Counter(m.variant for m in modules)),
                          sorted({m.rank for m in modules if m.rank is not None}),
                          sorted({m.alpha for m in modules if m.alpha is not None}),
                          sum(m.alpha is None for m in modules),
                          [c for c in ("text_encoder", "text_encoder_2") if per_component[c]],
                          {name: c.to_json() for name, c in coverages.items()}, loaders.describe(coverages))
    return InspectReport(
        path, _size(path), "lora", lora_file.format, LORA_FORMATS[lora_file.format],
        "sdxl-base" if supported else "unknown",
        "an SDXL LoRA" if supported else
        f"not an SDXL LoRA: {len(unknown)} modules name nothing in SDXL (e.g. {unknown[0]}): not supported",
        supported, list(per_component), *astuple(_counts(found.source.values())),
        NEXT_STEP["lora"] if supported else "this tool handles SDXL LoRAs only", lora=summary)


def _identity(path: Path, sha256: str | None) -> dict | None:
    """The catalogued file this is: proven by sha256, or suggested by name and size without a hash. A generic
    name (diffusers' default LoRA name) identifies nothing without a hash; the candidates are named instead."""
    named = fams.by_filename(path.name)
    if sha256 is not None:
        proven = fams.by_sha256(sha256)
        if proven is not None:
            return _entry_dict(proven, "sha256")
        if named is not None and named.sha256_pinned:
            return _entry_dict(named, "name only: the sha256 differs, so these are not the published bytes")
        if named is not None:
            return _entry_dict(named, "name (its sha256 is not pinned in the catalogue, so the hash proves nothing; "
                                      "fetch checks it against the hub)")
        return None
    if named is None:
        candidates = fams.files_named(path.name)
        if not candidates:
            return None
        return {"file": path.name, "candidates": [_entry_dict(f, "name only") for f in candidates],
                "matched_by": "nothing: a name every diffusers LoRA has; use --hash to tell whether it is one"}
    size = _size(path)
    if named.size is None:
        return _entry_dict(named, "name (the catalogue has no size for it; use --hash to prove it)"
                           if named.sha256_pinned else "name only (no size or sha256 pinned for it)")
    if size == named.size:
        return _entry_dict(named, "name and size (use --hash to prove it)")
    if not named.size_confirmed:
        return _entry_dict(named, "name (this file's size is not pinned; use --hash to prove it)")
    return _entry_dict(named, f"name only: {size} bytes, the published file has {named.size}")


def _describe_identity(identity: dict | None) -> str:
    if identity is None:
        return "not a catalogued few-step file"
    if "candidates" in identity:
        named = " or ".join(f"{c['title']}'s {c['repo_id']}/{c['file']}" for c in identity["candidates"])
        return f"named like {named}; matched by {identity['matched_by']}"
    return f"{identity['title']} {identity['repo_id']}/{identity['file']}, matched by {identity['matched_by']}"


def _entry_dict(entry: fams.FamilyFile, matched_by: str) -> dict:
    family = fams.family(entry.family)
    return {"family": family.name, "title": family.title, "file": entry.filename, "repo_id": family.repo_id,
            "steps": entry.steps, "kind": entry.kind, "variant": entry.variant, "profile": entry.profile.name,
            "prediction_type": entry.prediction_type, "license": family.license, "matched_by": matched_by}


def _settings(path: Path, metadata: dict[str, str], sha256: str | None) -> dict | None:
    found = prov.settings_for(path, metadata, sha256)
    if found is None:
        return None
    settings, source = found
    return settings.as_dict() | {"from": source, "summary": settings.describe()}


def _provenance(metadata: Mapping[str, str]) -> dict:
    """Our keys, JSON values decoded, so a person (and --json) sees structure instead of escaped strings."""
    out: dict = {}
    for key in (prov.TOOL, prov.FAMILY, prov.PROFILE, prov.STEPS, prov.PREDICTION_TYPE, prov.SETTINGS, prov.SOURCES):
        if key in metadata:
            value = metadata[key]
            if key in _JSON_KEYS:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            out[key] = value
    return out


def _describe_metadata(metadata: Mapping[str, str], provenance: Mapping) -> list[tuple[str, str]]:
    """Provenance first, decoded (sources one per line), then the other keys, long values shortened."""
    lines = []
    for source in provenance.get(prov.SOURCES, []) if isinstance(provenance.get(prov.SOURCES), list) else []:
        extra = "".join(f", {k} {v}" for k, v in source.items() if k not in ("role", "file", "sha256"))
        sha = f" sha256 {source['sha256'][:16]}..." if source.get("sha256") else ""
        lines.append(f"source: {source.get('role', '?')} {source.get('file', '?')}{sha}{extra}")
    for key, value in sorted(metadata.items()):
        if key == prov.SOURCES and lines:
            continue
        shown = provenance.get(key, value)
        lines.append(f"{key}: {_short(shown if isinstance(shown, str) else json.dumps(shown))}")
    return [("metadata" if i == 0 else "", line) for i, line in enumerate(lines)] or [("metadata", "none")]


def _dtypes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{d} x{n}" for d, n in counts.items()) if len(counts) > 1 else "".join(counts)


def _describe_lora(summary: LoraSummary) -> str:
    per = ", ".join(f"{c} {n}" for c, n in summary.modules_per_component.items())
    alphas = "/".join(f"{a:g}" for a in summary.alphas) or "none"
    if summary.alpha_missing:
        alphas += f" ({summary.alpha_missing} modules without alpha: alpha = rank)"
    text = ", ".join(summary.text_encoders) or "none (UNet only)"
    kinds = "" if set(summary.variants) <= {"LoRA"} else \
        " [" + ", ".join(f"{v} {n}" for v, n in summary.variants.items()) + "]"
    return (f"{summary.modules} modules ({per}){kinds}; rank {'/'.join(map(str, summary.ranks)) or 'n/a'}; "
            f"alpha {alphas}; text encoders: {text}")


def _count(n: int, unit: str = "") -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {suffix}{unit}"
    return f"{n} {unit}".rstrip()


def _short(value: str, width: int = 100) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."
