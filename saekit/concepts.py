"""Stage 04: what each latent responds to, collected with the SAE attached to the model, and named.

Collecting. The SAE is hooked onto its layer; the forward pass stops there, since nothing after
the layer is needed to read the codes. For each text and latent only the maximum of the latent's
TopK code over the text's tokens counts (one example per text per latent), and those maxima are
merged into fixed [latents, N] buffers, so memory stays O(latents x N) whatever the dataset
size. Special tokens (BOS, EOS, padding) never count as a peak. Ranking uses the TopK code, so a
latent that never wins a TopK slot gets no examples (mi_crow ranks by pre-activation; see
observations.md).

Beside the top N, a uniform sample of each latent's activating texts (random priorities through
the same buffers) gives examples per activation quantile; a fixed background sample of texts, kept
with its sparse codes, gives non-activating windows (where the latent is silent throughout) and
n-gram background counts.

Naming. Every live latent gets a deterministic label without any model (the first rule that fits:
dominant peak token, next-token pattern, logit-lens outputs, distinctive n-grams), scored as a
keyword detector on held-out windows. The most frequent latents also get a one-line name written by
an instruct model from highlighted examples, scored by detection with the same model.

Logit lens: a latent's decoder direction is pushed through the final norm's weight and the
unembedding, skipping the blocks in between (and the MLP that reads this layer's output). It is
a rough first-order view of what the latent promotes, not a measurement.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import write_json, write_text
from .data import load_texts
from .models import detect_device, forward_to_layer, load_model, resolve_layer
from .sae import TopKSAE, check_sae_matches

HIST_EDGES = np.logspace(-3, 3, 61)  # activation histogram bins (log-spaced: any layer's scale fits)
QUANTILES = 4
NAME_PROMPT_VERSION = 3


class ExampleBuffer:
    """For every latent, the `size` candidates with the highest priority, with context windows."""

    def __init__(self, n_latents: int, size: int, window: int):
        self.priority = torch.full((n_latents, size), -math.inf)
        self.score = torch.zeros(n_latents, size)
        self.doc = torch.full((n_latents, size), -1, dtype=torch.long)
        self.pos = torch.zeros(n_latents, size, dtype=torch.long)
        self.ctx_ids = torch.full((n_latents, size, window), -1, dtype=torch.long)
        self.ctx_acts = torch.zeros(n_latents, size, window)

    def merge(self, priority, score, doc, pos, ctx_ids, ctx_acts) -> None:
        """Merge [n_latents, B] candidates (and their [n_latents, B, W] windows) into the buffer."""
        all_priority = torch.cat([self.priority, priority], 1)
        keep = all_priority.topk(self.priority.shape[1], dim=1).indices
        self.priority = all_priority.gather(1, keep)
        self.score = torch.cat([self.score, score], 1).gather(1, keep)
        self.doc = torch.cat([self.doc, doc], 1).gather(1, keep)
        self.pos = torch.cat([self.pos, pos], 1).gather(1, keep)
        window_keep = keep.unsqueeze(2).expand(-1, -1, self.ctx_ids.shape[2])
        self.ctx_ids = torch.cat([self.ctx_ids, ctx_ids], 1).gather(1, window_keep)
        self.ctx_acts = torch.cat([self.ctx_acts, ctx_acts], 1).gather(1, window_keep)

    def entries(self, latent: int) -> list[int]:
        """Slots of `latent` that hold an example, best first."""
        valid = torch.isfinite(self.priority[latent]).nonzero().squeeze(1)
        return valid[self.priority[latent, valid].argsort(descending=True)].tolist()


@dataclass
class Collection:
    """Everything stage 04 gathers in one pass over the texts."""

    texts: list[str]
    top: ExampleBuffer
    sample: ExampleBuffer
    fire_counts: torch.Tensor
    activation_sums: torch.Tensor
    max_activation: torch.Tensor
    histogram: torch.Tensor
    background_docs: list[int]
    background_ids: list[list[int]]  # real token ids of each background text
    background_latents: list[torch.Tensor]  # [tokens, k] indices of the latents firing on each token (-1: none)
    n_tokens: int
    tokens_per_s: float


@torch.no_grad()
def collect(model, tokenizer, layer, sae: TopKSAE, texts: list[str], *, top_n: int, context_tokens: int,
            sample_size: int, background_texts: int, max_length: int, batch_size: int, seed: int = 0,
            progress: bool = True) -> Collection:
    """One pass over `texts` with the SAE attached at `layer`."""
    n = sae.n_latents
    window = 2 * context_tokens + 1
    generator = torch.Generator().manual_seed(seed)
    top = ExampleBuffer(n, top_n, window)
    sample = ExampleBuffer(n, sample_size, window)
    fire_counts = torch.zeros(n, dtype=torch.long)
    activation_sums = torch.zeros(n, dtype=torch.float64)
    max_activation = torch.zeros(n)
    histogram = torch.zeros(n, len(HIST_EDGES) - 1, dtype=torch.long)
    background_docs = sorted(np.random.default_rng(seed).choice(len(texts), min(background_texts, len(texts)),
                                                                 replace=False).tolist())
    background_slot = {doc: i for i, doc in enumerate(background_docs)}
    background_ids: list[list[int]] = [[] for _ in background_docs]
    background_latents: list[torch.Tensor] = [torch.empty(0, sae.k, dtype=torch.long) for _ in background_docs]
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    device = next(model.parameters()).device
    offsets = torch.arange(-context_tokens, context_tokens + 1)
    n_tokens, started = 0, time.perf_counter()

    for start in tqdm(range(0, len(texts), batch_size), desc="collecting concepts", unit="batch", disable=not progress):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device)
        # the SAE is hooked on at the layer, and the forward pass stops right after it
        hidden = forward_to_layer(model, layer, enc.input_ids, enc.attention_mask)
        codes = sae.dense_codes(hidden.float()).cpu()  # [B, T, n_latents]
        ids, real = enc.input_ids.cpu(), enc.attention_mask.cpu().bool()
        countable = real & ~torch.isin(ids, special_ids)  # special tokens never count as a peak
        codes *= countable.unsqueeze(2)
        batch, length = ids.shape
        docs = torch.arange(start, start + batch)

        firing = codes > 0
        fire_counts += firing.sum((0, 1))
        activation_sums += codes.sum((0, 1), dtype=torch.float64)
        max_activation = torch.maximum(max_activation, codes.amax((0, 1)))
        lat_idx = firing.nonzero()[:, 2]
        bins = np.clip(np.searchsorted(HIST_EDGES, codes[firing].numpy()) - 1, 0, len(HIST_EDGES) - 2)
        histogram += torch.bincount(lat_idx * (len(HIST_EDGES) - 1) + torch.from_numpy(bins),
                                    minlength=histogram.numel()).view_as(histogram)
        n_tokens += int(countable.sum())

        score, pos = codes.max(dim=1)  # [B, n]: one example per text per latent
        score, pos = score.T.contiguous(), pos.T.contiguous()  # [n, B]
        positions = pos.unsqueeze(2) + offsets  # [n, B, W]
        inside = (positions >= 0) & (positions < length)
        positions = positions.clamp(0, length - 1)
        inside &= real.unsqueeze(0).expand(n, -1, -1).gather(2, positions)
        ctx_acts = codes.permute(2, 0, 1).gather(2, positions) * inside
        ctx_ids = torch.where(inside, ids.unsqueeze(0).expand(n, -1, -1).gather(2, positions), -1)
        fired = score > 0
        doc = docs.unsqueeze(0).expand(n, -1)
        top.merge(torch.where(fired, score, -math.inf), score, doc, pos, ctx_ids, ctx_acts)
        priority = torch.where(fired, torch.rand(score.shape, generator=generator), -math.inf)
        sample.merge(priority, score, doc, pos, ctx_ids, ctx_acts)

        for b, d in enumerate(docs.tolist()):
            if d in background_slot:
                top_k = codes[b][real[b]].topk(sae.k, dim=1)
                background_ids[background_slot[d]] = ids[b][real[b]].tolist()
                background_latents[background_slot[d]] = torch.where(top_k.values > 0, top_k.indices, -1)

    return Collection(texts, top, sample, fire_counts, activation_sums, max_activation, histogram, background_docs,
                      background_ids, background_latents, n_tokens, n_tokens / (time.perf_counter() - started))


# --- turning the buffers into examples ---------------------------------------------------------

class TokenStrings:
    """Decoded text of single token ids, cached (decoding id by id keeps leading spaces)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def _example(col: Collection, buffer: ExampleBuffer, latent: int, slot: int, tokens: TokenStrings,
             context_tokens: int) -> dict[str, Any]:
    ids = buffer.ctx_ids[latent, slot]
    valid = ids >= 0
    doc = int(buffer.doc[latent, slot])
    return {
        "text": col.texts[doc],
        "score": round(float(buffer.score[latent, slot]), 5),
        "token_str": tokens(int(ids[context_tokens])),
        "token_idx": int(buffer.pos[latent, slot]),
        "doc_index": doc,
        "context": {"tokens": [tokens(int(i)) for i in ids[valid]],
                    "activations": [round(float(a), 4) for a in buffer.ctx_acts[latent, slot][valid]],
                    "peak": int(valid[:context_tokens].sum())},
    }


