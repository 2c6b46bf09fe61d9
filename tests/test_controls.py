"""Controls of the cross-layer measures (issue 24 item 3): nulls, intervals and the causal
check against plain numpy / torch recomputations, and cases whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_model, model_with_test_cache
from typer.testing import CliRunner

from mlsae.core.bootstrap import Bootstrap, resample_indices
from mlsae.core.config import SaeConfig
from mlsae.core.stage_config import ControlsConfig, EvolutionConfig
from mlsae.data.capture import block_output, get_blocks
from mlsae.evolution.causal import NextBlock, killed_fractions
from mlsae.evolution.controls import (
    LayerCodes,
    control_row,
    partner_sums,
    permutation,
    rate_intervals,
)
from mlsae.sae.autoencoder import SparseAutoencoder

D_SAE, K = 24, 4


def codes_of(dense: torch.Tensor, layer: int, w: torch.Tensor) -> LayerCodes:
    """Dense [N, d] >= 0 -> LayerCodes holding it exactly (k = the most active in a row)."""
    acts, idx = dense.topk(int((dense > 0).sum(1).max()), dim=1)
    return LayerCodes(layer, idx, acts, w, dense.shape[1])


def random_dense(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, D_SAE)
    for t in range(n):
        f = torch.randperm(D_SAE, generator=gen)[
            : int(torch.randint(1, K + 1, (1,), generator=gen))
        ]
        x[t, f] = torch.rand(len(f), generator=gen) * 2 + 0.1
    return x


def brute(a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray, cfg: EvolutionConfig):
    """Dense Pearson [d_a, d_b] -> pass-through, disappear, appear, best-partner Pearson and the
    decoder cosine of each alive up feature with its best partner."""
    alive_a, alive_b = (a > 0).any(0), (b > 0).any(0)
    za = (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), np.nan)
    zb = (b - b.mean(0)) / np.where(b.std(0) > 0, b.std(0), np.nan)
    p = np.nan_to_num(za.T @ zb / len(a), nan=-np.inf)
    p[:, ~alive_b] = -np.inf
    best_next = p.max(1)[alive_a]
    best_prev = p[alive_a].max(0)[alive_b]
    ua = wa / np.linalg.norm(wa, axis=1, keepdims=True)
    ub = wb / np.linalg.norm(wb, axis=1, keepdims=True)
    cos = (ua[alive_a] * ub[p.argmax(1)[alive_a]]).sum(1)
    return {
        "pass_through": float((best_next >= cfg.pass_through).mean()),
        "disappear": float((best_next < cfg.link_threshold).mean()),
        "appear": float((best_prev < cfg.link_threshold).mean()),
        "p50": float(np.median(best_next)),
        "cos": float(cos.mean()),
    }


def check_row(row, want) -> None:
    assert row.pass_through == pytest.approx(want["pass_through"], abs=1e-12)
    assert row.disappear == pytest.approx(want["disappear"], abs=1e-12)
    assert row.appear == pytest.approx(want["appear"], abs=1e-12)
    assert row.best_pearson["p50"] == pytest.approx(want["p50"], rel=1e-6, abs=1e-6)
    assert row.matched_decoder_cos["mean"] == pytest.approx(want["cos"], rel=1e-5, abs=1e-6)


def test_permutation_is_within_context_bijection():
    ctx = torch.arange(60) // 12
    for within in (True, False):
        order = permutation(ctx, within, seed=3)
        assert sorted(order.tolist()) == list(range(60))
        if within:
            assert torch.equal(ctx[order], ctx)
    assert not torch.equal(permutation(ctx, True, 3), torch.arange(60))


@pytest.mark.parametrize("within", [True, False])
def test_permuted_null_of_exact_pass_through(within):
    """Identical codes at both layers: every alive feature passes through; with one layer's
    tokens permuted the rate is ~0, and every measure matches a dense recomputation."""
    cfg = EvolutionConfig()
    n = 600
    dense = random_dense(n, 0)
    w = torch.randn(D_SAE, 8, generator=torch.Generator().manual_seed(1))
    up, down = codes_of(dense, 3, w), codes_of(dense, 4, w)
    ctx = torch.arange(n) // 50
    observed = control_row("observed", up, down, ctx, cfg, None)
    assert observed.pass_through == 1.0 and observed.disappear == 0.0 and observed.appear == 0.0
    order = permutation(ctx, within, seed=0)
    null = control_row("perm", up, down.permuted(order), ctx, cfg, None)
    want = brute(dense.numpy(), dense[order].numpy(), w.numpy(), w.numpy(), cfg)
    check_row(null, want)
    assert null.pass_through is not None and null.pass_through <= 0.05


def test_control_row_equals_brute_force():
    cfg = EvolutionConfig(pass_through=0.3)  # so some random pairs pass
    a, b = random_dense(500, 1), random_dense(500, 2)
    b[:, :6] += a[:, :6]  # some shared features
    gen = torch.Generator().manual_seed(4)
    wa, wb = torch.randn(D_SAE, 8, generator=gen), torch.randn(D_SAE, 8, generator=gen)
    row = control_row(
        "gap_2", codes_of(a, 0, wa), codes_of(b, 2, wb), torch.arange(500) // 50, cfg, None
    )
    check_row(row, brute(a.numpy(), b.numpy(), wa.numpy(), wb.numpy(), cfg))


def test_rate_intervals_equal_a_resampling_loop():
    """The bootstrap interval of pass-through with fixed partners against a loop over the same
    resamples recomputing each fixed pair's Pearson on the drawn contexts' tokens."""
    a = random_dense(400, 5)
    b = a.clone()
    b[:, 8:] = random_dense(400, 6)[:, 8:]  # features 0..7 pass exactly, the rest do not
    b[:200, 3] *= 0.5  # feature 3 passes in half the contexts only
    ctx = torch.arange(400) // 40
    up, down = codes_of(a, 0, torch.eye(D_SAE)), codes_of(b, 1, torch.eye(D_SAE))
    partner = torch.arange(D_SAE)
    alive = (a > 0).any(0)
    bs = Bootstrap(10, 200, seed=7)
    got = rate_intervals(partner_sums(up, down, partner, ctx), alive, {"pt": (0.95, True)}, bs)[
        "pt"
    ]
    draws = resample_indices(10, 200, 7)

    def share(rows: np.ndarray) -> float:
        x, y = a.numpy()[rows].astype(np.float64), b.numpy()[rows].astype(np.float64)
        r = []
        for i in np.nonzero(alive.numpy())[0]:
            sx, sy = x[:, i].std(), y[:, i].std()
            cov = ((x[:, i] - x[:, i].mean()) * (y[:, i] - y[:, i].mean())).mean()
            r.append(cov / (sx * sy) if sx > 0 and sy > 0 else -np.inf)
        return float(np.mean(np.array(r) >= 0.95))

    values = [share(np.concatenate([np.arange(40 * c, 40 * c + 40) for c in row])) for row in draws]
    t = share(np.arange(400))  # the full-data share: the interval's centre
    low, high = np.percentile(values, [2.5, 97.5])
    h = max(high - t, t - low)  # symmetric about t, reaching both percentiles
    assert got is not None
    assert got.low == pytest.approx(max(t - h, 0), abs=1e-12)
    assert got.high == pytest.approx(min(t + h, 1), abs=1e-12)
    assert 0 < got.low <= t <= got.high < 1


def random_sae(
    d: int, layer: int, normalize: str = "standardize", seed: int = 0
) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(
        SaeConfig(
            d_in=d,
            expansion_factor=2,
            k=6,
            normalize=normalize,  # type: ignore[arg-type]
            layers=[layer],
            model="tiny",
            dataset="tiny",
        )
    )
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    return sae.eval()


def plain_killed(model, ids, used, layer, sae_up, sae_down, i, features, drop):
    """Full forward passes with a plain hook subtracting feature i's model-space term from
    block `layer`'s output: killed event counts per feature [F] and active counts."""
    blocks = get_blocks(model)
    seen = {}

    def edit(_m, _inp, out):
        h = block_output(out).clone()
        x = h[used]
        u = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)
        pre = torch.relu((u - sae_up.b_dec) @ sae_up.W_enc + sae_up.b_enc)
        v, j = pre.topk(sae_up.cfg.k, dim=1)
        a = (v * (j == i)).sum(1) * (x.std(1) + 1e-5)
        h[used] = x - a[:, None] * sae_up.W_dec[i]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def grab(_m, _inp, out):
        seen["h"] = block_output(out)

    def down_acts(x):
        std = x.std(1, keepdim=True) + 1e-5
        u = (x - x.mean(1, keepdim=True)) / std
        pre = torch.relu((u - sae_down.b_dec) @ sae_down.W_enc + sae_down.b_enc)
        v, j = pre.topk(sae_down.cfg.k, dim=1)
        dense = torch.zeros_like(pre).scatter_(1, j, v) * std
        return dense[:, features]

    with torch.no_grad():
        g = blocks[layer + 1].register_forward_hook(grab)
        model(input_ids=ids)
        base = down_acts(seen["h"][used])
        e = blocks[layer].register_forward_hook(edit)
        model(input_ids=ids)
        after = down_acts(seen["h"][used])
        e.remove()
        g.remove()
    active = base > 0
    return (active & (after <= (1 - drop) * base)).sum(0), active.sum(0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_check_equals_plain_hooks(arch, tokenizer):
    model = make_model(arch, len(tokenizer), n_layers=3)
    ids = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    used = torch.ones_like(ids, dtype=torch.bool)
    used[:, 0] = False
    layer = 0
    # the same weights at both layers: block 1 adds a small update, so features pass and drop
    sae_up, sae_down = random_sae(32, 0, seed=1), random_sae(32, 1, seed=1)
    features = torch.arange(0, 64, 8)
    preds = {"self": features, "other": torch.arange(8, 16) % 5}
    nxt = NextBlock(model, ids, layer)
    killed, active, _ = killed_fractions(nxt, used, sae_up, sae_down, features, preds, 0.5, True)
    for kind, p in preds.items():
        for n in range(len(features)):
            want_k, want_a = plain_killed(
                model, ids, used, layer, sae_up, sae_down, int(p[n]), features[n : n + 1], 0.5
            )
            assert int(active[kind][n]) == int(want_a[0])
            assert int(killed[kind][n]) == int(want_k[0])
    assert sum(int(k.sum()) for k in killed.values()) > 0  # the check can see a drop


def test_causal_check_identity_block_kills_a_passing_feature(tokenizer):
    """Block l+1 made the identity (attention and MLP outputs zeroed) and the same SAE at both
    layers with an orthonormal decoder and its transpose as encoder: removing a feature's term
    from block l's output switches the feature off at l+1 on every token (100%)."""
    model = make_model("llama", len(tokenizer), n_layers=3)
    block = get_blocks(model)[1]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()  # type: ignore[union-attr]
        block.mlp.down_proj.weight.zero_()  # type: ignore[union-attr]
    sae = SparseAutoencoder(
        SaeConfig(
            d_in=32,
            expansion_factor=1,
            k=4,
            normalize="none",
            layers=[0],
            model="tiny",
            dataset="tiny",
        )
    )
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    ids = torch.randint(0, 200, (4, 24), generator=torch.Generator().manual_seed(1))
    used = torch.ones_like(ids, dtype=torch.bool)
    nxt = NextBlock(model, ids, 0)
    features = torch.arange(32)
    killed, active, _ = killed_fractions(
        nxt, used, sae, sae, features, {"self": features}, 0.5, True
    )
    on = active["self"] > 0
    assert int(on.sum()) >= 4
    assert torch.equal(killed["self"][on], active["self"][on])
    other = {"other": (features + 1) % 32}  # another feature's removal leaves j untouched
    killed, active, _ = killed_fractions(nxt, used, sae, sae, features, other, 0.5, True)
    assert int(killed["other"].sum()) == 0


def test_commands_on_a_tiny_model(tmp_path, tokenizer):
    """`mlsae controls measures|causal` end to end: every row's rates match a dense
    recomputation from the cache, the JSON files are written, bad input is one error."""
    from mlsae.activations.cache import ActivationCache
    from mlsae.cli.app import app

    _, mdir, _ = model_with_test_cache(tmp_path, "llama", tokenizer, 32)
    cache = tmp_path / "cache_test"
    for name, seed in (("run", 0), ("seed", 10)):
        for ly in range(3):
            sae = random_sae(32, ly, seed=seed + ly)
            sae.cfg.model = mdir
            sae.save(tmp_path / name / f"layer_{ly:02d}")
    runner = CliRunner()
    out = tmp_path / "m.json"
    r = runner.invoke(
        app,
        [
            "controls",
            "measures",
            str(tmp_path / "run"),
            "--cache",
            str(cache),
            "--seed-run",
            str(tmp_path / "seed"),
            "--pair-layers",
            "0",
            "--gaps",
            "2",
            "--resamples",
            "50",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    body = json.loads(out.read_text())
    kinds = [row["kind"] for row in body["rows"]]
    assert kinds == ["seed", "observed", "perm_context", "perm_global", "gap_2"]
    assert {v["control"] for v in body["verdicts"]} == {
        "seed",
        "perm_context",
        "perm_global",
        "gap_2",
    }
    src = ActivationCache(cache)
    blocks = list(src.iter_ordered())
    x = torch.cat([b.activations for b in blocks]).float()
    m = torch.cat([b.mask for b in blocks])
    cfg = EvolutionConfig()

    @torch.no_grad()
    def dense(sae):
        enc = sae.encode(x[:, sae.cfg.layers[0]][m])
        return torch.zeros(len(enc.top_acts), sae.cfg.d_sae).scatter_(
            1, enc.top_indices, enc.top_acts * enc.std
        )

    from mlsae.sae.folders import load_sae

    saes = {ly: load_sae(tmp_path / "run" / f"layer_{ly:02d}") for ly in range(3)}
    for kind, other in (("observed", saes[1]), ("gap_2", saes[2])):
        row = body["rows"][kinds.index(kind)]
        want = brute(
            dense(saes[0]).double().numpy(),
            dense(other).double().numpy(),
            saes[0].W_dec.detach().numpy(),
            other.W_dec.detach().numpy(),
            cfg,
        )
        assert row["pass_through"] == pytest.approx(want["pass_through"], abs=1e-12)
        assert row["appear"] == pytest.approx(want["appear"], abs=1e-12)
        assert row["best_pearson"]["p50"] == pytest.approx(want["p50"], rel=1e-4, abs=1e-5)
        low, high = row["intervals"]["disappear"]
        assert low <= high and not math.isnan(low)
    out2 = tmp_path / "c.json"
    r = runner.invoke(
        app,
        [
            "controls",
            "causal",
            str(tmp_path / "run"),
            "--cache",
            str(cache),
            "--pair-layers",
            "0,1",
            "--causal-contexts",
            "2",
            "--causal-features",
            "5",
            "--min-support",
            "2",
            "--resamples",
            "50",
            "--out",
            str(out2),
        ],
    )
    assert r.exit_code == 0, r.output
    pairs = json.loads(out2.read_text())["pairs"]
    assert [(p["up_layer"], p["n_features"]) for p in pairs] == [(0, 5), (1, 5)]
    assert all(0 <= v <= 1 for p in pairs for v in p["rates"].values())
    r = runner.invoke(
        app,
        [
            "controls",
            "measures",
            str(tmp_path / "run"),
            "--cache",
            str(cache),
            "--pair-layers",
            "7",
            "--out",
            str(tmp_path / "bad.json"),
        ],
    )
    assert r.exit_code != 0 and not (tmp_path / "bad.json").exists()
    assert ControlsConfig().gaps == [2, 4, 8]


def test_verdict_needs_apart_intervals():
    from mlsae.core.bootstrap import Interval
    from mlsae.evolution.controls import verdict

    assert verdict(Interval(0.2, 0.3), Interval(0.0, 0.1)) == "above"
    assert verdict(Interval(0.0, 0.1), Interval(0.2, 0.3)) == "below"
    assert verdict(Interval(0.0, 0.2), Interval(0.2, 0.3)) == "inconclusive"
    assert verdict(None, Interval(0.2, 0.3)) == "inconclusive"
