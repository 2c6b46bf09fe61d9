"""`mlsae synth generate|score`: synthetic multi-layer activations with known features, and
every measure scored against them (mlsae.synth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.options import config_command
from mlsae.synth.config import ScoreConfig, SynthConfig

synth_app = typer.Typer(
    no_args_is_help=True,
    help="Synthetic activations with known features (a normal cache + the truth), and scores.",
)


@config_command(synth_app, "generate")
def synth_generate(
    out: Annotated[Path, typer.Option(help="Output folder: train/ and test/ caches + the truth")],
    cfg: SynthConfig,
) -> None:
    """Write DIR/train and DIR/test (activation caches) and DIR/truth.{safetensors,json}."""
    from mlsae.synth.generate import generate

    body = generate(out, cfg)
    tr = body["train"]["layer_stats"]
    edges = {k: len(v) for k, v in body["edges"].items()}
    print(
        f"wrote {out}/train ({body['train']['n_tokens']} tokens), {out}/test "
        f"({body['test']['n_tokens']}), truth.json: {body['kinds']} features, true edges "
        f"{edges}; true rel_var_token {tr['rel_var_token']:.3f}, per-token multi-layer "
        f"fraction {tr['multi_layer_fraction_token']:.3f} ({body['time_s']:.1f} s)"
    )


@config_command(synth_app, "score")
def synth_score(
    run: Annotated[Path, typer.Argument(help="SAE or run folder (an MLSAE or a per-layer set)")],
    truth: Annotated[Path, typer.Option(help="A `mlsae synth generate` folder")],
    out: Annotated[Path, typer.Option(help="Output JSON file")],
    cfg: ScoreConfig,
    evolution: Annotated[
        Path | None, typer.Option(help="The per-layer run's `mlsae evolution` output folder")
    ] = None,
) -> None:
    """MCC and recovery per layer, spans and layer distributions (MLSAE), evolution's edges and
    SAE Match (per-layer set) against the truth."""
    from mlsae.core.outputs import check_output
    from mlsae.synth.command import format_score, score_command, write_score

    check_output(out, "eval", file=True, inputs=[run, truth, evolution])
    s = score_command(run, truth, evolution, cfg)
    write_score(out, s)
    print(format_score(s))
    print(f"wrote {out}")
