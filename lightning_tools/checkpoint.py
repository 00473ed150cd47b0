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

from lightning_tools.catalog import SDXL_BASE_REPO
from lightning_tools.errors import UserError
from lightning_tools.sdxl import SDXL_BASE_CONFIGS
from lightning_tools.sdxl import keys as K
from lightning_tools.sdxl.detect import COMPONENTS, check_component, detect
from lightning_tools.tensors import DTYPE_NAMES, LazyTensor, TensorSource, atomic_output, write_tensors

TARGETS = ("diffusers", "comfyui", "comfyui-unet")
WEIGHTS_NAME = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP-L text encoder",
         "text_encoder_2": "OpenCLIP-bigG text encoder"}
# The non-weight parts of a pipeline folder, copied as they are: part -> files it must have ("" = the part is
# itself a file).
_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
SUPPORT_PARTS = {"model_index.json": ("",), "scheduler": ("scheduler_config.json",), "tokenizer": _TOKENIZER,
                 "tokenizer_2": _TOKENIZER}
_TORCH_DTYPE_NAME = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


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
        return [c for c in COMPONENTS if c not in self.components]


def open_checkpoint(path: Path | str, config_dir: Path | str | None = None, strict: bool = False) -> Checkpoint:
    """Open a diffusers pipeline folder, a single file, or a UNet-only file/folder, reading headers only.

    Configs come from the folder, else from `config_dir` (a pipeline folder), else the bundled SDXL base.
    Keys no map places are listed in `unknown_keys` and left out; with `strict` they are an error.
    """
    path = Path(path)
    found = detect(path)
    if found.layout == "lora":
        raise UserError(f"{path}: is a LoRA, not a model; convert it with --to kohya or --to peft, or merge it")
    if found.layout == "unknown":
        raise UserError(f"{path}: no SDXL weights recognised: not a diffusers folder, a single-file checkpoint "
                        "or a UNet")
    if found.architecture != "sdxl-base":
        raise UserError(f"{path}: looks like {found.description} ({found.layout}); only SDXL base models "
                        "(SDXL-Lightning included) are supported")
    folder = path if found.layout == "diffusers" else path if path.is_dir() and found.layout == "unet-diffusers" \
        else None
    configs, own = _configs(folder, found.layout, Path(config_dir) if config_dir else None)

    if found.layout == "diffusers":
        components, unknown, metadata = {}, [], {}
        for c in found.components:
            source = TensorSource.open(path / c)
            tensors, missed = _diffusers_component(c, source, configs[c])
            components[c] = tensors
            unknown += [f"{c}/{k}" for k in missed]
            if c == "unet":
                metadata = dict(source.metadata)
    else:
        source = TensorSource.open(path)
        metadata = dict(source.metadata)
        lazy = {k: LazyTensor.of(source, k) for k in source}
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
        raise UserError(f"{path}: {len(unknown)} tensors fit no SDXL key map ({', '.join(unknown[:3])}"
                        f"{', ...' if len(unknown) > 3 else ''}); without --strict they are left out and reported")
    support = path if found.layout == "diffusers" else Path(config_dir) if config_dir else None
    return Checkpoint(path, found.layout, components, configs, metadata, unknown, own, support)


def _configs(folder: Path | None, layout: str, config_dir: Path | None) -> tuple[dict[str, dict], tuple[str, ...]]:
    if config_dir is not None and not (config_dir / "model_index.json").is_file() \
            and not (config_dir / "unet" / "config.json").is_file():
        raise UserError(f"{config_dir}: not a diffusers pipeline folder (no model_index.json or unet/config.json); "
                        "--config takes a folder laid out like stabilityai/stable-diffusion-xl-base-1.0")
    configs: dict[str, dict] = {}
    own: list[str] = []
    for c in COMPONENTS:
        candidates = []
        if folder is not None:
            candidates.append(folder / "config.json" if layout == "unet-diffusers" and c == "unet"
                              else folder / c / "config.json")
        if config_dir is not None:
            candidates.append(config_dir / c / "config.json")
        for candidate in candidates:
            if candidate.is_file():
                configs[c] = _read_json(candidate)
                own.append(c)
                break
        else:
            configs[c] = _read_json(SDXL_BASE_CONFIGS / c / "config.json")
    return configs, tuple(own)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read this config ({e}); fix or replace it") from None


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
    for c in COMPONENTS:
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

