"""The package's shape: no import cycles among our modules, and header-only commands that never load torch,
diffusers or transformers (they start in a blink)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_tools"
HEAVY = ("torch", "diffusers", "transformers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere (top level or inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and "lightning_tools.stream" in graph["lightning_tools.checkpoint"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _heavy_imports_after(args: list[str]) -> list[str]:
    """Run `lightning-tools ARGS` in a fresh interpreter and list the heavy libraries it imported."""
    code = ("import json, sys\nfrom lightning_tools.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint('HEAVY', json.dumps([m for m in %r if m in sys.modules]))" % (HEAVY,))
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    line = [line for line in result.stdout.splitlines() if line.startswith("HEAVY")][-1]
    return json.loads(line.removeprefix("HEAVY "))


@pytest.fixture(scope="module")
def lightning_lora(tmp_path_factory) -> Path:
    from lightning_tools.tiny import write_tiny_lightning_lora

    return write_tiny_lightning_lora(tmp_path_factory.mktemp("startup") / "sdxl_lightning_4step_lora.safetensors")


@pytest.mark.parametrize("args", [["catalog"], ["--help"], ["merge", "--help"], ["render", "--help"]])
def test_listing_and_help_never_load_torch(args):
    assert _heavy_imports_after(args) == []


def test_inspect_and_verify_of_a_lora_read_headers_only(lightning_lora, tiny_pipeline):
    assert _heavy_imports_after(["inspect", str(lightning_lora)]) == []
    assert _heavy_imports_after(["verify", str(lightning_lora)]) == []
    assert _heavy_imports_after(["inspect", str(tiny_pipeline)]) == []
