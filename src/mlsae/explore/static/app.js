// mlsae explore: one page, routed by the URL's #fragment. Data come from /api/*; every string
// from the index is inserted as text (never as HTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const main = () => $("#main");
let INFO = null;

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.setAttribute("style", v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
function svg(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const kid of kids.flat(Infinity)) if (kid) el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return el;
}
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Math.abs(v) >= 1000 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : (+v).toFixed(d));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(v < 0.001 ? 4 : 2) + "%");
const show = (t) => JSON.stringify(t).slice(1, -1);

function showError(msg) {
  const e = $("#error");
  e.textContent = msg;
  e.hidden = !msg;
  if (msg) setTimeout(() => { if (e.textContent === msg) e.hidden = true; }, 8000);
}

async function api(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const r = await fetch(`/api/${path}?${q}`);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean);
  return { page: parts[0] || "search", parts: parts.slice(1), q: new URLSearchParams(query || "") };
}
const go = (hash) => { location.hash = hash; };
const saeId = () => +($("#sae").value || 0);
const sae = () => INFO.saes[saeId()];
const latentHref = (s, j, layer) => `#/latent/${s}/${j}` + (layer !== undefined && layer !== null ? `?layer=${layer}` : "");

// ---------------------------------------------------------------- small charts

function barChart(values, labels, { width = 420, height = 120, color = "#f0a030", title = "" } = {}) {
  const n = values.length, max = Math.max(1e-12, ...values.map((v) => v || 0));
  const bw = (width - 40) / Math.max(n, 1);
  const g = svg("svg", { viewBox: `0 0 ${width} ${height + 22}`, width: "100%", style: `max-width:${width}px`, role: "img", "aria-label": title });
  values.forEach((v, i) => {
    const bh = ((v || 0) / max) * height;
    const r = svg("rect", { x: 34 + i * bw, y: height - bh, width: Math.max(1, bw - 1), height: bh, fill: color });
    r.append(svg("title", {}, `${labels[i]}: ${fmt(v, 4)}`));
    g.append(r);
  });
  const step = Math.max(1, Math.ceil(n / 12));
  labels.forEach((l, i) => { if (i % step === 0) g.append(svg("text", { x: 34 + i * bw + bw / 2, y: height + 14, "text-anchor": "middle" }, l)); });
  g.append(svg("text", { x: 0, y: 10 }, fmt(max, 3)));
  g.append(svg("line", { x1: 33, y1: 0, x2: 33, y2: height, stroke: "#c9ced8" }));
  return g;
}

function heatColor(v, max) {
  const a = max > 0 ? Math.min(1, Math.max(0, v / max)) : 0;
  return `rgba(240, 140, 20, ${a.toFixed(3)})`;
}

function tokenSpans(tokens, acts, at, max, opts = {}) {
  return tokens.map((t, i) => h("span", {
    class: "tok" + (i === at ? " at" : "") + (opts.sel === i ? " sel" : "") + (opts.used && !opts.used[i] ? " unused" : ""),
    style: `background:${heatColor(acts ? acts[i] : 0, max)}`,
    title: acts ? `${show(t)}: ${fmt(acts[i], 4)}` : show(t),
    onclick: opts.onclick ? () => opts.onclick(i) : null,
  }, t));
}

// ---------------------------------------------------------------- search

