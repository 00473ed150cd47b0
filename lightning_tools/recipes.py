"""Recipes: a TOML file of named steps (fetch, merge, convert, verify, inspect, render, publish, extract).

A step is one `lightning-tools` command written as a table: `run` names the command, the other keys are its
options (`strength = [0.9, 0.5]` repeats an option, `true` sets a flag). Strings may use `{name}`, where name
is a variable from `[vars]` (or `--set name=value`) or an earlier step, meaning that step's output; an option
that comes out empty is left out, so optional settings can stay blank in `[vars]`. The whole recipe is checked
before anything runs.

The runner owns what its steps write. Its state file in `workdir` records, per step, the command line, the
fingerprints of the inputs, the outputs it wrote with their fingerprints, and whether the step succeeded. A step
runs again when any of these changed, when it failed last time, or when forced; it then replaces its own earlier
outputs, and refuses (one line) to replace a file it did not write or that changed since. A failed step shows
the command's own error and exits with its code (3 for a failed render gate), so the next run retries it.

The runner never imports the CLI: the CLI hands it the table of click commands, and a step's result is the value
its command returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import click

from lightning_tools.errors import UserError
from lightning_tools.outputs import output
from lightning_tools.tensors import hash_file

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STEP_COMMANDS = ("fetch", "merge", "convert", "verify", "inspect", "render", "publish", "extract", "lora resize",
                 "lora combine")
# The options naming what a step writes: the runner records these paths and replaces them when the step runs
# again. The first is the step's output, which later steps call {step}; a fetch step's output is the file it put
# in `dest` (the folder itself is shared, so the runner owns only the fetched files).
OUTPUT_OPTIONS: dict[str, tuple[str, ...]] = {
    "fetch": ("dest",), "merge": ("out",), "convert": ("out",), "render": ("out", "comfyui_workflow"),
    "extract": ("out",), "publish": ("card",), "lora resize": ("out",), "lora combine": ("out",)}
# Commands whose output a recipe must place itself, so that later steps can find it.
NEEDS_OUTPUT = frozenset({"fetch", "merge", "convert", "render", "extract", "lora resize", "lora combine"})
# Options that name existing files or folders: they must exist (or be an earlier step's output) and are hashed.
INPUT_OPTIONS = frozenset({"src", "paths", "path", "model", "base", "lora", "loras", "config", "reference", "tuned",
                           "add_difference", "add-difference", "minus",
                           "prompts", "validation"})
# Parameters the runner sets itself: it replaces only what it wrote, and reads results as values, not JSON.
RUNNER_PARAMETERS = frozenset({"overwrite", "as_json"})
STATE_FILE = ".lightning-recipe-state.json"
LOCK_FILE = ".lightning-recipe.lock"
DEFAULT_WORKDIR = "lightning-build"
# Inputs are hashed, so they must be plain files: nothing under these (live kernel files, devices).
SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SCALARS = (str, int, float, bool)


class RecipeError(UserError):
    """A recipe that cannot run as written; the message names the file and line."""


class StepFailed(RecipeError):
    """A step's command failed: its own message, and its own exit code (3 for a failed render gate)."""

    def __init__(self, message: str, *, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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
    commands: Mapping[str, click.Command] = field(repr=False)
    lines: list[str] = field(repr=False, default_factory=list)

    @property
    def workdir(self) -> Path:
        return Path(str(self.vars.get("workdir", DEFAULT_WORKDIR)))

    def where(self, step: Step | None, key: str | None = None) -> str:
        """`file:line` of a step (None: the top of the file), or of one of its keys when it can be found."""
        start = step.line if step is not None else 1
        line = start
        if key is not None:
            for i in range(start, min(len(self.lines), start + 200) + 1):
                if i > start and re.match(r"\s*\[\[", self.lines[i - 1]):
                    break
                if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i - 1]):
                    line = i
                    break
        return f"{self.path}:{line}"


def _params(command: click.Command) -> dict[str, click.Parameter]:
    """Recipe key -> click parameter: the parameter name and each long option spelled with - or _."""
    out: dict[str, click.Parameter] = {}
    for p in command.params:
        out[p.name] = p
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                out[opt[2:]] = out[opt[2:].replace("-", "_")] = p
    return out


