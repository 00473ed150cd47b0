"""Every few-step family wired through the commands: `render` of a tiny stand-in carrying each profile's official
file name runs diffusers with the scheduler, config, timesteps, guidance and eta the authors state (the table in
test_families.py, checked there against diffusers directly), the ComfyUI export names the matching sampler or says
plainly that core ComfyUI has none, merges record the profile and refuse stacked accelerators, and publish writes
the family's licence."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_tools import families as fams
from lightning_tools import provenance as prov
from lightning_tools.checkpoint import open_checkpoint, write_checkpoint
from lightning_tools.tensors import SafetensorsFile
from test_families import EXPECTED

SMALL = ("--device", "cpu", "--height", "32", "--width", "32", "--prompt", "a red cat")
PROFILES = [(fam.name, p.name) for fam in fams.families() for p in fam.profiles]

# What core ComfyUI's KSampler needs for each profile (sampler, scheduler), or None where the cards and ComfyUI
# itself offer only a custom node: TCD's sampler, and one-step schedules that start at timestep 800 or 399.
COMFY = {
    ("lightning", "euler-trailing"): ("euler", "sgm_uniform"),
    ("lightning", "euler-trailing-x0"): ("euler", "sgm_uniform"),
    ("hyper_sd", "ddim-trailing"): ("ddim", "sgm_uniform"),
    ("hyper_sd", "ddim-trailing-cfg"): ("ddim", "sgm_uniform"),
    ("hyper_sd", "tcd-unified"): None,
    ("hyper_sd", "lcm-800"): None,
    ("dmd2", "lcm-4step"): ("lcm", "sgm_uniform"),
    ("dmd2", "lcm-1step"): None,
    ("tcd", "tcd"): None,
    ("pcm", "ddim-smallcfg"): ("ddim", "sgm_uniform"),
    ("pcm", "ddim-normalcfg-4step"): ("ddim", "sgm_uniform"),
    ("pcm", "ddim-normalcfg-8step"): ("ddim", "sgm_uniform"),
    ("pcm", "ddim-normalcfg-16step"): ("ddim", "sgm_uniform"),
    ("pcm", "lcm-like"): ("lcm", "sgm_uniform"),
    ("lcm_lora", "lcm"): ("lcm", "sgm_uniform"),
    ("sdxl_turbo", "euler-ancestral-trailing"): ("euler_ancestral", "sgm_uniform"),
}


def _file(family: str, profile: str) -> fams.FamilyFile:
    """The profile's first catalogued file: the one a stand-in is named after."""
    return next(f for f in fams.family(family).files if f.profile.name == profile)


@pytest.fixture(scope="module")
def stand_in(tiny_pipeline, tiny_lora, tmp_path_factory):
    """stand_in(file) -> a tiny model under `file`'s official name: the tiny Lightning-format LoRA, the tiny UNet
    (a torch.save pickle for DMD2's .bin names) or the tiny pipeline as an all-in-one file."""
    folder = tmp_path_factory.mktemp("official-names")

    def make(file: fams.FamilyFile) -> Path:
        path = folder / file.name
        if path.exists():
            return path
        unet = tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"
        if file.kind == "lora":
            shutil.copy(tiny_lora, path)
        elif file.kind == "unet" and path.suffix == ".bin":
            torch.save(load_file(str(unet)), path)
        elif file.kind == "unet":
            shutil.copy(unet, path)
        else:
            write_checkpoint(open_checkpoint(tiny_pipeline), path, to="comfyui")
        return path

    return make


def _model_args(file: fams.FamilyFile, stand_in, tiny_pipeline: Path, request) -> tuple:
    """The render arguments for `file`'s stand-in. A generic name (diffusers' default LoRA name: TCD, LCM-LoRA)
    identifies nothing, so that stand-in is downloaded into the hub cache from a hub listing the official sha256:
    render identifies a cached file by the hash its blob is named after, as it does files fetched for real."""
    path = stand_in(file)
    if not file.name_identifies:
        from huggingface_hub import hf_hub_download

        hub_server, family = request.getfixturevalue("hub_server"), fams.family(file.family)
        hub_server.add_file(family.repo_id, file.filename, path.read_bytes(), sha256=file.sha256)
        path = Path(hf_hub_download(family.repo_id, file.filename, cache_dir=os.environ["HF_HUB_CACHE"],
                                    endpoint=hub_server.endpoint))
    return (path, "--config" if file.kind == "full" else "--base", tiny_pipeline)


