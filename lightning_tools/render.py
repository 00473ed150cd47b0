"""Validation renders with the sampler settings a Lightning checkpoint was distilled for.

The last gate before a merged or converted checkpoint ships: render a fixed prompt set with the checkpoint's own
settings (Euler, trailing timesteps, no CFG, its step count and prediction type), check every image is sane,
optionally compare with a previous render, and write a report a CI job can gate on.

Two phases so warnings come before any slow work: `plan()` reads headers only (what the model is and how it must
be sampled), `render()` loads it with diffusers, renders and writes the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_tools import catalog, checkpoint, hub, lora
from lightning_tools.errors import ChecksFailed, UserError
from lightning_tools.progress import bar
from lightning_tools.sdxl import detect
from lightning_tools.tensors import HASH_KEY, TensorSource, atomic_output, read_header, weight_files

DEFAULT_PROMPTS = (
    "A girl smiling",
    "a red fox in fresh snow, telephoto photograph",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen on a wooden table, studio lighting",
)
DEFAULT_STEPS = 4
DEFAULT_MAX_DIFF = 3.0  # mean absolute difference to the reference, in 8-bit levels (0-255)
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Image checks. The VAE decodes to [-1, 1]; real SDXL images overshoot a little (white backgrounds reach ~1.1),
# while an fp16 overflow, a wrong prediction type or a broken merge gives NaNs, flat images or values far out.
RANGE_LIMIT = 1.5
MAX_OUT_OF_RANGE = 0.05  # fraction of values allowed beyond +-RANGE_LIMIT
MIN_STD = 0.01  # pixel standard deviation on a 0-1 scale; below it the image is blank


@dataclass(frozen=True)
class Model:
    """What is rendered, seen from headers only. `kind`: diffusers | single-file | unet | lora."""

    path: Path
    kind: str
    layout: str
    metadata: dict[str, str]
    sha256: str | None = None
    base: Model | None = None
    config_dir: Path | None = None  # diffusers configs + tokenizers for a single file

    def identity(self) -> dict:
        out = {"path": str(self.path), "kind": self.kind, "layout": self.layout, "sha256": self.sha256,
               "data_sha256": self.metadata.get(HASH_KEY) or None}
        if self.base is not None:
            out["base"] = self.base.identity()
        if self.config_dir is not None:
            out["config_dir"] = str(self.config_dir)
        return out


@dataclass(frozen=True)
class Plan:
    """A model and the settings it will be sampled with; `warnings` name the right setting for each mismatch."""

    model: Model
    settings: catalog.Settings
    checkpoint_settings: catalog.Settings | None
    settings_source: str | None
    warnings: tuple[str, ...] = ()


@dataclass
class RenderedImage:
    prompt: str
    seed: int
    pixels: np.ndarray  # H x W x 3 uint8
    checks: dict[str, dict]
    reference: dict | None = None

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values()) and (self.reference is None or self.reference["passed"])


@dataclass
class Accelerations:
    """Opt-in speed-ups. SDPA attention is PyTorch 2's default in diffusers and always on."""

    channels_last: bool = False
    compile: bool = False

    def as_dict(self, pipe=None) -> dict:
        out = dataclasses.asdict(self)
        if pipe is not None:
            processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
            out["attention"] = sorted(processors)
        return out


# ---------------------------------------------------------------- planning (headers only)

