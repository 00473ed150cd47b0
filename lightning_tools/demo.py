"""`lightning-tools demo`: the whole tool on a tiny random-weight SDXL-architecture model, offline, in a minute."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import click

from lightning_tools.recipes import StepResult, load_recipe, run_recipe
from lightning_tools.tiny import write_tiny_lightning_lora, write_tiny_pipeline

LORA_NAME = "tiny_lightning_4step_lora.safetensors"


def demo_recipe() -> Path:
    return Path(str(resources.files("lightning_tools") / "demo.toml"))


def run_demo(folder: Path, *, commands: Mapping[str, click.Command], echo: Callable[[str], None],
             obj: dict | None = None) -> list[StepResult]:
    """Write the tiny model and LoRA into `folder` (once) and run the demo recipe there with `commands`.

    Re-running reuses both, so the recipe skips every step whose output is still there: that is the recipe
    runner's cache at work. The demo picks its own folder, so the workdir may lie outside the packaged recipe's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base, lora = folder / "tiny-sdxl", folder / LORA_NAME
    if not (base / "model_index.json").is_file():
        echo(f"writing a tiny SDXL-architecture pipeline (random weights) to {base}")
        write_tiny_pipeline(base)
    if not lora.is_file():
        echo(f"writing a tiny Lightning-format LoRA to {lora}")
        write_tiny_lightning_lora(lora)
    recipe = load_recipe(demo_recipe(), [f"workdir={folder}", f"base={base}", f"lora={lora}"], commands=commands,
                         allow_outside=True)
    echo(f"running the demo recipe {demo_recipe()} (the same runner as `lightning-tools run`)")
    return run_recipe(recipe, echo=echo, obj=obj)


def describe(results: Sequence[StepResult]) -> str:
    """The closing summary: what each step did and where its file is, and what the images are (and are not)."""
    lines = ["", "demo done; what each step did:"]
    for r in results:
        did = "skipped (unchanged)" if r.status == "skipped" else "wrote" if r.outputs else "checked only"
        lines.append(f"  {r.name:<17} {r.command:<8} {did:<20} {r.output or ''}".rstrip())
    renders = [r.output for r in results if r.command == "render" and r.output]
    if renders:
        lines += ["", f"The images in {', '.join(renders)} are noise, by design: the tiny model has random weights. "
                      "The demo shows every step works end to end; a real SDXL model renders real pictures."]
    return "\n".join(lines)
