"""LoRA files in every common SDXL format, read lazily into one normal form per target module.

Formats: kohya keys with diffusers module names (the official Lightning LoRAs), kohya keys with single-file
(sgm) module names and `lora_te1_`/`lora_te2_` text encoders, and peft/diffusers (`unet.<module>.lora_A.weight`,
what `save_lora_weights` writes and `load_lora_weights` reads). kohya flattens module names with underscores,
which is ambiguous (`to_out_0`, `transformer_blocks_0`), so names are resolved against the real module names of
the target model, never guessed from the string.

Text encoder modules are named in the classic Hugging Face form, with the `text_model.` prefix
(`text_model.encoder.layers.0.self_attn.q_proj`; `text_projection` has none), as `checkpoint` names their keys.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from lightning_tools import dtypes, provenance
from lightning_tools.errors import UserError
from lightning_tools.stream import LazyTensor, write_file
from lightning_tools.tensors import SafetensorsFile, read_tensor

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TE_PREFIX = "text_model."
# diffusers keeps peft adapter settings (r, lora_alpha, alpha_pattern, ...) in this metadata key.
PEFT_METADATA_KEY = "lora_adapter_metadata"

_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}
_KOHYA_WRITE_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
_PEFT_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
               ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
               ".lora_linear_layer.up.weight": "up", ".alpha": "alpha"}
_SINGLE_FILE_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_UNSUPPORTED = {"dora_scale": "DoRA", "hada_": "LoHa", "lokr_": "LoKr", ".diff": "full-difference",
                "lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA bias"}


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: delta = (alpha / rank) * up @ [mid] @ down, in the target weight's shape.

    `module` is the diffusers module name within `component`; `name` is what the LoRA file calls it.
    """

    component: str
    module: str
    down: LazyTensor
    up: LazyTensor
    alpha: float | None = None
    mid: LazyTensor | None = None
    name: str = ""

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape of the weight this module adapts: (out, in) or (out, in, kh, kw)."""
        out_features, in_features = self.up.shape[0], self.down.shape[1]
        kernel = (self.down if self.mid is None else self.mid).shape[2:]
        return (out_features, in_features, *kernel) if len(self.up.shape) == 4 else (out_features, in_features)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file in normal form. `unresolved` holds the file's module names that name no module of the
    architecture they were resolved against (an SD1.5 LoRA read for SDXL, say)."""

    path: Path
    format: str
    modules: list[LoraModule]
    metadata: dict[str, str]
    unresolved: list[str] = field(default_factory=list)


def detect_lora_format(keys: Iterable[str]) -> str | None:
    """"kohya-diffusers", "kohya-single-file", "peft", or None when the keys are not a LoRA we read."""
    keys = list(keys)
    kohya = [k for k in keys if k.startswith(tuple(_KOHYA_PREFIX)) and k.endswith(".lora_down.weight")]
    if kohya:
        unet = [k for k in kohya if k.startswith("lora_unet_")]
        if unet and not any(k.startswith(_SINGLE_FILE_BLOCKS) for k in unet):
            return "kohya-diffusers"
        return "kohya-single-file"
    if any(k.split(".", 1)[0] in LORA_COMPONENTS and k.endswith(tuple(p for p, v in _PEFT_PARTS.items() if v == "down"))
           for k in keys):
        return "peft"
    return None


# --- module names of the target architecture -------------------------------------------------------------

def te_canonical(name: str) -> str:
    """A text encoder module name in normal form (with `text_model.`, except `text_projection`)."""
    from lightning_tools.sdxl.keys import hf_clip_key

    return hf_clip_key(name + ".weight").removesuffix(".weight")


def modules_of_keys(keys: Iterable[str], component: str) -> set[str]:
    """The module names that own a `.weight` among a component's tensor keys, in normal form."""
    names = {k.removesuffix(".weight") for k in keys if k.endswith(".weight")}
    return names if component == "unet" else {te_canonical(n) for n in names}


