"""Stage 05: show what the latents learned, in the notebook and as a dashboard that opens from disk.

Both read stage 04's set of exports (saekit.concepts.exports), checked against the current SAE. The
notebook gets HTML strings from `latent_html`. The dashboard is store/dashboard.html, which embeds
only the table (one row per live latent), and a folder beside it, store/dashboard_files/<id>/,
with the texts (texts.js) and the latents' details in chunks (latents-N.js) that the page loads
when a latent is first opened. Examples are references into the texts, which are stored once, so
the files stay small at thousands of latents. No server and no network are needed.

The page's HTML, CSS and JavaScript are the files in dashboard_assets/; latent.css styles the
latent view in the notebook too.
"""
from __future__ import annotations

import html
import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base.atomic import write_text
from ..base.settings import Settings
from ..concepts.exports import RERUN_04, ConceptsMismatchError, open_concepts, table_order
from ..training.saelens_format import load_sae

DASHBOARD_FILE = "dashboard.html"
FILES_DIR = "dashboard_files"
CHUNK = 128  # latents per detail file: few files, each small
ASSETS = Path(__file__).resolve().parent / "dashboard_assets"


def _asset(name: str) -> str:
    return (ASSETS / name).read_text()


@dataclass
class Concepts:
    """Stage 04's results: metadata, each live latent's record, and the texts examples point into."""

    meta: dict[str, Any]
    latents: dict[int, dict[str, Any]]
    texts: dict[str, Any]  # {"texts": [...], "vocab": [token strings], "tokens": [[vocab index, ...] per text]}

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def title(self, index: int) -> str:
        """The name where it scored above the label, else the label."""
        return self.latents[index]["title"]

    def frequencies(self) -> np.ndarray:
        """Firing frequency of every latent, dead ones at 0."""
        freq = np.zeros(self.n_latents)
        for index, latent in self.latents.items():
            freq[index] = latent["frequency"]
        return freq

    def token(self, doc: int, pos: int) -> str:
        return self.texts["vocab"][self.texts["tokens"][doc][pos]]

    def context(self, example: dict[str, Any]) -> tuple[list[str], list[float], int]:
        """(tokens, the latent's activation on each, index of the peak) of an example's window."""
        doc, pos, width = example["doc"], example["pos"], self.meta["context_tokens"]
        start, stop = max(0, pos - width), min(len(self.texts["tokens"][doc]), pos + width + 1)
        acts = dict(example.get("acts", []))
        return ([self.token(doc, p) for p in range(start, stop)], [acts.get(p, 0.0) for p in range(start, stop)],
                pos - start)


def current_sae_id(settings: Settings) -> str | None:
    return load_sae(settings)[1].get("sae_id")


def load_concepts(settings: Settings) -> Concepts:
    """Stage 04's set from the store, checked file by file, against the current SAE and the settings."""
    concepts, texts, _ = open_concepts(settings.store, current_sae_id(settings))
    meta = concepts["meta"]
    for key, setting in (("model_id", "MODEL_ID"), ("layer_signature", "LAYER_SIGNATURE")):
        if meta[key] != getattr(settings, setting):
            raise ConceptsMismatchError(f"the concepts were found for {key} {meta[key]!r} but {setting} is "
                                        f"{getattr(settings, setting)!r}. {RERUN_04}")
    return Concepts(meta, {int(i): latent for i, latent in concepts["latents"].items()}, texts)


# --- tables ---------------------------------------------------------------------------------

def latent_rows(concepts: Concepts) -> list[dict[str, Any]]:
    """One row per live latent, in stage 04's table order (scorable first, by the lower end of the F1's
    interval); the name only where it earned the title. A latent that is not scorable has no F1 bound."""
    rows = []
    for i, l in sorted(concepts.latents.items(), key=lambda item: table_order(item[1])):
        titled, label = l["title_source"] == "name", l["label"]
        rows.append({"index": i, "label": label["text"], "f1": label["f1"],
                     "f1_low": label["f1_low"] if label["scorable"] else None, "support": label["scoring_fires"],
                     "explained": label["explained"], "name": l["name"]["text"] if titled else None,
                     "name_score": l["name"]["score"] if titled else None, "frequency": l["frequency"],
                     "max_activation": l["max_activation"], "mean_activation": l["mean_activation"]})
    return rows


def peak_tokens(concepts: Concepts, top: int = 20) -> list[dict[str, Any]]:
    """The tokens that most often carry a latent's peak among the top examples, with their mean score."""
    scores: dict[str, list[float]] = {}
    latents: dict[str, set[int]] = {}
    for index, latent in concepts.latents.items():
        for example in latent["examples"]["top"]:
            token = concepts.token(example["doc"], example["pos"])
            scores.setdefault(token, []).append(example["score"])
            latents.setdefault(token, set()).add(index)
    rows = [{"token": token, "examples": len(s), "latents": len(latents[token]), "mean_score": float(np.mean(s))}
            for token, s in scores.items()]
    return sorted(rows, key=lambda r: (-r["examples"], -r["mean_score"]))[:top]


