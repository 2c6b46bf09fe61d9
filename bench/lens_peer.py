"""A fair comparison of tuned lenses on the default model (issue 24, item 6): the tuned-lens
package's recipe against ours with and without the least-squares warm start, at equal training
tokens, on the same held-out test positions, with 95% bootstrap intervals over test contexts
and the spread over seeds.

Arms (every one evaluated by mlsae.lens.evaluate.lens_kl_sums on the same test contexts):
  theirs      tuned_lens.nn.TunedLens.from_model (zero init: the identity), trained with the
              package's own recipe (scripts/train_loop.py + ingredients.Optimizer defaults): per
              translator loss sum_v p_final (log p_final - log_softmax(lens)) averaged over
              positions, backward per translator, clip_grad_norm 1.0, SGD Nesterov momentum 0.9,
              lr 1.0 x (1 - 0.9), weight decay 1e-3, linear decay to 0 without warmup, for
              --steps steps of --batch-size contexts; the last translators are kept;
  warm        `lens train`'s default: least-squares warm start (no floor), then at most --steps
              Adam KL steps, stopped early on held-out TRAINING contexts (--holdout-contexts),
              each block keeping its best translator;
  zero        the same KL steps from the identity (`lens train --init zero`);
  floor_init  warm with --min-singular F: the floor binds at the warm start only;
  floor_kept  warm with --min-singular F --keep-floor: the floor is kept through the KL steps
              (each translator projected after every step);
  cond_kept   warm with --cond-cap C: cond(I + A) <= C at the warm start and after every step;
  logit       the logit lens (identity translators).
Equal tokens: seed s trains every arm on the same --train-tokens of training-split contexts
(block s of them, disjoint across seeds; the data order is seeded by s too): the warm start's
regression reads all of them once, the KL steps cycle through them (--steps x --batch-size
contexts, by default exactly one pass). The held-out contexts (ours' early stopping) are never
trained on and are the same for all seeds.

Deviations from the package's loop: loss over used positions only (special tokens excluded, as
in our training and evaluation) and float32 throughout (their loop autocasts to bfloat16, ~100x
slower than float32 on CPUs without AMX). The package (`pip install --no-deps tuned-lens==0.2.0
flatten-dict`) is imported from its nn module only; its translator i acts on hidden_states[i],
i.e. our block i - 1, and its saved lens is read back with mlsae.lens.tuned.load_lens.

Per seed the script writes OUT/seed<s>.json (per-layer KL, per-context KL sums, cond(I + A),
training logs, wall times), so an interrupted run keeps its finished seeds; --report OUT prints
the tables from those files: per arm the mean KL over blocks 0-28 per seed, mean +- sd over
seeds, the 95% interval over test contexts of the seed-averaged mean KL, and the paired
interval of its difference to the package's lens (the same resamples for both arms).

--blocks restricts every lens to some blocks (every KL step costs two [tokens, d] x [d, vocab]
matmuls per block, so 8 blocks cost ~1/3.6 of 29); the package's translators of the other
blocks then get no gradient, so its clip_grad_norm 1.0 covers only the trained ones.

    nice -n 5 python bench/lens_peer.py --out /work/runs/lens/peer --seeds 0 1 2
    python bench/lens_peer.py --report /work/runs/lens/peer
    # issue 24's run (2 processes on a loaded 2-core machine):
    A="--train-tokens 1024 --test-tokens 512 --context-length 64 --eval-every 8 --patience 2
       --cond-cap 10 --blocks 0 4 8 12 16 20 24 28 --out /work/runs/lens/peer --save-lenses"
    python bench/lens_peer.py $A --seeds 0 --arms theirs warm zero logit floor_init \
        floor_kept cond_kept
    python bench/lens_peer.py $A --seeds 1 2 --arms theirs warm zero
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

ARMS = ("theirs", "warm", "zero", "floor_init", "floor_kept", "cond_kept", "logit")


def train_theirs(model, their_lens, contexts, special_ids, steps, batch_size, seed, blocks) -> list:
    """The tuned-lens package's training recipe (see the module docstring) for the translators
    of `blocks` (ours; the package's translator b + 1); returns the mean training KL per
    translator of each step."""
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
        for b in blocks:  # the package's translator i = b + 1 acts on hidden_states[i]
            h = out.hidden_states[b + 1]
            logits = their_lens(h[mask], idx=b + 1)  # [N, V]
            loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(their_lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
        hist.append(total / len(blocks))
    return hist


def _args() -> argparse.Namespace:
    from mlsae.core.stage_config import LensTrainConfig

    d = LensTrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-tokens", type=int, default=2048, help="training tokens per seed")
    ap.add_argument("--holdout-contexts", type=int, default=d.holdout_contexts)
    ap.add_argument("--test-tokens", type=int, default=1024)
    ap.add_argument("--context-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="KL steps (default: one pass)")
    ap.add_argument("--batch-size", type=int, default=d.step_contexts, help="contexts per step")
    ap.add_argument("--lr", type=float, default=float(d.lr or 1e-3), help="ours (Adam)")
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--min-singular", type=float, default=0.9, help="floor of the floor arms")
    ap.add_argument("--cond-cap", type=float, default=10.0, help="cap of the cond_kept arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=None,
        help="train and evaluate translators of these blocks only (default: all but the last)",
    )
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", type=Path, default=None, help="folder for seed<s>.json")
    ap.add_argument("--save-lenses", action="store_true", help="also save OUT/lenses/<arm>_s<s>")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples (--report)")
    ap.add_argument("--report", type=Path, default=None, help="print the tables of this folder")
    return ap.parse_args()


def _data(lm, args):
    """(training contexts per seed, held-out contexts, test batches): the split's first
    --holdout-contexts contexts are held out, then seed s trains on block s of the rest."""
    from mlsae.core.config import DataConfig
    from mlsae.data.text import take_contexts

    ctx = args.context_length
    n_train = -(-args.train_tokens // ctx)
    n_hold = args.holdout_contexts
    contexts = take_contexts(
        lm.tokenizer,
        DataConfig(split="train", context_length=ctx),
        n_hold + n_train * (max(args.seeds) + 1),
    )
    holdout = contexts[:n_hold]  # the same for every seed
    train = {s: contexts[n_hold + s * n_train : n_hold + (s + 1) * n_train] for s in args.seeds}
    test = take_contexts(
        lm.tokenizer, DataConfig(split="test", context_length=ctx), -(-args.test_tokens // ctx)
    )
    return train, holdout, [test[i : i + 2] for i in range(0, len(test), 2)]


def _layers(lm, args) -> list[int]:
    """The lenses' blocks: --blocks (default every block) and the last (identity) block."""
    blocks = args.blocks if args.blocks else list(range(lm.n_layers - 1))
    args.blocks = blocks
    return sorted(set(blocks) | {lm.n_layers - 1})


def _train_arm(arm, lm, train_ctx, holdout, args, seed, steps):
    """One trained lens of `arm` (not logit) and its training record."""
    layers = _layers(lm, args)
    from mlsae.lens.train import regression_init, train_lens
    from mlsae.lens.tuned import TunedLens, load_lens

    if arm == "theirs":
        from tuned_lens.nn.lenses import TunedLens as PackageLens

        theirs = PackageLens.from_model(lm.model).float()
        hist = train_theirs(
            lm.model, theirs, train_ctx, lm.special_ids, steps, args.batch_size, seed, args.blocks
        )
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save(tmp)
            full = load_lens(tmp)  # re-indexed onto block outputs
        lens = TunedLens(lm.n_layers, lm.d_model, layers, model=lm.name)
        for b in args.blocks:
            lens._set(b, full.A(b), full.c(b))
        return lens, {"steps_run": len(hist), "train_kl": [round(k, 5) for k in hist]}
    lens = TunedLens(lm.n_layers, lm.d_model, layers, model=lm.name)
    floor = args.min_singular if arm.startswith("floor") else None
    cap = args.cond_cap if arm == "cond_kept" else None
    if arm != "zero":
        batches = [train_ctx[i : i + 8] for i in range(0, len(train_ctx), 8)]
        regression_init(
            lm.model,
            lens,
            batches,
            lm.special_ids,
            min_singular=floor,
            progress=False,
            max_cond=cap,
        )
    run = train_lens(
        lm.model,
        lens,
        train_ctx,
        lm.special_ids,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        holdout=holdout,
        eval_every=args.eval_every,
        patience=args.patience,
        progress=False,
        min_singular=floor if arm == "floor_kept" else None,
        max_cond=cap,
    )
    return lens, run.to_json()


def run_seed(lm, seed, data, args) -> dict:
    """Train and evaluate every arm for one seed; the JSON record of seed<s>.json."""
    from mlsae.lens.command import _singular_summary
    from mlsae.lens.evaluate import lens_kl_sums
    from mlsae.lens.tuned import TunedLens

    train, holdout, test_batches = data
    train_ctx = train[seed]
    steps = args.steps or -(-len(train_ctx) // args.batch_size)
    record: dict = {"seed": seed, "train_tokens": int(train_ctx.numel()), "steps": steps}
    arms: dict = {}
    for arm in args.arms:
        torch.manual_seed(seed)
        t = time.perf_counter()
        if arm == "logit":
            lens, training = TunedLens(lm.n_layers, lm.d_model, _layers(lm, args)), {}
        else:
            lens, training = _train_arm(arm, lm, train_ctx, holdout, args, seed, steps)
        wall_train = time.perf_counter() - t
        if args.save_lenses and args.out is not None:
            lens.save(args.out / "lenses" / f"{arm}_s{seed}")
        t = time.perf_counter()
        sums = lens_kl_sums(lm.model, lens, test_batches, lm.special_ids, False, False)
        n = sums.n_kl
        arms[arm] = {
            "layers": sums.layers,
            "kl": [float(v) / n for v in sums.sums["tk"]],
            "per_context": sums.per_context[:, 0].tolist(),  # [C, L + 1]: KL sums, positions
            "cond": [lens.cond(layer) for layer in sums.layers],
            "singular_values": _singular_summary(lens) if arm != "logit" else None,
            "training": training,
            "wall_train_s": round(wall_train, 1),
            "wall_eval_s": round(time.perf_counter() - t, 1),
        }
        kl = arms[arm]["kl"][:-1]
        print(
            f"seed {seed} {arm:>10}: mean KL blocks 0-{len(kl) - 1} {sum(kl) / len(kl):.4f}, "
            f"max cond {max(arms[arm]['cond']):.3g}, train {wall_train:.0f} s, "
            f"eval {arms[arm]['wall_eval_s']:.0f} s",
            flush=True,
        )
    record["arms"] = arms
    record["n_test_positions"] = n
    record["n_test_contexts"] = len(arms[args.arms[0]]["per_context"])
    return record


def main() -> None:
    args = _args()
    if args.report is not None:
        report(args.report, args.bootstrap)
        return
    from mlsae.core.config import ModelConfig
    from mlsae.core.io import read_json_object, write_json
    from mlsae.data.model import load_model

    t0 = time.perf_counter()
    lm = load_model(ModelConfig())
    data = _data(lm, args)
    for seed in args.seeds:
        rec = run_seed(lm, seed, data, args)
        rec["args"] = {k: str(v) for k, v in vars(args).items()}
        rec["model"] = lm.name
        if args.out is not None:
            path = args.out / f"seed{seed}.json"
            if path.is_file():  # another invocation's arms of this seed are kept
                old = read_json_object(path, "lens_peer seed")
                rec["arms"] = {**old["arms"], **rec["arms"]}
            write_json(path, rec)
            print(f"wrote {args.out / f'seed{seed}.json'}", flush=True)
    print(f"total wall {time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        report(args.out, args.bootstrap)


def report(folder: Path, n_resamples: int) -> None:
    """Print the comparison tables of the seed<s>.json files in `folder` (each arm over the
    seeds that ran it; its difference to the package's lens over those same seeds)."""
    from mlsae.core.bootstrap import Bootstrap
    from mlsae.core.io import read_json_object

    recs = [read_json_object(p, "lens_peer seed") for p in sorted(folder.glob("seed*.json"))]
    if not recs:
        raise SystemExit(f"no seed*.json in {folder}")
    arms = [a for a in ARMS if any(a in r["arms"] for r in recs)]
    first = next(r["arms"][arms[0]] for r in recs if arms[0] in r["arms"])
    layers = first["layers"]
    cols = list(range(len(layers) - 1))  # blocks 0..L-2 (the last block is the identity)
    bs = Bootstrap(len(first["per_context"]), n_resamples, 0)

    def resampled_mean(a: str, seeds: list[int]) -> torch.Tensor:
        """[B]: the mean KL over cols of `a` averaged over `seeds`, per resample of the test
        contexts (the positions column is the same for every seed)."""
        x = torch.tensor(
            [r["arms"][a]["per_context"] for r in recs if r["seed"] in seeds], dtype=torch.float64
        ).mean(0)  # [C, L + 1]
        kl = bs.ratio(x[:, :-1], x[:, -1:].expand_as(x[:, :-1]))  # [B, L]
        return kl[:, cols].mean(1)

    def seed_mean(r: dict, a: str) -> float:
        return statistics.fmean(r["arms"][a]["kl"][c] for c in cols)

    print(
        f"model {recs[0].get('model')}; {recs[0]['train_tokens']} training tokens per seed, "
        f"{recs[0]['steps']} max KL steps; {recs[0]['n_test_positions']} test positions in "
        f"{bs.n_contexts} contexts; mean KL over blocks {[layers[c] for c in cols]}; 95% CI: "
        "percentile "
        f"bootstrap over test contexts ({n_resamples} resamples) of the seed-averaged mean; "
        "'minus theirs': the paired difference to the package's lens over the same seeds"
    )
    print(
        f"{'arm':>10} {'seeds':>7} {'per seed':>22} {'mean +- sd':>17} {'95% CI':>17} "
        f"{'minus theirs [95% CI]':>29} {'blocks < theirs':>16} {'max cond':>9} {'train s':>8}"
    )
    for a in arms:
        runs = [r for r in recs if a in r["arms"]]
        seeds = [r["seed"] for r in runs]
        m = [seed_mean(r, a) for r in runs]
        sd = f"{statistics.stdev(m):.3f}" if len(m) > 1 else "-"
        iv = Bootstrap.interval(resampled_mean(a, seeds))
        diff = better = ""
        if a != "theirs" and all("theirs" in r["arms"] for r in runs):
            d = statistics.fmean(m) - statistics.fmean(seed_mean(r, "theirs") for r in runs)
            div = Bootstrap.interval(resampled_mean(a, seeds) - resampled_mean("theirs", seeds))
            diff = f"{d:+.3f} {div}"
            better = "/".join(
                str(sum(r["arms"][a]["kl"][c] < r["arms"]["theirs"]["kl"][c] for c in cols))
                for r in runs
            )
        cond = max(max(r["arms"][a]["cond"]) for r in runs)
        wall = statistics.fmean(r["arms"][a]["wall_train_s"] for r in runs)
        print(
            f"{a:>10} {','.join(map(str, seeds)):>7} {' '.join(f'{v:.3f}' for v in m):>22} "
            f"{statistics.fmean(m):>8.3f} +- {sd:<5} {str(iv):>17} {diff:>29} "
            f"{better:>16} {cond:>9.3g} {wall:>8.0f}"
        )
    for a in arms:
        svs = [r["arms"][a]["singular_values"] for r in recs if a in r["arms"]]
        if svs and svs[0] is not None:
            lo = min(min(v["min"]) for v in svs)
            hi = max(max(v["max"]) for v in svs)
            print(
                f"{a:>10}: singular values of I + A_l over blocks and seeds in [{lo:.4g}, {hi:.4g}]"
            )
    _cond_table(recs, arms, layers)


def _cond_table(recs: list[dict], arms: list[str], layers: list[int]) -> None:
    """Per block: KL (mean over the seeds that ran the arm) and cond(I + A) of the first
    seed's lens that has the arm."""
    shown = [a for a in arms if a != "logit"]
    print("per block: KL (mean over seeds) and cond(I + A) of the first seed's lens")
    print(
        f"{'block':>5} "
        + " ".join(f"{'KL ' + a:>14}" for a in arms)
        + " "
        + " ".join(f"{'cond ' + a:>15}" for a in shown)
    )
    for i, layer in enumerate(layers[:-1]):
        kl = [statistics.fmean(r["arms"][a]["kl"][i] for r in recs if a in r["arms"]) for a in arms]
        cond = [next(r["arms"][a]["cond"][i] for r in recs if a in r["arms"]) for a in shown]
        print(
            f"{layer:>5} "
            + " ".join(f"{v:>14.4f}" for v in kl)
            + " "
            + " ".join(f"{v:>15.4g}" for v in cond)
        )


if __name__ == "__main__":
    main()
