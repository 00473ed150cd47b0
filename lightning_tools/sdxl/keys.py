"""Key maps between diffusers names and single-file (ComfyUI / A1111, "sgm") names for the four SDXL parts.

The UNet and VAE maps are tables of module prefixes built from the diffusers config (levels, resnets per level,
which levels have attention), so one code path covers the tiny test models and SDXL itself. Inside a block the
two namings agree except for resnet layers and VAE attention, which have their own small rename tables. Both
directions come from the same rows.

Tensor conversion is lazy: a rename keeps the stored bytes so the writer copies them; a reshape or a row split
is still the same bytes (a re-described `TensorInfo`); only OpenCLIP's fused q/k/v and its transposed text
projection are computed.

Text encoders are named here in the classic Hugging Face form with the `text_model.` prefix for both encoders
(what single files, kohya LoRAs and older diffusers folders use); `hf_clip_key` normalises the prefix-less form
that transformers >= 5.6 writes for `CLIPTextModel`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterable, Mapping

from lightning_tools import dtypes
from lightning_tools.sdxl.vocabulary import PREFIXES
from lightning_tools.stream import LazyTensor, constant

UNET_PREFIX = PREFIXES["unet"]

# Buffers, not weights: transformers rebuilds position_ids (int64 0..n-1) itself, so reading drops them and the
# single-file writer emits a fresh int64 copy (loaders of single files expect it; never a float one).
POSITION_IDS = "text_model.embeddings.position_ids"
# OpenCLIP's contrastive temperature: unused for generation and absent from diffusers, kept when a single file
# has it and written with its trained value ln(100) otherwise, as the SDXL base file holds it.
LOGIT_SCALE = "logit_scale"
LOGIT_SCALE_VALUE = math.log(100.0)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Pre-0.14 diffusers VAE attention names, accepted on reading.
_VAE_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# OpenCLIP bigG: (diffusers, single-file) names inside one transformer layer and at the top level.
_CLIP_G_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                 ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))
_CLIP_G_TOP = (("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
               ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
               ("text_model.final_layer_norm.weight", "ln_final.weight"),
               ("text_model.final_layer_norm.bias", "ln_final.bias"),
               (LOGIT_SCALE, LOGIT_SCALE))
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_SF_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_QKV = ("q_proj", "k_proj", "v_proj")

Row = tuple[str, str, Mapping[str, str] | None]


class NameMap:
    """Renames module or parameter names between diffusers and single-file naming, both ways.

    Built from rows (diffusers module prefix, single-file module prefix, renames inside that module or None
    when the inside is named alike). Names outside every row, or inside a renamed module but not in its
    table, map to None: the caller reports them as unknown.
    """

    def __init__(self, rows: Iterable[Row]):
        rows = list(rows)
        self._to_single = {d: (s, inner) for d, s, inner in rows}
        self._to_diffusers = {s: (d, {v: k for k, v in inner.items()} if inner else None) for d, s, inner in rows}

    def to_single(self, name: str) -> str | None:
        return _rename(name, self._to_single)

    def to_diffusers(self, name: str) -> str | None:
        return _rename(name, self._to_diffusers)


def _rename(name: str, table: Mapping[str, tuple[str, Mapping[str, str] | None]]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        new, inner = hit
        rest = parts[cut:]
        if inner is not None and rest:
            for width in (2, 1):  # inner names have one or two parts: "conv1", "in_layers.0", "to_out.0"
                head = ".".join(rest[:width])
                if len(rest) >= width and head in inner:
                    rest = [inner[head], *rest[width:]]
                    break
            else:
                return None
        return ".".join([new, *rest])
    return None


def _per_level(value: int | list[int], levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _cache_key(config: Mapping) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def unet_names(config: Mapping) -> NameMap:
    """The UNet map for a diffusers `UNet2DConditionModel` config (SDXL: 3 levels, 2 resnets, text_time)."""
    return _unet_names(_cache_key(config))


@functools.lru_cache(maxsize=8)
def _unet_names(key: str) -> NameMap:
    config = json.loads(key)
    rows: list[Row] = [("time_embedding.linear_1", "time_embed.0", None),
                       ("time_embedding.linear_2", "time_embed.2", None),
                       ("conv_in", "input_blocks.0.0", None),
                       ("conv_norm_out", "out.0", None), ("conv_out", "out.2", None)]
    if config.get("addition_embed_type") == "text_time":
        rows += [("add_embedding.linear_1", "label_emb.0.0", None), ("add_embedding.linear_2", "label_emb.0.2", None)]
    down, up = config["down_block_types"], config["up_block_types"]
    levels = len(down)
    resnets = _per_level(config.get("layers_per_block", 2), levels)
    n = 1
    for i, kind in enumerate(down):
        for j in range(resnets[i]):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", _UNET_RESNET))
            if "CrossAttn" in kind:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", None))
            n += 1
        if i < levels - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op", None))
            n += 1
    mid_attention = "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")
    rows.append(("mid_block.resnets.0", "middle_block.0", _UNET_RESNET))
    if mid_attention:
        rows.append(("mid_block.attentions.0", "middle_block.1", None))
    rows.append(("mid_block.resnets.1", f"middle_block.{2 if mid_attention else 1}", _UNET_RESNET))
    n = 0
    for i, kind in enumerate(up):
        count = resnets[levels - 1 - i] + 1
        attention = "CrossAttn" in kind
        for j in range(count):
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _UNET_RESNET))
            if attention:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", None))
            if j == count - 1 and i < levels - 1:
                rows.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if attention else 1}.conv",
                             None))
            n += 1
    return NameMap(rows)


def vae_names(config: Mapping) -> NameMap:
    """The VAE map for a diffusers `AutoencoderKL` config (decoder levels run in reverse in single files)."""
    return _vae_names(_cache_key(config))


@functools.lru_cache(maxsize=8)
def _vae_names(key: str) -> NameMap:
    config = json.loads(key)
    levels = len(config["down_block_types"])
    per = config.get("layers_per_block", 2)
    rows: list[Row] = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", None), (f"{part}.conv_out", f"{part}.conv_out", None),
                 (f"{part}.conv_norm_out", f"{part}.norm_out", None),
                 (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                 (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                 (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)]
    for i in range(levels):
        rows += [(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
                 for j in range(per)]
        rows += [(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}", _VAE_RESNET)
                 for j in range(per + 1)]
        if i < levels - 1:
            rows += [(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None),
                     (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv", None)]
    return NameMap(rows)


def hf_clip_key(key: str) -> str:
    """A Hugging Face CLIP text-model key in the classic form, with the `text_model.` prefix.

    transformers >= 5.6 saves `CLIPTextModel` without it; `CLIPTextModelWithProjection` keeps it and adds
    `text_projection.weight`, which (like `logit_scale`) sits outside the text model.
    """
    if key.startswith("text_model.") or key in ("text_projection.weight", LOGIT_SCALE):
        return key
    return "text_model." + key


# --- lazy tensor helpers: same bytes wherever possible --------------------------------------------------------

def reshaped(t: LazyTensor, shape: tuple[int, ...]) -> LazyTensor:
    """The same data under another shape (a 1x1 conv as a linear weight and back): still byte-copyable."""
    shape = tuple(shape)
    stored = dataclasses.replace(t.stored, shape=shape) if t.stored is not None else None
    load = t.load
    return LazyTensor(t.dtype, shape, lambda: load().reshape(shape), stored)


def row_chunk(t: LazyTensor, index: int, chunks: int) -> LazyTensor:
    """Rows [index/chunks, (index+1)/chunks) of `t`: a contiguous byte range of the stored tensor."""
    rows = t.shape[0] // chunks
    shape = (rows, *t.shape[1:])
    stored = None
    if t.stored is not None:
        size = t.stored.nbytes // chunks
        start = t.stored.start + index * size
        stored = dataclasses.replace(t.stored, shape=shape, start=start, end=start + size)
    load = t.load
    return LazyTensor(t.dtype, shape, lambda: load()[index * rows:(index + 1) * rows], stored)


def transposed(t: LazyTensor) -> LazyTensor:
    return t.map(lambda x: x.T.contiguous(), shape=(t.shape[1], t.shape[0]))


def concatenated(parts: list[LazyTensor]) -> LazyTensor:
    """Rows of `parts` stacked, in the first part's dtype."""
    dtype = parts[0].dtype
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    loads = [p.load for p in parts]

    def load():
        import torch

        first = loads[0]()
        return torch.cat([first, *(f().to(first.dtype) for f in loads[1:])])

    return LazyTensor(dtype, shape, load)


