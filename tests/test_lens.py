"""Tuned lens: exact inverse, block-index convention, training, evaluation, tuned-lens import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlsae.core.bootstrap import resample_indices
from mlsae.core.errors import MlsaeError
from mlsae.data.capture import capture
from mlsae.lens.evaluate import evaluate_lens
from mlsae.lens.train import regression_init, train_lens
from mlsae.lens.tuned import TunedLens, identity_lens, load_lens
from mlsae.report.tables import lens_table

L, D = 3, 32  # conftest N_LAYERS, D_MODEL


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread is ~20x faster than two on a shared, loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_lens(n_layers: int, d: int, scale: float = 0.3, seed: int = 0) -> TunedLens:
    """A lens with dense (non-diagonal) random A_l and random c_l."""
    g = torch.Generator().manual_seed(seed)
    lens = TunedLens(n_layers, d)
    for layer in lens.trained_layers:
        a = scale * torch.randn(d, d, generator=g) / d**0.5
        lens._set(layer, a, torch.randn(d, generator=g))
    return lens


def _ids(tok, b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    ids[:, 0] = tok.bos_token_id
    ids[0, 10] = tok.eos_token_id
    return ids


def _special(tok) -> list[int]:
    return [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]


def _final_norm_and_head(model):
    """Independent lookup of the final norm and lm_head (not via mlsae.data.capture)."""
    norm = {
        "gpt_neox": lambda: model.gpt_neox.final_layer_norm,
        "llama": lambda: model.model.norm,
        "gpt2": lambda: model.transformer.ln_f,
    }[model.config.model_type]()
    return norm, model.lm_head if hasattr(model, "lm_head") else model.embed_out


# ------------------------------------------------------------------ exact inverse


@torch.no_grad()
def test_inverse_is_exact_for_dense_A() -> None:
    lens = _random_lens(4, 16)
    h = torch.randn(5, 7, 16)
    for layer in range(4):
        z = lens(h, layer)
        assert torch.allclose(lens.inverse(z, layer), h, atol=1e-5)
    # independent check of T and of the inverse with numpy
    a, c = lens.A(1).detach().numpy().astype(np.float64), lens.c(1).detach().numpy()
    z = lens(h, 1).numpy().astype(np.float64)
    np.testing.assert_allclose(z, h.numpy() @ (np.eye(16) + a).T + c, atol=1e-5)
    np.testing.assert_allclose(
        lens.inverse(torch.from_numpy(z), 1).numpy(),
        (z - c) @ np.linalg.inv(np.eye(16) + a).T,
        atol=1e-9,
    )
    # the paper's fault: an element-wise product with the diagonal of the inverse is wrong
    diag_inv = torch.tensor(np.diag(np.linalg.inv(np.eye(16) + a)), dtype=torch.float32)
    assert (((lens(h, 1) - lens.c(1).detach()) * diag_inv) - h).abs().max() > 1e-2


def test_inverse_follows_parameter_updates() -> None:
    lens = _random_lens(3, 8)
    h = torch.randn(10, 8)
    with torch.inference_mode():  # fills the LU cache inside inference mode (as cache.py does)
        assert torch.allclose(lens.inverse(lens(h, 0), 0), h, atol=1e-5)
    assert torch.allclose(lens.inverse(lens(h, 0), 0), h, atol=1e-5)  # z requires grad here
    with torch.no_grad():
        lens.translators["0"].weight.add_(0.1 * torch.randn(8, 8))
    assert torch.allclose(lens.inverse(lens(h, 0), 0), h, atol=1e-5)


def test_ill_conditioned_translator_raises() -> None:
    lens = TunedLens(3, 8)
    lens._set(0, -torch.eye(8) + torch.diag(torch.tensor([1.0] * 7 + [1e-8])), None)
    with pytest.raises(MlsaeError, match="ill-conditioned"):
        lens.inverse(torch.randn(2, 8), 0)
    lens._set(1, -torch.eye(8), None)  # singular
    with pytest.raises(MlsaeError, match="ill-conditioned"):
        lens.inverse(torch.randn(2, 8), 1)


# ------------------------------------------------------------------ index convention


def test_last_block_is_identity_and_layers_match_block_outputs(tiny_model, tokenizer) -> None:
    model = tiny_model
    lens = _random_lens(L, D)
    assert sorted(lens.translators) == ["0", "1"]  # no parameters for the last block
    ids = _ids(tokenizer)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        xs = capture(model, ids, list(range(L)))  # [B, T, L, d]
        assert torch.equal(lens(xs[:, :, L - 1], L - 1), xs[:, :, L - 1])
        assert torch.equal(lens.inverse(xs[:, :, L - 1], L - 1), xs[:, :, L - 1])
        norm, head = _final_norm_and_head(model)
        logit = identity_lens(L, D)
        for layer in range(L - 1):
            x = out.hidden_states[layer + 1]  # output of block `layer` (index 0: embeddings)
            assert torch.allclose(xs[:, :, layer], x, atol=1e-6)
            ref = head(norm(x))
            assert torch.allclose(logit.logits(model, x, layer), ref, atol=1e-5)
            a, c = lens.A(layer), lens.c(layer)
            ref_t = head(norm(x + x @ a.T + c))
            assert torch.allclose(lens.logits(model, x, layer), ref_t, atol=1e-5)
            assert not torch.allclose(ref_t, ref, atol=1e-3)  # the translator does something
        # last block: the lens is the model's own output distribution
        assert torch.allclose(lens.logits(model, xs[:, :, L - 1], L - 1), out.logits, atol=1e-5)


# ------------------------------------------------------------------ training / evaluation


@torch.no_grad()
def _manual_eval(model, lens: TunedLens, ids: torch.Tensor, special: list[int]) -> dict:
    """Independent float64 reference: hidden_states[l+1], explicit softmax, loops over tokens."""
    out = model(input_ids=ids, output_hidden_states=True)
    norm, head = _final_norm_and_head(model)
    p = torch.softmax(out.logits.double(), -1)  # [B, T, V]
    used = ~torch.isin(ids, torch.tensor(special))
    res = {"tuned": {"kl": [], "ce": []}, "logit": {"kl": [], "ce": []}}
    for layer in range(L):
        x = out.hidden_states[layer + 1] if layer < L - 1 else None
        for kind in ("tuned", "logit"):
            if x is None:
                logits = out.logits
            elif kind == "tuned":
                logits = head(norm(x + x @ lens.A(layer).T + lens.c(layer)))
            else:
                logits = head(norm(x))
            q = torch.softmax(logits.double(), -1)
            kls, ces = [], []
            res[kind].setdefault("kl_ctx", []).append([])  # per context: [sum, positions]
            for b in range(ids.shape[0]):
                res[kind]["kl_ctx"][-1].append([0.0, 0])
                for t in range(ids.shape[1]):
                    if not used[b, t]:
                        continue
                    kls.append(float((p[b, t] * (p[b, t].log() - q[b, t].log())).sum()))
                    res[kind]["kl_ctx"][-1][-1][0] += kls[-1]
                    res[kind]["kl_ctx"][-1][-1][1] += 1
                    if t + 1 < ids.shape[1]:
                        ces.append(-float(q[b, t, ids[b, t + 1]].log()))
            res[kind]["kl"].append(sum(kls) / len(kls))
            res[kind]["ce"].append(sum(ces) / len(ces))
    return res


def test_evaluation_matches_independent_computation(tiny_model, tokenizer) -> None:
    lens = _random_lens(L, D, scale=0.5, seed=3)
    ids = _ids(tokenizer, b=3, t=20, seed=1)
    got = evaluate_lens(tiny_model, lens, [ids[:2], ids[2:]], _special(tokenizer), progress=False)
    ref = _manual_eval(tiny_model, lens, ids, _special(tokenizer))
    assert got.layers == list(range(L))
    for kind in ("tuned", "logit"):
        for key in ("kl", "ce"):
            np.testing.assert_allclose(
                getattr(getattr(got, kind), key), ref[kind][key], rtol=1e-4, atol=1e-7
            )
    assert got.tuned.kl[0] != pytest.approx(got.logit.kl[0])
    assert got.n_kl_positions == 3 * 20 - 4
    # the KL intervals: a brute-force percentile bootstrap over the 3 contexts, same draws
    assert got.intervals is not None and got.intervals.bootstrap.n_contexts == 3
    draws = resample_indices(3, got.intervals.bootstrap.n_resamples, 0)
    for kind, ivs in (("tuned", got.intervals.kl_tuned), ("logit", got.intervals.kl_logit)):
        for layer in range(L):
            ctx = np.array(ref[kind]["kl_ctx"][layer])  # [3, 2]
            vals = [ctx[d, 0].sum() / ctx[d, 1].sum() for d in draws]
            iv = ivs[layer]
            assert iv is not None
            lo, hi = np.percentile(vals, [2.5, 97.5])
            assert iv.low == pytest.approx(lo, rel=1e-4, abs=1e-7)
            assert iv.high == pytest.approx(hi, rel=1e-4, abs=1e-7)
    # ... and of the mean KL over the trained layers (all but the last), the same draws
    for kind, iv in (("tuned", got.intervals.mean_tuned), ("logit", got.intervals.mean_logit)):
        ctx = [np.array(ref[kind]["kl_ctx"][layer]) for layer in range(L - 1)]
        vals = [np.mean([c[d, 0].sum() / c[d, 1].sum() for c in ctx]) for d in draws]
        lo, hi = np.percentile(vals, [2.5, 97.5])
        assert iv is not None and iv.low == pytest.approx(lo, rel=1e-4, abs=1e-7)
        assert iv.high == pytest.approx(hi, rel=1e-4, abs=1e-7)
        mean = getattr(got, f"mean_kl_{kind}")
        assert mean == pytest.approx(np.mean(ref[kind]["kl"][: L - 1]), rel=1e-4, abs=1e-7)
    assert "mean KL over the trained layers" in got.table() and "mean" in lens_table(got)
    assert got.model_ce == pytest.approx(ref["logit"]["ce"][-1], rel=1e-5, abs=1e-6)


def test_closed_form_gradient_matches_autograd(tiny_model, tokenizer) -> None:
    from mlsae.lens.train import _kl_backward

    lens = _random_lens(L, D, seed=5)
    with torch.no_grad():
        x = capture(tiny_model, _ids(tokenizer), list(range(L)))[0]  # [T, L, d]
        logp = torch.log_softmax(tiny_model(input_ids=_ids(tokenizer)).logits[0].double(), -1)
    p = logp.exp()
    tiny_model.requires_grad_(False)
    got = _kl_backward(
        tiny_model, lambda h: lens(h, 1), x[:, 1], p.float(), (p * logp).sum().float(), 0.5
    )
    ga, gc = lens.A(1).grad.clone(), lens.c(1).grad.clone()
    # reference: plain autograd of 0.5 * sum KL(p || q) in float64
    norm, head = _final_norm_and_head(tiny_model)
    a = lens.A(1).detach().double().requires_grad_(True)
    c = lens.c(1).detach().double().requires_grad_(True)
    h = x[:, 1].double()
    norm64, head64 = norm.double(), head.double()
    logq = torch.log_softmax(head64(norm64(h + h @ a.T + c)), -1)
    ref = 0.5 * (p * (logp - logq)).sum()
    ref.backward()
    norm.float(), head.float()
    assert got == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    assert torch.allclose(ga.double(), a.grad, rtol=1e-3, atol=1e-6)
    assert torch.allclose(gc.double(), c.grad, rtol=1e-3, atol=1e-6)
    assert float(a.grad.abs().max()) > 1e-4


def test_preconditioned_parametrisation_is_the_same_affine_map() -> None:
    from mlsae.lens.train import _Preconditioned

    lens = _random_lens(3, 16, seed=2)
    x = torch.randn(40, 16) * torch.linspace(0.1, 50, 16) + 3.0  # very unequal dimensions
    pre = _Preconditioned(x, lens.A(0), lens.c(0))
    a, c = pre.affine()
    assert torch.allclose(a, lens.A(0), atol=1e-5) and torch.allclose(c, lens.c(0), atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(pre(x), lens(x, 0), rtol=1e-5, atol=1e-3)
        pre.B.add_(0.01)
        u = (x - pre.mu) / pre.s  # independent: T(h) = h + A h + c + s * 0.01 * sum_j u_j
        ref = x + x @ lens.A(0).T + lens.c(0) + pre.s * 0.01 * u.sum(1, keepdim=True)
        assert torch.allclose(pre(x), ref, rtol=1e-4, atol=1e-3)
        a, c = pre.affine()
        assert torch.allclose(pre(x), x + x @ a.T + c, rtol=1e-4, atol=1e-3)


def test_regression_init_is_weighted_least_squares(tiny_model, tokenizer) -> None:
    ids = _ids(tokenizer, b=4, t=32, seed=4)
    lens = TunedLens(L, D)
    n = regression_init(
        tiny_model,
        lens,
        [ids[:2], ids[2:]],
        _special(tokenizer),
        ridge=0.0,
        min_singular=0.0,
        progress=False,
    )
    used = ~torch.isin(ids, torch.tensor(_special(tokenizer)))
    assert n == int(used.sum())
    with torch.no_grad():
        hs = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        last = capture(tiny_model, ids, [L - 1])[:, :, 0]  # before the final norm
    y = last[used].double().numpy()
    sw = 1 / np.sqrt((y**2).mean(1, keepdims=True))  # sqrt of the token weights
    for layer in range(L - 1):
        x = hs[layer + 1][used].double().numpy()
        design = np.concatenate([x, np.ones((len(x), 1))], 1) * sw
        beta = np.linalg.lstsq(design, (y - x) * sw, rcond=None)[0]  # [d+1, d]
        np.testing.assert_allclose(lens.A(layer).detach().numpy(), beta[:D].T, atol=2e-4)
        np.testing.assert_allclose(lens.c(layer).detach().numpy(), beta[D], atol=2e-4)
    # a floor on the singular values of I + A (then c = weighted mean of y - x - A x)
    sv0 = np.linalg.svd(np.eye(D) + lens.A(0).detach().numpy(), compute_uv=False)
    floor = 0.5 * float(sv0.max())
    assert sv0.min() < floor  # the floor binds
    regression_init(
        tiny_model,
        lens,
        [ids[:2], ids[2:]],
        _special(tokenizer),
        ridge=0.0,
        min_singular=floor,
        progress=False,
    )
    w = (sw**2)[:, 0]
    for layer in range(L - 1):
        a = lens.A(layer).detach().double().numpy()
        sv = np.linalg.svd(np.eye(D) + a, compute_uv=False)
        assert sv.min() >= floor * (1 - 1e-5)
        x = hs[layer + 1][used].double().numpy()
        c_ref = (w[:, None] * (y - x - x @ a.T)).sum(0) / w.sum()
        np.testing.assert_allclose(lens.c(layer).detach().numpy(), c_ref, atol=2e-4)


def test_training_reduces_kl(tiny_model, tokenizer) -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (12, 32), generator=g)
    test = torch.randint(0, 256, (4, 32), generator=g)
    lens = TunedLens(L, D)
    run = train_lens(
        tiny_model,
        lens,
        train,
        _special(tokenizer),
        steps=25,
        batch_size=4,
        lr=1e-2,
        progress=False,
    )
    hist = run.history
    assert len(hist) == 25 and run.stop_reason == "max steps (25)"  # no held-out: full budget
    assert hist[-1] < 0.7 * hist[0]
    assert all(p.grad is None for p in tiny_model.parameters())  # the model is not trained
    res = evaluate_lens(tiny_model, lens, [test], _special(tokenizer), progress=False)
    for i in range(L - 1):  # held-out tokens
        assert res.tuned.kl[i] < res.logit.kl[i]
    assert res.tuned.kl[L - 1] == res.logit.kl[L - 1] == pytest.approx(0, abs=1e-6)
    # the regression warm start alone also beats the logit lens on held-out tokens
    warm = TunedLens(L, D)
    regression_init(tiny_model, warm, [train], _special(tokenizer), progress=False)
    res = evaluate_lens(tiny_model, warm, [test], _special(tokenizer), progress=False)
    for i in range(L - 1):
        assert res.tuned.kl[i] < res.logit.kl[i]


def test_kl_training_beats_the_warm_start_on_held_out_tokens(tiny_model, tokenizer) -> None:
    """The default: regression warm start, then KL steps stopped on held-out contexts; every
    block keeps its best held-out translator (checked with evaluate_lens, another code path)."""
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (12, 32), generator=g)
    hold = torch.randint(0, 256, (3, 32), generator=g)
    sp = _special(tokenizer)
    lens = TunedLens(L, D)  # warm start fitted on one context: room for the KL steps
    regression_init(tiny_model, lens, [train[:1]], sp, progress=False)
    warm = evaluate_lens(tiny_model, lens, [hold], sp, progress=False).tuned.kl
    run = train_lens(
        tiny_model,
        lens,
        train,
        sp,
        steps=40,
        batch_size=4,
        lr=1e-2,
        holdout=hold,
        eval_every=5,
        patience=2,
        progress=False,
    )
    after = evaluate_lens(tiny_model, lens, [hold], sp, progress=False).tuned.kl
    assert run.heldout_steps[0] == 0 and run.heldout_kl[0] == pytest.approx(
        sum(warm[: L - 1]) / (L - 1), rel=1e-4, abs=1e-6
    )
    for i in range(L - 1):
        assert after[i] == pytest.approx(run.best_kl[i], rel=1e-4, abs=1e-6)  # the kept translator
        assert after[i] < 0.9 * warm[i]  # KL training lowered the held-out KL
    js = run.to_json()
    assert (
        js["steps_run"] == len(run.history) and js["heldout_kl_best"] < js["heldout_kl_warm_start"]
    )


def test_early_stopping_keeps_the_warm_start_when_training_hurts(tiny_model, tokenizer) -> None:
    g = torch.Generator().manual_seed(2)
    train = torch.randint(0, 256, (8, 32), generator=g)
    hold = torch.randint(0, 256, (2, 32), generator=g)
    sp = _special(tokenizer)
    lens = TunedLens(L, D)
    regression_init(tiny_model, lens, [train], sp, progress=False)
    warm_a = {i: lens.A(i).detach().clone() for i in range(L - 1)}
    run = train_lens(
        tiny_model,
        lens,
        train,
        sp,
        steps=100,
        batch_size=2,
        lr=3.0,
        holdout=hold,
        eval_every=2,
        patience=2,
        progress=False,
    )  # (lr 3 in standardised coordinates: every step makes the lens worse)
    assert "no block improved in 2 evaluations" in run.stop_reason
    assert len(run.history) == 4 and run.heldout_steps == [0, 2, 4]
    assert all(s == 0 for s in run.best_step.values())
    for i in range(L - 1):
        assert torch.allclose(lens.A(i), warm_a[i], atol=1e-5)  # (up to the reparametrisation)


def test_no_singular_value_floor_unless_asked(tiny_model, tokenizer) -> None:
    from mlsae.core.stage_config import LensTrainConfig

    assert LensTrainConfig().min_singular is None
    ids = _ids(tokenizer, b=4, t=32, seed=4)
    sp = _special(tokenizer)
    default, zero, floored = TunedLens(L, D), TunedLens(L, D), TunedLens(L, D)
    regression_init(tiny_model, default, [ids], sp, progress=False)
    regression_init(tiny_model, zero, [ids], sp, min_singular=0.0, progress=False)
    regression_init(tiny_model, floored, [ids], sp, min_singular=0.9, progress=False)
    sv = lambda lens, i: np.linalg.svd(
        np.eye(D) + lens.A(i).detach().double().numpy(), compute_uv=False
    )
    assert min(sv(default, i).min() for i in range(L - 1)) < 0.9  # a floor would bind
    for i in range(L - 1):
        assert torch.equal(default.A(i), zero.A(i))
        assert sv(floored, i).min() >= 0.9 * (1 - 1e-5)


def test_floor_singular_values_is_numpys_clamped_svd() -> None:
    from mlsae.lens.train import floor_singular_values

    g = torch.Generator().manual_seed(7)
    a = 0.8 * torch.randn(12, 12, generator=g) / 12**0.5 - 0.5 * torch.eye(12)
    u, sv, vh = np.linalg.svd(np.eye(12) + a.double().numpy())
    assert sv.min() < 0.5  # the floor binds
    got = floor_singular_values(a, 0.5)
    assert got is not None
    ref = (u * np.maximum(sv, 0.5)) @ vh - np.eye(12)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-10)
    assert floor_singular_values(a, float(sv.min()) * 0.99) is None  # nothing to raise
    assert floor_singular_values(a, float(sv.min()) * 1.001) is not None  # just binds


def test_cap_condition_is_numpys_clamped_svd() -> None:
    from mlsae.lens.train import cap_condition, condition_translator

    g = torch.Generator().manual_seed(8)
    a = torch.diag(torch.linspace(-0.9, 20.0, 10)) + 0.1 * torch.randn(10, 10, generator=g)
    u, sv, vh = np.linalg.svd(np.eye(10) + a.double().numpy())
    assert sv.max() / sv.min() > 10  # the cap binds
    got = cap_condition(a, 10.0)
    assert got is not None
    ref = (u * np.maximum(sv, sv.max() / 10)) @ vh - np.eye(10)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-10)
    assert np.linalg.cond(np.eye(10) + got.numpy()) == pytest.approx(10.0, rel=1e-6)
    assert cap_condition(a, 1.01 * sv.max() / sv.min()) is None
    both = condition_translator(a, 0.5, 10.0)  # the floor (0.5 < largest / 10) does not bind
    assert both is not None
    np.testing.assert_allclose(both.numpy(), ref, rtol=1e-9, atol=1e-10)
    assert condition_translator(a, None, None) is None


def test_cond_cap_through_the_kl_steps(tiny_model, tokenizer) -> None:
    """With --cond-cap every translator keeps cond(I + A) <= the cap after the warm start and
    the KL steps (numpy's condition number); without the projection in the steps it is exceeded."""
    g = torch.Generator().manual_seed(4)
    train = torch.randint(0, 256, (8, 32), generator=g)
    sp = _special(tokenizer)
    cap = 1.5
    cond = lambda lens, i: np.linalg.cond(np.eye(D) + lens.A(i).detach().double().numpy())
    lenses = {}
    for keep in (False, True):
        lens = TunedLens(L, D)
        regression_init(tiny_model, lens, [train], sp, max_cond=cap, progress=False)
        assert max(cond(lens, i) for i in range(L - 1)) <= cap * (1 + 1e-5)
        run = train_lens(
            tiny_model,
            lens,
            train,
            sp,
            steps=15,
            batch_size=4,
            lr=5e-2,
            progress=False,
            max_cond=cap if keep else None,
        )
        assert (run.floor_projections > 0) == keep
        lenses[keep] = lens
    assert max(cond(lenses[False], i) for i in range(L - 1)) > cap * 1.01
    for i in range(L - 1):
        assert cond(lenses[True], i) <= cap * (1 + 1e-4)


def test_keep_floor_through_the_kl_steps(tiny_model, tokenizer) -> None:
    """With the floor kept, every translator's I + A has singular values >= the floor after
    the KL steps (checked with numpy's SVD); without it the same steps go below it."""
    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (8, 32), generator=g)
    hold = torch.randint(0, 256, (2, 32), generator=g)
    sp = _special(tokenizer)
    floor = 0.9
    svmin = lambda lens, i: np.linalg.svd(
        np.eye(D) + lens.A(i).detach().double().numpy(), compute_uv=False
    ).min()
    lenses = {}
    for keep in (False, True):
        lens = TunedLens(L, D)
        regression_init(tiny_model, lens, [train], sp, min_singular=floor, progress=False)
        assert min(svmin(lens, i) for i in range(L - 1)) >= floor * (1 - 1e-5)
        run = train_lens(
            tiny_model,
            lens,
            train,
            sp,
            steps=20,
            batch_size=4,
            lr=5e-2,
            holdout=hold,
            eval_every=1,
            patience=20,
            progress=False,
            min_singular=floor if keep else None,
        )
        assert (run.floor_projections > 0) == keep
        lenses[keep] = lens
    assert min(svmin(lenses[False], i) for i in range(L - 1)) < floor * 0.99
    for i in range(L - 1):  # the kept (best held-out) translators respect the floor
        assert svmin(lenses[True], i) >= floor * (1 - 1e-4)
        assert lenses[True].cond(i) <= float(
            np.linalg.svd(np.eye(D) + lenses[True].A(i).detach().double().numpy())[1].max()
        ) / floor * (1 + 1e-4)


