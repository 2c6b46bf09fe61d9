"""Run and SAE folders on disk: the one place that knows their layout and finds the SAEs in them.

An SAE folder holds `cfg.json` + `sae.safetensors`. A training run folder holds `train_cfg.json`,
`metrics.jsonl`, `checkpoint/` and its SAE folders: `sae/` (an MLSAE or a single-layer SAE),
`sae_R{R}_k{k}/` (sweep members) or `layer_XX/` plus `per_layer.json` (a per-layer set).
`RunFolder(path)` accepts either kind of folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json, recover_dir
from mlsae.sae.autoencoder import SAE_CFG, SAE_WEIGHTS, SparseAutoencoder

if TYPE_CHECKING:
    from mlsae.core.config import RunConfig

log = logging.getLogger(__name__)

RUN_CFG, PER_LAYER, METRICS = "train_cfg.json", "per_layer.json", "metrics.jsonl"


def is_sae_dir(path: Path) -> bool:
    return (recover_dir(Path(path)) / SAE_CFG).is_file()


@dataclass
class RunFolder:
    """A training run folder, or a bare SAE folder (then it is its own only SAE)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_dir():
            raise MlsaeError(f"run folder {str(self.path)!r} does not exist")

    @property
    def is_run(self) -> bool:
        return (self.path / RUN_CFG).is_file()

    def sae_dirs(self) -> list[Path]:
        """Every SAE folder: the folder itself, RUN/sae, or each sub-folder with a cfg.json
        (sweep members, per-layer sets), sorted by name."""
        if is_sae_dir(self.path):
            return [recover_dir(self.path)]
        if is_sae_dir(self.path / "sae"):
            return [recover_dir(self.path / "sae")]
        subs = sorted(
            p.parent for p in self.path.glob(f"*/{SAE_CFG}") if not p.parent.name.startswith(".")
        )
        if not subs:
            raise MlsaeError(
                f"{self.path} holds no SAE (expected {SAE_CFG} + {SAE_WEIGHTS}, or {self.path}/sae/)"
            )
        return subs

    def sae_dir(self) -> Path:
        """The run's only SAE folder; MlsaeError listing them if there are several."""
        dirs = self.sae_dirs()
        if len(dirs) > 1:
            names = ", ".join(d.name for d in dirs[:8])
            raise MlsaeError(f"{self.path} holds several SAEs ({names}): pass one of their folders")
        return dirs[0]

    def per_layer_dirs(self) -> list[tuple[int, Path]]:
        """(layer, folder) of a per-layer set (from per_layer.json, else every sub-folder SAE),
        sorted by layer; each must be a single-layer SAE and each layer appear once."""
        from mlsae.core.schema import from_dict

        listing = self.path / PER_LAYER
        listed: list[int | None]
        if listing.is_file():
            obj = from_dict(PerLayerListing, read_json(listing, "per-layer listing"), str(listing))
            folders = [self.path / e.path for e in obj.saes]
            listed = [e.layer for e in obj.saes]
        else:
            folders = self.sae_dirs()
            listed = [None] * len(folders)
        out = []
        for folder, want in zip(folders, listed, strict=True):
            if not is_sae_dir(folder):
                raise MlsaeError(f"{listing}: {folder} is not an SAE folder ({SAE_CFG} missing)")
            layers = sae_layers(folder)
            if len(layers) != 1:
                raise MlsaeError(f"{folder} is not a single-layer SAE (layers {layers})")
            if want is not None and layers[0] != want:
                raise MlsaeError(
                    f"{listing}: {folder} is listed for layer {want} but its "
                    f"{SAE_CFG} says layer {layers[0]}"
                )
            out.append((layers[0], folder))
        out.sort(key=lambda t: t[0])
        got = [ly for ly, _ in out]
        if len(set(got)) != len(got):
            raise MlsaeError(f"{self.path} holds two SAEs for one layer (layers {got})")
        return out

    def load(self, folder: Path | None = None) -> SparseAutoencoder:
        """Load one SAE (default: the run's only one)."""
        return load_sae(folder if folder is not None else self.sae_dir())

    def run_config(self) -> RunConfig | None:
        """The run's train_cfg.json (for an SAE folder inside a run: its parent's), or None."""
        from mlsae.core.config import RunConfig

        for folder in (self.path, self.path.parent):
            if (folder / RUN_CFG).is_file():
                return RunConfig.from_dict(
                    read_json(folder / RUN_CFG, "run config"), str(folder / RUN_CFG)
                )
        return None

    def find_eval(self, sae_dir: Path | None = None) -> Path | None:
        """RUN/eval.json, else the first *.json of the run or SAE folder with `per_layer` (an
        `mlsae evaluate` output, read by `mlsae.eval.result.EvalResult.from_json`); None if there is
        none."""
        sae_dir = sae_dir or self.sae_dir()
        seen: set[Path] = set()
        cands = [
            self.path / "eval.json",
            *sorted(self.path.glob("*.json")),
            *sorted(sae_dir.glob("*.json")),
        ]
        for p in cands:
            if p in seen or not p.is_file():
                continue
            seen.add(p)
            try:
                obj = read_json(p)
            except MlsaeError:
                continue
            if is_eval_result(obj):
                return p
            if isinstance(obj, dict) and "per_layer" in obj:
                log.warning(f"{p}: not a readable `mlsae evaluate` output: ignored")
        return None


