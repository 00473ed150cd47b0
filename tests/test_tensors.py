import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_tools.errors import CorruptFile, UserError
from lightning_tools.provenance import HASH_KEY, with_data_hash
from lightning_tools.outputs import output
from lightning_tools.tensors import (Planned, SafetensorsFile, SafetensorsWriter, TensorSource,
                                     hash_file, read_header)


@pytest.fixture
def sample(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half()}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    return path, tensors


def test_lazy_reader_sees_header_and_loads_on_demand(sample):
    path, tensors = sample
    f = SafetensorsFile(path)
    assert set(f) == set(tensors) and f.metadata == {"k": "v"}
    assert f["a"].shape == (3, 4) and f["a"].dtype == "F32" and f["b"].dtype == "I64"
    assert torch.equal(f.load("b"), tensors["b"])


def test_writer_streams_converts_and_hashes(sample, tmp_path):
    path, tensors = sample
    src = TensorSource.open(path)
    plan = [Planned("a16", "F16", (3, 4)), Planned("b", "I64", (5,)), Planned("c", "F16", (2,))]
    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, plan, with_data_hash({HASH_KEY: "", "title": "t"})) as w:
        w.write("a16", src.load("a").half())
        w.copy(src["b"])
        w.copy(src["c"])
    loaded = load_file(str(out))
    assert torch.equal(loaded["a16"], tensors["a"].half()) and torch.equal(loaded["b"], tensors["b"])
    reread = SafetensorsFile(out)
    assert reread.metadata[HASH_KEY] == "0x" + hash_file(out, reread.data_start) == "0x" + w.sha256


def _copy_all(source, out):
    plan = [Planned(k, info.dtype, info.shape) for k, info in source.items()]
    with SafetensorsWriter(out, plan, with_data_hash({HASH_KEY: ""})) as w:
        for k in source:
            w.copy(source[k])
    return w.sha256


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "EXDEV", "absent"])
def test_copies_are_byte_exact_and_hashed_with_or_without_copy_file_range(tmp_path, monkeypatch, kernel_copy):
    """Byte copies go through copy_file_range where it works and fall back to reads where it is refused (other
    filesystem: EXDEV) or missing (other OS); the file and its data hash are the same either way."""
    import errno
    import os

    tensors = {f"t{i}": torch.randn(1000 + 37 * i) for i in range(40)} | {"empty": torch.zeros(0),
                                                                          "big": torch.randn(5_000_000)}
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path))
    calls = []
    if kernel_copy == "copy_file_range":
        if not hasattr(os, "copy_file_range"):
            pytest.skip("no copy_file_range on this OS")
        real = os.copy_file_range
        monkeypatch.setattr(os, "copy_file_range", lambda *args: calls.append(args) or real(*args))
    elif kernel_copy == "EXDEV":
        def refuse(*args):
            calls.append(args)
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    out = tmp_path / "out.safetensors"
    sha = _copy_all(SafetensorsFile(path), out)
    reread = SafetensorsFile(out)
    assert reread.metadata[HASH_KEY] == "0x" + sha == "0x" + hash_file(out, reread.data_start)
    assert hash_file(out, reread.data_start) == hash_file(path, SafetensorsFile(path).data_start)
    assert all(torch.equal(v, tensors[k]) for k, v in load_file(str(out)).items())
    if kernel_copy == "copy_file_range":
        assert len(calls) >= len(tensors) - 1  # every non-empty tensor moved in the kernel
    else:
        assert len(calls) == (1 if kernel_copy == "EXDEV" else 0)  # refused once, then plain copies


def test_failing_kernel_copy_leaves_nothing(sample, tmp_path, monkeypatch):
    import errno
    import os

    def fail(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "copy_file_range", fail)
    path, _ = sample
    with pytest.raises(UserError, match="out.safetensors: no space left"):
        _copy_all(SafetensorsFile(path), tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == [path]


def test_interrupted_write_leaves_nothing(sample, tmp_path):
    path, _ = sample
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(out, [Planned("a", "F32", (3, 4)), Planned("b", "I64", (5,))]) as w:
            w.copy(SafetensorsFile(path)["a"])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == [path]


def test_existing_output_needs_overwrite(sample, tmp_path):
    path, _ = sample
    with pytest.raises(UserError, match="--overwrite"):
        with output(path):
            pass
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "old").write_text("old")
    with output(folder, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new"]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b + b"\0\0", "trailing bytes"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], "header claims"),
    (lambda b: b[:8] + b"{nonsense" + b[17:], "not JSON"),
])
def test_structure_damage_is_caught_without_hashing(sample, damage, message):
    path, _ = sample
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptFile, match=message):
        read_header(path)


def test_offsets_gap_is_caught(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "gap.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(CorruptFile, match="gap"):
        read_header(path)


def test_sharded_component(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    src = TensorSource.open(tmp_path)
    assert sorted(src) == ["x", "y"] and torch.equal(src.load("y"), torch.zeros(3))


def test_write_tensors_copies_stored_and_casts_floats_only(sample, tmp_path):
    from lightning_tools.stream import LazyTensor, write_file

    path, tensors = sample
    src = TensorSource.open(path)
    view = {"renamed_a": LazyTensor.of(src, "a"), "b": LazyTensor.of(src, "b"),
            "a_doubled": LazyTensor.of(src, "a").map(lambda t: t * 2)}
    out = tmp_path / "o.safetensors"
    write_file(out, view, dtype="F16")
    got = load_file(str(out))
    assert got["renamed_a"].dtype == torch.float16 and got["b"].dtype == torch.int64
    assert torch.equal(got["a_doubled"], (tensors["a"] * 2).half())


def test_one_read_gives_the_file_hash_and_the_data_hash(sample):
    from lightning_tools.tensors import hash_file_and_data

    path, _ = sample
    start = SafetensorsFile(path).data_start

    assert hash_file_and_data(path, start) == (hash_file(path), hash_file(path, start))
