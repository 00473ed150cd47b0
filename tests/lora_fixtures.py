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


# --- LyCORIS and DoRA, written by lycoris-lora and peft themselves ----------------------------------------------

# lycoris' "full" preset minus the class names of other architectures: lycoris 4.1.3's list includes
# `TimestepEmbedding` (for Anima), which on a diffusers UNet matches `time_embedding` a second time beside the
# preset's own `time_embedding.linear_1` name and stops the network with a duplicated-name assertion. Only the
# first transformer block of each attention is kept (every kind of layer, a quarter of the modules: creating
# lycoris modules is most of these tests' time).
LYCORIS_PRESET = r"""
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
exclude_name = ['.*transformer_blocks\.[1-9]']
"""


def load_models(pipeline: Path) -> dict[str, torch.nn.Module]:
    """The tiny pipeline's UNet and text encoders as diffusers/transformers load them (eval, fp32)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {"unet": UNet2DConditionModel.from_pretrained(pipeline / "unet").eval(),
            "text_encoder": CLIPTextModel.from_pretrained(pipeline / "text_encoder").eval(),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(pipeline / "text_encoder_2").eval()}


def lycoris_network(models: dict[str, torch.nn.Module], preset: Path, algo: str, seed: int = 0, dim: int = 4,
                    alpha: float = 2.0, conv_dim: int = 4, conv_alpha: float = 1.0, **options):
    """A LyCORIS network from lycoris-lora's kohya entry point (what sd-scripts runs for `--network_module
    lycoris.kohya`) on the models, applied, with random non-zero weights: up/B factors start at zero, and DoRA
    magnitudes start at the weights' own norms."""
    from lycoris.kohya import create_network

    encoders = [models["text_encoder"], models["text_encoder_2"]]
    network = create_network(1.0, dim, alpha, None, encoders, models["unet"], algo=algo, preset=str(preset),
                             conv_dim=conv_dim, conv_alpha=conv_alpha, warn_on_unmatched=False, **options)
    network.apply_to(encoders, models["unet"], True, True)
    gen = torch.Generator().manual_seed(seed)
    _perturb(network.named_parameters(), gen)
    return network


def _perturb(parameters, gen: torch.Generator) -> None:
    """Noise on every adapter weight; DoRA magnitudes are scaled by 1 +- 20% instead."""
    with torch.no_grad():
        for name, p in parameters:
            noise = torch.randn(p.shape, generator=gen)
            if "dora_scale" in name or "magnitude" in name:
                p.mul_(1 + 0.2 * noise)
            else:
                p.add_(0.05 * noise)


def peft_lora_via_diffusers(pipeline: Path, out_dir: Path, seed: int = 0, **config) -> tuple[Path, dict]:
    """A peft LoRA (`LoraConfig(**config)`, e.g. use_dora=True or lora_bias=True) on the tiny UNet (linear and
    conv targets) and first text encoder, random weights, saved as diffusers' training scripts save it
    (`get_peft_model_state_dict` + `save_lora_weights`). Returns the file and the models, still holding the
    unmerged adapters."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    models = load_models(pipeline)
    unet_lora_config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_out.0", "proj_in", "conv1", "time_emb_proj",
                                                                     "conv_shortcut"], **config)
    te_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], **config)
    models["unet"].add_adapter(unet_lora_config)
    # transformers' own add_adapter asks for a newer peft; inject_adapter_in_model is what it calls
    models["text_encoder"] = inject_adapter_in_model(te_config, models["text_encoder"])
    gen = torch.Generator().manual_seed(seed)
    for model in (models["unet"], models["text_encoder"]):
        _perturb(((n, p) for n, p in model.named_parameters() if "lora_" in n), gen)
    StableDiffusionXLPipeline.save_lora_weights(
        out_dir, unet_lora_layers=get_peft_model_state_dict(models["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(models["text_encoder"]),
        unet_lora_adapter_metadata=unet_lora_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict())
    return out_dir / "pytorch_lora_weights.safetensors", models


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
