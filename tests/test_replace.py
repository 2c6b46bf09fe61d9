"""`evaluate --replace`: several blocks replaced in one forward, against plain hooks that replace
every chosen block by hand in a full forward of a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mlsae.cli.app import app
from mlsae.core.errors import MlsaeError
from mlsae.data.capture import get_blocks
from mlsae.eval.replace import parse_replace, replace_prefixes
from mlsae.eval.splice import clean_pass

N_LAYERS = 4


@torch.no_grad()
def hooked_replace(model, ids, used, blocks, recon) -> tuple[float, float, int]:
    """(sum of delta CE, sum of KL(clean || replaced), count) over predictions from used
    positions, by two plain full forwards; the second with a hook on every block of `blocks`
    replacing its output at used positions by recon(block, h[used])."""

    def hook_for(block):
        def hook(_m, _i, o):
            h = (o[0] if isinstance(o, tuple) else o).clone()
            h[used] = recon(block, h[used]).to(h.dtype)
            return (h, *o[1:]) if isinstance(o, tuple) else h

        return hook

    clean = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    handles = [get_blocks(model)[b].register_forward_hook(hook_for(b)) for b in blocks]
    try:
        spliced = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    finally:
        for h in handles:
            h.remove()
    pred = used.clone()
    pred[:, -1] = False  # fixed-length contexts: every other target exists
    tgt = ids[:, 1:, None]
    ce = (clean[:, :-1].gather(2, tgt) - spliced[:, :-1].gather(2, tgt)).squeeze(2)
    kl = (clean.exp() * (clean - spliced)).sum(-1)
    return float(ce[pred[:, :-1]].sum()), float(kl[pred].sum()), int(pred.sum())


def _recon(block: int, x: torch.Tensor) -> torch.Tensor:
    """A nonlinear, block-dependent stand-in for an SAE (so the order of replacements shows)."""
    g = torch.Generator().manual_seed(block)
    w = torch.randn(x.shape[-1], x.shape[-1], generator=g) / x.shape[-1] ** 0.5
    return 0.6 * x + torch.tanh(x @ w) * x.std()


def _ids(tok, b=3, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    ids[:, 0] = tok.bos_token_id
    ids[1, 11] = tok.eos_token_id
    return ids


@pytest.mark.parametrize("mode", ["direct", "hook"])
@pytest.mark.parametrize("blocks", [[0, 1, 2, 3], [1, 3], [2]])
def test_prefixes_match_hand_hooks(arch, tokenizer, mode, blocks, one_thread):
    from conftest import make_model

    model = make_model(arch, len(tokenizer), n_layers=N_LAYERS)
    ids = _ids(tokenizer)
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    cp = clean_pass(model, ids, list(range(N_LAYERS)), special, mode=mode)
    assert cp.mode == mode
    stats = replace_prefixes(model, cp, blocks, _recon)
    assert len(stats) == len(blocks)
    previous = None
    for m, s in enumerate(stats):
        ce, kl, n = hooked_replace(model, ids, cp.used, blocks[: m + 1], _recon)
        assert s.n == n == cp.n_pred > 0
        assert s.ce_sum == pytest.approx(ce, abs=1e-4, rel=1e-4)
        assert s.kl_sum == pytest.approx(kl, abs=1e-4, rel=1e-4) and kl > 1e-3
        if previous is not None:  # each prefix differs from the one before (it can fail)
            assert abs(s.kl_sum - previous) > 1e-6
        previous = s.kl_sum


def test_identity_replacement_changes_nothing(tiny_model, tokenizer):
    ids = _ids(tokenizer, seed=3)
    cp = clean_pass(tiny_model, ids, [0, 1, 2], [tokenizer.bos_token_id])
    for s in replace_prefixes(tiny_model, cp, [0, 1, 2], lambda _b, x: x):
        assert abs(s.ce_sum) / s.n < 1e-5 and abs(s.kl_sum) / s.n < 1e-5


def test_parse_replace():
    assert parse_replace("all", [3, 1, 2]) == [1, 2, 3]
    assert parse_replace("1-2", [0, 1, 2, 3]) == [1, 2]
    assert parse_replace("3,0", [0, 1, 2, 3]) == [0, 3]
    for bad in ("5", "x", "0-9"):
        with pytest.raises(MlsaeError, match="--replace"):
            parse_replace(bad, [0, 1, 2, 3])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    from conftest import model_with_test_cache

    from mlsae.core.config import SaeConfig
    from mlsae.sae.autoencoder import SparseAutoencoder

    root = tmp_path_factory.mktemp("replace")
    model, mdir, data = model_with_test_cache(root, "llama", tokenizer, 32)
    cfg = SaeConfig(d_in=32, expansion_factor=2, k=4, layers=[0, 1, 2], model=mdir, dataset=data)
    SparseAutoencoder(cfg, seed=0, compute_dtype=torch.float32).save(root / "mlsae" / "sae")
    for layer in range(3):
        cfg = SaeConfig(d_in=32, expansion_factor=2, k=4, layers=[layer], model=mdir, dataset=data)
        sae = SparseAutoencoder(cfg, seed=10 + layer, compute_dtype=torch.float32)
        sae.save(root / "perlayer" / f"L{layer}")
    return root, model


def _cache_batch(root: Path):
    from mlsae.activations.cache import ActivationCache

    ac = ActivationCache(root / "cache_test")
    shards = [ac.load_shard(i) for i in range(ac.n_shards)]
    ids = torch.cat([s.token_ids for s in shards]).view(-1, 32)
    used = torch.cat([s.mask for s in shards]).view(-1, 32)
    return ids, used


@pytest.mark.parametrize("kind", ["mlsae", "perlayer"])
def test_cli_replace_matches_hooks(setup, tmp_path, kind):
    from mlsae.sae.folders import load_sae

    root, model = setup
    out = tmp_path / "eval.json"
    args = [
        "evaluate",
        str(root / kind),
        "--out",
        str(out),
        "--cache",
        str(root / "cache_test"),
        "--replace",
        "all",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "blocks replaced together" in res.output
    result = json.loads(out.read_text())
    rows = result["sections"]["replace"]["rows"]
    assert [r["blocks"] for r in rows] == [[0], [0, 1], [0, 1, 2]]
    if kind == "mlsae":
        sae = load_sae(root / "mlsae")
        saes = {b: sae for b in range(3)}
    else:
        saes = {b: load_sae(root / "perlayer" / f"L{b}") for b in range(3)}

    def recon(block, x):
        return saes[block](x.float())[0]

    ids, used = _cache_batch(root)
    for row in rows:
        ce, kl, n = hooked_replace(model, ids, used, row["blocks"], recon)
        assert row["n_pred"] == n
        assert row["delta_ce"] == pytest.approx(ce / n, abs=1e-4, rel=1e-3)
        assert row["kl"] == pytest.approx(kl / n, abs=1e-4, rel=1e-3)
    # the one-block prefix is the one-block splice of the ordinary evaluation
    assert rows[0]["delta_ce"] == pytest.approx(result["per_layer"]["delta_ce"][0], abs=1e-5)


def test_replace_bad_inputs(setup, tmp_path):
    root, _ = setup
    base = [
        "evaluate",
        str(root / "mlsae"),
        "--out",
        str(tmp_path / "e.json"),
        "--cache",
        str(root / "cache_test"),
    ]
    for extra, msg in (
        (["--replace", "7"], "--replace"),
        (["--replace", "all", "--no-ce"], "--no-ce"),
    ):
        res = CliRunner().invoke(app, [*base, *extra])
        assert isinstance(res.exception, MlsaeError) and msg in str(res.exception), res.output
        assert not (tmp_path / "e.json").exists()
