"""The public API (`import mlsae`): lazy (no torch until a name is used), every public name
documented in docs/api.md, the per-prompt helpers equal to plain torch on the model's own
forward, and docs/quickstart.py run end to end on a tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mlsae

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
PROMPT = "the quick brown fox jumps over the lazy dog"


def test_import_is_lazy_and_every_name_resolves():
    code = (
        "import sys, mlsae\n"
        "before = 'torch' in sys.modules\n"
        "missing = [n for n in mlsae.__all__ if getattr(mlsae, n, None) is None]\n"
        "print(before, missing)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []"


def test_calls_named_like_subpackages_stay_calls():
    """Importing mlsae.train / .activations / .evolution does not bind them over the calls."""
    from mlsae.activations import cache  # noqa: F401
    from mlsae.api import pipeline
    from mlsae.evolution import run  # noqa: F401
    from mlsae.train import loop  # noqa: F401

    for name in ("train", "activations", "evolution"):
        assert getattr(mlsae, name) is getattr(pipeline, name)


def test_api_md_lists_every_public_name():
    doc = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^#+ `mlsae\.(\w+)", doc, flags=re.M))
    assert set(mlsae.__all__) <= listed
    for name in listed:  # each entry has an example
        section = doc.split(f"`mlsae.{name}")[1].split("\n#")[0]
        assert "```python" in section, name


# ----------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from conftest import make_model, make_tokenizer

    root = tmp_path_factory.mktemp("api")
    tok = make_tokenizer()
    make_model("gpt2", len(tok)).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    text = "\n\n".join(
        f"Document {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(80)
    )
    (root / "corpus.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def run(tiny) -> mlsae.Run:
    torch.manual_seed(0)
    return mlsae.train(
        tiny / "run",
        mlsae.TrainConfig(batch_tokens=64, max_steps=6, lr=1e-2),
        sae=mlsae.SaeGridConfig(expansion_factor=[4], k=[4]),
        model=mlsae.ModelConfig(model=str(tiny / "tiny"), device="cpu"),
        data=mlsae.DataConfig(dataset=str(tiny / "corpus.txt"), context_length=64),
        source=mlsae.SourceConfig(tokens=1024),
    )


def _block_outputs(model, ids: torch.Tensor, add: dict[int, torch.Tensor] | None = None):
    """Plain forward with hooks on GPT-2's blocks: every block's output [T, d], and the logits;
    `add`: a vector added to a block's output at every position."""
    outs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.transformer.h):

        def hook(_m, _inp, o, i=i):
            h = o[0] if isinstance(o, tuple) else o
            if add and i in add:
                h = h + add[i]
            outs[i] = h[0].detach().clone()
            return (h, *o[1:]) if isinstance(o, tuple) else h

        hooks.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(ids).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def test_layer_distribution_and_top_latents_equal_plain_torch(run):
    codes = run.layer_distribution(PROMPT)
    lm, sae = run.model(), run.sae
    ids = torch.tensor([codes.ids])
    want_ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert codes.ids[-len(want_ids) :] == want_ids
    outs, _ = _block_outputs(lm.model, ids)
    T, L, m = len(codes.ids), len(sae.cfg.layers), sae.cfg.d_sae
    dense = torch.zeros(T, L, m)
    for p, layer in enumerate(sae.cfg.layers):
        with torch.no_grad():
            enc = sae.encode(outs[layer].float())
        dense[:, p] = torch.zeros(T, m).scatter_(1, enc.top_indices, enc.top_acts)
    dense[~codes.used] = 0
    assert codes.used.sum() >= T - 1
    torch.testing.assert_close(codes.dense(), dense, atol=1e-5, rtol=1e-4)
    j = int(dense.sum((0, 1)).argmax())
    torch.testing.assert_close(codes.latent(j), dense[:, :, j], atol=1e-5, rtol=1e-4)
    # the layer distribution P(L | J) over the prompt's used tokens, by its definition
    S = dense.double().sum(0)  # [L, m]
    alive = S.sum(0) > 0
    want = (S / S.sum(0)).T[alive].numpy()
    got = codes.stats().p_layer_given_latent[alive.numpy()]
    assert abs(got - want).max() < 1e-9
    layer = sae.cfg.layers[-1]
    top = run.top_latents(PROMPT, layer, position=-1, n=3)
    v, i = dense[-1, -1].topk(3)
    assert [t[0] for t in top] == i.tolist()
    assert [t[1] for t in top] == pytest.approx(v.tolist(), rel=1e-4, abs=1e-6)


def test_steering_equals_adding_the_direction_by_hand(run):
    lm, sae = run.model(), run.sae
    latent, factor, layer = 3, 5.0, sae.cfg.layers[-1]
    got = run.steer(PROMPT, latent, factor)
    assert got.layer == layer
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    _, clean = _block_outputs(lm.model, ids)
    _, steered = _block_outputs(lm.model, ids, {layer: factor * sae.W_dec[latent].detach()})
    for dist, logits in ((got.clean, clean), (got.steered, steered)):
        p = logits[-1].float().softmax(-1)
        want_p, want_i = p.topk(len(dist))
        assert [t.id for t in dist] == want_i.tolist()
        assert [t.p for t in dist] == pytest.approx(want_p.tolist(), rel=1e-4, abs=1e-6)
    lp, lq = clean[-1].float().log_softmax(-1), steered[-1].float().log_softmax(-1)
    assert got.kl_steered == pytest.approx(float((lp.exp() * (lp - lq)).sum()), rel=1e-3, abs=1e-6)


def test_quickstart_runs_end_to_end(tiny, tmp_path):
    env = {
        **ENV,
        "MLSAE_QUICKSTART_MODEL": str(tiny / "tiny"),
        "MLSAE_QUICKSTART_DATASET": str(tiny / "corpus.txt"),
        "MLSAE_QUICKSTART_TOKENS": "1024",
        "MLSAE_QUICKSTART_TEST_TOKENS": "256",
        "MLSAE_QUICKSTART_STEPS": "4",
        "MLSAE_QUICKSTART_BATCH": "64",
        "MLSAE_QUICKSTART_CONTEXT": "64",
        "MLSAE_QUICKSTART_OUT": str(tmp_path / "out"),
    }
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "quickstart.py")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    print(f"quickstart: {time.perf_counter() - t0:.1f} s")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in (
        "run/sae/sae.safetensors",
        "eval.json",
        "analysis/report.html",
        "prompt_layer_distribution.png",
        "prompt_latent.png",
    ):
        assert (tmp_path / "out" / name).is_file(), name
    assert "KL(clean || steered)" in out.stdout


def test_quickstart_notebook_holds_the_script_cells():
    """docs/quickstart.ipynb is docs/quickstart.py as a notebook (jupytext pairing): the same
    cells, in order, with the same source, and both name the pair."""
    import jupytext  # the dev extra installs it: `make test` never skips this

    script = jupytext.read(ROOT / "docs" / "quickstart.py")
    notebook = jupytext.read(ROOT / "docs" / "quickstart.ipynb")
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert len(cells(script)) > 5 and cells(script) == cells(notebook), (
        "docs/quickstart.ipynb is out of sync: run `jupytext --sync docs/quickstart.py`"
    )
    for nb in (script, notebook):
        assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert not any(c.get("outputs") for c in notebook.cells)  # stored without outputs
