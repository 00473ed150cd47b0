"""Recipes: a TOML file of named steps (fetch, merge, convert, verify, inspect, render, publish, extract).

A step is one `lightning-tools` command written as a table: `run` names the command, the other keys are its
options (`strength = [0.9, 0.5]` repeats an option, `true` sets a flag). Strings may use `{name}`, where name
is a variable from `[vars]` (or `--set name=value`) or an earlier step, meaning that step's output; an option
that comes out empty is left out, so optional settings can stay blank in `[vars]`. The whole
recipe is checked before anything runs, and a step whose inputs, options and outputs are unchanged since its
last successful run is skipped, so re-running a recipe is cheap.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from lightning_tools.errors import UserError
from lightning_tools.tensors import atomic_output, hash_file

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STEP_COMMANDS = ("fetch", "merge", "convert", "verify", "inspect", "render", "publish", "extract")
# The option holding a step's output, which later steps refer to as {step_name}.
OUTPUT_OPTION = {"fetch": "dest", "merge": "out", "convert": "out", "render": "out", "extract": "out"}
# Options that name existing files or folders: they must exist (or be an earlier step's output) and are hashed.
INPUT_OPTIONS = frozenset({"src", "paths", "path", "model", "base", "lora", "config", "reference", "tuned",
                           "prompts", "validation"})
STATE_FILE = ".lightning-recipe-state.json"
DEFAULT_WORKDIR = "lightning-build"
_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(UserError):
    """A recipe that cannot run as written; the message names the file and line."""


@dataclass
class Step:
    name: str
    command: str
    options: dict[str, Any]
    line: int


@dataclass
class Recipe:
    path: Path
    vars: dict[str, Any]
    steps: list[Step]
    lines: list[str] = field(repr=False, default_factory=list)

    @property
    def workdir(self) -> Path:
        return Path(str(self.vars.get("workdir", DEFAULT_WORKDIR)))

    def where(self, step: Step, key: str | None = None) -> str:
        """`file:line` of a step, or of one of its keys when it can be found."""
        line = step.line
        if key is not None:
            for i in range(step.line, min(len(self.lines), step.line + 200) + 1):
                if i > step.line and self.lines[i - 1].lstrip().startswith("["):
                    break
                if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i - 1]):
                    line = i
                    break
        return f"{self.path}:{line}"


def _commands() -> Mapping[str, click.Command]:
    from lightning_tools.cli import main

    return main.commands


def _params(command: click.Command) -> dict[str, click.Parameter]:
    """Recipe key -> click parameter: the parameter name and each long option spelled with - or _."""
    out: dict[str, click.Parameter] = {}
    for p in command.params:
        out[p.name] = p
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                out[opt[2:]] = out[opt[2:].replace("-", "_")] = p
    return out


def _parse_set(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = value
    return out


def load_recipe(path: Path | str, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Parse and validate a recipe; every problem is a RecipeError naming the line, before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    lines = text.splitlines()
    unknown = set(data) - {"vars", "steps", "description"}
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {sorted(unknown)}; a recipe has [vars] and [[steps]]")
    variables = dict(data.get("vars", {})) | _parse_set(overrides)
    headers = [i + 1 for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*steps\s*\]\]", line)]
    raw_steps = data.get("steps", [])
    if not raw_steps:
        raise RecipeError(f"{path}: no [[steps]]: nothing to run")
    recipe = Recipe(path, variables, [], lines)
    commands = _commands()
    for i, raw in enumerate(raw_steps):
        line = headers[i] if i < len(headers) else 1
        options = dict(raw)
        name, command = options.pop("name", f"step{i + 1}"), options.pop("run", None)
        step = Step(str(name), str(command), options, line)
        if command not in STEP_COMMANDS or command not in commands:
            raise RecipeError(f"{recipe.where(step, 'run')}: step {name!r}: `run = {command!r}` is not one of "
                              f"{', '.join(c for c in STEP_COMMANDS if c in commands)}")
        if step.name in variables or any(s.name == step.name for s in recipe.steps):
            raise RecipeError(f"{recipe.where(step, 'name')}: step name {step.name!r} is already used")
        params = _params(commands[command])
        for key in options:
            if key not in params or key in ("json", "as_json"):
                raise RecipeError(f"{recipe.where(step, key)}: step {name!r}: `{command}` has no option {key!r}")
        recipe.steps.append(step)
    _check_references(recipe)
    return recipe


def _check_references(recipe: Recipe) -> None:
    earlier: set[str] = set()
    names = {s.name for s in recipe.steps}
    for step in recipe.steps:
        for key, value in step.options.items():
            for ref in _refs(value):
                if ref in recipe.vars or ref in earlier:
                    continue
                why = "runs later" if ref in names else "is neither a variable nor a step"
                raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r} uses {{{ref}}}, which {why}")
            if key in INPUT_OPTIONS:
                for item in _as_list(value):
                    if isinstance(item, str) and not (set(_refs(item)) & earlier):
                        resolved = _substitute(item, recipe.vars)
                        if resolved and not Path(resolved).exists():
                            raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: input {resolved} "
                                              "does not exist and no earlier step makes it")
        if OUTPUT_OPTION.get(step.command) in step.options or step.command not in OUTPUT_OPTION:
            earlier.add(step.name)
        else:
            raise RecipeError(f"{recipe.where(step)}: step {step.name!r}: `{step.command}` needs "
                              f"`{OUTPUT_OPTION[step.command]}` in a recipe so later steps can find its output")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _refs(value: Any) -> list[str]:
    return [m for item in _as_list(value) if isinstance(item, str) for m in _REF.findall(item)]


def _substitute(value: Any, names: Mapping[str, Any]) -> Any:
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    if not isinstance(value, str):
        return value
    return _REF.sub(lambda m: str(names[m.group(1)]) if m.group(1) in names else m.group(0), value)


def _argv(command: click.Command, options: Mapping[str, Any]) -> list[str]:
    """The command line for resolved options (arguments first, then options in recipe order)."""
    params = _params(command)
    positional: list[str] = []
    argv: list[str] = []
    for key, value in options.items():
        p = params[key]
        if value == "" or value == []:  # an empty setting (say `config = ""`) means: leave the option out
            continue
        if isinstance(p, click.Argument):
            positional += [str(v) for v in _as_list(value)]
            continue
        flag = next(o for o in p.opts if o.startswith("--"))
        if getattr(p, "is_flag", False):
            if value:
                argv.append(flag)
        else:
            for v in _as_list(value):
                argv += [flag, str(v)]
    return positional + argv


def _fingerprint(path: Path, cache: dict[str, dict]) -> str:
    """sha256 of a file or folder; a file whose size and mtime match the cache is not hashed again."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = []
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        hit = cache.get(key)
        if not hit or hit["size"] != st.st_size or hit["mtime_ns"] != st.st_mtime_ns:
            hit = cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hash_file(f)}
        parts.append(f"{f.relative_to(path) if path.is_dir() else f.name}:{hit['sha256']}")
    return "\n".join(parts)