async function pageSearch(r) {
  const q = r.q;
  const tokenIn = h("input", { name: "token", placeholder: "a token, e.g. Paris", value: q.get("token") || "" });
  const textIn = h("input", { name: "text", placeholder: "text in examples", value: q.get("text") || "" });
  const loIn = h("input", { type: "number", step: "0.5", name: "lo", value: q.get("lo") || "", placeholder: "from" });
  const hiIn = h("input", { type: "number", step: "0.5", name: "hi", value: q.get("hi") || "", placeholder: "to" });
  const submit = (params) => (e) => { e.preventDefault(); go("#/search?" + new URLSearchParams({ sae: saeId(), ...params() })); };
  const layers = sae().layers;
  main().replaceChildren(
    h("h2", {}, "Search latents"),
    h("div", { class: "card" },
      h("form", { class: "inline", id: "by-token", onsubmit: submit(() => ({ token: tokenIn.value })) }, h("b", {}, "By token"), tokenIn, h("button", {}, "Find"),
        h("span", { class: "muted" }, "latents whose top examples sit on this token")),
      h("form", { class: "inline", id: "by-text", onsubmit: submit(() => ({ text: textIn.value })) }, h("b", {}, "By example text"), textIn, h("button", {}, "Find")),
      h("form", { class: "inline", id: "by-layer", onsubmit: submit(() => ({ lo: loIn.value, hi: hiIn.value })) }, h("b", {}, "By mean layer"), loIn, "to", hiIn, h("button", {}, "Find"),
        h("span", { class: "muted" }, `layers ${layers[0]}–${layers[layers.length - 1]}`))),
    h("div", { id: "results", class: "card" }, h("p", { class: "muted" }, "Most active latents:")));
  const params = { sae: saeId(), token: q.get("token"), text: q.get("text"), lo: q.get("lo"), hi: q.get("hi"), limit: 50 };
  const res = await api("search", params);
  const rows = res.results.map((x) => h("tr", {},
    h("td", {}, h("a", { href: latentHref(res.sae, x.latent), class: "latent-link" }, `#${x.latent}`)),
    h("td", { class: "num" }, pct(x.freq)), h("td", { class: "num" }, fmt(x.max_act)), h("td", { class: "num" }, fmt(x.mean_layer, 2)),
    h("td", { class: "muted" }, x.why || ""), h("td", { class: "tok" }, x.text)));
  $("#results").replaceChildren(
    h("p", { class: "muted" }, `${res.results.length} latent(s)`),
    h("table", {}, h("tr", {}, ["latent", "freq", "max act", "mean layer", "why", "best example"].map((t) => h("th", {}, t))), rows));
}

// ---------------------------------------------------------------- latent

function exampleRow(e, s, j, max) {
  const href = `#/prompt?` + new URLSearchParams({ sae: s, latent: j, layer: e.layer, pos: e.prompt_at, text: e.prompt });
  return h("div", { class: "example", onclick: () => go(href), title: "open in the prompt page" },
    h("span", { class: "meta" }, `L${e.layer} · ${fmt(e.act)}` + (e.band !== null && e.band !== undefined ? ` · Q${e.band + 1}` : "")),
    h("span", { class: "tokens" }, tokenSpans(e.tokens, e.acts, e.at, max)));
}

