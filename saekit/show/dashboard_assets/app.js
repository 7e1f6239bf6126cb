// The dashboard: a sortable, searchable table of every live latent, and one latent's view.
// The table's rows are embedded in the page; a latent's details and the texts its examples point
// into live in script files beside the page (FILES/latents-N.js, FILES/texts.js), loaded when first
// needed with <script> elements, which browsers allow from disk where fetch() is refused.
// Text reaches the DOM only through textContent / append(string), never as markup.
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const latents = data.rows.map(row => Object.fromEntries(data.columns.map((key, i) => [key, row[i]])));
const byIndex = new Map(latents.map(l => [l.index, l]));
const search = document.getElementById("search");
const tbody = document.querySelector("#latents tbody");
const more = document.getElementById("more");
const view = document.getElementById("view");
const SHADE = "255, 127, 14";
const PAGE = 500;  // rows drawn at once; the rest on request, so thousands of latents open fast
const fmt = {
  int: v => String(v),
  text: v => v ?? "",
  score: v => v == null ? "–" : v.toFixed(2),
  share: v => (100 * v).toPrecision(3) + "%",
  value: v => v.toPrecision(3),
};
const columns = [
  ["index", "latent", "int"], ["label", "label", "text"], ["f1", "F1", "score"],
  ["f1_low", "F1 95% low", "score"], ["support", "support", "int"], ["name", "name", "text"],
  ["frequency", "frequency", "share"], ["max_activation", "max act.", "value"],
];
let sortKey = "f1_low", sortDesc = true, selected = null, shown = PAGE;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function matches(l, q) {
  return !q || String(l.index) === q || l.label.toLowerCase().includes(q) || (l.name || "").toLowerCase().includes(q);
}

function compare(a, b) {  // missing values sort last in either direction
  if (a == null || b == null) return (a == null) - (b == null);
  const order = typeof a === "string" ? a.localeCompare(b) : a - b;
  return sortDesc ? -order : order;
}

function renderTable() {
  const q = search.value.trim().toLowerCase();
  const rows = latents.filter(l => matches(l, q)).sort((a, b) => compare(a[sortKey], b[sortKey]) || a.index - b.index);
  const fragment = document.createDocumentFragment();
  for (const l of rows.slice(0, shown)) {
    const tr = el("tr", {"data-latent": l.index}, ...columns.map(([key, , kind]) =>
      el("td", {class: kind === "text" ? (key === "label" && !l.explained ? "unexplained" : "") : "num"},
         fmt[kind](l[key]))));
    if (l.index === selected) tr.classList.add("selected");
    fragment.append(tr);
  }
  tbody.replaceChildren(fragment);
  more.hidden = rows.length <= shown;
  more.textContent = `show ${Math.min(PAGE, rows.length - shown)} more`;
  document.getElementById("count").textContent =
    `${rows.length} of ${latents.length} live latents` + (rows.length > shown ? `, first ${shown} shown` : "");
  for (const th of document.querySelectorAll("#latents th"))
    th.setAttribute("aria-sort", th.dataset.key === sortKey ? (sortDesc ? "descending" : "ascending") : "none");
  return rows;
}

// --- a latent's files, loaded on demand ---------------------------------------------------------

const received = {texts: null, latents: new Map()};
const loading = new Map();
window.saeDashboard = (kind, chunk, payload) => {
  if (kind === "texts") received.texts = payload; else received.latents.set(chunk, payload);
};

function load(src) {
  if (!loading.has(src)) loading.set(src, new Promise((resolve, reject) => {
    const script = el("script", {src});
    script.onload = resolve;
    script.onerror = () => reject(new Error(`cannot read ${src}: keep the folder ${data.files} beside this page`));
    document.head.append(script);
  }));
  return loading.get(src);
}

async function detail(index) {
  const chunk = Math.floor(index / data.chunk);
  await Promise.all([load(`${data.files}/texts.js`), load(`${data.files}/latents-${chunk}.js`)]);
  return received.latents.get(chunk)[index];
}

// --- one latent's view ---------------------------------------------------------------------------

const score = v => v == null ? "–" : v.toFixed(2);

function contextRow(example, maxActivation, context, isPeak) {
  const [doc, pos, pairs] = example;  // the score is the activation at the peak
  const tokens = received.texts.tokens[doc];
  const acts = new Map(pairs || []);
  const spans = [];
  for (let p = Math.max(0, pos - context); p < Math.min(tokens.length, pos + context + 1); p++) {
    const act = acts.get(p) || 0;
    const text = received.texts.vocab[tokens[p]].replaceAll("\n", "↵");
    const span = el("span", {class: isPeak && p === pos ? "sae-tok sae-peak" : "sae-tok",
                             title: String(+act.toPrecision(4))}, text);
    if (act > 0) span.style.background = `rgba(${SHADE}, ${Math.min(1, act / maxActivation).toFixed(2)})`;
    spans.push(span);
  }
  return el("div", {class: "sae-ex"}, el("span", {class: "score"}, String(+(acts.get(pos) || 0).toPrecision(3))),
            el("span", {class: "sae-ctx"}, ...spans));
}

function histogram(h, width = 300, height = 80) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const top = Math.max(...h.counts), bar = width / h.counts.length;
  const steps = h.counts.map(c => `V${(height - height * c / top).toFixed(1)}h${bar.toFixed(1)}`).join("");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height + 16);
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", `M0 ${height}${steps}V${height}Z`);
  path.setAttribute("fill", "#1f77b4");
  svg.append(path);
  for (const [x, y, anchor, text] of [[0, height + 13, "start", h.low.toPrecision(3)],
                                      [width, height + 13, "end", h.high.toPrecision(3)],
                                      [width, 11, "end", `max ${top} tokens`]]) {
    const t = document.createElementNS(ns, "text");
    for (const [k, v] of Object.entries({x, y, "text-anchor": anchor, "font-size": 11})) t.setAttribute(k, v);
    t.textContent = text;
    svg.append(t);
  }
  return svg;
}

