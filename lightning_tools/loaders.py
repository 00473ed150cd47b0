"""Which programs apply a LoRA file, module by module: diffusers, ComfyUI, Forge and the A1111 WebUI.

Each loader finds a LoRA module by the name the file gives it and by its weight-key suffix, and reads alpha from
one place only. A module it cannot name is dropped (ComfyUI logs "lora key not loaded"; A1111 and Forge say
nothing at the default log level), and an alpha kept where it does not look means scale 1 instead of alpha/rank.
The tables below are each loader's SDXL rules, read from its source and written as data, limited to the name
forms our reader accepts (kohya `lora_unet_`/`lora_te*_` and peft `unet.`/`text_encoder*.` names). Everything
here works from the file's header, our reader's normal form and the bundled SDXL key shapes: no torch.

Sources read (versions):
- diffusers 0.42.1 (installed): loaders/lora_pipeline.py `StableDiffusionXLLoraLoaderMixin.load_lora_weights` and
  `.lora_state_dict`; loaders/lora_conversion_utils.py `_maybe_map_sgm_blocks_to_diffusers`,
  `_convert_non_diffusers_lora_to_diffusers`, `_convert_unet_lora_key`; utils/state_dict_utils.py.
- ComfyUI (comfyanonymous/ComfyUI, weight-adapter era, the 0.3.x line the issue reports on; the SDXL rules are
  unchanged since commit 41444b5): comfy/lora.py `model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`;
  comfy/utils.py `unet_to_diffusers`; comfy/weight_adapter/lora.py `LoRAAdapter.load`/`calculate_weight`
  (commit 0323d87).
- Forge (lllyasviel/stable-diffusion-webui-forge dfdcbab, 2025-06-26): extensions-builtin/sd_forge_lora/networks.py
  `load_lora_for_models`; packages_3rdparty/comfyui_lora_collection/lora.py (its copy of ComfyUI's key maps).
- A1111 (AUTOMATIC1111/stable-diffusion-webui 1.10): extensions-builtin/Lora/networks.py `load_network`,
  `convert_diffusers_name_to_compvis`, `network_apply_weights`; network.py `NetworkModule.calc_scale`;
  network_lora.py `ModuleTypeLora`.
"""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING, Literal

from lightning_tools.sdxl.vocabulary import COMPONENTS, LORA_COMPONENTS

if TYPE_CHECKING:
    from lightning_tools.lora import LoraFile

Loader = Literal["diffusers", "comfyui", "forge", "a1111"]
LOADERS: tuple[Loader, ...] = ("diffusers", "comfyui", "forge", "a1111")
LOADER_NAMES: dict[Loader, str] = {"diffusers": "diffusers load_lora_weights", "comfyui": "ComfyUI LoraLoader",
                                   "forge": "Forge", "a1111": "A1111 WebUI"}
# "alpha/rank": the loader reads alpha where this file keeps it; "ignored": it does not (scale 1 instead);
# "n/a": the file keeps no alpha (alpha = rank, scale 1 everywhere) or the loader applies nothing.
Alpha = Literal["alpha/rank", "ignored", "n/a"]
AlphaPlace = Literal["key", "metadata"]

# The down-weight key suffixes (`<stem><suffix>`) of the files we read: kohya, peft, and two older diffusers forms.
_KOHYA, _PEFT, _DOT, _LINEAR_LAYER = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight",
                                      ".lora_linear_layer.down.weight")
_MID = ".lora_mid.weight"
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
_DIFFUSERS_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
# The six per-layer projections of a CLIP encoder layer (ComfyUI's LORA_CLIP_MAP; A1111's lora_te2_ rule).
_CLIP_LAYER = r"text_model\.encoder\.layers\.\d+\.(mlp\.fc1|mlp\.fc2|self_attn\.(q|k|v|out)_proj)"