async function pageLatent(r) {
  const s = r.parts.length ? +r.parts[0] : saeId();
  if (s !== saeId()) $("#sae").value = s;
  const j = r.parts.length > 1 ? +r.parts[1] : 0;
  const layer = r.q.get("layer");
  const d = await api("latent", { sae: s, latent: j, layer });
  const max = d.max_act || 1;
  const jump = h("input", { type: "number", min: 0, max: sae().d_sae - 1, value: j, id: "jump" });
  const head = h("div", { class: "card" },
    h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); go(latentHref(s, jump.value)); } },
      h("h2", {}, `Latent ${j}`), h("span", { class: "muted" }, INFO.saes[s].label), jump, h("button", {}, "Go"),
      d.graph ? h("a", { href: `#/graph?layer=${d.layers[0]}&feature=${j}` }, "see across layers") : null,
      h("a", { href: `#/prompt?sae=${s}&latent=${j}` }, "try a prompt")),
    h("div", { class: "stats" },
      h("div", { class: "stat" }, h("b", {}, pct(d.freq)), h("span", {}, `active on ${d.n_active} of ${sae().n_tokens} tokens`)),
      h("div", { class: "stat" }, h("b", {}, fmt(d.max_act)), h("span", {}, "max activation")),
      h("div", { class: "stat" }, h("b", {}, fmt(d.mean_act)), h("span", {}, "mean when active")),
      h("div", { class: "stat" }, h("b", {}, fmt(d.mean_layer, 2)), h("span", {}, `mean layer (sd ${fmt(d.var_layer === null ? null : Math.sqrt(d.var_layer), 2)})`))));
  const edges = INFO.hist_edges;
  const hb = d.hist.length ? [Math.max(0, d.hist[0][0] - 1), Math.min(edges.length - 2, d.hist[d.hist.length - 1][0] + 1)] : [0, 0];
  const hv = [], hl = [];
  const hm = Object.fromEntries(d.hist);
  for (let b = hb[0]; b <= hb[1]; b++) { hv.push(hm[b] || 0); hl.push(fmt(edges[b], 2)); }
  const charts = h("div", { class: "grid" },
    h("div", { class: "card", id: "layer-dist" }, h("h3", {}, "Layer distribution P(layer | latent)"),
      barChart(d.layer_dist.map((v) => v || 0), d.layers.map(String), { title: "layer distribution" }),
      h("h3", {}, "Firing frequency per layer"),
      barChart(d.layer_count.map((c) => c / sae().n_tokens), d.layers.map(String), { color: "#5b8fd9", height: 70, title: "frequency per layer" })),
    h("div", { class: "card" }, h("h3", {}, "Activation histogram (log bins, all layers)"),
      barChart(hv, hl, { title: "activation histogram", color: "#7a5bd9" })),
    h("div", { class: "card" }, h("h3", {}, "Logit effects (decoder direction through final norm and unembedding)"),
      h("table", {}, h("tr", {}, h("th", {}, "promotes"), h("th", { class: "num" }, ""), h("th", {}, "suppresses"), h("th", { class: "num" }, "")),
        d.logit_pos.map((p, i) => h("tr", {}, h("td", { class: "tok" }, show(p.token)), h("td", { class: "num" }, fmt(p.value)),
          h("td", { class: "tok" }, show(d.logit_neg[i].token)), h("td", { class: "num" }, fmt(d.logit_neg[i].value)))))),
    h("div", { class: "card" }, h("h3", {}, "Tokens of its top examples"),
      d.top_tokens.map((t) => h("span", { class: "pill tokpill", title: `max ${fmt(t.max)}` }, `${show(t.token)} ×${t.n}`)),
      h("h3", {}, "Neighbours by decoder cosine"),
      h("table", {}, d.neighbours.map((n) => h("tr", {}, h("td", {}, h("a", { href: latentHref(s, n.latent) }, `#${n.latent}`)),
        h("td", { class: "num" }, fmt(n.cos)), h("td", { class: "tok muted", title: n.text || "" }, (n.text || "").slice(0, 34)))))));
  const tabs = h("div", { class: "layer-tabs" },
    h("button", { class: layer === null ? "on" : "", onclick: () => go(latentHref(s, j)) }, "all layers"),
    d.layers.filter((l, i) => d.layer_count[i] > 0).map((l) => h("button", { class: String(l) === layer ? "on" : "", onclick: () => go(latentHref(s, j, l)) }, `L${l}`)));
  const top = h("div", { class: "card", id: "top-examples" }, h("h3", {}, `Top examples ${layer === null ? "over all layers" : "at layer " + layer}`), tabs,
    d.top.length ? d.top.map((e) => exampleRow(e, s, j, max)) : h("p", { class: "muted" }, "never active on the indexed tokens"));
  const bands = [3, 2, 1, 0].map((b) => d.quantile.filter((e) => e.band === b));
  const quant = h("div", { class: "card", id: "quantile-examples" }, h("h3", {}, "Examples by activation quartile (uniform sample of its activations)"),
    bands.map((es, i) => es.length ? [h("div", { class: "muted" }, `quartile ${4 - i}`), es.reverse().map((e) => exampleRow(e, s, j, max))] : null));
  main().replaceChildren(head, charts, top, quant);
}

// ---------------------------------------------------------------- prompt

function distTable(title, rows, kl) {
  return h("div", {}, h("h3", {}, title + (kl !== undefined ? ` (KL ${fmt(kl, 4)})` : "")),
    h("table", { class: "dist" }, rows.map((r) => h("tr", {}, h("td", { class: "tok" }, show(r.token)), h("td", { class: "num" }, fmt(r.p, 4)),
      h("td", { class: "p" }, h("span", { class: "bar", style: `width:${(150 * r.p).toFixed(1)}px` }))))));
}

