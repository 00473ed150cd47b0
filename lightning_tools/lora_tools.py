"""The LoRA toolbox: `resize` a LoRA to a lower rank, `combine` several LoRAs into one. Both write their file in
one pass through the stream, like `extract`: each module's factors are computed when the file sink asks for
them, one module in memory at a time, and the error report, complete only at the end, goes into header room
reserved up front (`provenance.LOWRANK`).

resize (like kohya's `resize_lora.py`): LoRA and LoCon modules only. A module's singular values come cheaply
from its factors (QR of up and down, then an r x r core), and fix its new rank: `rank` (`conv_rank` for k x k
convs), or fewer with a dynamic mode. A module already at or below that rank is copied unchanged, so resizing to
the same rank is lossless; the others are refactorised by `lowrank.factorize` with alpha keeping their scale.

combine (like kohya's `svd_merge_lora.py`): per adapted weight, the sum of every file's delta at its strength
(any variant: LoRA, LoCon, LoHa, LoKr, full), refactorised by truncated SVD to `rank`, alpha = rank.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from lightning_tools import dtypes, lora
from lightning_tools import provenance as meta
from lightning_tools.blocks import parse_blocks
from lightning_tools.device import parse_device
from lightning_tools.errors import UsageError, UserError
from lightning_tools.lowrank import (ModuleReport, by_kind, factor_shapes, factorize, kind_lines, overall, rank_for,
                                     report_json, report_room, seeded)
from lightning_tools.merge import check_stacking, lora_accelerators
from lightning_tools.outputs import check_output
from lightning_tools.report import Report
from lightning_tools.sdxl.vocabulary import LORA_TARGETS
from lightning_tools.sdxl.detect import base_config, expected_shapes
from lightning_tools.stream import LazyTensor, cast, write_file

Dynamic = Literal["sv_fro", "sv_ratio", "sv_cumulative"]
DYNAMIC: dict[str, str] = {
    "sv_fro": "the fewest singular values that keep this fraction of the Frobenius norm (0.9 keeps 81% of the "
              "squared norm)",
    "sv_cumulative": "the fewest singular values whose sum reaches this fraction of their total",
    "sv_ratio": "the singular values at least the largest divided by this ratio",
}
# Metadata a resized or combined file must not carry over from its source: reports and ranks that no longer hold.
_STALE = (meta.EXTRACT, meta.LOWRANK, lora.PEFT_METADATA_KEY, "ss_network_dim", "ss_network_alpha")


@dataclass
class LoraToolReport(Report):
    """What `lora resize` or `lora combine` wrote and how much of the change it keeps, overall, by module kind
    and per module (`svd`: "randomized" or "exact" for refactorised modules, "kept" for modules resize copied)."""

    command: str
    inputs: list[Path]
    strengths: list[float]
    out: Path
    format: str
    rank: int
    conv_rank: int
    dynamic: str | None
    dynamic_param: float | None
    dtype: str | None
    modules: int
    kept: int
    ranks: dict[int, int]
    error: float
    energy: float
    worst: dict | None
    by_kind: dict[str, dict]
    sha256: str
    bytes: int
    seconds: float
    per_module: list[ModuleReport]

    def describe(self) -> str:
        ranks = f"rank {self.rank}" + (f", 3x3 convs {self.conv_rank}" if self.conv_rank != self.rank else "")
        if self.dynamic:
            ranks = f"{self.dynamic} {self.dynamic_param:g}, at most {ranks}"
        used = ", ".join(f"{n} at {r}" for r, n in sorted(self.ranks.items()))
        lines = [f"wrote {self.out} ({self.format}, {ranks}, {self.bytes / 1e6:.1f} MB) in {self.seconds:.0f} s",
                 f"  {self.modules} modules ({used}): relative error {self.error:.4f}, energy kept "
                 f"{100 * self.energy:.2f}%"]
        if self.kept:
            lines.append(f"  {self.kept} modules already at or below the rank were copied unchanged")
        if self.worst:
            lines.append(f"  worst module: {self.worst['module']} (error {self.worst['error']:.4f})")
        return "\n".join(lines + kind_lines(self.by_kind))


# --- the math ----------------------------------------------------------------------------------------------

def spectrum(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The singular values of up @ down (out x r times r x in), from the r x r core left by QR of both factors:
    exact, and a millisecond where an SVD of the product would take a second."""
    _, r_up = torch.linalg.qr(up.float())
    _, r_down = torch.linalg.qr(down.float().T)
    return torch.linalg.svdvals(r_up @ r_down.T)


