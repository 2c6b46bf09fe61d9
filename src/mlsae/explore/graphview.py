"""Features across layers for the explorer: the feature graph of an `mlsae evolution` output
(graph.json, evolution.json) held as arrays with a CSR adjacency, so a query touches only the
neighbourhood it returns (usable at 100k+ features).

Queries: a feature's neighbourhood `back` layers before and `fwd` layers after it (edges with
the edge measure >= a threshold, at most `per_layer` strongest nodes kept per layer), its
community (size, layers spanned, strongest members), and its pass-through chain (from the
feature, the best next / previous partner by Pearson while Pearson >= the run's pass-through
threshold).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlsae.evolution.summary import load_evolution


class FeatureGraphView:
    """Read-only view of DIR/graph.json (+ DIR/evolution.json for the thresholds)."""

    def __init__(self, folder: str | Path) -> None:
        ev = load_evolution(Path(folder), with_graph=True)
        g, body = ev.graph, ev.summary
        assert g is not None
        self.layers = list(g.layers)
        self.layer, self.feature = g.layer, g.feature
        n = len(self.layer)
        self.community = g.community if len(g.community) else np.full(n, -1, np.int64)
        self.density = g.density
        self.src, self.dst = g.src, g.dst
        self.measure = g.edge_measure
        self.weight = g.measures[self.measure]
        self.pearson = g.measures.get("pearson", np.full(len(g.src), np.nan))
        self.pass_through = body.settings.pass_through
        # features active on enough tokens for their Pearson to mean something
        n_used = body.n_used_tokens
        floor = body.settings.min_support / n_used if n_used else 0.0
        self.supported = np.nan_to_num(self.density, nan=0.0) >= floor
        self.method = g.community_method
        self.sizes = np.bincount(self.community[self.community >= 0], minlength=1)
        # CSR adjacency over both directions: for node v, rows ptr[v]:ptr[v+1] of (other, edge)
        a = np.concatenate([self.src, self.dst])
        b = np.concatenate([self.dst, self.src])
        e = np.concatenate([np.arange(len(self.src))] * 2)
        order = np.argsort(a, kind="stable")
        self.nbr, self.edge = b[order], e[order]
        self.ptr = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n))])
        self.index = {
            (int(ly), int(f)): i
            for i, (ly, f) in enumerate(zip(self.layer, self.feature, strict=True))
        }

    def __len__(self) -> int:
        return len(self.layer)

    def node(self, layer: int, feature: int) -> int:
        v = self.index.get((int(layer), int(feature)))
        if v is None:
            raise KeyError(
                f"no feature {feature} at layer {layer} in the graph (dead, or no such layer)"
            )
        return v

    def describe(self, v: int) -> dict[str, Any]:
        c = int(self.community[v])
        return {
            "id": int(v),
            "layer": int(self.layer[v]),
            "feature": int(self.feature[v]),
            "community": c,
            "community_size": int(self.sizes[c]) if c >= 0 else 1,
            "density": None if np.isnan(self.density[v]) else float(self.density[v]),
        }

    def _step(self, frontier: list[int], delta: int, thr: float, per_layer: int) -> list[int]:
        """Nodes one layer before (delta -1) / after (+1) the frontier joined by an edge >= thr,
        the `per_layer` with the strongest such edge."""
        best: dict[int, float] = {}
        for v in frontier:
            s, t = self.ptr[v], self.ptr[v + 1]
            o, e = self.nbr[s:t], self.edge[s:t]
            target = self.layers.index(int(self.layer[v])) + delta
            if not 0 <= target < len(self.layers):
                continue
            ok = (self.layer[o] == self.layers[target]) & (self.weight[e] >= thr)
            for u, w in zip(o[ok].tolist(), self.weight[e[ok]].tolist(), strict=True):
                best[u] = max(best.get(u, -np.inf), w)
        return sorted(best, key=lambda u: (-best[u], u))[:per_layer]

    def neighbourhood(self, v: int, back: int, fwd: int, thr: float, per_layer: int) -> dict:
        keep = {v}
        for delta, steps in ((-1, back), (1, fwd)):
            frontier = [v]
            for _ in range(steps):
                frontier = self._step(frontier, delta, thr, per_layer)
                if not frontier:
                    break
                keep.update(frontier)
        nodes = sorted(keep, key=lambda u: (self.layer[u], self.feature[u]))
        edges = []
        for u in nodes:
            s, t = self.ptr[u], self.ptr[u + 1]
            for o, e in zip(self.nbr[s:t].tolist(), self.edge[s:t].tolist(), strict=True):
                if o in keep and self.src[e] == u and self.weight[e] >= thr:
                    edges.append(
                        {
                            "source": u,
                            "target": o,
                            "weight": float(self.weight[e]),
                            "pearson": float(self.pearson[e]),
                        }
                    )
        return {"nodes": [self.describe(u) for u in nodes], "edges": edges}

    def chain(self, v: int) -> list[dict[str, Any]]:
        """The pass-through chain through v, earliest layer first (Pearson of the link into
        each node from the previous one)."""

        def follow(u: int, delta: int) -> list[tuple[int, float]]:
            out: list[tuple[int, float]] = []
            while True:
                s, t = self.ptr[u], self.ptr[u + 1]
                o, e = self.nbr[s:t], self.edge[s:t]
                pos = self.layers.index(int(self.layer[u])) + delta
                if not 0 <= pos < len(self.layers):
                    return out
                ok = self.layer[o] == self.layers[pos]
                if not ok.any():
                    return out
                p = self.pearson[e[ok]]
                i = int(np.nanargmax(p)) if not np.all(np.isnan(p)) else -1
                if i < 0 or not p[i] >= self.pass_through:
                    return out
                u = int(o[ok][i])
                out.append((u, float(p[i])))

        back, fwd = follow(v, -1), follow(v, 1)
        nodes = [u for u, _ in reversed(back)] + [v] + [u for u, _ in fwd]
        links = [p for _, p in reversed(back)] + [p for _, p in fwd]  # nodes[i] -> nodes[i+1]
        return [
            {**self.describe(u), "pearson_in": links[i - 1] if i else None}
            for i, u in enumerate(nodes)
        ]

    def community_info(self, c: int, limit: int = 40) -> dict[str, Any]:
        """Size, per-layer counts and the densest members of community c."""
        if c < 0:
            return {"community": c, "size": 1, "layers": {}, "members": []}
        members = np.nonzero(self.community == c)[0]
        per = {
            int(ly): int(n)
            for ly, n in zip(*np.unique(self.layer[members], return_counts=True), strict=True)
        }
        dens = np.nan_to_num(self.density[members], nan=-1.0)
        top = members[np.argsort(-dens, kind="stable")[:limit]]
        return {
            "community": c,
            "size": int(len(members)),
            "layers": per,
            "method": self.method,
            "members": [self.describe(int(u)) for u in top],
        }

    def summary(self) -> dict[str, Any]:
        multi = int((self.sizes >= 2).sum())
        return {
            "layers": self.layers,
            "n_nodes": len(self),
            "n_edges": int(len(self.src)),
            "edge_measure": self.measure,
            "pass_through": self.pass_through,
            "n_communities": multi,
            "community_method": self.method,
        }

    def strongest(self, n: int = 10) -> list[dict[str, Any]]:
        """A few starting points: the endpoints of the strongest edges between features active
        on at least the run's min_support tokens, one per layer pair."""
        out, seen = [], set()
        ok = self.supported[self.src] & self.supported[self.dst]
        for e in np.argsort(
            -np.where(ok, np.nan_to_num(self.weight, nan=-1.0), -2.0), kind="stable"
        ):
            if not ok[e] and out:
                break
            v = int(self.src[e])
            if int(self.layer[v]) in seen:
                continue
            seen.add(int(self.layer[v]))
            out.append(self.describe(v))
            if len(out) >= n:
                break
        return out
