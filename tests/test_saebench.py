"""`evaluate --format saebench`: SAEBench's core metrics per layer against plain computations on a
tiny model (hooked full forwards, numpy-style tensor maths on the SAE's own weights), and the
result files parsed back by SAEBench's own result classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlsae.core.config import DataConfig, SourceConfig
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import EvalConfig
from mlsae.data.capture import get_blocks
from mlsae.eval.saebench import max_other_cosine
from mlsae.eval.several import evaluate_run

CTX = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    from conftest import model_with_test_cache

    from mlsae.core.config import SaeConfig
    from mlsae.sae.autoencoder import SparseAutoencoder

    root = tmp_path_factory.mktemp("saebench")
    model, mdir, data = model_with_test_cache(root, "gpt_neox", tokenizer, CTX)
    cfg = SaeConfig(d_in=32, expansion_factor=4, k=3, layers=[0, 1, 2], model=mdir, dataset=data)
    SparseAutoencoder(cfg, seed=0, compute_dtype=torch.float32).save(root / "mlsae" / "sae")
    return root, model


@torch.no_grad()
def _reference(model, sae, ids, used, layer) -> dict[str, float]:
    """Plain recomputation of the metrics of `layer`: hooked full forwards for CE / KL."""
    h_clean: dict[str, torch.Tensor] = {}

    def run(replace):
        def hook(_m, _i, o):
            h = (o[0] if isinstance(o, tuple) else o).clone()
            h_clean.setdefault("h", h.clone())
            if replace is not None:
                h[used] = replace(h[used])
            return (h, *o[1:]) if isinstance(o, tuple) else h

        handle = get_blocks(model)[layer].register_forward_hook(hook)
        try:
            return F.log_softmax(model(input_ids=ids).logits.float(), -1)
        finally:
            handle.remove()

    clean = run(None)
    x = h_clean["h"][used].float()
    x_hat, enc = sae(x)
    pred = used.clone()
    pred[:, -1] = False
    tgt = ids[:, 1:, None]

    def ce_kl(logp):
        ce = -logp[:, :-1].gather(2, tgt).squeeze(2)[pred[:, :-1]].mean()
        kl = (clean.exp() * (clean - logp)).sum(-1)[pred].mean()
        return float(ce), float(kl)

    ce_clean, _ = ce_kl(clean)
    ce_sae, kl_sae = ce_kl(run(lambda h: sae(h.float())[0]))
    ce_zero, kl_zero = ce_kl(run(torch.zeros_like))
    n_in, n_out = x.double().norm(dim=-1), x_hat.double().norm(dim=-1)
    active = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    active[enc.top_indices[enc.top_acts > 0]] = True
    w = F.normalize(sae.W_dec.double(), dim=-1)  # [F, d]
    cos = w @ w.T - 3 * torch.eye(len(w), dtype=torch.float64)
    return {
        "kl_div_score": (kl_zero - kl_sae) / kl_zero,
        "ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_clean),
        "ce_loss_without_sae": ce_clean,
        "l2_ratio": float((n_out / n_in).mean()),
        "relative_reconstruction_bias": float(
            (n_out**2).sum() / (x.double() * x_hat.double()).sum()
        ),
        "cossim": float(F.cosine_similarity(x.double(), x_hat.double(), dim=-1).mean()),
        "frac_alive": float(active.double().mean()),
        "average_max_decoder_cosine_sim": float(cos.max(dim=1).values.mean()),
    }


def test_metrics_match_plain_computation(setup, tmp_path):
    from mlsae.activations.cache import ActivationCache
    from mlsae.sae.folders import load_sae

    root, model = setup
    out = tmp_path / "eval.json"
    result = evaluate_run(
        root / "mlsae",
        out,
        inputs=Inputs.held_out(
            source=SourceConfig(cache=root / "cache_test"),
            data=DataConfig(split="test", context_length=CTX),
        ),
        ev=EvalConfig(format="saebench"),
    )
    ac = ActivationCache(root / "cache_test")
    shards = [ac.load_shard(i) for i in range(ac.n_shards)]
    ids = torch.cat([s.token_ids for s in shards]).view(-1, CTX)
    used = torch.cat([s.mask for s in shards]).view(-1, CTX)
    sae = load_sae(root / "mlsae")
    section = result.sections["saebench"]
    assert section["layers"] == [0, 1, 2]
    for i, layer in enumerate(section["layers"]):
        got = section["per_layer"][i]
        ref = _reference(model, sae, ids, used, layer)
        for name, want in ref.items():
            assert got[name] == pytest.approx(want, abs=1e-4, rel=1e-3), (layer, name)
        assert 0 < got["frac_alive"] < 1  # both outcomes occur on this data (the test can fail)
    # the files SAEBench's own result classes parse, one per layer, beside --out
    from sae_bench.evals.core.eval_output import CoreEvalOutput

    files = result.sections["saebench_files"]
    assert len(files) == 3
    for i, path in enumerate(files):
        parsed = CoreEvalOutput(**json.loads(Path(path).read_text()))
        metrics = parsed.eval_result_metrics
        want = section["per_layer"][i]
        assert metrics.model_behavior_preservation.kl_div_score == want["kl_div_score"]
        assert metrics.model_performance_preservation.ce_loss_score == want["ce_loss_score"]
        assert metrics.shrinkage.l2_ratio == want["l2_ratio"]
        assert metrics.misc_metrics.frac_alive == want["frac_alive"]
        assert parsed.sae_lens_id == f"blocks.{section['layers'][i]}.hook_resid_post"
    assert json.loads(out.read_text())["sections"]["saebench"] == section


def test_max_other_cosine_brute_force():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(7, 5, generator=g)
    want = []
    for i in range(7):
        others = [
            float(torch.dot(d[i], d[j]) / (d[i].norm() * d[j].norm())) for j in range(7) if j != i
        ]
        want.append(max(others))
    torch.testing.assert_close(max_other_cosine(d), torch.tensor(want, dtype=torch.float64))