def _parse_set(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = value
    return out


def _parse(path: Path) -> tuple[dict[str, Any], list[str]]:
    if not path.is_file():
        raise RecipeError("no such recipe file", path=path)
    try:
        text = path.read_text()
        return tomllib.loads(text), text.splitlines()
    except UnicodeDecodeError:
        raise RecipeError("not a text file; a recipe is TOML", path=path) from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"not valid TOML: {e}", path=path) from None
    except RecursionError:
        raise RecipeError("nested too deeply to be a recipe (arrays or tables inside each other)", path=path) from None


def load_recipe(path: Path | str, overrides: Sequence[str] = (), *, commands: Mapping[str, click.Command],
                allow_outside: bool = False) -> Recipe:
    """Parse and validate a recipe; every problem is a RecipeError naming the line, before anything runs.

    `commands` is the CLI's table of click commands: the steps run them, and their parameters are the keys a
    step may use. `allow_outside` lets `workdir` lie outside the recipe's folder tree (never at `/`).
    """
    path = Path(path)
    data, lines = _parse(path)
    unknown = set(data) - {"vars", "steps", "description"}
    if unknown:
        raise RecipeError(f"unknown top-level key(s) {sorted(unknown)}; a recipe has [vars] and [[steps]]", path=path)
    raw_vars, raw_steps = data.get("vars", {}), data.get("steps", [])
    if not isinstance(raw_vars, dict) or not isinstance(raw_steps, list) or not all(
            isinstance(s, dict) for s in raw_steps):
        raise RecipeError("[vars] must be a table and each [[steps]] a table of options", path=path)
    recipe = Recipe(path, dict(raw_vars) | _parse_set(overrides), [], commands, lines)
    for key, value in recipe.vars.items():
        if not isinstance(value, _SCALARS):
            raise RecipeError(f"{recipe.where(None, key)}: variable {key!r} must be a string, number or boolean")
    if not raw_steps:
        raise RecipeError("no [[steps]]: nothing to run", path=path)
    headers = [i + 1 for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*steps\s*\]\]", line)]
    for i, raw in enumerate(raw_steps):
        options = dict(raw)
        step = Step(str(options.pop("name", f"step{i + 1}")), str(options.pop("run", None)), options,
                    headers[i] if i < len(headers) else 1)
        _check_step(recipe, step)
        recipe.steps.append(step)
    _check_workdir(recipe, allow_outside)
    _check_references(recipe)
    return recipe


def _check_step(recipe: Recipe, step: Step) -> None:
    if step.command not in STEP_COMMANDS or step.command not in recipe.commands:
        raise RecipeError(f"{recipe.where(step, 'run')}: step {step.name!r}: `run = {step.command!r}` is not one of "
                          f"{', '.join(c for c in STEP_COMMANDS if c in recipe.commands)}")
    if step.name in recipe.vars or any(s.name == step.name for s in recipe.steps):
        raise RecipeError(f"{recipe.where(step, 'name')}: step name {step.name!r} is already used")
    params = _params(recipe.commands[step.command])
    for key, value in step.options.items():
        if key not in params:
            raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: `{step.command}` has no option {key!r}")
        if params[key].name in RUNNER_PARAMETERS:
            raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: `{key}` is the runner's to set: it "
                              "replaces the outputs it wrote and nothing else")
        if not all(isinstance(v, _SCALARS) for v in _as_list(value)):
            raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: `{key}` must be a string, number, "
                              "boolean or a list of them")


def _check_workdir(recipe: Recipe, allow_outside: bool) -> None:
    """The runner writes its state, lock and outputs in `workdir`: keep it where the recipe lives."""
    workdir = recipe.workdir.resolve()
    where = recipe.where(None, "workdir")
    if workdir == Path(workdir.anchor):
        raise RecipeError(f"{where}: workdir {recipe.workdir} is the filesystem root; give the recipe a folder of "
                          "its own")
    home = recipe.path.resolve().parent
    if not allow_outside and not workdir.is_relative_to(home):
        raise RecipeError(f"{where}: workdir {recipe.workdir} ({workdir}) is outside the recipe's folder {home}; "
                          "copy the recipe beside your work, or pass --allow-outside if that folder is meant")


