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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.data.model import LoadedModel
from mlsae.explore.source import RunSae
from mlsae.explore.steer import SteerPlan, added, generate, logp_at
from mlsae.explore.tokens import display_tokens, token_bytes
from mlsae.lens.tuned import Space


class BadRequest(MlsaeError):
    """A request the server answers with 400 and this message."""


NO_MODEL = "this index has no language model (synthetic activations): prompts are unavailable"
MAX_CHARS = 2000
MAX_FACTOR = 1000.0  # raw units
MAX_FACTOR_MAX = 100.0  # units of the latent's maximum activation
MAX_GEN = 32
N_NEXT, N_TOP, N_AT_TOKEN = 12, 16, 24


@dataclass
class SteerRequest:
    """Steering asked for on the prompt page (see mlsae.explore.steer for the units)."""

    latent: int
    factor: float
    units: str  # "max" (x the latent's max activation) or "raw" (x the decoder row)
    layers: list[int]  # blocks to steer at; empty: the page's layer (filled by `check`)
    max_act: float  # the latent's maximum activation in the index
    n_gen: int = 8  # tokens generated clean and steered

    def check(self, sae_layers: list[int]) -> None:
        if self.units not in ("max", "raw"):
            raise BadRequest(f"units must be 'max' or 'raw', not {self.units[:20]!r}")
        limit = MAX_FACTOR_MAX if self.units == "max" else MAX_FACTOR
        if not abs(self.factor) <= limit:
            raise BadRequest(
                f"factor must be between -{limit:g} and {limit:g} ({self.units} units)"
            )
        bad = [ly for ly in self.layers if ly not in sae_layers]
        if bad:
            raise BadRequest(f"steering layers {bad} are not among the SAE's layers {sae_layers}")
        if not 0 <= self.n_gen <= MAX_GEN:
            raise BadRequest(f"gen must be between 0 and {MAX_GEN}")


def _top(logp: Tensor, n: int) -> list[tuple[int, float]]:
    v, i = logp.topk(n)
    return [(int(a), float(b)) for a, b in zip(i, v.exp(), strict=True)]


def kl(logp: Tensor, logq: Tensor) -> float:
    """KL(p || q) of two log-probability vectors [V]."""
    return float((logp.exp() * (logp - logq)).sum())


