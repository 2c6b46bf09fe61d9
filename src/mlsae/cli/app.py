"""`mlsae <command>`: text -> tokens -> activations -> SAE -> training -> metrics -> analysis.

Each command is a thin shell over one stage; its options are the fields of the configuration
dataclasses it takes (`mlsae.cli.options.config_command`), so every command that reads data has
the same data, model and source options with the same defaults. Stage modules are imported
lazily so `mlsae --help` is instant. The CLI alone prints results and decides exit codes: any
MlsaeError, usage error, OS error or out-of-memory becomes one `mlsae: error: ...` line and exit
2 (`mlsae.cli.errors`); every command checks its output location before any work.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.controls import controls_app
from mlsae.cli.explore import register as register_explore
from mlsae.cli.interchange import register as register_interchange
from mlsae.cli.launch import Nproc, relaunch
from mlsae.cli.lens import lens_app
from mlsae.cli.options import Given, config_command
from mlsae.cli.synth import synth_app
from mlsae.core.config import (
    DataConfig,
    ExtractConfig,
    ModelConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import AnalysisConfig, BootstrapConfig, EvalConfig, EvolutionConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Multi-layer sparse autoencoders: cache activations, train, evaluate, analyse.",
    pretty_exceptions_enable=False,
)
app.add_typer(lens_app, name="lens")
app.add_typer(synth_app, name="synth")
app.add_typer(controls_app, name="controls")
register_interchange(app)  # mlsae export / mlsae import
register_explore(app)  # mlsae index / mlsae explore

Out = Annotated[Path, typer.Option(help="Output folder")]
TEST = {"split": "test"}
STREAM_HELP = {
    "shard_tokens": "Tokens per block of the live stream (no --cache): the shuffle buffer's "
    "unit; the same as a cache made with this --shard-tokens gives the same batches",
    "storage_dtype": "Dtype the live stream's vectors are rounded to and buffered in (as a "
    "cache stores them)",
}


@config_command(app, defaults={"tokens": 50_000}, exclude={"cache"})
def cache(
    out: Annotated[Path, typer.Option(help="Output folder for shards + manifest.json")],
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    extract: ExtractConfig,
    lens: Annotated[
        Path | None, typer.Option(help="Tuned lens folder: store T_l(x) (SPEC 5)")
    ] = None,
    nproc: Nproc = 1,
) -> None:
    """Capture residual-stream vectors of every chosen block into safetensors shards."""
    from mlsae.activations.extract import build_cache
    from mlsae.core.dist import is_main_process

    relaunch(nproc)
    built = build_cache(out, Inputs(source, data, model), extract, lens)
    if is_main_process():
        man = built.manifest
        print(f"{out}: {man.n_tokens} tokens of layers {man.layers[0]}..{man.layers[-1]}")
        if built.norm_outliers is not None:
            print(built.norm_outliers.describe())


@config_command(app, defaults={"tokens": 50_000}, aliases={"k": ["-k"]}, help_overrides=STREAM_HELP)
def train(
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    sae: SaeGridConfig,
    train: TrainConfig,
    stream: ExtractConfig,
    given: Given,
    out: Annotated[Path | None, typer.Option(help="New run folder")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run exactly from its last checkpoint")
    ] = None,
    nproc: Nproc = 1,
) -> None:
    """Train the multi-layer SAE, a single-layer baseline, a sweep or a per-layer set.

    Without --cache, the model runs on --tokens training tokens as training goes (the live
    stream, through the same shuffle buffer as a cache: nothing is written outside the run)."""
    from mlsae.core.dist import is_main_process
    from mlsae.train.loop import format_fvu, read_final_fvu, train_command

    if (out is None) == (resume is None):
        raise MlsaeError("give exactly one of --out RUN (new run) or --resume RUN")
    relaunch(nproc)
    if resume is not None:
        others = {k for part in ("data", "model", "source", "sae", "stream") for k in given[part]}
        others -= {"device"}
        if others:
            opts = ", ".join("--" + k.replace("_", "-") for k in sorted(others))
            raise MlsaeError(
                f"{opts}: a resumed run keeps its settings (only --max-steps, "
                "--epochs and --device may change)"
            )
        given_train = {k: getattr(train, k) for k in given["train"]}
        device = model.device if "device" in given["model"] else None
        run = train_command(resume, resume=True, train_given=given_train, device=device)
    else:
        assert out is not None
        from mlsae.api.pipeline import train as train_run  # the Python API's call

        run = train_run(
            out, train, data=data, model=model, source=source, sae=sae, stream=stream
        ).path
    if is_main_process():
        print(format_fvu(read_final_fvu(run / "final_fvu.json")))


@config_command(
    app,
    defaults=TEST,
    help_overrides={
        "layers": "Evaluate on these blocks instead of the SAE's own, e.g. '0-11' or '3'"
    },
)
def evaluate(
    runs: Annotated[
        list[Path],
        typer.Argument(help="RUN (run or SAE folder); with --cross: MLSAE_RUN SAE_RUN ..."),
    ],
    out: Annotated[Path, typer.Option(help="Output FILE.json (with --cross: a folder)")],
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    ev: EvalConfig,
    boot: BootstrapConfig,
    cross: Annotated[
        bool, typer.Option("--cross", help="Cross-layer matrix: MLSAE vs single-layer SAEs")
    ] = False,
    lens: Annotated[
        Path | None, typer.Option(help="A lens SAE's tuned-lens folder, if it has moved")
    ] = None,
) -> None:
    """Per-layer FVU, MSE, L0, delta CE, KL and dead fraction on held-out tokens.

    A tuned-lens SAE gets FVU in both spaces, and delta CE / KL through the exact inverse."""
    from mlsae.eval.cross import cross_command, format_cross
    from mlsae.eval.evaluate import format_table
    from mlsae.eval.several import evaluate_run, format_extras

    if cross:
        from mlsae.report.figures import cross_figures

        if lens is not None:
            raise MlsaeError("--lens applies to one RUN, not to --cross")
        if len(runs) < 2:
            raise MlsaeError("--cross needs MLSAE_RUN and at least one single-layer SAE_RUN")
        result = cross_command(
            runs[0], runs[1:], out, inputs=Inputs(source, data, model), ev=ev, boot=boot
        )
        cross_figures(result, out)
        print(format_cross(result))
    else:
        if len(runs) != 1:
            raise MlsaeError("evaluate takes one RUN (use --cross for several)")
        res = evaluate_run(
            runs[0], out, inputs=Inputs(source, data, model), ev=ev, lens=lens, boot=boot
        )
        print(format_table(res))
        if extras := format_extras(res):
            print(extras)


@config_command(app, defaults=TEST, exclude={"layers"})
def analyze(
    run: Annotated[Path, typer.Argument(help="Training run folder (or an SAE folder)")],
    out: Annotated[Path, typer.Option(help="Output folder: analysis.json, figures, report.html")],
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    cfg: AnalysisConfig,
    boot: BootstrapConfig,
    prompt: Annotated[
        list[str] | None, typer.Option(help="Prompt for a per-prompt heatmap (repeatable)")
    ] = None,
    compare: Annotated[
        list[Path] | None,
        typer.Option(help="Another SAE run to compare (repeatable): single-layer, lens, ..."),
    ] = None,
    lens: Annotated[
        Path | None, typer.Option(help="The SAE's tuned-lens folder, if it has moved")
    ] = None,
    evolution: Annotated[
        Path | None, typer.Option(help="An `mlsae evolution` output folder to add to the report")
    ] = None,
) -> None:
    """Where latents live across layers (SPEC 4), residual geometry, and report.html."""
    from mlsae.report.analyze import analyze_command

    analyze_command(
        run,
        out,
        inputs=Inputs(source, data, model),
        prompts=prompt,
        compare=compare,
        evolution=evolution,
        lens=lens,
        cfg=cfg,
        boot=boot,
    )
    print(f"report: {out / 'report.html'}")


@config_command(app, defaults=TEST, exclude={"layers"})
def evolution(
    run: Annotated[Path, typer.Argument(help="Per-layer SAE run folder (`train --per-layer`)")],
    out: Annotated[Path, typer.Option(help="Output folder: evolution.json, graph.json/html, PNGs")],
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    cfg: EvolutionConfig,
    boot: BootstrapConfig,
) -> None:
    """Features across layers of per-layer SAEs: statistics, graph, communities, SAE Match."""
    from mlsae.evolution.run import evolution_command
    from mlsae.evolution.table import format_summary
    from mlsae.report.evolution import write_figures

    body = evolution_command(
        run, out, inputs=Inputs(source, data, model), cfg=cfg, boot=boot, figures=write_figures
    )
    print(format_summary(body, out))


@config_command(app)
def info(model: ModelConfig) -> None:
    """Print a model's name, block count, width, special ids and this CPU's compute dtype."""
    from mlsae.data.info import model_info

    print(model_info(model))


def main() -> None:
    """Console entry point."""
    rank = os.environ.get("RANK", "0")  # torchrun: the other processes log warnings only
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format="[mlsae] %(message)s" if rank == "0" else f"[mlsae rank {rank}] %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mlsae.cli.errors import run_app

    sys.exit(run_app(app))


if __name__ == "__main__":
    main()
