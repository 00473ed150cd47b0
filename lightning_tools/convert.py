"""`convert`: one SDXL checkpoint layout into another, streaming (see checkpoint.py), or a LoRA between formats.

The output says what it is and where it came from: ModelSpec keys, our provenance (the source, and the base
when it supplied parts, with their sha256), the Lightning sampler settings when the input's metadata, the
catalogue or its name tells them, and whatever input metadata still applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lightning_tools import dtypes, lora
from lightning_tools import provenance as prov
from lightning_tools.checkpoint import Written, open_checkpoint, with_base, write_checkpoint
from lightning_tools.errors import UsageError, UserError
from lightning_tools.outputs import check_output
from lightning_tools.report import Report
from lightning_tools.sdxl.detect import detect
from lightning_tools.sdxl.vocabulary import LORA_TARGETS, MODEL_TARGETS, component_titles


@dataclass
class ConvertReport(Report):
    """A model converted: what was written, from what, what the base supplied, what was left out."""

    source: Path
    source_layout: str
    written: Written
    base: Path | None = None
    from_base: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)
    dtype: str | None = None

    def describe(self) -> str:
        lines = [f"wrote {self.written.output} ({self.written.layout}, {self.written.bytes / 1e9:.2f} GB) from "
                 f"{self.source} ({self.source_layout})"]
        if self.from_base:
            lines.append(f"  from {self.base}: {component_titles(self.from_base)}")
        elif self.base:
            lines.append(f"  {self.base} was not needed: the source has every component")
        return "\n".join(lines)


@dataclass
class LoraConvertReport(Report):
    """A LoRA rewritten in another format, tensors copied bit for bit."""

    source: Path
    source_format: str
    output: Path
    format: str
    modules: int
    data_sha256: str

    def describe(self) -> str:
        return (f"wrote {self.output} ({self.format}, {self.modules} modules) from {self.source} "
                f"({self.source_format})")


def convert(src: Path | str, to: str, out: Path | str, *, config_dir: Path | str | None = None,
            base: Path | str | None = None, dtype: str | None = None, strict: bool = False,
            overwrite: bool = False) -> ConvertReport | LoraConvertReport:
    """Convert `src` into `out` as `to` (a key of `vocabulary.MODEL_TARGETS` or `LORA_TARGETS`); `dtype`
    (fp16/bf16/fp32) casts floating tensors. Keys no map places are left out and reported, or refused with
    `strict`."""
    src, out = Path(src), Path(out)
    code = dtypes.parse(dtype)
    if to not in MODEL_TARGETS and to not in LORA_TARGETS:
        raise UsageError(f"--to {to}: choose one of {', '.join([*MODEL_TARGETS, *LORA_TARGETS])}")
    check_output(out, (src, base, config_dir), overwrite=overwrite)
    is_lora = detect(src).layout == "lora"
    if to in LORA_TARGETS:
        if not is_lora:
            raise UserError(f"is not a LoRA; --to {to} converts LoRA files (models convert --to "
                            f"{' or '.join(MODEL_TARGETS)})", path=src)
        return convert_lora(src, to, out, overwrite=overwrite)
    if is_lora:
        raise UserError("is a LoRA; convert it with --to kohya or --to peft, or merge it into a model", path=src)
    ckpt = open_checkpoint(src, config_dir, strict)
    filled: list[str] = []
    base_ckpt = None
    if base is not None:
        base_ckpt = open_checkpoint(base, config_dir, strict)
        filled = [c for c in ckpt.missing if c in base_ckpt.components]
        ckpt = with_base(ckpt, base_ckpt)
    sources = [prov.Source.of("source", src, ckpt.metadata)]
    if base_ckpt is not None and filled:
        sources.append(prov.Source.of("base", Path(base), base_ckpt.metadata))
    metadata = prov.output_metadata(src, ckpt.metadata, sources, "convert",
                                    implementation="diffusers" if to == "diffusers" else "sgm")
    written = write_checkpoint(ckpt, out, to, dtype=code, metadata=metadata, overwrite=overwrite,
                               config_dir=config_dir)
    return ConvertReport(src, ckpt.layout, written, Path(base) if base else None, filled, ckpt.unknown_keys, dtype)


def convert_lora(src: Path, to: str, out: Path, *, overwrite: bool = False) -> LoraConvertReport:
    """Rewrite a LoRA in another format (`to`: kohya or peft); tensors are copied bit for bit.

    The output keeps the input's metadata and says where it came from, with the Lightning sampler settings
    when the input is a Lightning LoRA (by our metadata, the catalogue or its name).
    """
    read = lora.read_lora(src)
    if read.unresolved:
        raise UserError(f"{len(read.unresolved)} modules name nothing in SDXL (e.g. {read.unresolved[0]}); is "
                        "this an SDXL LoRA?", path=src)
    metadata = prov.output_metadata(src, read.metadata, [prov.Source.of("source", src, read.metadata)], "convert",
                                    lora=True)
    data_sha = lora.write_lora(read.modules, out, to, metadata, overwrite)
    return LoraConvertReport(src, read.format, out, to, len(read.modules), data_sha)
