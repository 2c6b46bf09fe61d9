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
const fmt = (v, d = 3) => {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(2);
  if (Math.abs(v) >= 100) return Math.round(v).toLocaleString("en-US");
  return (+v).toFixed(Math.abs(v) >= 10 ? Math.min(d, 1) : d);
};
const int = (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(v < 0.001 ? 4 : 2) + "%");
const WS = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "⏎" };
// a token's text with whitespace drawn as ␣ ↵ ⇥ (faint), as DOM nodes
function tokText(t) {
  const out = [];
  let run = "";
  for (const ch of String(t)) {
    if (WS[ch]) { if (run) out.push(run); run = ""; out.push(h("span", { class: "ws" }, WS[ch])); } else run += ch;
  }
  if (run) out.push(run);
  return out.length ? out : [h("span", { class: "ws" }, "∅")];
}
const show = (t) => [...String(t)].map((c) => WS[c] || c).join("");
let RENDER = 0;
const STALE = new Error("stale");
const DENSE_KEY = "mlsae-hide-dense";
const hideDense = () => localStorage.getItem(DENSE_KEY) === "1";
function denseToggle(onchange) {
  const box = h("input", { type: "checkbox", class: "hide-dense", checked: hideDense(), onchange: () => { localStorage.setItem(DENSE_KEY, box.checked ? "1" : "0"); onchange(); } });
  return h("label", { class: "muted", title: `latents active on more than ${pct(INFO.dense_share)} of tokens` }, box, ` hide dense latents (> ${pct(INFO.dense_share)} of tokens)`);
}
const denseBadge = (on) => (on ? h("span", { class: "badge dense", title: `active on more than ${pct(INFO.dense_share)} of tokens` }, "dense") : null);

function showError(msg) {
  const e = $("#error");
  e.textContent = msg;
  e.hidden = !msg;
}

