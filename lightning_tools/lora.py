"""LoRA files in every common SDXL format and variant, read lazily into one normal form per target module.

Formats: kohya keys with diffusers module names (the official Lightning LoRAs), kohya keys with single-file
(sgm) module names and `lora_te1_`/`lora_te2_` text encoders, and peft/diffusers (`unet.<module>.lora_A.weight`,
what `save_lora_weights` writes and `load_lora_weights` reads). kohya flattens module names with underscores,
which is ambiguous (`to_out_0`, `transformer_blocks_0`), so names are resolved against the real module names of
the target model, never guessed from the string.

Variants, with kohya keys as lycoris-lora saves them (`lycoris/modules/*.py`, `custom_state_dict`) and ComfyUI
reads them (`comfy/weight_adapter/*.py`): plain LoRA and LoCon (`lora_down`/`lora_up`, Tucker `lora_mid`), LoHa
(`hada_*`), LoKr (`lokr_*`), the full difference (`diff`, bias `diff_b`), the first three optionally with DoRA
(`dora_scale`; peft `lora_magnitude_vector`), and peft's LoRA bias (`lora_B.bias`). The other LyCORIS algorithms
are refused by name, and so is any key of no known kind: nothing is skipped silently.

Text encoder modules are named in the classic Hugging Face form, with the `text_model.` prefix
(`text_model.encoder.layers.0.self_attn.q_proj`; `text_projection` has none), as `checkpoint` names their keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from lightning_tools import dtypes, provenance
from lightning_tools.errors import UserError
from lightning_tools.sdxl.detect import base_config, expected_shapes
from lightning_tools.sdxl.keys import hf_clip_key, reshaped, unet_names
from lightning_tools.sdxl.vocabulary import LORA_COMPONENTS
from lightning_tools.stream import LazyTensor, constant, write_file
from lightning_tools.tensors import SafetensorsFile, read_scalars

if TYPE_CHECKING:
    import torch

TE_PREFIX = "text_model."
# diffusers keeps peft adapter settings (r, lora_alpha, alpha_pattern, ...) in this metadata key.
PEFT_METADATA_KEY = "lora_adapter_metadata"

_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}
_KOHYA_WRITE_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_PEFT_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
               ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
               ".lora_linear_layer.up.weight": "up", ".alpha": "alpha", ".lora_B.bias": "bias",
               ".lora_magnitude_vector": "dora", ".lora_magnitude_vector.weight": "dora"}
_SINGLE_FILE_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


# --- the normal form --------------------------------------------------------------------------------------

class _Inconsistent(ValueError):
    """Factor shapes that make no weight; the reader turns it into a one-line UserError naming the module."""


@dataclass(frozen=True)
class LowRank:
    """LoRA and LoCon: delta = up @ down; with LoCon's Tucker core `mid` (k x k convs) up @ (mid * down).

    A k x k conv LoRA is down (r, in, k, k) then up (out, r, 1, 1); with `mid` it is down (r, in, 1, 1), mid
    (r, r, k, k), up (out, r, 1, 1) (kohya sd-scripts networks/lora.py, lycoris modules/locon.py).
    """

    down: LazyTensor
    up: LazyTensor
    mid: LazyTensor | None = None

    KOHYA: ClassVar[dict[str, str]] = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def variant(self) -> str:
        return "LoRA" if self.mid is None else "LoCon with a Tucker mid weight"

    def shape(self) -> tuple[int, ...]:
        down, up = self.down.shape, self.up.shape
        inner = self.mid.shape[:2] if self.mid else (down[0], down[0])
        if len(down) not in (2, 4) or len(up) != len(down) or up[1] != inner[0] or inner[1] != down[0] \
                or (len(up) == 4 and up[2:] != (1, 1)) or (self.mid and (len(down) != 4 or down[2:] != (1, 1))):
            raise _Inconsistent(f"down {list(down)}, up {list(up)}"
                                + (f", mid {list(self.mid.shape)}" if self.mid else ""))
        kernel = (self.down if self.mid is None else self.mid).shape[2:]
        return (up[0], down[1], *kernel) if len(up) == 4 else (up[0], down[1])

    def matrices(self, dtype: torch.dtype, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as matrices with up @ down = delta flattened to (out, -1)."""
        import torch

        down = self.down.load().to(device=device, dtype=dtype)
        up = self.up.load().to(device=device, dtype=dtype).reshape(self.up.shape[0], -1)
        if self.mid is not None:
            mid = self.mid.load().to(device=device, dtype=dtype)
            down = torch.einsum("abhw,bi->aihw", mid, down.reshape(down.shape[0], -1))
        return up, down.reshape(down.shape[0], -1)

    def delta(self, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        up, down = self.matrices(dtype, device)
        return (up @ down).reshape(self.shape())


@dataclass(frozen=True)
class Hadamard:
    """LoHa: delta = (w1a @ w1b) * (w2a @ w2b), elementwise (lycoris functional/loha.py).

    Without Tucker cores a conv's factors are flattened: w1b (r, in * k * k). With them (k x k convs) each half
    is t (r, r, k, k) contracted with a (r, out) and b (r, in).
    """

    w1a: LazyTensor
    w1b: LazyTensor
    w2a: LazyTensor
    w2b: LazyTensor
    t1: LazyTensor | None = None
    t2: LazyTensor | None = None

    KOHYA: ClassVar[dict[str, str]] = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a",
                                       "w2b": "hada_w2_b", "t1": "hada_t1", "t2": "hada_t2"}

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def variant(self) -> str:
        return "LoHa" if self.t1 is None else "LoHa with Tucker cores"

    def shape(self) -> tuple[int, ...]:
        if (self.t1 is None) != (self.t2 is None):
            raise _Inconsistent("has one Tucker core (hada_t1/hada_t2) without the other")
        shapes = []
        for a, b, t in ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)):
            if t is None:
                ok = len(a.shape) == 2 and len(b.shape) >= 2 and a.shape[1] == b.shape[0]
                shapes.append((a.shape[0], *b.shape[1:]))
            else:
                ok = len(a.shape) == len(b.shape) == 2 and len(t.shape) >= 3 and \
                    a.shape[0] == b.shape[0] == t.shape[0] == t.shape[1]
                shapes.append((a.shape[-1], b.shape[-1], *t.shape[2:]))
            if not ok or shapes[0] != shapes[-1]:
                raise _Inconsistent(", ".join(f"{n} {list(x.shape)}" for n, x in vars(self).items() if x))
        return shapes[0]

    def delta(self, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        import torch

        shape = self.shape()
        halves = []
        for a, b, t in ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)):
            a, b = (x.load().to(device=device, dtype=dtype) for x in (a, b))
            if t is None:
                halves.append((a @ b.reshape(b.shape[0], -1)).reshape(shape))
            else:
                halves.append(torch.einsum("ij...,jr,ip->pr...", t.load().to(device=device, dtype=dtype), b, a))
        return halves[0].mul_(halves[1])


