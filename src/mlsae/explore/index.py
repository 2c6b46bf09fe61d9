"""`mlsae index RUN`: one streaming pass over tokens that writes RUN/explore.sqlite, what the
explorer shows of every latent of every SAE in the run (see `mlsae.explore.db` for the tables).

Per latent j of an SAE on layers l (block indices), over the used (mask==True) tokens t, with
a[t,l,j] the TopK activation (0 when not selected):
  count[l,j] = #{t: a[t,l,j] > 0}, freq_layer[l,j] = count[l,j] / n_tokens,
  mean_act_layer[l,j] = sum_t a[t,l,j] / count[l,j];
  freq[j] = #{t: a[t,l,j] > 0 for some l} / n_tokens (a token counts once);
  the layer distribution P(l|j), mean layer E[L|j] and Var(L|j) of SPEC 4 (LayerStats);
  top examples: the `top_n` largest a[t,l,j] per (l, j), each with a[t', l, j] for the tokens
    t' = t-w..t+w of its context (ties keep the earlier token);
  quantile examples: a uniform sample (random keys, seeded) of the latent's activations over all
    layers, shown in four bands by the sample's quartiles;
  histogram: counts of a[t,l,j] > 0 over all layers in log-spaced bins (10 per decade from
    1e-3 to 1e4; below / above go to the first / last bin);
  logit effects: unembed(final_norm(w_j)) - unembed(final_norm(0)) for the decoder row w_j (its
    direction in the SAE's space: the model's for a plain SAE, the tuned lens's for a lens SAE,
    whose space is made to be read by the final norm and unembedding); top / bottom tokens;
  neighbours: the latents of the same SAE with the largest decoder cosine.

A cache that names no model (`mlsae synth generate`'s synthetic activations), indexed without
--model, is indexed without a language model: no logit effects (empty lists, meta model null),
tokens shown by id as `<id>`; `mlsae explore` then serves every page but the prompt page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mlsae.analysis.layers import LayerStats
from mlsae.core.config import ModelConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import HELD_OUT_TOKENS, Inputs
from mlsae.core.stage_config import IndexConfig
from mlsae.core.threads import one_thread
from mlsae.explore.keeper import TopKeeper, WindowLookup
from mlsae.explore.source import Chunk, RunSae
from mlsae.explore.validate import FORMAT

if TYPE_CHECKING:
    from mlsae.activations.source import ActivationSource
    from mlsae.data.model import LoadedModel

log = logging.getLogger(__name__)

HIST_EDGES = np.geomspace(1e-3, 1e4, 71)
"""Histogram bin edges (70 log-spaced bins)."""
DB_NAME = "explore.sqlite"


def hist_bins(a: Tensor) -> Tensor:
    """Bin of each activation > 0: b with edges[b] <= a < edges[b+1], clipped to 0..B-1."""
    inner = torch.as_tensor(HIST_EDGES[1:-1], dtype=torch.float64)
    return torch.bucketize(a.double(), inner, right=True)


class SaeIndexer:
    """The streaming accumulators of one SAE (memory O(L x d_sae x top_n))."""

    def __init__(self, rs: RunSae, space: Any, top_n: int, window: int, samples: int, seed: int):
        self.rs, self.space = rs, space
        self.L, self.m = len(rs.layers), int(rs.sae.cfg.d_sae)
        self.w = int(window)
        self.stats = LayerStats(self.m, rs.layers)
        self.count = torch.zeros(self.L * self.m, dtype=torch.int64)  # [L*m]
        self.hist = torch.zeros(self.m * (len(HIST_EDGES) - 1), dtype=torch.int64)  # [m*B]
        win = (torch.float16, (2 * self.w + 1,))
        self.top = TopKeeper(self.L * self.m, top_n, {"pos": (torch.int64, ()), "win": win})
        pay = {
            "pos": (torch.int64, ()),
            "layer": (torch.int64, ()),
            "act": (torch.float32, ()),
            "win": win,
        }
        self.sample = TopKeeper(self.m, samples, pay)
        self.gen = torch.Generator().manual_seed(int(seed))

    @torch.inference_mode()
    def update(self, ch: Chunk, cols: list[int], ctx: int) -> None:
        """Encode the used tokens of a chunk at this SAE's layers and accumulate."""
        used = ch.mask.nonzero().flatten()  # [nu] chunk positions
        if not len(used):
            return
        acts, idx = [], []
        for c, ly in zip(cols, self.rs.layers, strict=True):
            x = self.space.cached_to_sae(ch.acts[used, c].float(), ly)  # [nu, d]
            enc = self.rs.sae.encode(x, ly)
            acts.append(enc.top_acts)
            idx.append(enc.top_indices)
        A, Ix = torch.stack(acts, 1), torch.stack(idx, 1)  # [nu, L, k]
        with one_thread():  # sparse bookkeeping: a second thread only costs (see one_thread)
            self._accumulate(ch, used, A, Ix, ctx)

    def _accumulate(self, ch: Chunk, used: Tensor, A: Tensor, Ix: Tensor, ctx: int) -> None:
        self.stats.update(A, Ix)
        B = len(HIST_EDGES) - 1
        for p in range(self.L):  # one layer at a time bounds the temporaries
            a, j = A[:, p].flatten(), Ix[:, p].flatten()  # [nu * k]
            keep = a > 0
            a, j = a[keep], j[keep]
            t = used.repeat_interleave(A.shape[2])[keep]  # chunk positions
            pp = torch.full_like(j, p)
            self.count.index_add_(0, p * self.m + j, torch.ones_like(j))
            self.hist.index_add_(0, j * B + hist_bins(a), torch.ones_like(j))
            look = WindowLookup(pp, t, j, a, len(ch.mask), self.m, ch.offset, ctx)
            win = lambda e, t=t, j=j, pp=pp, look=look: look.windows(pp[e], t[e], j[e], self.w)
            self.top.push(p * self.m + j, a, {"pos": t + ch.offset, "win": win})
            r = torch.rand(len(a), generator=self.gen)
            self.sample.push(j, r, {"pos": t + ch.offset, "layer": pp, "act": a, "win": win})


