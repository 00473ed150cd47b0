"""Files today's libraries write are accepted: a pipeline saved by the installed transformers (tokenizer.json
only), PyTorch pickles read through `torch.load(weights_only=True)` and never unpickled otherwise, and files that
are not weights at all named for what they are."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_tools.checkpoint import open_checkpoint, write_checkpoint

TOKENIZERS = ("tokenizer", "tokenizer_2")


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    return {f"{t}/{p.name}": p.read_bytes() for t in TOKENIZERS for p in sorted((folder / t).iterdir())}


def test_the_tiny_pipeline_has_what_transformers_5_writes(tiny_pipeline):
    """The fixture itself follows the installed transformers: a fast tokenizer.json, no vocab/merges pair."""
    from importlib.metadata import version

    if int(version("transformers").split(".")[0]) < 5:
        pytest.skip("transformers 4 writes the slow layout")
    for t in TOKENIZERS:
        assert sorted(p.name for p in (tiny_pipeline / t).iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_pipeline_saved_today_merges_converts_and_extracts_offline(tiny_pipeline, tiny_lora, cli, tmp_path):
    """HF_ENDPOINT is a closed port in tests: nothing may be downloaded, and the pipeline's own tokenizers are
    copied byte for byte into every diffusers output."""
    own = _tokenizer_files(tiny_pipeline)
    merged = tmp_path / "merged"
    cli("merge", "--base", tiny_pipeline, "--lora", tiny_lora, "--out", merged, ok=True)
    single = tmp_path / "merged.safetensors"
    cli("convert", merged, "--to", "comfyui", "--out", single, ok=True)
    back = tmp_path / "back"
    cli("convert", single, "--to", "diffusers", "--config", tiny_pipeline, "--out", back, ok=True)
    extracted = tmp_path / "extracted.safetensors"
    cli("extract", "--base", tiny_pipeline, "--tuned", back, "--rank", "4", "--out", extracted, ok=True)
    for folder in (merged, back):
        assert _tokenizer_files(folder) == own
    for c in ("unet", "text_encoder_2"):  # the round trip through the single file kept every weight
        a, b = load_file(str(next((merged / c).glob("*.safetensors")))), load_file(str(next((back / c).glob("*.safetensors"))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(extracted))


def test_merge_into_a_pickled_checkpoint_equals_the_safetensors_one(tiny_pipeline, tiny_lora, tmp_path, cli):
    """An old `.ckpt` (a `torch.save`d {"state_dict": ...} in single-file naming) merges exactly like the same
    weights in a .safetensors file."""
    single = tmp_path / "model.safetensors"
    write_checkpoint(open_checkpoint(tiny_pipeline), single, "comfyui")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single)), "global_step": 1000}, ckpt)

    outputs = {}
    for name, base in (("from_safetensors", single), ("from_ckpt", ckpt)):
        outputs[name] = tmp_path / f"{name}.safetensors"
        cli("merge", "--base", base, "--lora", tiny_lora, "--out", outputs[name], ok=True)
    a, b = load_file(str(outputs["from_safetensors"])), load_file(str(outputs["from_ckpt"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads(cli("inspect", ckpt, "--json", ok=True).stdout)
    assert info["format"] == "single-file" and info["architecture"] == "sdxl-base"
    assert cli("verify", ckpt, "--config", tiny_pipeline, ok=True).stdout.startswith("OK")


def test_diffusers_unet_saved_as_bin_converts(tiny_pipeline, tmp_path, cli):
    """A DMD2-style UNet: a diffusers state dict saved with torch.save as `.bin`."""
    unet = tmp_path / "dmd2_sdxl_4step_unet_fp16.bin"
    weights = load_file(str(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.save({k: v.half() for k, v in weights.items()}, unet)
    out = tmp_path / "unet.safetensors"
    cli("convert", unet, "--to", "comfyui-unet", "--config", tiny_pipeline, "--out", out, ok=True)
    written = load_file(str(out))
    assert len(written) == len(weights) and all(v.dtype == torch.float16 for v in written.values())


class _Payload:
    """A pickle that runs code when loaded: it creates a file next to it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["convert", "--to", "comfyui", "--out", "x.safetensors"],
                                     ["merge-base"]])
def test_a_pickle_with_code_never_runs_and_is_one_line(tmp_path, tiny_lora, cli, command):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "model.ckpt"
    with open(hostile, "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload(marker)}}, f)
    torch.save({"state_dict": {"w": _Payload(marker)}}, tmp_path / "zipped.ckpt")
    for path in (hostile, tmp_path / "zipped.ckpt"):
        if command == ["merge-base"]:
            args = ["merge", "--base", path, "--lora", tiny_lora, "--out", tmp_path / "out.safetensors"]
        else:
            args = [command[0], path, *[tmp_path / a if a.endswith(".safetensors") else a for a in command[1:]]]
        result = cli(*args, ok=False)
        text = result.stdout + result.stderr
        assert "unsafe pickle" in text and "Traceback" not in text
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
        assert not marker.exists()


@pytest.mark.parametrize("content, named", [
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
    (b'{"model_type": "clip"}', "a JSON file"),
    (b"these are notes\n", "a text file"),
])
def test_other_files_are_named_for_what_they_are(tmp_path, cli, content, named):
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(content)
    for command in ("inspect", "convert"):
        args = [command, path] + (["--to", "comfyui", "--out", tmp_path / "o.safetensors"] if command == "convert" else [])
        result = cli(*args, ok=False)
        assert result.exit_code == 1 and f"is {named}, not a weights file" in result.stderr
        assert result.stderr.count("\n") == 1


def test_gguf_is_named_and_refused(tmp_path, cli):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    result = cli("inspect", path, ok=False)
    assert "is a GGUF file" in result.stderr and "does not read" in result.stderr and result.stderr.count("\n") == 1


def test_render_reads_a_bin_only_component_through_the_safe_path(tiny_pipeline, tmp_path, cli):
    """A pipeline whose VAE exists only as a pickle renders; the pickle goes through weights_only loading."""
    folder = Path(shutil.copytree(tiny_pipeline, tmp_path / "pipe"))
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(vae)), folder / "vae" / "diffusion_pytorch_model.bin")
    vae.unlink()
    out = tmp_path / "render"
    cli("render", folder, "--device", "cpu", "--height", "64", "--width", "64", "--prompt", "a red cat",
        "--steps", "1", "--out", out, ok=True)
    assert json.loads((out / "report.json").read_text())["passed"]
