"""Stage 05: show what the latents learned, in the notebook and as a standalone HTML dashboard.

Both read stage 04's store/concepts.json and store/top_texts.json. The notebook gets HTML strings
from `latent_html`; store/dashboard.html is one self-contained file (no server, no network) with
every live latent's data embedded as JSON and a small script that draws the table and a latent's
view in the browser. A latent's header, statistics, histogram and logit lens are rendered here,
once, for both; its token contexts, the bulk of the data, travel as numbers that the page draws,
which keeps the file several times smaller than pre-rendered spans would.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_text
from .errors import PipelineError
from .settings import Settings

CONCEPTS_FILE = "concepts.json"
TOP_TEXTS_FILE = "top_texts.json"
DASHBOARD_FILE = "dashboard.html"


@dataclass
class Concepts:
    """Stage 04's results: the run's metadata, each live latent's record, and its top examples."""

    meta: dict[str, Any]
    latents: dict[int, dict[str, Any]]
    top_texts: dict[int, list[dict[str, Any]]]

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def title(self, index: int) -> str:
        """The model-written name where there is one, else the deterministic label."""
        latent = self.latents[index]
        return latent.get("name") or latent["label"]

    def frequencies(self) -> np.ndarray:
        """Firing frequency of every latent, dead ones at 0."""
        freq = np.zeros(self.n_latents)
        for index, latent in self.latents.items():
            freq[index] = latent["frequency"]
        return freq


def load_concepts(settings: Settings) -> Concepts:
    """Stage 04's files from the store, checked against the model and layer in the settings."""
    store = settings.store
    paths = [store / CONCEPTS_FILE, store / TOP_TEXTS_FILE]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise PipelineError(f"{', '.join(missing)} missing from {store}. Run stage 04 first "
                            "(04_name_sae_concepts.ipynb): it finds "
                            "each latent's concepts and writes them there.")
    concepts = json.loads(paths[0].read_text())
    top_texts = json.loads(paths[1].read_text())
    meta = concepts["meta"]
    for key, setting in (("model_id", "MODEL_ID"), ("layer_signature", "LAYER_SIGNATURE")):
        if meta[key] != getattr(settings, setting):
            raise PipelineError(f"the concepts were found for {key} {meta[key]!r} but {setting} is "
                                f"{getattr(settings, setting)!r}. Run stage 04 with these settings, "
                                "or pass the ones it used.")
    return Concepts(meta, {int(i): latent for i, latent in concepts["latents"].items()},
                    {int(i): examples for i, examples in top_texts.items() if examples})


# --- tables ---------------------------------------------------------------------------------

def latent_rows(concepts: Concepts) -> list[dict[str, Any]]:
    """One row per live latent, most frequent first."""
    rows = [{"index": i, "label": l["label"], "name": l.get("name"), "label_score": l.get("label_score"),
             "name_score": l.get("name_score"), "frequency": l["frequency"], "max_activation": l["max_activation"],
             "mean_activation": l["mean_activation"]} for i, l in concepts.latents.items()]
    return sorted(rows, key=lambda r: (-r["frequency"], r["index"]))


def peak_tokens(concepts: Concepts, top: int = 20) -> list[dict[str, Any]]:
    """The tokens that most often carry a latent's peak among the top examples, with their mean score."""
    scores: dict[str, list[float]] = {}
    latents: dict[str, set[int]] = {}
    for index, examples in concepts.top_texts.items():
        for example in examples:
            scores.setdefault(example["token_str"], []).append(example["score"])
            latents.setdefault(example["token_str"], set()).add(index)
    rows = [{"token": token, "examples": len(s), "latents": len(latents[token]), "mean_score": float(np.mean(s))}
            for token, s in scores.items()]
    return sorted(rows, key=lambda r: (-r["examples"], -r["mean_score"]))[:top]


