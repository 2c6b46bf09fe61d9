"""`mlsae import` and `load_any`: foreign SAE folders (sparsify, SAELens, the paper's hub
checkpoints) become mlsae SAE folders, so `evaluate`, `analyze` and `explore` read them
unchanged. A folder holding one SAE per hook (a sparsify run, a SAELens export) becomes one SAE
when every hook holds the same dictionary (an MLSAE), else a per-layer set: OUT/layer_XX/ and
OUT/per_layer.json, as `mlsae train --per-layer` writes.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json_object, write_json
from mlsae.core.outputs import check_output
from mlsae.interchange.foreign import PAPER_CFG, read_paper, read_sparsify
from mlsae.interchange.meta import build_sae
from mlsae.interchange.saelens import SL_WEIGHTS, read_saelens
from mlsae.sae.autoencoder import SAE_CFG as CFG_FILE
from mlsae.sae.autoencoder import SAE_WEIGHTS as WEIGHTS_FILE
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import load_sae

log = logging.getLogger(__name__)

FORMATS = ("sparsify", "saelens", "mlsae-hub")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def detect_format(folder: Path) -> str | None:
    """'mlsae', 'sparsify', 'saelens' or 'mlsae-hub' for a folder holding one SAE, else None."""
    if (folder / SL_WEIGHTS).is_file() and (folder / CFG_FILE).is_file():
        return "saelens"
    if (folder / PAPER_CFG).is_file() and any(
        (folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
    ):
        return "mlsae-hub"
    if (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        raw = read_json_object(folder / CFG_FILE, "SAE config")
        return "mlsae" if "normalize" in raw and "expansion_factor" in raw else "sparsify"
    if (folder / "sae" / CFG_FILE).is_file():
        return "mlsae"
    return None


def _detect_any(src: Path) -> str:
    """The one foreign format of SRC or of its subfolders; MlsaeError otherwise."""
    kinds = {detect_format(src)} - {None}
    if not kinds:
        kinds = {detect_format(p) for p in src.iterdir() if p.is_dir()} - {None}
    if len(kinds) != 1:
        raise MlsaeError(f"{src}: no SAE folder in a known format ({', '.join(FORMATS)})")
    fmt = kinds.pop()
    if fmt is None or fmt == "mlsae":
        raise MlsaeError(f"{src} is already an mlsae SAE folder")
    return fmt


def _members(src: Path, fmt: str) -> list[Path]:
    """The one-SAE folders of SRC in format fmt: SRC itself, or its subfolders (hooks)."""
    if detect_format(src) == fmt:
        return [src]
    subs = sorted(p for p in src.iterdir() if p.is_dir() and detect_format(p) == fmt)
    if not subs:
        raise MlsaeError(f"{src} holds no {fmt} SAE folder")
    return subs


def read_one(
    folder: Path, fmt: str, model: str | None, layers: list[int] | None, name: str | None = None
) -> tuple[SaeConfig, dict[str, Tensor]]:
    """One foreign SAE folder as an mlsae config + weights, checked as `load_sae` checks an
    SAE folder (so what is imported loads): a wrongly typed config value is one MlsaeError
    naming the folder, never a traceback."""
    readers = {
        "sparsify": lambda: read_sparsify(folder, model, layers),
        "saelens": lambda: read_saelens(folder, model, layers),
        "mlsae-hub": lambda: read_paper(folder, name, model, layers),
    }
    if fmt not in readers:
        raise MlsaeError(f"unknown --format {fmt!r}: {', '.join(FORMATS)}")
    try:
        cfg, t = readers[fmt]()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise MlsaeError(
            f"{folder}: not a readable {fmt} SAE: a config value has the wrong "
            f"type ({type(e).__name__}: {str(e)[:100]})"
        ) from None
    return checked_import(cfg, t, folder)


def checked_import(
    cfg: SaeConfig, t: dict[str, Tensor], folder: Path
) -> tuple[SaeConfig, dict[str, Tensor]]:
    """The config re-read through SaeConfig's own type checks (as `load_sae` will) and the
    weights required to be finite floating-point tensors."""
    cfg = SaeConfig.from_dict(cfg.to_dict(), f"{folder} (the imported config)")
    for n, v in t.items():
        if not v.is_floating_point():
            raise MlsaeError(f"{folder}: {n} has dtype {v.dtype}, not floating point")
        if not bool(torch.isfinite(v).all()):
            raise MlsaeError(f"{folder}: {n} holds NaN or inf values: not importable")
    return cfg, t


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def read_all(
    src: Path,
    fmt: str,
    model: str | None = None,
    layers: list[int] | None = None,
    name: str | None = None,
) -> list[tuple[SaeConfig, dict[str, Tensor]]]:
    """Every SAE in SRC; hooks holding the same weights merge into one SAE over their layers."""
    folders = _members(src, fmt)
    if layers is not None and len(folders) > 1:
        raise MlsaeError(f"--layers applies to one SAE folder, and {src} holds {len(folders)}")
    groups: list[tuple[SaeConfig, dict[str, Tensor]]] = []
    for f in folders:
        cfg, t = read_one(f, fmt, model, layers, name)
        if not cfg.layers:
            raise MlsaeError(f"{f}: cannot tell which layer it reads: pass --layers")
        for gcfg, gt in groups:
            if (
                gcfg.d_in == cfg.d_in
                and gcfg.k == cfg.k
                and gcfg.d_sae == cfg.d_sae
                and _same(gt, t)
            ):
                gcfg.layers = sorted(set(gcfg.layers) | set(cfg.layers))
                break
        else:
            groups.append((cfg, t))
    return groups


def import_command(
    src: str | Path,
    fmt: str,
    out: str | Path,
    model: str | None = None,
    layers: list[int] | None = None,
    dataset: str | None = None,
    name: str | None = None,
) -> list[Path]:
    """`mlsae import --format FMT SRC --out DIR`: mlsae SAE folder(s); returns them.
    fmt 'auto' detects it from the files."""
    if fmt not in (*FORMATS, "auto"):
        raise MlsaeError(f"unknown --format {fmt!r}: {', '.join(FORMATS)} or auto")
    src, out = Path(src).expanduser(), Path(out)
    if not src.exists() and _REPO_ID.match(str(src)):
        name, src = name or str(src), fetch_hub(str(src))
    if not src.is_dir():
        raise MlsaeError(f"{src} is not a folder")
    check_output(out, "sae", inputs=[src], apart=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MlsaeError(f"--out {out} exists and is not empty: choose a new folder")
    if fmt == "auto":
        fmt = _detect_any(src)
    groups = read_all(src, fmt, model, layers, name)
    written = []
    per_layer = len(groups) > 1
    if per_layer and any(len(c.layers) != 1 for c, _ in groups):
        raise MlsaeError(f"{src} holds {len(groups)} different SAEs that are not one per layer")
    for cfg, t in groups:
        cfg.dataset = dataset or cfg.dataset
        if not cfg.model:
            log.warning(
                f"{src}: the source does not name its model: pass --model (or later "
                "--model to evaluate/analyze)"
            )
        sae = build_sae(cfg, t, str(src), compute_dtype=torch.float32)
        path = out / f"layer_{cfg.layers[0]:02d}" if per_layer else out
        sae.save(path)
        written.append(path)
    if per_layer:
        entries = [
            {"layer": c.layers[0], "path": p.name}
            for (c, _), p in zip(groups, written, strict=True)
        ]
        write_json(
            out / "per_layer.json", {"layers": [e["layer"] for e in entries], "saes": entries}
        )
    write_json(
        out / "import.json", {"source": str(src), "format": fmt, "saes": [str(p) for p in written]}
    )
    log.info(f"imported {len(written)} SAE(s) from {src} ({fmt}) into {out}")
    return written


def fetch_hub(repo_id: str) -> Path:
    """Local snapshot of a hub repo through huggingface_hub (its cache, then the hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached: ask the hub
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise MlsaeError(f"{repo_id!r} is not a local folder nor in the HF cache (HF_HUB_OFFLINE)")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:  # network errors, 404s, gated repos...
        msg = str(e).strip().splitlines()
        raise MlsaeError(
            f"{repo_id!r} is not a local folder, and the hub failed ({(msg[0] if msg else type(e).__name__)[:120]})"
        ) from None


def load_any(
    src: str | Path, compute_dtype: torch.dtype | None = None, **kw: Any
) -> SparseAutoencoder:
    """Load one SAE from an mlsae folder or run, a sparsify / SAELens / paper checkpoint folder,
    or an `org/name` hub repo of any of these (fetched through huggingface_hub). kw: model,
    layers, for sources that do not record them."""
    path = Path(src).expanduser()
    name = None
    if not path.exists() and _REPO_ID.match(str(src)):
        name, path = str(src), fetch_hub(str(src))
    if not path.is_dir():
        raise MlsaeError(f"{src} is not an SAE folder, run folder or hub repo id")
    fmt = detect_format(path)
    if fmt is None:
        kinds = {detect_format(p) for p in path.iterdir() if p.is_dir()} - {None}
        if len(kinds) != 1:
            raise MlsaeError(
                f"{src}: no SAE folder in a known format (mlsae, {', '.join(FORMATS)})"
            )
        fmt = kinds.pop()
    if fmt is None or fmt == "mlsae":
        return load_sae(path, compute_dtype=compute_dtype)
    groups = read_all(path, fmt, kw.get("model"), kw.get("layers"), name)  # type: ignore[arg-type]
    if len(groups) != 1:
        raise MlsaeError(f"{src} holds {len(groups)} different SAEs: load one of its folders")
    return build_sae(*groups[0], str(src), compute_dtype=compute_dtype)