async function pagePrompt(r) {
  const q = r.q;
  const s = q.has("sae") ? +q.get("sae") : saeId();
  if (s !== saeId()) $("#sae").value = s;
  const S = INFO.saes[s];
  const text = h("textarea", { id: "prompt-text", maxlength: 2000 }, q.get("text") || "The capital of France is Paris, and the capital of Italy is");
  const latent = h("input", { type: "number", id: "prompt-latent", min: 0, max: S.d_sae - 1, value: q.get("latent") || 0 });
  const layer = h("select", { id: "prompt-layer" }, S.layers.map((l) => h("option", { value: l, selected: String(l) === (q.get("layer") || String(S.layers[S.layers.length - 1])) }, `L${l}`)));
  const steer = h("input", { type: "number", id: "prompt-steer", min: 0, max: S.d_sae - 1, value: q.get("steer") || "", placeholder: "latent" });
  const factor = h("input", { type: "number", id: "prompt-factor", step: "any", value: q.get("factor") || "0" });
  const pos = q.get("pos");
  const params = (extra = {}) => new URLSearchParams({ sae: s, text: text.value, latent: latent.value, layer: layer.value, steer: steer.value, factor: factor.value, ...(pos !== null ? { pos } : {}), ...extra });
  const run = (e, extra = {}) => { if (e) e.preventDefault(); const p = params(extra); if (!("pos" in extra) && e) p.delete("pos"); go("#/prompt?" + p); };
  const form = h("form", { class: "card", onsubmit: (e) => run(e) },
    h("h2", {}, "Prompt"), text,
    h("div", { class: "inline form" },
      h("label", {}, "latent ", latent), h("label", {}, " layer ", layer),
      h("label", {}, " steer with latent ", steer), h("label", {}, " factor ", factor),
      h("button", { id: "prompt-run" }, "Run")),
    h("p", { class: "muted" }, `The model runs live (at most ${INFO.max_tokens} tokens). Click a token to choose it.`));
  const out = h("div", { id: "prompt-out" });
  main().replaceChildren(form, out);
  if (!q.get("text")) return;
  out.replaceChildren(h("p", { class: "muted" }, "running the model…"));
  const d = await api("prompt", Object.fromEntries(params()));
  const L = d.layers, li = L.indexOf(d.layer);
  const col = d.heatmap.map((row) => row[li]);
  const max = Math.max(1e-9, ...d.heatmap.flat());
  const pick = (i) => run(null, { pos: i });
  const toks = h("div", { class: "card" }, h("h3", {}, `Latent ${d.latent} at layer ${d.layer} on each token`),
    h("div", { id: "prompt-tokens" }, tokenSpans(d.tokens, col, -1, max, { sel: d.pos, used: d.used, onclick: pick })));
  const heat = h("table", { class: "heat", id: "prompt-heatmap" },
    h("tr", {}, h("th", {}, ""), d.tokens.map((t, i) => h("th", {}, h("div", { class: "rot", title: show(t) }, show(t).slice(0, 10))))),
    L.map((l, p) => h("tr", {}, h("th", {}, `L${l}`), d.heatmap.map((row, i) => h("td", {
      style: `background:${heatColor(row[p], max)};${i === d.pos ? "outline:1px solid #1f5fbf" : ""}`, title: `L${l} ${show(d.tokens[i])}: ${fmt(row[p], 4)}`, onclick: () => pick(i),
    })))));
  const atTok = d.tokens[d.pos];
  const topAt = h("div", {}, h("h3", {}, `Top latents at token ${d.pos} (${show(atTok)}), layer ${d.layer}`),
    d.top_at.length ? h("table", { id: "top-at" }, d.top_at.map(([j, a]) => h("tr", {}, h("td", {}, h("a", { href: latentHref(s, j, d.layer) }, `#${j}`)),
      h("td", { class: "num" }, fmt(a)), h("td", {}, h("span", { class: "bar", style: `width:${(120 * a / Math.max(...d.top_at.map((x) => x[1]))).toFixed(1)}px` }))))) : h("p", { class: "muted" }, "no latent (special token)"));
  const tp = d.top_prompt, tmax = Math.max(1e-9, ...tp.matrix.flat());
  const latHeat = h("div", {}, h("h3", {}, "Latents most active on the prompt × layer (with mean layer)"),
    h("table", { class: "heat", id: "prompt-latents" }, h("tr", {}, h("th", {}, "latent"), L.map((l) => h("th", {}, String(l))), h("th", {}, "mean layer")),
      tp.latents.map((j, r) => h("tr", {}, h("th", {}, h("a", { href: latentHref(s, j) }, `#${j}`)),
        tp.matrix[r].map((v, p) => h("td", { style: `background:${heatColor(v, tmax)}`, title: `#${j} L${L[p]}: ${fmt(v, 4)}` })),
        h("td", { class: "num" }, fmt(tp.mean_layer[r], 2))))));
  const n = d.next;
  const nextCard = n.pos === null ? h("div", { class: "card" }, h("p", { class: "muted" }, "no next-token prediction from a special token"))
    : h("div", { class: "card", id: "next-token" }, h("h3", {}, `Next token after position ${n.pos} (${show(d.tokens[n.pos])})`),
      h("div", { class: "grid" }, distTable("model", n.clean), distTable(`reconstruction spliced at L${d.layer}`, n.spliced, n.kl_spliced),
        n.steered ? distTable(`steered: + ${d.steer.factor} × latent ${d.steer.latent} at L${d.layer}`, n.steered, n.kl_steered) : h("p", { class: "muted" }, "give a steering latent and factor to steer")),
      n.compare ? h("div", {}, h("h3", {}, "Biggest changes under steering"), h("table", {}, h("tr", {}, ["", "token", "model", "steered"].map((t) => h("th", {}, t))),
        n.compare.map((c) => h("tr", {}, h("td", {}, c.dir === "up" ? "▲" : "▼"), h("td", { class: "tok" }, show(c.token)), h("td", { class: "num" }, fmt(c.clean, 4)), h("td", { class: "num" }, fmt(c.steered, 4)))))) : null);
  out.replaceChildren(toks, h("div", { class: "two" }, h("div", { class: "card" }, h("h3", {}, `Latent ${d.latent}: tokens × layers`), heat), h("div", { class: "card" }, topAt)),
    nextCard, h("div", { class: "card" }, latHeat));
}

