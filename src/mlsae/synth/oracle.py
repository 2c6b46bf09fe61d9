"""Oracle SAEs: per-layer SAEs whose latents ARE the true features, written as a normal
per-layer run folder. They separate the measure from the trainer: `mlsae evolution` on them
should find every true edge, so whatever it misses there is the detector's doing.

At layer l the decoder rows are the true directions in the space the SAE reads (with per-vector
standardisation: each direction's mean over dimensions removed, then unit norm) and the
encoder is their pseudo-inverse, so the code of a vector is exactly its features' activations
(up to one constant factor per feature) whenever the directions are linearly independent in
that space: orthonormal features, and fewer features than d_model under standardisation (which
removes one dimension). Latents beyond the features never fire."""

from __future__ import annotations

from pathlib import Path

import torch

from mlsae.core.config import Normalize, SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.synth.truth import Truth


def oracle_per_layer(truth: Truth, out: Path, normalize: Normalize = "none") -> Path:
    """Write out/layer_XX/ (one oracle SAE per layer, d_sae = d_model, k = n_features) and
    out/per_layer.json; returns out."""
    from mlsae.core.io import write_json
    from mlsae.sae.autoencoder import SparseAutoencoder
    from mlsae.synth.score import unit

    cfg = truth.cfg
    F, d = cfg.n_features, cfg.d_model
    if cfg.superposition or d - (normalize != "none") < F:
        raise MlsaeError(
            "oracle SAEs need orthonormal features, fewer than --d-model under "
            "per-vector standardisation"
        )
    out = Path(out)
    entries = []
    for ly in range(cfg.n_layers):
        sc = SaeConfig(
            d_in=d,
            expansion_factor=1,
            k=F,
            normalize=normalize,
            layers=[ly],
            model="synthetic",
            dataset="synthetic",
        )
        sae = SparseAutoencoder(sc)
        w = unit(truth.directions[:, ly], centre=normalize != "none")  # [F, d]
        enc = torch.linalg.pinv(w)  # [d, F]: u = z w  =>  z = u enc
        with torch.no_grad():
            sae.W_dec[:F] = w.float()
            sae.W_enc.zero_()
            sae.W_enc[:, :F] = enc.float()
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        sae.save(out / f"layer_{ly:02d}")
        entries.append({"layer": ly, "path": f"layer_{ly:02d}"})
    write_json(out / "per_layer.json", {"saes": entries, "layers": list(range(cfg.n_layers))})
    return out