# ----------------------------------------------------------------------------- model parts


@torch.no_grad()
def logit_effects(model: Any, W_dec: Tensor, n: int, chunk: int = 256) -> tuple[Tensor, ...]:
    """(top values [m, n], top ids, bottom values [m, n], bottom ids) of
    unembed(final_norm(w_j)) - unembed(final_norm(0)) for the decoder rows W_dec [m, d]."""
    from mlsae.data.capture import get_final_norm, unembed

    norm = get_final_norm(model)
    dt = next(model.parameters()).dtype
    base = unembed(model, norm(torch.zeros(1, W_dec.shape[1], dtype=dt))).float()  # [1, V]
    out: list[list[Tensor]] = [[], [], [], []]
    for w in W_dec.split(chunk):
        eff = unembed(model, norm(w.to(dt))).float() - base  # [c, V]
        hi, lo = eff.topk(n, dim=1), eff.topk(n, dim=1, largest=False)
        for lst, v in zip(out, (hi.values, hi.indices, lo.values, lo.indices), strict=True):
            lst.append(v)
    return tuple(torch.cat(x) for x in out)


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, n: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(cosines [m, n], ids [m, n]) of each decoder row's most similar other rows."""
    W = torch.nn.functional.normalize(W_dec.float(), dim=1)
    n = min(n, len(W) - 1)
    vals, ids = [], []
    for s in range(0, len(W), chunk):
        c = W[s : s + chunk] @ W.T  # [c, m]
        c[torch.arange(len(c)), torch.arange(s, s + len(c))] = -torch.inf  # not itself
        v, i = c.topk(n, dim=1)
        vals.append(v)
        ids.append(i)
    return torch.cat(vals), torch.cat(ids)


def no_logit_effects(m: int) -> tuple[Tensor, ...]:
    """`logit_effects` of an index without a language model: no tokens for any of m latents."""
    return tuple(torch.zeros(m, 0, dtype=d) for d in (torch.float32, torch.int64) * 2)


