"""Any SDXL checkpoint seen lazily in diffusers naming, and written tensor by tensor in any layout.

A `Checkpoint` is the hub of every conversion: a diffusers folder, a ComfyUI/A1111 single file or a UNet-only
file (either naming) opens into the same form, component-relative diffusers keys mapped to `LazyTensor`s, and
writes out as a diffusers folder, a single file or a UNet-only file. Nothing is loaded until a writer asks for
a tensor, and renamed tensors are byte-copied, so peak memory is a few tensors whatever the model size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_tools import dtypes, provenance, support
from lightning_tools.errors import UserError
from lightning_tools.sdxl import keys as K
from lightning_tools.sdxl.detect import check_component, detect
from lightning_tools.report import Report
from lightning_tools.sdxl.vocabulary import COMPONENT_NAMES, COMPONENTS, component_titles
from lightning_tools.outputs import output
from lightning_tools.stream import LazyTensor, cast, lazy_tensors, write_file
from lightning_tools.tensors import TensorSource

if TYPE_CHECKING:
    import torch


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

@dataclass
class Fp8Loss(Report):
    """How far an fp8 UNet is from the fp16 one it was rounded from, gathered tensor by tensor as they are
    written: absolute errors over every element stored in fp8, the mean absolute fp16 value for scale, and how
    many values lay beyond fp8's range (saturated to +-448)."""

    tensors: int = 0
    elements: int = 0
    max_abs_error: float = 0.0
    mean_abs_error: float = 0.0
    mean_abs_value: float = 0.0
    saturated: int = 0

    def quantize(self, half: "torch.Tensor") -> "torch.Tensor":
        """`half` (fp16) rounded to float8_e4m3fn as torch rounds it, its error added to the loss. An fp16 value
        has 65536 bit patterns, so both the rounding and the error statistics go through tables indexed by them:
        a lookup and a histogram per tensor instead of float conversions, which torch does slowly for fp8."""
        import torch

        table = _fp8_table()
        bits = half.reshape(-1).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        counts = torch.bincount(bits, minlength=65536).double()
        n = float(counts.sum())
        if n:
            finite = counts * table.finite
            seen = counts > 0  # errors are 0 where not finite
            self.max_abs_error = max(self.max_abs_error, float((table.error * seen).max()))
            total = self.elements + n
            self.mean_abs_error += (float((finite * table.error).sum()) - n * self.mean_abs_error) / total
            self.mean_abs_value += (float((finite * table.magnitude).sum()) - n * self.mean_abs_value) / total
            self.saturated += int(counts[table.beyond].sum())
        self.tensors += 1
        self.elements += int(n)
        return torch.index_select(table.fp8, 0, bits).view(torch.float8_e4m3fn).reshape(half.shape)

    def describe(self) -> str:
        relative = f" ({100 * self.mean_abs_error / self.mean_abs_value:.2f}% of the mean |weight|)" \
            if self.mean_abs_value else ""
        saturated = f", {self.saturated} values beyond +-448 saturated" if self.saturated else ""
        return (f"fp8 UNet: {self.tensors} tensors ({self.elements / 1e6:.1f}M values) in float8_e4m3fn; against "
                f"fp16: max abs error {self.max_abs_error:.3g}, mean {self.mean_abs_error:.3g}{relative}{saturated}")


@dataclass(frozen=True)
class Written:
    """What a writer produced: the output, its layout, and the data sha256 of each weights file (by component
    for a folder, under "" for a single file); for an fp8 output, the UNet's loss against fp16."""

    output: Path
    layout: str
    tensors: int
    bytes: int
    data_sha256: dict[str, str]
    support_files_from: tuple[str, ...] = ()
    fp8: Fp8Loss | None = None


def write_checkpoint(ckpt: Checkpoint, out: Path | str, to: str, *, dtype: str | None = None,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                     config_dir: Path | str | None = None) -> Written:
    """Stream `ckpt` into `out` as a diffusers folder, a ComfyUI single file or a ComfyUI UNet file (`to` is a
    key of `vocabulary.MODEL_TARGETS`).

    `dtype` (a safetensors code, see `dtypes.parse`) casts floating tensors only; `dtypes.FP8` writes the UNet's
    matrices and convs in float8_e4m3fn and every other floating tensor in fp16 (see `written_dtype`), with the
    loss against fp16 in `Written.fp8` and the file's metadata. `metadata` goes into the single file, or the UNet
    file of a diffusers folder; ModelSpec's data hash in it is filled in as it is written. A diffusers output
    ending in `.safetensors` from a UNet-only checkpoint is one file with diffusers UNet names (the layout of the
    official `sdxl_lightning_Nstep_unet.safetensors`).
    """
    out = Path(out)
    metadata = dict(metadata or {})
    loss = None
    if dtype == dtypes.FP8:
        ckpt, loss = _in_fp8(ckpt)
        dtype = None
    if to == "comfyui":
        _require(ckpt, COMPONENT_NAMES, "a ComfyUI checkpoint")
        tensors, _ = K.to_single_file(ckpt.components, ckpt.configs)
        return _write_file(out, tensors, metadata, dtype, overwrite, "single-file", loss)
    _require(ckpt, ("unet",), "this output")
    if to == "comfyui-unet":
        unet, _ = K.unet_to_single(ckpt.components["unet"], ckpt.configs["unet"])
        return _write_file(out, {K.UNET_PREFIX + k: t for k, t in unet.items()}, metadata, dtype, overwrite,
                           "unet-single-file", loss)
    if out.suffix == ".safetensors":
        if len(ckpt.components) > 1:
            raise UserError("a diffusers pipeline is a folder; give an output path without .safetensors", path=out)
        return _write_file(out, ckpt.components["unet"], metadata, dtype, overwrite, "unet-diffusers", loss)
    if ckpt.missing:
        _require(ckpt, COMPONENT_NAMES, "a diffusers pipeline (or give an OUT ending in .safetensors for a "
                                        "diffusers-named UNet file)")
    return _write_folder(ckpt, out, dtype, metadata, overwrite, Path(config_dir) if config_dir else None, loss)


