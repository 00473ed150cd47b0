"""The official SDXL-Lightning files and how to sample them: the one source of truth for "which file for N steps".

Hashes and sizes are pinned to one commit of ByteDance/SDXL-Lightning, so `fetch` can prove that the bytes it
received are the published ones, and `inspect`/`verify` can recognise an official file anywhere on disk.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lightning_tools.errors import UserError
from lightning_tools.report import Report

REPO_ID = "ByteDance/SDXL-Lightning"
REVISION = "c9a24f48e1c025556787b0c58dd67a091ece2e44"
KINDS = ("unet", "lora", "full")


@dataclass(frozen=True)
class CatalogEntry:
    """One official file. `size_confirmed` is False where the size is not pinned (checked after download only)."""

    filename: str
    steps: int
    kind: str
    size: int
    size_confirmed: bool
    sha256: str
    prediction_type: str

    @property
    def settings(self) -> "Settings":
        return recommended_settings(self.steps, self.prediction_type)

    def as_dict(self) -> dict:
        return {**asdict(self), "settings": self.settings.as_dict()}


def _entry(filename: str, size: int, sha256: str, size_confirmed: bool = True) -> CatalogEntry:
    steps = int(re.search(r"_(\d)step", filename).group(1))
    kind = "lora" if filename.endswith("_lora.safetensors") else "unet" if "_unet" in filename else "full"
    prediction = "sample" if "_x0" in filename else "epsilon"
    return CatalogEntry(filename, steps, kind, size, size_confirmed, sha256, prediction)


_UNET, _LORA, _FULL = 5_135_149_736, 393_854_592, 6_938_040_682
CATALOG: tuple[CatalogEntry, ...] = (
    _entry("sdxl_lightning_1step_unet_x0.safetensors", _UNET,
           "14d53ad5b440a37fc0f429d595d96bf144c5dd842aa5747383e6098c9dbfa644"),
    _entry("sdxl_lightning_2step_unet.safetensors", _UNET,
           "15a96a3b213b8b4d6ea720b4fa5bf6723cd877170bd1a90f58e34da2968ef854"),
    _entry("sdxl_lightning_4step_unet.safetensors", _UNET,
           "39a90a8a2a25c1372633c1e8eb1a96f85eab937bcb58cfc6ec9baf66242ec23c"),
    # Same architecture as the other UNets, but this size was not confirmed against the hub: only the hash counts.
    _entry("sdxl_lightning_8step_unet.safetensors", _UNET,
           "471d8260fda0b17b8906feb24573ce64933d4b6b99ba7a1fa43ca051b994e869", size_confirmed=False),
    _entry("sdxl_lightning_2step_lora.safetensors", _LORA,
           "04fafc778385b24144498a8247498ae4fb7a69f702ea0566bdce2845a31fcc43"),
    _entry("sdxl_lightning_4step_lora.safetensors", _LORA,
           "bf56cf2657efb15e465d81402ed481d1e11c4677e4bcce1bc11fe71ad8506b79"),
    _entry("sdxl_lightning_8step_lora.safetensors", _LORA,
           "5aa30d94cdf7950a8b53a693682650ee061eddb128c5435a8f88defea73b2ac6"),
    _entry("sdxl_lightning_1step_x0.safetensors", _FULL,
           "dd8d4c2b341cdbbe88178135786bd4ea1a6f46d6dcb719f05524a5e761ae19a0"),
    _entry("sdxl_lightning_2step.safetensors", _FULL,
           "87e61f60b85d9f1c577bd9053872c7678b7d39f6f52d470081ff6ea3b49ddf98"),
    _entry("sdxl_lightning_4step.safetensors", _FULL,
           "e0d996ee0013e79d9d3561f50fcafb9a17e3ff07b780358e3b66d67932c4d490"),
    _entry("sdxl_lightning_8step.safetensors", _FULL,
           "43f0501ac4ffcef84f3fc32a47779f24c181647fa97ef7f5ec4428107d732ae9"),
)
STEPS = tuple(sorted({e.steps for e in CATALOG}))


@dataclass(frozen=True)
class Settings:
    """How to sample a Lightning model: Euler on trailing timesteps, no classifier-free guidance.

    `guidance_scale=0` is diffusers' way of saying "no CFG", which ComfyUI spells as cfg 1.0.
    """

    steps: int
    prediction_type: str = "epsilon"
    guidance_scale: float = 0.0
    scheduler: str = "EulerDiscreteScheduler"
    timestep_spacing: str = "trailing"
    comfy_sampler: str = "euler"
    comfy_scheduler: str = "sgm_uniform"
    comfy_cfg: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        """Inverse of `as_dict`; keys this version does not know are ignored (files written by newer versions)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def scheduler_config(self, base: dict) -> dict:
        """`base` (a diffusers scheduler config) turned into this model's sampler: what `from_pretrained` then
        loads without the user having to know about trailing timesteps or x0 prediction."""
        return dict(base) | {"_class_name": self.scheduler, "timestep_spacing": self.timestep_spacing,
                             "prediction_type": self.prediction_type}

    def comfyui(self) -> dict:
        """ComfyUI's KSampler inputs for these settings, plus the ModelSamplingDiscrete sampling the model needs
        (None: ComfyUI's default eps). A guidance scale above 1 means CFG is on, and then it is ComfyUI's cfg."""
        return {
            "sampler_name": self.comfy_sampler,
            "scheduler": self.comfy_scheduler,
            "steps": self.steps,
            "cfg": self.comfy_cfg if self.guidance_scale <= 1 else self.guidance_scale,
            "denoise": 1.0,
            "model_sampling": "x0" if self.prediction_type == "sample" else None,
        }

    def describe(self) -> str:
        """One line a person can follow in diffusers or ComfyUI."""
        sample = ", prediction_type=sample" if self.prediction_type == "sample" else ""
        return (f"{self.steps} steps, Euler timestep_spacing={self.timestep_spacing}{sample}, "
                f"guidance_scale={self.guidance_scale:g} | ComfyUI: {self.comfy_sampler} + {self.comfy_scheduler}, "
                f"cfg {self.comfy_cfg:g}")


