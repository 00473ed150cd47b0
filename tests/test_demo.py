"""`lightning-tools demo`, the README's first command: the whole chain on the tiny model, then a cached re-run."""

import json

from safetensors import safe_open


def test_demo_runs_every_step_then_skips_them(cli, tmp_path):
    folder = tmp_path / "demo"

    first = cli("demo", folder, ok=True)

    assert "demo done" in first.stdout and "[run]  render" in first.stdout
    merged = folder / "tiny-sdxl-lightning-4step.safetensors"
    with safe_open(str(merged), "pt") as f:
        assert f.metadata()["lightning.steps"] == "4"  # from the LoRA's name, through merge
    report = json.loads((folder / "render" / "report.json").read_text())
    assert report["passed"] and report["scheduler"]["timesteps"] == [999, 749, 499, 249]
    assert (folder / "extracted_lora.safetensors").is_file() and (folder / "model-card.md").is_file()

    again = json.loads(cli("demo", folder, "--json", ok=True).stdout)

    assert {step["status"] for step in again} == {"skipped"}
