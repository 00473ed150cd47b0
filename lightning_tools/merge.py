"""`merge`: bake one or more LoRAs into an SDXL base, streaming.

The base opens as a lazy `Checkpoint` in diffusers naming whatever its layout; every weight (and bias) a LoRA
adapts is replaced by a lazy tensor that, when the writer asks for it, merges the LoRA modules into it one after
another (`lora.add_lora`: W + s_i * (alpha_i / rank_i) * delta_i, DoRA rescaled) in the compute dtype. The
writer rounds it once to the output dtype. Every other tensor keeps its stored bytes and is copied without
decoding. Merging happens in diffusers space before any key map, so OpenCLIP's fused in_proj in a single-file
output is built from already merged q/k/v.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_tools import dtypes
from lightning_tools import provenance as prov
from lightning_tools.checkpoint import Checkpoint, Written, open_checkpoint, write_checkpoint
from lightning_tools.device import parse_device
from lightning_tools.errors import UsageError, UserError
from lightning_tools.lora import LoraFile, LoraModule, add_lora, add_lora_bias, modules_of_keys, read_lora
from lightning_tools.report import Report
from lightning_tools.stream import LazyTensor
from lightning_tools.tensors import read_tensor

if TYPE_CHECKING:
    import torch

OUTPUTS = ("comfyui", "diffusers")
_SHOWN = 10  # unmatched modules named in an error message


@dataclass
class MergePlan:
    """Which base weight each LoRA module adds to, and what found no target."""

    targets: dict[tuple[str, str], list[tuple[LoraModule, float]]] = field(default_factory=dict)
    matched: list[dict[str, int]] = field(default_factory=list)  # per LoRA: component -> modules
    unmatched: list[str] = field(default_factory=list)  # "file: module: why"


def plan_merge(base: Checkpoint, loras: Sequence[LoraFile], strengths: Sequence[float]) -> MergePlan:
    """Match every LoRA module to a base weight of the same shape; collect the ones that find none."""
    plan = MergePlan()
    for lora, strength in zip(loras, strengths):
        counts: dict[str, int] = {}
        plan.unmatched += [f"{lora.path.name}: {name}: no such module in SDXL" for name in lora.unresolved]
        for m in lora.modules:
            why = _mismatch(base, m)
            if why:
                plan.unmatched.append(f"{lora.path.name}: {m.name}: {why}")
                continue
            plan.targets.setdefault((m.component, m.module + ".weight"), []).append((m, strength))
            if m.bias is not None:
                plan.targets.setdefault((m.component, m.module + ".bias"), []).append((m, strength))
            counts[m.component] = counts.get(m.component, 0) + 1
        plan.matched.append(counts)
    return plan


def _mismatch(base: Checkpoint, m: LoraModule) -> str | None:
    tensors = base.components.get(m.component)
    if tensors is None:
        return f"the base has no {m.component}"
    weight = tensors.get(m.module + ".weight")
    if weight is None:
        return f"the base's {m.component} has no module {m.module}"
    if not _fits(m.delta_shape, weight.shape):
        return f"LoRA shape {list(m.delta_shape)} does not fit the base weight {list(weight.shape)}"
    if m.bias is not None and getattr(tensors.get(m.module + ".bias"), "shape", None) != m.bias.shape:
        return f"the LoRA's bias {list(m.bias.shape)} finds no bias of that shape in the base's {m.module}"
    return None


def _fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Same shape, the same up to trailing 1s (a linear LoRA on a 1x1 conv and back), or a conv's weight
    flattened to (out, in * kh * kw), as LyCORIS stores LoHa and LoKr factors of a conv."""
    def strip(shape):
        shape = list(shape)
        while len(shape) > 2 and shape[-1] == 1:
            shape.pop()
        return shape

    flattened = len(delta) == 2 and len(weight) > 2 and tuple(delta) == (weight[0], math.prod(weight[1:]))
    return tuple(delta) == tuple(weight) or strip(delta) == strip(weight) or flattened


def apply_plan(base: Checkpoint, plan: MergePlan, compute_dtype: "torch.dtype | None" = None,
               device: "torch.device | str" = "cpu", dtype: str | None = None) -> Checkpoint:
    """The base with every planned weight replaced by its lazily merged value (untouched tensors as stored).

    A merged weight is computed in `compute_dtype` (default fp32) and rounded once to the output `dtype` (fp16/bf16/fp32;
    None keeps the base's; a safetensors code). Weights are computed one ahead of the writer in a worker thread, so the arithmetic
    of the next weight overlaps the writing of this one.
    """
    import torch

    compute_dtype = compute_dtype or torch.float32
    components = {c: dict(tensors) for c, tensors in base.components.items()}
    order = [(c, k) for c, tensors in components.items() for k in tensors if (c, k) in plan.targets]
    scratch = _Scratch()

    def compute(target: tuple[str, str]) -> "torch.Tensor":
        import torch

        weight = base.components[target[0]][target[1]]
        stored = scratch.read(weight.stored) if weight.stored is not None else weight.load()
        w = scratch.work(weight.shape, compute_dtype, device).copy_(stored)
        add = add_lora_bias if target[1].endswith(".bias") else add_lora
        for module, strength in plan.targets[target]:
            add(w, module, strength)
        return torch.empty(w.shape, dtype=dtypes.torch_dtype(dtypes.target(weight.dtype, dtype))).copy_(w)

    ahead = _OneAhead(order, compute)
    for c, key in order:
        weight = components[c][key]
        components[c][key] = LazyTensor(dtypes.target(weight.dtype, dtype), weight.shape,
                                        lambda target=(c, key): ahead.get(target))
    return dataclasses.replace(base, components=components)


