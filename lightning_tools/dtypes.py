"""Tensor dtypes under the names safetensors headers, torch and users give them.

Headers are read far more often than tensors are made, so torch is imported only when a torch dtype is asked
for: `catalog`, `inspect` and `verify` never pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from lightning_tools.errors import UsageError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (bytes per element, torch dtype name). Codes torch cannot hold are refused by the
# header check with a line naming them.
_CODES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
          "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "I64": (8, "int64"),
          "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U64": (8, "uint64"),
          "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"), "BOOL": (1, "bool")}
ITEM_SIZE = {code: size for code, (size, _) in _CODES.items()}
TORCH_NAME = {code: name for code, (_, name) in _CODES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# What users type (`--dtype fp16`) -> safetensors code.
UserDtype = Literal["fp16", "bf16", "fp32"]
USER_DTYPES: dict[str, str] = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
# Model outputs may also be fp8: the UNet's matrices and convs in float8_e4m3fn (what ComfyUI loads as
# fp8_e4m3fn), the rest fp16 (see `checkpoint.write_checkpoint`). LoRAs and arithmetic never are.
FP8 = "F8_E4M3"
OutputDtype = Literal["fp16", "bf16", "fp32", "fp8"]
OUTPUT_DTYPES: dict[str, str] = USER_DTYPES | {"fp8": FP8}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn; torch saturates larger values to it


def torch_dtype(code: str) -> "torch.dtype":
    import torch

    return getattr(torch, TORCH_NAME[code])


def code_of(dtype: "torch.dtype") -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, torch_name in TORCH_NAME.items() if torch_name == name)


def parse(name: str | None, option: str = "--dtype", allowed: Mapping[str, str] = USER_DTYPES) -> str | None:
    """A user dtype name as its safetensors code (None stays None); a name not in `allowed` (USER_DTYPES, or
    OUTPUT_DTYPES where fp8 makes sense) is a usage error."""
    if name is None:
        return None
    if name not in allowed:
        raise UsageError(f"{option} {name}: unknown dtype; choose one of {', '.join(allowed)}")
    return allowed[name]


def target(code: str, cast_to: str | None) -> str:
    """The code a tensor is written in: `cast_to` for floating tensors, unchanged for integer ones (CLIP's
    int64 position_ids must never become floats)."""
    return cast_to if cast_to is not None and code in FLOAT_CODES else code
