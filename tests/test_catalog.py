"""The catalogue of official files, the settings it recommends, and the `catalog` command."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from lightning_tools import catalog, provenance
from lightning_tools.tensors import SafetensorsFile
from lightning_tools.errors import UserError


def test_catalog_json_describes_every_official_file(cli):
    data = json.loads(cli("catalog", "--json", ok=True).stdout)

    assert (data["repo_id"], data["revision"]) == (catalog.REPO_ID, catalog.REVISION)
    files = data["files"]
    assert len(files) == 11 and len({f["sha256"] for f in files}) == 11
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in files)
    assert sorted(f["kind"] for f in files).count("lora") == 3
    assert {f["steps"] for f in files if f["kind"] == "lora"} == {2, 4, 8}
    assert {(f["steps"], f["kind"]) for f in files if f["prediction_type"] == "sample"} == {(1, "unet"), (1, "full")}
    assert [f["filename"] for f in files if not f["size_confirmed"]] == ["sdxl_lightning_8step_unet.safetensors"]
    for f in files:
        assert f"_{f['steps']}step" in f["filename"]
        s = f["settings"]
        assert (s["steps"], s["prediction_type"]) == (f["steps"], f["prediction_type"])
        assert (s["timestep_spacing"], s["guidance_scale"], s["comfy_sampler"], s["comfy_scheduler"],
                s["comfy_cfg"]) == ("trailing", 0.0, "euler", "sgm_uniform", 1.0)


def test_catalog_filters_and_prints_a_table(cli):
    data = json.loads(cli("catalog", "--steps", 4, "--kind", "lora", "--json", ok=True).stdout)
    assert [f["filename"] for f in data["files"]] == ["sdxl_lightning_4step_lora.safetensors"]

    table = cli("catalog", "--kind", "full", ok=True).stdout
    assert table.count("sdxl_lightning_") == 4 and "sgm_uniform" in table and "trailing" in table
    assert catalog.find(4, "full").sha256[:12] in table


def test_there_is_no_one_step_lora(cli):
    with pytest.raises(UserError, match="2-step LoRA"):
        catalog.find(1, "lora")
    result = cli("fetch", "--steps", 1, "--kind", "lora", ok=False)
    assert result.exit_code == 1 and "--steps 2 --kind lora" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_find_and_lookups():
    entry = catalog.find(1, "full")
    assert entry.filename == "sdxl_lightning_1step_x0.safetensors" and entry.prediction_type == "sample"
    assert catalog.by_sha256("0x" + entry.sha256.upper()) == entry
    assert catalog.by_filename(f"/anywhere/{entry.filename}") == entry
    assert catalog.by_sha256("0" * 64) is None
    with pytest.raises(UserError, match="1, 2, 4, 8"):
        catalog.find(3, "unet")
    # "all steps" skips the missing 1-step LoRA instead of failing
    assert [e.steps for e in catalog.select(kinds=("lora",))] == [2, 4, 8]


@pytest.mark.parametrize("name, steps, prediction", [
    ("sdxl_lightning_4step_lora.safetensors", 4, "epsilon"),
    ("my-merge_lightning_8steps.safetensors", 8, "epsilon"),
    ("custom_1step_x0.safetensors", 1, "sample"),
    ("juggernaut-2-step.safetensors", 2, "epsilon"),
    ("dreamshaper_30steps.safetensors", None, None),
    ("model_v12step.safetensors", None, None),
    ("sdxl_base.safetensors", None, None),
])
def test_settings_from_name(name, steps, prediction):
    settings = catalog.settings_from_name(name)
    assert (settings and (settings.steps, settings.prediction_type)) == (steps and (steps, prediction))


def _settings_for(path, meta=None):
    """What `provenance.settings_for` says of a real file written with `meta`."""
    save_file({"x": torch.zeros(2)}, str(path), metadata=meta)
    return provenance.settings_for(path, SafetensorsFile(path).metadata)


def test_settings_for_prefers_metadata_then_catalogue_then_name(tmp_path):
    settings, how = _settings_for(tmp_path / "merged_8step.safetensors", {provenance.STEPS: "2"})
    assert (settings.steps, how) == (2, "metadata")

    x0 = catalog.find(1, "unet")
    settings, how = provenance.settings_for(tmp_path / "renamed.safetensors", {}, sha256=x0.sha256)
    assert (settings.steps, settings.prediction_type) == (1, "sample") and how.startswith("catalog (sha256")

    settings, how = _settings_for(tmp_path / "sdxl_lightning_4step_lora.safetensors")
    assert settings.steps == 4 and how.startswith("catalog (file name")

    settings, how = _settings_for(tmp_path / "mine_2step_x0.safetensors")
    assert (settings.steps, settings.prediction_type, how) == (2, "sample", "file name")

    assert _settings_for(tmp_path / "base.safetensors") is None


def test_settings_round_trip_through_file_metadata(tmp_path):
    """What provenance() writes, settings_for() reads back, including values the writer chose."""
    chosen = catalog.Settings(steps=4, comfy_cfg=1.5)
    meta = provenance.provenance("merge", [], steps=4, settings=chosen.as_dict())
    settings, how = _settings_for(tmp_path / "x.safetensors", meta)
    assert settings == chosen and how == "metadata"


@pytest.mark.parametrize("steps, expected", [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249]),
                                             (8, [999, 874, 749, 624, 499, 374, 249, 124])])
def test_recommended_settings_give_the_official_trailing_timesteps(steps, expected):
    from diffusers import EulerDiscreteScheduler

    s = catalog.find(steps, "full").settings
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing=s.timestep_spacing, prediction_type=s.prediction_type)
    scheduler.set_timesteps(s.steps)
    assert scheduler.timesteps.round().long().tolist() == expected
    assert scheduler.config.prediction_type == ("sample" if steps == 1 else "epsilon")
