"""SAELens 6.x folders: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec
[d_sae, d_in], b_enc [d_sae], b_dec [d_in]), architecture "topk".

SAELens's TopK SAE (saes/topk_sae.py, saes/sae.py) computes, for x [..., d_in]:
    u = norm_in(x) - b_dec * apply_b_dec_to_input ; pre = u @ W_enc + b_enc
    z = ReLU(TopK_k(pre)) ; x_hat = norm_out(z @ W_dec + b_dec)
with norm "none" (identity) or "layer_norm": norm_in(x) = (x - mean) / (std + 1e-5), std
Bessel-corrected, and norm_out(y) = y * std + mean, WITHOUT the 1e-5. So mlsae's "none" and
"layer_norm" SAEs export exactly; a "standardize" SAE (x_hat = u_hat * (std + 1e-5) + mean)
has no exact SAELens mode: its encode is identical under "layer_norm" but its decode would
differ by 1e-5 * u_hat (relative 1e-5 / std), so it is exported only with `approximate=True`.

The loader (`SAE.load_from_disk`) reads a config as 6.x when `metadata.sae_lens_version` is
>= 6.0.0-rc.0 (`handle_config_defaulting`); otherwise `handle_pre_6_0_config` renames flat
pre-6 keys. We write the 6.x layout and read both.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import (
    atomic_dir,
    read_json_object,
    replace_dir,
    write_json,
    write_safetensors,
)
from mlsae.core.outputs import check_output, confined, folder_kind
from mlsae.interchange.foreign import strict_int, strict_layers
from mlsae.interchange.meta import (
    block_hook_names,
    hf_model_name,
    layer_of_hook,
    run_context,
    run_saes,
)
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import load_sae

log = logging.getLogger(__name__)

SAELENS_VERSION = "6.54.12"
"""The SAELens release whose loader the exported folders are tested against."""
SL_CFG, SL_WEIGHTS = "cfg.json", "sae_weights.safetensors"
APPROX_NOTE = (
    "exported with --approximate from normalize='standardize': SAELens's layer_norm mode maps "
    "back with std, mlsae with std + 1e-5, so decode differs by 1e-5 * (z @ W_dec + b_dec) "
    "(relative 1e-5 / std); encode is identical"
)
_NORM_TO_SL = {"none": "none", "layer_norm": "layer_norm", "standardize": "layer_norm"}


def _mlsae_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlsae")
    except PackageNotFoundError:
        return None


def standardize_error(what: str) -> MlsaeError:
    """The one-line refusal for a normalize='standardize' SAE without --approximate."""
    return MlsaeError(
        f"{what} uses normalize='standardize' (x_hat = u_hat * (std + 1e-5) + mean); SAELens's "
        "only per-vector mode, layer_norm, maps back with std, so its decode would differ by "
        "1e-5 * u_hat (encode is exact): pass --approximate to export it anyway"
    )


def saelens_config(
    sae: SparseAutoencoder, hook: str, layer: int, context: dict[str, Any], approximate: bool
) -> dict[str, Any]:
    """The 6.x cfg.json of `sae` read at block `layer` through module `hook`."""
    cfg = sae.cfg
    if cfg.architecture == "crosscoder":
        raise MlsaeError(
            "a crosscoder cannot be exported to SAELens: SAELens has no crosscoder "
            "format (one code per token over several layers' vectors)"
        )
    if cfg.architecture not in ("topk", "matryoshka"):  # matryoshka encodes as TopK does
        raise MlsaeError(
            f"a {cfg.architecture} SAE cannot be exported to SAELens: its inference code is a "
            "threshold learned in training, not SAELens's topk (mlsae exports TopK codes only)"
        )
    if cfg.lens is not None:
        raise MlsaeError(
            f"the SAE was trained in tuned-lens space ({cfg.lens}): SAELens has no lens, so it "
            "would encode raw activations the SAE never saw"
        )
    if cfg.normalize == "standardize" and not approximate:
        raise standardize_error("the SAE")
    mlsae_meta = {**cfg.to_dict(), "layer": layer, "mlsae_version": _mlsae_version()}
    if cfg.center_layers:  # block `layer`'s mean folded into b_dec: exact at that block only
        mlsae_meta.update(center_layers=False, layers=[layer])
    if cfg.normalize == "standardize":
        mlsae_meta["note"] = APPROX_NOTE
    return {
        "architecture": "topk",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": _NORM_TO_SL[cfg.normalize],
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": hf_model_name(cfg.model),
            "model_class_name": "AutoModelForCausalLM",
            "hook_name": hook,
            "hf_hook_name": hook,
            "hook_head_index": None,
            "context_size": context.get("context_size"),
            "dataset_path": None if cfg.dataset == "default" else cfg.dataset,
            # contexts start with BOS (and position 0 is left out) when sinks were excluded
            "prepend_bos": bool(cfg.exclude_sink),
            "exclude_special_tokens": True,
            "neuronpedia_id": None,
            "mlsae": mlsae_meta,
        },
    }


def write_saelens_folder(path: Path, sae: SparseAutoencoder, cfg_json: dict[str, Any]) -> Path:
    """cfg.json + sae_weights.safetensors, atomically."""
    with atomic_dir(path) as tmp:
        _write_saelens_files(tmp, sae, cfg_json)
    return path


def _write_saelens_files(folder: Path, sae: SparseAutoencoder, cfg_json: dict[str, Any]) -> None:
    layer = int(cfg_json["metadata"]["mlsae"]["layer"])  # a centred SAE: its block's b_dec
    write_safetensors(folder / SL_WEIGHTS, sae.block_state_tensors(layer))
    write_json(folder / SL_CFG, cfg_json)


def _check_hook_folder(dest: Path, run: Path) -> None:
    """MlsaeError unless the hook folder `dest` may be replaced: new, empty or a SAELens folder,
    and apart from the SAE being exported."""
    check_output(dest, "saelens", inputs=[run], apart=True)
    if dest.is_dir() and any(dest.iterdir()) and folder_kind(dest) != "saelens":
        raise MlsaeError(
            f"--out: {dest} exists and is not a SAELens folder: it would be "
            "replaced; choose a new --out (it is left untouched)"
        )


def export_saelens(
    run: str | Path, out: str | Path, hook_format: str | None = None, approximate: bool = False
) -> list[Path]:
    """`mlsae export RUN --format saelens --out DIR`: one SAELens folder per (SAE, block).

    An MLSAE gives the same dictionary at every block's hook, DIR/<hook>/ each; a single-layer
    SAE or a per-layer set gives DIR/<hook>/ per SAE; SAEs whose layers overlap (a sweep) go to
    DIR/<sae folder>/<hook>/. Every folder is written in a staging folder inside DIR first, then
    each is renamed into place (a full disk leaves DIR as it was). Returns the folders written."""
    run, out = Path(run), Path(out)
    check_output(out, "export", inputs=[run], apart=True)
    saes = run_saes(run)
    loaded = [(name, d, load_sae(d)) for name, d in saes]
    layers_seen: list[int] = [x for _, _, s in loaded for x in s.cfg.layers]
    nested = len(layers_seen) != len(set(layers_seen))
    names_by_model: dict[str, list[str]] = {}
    plan: list[tuple[Path, SparseAutoencoder, dict[str, Any]]] = []
    for name, d, sae in loaded:
        if not sae.cfg.layers:
            raise MlsaeError(f"{d}: the SAE's cfg.json lists no layers")
        model = sae.cfg.model
        if model not in names_by_model:
            names_by_model[model] = block_hook_names(model, hook_format)
        hooks = names_by_model[model]
        context = run_context(d)
        base = confined(out, name, "the SAE folder name") if nested and name else out
        for layer in sae.cfg.layers:
            if not 0 <= layer < len(hooks):
                raise MlsaeError(f"layer {layer} is not a block of {model!r} ({len(hooks)} blocks)")
            dest = confined(base, hooks[layer], "--hook-format gives the folder")
            _check_hook_folder(dest, d)
            plan.append((dest, sae, saelens_config(sae, hooks[layer], layer, context, approximate)))
    _write_planned(out, plan)
    if any(s.cfg.normalize == "standardize" for _, _, s in loaded):
        log.warning(APPROX_NOTE)
    log.info(f"wrote {len(plan)} SAELens folder(s) under {out}")
    return [dest for dest, _, _ in plan]


def _write_planned(out: Path, plan: list[tuple[Path, SparseAutoencoder, dict[str, Any]]]) -> None:
    """Write every planned folder into a staging folder in `out`, then rename each into place."""
    dests = [d.resolve() for d, _, _ in plan]
    if len(set(dests)) != len(dests):
        raise MlsaeError("--hook-format gives two SAEs the same folder: include '{layer}' once")
    need = sum(
        sum(t.numel() * t.element_size() for t in s.state_tensors().values()) for _, s, _ in plan
    )
    check_output(out, "export", need_bytes=need)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".mlsae-export.", dir=out))
    try:
        for i, (_, sae, cfg_json) in enumerate(plan):
            (stage / str(i)).mkdir()
            _write_saelens_files(stage / str(i), sae, cfg_json)
        for i, (dest, _, _) in enumerate(plan):
            dest.parent.mkdir(parents=True, exist_ok=True)
            replace_dir(stage / str(i), dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------- import


def _is_v6(raw: dict[str, Any]) -> bool:
    ver = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    try:
        return bool(ver) and int(str(ver).split(".")[0]) >= 6
    except ValueError:
        return False


def _flat_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 (flat) or 6.x config as one flat dict of the keys the reader needs."""
    if _is_v6(raw):
        return {**(raw.get("metadata") or {}), **{k: v for k, v in raw.items() if k != "metadata"}}
    c = dict(raw)
    c.setdefault("hook_name", c.get("hook_point"))
    act = c.get("activation_fn") or c.get("activation_fn_str")
    if act == "topk" and (c.get("activation_fn_kwargs") or {}).get("k") is not None:
        c["architecture"], c["k"] = "topk", c["activation_fn_kwargs"]["k"]
    c.setdefault("architecture", "standard")
    c.setdefault("apply_b_dec_to_input", True)
    norm = c.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        c["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return c


def read_saelens(
    folder: Path, model: str | None = None, layers: list[int] | None = None
) -> tuple[SaeConfig, dict[str, Tensor]]:
    """A SAELens TopK folder as an mlsae config + weights (exact: apply_b_dec_to_input=False
    and rescale_acts_by_decoder_norm are folded into b_enc / W_enc / W_dec)."""
    raw = read_json_object(folder / SL_CFG, "SAELens config")
    c = _flat_config(raw)
    arch = c.get("architecture")
    if arch != "topk":
        raise MlsaeError(f"{folder}: a SAELens {arch!r} SAE; only TopK SAEs can be imported")
    norm = c.get("normalize_activations")
    if norm == "expected_average_only_in":
        log.info(f"{folder}: expected_average_only_in is the identity in a loaded SAELens SAE")
        norm = "none"
    if norm not in ("none", "layer_norm"):
        raise MlsaeError(
            f"{folder}: normalize_activations={norm!r} has no mlsae counterpart (none, layer_norm)"
        )
    if c.get("reshape_activations", "none") != "none" or c.get("hook_head_index") is not None:
        raise MlsaeError(f"{folder}: an attention-head (hook_z) SAE, not a residual-stream one")
    try:
        w = load_file(str(folder / SL_WEIGHTS))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise MlsaeError(f"{folder / SL_WEIGHTS}: unreadable weights ({e})") from None
    sf = w.pop("scaling_factor", w.pop("finetuning_scaling_factor", None))
    if sf is not None and not torch.allclose(sf, torch.ones_like(sf)):
        raise MlsaeError(f"{folder}: a finetuning scaling factor is not supported")
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(w)
    if missing:
        raise MlsaeError(f"{folder / SL_WEIGHTS}: no {sorted(missing)} (found {sorted(w)})")
    t = {k: w[k].double() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if c.get("rescale_acts_by_decoder_norm"):  # pre *= |W_dec_j|, decode with z_j / |W_dec_j|
        n = t["W_dec"].norm(dim=1)  # [d_sae]
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    if not c.get("apply_b_dec_to_input", True):  # (u - b_dec) W + (b_enc + b_dec W) = u W + b_enc
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    mine_raw = c.get("mlsae")
    mine: dict[str, Any] = mine_raw if isinstance(mine_raw, dict) else {}
    d_in, d_sae = int(t["W_enc"].shape[0]), int(t["W_enc"].shape[1])
    if d_sae % d_in:
        raise MlsaeError(f"{folder}: d_sae = {d_sae} is not a multiple of d_in = {d_in}")
    normalize = norm
    if mine.get("normalize") == "standardize" and norm == "layer_norm":
        normalize = "standardize"  # our own approximate export: restore the original SAE
    hook_layer = layer_of_hook(str(c.get("hf_hook_name") or c.get("hook_name") or ""))
    cfg = SaeConfig(
        d_in=d_in,
        expansion_factor=d_sae // d_in,
        k=strict_int(c.get("k") or 0, f"{folder / SL_CFG}: k"),
        normalize=normalize,
        layers=layers
        or strict_layers(mine.get("layers"), f"{folder / SL_CFG}: mlsae.layers")
        or ([hook_layer] if hook_layer is not None else []),
        model=model or mine.get("model") or c.get("model_name") or "",
        dataset=mine.get("dataset") or c.get("dataset_path") or "",
    )
    return cfg, {k: v.float().contiguous() for k, v in t.items()}
