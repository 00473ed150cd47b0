"""`merge` checked against diffusers' own `load_lora_weights` + `fuse_lora` on the tiny pipeline."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from lightning_tools import provenance as meta
from lightning_tools.checkpoint import open_checkpoint, write_checkpoint
from lightning_tools.lora import read_lora
from lightning_tools.merge import apply_plan, merge, plan_merge
from lightning_tools.tensors import TensorSource, hash_file
from lightning_tools.tiny import make_lightning_lora, tiny_unet_config
from lora_fixtures import kohya_te_lora, kohya_unet_lora, peft_via_diffusers, to_single_file_names, unet_config, write

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FP16 = dict(rtol=2**-10, atol=1e-5)  # one rounding to fp16 of values around 0.02-1
FP32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def loras(tiny_pipeline, tmp_path_factory):
    """Named LoRA files for the tiny pipeline: the official format, its single-file-named twin, a peft file
    written by diffusers, and a text-encoder + UNet LoRA (alpha != rank)."""
    folder = tmp_path_factory.mktemp("loras")
    official = kohya_unet_lora(tiny_pipeline, seed=3)
    files = {
        "official": write(official, folder / "sdxl_lightning_4step_lora.safetensors"),
        "single_file": write(to_single_file_names(official, unet_config(tiny_pipeline)), folder / "sf.safetensors"),
        "with_te": write(kohya_unet_lora(tiny_pipeline, alpha=2.0, seed=4) | kohya_te_lora(tiny_pipeline),
                         folder / "style_te.safetensors"),
    }
    files["peft"] = peft_via_diffusers(tiny_pipeline, files["with_te"], folder / "peft")
    return files


@pytest.fixture(scope="module")
def fused(tiny_pipeline):
    """fused(files, strengths) -> diffusers' merged state dicts per component (cached)."""
    cache = {}

    def run(files, strengths):
        key = (tuple(files), tuple(strengths))
        if key not in cache:
            cache[key] = _diffusers_fuse(tiny_pipeline, files, strengths)
        return cache[key]

    return run


def _diffusers_fuse(pipeline, files, strengths):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, local_files_only=True)
    names = [f"l{i}" for i in range(len(files))]
    for name, path in zip(names, files):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(files) == 1:
        pipe.fuse_lora(lora_scale=strengths[0])
    else:
        pipe.set_adapters(names, list(strengths))
        pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


@pytest.fixture(scope="module")
def base_weights(tiny_pipeline):
    return {c: _read(tiny_pipeline / c / ("diffusion_pytorch_model.safetensors" if c == "unet" else "model.safetensors"))
            for c in COMPONENTS}


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _folder_weights(folder):
    return {c: _read(next((folder / c).glob("*.safetensors"))) for c in COMPONENTS}


def _single_file_pipeline(path, config_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True)


def _pipeline_weights(pipe):
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS}


def _assert_merged(ours, reference, base, tolerance, components=COMPONENTS):
    """Every weight equals diffusers' fused one; those diffusers left unchanged are bit-identical to the base."""
    for c in components:
        assert ours[c].keys() >= reference[c].keys() - {k for k in reference[c] if k.endswith("position_ids")}
        changed = 0
        for key, expected in reference[c].items():
            if key not in ours[c]:
                continue
            got = ours[c][key]
            if torch.equal(expected, base[c][key]):
                assert got.dtype == base[c][key].dtype and torch.equal(got, base[c][key]), f"{c}/{key} changed"
            else:
                changed += 1
                torch.testing.assert_close(got.float(), expected, **tolerance, msg=f"{c}/{key}")
        assert changed, f"nothing merged in {c}"


def test_official_lora_into_diffusers_folder_matches_diffusers(tiny_pipeline, loras, fused, base_weights, tmp_path, cli):
    out = tmp_path / "merged"
    cli("merge", "--base", tiny_pipeline, "--lora", loras["official"], "--strength", "0.8", "--out", out, ok=True)
    ours = _folder_weights(out)
    _assert_merged(ours, fused([loras["official"]], [0.8]), base_weights, FP32, ("unet",))
    for c in ("text_encoder", "text_encoder_2"):
        assert all(torch.equal(v, base_weights[c][k]) for k, v in ours[c].items() if k in base_weights[c])
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        written = f.metadata()
    assert written[meta.STEPS] == "4" and json.loads(written[meta.SETTINGS])["timestep_spacing"] == "trailing"
    sources = json.loads(written[meta.SOURCES])
    assert [s["role"] for s in sources] == ["base", "lora"]
    assert sources[1] == {"role": "lora", "file": loras["official"].name, "sha256": hash_file(loras["official"]),
                          "sha256_of": "file", "strength": 0.8}


