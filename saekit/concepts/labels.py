"""Stage 04, labels: for every live latent, the simple rule that best predicts the tokens it fires on,
chosen on one half of the held-out texts and scored on the other.

A rule says "the latent fires here" when a key read at the token is in a small set of keys:

    token            the token itself, stripped and lower-cased: {"kite", "kites"}
    previous token   the token before it
    next token       the token after it
    bigram ending    the token before and the token:   the [kite]
    bigram starting  the token and the one after:      [kite] flew
    trigram          before, token, after:             the [kite] flew
    output side      the next token, restricted to the 10 tokens the latent's output side promotes
                     (saekit.concepts.output_side: measured, or the direct lens where it holds)

Choosing, on the choosing half: per rule and latent, keys are ranked by the share of their tokens on
which the latent fires (add-one smoothed, so a key seen once does not lead) and the prefix of at most
`max_keys` keys with the best F1 is kept (F1 = 2 TP / (predicted + fires) is best at a precision
threshold, so a ranked prefix is the optimum for the ranking). A key must at least double the
latent's base rate (a frequent latent that fires at random is not "explained" by common tokens), and
have fired in at least MIN_TEXTS texts unless no key of any rule has. The rule with the best F1
wins; the cheaper (listed first) on ties.

Scoring, on the scoring half: precision, recall and F1 of the chosen rule over every token that can
fire, with a 95% interval for the F1 from a bootstrap over the scoring texts (tokens of one text are
not independent). A latent that fires on fewer than `min_support` distinct tokens of the scoring half
is *not scorable*: a handful of firings gives F1 = 1.0 by luck, so it is neither explained nor
unexplained, and is left out of the explained share. Below `min_f1` a scorable latent is labelled
unexplained, with its best attempt and that attempt's score. Every live latent gets a label.

The same rule is also scored delphi's way on windows of the scoring half (`window_scores`):
detection (matches somewhere in activating windows, nowhere in silent ones) and fuzzing (matches
the marked peak, not a marked token where the latent is silent), each a balanced accuracy. These
are the scores a model-written name has to beat (saekit.concepts.naming).

The direct (logit) lens: a latent's decoder direction pushed through the final norm's gain and the
unembedding, skipping the blocks in between: a first-order view of what it promotes, true only where
the SAE reads the residual stream (saekit.concepts.output_side says where, and measures the rest).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..activations.models import final_norm_gain
from ..training.sae import TopKSAE
from .collect import HeldoutCodes, ScoringWindows, window

RULES = ("token", "previous token", "next token", "bigram ending", "bigram starting", "trigram", "output side")
LENS_TOKENS = 10  # promoted tokens that the output-side rule may use
MIN_LIFT = 2.0  # a key must at least double the latent's base firing rate
# A key must have fired in this many choosing texts: one text's quirks rarely generalise (on the demo
# store the median held-out F1 rises from 0.17 to 0.22; 3 texts is worse). A latent with no such key
# falls back to keys seen in one text, so that it still gets a best attempt.
MIN_TEXTS = 2


def normalise(token_text: str) -> str:
    """The key of a token: stripped and lower-cased; whitespace made visible."""
    return token_text.strip().lower() or token_text.replace("\n", "↵").replace(" ", "␣").replace("\t", "⇥")


@dataclass
class TokenKeys:
    """For each rule, the key it reads at every token (-1: the rule cannot match there), and the
    normalised tokens each key stands for."""

    keys: dict[str, np.ndarray]
    words: dict[str, list[tuple[str, ...]]]
    word_index: dict[str, int]  # normalised token -> its key in the single-token rules


def _combine(columns: list[np.ndarray], vocab: list[str]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Keys of tuples of word keys (an n-gram), -1 where any part is missing."""
    stacked = np.stack(columns, 1)
    valid = (stacked >= 0).all(1)
    keys = np.full(len(stacked), -1, np.int64)
    grams, inverse = np.unique(stacked[valid], axis=0, return_inverse=True)
    keys[valid] = inverse.ravel()
    return keys, [tuple(vocab[w] for w in gram) for gram in grams]


def token_keys(codes: HeldoutCodes) -> TokenKeys:
    vocab = sorted({normalise(text) for text in codes.token_text.values()})
    word_index = {w: i for i, w in enumerate(vocab)}
    key_of_id = {token_id: word_index[normalise(text)] for token_id, text in codes.token_text.items()}
    word = np.array([key_of_id[int(t)] for t in codes.token_ids], np.int64)
    first = codes.pos == 0
    last = np.r_[codes.doc[1:] != codes.doc[:-1], True]
    before = np.where(first, -1, np.roll(word, 1))
    after = np.where(last, -1, np.roll(word, -1))
    can_fire = codes.countable
    singles = [(w,) for w in vocab]
    keys = {"token": word, "previous token": before, "next token": after}
    words = {rule: singles for rule in keys}
    for rule, columns in (("bigram ending", [before, word]), ("bigram starting", [word, after]),
                          ("trigram", [before, word, after])):
        keys[rule], words[rule] = _combine(columns, vocab)
    keys["output side"], words["output side"] = after, singles
    return TokenKeys({rule: np.where(can_fire, k, -1) for rule, k in keys.items()}, words, word_index)


