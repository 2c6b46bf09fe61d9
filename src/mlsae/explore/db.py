"""The explorer's SQLite database: written once by `mlsae index` (to a temporary file renamed
into place), opened read-only by `mlsae explore`.

Tables: meta(key, JSON value); saes(sae, label, path, layers, d_sae, k, lens, n_tokens);
latents(sae, latent, n_active, freq, max_act, mean_act, mean_layer, var_layer, info JSON,
text); examples(sae, latent, kind 'top'|'quantile', layer (-1 for quantile), pos int32[],
act f32[], win f16[n, 2w+1], lay int16[] | NULL, band int8[] | NULL); token_latents(sae,
token, latent, n, max_act); vocab(id, text); stream(start, ids int32[]) the token stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_path, fsync_file
from mlsae.core.outputs import check_output

STREAM_ROW = 65536  # tokens per stream row
PROMPT_PREFIX = 32  # tokens before an example kept in its link to the prompt page

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE saes(sae INTEGER PRIMARY KEY, label TEXT, path TEXT, layers TEXT, d_sae INTEGER,
  k INTEGER, lens TEXT, n_tokens INTEGER);
CREATE TABLE latents(sae INTEGER, latent INTEGER, n_active INTEGER, freq REAL, max_act REAL,
  mean_act REAL, mean_layer REAL, var_layer REAL, info TEXT, text TEXT,
  PRIMARY KEY (sae, latent)) WITHOUT ROWID;
CREATE TABLE examples(sae INTEGER, latent INTEGER, kind TEXT, layer INTEGER, pos BLOB,
  act BLOB, win BLOB, lay BLOB, band BLOB, PRIMARY KEY (sae, latent, kind, layer)) WITHOUT ROWID;
CREATE TABLE token_latents(sae INTEGER, token INTEGER, latent INTEGER, n INTEGER, max_act REAL);
CREATE TABLE vocab(id INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE stream(start INTEGER PRIMARY KEY, ids BLOB);
"""
INDEXES = """
CREATE INDEX latents_layer ON latents(sae, mean_layer);
CREATE INDEX token_latents_tok ON token_latents(sae, token);
"""


SQLITE_HEADER = b"SQLite format 3\x00"


def check_index_output(path: Path, inputs: list[Any]) -> None:
    """MlsaeError unless `mlsae index` may write its database at `path` (the output checks of
    every command, and an existing file there must be an SQLite database it can replace)."""
    check_output(path, "index", file=True, inputs=inputs)
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise MlsaeError(f"--out {path}: unreadable ({e.strerror})") from None
        if head != SQLITE_HEADER:
            raise MlsaeError(
                f"--out {path} exists and is not an explorer index: choose a new "
                "file name (it is left untouched)"
            )


def sqlite_os_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError behind an sqlite3 error about the disk ('database or disk is full', 'disk
    I/O error'), naming `path`; None for any other error."""
    if not isinstance(e, sqlite3.Error):
        return None
    text = str(e).lower()
    if "full" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if "disk i/o" in text:
        return OSError(errno.EIO, os.strerror(errno.EIO), str(path))
    if "readonly" in text or "read-only" in text:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return None


class Writer:
    """`with Writer(path) as w: ...` builds the database in a temporary file beside `path` and
    renames it over `path` once every write, the indexes and the commit are done and on disk
    (removed on error: a full disk leaves the old database as it was)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Writer:
        self._ctx = atomic_path(self.path, suffix=".tmp.sqlite")
        self.tmp = self._ctx.__enter__()
        self.tmp.unlink()
        try:
            self.con = sqlite3.connect(self.tmp)
            self.con.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)
        except BaseException as e:
            self._fail(e)
        return self

    def __exit__(self, _type: Any, exc: BaseException | None, _tb: Any) -> None:
        if exc is not None:
            self._fail(exc)
        try:
            self.con.executescript(INDEXES)
            self.con.commit()
            self.con.close()
            fsync_file(self.tmp)
        except BaseException as e:
            self._fail(e)
        self._ctx.__exit__(None, None, None)  # the rename

    def _fail(self, exc: BaseException) -> None:
        """Close, remove the temporary file and raise `exc` (an SQLite error of the disk as the
        OSError it stands for, naming `path`)."""
        with contextlib.suppress(Exception):
            self.con.close()
        err = sqlite_os_error(exc, self.path) or exc
        self._ctx.__exit__(type(err), err, err.__traceback__)
        raise err

    def meta(self, meta: dict[str, Any]) -> None:
        rows = [(k, json.dumps(v)) for k, v in meta.items()]
        self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

    def stream(self, ids: np.ndarray) -> None:
        rows = [
            (s, ids[s : s + STREAM_ROW].astype(np.int32).tobytes())
            for s in range(0, len(ids), STREAM_ROW)
        ]
        self.con.executemany("INSERT INTO stream VALUES (?, ?)", rows)

    def vocab(self, texts: list[str]) -> None:
        self.con.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(texts))

    def sae(self, i: int, x: Any, effects: Any, neigh: Any, stream: Any, vocab: Any, ctx: int):
        """Every row of one SAE's accumulators (mlsae.explore.index.SaeIndexer)."""
        from mlsae.explore.finalize import sae_rows

        cfg = x.rs.sae.cfg
        self.con.execute(
            "INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                i,
                x.rs.label,
                str(x.rs.path),
                json.dumps(x.rs.layers),
                cfg.d_sae,
                cfg.k,
                cfg.lens,
                x.stats.n_tokens,
            ),
        )
        lat, ex, tok = sae_rows(i, x, effects, neigh, stream, vocab, ctx)
        lat = [(*r[:8], json.dumps(r[8], separators=(",", ":")), r[9]) for r in lat]
        self.con.executemany("INSERT INTO latents VALUES (?,?,?,?,?,?,?,?,?,?)", lat)
        self.con.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?)", ex)
        self.con.executemany("INSERT INTO token_latents VALUES (?,?,?,?,?)", tok)