# Down-weight suffixes each loader reads, per component. diffusers: kohya files through its kohya conversion,
# peft files through utils/state_dict_utils.py (UNet: UNET_TO_DIFFUSERS turns `.lora.down` into `.lora_A`;
# text encoders: DIFFUSERS_TO_PEFT turns `.lora_linear_layer.down` into `.lora_A`, not `.lora.down`).
# ComfyUI and Forge: LoRAAdapter.load's regular, diffusers2, diffusers3 and transformers forms. A1111:
# ModuleTypeLora (lora_up/down, lora_A/B).
_TE = tuple(c for c in LORA_COMPONENTS if c != "unet")
_SUFFIXES: dict[Loader, dict[str, frozenset[str]]] = {
    "diffusers": {"unet": frozenset({_KOHYA, _PEFT, _DOT, _LINEAR_LAYER}),
                  **{c: frozenset({_KOHYA, _PEFT, _LINEAR_LAYER}) for c in _TE}},
    "comfyui": {c: frozenset({_KOHYA, _PEFT, _DOT, _LINEAR_LAYER}) for c in LORA_COMPONENTS},
    "forge": {c: frozenset({_KOHYA, _PEFT, _DOT, _LINEAR_LAYER}) for c in LORA_COMPONENTS},
    "a1111": {c: frozenset({_KOHYA, _PEFT}) for c in LORA_COMPONENTS},
}

# The module names each loader maps, per component: (module pattern, stem templates). A module of the file is
# applied when its stem is one of the templates filled with its spellings (see `_spellings`); a template whose
# spelling is None does not apply to that module.
_Rows = tuple[tuple[str, str, tuple[str, ...]], ...]
_NAMES: dict[Loader, _Rows] = {
    # lora_pipeline.py lora_state_dict: all-kohya files go through _convert_non_diffusers_lora_to_diffusers
    # (diffusers or single-file names, `lora_te_`/`lora_te1_` -> text_encoder); anything else is peft. Either way
    # names end up matched on the model's modules the way peft does, as dotted suffixes, so text encoder names may
    # have the `text_model.` level or not.
    "diffusers": (
        ("unet", r".+", ("lora_unet_{kohya_flat}", "lora_unet_{single_flat}", "unet.{dotted}")),
        ("text_encoder", r".+", ("lora_te_{flat}", "lora_te1_{flat}", "lora_te_{bare_flat}", "lora_te1_{bare_flat}",
                                 "text_encoder.{dotted}", "text_encoder.{bare}")),
        ("text_encoder_2", r".+", ("lora_te2_{flat}", "lora_te2_{bare_flat}", "text_encoder_2.{dotted}",
                                   "text_encoder_2.{bare}")),
    ),
    # comfy/lora.py model_lora_keys_unet: every UNet weight as `lora_unet_` + its single-file or diffusers name
    # (via unet_to_diffusers, which covers every SDXL weight), and `unet.` + the diffusers name in the old
    # attention-processor spelling (`attn1.processor.to_q`, `attn1.processor.to_out`), so peft names of the
    # attention projections (`attn1.to_q`) are not mapped. model_lora_keys_clip: only the six projections of
    # each encoder layer, as `lora_te_`/`lora_te1_`/`text_encoder.text_model.` (CLIP-L) and `lora_te2_`/
    # `text_encoder_2.text_model.` (bigG), plus bigG's projection as `lora_te2_text_projection`.
    "comfyui": (
        ("unet", r".+", ("lora_unet_{flat}", "lora_unet_{single_flat}", "unet.{processor}")),
        ("text_encoder", _CLIP_LAYER, ("lora_te_{flat}", "lora_te1_{flat}", "text_encoder.{dotted}")),
        ("text_encoder_2", _CLIP_LAYER, ("lora_te2_{flat}", "text_encoder_2.{dotted}")),
        ("text_encoder_2", r"text_projection", ("lora_te2_{flat}",)),
    ),
    # Forge maps keys with its copy of ComfyUI's tables (packages_3rdparty/comfyui_lora_collection/lora.py).
    "forge": (),
    # networks.py load_network: the stem is the key up to its first dot, so peft names (`unet.down_blocks...`)
    # never match. UNet: the diffusers name through convert_diffusers_name_to_compvis (right only where its fixed
    # SD1.5 arithmetic agrees with SDXL, see `_a1111_single`), else `lora_unet_` -> `diffusion_model_`
    # (single-file names). CLIP-L: `lora_te1_text_model_*` -> `0_transformer_text_model_*`. bigG: the six layer
    # projections of `lora_te2_text_model_encoder_layers_*`, renamed to OpenCLIP's. `lora_te_` matches nothing
    # on SDXL, nor does bigG's text_projection (an nn.Parameter in OpenCLIP, not a module).
    "a1111": (
        ("unet", r".+", ("lora_unet_{single_flat}", "lora_unet_{a1111_flat}")),
        ("text_encoder", r"text_model\..+", ("lora_te1_{flat}",)),
        ("text_encoder_2", _CLIP_LAYER, ("lora_te2_{flat}",)),
    ),
}
_NAMES["forge"] = _NAMES["comfyui"]

