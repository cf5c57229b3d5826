"""Guards of the code's shape: dependencies run one way between subpackages, no import cycle,
no function longer than a screen, and importing anybind (or loading a bundle's code) pulls in
no model backend and no torch."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "anybind"
MAX_LINES = 60

# each layer may import itself and the layers before it, never a later one
LAYERS = [
    {"errors", "checks", "registry", "atomic", "saving", "config", "_hashing", "_deps", "device", "tracking"},
    {"data"},
    {"encoders"},
    {"features"},
    {"assess", "metrics"},
    {"align"},
    {"evaluate"},
    {"bundle"},
    {"serve", "report_html", "run", "runtime"},  # runtime: torch-free (tests/test_onnx_runtime.py checks it)
    {"cli"},
]


def _unit(path: Path) -> str:
    """The subpackage (or top-level module) a source file belongs to."""
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """anybind units imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            if parts[:1] == ["anybind"]:
                targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
                found.update(targets)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("anybind."))
    return found


def _graph() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in SRC.rglob("*.py"):
        me = _unit(path)
        for other in _imports(path) - {me, "__init__", "__version__"}:
            edges[me][other].append(str(path.relative_to(SRC)))
    return edges


def test_dependencies_run_one_way():
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    units = {_unit(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert units <= set(rank), f"place these in LAYERS: {sorted(units - set(rank))}"
    upward = [f"{me} -> {other} ({', '.join(sorted(set(files)))})"
              for me, targets in _graph().items() if me in rank
              for other, files in targets.items() if other in rank and rank[other] > rank[me]]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_subpackages():
    graph = {me: set(t) for me, t in _graph().items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_no_function_longer_than_a_screen():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


def test_importing_anybind_and_the_bundle_code_imports_no_backend_and_no_torch():
    code = ("import sys, anybind, anybind.bundle, anybind.bundle.model, anybind.align.bound, anybind.saving; "
            "print(sorted(m for m in ('torch', 'transformers', 'timm', 'open_clip', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
