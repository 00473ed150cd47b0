"""`lightning-tools demo`, the README's first command: the whole chain on the tiny model, a cached re-run, and a
re-run after any step's output was deleted, which redoes that step (and what uses it) instead of getting stuck."""

import json
import shutil

from safetensors import safe_open


def statuses(result) -> dict[str, str]:
    return {step["step"]: step["status"] for step in json.loads(result.stdout)}


def test_demo_runs_every_step_skips_them_then_redoes_any_deleted_output(cli, tmp_path):
    folder = tmp_path / "demo"

    first = cli("demo", folder, ok=True)

    assert "[run]  render" in first.stdout
    summary = first.stdout[first.stdout.index("demo done"):].splitlines()
    row = {line.split()[0]: line for line in summary[1:] if line.startswith("  ")}
    assert "wrote" in row["merged"] and "tiny-sdxl-lightning-4step.safetensors" in row["merged"]
    assert "checked only" in row["verified"]
    assert "wrote" in row["card"] and "model-card.md" in row["card"]  # publish --dry-run wrote the card
    assert "noise, by design" in first.stdout and "random weights" in first.stdout
    merged = folder / "tiny-sdxl-lightning-4step.safetensors"
    with safe_open(str(merged), "pt") as f:
        assert f.metadata()["lightning.steps"] == "4"  # from the LoRA's name, through merge
    report = json.loads((folder / "render" / "report.json").read_text())
    assert report["passed"] and report["scheduler"]["timesteps"] == [999, 749, 499, 249]
    assert (folder / "extracted_lora.safetensors").is_file() and (folder / "model-card.md").is_file()
    with safe_open(str(folder / "extracted_lora_rank2.safetensors"), "pt") as f:  # lora resize --rank 2
        assert {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")} == {2}

    again = cli("demo", folder, "--json", ok=True)

    assert set(statuses(again).values()) == {"skipped"}

    # step -> its output, and the steps that use it (directly or not), which may run again too
    outputs = {"render": ("render", {"card"}), "card": ("model-card.md", set()),
               "merged": ("tiny-sdxl-lightning-4step.safetensors",
                          {"verified", "merged_diffusers", "render", "extracted", "resized", "card"}),
               "merged_diffusers": ("tiny-sdxl-lightning-4step", {"render", "extracted", "resized", "card"}),
               "base_comfyui": ("tiny-sdxl.safetensors", set()),
               "extracted": ("extracted_lora.safetensors", {"resized"}),
               "resized": ("extracted_lora_rank2.safetensors", set())}

    for step, (name, users) in outputs.items():
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()

        result = cli("demo", folder, "--json", ok=True)

        ran = {s for s, status in statuses(result).items() if status == "ran"}
        assert step in ran and ran <= {step} | users, (step, ran)
        assert path.exists()
