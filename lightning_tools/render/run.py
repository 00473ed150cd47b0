"""`render`: validation images with the sampler settings a checkpoint was distilled for, checked, in a report.

The last gate before a merged or converted checkpoint ships: render a fixed prompt set with the checkpoint's own
sampling profile (its family's scheduler, timesteps, guidance and eta at its step count), check every image is sane,
optionally compare each with the image of the same prompt and seed in a previous render, and write a report a
CI job can gate on (exit 3 when an image fails).

At release scale (hundreds of prompts x seeds x candidate checkpoints) the same command renders several models
and, launched under `accelerate launch` or `torchrun`, shares the work between the processes (`world`): each
renders whole batches into the output's temporary folder, the main process checks, compares and publishes it.
An image depends on its model, prompt, seed and batch only, never on the number of processes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from lightning_tools import __version__
from lightning_tools.device import parse_device
from lightning_tools.errors import UserError
from lightning_tools.progress import bar
from lightning_tools.render import checks
from lightning_tools.render.compare import Comparison, Rendered, compare, read_images
from lightning_tools.render.pipeline import (Accelerations, load_pipeline, prepare, render_batch, scheduler_report,
                                             support_for)
from lightning_tools.render.plan import Plan, plan
from lightning_tools.render.world import Process, World
from lightning_tools.report import Report
from lightning_tools.sdxl import detect
from lightning_tools.outputs import check_output, output

DEFAULT_PROMPTS = (
    "A girl smiling",
    "a red fox in fresh snow, telephoto photograph",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen on a wooden table, studio lighting",
)
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONTACT_SHEET = "contact_sheet.png"
REPORT = "report.json"
SEVERAL_MODELS_OUT = "render-models"  # the default output of a render of several models


@dataclass
class ImageResult:
    file: str
    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    passed: bool
    checks: dict[str, dict]
    reference: dict | None = None
    rank: int = 0  # the process that rendered it

    def failures(self) -> list[str]:
        failed = [name for name, check in self.checks.items() if not check["passed"]]
        if self.reference and not self.reference["passed"]:
            failed.append(self.reference.get("problem") or f"differs from reference by "
                          f"{self.reference['mean_abs_diff']:g} levels (max {self.reference['max_diff']:g})")
        return failed


@dataclass
class RenderReport(Report):
    """What `report.json` holds for one model: the model, the settings and scheduler as they ran, the processes
    that rendered it, timing, every image."""

    passed: bool
    out: Path
    model: dict
    settings_source: str | None
    settings: dict
    checkpoint_settings: dict | None
    warnings: list[str]
    steps: int
    guidance_scale: float
    scheduler: dict
    device: str
    device_name: str
    dtype: str
    vae_dtype: str
    accelerations: dict
    height: int
    width: int
    batch_size: int
    seconds_per_image: float
    warmup_seconds: float | None
    peak_gpu_memory_bytes: int | None
    reference: dict | None
    world_size: int
    processes: list[Process]
    images: list[ImageResult] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)

    def failures(self) -> list[str]:
        """One short phrase per failed image, for the one-line error."""
        return [f"{image.file}: {', '.join(image.failures())}" for image in self.images if not image.passed]

    def describe(self) -> str:
        scheduler = self.scheduler
        memory = self.peak_gpu_memory_bytes
        settings, strength = self.settings, self.model.get("lora_strength")
        lines = [f"rendered {len(self.images)} images of {self.model['path']} into {self.out}"
                 + (f" on {self.world_size} processes" if self.world_size > 1 else ""),
                 f"  profile {settings['family']} {settings['profile']} (from {self.settings_source or 'defaults'})"
                 + (f", LoRA strength {strength:g}" if strength is not None else ""),
                 f"  {self.steps} steps, {scheduler['class']} {scheduler['timestep_spacing']} "
                 f"{scheduler['prediction_type']}, timesteps {scheduler['timesteps']}, "
                 f"guidance {self.guidance_scale:g}" + (f", eta {settings['eta']:g}" if settings["eta"] is not None
                                                         else ""),
                 f"  {self.device} {self.dtype}: {self.seconds_per_image:.3f} s/image"
                 + (f", peak GPU memory {memory / 2**30:.2f} GiB" if memory else "")]
        failed = self.failures()
        lines.append("  checks: all passed" if not failed else f"  checks: {len(failed)} images FAILED")
        return "\n".join(lines)


@dataclass
class ModelSummary:
    """One model of a render of several, as the top-level report lists it."""

    name: str  # its folder in the output
    path: str
    passed: bool
    steps: int
    images: int
    failed: int
    seconds_per_image: float


@dataclass
class ModelsReport(Report):
    """The top-level `report.json` of a render of several models: who rendered, each model in one line (its own
    report.json is in its folder), and how far each pair of models is apart."""

    passed: bool
    out: Path
    world_size: int
    processes: list[Process]
    seconds: float  # wall clock of the whole render, loading and checking included
    models: list[ModelSummary]
    comparison: Comparison
    reports: list[RenderReport] = field(default_factory=list, repr=False)  # in each model's folder

    def failures(self) -> list[str]:
        return [f"{summary.name}/{failure}" for summary, report in zip(self.models, self.reports)
                for failure in report.failures()]

    def describe(self) -> str:
        images = sum(m.images for m in self.models)
        lines = [f"rendered {images} images of {len(self.models)} models into {self.out} in {self.seconds:.1f} s"
                 + (f" on {self.world_size} processes" if self.world_size > 1 else "")]
        for m in self.models:
            lines.append(f"  {m.name}: {m.images} images, {m.steps} steps, {m.seconds_per_image:.3f} s/image, "
                         + ("all passed" if m.passed else f"{m.failed} FAILED"))
        lines.append(f"  compared in {', '.join(self.comparison.sheets)}:")
        lines += [f"    {pair.describe()}" for pair in self.comparison.pairs]
        failed = self.failures()
        lines.append("  checks: all passed" if not failed else f"  checks: {len(failed)} images FAILED")
        return "\n".join(lines)


def check_dimensions(height: int, width: int) -> None:
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise UserError(f"--height {height} --width {width}: both must be positive multiples of 8")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts ({e})", path=path) from None
    prompts = [p for p in (line.strip() for line in lines) if p and not p.startswith("#")]
    if not prompts:
        raise UserError("no prompts in it (one per line)", path=path)
    return prompts


def plans_for(models: Sequence[Path | str], *, base: Path | str | None = None, config: Path | str | None = None,
              **settings) -> list[Plan]:
    """How each model renders. Among several models `base` completes those that need one (UNet-only files,
    LoRAs) and the complete ones ignore it; for one model, a base it cannot use is refused as the mistake it is.
    `settings` are `plan.plan`'s overrides (steps, family, profile, guidance, LoRA strength), for every model."""
    def base_for(model: Path | str) -> Path | str | None:
        if len(models) == 1 or detect.detect(model).layout not in ("diffusers", "single-file"):
            return base
        return None

    return [plan(m, base=base_for(m), config=config, **settings) for m in models]


