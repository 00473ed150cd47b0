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
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_tools import metadata as meta
from lightning_tools.checkpoint import Checkpoint, open_checkpoint, write_checkpoint
from lightning_tools.errors import UserError
from lightning_tools.lora import LoraFile, LoraModule, add_lora, add_lora_bias, modules_of_keys, read_lora
from lightning_tools.tensors import DTYPE_NAMES, ITEM_SIZE, TORCH_DTYPE, LazyTensor, read_tensor, target_dtype

OUTPUTS = ("comfyui", "diffusers")
DEVICES = ("cpu", "cuda")
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


def apply_plan(base: Checkpoint, plan: MergePlan, compute_dtype: torch.dtype = torch.float32,
               device: str = "cpu", dtype: str | None = None) -> Checkpoint:
    """The base with every planned weight replaced by its lazily merged value (untouched tensors as stored).

    A merged weight is computed in `compute_dtype` and rounded once to the output `dtype` (fp16/bf16/fp32;
    None keeps the base's). Weights are computed one ahead of the writer in a worker thread, so the arithmetic
    of the next weight overlaps the writing of this one.
    """
    components = {c: dict(tensors) for c, tensors in base.components.items()}
    order = [(c, k) for c, tensors in components.items() for k in tensors if (c, k) in plan.targets]
    scratch = _Scratch()

    def compute(target: tuple[str, str]) -> torch.Tensor:
        weight = base.components[target[0]][target[1]]
        stored = scratch.read(weight.stored) if weight.stored is not None else weight.load()
        w = scratch.work(weight.shape, compute_dtype, device).copy_(stored)
        add = add_lora_bias if target[1].endswith(".bias") else add_lora
        for module, strength in plan.targets[target]:
            add(w, module, strength)
        return torch.empty(w.shape, dtype=TORCH_DTYPE[target_dtype(weight.dtype, dtype)]).copy_(w)

    ahead = _OneAhead(order, compute)
    for c, key in order:
        weight = components[c][key]
        components[c][key] = LazyTensor(target_dtype(weight.dtype, dtype), weight.shape,
                                        lambda target=(c, key): ahead.get(target))
    return dataclasses.replace(base, components=components)


