"""The activation cache: writing, reading, shuffling, building from a model, atomicity, errors."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from transformers import AutoModelForCausalLM

from mlsae.activations import cache as cache_mod
from mlsae.activations.cache import ActivationCache, CacheWriter
from mlsae.activations.extract import BuiltCache, build_cache
from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.data.capture import capture, special_ids_of
from mlsae.data.text import iter_contexts

REQUIRED = [
    "model",
    "dataset",
    "split",
    "layers",
    "d_model",
    "dtype",
    "n_tokens",
    "context_length",
    "lens",
    "shards",
    "complete",
]


# ----------------------------------------------------------------------------- synthetic caches


def _synthetic(
    out: Path, n: int = 250, layers=(1, 4, 6), d: int = 4, shard_tokens: int = 64, seed: int = 0
):
    """A float32 cache whose vector at (token t, layer l) is [t, l, t*l, 1]; every 7th token is
    masked out. Returns (out, mask)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32)[:, None].expand(n, len(layers))
    lay = torch.tensor(layers, dtype=torch.float32)[None, :].expand(n, len(layers))
    acts = torch.stack([t, lay, t * lay, torch.ones_like(t)], dim=2)[..., :d]  # [n, L, d]
    mask = torch.arange(n) % 7 != 3
    ids = torch.randint(0, 100, (n,), generator=g)
    meta = {"layers": list(layers), "d_model": d, "model": "synthetic", "context_length": 10}
    w = CacheWriter(out, meta, shard_tokens=shard_tokens, storage_dtype="float32")
    for a in range(0, n, 37):  # uneven add() sizes
        w.add(acts[a : a + 37], ids[a : a + 37], mask[a : a + 37])
    w.close()
    return out, mask


def _ids(batches) -> list[tuple[int, int]]:
    return [(int(p), int(y)) for b in batches for p, y in zip(b.position, b.layer, strict=True)]


def test_writer_and_reader(tmp_path: Path) -> None:
    out, mask = _synthetic(tmp_path / "c")
    c = ActivationCache(out)
    assert [s["n_tokens"] for s in c.manifest["shards"]] == [64, 64, 64, 58]
    assert all(k in c.manifest for k in REQUIRED) and c.manifest["complete"] is True
    assert c.n_tokens == 250 and c.layers == [1, 4, 6] and c.d_model == 4
    shards = list(c.iter_ordered())
    acts = torch.cat([s.activations for s in shards])
    assert [s.offset for s in shards] == [0, 64, 128, 192]
    assert torch.equal(acts[:, :, 0], torch.arange(250.0)[:, None].expand(250, 3))
    assert torch.equal(torch.cat([s.mask for s in shards]), mask)
    assert c.n_vectors() == int(mask.sum()) * 3 and c.n_vectors([4]) == int(mask.sum())