def summary(concepts: Concepts) -> dict[str, Any]:
    """The numbers that describe the whole dictionary at a glance."""
    live = list(concepts.latents.values())
    freq = np.array([l["frequency"] for l in live])
    scorable = [l for l in live if l["label"]["scorable"]]
    f1 = np.array([l["label"]["f1"] for l in scorable])
    detection = [l["label"]["detection"] for l in live if l["label"]["detection"] is not None]
    rules: dict[str, int] = {}
    for latent in live:
        label = latent["label"]
        rule = label["rule"] if label["explained"] else "unexplained" if label["scorable"] else "not scorable"
        rules[rule] = rules.get(rule, 0) + 1
    meta = concepts.meta
    return {
        "model": meta["model_id"], "layer": meta["layer_signature"], "latents": concepts.n_latents, "k": meta["k"],
        "texts": meta["n_texts"], "tokens": meta["n_tokens"], "texts that scored the labels": meta["n_scoring_texts"],
        "live latents": len(live), "dead latents": concepts.n_latents - len(live),
        "scorable latents (LABEL_MIN_SUPPORT firings on held-out tokens)": len(scorable),
        "median label F1 (held-out tokens, scorable latents)": float(np.median(f1)) if len(f1) else None,
        "mean label F1 (held-out tokens, scorable latents)": float(np.mean(f1)) if len(f1) else None,
        "median label detection (balanced accuracy on windows)": float(np.median(detection)) if detection else None,
        "explained latents": sum(1 for l in live if l["label"]["explained"]),
        "explained share of scorable latents": (sum(1 for l in scorable if l["label"]["explained"]) / len(scorable)
                                                if scorable else None),
        "named latents": sum(1 for l in live if l["name"]),
        "names that became the title": sum(1 for l in live if l["title_source"] == "name"),
        "median firing frequency": float(np.median(freq)) if len(freq) else None,
        **{f"labels by rule: {rule}": count for rule, count in sorted(rules.items())},
    }


def search(concepts: Concepts, query: int | str) -> list[int]:
    """Live latents whose index is `query` or whose label or name contains it, best explained first."""
    if isinstance(query, int):
        return [query] if query in concepts.latents else []
    q = query.strip().lower()
    hits = [i for i, l in concepts.latents.items()
            if q == str(i) or q in l["label"]["text"].lower() or q in ((l["name"] or {}).get("text") or "").lower()]
    return sorted(hits, key=lambda i: table_order(concepts.latents[i]))


# --- HTML for the notebook ---------------------------------------------------------------------

SHADE = "255, 127, 14"  # per-token background, scaled by activation / the latent's maximum


def _visible(token: str) -> str:
    return token.replace("\n", "↵")


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def context_html(tokens: list[str], acts: list[float], peak: int | None, score: float, max_activation: float) -> str:
    """One example: its score, then its tokens shaded by activation with the peak outlined."""
    spans = []
    for j, (token, act) in enumerate(zip(tokens, acts)):
        alpha = min(1.0, act / max_activation) if max_activation > 0 else 0.0
        style = f' style="background: rgba({SHADE}, {alpha:.2f})"' if act > 0 else ""
        cls = "sae-tok sae-peak" if j == peak else "sae-tok"
        spans.append(f'<span class="{cls}"{style} title="{act:.4g}">{html.escape(_visible(token))}</span>')
    return (f'<div class="sae-ex"><span class="score">{score:.3g}</span>'
            f'<span class="sae-ctx">{"".join(spans)}</span></div>')


def histogram_svg(counts: list[int], low: float, high: float, width: int = 300, height: int = 80) -> str:
    """The latent's activation histogram as inline SVG: one step path over its bins."""
    counts_arr = np.asarray(counts)
    bar = width / len(counts_arr)
    steps = "".join(f"V{height - height * c / counts_arr.max():.1f}h{bar:.1f}" for c in counts_arr)
    return (f'<svg class="sae-hist" width="{width}" height="{height + 16}" viewBox="0 0 {width} {height + 16}">'
            f'<path d="M0 {height}{steps}V{height}Z" fill="#1f77b4"/>'
            f'<text x="0" y="{height + 13}" font-size="11">{low:.3g}</text>'
            f'<text x="{width}" y="{height + 13}" font-size="11" text-anchor="end">{high:.3g}</text>'
            f'<text x="{width}" y="11" font-size="11" text-anchor="end">max {counts_arr.max()} tokens</text></svg>')


