"""`mlsae index` / `mlsae explore`: a per-latent SQLite index and a local web app to read it."""
