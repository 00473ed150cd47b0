import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from lightning_tools.provenance import HASH_KEY, with_data_hash
from lightning_tools.stream import LazyTensor, write_file
from lightning_tools.verify import verify_paths


def _lazy(t: torch.Tensor) -> LazyTensor:
    return LazyTensor({torch.float32: "F32", torch.float16: "F16"}[t.dtype], tuple(t.shape), lambda: t)


@pytest.fixture
def hashed_file(tmp_path):
    """A small file written by the project's writer, carrying modelspec.hash_sha256 of its data."""
    path = tmp_path / "model.safetensors"
    tensors = {"a.weight": torch.randn(16, 8), "b.weight": torch.randn(32).half()}
    write_file(path, {k: _lazy(v) for k, v in tensors.items()}, metadata=with_data_hash({HASH_KEY: ""}))
    return path


def _only(reports):
    assert len(reports) == 1
    return reports[0]


def test_intact_file_with_modelspec_hash_passes(hashed_file):
    report = _only(verify_paths([hashed_file]).files)
    assert report.ok, report.problems
    assert "sha256" in report.checks and report.identity[0]["reference"].startswith("modelspec.hash_sha256")


def test_flipped_data_byte_is_caught_by_the_modelspec_hash(hashed_file, tmp_path):
    bad = tmp_path / "flipped.safetensors"
    data = bytearray(hashed_file.read_bytes())
    data[-3] ^= 0x01
    bad.write_bytes(data)
    report = _only(verify_paths([bad]).files)
    assert not report.ok and "sha256" in report.problems[0] and "modelspec.hash_sha256" in report.problems[0]


