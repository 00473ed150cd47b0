"""The few-step SDXL families (SDXL-Lightning, Hyper-SD, DMD2, TCD, PCM, LCM-LoRA, SDXL-Turbo) as data.

Each family is one TOML file beside this module: where its files live (hub repo and a pinned revision; size and
sha256 where public material states them), its licence, and how each file must be sampled: a sampling profile
with the diffusers scheduler and its config, explicit timesteps or a spacing, steps, guidance, eta, resolution,
prediction type, LoRA strength and the ComfyUI equivalent, each with its source. Every family was distilled for a
different sampler, so the sampler is knowledge about the file, kept here and nowhere else.

The data is read once and validated strictly (unknown keys, dangling profile names and bad values are refused),
and nothing heavy is imported: `catalog`, `inspect` and `verify` stay header-only fast.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from lightning_tools.errors import CorruptFile, UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Kind = Literal["lora", "unet", "full"]
PredictionType = Literal["epsilon", "sample"]
Spacing = Literal["leading", "trailing", "linspace"]
SchedulerName = Literal["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
                        "LCMScheduler", "TCDScheduler"]
KINDS: tuple[Kind, ...] = get_args(Kind)
SCHEDULERS: tuple[SchedulerName, ...] = get_args(SchedulerName)


@dataclass(frozen=True)
class License:
    """A licence a family's weights are published under. `commercial` is None where the repo declares none."""

    id: str  # the hub's licence tag
    title: str
    url: str | None
    commercial: bool | None


LICENSES: dict[str, License] = {lic.id: lic for lic in (
    License("openrail++", "CreativeML Open RAIL++-M",
            "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md", True),
    License("mit", "MIT", "https://opensource.org/license/mit", True),
    License("cc-by-nc-4.0", "Creative Commons Attribution-NonCommercial 4.0",
            "https://creativecommons.org/licenses/by-nc/4.0/", False),
    License("sai-nc-community", "Stability AI Non-Commercial Research Community License",
            "https://huggingface.co/stabilityai/sdxl-turbo/blob/main/LICENSE.TXT", False),
    License("unspecified", "no licence declared by the repository", None, None),
)}


@dataclass(frozen=True)
class ComfyUISampling:
    """What ComfyUI needs to sample like the profile. `sampler`/`scheduler` are KSampler names; None where a
    custom node (named in `custom_node`) must provide them because core ComfyUI has no equivalent."""

    sampler: str | None
    scheduler: str | None
    custom_node: str | None
    note: str | None
    source: str


