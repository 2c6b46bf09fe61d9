"""Issue 25: a synthetic cache (`mlsae synth generate`) is read by every command unchanged:
`train`, `evaluate --no-ce`, `analyze`, `index` (without a language model: no logit effects,
tokens by id) and the explorer's app (latent, search and example pages; the prompt page answers
with one clear error). Values are checked against the SAE's own encode of the cached vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mlsae.activations.cache import ActivationCache
from mlsae.cli.app import app
from mlsae.explore.live import NO_MODEL
from mlsae.sae.folders import load_sae
from mlsae.sae.metrics import fvu

N_LAYERS, TEST_TOKENS = 4, 512


def _run(*args: str) -> None:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """generate -> train -> evaluate --no-ce -> analyze -> index, all through the CLI."""
    t = tmp_path_factory.mktemp("synth_commands")
    _run(
        "synth",
        "generate",
        "--out",
        str(t / "d"),
        "--tokens",
        "2048",
        "--test-tokens",
        str(TEST_TOKENS),
        "--n-layers",
        str(N_LAYERS),
        "--d-model",
        "32",
        "--n-features",
        "32",
    )
    _run(
        "train",
        "--cache",
        str(t / "d" / "train"),
        "--out",
        str(t / "run"),
        "--expansion-factor",
        "2",
        "-k",
        "4",
        "--batch-tokens",
        "256",
        "--lr",
        "3e-3",
    )
    test = str(t / "d" / "test")
    _run("evaluate", str(t / "run"), "--cache", test, "--no-ce", "--out", str(t / "eval.json"))
    _run("analyze", str(t / "run"), "--cache", test, "--out", str(t / "analysis"))
    _run("index", str(t / "run"), "--cache", test)
    return {"root": t, "run": t / "run", "test": t / "d" / "test"}


@pytest.fixture(scope="module")
def codes(world) -> dict[str, torch.Tensor]:
    """The test cache's vectors [n, L, d] and the trained SAE's dense codes [n, L, m] and
    reconstructions, computed here from the cache and the SAE folder."""
    sae = load_sae(world["run"] / "sae")
    cache = ActivationCache(world["test"])
    x = torch.cat([b.activations.float() for b in cache.iter_ordered(None)])  # [n, L, d]
    ids = torch.cat([b.token_ids for b in cache.iter_ordered(None)])
    dense = torch.zeros(len(x), N_LAYERS, int(sae.cfg.d_sae))
    rec = torch.zeros_like(x)
    with torch.no_grad():
        for ly in range(N_LAYERS):
            x_hat, enc = sae(x[:, ly])
            dense[:, ly].scatter_(1, enc.top_indices, enc.top_acts.float())
            rec[:, ly] = x_hat
    return {"x": x, "ids": ids, "dense": dense, "rec": rec}


def test_evaluate_no_ce_and_analyze_read_the_synthetic_cache(world, codes) -> None:
    ev = json.loads((world["root"] / "eval.json").read_text())
    assert ev["n_tokens"] == TEST_TOKENS and ev["layers"] == list(range(N_LAYERS))
    assert ev["per_layer"]["delta_ce"] == [None] * N_LAYERS
    assert ev["model"] is None  # no language model: JSON null, not the string "None"
    from mlsae.eval.result import EvalResult

    assert EvalResult.from_json(ev).model is None  # and the reader accepts it
    x, rec = codes["x"], codes["rec"]
    want = [float(fvu(x[:, ly], rec[:, ly])) for ly in range(N_LAYERS)]
    assert ev["per_layer"]["fvu"] == pytest.approx(want, rel=1e-3)
    an = json.loads((world["root"] / "analysis" / "analysis.json").read_text())
    assert an["n_tokens"] == TEST_TOKENS and an["layers"] == list(range(N_LAYERS))
    active = codes["dense"] > 0  # [n, L, m]
    assert an["n_latents_alive"] == int(active.any(dim=(0, 1)).sum())


@pytest.fixture(scope="module")
def client(world):
    from starlette.testclient import TestClient

    from mlsae.explore.server import create_app

    return TestClient(create_app(world["run"]), base_url="http://127.0.0.1")


def test_index_without_a_model(world, client) -> None:
    info = client.get("/api/info").json()
    assert info["model"] is None and info["n_tokens"] == TEST_TOKENS
    assert [s["layers"] for s in info["saes"]] == [list(range(N_LAYERS))]
    # the host guard still refuses another Host header
    assert client.get("/api/info", headers={"host": "evil.example"}).status_code == 400


def test_latent_page_matches_the_saes_own_encode(client, codes) -> None:
    dense, ids = codes["dense"], codes["ids"]
    per_latent = dense.amax(dim=(0, 1))  # [m]
    j = int(per_latent.argmax())
    lat = client.get(f"/api/latent?sae=0&latent={j}").json()
    assert lat["max_act"] == pytest.approx(float(per_latent[j]), rel=1e-4)
    assert lat["logit_pos"] == [] and lat["logit_neg"] == []
    top = lat["top"][0]
    assert top["act"] == pytest.approx(float(per_latent[j]), abs=1e-3)
    t, ly = divmod(int(dense[:, :, j].argmax()), N_LAYERS)
    assert top["pos"] == t and str(ly) in top["fires"]
    assert top["tokens"][top["at"]] == f"<{int(ids[t])}>"
    want = (dense[:, :, j] > 0).any(1).sum()  # tokens active at >= 1 layer
    assert lat["n_active"] == int(want)
    one = client.get(f"/api/latent?sae=0&latent={j}&layer={ly}").json()
    assert one["top"][0]["act"] == pytest.approx(float(dense[:, ly, j].max()), abs=1e-3)


def test_search_by_token_and_by_mean_layer(client, codes) -> None:
    dense = codes["dense"]
    j = int(dense.amax(dim=(0, 1)).argmax())
    tok = client.get(f"/api/latent?sae=0&latent={j}").json()["top_tokens"][0]["token"]
    found = client.get(f"/api/search?sae=0&token={tok}&limit=200").json()
    assert j in [r["latent"] for r in found["results"]]
    mass = dense.sum(0)  # [L, m] activation mass per layer
    mean_layer = (mass * torch.arange(N_LAYERS)[:, None]).sum(0) / mass.sum(0)
    early = client.get("/api/search?sae=0&lo=0&hi=0.5&limit=200").json()
    want = {int(i) for i in ((mean_layer <= 0.5) & (mass.sum(0) > 0)).nonzero().flatten()}
    assert {r["latent"] for r in early["results"]} == want


def test_prompt_page_says_there_is_no_model(client) -> None:
    r = client.get("/api/prompt?sae=0&text=hello")
    assert r.status_code == 400 and r.json()["error"] == NO_MODEL
    ctx = client.get("/api/context?pos=5&w=2").json()
    assert len(ctx["tokens"]) == 5 and all(t.startswith("<") for t in ctx["tokens"])
