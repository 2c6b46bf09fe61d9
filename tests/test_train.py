"""Training: dead counter in tokens, recovery of a known dictionary, exact resume after SIGKILL /
SIGTERM, sweep == separate runs, per-layer sets, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsae.activations.cache import ActivationCache, CacheWriter
from mlsae.core.config import (
    DataConfig,
    ModelConfig,
    SaeConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import Interrupted, MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.metrics import fvu
from mlsae.train.loop import train_command
from mlsae.train.member import Member, make_adam, update_dead_counter

LAYERS = [0, 2, 5]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cache(path: Path, n_tokens=2048, d=16, seed=0, masked_every=32, all_masked=False) -> Path:
    """A real activation cache of sparse combinations of a random dictionary, per layer."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(3, 40, d, generator=g)  # noqa: N806 - per-layer dictionaries
    meta = {
        "layers": LAYERS,
        "d_model": d,
        "model": "synthetic",
        "dataset": "synthetic",
        "split": "train",
        "context_length": 64,
    }
    w = CacheWriter(path, meta, shard_tokens=256, storage_dtype="float32")
    for _ in range(0, n_tokens, 128):
        z = torch.zeros(128, 3, 40).scatter_(
            2, torch.randint(0, 40, (128, 3, 3), generator=g), torch.rand(128, 3, 3, generator=g)
        )
        acts = torch.einsum("nlj,ljd->nld", z, D) + 0.01 * torch.randn(128, 3, d, generator=g)
        mask = (
            torch.zeros(128, dtype=torch.bool) if all_masked else torch.ones(128, dtype=torch.bool)
        )
        mask[::masked_every] = False
        w.add(acts, torch.randint(0, 100, (128,), generator=g), mask)
    w.close()
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "c")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae.safetensors"))


def _assert_same(a: Path, b: Path, atol=1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=f"{k} differs")


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_tokens=64, lr=2e-3, dead_tokens=200, checkpoint_every=5, max_steps=30)
    return TrainConfig(**{**base, **kw})


def _train(
    out,
    cache=None,
    *,
    r=(8,),
    k=(32,),
    layers=None,
    single_layer=None,
    per_layer=False,
    cfg=None,
    data=None,
    model=None,
    tokens=None,
    **train_kw,
):
    """train_command for a new run with the configs built from short keywords."""
    cfg = cfg or TrainConfig()
    cfg = TrainConfig(**{**cfg.__dict__, **train_kw}) if train_kw else cfg
    return train_command(
        out,
        inputs=Inputs(
            source=SourceConfig(cache=cache, layers=layers, tokens=tokens),
            data=data or DataConfig(),
            model=model or ModelConfig(),
        ),
        sae=SaeGridConfig(
            expansion_factor=list(r), k=list(k), single_layer=single_layer, per_layer=per_layer
        ),
        train=cfg,
    )


def _resume(out, **train_given):
    return train_command(out, resume=True, train_given=train_given)


# ----------------------------------------------------------------------------- dead counter


