"""`mlsae export` and `mlsae import`: SAEs to SAELens / a hub folder, and from sparsify, SAELens
or the paper's hub checkpoints (mlsae.interchange). Options derive from ExportConfig,
ImportConfig and the model / data / source configs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.options import config_command
from mlsae.core.config import DataConfig, ModelConfig, SourceConfig
from mlsae.core.stage_config import ExportConfig, ImportConfig

_ONLY_NAMES = {
    "split",
    "text_column",
    "hf_split",
    "context_length",
    "test_fraction",
    "dtype",
    "cache",
    "tokens",
    "batch_size",
}
"""Import records a model, a dataset and layers: the other data / model settings do not apply."""


def register(app: typer.Typer) -> None:
    """Add `export` and `import` to the mlsae app."""

    @config_command(app, "export")
    def export(
        run: Annotated[Path, typer.Argument(help="Training run folder or SAE folder")],
        out: Annotated[Path, typer.Option(help="Output folder")],
        cfg: ExportConfig,
    ) -> None:
        """Write an SAE for other tools: SAELens 6.x folders (one per block hook) or a hub folder
        (weights, SAELens folders, README model card with the eval table)."""
        if cfg.format == "saelens":
            from mlsae.interchange.saelens import export_saelens

            folders = export_saelens(
                run, out, hook_format=cfg.hook_format, approximate=cfg.approximate
            )
            print(f"wrote {len(folders)} SAELens folder(s) under {out}:")
            for f in folders:
                print(f"  {f}")
        elif cfg.format == "neuronpedia":
            from mlsae.explore.index import DB_NAME
            from mlsae.explore.npexport import index_to_neuronpedia
            from mlsae.interchange.neuronpedia import write_neuronpedia

            db = (run if run.is_dir() else run.parent) / DB_NAME
            ex = index_to_neuronpedia(db, cfg.np_model, cfg.np_set, cfg.np_creator, cfg.np_examples)
            folders = write_neuronpedia(ex, out)
            print(f"wrote {len(folders)} Neuronpedia source(s) of {ex.model_id} under {out}")
        else:
            from mlsae.interchange.hub import export_hub

            export_hub(
                run,
                out,
                repo_id=cfg.repo_id,
                eval_json=cfg.eval_json,
                approximate=cfg.approximate,
                hook_format=cfg.hook_format,
            )
            print(f"wrote {out}: upload with `huggingface-cli upload {cfg.repo_id} {out}`")

    @config_command(
        app,
        "import",
        exclude=_ONLY_NAMES,
        help_overrides={
            "model": "The model the SAE reads (when the source does not say)",
            "dataset": "Dataset to record in cfg.json (when the source does not say)",
            "layers": "Block indices it reads, e.g. '3' or '0-5' (when the source does not say)",
        },
    )
    def import_(
        src: Annotated[str, typer.Argument(help="Folder, or an org/name hub repo")],
        out: Annotated[Path, typer.Option(help="New mlsae SAE folder")],
        cfg: ImportConfig,
        model: ModelConfig,
        data: DataConfig,
        source: SourceConfig,
    ) -> None:
        """Convert a sparsify, SAELens or tim-lawson/mlsae checkpoint into an mlsae SAE folder."""
        from mlsae.core.layers import iter_layers_arg
        from mlsae.interchange.convert import import_command

        spec = source.layers
        spec = None if spec is None or spec.strip().lower() in ("", "all") else spec
        lay = iter_layers_arg(spec, 1 << 20) if spec is not None else None
        for p in import_command(
            src, cfg.format, out, model=model.model, layers=lay, dataset=data.dataset
        ):
            print(f"wrote {p}")
