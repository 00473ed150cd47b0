"""The SDXL key maps, checked against diffusers' own single-file converters (the reference for that direction),
on the tiny model with real data and on full-size SDXL with meta tensors (names and shapes, no memory)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from lightning_tools.sdxl import keys as K
from lightning_tools.sdxl.detect import base_config, expected_shapes
from lightning_tools.stream import LazyTensor
from lightning_tools.tensors import TensorSource

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _tiny_components(folder):
    components, configs = {}, {}
    for c in COMPONENTS:
        source = TensorSource.open(folder / c)
        components[c] = {K.hf_clip_key(k) if c.startswith("text") else k: LazyTensor.of(source, k) for k in source}
        configs[c] = json.loads((folder / c / "config.json").read_text())
    return components, configs


def _diffusers_reading(single: dict[str, torch.Tensor], configs: dict) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers' from_single_file makes of a single-file state dict, per component."""
    with torch.device("meta"):
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
    return {"unet": sfu.convert_ldm_unet_checkpoint(single, configs["unet"]),
            "vae": sfu.convert_ldm_vae_checkpoint(single, configs["vae"]),
            "text_encoder": sfu.convert_ldm_clip_checkpoint(single),
            "text_encoder_2": sfu.convert_open_clip_checkpoint(clip_g, single, prefix=K.PREFIXES["text_encoder_2"])}


def test_tiny_single_file_reads_back_exactly_with_diffusers_converters(tiny_pipeline):
    components, configs = _tiny_components(tiny_pipeline)
    single, unknown = K.to_single_file(components, configs)
    assert unknown == []
    data = {k: t.load() for k, t in single.items()}
    assert all(tuple(data[k].shape) == t.shape for k, t in single.items())
    read = _diffusers_reading(data, configs)
    read["text_encoder"].pop(K.POSITION_IDS)  # diffusers passes the buffer through; transformers rebuilds it
    for c in COMPONENTS:
        original = {k: t.load() for k, t in components[c].items()}
        assert read[c].keys() == original.keys(), c
        assert all(torch.equal(read[c][k], original[k]) for k in original), c


def test_single_file_keys_split_back_to_the_same_tensors(tiny_pipeline):
    components, configs = _tiny_components(tiny_pipeline)
    single, _ = K.to_single_file(components, configs)
    back, unknown = K.split_single_file(single, configs)
    assert unknown == []
    assert back["text_encoder_2"].pop(K.LOGIT_SCALE).load().item() == pytest.approx(K.LOGIT_SCALE_VALUE)
    for c in COMPONENTS:
        assert back[c].keys() == components[c].keys()
        for k, t in back[c].items():
            assert t.shape == components[c][k].shape and t.dtype == components[c][k].dtype
            assert torch.equal(t.load(), components[c][k].load()), k


def test_renames_and_row_splits_stay_byte_copies(tiny_pipeline):
    components, configs = _tiny_components(tiny_pipeline)
    single, _ = K.to_single_file(components, configs)
    from safetensors.torch import save_file

    path = tiny_pipeline.parent / "keys-single.safetensors"
    save_file({k: t.load().contiguous() for k, t in single.items()}, str(path))
    source = TensorSource.open(path)
    back, _ = K.split_single_file({k: LazyTensor.of(source, k) for k in source}, configs)
    q = back["text_encoder_2"]["text_model.encoder.layers.3.self_attn.k_proj.weight"]
    assert q.stored is not None  # a slice of in_proj_weight's bytes, copied without decoding
    stored_bytes = path.read_bytes()[q.stored.start:q.stored.end]
    assert stored_bytes == q.load().contiguous().view(torch.uint8).numpy().tobytes()
    computed = [k for c in back.values() for k, t in c.items() if t.stored is None]
    assert computed == ["text_projection.weight"]
    vae_q = back["vae"]["encoder.mid_block.attentions.0.to_q.weight"]
    assert len(vae_q.shape) == 2 and vae_q.stored is not None and vae_q.stored.shape == vae_q.shape


def _meta_single_file() -> tuple[dict[str, torch.Tensor], dict]:
    configs = {c: base_config(c) for c in COMPONENTS}
    components = {c: {k: LazyTensor("F16", shape, lambda s=shape: torch.empty(s, device="meta"))
                      for k, shape in expected_shapes(c, configs[c]).items()} for c in COMPONENTS}
    single, unknown = K.to_single_file(components, configs)
    assert unknown == []
    return {k: t.load() for k, t in single.items()}, configs


def test_full_size_sdxl_names_and_shapes_match_diffusers():
    single, configs = _meta_single_file()
    # Names the SDXL base single file (sd_xl_base_1.0.safetensors) is known to hold.
    for key, shape in {"model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
                       "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
                       "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
                       "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
                       "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                       "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                       "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                       "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
                       "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                       "conditioner.embedders.1.model.text_projection": (1280, 1280),
                       "conditioner.embedders.1.model.logit_scale": ()}.items():
        assert tuple(single[key].shape) == shape, key
    counts = {p: sum(k.startswith(p) for k in single) for p in K.PREFIXES.values()}
    assert counts == {K.UNET_PREFIX: 1680, K.PREFIXES["vae"]: 248, K.PREFIXES["text_encoder"]: 197, K.PREFIXES["text_encoder_2"]: 390}
    read = _diffusers_reading(single, configs)
    read["text_encoder"].pop(K.POSITION_IDS)
    for c in COMPONENTS:
        want = expected_shapes(c, configs[c])
        assert {k: tuple(v.shape) for k, v in read[c].items()} == want, c


def test_position_ids_are_int64_whatever_the_weights():
    tensors = {"text_model.embeddings.position_embedding.weight":
               LazyTensor("F16", (77, 8), lambda: torch.zeros(77, 8, dtype=torch.float16))}
    out, _ = K.clip_l_to_single(tensors)
    ids = out[K.POSITION_IDS]
    assert ids.dtype == "I64" and torch.equal(ids.load(), torch.arange(77).unsqueeze(0))


def test_every_sdxl_unet_module_has_one_single_file_name():
    from lightning_tools.lora import module_names

    names = K.unet_names(base_config("unet"))
    mapping = {m: names.to_single(m) for m in module_names("unet", base_config("unet"))}
    assert mapping["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q"
    assert mapping["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert mapping["up_blocks.2.resnets.0.conv_shortcut"] == "output_blocks.6.0.skip_connection"
    assert mapping["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert None not in mapping.values() and len(set(mapping.values())) == len(mapping)
    assert all(names.to_diffusers(single) == module for module, single in mapping.items())


def test_names_outside_the_maps_are_unknown():
    names = K.unet_names(base_config("unet"))
    assert names.to_single("down_blocks.3.resnets.0.conv1.weight") is None
    assert names.to_diffusers("input_blocks.1.0.in_layers.1.weight") is None  # SiLU has no weight
    _, unknown = K.clip_g_from_single({"transformer.resblocks.0.attn.bogus": LazyTensor("F16", (1,), None)})
    assert unknown == ["transformer.resblocks.0.attn.bogus"]
