"""Which loaders apply a LoRA file. diffusers' claims are checked by loading each file with `load_lora_weights` on
the tiny pipeline; ComfyUI's, Forge's and A1111's against their published SDXL key rules (we cannot run them)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lightning_tools.convert import convert_lora
from lightning_tools.loaders import LOADERS, coverage, comfyui_ready, describe, kohya_copy
from lightning_tools.lora import read_lora, te_canonical
from lora_fixtures import (kohya_te_lora, kohya_unet_lora, kohya_via_diffusers, lycoris_locon, peft_via_diffusers,
                           to_single_file_names, unet_config, write)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ATTENTION = re.compile(r"\.attn[12]\.to_(q|k|v|out\.0)$")
A1111_MISPLACED = "lora_unet_up_blocks_0_upsamplers_0_conv"  # SD1.5's layout puts it at output_blocks.2.1.conv


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def files(tiny_pipeline, tmp_path_factory):
    """The LoRA files people meet, each made by the tool that writes it. The source is the official format (UNet,
    rank 4, alpha 2) plus kohya text encoder modules on every projection of both encoders (alpha 2)."""
    d = tmp_path_factory.mktemp("loaders")
    source = write(kohya_unet_lora(tiny_pipeline, alpha=2.0) | kohya_te_lora(tiny_pipeline), d / "source.safetensors")
    diffusers_peft = peft_via_diffusers(tiny_pipeline, source, d / "diffusers")
    convert_lora(source, "peft", d / "our_peft.safetensors")
    convert_lora(diffusers_peft, "kohya", d / "our_kohya.safetensors")
    return {
        "source": source,
        "our peft": d / "our_peft.safetensors",
        "our kohya": d / "our_kohya.safetensors",
        "diffusers peft": diffusers_peft,
        "diffusers kohya": kohya_via_diffusers(diffusers_peft, d / "diffusers_kohya.safetensors"),
        "kohya single-file": write(to_single_file_names(_tensors(source), unet_config(tiny_pipeline)),
                                   d / "single_file.safetensors"),
        "lycoris locon": lycoris_locon(tiny_pipeline, d / "locon.safetensors", tucker=False),
        "lycoris tucker": lycoris_locon(tiny_pipeline, d / "locon_tucker.safetensors", tucker=True),
        "kohya te odd": write(_odd_text_encoder_lora(tiny_pipeline, ("_q_proj.", "_mlp_fc1.")), d / "odd.safetensors"),
        "kohya te queries": write(_odd_text_encoder_lora(tiny_pipeline, ("_q_proj.",)), d / "queries.safetensors"),
    }


def _odd_text_encoder_lora(pipeline, bigg: tuple[str, ...]) -> dict:
    """kohya text encoder modules as some trainers write them: CLIP-L under the SD1 prefix `lora_te_`, and bigG on
    some projections only (`bigg`: key fragments to keep)."""
    out = {}
    for key, value in kohya_te_lora(pipeline).items():
        if key.startswith("lora_te1_"):
            out["lora_te_" + key.removeprefix("lora_te1_")] = value
        elif any(part in key for part in bigg):
            out[key] = value
    return out


@pytest.fixture(scope="module")
def claims(files):
    """name -> (the file as our reader sees it, the coverage claimed for it)."""
    loras = {name: read_lora(path) for name, path in files.items()}
    return {name: (lora, coverage(lora)) for name, lora in loras.items()}


def _adapted(pipe) -> dict[tuple[str, str], float]:
    """(component, module in our normal form) -> scale, for every layer diffusers gave the adapter "x"."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for component in COMPONENTS:
        for name, layer in getattr(pipe, component).named_modules():
            if isinstance(layer, LoraLayer) and "x" in layer.lora_A:
                out[(component, name if component == "unet" else te_canonical(name))] = layer.scaling["x"]
    return out


@pytest.mark.parametrize("name", ["our peft", "our kohya", "diffusers peft", "diffusers kohya",
                                  "kohya single-file", "lycoris locon", "lycoris tucker", "kohya te odd",
                                  "kohya te queries"])