# Where each loader reads alpha, by file layout ("kohya" keys or "peft" keys). diffusers: `.alpha` keys become
# network_alphas in the kohya conversion; for peft files, LoraConfig from lora_adapter_metadata. ComfyUI/Forge
# (load_lora) and A1111 (NetworkModule.calc_scale): the `<stem>.alpha` key, else scale 1.
_ALPHA_FROM: dict[Loader, dict[str, AlphaPlace]] = {
    "diffusers": {"kohya": "key", "peft": "metadata"},
    "comfyui": {"kohya": "key", "peft": "key"},
    "forge": {"kohya": "key", "peft": "key"},
    "a1111": {"kohya": "key", "peft": "key"},
}

# diffusers' _convert_unet_lora_key strips the last index from names containing "emb" (meant for single-file
# emb_layers/label_emb), which breaks these diffusers names in kohya files: the modules are silently left out.
_DIFFUSERS_KOHYA_MANGLED = frozenset({"add_embedding.linear_1", "add_embedding.linear_2"})
# Why the usual files lose modules, by loader and file layout.
_COMFYUI_PEFT = ("peft UNet attention is mapped only in the old attention-processor spelling (attn1.processor.to_q), "
                 "CLIP-L only with its text_model level")
_HINTS: dict[tuple[Loader, str], str] = {
    ("comfyui", "peft"): _COMFYUI_PEFT,
    ("forge", "peft"): _COMFYUI_PEFT,
    ("a1111", "peft"): "it reads kohya names only (it takes each key's name up to its first dot)",
    ("a1111", "kohya"): "it places diffusers-named UNet blocks by SD1.5's layout; single-file names work",
}
# diffusers guesses each text encoder's key format (utils/state_dict_utils.py convert_state_dict_to_diffusers and
# _to_peft): after its kohya renaming, an out_proj module marks the old diffusers format and an MLP module the new
# one; in peft files, `lora_A` or `lora_linear_layer` keys. A text encoder with no marker makes load_lora_weights
# refuse the file, and in the new format the q/k/v modules stay in the old spelling and are silently left out.
_DIFFUSERS_OLD_MARK = (".self_attn.out_proj",)
_DIFFUSERS_NEW_MARK = (".mlp.fc1", ".mlp.fc2")
_DIFFUSERS_OLD_ONLY = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj")
# Forge skips the whole LoRA when more than this many keys match nothing (networks.py load_lora_for_models).
_FORGE_UNMATCHED_LIMIT = 12
# A1111 applies bigG's q/k/v/out LoRAs to OpenCLIP's fused attention only as a set of four per layer
# (network_apply_weights, MultiheadAttention branch); any other subset is dropped.
_A1111_FUSED_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")