# --- choosing and scoring ------------------------------------------------------------------------

def _pair_counts(codes: HeldoutCodes, keys: np.ndarray, tokens: np.ndarray,
                 n_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latent * n_keys + key, firing tokens, texts they are in) for every (latent, key) that co-occur
    on `tokens` (a mask)."""
    token, latent, _ = codes.firing
    keep = tokens[token] & (keys[token] >= 0)
    pair = latent[keep] * n_keys + keys[token[keep]]
    pairs, fires = np.unique(pair, return_counts=True)
    pair_in_text = np.unique(np.stack([pair, codes.doc[token[keep]].astype(np.int64)], 1), axis=0)[:, 0]
    return pairs, fires, np.unique(pair_in_text, return_counts=True)[1]


def _run_starts(sorted_groups: np.ndarray) -> np.ndarray:
    """For each row of an array sorted by group, the index where its group's run begins."""
    starts = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1] if len(sorted_groups) else np.r_[0]
    return np.repeat(starts, np.diff(np.r_[starts, len(sorted_groups)]))[:len(sorted_groups)]


def _grouped_cumsum(values: np.ndarray, run_start: np.ndarray) -> np.ndarray:
    total = np.cumsum(values)
    return total - total[run_start] + values[run_start]


@dataclass
class Choice:
    """Per latent, the best key set of one rule on the choosing half."""

    f1: np.ndarray  # [n_latents], 0 where the rule found no key
    keys: dict[int, np.ndarray]


def _choose(pairs: np.ndarray, fires: np.ndarray, totals: np.ndarray, latent_fires: np.ndarray, n_tokens: int,
            n_keys: int, max_keys: int) -> Choice:
    latent, key = pairs // n_keys, pairs % n_keys
    total = totals[key]
    smoothed = fires / (total + 1)
    lifted = smoothed > MIN_LIFT * latent_fires[latent] / max(n_tokens, 1)
    latent, key, fires, total, smoothed = (a[lifted] for a in (latent, key, fires, total, smoothed))
    order = np.lexsort((-fires, -smoothed, latent))
    latent, key, fires, total = latent[order], key[order], fires[order], total[order]
    run_start = _run_starts(latent)
    rank = np.arange(len(latent)) - run_start
    within = rank < max_keys
    latent, key, fires, total, rank = latent[within], key[within], fires[within], total[within], rank[within]
    run_start = _run_starts(latent)
    f1 = 2 * _grouped_cumsum(fires, run_start) / (_grouped_cumsum(total, run_start) + latent_fires[latent])
    best = np.lexsort((rank, -f1, latent))
    first = best[np.r_[True, latent[best][1:] != latent[best][:-1]]] if len(best) else best
    chosen_f1 = np.zeros(len(latent_fires))
    chosen_f1[latent[first]] = f1[first]
    return Choice(chosen_f1, {int(latent[i]): key[run_start[i]:i + 1] for i in first})


