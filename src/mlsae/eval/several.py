"""`mlsae evaluate` beyond one SAE on its own: per-layer sets (one SAE per block, evaluated
together from one clean pass per batch) and the observers that share the clean passes
(`--replace`: several blocks replaced at once; `--format saebench`: SAEBench's core metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import BootstrapConfig, EvalConfig
from mlsae.eval.evaluate import Entry, evaluate_command
from mlsae.eval.replace import Recon, Replacement, parse_replace
from mlsae.eval.result import EvalResult, fmt_value
from mlsae.eval.splice import BatchObserver, CleanPass
from mlsae.sae.crosscoder import token_pass

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mlsae.activations.source import ActivationSource

log = logging.getLogger(__name__)


def is_per_layer_set(run: Path) -> bool:
    """Whether `run` holds several single-layer SAEs (a per-layer set) rather than one SAE."""
    from mlsae.sae.folders import RunFolder, is_sae_dir, sae_layers

    if not Path(run).is_dir() or is_sae_dir(run) or is_sae_dir(Path(run) / "sae"):
        return False
    try:
        dirs = RunFolder(Path(run)).sae_dirs()
    except MlsaeError:
        return False
    return len(dirs) > 1 and all(len(sae_layers(d)) == 1 for d in dirs)


def evaluate_run(
    run: str | Path,
    out: str | Path,
    *,
    inputs: Inputs | None = None,
    ev: EvalConfig | None = None,
    lens: Path | None = None,
    boot: BootstrapConfig | None = None,
) -> EvalResult:
    """`mlsae evaluate RUN`: `evaluate_command` with the observers `ev` asks for, or, for a
    per-layer set, `evaluate_per_layer`. Writes the JSON and returns the result."""
    inputs, ev = inputs or Inputs.held_out(), ev or EvalConfig()
    if is_per_layer_set(Path(run)):
        if lens is not None:
            raise MlsaeError("--lens applies to one SAE, not to a per-layer set")
        return evaluate_per_layer(run, out, inputs=inputs, ev=ev, boot=boot)
    return evaluate_command(
        run,
        out,
        inputs=inputs,
        ev=ev,
        lens=lens,
        boot=boot,
        observe=partial(make_observers, ev),
        finish=partial(finish_observers, ev=ev, out=Path(out)),
    )


def make_observers(ev: EvalConfig, entries: list[Entry]) -> list[BatchObserver]:
    """The clean-pass observers that `ev` asks for (--replace, --format saebench)."""
    observers = replace_observer(ev.replace, entries)
    if ev.format == "saebench":
        from mlsae.eval.saebench import SaebenchObserver

        for e in entries:
            if e.sae.token_code:
                raise MlsaeError(
                    f"--format saebench: {e.path} is a {e.sae.cfg.architecture}, "
                    "which SAEBench's per-layer SAE format cannot describe"
                )
        observers.append(SaebenchObserver(entries))
    return observers


def flat_json(result: EvalResult) -> dict[str, Any]:
    """The evaluation's JSON with its sections (--replace, SAEBench) as top-level keys."""
    return {**result.to_json(), **result.sections}


def finish_observers(
    result: EvalResult, observers: list[BatchObserver], *, ev: EvalConfig, out: Path
) -> None:
    """Add each observer's JSON section to `result.sections`; with --format saebench, write
    SAEBench's core result files beside `out` (one per layer)."""
    for o in observers:
        result.sections[o.key] = o.to_json()
    if ev.format == "saebench":
        from mlsae.eval.saebench import SaebenchObserver, write_saebench

        cfgs = {
            k: v
            for o in observers
            if isinstance(o, SaebenchObserver)
            for k, v in o.sae_cfgs().items()
        }
        files = write_saebench(flat_json(result), out, cfgs)
        result.sections["saebench_files"] = [str(p) for p in files]


def _merge(typed: list[EvalResult], run: Path, model: str | None) -> EvalResult:
    """One evaluation from single-layer results (layers in order; the mean over layers;
    dead_fraction the mean of the SAEs' own; per-layer intervals side by side, no interval of
    the mean: each SAE's contexts were resampled on their own)."""
    from mlsae.sae.metrics import mean_or_none

    results = [r.to_json() for r in typed]
    keys = [k for k in results[0]["per_layer"] if all(k in r["per_layer"] for r in results)]
    per = {k: [v for r in results for v in r["per_layer"][k]] for k in keys}
    deads = [r["dead_fraction"] for r in results]
    fields: dict[str, Any] = {
        "layers": [x for r in results for x in r["layers"]],
        "per_layer": per,
        "mean": {k: mean_or_none(v) for k, v in per.items()},
        "dead_fraction": sum(deads) / len(deads),
        "n_tokens": max(r["n_tokens"] for r in results),
        "space": results[0].get("space", "model"),
        "sae": str(run),
        "model": model,
        "intervals": _merge_intervals(results),
    }
    merged = EvalResult.from_json({k: v for k, v in fields.items() if v is not None})
    merged.model = model  # None stays None (JSON null)
    merged.sections["per_layer_saes"] = [r["sae"] for r in results]
    return merged


