import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_tools import lora
from lightning_tools import provenance as meta
from lightning_tools.checkpoint import open_checkpoint, write_checkpoint
from lightning_tools.inspect import inspect_path
from lightning_tools.lora import module_names
from lightning_tools.sampling import lightning
from lightning_tools.sdxl.keys import unet_names
from lightning_tools.tiny import tiny_unet_config


@pytest.fixture(scope="module")
def files(tiny_pipeline, tiny_lora, tmp_path_factory):
    """Every format inspect must tell apart, made from the tiny fixtures with the project's own writers."""
    out = tmp_path_factory.mktemp("formats")
    ckpt = open_checkpoint(tiny_pipeline)
    write_checkpoint(ckpt, out / "all-in-one.safetensors", to="comfyui")
    write_checkpoint(ckpt, out / "unet-single.safetensors", to="comfyui-unet")
    lightning = lora.read_lora(tiny_lora)
    lora.write_lora(lightning.modules, out / "peft.safetensors", format="peft")
    single_names = {"lora_unet_" + d.replace(".", "_"): "lora_unet_" + s.replace(".", "_")
                    for d, s in ((m, unet_names(tiny_unet_config()).to_single(m))
                                 for m in module_names("unet", tiny_unet_config()))}
    renamed = {}
    for key, t in load_file(str(tiny_lora)).items():
        stem, _, part = key.partition(".")
        renamed[f"{single_names[stem]}.{part}"] = t
    save_file(renamed, str(out / "kohya-single.safetensors"))
    return {"diffusers": tiny_pipeline, "single-file": out / "all-in-one.safetensors",
            "unet-diffusers": tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors",
            "unet-diffusers folder": tiny_pipeline / "unet", "unet-single-file": out / "unet-single.safetensors",
            "kohya-diffusers": tiny_lora, "kohya-single-file": out / "kohya-single.safetensors",
            "peft": out / "peft.safetensors"}


@pytest.mark.parametrize("name", ["diffusers", "single-file", "unet-diffusers", "unet-diffusers folder",
                                  "unet-single-file", "kohya-diffusers", "kohya-single-file", "peft"])
def test_each_format_is_identified(files, name):
    info = inspect_path(files[name]).to_json()
    assert info["format"] == name.split()[0]
    assert info["architecture"] == "sdxl-base" and info["supported"]
    expected = {"diffusers": ["unet", "vae", "text_encoder", "text_encoder_2"],
                "single-file": ["unet", "vae", "text_encoder", "text_encoder_2"]}.get(name, ["unet"])
    assert info["components"] == expected
    assert info["parameters"] > 0 and info["tensors"] > 0
    text = inspect_path(files[name]).describe()
    assert info["format_description"] in text and "SDXL" in text


