"""`mlsae synth generate --out DIR`: sample tokens from a `Truth` and write them as two normal
activation caches (DIR/train, DIR/test: manifest, shards, through the cache writer) plus the
truth (DIR/truth.safetensors, DIR/truth.json).

For token t, feature f and layer l (codes in float64, vectors summed in float32):
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

Codes are sparse (a few of the F features fire on a token), so a chunk is computed from its
firing (token, feature) pairs only: the vectors by one sparse matmul per layer, the
LayerStats input as top-k rows built from the same pairs; the dense [n, L, F] codes exist only
on demand (`Sample.codes`, for tests). Each chunk is written as one shard, straight from its
float32 vectors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.activations.norms import nonzero_median
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
    """One chunk of consecutive tokens; the true codes as firing pairs (token, feature)."""

    x: Tensor  # [n, L, d] float32 the vectors (the cache's float32 bytes)
    tok: Tensor  # [P] i64 token of each firing pair (ascending)
    feat: Tensor  # [P] i64 feature of each firing pair
    coef: Tensor  # [P, L] float64 the pair's true code a[t,l,f] at each layer
    fire: Tensor  # [n, F] bool token-level firing
    outlier: Tensor  # [n] bool sink-like outlier tokens
    token_ids: Tensor  # [n] int64

    @property
    def codes(self) -> Tensor:
        """The dense true codes a[t,l,f], [n, L, F] float64."""
        n, F = self.fire.shape
        out = torch.zeros(n, F, self.coef.shape[1], dtype=torch.float64)
        out[self.tok, self.feat] = self.coef
        return out.transpose(1, 2)


def _firing(truth: Truth, u: Tensor) -> Tensor:
    """fire [n, F] from uniforms u [n, F]: roots independent, children from their parents
    (every parent is a root)."""
    p1, p2 = truth.parents[:, 0], truth.parents[:, 1]
    fire = u < torch.nan_to_num(truth.firing, nan=0.0)  # roots (children's firing is NaN)
    for kind in (AND, OR, SPECIALISED):
        c = (truth.kind == kind).nonzero().flatten()
        if not len(c):
            continue
        if kind == AND:
            fire[:, c] = fire[:, p1[c]] & fire[:, p2[c]]
        elif kind == OR:
            fire[:, c] = fire[:, p1[c]] | fire[:, p2[c]]
        else:
            fire[:, c] = fire[:, p1[c]] & (u[:, c] < truth.cfg.specialise_fraction)
    return fire


def _pair_layers(truth: Truth, tok: Tensor, feat: Tensor, n: int, g: torch.Generator) -> Tensor:
    """on [P, L] of the firing pairs: the span, or one layer of it with probability
    1 - layer_activity (drawn for every (t, f), so the stream does not depend on the firing)."""
    on = truth.in_span()[feat]  # [P, L]
    if truth.cfg.layer_activity < 1:
        F = truth.n_features
        single = (torch.rand(n, F, generator=g) >= truth.cfg.layer_activity)[tok, feat]
        length = (truth.last - truth.first + 1).double()
        u = torch.rand(n, F, generator=g, dtype=torch.float64)[tok, feat]
        pick = truth.first[feat] + (u * length[feat]).long().clamp_max(length.long()[feat] - 1)
        one = torch.arange(truth.cfg.n_layers)[None, :] == pick[:, None]
        on = torch.where(single[:, None], one, on)
    return on


def sample(truth: Truth, n: int, g: torch.Generator) -> Sample:
    """n consecutive tokens (the generator's state advances)."""
    cfg = truth.cfg
    L, d = cfg.n_layers, cfg.d_model
    fire = _firing(truth, torch.rand(n, truth.n_features, generator=g, dtype=torch.float64))
    lo, hi = cfg.magnitude_min, cfg.magnitude_max
    mag = lo + (hi - lo) * torch.rand(n, truth.n_features, generator=g, dtype=torch.float64)
    tok, feat = fire.nonzero(as_tuple=True)  # row-major: tokens ascending
    on = _pair_layers(truth, tok, feat, n, g)
    coef = mag[tok, feat][:, None] * on * truth.schedule[feat]  # [P, L]
    x = torch.empty(n, L, d)
    dirs = truth.directions.float()
    for ly in range(L):  # x[t, l] = sum_f a[t,l,f] directions[f, l]: sparse codes @ dense
        m = coef[:, ly] > 0
        codes = torch.sparse_coo_tensor(
            torch.stack([tok[m], feat[m]]),
            coef[m, ly].float(),
            (n, len(dirs)),
            check_invariants=True,
            is_coalesced=True,
        )  # (sorted, distinct pairs)
        x[:, ly] = torch.sparse.mm(codes, dirs[:, ly])
    if cfg.noise > 0:
        x += cfg.noise * torch.randn(n, L, d, generator=g)
    x *= truth.layer_scale.float()[None, :, None]
    outlier = torch.rand(n, generator=g) < cfg.outlier_fraction
    factor = 10 + 90 * torch.rand(n, generator=g, dtype=torch.float64)
    if outlier.any():
        med = nonzero_median(x[~outlier].norm(dim=-1))
        x[outlier] += ((factor[outlier, None] * med)[..., None] * truth.sink).float()
    ids = torch.randint(1, VOCAB, (n,), generator=g)
    return Sample(x=x, tok=tok, feat=feat, coef=coef, fire=fire, outlier=outlier, token_ids=ids)


def sparse_codes(s: Sample) -> tuple[Tensor, Tensor]:
    """The true codes as top-k rows (values [n, L, k], indices [n, L, k], zero-padded) with k
    the most features active on one (token, layer): nothing active is lost."""
    n, L = s.x.shape[0], s.x.shape[1]
    active = s.coef > 0  # [P, L]
    counts = torch.zeros(n, L, dtype=torch.int64).index_add_(0, s.tok, active.long())
    k = max(1, int(counts.max()) if counts.numel() else 1)
    values = torch.zeros(n, L, k, dtype=torch.float64)
    indices = torch.zeros(n, L, k, dtype=torch.int64)
    before = counts.cumsum(0) - counts  # [n, L] active pairs of the earlier tokens
    slot = active.long().cumsum(0) - 1 - before[s.tok]  # [P, L] place within the row
    p, ly = active.nonzero(as_tuple=True)
    values[s.tok[p], ly, slot[p, ly]] = s.coef[p, ly]
    indices[s.tok[p], ly, slot[p, ly]] = s.feat[p]
    return values, indices


def samples(truth: Truth, split: str, n_tokens: int):  # noqa: ANN201 (a generator of Sample)
    """The split's tokens as Samples of CHUNK_CONTEXTS contexts (deterministic in the seed)."""
    ctx = truth.cfg.context_length
    g = torch.Generator().manual_seed(truth.cfg.seed * 1000 + SPLIT_SEEDS[split])
    n_tokens = n_tokens // ctx * ctx
    for s in range(0, n_tokens, CHUNK_CONTEXTS * ctx):
        yield sample(truth, min(CHUNK_CONTEXTS * ctx, n_tokens - s), g)


def write_split(out: Path, truth: Truth, split: str, n_tokens: int) -> dict[str, Any]:
    """Write one split's cache (one shard per Sample, straight from its vectors); returns its
    true statistics for truth.json."""
    from mlsae.activations.cache import CacheWriter, write_shard
    from mlsae.activations.extract import record_norm_outliers
    from mlsae.analysis.summary import LayerSummary
    from mlsae.core.schema import to_dict

    cfg = truth.cfg
    meta = {
        "model": None,
        "dataset": "synthetic",
        "split": split,
        "context_length": cfg.context_length,
        "layers": list(range(cfg.n_layers)),
        "d_model": cfg.d_model,
        "lens": None,
        "exclude_sink": False,
        "synthetic_seed": cfg.seed,
    }
    writer = CacheWriter(out, meta, CHUNK_CONTEXTS * cfg.context_length, cfg.storage_dtype)
    stats = LayerStats(truth.n_features, list(range(cfg.n_layers)), PAPER_BATCH_TOKENS)
    fired = torch.zeros(truth.n_features, dtype=torch.int64)
    n_out = n = 0
    for i, s in enumerate(samples(truth, split, n_tokens)):
        mask = torch.ones(len(s.token_ids), dtype=torch.bool)
        writer.add_shard(write_shard(out, i, s.x, s.token_ids, mask, writer.dtype))
        stats.update(*sparse_codes(s))
        fired += s.fire.sum(0)
        n_out += int(s.outlier.sum())
        n += len(s.token_ids)
    writer.close()
    record_norm_outliers(out)
    res = stats.result()
    return {
        "n_tokens": n,
        "n_outlier_tokens": n_out,
        "firing_rate": (fired.double() / max(n, 1)).tolist(),
        "layer_stats": to_dict(LayerSummary.of(res)),
        "expected_layer": res.expected_layer.tolist(),
    }


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: threads only add fork-join waits (6x under load)
    try:
        for split, n in (("train", cfg.tokens), ("test", cfg.test_tokens)):
            facts[split] = write_split(out / split, truth, split, n)
    finally:
        torch.set_num_threads(threads)
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
