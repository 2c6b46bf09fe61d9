"""graph.html of `mlsae evolution`: the feature graph drawn with Cytoscape (vendored), each
node's details (measures, flags, partners, top contexts) embedded as data."""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mlsae.core import io
from mlsae.core.stage_config import MEASURES, EvolutionConfig
from mlsae.evolution.graph import FeatureGraph, finite, round_or_none
from mlsae.evolution.measures import PairResult
from mlsae.evolution.stats import FeatureStats

PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
    "#fd8d3c",
]
SINGLETON = "#c7c7c7"


def node_id(layer: int, feature: int) -> str:
    """The node's id in graph.html: 'L<layer>:<feature>'."""
    return f"L{layer}:{feature}"


def write_graph_html(
    path: Path, g: FeatureGraph, details: dict[int, dict[str, Any]], keep: np.ndarray, title: str
) -> int:
    """Write the self-contained viewer; `details[node]` holds the panel content of a drawn node
    (measures, flags, partners, contexts); keep: the nodes to draw (`select_nodes`). Returns
    the number of nodes drawn."""
    kept = set(keep.tolist())
    col = {ly: c for c, ly in enumerate(g.layers)}
    sizes = np.bincount(g.community) if g.community is not None else None
    dx, dy = 240.0, 14.0
    nodes = []
    for layer in g.layers:  # y: by community, then feature, so communities line up
        mine = keep[g.layer[keep] == layer]
        comm = g.community[mine] if g.community is not None else np.zeros(len(mine), int)
        for row, i in enumerate(mine[np.lexsort((g.feature[mine], comm))]):
            c = int(g.community[i]) if g.community is not None else -1
            big = sizes is not None and sizes[c] >= 2
            info = details.get(int(i), {})
            nodes.append(
                {
                    "id": node_id(int(g.layer[i]), int(g.feature[i])),
                    "layer": int(g.layer[i]),
                    "feature": int(g.feature[i]),
                    "x": col[layer] * dx,
                    "y": row * dy,
                    "color": PALETTE[c % len(PALETTE)] if big else SINGLETON,
                    "community": c,
                    "community_size": int(sizes[c]) if sizes is not None else 1,
                    "measures": info.get("measures", {}),
                    "flags": info.get("flags", []),
                    "partners": info.get("partners", []),
                    "contexts": info.get("contexts", []),
                }
            )
    edges = [
        [
            node_id(int(g.layer[s]), int(g.feature[s])),
            node_id(int(g.layer[t]), int(g.feature[t])),
            round_or_none(w, 4),
        ]
        for s, t, w in zip(g.src, g.dst, g.weight, strict=True)
        if s in kept and t in kept
    ]
    data = {
        "layers": g.layers,
        "dx": dx,
        "edge_measure": g.edge_measure,
        "measures": list(MEASURES),
        "nodes": nodes,
        "edges": edges,
        "n_nodes_total": len(g.layer),
        "n_edges_total": len(g.src),
    }
    assets = resources.files("mlsae") / "assets"
    lib = (assets / "cytoscape.min.js").read_text(encoding="utf-8")
    page = (assets / "graph_template.html").read_text(encoding="utf-8")
    blob = (
        json.dumps(finite(data), separators=(",", ":"), allow_nan=False)
        .replace("</", "<\\/")
        .replace("<!--", "<\\u0021--")
    )
    head, _, rest = page.replace("__TITLE__", html.escape(title)).partition("__DATA__")
    mid, _, tail = rest.partition("/*__CYTOSCAPE__*/")
    page = head + blob + mid + lib + tail  # the library has no "</" (checked by a test)
    path = Path(path)
    io.write_text(path, page)
    return len(nodes)


def _decoder(tokenizer: Any) -> Any:
    """token id -> display string (cached); ids in angle brackets without a tokenizer."""
    memo: dict[int, str] = {}

    def dec(i: int) -> str:
        if i not in memo:
            memo[i] = f"<{i}>" if tokenizer is None else tokenizer.decode([i])
        return memo[i]

    return dec


