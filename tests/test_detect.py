"""What a path holds, from headers alone; and the SDXL key/shape check used by verify."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lightning_tools.errors import UserError
from lightning_tools.sdxl import keys as K
from lightning_tools.sdxl.detect import check_architecture, detect
from lightning_tools.stream import LazyTensor, lazy_tensors
from lightning_tools.tensors import TensorSource

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _save(path, shapes: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_files(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline as a single file, a diffusers-named UNet file and a single-file-named UNet file."""
    folder = tmp_path_factory.mktemp("detect")
    components, configs = {}, {}
    for c in COMPONENTS:
        source = TensorSource.open(tiny_pipeline / c)
        components[c] = {K.hf_clip_key(k) if c.startswith("text") else k: LazyTensor.of(source, k) for k in source}
        configs[c] = json.loads((tiny_pipeline / c / "config.json").read_text())
    single, _ = K.to_single_file(components, configs)
    save_file({k: t.load().contiguous() for k, t in single.items()}, str(folder / "all.safetensors"))
    save_file({k: t.load() for k, t in components["unet"].items()}, str(folder / "unet.safetensors"))
    unet_sf, _ = K.unet_to_single(components["unet"], configs["unet"])
    save_file({K.UNET_PREFIX + k: t.load() for k, t in unet_sf.items()}, str(folder / "comfy-unet.safetensors"))
    save_file({k: t.load() for k, t in unet_sf.items()}, str(folder / "bare-unet.safetensors"))
    return folder, configs


def test_layouts_and_components(tiny_pipeline, tiny_files, tiny_lora):
    folder, _ = tiny_files
    found = detect(tiny_pipeline)
    assert (found.layout, found.components, found.architecture) == ("diffusers", COMPONENTS, "sdxl-base")
    assert detect(folder / "all.safetensors").layout == "single-file"
    assert detect(folder / "all.safetensors").components == COMPONENTS
    assert detect(tiny_pipeline / "unet").layout == "unet-diffusers"
    for name, layout, prefix in (("unet.safetensors", "unet-diffusers", ""),
                                 ("comfy-unet.safetensors", "unet-single-file", K.UNET_PREFIX),
                                 ("bare-unet.safetensors", "unet-single-file", "")):
        found = detect(folder / name)
        assert (found.layout, found.components, found.architecture, found.unet_prefix) == \
            (layout, ("unet",), "sdxl-base", prefix), name
    assert detect(tiny_lora).layout == "lora"


def _ldm_unet(levels: int, first_attention: bool, context: int, added: int | None) -> dict[str, tuple[int, ...]]:
    """The keys that tell UNet generations apart, as original (ldm/sgm) checkpoints name them."""
    p = K.UNET_PREFIX
    shapes = {p + "input_blocks.0.0.weight": (4, 4, 3, 3),
              p + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (4, context)}
    shapes.update({p + f"input_blocks.{3 * i}.0.op.weight": (4, 4, 3, 3) for i in range(1, levels)})
    if first_attention:
        shapes[p + "input_blocks.1.1.proj_in.weight"] = (4, 4)
    if added:
        shapes[p + "label_emb.0.0.weight"] = (4, added)
    return shapes | {"first_stage_model.encoder.conv_in.weight": (4, 3, 3, 3)}


@pytest.mark.parametrize("shapes, architecture", [
    (_ldm_unet(4, True, 768, None), "sd1"),
    (_ldm_unet(4, True, 1024, None), "sd2"),
    (_ldm_unet(4, False, 1280, 2560) | {"conditioner.embedders.0.model.text_projection": (4, 4)}, "sdxl-refiner"),
    (_ldm_unet(3, False, 2048, 2816), "sdxl-base"),
    ({K.UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (4,)}, "sd3"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "flux"),
])
def test_architecture_from_structure(tmp_path, shapes, architecture):
    assert detect(_save(tmp_path / "m.safetensors", shapes)).architecture == architecture


def test_unknown_files_and_folders(tmp_path):
    assert detect(_save(tmp_path / "x.safetensors", {"foo.weight": (2,)})).layout == "unknown"
    with pytest.raises(UserError, match="neither a diffusers pipeline"):
        detect(tmp_path)


def _lazy(path):
    return lazy_tensors(TensorSource.open(path))


def test_check_architecture_against_own_and_sdxl_configs(tiny_pipeline, tiny_files):
    folder, configs = tiny_files
    assert check_architecture(_lazy(folder / "all.safetensors"), configs=configs) == []
    assert check_architecture(_lazy(folder / "comfy-unet.safetensors"), configs=configs) == []
    assert check_architecture(_lazy(folder / "unet.safetensors"), configs=configs) == []
    unet = _lazy(tiny_pipeline / "unet")
    assert check_architecture(unet, "unet", configs) == []
    problems = check_architecture(unet, "unet")  # the tiny widths are not SDXL's
    assert problems and "conv_in.weight is [8, 4, 3, 3], SDXL base has [320, 4, 3, 3]" in problems[0]


def test_check_architecture_lists_missing_and_extra_keys(tiny_files, tmp_path):
    folder, configs = tiny_files
    source = TensorSource.open(folder / "all.safetensors")
    shapes = {k: tuple(v.shape) for k, v in source.items()}
    del shapes[K.UNET_PREFIX + "out.2.weight"]
    shapes[K.PREFIXES["vae"] + "encoder.extra.weight"] = (3,)
    problems = check_architecture(_lazy(_save(tmp_path / "m.safetensors", shapes)), configs=configs)
    assert any("unet: 1 key missing (conv_out.weight)" in p for p in problems)
    assert any("first_stage_model.encoder.extra.weight" in p for p in problems)


@pytest.mark.parametrize("component", COMPONENTS)
def test_bundled_sdxl_shapes_match_the_models_the_configs_describe(component):
    from lightning_tools.sdxl.detect import _model_shapes, base_config, expected_shapes

    config = base_config(component)
    assert expected_shapes(component, config) == dict(_model_shapes(component, json.dumps(config, sort_keys=True)))
