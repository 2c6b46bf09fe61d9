"""`mlsae synth generate --out DIR`: sample tokens from a `Truth` and write them as two normal
activation caches (DIR/train, DIR/test: manifest, shards, through the cache writer) plus the
truth (DIR/truth.safetensors, DIR/truth.json).

For token t, feature f and layer l (float64 until the cache's storage dtype):
  fire[t,f]   roots: Bernoulli(firing[f]); AND / OR children: both / either parent fired;
              specialised children: the parent fired and Bernoulli(specialise_fraction)
  mag[t,f]    Uniform(magnitude_min, magnitude_max), one draw per (t, f)
  on[t,l,f]   l in f's span; with probability 1 - layer_activity only one layer of the span
              (uniform) is on for that (t, f)
  a[t,l,f]    = fire * mag * on * schedule[f,l]                 (the true code)
  x[t,l]      = layer_scale[l] * (sum_f a[t,l,f] directions[f,l] + noise * N(0, I))
              + for outlier tokens: c_t * median ||x[.,l]|| (non-zero ones) * sink, c_t ~ Uniform(10, 100)
The true layer statistics (SPEC 4, both variance-ratio pairs, multi-layer fractions) are the
`analysis.layers.LayerStats` of the true codes a (without layer_scale: the scale an SAE's
per-vector standardisation removes), computed per split and saved in truth.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.analysis.layers import LayerStats
from mlsae.analysis.paper_variance import PAPER_BATCH_TOKENS
from mlsae.core.errors import MlsaeError
from mlsae.synth.config import SynthConfig
from mlsae.synth.truth import AND, OR, SPECIALISED, Truth, build_truth, save_truth

log = logging.getLogger(__name__)
CHUNK_CONTEXTS = 64
"""Contexts sampled (and written as one shard) at a time."""
SPLIT_SEEDS = {"train": 0, "test": 1}
VOCAB = 1000
"""Token ids are drawn uniformly from 1..VOCAB-1 (no tokenizer: shown as ids)."""


@dataclass
class Sample:
    """One chunk of consecutive tokens."""

    x: Tensor  # [n, L, d] float64 the vectors
    codes: Tensor  # [n, L, F] float64 the true codes a[t,l,f]
    fire: Tensor  # [n, F] bool token-level firing
    outlier: Tensor  # [n] bool sink-like outlier tokens
    token_ids: Tensor  # [n] int64


def _firing(truth: Truth, n: int, g: torch.Generator) -> Tensor:
    """fire [n, F]: roots independent, children from their parents (parents come first)."""
    cfg = truth.cfg
    F = truth.n_features
    u = torch.rand(n, F, generator=g, dtype=torch.float64)
    root = truth.kind == 0
    fire = torch.zeros(n, F, dtype=torch.bool)
    fire[:, root] = u[:, root] < truth.firing[root]
    for f in (~root).nonzero().flatten().tolist():
        p1, p2 = truth.parents[f].tolist()
        k = int(truth.kind[f])
        if k == AND:
            fire[:, f] = fire[:, p1] & fire[:, p2]
        elif k == OR:
            fire[:, f] = fire[:, p1] | fire[:, p2]
        elif k == SPECIALISED:
            fire[:, f] = fire[:, p1] & (u[:, f] < cfg.specialise_fraction)
    return fire


def _layer_on(truth: Truth, n: int, g: torch.Generator) -> Tensor:
    """on [n, L, F]: the span, or one layer of it with probability 1 - layer_activity."""
    span = truth.in_span()  # [F, L]
    on = span.T[None].expand(n, -1, -1).clone()  # [n, L, F]
    if truth.cfg.layer_activity < 1:
        single = torch.rand(n, truth.n_features, generator=g) >= truth.cfg.layer_activity
        length = (truth.last - truth.first + 1).double()
        pick = truth.first + (torch.rand(n, truth.n_features, generator=g, dtype=torch.float64)
                              * length).long().clamp_max(length.long() - 1)  # fmt: skip
        one = torch.arange(truth.cfg.n_layers)[None, :, None] == pick[:, None, :]
        on = torch.where(single[:, None, :], one, on)
    return on


def _median_norms(x: Tensor) -> Tensor:
    """[L] each layer's median norm over its non-zero vectors of x [n, L, d] (1 if none)."""
    norms = x.norm(dim=-1)  # [n, L]
    out = torch.ones(x.shape[1], dtype=x.dtype)
    for ly in range(x.shape[1]):
        nz = norms[:, ly][norms[:, ly] > 0]
        if len(nz):
            out[ly] = nz.median()
    return out


