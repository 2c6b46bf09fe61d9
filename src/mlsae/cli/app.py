"""`mlsae <command>`: text -> tokens -> activations -> SAE -> training -> metrics -> analysis.

Each command is a thin shell over one stage module; stage modules are imported lazily so
`mlsae --help` is instant. Any MlsaeError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.explore import register as register_explore
from mlsae.cli.lens import lens_app
from mlsae.cli.options import (
    ColOpt,
    CtxOpt,
    DatasetOpt,
    HfSplitOpt,
    LayersOpt,
    ModelDtypeOpt,
    ModelOpt,
    SplitOpt,
    _d,
    _m,
    _t,
)
from mlsae.core.config import DataConfig, ModelConfig, TrainConfig
from mlsae.core.errors import Interrupted, MlsaeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Multi-layer sparse autoencoders: cache activations, train, evaluate, analyse.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Multi-layer sparse autoencoders: cache activations, train, evaluate, analyse."""


@app.command()
def cache(
    out: Annotated[Path, typer.Option(help="Output folder for shards + manifest.json")],
    model: ModelOpt = _m.model,
    dataset: DatasetOpt = _d.dataset,
    split: SplitOpt = _d.split,
    tokens: Annotated[int, typer.Option(help="Number of tokens to cache")] = 50_000,
    layers: LayersOpt = None,
    context_length: CtxOpt = _d.context_length,
    text_column: ColOpt = _d.text_column,
    hf_split: HfSplitOpt = _d.hf_split,
    dtype: ModelDtypeOpt = _m.dtype,
    storage_dtype: Annotated[str, typer.Option(help="bfloat16 or float32")] = "bfloat16",
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass")] = 8,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file")] = 4096,
    lens: Annotated[Path | None, typer.Option(help="Tuned lens folder (cache T_l(x))")] = None,
) -> None:
    """Capture residual-stream vectors of every chosen block into safetensors shards."""
    from mlsae.activations.extract import build_cache

    build_cache(
        out=out,
        model_cfg=ModelConfig(model=model, dtype=dtype),  # type: ignore[arg-type]
        data_cfg=DataConfig(
            dataset=dataset,
            split=split,  # type: ignore[arg-type]
            text_column=text_column,
            hf_split=hf_split,
            context_length=context_length,
        ),
        n_tokens=tokens,
        layers=layers,
        storage_dtype=storage_dtype,
        batch_size=batch_size,
        shard_tokens=shard_tokens,
        lens=lens,
    )


app.add_typer(lens_app, name="lens")
register_explore(app)


