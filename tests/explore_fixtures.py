"""A tiny model, cache, MLSAE run and explorer index shared by the explorer tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from conftest import make_model, make_tokenizer, write_word_corpus

from mlsae.activations.extract import build_cache
from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SaeConfig, SourceConfig
from mlsae.core.inputs import Inputs
from mlsae.sae.autoencoder import SparseAutoencoder

D, CTX, LAYERS = 32, 24, [0, 1, 2]


def make_sae(layers: list[int], seed: int = 0, expansion: int = 2, k: int = 5):
    sae = SparseAutoencoder(
        SaeConfig(d_in=D, expansion_factor=expansion, k=k, layers=layers),
        seed=seed,
        compute_dtype=torch.float32,
    )
    with torch.no_grad():  # spread the biases so latents differ in frequency
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return sae


def build_world(root: Path, arch: str = "llama", n_tokens: int = 480) -> dict[str, Path]:
    """model dir, float32 cache of every layer (test split of a word corpus), an MLSAE run."""
    tok = make_tokenizer()
    model = make_model(arch, vocab_size=len(tok))
    mdir = root / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    corpus = write_word_corpus(root / "corpus.jsonl", n_docs=400)
    data = DataConfig(dataset=str(corpus), split="train", context_length=CTX)
    build_cache(
        root / "cache",
        Inputs(SourceConfig(tokens=n_tokens, batch_size=3), data, ModelConfig(model=str(mdir))),
        ExtractConfig(storage_dtype="float32", shard_tokens=5 * CTX),
    )
    make_sae(LAYERS).save(root / "run" / "sae")
    return {"model": mdir, "cache": root / "cache", "run": root / "run", "corpus": corpus}


def dense_codes(sae_dir: Path, x) -> np.ndarray:
    """TopK SAE activations [N, m] from the definition (standardize, TopK of the
    pre-activations, ReLU), float64, from the saved weights."""
    import json

    from safetensors.torch import load_file

    t = load_file(str(sae_dir / "sae.safetensors"))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    W_enc, b_enc, b_dec = (t[k].double().numpy() for k in ("W_enc", "b_enc", "b_dec"))
    x = np.asarray(x, dtype=np.float64)
    u = (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-5)
    pre = (u - b_dec) @ W_enc + b_enc
    out = np.zeros_like(pre)
    for r in range(len(pre)):
        top = np.argsort(-pre[r])[: cfg["k"]]
        out[r, top] = np.maximum(pre[r, top], 0)
    return out


@contextmanager
def serve(app, timeout: float = 60.0) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on 127.0.0.1 (a free port); yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started:
        if time.monotonic() - t0 > timeout or not th.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(timeout)
        sock.close()


def get(url: str, timeout: float = 300.0, **params) -> tuple[int, dict]:
    """GET url?params -> (status, JSON body)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    try:
        with urllib.request.urlopen(f"{url}?{q}" if q else url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def indexed_world(root: Path) -> dict[str, Path]:
    """`build_world` with the run's explorer index built (small top-n, window and samples)."""
    from mlsae.core.config import SourceConfig
    from mlsae.core.stage_config import IndexConfig
    from mlsae.explore.index import build_index

    w = build_world(root)
    build_index(
        w["run"],
        inputs=Inputs.held_out(source=SourceConfig(cache=w["cache"])),
        cfg=IndexConfig(top_n=8, window=3, samples=12),
    )
    return w
