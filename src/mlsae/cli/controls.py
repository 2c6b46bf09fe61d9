"""`mlsae controls measures|causal`: controls for the cross-layer measures of `mlsae evolution`
(seed ceiling, permuted-token and non-adjacent nulls; the causal check), mlsae.evolution."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.options import config_command
from mlsae.core.config import DataConfig, ModelConfig, SourceConfig
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import ControlsConfig, EvolutionConfig

controls_app = typer.Typer(
    no_args_is_help=True,
    help="Controls of the cross-layer measures: seed ceiling, nulls, causal check.",
)
NOT_MEASURES = {
    "layers",
    "top_m",
    "edge_threshold",
    "edge_measure",
    "max_edges_per_pair",
    "boolean_threshold",
    "specialise_necessity",
    "specialise_sufficiency",
    "contexts",
    "memory_gb",
    "seed",
    "resolution",
    "community",
    "max_nodes_html",
}
Run = Annotated[Path, typer.Argument(help="Per-layer SAE run folder (`train --per-layer`)")]
Out = Annotated[Path, typer.Option(help="Output JSON file")]


@config_command(
    controls_app,
    "measures",
    defaults={"split": "test"},
    exclude=NOT_MEASURES | {"causal_contexts", "causal_features", "drop"},
    fixed={"device": "cpu"},
)
def controls_measures(
    run: Run,
    out: Out,
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    cfg: EvolutionConfig,
    ctl: ControlsConfig,
    seed_run: Annotated[
        Path | None,
        typer.Option(help="SAEs of the same blocks trained with another seed (the ceiling)"),
    ] = None,
) -> None:
    """The evolution measures of (l, l+1) beside a seed ceiling (l, l), token-permuted nulls
    and non-adjacent blocks (l, l+gap), with bootstrap intervals over contexts."""
    from mlsae.evolution.control_run import measures_command
    from mlsae.evolution.controls import format_rows

    rows, ran = measures_command(run, out, seed_run, Inputs(source, data, model), cfg, ctl)
    print(format_rows(rows, cfg))
    t = ran.time_s
    print(
        f"wrote {out} ({ran.n_used_tokens} tokens, {ran.n_contexts} contexts; "
        f"encode {t['encode']:.0f} s, measures {t['measures']:.0f} s)"
    )


@config_command(
    controls_app,
    "causal",
    defaults={"split": "test"},
    exclude=NOT_MEASURES | {"gaps"},
    fixed={"device": "cpu"},
)
def controls_causal(
    run: Run,
    out: Out,
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    cfg: EvolutionConfig,
    ctl: ControlsConfig,
) -> None:
    """Remove an up feature from block l's output, run block l+1, re-encode: how often the
    down feature's activation drops by >= --drop, for its Pearson, decoder-cosine and random
    predecessors."""
    from mlsae.evolution.causal import format_causal
    from mlsae.evolution.control_run import causal_command

    results, ran = causal_command(run, out, Inputs(source, data, model), cfg, ctl)
    print(format_causal(results, ctl.drop))
    print(f"wrote {out} ({ran.n_contexts} contexts, {ran.time_s['total']:.0f} s)")
