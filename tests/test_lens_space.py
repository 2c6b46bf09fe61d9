"""Tuned-lens-space SAEs (SPEC 5) end to end on a tiny Llama: `cache --lens`, `train --lens`
(on the fly), `evaluate` (FVU in both spaces, delta CE through the exact inverse), `analyze
--compare` with and without the lens."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlsae.activations.cache import ActivationCache
from mlsae.activations.extract import build_cache
from mlsae.cli.app import app
from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SaeConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import EvalConfig
from mlsae.eval.evaluate import Entry, evaluate_command, evaluate_entries
from mlsae.lens.tuned import TunedLens, lens_ref, load_lens, resolve_space
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import load_sae

CTX, D, L = 32, 32, 3


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


def _random_lens(seed: int) -> TunedLens:
    """Dense (non-diagonal) A_l and random c_l: a diagonal-only inverse would be wrong."""
    g = torch.Generator().manual_seed(seed)
    lens = TunedLens(L, D)
    for layer in lens.trained_layers:
        lens._set(layer, 0.4 * torch.randn(D, D, generator=g) / D**0.5, torch.randn(D, generator=g))
    return lens


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer) -> Path:
    from conftest import make_model, write_word_corpus

    root = tmp_path_factory.mktemp("lens_space")
    model = make_model("llama", len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_word_corpus(root / "docs.jsonl")
    _random_lens(0).save(root / "lens")
    _random_lens(1).save(root / "lens_b")
    for name, split, lens in (
        ("test", "test", None),
        ("test_lens", "test", root / "lens"),
        ("train", "train", None),
        ("train_lens", "train", root / "lens"),
    ):
        build_cache(
            root / f"cache_{name}",
            Inputs(
                SourceConfig(tokens=8 * CTX, batch_size=4),
                DataConfig(dataset=str(root / "docs.jsonl"), split=split, context_length=CTX),
                ModelConfig(model=str(root / "model")),
            ),
            ExtractConfig(storage_dtype="float32", shard_tokens=2 * CTX),
            lens,
        )
    return root


def _all(cache: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ac = ActivationCache(cache)
    shards = [ac.load_shard(i) for i in range(ac.n_shards)]
    acts = torch.cat([s.activations for s in shards]).float()  # [n, L, d]
    ids = torch.cat([s.token_ids for s in shards]).view(-1, CTX)
    return acts, ids, torch.cat([s.mask for s in shards])


def _np_lens(root: Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) of the saved lens, read independently from the safetensors file."""
    from safetensors.numpy import load_file

    t = load_file(str(root / "lens" / "lens.safetensors"))
    if f"A.{layer}" not in t:  # the last block: identity
        return np.zeros((D, D)), np.zeros(D)
    return t[f"A.{layer}"].astype(np.float64), t[f"c.{layer}"].astype(np.float64)


def _np_forward(root: Path, x: np.ndarray, layer: int) -> np.ndarray:
    a, c = _np_lens(root, layer)
    return x + x @ a.T + c


def _np_inverse(root: Path, z: np.ndarray, layer: int) -> np.ndarray:
    a, c = _np_lens(root, layer)
    return np.linalg.solve(np.eye(D) + a, (z - c).T).T


