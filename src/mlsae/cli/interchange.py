"""`mlsae export` and `mlsae import`: SAEs to SAELens / a hub folder, and from sparsify, SAELens
or the paper's hub checkpoints (mlsae.interchange)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlsae.core.errors import MlsaeError

FormatOut = Annotated[str, typer.Option("--format", help="saelens or hub")]
FormatIn = Annotated[
    str, typer.Option("--format", help="sparsify, saelens, mlsae-hub (the paper's) or auto")
]


def export(
    run: Annotated[Path, typer.Argument(help="Training run folder or SAE folder")],
    out: Annotated[Path, typer.Option(help="Output folder")],
    fmt: FormatOut = "saelens",
    approximate: Annotated[
        bool,
        typer.Option(
            "--approximate",
            help="Export a normalize='standardize' SAE with SAELens's layer_norm mode, whose "
            "decode maps back with std instead of std + 1e-5 (encode is exact)",
        ),
    ] = False,
    hook_format: Annotated[
        str | None,
        typer.Option(help="Hook name pattern, e.g. 'model.layers.{layer}' (default: the model's)"),
    ] = None,
    repo_id: Annotated[
        str, typer.Option(help="hub: the repo id the model card names")
    ] = "ORG/NAME",
    eval_json: Annotated[
        Path | None, typer.Option("--eval", help="hub: an `mlsae evaluate` JSON (default: RUN's)")
    ] = None,
) -> None:
    """Write an SAE for other tools: SAELens 6.x folders (one per block hook) or a hub folder
    (weights, SAELens folders, README model card with the eval table)."""
    if fmt == "saelens":
        from mlsae.interchange.saelens import export_saelens

        folders = export_saelens(run, out, hook_format=hook_format, approximate=approximate)
        print(f"wrote {len(folders)} SAELens folder(s) under {out}:")
        for f in folders:
            print(f"  {f}")
    elif fmt == "hub":
        from mlsae.interchange.hub import export_hub

        export_hub(run, out, repo_id=repo_id, eval_json=eval_json, approximate=approximate,
                   hook_format=hook_format)  # fmt: skip
        print(f"wrote {out}: upload with `huggingface-cli upload {repo_id} {out}`")
    else:
        raise MlsaeError(f"unknown --format {fmt!r}: saelens or hub")


def import_(
    src: Annotated[str, typer.Argument(help="Folder, or an org/name hub repo")],
    out: Annotated[Path, typer.Option(help="New mlsae SAE folder")],
    fmt: FormatIn = "auto",
    model: Annotated[
        str | None, typer.Option(help="The model the SAE reads (when the source does not say)")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Block indices it reads, e.g. '3' or '0-5' (when unsaid)")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset to record in cfg.json")] = None,
) -> None:
    """Convert a sparsify, SAELens or tim-lawson/mlsae checkpoint into an mlsae SAE folder."""
    from mlsae.data.capture import iter_layers_arg
    from mlsae.interchange.convert import import_command

    spec = None if layers is None or layers.strip().lower() in ("", "all") else layers
    lay = iter_layers_arg(spec, 1 << 20) if spec is not None else None
    for p in import_command(src, fmt, out, model=model, layers=lay, dataset=dataset):
        print(f"wrote {p}")


def register(app: typer.Typer) -> None:
    """Add `export` and `import` to the mlsae app."""
    app.command("export")(export)
    app.command("import")(import_)
