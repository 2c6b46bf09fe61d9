"""`mlsae evolution RUN --out DIR`: features across layers between per-layer SAEs (SPEC 6).

Pass 1 streams the tokens once (an activation cache in stream order, or the model run on a
dataset split): every layer's SAE encodes its vectors, the sparse codes go to a temporary file
store on disk (N x k per layer, never a dense token x feature matrix), `FeatureStats` collects
sums / max / top contexts, and SAE Match's FVUs are accumulated. Pass 2 reads the codes back
for groups of layer pairs whose co-moment matrices fit `--memory-gb` (the 'active' threshold
needs pass 1's max). Then the graph, communities, DIR/graph.json, DIR/evolution.json,
DIR/graph.html and the figures. Only used (non-special) tokens count.
"""

from __future__ import annotations

import logging
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from mlsae.activations.live import LiveSource
from mlsae.core.bootstrap import BootstrapInfo, Interval
from mlsae.core.config import ModelConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import HELD_OUT_TOKENS, Inputs
from mlsae.core.io import write_json
from mlsae.core.outputs import check_output
from mlsae.core.schema import from_dict
from mlsae.core.stage_config import BootstrapConfig, EvolutionConfig
from mlsae.core.threads import one_thread
from mlsae.evolution.codes import Chunk, CodeStore, comparable_acts, load_per_layer, source_chunks
from mlsae.evolution.graph import (
    FeatureGraph,
    build_graph,
    communities,
    community_summary,
    finite,
    graph_json,
    select_nodes,
)
from mlsae.evolution.graph_html import node_details, write_graph_html
from mlsae.evolution.match import MatchScores, match_permutation
from mlsae.evolution.measures import (
    PairResult,
    plan_groups,
    summarize_pair,
)
from mlsae.evolution.stats import FeatureStats, PairStats
from mlsae.evolution.summary import (
    DataFacts,
    EvolutionSummary,
    Findings,
    GraphCounts,
    MatchRow,
    NullRates,
    PairSummary,
)
from mlsae.lens.tuned import Space
from mlsae.sae.autoencoder import SparseAutoencoder

log = logging.getLogger(__name__)


@torch.inference_mode()
def first_pass(
    chunks: Iterator[Chunk],
    saes: list[tuple[int, SparseAutoencoder]],
    store: CodeStore,
    match: MatchScores,
    cfg: EvolutionConfig,
    total: int | None,
    spaces: list[Space] | None = None,
) -> list[FeatureStats]:
    """Encode every layer of every chunk; feature statistics, codes on disk, SAE Match FVUs.
    `spaces` (lens.Space per SAE): tuned-lens SAEs read T_l(x)."""
    stats = [FeatureStats(sae.cfg.d_sae, cfg.contexts) for _, sae in saes]
    bar = tqdm(total=total, desc="evolution: encode", unit="tok", leave=False)
    for ch in chunks:
        store.add_tokens(ch.token_ids, ch.offset)
        pos = ch.offset + torch.arange(len(ch.mask))[ch.mask]
        if len(pos):
            store.add_positions(pos)
            prev = None
            for p, (ly, sae) in enumerate(saes):
                x = ch.acts[:, p][ch.mask].float()  # [n_used, d]
                if spaces is not None:
                    x = spaces[p].cached_to_sae(x, ly)
                enc = sae.encode(x, ly).to("cpu")  # codes and statistics live on the CPU
                acts = comparable_acts(enc, cfg.rescale)
                store.add(p, enc.top_indices, acts)
                with one_thread():
                    stats[p].update(enc.top_indices, acts, pos)
                if prev is not None:
                    match.update(p - 1, sae, prev, enc, x)
                prev = enc
        bar.update(len(ch.mask))
    bar.close()
    store.close()
    if stats[0].n == 0:
        raise MlsaeError("no used (non-special) tokens to analyse")
    return stats