# A1111's convert_diffusers_name_to_compvis for the UNet, on dotted names: SD1.5's layout (three input and three
# output blocks per level, attention at index 1, the level-0 upsampler at index 1) whatever the model. On SDXL
# that puts up_blocks.0.upsamplers.0.conv at output_blocks.2.1.conv (SDXL has it at output_blocks.2.2.conv), and
# add_embedding matches no row.
_A1111_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "norm1": "in_layers.0", "norm2": "out_layers.0",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_A1111_UNET: tuple[tuple[str, Callable[..., str]], ...] = (
    (r"conv_in", lambda: "input_blocks.0.0"),
    (r"conv_out", lambda: "out.2"),
    (r"time_embedding\.linear_(\d+)", lambda n: f"time_embed.{int(n) * 2 - 2}"),
    (r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)",
     lambda lvl, kind, j, rest: f"input_blocks.{1 + int(lvl) * 3 + int(j)}.{_a1111_part(kind, rest)}"),
    (r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)",
     lambda kind, j, rest: f"middle_block.{1 if kind == 'attentions' else int(j) * 2}.{_a1111_rest(kind, rest)}"),
    (r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)",
     lambda lvl, kind, j, rest: f"output_blocks.{int(lvl) * 3 + int(j)}.{_a1111_part(kind, rest)}"),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda lvl: f"input_blocks.{3 + int(lvl) * 3}.0.op"),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
     lambda lvl: f"output_blocks.{2 + int(lvl) * 3}.{2 if int(lvl) > 0 else 1}.conv"),
)


def _a1111_rest(kind: str, rest: str) -> str:
    return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def _a1111_part(kind: str, rest: str) -> str:
    """A block's sub-module: attention at index 1, resnet at index 0 (with resnet layer renames)."""
    return f"{1 if kind == 'attentions' else 0}.{_a1111_rest(kind, rest)}"


def _a1111_single(module: str) -> str | None:
    """The single-file name A1111 gives a diffusers UNet module name (None: no rule matches)."""
    for pattern, build in _A1111_UNET:
        match = re.fullmatch(pattern, module)
        if match:
            return build(*match.groups())
    return None


# --- results ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoaderCoverage:
    """What one loader does with one LoRA file.

    `dropped` names every module it leaves out, as the file spells them; `wrong_scale` counts the applied modules
    whose scale differs from alpha/rank (alpha not read); `complete`: every module applied at alpha/rank;
    `refused`: why the loader rejects the whole file (an error, not a partial load), when it does.
    """

    loader: Loader
    modules: int
    applied: int
    dropped: tuple[str, ...]
    alpha: Alpha
    wrong_scale: int
    complete: bool
    note: str
    refused: str | None = None

    def to_json(self, examples: int = 5) -> dict:
        return {"loader": self.loader, "name": LOADER_NAMES[self.loader], "modules": self.modules,
                "applied": self.applied, "dropped": len(self.dropped),
                "dropped_examples": list(self.dropped[:examples]), "alpha": self.alpha,
                "wrong_scale": self.wrong_scale, "complete": self.complete, "refused": self.refused, "note": self.note}


@dataclass(frozen=True)
class ComfyUIAdvice:
    """Why ComfyUI's LoraLoader would not apply a LoRA as meant, and the kohya copy that it loads completely
    (`copy` and `command` are None when no format we write fixes it)."""

    problem: str
    copy: Path | None
    command: str | None

    def __str__(self) -> str:
        fix = f"make a kohya copy for ComfyUI: {self.command}" if self.command else "no format we write fixes this"
        return f"{self.problem}; {fix}"


# --- the file as loaders see it -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Module:
    name: str                    # the stem, as the file spells it
    component: str | None        # None: the name adapts nothing in SDXL
    module: str | None           # diffusers (UNet) or Hugging Face (text encoders, with `text_model.`) name
    suffix: str                  # its down weight's key suffix
    keys: int                    # its tensors in the file
    alpha_at: AlphaPlace | None  # where the file keeps its alpha (None: alpha = rank)
    scale: float                 # alpha / rank, as meant


@dataclass(frozen=True)
class _File:
    path: Path
    layout: Literal["kohya", "peft"]
    modules: tuple[_Module, ...]
    keys: frozenset[str]


