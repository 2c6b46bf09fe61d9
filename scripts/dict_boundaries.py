"""Count the `dict[str, Any]` annotations that cross a subpackage boundary:
`python scripts/dict_boundaries.py [SRC] [--list]` (SRC: the folder holding `mlsae/`, default
src).

A name crosses a boundary when a module of one subpackage (`mlsae.eval`, `mlsae.report`, ...)
imports it from another subpackage (`from mlsae.analysis.layers import LayerStatsResult`, lazy
imports inside functions included). For a crossing function, every parameter and the return
annotation that contains `dict[str, Any]` counts once; for a crossing class, every annotated
field and every parameter / return of its public methods (no leading `_`, plus `__init__`)
that contains it. Annotations that stay inside one module or one subpackage are not counted:
a JSON file's raw form read and typed in one place is fine. The serialisation methods
(`to_json` / `to_dict`: a typed object's JSON form, handed to `core.io.write_json`) and the JSON
layer itself (`core.io`, `core.schema`) are counted apart. `--list` prints each one as
`module:line name (where)`. Standard library only; the count is what the prose quotes.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PATTERN = "dict[str, Any]"
SERIALISATION = ("to_json", "to_dict")
JSON_LAYER = ("mlsae.core.io", "mlsae.core.schema")


@dataclass
class Hit:
    module: str
    line: int
    name: str
    where: str

    @property
    def serialisation(self) -> bool:
        return self.name.split(".")[-1] in SERIALISATION or self.module in JSON_LAYER


def subpackage(module: str) -> str:
    """`mlsae.eval.evaluate` -> `eval`; a top-level module (`mlsae.__init__`) is its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def module_name(src: Path, path: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def has_dict(node: ast.expr | None) -> bool:
    return node is not None and PATTERN in ast.unparse(node).replace("typing.", "")


def signature_hits(fn: ast.FunctionDef | ast.AsyncFunctionDef, module: str, name: str) -> list[Hit]:
    hits = []
    args = fn.args
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if a is not None and has_dict(a.annotation):
            hits.append(Hit(module, fn.lineno, name, f"parameter {a.arg}"))
    if has_dict(fn.returns):
        hits.append(Hit(module, fn.lineno, name, "return"))
    return hits


def class_hits(cls: ast.ClassDef, module: str) -> list[Hit]:
    hits = []
    for item in cls.body:
        if isinstance(item, ast.AnnAssign) and has_dict(item.annotation):
            target = ast.unparse(item.target)
            hits.append(Hit(module, item.lineno, f"{cls.name}.{target}", "field"))
        elif isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            if item.name.startswith("_") and item.name != "__init__":
                continue
            hits += signature_hits(item, module, f"{cls.name}.{item.name}")
    return hits


def definitions(tree: ast.Module, module: str) -> dict[str, list[Hit]]:
    """Top-level name -> the dict annotations it carries."""
    out: dict[str, list[Hit]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = signature_hits(node, module, node.name)
        elif isinstance(node, ast.ClassDef):
            out[node.name] = class_hits(node, module)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            hit = Hit(module, node.lineno, node.target.id, "module attribute")
            out[node.target.id] = [hit] if has_dict(node.annotation) else []
    return out


def imported(tree: ast.Module) -> set[tuple[str, str]]:
    """(module, name) of every `from mlsae.x.y import name` in a module, lazy ones included;
    `import mlsae.x.y as m` counts every name later read as `m.name`."""
    out: set[tuple[str, str]] = set()
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlsae"):
            out |= {(node.module, a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mlsae."):
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = ast.unparse(node.value)
            if base in aliases:
                out.add((aliases[base], node.attr))
    return out


def count(src: Path) -> list[Hit]:
    trees = {
        module_name(src, p): ast.parse(p.read_text(), str(p))
        for p in sorted((src / "mlsae").rglob("*.py"))
    }
    defs = {m: definitions(t, m) for m, t in trees.items()}
    crossing: set[tuple[str, str]] = set()
    for user, tree in trees.items():
        for module, name in imported(tree):
            known = module in defs and name in defs[module]
            if known and subpackage(module) != subpackage(user):
                crossing.add((module, name))
    hits = [h for module, name in sorted(crossing) for h in defs[module][name]]
    return sorted(hits, key=lambda h: (h.module, h.line, h.name, h.where))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", default="src", type=Path)
    parser.add_argument("--list", action="store_true", help="print every annotation counted")
    args = parser.parse_args()
    hits = count(args.src)
    if args.list:
        for h in hits:
            tag = ", serialisation" if h.serialisation else ""
            print(f"{h.module}:{h.line} {h.name} ({h.where}{tag})")
    names = {(h.module, h.name.split(".")[0]) for h in hits}
    ser = sum(h.serialisation for h in hits)
    total = sum(PATTERN in p.read_text() for p in (args.src / "mlsae").rglob("*.py"))
    print(
        f"{len(hits)} `{PATTERN}` annotations on {len(names)} names cross a subpackage "
        f"boundary: {len(hits) - ser} stage interfaces, {ser} serialisation (to_json / to_dict, "
        f"core.io / core.schema); {total} modules mention it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
