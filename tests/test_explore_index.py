"""`mlsae index` against brute force: a dense activation tensor built from the definition of
the TopK SAE over every cached token, then plain numpy for top examples, windows, frequencies,
layer distributions, histograms, logit effects and decoder neighbours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from explore_fixtures import CTX, LAYERS, build_world, dense_codes, make_sae
from safetensors.torch import load_file

from mlsae.core.config import DataConfig, ModelConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import IndexConfig
from mlsae.explore.db import IndexDB
from mlsae.explore.index import HIST_EDGES, build_index

TOP_N, WINDOW = 6, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explore_index")
    w = build_world(root)
    build_index(
        w["run"],
        inputs=Inputs.held_out(source=SourceConfig(cache=w["cache"])),
        cfg=IndexConfig(top_n=TOP_N, window=WINDOW, samples=12),
    )
    w["db"] = w["run"] / "explore.sqlite"
    return w


def read_cache(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acts [N, L, d] f32, token ids [N], mask [N]) of every shard, by the manifest's order."""
    man = json.loads((path / "manifest.json").read_text())
    parts = [load_file(str(path / s["name"])) for s in man["shards"]]
    acts = np.concatenate([p["activations"].float().numpy() for p in parts])
    return (
        acts,
        np.concatenate([p["token_ids"].numpy() for p in parts]),
        np.concatenate([p["mask"].numpy() for p in parts]),
    )


@pytest.fixture(scope="module")
def brute(world) -> dict[str, np.ndarray]:
    acts, ids, mask = read_cache(world["cache"])
    A = np.zeros((len(ids), len(LAYERS), 2 * 32))  # [N, L, m], 0 at unused tokens
    for p in range(len(LAYERS)):
        A[mask, p] = dense_codes(world["run"] / "sae", acts[mask, p])
    return {"A": A, "ids": ids, "mask": mask}


def test_frequencies_means_and_layer_distribution(world, brute) -> None:
    db, A, mask = IndexDB(world["db"]), brute["A"], brute["mask"]
    n = int(mask.sum())
    assert db.saes[0]["n_tokens"] == n and db.meta["n_stream_tokens"] == len(mask)
    checked = 0
    for j in range(A.shape[2]):
        lat = db.latent(0, j)
        a = A[:, :, j]
        cnt = (a > 0).sum(0)
        assert lat["layer_count"] == cnt.tolist()
        assert lat["n_active"] == int((a > 0).any(1).sum())
        assert lat["freq"] == pytest.approx((a > 0).any(1).sum() / n)
        if cnt.sum() == 0:
            assert lat["mean_layer"] is None and lat["max_act"] is None
            continue
        checked += 1
        S = a.sum(0)
        assert lat["mean_act"] == pytest.approx(S.sum() / cnt.sum(), rel=1e-4, abs=1e-5)
        assert lat["max_act"] == pytest.approx(a.max(), rel=1e-4, abs=1e-5)
        np.testing.assert_allclose(lat["layer_dist"], S / S.sum(), rtol=1e-4, atol=1e-6)
        assert lat["mean_layer"] == pytest.approx(
            (np.array(LAYERS) * S).sum() / S.sum(), rel=1e-4, abs=1e-5
        )
        for p in range(len(LAYERS)):
            if cnt[p]:
                assert lat["layer_mean"][p] == pytest.approx(S[p] / cnt[p], rel=1e-4, abs=1e-5)
    assert checked > 20  # most latents are alive on this data


