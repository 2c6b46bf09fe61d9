"""The typed evolution outputs (issue 27 item 1, issue 29 class 4): evolution.json and graph.json
round-trip through `EvolutionSummary` / `GraphFile`, an old output still reads, and every fault
(missing key, string setting, threshold out of range, out-of-range edge, NaN, random bytes,
random JSON) is one `mlsae: error:` line from `load_evolution`, from `mlsae explore --evolution`
startup and from `mlsae analyze --evolution`, with nothing written."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from explore_fixtures import indexed_world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlsae.core.bootstrap import BootstrapInfo, Interval
from mlsae.core.errors import MlsaeError
from mlsae.core.stage_config import MEASURES, EvolutionConfig
from mlsae.evolution.run import findings
from mlsae.evolution.summary import (
    CommunitySummary,
    DataFacts,
    EvolutionSummary,
    GraphCounts,
    GraphFile,
    MatchRow,
    NullRates,
    PairSummary,
    load_evolution,
)

pytestmark = pytest.mark.usefixtures("one_thread")
DEMO = Path("/work/data/demo_out/evolution")


def valid_output(folder: Path) -> Path:
    """A small consistent evolution folder: layers 0, 1, 2; 3 features each; 4 edges."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [
        PairSummary(
            0,
            1,
            3,
            0,
            3,
            0,
            0.5,
            0.25,
            0.0,
            1,
            0,
            1,
            1 / 3,
            2,
            and_features=[(2, 0, 1)],
            specialised_features=[(2, 0)],
            null=NullRates("global", 0, 0.0, 1.0, 1.0, 0, 0, 0),
            intervals={"pass_through": Interval(0.25, 0.75), "and_rate": None},
        ),
        PairSummary(1, 2, 3, 0, 2, 1, 1.0, 0.0, 0.5, 0, 1, 0, 0.0, 2, or_features=[(1, 0, 2)]),
    ]
    body = EvolutionSummary(
        run="per_layer",
        layers=[0, 1, 2],
        data=DataFacts(64, 16, "cache"),
        n_used_tokens=60,
        settings=EvolutionConfig(),
        dead={"0": 0, "1": 0, "2": 1},
        pairs=pairs,
        match=[MatchRow(0, 1, 0.5, 0.6, 0.9, 0.2, 0.0), MatchRow(1, 2, 0.4, 0.5, 0.8, 0.1, 1.0)],
        communities=CommunitySummary("leiden", 1, 0, [8], {"8": 1}, 8, 8.0, 3.0, 3),
        graph=GraphCounts(8, 4, 8),
        findings=findings(pairs),
        bootstrap=BootstrapInfo(4, 10, 0),
    )
    layer = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    g = GraphFile(
        layers=[0, 1, 2],
        edge_measure="pearson",
        community_method="leiden",
        layer=layer,
        feature=np.array([0, 1, 2, 0, 1, 2, 0, 1]),
        community=np.zeros(8, np.int64),
        density=np.full(8, 0.25),
        src=np.array([0, 1, 3, 4]),
        dst=np.array([3, 5, 6, 7]),
        measures={k: np.array([0.9, 0.5, 0.3, np.nan]) for k in MEASURES},
    )
    (folder / "evolution.json").write_text(json.dumps(body.to_json()))
    (folder / "graph.json").write_text(json.dumps(g.to_json()))
    return folder


def test_round_trip_and_fields(tmp_path) -> None:
    d = valid_output(tmp_path / "evo")
    ev = load_evolution(d, with_graph=True)
    assert ev.summary.pairs[0].and_features == [(2, 0, 1)]
    assert ev.summary.pairs[0].intervals["pass_through"] == Interval(0.25, 0.75)
    assert ev.summary.pairs[0].null is not None and ev.summary.pairs[0].null.appear == 1.0
    assert ev.summary.bootstrap == BootstrapInfo(4, 10, 0)
    assert ev.summary.findings.n_and == 1 and ev.summary.findings.n_or == 1
    assert ev.graph is not None and np.isnan(ev.graph.measures["pearson"][3])
    assert json.loads((d / "evolution.json").read_text()) == ev.summary.to_json()
    assert json.loads((d / "graph.json").read_text()) == ev.graph.to_json()


@pytest.mark.skipif(not DEMO.is_dir(), reason="no demo output on this machine")
def test_an_old_output_reads_and_writes_the_same_json() -> None:
    ev = load_evolution(DEMO, with_graph=True)
    assert not ev.summary.settings.null and not ev.summary.settings.boolean_exclusive
    again = ev.summary.to_json()
    for k in ("null", "boolean_exclusive"):  # settings newer than the file
        del again["settings"][k]
    assert again == json.loads((DEMO / "evolution.json").read_text())
    assert ev.graph is not None
    assert ev.graph.to_json() == json.loads((DEMO / "graph.json").read_text())


def _edit(d: Path, name: str, change) -> None:
    obj = json.loads((d / name).read_text())
    change(obj)
    (d / name).write_text(json.dumps(obj))


def _set(path: list, value):
    def change(obj):
        for k in path[:-1]:
            obj = obj[k]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value

    return change