def model_names(paths: Sequence[Path | str]) -> list[str]:
    """A folder name for each model: its file's stem or its folder's name, numbered from -2 when two are alike."""
    names: list[str] = []
    for path in paths:
        resolved = Path(path).resolve()
        stem = resolved.name if resolved.is_dir() else resolved.stem
        name = stem
        for n in itertools.count(2):
            if name not in names:
                break
            name = f"{stem}-{n}"
        names.append(name)
    return names


def preflight(plan: Plan, device: str) -> None:
    """What would stop a render before it starts (the device, the configs and tokenizers), checked in a blink."""
    parse_device(device)
    support_for(plan.model)


def image_name(index: int) -> str:
    return f"image-{index:03d}.png"


@dataclass(frozen=True)
class _Batch:
    """The unit of work a process takes: images of one model rendered together, as one process would batch them,
    so an image is the same whoever renders it."""

    model: int
    jobs: tuple[int, ...]


@dataclass
class _Segment:
    """What one process rendered of one model, and how the pipeline ran."""

    model: int
    images: list[tuple[int, ImageResult]]
    seconds: float
    warmup_seconds: float | None
    peak_gpu_memory_bytes: int | None
    scheduler: dict
    vae_dtype: str
    accelerations: dict


@dataclass
class _Share:
    process: Process
    segments: list[_Segment]


