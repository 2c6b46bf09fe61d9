"""Stage 6, reading latents: `mlsae index` (one streaming pass into a per-latent SQLite index)
and `mlsae explore` (a local web app over it, with live prompt runs and the feature graph).
May import: core, data, lens, activations, sae, eval, analysis, evolution."""