@dataclass
class StepResult:
    name: str
    command: str
    argv: list[str]
    status: str  # "ran" | "skipped" | "planned"
    output: str | None = None
    result: Any = None


def run_recipe(recipe: Recipe, dry_run: bool = False, echo: Callable[[str], None] = lambda s: None,
               obj: dict | None = None, json_results: bool = False) -> list[StepResult]:
    """Run (or with dry_run, plan) every step in order; returns what happened to each.

    Each command's own report is echoed, indented, under its step; with `json_results` the steps' results are
    their `--json` output instead (a fetch always reports in JSON: its output path is read from it).
    """
    commands = _commands()
    state_path = recipe.workdir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"steps": {}, "hashes": {}}
    names: dict[str, Any] = dict(recipe.vars)
    results = []
    for step in recipe.steps:
        command = commands[step.command]
        options = {k: _substitute(v, names) for k, v in step.options.items()}
        out_key = OUTPUT_OPTION.get(step.command)
        output = str(options[out_key]) if out_key else None
        argv = _argv(command, options)
        names[step.name] = output
        if dry_run:
            echo(f"[plan] {step.name}: lightning-tools {step.command} {' '.join(argv)}")
            results.append(StepResult(step.name, step.command, argv, "planned", output))
            continue
        inputs = {f"{key}={v}": _fingerprint(Path(v), state["hashes"]) for key, value in options.items()
                  if key in INPUT_OPTIONS for v in _as_list(value) if v != "" and Path(str(v)).exists()}
        record = {"argv": argv, "inputs": inputs}
        previous = state["steps"].get(step.name)
        if previous and {k: previous[k] for k in record} == record and (output is None or Path(output).exists()):
            names[step.name] = previous.get("output", output)
            echo(f"[skip] {step.name}: inputs and options unchanged since the last run")
            results.append(StepResult(step.name, step.command, argv, "skipped", names[step.name]))
            continue
        replace = previous is not None and output is not None and Path(output).exists()
        full = argv + (["--overwrite"] if replace and "overwrite" in _params(command) else [])
        echo(f"[run]  {step.name}: lightning-tools {step.command} {' '.join(full)}")
        result = _invoke(recipe, step, command, full, obj, json_results or step.command == "fetch")
        if isinstance(result, str):
            for line in result.strip().splitlines():
                echo(f"         {line}")
        if step.command == "fetch":
            names[step.name] = output = _fetched_path(result) or output
        results.append(StepResult(step.name, step.command, argv, "ran", names[step.name], result))
        state["steps"][step.name] = record | {"output": names[step.name]}
        with atomic_output(state_path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(state, indent=1))
    return results


def _invoke(recipe: Recipe, step: Step, command: click.Command, argv: list[str], obj: dict | None,
            as_json: bool) -> Any:
    """Run one command in-process; its printed report (parsed, with `as_json`) is the result."""
    want_json = as_json and "as_json" in _params(command)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            command.main(args=argv + (["--json"] if want_json else []), prog_name=f"lightning-tools {step.command}",
                         standalone_mode=False, obj=dict(obj or {}))
    except UserError as e:
        raise RecipeError(f"{recipe.where(step)}: step {step.name!r} failed: {e}") from e
    except click.ClickException as e:
        raise RecipeError(f"{recipe.where(step)}: step {step.name!r}: {e.format_message()}") from e
    text = buffer.getvalue()
    try:
        return json.loads(text) if want_json and text.strip() else text
    except json.JSONDecodeError:
        return text


def _fetched_path(result: Any) -> str | None:
    """The single file a fetch step produced, so `{step}` can name it directly."""
    paths = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("path"), str):
                paths.append(x["path"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(result)
    return paths[0] if len(paths) == 1 else None