def render(plans: Plan | Sequence[Plan], out: Path | str, *, prompts: Sequence[str] = DEFAULT_PROMPTS,
           seeds: Sequence[int] = (0,), height: int = 1024, width: int = 1024, batch_size: int = 1,
           device: str = "cuda", dtype: str | None = None, accelerations: Accelerations | None = None,
           reference: Path | str | None = None, max_diff: float = checks.DEFAULT_MAX_DIFF, warmup: bool = True,
           overwrite: bool = False) -> RenderReport | ModelsReport | None:
    """Render every prompt x seed of each model with its plan's settings into `out`.

    One `Plan`: PNGs, contact_sheet.png and report.json in `out` (a `RenderReport`). Several: a folder per model
    (`model_names`) holding the same, plus report.json and the comparison sheets in `out` (a `ModelsReport`).
    Under a launcher every process must call this with the same arguments; the main process returns the report,
    the others None. `passed` is False when any image failed a check or differs from the image of the same
    prompt, seed, size and steps in `reference` by more than `max_diff` mean 8-bit levels (`reference`: an earlier
    render of one model, or of several, whose folder of the same name each model then meets). dtype defaults to
    fp16 on CUDA and fp32 on the CPU.
    """
    started = time.perf_counter()
    check_dimensions(height, width)
    if not prompts or not seeds:
        raise UserError("nothing to render: give at least one prompt and one seed")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: must be at least 1")
    single = isinstance(plans, Plan)
    plans = [plans] if single else list(plans)
    if not plans:
        raise UserError("nothing to render: give at least one model")
    world = World.join(device)
    dtype = dtype or ("fp16" if world.device.type == "cuda" else "fp32")
    accelerations = accelerations or Accelerations()
    out = Path(out)
    names = model_names([p.model.path for p in plans])
    jobs = [[checks.Job(prompt, seed, width, height, p.settings.steps) for prompt in prompts for seed in seeds]
            for p in plans]
    batches = [_Batch(m, tuple(range(i, min(i + batch_size, len(jobs[m])))))
               for m in range(len(plans)) for i in range(0, len(jobs[m]), batch_size)]

    with contextlib.ExitStack() as published:
        tmp = references = None
        with world.together():
            if world.is_main:  # only the main process owns the output: complete or absent
                models = [m for p in plans for m in (p.model, p.model.base) if m is not None]
                inputs = [path for m in models for path in (m.path, m.config_dir)] + [reference]
                check_output(out, inputs, overwrite=overwrite)
                tmp = published.enter_context(output(out, overwrite=overwrite)).absolute()
                tmp.mkdir()
                for name in ([] if single else names):
                    (tmp / name).mkdir()
                references = _references(Path(reference), names) if reference is not None else None
        tmp = world.share(tmp)
        folders = [tmp] if single else [tmp / name for name in names]
        with world.together():
            if not tmp.is_dir():
                raise UserError(f"the main process's output folder {tmp} is not visible here: with several "
                                "machines, --out must be on a file system they all share")
            share = _render_share(world, world.split(batches), plans, jobs, folders, TORCH_DTYPES[dtype],
                                  accelerations, height, width, warmup)
        shares = world.gather(share)
        if shares is None:
            return None  # the main process reports

        processes = [s.process for s in shares]
        reports = []
        for m, p in enumerate(plans):
            reports.append(_model_report(
                p, out if single else out / names[m], folders[m], jobs[m],
                [seg for s in shares for seg in s.segments if seg.model == m], processes, dtype=dtype,
                height=height, width=width, batch_size=batch_size,
                reference=None if references is None else (references[m], Path(reference), max_diff)))
        if single:
            return reports[0]
        comparison = compare(tmp, names, [(job.prompt, job.seed) for job in jobs[0]],
                             [[Rendered(folders[m] / image.file, image.passed) for image in r.images]
                              for m, r in enumerate(reports)])
        summaries = [ModelSummary(name, str(r.model["path"]), r.passed, r.steps, len(r.images), len(r.failures()),
                                  r.seconds_per_image) for name, r in zip(names, reports)]
        report = ModelsReport(passed=all(r.passed for r in reports), out=out, world_size=world.size,
                              processes=processes, seconds=round(time.perf_counter() - started, 3),
                              models=summaries, comparison=comparison, reports=reports)
        _write_report(tmp / REPORT, report)
    return report


def _render_share(world: World, batches: Sequence[_Batch], plans: Sequence[Plan], jobs: Sequence[Sequence[checks.Job]],
                  folders: Sequence[Path], dtype: torch.dtype, accelerations: Accelerations, height: int, width: int,
                  warmup: bool) -> _Share:
    """Render this process's batches, model by model (one pipeline at a time), writing each image as it comes:
    its checks need the decoded values before clamping, which only this process has."""
    dev = world.device
    segments = []
    total = sum(len(b.jobs) for b in batches)
    with bar(total, desc="render", unit="image") if world.is_main else tqdm(disable=True) as progress:
        for model, group in itertools.groupby(batches, key=lambda b: b.model):
            group = list(group)
            settings = plans[model].settings
            pipe = prepare(load_pipeline(plans[model].model, dtype), settings, dev, dtype, accelerations)
            warmup_seconds = None
            if warmup:
                start = time.perf_counter()
                render_batch(pipe, settings, _prompts_and_seeds(jobs[model], group[0]), height, width)
                _sync(dev)
                warmup_seconds = round(time.perf_counter() - start, 4)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            images, seconds = [], 0.0
            for batch in group:
                start = time.perf_counter()
                decoded = render_batch(pipe, settings, _prompts_and_seeds(jobs[model], batch), height, width)
                _sync(dev)
                seconds += time.perf_counter() - start
                for j, image in zip(batch.jobs, decoded):
                    job = jobs[model][j]
                    result = ImageResult(image_name(j), job.prompt, job.seed, job.width, job.height, job.steps, True,
                                         checks.image_checks(image), rank=world.rank)
                    Image.fromarray(checks.to_pixels(image)).save(folders[model] / result.file)
                    images.append((j, result))
                progress.update(len(batch.jobs))
            segments.append(_Segment(
                model, images, seconds, warmup_seconds,
                torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None, scheduler_report(pipe.scheduler),
                str(pipe.vae.dtype).removeprefix("torch."), accelerations.as_dict(pipe)))
            del pipe
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the next model's pipeline gets the memory
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return _Share(world.process(device_name), segments)