def test_update_dead_counter_counts_tokens_and_resets_fired():
    since = torch.tensor([5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    acts = torch.tensor([[1.0, 0.0], [2.0, 0.5]])  # latent 1 selected but not active
    idx = torch.tensor([[0, 1], [2, 0]])
    l0 = update_dead_counter(since, acts, idx, n_tokens=2.5)
    assert since.tolist() == [0.0, 7.5, 0.0, 7.5]
    assert l0 == 1.5


def test_dead_window_is_in_tokens_not_vectors():
    """An MLSAE over 3 layers: a batch of 30 vectors is 10 tokens of text."""
    torch.manual_seed(0)
    cfg = TrainConfig(dead_tokens=25, lr=1e-3)
    sae = SparseAutoencoder(SaeConfig(d_in=8, expansion_factor=8, k=1, layers=LAYERS), seed=0)
    m = Member(
        "s", sae, make_adam(sae.parameters(), cfg), None, torch.zeros(64, dtype=torch.float64)
    )
    assert m.tokens_per_vector == pytest.approx(1 / 3)
    x = torch.randn(30, 8)
    fracs = [m.step(x, cfg, k_aux=4)["dead_frac"] for _ in range(4)]
    assert m.since.max().item() == pytest.approx(40.0)  # 4 steps x 10 tokens, never fired
    assert fracs[:3] == [0.0, 0.0, 0.0]  # 0, 10, 20 tokens < 25: none dead yet
    assert fracs[3] > 0.5  # 30 tokens: the latents that never fired are dead


# ----------------------------------------------------------------------------- recovery


def test_recovers_known_sparse_dictionary():
    torch.manual_seed(0)
    d, n_atoms, k = 32, 48, 3
    D = torch.randn(n_atoms, d)  # noqa: N806
    D -= D.mean(1, keepdim=True)  # zero-mean atoms: standardization only rescales x
    D /= D.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1)

    def sample(n: int) -> torch.Tensor:
        idx = torch.rand(n, n_atoms, generator=g).topk(k, dim=1).indices
        a = torch.zeros(n, n_atoms).scatter_(1, idx, 0.5 + torch.rand(n, k, generator=g))
        return a @ D

    cfg = TrainConfig(lr=5e-3, dead_tokens=2000)
    sae = SparseAutoencoder(SaeConfig(d_in=d, expansion_factor=4, k=k, layers=[0]), seed=0)
    m = Member(
        "s", sae, make_adam(sae.parameters(), cfg), None, torch.zeros(128, dtype=torch.float64)
    )
    for _ in range(400):
        m.step(sample(512), cfg, k_aux=16)
    x = sample(4096)
    with torch.no_grad():
        x_hat, _ = sae(x)
    assert fvu(x, x_hat).item() < 0.1
    cos = (D @ sae.W_dec.detach().t()).amax(1)  # best decoder row per true atom
    assert (cos > 0.9).float().mean().item() >= 0.9


# ----------------------------------------------------------------------------- runs


def test_run_outputs_and_metrics(cache_dir, tmp_path):
    out = _train(tmp_path / "r", cache_dir, r=[4], k=[2], cfg=_cfg(dead_tokens=22), epochs=1)
    assert {"sae", "checkpoint", "metrics.jsonl", "train_cfg.json", "final_fvu.json"} <= {
        p.name for p in out.iterdir()
    }
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "fvu", "auxk", "dead_frac", "l0", "vectors_per_s"):
        assert key in rows[0]
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    # 64 vectors of 3 layers = 21.3 tokens per step: dead after 2 steps without firing
    assert rows[0]["dead_frac"] == rows[1]["dead_frac"] == 0 and rows[0]["auxk"] == 0
    assert any(r["dead_frac"] > 0 for r in rows)
    assert all((r["auxk"] > 0) == (r["dead_frac"] > 0) for r in rows)
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["layers"] == LAYERS and cfg["model"] == "synthetic" and cfg["k"] == 2
    res = json.loads((out / "final_fvu.json").read_text())["sae"]
    assert res["layers"] == LAYERS and all(0 < v < 1.5 for v in res["per_layer"]["fvu"])


