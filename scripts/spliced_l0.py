"""Active latents per vector at each block of the model, on the clean residual stream and on the
stream with every block's reconstruction spliced in (as `mlsae evaluate --replace all` does): why
a threshold code (BatchTopK, per-token TopK) chains differently from TopK's fixed k. Also the
relative distance ||h_spliced - h_clean|| / ||h_clean|| of each block's input to the SAE, and the
reconstruction's gain: the median over tokens of ||x_hat - mean(x)|| / ||x - mean(x)|| (the factor
by which a splice scales a vector's deviation from its mean: 1 keeps the norm).

Usage: python scripts/spliced_l0.py RUN/sae CACHE [TOKENS]  (the cache's first TOKENS tokens,
whole contexts; its masked positions, e.g. the sink, are neither counted nor replaced)
"""

from __future__ import annotations

import sys

import torch

from mlsae.activations.cache import ActivationCache
from mlsae.core.config import ModelConfig
from mlsae.data.capture import block_output, get_blocks
from mlsae.data.model import load_model
from mlsae.sae.folders import load_sae


def main() -> None:
    sae = load_sae(sys.argv[1])
    cache = ActivationCache(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    ctx = int(cache.info["context_length"])
    ids, mask = cache.block_ids(0)
    n = n // ctx * ctx
    input_ids, used = ids[:n].view(-1, ctx), mask[:n].view(-1, ctx)
    lm = load_model(ModelConfig(model=cache.info.get("model"), dtype="float32", device="cpu"))
    blocks = get_blocks(lm.model)
    layers = list(sae.cfg.layers)
    got: dict[str, dict[int, tuple[float, torch.Tensor, float]]] = {"clean": {}, "spliced": {}}

    def hook_for(block: int, mode: str):
        def hook(_m, _inp, out):
            h = block_output(out)
            x = h[used]  # [n_used, d]
            with torch.no_grad():
                enc = sae.encode(x, block)
                l0 = float((enc.top_acts > 0).sum(1).float().mean())
                x_hat = sae.decode(enc)
                mean = x.mean(1, keepdim=True)
                gain = float(((x_hat - mean).norm(dim=1) / (x - mean).norm(dim=1)).median())
                got[mode][block] = (l0, x.clone(), gain)
                if mode == "clean":
                    return None
                h = h.clone()
                h[used] = x_hat.to(h.dtype)
            return type(out)((h, *out[1:])) if isinstance(out, (tuple, list)) else h

        return hook

    for mode in ("clean", "spliced"):
        handles = [blocks[b].register_forward_hook(hook_for(b, mode)) for b in layers]
        try:
            with torch.no_grad():
                lm.model(input_ids=input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    print(f"{sys.argv[1]}: {int(used.sum())} tokens; threshold {getattr(sae, 'threshold', None)}")
    print(
        "block  L0 clean  L0 spliced  gain clean  gain spliced  ||h_spliced - h_clean|| / ||h_clean||"
    )
    for b in layers:
        (lc, xc, gc), (ls, xs, gs) = got["clean"][b], got["spliced"][b]
        drift = float((xs - xc).norm() / xc.norm())
        print(f"{b:5d} {lc:9.1f} {ls:11.1f} {gc:11.3f} {gs:13.3f} {drift:12.4g}")


if __name__ == "__main__":
    main()
