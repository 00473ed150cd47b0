"""What a path holds, from safetensors headers only: layout, components present and architecture.

Architecture is read from structure (number of UNet levels, attention at the first level, the added text-time
embedding, cross-attention width), never from exact widths, so a toy model with SDXL's block structure is
"sdxl-base" just as SDXL is. `check_architecture` then compares keys and shapes with a real config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lightning_tools.errors import UserError
from lightning_tools.sdxl import SDXL_BASE_CONFIGS
from lightning_tools.sdxl import keys as K
from lightning_tools.sdxl.vocabulary import ARCHITECTURES, COMPONENT_NAMES, REFINER_TEXT_PREFIX
from lightning_tools.stream import LazyTensor
from lightning_tools.tensors import TensorSource, weight_files

# Keys and shapes of the SDXL base per component, precomputed from the bundled configs (tests/test_detect.py
# checks them against the models the configs describe).
SHAPES_FILE = SDXL_BASE_CONFIGS.parent / "sdxl-base-shapes.json"
_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora_linear_layer.")


@dataclass(frozen=True)
class Detection:
    """What a path holds. `layout`: one of `vocabulary.LAYOUTS`, or "lora" or "unknown". `unet_prefix`: the
    key prefix of a single-file UNet ("model.diffusion_model." or "" for bare keys). `sources`: the weights
    opened to find this out (per component for a diffusers folder, under "" for a file or a component folder),
    handed on so nothing is opened twice."""

    path: Path
    layout: str
    components: tuple[str, ...]
    architecture: str
    unet_prefix: str = ""
    sources: Mapping[str, TensorSource] = field(default_factory=dict, compare=False, repr=False)

    @property
    def description(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def source(self) -> TensorSource:
        """The weights of a file or component folder."""
        return self.sources[""]


def detect(path: Path | str) -> Detection:
    path = Path(path)
    if not path.exists():
        raise UserError("no such file or folder", path=path)
    if path.is_dir():
        return _detect_folder(path)
    source = TensorSource.open(path)
    return dataclasses.replace(_detect_keys(path, _shapes(source)), sources={"": source})


def _detect_folder(path: Path) -> Detection:
    if (path / "model_index.json").is_file():
        sources = {c: TensorSource.open(path / c) for c in COMPONENT_NAMES if _has_weights(path / c)}
        arch = "unknown"
        if "unet" in sources:
            arch = _architecture(_shapes(sources["unet"]), "")
        elif (path / "transformer").is_dir():
            arch = _transformer_architecture(path / "transformer")
        return Detection(path, "diffusers", tuple(sources), arch, sources=sources)
    if (path / "config.json").is_file() and _has_weights(path):
        source = TensorSource.open(path)
        return dataclasses.replace(_detect_keys(path, _shapes(source)), sources={"": source})
    raise UserError("a folder that is neither a diffusers pipeline (no model_index.json) nor a model component "
                    "(config.json + weights)", path=path)


def _has_weights(folder: Path) -> bool:
    try:
        return folder.is_dir() and bool(weight_files(folder))
    except UserError:
        return False


def _shapes(source: TensorSource) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in source.items()}


def _transformer_architecture(folder: Path) -> str:
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError):
        return "unknown"
    return {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(name, "unknown")


def _detect_keys(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> Detection:
    keys = list(shapes)
    if any(marker in k for k in keys for marker in _LORA_MARKERS) or any(k.startswith("lora_") for k in keys):
        return Detection(path, "lora", (), "unknown")
    present = tuple(c for c in COMPONENT_NAMES if any(k.startswith(K.PREFIXES[c]) for k in keys))
    refiner_text = any(k.startswith(REFINER_TEXT_PREFIX) for k in keys)
    if refiner_text and "text_encoder_2" not in present:
        present += ("text_encoder_2",)
    if "unet" in present:
        arch = _architecture(shapes, K.UNET_PREFIX)
        if arch == "sdxl-base" and refiner_text:
            arch = "sdxl-refiner"
        layout = "single-file" if len(present) > 1 else "unet-single-file"
        return Detection(path, layout, present, arch, K.UNET_PREFIX if layout == "unet-single-file" else "")
    if "input_blocks.0.0.weight" in shapes:
        return Detection(path, "unet-single-file", ("unet",), _architecture(shapes, ""), "")
    if "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in keys):
        return Detection(path, "unet-diffusers", ("unet",), _architecture(shapes, ""))
    arch = _transformer_keys_architecture(keys)
    if arch != "unknown":
        return Detection(path, "unet-single-file" if not present else "single-file", present or ("unet",), arch)
    if present:
        return Detection(path, "single-file", present, "sdxl-refiner" if refiner_text else "unknown")
    return Detection(path, "unknown", (), "unknown")


# The context width of UNet cross-attention keys tells SD1 (768), SD2 (1024) and SDXL (2048) LoRAs apart.
_LORA_CROSS_ATTN_K = re.compile(r".*attn2[._]to_k.*(lora_down|lora_A|lora\.down|down)\.weight$")
_LORA_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}


def lora_architecture(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The architecture a LoRA was trained for, judged from its keys and shapes: the width of its
    cross-attention key projections, or DiT block names for SD3 and FLUX. "unknown" when nothing tells."""
    keys = list(shapes)
    if any("joint_blocks" in k or "joint_transformer_blocks" in k for k in keys):
        return "sd3"
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return "flux"
    widths = {shapes[k][1] for k in keys if _LORA_CROSS_ATTN_K.match(k) and len(shapes[k]) == 2}
    if len(widths) == 1:
        return _LORA_CONTEXT.get(widths.pop(), "unknown")
    return "unknown"


