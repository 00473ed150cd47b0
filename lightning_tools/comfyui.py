"""The ComfyUI equivalent of a render: KSampler settings and a minimal API-format workflow for the model.

The sampler and scheduler follow the model's family profile (lightning_tools/families: euler + sgm_uniform for
SDXL-Lightning, ddim for Hyper-SD and PCM, lcm for DMD2 and LCM-LoRA, ...). Where core ComfyUI has no equivalent
(TCD's sampler, a schedule starting at one chosen timestep) the export says so and names the custom node instead
of writing a workflow that would sample wrongly. ComfyUI samples SDXL with eps prediction unless told otherwise;
the 1-step x0 model needs a `ModelSamplingDiscrete` node with sampling "x0" (the node the official 1-step
workflow uses). Diffusers' `guidance_scale=0` (no CFG) is ComfyUI's cfg 1.0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tools import loaders
from lightning_tools.errors import UserError
from lightning_tools.lora import read_lora
from lightning_tools.render.plan import Model, Plan
from lightning_tools.report import Report
from lightning_tools.sampling import Sampling
from lightning_tools.outputs import output

DEFAULT_PROMPT = "A girl smiling"


def file_names(model: Model) -> tuple[dict[str, str], list[str]]:
    """The names the workflow's loaders use (files in ComfyUI's models/ folders), and notes on what to do first."""
    notes = []
    if model.kind == "diffusers":
        notes.append(f"{model.path}: ComfyUI loads single files; convert this diffusers folder to one first "
                     "(lightning-tools convert) and put it in models/checkpoints")
        return {"checkpoint": model.path.name + ".safetensors"}, notes
    if model.kind == "single-file":
        return {"checkpoint": model.path.name}, notes
    base, base_notes = file_names(model.base)
    notes += base_notes
    role = "unet" if model.kind == "unet" else "lora"
    folder = "models/unet (or models/diffusion_models)" if role == "unet" else "models/loras"
    name = model.path.name if role == "unet" else _lora_for_comfyui(model.path, notes)
    notes.append(f"put {name} in ComfyUI's {folder} and {base['checkpoint']} in models/checkpoints")
    return {"checkpoint": base["checkpoint"], role: name}, notes


def _lora_for_comfyui(path: Path, notes: list[str]) -> str:
    """The LoRA file ComfyUI's LoraLoader applies completely, at alpha/rank: this one, or the kohya copy that
    `convert --to kohya` writes beside it (a peft file loses its attention modules and alphas there); without
    such a copy, one line with the command that makes it."""
    advice = loaders.comfyui_ready(read_lora(path))
    if advice is None:
        return path.name
    if advice.copy is not None and advice.copy.is_file() and loaders.comfyui_ready(read_lora(advice.copy)) is None:
        notes.append(f"{path.name} is for diffusers/peft: the workflow uses its kohya copy {advice.copy.name}")
        return advice.copy.name
    raise UserError(str(advice))


def workflow(model: Model, settings: Sampling, prompt: str, seed: int = 0, width: int = 1024,
             height: int = 1024) -> dict[str, dict]:
    """A minimal ComfyUI API-format workflow (node id -> class_type and inputs; links are [node id, output]).
    Refused where core ComfyUI cannot sample like the profile."""
    if not settings.comfyui_core:
        raise UserError(f"{model.path.name} samples as {settings.family.title} {settings.profile.name}, which core "
                        f"ComfyUI has no equivalent for: {settings.comfyui()['custom_node']}; a KSampler workflow "
                        "would sample it wrongly, so none was written (--print-comfyui shows what to set)")
    names, _ = file_names(model)
    sampler = settings.comfyui()
    strength = 1.0 if model.lora_strength is None else model.lora_strength
    nodes: dict[str, dict] = {}

    def add(class_type: str, **inputs: Any) -> str:
        node_id = str(len(nodes) + 1)
        nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    loader = add("CheckpointLoaderSimple", ckpt_name=names["checkpoint"])
    unet, clip, vae = [loader, 0], [loader, 1], [loader, 2]
    if "unet" in names:
        unet = [add("UNETLoader", unet_name=names["unet"], weight_dtype="default"), 0]
    if "lora" in names:
        lora = add("LoraLoader", model=unet, clip=clip, lora_name=names["lora"], strength_model=strength,
                   strength_clip=strength)
        unet, clip = [lora, 0], [lora, 1]
    if sampler["model_sampling"]:
        unet = [add("ModelSamplingDiscrete", model=unet, sampling=sampler["model_sampling"], zsnr=False), 0]
    positive = add("CLIPTextEncode", text=prompt, clip=clip)
    negative = add("CLIPTextEncode", text="", clip=clip)  # required input; ignored at cfg 1
    latent = add("EmptyLatentImage", width=width, height=height, batch_size=1)
    samples = add("KSampler", seed=seed, steps=sampler["steps"], cfg=sampler["cfg"],
                  sampler_name=sampler["sampler_name"], scheduler=sampler["scheduler"], denoise=sampler["denoise"],
                  model=unet, positive=[positive, 0], negative=[negative, 0], latent_image=[latent, 0])
    image = add("VAEDecode", samples=[samples, 0], vae=vae)
    add("SaveImage", images=[image, 0], filename_prefix=f"lightning-{model.path.stem}")
    return nodes


@dataclass
class ComfyUIExport(Report):
    """The ComfyUI equivalent of a render: sampler settings, what to load, and the workflow file if written."""

    model: dict
    settings: dict
    comfyui: dict
    core_equivalent: bool  # False: core ComfyUI cannot sample like this; `comfyui["custom_node"]` says what can
    warnings: list[str]
    text: str
    workflow: Path | None = None

    def describe(self) -> str:
        return self.text + (f"\nwrote {self.workflow} (ComfyUI API format)" if self.workflow else "")


def export(plan: Plan, *, prompt: str | None = None, seed: int = 0, width: int = 1024, height: int = 1024,
           workflow_path: Path | None = None, overwrite: bool = False) -> ComfyUIExport:
    """The ComfyUI settings for `plan`, and the workflow written to `workflow_path` when given."""
    if workflow_path is not None:
        flow = workflow(plan.model, plan.settings, prompt or DEFAULT_PROMPT, seed, width, height)
        with output(workflow_path, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(flow, indent=2) + "\n")
    return ComfyUIExport(plan.model.identity(), plan.settings.as_dict(), plan.settings.comfyui(),
                         plan.settings.comfyui_core, list(plan.warnings), describe(plan.model, plan.settings),
                         workflow_path)


def describe(model: Model, settings: Sampling) -> str:
    """What to set in ComfyUI, for people; plainly says when core ComfyUI has no equivalent."""
    sampler = settings.comfyui()
    names, notes = file_names(model)
    lines = [f"ComfyUI equivalent of rendering {model.path.name} ({settings.family.title} {settings.profile.name}):"]
    if settings.comfyui_core:
        lines.append(f"  KSampler: sampler {sampler['sampler_name']}, scheduler {sampler['scheduler']}, "
                     f"steps {sampler['steps']}, cfg {sampler['cfg']:g}, denoise 1.0")
    else:
        known = ", ".join(f"{what} {sampler[key]}" for key, what in (("sampler_name", "sampler"),
                                                                       ("scheduler", "scheduler")) if sampler[key])
        lines.append(f"  no core-ComfyUI equivalent: {sampler['custom_node']}")
        lines.append(f"  then: {known + ', ' if known else ''}steps {sampler['steps']}, cfg {sampler['cfg']:g}"
                     + (f", eta {sampler['eta']:g}" if sampler["eta"] is not None else ""))
    lines.append(f"  Load Checkpoint: {names['checkpoint']}")
    if "unet" in names:
        lines.append(f"  Load Diffusion Model (UNETLoader): {names['unet']} -> KSampler model")
    if "lora" in names:
        strength = 1.0 if model.lora_strength is None else model.lora_strength
        lines.append(f"  LoraLoader: {names['lora']}, strength {strength:g}")
    if sampler["model_sampling"]:
        lines.append(f"  ModelSamplingDiscrete: sampling {sampler['model_sampling']}, zsnr off (the model predicts "
                     "the clean image; without it ComfyUI treats the output as noise)")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)
