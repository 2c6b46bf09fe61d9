"""What `mlsae explore` checks of an explorer index before it serves it: every table and column
the server reads, the meta values' types and ranges (`IndexMeta`), the SAE rows (`SaeRow`), the
token stream and vocabulary, the sizes of the example blobs and the latents' JSON, so a damaged
or hand-edited `explore.sqlite` is one `MlsaeError` at startup, not a traceback or a 500.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlsae.core.errors import MlsaeError
from mlsae.core.schema import from_dict

FORMAT = "mlsae-explore-index-1"
"""The index format `mlsae index` writes and `mlsae explore` reads."""

COLUMNS = {
    "meta": ["key", "value"],
    "saes": ["sae", "label", "path", "layers", "d_sae", "k", "lens", "n_tokens"],
    "latents": [
        "sae",
        "latent",
        "n_active",
        "freq",
        "max_act",
        "mean_act",
        "mean_layer",
        "var_layer",
        "info",
        "text",
    ],
    "examples": ["sae", "latent", "kind", "layer", "pos", "act", "win", "lay", "band"],
    "token_latents": ["sae", "token", "latent", "n", "max_act"],
    "vocab": ["id", "text"],
    "stream": ["start", "ids"],
}
"""The tables the explorer reads and their columns, in order."""


@dataclass
class IndexMeta:
    """The meta table of an index (JSON values), as `mlsae index` writes it."""

    format: str
    run: str
    model: str | None  # None: indexed without a language model (synthetic activations)
    context_length: int
    n_stream_tokens: int
    top_n: int
    window: int
    hist_edges: list[float]
    source: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    sae_sha256: dict[str, Any] | None = (
        None  # label -> sha256 of sae.safetensors (indexes since 29)
    )

    def __post_init__(self) -> None:
        if self.context_length < 1 or self.n_stream_tokens < 1:
            raise MlsaeError("context_length and n_stream_tokens must be positive")
        if not 0 <= self.window <= 4096 or not 0 <= self.top_n <= 10**6:
            raise MlsaeError(f"window {self.window} / top_n {self.top_n} out of range")
        e = self.hist_edges
        if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:], strict=False)):
            raise MlsaeError("hist_edges must be at least two increasing numbers")


@dataclass
class SaeRow:
    """One row of the saes table."""

    sae: int
    label: str
    path: str
    layers: list[int]
    d_sae: int
    k: int
    lens: str | None
    n_tokens: int

    def __post_init__(self) -> None:
        if not self.layers or any(x < 0 for x in self.layers):
            raise MlsaeError(f"layers {self.layers} must be block indices")
        if len(set(self.layers)) != len(self.layers):
            raise MlsaeError(f"layers {self.layers} repeat a block")
        if self.d_sae < 1 or not 1 <= self.k <= self.d_sae or self.n_tokens < 0:
            raise MlsaeError(f"d_sae {self.d_sae}, k {self.k} or n_tokens out of range")


def _damaged(path: Path, what: str) -> MlsaeError:
    return MlsaeError(f"{path}: a damaged explorer index ({what}): run `mlsae index` again")


def check_tables(con: sqlite3.Connection, path: Path) -> None:
    """Every table the server reads, with its columns in order."""
    for table, cols in COLUMNS.items():
        got = [r[1] for r in con.execute(f"PRAGMA table_info({table})").fetchall()]
        if got != cols:
            raise _damaged(path, f"table {table} has columns {got}, expected {cols}")


def read_meta(con: sqlite3.Connection, path: Path) -> tuple[dict[str, Any], IndexMeta]:
    """The meta table as a dict of JSON values and as a checked IndexMeta."""
    meta = {}
    for k, v in con.execute("SELECT key, value FROM meta").fetchall():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _damaged(path, f"meta row {k!r} is not text")
        try:
            meta[k] = json.loads(v)
        except ValueError:
            raise _damaged(path, f"meta value {k!r} is not JSON") from None
    if meta.get("format") != FORMAT:
        raise MlsaeError(f"{path}: unknown index format {meta.get('format')!r}")
    return meta, from_dict(IndexMeta, meta, f"{path}: meta")


def read_saes(con: sqlite3.Connection, path: Path, n_layers_max: int = 1 << 16) -> list[SaeRow]:
    """The saes table, each row checked, numbered 0..n-1."""
    rows = []
    for r in con.execute("SELECT * FROM saes ORDER BY sae").fetchall():
        d = dict(zip(COLUMNS["saes"], r, strict=True))
        try:
            d["layers"] = json.loads(d["layers"]) if isinstance(d["layers"], str) else None
        except ValueError:
            d["layers"] = None
        rows.append(from_dict(SaeRow, d, f"{path}: saes row {r[0]!r}"))
    if not rows or [s.sae for s in rows] != list(range(len(rows))):
        raise _damaged(path, "the saes table must number its SAEs 0, 1, ...")
    if any(max(s.layers) >= n_layers_max for s in rows):
        raise _damaged(path, "an SAE's layer is out of range")
    return rows


def read_vocab(con: sqlite3.Connection, path: Path) -> list[str]:
    rows = con.execute("SELECT id, text FROM vocab ORDER BY id").fetchall()
    if [r[0] for r in rows] != list(range(len(rows))) or not all(
        isinstance(t, str) for _, t in rows
    ):
        raise _damaged(path, "the vocab table must hold text for ids 0, 1, ...")
    return [t for _, t in rows]


def read_stream(con: sqlite3.Connection, path: Path, meta: IndexMeta, n_vocab: int) -> np.ndarray:
    """The token stream: int32 ids, contiguous rows, as long as the meta says, ids in the
    vocabulary."""
    parts, at = [], 0
    for start, blob in con.execute("SELECT start, ids FROM stream ORDER BY start").fetchall():
        if start != at or not isinstance(blob, bytes) or len(blob) % 4:
            raise _damaged(path, f"stream row at {start!r} is not contiguous int32 ids")
        parts.append(np.frombuffer(blob, np.int32))
        at += len(parts[-1])
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if len(ids) != meta.n_stream_tokens:
        raise _damaged(path, f"{len(ids)} stream tokens, the meta says {meta.n_stream_tokens}")
    if len(ids) and (ids.min() < 0 or ids.max() >= max(n_vocab, 1)):
        raise _damaged(path, "a stream token id is outside the vocabulary")
    return ids


def check_rows(con: sqlite3.Connection, path: Path, meta: IndexMeta, saes: list[SaeRow]) -> None:
    """Blob sizes and JSON of the per-latent tables, checked in SQL (no blob is decoded)."""
    w = 2 * meta.window + 1
    bad = con.execute(
        "SELECT sae, latent FROM examples WHERE typeof(pos) != 'blob' OR typeof(act) != 'blob' "
        "OR typeof(win) != 'blob' OR length(pos) % 4 != 0 OR length(act) != length(pos) "
        "OR length(win) != length(pos) / 4 * ? * 2 OR kind NOT IN ('top', 'quantile') "
        "OR (lay IS NOT NULL AND length(lay) * 2 != length(pos)) "
        "OR (band IS NOT NULL AND length(band) * 4 != length(pos)) LIMIT 1",
        (w,),
    ).fetchall()
    if bad:
        raise _damaged(
            path, f"the examples of SAE {bad[0][0]} latent {bad[0][1]} have blobs of the wrong size"
        )
    d = {s.sae: s.d_sae for s in saes}
    for s, n in con.execute("SELECT sae, max(latent) FROM latents GROUP BY sae").fetchall():
        if s not in d or not isinstance(n, int) or n >= d[s]:
            raise _damaged(path, f"latents of SAE {s!r} beyond its size")
    bad = con.execute(
        "SELECT sae, latent FROM latents WHERE typeof(info) != 'text' OR NOT json_valid(info) "
        "OR json_type(info) != 'object' LIMIT 1"
    ).fetchall()
    if bad:
        raise _damaged(path, f"SAE {bad[0][0]} latent {bad[0][1]} has no JSON info object")


def check_example(pos: np.ndarray, stream_len: int, where: str) -> None:
    """Examples point into the stream."""
    if len(pos) and (pos.min() < 0 or pos.max() >= stream_len):
        raise MlsaeError(f"{where}: an example points outside the token stream")


INFO_KEYS = {"logit_pos": 2, "logit_neg": 2, "top_tokens": 3, "neighbours": 2}
"""List fields of a latent's info JSON and the length of each of their entries."""


def check_info(info: Any, where: str) -> dict[str, Any]:
    """A latent's info JSON: an object whose list fields hold entries of numbers."""
    if not isinstance(info, dict):
        raise MlsaeError(f"{where}: the latent's info is not an object")
    for k, n in INFO_KEYS.items():
        v = info.get(k, [])
        ok = isinstance(v, list) and all(
            isinstance(e, list)
            and len(e) == n
            and isinstance(e[0], int)
            and not isinstance(e[0], bool)
            and all(_number(x) for x in e)
            for e in v
        )
        if not ok:
            raise MlsaeError(f"{where}: the latent's {k} is not a list of {n}-number entries")
        info[k] = v
    return info


def _number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)) or (
        x is None
    )