def choose_rank(singular_values: torch.Tensor, cap: int, dynamic: Dynamic | None = None,
                param: float | None = None) -> int:
    """The rank to keep: `cap`, or with a dynamic mode (see DYNAMIC) the fewest singular values that meet
    `param`, at most `cap` and at least 1. kohya's resize_lora.py keeps one more than this."""
    s = singular_values.double()
    if dynamic is None:
        k = cap
    elif dynamic == "sv_fro":
        k = int(torch.searchsorted(torch.cumsum(s.square(), 0) / s.square().sum(), param ** 2 - 1e-12)) + 1
    elif dynamic == "sv_cumulative":
        k = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), param - 1e-12)) + 1
    elif dynamic == "sv_ratio":
        k = int((s >= s[0] / param).sum())
    else:
        raise UsageError(f"--dynamic {dynamic}: choose one of {', '.join(DYNAMIC)}")
    return max(1, min(k, cap, len(s)))


# --- one pass: factors computed as the sink asks ---------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    """One module to refactorise: its label in reports, weight shape, new rank, the dtype (a safetensors code)
    its factors are written in, and how to make its delta."""

    label: str
    shape: tuple[int, ...]
    rank: int
    dtype: str
    delta: Callable[[], torch.Tensor]
    scale: float = 1.0  # |alpha / rank| of the source, for the report's weighting


class _Factors:
    """Each job's factors, computed when the file sink first asks for one of its tensors and kept until the
    next job's are asked for; `reports` grows as jobs are done."""

    def __init__(self, clamp_quantile: float | None, reports: list[ModuleReport]):
        self.clamp_quantile, self.reports = clamp_quantile, reports
        self._current: tuple[str, tuple[torch.Tensor, torch.Tensor] | None] = ("", None)

    def get(self, job: _Job) -> tuple[torch.Tensor, torch.Tensor]:
        if self._current[0] != job.label:
            up, down, report = factorize(job.delta(), job.rank, self.clamp_quantile, dtypes.torch_dtype(job.dtype))
            self.reports.append(replace(report, module=job.label, norm=report.norm * job.scale))
            self._current = (job.label, (up, down))
        return self._current[1]


def _lazy_module(component: str, module: str, job: _Job, factors: _Factors, alpha: float) -> lora.LoraModule:
    """A LoRA module whose up/down come from `factors` when first asked for."""
    down_shape, up_shape = factor_shapes(job.shape, job.rank)
    down = LazyTensor(job.dtype, down_shape, lambda: factors.get(job)[1])
    up = LazyTensor(job.dtype, up_shape, lambda: factors.get(job)[0])
    return lora.LoraModule(component, module, lora.LowRank(down, up), alpha, job.label)


def _label(component: str, module: str) -> str:
    """A module's name in reports: UNet names as they are, text encoder ones under their component (both
    encoders have `text_model.encoder.layers.0...`)."""
    return module if component == "unet" else f"{component}.{module}"


def _write(modules: list[lora.LoraModule], out: Path, format: str, fixed: dict[str, str], reports: list[ModuleReport],
           summary: Callable[[], dict], overwrite: bool, device: torch.device) -> str:
    """The file in one pass; the report goes into room reserved for it. Returns the data sha256."""
    def metadata(sha256: str) -> dict[str, str]:
        return fixed | lora.format_metadata(modules, format) | {
            meta.LOWRANK: report_json(summary(), reports), meta.HASH_KEY: "0x" + sha256}

    with seeded(device):
        return write_file(out, lora.lora_tensors(modules, format), metadata=metadata, overwrite=overwrite,
                          room=report_room(m.name for m in modules))


