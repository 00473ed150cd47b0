"""`extract`: a LoRA of any rank from the difference between a tuned UNet (a full SDXL-Lightning UNet) and its
base.

Per target module the delta W_tuned - W_base (fp32) is cut to its best rank-r approximation by a truncated SVD
(`lowrank`) and written as up/down factors in the official Lightning LoRA layout, so every loader of the official
files loads ours. The targets are the official Lightning LoRA's modules (`lora.lightning_targets`: 788 on SDXL);
3x3 convs are flattened to (out, in*3*3), like the official files (down k x k, up 1 x 1).

One pass through the stream: each module's factors are computed when the file sink asks for them, one module
in memory at a time, and the error report, known only at the end, goes into header room reserved up front.
A module whose change is at most `--min-diff` is left out of the file when its turn comes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lightning_tools import dtypes, lora
from lightning_tools import provenance as meta
from lightning_tools.checkpoint import Checkpoint, open_checkpoint
from lightning_tools.device import parse_device
from lightning_tools.errors import UsageError, UserError
from lightning_tools.lowrank import (ModuleReport, by_kind, factor_shapes, factorize, kind_lines, overall, rank_for,
                                     report_json, report_room, seeded)
from lightning_tools.outputs import check_output
from lightning_tools.report import Report
from lightning_tools.sdxl.vocabulary import LORA_TARGETS
from lightning_tools.stream import LazyTensor, write_file

@dataclass(frozen=True)
class Target:
    module: str
    shape: tuple[int, ...]
    rank: int  # the requested rank, clamped to the module's size


@dataclass
class ExtractReport(Report):
    """What `extract` wrote and how much of the change it keeps, overall, by module kind and per module."""

    base: Path
    tuned: Path
    out: Path
    format: str
    rank: int
    conv_rank: int
    dtype: str
    min_diff: float
    clamp_quantile: float | None
    modules: int
    skipped: int
    clamped_ranks: int
    svd: dict[str, int]
    error: float
    energy: float
    worst: dict | None
    by_kind: dict[str, dict]
    untargeted: dict
    settings: dict | None
    sha256: str
    bytes: int
    seconds: float
    per_module: list[ModuleReport]

    def describe(self) -> str:
        """A few lines for people: what was written, how much of the change it keeps, where it loses most."""
        ranks = f"rank {self.rank}" + (f", 3x3 convs {self.conv_rank}" if self.conv_rank != self.rank else "")
        lines = [f"wrote {self.out} ({self.format}, {ranks}, {self.dtype}, {self.bytes / 1e6:.1f} MB) in "
                 f"{self.seconds:.0f} s",
                 f"  {self.modules} modules: relative error {self.error:.4f}, energy kept {100 * self.energy:.2f}% "
                 "(over all targeted weights)"]
        if self.worst:
            lines.append(f"  worst module: {self.worst['module']} (error {self.worst['error']:.4f})")
        if self.skipped:
            lines.append(f"  skipped {self.skipped} modules whose change is at most --min-diff {self.min_diff:g}")
        if self.clamped_ranks:
            lines.append(f"  {self.clamped_ranks} modules are smaller than the rank: they got their full rank")
        if self.untargeted["changed_tensors"]:
            lines.append(f"  not in the LoRA: {self.untargeted['changed_tensors']} changed tensors outside the "
                         f"targets (biases, norms, embeddings), {100 * self.untargeted['share_of_change']:.2f}% of "
                         "the total change")
        if self.settings:
            lines.append(f"  sample it like the tuned model: {self.settings['steps']} steps, "
                         f"{self.settings['prediction_type']} prediction")
        return "\n".join(lines + kind_lines(self.by_kind))


def plan_targets(base: Checkpoint, tuned: Checkpoint, rank: int, conv_rank: int) -> list[Target]:
    """The modules to extract with their ranks, after checking that both UNets have the same weights and shapes."""
    base_unet, tuned_unet = base.components["unet"], tuned.components["unet"]
    missing = [k for k in base_unet if k not in tuned_unet]
    extra = [k for k in tuned_unet if k not in base_unet]
    if missing or extra:
        key, where = (missing[0], "lacks") if missing else (extra[0], "has an extra")
        raise UserError(f"{tuned.path}: its UNet {where} weight {key} compared with {base.path} "
                        f"({len(missing)} missing, {len(extra)} extra); base and tuned must be the same architecture")
    for key, t in base_unet.items():
        if tuned_unet[key].shape != t.shape:
            raise UserError(f"{tuned.path}: {key} is {list(tuned_unet[key].shape)} but {list(t.shape)} in "
                            f"{base.path}; base and tuned must be the same architecture and size")
    targets = []
    for module in lora.lightning_targets(base.configs["unet"]):
        shape = base_unet[module + ".weight"].shape
        wanted = rank_for(shape, rank, conv_rank)
        targets.append(Target(module, shape, min(wanted, shape[0], math.prod(shape[1:]))))
    return targets


class _Factors:
    """Each module's factors, computed when the file sink first asks for one of its tensors and kept until the
    next module's are asked for; `reports` grows in file order as modules are done."""

    def __init__(self, base: Mapping[str, LazyTensor], tuned: Mapping[str, LazyTensor], device: torch.device,
                 min_diff: float, clamp_quantile: float | None, dtype: torch.dtype):
        self.base, self.tuned, self.device = base, tuned, device
        self.min_diff, self.clamp_quantile, self.dtype = min_diff, clamp_quantile, dtype
        self.reports: list[ModuleReport] = []
        self.skipped: set[str] = set()
        self._current: tuple[str, torch.Tensor | None, torch.Tensor | None] = ("", None, None)

    def get(self, target: Target) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) of the target's module, or None when it is left out (--min-diff)."""
        if self._current[0] != target.module:
            self._current = (target.module, *self._compute(target))
        _, up, down = self._current
        return None if up is None else (up, down)

    def _compute(self, t: Target) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        key = t.module + ".weight"
        delta = self.tuned[key].load().to(self.device, torch.float32)
        delta -= self.base[key].load().to(self.device, torch.float32)
        if float(delta.abs().max()) <= self.min_diff:
            norm = float(delta.norm())
            self.reports.append(ModuleReport(t.module, t.shape, 0, norm, 1.0 if norm else 0.0, 0.0, "skipped"))
            self.skipped.add(t.module)
            return None, None
        up, down, report = factorize(delta, t.rank, self.clamp_quantile, self.dtype)
        self.reports.append(replace(report, module=t.module))
        return up, down


