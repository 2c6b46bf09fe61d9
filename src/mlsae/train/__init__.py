"""Stage 4, training: the loop over an activation source, run folders, checkpoints and exact
resume. May import: core, data, lens, activations, sae."""