def recommended_settings(steps: int, prediction_type: str = "epsilon") -> Settings:
    if prediction_type not in ("epsilon", "sample"):
        raise UserError(f"prediction type {prediction_type!r} is not used by Lightning; expected epsilon or sample")
    return Settings(steps=steps, prediction_type=prediction_type)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")


def _check_steps(steps: int) -> None:
    if steps not in STEPS:
        raise UserError(f"there is no {steps}-step file; SDXL-Lightning ships {', '.join(map(str, STEPS))} steps")


def find(steps: int, kind: str) -> CatalogEntry:
    """The official file for `steps` and `kind`; explains what exists when there is none."""
    _check_kind(kind)
    _check_steps(steps)
    if steps == 1 and kind == "lora":
        raise UserError("there is no 1-step LoRA: the 1-step model exists only as a full UNet (x0); "
                        "use the 2-step LoRA instead (--steps 2 --kind lora)")
    return next(e for e in CATALOG if e.steps == steps and e.kind == kind)


def select(steps: tuple[int, ...] = (), kinds: tuple[str, ...] = ()) -> list[CatalogEntry]:
    """The files for every combination of `steps` and `kinds`; an empty tuple means "all".

    A combination asked for explicitly must exist (`find` explains why not); one implied by "all" is skipped.
    """
    for kind in kinds:
        _check_kind(kind)
    for n in steps:
        _check_steps(n)
    if steps and kinds:
        return list(dict.fromkeys(find(n, k) for n in steps for k in kinds))
    return [e for e in CATALOG if (not steps or e.steps in steps) and (not kinds or e.kind in kinds)]


def by_filename(name: str) -> CatalogEntry | None:
    name = Path(name).name
    return next((e for e in CATALOG if e.filename == name), None)


def by_sha256(hexdigest: str) -> CatalogEntry | None:
    hexdigest = hexdigest.lower().removeprefix("0x")
    return next((e for e in CATALOG if e.sha256 == hexdigest), None)


_STEPS_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(\d{1,2})[-_]?steps?(?![a-z])")
_X0_IN_NAME = re.compile(r"(?:^|[^a-z0-9])x0(?![a-z0-9])")


def settings_from_name(filename: str) -> Settings | None:
    """Settings guessed from a name like `..._4step...` (`_x0` means sample prediction); None if it says nothing.

    Only 1 to 8 steps count: a name saying "30steps" is not a few-step distilled model.
    """
    name = Path(filename).name.lower()
    match = _STEPS_IN_NAME.search(name)
    if not match or not 1 <= int(match.group(1)) <= 8:
        return None
    return recommended_settings(int(match.group(1)), "sample" if _X0_IN_NAME.search(name) else "epsilon")


@dataclass
class CatalogListing(Report):
    """What `catalog` prints: the selected official files with the recommended settings."""

    repo_id: str
    revision: str
    files: list[CatalogEntry]

    def to_json(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "files": [e.as_dict() for e in self.files]}

    def describe(self) -> str:
        rows = [("file", "steps", "kind", "size", "prediction", "sha256")] + [
            (e.filename, str(e.steps), e.kind, f"{e.size / 1e9:.2f} GB" + ("" if e.size_confirmed else "?"),
             e.prediction_type, e.sha256[:12]) for e in self.files]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        s = recommended_settings(1)
        unconfirmed = any(not e.size_confirmed for e in self.files)
        lines += ["", f"{self.repo_id} at {self.revision}"
                  + ("; ? = size not confirmed, checked by hash only" if unconfirmed else ""),
                  f"recommended: steps = the file's steps, {s.scheduler} timestep_spacing={s.timestep_spacing}, "
                  f"guidance_scale={s.guidance_scale:g} (x0 files: prediction_type=sample); "
                  f"ComfyUI: {s.comfy_sampler} + {s.comfy_scheduler}, cfg {s.comfy_cfg:g}"]
        return "\n".join(lines)


def listing(steps: tuple[int, ...] = (), kinds: tuple[str, ...] = ()) -> CatalogListing:
    return CatalogListing(REPO_ID, REVISION, select(steps, kinds))