def write_checkpoint(ckpt: Checkpoint, out: Path | str, to: str, dtype: str | None = None,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                     config_dir: Path | str | None = None) -> dict:
    """Stream `ckpt` into `out` as a diffusers folder, a ComfyUI single file or a ComfyUI UNet file.

    `dtype` (fp16/bf16/fp32) casts floating tensors only. `metadata` goes into the single file, or the UNet
    file of a diffusers folder. A diffusers output ending in `.safetensors` from a UNet-only checkpoint is one
    file with diffusers UNet names (the layout of the official `sdxl_lightning_Nstep_unet.safetensors`).
    Returns what was written.
    """
    out = Path(out)
    if to not in TARGETS:
        raise UserError(f"unknown output format {to!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    metadata = dict(metadata or {})
    if to == "comfyui":
        _require(ckpt, COMPONENTS, "a ComfyUI checkpoint")
        tensors, _ = K.to_single_file(ckpt.components, ckpt.configs)
        return _write_file(out, tensors, metadata, dtype, overwrite, to)
    _require(ckpt, ("unet",), "this output")
    if to == "comfyui-unet":
        unet, _ = K.unet_to_single(ckpt.components["unet"], ckpt.configs["unet"])
        return _write_file(out, {K.UNET_PREFIX + k: t for k, t in unet.items()}, metadata, dtype, overwrite, to)
    if out.suffix == ".safetensors":
        if len(ckpt.components) > 1:
            raise UserError(f"{out}: a diffusers pipeline is a folder; give an output path without .safetensors")
        return _write_file(out, ckpt.components["unet"], metadata, dtype, overwrite, "diffusers-unet")
    if ckpt.missing:
        _require(ckpt, COMPONENTS, "a diffusers pipeline (or give an OUT ending in .safetensors for a "
                                   "diffusers-named UNet file)")
    return _write_folder(ckpt, out, dtype, metadata, overwrite, Path(config_dir) if config_dir else None)


def _require(ckpt: Checkpoint, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in ckpt.components]
    if missing:
        names = ", ".join(NAMES[c] for c in missing)
        raise UserError(f"{ckpt.path}: has no {names}, which {what} needs; pass --base BASE (any SDXL base, "
                        "diffusers folder or single file) to take the missing parts from it")


def _write_file(out: Path, tensors: Mapping[str, LazyTensor], metadata: dict[str, str], dtype: str | None,
                overwrite: bool, fmt: str) -> dict:
    sha = write_tensors(out, tensors, metadata, dtype=dtype, overwrite=overwrite, desc=out.name)
    return {"output": str(out), "format": fmt, "tensors": len(tensors), "bytes": out.stat().st_size,
            "sha256_data": sha}


def _write_folder(ckpt: Checkpoint, out: Path, dtype: str | None, metadata: dict[str, str], overwrite: bool,
                  config_dir: Path | None) -> dict:
    prepared = {}
    for c in COMPONENTS:
        problems = check_component(ckpt.components[c], c, ckpt.configs[c])
        if problems:
            hint = "pass --config DIR with this model's diffusers configs" if c not in ckpt.own_configs \
                else "the weights and the config disagree"
            raise UserError(f"{ckpt.path}: the {NAMES[c]} does not match its config ({problems[0]}); {hint}")
        prepared[c] = _installed_names(c, ckpt.components[c], ckpt.configs[c])
    support = _support_files(ckpt, config_dir)
    written = {}
    with atomic_output(out, overwrite) as tmp:
        tmp.mkdir()
        for relative, source in support.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / relative)
        _write_lightning_scheduler(tmp / "scheduler" / "scheduler_config.json", metadata)
        for c in COMPONENTS:
            folder = tmp / c
            folder.mkdir(exist_ok=True)
            file_meta = {"format": "pt", **(metadata if c == "unet" else {})}
            sha = write_tensors(folder / WEIGHTS_NAME[c], prepared[c], file_meta, dtype=dtype, desc=f"{c}")
            config = _config_for_output(ckpt.configs[c], prepared[c], dtype)
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            written[c] = {"tensors": len(prepared[c]), "sha256_data": sha}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    roots = sorted({str(p)[: -len(r)].rstrip("/") for r, p in support.items()})
    return {"output": str(out), "format": "diffusers", "components": written, "bytes": size,
            "support_files_from": roots}


