"""`mlsae lens ...`: train a tuned lens, compare it with the logit lens (lens_train.py,
lens_eval.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.options import (
    ColOpt,
    CtxOpt,
    DatasetOpt,
    HfSplitOpt,
    LayersOpt,
    ModelDtypeOpt,
    ModelOpt,
    _d,
    _m,
)
from mlsae.core.config import DataConfig, LensTrainConfig, ModelConfig

_l = LensTrainConfig  # its class attributes are the field defaults (lr stays None)

lens_app = typer.Typer(
    no_args_is_help=True, help="Tuned lens: train per-layer translators, compare to the logit lens."
)


@lens_app.command("train")
def lens_train(
    out: Annotated[Path, typer.Option(help="Output lens folder (lens.safetensors + lens.json)")],
    model: ModelOpt = _m.model,
    dataset: DatasetOpt = _d.dataset,
    tokens: Annotated[
        int, typer.Option(help="Training-split tokens (all used by the regression)")
    ] = 16384,
    layers: LayersOpt = None,
    context_length: CtxOpt = 128,
    init: Annotated[
        str, typer.Option(help="'regression' (least-squares warm start) or 'zero' (identity)")
    ] = _l.init,
    ridge: Annotated[
        float, typer.Option(help="Ridge of the regression (x Gram diagonal)")
    ] = _l.ridge,
    min_singular: Annotated[
        float | None,
        typer.Option(help="Floor on the singular values of I + A, e.g. 0.9 (default: none)"),
    ] = _l.min_singular,
    lr: Annotated[
        float | None, typer.Option(help="Adam lr of the KL steps (default 1e-3)")
    ] = _l.lr,
    steps: Annotated[
        int, typer.Option(help="Maximum KL optimizer steps (0: regression only)")
    ] = _l.steps,
    batch_size: Annotated[int, typer.Option(help="Contexts per KL step")] = _l.batch_size,
    holdout_contexts: Annotated[
        int, typer.Option(help="Training contexts held out for early stopping (0: none)")
    ] = _l.holdout_contexts,
    eval_every: Annotated[int, typer.Option(help="KL steps between held-out checks")] = (
        _l.eval_every
    ),
    patience: Annotated[
        int, typer.Option(help="Held-out checks without improvement before stopping")
    ] = _l.patience,
    seed: Annotated[int, typer.Option(help="Data order seed")] = _l.seed,
    text_column: ColOpt = _d.text_column,
    hf_split: HfSplitOpt = _d.hf_split,
    dtype: ModelDtypeOpt = _m.dtype,
) -> None:
    """Train a tuned lens: minimise KL(final || lens) at every block but the last."""
    from mlsae.lens.train import train_lens_command

    train_lens_command(
        out=out,
        model_cfg=ModelConfig(model=model, dtype=dtype),  # type: ignore[arg-type]
        data_cfg=DataConfig(
            dataset=dataset,
            split="train",
            text_column=text_column,
            hf_split=hf_split,
            context_length=context_length,
        ),
        n_tokens=tokens,
        layers=layers,
        cfg=LensTrainConfig(
            init=init,  # type: ignore[arg-type]
            ridge=ridge,
            min_singular=min_singular,
            lr=lr,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            holdout_contexts=holdout_contexts,
            eval_every=eval_every,
            patience=patience,
        ),
    )


@lens_app.command("evaluate")
def lens_evaluate(
    lens: Annotated[Path, typer.Argument(help="Lens folder (ours or tuned-lens params.pt)")],
    out: Annotated[Path, typer.Option(help="Output JSON file")],
    model: Annotated[
        str | None, typer.Option(help="Model (default: the one named in the lens)")
    ] = None,
    dataset: DatasetOpt = _d.dataset,
    tokens: Annotated[int, typer.Option(help="Test-split tokens to evaluate")] = 2048,
    context_length: CtxOpt = 128,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass")] = 2,
    text_column: ColOpt = _d.text_column,
    hf_split: HfSplitOpt = _d.hf_split,
    dtype: ModelDtypeOpt = _m.dtype,
) -> None:
    """Per-layer KL and CE of the tuned lens vs the logit lens on held-out tokens."""
    from mlsae.lens.evaluate import evaluate_lens_command, format_table

    result = evaluate_lens_command(
        lens_path=lens,
        out=out,
        model=model,
        dtype=dtype,
        data_cfg=DataConfig(
            dataset=dataset,
            split="test",
            text_column=text_column,
            hf_split=hf_split,
            context_length=context_length,
        ),
        n_tokens=tokens,
        batch_size=batch_size,
    )
    print(format_table(result))
