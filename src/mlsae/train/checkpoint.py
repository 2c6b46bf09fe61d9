"""The training run folder: train_cfg.json, checkpoints, metrics log, stop signals (train.py).

RUN/checkpoint/ holds `state.pt` (all SAE weights, Adam states, dead-latent counters, step,
epoch, batch index within the epoch, RNG state) and `checkpoint.json` (a readable summary).
It is written to a temp folder and swapped in by renames, so a kill at any moment leaves either
the previous or the new checkpoint (`recover_dir` picks the survivor).
"""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mlsae.activations.cache import ActivationCache
from mlsae.core.config import DataConfig, ModelConfig, SaeConfig, TrainConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, recover_dir, write_json
from mlsae.sae.autoencoder import validate_cfg

RUN_CFG = "train_cfg.json"
CHECKPOINT = "checkpoint"
STATE = "state.pt"
VERSION = 1


def save_checkpoint(run: Path, state: dict[str, Any]) -> Path:
    """Write RUN/checkpoint atomically. state: step, epoch, batch, members{name: {...}}."""
    run = Path(run)
    dst = run / CHECKPOINT
    with atomic_dir(dst) as tmp:
        payload = {**state, "version": VERSION, "rng": torch.get_rng_state()}
        torch.save(payload, tmp / STATE)
        summary = {k: state[k] for k in ("step", "epoch", "batch")}
        summary["members"] = sorted(state["members"])
        write_json(tmp / "checkpoint.json", summary)
    return dst


def load_checkpoint(run: Path) -> dict[str, Any] | None:
    """The latest checkpoint of RUN (restores the torch RNG), or None if there is none yet."""
    path = recover_dir(Path(run) / CHECKPOINT) / STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a corrupt file
        raise MlsaeError(f"{path}: unreadable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise MlsaeError(f"{path}: not an mlsae checkpoint (version {VERSION})")
    torch.set_rng_state(state["rng"])
    return state


class StopSignals:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def open_metrics(out: Path, keep_step: int) -> Any:
    """RUN/metrics.jsonl opened for appending, cut back to steps <= keep_step (resume)."""
    path = out / "metrics.jsonl"
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= keep_step]
        path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a")  # noqa: SIM115 - closed by the caller


def parse_layers(spec: str | None, cache: ActivationCache) -> list[int]:
    from mlsae.data.capture import iter_layers_arg

    if spec is None or spec.strip().lower() in ("", "all"):
        return list(cache.layers)
    layers = iter_layers_arg(spec, 1 << 30)
    bad = [x for x in layers if x not in cache.layers]
    if bad:
        raise MlsaeError(f"layer(s) {bad} not in the cache {cache.path} (it holds {cache.layers})")
    return layers


def _specs(
    mode: str, layers: list[int], rs: list[int], ks: list[int], seed: int
) -> list[dict[str, Any]]:
    """Members of the run: name, expansion_factor, k, layers, seed."""
    grid = [(r, k) for r in sorted(set(rs)) for k in sorted(set(ks))]
    if mode == "per_layer":
        if len(grid) != 1:
            raise MlsaeError("--per-layer takes one --expansion-factor and one -k")
        (r, k), = grid  # fmt: skip
        # Distinct seeds per layer so adjacent-layer SAEs do not share an init.
        return [
            {"name": f"layer_{ly:02d}", "expansion_factor": r, "k": k, "layers": [ly],
             "seed": seed + 1_000_003 * (ly + 1)}
            for ly in layers
        ]  # fmt: skip
    names = ["sae"] if len(grid) == 1 else [f"sae_R{r}_k{k}" for r, k in grid]
    return [
        {"name": n, "expansion_factor": r, "k": k, "layers": layers, "seed": seed}
        for n, (r, k) in zip(names, grid, strict=True)
    ]


def check_train_cfg(cfg: TrainConfig) -> None:
    checks = {
        "--batch-tokens must be >= 2": cfg.batch_tokens >= 2,
        "--lr must be > 0": cfg.lr > 0,
        "--epochs must be >= 1": cfg.epochs >= 1,
        "--max-steps must be >= 1": cfg.max_steps is None or cfg.max_steps >= 1,
        "--dead-tokens must be >= 1": cfg.dead_tokens >= 1,
        "--checkpoint-every must be >= 1": cfg.checkpoint_every >= 1,
        "--k-aux must be >= 1": cfg.k_aux is None or cfg.k_aux >= 1,
        "--aux-coef must be >= 0": cfg.aux_coef >= 0,
    }
    for msg, ok in checks.items():
        if not ok:
            raise MlsaeError(msg)


def _cache_from_source(out: Path, src: dict[str, Any]) -> ActivationCache:
    """Build RUN/cache from a model + dataset (resumable), then open it."""
    from mlsae.activations.extract import build_cache

    build_cache(
        out=out / "cache",
        model_cfg=ModelConfig(model=src["model"]),
        data_cfg=DataConfig(
            dataset=src["dataset"], split="train", context_length=src["context_length"]
        ),
        n_tokens=src["tokens"],
        layers=src.get("layers"),
        lens=src.get("lens"),
    )
    return ActivationCache(out / "cache")


def new_run(
    out: Path, cache: ActivationCache | None, source: dict[str, Any], layers_spec: str | None,
    single_layer: int | None, per_layer: bool, rs: list[int], ks: list[int], normalize: str,
    cfg: TrainConfig,
) -> dict[str, Any]:  # fmt: skip
    """Validate the options, create RUN and write train_cfg.json; returns the run config."""
    if (out / RUN_CFG).exists():
        raise MlsaeError(f"{out} already holds a training run: continue it with --resume {out}")
    if out.exists() and any(p.name != "cache" for p in out.iterdir()):
        raise MlsaeError(f"{out} exists and is not empty: choose a new --out")
    if single_layer is not None and (per_layer or layers_spec is not None):
        raise MlsaeError("--single-layer cannot be combined with --layers or --per-layer")
    check_train_cfg(cfg)
    lens = source.get("lens")
    if lens is not None:
        from mlsae.lens.tuned import lens_ref, resolve_space

        lens = lens_ref(lens)
        resolve_space(lens, None if cache is None else cache.manifest.get("lens"), what="--lens")
    out.mkdir(parents=True, exist_ok=True)
    if cache is None:
        cache = _cache_from_source(out, source)
    lens = lens or cache.manifest.get("lens")
    layers = parse_layers(str(single_layer) if single_layer is not None else layers_spec, cache)
    mode = "per_layer" if per_layer else ("single" if len(layers) == 1 else "mlsae")
    specs = _specs(mode, layers, rs or [8], ks or [32], cfg.seed)
    for s in specs:  # shape errors before any work
        r, k = s["expansion_factor"], s["k"]
        validate_cfg(SaeConfig(d_in=cache.d_model, expansion_factor=r, k=k, normalize=normalize))  # type: ignore[arg-type]
    run = {
        "cache": str(cache.path.resolve()),
        "mode": mode,
        "layers": layers,
        "d_in": cache.d_model,
        "normalize": normalize,
        "members": specs,
        "train": asdict(cfg),
        "model": cache.manifest.get("model"),
        "dataset": cache.manifest.get("dataset"),
        "lens": lens,  # the SAE's space; a plain cache gets T_l applied on the fly
    }
    write_json(out / RUN_CFG, run)
    return run