def _prompts_and_seeds(jobs: Sequence[checks.Job], batch: _Batch) -> list[tuple[str, int]]:
    return [(jobs[j].prompt, jobs[j].seed) for j in batch.jobs]


def _model_report(p: Plan, out: Path, folder: Path, jobs: Sequence[checks.Job], segments: Sequence[_Segment],
                  processes: Sequence[Process], *, dtype: str, height: int, width: int, batch_size: int,
                  reference: tuple[dict | str, Path, float] | None) -> RenderReport:
    """One model's images gathered from every process, checked against the reference, on a contact sheet, in
    its report.json. Reads the images back from `folder`, one model at a time."""
    by_job = dict(image for segment in segments for image in segment.images)
    images = [by_job[j] for j in range(len(jobs))]
    pixels = read_images([folder / result.file for result in images])
    if reference is not None:
        earlier, _, max_diff = reference
        with ThreadPoolExecutor() as pool:
            compared = pool.map(lambda i: {"passed": False, "problem": earlier} if isinstance(earlier, str) else
                                checks.compare_with_reference(jobs[i], pixels[i], earlier, max_diff), range(len(jobs)))
            for result, outcome in zip(images, compared):
                result.reference = outcome
    tiles = []
    for job, result, image in zip(jobs, images, pixels):
        result.passed = not result.failures()
        tiles.append((image, f"seed {job.seed} {'ok' if result.passed else 'FAILED'}: {job.prompt}", result.passed))
    checks.contact_sheet(tiles).save(folder / CONTACT_SHEET)
    first = segments[0]  # every process ran the same scheduler and dtypes
    warmups = [s.warmup_seconds for s in segments if s.warmup_seconds is not None]
    peaks = [s.peak_gpu_memory_bytes for s in segments if s.peak_gpu_memory_bytes is not None]
    report = RenderReport(
        passed=all(image.passed for image in images), out=out, model=p.model.identity(),
        settings_source=p.settings_source, settings=p.settings.as_dict(),
        checkpoint_settings=p.checkpoint_settings.as_dict() if p.checkpoint_settings else None,
        warnings=list(p.warnings), steps=p.settings.steps, guidance_scale=p.settings.guidance_scale,
        scheduler=first.scheduler, device=_distinct(q.device for q in processes),
        device_name=_distinct(q.device_name for q in processes), dtype=dtype, vae_dtype=first.vae_dtype,
        accelerations=first.accelerations, height=height, width=width, batch_size=batch_size,
        seconds_per_image=round(sum(s.seconds for s in segments) / len(images), 4),
        warmup_seconds=max(warmups) if warmups else None, peak_gpu_memory_bytes=max(peaks) if peaks else None,
        reference={"path": str(reference[1]), "max_diff": reference[2]} if reference is not None else None,
        world_size=len(processes), processes=list(processes), images=images, versions=_versions())
    _write_report(folder / REPORT, report)
    return report


def _references(reference: Path, names: Sequence[str]) -> list[dict | str]:
    """What each model is compared with, read now (before the output replaces anything): the folder of its name
    in an earlier render of several models, or else the one earlier render itself. A model the earlier render
    lacks gets the problem to report instead."""
    try:
        earlier = json.loads((reference / REPORT).read_text())
    except (OSError, ValueError):
        earlier = None  # read_reference says what is wrong with it
    if isinstance(earlier, dict) and isinstance(earlier.get("models"), list) and "images" not in earlier:
        rendered = {m.get("name") for m in earlier["models"] if isinstance(m, dict)}
        return [checks.read_reference(reference / name) if name in rendered else
                f"the reference render {reference} has no model {name}" for name in names]
    one = checks.read_reference(reference)
    return [one] * len(names)


def _write_report(path: Path, report: Report) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")


def _distinct(values) -> str:
    return ", ".join(dict.fromkeys(values))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict[str, str | None]:
    import diffusers
    import transformers

    return {"lightning_tools": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda}
