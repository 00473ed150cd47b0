"""Faults a real run meets, on real runs of `python -m lightning_tools`: SIGTERM, SIGHUP and SIGKILL mid-write,
two runs writing one output, a full disk, a file size limit, a read-only folder, `--overwrite` aimed at an input,
a hub that drops the connection or answers hostile revisions.

Each asserts the exit code, exactly one `error:` line, no traceback, no partial file left (after the next run's
sweep, for SIGKILL) and the inputs' sha256 unchanged. Runs are paused (SIGSTOP) at the moment under test, so
"mid-write" is checked, not hoped for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_tools import provenance as meta
from lightning_tools.errors import OutputError
from lightning_tools.extract import extract_lora
from lightning_tools.families import family
from lightning_tools.header import read_header
from lightning_tools.merge import merge
from lightning_tools.outputs import MARKER
from lightning_tools.tiny import sdxl_unet_config

REPO = Path(__file__).resolve().parents[1]


def _default_signals() -> None:
    """In the child: the signals the tests send at their default disposition, whatever the suite inherited (a
    run under nohup, or in a shell's background, ignores SIGHUP or SIGINT, and so would the tool)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def run(*args, before: Callable[[], None] | None = None) -> subprocess.Popen:
    """The tool in a child process; `before` runs in the child first (a resource limit, say)."""
    def start() -> None:
        _default_signals()
        if before:
            before()

    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # see conftest: threads only contend
    return subprocess.Popen([sys.executable, "-m", "lightning_tools", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=start)


def finish(proc: subprocess.Popen, code: int, *fragments: str) -> str:
    """Wait; assert the exit code, no traceback and exactly one `error:` line (returned) holding one of
    `fragments` (any line if none are given)."""
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == code, err
    if code == 0:
        assert not errors, err
        return ""
    assert len(errors) == 1, err
    assert not fragments or any(f in errors[0] for f in fragments), errors[0]
    return errors[0]


def temps(folder: Path, pid: int | None = None) -> list[Path]:
    mark = MARKER if pid is None else f"{MARKER}{pid}-"
    return [p for p in folder.rglob("*") if mark in p.name] if folder.exists() else []


def tree_size(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    return 0


def pause_when(procs: list[subprocess.Popen], folders: list[Path], sizes: list[int], timeout: float = 120) -> None:
    """SIGSTOP each run once its temporary output in its folder holds its size in bytes; fails if one finishes
    first."""
    waiting = dict(enumerate(procs))
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for i, proc in list(waiting.items()):
            found = [p for p in temps(folders[i], proc.pid) if p.parent == folders[i]]
            if found and tree_size(found[0]) >= sizes[i]:
                proc.send_signal(signal.SIGSTOP)
                del waiting[i]
            elif proc.poll() is not None:
                pytest.fail(f"finished before the point under test: {proc.communicate()[1]}")
        time.sleep(0.002)
    for proc in waiting.values():
        proc.kill()
    assert not waiting, "a run never reached the point under test"


def sha256(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256("".join(f"{p.relative_to(path)}:{sha256(p)}" for p in sorted(path.rglob("*"))
                                      if p.is_file()).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


BIG_UNET = sdxl_unet_config(width=48, heads_per_level=(1, 2, 4), text_widths=(32, 64), pooled_dim=32,
                            time_embed_dim=8, norm_groups=8) | {"sample_size": 32}


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    """A UNet of 53M parameters with SDXL's structure (210 MB, saved by diffusers): a run spends a while writing
    it."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("big") / "unet"
    torch.manual_seed(0)
    UNet2DConditionModel(**BIG_UNET).save_pretrained(folder)
    return {"unet": folder / "diffusion_pytorch_model.safetensors", "sha256": sha256(folder)}


# --- signals -------------------------------------------------------------------------------------------------------

def test_sigterm_and_sighup_mid_write_clean_up_and_say_so(big, tmp_path):
    """Three runs at once, each stopped at its point: as writing starts, and half written."""
    size = big["unet"].stat().st_size
    cases = [(signal.SIGTERM, 1), (signal.SIGTERM, size // 2), (signal.SIGHUP, size // 2)]
    folders = [tmp_path / f"out{i}" for i in range(len(cases))]
    procs = [run("convert", big["unet"], "--to", "comfyui-unet", "--out", folder / "unet.safetensors")
             for folder in folders]
    pause_when(procs, folders, [at for _, at in cases])
    for proc, folder, (signum, _) in zip(procs, folders, cases):
        assert 0 < tree_size(temps(folder)[0]) < size  # mid-write
        proc.send_signal(signum)
        proc.send_signal(signal.SIGCONT)
    for proc, folder, (signum, _) in zip(procs, folders, cases):
        finish(proc, 128 + signum, f"interrupted by {signum.name}: no partial output was kept")
        assert list(folder.iterdir()) == []
    assert sha256(big["unet"].parent) == big["sha256"]


def test_sigkill_leaves_temps_that_the_next_writer_sweeps(big, tiny_lora, tmp_path, cli):
    size = big["unet"].stat().st_size
    shutil.copy(tiny_lora, tmp_path / "lora.safetensors")
    procs = [run("convert", big["unet"], "--to", "comfyui-unet", "--out", tmp_path / f"unet{i}.safetensors")
             for i in range(2)]
    pause_when(procs, [tmp_path] * 2, [1, size // 2])
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = sum(tree_size(t) for t in temps(tmp_path))
    assert len(temps(tmp_path)) == 2 and [p.name for p in tmp_path.glob("*.safetensors")] == ["lora.safetensors"]

    noted = cli("verify", tmp_path / "lora.safetensors")
    assert noted.exit_code == 0 and "holds 2 partial outputs of killed runs" in noted.stderr
    swept = cli("convert", tmp_path / "lora.safetensors", "--to", "peft", "--out", tmp_path / "peft.safetensors")
    assert swept.exit_code == 0, swept.stderr
    assert f"removed 2 partial outputs of interrupted runs from {tmp_path} ({left / 1e6:.1f} MB freed)" \
        in swept.stderr
    assert temps(tmp_path) == [] and sha256(big["unet"].parent) == big["sha256"]


# --- two runs, one output ------------------------------------------------------------------------------------------

def _race(procs: list[subprocess.Popen], folder: Path) -> None:
    """Let every run get past its checks and start writing, then let them all finish."""
    pause_when(procs, [folder] * len(procs), [0] * len(procs))
    for proc in procs:
        proc.send_signal(signal.SIGCONT)


def _one_wins(procs: list[subprocess.Popen]) -> int:
    """Index of the run that published; every other one failed with one line and left the output alone."""
    codes = []
    for proc in procs:
        proc.wait(timeout=120)
        codes.append(proc.returncode)
    assert sorted(codes) == [0] + [1] * (len(procs) - 1), codes
    for proc in procs:  # a loser sees the output appear while it writes, or find it there when it starts writing
        finish(proc, proc.returncode, "appeared while this run was writing it", "already exists")
    return codes.index(0)


def test_concurrent_merges_to_one_file(tiny_pipeline, tiny_lora, tmp_path):
    out = tmp_path / "merged.safetensors"
    strengths = (0.5, 1.0)
    procs = [run("merge", "--base", tiny_pipeline, "--lora", tiny_lora, "--strength", s, "--out", out)
             for s in strengths]
    _race(procs, tmp_path)
    winner = _one_wins(procs)
    assert meta.read_sources(read_header(out).metadata)[1]["strength"] == strengths[winner]
    assert temps(tmp_path) == []


def _in_threads(*calls) -> list[BaseException | None]:
    """Run the calls at once, one thread each (in one process: no imports to wait for); what each raised."""
    start = threading.Barrier(len(calls))
    raised: list[BaseException | None] = [None] * len(calls)

    def go(i: int) -> None:
        start.wait()
        try:
            calls[i]()
        except BaseException as e:
            raised[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e is None for e in raised].count(True) == 1, raised
    assert all(isinstance(e, OutputError) and ("appeared while" in str(e) or "already exists" in str(e))
               for e in raised if e is not None), raised
    return raised


def test_concurrent_merges_to_one_folder(tiny_pipeline, tiny_lora, tmp_path):
    out = tmp_path / "merged"
    strengths = (0.5, 1.0)
    raised = _in_threads(*(lambda s=s: merge(tiny_pipeline, [tiny_lora], out, strengths=[s]) for s in strengths))
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert meta.read_sources(read_header(weights).metadata)[1]["strength"] == strengths[raised.index(None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and temps(tmp_path) == []


def test_concurrent_extracts_to_one_output(tiny_pipeline, tiny_lora, tmp_path):
    """Each extraction keeps its factors under its own temporary name: the winner's file is all its own."""
    tuned = tmp_path / "tuned.safetensors"
    merge(tiny_pipeline, [tiny_lora], tuned)
    out = tmp_path / "out" / "extracted.safetensors"
    ranks = (2, 4)
    raised = _in_threads(*(lambda r=r: extract_lora(tiny_pipeline, tuned, out, rank=r) for r in ranks))
    rank = ranks[raised.index(None)]
    tensors, metadata, _ = read_header(out)
    assert json.loads(metadata[meta.EXTRACT])["rank"] == rank
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {rank}
    assert [p.name for p in out.parent.iterdir()] == ["extracted.safetensors"]


# --- the disk says no ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str):
    """A small tmpfs at `where` when running as root and mounting works; skips the test otherwise."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and tmpfs to build a small or read-only filesystem")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_disk_full_is_one_line_and_leaves_nothing(tiny_pipeline, tmp_path, cli):
    with mounted_tmpfs(tmp_path / "small", "size=256k") as small:
        result = cli("convert", tiny_pipeline, "--to", "comfyui", "--out", small / "model.safetensors")
        assert result.exit_code == 1 and "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
            f"error: {small / 'model.safetensors'}: no space left on the device; free some space or write to "
            "another disk"]
        assert list(small.iterdir()) == [] and shutil.disk_usage(small).used < 64 * 1024


def test_file_size_limit_is_one_line_and_leaves_nothing(tiny_pipeline, tmp_path):
    before = sha256(tiny_pipeline)
    limit = 256 * 1024
    out = tmp_path / "model.safetensors"
    proc = run("convert", tiny_pipeline, "--to", "comfyui", "--out", out,
               before=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    finish(proc, 1, f"{out}: file too large for the file size limit (ulimit -f)")
    assert list(tmp_path.iterdir()) == [] and sha256(tiny_pipeline) == before


def test_read_only_output_folder_is_one_line(tiny_lora, tmp_path, cli):
    if os.geteuid() == 0:  # root writes through permission bits: make the filesystem itself read-only
        context, words = mounted_tmpfs(tmp_path / "ro", "ro,size=64k"), "on a read-only filesystem"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        context, words = contextlib.nullcontext(tmp_path / "ro"), "permission denied"
    with context as folder:
        for out in (folder / "peft.safetensors", folder / "sub" / "peft.safetensors"):
            result = cli("convert", tiny_lora, "--to", "peft", "--out", out)
            assert result.exit_code == 1 and result.stderr.count("error:") == 1 and words in result.stderr
            assert "Traceback" not in result.stderr and list(folder.iterdir()) == []


# --- never onto an input -------------------------------------------------------------------------------------------

def test_overwrite_aimed_at_an_input_is_refused(pipeline_copy, tiny_lora, tmp_path, cli):
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    base = Path(shutil.move(pipeline_copy, wrap / "base"))
    before = sha256(base)
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    for out, why in ((unet, "lies inside the input"), (wrap, "contains the input"), (base / "m", "lies inside")):
        for command in (["merge", "--base", base, "--lora", tiny_lora], ["convert", base, "--to", "diffusers"],
                        ["extract", "--base", base, "--tuned", unet, "--rank", 2]):
            result = cli(*command, "--out", out, "--overwrite")
            assert result.exit_code == 1 and result.stderr.count("error:") == 1 and why in result.stderr, \
                result.stderr
    render = ["render", base, "--device", "cpu", "--height", 64, "--width", 64, "--out"]
    card = ["publish", base, "--repo-id", "me/model", "--steps", 4, "--dry-run", "--card"]
    for command, out, why in ((render, base / "unet", "lies inside the input"), (render, wrap, "contains the input"),
                              (card, base / "model_index.json", "lies inside the input")):
        result = cli(*command, out, "--overwrite")
        assert result.exit_code == 1 and result.stderr.count("error:") == 1 and why in result.stderr, result.stderr
    assert sha256(base) == before and sorted(p.name for p in wrap.iterdir()) == ["base"]


# --- the hub -------------------------------------------------------------------------------------------------------

MIRROR = "someone/mirror"


def _serve(hub_server, handler_changes: dict) -> None:
    """Make the local hub misbehave: its request handler with some methods replaced."""
    handler = hub_server._httpd.RequestHandlerClass
    hub_server._httpd.RequestHandlerClass = type("Misbehaving", (handler,), handler_changes)


def test_hub_dropping_the_connection_is_one_quiet_line(hub_server, tmp_path):
    lora = family("lightning").find(4, "lora")
    data = os.urandom(200_000)
    hub_server.add_file(MIRROR, lora.filename, data)

    def resolve(self, repo, rev, path, query, body):
        if self._head:
            return type(self).__mro__[1].resolve(self, repo, rev, path, query, body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not self.headers.get("Range"):
            self.wfile.write(data[: len(data) // 2])  # half the file, then the connection drops
        self.wfile.flush()
        self.close_connection = True

    _serve(hub_server, {"resolve": resolve})
    dest = tmp_path / "models"
    proc = run("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, "--dest", dest)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.startswith(f"error: {lora.filename}: ") and len(err.splitlines()) == 1, err
    assert temps(dest) == [] and not (dest / lora.filename).exists()


@pytest.mark.parametrize("revision", ["../..", "/ABS", "refs/../../x", "main\nx"])
def test_fetch_revision_must_be_a_ref_name_or_a_commit(hub_server, cli, tmp_path, revision):
    lora = family("lightning").find(4, "lora")
    hub_server.add_file(MIRROR, lora.filename, b"x" * 1000)
    main = hub_server.repos[MIRROR].branches["main"]
    _serve(hub_server, {"_repo_at": lambda self, repo_id, rev: (self.server_state.repos[repo_id], main)})
    revision = revision.replace("/ABS", str(tmp_path / "outside" / "ref"))
    result = cli("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR, "--revision", revision)
    assert result.exit_code == 2 and result.stderr.count("error:") == 1 and "not a branch or tag name" in result.stderr
    assert not (tmp_path / "outside").exists() and hub_server.downloads[(MIRROR, lora.filename)] == 0


def test_commit_id_from_the_hub_must_be_40_hex(hub_server, cli, tmp_path):
    lora = family("lightning").find(4, "lora")
    data = b"x" * 1000
    hub_server.add_file(MIRROR, lora.filename, data)
    listed = {"rfilename": lora.filename, "size": len(data),
              "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 100}}

    def model_info(self, repo, rev, query, body):
        self._json({"id": repo, "sha": "../../../escape", "siblings": [listed]})

    main = hub_server.repos[MIRROR].branches["main"]
    _serve(hub_server, {"model_info": model_info,  # and it serves the file under any revision
                        "_repo_at": lambda self, repo_id, rev: (self.server_state.repos[repo_id], main)})
    result = cli("fetch", "--steps", 4, "--kind", "lora", "--repo-id", MIRROR)
    assert result.exit_code == 1 and result.stderr.count("error:") == 1 and "not 40 hex digits" in result.stderr
    assert hub_server.downloads[(MIRROR, lora.filename)] == 0
    assert [p.name for p in Path(os.environ["HF_HOME"]).iterdir()] in ([], ["hub"])  # nothing beside the cache
