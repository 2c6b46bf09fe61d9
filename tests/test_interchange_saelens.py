"""SAELens export checked by SAELens itself (sae-lens from the test extra): its loader reads every
exported folder, its own HF hook at metadata.hook_name yields our block outputs, and its
encode/decode equal ours (and a plain-torch reference of SPEC 2) on real activations of tiny
models. Round trips ours -> SAELens -> ours are the identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mlsae.cli.app import app
from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.data.capture import capture
from mlsae.interchange.convert import import_command
from mlsae.interchange.saelens import export_saelens
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import load_sae

EPS = 1e-5
HOOK_PREFIX = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}


def make_sae(path: Path, layers: list[int], normalize: str, model: str, seed: int = 0) -> Path:
    """A random SAE with non-zero biases, saved as an mlsae SAE folder."""
    cfg = SaeConfig(
        d_in=32,
        expansion_factor=4,
        k=6,
        layers=layers,
        model=model,
        dataset="words.jsonl",
        normalize=normalize,
    )  # type: ignore[arg-type]
    sae = SparseAutoencoder(cfg, seed=seed, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(cfg.d_sae, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(cfg.d_in, generator=g))
    sae.save(path)
    return path


def reference(x: torch.Tensor, w: dict[str, torch.Tensor], k: int, normalize: str):
    """SPEC 2 in float64 from the definition: (dense z [N, m], u_hat [N, d], mean, std)."""
    x = x.double()
    if normalize == "none":
        mean, std = torch.zeros(len(x), 1, dtype=x.dtype), torch.ones(len(x), 1, dtype=x.dtype)
        u = x
    else:
        mean = x.mean(1, keepdim=True)
        std = ((x - mean).pow(2).sum(1, keepdim=True) / (x.shape[1] - 1)).sqrt()  # Bessel
        u = (x - mean) / (std + EPS)
    pre = (u - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
    u_hat = z @ w["W_dec"].double() + w["b_dec"].double()
    return z, u_hat, mean, std


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    from conftest import make_model

    root = tmp_path_factory.mktemp("sl_models")
    out = {}
    for arch in ("llama", "gpt_neox", "gpt2"):
        m = make_model(arch, len(tokenizer))
        m.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        out[arch] = (root / arch, m)
    return out


def saelens_acts(model_dir: Path, hook: str, ids: torch.Tensor) -> torch.Tensor:
    """Activations at `hook` as SAELens's HF wrapper (HookedProxyLM) records them: [B, T, d]."""
    from sae_lens.load_model import load_model

    lm = load_model("AutoModelForCausalLM", str(model_dir), device="cpu", hook_names=[hook])
    with torch.no_grad():
        _, cache = lm.run_with_cache(ids, names_filter=[hook])
    return cache[hook]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_hook_names_address_our_block_outputs(models, arch, tmp_path):
    mdir, model = models[arch]
    make_sae(tmp_path / "sae", [0, 1, 2], "none", str(mdir))
    folders = export_saelens(tmp_path / "sae", tmp_path / "out")
    hooks = [f.name for f in folders]
    assert hooks == [f"{HOOK_PREFIX[arch]}.{i}" for i in range(3)]
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = capture(model, ids, [0, 1, 2])  # [B, T, L, d]
    for i, hook in enumerate(hooks):
        cfg = json.loads((tmp_path / "out" / hook / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == hook
        theirs = saelens_acts(mdir, hook, ids)
        torch.testing.assert_close(theirs, ours[:, :, i], rtol=0, atol=1e-6)


CASES = [("mlsae", [0, 1, 2]), ("single", [1])]


@pytest.mark.parametrize("normalize", ["none", "layer_norm", "standardize"])
@pytest.mark.parametrize("kind,layers", CASES)
def test_saelens_loads_and_matches(models, tmp_path, kind, layers, normalize):
    from sae_lens import SAE, TopKSAE

    mdir, model = models["llama"]
    make_sae(tmp_path / "sae", layers, normalize, str(mdir), seed=len(layers))
    ours = load_sae(tmp_path / "sae", compute_dtype=torch.float32)
    w = ours.state_tensors()
    folders = export_saelens(tmp_path / "sae", tmp_path / "out", approximate=True)
    assert [f.name for f in folders] == [f"model.layers.{i}" for i in layers]
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(2))
    acts = capture(model, ids, layers)  # [B, T, L, d]
    worst = {"encode": 0.0, "decode": 0.0}
    for i, folder in enumerate(folders):
        cfg = json.loads((folder / "cfg.json").read_text())
        meta = cfg["metadata"]
        assert cfg["architecture"] == "topk" and cfg["k"] == 6 and cfg["d_sae"] == 128
        assert meta["model_class_name"] == "AutoModelForCausalLM"
        assert meta["prepend_bos"] is False and meta["exclude_special_tokens"] is True
        sl = SAE.load_from_disk(folder)
        assert isinstance(sl, TopKSAE) and sl.cfg.metadata.hook_name == folder.name
        # read as a 6.x config: the defaulting leaves it as written, metadata extras survive
        from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

        assert handle_config_defaulting(dict(cfg)) == cfg
        assert sl.cfg.metadata.mlsae["layers"] == layers
        x = acts[:, :, i].reshape(-1, 32)
        with torch.no_grad():
            z_sl = sl.encode(x)
            x_sl = sl.decode(z_sl)
            enc = ours.encode(x)
            z, x_hat = ours.dense_acts(enc), ours.decode(enc)
        z_ref, u_hat, mean, std = reference(x, w, 6, normalize)
        torch.testing.assert_close(z_sl.double(), z_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(z.double(), z_ref, rtol=0, atol=1e-5)
        worst["encode"] = max(worst["encode"], float((z_sl - z).abs().max()))
        worst["decode"] = max(worst["decode"], float((x_sl - x_hat).abs().max()))
        # SAELens maps back with std (layer_norm) or not at all; ours as SPEC 2 says
        scale_sl = std if normalize != "none" else 1.0
        torch.testing.assert_close(x_sl.double(), u_hat * scale_sl + mean, rtol=0, atol=1e-5)
        scale = std + EPS if normalize == "standardize" else scale_sl
        torch.testing.assert_close(x_hat.double(), u_hat * scale + mean, rtol=0, atol=1e-5)
        if normalize == "standardize":  # the documented approximation: exactly 1e-5 * u_hat
            torch.testing.assert_close((x_hat - x_sl).double(), EPS * u_hat, rtol=0, atol=2e-6)
            assert "approximate" in meta["mlsae"]["note"]
    print(
        f"\n{kind} {normalize}: max |SAELens - mlsae| encode {worst['encode']:.2e} "
        f"decode {worst['decode']:.2e}"
    )
    if normalize != "standardize":
        assert worst["decode"] <= 1e-5


@pytest.mark.parametrize("normalize", ["none", "standardize"])
@pytest.mark.parametrize("kind,layers", CASES)
def test_round_trip_is_identity(models, tmp_path, kind, layers, normalize):
    mdir, _ = models["gpt_neox"]
    make_sae(tmp_path / "sae", layers, normalize, str(mdir), seed=3)
    before = load_sae(tmp_path / "sae")
    export_saelens(tmp_path / "sae", tmp_path / "sl", approximate=True)
    (back,) = import_command(tmp_path / "sl", "saelens", tmp_path / "back")
    after = load_sae(back)
    assert after.cfg == before.cfg  # layers, normalize, model, dataset restored
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(
            before.state_tensors().values(), after.state_tensors().values(), strict=True
        )
    )
    print(f"\nround trip {kind} {normalize}: max abs weight difference {diff}")
    assert diff == 0.0


def test_per_layer_set_exports_and_imports_as_a_set(models, tmp_path):
    mdir, _ = models["llama"]
    for layer in (0, 2):
        make_sae(tmp_path / "run" / f"layer_{layer:02d}", [layer], "none", str(mdir), seed=layer)
    folders = export_saelens(tmp_path / "run", tmp_path / "sl")
    assert [f.name for f in folders] == ["model.layers.0", "model.layers.2"]
    import_command(tmp_path / "sl", "saelens", tmp_path / "back")
    listing = json.loads((tmp_path / "back" / "per_layer.json").read_text())
    assert listing["layers"] == [0, 2]
    for layer in (0, 2):
        a = load_sae(tmp_path / "run" / f"layer_{layer:02d}").state_tensors()
        b = load_sae(tmp_path / "back" / f"layer_{layer:02d}").state_tensors()
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_foreign_saelens_conventions_fold_exactly(tmp_path):
    """apply_b_dec_to_input=False and rescale_acts_by_decoder_norm, as SAELens computes them."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    for apply_b, rescale in ((False, False), (True, True), (False, True)):
        cfg = TopKSAEConfig(
            d_in=32,
            d_sae=128,
            k=5,
            apply_b_dec_to_input=apply_b,
            rescale_acts_by_decoder_norm=rescale,
        )
        cfg.metadata.hook_name = "model.layers.4"
        sl = TopKSAE(cfg)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in sl.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        folder = tmp_path / f"sl_{apply_b}_{rescale}"
        sl.save_model(folder)
        (out,) = import_command(
            folder, "saelens", tmp_path / f"ours_{apply_b}_{rescale}", model="m"
        )
        ours = load_sae(out, compute_dtype=torch.float32)
        assert ours.cfg.layers == [4] and ours.cfg.model == "m"
        x = torch.randn(200, 32, generator=g) * 2
        with torch.no_grad():
            z_sl = sl.encode(x)
            enc = ours.encode(x)
            torch.testing.assert_close(ours.dense_acts(enc), z_sl, rtol=0, atol=1e-5)
            torch.testing.assert_close(ours.decode(enc), sl.decode(z_sl), rtol=0, atol=1e-5)


def test_standardize_needs_approximate_and_errors_are_one_line(models, tmp_path):
    mdir, _ = models["llama"]
    make_sae(tmp_path / "sae", [0, 1], "standardize", str(mdir))
    with pytest.raises(MlsaeError, match="--approximate"):
        export_saelens(tmp_path / "sae", tmp_path / "out")
    res = CliRunner().invoke(
        app, ["export", str(tmp_path / "sae"), "--format", "saelens", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code != 0 and isinstance(res.exception, MlsaeError)
    assert "\n" not in str(res.exception) and not (tmp_path / "o").exists()
    res = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "sae"),
            "--format",
            "saelens",
            "--out",
            str(tmp_path / "o"),
            "--approximate",
            "--hook-format",
            "blocks.{layer}.hook_resid_post",
        ],
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    cfg = SaeConfig(d_in=32, expansion_factor=2, k=4, layers=[0], model=str(mdir), lens="/x")
    SparseAutoencoder(cfg).save(tmp_path / "lens_sae")
    with pytest.raises(MlsaeError, match="tuned-lens"):
        export_saelens(tmp_path / "lens_sae", tmp_path / "o2")


def test_layer_of_hook_reads_block_outputs_only():
    from mlsae.interchange.meta import layer_of_hook

    cases = {
        "model.layers.3": 3,
        "gpt_neox.layers.12": 12,
        "transformer.h.0": 0,
        "layers.7": 7,
        "blocks.3.hook_resid_post": 3,
        "blocks.3.hook_resid_pre": 2,
        "blocks.0.hook_resid_pre": None,
        "blocks.3.hook_mlp_out": None,
        "model.layers.3.mlp": None,
        "blocks.2.attn.hook_z": None,
        "embed": None,
    }
    assert {name: layer_of_hook(name) for name in cases} == cases


def test_import_detects_the_format(models, tmp_path):
    mdir, _ = models["llama"]
    make_sae(tmp_path / "sae", [2], "layer_norm", str(mdir))
    export_saelens(tmp_path / "sae", tmp_path / "sl")
    res = CliRunner().invoke(app, ["import", str(tmp_path / "sl"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert load_sae(tmp_path / "b").cfg == load_sae(tmp_path / "sae").cfg
    with pytest.raises(MlsaeError, match="already an mlsae"):
        import_command(tmp_path / "sae", "auto", tmp_path / "c")
    with pytest.raises(MlsaeError, match="not empty"):
        import_command(tmp_path / "sl", "saelens", tmp_path / "b")