def second_pass(
    saes: list[tuple[int, SparseAutoencoder]],
    stats: list[FeatureStats],
    store: CodeStore,
    cfg: EvolutionConfig,
    chunk_rows: int = 4096,
) -> list[PairResult]:
    """Co-moments of each adjacent pair, in groups under the memory budget; then reduce. With
    `cfg.null`, each pair's detectors also run with the down layer's tokens permuted (one
    seeded global permutation), written to each summary's `null`."""
    copies = 2 if cfg.null else 1
    sizes = [(stats[p].d, copies * stats[p + 1].d) for p in range(len(saes) - 1)]
    groups = plan_groups(sizes, cfg.memory_gb)
    n = stats[0].n
    perm = np.random.default_rng(cfg.seed).permutation(n) if cfg.null else None
    thr = [s.threshold(cfg.active_fraction) for s in stats]
    results: list[PairResult] = []
    bar = tqdm(total=len(groups) * n, desc="evolution: pairs", unit="tok", leave=False)
    for group in groups:
        acc = {p: PairStats(thr[p], thr[p + 1]) for p in group}
        null = {p: PairStats(thr[p], thr[p + 1]) for p in group} if perm is not None else {}
        for s in range(0, n, chunk_rows):
            stop = min(s + chunk_rows, n)
            codes = {q: store.read(q, s, stop) for q in sorted({*group, *(p + 1 for p in group)})}
            for p in group:
                acc[p].update(*codes[p], *codes[p + 1])
                if perm is not None:
                    null[p].update(*codes[p], *store.read_rows(p + 1, perm[s:stop]))
            bar.update(stop - s)
        for p in group:
            (lu, su), (ld, sd) = saes[p], saes[p + 1]
            w_up, w_dn = su.W_dec.cpu(), sd.W_dec.cpu()
            res = summarize_pair(stats[p], stats[p + 1], acc.pop(p), cfg, w_up, w_dn, (lu, ld))
            if perm is not None and res.summary is not None:
                shuffled = summarize_pair(
                    stats[p], stats[p + 1], null.pop(p), cfg, w_up, w_dn, (lu, ld)
                ).summary
                assert shuffled is not None
                res.summary.null = NullRates(
                    permutation="global",
                    seed=cfg.seed,
                    pass_through=shuffled.pass_through,
                    appear=shuffled.appear,
                    disappear=shuffled.disappear,
                    n_and=shuffled.n_and,
                    n_or=shuffled.n_or,
                    n_specialised=shuffled.n_specialised,
                )
            results.append(res)
    bar.close()
    return results


def findings(pairs: list[PairSummary]) -> Findings:
    """The seed's three findings, each with the numbers it rests on."""
    pt = [s.pass_through for s in pairs if s.pass_through is not None]
    alive_down = sum(s.alive_down for s in pairs)
    n_bool = sum(s.n_and + s.n_or for s in pairs)
    n_spec = sum(s.n_specialised for s in pairs)
    mean_pt = float(np.mean(pt)) if pt else 0.0
    return Findings(
        pass_through_mean=mean_pt,
        pass_through_holds=mean_pt >= 0.10,
        n_and=sum(s.n_and for s in pairs),
        n_or=sum(s.n_or for s in pairs),
        boolean_fraction=n_bool / alive_down if alive_down else 0.0,
        boolean_holds=n_bool > 0,
        n_specialised=n_spec,
        specialised_fraction=n_spec / alive_down if alive_down else 0.0,
        specialise_holds=n_spec > 0,
    )


@dataclass
class _Opened:
    """The SAEs and the token stream of one evolution run."""

    saes: list[tuple[int, SparseAutoencoder]]
    chunks: Iterator[Chunk]
    facts: dict[str, Any]
    spaces: list[Space]
    tokenizer: PreTrainedTokenizerBase | None

    @property
    def layers(self) -> list[int]:
        return [ly for ly, _ in self.saes]


def _open(run: Path, inputs: Inputs) -> _Opened:
    """Load the per-layer SAEs and open their token stream (a cache, or the model on a dataset
    split, by default the SAEs' model and dataset)."""
    from mlsae.activations.open import open_source
    from mlsae.core.compute import resolve_device
    from mlsae.lens.tuned import resolve_space

    source, data, model = inputs.parts()
    device = resolve_device(model.device)
    saes = [(ly, sae.to(device)) for ly, sae in load_per_layer(run)]
    layers = [ly for ly, _ in saes]
    sc = saes[0][1].cfg  # the SAEs' model and dataset unless given
    src = open_source(
        Inputs(
            source,
            replace(data, dataset=data.dataset or sc.dataset),
            replace(model, model=model.model or sc.model),
        ),
        default_tokens=HELD_OUT_TOKENS,
        layers=layers,
    )
    chunks, facts = source_chunks(src, saes, source.tokens)
    spaces = [
        resolve_space(sae.cfg.lens, facts.get("lens"), what=f"the SAE of layer {ly}")
        for ly, sae in saes
    ]
    live = src.lm if isinstance(src, LiveSource) else None
    tokenizer = live.tokenizer if live is not None else None
    return _Opened(saes, chunks, facts, spaces, tokenizer)


