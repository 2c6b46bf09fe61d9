"""The feature graph across layers (SPEC section 6): nodes are (layer, feature) of the alive
features of per-layer SAEs, edges join each feature to its most similar next-layer features
(see `mlsae.evolution.measures.summarize_pair`), communities by Leiden (leidenalg + igraph, modularity)
with networkx's Louvain as the fallback, both seeded and deterministic.

Outputs: graph.json (columnar: nodes {layer, feature, community, density}, edges {source,
target, every measure}, indices into the node arrays) and graph.html (one offline file with the
vendored Cytoscape.js inlined; layers as columns, nodes coloured by community, edge width by
similarity, a click shows a feature's panel, filters by layer range and minimum similarity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.core.stage_config import MEASURES
from mlsae.evolution.graphfile import GraphFile
from mlsae.evolution.measures import PairResult
from mlsae.evolution.summary import CommunitySummary


@dataclass
class FeatureGraph:
    """Nodes [V] and undirected edges [E] (source = up-layer node, target = down-layer node)."""

    layers: list[int]
    layer: np.ndarray  # [V] block index
    feature: np.ndarray  # [V] feature index in that layer's SAE
    density: np.ndarray  # [V] fraction of used tokens with activation > 0
    src: np.ndarray  # [E] node index
    dst: np.ndarray  # [E] node index
    measures: dict[str, np.ndarray]  # [E] each of MEASURES
    edge_measure: str
    community: np.ndarray | None = None  # [V] 0 = largest community
    method: str = ""

    @property
    def weight(self) -> np.ndarray:
        """[E] the edge measure (positive by construction)."""
        return self.measures[self.edge_measure]

    def node_index(self) -> dict[tuple[int, int], int]:
        """(layer, feature) -> node index."""
        return {
            (int(a), int(b)): i
            for i, (a, b) in enumerate(zip(self.layer, self.feature, strict=True))
        }


def build_graph(
    layers: list[int],
    alive: list[Tensor],
    density: list[Tensor],
    results: list[PairResult],
    edge_measure: str,
) -> FeatureGraph:
    """Nodes: every alive feature of every layer; edges: every pair result's edges."""
    offsets, layer, feature, dens = [], [], [], []
    node_of: list[np.ndarray] = []  # per layer: feature -> node index (-1 dead)
    n = 0
    for pos, ly in enumerate(layers):
        f = alive[pos].nonzero().flatten().numpy()
        m = np.full(len(alive[pos]), -1, dtype=np.int64)
        m[f] = np.arange(n, n + len(f))
        node_of.append(m)
        offsets.append(n)
        layer.append(np.full(len(f), ly, dtype=np.int64))
        feature.append(f.astype(np.int64))
        dens.append(density[pos].numpy()[f])
        n += len(f)
    src, dst, meas = [], [], {k: [] for k in MEASURES}
    for p, r in enumerate(results):
        if (r.up_layer, r.down_layer) != (layers[p], layers[p + 1]):
            raise MlsaeError(f"pair {p} is {r.up_layer}->{r.down_layer}, not adjacent layers")
        src.append(node_of[p][r.edges["up"].numpy()])
        dst.append(node_of[p + 1][r.edges["down"].numpy()])
        for k in MEASURES:
            meas[k].append(r.edges[k].numpy())
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    return FeatureGraph(
        layers=list(layers),
        layer=cat(layer, np.int64),
        feature=cat(feature, np.int64),
        density=cat(dens, np.float64),
        src=cat(src, np.int64),
        dst=cat(dst, np.int64),
        measures={k: cat(v, np.float64) for k, v in meas.items()},
        edge_measure=edge_measure,
    )


def _canonical(groups: list[list[int]], n: int) -> np.ndarray:
    """Labels 0.. by decreasing size, ties by smallest member (independent of the algorithm's
    own numbering)."""
    groups = sorted((sorted(g) for g in groups), key=lambda g: (-len(g), g[0]))
    labels = np.full(n, -1, dtype=np.int64)
    for c, g in enumerate(groups):
        labels[g] = c
    return labels


