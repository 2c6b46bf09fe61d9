"""The explorer's index as a Neuronpedia export (`mlsae export --format neuronpedia`): one source
per block of every SAE in the index, latent j being feature j of each (for an MLSAE, the same
latent at every block it reads). Per feature and block: the maximum activation and active share
at that block, the logit effects, decoder neighbours and activation histogram (over all blocks:
the index keeps one per latent), and up to `n_examples` of its top examples at that block.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from mlsae.explore.db import IndexDB
from mlsae.explore.finalize import window_ids
from mlsae.explore.tokens import display_tokens
from mlsae.interchange.neuronpedia import NpActivation, NpExport, NpFeature, NpSource


def default_model_id(model: str) -> str:
    """A Neuronpedia model id from a model name or path (letters, digits, _ and -)."""
    name = Path(model).name.lower() or "model"
    return re.sub(r"[^a-z0-9_-]+", "-", name).strip("-") or "model"


def _examples(db: IndexDB, sae: int, n: int, show) -> dict[tuple[int, int], list[NpActivation]]:
    """(layer, latent) -> its top `n` examples at that layer, largest first."""
    W = 2 * db.w + 1
    out: dict[tuple[int, int], list[NpActivation]] = {}
    rows = db.q(
        "SELECT latent, layer, pos, act, win FROM examples WHERE sae=? AND kind='top'", (sae,)
    )
    for j, ly, pos, act, win in rows:
        p, a = np.frombuffer(pos, np.int32), np.frombuffer(act, np.float32)
        wn = np.frombuffer(win, np.float16).reshape(-1, W).astype(np.float32)
        keep = []
        for i in np.argsort(-a, kind="stable")[:n]:
            ids, at = window_ids(db.stream, int(p[i]), db.w, db.ctx)
            lo = db.w - at
            vals = [round(float(v), 4) for v in wn[i, lo : lo + len(ids)]]
            keep.append(NpActivation(int(j), show(ids), vals, int(p[i])))
        out[(int(ly), int(j))] = keep
    return out


def index_to_neuronpedia(
    db_path: str | Path,
    model_id: str,
    set_name: str,
    creator: str,
    n_examples: int = 16,
    hook: str = "hook_resid_post",
    urls: list[str] | None = None,
) -> NpExport:
    """Build the export of every SAE in an explorer index (see the module docstring)."""
    db = IndexDB(db_path)
    frag = {int(k): bytes.fromhex(v) for k, v in (db.meta.get("vocab_bytes") or {}).items()}

    def show(ids: list[int]) -> list[str]:
        return display_tokens([frag.get(i) or db.token(i).encode() for i in ids])

    edges = db.meta["hist_edges"]
    centre = [math.sqrt(edges[b] * edges[b + 1]) for b in range(len(edges) - 1)]
    layers_all = sorted({ly for s in db.saes for ly in s["layers"]})
    src = db.meta.get("source") or {}
    ex = NpExport(
        model_id or default_model_id(db.meta["model"]),
        set_name,
        creator,
        f"mlsae SAEs of {db.meta['model']} ({', '.join(s['label'] for s in db.saes)})",
        max(layers_all) + 1,
        max(s["d_sae"] for s in db.saes),
        hook,
        Path(str(src.get("dataset") or src.get("cache") or "")).name,
        int(db.saes[0]["n_tokens"]),
        urls=list(urls or []),
    )
    for s in db.saes:
        examples = _examples(db, s["sae"], n_examples, show)
        per_layer: dict[int, NpSource] = {ly: NpSource(ly, [], []) for ly in s["layers"]}
        for j in range(s["d_sae"]):
            lat = db.latent(s["sae"], j)
            if lat is None:
                continue
            hist = dict(lat["hist"])
            bins = sorted(hist)
            for p, ly in enumerate(s["layers"]):
                acts = examples.get((ly, j), [])
                per_layer[ly].features.append(
                    NpFeature(
                        j,
                        max((max(a.values) for a in acts), default=0.0),
                        lat["layer_count"][p] / max(1, s["n_tokens"]),
                        [show([t["id"]])[0] for t in lat["logit_pos"]],
                        [t["value"] for t in lat["logit_pos"]],
                        [show([t["id"]])[0] for t in lat["logit_neg"]],
                        [t["value"] for t in lat["logit_neg"]],
                        [int(n) for n, _ in lat["neighbours"]],
                        [c for _, c in lat["neighbours"]],
                        [float(hist[b]) for b in bins],
                        [centre[b] for b in bins],
                    )
                )
                per_layer[ly].activations += acts
        ex.sources += [per_layer[ly] for ly in s["layers"]]
    return ex