def test_single_file_output_loads_in_diffusers_and_renders(tiny_pipeline, loras, fused, base_weights, tmp_path, cli):
    """fp16 single file with UNet and both text encoders merged (OpenCLIP q/k/v fused after merging)."""
    out = tmp_path / "merged.safetensors"
    cli("merge", "--base", tiny_pipeline, "--lora", loras["with_te"], "--strength", "0.7", "--out", out,
        "--dtype", "fp16", ok=True)
    pipe = _single_file_pipeline(out, tiny_pipeline)
    reference = {c: {k: v.half().float() for k, v in d.items()} for c, d in fused([loras["with_te"]], [0.7]).items()}
    base16 = {c: {k: v.half().float() if v.is_floating_point() else v for k, v in d.items()}
              for c, d in base_weights.items()}
    ours = {c: {k: v.float() if v.is_floating_point() else v for k, v in d.items()}
            for c, d in _pipeline_weights(pipe).items()}
    _assert_merged(ours, reference, base16, FP16)
    image = pipe("a cat", num_inference_steps=2, guidance_scale=0.0, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


@pytest.mark.parametrize("name, twin, strength, to", [("single_file", "official", 0.8, "comfyui"),
                                                       ("peft", "with_te", 0.7, "diffusers")])
def test_other_lora_formats_match_diffusers(tiny_pipeline, loras, fused, base_weights, tmp_path, cli, name, twin,
                                            strength, to):
    """Each file holds the same weights as its twin under other names, so diffusers fuses both alike."""
    out = tmp_path / ("merged.safetensors" if to == "comfyui" else "merged")
    cli("merge", "--base", tiny_pipeline, "--lora", loras[name], "--strength", strength, "--out", out, ok=True)
    ours = _pipeline_weights(_single_file_pipeline(out, tiny_pipeline)) if to == "comfyui" else _folder_weights(out)
    components = COMPONENTS if name == "peft" else ("unet",)
    _assert_merged(ours, fused([loras[twin]], [strength]), base_weights, FP32, components)


def test_two_loras_with_their_own_strengths(tiny_pipeline, loras, fused, base_weights, tmp_path, cli):
    out = tmp_path / "merged"
    cli("merge", "--base", tiny_pipeline, "--lora", loras["official"], "--lora", loras["with_te"],
        "--strength", "0.9", "--strength", "-0.4", "--out", out, ok=True)
    reference = fused([loras["official"], loras["with_te"]], [0.9, -0.4])
    _assert_merged(_folder_weights(out), reference, base_weights, FP32)


def test_single_file_and_unet_only_bases(tiny_pipeline, loras, fused, base_weights, tmp_path, cli):
    """A ComfyUI base (made by convert) into a ComfyUI file, and a bare diffusers UNet into a UNet file."""
    from diffusers import UNet2DConditionModel

    single = tmp_path / "base.safetensors"
    write_checkpoint(open_checkpoint(tiny_pipeline), single, "comfyui")
    out = tmp_path / "from_single.safetensors"
    cli("merge", "--base", single, "--config", tiny_pipeline, "--lora", loras["with_te"], "--strength", "0.7",
        "--out", out, ok=True)
    _assert_merged(_pipeline_weights(_single_file_pipeline(out, tiny_pipeline)), fused([loras["with_te"]], [0.7]),
                   base_weights, FP32)

    unet_out = tmp_path / "unet.safetensors"
    cli("merge", "--base", tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors", "--config", tiny_pipeline,
        "--lora", loras["official"], "--strength", "0.8", "--out", unet_out, ok=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    unet.load_state_dict(_read(unet_out))
    _assert_merged({"unet": unet.state_dict()}, fused([loras["official"]], [0.8]), base_weights, FP32, ("unet",))


def test_mismatched_lora_is_refused_before_writing(tiny_pipeline, tmp_path, cli):
    """A LoRA trained for another width (names resolve, shapes do not), as an SD1.5 LoRA on SDXL would."""
    other = write(make_lightning_lora(tiny_unet_config() | {"block_out_channels": [16, 32, 64]}),
                  tmp_path / "other.safetensors")
    out = tmp_path / "merged.safetensors"
    result = cli("merge", "--base", tiny_pipeline, "--lora", other, "--out", out, ok=False)
    assert "788 LoRA modules find no matching weight" in result.stderr and "does not fit" in result.stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["other.safetensors"]


def test_allow_unmatched_skips_with_a_warning(tiny_pipeline, tiny_lora, tmp_path, cli):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1.5 only
    extra = {stem + ".lora_down.weight": torch.zeros(4, 8), stem + ".lora_up.weight": torch.zeros(8, 4)}
    mixed = write(_read(tiny_lora) | extra, tmp_path / "mixed.safetensors")
    out = tmp_path / "merged.safetensors"
    refused = cli("merge", "--base", tiny_pipeline, "--lora", mixed, "--out", out, ok=False)
    assert stem in refused.stderr and not out.exists()
    result = cli("merge", "--base", tiny_pipeline, "--lora", mixed, "--out", out, "--allow-unmatched", "--json",
                 ok=True)
    assert "skipped 1 LoRA modules" in result.stderr
    assert json.loads(result.stdout)["tensors_merged"] == len(_read(tiny_lora)) // 3 and out.is_file()


def test_dry_run_reports_the_plan_and_writes_nothing(tiny_pipeline, loras, tmp_path, cli):
    out = tmp_path / "merged.safetensors"
    result = cli("merge", "--base", tiny_pipeline, "--lora", loras["with_te"], "--out", out, "--dry-run",
                 "--dtype", "fp16", "--json", ok=True)
    plan = json.loads(result.stdout)
    lora = read_lora(loras["with_te"])
    expected = {c: sum(m.component == c for m in lora.modules) for c in COMPONENTS}
    assert plan["loras"][0]["matched"] == expected and plan["target"] == "comfyui"
    base_bytes = sum(TensorSource.open(tiny_pipeline / c).nbytes() for c in ("unet", "vae", "text_encoder",
                                                                                "text_encoder_2"))
    assert plan["estimated_bytes"] == base_bytes // 2  # the fp32 base in fp16
    assert not out.exists()


def test_strength_count_must_match(tiny_pipeline, loras, tmp_path, cli):
    result = cli("merge", "--base", tiny_pipeline, "--lora", loras["official"], "--lora", loras["with_te"],
                 "--strength", "1", "--strength", "1", "--strength", "1", "--out", tmp_path / "m", ok=False)
    assert "3 strengths for 2 LoRAs" in result.stderr


def test_existing_output_is_kept_without_overwrite(tiny_pipeline, tiny_lora, tmp_path, cli):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"mine")
    result = cli("merge", "--base", tiny_pipeline, "--lora", tiny_lora, "--out", out, ok=False)
    assert "already exists" in result.stderr and out.read_bytes() == b"mine"


def test_interrupted_merge_leaves_no_output(pipeline_copy, tiny_lora, tmp_path):
    """The base's UNet file is cut short after it was opened: writing fails mid-stream, nothing is left."""
    base = open_checkpoint(pipeline_copy)
    lora = read_lora(tiny_lora)
    merged = apply_plan(base, plan_merge(base, [lora], [1.0]))
    weights = pipeline_copy / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    for to, out in (("comfyui", out_dir / "merged.safetensors"), ("diffusers", out_dir / "merged")):
        with pytest.raises(Exception):
            write_checkpoint(merged, out, to)
        assert os.listdir(out_dir) == []


def test_cuda_device_without_a_gpu_is_a_clear_error(tiny_pipeline, tiny_lora, tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = cli("merge", "--base", tiny_pipeline, "--lora", tiny_lora, "--out", tmp_path / "m.safetensors",
                 "--device", "cuda", ok=False)
    assert "CUDA is not available" in result.stderr


def test_merge_library_call_returns_the_report(tiny_pipeline, tiny_lora, tmp_path):
    report = merge(tiny_pipeline, [tiny_lora], tmp_path / "m.safetensors", strengths=[1.0], dtype="bf16")
    assert report.written.layout == "single-file" and report.tensors_merged == len(_read(tiny_lora)) // 3
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"BF16", "I64"}