async function load(r, path, params) {
  const d = await api(path, params);
  if (r.ticket !== RENDER) throw STALE;
  return d;
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

// values[i] at labels[i]; x / y are the axis titles (with units); yfmt formats the y values
function barChart(values, labels, { width = 420, height = 120, color = "#f0a030", title = "", x = "", y = "", yfmt = fmt } = {}) {
  const n = values.length, max = Math.max(1e-12, ...values.map((v) => v || 0));
  const left = 52, bw = (width - left - 6) / Math.max(n, 1);
  const g = svg("svg", { viewBox: `0 0 ${width} ${height + 40}`, width: "100%", style: `max-width:${width}px`, role: "img", "aria-label": title });
  values.forEach((v, i) => {
    const bh = ((v || 0) / max) * height;
    const r = svg("rect", { x: left + i * bw, y: height - bh + 4, width: Math.max(1, bw - 1), height: bh, fill: color });
    r.append(svg("title", {}, `${x} ${labels[i]}: ${yfmt(v)}`));
    g.append(r);
  });
  const step = Math.max(1, Math.ceil(n / 12));
  labels.forEach((l, i) => { if (i % step === 0) g.append(svg("text", { x: left + i * bw + bw / 2, y: height + 18, "text-anchor": "middle" }, l)); });
  g.append(svg("text", { x: left - 4, y: 12, "text-anchor": "end" }, yfmt(max)));
  g.append(svg("text", { x: left - 4, y: height + 4, "text-anchor": "end" }, "0"));
  g.append(svg("line", { x1: left - 1, y1: 4, x2: left - 1, y2: height + 4, stroke: "#c9ced8" }));
  g.append(svg("text", { x: left + (width - left) / 2, y: height + 36, "text-anchor": "middle", class: "axis" }, x));
  g.append(svg("text", { x: 10, y: height / 2 + 4, "text-anchor": "middle", class: "axis", transform: `rotate(-90 10 ${height / 2 + 4})` }, y));
  return g;
}

function heatColor(v, max) {
  const a = max > 0 ? Math.min(1, Math.max(0, v / max)) : 0;
  return `rgba(240, 140, 20, ${a.toFixed(3)})`;
}
// the colour scale of a heatmap: 0 .. max, with what the colour measures
function colorScale(max, what) {
  return h("div", { class: "scale" }, h("span", {}, "0"), h("span", { class: "ramp" }), h("span", {}, fmt(max)), h("span", { class: "muted" }, ` ${what}`));
}

function tokenSpans(tokens, acts, at, max, opts = {}) {
  return tokens.map((t, i) => h("span", {
    class: "tok" + (i === at ? " at" : "") + (opts.sel === i ? " sel" : "") + (opts.used && !opts.used[i] ? " unused" : "") + (acts && (acts[i] === null || acts[i] === undefined) ? " noact" : ""),
    style: `background:${heatColor(acts ? acts[i] || 0 : 0, max)}`,
    title: `${show(t)}` + (acts ? `: ${acts[i] === null || acts[i] === undefined ? "activation not stored" : fmt(acts[i], 4)}` : ""),
    onclick: opts.onclick ? () => opts.onclick(i) : null,
  }, tokText(t)));
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
  const params = { sae: saeId(), token: q.get("token"), text: q.get("text"), lo: q.get("lo"), hi: q.get("hi"), limit: 50, hide_dense: hideDense() ? 1 : 0 };
  const res = await load(r, "search", params);
  const rows = res.results.map((x) => h("tr", { class: x.dense ? "is-dense" : "" },
    h("td", {}, h("a", { href: latentHref(res.sae, x.latent), class: "latent-link" }, `#${x.latent}`), " ", denseBadge(x.dense)),
    h("td", { class: "num" }, pct(x.freq)), h("td", { class: "num" }, fmt(x.max_act)), h("td", { class: "num" }, fmt(x.mean_layer, 2)),
    h("td", { class: "muted" }, x.why || ""), h("td", { class: "tok ex" }, tokText(x.text))));
  const what = q.get("token") ? `on token ${show(q.get("token"))}` : q.get("text") ? `with ${JSON.stringify(q.get("text"))} in their best examples` : q.get("lo") || q.get("hi") ? "by mean layer" : "most active first";
  $("#results").replaceChildren(
    h("div", { class: "inline" }, h("p", { class: "muted", id: "result-count" }, `${res.results.length} latent(s) ${what}` + (res.hidden_dense ? ` · ${res.hidden_dense} dense hidden` : "")),
      denseToggle(() => render())),
    res.results.length ? h("div", { class: "scroll" }, h("table", {}, h("tr", {}, ["latent", "active on (share of tokens)", "max activation", "mean layer", "why", q.get("token") || q.get("text") ? "an example containing it" : "best example"].map((t) => h("th", {}, t))), rows))
      : h("p", { class: "empty", id: "empty-why" }, res.empty || "nothing found"));
}

// ---------------------------------------------------------------- latent

// the layers at which a position is among the latent's top examples, as a strip of cells
function layerBar(fires, layers, max) {
  const cell = 6;
  const g = svg("svg", { class: "layerbar", width: layers.length * cell, height: 12, role: "img", "aria-label": "layers it fires at" });
  layers.forEach((l, i) => {
    const v = fires[String(l)];
    const r = svg("rect", { x: i * cell, y: 0, width: cell - 1, height: 12, fill: v ? heatColor(v, max) : "#eef0f4", stroke: v ? "#d08010" : "none", "stroke-width": 0.5 });
    r.append(svg("title", {}, v ? `L${l}: ${fmt(v)}` : `L${l}: not among its top examples`));
    g.append(r);
  });
  return g;
}

function exampleRow(e, s, j, max, layers) {
  const href = `#/prompt?` + new URLSearchParams({ sae: s, latent: j, layer: e.layer, pos: e.prompt_at, text: e.prompt });
  const strip = h("span", { class: "tokens" }, tokenSpans(e.tokens, e.acts, e.at, max));
  const more = h("button", { class: "small expand", title: "show 32 tokens either side", onclick: async (ev) => {
    ev.stopPropagation();
    more.disabled = true;
    try {
      const c = await api("context", { sae: s, pos: e.pos, w: 32 });
      const off = c.at - e.at;  // long index of the stored window's first token
      const acts = c.tokens.map((_, i) => (i - off >= 0 && i - off < e.acts.length ? e.acts[i - off] : null));
      strip.replaceChildren(...tokenSpans(c.tokens, acts, c.at, max));
      strip.classList.add("expanded");
      more.remove();
    } catch (err) { more.disabled = false; showError(err.message); }
  } }, "⋯ more context");
  const fires = e.fires ? h("span", { class: "fires", title: "layers where this token is among the latent's top examples" }, layerBar(e.fires, layers, max), ` ${Object.keys(e.fires).length} layer(s)`) : null;
  return h("div", { class: "example", onclick: () => go(href), title: "open in the prompt page" },
    h("span", { class: "meta" }, `L${e.layer} · ${fmt(e.act)}` + (e.band !== null && e.band !== undefined ? ` · Q${e.band + 1}` : ""), fires ? h("br") : null, fires),
    strip, more);
}

async function pageLatent(r) {
  const s = r.parts.length ? +r.parts[0] : saeId();
  if (s !== saeId()) $("#sae").value = s;
  const j = r.parts.length > 1 ? +r.parts[1] : 0;
  const layer = r.q.get("layer");
  const d = await load(r, "latent", { sae: s, latent: j, layer });
  const max = d.max_act || 1;
  const N = sae().n_tokens;
  const jump = h("input", { type: "number", min: 0, max: sae().d_sae - 1, value: j, id: "jump" });
  const head = h("div", { class: "card" },
    h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); go(latentHref(s, jump.value)); } },
      h("h2", {}, `Latent ${j}`), denseBadge(d.dense), h("span", { class: "muted" }, INFO.saes[s].label), jump, h("button", {}, "Go"),
      d.graph ? h("a", { href: `#/graph?layer=${d.layers[0]}&feature=${j}` }, "see across layers") : null,
      h("a", { href: `#/prompt?sae=${s}&latent=${j}` }, "try a prompt")),
    h("div", { class: "stats" },
      h("div", { class: "stat" }, h("b", {}, pct(d.freq)), h("span", {}, `active on ${int(d.n_active)} of ${int(N)} tokens`)),
      h("div", { class: "stat" }, h("b", {}, fmt(d.max_act)), h("span", {}, "max activation")),
      h("div", { class: "stat" }, h("b", {}, fmt(d.mean_act)), h("span", {}, "mean activation when active")),
      h("div", { class: "stat" }, h("b", {}, fmt(d.mean_layer, 2)), h("span", {}, `mean layer (sd ${fmt(d.var_layer === null ? null : Math.sqrt(d.var_layer), 2)})`))),
    d.dense ? h("p", { class: "muted" }, `Dense: active on more than ${pct(d.dense_share)} of tokens; its examples say little about what it stands for.`) : null);
  const edges = INFO.hist_edges;
  const hb = d.hist.length ? [Math.max(0, d.hist[0][0] - 1), Math.min(edges.length - 2, d.hist[d.hist.length - 1][0] + 1)] : [0, 0];
  const hv = [], hl = [];
  const hm = Object.fromEntries(d.hist);
  for (let b = hb[0]; b <= hb[1]; b++) { hv.push(hm[b] || 0); hl.push(fmt(edges[b], 2)); }
  const charts = h("div", { class: "grid" },
    h("div", { class: "card", id: "layer-dist" }, h("h3", {}, "Layer distribution P(layer | latent)"),
      barChart(d.layer_dist.map((v) => v || 0), d.layers.map(String), { title: "layer distribution", x: "layer (block)", y: "P(layer)", yfmt: (v) => fmt(v, 2) }),
      h("h3", {}, "Firing frequency per layer"),
      barChart(d.layer_count.map((c) => c / N), d.layers.map(String), { color: "#5b8fd9", height: 70, title: "frequency per layer", x: "layer (block)", y: "share", yfmt: pct })),
    h("div", { class: "card" }, h("h3", {}, "Activation histogram (log bins, all layers)"),
      barChart(hv, hl, { title: "activation histogram", color: "#7a5bd9", x: "activation (bin's lower edge)", y: "count", yfmt: int })),
    h("div", { class: "card" }, h("h3", {}, "Logit effects (decoder direction through final norm and unembedding)"),
      INFO.model == null ? h("p", { class: "muted", id: "no-logits" }, "no model: logit effects not computed") : h("table", { id: "logits" }, h("tr", {}, h("th", {}, "promotes"), h("th", { class: "num" }, "Δ logit"), h("th", {}, "suppresses"), h("th", { class: "num" }, "Δ logit")),
        d.logit_pos.map((p, i) => h("tr", {}, h("td", { class: "tok" }, tokText(p.token)), h("td", { class: "num" }, fmt(p.value)),
          h("td", { class: "tok" }, tokText(d.logit_neg[i].token)), h("td", { class: "num" }, fmt(d.logit_neg[i].value)))))),
    h("div", { class: "card" }, h("h3", {}, "Tokens of its top examples"),
      d.top_tokens.map((t) => h("span", { class: "pill tokpill", title: `max activation ${fmt(t.max)}` }, tokText(t.token), ` ×${int(t.n)}`)),
      h("h3", {}, "Neighbours by decoder cosine"),
      h("table", {}, h("tr", {}, h("th", {}, "latent"), h("th", { class: "num" }, "cosine"), h("th", {}, "best example")),
        d.neighbours.map((n) => h("tr", {}, h("td", {}, h("a", { href: latentHref(s, n.latent) }, `#${n.latent}`), " ", denseBadge(n.dense)),
        h("td", { class: "num" }, fmt(n.cos)), h("td", { class: "tok muted", title: n.text || "" }, (n.text || "").slice(0, 34)))))));
  const tabs = h("div", { class: "layer-tabs" },
    h("button", { class: layer === null ? "on" : "", onclick: () => go(latentHref(s, j)) }, "all layers"),
    d.layers.filter((l, i) => d.layer_count[i] > 0).map((l) => h("button", { class: String(l) === layer ? "on" : "", onclick: () => go(latentHref(s, j, l)) }, `L${l}`)));
  const multi = layer === null && d.layers.length > 1;
  const top = h("div", { class: "card", id: "top-examples" }, h("h3", {}, `Top examples ${layer === null ? "over all layers" : "at layer " + layer}`), tabs,
    multi ? h("p", { class: "muted" }, "One row per token position, at its strongest layer; the bar marks the layers where that token is among the latent's top examples. Activations are stored for the highlighted window; “more context” fetches the surrounding text.") : null,
    d.top.length ? d.top.map((e) => exampleRow(e, s, j, max, d.layers)) : h("p", { class: "muted" }, "never active on the indexed tokens"));
  const bands = [3, 2, 1, 0].map((b) => d.quantile.filter((e) => e.band === b));
  const quant = h("div", { class: "card", id: "quantile-examples" }, h("h3", {}, "Examples by activation quartile (uniform sample of its activations)"),
    bands.map((es, i) => es.length ? [h("div", { class: "muted" }, `quartile ${4 - i}`), es.reverse().map((e) => exampleRow(e, s, j, max, d.layers))] : null));
  main().replaceChildren(head, charts, top, quant);
}