@lru_cache(maxsize=4)
def _text_encoder_modules(config_json: str) -> frozenset[str]:
    """Weight-owning module names of a CLIP text encoder, from its config (built on the meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = json.loads(config_json)
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config.get("architectures", []) \
        else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig.from_dict(config))
    return frozenset(modules_of_keys((n + ".weight" for n, m in model.named_modules()
                                      if isinstance(getattr(m, "weight", None), torch.Tensor)), "text_encoder"))


def sdxl_module_names() -> tuple[dict[str, set[str]], dict]:
    """(module names per component, UNet config) of the SDXL base, from the bundled configs."""
    from lightning_tools.sdxl import SDXL_BASE_CONFIGS
    from lightning_tools.sdxl.keys import unet_module_map

    configs = {c: json.loads((SDXL_BASE_CONFIGS / c / "config.json").read_text()) for c in LORA_COMPONENTS}
    names = {c: set(_text_encoder_modules(json.dumps(configs[c], sort_keys=True))) for c in LORA_COMPONENTS[1:]}
    names["unet"] = set(unet_module_map(configs["unet"]))
    return names, configs["unet"]


class _KohyaNames:
    """kohya's flattened names (`lora_unet_down_blocks_0_...`) -> (component, diffusers module name).

    Built from real module names: diffusers ones, and for the UNet also their single-file equivalents.
    """

    def __init__(self, targets: Mapping[str, Collection[str]], unet_config: Mapping | None):
        self._table: dict[str, tuple[str, str]] = {}
        for component, names in targets.items():
            prefixes = [p for p, c in _KOHYA_PREFIX.items() if c == component]
            for name in names:
                # Text encoder names also without `text_model.`: diffusers' convert_state_dict_to_kohya writes them
                # so from a transformers >= 5.6 CLIPTextModel (`lora_te1_encoder_layers_0_...`).
                spellings = [name] if component == "unet" else [name, name.removeprefix(TE_PREFIX)]
                for prefix in prefixes:
                    for spelling in spellings:
                        self._table[prefix + spelling.replace(".", "_")] = (component, name)
        if unet_config is not None and "unet" in targets:
            from lightning_tools.sdxl.keys import unet_names

            to_single = unet_names(unet_config).to_single
            for name in targets["unet"]:
                single_file_name = to_single(name)
                if single_file_name is not None:
                    self._table["lora_unet_" + single_file_name.replace(".", "_")] = ("unet", name)

    def resolve(self, stem: str) -> tuple[str, str] | None:
        return self._table.get(stem)


# --- reading ----------------------------------------------------------------------------------------------

def read_lora(path: Path | str, targets: Mapping[str, Collection[str]] | None = None,
              unet_config: Mapping | None = None) -> LoraFile:
    """Read a LoRA file lazily (tensor data is loaded only by `lora_delta`).

    `targets`: module names per component to resolve kohya names against (normal form, see `modules_of_keys`),
    with `unet_config` for single-file names; both default to the SDXL base architecture.
    """
    path = Path(path)
    source = SafetensorsFile(path)
    fmt = detect_lora_format(source)
    if fmt is None:
        what = "a full checkpoint (use it as --base)" if any(k.endswith(".weight") for k in source) and \
            not any("lora" in k for k in source) else "no lora_down/lora_A keys"
        raise UserError(f"{path}: not a LoRA file we can read ({what}); expected kohya or peft/diffusers LoRA keys")
    _refuse_unsupported(path, source)
    if fmt == "peft":
        modules, unresolved = _read_peft(path, source), []
    else:
        if targets is None:
            targets, unet_config = sdxl_module_names()
        modules, unresolved = _read_kohya(path, source, _KohyaNames(targets, unet_config))
    return LoraFile(path, fmt, modules, dict(source.metadata), unresolved)


def _refuse_unsupported(path: Path, source: SafetensorsFile) -> None:
    for marker, kind in _UNSUPPORTED.items():
        hit = next((k for k in source if marker in k), None)
        if hit:
            raise UserError(f"{path}: {kind} weights ({hit}) are not supported; only plain LoRA/LoCon can be "
                            f"merged or converted")


def _group(path: Path, source: SafetensorsFile, split) -> dict[str, dict[str, str]]:
    """Keys grouped by module: {module name in the file: {part: key}}; unknown keys are refused."""
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in source:
        parsed = split(key)
        if parsed is None:
            unknown.append(key)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = key
    if unknown:
        raise UserError(f"{path}: {len(unknown)} keys are not LoRA weights of a known kind (e.g. {unknown[0]}); "
                        f"is this a LoRA file?")
    for name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise UserError(f"{path}: module {name} has no {'up' if 'down' in parts else 'down'} weight; "
                            f"the file is incomplete")
    return groups


def _split_kohya(key: str) -> tuple[str, str] | None:
    stem, _, part = key.partition(".")
    return (stem, _KOHYA_PARTS[part]) if part in _KOHYA_PARTS and stem.startswith(tuple(_KOHYA_PREFIX)) else None


def _split_peft(key: str) -> tuple[str, str] | None:
    for suffix, part in _PEFT_PARTS.items():
        if key.endswith(suffix) and key.split(".", 1)[0] in LORA_COMPONENTS:
            return key[: -len(suffix)], part
    return None


def _module(path: Path, source: SafetensorsFile, component: str, module: str, name: str,
            parts: dict[str, str], alpha: float | None) -> LoraModule:
    down, up = LazyTensor.of(source, parts["down"]), LazyTensor.of(source, parts["up"])
    mid = LazyTensor.of(source, parts["mid"]) if "mid" in parts else None
    inner = mid.shape[:2] if mid else (down.shape[0], down.shape[0])
    if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape) or up.shape[1] != inner[0] \
            or inner[1] != down.shape[0] or (len(up.shape) == 4 and up.shape[2:] != (1, 1)):
        raise UserError(f"{path}: module {name} has inconsistent shapes (down {list(down.shape)}, "
                        f"up {list(up.shape)}); the file is damaged")
    return LoraModule(component, module, down, up, alpha, mid, name)


def _read_kohya(path: Path, source: SafetensorsFile, names: _KohyaNames) -> tuple[list[LoraModule], list[str]]:
    modules, unresolved = [], []
    for stem, parts in _group(path, source, _split_kohya).items():
        resolved = names.resolve(stem)
        if resolved is None:
            unresolved.append(stem)
            continue
        alpha = float(read_tensor(source[parts["alpha"]]).item()) if "alpha" in parts else None
        modules.append(_module(path, source, *resolved, stem, parts, alpha))
    return modules, unresolved


def _read_peft(path: Path, source: SafetensorsFile) -> list[LoraModule]:
    settings = _peft_settings(path, source.metadata)
    modules = []
    for name, parts in _group(path, source, _split_peft).items():
        component, module = name.split(".", 1)
        if component != "unet":
            module = te_canonical(module)
        rank = source[parts["down"]].shape[0]
        if "alpha" in parts:
            alpha = float(read_tensor(source[parts["alpha"]]).item())
        else:
            alpha = _peft_alpha(settings, component, module, rank)
        modules.append(_module(path, source, component, module, name, parts, alpha))
    return modules


def _peft_settings(path: Path, metadata: Mapping[str, str]) -> dict:
    raw = metadata.get(PEFT_METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata {PEFT_METADATA_KEY} is not valid JSON; the file is damaged") from None


def _peft_alpha(settings: Mapping, component: str, module: str, rank: int) -> float | None:
    """The module's alpha from diffusers' adapter metadata (LoraConfig fields prefixed by component)."""
    alpha = settings.get(f"{component}.lora_alpha")
    for pattern, value in settings.get(f"{component}.alpha_pattern", {}).items():
        if _peft_pattern_matches(pattern, module, component):
            alpha = value
            break
    if alpha is None:
        return None
    if settings.get(f"{component}.use_rslora"):
        return float(alpha) * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    return float(alpha)


def _peft_pattern_matches(pattern: str, module: str, component: str) -> bool:
    """peft's rule: the pattern matches the whole name or a dotted suffix of it (`^` anchors at the start)."""
    names = [module] if component == "unet" else [module, module.removeprefix(TE_PREFIX)]
    return any(re.match(rf"(.*\.)?({pattern})$", n) for n in names)


