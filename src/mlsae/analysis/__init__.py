"""Stage 6, where latents live: layer distributions (SPEC 4) and residual geometry, streamed
over an activation source; its typed summary (summary.py) is analysis.json. May import: core,
data, lens, activations, sae, eval (the evaluation's result types)."""
