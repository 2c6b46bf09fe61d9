"""Stage 1, text -> tokens -> model: documents and contexts, loading causal LMs, capturing block
outputs. May import: core."""
