"""Stage 6, synthetic ground truth (SPEC 7 "Synthetic ground truth", issue 25): multi-layer
activations with known features (`generate`: spans, drift, relations, written as a normal
activation cache plus truth.safetensors / truth.json) and every measure scored against that
truth (`score`: dictionary recovery, layer spans and distributions, evolution's edges, SAE
Match). May import: core, data, lens, activations, sae, analysis, evolution."""
