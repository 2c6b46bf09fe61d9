"""Stage 2, model -> activations: the on-disk cache, extraction into it, and the one activation
source (a cache, or a live model run) every later stage reads. May import: core, data, lens."""
