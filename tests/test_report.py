"""Figures, the self-contained report.html (incl. a headless Chromium screenshot), and the
`mlsae analyze` command end to end against a brute-force computation."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae.analysis.geometry import residual_geometry
from mlsae.analysis.layers import LayerStats
from mlsae.analysis.summary import (
    AnalysisSummary,
    CompareSummary,
    DataInfo,
    PromptSummary,
    read_analysis,
)
from mlsae.core.config import DataConfig, ModelConfig, SaeConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.eval.result import EvalResult
from mlsae.report.figures import make_figures
from mlsae.report.html import reading, write_report
from mlsae.report.tables import eval_table

CHROMIUM = Path("/usr/bin/chromium")
LAYERS = [0, 1, 2, 3, 4, 5]


def synthetic(seed=0, n=200, n_lat=64, d=8):
    """Layer stats (latents with a preferred layer, some spread) and geometry of random data."""
    g = torch.Generator().manual_seed(seed)
    L = len(LAYERS)
    pref = torch.randint(0, L, (n_lat,), generator=g)
    dist = (torch.arange(L)[:, None] - pref[None, :]).abs()  # [L, n_lat]
    p = torch.exp(-dist.double())
    a = torch.rand(n, L, n_lat, generator=g, dtype=torch.float64) * (
        torch.rand(n, L, n_lat, generator=g, dtype=torch.float64) < 0.3 * p
    )
    a[:, :, -3:] = 0  # dead latents
    st = LayerStats(n_lat, LAYERS)
    st.update_dense(a)
    x = torch.randn(n, L, d, generator=g).cumsum(1) * (1 + torch.arange(L)).view(1, L, 1)
    geo = residual_geometry(lambda: [(x, None)], LAYERS, d)
    return st.result(), geo


EVAL = {
    "layers": LAYERS,
    "per_layer": {"fvu": [0.1, 0.2, 0.3, 0.25, 0.2, 0.15], "delta_ce": [0.5] * 6},
    "mean": {"fvu": 0.2, "delta_ce": 0.5},
}


def _summary(stats, geo=None, **kw) -> AnalysisSummary:
    s = AnalysisSummary.of(stats, **kw)
    if geo is not None:
        s.set_geometry(geo)
    return s


def make_report(tmp: Path, with_eval: bool = True) -> tuple[Path, list]:
    stats, geo = synthetic()
    pstats, _ = synthetic(seed=1, n=12)
    figs = make_figures(tmp, stats, geo, [("a prompt", pstats)], [("sae_layer3", pstats)])
    ev = (tmp / "eval.json", EvalResult.from_json(EVAL)) if with_eval else None
    s = _summary(
        stats,
        geo,
        run=str(tmp / "run"),
        sae=str(tmp / "run" / "sae"),
        data=DataInfo(model="tiny", split="test"),
        prompts=[PromptSummary.of(pstats, text="a prompt <b>")],
        compare=[
            CompareSummary.of(
                pstats,
                sae="sae_layer3",
                sae_cfg=SaeConfig(d_in=8, expansion_factor=2, k=4, layers=[3]),
            )
        ],
        eval_mean=ev[1].mean if ev else None,
    )
    json.dumps(s.to_json(), allow_nan=False)  # NaNs were cleaned
    cfgs = {"cfg.json": {"d_in": 8, "k": 4, "layers": LAYERS}, "train_cfg.json": {"lr": 1e-4}}
    return write_report(tmp / "report.html", s, figs, cfgs, ev), figs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return make_report(tmp_path_factory.mktemp("report"))


def test_report_is_self_contained_with_every_figure(report):
    path, figs = report
    text = path.read_text()
    names = {p.name for _, p in figs}
    assert {
        "heatmap_aggregate.png",
        "heatmap_prompt_1.png",
        "expected_layer.png",
        "layer_var.png",
        "heatmap_compare.png",
        "cosine.png",
        "norms.png",
    } <= names
    assert not re.search(r"https?:", text, re.I) and "href" not in text.lower()
    assert "<script" not in text.lower() and "<link" not in text.lower()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == len(figs)
    for src, (_, p) in zip(srcs, figs, strict=True):  # each figure embedded, byte for byte
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == p.read_bytes()
    assert "a prompt &lt;b&gt;" in text  # escaped
    assert "delta_ce" in text and "0.25" in text  # evaluation table
    assert "rel_var_token" in text and "train_cfg.json" in text


def test_eval_table_rows_and_mean():
    html = eval_table(EvalResult.from_json(EVAL))
    assert "<td>3</td>" in html and "0.25" in html and "<td>mean</td>" in html


def test_reading_against_paper():
    stats, _ = synthetic()
    s = _summary(stats)
    s.n_tokens, s.n_latents, s.n_latents_alive, s.n_latents_dead = 10, 5, 4, 1
    s.layers, s.rel_var_latent, s.rel_var_token, s.token_variance_factor = [0, 1, 2], 0.8, 0.02, 50
    s.multi_layer_fraction_aggregate, s.multi_layer_fraction_token = 0.9, 0.1
    s.norm_mean, s.adjacent_cosine = [1.0, 2.0, 4.0], [0.5, 0.7]
    text = " ".join(reading(s))
    assert "50.0x smaller" in text and "in the range the paper reports" in text
    assert "norms grow with depth" in text and "0.500 to 0.700" in text
    assert "as in the paper: multi-layer in aggregate" in text
    s.token_variance_factor, s.rel_var_token, s.norm_mean = 2.0, 0.5, [3.0, 2.0, 1.0]
    s.multi_layer_fraction_token = 0.6
    text = " ".join(reading(s))
    assert "less than" in text and "do not grow" in text and "unlike the paper, most" in text


def _viridis_dark_pixels(png: Path) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]  # float [H, W, 3] in 0..1
    dark = np.array([68, 1, 84]) / 255  # viridis(0): the heatmaps' background
    return int((np.abs(img - dark).max(-1) < 0.06).sum())


def _screenshot(html: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory() as prof:
        cmd = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={prof}",
            f"--screenshot={png}",
            "--window-size=1200,2400",
            "--hide-scrollbars",
            html.resolve().as_uri(),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),  # CI installs it: never skip there
    reason="chromium is not installed",
)
def test_chromium_screenshot_shows_figures(report, tmp_path):
    path, _ = report
    shot = tmp_path / "shot.png"
    _screenshot(path, shot)
    assert _viridis_dark_pixels(shot) > 2000  # the heatmaps are drawn
    # control: the same page without image data shows no heatmap pixels
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:[^"]*"', 'src=""', path.read_text()))
    _screenshot(blank, tmp_path / "blank.png")
    assert _viridis_dark_pixels(tmp_path / "blank.png") < 50
    keep = Path("/tmp/mlsae_report_shot.png")  # left for a human to look at
    shutil.copy(shot, keep)


# ---------------------------------------------------------------- `mlsae analyze` end to end

CTX = 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """A tiny GPT-NeoX model, a float32 test-split cache of all 3 layers, an MLSAE run (with an
    eval.json and train_cfg.json) and a single-layer SAE run."""
    from conftest import make_model, write_word_corpus

    from mlsae.activations.extract import build_cache
    from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SaeConfig, SourceConfig
    from mlsae.sae.autoencoder import SparseAutoencoder

    root = tmp_path_factory.mktemp("analyze")
    model = make_model("gpt_neox", len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_word_corpus(root / "docs.jsonl")
    mdir, data = str(root / "model"), str(root / "docs.jsonl")
    build_cache(
        root / "cache",
        Inputs(
            SourceConfig(tokens=6 * CTX, batch_size=4),
            DataConfig(dataset=data, split="test", context_length=CTX),
            ModelConfig(model=mdir),
        ),
        ExtractConfig(storage_dtype="float32", shard_tokens=2 * CTX),
    )
    for name, layers, seed in (("mlsae", [0, 1, 2], 0), ("l1", [1], 1)):
        cfg = SaeConfig(d_in=32, expansion_factor=2, k=4, layers=layers, model=mdir, dataset=data)
        SparseAutoencoder(cfg, seed=seed, compute_dtype=torch.float32).save(root / name / "sae")
    (root / "mlsae" / "eval.json").write_text(json.dumps(EVAL | {"layers": [0, 1, 2]}))
    (root / "mlsae" / "train_cfg.json").write_text(json.dumps({"lr": 1e-4, "seed": 0}))
    return root, model, mdir, data


def _dense_reference(root: Path, sae_dir: Path, layers: list[int]):
    """Dense a[t,l,j] of an SAE over the cache's used tokens, and the raw vectors."""
    from mlsae.activations.cache import ActivationCache
    from mlsae.sae.folders import load_sae

    sae = load_sae(sae_dir, compute_dtype=torch.float32)
    ac = ActivationCache(root / "cache")
    shards = [ac.load_shard(i) for i in range(ac.n_shards)]
    acts = torch.cat([s.activations for s in shards])[:, [ac.layers.index(x) for x in layers]]
    mask = torch.cat([s.mask for s in shards])
    assert 0 < int(mask.sum()) < mask.numel()  # special tokens present and excluded
    with torch.no_grad():
        enc = sae.encode(acts[mask].reshape(-1, 32).float())
        dense = sae.dense_acts(enc).reshape(int(mask.sum()), len(layers), -1).double()
    return dense, acts[mask].double()