class Live:
    """The model and the run's SAEs, loaded on first use; `prompt` answers the prompt page
    (with NO_MODEL, a 400, when there is no model: an index of synthetic activations)."""

    def __init__(self, run: Path, model: str | None, dtype: str = "float32", max_tokens: int = 128):
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

        if self.model_name is None:
            raise BadRequest(NO_MODEL)
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
        self,
        text: str,
        sae_id: int,
        latent: int | None,
        layer: int | None,
        pos: int | None,
        steer: SteerRequest | None = None,
    ) -> dict[str, Any]:
        """Everything the prompt page shows for one request (see the module docstring). With no
        latent, the strongest latent at the chosen token and layer (else on the prompt)."""
        from mlsae.core.threads import one_thread

        # one intra-op thread: a prompt's matmuls are small, and on a busy machine a second
        # thread made them 10x slower (measured 1.2-2 s vs 10-26 s per request)
        with self.lock, one_thread():
            lm, saes = self._load()
            if not 0 <= sae_id < len(saes):
                raise BadRequest(f"sae must be 0..{len(saes) - 1}")
            rs = saes[sae_id]
            m = rs.sae.cfg.d_sae
            for name, v in (("latent", latent), ("steer", steer and steer.latent)):
                if v is not None and not 0 <= v < m:
                    raise BadRequest(f"{name} must be 0..{m - 1} (this SAE has {m} latents)")
            at: int = rs.layers[-1] if layer is None else layer
            if at not in rs.layers:
                raise BadRequest(f"layer must be one of the SAE's layers {rs.layers}")
            if steer is not None:
                steer.layers = steer.layers or [at]
                steer.check(rs.layers)
            ids = self.tokenize(text)
            T = len(ids)
            pos = T - 1 if pos is None else pos
            if not 0 <= pos < T:
                raise BadRequest(f"token position must be 0..{T - 1}")
            cp = self._clean(ids, rs.layers)
            out = self._codes(sae_id, cp, T, at, pos, latent)
            out["next"] = self._next(sae_id, cp, ids, at, pos, out["enc_at"], steer)
            del out["enc_at"]
            return {
                "tokens": self.show(ids),
                "ids": ids,
                "layers": rs.layers,
                "layer": at,
                "pos": pos,
                **out,
            }

    def show(self, ids: list[int]) -> list[str]:
        """Display strings of a token sequence (characters split over tokens merged)."""
        return display_tokens(token_bytes(self._load()[0].tokenizer, ids))

    def _codes(self, sae_id: int, cp: Any, T: int, at: int, pos: int, latent: int | None):
        """The SAE codes of the prompt: the heatmap of one latent, the latents at (pos, at), the
        latents x layers table at pos and the prompt's strongest latents x layers."""
        rs, sp = self._load()[1][sae_id], self.spaces[sae_id]
        m, L = rs.sae.cfg.d_sae, len(rs.layers)
        used = cp.used[0, :T]
        where = used.nonzero().flatten().tolist()  # used positions, row order of codes
        r = where.index(pos) if pos in where else None
        encs = [rs.sae.encode(sp.to_sae(cp.vectors(ly), ly), ly) for ly in rs.layers]
        mat = torch.zeros(L, m)  # [L, m] sums over the prompt
        at_tok = torch.zeros(L, m)  # [L, m] activations at pos
        for p, enc in enumerate(encs):
            mat[p].index_add_(0, enc.top_indices.flatten(), enc.top_acts.flatten().float())
            if r is not None:
                at_tok[p, enc.top_indices[r]] = enc.top_acts[r].float()
        enc_at = encs[rs.layers.index(at)]
        top_at: list[tuple[int, float]] = []
        if r is not None:
            order = enc_at.top_acts[r].argsort(descending=True)
            top_at = [
                (int(enc_at.top_indices[r, i]), float(enc_at.top_acts[r, i]))
                for i in order
                if enc_at.top_acts[r, i] > 0
            ]
        total = mat.sum(0)
        if latent is None:
            latent = top_at[0][0] if top_at else int(total.argmax())
        heat = torch.zeros(T, L)
        for p, enc in enumerate(encs):
            hit = (enc.top_indices == latent).float() * enc.top_acts.float()  # [N_used, k]
            heat[used, p] = hit.sum(1)
        best = total.topk(min(N_TOP, m)).indices
        best = best[total[best] > 0]
        lv = torch.tensor(rs.layers, dtype=torch.float64)
        mean_layer = (mat[:, best].double() * lv[:, None]).sum(0) / mat[:, best].double().sum(0)
        peak = at_tok.max(0).values
        tok_lat = peak.topk(min(N_AT_TOKEN, m)).indices
        tok_lat = tok_lat[peak[tok_lat] > 0]
        return {
            "latent": latent,
            "heatmap": heat.tolist(),
            "used": used.tolist(),
            "top_at": top_at,
            "top_prompt": {
                "latents": best.tolist(),
                "matrix": mat[:, best].T.tolist(),
                "mean_layer": mean_layer.tolist(),
            },
            "at_token": {"latents": tok_lat.tolist(), "matrix": at_tok[:, tok_lat].T.tolist()},
            "enc_at": enc_at,
        }

    def _next(
        self,
        sae_id: int,
        cp: Any,
        ids: list[int],
        at: int,
        pos: int,
        enc_at: Any,
        steer: SteerRequest | None,
    ) -> dict[str, Any]:
        """Next-token distributions at pos: the model's, with the reconstruction spliced in at
        `at`, and steered; plus clean and steered greedy continuations of the prompt."""
        from mlsae.eval.splice import spliced_logp

        lm, saes = self._load()
        rs, sp = saes[sae_id], self.spaces[sae_id]
        pred = cp.pred[0].nonzero().flatten().tolist()
        if pos not in pred:
            return {"pos": None}
        r = pred.index(pos)
        clean = cp.clean_p[r].clamp_min(1e-30).log()
        x_hat = sp.to_model(rs.sae.decode(enc_at), at)
        spliced = spliced_logp(lm.model, cp, at, x_hat)[r]
        nxt = {
            "pos": pos,
            "clean": self._dist(clean),
            "spliced": self._dist(spliced),
            "kl_spliced": kl(clean, spliced),
        }
        if steer is None:
            return nxt
        plan = self._plan(sae_id, steer)
        steered = logp_at(lm.model, ids, plan)[pos]
        eos: Any = lm.tokenizer.eos_token_id
        stop = {int(eos)} if isinstance(eos, int) else set()
        gen_clean = generate(lm.model, ids, None, steer.n_gen, stop)
        gen_steer = generate(lm.model, ids, plan, steer.n_gen, stop)
        norms = []
        for ly in steer.layers:
            h = cp.vectors(ly)  # [N_used, d]
            add = added(plan, ly, h, cp.input_ids[0][cp.used[0]])
            norms.append(
                {
                    "layer": ly,
                    "resid": float(h.norm(dim=1).mean()),
                    "added": float(add.norm(dim=1).mean()),
                }
            )
        nxt.update(
            steered=self._dist(steered, clean),
            kl_steered=kl(clean, steered),
            compare=self._compare(clean, steered),
            norms=norms,
            gen_clean=self.show(gen_clean),
            gen_steered=self.show(gen_steer),
        )
        return nxt

    def _plan(self, sae_id: int, steer: SteerRequest) -> SteerPlan:
        rs, sp = self._load()[1][sae_id], self.spaces[sae_id]
        dirs = {ly: self.direction(sae_id, steer.latent, ly) for ly in steer.layers}
        coeff = steer.factor * (steer.max_act if steer.units == "max" else 1.0)

        def scale(layer: int, h: Tensor) -> Tensor:
            if steer.units == "raw":
                return torch.full((len(h),), coeff)
            return coeff * rs.sae.standardize(sp.to_sae(h, layer))[2].flatten()

        return SteerPlan(dirs, scale, self._load()[0].special_ids)

    def _dist(self, logp: Tensor, base: Tensor | None = None) -> list[dict[str, Any]]:
        """The top tokens of a distribution (with their probability under `base`, if given)."""
        top = _top(logp, N_NEXT)
        names = [self.show([i])[0] for i, _ in top]
        return [
            {
                "id": i,
                "token": t,
                "p": p,
                **({} if base is None else {"base": float(base[i].exp())}),
            }
            for (i, p), t in zip(top, names, strict=True)
        ]

    def _compare(self, clean: Tensor, steered: Tensor) -> list[dict[str, Any]]:
        """Tokens whose probability rose / fell most under steering."""
        d = steered.exp() - clean.exp()
        out = []
        for sign, idx in (("up", d.topk(6).indices), ("down", (-d).topk(6).indices)):
            out += [
                {
                    "dir": sign,
                    "id": int(i),
                    "token": self.show([int(i)])[0],
                    "clean": float(clean[i].exp()),
                    "steered": float(steered[i].exp()),
                }
                for i in idx
            ]
        return out
