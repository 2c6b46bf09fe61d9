"""Evaluating a tuned lens against the logit lens (`mlsae lens evaluate`; SPEC section 5).

On held-out (test split) tokens, per block: KL(final || lens) averaged over used positions,
and the next-token cross-entropy averaged over predicted positions (used positions with a
next token in the context, as splice.py; the target may be EOS), for the tuned lens and the
logit lens (identity translators). Sums are accumulated in float64. Also per block the
condition number of I + A_l (float64, 2-norm): how much the exact inverse that lens-space SAEs
use can amplify relative errors.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.core.bootstrap import Bootstrap, BootstrapInfo, Interval
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json
from mlsae.core.schema import from_dict, to_dict
from mlsae.core.stage_config import BootstrapConfig
from mlsae.lens.command import ContextSource
from mlsae.lens.train import CHUNK, capture_lens_layers, final_logits
from mlsae.lens.tuned import TunedLens

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class LensCurves:
    """Per-layer means of one lens (aligned with `LensEvalResult.layers`)."""

    kl: list[float]
    """KL(final || lens) over used positions (nats)."""
    ce: list[float]
    """Next-token cross-entropy over predicted positions (nats)."""


@dataclass
class LensIntervals:
    """95% bootstrap intervals over contexts (SPEC 7) of each layer's KL."""

    bootstrap: BootstrapInfo
    kl_tuned: list[Interval | None]
    kl_logit: list[Interval | None]
    mean_tuned: Interval | None = None
    """Of the mean KL over the trained layers (all but the last block), tuned lens."""
    mean_logit: Interval | None = None
    """The same for the logit lens."""


@dataclass
class LensEvalResult:
    """`mlsae lens evaluate`: the tuned lens vs the logit lens on held-out tokens."""

    layers: list[int]
    tuned: LensCurves
    logit: LensCurves
    cond: list[float]
    """cond(I + A_l) per layer (2-norm)."""
    model_ce: float
    n_kl_positions: int
    n_ce_positions: int
    lens: str = ""
    model: str = ""
    dataset: str | None = None
    split: str | None = None
    n_tokens: int = 0
    intervals: LensIntervals | None = None
    mean_kl_tuned: float | None = None
    """Mean of the per-layer KL over the trained layers (every covered block but the last)."""
    mean_kl_logit: float | None = None
    """The same for the logit lens."""

    def to_json(self) -> dict[str, Any]:
        out = to_dict(self)
        if self.intervals is None:
            del out["intervals"]
        return out

    @classmethod
    def from_json(cls, obj: object, where: str = "eval.json") -> LensEvalResult:
        return from_dict(cls, obj, where)

    def table(self) -> str:
        return format_table(self)


@dataclass
class LensKLSums:
    """What one pass of a lens over held-out contexts accumulates (float64 sums)."""

    layers: list[int]
    sums: dict[str, Tensor]
    """Per layer [L]: 'tk' / 'lk' KL sums of the tuned / logit lens, 'tc' / 'lc' CE sums."""
    per_context: Tensor
    """[C, 2, L + 1]: per context, the KL sums of the tuned (0) and logit (1) lens per layer;
    the last column holds the context's used positions."""
    n_kl: int
    n_ce: int
    model_ce: float
    """Summed over the CE positions."""