@lru_cache(maxsize=1)
def _sdxl() -> tuple[dict[str, frozenset[str]], Callable[[str], str | None]]:
    """SDXL base's weight-owning module names per component (text encoders with `text_model.`) and its UNet's
    diffusers -> single-file renaming, from the bundled key shapes and config: no model is built, no torch."""
    import json

    from lightning_tools.sdxl import SDXL_BASE_CONFIGS
    from lightning_tools.sdxl.detect import SHAPES_FILE
    from lightning_tools.sdxl.keys import unet_names

    shapes = json.loads(SHAPES_FILE.read_text())
    names = {c: frozenset(k.removesuffix(".weight") for k in shapes[c] if k.endswith(".weight"))
             for c in LORA_COMPONENTS}
    return names, unet_names(json.loads((SDXL_BASE_CONFIGS / "unet" / "config.json").read_text())).to_single


def _as_loaders_see_it(lora: LoraFile) -> _File:

    keys = lora.keys
    sdxl, _ = _sdxl()
    modules = []
    for m in lora.modules:
        known = m.module in sdxl[m.component]
        has_alpha_key = m.name + ".alpha" in keys
        factors = [t for t in (getattr(m.factors, f) for f in m.factors.KOHYA) if t is not None]
        first = factors[0].stored.name.removeprefix(m.name) if factors[0].stored is not None else ""
        modules.append(_Module(m.name, m.component if known else None, m.module if known else None, first,
                               len(factors) + has_alpha_key,
                               "key" if has_alpha_key else ("metadata" if m.alpha is not None else None), m.scale))
    # Unresolved names come from kohya files, whose stems hold no dot.
    modules += [_Module(stem, None, None, "", sum(k.partition(".")[0] == stem for k in keys), None, 1.0)
                for stem in lora.unresolved]
    return _File(lora.path, "peft" if lora.format == "peft" else "kohya", tuple(modules), keys)


def _as_kohya(f: _File) -> _File:
    """The file as `convert --to kohya` would write it (write_lora: kohya keys, diffusers names, `.alpha` keys)."""
    modules = tuple(_Module(COMPONENTS[m.component].kohya_prefixes[0] + m.module.replace(".", "_"), m.component,
                            m.module, _KOHYA, 2 + (m.alpha_at is not None), "key" if m.alpha_at else None, m.scale)
                    for m in f.modules)
    keys = frozenset(m.name + suffix for m in modules
                     for suffix in (_KOHYA, ".lora_up.weight", *([".alpha"] if m.alpha_at else [])))
    return _File(f.path, "kohya", modules, keys)


@dataclass(frozen=True)
class _Spellings:
    dotted: str
    flat: str
    bare: str | None         # a text encoder name without `text_model.`
    bare_flat: str | None
    single_flat: str | None  # the UNet module's single-file name, underscored
    processor: str | None    # ComfyUI's old attention-processor spelling of a UNet name
    kohya_flat: str | None   # the diffusers name, where diffusers' kohya conversion reads it right
    a1111_flat: str | None   # the diffusers name, where A1111's conversion reads it right


def _spellings(component: str, module: str, to_single: Callable[[str], str | None]) -> _Spellings:
    flat = module.replace(".", "_")
    if component != "unet":
        bare = module.removeprefix("text_model.")
        return _Spellings(module, flat, bare, bare.replace(".", "_"), None, None, None, None)
    single = to_single(module)
    processor = module.replace(".to_", ".processor.to_")
    return _Spellings(module, flat, None, None, single.replace(".", "_") if single else None,
                      processor[:-2] if processor.endswith(".to_out.0") else processor,
                      None if module in _DIFFUSERS_KOHYA_MANGLED else flat,
                      flat if single is not None and _a1111_single(module) == single else None)


def _names(loader: Loader, component: str, spellings: _Spellings) -> set[str]:
    """The stems `loader` maps to this module."""
    fields = vars(spellings)
    names = set()
    for row_component, pattern, templates in _NAMES[loader]:
        if row_component == component and re.fullmatch(pattern, spellings.dotted):
            for template in templates:
                used = [name for _, name, _, _ in Formatter().parse(template) if name]
                if all(fields[name] is not None for name in used):
                    names.add(template.format(**fields))
    return names


# --- per-loader verdicts ------------------------------------------------------------------------------------

