"""The few-step family catalogue: its data obeys the schema, and every sampling profile makes diffusers' own
SDXL pipeline sample the way the authors' model cards and code say (scheduler class, config, the timesteps the
pipeline actually ran, CFG on or off, eta) -- checked against the tables below, not against our loader."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_tools.sdxl import SDXL_BASE_REPO
from lightning_tools import catalog
from lightning_tools import families as fams
from lightning_tools.errors import CorruptFile, UserError

SDXL_SCHEDULER = Path(fams.__file__).parent.parent / "sdxl/configs/sdxl-base/scheduler/scheduler_config.json"
FAMILIES = {"lightning", "hyper_sd", "dmd2", "tcd", "pcm", "lcm_lora", "sdxl_turbo"}

T4 = [999, 749, 499, 249]
T8 = [999, 874, 749, 624, 499, 374, 249, 124]
T12 = [999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82]
T16 = [999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61]
LCM_GRID_4 = [999, 759, 499, 259]  # LCMScheduler/TCDScheduler at 4 steps: their 50-step original grid
EULER, EULER_A, DDIM, LCM, TCD = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
                                  "LCMScheduler", "TCDScheduler")
TRAILING = {"timestep_spacing": "trailing"}
PCM_DDIM = TRAILING | {"clip_sample": False, "set_alpha_to_one": False}  # the PCM card's DDIM settings

# (family, profile, steps) -> scheduler class, config entries, the timesteps the pipeline must run, whether CFG is
# on, and the eta the scheduler's step must receive (None: the scheduler takes no eta). From the table and
# the authors' cards/code; the steps are each file's own, plus a few non-default step counts the profile allows.
EXPECTED = {
    ("lightning", "euler-trailing", 2): (EULER, TRAILING, [999, 499], False, None),
    ("lightning", "euler-trailing", 4): (EULER, TRAILING, T4, False, None),
    ("lightning", "euler-trailing", 8): (EULER, TRAILING, T8, False, None),
    ("lightning", "euler-trailing-x0", 1): (EULER, TRAILING | {"prediction_type": "sample"}, [999], False, None),
    ("hyper_sd", "ddim-trailing", 2): (DDIM, TRAILING, [999, 499], False, 0.0),
    ("hyper_sd", "ddim-trailing", 4): (DDIM, TRAILING, T4, False, 0.0),
    ("hyper_sd", "ddim-trailing", 8): (DDIM, TRAILING, T8, False, 0.0),
    ("hyper_sd", "ddim-trailing-cfg", 8): (DDIM, TRAILING, T8, True, 0.0),
    ("hyper_sd", "ddim-trailing-cfg", 12): (DDIM, TRAILING, T12, True, 0.0),
    ("hyper_sd", "tcd-unified", 1): (TCD, {}, [999], False, 1.0),
    ("hyper_sd", "tcd-unified", 4): (TCD, {}, LCM_GRID_4, False, 1.0),
    ("hyper_sd", "lcm-800", 1): (LCM, {}, [800], False, None),
    ("dmd2", "lcm-4step", 4): (LCM, {}, T4, False, None),
    ("dmd2", "lcm-1step", 1): (LCM, {}, [399], False, None),
    ("tcd", "tcd", 4): (TCD, {}, LCM_GRID_4, False, 0.3),
    ("pcm", "ddim-smallcfg", 2): (DDIM, PCM_DDIM, [999, 499], False, 0.0),
    ("pcm", "ddim-smallcfg", 4): (DDIM, PCM_DDIM, T4, False, 0.0),
    ("pcm", "ddim-smallcfg", 8): (DDIM, PCM_DDIM, T8, False, 0.0),
    ("pcm", "ddim-smallcfg", 16): (DDIM, PCM_DDIM, T16, False, 0.0),
    ("pcm", "ddim-normalcfg-4step", 4): (DDIM, PCM_DDIM, T4, True, 0.0),
    ("pcm", "ddim-normalcfg-8step", 8): (DDIM, PCM_DDIM, T8, True, 0.0),
    ("pcm", "ddim-normalcfg-16step", 16): (DDIM, PCM_DDIM, T16, True, 0.0),
    ("pcm", "lcm-like", 4): (LCM, {}, LCM_GRID_4, False, None),
    ("lcm_lora", "lcm", 4): (LCM, {}, LCM_GRID_4, False, None),
    ("sdxl_turbo", "euler-ancestral-trailing", 1): (EULER_A, TRAILING, [999], False, None),
    ("sdxl_turbo", "euler-ancestral-trailing", 4): (EULER_A, TRAILING, T4, False, None),
}

# Core ComfyUI's KSampler names (comfy/samplers.py: KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] and
# SCHEDULER_NAMES), the subset a few-step profile could name.
COMFY_SAMPLERS = {"euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_sde", "ddpm", "lcm", "ddim",
                  "uni_pc"}
COMFY_SCHEDULERS = {"normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"}


def _all_files():
    return [f for fam in fams.families() for f in fam.files]


# ----------------------------------------------------------------------------------------------------- the data

def test_schema_every_file_has_a_profile_and_every_profile_a_source():
    assert {fam.name for fam in fams.families()} == FAMILIES
    for fam in fams.families():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", fam.repo_id) and fam.source.startswith("https://huggingface.co/")
        assert fam.license in fams.LICENSES and fam.hashes_source
        assert not fam.revision_pinned or re.fullmatch(r"[0-9a-f]{40}", fam.revision)
        names = [f.filename for f in fam.files]
        assert len(names) == len(set(names)), f"{fam.name}: a file is listed twice"
        for profile in fam.profiles:
            assert profile.source and profile.comfyui_sampling.source, f"{fam.name} {profile.name}: no source"
            assert profile.scheduler in fams.SCHEDULERS and profile.prediction_type in ("epsilon", "sample")
            assert any(f.profile is profile for f in fam.files), f"{fam.name} {profile.name} is unused"
            low, high = profile.steps_range
            assert 1 <= low <= profile.steps <= high
            assert profile.guidance_range[0] <= profile.guidance_scale <= profile.guidance_range[1]
            assert all(side % 64 == 0 for side in profile.resolution)
            comfy = profile.comfyui_sampling
            assert comfy.custom_node or (comfy.sampler in COMFY_SAMPLERS and comfy.scheduler in COMFY_SCHEDULERS)
            assert comfy.sampler is None or comfy.sampler in COMFY_SAMPLERS
        for f in fam.files:
            assert f.family == fam.name and f.profile in fam.profiles
            assert f.kind in fams.KINDS and isinstance(f.steps, int)
            assert f.profile.steps_range[0] <= f.steps <= f.profile.steps_range[1]
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)
            assert f.size is None or f.size > 0
            assert f.kind != "lora" or (f.profile.lora_strength or 0) > 0
            stated = re.search(r"(?:^|[^a-z0-9])(\d+)[-_]?steps?(?![a-z])", f.name.lower())
            assert stated is None or int(stated.group(1)) == f.steps, f"{f.filename} says another step count"


def test_schema_identification_is_unambiguous():
    files = _all_files()
    hashes = [f.sha256 for f in files if f.sha256]
    assert len(hashes) == len(set(hashes))
    # a name shared by two catalogued files (diffusers' default LoRA name) must never identify a file by itself
    shared = {f.name for f in files if sum(g.name == f.name for g in files) > 1}
    assert shared == {"pytorch_lora_weights.safetensors"}
    assert all(not f.name_identifies for f in files if f.name in shared)


def test_licences_say_which_families_are_non_commercial():
    commercial = {fam.name: fam.license_info.commercial for fam in fams.families()}
    assert commercial["dmd2"] is False and commercial["sdxl_turbo"] is False  # the issue: non-commercial licences
    assert commercial["lightning"] is True and commercial["hyper_sd"] is True
    assert commercial["pcm"] is None  # the weights repo declares no licence


def test_lightning_moved_from_catalog_unchanged():
    lightning = fams.family("lightning")
    assert (lightning.repo_id, lightning.revision) == (catalog.REPO_ID, catalog.REVISION)
    assert lightning.base_model == SDXL_BASE_REPO
    moved = [(f.filename, f.steps, f.kind, f.size, f.size_confirmed, f.sha256, f.prediction_type)
             for f in lightning.files]
    assert moved == [(e.filename, e.steps, e.kind, e.size, e.size_confirmed, e.sha256, e.prediction_type)
                     for e in catalog.CATALOG]


def test_lightning_profiles_agree_with_catalog_settings():
    """The lead switches render and the ComfyUI export over to profiles: for Lightning nothing may change."""
    base = json.loads(SDXL_SCHEDULER.read_text())
    for f in fams.family("lightning").files:
        settings = catalog.CatalogEntry(f.filename, f.steps, f.kind, 0, True, "", f.prediction_type).settings
        assert f.profile.scheduler_config(base) == settings.scheduler_config(base)
        assert f.pipeline_kwargs() == {"num_inference_steps": settings.steps,
                                       "guidance_scale": settings.guidance_scale}
        comfy = f.comfyui()
        assert comfy == settings.comfyui() | {"eta": None, "custom_node": None}


# ----------------------------------------------------------------------------------- sampling through diffusers

def test_every_profile_and_step_count_has_an_expected_row():
    used = {(f.family, f.profile.name, f.steps) for f in _all_files()}
    assert used <= set(EXPECTED), f"add rows for {sorted(used - set(EXPECTED))}"


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_pipeline):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the SDXL base config has keys some schedulers ignore; they say so on stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", sorted(EXPECTED), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_profile_samples_as_the_authors_say(sdxl_pipe, case):
    import diffusers
    import torch

    family, profile_name, steps = case
    scheduler_class, config, timesteps, cfg_on, eta = EXPECTED[case]
    profile = fams.family(family).profile(profile_name)
    base = json.loads(SDXL_SCHEDULER.read_text())
    assert base["timestep_spacing"] == "leading"  # the base's own spacing must not survive where a profile sets one

    scheduler_config = profile.scheduler_config(base)
    pipe = sdxl_pipe
    pipe.scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    assert type(pipe.scheduler).__name__ == scheduler_class
    expected_config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                       "num_train_timesteps": 1000, "prediction_type": "epsilon"} | config
    assert {k: pipe.scheduler.config[k] for k in expected_config} == expected_config

    etas, ran = [], []
    step = pipe.scheduler.step

    @functools.wraps(step)  # keeps step's signature, which the pipeline inspects before passing eta
    def recording_step(*args, **kwargs):
        etas.append(kwargs.get("eta"))
        return step(*args, **kwargs)

    def record(_pipe, _i, t, callback_kwargs):
        ran.append(round(float(t)))
        return callback_kwargs

    pipe.scheduler.step = recording_step
    kwargs = profile.pipeline_kwargs(steps=steps)
    pipe(prompt="a red cat", height=32, width=32, output_type="latent", callback_on_step_end=record,
         generator=torch.Generator().manual_seed(0), **kwargs)
    assert ran == timesteps
    assert pipe.do_classifier_free_guidance is cfg_on
    assert etas == [eta] * len(timesteps)


def test_explicit_timesteps_refuse_another_step_count():
    profile = fams.family("dmd2").profile("lcm-4step")
    assert profile.pipeline_kwargs() == {"timesteps": [999, 749, 499, 249], "guidance_scale": 0.0}
    assert profile.pipeline_kwargs(steps=4, guidance_scale=1.5)["guidance_scale"] == 1.5
    with pytest.raises(UserError, match="--steps 4"):
        profile.pipeline_kwargs(steps=8)


def test_comfyui_equivalents():
    hyper = fams.family("hyper_sd")
    cfg_lora = hyper.find(12, "lora").comfyui()
    assert (cfg_lora["sampler_name"], cfg_lora["scheduler"], cfg_lora["steps"], cfg_lora["cfg"]) == \
        ("ddim", "sgm_uniform", 12, 5.0)  # CFG on: ComfyUI's cfg is the guidance scale
    one_step = hyper.find(1, "unet").comfyui()
    assert one_step["scheduler"] is None and "800" in one_step["custom_node"]
    unified = hyper.find(1, "lora").comfyui()
    assert unified["eta"] == 1.0 and "ComfyUI-TCD" in unified["custom_node"]
    assert fams.family("lcm_lora").files[0].comfyui()["cfg"] == 1.0  # guidance 0 (off) is cfg 1
    x0 = fams.family("lightning").find(1, "unet").comfyui()
    assert x0["model_sampling"] == "x0"
    assert fams.family("sdxl_turbo").files[0].profile.comfyui(steps=4)["steps"] == 4


# --------------------------------------------------------------------------------------------------- lookups

def test_lookups_by_family_name_alias_and_typo():
    assert fams.family("Hyper-SD").name == fams.family("hypersd").name == "hyper_sd"
    assert fams.family("SDXL-Lightning").name == "lightning"
    with pytest.raises(UserError, match="did you mean hyper_sd"):
        fams.family("hypr-sd")
    with pytest.raises(UserError, match="known families: dmd2, hyper_sd"):
        fams.family("nothing-like-it")


def test_find_and_select_files():
    hyper, dmd2 = fams.family("hyper_sd"), fams.family("dmd2")
    assert hyper.find(8, "lora").filename == "Hyper-SDXL-8steps-lora.safetensors"
    assert hyper.find(8, "lora", "cfg").filename == "Hyper-SDXL-8steps-CFG-lora.safetensors"
    assert hyper.find(12, "lora").variant == "cfg"  # the only 12-step LoRA
    assert dmd2.find(4, "unet").filename == "dmd2_sdxl_4step_unet_fp16.safetensors"
    assert dmd2.find(4, "unet", "default") == dmd2.find(4, "unet")
    with pytest.raises(UserError, match=r"pickle \(dmd2_sdxl_4step_unet_fp16.bin\)"):
        dmd2.find(4, "unet", "bf16")
    with pytest.raises(UserError, match="no 1-step lora file; it has 4-step lora, 4-step unet, 1-step unet"):
        dmd2.find(1, "lora")
    with pytest.raises(UserError, match="unknown kind"):
        dmd2.find(4, "checkpoint")
    assert [f.steps for f in hyper.select(kinds=("lora",))] == [1, 2, 4, 8, 8, 12]
    assert {f.kind for f in hyper.select(steps=(1,))} == {"lora", "unet", "full"}
    assert fams.family("pcm").steps == (2, 4, 8, 16)


def test_identification_by_name_and_hash():
    tcd = fams.family("tcd").files[0]
    assert fams.by_sha256("0x" + tcd.sha256.upper()) is tcd
    assert fams.by_sha256("0" * 64) is None
    # every diffusers LoRA is called pytorch_lora_weights.safetensors: the name alone must say nothing
    assert fams.by_filename("/loras/pytorch_lora_weights.safetensors") is None
    assert len(fams.files_named("pytorch_lora_weights.safetensors")) == 2
    pcm = fams.by_filename("/somewhere/pcm_sdxl_smallcfg_4step_converted.safetensors")
    assert pcm.family == "pcm" and pcm.filename == "sdxl/pcm_sdxl_smallcfg_4step_converted.safetensors"
    assert fams.by_filename("my_own_model.safetensors") is None
    unpinned = [f.filename for f in _all_files() if not f.sha256_pinned]
    assert "dmd2_sdxl_1step_unet_fp16.bin" in unpinned and tcd.filename not in unpinned


def test_json_round_trip():
    data = json.loads(json.dumps([fam.as_dict() for fam in fams.families()]))
    hyper = next(d for d in data if d["name"] == "hyper_sd")
    assert hyper["license_title"] == "CreativeML Open RAIL++-M"
    unet = next(f for f in hyper["files"] if f["kind"] == "unet")
    assert unet["profile"] == "lcm-800" and unet["sha256_pinned"] is True
    lcm800 = next(p for p in hyper["profiles"] if p["name"] == "lcm-800")
    assert lcm800["timesteps"] == [800] and lcm800["comfyui"]["custom_node"]
    pcm = next(d for d in data if d["name"] == "pcm")
    assert pcm["profiles"][0]["overrides"] == {"clip_sample": False, "set_alpha_to_one": False}


# ----------------------------------------------------------------------------------------- strict loading

@pytest.mark.parametrize("change, message", [
    (("steps_range = [4, 8]", "steps_rang = [4, 8]"), "missing 'steps_range' \\(is 'steps_rang' a typo\\?\\)"),
    (("lora_strength = 1.0", "lora_strenght = 1.0"), "unknown key 'lora_strenght'"),
    (('profile = "tcd"', 'profile = "tdc"'), "names profile 'tdc'"),
    (('sha256 = "2c777bc6', 'sha256 = "2C777BC6'), "not 64 lowercase hex"),
    (('scheduler = "TCDScheduler"', 'scheduler = "TCD"'), "'scheduler' is 'TCD'"),
    (("eta = 0.3", "eta = true"), "'eta' has the wrong type"),
    (("guidance_scale = 0.0 ", "guidance_scale = 3.0 "), "outside guidance_range"),
    (("steps = 4 ", "steps = 2 "), "outside steps_range"),
    (('revision = "ea69e290a201cbb9ac232be2d5c81ef6dc0fc3a2"', 'revision = "main"'), "not a 40-hex commit"),
    (('scheduler = "TCDScheduler"', 'scheduler = "TCDScheduler"\ntimesteps = [999, 499, 1200]'), "descending"),
])
def test_loader_refuses_damaged_data(tmp_path, change, message):
    text = (Path(fams.__file__).parent / "tcd.toml").read_text()
    old, new = change
    assert old in text
    (tmp_path / "tcd.toml").write_text(text.replace(old, new, 1))
    with pytest.raises(CorruptFile, match=message) as raised:
        fams.load(tmp_path)
    assert raised.value.path == tmp_path / "tcd.toml" and "reinstall" in str(raised.value)


def test_loader_refuses_a_name_two_families_claim(tmp_path):
    folder = Path(fams.__file__).parent
    (tmp_path / "tcd.toml").write_text((folder / "tcd.toml").read_text())
    (tmp_path / "lcm_lora.toml").write_text((folder / "lcm_lora.toml").read_text()
                                            .replace('aliases = ["lcm"', 'aliases = ["tcd-lora"'))
    with pytest.raises(CorruptFile, match="'tcd-lora' is also used by"):
        fams.load(tmp_path)


def test_import_stays_light():
    """Header-only commands import this: neither torch nor diffusers may come with it."""
    code = ("import sys, lightning_tools.families as f; f.families(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(fams.__file__).parents[2])
    assert out.stdout.strip() == "[]"