class _Scratch(threading.local):
    """Per-thread buffers reused from weight to weight: fresh gigabyte-sized allocations would page-fault and
    zero memory for every weight, which costs as much as the arithmetic."""

    def __init__(self):
        self._raw = bytearray()
        self._work: torch.Tensor | None = None

    def read(self, info) -> torch.Tensor:
        if len(self._raw) < info.nbytes:
            self._raw = bytearray(info.nbytes)
        return read_tensor(info, into=self._raw)

    def work(self, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
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

    def get(self, key) -> torch.Tensor:
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
        raise UserError(f"unknown output format {to!r}; choose one of {', '.join(OUTPUTS)}")
    single = to == "comfyui" or (to is None and out.suffix == ".safetensors")
    unet_only = set(base.components) == {"unet"}
    if not single:
        if unet_only:
            raise UserError(f"{out}: a diffusers pipeline folder needs a VAE and text encoders, which {base.path} "
                            "(a UNet) lacks; give an OUT ending in .safetensors for a merged UNet file")
        return "diffusers"
    if unet_only:
        return "diffusers" if base.layout == "unet-diffusers" and to is None else "comfyui-unet"
    return "comfyui"


def merge(base: Path | str, loras: Sequence[Path | str], strengths: Sequence[float], out: Path | str,
          to: str | None = None, dtype: str | None = None, compute_dtype: str = "fp32", device: str = "cpu",
          allow_unmatched: bool = False, dry_run: bool = False, overwrite: bool = False,
          config_dir: Path | str | None = None) -> dict:
    """Merge `loras` (each at its strength; one strength applies to all) into `base`, writing `out`.

    Refuses, before writing anything, when a LoRA module finds no target of the same shape, unless
    `allow_unmatched` (then they are skipped and counted). With `dry_run` only the plan is returned.
    """
    base, out, loras = Path(base), Path(out), [Path(p) for p in loras]
    strengths = _strengths(strengths, len(loras))
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    if compute_dtype not in DTYPE_NAMES:
        raise UserError(f"unknown compute dtype {compute_dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    _check_device(device)
    for path in (base, *loras):
        if out.resolve() == path.resolve():
            raise UserError(f"{out}: is an input of this merge; write to another path")
    if out.exists() and not overwrite and not dry_run:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")

    ckpt = open_checkpoint(base, config_dir)
    targets = {c: modules_of_keys(t, c) for c, t in ckpt.components.items() if c != "vae"}
    files = [read_lora(p, targets, ckpt.configs["unet"]) for p in loras]
    plan = plan_merge(ckpt, files, strengths)
    to_format = output_format(ckpt, out, to)
    report = {
        "base": str(base), "base_layout": ckpt.layout, "output": str(out), "format": to_format, "dtype": dtype,
        "compute_dtype": compute_dtype, "device": device,
        "loras": [{"file": str(f.path), "format": f.format, "strength": s, "modules": len(f.modules) +
                   len(f.unresolved), "matched": counts} for f, s, counts in zip(files, strengths, plan.matched)],
        "tensors_merged": len(plan.targets), "unmatched": len(plan.unmatched),
        "unmatched_modules": plan.unmatched, "unknown_keys": ckpt.unknown_keys,
    }
    if plan.unmatched and not allow_unmatched:
        shown = "; ".join(plan.unmatched[:_SHOWN]) + ("; ..." if len(plan.unmatched) > _SHOWN else "")
        raise UserError(f"{len(plan.unmatched)} LoRA modules find no matching weight in {base} ({shown}); "
                        "is the LoRA for SDXL? --allow-unmatched merges the rest")
    if dry_run:
        report["estimated_bytes"] = _estimated_size(ckpt, dtype)
        return report

    merged = apply_plan(ckpt, plan, TORCH_DTYPE[DTYPE_NAMES[compute_dtype]], device, dtype)
    metadata = _metadata(base, ckpt, files, strengths, out, to_format)
    report["lightning"] = {k: metadata[k] for k in (meta.STEPS, meta.PREDICTION_TYPE) if k in metadata}
    report["written"] = write_checkpoint(merged, out, to_format, dtype=dtype, metadata=metadata,
                                         overwrite=overwrite, config_dir=config_dir)
    return report


def _strengths(strengths: Sequence[float], count: int) -> list[float]:
    strengths = list(strengths) or [1.0]
    if len(strengths) == 1:
        return strengths * count
    if len(strengths) != count:
        raise UserError(f"{len(strengths)} strengths for {count} LoRAs: give one --strength for all, or one per "
                        "--lora in the same order")
    return strengths


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")


def _estimated_size(ckpt: Checkpoint, dtype: str | None) -> int:
    return sum(math.prod(t.shape) * ITEM_SIZE[target_dtype(t.dtype, dtype)]
               for tensors in ckpt.components.values() for t in tensors.values())


def _metadata(base: Path, ckpt: Checkpoint, files: Sequence[LoraFile], strengths: Sequence[float], out: Path,
              to_format: str) -> dict[str, str]:
    """ModelSpec + provenance: the base and every LoRA with sha256 and strength, and the sampler settings of
    the first Lightning LoRA merged at a positive strength."""
    from lightning_tools.catalog import settings_for
    from lightning_tools.convert import source_sha256

    sources = [meta.Source("base", base.name, source_sha256(base, ckpt.metadata))]
    settings = None
    for lora, strength in zip(files, strengths):
        sha = source_sha256(lora.path, lora.metadata)
        sources.append(meta.Source("lora", lora.path.name, sha, strength))
        found = settings_for(lora.path, lora.metadata, sha) if strength > 0 and settings is None else None
        settings = found[0] if found else settings
    title = out.name.removesuffix(".safetensors")
    spec = meta.modelspec(title, implementation="diffusers" if to_format == "diffusers" else "sgm")
    return spec | meta.lightning_provenance("merge", sources, settings)


def describe(report: dict) -> str:
    """A few lines for people: what matched, what was written (or would be, for a dry run)."""
    lines = [f"base {report['base']} ({report['base_layout']})"]
    for lora in report["loras"]:
        matched = ", ".join(f"{c} {n}" for c, n in lora["matched"].items()) or "nothing"
        lines.append(f"  + {lora['file']} ({lora['format']}) at {lora['strength']:g}: {lora['modules']} modules, "
                     f"matched {matched}")
    if report["unmatched"]:
        lines.append(f"  skipped {report['unmatched']} unmatched LoRA modules")
    if report["unknown_keys"]:
        lines.append(f"  left out {len(report['unknown_keys'])} base tensors no SDXL key map places "
                     f"(e.g. {report['unknown_keys'][0]})")
    if "written" in report:
        size = report["written"]["bytes"] / 1e9
        lines.append(f"wrote {report['output']} ({report['written']['format']}, {size:.2f} GB), "
                     f"{report['tensors_merged']} weights merged")
        if report.get("lightning"):
            lines.append(f"  Lightning: {report['lightning'].get(meta.STEPS)} steps "
                         f"({report['lightning'].get(meta.PREDICTION_TYPE)} prediction)")
    else:
        size = report["estimated_bytes"] / 1e9
        lines.append(f"would write {report['output']} ({report['format']}, about {size:.2f} GB), "
                     f"{report['tensors_merged']} weights merged (dry run: nothing written)")
    return "\n".join(lines)