def open_model(path: Path | str, base: Path | str | None = None, config: Path | str | None = None,
               loadable: bool = True) -> Model:
    """Tell what `path` is (diffusers folder, all-in-one file, UNet-only file, LoRA) and check `--base` fits.

    `loadable` also finds the configs and tokenizers an all-in-one file needs, so a render fails before any work;
    the ComfyUI export reads headers only and does without them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    kind, layout = _kind(path)
    base_model = open_model(base, config=config, loadable=loadable) if base is not None else None
    if kind in ("unet", "lora"):
        if base_model is None:
            what = "a UNet-only file" if kind == "unet" else "a LoRA"
            raise UserError(f"{path}: {what} needs a full SDXL model for the VAE and text encoders; pass --base "
                            "(a diffusers folder or an all-in-one .safetensors)")
        if base_model.kind not in ("diffusers", "single-file"):
            raise UserError(f"{base}: --base must be a full SDXL model (a diffusers folder or an all-in-one "
                            f".safetensors), not {base_model.kind} ({base_model.layout})")
    elif base_model is not None:
        raise UserError(f"{base}: --base is for UNet-only files and LoRAs; {path} is a complete model already")
    needs_configs = loadable and kind == "single-file"
    config_dir = _config_dir(path, Path(config) if config else None) if needs_configs else None
    return Model(path=path, kind=kind, layout=layout, metadata=_metadata(path, kind), sha256=_known_sha256(path),
                 base=base_model, config_dir=config_dir)


_KINDS = {"diffusers": "diffusers", "single-file": "single-file", "unet-diffusers": "unet",
          "unet-single-file": "unet", "lora": "lora"}


def _kind(path: Path) -> tuple[str, str]:
    """(kind, layout): the layout as `sdxl.detect` names it; for a LoRA, its key format."""
    found = detect.detect(path)
    if found.layout == "lora":
        return "lora", lora.detect_lora_format(read_header(path)[0]) or "lora"
    if found.layout not in _KINDS:
        raise UserError(f"{path}: not an SDXL model, UNet or LoRA that render can load ({found.layout})")
    if found.architecture != "sdxl-base":
        raise UserError(f"{path}: looks like {found.description} ({found.layout}); render supports SDXL base "
                        "models (SDXL-Lightning included)")
    return _KINDS[found.layout], found.layout


def _metadata(path: Path, kind: str) -> dict[str, str]:
    """The safetensors metadata that describes the model: the file's, or a diffusers folder's UNet weights'."""
    return dict(TensorSource.open(path / "unet" if kind == "diffusers" else path).metadata)


def _known_sha256(path: Path) -> str | None:
    """The file's sha256 when a fetch recorded it; render never hashes multi-GB files itself."""
    entry = hub.manifest_entry(path) if path.is_file() else None
    return entry.get("sha256") if entry else None


def _config_dir(path: Path, config: Path | None) -> Path:
    """Diffusers configs with tokenizers for `from_single_file`: --config, or a cached copy of the SDXL base repo
    (the bundled configs have no tokenizers). Never the network: diffusers would download when a repo id misses
    the cache."""
    if config is not None:
        if not _has_tokenizers(config):
            raise UserError(f"{config}: --config needs a diffusers SDXL folder with model_index.json, tokenizer/ and "
                            "tokenizer_2/ (configs and tokenizers are enough, no weights)")
        return config
    with contextlib.suppress(Exception):  # not in the local hub cache
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(catalog.SDXL_BASE_REPO, local_files_only=True,
                                        cache_dir=hub.HubEnv.current().cache_dir))
        if _has_tokenizers(cached):
            return cached
    raise UserError(f"{path}: rendering an all-in-one file needs the SDXL tokenizers, which are not available "
                    f"offline; pass --config DIR (a diffusers copy of {catalog.SDXL_BASE_REPO}: configs and "
                    "tokenizers)")


def _has_tokenizers(folder: Path) -> bool:
    return all((folder / p).exists() for p in ("model_index.json", "tokenizer", "tokenizer_2"))


def plan(model: Path | str, base: Path | str | None = None, config: Path | str | None = None,
         steps: int | None = None, prediction_type: str | None = None,
         guidance_scale: float | None = None, loadable: bool = True) -> Plan:
    """Resolve how `model` must be sampled: its own settings, overridden by the given ones, with warnings."""
    m = open_model(model, base, config, loadable)
    found = catalog.settings_for(m.path, m.metadata, m.sha256)
    ckpt, source = found if found else (None, None)
    return resolve(m, ckpt, source, steps, prediction_type, guidance_scale)


