"""The explorer's HTTP helpers: bounded query parameters (a bad one is a 400 with one line),
the security headers, and what the server reveals: the hosts it answers (DNS rebinding) and
names instead of absolute paths."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from starlette.requests import Request

from mlsae.explore.live import BadRequest

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' "
    "'unsafe-inline'; connect-src 'self'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def int_arg(req: Request, name: str, lo: int, hi: int, default: int) -> int:
    """An integer query parameter in [lo, hi] (or the default when absent)."""
    v = opt_int_arg(req, name, lo, hi)
    return default if v is None else v


def opt_int_arg(req: Request, name: str, lo: int, hi: int) -> int | None:
    """An optional integer query parameter in [lo, hi] (None when absent)."""
    raw = req.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {raw[:40]!r}") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, not {v}")
    return v


def float_arg(req: Request, name: str, lo: float, hi: float, default: float) -> float:
    raw = req.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, not {raw[:40]!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise BadRequest(f"{name} must be between {lo:g} and {hi:g}, not {raw[:40]}")
    return v


def text_arg(req: Request, name: str, max_len: int) -> str:
    v = req.query_params.get(name, "")
    if len(v) > max_len:
        raise BadRequest(f"{name} is {len(v)} characters long; at most {max_len}")
    return v


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(host: str) -> list[str]:
    """The Host header values the server answers: the loopback names and the bound address
    (any, when bound to every interface: the user chose to expose it)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    bound = f"[{host}]" if ":" in host else host
    return sorted({*LOOPBACK, bound.lower()})


def names_not_paths(info: dict[str, Any]) -> dict[str, Any]:
    """/api/info without absolute paths (a page on another site must not learn the folder
    layout): the model, cache and SAE folders by their last names."""
    name = lambda v: Path(str(v)).name if isinstance(v, str) and ("/" in v or "\\" in v) else v  # noqa: E731
    out = dict(info)
    out["model"] = name(info.get("model"))
    src = info.get("source")
    out["source"] = {k: name(v) for k, v in src.items()} if isinstance(src, dict) else src
    out["saes"] = [{**s, "path": Path(str(s.get("path", ""))).name} for s in info.get("saes", [])]
    return out
