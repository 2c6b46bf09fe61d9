"""`mlsae synth score`: load the SAE(s) of a run and the truth, score them (mlsae.synth.score),
write the result JSON; and the tables `mlsae synth` prints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsae.core.errors import MlsaeError
from mlsae.synth.config import ScoreConfig
from mlsae.synth.score import (
    EdgeScore,
    MatchScore,
    Recovery,
    SpanScore,
    edge_scores,
    recovery_at,
    reported_edges,
    span_match,
    span_score,
    true_edges,
)
from mlsae.synth.truth import load_truth

if TYPE_CHECKING:
    from mlsae.evolution.graphfile import GraphFile


@dataclass
class SynthScore:
    """What `mlsae synth score` writes (JSON)."""

    run: str
    truth: str
    kind: str  # "multi-layer" or "per-layer"
    mcc: float  # mean over layers
    recovered: float  # mean over layers
    recovery: float  # mean over layers
    layers: list[Recovery]
    spans: SpanScore | None = None
    edges: list[EdgeScore] = field(default_factory=list)
    match: MatchScore | None = None
    evolution: str | None = None


def _mean(xs: list[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    return sum(ok) / len(ok) if ok else math.nan


def score_command(
    run: Path, truth_dir: Path, evolution: Path | None = None, cfg: ScoreConfig | None = None
) -> SynthScore:
    """Score one SAE (multi-layer, or a per-layer set) and optionally its evolution output."""
    from mlsae.sae.folders import RunFolder, load_sae, sae_layers

    cfg = cfg or ScoreConfig()
    truth, body = load_truth(truth_dir)
    folder = RunFolder(Path(run))
    dirs = folder.sae_dirs()
    L = truth.cfg.n_layers
    if len(dirs) == 1 and len(sae_layers(dirs[0])) > 1:
        sae = load_sae(dirs[0])
        if sae.cfg.d_in != truth.cfg.d_model:
            raise MlsaeError(f"{run}: d_in {sae.cfg.d_in}, the truth's width {truth.cfg.d_model}")
        centre = sae.cfg.normalize != "none"
        rec = [
            recovery_at(sae.W_dec.cpu(), truth, ly, centre, cfg.recovered_cos) for ly in range(L)
        ]
        out = SynthScore(
            str(run),
            str(truth_dir),
            "multi-layer",
            _mean([r.mcc for r in rec]),
            _mean([r.recovered for r in rec]),
            _mean([r.recovery for r in rec]),
            rec,
        )
        out.spans = _spans(sae, truth, body, Path(truth_dir), centre, cfg)
        if evolution is not None:
            raise MlsaeError("--evolution needs a per-layer run (`mlsae evolution` reads those)")
        return out
    saes = dict((ly, load_sae(d)) for ly, d in folder.per_layer_dirs())
    if sorted(saes) != list(range(L)):
        raise MlsaeError(
            f"{run}: per-layer SAEs of layers {sorted(saes)}, the truth has 0..{L - 1}"
        )
    rec = []
    for ly, sae in sorted(saes.items()):
        rec.append(
            recovery_at(sae.W_dec.cpu(), truth, ly, sae.cfg.normalize != "none", cfg.recovered_cos)
        )
    out = SynthScore(
        str(run),
        str(truth_dir),
        "per-layer",
        _mean([r.mcc for r in rec]),
        _mean([r.recovered for r in rec]),
        _mean([r.recovery for r in rec]),
        rec,
    )
    by_layer = {r.layer: r for r in rec}
    from mlsae.synth.score import match_score

    out.match = ms = match_score([saes[ly].W_dec.cpu() for ly in range(L)], truth, by_layer)
    if evolution is not None:
        from mlsae.evolution.summary import load_evolution

        evo = load_evolution(Path(evolution), with_graph=True)
        graph = evo.graph
        assert graph is not None  # with_graph
        if evo.summary.layers != list(range(L)):
            raise MlsaeError(f"{evolution}: layers {evo.summary.layers}, the truth has 0..{L - 1}")
        out.edges = edge_scores(true_edges(truth, by_layer), reported_edges(evo.summary, graph))
        ms.median_matched_cos_alive = _alive_cos(saes, graph)
        out.evolution = str(evolution)
    return out


def _alive_cos(saes: dict[int, Any], graph: GraphFile) -> list[float]:
    """Per adjacent pair: the median decoder cosine of SAE Match's pairs of alive latents."""
    from mlsae.synth.score import alive_from_graph, matched_cosines

    out = []
    for ly in sorted(saes)[:-1]:
        up, down = saes[ly], saes[ly + 1]
        cos = matched_cosines(
            up.W_dec.cpu(),
            down.W_dec.cpu(),
            alive_from_graph(graph, ly, up.cfg.d_sae),
            alive_from_graph(graph, ly + 1, down.cfg.d_sae),
        )
        out.append(float(cos.median()) if len(cos) else math.nan)
    return out


def _spans(
    sae: Any, truth: Any, body: dict[str, Any], truth_dir: Path, centre: bool, cfg: ScoreConfig
) -> SpanScore:
    """Run the MLSAE on the truth's test cache and compare its layer distributions."""
    from mlsae.activations.cache import ActivationCache
    from mlsae.analysis.layers import analyze_source, sae_encoder

    cache = ActivationCache(truth_dir / "test")
    res, _ = analyze_source(
        cache,
        {"mlsae": (sae_encoder(sae), sae.cfg.d_sae)},
        list(range(truth.cfg.n_layers)),
        geometry=False,
    )
    _, m = span_match(sae.W_dec.cpu(), truth, centre)
    return span_score(res["mlsae"], truth, body["test"], m, cfg.span_share)


def write_score(out: Path, s: SynthScore) -> None:
    """The score as JSON (the per-layer feature -> latent maps left out)."""
    from mlsae.core.io import write_json

    d = asdict(s)
    for r in d["layers"]:
        r.pop("match", None)
    write_json(out, d)


def format_score(s: SynthScore) -> str:
    """A few lines for the terminal."""
    f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    lines = [
        f"{s.kind} SAE {s.run}: MCC {f(s.mcc)}, recovered (cos >= threshold) "
        f"{f(s.recovered)}, recovery {f(s.recovery)} (means over layers)"
    ]
    lines.append("MCC by layer: " + " ".join(f(r.mcc) for r in s.layers))
    if s.spans is not None:
        sp = s.spans
        lines.append(
            f"spans: {sp.n_matched} matched latents, Spearman E[L] "
            f"{f(sp.expected_layer_spearman)}, span {f(sp.span_spearman)}"
        )
        for k, (meas, true) in sp.measured_vs_true.items():
            lines.append(f"  {k:<40} measured {f(meas)}  true {f(true)}")
    for e in s.edges:
        lines.append(
            f"{e.kind:<12} true {e.n_true:>4} reported {e.n_reported:>5} recall "
            f"{f(e.recall)} precision {f(e.precision)}"
        )
    if s.match is not None:
        lines.append(
            f"SAE Match: accuracy on true pass-through pairs {f(s.match.accuracy)}, "
            "median matched decoder cosine "
            + " ".join(f(x) for x in s.match.median_matched_cos)
            + "; alive latents "
            + " ".join(f(x) for x in s.match.median_matched_cos_alive)
        )
    return "\n".join(lines)
