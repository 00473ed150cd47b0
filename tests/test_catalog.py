"""The `catalog` command over every few-step family, the selection `fetch` makes, and how a file's sampling
profile is found (metadata, catalogue by hash or name, a step count in the name) and travels through metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_tools import catalog, provenance
from lightning_tools import families as fams
from lightning_tools.errors import UserError
from lightning_tools.sampling import Sampling, from_name, lightning
from lightning_tools.tensors import SafetensorsFile

LIGHTNING = fams.family("lightning")


def test_catalog_lists_all_seven_families_with_profiles_and_licences(cli):
    data = json.loads(cli("catalog", "--json", ok=True).stdout)["families"]

    assert [f["name"] for f in data][0] == "lightning"
    assert {f["name"] for f in data} == {"lightning", "hyper_sd", "dmd2", "tcd", "pcm", "lcm_lora", "sdxl_turbo"}
    by_name = {f["name"]: f for f in data}
    assert by_name["dmd2"]["commercial_use"] is False and by_name["lightning"]["license"] == "openrail++"
    for family in data:
        for f in family["files"]:
            assert (f["settings"]["family"], f["settings"]["profile"]) == (family["name"], f["profile"])
            assert f["settings"]["steps"] == f["steps"]
    lightning = {f["filename"]: f for f in by_name["lightning"]["files"]}
    assert {name: (f["size"], f["sha256"]) for name, f in lightning.items()} == \
        {f.filename: (f.size, f.sha256) for f in LIGHTNING.files}
    x0 = lightning["sdxl_lightning_1step_x0.safetensors"]["settings"]
    assert (x0["scheduler"], x0["timestep_spacing"], x0["prediction_type"], x0["guidance_scale"]) == \
        ("EulerDiscreteScheduler", "trailing", "sample", 0.0)
    assert (x0["comfyui"]["sampler_name"], x0["comfyui"]["scheduler"], x0["comfyui"]["cfg"]) == \
        ("euler", "sgm_uniform", 1.0)
    dmd2 = next(f for f in by_name["dmd2"]["files"] if f["filename"] == "dmd2_sdxl_4step_lora_fp16.safetensors")
    assert dmd2["settings"]["timesteps"] == [999, 749, 499, 249]
    assert dmd2["settings"]["comfyui"]["sampler_name"] == "lcm"


def test_catalog_table_for_one_family_and_filters(cli):
    table = cli("catalog", "--family", "Hyper-SD", "--kind", "lora", ok=True).stdout
    assert "Hyper-SDXL-12steps-CFG-lora.safetensors" in table and "Hyper-SDXL-1step-Unet" not in table
    assert "DDIMScheduler" in table and "ddim + sgm_uniform, cfg 5" in table and "licence openrail++" in table
    assert "no core equivalent: ComfyUI-TCD" in table  # the unified LoRA's sampler

    dmd2 = cli("catalog", "--family", "dmd2", ok=True).stdout
    assert "NON-COMMERCIAL" in dmd2 and "not pinned" in dmd2 and "timesteps [999, 749, 499, 249]" in dmd2

    typo = cli("catalog", "--family", "hypr-sd", ok=False)
    assert "did you mean hyper_sd" in typo.stderr and typo.stderr.count("\n") == 1
    nothing = cli("catalog", "--family", "tcd", "--kind", "unet", ok=False)
    assert "TCD has no file with kind unet" in nothing.stderr


def test_catalog_stays_header_only_fast():
    """`catalog` imports neither torch nor diffusers: it answers in a blink."""
    code = ("import sys\nfrom lightning_tools.cli import main\n"
            "try:\n    main(['catalog'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(catalog.__file__).parents[1])
    assert "sdxl_lightning_4step_lora.safetensors" in out.stdout and out.stderr.strip() == "[]"


# --- what fetch selects ------------------------------------------------------------------------------------------

def test_select_takes_default_variants_and_explains_what_is_missing():
    dmd2, hyper = fams.family("dmd2"), fams.family("hyper_sd")
    assert [f.name for f in catalog.select(dmd2, kinds=("unet",))] == \
        ["dmd2_sdxl_4step_unet_fp16.safetensors", "dmd2_sdxl_1step_unet_fp16.bin"]
    assert [f.name for f in catalog.select(dmd2, steps=(4,), kinds=("unet",), variant="pickle")] == \
        ["dmd2_sdxl_4step_unet_fp16.bin"]
    assert [f.variant for f in catalog.select(hyper, steps=(8, 12), kinds=("lora",))] == ["", "cfg"]
    assert [f.name for f in catalog.select(hyper, kinds=("lora",), variant="cfg")] == \
        ["Hyper-SDXL-8steps-CFG-lora.safetensors", "Hyper-SDXL-12steps-CFG-lora.safetensors"]
    with pytest.raises(UserError, match="1, 2, 4, 8"):
        catalog.select(LIGHTNING, steps=(3,), kinds=("unet",))
    with pytest.raises(UserError, match="no 'bf16' variant"):
        catalog.select(dmd2, kinds=("unet",), variant="bf16")
    assert [f.steps for f in catalog.select(LIGHTNING, kinds=("lora",))] == [2, 4, 8]  # "all steps" skips 1


def test_there_is_no_one_step_lightning_lora(cli):
    result = cli("fetch", "--steps", 1, "--kind", "lora", ok=False)
    assert result.exit_code == 1 and "--steps 2 --kind lora" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- which profile a file has ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, steps, prediction", [
    ("sdxl_lightning_4step_lora.safetensors", 4, "epsilon"),
    ("my-merge_lightning_8steps.safetensors", 8, "epsilon"),
    ("custom_1step_x0.safetensors", 1, "sample"),
    ("juggernaut-2-step.safetensors", 2, "epsilon"),
    ("dreamshaper_30steps.safetensors", None, None),
    ("model_v12step.safetensors", None, None),
    ("sdxl_base.safetensors", None, None),
])
def test_a_step_count_in_the_name_means_lightning(name, steps, prediction):
    guessed = from_name(name)
    assert (guessed and (guessed.profile.family, guessed.steps, guessed.prediction_type)) == \
        (steps and ("lightning", steps, prediction))


def _settings_for(path, meta=None, sha256=None):
    """What `provenance.settings_for` says of a real file written with `meta`."""
    save_file({"x": torch.zeros(2)}, str(path), metadata=meta)
    return provenance.settings_for(path, SafetensorsFile(path).metadata, sha256)


def test_settings_for_prefers_metadata_then_catalogue_then_name(tmp_path):
    settings, how = _settings_for(tmp_path / "merged_8step.safetensors", {provenance.STEPS: "2"})
    assert (settings.steps, how) == (2, "metadata")

    x0 = LIGHTNING.find(1, "unet")
    settings, how = provenance.settings_for(tmp_path / "renamed.safetensors", {}, sha256=x0.sha256)
    assert (settings.steps, settings.prediction_type) == (1, "sample") and how.startswith("catalog (sha256")

    settings, how = _settings_for(tmp_path / "Hyper-SDXL-8steps-CFG-lora.safetensors")
    assert (settings.profile.family, settings.profile.name, settings.steps, settings.guidance_scale) == \
        ("hyper_sd", "ddim-trailing-cfg", 8, 5.0)
    assert how == "catalog (file name: Hyper-SD Hyper-SDXL-8steps-CFG-lora.safetensors)"

    # a published name with other bytes (a re-saved copy) keeps its family, and says so
    settings, how = _settings_for(tmp_path / "dmd2_sdxl_4step_lora_fp16.safetensors", sha256="0" * 64)
    assert settings.profile.name == "lcm-4step" and "not the published bytes" in how

    # diffusers' default LoRA name identifies nothing; the hash tells TCD from LCM-LoRA
    assert _settings_for(tmp_path / "pytorch_lora_weights.safetensors") is None
    tcd = fams.family("tcd").files[0]
    settings, how = provenance.settings_for(tmp_path / "pytorch_lora_weights.safetensors", {}, tcd.sha256)
    assert (settings.profile.family, settings.profile.eta, how) == \
        ("tcd", 0.3, "catalog (sha256: TCD pytorch_lora_weights.safetensors)")

    settings, how = _settings_for(tmp_path / "mine_2step_x0.safetensors")
    assert (settings.steps, settings.prediction_type, how) == (2, "sample", "file name")
    assert _settings_for(tmp_path / "base.safetensors") is None


def test_profile_round_trips_through_file_metadata(tmp_path):
    """What a merge writes, settings_for reads back: family, profile, steps and a guidance the writer chose."""
    chosen = Sampling.of(fams.family("lcm_lora").profile("lcm"), steps=6, guidance_scale=1.5)
    meta = provenance.lightning_provenance("merge", [], chosen)
    assert (meta[provenance.FAMILY], meta[provenance.PROFILE], meta[provenance.STEPS]) == ("lcm_lora", "lcm", "6")
    settings, how = _settings_for(tmp_path / "x.safetensors", meta)
    assert settings == chosen and how == "metadata"


def test_metadata_written_before_the_families_still_reads_as_lightning(tmp_path):
    """lightning-tools 0.1 wrote Lightning-only settings (no family); its files keep sampling as they did."""
    old = {"steps": 1, "prediction_type": "sample", "guidance_scale": 0.0, "scheduler": "EulerDiscreteScheduler",
           "timestep_spacing": "trailing", "comfy_sampler": "euler", "comfy_scheduler": "sgm_uniform",
           "comfy_cfg": 1.0}
    meta = {provenance.STEPS: "1", provenance.PREDICTION_TYPE: "sample", provenance.SETTINGS: json.dumps(old)}
    settings, how = _settings_for(tmp_path / "old.safetensors", meta)
    assert settings == lightning(1, "sample") and settings.profile.name == "euler-trailing-x0" and how == "metadata"

    # a family this version does not know: the metadata is set aside and the name decides
    newer = {provenance.SETTINGS: json.dumps({"family": "future", "profile": "p", "steps": 4})}
    settings, how = _settings_for(tmp_path / "future_2step.safetensors", newer)
    assert (settings.steps, how) == (2, "file name")


def test_lightning_profiles_give_the_official_trailing_timesteps():
    from diffusers import EulerDiscreteScheduler

    from lightning_tools.render.pipeline import scheduler_for

    base = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    for steps, expected in [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249]),
                            (8, [999, 874, 749, 624, 499, 374, 249, 124])]:
        settings = Sampling.of(LIGHTNING.find(steps, "full").profile, steps=steps)
        scheduler = scheduler_for(base, settings)
        scheduler.set_timesteps(**{k: v for k, v in settings.pipeline_kwargs().items()
                                   if k == "num_inference_steps"})
        assert scheduler.timesteps.round().long().tolist() == expected
        assert scheduler.config.prediction_type == ("sample" if steps == 1 else "epsilon")


# --- the families table in the README ---------------------------------------------------------------------------

DOCS = Path(__file__).parents[1] / "README.md"


def families_table() -> list[str]:
    """One row per sampling profile, from the data: what the README must show."""
    rows = ["| family (licence) | files | diffusers scheduler | steps / timesteps | guidance | eta | ComfyUI |",
            "|---|---|---|---|---|---|---|"]
    for fam in sorted(fams.families(), key=lambda f: f.name != "lightning"):
        use = {True: "", False: ", non-commercial", None: ", none declared"}[fam.license_info.commercial]
        for i, profile in enumerate(fam.profiles):
            files = [f for f in fam.files if f.profile is profile]
            variants = sorted({f.variant for f in files if f.variant})
            listed = (f"{'/'.join(map(str, sorted({f.steps for f in files})))}-step "
                      f"{', '.join(dict.fromkeys(f.kind for f in files))}"
                      + (f" (variants: {', '.join(variants)})" if variants else "")
                      + "".join(f", `{f.name}`" for f in files if not f.name_identifies))
            p = Sampling.of(profile)
            changes = [f"`timestep_spacing=\"{profile.timestep_spacing}\"`"] if profile.timestep_spacing else []
            changes += [f"`{k}={v}`" for k, v in profile.overrides]
            changes += ['`prediction_type="sample"`'] if profile.prediction_type == "sample" else []
            low, high = profile.steps_range
            steps = (f"timesteps `{list(profile.timesteps)}`" if profile.timesteps is not None
                     else "the file's" if p.fixed_steps and low != high
                     else f"{profile.steps}" + (f" ({low}-{high})" if low != high else ""))
            g_low, g_high = profile.guidance_range
            guidance = f"{profile.guidance_scale:g} " + ("(no CFG)" if g_high <= 1 else f"({g_low:g}-{g_high:g})")
            comfy = p.comfyui()
            comfy_text = (f"`{comfy['sampler_name']}` + `{comfy['scheduler']}`, cfg {comfy['cfg']:g}"
                          + (", ModelSamplingDiscrete `x0`" if comfy["model_sampling"] else "")
                          if p.comfyui_core else f"custom node: {comfy['custom_node'].split(' (')[0].split(':')[0]}")
            family = f"**{fam.title}** (`{fam.license}`{use})" if i == 0 else ""
            rows.append(f"| {family} | {listed} | `{profile.scheduler}` {' '.join(changes)} | {steps} | {guidance} | "
                        f"{'-' if profile.eta is None else f'{profile.eta:g}'} | {comfy_text} |".replace("  |", " |"))
    return rows


def test_docs_table_shows_every_family_as_the_data_says():
    text = DOCS.read_text()
    table = "\n".join(families_table())
    assert table in text, f"the README's families table is out of date; it should read:\n{table}"