def test_diffusers_adapts_exactly_the_modules_claimed_at_the_claimed_scale(tiny_pipeline, files, claims, name):
    from diffusers import StableDiffusionXLPipeline

    lora, claim = claims[name]
    claim = claim["diffusers"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    if claim.refused:
        with pytest.raises(ValueError):
            pipe.load_lora_weights(str(files[name]), adapter_name="x")
        assert claim.applied == 0 and not claim.complete
        return
    pipe.load_lora_weights(str(files[name]), adapter_name="x")
    adapted = _adapted(pipe)
    claimed = {(m.component, m.module): m.scale for m in lora.modules if m.name not in claim.dropped}
    assert adapted.keys() == claimed.keys()
    assert claim.applied == len(adapted) and claim.wrong_scale == 0
    for key, scale in adapted.items():
        assert scale == pytest.approx(claimed[key]), key


def test_the_files_cover_what_the_claims_need(claims):
    """Guards the fixtures: alpha differs from rank where it should, and both refusals and drops occur."""
    scales = {name: {m.scale for m in lora.modules} for name, (lora, _) in claims.items()}
    assert scales["source"] == scales["our peft"] == scales["diffusers peft"] == {0.5}
    assert scales["diffusers kohya"] == {1.0}  # convert_state_dict_to_kohya writes alpha = rank
    diffusers = {name: c["diffusers"] for name, (_, c) in claims.items()}
    assert "lora_mid" in diffusers["lycoris tucker"].refused
    assert "text_encoder_2" in diffusers["kohya te queries"].refused
    bigg_queries = {m.name for m in claims["kohya te odd"][0].modules if m.name.endswith("_q_proj")
                    and m.component == "text_encoder_2"}
    assert bigg_queries and set(diffusers["kohya te odd"].dropped) == bigg_queries
    odd = ("lycoris tucker", "kohya te queries", "kohya te odd")
    assert all(c.complete for name, c in diffusers.items() if name not in odd)


def test_our_peft_file_loses_its_attention_and_its_alpha_in_comfyui(claims):
    """The issue: ComfyUI maps peft attention only in the old processor spelling and never reads
    lora_adapter_metadata, so all 560 attention projections are dropped and the rest load at scale 1."""
    lora, c = claims["our peft"]
    unet = [m for m in lora.modules if m.component == "unet"]
    attention = {m.name for m in unet if ATTENTION.search(m.module)}
    assert len(unet) == 788 and len(attention) == 560  # SDXL's block structure: 70 transformer blocks
    comfy = c["comfyui"]
    assert set(comfy.dropped) == attention and comfy.applied == len(lora.modules) - 560
    assert comfy.alpha == "ignored" and comfy.wrong_scale == comfy.applied and not comfy.complete
    assert "attn1.processor.to_q" in comfy.note and "lora_adapter_metadata" in comfy.note
    forge = c["forge"]
    assert forge.applied == 0 and len(forge.dropped) == len(lora.modules) and "skips the whole LoRA" in forge.note
    assert c["a1111"].applied == 0 and not c["a1111"].refused
    assert c["diffusers"].complete and c["diffusers"].alpha == "alpha/rank"


def test_kohya_files_carry_alpha_every_loader_reads(claims):
    """kohya keys with diffusers names and `.alpha` tensors (what we write): complete in diffusers, ComfyUI and
    Forge; A1111 1.10 misplaces one diffusers-named module by its SD1.5 arithmetic."""
    for name in ("source", "our kohya"):
        lora, c = claims[name]
        assert lora.format == "kohya-diffusers"
        for loader in ("diffusers", "comfyui", "forge"):
            assert c[loader].complete and c[loader].alpha == "alpha/rank", (name, loader)
        assert c["a1111"].dropped == (A1111_MISPLACED,) and c["a1111"].alpha == "alpha/rank"


def test_single_file_names_load_everywhere(claims):
    lora, c = claims["kohya single-file"]
    assert lora.format == "kohya-single-file"
    assert any(m.name.startswith("lora_unet_input_blocks_") for m in lora.modules)
    assert {m.name[:9] for m in lora.modules if m.component != "unet"} == {"lora_te1_", "lora_te2_"}
    assert all(c[loader].complete and c[loader].alpha == "alpha/rank" for loader in LOADERS)


def test_what_diffusers_writes_with_transformers_5_loses_clip_l_elsewhere(claims):
    """transformers >= 5.6 names CLIPTextModel's modules without `text_model.`; diffusers writes them so (peft and
    its kohya conversion alike), and ComfyUI, Forge and A1111 only map CLIP-L names with that level."""
    lora, c = claims["diffusers peft"]
    clip_l = {m.name for m in lora.modules if m.component == "text_encoder"}
    assert clip_l and all(name.startswith("text_encoder.encoder.layers.") for name in clip_l)
    attention = {m.name for m in lora.modules if m.component == "unet" and ATTENTION.search(m.module)}
    assert set(c["comfyui"].dropped) == attention | clip_l and c["comfyui"].alpha == "ignored"

    lora, c = claims["diffusers kohya"]
    clip_l = {m.name for m in lora.modules if m.component == "text_encoder"}
    assert clip_l and all(name.startswith("lora_te1_encoder_layers_") for name in clip_l)
    assert set(c["comfyui"].dropped) == clip_l and c["comfyui"].alpha == "alpha/rank"
    assert c["forge"].applied == 0  # 3 keys per CLIP-L module unmatched: far over Forge's 12
    assert set(c["a1111"].dropped) == clip_l | {A1111_MISPLACED}
    assert comfyui_ready(lora).command  # our kohya writer spells CLIP-L with text_model


def test_a1111_needs_lora_te1_and_whole_bigg_attention_sets(claims):
    """A1111 on SDXL maps CLIP-L only as `lora_te1_text_model_*`, and applies bigG's q/k/v/out to OpenCLIP's fused
    attention only as a set of four per layer; ComfyUI and Forge take both."""
    lora, c = claims["kohya te odd"]
    assert {m.name[:9] for m in lora.modules} == {"lora_te_t", "lora_te2_"}
    applied = {m.name for m in lora.modules if m.name not in c["a1111"].dropped}
    assert applied and all(name.startswith("lora_te2_") and name.endswith("_mlp_fc1") for name in applied)
    assert c["a1111"].applied == len(applied) == 10  # the bigG stand-in has 10 layers
    assert c["comfyui"].complete and c["forge"].complete
    full = claims["source"][1]["a1111"]
    assert not any(name.startswith(("lora_te1_", "lora_te2_")) for name in full.dropped)


def test_comfyui_ready_gives_the_exact_command_and_the_copy_it_writes_loads_completely(files, claims, cli):
    src = files["our peft"]
    advice = comfyui_ready(claims["our peft"][0])
    out = kohya_copy(src)
    assert advice.copy == out == src.with_name("our_peft_kohya.safetensors")
    assert advice.command == f"lightning-tools convert {src} --to kohya --out {out}"
    assert "apply 312 of its 872 modules" in advice.problem and advice.command in str(advice)
    cli(*advice.command.split()[1:], ok=True)
    copy = read_lora(out)
    assert comfyui_ready(copy) is None
    c = coverage(copy)
    assert c["comfyui"].complete and c["forge"].complete and c["comfyui"].alpha == "alpha/rank"
    assert {(m.component, m.module, m.scale) for m in copy.modules} == \
        {(m.component, m.module, m.scale) for m in claims["our peft"][0].modules}
    assert comfyui_ready(claims["source"][0]) is None


def test_no_copy_is_offered_when_modules_name_nothing_in_sdxl(files, tmp_path):
    """An SD1.5 module (attention in the first down block, which SDXL lacks) is dropped by every loader, and no
    format we write changes that."""
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd15 = {stem + ".lora_down.weight": torch.zeros(2, 8), stem + ".lora_up.weight": torch.zeros(8, 2)}
    lora = read_lora(write(_tensors(files["source"]) | sd15, tmp_path / "mixed_arch.safetensors"))
    c = coverage(lora)
    assert all(stem in c[loader].dropped and not c[loader].complete for loader in LOADERS)
    assert f"SDXL has no module for 1 module (e.g. {stem})" in c["comfyui"].note
    advice = comfyui_ready(lora)
    assert advice.command is None and advice.copy is None and str(advice).endswith("no format we write fixes this")


def test_the_coverage_report_is_json_and_one_line(claims):
    c = claims["our peft"][1]
    data = json.loads(json.dumps({loader: cov.to_json() for loader, cov in c.items()}))
    assert list(data) == list(LOADERS)
    assert data["comfyui"]["dropped"] == 560 and len(data["comfyui"]["dropped_examples"]) == 5
    assert describe(c) == ("diffusers load_lora_weights all 872; ComfyUI LoraLoader 312/872, alpha ignored; "
                           "Forge 0/872; A1111 WebUI 0/872")


def test_the_rules_need_no_torch():
    """Importing the module and building its SDXL tables (what `coverage` adds to a read LoRA) loads no torch."""
    code = ("import sys, lightning_tools.loaders as loaders; loaders._sdxl(); "
            "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
