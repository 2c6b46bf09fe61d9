"""The CLI's one error boundary: every way a command can fail ends in one line on stderr.

- MlsaeError (bad input, broken files): `mlsae: error: <message>`, exit 2.
- Command-line usage (unknown option, bad value): `mlsae: error: <what> (see mlsae CMD --help)`,
  exit 2, instead of click's multi-line box.
- OSError (full disk, read-only folder, missing file): the path, what happened and what to do.
- Out of memory (MemoryError, torch's allocation failure): the allocation and what to lower.
- A file that is not UTF-8 text.
- SIGINT / SIGTERM: `mlsae: stopped by signal N: ...` (what was saved, how to resume), exit
  128 + N. Training checkpoints on the signal; `mlsae cache` keeps its finished shards.
Anything else is a bug and keeps its traceback. A process of a `--nproc` job writes its line to
the launcher's folder instead (`mlsae.cli.launch`), which prints the job's one line.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlsae.cli.launch import LAUNCH_DIR_ENV
from mlsae.core.errors import Interrupted, MlsaeError, is_out_of_memory, os_error_message


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum, f"stopped by signal {signum}")


def _is(e: BaseException, name: str) -> bool:
    """Whether `e` is a click exception of that class: typer >= 0.22 raises those of its own
    vendored copy of click, older typer click's own."""
    return any(c.__name__ == name for c in type(e).__mro__) and hasattr(e, "format_message")


def _message(e: BaseException) -> str:
    fmt = getattr(e, "format_message", None)
    return str(fmt()) if callable(fmt) else str(e)


def error_line(e: BaseException) -> str | None:
    """The one line describing an expected failure, or None for a bug."""
    if isinstance(e, MlsaeError):
        return str(e)
    if _is(e, "UsageError"):
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "mlsae"
        msg = " ".join(_message(e).split())
        return f"{msg} (see `{cmd} --help`)"
    if _is(e, "ClickException"):
        return " ".join(_message(e).split())
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
    if is_out_of_memory(e):
        text = str(e).split("DefaultCPUAllocator: ")[-1].split(". Error code")[0]
        return (
            f"out of memory ({text or type(e).__name__}): lower --batch-tokens, "
            "--expansion-factor or --tokens, or free memory"
        )
    if isinstance(e, OSError):
        return os_error_message(e)
    return None


def one_line(text: str) -> str:
    """`text` on one line: a newline inside a path or value is shown as \\n (it cannot forge a
    second `mlsae: error:` line)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def say(line: str) -> None:
    """Print `mlsae: LINE` on stderr; in a process of a `--nproc` job, write LINE to the
    launcher's folder (`rank<R>`), which tells the job's failure in one line."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if folder:
        try:
            path = Path(folder) / f"rank{int(os.environ.get('RANK', '0'))}"
            path.write_text(line + "\n", encoding="utf-8")
            return
        except (OSError, ValueError):
            pass  # the launcher is gone: print it
    print(f"mlsae: {line}", file=sys.stderr)


def run_app(app: Any, args: Sequence[str] | None = None, prog_name: str = "mlsae") -> int:
    """Run the typer app; returns the exit code after printing at most one error line."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, _raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        old = {}
    try:
        rv = app(args=args, prog_name=prog_name, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except Interrupted as e:
        say(one_line(str(e)))
        return e.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:
        if _is(e, "NoArgsIsHelpError"):  # `mlsae` alone: the help
            print(_message(e), file=sys.stderr)
            return 2
        if type(e).__name__ == "Abort":
            say("interrupted")
            return 130
        line = error_line(e)
        if line is None:
            raise
        say(f"error: {one_line(line)}")
        return 2
    finally:
        for s, h in old.items():
            signal.signal(s, h)
