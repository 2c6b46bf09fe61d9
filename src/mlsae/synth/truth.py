"""The known structure of a synthetic data set: features, their spans, directions at every
layer, firing probabilities, magnitude schedules and relations (SPEC 7, issue 25).

Feature f lives on the layers first[f]..last[f] (its span). Its direction at layer l is
base[f] rotated by l x drift in d/2 fixed planes (one rotation R for the whole dictionary, so
every feature turns by exactly the drift angle between adjacent layers and the features keep
their inner products at every layer). Kinds: ROOT features fire on their own (probability
`firing`); an AND / OR child starts at the layer after its two parents end and fires iff both
/ either fired on the token; a SPECIALISED child starts after its parent ends and fires on a
random subset of its tokens. True edges between layers l and l+1: pass-through (f at l -> f at
l+1, every f whose span holds both), AND / OR (parents at l -> child at l+1) and
specialisation (parent at l -> child at l+1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.synth.config import SynthConfig

ROOT, AND, OR, SPECIALISED = 0, 1, 2, 3
KIND_NAMES = {ROOT: "root", AND: "and", OR: "or", SPECIALISED: "specialised"}
TRUTH_JSON, TRUTH_TENSORS = "truth.json", "truth.safetensors"


@dataclass
class Truth:
    """The structure (tensors over features f and layers l; float64 where exact)."""

    cfg: SynthConfig
    base: Tensor  # [F, d] unit direction at layer 0
    directions: Tensor  # [F, L, d] unit direction at each layer (also outside the span)
    first: Tensor  # [F] i64 first layer of the span
    last: Tensor  # [F] i64 last layer of the span
    kind: Tensor  # [F] i64 ROOT / AND / OR / SPECIALISED
    parents: Tensor  # [F, 2] i64 parent features (-1: none)
    firing: Tensor  # [F] firing probability of roots (NaN for children: set by parents)
    schedule: Tensor  # [F, L] magnitude factor per layer (0 outside the span)
    layer_scale: Tensor  # [L] the stream's norm factor per layer
    sink: Tensor  # [d] unit direction of the outlier component

    @property
    def n_features(self) -> int:
        return int(self.first.shape[0])

    def in_span(self) -> Tensor:
        """[F, L] bool: feature f lives at layer l."""
        ly = torch.arange(self.cfg.n_layers)
        return (ly[None, :] >= self.first[:, None]) & (ly[None, :] <= self.last[:, None])

    def edges(self) -> dict[str, list[list[int]]]:
        """True edges: pass_through [l, f] (f at l -> f at l+1), and / or [l, child, p1, p2],
        specialised [l, child, parent] (l = the upper layer of the pair)."""
        out: dict[str, list[list[int]]] = {
            "pass_through": [],
            "and": [],
            "or": [],
            "specialised": [],
        }
        for f in range(self.n_features):
            a, b = int(self.first[f]), int(self.last[f])
            out["pass_through"] += [[ly, f] for ly in range(a, b)]
            k, (p1, p2) = int(self.kind[f]), self.parents[f].tolist()
            if k in (AND, OR):
                out[KIND_NAMES[k]].append([a - 1, f, p1, p2])
            elif k == SPECIALISED:
                out["specialised"].append([a - 1, f, p1])
        return out

    def tensors(self) -> dict[str, Tensor]:
        names = (
            "base",
            "directions",
            "first",
            "last",
            "kind",
            "parents",
            "firing",
            "schedule",
            "layer_scale",
            "sink",
        )
        return {k: getattr(self, k) for k in names}


def _rotation_basis(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random orthogonal d x d matrix (its column pairs 2i, 2i+1 are the rotation planes)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


def rotate(base: np.ndarray, q: np.ndarray, angle: float) -> np.ndarray:
    """base [F, d] rotated by `angle` (radians) in every plane (q[:, 2i], q[:, 2i+1])."""
    c = base @ q  # coordinates in the planes' basis
    out = c.copy()
    n = c.shape[1] // 2 * 2
    cos, sin = math.cos(angle), math.sin(angle)
    out[:, 0:n:2] = cos * c[:, 0:n:2] - sin * c[:, 1:n:2]
    out[:, 1:n:2] = sin * c[:, 0:n:2] + cos * c[:, 1:n:2]
    return out @ q.T


def _spans_and_relations(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """first, last, kind, parents, firing of every feature (children last)."""
    F, L = cfg.n_features, cfg.n_layers
    first, last = np.zeros(F, np.int64), np.zeros(F, np.int64)
    kind, parents = np.zeros(F, np.int64), np.full((F, 2), -1, np.int64)
    firing = np.full(F, math.nan)
    kinds = [AND] * cfg.n_and + [OR] * cfg.n_or + [SPECIALISED] * cfg.n_specialised
    child, parent = F - len(kinds), 0  # children at the end, parents from feature 0 up
    for k in kinds:
        ly = int(rng.integers(0, L - 1))  # the parents end at ly, the child starts at ly + 1
        n_par = 1 if k == SPECIALISED else 2
        for p in range(parent, parent + n_par):
            first[p], last[p] = ly - int(rng.integers(0, ly + 1)), ly
            firing[p] = cfg.parent_firing
        first[child], last[child] = ly + 1, ly + 1 + int(rng.integers(0, L - 1 - ly))
        kind[child] = k
        parents[child, :n_par] = np.arange(parent, parent + n_par)
        parent += n_par
        child += 1
    free = np.arange(parent, F - len(kinds))
    max_span = cfg.max_span or L
    for f in free:
        n = int(rng.integers(cfg.min_span, max_span + 1))
        first[f] = int(rng.integers(0, L - n + 1))
        last[f] = first[f] + n - 1
    rank = rng.permutation(len(free)) + 1
    firing[free] = cfg.firing_max * rank.astype(np.float64) ** -cfg.firing_exponent
    return {"first": first, "last": last, "kind": kind, "parents": parents, "firing": firing}


def build_truth(cfg: SynthConfig) -> Truth:
    """The structure of `cfg` (deterministic in cfg.seed)."""
    rng = np.random.default_rng([cfg.seed, 25])
    F, L, d = cfg.n_features, cfg.n_layers, cfg.d_model
    if cfg.superposition:
        base = rng.standard_normal((F, d))
        base /= np.linalg.norm(base, axis=1, keepdims=True)
    else:
        base = _rotation_basis(rng, d)[:, :F].T.copy()  # orthonormal rows
    q = _rotation_basis(rng, d)
    theta = math.radians(cfg.drift_deg)
    dirs = np.stack([rotate(base, q, ly * theta) for ly in range(L)], axis=1)  # [F, L, d]
    rel = _spans_and_relations(cfg, rng)
    ly = np.arange(L)
    span = (ly[None, :] >= rel["first"][:, None]) & (ly[None, :] <= rel["last"][:, None])
    walk = np.cumsum(rng.standard_normal((F, L)) * cfg.schedule_sd, axis=1)
    walk -= np.take_along_axis(walk, rel["first"][:, None], axis=1)  # 1 at the first layer
    schedule = np.where(span, np.exp(walk), 0.0)
    scale = cfg.norm_growth ** (ly / (L - 1))
    sink = rng.standard_normal(d)
    t = lambda x, dt=torch.float64: torch.as_tensor(np.ascontiguousarray(x), dtype=dt)
    return Truth(
        cfg=cfg,
        base=t(base),
        directions=t(dirs),
        first=t(rel["first"], torch.int64),
        last=t(rel["last"], torch.int64),
        kind=t(rel["kind"], torch.int64),
        parents=t(rel["parents"], torch.int64),
        firing=t(rel["firing"]),
        schedule=t(schedule),
        layer_scale=t(scale),
        sink=t(sink / np.linalg.norm(sink)),
    )


def save_truth(out: Path, truth: Truth, facts: dict[str, Any]) -> None:
    """truth.safetensors (the tensors) and truth.json (settings, edges, facts), atomically."""
    from mlsae.core.io import write_json, write_safetensors

    write_safetensors(out / TRUTH_TENSORS, truth.tensors())
    body = {
        "format": "mlsae-synthetic-truth",
        "version": 1,
        "settings": asdict(truth.cfg),
        "kinds": {v: int((truth.kind == k).sum()) for k, v in KIND_NAMES.items()},
        "edges": truth.edges(),
        **facts,
    }
    write_json(out / TRUTH_JSON, body)


def load_truth(folder: Path) -> tuple[Truth, dict[str, Any]]:
    """The Truth and truth.json of a `mlsae synth generate` folder, checked."""
    from safetensors.torch import load_file

    from mlsae.core.io import read_json_object
    from mlsae.core.schema import from_dict

    folder = Path(folder)
    body = read_json_object(folder / TRUTH_JSON, "synthetic truth (truth.json)")
    if body.get("format") != "mlsae-synthetic-truth":
        raise MlsaeError(f"{folder / TRUTH_JSON} is not a `mlsae synth generate` truth file")
    cfg = from_dict(SynthConfig, body.get("settings"), str(folder / TRUTH_JSON))
    try:
        tensors = load_file(folder / TRUTH_TENSORS)
    except Exception as e:  # safetensors' own errors, a missing file
        raise MlsaeError(f"{folder / TRUTH_TENSORS} is unreadable: {e}") from None
    truth = build_truth(cfg)
    want = {k: tuple(v.shape) for k, v in truth.tensors().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want or any(
        not torch.equal(tensors[k], v)
        for k, v in truth.tensors().items()
        if k in ("first", "last", "kind", "parents")
    ):
        raise MlsaeError(f"{folder / TRUTH_TENSORS} does not match the settings in truth.json")
    return Truth(cfg=cfg, **tensors), body
