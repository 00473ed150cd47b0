"""Extract a LoRA from the difference between a tuned UNet (a full SDXL-Lightning UNet) and its base.

Per target module the delta W_tuned - W_base (fp32) is cut to its best rank-r approximation by a truncated SVD
and written as up/down factors in the official Lightning LoRA layout, so every loader of the official files
loads ours. The targets are the official Lightning LoRA's modules (attention, projections, feed-forward, resnet
convs and time projections, shortcuts, samplers: 788 on SDXL); 3x3 convs are flattened to (out, in*3*3), like
the official files (down k x k, up 1 x 1).

Streaming: one module's weights and delta are in memory at a time (~650 MB allocated at SDXL size; the inputs'
memory-mapped pages also count in RSS, but the kernel can drop them). The factors go to a temporary file first,
because the header of the final file carries the error report, which is known only when every module is done;
the final file is then byte-copied from it by `lora.write_lora`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lightning_tools import dtypes, lora
from lightning_tools import provenance as meta
from lightning_tools.checkpoint import Checkpoint, open_checkpoint
from lightning_tools.errors import UserError
from lightning_tools.progress import bar
from lightning_tools.report import Report
from lightning_tools.stream import LazyTensor
from lightning_tools.tensors import Planned, SafetensorsFile, SafetensorsWriter

FORMATS = ("kohya", "peft")
# Our metadata key for the extraction report (JSON): settings, overall error/energy, per-module table.
# Randomized SVD: extra random directions beyond the rank, and power iterations, which sharpen the subspace when
# the spectrum decays slowly. On the full-size bench (rank 64, low rank + noise deltas) 2 iterations land within
# 0.2-1.4% of the optimal error at 1/7 of exact SVD's time; 4 would halve that gap for 1.6x the SVD time.
OVERSAMPLE = 10
POWER_ITERATIONS = 2
SEED = 0


@dataclass(frozen=True)
class ModuleReport:
    """How well one module's delta is captured. `error`: ||delta - up@down|| / ||delta|| of the factors as
    written (dtype, clamping included); `energy`: the share of ||delta||^2 in the kept singular values."""

    module: str
    shape: tuple[int, ...]
    rank: int
    norm: float
    error: float
    energy: float
    svd: str  # "randomized" | "exact" | "skipped"

    def as_dict(self) -> dict:
        return asdict(self) | {"shape": list(self.shape)}


# --- math ---------------------------------------------------------------------------------------------------

def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U, S, Vh, method) of the best rank-`rank` approximation of a 2-D fp32 matrix.

    Randomized (`torch.svd_lowrank`, OVERSAMPLE extra directions, POWER_ITERATIONS) when rank + OVERSAMPLE is at
    most half the smaller side: its cost grows with the rank, exact SVD's with the whole matrix (a 1280 x 11520
    SDXL conv: 1.8 s exact, 0.2 s randomized at rank 64 on 2 cores) and its error stays within ~1.5% of the
    optimum. Otherwise, where a random subspace would be nearly the whole matrix anyway, exact
    `torch.linalg.svd`, run on the tall orientation because LAPACK is several times slower on wide row-major
    input.
    """
    k = min(matrix.shape)
    q = rank + OVERSAMPLE
    if 2 * q <= k:
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=POWER_ITERATIONS)
        return u[:, :rank], s[:rank], v[:, :rank].T, "randomized"
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        u, vh = vh.T, u.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank], "exact"


