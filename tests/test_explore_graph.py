"""Features across layers: neighbourhood, pass-through chain and community on a hand-made
graph.json, and the same queries on a graph of the demo's size (133,705 features)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mlsae.core.errors import MlsaeError
from mlsae.core.stage_config import EvolutionConfig
from mlsae.evolution.run import findings
from mlsae.evolution.summary import (
    CommunitySummary,
    DataFacts,
    EvolutionSummary,
    GraphCounts,
    MatchRow,
    PairSummary,
)
from mlsae.explore.graphview import FeatureGraphView

MEASURES = ("pearson", "jaccard", "sufficiency", "necessity", "decoder_cos")


def write_graph(folder: Path, layer, feature, community, src, dst, pearson, pass_through=0.95):
    folder.mkdir(parents=True, exist_ok=True)
    n, e = len(layer), len(src)
    body = {
        "layers": sorted(set(int(x) for x in layer)),
        "edge_measure": "pearson",
        "community_method": "leiden",
        "nodes": {
            "layer": list(map(int, layer)),
            "feature": list(map(int, feature)),
            "community": list(map(int, community)),
            "density": [0.01] * n,
        },
        "edges": {
            "source": list(map(int, src)),
            "target": list(map(int, dst)),
            "pearson": list(map(float, pearson)),
            **{k: [0.5] * e for k in MEASURES if k != "pearson"},
        },
    }
    (folder / "graph.json").write_text(json.dumps(body))
    (folder / "evolution.json").write_text(json.dumps(summary(body["layers"], pass_through)))
    return folder


def summary(layers: list[int], pass_through: float) -> dict:
    """The smallest valid evolution.json for `layers`."""
    pairs = [
        PairSummary(u, d, 1, 0, 1, 0, None, None, None, 0, 0, 0, None, 0)
        for u, d in zip(layers, layers[1:], strict=False)
    ]
    return EvolutionSummary(
        run="r",
        layers=layers,
        data=DataFacts(0, 1),
        n_used_tokens=0,
        settings=EvolutionConfig(pass_through=pass_through),
        dead={},
        pairs=pairs,
        match=[MatchRow(p.up_layer, p.down_layer) for p in pairs],
        communities=CommunitySummary(),
        graph=GraphCounts(0, 0),
        findings=findings(pairs),
    ).to_json()


@pytest.fixture
def small(tmp_path) -> FeatureGraphView:
    # nodes: 0=L0:0 1=L1:0 2=L2:0 3=L3:0 4=L1:1 5=L2:7
    layer = [0, 1, 2, 3, 1, 2]
    feature = [0, 0, 0, 0, 1, 7]
    community = [0, 0, 0, 1, 0, 1]
    src = [0, 1, 2, 0, 4]
    dst = [1, 2, 3, 4, 5]
    pearson = [0.99, 0.97, 0.5, 0.6, 0.96]
    return FeatureGraphView(
        write_graph(tmp_path / "g", layer, feature, community, src, dst, pearson)
    )


def ids(nodes) -> set[tuple[int, int]]:
    return {(n["layer"], n["feature"]) for n in nodes}


def test_neighbourhood_by_layers_and_threshold(small) -> None:
    v = small.node(1, 0)
    got = small.neighbourhood(v, back=1, fwd=2, thr=0.55, per_layer=10)
    assert ids(got["nodes"]) == {(0, 0), (1, 0), (2, 0)}  # L3:0 only via r=0.5 < 0.55
    assert {(e["source"], e["target"]) for e in got["edges"]} == {(0, 1), (1, 2)}
    got = small.neighbourhood(v, back=1, fwd=2, thr=0.4, per_layer=10)
    assert ids(got["nodes"]) == {(0, 0), (1, 0), (2, 0), (3, 0)}
    got = small.neighbourhood(v, back=0, fwd=0, thr=0.0, per_layer=10)
    assert ids(got["nodes"]) == {(1, 0)}
    # from L0:0 forward one layer, at most one node per layer: the strongest (L1:0, r=0.99)
    got = small.neighbourhood(small.node(0, 0), back=0, fwd=1, thr=0.0, per_layer=1)
    assert ids(got["nodes"]) == {(0, 0), (1, 0)}


def test_pass_through_chain_and_community(small) -> None:
    chain = small.chain(small.node(1, 0))
    assert [(n["layer"], n["feature"]) for n in chain] == [(0, 0), (1, 0), (2, 0)]
    assert [n["pearson_in"] for n in chain] == [None, 0.99, 0.97]
    chain = small.chain(small.node(2, 7))  # L1:1 -> L2:7 at 0.96; L1:1 <- L0:0 only 0.6
    assert [(n["layer"], n["feature"]) for n in chain] == [(1, 1), (2, 7)]
    c = small.community_info(0)
    assert c["size"] == 4 and c["layers"] == {0: 1, 1: 2, 2: 1}
    with pytest.raises(KeyError):
        small.node(3, 5)


def test_unreadable_graph(tmp_path) -> None:
    with pytest.raises(MlsaeError, match="no graph.json"):
        FeatureGraphView(tmp_path)
    (tmp_path / "graph.json").write_text("{}")
    with pytest.raises(MlsaeError, match="no evolution.json"):
        FeatureGraphView(tmp_path)
    (tmp_path / "evolution.json").write_text(json.dumps(summary([0, 1], 0.95)))
    with pytest.raises(MlsaeError, match="graph.json: layers"):
        FeatureGraphView(tmp_path)


@pytest.mark.slow
def test_demo_scale_graph(tmp_path) -> None:
    """133,705 features on 30 layers, 3 edges to the next layer each: queries return bounded
    neighbourhoods (times are printed, never asserted)."""
    rng = np.random.default_rng(0)
    per = np.full(30, 133_705 // 30)
    per[: 133_705 - per.sum()] += 1
    layer = np.repeat(np.arange(30), per)
    feature = np.concatenate([rng.permutation(4608)[:p] for p in per])
    start = np.concatenate([[0], np.cumsum(per)])
    src, dst = [], []
    for ly in range(29):
        a = np.arange(start[ly], start[ly + 1])
        for _ in range(3):
            src.append(a)
            dst.append(rng.integers(start[ly + 1], start[ly + 2], size=len(a)))
    src, dst = np.concatenate(src), np.concatenate(dst)
    pearson = rng.uniform(0, 1, len(src))
    community = rng.integers(0, 2000, len(layer))
    folder = write_graph(tmp_path / "big", layer, feature, community, src, dst, pearson)
    t0 = time.perf_counter()
    g = FeatureGraphView(folder)
    t_load = time.perf_counter() - t0
    assert len(g) == 133_705
    times = []
    for v in rng.integers(len(g), size=20):
        t0 = time.perf_counter()
        out = g.neighbourhood(int(v), back=3, fwd=3, thr=0.3, per_layer=12)
        g.chain(int(v))
        g.community_info(int(g.community[v]))
        times.append(time.perf_counter() - t0)
        assert 1 <= len(out["nodes"]) <= 1 + 6 * 12
        assert all(abs(n["layer"] - int(g.layer[v])) <= 3 for n in out["nodes"])
    print(
        f"133,705-feature graph: load {t_load:.1f} s, query median {1e3 * np.median(times):.0f} ms"
    )
