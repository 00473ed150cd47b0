"""Weight files that are not safetensors: PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) read safely, and
anything else named for what it is.

A pickle can run any code when it is loaded, so it is read only through `torch.load(weights_only=True)`, which
refuses every object that is not plain tensors and containers; what it refuses is one line naming the file as
an unsafe pickle, never a traceback. Files in torch's zip format are memory-mapped, so a 5 GB DMD2 UNet
`.bin` costs what the stream reads, not its size; the legacy format is loaded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lightning_tools.errors import CorruptFile, UnsafeFile

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
Kind = Literal["safetensors", "zip-pickle", "pickle", "png", "jpeg", "gif", "webp", "gguf", "json", "text",
               "empty", "unknown"]
_WHAT = {"png": "a PNG image", "jpeg": "a JPEG image", "gif": "a GIF image", "webp": "a WebP image",
         "json": "a JSON file", "text": "a text file", "empty": "an empty file", "unknown": "unknown data"}


def sniff(path: Path) -> Kind:
    """What a file is, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip-pickle"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    for magic, kind in ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF8", "gif"), (b"GGUF", "gguf")):
        if head.startswith(magic):
            return kind  # type: ignore[return-value]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "json"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    return "text"


def not_weights(path: Path, kind: Kind) -> CorruptFile:
    """The error for a file this tool cannot read weights from, naming what it is."""
    if kind == "gguf":
        return CorruptFile("is a GGUF file (quantised weights for llama.cpp / ComfyUI-GGUF), which this tool does not "
                           "read; use the .safetensors it was made from", path=path)
    return CorruptFile(f"is {_WHAT[kind]}, not a weights file; give a .safetensors file (or a .ckpt/.pt/.bin "
                       "PyTorch checkpoint)", path=path)


def load_tensors(path: Path) -> dict[str, "torch.Tensor"]:
    """The tensors of a PyTorch checkpoint, looking through the "state_dict" (or "model"/"module") wrapper of
    older `.ckpt` files; refused in one line when unsafe, damaged or holding no tensors."""
    import pickle

    import torch

    kind = sniff(path)
    if kind not in ("zip-pickle", "pickle"):
        raise not_weights(path, kind)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip-pickle")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFile(f"an unsafe pickle: loading it would run code or build objects other than tensors "
                         f"({first[:200]}); refused. Convert it to safetensors where it came from, or get a "
                         ".safetensors copy", path=path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptFile(f"not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); the file is "
                          "damaged: download or export it again", path=path) from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise CorruptFile(f"holds a {type(data).__name__}, not a dict of tensors", path=path)
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CorruptFile("holds no tensors", path=path)
    return tensors
