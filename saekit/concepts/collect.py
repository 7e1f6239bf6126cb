"""Stage 04, collecting: the SAE's codes on every held-out token, and the examples drawn from them.

The SAE is hooked onto its layer and the forward pass stops there, since nothing after the layer is
needed to read the codes. For every real token of every text the pass keeps the token id and the
indices and values of its k active latents, a few dozen bytes a token (k = 8: 25k tokens of the demo
take 2 MB, 128k tokens of the specification's 1,000 texts 8 MB). Everything after it (statistics,
examples, labels, the scoring of names) reads these codes, so the model runs once.

Special tokens (BOS, EOS, padding) count as silent: they never carry a peak. Ranking uses the TopK
code, so a latent that never wins a TopK slot gets no examples (mi_crow ranks by pre-activation;
see observations.md).

Examples are references: (text, position of the peak, activation), never copies of the text. Per
latent and text only the peak counts, so the top examples are the texts where the latent peaks
highest, one example per text.

A causal model gives bit-identical codes to identical prefixes, and many stories share an opening
(65 of the demo's 200 evaluation texts begin "Once upon a time"). So every token is keyed by the
tokens up to it (its prefix), and only the first token with a given prefix is *distinct*: examples,
samples, labels and their scores read distinct tokens only, so one opening counts once, and a prefix
lies in one text, hence on one side of the choosing / scoring split. Statistics (frequency, maximum,
histogram) count every token: they describe the latent on the texts as they are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations.models import forward_to_layer
from ..base.distributed import World, gather_objects, share
from ..training.sae import TopKSAE, check_sae_width

HIST_EDGES = np.logspace(-3, 3, 61)  # activation histogram bins (log-spaced: any layer's scale fits)
QUANTILES = 4


@dataclass
class HeldoutCodes:
    """Every real token of the held-out texts, text after text, with its k active latents."""

    texts: list[str]
    token_ids: np.ndarray  # [N] token id
    doc: np.ndarray  # [N] the text each token belongs to
    pos: np.ndarray  # [N] its position in that text (BOS is 0)
    countable: np.ndarray  # [N] False for special tokens, which never fire
    latents: np.ndarray  # [N, k] the active latents of each token (-1 where the code is 0)
    values: np.ndarray  # [N, k] their codes
    n_latents: int
    token_text: dict[int, str]  # each token id decoded on its own (leading spaces kept)
    tokens_per_s: float = 0.0
    doc_start: np.ndarray = field(init=False)  # [n_texts + 1] where each text's tokens begin

    def __post_init__(self) -> None:
        self.doc_start = np.searchsorted(self.doc, np.arange(len(self.texts) + 1))

    @cached_property
    def prefix_id(self) -> np.ndarray:
        """[N] an id per token, equal for two tokens exactly when the tokens of their texts up to and
        including them are equal (a trie of the texts, built one position at a time)."""
        prefix = np.full(len(self.token_ids), -1, np.int64)
        next_id = 0
        for p in range(int(self.pos.max()) + 1 if len(self.pos) else 0):
            at = np.flatnonzero(self.pos == p)
            parent = prefix[at - 1] if p else np.full(len(at), -1, np.int64)
            _, node = np.unique(np.stack([parent, self.token_ids[at].astype(np.int64)], 1), axis=0,
                                return_inverse=True)
            prefix[at] = next_id + node.ravel()
            next_id += int(node.max()) + 1
        return prefix

    @cached_property
    def distinct(self) -> np.ndarray:
        """[N] True for the first token (in text order) of each prefix: the one copy that counts."""
        first = np.zeros(len(self.token_ids), bool)
        first[np.unique(self.prefix_id, return_index=True)[1]] = True
        return first

    @property
    def scorable(self) -> np.ndarray:
        """[N] tokens that examples, labels and scores read: distinct, and not special."""
        return self.countable & self.distinct

    @property
    def n_tokens(self) -> int:
        """Tokens that can fire (special tokens left out)."""
        return int(self.countable.sum())

    @cached_property
    def firing(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token, latent, value) of every positive code, sorted by latent, then token."""
        token, slot = np.nonzero(self.values > 0)
        latent = self.latents[token, slot]
        order = np.lexsort((token, latent))
        return token[order], latent[order].astype(np.int64), self.values[token, slot][order]

    def token_strings(self, tokens: np.ndarray) -> list[str]:
        return [self.token_text[int(t)] for t in self.token_ids[tokens]]


