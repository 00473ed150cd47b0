"""--dtype fp8: the UNet's matrices and convs stored as float8_e4m3fn (F8_E4M3), exactly the fp16 output rounded to
fp8, everything else fp16; the files load in diffusers; the loss against fp16 is what the two files show."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_tools import provenance as meta
from lightning_tools.tensors import read_header

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def outputs(tiny_pipeline, tiny_lora, tmp_path_factory):
    """The same merge written in fp16 and in fp8 (a ComfyUI file), with the fp8 report."""
    from click.testing import CliRunner

    from lightning_tools.cli import main

    folder = tmp_path_factory.mktemp("fp8")
    paths = {}
    reports = {}
    for dtype in ("fp16", "fp8"):
        paths[dtype] = folder / f"merged-{dtype}.safetensors"
        result = CliRunner().invoke(main, ["merge", "--base", str(tiny_pipeline), "--lora", str(tiny_lora),
                                           "--strength", "0.8", "--dtype", dtype, "--out", str(paths[dtype]),
                                           "--json"])
        assert result.exit_code == 0, result.output + result.stderr
        reports[dtype] = json.loads(result.stdout)
    return paths, reports


def _dtypes(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_unet_matrices_are_fp8_of_the_fp16_output_and_the_rest_stays_fp16(outputs):
    paths, _ = outputs
    stored = _dtypes(paths["fp8"])
    half, eight = load_file(str(paths["fp16"])), load_file(str(paths["fp8"]))
    assert stored.keys() == half.keys()
    fp8 = [k for k, d in stored.items() if d == "F8_E4M3"]
    assert fp8 and all(k.startswith(PREFIX) and eight[k].dim() >= 2 for k in fp8)
    assert all(d in ("F16", "I64") for k, d in stored.items() if k not in fp8)
    assert all(half[k].dim() < 2 for k in half if k.startswith(PREFIX) and k not in fp8)  # biases and norms
    for key, value in eight.items():
        expected = half[key].to(torch.float8_e4m3fn) if key in fp8 else half[key]
        assert value.dtype == expected.dtype and torch.equal(value.view(torch.uint8) if key in fp8 else value,
                                                             expected.view(torch.uint8) if key in fp8 else expected)


def test_the_reported_loss_is_the_gap_between_the_fp8_and_fp16_files(outputs):
    paths, reports = outputs
    half, eight = load_file(str(paths["fp16"])), load_file(str(paths["fp8"]))
    errors = torch.cat([(eight[k].float() - half[k].float()).abs().reshape(-1) for k in eight
                        if eight[k].dtype == torch.float8_e4m3fn])
    loss = reports["fp8"]["written"]["fp8"]
    assert loss["max_abs_error"] == float(errors.max()) and loss["elements"] == errors.numel()
    assert loss["mean_abs_error"] == pytest.approx(float(errors.double().mean()), rel=1e-9)
    assert 0 < loss["mean_abs_error"] < loss["max_abs_error"] and loss["saturated"] == 0
    assert json.loads(read_header(paths["fp8"])[1][meta.FP8]) == loss
    assert reports["fp16"]["written"]["fp8"] is None
    assert reports["fp8"]["estimated_bytes"] == reports["fp16"]["estimated_bytes"] - loss["elements"]


def test_diffusers_loads_the_fp8_single_file_and_renders(outputs, tiny_pipeline):
    from diffusers import StableDiffusionXLPipeline

    paths, _ = outputs
    pipe = StableDiffusionXLPipeline.from_single_file(str(paths["fp8"]), config=str(tiny_pipeline),
                                                      local_files_only=True, torch_dtype=torch.float16)
    eight = load_file(str(paths["fp8"]))
    torch.testing.assert_close(pipe.unet.conv_in.weight, eight[PREFIX + "input_blocks.0.0.weight"].half(),
                               rtol=0, atol=0)
    pipe.to(torch.float32)
    image = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=64, width=64, output_type="np").images
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_unet_only_and_diffusers_folder_outputs_in_fp8_load_in_diffusers(tiny_pipeline, tiny_lora, tmp_path, cli):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet_in = tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    unet_out = tmp_path / "unet-fp8.safetensors"
    result = cli("merge", "--base", unet_in, "--config", tiny_pipeline, "--lora", tiny_lora, "--to", "comfyui",
                 "--dtype", "fp8", "--out", unet_out, ok=True)
    assert "fp8 UNet:" in result.stdout and "against fp16: max abs error" in result.stdout
    stored = _dtypes(unet_out)
    assert "F8_E4M3" in stored.values() and set(stored.values()) == {"F8_E4M3", "F16"}
    unet = UNet2DConditionModel.from_single_file(str(unet_out), config=str(tiny_pipeline), subfolder="unet",
                                                 torch_dtype=torch.float16)
    assert torch.equal(unet.conv_out.weight, load_file(str(unet_out))[PREFIX + "out.2.weight"].half())

    folder = tmp_path / "fp8-folder"
    cli("merge", "--base", tiny_pipeline, "--lora", tiny_lora, "--dtype", "fp8", "--out", folder, ok=True)
    assert "F8_E4M3" in _dtypes(folder / "unet" / "diffusion_pytorch_model.safetensors").values()
    assert set(_dtypes(folder / "text_encoder" / "model.safetensors").values()) == {"F16"}
    # one call, the fp8 UNet upcast on loading like the fp16 text encoders
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    image = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=64, width=64, output_type="np").images
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_fp8_is_for_model_outputs_only(tiny_pipeline, tmp_path, cli):
    result = cli("convert", tiny_pipeline, "--to", "comfyui", "--dtype", "fp8", "--out", tmp_path / "x.safetensors",
                 ok=False)
    assert result.exit_code == 2
    from lightning_tools.errors import UsageError
    from lightning_tools.lora_tools import combine_loras

    with pytest.raises(UsageError, match="unknown dtype"):
        combine_loras([tiny_pipeline], tmp_path / "y.safetensors", rank=2, dtype="fp8")
