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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json
from mlsae.lens.train import CHUNK, ContextSource, capture_lens_layers, final_logits
from mlsae.lens.tuned import TunedLens

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@torch.no_grad()
def evaluate_lens(
    model: PreTrainedModel,
    lens: TunedLens,
    batches: Iterable[Tensor],
    special_ids: Sequence[int],
    progress: bool = True,
) -> dict[str, Any]:
    """Per-layer KL(final || lens) and next-token CE of the tuned and the logit lens.

    batches: [B, T] token ids. Sums are float64; KL is averaged over used positions, CE over
    used positions t < T-1 (target token t+1, whatever it is)."""
    layers = lens.layers
    sums = {k: torch.zeros(len(layers), dtype=torch.float64) for k in ("tk", "tc", "lk", "lc")}
    n_kl = n_ce = 0
    model_ce = 0.0
    for ids in tqdm(batches, desc="lens evaluate", disable=not progress, file=sys.stderr):
        xs, mask, cap = capture_lens_layers(model, lens, ids, special_ids)
        pred = mask.clone()
        pred[:, -1] = False  # [B, T] used positions with a next token (as splice.py)
        target = torch.roll(ids, -1, dims=1)[mask]  # [N] next token (valid where pred)
        is_pred = pred[mask]  # [N]
        x = xs[mask]  # [N, Lc, d]
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
            for i, layer in enumerate(layers):
                h = xc[:, cap.index(layer)]
                for key in ("t", "l"):
                    if key == "t" or layer != lens.last_layer:  # identical at the last block
                        logits = (
                            lens.logits(model, h, layer) if key == "t" else final_logits(model, h)
                        )
                        logq = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
                        kl = (p * (final_logp - logq)).sum(-1).double().sum()
                        ce = -logq[pc].gather(1, tc[pc, None]).double().sum()
                    sums[key + "k"][i] += kl
                    sums[key + "c"][i] += ce
        n_kl += int(mask.sum())
        n_ce += int(pred.sum())
    if n_kl == 0 or n_ce == 0:
        raise MlsaeError("no evaluation tokens (every position is a special token?)")
    res = lambda k: [float(v) for v in sums[k] / (n_kl if k.endswith("k") else n_ce)]
    return {
        "layers": layers,
        "tuned": {"kl": res("tk"), "ce": res("tc")},
        "logit": {"kl": res("lk"), "ce": res("lc")},
        "cond": [lens.cond(layer) for layer in layers],
        "model_ce": model_ce / n_ce,
        "n_kl_positions": n_kl,
        "n_ce_positions": n_ce,
    }


def format_table(result: dict[str, Any]) -> str:
    """Aligned text table of an evaluation result."""
    lines = [
        f"{'layer':>5} {'KL tuned':>9} {'KL logit':>9} {'CE tuned':>9} {'CE logit':>9} "
        f"{'cond(I+A)':>10}"
    ]
    t, g = result["tuned"], result["logit"]
    cond = result.get("cond") or [float("nan")] * len(result["layers"])
    for i, layer in enumerate(result["layers"]):
        lines.append(
            f"{layer:>5} {t['kl'][i]:>9.4f} {g['kl'][i]:>9.4f} {t['ce'][i]:>9.4f} "
            f"{g['ce'][i]:>9.4f} {cond[i]:>10.4g}"
        )
    lines.append(f"model CE {result['model_ce']:.4f} over {result['n_ce_positions']} positions")
    return "\n".join(lines)


def evaluate_lens_command(
    lens: TunedLens, out: Path, source: ContextSource, batch_size: int = 8
) -> dict[str, Any]:
    """`mlsae lens evaluate`: tuned vs logit lens on the source's (test-split) tokens; writes
    and returns the JSON."""
    lm = source.lm
    lens.check_model(lm.n_layers, lm.d_model)
    contexts = source.contexts()
    batches = [contexts[i : i + batch_size] for i in range(0, len(contexts), batch_size)]
    result = evaluate_lens(lm.model, lens, batches, lm.special_ids)
    result = {
        **result,
        "lens": str(lens.meta.get("path", "")),
        "model": lm.name,
        "dataset": source.info.get("dataset"),
        "split": source.info.get("split"),
        "n_tokens": int(contexts.numel()),
    }
    write_json(Path(out), result)
    return result