def test_every_profile_has_a_comfyui_row():
    assert set(COMFY) == set(PROFILES)


@pytest.mark.parametrize("family, profile", PROFILES, ids=[f"{f}-{p}" for f, p in PROFILES])
def test_render_samples_each_profile_as_its_authors_say(cli, tiny_pipeline, stand_in, tmp_path, request, family,
                                                        profile):
    file = _file(family, profile)
    scheduler_class, config, timesteps, cfg_on, eta = EXPECTED[(family, profile, file.steps)]
    out = tmp_path / "render"

    result = cli("render", *_model_args(file, stand_in, tiny_pipeline, request), *SMALL, "--out", out, ok=True)

    assert "warning" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    ran = report["scheduler"]
    assert ran["class"] == scheduler_class
    assert {k: ran["config"][k] for k in config} == config
    assert [round(t) for t in ran["timesteps"]] == timesteps  # what the pipeline iterated over
    assert (report["guidance_scale"] > 1) is cfg_on and report["steps"] == len(timesteps)
    assert report["settings"]["eta"] == (eta or None)  # DDIM's own default eta is 0: the profile passes none
    assert (report["settings"]["family"], report["settings"]["profile"]) == (family, profile)
    how = "file name" if file.name_identifies else "sha256"
    assert report["settings_source"] == f"catalog ({how}: {fams.family(family).title} {file.name})"
    if file.kind == "lora":
        assert report["model"]["lora_strength"] == file.profile.lora_strength
    assert f"profile {family} {profile} (from catalog ({how}" in result.stdout
    assert report["passed"]


@pytest.mark.parametrize("family, profile", PROFILES, ids=[f"{f}-{p}" for f, p in PROFILES])
def test_print_comfyui_gives_the_matching_sampler(cli, tiny_pipeline, stand_in, request, family, profile):
    file = _file(family, profile)
    args = ("render", *_model_args(file, stand_in, tiny_pipeline, request), "--print-comfyui")

    data = json.loads(cli(*args, "--json", ok=True).stdout)
    text = cli(*args, ok=True).stdout

    comfy, expected = data["comfyui"], COMFY[(family, profile)]
    if expected is None:
        assert data["core_equivalent"] is False and comfy["custom_node"]
        assert "no core-ComfyUI equivalent" in text and "KSampler:" not in text
    else:
        assert data["core_equivalent"] and (comfy["sampler_name"], comfy["scheduler"]) == expected
        assert f"KSampler: sampler {expected[0]}, scheduler {expected[1]}" in text
    guidance = file.profile.guidance_scale
    assert comfy["cfg"] == (guidance if guidance > 1 else 1.0) and comfy["steps"] == file.steps
    assert comfy["model_sampling"] == ("x0" if file.prediction_type == "sample" else None)


def test_comfyui_workflow_follows_the_profile_or_is_refused(cli, tiny_pipeline, stand_in, tmp_path):
    dmd2 = fams.family("dmd2").find(4, "lora")
    flow_path = tmp_path / "dmd2.json"
    cli("render", stand_in(dmd2), "--base", tiny_pipeline, "--comfyui-workflow", flow_path, ok=True)
    nodes = {n["class_type"]: n["inputs"] for n in json.loads(flow_path.read_text()).values()}
    assert (nodes["KSampler"]["sampler_name"], nodes["KSampler"]["scheduler"], nodes["KSampler"]["steps"]) == \
        ("lcm", "sgm_uniform", 4)
    assert nodes["LoraLoader"]["strength_model"] == dmd2.profile.lora_strength

    tcd = fams.family("tcd").files[0]  # only its hash identifies it: --family says what it is
    refused = cli("render", stand_in(tcd), "--base", tiny_pipeline, "--family", "tcd", "--comfyui-workflow",
                  tmp_path / "tcd.json", ok=False)
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "ComfyUI-TCD" in refused.stderr and not (tmp_path / "tcd.json").exists()


