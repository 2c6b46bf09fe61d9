"""SAEBench's core metrics per layer (`mlsae evaluate --format saebench`; SPEC 7).

Every metric is measured at the SAE's block in the model's space, on the used positions of the
evaluation's clean passes (special tokens and, where the source excludes them, sink positions
left out), for any architecture through `sae.encode` / `sae.decode`. With x a vector, x_hat its
reconstruction, z its code, and means over vectors unless said:

- l2_norm_in / l2_norm_out: mean ||x|| / mean ||x_hat||; l2_ratio: mean of ||x_hat|| / ||x||
  (||x|| < 1e-4 counted as 1, as SAEBench does);
- relative_reconstruction_bias: sum ||x_hat||^2 / sum <x, x_hat> (Rajamanoharan et al. eq. 10,
  over all vectors; SAEBench averages it per batch);
- cossim: mean cos(x, x_hat); explained_variance: 1 - FVU (SPEC 3); explained_variance_legacy:
  mean of 1 - ||x - x_hat||^2 / ||x - m||^2 with m the batch mean; mse: SPEC 3's MSE;
- l0 / l1: mean number / sum of active latents per vector; frac_alive: fraction of latents
  active on some vector; freq_over_1/10_percent: fraction of latents active on more than 1% / 10%
  of vectors (normalized_*: their share of all activations);
- average_max_decoder_cosine_sim: mean over latents of the largest cosine with another
  latent's decoder direction (directions read through `decode`: the code
  with one unit latent minus the empty code); the encoder's likewise where the SAE has a W_enc;
- kl_div_score = (KL_zero - KL_sae) / KL_zero and ce_loss_score = (CE_zero - CE_sae) /
  (CE_zero - CE_clean), CE and KL means over the predicted positions of the one-block splices,
  "zero" the block's output replaced by zeros at the same positions.

SAEBench's result file is one per SAE and hook: `write_saebench` writes one per layer, in the
layout of its `CoreEvalOutput` (sae_bench.evals.core.eval_output), beside the mlsae JSON.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mlsae.eval.splice import CleanPass

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mlsae.eval.evaluate import Entry

_DIRECTION_CHUNK = 1024  # latents decoded / compared at a time


@dataclass
class _Sums:
    """Running sums of one layer (float64)."""

    d_sae: int
    n: int = 0
    norm_in: float = 0.0
    norm_out: float = 0.0
    ratio: float = 0.0
    out_sq: float = 0.0
    dot: float = 0.0
    cos: float = 0.0
    legacy_ev: float = 0.0
    l1: float = 0.0
    ce_zero: float = 0.0
    kl_zero: float = 0.0
    ce_clean: float = 0.0
    n_pred: int = 0
    counts: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.d_sae, dtype=torch.int64)

    def add(self, x: Tensor, x_hat: Tensor, top_acts: Tensor, top_indices: Tensor) -> None:
        """x, x_hat [N, d] model space; the code [N, k] (0 = inactive)."""
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        safe_in = torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)
        self.n += len(x)
        self.norm_in += float(n_in.sum())
        self.norm_out += float(n_out.sum())
        self.ratio += float((n_out / safe_in).sum())
        self.out_sq += float(n_out.pow(2).sum())
        self.dot += float((x * x_hat).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        resid = (x - x_hat).pow(2).sum(-1)
        spread = (x - x.mean(0)).pow(2).sum(-1)
        self.legacy_ev += float((1 - resid / spread).sum())
        acts = top_acts.detach().double().cpu()
        on = acts > 0
        self.l1 += float(acts.clamp_min(0).sum())
        self.counts += torch.bincount(top_indices.cpu()[on], minlength=self.d_sae)


def max_other_cosine(directions: Tensor) -> Tensor:
    """[F] each row's largest cosine with any other row of `directions` [F, d]."""
    u = torch.nn.functional.normalize(directions.double(), dim=-1)
    out = torch.empty(len(u), dtype=torch.float64)
    for i in range(0, len(u), _DIRECTION_CHUNK):
        sims = u[i : i + _DIRECTION_CHUNK] @ u.T  # [c, F]
        rows = torch.arange(len(sims))
        sims[rows, rows + i] = -float("inf")  # not itself
        out[i : i + len(sims)] = sims.max(dim=1).values
    return out


