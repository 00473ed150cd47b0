"""`render`: validation images with the sampler settings a checkpoint was distilled for, checked, in a report.

The last gate before a merged or converted checkpoint ships: render a fixed prompt set with the checkpoint's own
sampling profile (its family's scheduler, timesteps, guidance and eta at its step count), check every image is sane,
optionally compare each with the image of the same prompt and seed in a previous render, and write a report a
CI job can gate on (exit 3 when an image fails).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lightning_tools import __version__
from lightning_tools.device import parse_device
from lightning_tools.errors import UserError
from lightning_tools.progress import bar
from lightning_tools.render import checks
from lightning_tools.render.pipeline import (Accelerations, load_pipeline, prepare, render_batch, scheduler_report,
                                             support_for)
from lightning_tools.render.plan import Plan
from lightning_tools.report import Report
from lightning_tools.tensors import atomic_output

DEFAULT_PROMPTS = (
    "A girl smiling",
    "a red fox in fresh snow, telephoto photograph",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen on a wooden table, studio lighting",
)
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONTACT_SHEET = "contact_sheet.png"


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

    def failures(self) -> list[str]:
        failed = [name for name, check in self.checks.items() if not check["passed"]]
        if self.reference and not self.reference["passed"]:
            failed.append(self.reference.get("problem") or f"differs from reference by "
                          f"{self.reference['mean_abs_diff']:g} levels (max {self.reference['max_diff']:g})")
        return failed


@dataclass
class RenderReport(Report):
    """What `report.json` holds: the model, the settings and scheduler as they ran, timing, every image."""

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
    images: list[ImageResult] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)

    def failures(self) -> list[str]:
        """One short phrase per failed image, for the one-line error."""
        return [f"{image.file}: {', '.join(image.failures())}" for image in self.images if not image.passed]

    def describe(self) -> str:
        scheduler = self.scheduler
        memory = self.peak_gpu_memory_bytes
        settings, strength = self.settings, self.model.get("lora_strength")
        lines = [f"rendered {len(self.images)} images of {self.model['path']} into {self.out}",
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


def preflight(plan: Plan, device: str) -> None:
    """What would stop a render before it starts (the device, the configs and tokenizers), checked in a blink."""
    parse_device(device)
    support_for(plan.model)


def image_name(index: int) -> str:
    return f"image-{index:03d}.png"


def render(plan: Plan, out: Path | str, *, prompts: Sequence[str] = DEFAULT_PROMPTS, seeds: Sequence[int] = (0,),
           height: int = 1024, width: int = 1024, batch_size: int = 1, device: str = "cuda",
           dtype: str | None = None, accelerations: Accelerations | None = None, reference: Path | str | None = None,
           max_diff: float = checks.DEFAULT_MAX_DIFF, warmup: bool = True, overwrite: bool = False) -> RenderReport:
    """Render every prompt x seed with `plan`'s settings into `out` (PNGs, contact_sheet.png, report.json).

    `report.passed` is False when any image failed a check or differs from the image of the same prompt, seed,
    size and steps in `reference` by more than `max_diff` mean 8-bit levels. dtype defaults to fp16 on CUDA and
    fp32 on the CPU.
    """
    check_dimensions(height, width)
    if not prompts or not seeds:
        raise UserError("nothing to render: give at least one prompt and one seed")
    dev = parse_device(device)
    dtype = dtype or ("fp16" if dev.type == "cuda" else "fp32")
    torch_dtype = TORCH_DTYPES[dtype]
    accelerations = accelerations or Accelerations()
    references = checks.read_reference(Path(reference)) if reference is not None else None
    settings = plan.settings
    jobs = [checks.Job(prompt, seed, width, height, settings.steps) for prompt in prompts for seed in seeds]
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]

    with atomic_output(Path(out), overwrite) as tmp:
        pipe = prepare(load_pipeline(plan.model, torch_dtype), settings, dev, torch_dtype, accelerations)
        warmup_seconds = None
        if warmup:
            start = time.perf_counter()
            render_batch(pipe, settings, [(j.prompt, j.seed) for j in batches[0]], height, width)
            _sync(dev)
            warmup_seconds = round(time.perf_counter() - start, 4)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        decoded: list[torch.Tensor] = []
        start = time.perf_counter()
        with bar(len(jobs), desc="render", unit="image") as progress:
            for batch in batches:
                decoded.extend(render_batch(pipe, settings, [(j.prompt, j.seed) for j in batch], height, width))
                progress.update(len(batch))
        _sync(dev)
        seconds_per_image = (time.perf_counter() - start) / len(jobs)

        tmp.mkdir()
        images, tiles = [], []
        for i, (job, image) in enumerate(zip(jobs, decoded)):
            pixels = checks.to_pixels(image)
            result = ImageResult(image_name(i), job.prompt, job.seed, job.width, job.height, job.steps, True,
                                 checks.image_checks(image))
            if references is not None:
                result.reference = checks.compare_with_reference(job, pixels, references, max_diff)
            result.passed = not result.failures()
            images.append(result)
            Image.fromarray(pixels).save(tmp / result.file)
            tiles.append((pixels, f"seed {job.seed} {'ok' if result.passed else 'FAILED'}: {job.prompt}",
                          result.passed))
        checks.contact_sheet(tiles).save(tmp / CONTACT_SHEET)
        report = RenderReport(
            passed=all(image.passed for image in images), out=Path(out), model=plan.model.identity(),
            settings_source=plan.settings_source, settings=settings.as_dict(),
            checkpoint_settings=plan.checkpoint_settings.as_dict() if plan.checkpoint_settings else None,
            warnings=list(plan.warnings), steps=settings.steps, guidance_scale=settings.guidance_scale,
            scheduler=scheduler_report(pipe.scheduler), device=str(dev),
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            dtype=dtype, vae_dtype=str(pipe.vae.dtype).removeprefix("torch."),
            accelerations=accelerations.as_dict(pipe), height=height, width=width, batch_size=batch_size,
            seconds_per_image=round(seconds_per_image, 4), warmup_seconds=warmup_seconds,
            peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            reference={"path": str(reference), "max_diff": max_diff} if reference is not None else None,
            images=images, versions=_versions())
        (tmp / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict[str, str | None]:
    import diffusers
    import transformers

    return {"lightning_tools": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda}
