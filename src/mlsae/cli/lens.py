"""`mlsae lens ...`: train a tuned lens, compare it with the logit lens (mlsae.lens.train,
mlsae.lens.evaluate). The model runs on the data: there is no --cache here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.options import config_command
from mlsae.core.config import DataConfig, ModelConfig, SourceConfig
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import BootstrapConfig, LensTrainConfig

lens_app = typer.Typer(
    no_args_is_help=True, help="Tuned lens: train per-layer translators, compare to the logit lens."
)


@config_command(
    lens_app,
    "train",
    defaults={"tokens": 16384},
    exclude={"cache"},
    fixed={"split": "train", "device": "cpu"},
    help_overrides={"tokens": "Training-split tokens (all used by the regression)"},
)
def lens_train(
    out: Annotated[Path, typer.Option(help="Output lens folder (lens.safetensors + lens.json)")],
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    cfg: LensTrainConfig,
) -> None:
    """Train a tuned lens: minimise KL(final || lens) at every block but the last."""
    from mlsae.activations.open import open_live
    from mlsae.core.outputs import check_output
    from mlsae.lens.command import train_lens_command

    check_output(out, "lens")
    live = open_live(Inputs(source, data, model), default_tokens=16384)
    lens = train_lens_command(out, live, cfg)
    print(f"lens saved to {out} ({len(lens.trained_layers)} translators)")


@config_command(
    lens_app,
    "evaluate",
    defaults={"tokens": 2048},
    exclude={"cache", "layers"},
    fixed={"split": "test", "device": "cpu"},
    help_overrides={
        "model": "Model (default: the one named in the lens)",
        "tokens": "Test-split tokens to evaluate",
    },
)
def lens_evaluate(
    lens: Annotated[Path, typer.Argument(help="Lens folder (ours or tuned-lens params.pt)")],
    out: Annotated[Path, typer.Option(help="Output JSON file")],
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    boot: BootstrapConfig,
) -> None:
    """Per-layer KL and CE of the tuned lens vs the logit lens on held-out tokens."""
    from mlsae.activations.open import open_live
    from mlsae.core.errors import MlsaeError
    from mlsae.core.outputs import check_output
    from mlsae.lens.evaluate import evaluate_lens_command, format_table
    from mlsae.lens.tuned import load_lens

    check_output(out, "eval", file=True, inputs=[lens])
    tl = load_lens(lens)
    tl.meta["path"] = str(lens)
    if model.model is None and not tl.model_name:
        raise MlsaeError("the lens does not name its model: pass --model")
    live = open_live(
        Inputs(source, data, replace(model, model=model.model or tl.model_name)),
        default_tokens=2048,
        layers=[],
    )
    print(format_table(evaluate_lens_command(tl, out, live, source.batch_size, boot)))
