"""`convert` end to end on the tiny SDXL: outputs are checked by loading them with diffusers' own loaders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from lightning_tools import provenance as meta
from lightning_tools.checkpoint import open_checkpoint, write_checkpoint
from lightning_tools.errors import UserError
from lightning_tools.sdxl import keys as K
from lightning_tools.provenance import HASH_KEY
from lightning_tools.tensors import SafetensorsFile, hash_file, read_header

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _state(pipe, component):
    return getattr(pipe, component).state_dict()


def _assert_same(a, b, components=COMPONENTS):
    for c in components:
        sa, sb = _state(a, c), _state(b, c)
        assert sa.keys() == sb.keys(), c
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"{c}: {different[:3]}"


@pytest.fixture(scope="module")
def original(tiny_pipeline):
    return StableDiffusionXLPipeline.from_pretrained(tiny_pipeline, local_files_only=True)


@pytest.fixture(scope="module")
def comfy_file(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "tiny-comfy.safetensors"
    ckpt = open_checkpoint(tiny_pipeline)
    write_checkpoint(ckpt, out, "comfyui", metadata=meta.modelspec("tiny"))
    return out


@pytest.fixture(scope="module")
def lightning_unet(tiny_pipeline, tmp_path_factory):
    """A UNet-only file named like the official release (diffusers names, fp16), with other weights."""
    unet = load_file(str(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    path = tmp_path_factory.mktemp("unet") / "sdxl_lightning_4step_unet.safetensors"
    save_file({k: (v * 1.5).half() for k, v in unet.items()}, str(path))
    return path


def test_diffusers_to_comfyui_loads_bit_for_bit_in_diffusers(cli, tiny_pipeline, original, tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = cli("convert", tiny_pipeline, "--to", "comfyui", "--out", out, "--json", ok=True)
    assert json.loads(result.stdout)["unknown_keys"] == []
    loaded = StableDiffusionXLPipeline.from_single_file(out, config=str(tiny_pipeline), local_files_only=True)
    _assert_same(original, loaded)
    tensors, metadata, data_start = read_header(out)
    assert metadata[HASH_KEY] == "0x" + hash_file(out, data_start)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta.read_sources(metadata) == [{"role": "source", "file": tiny_pipeline.name}]
    assert tensors[K.PREFIXES["text_encoder"] + K.POSITION_IDS].dtype == "I64"


def test_comfyui_to_diffusers_loads_bit_for_bit(cli, comfy_file, tiny_pipeline, original, tmp_path):
    out = tmp_path / "pipe"
    cli("convert", comfy_file, "--to", "diffusers", "--out", out, "--config", tiny_pipeline, ok=True)
    _assert_same(original, StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True))
    unet_meta = SafetensorsFile(out / "unet" / "diffusion_pytorch_model.safetensors").metadata
    assert unet_meta["modelspec.title"] == "tiny"  # the input's own metadata is kept
    source = meta.read_sources(unet_meta)[0]
    assert source["sha256"] == read_header(comfy_file)[1][HASH_KEY][2:]  # known from the header: not re-hashed


def test_unet_only_with_base_gives_a_complete_checkpoint(cli, lightning_unet, tiny_pipeline, tmp_path):
    out = tmp_path / "lightning.safetensors"
    cli("convert", lightning_unet, "--to", "comfyui", "--out", out, "--base", tiny_pipeline, ok=True)
    loaded = StableDiffusionXLPipeline.from_single_file(out, config=str(tiny_pipeline), local_files_only=True)
    want = load_file(str(lightning_unet))
    got = _state(loaded, "unet")
    assert all(torch.equal(got[k].half(), want[k]) for k in want)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    _assert_same(base, loaded, ("vae", "text_encoder", "text_encoder_2"))
    metadata = SafetensorsFile(out).metadata
    assert metadata[meta.STEPS] == "4" and metadata[meta.PREDICTION_TYPE] == "epsilon"
    assert [s["role"] for s in meta.read_sources(metadata)] == ["source", "base"]
    assert meta.read_sources(metadata)[0]["sha256"] == hash_file(lightning_unet)

    folder = tmp_path / "lightning-diffusers"  # the base may be a single file; configs then come from --config
    cli("convert", lightning_unet, "--to", "diffusers", "--out", folder, "--base", out, "--config", tiny_pipeline,
        ok=True)
    _assert_same(loaded, StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))


def test_comfyui_unet_and_back(cli, lightning_unet, tmp_path):
    comfy = tmp_path / "unet-comfy.safetensors"
    cli("convert", lightning_unet, "--to", "comfyui-unet", "--out", comfy, ok=True)
    assert all(k.startswith(K.UNET_PREFIX) for k in read_header(comfy)[0])
    back = tmp_path / "unet-back.safetensors"
    cli("convert", comfy, "--to", "diffusers", "--out", back, ok=True)
    a, b = load_file(str(lightning_unet)), load_file(str(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_casts_floats_and_keeps_integers(cli, comfy_file, tmp_path):
    out = tmp_path / "half.safetensors"
    cli("convert", comfy_file, "--to", "comfyui", "--out", out, "--dtype", "bf16", ok=True)
    tensors = read_header(out)[0]
    assert tensors[K.PREFIXES["text_encoder"] + K.POSITION_IDS].dtype == "I64"
    assert {t.dtype for k, t in tensors.items() if not k.endswith("position_ids")} == {"BF16"}
    ids = SafetensorsFile(out).load(K.PREFIXES["text_encoder"] + K.POSITION_IDS)
    assert torch.equal(ids, torch.arange(77).unsqueeze(0))


def test_unknown_keys_are_reported_or_refused(cli, comfy_file, tiny_pipeline, tmp_path):
    extra = tmp_path / "extra.safetensors"
    tensors = load_file(str(comfy_file))
    tensors["model_ema.decay"] = torch.tensor(0.999)
    save_file(tensors, str(extra))
    result = cli("convert", extra, "--to", "comfyui", "--out", tmp_path / "o.safetensors", ok=True)
    assert "1 tensors fit no SDXL key map" in result.stderr and "model_ema.decay" in result.stderr
    assert "model_ema.decay" not in read_header(tmp_path / "o.safetensors")[0]
    result = cli("convert", extra, "--to", "comfyui", "--out", tmp_path / "s.safetensors", "--strict", ok=False)
    assert "model_ema.decay" in result.stderr and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--to", "comfyui"], "has no VAE, CLIP-L text encoder, OpenCLIP-bigG text encoder"),
    (["--to", "diffusers"], "has no VAE"),
    (["--to", "kohya"], "is not a LoRA"),
])
def test_incomplete_or_wrong_inputs_are_refused(cli, lightning_unet, tmp_path, args, message):
    result = cli("convert", lightning_unet, *args, "--out", tmp_path / "o", ok=False)
    assert message in result.stderr and "\n" not in result.stderr.strip()
    assert not (tmp_path / "o").exists()


def test_other_models_are_refused(cli, tmp_path):
    sd1 = {"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3),
           "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (4, 768),
           **{f"model.diffusion_model.input_blocks.{i}.0.op.weight": (4, 4, 3, 3) for i in (3, 6, 9)},
           "first_stage_model.encoder.conv_in.weight": (4, 3, 3, 3)}
    path = tmp_path / "sd15.safetensors"
    save_file({k: torch.zeros(s) for k, s in sd1.items()}, str(path))
    result = cli("convert", path, "--to", "diffusers", "--out", tmp_path / "o", ok=False)
    assert "looks like a Stable Diffusion 1.x model" in result.stderr


def test_existing_output_and_missing_tokenizers(cli, comfy_file, tmp_path):
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    result = cli("convert", comfy_file, "--to", "comfyui", "--out", taken, ok=False)
    assert "--overwrite" in result.stderr and taken.read_bytes() == b"keep me"
    # No --config: the tiny widths do not fit the bundled SDXL configs, which the error says how to fix.
    result = cli("convert", comfy_file, "--to", "diffusers", "--out", tmp_path / "p", ok=False)
    assert "pass --config DIR" in result.stderr


@pytest.fixture
def configs_only(tiny_pipeline, tmp_path):
    """The tiny pipeline's model configs without its tokenizers."""
    folder = tmp_path / "configs"
    for c in COMPONENTS:
        (folder / c).mkdir(parents=True)
        shutil.copy(tiny_pipeline / c / "config.json", folder / c)
    shutil.copy(tiny_pipeline / "model_index.json", folder)
    return folder