def _write_lightning_scheduler(path: Path, metadata: Mapping[str, str]) -> None:
    """A Lightning model's folder gets its sampler (Euler, trailing, its prediction type) in scheduler_config,
    so a plain `from_pretrained` samples it correctly; other models keep the copied config."""
    from lightning_tools.catalog import settings_from_metadata

    settings = settings_from_metadata(metadata)
    if settings is None or not path.is_file():
        return
    path.write_text(json.dumps(settings.scheduler_config(json.loads(path.read_text())), indent=2) + "\n")


def _support_files(ckpt: Checkpoint, config_dir: Path | None) -> dict[str, Path]:
    """model_index, scheduler and tokenizer files (relative path -> file to copy).

    Each part comes whole from the first place that has it: --config, the input's own folder, then the
    bundled SDXL-base configs (model_index, scheduler) or the local hub cache of the SDXL base (tokenizers).
    """
    folders = [d for d in (config_dir, ckpt.support_dir) if d is not None]
    found: dict[str, Path] = {}
    for part, required in SUPPORT_PARTS.items():
        for folder in [*folders, SDXL_BASE_CONFIGS]:
            if all((folder / part / name).is_file() for name in required):
                target = folder / part
                files = [p for p in target.iterdir() if p.is_file()] if target.is_dir() else [target]
                found.update((str(p.relative_to(folder)), p) for p in files)
                break
        else:
            files, why = _sdxl_base_files([f"{part}/{name}" for name in required])
            if files is None:
                raise UserError(f"{ckpt.path}: no {part} files for a diffusers folder: none beside the input, none "
                                f"in the local cache of {SDXL_BASE_REPO}, and {why}; pass --config DIR with an SDXL "
                                "diffusers folder (its tokenizer/ and tokenizer_2/ are copied)")
            found.update(files)
    return found


def _sdxl_base_files(names: list[str]) -> tuple[dict[str, Path] | None, str]:
    """Files of the SDXL base repo (tokenizers: a few hundred kB) from the local hub cache, else downloaded.

    Returns (files, "") or (None, why not). Whether the hub answers is asked once, quickly, before downloading,
    so an offline machine gets its error at once instead of after the download retries.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from lightning_tools.hub import HubEnv, list_repo

    env = HubEnv.current()
    cached = {n: try_to_load_from_cache(SDXL_BASE_REPO, n, cache_dir=env.cache_dir) for n in names}
    if all(isinstance(p, str) for p in cached.values()):
        return {n: Path(p) for n, p in cached.items()}, ""
    listing, unreachable = list_repo(env, SDXL_BASE_REPO, "main")
    if listing is None:
        return None, f"the hub cannot be asked ({unreachable})"
    if missing := [n for n in names if n not in listing.files]:
        return None, f"the hub's {SDXL_BASE_REPO} has no {missing[0]}"
    # By branch name, so the cache records refs/main and the look-up above finds these files next time.
    return {n: Path(hf_hub_download(SDXL_BASE_REPO, n, revision="main", cache_dir=env.cache_dir,
                                    endpoint=env.endpoint)) for n in names}, ""


def _installed_names(component: str, tensors: Mapping[str, LazyTensor], config: Mapping) -> dict[str, LazyTensor]:
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
    floats = {DTYPE_NAMES[dtype] if dtype else t.dtype for t in tensors.values() if t.dtype in _TORCH_DTYPE_NAME}
    if len(floats) == 1:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = _TORCH_DTYPE_NAME[floats.pop()]
                break
    return config
