"""The first TOKENS tokens of an activation cache as a cache of their own, without copying:
`python scripts/cache_prefix.py SRC DST TOKENS`. DST gets symbolic links to SRC's first shards
(whole shards only: TOKENS must be a sum of SRC's first shard sizes) and a manifest listing just
those (their sha256 as SRC's manifest records them, so `mlsae` still checks every shard it
reads), without SRC's norm-outlier report (made for all of SRC; `mlsae info` shows none). Used by scripts/seeds.sh to give
two models the same training-token budget. An existing DST holding the same prefix is kept."""

from __future__ import annotations

import sys
from pathlib import Path

from mlsae.activations.cache import ActivationCache
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json

MANIFEST = "manifest.json"


def prefix_cache(src: Path, dst: Path, tokens: int) -> ActivationCache:
    """DST = the first `tokens` tokens of the cache SRC (whole shards), checked on open."""
    cache = ActivationCache(src)
    man = dict(cache.manifest)
    shards, total = [], 0
    for entry in man["shards"]:
        if total >= tokens:
            break
        shards.append(entry)
        total += int(entry["n_tokens"])
    if total != tokens:
        sizes = [int(e["n_tokens"]) for e in man["shards"]]
        raise MlsaeError(
            f"{src}: {tokens} tokens is not a whole number of its shards (sizes {sizes[:4]}...; "
            f"{cache.n_tokens} tokens in all)"
        )
    if (dst / MANIFEST).is_file():
        have = ActivationCache(dst)
        if [e["sha256"] for e in have.manifest["shards"]] == [e["sha256"] for e in shards]:
            return have
        raise MlsaeError(f"{dst} holds another cache: remove it or choose another folder")
    dst.mkdir(parents=True, exist_ok=True)
    for entry in shards:
        link = dst / entry["name"]
        if not link.exists():
            link.symlink_to((src / entry["name"]).resolve())
    man.pop("norm_outliers", None)
    man |= {
        "shards": shards,
        "n_tokens": total,
        "requested_tokens": tokens,
        "target_tokens": tokens,
        "prefix_of": str(src.resolve()),
    }
    write_json(dst / MANIFEST, man)
    return ActivationCache(dst)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python scripts/cache_prefix.py SRC DST TOKENS", file=sys.stderr)
        return 2
    try:
        cache = prefix_cache(Path(argv[0]), Path(argv[1]), int(argv[2]))
    except (MlsaeError, ValueError) as e:
        print(f"mlsae: error: {e}", file=sys.stderr)
        return 1
    print(f"{argv[1]}: {cache.n_tokens} tokens in {cache.n_shards} shards of {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