def test_family_option_and_overrides_warn_with_the_fix(cli, tiny_pipeline, stand_in):
    hyper = fams.family("hyper_sd").find(8, "lora")
    model = ("render", stand_in(hyper), "--base", tiny_pipeline, "--print-comfyui", "--json")

    said = json.loads(cli(*model, "--family", "dmd2", ok=True).stdout)
    assert (said["settings"]["family"], said["settings"]["profile"]) == ("dmd2", "lcm-4step")

    overridden = cli(*model, "--steps", "4", "--guidance-scale", "3", ok=True)
    assert "distilled for 8 steps" in overridden.stderr and "--steps 8" in overridden.stderr
    assert "--guidance-scale 0" in overridden.stderr

    cfg = cli("render", stand_in(fams.family("hyper_sd").find(8, "lora", "cfg")), "--base", tiny_pipeline,
              "--print-comfyui", "--guidance-scale", "0", ok=True)
    assert "outside the 5-8" in cfg.stderr and "--guidance-scale 5" in cfg.stderr

    timesteps = cli(*model, "--family", "dmd2", "--profile", "lcm-1step", "--steps", "4", ok=False)
    assert "[399]" in timesteps.stderr and "--steps 1" in timesteps.stderr


def test_lora_strength_reaches_the_merge_and_the_report(cli, tiny_pipeline, stand_in, tmp_path):
    lora = stand_in(fams.family("lightning").find(4, "lora"))
    common = ("render", lora, "--base", tiny_pipeline, *SMALL, "--seed", "0")
    cli(*common, "--out", tmp_path / "full", ok=True)
    cli(*common, "--out", tmp_path / "none", "--lora-strength", "0", ok=True)
    cli("render", tiny_pipeline, *SMALL, "--steps", "4", "--seed", "0", "--out", tmp_path / "base", ok=True)

    assert json.loads((tmp_path / "none" / "report.json").read_text())["model"]["lora_strength"] == 0
    base = (tmp_path / "base" / "image-000.png").read_bytes()
    assert (tmp_path / "none" / "image-000.png").read_bytes() == base  # strength 0 renders the base itself
    assert (tmp_path / "full" / "image-000.png").read_bytes() != base


# --- merge and publish -------------------------------------------------------------------------------------------

def _metadata(path: Path) -> dict[str, str]:
    return SafetensorsFile(path).metadata


