"""`mlsae index` and `mlsae explore`: the per-latent index and the local explorer web app.
Options derive from IndexConfig / ExploreConfig and the model / data / source configs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.options import config_command
from mlsae.core.config import DataConfig, ModelConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import ExploreConfig, IndexConfig


def register(app: typer.Typer) -> None:
    """Add the two commands to the `mlsae` app."""

    @config_command(app, "index", defaults={"split": "test"}, exclude={"layers"})
    def index(
        run: Annotated[
            Path,
            typer.Argument(
                help="Run folder (MLSAE, single-layer, per-layer set, sweep) or SAE folder"
            ),
        ],
        data: DataConfig,
        model: ModelConfig,
        source: SourceConfig,
        cfg: IndexConfig,
        out: Annotated[
            Path | None, typer.Option(help="Database file (default: RUN/explore.sqlite)")
        ] = None,
    ) -> None:
        """Index every latent: frequencies, layer distribution, top and quantile examples,
        histogram, logit effects, decoder neighbours (one streaming pass; SQLite)."""
        from mlsae.explore.index import build_index

        r = build_index(run, out=out, inputs=Inputs(source, data, model), cfg=cfg)
        print(
            f"indexed {r.n_tokens} tokens, SAEs {', '.join(r.saes)}: {r.path} "
            f"({r.bytes / 1e6:.1f} MB, {r.time_s:.0f} s)"
        )
        print(f"explore it: mlsae explore {run}")

    @config_command(
        app,
        "explore",
        exclude={"split", "text_column", "hf_split", "context_length", "test_fraction"},
        help_overrides={
            "model": "Model for the prompt page (default: the index's)",
            "dataset": "Unused: the prompt page runs the model on your text",
        },
    )
    def explore(
        run: Annotated[Path, typer.Argument(help="Run folder indexed by `mlsae index`")],
        cfg: ExploreConfig,
        model: ModelConfig,
        db: Annotated[
            Path | None, typer.Option(help="Index file (default: RUN/explore.sqlite)")
        ] = None,
        evolution: Annotated[
            Path | None,
            typer.Option(help="An `mlsae evolution` output folder (features across layers)"),
        ] = None,
    ) -> None:
        """Serve the explorer: latents, prompts (live model), search, features across layers."""
        serve(run, cfg, model, db, evolution)


def serve(
    run: Path, cfg: ExploreConfig, model: ModelConfig, db: Path | None, evolution: Path | None
) -> None:
    """Bind, print the URL, serve until Ctrl-C."""
    import uvicorn

    from mlsae.explore.server import create_app

    host, port = cfg.host, cfg.port
    app = create_app(
        run,
        db=db,
        model=model.model,
        evolution=evolution,
        max_tokens=cfg.max_tokens,
        dtype=model.dtype,
        host=host,
        dense=cfg.dense,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise MlsaeError(
            f"cannot listen on {host}:{port} ({e.strerror}): try another --port"
        ) from None
    real = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {host}: anyone who can reach this address can use the explorer"
        )
    print(f"mlsae explore: http://{shown}:{real}/  (Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