// ---------------------------------------------------------------- features across layers

async function pageGraph(r) {
  const q = r.q;
  if (!INFO.graph) {
    main().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Features across layers"),
      h("p", { class: "muted" }, "Start the explorer with --evolution DIR (an `mlsae evolution` output) to browse its feature graph.")));
    return;
  }
  const f = (name, v, attrs = {}) => h("input", { type: "number", name, value: q.get(name) ?? v, ...attrs });
  const inputs = { layer: f("layer", ""), feature: f("feature", ""), back: f("back", 2, { min: 0, max: 8 }), fwd: f("fwd", 2, { min: 0, max: 8 }),
    min: f("min", 0.3, { step: "0.05", min: -1, max: 1 }), per_layer: f("per_layer", 12, { min: 1, max: 50 }) };
  const submit = (e) => { e.preventDefault(); go("#/graph?" + new URLSearchParams(Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value])))); };
  const G = INFO.graph;
  const form = h("form", { class: "card", onsubmit: submit }, h("h2", {}, "Features across layers"),
    h("p", { class: "muted" }, `${G.n_nodes} features on layers ${G.layers[0]}–${G.layers[G.layers.length - 1]}, ${G.n_edges} edges (${G.edge_measure}), ${G.n_communities} communities (${G.community_method}); pass-through: Pearson ≥ ${G.pass_through}`),
    h("div", { class: "inline form" }, "layer", inputs.layer, "feature", inputs.feature, "layers before", inputs.back, "after", inputs.fwd,
      `min ${G.edge_measure}`, inputs.min, "per layer", inputs.per_layer, h("button", {}, "Show")));
  main().replaceChildren(form);
  if (!q.get("layer")) {
    const d = await api("graph", {});
    main().append(h("div", { class: "card" }, h("h3", {}, "Start from a strongly linked feature"),
      d.starts.map((n) => h("a", { class: "pill", href: `#/graph?layer=${n.layer}&feature=${n.feature}` }, `L${n.layer}:${n.feature}`))));
    return;
  }
  const d = await api("graph", Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value])));
  const chainIds = new Set(d.chain.map((n) => n.id));
  const comm = d.focus.community;
  const cyBox = h("div", { id: "cy" });
  const panel = h("div", { class: "card", id: "node-panel" }, h("p", { class: "muted" }, "Click a feature."));
  const nodeLink = (n) => n.sae !== null && n.sae !== undefined ? h("a", { href: latentHref(n.sae, n.feature) }, "open latent") : null;
  const chain = h("div", { class: "card", id: "chain" }, h("h3", {}, `Pass-through chain (${d.chain.length} features)`),
    h("table", {}, d.chain.map((n) => h("tr", {}, h("td", {}, h("a", { href: `#/graph?layer=${n.layer}&feature=${n.feature}` }, `L${n.layer}:${n.feature}`)),
      h("td", { class: "num" }, n.pearson_in === null ? "" : `r=${fmt(n.pearson_in)}`)))));
  const c = d.community;
  const commCard = h("div", { class: "card", id: "community" }, h("h3", {}, c.community < 0 ? "No community" : `Community ${c.community}: ${c.size} features`),
    c.size > 1 ? barChart(G.layers.map((l) => c.layers[l] || 0), G.layers.map(String), { height: 60, title: "community members per layer", color: "#5b8fd9" }) : null,
    h("div", {}, c.members.slice(0, 30).map((n) => h("a", { class: "pill", href: `#/graph?layer=${n.layer}&feature=${n.feature}` }, `L${n.layer}:${n.feature}`))));
  main().append(h("div", { class: "two" }, cyBox, h("div", {}, panel, chain, commCard)));
  const byLayer = {};
  const els = [];
  for (const n of d.nodes) {
    const row = (byLayer[n.layer] = (byLayer[n.layer] || 0) + 1);
    const color = n.id === d.focus.id ? "#c0392b" : chainIds.has(n.id) ? "#f0a030" : n.community === comm && comm >= 0 ? "#1f5fbf" : "#9aa1ae";
    els.push({ data: { id: "n" + n.id, label: `L${n.layer}:${n.feature}`, color, raw: n }, position: { x: G.layers.indexOf(n.layer) * 160, y: row * 46 } });
  }
  for (const e of d.edges) els.push({ data: { id: `e${e.source}_${e.target}`, source: "n" + e.source, target: "n" + e.target, w: e.weight } });
  if (typeof cytoscape !== "function") { cyBox.textContent = "graph library missing"; return; }
  const cy = cytoscape({ container: cyBox, elements: els, layout: { name: "preset" }, wheelSensitivity: 0.3,
    style: [
      { selector: "node", style: { "background-color": "data(color)", label: "data(label)", "font-size": 10, width: 14, height: 14, color: "#333" } },
      { selector: "edge", style: { width: "mapData(w, 0, 1, 0.5, 5)", "line-color": "#b9c2d3", "curve-style": "bezier" } },
    ] });
  cy.fit(undefined, 30);
  cyBox.dataset.drawn = String(d.nodes.length);
  cy.on("tap", "node", (ev) => {
    const n = ev.target.data("raw");
    panel.replaceChildren(h("h3", {}, `Layer ${n.layer}, feature ${n.feature}`),
      h("p", {}, `community ${n.community} (${n.community_size} features) · density ${pct(n.density)}`),
      h("p", {}, nodeLink(n), " ", h("a", { href: `#/graph?${new URLSearchParams({ ...Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value])), layer: n.layer, feature: n.feature })}` }, "centre here")));
  });
  const focus = d.nodes.find((n) => n.id === d.focus.id);
  panel.replaceChildren(h("h3", {}, `Layer ${focus.layer}, feature ${focus.feature}`),
    h("p", {}, `community ${focus.community} (${focus.community_size} features) · density ${pct(focus.density)} · ${d.nodes.length} features shown`), h("p", {}, nodeLink(focus)));
}