def communities(
    n: int,
    src: np.ndarray,
    dst: np.ndarray,
    weight: np.ndarray,
    seed: int = 0,
    method: Literal["auto", "leiden", "louvain"] = "auto",
    resolution: float = 1.0,
) -> tuple[np.ndarray, str]:
    """Community labels [n] (weighted modularity with a resolution gamma; 1 = plain
    modularity, larger = smaller communities) and the method used. 'auto' = Leiden when
    leidenalg and igraph import, else Louvain (networkx). Deterministic for a given seed."""
    if method in ("auto", "leiden"):
        try:
            import igraph
            import leidenalg
        except ImportError:
            if method == "leiden":
                raise MlsaeError("Leiden needs `pip install leidenalg igraph`") from None
        else:
            g = igraph.Graph(n=n, edges=np.stack([src, dst], 1).tolist(), directed=False)
            part = leidenalg.find_partition(
                g,
                leidenalg.RBConfigurationVertexPartition,
                weights=weight.tolist(),
                seed=seed,
                resolution_parameter=resolution,
            )
            return _canonical([list(c) for c in part], n), "leiden"
    import networkx as nx

    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_weighted_edges_from(zip(src.tolist(), dst.tolist(), weight.tolist(), strict=True))
    comms = nx.community.louvain_communities(
        graph, weight="weight", resolution=resolution, seed=seed
    )
    return _canonical([list(c) for c in comms], n), "louvain"


def community_summary(g: FeatureGraph) -> CommunitySummary:
    """Count and size distribution of communities (singletons: features without edges or left
    alone), and how many layers each multi-feature community spans."""
    if g.community is None:
        return CommunitySummary()
    sizes = np.bincount(g.community) if len(g.community) else np.zeros(0, np.int64)
    multi = np.nonzero(sizes >= 2)[0]
    spans = [len(np.unique(g.layer[g.community == c])) for c in multi]
    hist = np.bincount(sizes)
    return CommunitySummary(
        method=g.method,
        n_communities=len(multi),
        n_singletons=int((sizes == 1).sum()),
        sizes=sizes[multi].tolist(),
        size_histogram={str(s): int(c) for s, c in enumerate(hist) if c and s >= 2},
        largest=int(sizes.max()) if len(sizes) else 0,
        median_size=float(np.median(sizes[multi])) if len(multi) else None,
        mean_layer_span=float(np.mean(spans)) if spans else None,
        max_layer_span=int(max(spans)) if spans else 0,
    )


def round_or_none(v: float, digits: int = 6) -> float | None:
    """JSON number rounded to `digits` significant digits; NaN/inf -> null."""
    v = float(v)
    return None if not math.isfinite(v) else float(f"{v:.{digits}g}")


def finite(obj: Any) -> Any:
    """A copy with every NaN/inf float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def graph_file(g: FeatureGraph) -> GraphFile:
    """The typed graph.json of a graph (columnar arrays; edges index the node arrays)."""
    return GraphFile(
        layers=list(g.layers),
        edge_measure=g.edge_measure,
        community_method=g.method,
        layer=g.layer,
        feature=g.feature,
        community=np.zeros(0, np.int64) if g.community is None else g.community,
        density=g.density,
        src=g.src,
        dst=g.dst,
        measures={k: g.measures[k] for k in MEASURES},
    )


def graph_json(g: FeatureGraph) -> dict[str, Any]:
    """The graph.json body (`GraphFile.to_json`)."""
    return graph_file(g).to_json()


def select_nodes(g: FeatureGraph, max_nodes: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Indices (sorted) of at most `max_nodes` nodes to draw: the endpoints of the strongest
    edges between `eligible` nodes (default all; e.g. features active often enough for their
    Pearson to mean something), taken in turn from each layer pair so every column shows its
    best links; then the remaining nodes of highest degree."""
    n = len(g.layer)
    if n <= max_nodes:
        return np.arange(n)
    ok = np.ones(n, bool) if eligible is None else eligible
    by_pair = []
    for lu in g.layers[:-1]:
        e = np.nonzero((g.layer[g.src] == lu) & ok[g.src] & ok[g.dst])[0]
        by_pair.append(e[np.lexsort((e, -g.weight[e]))])  # strongest first, ties by index
    chosen: dict[int, None] = {}
    rank = 0
    while len(chosen) < max_nodes - 1 and any(rank < len(e) for e in by_pair):
        for e in by_pair:
            if rank < len(e) and len(chosen) + 2 <= max_nodes:
                chosen.update({int(g.src[e[rank]]): None, int(g.dst[e[rank]]): None})
        rank += 1
    deg = np.bincount(np.concatenate([g.src, g.dst]), minlength=n)
    for v in np.lexsort((np.arange(n), -deg)):
        if len(chosen) >= max_nodes:
            break
        chosen.setdefault(int(v), None)
    return np.sort(np.fromiter(chosen, dtype=np.int64))