def _quantile_examples(examples: list[dict[str, Any]], per_quantile: int) -> list[dict[str, Any]]:
    """Up to `per_quantile` examples from each quarter of the sampled activations (highest first)."""
    ranked = sorted(examples, key=lambda e: e["score"])
    chosen = []
    for q in range(QUANTILES):
        part = ranked[len(ranked) * q // QUANTILES: len(ranked) * (q + 1) // QUANTILES]
        chosen += [{**e, "quantile": q + 1} for e in part[-per_quantile:]]
    return chosen[::-1]


def _non_activating(col: Collection, latent: int, count: int, window: int, tokens: TokenStrings,
                    rng: np.random.Generator) -> list[dict[str, Any]]:
    """Up to `count` windows of background texts where the latent is silent on every token."""
    examples = []
    for slot in rng.permutation(len(col.background_docs)).tolist():
        ids = col.background_ids[slot]
        silent = ~(col.background_latents[slot] == latent).any(1).numpy()
        # window starts whose whole window is silent: a sliding count of silent tokens
        run = np.convolve(silent.astype(int), np.ones(min(window, len(ids)), int), mode="valid")
        starts = np.flatnonzero(run == min(window, len(ids)))
        if not len(starts):
            continue
        start = int(rng.choice(starts))
        window_ids = ids[start:start + window]
        middle = len(window_ids) // 2
        examples.append({"text": col.texts[col.background_docs[slot]], "score": 0.0,
                         "token_str": tokens(window_ids[middle]), "token_idx": start + middle,
                         "doc_index": col.background_docs[slot],
                         "context": {"tokens": [tokens(i) for i in window_ids], "activations": [0.0] * len(window_ids),
                                     "peak": middle}})
        if len(examples) == count:
            break
    return examples


# --- labels without a model --------------------------------------------------------------------

def _norm(token: str) -> str:
    return token.strip().lower()


def _window_words(example: dict[str, Any]) -> list[str]:
    return [_norm(t) for t in example["context"]["tokens"]]


def _contains(words: list[str], keyword: tuple[str, ...]) -> bool:
    n = len(keyword)
    return any(tuple(words[i:i + n]) == keyword for i in range(len(words) - n + 1))


def balanced_accuracy(predicted_positive: list[bool], predicted_negative: list[bool]) -> float | None:
    """Balanced accuracy of a detector: its predictions on truly positive and truly negative items."""
    if not predicted_positive or not predicted_negative:
        return None
    tpr = sum(predicted_positive) / len(predicted_positive)
    tnr = 1 - sum(predicted_negative) / len(predicted_negative)
    return (tpr + tnr) / 2


def make_label(top: list[dict[str, Any]], promoted: list[str], background: Counter,
               background_total: int) -> tuple[str, str, list[tuple[str, ...]]]:
    """(label, rule that made it, keywords that the label stands for)."""
    peaks = Counter(_norm(e["token_str"]) for e in top if _norm(e["token_str"]))
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
    lens = [w for w in (_norm(p) for p in promoted[:5]) if w]
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
    token = peaks.most_common(1)[0][0] if peaks else _norm(top[0]["token_str"])
    return f'"{token}"', "peak token", [(token,)]


def label_score(keywords: list[tuple[str, ...]], activating: list[dict], non_activating: list[dict]) -> float | None:
    detect = lambda e: any(_contains(_window_words(e), k) for k in keywords)  # noqa: E731
    return balanced_accuracy([detect(e) for e in activating], [detect(e) for e in non_activating])


def _background_counts(col: Collection, tokens: TokenStrings) -> tuple[Counter, int]:
    counts: Counter = Counter()
    total = 0
    for ids in col.background_ids:
        words = [_norm(tokens(i)) for i in ids]
        counts.update((w,) for w in words)
        counts.update(tuple(words[i:i + 2]) for i in range(len(words) - 1))
        total += len(words)
    return counts, total


@torch.no_grad()
def logit_lens(model, sae: TopKSAE, top: int = 10, chunk: int = 256) -> tuple[torch.Tensor, ...]:
    """(promoted ids, values, suppressed ids, values), each [n_latents, top]."""
    unembed = model.get_output_embeddings().weight.float().cpu()
    norm = getattr(getattr(model, "model", None), "norm", None)
    gain = norm.weight.float().cpu() if norm is not None and hasattr(norm, "weight") else torch.ones(unembed.shape[1])
    results = [[], [], [], []]
    for lo in range(0, sae.n_latents, chunk):
        logits = (sae.W_dec[lo:lo + chunk].float().cpu() * gain) @ unembed.T
        up, down = logits.topk(top, dim=1), (-logits).topk(top, dim=1)
        for store, value in zip(results, (up.indices, up.values, down.indices, -down.values)):
            store.append(value)
    return tuple(torch.cat(r) for r in results)


# --- names written by a model -------------------------------------------------------------------

def _highlighted(example: dict[str, Any]) -> str:
    """The context with the peak token marked as <<token>> (delphi marks it the same way)."""
    ctx = example["context"]
    return "".join(f"<<{t}>>" if i == ctx["peak"] else t for i, t in enumerate(ctx["tokens"])).replace("\n", " ")


def _window_text(example: dict[str, Any]) -> str:
    return "".join(example["context"]["tokens"]).replace("\n", " ").strip()


# SmolLM2-135M copies any example it is shown as a "name" (a worked example, or the first context),
# so the prompt lists the marked words on a line of their own and the answer is begun for it.
_NAME_PREFIX = "They are"


def naming_messages(examples: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The chat that asks for a latent's name from its highlighted contexts and its peak tokens."""
    contexts = "\n".join(f"- {_highlighted(e).strip()}" for e in examples[:4])
    words = ", ".join(dict.fromkeys(e["token_str"].strip() or repr(e["token_str"]) for e in examples))
    return [{"role": "user", "content": f"Examples:\n{contexts}\nThe marked words: {words}.\n"
                                        "Describe what the marked words have in common in a few words."}]


def _chat(tokenizer, messages: list[dict[str, str]], answer_prefix: str = "") -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix


def _clean_name(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.strip(" \"'.*:")[:80] or "(no name)"


@torch.no_grad()
def write_names(model, tokenizer, chats: list[list[dict[str, str]]], max_new_tokens: int,
                batch_size: int = 8) -> list[str]:
    """Greedy one-line answers to `chats`."""
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    names = []
    try:
        for lo in range(0, len(chats), batch_size):
            enc = tokenizer([_chat(tokenizer, c, _NAME_PREFIX) for c in chats[lo:lo + batch_size]],
                            return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(next(model.parameters()).device)
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            names += [_clean_name(t) for t in tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:],
                                                                      skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = "right"
    return names


@torch.no_grad()
def detection_votes(model, tokenizer, name: str, windows: list[str], batch_size: int = 16) -> list[bool]:
    """For each window, does the model answer Yes (over No) to "does this text contain <name>"?"""
    yes, no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    prompts = [_chat(tokenizer, [{"role": "user", "content": f"Pattern: {name}\nText: {w}\n"
                                                             "Does the text contain the pattern? Answer Yes or No."}])
               for w in windows]
    votes = []
    tokenizer.padding_side = "left"  # the answer's logits sit at the last position of every row
    try:
        for lo in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[lo:lo + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(next(model.parameters()).device)
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, -1]
            votes += (logits[:, yes] > logits[:, no]).tolist()
    finally:
        tokenizer.padding_side = "right"
    return votes


def name_latents(model, tokenizer, latents: dict[int, dict[str, Any]], cache_path: Path, fingerprint: str,
                 max_new_tokens: int, batch_size: int = 8, progress: bool = True) -> dict[int, dict[str, Any]]:
    """Name and score each latent in `latents` ({index: {"top", "activating", "non_activating"}}).

    Finished names are saved to `cache_path` after every batch, so a rerun only names the rest.
    """
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    done = cache.get("names", {}) if cache.get("fingerprint") == fingerprint else {}
    todo = [i for i in latents if str(i) not in done]
    bar = tqdm(total=len(latents), initial=len(latents) - len(todo), desc="naming latents", disable=not progress)
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo:lo + batch_size]
        names = write_names(model, tokenizer, [naming_messages(latents[i]["top"][:8]) for i in batch], max_new_tokens,
                            batch_size)
        for i, name in zip(batch, names):
            # plain windows: the marked peak would give the answer away
            positive = detection_votes(model, tokenizer, name, [_window_text(e) for e in latents[i]["activating"]])
            negative = detection_votes(model, tokenizer, name, [_window_text(e) for e in latents[i]["non_activating"]])
            done[str(i)] = {"name": name, "score": balanced_accuracy(positive, negative)}
        write_json(cache_path, {"fingerprint": fingerprint, "names": done})
        bar.update(len(batch))
    bar.close()
    return {i: done[str(i)] for i in latents}


# --- the exports ---------------------------------------------------------------------------------

def build_exports(col: Collection, model, tokenizer, sae: TopKSAE, *, context_tokens: int, per_quantile: int,
                  non_activating: int, meta: dict[str, Any], seed: int = 0) -> tuple[dict, dict]:
    """(top_texts, concepts) as written to store/top_texts.json and store/concepts.json."""
    tokens = TokenStrings(tokenizer)
    rng = np.random.default_rng(seed)
    window = 2 * context_tokens + 1
    promoted_ids, promoted_vals, suppressed_ids, suppressed_vals = logit_lens(model, sae)
    background, background_total = _background_counts(col, tokens)
    top_texts: dict[str, list] = {}
    latents: dict[str, dict] = {}
    for i in range(sae.n_latents):
        top = [_example(col, col.top, i, s, tokens, context_tokens) for s in col.top.entries(i)]
        top_texts[str(i)] = top
        if not top:
            continue  # dead on these texts: no examples, no label
        top_docs = {e["doc_index"] for e in top}
        sampled = [_example(col, col.sample, i, s, tokens, context_tokens) for s in col.sample.entries(i)]
        activating = [e for e in sampled if e["doc_index"] not in top_docs]
        negatives = _non_activating(col, i, non_activating, window, tokens, rng)
        promoted = [tokens(int(t)) for t in promoted_ids[i]]
        label, source, keywords = make_label(top, promoted, background, background_total)
        fires = int(col.fire_counts[i])
        edges_used = col.histogram[i].nonzero().squeeze(1)
        lo, hi = int(edges_used.min()), int(edges_used.max()) + 1
        latents[str(i)] = {
            "index": i, "frequency": fires / max(col.n_tokens, 1), "max_activation": float(col.max_activation[i]),
            "mean_activation": float(col.activation_sums[i]) / max(fires, 1),
            "label": label, "label_source": source, "label_score": label_score(keywords, activating, negatives),
            "name": None, "name_score": None,
            "logit_lens": {"promoted": [[tokens(int(t)), round(float(v), 3)] for t, v in zip(promoted_ids[i], promoted_vals[i])],
                           "suppressed": [[tokens(int(t)), round(float(v), 3)] for t, v in zip(suppressed_ids[i], suppressed_vals[i])]},
            "histogram": {"bin_edges": [float(e) for e in HIST_EDGES[lo:hi + 1]], "counts": col.histogram[i, lo:hi].tolist()},
            "quantile_examples": _quantile_examples(activating, per_quantile),
            "non_activating": negatives,
            "_activating": activating,  # kept until naming is done, then dropped
        }
    concepts = {"meta": {**meta, "n_latents": sae.n_latents, "k": sae.k, "n_texts": len(col.texts),
                         "n_tokens": col.n_tokens, "live_latents": len(latents),
                         "collection_tokens_per_s": col.tokens_per_s,
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                "latents": latents}
    return top_texts, concepts


def latents_to_name(concepts: dict, how_many: int) -> list[int]:
    """The most frequent live latents (all live ones when how_many is 0)."""
    ranked = sorted(concepts["latents"].values(), key=lambda c: -c["frequency"])
    return [c["index"] for c in (ranked if how_many == 0 else ranked[:how_many])]


def write_exports(store: Path, top_texts: dict, concepts: dict) -> None:
    for latent in concepts["latents"].values():
        latent.pop("_activating", None)
    write_json(store / "top_texts.json", top_texts)
    write_json(store / "concepts.json", concepts)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["index", "label", "name", "label_score", "name_score", "frequency"])
    for c in sorted(concepts["latents"].values(), key=lambda c: -c["frequency"]):
        writer.writerow([c["index"], c["label"], c["name"] or "", c["label_score"], c["name_score"], f"{c['frequency']:.6g}"])
    write_text(store / "concepts.csv", rows.getvalue())


def run_concepts(settings, progress: bool = True) -> dict:
    """Stage 04 from the settings: collect, label, name the most frequent latents, write the exports.

    Returns the concepts export (store/concepts.json)."""
    device = detect_device(settings.DEVICE)
    sae, sae_meta = TopKSAE.load(settings.store / "sae_model" / "topk_sae.pt", device)
    check_sae_matches(sae_meta, settings.MODEL_ID, settings.LAYER_SIGNATURE)
    model, tokenizer = load_model(settings.MODEL_ID, device, cache_dir=settings.store / "models")
    layer = resolve_layer(model, settings.LAYER_SIGNATURE)
    texts = load_texts(settings.HF_DATASET, settings.EVAL_SPLIT, settings.TEXT_FIELD, settings.EVAL_DATA_LIMIT)
    print(texts.summary())
    col = collect(model, tokenizer, layer, sae, texts.texts, top_n=settings.TOP_N_EXAMPLES,
                  context_tokens=settings.CONTEXT_TOKENS, sample_size=4 * QUANTILES * settings.QUANTILE_EXAMPLES,
                  background_texts=max(4 * settings.NON_ACTIVATING_EXAMPLES, 64), max_length=settings.MAX_LENGTH,
                  batch_size=settings.BATCH_SIZE_SAVE, seed=settings.SEED, progress=progress)
    meta = {"model_id": settings.MODEL_ID, "layer_signature": settings.LAYER_SIGNATURE,
            "activation_run_id": sae_meta["activation_run_id"], "dataset": settings.HF_DATASET,
            "split": settings.EVAL_SPLIT, "naming_model_id": settings.NAMING_MODEL_ID, "settings": settings.as_dict()}
    top_texts, concepts = build_exports(col, model, tokenizer, sae, context_tokens=settings.CONTEXT_TOKENS,
                                        per_quantile=settings.QUANTILE_EXAMPLES,
                                        non_activating=settings.NON_ACTIVATING_EXAMPLES, meta=meta, seed=settings.SEED)
    chosen = latents_to_name(concepts, settings.N_LATENTS_TO_NAME) if settings.N_LATENTS_TO_NAME >= 0 else []
    if chosen:
        if settings.NAMING_MODEL_ID != settings.MODEL_ID:
            model, tokenizer = load_model(settings.NAMING_MODEL_ID, device, cache_dir=settings.store / "models")
        fingerprint = hashlib.sha1(sae.W_dec.detach().cpu().numpy().tobytes()).hexdigest() + \
            f"/{settings.NAMING_MODEL_ID}/v{NAME_PROMPT_VERSION}/{settings.NAMING_MAX_NEW_TOKENS}"
        lat = concepts["latents"]
        names = name_latents(model, tokenizer, {i: {"top": top_texts[str(i)], "activating": lat[str(i)]["_activating"],
                                                    "non_activating": lat[str(i)]["non_activating"]} for i in chosen},
                             settings.store / "concept_names.json", fingerprint, settings.NAMING_MAX_NEW_TOKENS,
                             progress=progress)
        for i, result in names.items():
            lat[str(i)]["name"], lat[str(i)]["name_score"] = result["name"], result["score"]
    write_exports(settings.store, top_texts, concepts)
    return concepts
