"""Shared fixtures: tiny SDXL-architecture models built on the fly, an isolated hub cache, a CLI runner.

Nothing here reaches the network: HF_ENDPOINT points at a closed local port unless a test starts the local hub
server (tests/hubserver.py) and points it there.
"""

from __future__ import annotations

import os

os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubserver import hub_server  # noqa: F401  (the local hub server fixture, for every test file)

from lightning_tools.tiny import write_tiny_lightning_lora, write_tiny_pipeline


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and OpenMP's waiting makes them many times slower whenever another
    process shares the two cores: run the whole suite single-threaded."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_hub_cache(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A random-weight SDXL-architecture pipeline in diffusers layout. Read-only: copy it before changing it."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory) -> Path:
    """A Lightning-format LoRA (kohya keys, diffusers module names) that fits `tiny_pipeline`."""
    return write_tiny_lightning_lora(tmp_path_factory.mktemp("lora") / "tiny_lightning_4step_lora.safetensors")


@pytest.fixture
def pipeline_copy(tiny_pipeline, tmp_path) -> Path:
    """A private copy of the tiny pipeline that a test may change."""
    return Path(shutil.copytree(tiny_pipeline, tmp_path / "tiny-copy"))


@pytest.fixture
def cli():
    """Run `lightning-tools ARGS...` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from lightning_tools.cli import main

    def run(*args: str, ok: bool | None = None):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
        if ok is True:
            assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}{result.stderr}"
        if ok is False:
            assert result.exit_code != 0, result.output
        return result

    return run
