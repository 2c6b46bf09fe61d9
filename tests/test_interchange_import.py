"""Imports checked against the source tools and references: sparsify itself (eai-sparsify) saves
a SparseCoder and our forward equals its forward; checkpoints in the paper's layout (built with
huggingface_hub's PyTorchModelHubMixin from its documented weight names) reproduce a reference
forward written from the paper's equations and then evaluate unchanged; the hub folder loads
back, in SAELens too, and `mlsae.load_sae("org/name")` goes through huggingface_hub."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import mlsae
from mlsae.activations.extract import build_cache
from mlsae.cli.app import app
from mlsae.core.config import (
    DataConfig,
    ExtractConfig,
    ModelConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.data.capture import capture
from mlsae.eval.evaluate import evaluate_command
from mlsae.interchange.convert import import_command
from mlsae.interchange.hub import export_hub
from mlsae.sae.folders import load_sae
from mlsae.train.loop import train_command

CTX = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny GPT-NeoX (the paper's architecture), a word corpus and real activations."""
    from conftest import make_model, write_word_corpus

    root = tmp_path_factory.mktemp("imp")
    model = make_model("gpt_neox", len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_word_corpus(root / "docs.jsonl")
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(3))
    acts = capture(model, ids, [0, 1, 2]).reshape(-1, 3, 32)  # [N, L, d]
    return root, str(root / "model"), str(root / "docs.jsonl"), acts


# ----------------------------------------------------------------------------- sparsify


def _sparse_coder(seed: int):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sc = SparseCoder(32, SparseCoderConfig(expansion_factor=4, k=6))
    with torch.no_grad():
        sc.encoder.bias.normal_(0, 0.1)
        sc.b_dec.normal_(0, 0.3)
    return sc


def test_sparsify_import_matches_its_forward(setup, tmp_path):
    root, mdir, _, acts = setup
    coders = {layer: _sparse_coder(layer) for layer in (1, 2)}
    for layer, sc in coders.items():
        sc.save_to_disk(tmp_path / "sp" / f"layers.{layer}")  # sparsify's own writer
    (one,) = import_command(tmp_path / "sp" / "layers.1", "sparsify", tmp_path / "one", model=mdir)
    sae = load_sae(one, compute_dtype=torch.float32)
    assert sae.cfg.layers == [1] and sae.cfg.normalize == "none" and sae.cfg.model == mdir
    x = acts[:, 1]
    with torch.no_grad():
        theirs = coders[1](x)
        x_hat, enc = sae(x)
        dense_theirs = torch.zeros(len(x), 128).scatter(
            1, theirs.latent_indices, theirs.latent_acts
        )
    diff = float((x_hat - theirs.sae_out).abs().max())
    print(f"\nsparsify forward: max |mlsae - sparsify| {diff:.2e}")
    assert diff <= 1e-5
    torch.testing.assert_close(sae.dense_acts(enc), dense_theirs, rtol=0, atol=1e-5)
    # a sparsify run (one folder per hookpoint) becomes a per-layer set
    import_command(tmp_path / "sp", "sparsify", tmp_path / "set", model=mdir)
    assert json.loads((tmp_path / "set" / "per_layer.json").read_text())["layers"] == [1, 2]
    two = load_sae(tmp_path / "set" / "layer_02", compute_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            two(acts[:, 2])[0], coders[2](acts[:, 2]).sae_out, atol=1e-5, rtol=0
        )


# ----------------------------------------------------------------------------- the paper


class PaperMLSAE(nn.Module, PyTorchModelHubMixin):
    """The paper's MLSAE module's parameters and init arguments (tim-lawson/mlsae
    model/autoencoder.py), so save_pretrained writes the layout its hub repos have."""

    def __init__(
        self,
        n_inputs: int,
        n_latents: int,
        k: int,
        dead_steps_threshold: int,
        dead_threshold: float = 1e-3,
        auxk: int | None = 256,
        standardize: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)  # weight [m, d]
        self.decoder = nn.Linear(n_latents, n_inputs, bias=False)  # weight [d, m]
        self.pre_encoder_bias = nn.Parameter(torch.zeros(n_inputs))
        self.register_buffer("last_nonzero", torch.zeros(n_latents, dtype=torch.long))


