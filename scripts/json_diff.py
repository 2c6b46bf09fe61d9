"""Compare two JSON files, or every *.json file of two folders, up to float noise:
`python scripts/json_diff.py A B [--rtol 1e-6] [--atol 1e-9] [--ignore KEY ...]`.

Numbers are equal when |a - b| <= atol + rtol * |b| (NaN equals NaN; an integer and a float
compare as numbers); strings, booleans and null must be identical; objects must have the same
keys and lists the same lengths. Keys named by --ignore (anywhere in the tree, e.g. paths that
name the output folder) are skipped. Prints each difference as `file: key.path: a != b` and
the largest relative difference among the numbers that matched; exits 1 if anything differs.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


class Diff:
    """The differences found so far, and the largest relative gap of the numbers that matched."""

    def __init__(self, rtol: float, atol: float, ignore: set[str]) -> None:
        self.rtol, self.atol, self.ignore = rtol, atol, ignore
        self.lines: list[str] = []
        self.max_rel = 0.0
        self.numbers = 0

    def numbers_equal(self, a: float, b: float) -> bool:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if math.isinf(a) or math.isinf(b):
            return a == b
        gap = abs(a - b)
        equal = gap <= self.atol + self.rtol * abs(b)
        if equal and gap > 0:
            self.max_rel = max(self.max_rel, gap / max(abs(a), abs(b)))
        return equal

    def compare(self, a: object, b: object, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if key in self.ignore:
                    continue
                at = f"{where}.{key}" if where else str(key)
                if key not in a:
                    self.lines.append(f"{at}: only in the second")
                elif key not in b:
                    self.lines.append(f"{at}: only in the first")
                else:
                    self.compare(a[key], b[key], at)
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                self.lines.append(f"{where}: {len(a)} items != {len(b)} items")
                return
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                self.compare(x, y, f"{where}[{i}]")
        elif (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and _is_number(a)
            and _is_number(b)
        ):
            self.numbers += 1
            if not self.numbers_equal(float(a), float(b)):
                self.lines.append(f"{where}: {a!r} != {b!r}")
        elif a != b or type(a) is not type(b):
            self.lines.append(f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pairs(a: Path, b: Path) -> list[tuple[str, Path | None, Path | None]]:
    """(name, file in a, file in b) of the JSON files to compare."""
    if a.is_file() and b.is_file():
        return [(a.name, a, b)]
    names_a = {p.relative_to(a).as_posix(): p for p in sorted(a.rglob("*.json"))}
    names_b = {p.relative_to(b).as_posix(): p for p in sorted(b.rglob("*.json"))}
    return [(n, names_a.get(n), names_b.get(n)) for n in sorted(set(names_a) | set(names_b))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-9)
    ap.add_argument("--ignore", nargs="*", default=[], help="keys to skip anywhere in the tree")
    args = ap.parse_args(argv)
    differ = False
    for name, fa, fb in _pairs(args.a, args.b):
        if fa is None or fb is None:
            print(f"{name}: only in {'the second' if fa is None else 'the first'}")
            differ = True
            continue
        d = Diff(args.rtol, args.atol, set(args.ignore))
        d.compare(json.loads(fa.read_text()), json.loads(fb.read_text()), "")
        for line in d.lines:
            print(f"{name}: {line}")
        differ |= bool(d.lines)
        verdict = f"{len(d.lines)} difference(s)" if d.lines else "equal"
        print(f"{name}: {verdict} ({d.numbers} numbers, largest relative gap {d.max_rel:.3g})")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
