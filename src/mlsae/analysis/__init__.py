"""Stage 6, where latents live: layer distributions (SPEC 4) and residual geometry, streamed
over an activation source. May import: core, data, lens, activations, sae."""
