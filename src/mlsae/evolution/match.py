"""SAE Match (Balagansky et al. 2024, "Mechanistic Permutability"): a one-to-one permutation of
features between the SAEs of adjacent layers, scored by reconstruction (SPEC section 6).

Matching. Each latent's decoder row is folded to unit norm: W_dec[j] / ||W_dec[j]||, its norm
moved into the activation (for a ReLU/JumpReLU SAE this is the exact reparametrisation
W_enc[:, j] *= ||W_dec[j]||, b_enc[j] *= ||W_dec[j]||; under SPEC 2 the rows are already unit so
it changes nothing). The cost of matching up feature i to down feature j is the squared distance
of the folded rows, ||u_i - v_j||^2 = 2 - 2 cos(u_i, v_j); scipy's linear_sum_assignment gives
the permutation minimising the total. Encoders are not used for the matching.

Scoring, per pair (u, d) over the same used tokens, all with `mlsae.sae.metrics` FVU (per-dimension
mean of x_d over the tokens):
  matched    decode_d(P encode_u(x_u)) vs x_d; the code keeps x_u's standardization (mean, std)
  matched_target_scale  the same but un-standardized with x_d's own (mean, std) (2 scalars per
             token taken from the target: separates direction matching from norm growth)
  unpermuted decode_d(encode_u(x_u)) vs x_d (identity permutation: the baseline)
  own        decode_d(encode_d(x_d)) vs x_d (the down SAE's own FVU)
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mlsae.sae.autoencoder import EncoderOutput, SparseAutoencoder
from mlsae.sae.metrics import LayerMetrics

VARIANTS = ("matched", "matched_target_scale", "unpermuted", "own")


def folded_decoder(w_dec: Tensor) -> Tensor:
    """Decoder rows [d_sae, d_in] with their norms folded out (unit rows, float64)."""
    return torch.nn.functional.normalize(w_dec.detach().to(torch.float64), dim=1)


def match_permutation(w_dec_up: Tensor, w_dec_down: Tensor) -> Tensor:
    """perm [d_up] int64: the down feature matched to each up feature (-1 if unmatched, only
    when d_up > d_down). Minimises sum ||u_i - v_perm(i)||^2 over one-to-one maps."""
    u, v = folded_decoder(w_dec_up), folded_decoder(w_dec_down)
    cost = (2 - 2 * (u @ v.T)).numpy()  # [d_up, d_down]
    rows, cols = linear_sum_assignment(cost)
    perm = torch.full((u.shape[0],), -1, dtype=torch.int64)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    return perm


def _replace(enc: EncoderOutput, **kw: Tensor) -> EncoderOutput:
    """A copy of an EncoderOutput with some fields replaced."""
    return enc._replace(**kw)


def permute_codes(enc: EncoderOutput, perm: Tensor) -> EncoderOutput:
    """The code with each active up feature i renamed perm[i] (unmatched ones switched off)."""
    idx = perm[enc.top_indices]
    acts = torch.where(idx >= 0, enc.top_acts, torch.zeros_like(enc.top_acts))
    return _replace(enc, top_indices=idx.clamp_min(0), top_acts=acts)


class MatchScores:
    """Streaming FVUs of the four variants for every adjacent pair (keyed by the down layer)."""

    def __init__(self, pairs: list[tuple[int, int]], perms: list[Tensor], d_in: int, d_sae: int):
        self.pairs, self.perms = pairs, perms
        downs = [d for _, d in pairs]
        self.metrics = {v: LayerMetrics(downs, d_in, d_sae) for v in VARIANTS}

    @torch.no_grad()
    def update(
        self,
        p: int,
        sae_down: SparseAutoencoder,
        enc_up: EncoderOutput,
        enc_down: EncoderOutput,
        x_down: Tensor,
    ) -> None:
        """Add one batch of pair p: codes of x_up and x_down [n, d_in] at both layers."""
        d = self.pairs[p][1]
        moved = permute_codes(enc_up, self.perms[p])._replace(center=enc_down.center)
        target = _replace(moved, mean=enc_down.mean, std=enc_down.std)
        for name, code in (
            ("matched", moved),
            ("matched_target_scale", target),
            ("unpermuted", enc_up._replace(center=enc_down.center)),
            ("own", enc_down),
        ):
            self.metrics[name].update(d, x_down, sae_down.decode(code))

    def result(self) -> list[dict]:
        """Per pair: up/down layers, the FVU of each variant, and the fraction of features whose
        match is the same index (1.0 for SAEs trained from a shared init that barely moved)."""
        fvus = {v: m.per_layer()["fvu"] for v, m in self.metrics.items()}
        out = []
        for p, (u, d) in enumerate(self.pairs):
            perm = self.perms[p]
            same = float((perm == torch.arange(len(perm))).double().mean())
            out.append(
                {
                    "up_layer": u,
                    "down_layer": d,
                    **{v: fvus[v][p] for v in VARIANTS},
                    "identity_fraction": same,
                }
            )
        return out
