"""Delta CE / KL for all L layers of one batch vs its bound at this machine's forward speed.

Work per batch: one clean pass (L blocks + final norm and unembedding) and, for each layer l,
a continuation through blocks l+1..L-1 + final norm and unembedding: sum_l (L-1-l) + L block
passes and L+1 unembeddings. The bound prices that work at the speed the model itself runs
here, measured in the same run on the same batch:
    T_blocks = a bare forward stopped after the last block (capture.truncated_forward)
    T_full   = the model's own full forward (blocks + final norm + logits at every position)
    bound    = T_full + sum_l [(L-1-l)/L * T_blocks + (T_full - T_blocks)]
Contenders, repeats interleaved (best and median reported):
    splice   clean_pass + splice() for every layer, one layer at a time (mode "direct")
    batched  clean_pass + splice_layers(): all layers' continuations in one pass
    eval     `mlsae evaluate`'s engine (run_model) with a random SAE of the model's width:
             SAE encode/decode per layer + delta CE/KL (what a user waits for)

    python bench/delta_ce.py              # default model (SmolLM2-135M), real test-split text
    python bench/delta_ce.py --tiny       # a small random GPT-NeoX, no model files needed

The model runs in --dtype (float32, the default: `mlsae` keeps the model in float32); the same
rows in the other dtype follow where the compute-dtype calibration did not find bf16 more than
2x slower on this CPU (or with --both-dtypes), with the eval engine's throughput ratio.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from mlsae.data.capture import truncated_forward
from mlsae.eval.batched import splice_layers
from mlsae.eval.splice import clean_pass, splice


def _default_model(n_ctx: int, ctx: int, dtype: str = "float32"):
    from mlsae.core.config import DataConfig, ModelConfig
    from mlsae.data.model import load_model
    from mlsae.data.text import iter_contexts

    lm = load_model(ModelConfig(dtype=dtype))  # type: ignore[arg-type]
    data = DataConfig(split="test", context_length=ctx)
    ids = torch.stack(list(itertools.islice(iter_contexts(lm.tokenizer, data), n_ctx)))
    return lm.model, ids, lm.special_ids, lm.name


def _tiny_model(n_ctx: int, ctx: int, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=4096,
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=max(ctx, 64),
    )
    model = AutoModelForCausalLM.from_config(cfg).eval().to(getattr(torch, dtype))
    return model, torch.randint(0, 4096, (n_ctx, ctx)), [], "tiny-gpt-neox"


def _recons(cp, layers: list[int]) -> dict[int, torch.Tensor]:
    """A fixed "reconstruction" per layer: the clean vectors plus 10% noise."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in layers:
        x = cp.vectors(layer)
        out[layer] = x + 0.1 * x.std() * torch.randn(x.shape, generator=g)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small random GPT-NeoX instead")
    p.add_argument("--contexts", type=int, default=4, help="contexts in the batch")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-eval", action="store_true", help="skip the run_model contender")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--both-dtypes", action="store_true", help="time the other dtype even if slow")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from mlsae.core.calibrate import cpu_calibration

    cal = cpu_calibration()
    print(f"auto compute dtype (SAE): {cal.summary()}")
    dtypes = [a.dtype]
    other = "bfloat16" if a.dtype == "float32" else "float32"
    if a.both_dtypes or cal.stage != "probe":
        dtypes.append(other)
    else:
        print(
            f"{other} rows skipped: the calibration found bf16 more than 2x slower here "
            "(--both-dtypes times them anyway)"
        )
    best = {}
    for dt in dtypes:
        model, ids, special, name = (_tiny_model if a.tiny else _default_model)(
            a.contexts, a.context_length, dt
        )
        print(f"\n--- model in {dt}")
        best[dt] = run_bench(model, ids, special, name, a)
    if len(best) == 2 and all(best.values()):
        print(
            f"\n{other} / {a.dtype} throughput of the eval engine (best): "
            f"{best[a.dtype] / best[other]:.2f}"
        )


def run_bench(model, ids, special, name: str, a: argparse.Namespace) -> float:
    """Time the contenders on one model (printed); the eval engine's best seconds (0 if not
    run)."""
    L = model.config.num_hidden_layers
    layers = list(range(L))
    n_tok = ids.numel()
    print(
        f"model {name}: {L} blocks; batch {tuple(ids.shape)} = {n_tok} tokens; "
        f"threads {torch.get_num_threads()}; torch {torch.__version__}"
    )

    with torch.inference_mode():
        cp0 = clean_pass(model, ids, layers, special, mode="direct")
        recon = _recons(cp0, layers)
        del cp0

        def run_splice():
            cp = clean_pass(model, ids, layers, special, mode="direct")
            return {la: splice(model, cp, la, recon[la]) for la in layers}

        def run_batched():
            cp = clean_pass(model, ids, layers, special, mode="direct")
            return splice_layers(model, cp, recon)

        fns = {
            "blocks": lambda: truncated_forward(model, ids, L - 1),
            "full": lambda: model(input_ids=ids, use_cache=False),
            "splice": run_splice,
            "batched": run_batched,
        }
        if not a.no_eval:
            fns["eval"] = _eval_fn(model, ids, special, layers)
        times: dict[str, list[float]] = {n: [] for n in fns}
        outs = {}
        for rep in range(a.repeats + 1):
            for n, f in fns.items():
                t0 = time.perf_counter()
                outs[n] = f()
                if rep:  # the first round is the warm-up
                    times[n].append(time.perf_counter() - t0)

    diff = max(
        max(
            abs(outs["splice"][la].ce_sum - outs["batched"][la].ce_sum)
            / max(outs["splice"][la].n, 1),
            abs(outs["splice"][la].kl_sum - outs["batched"][la].kl_sum)
            / max(outs["splice"][la].n, 1),
        )
        for la in layers
    )

    def bound(stat) -> float:
        tb, tf = stat(times["blocks"]), stat(times["full"])
        return tf + sum((L - 1 - la) / L * tb + (tf - tb) for la in layers)

    print(f"\nseconds per batch, wall clock, {a.repeats} interleaved repeats (best / median):")
    for n, v in times.items():
        print(
            f"  {n:8s} {min(v):8.2f} / {statistics.median(v):8.2f}  "
            f"{n_tok / min(v):8.1f} tokens/s (best)"
        )
    for label, stat in (("best", min), ("median", statistics.median)):
        b = bound(stat)
        print(
            f"bound ({label}): {b:.2f} s = {n_tok / b:.1f} tokens/s; "
            + "; ".join(
                f"{n} {b / stat(times[n]):.2f} of bound"
                for n in ("splice", "batched", "eval")
                if n in times
            )
            + "   (goal >= 0.70)"
        )
    print(f"max |per-token delta CE or KL difference| batched vs one layer at a time: {diff:.2e}")
    return min(times["eval"]) if "eval" in times else 0.0


def _eval_fn(model, ids, special, layers):
    """run_model (evaluate's engine) on the batch with a random SAE of the model's width."""
    from mlsae.core.config import SaeConfig
    from mlsae.data.capture import used_mask
    from mlsae.eval.evaluate import Entry, run_model
    from mlsae.sae.autoencoder import SparseAutoencoder

    d = model.config.hidden_size
    sae = SparseAutoencoder(SaeConfig(d_in=d, expansion_factor=8, k=32, layers=layers)).eval()
    used = used_mask(ids, special)

    def run():
        e = Entry("bench", None, sae, layers)  # type: ignore[arg-type]
        run_model([e], model, iter([(ids, used)]), recon=True, ce=True)
        return e

    return run


if __name__ == "__main__":
    main()
