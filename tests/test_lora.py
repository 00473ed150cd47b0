"""LoRA reading (three formats), delta math, writing, and the kohya <-> peft conversion, checked against diffusers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lightning_tools.errors import UserError
from lightning_tools.convert import convert_lora
from lightning_tools.lora import (LoraModule, LowRank, add_lora, detect_lora_format, lora_delta,
                                  modules_of_keys, read_lora, write_lora)
from lightning_tools.provenance import SOURCES
from lightning_tools.stream import LazyTensor
from lightning_tools.tensors import TensorSource
from lora_fixtures import (kohya_te_lora, kohya_unet_lora, peft_via_diffusers, to_single_file_names, unet_config,
                           write)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _targets(pipeline):
    return {c: modules_of_keys(TensorSource.open(pipeline / c), c) for c in COMPONENTS}


@pytest.fixture(scope="module")
def kohya_file(tiny_pipeline, tmp_path_factory):
    """UNet (official format, alpha != rank) plus both text encoders."""
    tensors = kohya_unet_lora(tiny_pipeline, alpha=2.0) | kohya_te_lora(tiny_pipeline)
    return write(tensors, tmp_path_factory.mktemp("kohya") / "mixed_lora.safetensors")


@pytest.fixture(scope="module")
def peft_file(tiny_pipeline, kohya_file, tmp_path_factory):
    return peft_via_diffusers(tiny_pipeline, kohya_file, tmp_path_factory.mktemp("peft"))


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _by_module(lora):
    return {(m.component, m.module): m for m in lora.modules}


def test_official_format_resolves_every_module_to_a_real_name(tiny_pipeline, tiny_lora):
    lora = read_lora(tiny_lora, _targets(tiny_pipeline), unet_config(tiny_pipeline))
    unet_modules = _targets(tiny_pipeline)["unet"]
    assert lora.format == "kohya-diffusers" and not lora.unresolved
    assert len(lora.modules) == len(_tensors(tiny_lora)) // 3
    assert all(m.component == "unet" and m.module in unet_modules for m in lora.modules)
    # underscores inside names survive: attn1.to_out.0, ff.net.0.proj, transformer_blocks
    assert any(m.module.endswith("transformer_blocks.0.attn1.to_out.0") for m in lora.modules)
    assert any(m.module.endswith("ff.net.0.proj") for m in lora.modules)


def test_three_formats_read_to_the_same_modules(tiny_pipeline, kohya_file, peft_file, tmp_path):
    single = write(to_single_file_names(_tensors(kohya_file), unet_config(tiny_pipeline)), tmp_path / "sf.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1") for k in _tensors(single))
    reads = {path: read_lora(path, _targets(tiny_pipeline), unet_config(tiny_pipeline))
             for path in (kohya_file, single, peft_file)}
    assert [r.format for r in reads.values()] == ["kohya-diffusers", "kohya-single-file", "peft"]
    reference = _by_module(reads[kohya_file])
    assert {c for c, _ in reference} == set(COMPONENTS)
    for lora in reads.values():
        modules = _by_module(lora)
        assert modules.keys() == reference.keys() and not lora.unresolved
        for key, m in modules.items():
            assert m.alpha == reference[key].alpha == 2.0
            assert torch.equal(m.factors.down.load(), reference[key].factors.down.load())
            assert torch.equal(m.factors.up.load(), reference[key].factors.up.load())


def test_detect_lora_format():
    assert detect_lora_format(["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"]) == "kohya-diffusers"
    assert detect_lora_format(["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"]) == "kohya-single-file"
    assert detect_lora_format(["unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"]) == "peft"
    assert detect_lora_format(["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.down.weight"]) == "peft"
    assert detect_lora_format(["model.diffusion_model.input_blocks.0.0.weight"]) is None


def _module(down, up, alpha=None, mid=None, component="unet", module="m"):
    lazy = [None if t is None else LazyTensor("F32", tuple(t.shape), lambda t=t: t) for t in (down, up, mid)]
    return LoraModule(component, module, LowRank(lazy[0], lazy[1], lazy[2]), alpha)


def test_delta_of_a_linear_lora_is_scaled_up_times_down():
    down, up = torch.randn(4, 6), torch.randn(5, 4)
    delta = lora_delta(_module(down, up, alpha=2.0), strength=-0.5)
    torch.testing.assert_close(delta, -0.5 * (2.0 / 4) * up @ down)
    torch.testing.assert_close(lora_delta(_module(down, up)), up @ down)  # alpha defaults to the rank


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_lora_delta_equals_running_the_lora_layers(kernel):
    """down k x k then up 1x1 (what the LoRA computes) equals one conv with the delta as weight."""
    down, up = torch.randn(4, 3, kernel, kernel), torch.randn(7, 4, 1, 1)
    x = torch.randn(2, 3, 9, 9)
    delta = lora_delta(_module(down, up, alpha=8.0), strength=0.3)
    expected = 0.3 * 2.0 * F.conv2d(F.conv2d(x, down, padding=kernel // 2), up)
    torch.testing.assert_close(F.conv2d(x, delta, padding=kernel // 2), expected, rtol=1e-4, atol=1e-4)


def test_locon_mid_delta_equals_running_the_three_layers():
    down, mid, up = torch.randn(4, 3, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(7, 4, 1, 1)
    x = torch.randn(2, 3, 9, 9)
    delta = lora_delta(_module(down, up, mid=mid))
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up),
                               rtol=1e-4, atol=1e-4)


def test_add_lora_accumulates_on_a_1x1_conv_weight_from_a_linear_lora():
    down, up = torch.randn(2, 6), torch.randn(5, 2)
    weight = torch.randn(5, 6, 1, 1)
    merged = add_lora(weight.clone(), _module(down, up), strength=2.0)
    torch.testing.assert_close(merged, weight + 2.0 * (up @ down).reshape(5, 6, 1, 1))


def test_kohya_peft_kohya_round_trip_is_exact(tiny_pipeline, tiny_lora, tmp_path):
    """The official file (rank 4, alpha 4) plus text encoder modules with alpha 2 and a module of another rank."""
    original = _tensors(tiny_lora) | kohya_te_lora(tiny_pipeline, alpha=2.0)
    odd = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    original[odd + ".lora_down.weight"] = original[odd + ".lora_down.weight"][:2].clone()
    original[odd + ".lora_up.weight"] = original[odd + ".lora_up.weight"][:, :2].clone()
    original = {k: v.half() for k, v in original.items()}
    src = write(original, tmp_path / "sdxl_lightning_4step_lora.safetensors")
    peft = tmp_path / "peft.safetensors"
    back = tmp_path / "back.safetensors"
    report = convert_lora(src, "peft", peft)
    assert report.source_format == "kohya-diffusers" and report.modules == len(original) // 3
    convert_lora(peft, "kohya", back)
    again = _tensors(back)
    assert again.keys() == original.keys()
    for key, value in original.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key
    with safe_open(str(back), "pt") as f:
        sources = json.loads(f.metadata()[SOURCES])  # the whole chain: the original, then the peft copy
        assert [s["file"] for s in sources] == ["sdxl_lightning_4step_lora.safetensors", "peft.safetensors"]


def test_peft_file_we_write_loads_in_diffusers_like_the_original(tiny_pipeline, kohya_file, tmp_path):
    """diffusers loads our peft file into the same layers, with the same deltas (scale included), as the kohya
    original."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    ours = tmp_path / "ours_peft.safetensors"
    convert_lora(kohya_file, "peft", ours)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    pipe.load_lora_weights(str(kohya_file), adapter_name="kohya")
    pipe.load_lora_weights(str(ours), adapter_name="ours")
    for c in COMPONENTS:
        layers = [(name, m) for name, m in getattr(pipe, c).named_modules() if isinstance(m, LoraLayer)]
        assert layers, f"nothing loaded into {c}"
        for name, layer in layers:
            assert set(layer.lora_A) == {"kohya", "ours"}, f"{c}/{name}"
            torch.testing.assert_close(layer.get_delta_weight("ours"), layer.get_delta_weight("kohya"),
                                       rtol=0, atol=0, msg=f"{c}/{name}")