def _relation_flags(results: list[PairResult]) -> dict[tuple[int, int], list[str]]:
    """(layer, feature) -> the AND / OR / specialisation lines of its graph.html panel."""
    flags: dict[tuple[int, int], list[str]] = {}
    for r in results:
        for kind, rows in (("AND", r.and_features), ("OR", r.or_features)):
            for j, a, b in rows:
                flags.setdefault((r.down_layer, j), []).append(
                    f"{kind} of {node_id(r.up_layer, a)} and {node_id(r.up_layer, b)}"
                )
                for i in (a, b):
                    flags.setdefault((r.up_layer, i), []).append(
                        f"member of {kind} {node_id(r.down_layer, j)}"
                    )
        for j, i in r.specialised:
            flags.setdefault((r.down_layer, j), []).append(f"specialises {node_id(r.up_layer, i)}")
    return flags


def node_details(
    g: FeatureGraph,
    keep: np.ndarray,
    stats: list[FeatureStats],
    results: list[PairResult],
    cfg: EvolutionConfig,
    tokens: np.ndarray,
    ctx_len: int,
    tokenizer: Any,
) -> dict[int, dict]:
    """The graph.html panel of each drawn node: measures, flags, partners, contexts."""
    pos_of = {ly: p for p, ly in enumerate(g.layers)}
    dec = _decoder(tokenizer)
    flags = _relation_flags(results)
    inc: dict[int, list[int]] = {}
    for e, (s, t) in enumerate(zip(g.src, g.dst, strict=True)):
        inc.setdefault(int(s), []).append(e)
        inc.setdefault(int(t), []).append(e)
    out = {}
    for v in keep.tolist():
        layer, f = int(g.layer[v]), int(g.feature[v])
        p = pos_of[layer]
        st = stats[p]
        m: dict[str, Any] = {
            "density": float(st.density()[f]),
            "max activation": float(st.max[f]),
            "mean when > 0": float(st.sum[f] / max(int(st.nonzero[f]), 1)),
        }
        fl = list(flags.get((layer, f), []))
        if p < len(results):
            r = results[p]
            bn = float(r.best_next[f])
            m["best next Pearson"] = bn
            m["best next"] = node_id(r.down_layer, int(r.best_next_idx[f]))
            if bn >= cfg.pass_through:
                fl.append(f"passed through to {m['best next']}")
            elif not bn >= cfg.link_threshold:
                fl.append("disappears (no next-layer partner)")
        if p > 0:
            r = results[p - 1]
            bp = float(r.best_prev[f])
            m["best previous Pearson"] = bp
            m["best previous"] = node_id(r.up_layer, int(r.best_prev_idx[f]))
            if not bp >= cfg.link_threshold:
                fl.append("appears (no previous-layer partner)")
        partners = []
        for e in sorted(inc.get(v, []), key=lambda e: -g.weight[e])[:12]:
            o = int(g.dst[e]) if int(g.src[e]) == v else int(g.src[e])
            partners.append(
                {
                    "id": node_id(int(g.layer[o]), int(g.feature[o])),
                    "dir": "next" if g.layer[o] > layer else "prev",
                    **{k: float(a[e]) for k, a in g.measures.items()},
                }
            )
        contexts = []
        for val, pos in zip(st.top_val[f].tolist(), st.top_pos[f].tolist(), strict=True):
            if pos < 0:
                continue
            c0 = pos // ctx_len * ctx_len
            lo, hi = max(c0, pos - 12), min(c0 + ctx_len, pos + 4, len(tokens))
            contexts.append(
                {"tokens": [dec(int(t)) for t in tokens[lo:hi]], "hi": pos - lo, "act": val}
            )
        out[v] = {
            "measures": {k: (None if isinstance(x, float) and x != x else x) for k, x in m.items()},
            "flags": fl,
            "partners": partners,
            "contexts": contexts,
        }
    return out
