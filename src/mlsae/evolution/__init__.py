"""Stage 6, features across layers (SPEC 6): measures between adjacent per-layer SAEs, their
streaming accumulators, the code store, SAE Match and the feature graph. May import: core, data,
lens, activations, sae."""