def test_condition_number_is_numpys() -> None:
    lens = _random_lens(4, 16, scale=0.9, seed=3)
    for layer in range(4):
        m = np.eye(16) + lens.A(layer).detach().double().numpy()
        assert lens.cond(layer) == pytest.approx(np.linalg.cond(m), rel=1e-10)
    assert lens.cond(3) == 1.0  # identity block
    lens._set(0, torch.diag(torch.linspace(-0.99, 3.0, 16)), None)  # known: 4 / 0.01
    assert lens.cond(0) == pytest.approx(400.0, rel=1e-5)


# ------------------------------------------------------------------ files


def test_save_load_roundtrip(tmp_path: Path) -> None:
    lens = _random_lens(5, 8)
    lens = TunedLens(5, 8, layers=[1, 2, 4], model="m", meta={"training": {"lr": 0.1}})
    lens._set(1, torch.randn(8, 8), torch.randn(8))
    lens.save(tmp_path / "lens")
    back = load_lens(tmp_path / "lens")
    assert back.layers == [1, 2, 4] and back.trained_layers == [1, 2]
    assert back.model_name == "m" and back.meta["training"] == {"lr": 0.1}
    assert torch.equal(back.A(1), lens.A(1)) and torch.equal(back.c(1), lens.c(1))
    cfg = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert cfg["identity_layer"] == 4 and cfg["d_model"] == 8
    with pytest.raises(MlsaeError, match="no translator for layer"):
        back(torch.randn(8), 0)
    with pytest.raises(MlsaeError):
        back.check_layers([0, 1])
    with pytest.raises(MlsaeError, match="not a lens folder"):
        load_lens(tmp_path)