class _Scratch(threading.local):
    """Per-thread buffers reused from weight to weight: fresh gigabyte-sized allocations would page-fault and
    zero memory for every weight, which costs as much as the arithmetic."""

    def __init__(self):
        self._raw = bytearray()
        self._work: torch.Tensor | None = None

    def read(self, info) -> "torch.Tensor":
        if len(self._raw) < info.nbytes:
            self._raw = bytearray(info.nbytes)
        return read_tensor(info, into=self._raw)

    def work(self, shape: tuple[int, ...], dtype: "torch.dtype", device) -> "torch.Tensor":
        import torch

        n = math.prod(shape)
        if self._work is None or self._work.numel() < n or self._work.dtype != dtype:
            self._work = torch.empty(n, dtype=dtype, device=device)
        return self._work[:n].view(shape)


class _OneAhead:
    """Returns compute(key) for keys asked in `order`, starting the next key's computation in a worker thread
    as each result is handed out. Keys asked out of order are computed on the spot (only the overlap is lost)."""

    def __init__(self, order: list, compute):
        self._next = {key: following for key, following in zip(order, order[1:])}
        self._compute = compute
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-ahead")
        self._pending: tuple[object, Future] | None = None

    def get(self, key) -> "torch.Tensor":
        pending, self._pending = self._pending, None
        value = pending[1].result() if pending and pending[0] == key else self._compute(key)
        following = self._next.get(key)
        if following is not None:
            self._pending = (following, self._pool.submit(self._compute, following))
        return value


def output_format(base: Checkpoint, out: Path, to: str | None) -> str:
    """checkpoint.write_checkpoint's `to`: from --to, else from OUT (`*.safetensors` is one file); a UNet-only
    base gives a UNet-only file."""
    if to is not None and to not in OUTPUTS:
        raise UsageError(f"--to {to}: choose one of {', '.join(OUTPUTS)}")
    single = to == "comfyui" or (to is None and out.suffix == ".safetensors")
    unet_only = set(base.components) == {"unet"}
    if not single:
        if unet_only:
            raise UserError(f"a diffusers pipeline folder needs a VAE and text encoders, which {base.path} (a UNet) "
                            "lacks; give an OUT ending in .safetensors for a merged UNet file", path=out)
        return "diffusers"
    if unet_only:
        return "diffusers" if base.layout == "unet-diffusers" and to is None else "comfyui-unet"
    return "comfyui"


@dataclass
class LoraMatch:
    """One LoRA of a merge: its file, format, strength, module count and how many matched, per component."""

    file: Path
    format: str
    strength: float
    modules: int
    matched: dict[str, int]


@dataclass
class MergeReport(Report):
    """What a merge matched and wrote (or, for a dry run, would write)."""

    base: Path
    base_layout: str
    output: Path
    target: str
    dtype: str | None
    compute_dtype: str
    device: str
    loras: list[LoraMatch]
    tensors_merged: int
    unmatched_modules: list[str]
    unknown_keys: list[str]
    estimated_bytes: int
    lightning: dict[str, str] = field(default_factory=dict)
    written: Written | None = None

    def describe(self) -> str:
        """A few lines for people: what matched, what was written (or would be, for a dry run)."""
        lines = [f"base {self.base} ({self.base_layout})"]
        for lora in self.loras:
            matched = ", ".join(f"{c} {n}" for c, n in lora.matched.items()) or "nothing"
            lines.append(f"  + {lora.file} ({lora.format}) at {lora.strength:g}: {lora.modules} modules, "
                         f"matched {matched}")
        if self.unmatched_modules:
            lines.append(f"  skipped {len(self.unmatched_modules)} unmatched LoRA modules "
                         f"(e.g. {self.unmatched_modules[0]})")
        if self.unknown_keys:
            lines.append(f"  left out {len(self.unknown_keys)} base tensors no SDXL key map places "
                         f"(e.g. {self.unknown_keys[0]})")
        if self.written is not None:
            lines.append(f"wrote {self.output} ({self.written.layout}, {self.written.bytes / 1e9:.2f} GB), "
                         f"{self.tensors_merged} weights merged")
            if self.lightning:
                lines.append(f"  Lightning: {self.lightning.get(prov.STEPS)} steps "
                             f"({self.lightning.get(prov.PREDICTION_TYPE)} prediction)")
        else:
            lines.append(f"would write {self.output} ({self.target}, about {self.estimated_bytes / 1e9:.2f} GB), "
                         f"{self.tensors_merged} weights merged (dry run: nothing written)")
        return "\n".join(lines)