def summary(concepts: Concepts) -> dict[str, Any]:
    """The numbers that describe the whole dictionary at a glance."""
    live = list(concepts.latents.values())
    freq = np.array([l["frequency"] for l in live])
    label_scores = [l["label_score"] for l in live if l.get("label_score") is not None]
    name_scores = [l["name_score"] for l in live if l.get("name_score") is not None]
    sources: dict[str, int] = {}
    for latent in live:
        sources[latent["label_source"]] = sources.get(latent["label_source"], 0) + 1
    meta = concepts.meta
    return {
        "model": meta["model_id"], "layer": meta["layer_signature"], "latents": concepts.n_latents, "k": meta["k"],
        "texts": meta["n_texts"], "tokens": meta["n_tokens"],
        "live latents": len(live), "dead latents": concepts.n_latents - len(live),
        "named latents": sum(1 for l in live if l.get("name")),
        "median firing frequency": float(np.median(freq)) if len(freq) else None,
        "max firing frequency": float(freq.max()) if len(freq) else None,
        "mean label score (balanced accuracy)": float(np.mean(label_scores)) if label_scores else None,
        "mean name score (balanced accuracy)": float(np.mean(name_scores)) if name_scores else None,
        **{f"labels from {source}": count for source, count in sorted(sources.items())},
    }


def search(concepts: Concepts, query: int | str) -> list[int]:
    """Live latents whose index is `query` or whose label or name contains it, most frequent first."""
    if isinstance(query, int):
        return [query] if query in concepts.latents else []
    q = query.strip().lower()
    hits = [i for i, l in concepts.latents.items()
            if q == str(i) or q in l["label"].lower() or q in (l.get("name") or "").lower()]
    return sorted(hits, key=lambda i: (-concepts.latents[i]["frequency"], i))


# --- HTML -----------------------------------------------------------------------------------

# Shared by the notebook's output and the dashboard; prefixed so that it cannot restyle Jupyter.
CSS = """
.sae-latent { font-family: system-ui, sans-serif; font-size: 14px; max-width: 60em; }
.sae-latent h3 { margin: .2em 0; }
.sae-stats { color: #444; margin: .2em 0 .6em; }
.sae-row { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.sae-lens ol { margin: .2em 0; padding-left: 1.6em; }
.sae-lens code { white-space: pre; }
.sae-lens .v { color: #777; font-size: 90%; }
.sae-examples { margin: .6em 0; }
.sae-ex { display: flex; gap: .8em; margin: .15em 0; }
.sae-ex .score { min-width: 4.5em; text-align: right; color: #555; font-variant-numeric: tabular-nums; }
.sae-ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; }
.sae-tok { border-radius: 2px; }
.sae-peak { outline: 2px solid #d62728; outline-offset: -1px; font-weight: bold; }
.sae-quantile { color: #777; font-size: 12px; }
"""
SHADE = "255, 127, 14"  # per-token background, scaled by activation / the latent's maximum


def _context(example: dict[str, Any]) -> tuple[list[str], list[float], int | None]:
    """(tokens, activations, peak) of an example; a non-activating one has no peak."""
    context = example.get("context")
    if not context:
        return [example["text"][:300]], [0.0], None
    acts = context["activations"]
    return context["tokens"], acts, context["peak"] if any(acts) else None


def _visible(token: str) -> str:
    return token.replace("\n", "↵")


def context_html(example: dict[str, Any], max_activation: float) -> str:
    """One example: its score, then its tokens shaded by activation with the peak outlined."""
    tokens, acts, peak = _context(example)
    spans = []
    for j, (token, act) in enumerate(zip(tokens, acts)):
        alpha = min(1.0, act / max_activation) if max_activation > 0 else 0.0
        style = f' style="background: rgba({SHADE}, {alpha:.2f})"' if act > 0 else ""
        cls = "sae-tok sae-peak" if j == peak else "sae-tok"
        spans.append(f'<span class="{cls}"{style} title="{act:.4g}">{html.escape(_visible(token))}</span>')
    return (f'<div class="sae-ex"><span class="score">{example["score"]:.3g}</span>'
            f'<span class="sae-ctx">{"".join(spans)}</span></div>')