def test_top_examples_and_windows(world, brute) -> None:
    db, A, ids = IndexDB(world["db"]), brute["A"], brute["ids"]
    for j in range(A.shape[2]):
        for p, layer in enumerate(LAYERS):
            col = A[:, p, j]
            pos = np.nonzero(col > 0)[0]
            want = pos[np.lexsort((pos, -col[pos]))][:TOP_N]  # largest first, ties by position
            got = db.examples(0, j, "top", layer)
            # the same values in the same order (float32 vs float64: near-ties may swap)
            np.testing.assert_allclose([e["act"] for e in got], col[want], rtol=1e-4, atol=1e-5)
            assert len({e["pos"] for e in got}) == len(got)
            for e in got:
                t = e["pos"]
                assert e["act"] == pytest.approx(col[t], rel=1e-4, abs=1e-5)
                lo = max(t - WINDOW, t // CTX * CTX)
                hi = min(t + WINDOW + 1, t // CTX * CTX + CTX)
                assert e["tokens"] == [db.token(int(i)) for i in ids[lo:hi]]
                assert e["at"] == t - lo and e["layer"] == layer
                np.testing.assert_allclose(e["acts"], col[lo:hi], rtol=2e-3, atol=1e-3)


def test_quantile_examples_are_real_activations(world, brute) -> None:
    db, A = IndexDB(world["db"]), brute["A"]
    n_seen = 0
    for j in range(A.shape[2]):
        q = db.examples(0, j, "quantile")
        n_act = int((A[:, :, j] > 0).sum())
        assert len(q) <= min(n_act, 16)
        for e in q:
            assert e["act"] == pytest.approx(
                A[e["pos"], LAYERS.index(e["layer"]), j], rel=1e-4, abs=1e-5
            )
            assert e["band"] in (0, 1, 2, 3)
        if n_act >= 4:
            assert len({e["band"] for e in q}) >= 2
            n_seen += 1
    assert n_seen > 10


def test_histogram(world, brute) -> None:
    db, A = IndexDB(world["db"]), brute["A"]
    for j in range(A.shape[2]):
        a = A[:, :, j][A[:, :, j] > 0]
        want: dict[int, int] = {}
        for v in a:
            b = max(0, min(len(HIST_EDGES) - 2, int(np.sum(HIST_EDGES[1:-1] <= v))))
            want[b] = want.get(b, 0) + 1
        assert dict(map(tuple, db.latent(0, j)["hist"])) == want


def test_logit_effects_and_neighbours(world) -> None:
    """Llama: RMSNorm(w) = w / sqrt(mean(w^2) + eps) * g, then the unembedding (no bias)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["model"])
    g = model.model.norm.weight.detach().double().numpy()
    eps = model.config.rms_norm_eps
    U = model.lm_head.weight.detach().double().numpy()  # [V, d]
    W = load_file(str(world["run"] / "sae" / "sae.safetensors"))["W_dec"].double().numpy()
    db = IndexDB(world["db"])
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = Wn @ Wn.T
    np.fill_diagonal(cos, -np.inf)
    for j in range(len(W)):
        eff = U @ (W[j] / np.sqrt(np.mean(W[j] ** 2) + eps) * g)
        lat = db.latent(0, j)
        top = np.argsort(-eff)[:10]
        assert [e["id"] for e in lat["logit_pos"]] == top.tolist()
        np.testing.assert_allclose(
            [e["value"] for e in lat["logit_pos"]], eff[top], rtol=1e-4, atol=1e-6
        )
        bot = np.argsort(eff)[:10]
        assert [e["id"] for e in lat["logit_neg"]] == bot.tolist()
        near = np.argsort(-cos[j])[:10]
        assert [i for i, _ in lat["neighbours"]] == near.tolist()
        np.testing.assert_allclose(
            [c for _, c in lat["neighbours"]], cos[j, near], rtol=1e-4, atol=1e-6
        )


def test_search(world, brute) -> None:
    db, A, ids = IndexDB(world["db"]), brute["A"], brute["ids"]
    lo_hi = db.search_layers(0, 1.5, 2.0, 500)
    for j in range(A.shape[2]):
        S = A[:, :, j].sum(0)
        inside = S.sum() > 0 and 1.5 <= (np.array(LAYERS) * S).sum() / S.sum() <= 2.0
        assert (j in lo_hi) == inside
    # the token of some latent's best example finds that latent
    j = int(np.argmax(A.max((0, 1)) > 0))
    t = int(ids[np.unravel_index(np.argmax(A[:, :, j]), A.shape[:2])[0]])
    assert j in [r[0] for r in db.search_token(0, [t], 500)]
    word = db.latent(0, j) and db.examples(0, j, "top")[0]["tokens"]
    assert j in db.search_text(0, "".join(word), 500)


def test_live_source_equals_cache(world, tmp_path) -> None:
    """The model run on the same split and contexts gives the same index as its float32 cache."""
    out = tmp_path / "live.sqlite"
    build_index(
        world["run"],
        out=out,
        cfg=IndexConfig(top_n=TOP_N, window=WINDOW, samples=12),
        inputs=Inputs.held_out(
            source=SourceConfig(tokens=480),
            data=DataConfig(dataset=str(world["corpus"]), split="train", context_length=CTX),
            model=ModelConfig(model=str(world["model"])),
        ),
    )
    a, b = IndexDB(world["db"]), IndexDB(out)
    assert np.array_equal(a.stream, b.stream)
    for j in range(0, 64, 7):
        la, lb = a.latent(0, j), b.latent(0, j)
        assert la["layer_count"] == lb["layer_count"]
        assert [e["pos"] for e in a.examples(0, j, "top")] == [
            e["pos"] for e in b.examples(0, j, "top")
        ]


def test_per_layer_set_sweep_and_lens_sae(world, brute, tmp_path) -> None:
    from mlsae.lens.tuned import TunedLens

    # a per-layer set: each SAE sees only its layer
    for ly in LAYERS:
        make_sae([ly], seed=10 + ly).save(tmp_path / "pl" / f"layer_{ly:02d}")
    r = build_index(
        tmp_path / "pl",
        inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
        cfg=IndexConfig(top_n=3, window=1),
    )
    db = IndexDB(r.path)
    assert [s["layers"] for s in db.saes] == [[0], [1], [2]]
    acts, _, mask = read_cache(world["cache"])
    a1 = dense_codes(tmp_path / "pl" / "layer_01", acts[mask, 1])
    assert [db.latent(1, j)["n_active"] for j in range(64)] == (a1 > 0).sum(0).tolist()
    # a single-layer SAE run, and one sweep member given directly
    make_sae([1], seed=11).save(tmp_path / "single" / "sae")
    db = IndexDB(
        build_index(
            tmp_path / "single",
            inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
            cfg=IndexConfig(top_n=3),
        ).path
    )
    assert [(s["label"], s["layers"]) for s in db.saes] == [("L1", [1])]
    a1 = dense_codes(tmp_path / "single" / "sae", acts[mask, 1])
    assert [db.latent(0, j)["n_active"] for j in range(64)] == (a1 > 0).sum(0).tolist()
    # a sweep: one SAE per member folder
    for name, k in (("sae_R2_k3", 3), ("sae_R2_k5", 5)):
        make_sae(LAYERS, k=k).save(tmp_path / "sweep" / name)
    db = IndexDB(
        build_index(
            tmp_path / "sweep",
            inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
            cfg=IndexConfig(top_n=2),
        ).path
    )
    assert [(s["label"], s["k"]) for s in db.saes] == [("sae_R2_k3", 3), ("sae_R2_k5", 5)]
    db = IndexDB(
        build_index(
            tmp_path / "sweep" / "sae_R2_k5",
            inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
        ).path
    )
    assert [s["label"] for s in db.saes] == ["sae_R2_k5"]
    # a lens SAE reads T_l(x) = x + A x + c
    g = torch.Generator().manual_seed(0)
    lens = TunedLens(3, 32)
    for ly in lens.trained_layers:
        lens._set(
            ly, 0.3 * torch.randn(32, 32, generator=g) / 32**0.5, torch.randn(32, generator=g)
        )
    lens.save(tmp_path / "lens")
    sae = make_sae(LAYERS)
    sae.cfg.lens = str((tmp_path / "lens").resolve())
    sae.save(tmp_path / "lensrun" / "sae")
    db = IndexDB(
        build_index(
            tmp_path / "lensrun",
            inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
            cfg=IndexConfig(top_n=2),
        ).path
    )
    tl = lens.translators["0"]
    x0 = acts[mask, 0].astype(np.float64)
    z0 = x0 + x0 @ tl.weight.detach().double().numpy().T + tl.bias.detach().double().numpy()
    want = (dense_codes(tmp_path / "lensrun" / "sae", z0) > 0).sum(0)
    assert [db.latent(0, j)["layer_count"][0] for j in range(64)] == want.tolist()


def test_errors(world, tmp_path) -> None:
    with pytest.raises(MlsaeError, match="does not exist"):
        build_index(
            tmp_path / "nope", inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"]))
        )
    with pytest.raises(MlsaeError, match="top-n"):
        build_index(
            world["run"],
            inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
            cfg=IndexConfig(top_n=0),
        )
    with pytest.raises(MlsaeError, match="does not exist"):
        IndexDB(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(MlsaeError, match="not an explorer index"):
        IndexDB(tmp_path / "junk.sqlite")


def test_top_keeper_streams_like_a_full_sort() -> None:
    """Random chunks with many exact ties: each group keeps its C largest keys, ties to the
    earliest entry, whatever the chunking; payloads follow their keys."""
    from mlsae.explore.keeper import TopKeeper

    g = torch.Generator().manual_seed(0)
    G, C, E = 7, 5, 600
    group = torch.randint(0, G, (E,), generator=g)
    key = torch.randint(0, 20, (E,), generator=g).float()  # many ties
    keeper = TopKeeper(G, C, {"id": (torch.int64, ()), "vec": (torch.float32, (2,))})
    s = 0
    while s < E:
        n = int(torch.randint(1, 90, (1,), generator=g))
        ids = torch.arange(s, min(s + n, E))
        keeper.push(
            group[ids],
            key[ids],
            {"id": ids, "vec": lambda e, ids=ids: ids[e, None].float().repeat(1, 2)},
        )
        s += n
    for gr in range(G):
        mine = [(float(key[i]), i) for i in range(E) if group[i] == gr]
        want = sorted(mine, key=lambda t: (-t[0], t[1]))[:C]
        assert keeper.data["id"][gr].tolist() == [i for _, i in want]
        assert keeper.key[gr].tolist() == [k for k, _ in want]
        assert keeper.data["vec"][gr, :, 0].tolist() == [float(i) for _, i in want]
