"""Damaged and hostile safetensors files: each is one refusal naming the file, one `error:` line from every command
that reads it, and never a traceback. safetensors' own reader is the oracle for what the format refuses.

The corpus starts from files written by `safetensors.torch.save_file` and changes one field of the header (or of
the framing) per case: every row of issue #11's table and each field of the format.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lightning_tools import lora
from lightning_tools.errors import CorruptFile, UserError
from lightning_tools.header import MAX_HEADER
from lightning_tools.tensors import SafetensorsFile, SafetensorsWriter, Planned
from lightning_tools.tiny import make_lightning_lora, tiny_unet_config


def _pack(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with(h: dict, name: str, **fields) -> dict:
    h[name] = {**h[name], **fields}
    return h


def _without(h: dict, name: str, field: str) -> dict:
    del h[name][field]
    return h


def _nested_arrays(h: dict, data: bytes) -> bytes:
    depth = (MAX_HEADER - 16) // 2  # the whole 100 MB the format allows, nothing but brackets
    return _pack(b'{"w":' + b"[" * depth + b"]" * depth + b"}", data)


def _over_the_cap(h: dict, data: bytes) -> bytes:
    return struct.pack("<Q", MAX_HEADER + 1)  # padded to MAX_HEADER + 2 sparse bytes by the fixture


def _x_offsets(h: dict) -> list[int]:
    return h["x"]["data_offsets"]


# (id, build from (header, data) -> file bytes, a fragment of the one-line reason)
CORRUPT = [
    ("negative dims", lambda h, d: _pack(_with(h, "w", shape=[-2, -3]), d), "non-negative integers"),
    ("float dims", lambda h, d: _pack(_with(h, "w", shape=[2.0, 3]), d), "non-negative integers"),
    ("bool dims", lambda h, d: _pack(_with(h, "w", shape=[True, 6]), d), "non-negative integers"),
    ("shape product over int64", lambda h, d: _pack(_with(h, "w", shape=[2 ** 32, 2 ** 32, 2 ** 32]), d),
     "64 bits"),
    ("overflow before a zero dim", lambda h, d: _pack(_with(h, "w", shape=[2 ** 63, 2 ** 63, 0]), d), "64 bits"),
    ("byte size over 64 bits", lambda h, d: _pack(_with(h, "w", shape=[2 ** 62]), d), "64 bits"),
    ("metadata value not a string", lambda h, d: _pack(h | {"__metadata__": {"title": 3}}, d), "not a string"),
    ("metadata a list", lambda h, d: _pack(h | {"__metadata__": ["title"]}, d), "not a map of strings"),
    ("metadata nested", lambda h, d: _pack(h | {"__metadata__": {"a": {"b": "c"}}}, d), "not a string"),
    ("100 MB of nested arrays", _nested_arrays, "too deeply"),
    ("length over the format's cap", _over_the_cap, "over the format's limit"),
    ("length beyond the file", lambda h, d: struct.pack("<Q", 10 ** 9) + _pack(h, d)[8:], "header claims"),
    ("shorter than the length field", lambda h, d: b"\x05\0\0", "too short"),
    ("not UTF-8", lambda h, d: _pack(b'{"\xff\xfe":1}', d), "not UTF-8"),
    ("not JSON", lambda h, d: _pack(b"{nonsense", d), "not JSON"),
    ("JSON array", lambda h, d: _pack(b"[]", b""), "not a JSON object"),
    ("JSON string", lambda h, d: _pack(b'"w"', b""), "not a JSON object"),
    ("NaN", lambda h, d: _pack(json.dumps(h | {"__metadata__": {"x": float("nan")}}).encode(), d), "not JSON"),
    ("5000-digit integer", lambda h, d: _pack(json.dumps(h).replace('"shape": [2, 3]', '"shape": [1' + "0" * 5000
                                                                     + "]").encode(), d), "not JSON"),
    ("duplicate key", lambda h, d: _pack(json.dumps(h)[:-1].encode() + b', "w": ' + json.dumps(h["w"]).encode()
                                         + b"}", d), "twice"),
    ("entry not an object", lambda h, d: _pack(h | {"w": [0, 24]}, d), "not a tensor description"),
    ("no dtype", lambda h, d: _pack(_without(h, "w", "dtype"), d), "has no dtype"),
    ("no shape", lambda h, d: _pack(_without(h, "w", "shape"), d), "has no shape"),
    ("no data_offsets", lambda h, d: _pack(_without(h, "w", "data_offsets"), d), "has no data_offsets"),
    ("unknown dtype", lambda h, d: _pack(_with(h, "w", dtype="F17"), d), "unknown dtype"),
    ("dtype a number", lambda h, d: _pack(_with(h, "w", dtype=32), d), "unknown dtype"),
    ("dtype a list", lambda h, d: _pack(_with(h, "w", dtype=["F32"]), d), "unknown dtype"),
    ("shape a string", lambda h, d: _pack(_with(h, "w", shape="2x3"), d), "non-negative integers"),
    ("shape nested", lambda h, d: _pack(_with(h, "w", shape=[[2], [3]]), d), "non-negative integers"),
    ("offsets a string", lambda h, d: _pack(_with(h, "w", data_offsets="0-24"), d), "two non-negative"),
    ("one offset", lambda h, d: _pack(_with(h, "w", data_offsets=[0]), d), "two non-negative"),
    ("three offsets", lambda h, d: _pack(_with(h, "w", data_offsets=[0, 24, 48]), d), "two non-negative"),
    ("negative offset", lambda h, d: _pack(_with(h, "w", data_offsets=[-24, 0]), d), "two non-negative"),
    ("float offsets", lambda h, d: _pack(_with(h, "w", data_offsets=[0.0, 24.0]), d), "two non-negative"),
    ("bool offset", lambda h, d: _pack(_with(h, "w", data_offsets=[False, 24]), d), "two non-negative"),
    ("offsets past 64 bits", lambda h, d: _pack(_with(h, "w", data_offsets=[2 ** 64, 2 ** 64 + 24]), d),
     "two non-negative"),
    ("end before begin", lambda h, d: _pack(_with(h, "w", data_offsets=[24, 0]), d), "spans"),
    ("span shorter than the shape", lambda h, d: _pack(_with(h, "w", data_offsets=[0, 20]), d), "spans"),
    ("overlap", lambda h, d: _pack(_with(h, "x", data_offsets=[o - 8 for o in _x_offsets(h)]), d[:-8]), "overlap"),
    ("gap", lambda h, d: _pack(_with(h, "x", data_offsets=[o + 8 for o in _x_offsets(h)]), d + bytes(8)), "gap"),
    ("truncated", lambda h, d: _pack(h, d[:-3]), "truncated"),
    ("trailing bytes", lambda h, d: _pack(h, d + b"\0\0"), "trailing bytes"),
]
# Cases where we refuse what safetensors itself loads (the last duplicate wins there): one name, two meanings.
STRICTER_THAN_SAFETENSORS = {"duplicate key"}
# Valid files with a dtype of the format that torch cannot hold here: refused by name, not called damaged.
UNSUPPORTED = [("F4", [4], 2), ("C64", [2], 16), ("F8_E8M0", [3], 3)]


@pytest.fixture(scope="module")
def real_file(tmp_path_factory) -> Path:
    """A small file written by safetensors itself: w F32[2, 3] then x F32[4], with metadata."""
    path = tmp_path_factory.mktemp("real") / "real.safetensors"
    save_file({"w": torch.randn(2, 3), "x": torch.randn(4)}, str(path), metadata={"title": "real"})
    header, _ = _split(path.read_bytes())
    assert header["w"]["data_offsets"] == [0, 24] and header["x"]["data_offsets"] == [24, 40]
    return path


def _make(real_file: Path, tmp_path: Path, build) -> Path:
    header, data = _split(real_file.read_bytes())
    path = tmp_path / "bad.safetensors"
    path.write_bytes(build(copy.deepcopy(header), data))
    if build is _over_the_cap:
        with open(path, "r+b") as f:
            f.truncate(MAX_HEADER + 10)  # sparse: the file is long enough for the length it claims
    return path


def assert_one_error(result, code: int = 1, fragment: str | None = None) -> str:
    """Exit `code`, no traceback, exactly one `error:` line (returned), containing `fragment`."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.exit_code == code, result.stderr
    assert fragment is None or fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case, build, fragment", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_header_is_one_line_everywhere(real_file, tmp_path, cli, case, build, fragment):
    path = _make(real_file, tmp_path, build)
    with pytest.raises(CorruptFile, match=fragment) as caught:
        SafetensorsFile(path)
    assert caught.value.path == path and "\n" not in str(caught.value)
    if case not in STRICTER_THAN_SAFETENSORS:  # the reference reader refuses it too
        with pytest.raises(SafetensorError):
            with safe_open(str(path), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]

    # The commands first tell what a file is from its first bytes: a file that does not even start like
    # safetensors is named for what it is instead.
    reason = fragment if _looks_like_safetensors(path) else "not a weights file"
    verify = cli("verify", path)
    line = assert_one_error(verify)
    assert "FAIL" in verify.output and reason in verify.output and str(path) in line
    assert_one_error(cli("verify", "--deep", path), fragment=None)
    assert_one_error(cli("inspect", path), fragment=reason)
    assert_one_error(cli("convert", path, "--to", "comfyui", "--out", tmp_path / "out.safetensors"),
                     fragment=reason)
    assert not (tmp_path / "out.safetensors").exists()


