"""render: the Lightning sampler settings reach diffusers, images are checked, references compared, CLI gates.

Renders are 64x64 on the CPU with the tiny random-weight pipeline; a few seconds each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_tools import comfyui
from lightning_tools.errors import ChecksFailed
from lightning_tools.render import checks, pipeline
from lightning_tools.render import plan as planning
from lightning_tools.sampling import lightning

TRAILING = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249], 8: [999, 874, 749, 624, 499, 374, 249, 124]}
SMALL = ("--device", "cpu", "--height", "64", "--width", "64", "--prompt", "a red cat")


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _model(render_out: Path) -> str:
    return _report(render_out)["model"]["path"]


@pytest.fixture(scope="module")
def base_render(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline rendered with seeds 0 and 1, batch 1: the reference the other renders compare with."""
    from click.testing import CliRunner

    from lightning_tools.cli import main

    out = tmp_path_factory.mktemp("renders") / "base"
    result = CliRunner().invoke(main, ["render", str(tiny_pipeline), *SMALL, "--seed", "0", "--seed", "1",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return out


@pytest.mark.parametrize("steps", sorted(TRAILING))
def test_scheduler_uses_the_trailing_timestep_table(tiny_pipeline, steps):
    from diffusers import EulerDiscreteScheduler

    base_config = EulerDiscreteScheduler.load_config(tiny_pipeline / "scheduler")
    assert base_config["timestep_spacing"] == "leading"  # the base's own spacing must be replaced
    scheduler = pipeline.scheduler_for(base_config, lightning(steps))
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == TRAILING[steps]


def test_4step_render_reports_trailing_epsilon_and_passes(base_render):
    report = _report(base_render)
    assert report["passed"] is True
    assert report["steps"] == 4 and report["guidance_scale"] == 0
    scheduler = report["scheduler"]
    assert scheduler["class"] == "EulerDiscreteScheduler"
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["prediction_type"] == "epsilon"
    assert scheduler["timesteps"] == TRAILING[4]
    assert len(scheduler["sigmas"]) == 5 and scheduler["sigmas"][-1] == 0
    assert [(i["file"], i["seed"]) for i in report["images"]] == [("image-000.png", 0), ("image-001.png", 1)]
    for image in report["images"]:
        assert (base_render / image["file"]).is_file()
        assert all(check["passed"] for check in image["checks"].values())
    assert (base_render / "contact_sheet.png").is_file()
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["peak_gpu_memory_bytes"] is None
    assert report["seconds_per_image"] > 0
    # nothing said how many steps the tiny model has: the default is used, and said
    assert report["settings_source"] is None and any("--steps" in w for w in report["warnings"])


def test_same_seed_renders_identical_images_and_passes_its_reference(cli, base_render, tmp_path):
    out = tmp_path / "again"
    result = cli("render", _model(base_render), *SMALL,
                 "--seed", "0", "--seed", "1", "--out", out, "--reference", base_render, ok=True)
    for name in ("image-000.png", "image-001.png"):
        assert (out / name).read_bytes() == (base_render / name).read_bytes()
    report = _report(out)
    assert report["passed"]
    assert [i["reference"]["mean_abs_diff"] for i in report["images"]] == [0, 0]
    assert result.exit_code == 0


def test_batching_does_not_change_an_image(cli, base_render, tmp_path):
    out = tmp_path / "batched"
    cli("render", _model(base_render), *SMALL, "--seed", "0", "--seed", "1", "--batch-size", "2", "--out", out,
        "--reference", base_render, "--max-diff", "0.5", ok=True)
    assert all(i["reference"]["passed"] for i in _report(out)["images"])


def test_images_are_paired_with_the_reference_by_prompt_and_seed(cli, base_render, tmp_path):
    """Seeds 1 and 7 against a reference of seeds 0 and 1: seed 1 meets its own image (not the first one), seed 7
    has none, which is its own failure, and the gate exits 3."""
    out = tmp_path / "other-seed"
    result = cli("render", _model(base_render), *SMALL, "--seed", "1", "--seed", "7", "--out", out,
                 "--reference", base_render)
    assert result.exit_code == ChecksFailed.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert "no reference image for prompt 'a red cat' seed 7" in errors[0]
    seed1, seed7 = _report(out)["images"]
    assert (seed1["seed"], seed1["reference"]["file"], seed1["reference"]["mean_abs_diff"]) == (1, "image-001.png", 0)
    assert seed1["passed"] and not seed7["passed"] and "mean_abs_diff" not in seed7["reference"]


def test_a_changed_model_fails_the_reference(cli, tiny_lora, tiny_pipeline, base_render, tmp_path):
    out = tmp_path / "changed"
    result = cli("render", tiny_lora, "--base", tiny_pipeline, *SMALL, "--seed", "0", "--out", out,
                 "--reference", base_render, "--max-diff", "0.01")
    assert result.exit_code == 3 and "differs from reference by" in result.stderr
    image = _report(out)["images"][0]
    assert image["reference"]["passed"] is False and image["reference"]["mean_abs_diff"] > 0.01


def test_official_1step_x0_name_renders_with_sample_prediction(cli, tiny_pipeline, tmp_path):
    unet_file = tmp_path / "sdxl_lightning_1step_unet_x0.safetensors"
    shutil.copy(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors", unet_file)
    out = tmp_path / "x0"
    result = cli("render", unet_file, "--base", tiny_pipeline, *SMALL, "--out", out, ok=True)
    assert "warning" not in result.stderr
    report = _report(out)
    assert report["steps"] == 1
    assert report["scheduler"]["prediction_type"] == "sample" and report["scheduler"]["timesteps"] == TRAILING[1]
    assert report["model"]["kind"] == "unet" and report["model"]["base"]["path"] == str(tiny_pipeline)
    assert report["passed"]


def test_lora_with_base_renders_the_fused_model(cli, tiny_lora, tiny_pipeline, base_render, tmp_path):
    out = tmp_path / "lora"
    cli("render", tiny_lora, "--base", tiny_pipeline, *SMALL, "--seed", "0", "--out", out, "--reference",
        base_render, "--max-diff", "255", ok=True)
    report = _report(out)
    assert report["model"]["kind"] == "lora" and report["steps"] == 4  # "_4step" in the LoRA's name
    assert report["images"][0]["checks"]["finite"]["passed"]
    assert report["images"][0]["reference"]["mean_abs_diff"] > 0  # the LoRA changed the UNet


@pytest.fixture(scope="module")
def tiny_single_file(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline as a ComfyUI all-in-one file."""
    from lightning_tools import checkpoint

    out = tmp_path_factory.mktemp("single") / "tiny_all_in_one.safetensors"
    checkpoint.write_checkpoint(checkpoint.open_checkpoint(tiny_pipeline), out, to="comfyui")
    return out


def test_all_in_one_file_renders_like_its_diffusers_folder(cli, tiny_single_file, tiny_pipeline, base_render,
                                                           tmp_path):
    out = tmp_path / "single"
    cli("render", tiny_single_file, "--config", tiny_pipeline, *SMALL, "--seed", "0", "--seed", "1", "--out", out,
        "--reference", base_render, "--max-diff", "0.05", ok=True)
    report = _report(out)
    assert report["model"]["kind"] == "single-file" and report["passed"]


def test_all_in_one_file_without_tokenizers_asks_for_config(cli, tiny_single_file, tmp_path):
    result = cli("render", tiny_single_file, "--device", "cpu", "--out", tmp_path / "never", ok=False)
    assert result.stderr.startswith("error: ") and "--config" in result.stderr


def test_comfyui_export_of_an_all_in_one_file_needs_no_tokenizers(cli, tiny_single_file, tmp_path):
    flow_path = tmp_path / "flow.json"

    cli("render", tiny_single_file, "--comfyui-workflow", flow_path, ok=True)

    nodes = {n["class_type"]: n["inputs"] for n in json.loads(flow_path.read_text()).values()}
    assert nodes["CheckpointLoaderSimple"]["ckpt_name"] == tiny_single_file.name
    assert not (tmp_path / f"render-{tiny_single_file.stem}").exists()


def test_cuda_without_a_gpu_fails_in_one_line(cli, tiny_pipeline, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("render", tiny_pipeline, "--device", "cuda", "--out", tmp_path / "never", ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "--device cpu" in result.stderr
    assert not (tmp_path / "never").exists()


def test_steps_mismatch_warns_loudly_with_the_right_setting(cli, tiny_lora, tiny_pipeline):
    result = cli("render", tiny_lora, "--base", tiny_pipeline, "--steps", "8", "--print-comfyui", ok=True)
    assert "warning:" in result.stderr and "distilled for 4 steps" in result.stderr and "--steps 4" in result.stderr
    assert "steps 8" in result.stdout  # the override is still honoured


def test_resolve_warns_for_x0_with_epsilon_and_for_cfg(tiny_pipeline):
    model = planning.open_model(tiny_pipeline)
    x0 = lightning(1, "sample")
    plan = planning.resolve(model, x0, "file name", None, "epsilon", 5.0)
    assert plan.settings.prediction_type == "epsilon" and plan.settings.guidance_scale == 5.0
    assert any("--prediction-type sample" in w for w in plan.warnings)
    assert any("--guidance-scale 0" in w for w in plan.warnings)
    assert planning.resolve(model, x0, "file name", None, None, None).warnings == ()


def test_existing_output_is_kept_without_overwrite(cli, base_render):
    before = (base_render / "report.json").read_bytes()
    result = cli("render", _model(base_render), *SMALL, "--out", base_render, ok=False)
    assert "--overwrite" in result.stderr
    assert (base_render / "report.json").read_bytes() == before


def test_image_checks_catch_nan_blank_and_overflow():
    gen = torch.Generator().manual_seed(0)
    good = torch.rand(3, 32, 32, generator=gen) * 1.8 - 0.9
    assert all(c["passed"] for c in checks.image_checks(good).values())
    with_nan = good.clone()
    with_nan[0, 0, 0] = float("nan")
    assert not checks.image_checks(with_nan)["finite"]["passed"]
    assert not checks.image_checks(torch.full((3, 32, 32), 0.3))["not_blank"]["passed"]
    assert not checks.image_checks(good * 10)["value_range"]["passed"]


def test_image_difference():
    a = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    b = a.copy()
    assert checks.image_difference(a, b) == {"mean_abs_diff": 0.0, "psnr_db": None}
    b[:4] = 10  # half the pixels 10 levels off
    diff = checks.image_difference(a, b)
    assert diff["mean_abs_diff"] == 5.0 and diff["psnr_db"] == pytest.approx(10 * torch.log10(
        torch.tensor(255.0 ** 2 / 50)).item(), abs=1e-3)


def test_comfyui_workflow_for_the_x0_unet(cli, tiny_pipeline, tmp_path):
    unet_file = tmp_path / "sdxl_lightning_1step_unet_x0.safetensors"
    shutil.copy(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors", unet_file)
    flow_file = tmp_path / "flow.json"
    result = cli("render", unet_file, "--base", tiny_pipeline, "--comfyui-workflow", flow_file, "--seed", "5",
                 ok=True)
    assert "ModelSamplingDiscrete: sampling x0" in result.stdout
    flow = json.loads(flow_file.read_text())
    by_class = {node["class_type"]: node["inputs"] for node in flow.values()}
    sampler = by_class["KSampler"]
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["cfg"], sampler["steps"], sampler["seed"]) == \
        ("euler", "sgm_uniform", 1.0, 1, 5)
    assert by_class["ModelSamplingDiscrete"]["sampling"] == "x0"
    assert by_class["UNETLoader"]["unet_name"] == unet_file.name
    assert flow[sampler["model"][0]]["class_type"] == "ModelSamplingDiscrete"
    _assert_links_resolve(flow)
    assert not (tmp_path / "render-sdxl_lightning_1step_unet_x0").exists()  # the ComfyUI mode renders nothing


def test_comfyui_workflow_for_a_lora(tiny_lora, tiny_pipeline):
    plan = planning.plan(tiny_lora, base=tiny_pipeline)
    flow = comfyui.workflow(plan.model, plan.settings, "a cat")
    by_class = {node["class_type"]: node["inputs"] for node in flow.values()}
    assert by_class["LoraLoader"]["lora_name"] == tiny_lora.name
    assert "ModelSamplingDiscrete" not in by_class and by_class["KSampler"]["steps"] == 4
    _assert_links_resolve(flow)


def _assert_links_resolve(flow: dict) -> None:
    for node in flow.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in flow, f"{node['class_type']} links to missing node {value[0]}"


def test_a_peft_lora_never_reaches_a_comfyui_workflow_as_is(cli, tiny_lora, tiny_pipeline, tmp_path):
    """ComfyUI drops a peft file's attention modules and its alphas: the export refuses it with the exact command
    that writes a kohya copy, and once that copy exists the workflow loads it instead."""
    peft = tmp_path / "style_peft.safetensors"
    cli("convert", tiny_lora, "--to", "peft", "--out", peft, ok=True)
    flow_file = tmp_path / "flow.json"
    refused = cli("render", peft, "--base", tiny_pipeline, "--steps", "4", "--comfyui-workflow", flow_file, ok=False)
    assert refused.exit_code == 1 and not flow_file.exists() and refused.stderr.count("\n") == 1
    command = refused.stderr.split("make a kohya copy for ComfyUI: ")[1].strip()
    assert command.startswith("lightning-tools convert ") and "--to kohya" in command
    cli(*command.split()[1:], ok=True)  # the command as printed, run as is
    result = cli("render", peft, "--base", tiny_pipeline, "--steps", "4", "--comfyui-workflow", flow_file, ok=True)
    nodes = {n["class_type"]: n["inputs"] for n in json.loads(flow_file.read_text()).values()}
    assert nodes["LoraLoader"]["lora_name"] == "style_peft_kohya.safetensors"
    assert "kohya copy" in result.stdout


def test_the_libraries_own_notices_stay_out_of_the_output(tiny_pipeline, tmp_path):
    """diffusers, transformers and huggingface_hub print notices and bars of their own; without --verbose a
    render's stderr holds nothing but ours (here: nothing at all)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lightning_tools", "render", str(tiny_pipeline), *SMALL,
                             "--steps", "4", "--out", str(tmp_path / "quiet")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("rendered 1 images")