FAULTS = {
    "missing key": ("evolution.json", _set(["pairs"], KeyError)),
    "missing pair key": ("evolution.json", _set(["pairs", 0, "n_and"], KeyError)),
    "string setting": ("evolution.json", _set(["settings", "pass_through"], "0.95")),
    "threshold above 1": ("evolution.json", _set(["settings", "boolean_threshold"], 1.5)),
    "NaN rate": ("evolution.json", _set(["pairs", 1, "pass_through"], float("nan"))),
    "AND member outside the SAE": (
        "evolution.json",
        _set(["pairs", 0, "and_features"], [[2, 0, 7]]),
    ),
    "pairs not adjacent": ("evolution.json", _set(["layers"], [0, 1, 3])),
    "interval of no rate": ("evolution.json", _set(["pairs", 0, "intervals", "x"], None)),
    "string interval": (
        "evolution.json",
        _set(["pairs", 0, "intervals", "pass_through"], {"low": "0", "high": 1}),
    ),
    "null rate above 1": ("evolution.json", _set(["pairs", 0, "null", "appear"], 1.5)),
    "figure outside the folder": ("evolution.json", _set(["figures"], {"f": "../x.png"})),
    "edge out of range": ("graph.json", _set(["edges", "target", 0], 8)),
    "edge within a layer": ("graph.json", _set(["edges", "target", 0], 1)),
    "string edge": ("graph.json", _set(["edges", "source", 1], "1")),
    "NaN density": ("graph.json", _set(["nodes", "density", 2], float("nan"))),
    "infinite measure": ("graph.json", _set(["edges", "jaccard", 0], float("inf"))),
    "missing measure": ("graph.json", _set(["edges", "necessity"], KeyError)),
    "node on no layer": ("graph.json", _set(["nodes", "layer", 0], 5)),
    "short node list": ("graph.json", _set(["nodes", "feature"], [0, 1])),
    "other layers": ("graph.json", _set(["layers"], [0, 1, 2, 3])),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_one_error(tmp_path, fault) -> None:
    d = valid_output(tmp_path / "evo")
    _edit(d, *FAULTS[fault])
    with pytest.raises(MlsaeError) as e:
        load_evolution(d, with_graph=True)
    assert "\n" not in str(e.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return valid_output(tmp_path_factory.mktemp("good") / "evo")


def _read(good: Path, tmp: Path, name: str, data: bytes) -> None:
    """Replace one file of a copy and read it back: accepted, or one MlsaeError line."""
    work = tmp / "w"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(good, work)
    (work / name).write_bytes(data)
    try:
        load_evolution(work, with_graph=True)
    except MlsaeError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("name", ["evolution.json", "graph.json"])
@PROPERTY
@given(data=st.binary(max_size=256))
def test_random_bytes(good, tmp_path, name, data) -> None:
    _read(good, tmp_path, name, data)


KEYS = {
    "evolution.json": [
        "layers",
        "settings",
        "pairs",
        "match",
        "dead",
        "communities",
        "data",
        "findings",
        "figures",
        "n_used_tokens",
        "phase_s",
    ],
    "graph.json": ["layers", "nodes", "edges", "edge_measure", "community_method"],
}


@pytest.mark.parametrize("name", ["evolution.json", "graph.json"])
@PROPERTY
@given(value=JSON, index=st.integers(0, 10), inner=st.booleans())
def test_random_json(good, tmp_path, name, value, index, inner) -> None:
    """A random value at a key of the file (or of its first nested object), and the whole file
    as random JSON."""
    obj = json.loads((good / name).read_text())
    key = KEYS[name][index % len(KEYS[name])]
    doc = json.loads(json.dumps(obj))
    if inner and isinstance(doc[key], dict) and doc[key]:
        doc[key][sorted(doc[key])[index % len(doc[key])]] = value
    elif inner and isinstance(doc[key], list) and doc[key] and isinstance(doc[key][0], dict):
        doc[key][0][sorted(doc[key][0])[index % len(doc[key][0])]] = value
    else:
        doc[key] = value
    for d in (doc, value):
        with contextlib.suppress(ValueError):  # json.dumps refuses nothing here; NaN is written
            _read(good, tmp_path, name, json.dumps(d).encode())


# ------------------------------------------------------------------ the commands that read it


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return indexed_world(tmp_path_factory.mktemp("evo_world"))


def _cli(monkeypatch, capsys, argv: list[str]) -> str:
    from mlsae import cli

    monkeypatch.setattr("sys.argv", ["mlsae", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    return err


@pytest.mark.parametrize("fault", ["string setting", "edge out of range", "NaN density"])
def test_explore_and_analyze_refuse_a_bad_evolution_folder(
    world, tmp_path, monkeypatch, capsys, fault
) -> None:
    d = valid_output(tmp_path / "evo")
    _edit(d, *FAULTS[fault])
    err = _cli(
        monkeypatch, capsys, ["explore", str(world["run"]), "--evolution", str(d), "--port", "0"]
    )
    assert err.startswith("mlsae: error:") and err.count("\n") == 1
    if FAULTS[fault][0] == "graph.json":
        (d / "graph.json").unlink()  # analyze reads evolution.json only
        _edit(d, "evolution.json", _set(["layers"], [0, 1]))
    out = tmp_path / "analysis"
    err = _cli(
        monkeypatch,
        capsys,
        [
            "analyze",
            str(world["run"]),
            "--out",
            str(out),
            "--cache",
            str(world["cache"]),
            "--evolution",
            str(d),
        ],
    )
    assert err.startswith("mlsae: error:") and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())