def test_tuned_lens_package_import(tmp_path: Path) -> None:
    """Its translator i acts on hidden_states[i]: i = 0 is the embeddings (dropped), i >= 1 is
    the output of block i - 1; the last block has none (identity)."""
    n, d = 4, 6
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = torch.randn(d, d, generator=g)
        state[f"{i}.bias"] = torch.randn(d, generator=g)
    folder = tmp_path / "tl"
    folder.mkdir()
    torch.save(state, folder / "params.pt")
    cfg = {
        "base_model_name_or_path": "EleutherAI/pythia-70m",
        "d_model": d,
        "num_hidden_layers": n,
        "bias": True,
        "lens_type": "linear_tuned_lens",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    lens = load_lens(folder)
    assert lens.n_layers == n and lens.model_name == "EleutherAI/pythia-70m"
    for block in range(n - 1):
        assert torch.equal(lens.A(block), state[f"{block + 1}.weight"])
        assert torch.equal(lens.c(block), state[f"{block + 1}.bias"])
    h = torch.randn(3, d)
    assert torch.equal(lens(h, n - 1), h)
    # h + W h + b, as tuned-lens's transform_hidden computes it
    w, b = state["2.weight"], state["2.bias"]
    assert torch.allclose(lens(h, 1), h + torch.nn.functional.linear(h, w, b), atol=1e-6)
    # older saves prefix the keys; a wrong translator count is an error
    torch.save({f"layer_translators.{k}": v for k, v in state.items()}, folder / "params.pt")
    assert torch.equal(load_lens(folder).A(0), state["1.weight"])
    torch.save({k: v for k, v in state.items() if not k.startswith("3.")}, folder / "params.pt")
    with pytest.raises(MlsaeError, match="expected translators"):
        load_lens(folder)


# ------------------------------------------------------------------ CLI


def test_cli_train_and_evaluate(tmp_path: Path, tokenizer) -> None:
    from conftest import make_model

    from mlsae.cli.app import app

    model_dir = tmp_path / "tiny"
    make_model("gpt_neox", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "lens", "layer", "token", "river", "stone"]
    docs = [" ".join(rng.choice(words, 30)) for _ in range(80)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in docs))
    runner = CliRunner()
    common = ["--model", str(model_dir), "--dataset", str(data), "--context-length", "32"]
    r = runner.invoke(
        app,
        [
            "lens",
            "train",
            "--out",
            str(tmp_path / "lens"),
            "--tokens",
            "256",
            "--steps",
            "4",
            "--lr",
            "1e-2",
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    training = load_lens(tmp_path / "lens").meta["training"]
    assert training["steps"] <= 4 and training["init"] == "regression"
    assert training["regression_positions"] > 0 and training["min_singular"] is None
    assert training["holdout"]["contexts"] == 4 and training["tokens"] == 4 * 32
    assert training["heldout_curve"][0][0] == 0 and training["stop_reason"]
    assert len(training["singular_values"]["cond"]) == 2
    out = tmp_path / "eval.json"
    r = runner.invoke(
        app,
        ["lens", "evaluate", str(tmp_path / "lens"), "--out", str(out), "--tokens", "64", *common],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["layers"] == [0, 1, 2] and res["split"] == "test"
    assert set(res["tuned"]) == set(res["logit"]) == {"kl", "ce"}
    lens = load_lens(tmp_path / "lens")
    want = [np.linalg.cond(np.eye(D) + lens.A(x).detach().double().numpy()) for x in range(L)]
    np.testing.assert_allclose(res["cond"], want, rtol=1e-9)
    assert "KL tuned" in r.output and "cond(I+A)" in r.output
    r = runner.invoke(app, ["lens", "evaluate", str(tmp_path / "nope"), "--out", str(out)])
    assert isinstance(r.exception, MlsaeError)


def test_lens_train_config_defaults_and_bad_values() -> None:
    from mlsae.core.stage_config import LensTrainConfig

    assert LensTrainConfig().lr == 1e-3  # after the regression warm start
    assert LensTrainConfig(init="zero").lr == 1e-3
    assert LensTrainConfig(lr=5e-3).lr == 5e-3
    for bad in (
        {"init": "ones"},
        {"steps": -1},
        {"step_contexts": 0},
        {"lr": 0.0},
        {"ridge": -1.0},
        {"min_singular": 1.0},
        {"init": "zero", "steps": 0},
        {"holdout_contexts": -1},
        {"eval_every": 0},
        {"patience": 0},
        {"keep_floor": True},
        {"keep_floor": True, "min_singular": 0.0},
        {"cond_cap": 0.5},
    ):
        with pytest.raises(MlsaeError):
            LensTrainConfig(**bad)
