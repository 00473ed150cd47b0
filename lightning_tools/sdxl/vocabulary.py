"""The SDXL vocabulary in one place: the parts of a pipeline, where each one lives in every layout, and the
names of layouts, LoRA formats, output targets and architectures that every command and message uses.

One idea, one name: a *layout* is how a model's files are arranged (a diffusers folder, a single file, a UNet
alone in either naming); a *LoRA format* is how a LoRA names its keys; a *target* is what `--to` asks for,
which is a layout or a LoRA format under the name users know (ComfyUI, kohya, peft).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Component:
    """One model of an SDXL pipeline. `name` is its diffusers folder; `prefix` its key prefix in single files;
    `kohya_prefixes` the prefixes kohya-style LoRAs give its modules (the first is what we write; empty for a
    part LoRAs never adapt)."""

    name: str
    title: str
    prefix: str
    weights_file: str
    kohya_prefixes: tuple[str, ...]


UNET = Component("unet", "UNet", "model.diffusion_model.", "diffusion_pytorch_model.safetensors", ("lora_unet_",))
VAE = Component("vae", "VAE", "first_stage_model.", "diffusion_pytorch_model.safetensors", ())
TEXT_ENCODER = Component("text_encoder", "CLIP-L text encoder", "conditioner.embedders.0.transformer.",
                         "model.safetensors", ("lora_te1_", "lora_te_"))
TEXT_ENCODER_2 = Component("text_encoder_2", "OpenCLIP-bigG text encoder", "conditioner.embedders.1.model.",
                           "model.safetensors", ("lora_te2_",))
COMPONENTS: dict[str, Component] = {c.name: c for c in (UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2)}
COMPONENT_NAMES: tuple[str, ...] = tuple(COMPONENTS)
LORA_COMPONENTS: tuple[str, ...] = tuple(c.name for c in COMPONENTS.values() if c.kohya_prefixes)
PREFIXES: dict[str, str] = {c.name: c.prefix for c in COMPONENTS.values()}
# The refiner's only text encoder sits where SDXL base has CLIP-L, under another name.
REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."

# The parts of a diffusers pipeline folder that are not weights: part -> the alternative sets of files that
# make it complete ("" = the part is a file itself). A tokenizer is complete when the installed transformers
# can load it with its settings (CLIP's 77-token limit and pad token live in tokenizer_config.json):
# transformers 5 saves the fast `tokenizer.json` with it, older versions the slow vocab/merges pair.
_TOKENIZER = (("tokenizer_config.json", "tokenizer.json"), ("tokenizer_config.json", "vocab.json", "merges.txt"))
SUPPORT_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "model_index.json": (("",),), "scheduler": (("scheduler_config.json",),),
    "tokenizer": _TOKENIZER, "tokenizer_2": _TOKENIZER}

Layout = Literal["diffusers", "single-file", "unet-diffusers", "unet-single-file"]
LAYOUTS: dict[str, str] = {
    "diffusers": "diffusers pipeline folder",
    "single-file": "single-file all-in-one checkpoint (ComfyUI / A1111 layout)",
    "unet-diffusers": "UNet only, diffusers names",
    "unet-single-file": "UNet only, single-file names (ComfyUI / A1111 layout)",
}
# What to do next with a model in each layout (for inspect).
NEXT_STEP: dict[str, str] = {
    "diffusers": "load it with StableDiffusionXLPipeline.from_pretrained; `lightning-tools convert --to comfyui` "
                 "makes a ComfyUI/A1111 file",
    "single-file": "put it in ComfyUI models/checkpoints; `lightning-tools convert --to diffusers` makes a "
                   "diffusers folder",
    "unet-diffusers": "a UNet alone: it needs an SDXL base's VAE and text encoders (`render --base`, "
                      "`convert --base`)",
    "unet-single-file": "a UNet alone (ComfyUI models/unet): it needs an SDXL base's VAE and text encoders "
                        "(`render --base`, `convert --base`)",
    "lora": "apply it to an SDXL base (`lightning-tools merge`, or diffusers load_lora_weights + fuse_lora)",
}

LoraFormat = Literal["kohya-diffusers", "kohya-single-file", "peft"]
LORA_FORMATS: dict[str, str] = {
    "kohya-diffusers": "LoRA, kohya keys with diffusers module names (the official Lightning LoRA format)",
    "kohya-single-file": "LoRA, kohya keys with single-file module names",
    "peft": "LoRA, peft / diffusers keys",
}

# `--to` of convert (and merge): the names users know -> what they mean.
Target = Literal["diffusers", "comfyui", "comfyui-unet", "kohya", "peft"]
MODEL_TARGETS: dict[str, str] = {
    "diffusers": "diffusers pipeline folder (or, for a UNet alone and an OUT ending in .safetensors, a "
                 "diffusers-named UNet file)",
    "comfyui": "all-in-one single file for ComfyUI models/checkpoints and A1111",
    "comfyui-unet": "UNet-only single file for ComfyUI models/unet",
}
LORA_TARGETS: dict[str, str] = {
    "kohya": "kohya keys with diffusers module names and an alpha per module (diffusers, ComfyUI, A1111/Forge)",
    "peft": "peft/diffusers keys, alphas in the adapter metadata (diffusers and peft only)",
}
# Layout each model target writes (a diffusers target of a UNet alone into a .safetensors is "unet-diffusers").
TARGET_LAYOUT: dict[str, str] = {"diffusers": "diffusers", "comfyui": "single-file",
                                 "comfyui-unet": "unet-single-file"}

Architecture = Literal["sdxl-base", "sdxl-refiner", "sd1", "sd2", "sd3", "flux", "unknown"]
ARCHITECTURES: dict[str, str] = {
    "sdxl-base": "an SDXL base model", "sdxl-refiner": "an SDXL refiner", "sd1": "a Stable Diffusion 1.x model",
    "sd2": "a Stable Diffusion 2.x model", "sd3": "a Stable Diffusion 3 model", "flux": "a FLUX model",
    "unknown": "not a model this tool knows"}


def component_titles(names: tuple[str, ...] | list[str]) -> str:
    """"UNet, VAE" for a list of component names, as messages name them."""
    return ", ".join(COMPONENTS[n].title for n in names)
