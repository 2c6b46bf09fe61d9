"""`mlsae explore`'s API on 127.0.0.1: the prompt page's numbers against plain hooked forward
passes of the tiny model, bad requests, read-only index, serialised model calls, the CLI's
printed URL, and a bounded load test (8 concurrent clients)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from explore_fixtures import LAYERS, dense_codes, get, indexed_world, serve
from safetensors.torch import load_file

from mlsae.explore.server import create_app

TEXT = "river stone cloud seven alpha"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return indexed_world(tmp_path_factory.mktemp("explore_server"))


@pytest.fixture(scope="module")
def url(world):
    with serve(create_app(world["run"], max_tokens=64)) as u:
        yield u


@pytest.fixture(scope="module")
def ref(world):
    """The tiny model and tokenizer loaded independently, and the SAE's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world["model"]).eval()
    tok = AutoTokenizer.from_pretrained(world["model"])
    t = load_file(str(world["run"] / "sae" / "sae.safetensors"))
    return model, tok, t


def hooked(model, ids, layer, edit):
    """Block outputs of every layer, and log-softmax logits, of a full forward pass whose block
    `layer` output h [1, T, d] is replaced by edit(h) (None: clean)."""
    hs: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_m, _i, o):
            h = o[0] if isinstance(o, tuple) else o
            if i == layer and edit is not None:
                h = edit(h.clone())
                o = (h, *o[1:]) if isinstance(o, tuple) else h
            hs[i] = h
            return o

        return hook

    handles = [model.model.layers[i].register_forward_hook(keep(i)) for i in LAYERS]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    for hd in handles:
        hd.remove()
    return hs, torch.log_softmax(logits.double(), -1)


def probs(dist):
    return {e["id"]: e["p"] for e in dist}


def test_prompt_heatmap_equals_direct_encode(url, world, ref) -> None:
    model, tok, _ = ref
    ids = tok(TEXT)["input_ids"]
    hs, _ = hooked(model, ids, 0, None)
    for latent in (0, 7, 33):
        code, d = get(f"{url}/api/prompt", sae=0, text=TEXT, latent=latent, layer=1)
        assert code == 200, d
        assert d["ids"] == ids and len(d["heatmap"]) == len(ids)
        for p, ly in enumerate(LAYERS):
            want = dense_codes(world["run"] / "sae", hs[ly][0].double().numpy())[:, latent]
            np.testing.assert_allclose([row[p] for row in d["heatmap"]], want, rtol=1e-3, atol=1e-4)
    # the top latents at (token, layer) are that row of the codes, largest first
    code, d = get(f"{url}/api/prompt", sae=0, text=TEXT, latent=0, layer=2, pos=3)
    row = dense_codes(world["run"] / "sae", hs[2][0].double().numpy())[3]
    want = [int(j) for j in np.argsort(-row) if row[j] > 0]
    assert [j for j, _ in d["top_at"]] == want
    np.testing.assert_allclose([a for _, a in d["top_at"]], row[want], rtol=1e-3, atol=1e-4)


def test_spliced_distribution_equals_hooked_reconstruction(url, world, ref) -> None:
    from mlsae.sae.folders import load_sae

    model, tok, _ = ref
    sae = load_sae(world["run"] / "sae")
    ids = tok(TEXT)["input_ids"]
    for layer, pos in ((0, len(ids) - 1), (1, 4)):

        def recon(h):
            with torch.no_grad():
                return sae(h[0])[0][None].to(h.dtype)

        _, clean = hooked(model, ids, layer, None)
        _, spl = hooked(model, ids, layer, recon)
        code, d = get(f"{url}/api/prompt", sae=0, text=TEXT, latent=0, layer=layer, pos=pos)
        assert code == 200 and d["next"]["pos"] == pos
        for name, ref_lp in (("clean", clean), ("spliced", spl)):
            got = probs(d["next"][name])
            top = torch.topk(ref_lp[pos], len(got)).indices.tolist()
            assert set(got) == set(top)
            for i, p in got.items():
                assert p == pytest.approx(float(ref_lp[pos, i].exp()), rel=1e-3, abs=1e-6)
        kl = float((clean[pos].exp() * (clean[pos] - spl[pos])).sum())
        assert d["next"]["kl_spliced"] == pytest.approx(kl, rel=1e-2, abs=1e-6)