@dataclass(frozen=True)
class Kronecker:
    """LoKr: delta = kron(w1, w2) (lycoris functional/lokr.py). Each factor is stored whole (`lokr_w1`) or as a
    low-rank product (`lokr_w1_a @ lokr_w1_b`); w2 of a k x k conv may be whole (b, d, k, k), flattened
    (w2b (r, d * k * k)) or a Tucker core t2 (r, r, k, k) with w2a (r, b) and w2b (r, d)."""

    w1: LazyTensor | None = None
    w1a: LazyTensor | None = None
    w1b: LazyTensor | None = None
    w2: LazyTensor | None = None
    w2a: LazyTensor | None = None
    w2b: LazyTensor | None = None
    t2: LazyTensor | None = None

    KOHYA: ClassVar[dict[str, str]] = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2",
                                       "w2a": "lokr_w2_a", "w2b": "lokr_w2_b", "t2": "lokr_t2"}

    @property
    def rank(self) -> int | None:
        """The low-rank factor's inner size (w2's when both are low-rank, as ComfyUI takes it); None when both
        factors are whole, and lycoris then scales by 1 whatever alpha says."""
        if self.w2 is None and self.w2b is not None:
            return self.w2b.shape[0]
        return self.w1b.shape[0] if self.w1 is None and self.w1b is not None else None

    @property
    def variant(self) -> str:
        return "LoKr" if self.t2 is None else "LoKr with a Tucker core"

    def shape(self) -> tuple[int, ...]:
        def fail(why: str):
            return _Inconsistent(why + " (" + ", ".join(f"{k} {list(t.shape)}" for k, t in vars(self).items() if t)
                                 + ")")

        if (self.w1 is None) == (self.w1a is None or self.w1b is None) or (self.w1 and (self.w1a or self.w1b)):
            raise fail("needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if (self.w2 is None) == (self.w2a is None or self.w2b is None) or (self.w2 and (self.w2a or self.w2b)) \
                or (self.t2 and self.w2):
            raise fail("needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        if self.w1 is not None:
            w1 = self.w1.shape
        elif self.w1a.shape[1] == self.w1b.shape[0] and len(self.w1a.shape) == len(self.w1b.shape) == 2:
            w1 = (self.w1a.shape[0], self.w1b.shape[1])
        else:
            raise fail("lokr_w1_a and lokr_w1_b do not multiply")
        if self.w2 is not None:
            w2 = self.w2.shape
        elif self.t2 is not None:
            if not (len(self.w2a.shape) == len(self.w2b.shape) == 2 and len(self.t2.shape) >= 3
                    and self.w2a.shape[0] == self.w2b.shape[0] == self.t2.shape[0] == self.t2.shape[1]):
                raise fail("lokr_t2, lokr_w2_a and lokr_w2_b do not contract")
            w2 = (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        elif len(self.w2a.shape) == 2 and len(self.w2b.shape) >= 2 and self.w2a.shape[1] == self.w2b.shape[0]:
            w2 = (self.w2a.shape[0], *self.w2b.shape[1:])
        else:
            raise fail("lokr_w2_a and lokr_w2_b do not multiply")
        if len(w1) != 2 or len(w2) < 2:
            raise fail("lokr_w1 must be a matrix")
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    def delta(self, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        import torch

        def load(t: LazyTensor) -> torch.Tensor:
            return t.load().to(device=device, dtype=dtype)

        w1 = load(self.w1) if self.w1 is not None else load(self.w1a) @ load(self.w1b)
        if self.w2 is not None:
            w2 = load(self.w2)
        elif self.t2 is not None:
            w2 = torch.einsum("ij...,ip,jr->pr...", load(self.t2), load(self.w2a), load(self.w2b))
        else:
            w2b = load(self.w2b)
            w2 = (load(self.w2a) @ w2b.reshape(w2b.shape[0], -1)).reshape(self.w2a.shape[0], *w2b.shape[1:])
        return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2)


@dataclass(frozen=True)
class FullDiff:
    """LyCORIS `full`: the whole difference, delta = diff (lycoris modules/full.py)."""

    diff: LazyTensor

    KOHYA: ClassVar[dict[str, str]] = {"diff": "diff"}
    rank: ClassVar[None] = None
    variant: ClassVar[str] = "full difference"

    def shape(self) -> tuple[int, ...]:
        return self.diff.shape

    def delta(self, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        return self.diff.load().to(device=device, dtype=dtype)


Factors = LowRank | Hadamard | Kronecker | FullDiff
DoraAxis = Literal["out", "in"]


@dataclass(frozen=True)
class Dora:
    """DoRA's learned magnitude: the merged weight V = W + delta is rescaled to magnitude * V / ||V||, the norm
    taken per output row (`out`: peft, and lycoris' default `wd_on_output`) or per input column (`in`: lycoris
    `wd_on_output=False`, as older LyCORIS files have it). `magnitude` keeps its stored shape."""

    magnitude: LazyTensor
    axis: DoraAxis


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: its factors (one variant), alpha, and optionally DoRA and a bias delta.

    `module` is the diffusers module name within `component`; `name` is what the LoRA file calls it. `bias` is
    added to the module's bias (LyCORIS full `diff_b`, peft `lora_B.bias`), scaled like the weight's delta.
    """

    component: str
    module: str
    factors: Factors
    alpha: float | None = None
    name: str = ""
    dora: Dora | None = None
    bias: LazyTensor | None = None

    @property
    def rank(self) -> int | None:
        """The rank (LyCORIS "dim") alpha is divided by; None for variants without one (full, whole LoKr)."""
        return self.factors.rank

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without alpha (alpha defaults to the rank) or without a rank."""
        rank = self.rank
        return 1.0 if rank is None or self.alpha is None else self.alpha / rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape the factors build: the adapted weight's (out, in) or (out, in, kh, kw), or (out, in * kh * kw)
        for LyCORIS factors of a conv stored flattened."""
        return self.factors.shape()

    @property
    def variant(self) -> str:
        """What the module is, for people: "LoRA", "LoHa with Tucker cores", "LoKr + DoRA", ..."""
        return self.factors.variant + (" + DoRA" if self.dora else "") + (" + bias" if self.bias else "")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file in normal form. `unresolved` holds the file's module names that name no module of the
    architecture they were resolved against (an SD1.5 LoRA read for SDXL, say); `keys` every key of the file."""

    path: Path
    format: str
    modules: list[LoraModule]
    metadata: dict[str, str]
    unresolved: list[str] = field(default_factory=list)
    keys: frozenset[str] = frozenset()


# kohya key suffix -> (factor class, field); the extras belong to any variant.
_KOHYA_FACTORS = {suffix: (cls, name) for cls in (LowRank, Hadamard, Kronecker, FullDiff)
                  for name, suffix in cls.KOHYA.items()}
_KOHYA_EXTRAS = {"alpha", "dora_scale", "diff_b"}
# Other LyCORIS algorithms and adapters (lycoris modules/*.py `weight_list`), refused by name.
_KOHYA_UNSUPPORTED = {"oft_blocks": "OFT/BOFT", "rescale": "OFT/BOFT", "w_norm": "norm-layer", "b_norm": "norm-layer",
                      "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
                      "bm.weight": "GLoRA", "on_input": "(IA)^3", "weight": "(IA)^3", "lambda_layer": "T-LoRA",
                      "q_layer.weight": "T-LoRA", "p_layer.weight": "T-LoRA"}


def detect_lora_format(keys: Iterable[str]) -> str | None:
    """"kohya-diffusers", "kohya-single-file", "peft", or None when the keys are not a LoRA we read."""
    keys = list(keys)
    known = _KOHYA_FACTORS.keys() | _KOHYA_UNSUPPORTED.keys()
    kohya = [k for k in keys if k.startswith(tuple(_KOHYA_PREFIX)) and k.partition(".")[2] in known]
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
    return hf_clip_key(name + ".weight").removesuffix(".weight")


def modules_of_keys(keys: Iterable[str], component: str) -> set[str]:
    """The module names that own a `.weight` among a component's tensor keys, in normal form."""
    names = {k.removesuffix(".weight") for k in keys if k.endswith(".weight")}
    return names if component == "unet" else {te_canonical(n) for n in names}


def module_names(component: str, config: Mapping) -> set[str]:
    """The weight-owning modules of a component described by `config` (SDXL's from the bundled shapes, so
    reading a LoRA needs no model classes)."""
    return modules_of_keys(expected_shapes(component, config), component)


def sdxl_module_names() -> tuple[dict[str, set[str]], dict]:
    """(module names per component, UNet config) of the SDXL base, from the bundled configs."""
    return {c: module_names(c, base_config(c)) for c in LORA_COMPONENTS}, base_config("unet")


class _KohyaNames:
    """kohya's flattened names (`lora_unet_down_blocks_0_...`) -> (component, diffusers module name).

    Built from real module names: diffusers ones, and for the UNet also their single-file equivalents; text
    encoder names with and without `text_model.`.
    """

    def __init__(self, targets: Mapping[str, Collection[str]], unet_config: Mapping | None):
        self._table: dict[str, tuple[str, str]] = {}
        for component, names in targets.items():
            prefixes = [p for p, c in _KOHYA_PREFIX.items() if c == component]
            for name in names:
                # lycoris names CLIPTextModel's modules as transformers >= 5.6 does, without `text_model.`
                spellings = {name, name.removeprefix(TE_PREFIX)} if component != "unet" else {name}
                for prefix in prefixes:
                    for spelling in spellings:
                        self._table[prefix + spelling.replace(".", "_")] = (component, name)
        if unet_config is not None and "unet" in targets:
            to_single = unet_names(unet_config).to_single
            for name in targets["unet"]:
                single_file_name = to_single(name)
                if single_file_name is not None:
                    self._table["lora_unet_" + single_file_name.replace(".", "_")] = ("unet", name)

    def resolve(self, stem: str) -> tuple[str, str] | None:
        return self._table.get(stem)


# --- reading ----------------------------------------------------------------------------------------------

def read_lora(path: Path | str, targets: Mapping[str, Collection[str]] | None = None,
              unet_config: Mapping | None = None, *, source: Mapping | None = None) -> LoraFile:
    """Read a LoRA file lazily (tensor data is loaded only when a delta is computed; alphas are read now).

    `targets`: module names per component to resolve kohya names against (normal form, see `modules_of_keys`),
    with `unet_config` for single-file names; both default to the SDXL base architecture. `source`: the file
    already opened (by `detect`), so its header is not read twice.
    """
    path = Path(path)
    source = SafetensorsFile(path) if source is None else source
    fmt = detect_lora_format(source)
    if fmt is None:
        what = "a full checkpoint (use it as --base)" if any(k.endswith(".weight") for k in source) and \
            not any("lora" in k for k in source) else "no LoRA or LyCORIS weight keys"
        raise UserError(f"not a LoRA file we can read ({what}); expected kohya/LyCORIS or peft/diffusers LoRA keys",
                        path=path)
    if fmt == "peft":
        modules, unresolved = _read_peft(path, source), []
    else:
        _refuse_unsupported(path, source)
        if targets is None:
            targets, unet_config = sdxl_module_names()
        modules, unresolved = _read_kohya(path, source, _KohyaNames(targets, unet_config))
    return LoraFile(path, fmt, modules, dict(source.metadata), unresolved, frozenset(source))


def _refuse_unsupported(path: Path, source: SafetensorsFile) -> None:
    for key in source:
        kind = _KOHYA_UNSUPPORTED.get(key.partition(".")[2])
        if kind:
            raise UserError(f"{kind} weights ({key}) are not supported; LoRA, LoCon, LoHa, LoKr, full "
                            "difference and DoRA can be merged or converted", path=path)


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
        raise UserError(f"{len(unknown)} keys are not LoRA weights of a known kind (e.g. {unknown[0]}); "
                        "is this a LoRA file?", path=path)
    return groups


def _split_kohya(key: str) -> tuple[str, str] | None:
    stem, _, part = key.partition(".")
    known = part in _KOHYA_FACTORS or part in _KOHYA_EXTRAS
    return (stem, part) if known and stem.startswith(tuple(_KOHYA_PREFIX)) else None


def _split_peft(key: str) -> tuple[str, str] | None:
    for suffix, part in _PEFT_PARTS.items():
        if key.endswith(suffix) and key.split(".", 1)[0] in LORA_COMPONENTS:
            return key[: -len(suffix)], part
    return None


def _factors(path: Path, name: str, kind: type, tensors: dict[str, LazyTensor]) -> Factors:
    """The variant's factors, checked: every required one present and shapes that build a weight."""
    missing = [f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING and f.name not in tensors]
    if missing:
        raise UserError(f"module {name} has no {missing[0]} weight ({kind.KOHYA[missing[0]]}); the file is "
                        "incomplete", path=path)
    factors = kind(**tensors)
    try:
        factors.shape()
    except _Inconsistent as e:
        raise UserError(f"module {name} has inconsistent shapes ({factors.variant}: {e}); the file is damaged",
                        path=path) from None
    return factors


def _dora(path: Path, name: str, magnitude: LazyTensor, delta_shape: tuple[int, ...], peft: bool) -> Dora:
    """The magnitude's axis from its shape: peft's is always per output row ((out,) or (1, out, 1, 1) for a
    conv); lycoris writes (out, 1, ...) per output row and (1, in, ...) per input column."""
    shape, n = magnitude.shape, math.prod(magnitude.shape)
    if peft:
        axis = "out"
    else:
        axis = "out" if shape and shape[0] == n else "in" if len(shape) > 1 and shape[0] == 1 and shape[1] == n \
            else None
    fits = n == delta_shape[0] if axis == "out" else axis == "in" and (
        n == delta_shape[1] or len(delta_shape) == 2 and delta_shape[1] % n == 0)  # a conv's flattened factors
    if not fits:
        raise UserError(f"module {name} has a DoRA magnitude of shape {list(shape)} that fits no axis of its "
                        f"weight {list(delta_shape)}; the file is damaged", path=path)
    return Dora(magnitude, axis)


def _bias(path: Path, name: str, bias: LazyTensor, delta_shape: tuple[int, ...]) -> LazyTensor:
    if bias.shape != delta_shape[:1]:
        raise UserError(f"module {name} has a bias of shape {list(bias.shape)} for a weight of {delta_shape[0]} "
                        "outputs; the file is damaged", path=path)
    return bias


def _alphas(source: Mapping) -> dict[str, float]:
    """Every `.alpha` of the file by key, read in one pass."""
    return read_scalars(source[key] for key in source if key.endswith(".alpha"))


def _read_kohya(path: Path, source: SafetensorsFile, names: _KohyaNames) -> tuple[list[LoraModule], list[str]]:
    modules, unresolved = [], []
    alphas = _alphas(source)
    for stem, parts in _group(path, source, _split_kohya).items():
        resolved = names.resolve(stem)
        if resolved is None:
            unresolved.append(stem)
            continue
        kinds = {_KOHYA_FACTORS[p][0] for p in parts if p in _KOHYA_FACTORS}
        if len(kinds) != 1:
            what = "mixes the weights of several variants" if kinds else "has no weights"
            raise UserError(f"module {stem} {what} ({', '.join(sorted(parts))}); the file is damaged", path=path)
        kind = kinds.pop()
        factors = _factors(path, stem, kind, {_KOHYA_FACTORS[p][1]: LazyTensor.of(source, key)
                                              for p, key in parts.items() if p in _KOHYA_FACTORS})
        shape = factors.shape()
        dora = _dora(path, stem, LazyTensor.of(source, parts["dora_scale"]), shape, peft=False) \
            if "dora_scale" in parts else None
        if "diff_b" in parts and kind is not FullDiff:
            raise UserError(f"module {stem} has a diff_b bias without a full diff weight; the file is damaged",
                            path=path)
        bias = _bias(path, stem, LazyTensor.of(source, parts["diff_b"]), shape) if "diff_b" in parts else None
        modules.append(LoraModule(*resolved, factors, alphas.get(parts.get("alpha", "")), stem, dora, bias))
    return modules, unresolved


def _read_peft(path: Path, source: SafetensorsFile) -> list[LoraModule]:
    settings = _peft_settings(path, source.metadata)
    alphas = _alphas(source)
    modules = []
    for name, parts in _group(path, source, _split_peft).items():
        component, module = name.split(".", 1)
        if component != "unet":
            module = te_canonical(module)
        tensors = {p: LazyTensor.of(source, parts[p]) for p in ("down", "up") if p in parts}
        factors = _factors(path, name, LowRank, tensors)
        shape = factors.shape()
        alpha = alphas[parts["alpha"]] if "alpha" in parts else \
            _peft_alpha(settings, component, module, factors.rank)
        dora = _dora(path, name, LazyTensor.of(source, parts["dora"]), shape, peft=True) if "dora" in parts else None
        bias = _bias(path, name, LazyTensor.of(source, parts["bias"]), shape) if "bias" in parts else None
        modules.append(LoraModule(component, module, factors, alpha, name, dora, bias))
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

def lora_delta(module: LoraModule, strength: float = 1.0, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """strength * scale * delta (fp32 unless `dtype`), shaped like `delta_shape`. A DoRA module has no delta
    apart from the weight it rescales: merge it with `add_lora`."""
    import torch

    dtype = dtype or torch.float32
    if module.dora is not None:
        raise ValueError(f"{module.name}: a DoRA module's change depends on the weight; use add_lora")
    return add_lora(torch.zeros(module.delta_shape, dtype=dtype, device=device), module, strength)


def add_lora(weight: torch.Tensor, module: LoraModule, strength: float = 1.0) -> torch.Tensor:
    """Merge one module into `weight` in place, computing in `weight`'s dtype and device; returns `weight`.

    Without DoRA: W + strength * scale * delta (a plain LoRA as one fused multiply-add, so no delta-sized
    temporary). With DoRA: V = W + scale * delta is rescaled to magnitude * V / ||V|| (norm per output row or
    input column, plus float32 eps, as lycoris' `weight_decompose` computes it; peft's merge is the same without
    the eps), and `strength` moves W linearly towards that: W + strength * (DoRA(W) - W), as ComfyUI does, so 0
    leaves the weight as it was and 1 is what lycoris and peft merge. (lycoris' multiplier scales only the
    magnitude change and peft's scale only delta inside the norm; all three agree at 1.)

    `weight` is the weight as it stands: merge applies a weight's modules one after another in the order the
    LoRAs are given, so a DoRA module renormalises what earlier modules added, as ComfyUI and lycoris do when
    they patch a weight in turn. The delta may be a conv's flattened (out, in * k * k): it is laid out as
    `weight`.
    """
    import torch

    dtype, device, factors = weight.dtype, weight.device, module.factors
    if module.dora is None and isinstance(factors, LowRank):
        up, down = factors.matrices(dtype, device)
        weight.view(weight.shape[0], -1).addmm_(up, down, alpha=strength * module.scale)
        return weight
    delta = factors.delta(dtype, device).reshape(weight.shape)
    if module.dora is None:
        return weight.add_(delta, alpha=strength * module.scale)
    merged = torch.add(weight, delta, alpha=module.scale)
    del delta
    keep = 0 if module.dora.axis == "out" else 1
    norm_dtype = torch.promote_types(dtype, torch.float32)
    norm = torch.linalg.vector_norm(merged, dim=[d for d in range(weight.dim()) if d != keep], keepdim=True,
                                    dtype=norm_dtype)
    magnitude = module.dora.magnitude.load().to(device=device, dtype=norm_dtype).reshape(norm.shape)
    merged.mul_((magnitude / (norm + torch.finfo(norm_dtype).eps)).to(dtype))
    return weight.copy_(merged) if strength == 1 else weight.lerp_(merged, strength)


def add_lora_bias(bias: torch.Tensor, module: LoraModule, strength: float = 1.0) -> torch.Tensor:
    """`bias` + strength * scale * the module's bias delta, in place (LyCORIS full `diff_b` at scale 1; peft
    merges `lora_B.bias` times alpha / r, with or without DoRA)."""
    return bias.add_(module.bias.load().to(device=bias.device, dtype=bias.dtype).reshape(bias.shape),
                     alpha=strength * module.scale)


# --- writing ----------------------------------------------------------------------------------------------

def write_lora(modules: Iterable[LoraModule], out: Path | str, format: str = "kohya",
               metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> str:
    """Write modules as a kohya file (diffusers module names, like the official Lightning files; every variant)
    or as a peft/diffusers file (`load_lora_weights` format; LoRA only, with DoRA and biases; alphas in
    diffusers' adapter metadata). Returns the data sha256. Weights are byte-copied from their source."""
    modules = in_file_order(modules)
    metadata = {k: v for k, v in (metadata or {}).items() if k != PEFT_METADATA_KEY} | format_metadata(modules, format)
    return write_file(out, lora_tensors(modules, format), metadata=provenance.with_data_hash(metadata),
                      overwrite=overwrite)


def in_file_order(modules: Iterable[LoraModule]) -> list[LoraModule]:
    """Modules in the order LoRA files are written: by component, then module name."""
    return sorted(modules, key=lambda m: (LORA_COMPONENTS.index(m.component), m.module))


def lora_tensors(modules: list[LoraModule], format: str) -> dict[str, LazyTensor]:
    """The tensors of a LoRA file of `format` (kohya or peft) holding `modules`, by key."""
    if format == "kohya":
        return _kohya_tensors(modules)
    if format == "peft":
        return _peft_tensors(modules)
    raise UserError(f"unknown LoRA format {format!r}; choose kohya or peft")


def format_metadata(modules: list[LoraModule], format: str) -> dict[str, str]:
    """What a format keeps in the metadata: peft's alphas, ranks and DoRA flags as diffusers saves them."""
    if format == "peft" and any(m.alpha is not None or m.dora or m.bias for m in modules):
        return {PEFT_METADATA_KEY: json.dumps(_peft_config(modules), indent=2, sort_keys=True)}
    return {}


def _kohya_tensors(modules: list[LoraModule]) -> dict[str, LazyTensor]:
    tensors: dict[str, LazyTensor] = {}
    for m in modules:
        if m.bias is not None and not isinstance(m.factors, FullDiff):
            raise UserError(f"{m.name}: a LoRA bias (peft lora_B.bias) has no kohya form; keep this LoRA as peft")
        stem = _KOHYA_WRITE_PREFIX[m.component] + m.module.replace(".", "_")
        factors = {suffix: getattr(m.factors, name) for name, suffix in m.factors.KOHYA.items()}
        tensors |= {f"{stem}.{suffix}": t for suffix, t in factors.items() if t is not None}
        if m.bias is not None:
            tensors[stem + ".diff_b"] = m.bias
        if m.dora is not None:
            tensors[stem + ".dora_scale"] = _kohya_magnitude(m)
        if m.alpha is not None:
            tensors[stem + ".alpha"] = _scalar(m.alpha, next(t for t in factors.values() if t is not None).dtype)
    return tensors


def _kohya_magnitude(m: LoraModule) -> LazyTensor:
    """lycoris' layout: (out, 1, ...) per output row, (1, in, ...) per input column; peft's (out,) and
    (1, out, 1, 1) become (out, 1) and (out, 1, 1, 1), the same bytes."""
    magnitude, out = m.dora.magnitude, m.delta_shape[0]
    if m.dora.axis == "in" or (len(magnitude.shape) > 1 and magnitude.shape[0] == out):
        return magnitude
    return reshaped(magnitude, (out, *[1] * (len(m.delta_shape) - 1)))


def _peft_tensors(modules: list[LoraModule]) -> dict[str, LazyTensor]:
    tensors: dict[str, LazyTensor] = {}
    for component in LORA_COMPONENTS:
        mods = [m for m in modules if m.component == component]
        if any(m.dora for m in mods) and not all(m.dora for m in mods):
            raise UserError(f"{component}: some modules have DoRA and some not, which one peft config cannot say; "
                            "keep this LoRA as kohya")
        with_bias = any(m.bias is not None for m in mods)
        for m in mods:
            if not isinstance(m.factors, LowRank) or m.factors.mid is not None:
                raise UserError(f"{m.name}: {m.variant} has no peft/diffusers form; keep this LoRA as kohya")
            if m.dora is not None and m.dora.axis == "in":
                raise UserError(f"{m.name}: DoRA normalised per input channel (LyCORIS wd_on_output=False) has no "
                                "peft/diffusers form; keep this LoRA as kohya")
            key = f"{m.component}.{m.module}"
            tensors[key + ".lora_A.weight"] = m.factors.down
            tensors[key + ".lora_B.weight"] = m.factors.up
            out, conv = m.delta_shape[0], len(m.delta_shape) == 4
            if m.dora is not None:  # peft's shapes: (out,), or (1, out, 1, 1) for a conv
                tensors[key + ".lora_magnitude_vector"] = reshaped(m.dora.magnitude, (1, out, 1, 1) if conv else (out,))
            if with_bias:  # peft gives every module of a lora_bias config a bias: zero where the file has none
                tensors[key + ".lora_B.bias"] = m.bias if m.bias is not None else _zeros((out,), m.factors.up.dtype)
    return tensors


def _zeros(shape: tuple[int, ...], dtype: str) -> LazyTensor:
    def make():
        import torch

        return torch.zeros(shape, dtype=dtypes.torch_dtype(dtype))

    return constant(make, dtype, shape)


def _scalar(value: float, dtype: str) -> LazyTensor:
    def make():
        import torch

        return torch.tensor(value, dtype=dtypes.torch_dtype(dtype))

    return constant(make, dtype, ())


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
            f"{component}.use_dora": any(m.dora is not None for m in mods),
            f"{component}.lora_bias": any(m.bias is not None for m in mods),
        }
    return config


# The UNet modules the official Lightning LoRAs adapt: linear and conv layers inside the blocks with these names.
_LIGHTNING_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
_LIGHTNING_BLOCKS = ("down_blocks.", "up_blocks.", "mid_block.")


def lightning_targets(unet_config: Mapping) -> dict[str, tuple[int, ...]]:
    """The modules the official Lightning LoRAs adapt, with their weight shapes, for a UNet of this config: 788
    on SDXL (attention, projections, feed-forward, resnet convs and time projections, conv shortcuts, down- and
    upsampler convs). From the weight shapes alone: linear (2-D) and conv (4-D) weights, never norms."""
    return {key.removesuffix(".weight"): shape for key, shape in expected_shapes("unet", unet_config).items()
            if key.endswith(".weight") and key.startswith(_LIGHTNING_BLOCKS) and len(shape) in (2, 4)
            and key.removesuffix(".weight").endswith(_LIGHTNING_LEAVES)}
