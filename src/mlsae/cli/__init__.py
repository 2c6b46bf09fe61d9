"""The `mlsae` command line: thin typer shells over the stages (the only place that prints and
exits). May import every other subpackage, lazily inside commands so `mlsae --help` stays fast."""

from mlsae.cli.app import app, main

__all__ = ["app", "main"]