@torch.no_grad()
def collect(model, tokenizer, layer, sae: TopKSAE, texts: list[str], *, max_length: int, batch_size: int,
            progress: bool = True, world: World = World()) -> HeldoutCodes:
    """One pass over `texts` with the SAE attached at `layer`.

    Under torchrun each rank runs a contiguous share of the texts and the ranks' codes are put
    together in rank order on every rank: the same codes, exactly, as one process collects."""
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    device = next(model.parameters()).device
    ids_parts, latent_parts, value_parts, doc_parts = [], [], [], []
    started = time.perf_counter()
    first, stop = share(len(texts), world)
    for start in tqdm(range(first, stop, batch_size), desc="collecting codes", unit="batch", disable=not progress):
        enc = tokenizer(texts[start:min(start + batch_size, stop)], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device)
        hidden = forward_to_layer(model, layer, enc.input_ids, enc.attention_mask)
        check_sae_width(sae, hidden.shape[-1])
        values, latents = sae.encode(hidden.reshape(-1, sae.d_in).float())
        real = enc.attention_mask.bool().flatten().cpu()
        ids = enc.input_ids.flatten().cpu()[real]
        values, latents = values.cpu()[real], latents.cpu()[real]
        values[torch.isin(ids, special_ids)] = 0  # special tokens never count as a peak
        ids_parts.append(ids)
        value_parts.append(values)
        latent_parts.append(torch.where(values > 0, latents, -1))
        doc_parts.append((torch.arange(start, start + len(enc.input_ids)).unsqueeze(1)
                          .expand_as(enc.input_ids).flatten()[real]))
    parts = [_join_rows(part) if part else None for part in (ids_parts, latent_parts, value_parts, doc_parts)]
    if world.distributed:  # every rank's codes, in rank order: the order of the texts
        parts = [_join_rows([p for p in ranked if p is not None]) for ranked in zip(*gather_objects(parts, world))]
    ids_all, latents_all, values_all, doc_all = parts
    ids = ids_all.numpy()
    doc = doc_all.numpy().astype(np.int32)
    doc_start = np.searchsorted(doc, np.arange(len(texts) + 1))
    pos = (np.arange(len(doc)) - doc_start[doc]).astype(np.int32)
    return HeldoutCodes(texts=list(texts), token_ids=ids, doc=doc, pos=pos,
                        countable=~np.isin(ids, special_ids.numpy()),
                        latents=latents_all.numpy().astype(np.int32),
                        values=values_all.numpy().astype(np.float32), n_latents=sae.n_latents,
                        token_text={int(t): tokenizer.decode([int(t)]) for t in np.unique(ids)},
                        tokens_per_s=len(ids) / (time.perf_counter() - started))