def merge(base: Path | str, loras: Sequence[Path | str], out: Path | str, *, strengths: Sequence[float] = (),
          to: str | None = None, dtype: str | None = None, compute_dtype: str = "fp32", device: str = "cpu",
          allow_unmatched: bool = False, dry_run: bool = False, overwrite: bool = False,
          config_dir: Path | str | None = None) -> MergeReport:
    """Merge `loras` (each at its strength; one strength applies to all) into `base`, writing `out`.

    Refuses, before writing anything, when a LoRA module finds no target of the same shape, unless
    `allow_unmatched` (then they are skipped and reported, as long as something matched). With `dry_run` only
    the plan is returned. `dtype`/`compute_dtype`: fp16, bf16 or fp32.
    """
    base, out, loras = Path(base), Path(out), [Path(p) for p in loras]
    strengths = _strengths(strengths, len(loras))
    code = dtypes.parse(dtype)
    compute = dtypes.parse(compute_dtype, "--compute-dtype")
    dev = parse_device(device)
    for path in (base, *loras):
        if out.resolve() == path.resolve():
            raise UserError("is an input of this merge; write to another path", path=out)
    if out.exists() and not overwrite and not dry_run:
        raise UserError("already exists; pass --overwrite to replace it", path=out)

    ckpt = open_checkpoint(base, config_dir)
    targets = {c: modules_of_keys(t, c) for c, t in ckpt.components.items() if c != "vae"}
    files = [read_lora(p, targets, ckpt.configs["unet"]) for p in loras]
    plan = plan_merge(ckpt, files, strengths)
    to_format = output_format(ckpt, out, to)
    report = MergeReport(
        base, ckpt.layout, out, to_format, dtype, compute_dtype, device,
        [LoraMatch(f.path, f.format, s, len(f.modules) + len(f.unresolved), counts)
         for f, s, counts in zip(files, strengths, plan.matched)],
        len(plan.targets), plan.unmatched, ckpt.unknown_keys, _estimated_size(ckpt, code))
    if plan.unmatched and not allow_unmatched:
        shown = "; ".join(plan.unmatched[:_SHOWN]) + ("; ..." if len(plan.unmatched) > _SHOWN else "")
        raise UserError(f"{len(plan.unmatched)} LoRA modules find no matching weight in {base} ({shown}); "
                        "is the LoRA for SDXL? --allow-unmatched merges the rest")
    if not plan.targets:
        raise UserError(f"no LoRA module matches a weight of {base}: the output would be a plain copy of the base; "
                        "is the LoRA for SDXL?")
    if dry_run:
        return report

    merged = apply_plan(ckpt, plan, dtypes.torch_dtype(compute), dev, code)
    metadata = _metadata(base, ckpt, files, strengths, out, to_format)
    report.lightning = {k: metadata[k] for k in (prov.STEPS, prov.PREDICTION_TYPE) if k in metadata}
    report.written = write_checkpoint(merged, out, to_format, dtype=code, metadata=metadata, overwrite=overwrite,
                                      config_dir=config_dir)
    return report


def _strengths(strengths: Sequence[float], count: int) -> list[float]:
    strengths = list(strengths) or [1.0]
    if len(strengths) == 1:
        return strengths * count
    if len(strengths) != count:
        raise UsageError(f"{len(strengths)} strengths for {count} LoRAs: give one --strength for all, or one per "
                         "--lora in the same order")
    return strengths


def _estimated_size(ckpt: Checkpoint, dtype: str | None) -> int:
    return sum(math.prod(t.shape) * dtypes.ITEM_SIZE[dtypes.target(t.dtype, dtype)]
               for tensors in ckpt.components.values() for t in tensors.values())


def _metadata(base: Path, ckpt: Checkpoint, files: Sequence[LoraFile], strengths: Sequence[float], out: Path,
              to_format: str) -> dict[str, str]:
    """ModelSpec + provenance: the base and every LoRA with sha256 and strength, and the sampler settings of
    the first Lightning LoRA merged at a positive strength."""
    sources = [prov.Source.of("base", base, ckpt.metadata)]
    settings = None
    for lora, strength in zip(files, strengths):
        source = prov.Source.of("lora", lora.path, lora.metadata, strength)
        sources.append(source)
        sha = source.sha256 if source.sha256_of == "file" else None
        found = prov.settings_for(lora.path, lora.metadata, sha) if strength > 0 and settings is None else None
        settings = found[0] if found else settings
    title = out.name.removesuffix(".safetensors")
    spec = prov.modelspec(title, implementation="diffusers" if to_format == "diffusers" else "sgm")
    return spec | prov.lightning_provenance("merge", sources, settings)