// ---------------------------------------------------------------- prompt

function distTable(title, rows, kl, id) {
  const delta = rows.length && rows[0].base !== undefined;
  return h("div", { id }, h("h3", {}, title + (kl !== undefined ? ` (KL ${fmt(kl, 4)} nats)` : "")),
    h("table", { class: "dist" }, h("tr", {}, h("th", {}, "token"), h("th", { class: "num" }, "p"), delta ? [h("th", { class: "num" }, "model p"), h("th", { class: "num" }, "Δp")] : null, h("th", {}, "")),
      rows.map((r) => h("tr", {}, h("td", { class: "tok" }, tokText(r.token)), h("td", { class: "num" }, fmt(r.p, 4)),
        delta ? [h("td", { class: "num" }, fmt(r.base, 4)), h("td", { class: "num " + (r.p >= r.base ? "up" : "down") }, (r.p >= r.base ? "+" : "") + fmt(r.p - r.base, 4))] : null,
        h("td", { class: "p" }, h("span", { class: "bar", style: `width:${(150 * r.p).toFixed(1)}px` }))))));
}

const EXAMPLE_PROMPT = "The capital of France is Paris, and the capital of Italy is";

function latentButton(j, dense, pick) {
  return h("span", {}, h("a", { href: "#", class: "latent-pick", "data-latent": j, title: "show this latent's heatmap", onclick: (e) => { e.preventDefault(); pick(j); } }, `#${j}`), " ", denseBadge(dense));
}