def _summary(reports: list[ModuleReport], **settings) -> dict:
    worst = max((r for r in reports if r.svd != "kept"), key=lambda r: r.error, default=None)
    ranks: dict[int, int] = {}
    for r in reports:
        ranks[r.rank] = ranks.get(r.rank, 0) + 1
    return {**settings, "modules": len(reports), "kept": sum(r.svd == "kept" for r in reports),
            "ranks": dict(sorted(ranks.items())), **overall(reports),
            "worst": {"module": worst.module, "error": worst.error} if worst else None, "by_kind": by_kind(reports)}


# --- resize --------------------------------------------------------------------------------------------------

def resize_lora(src: Path | str, out: Path | str, *, rank: int, conv_rank: int | None = None,
                dynamic: Dynamic | None = None, dynamic_param: float | None = None, format: str = "kohya",
                dtype: str | None = None, device: str = "cpu", overwrite: bool = False) -> LoraToolReport:
    """Resize the LoRA/LoCon `src` to at most `rank` (`conv_rank` for k x k convs; default `rank`), or to what
    `dynamic` keeps of each module's spectrum; `dtype` defaults to the source's. Modules already at or below
    their new rank are copied unchanged. Refuses LoHa, LoKr, full and DoRA modules in one line."""
    started = time.monotonic()
    src, out = Path(src), Path(out)
    conv_rank = conv_rank or rank
    _check_options(out, rank, conv_rank, format, overwrite, (src,))
    if (dynamic is None) != (dynamic_param is None):
        raise UsageError("--dynamic and --dynamic-param go together: e.g. --dynamic sv_fro --dynamic-param 0.9")
    if dynamic is not None:
        if dynamic not in DYNAMIC:
            raise UsageError(f"--dynamic {dynamic}: choose one of {', '.join(DYNAMIC)}")
        if not (dynamic_param >= 1 if dynamic == "sv_ratio" else 0 < dynamic_param <= 1):
            raise UsageError(f"--dynamic-param {dynamic_param}: {dynamic} takes " +
                             ("a ratio of at least 1, e.g. 20" if dynamic == "sv_ratio" else "a fraction in (0, 1], "
                              "e.g. 0.9"))
    code = dtypes.parse(dtype)
    dev = parse_device(device)
    source = lora.read_lora(src)
    _refuse_unresolved(source)
    reports: list[ModuleReport] = []
    factors = _Factors(None, reports)
    modules = []
    for m in lora.in_file_order(source.modules):
        if not isinstance(m.factors, lora.LowRank) or m.dora is not None or m.bias is not None:
            raise UserError(f"module {m.name} is {m.variant}; resize works on LoRA and LoCon modules only (combine "
                            "refactorises any variant: `lightning-tools lora combine` with one file)", path=src)
        modules.append(_resized(m, rank, conv_rank, dynamic, dynamic_param, code, dev, reports, factors))
    summary = functools.partial(_summary, reports, rank=rank, conv_rank=conv_rank, dynamic=dynamic,
                                dynamic_param=dynamic_param, dtype=dtype)
    kept_metadata = {k: v for k, v in source.metadata.items() if k not in _STALE}
    fixed = meta.output_metadata(src, kept_metadata, [meta.Source.of("source", src, source.metadata)],
                                 "lora resize", lora=True)
    sha = _write(modules, out, format, fixed, reports, summary, overwrite, dev)
    return _report("resize", [src], [], out, format, summary(), sha, started, reports)