// ---------------------------------------------------------------- boot

const PAGES = { search: pageSearch, latent: pageLatent, prompt: pagePrompt, graph: pageGraph };

async function render() {
  const r = route();
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === r.page));
  const fn = PAGES[r.page] || pageSearch;
  if (r.q.has("sae") && INFO.saes[+r.q.get("sae")]) $("#sae").value = r.q.get("sae");
  try {
    showError("");
    await fn(r);
    document.body.dataset.page = r.page;
  } catch (e) {
    showError(e.message);
    document.body.dataset.page = r.page + "-error";
  }
}

async function boot() {
  try {
    INFO = await api("info");
  } catch (e) {
    showError("cannot reach the explorer: " + e.message);
    return;
  }
  $("#run").textContent = `${INFO.run} · ${INFO.model} · ${INFO.n_tokens} tokens`;
  $("#sae").replaceChildren(...INFO.saes.map((s) => h("option", { value: s.sae }, `${s.label} (${s.d_sae} latents, ${s.layers.length > 1 ? `layers ${s.layers[0]}–${s.layers[s.layers.length - 1]}` : `layer ${s.layers[0]}`})`)));
  $("#sae").addEventListener("change", () => {
    const r = route(), before = location.hash;
    go(r.page === "latent" ? latentHref(saeId(), 0) : `#/${r.page}?sae=${saeId()}`);
    if (location.hash === before) render();
  });
  $("#nav-graph").hidden = !INFO.graph;
  window.addEventListener("hashchange", render);
  render();
}
boot();
