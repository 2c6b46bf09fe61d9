"""The paper's variance ratios as its code computes them (SPEC 4, "Report it beside ours").

Written from the formula's description (the paper's `analysis/variances.py`), to be reported
next to the SPEC ratios of `layers.LayerStats`, which are true variances of one joint law.

Per batch of B consecutive used tokens (a[t,l,j] >= 0, l = 0..L-1 the POSITION of the layer in
the SAE's layer list, as the paper's code uses `arange(n_layers)`, not the block index):
  p[l,t,j] = a[t,l,j] / sum_l' a[t,l',j], and p = 0 where (t, j) is inactive;
  v(q) = sum_l l^2 q[l] - (sum_l l q[l])^2 for any q over layers (a "variance" only when q
    sums to 1);
  e_var_tf = mean over ALL (t, j) of v(p[:, t, j])    (inactive pairs contribute 0);
  e_var_f  = mean over ALL j of v(mean_t p[:, t, j])  (the token mean sums to the latent's
    active fraction in the batch, not to 1; never-active latents contribute 0);
  var_l    = v(mean_{t,j} p[:, t, j]);
  rel_var_latent = e_var_f / var_l, rel_var_token = e_var_tf / e_var_f, per batch;
then every quantity is the plain mean over batches (ratios of means are not taken).

Why the ratios come out small: for a latent active on a fraction f of the batch's tokens, its
token mean q = f r with r a distribution, and v(q) = f Var_r(L) + f (1 - f) E_r[L]^2: mostly the
squared mean layer position, not a spread. As a diagnostic, `exp_var_latent_normalised` replaces
v(q) by f Var_r(L) (each latent's token mean normalised before taking its variance) and
`rel_var_token_normalised` = e_var_tf / that, per batch, averaged.

Differences from the paper's run besides the formula: its batches are 1 sequence x 2,048
tokens and special tokens (BOS/EOS/pad) keep their place with zeroed inputs (their codes count
in every mean); here special tokens are excluded and a batch is B consecutive USED tokens of
the stream (contexts are concatenated). A trailing partial batch is dropped (the paper's loader
drops incomplete sequences) unless no full batch exists, in which case it is the one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError

F64 = torch.float64
PAPER_BATCH_TOKENS = 2048
"""The paper's batch: batch_size 1 x max_length 2048 tokens."""

Number = float | None
"""A number; None (or NaN, before `LayerSummary.of` makes it None) where it is undefined."""


@dataclass
class PaperFormula:
    """The layer-variance ratios as the paper's code computes them (SPEC 4; this
    module), for comparison with ours."""

    formula: str = ""
    layer_values: str = ""
    batch_tokens: int = 0
    n_batches: int = 0
    tokens_in_batches: int = 0
    last_partial_batch: str = ""
    special_tokens: str = ""
    active_pair_fraction: Number = None
    exp_var_token: Number = None
    exp_var_latent: Number = None
    var_layer: Number = None
    rel_var_latent: Number = None
    rel_var_token: Number = None
    token_variance_factor: Number = None
    """1 / rel_var_token: how much smaller a latent's layer variance is for a single token."""
    exp_var_latent_normalised: Number = None
    rel_var_token_normalised: Number = None
    """rel_var_token with each latent's token-averaged distribution normalised to sum 1."""


def _v(q: Tensor, values: Tensor) -> Tensor:
    """The paper's v(q) = sum_l l^2 q - (sum_l l q)^2 over dim 0. q [L, ...], values [L]."""
    w = values.view(-1, *([1] * (q.dim() - 1)))
    return (w * w * q).sum(0) - ((w * q).sum(0)) ** 2


