"""scripts/dict_boundaries.py: it counts a `dict[str, Any]` annotation exactly when the name
that carries it is imported from another subpackage, and no new one crosses a boundary (the
project's rule: typed interfaces between stages)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    # the cache writer's provenance dict and the manifest it returns (manifest.json's raw form)
    "mlsae.activations.cache:CacheWriter.__init__",
    "mlsae.activations.cache:CacheWriter.close",
    "mlsae.activations.norms:NormOutliers.summary",
    "mlsae.activations.norms:NormOutliers.from_summary",
    "mlsae.activations.source:ActivationSource.info",
    "mlsae.core.config:SaeGridConfig.architecture_settings",
    "mlsae.explore.live:Live.prompt",
    "mlsae.lens.tuned:TunedLens.__init__",
    "mlsae.lens.tuned:TunedLens.config",
    "mlsae.synth.generate:generate",
}
"""The stage interfaces still typed `dict[str, Any]` (see the issue-27 closing note): the list
may only shrink."""


def _script():
    spec = importlib.util.spec_from_file_location(
        "dict_boundaries", ROOT / "scripts" / "dict_boundaries.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dict_boundaries"] = mod
    spec.loader.exec_module(mod)
    return mod


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "mlsae" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_counts_only_what_crosses_a_subpackage(tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "",
            "a/m.py": (
                "from typing import Any\n"
                "def crosses(x: dict[str, Any]) -> dict[str, Any]: ...\n"
                "def stays(x: dict[str, Any]) -> None: ...\n"
                "def typed(x: int) -> int: ...\n"
                "class C:\n"
                "    info: dict[str, Any]\n"
                "    def to_json(self) -> dict[str, Any]: ...\n"
                "    def _private(self) -> dict[str, Any]: ...\n"
            ),
            "a/n.py": "from mlsae.a.m import stays\n",
            "b/__init__.py": "",
            "b/user.py": (
                "from mlsae.a.m import crosses, typed\n"
                "def f():\n"
                "    from mlsae.a.m import C  # lazy imports count too\n"
            ),
        },
    )
    hits = _script().count(src)
    got = sorted((h.name, h.where, h.serialisation) for h in hits)
    assert got == [
        ("C.info", "field", False),
        ("C.to_json", "return", True),
        ("crosses", "parameter x", False),
        ("crosses", "return", False),
    ]


def test_no_new_dict_crosses_a_boundary() -> None:
    hits = _script().count(ROOT / "src")
    stage = {f"{h.module}:{h.name}" for h in hits if not h.serialisation}
    assert stage <= ALLOWED, f"new dict[str, Any] at a subpackage boundary: {stage - ALLOWED}"
