"""Recipes: every recipe in recipes/ runs end to end on tiny fixtures, with the local hub server standing in for
the hub; broken recipes fail before any work, naming the line; re-runs skip unchanged steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_tools import catalog

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MIRROR = "someone/sdxl-lightning-mirror"
TOKEN = "hf_local_test_token"


@pytest.fixture(scope="module")
def tiny_single_file(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline as a ComfyUI all-in-one file: the 'custom SDXL base' a user brings."""
    from click.testing import CliRunner

    from lightning_tools.cli import main

    out = tmp_path_factory.mktemp("base") / "my-sdxl-finetune.safetensors"
    result = CliRunner().invoke(main, ["convert", str(tiny_pipeline), "--to", "comfyui", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def cpu_vars(workdir: Path) -> list[str]:
    return ["--set", f"workdir={workdir}", "--set", "device=cpu", "--set", "size=64"]


def test_bake_recipe_end_to_end_then_rerun_skips(hub_server, cli, tiny_pipeline, tiny_lora, tiny_single_file,
                                                  tmp_path, monkeypatch):
    hub_server.add_file(MIRROR, catalog.find(4, "lora").filename, tiny_lora.read_bytes())
    hub_server.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    work = tmp_path / "build"
    args = ["run", RECIPES / "bake-lightning-lora.toml", *cpu_vars(work), "--set", f"base={tiny_single_file}",
            "--set", f"config={tiny_pipeline}", "--set", f"lightning_repo={MIRROR}",
            "--set", "repo_id=me/my-sdxl-lightning-4step", "--json"]

    first = json.loads(cli(*args, ok=True).stdout)

    assert [s["status"] for s in first] == ["ran"] * 6
    merged = work / "my-sdxl-lightning-4step.safetensors"
    assert merged.is_file() and (work / "my-sdxl-lightning-4step" / "model_index.json").is_file()
    report = json.loads((work / "validation" / "report.json").read_text())
    assert report["passed"] and report["steps"] == 4  # the settings travelled from the LoRA through merge
    published = hub_server.files("me/my-sdxl-lightning-4step")
    assert "unet/diffusion_pytorch_model.safetensors" in published and "README.md" in published
    downloads = dict(hub_server.downloads)

    second = json.loads(cli(*args, ok=True).stdout)

    assert [s["status"] for s in second] == ["skipped"] * 6
    assert dict(hub_server.downloads) == downloads


def test_bake_recipe_reruns_what_a_changed_option_touches(hub_server, cli, tiny_pipeline, tiny_lora,
                                                          tiny_single_file, tmp_path, monkeypatch):
    hub_server.add_file(MIRROR, catalog.find(4, "lora").filename, tiny_lora.read_bytes())
    hub_server.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    work = tmp_path / "build"
    args = ["run", RECIPES / "bake-lightning-lora.toml", *cpu_vars(work), "--set", f"base={tiny_single_file}",
            "--set", f"config={tiny_pipeline}", "--set", f"lightning_repo={MIRROR}", "--json"]
    cli(*args, "--set", "repo_id=me/a", ok=True)
    before = load_file(str(work / "my-sdxl-lightning-4step.safetensors"))

    again = json.loads(cli(*args, "--set", "repo_id=me/a", "--set", "strength=0.5", ok=True).stdout)

    assert [s["status"] for s in again] == ["skipped"] + ["ran"] * 5  # the fetch is unchanged
    after = load_file(str(work / "my-sdxl-lightning-4step.safetensors"))
    key = next(k for k in after if k.endswith("attn1.to_q.weight") and "input_blocks" in k)
    assert not torch.equal(before[key], after[key])


def test_comfyui_allinone_recipe_builds_a_loadable_checkpoint(hub_server, cli, tiny_pipeline, tiny_single_file,
                                                              tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = load_file(str(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    lightning = {k: v + 0.01 for k, v in unet.items()}  # a stand-in 'distilled' UNet in diffusers names
    unet_file = tmp_path / "unet.safetensors"
    save_file(lightning, str(unet_file))
    hub_server.add_file(MIRROR, catalog.find(4, "unet").filename, unet_file.read_bytes())
    work = tmp_path / "build"

    cli("run", RECIPES / "comfyui-allinone-from-unet.toml", "--set", f"workdir={work}",
        "--set", f"base={tiny_single_file}", "--set", f"config={tiny_pipeline}",
        "--set", f"lightning_repo={MIRROR}", ok=True)

    out = work / "sdxl_lightning_4step.safetensors"
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_pipeline), local_files_only=True)
    def as_written(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # the recipe asks for fp16
        return t.to(torch.float16).to(like.dtype)

    got = pipe.unet.state_dict()
    assert all(torch.equal(got[k], as_written(lightning[k], got[k])) for k in lightning)
    vae, got_vae = load_file(str(tiny_pipeline / "vae" / "diffusion_pytorch_model.safetensors")), pipe.vae.state_dict()
    assert all(torch.equal(got_vae[k], as_written(vae[k], got_vae[k])) for k in vae)


def test_validation_recipe_passes_for_the_reference_model_and_fails_for_another(cli, tiny_pipeline, tiny_lora,
                                                                                tiny_single_file, tmp_path):
    reference = tmp_path / "reference"
    cli("render", tiny_single_file, "--config", tiny_pipeline, "--device", "cpu", "--height", 64, "--width", 64,
        "--seed", 0, "--seed", 1, "--out", reference, ok=True)
    recipe = RECIPES / "validate-against-reference.toml"
    common = [*cpu_vars(tmp_path / "w"), "--set", f"config={tiny_pipeline}", "--set", f"reference={reference}"]

    cli("run", recipe, *common, "--set", f"model={tiny_single_file}", ok=True)

    other = tmp_path / "other.safetensors"
    cli("merge", "--base", tiny_single_file, "--config", tiny_pipeline, "--lora", tiny_lora, "--strength", 30,
        "--out", other, ok=True)  # strong enough to change the tiny model's images well past --max-diff
    failed = cli("run", recipe, *common[:2], "--set", f"workdir={tmp_path / 'w2'}", *common[2:],
                 "--set", f"model={other}", ok=False)
    assert "candidate_render" in failed.stderr and "reference" in failed.stderr


def write_recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "broken.toml"
    path.write_text(f'[vars]\nworkdir = "{tmp_path / "work"}"\n' + body)
    return path


@pytest.mark.parametrize("body, line, words", [
    ('[[steps]]\nname = "m"\nrun = "merge"\nbase = "{w}"\nlora = "x"\nout = "o.safetensors"\nstrenght = 1\n',
     9, "no option 'strenght'"),
    ('[[steps]]\nname = "a"\nrun = "verify"\npaths = "{b}"\n\n[[steps]]\nname = "b"\nrun = "convert"\n'
     'src = "{workdir}"\nto = "comfyui"\nout = "x.safetensors"\n', 6, "runs later"),
    ('[[steps]]\nname = "a"\nrun = "convert"\nsrc = "/nonexistent/model.safetensors"\nto = "diffusers"\nout = "d"\n',
     6, "does not exist"),
    ('[[steps]]\nname = "a"\nrun = "delete-everything"\n', 5, "not one of"),
    ('[[steps]]\nname = "a"\nrun = "merge"\nbase = "."\nlora = "."\n', 3, "needs `out`"),
])
def test_broken_recipe_fails_before_any_work_naming_the_line(cli, tmp_path, body, line, words):
    recipe = write_recipe(tmp_path, body)

    result = cli("run", recipe, ok=False)

    assert f"{recipe}:{line}:" in result.stderr and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()


def test_dry_run_prints_resolved_commands_and_writes_nothing(cli, tiny_pipeline, tiny_lora, tmp_path):
    result = cli("run", Path(__file__).resolve().parent.parent / "lightning_tools" / "demo.toml",
                 "--set", f"workdir={tmp_path / 'w'}", "--set", f"base={tiny_pipeline}",
                 "--set", f"lora={tiny_lora}", "--dry-run", ok=True)

    assert f"lightning-tools merge --base {tiny_pipeline} --lora {tiny_lora}" in result.stdout
    assert f"--out {tmp_path / 'w'}/tiny-sdxl-lightning-4step.safetensors" in result.stdout
    assert not (tmp_path / "w").exists()
