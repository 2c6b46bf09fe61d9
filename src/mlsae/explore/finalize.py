"""Turn one SAE's streaming accumulators (`mlsae.explore.index.SaeIndexer`) into database rows."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

N_TEXT = 8  # best examples whose windows make a latent's searchable text
N_TOKENS = 5  # tokens per latent in the search-by-token table
PER_BAND = 4  # quantile examples shown per quartile band


def _num(v: float) -> float | None:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


def window_ids(stream: np.ndarray, pos: int, w: int, ctx: int) -> tuple[list[int], int]:
    """Token ids of pos-w..pos+w clipped to pos's context, and the index of pos in them."""
    c0 = pos // ctx * ctx
    lo, hi = max(c0, pos - w), min(c0 + ctx, pos + w + 1, len(stream))
    return stream[lo:hi].tolist(), pos - lo


def _bands(acts: np.ndarray) -> np.ndarray:
    """Quartile band 0..3 of each activation within the sample (by the sample's quartiles)."""
    q = np.quantile(acts, [0.25, 0.5, 0.75])
    return np.searchsorted(q, acts, side="right").astype(np.int8)


def _quantile_pick(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending activation) of up to PER_BAND evenly spaced examples per band."""
    order = np.argsort(acts, kind="stable")
    bands = _bands(acts[order])
    pick = []
    for b in range(4):
        members = order[bands == b]
        if len(members):
            at = np.unique(np.linspace(0, len(members) - 1, min(PER_BAND, len(members))).round())
            pick.extend(members[at.astype(int)].tolist())
    pick_arr = np.asarray(pick, dtype=np.int64)
    return pick_arr, _bands(acts)[pick_arr]


@dataclass
class _Arrays:
    """One SaeIndexer's accumulators as numpy views (shapes: L blocks, m latents, C top
    examples per block, W window tokens)."""

    sae_id: int
    layers: list[int]
    count: np.ndarray  # [L, m] active tokens
    S: np.ndarray  # [L, m] sum of activations
    pairs: np.ndarray  # [m] tokens active at >= 1 layer
    tkey: np.ndarray  # [L, m, C] top activations (NaN: empty)
    tpos: np.ndarray  # [L, m, C]
    twin: np.ndarray  # [L, m, C, W]
    hist: np.ndarray  # [m, B]
    skey: np.ndarray  # [m, S] sampled activations (NaN: empty)
    spos: np.ndarray
    slay: np.ndarray
    sact: np.ndarray
    swin: np.ndarray

    @classmethod
    def of(cls, sae_id: int, x: Any) -> _Arrays:
        L, m, C, W = x.L, x.m, x.top.C, 2 * x.w + 1
        sample = x.sample.data
        return cls(
            sae_id,
            list(x.rs.layers),
            x.count.view(L, m).numpy(),
            x.stats.S.numpy(),
            x.stats.pairs.numpy(),
            x.top.key.view(L, m, C).numpy(),
            x.top.data["pos"].view(L, m, C).numpy(),
            x.top.data["win"].view(L, m, C, W).numpy(),
            x.hist.view(m, x.hist.numel() // m).numpy(),
            x.sample.key.numpy(),
            sample["pos"].numpy(),
            sample["layer"].numpy(),
            sample["act"].numpy(),
            sample["win"].numpy(),
        )

    def top_examples(self, j: int, ex: list[tuple]) -> list[tuple[float, int]]:
        """Append latent j's top-example rows per block; its (act, pos) over all blocks."""
        best: list[tuple[float, int]] = []
        for p in range(len(self.layers)):
            k = int(np.isfinite(self.tkey[p, j]).sum())
            if k == 0:
                continue
            ex.append(
                (
                    self.sae_id,
                    j,
                    "top",
                    self.layers[p],
                    self.tpos[p, j, :k].astype(np.int32).tobytes(),
                    self.tkey[p, j, :k].astype(np.float32).tobytes(),
                    self.twin[p, j, :k].astype(np.float16).tobytes(),
                    None,
                    None,
                )
            )
            best += zip(self.tkey[p, j, :k].tolist(), self.tpos[p, j, :k].tolist(), strict=True)
        best.sort(key=lambda e: -e[0])
        return best

    def quantile_examples(self, j: int, ex: list[tuple]) -> None:
        """Append latent j's quantile-example row (examples spread over its activations)."""
        ok = np.isfinite(self.skey[j])
        if not ok.any():
            return
        pick, band = _quantile_pick(self.sact[j][ok])
        sel = np.nonzero(ok)[0][pick]
        ex.append(
            (
                self.sae_id,
                j,
                "quantile",
                -1,
                self.spos[j, sel].astype(np.int32).tobytes(),
                self.sact[j, sel].astype(np.float32).tobytes(),
                self.swin[j, sel].astype(np.float16).tobytes(),
                np.asarray(self.layers)[self.slay[j, sel]].astype(np.int16).tobytes(),
                band.tobytes(),
            )
        )