def position_ids(count: int) -> LazyTensor:
    """CLIP's position_ids buffer, int64 [1, count], as single files store it."""
    def make():
        import torch

        return torch.arange(count, dtype=torch.int64).unsqueeze(0)

    return constant(make, "I64", (1, count))


# --- per-component conversion ---------------------------------------------------------------------------------
# Each function takes component-relative keys and returns (converted tensors, keys it could not place).

Converted = tuple[dict[str, LazyTensor], list[str]]


def _renamed(tensors: Mapping[str, LazyTensor], rename) -> Converted:
    out: dict[str, LazyTensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = t
    return out, unknown


def unet_to_single(tensors: Mapping[str, LazyTensor], config: Mapping) -> Converted:
    return _renamed(tensors, unet_names(config).to_single)


def unet_from_single(tensors: Mapping[str, LazyTensor], config: Mapping) -> Converted:
    return _renamed(tensors, unet_names(config).to_diffusers)


def _is_vae_attention_weight(diffusers_key: str) -> bool:
    return ".mid_block.attentions." in diffusers_key and diffusers_key.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))


def vae_to_single(tensors: Mapping[str, LazyTensor], config: Mapping) -> Converted:
    """Mid-block attention projections become 1x1 convolutions, as in the original autoencoder."""
    out, unknown = _renamed(tensors, vae_names(config).to_single)
    back = vae_names(config).to_diffusers
    for key, t in out.items():
        if _is_vae_attention_weight(back(key)) and len(t.shape) == 2:
            out[key] = reshaped(t, (*t.shape, 1, 1))
    return out, unknown


