"""Typer option types shared by the `mlsae` commands (one help text per concept)."""

from __future__ import annotations

from typing import Annotated

import typer

from mlsae.core.config import DataConfig, ModelConfig, TrainConfig

_d, _m, _t = DataConfig(), ModelConfig(), TrainConfig()

ModelOpt = Annotated[
    str, typer.Option(help="'default' (embedded SmolLM2-135M), HF id/dir, or .gguf")
]
DatasetOpt = Annotated[
    str, typer.Option(help="'default' (embedded corpus), HF dataset, or .txt/.jsonl/.parquet files")
]
SplitOpt = Annotated[str, typer.Option(help="train or test (document-level, disjoint)")]
LayersOpt = Annotated[str | None, typer.Option(help="'all' or e.g. '0,5,10' or '0-11'")]
CtxOpt = Annotated[int, typer.Option(help="Tokens per context")]
ColOpt = Annotated[str, typer.Option(help="Text column (HF/JSONL/parquet)")]
HfSplitOpt = Annotated[str, typer.Option(help="HF dataset split to stream")]
ModelDtypeOpt = Annotated[str, typer.Option(help="Model weight dtype: float32 or bfloat16")]