def paper_forward(x, enc_w, dec_w, b_pre, k, standardize=True, eps=1e-5):
    """The paper's equations in float64: standardize (Bessel std, eps in the divisor only),
    latents = W_enc (u - b_pre), TopK then ReLU, x_hat = (W_dec z + b_pre) * std + mu."""
    x = x.double()
    if standardize:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        u = (x - mu) / (std + eps)
    else:
        u = x
    lat = (u - b_pre.double()) @ enc_w.double().T
    top = lat.topk(k, dim=-1)
    z = torch.zeros_like(lat).scatter(-1, top.indices, top.values.relu())
    rec = z @ dec_w.double().T + b_pre.double()
    return (rec * std + mu if standardize else rec), z


@pytest.mark.parametrize("standardize", [True, False])
def test_paper_checkpoint_reproduces_its_forward(setup, tmp_path, standardize):
    root, mdir, _, acts = setup
    torch.manual_seed(0)
    ref = PaperMLSAE(32, 128, 6, dead_steps_threshold=100, standardize=standardize)
    with torch.no_grad():
        ref.pre_encoder_bias.normal_(0, 0.3)
    src = tmp_path / "mlsae-pythia-70m-deduped-x4-k6"
    ref.save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["n_latents"] == 128
    (out,) = import_command(src, "mlsae-hub", tmp_path / "ours", model=mdir, layers=[0, 1, 2])
    sae = load_sae(out, compute_dtype=torch.float32)
    assert sae.cfg.normalize == ("layer_norm" if standardize else "none")
    assert sae.cfg.layers == [0, 1, 2] and sae.cfg.k == 6 and sae.cfg.d_sae == 128
    x = acts.reshape(-1, 32)
    with torch.no_grad():
        want, z = paper_forward(
            x, ref.encoder.weight, ref.decoder.weight, ref.pre_encoder_bias, 6, standardize
        )
    with torch.no_grad():
        x_hat, enc = sae(x)
    diff = float((x_hat.double() - want).abs().max())
    print(f"\npaper checkpoint (standardize={standardize}): max |mlsae - reference| {diff:.2e}")
    assert diff <= 1e-5
    torch.testing.assert_close(sae.dense_acts(enc).double(), z, rtol=0, atol=1e-5)
    # the name alone gives the model; without the model offline, the layers are asked for
    with pytest.raises(MlsaeError, match="--layers"):
        import_command(src, "mlsae-hub", tmp_path / "x")