def resolve(model: Model, ckpt: catalog.Settings | None, source: str | None, steps: int | None,
            prediction_type: str | None, guidance_scale: float | None) -> Plan:
    """Merge the checkpoint's settings with explicit ones; every disagreement becomes a warning naming the fix."""
    name = model.path.name
    warnings = []
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    if ckpt is None and steps is None:
        warnings.append(f"{name}: nothing says how many steps it was distilled for (no lightning metadata, not in "
                        f"the catalogue, no _Nstep in the name); rendering {DEFAULT_STEPS} steps, pass --steps N")
    used_steps = steps or (ckpt.steps if ckpt else DEFAULT_STEPS)
    used_prediction = prediction_type or (ckpt.prediction_type if ckpt else "epsilon")
    used_guidance = guidance_scale if guidance_scale is not None else (ckpt.guidance_scale if ckpt else 0.0)
    if ckpt is not None and used_steps != ckpt.steps:
        warnings.append(f"{name} was distilled for {ckpt.steps} steps ({source}) but renders at {used_steps}; "
                        f"use --steps {ckpt.steps}")
    if ckpt is not None and used_prediction != ckpt.prediction_type:
        warnings.append(f"{name} predicts {_describe_prediction(ckpt.prediction_type)} ({source}) but renders "
                        f"with prediction_type {used_prediction}; use --prediction-type {ckpt.prediction_type}")
    if used_guidance > 1:
        warnings.append(f"guidance scale {used_guidance:g} turns classifier-free guidance on, but Lightning models "
                        "are distilled without it; use --guidance-scale 0 (CFG 1 in ComfyUI)")
    base = ckpt if ckpt is not None else catalog.Settings(steps=used_steps, prediction_type=used_prediction)
    settings = dataclasses.replace(base, steps=used_steps, prediction_type=used_prediction,
                                   guidance_scale=used_guidance)
    return Plan(model, settings, ckpt, source, tuple(warnings))


def _describe_prediction(prediction_type: str) -> str:
    return "the clean image (x0, prediction_type sample)" if prediction_type == "sample" else "noise (epsilon)"


# ---------------------------------------------------------------- loading

@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """diffusers and transformers print progress bars and notices while loading; keep stderr for our own."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in before:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bars in before:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def load_pipeline(model: Model, dtype: torch.dtype = torch.float16):
    """A `StableDiffusionXLPipeline` on the CPU for `model`, the way the model card loads each kind."""
    with _quiet_loaders():
        if model.kind in ("diffusers", "single-file"):
            return _load_full(model, dtype)
        if model.kind == "unet":
            return _load_full(model.base, dtype, unet=_load_unet(model, dtype))
        pipe = _load_full(model.base, dtype)
        pipe.load_lora_weights(str(model.path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers from the forward pass
        return pipe


def _load_full(model: Model, dtype: torch.dtype, **components):
    from diffusers import StableDiffusionXLPipeline

    if model.kind == "diffusers":
        variant = "fp16" if ".fp16." in weight_files(model.path / "unet")[0].name else None
        return StableDiffusionXLPipeline.from_pretrained(model.path, dtype=dtype, variant=variant,
                                                         local_files_only=True, **components)
    return StableDiffusionXLPipeline.from_single_file(str(model.path), config=str(model.config_dir), dtype=dtype,
                                                      local_files_only=True, **components)


def _config_root(base: Model) -> Path:
    """The folder holding the base's component configs."""
    return base.path if base.kind == "diffusers" else base.config_dir


def _load_unet(model: Model, dtype: torch.dtype):
    """The base's UNet architecture with the file's weights, cast one tensor at a time (peak: the model)."""
    from diffusers import UNet2DConditionModel

    ckpt = checkpoint.open_checkpoint(model.path, config_dir=_config_root(model.base))
    tensors = ckpt.components["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ckpt.configs["unet"])
    expected = set(unet.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"{model.path}: does not fit the base's UNet ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors, e.g. {example}); is --base an SDXL base?")
    state = {}
    with bar(len(tensors), desc="unet", unit="tensor") as progress:
        for key, tensor in tensors.items():
            state[key] = tensor.load().to(dtype)
            progress.update(1)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{model.path}: tensor shapes do not fit the base's UNet ({_last_line(e)})") from None
    return unet.eval()


def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1].strip()