def _lazy_modules(targets: list[Target], factors: _Factors, code: str) -> list[lora.LoraModule]:
    """The LoRA modules to write, their factors computed on demand."""
    def part(t: Target, index: int):
        return lambda: None if (pair := factors.get(t)) is None else pair[index]

    modules = []
    for t in targets:
        down_shape, up_shape = factor_shapes(t.shape, t.rank)
        low_rank = lora.LowRank(LazyTensor(code, down_shape, part(t, 1)), LazyTensor(code, up_shape, part(t, 0)))
        modules.append(lora.LoraModule("unet", t.module, low_rank, float(t.rank)))
    return modules


def _left_out_when_skipped(tensors: dict[str, LazyTensor], modules: list[lora.LoraModule],
                           factors: _Factors) -> dict[str, LazyTensor]:
    """Every tensor of a module (its alpha too) comes out None when the module is left out."""
    targets = {m.module: Target(m.module, m.delta_shape, m.rank) for m in modules}
    owner = {}
    for m in modules:
        for key in lora.lora_tensors([m], "kohya") | lora.lora_tensors([m], "peft"):
            owner[key] = targets[m.module]

    def load(key: str, tensor: LazyTensor):
        return lambda: None if factors.get(owner[key]) is None else tensor.load()

    return {key: LazyTensor(t.dtype, t.shape, load(key, t)) for key, t in tensors.items()}


# --- the command --------------------------------------------------------------------------------------------

