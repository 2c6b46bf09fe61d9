"""`mlsae synth`: the generator's guarantees (spans, exact drift angles, AND / OR truth tables,
the vectors' composition, norm growth, outliers, determinism, a cache every reader accepts),
the scorer on hand cases (perfect, permuted, random dictionaries; edges), evolution's
pass-through detector on oracle SAEs with and without per-vector standardisation, and a small
end-to-end run through the CLI."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlsae.cli.app import app
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.synth.config import SynthConfig
from mlsae.synth.generate import generate, sample, samples
from mlsae.synth.score import match, recovery_at, true_edges
from mlsae.synth.truth import AND, OR, SPECIALISED, build_truth

SMALL = SynthConfig(
    n_layers=5,
    d_model=16,
    n_features=16,
    tokens=1024,
    test_tokens=512,
    context_length=32,
    n_and=1,
    n_or=1,
    n_specialised=1,
)


def _sample(cfg: SynthConfig, n: int = 4000, seed: int = 0):
    truth = build_truth(cfg)
    return truth, sample(truth, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("drift", [0.0, 5.0, 30.0, 60.0])
def test_drift_angles_are_exact_and_directions_orthonormal(drift: float) -> None:
    truth = build_truth(replace(SMALL, drift_deg=drift))
    d = truth.directions.numpy()  # [F, L, d]
    for ly in range(d.shape[1] - 1):
        for f in range(d.shape[0]):
            c = float(np.dot(d[f, ly], d[f, ly + 1]))
            assert math.degrees(math.acos(min(1.0, c))) == pytest.approx(drift, abs=1e-5)
    for ly in range(d.shape[1]):
        assert np.allclose(d[:, ly] @ d[:, ly].T, np.eye(d.shape[0]), atol=1e-9)


def test_codes_live_on_the_spans_and_vectors_are_their_sum() -> None:
    cfg = replace(SMALL, norm_growth=19.0, schedule_sd=0.3, noise=0.0)
    truth, s = _sample(cfg)
    codes = s.codes.numpy()
    first, last = truth.first.numpy(), truth.last.numpy()
    for f in range(truth.n_features):
        for ly in range(cfg.n_layers):
            active = codes[:, ly, f] > 0
            if ly < first[f] or ly > last[f]:
                assert not active.any(), (f, ly)
            else:  # layer_activity 1: active at every layer of the span whenever it fires
                assert np.array_equal(active, s.fire[:, f].numpy()), (f, ly)
    # x[t,l] = scale_l * sum_f a[t,l,f] dir[f,l], recomputed with numpy loops
    scale = [19.0 ** (ly / (cfg.n_layers - 1)) for ly in range(cfg.n_layers)]
    d = truth.directions.numpy()
    for t in range(0, 4000, 397):
        for ly in range(cfg.n_layers):
            want = scale[ly] * sum(codes[t, ly, f] * d[f, ly] for f in range(truth.n_features))
            assert np.allclose(s.x[t, ly].numpy(), want, rtol=1e-5, atol=1e-5)


def test_and_or_specialised_truth_tables_and_heavy_tailed_firing() -> None:
    cfg = replace(SMALL, n_and=2, n_or=2, n_specialised=2)
    truth, s = _sample(cfg, n=20000)
    fire = s.fire.numpy()
    kinds = truth.kind.tolist()
    assert kinds.count(AND) == 2 and kinds.count(OR) == 2 and kinds.count(SPECIALISED) == 2
    for f, k in enumerate(kinds):
        p1, p2 = truth.parents[f].tolist()
        if k in (AND, OR, SPECIALISED):  # the child starts right after its parents end
            assert int(truth.first[f]) == int(truth.last[p1]) + 1
        if k == AND:
            assert np.array_equal(fire[:, f], np.logical_and(fire[:, p1], fire[:, p2]))
        elif k == OR:
            assert np.array_equal(fire[:, f], np.logical_or(fire[:, p1], fire[:, p2]))
        elif k == SPECIALISED:
            assert not (fire[:, f] & ~fire[:, p1]).any()
            share = fire[:, f].sum() / fire[:, p1].sum()
            assert abs(share - cfg.specialise_fraction) < 0.1
    root = [f for f, k in enumerate(kinds) if k == 0 and not np.isnan(float(truth.firing[f]))]
    p = truth.firing.numpy()[root]
    rate = fire[:, root].mean(0)
    assert np.all(np.abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / len(fire)) + 1e-3)
    free = sorted(p[p != cfg.parent_firing], reverse=True)  # heavy tail: p_r = p_max r^-a
    for r, pr in enumerate(free, start=1):
        assert pr == pytest.approx(cfg.firing_max * r**-cfg.firing_exponent, rel=1e-12)


def test_layer_activity_sets_the_per_token_multi_layer_fraction() -> None:
    for act in (0.0, 1.0):
        truth, s = _sample(replace(SMALL, layer_activity=act, min_span=2), n=3000)
        active = s.codes.numpy() > 0  # [n, L, F]
        n_layers = active.sum(1)[s.fire.numpy()]  # layers per firing (token, feature)
        if act == 0.0:
            assert (n_layers == 1).all()
        else:
            span = (truth.last - truth.first + 1).numpy()
            assert (active.sum(1) == s.fire.numpy() * span[None, :]).all()


def test_outliers_have_10_to_100x_the_median_norm() -> None:
    truth, s = _sample(replace(SMALL, outlier_fraction=0.01), n=8000)
    assert 40 <= int(s.outlier.sum()) <= 130
    norms = s.x.norm(dim=-1)  # [n, L]
    med = torch.stack([n[n > 0].median() for n in norms[~s.outlier].T])  # non-zero vectors
    ratio = norms[s.outlier] / med
    assert float(ratio.min()) >= 9.0 and float(ratio.max()) <= 102.0


def test_generate_writes_a_deterministic_cache_and_truth(tmp_path: Path) -> None:
    from mlsae.activations.cache import ActivationCache
    from mlsae.synth.truth import load_truth

    a = generate(tmp_path / "a", SMALL)
    b = generate(tmp_path / "b", SMALL)
    generate(tmp_path / "c", replace(SMALL, seed=1))
    for split in ("train", "test"):
        ma, mb, mc = (
            json.loads((tmp_path / n / split / "manifest.json").read_text()) for n in "abc"
        )
        assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
        assert [s["sha256"] for s in ma["shards"]] != [s["sha256"] for s in mc["shards"]]
    assert a["edges"] == b["edges"]
    cache = ActivationCache(tmp_path / "a" / "train")
    assert cache.layers == list(range(5)) and cache.d_model == 16 and cache.n_tokens == 1024
    truth, body = load_truth(tmp_path / "a")
    s = next(samples(truth, "train", SMALL.tokens))
    assert torch.equal(cache.load_block(0).activations, s.x)  # the float32 bytes, no copy lost
    assert body["test"]["n_tokens"] == 512
    with pytest.raises(MlsaeError, match="not empty"):
        generate(tmp_path / "a", SMALL)


def test_matching_is_optimal_against_brute_force() -> None:
    g = np.random.default_rng(0)
    cos = np.abs(g.standard_normal((5, 4)))
    best = max(sum(cos[p[i], i] for i in range(4)) for p in itertools.permutations(range(5), 4))
    mcc, m = match(cos)
    assert mcc == pytest.approx(best / 4, rel=1e-12)
    assert len(set(m.values())) == 4


def test_perfect_permuted_and_random_dictionaries() -> None:
    truth = build_truth(replace(SMALL, drift_deg=15.0))
    g = torch.Generator().manual_seed(3)
    for ly in (0, 3):
        w = truth.directions[:, ly]
        perm = torch.randperm(16, generator=g)
        signs = torch.where(torch.rand(16, generator=g) < 0.5, -1.0, 1.0).double()
        extra = torch.randn(16, 16, generator=g, dtype=torch.float64)
        for dec in (w, torch.cat([(w * signs[:, None] * 2.5)[perm], extra])):
            r = recovery_at(dec, truth, ly, centre=False, threshold=0.9)
            assert r.mcc == pytest.approx(1.0, abs=1e-9) and r.recovered == 1.0
    # random: the max |cosine| of n random unit vectors in d dimensions is below
    # sqrt(2 ln(n) / d) with high probability, so the matched mean is too
    wide = build_truth(replace(SMALL, d_model=64, n_features=64))
    rand = torch.randn(64, 64, generator=g, dtype=torch.float64)
    for ly in (0, 3):
        r = recovery_at(rand, wide, ly, centre=False, threshold=0.9)
        assert r.mcc < math.sqrt(2 * math.log(64) / 64) and r.recovered == 0.0
    # drift 15 deg: the layer-0 dictionary at layer 3 has cos(45 deg) with every feature
    r = recovery_at(truth.directions[:, 0], truth, 3, centre=False, threshold=0.9)
    feats = truth.in_span()[:, 3]
    assert r.recovery == pytest.approx(math.cos(math.radians(45)), abs=1e-6)
    assert r.n_true == int(feats.sum()) and r.recovered == 0.0


def _oracle_evolution(tmp_path: Path, cfg: SynthConfig, normalize: str, rescale: bool):
    from mlsae.core.stage_config import EvolutionConfig
    from mlsae.evolution.run import evolution_command
    from mlsae.synth.command import score_command
    from mlsae.synth.oracle import oracle_per_layer
    from mlsae.synth.truth import load_truth

    data = tmp_path / "data"
    if not data.exists():
        generate(data, cfg)
    truth, _ = load_truth(data)
    run = oracle_per_layer(truth, tmp_path / f"oracle_{normalize}", normalize)  # type: ignore[arg-type]
    from mlsae.core.config import SourceConfig

    evo = tmp_path / f"evo_{normalize}_{rescale}"
    evolution_command(
        run,
        evo,
        inputs=Inputs.held_out(source=SourceConfig(cache=data / "test")),
        cfg=EvolutionConfig(rescale=rescale, min_support=5),
    )
    return score_command(run, data, evo)


def test_pass_through_on_oracle_saes_needs_comparable_activations(tmp_path: Path) -> None:
    """Issue 24, 3(d): the same feature at adjacent layers, identical activations on every
    token. Oracle SAEs without normalisation find every pass-through; standardised ones lose
    most of it unless the activations are multiplied back by each vector's scale."""
    cfg = replace(
        SMALL,
        d_model=32,
        n_features=31,
        test_tokens=4096,
        n_and=1,
        n_or=1,
        n_specialised=1,
        min_span=2,
        max_span=2,
        firing_max=0.3,
        firing_exponent=0.0,
    )
    plain = {e.kind: e for e in _oracle_evolution(tmp_path, cfg, "none", True).edges}
    assert plain["pass_through"].recall == 1.0 and plain["pass_through"].precision == 1.0
    assert plain["and"].recall == 1.0 and plain["or"].recall == 1.0
    assert plain["specialised"].recall == 1.0
    raw = {e.kind: e for e in _oracle_evolution(tmp_path, cfg, "standardize", False).edges}
    fixed = {e.kind: e for e in _oracle_evolution(tmp_path, cfg, "standardize", True).edges}
    assert raw["pass_through"].recall is not None and raw["pass_through"].recall <= 0.9
    assert fixed["pass_through"].recall == 1.0 and fixed["pass_through"].precision == 1.0