def index_model(src: ActivationSource, model: ModelConfig) -> LoadedModel | None:
    """The LoadedModel for logit effects and token strings: `model.model`, else the source's;
    None for a cache that names no model (synthetic activations) when no --model is given."""
    from mlsae.activations.open import source_model

    if not model.model and getattr(src, "path", None) is not None and not src.info.get("model"):
        log.info(f"{src.describe()} names no model: indexed without one (no logit effects)")
        return None
    return source_model(src, model if model.model else None)


def vocab_size(lm: LoadedModel, n_logits: int) -> int:
    """The model's vocabulary size (MlsaeError unless 1 <= n_logits <= it)."""
    n = int(next(lm.model.get_input_embeddings().parameters()).shape[0])
    if not 1 <= n_logits <= n:
        raise MlsaeError(
            f"--n-logits {n_logits} must be between 1 and the model's vocabulary size {n}"
        )
    return n


def decode_vocab(tokenizer: Any, vocab_size: int) -> list[str]:
    """Display string of every token id (decoded one at a time)."""
    if tokenizer is None:
        return [f"<{i}>" for i in range(vocab_size)]
    return [tokenizer.decode([i]) for i in range(vocab_size)]


def fragment_bytes(tokenizer: Any, vocab: list[str]) -> dict[str, str]:
    """Hex bytes of the tokens whose text alone is not whole UTF-8 (a piece of a character), by
    id: what the explorer needs to show them merged or as bytes."""
    from mlsae.explore.tokens import REPLACEMENT, token_bytes

    ids = [i for i, t in enumerate(vocab) if REPLACEMENT in t]
    if tokenizer is None or not ids:
        return {}
    return {str(i): b.hex() for i, b in zip(ids, token_bytes(tokenizer, ids), strict=True)}


# ----------------------------------------------------------------------------- the pass


def index_pass(
    chunks: Iterator[Chunk], idx: list[SaeIndexer], layers: list[int], ctx: int, total: int | None
) -> np.ndarray:
    """Stream every chunk through every SAE's accumulators; returns the stream's token ids."""
    from tqdm import tqdm

    cols = {i: [layers.index(ly) for ly in x.rs.layers] for i, x in enumerate(idx)}
    tokens: list[np.ndarray] = []
    expect = 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc="index") as bar:
        for ch in chunks:
            if ch.offset != expect:
                raise MlsaeError(
                    f"token stream is not contiguous at {ch.offset} (expected {expect})"
                )
            tokens.append(ch.token_ids.numpy().astype(np.int32))
            expect += len(ch.token_ids)
            for i, x in enumerate(idx):
                x.update(ch, cols[i], ctx)
            bar.update(len(ch.token_ids))
    if not tokens or idx[0].stats.n_tokens == 0:
        raise MlsaeError("no used (non-special) tokens to index")
    return np.concatenate(tokens)


def _source_info(src: Any) -> dict[str, str | None]:
    """What the index records of its tokens' source: a cache's folder, or a dataset; the split."""
    path = getattr(src, "path", None)
    if path is not None:
        return {"cache": str(Path(path).resolve()), "split": src.info.get("split")}
    return {"dataset": src.info.get("dataset"), "split": src.info.get("split")}


def _write_sae(
    w: Any,
    i: int,
    x: SaeIndexer,
    lm: Any,
    cfg: IndexConfig,
    stream: np.ndarray,
    vocab: list[str],
    ctx: int,
) -> None:
    """One SAE's rows: its accumulators with the decoder's logit effects (none without a
    model) and nearest decoder neighbours."""
    W = x.rs.sae.W_dec.detach()
    if lm is not None:
        effects = logit_effects(lm.model, W, cfg.n_logits)
    else:
        effects = no_logit_effects(len(W))
    neigh = decoder_neighbours(W, cfg.n_neighbours)
    w.sae(i, x, effects, neigh, stream, vocab, ctx)