@app.command()
def analyze(
    run: Annotated[Path, typer.Argument(help="Training run folder (or an SAE folder)")],
    out: Annotated[Path, typer.Option(help="Output folder: analysis.json, figures, report.html")],
    cache: Annotated[
        Path | None, typer.Option(help="Activation cache to analyse (else one is built)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model for prompts / a new cache (default: the SAE's)")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset for a new cache (default: the SAE's)")
    ] = None,
    split: SplitOpt = "test",
    tokens: Annotated[int, typer.Option(help="Tokens for a new cache")] = 8192,
    context_length: CtxOpt = _d.context_length,
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
        run=run,
        out=out,
        cache=cache,
        model=model,
        dataset=dataset,
        split=split,
        tokens=tokens,
        context_length=context_length,
        prompts=prompt,
        compare=compare,
        evolution=evolution,
        lens=lens,
    )


@app.command()
def evaluate(
    runs: Annotated[
        list[Path],
        typer.Argument(help="RUN (run or SAE folder); with --cross: MLSAE_RUN SAE_RUN ..."),
    ],
    out: Annotated[Path, typer.Option(help="Output FILE.json (with --cross: a folder)")],
    cross: Annotated[
        bool, typer.Option("--cross", help="Cross-layer matrix: MLSAE vs single-layer SAEs")
    ] = False,
    cache: Annotated[
        Path | None, typer.Option(help="Held-out activation cache (else the model is run)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model (default: the SAE's/cache's)")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: the SAE's)")] = None,
    split: SplitOpt = "test",
    tokens: Annotated[
        int | None, typer.Option(help="Tokens to evaluate (default: whole cache, or 8192)")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Evaluate on these layers instead, e.g. '0-11' or '3'")
    ] = None,
    ce: Annotated[bool, typer.Option("--ce/--no-ce", help="Delta CE and KL by splicing")] = True,
    allow_train: Annotated[
        bool, typer.Option("--allow-train", help="Accept train-split tokens")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass")] = 4,
    context_length: CtxOpt = _d.context_length,
    text_column: ColOpt = _d.text_column,
    hf_split: HfSplitOpt = _d.hf_split,
    dtype: Annotated[
        str | None, typer.Option(help="Model weight dtype (default: the cache's, or float32)")
    ] = None,
    lens: Annotated[
        Path | None, typer.Option(help="A lens SAE's tuned-lens folder, if it has moved")
    ] = None,
) -> None:
    """Per-layer FVU, MSE, L0, delta CE, KL and dead fraction on held-out tokens.

    A tuned-lens SAE gets FVU in both spaces, and delta CE / KL through the exact inverse.
    """
    from mlsae.eval.cross import cross_command, format_cross
    from mlsae.eval.evaluate import evaluate_command, format_table, parse_layers

    kw = dict(
        cache=cache, model=model, dataset=dataset, split=split, tokens=tokens, ce=ce,
        allow_train=allow_train, batch_size=batch_size, context_length=context_length,
        text_column=text_column, hf_split=hf_split, model_dtype=dtype,
    )  # fmt: skip
    if cross:
        if lens is not None:
            raise MlsaeError("--lens applies to one RUN, not to --cross")
        if len(runs) < 2:
            raise MlsaeError("--cross needs MLSAE_RUN and at least one single-layer SAE_RUN")
        print(
            format_cross(cross_command(runs[0], runs[1:], out, layers=parse_layers(layers), **kw))
        )
    else:
        if len(runs) != 1:
            raise MlsaeError("evaluate takes one RUN (use --cross for several)")
        print(
            format_table(
                evaluate_command(runs[0], out, layers=parse_layers(layers), lens=lens, **kw)
            )
        )


@app.command()
def evolution(
    run: Annotated[Path, typer.Argument(help="Per-layer SAE run folder (`train --per-layer`)")],
    out: Annotated[Path, typer.Option(help="Output folder: evolution.json, graph.json/html, PNGs")],
    cache: Annotated[
        Path | None, typer.Option(help="Activation cache in stream order (else the model is run)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model (default: the SAEs')")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: the SAEs')")] = None,
    split: SplitOpt = "test",
    tokens: Annotated[
        int, typer.Option(help="Tokens to run the model on (without --cache)")
    ] = 8192,
    context_length: CtxOpt = _d.context_length,
    text_column: ColOpt = _d.text_column,
    hf_split: HfSplitOpt = _d.hf_split,
    dtype: ModelDtypeOpt = _m.dtype,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass")] = 4,
    top_m: Annotated[int, typer.Option(help="Edges: m best partners per feature (0: none)")] = 3,
    edge_threshold: Annotated[
        float | None, typer.Option(help="Edges: keep measure >= this (alone with --top-m 0)")
    ] = None,
    edge_measure: Annotated[
        str, typer.Option(help="pearson, jaccard, sufficiency, necessity or decoder_cos")
    ] = "pearson",
    link_threshold: Annotated[
        float, typer.Option(help="Appear/disappear: no partner with Pearson >= this")
    ] = 0.5,
    pass_through: Annotated[float, typer.Option(help="Passed through: Pearson >= this")] = 0.95,
    boolean_threshold: Annotated[
        float, typer.Option(help="AND/OR: necessity/sufficiency >= this")
    ] = 0.999,
    min_support: Annotated[
        int, typer.Option(help="AND/OR/specialise ignore features active on fewer tokens")
    ] = 10,
    contexts: Annotated[int, typer.Option(help="Top contexts kept per feature")] = 5,
    memory_gb: Annotated[
        float, typer.Option(help="Budget for pair co-moment matrices (12 B per feature pair)")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Community detection seed")] = 0,
    resolution: Annotated[
        float, typer.Option(help="Community resolution (1 = modularity; larger: smaller ones)")
    ] = 1.0,
    community: Annotated[
        str, typer.Option(help="auto (Leiden, else Louvain), leiden, louvain")
    ] = "auto",
    max_nodes: Annotated[
        int, typer.Option(help="Nodes drawn in graph.html (most connected)")
    ] = 1500,
) -> None:
    """Features across layers of per-layer SAEs: statistics, graph, communities, SAE Match."""
    from mlsae.evolution.measures import EvolutionConfig
    from mlsae.evolution.run import evolution_command, format_summary
    from mlsae.report.evolution import write_figures

    if cache is not None and model is not None:
        raise MlsaeError("give --cache or --model, not both")
    if community not in ("auto", "leiden", "louvain"):
        raise MlsaeError(f"unknown --community {community!r}: auto, leiden or louvain")
    cfg = EvolutionConfig(
        top_m=top_m or None, edge_threshold=edge_threshold, edge_measure=edge_measure,  # type: ignore[arg-type]
        link_threshold=link_threshold, pass_through=pass_through,
        boolean_threshold=boolean_threshold, min_support=min_support, contexts=contexts,
        memory_gb=memory_gb, seed=seed, resolution=resolution, max_nodes_html=max_nodes,
    )  # fmt: skip
    body = evolution_command(
        run=run, out=out, cache=cache, model=model, dataset=dataset, dtype=dtype,
        data_kw=dict(split=split, context_length=context_length, text_column=text_column,
                     hf_split=hf_split),
        n_tokens=tokens, batch_size=batch_size, cfg=cfg, community_method=community,
        figures=write_figures,
    )  # fmt: skip
    print(format_summary(body, out))


@app.command()
def train(
    out: Annotated[Path | None, typer.Option(help="New run folder")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run exactly from its last checkpoint")
    ] = None,
    cache: Annotated[Path | None, typer.Option(help="Activation cache (else one is built)")] = None,
    model: ModelOpt = _m.model,
    dataset: DatasetOpt = _d.dataset,
    tokens: Annotated[
        int, typer.Option(help="Tokens to cache into RUN/cache (no --cache)")
    ] = 50_000,
    context_length: CtxOpt = _d.context_length,
    layers: Annotated[
        str | None, typer.Option(help="Layers of the MLSAE: 'all' (default) or e.g. '0-11'")
    ] = None,
    single_layer: Annotated[
        int | None, typer.Option(help="Train a single-layer baseline on this layer")
    ] = None,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="One SAE per chosen layer (layer_XX/ folders)")
    ] = False,
    expansion_factor: Annotated[
        list[int] | None, typer.Option(help="R (repeat for a sweep grid) [default: 8]")
    ] = None,
    k: Annotated[
        list[int] | None,
        typer.Option("-k", "--k", help="TopK k (repeat for a sweep) [default: 32]"),
    ] = None,
    k_aux: Annotated[int | None, typer.Option(help="AuxK latents (default ~ d/2)")] = None,
    aux_coef: Annotated[float, typer.Option(help="AuxK weight alpha")] = _t.aux_coef,
    batch_tokens: Annotated[int, typer.Option(help="Vectors per step (per SAE)")] = _t.batch_tokens,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = _t.lr,
    seed: Annotated[int, typer.Option(help="Init and data-order seed")] = _t.seed,
    epochs: Annotated[int | None, typer.Option(help="Passes over the cache [default: 1]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps")] = None,
    dead_tokens: Annotated[
        int, typer.Option(help="Dead after this many tokens without firing")
    ] = _t.dead_tokens,
    checkpoint_every: Annotated[
        int, typer.Option(help="Steps between checkpoints")
    ] = _t.checkpoint_every,
    compute_dtype: Annotated[
        str, typer.Option(help="Encoder matmul dtype: auto, float32, bfloat16")
    ] = _t.compute_dtype,
    normalize: Annotated[str, typer.Option(help="standardize or none")] = "standardize",
    wandb: Annotated[bool, typer.Option("--wandb", help="Log to Weights & Biases")] = False,
    lens: Annotated[
        Path | None, typer.Option(help="Tuned lens folder: train on T_l(x) (SPEC 5)")
    ] = None,
) -> None:
    """Train the multi-layer SAE, a single-layer baseline, a sweep or a per-layer set."""
    from mlsae.core.io import read_json
    from mlsae.train.loop import format_fvu, train_command

    if (out is None) == (resume is None):
        raise MlsaeError("give exactly one of --out RUN (new run) or --resume RUN")
    cfg = TrainConfig(
        batch_tokens=batch_tokens, lr=lr, aux_coef=aux_coef, k_aux=k_aux, dead_tokens=dead_tokens,
        seed=seed, checkpoint_every=checkpoint_every, compute_dtype=compute_dtype,  # type: ignore[arg-type]
        wandb=wandb,
    )  # fmt: skip
    run = train_command(
        out=out, resume=resume, cache=cache, model=model, dataset=dataset, tokens=tokens,
        context_length=context_length, layers=layers, single_layer=single_layer,
        per_layer=per_layer, expansion_factors=expansion_factor, ks=k, normalize=normalize,
        cfg=cfg, max_steps=max_steps, epochs=epochs, lens=lens,
    )  # fmt: skip
    print(format_fvu(read_json(run / "final_fvu.json")))


@app.command()
def info(model: ModelOpt = _m.model, dtype: ModelDtypeOpt = _m.dtype) -> None:
    """Print a model's name, block count, width, special ids and this CPU's compute dtype."""
    from mlsae.data.model import model_info

    print(model_info(ModelConfig(model=model, dtype=dtype)))  # type: ignore[arg-type]


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="[mlsae] %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except Interrupted as e:
        print(f"mlsae: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except MlsaeError as e:
        print(f"mlsae: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mlsae: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
