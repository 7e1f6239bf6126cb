"""Stage 04's labels against the labeller it used before (bench/history/old_labeller.py), on the same held-out
tokens and windows, in one run, on the store's trained SAE.

    .venv/bin/python bench/bench_labels.py [any setting]

The concept texts' codes are collected once. Both labellers see only the choosing half: the new one
its tokens (saekit.concepts.labels), the old one the top examples of each latent among its texts (what it was
given before, minus the other half). Both are then scored on the scoring half by the same code:
  - F1 (and precision, recall) of "the label matches at this token" against "the latent fires here",
    over every token that can fire. An old label matches where the new rules would read it: a peak
    token at the token, "before X" at the next token, "predicts X" at the next token, a context
    n-gram anywhere within 3 tokens, as the old rule looked for it near the peak;
  - detection (balanced accuracy) on the same held-out windows: the old keyword test for old labels,
    saekit.concepts.labels.window_scores for new ones.
Results: bench/results/labels.json.
"""
import sys
from collections import Counter

import numpy as np

from common import save_result, timer

from history.old_labeller import contains, make_label, norm
from saekit.activations.data import load_role_texts
from saekit.activations.models import load_model, resolve_layer
from saekit.base.settings import load_settings
from saekit.concepts.collect import collect, scoring_half, scoring_windows, text_peaks, top_peaks, window
from saekit.concepts.labels import balanced_accuracy, choose_labels, token_keys, window_scores
from saekit.concepts.output_side import output_sides
from saekit.training.sae import TopKSAE

settings = load_settings(sys.argv[1:])
context = settings.CONTEXT_TOKENS
sae, _ = TopKSAE.load(settings.store / "sae_model" / "topk_sae.pt")
model, tokenizer = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models")
texts = load_role_texts(settings, "eval").texts
layer = resolve_layer(model, settings.LAYER_SIGNATURE)
codes = collect(model, tokenizer, layer, sae, texts,
                max_length=settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE)
token, latent, _ = codes.firing
live = sorted(set(latent.tolist()))
# the direct lens where the layer is the residual stream, nothing elsewhere: measuring every latent's
# output side would cost a forward pass each, and the labeller's comparison does not need it
sides, _ = output_sides(model, tokenizer, layer, sae, live, [], {}, [], settings.BATCH_SIZE_SAVE)
promoted = {i: [t for t, _ in sides[i]["promoted"]] for i in live}
is_scoring = scoring_half(len(texts), settings.SEED)
scoring_tokens = codes.countable & is_scoring[codes.doc]
keys = token_keys(codes)
with timer() as t_new:
    labels = choose_labels(codes, keys, is_scoring, live, promoted, settings.LABEL_MAX_KEYS, settings.LABEL_MIN_F1,
                           settings.LABEL_MIN_SUPPORT)
peaks = text_peaks(codes)
windows = scoring_windows(codes, peaks, live, settings.SCORING_EXAMPLES, context, is_scoring,
                          np.random.default_rng(settings.SEED))

# --- the old labeller, given the choosing half ---------------------------------------------------
old_words = np.array([norm(codes.token_text[int(t)]) for t in codes.token_ids], dtype=object)
choosing = peaks.where(~is_scoring[codes.doc[peaks.token]])
old_top = top_peaks(choosing, settings.TOP_N_EXAMPLES, codes.n_latents)
background = Counter()
for doc in np.flatnonzero(~is_scoring):
    words = old_words[codes.doc_start[doc]:codes.doc_start[doc + 1]].tolist()
    background.update((w,) for w in words)
    background.update(tuple(words[i:i + 2]) for i in range(len(words) - 1))
background_total = int(codes.countable[~is_scoring[codes.doc]].sum())


def old_example(peak: int) -> dict:
    start, stop = window(codes, peak, context)
    return {"token_str": codes.token_text[int(codes.token_ids[peak])],
            "context": {"tokens": codes.token_strings(np.arange(start, stop)), "peak": peak - start}}


def shifted(mask: np.ndarray, by: int) -> np.ndarray:
    """mask[i + by] at token i, False where i + by is in another text."""
    source = np.arange(len(mask)) + by
    ok = (source >= 0) & (source < len(mask))
    ok[ok] = codes.doc[source[ok]] == codes.doc[ok]
    out = np.zeros_like(mask)
    out[ok] = mask[source[ok]]
    return out


def old_matches(rule: str, keywords: list[tuple[str, ...]]) -> np.ndarray:
    """Where an old label matches, token by token."""
    if rule == "peak token":
        return np.isin(old_words, [k[0] for k in keywords])
    if rule in ("next token", "logit lens"):
        return shifted(np.isin(old_words, [k[0] for k in keywords]), 1)
    gram = keywords[0]
    starts = np.ones(len(old_words), bool)
    for j, word in enumerate(gram):
        starts &= shifted(old_words == word, j)
    return np.any([shifted(starts, offset) for offset in range(-3, 4 - (len(gram) - 1))], 0)


