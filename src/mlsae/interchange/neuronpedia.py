"""Export to Neuronpedia's import layout: the rows its self-hosted instance reads back, one JSON
object per line, named after its database tables (Prisma models `Model`, `SourceRelease`,
`SourceSet`, `Source`, `Neuron`, `Activation`; field names as in its schema).

Layout under OUT (one folder per source, as Neuronpedia's own exports are laid out):

    OUT/<model id>/<source id>/release.jsonl      the SourceRelease row
    OUT/<model id>/<source id>/model.jsonl        the Model row
    OUT/<model id>/<source id>/sourceset.jsonl    the SourceSet row
    OUT/<model id>/<source id>/source.jsonl       the Source row
    OUT/<model id>/<source id>/features/batch-N.jsonl     Neuron rows (1024 per batch)
    OUT/<model id>/<source id>/activations/batch-N.jsonl  Activation rows (their examples)

A Neuronpedia source is one hook point of one model; its id is "<layer>-<set name>". An MLSAE
becomes one source per block it reads, with the same latent index at every block (latent j is
feature j of every source). This module writes what it is given (`NpExport`); the explorer's
index is turned into one by `mlsae.explore.npexport`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_text

BATCH = 1024  # rows per features / activations file
ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")  # Neuronpedia's rule for model ids and set names


@dataclass
class NpFeature:
    """One latent at one source (a Neuron row)."""

    index: int
    max_act: float  # maxActApprox
    frac_nonzero: float  # share of tokens it is active on
    pos_str: list[str]  # tokens its decoder direction promotes most, and the logit changes
    pos_values: list[float]
    neg_str: list[str]
    neg_values: list[float]
    cos_indices: list[int]  # nearest latents by decoder cosine
    cos_values: list[float]
    hist_heights: list[float]  # activation histogram: counts and bin centres
    hist_values: list[float]


@dataclass
class NpActivation:
    """One example of a latent: a window of tokens and the latent's activation on each."""

    index: int
    tokens: list[str]
    values: list[float]
    data_index: int  # the example token's position in the indexed stream


@dataclass
class NpSource:
    """One hook point: its block, its features and their examples."""

    layer: int
    features: list[NpFeature]
    activations: list[NpActivation]


@dataclass
class NpExport:
    """Everything one export writes."""

    model_id: str
    set_name: str
    creator: str
    description: str
    n_layers: int  # the model's blocks
    d_sae: int  # features per source
    hook: str  # e.g. "hook_resid_post"
    dataset: str
    n_tokens: int
    sources: list[NpSource] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


def source_id(ex: NpExport, layer: int) -> str:
    return f"{layer}-{ex.set_name}"


def _rows(ex: NpExport, src: NpSource) -> dict[str, Any]:
    sid = source_id(ex, src.layer)
    c = ex.creator
    return {
        "release": {
            "name": ex.set_name,
            "description": ex.description,
            "urls": ex.urls,
            "creatorName": c,
            "creatorId": c,
            "visibility": "PRIVATE",
        },
        "model": {
            "id": ex.model_id,
            "displayName": ex.model_id,
            "creatorId": c,
            "layers": ex.n_layers,
            "neuronsPerLayer": ex.d_sae,
            "owner": c,
            "visibility": "PRIVATE",
        },
        "sourceset": {
            "modelId": ex.model_id,
            "name": ex.set_name,
            "description": ex.description,
            "type": ex.hook,
            "creatorName": c,
            "urls": ex.urls,
            "creatorId": c,
            "releaseName": ex.set_name,
            "visibility": "PRIVATE",
        },
        "source": {
            "id": sid,
            "modelId": ex.model_id,
            "setName": ex.set_name,
            "creatorId": c,
            "hasDashboards": True,
            "dataset": ex.dataset,
            "num_prompts": None,
            "num_tokens_in_prompt": None,
            "visibility": "PRIVATE",
            "notes": f"{ex.n_tokens} indexed tokens",
        },
    }


def _feature_row(ex: NpExport, sid: str, f: NpFeature) -> dict[str, Any]:
    return {
        "modelId": ex.model_id,
        "layer": sid,
        "index": str(f.index),
        "creatorId": ex.creator,
        "sourceSetName": ex.set_name,
        "maxActApprox": f.max_act,
        "frac_nonzero": f.frac_nonzero,
        "pos_str": f.pos_str,
        "pos_values": f.pos_values,
        "neg_str": f.neg_str,
        "neg_values": f.neg_values,
        "topkCosSimIndices": f.cos_indices,
        "topkCosSimValues": f.cos_values,
        "freq_hist_data_bar_heights": f.hist_heights,
        "freq_hist_data_bar_values": f.hist_values,
        "hookName": ex.hook,
        "hasVector": False,
    }


def _activation_row(ex: NpExport, sid: str, a: NpActivation) -> dict[str, Any]:
    top = max(range(len(a.values)), key=lambda i: a.values[i]) if a.values else 0
    return {
        "modelId": ex.model_id,
        "layer": sid,
        "index": str(a.index),
        "tokens": a.tokens,
        "values": a.values,
        "maxValue": max(a.values, default=0.0),
        "maxValueTokenIndex": top,
        "minValue": min(a.values, default=0.0),
        "dataIndex": str(a.data_index),
        "creatorId": ex.creator,
        "dataSource": ex.dataset,
    }


def _batches(rows: list[dict[str, Any]]) -> list[str]:
    return [
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[s : s + BATCH])
        for s in range(0, len(rows), BATCH)
    ]


def write_neuronpedia(ex: NpExport, out: str | Path) -> list[Path]:
    """Write the export under `out` (see the module docstring); returns the source folders."""
    for what, v in (("model id", ex.model_id), ("set name", ex.set_name)):
        if not ID_RE.match(v):
            raise MlsaeError(f"Neuronpedia {what} {v!r} may hold only letters, digits, _ and -")
    if not ex.sources:
        raise MlsaeError("nothing to export: no sources")
    from mlsae.core.outputs import check_writable

    check_writable(Path(out), "the Neuronpedia export")
    folders = []
    for src in ex.sources:
        sid = source_id(ex, src.layer)
        d = Path(out) / ex.model_id / sid
        for name, row in _rows(ex, src).items():
            write_text(d / f"{name}.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
        feats = [_feature_row(ex, sid, f) for f in src.features]
        acts = [_activation_row(ex, sid, a) for a in src.activations]
        for sub, rows in (("features", feats), ("activations", acts)):
            for b, text in enumerate(_batches(rows)):
                write_text(d / sub / f"batch-{b}.jsonl", text)
        folders.append(d)
    return folders


def as_dict(ex: NpExport) -> dict[str, Any]:
    """The export as plain data (for tests and logs)."""
    return asdict(ex)
