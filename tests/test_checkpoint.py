"""Training as a state and a loop: a resumed run equals an uninterrupted one tensor by tensor,
and a checkpoint is checked before any of it is used (checksum, version, keys, types, shapes,
dtypes, the optimizer state, the position against the plan), each fault one `mlsae: error:`
line that names it, with the run folder left as it was."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mlsae.activations.cache import CacheWriter
from mlsae.core.config import SaeGridConfig, SourceConfig, TrainConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.train.loop import train_command

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = [0, 1]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """960 used tokens x 2 layers of random 8-d vectors: 30 batches of 64 per epoch."""
    path = tmp_path_factory.mktemp("c") / "cache"
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(1024, len(LAYERS), 8, generator=g)
    mask = torch.ones(1024, dtype=torch.bool)
    mask[::16] = False
    meta = {
        "layers": LAYERS,
        "d_model": 8,
        "model": "synthetic",
        "dataset": "synthetic",
        "split": "train",
        "context_length": 32,
    }
    w = CacheWriter(path, meta, shard_tokens=256, storage_dtype="float32")
    w.add(acts, torch.randint(0, 100, (1024,), generator=g), mask)
    w.close()
    return path


def _train(out: Path, cache: Path, max_steps: int) -> Path:
    cfg = TrainConfig(
        batch_tokens=64, epochs=2, max_steps=max_steps, checkpoint_every=7, lr=2e-3, dead_tokens=40
    )
    sae = SaeGridConfig(expansion_factor=[4], k=[2])
    return train_command(out, inputs=Inputs(source=SourceConfig(cache=cache)), train=cfg, sae=sae)


def _payload(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoint" / "state.pt", weights_only=True)


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested checkpoint payload by its dotted path."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        return _leaves(dict(enumerate(obj)), prefix)
    return {prefix.rstrip("."): obj}


def test_resumed_run_equals_uninterrupted_tensor_by_tensor(cache, tmp_path):
    """Stopped at step 25 (between periodic checkpoints, inside epoch 0), resumed to step 40
    (across the epoch boundary at 30): every tensor of the final state (weights, Adam moments
    and steps, dead counters, RNG) and every metrics row equal one 40-step run's exactly."""
    ref = _train(tmp_path / "ref", cache, 40)
    out = _train(tmp_path / "run", cache, 25)
    assert _payload(out)["step"] == 25
    train_command(out, resume=True, train_given={"max_steps": 40})
    want, got = _leaves(_payload(ref)), _leaves(_payload(out))
    assert sorted(got) == sorted(want)
    assert got["epoch"] == 1 and got["step"] == 40
    assert any(k.endswith("exp_avg_sq") for k in got) and "members.sae.since" in got
    for k, w in want.items():
        if isinstance(w, torch.Tensor):
            assert torch.equal(got[k], w), k
        else:
            assert got[k] == w, k

    def rows(run: Path) -> list[dict[str, Any]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k != "vectors_per_s"} for ln in lines]

    assert [r["step"] for r in rows(out)] == list(range(1, 41))
    assert rows(out) == rows(ref)  # losses, FVU, dead fractions: equal, not close


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def run(cache, tmp_path) -> Path:
    return _train(tmp_path / "r", cache, 4)


