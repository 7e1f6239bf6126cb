"""The labeller stage 04 used before issue 12 (saekit/concepts.py at commit 29d0e86), kept unchanged
as the baseline of bench/bench_labels.py: the first rule that fits a latent's top examples (dominant
peak token, next-token pattern, logit-lens outputs, distinctive n-gram near the peak), judged by
keyword detection on windows.

An example is {"token_str": the peak token, "context": {"tokens": the window's tokens, "peak": its index}}.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any


def norm(token: str) -> str:
    return token.strip().lower()


def _window_words(example: dict[str, Any]) -> list[str]:
    return [norm(t) for t in example["context"]["tokens"]]


def contains(words: list[str], keyword: tuple[str, ...]) -> bool:
    n = len(keyword)
    return any(tuple(words[i:i + n]) == keyword for i in range(len(words) - n + 1))


def make_label(top: list[dict[str, Any]], promoted: list[str], background: Counter,
               background_total: int) -> tuple[str, str, list[tuple[str, ...]]]:
    """(label, rule that made it, keywords that the label stands for)."""
    peaks = Counter(norm(e["token_str"]) for e in top if norm(e["token_str"]))
    if peaks:
        token, count = peaks.most_common(1)[0]
        if count >= 0.5 * len(top):
            return f'"{token}"', "peak token", [(token,)]
    nexts = Counter()
    for e in top:
        words = _window_words(e)
        peak = e["context"]["peak"]
        if peak + 1 < len(words) and words[peak + 1]:
            nexts[words[peak + 1]] += 1
    if nexts:
        token, count = nexts.most_common(1)[0]
        if count >= 0.5 * len(top):
            return f'before "{token}"', "next token", [(token,)]
    lens = [w for w in (norm(p) for p in promoted[:5]) if w]
    if lens and sum(nexts[w] for w in set(lens)) >= 0.3 * len(top):
        return "predicts " + ", ".join(f'"{w}"' for w in lens[:3]), "logit lens", [(w,) for w in lens]
    grams = Counter()
    for e in top:
        words = _window_words(e)
        peak = e["context"]["peak"]
        near = words[max(0, peak - 3):peak + 4]
        found = {(w,) for w in near if w.isalnum()} | {tuple(near[i:i + 2]) for i in range(len(near) - 1)
                                                        if all(x.isalnum() for x in near[i:i + 2])}
        grams.update(found)
    best, best_score = None, -math.inf
    for gram, count in grams.items():
        if count < 2:
            continue
        score = math.log(count / len(top)) - math.log((background[gram] + 1) / (background_total + 1))
        if score > best_score:
            best, best_score = gram, score
    if best is not None:
        return f'context "{" ".join(best)}"', "n-gram", [best]
    token = peaks.most_common(1)[0][0] if peaks else norm(top[0]["token_str"])
    return f'"{token}"', "peak token", [(token,)]