def _transformer_keys_architecture(keys: list[str]) -> str:
    for k in keys:
        bare = k.removeprefix(K.UNET_PREFIX)
        if bare.startswith("joint_blocks."):
            return "sd3"
        if bare.startswith(("double_blocks.", "single_blocks.")):
            return "flux"
    return "unknown"


_CROSS_ATTN_K = re.compile(r".*attn2\.to_k\.weight$")


def _architecture(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> str:
    """SD1 / SD2 / SDXL base / refiner from the UNet's structure, in either naming."""
    bare = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if _transformer_keys_architecture(list(bare)) != "unknown":
        return _transformer_keys_architecture(list(bare))
    if "conv_in.weight" in bare:  # diffusers naming
        levels = 1 + len({k.split(".")[1] for k in bare if ".downsamplers." in k})
        first_level_attention = any(k.startswith("down_blocks.0.attentions.") for k in bare)
        added = "add_embedding.linear_1.weight" in bare
    elif "input_blocks.0.0.weight" in bare:
        levels = 1 + len({k.split(".")[1] for k in bare if re.match(r"input_blocks\.\d+\.0\.op\.", k)})
        first_level_attention = any(k.startswith("input_blocks.1.1.") for k in bare)
        added = "label_emb.0.0.weight" in bare
    else:
        return "unknown"
    context = next((v[1] for k, v in bare.items() if _CROSS_ATTN_K.match(k) and len(v) == 2), None)
    if added:
        if levels == 3 and not first_level_attention:
            return "sdxl-base"
        if levels == 4 and not first_level_attention:
            return "sdxl-refiner"
        return "unknown"
    if levels == 4 and first_level_attention:
        return {768: "sd1", 1024: "sd2"}.get(context, "unknown")
    return "unknown"


# --- keys and shapes against a config -------------------------------------------------------------------------

def base_config(component: str) -> dict:
    """The bundled SDXL-base diffusers config of a component."""
    return json.loads((SDXL_BASE_CONFIGS / component / "config.json").read_text())


def expected_shapes(component: str, config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every weight key (diffusers naming, text encoders with `text_model.`) and its shape.

    For the SDXL base configs they come from the bundled `shapes.json` (importing diffusers and transformers
    takes longer than many conversions); for any other config, from the model it describes, built on the meta
    device (no memory, no weights).
    """
    if _architecture_fields(config) == _architecture_fields(base_config(component)):
        return {k: tuple(v) for k, v in _bundled_shapes()[component].items()}
    return dict(_model_shapes(component, json.dumps(config, sort_keys=True)))


def _architecture_fields(config: Mapping) -> dict:
    """A config without the fields that do not change the weights (versions, names, dtype)."""
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("torch_dtype", "dtype", "transformers_version")}


@functools.lru_cache(maxsize=1)
def _bundled_shapes() -> dict[str, dict[str, list[int]]]:
    return json.loads(SHAPES_FILE.read_text())


@functools.lru_cache(maxsize=8)
def _model_shapes(component: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torch

    config = json.loads(config_json)
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig.from_dict(config))
    state = model.state_dict()
    if component.startswith("text_encoder"):
        state = {K.hf_clip_key(k): v for k, v in state.items() if not k.endswith("position_ids")}
    return tuple((k, tuple(v.shape)) for k, v in state.items())


def check_component(tensors: Mapping, component: str, config: Mapping | None = None) -> list[str]:
    """Missing and misshaped keys of one component in diffusers naming (text encoders with or without
    `text_model.`), against `config` or the SDXL base. Keys the model does not have are listed too."""
    config = config or base_config(component)
    want = expected_shapes(component, config)
    have = {(K.hf_clip_key(k) if component.startswith("text_encoder") else K.vae_legacy_key(k)
             if component == "vae" else k): tuple(t.shape) for k, t in tensors.items()}
    have.pop(K.POSITION_IDS, None)
    if component == "text_encoder_2":
        have.pop(K.LOGIT_SCALE, None)
    reference = "its config" if config != base_config(component) else "SDXL base"
    problems = []
    missing = [k for k in want if k not in have]
    if missing:
        problems.append(f"{component}: {_count(missing, 'key')} missing ({_first(missing)})")
    wrong = [k for k in want if k in have and have[k] != want[k]]
    if wrong:
        k = wrong[0]
        problems.append(f"{component}: {_count(wrong, 'tensor')} with the wrong shape ({k} is {list(have[k])}, "
                        f"{reference} has {list(want[k])})")
    extra = [k for k in have if k not in want]
    if extra:
        problems.append(f"{component}: {_count(extra, 'key')} not in the model ({_first(extra)})")
    return problems


def check_architecture(tensors: Mapping[str, LazyTensor], component: str | None = None,
                       configs: Mapping[str, Mapping] | None = None) -> list[str]:
    """Problems with `tensors` as SDXL weights, one line each, from their shapes alone (nothing is loaded).

    `component` names a diffusers component's tensors; None means the keys of one file: a single-file
    checkpoint (any of its parts) or a UNet in either naming. `configs` per component default to SDXL base.
    An empty list means every expected key is present with the expected shape.
    """
    configs = dict(configs or {})
    if component is not None:
        return check_component(tensors, component, configs.get(component))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    found = _detect_keys(Path("."), shapes)
    if found.layout == "lora":
        return ["a LoRA, not a model"]
    if found.architecture != "sdxl-base":
        return [f"looks like {found.description}, not SDXL base"]
    structure = {c: configs.get(c) or base_config(c) for c in COMPONENT_NAMES}
    if found.layout == "unet-diffusers":
        return check_component(tensors, "unet", configs.get("unet"))
    if found.layout == "unet-single-file" and not found.unet_prefix:
        parts, unknown = K.split_single_file({K.UNET_PREFIX + k: v for k, v in tensors.items()}, structure)
    else:
        parts, unknown = K.split_single_file(tensors, structure, found.components)
    problems = []
    for c, part in parts.items():
        problems += check_component(part, c, configs.get(c))
    if unknown:
        problems.append(f"{_count(unknown, 'key')} outside the SDXL layout ({_first(unknown)})")
    return problems



def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