@dataclass
class Label:
    """A latent's label: the rule, its keys, and its scores on the scoring half."""

    text: str
    rule: str | None  # None: no rule matched anything on the choosing half
    keys: list[tuple[str, ...]]
    explained: bool
    precision: float
    recall: float
    f1: float
    choosing_f1: float
    scoring_fires: int  # distinct tokens of the scoring half on which the latent fires: the F1's support
    scorable: bool = True  # scoring_fires reaches LABEL_MIN_SUPPORT
    f1_low: float = 0.0  # 95% bootstrap interval of the F1 over the scoring texts
    f1_high: float = 0.0
    detection: float | None = None  # balanced accuracy on windows (set by window_scores)
    fuzzing: float | None = None
    key_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def window_score(self) -> float | None:
        """Mean of detection and fuzzing: what a name must beat to become the title."""
        parts = [s for s in (self.detection, self.fuzzing) if s is not None]
        return float(np.mean(parts)) if parts else None

    def as_json(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("key_ids")
        record["keys"] = [list(k) for k in self.keys]
        return record


def describe(rule: str, keys: list[tuple[str, ...]]) -> str:
    """A rule and its keys as a short text, the firing token in brackets where it helps."""
    shown = keys[:6]
    if rule == "token":
        return " | ".join(k[0] for k in shown)
    if rule in ("previous token", "next token", "output side"):
        prefix = {"previous token": "after", "next token": "before", "output side": "predicts"}[rule]
        return f"{prefix}: " + " | ".join(k[0] for k in shown)
    marked = {"bigram ending": lambda k: f"{k[0]} [{k[1]}]", "bigram starting": lambda k: f"[{k[0]}] {k[1]}",
              "trigram": lambda k: f"{k[0]} [{k[1]}] {k[2]}"}[rule]
    return " | ".join(marked(k) for k in shown)


def not_scorable(firing: int, min_support: int, attempt: str) -> str:
    return f"not scorable (fires on {firing} scoring token{'s' * (firing != 1)}, fewer than {min_support}; {attempt})"


def choose_labels(codes: HeldoutCodes, keys: TokenKeys, is_scoring_doc: np.ndarray, live: list[int],
                  promoted: dict[int, list[str]], max_keys: int, min_f1: float, min_support: int,
                  seed: int = 0) -> dict[int, Label]:
    """A label for every latent in `live`, chosen on the texts not in `is_scoring_doc`, scored on those in it.

    `promoted`: per latent, the tokens its output side promotes (for the logit-lens rule); `min_support`:
    the distinct scoring firings below which a latent is not scorable; `seed`: the bootstrap's."""
    scoring_token = is_scoring_doc[codes.doc]
    halves = {"choosing": codes.scorable & ~scoring_token, "scoring": codes.scorable & scoring_token}
    token, latent, _ = codes.firing
    fires = {half: np.bincount(latent[mask[token]], minlength=codes.n_latents) for half, mask in halves.items()}
    supported, any_support, scored = {}, {}, {}
    for rule in RULES:
        rule_keys, n_keys = keys.keys[rule], len(keys.words[rule])
        pairs, pair_fires, pair_texts = _pair_counts(codes, rule_keys, halves["choosing"], n_keys)
        if rule == "output side":  # only pairs of a latent and a token its output side promotes
            allowed = [lat * n_keys + keys.word_index[normalise(t)] for lat, tokens in promoted.items()
                       for t in tokens[:LENS_TOKENS] if normalise(t) in keys.word_index]
            inside = np.isin(pairs, allowed)
            pairs, pair_fires, pair_texts = pairs[inside], pair_fires[inside], pair_texts[inside]
        totals = np.bincount(rule_keys[halves["choosing"] & (rule_keys >= 0)], minlength=n_keys)
        supported[rule], any_support[rule] = (
            _choose(pairs[keep], pair_fires[keep], totals, fires["choosing"], int(halves["choosing"].sum()), n_keys,
                    max_keys) for keep in (pair_texts >= MIN_TEXTS, pair_texts >= 1))
        scored[rule] = (_pair_counts(codes, rule_keys, halves["scoring"], n_keys)[:2],
                        np.bincount(rule_keys[halves["scoring"] & (rule_keys >= 0)], minlength=n_keys))
    interval = F1Interval(codes, halves["scoring"], seed)
    f1_supported = np.stack([supported[rule].f1 for rule in RULES])
    f1_any = np.stack([any_support[rule].f1 for rule in RULES])
    has_supported = f1_supported.max(0) > 0
    best_rule = np.where(has_supported, f1_supported.argmax(0), f1_any.argmax(0))  # first best: the cheaper rule
    labels = {}
    for lat in live:
        rule = RULES[best_rule[lat]]
        key_ids = (supported if has_supported[lat] else any_support)[rule].keys.get(lat)
        firing = int(fires["scoring"][lat])
        scorable = firing >= min_support
        if key_ids is None:
            attempt = "no rule found on the choosing half"
            labels[lat] = Label(f"unexplained ({attempt})" if scorable else not_scorable(firing, min_support, attempt),
                                None, [], False, 0.0, 0.0, 0.0, 0.0, firing, scorable)
            continue
        (pairs, pair_fires), totals = scored[rule]
        n_keys = len(keys.words[rule])
        wanted = lat * n_keys + key_ids
        at = np.clip(np.searchsorted(pairs, wanted), 0, max(len(pairs) - 1, 0))
        true_positives = int(pair_fires[at][pairs[at] == wanted].sum()) if len(pairs) else 0
        predicted = int(totals[key_ids].sum())
        precision = true_positives / predicted if predicted else 0.0
        recall = true_positives / firing if firing else 0.0
        f1 = 2 * true_positives / (predicted + firing) if predicted + firing else 0.0
        words = [keys.words[rule][k] for k in key_ids]
        attempt = describe(rule, words)
        explained = scorable and f1 >= min_f1
        if not scorable:
            text = not_scorable(firing, min_support, f"best attempt: {attempt}")
        else:
            text = attempt if explained else f"unexplained (best attempt: {attempt}; F1 {f1:.2f})"
        choosing_f1 = (f1_supported if has_supported[lat] else f1_any)[best_rule[lat], lat]
        low, high = interval(lat, keys.keys[rule], key_ids)
        labels[lat] = Label(text, rule, words, explained, precision, recall, f1, float(choosing_f1), firing,
                            scorable, low, high, key_ids=key_ids)
    return labels


class F1Interval:
    """95% intervals of a rule's F1 by a bootstrap over the scoring texts: texts are drawn with
    replacement (the same draws for every latent) and the F1 recomputed from their summed counts."""

    DRAWS = 1000

    def __init__(self, codes: HeldoutCodes, scoring: np.ndarray, seed: int):
        self.codes, self.tokens = codes, np.flatnonzero(scoring)
        docs, self.text_of = np.unique(codes.doc[self.tokens], return_inverse=True)
        self.text_of = self.text_of.ravel()
        self.n_texts = len(docs)
        self.row_of_doc = np.full(len(codes.texts), -1)
        self.row_of_doc[docs] = np.arange(len(docs))
        rng = np.random.default_rng(seed)
        self.weights = rng.multinomial(self.n_texts, np.full(self.n_texts, 1 / max(self.n_texts, 1)), self.DRAWS) \
            if self.n_texts else np.zeros((self.DRAWS, 0))
        token, latent, _ = codes.firing
        keep = scoring[token]
        self.firing_token, self.firing_latent = token[keep], latent[keep]

    def counts(self, latent: int, rule_keys: np.ndarray, key_ids: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per scoring text: (true positives, predicted, firing) of the rule for `latent`."""
        fires = self.firing_token[self.firing_latent == latent]
        predicted = np.isin(rule_keys[self.tokens], key_ids)
        hit = np.isin(rule_keys[fires], key_ids)
        rows = self.row_of_doc[self.codes.doc[fires]]
        return tuple(np.bincount(r, minlength=self.n_texts)
                     for r in (rows[hit], self.text_of[predicted], rows))

    def __call__(self, latent: int, rule_keys: np.ndarray, key_ids: np.ndarray) -> tuple[float, float]:
        tp, predicted, fires = (self.weights @ c for c in self.counts(latent, rule_keys, key_ids))
        f1 = np.divide(2 * tp, predicted + fires, out=np.zeros(len(tp)), where=predicted + fires > 0)
        return float(np.percentile(f1, 2.5)), float(np.percentile(f1, 97.5))


# --- window scores (delphi's detection and fuzzing) ----------------------------------------------

def balanced_accuracy(on_positives: list[bool], on_negatives: list[bool]) -> float | None:
    """Balanced accuracy of a detector from its answers on truly positive and truly negative items."""
    if not on_positives or not on_negatives:
        return None
    return (sum(on_positives) / len(on_positives) + 1 - sum(on_negatives) / len(on_negatives)) / 2


def rule_matches(keys: TokenKeys, label: Label, tokens: np.ndarray) -> np.ndarray:
    if label.rule is None:
        return np.zeros(len(tokens), bool)
    return np.isin(keys.keys[label.rule][tokens], label.key_ids)


def window_scores(codes: HeldoutCodes, keys: TokenKeys, label: Label, windows: ScoringWindows,
                  context: int) -> tuple[float | None, float | None]:
    """(detection, fuzzing) balanced accuracies of the label's rule on the windows."""
    def matches_somewhere(centre: int) -> bool:
        start, stop = window(codes, centre, context)
        return bool(rule_matches(keys, label, np.arange(start, stop)).any())

    detection = balanced_accuracy([matches_somewhere(t) for t in windows.activating],
                                  [matches_somewhere(t) for t in windows.silent])
    marked = [(peak, decoy) for peak, decoy in zip(windows.activating, windows.decoys) if decoy is not None]
    fuzzing = balanced_accuracy(rule_matches(keys, label, np.array([p for p, _ in marked], np.int64)).tolist(),
                                rule_matches(keys, label, np.array([d for _, d in marked], np.int64)).tolist())
    return detection, fuzzing


# --- the direct (logit) lens ----------------------------------------------------------------------

@torch.no_grad()
def logit_lens(model, sae: TopKSAE, top: int = 10, chunk: int = 256) -> tuple[torch.Tensor, ...]:
    """(promoted ids, values, suppressed ids, values), each [n_latents, top]."""
    unembed = model.get_output_embeddings().weight.float().cpu()
    gain = final_norm_gain(model)  # the model's final norm, per architecture; refused where none is known
    results = [[], [], [], []]
    for lo in range(0, sae.n_latents, chunk):
        logits = (sae.W_dec[lo:lo + chunk].float().cpu() * gain) @ unembed.T
        up, down = logits.topk(top, dim=1), (-logits).topk(top, dim=1)
        for store, value in zip(results, (up.indices, up.values, down.indices, -down.values)):
            store.append(value)
    return tuple(torch.cat(r) for r in results)
