"""Training streamed from the model (no --cache): equal to training on a cache of the same
tokens, exact after kill -9 and resume, and nothing written outside the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsae.activations.extract import build_cache
from mlsae.core.config import (
    DataConfig,
    ExtractConfig,
    ModelConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.inputs import Inputs
from mlsae.train.loop import train_command

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CTX, TOKENS, SHARD = 64, 2048, 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 folder and a text corpus (module-wide: built once)."""
    from conftest import make_model, make_tokenizer

    root = tmp_path_factory.mktemp("stream")
    tok = make_tokenizer()
    model_dir = root / "tiny"
    make_model("gpt2", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = root / "corpus.txt"
    text.write_text(
        "\n\n".join(f"Document {i}: the quick brown fox {i % 7} jumps." * 4 for i in range(120))
    )
    return model_dir, text


def _configs(model_dir: Path, text: Path, **train_kw):
    data = DataConfig(dataset=str(text), context_length=CTX)
    model = ModelConfig(model=str(model_dir))
    train = TrainConfig(
        **{
            "batch_tokens": 64,
            "lr": 2e-3,
            "dead_tokens": 40,
            "checkpoint_every": 4,
            "shuffle_buffer_shards": 2,
            **train_kw,
        }
    )
    return data, model, train


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae" / "sae.safetensors"))


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{k} differs")


def _tree(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_stream_equals_cache_and_writes_only_the_run(setup, tmp_path):
    model_dir, text = setup
    data, model, train = _configs(model_dir, text, max_steps=40)
    src = SourceConfig(tokens=TOKENS, layers="0,2")
    cache = tmp_path / "cache"
    build_cache(
        cache,
        Inputs(src, DataConfig(dataset=str(text), context_length=CTX, split="train"), model),
        ExtractConfig(shard_tokens=SHARD),
    )
    sae = SaeGridConfig(expansion_factor=[4], k=[4])
    cached = train_command(
        tmp_path / "cached",
        inputs=Inputs(source=SourceConfig(cache=cache), data=data, model=model),
        sae=sae,
        train=train,
    )
    before = _tree(Path(setup[0]).parent, tmp_path) | _tree(tmp_path, tmp_path / "live")
    live = train_command(
        tmp_path / "live",
        inputs=Inputs(source=src, data=data, model=model),
        sae=sae,
        train=train,
        stream=ExtractConfig(shard_tokens=SHARD),
    )
    after = _tree(Path(setup[0]).parent, tmp_path) | _tree(tmp_path, tmp_path / "live")
    assert after == before, f"files written outside the run: {sorted(after - before)}"
    assert {p.name for p in live.iterdir()} == {
        "sae",
        "checkpoint",
        "metrics.jsonl",
        "train_cfg.json",
        "final_fvu.json",
        ".lock",
    }
    cfg = json.loads((live / "train_cfg.json").read_text())
    assert cfg["cache"] is None and cfg["stream"]["shard_tokens"] == SHARD
    rows = [json.loads(s) for s in (live / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and any(r["auxk"] > 0 for r in rows)
    want = [json.loads(s) for s in (cached / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in want], rel=1e-6, abs=1e-6)
    _assert_same(live, cached)
    # another block size is another order: the runs differ (the comparison can fail)
    other = train_command(
        tmp_path / "other",
        inputs=Inputs(source=src, data=data, model=model),
        sae=sae,
        train=train,
        stream=ExtractConfig(shard_tokens=2 * SHARD),
    )
    assert not torch.equal(_weights(other)["W_enc"], _weights(live)["W_enc"])


def _ckpt_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def test_stream_kill9_resume_is_exact(setup, tmp_path):
    """kill -9 of a streaming run after a checkpoint, resume: the uninterrupted weights (the
    resumed run reopens the stream from train_cfg.json and skips the batches already done)."""
    model_dir, text = setup
    data, model, train = _configs(model_dir, text, max_steps=80, epochs=3)
    src = SourceConfig(tokens=TOKENS, layers="0,2")
    sae = SaeGridConfig(expansion_factor=[4], k=[4])
    ref = train_command(
        tmp_path / "ref",
        inputs=Inputs(source=src, data=data, model=model),
        sae=sae,
        train=train,
        stream=ExtractConfig(shard_tokens=SHARD),
    )
    out = tmp_path / "run"
    args = [
        "--model",
        str(model_dir),
        "--dataset",
        str(text),
        "--context-length",
        str(CTX),
        "--tokens",
        str(TOKENS),
        "--layers",
        "0,2",
        "--shard-tokens",
        str(SHARD),
        "--shuffle-buffer-shards",
        "2",
        "--batch-tokens",
        "64",
        "--lr",
        "2e-3",
        "--dead-tokens",
        "40",
        "--checkpoint-every",
        "4",
        "--max-steps",
        "80",
        "--epochs",
        "3",
        "--expansion-factor",
        "4",
        "-k",
        "4",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlsae", "train", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 180
    while _ckpt_step(out) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = _ckpt_step(out)
    assert proc.returncode == -signal.SIGKILL and 12 <= killed_at < 80
    train_command(out, resume=True)
    _assert_same(out, ref)
    got = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(s) for s in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 81))
    assert max(r["epoch"] for r in got) >= 1  # across an epoch boundary
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6, abs=1e-6)