def split_singular_values(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U sqrt(S), sqrt(S) Vh): both factors get the same scale, which keeps fp16 away from its
    range limits and makes a symmetric clamp treat them alike."""
    root = s.sqrt()
    return u * root, root[:, None] * vh


def clamp_at_quantile(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip both factors to +-(the `quantile` of their absolute values), as common extraction scripts do to
    tame outliers that fp16 or stacking with other LoRAs would amplify. kthvalue has no element-count limit,
    unlike torch.quantile."""
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    k = max(1, min(values.numel(), math.ceil(quantile * values.numel())))
    limit = values.kthvalue(k).values
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def factorize(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None,
              dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """LoRA factors of one weight delta (out, in) or (out, in, kh, kw), in the official layout: down (r, in) or
    (r, in, kh, kw), up (out, r) or (out, r, 1, 1); returned on the CPU in `dtype` with their report
    (`module` left empty). `rank` must not exceed min(out, in*kh*kw)."""
    shape = tuple(delta.shape)
    matrix = delta.reshape(shape[0], -1).float()
    total = matrix.square().sum()
    u, s, vh, method = truncated_svd(matrix, rank)
    up, down = split_singular_values(u, s, vh)
    if clamp_quantile is not None:
        up, down = clamp_at_quantile(up, down, clamp_quantile)
    up, down = up.to(dtype), down.to(dtype)
    residual = torch.addmm(matrix, up.float(), down.float(), alpha=-1.0).square().sum()
    energy = min(1.0, float(s.square().sum() / total))  # may exceed 1 by rounding when nothing is cut
    report = ModuleReport("", shape, rank, float(total.sqrt()), float((residual / total).sqrt()), energy, method)
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
    return up.cpu(), down.cpu(), report


def module_kind(module: str) -> str:
    """The role of a module without its place: `down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k`
    -> `attn2.to_k`, `up_blocks.0.resnets.2.conv1` -> `resnets.conv1`, `...attentions.0.proj_in` -> `proj_in`."""
    parts = module.split(".")
    for anchor in ("transformer_blocks", "attentions", "resnets", "downsamplers", "upsamplers"):
        if anchor in parts:
            rest = parts[parts.index(anchor) + 2:]  # drop the block index after the anchor
            return ".".join(rest if anchor in ("transformer_blocks", "attentions") else [anchor, *rest])
    return module


def by_kind(reports: list[ModuleReport]) -> dict[str, dict]:
    """`overall` per module kind, with the count and the largest rank used: where the error concentrates."""
    groups: dict[str, list[ModuleReport]] = {}
    for r in reports:
        groups.setdefault(module_kind(r.module), []).append(r)
    return {kind: {"modules": len(rs), "rank": max(r.rank for r in rs), **overall(rs)} for kind, rs in groups.items()}


def overall(reports: list[ModuleReport]) -> dict:
    """Error and energy over all targeted weights together (skipped modules count as fully missed)."""
    total = sum(r.norm ** 2 for r in reports)
    if total == 0:
        return {"error": 0.0, "energy": 1.0}
    missed = sum((r.error * r.norm) ** 2 for r in reports)
    kept = sum(r.energy * r.norm ** 2 for r in reports)
    return {"error": math.sqrt(missed / total), "energy": kept / total}


# --- targets ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    module: str
    shape: tuple[int, ...]
    rank: int  # the requested rank, clamped to the module's size


def lightning_targets(unet_config: Mapping) -> list[str]:
    """Module names the official Lightning LoRAs adapt, for a UNet of this config."""
    from diffusers import UNet2DConditionModel

    from lightning_tools.lora import lightning_target_modules

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return [name for name, _ in lightning_target_modules(unet)]


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
    for module in lightning_targets(base.configs["unet"]):
        shape = base_unet[module + ".weight"].shape
        wanted = conv_rank if _is_kxk(shape) else rank
        targets.append(Target(module, shape, min(wanted, shape[0], math.prod(shape[1:]))))
    return targets


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
    _check_options(out, rank, conv_rank, format, device, clamp_quantile, dtype, overwrite)
    if out.resolve() in (base.resolve(), tuned.resolve()):
        raise UserError(f"{out}: is an input of this extraction; write to another path")
    conv_rank = conv_rank or rank
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    for ckpt in (base_ckpt, tuned_ckpt):
        if "unet" not in ckpt.components:
            raise UserError(f"{ckpt.path}: has no UNet to extract from")
    targets = plan_targets(base_ckpt, tuned_ckpt, rank, conv_rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    factors_path = out.with_name(f".{out.name}.factors.partial")
    try:
        reports = _write_factors(factors_path, targets, base_ckpt.components["unet"],
                                 tuned_ckpt.components["unet"], torch.device(device), min_diff, clamp_quantile,
                                 dtypes.torch_dtype(dtypes.USER_DTYPES[dtype]))
        untargeted = _untargeted_change(targets, base_ckpt.components["unet"], tuned_ckpt.components["unet"])
        summary = _summary(reports, untargeted, rank, conv_rank, min_diff, clamp_quantile, dtype)
        metadata, settings = _metadata(out, base, tuned, base_ckpt, tuned_ckpt, summary, reports)
        factors = SafetensorsFile(factors_path)
        modules = [lora.LoraModule("unet", r.module, lora.LowRank(LazyTensor.of(factors, r.module + ".down"),
                                                                  LazyTensor.of(factors, r.module + ".up")),
                                   float(r.rank))
                   for r in reports if r.svd != "skipped"]
        sha = lora.write_lora(modules, out, format, metadata, overwrite)
    finally:
        factors_path.unlink(missing_ok=True)
    return ExtractReport({"base": str(base), "tuned": str(tuned), "out": str(out), "format": format, **summary,
                          "settings": settings, "sha256": sha, "bytes": out.stat().st_size,
                          "seconds": round(time.monotonic() - started, 1),
                          "per_module": [r.as_dict() for r in reports]})


@dataclass
class ExtractReport(Report):
    data: dict

    def __getitem__(self, key: str):
        return self.data[key]

    def to_json(self) -> dict:
        return self.data

    def describe(self) -> str:
        return describe(self.data)


def _check_options(out: Path, rank: int, conv_rank: int | None, format: str, device: str,
                   clamp_quantile: float | None, dtype: str, overwrite: bool) -> None:
    """Refuse bad options before minutes of work, not after."""
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UserError(f"rank {min(rank, conv_rank or rank)} is not allowed; ranks are 1 or more")
    if format not in FORMATS:
        raise UserError(f"unknown LoRA format {format!r}; choose kohya or peft")
    dtypes.parse(dtype)
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UserError(f"--clamp-quantile {clamp_quantile} is outside (0, 1]; try 0.99")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available to torch here; use --device cpu")


def _write_factors(path: Path, targets: list[Target], base: Mapping[str, LazyTensor],
                   tuned: Mapping[str, LazyTensor], device: torch.device, min_diff: float,
                   clamp_quantile: float | None, dtype: torch.dtype) -> list[ModuleReport]:
    """Factorize module by module into a plain safetensors file (`<module>.down`, `<module>.up`).

    Skipped modules are planned like the others (the header comes first) and written as zeros; they are left
    out of the final file.
    """
    code = dtypes.code_of(dtype)
    plan = []
    for t in targets:
        down_shape, up_shape = _factor_shapes(t.shape, t.rank)
        plan += [Planned(t.module + ".down", code, down_shape), Planned(t.module + ".up", code, up_shape)]
    reports = []
    seeded = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with seeded, SafetensorsWriter(path, plan, overwrite=True) as writer, \
            bar(len(targets), desc="extract", unit="module") as progress:
        torch.manual_seed(SEED)  # randomized SVD: the same inputs give the same file
        for t in targets:
            key = t.module + ".weight"
            delta = tuned[key].load().to(device, torch.float32)
            delta -= base[key].load().to(device, torch.float32)
            if float(delta.abs().max()) <= min_diff:
                norm = float(delta.norm())
                reports.append(ModuleReport(t.module, t.shape, 0, norm, 1.0 if norm else 0.0, 0.0, "skipped"))
                down_shape, up_shape = _factor_shapes(t.shape, t.rank)
                up, down = torch.zeros(up_shape, dtype=dtype), torch.zeros(down_shape, dtype=dtype)
            else:
                up, down, report = factorize(delta, t.rank, clamp_quantile, dtype)
                reports.append(replace(report, module=t.module))
            del delta
            writer.write(t.module + ".down", down)
            writer.write(t.module + ".up", up)
            progress.update(1)
    return reports


def _factor_shapes(shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(shape) == 4:
        return (rank, *shape[1:]), (shape[0], rank, 1, 1)
    return (rank, shape[1]), (shape[0], rank)


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
        "clamped_ranks": sum(1 for r in done if r.rank < (conv_rank if _is_kxk(r.shape) else rank)),
        "svd": {m: sum(1 for r in done if r.svd == m) for m in ("randomized", "exact")},
        **overall(reports),
        "worst": {"module": worst.module, "error": worst.error} if worst else None,
        "by_kind": by_kind(reports),
        "untargeted": {"changed_tensors": untargeted["changed_tensors"],
                       "share_of_change": untargeted["squared_change"] / everything if everything else 0.0},
    }


def _is_kxk(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2:] != (1, 1)


def _metadata(out: Path, base: Path, tuned: Path, base_ckpt: Checkpoint, tuned_ckpt: Checkpoint, summary: dict,
              reports: list[ModuleReport]) -> tuple[dict[str, str], dict | None]:
    """ModelSpec + provenance (with the tuned file's Lightning settings when recognised) + the extract report."""
    sources = [meta.Source.of("base", base, base_ckpt.metadata), meta.Source.of("tuned", tuned, tuned_ckpt.metadata)]
    found = meta.settings_for(tuned, tuned_ckpt.metadata,
                              sources[1].sha256 if sources[1].sha256_of == "file" else None)
    settings = found[0] if found else None
    table = {r.module: [r.rank, _round(r.error), _round(r.energy)] for r in reports}
    report = summary | {"per_module": {"columns": ["rank", "error", "energy"], "rows": table}}
    metadata = meta.modelspec(out.stem, lora=True) | meta.lightning_provenance(
        "extract", sources, settings) | {meta.EXTRACT: json.dumps(report, separators=(",", ":"))}
    return metadata, settings.as_dict() if settings else None


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def describe(report: dict) -> str:
    """A few lines for people: what was written, how much of the change it keeps, and where it loses most."""
    ranks = f"rank {report['rank']}" + (f", 3x3 convs {report['conv_rank']}"
                                         if report["conv_rank"] != report["rank"] else "")
    lines = [f"wrote {report['out']} ({report['format']}, {ranks}, {report['dtype']}, "
             f"{report['bytes'] / 1e6:.1f} MB) in {report['seconds']:.0f} s",
             f"  {report['modules']} modules: relative error {report['error']:.4f}, energy kept "
             f"{100 * report['energy']:.2f}% (over all targeted weights)"]
    if report["worst"]:
        lines.append(f"  worst module: {report['worst']['module']} (error {report['worst']['error']:.4f})")
    if report["skipped"]:
        lines.append(f"  skipped {report['skipped']} modules whose change is at most --min-diff {report['min_diff']:g}")
    if report["clamped_ranks"]:
        lines.append(f"  {report['clamped_ranks']} modules are smaller than the rank: they got their full rank")
    untargeted = report["untargeted"]
    if untargeted["changed_tensors"]:
        lines.append(f"  not in the LoRA: {untargeted['changed_tensors']} changed tensors outside the targets "
                     f"(biases, norms, embeddings), {100 * untargeted['share_of_change']:.2f}% of the total change")
    if report["settings"]:
        lines.append(f"  sample it like the tuned model: {report['settings']['steps']} steps, "
                     f"{report['settings']['prediction_type']} prediction")
    lines.append("  by module kind (modules, rank, error, energy kept):")
    width = max(len(kind) for kind in report["by_kind"]) if report["by_kind"] else 0
    for kind, row in sorted(report["by_kind"].items(), key=lambda kv: -kv[1]["error"]):
        lines.append(f"    {kind:<{width}}  {row['modules']:>4}  {row['rank']:>5}  {row['error']:.4f}  "
                     f"{100 * row['energy']:6.2f}%")
    return "\n".join(lines)