def _meta(
    run: Path,
    lm: Any,
    src: Any,
    stream: np.ndarray,
    cfg: IndexConfig,
    saes: list[RunSae],
    vocab_bytes: Any,
) -> dict[str, object]:
    """The index's meta table: provenance, settings and the indexed SAEs' hashes."""
    from mlsae.explore.source import weights_sha256

    return {
        "format": FORMAT,
        "run": str(run.resolve()),
        "model": lm.name if lm else None,
        "source": _source_info(src),
        "context_length": max(1, src.context_length),
        "n_stream_tokens": len(stream),
        "top_n": cfg.top_n,
        "window": cfg.window,
        "samples": cfg.samples,
        "hist_edges": HIST_EDGES.tolist(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sae_sha256": {s.label: weights_sha256(s.path) for s in saes},
        "vocab_bytes": vocab_bytes,
    }


@dataclass
class IndexSummary:
    """What `build_index` wrote."""

    path: Path
    """The database file."""
    bytes: int
    """Its size."""
    time_s: float
    """Wall time of the whole command."""
    pass_s: float
    """Wall time of the pass over the tokens."""
    n_tokens: int
    """Tokens indexed."""
    saes: list[str]
    """The label of each indexed SAE."""


def build_index(
    run: str | Path,
    *,
    out: str | Path | None = None,
    inputs: Inputs | None = None,
    cfg: IndexConfig | None = None,
) -> IndexSummary:
    """Index every SAE of `run` on `inputs.source` (a cache, else the model, by default the
    SAEs', on 8,192 test tokens of the SAEs' dataset) and write the database atomically (default
    RUN/explore.sqlite). Returns what was written (`IndexSummary`)."""
    from mlsae.activations.open import open_source
    from mlsae.explore import db
    from mlsae.explore.source import run_saes, source_chunks
    from mlsae.lens.tuned import resolve_space

    source, data, model = (inputs or Inputs.held_out()).parts()
    cfg = cfg or IndexConfig()
    top_n, window, samples = cfg.top_n, cfg.window, cfg.samples
    t0 = time.perf_counter()
    run = Path(run)
    path = Path(out) if out is not None else (run if run.is_dir() else run.parent) / DB_NAME
    db.check_index_output(path, inputs=[run, source.cache, model.model, data.dataset])
    saes = run_saes(run)
    layers = sorted({ly for s in saes for ly in s.layers})
    cfg0 = saes[0].sae.cfg
    src = open_source(
        Inputs(
            source,
            replace(data, dataset=data.dataset or cfg0.dataset),
            replace(model, model=model.model or cfg0.model),
        ),
        default_tokens=HELD_OUT_TOKENS,
        layers=layers,
    )
    lm = index_model(src, model)
    cache_lens, ctx = src.lens, max(1, src.context_length)
    chunks = source_chunks(src, layers, source.tokens)
    total = src.n_tokens if source.tokens is None else min(src.n_tokens, source.tokens)
    for s in saes:
        if s.sae.cfg.d_in != src.d_model:
            raise MlsaeError(f"SAE {s.path}: d_in {s.sae.cfg.d_in}, activations {src.d_model}")
    idx = [
        SaeIndexer(
            s,
            resolve_space(s.sae.cfg.lens, cache_lens, sae_dir=s.path, what=f"SAE {s.path}"),
            top_n,
            window,
            samples,
            cfg.seed + i,
        )
        for i, s in enumerate(saes)
    ]
    n_vocab = vocab_size(lm, cfg.n_logits) if lm is not None else 0
    stream = index_pass(chunks, idx, layers, ctx, total)
    t_pass = time.perf_counter() - t0
    tokenizer = lm.tokenizer if lm is not None else None
    vocab = decode_vocab(tokenizer, n_vocab or int(stream.max()) + 1)
    meta = _meta(run, lm, src, stream, cfg, saes, fragment_bytes(tokenizer, vocab))
    with db.Writer(path) as w:
        w.meta(meta)
        w.stream(stream)
        w.vocab(vocab)
        for i, x in enumerate(idx):
            _write_sae(w, i, x, lm, cfg, stream, vocab, ctx)
        meta["time_s"] = time.perf_counter() - t0
        meta["pass_s"] = t_pass
        w.meta(meta)
    size = path.stat().st_size
    log.info(f"wrote {path} ({size / 1e6:.1f} MB) in {meta['time_s']:.0f} s")
    return IndexSummary(
        path=path,
        bytes=size,
        time_s=meta["time_s"],
        pass_s=t_pass,
        n_tokens=idx[0].stats.n_tokens,
        saes=[s.label for s in saes],
    )
