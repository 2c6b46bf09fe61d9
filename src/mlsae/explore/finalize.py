"""Turn one SAE's streaming accumulators (`mlsae.explore.index.SaeIndexer`) into database rows."""

from __future__ import annotations

import math
from collections import Counter
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
    n, L, m, w = res.n_tokens, x.L, x.m, x.w
    C, W = x.top.C, 2 * w + 1
    count = x.count.view(L, m).numpy()
    S = x.stats.S.numpy()  # [L, m] sum of activations
    pairs = x.stats.pairs.numpy()  # [m] tokens active at >= 1 layer
    tkey = x.top.key.view(L, m, C).numpy()
    tpos = x.top.data["pos"].view(L, m, C).numpy()
    twin = x.top.data["win"].view(L, m, C, W).numpy()
    B = x.hist.numel() // m
    hist = x.hist.view(m, B).numpy()
    skey = x.sample.key.numpy()
    spos, slay = x.sample.data["pos"].numpy(), x.sample.data["layer"].numpy()
    sact, swin = x.sample.data["act"].numpy(), x.sample.data["win"].numpy()
    hv, hi, lv, li = (t.numpy() for t in effects)
    nv, ni = (t.numpy() for t in neigh)
    layers = x.rs.layers
    lat, ex, tok = [], [], []
    for j in range(m):
        cnt = count[:, j]
        alive = pairs[j] > 0
        best = []  # (act, pos) over all layers
        for p in range(L):
            ok = np.isfinite(tkey[p, j])
            if not ok.any():
                continue
            k = int(ok.sum())
            ex.append(
                (
                    sae_id,
                    j,
                    "top",
                    layers[p],
                    tpos[p, j, :k].astype(np.int32).tobytes(),
                    tkey[p, j, :k].astype(np.float32).tobytes(),
                    twin[p, j, :k].astype(np.float16).tobytes(),
                    None,
                    None,
                )
            )
            best += zip(tkey[p, j, :k].tolist(), tpos[p, j, :k].tolist(), strict=True)
        ok = np.isfinite(skey[j])
        if ok.any():
            acts = sact[j][ok]
            pick, band = _quantile_pick(acts)
            sel = np.nonzero(ok)[0][pick]
            ex.append(
                (
                    sae_id,
                    j,
                    "quantile",
                    -1,
                    spos[j, sel].astype(np.int32).tobytes(),
                    sact[j, sel].astype(np.float32).tobytes(),
                    swin[j, sel].astype(np.float16).tobytes(),
                    np.asarray(layers)[slay[j, sel]].astype(np.int16).tobytes(),
                    band.tobytes(),
                )
            )
        best.sort(key=lambda e: -e[0])
        tc: Counter[int] = Counter()
        tmax: dict[int, float] = {}
        for a, pos in best:
            t = int(stream[pos])
            tc[t] += 1
            tmax[t] = max(tmax.get(t, 0.0), a)
        tops = sorted(tc, key=lambda t: (-tc[t], -tmax[t], t))[:N_TOKENS]
        tok += [(sae_id, t, j, tc[t], _num(tmax[t])) for t in tops]
        texts = []
        for _, pos in best[:N_TEXT]:
            ids, _ = window_ids(stream, int(pos), w, ctx)
            texts.append("".join(vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in ids))
        mean_act = S[:, j].sum() / cnt.sum() if cnt.sum() else math.nan
        row = {
            "layer_count": cnt.tolist(),
            "layer_mean": [_num(S[p, j] / cnt[p]) if cnt[p] else None for p in range(L)],
            "layer_dist": [_num(v) for v in res.p_layer_given_latent[j]],
            "hist": [[int(b), int(c)] for b, c in enumerate(hist[j]) if c],
            "logit_pos": [[int(i), _num(v)] for i, v in zip(hi[j], hv[j], strict=True)],
            "logit_neg": [[int(i), _num(v)] for i, v in zip(li[j], lv[j], strict=True)],
            "neighbours": [[int(i), _num(v)] for i, v in zip(ni[j], nv[j], strict=True)],
            "top_tokens": [[t, tc[t], _num(tmax[t])] for t in tops],
        }
        lat.append(
            (
                sae_id,
                j,
                int(pairs[j]),
                pairs[j] / n if n else None,
                _num(best[0][0]) if best else None,
                _num(mean_act),
                _num(res.expected_layer[j]) if alive else None,
                _num(res.var_latent[j]) if alive else None,
                row,
                "\n".join(texts),
            )
        )
    return lat, ex, tok
