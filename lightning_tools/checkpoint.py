"""Any SDXL checkpoint seen lazily in diffusers naming, and written tensor by tensor in any layout.

A `Checkpoint` is the hub of every conversion: a diffusers folder, a ComfyUI/A1111 single file or a UNet-only
file (either naming) opens into the same form, component-relative diffusers keys mapped to `LazyTensor`s, and
writes out as a diffusers folder, a single file or a UNet-only file. Nothing is loaded until a writer asks for
a tensor, and renamed tensors are byte-copied, so peak memory is a few tensors whatever the model size.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lightning_tools import dtypes, provenance, support
from lightning_tools.errors import UserError
from lightning_tools.sdxl import keys as K
from lightning_tools.sdxl.detect import check_component, detect
from lightning_tools.sdxl.vocabulary import COMPONENT_NAMES, COMPONENTS, component_titles
from lightning_tools.stream import LazyTensor, lazy_tensors, write_file
from lightning_tools.outputs import output
from lightning_tools.tensors import TensorSource


@dataclass
class Checkpoint:
    """An SDXL checkpoint in diffusers naming: `components[c][key]` with component-relative keys
    ("conv_in.weight"; text encoders with the `text_model.` prefix; OpenCLIP's `logit_scale` when the input
    had one). `configs` has a diffusers config for every component; `own_configs` names those that came from
    the input itself or from --config (the others are the bundled SDXL-base defaults). `support_dir` is a
    pipeline folder whose model_index, scheduler and tokenizers can be copied."""

    path: Path
    layout: str
    components: dict[str, dict[str, LazyTensor]]
    configs: dict[str, dict]
    metadata: dict[str, str]
    unknown_keys: list[str]
    own_configs: tuple[str, ...] = ()
    support_dir: Path | None = None

    @property
    def missing(self) -> list[str]:
        return [c for c in COMPONENT_NAMES if c not in self.components]


def open_checkpoint(path: Path | str, config_dir: Path | str | None = None, strict: bool = False) -> Checkpoint:
    """Open a diffusers pipeline folder, a single file, or a UNet-only file/folder, reading headers only.

    Configs come from the folder, else from `config_dir` (a pipeline folder), else the bundled SDXL base.
    Keys no map places are listed in `unknown_keys` and left out; with `strict` they are an error.
    """
    path = Path(path)
    config_dir = support.check_config_dir(Path(config_dir)) if config_dir is not None else None
    found = detect(path)
    if found.layout == "lora":
        raise UserError("is a LoRA, not a model; convert it with --to kohya or --to peft, or merge it", path=path)
    if found.layout == "unknown":
        raise UserError("no SDXL weights recognised: not a diffusers folder, a single-file checkpoint or a UNet",
                        path=path)
    if found.architecture != "sdxl-base":
        raise UserError(f"looks like {found.description} ({found.layout}); only SDXL base models (SDXL-Lightning "
                        "included) are supported", path=path)
    own = {c: path / c / "config.json" for c in COMPONENT_NAMES} if found.layout == "diffusers" else \
        {"unet": path / "config.json"} if path.is_dir() else {}
    configs, own_configs = support.component_configs(own=own, config_dir=config_dir)

    if found.layout == "diffusers":
        components, unknown = {}, []
        for c, source in found.sources.items():
            tensors, missed = _diffusers_component(c, source, configs[c])
            components[c] = tensors
            unknown += [f"{c}/{k}" for k in missed]
        metadata = dict(found.sources["unet"].metadata) if "unet" in found.sources else {}
    else:
        source = found.source
        metadata = dict(source.metadata)
        lazy = lazy_tensors(source)
        if found.layout == "single-file":
            components, unknown = K.split_single_file(lazy, configs)
        elif found.layout == "unet-single-file":
            prefix = found.unet_prefix
            bare = {k[len(prefix):]: t for k, t in lazy.items() if k.startswith(prefix)}
            unet, missed = K.unet_from_single(bare, configs["unet"])
            components = {"unet": unet}
            unknown = [prefix + k for k in missed] + [k for k in lazy if not k.startswith(prefix)]
        else:
            unet, unknown = _diffusers_component("unet", source, configs["unet"])
            components = {"unet": unet}
    if unknown and strict:
        raise UserError(f"{len(unknown)} tensors fit no SDXL key map ({', '.join(unknown[:3])}"
                        f"{', ...' if len(unknown) > 3 else ''}); without --strict they are left out and reported",
                        path=path)
    support_dir = path if found.layout == "diffusers" else config_dir
    return Checkpoint(path, found.layout, components, configs, metadata, unknown, own_configs, support_dir)


def _diffusers_component(component: str, source: TensorSource,
                         config: Mapping) -> tuple[dict[str, LazyTensor], list[str]]:
    """A component's tensors in normal form, minus (and listing) keys the single-file maps cannot place."""
    tensors: dict[str, LazyTensor] = {}
    for key in source:
        name = key
        if component.startswith("text_encoder"):
            name = K.hf_clip_key(key)
            if name == K.POSITION_IDS:
                continue  # a buffer transformers rebuilds; never carried as a weight
        elif component == "vae":
            name = K.vae_legacy_key(key)
        tensors[name] = LazyTensor.of(source, key)
    _, missed = K.TO_SINGLE[component](tensors, config)
    for key in missed:
        del tensors[key]
    return tensors, missed