# ----------------------------------------------------------------------------- reading


class IndexDB:
    """Read-only access (one SQLite connection per thread, `mode=ro`); the token stream and the
    vocabulary are held in memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MlsaeError(f"index {self.path} does not exist: run `mlsae index RUN` first")
        self._lock = threading.Lock()
        try:  # one connection for the process: one generation of the file, even if replaced
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._load()
        except sqlite3.DatabaseError as e:
            raise MlsaeError(f"{self.path} is not an explorer index ({e})") from None
        except MemoryError:
            raise MlsaeError(f"{self.path}: too large to hold its token stream in memory") from None

    def _load(self) -> None:
        from mlsae.explore import validate as v

        con, path = self._con, self.path
        v.check_tables(con, path)
        self.meta, m = v.read_meta(con, path)
        self.vocab = v.read_vocab(con, path)
        self.stream = v.read_stream(con, path, m, len(self.vocab))
        rows = v.read_saes(con, path)
        v.check_rows(con, path, m, rows)
        self.saes = [dataclasses.asdict(r) for r in rows]
        self.sae_sha256 = m.sae_sha256
        self.ctx, self.w = m.context_length, m.window

    def con(self) -> sqlite3.Connection:
        return self._con

    def q(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a read query (one at a time: the connection is shared by the threads)."""
        try:
            with self._lock:
                return self._con.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise MlsaeError(f"{self.path}: a damaged explorer index ({e})") from None

    def token(self, i: int) -> str:
        return self.vocab[i] if 0 <= i < len(self.vocab) else f"<{i}>"

    def window(self, pos: int, acts: np.ndarray) -> dict[str, Any]:
        """An example's context window: tokens, their activations, the active token's index."""
        from mlsae.explore.finalize import window_ids

        ids, at = window_ids(self.stream, pos, self.w, self.ctx)
        lo = self.w - at  # where the window starts in the stored 2w+1 activations
        vals = [round(float(v), 4) for v in acts[lo : lo + len(ids)]]
        c0 = pos // self.ctx * self.ctx  # a longer prefix for the prompt page's link
        pre = self.stream[max(c0, pos - PROMPT_PREFIX) : pos].tolist()
        prompt = "".join(self.token(i) for i in pre) + "".join(self.token(i) for i in ids[at:])
        return {
            "pos": pos,
            "tokens": [self.token(i) for i in ids],
            "acts": vals,
            "at": at,
            "prompt": prompt,
            "prompt_at": len(pre),
        }

    def latent(self, sae: int, j: int) -> dict[str, Any] | None:
        rows = self.q("SELECT * FROM latents WHERE sae = ? AND latent = ?", (sae, j))
        if not rows:
            return None
        r = rows[0]
        from mlsae.explore.validate import check_info

        where = f"{self.path}: SAE {sae} latent {j}"
        try:
            info = check_info(json.loads(r[8]), where)
        except (TypeError, ValueError):
            raise MlsaeError(f"{where}: the latent's info is not JSON") from None
        tok = lambda pairs: [{"id": i, "token": self.token(i), "value": v} for i, v in pairs]
        info["logit_pos"], info["logit_neg"] = tok(info["logit_pos"]), tok(info["logit_neg"])
        info["top_tokens"] = [
            {"id": t, "token": self.token(t), "n": n, "max": mx} for t, n, mx in info["top_tokens"]
        ]
        return {
            "sae": r[0],
            "latent": r[1],
            "n_active": r[2],
            "freq": r[3],
            "max_act": r[4],
            "mean_act": r[5],
            "mean_layer": r[6],
            "var_layer": r[7],
            **info,
        }

    def examples(
        self, sae: int, j: int, kind: str, layer: int | None = None, limit: int | None = None
    ) -> list[dict]:
        """Examples of a latent: kind 'top' (at `layer`, or the best over all layers, largest
        first) or 'quantile'; at most `limit`, each with its window, activation, layer and
        (quantile) band."""
        from mlsae.explore.validate import check_example

        sql = "SELECT layer, pos, act, win, lay, band FROM examples WHERE sae=? AND latent=? AND kind=?"
        args: tuple = (sae, j, kind)
        if layer is not None:
            sql, args = sql + " AND layer=?", (*args, layer)
        W = 2 * self.w + 1
        rows = []  # (act, pos, layer, band, window activations)
        for ly, pos, act, win, lay, band in self.q(sql, args):
            p, a = np.frombuffer(pos, np.int32), np.frombuffer(act, np.float32)
            check_example(p, len(self.stream), f"{self.path}: SAE {sae} latent {j}")
            wn = np.frombuffer(win, np.float16).reshape(-1, W)
            lays = np.frombuffer(lay, np.int16) if lay is not None else np.full(len(p), ly)
            bands = np.frombuffer(band, np.int8) if band is not None else [None] * len(p)
            rows += [(float(a[i]), int(p[i]), int(lays[i]), bands[i], wn[i]) for i in range(len(p))]
        if kind == "top":
            rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        out = []
        for act, pos, ly, band, wn in rows[:limit]:
            e = self.window(pos, wn.astype(np.float32))
            e.update(act=round(act, 4), layer=ly, band=None if band is None else int(band))
            out.append(e)
        return out

    def search_token(self, sae: int, token_ids: list[int], limit: int) -> list[tuple]:
        """(latent, token, n) of latents whose top examples sit on one of these tokens."""
        if not token_ids:
            return []
        marks = ",".join("?" * len(token_ids))
        return self.q(
            f"SELECT latent, token, n FROM token_latents WHERE sae=? AND token IN ({marks}) "
            "ORDER BY n DESC, max_act DESC LIMIT ?",
            (sae, *token_ids, limit),
        )

    def token_ids(self, text: str, limit: int = 50) -> list[int]:
        """Ids of the tokens whose text is `text` (ignoring surrounding spaces and case)."""
        want = text.strip().lower()
        return [i for i, t in enumerate(self.vocab) if t.strip().lower() == want][:limit]

    def search_text(self, sae: int, text: str, limit: int) -> list[int]:
        pat = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.q(
            "SELECT latent FROM latents WHERE sae=? AND text LIKE ? ESCAPE '\\' "
            "ORDER BY n_active DESC LIMIT ?",
            (sae, pat, limit),
        )
        return [r[0] for r in rows]

    def search_layers(self, sae: int, lo: float, hi: float, limit: int) -> list[int]:
        rows = self.q(
            "SELECT latent FROM latents WHERE sae=? AND mean_layer BETWEEN ? AND ? "
            "ORDER BY n_active DESC LIMIT ?",
            (sae, lo, hi, limit),
        )
        return [r[0] for r in rows]

    def summaries(self, sae: int, latents: list[int], match: str = "") -> list[dict[str, Any]]:
        """Short rows for result lists: stats and the best example's window (the best one
        holding `match`, when given)."""
        out = []
        for j in latents:
            r = self.q(
                "SELECT latent, n_active, freq, max_act, mean_layer, text FROM latents "
                "WHERE sae=? AND latent=?",
                (sae, j),
            )
            if r:
                lj, n, f, mx, ml, text = r[0]
                lines = (text or "").split("\n")
                hit = [x for x in lines if match and match.lower() in x.lower()]
                out.append(
                    {
                        "latent": lj,
                        "n_active": n,
                        "freq": f,
                        "max_act": mx,
                        "mean_layer": ml,
                        "text": (hit or lines)[0],
                    }
                )
        return out
