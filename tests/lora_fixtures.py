"""LoRA files in the formats other tools write, built for the tiny pipeline without our own writer.

kohya text-encoder LoRAs and kohya single-file names are written here with safetensors directly; peft files are
written by diffusers itself (`load_lora_weights` then `save_lora_weights`), so the tests read what diffusers
really produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_tools.sdxl.keys import unet_names
from lightning_tools.tensors import TensorSource
from lightning_tools.lora import lightning_target_modules
from lightning_tools.tiny import make_lightning_lora

TE_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def unet_config(pipeline: Path) -> dict:
    return json.loads((pipeline / "unet" / "config.json").read_text())


def kohya_unet_lora(pipeline: Path, rank: int = 4, alpha: float | None = None, seed: int = 0) -> dict:
    """The official Lightning format (kohya keys, diffusers module names), fitting the pipeline's UNet."""
    return make_lightning_lora(unet_config(pipeline), rank=rank, alpha=alpha, seed=seed)


def kohya_te_lora(pipeline: Path, rank: int = 4, alpha: float = 2.0, seed: int = 1, scale: float = 0.05) -> dict:
    """kohya `lora_te1_`/`lora_te2_` modules on every attention and MLP projection of both text encoders."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for prefix, folder in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        source = TensorSource.open(pipeline / folder)
        for key, info in source.items():
            module = key.removesuffix(".weight")
            if not key.endswith(".weight") or not module.endswith(TE_LEAVES):
                continue
            if not module.startswith("text_model."):
                module = "text_model." + module  # transformers >= 5.6 saves CLIPTextModel without the prefix
            stem = prefix + module.replace(".", "_")
            out_features, in_features = info.shape
            out[stem + ".lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * scale
            out[stem + ".lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * scale
            out[stem + ".alpha"] = torch.tensor(alpha)
    return out


def to_single_file_names(lora: dict, config: dict) -> dict:
    """Rename kohya UNet keys from diffusers module names to single-file (sgm) ones, as kohya's SDXL trainer
    writes them (`lora_unet_input_blocks_4_1_...`)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    to_single = unet_names(config).to_single
    renames = {"lora_unet_" + name.replace(".", "_"): "lora_unet_" + to_single(name).replace(".", "_")
               for name, _ in lightning_target_modules(unet)}
    out = {}
    for key, value in lora.items():
        stem, _, part = key.partition(".")
        out[f"{renames.get(stem, stem)}.{part}"] = value
    return out


def write(tensors: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def peft_via_diffusers(pipeline: Path, kohya_file: Path, out_dir: Path) -> Path:
    """Load a kohya LoRA into the pipeline with diffusers and save it with `save_lora_weights`, as diffusers'
    training scripts do (peft keys, alphas in `lora_adapter_metadata`)."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe.load_lora_weights(str(kohya_file), adapter_name="x")
    layers, adapter_metadata = {}, {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name)
        if "x" in getattr(model, "peft_config", {}):
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model, adapter_name="x")
            adapter_metadata[f"{name}_lora_adapter_metadata"] = model.peft_config["x"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(out_dir, **layers, **adapter_metadata)
    return out_dir / "pytorch_lora_weights.safetensors"


def kohya_via_diffusers(peft_file: Path, out: Path) -> Path:
    """A peft LoRA turned kohya by diffusers' own `convert_state_dict_to_kohya` (alpha = rank for every module,
    text encoder names as the installed transformers spells its modules)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file

    return write(convert_state_dict_to_kohya(load_file(str(peft_file))), out)


def lycoris_locon(pipeline: Path, out: Path, tucker: bool) -> Path:
    """A LoCon on the UNet's conv blocks written by lycoris-lora's kohya network (kohya keys, diffusers names;
    `tucker` adds `lora_mid` weights to the 3x3 convs)."""
    from diffusers import StableDiffusionXLPipeline
    from lycoris.kohya import create_network

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, local_files_only=True)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    network = create_network(1.0, 4, 2.0, None, encoders, pipe.unet, algo="locon", use_tucker=tucker, conv_dim=4,
                             conv_alpha=2.0, preset="unet-convblock-only")
    network.apply_to(encoders, pipe.unet, apply_text_encoder=True, apply_unet=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(out), None, {})
    return out