def _looks_like_safetensors(path: Path) -> bool:
    from lightning_tools.pickles import sniff

    return sniff(path) in ("safetensors", "unknown")


@pytest.mark.parametrize("dtype, shape, nbytes", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_dtype_torch_cannot_hold_is_refused_by_name(real_file, tmp_path, cli, dtype, shape, nbytes):
    header = {"x": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(_pack(header, bytes(nbytes)))
    with safe_open(str(path), "np") as f:  # a valid file for safetensors itself
        assert list(f.keys()) == ["x"]
    with pytest.raises(UserError, match=f"is {dtype}, a safetensors dtype this tool does not handle") as caught:
        SafetensorsFile(path)
    assert not isinstance(caught.value, CorruptFile)
    assert_one_error(cli("inspect", path), fragment="does not handle")
    assert_one_error(cli("verify", path), fragment=None)


def test_what_safetensors_accepts_we_accept(real_file, tmp_path):
    """null metadata and extra fields in an entry: the format ignores them, so do we."""
    header, data = _split(real_file.read_bytes())
    header["__metadata__"] = None
    header["w"]["note"] = "extra"
    path = tmp_path / "lenient.safetensors"
    path.write_bytes(_pack(header, data))
    with safe_open(str(path), "pt") as f:
        expected = {k: f.get_tensor(k) for k in f.keys()}
    opened = SafetensorsFile(path)
    assert opened.metadata == {} and all(torch.equal(opened.load(k), v) for k, v in expected.items())


def test_verify_reports_a_bad_file_and_goes_on(real_file, tmp_path, cli):
    bad = _make(real_file, tmp_path, dict((c[0], c[1]) for c in CORRUPT)["metadata a list"])  # AttributeError before
    too_long = tmp_path / ("x" * 300 + ".safetensors")  # an OSError (ENAMETOOLONG) before
    result = cli("verify", real_file, bad, tmp_path / "missing.safetensors", too_long, real_file)
    line = assert_one_error(result)
    assert result.output.count("OK    ") == 2 and result.output.count("FAIL  ") == 3
    assert "3 of 5" in line and "name too long" in result.output


@pytest.mark.parametrize("alpha, fragment", [
    (torch.zeros(0), "should hold one number but has shape [0]"),
    (torch.tensor([1.0, 2.0]), "should hold one number but has shape [2]"),
], ids=["zero-size alpha", "two-element alpha"])
def test_lora_alpha_must_be_one_number(tmp_path, cli, tiny_pipeline, alpha, fragment):
    tensors = make_lightning_lora(tiny_unet_config(), rank=4)
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key] = alpha
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CorruptFile, match=re.escape(fragment)):
        lora.read_lora(path)
    assert_one_error(cli("verify", path), fragment=None)
    assert_one_error(cli("inspect", path), fragment=fragment)
    assert_one_error(cli("convert", path, "--to", "peft", "--out", tmp_path / "peft.safetensors"), fragment=fragment)
    assert_one_error(cli("merge", "--base", tiny_pipeline, "--lora", path, "--out", tmp_path / "m.safetensors"),
                     fragment=fragment)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_dtypes_torch_holds_are_read(tmp_path, cli, dtype):
    """U16/U32/U64 (here as a LoRA's alphas, written by safetensors): read like any other dtype."""
    tensors = make_lightning_lora(tiny_unet_config(), rank=4)
    for key in [k for k in tensors if k.endswith(".alpha")]:
        tensors[key] = torch.tensor(2, dtype=dtype)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    assert {m.alpha for m in lora.read_lora(path).modules} == {2.0}
    assert cli("verify", "--deep", path).exit_code == 0
    assert cli("inspect", path).exit_code == 0


@pytest.mark.parametrize("plan", [
    [Planned("w", "F32", (-2, -3))],
    [Planned("w", "F32", (2 ** 62,))],
    [Planned("w", "F17", (2,))],
], ids=["negative dims", "over 64 bits", "unknown dtype"])
def test_writer_refuses_what_the_reader_refuses(tmp_path, plan):
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="refus|not one the format holds"):
        with SafetensorsWriter(out, plan):
            pass
    assert list(tmp_path.iterdir()) == []