def test_truncated_file_is_caught_without_hashing(hashed_file, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(hashed_file.read_bytes()[:-10])
    report = _only(verify_paths([bad]).files)
    assert not report.ok and "truncated" in report.problems[0]
    assert report.checks == ["structure"] and report.sha256 is None


def _rewrite_header(src, dst, edit):
    """Copy `src` to `dst` with its JSON header changed by `edit` (data bytes untouched)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_header_offsets_that_do_not_tile_the_data_are_caught(hashed_file, tmp_path):
    bad = tmp_path / "offsets.safetensors"

    def swap(header):  # b's range now overlaps a's: sizes still match dtype x shape
        begin, end = header["b.weight"]["data_offsets"]
        header["b.weight"]["data_offsets"] = [begin - 8, end - 8]

    _rewrite_header(hashed_file, bad, swap)
    report = _only(verify_paths([bad]).files)
    assert not report.ok and "overlap or leave a gap" in report.problems[0]


def test_deep_scan_finds_nan(tmp_path):
    path = tmp_path / "nan.safetensors"
    t = torch.randn(4, 4)
    t[1, 2] = float("nan")
    write_file(path, {"ok": _lazy(torch.randn(3)), "broken": _lazy(t.half())})
    assert _only(verify_paths([path]).files).ok
    report = _only(verify_paths([path], deep=True).files)
    assert not report.ok and "broken (1 of 16)" in report.problems[0] and "finite" in report.checks


def test_diffusers_folder_is_verified_component_by_component(tiny_pipeline, pipeline_copy):
    reports = verify_paths([tiny_pipeline]).files
    assert {r.component for r in reports} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert all(r.ok for r in reports), [r.problems for r in reports]
    vae = pipeline_copy / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-4])
    (pipeline_copy / "text_encoder" / "model.safetensors").unlink()
    by_component = {r.component: r for r in verify_paths([pipeline_copy]).files}
    assert not by_component["vae"].ok and "truncated" in by_component["vae"].problems[0]
    assert not by_component["text_encoder"].ok and "no weights found" in by_component["text_encoder"].problems[0]
    assert by_component["unet"].ok and by_component["text_encoder_2"].ok


def test_folder_of_loose_files_verifies_each(hashed_file, tiny_lora, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    shutil.copy(hashed_file, folder / "a.safetensors")
    shutil.copy(tiny_lora, folder / "b.safetensors")
    reports = verify_paths([folder]).files
    assert [r.path for r in reports] == [str(folder / "a.safetensors"), str(folder / "b.safetensors")]
    assert all(r.ok for r in reports)


def test_single_file_architecture_is_checked_against_configs(tiny_pipeline, tmp_path, cli):
    from lightning_tools.checkpoint import open_checkpoint, write_checkpoint
    from lightning_tools.tensors import SafetensorsFile

    full = tmp_path / "tiny.safetensors"
    write_checkpoint(open_checkpoint(tiny_pipeline), full, to="comfyui")
    toy = _only(verify_paths([full]).files)  # toy widths are not SDXL's
    assert not toy.ok and any("wrong shape" in p and "SDXL base has" in p for p in toy.problems)
    assert _only(verify_paths([full], config_dir=tiny_pipeline).files).ok
    source = SafetensorsFile(full)
    dropped = "model.diffusion_model.out.2.weight"
    partial = tmp_path / "partial.safetensors"
    write_file(partial, {k: LazyTensor.of(source, k) for k in source if k != dropped})
    result = cli("verify", partial, "--config", tiny_pipeline, ok=False)
    assert "unet: 1 key missing (conv_out.weight)" in result.stdout


def test_cli_reports_each_path_and_fails_if_any_fails(hashed_file, tmp_path, cli):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(hashed_file.read_bytes()[:-10])
    ok = cli("verify", hashed_file, ok=True)
    assert ok.stdout.startswith("OK")
    result = cli("verify", hashed_file, bad, ok=False)
    assert "FAIL" in result.stdout and "truncated" in result.stdout
    assert result.stderr.startswith("error: 1 of 2")
    as_json = json.loads(cli("verify", hashed_file, bad, "--json", ok=False).stdout)
    assert [r["ok"] for r in as_json["files"]] == [True, False] and as_json["ok"] is False


def test_file_in_the_hub_cache_is_checked_against_its_blob_hash(hashed_file, tmp_path):
    """huggingface_hub names each blob by its LFS sha256: a cached file has a reference without a manifest."""
    repo = tmp_path / "hub" / "models--someone--mirror"
    data = bytearray(hashed_file.read_bytes())
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    cached = repo / "snapshots" / ("a" * 40) / "model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(blob)
    report = _only(verify_paths([cached]).files)
    assert report.ok and report.identity[0]["reference"].startswith("manifest: someone/mirror")
    data[-1] ^= 0x80
    blob.write_bytes(data)
    report = _only(verify_paths([cached]).files)
    assert not report.ok and "differs from manifest: someone/mirror" in report.problems[0]


def test_catalogue_name_with_the_wrong_size_fails_without_hashing(hashed_file, tmp_path):
    fake = tmp_path / "sdxl_lightning_4step_lora.safetensors"
    shutil.copy(hashed_file, fake)
    report = _only(verify_paths([fake]).files)
    assert not report.ok and "393854592" in report.problems[0] and report.sha256 is None


def test_unpinned_size_is_checked_by_hash_only(hashed_file, tmp_path):
    fake = tmp_path / "sdxl_lightning_8step_unet.safetensors"  # its catalogue size is unconfirmed
    shutil.copy(hashed_file, fake)
    report = _only(verify_paths([fake]).files)
    assert not report.ok and "sha256" in report.problems[0] and "471d8260" in report.problems[0]


def test_lightning_lora_maps_onto_sdxl_modules(tiny_lora, tmp_path):
    report = _only(verify_paths([tiny_lora]).files)
    assert report.ok and "architecture" in report.checks
    sd15 = tmp_path / "sd15_lora.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(sd15))
    report = _only(verify_paths([sd15]).files)
    assert not report.ok and "2 LoRA modules name nothing in SDXL" in report.problems[0]


def _not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model\n")
    return path


def _header_larger_than_file(tmp_path):
    path = tmp_path / "big-header.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    return path


def _empty_folder(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: tmp / "missing.safetensors", "no such file"),
    (_empty_folder, "no .safetensors files"),
    (_not_safetensors, "is a text file, not a weights file"),
    (_header_larger_than_file, "header claims 10000 bytes"),
])
def test_bad_input_is_a_one_line_failure(tmp_path, cli, make, reason):
    result = cli("verify", make(tmp_path), ok=False)
    assert reason in result.stdout and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and isinstance(result.exception, SystemExit)


def test_files_of_every_family_are_checked_against_the_catalogue(tiny_pipeline, tiny_lora, tmp_path):
    """DMD2 ships torch pickles: one with a pinned size (so a wrong size fails without hashing), one with none
    (said so); diffusers' default LoRA name (TCD, LCM-LoRA) is hashed against both and is not a claim."""
    from safetensors.torch import load_file

    unet = load_file(str(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    unpinned, sized = tmp_path / "dmd2_sdxl_1step_unet_fp16.bin", tmp_path / "dmd2_sdxl_1step_unet.bin"
    for path in (unpinned, sized):
        torch.save(unet, path)
    generic = shutil.copy(tiny_lora, tmp_path / "pytorch_lora_weights.safetensors")

    reports = verify_paths([unpinned, sized, generic], config_dir=tiny_pipeline).files

    assert reports[0].ok and "architecture" in reports[0].checks
    assert any("tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin has no pinned sha256" in n for n in reports[0].notes)
    assert not reports[1].ok and "10270866889" in reports[1].problems[0] and reports[1].sha256 is None
    assert reports[2].ok and reports[2].sha256 is not None
    assert any("not the LCM-LoRA or TCD file of that name" in n for n in reports[2].notes)
