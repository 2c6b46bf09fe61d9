"""Graph, communities, SAE Match and the `mlsae evolution` pipeline end to end (tiny data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae.activations.cache import CacheWriter
from mlsae.core.config import DataConfig, ModelConfig, SaeConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import BootstrapConfig, EvolutionConfig
from mlsae.evolution.graph import communities
from mlsae.evolution.match import MatchScores, match_permutation
from mlsae.report.evolution import write_figures
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.metrics import fvu

D, CTX = 16, 40


def make_sae(layer: int, seed: int) -> SparseAutoencoder:
    sae = SparseAutoencoder(
        SaeConfig(d_in=D, expansion_factor=3, k=4, layers=[layer]),
        seed=seed,
        compute_dtype=torch.float32,
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


def permuted_copy(sae: SparseAutoencoder, sigma: torch.Tensor, layer: int) -> SparseAutoencoder:
    """New feature j = old feature sigma[j]."""
    new = make_sae(layer, 99)
    with torch.no_grad():
        new.W_enc.copy_(sae.W_enc[:, sigma])
        new.b_enc.copy_(sae.b_enc[sigma])
        new.W_dec.copy_(sae.W_dec[sigma])
        new.b_dec.copy_(sae.b_dec)
    return new


def test_match_recovers_permutation_and_fvu():
    torch.manual_seed(0)
    a = make_sae(0, 1)
    sigma = torch.randperm(a.cfg.d_sae)
    b = permuted_copy(a, sigma, 1)
    perm = match_permutation(a.W_dec, b.W_dec)
    assert torch.equal(perm[sigma], torch.arange(a.cfg.d_sae))  # old sigma[j] -> new j
    x = torch.randn(300, D) * 2 + 1
    scores = MatchScores([(0, 1)], [perm], D, a.cfg.d_sae)
    with torch.no_grad():
        scores.update(0, b, a.encode(x), b.encode(x), x)
        own_a = float(fvu(x, a.decode(a.encode(x))))
    r = scores.result()[0]
    assert r["matched"] == pytest.approx(own_a, rel=1e-5, abs=1e-6)
    assert r["own"] == pytest.approx(own_a, rel=1e-5, abs=1e-6)
    assert r["matched_target_scale"] == pytest.approx(own_a, rel=1e-5, abs=1e-6)
    assert r["unpermuted"] > 2 * own_a  # without the permutation the code means nothing


def planted(seed: int = 0, k: int = 4, size: int = 12):
    """k dense groups (edge p=0.8, weight ~1) joined by a few weak edges."""
    rng = np.random.default_rng(seed)
    src, dst, w = [], [], []
    n = k * size
    for i in range(n):
        for j in range(i + 1, n):
            same = i // size == j // size
            if rng.random() < (0.8 if same else 0.02):
                src.append(i)
                dst.append(j)
                w.append(rng.uniform(0.7, 1.0) if same else 0.1)
    return n, np.array(src), np.array(dst), np.array(w)


@pytest.mark.parametrize("method", ["leiden", "louvain"])
def test_communities_deterministic_and_recover_groups(method):
    n, s, d, w = planted()
    a, used = communities(n, s, d, w, seed=3, method=method)
    b, _ = communities(n, s, d, w, seed=3, method=method)
    assert used == method
    assert np.array_equal(a, b)
    truth = np.arange(n) // 12
    for c in range(4):  # each planted group is exactly one community
        assert len(set(a[truth == c])) == 1
    assert len(set(a)) == 4


# ---------------------------------------------------------------- the pipeline on tiny data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer float32 cache (layer 1 = layer 0 exactly) and per-layer SAEs where layer 1's
    is a permuted copy of layer 0's."""
    root = tmp_path_factory.mktemp("evo")
    g = torch.Generator().manual_seed(0)
    n = 24 * CTX
    x0 = torch.randn(n, D, generator=g) * 2 + 0.5
    x2 = x0 @ torch.randn(D, D, generator=g) * 0.5 + torch.randn(n, D, generator=g)
    acts = torch.stack([x0, x0, x2], 1)  # [n, 3, d]
    ids = torch.randint(0, 256, (n,), generator=g)
    ids[::CTX] = 256  # a special token opening each context
    mask = ids != 256
    w = CacheWriter(
        root / "cache",
        {"layers": [0, 1, 2], "d_model": D, "context_length": CTX, "model": None},
        shard_tokens=7 * CTX,
        storage_dtype="float32",
    )
    w.add(acts, ids, mask)
    w.close()
    a = make_sae(0, 1)
    sigma = torch.randperm(a.cfg.d_sae, generator=g)
    a.save(root / "run" / "layer_00")
    permuted_copy(a, sigma, 1).save(root / "run" / "layer_01")
    make_sae(2, 2).save(root / "run" / "layer_02")
    return root, sigma, x0[mask], a


