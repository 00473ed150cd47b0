"""Tiny random-weight models with the SDXL block structure, for the demo, the tests and the benchmarks.

The UNet keeps SDXL's exact layout (3 levels, 2 resnets per level, transformer depths 1/2/10, text-time
conditioning) at toy width, so every key map and LoRA target that works here works on SDXL itself.
`sdxl_unet_config()` gives the real widths for full-size benchmarks.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_tools.lora import lightning_target_modules
from lightning_tools.progress import library_bars_off

# SDXL's CLIP tokenizers pad differently: CLIP-L with <|endoftext|>, OpenCLIP bigG with "!".
_TOKENIZER_PAD = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
_DEMO_WORDS = ("a", "girl", "smiling", "cat", "red", "the", "photo", "of", "lightning", "mountain", "lake")

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def sdxl_unet_config(width: int = 320, heads_per_level: tuple[int, int, int] = (5, 10, 20),
                     text_widths: tuple[int, int] = (768, 1280), pooled_dim: int = 1280,
                     time_embed_dim: int = 256, norm_groups: int = 32) -> dict:
    """The SDXL-base UNet config; smaller `width` etc. give the same structure at toy size."""
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [width, width * 2, width * 4],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": list(heads_per_level),
        "cross_attention_dim": sum(text_widths),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": 6 * time_embed_dim + pooled_dim,
        "norm_num_groups": norm_groups,
    }


def tiny_unet_config() -> dict:
    return sdxl_unet_config(width=8, heads_per_level=(1, 2, 4), text_widths=(32, 64), pooled_dim=32,
                            time_embed_dim=8, norm_groups=8) | {"sample_size": 32}


def tiny_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 256,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def _text_configs():
    from transformers import CLIPTextConfig

    common = dict(vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    clip_l = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            projection_dim=32, hidden_act="quick_gelu", **common)
    # diffusers recognises an SDXL single file by OpenCLIP layer 9, so the bigG stand-in keeps 10 layers.
    clip_g = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
                            projection_dim=32, hidden_act="gelu", **common)
    return clip_l, clip_g


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: Path, pad_token: str) -> None:
    """A byte-level CLIP BPE tokenizer with a small vocabulary and merges for a few demo words."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in _DEMO_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    unique_merges = list(dict.fromkeys(merges))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(unique_merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token, "add_prefix_space": False, "errors": "replace"}))


def write_tiny_pipeline(folder: Path, seed: int = 0, torch_dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight SDXL-architecture pipeline in diffusers layout (a few MB, a few seconds)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    clip_l, clip_g = _text_configs()
    with tempfile.TemporaryDirectory() as vocab:
        # The tokenizers' vocabulary is made here; the files in the pipeline folder are whatever the installed
        # transformers saves (transformers 5: tokenizer.json + tokenizer_config.json), as users get them.
        for name, pad in _TOKENIZER_PAD.items():
            write_tiny_tokenizer(Path(vocab) / name, pad)
        tokenizers = {name: CLIPTokenizer.from_pretrained(Path(vocab) / name) for name in _TOKENIZER_PAD}
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**tiny_vae_config()),
        text_encoder=CLIPTextModel(clip_l),
        text_encoder_2=CLIPTextModelWithProjection(clip_g),
        **tokenizers,
        unet=UNet2DConditionModel(**tiny_unet_config()),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    )
    _randomize(pipe.unet)
    _randomize(pipe.vae)
    pipe.to(torch_dtype)
    with library_bars_off():
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _randomize(model: torch.nn.Module) -> None:
    """diffusers zero-initialises some output layers; random values there make every tensor count in tests."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)


def make_lightning_lora(unet_config: dict, rank: int = 4, alpha: float | None = None, seed: int = 0,
                        dtype: torch.dtype = torch.float16, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A random LoRA in the official Lightning format: kohya keys with diffusers module names."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in lightning_target_modules(unet):
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size
            down_shape, up_shape = (rank, module.in_channels, *k), (module.out_channels, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        out[key + ".lora_down.weight"] = (torch.randn(down_shape, generator=gen) * scale).to(dtype)
        out[key + ".lora_up.weight"] = (torch.randn(up_shape, generator=gen) * scale).to(dtype)
        out[key + ".alpha"] = torch.tensor(float(alpha if alpha is not None else rank), dtype=dtype)
    return out


def write_tiny_lightning_lora(path: Path, rank: int = 4, alpha: float | None = None, seed: int = 0) -> Path:
    """Write a tiny Lightning-format LoRA that fits `write_tiny_pipeline`'s UNet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(make_lightning_lora(tiny_unet_config(), rank=rank, alpha=alpha, seed=seed), str(path))
    return path
