"""`publish`: the model card from a dry run, and real uploads through huggingface_hub to the local hub server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lightning_tools import publish
from lightning_tools import provenance as metadata
from lightning_tools.families import family
from lightning_tools.provenance import with_data_hash
from lightning_tools.sampling import for_file, lightning
from lightning_tools.stream import LazyTensor, write_file
from lightning_tools.tensors import SafetensorsFile

TOKEN = "hf_local_test_token"
LIGHTNING = family("lightning")
LORA4 = LIGHTNING.find(4, "lora")


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def merged_folder(pipeline_copy) -> Path:
    """The tiny pipeline whose UNet says, like `merge` output does, that it is base + official 4-step LoRA."""
    unet = pipeline_copy / "unet" / "diffusion_pytorch_model.safetensors"
    source = SafetensorsFile(unet)
    sources = [metadata.Source("base", "my_base.safetensors", "ab" * 32),
               metadata.Source("lora", LORA4.filename, LORA4.sha256, 0.8)]
    meta = metadata.modelspec("My Lightning merge") | metadata.lightning_provenance("merge", sources, lightning(4))
    rewritten = unet.with_name("rewritten.safetensors")
    write_file(rewritten, {k: LazyTensor.of(source, k) for k in source}, metadata=with_data_hash(meta))
    os.replace(rewritten, unet)
    return pipeline_copy


@pytest.fixture
def validation(tmp_path) -> Path:
    """What `lightning-tools render` leaves: a contact sheet and report.json."""
    folder = tmp_path / "render"
    folder.mkdir()
    Image.new("RGB", (64, 32), (200, 120, 40)).save(folder / "contact_sheet.png")
    (folder / "report.json").write_text(json.dumps({
        "passed": True, "steps": 4, "device": "cpu", "model": {},
        "images": [{"file": "000.png", "prompt": "a red fox in snow", "seed": 7, "passed": True}]}))
    return folder


def test_dry_run_card_states_sources_settings_and_usage(merged_folder, hub_server, cli, tmp_path):
    card_path = tmp_path / "card.md"

    result = cli("publish", merged_folder, "--repo-id", "me/lightning-merge", "--dry-run", "--card", card_path,
                 "--base-model", "someone/custom-sdxl", "--json", ok=True)

    assert hub_server.requests == []  # a dry run never talks to the hub
    plan = json.loads(result.stdout)
    assert Path(plan["card"]) == card_path and plan["dry_run"] is True
    paths = [u["path_in_repo"] for u in plan["uploads"]]
    assert paths[0] == "README.md" and "unet/diffusion_pytorch_model.safetensors" in paths
    card = card_path.read_text()
    front = front_matter(card)
    assert front["license"] == "openrail++" and front["library_name"] == "diffusers"
    assert front["base_model"] == [LIGHTNING.repo_id, "someone/custom-sdxl"]
    assert front["base_model_relation"] == "merge" and "sdxl-lightning" in front["tags"]
    assert "# My Lightning merge" in card
    # what was merged: both sources, their hashes, the strength, and that the LoRA is the official file
    assert "my_base.safetensors" in card and "ab" * 32 in card
    lora_row = next(line for line in card.splitlines() if LORA4.filename in line and LORA4.sha256 in line)
    assert "official" in lora_row and "| 0.8 |" in lora_row
    # the settings table, from the file's own metadata
    assert "`num_inference_steps=4`" in card and 'timestep_spacing="trailing"' in card
    assert "`sgm_uniform`" in card and "`guidance_scale=0`" in card and "CFG 1" in card
    assert "(settings from the metadata)" in card
    assert 'StableDiffusionXLPipeline.from_pretrained("me/lightning-merge"' in card
    assert "--to comfyui" in card  # a diffusers folder needs converting for ComfyUI


def test_card_for_an_x0_single_file_sets_sample_prediction():
    settings = for_file(LIGHTNING.find(1, "full"))
    upload = publish.Upload("sdxl_lightning_1step_x0.safetensors", Path("x"), 1, "0" * 64)

    card = publish.render_card("me/one-step", "main", "single-file", {}, settings, "catalog", [upload])

    assert 'prediction_type="sample"' in card and "num_inference_steps=1" in card
    assert 'from_single_file(path' in card and "ModelSamplingDiscrete" in card
    assert "ComfyUI/models/checkpoints" in card
    assert "base_model_relation" not in front_matter(card)  # nothing was merged


def test_upload_leaves_the_files_on_the_hub(hub_server, tiny_lora, validation, cli, monkeypatch, tmp_path):
    hub_server.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = ("publish", tiny_lora, "--repo-id", "me/tiny-lightning-lora", "--validation", validation,
            "--revision", "v1", "--private")
    cli(*args, "--dry-run", "--card", tmp_path / "card.md", ok=True)

    result = json.loads(cli(*args, "--json", ok=True).stdout)

    files = hub_server.files("me/tiny-lightning-lora", "v1")
    assert files == {"README.md": (tmp_path / "card.md").read_bytes(),  # the dry run shows exactly what goes up
                     tiny_lora.name: tiny_lora.read_bytes(),
                     "validation/contact_sheet.png": (validation / "contact_sheet.png").read_bytes()}
    card = files["README.md"].decode()
    assert "![validation contact sheet](validation/contact_sheet.png)" in card and "a red fox in snow" in card
    assert 'weight_name="tiny_lightning_4step_lora.safetensors", revision="v1"' in card
    assert result["commit"] == hub_server.repos["me/tiny-lightning-lora"].branches["v1"]
    assert hub_server.repos["me/tiny-lightning-lora"].private
    assert tiny_lora.name not in hub_server.files("me/tiny-lightning-lora", "main")  # only the branch changed


def test_upload_of_a_diffusers_folder_keeps_its_layout(merged_folder, hub_server, cli, monkeypatch):
    hub_server.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (merged_folder / ".cache").mkdir()
    (merged_folder / ".cache" / "junk").write_text("local bookkeeping")

    cli("publish", merged_folder, "--repo-id", "me/merge", ok=True)

    uploaded = hub_server.files("me/merge")
    local = {p.relative_to(merged_folder).as_posix(): p.read_bytes() for p in merged_folder.rglob("*")
             if p.is_file() and ".cache" not in p.parts}
    assert {k: v for k, v in uploaded.items() if k != "README.md"} == local
    assert uploaded["README.md"].startswith(b"---\nlicense: openrail++\n")


def test_upload_without_a_token_is_one_line(hub_server, tiny_lora, cli):
    hub_server.token = TOKEN

    result = cli("publish", tiny_lora, "--repo-id", "me/no-token", ok=False)

    assert "HF_TOKEN" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "me/no-token" not in hub_server.repos


def test_damaged_file_is_not_published(hub_server, tiny_lora, cli, tmp_path):
    damaged = tmp_path / tiny_lora.name
    damaged.write_bytes(tiny_lora.read_bytes()[:-100])

    result = cli("publish", damaged, "--repo-id", "me/damaged", ok=False)

    assert "verification failed, nothing uploaded" in result.stderr and "truncated" in result.stderr
    assert hub_server.requests == []


def test_failed_validation_render_is_not_published(hub_server, tiny_lora, validation, cli):
    report = json.loads((validation / "report.json").read_text())
    (validation / "report.json").write_text(json.dumps(report | {"passed": False}))

    result = cli("publish", tiny_lora, "--repo-id", "me/x", "--validation", validation, "--dry-run", ok=False)

    assert "failed its checks" in result.stderr


def test_steps_must_be_known(tiny_lora, cli, tmp_path):
    anonymous = shutil.copy(tiny_lora, tmp_path / "my_lora.safetensors")
    card = tmp_path / "card.md"

    assert "--steps" in cli("publish", anonymous, "--repo-id", "me/x", "--dry-run", "--card", card, ok=False).stderr
    cli("publish", anonymous, "--repo-id", "me/x", "--dry-run", "--card", card, "--steps", 8, ok=True)
    assert "`num_inference_steps=8`" in card.read_text()