def test_components_add_up_and_match_the_weights(files, tiny_pipeline):
    info = inspect_path(files["diffusers"]).to_json()
    unet = load_file(str(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    assert info["per_component"]["unet"]["parameters"] == sum(t.numel() for t in unet.values())
    assert info["parameters"] == sum(p["parameters"] for p in info["per_component"].values())
    assert info["dtypes"] == {"F32": info["tensors"]}


def test_lora_modules_ranks_and_alphas(files):
    for name in ("kohya-diffusers", "kohya-single-file", "peft"):
        summary = inspect_path(files[name]).to_json()["lora"]
        assert summary["modules"] == 788 and summary["modules_per_component"] == {"unet": 788}
        assert summary["ranks"] == [4] and summary["alphas"] == [4.0] and summary["text_encoders"] == []


def test_lora_text_encoder_coverage_and_mixed_ranks(tmp_path):
    path = tmp_path / "te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(8, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 8),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0),
               "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(16, 640),
               "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(640, 16)}, str(path))
    info = inspect_path(path).to_json()
    assert info["lora"]["text_encoders"] == ["text_encoder"] and info["lora"]["ranks"] == [8, 16]
    assert info["lora"]["alphas"] == [4.0] and info["lora"]["alpha_missing"] == 1
    assert "text encoders: text_encoder" in inspect_path(path).describe()


def test_sd15_file_is_named_and_not_supported(tmp_path):
    path = tmp_path / "sd15.safetensors"
    unet = "model.diffusion_model."
    save_file({unet + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               unet + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
               unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
               unet + "input_blocks.3.0.op.bias": torch.zeros(320),
               unet + "input_blocks.6.0.op.bias": torch.zeros(640),
               unet + "input_blocks.9.0.op.bias": torch.zeros(1280),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768)}, str(path))
    info = inspect_path(path).to_json()
    assert info["architecture"] == "sd1" and not info["supported"]
    text = inspect_path(path).describe()
    assert "Stable Diffusion 1.x" in text and "not supported" in text


def test_catalogue_name_gives_identity_hint_and_settings(files, tmp_path, cli):
    path = tmp_path / "sdxl_lightning_1step_unet_x0.safetensors"
    shutil.copy(files["unet-diffusers"], path)
    info = inspect_path(path).to_json()
    assert info["identity"]["file"] == path.name and info["identity"]["matched_by"].startswith("name only")
    assert info["settings"]["steps"] == 1 and info["settings"]["prediction_type"] == "sample"
    hashed = json.loads(cli("inspect", path, "--hash", "--json", ok=True).stdout)
    assert "sha256 differs" in hashed["identity"]["matched_by"] and len(hashed["sha256"]) == 64
    assert hashed["settings"]["prediction_type"] == "sample"


def test_family_names_identify_files_and_generic_names_do_not(files, tmp_path, cli):
    hyper = tmp_path / "Hyper-SDXL-8steps-CFG-lora.safetensors"
    shutil.copy(files["kohya-diffusers"], hyper)
    info = inspect_path(hyper).to_json()
    assert (info["identity"]["family"], info["identity"]["profile"], info["identity"]["license"]) == \
        ("hyper_sd", "ddim-trailing-cfg", "openrail++")
    assert info["identity"]["matched_by"].startswith("name only")  # a tiny stand-in: the size differs
    assert (info["settings"]["profile"], info["settings"]["guidance_scale"]) == ("ddim-trailing-cfg", 5.0)
    assert "Hyper-SD ByteDance/Hyper-SD/Hyper-SDXL-8steps-CFG-lora.safetensors" in inspect_path(hyper).describe()

    generic = tmp_path / "pytorch_lora_weights.safetensors"
    shutil.copy(files["kohya-diffusers"], generic)
    info = inspect_path(generic).to_json()
    assert {c["family"] for c in info["identity"]["candidates"]} == {"tcd", "lcm_lora"}
    assert info["settings"] is None and "use --hash" in inspect_path(generic).describe()
    hashed = json.loads(cli("inspect", generic, "--hash", "--json", ok=True).stdout)
    assert hashed["identity"] is None  # not TCD's or LCM-LoRA's bytes: just a LoRA with diffusers' default name


def test_our_metadata_is_shown_readably(files, tmp_path, cli):
    path = tmp_path / "merged_lora.safetensors"
    source = meta.Source("lora", "sdxl_lightning_4step_lora.safetensors", "ab" * 32, strength=0.8)
    metadata = meta.modelspec("merged", lora=True) | meta.lightning_provenance("merge", [source], lightning(4))
    lora.write_lora(lora.read_lora(files["kohya-diffusers"]).modules, path, metadata=metadata)
    info = json.loads(cli("inspect", path, "--json", ok=True).stdout)
    assert info["settings"]["from"] == "metadata" and info["settings"]["steps"] == 4
    assert info["provenance"][meta.SOURCES][0]["strength"] == 0.8
    assert info["metadata"]["modelspec.title"] == "merged"
    text = cli("inspect", path, ok=True).stdout
    assert "source: lora sdxl_lightning_4step_lora.safetensors sha256 abababab" in text
    assert "strength 0.8" in text and "modelspec.title: merged" in text


def _truncated(tmp_path, files):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(files["kohya-diffusers"].read_bytes()[:-100])
    return path


def _not_safetensors(tmp_path, files):
    path = tmp_path / "picture.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return path


def _header_larger_than_file(tmp_path, files):
    path = tmp_path / "big-header.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    return path


def _folder(tmp_path, files):
    return files["diffusers"] / "tokenizer"


@pytest.mark.parametrize("make, reason", [
    (lambda tmp, files: tmp / "missing.safetensors", "no such file"),
    (_folder, "neither a diffusers pipeline"),
    (_not_safetensors, "is a PNG image, not a weights file"),
    (_truncated, "truncated"),
    (_header_larger_than_file, "header claims 1048576 bytes"),
])
def test_bad_input_is_one_line_error(tmp_path, files, cli, make, reason):
    result = cli("inspect", make(tmp_path, files), ok=False)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and reason in result.stderr
    assert isinstance(result.exception, SystemExit)


def test_lora_says_which_loaders_apply_all_of_it(files, cli):
    """The official kohya layout loads everywhere; a peft file is for diffusers only (ComfyUI drops its attention
    modules and ignores the alpha in the adapter metadata)."""
    kohya = json.loads(cli("inspect", files["kohya-diffusers"], "--json", ok=True).stdout)["lora"]["loaders"]
    assert kohya["diffusers"]["complete"] and kohya["comfyui"]["complete"] and kohya["forge"]["complete"]
    assert kohya["comfyui"]["alpha"] == "alpha/rank"
    peft = json.loads(cli("inspect", files["peft"], "--json", ok=True).stdout)["lora"]["loaders"]
    assert peft["diffusers"]["complete"] and not peft["comfyui"]["complete"]
    assert peft["comfyui"]["dropped"] > 0 and peft["comfyui"]["alpha"] == "ignored"
    assert "ComfyUI LoraLoader" in cli("inspect", files["peft"], ok=True).stdout


def test_an_sd15_lora_is_named_for_what_it_is_and_refused(tmp_path, cli):
    """A LoRA trained on SD1.5 (peft on an SD1.5-shaped UNet, saved the way diffusers saves LoRAs, then in kohya
    naming by diffusers' own converter) is recognised by its 768-wide cross-attention and refused in one line."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=2, sample_size=8)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    kohya = tmp_path / "sd15_style.safetensors"
    save_file(convert_state_dict_to_kohya(load_file(str(peft_file))), str(kohya))
    for path in (peft_file, kohya):
        result = cli("inspect", path, ok=False)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
        assert "a LoRA for a Stable Diffusion 1.x model, not SDXL" in result.stderr