def test_steered_distribution_equals_hooked_addition(url, world, ref) -> None:
    model, tok, t = ref
    ids = tok(TEXT)["input_ids"]
    latent, factor, layer = 9, 6.5, 1
    direction = t["W_dec"][latent].float()

    _, clean = hooked(model, ids, layer, None)
    _, steer = hooked(model, ids, layer, lambda h: h + factor * direction)
    code, d = get(
        f"{url}/api/prompt", sae=0, text=TEXT, latent=0, layer=layer, steer=latent, factor=factor
    )
    assert code == 200
    pos = len(ids) - 1
    got = probs(d["next"]["steered"])
    assert set(got) == set(torch.topk(steer[pos], len(got)).indices.tolist())
    for i, p in got.items():
        assert p == pytest.approx(float(steer[pos, i].exp()), rel=1e-3, abs=1e-6)
    assert not torch.allclose(steer[pos], clean[pos], atol=1e-3)  # the steering did something
    for c in d["next"]["compare"]:
        assert c["steered"] == pytest.approx(float(steer[pos, c["id"]].exp()), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("latent", {"latent": 64}, "latent must be between 0 and 63"),
        ("latent", {"latent": "x"}, "latent must be an integer"),
        ("latent", {"sae": 3}, "sae must be between 0 and 0"),
        ("latent", {"latent": "../../etc/passwd"}, "latent must be an integer"),
        ("prompt", {"text": TEXT, "layer": 5}, "layer must be between 0 and 2"),
        ("prompt", {"text": TEXT, "steer": 1, "factor": 5000}, "factor must be between"),
        ("prompt", {"text": TEXT, "steer": 1, "factor": "nan"}, "factor must be between"),
        ("prompt", {"text": TEXT, "steer": 1, "factor": 200, "units": "max"}, "-100 and 100"),
        ("prompt", {"text": TEXT, "steer": 1, "units": "volts"}, "units must be"),
        ("prompt", {"text": TEXT, "steer": 1, "steer_layers": "1,9"}, "steering layers [9]"),
        ("prompt", {"text": TEXT, "steer": 1, "steer_layers": "a"}, "steer_layers must be"),
        ("prompt", {"text": TEXT, "steer": 1, "gen": 99}, "gen must be between 0 and 32"),
        ("context", {"w": 500}, "w must be between 1 and 64"),
        ("prompt", {"text": TEXT, "pos": 999}, "token position must be"),
        ("prompt", {"text": ""}, "the prompt is empty"),
        ("prompt", {"text": "a" * 2001}, "at most 2000"),
        ("prompt", {"text": "ab " * 40}, "at most 64"),
        ("search", {"text": "x" * 300}, "at most 200"),
        ("graph", {}, "--evolution"),
    ],
)
def test_bad_requests_get_a_clear_400(url, path, params, message) -> None:
    code, body = get(f"{url}/api/{path}", **params)
    assert code == 400 and message in body["error"] and "\n" not in body["error"]


def test_no_request_names_a_file(url, world) -> None:
    import urllib.error
    import urllib.request

    for path in ("/static/..%2Fdb.py", "/static/db.py", "/static/%2Fetc%2Fpasswd", "/run/sae"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path, timeout=30)
        assert e.value.code == 404
    with urllib.request.urlopen(url + "/static/app.js", timeout=30) as r:
        assert r.status == 200 and b"mlsae explore" in r.read()
    with urllib.request.urlopen(url + "/", timeout=30) as r:
        page = r.read().decode()
        assert "http://" not in page and "https://" not in page  # nothing from the network
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]


def test_index_is_opened_read_only(world) -> None:
    app = create_app(world["run"])
    con = app.state.explorer.db.con()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        con.execute("CREATE TABLE t(x)")


def test_concurrent_prompts_do_not_interfere(url) -> None:
    """8 clients at once, each with its own prompt: the same answers as one at a time."""
    texts = [
        f"{w} river" for w in ("alpha", "beta", "gamma", "delta", "stone", "cloud", "seven", "x")
    ]
    args = [
        dict(sae=0, text=t, latent=i, layer=LAYERS[i % 3], steer=i, factor=3.0)
        for i, t in enumerate(texts)
    ]
    alone = [get(f"{url}/api/prompt", **a) for a in args]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda a: get(f"{url}/api/prompt", **a), args))
    assert all(c == 200 for c, _ in alone + together)
    assert [d for _, d in together] == [d for _, d in alone]


def test_cli_binds_loopback_and_prints_the_url(world) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlsae", "explore", str(world["run"]), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("mlsae explore: http://127.0.0.1:"), line
        base = line.split()[2]
        code, info = get(base + "api/info", timeout=60)
        assert code == 200 and info["saes"][0]["label"] == "MLSAE"
    finally:
        proc.terminate()
        proc.wait(30)