def test_merging_a_family_lora_records_its_profile(cli, tiny_pipeline, stand_in, tmp_path):
    dmd2 = stand_in(fams.family("dmd2").find(4, "lora"))
    out = tmp_path / "merged"

    result = cli("merge", "--base", tiny_pipeline, "--lora", dmd2, "--out", out, ok=True)

    assert "sampling: dmd2 lcm-4step, 4 steps" in result.stdout
    written = _metadata(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert (written[prov.FAMILY], written[prov.PROFILE], written[prov.STEPS]) == ("dmd2", "lcm-4step", "4")
    settings = json.loads(written[prov.SETTINGS])
    assert settings["scheduler"] == "LCMScheduler" and settings["timesteps"] == [999, 749, 499, 249]
    # a plain from_pretrained of the folder gets the family's scheduler
    from diffusers import StableDiffusionXLPipeline

    assert type(StableDiffusionXLPipeline.from_pretrained(out).scheduler).__name__ == "LCMScheduler"
    # and render knows the merge from its metadata
    comfy = json.loads(cli("render", out, "--print-comfyui", "--json", ok=True).stdout)
    assert comfy["settings"]["profile"] == "lcm-4step" and comfy["comfyui"]["sampler_name"] == "lcm"


@pytest.fixture(scope="module")
def stacked(tiny_pipeline, stand_in, tmp_path_factory) -> tuple[Path, object]:
    """A Lightning and a DMD2 LoRA merged together with --allow-stacking, and the CLI result."""
    from click.testing import CliRunner

    from lightning_tools.cli import main

    out = tmp_path_factory.mktemp("stacked") / "stacked.safetensors"
    loras = [stand_in(fams.family(name).find(4, "lora")) for name in ("lightning", "dmd2")]
    result = CliRunner().invoke(main, ["merge", "--base", str(tiny_pipeline), "--lora", str(loras[0]), "--lora",
                                       str(loras[1]), "--out", str(out), "--allow-stacking", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return out, json.loads(result.stdout)


def test_stacking_two_accelerators_is_refused_unless_allowed(cli, tiny_pipeline, stand_in, stacked, tmp_path):
    lightning, hyper = (stand_in(fams.family(name).find(8, "lora")) for name in ("lightning", "hyper_sd"))
    out = tmp_path / "m.safetensors"
    refused = cli("merge", "--base", tiny_pipeline, "--lora", lightning, "--lora", hyper, "--out", out, ok=False)
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "SDXL-Lightning" in refused.stderr and "Hyper-SD" in refused.stderr
    assert "--allow-stacking" in refused.stderr and not out.exists()
    # a LoRA at a negative strength takes away: no stacking
    cli("merge", "--base", tiny_pipeline, "--lora", lightning, "--lora", hyper, "--strength", "1", "--strength",
        "-0.5", "--out", out, "--dry-run", ok=True)

    path, report = stacked
    assert [a["family"] for a in report["accelerators"]] == ["lightning", "dmd2"]
    assert _metadata(path)[prov.FAMILY] == "lightning"  # the first accelerator's profile is recorded


def test_an_accelerated_base_counts_as_one_of_the_stack(cli, tiny_pipeline, stand_in, tmp_path):
    base = stand_in(fams.family("lightning").find(4, "full"))
    dmd2 = stand_in(fams.family("dmd2").find(4, "lora"))
    refused = cli("merge", "--base", base, "--config", tiny_pipeline, "--lora", dmd2, "--out",
                  tmp_path / "m.safetensors", "--dry-run", ok=False)
    assert base.name in refused.stderr and "DMD2" in refused.stderr and "--allow-stacking" in refused.stderr


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_publish_card_carries_the_family_profile_and_licence(cli, tiny_pipeline, tiny_lora, stand_in, tmp_path):
    merged = tmp_path / "my-dmd2-merge.safetensors"
    cli("merge", "--base", tiny_pipeline, "--lora", stand_in(fams.family("dmd2").find(4, "lora")), "--out", merged,
        ok=True)
    card = tmp_path / "dmd2.md"
    cli("publish", merged, "--config", tiny_pipeline, "--repo-id", "me/dmd2", "--dry-run", "--card", card, ok=True)
    text = card.read_text()
    front = _front_matter(text)
    assert front["license"] == "cc-by-nc-4.0" and front["base_model"] == ["tianweiy/DMD2"] and "dmd2" in front["tags"]
    assert "LCMScheduler.from_config(pipe.scheduler.config)" in text
    assert "timesteps=[999, 749, 499, 249]" in text and "guidance_scale=0" in text
    assert "`lcm`" in text and "may not be used commercially" in text

    mine = shutil.copy(tiny_lora, tmp_path / "my_lora.safetensors")  # nothing in it says how it samples
    cli("publish", mine, "--repo-id", "me/turbo", "--family", "sdxl_turbo", "--dry-run", "--card",
        tmp_path / "turbo.md", ok=True)
    front = _front_matter((tmp_path / "turbo.md").read_text())
    assert (front["license"], front["license_name"]) == ("other", "sai-nc-community")
    assert "EulerAncestralDiscreteScheduler" in (tmp_path / "turbo.md").read_text()


def test_publish_refuses_a_non_commercial_input_under_another_licence(cli, tiny_pipeline, stacked, tmp_path):
    path, _ = stacked  # samples as Lightning (openrail++), but a DMD2 LoRA (CC BY-NC) is merged in
    card = tmp_path / "card.md"
    args = ("publish", path, "--config", tiny_pipeline, "--repo-id", "me/stacked", "--dry-run", "--card", card)

    refused = cli(*args, ok=False)
    assert "DMD2" in refused.stderr and "--licence cc-by-nc-4.0" in refused.stderr
    assert refused.stderr.count("\n") == 1 and not card.exists()

    result = cli(*args, "--licence", "cc-by-nc-4.0", "--json", ok=True)
    assert json.loads(result.stdout)["licence"] == "cc-by-nc-4.0"
    assert _front_matter(card.read_text())["license"] == "cc-by-nc-4.0"