def _top_tokens(
    best: list[tuple[float, int]], stream: np.ndarray
) -> tuple[list[int], Counter[int], dict[int, float]]:
    """The N_TOKENS most frequent tokens among a latent's top examples (ties: larger max
    activation, then smaller id), with each token's count and max activation."""
    counts: Counter[int] = Counter()
    tmax: dict[int, float] = {}
    for a, pos in best:
        t = int(stream[pos])
        counts[t] += 1
        tmax[t] = max(tmax.get(t, 0.0), a)
    tops = sorted(counts, key=lambda t: (-counts[t], -tmax[t], t))[:N_TOKENS]
    return tops, counts, tmax


def sae_rows(
    sae_id: int,
    x: Any,
    effects: tuple[torch.Tensor, ...],
    neigh: tuple[torch.Tensor, torch.Tensor],
    stream: np.ndarray,
    vocab: list[str],
    ctx: int,
) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(latent rows, example rows, token_latent rows) of one SaeIndexer `x` (see db.SCHEMA)."""
    res = x.stats.result()
    n, L, w = res.n_tokens, x.L, x.w
    arr = _Arrays.of(sae_id, x)
    hv, hi, lv, li = (t.numpy() for t in effects)
    nv, ni = (t.numpy() for t in neigh)
    lat, ex, tok = [], [], []
    for j in range(x.m):
        cnt, S = arr.count[:, j], arr.S[:, j]
        alive = arr.pairs[j] > 0
        best = arr.top_examples(j, ex)
        arr.quantile_examples(j, ex)
        tops, tc, tmax = _top_tokens(best, stream)
        tok += [(sae_id, t, j, tc[t], _num(tmax[t])) for t in tops]
        texts = []
        for _, pos in best[:N_TEXT]:
            ids, _ = window_ids(stream, int(pos), w, ctx)
            texts.append("".join(vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in ids))
        mean_act = S.sum() / cnt.sum() if cnt.sum() else math.nan
        row = {
            "layer_count": cnt.tolist(),
            "layer_mean": [_num(S[p] / cnt[p]) if cnt[p] else None for p in range(L)],
            "layer_dist": [_num(v) for v in res.p_layer_given_latent[j]],
            "hist": [[int(b), int(c)] for b, c in enumerate(arr.hist[j]) if c],
            "logit_pos": [[int(i), _num(v)] for i, v in zip(hi[j], hv[j], strict=True)],
            "logit_neg": [[int(i), _num(v)] for i, v in zip(li[j], lv[j], strict=True)],
            "neighbours": [[int(i), _num(v)] for i, v in zip(ni[j], nv[j], strict=True)],
            "top_tokens": [[t, tc[t], _num(tmax[t])] for t in tops],
        }
        lat.append(
            (
                sae_id,
                j,
                int(arr.pairs[j]),
                arr.pairs[j] / n if n else None,
                _num(best[0][0]) if best else None,
                _num(mean_act),
                _num(res.expected_layer[j]) if alive else None,
                _num(res.var_latent[j]) if alive else None,
                row,
                "\n".join(texts),
            )
        )
    return lat, ex, tok
