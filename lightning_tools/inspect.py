"""What is this checkpoint or LoRA, and what should be done with it?

Reads headers only (plus one sha256 pass with `with_hash`): the format and components come from `sdxl.detect`
and `lora`, the Lightning identity and sampler settings from `catalog`, provenance from our metadata keys.
(The module is `lightning_tools.inspect`; inside the package it cannot shadow the standard library's `inspect`.)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from lightning_tools import catalog, lora
from lightning_tools import metadata as meta
from lightning_tools.progress import bar
from lightning_tools.sdxl import detect
from lightning_tools.sdxl import keys as K
from lightning_tools.tensors import SafetensorsFile, TensorInfo, TensorSource, hash_file
from lightning_tools.verify import lora_modules_not_in_sdxl

FORMATS = {
    "diffusers": "diffusers folder",
    "single-file": "single-file all-in-one checkpoint (ComfyUI / A1111 layout)",
    "unet-diffusers": "UNet only, diffusers names",
    "unet-single-file": "UNet only, single-file names (ComfyUI / A1111 layout)",
    "kohya-diffusers": "LoRA, kohya keys with diffusers module names (the official Lightning LoRA format)",
    "kohya-single-file": "LoRA, kohya keys with single-file module names",
    "peft": "LoRA, peft / diffusers keys",
    "unknown": "not a checkpoint or LoRA layout this tool recognises",
}
# What to do next, per format (sampler settings are reported separately).
NEXT = {
    "diffusers": "load it with StableDiffusionXLPipeline.from_pretrained; `lightning-tools convert --to comfyui` "
                 "makes a ComfyUI/A1111 file",
    "single-file": "put it in ComfyUI models/checkpoints; `lightning-tools convert --to diffusers` makes a "
                   "diffusers folder",
    "unet-diffusers": "a UNet alone: it needs an SDXL base's VAE and text encoders (`render --base`, "
                      "`convert --base`)",
    "unet-single-file": "a UNet alone (ComfyUI models/unet): it needs an SDXL base's VAE and text encoders "
                        "(`render --base`, `convert --base`)",
    "lora": "apply it to an SDXL base (`lightning-tools merge`, or diffusers load_lora_weights + fuse_lora)",
}
# Our provenance keys whose values are JSON: shown decoded.
_JSON_KEYS = (meta.SOURCES, meta.SETTINGS)


def inspect_path(path: Path | str, with_hash: bool = False) -> dict:
    """Everything `lightning-tools inspect` reports, as a JSON-ready dict. Headers only unless `with_hash`."""
    path = Path(path)
    found = detect.detect(path)  # validates the header of a file; one-line errors for bad input
    info = _lora_info(path) if found.layout == "lora" else _model_info(path, found)
    metadata = dict(SafetensorsFile(path).metadata) if path.is_file() else _unet_metadata(path, found)
    sha256 = None
    if with_hash and path.is_file():
        with bar(path.stat().st_size, desc=f"sha256 {path.name}") as progress:
            sha256 = hash_file(path, progress=progress)
    info.update(path=str(path), size=_size(path), sha256=sha256, identity=_identity(path, sha256),
                settings=_settings(path, metadata, sha256), metadata=metadata, provenance=_provenance(metadata))
    return info


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _unet_metadata(folder: Path, found: detect.Detection) -> dict[str, str]:
    """A diffusers folder keeps its provenance in the UNet's weights file (what our writers do)."""
    unet = folder / "unet" if found.layout == "diffusers" else folder
    return dict(TensorSource.open(unet).metadata) if "unet" in found.components else {}


def _summary(infos: Iterable[TensorInfo]) -> dict:
    infos = list(infos)
    return {"tensors": len(infos), "parameters": sum(i.numel for i in infos),
            "dtypes": dict(Counter(i.dtype for i in infos).most_common())}


def _model_info(path: Path, found: detect.Detection) -> dict:
    if found.layout == "diffusers":
        parts = {c: TensorSource.open(path / c).values() for c in found.components}
    else:
        source = TensorSource.open(path)
        if found.layout == "single-file":
            parts = {c: [i for k, i in source.items() if k.startswith(K.PREFIXES[c])] for c in found.components}
            placed = sum(len(v) for v in parts.values())
            if placed < len(source):
                parts["other"] = [i for k, i in source.items() if not k.startswith(tuple(K.PREFIXES.values()))]
        else:
            parts = {"unet" if found.components else "all": source.values()}
    per_component = {c: _summary(infos) for c, infos in parts.items()}
    total = _summary(i for infos in parts.values() for i in infos) if len(parts) != 1 \
        else next(iter(per_component.values()))
    supported = found.architecture == "sdxl-base"
    return {"kind": "model", "format": found.layout, "format_description": FORMATS[found.layout],
            "architecture": found.architecture,
            "architecture_description": found.description + ("" if supported else ": not supported"),
            "supported": supported, "components": list(found.components), "per_component": per_component,
            **total, "next": NEXT.get(found.layout) if supported else "this tool handles SDXL base models only"}


def _lora_info(path: Path) -> dict:
    lora_file = lora.read_lora(path)
    modules = lora_file.modules
    per_component = Counter(m.component for m in modules)
    unknown = lora_modules_not_in_sdxl(lora_file)
    supported = not unknown
    return {"kind": "lora", "format": lora_file.format, "format_description": FORMATS[lora_file.format],
            "architecture": "sdxl-base" if supported else "unknown",
            "architecture_description": "an SDXL LoRA" if supported else
            f"not an SDXL LoRA: {len(unknown)} modules name nothing in SDXL (e.g. {unknown[0]}): not supported",
            "supported": supported, "components": list(per_component),
            "lora": {"modules": len(modules), "modules_per_component": dict(per_component),
                     "ranks": sorted({m.rank for m in modules if m.rank is not None}),
                     "alphas": sorted({m.alpha for m in modules if m.alpha is not None}),
                     "alpha_missing": sum(m.alpha is None for m in modules),
                     "text_encoders": [c for c in ("text_encoder", "text_encoder_2") if per_component[c]]},
            **_summary(SafetensorsFile(path).values()),
            "next": NEXT["lora"] if supported else "this tool handles SDXL LoRAs only"}