def test_analyze_command_matches_brute_force(runs, tmp_path):
    from test_analysis import brute
    from typer.testing import CliRunner

    from mlsae.cli.app import app

    root, model, mdir, _ = runs
    out = tmp_path / "out"
    args = [
        "analyze",
        str(root / "mlsae"),
        "--cache",
        str(root / "cache"),
        "--out",
        str(out),
        "--prompt",
        "alpha beta river",
        "--compare",
        str(root / "l1"),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "analysis.json").read_text())
    # the typed summary reads analysis.json back and writes the same JSON (keys and values)
    assert json.loads(json.dumps(AnalysisSummary.from_json(s).to_json())) == s
    bad = {**s, "compare": [{**s["compare"][0], "rel_var_token": "0.5"}]}
    with pytest.raises(MlsaeError, match=r"compare\[0\]: rel_var_token: expected a number"):
        AnalysisSummary.from_json(bad)
    dense, x = _dense_reference(root, root / "mlsae" / "sae", [0, 1, 2])
    ones = torch.ones(dense.shape[0], dtype=torch.bool)
    b = brute(dense, ones, [0, 1, 2])
    assert s["n_tokens"] == dense.shape[0] and s["layers"] == [0, 1, 2]
    assert s["n_latents_alive"] == len(b["alive"])
    for key, want in [
        ("rel_var_latent", b["rel_var_latent"]),
        ("rel_var_token", b["rel_var_token"]),
        ("multi_layer_fraction_aggregate", b["agg"]),
        ("multi_layer_fraction_token", b["tok"]),
    ]:
        assert s[key] == pytest.approx(want, rel=1e-6, abs=1e-6), key
    xc = x - x.mean(0)
    cos = torch.nn.functional.cosine_similarity(xc[:, :-1], xc[:, 1:], dim=-1).mean(0)
    np.testing.assert_allclose(s["adjacent_cosine"], cos.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s["norm_mean"], x.norm(dim=-1).mean(0).numpy(), rtol=1e-6, atol=1e-6)
    # the single-layer SAE is applied to every layer of the same tokens
    dl1, _ = _dense_reference(root, root / "l1" / "sae", [0, 1, 2])
    b1 = brute(dl1, ones, [0, 1, 2])
    assert s["compare"][0]["rel_var_token"] == pytest.approx(
        b1["rel_var_token"], rel=1e-6, abs=1e-6
    )
    assert s["compare"][0]["rel_var_latent"] == pytest.approx(
        b1["rel_var_latent"], rel=1e-6, abs=1e-6
    )
    # the prompt: its own tokens through the model at every layer
    from mlsae.data.capture import capture
    from mlsae.sae.folders import load_sae

    sae = load_sae(root / "mlsae" / "sae", compute_dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mdir)
    body = tok("alpha beta river", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id, *body]])  # the sink at a BOS, as in the data
    xp = capture(model, ids, [0, 1, 2])[0].float()  # [T, 3, 32]
    with torch.no_grad():
        dp = sae.dense_acts(sae.encode(xp.reshape(-1, 32))).reshape(ids.shape[1], 3, -1).double()
    counted = torch.ones(ids.shape[1], dtype=torch.bool)
    counted[0] = False  # position 0 (BOS) is never counted
    bp = brute(dp[counted], torch.ones(int(counted.sum()), dtype=torch.bool), [0, 1, 2])
    assert s["prompts"][0]["n_tokens"] == ids.shape[1] - 1
    assert s["prompts"][0]["rel_var_token"] == pytest.approx(
        bp["rel_var_token"], rel=1e-5, abs=1e-6
    )
    # outputs: per-latent arrays, every figure, eval table and configs in the report
    z = np.load(out / "latents.npz")
    for j in b["alive"][:5]:
        assert z["expected_layer"][j] == pytest.approx(b["E"][j], rel=1e-6, abs=1e-6)
    text = (out / "report.html").read_text()
    assert text.count("data:image/png;base64,") == len(s["figures"]) == 7
    # the paper code's ratios beside ours (one partial batch: fewer than 2048 used tokens)
    from test_paper_variance import brute as paper_brute

    pb, pf = paper_brute(dense, ones, 2048), s["paper_formula"]
    assert pf["batch_tokens"] == 2048 and pf["n_batches"] == 1
    for key in ("rel_var_latent", "rel_var_token", "active_pair_fraction"):
        assert pf[key] == pytest.approx(pb[key], rel=1e-6, abs=1e-6), key
    assert "paper code: rel_var_token" in text and "The gap is the formula" in text
    assert "train_cfg.json" in text and "eval.json" in text and not re.search(r"https?:", text)
    assert not list(out.glob("*.tmp*"))


