"""merge beyond one LoRA at one strength: add-difference against the plain torch expression on models written
by diffusers' `save_pretrained` (in mixed layouts), combined with LoRAs (checked with diffusers' `fuse_lora`),
per-block strengths (checked with diffusers' `set_adapters` block scales, and for what 0 and 1 must do), the
recipe recorded in the output, and recipes that use them."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lightning_tools import provenance as meta
from lightning_tools.blocks import block_of
from lightning_tools.checkpoint import open_checkpoint, write_checkpoint
from lightning_tools.tensors import hash_file, read_header
from lightning_tools.tiny import tiny_unet_config, write_tiny_pipeline
from lora_fixtures import kohya_te_lora, kohya_unet_lora, write

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FP32 = dict(rtol=1e-5, atol=1e-6)
ALPHA = 0.7


@pytest.fixture(scope="module")
def models(tiny_pipeline, tmp_path_factory):
    """The fine-tune (the tiny pipeline), a tuned model and the model it was tuned from (other seeds, written by
    save_pretrained), and the tuned one as a UNet-only ComfyUI file (fp16, as the official Lightning UNets) and
    the minus one as an all-in-one ComfyUI file."""
    folder = tmp_path_factory.mktemp("difference")
    tuned, minus = write_tiny_pipeline(folder / "tuned", seed=1), write_tiny_pipeline(folder / "minus", seed=2)
    tuned_unet = folder / "sdxl_lightning_4step_unet.safetensors"  # named like the official file
    write_checkpoint(open_checkpoint(tuned), tuned_unet, "comfyui-unet", dtype="F16")
    minus_file = folder / "minus.safetensors"
    write_checkpoint(open_checkpoint(minus), minus_file, "comfyui")
    return {"base": tiny_pipeline, "tuned": tuned, "minus": minus, "tuned_unet": tuned_unet,
            "minus_file": minus_file}


@pytest.fixture(scope="module")
def lora_file(tiny_pipeline, tmp_path_factory):
    """A style LoRA on the UNet and both text encoders (alpha != rank)."""
    return write(kohya_unet_lora(tiny_pipeline, alpha=2.0, seed=5) | kohya_te_lora(tiny_pipeline),
                 tmp_path_factory.mktemp("style") / "style.safetensors")


def _weights(folder) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's tensors as stored in a diffusers folder (the names diffusers and transformers load)."""
    return {c: load_file(next((folder / c).glob("*.safetensors"))) for c in COMPONENTS}


def _single_file(path, config_dir, dtype=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                      torch_dtype=dtype)
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS}