def sample(truth: Truth, n: int, g: torch.Generator) -> Sample:
    """n consecutive tokens (the generator's state advances)."""
    cfg = truth.cfg
    fire = _firing(truth, n, g)
    lo, hi = cfg.magnitude_min, cfg.magnitude_max
    mag = lo + (hi - lo) * torch.rand(n, truth.n_features, generator=g, dtype=torch.float64)
    on = _layer_on(truth, n, g)
    codes = (fire * mag)[:, None, :] * on * truth.schedule.T[None]  # [n, L, F]
    dirs = truth.directions.float().transpose(0, 1)  # [L, F, d]
    x = torch.bmm(codes.float().transpose(0, 1), dirs).transpose(0, 1).double()  # [n, L, d]
    if cfg.noise > 0:
        x += cfg.noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x *= truth.layer_scale[None, :, None]
    outlier = torch.rand(n, generator=g) < cfg.outlier_fraction
    factor = 10 + 90 * torch.rand(n, generator=g, dtype=torch.float64)
    if outlier.any():
        x[outlier] += (factor[outlier, None] * _median_norms(x[~outlier]))[..., None] * truth.sink
    ids = torch.randint(1, VOCAB, (n,), generator=g)
    return Sample(x=x, codes=codes, fire=fire, outlier=outlier, token_ids=ids)


def sparse_codes(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Dense codes [n, L, F] as top-k rows (values [n, L, k], indices [n, L, k]) with k the
    most features active on one (token, layer): nothing active is lost."""
    k = max(1, int((codes > 0).sum(-1).max()))
    v, i = codes.topk(k, dim=-1)
    return v, i


def samples(truth: Truth, split: str, n_tokens: int):  # noqa: ANN201 (a generator of Sample)
    """The split's tokens as Samples of CHUNK_CONTEXTS contexts (deterministic in the seed)."""
    ctx = truth.cfg.context_length
    g = torch.Generator().manual_seed(truth.cfg.seed * 1000 + SPLIT_SEEDS[split])
    n_tokens = n_tokens // ctx * ctx
    for s in range(0, n_tokens, CHUNK_CONTEXTS * ctx):
        yield sample(truth, min(CHUNK_CONTEXTS * ctx, n_tokens - s), g)


def write_split(out: Path, truth: Truth, split: str, n_tokens: int) -> dict[str, Any]:
    """Write one split's cache; returns its true statistics for truth.json."""
    from mlsae.activations.cache import CacheWriter
    from mlsae.activations.extract import record_norm_outliers

    cfg = truth.cfg
    meta = {"model": None, "dataset": "synthetic", "split": split,
            "context_length": cfg.context_length, "layers": list(range(cfg.n_layers)),
            "d_model": cfg.d_model, "lens": None, "exclude_sink": False,
            "synthetic_seed": cfg.seed}  # fmt: skip
    writer = CacheWriter(out, meta, CHUNK_CONTEXTS * cfg.context_length, cfg.storage_dtype)
    stats = LayerStats(truth.n_features, list(range(cfg.n_layers)), PAPER_BATCH_TOKENS)
    fired = torch.zeros(truth.n_features, dtype=torch.int64)
    n_out = n = 0
    for s in samples(truth, split, n_tokens):
        writer.add(s.x.float(), s.token_ids, torch.ones(len(s.token_ids), dtype=torch.bool))
        stats.update(*sparse_codes(s.codes))
        fired += s.fire.sum(0)
        n_out += int(s.outlier.sum())
        n += len(s.token_ids)
    writer.close()
    record_norm_outliers(out)
    res = stats.result()
    return {"n_tokens": n, "n_outlier_tokens": n_out,
            "firing_rate": (fired.double() / max(n, 1)).tolist(),
            "layer_stats": res.summary(),
            "expected_layer": res.expected_layer.tolist()}  # fmt: skip


def generate(out: Path, cfg: SynthConfig) -> dict[str, Any]:
    """Write DIR/train, DIR/test and the truth; returns truth.json's body."""
    from mlsae.core.outputs import check_output

    out = Path(out)
    check_output(out, "synth")
    if out.exists() and any(out.iterdir()):
        raise MlsaeError(f"--out {out} exists and is not empty: choose a new folder")
    t0 = time.perf_counter()
    truth = build_truth(cfg)
    out.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {}
    for split, n in (("train", cfg.tokens), ("test", cfg.test_tokens)):
        facts[split] = write_split(out / split, truth, split, n)
    dirs = truth.directions
    cos = (dirs[:, 1:] * dirs[:, :-1]).sum(-1)  # [F, L-1]
    facts["adjacent_angle_deg"] = {
        "min": float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).min()),
        "max": float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).max()),
    }
    facts["time_s"] = time.perf_counter() - t0
    save_truth(out, truth, facts)
    from mlsae.core.io import read_json_object

    return read_json_object(out / "truth.json")
