"""The layout is the data flow: each subpackage imports only the stages below it (an AST walk
over every import, lazy ones inside functions included), no cycles, light `__init__`s, and a
fast `mlsae --help`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mlsae"

RANK = {
    "core": 0,
    "data": 1,
    "lens": 2,
    "activations": 3,
    "sae": 3,
    "train": 4,
    "eval": 4,
    "interchange": 4,
    "analysis": 5,
    "evolution": 5,
    "report": 6,
    "explore": 6,
    "synth": 6,
    "api": 8,
    "cli": 9,
}
"""Stage of each subpackage: a module may import its own package and lower stages only."""


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mlsae" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported mlsae module) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(SRC.parent).with_suffix("")
    here = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("mlsae")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = here.split(".")
                mod = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".")
            else:
                mod = node.module or ""
            if mod == "mlsae":  # from mlsae import sae, kernels ...
                out += [(node.lineno, f"mlsae.{a.name}") for a in node.names]
            elif mod.startswith("mlsae"):
                out.append((node.lineno, mod))
    return out


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_lives_in_a_stage_subpackage() -> None:
    loose = [p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside a stage subpackage: {loose}"
    pkgs = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert pkgs <= set(RANK), f"subpackages without a stage: {pkgs - set(RANK)}"


def test_imports_go_down_the_pipeline_only() -> None:
    bad = []
    for path in _modules():
        rel = path.relative_to(SRC)
        if len(rel.parts) < 2:
            continue  # mlsae/__init__.py and __main__.py may import anything
        pkg = rel.parts[0]
        for line, mod in _imports(path):
            target = _package(mod)
            if target is None or target == pkg:
                continue
            if target not in RANK or RANK[target] >= RANK[pkg]:
                bad.append(f"{rel}:{line} ({pkg}) imports {mod}")
    assert bad == [], "imports against the data flow:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in _modules():
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = {m for _, m in _imports(path)}
    known = set(graph)
    graph = {k: {m for m in v if m in known and m != k} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(m) :], m]))
            if m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_subpackage_inits_say_what_they_own_and_stay_light() -> None:
    for init in sorted(SRC.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        assert doc and "import" in doc.lower(), f"{init}: docstring must say what it may import"
        if init.parent.name == "cli":
            continue
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        heavy = [
            ast.unparse(n)
            for n in top
            if not re.match(r"from (__future__|typing) ", ast.unparse(n))
        ]
        assert heavy == [], f"{init} imports at the top: {heavy}"


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from mlsae.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_modules_stay_readable() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 420
    }
    assert long == {}, f"modules over ~400 lines: {long}"


def test_tests_import_their_fixtures_as_conftest() -> None:
    """`tests` is not a package: `from tests.conftest import` resolves to any installed
    distribution's top-level `tests` package first (tuned-lens 0.2.0, which `make bench`
    installs, ships one), so the suite's own modules are imported by their bare names."""
    tests = Path(__file__).resolve().parent
    offenders = [
        p.name
        for p in sorted(tests.glob("*.py"))
        if re.search(r"^\s*(from|import) tests[.\s]", p.read_text(), re.MULTILINE)
    ]
    assert offenders == [], f"import fixtures as `from conftest import ...`: {offenders}"
