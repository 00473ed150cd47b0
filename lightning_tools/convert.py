"""`convert`: one SDXL checkpoint layout into another, streaming (see checkpoint.py), or a LoRA between formats.

The output says what it is and where it came from: ModelSpec keys, our provenance (the source, and the base
when it supplied parts, with their sha256), the Lightning sampler settings when the input's metadata, the
catalogue or its name tells them, and whatever input metadata still applies.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_tools import metadata as meta
from lightning_tools.checkpoint import NAMES, TARGETS, open_checkpoint, with_base, write_checkpoint
from lightning_tools.errors import UserError
from lightning_tools.outputs import check_containment
from lightning_tools.sdxl.detect import detect
from lightning_tools.tensors import HASH_KEY, hash_file

LORA_TARGETS = ("kohya", "peft")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def convert(src: Path | str, to: str, out: Path | str, config_dir: Path | str | None = None,
            base: Path | str | None = None, dtype: str | None = None, strict: bool = False,
            overwrite: bool = False) -> dict:
    """Convert `src` into `out` in format `to`; returns what was written, what came from the base, and the
    keys that were left out (reported, or an error with `strict`)."""
    src, out = Path(src), Path(out)
    check_containment(out, (src, base, config_dir))
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    is_lora = detect(src).layout == "lora"
    if to in LORA_TARGETS:
        if not is_lora:
            raise UserError(f"{src}: is not a LoRA; --to {to} converts LoRA files (models convert --to "
                            f"{' or '.join(TARGETS)})")
        from lightning_tools.lora import convert_lora_file

        return convert_lora_file(src, to, out, overwrite)
    if is_lora:
        raise UserError(f"{src}: is a LoRA; convert it with --to kohya or --to peft, or merge it into a model")
    ckpt = open_checkpoint(src, config_dir, strict)
    filled: list[str] = []
    base_ckpt = None
    if base is not None:
        base_ckpt = open_checkpoint(base, config_dir, strict)
        filled = [c for c in ckpt.missing if c in base_ckpt.components]
        ckpt = with_base(ckpt, base_ckpt)
    sources = [meta.Source("source", src.name, source_sha256(src, ckpt.metadata))]
    if base_ckpt is not None and filled:
        sources.append(meta.Source("base", Path(base).name, source_sha256(Path(base), base_ckpt.metadata)))
    metadata = output_metadata(src, ckpt.metadata, sources, "diffusers" if to == "diffusers" else "sgm")
    result = write_checkpoint(ckpt, out, to, dtype=dtype, metadata=metadata, overwrite=overwrite,
                              config_dir=config_dir)
    result.update(source=str(src), source_layout=ckpt.layout, base=str(base) if base else None,
                  from_base=filled, unknown_keys=ckpt.unknown_keys, dtype=dtype)
    return result


def source_sha256(path: Path, metadata: dict[str, str]) -> str | None:
    """The input's identity for provenance, without hashing a file twice when it is already known.

    The fetch manifest or hub cache gives the whole-file sha256 for free; a file we (or another ModelSpec
    writer) made carries the sha256 of its data; anything else is hashed once. A folder has no one hash.
    """
    if path.is_dir():
        return None
    from lightning_tools.hub import manifest_entry

    recorded = manifest_entry(path)
    if recorded and recorded.get("sha256"):
        return recorded["sha256"]
    claimed = metadata.get(HASH_KEY, "").lower().removeprefix("0x")
    if _HEX64.fullmatch(claimed):
        return claimed
    from lightning_tools.progress import bar

    with bar(path.stat().st_size, desc=f"sha256 {path.name}") as progress:
        return hash_file(path, progress=progress)


def output_metadata(src: Path, metadata: dict[str, str], sources: list[meta.Source],
                    implementation: str = "sgm") -> dict[str, str]:
    """ModelSpec + provenance for the output, keeping the input's own keys (title, description, steps...)."""
    from lightning_tools.catalog import settings_for

    title = metadata.get(meta.TITLE) or src.name.removesuffix(".safetensors")
    out = meta.modelspec(title, implementation=implementation)
    out.update({k: v for k, v in meta.carried_over(metadata).items() if k != meta.IMPLEMENTATION})
    out.pop("format", None)  # a diffusers/transformers file marker, not a property of the model
    found = settings_for(src, metadata, sources[0].sha256)
    settings = found[0] if found else None
    earlier = [meta.Source(**s) for s in meta.read_sources(metadata)]  # a merge's base and LoRAs stay on record
    out.update(meta.lightning_provenance("convert", earlier + sources, settings))
    return out


def describe(result: dict) -> str:
    """A few lines for people."""
    if "source_layout" not in result:  # a LoRA conversion (lora.convert_lora_file)
        return (f"wrote {result.get('out')} ({result.get('to')}, {result.get('modules')} modules) from "
                f"{result.get('source')} ({result.get('from')})")
    size = result["bytes"] / 1e9
    lines = [f"wrote {result['output']} ({result['format']}, {size:.2f} GB) from {result['source']} "
             f"({result['source_layout']})"]
    if result["from_base"]:
        lines.append(f"  from {result['base']}: {', '.join(NAMES[c] for c in result['from_base'])}")
    elif result["base"]:
        lines.append(f"  {result['base']} was not needed: the source has every component")
    return "\n".join(lines)
