"""What is rendered and how it must be sampled, from headers alone (no torch): warnings come before any slow
work, and the ComfyUI export needs nothing more.

How a model samples is its few-step family's profile (lightning_tools/families): found in its own metadata, by
its catalogued name or hash, or by a step count in its name, or named with --family/--profile. Explicit options
override it, and every disagreement with what the model was distilled for becomes a warning naming the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lightning_tools import hub, lora, support
from lightning_tools import provenance as prov
from lightning_tools.errors import UsageError, UserError
from lightning_tools.families import family as find_family
from lightning_tools.sampling import DEFAULT_FAMILY, DEFAULT_STEPS, Sampling, for_family, lightning
from lightning_tools.sdxl import detect


@dataclass(frozen=True)
class Model:
    """What is rendered. `kind`: diffusers | single-file | unet | lora (what role the file plays); `layout`: how
    it is laid out (`vocabulary.LAYOUTS`), or the LoRA's format. `config_dir`: the `--config` folder.
    `lora_strength`: the strength a LoRA is merged into its base at (None until a plan chooses it)."""

    path: Path
    kind: str
    layout: str
    metadata: dict[str, str]
    sha256: str | None = None
    base: Model | None = None
    config_dir: Path | None = None
    lora_strength: float | None = None

    def identity(self) -> dict:
        out = {"path": str(self.path), "kind": self.kind, "layout": self.layout, "sha256": self.sha256,
               "data_sha256": self.metadata.get(prov.HASH_KEY) or None}
        if self.base is not None:
            out["base"] = self.base.identity()
        if self.lora_strength is not None:
            out["lora_strength"] = self.lora_strength
        if self.config_dir is not None:
            out["config_dir"] = str(self.config_dir)
        return out


@dataclass(frozen=True)
class Plan:
    """A model and how it will be sampled (`settings`: a family profile at the steps and guidance used);
    `checkpoint_settings` is what the model itself asks for and `settings_source` says why (None: nothing said,
    the defaults are used); `warnings` name the right setting for each mismatch."""

    model: Model
    settings: Sampling
    checkpoint_settings: Sampling | None
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
         steps: int | None = None, prediction_type: str | None = None, guidance_scale: float | None = None,
         family: str | None = None, profile: str | None = None, lora_strength: float | None = None) -> Plan:
    """Resolve how `model` must be sampled: its own profile (or the `family`/`profile` named for it), overridden
    by the given settings, with warnings. A LoRA is merged at `lora_strength`, default its profile's."""
    m = open_model(model, base=base, config=config)
    if lora_strength is not None and m.kind != "lora":
        raise UsageError(f"--lora-strength is for LoRAs; {m.path} is a {m.kind} model")
    found = prov.settings_for(m.path, m.metadata, m.sha256)
    ckpt, source = found if found else (None, None)
    warnings: list[str] = []
    if family is not None or profile is not None:
        chosen = find_family(family) if family is not None else ckpt.family if ckpt is not None else \
            find_family(DEFAULT_FAMILY)
        named = for_family(chosen, kind="model" if m.kind in ("diffusers", "single-file") else m.kind,
                           steps=steps, profile=profile)
        said = " ".join(filter(None, [f"--family {family}" if family else "",
                                      f"--profile {profile}" if profile else ""]))
        if ckpt is not None and (ckpt.profile.family, ckpt.profile.name) != (named.profile.family, named.profile.name):
            warnings.append(f"{m.path.name} says it is {ckpt.family.title} {ckpt.profile.name} ({source}) but "
                            f"renders as {named.family.title} {named.profile.name} ({said}); leave out {said} to "
                            "use its own")
        ckpt, source = named, said
    resolved = resolve(m, ckpt, source, steps, prediction_type, guidance_scale)
    if m.kind == "lora":
        recommended = resolved.settings.profile.lora_strength
        m = dataclasses.replace(m, lora_strength=lora_strength if lora_strength is not None else recommended or 1.0)
    return dataclasses.replace(resolved, model=m, warnings=tuple(warnings) + resolved.warnings)


def resolve(model: Model, ckpt: Sampling | None, source: str | None, steps: int | None,
            prediction_type: str | None, guidance_scale: float | None) -> Plan:
    """Merge the checkpoint's profile with explicit settings; every disagreement becomes a warning naming the fix.
    Without a profile the model is sampled as SDXL-Lightning at the given (or 4) steps."""
    name = model.path.name
    warnings = []
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    if ckpt is None and steps is None:
        warnings.append(f"{name}: nothing says how it samples (no lightning metadata, not in the catalogue, no "
                        f"_Nstep in the name); rendering {DEFAULT_STEPS} steps as SDXL-Lightning, pass --steps N or "
                        "--family NAME")
    base = ckpt if ckpt is not None else lightning(steps or DEFAULT_STEPS, prediction_type or "epsilon")
    what = f"{base.family.title} {base.profile.name}"
    used_steps = steps or base.steps
    low, high = base.profile.steps_range
    if ckpt is not None and used_steps != ckpt.steps and ckpt.fixed_steps:
        warnings.append(f"{name} was distilled for {ckpt.steps} steps ({source}) but renders at {used_steps}; "
                        f"use --steps {ckpt.steps}")
    elif ckpt is not None and not low <= used_steps <= high:
        warnings.append(f"{name} ({what}, {source}) samples well at {low}-{high} steps but renders at "
                        f"{used_steps}; use --steps {ckpt.steps}")
    used_prediction = prediction_type or base.prediction_type
    if ckpt is not None and used_prediction != ckpt.prediction_type:
        warnings.append(f"{name} predicts {_describe_prediction(ckpt.prediction_type)} ({source}) but renders "
                        f"with prediction_type {used_prediction}; use --prediction-type {ckpt.prediction_type}")
    used_guidance = guidance_scale if guidance_scale is not None else base.guidance_scale
    g_low, g_high = base.profile.guidance_range
    default = base.profile.guidance_scale
    if used_guidance > 1 >= g_high:
        warnings.append(f"guidance scale {used_guidance:g} turns classifier-free guidance on, but {what} is "
                        f"distilled without it; use --guidance-scale {default:g} (CFG 1 in ComfyUI)")
    elif not g_low <= used_guidance <= g_high and not (used_guidance <= 1 and g_low <= 1):
        warnings.append(f"guidance scale {used_guidance:g} is outside the {g_low:g}-{g_high:g} {what} was made "
                        f"for; use --guidance-scale {default:g}")
    settings = Sampling.of(base.profile, steps=used_steps, guidance_scale=used_guidance,
                           prediction_type=used_prediction)
    return Plan(model, settings, ckpt, source, tuple(warnings))


def _describe_prediction(prediction_type: str) -> str:
    return "the clean image (x0, prediction_type sample)" if prediction_type == "sample" else "noise (epsilon)"
