"""Our tuned lens against the tuned-lens package's (Belrose et al.) on the default model.

Both are trained on the same training-split contexts for the same number of optimizer steps of
the same batch size, then evaluated by the same code (mlsae.lens.evaluate.evaluate_lens) on
the same held-out test-split tokens. Printed per block: held-out KL(final || lens) of
  ours      `lens train`'s default: least-squares warm start (no floor), then Adam KL steps,
            stopped on held-out TRAINING contexts (the last --holdout-contexts), each block
            keeping its best translator;
  theirs    tuned_lens.nn.TunedLens.from_model (zero init), trained with the package's own
            recipe (scripts/train_loop.py + ingredients.Optimizer defaults): per translator
            loss sum_v p_final (log p_final - log_softmax(lens)) averaged over positions,
            backward per translator, clip_grad_norm 1.0, SGD Nesterov momentum 0.9,
            lr 1.0 x (1 - 0.9), weight decay 1e-3, linear decay to 0 without warmup; for the
            same number of steps as ours ran (early stopping included);
  floored   ours with --min-singular 0.9 (the old default);
  logit     the logit lens (identity translators);
and cond(I + A_l), the exact inverse's worst-case error gain, of each lens.

Deviations from the package's loop, the same for both lenses: loss over used positions only
(special tokens excluded, as in our training and evaluation) and float32 throughout (their
loop autocasts to bfloat16, ~100x slower than float32 on CPUs without AMX). The package
(`pip install --no-deps tuned-lens==0.2.0 flatten-dict`) is imported from its translators
module only; its translator i acts on hidden_states[i], i.e. our block i - 1, and its saved
lens is read back with mlsae.lens.tuned.load_tuned_lens_package.

Every KL step costs two [tokens, 576] x [576, 49152] matmuls per block, so the defaults are
small enough for 2 shared CPU cores (about an hour there when the machine is loaded): 24
training contexts of 64 tokens (+ 4 held out), at most 24 steps of one context (held-out check
every 6, patience 2), 512 test tokens. `lens train`'s own defaults are larger (120 steps, 128-
token contexts).

    python bench/lens_peer.py
    python bench/lens_peer.py --train-tokens 4096 --context-length 128 --steps 120 --eval-every 10 --patience 3
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch


def train_theirs(model, their_lens, contexts, special_ids, steps, batch_size, seed) -> list:
    """The tuned-lens package's training recipe (see the module docstring); returns the mean
    training KL per translator of each step."""
    from transformers import get_linear_schedule_with_warmup

    from mlsae.data.capture import used_mask

    # tuned_lens.scripts.ingredients.Optimizer's defaults (that module needs torchdata, which
    # would change torch, so its settings are restated): SGD, lr = lr_scale 1.0 x (1 - 0.9),
    # momentum 0.9, Nesterov, weight decay 1e-3; linear schedule with 0 warmup steps for SGD
    params = [p for p in their_lens.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=1.0 * (1 - 0.9), momentum=0.9, nesterov=True, weight_decay=1e-3
    )
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    gen = torch.Generator().manual_seed(seed)
    order = itertools.chain.from_iterable(
        torch.randperm(len(contexts), generator=gen).tolist() for _ in itertools.count()
    )
    hist = []
    model.requires_grad_(False)
    for _ in range(steps):
        ids = contexts[[next(order) for _ in range(batch_size)]]  # [B, T]
        mask = used_mask(ids, special_ids)
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        labels = out.logits.float().log_softmax(-1)[mask]  # [N, V] (token shift 0 for KL)
        total = 0.0
        for i, h in enumerate(out.hidden_states[:-1]):  # translator i on hidden_states[i]
            logits = their_lens(h[mask], idx=i)  # [N, V]
            loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(their_lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
        hist.append(total / len(out.hidden_states[:-1]))
    return hist


def main() -> None:
    from mlsae.core.config import DataConfig, ModelConfig
    from mlsae.core.stage_config import LensTrainConfig
    from mlsae.data.model import load_model
    from mlsae.data.text import take_contexts
    from mlsae.lens.command import split_holdout
    from mlsae.lens.evaluate import evaluate_lens
    from mlsae.lens.train import regression_init, train_lens
    from mlsae.lens.tuned import TunedLens, load_lens

    d = LensTrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-tokens", type=int, default=1536, help="training contexts' tokens")
    ap.add_argument("--holdout-contexts", type=int, default=d.holdout_contexts)
    ap.add_argument("--test-tokens", type=int, default=512)
    ap.add_argument("--context-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24, help="maximum KL steps (ours)")
    ap.add_argument("--batch-size", type=int, default=d.step_contexts)
    ap.add_argument("--eval-every", type=int, default=6)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    lm = load_model(ModelConfig())
    ctx = args.context_length
    n_train_ctx = -(-args.train_tokens // ctx)
    contexts = take_contexts(
        lm.tokenizer,
        DataConfig(split="train", context_length=ctx),
        n_train_ctx + args.holdout_contexts,
    )
    train_ctx, holdout = split_holdout(contexts, args.holdout_contexts)
    test = take_contexts(
        lm.tokenizer, DataConfig(split="test", context_length=ctx), -(-args.test_tokens // ctx)
    )
    batches = [train_ctx[i : i + 8] for i in range(0, len(train_ctx), 8)]

    def ours(min_singular):
        lens = TunedLens(lm.n_layers, lm.d_model, model=lm.name)
        regression_init(
            lm.model, lens, batches, lm.special_ids, min_singular=min_singular, progress=False
        )
        run = train_lens(
            lm.model,
            lens,
            train_ctx,
            lm.special_ids,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=float(d.lr or 1e-3),
            seed=args.seed,
            holdout=holdout,
            eval_every=args.eval_every,
            patience=args.patience,
            progress=True,
        )
        print(f"trained (floor {min_singular}): {run.to_json()}", flush=True)
        return lens, run

    timing = {}
    t = time.perf_counter()
    our_lens, run = ours(None)
    timing["ours"] = time.perf_counter() - t
    n_steps = len(run.history)
    t = time.perf_counter()
    floored, run_f = ours(0.9)
    timing["floored"] = time.perf_counter() - t

    from tuned_lens.nn.lenses import TunedLens as PackageLens

    t = time.perf_counter()
    theirs = PackageLens.from_model(lm.model).float()
    their_hist = train_theirs(
        lm.model, theirs, train_ctx, lm.special_ids, n_steps, args.batch_size, args.seed
    )
    timing["theirs"] = time.perf_counter() - t
    print(f"trained theirs: train KL per step {[round(k, 4) for k in their_hist]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save(tmp)
        their_lens = load_lens(tmp)  # re-indexed onto block outputs

    test_batches = [test[i : i + 2] for i in range(0, len(test), 2)]
    res = {
        name: evaluate_lens(lm.model, lens, test_batches, lm.special_ids, progress=False)
        for name, lens in (("ours", our_lens), ("theirs", their_lens), ("floored", floored))
    }
    layers = res["ours"]["layers"]
    kl = {k: r["tuned"]["kl"] for k, r in res.items()}
    kl["logit"] = res["ours"]["logit"]["kl"]
    cond = {k: r["cond"] for k, r in res.items()}

    print(
        f"model {lm.name}; train {len(train_ctx)} x {ctx} tokens (+ {len(holdout)} held-out "
        f"contexts for our early stopping); test {len(test)} x {ctx} tokens "
        f"({res['ours']['n_kl_positions']} used positions); batch {args.batch_size} "
        f"context(s) per step"
    )
    print(
        f"ours: {n_steps} KL steps ({run.stop_reason}); floored: {len(run_f.history)} steps "
        f"({run_f.stop_reason}); theirs: {n_steps} steps, train KL "
        f"{their_hist[0]:.3f} -> {their_hist[-1]:.3f}"
    )
    head = (
        f"{'block':>5} {'KL ours':>8} {'KL theirs':>9} {'KL floor':>8} {'KL logit':>8} "
        f"{'cond ours':>10} {'cond theirs':>11} {'cond floor':>10}"
    )
    print(head)
    for i, layer in enumerate(layers):
        print(
            f"{layer:>5} {kl['ours'][i]:>8.4f} {kl['theirs'][i]:>9.4f} "
            f"{kl['floored'][i]:>8.4f} {kl['logit'][i]:>8.4f} {cond['ours'][i]:>10.4g} "
            f"{cond['theirs'][i]:>11.4g} {cond['floored'][i]:>10.4g}"
        )
    trained = [i for i, layer in enumerate(layers) if layer != lm.n_layers - 1]
    mean = {k: sum(v[i] for i in trained) / len(trained) for k, v in kl.items()}
    print(" mean " + " ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    worse = [layers[i] for i in trained if kl["ours"][i] > kl["theirs"][i]]
    print(
        f"ours <= theirs at {len(trained) - len(worse)} of {len(trained)} blocks"
        + (f" (worse at {worse})" if worse else "")
    )
    print(
        "wall s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in timing.items())
        + f", total {time.perf_counter() - t0:.0f}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "layers": layers,
            "kl": kl,
            "cond": cond,
            "steps": n_steps,
            "ours_training": run.to_json(),
            "floored_training": run_f.to_json(),
            "their_train_kl": their_hist,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        from mlsae.core.io import write_json

        write_json(args.out, payload)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
