"""How a model is sampled: its family's sampling profile at the step count, guidance and prediction type used.

A `SamplingProfile` (lightning_tools/families) says how files distilled one way must be sampled; `Sampling` is
that profile applied to one model, which is what travels through provenance metadata, render, the ComfyUI
export, the diffusers scheduler written into a folder and the model card. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tools import families as fams
from lightning_tools.errors import UserError

# What a model that says nothing about itself is sampled as: the family this tool started with.
DEFAULT_FAMILY = "lightning"
DEFAULT_STEPS = 4

# Which kinds of catalogued file a model of each render kind most likely carries the profile of: a fine-tune is
# far more often a LoRA baked in than one of the (few) full distilled checkpoints.
_KIND_PREFERENCE: dict[str, tuple[fams.Kind, ...]] = {
    "lora": ("lora", "unet", "full"), "unet": ("unet", "full", "lora"), "model": ("lora", "full", "unet")}


@dataclass(frozen=True)
class Sampling:
    """A profile at the step count and guidance one model is sampled with. `profile.prediction_type` may differ
    from the catalogued profile's when someone overrode it (render's --prediction-type warns about that)."""

    profile: fams.SamplingProfile
    steps: int
    guidance_scale: float

    @classmethod
    def of(cls, profile: fams.SamplingProfile, *, steps: int | None = None, guidance_scale: float | None = None,
           prediction_type: str | None = None) -> "Sampling":
        """`profile` at `steps` and `guidance_scale` (default: the profile's own); refuses a step count a profile
        with explicit timesteps cannot run."""
        if prediction_type is not None and prediction_type != profile.prediction_type:
            if prediction_type not in ("epsilon", "sample"):
                raise UserError(f"prediction type {prediction_type!r}: expected epsilon or sample")
            profile = dataclasses.replace(profile, prediction_type=prediction_type)
        sampling = cls(profile, profile.steps if steps is None else steps,
                       profile.guidance_scale if guidance_scale is None else float(guidance_scale))
        sampling.pipeline_kwargs()
        return sampling

    @property
    def family(self) -> fams.Family:
        return fams.family(self.profile.family)

    @property
    def prediction_type(self) -> str:
        return self.profile.prediction_type

    @property
    def fixed_steps(self) -> bool:
        """Whether the model was distilled for exactly its step count (one file per count: Lightning, Hyper-SD's
        N-step LoRAs, PCM), not for any count in the profile's range (LCM-LoRA, TCD, SDXL-Turbo)."""
        low, high = self.profile.steps_range
        counts = {f.steps for f in self.family.files if f.profile.name == self.profile.name}
        return low == high or len(counts) > 1

    def scheduler_config(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """`base` (a diffusers scheduler config) turned into this profile's scheduler config. A config made by
        diffusers lists the entries it filled with defaults in `_use_default_values`, and `from_config` ignores
        the values of those: the entries the profile sets are taken off that list, or trailing spacing (say)
        would be dropped for a base whose JSON never named a spacing."""
        config = self.profile.scheduler_config(base)
        if "_use_default_values" in config:
            own = set(self.profile.scheduler_config({}))
            config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in own]
        return config

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The arguments for `StableDiffusionXLPipeline.__call__`: timesteps or a step count, guidance, eta."""
        return self.profile.pipeline_kwargs(steps=self.steps, guidance_scale=self.guidance_scale)

    def comfyui(self) -> dict[str, Any]:
        """ComfyUI's KSampler inputs, the ModelSamplingDiscrete sampling and the custom node where one is needed."""
        return self.profile.comfyui(steps=self.steps, guidance_scale=self.guidance_scale)

    @property
    def comfyui_core(self) -> bool:
        """Whether core ComfyUI (a KSampler) can sample like this, without a custom node."""
        comfy = self.comfyui()
        return comfy["custom_node"] is None and comfy["sampler_name"] is not None and comfy["scheduler"] is not None

    def describe(self) -> str:
        """One line a person can follow in diffusers or ComfyUI."""
        p = self.profile
        if p.timesteps is not None:
            schedule = f"timesteps {list(p.timesteps)}"
        else:
            schedule = f"{self.steps} step{'s' if self.steps != 1 else ''}" + (
                f", timestep_spacing={p.timestep_spacing}" if p.timestep_spacing else "")
        extras = "".join(f", {k}={v}" for k, v in p.overrides)
        extras += ", prediction_type=sample" if p.prediction_type == "sample" else ""
        extras += f", eta={p.eta:g}" if p.eta is not None else ""
        comfy = self.comfyui()
        if self.comfyui_core:
            comfy_text = f"{comfy['sampler_name']} + {comfy['scheduler']}, cfg {comfy['cfg']:g}"
        else:
            comfy_text = f"no core equivalent: {comfy['custom_node']}"
        return (f"{self.family.title} {p.name}: {p.scheduler} {schedule}{extras}, guidance_scale="
                f"{self.guidance_scale:g} | ComfyUI: {comfy_text}")

    def as_dict(self) -> dict[str, Any]:
        """Everything a reader needs to sample the model, even one that does not know the family
        (`from_dict` reads back family, profile, steps, guidance and prediction type)."""
        p = self.profile
        return {"family": p.family, "profile": p.name, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "prediction_type": p.prediction_type, "scheduler": p.scheduler,
                "timestep_spacing": p.timestep_spacing,
                "timesteps": list(p.timesteps) if p.timesteps is not None else None,
                "scheduler_overrides": dict(p.overrides), "eta": p.eta, "lora_strength": p.lora_strength,
                "comfyui": self.comfyui()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Sampling":
        """Inverse of `as_dict`. Files written before the families existed say only steps, prediction type and
        guidance: they are SDXL-Lightning. Raises UserError for a family or profile this version lacks."""
        if not isinstance(data, Mapping):
            raise TypeError("sampler settings must be a JSON object")
        steps, prediction = int(data["steps"]), data.get("prediction_type")
        guidance = data.get("guidance_scale")
        if "family" not in data:
            base = lightning(steps, prediction or "epsilon")
            return cls.of(base.profile, steps=steps, guidance_scale=guidance)
        profile = fams.family(str(data["family"])).profile(str(data["profile"]))
        return cls.of(profile, steps=steps, guidance_scale=guidance, prediction_type=prediction)


def lightning(steps: int, prediction_type: str = "epsilon") -> Sampling:
    """SDXL-Lightning's profile for `prediction_type` at `steps`: what a model known only by its step count is."""
    if prediction_type not in ("epsilon", "sample"):
        raise UserError(f"prediction type {prediction_type!r}: expected epsilon or sample")
    family = fams.family(DEFAULT_FAMILY)
    profile = next(p for p in family.profiles if p.prediction_type == prediction_type)
    return Sampling.of(profile, steps=steps)


def for_file(file: fams.FamilyFile) -> Sampling:
    """How a catalogued file is sampled: its profile at the step count it was distilled for."""
    return Sampling.of(file.profile, steps=file.steps)


def for_family(family: fams.Family, *, kind: str, steps: int | None = None, profile: str | None = None) -> Sampling:
    """A model said to be of `family` (render's and publish's --family): the named `profile`, else the profile of
    the family's file for `steps` of the kind the model most likely carries (`kind`: lora, unet or model), else
    of its first such file."""
    if profile is not None:
        return Sampling.of(family.profile(profile), steps=steps)
    order = _KIND_PREFERENCE[kind]
    files = sorted(family.files, key=lambda f: (order.index(f.kind), f.variant != ""))
    if steps is None:
        four = [f for f in files if f.steps == DEFAULT_STEPS]
        return for_file((four or files)[0])
    exact = [f for f in files if f.steps == steps]
    if exact:
        return for_file(exact[0])
    covering = [p for p in family.profiles if p.steps_range[0] <= steps <= p.steps_range[1]]
    if covering:
        return Sampling.of(covering[0], steps=steps)
    ranges = ", ".join(f"{p.name} {p.steps_range[0]}-{p.steps_range[1]}" for p in family.profiles)
    raise UserError(f"{family.title} has no profile for {steps} steps ({ranges}); pass --steps in one of these "
                    "ranges or --profile NAME")


_STEPS_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(\d{1,2})[-_]?steps?(?![a-z])")
_X0_IN_NAME = re.compile(r"(?:^|[^a-z0-9])x0(?![a-z0-9])")


def from_name(filename: str | Path) -> Sampling | None:
    """SDXL-Lightning at the step count a name like `..._4step...` states (`_x0`: sample prediction); None when it
    states none. Only 1 to 8 steps count: a name saying "30steps" is not a few-step distilled model."""
    name = Path(filename).name.lower()
    match = _STEPS_IN_NAME.search(name)
    if not match or not 1 <= int(match.group(1)) <= 8:
        return None
    return lightning(int(match.group(1)), "sample" if _X0_IN_NAME.search(name) else "epsilon")