def _applied(loader: Loader, f: _File) -> list[bool]:
    _, to_single = _sdxl()
    verdicts = []
    for m in f.modules:
        ok = m.module is not None and m.suffix in _SUFFIXES[loader][m.component]
        verdicts.append(ok and m.name in _names(loader, m.component, _spellings(m.component, m.module, to_single)))
    if loader == "diffusers" and f.layout == "kohya":
        mixed = _mixes_block_names(f.keys)
        new_form = {c for c in _TE if _diffusers_text_encoder_form(f, c) == "new"}
        verdicts = [v and not (mixed and any(p in m.name for p in _SGM_BLOCKS))
                    and not (m.component in new_form and m.module.endswith(_DIFFUSERS_OLD_ONLY))
                    for v, m in zip(verdicts, f.modules)]
    if loader == "a1111":
        verdicts = _a1111_fused_attention(f.modules, verdicts)
    return verdicts


def _mixes_block_names(keys: Iterable[str]) -> bool:
    """diffusers' _maybe_map_sgm_blocks_to_diffusers drops the single-file-named keys of a file that has both."""
    keys = list(keys)
    return any(p in k for k in keys for p in _SGM_BLOCKS) and any(p in k for k in keys for p in _DIFFUSERS_BLOCKS)


def _diffusers_text_encoder_form(f: _File, component: str) -> str | None:
    """The key format diffusers infers for one text encoder's modules (None: it cannot tell)."""
    modules = [m for m in f.modules if m.component == component]
    if f.layout == "peft":
        return "peft" if any(m.suffix in (_PEFT, _LINEAR_LAYER) for m in modules) else None
    if any(m.module.endswith(_DIFFUSERS_OLD_MARK) for m in modules):
        return "old"
    return "new" if any(m.module.endswith(_DIFFUSERS_NEW_MARK) for m in modules) else None


def _a1111_fused_attention(modules: tuple[_Module, ...], verdicts: list[bool]) -> list[bool]:
    """bigG's q/k/v/out of one layer apply together or not at all."""
    layers: dict[str, list[int]] = {}
    for i, m in enumerate(modules):
        if m.component == "text_encoder_2" and m.module.endswith(_A1111_FUSED_ATTENTION):
            layers.setdefault(m.module.rsplit(".", 2)[0], []).append(i)
    verdicts = list(verdicts)
    for indices in layers.values():
        whole = len(indices) == len(_A1111_FUSED_ATTENTION) and all(verdicts[i] for i in indices)
        for i in indices:
            verdicts[i] = whole
    return verdicts


def _refusal(loader: Loader, f: _File) -> str | None:
    """Why `loader` refuses the whole file, if it does."""
    if loader == "diffusers":
        if f.layout == "peft":
            odd = next((k for k in sorted(f.keys) if "lora" not in k), None)
            if odd:
                return f"load_lora_weights refuses keys without 'lora' in their name ({odd})"
        mid = next((k for k in sorted(f.keys) if k.endswith(_MID)), None)
        if f.layout == "kohya" and mid:
            return f"its kohya conversion does not take LoCon mid weights ({mid})"
        for component in _TE:
            if any(m.component == component for m in f.modules) and _diffusers_text_encoder_form(f, component) is None:
                need = "an out_proj or MLP module" if f.layout == "kohya" else "lora_A or lora_linear_layer keys"
                return f"load_lora_weights cannot tell the format of the {component} keys (it needs {need})"
    return None