@dataclass
class PerLayerEntry:
    """One SAE of a per-layer set."""

    layer: int
    path: str
    """Folder name inside the run (layer_05, ...)."""

    def __post_init__(self) -> None:
        p = Path(self.path)
        if p.is_absolute() or ".." in p.parts or not self.path:
            raise MlsaeError(f"path {self.path!r} must be a folder inside the run")


@dataclass
class PerLayerListing:
    """RUN/per_layer.json: the SAEs of a per-layer set."""

    saes: list[PerLayerEntry]
    layers: list[int] | None = None


def is_eval_result(obj: Any) -> bool:
    """Whether a JSON value looks like an `mlsae evaluate` output: per_layer {metric: [number or
    null per layer]} and mean {metric: number or null}."""
    num = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    if not isinstance(obj, dict):
        return False
    per, mean = obj.get("per_layer"), obj.get("mean")
    return (
        isinstance(per, dict)
        and isinstance(mean, dict)
        and all(isinstance(v, list) and all(num(x) for x in v) for v in per.values())
        and all(num(v) for v in mean.values())
    )


def sae_layers(folder: Path) -> list[int]:
    """The `layers` of an SAE folder's cfg.json, without loading its weights."""
    from mlsae.core.config import SaeConfig

    path = recover_dir(Path(folder)) / SAE_CFG
    return list(SaeConfig.from_dict(read_json(path, "SAE config"), str(path)).layers)


def label(sae_dir: Path) -> str:
    """A short name for an SAE folder: the run's name for RUN/sae."""
    return sae_dir.parent.name if sae_dir.name == "sae" else sae_dir.name


def load_sae(path: str | Path, compute_dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Load an SAE folder (cfg.json + sae.safetensors) in eval mode with fp32 master weights.
    Also accepts a training run folder holding one SAE (`RUN/sae`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mlsae.core.config import SaeConfig

    path = Path(path)
    if not recover_dir(path).exists():
        raise MlsaeError(f"SAE folder {path} does not exist")
    if not is_sae_dir(path):
        path = RunFolder(path).sae_dir()
    path = recover_dir(path)
    cfg_path, w_path = path / SAE_CFG, path / SAE_WEIGHTS
    if not w_path.is_file():
        raise MlsaeError(f"{path} is not an SAE folder: missing {SAE_WEIGHTS}")
    cfg = SaeConfig.from_dict(read_json(cfg_path, "SAE config"), str(cfg_path))
    try:
        tensors = load_file(str(w_path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise MlsaeError(f"{w_path}: unreadable weights ({e})") from None
    sae = SparseAutoencoder(cfg, compute_dtype=compute_dtype)  # cfg.architecture's class
    want = sae.tensor_shapes()
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    if got != want:
        raise MlsaeError(f"{w_path} does not match {cfg_path}: expected {want}, found {got}")
    for n, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise MlsaeError(
                f"{w_path}: {n} has dtype {str(t.dtype).removeprefix('torch.')}, "
                "not a floating-point type: not SAE weights"
            )
        if not bool(torch.isfinite(t).all()):
            raise MlsaeError(f"{w_path}: {n} holds NaN or inf values (a diverged training?)")
    with torch.no_grad():
        for n in want:
            getattr(sae, n).copy_(tensors[n].float().reshape(getattr(sae, n).shape))
    return sae.eval()
