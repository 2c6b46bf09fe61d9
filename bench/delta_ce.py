"""Cost of delta CE / KL for all L layers: one clean pass + continuations from block l+1
(splice.py, mode "direct") vs L naive full forward passes with a hook replacing block l's
output (mode "hook"). Same batch, same reconstructions, same loss computation, one run;
the two are interleaved layer by layer (minimum over `--repeats` reported).

    python bench/delta_ce.py            # default model (SmolLM2-135M), real test-split text
    python bench/delta_ce.py --tiny     # a small random GPT-NeoX, no model files needed
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from mlsae.eval.splice import clean_pass, splice


def _default_model(n_ctx: int, ctx: int):
    from mlsae.core.config import DataConfig, ModelConfig
    from mlsae.data.model import load_model
    from mlsae.data.text import iter_contexts

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


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def bench(model, ids, special_ids, layers: list[int]) -> dict[str, float]:
    """Seconds per part, the two methods interleaved step by step (clean pass, then layer by
    layer, alternating which goes first) so that both see the same machine load."""
    t = {"direct_clean": 0.0, "direct_splice": 0.0, "hook_clean": 0.0, "hook_splice": 0.0}
    cps = {}
    for mode in ("direct", "hook"):
        dt, cps[mode] = _timed(lambda: clean_pass(model, ids, layers, special_ids, mode=mode))  # noqa: B023
        t[f"{mode}_clean"] += dt
    g = torch.Generator().manual_seed(0)
    diff = 0.0
    for i, layer in enumerate(layers):
        x = cps["direct"].vectors(layer)
        x_hat = x + 0.1 * x.std() * torch.randn(x.shape, generator=g)  # a fixed "reconstruction"
        ce = {}
        for mode in ("direct", "hook") if i % 2 == 0 else ("hook", "direct"):
            dt, s = _timed(lambda: splice(model, cps[mode], layer, x_hat))  # noqa: B023
            t[f"{mode}_splice"] += dt
            ce[mode] = s.ce_sum / max(s.n, 1)
        diff = max(diff, abs(ce["direct"] - ce["hook"]))
    return {**t, "max_diff": diff}


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
    L = len(layers)
    print(f"model {name}: {L} blocks; batch {tuple(ids.shape)}; threads {torch.get_num_threads()}")
    with torch.inference_mode():
        bench(model, ids, special, layers[-2:])  # warm-up
        runs = [bench(model, ids, special, layers) for _ in range(max(1, a.repeats))]
    r = {k: min(x[k] for x in runs) for k in runs[0]}
    ours = r["direct_clean"] + r["direct_splice"]
    print(f"splice: clean pass {r['direct_clean']:.2f} s + {L} continuations "
          f"{r['direct_splice']:.2f} s = {ours:.2f} s")  # fmt: skip
    print(f"naive: {L} full passes with a replacing hook {r['hook_splice']:.2f} s "
          f"(+ a clean full pass {r['hook_clean']:.2f} s)")  # fmt: skip
    print(f"ratio splice / naive {L} passes     {ours / r['hook_splice']:.3f}   (goal <= 0.6)")
    print(f"ratio incl. the naive clean pass    {ours / (r['hook_clean'] + r['hook_splice']):.3f}")
    print(f"max |delta CE difference| between the two paths: {r['max_diff']:.2e}")


if __name__ == "__main__":
    main()
