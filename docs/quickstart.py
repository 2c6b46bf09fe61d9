# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # mlsae quickstart
#
# The whole pipeline from Python on the default model (SmolLM2-135M, shipped offline) at a
# small size: train a multi-layer SAE on the model's residual stream as it runs, evaluate it on
# held-out tokens, analyse where its latents live across layers, then look at one prompt: the
# layer distribution heatmap, the top latents at a token, and steering by a latent's direction.
#
# docs/quickstart.ipynb is this file as a notebook (paired by jupytext: after editing one, run
# `jupytext --sync docs/quickstart.py`); run it as a script with `python docs/quickstart.py`.
# The environment variables below switch the model, the corpus and the sizes; the tests run
# this file on a tiny random model and check that the two files hold the same cells.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt

import mlsae

MODEL = os.environ.get("MLSAE_QUICKSTART_MODEL", "default")
DATASET = os.environ.get("MLSAE_QUICKSTART_DATASET", "default")
TOKENS = int(os.environ.get("MLSAE_QUICKSTART_TOKENS", "20000"))  # training tokens
TEST_TOKENS = int(os.environ.get("MLSAE_QUICKSTART_TEST_TOKENS", "2048"))
STEPS = int(os.environ.get("MLSAE_QUICKSTART_STEPS", "150"))
BATCH = int(os.environ.get("MLSAE_QUICKSTART_BATCH", "1024"))
CONTEXT = int(os.environ.get("MLSAE_QUICKSTART_CONTEXT", "256"))
OUT = Path(os.environ.get("MLSAE_QUICKSTART_OUT", "quickstart_out"))
PROMPT = "The quick brown fox jumps over the lazy dog because it was late."

model_cfg = mlsae.ModelConfig(model=MODEL, device="cpu")
train_data = mlsae.DataConfig(dataset=DATASET, context_length=CONTEXT)
test_data = mlsae.DataConfig(dataset=DATASET, split="test", context_length=CONTEXT)
held_out_source = mlsae.SourceConfig(tokens=TEST_TOKENS)

# %% [markdown]
# ## The model and its activations

# %%
lm = mlsae.load_model(MODEL)
print(f"{lm.name}: {lm.n_layers} blocks, d_model {lm.d_model}")
held_out = mlsae.activations(model=MODEL, dataset=DATASET, tokens=TEST_TOKENS)
print(held_out.describe(), "layers", held_out.layers)

# %% [markdown]
# ## Train a multi-layer SAE
#
# One SAE on every block's residual vectors; no activation cache is written (the model runs as
# training goes). Running this cell again continues the run from its checkpoint.

# %%
run_dir = OUT / "run"
if (run_dir / "train_cfg.json").exists():
    run = mlsae.resume(run_dir)
else:
    run = mlsae.train(
        run_dir,
        mlsae.TrainConfig(batch_tokens=BATCH, max_steps=STEPS, lr=1e-3, checkpoint_every=50),
        sae=mlsae.SaeGridConfig(expansion_factor=[4], k=[8]),
        model=model_cfg,
        data=train_data,
        source=mlsae.SourceConfig(tokens=TOKENS),
    )
print(run, run.sae.cfg.d_sae, "latents on layers", run.sae.cfg.layers)

# %% [markdown]
# ## Evaluate and analyse on held-out tokens

# %%
evaluation = mlsae.evaluate(
    run.path, OUT / "eval.json", source=held_out_source, data=test_data, model=model_cfg
)
print(evaluation.table())
analysis = mlsae.analyze(
    run.path,
    OUT / "analysis",
    prompts=[PROMPT],
    source=held_out_source,
    data=test_data,
    model=model_cfg,
)
print(analysis.table())
print("report:", OUT / "analysis" / "report.html")

# %% [markdown]
# ## One prompt: where its latents live
#
# `layer_distribution` encodes every token x layer of the prompt. `.stats()` is the prompt's
# layer distribution P(L = l | J = j) (SPEC 4), drawn as the report draws it: active latents
# as columns sorted by their expected layer, blocks as rows.

# %%
from mlsae.report.figures import heatmap  # noqa: E402 - the report's own figure

codes = run.layer_distribution(PROMPT)
print("tokens x layers x latents:", tuple(codes.dense().shape))
png = heatmap(codes.stats(), OUT / "prompt_layer_distribution.png", f"{PROMPT[:40]}...")
plt.imshow(plt.imread(png))
plt.axis("off")
plt.show()

# %% [markdown]
# The most active latent of the prompt, token by token and layer by layer:

# %%
totals = codes.dense().sum(dim=(0, 1))
latent = int(totals.argmax())
fig, ax = plt.subplots(figsize=(8, 3))
ax.imshow(codes.latent(latent).T, aspect="auto", origin="lower", cmap="viridis")
ax.set_xticks(range(len(codes.tokens)), codes.tokens, rotation=90, fontsize=7)
ax.set_ylabel("layer")
ax.set_title(f"latent {latent}")
fig.savefig(OUT / "prompt_latent.png", bbox_inches="tight")
plt.show()

# %% [markdown]
# ## The top latents at a token, and steering

# %%
last_layer = codes.layers[-1]
print("top latents at the last token of block", last_layer, run.top_latents(PROMPT, last_layer))
steered = run.steer(PROMPT, latent, factor=8.0)
print(f"KL(clean || steered) = {steered.kl_steered:.4f} nats")
for clean, moved in zip(steered.clean[:5], steered.steered[:5], strict=False):
    print(f"{clean.token!r:>12} {clean.p:.3f}   {moved.token!r:>12} {moved.p:.3f}")