def extract_lora(base: Path | str, tuned: Path | str, out: Path | str, *, rank: int, conv_rank: int | None = None,
                 format: str = "kohya", device: str = "cpu", min_diff: float = 0.0,
                 clamp_quantile: float | None = None, dtype: str = "fp16", overwrite: bool = False) -> ExtractReport:
    """Extract a rank-`rank` LoRA of `tuned` - `base` into `out`; returns the report (overall and per module).

    `conv_rank` applies to 3x3 convs (default `rank`). Modules whose largest absolute change is at most
    `min_diff` are left out. `clamp_quantile` (e.g. 0.99) clips factor outliers.
    """
    started = time.monotonic()
    base, tuned, out = Path(base), Path(tuned), Path(out)
    check_output(out, (base, tuned), overwrite=overwrite)
    _check_options(rank, conv_rank, format, clamp_quantile)
    code = dtypes.parse(dtype)
    dev = parse_device(device)
    conv_rank = conv_rank or rank
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    for ckpt in (base_ckpt, tuned_ckpt):
        if "unet" not in ckpt.components:
            raise UserError("has no UNet to extract from", path=ckpt.path)
    targets = plan_targets(base_ckpt, tuned_ckpt, rank, conv_rank)
    base_unet, tuned_unet = base_ckpt.components["unet"], tuned_ckpt.components["unet"]
    untargeted = _untargeted_change(targets, base_unet, tuned_unet)
    factors = _Factors(base_unet, tuned_unet, dev, min_diff, clamp_quantile, dtypes.torch_dtype(code))
    modules = lora.in_file_order(_lazy_modules(targets, factors, code))
    sources = [meta.Source.of("base", base, base_ckpt.metadata), meta.Source.of("tuned", tuned, tuned_ckpt.metadata)]
    found = meta.settings_for(tuned, tuned_ckpt.metadata, sources[1].sha256 if sources[1].sha256_of == "file" else None)
    settings = found[0] if found else None
    fixed = meta.modelspec(out.stem, lora=True) | meta.lightning_provenance("extract", sources, settings)

    def metadata(sha256: str) -> dict[str, str]:
        """The file's own account of itself, complete only when every module is written."""
        summary = _summary(factors.reports, untargeted, rank, conv_rank, min_diff, clamp_quantile, dtype)
        written = [m for m in modules if m.module not in factors.skipped]
        return fixed | lora.format_metadata(written, format) | {
            meta.EXTRACT: report_json(summary, factors.reports), meta.HASH_KEY: "0x" + sha256}

    tensors = _left_out_when_skipped(lora.lora_tensors(modules, format), modules, factors)
    with seeded(dev):
        sha = write_file(out, tensors, metadata=metadata, overwrite=overwrite,
                         room=report_room(t.module for t in targets))
    summary = _summary(factors.reports, untargeted, rank, conv_rank, min_diff, clamp_quantile, dtype)
    return ExtractReport(base, tuned, out, format, **summary, settings=settings.as_dict() if settings else None,
                         sha256=sha, bytes=out.stat().st_size, seconds=round(time.monotonic() - started, 1),
                         per_module=factors.reports)


def _check_options(rank: int, conv_rank: int | None, format: str, clamp_quantile: float | None) -> None:
    """Refuse bad options before minutes of work, not after."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UsageError(f"rank {min(rank, conv_rank or rank)} is not allowed; ranks are 1 or more")
    if format not in LORA_TARGETS:
        raise UsageError(f"unknown LoRA format {format!r}; choose {' or '.join(LORA_TARGETS)}")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UsageError(f"--clamp-quantile {clamp_quantile} is outside (0, 1]; try 0.99")


def _untargeted_change(targets: list[Target], base: Mapping[str, LazyTensor],
                       tuned: Mapping[str, LazyTensor]) -> dict:
    """What no LoRA can carry: changed tensors outside the targets (biases, norms, embeddings, conv_in/out), and
    their share of the squared change of the whole UNet."""
    target_keys = {t.module + ".weight" for t in targets}
    changed, outside = 0, 0.0
    for key, t in base.items():
        if key in target_keys or t.dtype not in dtypes.FLOAT_CODES:
            continue
        diff = float((tuned[key].load().float() - t.load().float()).square().sum())
        if diff > 0:
            changed += 1
            outside += diff
    return {"changed_tensors": changed, "squared_change": outside}


def _summary(reports: list[ModuleReport], untargeted: dict, rank: int, conv_rank: int, min_diff: float,
             clamp_quantile: float | None, dtype: str) -> dict:
    done = [r for r in reports if r.svd != "skipped"]
    inside = sum(r.norm ** 2 for r in reports)
    everything = inside + untargeted["squared_change"]
    worst = max(done, key=lambda r: r.error, default=None)
    return {
        "rank": rank, "conv_rank": conv_rank, "dtype": dtype, "min_diff": min_diff,
        "clamp_quantile": clamp_quantile, "modules": len(done), "skipped": len(reports) - len(done),
        "clamped_ranks": sum(1 for r in done if r.rank < rank_for(r.shape, rank, conv_rank)),
        "svd": {m: sum(1 for r in done if r.svd == m) for m in ("randomized", "exact")},
        **overall(reports),
        "worst": {"module": worst.module, "error": worst.error} if worst else None,
        "by_kind": by_kind(reports),
        "untargeted": {"changed_tensors": untargeted["changed_tensors"],
                       "share_of_change": untargeted["squared_change"] / everything if everything else 0.0},
    }