def vae_from_single(tensors: Mapping[str, LazyTensor], config: Mapping) -> Converted:
    out, unknown = _renamed(tensors, vae_names(config).to_diffusers)
    for key, t in out.items():
        if _is_vae_attention_weight(key) and len(t.shape) > 2:
            out[key] = reshaped(t, t.shape[:2])
    return out, unknown


def vae_legacy_key(key: str) -> str:
    """Old diffusers VAE attention names (query/key/value/proj_attn) in today's form."""
    head, _, leaf = key.rpartition(".")
    module, _, last = head.rpartition(".")
    if ".attentions." in key and last in _VAE_LEGACY:
        return f"{module}.{_VAE_LEGACY[last]}.{leaf}"
    return key


def clip_l_to_single(tensors: Mapping[str, LazyTensor], config: Mapping | None = None) -> Converted:
    """CLIP-L keeps Hugging Face names in single files; position_ids are added (int64)."""
    out = {k: t for k, t in tensors.items() if k.startswith("text_model.")}
    unknown = [k for k in tensors if k not in out]
    out[POSITION_IDS] = position_ids(_positions(tensors, config))
    return out, unknown


def clip_l_from_single(tensors: Mapping[str, LazyTensor], config: Mapping | None = None) -> Converted:
    out = {k: t for k, t in tensors.items() if k.startswith("text_model.") and k != POSITION_IDS}
    return out, [k for k in tensors if k not in out and k != POSITION_IDS]


def _positions(tensors: Mapping[str, LazyTensor], config: Mapping | None) -> int:
    emb = tensors.get("text_model.embeddings.position_embedding.weight")
    if emb is not None:
        return emb.shape[0]
    return int((config or {}).get("max_position_embeddings", 77))


