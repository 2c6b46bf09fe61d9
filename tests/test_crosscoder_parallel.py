"""The acausal crosscoder trained data-parallel on torchrun (2 processes, gloo on the CPU): the
same weights, losses and dead-latent counters as one process computing the same global batches
(whole tokens: each process's share of a batch holds all L layers of its tokens)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_parallel import _spawn
from test_train import LAYERS, make_cache

from mlsae.activations.cache import ActivationCache
from mlsae.activations.subset import rank_share
from mlsae.core.config import SaeConfig, TrainConfig
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.train.member import Member, make_adam

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, BATCH, K, DEAD = 12, 60, 2, 40  # 60 vectors = 20 tokens x 3 layers: 10 tokens a process
ARGS = [
    "--architecture",
    "crosscoder",
    "--batch-tokens",
    str(BATCH),
    "--expansion-factor",
    "4",
    "-k",
    str(K),
    "--dead-tokens",
    str(DEAD),
    "--lr",
    "2e-3",
    "--checkpoint-every",
    "5",
    "--max-steps",
    str(STEPS),
    "--shuffle-buffer-shards",
    "2",
]
TOL = {"rtol": 1e-4, "atol": 2e-5}


def emulate(cache: Path, world: int) -> tuple[Member, list[float]]:
    """One process, the math of a `world`-process job: global batch s = the concatenation, in
    rank order, of each rank's batch s of whole tokens from its share (seed 0, epoch 0)."""
    cfg = TrainConfig(batch_tokens=BATCH, lr=2e-3, dead_tokens=DEAD)
    cc = SaeConfig(d_in=16, expansion_factor=4, k=K, layers=LAYERS, architecture="crosscoder")
    sae = SparseAutoencoder(cc, seed=0, compute_dtype=torch.float32)
    since = torch.zeros(cc.d_sae, dtype=torch.float64)
    m = Member("sae", sae, make_adam(sae.parameters(), cfg, cc.d_sae), None, since)
    shares = [rank_share(ActivationCache(cache), r, world) for r in range(world)]
    its = [
        s.shuffled(
            BATCH // world, LAYERS, seed=0, buffer_shards=2, drop_last=True, group_tokens=True
        )
        for s in shares
    ]
    losses = []
    for _, parts in zip(range(STEPS), zip(*its, strict=False), strict=False):
        x = torch.cat([p.x for p in parts])
        losses.append(m.step(x, cfg, cfg.resolved_k_aux(16))["loss"])
    assert len(losses) == STEPS
    return m, losses


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo on Linux")
def test_crosscoder_on_two_processes_equals_one_on_the_same_global_batches(tmp_path):
    cache = make_cache(tmp_path / "c")
    out = tmp_path / "run"
    res = _spawn(["train", *ARGS, "--cache", str(cache), "--out", str(out)])
    assert [r[0] for r in res] == [0, 0], res[0][2][-3000:] + res[1][2][-3000:]
    ref, losses = emulate(cache, 2)
    got = load_file(str(out / "sae" / "sae.safetensors"))
    for name, want in ref.sae.state_tensors().items():
        torch.testing.assert_close(got[name], want, **TOL, msg=f"{name} differs")
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["world"] == 2 and state["step"] == STEPS
    torch.testing.assert_close(state["members"]["sae"]["since"], ref.since, rtol=0, atol=1e-9)
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert (ref.since >= DEAD).any()  # some latents are dead: AuxK ran
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-4, abs=1e-6)
    # the test can fail: one process's own order (other global batches) gives other weights
    one, _ = emulate(cache, 1)
    assert not torch.allclose(one.sae.W_enc, ref.sae.W_enc, atol=1e-4)


def test_a_share_of_partial_tokens_is_refused_in_one_line(tmp_path):
    cache = make_cache(tmp_path / "c", n_tokens=512)
    args = [*ARGS, "--cache", str(cache), "--out", str(tmp_path / "run"), "--layers", "0,2"]
    i = args.index("--batch-tokens")
    args[i + 1] = "6"  # 3 tokens of 2 layers, but 3 vectors a process: 1.5 tokens
    res = _spawn(["train", *args])
    assert res[0][0] != 0 and res[1][0] != 0
    err = res[0][2].strip().splitlines()
    assert err[-1].startswith("mlsae: error:"), res[0][2][-2000:]
    assert "whole tokens" in err[-1] and "a multiple of 4" in err[-1], err[-1]
    assert not (tmp_path / "run" / "sae").exists()
