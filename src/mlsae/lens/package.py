"""Lenses saved by the tuned-lens package (`params.pt` + `config.json`), read into our
`TunedLens` re-indexed onto block outputs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json_object

_TL_KEY = re.compile(r"^(?:layer_translators\.)?(\d+)\.(weight|bias)$")


@dataclass
class PackageLens:
    """What a tuned-lens package folder holds: translator i acts on hidden_states[i]."""

    n_layers: int
    d_model: int
    weights: dict[int, dict[str, Tensor]]  # translator index -> {"weight", maybe "bias"}
    config: dict[str, Any]


def read_tuned_lens_package(path: str | Path) -> PackageLens:
    """A lens saved by the tuned-lens package (`params.pt` + `config.json`), checked: a
    linear tuned lens with translators 0..n_layers - 1."""
    path = Path(path)
    cfg = read_json_object(path / "config.json", "tuned-lens config")
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise MlsaeError(f"{path}: unsupported tuned-lens type {lens_type!r}")
    try:
        state = torch.load(path / "params.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise MlsaeError(f"cannot read {path / 'params.pt'}: {e}") from None
    weights: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _TL_KEY.match(key)
        if m and isinstance(value, Tensor):
            weights.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not weights or any("weight" not in w for w in weights.values()):
        raise MlsaeError(f"{path / 'params.pt'}: no tuned-lens translator weights found")
    n_layers, d_model = cfg.get("num_hidden_layers") or len(weights), cfg.get("d_model")
    d_model = d_model or weights[min(weights)]["weight"].shape[0]
    if not isinstance(n_layers, int) or not isinstance(d_model, int) or min(n_layers, d_model) < 1:
        raise MlsaeError(
            f"{path / 'config.json'}: num_hidden_layers and d_model must be integers >= 1"
        )
    if sorted(weights) != list(range(n_layers)):
        raise MlsaeError(
            f"{path / 'params.pt'}: expected translators 0..{n_layers - 1} (one per "
            f"hidden_states index before the last), found {sorted(weights)}"
        )
    return PackageLens(n_layers, d_model, weights, cfg)