# ---------------------------------------------------------------- device and sampler

def check_device(device: str) -> torch.device:
    """Fail in one line, before any loading, when the device cannot be used."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; use cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise UserError(f"--device {device}: CUDA is not available ({why}); pass --device cpu for a small CPU "
                        "render (e.g. --height 256 --width 256)")
    if dev.type not in ("cuda", "cpu"):
        raise UserError(f"--device {device}: only cuda and cpu are supported")
    return dev


def lightning_scheduler(config, settings: catalog.Settings):
    """The model card's scheduler: the base's scheduler config with trailing spacing and the model's prediction."""
    import diffusers

    return getattr(diffusers, settings.scheduler).from_config(settings.scheduler_config(dict(config)))


def prepare(pipe, settings: catalog.Settings, device: torch.device, dtype: torch.dtype,
            accelerations: Accelerations | None = None):
    """Put the Lightning scheduler in, move to `device`, keep a VAE that overflows in fp16 in fp32, speed up."""
    pipe.scheduler = lightning_scheduler(pipe.scheduler.config, settings)
    pipe.to(device)
    # diffusers upcasts such a VAE inside every call and casts it back afterwards; keeping it in fp32 decodes
    # the same way without moving its weights twice per call. An fp16-fix VAE (force_upcast false) stays fp16.
    if dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    accelerations = accelerations or Accelerations()
    if accelerations.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if accelerations.compile:
        pipe.unet.compile(fullgraph=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_batch(pipe, settings: catalog.Settings, batch: Sequence[tuple[str, int]], height: int,
                 width: int) -> torch.Tensor:
    """Decoded images (B x 3 x H x W, float32 on the CPU, nominally in [-1, 1]) before any clamping, so checks
    see NaNs and overflow. One CPU generator per image: an image depends on its seed, not on the batch or device."""
    generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
    with torch.inference_mode():
        latents = pipe(prompt=[prompt for prompt, _ in batch], num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance_scale, height=height, width=width, generator=generators,
                       output_type="latent").images
        vae = pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return decoded.float().cpu()


def scheduler_report(scheduler) -> dict:
    """The scheduler exactly as it ran: class, spacing, prediction type, the timesteps and sigmas it used."""
    config = dict(scheduler.config)
    return {"class": type(scheduler).__name__, "timestep_spacing": config.get("timestep_spacing"),
            "prediction_type": config.get("prediction_type"),
            "timesteps": [round(float(t), 4) for t in scheduler.timesteps],
            "sigmas": [round(float(s), 6) for s in scheduler.sigmas], "config": config}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- checks

def image_checks(decoded: torch.Tensor) -> dict[str, dict]:
    """Sanity of one decoded image (3 x H x W): finite, not blank, values in the VAE's range."""
    finite = bool(torch.isfinite(decoded).all())
    x = torch.nan_to_num(decoded.float(), nan=0.0, posinf=0.0, neginf=0.0)
    std = float((x / 2 + 0.5).clamp(0, 1).std())
    out_of_range = float((x.abs() > RANGE_LIMIT).float().mean())
    return {
        "finite": {"passed": finite},
        "not_blank": {"passed": std >= MIN_STD, "std": round(std, 5), "min_std": MIN_STD},
        "value_range": {"passed": out_of_range <= MAX_OUT_OF_RANGE, "min": round(float(x.min()), 4),
                        "max": round(float(x.max()), 4), "out_of_range": round(out_of_range, 5),
                        "limit": RANGE_LIMIT, "max_out_of_range": MAX_OUT_OF_RANGE},
    }


def to_pixels(decoded: torch.Tensor) -> np.ndarray:
    """3 x H x W in [-1, 1] -> H x W x 3 uint8, rounded the way diffusers' image processor does."""
    x = torch.nan_to_num(decoded.float(), nan=0.0)
    return (x / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def image_difference(pixels: np.ndarray, reference: np.ndarray) -> dict:
    """Mean absolute difference in 8-bit levels and PSNR in dB (None when identical)."""
    diff = pixels.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff ** 2))
    psnr = None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 3)
    return {"mean_abs_diff": round(float(np.mean(np.abs(diff))), 4), "psnr_db": psnr}