def _check_references(recipe: Recipe) -> None:
    seen: set[str] = set()
    with_output: set[str] = set()
    names = {s.name for s in recipe.steps}
    for step in recipe.steps:
        for key, value in step.options.items():
            for ref in _refs(value):
                if ref in recipe.vars or ref in with_output:
                    continue
                why = ("writes no output to use" if ref in seen else "runs later" if ref in names
                       else "is neither a variable nor a step")
                raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r} uses {{{ref}}}, which {why}")
            if key in INPUT_OPTIONS:
                for item in _as_list(value):
                    if isinstance(item, str) and not (set(_refs(item)) & with_output):
                        _check_input(recipe, step, key, _substitute(item, recipe.vars))
        seen.add(step.name)
        output_key = OUTPUT_OPTIONS.get(step.command, (None,))[0]
        if output_key in step.options:
            with_output.add(step.name)
        elif step.command in NEEDS_OUTPUT:
            raise RecipeError(f"{recipe.where(step)}: step {step.name!r}: `{step.command}` needs `{output_key}` in "
                              "a recipe so later steps can find its output")


def _check_input(recipe: Recipe, step: Step, key: str, value: str) -> None:
    if not value:
        return
    if not Path(value).exists():
        raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: input {value} does not exist and no "
                          "earlier step makes it")
    try:
        _input_files(Path(value))
    except UserError as e:
        raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: input {e}") from None


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


# --- fingerprints ------------------------------------------------------------------------------------------------

def _input_files(path: Path) -> list[tuple[str, Path]]:
    """(name, resolved file) for a file, or for every file inside a folder; refuses anything that is not a plain
    file: hashing a FIFO or a device never ends, and files under /proc or /sys change by themselves."""
    real = path.resolve()
    mode = _mode(path, real)
    if stat.S_ISREG(mode):
        return [(path.name, real)]
    if not stat.S_ISDIR(mode):
        raise UserError(f"is {_kind(mode)}; recipes read regular files and folders of them only", path=path)
    files = []
    seen = {real}

    def unreadable(e: OSError) -> None:
        raise UserError(f"cannot be read: {e.strerror}", path=e.filename or path)

    for top, dirs, names in os.walk(real, onerror=unreadable, followlinks=True):
        for name in list(dirs):
            target = (Path(top) / name).resolve()
            _mode(Path(top) / name, target)  # refuses a link into /proc, /sys or /dev before walking it
            if target in seen:  # a link back to a folder already read
                dirs.remove(name)
            seen.add(target)
        dirs.sort()
        for name in sorted(names):
            entry = Path(top) / name
            target = entry.resolve()
            mode = _mode(entry, target)
            if not stat.S_ISREG(mode):
                raise UserError(f"is {_kind(mode)}, inside input folder {path}; recipes read regular files only",
                                path=entry)
            files.append((str(entry.relative_to(real)), target))
    return files


def _mode(shown: Path, real: Path) -> int:
    """st_mode of `real`, refusing the special trees (and folders holding them) before touching it."""
    for root in SPECIAL_ROOTS:
        if real.is_relative_to(root) or root.is_relative_to(real):
            where = "is under" if real.is_relative_to(root) else "holds"
            raise UserError(f"{where} {root}; recipes read regular files and folders of them only", path=shown)
    try:
        return os.stat(real).st_mode
    except OSError as e:
        raise UserError(f"cannot be read: {e.strerror}", path=shown) from None


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "not a regular file")


def _fingerprint(path: Path, cache: dict[str, dict]) -> str:
    """sha256 over the names and sha256s of a file or of a folder's files; a file whose size and mtime match the
    cache is not hashed again."""
    parts = []
    for name, f in _input_files(path):
        st = f.stat()
        hit = cache.get(str(f))
        if not hit or hit["size"] != st.st_size or hit["mtime_ns"] != st.st_mtime_ns:
            hit = cache[str(f)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hash_file(f)}
        parts.append(f"{name}:{hit['sha256']}\n")
    return hashlib.sha256("".join(parts).encode()).hexdigest()


# --- state -------------------------------------------------------------------------------------------------------

