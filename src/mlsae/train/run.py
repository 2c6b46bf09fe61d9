"""Creating and reopening a training run folder: every option is validated, the activation
source opened and the members planned before the folder is made; `train_cfg.json` holds the
whole `RunConfig`, read back (old formats included) by `--resume`."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from mlsae.activations.source import ActivationSource
from mlsae.core.config import (
    MemberSpec,
    RunConfig,
    SaeConfig,
    SaeGridConfig,
    TrainConfig,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.io import read_json, write_json
from mlsae.core.lock import LOCK
from mlsae.sae.folders import RUN_CFG

log = logging.getLogger(__name__)

RESUMABLE = {"max_steps", "epochs"}
"""Training settings a resumed run may change (to run longer)."""


def member_specs(mode: str, layers: list[int], sae: SaeGridConfig, seed: int) -> list[MemberSpec]:
    """The SAEs of a run: one per (R, k) of the grid, or one per layer for a per-layer set."""
    grid = [(r, k) for r in sorted(set(sae.expansion_factor)) for k in sorted(set(sae.k))]
    if mode == "per_layer":
        ((r, k),) = grid
        # Distinct seeds per layer so adjacent-layer SAEs do not share an init.
        return [
            MemberSpec(f"layer_{ly:02d}", r, k, [ly], seed + 1_000_003 * (ly + 1)) for ly in layers
        ]
    names = ["sae"] if len(grid) == 1 else [f"sae_R{r}_k{k}" for r, k in grid]
    return [MemberSpec(n, r, k, list(layers), seed) for n, (r, k) in zip(names, grid, strict=True)]


def _layers(source: ActivationSource, spec: str | None, sae: SaeGridConfig) -> list[int]:
    from mlsae.core.layers import iter_layers_arg

    if sae.single_layer is not None:
        if spec is not None:
            raise MlsaeError("--single-layer cannot be combined with --layers")
        spec = str(sae.single_layer)
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(source.layers)
    layers = iter_layers_arg(spec, 1 << 30)
    bad = [x for x in layers if x not in source.layers]
    if bad:
        raise MlsaeError(f"layer(s) {bad} not in {source.describe()} (it holds {source.layers})")
    return layers


def plan_run(
    source: ActivationSource,
    inputs: Inputs,
    sae: SaeGridConfig,
    train: TrainConfig,
) -> RunConfig:
    """The RunConfig of a new run over `source` (every SAE shape checked); the model and data
    settings are the activations' own (a cache's manifest)."""
    from mlsae.lens.tuned import lens_ref, resolve_space

    src, data, model = inputs.parts()
    info = source.info
    model = replace(
        model, model=info.get("model") or model.model, dtype=info.get("model_dtype") or model.dtype
    )
    data = replace(
        data,
        dataset=info.get("dataset") or data.dataset,
        split=info.get("split") or data.split,
        context_length=int(info.get("context_length") or data.context_length),
        exclude_sink=bool(info.get("exclude_sink", False)),  # caches made before: not excluded
    )

    lens = lens_ref(sae.lens) if sae.lens is not None else None
    if lens is not None:  # a cache through another lens: refused
        resolve_space(lens, source.lens, what="--lens")
    lens = lens or source.lens  # a lens cache: the SAE lives in its lens space
    layers = _layers(source, src.layers, sae)
    mode = "per_layer" if sae.per_layer else ("single" if len(layers) == 1 else "mlsae")
    members = member_specs(mode, layers, sae, train.seed)
    for m in members:  # shape errors before any work
        SaeConfig(
            d_in=source.d_model,
            expansion_factor=m.expansion_factor,
            k=m.k,
            normalize=sae.normalize,
            **sae.architecture_settings(),
        )
    grouped = sae.architecture in ("token_topk", "crosscoder")
    if grouped and mode == "mlsae" and train.batch_tokens % len(layers):
        raise MlsaeError(
            f"--architecture {sae.architecture} takes whole tokens: --batch-tokens "
            f"{train.batch_tokens} is not a multiple of the {len(layers)} layers"
        )
    cache = getattr(source, "path", None)
    if cache is not None:  # a cache is read whole: no command-line token default in the record
        src = replace(src, tokens=None)
    return RunConfig(
        data=data,
        model=model,
        source=src,
        sae=sae,
        train=train,
        cache=None if cache is None else str(Path(cache).resolve()),
        mode=mode,
        layers=layers,
        d_in=source.d_model,
        members=members,
        lens=lens,
        fingerprint=getattr(source, "fingerprint", None),
    )


def check_new_run(out: Path) -> None:
    """MlsaeError unless `out` can hold a new run (absent, empty, or only its own RUN/cache)."""
    if (out / RUN_CFG).exists():
        raise MlsaeError(f"{out} already holds a training run: continue it with --resume {out}")
    if out.exists() and not out.is_dir():
        raise MlsaeError(f"--out {out} is a file: choose a new --out")
    if out.exists() and any(p.name not in ("cache", LOCK) for p in out.iterdir()):
        raise MlsaeError(f"{out} exists and is not empty: choose a new --out")


def read_run(
    out: Path, train_given: dict[str, object] | None = None, save: bool = True
) -> RunConfig:
    """RUN/train_cfg.json, with `train_given` (max_steps, epochs) applied (and saved unless not
    `save`: then `save_run` does it once the resume is known to work)."""
    path = out / RUN_CFG
    if not path.is_file():
        hint = ""
        if (out / "cache").is_dir():  # a run that failed while caching or being planned
            hint = ": its first `mlsae train --out` stopped before training; run it again"
        raise MlsaeError(f"--resume {out}: no {RUN_CFG} there (not a training run){hint}")
    run = RunConfig.from_dict(read_json(path, "run config"), str(path))
    if train_given:
        other = sorted(set(train_given) - RESUMABLE)
        if other:
            opts = ", ".join("--" + k.replace("_", "-") for k in other)
            raise MlsaeError(
                f"{opts}: a resumed run keeps its settings (only --max-steps and "
                "--epochs may change)"
            )
        run.train = replace(run.train, **train_given)  # validated again
        if save:
            save_run(out, run)
    return run


def save_run(out: Path, run: RunConfig) -> None:
    """Write RUN/train_cfg.json if it does not already hold `run`."""
    path = out / RUN_CFG
    try:
        same = RunConfig.from_dict(read_json(path, "run config"), str(path)) == run
    except MlsaeError:
        same = False
    if not same:
        write_json(path, run.to_dict())
