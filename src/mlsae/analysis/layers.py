"""Where latents live across layers (SPEC section 4): streaming, exact, float64.

The variable L is the transformer BLOCK INDEX of the vector the SAE was applied to (e.g. 0..29,
or 0, 5, 10 for a layer subset), not its position in the SAE's layer list. The variance ratios
are invariant to a shift of L but not to gaps, so the real block index is the honest choice.

For a[t,l,j] >= 0 (latent j on x[t,l]; only tokens whose mask is True; a == 0 is inactive):
  S[l,j] = sum_t a[t,l,j],  W_j = sum_l S[l,j],  total = sum_j W_j.
  P(L=l|J=j) = S[l,j] / W_j;  E[L|J], Var(L|J) are its mean and variance.
  P(L=l) = sum_j S[l,j] / total;  Var(L) its variance.
  E_J[Var(L|J)] = sum_j W_j Var(L|J=j) / total                   (P(J=j) = W_j / total)
  E_{J,T}[Var(L|J,T)] = sum_{t,j: s_tj>0} s_tj Var(L|J=j,T=t) / total   (s_tj = sum_l a[t,l,j])
  rel_var_latent = E_J[Var(L|J)] / Var(L);  rel_var_token = E_{J,T}[Var(L|J,T)] / E_J[Var(L|J)].
Both ratios lie in [0, 1] by the law of total variance (the weights above are one joint law).

Multi-layer fractions (a latent is "active at layer l" when its activation there is > 0):
  multi_layer_fraction_aggregate: among alive latents (W_j > 0), the fraction active at more
    than one layer on the whole sample (S[l,j] > 0 for >= 2 layers l).
  multi_layer_fraction_token: among (token, latent) pairs with any activity (s_tj > 0), the
    fraction active at more than one layer of that token.
  multi_layer_fraction_token_per_latent: the same per latent (over the tokens where the latent is
    active), averaged over alive latents (each latent counts once).
Latents never active (dead on this sample) are counted and excluded wherever a quantity is
undefined for them (their rows are NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mlsae.activations.source import ActivationSource
from mlsae.analysis.contexts import AnalysisIntervals, ContextLayerStats
from mlsae.analysis.geometry import GeometryResult, ResidualGeometry
from mlsae.analysis.paper_variance import (
    PAPER_BATCH_TOKENS,
    PaperFormula,
    PaperVariance,
    active_entries,
    unique_inverse,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_with
from mlsae.core.stage_config import BootstrapConfig
from mlsae.lens.tuned import TunedLens
from mlsae.sae.autoencoder import SparseAutoencoder

F64 = torch.float64


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when the denominator is zero (undefined)."""
    return num / den if den > 0 else math.nan


@dataclass
class LayerStatsResult:
    """Finalised layer-distribution statistics. Arrays are numpy float64; dead latents are NaN."""

    layers: list[int]
    """Block index of each layer column."""
    n_tokens: int
    n_latents: int
    n_latents_alive: int
    p_layer_given_latent: np.ndarray  # [n_latents, L]  P(L=l | J=j)
    expected_layer: np.ndarray  # [n_latents]  E[L | J=j]
    var_latent: np.ndarray  # [n_latents]  Var(L | J=j) (aggregated over tokens)
    var_token: np.ndarray  # [n_latents]  E_T[Var(L | J=j, T)] (weights P(T|J=j))
    latent_mass: np.ndarray  # [n_latents]  W_j = sum_{t,l} a[t,l,j]
    multi_token_per_latent: np.ndarray  # [n_latents] fraction of active tokens with >1 layer
    p_layer: np.ndarray  # [L]  P(L=l)
    var_layer: float  # Var(L)
    mean_var_latent: float  # E_J[Var(L|J)]
    mean_var_token: float  # E_{J,T}[Var(L|J,T)]
    rel_var_latent: float
    rel_var_token: float
    multi_layer_fraction_aggregate: float
    multi_layer_fraction_token: float
    multi_layer_fraction_token_per_latent: float
    active_layers_hist: list[int]
    """Number of active (token, latent) pairs active at exactly m layers, m = 0..L (m=0 is 0)."""
    active_pair_fraction: float = math.nan
    """Active (token, latent) pairs / (tokens x latents)."""
    paper_formula: PaperFormula | None = None
    """The paper code's ratios (paper_variance.PaperVariance.result), if it was accumulated."""
    intervals: AnalysisIntervals | None = None
    """Bootstrap intervals over contexts (SPEC 7), if per-context sums were kept."""

    @property
    def n_latents_dead(self) -> int:
        return self.n_latents - self.n_latents_alive

    def save_npz(self, path: Path) -> None:
        """The per-latent arrays as a compressed .npz (atomic)."""
        names = [
            "p_layer_given_latent",
            "expected_layer",
            "var_latent",
            "var_token",
            "latent_mass",
            "multi_token_per_latent",
        ]
        arrays = {"layers": np.asarray(self.layers), **{k: getattr(self, k) for k in names}}
        write_with(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".tmp.npz")


