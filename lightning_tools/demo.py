"""`lightning-tools demo`: the whole tool on a tiny random-weight SDXL-architecture model, offline, in a minute."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from lightning_tools.recipes import StepResult, load_recipe, run_recipe
from lightning_tools.tiny import write_tiny_lightning_lora, write_tiny_pipeline

LORA_NAME = "tiny_lightning_4step_lora.safetensors"


def demo_recipe() -> Path:
    return Path(str(resources.files("lightning_tools") / "demo.toml"))


def run_demo(folder: Path, echo: Callable[[str], None], obj: dict | None = None,
             json_results: bool = False) -> list[StepResult]:
    """Write the tiny model and LoRA into `folder` (once) and run the demo recipe there.

    Re-running reuses both, so the recipe skips every step: that is the recipe runner's cache at work.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base, lora = folder / "tiny-sdxl", folder / LORA_NAME
    if not (base / "model_index.json").is_file():
        echo(f"writing a tiny SDXL-architecture pipeline (random weights) to {base}")
        write_tiny_pipeline(base)
    if not lora.is_file():
        echo(f"writing a tiny Lightning-format LoRA to {lora}")
        write_tiny_lightning_lora(lora)
    recipe = load_recipe(demo_recipe(), [f"workdir={folder}", f"base={base}", f"lora={lora}"])
    echo(f"running the demo recipe {demo_recipe()} (the same runner as `lightning-tools run`)")
    return run_recipe(recipe, echo=echo, obj=obj, json_results=json_results)
