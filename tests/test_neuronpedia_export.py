"""`mlsae export --format neuronpedia`: the rows written match the fields and types of
Neuronpedia's database models (its Prisma schema, apps/webapp/prisma/schema.prisma: Model,
SourceRelease, SourceSet, Source, Neuron, Activation), one source per block of the MLSAE with
the same latent index at every block, and the numbers equal the explorer index they come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from explore_fixtures import LAYERS, indexed_world

# field -> JSON type, as declared in Neuronpedia's schema (String -> str, Int -> int, Float ->
# float, Boolean -> bool, X[] -> list, enum Visibility -> str); REQUIRED: no default, not
# optional, not a relation. Written from reading the schema, independently of the exporter.
S, N, F, B, L = str, int, float, bool, list
SCHEMA = {
    "model": (
        {
            "id": S,
            "displayName": S,
            "creatorId": S,
            "layers": N,
            "neuronsPerLayer": N,
            "owner": S,
            "visibility": S,
        },
        {"id", "creatorId", "layers", "neuronsPerLayer", "owner"},
    ),
    "release": (
        {"name": S, "description": S, "urls": L, "creatorName": S, "creatorId": S, "visibility": S},
        {"name", "description", "creatorName", "creatorId"},
    ),
    "sourceset": (
        {
            "modelId": S,
            "name": S,
            "description": S,
            "type": S,
            "creatorName": S,
            "urls": L,
            "creatorId": S,
            "releaseName": S,
            "visibility": S,
        },
        {"modelId", "name", "description", "creatorName", "creatorId"},
    ),
    "source": (
        {
            "id": S,
            "modelId": S,
            "setName": S,
            "creatorId": S,
            "hasDashboards": B,
            "dataset": S,
            "num_prompts": N,
            "num_tokens_in_prompt": N,
            "visibility": S,
            "notes": S,
        },
        {"id", "modelId", "setName", "creatorId"},
    ),
    "features": (
        {
            "modelId": S,
            "layer": S,
            "index": S,
            "creatorId": S,
            "sourceSetName": S,
            "maxActApprox": F,
            "frac_nonzero": F,
            "pos_str": L,
            "pos_values": L,
            "neg_str": L,
            "neg_values": L,
            "topkCosSimIndices": L,
            "topkCosSimValues": L,
            "freq_hist_data_bar_heights": L,
            "freq_hist_data_bar_values": L,
            "hookName": S,
            "hasVector": B,
        },
        {"modelId", "layer", "index"},
    ),
    "activations": (
        {
            "modelId": S,
            "layer": S,
            "index": S,
            "tokens": L,
            "values": L,
            "maxValue": F,
            "maxValueTokenIndex": N,
            "minValue": F,
            "dataIndex": S,
            "creatorId": S,
            "dataSource": S,
        },
        {
            "tokens",
            "index",
            "layer",
            "modelId",
            "maxValue",
            "maxValueTokenIndex",
            "minValue",
            "values",
            "creatorId",
        },
    ),
}


def check_row(kind: str, row: dict) -> None:
    fields, required = SCHEMA[kind]
    assert set(row) <= set(fields), f"{kind}: fields not in the schema: {set(row) - set(fields)}"
    assert required <= set(row), f"{kind}: missing {required - set(row)}"
    for k, v in row.items():
        if v is None:
            assert k not in required, f"{kind}.{k} is required"
            continue
        want = fields[k]
        ok = (
            isinstance(v, (int, float)) and not isinstance(v, bool)
            if want is F
            else isinstance(v, want)
        )
        assert ok, f"{kind}.{k}: {type(v).__name__}, schema says {want.__name__}"


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mlsae.explore.npexport import index_to_neuronpedia
    from mlsae.interchange.neuronpedia import write_neuronpedia

    root = tmp_path_factory.mktemp("np")
    w = indexed_world(root)
    ex = index_to_neuronpedia(w["run"] / "explore.sqlite", "tiny-llama", "mlsae-res", "me", 3)
    folders = write_neuronpedia(ex, root / "out")
    return w, folders


def test_rows_match_the_schema(exported) -> None:
    _, folders = exported
    assert [f.name for f in folders] == [f"{ly}-mlsae-res" for ly in LAYERS]
    for d in folders:
        for kind in ("model", "release", "sourceset", "source"):
            rows = read(d / f"{kind}.jsonl")
            assert len(rows) == 1
            check_row(kind, rows[0])
        for kind in ("features", "activations"):
            files = sorted((d / kind).glob("batch-*.jsonl"))
            assert files
            for f in files:
                for row in read(f):
                    check_row(kind, row)
                    assert row["layer"] == d.name  # a Neuron's layer is its source id
    src = read(folders[0] / "source.jsonl")[0]
    assert src["id"] == folders[0].name and src["setName"] == "mlsae-res"


def test_same_latent_at_every_block_with_the_index_numbers(exported) -> None:
    from mlsae.explore.db import IndexDB

    w, folders = exported
    db = IndexDB(w["run"] / "explore.sqlite")
    n = db.saes[0]["n_tokens"]
    for p, d in enumerate(folders):
        feats = read(d / "features" / "batch-0.jsonl")
        assert [int(f["index"]) for f in feats] == list(range(db.saes[0]["d_sae"]))
        acts = read(d / "activations" / "batch-0.jsonl")
        for f in feats[:16]:
            j = int(f["index"])
            lat = db.latent(0, j)
            assert f["frac_nonzero"] == pytest.approx(lat["layer_count"][p] / n)
            top = db.examples(0, j, "top", LAYERS[p])[:3]
            mine = [a for a in acts if a["index"] == str(j)]
            assert [int(a["dataIndex"]) for a in mine] == [e["pos"] for e in top]
            for a, e in zip(mine, top, strict=True):
                assert a["values"][a["maxValueTokenIndex"]] == pytest.approx(
                    max(e["acts"]), abs=1e-3
                )
                assert e["act"] == pytest.approx(a["values"][e["at"]], rel=1e-2, abs=1e-2)


def test_bad_model_id_is_refused(exported, tmp_path) -> None:
    from mlsae.core.errors import MlsaeError
    from mlsae.explore.npexport import index_to_neuronpedia
    from mlsae.interchange.neuronpedia import write_neuronpedia

    w, _ = exported
    ex = index_to_neuronpedia(w["run"] / "explore.sqlite", "bad id/..", "s", "me", 1)
    with pytest.raises(MlsaeError, match="letters, digits"):
        write_neuronpedia(ex, tmp_path / "x")
    assert not (tmp_path / "x").exists()
