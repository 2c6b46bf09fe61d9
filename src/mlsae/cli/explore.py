"""`mlsae index` and `mlsae explore`: the per-latent index and the local explorer web app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlsae.cli.options import CtxOpt, SplitOpt, _d
from mlsae.core.errors import MlsaeError


def index(
    run: Annotated[
        Path,
        typer.Argument(help="Run folder (MLSAE, single-layer, per-layer set, sweep) or SAE folder"),
    ],
    cache: Annotated[
        Path | None, typer.Option(help="Activation cache to index (else the model is run)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model (default: the cache's / the SAE's)")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset for a live run (default: the SAE's)")
    ] = None,
    split: SplitOpt = "test",
    tokens: Annotated[
        int | None, typer.Option(help="Tokens (default: the whole cache, or 8192 live)")
    ] = None,
    context_length: CtxOpt = _d.context_length,
    out: Annotated[
        Path | None, typer.Option(help="Database file (default: RUN/explore.sqlite)")
    ] = None,
    top_n: Annotated[int, typer.Option(help="Top examples kept per latent and layer")] = 32,
    window: Annotated[int, typer.Option(help="Context tokens either side of an example")] = 4,
    samples: Annotated[
        int, typer.Option(help="Activations sampled per latent for quantile examples")
    ] = 48,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass (live)")] = 4,
    dtype: Annotated[str, typer.Option(help="Model weight dtype: float32 or bfloat16")] = "float32",
) -> None:
    """Index every latent: frequencies, layer distribution, top and quantile examples,
    histogram, logit effects, decoder neighbours (one streaming pass; SQLite)."""
    from mlsae.explore.index import build_index

    if cache is not None and dataset is not None:
        raise MlsaeError("give --cache or --dataset, not both")
    r = build_index(
        run, out=out, cache=cache, model=model, dataset=dataset, split=split, tokens=tokens,
        context_length=None if cache is not None else context_length, dtype=dtype,
        batch_size=batch_size, top_n=top_n, window=window, samples=samples,
    )  # fmt: skip
    print(f"indexed {r['n_tokens']} tokens, SAEs {', '.join(r['saes'])}: {r['path']} "
          f"({r['bytes'] / 1e6:.1f} MB, {r['time_s']:.0f} s)")  # fmt: skip
    print(f"explore it: mlsae explore {run}")


def explore(
    run: Annotated[Path, typer.Argument(help="Run folder indexed by `mlsae index`")],
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 8765,
    host: Annotated[
        str, typer.Option(help="Address to bind (default: this machine only)")
    ] = "127.0.0.1",
    db: Annotated[
        Path | None, typer.Option(help="Index file (default: RUN/explore.sqlite)")
    ] = None,
    evolution: Annotated[
        Path | None,
        typer.Option(help="An `mlsae evolution` output folder (features across layers)"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model for the prompt page (default: the index's)")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens")] = 128,
) -> None:
    """Serve the explorer: latents, prompts (live model), search, features across layers."""
    import socket

    import uvicorn

    from mlsae.explore.server import create_app

    if not 1 <= max_tokens <= 1024:
        raise MlsaeError("--max-tokens must be between 1 and 1024")
    app = create_app(run, db=db, model=model, evolution=evolution, max_tokens=max_tokens)
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


def register(app: typer.Typer) -> None:
    """Add the two commands to the `mlsae` app."""
    app.command()(index)
    app.command()(explore)