def read_reference(folder: Path) -> list[dict]:
    """A previous render's image list, with pixels, so the reference may even be the output being replaced."""
    report_path = Path(folder) / "report.json"
    try:
        entries = json.loads(report_path.read_text())["images"]
    except FileNotFoundError:
        raise UserError(f"{report_path}: not found; --reference takes the output folder of an earlier render") \
            from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{report_path}: not a render report (no images list)") from None
    for entry in entries:
        path = Path(folder) / entry["file"]
        entry["pixels"] = np.asarray(Image.open(path).convert("RGB")) if path.is_file() else None
    return entries


def compare_with_reference(pixels: np.ndarray, entry: dict | None, max_diff: float) -> dict:
    if entry is None or entry["pixels"] is None:
        return {"passed": False, "problem": "no reference image at this position"}
    if entry["pixels"].shape != pixels.shape:
        return {"passed": False, "problem": f"reference is {entry['pixels'].shape[1]}x{entry['pixels'].shape[0]}, "
                                            f"this image {pixels.shape[1]}x{pixels.shape[0]}"}
    result = image_difference(pixels, entry["pixels"])
    result.update(passed=result["mean_abs_diff"] <= max_diff, max_diff=max_diff, file=entry["file"],
                  reference_prompt=entry.get("prompt"), reference_seed=entry.get("seed"))
    return result


# ---------------------------------------------------------------- outputs