@torch.no_grad()
def decoder_directions(sae: Any) -> Tensor:
    """[F, d] each latent's decoder direction in the SAE's space: decode(one unit latent) -
    decode(no latent), through the SAE's own decode (any architecture with a linear decoder)."""
    from mlsae.sae.autoencoder import EncoderOutput

    d_sae, dev = int(sae.cfg.d_sae), sae.device
    ones = torch.ones(1, 1, device=dev)
    zero_center = torch.zeros(1, int(sae.cfg.d_in), device=dev)  # cancels in the difference
    empty = EncoderOutput(
        torch.zeros(1, 1, device=dev),
        torch.zeros(1, 1, dtype=torch.long, device=dev),
        torch.zeros(1, 1, device=dev),
        ones,
        zero_center,
    )
    base = sae.decode(empty)  # [1, d]
    rows = []
    for i in range(0, d_sae, _DIRECTION_CHUNK):
        idx = torch.arange(i, min(d_sae, i + _DIRECTION_CHUNK), device=dev)[:, None]
        c = len(idx)
        enc = EncoderOutput(
            torch.ones(c, 1, device=dev),
            idx,
            torch.zeros(c, 1, device=dev),
            torch.ones(c, 1, device=dev),
            zero_center,
        )
        rows.append((sae.decode(enc) - base).float().cpu())
    return torch.cat(rows)


@dataclass
class SaebenchObserver:
    """SAEBench's core metrics of every evaluated layer, from the evaluation's clean passes."""

    entries: list[Entry]
    key: str = "saebench"
    sums: dict[int, _Sums] = field(init=False)
    by_layer: dict[int, Entry] = field(init=False)

    def __post_init__(self) -> None:
        self.by_layer = {layer: e for e in self.entries for layer in e.layers}
        self.sums = {ly: _Sums(int(e.sae.cfg.d_sae)) for ly, e in self.by_layer.items()}

    @torch.no_grad()
    def update(self, model: PreTrainedModel, cp: CleanPass) -> None:
        from mlsae.eval.batched import splice_layers

        zeros = {}
        for layer, e in self.by_layer.items():
            x_model = cp.vectors(layer)
            enc = e.sae.encode(e.space.to_sae(x_model, layer), layer)
            x_hat = e.sae.decode(enc)
            if e.space.lens is not None:
                x_hat = e.space.to_model(x_hat, layer)
            self.sums[layer].add(x_model, x_hat, enc.top_acts, enc.top_indices)
            zeros[layer] = torch.zeros_like(x_model)
        clean = float(cp.clean_ce.double().sum())
        for layer, s in splice_layers(model, cp, zeros).items():
            sums = self.sums[layer]
            sums.ce_zero += s.ce_sum
            sums.kl_zero += s.kl_sum
            sums.ce_clean += clean
            sums.n_pred += s.n

    def sae_cfgs(self) -> dict[int, Any]:
        """Each layer's SAE config (for the result files)."""
        return {layer: e.sae.cfg for layer, e in self.by_layer.items()}

    def to_json(self) -> dict[str, Any]:
        """{"layers": [...], "per_layer": [one flat dict of SAEBench metric names per layer]}."""
        decoder_cos: dict[int, float] = {}
        encoder_cos: dict[int, float] = {}
        for e in self.entries:  # one SAE's weights serve all its layers
            dec = float(max_other_cosine(decoder_directions(e.sae)).mean())
            w_enc = getattr(e.sae, "W_enc", None)
            enc = (
                float(max_other_cosine(w_enc.detach().T).mean())
                if isinstance(w_enc, Tensor)
                else None
            )
            for layer in e.layers:
                decoder_cos[layer], encoder_cos[layer] = dec, enc if enc is not None else math_nan
        layers = sorted(self.sums)
        rows = [self._layer(ly, decoder_cos[ly], encoder_cos[ly]) for ly in layers]
        return {"layers": layers, "per_layer": rows}

    def _layer(self, layer: int, decoder_cos: float, encoder_cos: float) -> dict[str, Any]:
        s, e = self.sums[layer], self.by_layer[layer]
        per = e.metrics.per_layer()
        i = e.metrics.layers.index(layer)
        n, p = max(s.n, 1), max(s.n_pred, 1)
        ce_clean, ce_zero = s.ce_clean / p, s.ce_clean / p + s.ce_zero / p
        delta_ce, kl = per["delta_ce"][i], per["kl"][i]
        ce_sae = ce_clean + delta_ce if delta_ce is not None else math_nan
        kl_sae = kl if kl is not None else math_nan
        kl_zero = s.kl_zero / p
        density = s.counts.double() / n
        total = float(density.sum()) or 1.0
        fvu = per["fvu"][i]
        return {
            "kl_div_score": (kl_zero - kl_sae) / kl_zero if kl_zero else math_nan,
            "kl_div_with_ablation": kl_zero,
            "kl_div_with_sae": kl_sae,
            "ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_clean)
            if ce_zero != ce_clean
            else math_nan,
            "ce_loss_with_ablation": ce_zero,
            "ce_loss_with_sae": ce_sae,
            "ce_loss_without_sae": ce_clean,
            "explained_variance": 1 - fvu if fvu is not None else math_nan,
            "explained_variance_legacy": s.legacy_ev / n,
            "mse": per["mse"][i] if per["mse"][i] is not None else math_nan,
            "cossim": s.cos / n,
            "l2_norm_in": s.norm_in / n,
            "l2_norm_out": s.norm_out / n,
            "l2_ratio": s.ratio / n,
            "relative_reconstruction_bias": s.out_sq / s.dot if s.dot else math_nan,
            "l0": float(s.counts.sum()) / n,
            "l1": s.l1 / n,
            "freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.1).double().mean()),
            "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total,
            "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total,
            "average_max_encoder_cosine_sim": encoder_cos,
            "average_max_decoder_cosine_sim": decoder_cos,
            "frac_alive": float((s.counts > 0).double().mean()),
            "total_tokens_eval_reconstruction": s.n_pred,
            "total_tokens_eval_sparsity_variance": s.n,
        }