def _lens_list(title: str, pairs: list[list[Any]]) -> str:
    items = "".join(f'<li><code>{html.escape(_visible(token))}</code> <span class="v">{value:+.2f}</span></li>'
                    for token, value in pairs)
    return f"<div><b>{title}</b><ol>{items}</ol></div>"


# why a name is or is not the title (saekit.concepts.exports.apply_names), in the words both views use
NAME_VERDICTS = ("it leads the label by more than {lead} on the same windows (beyond chance), so it is the title",
                 "not the title: it does not lead the label by more than {lead} on the same windows")


# what each method of saekit.concepts.output_side means, in the words both views use
OUTPUT_SIDE_TITLES = {"measured": "output side (measured: next-token log-prob change when added)",
                      "direct lens": "output side (direct lens: the layer is the residual stream)",
                      "N/A": "output side: N/A (not measured, and the direct lens does not hold at this layer)"}


def output_side_html(side: dict[str, Any]) -> str:
    title = OUTPUT_SIDE_TITLES[side["method"]]
    if not side["promoted"]:
        return f"<div><b>{title}</b></div>"
    return f'{_lens_list(title + ": promotes", side["promoted"])}{_lens_list("suppresses", side["suppressed"])}'


def latent_summary_html(index: int, latent: dict[str, Any]) -> str:
    """Header, label and name with their scores, statistics, histogram and output side of one latent."""
    label, name = latent["label"], latent["name"]
    rule = f' ({label["rule"]})' if label["rule"] else ""
    label_line = (f'<span class="{"" if label["explained"] else "sae-unexplained"}">label {html.escape(label["text"])}'
                  f'{rule}: held-out F1 {_score(label["f1"])} [{_score(label["f1_low"])}, '
                  f'{_score(label["f1_high"])}] on {label["scoring_fires"]} firings, '
                  f'precision {_score(label["precision"])}, recall {_score(label["recall"])}; '
                  f'windows: detection {_score(label["detection"])}, fuzzing {_score(label["fuzzing"])}</span>')
    if name:
        verdict = (NAME_VERDICTS[0] if latent["title_source"] == "name" else NAME_VERDICTS[1]).format(
            lead=_score(name.get("lead_needed")))
        label_line += (f'<br>name "{html.escape(name["text"])}": detection {_score(name["detection"])}, '
                       f'fuzzing {_score(name["fuzzing"])}; {verdict}')
    hist, side = latent["histogram"], latent["output_side"]
    return (f'<h3>latent {index}: {html.escape(latent["title"])}</h3><p class="sae-stats">{label_line}<br>fires on '
            f'{100 * latent["frequency"]:.3g}% of tokens; activation max {latent["max_activation"]:.3g}, '
            f'mean when firing {latent["mean_activation"]:.3g}</p>'
            f'<div class="sae-row"><div><b>activation when firing</b><br>'
            f'{histogram_svg(hist["counts"], hist["bin_edges"][0], hist["bin_edges"][-1])}</div>'
            f'<div class="sae-row sae-lens">{output_side_html(side)}</div></div>')


# what stage 04 does (saekit.concepts.collect.interval_examples), in the words both views use
INTERVALS_TITLE = "drawn at random within equal-width activation intervals (4 = highest; never a top activation)"


def interval_text(interval: dict[str, Any]) -> str:
    return (f'{interval["quantile"]}: ({interval["min"]:.3g}, {interval["max"]:.3g}], '
            f'{interval["count"]} firing tokens')


def latent_html(concepts: Concepts, index: int, top: int = 10) -> str:
    """Everything about one latent as an HTML fragment for the notebook (style included); `top`
    limits the top activations shown."""
    latent = concepts.latents[index]
    examples = latent["examples"]
    groups = [("top activations", examples["top"][:top], True),
              (INTERVALS_TITLE, examples["quantiles"], True),
              ("not activating", examples["silent"], False)]
    intervals = {b["quantile"]: b for b in latent["quantile_bins"]}
    sections = []
    for title, group, has_peak in groups:
        rows = []
        for e in group:
            tokens, acts, peak = concepts.context(e)
            quantile = (f'<div class="sae-quantile">interval {interval_text(intervals[e["quantile"]])}</div>'
                        if "quantile" in e else "")
            rows.append(quantile + context_html(tokens, acts, peak if has_peak else None, e.get("score", 0.0),
                                                latent["max_activation"]))
        sections.append(f'<div class="sae-examples"><b>{title}</b> ({len(group)}){"".join(rows)}</div>')
    return (f'<style>{_asset("latent.css")}</style><div class="sae-latent">{latent_summary_html(index, latent)}'
            f'{"".join(sections)}</div>')


def show_latent(concepts: Concepts, query: int | str, top: int = 10) -> int | None:
    """Display a latent by index, or the best explained one whose label or name contains `query`."""
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


# --- the dashboard -------------------------------------------------------------------------------