def test_missing_tokenizers_are_a_clear_error_when_the_hub_cannot_help(comfy_file, configs_only, tmp_path):
    ckpt = open_checkpoint(comfy_file, config_dir=configs_only)  # HF_ENDPOINT is a closed port in tests
    with pytest.raises(UserError, match="no tokenizer files .*cannot be asked.* pass --config DIR"):
        write_checkpoint(ckpt, tmp_path / "p", "diffusers", config_dir=configs_only)
    assert not (tmp_path / "p").exists()


def test_tokenizers_are_downloaded_from_the_sdxl_base_repo_once(hub_server, comfy_file, configs_only, tmp_path):
    """The SDXL base repo on the hub keeps the slow tokenizer layout transformers 4 wrote (vocab.json,
    merges.txt, special_tokens_map.json, tokenizer_config.json): every file of it is copied."""
    from lightning_tools.sdxl import SDXL_BASE_REPO
    from lightning_tools.tiny import write_tiny_tokenizer

    served = tmp_path / "served"
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_tiny_tokenizer(served / folder, pad)
        for f in (served / folder).iterdir():
            hub_server.add_file(SDXL_BASE_REPO, f"{folder}/{f.name}", f.read_bytes())
    ckpt = open_checkpoint(comfy_file, config_dir=configs_only)

    write_checkpoint(ckpt, tmp_path / "a", "diffusers", config_dir=configs_only)
    asked = len(hub_server.requests)
    write_checkpoint(ckpt, tmp_path / "b", "diffusers", config_dir=configs_only)

    for out in (tmp_path / "a", tmp_path / "b"):
        for folder in ("tokenizer", "tokenizer_2"):
            assert sorted(p.name for p in (out / folder).iterdir()) == sorted(p.name for p in (served / folder).iterdir())
            for f in (out / folder).iterdir():
                assert f.read_bytes() == (served / folder / f.name).read_bytes()
    assert len(hub_server.requests) == asked  # the second conversion found them in the cache