def test_write_lora_kohya_uses_diffusers_module_names(tiny_pipeline, peft_file, tmp_path):
    lora = read_lora(peft_file, _targets(tiny_pipeline))
    out = tmp_path / "k.safetensors"
    write_lora(lora.modules, out, "kohya")
    keys = _tensors(out).keys()
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_9_self_attn_q_proj.alpha" in keys
    with pytest.raises(UserError, match="exists"):
        write_lora(lora.modules, out, "kohya")


def test_sd15_names_do_not_resolve_on_sdxl(tiny_pipeline, tmp_path):
    """SD1.5 has attention in the first down block; SDXL does not."""
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = write({stem + ".lora_down.weight": torch.zeros(2, 8), stem + ".lora_up.weight": torch.zeros(8, 2)},
                 tmp_path / "sd15.safetensors")
    lora = read_lora(path, _targets(tiny_pipeline), unet_config(tiny_pipeline))
    assert lora.modules == [] and lora.unresolved == [stem]


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1),
      "lora_unet_conv_in.dora_scale": torch.zeros(5, 1, 1, 1)}, "DoRA magnitude of shape"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "no up weight"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 3, 1, 1)}, "inconsistent shapes"),
    ({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, "not a LoRA"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3), "lora_unet_conv_in.hada_w1_a": torch.zeros(8, 2)},
     "mixes the weights of several variants"),
    ({"lora_unet_conv_in.lokr_w1": torch.zeros(2, 2), "lora_unet_conv_in.lokr_w2_a": torch.zeros(4, 1)},
     "needs lokr_w2 or both lokr_w2_a and lokr_w2_b"),
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(8, 2), "lora_unet_conv_in.hada_w1_b": torch.zeros(2, 36),
      "lora_unet_conv_in.hada_w2_a": torch.zeros(8, 2)}, "no w2b weight"),
])
def test_bad_lora_files_are_refused(tiny_pipeline, tmp_path, keys, message):
    path = write(keys, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=message):
        read_lora(path, _targets(tiny_pipeline), unet_config(tiny_pipeline))


def test_the_lightning_target_set_on_sdxl_is_the_official_788_modules():
    from diffusers import UNet2DConditionModel

    from lightning_tools.lora import lightning_target_modules
    from lightning_tools.tiny import sdxl_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    names = [name for name, _ in lightning_target_modules(unet)]
    assert len(names) == 788  # the official LoRA files' module count
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "up_blocks.0.upsamplers.0.conv" in names and "conv_in" not in names
