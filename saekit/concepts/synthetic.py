"""Held-out codes made up with latents of known behaviour, without a model: for the tests of labels,
names and the dashboard, and for the dashboard's benchmark at the specification's size.

Texts are BOS followed by words drawn with Zipf frequencies. Every token gets k latents drawn at
random (Zipf frequencies over the latents), which fire independently of the text: such a latent
has nothing to explain it. A planted latent fires exactly where its rule says, on top of those.
Tokens whose texts agree up to them get the codes of the first such token, as a causal model gives.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .collect import HeldoutCodes

BOS = "<s>"
# (previous word, word, next word) -> where a planted latent fires; words are indices into `words`, -1 outside a text
Rule = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def synthetic_codes(words: list[str], n_texts: int, length: int, n_latents: int, k: int,
                    planted: dict[int, Rule] | None = None, seed: int = 0) -> HeldoutCodes:
    rng = np.random.default_rng(seed)
    planted = planted or {}
    word_p = 1 / (np.arange(len(words)) + 5.0)
    text_words = rng.choice(len(words), (n_texts, length - 1), p=word_p / word_p.sum())
    token_ids = np.concatenate([np.zeros((n_texts, 1), int), text_words + 1], 1).ravel()  # id 0 is BOS
    doc = np.repeat(np.arange(n_texts, dtype=np.int32), length)
    pos = np.tile(np.arange(length, dtype=np.int32), n_texts)
    word = token_ids - 1
    first, last = pos == 0, pos == length - 1
    before = np.where(first, -1, np.roll(word, 1))
    after = np.where(last, -1, np.roll(word, -1))

    latent_p = 1 / (np.arange(n_latents) + 10.0)
    latent_p[list(planted)] = 0
    latents = rng.choice(n_latents, (len(token_ids), k), p=latent_p / latent_p.sum()).astype(np.int32)
    repeated = np.zeros_like(latents, bool)
    repeated[:, 1:] = (np.sort(latents, 1)[:, 1:] == np.sort(latents, 1)[:, :-1])
    latents = np.where(repeated, -1, np.sort(latents, 1))  # a latent takes one slot per token
    values = np.where(latents >= 0, rng.exponential(1.0, latents.shape) + 0.05, 0).astype(np.float32)
    for slot, (latent, rule) in enumerate(planted.items()):
        fires = rule(before, word, after) & ~first
        latents[fires, slot % k] = latent
        values[fires, slot % k] = 2 + rng.random(int(fires.sum()))
    latents[first], values[first] = -1, 0  # BOS never fires
    texts = [" ".join(words[w] for w in row) for row in text_words]
    token_text = {0: BOS, **{i + 1: " " + w for i, w in enumerate(words)}}
    codes = HeldoutCodes(texts, token_ids, doc, pos, ~first, latents, values, n_latents, token_text)
    # as in a causal model, tokens with the same prefix get the same codes: those of its first copy
    _, first_copy, copy_of = np.unique(codes.prefix_id, return_index=True, return_inverse=True)
    codes.latents, codes.values = latents[first_copy[copy_of.ravel()]], values[first_copy[copy_of.ravel()]]
    return codes


def synthetic_lens(words: list[str], latents: list[int], seed: int = 0) -> dict[int, dict[str, list]]:
    """Made-up output sides for each latent, in saekit.concepts.output_side.output_sides' format."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(words), (len(latents), 20))
    return {lat: {"method": "measured", "promoted": [[" " + words[w], round(2 - 0.1 * j, 2)] for j, w in enumerate(row[:10])],
                  "suppressed": [[" " + words[w], round(-1 + 0.05 * j, 2)] for j, w in enumerate(row[10:])]}
            for lat, row in zip(latents, picks)}