def with_base(ckpt: Checkpoint, base: Checkpoint) -> Checkpoint:
    """`ckpt` completed with the components it lacks (VAE, text encoders) taken from `base`.

    Configs the input did not bring itself are taken from the base too, so a UNet-only file written next to a
    base's parts gets the base's UNet config unless --config said otherwise.
    """
    components = dict(ckpt.components)
    configs = dict(ckpt.configs)
    own = list(ckpt.own_configs)
    for c in COMPONENT_NAMES:
        if c not in components and c in base.components:
            components[c] = base.components[c]
        if c not in own and c in base.own_configs:
            configs[c] = base.configs[c]
            own.append(c)
    unknown = ckpt.unknown_keys + [f"{base.path}: {k}" for k in base.unknown_keys
                                   if k.split("/")[0] in set(components) - set(ckpt.components)]
    return dataclasses.replace(ckpt, components=components, configs=configs, own_configs=tuple(own),
                               unknown_keys=unknown, support_dir=ckpt.support_dir or base.support_dir)


# --- writing ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Written:
    """What a writer produced: the output, its layout, and the data sha256 of each weights file (by component
    for a folder, under "" for a single file)."""

    output: Path
    layout: str
    tensors: int
    bytes: int
    data_sha256: dict[str, str]
    support_files_from: tuple[str, ...] = ()


def write_checkpoint(ckpt: Checkpoint, out: Path | str, to: str, *, dtype: str | None = None,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                     config_dir: Path | str | None = None) -> Written:
    """Stream `ckpt` into `out` as a diffusers folder, a ComfyUI single file or a ComfyUI UNet file (`to` is a
    key of `vocabulary.MODEL_TARGETS`).

    `dtype` (a safetensors code, see `dtypes.parse`) casts floating tensors only. `metadata` goes into the single
    file, or the UNet file of a diffusers folder; ModelSpec's data hash in it is filled in as it is written. A
    diffusers output ending in `.safetensors` from a UNet-only checkpoint is one file with diffusers UNet names
    (the layout of the official `sdxl_lightning_Nstep_unet.safetensors`).
    """
    out = Path(out)
    metadata = dict(metadata or {})
    if to == "comfyui":
        _require(ckpt, COMPONENT_NAMES, "a ComfyUI checkpoint")
        tensors, _ = K.to_single_file(ckpt.components, ckpt.configs)
        return _write_file(out, tensors, metadata, dtype, overwrite, "single-file")
    _require(ckpt, ("unet",), "this output")
    if to == "comfyui-unet":
        unet, _ = K.unet_to_single(ckpt.components["unet"], ckpt.configs["unet"])
        return _write_file(out, {K.UNET_PREFIX + k: t for k, t in unet.items()}, metadata, dtype, overwrite,
                           "unet-single-file")
    if out.suffix == ".safetensors":
        if len(ckpt.components) > 1:
            raise UserError("a diffusers pipeline is a folder; give an output path without .safetensors", path=out)
        return _write_file(out, ckpt.components["unet"], metadata, dtype, overwrite, "unet-diffusers")
    if ckpt.missing:
        _require(ckpt, COMPONENT_NAMES, "a diffusers pipeline (or give an OUT ending in .safetensors for a "
                                        "diffusers-named UNet file)")
    return _write_folder(ckpt, out, dtype, metadata, overwrite, Path(config_dir) if config_dir else None)


def _require(ckpt: Checkpoint, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in ckpt.components]
    if missing:
        raise UserError(f"has no {component_titles(missing)}, which {what} needs; pass --base BASE (any SDXL base, "
                        "diffusers folder or single file) to take the missing parts from it", path=ckpt.path)


def _write_file(out: Path, tensors: Mapping[str, LazyTensor], metadata: dict[str, str], dtype: str | None,
                overwrite: bool, layout: str) -> Written:
    sha = write_file(out, tensors, metadata=provenance.with_data_hash(metadata), dtype=dtype, overwrite=overwrite)
    return Written(out, layout, len(tensors), out.stat().st_size, {"": sha})


