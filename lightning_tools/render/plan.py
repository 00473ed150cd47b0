"""What is rendered and how it must be sampled, from headers alone (no torch): warnings come before any slow
work, and the ComfyUI export needs nothing more."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lightning_tools import catalog, hub, lora, support
from lightning_tools import provenance as prov
from lightning_tools.errors import UserError
from lightning_tools.sdxl import detect

DEFAULT_STEPS = 4


@dataclass(frozen=True)
class Model:
    """What is rendered. `kind`: diffusers | single-file | unet | lora (what role the file plays); `layout`: how
    it is laid out (`vocabulary.LAYOUTS`), or the LoRA's format. `config_dir`: the `--config` folder."""

    path: Path
    kind: str
    layout: str
    metadata: dict[str, str]
    sha256: str | None = None
    base: Model | None = None
    config_dir: Path | None = None

    def identity(self) -> dict:
        out = {"path": str(self.path), "kind": self.kind, "layout": self.layout, "sha256": self.sha256,
               "data_sha256": self.metadata.get(prov.HASH_KEY) or None}
        if self.base is not None:
            out["base"] = self.base.identity()
        if self.config_dir is not None:
            out["config_dir"] = str(self.config_dir)
        return out


@dataclass(frozen=True)
class Plan:
    """A model and the settings it will be sampled with; `warnings` name the right setting for each mismatch."""

    model: Model
    settings: catalog.Settings
    checkpoint_settings: catalog.Settings | None
    settings_source: str | None
    warnings: tuple[str, ...] = ()


def open_model(path: Path | str, *, base: Path | str | None = None, config: Path | str | None = None) -> Model:
    """Tell what `path` is (diffusers folder, all-in-one file, UNet-only file, LoRA) and check `--base` fits."""
    path = Path(path)
    config_dir = support.check_config_dir(Path(config)) if config is not None else None
    found = detect.detect(path)
    if found.layout == "lora":
        kind, layout = "lora", lora.detect_lora_format(found.source) or "lora"
    elif found.layout in ("diffusers", "single-file", "unet-diffusers", "unet-single-file"):
        if found.architecture != "sdxl-base":
            raise UserError(f"looks like {found.description} ({found.layout}); render supports SDXL base models "
                            "(SDXL-Lightning included)", path=path)
        kind, layout = ("unet" if found.layout.startswith("unet-") else found.layout), found.layout
    else:
        raise UserError(f"not an SDXL model, UNet or LoRA that render can load ({found.layout})", path=path)
    base_model = open_model(base, config=config) if base is not None else None
    if kind in ("unet", "lora"):
        if base_model is None:
            what = "a UNet-only file" if kind == "unet" else "a LoRA"
            raise UserError(f"{what} needs a full SDXL model for the VAE and text encoders; pass --base (a diffusers "
                            "folder or an all-in-one .safetensors)", path=path)
        if base_model.kind not in ("diffusers", "single-file"):
            raise UserError(f"--base must be a full SDXL model (a diffusers folder or an all-in-one .safetensors), "
                            f"not {base_model.kind} ({base_model.layout})", path=base)
    elif base_model is not None:
        raise UserError(f"--base is for UNet-only files and LoRAs; {path} is a complete model already", path=base)
    metadata = dict((found.sources["unet"] if found.layout == "diffusers" else found.source).metadata)
    entry = hub.manifest_entry(path) if path.is_file() else None  # render never hashes multi-GB files itself
    return Model(path=path, kind=kind, layout=layout, metadata=metadata,
                 sha256=entry.get("sha256") if entry else None, base=base_model, config_dir=config_dir)


def plan(model: Path | str, *, base: Path | str | None = None, config: Path | str | None = None,
         steps: int | None = None, prediction_type: str | None = None, guidance_scale: float | None = None) -> Plan:
    """Resolve how `model` must be sampled: its own settings, overridden by the given ones, with warnings."""
    m = open_model(model, base=base, config=config)
    found = prov.settings_for(m.path, m.metadata, m.sha256)
    ckpt, source = found if found else (None, None)
    return resolve(m, ckpt, source, steps, prediction_type, guidance_scale)


def resolve(model: Model, ckpt: catalog.Settings | None, source: str | None, steps: int | None,
            prediction_type: str | None, guidance_scale: float | None) -> Plan:
    """Merge the checkpoint's settings with explicit ones; every disagreement becomes a warning naming the fix."""
    name = model.path.name
    warnings = []
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    if ckpt is None and steps is None:
        warnings.append(f"{name}: nothing says how many steps it was distilled for (no lightning metadata, not in "
                        f"the catalogue, no _Nstep in the name); rendering {DEFAULT_STEPS} steps, pass --steps N")
    used_steps = steps or (ckpt.steps if ckpt else DEFAULT_STEPS)
    used_prediction = prediction_type or (ckpt.prediction_type if ckpt else "epsilon")
    used_guidance = guidance_scale if guidance_scale is not None else (ckpt.guidance_scale if ckpt else 0.0)
    if ckpt is not None and used_steps != ckpt.steps:
        warnings.append(f"{name} was distilled for {ckpt.steps} steps ({source}) but renders at {used_steps}; "
                        f"use --steps {ckpt.steps}")
    if ckpt is not None and used_prediction != ckpt.prediction_type:
        warnings.append(f"{name} predicts {_describe_prediction(ckpt.prediction_type)} ({source}) but renders "
                        f"with prediction_type {used_prediction}; use --prediction-type {ckpt.prediction_type}")
    if used_guidance > 1:
        warnings.append(f"guidance scale {used_guidance:g} turns classifier-free guidance on, but Lightning models "
                        "are distilled without it; use --guidance-scale 0 (CFG 1 in ComfyUI)")
    base = ckpt if ckpt is not None else catalog.Settings(steps=used_steps, prediction_type=used_prediction)
    settings = dataclasses.replace(base, steps=used_steps, prediction_type=used_prediction,
                                   guidance_scale=used_guidance)
    return Plan(model, settings, ckpt, source, tuple(warnings))


def _describe_prediction(prediction_type: str) -> str:
    return "the clean image (x0, prediction_type sample)" if prediction_type == "sample" else "noise (epsilon)"
