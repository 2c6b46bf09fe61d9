"""`mlsae <command>`: text -> tokens -> activations -> SAE -> training -> metrics -> analysis.

Each command is a thin shell over one stage module; stage modules are imported lazily so
`mlsae --help` is instant. Any MlsaeError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mlsae.config import DataConfig, ModelConfig, TrainConfig
from mlsae.errors import MlsaeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Multi-layer sparse autoencoders: cache activations, train, evaluate, analyse.",
    pretty_exceptions_enable=False,
)

_d, _m, _t = DataConfig(), ModelConfig(), TrainConfig()


@app.callback()
def _root() -> None:
    """Multi-layer sparse autoencoders: cache activations, train, evaluate, analyse."""


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
    from mlsae.cache import build_cache

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


def main() -> None:
    """Console entry point."""
    try:
        app()
    except MlsaeError as e:
        print(f"mlsae: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mlsae: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