def evolution_command(
    run: Path,
    out: Path,
    *,
    inputs: Inputs | None = None,
    cfg: EvolutionConfig | None = None,
    boot: BootstrapConfig | None = None,
    figures: Callable[[Path, EvolutionSummary], dict[str, str]] | None = None,
) -> EvolutionSummary:
    """Run everything and write DIR/{evolution.json, graph.json, graph.html} (and the figures,
    drawn by `figures(out, summary)` when given: the report stage's). Tokens come from
    `inputs.source` (a cache in stream order, else the model, by default the SAEs', on 8,192 test
    tokens of the SAEs' dataset)."""
    t0 = time.perf_counter()
    cfg = cfg or EvolutionConfig()
    inputs = inputs or Inputs.held_out()
    source = inputs.source
    check_output(out, "evolution", inputs=[run, source.cache])
    op = _open(run, inputs)
    saes, layers = op.saes, op.layers
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = list(zip(layers[:-1], layers[1:], strict=True))
    perms = [
        match_permutation(saes[p][1].W_dec.cpu(), saes[p + 1][1].W_dec.cpu())
        for p in range(len(pairs))
    ]
    match = MatchScores(pairs, perms, saes[0][1].cfg.d_in, saes[0][1].cfg.d_sae)
    clock: dict[str, float] = {}  # phase -> end time
    bootstrap, found = None, {}
    tmp = Path(tempfile.mkdtemp(prefix=".codes-", dir=out))
    try:
        store = CodeStore(tmp, len(saes))
        stats = first_pass(op.chunks, saes, store, match, cfg, op.facts["n_tokens"], op.spaces)
        clock["encode"] = time.perf_counter()
        with one_thread():
            results = second_pass(saes, stats, store, cfg)
        clock["pairs"] = time.perf_counter()
        if boot is not None and boot.bootstrap > 0:
            bootstrap, found = _intervals(
                results, stats, store, cfg, boot, op.facts["context_length"]
            )
            clock["intervals"] = time.perf_counter()
        tokens = store.tokens()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = op.tokenizer or _tokenizer_for(op.facts.get("model"))
    g, drawn = _graph_outputs(out, run, stats, results, cfg, tokens, op, tokenizer, clock)
    marks = [t0, *clock.values()]
    pair_rows = [r.summary for r in results if r.summary is not None]
    summary = EvolutionSummary(
        run=str(run),
        layers=layers,
        data=from_dict(DataFacts, op.facts, "evolution data"),
        n_used_tokens=stats[0].n,
        settings=cfg,
        dead={str(ly): int((~s.alive).sum()) for ly, s in zip(layers, stats, strict=True)},
        pairs=pair_rows,
        match=[MatchRow(**m) for m in finite(match.result())],
        communities=community_summary(g),
        graph=GraphCounts(nodes=len(g.layer), edges=len(g.src), html_nodes_drawn=drawn),
        findings=replace(findings(pair_rows), intervals=found),
        time_s=time.perf_counter() - t0,
        phase_s={k: b - a for k, a, b in zip(clock, marks[:-1], marks[1:], strict=True)},
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        bootstrap=bootstrap,
    )
    if figures is not None:  # the report stage draws them (this stage does not import it)
        summary.figures = figures(out, summary)
    write_json(out / "evolution.json", summary.to_json())
    return summary


def _intervals(
    results: list[PairResult],
    stats: list[FeatureStats],
    store: CodeStore,
    cfg: EvolutionConfig,
    boot: BootstrapConfig,
    context_length: int,
) -> tuple[BootstrapInfo, dict[str, Interval | None]]:
    """Each pair's rate intervals over contexts, into its summary (see evolution.intervals)."""
    from mlsae.evolution.intervals import rate_intervals

    with one_thread():
        per_pair, found, bs = rate_intervals(results, stats, store, cfg, boot, context_length)
    for r, iv in zip(results, per_pair, strict=True):
        if r.summary is not None:
            r.summary.intervals = iv
    return bs.info, found


def _graph_outputs(
    out: Path,
    run: Path,
    stats: list[FeatureStats],
    results: list[PairResult],
    cfg: EvolutionConfig,
    tokens: np.ndarray,
    op: _Opened,
    tokenizer: PreTrainedTokenizerBase | None,
    clock: dict[str, float],
) -> tuple[FeatureGraph, int]:
    """The graph and its communities; DIR/graph.json and DIR/graph.html. Returns the graph
    and the number of nodes drawn."""
    alive = [s.alive for s in stats]
    g = build_graph(op.layers, alive, [s.density() for s in stats], results, cfg.edge_measure)
    g.community, g.method = communities(
        len(g.layer), g.src, g.dst, g.weight, cfg.seed, cfg.community, cfg.resolution
    )
    clock["communities"] = time.perf_counter()
    write_json(out / "graph.json", graph_json(g), indent=None)
    often = np.concatenate([(s.nonzero[s.alive] >= cfg.min_support).numpy() for s in stats])
    keep = select_nodes(g, cfg.max_nodes_html, often)
    details = node_details(
        g, keep, stats, results, cfg, tokens, op.facts["context_length"], tokenizer
    )
    drawn = write_graph_html(
        out / "graph.html", g, details, keep, f"mlsae evolution: {Path(run).name}"
    )
    clock["html"] = time.perf_counter()
    return g, drawn


def _tokenizer_for(model: str | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer of the cache's model for decoding contexts (None if it cannot load)."""
    if not model:
        return None
    try:
        from mlsae.data.model import load_model

        return load_model(ModelConfig(model=model, device="cpu")).tokenizer
    except (MlsaeError, OSError, ValueError) as e:
        log.warning(f"contexts shown as token ids ({e})")
        return None
