"""`mlsae controls measures|causal`: the controls of the cross-layer measures
(mlsae.evolution.controls) and the causal check (mlsae.evolution.causal) as commands writing
one JSON file each (through core.outputs and core.io)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mlsae.activations.source import ActivationSource
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import HELD_OUT_TOKENS, Inputs
from mlsae.core.io import write_json
from mlsae.core.layers import parse_layers
from mlsae.core.outputs import check_output
from mlsae.core.stage_config import ControlsConfig, EvolutionConfig
from mlsae.evolution.causal import CausalResult, NextBlock, causal_pair, choose_predecessors
from mlsae.evolution.codes import load_per_layer
from mlsae.evolution.controls import (
    ControlRow,
    control_rows,
    load_codes,
    pair_result,
    rows_json,
    verdicts,
)

log = logging.getLogger(__name__)


@dataclass
class ControlsTiming:
    """What a controls command read and how long its phases took (its JSON has them too)."""

    n_used_tokens: int
    n_contexts: int
    time_s: dict[str, float]
    """Seconds per phase (measures: encode, measures; causal: total)."""


def _open(run: Path, inputs: Inputs) -> ActivationSource:
    from mlsae.activations.open import open_source

    source, data, model = inputs.parts()
    sc = load_per_layer(run)[0][1].cfg
    return open_source(
        Inputs(
            source,
            replace(data, dataset=data.dataset or sc.dataset),
            replace(model, model=model.model or sc.model),
        ),
        default_tokens=HELD_OUT_TOKENS,
        layers=None,
    )


def _up_layers(ctl: ControlsConfig) -> list[int]:
    layers = parse_layers(ctl.pair_layers)
    if not layers:
        raise MlsaeError("--pair-layers: give the up layers of the pairs, e.g. '3,12,24'")
    return layers


def measures_command(
    run: Path,
    out: Path,
    seed_run: Path | None,
    inputs: Inputs,
    cfg: EvolutionConfig,
    ctl: ControlsConfig,
) -> tuple[list[ControlRow], ControlsTiming]:
    """Every control row of the up layers, written to `out` (JSON); with what was read and
    the time taken."""
    t0 = time.perf_counter()
    source = inputs.source
    check_output(out, "eval", file=True, inputs=[run, seed_run, source.cache])
    src = _open(run, inputs)
    codes, ctx = load_codes(src, run, seed_run, _up_layers(ctl), ctl, cfg.rescale, source.tokens)
    t1 = time.perf_counter()
    rows = list(control_rows(codes, ctx, _up_layers(ctl), cfg, ctl))
    verdict_rows = [v for m in ("pass_through", "disappear", "appear") for v in verdicts(rows, m)]
    timing = ControlsTiming(
        len(ctx), len(torch.unique(ctx)), {"encode": t1 - t0, "measures": time.perf_counter() - t1}
    )
    body = {
        "run": str(run),
        "seed_run": None if seed_run is None else str(seed_run),
        "source": src.describe(),
        "n_used_tokens": timing.n_used_tokens,
        "n_contexts": timing.n_contexts,
        "settings": {"evolution": asdict(cfg), "controls": asdict(ctl)},
        "interval": "95% bootstrap over contexts, symmetric about the full-data rate (reaching "
        "both percentiles), each feature's best partner fixed",
        "permutation": "layer l+1's tokens permuted within each context (perm_context) or over "
        "the whole stream (perm_global)",
        "rows": rows_json(rows),
        "verdicts": verdict_rows,
        "time_s": timing.time_s,
    }
    write_json(out, body)
    return rows, timing


def held_out_contexts(src: ActivationSource, n_contexts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids [B, T] and used mask [B, T] of the first n_contexts contexts."""
    length = int(src.context_length)
    ids, used = [], []
    for b in src.iter_ordered(n_contexts * length):
        ids.append(b.token_ids)
        used.append(b.mask)
    tok, mask = torch.cat(ids), torch.cat(used)
    n = len(tok) // length
    if n == 0:
        raise MlsaeError(f"{src.describe()} holds no whole context of {length} tokens")
    return tok[: n * length].view(n, length).long(), mask[: n * length].view(n, length)


def causal_command(
    run: Path,
    out: Path,
    inputs: Inputs,
    cfg: EvolutionConfig,
    ctl: ControlsConfig,
) -> tuple[list[CausalResult], ControlsTiming]:
    """The causal check of each pair (l, l+1) of the up layers, written to `out` (JSON); with
    what was read and the time taken."""
    from mlsae.activations.open import source_model

    t0 = time.perf_counter()
    check_output(out, "eval", file=True, inputs=[run, inputs.source.cache])
    src = _open(run, inputs)
    saes = dict(load_per_layer(run))
    lm = source_model(src, inputs.model)
    ids, used = held_out_contexts(src, ctl.causal_contexts)
    gen = torch.Generator().manual_seed(ctl.control_seed)
    results: list[CausalResult] = []
    ctl_pairs = ControlsConfig(**{**asdict(ctl), "gaps": []})
    for lu in _up_layers(ctl):
        if lu + 1 not in saes or lu not in saes:
            log.warning(f"no SAE pair ({lu}, {lu + 1}): skipped")
            continue
        codes, _ = load_codes(src, run, None, [lu], ctl_pairs, cfg.rescale, inputs.source.tokens)
        res, fa, _, ps = pair_result(codes[("main", lu)], codes[("main", lu + 1)], cfg)
        nxt = NextBlock(lm.model, ids, lu)
        with torch.inference_mode():
            enc = saes[lu + 1].encode(nxt(nxt.h)[used].float())
        counts = torch.bincount(enc.top_indices.reshape(-1).cpu(), minlength=saes[lu + 1].cfg.d_sae)
        eligible = ((counts >= cfg.min_support) & (res.best_prev_idx >= 0)).nonzero(as_tuple=True)[
            0
        ]
        if len(eligible) == 0:
            raise MlsaeError(
                f"no down feature of layer {lu + 1} is active on >= "
                f"{cfg.min_support} of the causal tokens"
            )
        pick = eligible[torch.randperm(len(eligible), generator=gen)[: ctl.causal_features]]
        features = pick.sort().values
        cross, _ = ps.matrices()
        preds = choose_predecessors(
            res.best_prev_idx,
            cross,
            saes[lu].W_dec.detach().cpu(),
            saes[lu + 1].W_dec.detach().cpu(),
            fa.alive,
            features,
            gen,
        )
        results.append(
            causal_pair(
                nxt, used, (lu, lu + 1), (saes[lu], saes[lu + 1]), features, preds, cfg, ctl
            )
        )
        log.info(f"causal check {lu}->{lu + 1}: {results[-1].rates}")
    body = {
        "run": str(run),
        "source": src.describe(),
        "n_contexts": int(ids.shape[0]),
        "settings": {"evolution": asdict(cfg), "controls": asdict(ctl)},
        "interval": "95% percentile bootstrap over the tested down features",
        "pairs": [
            {
                **{k: v for k, v in asdict(r).items() if k != "intervals"},
                "intervals": {
                    k: None if v is None else [v.low, v.high] for k, v in r.intervals.items()
                },
            }
            for r in results
        ],
        "time_s": time.perf_counter() - t0,
    }
    write_json(out, body)
    return results, ControlsTiming(int(used.sum()), body["n_contexts"], {"total": body["time_s"]})