def _join_rows(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Blocks of rows joined in order. A BatchTopK or JumpReLU SAE encodes each batch as wide as that
    batch's most active token, so narrower blocks of codes are padded with no latent (-1) at value 0."""
    if blocks[0].dim() == 1:
        return torch.cat(blocks)
    width = max(block.shape[1] for block in blocks)
    return torch.cat([F.pad(block, (0, width - block.shape[1]), value=-1 if block.dtype == torch.long else 0)
                      for block in blocks])


# --- statistics ----------------------------------------------------------------------------------

@dataclass
class LatentStats:
    fire_counts: np.ndarray  # [n_latents] tokens on which each latent fires
    activation_sums: np.ndarray
    max_activation: np.ndarray
    histogram: np.ndarray  # [n_latents, len(HIST_EDGES) - 1] firing activations per bin


def latent_stats(codes: HeldoutCodes) -> LatentStats:
    _, latent, value = codes.firing
    n, bins = codes.n_latents, len(HIST_EDGES) - 1
    max_activation = np.zeros(n, np.float32)
    np.maximum.at(max_activation, latent, value)
    which_bin = np.clip(np.searchsorted(HIST_EDGES, value) - 1, 0, bins - 1)
    histogram = np.bincount(latent * bins + which_bin, minlength=n * bins).reshape(n, bins)
    return LatentStats(np.bincount(latent, minlength=n), np.bincount(latent, weights=value, minlength=n),
                       max_activation, histogram)


# --- the two halves ------------------------------------------------------------------------------

def scoring_half(n_texts: int, seed: int) -> np.ndarray:
    """[n_texts] True for the texts whose tokens score labels and names; the others choose them.

    Split by text, not token, so that no text informs both the choice and its score."""
    is_scoring = np.zeros(n_texts, bool)
    is_scoring[np.random.default_rng(seed).permutation(n_texts)[n_texts // 2:]] = True
    return is_scoring


# --- examples ------------------------------------------------------------------------------------

@dataclass
class Peaks:
    """Per (latent, text) where the latent fires, its highest activation there: rows sorted by latent."""

    latent: np.ndarray
    token: np.ndarray  # flat index of the peak token
    value: np.ndarray

    def where(self, keep: np.ndarray) -> "Peaks":
        return Peaks(self.latent[keep], self.token[keep], self.value[keep])


def text_peaks(codes: HeldoutCodes) -> Peaks:
    """Per (latent, text), its peak among the text's distinct tokens (a shared opening counts once)."""
    token, latent, value = codes.firing
    keep = codes.distinct[token]
    token, latent, value = token[keep], latent[keep], value[keep]
    order = np.lexsort((-value, codes.doc[token], latent))
    token, latent, value = token[order], latent[order], value[order]
    group = latent * len(codes.texts) + codes.doc[token]
    first = np.r_[True, group[1:] != group[:-1]]
    return Peaks(latent[first], token[first], value[first])


def _first_per_latent(latent_sorted: np.ndarray, n: int) -> np.ndarray:
    """Mask of the first `n` rows of each latent's run in an array sorted by latent."""
    starts = np.r_[0, np.flatnonzero(latent_sorted[1:] != latent_sorted[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(latent_sorted)]))
    return np.arange(len(latent_sorted)) - run_start < n


def _by_latent(latent_sorted: np.ndarray, items: np.ndarray, n_latents: int) -> list[np.ndarray]:
    return np.split(items, np.searchsorted(latent_sorted, np.arange(1, n_latents)))


def top_peaks(peaks: Peaks, n: int, n_latents: int) -> list[np.ndarray]:
    """Per latent, the indices into `peaks` of its `n` highest, best first."""
    order = np.lexsort((-peaks.value, peaks.latent))
    keep = order[_first_per_latent(peaks.latent[order], n)]
    return _by_latent(peaks.latent[keep], keep, n_latents)


def sampled_peaks(peaks: Peaks, n: int, n_latents: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per latent, the indices into `peaks` of `n` drawn uniformly from its texts."""
    order = np.lexsort((rng.random(len(peaks.latent)), peaks.latent))
    keep = order[_first_per_latent(peaks.latent[order], n)]
    return _by_latent(peaks.latent[keep], keep, n_latents)


@dataclass
class Interval:
    """One of a latent's equal-width activation intervals (low, high]: the firing tokens in it and the
    examples drawn from them."""

    number: int  # 1 (lowest) to QUANTILES
    low: float
    high: float
    count: int  # firing tokens whose activation lies in (low, high]: every firing token is in one interval
    examples: list[int]  # flat tokens, drawn at random


def peaks_its_window(codes: HeldoutCodes, latent: int, token: int, context: int) -> bool:
    """Whether `token` is the first highest activation of the latent in its window: the token a reader of
    the window (Neuronpedia's importers take max(values)) marks as the example's."""
    start, stop = window(codes, token, context)
    acts = latent_activations(codes, latent, start, stop)
    return int(np.argmax(acts)) == token - start


def interval_examples(latent: int, tokens: np.ndarray, values: np.ndarray, codes: HeldoutCodes, shown: set[int],
                      per_interval: int, context: int, rng: np.random.Generator) -> list[Interval]:
    """The non-empty intervals of (0, max] cut in QUANTILES equal widths, highest first, as SAEDashboard
    draws its interval groups. `tokens`, `values`: the latent's firing tokens and activations.

    Intervals are half-open, (low, high], so a value on an edge, ties included, is counted once; the
    counts sum to the firing count. Within each, up to `per_interval` examples are drawn uniformly at
    random among its distinct tokens that peak their window, one per text, none a token in `shown` (the
    top examples)."""
    if not len(values):
        return []
    edges = float(values.max()) * np.arange(QUANTILES + 1) / QUANTILES
    which = np.clip(np.searchsorted(edges, values, side="left") - 1, 0, QUANTILES - 1)
    intervals = []
    for number in range(QUANTILES, 0, -1):
        inside = which == number - 1
        if not inside.any():
            continue
        candidates = tokens[inside]
        candidates = candidates[codes.distinct[candidates] & ~np.isin(candidates, list(shown))]
        chosen, docs = [], set()
        for token in rng.permutation(candidates):
            if len(chosen) == per_interval:
                break
            if int(codes.doc[token]) not in docs and peaks_its_window(codes, latent, int(token), context):
                chosen.append(int(token))
                docs.add(int(codes.doc[token]))
        intervals.append(Interval(number, float(edges[number - 1]), float(edges[number]), int(inside.sum()), chosen))
    return intervals


def window(codes: HeldoutCodes, token: int, context: int) -> tuple[int, int]:
    """[start, stop) flat token range of the window of `context` tokens each side of `token`."""
    doc = codes.doc[token]
    return max(int(codes.doc_start[doc]), token - context), min(int(codes.doc_start[doc + 1]), token + context + 1)


def latent_activations(codes: HeldoutCodes, latent: int, start: int, stop: int) -> np.ndarray:
    """The latent's code on each token of [start, stop)."""
    return np.where(codes.latents[start:stop] == latent, codes.values[start:stop], 0).sum(1)


def silent_windows(codes: HeldoutCodes, latent: int, count: int, context: int, candidates: np.ndarray,
                   rng: np.random.Generator) -> list[int]:
    """Centre tokens of up to `count` windows, each in another text, centred on tokens drawn from
    `candidates`, where the latent is silent on every token."""
    firing_tokens = codes.firing[0][np.searchsorted(codes.firing[1], latent):
                                    np.searchsorted(codes.firing[1], latent, side="right")]
    centres, used_docs = [], set()
    for token in rng.choice(candidates, 8 * count + 8) if len(candidates) else []:
        start, stop = window(codes, int(token), context)
        doc = int(codes.doc[token])
        if doc in used_docs or np.searchsorted(firing_tokens, start) != np.searchsorted(firing_tokens, stop):
            continue
        centres.append(int(token))
        used_docs.add(doc)
        if len(centres) == count:
            break
    return centres


def decoy_token(codes: HeldoutCodes, latent: int, peak: int, context: int, rng: np.random.Generator) -> int | None:
    """A token in the peak's window where the latent is silent: the wrongly marked token of fuzzing."""
    start, stop = window(codes, peak, context)
    silent = (latent_activations(codes, latent, start, stop) == 0) & codes.countable[start:stop]
    options = np.flatnonzero(silent)
    return None if not len(options) else start + int(rng.choice(options))


@dataclass
class ScoringWindows:
    """Windows of one latent from the scoring half, on which its label and its name are both scored."""

    activating: list[int]  # peak tokens of activating windows, drawn uniformly from its texts there
    decoys: list[int | None]  # per activating window, a token where the latent is silent (fuzzing)
    silent: list[int]  # centre tokens of windows where the latent is silent throughout


def scoring_windows(codes: HeldoutCodes, peaks: Peaks, latents: list[int], count: int, context: int,
                    is_scoring_doc: np.ndarray, rng: np.random.Generator) -> dict[int, ScoringWindows]:
    """Up to `count` activating and `count` silent windows per latent, all from the scoring half."""
    in_scoring = peaks.where(is_scoring_doc[codes.doc[peaks.token]])
    sampled = sampled_peaks(in_scoring, count, codes.n_latents, rng)
    candidates = np.flatnonzero(codes.scorable & is_scoring_doc[codes.doc])
    windows = {}
    for latent in latents:
        activating = in_scoring.token[sampled[latent]].tolist()
        windows[latent] = ScoringWindows(activating, [decoy_token(codes, latent, t, context, rng) for t in activating],
                                         silent_windows(codes, latent, count, context, candidates, rng))
    return windows
