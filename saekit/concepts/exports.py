"""Stage 04, exports: one record per live latent, published with the texts as one set of files.

    store/concepts/<concepts_id>/      published by saekit.base.integrity.publish_set
        concepts.json    run metadata, and per live latent: statistics, label and its scores, name and
                         its scores, title, histogram, output side, examples as references to the
                         texts (text, position of the peak, activation, the latent's codes nearby), and
                         the activation interval of each quantile group of examples
        texts.json       the held-out texts, each once: raw text, and tokens as indices into a table
                         of token strings
        concepts.csv     one row per live latent
        top_texts.json   the seed's format, {latent: [{text, score, token_str, token_idx}, ...]}, kept
                         for other tools; this project's readers do not use it
        manifest.json    checksums of the files above, the SAE's id and the activation run's id
    store/concepts_id.txt                names the current set; replaced last
    store/top_texts.json                 a copy of the set's top_texts.json, at the seed's path
    store/neuronpedia/                   the set in Neuronpedia's upload formats (saekit.concepts.neuronpedia), replaced
                                         together with concepts_id.txt

Readers open the set through `open_concepts`, which checks every file and refuses a set made from
another SAE than the current one.
"""
from __future__ import annotations

import csv
import io
import json
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..base.atomic import atomic_path
from .collect import (HIST_EDGES, HeldoutCodes, Interval, ScoringWindows, interval_examples, latent_activations,
                      latent_stats, scoring_half, scoring_windows, silent_windows, text_peaks, top_peaks, window)
from ..base.errors import PipelineError
from ..base.integrity import clean_stale_partials, open_set, publish_set
from .labels import Label, choose_labels, token_keys, window_scores
from .naming import Name
from .neuronpedia import Replacement, export_files, stage_export

CONCEPTS_DIR = "concepts"
POINTER = "concepts_id.txt"
CONCEPTS_FILE, TEXTS_FILE, CSV_FILE, TOP_TEXTS_FILE = "concepts.json", "texts.json", "concepts.csv", "top_texts.json"
RERUN_04 = "Run stage 04 again (04_name_sae_concepts.ipynb)."


class ConceptsMismatchError(PipelineError):
    """Stage 04's exports were made from another SAE, model or layer than the current ones."""


def example(codes: HeldoutCodes, latent: int, token: int, context: int) -> dict[str, Any]:
    """A reference to the peak at flat `token`: its text, position, score, and the latent's nonzero codes
    in the window around it (as [position, activation] pairs)."""
    start, stop = window(codes, token, context)
    acts = latent_activations(codes, latent, start, stop)
    offset = int(codes.pos[start])
    return {"doc": int(codes.doc[token]), "pos": int(codes.pos[token]),
            "score": round(float(acts[token - start]), 4),
            "acts": [[offset + j, round(float(a), 4)] for j, a in enumerate(acts) if a > 0]}


def texts_table(codes: HeldoutCodes) -> dict[str, Any]:
    """Each text once: its raw text, and its tokens as indices into `vocab`."""
    ids, index = np.unique(codes.token_ids, return_inverse=True)
    tokens = np.split(index.ravel(), codes.doc_start[1:-1])
    return {"texts": codes.texts, "vocab": [codes.token_text[int(t)] for t in ids],
            "tokens": [t.tolist() for t in tokens]}


def quantile_bins(intervals: list[Interval], n_tokens: int) -> list[dict[str, Any]]:
    """The latent's activation intervals, highest first: (min, max] each, `count` its firing tokens in
    it (every firing token in exactly one, so the counts sum to the firing count), `contains` their
    share of all tokens (SAEDashboard's bin_contains; its lowest interval also counts the zeros, these
    do not)."""
    return [{"quantile": iv.number, "min": round(iv.low, 4), "max": round(iv.high, 4), "count": iv.count,
             "contains": iv.count / max(n_tokens, 1)} for iv in intervals]


@dataclass
class Built:
    """Stage 04's results before naming: records for the exports, and what naming needs."""

    meta: dict[str, Any]
    records: dict[int, dict[str, Any]]
    labels: dict[int, Label]
    windows: dict[int, ScoringWindows]
    namer_examples: dict[int, list[int]]  # per latent, its top peak tokens of the choosing half
    top_texts: dict[str, list[dict[str, Any]]]
    texts: dict[str, Any]