# --- math -------------------------------------------------------------------------------------------------

def lora_delta(module: LoraModule, strength: float = 1.0, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """strength * (alpha / rank) * up @ [mid] @ down, shaped like the adapted weight."""
    return add_lora(torch.zeros(module.delta_shape, dtype=dtype, device=device), module, strength)


def add_lora(weight: torch.Tensor, module: LoraModule, strength: float = 1.0) -> torch.Tensor:
    """`weight` + the module's delta, accumulated in place in `weight`'s dtype and device (returned).

    One fused multiply-add per module (`addmm_`), so merging needs no delta-sized temporary.
    """
    dtype, device = weight.dtype, weight.device
    down = module.down.load().to(device=device, dtype=dtype)
    up = module.up.load().to(device=device, dtype=dtype).reshape(module.up.shape[0], -1)
    if module.mid is not None:
        # LoCon/Tucker: down (r, in, 1, 1), mid (r, r, kh, kw) -> one (r, in, kh, kw) factor.
        mid = module.mid.load().to(device=device, dtype=dtype)
        down = torch.einsum("abhw,bi->aihw", mid, down.reshape(down.shape[0], -1))
    flat = weight.view(weight.shape[0], -1)
    flat.addmm_(up, down.reshape(down.shape[0], -1), alpha=strength * module.scale)
    return weight


# --- writing ----------------------------------------------------------------------------------------------

def write_lora(modules: Iterable[LoraModule], out: Path | str, format: str = "kohya",
               metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> str:
    """Write modules as a kohya file (diffusers module names, like the official Lightning files) or as a
    peft/diffusers file (`load_lora_weights` format; alphas in diffusers' adapter metadata). Returns the data
    sha256. Weights are byte-copied from their source."""
    modules = sorted(modules, key=lambda m: (LORA_COMPONENTS.index(m.component), m.module))
    metadata = dict(metadata or {})
    tensors: dict[str, LazyTensor] = {}
    if format == "kohya":
        metadata.pop(PEFT_METADATA_KEY, None)
        for m in modules:
            stem = _KOHYA_WRITE_PREFIX[m.component] + m.module.replace(".", "_")
            tensors[stem + ".lora_down.weight"] = m.down
            tensors[stem + ".lora_up.weight"] = m.up
            if m.mid is not None:
                tensors[stem + ".lora_mid.weight"] = m.mid
            if m.alpha is not None:
                tensors[stem + ".alpha"] = _scalar(m.alpha, m.down.dtype)
    elif format == "peft":
        for m in modules:
            if m.mid is not None:
                raise UserError(f"{m.name}: LoCon mid weights have no peft/diffusers form; keep this LoRA as kohya")
            tensors[f"{m.component}.{m.module}.lora_A.weight"] = m.down
            tensors[f"{m.component}.{m.module}.lora_B.weight"] = m.up
        metadata.pop(PEFT_METADATA_KEY, None)
        if any(m.alpha is not None for m in modules):
            metadata[PEFT_METADATA_KEY] = json.dumps(_peft_config(modules), indent=2, sort_keys=True)
    else:
        raise UserError(f"unknown LoRA format {format!r}; choose kohya or peft")
    return write_file(out, tensors, metadata=provenance.with_data_hash(metadata), overwrite=overwrite)


def _scalar(value: float, dtype: str) -> LazyTensor:
    return LazyTensor(dtype, (), lambda: torch.tensor(value, dtype=dtypes.torch_dtype(dtype)))


def _most_common(values: list) -> object:
    return max(set(values), key=values.count)


def _peft_config(modules: list[LoraModule]) -> dict:
    """LoraConfig fields per component, prefixed like diffusers' `save_lora_weights` (`unet.r`, ...).

    Ranks and alphas that differ from the component's most common one go to rank_pattern/alpha_pattern. peft
    matches names and patterns as dotted suffixes: UNet patterns are anchored (`^`), text encoder names drop
    `text_model.` so they fit `CLIPTextModel` with and without that level.
    """
    config: dict[str, object] = {}
    for component in LORA_COMPONENTS:
        mods = [m for m in modules if m.component == component]
        if not mods:
            continue
        names = {m.module: m.module if component == "unet" else m.module.removeprefix(TE_PREFIX) for m in mods}
        anchor = "^" if component == "unet" else ""
        r = _most_common([m.rank for m in mods])
        alphas = {m.module: m.rank if m.alpha is None else m.alpha for m in mods}
        lora_alpha = _most_common(list(alphas.values()))
        config |= {
            f"{component}.r": r,
            f"{component}.lora_alpha": lora_alpha,
            f"{component}.rank_pattern": {anchor + re.escape(names[m.module]): m.rank for m in mods if m.rank != r},
            f"{component}.alpha_pattern": {anchor + re.escape(names[k]): a for k, a in alphas.items() if a != lora_alpha},
            f"{component}.target_modules": list(names.values()),
        }
    return config


def lightning_target_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet modules the official Lightning LoRAs adapt: 788 on SDXL (attention, proj, ff, resnet convs and
    time projections, conv shortcuts, down/upsampler convs)."""
    leaves = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
              "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
    blocks = ("down_blocks.", "up_blocks.", "mid_block.")
    return [(name, m) for name, m in unet.named_modules()
            if name.startswith(blocks) and name.endswith(leaves) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