def _identity(path: Path, sha256: str | None) -> dict | None:
    """The catalogue entry this is: proven by sha256, or suggested by name and size without a hash."""
    if sha256 is not None:
        entry = catalog.by_sha256(sha256)
        if entry is not None:
            return _entry_dict(entry, "sha256")
        named = catalog.by_filename(path.name)
        if named is not None:
            return _entry_dict(named, "name only: the sha256 differs, so these are not the official bytes")
        return None
    entry = catalog.by_filename(path.name)
    if entry is None:
        return None
    size = _size(path)
    if size == entry.size:
        return _entry_dict(entry, "name and size (use --hash to prove it)")
    if not entry.size_confirmed:
        return _entry_dict(entry, "name (this file's size is not pinned; use --hash to prove it)")
    return _entry_dict(entry, f"name only: {size} bytes, the official file has {entry.size}")


def _entry_dict(entry: catalog.CatalogEntry, matched_by: str) -> dict:
    return {"file": entry.filename, "repo_id": catalog.REPO_ID, "steps": entry.steps, "kind": entry.kind,
            "prediction_type": entry.prediction_type, "matched_by": matched_by}


def _settings(path: Path, metadata: dict[str, str], sha256: str | None) -> dict | None:
    found = catalog.settings_for(path, metadata, sha256)
    if found is None:
        return None
    settings, source = found
    return settings.as_dict() | {"from": source, "summary": settings.describe()}


def _provenance(metadata: Mapping[str, str]) -> dict:
    """Our keys, JSON values decoded, so a person (and --json) sees structure instead of escaped strings."""
    out: dict = {}
    for key in (meta.TOOL, meta.STEPS, meta.PREDICTION_TYPE, meta.SETTINGS, meta.SOURCES):
        if key in metadata:
            value = metadata[key]
            if key in _JSON_KEYS:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            out[key] = value
    return out


def describe(info: dict) -> str:
    """The short block people read: one labelled line per fact, metadata last."""
    rows = [("format", info["format_description"]), ("architecture", info["architecture_description"]),
            ("components", ", ".join(info["components"]) or "none recognised")]
    tensors = f"{info['tensors']}, {_count(info['parameters'])} parameters, {_dtypes(info['dtypes'])}"
    if len(info.get("per_component", {})) > 1:
        tensors += " (" + ", ".join(f"{c} {_count(p['parameters'])}" for c, p in info["per_component"].items()) + ")"
    rows.append(("tensors", tensors))
    if "lora" in info:
        rows.append(("LoRA", _describe_lora(info["lora"])))
    identity = info["identity"]
    rows.append(("identity", f"{identity['repo_id']}/{identity['file']}, matched by {identity['matched_by']}"
                 if identity else "not an official SDXL-Lightning file"))
    if info["sha256"]:
        rows.append(("sha256", info["sha256"]))
    settings = info["settings"]
    rows.append(("settings", f"{settings['summary']} (from {settings['from']})" if settings
                 else "unknown: no step count in the metadata, catalogue or file name"))
    rows.append(("next", info["next"]))
    rows += _describe_metadata(info["metadata"], info["provenance"])
    lines = [f"{info['path']}  ({_count(info['size'], 'B')})"]
    lines += [f"  {label:<13} {value}" for label, value in rows]
    return "\n".join(lines)


def _describe_metadata(metadata: Mapping[str, str], provenance: Mapping) -> list[tuple[str, str]]:
    """Provenance first, decoded (sources one per line), then the other keys, long values shortened."""
    lines = []
    for source in provenance.get(meta.SOURCES, []) if isinstance(provenance.get(meta.SOURCES), list) else []:
        extra = "".join(f", {k} {v}" for k, v in source.items() if k not in ("role", "file", "sha256"))
        sha = f" sha256 {source['sha256'][:16]}..." if source.get("sha256") else ""
        lines.append(f"source: {source.get('role', '?')} {source.get('file', '?')}{sha}{extra}")
    for key, value in sorted(metadata.items()):
        if key == meta.SOURCES and lines:
            continue
        shown = provenance.get(key, value)
        lines.append(f"{key}: {_short(shown if isinstance(shown, str) else json.dumps(shown))}")
    return [("metadata" if i == 0 else "", line) for i, line in enumerate(lines)] or [("metadata", "none")]


def _dtypes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{d} x{n}" for d, n in counts.items()) if len(counts) > 1 else "".join(counts)


def _describe_lora(summary: dict) -> str:
    per = ", ".join(f"{c} {n}" for c, n in summary["modules_per_component"].items())
    alphas = "/".join(f"{a:g}" for a in summary["alphas"]) or "none"
    if summary["alpha_missing"]:
        alphas += f" ({summary['alpha_missing']} modules without alpha: alpha = rank)"
    text = ", ".join(summary["text_encoders"]) or "none (UNet only)"
    return (f"{summary['modules']} modules ({per}); rank {'/'.join(map(str, summary['ranks']))}; alpha {alphas}; "
            f"text encoders: {text}")


def _count(n: int, unit: str = "") -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {suffix}{unit}"
    return f"{n} {unit}".rstrip()


def _short(value: str, width: int = 100) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."