@dataclass(frozen=True)
class SamplingProfile:
    """How files distilled one way must be sampled, in diffusers terms (guidance_scale <= 1 means no CFG).

    `timesteps`, when set, are passed to the pipeline instead of a step count (the scheduler's own spacing would
    give other ones); otherwise `timestep_spacing` (when set) replaces the base scheduler's spacing.
    """

    family: str
    name: str
    scheduler: SchedulerName
    overrides: tuple[tuple[str, Any], ...]  # further scheduler config entries, (key, value) pairs
    timestep_spacing: Spacing | None
    timesteps: tuple[int, ...] | None
    prediction_type: PredictionType
    steps: int  # the default step count
    steps_range: tuple[int, int]
    guidance_scale: float
    guidance_range: tuple[float, float]
    eta: float | None  # TCD's gamma; passed to the pipeline only when set
    resolution: tuple[int, int]  # width, height
    lora_strength: float | None  # recommended strength when the file is a LoRA merged into a fine-tune
    comfyui_sampling: ComfyUISampling
    source: str
    note: str | None

    def scheduler_config(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """`base` (a diffusers scheduler config, e.g. the SDXL base's) turned into this profile's scheduler:
        `getattr(diffusers, config["_class_name"]).from_config(config)` then samples as the authors did."""
        config = dict(base) | {"_class_name": self.scheduler, "prediction_type": self.prediction_type}
        if self.timestep_spacing is not None:
            config["timestep_spacing"] = self.timestep_spacing
        return config | dict(self.overrides)

    def pipeline_kwargs(self, *, steps: int | None = None, guidance_scale: float | None = None) -> dict[str, Any]:
        """The arguments for `StableDiffusionXLPipeline.__call__` (explicit timesteps or a step count, guidance,
        eta). `steps` and `guidance_scale` override the defaults; a profile with explicit timesteps cannot run at
        another step count."""
        kwargs: dict[str, Any] = {}
        if self.timesteps is not None:
            if steps is not None and steps != len(self.timesteps):
                raise UserError(f"{self.family} {self.name} samples exactly the timesteps {list(self.timesteps)}; "
                                f"it cannot run {steps} steps: use --steps {len(self.timesteps)}")
            kwargs["timesteps"] = list(self.timesteps)
        else:
            kwargs["num_inference_steps"] = self.steps if steps is None else steps
        kwargs["guidance_scale"] = self.guidance_scale if guidance_scale is None else guidance_scale
        if self.eta is not None:
            kwargs["eta"] = self.eta
        return kwargs

    def comfyui(self, *, steps: int | None = None, guidance_scale: float | None = None) -> dict[str, Any]:
        """ComfyUI's KSampler inputs for this profile, the ModelSamplingDiscrete sampling the model needs (None:
        ComfyUI's default eps), eta for samplers that take it, and the custom node needed where core ComfyUI
        has none. Diffusers' guidance_scale <= 1 (no CFG) is ComfyUI's cfg 1.0."""
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        if self.timesteps is not None:
            steps = len(self.timesteps)
        c = self.comfyui_sampling
        return {
            "sampler_name": c.sampler,
            "scheduler": c.scheduler,
            "steps": self.steps if steps is None else steps,
            "cfg": guidance if guidance > 1 else 1.0,
            "denoise": 1.0,
            "model_sampling": "x0" if self.prediction_type == "sample" else None,
            "eta": self.eta,
            "custom_node": c.custom_node,
        }

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overrides"] = dict(self.overrides)
        data["comfyui"] = data.pop("comfyui_sampling")
        return data


@dataclass(frozen=True)
class FamilyFile:
    """One published file. `filename` is its path in the repo; `size`/`sha256` are None where no public
    material stated them (then only the hub's LFS listing at the pinned revision can verify the bytes).

    `variant` tells files apart that share steps and kind ("" is the one to pick by default); `name_identifies`
    is False for generic names (diffusers' default LoRA name) that must not identify a file by name alone.
    """

    family: str
    filename: str
    steps: int
    kind: Kind
    variant: str
    profile: SamplingProfile
    size: int | None
    size_confirmed: bool
    sha256: str | None
    name_identifies: bool
    note: str | None

    @property
    def name(self) -> str:
        """The file's own name, without the folder it has in the repo."""
        return PurePosixPath(self.filename).name

    @property
    def sha256_pinned(self) -> bool:
        return self.sha256 is not None

    @property
    def prediction_type(self) -> PredictionType:
        return self.profile.prediction_type

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline arguments for this file at the step count it was distilled for."""
        return self.profile.pipeline_kwargs(steps=self.steps)

    def comfyui(self) -> dict[str, Any]:
        return self.profile.comfyui(steps=self.steps)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "profile"}
        return data | {"name": self.name, "profile": self.profile.name, "sha256_pinned": self.sha256_pinned}


@dataclass(frozen=True)
class Family:
    name: str  # the TOML file's stem
    title: str
    aliases: tuple[str, ...]
    repo_id: str
    revision: str
    revision_pinned: bool  # False: `revision` is a branch, and hashes can only come from the hub's listing
    license: str  # a key of LICENSES
    base_model: str
    source: str
    hashes_source: str
    profiles: tuple[SamplingProfile, ...]
    files: tuple[FamilyFile, ...]

    @property
    def license_info(self) -> License:
        return LICENSES[self.license]

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({f.steps for f in self.files}))

    def profile(self, name: str) -> SamplingProfile:
        found = next((p for p in self.profiles if p.name == name), None)
        if found is None:
            raise UserError(f"{self.title} has no sampling profile {name!r}; it has "
                            f"{', '.join(p.name for p in self.profiles)}")
        return found

    def select(self, steps: Iterable[int] = (), kinds: Iterable[str] = ()) -> list[FamilyFile]:
        """The files with any of `steps` and any of `kinds` (empty: all), in the data's order."""
        steps, kinds = set(steps), set(kinds)
        for kind in kinds:
            _check_kind(kind)
        return [f for f in self.files if (not steps or f.steps in steps) and (not kinds or f.kind in kinds)]

    def find(self, steps: int, kind: str, variant: str | None = None) -> FamilyFile:
        """The file for `steps` and `kind`: the only one, or the default variant, or the named `variant`
        ("default" names the default one); the error says what exists instead."""
        _check_kind(kind)
        variant = "" if variant == "default" else variant
        matches = [f for f in self.files if f.steps == steps and f.kind == kind]
        if variant is not None:
            chosen = [f for f in matches if f.variant == variant]
        else:
            chosen = matches if len(matches) == 1 else [f for f in matches if f.variant == ""]
        if len(chosen) == 1:
            return chosen[0]
        if matches:
            listed = ", ".join(f"{f.variant or 'default'} ({f.name})" for f in matches)
            asked = f"no variant {(variant or 'default')!r} among" if variant is not None else "several"
            raise UserError(f"{self.title} has {asked} {steps}-step {kind} files: {listed}; "
                            "choose one with --variant")
        offered = ", ".join(f"{n}-step {k}" for n, k in dict.fromkeys((f.steps, f.kind) for f in self.files))
        raise UserError(f"{self.title} has no {steps}-step {kind} file; it has {offered}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "aliases": list(self.aliases), "repo_id": self.repo_id,
            "revision": self.revision, "revision_pinned": self.revision_pinned, "license": self.license,
            "license_title": self.license_info.title, "commercial_use": self.license_info.commercial,
            "base_model": self.base_model, "source": self.source, "hashes_source": self.hashes_source,
            "profiles": [p.as_dict() for p in self.profiles], "files": [f.as_dict() for f in self.files],
        }


# ---------------------------------------------------------------------------------------------------- lookups

def families() -> tuple[Family, ...]:
    """Every family shipped with lightning-tools, read once."""
    return _packaged()


def family(name: str) -> Family:
    """The family called `name` (or one of its aliases; case, '-' and '_' do not matter)."""
    wanted = _normal(name)
    for fam in families():
        if wanted in (_normal(fam.name), *map(_normal, fam.aliases)):
            return fam
    names = {_normal(n): fam.name for fam in families() for n in (fam.name, *fam.aliases)}
    close = difflib.get_close_matches(wanted, names, n=1)
    hint = f"did you mean {names[close[0]]}? " if close else ""
    raise UserError(f"unknown family {name!r}; {hint}known families: {', '.join(f.name for f in families())}")


def files_named(name: str) -> tuple[FamilyFile, ...]:
    """Every catalogued file whose own name is the last part of `name` (a path or a bare file name)."""
    base = Path(name).name
    return tuple(f for fam in families() for f in fam.files if f.name == base)


def by_filename(name: str) -> FamilyFile | None:
    """The catalogued file the name `name` identifies: unique across families and not a generic name."""
    found = [f for f in files_named(name) if f.name_identifies]
    return found[0] if len(found) == 1 else None


def by_sha256(hexdigest: str) -> FamilyFile | None:
    """The catalogued file with this sha256 (any case, with or without a 0x prefix)."""
    hexdigest = hexdigest.lower().removeprefix("0x")
    return next((f for fam in families() for f in fam.files if f.sha256 == hexdigest), None)


def _normal(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------------- loading

@functools.cache
def _packaged() -> tuple[Family, ...]:
    return load(Path(__file__).parent)


def load(folder: Path) -> tuple[Family, ...]:
    """Read and validate every `*.toml` family in `folder` (uncached; `families()` is the cached packaged set)."""
    loaded = tuple(_family(path) for path in sorted(Path(folder).glob("*.toml")))
    seen: dict[str, str] = {}
    for fam in loaded:
        for name in (fam.name, *fam.aliases):
            if _normal(name) in seen:
                raise CorruptFile(f"family name or alias {name!r} is also used by {seen[_normal(name)]}; "
                                  "the package data is damaged: reinstall lightning-tools", path=folder)
            seen[_normal(name)] = fam.name
    return loaded


_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class _Table:
    """One TOML table read field by field: types checked, unknown keys refused (a typo must not be ignored)."""

    def __init__(self, data: Any, where: str, path: Path):
        self.path, self.where = path, where
        if not isinstance(data, dict):
            self.fail("must be a table")
        self.data = data
        self.used: set[str] = set()

    def fail(self, message: str):
        raise CorruptFile(f"{self.where}: {message}; the package data is damaged: reinstall lightning-tools",
                          path=self.path)

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                typo = difflib.get_close_matches(key, [k for k in self.data if k not in self.used], n=1)
                self.fail(f"missing {key!r}" + (f" (is {typo[0]!r} a typo?)" if typo else ""))
            return default
        value = self.data[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            self.fail(f"{key!r} has the wrong type ({type(value).__name__})")
        return value

    def number(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, (int, float), default)
        return float(value) if isinstance(value, (int, float)) else value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is not default and value not in choices:
            self.fail(f"{key!r} is {value!r}, not one of {', '.join(choices)}")
        return value

    def pair(self, key: str, kind: type) -> tuple:
        value = self.get(key, list)
        if len(value) != 2 or not all(isinstance(v, (int, float) if kind is float else kind) for v in value):
            self.fail(f"{key!r} must be two {kind.__name__}s")
        low, high = (kind(v) for v in value)
        if low > high:
            self.fail(f"{key!r} is [{low}, {high}]: the first must not exceed the second")
        return low, high

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            self.fail(f"unknown key {unknown[0]!r}")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _family(path: Path) -> Family:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CorruptFile(f"not valid TOML ({e}); the package data is damaged: reinstall lightning-tools",
                          path=path) from None
    name = path.stem
    t = _Table(data, name, path)
    revision = t.get("revision", str)
    revision_pinned = t.get("revision_pinned", bool)
    if revision_pinned and not _COMMIT.fullmatch(revision):
        t.fail(f"revision {revision!r} is pinned but not a 40-hex commit")
    license_id = t.choice("license", tuple(LICENSES))
    profile_tables = t.get("profiles", dict)
    if not profile_tables:
        t.fail("has no profiles")
    profiles = {key: _profile(name, key, value, path) for key, value in profile_tables.items()}
    files = tuple(_file(name, i, value, profiles, path) for i, value in enumerate(t.get("files", list)))
    if not files:
        t.fail("has no files")
    aliases = t.get("aliases", list, [])
    if not all(isinstance(a, str) for a in aliases):
        t.fail("'aliases' must be strings")
    result = Family(
        name=name, title=t.get("title", str), aliases=tuple(aliases),
        repo_id=t.get("repo_id", str), revision=revision, revision_pinned=revision_pinned, license=license_id,
        base_model=t.get("base_model", str), source=t.get("source", str), hashes_source=t.get("hashes_source", str),
        profiles=tuple(profiles.values()), files=files)
    t.done()
    unused = sorted(set(profiles) - {f.profile.name for f in files})
    if unused:
        t.fail(f"profile {unused[0]!r} is used by no file")
    duplicates = sorted({f.filename for f in files if [g.filename for g in files].count(f.filename) > 1})
    if duplicates:
        t.fail(f"lists {duplicates[0]!r} twice")
    return result


def _profile(family: str, name: str, data: Any, path: Path) -> SamplingProfile:
    t = _Table(data, f"{family} profile {name!r}", path)
    timesteps = t.get("timesteps", list, None)
    if timesteps is not None and (not timesteps or not all(isinstance(s, int) and 0 <= s < 1000 for s in timesteps)
                                  or timesteps != sorted(timesteps, reverse=True)):
        t.fail("'timesteps' must be descending integers in [0, 1000)")
    spacing = t.choice("timestep_spacing", get_args(Spacing), None)
    if timesteps is not None and spacing is not None:
        t.fail("has both 'timesteps' and 'timestep_spacing'; explicit timesteps make the spacing meaningless")
    steps, steps_range = t.get("steps", int), t.pair("steps_range", int)
    guidance, guidance_range = t.number("guidance_scale"), t.pair("guidance_range", float)
    if not steps_range[0] <= steps <= steps_range[1] or steps_range[0] < 1:
        t.fail(f"default steps {steps} outside steps_range {list(steps_range)}")
    if timesteps is not None and steps_range != (len(timesteps), len(timesteps)):
        t.fail(f"{len(timesteps)} timesteps but steps_range {list(steps_range)}")
    if not guidance_range[0] <= guidance <= guidance_range[1]:
        t.fail(f"default guidance_scale {guidance} outside guidance_range {list(guidance_range)}")
    width, height = t.pair("resolution", int)
    overrides = t.get("overrides", dict, {})
    if any(k in overrides for k in ("_class_name", "timestep_spacing", "prediction_type")):
        t.fail("'overrides' repeats a setting that has its own key")
    profile = SamplingProfile(
        family=family, name=name, scheduler=t.choice("scheduler", SCHEDULERS), overrides=tuple(overrides.items()),
        timestep_spacing=spacing, timesteps=tuple(timesteps) if timesteps is not None else None,
        prediction_type=t.choice("prediction_type", get_args(PredictionType)), steps=steps, steps_range=steps_range,
        guidance_scale=guidance, guidance_range=guidance_range, eta=t.number("eta", None),
        resolution=(width, height), lora_strength=t.number("lora_strength", None),
        comfyui_sampling=_comfyui(f"{family} profile {name!r} comfyui", t.get("comfyui", dict), path),
        source=t.get("source", str), note=t.get("note", str, None))
    t.done()
    return profile


def _comfyui(where: str, data: Any, path: Path) -> ComfyUISampling:
    t = _Table(data, where, path)
    comfy = ComfyUISampling(sampler=t.get("sampler", str, None), scheduler=t.get("scheduler", str, None),
                            custom_node=t.get("custom_node", str, None), note=t.get("note", str, None),
                            source=t.get("source", str))
    t.done()
    if comfy.custom_node is None and (comfy.sampler is None or comfy.scheduler is None):
        t.fail("needs a sampler and a scheduler, or the custom node that provides them")
    return comfy


def _file(family: str, index: int, data: Any, profiles: dict[str, SamplingProfile], path: Path) -> FamilyFile:
    t = _Table(data, f"{family} file #{index + 1}", path)
    profile_name = t.get("profile", str)
    if profile_name not in profiles:
        t.fail(f"names profile {profile_name!r}, which {family} does not define")
    file = FamilyFile(
        family=family, filename=t.get("filename", str), steps=t.get("steps", int),
        kind=t.choice("kind", KINDS), variant=t.get("variant", str, ""), profile=profiles[profile_name],
        size=t.get("size", int, None), size_confirmed=t.get("size_confirmed", bool, True),
        sha256=t.get("sha256", str, None), name_identifies=t.get("name_identifies", bool, True),
        note=t.get("note", str, None))
    t.done()
    if file.sha256 is not None and not _SHA256.fullmatch(file.sha256):
        t.fail(f"sha256 {file.sha256!r} is not 64 lowercase hex digits")
    if file.size is None and not file.size_confirmed:
        t.fail("'size_confirmed' without a size")
    low, high = file.profile.steps_range
    if not low <= file.steps <= high:
        t.fail(f"{file.steps} steps is outside its profile's steps_range {[low, high]}")
    if file.kind == "lora" and file.profile.lora_strength is None:
        t.fail(f"is a LoRA but profile {profile_name!r} has no lora_strength")
    return file