def _write_folder(ckpt: Checkpoint, out: Path, dtype: str | None, metadata: dict[str, str], overwrite: bool,
                  config_dir: Path | None) -> Written:
    prepared = {}
    for c in COMPONENT_NAMES:
        problems = check_component(ckpt.components[c], c, ckpt.configs[c])
        if problems:
            hint = "pass --config DIR with this model's diffusers configs" if c not in ckpt.own_configs \
                else "the weights and the config disagree"
            raise UserError(f"the {COMPONENTS[c].title} does not match its config ({problems[0]}); {hint}",
                            path=ckpt.path)
        prepared[c] = installed_names(c, ckpt.components[c], ckpt.configs[c])
    files = support.support_files(config_dir=config_dir, source_dir=ckpt.support_dir, needed_by=ckpt.path)
    shas = {}
    with output(out, overwrite=overwrite) as tmp:
        tmp.mkdir()
        for relative, source in files.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / relative)
        _write_lightning_scheduler(tmp, metadata)
        for c in COMPONENT_NAMES:
            folder = tmp / c
            folder.mkdir(exist_ok=True)
            file_meta = {"format": "pt", **(metadata if c == "unet" else {})}
            shas[c] = write_file(folder / COMPONENTS[c].weights_file, prepared[c],
                                 metadata=provenance.with_data_hash(file_meta), dtype=dtype)
            config = _config_for_output(ckpt.configs[c], prepared[c], dtype)
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    roots = tuple(sorted({str(p)[: -len(r)].rstrip("/") for r, p in files.items()}))
    return Written(out, "diffusers", sum(len(t) for t in prepared.values()), size, shas, roots)


def _write_lightning_scheduler(folder: Path, metadata: Mapping[str, str]) -> None:
    """A few-step model's folder gets its family's scheduler (the class in model_index.json, which is what
    `from_pretrained` instantiates, and the config), so a plain `from_pretrained` samples it correctly; other
    models keep the copied ones. Explicit timesteps (DMD2, Hyper-SD's 1-step UNet) still go to the pipeline call."""
    settings = provenance.settings_from_metadata(metadata)
    path = folder / "scheduler" / "scheduler_config.json"
    if settings is None or not path.is_file():
        return
    config = settings.scheduler_config(json.loads(path.read_text()))
    path.write_text(json.dumps(config, indent=2) + "\n")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if isinstance(index.get("scheduler"), list):
        index["scheduler"] = [index["scheduler"][0], config["_class_name"]]
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def installed_names(component: str, tensors: Mapping[str, LazyTensor], config: Mapping) -> dict[str, LazyTensor]:
    """Text encoder keys as the installed transformers saves and loads them (with or without `text_model.`);
    other components are already in diffusers naming."""
    if not component.startswith("text_encoder"):
        return dict(tensors)
    prefixed, has_position_ids = transformers_layout(component)
    out = {}
    for key, t in tensors.items():
        if key == K.LOGIT_SCALE:
            continue  # OpenCLIP-only; CLIPTextModelWithProjection has no such weight
        out[key if prefixed or not key.startswith("text_model.") else key[len("text_model."):]] = t
    if has_position_ids:
        name = K.POSITION_IDS if prefixed else K.POSITION_IDS[len("text_model."):]
        out[name] = K.position_ids(int(config.get("max_position_embeddings", 77)))
    return out


def transformers_layout(component: str) -> tuple[bool, bool]:
    """(keys carry `text_model.`, position_ids are saved) in what the installed transformers saves and loads.

    Read from its version, not by importing it (that alone can take longer than a conversion):
    `CLIPTextModel` lost the `text_model.` level in 5.6, `CLIPTextModelWithProjection` keeps it, and
    position_ids have been a non-saved buffer since 4.31. tests/test_convert.py checks this against the models.
    """
    from importlib.metadata import version

    installed = tuple(int(part) for part in re.findall(r"\d+", version("transformers"))[:2])
    return component == "text_encoder_2" or installed < (5, 6), installed < (4, 31)


def _config_for_output(config: Mapping, tensors: Mapping[str, LazyTensor], dtype: str | None) -> dict:
    """The component config as written; a transformers config's dtype follows the written weights."""
    config = dict(config)
    floats = {dtypes.target(t.dtype, dtype) for t in tensors.values() if t.dtype in dtypes.FLOAT_CODES}
    if len(floats) == 1:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtypes.TORCH_NAME[floats.pop()]
                break
    return config
