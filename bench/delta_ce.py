"""Cost of delta CE / KL for all L layers: one clean pass + continuations from block l+1
(splice.py, mode "direct") vs L naive full forward passes with a hook replacing block l's
output (mode "hook"). Same batch, same reconstructions, same loss computation, one run;
the two are interleaved and each timed `--repeats` times (minimum reported).

    python bench/delta_ce.py            # default model (SmolLM2-135M), real test-split text
    python bench/delta_ce.py --tiny     # a small random GPT-NeoX, no model files needed
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from mlsae.splice import clean_pass, splice


def _default_model(n_ctx: int, ctx: int):
    from mlsae.config import DataConfig, ModelConfig
    from mlsae.model import load_model
    from mlsae.text import iter_contexts

    lm = load_model(ModelConfig())
    data = DataConfig(split="test", context_length=ctx)
    ids = torch.stack(list(itertools.islice(iter_contexts(lm.tokenizer, data), n_ctx)))
    return lm.model, ids, lm.special_ids, lm.name


def _tiny_model(n_ctx: int, ctx: int):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=4096, hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=max(ctx, 64),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, torch.randint(0, 4096, (n_ctx, ctx)), [], "tiny-gpt-neox"


def run(model, ids, special_ids, mode: str, recon: dict[int, torch.Tensor] | None, layers):
    """Spliced evaluations of `layers` in one mode: (clean-pass seconds, splice seconds,
    per-layer delta CE, reconstructions)."""
    t0 = time.perf_counter()
    cp = clean_pass(model, ids, layers, special_ids, mode=mode)  # type: ignore[arg-type]
    t_clean = time.perf_counter() - t0
    if recon is None:  # a fixed "reconstruction": the clean vector plus 10% noise
        g = torch.Generator().manual_seed(0)
        recon = {}
        for layer in layers:
            x = cp.vectors(layer)
            recon[layer] = x + 0.1 * x.std() * torch.randn(x.shape, generator=g)
    out = []
    t0 = time.perf_counter()
    for layer in layers:
        s = splice(model, cp, layer, recon[layer])
        out.append(s.ce_sum / max(s.n, 1))
    return t_clean, time.perf_counter() - t0, out, recon


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small random GPT-NeoX instead")
    p.add_argument("--contexts", type=int, default=2, help="contexts in the batch")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    load = _tiny_model if a.tiny else _default_model
    model, ids, special, name = load(a.contexts, a.context_length)
    layers = list(range(model.config.num_hidden_layers))
    print(f"model {name}: {len(layers)} blocks; batch {tuple(ids.shape)}; threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    with torch.inference_mode():
        run(model, ids, special, "direct", None, layers[-2:])  # warm-up
        recon = None
        t: dict[str, list[tuple[float, float]]] = {"direct": [], "hook": []}
        ce: dict[str, list[float]] = {}
        for _ in range(max(1, a.repeats)):  # interleaved, so both see the same machine load
            for mode in ("direct", "hook"):
                tc, ts, ce[mode], recon = run(model, ids, special, mode, recon, layers)
                t[mode].append((tc, ts))
    diff = max(abs(x - y) for x, y in zip(ce["direct"], ce["hook"], strict=True))
    dc, ds = min(t["direct"], key=sum)
    hc, hs = min(t["hook"], key=sum)
    L = len(layers)
    print(f"splice: clean pass {dc:.2f} s + {L} continuations {ds:.2f} s = {dc + ds:.2f} s")
    print(f"naive: {L} full passes with a replacing hook {hs:.2f} s (+ its clean pass {hc:.2f} s)")
    print(f"ratio splice / naive {L} passes          {(dc + ds) / hs:.3f}   (goal <= 0.6)")
    print(f"ratio incl. the naive clean pass         {(dc + ds) / (hc + hs):.3f}")
    print(f"max |delta CE difference| between the two paths: {diff:.2e}")


if __name__ == "__main__":
    main()