async function pagePrompt(r) {
  const q = r.q;
  const s = q.has("sae") ? +q.get("sae") : saeId();
  if (s !== saeId()) $("#sae").value = s;
  const S = INFO.saes[s];
  const multi = S.layers.length > 1;
  const text = h("textarea", { id: "prompt-text", placeholder: `Your text, e.g. “${EXAMPLE_PROMPT}”` }, q.get("text") || "");
  const count = h("span", { id: "prompt-count", class: "muted" });
  const counted = () => {
    const n = text.value.length;
    count.textContent = `${int(n)} / 2,000 characters · at most ${INFO.max_tokens} tokens`;
    count.classList.toggle("over", n > 2000);
  };
  text.addEventListener("input", counted);
  counted();
  const latent = h("input", { type: "number", id: "prompt-latent", min: 0, max: S.d_sae - 1, value: q.get("latent") || "", placeholder: "strongest" });
  const layer = h("select", { id: "prompt-layer" }, S.layers.map((l) => h("option", { value: l, selected: String(l) === (q.get("layer") || String(S.layers[S.layers.length - 1])) }, `L${l}`)));
  const steer = h("input", { type: "number", id: "prompt-steer", min: 0, max: S.d_sae - 1, value: q.get("steer") || "", placeholder: "latent" });
  const units = h("select", { id: "prompt-units" }, h("option", { value: "max", selected: q.get("units") !== "raw" }, "× its max activation"), h("option", { value: "raw", selected: q.get("units") === "raw" }, "× decoder row (raw)"));
  const factor = h("input", { type: "number", id: "prompt-factor", step: "any", value: q.get("factor") || "1" });
  const limit = () => (units.value === "raw" ? 1000 : 100);
  const limitNote = h("span", { class: "muted", id: "factor-limit" });
  const setLimit = () => { factor.min = -limit(); factor.max = limit(); limitNote.textContent = `(−${limit()} to ${limit()})`; };
  units.addEventListener("change", setLimit);
  setLimit();
  const where = h("select", { id: "prompt-steer-where" }, h("option", { value: "" }, "at the chosen layer"), multi ? h("option", { value: "all", selected: q.get("steer_layers") === "all" }, "at all the SAE's layers") : null,
    h("option", { value: "custom", selected: !!q.get("steer_layers") && q.get("steer_layers") !== "all" }, "at layers…"));
  const custom = h("input", { id: "prompt-steer-layers", placeholder: "e.g. 4,5,6", value: q.get("steer_layers") && q.get("steer_layers") !== "all" ? q.get("steer_layers") : "", size: 10 });
  const gen = h("input", { type: "number", id: "prompt-gen", min: 0, max: 32, value: q.get("gen") || "8" });
  const steerLayers = () => (where.value === "all" ? "all" : where.value === "custom" ? custom.value.replace(/\s+/g, "") : "");
  const params = (extra = {}) => {
    const p = { sae: s, text: text.value, latent: latent.value, layer: layer.value, ...extra };
    if (steer.value !== "") Object.assign(p, { steer: steer.value, factor: factor.value, units: units.value, steer_layers: steerLayers(), gen: gen.value });
    for (const k of Object.keys(p)) if (p[k] === "" || p[k] === null || p[k] === undefined) delete p[k];
    return new URLSearchParams(p);
  };
  // Run keeps the chosen token while the text is unchanged
  const run = (e, extra = {}) => {
    if (e) e.preventDefault();
    if (!text.value.trim()) {  // said here, not refilled
      out.replaceChildren(h("div", { class: "card page-error", id: "page-error" }, "the prompt is empty: type or paste some text"));
      document.body.dataset.page = "prompt-error";
      return;
    }
    const keepPos = q.get("pos") !== null && text.value === (q.get("text") || "") ? { pos: q.get("pos") } : {};
    go("#/prompt?" + params({ ...keepPos, ...extra }));
  };
  const out = h("div", { id: "prompt-out" });
  const form = h("form", { class: "card", id: "prompt-form", onsubmit: (e) => run(e) },
    h("h2", {}, "Prompt"), text,
    h("div", { class: "inline" }, count, h("button", { type: "button", class: "small plain", onclick: () => { text.value = EXAMPLE_PROMPT; counted(); } }, "use the example")),
    h("div", { class: "inline form" },
      h("label", { title: "empty: the strongest latent at the chosen token" }, "latent ", latent), h("label", {}, " layer ", layer),
      h("button", { id: "prompt-run" }, "Run")),
    h("div", { class: "inline form steer-form" }, h("b", {}, "Steer"), h("label", {}, "latent ", steer), h("label", {}, " factor ", factor), units, limitNote, where, custom,
      h("label", {}, " generate ", gen, " tokens")),
    h("p", { class: "muted" }, `The model runs live on your text (at most 2,000 characters and ${INFO.max_tokens} tokens). Click a token or a heatmap cell to choose it; click a latent id to show its heatmap.`));
  main().replaceChildren(form, out);
  if (!q.get("text")) return;
  out.replaceChildren(h("p", { class: "muted", id: "prompt-running" }, "running the model…"));
  let d;
  try {
    d = await load(r, "prompt", Object.fromEntries(params(q.get("pos") !== null ? { pos: q.get("pos") } : {})));
  } catch (e) {
    if (e === STALE) throw e;
    out.replaceChildren(h("div", { class: "card page-error", id: "page-error" }, e.message));
    throw e;
  }
  renderPrompt(d, s, out, { latent, run, q });
}

