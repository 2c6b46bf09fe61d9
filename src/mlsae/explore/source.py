"""Where the explorer gets its SAEs and its tokens: the one place that reads a run folder and
the one place that reads activations (any `ActivationSource`: a cache or the model run live).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from mlsae.activations.source import ActivationSource
from mlsae.core.errors import MlsaeError
from mlsae.sae.autoencoder import SparseAutoencoder


@dataclass
class RunSae:
    """One SAE of a run folder."""

    label: str  # 'MLSAE', 'L5', 'layer_05', 'sae_R8_k32', ...
    path: Path
    sae: SparseAutoencoder
    layers: list[int]  # block indices it reads, sorted


@dataclass
class Chunk:
    """Consecutive tokens of the stream with the activations of the requested layers."""

    acts: Tensor  # [n, L, d] any float dtype, model space (or lens space for a lens cache)
    token_ids: Tensor  # [n] int64
    mask: Tensor  # [n] bool, False at special tokens
    offset: int  # stream position of token 0


def run_saes(run: str | Path) -> list[RunSae]:
    """Every SAE of a run folder: an SAE folder, a run with sae/, a sweep (one per member) or a
    per-layer set (per_layer.json or layer_XX/ folders), in a stable order."""
    from mlsae.sae.folders import PER_LAYER, RunFolder, load_sae

    folder = RunFolder(Path(run))
    if (folder.path / PER_LAYER).is_file():
        return [
            RunSae(f"layer_{ly:02d}", d, load_sae(d), [ly]) for ly, d in folder.per_layer_dirs()
        ]
    out = []
    for d in folder.sae_dirs():
        sae = load_sae(d)
        if sae.token_code:  # the index stores per-vector codes, each from one layer's vector
            raise MlsaeError(
                f"{d} is a {sae.cfg.architecture}: index and explore encode one layer's "
                "vectors at a time, its code reads all layers of a token at once "
                "(not supported; evaluate and analyze take it)"
            )
        layers = sorted(int(x) for x in sae.cfg.layers)
        if not layers:
            raise MlsaeError(f"{d}: the SAE lists no layers")
        if len(set(layers)) != len(layers):
            raise MlsaeError(f"{d}: the SAE's cfg.json lists a layer twice ({sae.cfg.layers})")
        label = d.name if d.name != "sae" else ("MLSAE" if len(layers) > 1 else f"L{layers[0]}")
        out.append(RunSae(label, d, sae, layers))
    return out


def source_chunks(
    source: ActivationSource, layers: list[int], max_tokens: int | None
) -> Iterator[Chunk]:
    """The source's blocks in stream order (up to max_tokens, whole contexts), with the
    columns of `layers`."""
    missing = [ly for ly in layers if ly not in source.layers]
    if missing:
        raise MlsaeError(f"{source.describe()} lacks layer(s) {missing} (it holds {source.layers})")
    cols = [source.layers.index(ly) for ly in layers]
    for b in source.iter_ordered(max_tokens):
        yield Chunk(b.activations[:, cols], b.token_ids, b.mask, b.offset)


def weights_sha256(sae_dir: Path) -> str:
    """sha256 of an SAE folder's weights file (what the explorer checks it serves)."""
    import hashlib

    from mlsae.sae.autoencoder import SAE_WEIGHTS

    h = hashlib.sha256()
    try:
        with open(Path(sae_dir) / SAE_WEIGHTS, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise MlsaeError(f"{sae_dir}: unreadable SAE weights ({e.strerror})") from None
    return h.hexdigest()


def check_served_saes(saes: list[RunSae], indexed: dict | None, index: Path) -> None:
    """MlsaeError unless every SAE about to be served has the weights it had when indexed
    (`indexed`: label -> sha256 from the index; None for an index older than this check)."""
    if indexed is None:
        return
    labels = [s.label for s in saes]
    if sorted(labels) != sorted(indexed):
        raise MlsaeError(
            f"{index} indexed the SAEs {sorted(indexed)}, the run now holds "
            f"{sorted(labels)}: run `mlsae index` again"
        )
    for s in saes:
        if weights_sha256(s.path) != indexed[s.label]:
            raise MlsaeError(
                f"{s.path}: the SAE changed since {index} was made: run `mlsae index` again"
            )