@torch.no_grad()
def lens_kl_sums(
    model: PreTrainedModel,
    lens: TunedLens,
    batches: Iterable[Tensor],
    special_ids: Sequence[int],
    progress: bool = True,
    with_logit: bool = True,
) -> LensKLSums:
    """Per-layer KL(final || lens) and next-token CE sums of the tuned and the logit lens, and
    the KL sums per context (the rows of the batches), so intervals and paired comparisons of
    lenses on the same contexts need no model rerun. batches: [B, T] token ids. `with_logit`
    False: the logit lens is skipped (its sums stay 0; half the cost)."""
    layers = lens.layers
    sums = {k: torch.zeros(len(layers), dtype=torch.float64) for k in ("tk", "tc", "lk", "lc")}
    n_kl = n_ce = 0
    model_ce = 0.0
    per_ctx: list[Tensor] = []  # per batch [B, 2, L + 1]: KL sums of tuned / logit, positions
    for ids in tqdm(batches, desc="lens evaluate", disable=not progress, file=sys.stderr):
        xs, mask, cap = capture_lens_layers(model, lens, ids, special_ids)
        pred = mask.clone()
        pred[:, -1] = False  # [B, T] used positions with a next token (as splice.py)
        target = torch.roll(ids, -1, dims=1)[mask]  # [N] next token (valid where pred)
        is_pred = pred[mask]  # [N]
        x = xs[mask]  # [N, Lc, d]
        row = mask.nonzero()[:, 0]  # [N] context row of each used position
        ctx = torch.zeros(ids.shape[0], 2, len(layers) + 1, dtype=torch.float64)
        ctx[:, :, -1] = mask.sum(1, keepdim=True).double()
        for start in range(0, len(x), CHUNK):
            xc, tc, pc = (
                x[start : start + CHUNK],
                target[start : start + CHUNK],
                is_pred[start : start + CHUNK],
            )
            final_logp = torch.log_softmax(final_logits(model, xc[:, -1]), dim=-1)  # [n, V]
            p = final_logp.exp()  # [n, V]
            model_ce += float(-final_logp[pc].gather(1, tc[pc, None]).double().sum())
            kl = ce = torch.zeros((), dtype=torch.float64)
            kl_pos = torch.zeros(len(xc), dtype=torch.float64)  # [n] KL per position
            for i, layer in enumerate(layers):
                h = xc[:, cap.index(layer)]
                for key in ("t", "l") if with_logit else ("t",):
                    if key == "t" or layer != lens.last_layer:  # identical at the last block
                        logits = (
                            lens.logits(model, h, layer) if key == "t" else final_logits(model, h)
                        )
                        logq = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
                        kl_pos = (p * (final_logp - logq)).sum(-1).double()  # [n]
                        kl = kl_pos.sum()
                        ce = -logq[pc].gather(1, tc[pc, None]).double().sum()
                    sums[key + "k"][i] += kl
                    sums[key + "c"][i] += ce
                    rows = row[start : start + CHUNK]
                    ctx[:, 0 if key == "t" else 1, i].index_add_(0, rows, kl_pos)
        n_kl += int(mask.sum())
        n_ce += int(pred.sum())
        per_ctx.append(ctx)
    if n_kl == 0 or n_ce == 0:
        raise MlsaeError("no evaluation tokens (every position is a special token?)")
    return LensKLSums(layers, sums, torch.cat(per_ctx), n_kl, n_ce, model_ce)


def evaluate_lens(
    model: PreTrainedModel,
    lens: TunedLens,
    batches: Iterable[Tensor],
    special_ids: Sequence[int],
    progress: bool = True,
    boot: BootstrapConfig | None = None,
) -> LensEvalResult:
    """Per-layer KL(final || lens) and next-token CE of the tuned and the logit lens, with
    bootstrap intervals of the KL over the contexts (the rows of the batches; `boot`).

    batches: [B, T] token ids. Sums are float64; KL is averaged over used positions, CE over
    used positions t < T-1 (target token t+1, whatever it is)."""
    acc = lens_kl_sums(model, lens, batches, special_ids, progress)
    res = lambda k: [float(v) for v in acc.sums[k] / (acc.n_kl if k.endswith("k") else acc.n_ce)]
    trained = [i for i, layer in enumerate(acc.layers) if layer != lens.last_layer]
    tuned, logit = LensCurves(res("tk"), res("tc")), LensCurves(res("lk"), res("lc"))
    mean = lambda v: sum(v[i] for i in trained) / len(trained) if trained else None
    return LensEvalResult(
        acc.layers,
        tuned,
        logit,
        [lens.cond(layer) for layer in acc.layers],
        acc.model_ce / acc.n_ce,
        acc.n_kl,
        acc.n_ce,
        intervals=_kl_intervals(acc.per_context, boot or BootstrapConfig(), trained),
        mean_kl_tuned=mean(tuned.kl),
        mean_kl_logit=mean(logit.kl),
    )


