"""`merge`: bake LoRAs and model differences into an SDXL base, streaming.

The base opens as a lazy `Checkpoint` in diffusers naming whatever its layout; every tensor a difference or a
LoRA changes is replaced by a lazy tensor that, when the writer asks for it, is computed in the compute dtype:
first each difference, W + alpha * (W_tuned - W_minus) with the tuned and minus models read tensor by tensor
in step with the base (any layouts: they are in diffusers naming too), then each LoRA module
(`lora.add_lora`: W + s_i * (alpha_i / rank_i) * delta_i, DoRA rescaled). Per-block strengths (`blocks`)
multiply each LoRA's strength and each difference's alpha by the weight of the block the tensor lies in; a
tensor whose every strength comes out 0 is left as it is. The writer rounds each result once to the output
dtype. Every other tensor keeps its stored bytes and is copied without decoding. Merging happens in diffusers
space before any key map, so OpenCLIP's fused in_proj in a single-file output is built from already merged
q/k/v.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_tools import dtypes, hub
from lightning_tools import provenance as prov
from lightning_tools.blocks import BlockWeights, parse_blocks
from lightning_tools.checkpoint import Checkpoint, Written, open_checkpoint, write_checkpoint, written_dtype
from lightning_tools.device import parse_device
from lightning_tools.errors import UsageError, UserError
from lightning_tools.lora import LoraFile, LoraModule, add_lora, add_lora_bias, modules_of_keys, read_lora
from lightning_tools.outputs import check_output
from lightning_tools.report import Report
from lightning_tools.sampling import Sampling
from lightning_tools.sdxl.keys import LOGIT_SCALE
from lightning_tools.stream import LazyTensor
from lightning_tools.tensors import read_tensor

if TYPE_CHECKING:
    import torch

OUTPUTS = ("comfyui", "diffusers")
# What a difference changes: the parts a fine-tune or a distillation changes. The VAE is always the base's.
DIFFERENCE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_SHOWN = 10  # unmatched modules named in an error message


@dataclass(frozen=True)
class Difference:
    """One `--add-difference TUNED --minus MINUS --alpha A` term: W + A * (W_tuned - W_minus), with both models
    open lazily in diffusers naming."""

    tuned: Checkpoint
    minus: Checkpoint
    alpha: float


@dataclass
class MergePlan:
    """What each changed base tensor gets, by (component, key): the LoRA modules and the differences at their
    strengths (block weights included; zeros left out), and the LoRA modules that found no target."""

    targets: dict[tuple[str, str], list[tuple[LoraModule, float]]] = field(default_factory=dict)
    matched: list[dict[str, int]] = field(default_factory=list)  # per LoRA: component -> modules
    unmatched: list[str] = field(default_factory=list)  # "file: module: why"
    differences: dict[tuple[str, str], list[tuple[Difference, float]]] = field(default_factory=dict)
    difference_tensors: list[dict[str, int]] = field(default_factory=list)  # per difference: component -> tensors

    @property
    def changed(self) -> set[tuple[str, str]]:
        return set(self.targets) | set(self.differences)


def plan_merge(base: Checkpoint, loras: Sequence[LoraFile], strengths: Sequence[float], *,
               differences: Sequence[Difference] = (), blocks: BlockWeights | None = None) -> MergePlan:
    """Match every LoRA module to a base weight of the same shape, collecting the ones that find none, and every
    difference to the base's tensors, refusing (before anything is written) tensors that are missing or shaped
    otherwise in the tuned or minus model."""
    plan = MergePlan()
    unet_config = base.configs["unet"]

    def weight(component: str, key: str) -> float:
        return 1.0 if blocks is None else blocks.of(component, key, unet_config)

    for lora, strength in zip(loras, strengths):
        counts: dict[str, int] = {}
        plan.unmatched += [f"{lora.path.name}: {name}: no such module in SDXL" for name in lora.unresolved]
        for m in lora.modules:
            why = _mismatch(base, m)
            if why:
                plan.unmatched.append(f"{lora.path.name}: {m.name}: {why}")
                continue
            counts[m.component] = counts.get(m.component, 0) + 1
            scaled = strength * weight(m.component, m.module)
            if scaled == 0:
                continue
            plan.targets.setdefault((m.component, m.module + ".weight"), []).append((m, scaled))
            if m.bias is not None:
                plan.targets.setdefault((m.component, m.module + ".bias"), []).append((m, scaled))
        plan.matched.append(counts)
    for diff in differences:
        counts = {}
        for c, key in _difference_keys(base, diff):
            counts[c] = counts.get(c, 0) + 1
            scaled = diff.alpha * weight(c, key)
            if scaled != 0:
                plan.differences.setdefault((c, key), []).append((diff, scaled))
        plan.difference_tensors.append(counts)
    return plan


def _difference_keys(base: Checkpoint, diff: Difference) -> list[tuple[str, str]]:
    """The floating tensors of the components base, tuned and minus all have; refused in one line when they
    are not the same architecture (a key missing on either side, or another shape)."""
    components = [c for c in DIFFERENCE_COMPONENTS
                  if all(c in ckpt.components for ckpt in (base, diff.tuned, diff.minus))]
    if not components:
        raise UserError(f"{diff.tuned.path} and {diff.minus.path} have no UNet or text encoder in common with "
                        f"{base.path}; nothing to add the difference to")
    keys, problems = [], []
    for c in components:
        ours = base.components[c]
        for other in (diff.tuned, diff.minus):
            theirs = other.components[c]
            problems += [f"{other.path} has {c} tensor {k}, which {base.path} lacks" for k in theirs
                         if k not in ours and k != LOGIT_SCALE]
            for key, t in ours.items():
                if key == LOGIT_SCALE or t.dtype not in dtypes.FLOAT_CODES:
                    continue  # OpenCLIP's temperature is not used to generate; integer tensors are not weights
                if key not in theirs:
                    problems.append(f"{other.path} lacks {c} tensor {key}")
                elif theirs[key].shape != t.shape:
                    problems.append(f"{c} {key} is {list(theirs[key].shape)} in {other.path} but {list(t.shape)} "
                                    f"in {base.path}")
        keys += [(c, key) for key, t in ours.items() if key != LOGIT_SCALE and t.dtype in dtypes.FLOAT_CODES]
    if problems:
        raise UserError(f"the difference does not fit the base: {problems[0]}" +
                        (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") +
                        "; base, --add-difference and --minus must be the same architecture (SDXL, same widths)")
    return keys


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
    """The base with every planned tensor replaced by its lazily merged value (untouched tensors as stored).

    A merged tensor is computed in `compute_dtype` (default fp32): each difference as `d = W_tuned - W_minus;
    d *= alpha; W += d`, the operations of the plain torch expression, then each LoRA module; it is rounded once
    to the output `dtype` (fp16/bf16/fp32; None keeps the base's; a safetensors code). Tensors are computed one
    ahead of the writer in a worker thread, so the arithmetic of the next overlaps the writing of this one.
    """
    import torch

    compute_dtype = compute_dtype or torch.float32
    components = {c: dict(tensors) for c, tensors in base.components.items()}
    changed = plan.changed
    order = [(c, k) for c, tensors in components.items() for k in tensors if (c, k) in changed]
    scratch = _Scratch()

    def compute(target: tuple[str, str]) -> "torch.Tensor":
        import torch

        c, key = target
        weight = base.components[c][key]
        w = scratch.work(0, weight.shape, compute_dtype, device).copy_(scratch.value(weight))
        for diff, alpha in plan.differences.get(target, ()):
            # Each operand in the compute dtype first: torch's in-place ops are ten times slower on mixed dtypes.
            d = scratch.work(1, weight.shape, compute_dtype, device)
            d.copy_(scratch.value(diff.tuned.components[c][key]))
            d.sub_(scratch.work(2, weight.shape, compute_dtype, device).copy_(
                scratch.value(diff.minus.components[c][key])))
            if alpha != 1:
                d.mul_(alpha)
            w.add_(d)
        add = add_lora_bias if key.endswith(".bias") else add_lora
        for module, strength in plan.targets.get(target, ()):
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
        self._work: dict[int, torch.Tensor] = {}

    def value(self, tensor: LazyTensor) -> "torch.Tensor":
        """The tensor's value; stored bytes are read into the raw buffer, valid until the next `value`."""
        if tensor.stored is None:
            return tensor.load()
        info = tensor.stored
        if len(self._raw) < info.nbytes:
            self._raw = bytearray(info.nbytes)
        return read_tensor(info, into=self._raw).view(tensor.shape)

    def work(self, slot: int, shape: tuple[int, ...], dtype: "torch.dtype", device) -> "torch.Tensor":
        """Work buffer number `slot` (the weight, a difference) as a tensor of `shape`."""
        import torch

        n = math.prod(shape)
        buffer = self._work.get(slot)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != torch.device(device):
            buffer = self._work[slot] = torch.empty(n, dtype=dtype, device=device)
        return buffer[:n].view(shape)


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
class DifferenceMatch:
    """One difference of a merge: tuned and minus models, alpha, and the tensors it changes per component."""

    tuned: Path
    minus: Path
    alpha: float
    tensors: dict[str, int]


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
    differences: list[DifferenceMatch] = field(default_factory=list)
    blocks: dict[str, float] | None = None  # per-block strengths, when given
    accelerators: list[Accelerator] = field(default_factory=list)
    sampling: dict[str, str] = field(default_factory=dict)  # the sampling keys written into the output
    written: Written | None = None

    def describe(self) -> str:
        """A few lines for people: what matched, what was written (or would be, for a dry run)."""
        lines = [f"base {self.base} ({self.base_layout})"]
        for diff in self.differences:
            changed = ", ".join(f"{c} {n}" for c, n in diff.tensors.items())
            lines.append(f"  + {diff.alpha:g} x ({diff.tuned} - {diff.minus}): {changed} tensors")
        for lora in self.loras:
            matched = ", ".join(f"{c} {n}" for c, n in lora.matched.items()) or "nothing"
            lines.append(f"  + {lora.file} ({lora.format}) at {lora.strength:g}: {lora.modules} modules, "
                         f"matched {matched}")
        if self.blocks is not None:
            lines.append(f"  per-block strengths: {BlockWeights(self.blocks).describe()}")
        if self.unmatched_modules:
            lines.append(f"  skipped {len(self.unmatched_modules)} unmatched LoRA modules "
                         f"(e.g. {self.unmatched_modules[0]})")
        if self.unknown_keys:
            lines.append(f"  left out {len(self.unknown_keys)} base tensors no SDXL key map places "
                         f"(e.g. {self.unknown_keys[0]})")
        if self.written is not None:
            lines.append(f"wrote {self.output} ({self.written.layout}, {self.written.bytes / 1e9:.2f} GB), "
                         f"{self.tensors_merged} tensors merged")
            if self.written.fp8 is not None:
                lines.append(f"  {self.written.fp8.describe()}")
            if self.sampling:
                lines.append(f"  sampling: {self.sampling.get(prov.FAMILY)} {self.sampling.get(prov.PROFILE)}, "
                             f"{self.sampling.get(prov.STEPS)} steps ({self.sampling.get(prov.PREDICTION_TYPE)} "
                             "prediction)")
        else:
            lines.append(f"would write {self.output} ({self.target}, about {self.estimated_bytes / 1e9:.2f} GB), "
                         f"{self.tensors_merged} tensors merged (dry run: nothing written)")
        if len(self.accelerators) > 1:
            lines.append(f"  stacked few-step accelerators (--allow-stacking): "
                         f"{'; '.join(a.describe() for a in self.accelerators)}; the output records the first one's "
                         "profile: render it to see whether the mix samples well")
        return "\n".join(lines)


@dataclass(frozen=True)
class Accelerator(Report):
    """An input that is a few-step model: a LoRA merged at a positive strength, a tuned model whose difference
    is added at a positive alpha, or a base, whose sampling profile is known (from its metadata, the catalogue
    or its name)."""

    file: str
    role: str  # "lora" | "add_difference" | "base"
    sampling: Sampling
    why: str

    def describe(self) -> str:
        s = self.sampling
        return f"{self.file} is {s.family.title} {s.profile.name}, {s.steps} steps ({self.why})"

    def to_json(self) -> dict:
        return {"file": self.file, "role": self.role, "family": self.sampling.profile.family,
                "profile": self.sampling.profile.name, "steps": self.sampling.steps, "why": self.why}


def lora_accelerators(loras: Sequence[LoraFile], strengths: Sequence[float],
                      sha256s: dict[Path, str | None]) -> list[Accelerator]:
    """The LoRAs among `loras` that are few-step accelerators at a positive strength, in their order."""
    found = []
    for lora, strength in zip(loras, strengths):
        hit = prov.settings_for(lora.path, lora.metadata, sha256s.get(lora.path)) if strength > 0 else None
        if hit:
            found.append(Accelerator(lora.path.name, "lora", *hit))
    return found


def accelerators(base: Path, base_metadata: dict[str, str], loras: Sequence[LoraFile], strengths: Sequence[float],
                 sha256s: dict[Path, str | None], differences: Sequence[Difference] = ()) -> list[Accelerator]:
    """The few-step inputs of a merge: LoRAs first in their order, then tuned models of differences, then the
    base. `sha256s`: the whole-file hashes known so far (a name can identify a file whose hash is not known
    yet)."""
    found = lora_accelerators(loras, strengths, sha256s)
    for diff in differences:
        tuned = diff.tuned.path
        hit = prov.settings_for(tuned, diff.tuned.metadata, sha256s.get(tuned)) if diff.alpha > 0 else None
        if hit:
            found.append(Accelerator(tuned.name, "add_difference", *hit))
    hit = prov.settings_for(base, base_metadata, sha256s.get(base))
    if hit:
        found.append(Accelerator(base.name, "base", *hit))
    return found


def check_stacking(found: Sequence[Accelerator], allow_stacking: bool, what: str = "merge") -> None:
    """Refuse two accelerators in one merge unless allowed: each was distilled for its own sampler."""
    if len(found) > 1 and not allow_stacking:
        listed = "; ".join(a.describe() for a in found)
        raise UserError(f"this {what} stacks {len(found)} few-step accelerators: {listed}. Each was distilled for "
                        "its own sampler, timesteps and CFG, so together they sample like neither (usually burnt or "
                        "blurred images); merge only one, or pass --allow-stacking to merge them anyway")


def merge(base: Path | str, loras: Sequence[Path | str], out: Path | str, *, strengths: Sequence[float] = (),
          add_difference: Sequence[Path | str] = (), minus: Sequence[Path | str] = (), alphas: Sequence[float] = (),
          blocks: str | None = None, to: str | None = None, dtype: str | None = None, compute_dtype: str = "fp32",
          device: str = "cpu", allow_unmatched: bool = False, allow_stacking: bool = False, dry_run: bool = False,
          overwrite: bool = False, config_dir: Path | str | None = None) -> MergeReport:
    """Merge differences and `loras` into `base`, writing `out`.

    Each `add_difference` model adds alpha * (it - its `minus`) (one `minus` and one alpha may serve all); each
    LoRA is merged at its strength (one strength may serve all). `blocks` (see `blocks.parse_blocks`) scales
    both per UNet block and for the text encoders (BASE). Refuses, before writing anything, a difference whose
    models are not the same architecture as the base, and a LoRA module that finds no target of the same shape
    unless `allow_unmatched` (then they are skipped and reported, as long as something matched). With `dry_run`
    only the plan is returned. `dtype`: fp16, bf16, fp32 or fp8 (the UNet's matrices and convs in
    float8_e4m3fn, the rest fp16, with the loss against fp16 in the report); `compute_dtype`: fp16, bf16 or
    fp32. Two few-step accelerators (LoRAs at a positive strength, tuned models at a positive alpha, a few-step
    base) are refused unless `allow_stacking`.
    """
    base, out, loras = Path(base), Path(out), [Path(p) for p in loras]
    tuned = [Path(p) for p in add_difference]
    if not loras and not tuned:
        raise UsageError("nothing to merge: give --lora LORA and/or --add-difference TUNED --minus BASE")
    if minus and not tuned:
        raise UsageError("--minus goes with --add-difference TUNED: the model TUNED was tuned from")
    if tuned and not minus:
        raise UsageError("--add-difference needs --minus BASE, the model TUNED was tuned from (W + alpha * "
                         "(TUNED - BASE))")
    if alphas and not tuned:
        raise UsageError("--alpha goes with --add-difference; a LoRA's weight is --strength")
    strengths = _per_input(list(strengths) or [1.0], len(loras), ("strengths", "LoRAs"), ("--strength", "--lora"))
    minuses = [Path(p) for p in _per_input(minus, len(tuned), ("--minus models", "differences"),
                                            ("--minus", "--add-difference"))]
    alphas = _per_input(list(alphas) or [1.0], len(tuned), ("alphas", "differences"), ("--alpha", "--add-difference"))
    weights = parse_blocks(blocks)
    code = dtypes.parse(dtype, allowed=dtypes.OUTPUT_DTYPES)
    compute = dtypes.parse(compute_dtype, "--compute-dtype")
    dev = parse_device(device)
    check_output(out, (base, *loras, *tuned, *minuses, config_dir), overwrite=overwrite or dry_run)

    ckpt = open_checkpoint(base, config_dir)
    opened: dict[Path, Checkpoint] = {}

    def model(path: Path) -> Checkpoint:
        if path not in opened:
            opened[path] = open_checkpoint(path, config_dir)
        return opened[path]

    differences = [Difference(model(t), model(m), a) for t, m, a in zip(tuned, minuses, alphas)]
    targets = {c: modules_of_keys(t, c) for c, t in ckpt.components.items() if c != "vae"}
    files = [read_lora(p, targets, ckpt.configs["unet"]) for p in loras]
    plan = plan_merge(ckpt, files, strengths, differences=differences, blocks=weights)
    to_format = output_format(ckpt, out, to)
    report = MergeReport(
        base, ckpt.layout, out, to_format, dtype, compute_dtype, device,
        [LoraMatch(f.path, f.format, s, len(f.modules) + len(f.unresolved), counts)
         for f, s, counts in zip(files, strengths, plan.matched)],
        len(plan.changed), plan.unmatched, ckpt.unknown_keys, _estimated_size(ckpt, code),
        [DifferenceMatch(t, m, a, counts) for t, m, a, counts in zip(tuned, minuses, alphas, plan.difference_tensors)],
        weights.to_json() if weights else None)
    if plan.unmatched and not allow_unmatched:
        shown = "; ".join(plan.unmatched[:_SHOWN]) + ("; ..." if len(plan.unmatched) > _SHOWN else "")
        raise UserError(f"{len(plan.unmatched)} LoRA modules find no matching weight in {base} ({shown}); "
                        "is the LoRA for SDXL? --allow-unmatched merges the rest")
    if files and not any(plan.matched):
        raise UserError(f"no LoRA module matches a weight of {base}: the output would be a plain copy of the base; "
                        "is the LoRA for SDXL?")
    if not plan.changed:
        raise UserError("every strength and alpha comes out 0 (with --blocks): the output would be a plain copy of "
                        f"{base}")
    known = {p: (hub.manifest_entry(p) or {}).get("sha256") if p.is_file() else None
             for p in (base, *loras, *tuned)}
    report.accelerators = accelerators(base, ckpt.metadata, files, strengths, known, differences)
    check_stacking(report.accelerators, allow_stacking)
    if dry_run:
        return report

    # An fp8 output is the fp16 one rounded to fp8: merged tensors are rounded to fp16 first.
    merged = apply_plan(ckpt, plan, dtypes.torch_dtype(compute), dev, "F16" if code == dtypes.FP8 else code)
    metadata, report.accelerators = _metadata(base, ckpt, files, strengths, differences, weights, out, to_format,
                                              allow_stacking)
    report.sampling = {k: metadata[k] for k in (prov.FAMILY, prov.PROFILE, prov.STEPS, prov.PREDICTION_TYPE)
                       if k in metadata}
    with _arithmetic_threads():
        report.written = write_checkpoint(merged, out, to_format, dtype=code, metadata=metadata,
                                          overwrite=overwrite, config_dir=config_dir)
    return report


@contextlib.contextmanager
def _arithmetic_threads() -> Iterator[None]:
    """torch's threads while the stream runs: all cores but two, which the writer and its hashing thread keep
    busy. Between elementwise operations OpenMP's threads spin, taking the cores the writer needs: on this
    project's 2-core machine a 6.9 GB add-difference took twice as long with torch's default of two threads
    when other work shared the cores. Threads pick the setting up when they first compute, so the arithmetic
    thread started during the write gets it; the caller's setting is back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, len(os.sched_getaffinity(0)) - 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _per_input(values: Sequence, count: int, nouns: tuple[str, str], options: tuple[str, str]) -> list:
    """One value per input (LoRA, difference), from one given for all or one each in the same order."""
    values = list(values)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"{len(values)} {nouns[0]} for {count} {nouns[1]}: give one {options[0]} for all, or one "
                         f"per {options[1]} in the same order")
    return values


def _estimated_size(ckpt: Checkpoint, dtype: str | None) -> int:
    return sum(math.prod(t.shape) * dtypes.ITEM_SIZE[written_dtype(c, t, dtype)]
               for c, tensors in ckpt.components.items() for t in tensors.values())


def _metadata(base: Path, ckpt: Checkpoint, files: Sequence[LoraFile], strengths: Sequence[float],
              differences: Sequence[Difference], blocks: BlockWeights | None, out: Path, to_format: str,
              allow_stacking: bool) -> tuple[dict[str, str], list[Accelerator]]:
    """ModelSpec + provenance: the base, every difference's tuned and minus model with its alpha, every LoRA
    with its strength, all with sha256, the per-block strengths when they change anything, and the sampling
    profile of the first accelerator (LoRAs, then tuned models, then the base). Identification now has every
    file's hash, so stacking is checked again."""
    sources = [prov.Source.of("base", base, ckpt.metadata)]
    for diff in differences:
        sources += [prov.Source.of("add_difference", diff.tuned.path, diff.tuned.metadata, diff.alpha),
                    prov.Source.of("minus", diff.minus.path, diff.minus.metadata, diff.alpha)]
    sources += [prov.Source.of("lora", lora.path, lora.metadata, strength) for lora, strength in zip(files, strengths)]
    paths = (base, *(p for d in differences for p in (d.tuned.path, d.minus.path)), *(f.path for f in files))
    hashes = {Path(p): s.sha256 if s.sha256_of == "file" else None for p, s in zip(paths, sources)}
    found = accelerators(base, ckpt.metadata, files, strengths, hashes, differences)
    check_stacking(found, allow_stacking)
    title = out.name.removesuffix(".safetensors")
    spec = prov.modelspec(title, implementation="diffusers" if to_format == "diffusers" else "sgm")
    metadata = spec | prov.lightning_provenance("merge", sources, found[0].sampling if found else None)
    if blocks is not None and not blocks.identity:
        metadata[prov.BLOCKS] = json.dumps(blocks.to_json())
    return metadata, found