@dataclass
class StepRecord:
    """What the state file remembers of a step's last run."""

    argv: list[str]
    inputs: dict[str, str]
    # resolved path -> fingerprint of every output the runner wrote; None while the step is running
    outputs: dict[str, str | None]
    output: str | None  # what {step} stands for
    ok: bool


@dataclass
class _State:
    path: Path
    steps: dict[str, StepRecord]
    hashes: dict[str, dict]

    @classmethod
    def load(cls, path: Path) -> _State:
        if not path.exists():
            return cls(path, {}, {})
        try:
            data = json.loads(path.read_text())
            return cls(path, {name: StepRecord(**record) for name, record in data["steps"].items()},
                       dict(data["hashes"]))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise RecipeError("not a state file this runner can read; delete it to start afresh (and the outputs "
                              "it recorded, which the runner will no longer count as its own)", path=path) from None

    def save(self) -> None:
        data = {"steps": {name: asdict(record) for name, record in self.steps.items()}, "hashes": self.hashes}
        with output(self.path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(data, indent=1))

    def owns(self, step: str, path: Path) -> bool:
        """Whether `path` is an output this step wrote, unchanged since (or written by a run cut short)."""
        record = self.steps.get(step)
        if record is None or str(path) not in record.outputs:
            return False
        recorded = record.outputs[str(path)]
        try:
            return recorded is None or recorded == _fingerprint(path, self.hashes)
        except UserError:
            return False

    def up_to_date(self, step: str, argv: list[str], inputs: dict[str, str]) -> bool:
        record = self.steps.get(step)
        return (record is not None and record.ok and record.argv == argv and record.inputs == inputs
                and all(Path(p).exists() and self.owns(step, Path(p)) for p in record.outputs))