def mean_kl_resamples(bs: Bootstrap, per_context: Tensor, columns: Sequence[int]) -> Tensor:
    """[B, 2]: each resample's mean over the layer `columns` of the per-layer KL (tuned, logit),
    from per-context sums per_context [C, 2, L + 1] (`LensKLSums.per_context`)."""
    n = per_context[:, :, -1:].expand_as(per_context[:, :, :-1])
    kl = bs.ratio(per_context[:, :, :-1], n)  # [B, 2, L]
    return kl[:, :, list(columns)].mean(-1)


def _kl_intervals(ctx: Tensor, boot: BootstrapConfig, trained: list[int]) -> LensIntervals | None:
    """Per-layer KL intervals from per-context sums ctx [C, 2, L + 1] (the last column: the
    context's used positions), and those of the mean over the `trained` layer columns."""
    if boot.bootstrap <= 0 or not len(ctx):
        return None
    bs = Bootstrap(len(ctx), boot.bootstrap, boot.bootstrap_seed)
    n = ctx[:, :, -1:].expand_as(ctx[:, :, :-1])
    kl = bs.ratio(ctx[:, :, :-1], n)  # [B, 2, L]
    mean = mean_kl_resamples(bs, ctx, trained) if trained else None
    return LensIntervals(
        bs.info,
        bs.intervals(kl[:, 0]),
        bs.intervals(kl[:, 1]),
        None if mean is None else bs.interval(mean[:, 0]),
        None if mean is None else bs.interval(mean[:, 1]),
    )


def _ci(iv: Interval | None) -> str:
    return f"{'-':>19}" if iv is None else f"[{iv.low:.3g}, {iv.high:.3g}]".rjust(19)


def format_table(result: LensEvalResult) -> str:
    """Aligned text table of an evaluation result (with the KL's 95% intervals if any)."""
    iv = result.intervals
    ci = f" {'KL tuned 95% CI':>19} {'KL logit 95% CI':>19}" if iv is not None else ""
    lines = [
        f"{'layer':>5} {'KL tuned':>9} {'KL logit':>9} {'CE tuned':>9} {'CE logit':>9} "
        f"{'cond(I+A)':>10}" + ci
    ]
    t, g, cond = result.tuned, result.logit, result.cond
    for i, layer in enumerate(result.layers):
        extra = f" {_ci(iv.kl_tuned[i])} {_ci(iv.kl_logit[i])}" if iv is not None else ""
        lines.append(
            f"{layer:>5} {t.kl[i]:>9.4f} {g.kl[i]:>9.4f} {t.ce[i]:>9.4f} "
            f"{g.ce[i]:>9.4f} {cond[i]:>10.4g}" + extra
        )
    lines.append(f"model CE {result.model_ce:.4f} over {result.n_ce_positions} positions")
    if result.mean_kl_tuned is not None and result.mean_kl_logit is not None:
        m_t, m_l = (f" {iv.mean_tuned}", f" {iv.mean_logit}") if iv is not None else ("", "")
        lines.append(
            f"mean KL over the trained layers: tuned {result.mean_kl_tuned:.4f}{m_t}, "
            f"logit {result.mean_kl_logit:.4f}{m_l}"
        )
    if iv is not None:
        b = iv.bootstrap
        lines.append(
            f"95% CI: percentile bootstrap over {b.n_contexts} contexts "
            f"({b.n_resamples} resamples, seed {b.seed})"
        )
    return "\n".join(lines)


def evaluate_lens_command(
    lens: TunedLens,
    out: Path,
    source: ContextSource,
    batch_size: int = 8,
    boot: BootstrapConfig | None = None,
) -> LensEvalResult:
    """`mlsae lens evaluate`: tuned vs logit lens on the source's (test-split) tokens; writes
    and returns the JSON."""
    lm = source.lm
    lens.check_model(lm.n_layers, lm.d_model)
    contexts = source.contexts()
    batches = [contexts[i : i + batch_size] for i in range(0, len(contexts), batch_size)]
    result = evaluate_lens(lm.model, lens, batches, lm.special_ids, boot=boot)
    result.lens = str(lens.meta.get("path", ""))
    result.model = lm.name
    result.dataset, result.split = source.info.get("dataset"), source.info.get("split")
    result.n_tokens = int(contexts.numel())
    write_json(Path(out), result.to_json())
    return result