def _floating(key: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and "position_ids" not in key


def test_add_difference_equals_the_torch_expression_exactly_in_fp32(models, tmp_path, cli):
    """Base a diffusers folder, tuned a UNet-only ComfyUI file in fp16, minus an all-in-one ComfyUI file; out a
    ComfyUI file read back by diffusers: every UNet tensor is W + A * (T - B) bit for bit, the rest the base's."""
    out = tmp_path / "lightningized.safetensors"
    result = cli("merge", "--base", models["base"], "--add-difference", models["tuned_unet"], "--minus",
                 models["minus_file"], "--alpha", ALPHA, "--config", models["base"], "--out", out, "--json", ok=True)
    report = json.loads(result.stdout)
    ours, base, tuned, minus = (_single_file(out, models["base"]), _weights(models["base"]), _weights(models["tuned"]),
                                _weights(models["minus"]))
    assert report["differences"][0]["tensors"] == {"unet": len(base["unet"])}  # the tuned file is a UNet only
    for key, w in base["unet"].items():
        expected = w + ALPHA * (tuned["unet"][key].half().float() - minus["unet"][key])
        assert ours["unet"][key].dtype == torch.float32 and torch.equal(ours["unet"][key], expected), key
    for c in ("text_encoder", "text_encoder_2"):
        assert all(torch.equal(ours[c][k], w) for k, w in base[c].items() if _floating(k, w))


def test_add_difference_in_fp16_is_the_fp32_result_rounded_once(models, tmp_path, cli):
    """Full tuned and minus models (text encoders too), output fp16: each tensor is the fp32 expression rounded
    once to fp16."""
    out = tmp_path / "merged"
    cli("merge", "--base", models["base"], "--add-difference", models["tuned"], "--minus", models["minus_file"],
        "--config", models["base"], "--alpha", ALPHA, "--dtype", "fp16", "--out", out, ok=True)
    ours, base, tuned, minus = (_weights(out), _weights(models["base"]), _weights(models["tuned"]),
                                _weights(models["minus"]))
    changed = 0
    for c in COMPONENTS:
        for key, w in base[c].items():
            if not _floating(key, w):
                continue
            expected = (w + ALPHA * (tuned[c][key] - minus[c][key])).half()
            assert ours[c][key].dtype == torch.float16 and torch.equal(ours[c][key], expected), f"{c}/{key}"
            changed += not torch.equal(expected, w.half())
    assert changed > 0.75 * sum(len(b) for b in base.values())  # norms start alike in every seed


def test_a_difference_and_a_lora_in_one_pass_match_diffusers_fusing_the_lora_after(models, lora_file, tmp_path,
                                                                                  cli):
    from diffusers import StableDiffusionXLPipeline

    plain, both = tmp_path / "plain", tmp_path / "both"
    common = ["--base", models["base"], "--add-difference", models["tuned"], "--minus", models["minus"]]
    cli("merge", *common, "--out", plain, ok=True)
    cli("merge", *common, "--lora", lora_file, "--strength", 0.8, "--out", both, ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(plain, local_files_only=True)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    ours = _weights(both)
    for c in COMPONENTS:
        for key, expected in getattr(pipe, c).state_dict().items():
            torch.testing.assert_close(ours[c][key], expected, **FP32, msg=f"{c}/{key}")


def test_models_of_another_shape_are_refused_before_writing(models, tmp_path, cli):
    from diffusers import UNet2DConditionModel

    wider = tmp_path / "wider"
    UNet2DConditionModel(**(tiny_unet_config() | {"block_out_channels": [16, 32, 64]})).save_pretrained(wider)
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    result = cli("merge", "--base", models["base"], "--add-difference", wider, "--minus", models["minus"],
                 "--out", out, ok=False)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "the difference does not fit the base" in result.stderr and str(wider) in result.stderr
    assert "same architecture" in result.stderr and os.listdir(out.parent) == []


@pytest.mark.parametrize("args, message", [
    (["--add-difference", "{tuned}"], "--add-difference needs --minus"),
    (["--minus", "{minus}", "--lora", "{lora}"], "--minus goes with --add-difference"),
    (["--add-difference", "{tuned}", "--minus", "{minus}", "--alpha", "1", "--alpha", "2"], "2 alphas for 1"),
    ([], "nothing to merge"),
    (["--lora", "{lora}", "--blocks", "IN:0.5,UP:1"], "no block UP"),
])
def test_usage_mistakes_are_one_line_exit_2(models, lora_file, tmp_path, cli, args, message):
    names = {"tuned": models["tuned"], "minus": models["minus"], "lora": lora_file}
    result = cli("merge", "--base", models["base"], *[a.format(**names) for a in args], "--out",
                 tmp_path / "m.safetensors", ok=False)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


# --- per-block strengths -------------------------------------------------------------------------------------------

ZEROED = ("BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "OUT03")


def test_blocks_at_0_stay_exactly_the_base_and_at_1_exactly_the_plain_merge(models, lora_file, tmp_path, cli):
    common = ["--base", models["base"], "--add-difference", models["tuned"], "--minus", models["minus"],
              "--alpha", ALPHA, "--lora", lora_file, "--strength", 0.8]
    plain, blocked, ones = tmp_path / "plain", tmp_path / "blocked", tmp_path / "ones"
    cli("merge", *common, "--out", plain, ok=True)
    cli("merge", *common, "--blocks", "IN:0,OUT03:0,BASE:0", "--out", blocked, ok=True)
    cli("merge", *common, "--blocks", ",".join(["1"] * 20), "--out", ones, ok=True)
    plain_w, blocked_w, ones_w, base_w = _weights(plain), _weights(blocked), _weights(ones), _weights(models["base"])
    config = tiny_unet_config()
    seen, changed = set(), 0
    for c in COMPONENTS:
        for key, w in base_w[c].items():
            assert torch.equal(ones_w[c][key], plain_w[c][key]), f"{c}/{key}"
            block = block_of(c, key, config)
            seen.add(block)
            expected = w if block in ZEROED else plain_w[c][key]
            assert torch.equal(blocked_w[c][key], expected), f"{c}/{key} in {block}"
            changed += block not in ZEROED and not torch.equal(blocked_w[c][key], w)
    assert changed > 500 and seen >= set(ZEROED) | {"MID", "OUT00", "OUT08"}
    recorded = json.loads(read_header(blocked / "unet" / "diffusion_pytorch_model.safetensors")[1][meta.BLOCKS])
    assert {b for b, w in recorded.items() if w == 0} == set(ZEROED) and len(recorded) == 20


def test_block_strengths_match_diffusers_set_adapters_block_scales(tiny_pipeline, tmp_path, cli):
    """diffusers scales a UNet block's resnet j with its attention j (`set_adapters` block scales), which is
    single-file input/output block n; blocks without attention keep 1 there, so they stay 1 here too. Samplers
    sit in a block of their own here and with an attention in diffusers, and diffusers' "mid" scale is its
    attention's alone, where MID is the whole middle block here: the LoRA leaves samplers and the middle block's
    resnets out. (diffusers gives blocks it has no scale for 1 whatever the adapter's weight: the strength here is
    1.)"""
    from diffusers import StableDiffusionXLPipeline

    lora = {k: v for k, v in kohya_unet_lora(tiny_pipeline, alpha=2.0, seed=6).items()
            if "samplers" not in k and "mid_block_resnets" not in k}
    path = write(lora | kohya_te_lora(tiny_pipeline, seed=7), tmp_path / "lora.safetensors")
    out = tmp_path / "merged"
    cli("merge", "--base", tiny_pipeline, "--lora", path, "--out", out, "--blocks",
        "BASE:0.5,IN04:0.3,IN05:0.7,IN07:0,IN08:1.5,MID:0.4,OUT00:1,OUT01:0,OUT02:0.2,OUT03:0.8,OUT04:0.8,OUT05:0.8",
        ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    pipe.load_lora_weights(str(path), adapter_name="x")
    scales = {"unet": {"down": {"block_1": [0.3, 0.7], "block_2": [0.0, 1.5]}, "mid": 0.4,
                       "up": {"block_0": [1.0, 0.0, 0.2], "block_1": 0.8}},
              "text_encoder": 0.5, "text_encoder_2": 0.5}
    pipe.set_adapters(["x"], [scales])
    pipe.fuse_lora(adapter_names=["x"])
    pipe.unload_lora_weights()
    ours = _weights(out)
    for c in COMPONENTS:
        for key, expected in getattr(pipe, c).state_dict().items():
            torch.testing.assert_close(ours[c][key], expected, **FP32, msg=f"{c}/{key}")


# --- provenance and recipes ----------------------------------------------------------------------------------------

def test_the_output_records_its_recipe_and_samples_like_the_tuned_model(models, lora_file, tmp_path, cli):
    out = tmp_path / "merged.safetensors"
    report = json.loads(cli("merge", "--base", models["base"], "--add-difference", models["tuned_unet"], "--minus",
                            models["minus_file"], "--alpha", ALPHA, "--lora", lora_file, "--strength", 0.5,
                            "--blocks", "OUT:0.5", "--out", out, "--json", ok=True).stdout)
    metadata = read_header(out)[1]
    sources = meta.read_sources(metadata)
    assert [s["role"] for s in sources] == ["base", "add_difference", "minus", "lora"]
    assert sources[1] == {"role": "add_difference", "file": models["tuned_unet"].name, "strength": ALPHA,
                          "sha256": hash_file(models["tuned_unet"]), "sha256_of": "file"}
    assert sources[2]["strength"] == ALPHA and sources[2]["sha256"] == hash_file(models["minus_file"])
    assert sources[3]["strength"] == 0.5
    assert json.loads(metadata[meta.BLOCKS])["OUT04"] == 0.5 and json.loads(metadata[meta.BLOCKS])["IN04"] == 1
    # the tuned UNet is named like SDXL-Lightning's 4-step UNet: the output samples as it does
    assert metadata[meta.STEPS] == "4" and metadata[meta.FAMILY] == "lightning"
    assert report["accelerators"][0]["role"] == "add_difference"
    card = tmp_path / "card.md"
    cli("publish", out, "--repo-id", "me/lightningized", "--config", models["base"], "--dry-run", "--card", card,
        ok=True)
    text = card.read_text()
    assert f"| add_difference | `{models['tuned_unet'].name}`" in text and f"| {ALPHA:g} |" in text
    assert "| minus | `minus.safetensors`" in text and "Per-block strengths" in text and '"OUT04": 0.5' in text
    assert "base_model_relation: merge" in text


def test_a_lightning_difference_and_a_lightning_lora_are_stacking(models, tiny_lora, tmp_path, cli):
    out = tmp_path / "merged.safetensors"
    result = cli("merge", "--base", models["base"], "--add-difference", models["tuned_unet"], "--minus",
                 models["minus_file"], "--lora", tiny_lora, "--out", out, ok=False)
    assert "stacks 2 few-step accelerators" in result.stderr and not out.exists()


def test_a_recipe_merges_a_difference_per_block_and_reruns_when_an_input_changes(models, tmp_path, cli):
    tuned = shutil.copy(models["tuned_unet"], tmp_path / "tuned.safetensors")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
[vars]
workdir = "{tmp_path / 'build'}"

[[steps]]
name = "lightningize"
run = "merge"
base = "{models['base']}"
add_difference = "{tuned}"
minus = "{models['minus_file']}"
alpha = 0.9
blocks = "IN:0.5,MID:1,OUT:0.8"
config = "{models['base']}"
out = "{tmp_path / 'build' / 'lightningized.safetensors'}"
""")
    cli("run", recipe, ok=True)
    written = tmp_path / "build" / "lightningized.safetensors"
    assert json.loads(read_header(written)[1][meta.BLOCKS])["IN03"] == 0.5
    assert "1 skipped" in cli("run", recipe, ok=True).stdout
    shutil.copy(models["minus_file"], tuned)  # another "tuned" model: the step runs again
    assert "1 step(s) ran" in cli("run", recipe, ok=True).stdout