def _merge_intervals(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The single-layer results' per-layer intervals side by side (None unless all have them)."""
    ivs: list[dict[str, Any]] = [r["intervals"] for r in results if r.get("intervals")]
    if len(ivs) != len(results):
        return None
    out: dict[str, Any] = {"bootstrap": ivs[0]["bootstrap"]}
    for key in ("fvu", "fvu_typical", "delta_ce", "kl"):
        if all(iv.get(key) is not None for iv in ivs):
            out[key] = {"per_layer": [x for iv in ivs for x in iv[key]["per_layer"]], "mean": None}
    return out


def evaluate_per_layer(
    run: str | Path,
    out: str | Path,
    *,
    inputs: Inputs,
    ev: EvalConfig,
    boot: BootstrapConfig | None = None,
) -> EvalResult:
    """`mlsae evaluate` of a per-layer set: every SAE on its own block (or the blocks of
    --layers that the set has), one clean pass per batch for all; --replace splices each
    block's own SAE. Writes the JSON and returns the result."""
    from mlsae.core.io import write_json
    from mlsae.core.layers import parse_layers
    from mlsae.core.outputs import check_output
    from mlsae.eval.evaluate import evaluate_entries, load_entry, open_eval_source
    from mlsae.sae.folders import RunFolder

    source = inputs.source
    check_output(out, "eval", file=True, inputs=[run, source.cache])

    pairs = RunFolder(Path(run)).per_layer_dirs()
    want = parse_layers(source.layers)
    if want is not None:
        missing = sorted(set(want) - {ly for ly, _ in pairs})
        if missing:
            raise MlsaeError(f"{run} has no SAE for block(s) {missing} (a per-layer set)")
        pairs = [(ly, d) for ly, d in pairs if ly in want]
    entries = [load_entry(d, label=f"L{ly}") for ly, d in pairs]
    for e in entries:  # per-context sums for the intervals, as evaluate_command does
        e.bootstrap = (boot or BootstrapConfig()).bootstrap > 0
    src = open_eval_source(entries, inputs)
    _typical_thresholds(entries, src, source.tokens)
    observers = make_observers(ev, entries)
    name = evaluate_entries(
        entries,
        src,
        model=inputs.model,
        ev=ev,
        tokens=source.tokens,
        batch_size=source.batch_size,
        observers=observers,
    )
    result = _merge([e.result(name, boot) for e in entries], Path(run), name)
    result.exclude_sink = bool(src.info.get("exclude_sink", False))
    finish_observers(result, observers, ev=ev, out=Path(out))
    write_json(Path(out), result.to_json())
    return result


def _typical_thresholds(entries: list[Entry], src: ActivationSource, tokens: int | None) -> None:
    """Each entry's norm-outlier threshold (fvu_typical), as evaluate_command sets it (a cache
    only)."""
    from mlsae.activations.cache import ActivationCache
    from mlsae.activations.norms import norm_outliers

    if not isinstance(src, ActivationCache):
        return
    every = norm_outliers(src, max_tokens=tokens)
    for e in entries:
        if not set(e.layers) <= set(src.layers):
            continue
        rep = every.select(e.layers)
        if sum(rep.n_outliers):
            e.thresholds = {
                ly: rep.factor * m for ly, m in zip(rep.layers, rep.median_norm, strict=True)
            }


# ----------------------------------------------------------------------------- --replace


def entries_recon(entries: Sequence[Entry], clean: dict[int, Tensor] | None = None) -> Recon:
    """The model-space reconstruction of each evaluated layer by its entry's SAE (an MLSAE
    serves all its layers; a per-layer set one entry per layer); a crosscoder's from `clean`."""
    by_layer: dict[int, Entry] = {}
    for e in entries:
        for layer in e.layers:
            if layer in by_layer:
                raise MlsaeError(f"--replace: two SAEs evaluate block {layer}")
            by_layer[layer] = e

    def recon(layer: int, x_model: Tensor) -> Tensor:
        e = by_layer[layer]
        if e.sae.token_code:  # acausal: its code of the clean pass's blocks, all read at once
            return (clean or {})[layer]
        return e.reconstruct(e.space.to_sae(x_model, layer), layer, False, x_model)

    return recon


@dataclass
class ReplaceObserver:
    """--replace as a run_model observer."""

    replacement: Replacement
    key: str = "replace"
    entries: Sequence[Entry] = ()
    clean: dict[int, Tensor] = field(default_factory=dict)
    """A crosscoder's model-space reconstructions of this clean pass (its code reads all blocks
    at once, so the replaced blocks get the clean pass's, not a spliced stream's)."""

    def update(self, model: PreTrainedModel, cp: CleanPass) -> None:
        for e in self.entries:
            done = token_pass(e.sae, e.layers, lambda ly: e.space.to_sae(cp.vectors(ly), ly))  # noqa: B023
            self.clean.update({ly: e.space.to_model(xh, ly) for ly, (xh, _) in done.items()})
        self.replacement.update(model, cp)

    def to_json(self) -> dict[str, Any]:
        return asdict(self.replacement.result())


def replace_observer(spec: str | None, entries: Sequence[Entry]) -> list[BatchObserver]:
    """[the --replace observer] for these entries, or [] without --replace."""
    if spec is None:
        return []
    layers = [x for e in entries for x in e.layers]
    blocks = parse_replace(spec, layers)
    clean: dict[int, Tensor] = {}
    recon = entries_recon(entries, clean)
    return [ReplaceObserver(Replacement(spec, blocks, recon), entries=entries, clean=clean)]


def format_extras(typed: EvalResult) -> str:
    """Tables of the observers' sections of an evaluation ('' if it has none)."""
    result = flat_json(typed)
    parts = []
    if isinstance(result.get("replace"), dict):
        parts.append(format_replace(result["replace"], result["per_layer"], result["layers"]))
    if isinstance(result.get("saebench"), dict):
        parts.append(format_saebench(result["saebench"], result.get("saebench_files", [])))
    return "\n".join(parts)


_SAEBENCH_COLUMNS = {
    "kl_div_score": "kl_score",
    "ce_loss_score": "ce_score",
    "l2_ratio": "l2_ratio",
    "relative_reconstruction_bias": "rel_bias",
    "cossim": "cossim",
    "frac_alive": "alive",
    "average_max_decoder_cosine_sim": "max_dcos",
}
"""SAEBench metric -> its (shorter) column in the --format saebench table."""


def format_saebench(section: dict[str, Any], files: list[str]) -> str:
    """SAEBench's core metrics per layer, and where its result files are."""
    head = "layer" + "".join(c.rjust(10) for c in _SAEBENCH_COLUMNS.values())
    rows = ["SAEBench core metrics (zero ablation as the reference)", head, "-" * len(head)]
    for layer, m in zip(section["layers"], section["per_layer"], strict=True):
        rows.append(f"{layer:5d}" + "".join(" " + fmt_value(m[k]) for k in _SAEBENCH_COLUMNS))
    if files:
        rows.append(
            f"SAEBench result files: {files[0]}"
            + (f" ... ({len(files)})" if len(files) > 1 else "")
        )
    return "\n".join(rows)


def format_replace(replace: dict[str, Any], per_layer: dict[str, Any], layers: list[int]) -> str:
    """The --replace table: each cumulative prefix beside the one-block splice of its last
    block (from the evaluation's per-layer delta CE / KL)."""
    alone = {ly: (per_layer["delta_ce"][i], per_layer["kl"][i]) for i, ly in enumerate(layers)}
    head = f"{'blocks replaced together':<26}{'delta_ce':>10}{'kl':>10}   last block alone:" + (
        f"{'delta_ce':>10}{'kl':>10}"
    )
    rows = [f"--replace {replace['spec']}", head, "-" * len(head)]
    for row in replace["rows"]:
        blocks = row["blocks"]
        name = _span(blocks)
        last = alone.get(blocks[-1], (None, None))
        rows.append(
            f"{name:<26}{fmt_value(row['delta_ce'])} {fmt_value(row['kl'])}"
            + " " * 21
            + f"{fmt_value(last[0])} {fmt_value(last[1])}"
        )
    return "\n".join(rows)


def _span(blocks: list[int]) -> str:
    """'0-5' for a contiguous run, else '0,3,5' (shortened past 6 blocks)."""
    if blocks == list(range(blocks[0], blocks[-1] + 1)) and len(blocks) > 2:
        return f"{blocks[0]}-{blocks[-1]} ({len(blocks)})"
    if len(blocks) > 6:
        return ",".join(map(str, blocks[:3])) + ",...," + f"{blocks[-1]} ({len(blocks)})"
    return ",".join(map(str, blocks))
