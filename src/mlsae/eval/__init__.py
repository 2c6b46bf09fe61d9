"""Stage 5, evaluation: delta CE / KL by splicing, per-layer metrics on held-out tokens, the
cross-layer matrix. May import: core, data, lens, activations, sae."""