def written_dtype(component: str, tensor: LazyTensor, dtype: str | None) -> str:
    """The dtype a tensor is written in for an output `dtype`. fp8 is for the UNet's matrices and convs only:
    they are 99.9% of its values, while biases and norm scales (1-D) would lose most of their precision to
    fp8's 3 mantissa bits for a few MB; text encoders and VAE stay fp16. Integer tensors keep theirs."""
    if dtype != dtypes.FP8:
        return dtypes.target(tensor.dtype, dtype)
    if component == "unet" and len(tensor.shape) >= 2:
        return dtypes.target(tensor.dtype, dtypes.FP8)
    return dtypes.target(tensor.dtype, "F16")


def _in_fp8(ckpt: Checkpoint) -> tuple[Checkpoint, Fp8Loss]:
    """`ckpt` as written with --dtype fp8: each fp8 tensor rounded to fp16 first (so the loss is measured
    against the fp16 output) and then to fp8, its error added to the loss as the writer asks for it."""
    loss = Fp8Loss()
    components = {}
    for c, tensors in ckpt.components.items():
        components[c] = {}
        for key, t in tensors.items():
            code = written_dtype(c, t, dtypes.FP8)
            components[c][key] = cast(t, "F16").map(loss.quantize, dtype=code) if code == dtypes.FP8 else cast(t, code)
    return dataclasses.replace(ckpt, components=components), loss


@dataclass(frozen=True)
class _Fp8Table:
    """For each of the 65536 fp16 bit patterns: its float8_e4m3fn byte, |fp8 - fp16|, |fp16|, whether it is
    finite, and whether it lies beyond fp8's range."""

    fp8: "torch.Tensor"
    error: "torch.Tensor"
    magnitude: "torch.Tensor"
    finite: "torch.Tensor"
    beyond: "torch.Tensor"


@functools.cache
def _fp8_table() -> _Fp8Table:
    import torch

    half = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    quantized = half.to(torch.float8_e4m3fn)
    value = half.double()
    finite = torch.isfinite(value)
    error = torch.where(finite, (quantized.double() - value).abs(), 0.0)
    return _Fp8Table(quantized.view(torch.uint8), error, torch.where(finite, value.abs(), 0.0), finite,
                     value.abs() > dtypes.FP8_MAX)


_LOSS_ROOM = 512  # header bytes reserved for the fp8 loss, known only when the UNet is written


def _file_metadata(metadata: Mapping[str, str], loss: Fp8Loss | None):
    """What a weights file's writer gets: the metadata with ModelSpec's data hash and, for an fp8 UNet, the loss
    against fp16 as it stands when the file is complete (the writer asks again at the end)."""
    filled = provenance.with_data_hash(metadata)
    if loss is None:
        return filled

    def final(sha256: str) -> Mapping[str, str]:
        return {**(filled(sha256) if callable(filled) else filled), provenance.FP8: json.dumps(loss.to_json())}

    return final


def _require(ckpt: Checkpoint, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in ckpt.components]
    if missing:
        raise UserError(f"has no {component_titles(missing)}, which {what} needs; pass --base BASE (any SDXL base, "
                        "diffusers folder or single file) to take the missing parts from it", path=ckpt.path)


def _write_file(out: Path, tensors: Mapping[str, LazyTensor], metadata: dict[str, str], dtype: str | None,
                overwrite: bool, layout: str, loss: Fp8Loss | None) -> Written:
    sha = write_file(out, tensors, metadata=_file_metadata(metadata, loss), dtype=dtype, overwrite=overwrite,
                     room=_LOSS_ROOM if loss else 0)
    return Written(out, layout, len(tensors), out.stat().st_size, {"": sha}, fp8=loss)


def _write_folder(ckpt: Checkpoint, out: Path, dtype: str | None, metadata: dict[str, str], overwrite: bool,
                  config_dir: Path | None, loss: Fp8Loss | None) -> Written:
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
            unet_loss = loss if c == "unet" else None
            shas[c] = write_file(folder / COMPONENTS[c].weights_file, prepared[c],
                                 metadata=_file_metadata(file_meta, unet_loss), dtype=dtype,
                                 room=_LOSS_ROOM if unet_loss else 0)
            config = _config_for_output(ckpt.configs[c], prepared[c], dtype)
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    roots = tuple(sorted({str(p)[: -len(r)].rstrip("/") for r, p in files.items()}))
    return Written(out, "diffusers", sum(len(t) for t in prepared.values()), size, shas, roots, loss)


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
