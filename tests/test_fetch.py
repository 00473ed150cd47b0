"""`fetch` against the local hub server (tests/hubserver.py): real huggingface_hub downloads, no network.

The official files' bytes cannot be produced in a test (we only know their hashes), so the official repo id is
tested for refusal (wrong bytes served under it), and acceptance is tested through a mirror repo, whose expected
hash is the LFS sha256 the (local) hub lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lightning_tools import hub
from lightning_tools.families import family

LIGHTNING = family("lightning")
LORA4 = LIGHTNING.find(4, "lora")
UNET8 = LIGHTNING.find(8, "unet")  # its size is unconfirmed, so only its hash decides
MIRROR = "someone/sdxl-lightning-mirror"


def payload(seed: int, size: int = 6000) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_blobs() -> list[Path]:
    return [p for p in Path(os.environ["HF_HUB_CACHE"]).rglob("blobs/*") if p.is_file()]


def test_mirror_fetch_verifies_and_records_manifest(hub_server, cli, tmp_path):
    data = payload(1)
    hub_server.add_file(MIRROR, LORA4.filename, data)
    dest = tmp_path / "models"

    result = cli("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, "--dest", dest, "--json", ok=True)

    [record] = json.loads(result.stdout)
    assert Path(record["path"]) == dest / LORA4.filename
    assert (dest / LORA4.filename).read_bytes() == data
    assert record["sha256"] == sha(data) and record["action"] == "downloaded" and record["official"] is False
    entry = hub.manifest_entry(dest / LORA4.filename)
    assert entry == {"repo_id": MIRROR, "revision": hub_server.repos[MIRROR].branches["main"],
                     "sha256": sha(data), "size": len(data)}
    assert hub_server.downloads[(MIRROR, LORA4.filename)] == 1


def test_verify_of_a_mirror_file_checks_it_against_its_manifest(hub_server, cli, tmp_path, tiny_lora):
    """The manifest beside the file is the more specific record: a mirror's bytes under the official name pass,
    with a note that they are not the official release (fetch says so too); damaged bytes still fail."""
    data = tiny_lora.read_bytes()
    hub_server.add_file(MIRROR, LORA4.filename, data)
    fetch = cli("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, "--dest", tmp_path, ok=True)
    assert "not the official release of that name" in fetch.stderr
    fetched = tmp_path / LORA4.filename

    result = cli("verify", fetched, ok=True)
    assert result.stdout.startswith("OK") and "not the official release" in result.stdout
    assert f"manifest: {MIRROR}" in result.stdout

    fetched.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "differs from manifest" in cli("verify", fetched, ok=False).stdout


def test_second_fetch_to_dest_downloads_nothing(hub_server, cli, tmp_path):
    hub_server.add_file(MIRROR, LORA4.filename, payload(2))
    args = ("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, "--dest", tmp_path, "--json")
    cli(*args, ok=True)

    again = json.loads(cli(*args, ok=True).stdout)

    assert again[0]["action"] == "already present"
    assert hub_server.downloads[(MIRROR, LORA4.filename)] == 1


def test_second_fetch_from_cache_downloads_nothing_and_cache_path_has_identity(hub_server, cli):
    data = payload(3)
    hub_server.add_file(MIRROR, LORA4.filename, data)
    args = ("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR)
    first = cli(*args, ok=True).stdout.strip()
    second = cli(*args, ok=True).stdout.strip()

    assert first == second and Path(first).read_bytes() == data
    assert Path(first).is_relative_to(os.environ["HF_HUB_CACHE"])
    assert hub_server.downloads[(MIRROR, LORA4.filename)] == 1
    assert hub.manifest_entry(first)["sha256"] == sha(data)  # the cache's blob name, no manifest file needed


def test_official_repo_refuses_bytes_the_hub_lists_with_another_hash(hub_server, cli, tmp_path):
    """An honest hub listing a different sha256 than the catalogue: refused before any byte is downloaded."""
    data = payload(4)
    hub_server.add_file(LIGHTNING.repo_id, UNET8.filename, data)

    result = cli("fetch", "--steps", 8, "--kind", "unet", "--revision", "main", "--dest", tmp_path, ok=False)

    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    assert UNET8.filename in message and sha(data) in message and UNET8.sha256 in message
    assert hub_server.downloads[(LIGHTNING.repo_id, UNET8.filename)] == 0
    assert not (tmp_path / UNET8.filename).exists()


def test_official_repo_refuses_wrong_bytes_after_download_and_cleans_cache(hub_server, cli, tmp_path):
    """A hub whose metadata claims the pinned hash but serves other bytes: caught by hashing what arrived."""
    data = payload(5)
    hub_server.add_file(LIGHTNING.repo_id, UNET8.filename, data, sha256=UNET8.sha256)
    dest = tmp_path / "dest"

    result = cli("fetch", "--steps", 8, "--kind", "unet", "--revision", "main", "--dest", dest, ok=False)

    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert UNET8.filename in message and sha(data) in message and UNET8.sha256 in message
    assert hub_server.downloads[(LIGHTNING.repo_id, UNET8.filename)] == 1
    assert not (dest / UNET8.filename).exists() and not list(dest.glob("*"))
    assert cache_blobs() == []


def test_official_lora_with_wrong_size_is_refused_before_download(hub_server, cli):
    hub_server.add_file(LIGHTNING.repo_id, LORA4.filename, payload(6), sha256=LORA4.sha256)

    result = cli("fetch", "--steps", 4, "--kind", "lora", "--revision", "main", ok=False)

    assert "393854592" in result.stderr and LORA4.filename in result.stderr
    assert hub_server.downloads[(LIGHTNING.repo_id, LORA4.filename)] == 0


def test_mirror_serving_other_bytes_than_it_lists_is_refused(hub_server, cli, tmp_path):
    data = payload(7)
    listed = sha(b"what the mirror claims")
    hub_server.add_file(MIRROR, LORA4.filename, data, sha256=listed)

    result = cli("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, "--dest", tmp_path, ok=False)

    assert listed in result.stderr and sha(data) in result.stderr
    assert not (tmp_path / LORA4.filename).exists()
    assert cache_blobs() == []


def test_damaged_cache_entry_is_replaced_by_a_fresh_download(hub_server, cli):
    data = payload(8)
    hub_server.add_file(MIRROR, LORA4.filename, data)
    args = ("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR)
    path = Path(cli(*args, ok=True).stdout.strip())
    blob = Path(os.path.realpath(path))
    blob.write_bytes(b"\0" * len(data))  # bit rot, or another tool writing into the cache

    again = Path(cli(*args, ok=True).stdout.strip())

    assert again.read_bytes() == data
    assert hub_server.downloads[(MIRROR, LORA4.filename)] == 2


def test_existing_different_file_at_dest_needs_overwrite(hub_server, cli, tmp_path):
    data = payload(9)
    hub_server.add_file(MIRROR, LORA4.filename, data)
    (tmp_path / LORA4.filename).write_bytes(b"someone else's file")
    args = ("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, "--dest", tmp_path)

    refused = cli(*args, ok=False)
    assert "--overwrite" in refused.stderr
    assert (tmp_path / LORA4.filename).read_bytes() == b"someone else's file"

    cli(*args, "--overwrite", ok=True)
    assert (tmp_path / LORA4.filename).read_bytes() == data


def test_offline_mode_uses_the_cache_and_explains_a_miss(hub_server, cli, monkeypatch):
    hub_server.add_file(MIRROR, LORA4.filename, payload(10))
    hub_server.add_file(MIRROR, "sdxl_lightning_8step_lora.safetensors", payload(11))
    path = cli("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, ok=True).stdout.strip()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub_server.requests)

    assert cli("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, ok=True).stdout.strip() == path
    missing = cli("fetch", "--steps", 8, "--kind", "lora", "--repo-id", MIRROR, ok=False)

    assert len(hub_server.requests) == before
    assert "HF_HUB_OFFLINE" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, expected", [
    (("--repo-id", "nobody/nothing"), "repository not found"),
    (("--repo-id", MIRROR, "--revision", "v9"), "revision 'v9' not found"),
    (("--repo-id", MIRROR, "--steps", 2), "no file sdxl_lightning_2step_lora.safetensors"),
])
def test_unknown_repo_revision_or_file_is_one_line(hub_server, cli, args, expected):
    hub_server.add_file(MIRROR, LORA4.filename, payload(12))
    if "--steps" not in args:
        args += ("--steps", 4)

    result = cli("fetch", "--kind", "lora", *args, ok=False)

    assert result.exit_code == 1 and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_unreachable_hub_is_one_line_and_quick(cli):
    """conftest points HF_ENDPOINT at a closed port: no retries for minutes, one line saying what happened."""
    result = cli("fetch", "--steps", 4, "--kind", "lora", ok=False)

    assert "cannot reach" in result.stderr and "not in the hub cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fetch_needs_a_selection(cli):
    assert "--steps" in cli("fetch", ok=False).stderr


def test_a_hash_not_pinned_is_checked_against_the_official_listing_and_said_so(hub_server, cli, tmp_path):
    """PCM's 16-step LoRA has no sha256 in the catalogue: the family's own repo lists one, and the bytes must match
    it. The file lives under sdxl/ in the repo and lands in --dest under its own name."""
    pcm = family("pcm")
    wanted = pcm.find(16, "lora")
    data = payload(13)
    hub_server.add_file(pcm.repo_id, wanted.filename, data)

    result = cli("fetch", "--family", "pcm", "--steps", 16, "--kind", "lora", "--revision", "main", "--dest",
                 tmp_path, ok=True)

    assert result.stdout.strip() == str(tmp_path / wanted.name) and (tmp_path / wanted.name).read_bytes() == data
    assert "not pinned in the catalogue" in result.stderr and wanted.filename.startswith("sdxl/")
    record = json.loads(cli("fetch", "--family", "pcm", "--steps", 16, "--kind", "lora", "--revision", "main",
                            "--dest", tmp_path, "--json", ok=True).stdout)[0]
    assert (record["pinned"], record["official"], record["path_in_repo"], record["sha256"]) == \
        (False, True, wanted.filename, sha(data))
    assert record["action"] == "already present" and hub.manifest_entry(tmp_path / wanted.name)["sha256"] == sha(data)

    lying = family("dmd2").find(1, "unet")  # a torch pickle whose hash is not pinned either
    hub_server.add_file(family("dmd2").repo_id, lying.filename, payload(14), lfs=True,
                        sha256=sha(b"what the hub claims"))
    refused = cli("fetch", "--family", "dmd2", "--steps", 1, "--kind", "unet", "--revision", "main", ok=False)
    assert sha(b"what the hub claims") in refused.stderr and "not pinned in the catalogue" in refused.stderr


def test_variant_picks_among_files_of_the_same_steps_and_kind(hub_server, cli):
    hub_server.add_file(family("dmd2").repo_id, "README.md", b"card")
    result = cli("fetch", "--family", "dmd2", "--steps", 4, "--kind", "unet", "--variant", "pickle", "--revision",
                 "main", ok=False)
    assert "no file dmd2_sdxl_4step_unet_fp16.bin" in result.stderr
    unknown = cli("fetch", "--family", "dmd2", "--steps", 4, "--kind", "unet", "--variant", "bf16", ok=False)
    assert "choose one with --variant" in unknown.stderr and "pickle (dmd2_sdxl_4step_unet_fp16.bin)" in unknown.stderr