def test_load_8_concurrent_clients(url, tmp_path) -> None:
    """8 clients, each 12 latent-page requests and 2 prompt requests (bounded); no error.
    Latencies are recorded (printed and written to JSON), never asserted."""
    rng = np.random.default_rng(0)
    jobs = [
        [("latent", {"sae": 0, "latent": int(rng.integers(64))}) for _ in range(12)]
        + [("prompt", {"sae": 0, "text": f"{TEXT} {c}", "latent": c, "layer": 1}) for c in range(2)]
        for _ in range(8)
    ]
    lat: dict[str, list[float]] = {"latent": [], "prompt": []}
    lock = threading.Lock()

    def client(job):
        for kind, params in job:
            t0 = time.perf_counter()
            code, body = get(f"{url}/api/{kind}", timeout=120, **params)
            dt = time.perf_counter() - t0
            assert code == 200, body
            with lock:
                lat[kind].append(dt)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, jobs))
    assert len(lat["latent"]) == 96 and len(lat["prompt"]) == 16
    summary = {
        k: {
            "n": len(v),
            "p50_ms": 1e3 * float(np.percentile(v, 50)),
            "p95_ms": 1e3 * float(np.percentile(v, 95)),
        }
        for k, v in lat.items()
    }
    (tmp_path / "latency.json").write_text(json.dumps(summary))
    print("explore load test (8 clients):", summary)


def test_steering_in_max_units_at_several_layers_equals_hooked_addition(url, world, ref) -> None:
    """units=max: at every steered block l and token t, factor x the latent's indexed max
    activation x (std_t + 1e-5) x its decoder row is added (what the latent adds to the
    reconstruction firing at factor x its max); the steered greedy continuation is the argmax
    loop of the same hooked model, and the clean one of the plain model."""
    from mlsae.explore.db import IndexDB
    from mlsae.explore.tokens import display_tokens, token_bytes

    model, tok, t = ref
    ids = tok(TEXT)["input_ids"]
    latent, factor, layers = 11, 2.5, [0, 2]
    mx = IndexDB(world["run"] / "explore.sqlite").latent(0, latent)["max_act"]
    w = t["W_dec"][latent].double()

    def run(seq, steer):
        hs = []
        for ly in layers if steer else []:

            def hook(_m, _i, o):
                h = o[0] if isinstance(o, tuple) else o
                std = h.double().std(-1, keepdim=True)  # Bessel-corrected, per token
                h = (h.double() + factor * mx * (std + 1e-5) * w).to(h.dtype)
                return (h, *o[1:]) if isinstance(o, tuple) else h

            hs.append(model.model.layers[ly].register_forward_hook(hook))
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        for hd in hs:
            hd.remove()
        return lp

    code, d = get(
        f"{url}/api/prompt",
        sae=0,
        text=TEXT,
        layer=1,
        steer=latent,
        factor=factor,
        units="max",
        steer_layers="0,2",
        gen=4,
    )
    assert code == 200, d
    assert d["steer"]["layers"] == layers and d["steer"]["max_act"] == pytest.approx(mx)
    pos = len(ids) - 1
    steered, clean = run(ids, True), run(ids, False)
    assert not torch.allclose(steered[pos], clean[pos], atol=1e-3)
    for e in d["next"]["steered"]:
        assert e["p"] == pytest.approx(float(steered[pos, e["id"]].exp()), rel=1e-3, abs=1e-6)
        assert e["base"] == pytest.approx(float(clean[pos, e["id"]].exp()), rel=1e-3, abs=1e-6)
    for name, steer in (("gen_clean", False), ("gen_steered", True)):
        seq = list(ids)
        for _ in range(4):
            seq.append(int(run(seq, steer)[-1].argmax()))
            if seq[-1] == tok.eos_token_id:
                break
        assert d["next"][name] == display_tokens(token_bytes(tok, seq[len(ids) :]))
    # the norms shown: mean residual norm and mean added norm at each steered layer
    hs, _ = hooked(model, ids, 0, None)
    for row in d["next"]["norms"]:
        h = hs[row["layer"]][0].double()
        added = factor * mx * (h.std(-1) + 1e-5) * w.norm()
        assert row["resid"] == pytest.approx(float(h.norm(dim=-1).mean()), rel=1e-3)
        assert row["added"] == pytest.approx(float(added.mean()), rel=1e-3)