def _coverage(loader: Loader, f: _File) -> LoaderCoverage:
    refusal = _refusal(loader, f)
    verdicts = [False] * len(f.modules) if refusal else _applied(loader, f)
    notes = [f"it refuses the file: {refusal}"] if refusal else []
    unknown = [m.name for m in f.modules if m.module is None]
    if unknown:
        notes.append(f"SDXL has no module for {_modules(len(unknown))} (e.g. {unknown[0]})")
    unnamed = [m.name for m, ok in zip(f.modules, verdicts) if not ok and m.module is not None]
    if unnamed and not refusal:
        hint = _HINTS.get((loader, f.layout))
        notes.append(f"it maps no module named like {unnamed[0]} ({_modules(len(unnamed))})"
                     + (f": {hint}" if hint else ""))
    unmatched = sum(m.keys for m, ok in zip(f.modules, verdicts) if not ok)
    if loader == "forge" and unmatched > _FORGE_UNMATCHED_LIMIT and any(verdicts):
        notes.append(f"it skips the whole LoRA when more than {_FORGE_UNMATCHED_LIMIT} keys match nothing "
                     f"({unmatched} here)")
        verdicts = [False] * len(f.modules)
    applied = [m for m, ok in zip(f.modules, verdicts) if ok]
    with_alpha = [m for m in applied if m.alpha_at is not None]
    ignored = [m for m in with_alpha if m.alpha_at != _ALPHA_FROM[loader][f.layout]]
    wrong = [m for m in ignored if not math.isclose(m.scale, 1.0, rel_tol=1e-6)]
    if wrong:
        scale = Counter(m.scale for m in wrong).most_common(1)[0][0]
        where = "lora_adapter_metadata" if wrong[0].alpha_at == "metadata" else "`.alpha` keys"
        notes.append(f"it does not read alpha from {where}: {_modules(len(wrong))} load at scale 1 instead of "
                     f"alpha/rank {scale:g} ({1 / scale:.3g}x as strong)")
    alpha: Alpha = "n/a" if not with_alpha else ("ignored" if ignored else "alpha/rank")
    dropped = tuple(m.name for m, ok in zip(f.modules, verdicts) if not ok)
    return LoaderCoverage(loader, len(f.modules), len(applied), dropped, alpha, len(wrong),
                          len(applied) == len(f.modules) and not wrong, "; ".join(notes), refusal)


def _modules(n: int) -> str:
    return f"{n} module{'' if n == 1 else 's'}"


# --- public API ---------------------------------------------------------------------------------------------

def coverage(lora: LoraFile) -> dict[Loader, LoaderCoverage]:
    """Per loader: how many of the file's modules it applies, which it drops, and whether it scales by alpha/rank.

    Header-only: the verdicts come from the key names, the file's metadata and the loaders' published SDXL rules.
    """
    f = _as_loaders_see_it(lora)
    return {loader: _coverage(loader, f) for loader in LOADERS}


def kohya_copy(src: Path | str) -> Path:
    """Where `comfyui_ready` suggests writing a kohya copy of `src`: next to it, `<name>_kohya.safetensors`."""
    src = Path(src)
    return src.with_name(src.name.removesuffix(".safetensors") + "_kohya.safetensors")


def comfyui_ready(lora: LoraFile) -> ComfyUIAdvice | None:
    """None when ComfyUI's LoraLoader applies every module of `lora` at alpha/rank; else what goes wrong and, when
    a kohya copy fixes it, the exact `lightning-tools convert` command that writes one."""
    f = _as_loaders_see_it(lora)
    now = _coverage("comfyui", f)
    if now.complete:
        return None
    problem = f"{lora.path}: ComfyUI's LoraLoader would apply {now.applied} of its {now.modules} modules; {now.note}"
    if any(m.module is None for m in f.modules) or not _coverage("comfyui", _as_kohya(f)).complete:
        return ComfyUIAdvice(problem, None, None)
    out = kohya_copy(lora.path)
    command = f"lightning-tools convert {shlex.quote(str(lora.path))} --to kohya --out {shlex.quote(str(out))}"
    return ComfyUIAdvice(problem, out, command)


def describe(coverages: Mapping[Loader, LoaderCoverage]) -> str:
    """One line for people: `diffusers load_lora_weights all 788; ComfyUI LoraLoader 228/788, alpha ignored; ...`."""
    parts = []
    for c in coverages.values():
        applied = f"all {c.modules}" if c.applied == c.modules else f"{c.applied}/{c.modules}"
        parts.append(f"{LOADER_NAMES[c.loader]} {applied}" + (", alpha ignored" if c.wrong_scale else ""))
    return "; ".join(parts)
