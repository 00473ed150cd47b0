"""render at scale: several models, a comparison of them, and the work shared between processes a launcher starts.

The launched tests start real worlds of 2 CPU processes (gloo), with torchrun and with `accelerate launch`, on
the tiny model at 64x64: what two processes write must be what one writes, byte for byte, and a failure in one
process must end both with one error line and no output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from lightning_tools.render import compare as comparing
from lightning_tools.render.run import model_names

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("a red cat", "a lake under a mountain", "the photo of a girl smiling")
SEEDS = (0, 1)
SMALL = ("--device", "cpu", "--height", "64", "--width", "64")
# What may differ between two runs of the same work: when, where and by whom it was done, and what it was
# compared with.
RUN_FIELDS = {"out", "seconds", "seconds_per_image", "warmup_seconds", "world_size", "processes", "rank",
              "reference"}


def _args(*models: Path, prompts=PROMPTS, seeds=SEEDS) -> list[str]:
    args = [str(m) for m in models] + list(SMALL)
    for prompt in prompts:
        args += ["--prompt", prompt]
    for seed in seeds:
        args += ["--seed", str(seed)]
    return args


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _without_run_fields(value):
    if isinstance(value, dict):
        return {k: _without_run_fields(v) for k, v in value.items() if k not in RUN_FIELDS}
    if isinstance(value, list):
        return [_without_run_fields(v) for v in value]
    return value


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`LAUNCHER -m lightning_tools render ARGS` with this checkout's code, as a user would start it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *launcher, "-m", "lightning_tools", "render", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=240)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def one_process(tiny_pipeline, tiny_lora, tmp_path_factory) -> Path:
    """Two models (a complete one, and a LoRA that --base completes) x 3 prompts x 2 seeds in this process."""
    from click.testing import CliRunner

    from lightning_tools.cli import main

    out = tmp_path_factory.mktemp("scale") / "one"
    result = CliRunner().invoke(main, ["render", *_args(tiny_pipeline, tiny_lora), "--base", str(tiny_pipeline),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return out


def test_several_models_get_a_folder_each_and_a_comparison(one_process, tiny_pipeline, tiny_lora):
    top = _report(one_process)
    assert top["passed"] and top["world_size"] == 1
    names = [m["name"] for m in top["models"]]
    assert names == ["tiny-sdxl", "tiny_lightning_4step_lora"]
    assert [m["path"] for m in top["models"]] == [str(tiny_pipeline), str(tiny_lora)]
    for name in names:  # each folder is what a render of that model alone writes
        report = _report(one_process / name)
        assert [(i["file"], i["prompt"], i["seed"]) for i in report["images"]] == \
            [(f"image-{k:03d}.png", p, s) for k, (p, s) in enumerate((p, s) for p in PROMPTS for s in SEEDS)]
        assert all((one_process / name / i["file"]).is_file() for i in report["images"])
        assert (one_process / name / "contact_sheet.png").is_file()
    assert _report(one_process / names[1])["model"]["base"]["path"] == str(tiny_pipeline)  # only the LoRA's

    comparison = top["comparison"]
    assert comparison["sheets"] == ["compare.png"]
    sheet = Image.open(one_process / "compare.png")
    assert sheet.width > 6 * 64 and sheet.height > 2 * 64  # 6 (prompt, seed) columns, 2 model rows
    (pair,) = comparison["pairs"]
    assert (pair["a"], pair["b"], pair["images"]) == (*names, 6)
    # the numbers are those of the two images on disk
    first = pair["per_image"][0]
    a, b = (np.asarray(Image.open(one_process / n / "image-000.png")).astype(float) for n in names)
    assert (first["prompt"], first["seed"]) == (PROMPTS[0], 0)
    assert first["mean_abs_diff"] == pytest.approx(np.abs(a - b).mean(), abs=1e-4) and first["mean_abs_diff"] > 0
    assert first["psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / ((a - b) ** 2).mean()), abs=1e-3)


def test_two_processes_render_exactly_what_one_does(one_process, tiny_pipeline, tiny_lora, tmp_path):
    """The issue's acceptance test: torchrun starts 2 CPU processes on 2 models x 3 prompts x 2 seeds; 12 images,
    each rendered once, byte-identical to the one-process run, in one report whose gate covers all of them."""
    out = tmp_path / "two"
    result = _launch(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                     [*_args(tiny_pipeline, tiny_lora), "--base", str(tiny_pipeline), "--out", str(out),
                      "--reference", str(one_process)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _errors(result.stderr) == []
    assert result.stdout.count("rendered 12 images of 2 models") == 1  # the main process reports, once

    pngs = _pngs(out)
    assert pngs == _pngs(one_process)  # every image, contact sheet and the comparison grid, byte for byte
    assert len([name for name in pngs if "/image-" in name]) == 12
    top = _report(out)
    assert _without_run_fields(top) == _without_run_fields(_report(one_process))
    assert top["world_size"] == 2 and [p["rank"] for p in top["processes"]] == [0, 1]
    ranks = []
    for m in top["models"]:
        report = _report(out / m["name"])
        assert _without_run_fields(report) == _without_run_fields(_report(one_process / m["name"]))
        assert report["world_size"] == 2
        ranks += [image["rank"] for image in report["images"]]
        # the gate met every image with its own reference image (same model folder, prompt and seed)
        assert report["reference"] == {"path": str(one_process), "max_diff": 3.0}
        assert all(i["reference"]["passed"] and i["reference"]["mean_abs_diff"] == 0 for i in report["images"])
    assert len(ranks) == 12 and set(ranks) == {0, 1}  # each image once, both processes worked
    assert not list(tmp_path.glob(".two.*"))  # no temporary folder left behind


def test_a_failure_in_one_process_ends_all_with_one_line_and_no_output(tiny_pipeline, tiny_lora, tmp_path):
    """`accelerate launch` starts 2 processes; the second one's model (a LoRA one module of which fits nothing)
    fails only when it loads, in that process alone: both end, the main process says why, once, naming where."""
    tensors = load_file(tiny_lora)
    module = sorted(k.split(".")[0] for k in tensors)[0]
    broken = tmp_path / "broken_4step_lora.safetensors"
    save_file({k.replace(module, module + "_nowhere") if k.startswith(module + ".") else k: v
               for k, v in tensors.items()}, broken)
    out = tmp_path / "never"
    result = _launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())],
                     [*_args(tiny_pipeline, broken, prompts=PROMPTS[:1], seeds=(0,)), "--base", str(tiny_pipeline),
                      "--out", str(out)], tmp_path)
    assert result.returncode != 0
    (error,) = _errors(result.stderr)
    assert "broken_4step_lora.safetensors" in error and "find no weight of the base" in error
    assert "(process 1 of 2 on " in error
    assert "Traceback" not in result.stderr.split("error:")[0]  # nothing of ours before it
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_each_model_meets_its_own_folder_of_a_reference_of_several(one_process, tiny_pipeline, tiny_lora, cli,
                                                                   tmp_path):
    """Against an earlier render of several models a model meets the folder of its name; one the earlier render
    lacks fails the gate on its own, with the reason, and the other still passes."""
    other = tmp_path / "other_4step_lora.safetensors"
    other.write_bytes(tiny_lora.read_bytes())
    out = tmp_path / "against"
    result = cli("render", *_args(tiny_pipeline, other, prompts=PROMPTS[:1], seeds=(1,)), "--base", tiny_pipeline,
                 "--out", out, "--reference", one_process)
    assert result.exit_code == 3
    (error,) = _errors(result.stderr)
    assert f"other_4step_lora/image-000.png: the reference render {one_process} has no model other_4step_lora" \
        in error
    top = _report(out)
    assert [m["passed"] for m in top["models"]] == [True, False]
    (image,) = _report(out / "tiny-sdxl")["images"]
    assert image["reference"]["file"] == "image-001.png" and image["reference"]["mean_abs_diff"] == 0


def test_one_model_keeps_its_layout_and_says_which_process_rendered(cli, tiny_pipeline, one_process, tmp_path):
    out = tmp_path / "single"
    cli("render", *_args(tiny_pipeline, prompts=PROMPTS[:1], seeds=(0,)), "--out", out, "--reference",
        one_process / "tiny-sdxl", ok=True)
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "image-000.png", "report.json"]
    report = _report(out)
    assert report["world_size"] == 1 and [p["rank"] for p in report["processes"]] == [0]
    assert report["images"][0]["rank"] == 0 and report["images"][0]["reference"]["mean_abs_diff"] == 0


def test_the_comfyui_modes_take_one_model(cli, tiny_pipeline, tiny_lora, tmp_path):
    result = cli("render", tiny_pipeline, tiny_lora, "--print-comfyui")
    (error,) = _errors(result.stderr)
    assert result.exit_code == 2 and error.startswith("error: --print-comfyui and --comfyui-workflow take one MODEL")


def test_model_names_are_folder_names_numbered_when_alike(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "my-model").mkdir()
    files = [tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"]
    for f in files:
        f.touch()
    assert model_names([*files, tmp_path / "my-model", files[0]]) == ["model", "model-2", "my-model", "model-3"]


def test_comparison_numbers_and_sheets(tmp_path):
    """Three 'models' over 17 columns: the grid goes on two sheets; identical images have no PSNR, and an image
    off by 10 levels on half its pixels is 5 levels and 10*log10(255^2/50) dB away."""
    names = ["base", "same", "shifted"]
    columns = [(f"prompt {i}", 0) for i in range(17)]
    images = []
    for name in names:
        (tmp_path / name).mkdir()
        row = []
        for i in range(17):
            pixels = np.random.default_rng(i).integers(0, 200, (16, 16, 3), dtype=np.uint8)
            if name == "shifted":
                pixels[:8] += 10
            path = tmp_path / name / f"{i}.png"
            Image.fromarray(pixels).save(path)
            row.append(comparing.Rendered(path, passed=name != "shifted" or i != 3))
        images.append(row)
    result = comparing.compare(tmp_path, names, columns, images)
    assert result.sheets == ["compare-001.png", "compare-002.png"]
    assert all((tmp_path / s).is_file() for s in result.sheets)
    same, shifted, _ = result.pairs
    assert (same.a, same.b, same.images, same.identical, same.mean_abs_diff, same.psnr_db) == \
        ("base", "same", 17, 17, 0, None)
    assert (shifted.a, shifted.b, shifted.identical, shifted.mean_abs_diff, shifted.max_mean_abs_diff) == \
        ("base", "shifted", 0, 5, 5)
    assert shifted.psnr_db == pytest.approx(10 * np.log10(255 ** 2 / 50), abs=1e-3)
    assert [(d.prompt, d.seed) for d in shifted.per_image] == columns