def test_a_failed_write_leaves_no_output(tiny_pipeline, tmp_path):
    source = shutil.copytree(tiny_pipeline, tmp_path / "src")
    ckpt = open_checkpoint(source)
    weights = source / "vae" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:  # damaged after the headers were read, as a failing disk would
        f.truncate(weights.stat().st_size // 2)
    for to, out in (("comfyui", tmp_path / "o.safetensors"), ("diffusers", tmp_path / "o-folder")):
        with pytest.raises(UserError):
            write_checkpoint(ckpt, out, to)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary leftovers either


def test_lora_formats_go_through_lora_conversion(cli, tiny_lora, tmp_path):
    peft = tmp_path / "peft.safetensors"
    cli("convert", tiny_lora, "--to", "peft", "--out", peft, ok=True)
    assert all(k.startswith("unet.") for k in read_header(peft)[0])
    result = cli("convert", tiny_lora, "--to", "comfyui", "--out", tmp_path / "x.safetensors", ok=False)
    assert "is a LoRA" in result.stderr


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_text_encoder_key_form_matches_the_installed_transformers(component, tiny_pipeline):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lightning_tools.checkpoint import transformers_layout

    config = json.loads((tiny_pipeline / component / "config.json").read_text())
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        names = list(cls(CLIPTextConfig.from_dict(config)).state_dict())
    assert transformers_layout(component) == (any(n.startswith("text_model.") for n in names),
                                              any(n.endswith("position_ids") for n in names))


def test_a_lightning_model_converted_to_diffusers_keeps_its_history_and_sampler(cli, tiny_pipeline, tiny_lora,
                                                                               tmp_path):
    from diffusers import EulerDiscreteScheduler

    merged = tmp_path / "merged.safetensors"
    cli("merge", "--base", tiny_pipeline, "--lora", tiny_lora, "--strength", 0.8, "--out", merged, ok=True)
    out = tmp_path / "merged-diffusers"

    cli("convert", merged, "--to", "diffusers", "--config", tiny_pipeline, "--out", out, ok=True)

    scheduler = EulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.prediction_type == "epsilon"
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    sources = meta.read_sources(SafetensorsFile(out / "unet" / "diffusion_pytorch_model.safetensors").metadata)
    assert [s["role"] for s in sources] == ["base", "lora", "source"]
    assert sources[1]["strength"] == 0.8 and sources[2]["file"] == merged.name
    base_scheduler = json.loads((tiny_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert base_scheduler["timestep_spacing"] == "leading"  # the input folder is untouched


def test_unreadable_lightning_settings_in_the_input_do_not_break_a_conversion(cli, comfy_file, tiny_pipeline,
                                                                              tmp_path):
    from lightning_tools.stream import LazyTensor, write_file

    source = SafetensorsFile(comfy_file)
    odd = tmp_path / "odd.safetensors"
    write_file(odd, {k: LazyTensor.of(source, k) for k in source}, metadata={meta.SETTINGS: "{not json"})
    out = tmp_path / "out"

    cli("convert", odd, "--to", "diffusers", "--config", tiny_pipeline, "--out", out, ok=True)

    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "leading"  # nothing trustworthy says it is a Lightning model