def token_scores(matches: np.ndarray, fires: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F1) over the scoring half's tokens."""
    predicted, firing = int((matches & scoring_tokens).sum()), int((fires & scoring_tokens).sum())
    hits = int((matches & fires & scoring_tokens).sum())
    return (hits / predicted if predicted else 0.0, hits / firing if firing else 0.0,
            2 * hits / (predicted + firing) if predicted + firing else 0.0)


def old_detection(keywords: list[tuple[str, ...]], centres: list[int]) -> list[bool]:
    found = []
    for centre in centres:
        start, stop = window(codes, centre, context)
        words = old_words[start:stop].tolist()
        found.append(any(contains(words, k) for k in keywords))
    return found


rows = []
starts = np.searchsorted(latent, np.arange(codes.n_latents + 1))
for i in live:
    fires = np.zeros(len(codes.token_ids), bool)
    fires[token[starts[i]:starts[i + 1]]] = True
    new = labels[i]
    new_detection, new_fuzzing = window_scores(codes, keys, new, windows[i], context)
    row = {"latent": i, "frequency": float(fires.sum() / codes.n_tokens), "new_label": new.text,
           "new_rule": new.rule if new.explained else "unexplained", "new_f1": new.f1, "new_precision": new.precision,
           "new_recall": new.recall, "new_detection": new_detection, "new_fuzzing": new_fuzzing}
    generic = token_scores(np.isin(keys.keys[new.rule], new.key_ids) if new.rule else np.zeros_like(fires), fires)
    assert abs(generic[2] - new.f1) < 1e-9, (i, generic, new.f1)  # the fast path counts what this counts
    top = [old_example(int(t)) for t in choosing.token[old_top[i]]]
    if top:
        text, rule, keywords = make_label(top, promoted[i], background, background_total)
        precision, recall, f1 = token_scores(old_matches(rule, keywords), fires)
        detection = balanced_accuracy(old_detection(keywords, windows[i].activating),
                                      old_detection(keywords, windows[i].silent))
    else:  # it fires only on the scoring half: the old labeller had nothing to label from
        text, rule, precision, recall, f1, detection = "(no examples)", "none", 0.0, 0.0, 0.0, None
    rows.append({**row, "old_label": text, "old_rule": rule, "old_f1": f1, "old_precision": precision,
                 "old_recall": recall, "old_detection": detection})


def distribution(values: list) -> dict:
    v = np.array([x for x in values if x is not None], float)
    return {"n": int(len(v)), "unscored": len(values) - int(len(v)), "median": float(np.median(v)),
            "mean": float(v.mean()), "p25": float(np.percentile(v, 25)), "p75": float(np.percentile(v, 75)),
            "share_at_least_0.3": float((v >= 0.3).mean()), "share_at_least_0.5": float((v >= 0.5).mean())}


result = {
    "texts": len(texts), "tokens": codes.n_tokens, "scoring_texts": int(is_scoring.sum()),
    "scoring_tokens": int(scoring_tokens.sum()), "live_latents": len(live), "new_labelling_seconds": t_new["seconds"],
    "scores": {f"{who}_{what}": distribution([r[f"{who}_{what}"] for r in rows])
               for who in ("new", "old") for what in ("f1", "precision", "recall", "detection")},
    "new_fuzzing": distribution([r["new_fuzzing"] for r in rows]),
    "new_explained": sum(1 for r in rows if r["new_rule"] != "unexplained"),
    "new_rules": Counter(r["new_rule"] for r in rows), "old_rules": Counter(r["old_rule"] for r in rows),
    "most_frequent": sorted(rows, key=lambda r: -r["frequency"])[:15],
}
s = result["scores"]
print(f"{len(texts)} texts ({result['scoring_texts']} scoring, {result['scoring_tokens']} tokens); "
      f"{len(live)} live latents; "
      f"new labels in {t_new['seconds']:.1f} s")
for what in ("f1", "precision", "recall", "detection"):
    print(f"{what:>10}: new median {s['new_' + what]['median']:.3f} mean {s['new_' + what]['mean']:.3f} | "
          f"old median {s['old_' + what]['median']:.3f} mean {s['old_' + what]['mean']:.3f} "
          f"(unscored: new {s['new_' + what]['unscored']}, old {s['old_' + what]['unscored']})")
print(f"explained (F1 >= {settings.LABEL_MIN_F1}): {result['new_explained']} of {len(live)}; "
      f"new rules {dict(result['new_rules'])}")
for r in result["most_frequent"][:8]:
    print(f"  {r['latent']:>5} {100 * r['frequency']:5.2f}%  new F1 {r['new_f1']:.2f} {r['new_label'][:50]!r:52} "
          f"old F1 {r['old_f1']:.2f} {r['old_label'][:40]!r}")
save_result("labels", "python bench/bench_labels.py " + " ".join(sys.argv[1:]), result)