def contact_sheet(images: Sequence[RenderedImage], thumb: int = 256) -> Image.Image:
    """All images in a grid, each labelled with its seed, verdict and the start of its prompt."""
    cols = max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / cols)
    label_h = 28
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        tile = Image.fromarray(image.pixels)
        tile.thumbnail((thumb, thumb))
        x, y = (i % cols) * thumb, (i // cols) * (thumb + label_h)
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y))
        verdict = "ok" if image.passed else "FAILED"
        draw.text((x + 4, y + thumb + 2), f"seed {image.seed}  {verdict}", fill="red" if not image.passed else "black")
        draw.text((x + 4, y + thumb + 14), image.prompt[: thumb // 6], fill="black")
    return sheet


def check_dimensions(height: int, width: int) -> None:
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise UserError(f"--height {height} --width {width}: both must be positive multiples of 8")


def image_name(index: int) -> str:
    return f"image-{index:03d}.png"


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts in it (one per line)")
    return prompts


def render(plan: Plan, out: Path | str, prompts: Sequence[str] = DEFAULT_PROMPTS, seeds: Sequence[int] = (0,),
           height: int = 1024, width: int = 1024, batch_size: int = 1, device: str = "cuda",
           dtype: str | None = None, accelerations: Accelerations | None = None, reference: Path | str | None = None,
           max_diff: float = DEFAULT_MAX_DIFF, warmup: bool = True, overwrite: bool = False) -> dict:
    """Render every prompt x seed with `plan`'s settings into `out` (PNGs, contact_sheet.png, report.json).

    Returns the report; `report["passed"]` is False when any image failed a check or differs from `reference`
    by more than `max_diff` mean 8-bit levels. dtype defaults to fp16 on CUDA and fp32 on the CPU.
    """
    check_dimensions(height, width)
    if not prompts or not seeds:
        raise UserError("nothing to render: give at least one prompt and one seed")
    dev = check_device(device)
    dtype = dtype or ("fp16" if dev.type == "cuda" else "fp32")
    torch_dtype = TORCH_DTYPES[dtype]
    accelerations = accelerations or Accelerations()
    references = read_reference(Path(reference)) if reference is not None else None
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]

    with atomic_output(Path(out), overwrite) as tmp:
        pipe = prepare(load_pipeline(plan.model, torch_dtype), plan.settings, dev, torch_dtype, accelerations)
        warmup_seconds = None
        if warmup:
            start = time.perf_counter()
            render_batch(pipe, plan.settings, batches[0], height, width)
            _sync(dev)
            warmup_seconds = round(time.perf_counter() - start, 4)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        decoded: list[torch.Tensor] = []
        start = time.perf_counter()
        with bar(len(jobs), desc="render", unit="image") as progress:
            for batch in batches:
                decoded.extend(render_batch(pipe, plan.settings, batch, height, width))
                progress.update(len(batch))
        _sync(dev)
        seconds_per_image = (time.perf_counter() - start) / len(jobs)

        images = []
        for i, ((prompt, seed), image) in enumerate(zip(jobs, decoded)):
            rendered = RenderedImage(prompt, seed, to_pixels(image), image_checks(image))
            if references is not None:
                entry = references[i] if i < len(references) else None
                rendered.reference = compare_with_reference(rendered.pixels, entry, max_diff)
            images.append(rendered)

        tmp.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image.pixels).save(tmp / image_name(i))
        contact_sheet(images).save(tmp / "contact_sheet.png")
        report = {
            "passed": all(image.passed for image in images),
            "out": str(Path(out)),
            "model": plan.model.identity(),
            "settings_source": plan.settings_source,
            "settings": plan.settings.as_dict(),
            "checkpoint_settings": plan.checkpoint_settings.as_dict() if plan.checkpoint_settings else None,
            "warnings": list(plan.warnings),
            "steps": plan.settings.steps,
            "guidance_scale": plan.settings.guidance_scale,
            "scheduler": scheduler_report(pipe.scheduler),
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "dtype": dtype,
            "vae_dtype": str(pipe.vae.dtype).removeprefix("torch."),
            "accelerations": accelerations.as_dict(pipe),
            "height": height,
            "width": width,
            "batch_size": batch_size,
            "seconds_per_image": round(seconds_per_image, 4),
            "warmup_seconds": warmup_seconds,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "reference": {"path": str(reference), "max_diff": max_diff} if reference is not None else None,
            "images": [{"file": image_name(i), "prompt": image.prompt, "seed": image.seed, "passed": image.passed,
                        "checks": image.checks, "reference": image.reference} for i, image in enumerate(images)],
            "versions": _versions(),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def summary(report: dict) -> str:
    """A few lines for people: what ran, how fast, whether it passed."""
    scheduler = report["scheduler"]
    memory = report["peak_gpu_memory_bytes"]
    lines = [f"rendered {len(report['images'])} images of {report['model']['path']} into {report['out']}",
             f"  {report['steps']} steps, {scheduler['class']} {scheduler['timestep_spacing']} "
             f"{scheduler['prediction_type']}, timesteps {scheduler['timesteps']}, "
             f"guidance {report['guidance_scale']:g} (settings from {report['settings_source'] or 'defaults'})",
             f"  {report['device']} {report['dtype']}: {report['seconds_per_image']:.3f} s/image"
             + (f", peak GPU memory {memory / 2**30:.2f} GiB" if memory else "")]
    failed = failures(report)
    lines.append("  checks: all passed" if not failed else f"  checks: {len(failed)} images FAILED")
    return "\n".join(lines)


def failures(report: dict) -> list[str]:
    """One short phrase per failed image, for the one-line error."""
    out = []
    for image in report["images"]:
        failed = [name for name, check in image["checks"].items() if not check["passed"]]
        ref = image.get("reference")
        if ref and not ref["passed"]:
            failed.append(ref.get("problem") or f"differs from reference by {ref['mean_abs_diff']:g} levels "
                                                 f"(max {ref['max_diff']:g})")
        if failed:
            out.append(f"{image['file']}: {', '.join(failed)}")
    return out


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    from lightning_tools import __version__

    return {"lightning_tools": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda}