def histogram_svg(counts: list[int], edges: list[float], width: int = 300, height: int = 80) -> str:
    """The latent's activation histogram as inline SVG: one step path over its non-empty bins."""
    counts_arr = np.asarray(counts)
    nonzero = np.flatnonzero(counts_arr)
    if not len(nonzero):
        return '<svg class="sae-hist" width="0" height="0"></svg>'
    first, last = nonzero[0], nonzero[-1]
    shown = counts_arr[first:last + 1]
    bar = width / len(shown)
    steps = "".join(f"V{height - height * c / shown.max():.1f}h{bar:.1f}" for c in shown)
    return (f'<svg class="sae-hist" width="{width}" height="{height + 16}" viewBox="0 0 {width} {height + 16}">'
            f'<path d="M0 {height}{steps}V{height}Z" fill="#1f77b4"/>'
            f'<text x="0" y="{height + 13}" font-size="11">{edges[first]:.3g}</text>'
            f'<text x="{width}" y="{height + 13}" font-size="11" text-anchor="end">{edges[last + 1]:.3g}</text>'
            f'<text x="{width}" y="11" font-size="11" text-anchor="end">max {shown.max()} tokens</text></svg>')


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _lens_list(title: str, pairs: list[list[Any]]) -> str:
    items = "".join(f'<li><code>{html.escape(_visible(token))}</code> <span class="v">{value:+.2f}</span></li>'
                    for token, value in pairs)
    return f"<div><b>{title}</b><ol>{items}</ol></div>"


def latent_summary_html(index: int, latent: dict[str, Any]) -> str:
    """Header, statistics, activation histogram and logit-lens tokens of one latent."""
    name = latent.get("name")
    title = html.escape(name or latent["label"])
    label_line = (f'label {html.escape(latent["label"])} ({html.escape(latent["label_source"])}, '
                  f'score {_score(latent.get("label_score"))})')
    if name:
        label_line += f'; name score {_score(latent.get("name_score"))}'
    hist = latent["histogram"]
    lens = latent["logit_lens"]
    return (f'<h3>latent {index}: {title}</h3><p class="sae-stats">{label_line}<br>fires on '
            f'{100 * latent["frequency"]:.3g}% of tokens; activation max {latent["max_activation"]:.3g}, '
            f'mean when firing {latent["mean_activation"]:.3g}</p>'
            f'<div class="sae-row"><div><b>activation when firing</b><br>'
            f'{histogram_svg(hist["counts"], hist["bin_edges"])}</div>'
            f'<div class="sae-row sae-lens">{_lens_list("logit lens: promotes", lens["promoted"])}'
            f'{_lens_list("suppresses", lens["suppressed"])}</div></div>')


