"""Recipes: every recipe in recipes/ runs end to end on tiny fixtures, with the local hub server standing in for
the hub; broken or hostile recipes fail before any work with one line naming the line; the runner owns what its
steps write, so re-runs skip what is unchanged, redo what is gone or failed, and never replace a file it did not
write; a failed step exits with its own code (3 for a failed render gate)."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_tools.families import family
from lightning_tools.recipes import LOCK_FILE, STATE_FILE

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_tools"
RECIPES = PACKAGE.parent / "recipes"
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


def copy_recipe(name: str, folder: Path) -> Path:
    """A shipped recipe copied beside the work, as its header tells users to do."""
    return Path(shutil.copy(RECIPES / name, folder / name))


def cpu_vars(workdir: Path) -> list[str]:
    return ["--set", f"workdir={workdir}", "--set", "device=cpu", "--set", "size=64"]


def one_error(result, exit_code: int) -> str:
    """The CLI's contract for a user mistake: its exit code and exactly one `error:` line, no traceback."""
    assert result.exit_code == exit_code, f"exit {result.exit_code}: {result.output}{result.stderr}"
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not an escaped exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def statuses(result) -> dict[str, str]:
    return {step["step"]: step["status"] for step in json.loads(result.stdout)}


def test_runner_and_demo_never_import_the_cli():
    """Every lightning_tools module reachable from recipes.py or demo.py, through any import anywhere in a file
    (function-level ones too), is not cli.py: the CLI hands the runner its commands."""
    def imports(module: str) -> set[str]:
        tree = ast.parse((PACKAGE / (module.removeprefix("lightning_tools.").replace(".", "/") + ".py"))
                         .read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        return {m for m in found if m.startswith("lightning_tools.")
                and (PACKAGE / (m.removeprefix("lightning_tools.").replace(".", "/") + ".py")).is_file()}

    reached, todo = set(), ["lightning_tools.recipes", "lightning_tools.demo"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += imports(module)

    assert "lightning_tools.tensors" in reached  # the walk follows imports
    assert "lightning_tools.cli" not in reached


def test_bake_recipe_end_to_end_then_rerun_skips_then_a_changed_option_reruns_what_it_touches(
        hub_server, cli, tiny_pipeline, tiny_lora, tiny_single_file, tmp_path, monkeypatch):
    hub_server.add_file(MIRROR, family("lightning").find(4, "lora").filename, tiny_lora.read_bytes())
    hub_server.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    work = tmp_path / "build"
    args = ["run", copy_recipe("bake-lightning-lora.toml", tmp_path), *cpu_vars(work),
            "--set", f"base={tiny_single_file}", "--set", f"config={tiny_pipeline}",
            "--set", f"lightning_repo={MIRROR}", "--set", "repo_id=me/my-sdxl-lightning-4step", "--json"]

    first = json.loads(cli(*args, ok=True).stdout)

    assert [s["status"] for s in first] == ["ran"] * 6
    fetched = work / "downloads" / family("lightning").find(4, "lora").filename
    assert first[0]["output"] == str(fetched.resolve())  # {lightning_lora} is the fetch command's returned file
    assert first[1]["argv"][first[1]["argv"].index("--lora") + 1] == str(fetched.resolve())
    merged = work / "my-sdxl-lightning-4step.safetensors"
    assert merged.is_file() and (work / "my-sdxl-lightning-4step" / "model_index.json").is_file()
    report = json.loads((work / "validation" / "report.json").read_text())
    assert report["passed"] and report["steps"] == 4  # the settings travelled from the LoRA through merge
    published = hub_server.files("me/my-sdxl-lightning-4step")
    assert "unet/diffusion_pytorch_model.safetensors" in published and "README.md" in published
    downloads = dict(hub_server.downloads)

    second = json.loads(cli(*args, ok=True).stdout)

    assert [s["status"] for s in second] == ["skipped"] * 6
    assert second[0]["output"] == first[0]["output"]
    assert dict(hub_server.downloads) == downloads
    before = load_file(str(merged))

    third = json.loads(cli(*args, "--set", "strength=0.5", ok=True).stdout)

    assert [s["status"] for s in third] == ["skipped"] + ["ran"] * 5  # the fetch is unchanged
    after = load_file(str(merged))
    key = next(k for k in after if k.endswith("attn1.to_q.weight") and "input_blocks" in k)
    assert not torch.equal(before[key], after[key])  # replaced in place: the runner wrote the earlier one


def test_comfyui_allinone_recipe_builds_a_loadable_checkpoint(hub_server, cli, tiny_pipeline, tiny_single_file,
                                                              tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = load_file(str(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    lightning = {k: v + 0.01 for k, v in unet.items()}  # a stand-in 'distilled' UNet in diffusers names
    unet_file = tmp_path / "unet.safetensors"
    save_file(lightning, str(unet_file))
    hub_server.add_file(MIRROR, family("lightning").find(4, "unet").filename, unet_file.read_bytes())
    work = tmp_path / "build"

    cli("run", RECIPES / "comfyui-allinone-from-unet.toml", "--allow-outside", "--set", f"workdir={work}",
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


def test_validation_recipe_exits_3_on_a_failed_gate_then_passes_the_next_model(cli, tiny_pipeline, tiny_lora,
                                                                               tiny_single_file, tmp_path):
    reference = tmp_path / "reference"
    cli("render", tiny_single_file, "--config", tiny_pipeline, "--device", "cpu", "--height", 64, "--width", 64,
        "--seed", 0, "--seed", 1, "--out", reference, ok=True)
    other = tmp_path / "other.safetensors"
    cli("merge", "--base", tiny_single_file, "--config", tiny_pipeline, "--lora", tiny_lora, "--strength", 30,
        "--out", other, ok=True)  # strong enough to change the tiny model's images well past --max-diff
    recipe = copy_recipe("validate-against-reference.toml", tmp_path)
    common = [*cpu_vars(tmp_path / "w"), "--set", f"config={tiny_pipeline}", "--set", f"reference={reference}"]

    failed = cli("run", recipe, *common, "--set", f"model={other}")

    error = one_error(failed, 3)  # the render gate's own exit code, through `run`
    assert "candidate_render" in error and "differs from reference" in error  # the real failure, not a leftover

    passed = cli("run", recipe, *common, "--set", f"model={tiny_single_file}", "--json", ok=True)

    assert statuses(passed) == {"intact": "ran", "candidate_render": "ran"}
    assert json.loads((tmp_path / "w" / "candidate-render" / "report.json").read_text())["passed"]


# --- the runner's ownership of outputs, on a recipe that runs in a moment -----------------------------------------

@pytest.fixture
def quick_recipe(tmp_path, tiny_lora) -> Path:
    """Two steps: convert the tiny LoRA to peft, verify the result."""
    path = tmp_path / "quick.toml"
    path.write_text(f'[vars]\nworkdir = "{tmp_path / "work"}"\nlora = "{tiny_lora}"\n\n'
                    '[[steps]]\nname = "peft"\nrun = "convert"\nsrc = "{lora}"\nto = "peft"\n'
                    'out = "{workdir}/peft.safetensors"\n\n'
                    '[[steps]]\nname = "checked"\nrun = "verify"\npaths = "{peft}"\n')
    return path


def test_a_deleted_output_is_made_again_and_what_did_not_change_is_skipped(cli, quick_recipe, tmp_path):
    out = tmp_path / "work" / "peft.safetensors"
    assert statuses(cli("run", quick_recipe, "--json", ok=True)) == {"peft": "ran", "checked": "ran"}
    out.unlink()

    again = cli("run", quick_recipe, "--json", ok=True)

    assert statuses(again) == {"peft": "ran", "checked": "skipped"}  # the same bytes came back
    assert out.is_file()
    assert statuses(cli("run", quick_recipe, "--json", ok=True)) == {"peft": "skipped", "checked": "skipped"}


@pytest.mark.parametrize("case", ["not written by the runner", "changed since the runner wrote it"])
def test_an_output_the_runner_does_not_own_is_left_alone(cli, quick_recipe, tmp_path, case):
    out = tmp_path / "work" / "peft.safetensors"
    if case == "not written by the runner":
        out.parent.mkdir()
        out.write_bytes(b"the user's own file")
    else:
        cli("run", quick_recipe, ok=True)
        out.write_bytes(out.read_bytes() + b"edited")
    before = out.read_bytes()

    error = one_error(cli("run", quick_recipe), 1)

    assert f"{quick_recipe}:10:" in error and str(out) in error and "did not write it" in error
    assert out.read_bytes() == before


def test_a_failed_step_is_retried_with_its_own_error_until_it_passes(cli, tiny_lora, tmp_path):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(tiny_lora.read_bytes()[:-100])  # truncated: verify fails
    recipe = tmp_path / "check.toml"
    recipe.write_text(f'[vars]\nworkdir = "{tmp_path / "work"}"\n\n'
                      f'[[steps]]\nname = "checked"\nrun = "verify"\npaths = "{lora}"\n')

    for _ in range(2):  # a failure is recorded as one, so the same inputs run again and fail the same way
        error = one_error(cli("run", recipe), 1)
        assert "step 'checked' failed" in error and str(lora) in error
    lora.write_bytes(tiny_lora.read_bytes())

    assert statuses(cli("run", recipe, "--json", ok=True)) == {"checked": "ran"}


@pytest.mark.parametrize("force, ran", [([], {"peft", "checked"}), (["peft"], {"peft", "checked"}),
                                         (["checked"], {"checked"})])
def test_force_reruns_every_step_or_one_and_what_uses_its_output(cli, quick_recipe, tmp_path, force, ran):
    cli("run", quick_recipe, ok=True)

    result = cli("run", quick_recipe, "--force", *force, "--json", ok=True)

    assert {step for step, status in statuses(result).items() if status == "ran"} == ran
    assert (tmp_path / "work" / "peft.safetensors").is_file()


def test_force_of_an_unknown_step_is_one_line(cli, quick_recipe):
    error = one_error(cli("run", quick_recipe, "--force", "pefft"), 1)

    assert "pefft" in error and "peft, checked" in error


def test_a_second_run_on_the_same_workdir_refuses(cli, quick_recipe, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with open(work / LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running `lightning-tools run` holds

        error = one_error(cli("run", quick_recipe), 1)

    assert "another `lightning-tools run`" in error
    assert not (work / STATE_FILE).exists() and not (work / "peft.safetensors").exists()


def test_an_unreadable_state_file_is_one_line(cli, quick_recipe, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / STATE_FILE).write_text("{not json")

    error = one_error(cli("run", quick_recipe), 1)

    assert STATE_FILE in error and "delete it" in error


# --- recipes that are broken or hostile fail before any work, in one line ----------------------------------------

def test_lora_toolbox_steps_run_in_a_recipe_and_are_skipped_when_unchanged(cli, tiny_lora, tmp_path):
    recipe = tmp_path / "toolbox.toml"
    recipe.write_text(f'[vars]\nworkdir = "{tmp_path / "work"}"\nlora = "{tiny_lora}"\n\n'
                      '[[steps]]\nname = "small"\nrun = "lora resize"\nsrc = "{lora}"\nrank = 1\n'
                      'out = "{workdir}/small.safetensors"\n\n'
                      '[[steps]]\nname = "both"\nrun = "lora combine"\nloras = ["{lora}", "{small}"]\n'
                      'strength = [0.5, -0.5]\nrank = 2\nallow_stacking = true\nout = "{workdir}/both.safetensors"\n')

    assert statuses(cli("run", recipe, "--json", ok=True)) == {"small": "ran", "both": "ran"}
    small, both = (load_file(tmp_path / "work" / name) for name in ("small.safetensors", "both.safetensors"))
    assert {t.shape[0] for k, t in small.items() if k.endswith("lora_down.weight")} == {1}
    assert {t.shape[0] for k, t in both.items() if k.endswith("lora_down.weight")} <= {1, 2}
    assert statuses(cli("run", recipe, "--json", ok=True)) == {"small": "skipped", "both": "skipped"}
    assert statuses(cli("run", recipe, "--force", "small", "--json", ok=True)) == {"small": "ran", "both": "ran"}


def write_recipe(tmp_path: Path, body: str, workdir: str | None = None) -> Path:
    path = tmp_path / "broken.toml"
    path.write_text(f'[vars]\nworkdir = "{workdir or tmp_path / "work"}"\n' + body)
    return path


@pytest.mark.parametrize("body, line, words", [
    ('[[steps]]\nname = "m"\nrun = "merge"\nbase = "{w}"\nlora = "x"\nout = "o.safetensors"\nstrenght = 1\n',
     9, "no option 'strenght'"),
    ('[[steps]]\nname = "a"\nrun = "verify"\npaths = "{b}"\n\n[[steps]]\nname = "b"\nrun = "convert"\n'
     'src = "{workdir}"\nto = "comfyui"\nout = "x.safetensors"\n', 6, "runs later"),
    ('[[steps]]\nname = "a"\nrun = "verify"\npaths = "{here}"\n\n[[steps]]\nname = "b"\nrun = "inspect"\n'
     'path = "{a}"\n', 11, "writes no output"),
    ('[[steps]]\nname = "a"\nrun = "convert"\nsrc = "/nonexistent/model.safetensors"\nto = "diffusers"\nout = "d"\n',
     6, "does not exist"),
    ('[[steps]]\nname = "a"\nrun = "delete-everything"\n', 5, "not one of"),
    ('[[steps]]\nname = "a"\nrun = "merge"\nbase = "{here}"\nlora = "{here}"\n', 3, "needs `out`"),
    ('[[steps]]\nname = "a"\nrun = "convert"\nsrc = "."\nto = "peft"\nout = "x"\noverwrite = true\n',
     9, "the runner's to set"),
    ('[[steps]]\nname = "a"\nrun = "convert"\nsrc = "."\nto = "peft"\nout = {file = "x"}\n', 8, "must be a string"),
])
def test_broken_recipe_fails_before_any_work_naming_the_line(cli, tmp_path, body, line, words):
    recipe = write_recipe(tmp_path, body)

    result = cli("run", recipe, "--set", f"here={tmp_path}")

    error = one_error(result, 1)
    assert f"{recipe}:{line}:" in error and words in error
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()


def _fifo(tmp: Path) -> Path:
    (tmp / "model").mkdir(exist_ok=True)
    os.mkfifo(tmp / "model" / "unet.safetensors")
    return tmp / "model" / "unet.safetensors"


def _link_to_proc(tmp: Path) -> Path:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").symlink_to("/proc/self/environ")
    return tmp / "model"


def _socket(tmp: Path) -> Path:
    path = tmp / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # the file stays after the socket closes
    sock.close()
    return path


@pytest.mark.parametrize("make, words", [
    (lambda tmp: "[steps]\nrun = \"verify\"\n", "each [[steps]] a table"),
    (lambda tmp: "[[steps]\nname = \n", "not valid TOML"),
    (lambda tmp: "x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    (lambda tmp: '[[steps]]\nname = "a"\nrun = "verify"\npaths = "/proc/self"\n', "is under /proc"),
    (lambda tmp: '[[steps]]\nname = "a"\nrun = "verify"\npaths = "/dev/null"\n', "is under /dev"),
    (lambda tmp: '[[steps]]\nname = "a"\nrun = "verify"\npaths = "/"\n', "holds /proc"),
    (lambda tmp: f'[[steps]]\nname = "a"\nrun = "verify"\npaths = "{_fifo(tmp)}"\n', "is a FIFO"),
    (lambda tmp: f'[[steps]]\nname = "a"\nrun = "verify"\npaths = "{_socket(tmp)}"\n', "is a socket"),
    (lambda tmp: f'[[steps]]\nname = "a"\nrun = "verify"\npaths = "{_fifo(tmp).parent}"\n', "inside input folder"),
    (lambda tmp: f'[[steps]]\nname = "a"\nrun = "verify"\npaths = "{_link_to_proc(tmp)}"\n', "is under /proc"),
], ids=["steps-not-tables", "toml-syntax", "toml-bomb", "proc", "device", "root-folder", "fifo", "socket",
        "fifo-in-folder", "link-to-proc-in-folder"])
def test_hostile_recipe_is_one_line_before_any_work(cli, tmp_path, make, words):
    recipe = write_recipe(tmp_path, make(tmp_path))

    error = one_error(cli("run", recipe), 1)

    assert str(recipe) in error and words in error
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("workdir, allowed", [("/", False), ("{outside}", True), ("{inside}/../../elsewhere", True)])
def test_workdir_stays_in_the_recipes_folder_unless_allowed(cli, tmp_path, tiny_lora, workdir, allowed):
    home = tmp_path / "project"
    home.mkdir()
    workdir = workdir.format(outside=tmp_path / "elsewhere", inside=home)
    recipe = write_recipe(home, f'[[steps]]\nname = "a"\nrun = "verify"\npaths = "{tiny_lora}"\n', workdir)

    error = one_error(cli("run", recipe, "--dry-run"), 1)

    assert f"{recipe}:2:" in error and "workdir" in error
    with_flag = cli("run", recipe, "--dry-run", "--allow-outside")
    if allowed:
        assert with_flag.exit_code == 0, with_flag.stderr
    else:
        assert "filesystem root" in one_error(with_flag, 1)


def test_dry_run_prints_resolved_commands_and_writes_nothing(cli, tiny_pipeline, tiny_lora, tmp_path):
    result = cli("run", PACKAGE / "demo.toml", "--allow-outside",
                 "--set", f"workdir={tmp_path / 'w'}", "--set", f"base={tiny_pipeline}",
                 "--set", f"lora={tiny_lora}", "--dry-run", ok=True)

    assert f"lightning-tools merge --base {tiny_pipeline} --lora {tiny_lora}" in result.stdout
    assert f"--out {tmp_path / 'w'}/tiny-sdxl-lightning-4step.safetensors" in result.stdout
    assert not (tmp_path / "w").exists()
