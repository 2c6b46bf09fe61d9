"""`mlsae lens train` on a live source: the contexts split into training and held-out
training contexts, `train_lens` run, the lens saved with its training log and singular values
(`ContextSource` is what lens training and evaluation read)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.core.stage_config import LensTrainConfig
from mlsae.data.model import LoadedModel
from mlsae.lens.heldout import LensTrainLog
from mlsae.lens.train import regression_init, train_lens
from mlsae.lens.tuned import TunedLens

log = logging.getLogger(__name__)


class ContextSource(Protocol):
    """What lens training and evaluation read: a model and the token ids of a dataset split (an
    `mlsae.activations.live.LiveSource`, which this stage does not import)."""

    lm: LoadedModel
    info: dict[str, Any]  # dataset, split, context_length, model_dtype, ...
    layers: list[int]
    batch_size: int  # contexts per forward pass

    def contexts(self) -> Tensor:
        """[n, T] token ids of every context."""
        ...


def _singular_summary(lens: TunedLens) -> dict[str, list[int] | list[float]]:
    """Per trained layer, the extreme singular values and the condition number of I + A."""
    lo, hi = [], []
    for layer in lens.trained_layers:
        m = torch.eye(lens.d_model, dtype=torch.float64) + lens.A(layer).detach().double()
        sv = torch.linalg.svdvals(m)
        lo.append(round(float(sv.min()), 5))
        hi.append(round(float(sv.max()), 3))
    cond = [round(lens.cond(layer), 2) for layer in lens.trained_layers]
    return {"layers": lens.trained_layers, "min": lo, "max": hi, "cond": cond}


def split_holdout(contexts: Tensor, n_holdout: int) -> tuple[Tensor, Tensor | None]:
    """(training contexts, held-out contexts): the last `n_holdout` contexts are held out."""
    if n_holdout <= 0:
        return contexts, None
    if len(contexts) <= n_holdout:
        raise MlsaeError(
            f"{len(contexts)} training contexts leave none to train on after holding out "
            f"{n_holdout} (--holdout-contexts) for early stopping: raise --tokens"
        )
    return contexts[:-n_holdout], contexts[-n_holdout:]


def _training_record(
    source: ContextSource,
    cfg: LensTrainConfig,
    contexts: Tensor,
    train_ctx: Tensor,
    holdout: Tensor | None,
    n_regr: int,
    run: LensTrainLog,
    wall: float,
    lens: TunedLens,
) -> dict[str, object]:
    """What lens.json records of the training: data, hold-out, settings, the KL curve, time
    and the translators' singular values."""
    history = run.history
    return {
        "dataset": source.info.get("dataset"),
        "split": source.info.get("split"),
        "context_length": int(contexts.shape[1]),
        "tokens": int(train_ctx.numel()),
        "holdout": {
            "contexts": 0 if holdout is None else len(holdout),
            "tokens": 0 if holdout is None else int(holdout.numel()),
            "source": "the last contexts of the training split's tokens (not the test split)",
            "eval_every": cfg.eval_every,
            "patience": cfg.patience,
        },
        "init": cfg.init,
        "ridge": cfg.ridge if cfg.init == "regression" else None,
        "min_singular": (cfg.min_singular if cfg.init == "regression" or cfg.keep_floor else None),
        "keep_floor": cfg.keep_floor,
        "cond_cap": cfg.cond_cap,
        "regression_positions": n_regr,
        "max_steps": cfg.steps,
        "steps": len(history),
        "step_contexts": cfg.step_contexts,
        "lr": cfg.lr,
        "optimizer": "adam in standardised coordinates, warmup + linear decay to 0 at max_steps"
        + (
            ", singular values of I + A projected to >= min_singular after every step"
            if cfg.keep_floor
            else ""
        ),
        "loss": "sum over layers of mean KL(final || lens)",
        "seed": cfg.seed,
        "model_dtype": source.info.get("model_dtype"),
        "kl_first_last": [history[0], history[-1]] if history else None,
        **run.to_json(),
        "wall_seconds": round(wall, 1),
        "singular_values": _singular_summary(lens),
    }


def train_lens_command(
    out: Path, source: ContextSource, cfg: LensTrainConfig | None = None
) -> TunedLens:
    """`mlsae lens train`: translators for `source.layers` of `source.lm`, warm start
    (regression, or zero) on the source's contexts but the last `cfg.holdout_contexts`, then up
    to `cfg.steps` KL steps of `cfg.step_contexts` contexts, stopped early on the held-out
    contexts' KL; save to `out`."""
    cfg = cfg or LensTrainConfig()
    if source.info.get("split") != "train":
        raise MlsaeError("the lens is trained on the train split")
    t0 = time.perf_counter()
    lm = source.lm
    torch.manual_seed(cfg.seed)
    lens = TunedLens(lm.n_layers, lm.d_model, source.layers, model=lm.name)
    if not lens.trained_layers:
        raise MlsaeError("nothing to train: the last block's lens is the identity")
    contexts = source.contexts()
    train_ctx, holdout = split_holdout(contexts, cfg.holdout_contexts if cfg.steps else 0)
    n_regr = 0
    if cfg.init == "regression":
        bs = source.batch_size
        batches = [train_ctx[i : i + bs] for i in range(0, len(train_ctx), bs)]
        n_regr = regression_init(
            lm.model,
            lens,
            batches,
            lm.special_ids,
            ridge=cfg.ridge,
            min_singular=cfg.min_singular,
            max_cond=cfg.cond_cap,
        )
    run = LensTrainLog(stop_reason="no KL steps (--steps 0)")
    if cfg.steps:
        run = train_lens(
            lm.model,
            lens,
            train_ctx,
            lm.special_ids,
            steps=cfg.steps,
            batch_size=cfg.step_contexts,
            lr=float(cfg.lr or 1e-3),
            seed=cfg.seed,
            holdout=holdout,
            eval_every=cfg.eval_every,
            patience=cfg.patience,
            min_singular=cfg.min_singular if cfg.keep_floor else None,
            max_cond=cfg.cond_cap,
        )
    history = run.history
    wall = time.perf_counter() - t0
    lens.meta["training"] = _training_record(
        source, cfg, contexts, train_ctx, holdout, n_regr, run, wall, lens
    )
    lens.save(out)
    js = run.to_json()
    kl = (
        f", held-out KL per layer {js['heldout_kl_warm_start']:.3f} (warm start) -> "
        f"{js['heldout_kl_best']:.3f} (best per layer); {run.stop_reason}"
        if run.heldout_kl
        else ""
    )
    log.info(f"lens saved to {out} (init {cfg.init}, {len(history)} KL steps{kl}, {wall:.0f} s)")
    return lens
