"""Every mistake on the command line is one `error:` line with exit 2 (click's own usage errors included), a bad
input is one line with exit 1, and `--debug` anywhere on the line (or LIGHTNING_TOOLS_DEBUG=1) shows the
traceback instead."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_tools.cli import main

# A bad value, an unknown option and a missing required option or argument for every subcommand.
BAD = {
    "catalog": [["--steps", "four"], ["--kind", "checkpoint"], ["--nope"]],
    "fetch": [["--steps", "x"], ["--kind", "nope"], ["--bogus"], []],
    "verify": [[], ["--deep=yes", "x"], ["--nope", "x"]],
    "inspect": [[], ["a", "b"], ["--nope", "x"]],
    "convert": [["x"], ["x", "--to", "png", "--out", "y"], ["x", "--to", "comfyui"]],
    "merge": [["--base", "b", "--lora", "l", "--out", "o", "--strength", "abc"], ["--lora", "l", "--out", "o"],
              ["--base", "b", "--lora", "l", "--out", "o", "--dtype", "fp8x"]],
    "extract": [["--base", "b", "--tuned", "t", "--out", "o"], ["--base", "b", "--tuned", "t", "--out", "o",
                                                                "--rank", "0"],
                ["--base", "b", "--tuned", "t", "--out", "o", "--rank", "4", "--format", "zip"]],
    "render": [[], ["m", "--height", "tall"], ["m", "--batch-size", "0"]],
    "run": [[], ["r.toml", "--set"], ["r.toml", "--nope"]],
    "publish": [["x"], ["x", "--repo-id"], ["x", "--repo-id", "a/b", "--steps", "many"]],
    "demo": [["a", "b"], ["--nope"]],
}
CASES = [(command, args) for command, variants in BAD.items() for args in variants]


@pytest.mark.parametrize("command, args", CASES, ids=[f"{c}-{i}" for c, v in BAD.items() for i in range(len(v))])
def test_usage_errors_are_one_line_with_exit_2(cli, command, args):
    result = cli(command, *args, ok=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "Usage:" not in result.output
    assert f"lightning-tools {command} --help" in lines[0]


def test_an_unknown_command_is_one_line(cli):
    result = cli("mrege", ok=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "mrege" in result.stderr


def test_a_missing_input_is_exit_1(cli, tmp_path):
    result = cli("inspect", tmp_path / "missing.safetensors", ok=False)
    assert result.exit_code == 1 and result.stderr == f"error: {tmp_path / 'missing.safetensors'}: no such file or folder\n"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_tools", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_anywhere_shows_the_traceback(tmp_path, where):
    missing = str(tmp_path / "missing.safetensors")
    args = ["--debug", "inspect", missing] if where == "first" else ["inspect", missing, "--debug"]
    result = _run(*args)
    assert result.returncode != 0 and "Traceback" in result.stderr and "no such file" in result.stderr


def test_debug_from_the_environment(tmp_path):
    import os

    result = _run("inspect", str(tmp_path / "missing.safetensors"), env=os.environ | {"LIGHTNING_TOOLS_DEBUG": "1"})
    assert "Traceback" in result.stderr


def test_help_and_version_exit_0(cli):
    assert cli("--help", ok=True).stdout.startswith("Usage:")
    assert "lightning-tools" in cli("--version", ok=True).stdout
    assert "Usage:" in cli("merge", "--help", ok=True).stdout


def test_no_command_shows_help(cli):
    result = cli()
    assert result.exit_code == 0 and "Commands:" in result.stdout


def test_main_is_the_group(tmp_path):
    assert "render" in main.commands and "merge" in main.commands