def test_prompt_defaults_to_the_strongest_latent_at_the_token(url, world, ref) -> None:
    model, tok, _ = ref
    ids = tok(TEXT)["input_ids"]
    hs, _ = hooked(model, ids, 0, None)
    code, d = get(f"{url}/api/prompt", sae=0, text=TEXT, layer=1, pos=2)
    assert code == 200, d
    codes = {ly: dense_codes(world["run"] / "sae", hs[ly][0].double().numpy()) for ly in LAYERS}
    assert d["latent"] == int(np.argmax(codes[1][2]))
    # the latents x layers table at the token: every latent active there at some layer
    want = {int(j) for ly in LAYERS for j in np.nonzero(codes[ly][2] > 0)[0]}
    assert set(d["at_token"]["latents"]) == want
    for j, row in zip(d["at_token"]["latents"], d["at_token"]["matrix"], strict=True):
        np.testing.assert_allclose(row, [codes[ly][2, j] for ly in LAYERS], rtol=1e-3, atol=1e-4)


def test_all_layers_examples_are_one_row_per_position(url, world) -> None:
    from mlsae.explore.db import IndexDB

    db = IndexDB(world["run"] / "explore.sqlite")
    for j in range(0, 64, 7):
        code, d = get(f"{url}/api/latent", sae=0, latent=j)
        assert code == 200
        pos = [e["pos"] for e in d["top"]]
        assert len(pos) == len(set(pos))
        every = db.examples(0, j, "top")
        for e in d["top"]:  # each row at its best layer, with every layer it is a top example at
            mine = [x for x in every if x["pos"] == e["pos"]]
            assert e["act"] == max(x["act"] for x in mine)
            assert e["fires"] == {str(x["layer"]): x["act"] for x in mine}
        assert pos == sorted(pos, key=lambda p: -max(x["act"] for x in every if x["pos"] == p))


def test_context_and_search_explain_themselves(url, world) -> None:
    from mlsae.explore.db import IndexDB

    db = IndexDB(world["run"] / "explore.sqlite")
    p = 50
    code, c = get(f"{url}/api/context", sae=0, pos=p, w=10)
    assert code == 200
    lo = p - c["at"]
    assert "".join(c["tokens"]) == "".join(
        db.token(int(i)) for i in db.stream[lo : lo + len(c["tokens"])]
    )
    assert c["at"] == min(10, p % 24)  # clipped to the example's context (CTX = 24)
    code, r = get(f"{url}/api/search", sae=0, token="zzzqqq")
    assert r["results"] == [] and "no token of the vocabulary" in r["empty"]
    code, r = get(f"{url}/api/search", sae=0, text="no such words here")
    assert r["results"] == [] and "no latent's best examples contain" in r["empty"]


def test_dense_latents_are_flagged_and_can_be_hidden(world) -> None:
    from mlsae.explore.db import IndexDB

    db = IndexDB(world["run"] / "explore.sqlite")
    freq = {j: f for j, f in db.q("SELECT latent, freq FROM latents WHERE sae=0")}
    share = float(np.median(list(freq.values())))
    with serve(create_app(world["run"], dense=share)) as u:
        _, all_ = get(f"{u}/api/search", sae=0, limit=200)
        _, kept = get(f"{u}/api/search", sae=0, limit=200, hide_dense=1)
        _, lat = get(f"{u}/api/latent", sae=0, latent=int(max(freq, key=freq.get)))
    assert {r["latent"] for r in all_["results"] if r["dense"]} == {
        j for j in (r["latent"] for r in all_["results"]) if freq[j] > share
    }
    assert all(freq[r["latent"]] <= share for r in kept["results"]) and kept["results"]
    assert kept["hidden_dense"] == sum(r["dense"] for r in all_["results"])
    assert lat["dense"] is True


def test_split_characters_are_merged_or_shown_as_bytes() -> None:
    from mlsae.explore.tokens import display_tokens

    emoji = "🎉".encode()  # 4 bytes, split over two tokens
    got = display_tokens([b" a", emoji[:2], emoji[2:], b"\n"])
    assert got == [" a", "🎉", "⟨8E 89⟩", "\n"]
    assert display_tokens([emoji[:3]]) == ["⟨F0 9F 8E⟩"]  # cut off: bytes
    assert display_tokens(["日本".encode()[:4], "日本".encode()[4:]]) == ["日本", "⟨9C AC⟩"]


def test_cached_generation_equals_full_passes(ref) -> None:
    """The key/value-cached greedy loop steers new tokens exactly like full passes do."""
    from mlsae.explore.steer import SteerPlan, generate, logp_at

    model, tok, t = ref
    ids = tok(TEXT)["input_ids"]
    plan = SteerPlan({1: t["W_dec"][5].float()}, lambda ly, h: torch.full((len(h),), 3.0), [])
    for p in (None, plan):
        seq = list(ids)
        for _ in range(6):
            seq.append(int(logp_at(model, seq, p)[-1].argmax()))
        assert generate(model, ids, p, 6, set()) == seq[len(ids) :]