def test_sweep_equals_separate_runs(cache_dir, tmp_path):
    sweep = _train(tmp_path / "sw", cache_dir, r=[2, 4], k=[2, 4], cfg=_cfg(max_steps=12))
    names = {p.name for p in sweep.iterdir() if p.name.startswith("sae_")}
    assert names == {"sae_R2_k2", "sae_R2_k4", "sae_R4_k2", "sae_R4_k4"}
    rows = (sweep / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 12 * 4
    for r, k in ((2, 4), (4, 2)):
        one = _train(tmp_path / f"one{r}{k}", cache_dir, r=[r], k=[k], cfg=_cfg(max_steps=12))
        _assert_same(sweep / f"sae_R{r}_k{k}", one / "sae", atol=1e-6)


def test_per_layer_set_feeds_each_sae_its_layer(cache_dir, tmp_path):
    cfg = _cfg(max_steps=6)
    run = _train(tmp_path / "pl", cache_dir, layers="0,5", per_layer=True, r=[2], k=[3], cfg=cfg)
    index = json.loads((run / "per_layer.json").read_text())
    assert index["layers"] == [0, 5]
    assert [e["path"] for e in index["saes"]] == ["layer_00", "layer_05"]
    assert json.loads((run / "layer_05" / "cfg.json").read_text())["layers"] == [5]
    spec = next(
        s
        for s in json.loads((run / "train_cfg.json").read_text())["members"]
        if s["name"] == "layer_05"
    )
    # Replay layer 5 by hand: batches of 64 vectors per layer, only layer 5's rows.
    sae = SparseAutoencoder(
        SaeConfig(d_in=16, expansion_factor=2, k=3, layers=[5]),
        seed=spec["seed"],
        compute_dtype=torch.float32,
    )
    m = Member("x", sae, make_adam(sae.parameters(), cfg), 5, torch.zeros(32, dtype=torch.float64))
    batches = ActivationCache(cache_dir).shuffled(128, [0, 5], seed=0, epoch=0, drop_last=True)
    for _, b in zip(range(6), batches, strict=False):
        m.step(b.x[b.layer == 5], cfg, cfg.resolved_k_aux(16))
    m.sae.save(tmp_path / "manual")
    _assert_same(run / "layer_05", tmp_path / "manual", atol=1e-6)
    _, w0 = _weights(run / "layer_00"), _weights(run / "layer_05")
    assert not torch.equal(_weights(run / "layer_00")["W_enc"], w0["W_enc"])  # distinct inits


# ----------------------------------------------------------------------------- resume


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlsae", "train", *args]


RUN_ARGS = [
    "--batch-tokens",
    "64",
    "--expansion-factor",
    "4",
    "-k",
    "2",
    "--dead-tokens",
    "22",
    "--lr",
    "2e-3",
    "--checkpoint-every",
    "3",
    "--epochs",
    "2",
    "--max-steps",
    "150",
]


def _ckpt_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def _interrupt(cmd: list[str], run: Path, at_step: int, sig: int) -> tuple[int, str]:
    """Start `cmd`, send `sig` once a checkpoint of step >= at_step exists; (returncode, stderr)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _ckpt_step(run) < at_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1].decode()
    return proc.returncode, err


def test_killed_and_resumed_run_equals_uninterrupted(cache_dir, tmp_path):
    """SIGKILL of a subprocess (its last periodic checkpoint survives), resume, SIGTERM
    (checkpoint on the spot, exit 143), resume to the end: the same weights and per-step
    losses as one uninterrupted run, across an epoch boundary, with AuxK active."""
    ref = _train(
        tmp_path / "ref",
        cache_dir,
        r=[4],
        k=[2],
        cfg=_cfg(checkpoint_every=3, dead_tokens=22),
        epochs=2,
        max_steps=150,
    )
    out = tmp_path / "run"
    rc, _ = _interrupt(
        _cli("--cache", str(cache_dir), "--out", str(out), *RUN_ARGS), out, 20, signal.SIGKILL
    )
    killed_at = _ckpt_step(out)
    assert rc == -signal.SIGKILL and 20 <= killed_at < 150

    assert killed_at + 30 < 120  # the resumed run is still going when the signal comes

    def term_later() -> None:  # SIGTERM to this process once the resumed run is 30 steps on
        deadline = time.time() + 120
        while _ckpt_step(out) < killed_at + 30 and time.time() < deadline:
            time.sleep(0.002)
        if killed_at + 30 <= _ckpt_step(out) < 120:  # never signal a finished run
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=term_later)
    t.start()
    with pytest.raises(Interrupted) as e:
        _resume(out)
    t.join()
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert killed_at + 30 <= _ckpt_step(out) < 150
    _resume(out)
    _assert_same(out / "sae", ref / "sae", atol=1e-6)
    want = [json.loads(s) for s in (ref / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 151))
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] and got[-1]["epoch"] == 1
    assert any(r["auxk"] > 0 for r in want)
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(cache_dir, tmp_path):
    with pytest.raises(MlsaeError, match="-k 100 must be between 1 and d_sae = 16"):
        _train(tmp_path / "a", cache_dir, r=[1], k=[100])
    with pytest.raises(MlsaeError, match=r"layer\(s\) \[1\] not in cache"):
        _train(tmp_path / "b", cache_dir, layers="0,1")
    with pytest.raises(MlsaeError, match=r"layer\(s\) \[3\] not in cache"):
        _train(tmp_path / "c", cache_dir, single_layer=3)
    empty = make_cache(tmp_path / "empty", n_tokens=256, all_masked=True)
    with pytest.raises(MlsaeError, match="no usable vectors"):
        _train(tmp_path / "d", empty, cfg=_cfg())
    with pytest.raises(MlsaeError, match="does not exist"):
        _train(tmp_path / "e", tmp_path / "nowhere")
    with pytest.raises(MlsaeError, match="fewer than one batch"):
        _train(tmp_path / "f", cache_dir, cfg=_cfg(batch_tokens=10**6))
    run = _train(tmp_path / "g", cache_dir, cfg=_cfg(max_steps=2))
    with pytest.raises(MlsaeError, match="--resume"):
        _train(run, cache_dir, cfg=_cfg(max_steps=2))
    # mismatched d_in: the run's cache replaced by one of another width
    cfg_path = run / "train_cfg.json"
    rc = json.loads(cfg_path.read_text())
    rc["cache"] = str(make_cache(tmp_path / "narrow", n_tokens=256, d=8))
    cfg_path.write_text(json.dumps(rc))
    with pytest.raises(MlsaeError, match="mismatched d_in"):
        _resume(run, max_steps=4)


def test_cli_error_is_one_line(cache_dir, tmp_path, monkeypatch, capsys):
    from mlsae import cli

    argv = ["mlsae", "train", "--cache", str(cache_dir), "--out", str(tmp_path / "x"), "-k", "999"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("mlsae: error: -k 999") and len([ln for ln in err if "error" in ln]) == 1
    )


@pytest.mark.parametrize("arch", ["gpt2"])
def test_train_from_model_and_dataset(tiny_model_dir, tmp_path, arch):
    """No --cache: the model is run on a local text file as training goes (no cache written)."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps." * 3 for i in range(60)))
    out = _train(
        tmp_path / "r",
        model=ModelConfig(model=str(tiny_model_dir)),
        data=DataConfig(dataset=str(text), context_length=64),
        tokens=512,
        layers="0,2",
        cfg=_cfg(max_steps=3),
    )
    assert not (out / "cache").exists()
    assert json.loads((out / "train_cfg.json").read_text())["layers"] == [0, 2]
    assert json.loads((out / "sae" / "cfg.json").read_text())["layers"] == [0, 2]
