"""Block indices as the options give them: `--layers` specs ('all', '0,5,10', '0-11', mixed)
parsed and checked against a model's block count (used by every stage that takes --layers)."""

from __future__ import annotations

from collections.abc import Sequence

from mlsae.core.errors import MlsaeError


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Validate a layer list against the model; returns it sorted and de-duplicated."""
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if x < 0 or x >= n_layers]
    if bad or not out:
        raise MlsaeError(
            f"layer(s) {bad or '[]'} out of range: the model has blocks 0..{n_layers - 1}"
        )
    return out


def iter_layers_arg(spec: str | None, n_layers: int) -> list[int]:
    """Parse a CLI layer spec: None/'all' -> every block; '0,3,5' or '0-5' or mixed."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                if int(b) < int(a):
                    raise MlsaeError(f"layers {spec!r}: the range {part} is empty (write {b}-{a})")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise MlsaeError(
            f"cannot parse layers {spec!r}: use e.g. 'all', '0,5,10' or '0-11'"
        ) from None
    if any(x < 0 for x in out):
        raise MlsaeError(f"layers {spec!r}: block indices start at 0 (e.g. '0-5')")
    return check_layers(out, n_layers)


def parse_layers(spec: str | None) -> list[int] | None:
    """CLI --layers of a command that evaluates an SAE: None (the SAE's own), or an explicit
    list like '3', '0,5' or '0-11'."""
    if spec is None:
        return None
    if spec.strip().lower() in ("", "all"):
        raise MlsaeError("--layers: give explicit layers, e.g. '0-29' or '3,7'")
    return iter_layers_arg(spec, 1 << 20)
