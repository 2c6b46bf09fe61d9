"""DIR/graph.json of `mlsae evolution` as a typed, checked object (`GraphFile`): the feature
graph's nodes and edges as arrays; every key's type, finiteness and the ranges a reader relies
on (nodes on the listed layers, edge endpoints inside the node list, edges between adjacent
layers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from mlsae.core.choices import check
from mlsae.core.stage_config import MEASURES


def _ints(obj: dict, key: str, where: str) -> np.ndarray:
    v = obj.get(key)
    check(isinstance(v, list), f"{where}: {key}: expected a list of integers")
    assert isinstance(v, list)
    check(all(type(x) is int for x in v), f"{where}: {key}: expected a list of integers")
    return np.asarray(v, dtype=np.int64).reshape(-1)


def _floats(obj: dict, key: str, where: str) -> np.ndarray:
    """A list of finite numbers or nulls (NaN in the array)."""
    v = obj.get(key)
    check(isinstance(v, list), f"{where}: {key}: expected a list of numbers")
    assert isinstance(v, list)
    check(
        all(type(x) in (int, float) or x is None for x in v),
        f"{where}: {key}: expected a list of numbers or nulls",
    )
    out = np.asarray([math.nan if x is None else x for x in v], dtype=np.float64).reshape(-1)
    check(
        not np.isinf(out).any() and np.isnan(out).sum() == v.count(None),
        f"{where}: {key}: a number that is not finite",
    )
    return out


@dataclass
class GraphFile:
    """DIR/graph.json: nodes [V] (layer, feature, community, density) and edges [E] (source,
    target: indices into the nodes, from an up-layer to the next layer; every measure)."""

    layers: list[int]
    edge_measure: str
    community_method: str
    layer: np.ndarray
    feature: np.ndarray
    community: np.ndarray  # [V], or [0] when communities were not computed
    density: np.ndarray  # [V] NaN where not recorded
    src: np.ndarray
    dst: np.ndarray
    measures: dict[str, np.ndarray]

    def to_json(self) -> dict[str, Any]:
        num = lambda a: [None if not math.isfinite(x) else float(f"{x:.6g}") for x in a.tolist()]
        return {
            "layers": self.layers,
            "edge_measure": self.edge_measure,
            "community_method": self.community_method,
            "nodes": {
                "layer": self.layer.tolist(),
                "feature": self.feature.tolist(),
                "community": self.community.tolist(),
                "density": num(self.density),
            },
            "edges": {
                "source": self.src.tolist(),
                "target": self.dst.tolist(),
                **{k: num(v) for k, v in self.measures.items()},
            },
        }

    @classmethod
    def from_json(cls, obj: object, where: str = "graph.json") -> GraphFile:
        check(isinstance(obj, dict), f"{where}: expected a JSON object")
        assert isinstance(obj, dict)
        layers = obj.get("layers")
        check(
            isinstance(layers, list)
            and len(layers) >= 2
            and all(type(x) is int and x >= 0 for x in layers)
            and all(a < b for a, b in pairwise(layers)),
            f"{where}: layers: expected >= 2 increasing block numbers",
        )
        measure, method = obj.get("edge_measure", "pearson"), obj.get("community_method", "")
        check(measure in MEASURES, f"{where}: edge_measure: {measure!r:.40} is not a measure")
        check(isinstance(method, str), f"{where}: community_method: expected a string")
        nodes, edges = obj.get("nodes"), obj.get("edges")
        check(
            isinstance(nodes, dict) and isinstance(edges, dict),
            f"{where}: expected 'nodes' and 'edges' objects",
        )
        assert isinstance(nodes, dict) and isinstance(edges, dict) and isinstance(layers, list)
        g = cls(
            layers,
            str(measure),
            str(method),
            _ints(nodes, "layer", where),
            _ints(nodes, "feature", where),
            _ints(nodes, "community", where),
            _floats(nodes, "density", where),
            _ints(edges, "source", where),
            _ints(edges, "target", where),
            {k: _floats(edges, k, where) for k in MEASURES},
        )
        g.validate(where)
        return g

    def validate(self, where: str) -> None:
        """Ranges: nodes on the listed layers, edges between nodes of adjacent layers."""
        n, e = len(self.layer), len(self.src)
        check(len(self.feature) == n and len(self.density) == n, f"{where}: node array lengths")
        check(len(self.community) in (0, n), f"{where}: nodes: community length")
        check(bool(np.isin(self.layer, self.layers).all()), f"{where}: a node on no listed layer")
        check(bool((self.feature >= 0).all()), f"{where}: a negative feature index")
        key = self.layer * (int(self.feature.max(initial=0)) + 1) + self.feature
        check(len(np.unique(key)) == n, f"{where}: a (layer, feature) node listed twice")
        check(bool((self.community >= -1).all()), f"{where}: a community below -1")
        d = self.density[~np.isnan(self.density)]
        check(bool(((d >= 0) & (d <= 1)).all()), f"{where}: a density outside [0, 1]")
        check(len(self.dst) == e, f"{where}: edges: source and target lengths differ")
        check(self.edge_measure in self.measures, f"{where}: edges: no {self.edge_measure}")
        for k, v in self.measures.items():
            check(len(v) == e, f"{where}: edges: {k} has {len(v)} values for {e} edges")
        ends = np.concatenate([self.src, self.dst])
        check(
            bool(((ends >= 0) & (ends < n)).all()),
            f"{where}: an edge endpoint outside the {n} nodes",
        )
        pos = np.searchsorted(np.asarray(self.layers), self.layer)
        check(
            bool((pos[self.dst] == pos[self.src] + 1).all()),
            f"{where}: an edge that does not join adjacent layers",
        )