function renderPrompt(d, s, out, { latent, run, q }) {
  const L = d.layers, li = L.indexOf(d.layer);
  const dense = new Set(d.dense);
  const col = d.heatmap.map((row) => row[li]);
  const max = Math.max(1e-9, ...d.heatmap.flat());
  if (latent.value === "") latent.placeholder = `${d.latent} (strongest)`;
  const pick = (i, l) => run(null, { pos: i, ...(l !== undefined ? { layer: l } : {}) });
  const pickLatent = (j) => run(null, { latent: j, pos: d.pos });
  const hide = hideDense();
  const keep = (j) => !(hide && dense.has(j));
  const toks = h("div", { class: "card" }, h("h3", {}, `Latent ${d.latent} at layer ${d.layer} on each token`, " ", denseBadge(dense.has(d.latent))),
    h("div", { id: "prompt-tokens", class: "strip" }, tokenSpans(d.tokens, col, -1, max, { sel: d.pos, used: d.used, onclick: (i) => pick(i) })),
    colorScale(max, `activation of latent ${d.latent}`));
  const heat = h("div", { class: "scroll" }, h("table", { class: "heat", id: "prompt-heatmap" },
    h("tr", {}, h("th", {}, "layer"), d.tokens.map((t, i) => h("th", {}, h("div", { class: "rot", title: show(t) }, show(t).slice(0, 10))))),
    L.map((l, p) => h("tr", {}, h("th", {}, `L${l}`), d.heatmap.map((row, i) => h("td", {
      class: (i === d.pos ? "selcol" : "") + (l === d.layer && i === d.pos ? " selcell" : ""),
      style: `background:${heatColor(row[p], max)}`, title: `token ${i} ${show(d.tokens[i])} · latent ${d.latent} · L${l}: ${fmt(row[p], 4)}`, onclick: () => pick(i, l),
    }))))));
  const topRows = d.top_at.filter(([j]) => keep(j));
  const topMax = Math.max(1e-9, ...d.top_at.map((x) => x[1]));
  const topAt = h("div", {}, h("h3", {}, `Top latents at token ${d.pos} (${show(d.tokens[d.pos])}), layer ${d.layer}`),
    topRows.length ? h("table", { id: "top-at" }, h("tr", {}, h("th", {}, "latent"), h("th", { class: "num" }, "activation"), h("th", {}, "")),
      topRows.map(([j, a]) => h("tr", { class: j === d.latent ? "on" : "" }, h("td", {}, latentButton(j, dense.has(j), pickLatent), " ", h("a", { href: latentHref(s, j, d.layer), class: "muted" }, "page")),
        h("td", { class: "num" }, fmt(a)), h("td", {}, h("span", { class: "bar", style: `width:${(120 * a / topMax).toFixed(1)}px` })))))
      : h("p", { class: "muted" }, d.top_at.length ? "only dense latents here (hidden)" : "no latent (special token)"));
  out.replaceChildren(toks,
    h("div", { class: "two" }, h("div", { class: "card" }, h("h3", {}, `Latent ${d.latent}: tokens × layers`), heat, colorScale(max, "activation")), h("div", { class: "card" }, topAt, denseToggle(() => renderPrompt(d, s, out, { latent, run, q })))),
    tokenLatents(d, dense, keep, pickLatent),
    nextCard(d),
    h("div", { class: "card" }, promptLatents(d, dense, keep, pickLatent)));
  const cell = heat.querySelector("td.selcell");  // keep the chosen cell in view
  if (cell) heat.scrollLeft = Math.max(0, cell.offsetLeft - heat.clientWidth / 2);
}