def test_single_layer_run_uses_every_cache_layer(runs, tmp_path):
    from mlsae.report.analyze import analyze_command

    root = runs[0]
    cache = Inputs.held_out(SourceConfig(cache=root / "cache"))
    res = analyze_command(root / "l1", tmp_path / "o", inputs=cache)
    s = res.summary
    assert s.layers == [0, 1, 2] and s.compare == [] and s.prompts == []
    assert read_analysis(tmp_path / "o") == s  # analysis.json reads back as the same object


def test_analyze_runs_the_model_without_a_cache(runs, tmp_path):
    from mlsae.report.analyze import analyze_command

    root, _, mdir, data = runs
    out = tmp_path / "o"
    live = Inputs(
        SourceConfig(tokens=2 * CTX),
        DataConfig(dataset=data, split="test", context_length=CTX),
        ModelConfig(model=mdir),
    )
    s = analyze_command(root / "mlsae", out, inputs=live).summary
    assert s.cache is None and 0 < s.n_tokens <= 2 * CTX
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_user_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    from mlsae.cli.app import main

    root = runs[0]
    for name in ("sae_R2_k4", "sae_R2_k8"):  # a sweep folder: the user must pick one
        shutil.copytree(root / "l1" / "sae", tmp_path / "sweep" / name)
    for argv, msg in [
        (["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist"),
        (
            [
                "analyze",
                str(tmp_path / "sweep"),
                "--cache",
                str(root / "cache"),
                "--out",
                str(tmp_path / "o"),
            ],
            "several SAEs",
        ),
        (
            [
                "analyze",
                str(root / "mlsae"),
                "--cache",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ],
            "has no manifest",
        ),
    ]:
        monkeypatch.setattr("sys.argv", ["mlsae", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_tables_and_frames_hold_the_numbers():
    pytest.importorskip("pandas")
    ev = EvalResult.from_json(EVAL)
    df = ev.to_pandas()
    assert df.index.tolist() == LAYERS and df["fvu"].tolist() == EVAL["per_layer"]["fvu"]
    stats, _ = synthetic()
    pstats, _ = synthetic(seed=1, n=12)
    s = _summary(stats, prompts=[PromptSummary.of_prompt("p", pstats)])
    frame = s.to_pandas()
    assert frame.loc["rel_var_token", "this SAE"] == pytest.approx(stats.rel_var_token)
    assert frame.loc["n_tokens", "prompt 1"] == pstats.n_tokens
    row = next(r for r in s.table().splitlines() if r.startswith("rel_var_latent "))
    assert row.split()[1:] == [f"{stats.rel_var_latent:.4g}", f"{pstats.rel_var_latent:.4g}"]


def test_analysis_table_prints_the_intervals():
    """The text table of `analyze` shows each headline interval it has, and only those."""
    from mlsae.analysis.contexts import AnalysisIntervals
    from mlsae.core.bootstrap import BootstrapInfo, Interval

    stats, _ = synthetic()
    s = _summary(stats)
    assert "95% CI" not in s.table()
    s.intervals = AnalysisIntervals(BootstrapInfo(16, 100, 0), rel_var_latent=Interval(0.25, 0.5))
    lines = s.table().splitlines()
    row = next(r for r in lines if r.startswith("95% CI: rel_var_latent "))
    assert row.split()[3:] == ["[0.25,", "0.5]"]
    assert not any(r.startswith("95% CI: rel_var_token") for r in lines)
    assert any(r.startswith("bootstrap contexts") and r.split()[-1] == "16" for r in lines)