def _rewrite(run: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit state.pt's payload and record the new file's sha256 (the checksum then passes)."""
    payload = _payload(run)
    edit(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    (run / "checkpoint" / "state.pt").write_bytes(buf.getvalue())
    summary_path = run / "checkpoint" / "checkpoint.json"
    summary = json.loads(summary_path.read_text())
    summary["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    summary_path.write_text(json.dumps(summary))


def _sae(p: dict[str, Any]) -> dict[str, Any]:
    return p["members"]["sae"]


def _adam_group(p: dict[str, Any]) -> dict[str, Any]:
    return _sae(p)["opt"]["param_groups"][0]


EDITS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("version", lambda p: p.update(version=7), r"not an mlsae checkpoint"),
    ("string step", lambda p: p.update(step="4"), r"step: expected an integer"),
    ("step beyond the plan", lambda p: p.update(step=10**6), r"step 1000000 is beyond"),
    ("inconsistent position", lambda p: p.update(step=3), r"step 3 is not epoch 0, batch 4"),
    ("world", lambda p: p.update(world=2), r"trained on 2 process\(es\): resume it with --nproc 2"),
    ("no members", lambda p: p.pop("members"), r"members: expected an object"),
    ("other SAE", lambda p: p.update(members={"sae_R2_k2": _sae(p)}), r"not this run's"),
    ("missing weight", lambda p: _sae(p)["sae"].pop("W_enc"), r"members.sae.sae: holds"),
    (
        "wrong shape",
        lambda p: _sae(p)["sae"].update(W_enc=torch.zeros(3, 3)),
        r"sae.W_enc: torch.float32 \[3, 3\], expected torch.float32 \[8, 32\]",
    ),
    (
        "wrong dtype",
        lambda p: _sae(p)["sae"].update(b_dec=_sae(p)["sae"]["b_dec"].double()),
        r"sae.b_dec: torch.float64 \[8\], expected torch.float32",
    ),
    (
        "a weight not a tensor",
        lambda p: _sae(p)["sae"].update(b_dec=[0.0] * 8),
        r"sae.b_dec: expected a tensor, got list",
    ),
    ("NaN counter", lambda p: _sae(p)["since"].fill_(float("nan")), r"since: holds NaN or inf"),
    (
        "counter shape",
        lambda p: _sae(p).update(since=torch.zeros(5, dtype=torch.float64)),
        r"since: torch.float64 \[5\], expected torch.float64 \[32\]",
    ),
    (
        "string lr",
        lambda p: _adam_group(p).update(lr="0.001"),
        r"param_groups.lr: expected a number",
    ),
    ("no optimizer", lambda p: _sae(p).pop("opt"), r"members.sae: missing 'opt'"),
    ("no Adam state", lambda p: _sae(p)["opt"].update(state={}), r"no Adam state for parameter"),
    (
        "Adam moment shape",
        lambda p: _sae(p)["opt"]["state"][0].update(exp_avg=torch.zeros(2)),
        r"opt.state.0.exp_avg: torch.float32 \[2\]",
    ),
]


@pytest.mark.parametrize(("edit", "says"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_a_bad_checkpoint_is_refused_by_name(run, edit, says, monkeypatch, capsys):
    _rewrite(run, edit)
    before = {
        p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"
    }
    with pytest.raises(MlsaeError, match=says):
        train_command(run, resume=True, train_given={"max_steps": 8})
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing written: train_cfg.json keeps its --max-steps too
    _one_error_line(["--resume", str(run)], says, monkeypatch, capsys)


def _one_error_line(args: list[str], says: str, monkeypatch, capsys) -> None:
    from mlsae import cli

    monkeypatch.setattr(sys, "argv", ["mlsae", "train", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("mlsae: error: "), err
    assert re.search(says, err[0]), err


def _flip_exponent_bit(run: Path) -> None:
    """Flip the top exponent bit of W_enc[0, 0] inside state.pt (1e-2 becomes ~3e36)."""
    path = run / "checkpoint" / "state.pt"
    data = bytearray(path.read_bytes())
    w = _sae(_payload(run))["sae"]["W_enc"]
    at = bytes(data).find(w.numpy().tobytes()[:64])
    assert at > 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bits_are_a_corrupt_checkpoint_not_a_divergence(run, monkeypatch, capsys):
    _flip_exponent_bit(run)
    says = r"state.pt: corrupt checkpoint \(its sha256 is not the one recorded"
    with pytest.raises(MlsaeError, match=says) as e:
        train_command(run, resume=True, train_given={"max_steps": 8})
    assert "diverged" not in str(e.value)
    _one_error_line(["--resume", str(run)], says, monkeypatch, capsys)


def test_a_damaged_summary_is_a_corrupt_checkpoint(run):
    (run / "checkpoint" / "checkpoint.json").write_text('{"step": 4, "sha256": 12')
    with pytest.raises(MlsaeError, match=r"checkpoint.json: corrupt checkpoint"):
        train_command(run, resume=True)
    (run / "checkpoint" / "checkpoint.json").write_text('{"step": 4}')
    with pytest.raises(MlsaeError, match=r"state.pt: corrupt checkpoint \(checkpoint.json records"):
        train_command(run, resume=True)


def test_a_valid_checkpoint_still_resumes(run):
    """The checks refuse nothing good: a rewritten but unchanged payload resumes."""
    _rewrite(run, lambda p: None)
    train_command(run, resume=True, train_given={"max_steps": 6})
    assert _payload(run)["step"] == 6
