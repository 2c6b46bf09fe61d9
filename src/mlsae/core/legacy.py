"""Files of older mlsae versions read by this one: each converter maps an old layout to the
current one (no import of the config it converts to, so it stays a frozen record of the old
format)."""

from __future__ import annotations

from typing import Any

V1_DEFAULT = "default"
"""What version 1 wrote for the embedded model and corpus when none was named."""


def run_config_v1(d: dict[str, Any], train_fields: set[str]) -> dict[str, Any]:
    """A version-1 train_cfg.json (flat: cache, mode, layers, d_in, normalize, members, train,
    model, dataset, lens) as a version-2 dict; `train_fields`: the training settings this mlsae
    knows (others are dropped)."""
    members = d.get("members") or []
    ints = lambda key: sorted(  # noqa: E731
        {m[key] for m in members if isinstance(m, dict) and isinstance(m.get(key), int)}
    )
    rs, ks = ints("expansion_factor"), ints("k")
    train = d.get("train")
    if isinstance(train, dict):
        train = {k: v for k, v in train.items() if k in train_fields}
    return {
        "data": {"dataset": d.get("dataset") or V1_DEFAULT, "exclude_sink": False},
        "model": {"model": d.get("model") or V1_DEFAULT},
        "source": {"cache": d.get("cache")},
        "sae": {
            "expansion_factor": rs or [8],
            "k": ks or [32],
            "normalize": d.get("normalize", "standardize"),
            "per_layer": d.get("mode") == "per_layer",
            "lens": d.get("lens"),
        },
        "train": train,
        **{k: d.get(k) for k in ("cache", "mode", "layers", "d_in", "members", "lens")},
        "version": 2,
    }
