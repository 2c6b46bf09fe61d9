"""The prompt page's model runs: one clean pass per prompt (`mlsae.eval.splice.clean_pass`, the
pass `evaluate` uses), then per request the SAE codes of every layer, the next-token
distribution with the reconstruction spliced in at one layer (`spliced_logp`), and steering
(factor x a latent's decoder direction added at one layer, through the same continuation).

Calls are serialised by one lock: concurrent users never share a half-finished forward pass.
The next-token distribution at a prompt's last token is read by appending one dummy token
(causal attention: it changes nothing before it) so that the last real token is a predicted
position of the clean pass.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.data.model import LoadedModel
from mlsae.explore.source import RunSae
from mlsae.lens.tuned import Space


class BadRequest(MlsaeError):
    """A request the server answers with 400 and this message."""


MAX_CHARS = 2000
MAX_FACTOR = 1000.0
N_NEXT, N_TOP = 12, 16


def _top(logp: Tensor, n: int) -> list[tuple[int, float]]:
    v, i = logp.topk(n)
    return [(int(a), float(b)) for a, b in zip(i, v.exp(), strict=True)]


def kl(logp: Tensor, logq: Tensor) -> float:
    """KL(p || q) of two log-probability vectors [V]."""
    return float((logp.exp() * (logp - logq)).sum())


class Live:
    """The model and the run's SAEs, loaded on first use; `prompt` answers the prompt page."""

    def __init__(self, run: Path, model: str, dtype: str = "float32", max_tokens: int = 128):
        self.run, self.model_name, self.dtype = Path(run), model, dtype
        self.max_tokens = int(max_tokens)
        self.lock = threading.Lock()
        self.lm: LoadedModel | None = None
        self.saes: list[RunSae] | None = None
        self.spaces: list[Space] = []
        self.passes: OrderedDict[tuple, Any] = OrderedDict()  # LRU of clean passes

    def _load(self) -> tuple[LoadedModel, list[RunSae]]:
        from mlsae.core.config import ModelConfig
        from mlsae.data.model import load_model
        from mlsae.explore.source import run_saes
        from mlsae.lens.tuned import resolve_space

        if self.lm is None:
            dtype = "bfloat16" if self.dtype == "bfloat16" else "float32"
            self.lm = load_model(ModelConfig(model=self.model_name, dtype=dtype))
        if self.saes is None:
            saes = run_saes(self.run)
            self.spaces = [resolve_space(s.sae.cfg.lens, None, sae_dir=s.path) for s in saes]
            self.saes = saes
        return self.lm, self.saes

    def tokenize(self, text: str) -> list[int]:
        if not text.strip():
            raise BadRequest("the prompt is empty")
        if len(text) > MAX_CHARS:
            raise BadRequest(f"the prompt has {len(text)} characters; at most {MAX_CHARS}")
        ids = self._load()[0].tokenizer(text)["input_ids"]
        if len(ids) > self.max_tokens:
            raise BadRequest(f"the prompt has {len(ids)} tokens; at most {self.max_tokens}")
        return [int(i) for i in ids]

    def _clean(self, ids: list[int], layers: list[int]) -> Any:
        from mlsae.data.capture import used_mask
        from mlsae.eval.splice import clean_pass

        key = (tuple(ids), tuple(layers))
        if key in self.passes:
            self.passes.move_to_end(key)
            return self.passes[key]
        lm = self._load()[0]
        x = torch.tensor([[*ids, lm.tokenizer.eos_token_id]])  # [1, T+1], dummy last token
        used = used_mask(x, lm.special_ids)
        used[0, -1] = False
        cp = clean_pass(lm.model, x, layers, used=used)
        self.passes[key] = cp
        while len(self.passes) > 8:
            self.passes.popitem(last=False)
        return cp

    def direction(self, sae_id: int, latent: int, layer: int) -> Tensor:
        """A latent's decoder row in the model's space at `layer` [d] (through the exact lens
        inverse, without the lens offset, for a lens SAE)."""
        _, saes = self._load()
        w = saes[sae_id].sae.W_dec[latent].detach().float()[None]
        sp = self.spaces[sae_id]
        return (sp.to_model(w, layer) - sp.to_model(torch.zeros_like(w), layer))[0]

    @torch.inference_mode()
    def prompt(
        self, text: str, sae_id: int, latent: int, layer: int | None, pos: int | None,
        steer: int | None, factor: float,
    ) -> dict[str, Any]:  # fmt: skip
        """Everything the prompt page shows for one request (see the module docstring)."""
        from mlsae.core.threads import one_thread
        from mlsae.eval.splice import spliced_logp

        # one intra-op thread: a prompt's matmuls are small, and on a busy machine a second
        # thread made them 10x slower (measured 1.2-2 s vs 10-26 s per request)
        with self.lock, one_thread():
            lm, saes = self._load()
            if not 0 <= sae_id < len(saes):
                raise BadRequest(f"sae must be 0..{len(saes) - 1}")
            rs, sp = saes[sae_id], self.spaces[sae_id]
            m = rs.sae.cfg.d_sae
            for name, v in (("latent", latent), ("steer", steer)):
                if v is not None and not 0 <= v < m:
                    raise BadRequest(f"{name} must be 0..{m - 1} (this SAE has {m} latents)")
            at: int = rs.layers[-1] if layer is None else layer
            if at not in rs.layers:
                raise BadRequest(f"layer must be one of the SAE's layers {rs.layers}")
            if not abs(factor) <= MAX_FACTOR:
                raise BadRequest(f"factor must be between -{MAX_FACTOR:g} and {MAX_FACTOR:g}")
            ids = self.tokenize(text)
            T = len(ids)
            pos = T - 1 if pos is None else pos
            if not 0 <= pos < T:
                raise BadRequest(f"token position must be 0..{T - 1}")
            cp = self._clean(ids, rs.layers)
            used = cp.used[0, :T]
            where = used.nonzero().flatten().tolist()  # used positions, row order of codes
            heat = torch.zeros(T, len(rs.layers))
            totals: dict[int, Tensor] = {}
            top_at: list[tuple[int, float]] = []
            enc_at = None
            for p, ly in enumerate(rs.layers):
                enc = rs.sae.encode(sp.to_sae(cp.vectors(ly), ly))  # [N_used, k]
                dense = rs.sae.dense_acts(enc)  # [N_used, m]
                heat[used, p] = dense[:, latent]
                totals[ly] = dense.sum(0)  # [m]
                if ly == at:
                    enc_at = enc
                    if pos in where:
                        r = where.index(pos)
                        order = enc.top_acts[r].argsort(descending=True)
                        top_at = [(int(enc.top_indices[r, i]), float(enc.top_acts[r, i]))
                                  for i in order if enc.top_acts[r, i] > 0]  # fmt: skip
            mat = torch.stack([totals[ly] for ly in rs.layers])  # [L, m]
            best = mat.sum(0).topk(min(N_TOP, m)).indices
            best = best[mat.sum(0)[best] > 0]
            lv = torch.tensor(rs.layers, dtype=torch.float64)
            mean_layer = (mat[:, best].double() * lv[:, None]).sum(0) / mat[:, best].double().sum(0)
            pred = cp.pred[0].nonzero().flatten().tolist()
            nxt: dict[str, Any] = {"pos": None}
            if pos in pred and enc_at is not None:
                r = pred.index(pos)
                clean = cp.clean_p[r].clamp_min(1e-30).log()
                x_hat = sp.to_model(rs.sae.decode(enc_at), at)
                spliced = spliced_logp(lm.model, cp, at, x_hat)[r]
                nxt = {"pos": pos, "clean": self._dist(clean), "spliced": self._dist(spliced),
                       "kl_spliced": kl(clean, spliced)}  # fmt: skip
                if steer is not None:
                    x = cp.vectors(at) + factor * self.direction(sae_id, steer, at)
                    steered = spliced_logp(lm.model, cp, at, x)[r]
                    nxt.update(steered=self._dist(steered), kl_steered=kl(clean, steered),
                               compare=self._compare(clean, steered))  # fmt: skip
            tok = lm.tokenizer
            return {
                "tokens": [tok.decode([i]) for i in ids], "ids": ids, "used": used.tolist(),
                "layers": rs.layers, "latent": latent, "layer": at, "pos": pos,
                "heatmap": heat.tolist(), "top_at": top_at,
                "top_prompt": {"latents": best.tolist(), "matrix": mat[:, best].T.tolist(),
                               "mean_layer": mean_layer.tolist()},
                "next": nxt, "steer": {"latent": steer, "factor": factor, "layer": at},
            }  # fmt: skip

    def _dist(self, logp: Tensor) -> list[dict[str, Any]]:
        tok = self._load()[0].tokenizer
        return [{"id": i, "token": tok.decode([i]), "p": p} for i, p in _top(logp, N_NEXT)]

    def _compare(self, clean: Tensor, steered: Tensor) -> list[dict[str, Any]]:
        """Tokens whose probability rose / fell most under steering."""
        d = steered.exp() - clean.exp()
        tok = self._load()[0].tokenizer
        out = []
        for sign, idx in (("up", d.topk(6).indices), ("down", (-d).topk(6).indices)):
            out += [{"dir": sign, "id": int(i), "token": tok.decode([int(i)]),
                     "clean": float(clean[i].exp()), "steered": float(steered[i].exp())}
                    for i in idx]  # fmt: skip
        return out