def _cache(root: Path) -> SourceConfig:
    return SourceConfig(cache=root / "cache")


def test_pipeline_outputs(tiny, tmp_path):
    from mlsae.evolution.run import evolution_command

    root, sigma, x0, a = tiny
    cfg = EvolutionConfig(top_m=2, min_support=1, memory_gb=0.001, max_nodes_html=60)
    boot = BootstrapConfig(bootstrap=50, bootstrap_seed=1)
    body = evolution_command(
        root / "run",
        tmp_path,
        inputs=Inputs.held_out(source=_cache(root)),
        cfg=cfg,
        figures=write_figures,
        boot=boot,
    )
    ev = json.loads((tmp_path / "evolution.json").read_text())
    low, high = (
        ev["findings"]["intervals"]["pass_through_mean"]["low"],
        ev["findings"]["intervals"]["pass_through_mean"]["high"],
    )
    assert low <= ev["findings"]["pass_through_mean"] <= high  # symmetric about the estimate
    for p in ev["pairs"]:
        iv = p["intervals"]["pass_through"]
        assert iv["low"] <= p["pass_through"] <= iv["high"]
    gj = json.loads((tmp_path / "graph.json").read_text())
    assert ev["layers"] == [0, 1, 2] and ev["n_used_tokens"] == len(x0)
    p01 = ev["pairs"][0]
    assert p01["pass_through"] == 1.0 and p01["disappear"] == 0.0  # identical feature sets
    m01 = ev["match"][0]
    with torch.no_grad():
        own0 = float(fvu(x0, a.decode(a.encode(x0))))
    assert m01["matched"] == pytest.approx(own0, rel=1e-4, abs=1e-6)
    assert m01["own"] == pytest.approx(own0, rel=1e-4, abs=1e-6)
    dead = sum(ev["dead"].values())
    assert len(gj["nodes"]["layer"]) == 3 * a.cfg.d_sae - dead
    assert len(gj["edges"]["source"]) == ev["graph"]["edges"] > 0
    assert set(gj["edges"]) >= {"pearson", "jaccard", "sufficiency", "necessity", "decoder_cos"}
    # every passed-through layer-0 feature's best partner is its permuted copy
    nodes = gj["nodes"]
    e = gj["edges"]
    for s, t, p in zip(e["source"], e["target"], e["pearson"], strict=True):
        if nodes["layer"][s] == 0 and p > 0.999:
            assert int(sigma[nodes["feature"][t]]) == nodes["feature"][s]
    for f in ev["figures"].values():
        assert (tmp_path / f).stat().st_size > 1000
    assert body.communities.n_communities >= 1
    from mlsae.report.evolution import evolution_section_html

    sec = evolution_section_html(tmp_path)
    assert "Many features pass through: holds" in sec and "data:image/png;base64" in sec
    mean = ev["findings"]["pass_through_mean"]
    assert f"{100 * mean:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%]" in sec  # with its interval
    assert "with the down layer&#x27;s tokens permuted (null model)" in sec
    assert not list(tmp_path.glob(".codes-*"))  # the code store is removed
    # `mlsae analyze --evolution DIR` puts this section and a relative graph link in report.html
    from mlsae.report.analyze import analyze_command

    rep = tmp_path / "analysis"
    analyze_command(
        root / "run" / "layer_00", rep, inputs=Inputs.held_out(_cache(root)), evolution=tmp_path
    )
    page = (rep / "report.html").read_text()
    assert '<section id="evolution">' in page and 'href="../graph.html"' in page


def test_second_pass_independent_of_chunking(tiny, tmp_path):
    from mlsae.activations.cache import ActivationCache
    from mlsae.evolution.codes import CodeStore, load_per_layer, source_chunks
    from mlsae.evolution.run import first_pass, second_pass

    root = tiny[0]
    saes = load_per_layer(root / "run")
    cfg = EvolutionConfig(top_m=2, min_support=1)
    store = CodeStore(tmp_path, len(saes))
    chunks, _ = source_chunks(ActivationCache(root / "cache"), saes)
    match = MatchScores([(0, 1), (1, 2)], [torch.arange(48)] * 2, D, 48)
    stats = first_pass(chunks, saes, store, match, cfg, None)
    r1 = second_pass(saes, stats, store, cfg, chunk_rows=4096)
    r2 = second_pass(saes, stats, store, cfg, chunk_rows=13)
    for a, b in zip(r1, r2, strict=True):
        assert a.summary == b.summary
        for k in a.edges:
            torch.testing.assert_close(a.edges[k], b.edges[k], equal_nan=True)