def _resized(m: lora.LoraModule, rank: int, conv_rank: int, dynamic: Dynamic | None, param: float | None,
             code: str | None, device: torch.device, reports: list[ModuleReport],
             factors: _Factors) -> lora.LoraModule:
    """The module as resize writes it: unchanged (cast to `code`) when its new rank is not lower, else with
    factors computed on demand and alpha keeping its scale."""
    up, down = m.factors.matrices(torch.float32, device)
    values = spectrum(up, down)
    shape = m.delta_shape
    cap = rank_for(shape, rank, conv_rank)
    new_rank = choose_rank(values, cap, dynamic, param)
    scale = abs(m.scale)
    label = _label(m.component, m.module)
    if new_rank >= m.rank or float(values[0]) == 0:
        kept = lora.LowRank(*(cast(t, code) if t is not None else None for t in (m.factors.down, m.factors.up,
                                                                                  m.factors.mid)))
        error = 0.0 if kept == m.factors else _relative_gap(up @ down, kept)
        reports.append(ModuleReport(label, shape, m.rank, float(values.norm()) * scale, error, 1.0, "kept"))
        return replace(m, factors=kept)

    def delta() -> torch.Tensor:
        up, down = m.factors.matrices(torch.float32, device)  # read again: the plan keeps no factors in memory
        return (up @ down).reshape(shape)

    job = _Job(label, shape, new_rank, code or m.factors.up.dtype, delta, scale)
    return _lazy_module(m.component, m.module, job, factors, m.scale * new_rank)


def _relative_gap(delta: torch.Tensor, factors: lora.LowRank) -> float:
    """||delta - up @ down|| / ||delta|| of a module's factors as written."""
    up, down = factors.matrices(torch.float32, delta.device)
    norm = float(delta.norm())
    return float((delta - up @ down).norm()) / norm if norm else 0.0


# --- combine -------------------------------------------------------------------------------------------------

def combine_loras(paths: Sequence[Path | str], out: Path | str, *, strengths: Sequence[float] = (), rank: int,
                  conv_rank: int | None = None, blocks: str | None = None, clamp_quantile: float | None = None,
                  format: str = "kohya", dtype: str = "fp16", device: str = "cpu", allow_stacking: bool = False,
                  overwrite: bool = False) -> LoraToolReport:
    """One LoRA holding the sum of `paths` at their `strengths` (one for all, or one each; default 1), each
    adapted weight's summed delta refactorised to `rank` (`conv_rank` for k x k convs). `blocks` scales the
    strengths per SDXL block as in merge. DoRA and bias changes have no form in a plain LoRA and are refused,
    as are two few-step accelerators unless `allow_stacking`."""
    started = time.monotonic()
    paths, out = [Path(p) for p in paths], Path(out)
    conv_rank = conv_rank or rank
    if not paths:
        raise UsageError("give the LoRA files to combine")
    _check_options(out, rank, conv_rank, format, overwrite, paths)
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UsageError(f"--clamp-quantile {clamp_quantile} is outside (0, 1]; try 0.99")
    strengths = list(strengths) or [1.0]
    if len(strengths) == 1:
        strengths *= len(paths)
    if len(strengths) != len(paths):
        raise UsageError(f"{len(strengths)} strengths for {len(paths)} LoRAs: give one --strength for all, or one "
                         "per LoRA in the same order")
    weights = parse_blocks(blocks)
    code = dtypes.parse(dtype)
    dev = parse_device(device)
    files = [lora.read_lora(p) for p in paths]
    for f in files:
        _refuse_unresolved(f)
    sources = [meta.Source.of("lora", f.path, f.metadata, s) for f, s in zip(files, strengths)]
    found = lora_accelerators(files, strengths, {f.path: s.sha256 if s.sha256_of == "file" else None
                                                 for f, s in zip(files, sources)})
    check_stacking(found, allow_stacking, "combination")

    unet_config = base_config("unet")
    groups: dict[tuple[str, str], list[tuple[lora.LoraModule, float]]] = {}
    for f, strength in zip(files, strengths):
        for m in f.modules:
            if m.dora is not None or m.bias is not None:
                raise UserError(f"module {m.name} is {m.variant}: its change depends on the base weight (DoRA) or "
                                "adds a bias, which a plain LoRA cannot hold; merge it into a model instead",
                                path=f.path)
            scaled = strength * (weights.of(m.component, m.module, unet_config) if weights else 1.0)
            if scaled != 0:
                groups.setdefault((m.component, m.module), []).append((m, scaled))

    reports: list[ModuleReport] = []
    factors = _Factors(clamp_quantile, reports)
    modules = []
    sdxl = {c: expected_shapes(c, base_config(c)) for c in lora.LORA_COMPONENTS}
    for component, module in sorted(groups, key=lambda cm: (lora.LORA_COMPONENTS.index(cm[0]), cm[1])):
        members = groups[(component, module)]
        shape = _weight_shape(component, module, [m for m, _ in members], sdxl[component])
        cap = rank_for(shape, rank, conv_rank)
        new_rank = min(cap, shape[0], math.prod(shape[1:]))
        job = _Job(_label(component, module), shape, new_rank, code, _summed(members, shape, dev))
        modules.append(_lazy_module(component, module, job, factors, float(new_rank)))
    if not modules:
        raise UserError("every strength comes out 0: nothing to combine")

    summary = functools.partial(_summary, reports, rank=rank, conv_rank=conv_rank, dynamic=None,
                                dynamic_param=None, dtype=dtype, clamp_quantile=clamp_quantile,
                                strengths=strengths, blocks=weights.to_json() if weights else None)
    fixed = meta.modelspec(out.name.removesuffix(".safetensors"), lora=True) | \
        meta.lightning_provenance("lora combine", sources, found[0].sampling if found else None)
    sha = _write(modules, out, format, fixed, reports, summary, overwrite, dev)
    return _report("combine", paths, strengths, out, format, summary(), sha, started, reports)