def _example_groups(concepts: Concepts, index: int, top: int | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    latent = concepts.latents[index]
    return [("top activations", concepts.top_texts.get(index, [])[:top]),
            ("sampled by activation quantile (4 = highest)", latent.get("quantile_examples", [])),
            ("not activating", latent.get("non_activating", []))]


def latent_html(concepts: Concepts, index: int, top: int = 10) -> str:
    """Everything about one latent as an HTML fragment for the notebook (style included); `top`
    limits the top activations shown."""
    latent = concepts.latents[index]
    sections = []
    for title, examples in _example_groups(concepts, index, top):
        rows = "".join(("" if "quantile" not in e else f'<div class="sae-quantile">quantile {e["quantile"]}</div>')
                       + context_html(e, latent["max_activation"]) for e in examples)
        sections.append(f'<div class="sae-examples"><b>{title}</b> ({len(examples)}){rows}</div>')
    return f'<style>{CSS}</style><div class="sae-latent">{latent_summary_html(index, latent)}{"".join(sections)}</div>'


def show_latent(concepts: Concepts, query: int | str, top: int = 10) -> int | None:
    """Display a latent by index, or the most frequent one whose label or name contains `query`."""
    from IPython.display import HTML, display

    hits = search(concepts, query)
    if not hits:
        dead = isinstance(query, int) and 0 <= query < concepts.n_latents
        print(f"latent {query} is dead: it never fired on stage 04's texts" if dead else
              f"no live latent matches {query!r} (indices 0..{concepts.n_latents - 1}, or part of a label or name)")
        return None
    if len(hits) > 1:
        listed = ", ".join(f"{i} ({concepts.title(i)})" for i in hits[:10])
        print(f"{len(hits)} latents match {query!r}: {listed}{' ...' if len(hits) > 10 else ''}; showing {hits[0]}")
    display(HTML(latent_html(concepts, hits[0], top)))
    return hits[0]


# --- the standalone dashboard ------------------------------------------------------------------

def _compact(example: dict[str, Any]) -> dict[str, Any]:
    tokens, acts, peak = _context(example)
    entry = {"score": round(example["score"], 4), "tokens": tokens, "peak": peak}
    if any(acts):  # a non-activating example's zeros are left out
        entry["acts"] = [round(a, 3) for a in acts]
    if "quantile" in example:
        entry["quantile"] = example["quantile"]
    return entry


def dashboard_data(concepts: Concepts) -> dict[str, Any]:
    """What the page embeds: metadata, and per live latent its row, summary markup and examples."""
    meta_keys = ("model_id", "layer_signature", "n_latents", "k", "dataset", "split", "n_texts", "n_tokens", "created")
    latents = []
    for row in latent_rows(concepts):
        index = row["index"]
        latents.append({**row, "summary_html": latent_summary_html(index, concepts.latents[index]),
                        "groups": [{"title": title, "examples": [_compact(e) for e in examples]}
                                   for title, examples in _example_groups(concepts, index)]})
    return {"meta": {k: concepts.meta.get(k) for k in meta_keys}, "latents": latents}


def write_dashboard(concepts: Concepts, path: str | Path) -> Path:
    """Write the standalone dashboard to `path` and return it."""
    data = dashboard_data(concepts)
    # In a script element only "</script" (and "<!--") can end the data early; escaping every "<"
    # as \u003c keeps it valid JSON and makes both impossible.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    meta = data["meta"]
    heading = html.escape(f"{meta['model_id']} · {meta['layer_signature']}")
    page = (_PAGE.replace("{{CSS}}", CSS).replace("{{TITLE}}", heading)
            .replace("{{DATA}}", payload).replace("{{SCRIPT}}", _SCRIPT))
    write_text(path, page)
    return Path(path)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SAE concepts · {{TITLE}}</title>
<style>{{CSS}}
body { font-family: system-ui, sans-serif; margin: 1em 1.5em; color: #222; }
header p { color: #555; margin: .2em 0 1em; }
main { display: grid; grid-template-columns: minmax(24em, 1fr) minmax(30em, 1.4fr); gap: 1.5em; }
#list { max-height: 90vh; overflow: auto; }
#search { width: 100%; padding: .4em; font-size: 15px; box-sizing: border-box; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th { position: sticky; top: 0; background: #eee; cursor: pointer; text-align: left; padding: .3em; user-select: none; }
th[aria-sort=descending]::after { content: " ▼"; } th[aria-sort=ascending]::after { content: " ▲"; }
td { padding: .2em .3em; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr { cursor: pointer; } tbody tr:hover { background: #f4f8ff; } tr.selected { background: #dde8ff; }
</style></head>
<body>
<header><h1>SAE concepts</h1><p id="meta"></p></header>
<main>
<section id="list">
<input id="search" type="search" placeholder="search: latent index, label or name" autocomplete="off">
<p id="count"></p>
<table id="latents"><thead><tr></tr></thead><tbody></tbody></table>
</section>
<section id="view" class="sae-latent"><p>Pick a latent in the table, or open <code>#latent-INDEX</code>.</p></section>
</main>
<script type="application/json" id="data">{{DATA}}</script>
<script>{{SCRIPT}}</script>
</body></html>
"""

# Data reaches the DOM only through textContent / append(string); the one innerHTML is the summary
# markup that saekit.dashboard rendered with every text escaped.
_SCRIPT = r"""
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const byIndex = new Map(data.latents.map(l => [l.index, l]));
const search = document.getElementById("search");
const tbody = document.querySelector("#latents tbody");
const view = document.getElementById("view");
const SHADE = "255, 127, 14";
const fmt = {
  int: v => String(v),
  text: v => v ?? "",
  score: v => v == null ? "–" : v.toFixed(2),
  share: v => (100 * v).toPrecision(3) + "%",
  value: v => v.toPrecision(3),
};
const columns = [
  ["index", "latent", "int"], ["label", "label", "text"], ["name", "name", "text"],
  ["label_score", "label score", "score"], ["name_score", "name score", "score"],
  ["frequency", "frequency", "share"], ["max_activation", "max act.", "value"],
];
let sortKey = "frequency", sortDesc = true, selected = null;

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
  const rows = data.latents.filter(l => matches(l, q))
    .sort((a, b) => compare(a[sortKey], b[sortKey]) || a.index - b.index);
  tbody.replaceChildren(...rows.map(l => {
    const tr = el("tr", {"data-latent": l.index}, ...columns.map(([key, , kind]) =>
      el("td", {class: kind === "text" ? "" : "num"}, fmt[kind](l[key]))));
    if (l.index === selected) tr.classList.add("selected");
    tr.addEventListener("click", () => { location.hash = "latent-" + l.index; });
    return tr;
  }));
  document.getElementById("count").textContent = `${rows.length} of ${data.latents.length} live latents`;
  for (const th of document.querySelectorAll("#latents th"))
    th.setAttribute("aria-sort", th.dataset.key === sortKey ? (sortDesc ? "descending" : "ascending") : "none");
  return rows;
}

function contextRow(example, maxActivation) {
  const acts = example.acts || example.tokens.map(() => 0);
  const ctx = el("span", {class: "sae-ctx"}, ...example.tokens.map((token, j) => {
    const span = el("span", {class: j === example.peak ? "sae-tok sae-peak" : "sae-tok",
                             title: String(+acts[j].toPrecision(4))}, token.replaceAll("\n", "↵"));
    if (acts[j] > 0) span.style.background = `rgba(${SHADE}, ${Math.min(1, acts[j] / maxActivation).toFixed(2)})`;
    return span;
  }));
  return el("div", {class: "sae-ex"}, el("span", {class: "score"}, String(+example.score.toPrecision(3))), ctx);
}

function showLatent(index) {
  const l = byIndex.get(index);
  selected = index;
  view.dataset.latent = index;
  for (const tr of tbody.children) tr.classList.toggle("selected", Number(tr.dataset.latent) === index);
  if (!l) {
    view.replaceChildren(el("p", {}, `Latent ${index} is dead (it never fired on the texts) or does not exist.`));
    return;
  }
  const summary = el("div", {});
  summary.innerHTML = l.summary_html;
  view.replaceChildren(summary, ...l.groups.map(g => el("div", {class: "sae-examples"},
    el("b", {}, g.title), ` (${g.examples.length})`,
    ...g.examples.flatMap(e => [...(e.quantile ? [el("div", {class: "sae-quantile"}, `quantile ${e.quantile}`)] : []),
                                contextRow(e, l.max_activation)]))));
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
  `${m.model_id} · ${m.layer_signature} · ${m.n_latents} latents, k = ${m.k} · ` +
  `${m.n_texts} texts (${m.n_tokens} tokens) of ${m.dataset} / ${m.split} · ${m.created}`;
document.querySelector("#latents thead tr").append(...columns.map(([key, title]) => {
  const th = el("th", {"data-key": key}, title);
  th.addEventListener("click", () => {
    sortDesc = key === sortKey ? !sortDesc : !["label", "name", "index"].includes(key);
    sortKey = key;
    renderTable();
  });
  return th;
}));
search.addEventListener("input", () => {
  history.replaceState(null, "", "#search=" + encodeURIComponent(search.value));
  renderTable();
});
window.addEventListener("hashchange", applyHash);
renderTable();
applyHash();
"""