def test_user_errors(tiny, tmp_path):
    from mlsae.evolution.run import evolution_command

    root = tiny[0]
    with pytest.raises(MlsaeError, match="at least two"):
        evolution_command(
            root / "run" / "layer_00", tmp_path, inputs=Inputs.held_out(source=_cache(root))
        )
    with pytest.raises(MlsaeError, match="memory-gb"):
        evolution_command(
            root / "run",
            tmp_path,
            inputs=Inputs.held_out(source=_cache(root)),
            cfg=EvolutionConfig(memory_gb=1e-6),
        )


def test_cli_evolution_one_line_error(tmp_path, monkeypatch, capsys):
    from mlsae import cli

    argv = ["mlsae", "evolution", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    monkeypatch.setattr("sys.argv", [*argv, "--cache", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "does not exist" in err
    monkeypatch.setattr("sys.argv", [*argv, "--top-m", "0"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "--edge-threshold" in capsys.readouterr().err


# ---------------------------------------------------------------- graph.html in Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(args: list[str], timeout: int = 90) -> subprocess.CompletedProcess:
    prof = tempfile.mkdtemp(prefix="mlsae-chromium-")
    try:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={prof}",
                "--virtual-time-budget=4000",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(prof, ignore_errors=True)


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),  # CI installs it: never skip there
    reason="chromium is not installed",
)
def test_graph_html_renders_and_click_shows_panel(tiny, tmp_path):
    from mlsae.evolution.run import evolution_command

    root = tiny[0]
    evolution_command(
        root / "run",
        tmp_path,
        inputs=Inputs.held_out(source=_cache(root)),
        cfg=EvolutionConfig(max_nodes_html=40),
    )
    page = (tmp_path / "graph.html").read_text()
    assert "cytoscape" in page and "http://" not in page.split("<script>")[0]
    assert "<script src" not in page  # self-contained
    nodes = json.loads(page.split('id="data">')[1].split("</script>")[0])["nodes"]
    assert 0 < len(nodes) <= 40
    target = nodes[len(nodes) // 2]["id"]
    url = (tmp_path / "graph.html").as_uri() + "#click=" + target
    dom = chromium(["--dump-dom", url]).stdout
    assert f'data-drawn="{len(nodes)}"' in dom  # nodes drawn by Cytoscape
    layer, feature = target[1:].split(":")
    assert f"layer {layer}, feature {feature}</h3>" in dom  # the click opened the panel
    assert "top activating contexts" in dom and "community" in dom
    shot = tmp_path / "shot.png"
    chromium([f"--screenshot={shot}", "--window-size=1200,800", url])
    assert shot.stat().st_size > 5000


def test_pipeline_from_model(tmp_path, tokenizer):
    """Without --cache: the model is run on a local text dataset, contexts are decoded."""
    from conftest import make_model

    from mlsae.evolution.run import evolution_command

    model = make_model("gpt2", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "d.txt").write_text("The cat sat on the mat. " * 40)
    for layer in (0, 1, 2):
        SparseAutoencoder(
            SaeConfig(d_in=32, expansion_factor=2, k=4, layers=[layer]), seed=layer
        ).save(tmp_path / "run" / f"layer_{layer:02d}")
    body = evolution_command(
        tmp_path / "run",
        tmp_path / "out",
        inputs=Inputs.held_out(
            source=SourceConfig(tokens=200, batch_size=3),
            data=DataConfig(dataset=str(tmp_path / "d.txt"), split="train", context_length=32),
            model=ModelConfig(model=str(tmp_path / "m")),
        ),
        cfg=EvolutionConfig(min_support=1),
    )
    assert body.data.n_tokens == 224  # 7 whole contexts
    assert 0 < body.n_used_tokens <= 224
    page = (tmp_path / "out" / "graph.html").read_text()
    assert '"tokens":["' in page and "cat" in page  # decoded with the tokenizer


def test_vendored_library_can_be_inlined():
    from importlib import resources

    assets = resources.files("mlsae") / "assets"
    lib = (assets / "cytoscape.min.js").read_text(encoding="utf-8")
    assert "</" not in lib and "<!--" not in lib  # safe inside an inline <script>
    assert (
        "MIT" in (assets / "cytoscape.LICENSE").read_text()
        or "Permission is hereby" in (assets / "cytoscape.LICENSE").read_text()
    )
