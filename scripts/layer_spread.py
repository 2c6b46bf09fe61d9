"""How an MLSAE's active latents spread over one token's layers, and its per-layer FVU, on the
first T used tokens of an activation cache (docs/architectures.md quotes it):
`python scripts/layer_spread.py SAE_DIR CACHE [T]`.

For each code (the SAE's `encode`; for a per-token TopK SAE also `encode_grouped`, its training
selection of k x L latents per token): active latents per (token, layer), a layer's share of a
token's active latents (x L: 1 = uniform), how many layers each active (token, latent) pair spans,
and the raw-space FVU of each layer over the T tokens.
"""

from __future__ import annotations

import sys
import time

import torch

from mlsae.activations.cache import ActivationCache
from mlsae.sae.folders import load_sae
from mlsae.sae.token_topk import TokenTopKSAE

CHUNK = 128
"""Tokens encoded together."""


def main() -> None:
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    sae = load_sae(sys.argv[1])
    src = ActivationCache(sys.argv[2])
    n_tok = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    lpos = src.layer_positions(sae.cfg.layers)
    blocks = [b.activations[b.mask][:, lpos].float() for b in src.iter_ordered(n_tok * 2)]
    x = torch.cat(blocks)[:n_tok]  # [T, L, d]
    n_tok, n_l, d = x.shape
    modes = ["encode"] + (["encode_grouped"] if isinstance(sae, TokenTopKSAE) else [])
    for mode in modes:
        counts, spans, x_hat = [], [], []
        for i in range(0, n_tok, CHUNK):
            xx = x[i : i + CHUNK].reshape(-1, d)
            enc = (
                sae.encode_grouped(xx)
                if isinstance(sae, TokenTopKSAE) and mode != "encode"
                else sae.encode(xx)
            )
            on = (sae.dense_acts(enc) > 0).view(-1, n_l, sae.cfg.d_sae)  # [t, L, m]
            counts.append(on.sum(2))
            spans.append(on.sum(1)[on.any(1)])
            x_hat.append(sae.decode(enc).view(-1, n_l, d))
        c, s = torch.cat(counts).float(), torch.cat(spans)
        fvu = (x - torch.cat(x_hat)).pow(2).sum((0, 2)) / (x - x.mean(0)).pow(2).sum((0, 2))
        share = (c / c.sum(1, keepdim=True).clamp_min(1)).mean(0) * n_l
        hist = torch.bincount(s, minlength=n_l + 1)[1:].double() / len(s)
        print(f"## {sys.argv[1]} [{mode}], {n_tok} tokens x {n_l} layers")
        print(
            f"active per (token, layer): mean {c.mean():.1f} sd {c.std():.1f} min {int(c.min())} "
            f"max {int(c.max())}; sd over a token's layers {c.std(1).mean():.1f}"
        )
        print(
            f"(token, latent) pairs at 1 layer {hist[0]:.3f}, 2-5 {hist[1:5].sum():.3f}, "
            f"6-15 {hist[5:15].sum():.3f}, 16+ {hist[15:].sum():.3f}; mean {s.float().mean():.2f}"
        )
        print("layer share x L:", " ".join(f"{v:.2f}" for v in share.tolist()))
        print(f"FVU mean {fvu.mean():.3f}; by layer:", " ".join(f"{v:.2f}" for v in fvu.tolist()))
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