class PaperVariance:
    """Streaming accumulator of the paper-code ratios. Feed used tokens in stream order with
    `update(top_acts, top_indices)` ([n, L, k], any chunking); memory O(L x n_latents)."""

    def __init__(self, n_latents: int, n_layers: int, batch_tokens: int = PAPER_BATCH_TOKENS):
        if n_latents <= 0 or n_layers <= 0 or batch_tokens <= 0:
            raise MlsaeError("PaperVariance needs latents, layers and a batch size >= 1")
        self.n_latents, self.n_layers, self.batch_tokens = n_latents, n_layers, int(batch_tokens)
        self.values = torch.arange(n_layers, dtype=F64)  # [L] layer positions 0..L-1
        self.batches: list[tuple[float, ...]] = []  # (e_var_tf, e_var_f, var_l, e_var_f_norm)
        self.n_tokens = 0  # tokens fed, including an open batch
        self.pairs_closed = 0  # active (t, j) pairs in the closed batches
        self._reset()

    def _reset(self) -> None:
        self.q_sum = torch.zeros(self.n_layers, self.n_latents, dtype=F64)  # [L, n] sum_t p
        self.v_sum = 0.0  # sum over the batch's active pairs of v(p[:, t, j])
        self.pairs = 0  # active (t, j) pairs in the open batch
        self.filled = 0  # tokens in the open batch

    @torch.no_grad()
    def update(self, top_acts: Tensor, top_indices: Tensor) -> None:
        """Add used tokens in stream order: top_acts f[n, L, k] >= 0, top_indices i64[n, L, k]
        (indices distinct within a row)."""
        if top_acts.shape != top_indices.shape or top_acts.dim() != 3:
            raise MlsaeError(f"expected [n, L, k] acts/indices, got {tuple(top_acts.shape)}")
        if top_acts.shape[1] != self.n_layers:
            raise MlsaeError(f"batch has {top_acts.shape[1]} layers, expected {self.n_layers}")
        n, s = top_acts.shape[0], 0
        while s < n:
            take = min(n - s, self.batch_tokens - self.filled)
            self._add(top_acts[s : s + take], top_indices[s : s + take])
            s += take
            if self.filled == self.batch_tokens:
                self.batches.append(self._batch_stats())
                self.pairs_closed += self.pairs
                self._reset()

    def _add(self, top_acts: Tensor, top_indices: Tensor) -> None:
        n, L, k = top_acts.shape
        self.filled += n
        self.n_tokens += n
        entries = active_entries(top_acts, top_indices, self.n_latents)
        if entries is None:
            return
        a, j, pos, tok = entries
        key, inv = unique_inverse(tok * self.n_latents + j)  # active pairs
        s = torch.zeros(key.numel(), dtype=F64).index_add_(0, inv, a)  # [G] sum_l a
        p = a / s[inv]  # [E] p[l,t,j] of each active entry
        v = self.values[pos]
        m1 = torch.zeros_like(s).index_add_(0, inv, v * p)  # [G] sum_l l p
        m2 = torch.zeros_like(s).index_add_(0, inv, v * v * p)  # [G] sum_l l^2 p
        self.v_sum += float((m2 - m1 * m1).sum())
        self.pairs += key.numel()
        self.q_sum.view(-1).index_add_(0, pos * self.n_latents + j, p)

    def _batch_stats(self) -> tuple[float, ...]:
        """(e_var_tf, e_var_f, var_l, e_var_f_norm) of the open batch (its token count as its
        size)."""
        m = self.filled
        q = self.q_sum / m  # [L, n] mean_t p
        e_var_tf = self.v_sum / (m * self.n_latents)
        e_var_f = float(_v(q, self.values).mean())
        var_l = float(_v(q.mean(1), self.values))
        f = q.sum(0)  # [n] active fraction of each latent in the batch
        m1 = (self.values[:, None] * q).sum(0)  # [n] f E_r[L]
        m2 = (self.values[:, None] ** 2 * q).sum(0)  # [n] f E_r[L^2]
        norm = torch.where(f > 0, m2 - m1 * m1 / f.clamp_min(1e-300), 0.0)  # [n] f Var_r(L)
        return e_var_tf, e_var_f, var_l, float(norm.mean())

    def result(self) -> PaperFormula:
        """The paper-code quantities (JSON-ready); does not modify the accumulator."""
        batches, last = list(self.batches), "none"
        pairs, used = self.pairs_closed, len(batches) * self.batch_tokens
        if self.filled:
            if batches:
                last = f"dropped ({self.filled} tokens)"
            else:
                batches, last = [self._batch_stats()], f"used ({self.filled} tokens, no full batch)"
                pairs, used = self.pairs, self.filled
        rows = [
            (tf, f, vl, _div(f, vl), _div(tf, f), fn, _div(tf, fn)) for tf, f, vl, fn in batches
        ]
        mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)] or [math.nan] * 7
        rel_t = mean[4]
        return PaperFormula(
            formula="paper code (tim-lawson/mlsae analysis/variances.py), see SPEC 4",
            layer_values="positions 0..L-1 in the SAE's layer list",
            batch_tokens=self.batch_tokens,
            n_batches=len(rows),
            tokens_in_batches=used,
            last_partial_batch=last,
            special_tokens="excluded (the paper keeps them with zeroed inputs)",
            active_pair_fraction=pairs / (used * self.n_latents) if used else math.nan,
            exp_var_token=mean[0],
            exp_var_latent=mean[1],
            var_layer=mean[2],
            rel_var_latent=mean[3],
            rel_var_token=rel_t,
            token_variance_factor=1 / rel_t if rel_t > 0 and math.isfinite(rel_t) else None,
            exp_var_latent_normalised=mean[5],
            rel_var_token_normalised=mean[6],
        )


def _div(a: float, b: float) -> float:
    """a / b as the paper's tensors divide (x/0 -> inf or NaN)."""
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return a / b


def active_entries(
    top_acts: Tensor, top_indices: Tensor, n_latents: int
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The active entries (activation > 0) of sparse codes [n, L, k] as flat tensors: (a f64,
    latent i64, layer column i64, token i64), each [E]; None when nothing is active. MlsaeError
    for a latent index outside 0..n_latents-1."""
    n, L, k = top_acts.shape
    a = top_acts.to(F64).reshape(-1)  # [n*L*k]
    j = top_indices.reshape(-1).long()
    pos = torch.arange(L).view(1, L, 1).expand(n, L, k).reshape(-1)  # layer column
    tok = torch.arange(n).view(n, 1, 1).expand(n, L, k).reshape(-1)
    keep = a > 0
    a, j, pos, tok = a[keep], j[keep], pos[keep], tok[keep]
    if a.numel() == 0:
        return None
    if int(j.min()) < 0 or int(j.max()) >= n_latents:
        raise MlsaeError(f"latent index out of range 0..{n_latents - 1}")
    return a, j, pos, tok


def unique_inverse(keys: Tensor) -> tuple[Tensor, Tensor]:
    """torch.unique(keys, return_inverse=True) of a 1-d tensor (the same result) by a sort and
    unique_consecutive: on CPU about 100x faster for 10^5 keys."""
    ordered, order = keys.sort()
    key, inv_sorted = torch.unique_consecutive(ordered, return_inverse=True)
    inv = torch.empty_like(inv_sorted)
    inv[order] = inv_sorted
    return key, inv