def test_true_edges_map_through_the_matching() -> None:
    truth = build_truth(SMALL)
    rec = {ly: recovery_at(truth.directions[:, ly], truth, ly, False, 0.9) for ly in range(5)}
    edges = true_edges(truth, rec)
    n_pt = int((truth.last - truth.first).sum())
    assert len(edges["pass_through"]) == n_pt
    for ly, up, down in edges["pass_through"]:  # identity dictionaries: feature == latent
        assert up == down and truth.first[up] <= ly < truth.last[up]


def test_cli_end_to_end(tmp_path: Path) -> None:
    """generate -> train (MLSAE) -> score, through the CLI, in seconds."""
    r = CliRunner().invoke(
        app,
        [
            "synth",
            "generate",
            "--out",
            str(tmp_path / "d"),
            "--n-layers",
            "3",
            "--d-model",
            "16",
            "--n-features",
            "16",
            "--tokens",
            "1024",
            "--test-tokens",
            "256",
            "--context-length",
            "32",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--cache",
            str(tmp_path / "d" / "train"),
            "--out",
            str(tmp_path / "run"),
            "--expansion-factor",
            "2",
            "-k",
            "4",
            "--batch-tokens",
            "256",
            "--lr",
            "3e-3",
        ],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "score.json"
    r = CliRunner().invoke(
        app,
        [
            "synth",
            "score",
            str(tmp_path / "run"),
            "--truth",
            str(tmp_path / "d"),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    body = json.loads(out.read_text())
    assert body["kind"] == "multi-layer" and 0 < body["mcc"] <= 1
    assert body["spans"]["n_matched"] > 0 and len(body["layers"]) == 3
    r = CliRunner().invoke(
        app,
        [
            "synth",
            "score",
            str(tmp_path / "run"),
            "--truth",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "x.json"),
        ],
    )
    assert r.exit_code != 0 and not (tmp_path / "x.json").exists()


def test_sparse_codes_give_the_dense_codes_layer_statistics() -> None:
    from mlsae.analysis.layers import LayerStats
    from mlsae.synth.generate import sparse_codes

    truth, s = _sample(replace(SMALL, layer_activity=0.5, schedule_sd=0.3), n=3000)
    dense = torch.zeros(3000, SMALL.n_layers, truth.n_features, dtype=torch.float64)
    for p in range(len(s.tok)):  # the codes from the firing pairs, one by one
        t, f = int(s.tok[p]), int(s.feat[p])
        dense[t, :, f] = s.coef[p]
    assert torch.equal(dense, s.codes)
    values, indices = sparse_codes(s)
    rebuilt = torch.zeros_like(dense).scatter_add_(2, indices, values)
    assert torch.equal(rebuilt, dense)
    a, b = (LayerStats(truth.n_features, list(range(SMALL.n_layers)), 512) for _ in range(2))
    a.update(values, indices)
    b.update_dense(dense)
    ra, rb = a.result(), b.result()
    for k in ("rel_var_latent", "rel_var_token", "multi_layer_fraction_token"):
        assert getattr(ra, k) == pytest.approx(getattr(rb, k), rel=1e-9, abs=1e-12)
    assert ra.paper_formula is not None and rb.paper_formula is not None
    assert ra.paper_formula.rel_var_token == pytest.approx(
        rb.paper_formula.rel_var_token, rel=1e-9, abs=1e-12
    )


def test_unique_inverse_is_torch_unique() -> None:
    from mlsae.analysis.paper_variance import unique_inverse

    keys = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    key, inv = unique_inverse(keys)
    want_key, want_inv = torch.unique(keys, return_inverse=True)
    assert torch.equal(key, want_key) and torch.equal(inv, want_inv)
    assert torch.equal(key[inv], keys)


def test_outlier_scan_ignores_zero_vectors(tmp_path: Path) -> None:
    """Layers where most tokens have no feature (exact zero vectors): no outliers without
    --outlier-fraction; with it, the scan finds the generator's outlier tokens."""
    cfg = replace(SMALL, tokens=4096, max_span=2)
    truth = build_truth(cfg)
    zero = sample(truth, 4096, torch.Generator().manual_seed(0)).x.norm(dim=-1) == 0
    assert float(zero.double().mean(0).max()) > 0.5  # a layer with a majority of zero vectors
    generate(tmp_path / "a", cfg)
    rep = json.loads((tmp_path / "a/train/manifest.json").read_text())["norm_outliers"]
    assert rep["n_outliers"] == [0] * cfg.n_layers
    body = generate(tmp_path / "b", replace(cfg, outlier_fraction=0.01))
    rep = json.loads((tmp_path / "b/train/manifest.json").read_text())["norm_outliers"]
    assert max(rep["n_outliers"]) <= body["train"]["n_outlier_tokens"]
    assert min(rep["n_outliers"]) >= 0.8 * body["train"]["n_outlier_tokens"]