// the latents x layers table at the chosen token, with a threshold and hover previews
function tokenLatents(d, dense, keep, pickLatent) {
  const L = d.layers, at = d.at_token;
  const thr = h("input", { type: "number", id: "at-threshold", step: "any", min: 0, value: localStorage.getItem("mlsae-thr") || "0" });
  const amax = Math.max(1e-9, ...at.matrix.flat());
  const body = h("div", { class: "scroll" });
  const draw = () => {
    localStorage.setItem("mlsae-thr", thr.value);
    const t = +thr.value || 0;
    const rows = at.latents.map((j, r) => [j, at.matrix[r]]).filter(([j, v]) => keep(j) && Math.max(...v) > t);
    body.replaceChildren(rows.length ? h("table", { class: "heat", id: "token-latents" }, h("tr", {}, h("th", {}, "latent"), L.map((l) => h("th", {}, String(l)))),
      rows.map(([j, v]) => h("tr", {}, h("th", {}, latentButton(j, dense.has(j), pickLatent)),
        v.map((a, p) => h("td", { style: `background:${a > t ? heatColor(a, amax) : "transparent"}`, title: `token ${d.pos} ${show(d.tokens[d.pos])} · latent ${j} · L${L[p]} · activation ${fmt(a, 4)}` })))))
      : h("p", { class: "muted" }, "no latent above the threshold"));
  };
  thr.addEventListener("input", draw);
  draw();
  return h("div", { class: "card", id: "token-latents-card" }, h("h3", {}, `Latents at token ${d.pos} (${show(d.tokens[d.pos])}) × layers`),
    h("div", { class: "inline" }, h("label", {}, "show activations above ", thr), colorScale(amax, "activation")), body);
}

function promptLatents(d, dense, keep, pickLatent) {
  const L = d.layers, tp = d.top_prompt, tmax = Math.max(1e-9, ...tp.matrix.flat());
  const rows = tp.latents.map((j, r) => [j, r]).filter(([j]) => keep(j));
  return h("div", {}, h("h3", {}, "Latents most active on the prompt × layer (summed over tokens, with mean layer)"),
    h("div", { class: "scroll" }, h("table", { class: "heat", id: "prompt-latents" }, h("tr", {}, h("th", {}, "latent"), L.map((l) => h("th", {}, String(l))), h("th", {}, "mean layer")),
      rows.map(([j, r]) => h("tr", {}, h("th", {}, latentButton(j, dense.has(j), pickLatent)),
        tp.matrix[r].map((v, p) => h("td", { style: `background:${heatColor(v, tmax)}`, title: `latent ${j} · L${L[p]} · summed activation ${fmt(v, 4)}` })),
        h("td", { class: "num" }, fmt(tp.mean_layer[r], 2)))))), colorScale(tmax, "activation summed over the prompt's tokens"));
}