def _summed(members: list[tuple[lora.LoraModule, float]], shape: tuple[int, ...],
            device: torch.device) -> Callable[[], torch.Tensor]:
    def delta() -> torch.Tensor:
        total = torch.zeros(shape, dtype=torch.float32, device=device)
        for m, strength in members:
            total.view(shape[0], -1).add_(lora.lora_delta(m, strength, torch.float32, device).reshape(shape[0], -1))
        return total

    return delta


def _weight_shape(component: str, module: str, members: list[lora.LoraModule],
                  sdxl_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The adapted weight's shape. LoHa and LoKr factors of a conv are stored flattened (out, in * k * k): the
    kernel comes from another file's module, else from the SDXL base's weight of that name when it fits (a
    LoRA for another width keeps the flattened form, which merge and ComfyUI take)."""
    shapes = {m.delta_shape for m in members}
    flat = {(s[0], math.prod(s[1:])) for s in shapes}
    if len(flat) > 1:
        listed = ", ".join(f"{m.name} {list(m.delta_shape)}" for m in members)
        raise UserError(f"the LoRAs disagree on the shape of {component} {module} ({listed}); they are for "
                        "different models")
    full = [s for s in shapes if len(s) == 4]
    if full:
        return full[0]
    sdxl = sdxl_shapes.get(module + ".weight")
    if sdxl is not None and len(sdxl) == 4 and (sdxl[0], math.prod(sdxl[1:])) in flat:
        return tuple(sdxl)
    return shapes.pop()


# --- shared --------------------------------------------------------------------------------------------------

def _check_options(out: Path, rank: int, conv_rank: int, format: str, overwrite: bool,
                   inputs: Sequence[Path]) -> None:
    """Refuse bad options before any work."""
    check_output(out, inputs, overwrite=overwrite)
    if rank < 1 or conv_rank < 1:
        raise UsageError(f"rank {min(rank, conv_rank)} is not allowed; ranks are 1 or more")
    if format not in LORA_TARGETS:
        raise UsageError(f"unknown LoRA format {format!r}; choose {' or '.join(LORA_TARGETS)}")


def _refuse_unresolved(f: lora.LoraFile) -> None:
    if f.unresolved:
        raise UserError(f"{len(f.unresolved)} modules name no SDXL module (e.g. {f.unresolved[0]}); is the LoRA for "
                        "SDXL?", path=f.path)


def _report(command: str, inputs: list[Path], strengths: list[float], out: Path, format: str, summary: dict,
            sha: str, started: float, reports: list[ModuleReport]) -> LoraToolReport:
    fields = {k: summary[k] for k in ("rank", "conv_rank", "dynamic", "dynamic_param", "dtype", "modules", "kept",
                                      "ranks", "error", "energy", "worst", "by_kind")}
    return LoraToolReport(command, inputs, strengths, out, format, **fields, sha256=sha, bytes=out.stat().st_size,
                          seconds=round(time.monotonic() - started, 1), per_module=reports)