function lensList(title, pairs) {
  return el("div", {}, el("b", {}, title), el("ol", {}, ...pairs.map(([token, value]) =>
    el("li", {}, el("code", {}, token.replaceAll("\n", "↵")), " ",
       el("span", {class: "v"}, (value >= 0 ? "+" : "") + value.toFixed(2))))));
}

function latentView(index, d) {
  const label = d.label;
  const labelLine = el("span", {class: label.explained ? "" : "sae-unexplained"},
    `label ${label.text}` + (label.rule ? ` (${label.rule})` : "") +
    `: held-out F1 ${score(label.f1)} [${score(label.f1_low)}, ${score(label.f1_high)}] on ` +
    `${label.scoring_fires} firings, precision ${score(label.precision)}, recall ${score(label.recall)}; ` +
    `windows: detection ${score(label.detection)}, fuzzing ${score(label.fuzzing)}`);
  const lines = [labelLine];
  if (d.name) lines.push(el("br"), `name "${d.name.text}": detection ${score(d.name.detection)}, fuzzing ` +
    `${score(d.name.fuzzing)}; ` + data.name_verdicts[d.title_source === "name" ? 0 : 1]
      .replace("{lead}", score(d.name.lead_needed)));
  const [frequency, maxActivation, meanActivation] = d.stats;
  lines.push(el("br"), `fires on ${(100 * frequency).toPrecision(3)}% of tokens; activation max ` +
    `${maxActivation.toPrecision(3)}, mean when firing ${meanActivation.toPrecision(3)}`);
  const groups = [["top activations", d.top, true], [data.intervals_title, d.quantiles, true],
                  ["not activating", d.silent, false]];
  return [
    el("h3", {}, `latent ${index}: ${d.title}`), el("p", {class: "sae-stats"}, ...lines),
    el("div", {class: "sae-row"},
       el("div", {}, el("b", {}, "activation when firing"), el("br"), histogram(d.histogram)),
       el("div", {class: "sae-row sae-lens"}, ...(d.lens.promoted.length
         ? [lensList(data.output_side_titles[d.lens.method] + ": promotes", d.lens.promoted),
            lensList("suppresses", d.lens.suppressed)]
         : [el("div", {}, el("b", {}, data.output_side_titles[d.lens.method]))]))),
    ...groups.map(([title, examples, isPeak]) => el("div", {class: "sae-examples"}, el("b", {}, title),
      ` (${examples.length})`, ...examples.flatMap(e => [
        ...(e.length > 3 ? [el("div", {class: "sae-quantile"}, `interval ${e[3]}`)] : []),
        contextRow(e, maxActivation, data.meta.context_tokens, isPeak)]))),
  ];
}

async function showLatent(index) {
  selected = index;
  view.dataset.latent = index;
  for (const tr of tbody.children) tr.classList.toggle("selected", Number(tr.dataset.latent) === index);
  if (!byIndex.has(index)) {
    view.replaceChildren(el("p", {}, `Latent ${index} is dead (it never fired on the texts) or does not exist.`));
    return;
  }
  view.replaceChildren(el("p", {}, `loading latent ${index} …`));
  try {
    const d = await detail(index);
    if (selected === index) view.replaceChildren(...latentView(index, d));
    view.dataset.shownMs = performance.now().toFixed(1);  // since the page began loading
  } catch (error) {
    view.replaceChildren(el("p", {}, error.message));
  }
}

function applyHash() {
  const hash = decodeURIComponent(location.hash.slice(1));
  if (hash.startsWith("latent-")) {
    showLatent(Number(hash.slice(7)));
  } else if (hash.startsWith("search=")) {
    search.value = hash.slice(7);
    const rows = renderTable();
    if (rows.length === 1) showLatent(rows[0].index);
  }
}

const m = data.meta;
document.getElementById("meta").textContent =
  `${m.model_id} · ${m.layer_signature} · ${m.n_latents} latents, k = ${m.k} · ${m.n_texts} texts (${m.n_tokens} ` +
  `tokens) of ${m.source || m.dataset + " / " + m.split} (the evaluation texts) · labels chosen on ${m.n_texts - m.n_scoring_texts} texts, scored on the ` +
  `other ${m.n_scoring_texts} · ${m.created}`;
document.getElementById("naming").textContent = m.naming || "";
document.querySelector("#latents thead tr").append(...columns.map(([key, title]) => {
  const th = el("th", {"data-key": key}, title);
  th.addEventListener("click", () => {
    sortDesc = key === sortKey ? !sortDesc : !["label", "name", "index"].includes(key);
    sortKey = key;
    renderTable();
  });
  return th;
}));
tbody.addEventListener("click", event => {
  const tr = event.target.closest("tr");
  if (tr) location.hash = "latent-" + tr.dataset.latent;
});
more.addEventListener("click", () => { shown += PAGE; renderTable(); });
search.addEventListener("input", () => {
  shown = PAGE;
  history.replaceState(null, "", "#search=" + encodeURIComponent(search.value));
  renderTable();
});
window.addEventListener("hashchange", applyHash);
renderTable();
document.body.dataset.readyMs = performance.now().toFixed(1);  // the table is interactive from here
if (location.hash === "#bench") {  // bench/bench_dashboard.py: how long a sort by score takes
  const start = performance.now();
  document.querySelector('th[data-key="f1_low"]').click();
  document.body.dataset.sortMs = (performance.now() - start).toFixed(1);
} else {
  applyHash();
}