def test_shuffled_covers_mixes_and_matches(tmp_path: Path) -> None:
    out, mask = _synthetic(tmp_path / "c")
    c = ActivationCache(out)
    batches = list(c.shuffled(32, buffer_shards=2, seed=3))
    assert all(len(b) == 32 for b in batches[:-1]) and 0 < len(batches[-1]) <= 32
    got = _ids(batches)
    want = [(t, lay) for t in range(250) if mask[t] for lay in (1, 4, 6)]
    assert sorted(got) == sorted(want)  # every used vector exactly once, masked ones never
    for b in batches:
        assert b.x.dtype == torch.float32 and b.x.shape == (len(b), 4)
        assert torch.equal(b.x[:, 0], b.position.float()) and torch.equal(
            b.x[:, 1], b.layer.float()
        )
    first = batches[0]
    assert len(set(first.layer.tolist())) == 3  # layers mixed in one batch
    assert len(set((first.position // 64).tolist())) == 2  # two shards mixed in one buffer
    assert got != sorted(got)
    assert sum(1 for b in batches if len(b) < 32) == 1  # batches carry across buffers


def test_shuffled_deterministic_and_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _synthetic(tmp_path / "c", shard_tokens=40)
    c = ActivationCache(out)
    full = _ids(c.shuffled(50, buffer_shards=2, seed=1, epoch=2))
    assert full == _ids(c.shuffled(50, buffer_shards=2, seed=1, epoch=2))
    assert full != _ids(c.shuffled(50, buffer_shards=2, seed=1, epoch=3))
    assert full != _ids(c.shuffled(50, buffer_shards=2, seed=2, epoch=2))
    n = -(-len(full) // 50)
    for k in (1, 3, 4, 7, n - 1, n, n + 3):
        assert (
            _ids(c.shuffled(50, buffer_shards=2, seed=1, epoch=2, skip_batches=k)) == full[k * 50 :]
        )
    loaded: list[int] = []
    real = ActivationCache._open
    monkeypatch.setattr(ActivationCache, "_open", lambda s, i: loaded.append(i) or real(s, i))
    tail = list(c.shuffled(50, buffer_shards=2, seed=1, epoch=2, skip_batches=n - 1))
    assert len(tail) == 1 and 1 <= len(loaded) <= 2  # only the last buffer's shards were read
    assert len(list(c.shuffled(50, buffer_shards=2, drop_last=True))) == len(full) // 50


def test_shuffled_layer_subset(tmp_path: Path) -> None:
    out, mask = _synthetic(tmp_path / "c")
    c = ActivationCache(out)
    got = _ids(c.shuffled(64, layers=[6, 1]))
    assert sorted(got) == sorted((t, lay) for t in range(250) if mask[t] for lay in (1, 6))
    with pytest.raises(MlsaeError, match=r"layer\(s\) \[5\] not in the activations"):
        next(c.shuffled(64, layers=[1, 5]))
    with pytest.raises(MlsaeError, match="not in the activations"):
        c.n_vectors([0])


def test_reader_rejects_incomplete_missing_and_foreign(tmp_path: Path) -> None:
    with pytest.raises(MlsaeError, match="does not exist"):
        ActivationCache(tmp_path / "nope")
    w = CacheWriter(tmp_path / "c", {"layers": [0], "d_model": 2}, shard_tokens=4)
    w.add(torch.randn(9, 1, 2), torch.arange(9), torch.ones(9, dtype=torch.bool))
    assert (tmp_path / "c" / "shard_00001.safetensors").exists()
    with pytest.raises(MlsaeError, match="incomplete"):
        ActivationCache(tmp_path / "c")
    w.close()
    ActivationCache(tmp_path / "c")
    with pytest.raises(MlsaeError, match="not empty"):
        CacheWriter(tmp_path / "c", {"layers": [0], "d_model": 2})
    (tmp_path / "c" / "shard_00001.safetensors").unlink()
    with pytest.raises(MlsaeError, match="missing shard"):
        ActivationCache(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(MlsaeError, match="unreadable manifest"):
        ActivationCache(tmp_path / "c")
    with pytest.raises(MlsaeError, match=r"expected activations \[3, 1, 2\]"):
        CacheWriter(tmp_path / "d", {"layers": [0], "d_model": 2}).add(
            torch.randn(3, 2, 2), torch.arange(3), torch.ones(3, dtype=torch.bool)
        )


def test_corrupt_and_mismatched_shards(tmp_path: Path) -> None:
    out, _ = _synthetic(tmp_path / "c")
    path = out / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    c = ActivationCache(out)
    c.load_shard(0)
    with pytest.raises(MlsaeError, match="shard_00001.safetensors.*corrupt"):
        c.load_shard(1)
    # a valid shard of the wrong shape, with the manifest's checksum updated to match it
    other, _ = _synthetic(tmp_path / "o", d=3)
    (out / "shard_00002.safetensors").write_bytes((other / "shard_00002.safetensors").read_bytes())
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][2]["sha256"] = hashlib.sha256(
        (out / "shard_00002.safetensors").read_bytes()
    ).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MlsaeError, match="shard_00002.safetensors.*does not match the manifest"):
        ActivationCache(out).load_shard(2)
    with pytest.raises(MlsaeError, match="corrupt"):
        list(ActivationCache(out).iter_ordered())


# ----------------------------------------------------------------------------- from a model


def _corpus(root: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    words = ["river", "stone", "cloud", "forest", "lamp", "engine", "violet"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"d{i:03d}.txt").write_text(" ".join(rng.choices(words, k=20 + i)))
    return root


def _build(
    out: Path,
    model_dir: Path,
    corpus: Path,
    n_tokens=200,
    layers="0,2",
    storage_dtype="bfloat16",
    lens=None,
) -> BuiltCache:
    data = DataConfig(dataset=str(corpus), context_length=16)
    source = SourceConfig(tokens=n_tokens, layers=layers, batch_size=3)
    extract = ExtractConfig(storage_dtype=storage_dtype, shard_tokens=64)
    return build_cache(out, Inputs(source, data, ModelConfig(model=str(model_dir))), extract, lens)


def test_round_trip_equals_capture(tmp_path: Path, tiny_model_dir: Path, tokenizer) -> None:
    corpus = _corpus(tmp_path / "corpus")
    built = _build(tmp_path / "c", tiny_model_dir, corpus, storage_dtype="float32")
    raw = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert all(k in raw for k in REQUIRED) and "norm_outliers" in raw
    man = built.manifest
    assert man.n_tokens == raw["n_tokens"] == 208  # 13 whole contexts
    assert man.layers == [0, 2] and man.d_model == 32 and man.dtype == "float32"
    assert [s.n_tokens for s in man.shards] == [64, 64, 64, 16]
    assert built.norm_outliers is not None and built.norm_outliers.layers == [0, 2]
    c = ActivationCache(tmp_path / "c")
    shards = list(c.iter_ordered())
    acts = torch.cat([s.activations for s in shards])  # [208, 2, 32]
    ids = torch.cat([s.token_ids for s in shards])
    mask = torch.cat([s.mask for s in shards])
    data = DataConfig(dataset=str(corpus), context_length=16)
    ctx = torch.stack(list(iter_contexts(tokenizer, data))[:13])  # [13, 16]
    assert torch.equal(ids, ctx.reshape(-1))
    special = torch.tensor([tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id])
    assert torch.equal(mask, ~torch.isin(ids, special)) and not mask.all()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    want = capture(model, ctx, [0, 2]).reshape(208, 2, 32)
    torch.testing.assert_close(acts, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        hs = model(ctx, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[:, 0], hs[1].reshape(208, 32), rtol=1e-5, atol=1e-5)
    assert set(man.special_ids) == set(special_ids_of(tokenizer))


@pytest.fixture
def neox_dir(tmp_path: Path, tokenizer) -> Path:
    out = tmp_path / "tiny-neox"
    make_model("gpt_neox", vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_crash_then_resume_equals_uninterrupted(
    tmp_path: Path, neox_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    corpus = _corpus(tmp_path / "corpus")
    _build(tmp_path / "ref", neox_dir, corpus)
    real = cache_mod.write_bytes
    calls: list[str] = []

    def crashing(path: Path, data: bytes, **kw: bool) -> None:
        calls.append(path.name)
        if len(calls) == 3:  # die half-way through writing the third shard
            path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        real(path, data, **kw)

    monkeypatch.setattr(cache_mod, "write_bytes", crashing)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "c", neox_dir, corpus)
    with pytest.raises(MlsaeError, match="incomplete"):
        ActivationCache(tmp_path / "c")
    # also damage the last shard that did land: resume must not trust it
    shard1 = tmp_path / "c" / "shard_00001.safetensors"
    shard1.write_bytes(shard1.read_bytes()[:-8] + b"\0" * 8)
    calls.clear()
    monkeypatch.setattr(
        cache_mod, "write_bytes", lambda p, d, **kw: calls.append(p.name) or real(p, d, **kw)
    )
    _build(tmp_path / "c", neox_dir, corpus)
    assert calls == [
        "shard_00001.safetensors",
        "shard_00002.safetensors",
        "shard_00003.safetensors",
    ]
    assert "resuming" in caplog.text
    assert _files(tmp_path / "c") == _files(tmp_path / "ref")  # byte for byte
    ActivationCache(tmp_path / "c").load_shard(1)


def test_rerun_complete_and_mismatched_args(tmp_path: Path, neox_dir: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    _build(tmp_path / "c", neox_dir, corpus)
    before = _files(tmp_path / "c")
    assert _build(tmp_path / "c", neox_dir, corpus).manifest.complete is True
    with pytest.raises(MlsaeError, match=r"other arguments \(layers: \[0, 2\] -> \[1\].*new --out"):
        _build(tmp_path / "c", neox_dir, corpus, layers="1")
    with pytest.raises(MlsaeError, match="requested_tokens: 200 -> 100"):
        _build(tmp_path / "c", neox_dir, corpus, n_tokens=100)
    assert _files(tmp_path / "c") == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(MlsaeError, match="not an activation cache"):
        _build(tmp_path / "foreign", neox_dir, corpus)
    assert _files(tmp_path / "foreign") == {"notes.txt": b"mine"}


def test_build_errors_write_nothing(tmp_path: Path, neox_dir: Path, tokenizer) -> None:
    corpus = _corpus(tmp_path / "corpus")
    data = DataConfig(dataset=str(corpus), context_length=16)
    have = len(list(iter_contexts(tokenizer, data))) * 16
    n_tokens = sum(len(tokenizer.encode(p.read_text())) + 1 for p in corpus.iterdir())
    assert have == n_tokens // 16 * 16 or have < n_tokens  # the train split is a subset
    with pytest.raises(MlsaeError, match=f"holds only {have} tokens"):
        _build(tmp_path / "c", neox_dir, corpus, n_tokens=have + 1)
    with pytest.raises(MlsaeError, match=r"layer\(s\) \[3\] out of range"):
        _build(tmp_path / "c", neox_dir, corpus, layers="0,3")
    with pytest.raises(MlsaeError, match="does not exist"):
        _build(tmp_path / "c", neox_dir, tmp_path / "nope")
    with pytest.raises(MlsaeError, match="is not a lens folder"):
        _build(tmp_path / "c", neox_dir, corpus, lens=tmp_path)
    assert not (tmp_path / "c").exists()


def test_cli(tmp_path: Path, neox_dir: Path, monkeypatch, capsys) -> None:
    from mlsae import cli

    corpus = _corpus(tmp_path / "corpus")
    base = ["mlsae", "cache", "--model", str(neox_dir), "--dataset", str(corpus)]
    base += ["--tokens", "64", "--context-length", "16", "--shard-tokens", "32"]
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(tmp_path / "c"), "--layers", "1-2"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code in (0, None)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert all(k in m for k in REQUIRED) and m["complete"] is True
    assert m["layers"] == [1, 2] and m["dtype"] == "bfloat16" and m["n_tokens"] == 64
    assert len(m["shards"]) == 2 and all(len(s["sha256"]) == 64 for s in m["shards"])
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(tmp_path / "d"), "--layers", "5"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mlsae: error: layer(s) [5] out of range")
    # a real process: one line on stderr, exit code 2, nothing written
    cmd = [sys.executable, "-m", "mlsae", "cache", "--out", str(tmp_path / "e")]
    cmd += ["--model", str(neox_dir), "--dataset", str(tmp_path / "missing.jsonl")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"mlsae: error: dataset path {str(tmp_path / 'missing.jsonl')!r} does not exist"
    ]
    assert not (tmp_path / "e").exists()


@pytest.mark.real_model
def test_real_model_default_corpus(tmp_path: Path) -> None:
    man = build_cache(
        tmp_path / "c",
        Inputs(
            SourceConfig(tokens=128, layers="0,29", batch_size=2),
            DataConfig(context_length=64),
            ModelConfig(),
        ),
    ).manifest
    assert man.d_model == 576 and man.layers == [0, 29] and man.n_tokens == 128
    shard = ActivationCache(tmp_path / "c").load_shard(0)
    assert shard.activations.shape == (128, 2, 576) and shard.activations.dtype == torch.bfloat16
    special = torch.tensor(man.special_ids)
    assert torch.equal(shard.mask, ~torch.isin(shard.token_ids, special))
    # the residual norm grows with depth (SPEC 4) and no vector is all zeros
    norms = shard.activations.float().norm(dim=-1)[shard.mask]  # [n_used, 2]
    assert (norms > 0).all() and norms[:, 1].mean() > norms[:, 0].mean()
