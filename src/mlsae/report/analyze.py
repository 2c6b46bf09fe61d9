"""`mlsae analyze` = the analysis stage (`mlsae.analysis.analyze`: analysis.json,
latents.npz) followed by what a reader opens: the PNG figures and DIR/report.html, one
self-contained file (images as base64 data URIs, no external links or scripts), optionally with
the section of an `mlsae evolution` output."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mlsae.analysis.analyze import AnalysisResult, analyze
from mlsae.core.inputs import Inputs
from mlsae.core.io import write_json
from mlsae.core.outputs import check_output
from mlsae.core.stage_config import AnalysisConfig, BootstrapConfig
from mlsae.report.figures import make_figures
from mlsae.report.html import write_report

log = logging.getLogger(__name__)


def write_analysis_report(out: Path, res: AnalysisResult, evolution: Path | None = None) -> Path:
    """Figures and report.html of an analysis in `out` (analysis.json gains the figure names)."""
    out = Path(out)
    extra: list[str] = []
    if evolution is not None:
        from mlsae.report.evolution import evolution_section_html

        href = os.path.relpath(Path(evolution).resolve() / "graph.html", out.resolve())
        extra.append(evolution_section_html(Path(evolution), graph_href=href))
    figs = make_figures(out, res.stats, res.geometry, res.prompts, res.compare)
    res.summary.figures = [p.name for _, p in figs]
    write_json(out / "analysis.json", res.summary.to_json())
    path = write_report(out / "report.html", res.summary, figs, res.configs, res.eval, extra)
    log.info(f"wrote {out / 'analysis.json'} and {path}")
    return path


def analyze_command(
    run: Path,
    out: Path,
    *,
    inputs: Inputs | None = None,
    prompts: list[str] | None = None,
    compare: list[Path] | None = None,
    evolution: Path | None = None,
    lens: Path | None = None,
    cfg: AnalysisConfig | None = None,
    boot: BootstrapConfig | None = None,
) -> AnalysisResult:
    """The whole `mlsae analyze`; returns what it computed (`.summary`: analysis.json)."""
    inputs = inputs or Inputs.held_out()
    check_output(
        out, "analysis", inputs=[run, *(compare or []), evolution, lens, inputs.source.cache]
    )
    if evolution is not None:  # an unreadable evolution folder fails before the work
        from mlsae.report.evolution import evolution_section_html

        evolution_section_html(Path(evolution))
    res = analyze(
        run,
        out,
        inputs=inputs,
        prompts=prompts,
        compare=compare,
        lens=lens,
        settings=cfg,
        boot=boot,
    )
    write_analysis_report(out, res, evolution)
    return res
