"""Streaming building blocks of the index: the C largest keys of many groups (top examples, and
with random keys a uniform sample), and activation windows around a token read from sparse codes.
Memory is O(groups x C), independent of the number of tokens streamed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class TopKeeper:
    """The `capacity` largest keys of each of `groups` groups seen so far, with payloads per
    slot (name -> (dtype, extra shape)); rows stay sorted by decreasing key (empty: -inf)."""

    def __init__(
        self, groups: int, capacity: int, payload: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    ) -> None:
        self.G, self.C = int(groups), int(capacity)
        self.key = torch.full((self.G, self.C), -torch.inf)  # [G, C]
        self.data = {
            k: torch.zeros(self.G, self.C, *shape, dtype=dt) for k, (dt, shape) in payload.items()
        }

    def push(
        self, group: Tensor, key: Tensor, payload: dict[str, Tensor | Callable[[Tensor], Tensor]]
    ) -> int:
        """Offer entries (group i64[E], key f32[E]); payload: name -> [E, ...] values, or a
        function of the indices of the entries that beat their group's current C-th key (so
        costly payloads are computed for those only). Ties keep older entries. Returns the
        number of offered entries now kept."""
        cand = (key > self.key[group, -1]).nonzero().flatten()
        if not len(cand):
            return 0
        g, k = group[cand], key[cand].float()
        uniq, inv = torch.unique(g, return_inverse=True)  # [u] touched groups
        u, C = len(uniq), self.C
        all_g = torch.cat([torch.arange(u).repeat_interleave(C), inv])
        all_k = torch.cat([self.key[uniq].flatten(), k])
        # one stable sort by (group, -key): keys are finite or -inf (empty slots -> -big)
        fin = all_k.isfinite()
        big = float(all_k[fin].abs().max()) + 1.0 if fin.any() else 1.0
        k64 = torch.where(fin, all_k.double(), -big)
        order = torch.sort(all_g.double() * (4 * big) - k64, stable=True).indices
        gs = all_g[order]
        counts = torch.bincount(gs, minlength=u)
        rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[gs]
        order = order[rank < C]  # exactly C per group: each group brought C old slots
        self.key[uniq] = all_k[order].view(u, C)
        for name, arr in self.data.items():
            val = payload[name]
            new = val(cand) if callable(val) else val[cand]
            both = torch.cat([arr[uniq].flatten(0, 1), new.to(arr.dtype)])
            arr[uniq] = both[order].view(u, C, *arr.shape[2:])
        return int((order >= u * C).sum())


class WindowLookup:
    """Activations of a chunk's sparse codes by (layer column, chunk position, latent), for the
    windows of +-w tokens around chosen entries (within one context; 0 where inactive)."""

    def __init__(
        self, p: Tensor, t: Tensor, j: Tensor, a: Tensor, n: int, m: int, offset: int, ctx: int
    ) -> None:
        """Entries (layer column p, chunk position t, latent j, activation a > 0), all [E]; n
        tokens in the chunk, m latents, the chunk's stream offset and context length."""
        self.n, self.m, self.offset, self.ctx = n, m, offset, ctx
        keys = (p * n + t) * m + j
        self.keys, order = torch.sort(keys)
        self.vals = a[order]

    def windows(self, p: Tensor, t: Tensor, j: Tensor, w: int) -> Tensor:
        """[S, 2w+1] activations of latent j at layer column p, positions t-w..t+w."""
        if not len(p) or not len(self.keys):
            return torch.zeros(len(p), 2 * w + 1)
        o = torch.arange(-w, w + 1)
        tt = t[:, None] + o  # [S, W]
        same = ((tt + self.offset) // self.ctx) == ((t[:, None] + self.offset) // self.ctx)
        valid = (tt >= 0) & (tt < self.n) & same
        q = (p[:, None] * self.n + tt.clamp(0, self.n - 1)) * self.m + j[:, None]
        i = torch.searchsorted(self.keys, q).clamp(max=len(self.keys) - 1)
        hit = valid & (self.keys[i] == q)
        return torch.where(hit, self.vals[i], torch.zeros(()))