def test_lens_cache_holds_translated_vectors(root: Path) -> None:
    plain, ids, mask = _all(root / "cache_test")
    lensed, ids2, mask2 = _all(root / "cache_test_lens")
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    for layer in range(L):
        want = _np_forward(root, plain[:, layer].double().numpy(), layer)
        np.testing.assert_allclose(lensed[:, layer].numpy(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(lensed[:, L - 1], plain[:, L - 1])  # identity at the last block
    man = ActivationCache(root / "cache_test_lens").manifest
    assert (
        man["lens"] == lens_ref(root / "lens")
        and ActivationCache(root / "cache_test").manifest["lens"] is None
    )


def _train(root: Path, out: Path, cache: str, *extra: str) -> None:
    args = [
        "train",
        "--cache",
        str(root / cache),
        "--out",
        str(out),
        "--expansion-factor",
        "2",
        "-k",
        "4",
        "--batch-tokens",
        "64",
        "--lr",
        "1e-3",
        "--compute-dtype",
        "float32",
        "--epochs",
        "2",
        *extra,
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output


def test_train_on_the_fly_equals_training_on_a_lens_cache(root: Path, tmp_path: Path) -> None:
    _train(root, tmp_path / "fly", "cache_train", "--lens", str(root / "lens"))
    _train(root, tmp_path / "stored", "cache_train_lens")
    a, b = load_sae(tmp_path / "fly" / "sae"), load_sae(tmp_path / "stored" / "sae")
    assert a.cfg.lens == b.cfg.lens == lens_ref(root / "lens")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-4), name
    _train(root, tmp_path / "plain", "cache_train")  # the lens changes what is learnt
    c = load_sae(tmp_path / "plain" / "sae")
    assert c.cfg.lens is None and not torch.allclose(a.W_enc, c.W_enc, atol=1e-3)


class _Identity:
    """A perfect 'SAE' (x_hat = x) for exactness checks of the lens round trip."""

    token_code = False  # each layer encoded on its own (SparseAutoencoder's default)

    def __init__(self, lens: str) -> None:
        self.cfg = SaeConfig(d_in=D, expansion_factor=1, k=D, layers=list(range(L)), lens=lens)

    def encode(self, x: torch.Tensor, layer: int | None = None) -> SimpleNamespace:
        idx = torch.arange(D).expand(len(x), -1)
        ones = torch.ones(len(x), 1)  # standardised space = the SAE's space: mean 0, std 1
        return SimpleNamespace(
            x=x, top_indices=idx, top_acts=torch.ones_like(x), mean=0 * ones, std=ones, center=None
        )

    def decode(self, enc: SimpleNamespace) -> torch.Tensor:
        return enc.x

    def __call__(
        self, x: torch.Tensor, layer: int | None = None
    ) -> tuple[torch.Tensor, SimpleNamespace]:
        enc = self.encode(x, layer)
        return self.decode(enc), enc


def _diagonal_inverse(self: TunedLens, z: torch.Tensor, layer: int) -> torch.Tensor:
    """The paper code's fault: divide by the diagonal of I + A only."""
    if layer == self.last_layer:
        return z
    d = 1 + torch.diagonal(self.A(layer)).detach()
    return ((z - self.c(layer).detach()) / d).to(z.dtype)


def test_perfect_reconstruction_through_the_lens_has_zero_delta_ce(root, monkeypatch) -> None:
    def run() -> dict:
        sae = _Identity(lens_ref(root / "lens"))
        e = Entry("id", root, sae, list(range(L)), resolve_space(sae.cfg.lens, None))
        evaluate_entries(
            [e],
            ActivationCache(root / "cache_test"),
            model=ModelConfig(model=str(root / "model")),
            batch_size=4,
        )
        return e.result("m")

    r = run()
    assert r.space == "tuned-lens"
    assert max(r.per_layer.fvu_model) < 1e-9 and max(r.per_layer.fvu) < 1e-12
    assert max(abs(v) for v in r.per_layer.delta_ce) < 1e-4
    assert max(r.per_layer.kl) < 1e-4
    monkeypatch.setattr(TunedLens, "inverse", _diagonal_inverse)
    bad = run()  # the known fault is caught: the model sees wrong vectors
    assert min(bad.per_layer.fvu_model[: L - 1]) > 1e-2
    assert min(bad.per_layer.kl[: L - 1]) > 1e-3


@torch.no_grad()
def _reference(root: Path, sae, model) -> dict:
    """FVU in both spaces with numpy and delta CE by a hooked full forward, from the plain
    cache, with the lens applied and inverted by numpy."""
    from conftest import hooked_delta_ce

    acts, ids, mask = _all(root / "cache_test")
    used = mask.view(-1, CTX)
    out: dict = {"fvu": [], "fvu_model": [], "delta_ce": []}

    def recon(h: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        z = _np_forward(root, h, layer)
        z_hat = sae(torch.as_tensor(z, dtype=torch.float32))[0].double().numpy()
        return z, z_hat

    for layer in range(L):
        x = acts[mask][:, layer].double().numpy()
        z, z_hat = recon(x, layer)
        x_hat = _np_inverse(root, z_hat, layer)
        out["fvu"].append(((z - z_hat) ** 2).sum() / ((z - z.mean(0)) ** 2).sum())
        out["fvu_model"].append(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

        def through_lens(h: torch.Tensor, layer: int = layer) -> torch.Tensor:
            return torch.as_tensor(_np_inverse(root, recon(h.double().numpy(), layer)[1], layer))

        out["delta_ce"].append(hooked_delta_ce(model, ids, used, layer, through_lens))
    return out


def test_evaluate_lens_sae_in_both_spaces(root: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = SaeConfig(
        d_in=D,
        expansion_factor=2,
        k=4,
        layers=list(range(L)),
        model=str(root / "model"),
        lens=lens_ref(root / "lens"),
    )
    SparseAutoencoder(cfg, seed=3, compute_dtype=torch.float32).save(tmp_path / "run" / "sae")
    sae = load_sae(tmp_path / "run" / "sae", compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    ref = _reference(root, sae, model)
    results = {}
    for cache in ("cache_test", "cache_test_lens"):  # lens on the fly, or stored
        results[cache] = r = evaluate_command(
            tmp_path / "run",
            tmp_path / f"{cache}.json",
            inputs=Inputs.held_out(source=SourceConfig(cache=root / cache, batch_size=4)),
        )
        assert r.space == "tuned-lens" and r.lens == lens_ref(root / "lens")
        np.testing.assert_allclose(r.per_layer.fvu, ref["fvu"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r.per_layer.fvu_model, ref["fvu_model"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r.per_layer.delta_ce, ref["delta_ce"], rtol=1e-3, atol=1e-5)
    assert results["cache_test"].per_layer.fvu_model != ref["fvu"]  # two spaces differ
    lens = load_lens(root / "lens")  # cond(I + A_l) per layer, checked with numpy
    want = [np.linalg.cond(np.eye(D) + lens.A(x).detach().double().numpy()) for x in range(L)]
    np.testing.assert_allclose(results["cache_test"].per_layer.lens_cond, want, rtol=1e-9)
    # the model path (no cache) agrees as well
    r = evaluate_command(
        tmp_path / "run",
        tmp_path / "m.json",
        inputs=Inputs.held_out(
            source=SourceConfig(tokens=8 * CTX, batch_size=4),
            data=DataConfig(dataset=str(root / "docs.jsonl"), split="test", context_length=CTX),
        ),
    )
    np.testing.assert_allclose(r.per_layer.fvu_model, ref["fvu_model"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.per_layer.delta_ce, ref["delta_ce"], rtol=1e-3, atol=1e-5)


def test_mismatched_lenses_are_refused(root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    plain = SaeConfig(d_in=D, expansion_factor=2, k=4, layers=list(range(L)))
    SparseAutoencoder(plain, seed=0).save(tmp_path / "plain")
    with pytest.raises(MlsaeError, match="cache holds tuned-lens vectors"):
        evaluate_command(
            tmp_path / "plain",
            tmp_path / "e.json",
            inputs=Inputs.held_out(source=SourceConfig(cache=root / "cache_test_lens")),
        )
    with pytest.raises(MlsaeError, match="trained in the model's space"):
        evaluate_command(
            tmp_path / "plain",
            tmp_path / "e.json",
            inputs=Inputs.held_out(source=SourceConfig(cache=root / "cache_test")),
            lens=root / "lens",
        )
    other = SaeConfig(
        d_in=D, expansion_factor=2, k=4, layers=list(range(L)), lens=lens_ref(root / "lens_b")
    )
    SparseAutoencoder(other, seed=0).save(tmp_path / "other")
    with pytest.raises(MlsaeError, match="was built with lens"):
        evaluate_command(
            tmp_path / "other",
            tmp_path / "e.json",
            inputs=Inputs.held_out(source=SourceConfig(cache=root / "cache_test_lens")),
        )
    import sys

    from mlsae import cli

    argv = [
        "mlsae",
        "train",
        "--cache",
        str(root / "cache_train_lens"),
        "--out",
        str(tmp_path / "t"),
        "--lens",
        str(root / "lens_b"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mlsae: error: the cache was built with lens")
    assert not (tmp_path / "t").exists()
    assert not (tmp_path / "e.json").exists()


def test_analyze_compares_with_and_without_the_lens(root: Path, tmp_path: Path) -> None:
    from mlsae.report.analyze import analyze_command

    _train(root, tmp_path / "plain", "cache_train")
    _train(root, tmp_path / "lensed", "cache_train", "--lens", str(root / "lens"))
    test = SourceConfig(cache=root / "cache_test")
    ev = evaluate_command(
        tmp_path / "lensed",
        tmp_path / "lensed" / "eval.json",
        inputs=Inputs.held_out(source=test),
        ev=EvalConfig(ce=False),
    )
    pev = evaluate_command(
        tmp_path / "plain",
        tmp_path / "plain" / "eval.json",
        inputs=Inputs.held_out(source=test),
        ev=EvalConfig(ce=False),
    )
    lens_eval = {
        "layers": [0, 1, 2],
        "tuned": {"kl": [0.5, 0.25, 0.0], "ce": [3.0, 2.5, 2.0]},
        "logit": {"kl": [4.0, 2.0, 0.0], "ce": [6.0, 4.0, 2.0]},
        "cond": [1.0] * 3,
        "model_ce": 2.0,
        "n_kl_positions": 8,
        "n_ce_positions": 7,
    }
    (root / "lens" / "eval.json").write_text(json.dumps(lens_eval))
    try:
        s = analyze_command(
            tmp_path / "plain",
            tmp_path / "a",
            inputs=Inputs.held_out(test),
            compare=[tmp_path / "lensed"],
        ).summary
    finally:
        (root / "lens" / "eval.json").unlink()
    c = s.compare[0]
    assert s.space == "model" and c.space == "tuned-lens"
    # the same lens SAE analysed on the stored lens cache (no on-the-fly transform)
    lens_cache = Inputs.held_out(SourceConfig(cache=root / "cache_test_lens"))
    direct = analyze_command(tmp_path / "lensed", tmp_path / "b", inputs=lens_cache).summary
    for k in (
        "rel_var_latent",
        "rel_var_token",
        "multi_layer_fraction_token",
        "multi_layer_fraction_aggregate",
    ):
        assert getattr(c, k) == pytest.approx(getattr(direct, k), rel=1e-4, abs=1e-6), k
    assert c.rel_var_latent != pytest.approx(s.rel_var_latent, rel=1e-6)
    text = (tmp_path / "a" / "report.html").read_text()
    assert "With the tuned lens vs without" in text and "tuned-lens space" in text
    assert "<h2>Tuned lens</h2>" in text and "eval: fvu_model" in text
    assert f"held-out FVU is {ev.mean.fvu_model:.3g} vs {pev.mean.fvu:.3g}" in text
    assert c.eval_mean is not None and c.eval_mean.fvu_model == pytest.approx(ev.mean.fvu_model)
    assert s.lens_eval is not None and s.lens_eval.result.tuned.kl == lens_eval["tuned"]["kl"]
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved["compare"][0]["space"] == "tuned-lens" and direct.lens_eval is None
    assert saved["lens_eval"]["tuned"]["kl"] == lens_eval["tuned"]["kl"]
    assert load_lens(root / "lens").covers(L - 1)


def test_evolution_of_lens_per_layer_saes(root: Path, tmp_path: Path) -> None:
    from mlsae.core.stage_config import EvolutionConfig
    from mlsae.evolution.run import evolution_command

    _train(root, tmp_path / "pl", "cache_train", "--per-layer", "--lens", str(root / "lens"))
    cfg = EvolutionConfig(top_m=2, min_support=1, memory_gb=0.01, max_nodes_html=30)
    fly = evolution_command(
        tmp_path / "pl",
        tmp_path / "a",
        inputs=Inputs.held_out(source=SourceConfig(cache=root / "cache_test")),
        cfg=cfg,
    )
    stored = evolution_command(
        tmp_path / "pl",
        tmp_path / "b",
        inputs=Inputs.held_out(source=SourceConfig(cache=root / "cache_test_lens")),
        cfg=cfg,
    )
    for p, q in zip(fly.pairs, stored.pairs, strict=True):
        for k in ("pass_through", "appear", "disappear"):
            assert getattr(p, k) == pytest.approx(getattr(q, k), abs=1e-6), k
    for p, q in zip(fly.match, stored.match, strict=True):
        for k in ("matched", "matched_target_scale", "unpermuted", "own", "identity_fraction"):
            assert getattr(p, k) == pytest.approx(getattr(q, k), rel=1e-4, abs=1e-6), k
    # a model-space per-layer set refuses the lens cache
    _train(root, tmp_path / "pp", "cache_train", "--per-layer")
    with pytest.raises(MlsaeError, match="cache holds tuned-lens vectors"):
        evolution_command(
            tmp_path / "pp",
            tmp_path / "c",
            inputs=Inputs.held_out(source=SourceConfig(cache=root / "cache_test_lens")),
            cfg=cfg,
        )
