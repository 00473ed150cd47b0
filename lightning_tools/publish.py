"""Publish a checkpoint to the hub: verify it, write its model card, upload everything in one commit, check it.

The card is built from what the files say about themselves (our provenance metadata: sources, hashes,
strengths, the few-step family's sampling profile), so it states what was merged, how to sample it in diffusers
and ComfyUI, and under which licence, without the user writing anything. The licence is the family's; a model
made from a non-commercial family is not published under another licence unless the publisher says so.
Planning reads only local files; the network is touched by `upload` alone, which is why `--dry-run` can show the
whole commit offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lightning_tools import families as fams
from lightning_tools import hub, progress
from lightning_tools import provenance as meta
from lightning_tools.errors import UserError
from lightning_tools.report import Report
from lightning_tools.sampling import DEFAULT_FAMILY, Sampling, for_family
from lightning_tools.sdxl import SDXL_BASE_REPO
from lightning_tools.sdxl.detect import detect
from lightning_tools.sdxl.vocabulary import LAYOUTS
from lightning_tools.outputs import check_output, output
from lightning_tools.tensors import hash_file
from lightning_tools.verify import verify_paths

# Front matter for licences the hub has no identifier for: `other` with a name, as stabilityai/sdxl-turbo's card
# does; a repo that declares none is the hub's `unknown`.
_HUB_OTHER = {"sai-nc-community"}
_HUB_UNDECLARED = {"unspecified": "unknown"}
CONTACT_SHEET = "contact_sheet.png"
_SHEET_IN_REPO = f"validation/{CONTACT_SHEET}"
_SKIPPED = {"README.md", hub.MANIFEST_NAME}  # replaced by the generated card / local bookkeeping


@dataclass(frozen=True)
class Upload:
    """One file of the commit; `local` is None for generated content (the card)."""

    path_in_repo: str
    local: Path | None
    size: int
    sha256: str


@dataclass
class PublishPlan(Report):
    """The commit publish makes (or, with --dry-run, would make), and after an upload where it landed."""

    src: Path
    repo_id: str
    revision: str
    private: bool
    layout: str
    settings: Sampling
    settings_source: str
    licence: str
    card_text: str = field(repr=False)
    uploads: list[Upload]
    notes: list[str] = field(default_factory=list)
    card: Path | None = None  # where a dry run wrote the card
    commit: str | None = None
    url: str | None = None

    def to_json(self) -> dict:
        return super().to_json() | {"dry_run": self.commit is None}

    def describe(self) -> str:
        listing = [f"  {u.path_in_repo:<40} {u.size:>14,} B  sha256 {u.sha256[:12]}"
                   + ("  (generated model card)" if u.local is None else f"  <- {u.local}") for u in self.uploads]
        notes = [f"note: {n}" for n in self.notes]
        if self.commit is None:
            return "\n".join([f"dry run, nothing uploaded: would commit to {self.repo_id}@{self.revision}"
                              f"{' (private)' if self.private else ''}, creating the repo/branch if missing:",
                              *listing, *notes, f"model card written to {self.card}"])
        return "\n".join([f"published {len(self.uploads)} files to {self.repo_id}@{self.revision} (commit "
                          f"{self.commit[:12]}):", *listing, *notes,
                          f"hub lists the same sizes and sha256: {self.url}"])


# --- planning (local files only) -----------------------------------------------------------------------------

def plan_publish(src: Path | str, repo_id: str, *, revision: str = "main", private: bool = False,
                 validation: Path | str | None = None, steps: int | None = None, family: str | None = None,
                 licence: str | None = None, base_models: tuple[str, ...] = (),
                 config_dir: Path | str | None = None) -> PublishPlan:
    """Verify `src` (against `config_dir`'s configs for a model of another width), work out its sampling profile
    (`family` and `steps` given by the publisher win), licence and provenance, and build the card and the file
    list. A model made from a non-commercial family is refused under another licence unless `licence` is given."""
    src = Path(src)
    reports = verify_paths([src], config_dir=config_dir).files
    bad = [r for r in reports if not r.ok]
    if bad:
        raise UserError(f"{src}: verification failed, nothing uploaded: "
                        + "; ".join(f"{r.component or Path(r.path).name}: {r.problems[0]}" for r in bad)
                        + f"; run `lightning-tools verify {src}` for details")
    found = detect(src)
    if found.layout == "unknown" or (found.layout != "lora" and found.architecture != "sdxl-base"):
        raise UserError(f"{src}: {found.description} ({found.layout}); publish handles SDXL checkpoints, UNets "
                        "and LoRAs")
    files = _files(src)
    known = {Path(r.files[0]): r.sha256 for r in reports if r.sha256 and len(r.files) == 1}  # hashed already
    uploads = [Upload(name, path, path.stat().st_size, known.get(path) or hash_file(path)) for name, path in files]

    metadata = dict((found.sources["unet"] if found.layout == "diffusers" else found.source).metadata)
    notes: list[str] = []
    settings, how = _settings(src, found.layout, metadata, uploads[0].sha256 if src.is_file() else None, steps,
                              family, notes)
    chosen_licence = _licence(src, settings, metadata, licence, notes)
    sheet, summary = _validation(Path(validation), metadata) if validation is not None else (None, None)
    if sheet is not None:
        uploads.append(Upload(_SHEET_IN_REPO, sheet, sheet.stat().st_size, hash_file(sheet)))
    if src.is_dir() and (src / "README.md").is_file():
        notes.append(f"{src / 'README.md'} is not uploaded: the generated model card replaces it")

    card = render_card(repo_id=repo_id, revision=revision, layout=found.layout, metadata=metadata,
                       settings=settings, settings_source=how, uploads=uploads, base_models=base_models,
                       validation=summary, licence=chosen_licence)
    card_bytes = card.encode()
    uploads.insert(0, Upload("README.md", None, len(card_bytes), hashlib.sha256(card_bytes).hexdigest()))
    return PublishPlan(src, repo_id, revision, private, found.layout, settings, how, chosen_licence, card, uploads,
                       notes)


def _files(src: Path) -> list[tuple[str, Path]]:
    """(path in the repo, local path) for everything to upload, hidden files and our bookkeeping left out."""
    if src.is_file():
        return [(src.name, src)]
    out = []
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) \
                and str(relative) not in _SKIPPED:
            out.append((relative.as_posix(), path))
    return out


def _settings(src: Path, layout: str, metadata: dict[str, str], sha256: str | None, steps: int | None,
              family: str | None, notes: list[str]) -> tuple[Sampling, str]:
    """The model's own sampling profile (metadata, catalogue, name); `family` and `steps` given by the publisher
    win (steps alone keep the model's family: SDXL-Lightning when nothing says which)."""
    found = meta.settings_for(src, metadata, sha256)
    if family is None and steps is None:
        if found is None:
            raise UserError(f"{src}: cannot tell how this model samples (no lightning metadata, not a catalogued "
                            "file, no _Nstep in the name); pass --steps N, and --family NAME if it is not "
                            "SDXL-Lightning")
        return found
    chosen = fams.family(family) if family is not None else found[0].family if found else \
        fams.family(DEFAULT_FAMILY)
    said = " ".join(filter(None, [f"--family {chosen.name}" if family else "", f"--steps {steps}" if steps else ""]))
    if steps is None and found and found[0].profile.family == chosen.name:
        return found  # --family naming the model's own family changes nothing
    kind = "lora" if layout == "lora" else "unet" if layout.startswith("unet") else "model"
    settings = for_family(chosen, kind=kind, steps=steps)
    ours, why = found or (None, None)
    if ours and (ours.profile.family, ours.profile.name, ours.steps) != \
            (settings.profile.family, settings.profile.name, settings.steps):
        notes.append(f"{said} overrides {ours.family.title} {ours.profile.name} at {ours.steps} steps from the {why}")
    return settings, said


def _licence(src: Path, settings: Sampling, metadata: dict[str, str], licence: str | None, notes: list[str]) -> str:
    """The card's licence: `licence` when the publisher gives one, else the licence of the family the model
    samples as. Refused when a catalogued input (a LoRA merged in, a base) is non-commercial under another."""
    family = settings.family
    inputs = {family.name: family}
    for source in meta.read_sources(metadata):
        known = fams.by_sha256(source.get("sha256") or "") if source.get("sha256_of") != "data" else None
        known = known or fams.by_filename(str(source.get("file", "")))
        if known is not None:
            inputs.setdefault(known.family, fams.family(known.family))
    restricted = [fam for fam in inputs.values() if fam.license_info.commercial is False]
    if licence is not None:
        notes += [f"--licence {licence}: made from {fam.title}, whose weights are under {fam.license} "
                  f"({fam.license_info.title}, non-commercial); be sure you may publish it under {licence}"
                  for fam in restricted if fam.license != licence]
        return licence
    other = [fam for fam in restricted if fam.license != family.license]
    if other:
        raise UserError(f"{src}: made from {other[0].title}, whose weights are non-commercial ({other[0].license}: "
                        f"{other[0].license_info.title}), but would be published under {family.license}, the "
                        f"licence of {family.title} whose profile it samples with; pass --licence "
                        f"{other[0].license} (or a licence you have the right to use)")
    if family.license_info.commercial is None:
        notes.append(f"{family.title}'s weights declare no licence: the card says license: "
                     f"{_HUB_UNDECLARED.get(family.license, family.license)}; pass --licence if you know it")
    return family.license


@dataclass(frozen=True)
class ValidationSummary:
    prompts: list[str]
    seeds: list[int]
    passed: bool | None
    device: str | None
    steps: int | None


def _validation(folder: Path, metadata: dict[str, str]) -> tuple[Path, ValidationSummary]:
    """The contact sheet of a `lightning-tools render` output folder, and what its report.json says."""
    sheet = folder / CONTACT_SHEET
    if not sheet.is_file():
        raise UserError(f"{folder}: no {CONTACT_SHEET}; pass the output folder of `lightning-tools render`")
    report_path = folder / "report.json"
    if not report_path.is_file():
        return sheet, ValidationSummary([], [], None, None, None)
    try:
        report = json.loads(report_path.read_text())
        images = report.get("images", [])
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{report_path}: not a render report (JSON); render again or leave out --validation") from None
    if report.get("passed") is False:
        raise UserError(f"{folder}: the validation render failed its checks (see {report_path}); fix the model or "
                        "publish without --validation")
    rendered = (report.get("model") or {}).get("data_sha256")
    ours = metadata.get(meta.HASH_KEY)
    if rendered and ours and rendered.lower() != ours.lower():
        raise UserError(f"{folder}: these renders are of another model ({meta.HASH_KEY} {rendered}, this one has "
                        f"{ours}); render this model again")
    return sheet, ValidationSummary(list(dict.fromkeys(i["prompt"] for i in images)),
                                    sorted({i["seed"] for i in images}), report.get("passed"),
                                    report.get("device_name") or report.get("device"), report.get("steps"))


# --- the model card ---------------------------------------------------------------------------------------------

def _yaml(value: str) -> str:
    """A YAML scalar that is always read back as this exact string (JSON strings are valid YAML)."""
    return json.dumps(value)


def render_card(repo_id: str, revision: str, layout: str, metadata: dict[str, str], settings: Sampling,
                settings_source: str, uploads: list[Upload], base_models: tuple[str, ...] = (),
                validation: ValidationSummary | None = None, licence: str | None = None) -> str:
    """README.md with the hub's YAML front matter, provenance, the sampling profile and usage for diffusers and
    ComfyUI. `licence` defaults to the licence of the family the model samples as."""
    family = settings.family
    licence = licence or family.license
    sources = meta.read_sources(metadata)
    merged = any(s.get("role") in ("lora", "add_difference") for s in sources)
    tags = ["text-to-image", "stable-diffusion-xl", family.title.lower(), "lightning-tools"] + \
        (["lora"] if layout == "lora" else [])
    front = ["---", *_licence_front_matter(licence), "base_model:"]
    front += [f"- {_yaml(m)}" for m in dict.fromkeys((family.repo_id, *base_models))]
    if merged:
        front.append("base_model_relation: merge")
    front += ["tags:", *[f"- {t}" for t in tags], "library_name: diffusers", "pipeline_tag: text-to-image", "---"]

    title = metadata.get(meta.TITLE) or repo_id.split("/")[-1]
    weights = [u for u in uploads if u.local is not None and u.path_in_repo != _SHEET_IN_REPO]
    lines = [*front, "", f"# {title}", "", _intro(layout, settings, metadata), ""]
    if sources:
        lines += ["## What it is made of", "", "| role | file | sha256 | sha256 of | strength |", "|---|---|---|---|---|"]
        for s in sources:
            official = fams.by_sha256(s.get("sha256") or "") if s.get("sha256_of") != "data" else None
            repo = fams.family(official.family).repo_id if official else ""
            name = f"`{s.get('file', '?')}`" + (f" (official {repo} file)" if official else "")
            strength = "" if s.get("strength") is None else f"{s['strength']:g}"
            lines.append(f"| {s.get('role', '')} | {name} | `{s.get('sha256') or 'unknown'}` | "
                         f"{_HASH_OF.get(s.get('sha256_of'), 'not recorded')} | {strength} |")
        if meta.BLOCKS in metadata:
            lines += ["", f"Per-block strengths (`--blocks`, kohya's order): `{metadata[meta.BLOCKS]}`"]
        lines += ["", "A file sha256 is what `sha256sum` and the hub show; a tensor-data sha256 is ModelSpec's "
                  "`modelspec.hash_sha256` (the bytes after the header), which `lightning-tools verify` checks."]
        tool = metadata.get(meta.TOOL)
        lines += ["", f"Made with `{tool}`." if tool else "", ""]
    lines += ["## Files", "", "| file | bytes | sha256 of the file |", "|---|---|---|"]
    lines += [f"| `{u.path_in_repo}` | {u.size} | `{u.sha256}` |" for u in weights]
    lines += ["", *_settings_table(layout, settings, settings_source), "", "## Usage with diffusers", "",
              "```python", *_diffusers_snippet(layout, repo_id, revision, weights, settings), "```", "",
              "## Usage with ComfyUI", "", *_comfyui_steps(layout, weights, settings), ""]
    if validation is not None:
        lines += ["## Validation", "", f"![validation contact sheet]({_SHEET_IN_REPO})", ""]
        detail = [f"{settings.steps} steps" if validation.steps is None else f"{validation.steps} steps"]
        if validation.seeds:
            detail.append(f"seeds {', '.join(map(str, validation.seeds))}")
        if validation.device:
            detail.append(f"on {validation.device}")
        lines.append(f"Rendered with `lightning-tools render` ({', '.join(detail)})"
                     + ("; every image passed the automatic checks." if validation.passed else "."))
        if validation.prompts:
            lines += ["", "Prompts:", "", *[f"- {p}" for p in validation.prompts]]
        lines.append("")
    lines += ["## License", "", _licence_text(licence, family), ""]
    return "\n".join(lines)


_HASH_OF = {"file": "the whole file", "data": "tensor data (ModelSpec)"}


def _licence_front_matter(licence: str) -> list[str]:
    known = fams.LICENSES.get(licence)
    if licence in _HUB_OTHER and known is not None:
        return ["license: other", f"license_name: {_yaml(licence)}"] + \
            ([f"license_link: {_yaml(known.url)}"] if known.url else [])
    value = _HUB_UNDECLARED.get(licence, licence)
    return [f"license: {value if re.fullmatch(r'[a-z][a-z0-9.+-]*', value) else _yaml(value)}"]


def _licence_text(licence: str, family: fams.Family) -> str:
    derived = (f"as a derivative of [{family.repo_id}](https://huggingface.co/{family.repo_id}) ({family.title}) "
               f"and [{SDXL_BASE_REPO}](https://huggingface.co/{SDXL_BASE_REPO})")
    known = fams.LICENSES.get(licence)
    if licence == family.license and known is not None and known.url is None:
        return f"The {family.title} weights declare no licence; this model is published {derived}."
    name = f"the {known.title} license ({licence})" if known is not None else f"the {licence} license"
    restriction = " It may not be used commercially." if known is not None and known.commercial is False else ""
    return f"Released under {name}, {derived}.{restriction}"


def _intro(layout: str, settings: Sampling, metadata: dict[str, str]) -> str:
    what = "an SDXL LoRA" if layout == "lora" else f"SDXL, {LAYOUTS[layout]}"
    title, n = settings.family.title, settings.steps
    if settings.fixed_steps:
        text = (f"A {n}-step {title} model ({what}). Sample it with exactly {n} step{'s' if n > 1 else ''}: "
                f"{title} models are distilled for a fixed step count, and other counts give worse images.")
    else:
        low, high = settings.profile.steps_range
        text = (f"A {title} model ({what}), distilled to sample in {low} to {high} steps; {n} is the recommended "
                "count.")
    description = metadata.get(meta.DESCRIPTION)
    return f"{description}\n\n{text}" if description else text


def _scheduler_arguments(s: Sampling) -> list[str]:
    """The keyword arguments that turn a pipeline's scheduler config into the profile's (Python source)."""
    p = s.profile
    changes = {"timestep_spacing": p.timestep_spacing, **dict(p.overrides),
               "prediction_type": p.prediction_type if p.prediction_type != "epsilon" else None}
    return [f"{k}={v!r}".replace("'", '"') for k, v in changes.items() if v is not None]


def _call_arguments(s: Sampling) -> list[str]:
    return [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.pipeline_kwargs().items()]


def _source_link(source: str) -> str:
    """A profile's source ("URL (what it says)") as a Markdown link where it starts with one."""
    url, _, rest = source.partition(" ")
    return f"[{url}]({url}) {rest}".rstrip() if url.startswith("https://") else source


def _settings_table(layout: str, s: Sampling, source: str) -> list[str]:
    comfy, p = s.comfyui(), s.profile
    steps = f"`timesteps={list(p.timesteps)}` (exactly these)" if p.timesteps is not None else \
        f"`num_inference_steps={s.steps}`"
    scheduler = " with " + ", ".join(f"`{a}`" for a in _scheduler_arguments(s)) if _scheduler_arguments(s) else ""
    comfy_sampler = (f"sampler `{comfy['sampler_name']}`, scheduler `{comfy['scheduler']}`" if s.comfyui_core
                     else f"no core equivalent: {comfy['custom_node']}")
    cfg = "(no classifier-free guidance)" if s.guidance_scale <= 1 else \
        "(classifier-free guidance: negative prompts work)"
    rows = ["## Recommended settings", "",
            f"Sampling profile `{p.name}` of {s.family.title} (source: {_source_link(p.source)}).", "",
            "| | diffusers | ComfyUI |", "|---|---|---|",
            f"| steps | {steps} | steps {comfy['steps']} |",
            f"| sampler | `{p.scheduler}`{scheduler} | {comfy_sampler} |",
            f"| guidance | `guidance_scale={s.guidance_scale:g}` {cfg} | CFG {comfy['cfg']:g} |"]
    if p.eta is not None:
        rows.append(f"| eta | `eta={p.eta:g}` | eta {p.eta:g} in the custom sampler |")
    rows.append(f"| prediction | `prediction_type=\"{p.prediction_type}\"` | "
                + (f"ModelSamplingDiscrete node, sampling `{comfy['model_sampling']}` |" if comfy["model_sampling"]
                   else "default (eps) |"))
    if layout == "lora" and p.lora_strength is not None:
        rows.append(f"| LoRA strength | `fuse_lora(lora_scale={p.lora_strength:g})` | LoraLoader strength "
                    f"{p.lora_strength:g} |")
    return rows + ["", f"(settings from the {source})" if not source.startswith("--")
                   else "(settings stated by the publisher)"]


def _diffusers_snippet(layout: str, repo_id: str, revision: str, weights: list[Upload], s: Sampling) -> list[str]:
    rev = "" if revision == "main" else f', revision="{revision}"'
    file = weights[0].path_in_repo if weights else "model.safetensors"
    scheduler = s.profile.scheduler
    head = ["import torch", f"from diffusers import {scheduler}, StableDiffusionXLPipeline"]
    if layout == "diffusers":
        load = [f'pipe = StableDiffusionXLPipeline.from_pretrained("{repo_id}"{rev}, torch_dtype=torch.float16)']
    elif layout == "single-file":
        head.append("from huggingface_hub import hf_hub_download")
        load = [f'path = hf_hub_download("{repo_id}", "{file}"{rev})',
                "pipe = StableDiffusionXLPipeline.from_single_file(path, torch_dtype=torch.float16)"]
    elif layout == "lora":
        strength = s.profile.lora_strength
        load = [f'pipe = StableDiffusionXLPipeline.from_pretrained("{SDXL_BASE_REPO}", torch_dtype=torch.float16,'
                ' variant="fp16")  # or your own SDXL base',
                f'pipe.load_lora_weights("{repo_id}", weight_name="{file}"{rev})',
                "pipe.fuse_lora()" if strength in (None, 1.0) else f"pipe.fuse_lora(lora_scale={strength:g})"]
    else:  # a UNet alone: the rest of the pipeline comes from SDXL base
        head[1] = f"from diffusers import {scheduler}, StableDiffusionXLPipeline, UNet2DConditionModel"
        head.append("from huggingface_hub import hf_hub_download")
        if layout == "unet-single-file":
            unet = [f'unet = UNet2DConditionModel.from_single_file(hf_hub_download("{repo_id}", "{file}"{rev}),',
                    f'                                            config="{SDXL_BASE_REPO}", subfolder="unet",',
                    "                                            torch_dtype=torch.float16)"]
        else:
            head.append("from safetensors.torch import load_file")
            unet = [f'unet = UNet2DConditionModel.from_config("{SDXL_BASE_REPO}", subfolder="unet")',
                    f'unet.load_state_dict(load_file(hf_hub_download("{repo_id}", "{file}"{rev})))',
                    "unet = unet.to(torch.float16)"]
        load = [*unet, f'pipe = StableDiffusionXLPipeline.from_pretrained("{SDXL_BASE_REPO}", unet=unet,',
                '                                                 torch_dtype=torch.float16, variant="fp16")']
    arguments = "".join(f", {a}" for a in _scheduler_arguments(s))
    return [*head, "", *load, 'pipe = pipe.to("cuda")', "",
            f"# {s.family.title} is distilled for this sampler ({s.profile.name}): {s.profile.scheduler}, "
            + (f"timesteps {list(s.profile.timesteps)}" if s.profile.timesteps is not None else f"{s.steps} steps")
            + (", no CFG." if s.guidance_scale <= 1 else f", CFG {s.guidance_scale:g}."),
            f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config{arguments})",
            f'image = pipe("a lighthouse on a cliff at dawn", {", ".join(_call_arguments(s))}).images[0]',
            'image.save("image.png")']


def _comfyui_steps(layout: str, weights: list[Upload], s: Sampling) -> list[str]:
    file = f"`{weights[0].path_in_repo}`" if weights else "the file"
    comfy = s.comfyui()
    strength = s.profile.lora_strength if s.profile.lora_strength is not None else 1.0
    if s.comfyui_core:
        sampler = (f"In the KSampler node set steps {comfy['steps']}, cfg {comfy['cfg']:g}, sampler_name "
                   f"`{comfy['sampler_name']}`, scheduler `{comfy['scheduler']}`.")
    else:
        known = ", ".join(f"{what} `{comfy[key]}`" for key, what in (("sampler_name", "sampler_name"),
                                                                       ("scheduler", "scheduler")) if comfy[key])
        sampler = (f"Core ComfyUI has no equivalent of this sampler: {comfy['custom_node']}. Then set steps "
                   f"{comfy['steps']}, cfg {comfy['cfg']:g}" + (f", {known}" if known else "")
                   + (f", eta {comfy['eta']:g}" if comfy["eta"] is not None else "") + ".")
    place = {
        "single-file": [f"1. Put {file} in `ComfyUI/models/checkpoints` and load it with **Load Checkpoint**."],
        "lora": ["1. Load your SDXL base with **Load Checkpoint**.",
                 f"1. Put {file} in `ComfyUI/models/loras` and add **LoraLoader** (strength {strength:g}) after it."],
        "unet-single-file": [f"1. Put {file} in `ComfyUI/models/diffusion_models` and load it with **Load "
                             "Diffusion Model**; take CLIP and VAE from an SDXL base checkpoint."],
        "unet-diffusers": [f"1. Put {file} in `ComfyUI/models/diffusion_models` and load it with **Load Diffusion "
                           "Model**; take CLIP and VAE from an SDXL base checkpoint."],
        "diffusers": ["1. ComfyUI loads single files: make one with `lightning-tools convert <this folder> --to "
                      "comfyui --out model.safetensors`, then put it in `ComfyUI/models/checkpoints`."],
    }[layout]
    steps = [*place, f"1. {sampler}"]
    if comfy["model_sampling"]:
        steps.append("1. This is an x0 (sample-prediction) model: add **ModelSamplingDiscrete** with sampling "
                     f"`{comfy['model_sampling']}` between the model loader and the KSampler.")
    return steps


# --- writing and uploading -------------------------------------------------------------------------------------

def write_card(plan: PublishPlan, path: Path | str, *, overwrite: bool = False) -> PublishPlan:
    """The dry run: the card written to `path`, nothing uploaded."""
    path = Path(path)
    check_output(path, [plan.src, *(upload.local for upload in plan.uploads)], overwrite=overwrite)
    with output(path, overwrite=overwrite) as tmp:
        tmp.write_text(plan.card_text)
    plan.card = path
    return plan


@contextlib.contextmanager
def _hub_progress_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's upload bars follow our policy (quiet off a terminal); it offers no per-call switch."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not show and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()


def upload(plan: PublishPlan) -> PublishPlan:
    """Create the repo (and branch) if needed, commit every file at once, then check the hub lists our hashes."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    env = hub.HubEnv.current()
    if env.offline:
        raise UserError("offline mode (HF_HUB_OFFLINE) is on: nothing can be uploaded; use --dry-run to preview")
    api = HfApi(endpoint=env.endpoint)
    operations = []
    for u in plan.uploads:
        op = CommitOperationAdd(u.path_in_repo, str(u.local) if u.local else plan.card_text.encode())
        op.upload_info.sha256 = bytes.fromhex(u.sha256)  # hashed while verifying: no second read of big files
        operations.append(op)
    try:
        with _hub_progress_bars(progress.enabled()):
            api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
            if plan.revision != "main":
                api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
            commit = api.create_commit(plan.repo_id, operations, revision=plan.revision,
                                       commit_message=f"Publish {plan.src.name} with lightning-tools")
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError, RuntimeError) as e:
        # huggingface_hub reports protocol trouble as ValueError/RuntimeError (bad YAML, LFS batch errors)
        raise hub.hub_error(e, plan.repo_id, plan.revision, env.endpoint) from e
    listing, unreachable = hub.list_repo(env, plan.repo_id, commit.oid)
    if listing is None:
        raise UserError(f"{plan.repo_id}: uploaded as {commit.oid}, but the check that followed failed "
                        f"({unreachable}); run `lightning-tools fetch` or look at the repo to confirm")
    wrong = [u.path_in_repo for u in plan.uploads
             if listing.files.get(u.path_in_repo, (None, None))[1] != u.size
             or listing.files[u.path_in_repo][0] not in (None, u.sha256)]
    if wrong:
        raise UserError(f"{plan.repo_id}@{commit.oid}: the hub lists other sizes or hashes for "
                        f"{', '.join(wrong)} than were uploaded; upload again")
    plan.commit, plan.url = commit.oid, commit.commit_url
    return plan