function nextCard(d) {
  const n = d.next, st = d.steer;
  if (n.pos === null) return h("div", { class: "card" }, h("p", { class: "muted" }, "no next-token prediction from a special token"));
  const steerTitle = st ? `steered: ${st.factor} × ${st.units === "max" ? `max activation (${fmt(st.max_act)})` : "decoder row"} of latent ${st.latent} at ${st.layers.length > 1 ? `${st.layers.length} layers` : "L" + st.layers[0]}` : "";
  return h("div", { class: "card", id: "next-token" }, h("h3", {}, `Next token after position ${n.pos} (${show(d.tokens[n.pos])})`),
    h("div", { class: "grid" }, distTable("model", n.clean), distTable(`reconstruction spliced at L${d.layer}`, n.spliced, n.kl_spliced),
      n.steered ? distTable(steerTitle, n.steered, n.kl_steered, "steered-dist") : h("p", { class: "muted" }, "give a steering latent and factor to steer")),
    n.norms ? h("div", { id: "steer-norms" }, h("h3", {}, "Size of the steering vector"),
      h("table", {}, h("tr", {}, h("th", {}, "layer"), h("th", { class: "num" }, "mean residual norm ‖x‖"), h("th", { class: "num" }, "mean added norm ‖v‖"), h("th", { class: "num" }, "‖v‖ / ‖x‖")),
        n.norms.map((r) => h("tr", {}, h("td", {}, `L${r.layer}`), h("td", { class: "num" }, fmt(r.resid)), h("td", { class: "num" }, fmt(r.added)), h("td", { class: "num" }, fmt(r.added / r.resid, 3)))))) : null,
    n.gen_clean ? h("div", { id: "generations" }, h("h3", {}, `Greedy continuation (${n.gen_clean.length} / ${n.gen_steered.length} tokens)`),
      h("table", {}, h("tr", {}, h("td", {}, h("b", {}, "model")), h("td", { class: "gen", id: "gen-clean" }, tokenSpans(n.gen_clean, null, -1, 1))),
        h("tr", {}, h("td", {}, h("b", {}, "steered")), h("td", { class: "gen", id: "gen-steered" }, tokenSpans(n.gen_steered, null, -1, 1))))) : null,
    n.compare ? h("div", {}, h("h3", {}, "Biggest changes under steering"), h("table", { id: "steer-compare" }, h("tr", {}, h("th", {}, ""), h("th", {}, "token"), h("th", { class: "num" }, "model p"), h("th", { class: "num" }, "steered p"), h("th", { class: "num" }, "Δp")),
      n.compare.map((c) => h("tr", {}, h("td", {}, c.dir === "up" ? "▲" : "▼"), h("td", { class: "tok" }, tokText(c.token)), h("td", { class: "num" }, fmt(c.clean, 4)), h("td", { class: "num" }, fmt(c.steered, 4)),
        h("td", { class: "num " + (c.steered >= c.clean ? "up" : "down") }, (c.steered >= c.clean ? "+" : "") + fmt(c.steered - c.clean, 4)))))) : null);
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
    h("p", { class: "muted" }, `${int(G.n_nodes)} features on layers ${G.layers[0]}–${G.layers[G.layers.length - 1]}, ${int(G.n_edges)} edges (${G.edge_measure}), ${int(G.n_communities)} communities (${G.community_method}); pass-through: Pearson ≥ ${G.pass_through}`),
    h("div", { class: "inline form" }, "layer", inputs.layer, "feature", inputs.feature, "layers before", inputs.back, "after", inputs.fwd,
      `min ${G.edge_measure}`, inputs.min, "per layer", inputs.per_layer, h("button", {}, "Show")));
  main().replaceChildren(form);
  if (!q.get("layer")) {
    const d = await load(r, "graph", {});
    main().append(h("div", { class: "card" }, h("h3", {}, "Start from a strongly linked feature"),
      d.starts.map((n) => h("a", { class: "pill", href: `#/graph?layer=${n.layer}&feature=${n.feature}` }, `L${n.layer}:${n.feature}`))));
    return;
  }
  const d = await load(r, "graph", Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value])));
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
    c.size > 1 ? barChart(G.layers.map((l) => c.layers[l] || 0), G.layers.map(String), { height: 60, title: "community members per layer", color: "#5b8fd9", x: "layer (block)", y: "features", yfmt: int }) : null,
    h("div", {}, c.members.slice(0, 30).map((n) => h("a", { class: "pill", href: `#/graph?layer=${n.layer}&feature=${n.feature}` }, `L${n.layer}:${n.feature}`))));
  const legend = h("div", { class: "legend", id: "graph-legend" },
    [["#c0392b", "this feature"], ["#f0a030", "its pass-through chain"], ["#1f5fbf", "same community"], ["#9aa1ae", "other"]].map(([c, t]) => h("span", {}, h("span", { class: "dot", style: `background:${c}` }), t)),
    h("span", { class: "muted" }, `columns: layers (left to right) · edge width: ${G.edge_measure} · labels: top tokens of its examples (hover a node for all)`));
  main().append(h("div", { class: "two" }, h("div", { class: "card" }, cyBox, legend), h("div", {}, panel, chain, commCard)));
  const byLayer = {};
  const els = [];
  const tokLabel = (n) => (n.top_tokens && n.top_tokens.length ? n.top_tokens.slice(0, 2).map(show).join(" ") : "");
  for (const n of d.nodes) {
    const row = (byLayer[n.layer] = (byLayer[n.layer] || 0) + 1);
    const color = n.id === d.focus.id ? "#c0392b" : chainIds.has(n.id) ? "#f0a030" : n.community === comm && comm >= 0 ? "#1f5fbf" : "#9aa1ae";
    els.push({ data: { id: "n" + n.id, label: `L${n.layer}:${n.feature}` + (tokLabel(n) ? `\n${tokLabel(n)}` : ""), color, raw: n }, position: { x: G.layers.indexOf(n.layer) * 170, y: row * 52 } });
  }
  for (const e of d.edges) els.push({ data: { id: `e${e.source}_${e.target}`, source: "n" + e.source, target: "n" + e.target, w: e.weight } });
  if (typeof cytoscape !== "function") { cyBox.textContent = "graph library missing"; return; }
  const cy = cytoscape({ container: cyBox, elements: els, layout: { name: "preset" }, wheelSensitivity: 0.3,
    style: [
      { selector: "node", style: { "background-color": "data(color)", label: "data(label)", "font-size": 10, width: 14, height: 14, color: "#333", "text-wrap": "wrap", "text-max-width": 150, "min-zoomed-font-size": 7, "text-background-color": "#fff", "text-background-opacity": 0.8 } },
      { selector: "node:selected, node.hover", style: { "font-size": 12, "z-index": 10, "min-zoomed-font-size": 0 } },
      { selector: "edge", style: { width: "mapData(w, 0, 1, 0.5, 5)", "line-color": "#b9c2d3", "curve-style": "bezier" } },
    ] });
  cy.fit(undefined, 30);
  cy.on("mouseover", "node", (ev) => ev.target.addClass("hover"));
  cy.on("mouseout", "node", (ev) => ev.target.removeClass("hover"));
  cyBox.dataset.drawn = String(d.nodes.length);
  const describe = (n, extra) => [h("h3", {}, `Layer ${n.layer}, feature ${n.feature}`),
    n.top_tokens && n.top_tokens.length ? h("p", { class: "node-tokens" }, "top tokens: ", n.top_tokens.map((t) => h("span", { class: "pill tokpill" }, tokText(t)))) : null,
    h("p", {}, `community ${n.community} (${int(n.community_size)} features) · active on ${pct(n.density)} of tokens` + (extra || "")), h("p", {}, nodeLink(n))];
  cy.on("tap", "node", (ev) => {
    const n = ev.target.data("raw");
    panel.replaceChildren(...describe(n), h("p", {}, h("a", { href: `#/graph?${new URLSearchParams({ ...Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value])), layer: n.layer, feature: n.feature })}` }, "centre here")));
  });
  const focus = d.nodes.find((n) => n.id === d.focus.id);
  panel.replaceChildren(...describe(focus, ` · ${d.nodes.length} features shown`));
}

// ---------------------------------------------------------------- boot

const PAGES = { search: pageSearch, latent: pageLatent, prompt: pagePrompt, graph: pageGraph };

async function render() {
  const r = route();
  r.ticket = ++RENDER;
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === r.page));
  const fn = PAGES[r.page] || pageSearch;
  if (r.q.has("sae") && INFO.saes[+r.q.get("sae")]) $("#sae").value = r.q.get("sae");
  $(".sae-pick").hidden = r.page === "graph";  // the graph names its own layers' SAEs
  document.body.dataset.page = r.page + "-loading";
  showError("");
  try {
    await fn(r);
    if (r.ticket === RENDER) document.body.dataset.page = r.page;
  } catch (e) {
    if (e === STALE || r.ticket !== RENDER) return;
    // an error replaces the page's old content (the prompt page keeps your text) and stays
    // until the next action
    if (r.page !== "prompt") main().replaceChildren(h("div", { class: "card page-error", id: "page-error" }, e.message));
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
  $("#run").textContent = `${INFO.run} · ${INFO.model ?? "no model (synthetic activations)"} · ${int(INFO.saes[0].n_tokens)} indexed tokens`;
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