def build_concepts(codes: HeldoutCodes, output_side: dict[int, dict[str, Any]], meta: dict[str, Any], *, top_n: int,
                   context: int, per_quantile: int, non_activating: int, scoring_examples: int, max_keys: int,
                   min_f1: float, min_support: int, seed: int = 0) -> Built:
    """Statistics, examples, labels and their scores for every live latent of `codes`.

    `output_side`: per live latent, its output side (saekit.concepts.output_side.output_sides): method,
    promoted and suppressed tokens."""
    rng = np.random.default_rng(seed)
    n = codes.n_latents
    stats = latent_stats(codes)
    live = np.flatnonzero(stats.fire_counts).tolist()
    is_scoring = scoring_half(len(codes.texts), seed)
    peaks = text_peaks(codes)
    top = top_peaks(peaks, top_n, n)
    choosing = peaks.where(~is_scoring[codes.doc[peaks.token]])
    namer_top = top_peaks(choosing, top_n, n)
    keys = token_keys(codes)
    labels = choose_labels(codes, keys, is_scoring, live, {i: [t for t, _ in output_side[i]["promoted"]] for i in live},
                           max_keys, min_f1, min_support, seed)
    windows = scoring_windows(codes, peaks, live, scoring_examples, context, is_scoring, rng)
    all_tokens = np.flatnonzero(codes.scorable)
    firing_token, firing_latent, firing_value = codes.firing
    firing_start = np.searchsorted(firing_latent, np.arange(n + 1))
    records = {}
    for i in live:
        label = labels[i]
        label.detection, label.fuzzing = window_scores(codes, keys, label, windows[i], context)
        used = np.flatnonzero(stats.histogram[i])
        top_tokens = peaks.token[top[i]]
        firing = slice(firing_start[i], firing_start[i + 1])
        intervals = interval_examples(i, firing_token[firing], firing_value[firing], codes, set(top_tokens.tolist()),
                                      per_quantile, context, rng)
        records[i] = {
            "index": i, "frequency": int(stats.fire_counts[i]) / max(codes.n_tokens, 1),
            "max_activation": round(float(stats.max_activation[i]), 4),
            "mean_activation": round(float(stats.activation_sums[i] / stats.fire_counts[i]), 4),
            "label": label.as_json(), "name": None, "title": label.text, "title_source": "label",
            "histogram": {"bin_edges": [float(e) for e in HIST_EDGES[used[0]:used[-1] + 2]],
                          "counts": stats.histogram[i, used[0]:used[-1] + 1].tolist()},
            "output_side": output_side[i],
            "examples": {
                "top": [example(codes, i, int(t), context) for t in top_tokens],
                "quantiles": [{**example(codes, i, t, context), "quantile": iv.number}
                              for iv in intervals for t in iv.examples],
                "silent": [{"doc": int(codes.doc[t]), "pos": int(codes.pos[t])}
                           for t in silent_windows(codes, i, non_activating, context, all_tokens, rng)]},
            "quantile_bins": quantile_bins(intervals, codes.n_tokens),
        }
    top_texts = {str(i): [{"text": codes.texts[codes.doc[t]], "score": round(float(v), 5),
                           "token_str": codes.token_text[int(codes.token_ids[t])], "token_idx": int(codes.pos[t]),
                           "doc_index": int(codes.doc[t])}
                          for t, v in zip(peaks.token[top[i]], peaks.value[top[i]])] for i in range(n)}
    meta = {**meta, "n_latents": n, "n_texts": len(codes.texts), "n_tokens": codes.n_tokens,
            "n_scoring_texts": int(is_scoring.sum()), "live_latents": len(live), "context_tokens": context,
            "collection_tokens_per_s": codes.tokens_per_s,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return Built(meta, records, labels, windows, {i: choosing.token[namer_top[i]].tolist() for i in live},
                 top_texts, texts_table(codes))


def lead_needed(windows: ScoringWindows) -> float:
    """How far a name's window score must lead its label's for the lead to be beyond chance: the 95%
    half-width of the difference of two window scores on these windows, at its widest. A window score
    is the mean of two balanced accuracies; each has variance at most (1/n_pos + 1/n_neg) / 16
    (binomial rates, p(1 - p) <= 1/4), and the two scores of the difference at most add."""
    fuzz_pairs = sum(d is not None for d in windows.decoys)
    parts = [(len(windows.activating), len(windows.silent)), (fuzz_pairs, fuzz_pairs)]
    variances = [(1 / n_pos + 1 / n_neg) / 16 for n_pos, n_neg in parts if n_pos and n_neg]
    if not variances:
        return float("inf")
    score_variance = sum(variances) / len(variances) ** 2
    return 1.96 * float(np.sqrt(2 * score_variance))


def apply_names(built: Built, names: dict[int, Name], min_score: float) -> None:
    """Record each name with its scores; it becomes the title only where it leads the label on the same
    windows by more than the windows' interval (lead_needed: a lead within it is noise), and scores at
    least `min_score` (0.5 is chance: noise must not replace an honest "unexplained")."""
    for i, name in names.items():
        record = built.records[i]
        needed = lead_needed(built.windows[i])
        record["name"] = {"text": name.text, "detection": name.detection, "fuzzing": name.fuzzing,
                          "score": name.score, "lead_needed": round(needed, 4)}
        label_score = built.labels[i].window_score()
        if (name.score is not None and label_score is not None and name.score - label_score > needed
                and name.score >= min_score):
            record["title"], record["title_source"] = name.text, "name"


def table_order(record: dict[str, Any]) -> tuple:
    """Scorable latents first, by the lower end of their F1's interval (so a perfect score from three
    firings does not lead: its interval is wide), then the latents that are not scorable; by index within."""
    label = record["label"]
    return (not label["scorable"], -label["f1_low"] if label["scorable"] else 0.0, record["index"])


def _csv(records: dict[int, dict[str, Any]]) -> str:
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["index", "title", "title_source", "label", "label_rule", "label_scorable", "label_support",
                     "label_f1", "label_f1_low", "label_f1_high", "label_precision", "label_recall", "label_detection",
                     "label_fuzzing", "name", "name_score", "frequency"])
    for r in sorted(records.values(), key=table_order):
        label, name = r["label"], r["name"] or {}
        writer.writerow([r["index"], r["title"], r["title_source"], label["text"], label["rule"] or "",
                         label["scorable"], label["scoring_fires"],
                         *(f"{label[k]:.4f}" for k in ("f1", "f1_low", "f1_high", "precision", "recall")),
                         *("" if label[k] is None else f"{label[k]:.4f}" for k in ("detection", "fuzzing")),
                         name.get("text", ""), "" if name.get("score") is None else f"{name['score']:.4f}",
                         f"{r['frequency']:.6g}"])
    return rows.getvalue()


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def publish(store: Path, built: Built) -> Path:
    """Write the exports as one set and make it current; return its folder."""
    parent = store / CONCEPTS_DIR
    clean_stale_partials(parent)
    pointer = store / POINTER
    previous = pointer.read_text().strip() if pointer.exists() else None
    set_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    meta = {**built.meta, "concepts_id": set_id}

    def write(folder: Path) -> None:
        _dump(folder / CONCEPTS_FILE, {"meta": meta, "latents": built.records})
        _dump(folder / TEXTS_FILE, built.texts)
        (folder / CSV_FILE).write_text(_csv(built.records))
        _dump(folder / TOP_TEXTS_FILE, built.top_texts)

    # store/neuronpedia/ changes with the pointer: the old export goes right before it names the new set,
    # the new one comes right after, so no reader finds an export of another set than the current one
    neuronpedia = Replacement(store, stage_export(store, set_id, export_files(meta, built.records, built.texts)))
    try:
        folder = publish_set(parent, set_id, write, pointer,
                             {key: meta.get(key) for key in ("sae_id", "activation_run_id", "model_id",
                                                             "layer_signature")},
                             before_pointer=neuronpedia.move_old_away)
    except BaseException:
        neuronpedia.abandon()
        raise
    neuronpedia.install()
    with atomic_path(store / TOP_TEXTS_FILE) as tmp:  # for tools that read the seed's path
        shutil.copyfile(folder / TOP_TEXTS_FILE, tmp)
    for old in parent.iterdir():  # keep the new set and the one a reader may still have open
        if old.is_dir() and old.name not in (set_id, previous) and not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def open_concepts(store: Path, sae_id: str | None) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(concepts, texts, folder) of the current set, every file checked, made from the SAE `sae_id`."""
    folder, manifest = open_set(store / CONCEPTS_DIR, store / POINTER, RERUN_04)
    if manifest.get("sae_id") != sae_id:
        raise ConceptsMismatchError(f"the concepts in {folder} were found with SAE {manifest.get('sae_id')}, but the "
                                    f"current SAE is {sae_id}. {RERUN_04}")
    concepts = json.loads((folder / CONCEPTS_FILE).read_text())
    texts = json.loads((folder / TEXTS_FILE).read_text())
    return concepts, texts, folder