def test_paper_transformer_checkpoint_and_evaluate(setup, tmp_path):
    """An MLSAETransformer (`sae-...-tfm-layers-1`) checkpoint names its model and layers."""
    root, mdir, data, acts = setup
    g = torch.Generator().manual_seed(4)
    w = {
        "autoencoder.encoder.weight": torch.randn(128, 32, generator=g) * 0.2,
        "autoencoder.decoder.weight": nn.functional.normalize(
            torch.randn(32, 128, generator=g), dim=0
        ),
        "autoencoder.pre_encoder_bias": torch.randn(32, generator=g) * 0.1,
        "transformer.model.gpt_neox.embed_in.weight": torch.zeros(4, 32),  # ignored
    }
    src = tmp_path / "sae-tiny-x4-k6-tfm-layers-1"
    src.mkdir()
    save_file(w, str(src / "model.safetensors"))
    cfg = {
        "model_name": mdir,
        "layers": [1],
        "expansion_factor": 4,
        "k": 6,
        "auxk": 256,
        "standardize": True,
        "skip_special_tokens": True,
        "max_length": CTX,
        "tuned_lens": False,
    }
    (src / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(
        app, ["import", str(src), "--format", "mlsae-hub", "--out", str(tmp_path / "ours")]
    )
    assert res.exit_code == 0, res.output
    sae = load_sae(tmp_path / "ours", compute_dtype=torch.float32)
    assert sae.cfg.model == mdir and sae.cfg.layers == [1]
    want, _ = paper_forward(
        acts[:, 1],
        w["autoencoder.encoder.weight"],
        w["autoencoder.decoder.weight"],
        w["autoencoder.pre_encoder_bias"],
        6,
    )
    with torch.no_grad():
        assert float((sae(acts[:, 1])[0].double() - want).abs().max()) <= 1e-5
    # evaluate reads the imported folder unchanged
    ev = evaluate_command(
        tmp_path / "ours",
        tmp_path / "eval.json",
        inputs=Inputs.held_out(
            source=SourceConfig(tokens=4 * CTX),
            data=DataConfig(dataset=data, split="test", context_length=CTX),
        ),
    )
    assert ev.layers == [1] and 0 < ev.per_layer.fvu[0] < 10
    assert ev.per_layer.delta_ce[0] is not None
    # a tuned-lens checkpoint cannot be represented: one clear line
    (src / "config.json").write_text(json.dumps({**cfg, "tuned_lens": True}))
    with pytest.raises(MlsaeError, match="tuned-lens"):
        import_command(src, "mlsae-hub", tmp_path / "lens")


# ----------------------------------------------------------------------------- the hub folder


@pytest.fixture(scope="module")
def trained_run(setup):
    root, mdir, data, _ = setup
    for split in ("train", "test"):
        build_cache(
            root / f"cache_{split}",
            Inputs(
                SourceConfig(tokens=6 * CTX, batch_size=4),
                DataConfig(dataset=data, split=split, context_length=CTX),
                ModelConfig(model=mdir),
            ),
            ExtractConfig(storage_dtype="float32", shard_tokens=2 * CTX),
        )
    run = train_command(
        root / "run",
        inputs=Inputs(source=SourceConfig(cache=root / "cache_train")),
        sae=SaeGridConfig(expansion_factor=[2], k=[4]),
        train=TrainConfig(batch_tokens=64, lr=2e-3, max_steps=4),
    )
    evaluate_command(
        run,
        run / "eval.json",
        inputs=Inputs.held_out(source=SourceConfig(cache=root / "cache_test")),
    )
    return run


def test_hub_folder_loads_back(trained_run, tmp_path, monkeypatch):
    from sae_lens import SAE

    run = trained_run
    ev = json.loads((run / "eval.json").read_text())
    out = export_hub(run, tmp_path / "hub", repo_id="me/tiny-mlsae", approximate=True)
    orig = load_sae(run / "sae").state_tensors()
    back = mlsae.load_sae(out).state_tensors()
    assert all(torch.equal(orig[n], back[n]) for n in orig)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlsae")
    assert 'mlsae.load_sae("me/tiny-mlsae")' in card and "SAE.load_from_disk" in card
    assert f"| **mean** | {ev['mean']['fvu']:.4f}" in card  # the eval table
    assert "| lr | 0.002 |" in card and f"Context length: {CTX} tokens" in card
    hooks = sorted(p.name for p in (out / "saelens").iterdir())
    assert hooks == ["gpt_neox.layers.0", "gpt_neox.layers.1", "gpt_neox.layers.2"]
    sl = SAE.load_from_disk(out / "saelens" / hooks[1])
    assert sl.cfg.metadata.context_size == CTX and sl.cfg.metadata.hook_name == hooks[1]
    assert json.loads((out / "eval.json").read_text()) == ev
    # mlsae.load_sae("org/name") fetches through huggingface_hub
    import huggingface_hub

    asked = []
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id, **kw: asked.append(repo_id) or str(out),
    )
    hub = mlsae.load_sae("me/tiny-mlsae").state_tensors()
    assert asked[0] == "me/tiny-mlsae" and all(torch.equal(orig[n], hub[n]) for n in orig)
    # without --approximate a standardize SAE gets no SAELens folder, and the card says why
    plain = export_hub(run, tmp_path / "hub2")
    assert not (plain / "saelens").exists()
    assert "No SAELens folder" in (plain / "README.md").read_text()


def test_hub_repo_offline_is_one_error_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MlsaeError, match="not a local folder"):
        mlsae.load_sae("nobody/no-such-sae")
    with pytest.raises(MlsaeError, match="no SAE folder"):
        mlsae.load_sae(tmp_path)