ROW_COLUMNS = ("index", "label", "f1", "f1_low", "support", "explained", "name", "name_score", "frequency",
               "max_activation")


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _acts(example: dict[str, Any]) -> list[list[float]]:
    return [[p, round(a, 3)] for p, a in example["acts"]]


def latent_detail(latent: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of one latent beyond its row; examples as [text, position, [[position, activation]]]."""
    label, name, examples, hist = latent["label"], latent["name"], latent["examples"], latent["histogram"]
    intervals = {b["quantile"]: b for b in latent["quantile_bins"]}
    return {
        "title": latent["title"], "title_source": latent["title_source"],
        "label": {k: _round(label[k]) if isinstance(label[k], float) else label[k]
                  for k in ("text", "rule", "explained", "scorable", "f1", "f1_low", "f1_high", "scoring_fires",
                            "precision", "recall", "detection", "fuzzing")},
        "name": name and {"text": name["text"], "detection": _round(name["detection"]),
                          "fuzzing": _round(name["fuzzing"]), "lead_needed": _round(name.get("lead_needed"))},
        "stats": [latent["frequency"], latent["max_activation"], latent["mean_activation"]],
        "histogram": {"low": hist["bin_edges"][0], "high": hist["bin_edges"][-1], "counts": hist["counts"]},
        "lens": {"method": latent["output_side"]["method"],
                 **{side: [[t, round(v, 2)] for t, v in latent["output_side"][side]]
                    for side in ("promoted", "suppressed")}},
        "top": [[e["doc"], e["pos"], _acts(e)] for e in examples["top"]],
        "quantiles": [[e["doc"], e["pos"], _acts(e), interval_text(intervals[e["quantile"]])]
                      for e in examples["quantiles"]],
        "silent": [[e["doc"], e["pos"]] for e in examples["silent"]],
    }


def _json(obj: Any) -> str:
    # "<" escaped as \u003c: no text inside can end a <script> element early, and it stays valid JSON/JS
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def dashboard_data(concepts: Concepts, files: str) -> dict[str, Any]:
    """What the page embeds: metadata, where its files are, and the table's rows."""
    meta_keys = ("model_id", "layer_signature", "n_latents", "k", "dataset", "split", "source", "n_texts", "n_tokens",
                 "n_scoring_texts", "context_tokens", "naming", "created")
    rows = [[_round(r[c]) if isinstance(r[c], float) else r[c] for c in ROW_COLUMNS] for r in latent_rows(concepts)]
    return {"meta": {k: concepts.meta.get(k) for k in meta_keys}, "files": files, "chunk": CHUNK,
            "intervals_title": INTERVALS_TITLE, "name_verdicts": NAME_VERDICTS, "output_side_titles": OUTPUT_SIDE_TITLES,
            "columns": list(ROW_COLUMNS), "rows": rows}


def write_dashboard(concepts: Concepts, path: str | Path) -> Path:
    """Write the page to `path` and its files to a fresh folder beside it; return the page's path.

    The folder is complete before the page that names it replaces the old page; older folders are
    removed after."""
    path = Path(path)
    files_root = path.parent / FILES_DIR
    name = f"{concepts.meta.get('concepts_id', 'concepts')}-{secrets.token_hex(3)}"
    partial = files_root / f"{name}.partial"
    partial.mkdir(parents=True)
    tokens = {"vocab": concepts.texts["vocab"], "tokens": concepts.texts["tokens"]}
    (partial / "texts.js").write_text(f"saeDashboard(\"texts\",0,{_json(tokens)});\n")
    chunks: dict[int, dict[int, Any]] = {}
    for index, latent in concepts.latents.items():
        chunks.setdefault(index // CHUNK, {})[index] = latent_detail(latent)
    for chunk, details in chunks.items():
        (partial / f"latents-{chunk}.js").write_text(f"saeDashboard(\"latents\",{chunk},{_json(details)});\n")
    partial.rename(files_root / name)
    data = dashboard_data(concepts, f"{FILES_DIR}/{name}")
    page = (_asset("page.html").replace("{{LATENT_CSS}}", _asset("latent.css"))
            .replace("{{PAGE_CSS}}", _asset("page.css"))
            .replace("{{TITLE}}", html.escape(f"{concepts.meta['model_id']} · {concepts.meta['layer_signature']}"))
            .replace("{{DATA}}", _json(data)).replace("{{SCRIPT}}", _asset("app.js")))
    write_text(path, page)
    for old in files_root.iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return path


def dashboard_size(path: str | Path) -> dict[str, int]:
    """Bytes of the page, and of the page with all its files."""
    path = Path(path)
    page = path.stat().st_size
    files = json.loads(path.read_text().split('id="data">', 1)[1].split("</script>", 1)[0])["files"]
    return {"page_bytes": page, "total_bytes": page + sum(f.stat().st_size for f in (path.parent / files).iterdir())}