class LayerStats:
    """Streaming accumulator of SPEC 4. Memory O(L x n_latents), independent of the token count.

    Feed it batches of tokens with `update(top_acts, top_indices, mask)` (sparse, [n, L, k]) or
    `update_dense(a, mask)` ([n, L, n_latents]); the result does not depend on batching or order
    (up to float64 rounding). With `paper_batch_tokens`, the paper code's ratios are accumulated
    alongside (paper_variance.py); they depend on the order and batching of the used tokens.
    """

    def __init__(
        self,
        n_latents: int,
        layers: Sequence[int],
        paper_batch_tokens: int | None = None,
        boot: BootstrapConfig | None = None,
    ) -> None:
        if n_latents <= 0 or not len(layers):
            raise MlsaeError("LayerStats needs at least one latent and one layer")
        self.n_latents = int(n_latents)
        self.layers = [int(x) for x in layers]
        L = len(self.layers)
        self.values = torch.tensor(self.layers, dtype=F64)  # [L] block index of each column
        self.S = torch.zeros(L, self.n_latents, dtype=F64)  # [L, n] sum_t a[t,l,j]
        self.tok_dev = torch.zeros(self.n_latents, dtype=F64)  # [n] sum_t s_tj Var(L|j,t)
        self.pairs = torch.zeros(self.n_latents, dtype=F64)  # [n] #tokens with s_tj > 0
        self.multi = torch.zeros(self.n_latents, dtype=F64)  # [n] #tokens active at >1 layer
        self.hist = torch.zeros(L + 1, dtype=torch.int64)  # [L+1] active-layer-count histogram
        self.n_tokens = 0
        self.paper = (
            PaperVariance(self.n_latents, L, paper_batch_tokens) if paper_batch_tokens else None
        )
        self.boot = boot if boot is not None and boot.bootstrap > 0 else None
        self.contexts = ContextLayerStats(self.n_latents, self.layers) if self.boot else None

    @torch.no_grad()
    def update(
        self,
        top_acts: Tensor,
        top_indices: Tensor,
        mask: Tensor | None = None,
        contexts: Tensor | None = None,
    ) -> None:
        """Add a batch: top_acts f[n, L, k] >= 0, top_indices i64[n, L, k], mask bool[n]
        (False at special tokens, which are skipped), contexts i64[n] the context of each token
        (for the bootstrap). Indices within a row must be distinct."""
        if top_acts.shape != top_indices.shape or top_acts.dim() != 3:
            raise MlsaeError(f"expected [n, L, k] acts/indices, got {tuple(top_acts.shape)}")
        n, L, k = top_acts.shape
        if len(self.layers) != L:
            raise MlsaeError(f"batch has {L} layers, the accumulator {len(self.layers)}")
        if mask is not None:
            top_acts, top_indices = top_acts[mask], top_indices[mask]
            contexts = contexts[mask] if contexts is not None else None
            n = top_acts.shape[0]
        if self.paper is not None:
            self.paper.update(top_acts, top_indices)
        self.n_tokens += n
        if n == 0:
            return
        entries = active_entries(top_acts, top_indices, self.n_latents)
        if entries is None:
            return
        a, j, pos, tok = entries
        v = self.values[pos]  # [E] block index of each entry
        self.S.view(-1).index_add_(0, pos * self.n_latents + j, a)
        # group entries by (token, latent): one group per active pair
        key, inv = unique_inverse(tok * self.n_latents + j)
        G = key.numel()
        s = torch.zeros(G, dtype=F64).index_add_(0, inv, a)  # [G] s_tj
        m = torch.zeros(G, dtype=F64).index_add_(0, inv, a * v) / s  # [G] E[L|t,j]
        dev = torch.zeros(G, dtype=F64).index_add_(0, inv, a * (v - m[inv]) ** 2)  # s*Var
        cnt = torch.zeros(G, dtype=torch.int64).index_add_(0, inv, torch.ones_like(inv))
        dev[cnt == 1] = 0.0  # a point mass has variance exactly 0 (m may differ from v by 1 ulp)
        jg = key % self.n_latents
        self.tok_dev.index_add_(0, jg, dev)
        self.pairs.index_add_(0, jg, torch.ones(G, dtype=F64))
        self.multi.index_add_(0, jg, (cnt > 1).to(F64))
        self.hist += torch.bincount(cnt, minlength=L + 1)
        if self.contexts is not None and contexts is not None:
            self.contexts.update(contexts, entries, key, dev, cnt)

    def update_dense(self, a: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch of dense activations a[n, L, n_latents] >= 0 (tests, small SAEs)."""
        if a.dim() != 3 or a.shape[2] != self.n_latents:
            raise MlsaeError(f"expected [n, L, {self.n_latents}] activations")
        idx = torch.arange(self.n_latents).expand(a.shape)
        self.update(a, idx, mask)

    def merge(self, other: LayerStats) -> None:
        """Add another accumulator's sums (same latents and layers)."""
        if other.layers != self.layers or other.n_latents != self.n_latents:
            raise MlsaeError("cannot merge LayerStats of different shapes")
        if self.paper is not None or other.paper is not None:
            raise MlsaeError("the paper-formula ratios depend on token order: cannot merge")
        self.S += other.S
        self.tok_dev += other.tok_dev
        self.pairs += other.pairs
        self.multi += other.multi
        self.hist += other.hist
        self.n_tokens += other.n_tokens

    def result(self) -> LayerStatsResult:
        """Finalise (does not modify the accumulator)."""
        v = self.values
        W = self.S.sum(0)  # [n]
        alive = W > 0
        total = float(W.sum())
        nan = torch.full_like(W, math.nan)
        P = torch.where(alive, self.S / W.clamp_min(1e-300), math.nan)  # [L, n]
        E = (v[:, None] * P).sum(0)  # [n]
        var_lat = (P * (v[:, None] - E) ** 2).sum(0)  # [n]
        var_tok = torch.where(alive, self.tok_dev / W.clamp_min(1e-300), nan)
        if total > 0:
            pL = self.S.sum(1) / total  # [L]
            mL = float((pL * v).sum())
            var_L = float((pL * (v - mL) ** 2).sum())
            mean_var_lat = float((W[alive] * var_lat[alive]).sum()) / total
            mean_var_tok = float(self.tok_dev.sum()) / total
        else:
            pL = torch.full_like(v, math.nan)
            var_L = mean_var_lat = mean_var_tok = math.nan
        n_alive = int(alive.sum())
        n_layers_active = (self.S > 0).sum(0)  # [n]
        multi_per = torch.where(self.pairs > 0, self.multi / self.pairs.clamp_min(1), nan)
        n_pairs = float(self.pairs.sum())
        return LayerStatsResult(
            layers=list(self.layers),
            n_tokens=self.n_tokens,
            n_latents=self.n_latents,
            n_latents_alive=n_alive,
            p_layer_given_latent=P.T.numpy().copy(),
            expected_layer=E.numpy().copy(),
            var_latent=var_lat.numpy().copy(),
            var_token=var_tok.numpy().copy(),
            latent_mass=W.numpy().copy(),
            multi_token_per_latent=multi_per.numpy().copy(),
            p_layer=pL.numpy().copy(),
            var_layer=var_L,
            mean_var_latent=mean_var_lat,
            mean_var_token=mean_var_tok,
            rel_var_latent=_ratio(mean_var_lat, var_L),
            rel_var_token=_ratio(mean_var_tok, mean_var_lat),
            multi_layer_fraction_aggregate=_ratio(
                float((n_layers_active[alive] > 1).sum()), float(n_alive)
            ),
            multi_layer_fraction_token=_ratio(float(self.multi.sum()), n_pairs),
            multi_layer_fraction_token_per_latent=(
                float(multi_per[alive].mean()) if n_alive else math.nan
            ),
            active_layers_hist=self.hist.tolist(),
            active_pair_fraction=_ratio(n_pairs, float(self.n_tokens) * self.n_latents),
            paper_formula=self.paper.result() if self.paper is not None else None,
            intervals=self._intervals(),
        )

    def _intervals(self) -> AnalysisIntervals | None:
        if self.contexts is None or self.boot is None or not self.contexts.row:
            return None
        batches = self.paper.batches if self.paper is not None else []
        paper = list(batches) if len(batches) > 1 else None
        return self.contexts.intervals(self.boot.bootstrap, self.boot.bootstrap_seed, paper)


# ---------------------------------------------------------------- running an SAE over vectors

EncodeFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""x f32[N, d] (raw space) -> (top_acts f32[N, k] >= 0, top_indices i64[N, k])."""


def sae_encoder(
    sae: SparseAutoencoder, lens: TunedLens | None = None, layers: Sequence[int] | None = None
) -> EncodeFn:
    """The EncodeFn of a loaded SparseAutoencoder (mlsae.sae.autoencoder). With a tuned `lens`, the SAE
    reads T_l(x): the rows of x are taken as [m, L, d] with L = len(layers) (as `feed` lays
    them out) and translated per layer first."""

    def encode(x: Tensor) -> tuple[Tensor, Tensor]:
        if lens is not None:
            assert layers is not None, "a lens needs the layers of the rows"
            x = lens.forward_stack(x.reshape(-1, len(layers), x.shape[-1]), layers)
            x = x.reshape(-1, x.shape[-1])
        rows = list(layers or sae.cfg.layers)  # each row's block (per-layer centring)
        ids = torch.tensor(rows).repeat(len(x) // len(rows)) if sae.cfg.center_layers else None
        enc = sae.encode(x, ids)  # on the SAE's device; the statistics are on the CPU
        return enc.top_acts.cpu(), enc.top_indices.cpu()

    return encode


@torch.no_grad()
def feed(
    stats: LayerStats,
    encode: EncodeFn,
    x: Tensor,
    chunk_vectors: int = 8192,
    contexts: Tensor | None = None,
) -> None:
    """Encode every layer's vector of the used tokens x[n, L, d] (from contexts [n]) and add
    them to `stats`."""
    n, L, d = x.shape
    step = max(1, chunk_vectors // L)
    for s in range(0, n, step):
        xs = x[s : s + step].float()  # [m, L, d]
        m = xs.shape[0]
        acts, idx = encode(xs.reshape(m * L, d))  # [m*L, k]
        ctx = contexts[s : s + step] if contexts is not None else None
        stats.update(acts.reshape(m, L, -1), idx.reshape(m, L, -1), contexts=ctx)


def analyze_source(
    cache: ActivationSource,
    encoders: dict[str, tuple[EncodeFn, int]],
    layers: Sequence[int],
    chunk_vectors: int = 8192,
    geometry: bool = True,
    paper_batch_tokens: int | None = PAPER_BATCH_TOKENS,
    boot: BootstrapConfig | None = None,
) -> tuple[dict[str, LayerStatsResult], GeometryResult | None]:
    """One pass over an activation source feeding every SAE in `encoders` (name -> (encode,
    n_latents)) with the vectors of `layers` of the used tokens, plus geometry pass 1; then
    geometry pass 2 (no SAE) if `geometry`. Memory is per shard. The paper code's ratios are
    accumulated over batches of `paper_batch_tokens` used tokens in cache order (None: not)."""
    from tqdm import tqdm

    layers = [int(x) for x in layers]
    missing = [x for x in layers if x not in cache.layers]
    if missing:
        raise MlsaeError(f"layer(s) {missing} are not in the cache (it holds {cache.layers})")
    pos = [cache.layers.index(x) for x in layers]
    stats = {
        name: LayerStats(n_lat, layers, paper_batch_tokens, boot)
        for name, (_, n_lat) in encoders.items()
    }
    ctx_len = max(1, cache.context_length)
    geo = ResidualGeometry(layers, cache.d_model) if geometry else None
    for shard in tqdm(cache.iter_ordered(), total=cache.n_blocks, desc="analyze", unit="block"):
        x = shard.activations[:, pos]  # [n, L, d]
        if geo is not None:
            geo.update_pass1(x, shard.mask)
        xm = x[shard.mask]
        ctx = ((shard.offset + torch.arange(len(shard.mask))) // ctx_len)[shard.mask.cpu()]
        for name, (encode, _) in encoders.items():
            feed(stats[name], encode, xm, chunk_vectors, contexts=ctx)
    if geo is None:
        return {k: v.result() for k, v in stats.items()}, None
    for shard in tqdm(cache.iter_ordered(), total=cache.n_blocks, desc="geometry", unit="block"):
        geo.update_pass2(shard.activations[:, pos], shard.mask)
    return {k: v.result() for k, v in stats.items()}, geo.result()