@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[None]:
    """One run at a time per workdir: two would interleave their outputs and overwrite each other's state."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        handle = open(workdir / LOCK_FILE, "a")
    except OSError as e:
        raise RecipeError(f"cannot be used as the workdir: {e.strerror}", path=workdir) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError("another `lightning-tools run` is using this workdir; wait for it to finish, or give "
                              "this run its own with --set workdir=...", path=workdir) from None
        yield


# --- running -----------------------------------------------------------------------------------------------------

Status = Literal["ran", "skipped", "planned"]


@dataclass
class StepResult:
    name: str
    command: str
    argv: list[str]
    status: Status
    output: str | None = None  # what {name} stands for in later steps
    outputs: list[str] = field(default_factory=list)  # what the step wrote (ran) or had written (skipped)
    result: Any = field(default=None, repr=False)  # the command's return value (a fetch: the files it fetched)

    def as_dict(self) -> dict:
        return {"step": self.name, "command": self.command, "status": self.status, "output": self.output,
                "outputs": self.outputs, "argv": self.argv}


def run_recipe(recipe: Recipe, *, dry_run: bool = False, force: bool | str = False,
               echo: Callable[[str], None] = lambda s: None, obj: dict | None = None) -> list[StepResult]:
    """Run (or with dry_run, plan) every step in order; returns what happened to each.

    `force=True` runs every step again, `force="name"` that step and every step using its output, directly or
    not. Each command's own report is echoed, indented, under its step.
    """
    forced = _forced(recipe, force)
    names: dict[str, Any] = dict(recipe.vars)
    if dry_run:
        results = []
        for step in recipe.steps:
            options = {k: _substitute(v, names) for k, v in step.options.items()}
            argv = _argv(recipe.commands[step.command], options)
            names[step.name] = _output_option(step.command, options)
            echo(f"[plan] {step.name}: lightning-tools {step.command} {' '.join(argv)}")
            results.append(StepResult(step.name, step.command, argv, "planned", names[step.name]))
        return results
    with _locked(recipe.workdir):
        state = _State.load(recipe.workdir / STATE_FILE)
        try:
            return [_run_step(recipe, step, state, names, step.name in forced, echo, obj) for step in recipe.steps]
        finally:
            state.save()  # the hash cache, even when a step failed


def _forced(recipe: Recipe, force: bool | str) -> set[str]:
    if force is True:
        return {s.name for s in recipe.steps}
    if not force:
        return set()
    if all(s.name != force for s in recipe.steps):
        raise RecipeError(f"--force {force}: no such step; the steps are {', '.join(s.name for s in recipe.steps)}",
                          path=recipe.path)
    forced = {force}
    for step in recipe.steps:  # in order, so steps using a dependent's output follow it
        if any(ref in forced for value in step.options.values() for ref in _refs(value)):
            forced.add(step.name)
    return forced


def _output_option(command: str, options: Mapping[str, Any]) -> str | None:
    key = OUTPUT_OPTIONS.get(command, (None,))[0]
    return str(options[key]) if options.get(key) not in (None, "") else None


def _run_step(recipe: Recipe, step: Step, state: _State, names: dict[str, Any], forced: bool,
              echo: Callable[[str], None], obj: dict | None) -> StepResult:
    command = recipe.commands[step.command]
    options = {k: _substitute(v, names) for k, v in step.options.items()}
    argv = _argv(command, options)
    inputs = {}
    for key, value in options.items():
        for v in _as_list(value) if key in INPUT_OPTIONS else []:
            if v != "" and Path(str(v)).exists():
                try:
                    inputs[f"{key}={v}"] = _fingerprint(Path(str(v)), state.hashes)
                except UserError as e:
                    raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: input {e}") from None

    if not forced and state.up_to_date(step.name, argv, inputs):
        record = state.steps[step.name]
        names[step.name] = record.output
        echo(f"[skip] {step.name}: inputs, options and outputs unchanged since the last run")
        return StepResult(step.name, step.command, argv, "skipped", record.output, list(record.outputs))

    # What this run may write: only paths that are free or that this step wrote and nobody changed since. A fetch
    # guards its own folder (it keeps verified files and refuses others), so it is never told to overwrite.
    targets = [] if step.command == "fetch" else [
        (key, Path(str(options[key])).resolve()) for key in OUTPUT_OPTIONS.get(step.command, ())
        if options.get(key) not in (None, "")]
    replace = False
    for key, target in targets:
        if target.exists() or target.is_symlink():
            if not state.owns(step.name, target):
                raise RecipeError(f"{recipe.where(step, key)}: step {step.name!r}: {target} exists but this recipe "
                                  "did not write it, or it changed since; it is left alone: move or delete it, then "
                                  "run again")
            replace = True
    output = _output_option(step.command, options)
    # Recorded before the command runs, so a run cut short still owns what it may have written.
    state.steps[step.name] = StepRecord(argv, inputs, {str(t): None for _, t in targets}, output, ok=False)
    state.save()
    full = argv + (["--overwrite"] if replace else [])
    echo(f"[run]  {step.name}: lightning-tools {step.command} {' '.join(full)}")
    written = [t for _, t in targets]
    try:
        result = _invoke(recipe, step, command, full, obj, echo)
    except StepFailed:
        state.steps[step.name].outputs = {str(t): _fingerprint(t, state.hashes) for t in written if t.exists()}
        raise
    if step.command == "fetch":
        written = [Path(f.path).resolve() for f in result.files]
        output = str(written[0]) if len(written) == 1 else output
    outputs = {str(t): _fingerprint(t, state.hashes) for t in written if t.exists()}
    state.steps[step.name] = StepRecord(argv, inputs, outputs, output, ok=True)
    state.save()
    names[step.name] = output
    return StepResult(step.name, step.command, argv, "ran", output, list(outputs), result)


def _invoke(recipe: Recipe, step: Step, command: click.Command, argv: list[str], obj: dict | None,
            echo: Callable[[str], None]) -> Any:
    """Run one command in-process and return its callback's value; its printed report goes to `echo`."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            return command.main(args=argv, prog_name=f"lightning-tools {step.command}", standalone_mode=False,
                                obj=dict(obj or {}))
    except UserError as e:
        raise StepFailed(f"{recipe.where(step)}: step {step.name!r} failed: {e}", exit_code=e.exit_code) from e
    except click.ClickException as e:
        raise StepFailed(f"{recipe.where(step)}: step {step.name!r}: {e.format_message()}", exit_code=1) from e
    except click.exceptions.Abort as e:  # click's stand-in for Ctrl-C, outside standalone mode
        raise KeyboardInterrupt from e
    finally:
        for line in buffer.getvalue().strip().splitlines():
            echo(f"         {line}")