math_nan = float("nan")

_CATEGORIES = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": (
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    ),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": (
        "freq_over_1_percent",
        "freq_over_10_percent",
        "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent",
        "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim",
        "frac_alive",
    ),
}
"""SAEBench's core result categories and the metric names in each (CoreMetricCategories)."""


def saebench_file(result: dict[str, Any], index: int, sae_cfg: dict[str, Any]) -> dict[str, Any]:
    """One layer's SAEBench core result (the JSON layout of SAEBench's CoreEvalOutput)."""
    section = result["saebench"]
    layer, metrics = section["layers"][index], section["per_layer"][index]
    return {
        "eval_type_id": "core",
        "eval_config": {
            "model_name": str(result.get("model", "")),
            "llm_dtype": "float32",
            "batch_size_prompts": 0,
            "n_eval_reconstruction_batches": 0,
            "n_eval_sparsity_variance_batches": 0,
            "dataset": str(sae_cfg.get("dataset") or ""),
            "context_size": int(sae_cfg.get("context_length") or 0),
            "compute_kl": True,
            "compute_ce_loss": True,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": False,
            "compute_featurewise_weight_based_metrics": False,
            "exclude_special_tokens_from_reconstruction": True,
            "verbose": False,
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {
            cat: {name: metrics[name] for name in names} for cat, names in _CATEGORIES.items()
        },
        "eval_result_details": [],
        "sae_bench_commit_hash": "none: measured by mlsae evaluate --format saebench",
        "sae_lens_id": f"blocks.{layer}.hook_resid_post",
        "sae_lens_release_id": str(result.get("sae", "")),
        "sae_lens_version": None,
        "sae_cfg_dict": {**sae_cfg, "hook_layer": layer},
        "eval_result_unstructured": {
            "mlsae_block": layer,
            "exclude_sink": result.get("exclude_sink"),
        },
    }


def write_saebench(result: dict[str, Any], out: Path, sae_cfgs: dict[int, Any]) -> list[Path]:
    """SAEBench core result files beside `out`: `<stem>.block<l>.saebench.json` per layer."""
    from mlsae.core.io import write_text
    from mlsae.core.outputs import check_output

    paths = []
    for i, layer in enumerate(result["saebench"]["layers"]):
        path = out.with_name(f"{out.stem}.block{layer}.saebench.json")
        check_output(path, "eval", file=True)
        cfg = sae_cfgs[layer]
        obj = saebench_file(result, i, asdict(cfg) if not isinstance(cfg, dict) else cfg)
        # NaN stays NaN (SAEBench's own files and pydantic's floats allow it)
        text = json.dumps(obj, indent=2, default=str, allow_nan=True)
        json.loads(text)  # (what we wrote reads back)
        paths.append(write_text(path, text))
    return paths