def clip_g_to_single(tensors: Mapping[str, LazyTensor], config: Mapping | None = None) -> Converted:
    """OpenCLIP bigG: q/k/v fused into in_proj, text projection transposed, logit_scale present."""
    top = dict(_CLIP_G_TOP)
    out: dict[str, LazyTensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        if key in top:
            out[top[key]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = transposed(t)
        elif (m := _HF_LAYER.fullmatch(key)) is not None:
            layer, inner = m.groups()
            prefix = f"transformer.resblocks.{layer}."
            module, _, leaf = inner.rpartition(".")
            if module == "self_attn.q_proj":
                hf = f"text_model.encoder.layers.{layer}.self_attn.%s.{leaf}"
                parts = [tensors.get(hf % name) for name in _QKV]
                if any(p is None for p in parts):
                    unknown.append(key)
                else:
                    out[f"{prefix}attn.in_proj_{leaf}"] = concatenated(parts)
            elif module in ("self_attn.k_proj", "self_attn.v_proj"):
                continue  # fused with q above
            elif (new := dict(_CLIP_G_LAYER).get(module)) is not None:
                out[f"{prefix}{new}.{leaf}"] = t
            else:
                unknown.append(key)
        elif key != POSITION_IDS:
            unknown.append(key)
    for name in _QKV[1:]:  # k/v without a q would have been skipped silently above
        for key in tensors:
            if f".self_attn.{name}." in key and key.replace(name, "q_proj") not in tensors:
                unknown.append(key)
    if LOGIT_SCALE not in out and "text_projection" in out:
        code = out["text_projection"].dtype

        def make():
            import torch

            return torch.tensor(LOGIT_SCALE_VALUE, dtype=dtypes.torch_dtype(code))

        out[LOGIT_SCALE] = constant(make, code, ())
    return out, unknown


def clip_g_from_single(tensors: Mapping[str, LazyTensor], config: Mapping | None = None) -> Converted:
    top = {sf: hf for hf, sf in _CLIP_G_TOP}
    layer_names = {sf: hf for hf, sf in _CLIP_G_LAYER}
    out: dict[str, LazyTensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        if key in top:
            out[top[key]] = t
        elif key == "text_projection":
            out["text_projection.weight"] = transposed(t)
        elif (m := _SF_LAYER.fullmatch(key)) is not None:
            layer, inner = m.groups()
            prefix = f"text_model.encoder.layers.{layer}."
            module, _, leaf = inner.rpartition(".")
            if inner in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = inner.rpartition("_")[2]
                for index, name in enumerate(_QKV):
                    out[f"{prefix}self_attn.{name}.{kind}"] = row_chunk(t, index, 3)
            elif (new := layer_names.get(module)) is not None:
                out[f"{prefix}{new}.{leaf}"] = t
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    return out, unknown


TO_SINGLE = {"unet": unet_to_single, "vae": vae_to_single, "text_encoder": clip_l_to_single,
             "text_encoder_2": clip_g_to_single}
FROM_SINGLE = {"unet": unet_from_single, "vae": vae_from_single, "text_encoder": clip_l_from_single,
               "text_encoder_2": clip_g_from_single}


def to_single_file(components: Mapping[str, Mapping[str, LazyTensor]],
                   configs: Mapping[str, Mapping]) -> Converted:
    """All components in single-file naming (with their `model.diffusion_model.`-style prefixes)."""
    out: dict[str, LazyTensor] = {}
    unknown: list[str] = []
    for component, tensors in components.items():
        converted, missed = TO_SINGLE[component](tensors, configs.get(component))
        prefix = PREFIXES[component]
        out.update((prefix + k, t) for k, t in converted.items())
        unknown += [f"{component}/{k}" for k in missed]
    return out, unknown


def split_single_file(tensors: Mapping[str, LazyTensor], configs: Mapping[str, Mapping],
                      components: Iterable[str] = tuple(PREFIXES)
                      ) -> tuple[dict[str, dict[str, LazyTensor]], list[str]]:
    """A single file's tensors as diffusers components (only those present), plus the keys no map placed."""
    by_component: dict[str, dict[str, LazyTensor]] = {}
    unknown: list[str] = []
    wanted = {c: PREFIXES[c] for c in components}
    for key, t in tensors.items():
        component = next((c for c, p in wanted.items() if key.startswith(p)), None)
        if component is None:
            unknown.append(key)
        else:
            by_component.setdefault(component, {})[key[len(wanted[component]):]] = t
    out: dict[str, dict[str, LazyTensor]] = {}
    for component, part in by_component.items():
        converted, missed = FROM_SINGLE[component](part, configs.get(component))
        out[component] = converted
        unknown += [PREFIXES[component] + k for k in missed]
    return out, unknown
