"""The synthetic study's table (docs/synthetic.md) from `mlsae synth score` JSONs:
python scripts/synth_table.py OUT [OUT ...] (every OUT/*/*.json)."""

import json
import sys
from pathlib import Path


def f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def rp(edges: dict, kind: str) -> str:
    """'recall / precision' of one edge kind."""
    e = edges.get(kind, {})
    return f"{f(e.get('recall'))} / {f(e.get('precision'))}"


def main() -> None:
    print("| data | model | MCC | recovered | MCC layer 0 / 5 | E[L] rho | span rho "
          "| pass-through R / P | AND R / P | OR R / P | spec R / P | Match acc |")  # fmt: skip
    print("|" + "---|" * 12)
    for out in sys.argv[1:]:
        for p in sorted(Path(out).glob("*/*.json")):
            s = json.loads(p.read_text())
            sp, e = s.get("spans") or {}, {x["kind"]: x for x in s.get("edges", [])}
            ly = s["layers"]
            print(f"| {p.parent.name} | {p.stem} | {f(s['mcc'])} | {f(s['recovered'])} "
                  f"| {f(ly[0]['mcc'])} / {f(ly[-1]['mcc'])} "
                  f"| {f(sp.get('expected_layer_spearman'))} | {f(sp.get('span_spearman'))} "
                  f"| {rp(e, 'pass_through')} | {rp(e, 'and')} | {rp(e, 'or')} | {rp(e, 'specialised')} "
                  f"| {f((s.get('match') or {}).get('accuracy'))} |")  # fmt: skip


if __name__ == "__main__":
    main()
