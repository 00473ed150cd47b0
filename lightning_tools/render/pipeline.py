"""A diffusers `StableDiffusionXLPipeline` built from any model render takes, through the one stream.

Every kind opens as a lazy `Checkpoint` (a diffusers folder, an all-in-one file, a UNet-only file completed by
`--base`, a LoRA merged into `--base` exactly as `merge` bakes it) and each component is filled from a state
dict the stream produces, so render samples what our conversions and merges write, reads pickles only through
the safe path, and needs the network for nothing but SDXL's tokenizers when no folder has them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_tools import catalog, support
from lightning_tools.checkpoint import Checkpoint, installed_names, open_checkpoint, with_base
from lightning_tools.errors import UserError
from lightning_tools.lora import modules_of_keys, read_lora
from lightning_tools.merge import apply_plan, plan_merge
from lightning_tools.render.plan import Model
from lightning_tools.sdxl.vocabulary import COMPONENTS
from lightning_tools.stream import LazyTensor, state_dict


@dataclass
class Accelerations:
    """Opt-in speed-ups. SDPA attention is PyTorch 2's default in diffusers and always on."""

    channels_last: bool = False
    compile: bool = False

    def as_dict(self, pipe=None) -> dict:
        out = {"channels_last": self.channels_last, "compile": self.compile}
        if pipe is not None:
            out["attention"] = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
        return out


def checkpoint_for(model: Model) -> Checkpoint:
    """The whole model to render as one lazy checkpoint: a UNet completed by its base, a LoRA merged into it."""
    if model.kind in ("diffusers", "single-file"):
        return open_checkpoint(model.path, model.config_dir)
    assert model.base is not None
    base = checkpoint_for(model.base)
    base_configs = model.base.path if model.base.kind == "diffusers" else model.base.config_dir
    if model.kind == "unet":
        return with_base(open_checkpoint(model.path, model.config_dir or base_configs), base)
    targets = {c: modules_of_keys(t, c) for c, t in base.components.items() if c != "vae"}
    plan = plan_merge(base, [read_lora(model.path, targets, base.configs["unet"])], [1.0])
    if plan.unmatched:
        raise UserError(f"{len(plan.unmatched)} LoRA modules find no weight of the base ({plan.unmatched[0]}); is "
                        "the LoRA for SDXL?", path=model.path)
    return apply_plan(base, plan, torch.float32, "cpu", None)


def load_pipeline(model: Model, dtype: torch.dtype = torch.float16):
    """A `StableDiffusionXLPipeline` on the CPU for `model`, weights in `dtype`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    ckpt = checkpoint_for(model)
    if ckpt.missing:
        raise UserError(f"has no {', '.join(ckpt.missing)} to render with; pass --base", path=model.path)
    files = support_for(model)
    parts = {c: build_component(c, ckpt.components[c], ckpt.configs[c], dtype, model.path) for c in COMPONENTS}
    tokenizers = {name: CLIPTokenizer.from_pretrained(files[f"{name}/tokenizer_config.json"].parent)
                  for name in ("tokenizer", "tokenizer_2")}
    scheduler_config = json.loads(files["scheduler/scheduler_config.json"].read_text())
    return StableDiffusionXLPipeline(**parts, **tokenizers,
                                     scheduler=EulerDiscreteScheduler.from_config(scheduler_config))


def support_for(model: Model) -> dict[str, Path]:
    """The tokenizers, scheduler and model_index the pipeline needs (see `support`): the model's own folder, its
    base's, or --config, before the SDXL base repo."""
    full = model if model.base is None else model.base
    own = full.path if full.kind == "diffusers" else None
    return support.support_files(config_dir=model.config_dir or full.config_dir, source_dir=own,
                                 needed_by=model.path)


def build_component(component: str, tensors: Mapping[str, LazyTensor], config: Mapping, dtype: torch.dtype,
                    path: Path) -> torch.nn.Module:
    """One diffusers/transformers model from its config, its weights streamed in (floating ones cast to
    `dtype`). Parameters are never allocated twice: the model is built empty and takes the tensors as they are."""
    from accelerate import init_empty_weights

    state = state_dict(installed_names(component, tensors, config), dtype, desc=component)
    with init_empty_weights(include_buffers=False):
        module = _empty(component, config)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"the {COMPONENTS[component].title} does not fit its config ({last[:300]}); is --base an "
                        "SDXL base, or does --config match this model?", path=path) from None
    return module.eval()


def _empty(component: str, config: Mapping) -> torch.nn.Module:
    if component == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(dict(config))
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(dict(config))
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    return cls(CLIPTextConfig.from_dict(dict(config)))


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
