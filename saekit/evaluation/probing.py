"""Sparse probing: do a few of an SAE's latents predict a property of a whole story?

Tasks are story-level yes/no questions read from the dataset's label fields (the embedded corpus:
each prompt feature, "features = dialogue", and the most frequent prompt words, "noun = ball"). For
each task and each SAE:

* each story's SAE codes are pooled over its tokens (POOLING_CODES says which pooling and why);
* on the SAE's training stories, the k latents whose pooled codes best separate the two classes
  (separation_scores) feed an L2-regularised logistic regression, k = 1, 2, 5;
* the probe is scored on stories the SAE never saw (the evaluation texts, then the store's held-out
  documents) by balanced accuracy, the mean of the accuracy on each class: positives are ~15%
  (features) or ~3% (words) of the stories, and a probe that always answers "no" would score 85-97%
  plain accuracy but 0.5 balanced.

Two readouts that use no SAE frame each task. The dense probe: the same logistic regression on all d
dimensions of the pooled raw activations (the issue's "ceiling"). The lexical probe: the same k-sparse
probe on which tokens the story contains (a bag of tokens), the SAE-free answer to "is this a matter of
a few words?". The dense probe is no ceiling for story-level labels carried by a word or two: averaged
over a story's ~100 tokens, one token's direction is nearly gone, where a latent that fires on that
token isolates it (on the demo's 24 candidate tasks: dense 0.545 on average, a 10-epoch SAE's k = 1
probe 0.606; on labels that say whether a story contains a given word, dense 0.65-0.80, the SAE's
k = 1 0.85-0.99). So a task is kept when the better of the two clears chance by a clear margin on the
training stories alone, cross-validated with the probes' own folds (PROBE_MIN_ACCURACY, and
CHANCE_SES standard errors of chance for its training counts); otherwise its labels are not readable
from the stories, it says nothing about any SAE, and it is dropped with the reason. Only then are the
kept tasks scored on the test stories, once: the test stories choose nothing (SAEBench fixes its
tasks in advance for the same reason; choosing them by their test scores, the best of four readouts
against a bar made for one, kept tasks by luck and inflated every figure reported on them). The
choice never looks at an SAE, so it favours none. Stories, tasks and both readouts depend only on
the activations: a benchmark prepares them once (prepare) and scores every SAE on them (score_sae).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from ..activations.data import TextStream, document_hash, open_role_texts
from ..activations.models import length_sorted_batches, write_document_activations
from ..activations.store import ActivationRun
from ..base.errors import PipelineError
from ..training.sae import TopKSAE

# PROBE_LABEL_FIELD = "": the embedded corpus's story fields, wherever a dataset has them. Other
# fields of a user's data are not guessed at (an id, a title or a split would make nonsense tasks).
AUTO_FIELDS = ("features", "noun", "verb", "adjective")
KS = (1, 2, 5)
VALUES_PER_FIELD = 6  # the most frequent values of a field that become tasks (the corpus has 6 features)
CHANCE_SES = 3  # a kept task's best SAE-free readout beats chance by this many standard errors (p ~ 0.001 each)
# Pooling, measured on the demo (a 10-epoch TopK 8 SAE; 900 training, 300 test stories; all 24 candidate tasks;
# balanced accuracy at k = 1, 2, 5). SAE codes: max-pooled 0.606 / 0.625 / 0.618, mean-pooled 0.618 / 0.629 / 0.593,
# a tie within noise; max is kept because a latent then counts by its strongest firing anywhere in the story, so a
# word said once is not diluted by the story's length (~100 tokens here, more in longer texts), and because the
# lexical probe pools the same way (a token is present or not), so the two compare like for like. Raw activations:
# mean-pooled for the dense probe (0.545 against 0.511 max-pooled): the max of each raw dimension on its own mixes
# different tokens.
POOLING_CODES = "max"
POOLING_DENSE = "mean"
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)  # L2 strengths tried by cross-validation, on standardised inputs
CV_FOLDS = 3
ENCODE_ROWS = 4096  # token rows encoded at a time when pooling SAE codes
LEXICAL_MIN_STORIES = 3  # a token is a lexical candidate when this many training stories contain it
# The cross-validation folds' seed: fixed, not SEED, so that the kept tasks and each probe depend on the
# data and the SAE alone. With SEED, SAEs trained at two seeds were probed on different task sets (at
# seed 1 of the demo, `adjective = funny` replaced `verb = help`, whose lexical probe fell from 0.84
# below its 0.787 bar with the folds): the SAE's seed noise and the folds' would mix.
FOLD_SEED = 0


class ProbingError(PipelineError, ValueError):
    """A label field that the data does not have, with the fields it does have."""


# --- tasks ---------------------------------------------------------------------------------------

def record_values(record: Any, name: str) -> set[str] | None:
    """The values `record` has for label field `name`: a list's members, or its one value; a true
    yes/no field is the value "true". None where the record has no such field: unknown, which is
    left out of that field's tasks rather than counted as a negative."""
    if not isinstance(record, dict) or record.get(name) is None:
        return None
    value = record[name]
    if isinstance(value, (list, tuple)):
        return {str(v) for v in value if v is not None}
    if isinstance(value, bool):
        return {"true"} if value else set()
    return {str(value)}


@dataclass
class Task:
    """One yes/no question about a story; labels 1, 0, or -1 where the story's field is unknown."""

    field: str
    value: str
    train: np.ndarray
    test: np.ndarray

    @property
    def name(self) -> str:
        return self.field if self.value == "true" else f"{self.field} = {self.value}"

    def counts(self) -> dict[str, int]:
        return {"train_positives": int((self.train == 1).sum()), "train_negatives": int((self.train == 0).sum()),
                "test_positives": int((self.test == 1).sum()), "test_negatives": int((self.test == 0).sum())}


def _flipped(labels: np.ndarray) -> np.ndarray:
    return np.where(labels < 0, labels, 1 - labels)


def _labels(values: list[set[str] | None], value: str) -> np.ndarray:
    return np.array([-1 if v is None else int(value in v) for v in values], np.int8)


def build_tasks(train_records: list[Any], test_records: list[Any], fields: Iterable[str], min_positives: int,
                per_field: int = VALUES_PER_FIELD) -> tuple[list[Task], list[dict[str, str]]]:
    """Tasks from each field's values, most frequent (on the training side) first: a value needs
    `min_positives` positive and as many negative stories on each side, and a field gives at most
    `per_field` tasks. The rest are reported as dropped, one line per field and reason."""
    tasks: list[Task] = []
    dropped: list[dict[str, str]] = []
    for name in fields:
        train_values = [record_values(r, name) for r in train_records]
        test_values = [record_values(r, name) for r in test_records]
        counts = Counter(v for values in train_values if values for v in values)
        rare, beyond, mine = [], 0, []
        for value, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            task = Task(name, value, _labels(train_values, value), _labels(test_values, value))
            if min(task.counts().values()) < min_positives:
                rare.append(value)
            elif any(np.array_equal(task.train, _flipped(t.train)) and np.array_equal(task.test, _flipped(t.test))
                     for t in mine):
                continue  # the other value of a two-valued field: the same task, labels flipped
            elif len(mine) == per_field:
                beyond += 1
            else:
                mine.append(task)
        tasks += mine
        if rare:
            shown = ", ".join(rare[:3]) + (", ..." if len(rare) > 3 else "")
            dropped.append({"task": f"{name}: {len(rare)} value{'s' * (len(rare) > 1)} ({shown})",
                            "reason": f"fewer than {min_positives} positive or negative stories on the training "
                                      f"({len(train_records)}) or the test ({len(test_records)}) side"})
        if beyond:
            dropped.append({"task": f"{name}: {beyond} less frequent value{'s' * (beyond > 1)}",
                            "reason": f"only the {per_field} most frequent values of a field are probed"})
    return tasks, dropped


def chance_bound(n_positive: int, n_negative: int) -> float:
    """0.5 + CHANCE_SES standard errors of the balanced accuracy of a guess that ignores the story.
    A guess saying "yes" with probability q has TPR and TNR binomial around q and 1 - q, so
    var((TPR + TNR) / 2) = q(1 - q) (1 / n_pos + 1 / n_neg) / 4, largest at q = 1/2."""
    return 0.5 + CHANCE_SES * 0.5 * math.sqrt(0.25 / n_positive + 0.25 / n_negative)


# --- the probe -----------------------------------------------------------------------------------

def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of the accuracy on positives and on negatives: 0.5 for any guess that ignores the input.
    NaN where `y_true` holds one class only (a cross-validation fold without a positive story): undefined."""
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    if y_true.all() or not y_true.any():
        return float("nan")
    return float((y_pred[y_true].mean() + (~y_pred[~y_true]).mean()) / 2)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, lam: float, max_steps: int = 50,
                 start: torch.Tensor | None = None) -> torch.Tensor:
    """Weights [d + 1] (bias last) of a logistic regression, by Newton's method with step halving.

    The classes are weighted to half the loss each, so the probe aims at balanced accuracy and 0.5 is
    its threshold; `lam` is the L2 penalty (bias free) on that mean loss, on standardised inputs.
    d is at most a layer's width, so the (d + 1)^2 Hessian is cheap and Newton converges in a few
    steps, where gradient descent would need a learning rate and hundreds; `start` (the weights at a
    nearby strength) cuts them to two or three.

    The loss and its gradient are float64; the Hessian only picks the step's direction, so it is made
    and solved in float32 (half the time of the whole fit), with the bias's ridge raised to a float32
    scale: where the gradient is exact and every step must lower the exact loss, an approximate
    Hessian changes the path, not the minimum it stops at."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    x32 = x.float()
    y = y.double()
    n_pos = y.sum()
    weight = torch.where(y > 0, 0.5 / n_pos, 0.5 / (len(y) - n_pos))
    penalty = torch.full((x.shape[1],), float(lam), dtype=torch.float64)
    penalty[-1] = 1e-9  # the bias is not penalised; a tiny ridge keeps the Hessian invertible on separable data
    preconditioner_ridge = penalty.float().clamp(min=1e-6)

    def loss(w: torch.Tensor) -> torch.Tensor:
        z = x @ w
        return (weight * (torch.nn.functional.softplus(z) - y * z)).sum() + 0.5 * (penalty * w * w).sum()

    w = torch.zeros(x.shape[1], dtype=torch.float64) if start is None else start.clone()
    current = loss(w)
    for _ in range(max_steps):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (weight * (p - y)) + penalty * w
        hessian = (x32 * (weight * p * (1 - p)).float().unsqueeze(1)).T @ x32 + torch.diag(preconditioner_ridge)
        step = torch.linalg.solve(hessian, grad.float()).double()
        scale = 1.0
        while scale > 1e-6 and (trial := loss(w - scale * step)) > current:
            scale /= 2
        if scale <= 1e-6:
            break
        w, previous, current = w - scale * step, current, trial
        if previous - current < 1e-8 * max(1.0, float(current)):  # predictions stopped moving long before
            break
    return w


def _predict(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    return ((x.double() @ w[:-1] + w[-1]) > 0).numpy()


def _standardised(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides scaled by the training side's mean and std, so one L2 strength suits every input
    (a constant input, such as a latent that never fires, stays 0)."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def _folds(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """A fold for each sample, each class dealt round-robin in a seeded order: stratified."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(y == cls))
        fold[members] = np.arange(len(members)) % n_folds
    return fold


def probe_accuracy(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
                   seed: int = 0) -> tuple[float, float]:
    """(balanced accuracy on the test side, the L2 strength used) of a logistic regression on the
    training side, its strength chosen among LAMBDAS by stratified CV_FOLDS-fold cross-validation
    there (ties: the stronger). The test side plays no part in any choice."""
    x_train, x_test = x_train.double(), x_test.double()
    fold = _folds(y_train, CV_FOLDS, seed)
    strengths = sorted(LAMBDAS, reverse=True)
    scores = np.zeros((CV_FOLDS, len(strengths)))
    for f in range(CV_FOLDS):
        inside, outside = fold != f, fold == f
        a, b = _standardised(x_train[inside], x_train[outside])
        w = None
        for j, lam in enumerate(strengths):  # strongest first, each fit starting from the previous one
            w = fit_logistic(a, torch.from_numpy(y_train[inside]), lam, start=w)
            scores[f, j] = balanced_accuracy(y_train[outside], _predict(b, w))
    # folds whose held-out part has both classes; with PROBE_MIN_POSITIVES = 3 the outer fold's training part
    # can hold 2 positives, and one inner fold none: its NaN would otherwise decide the strength
    defined = ~np.isnan(scores).any(1)
    best_lam = strengths[int(np.argmax(scores[defined].mean(0)))] if defined.any() else strengths[0]  # ties: stronger
    a, b = _standardised(x_train, x_test)
    w = fit_logistic(a, torch.from_numpy(y_train), best_lam)
    return balanced_accuracy(y_test, _predict(b, w)), best_lam


def separation_scores(x: torch.Tensor, y: np.ndarray) -> np.ndarray:
    """|mean of positives - mean of negatives| / sqrt of the mean of the two classes' variances, per
    column (Cohen's d): how far apart a latent's pooled codes put the classes, in their own spread.
    A column that never varies scores 0; one that equals the label scores highest of all."""
    x = x.double()
    yt = torch.from_numpy(np.asarray(y).astype(bool))
    pos, neg = x[yt], x[~yt]
    spread = ((pos.var(0, unbiased=False) + neg.var(0, unbiased=False)) / 2).sqrt()
    return ((pos.mean(0) - neg.mean(0)).abs() / (spread + 1e-6)).numpy()


def top_latents(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:k]


def sparse_probe(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
                 seed: int = 0, ks: Iterable[int] = KS) -> tuple[dict[str, float], dict[str, list[int]]]:
    """({k: balanced accuracy on the test side}, {k: the columns used}) of the probe on the k columns
    of x that best separate the classes on the training side (k as a string: JSON's keys)."""
    scores = separation_scores(x_train, y_train)
    accuracy, chosen = {}, {}
    for k in ks:
        columns = top_latents(scores, k)
        accuracy[str(k)], _ = probe_accuracy(x_train[:, columns], y_train, x_test[:, columns], y_test, seed)
        chosen[str(k)] = columns.tolist()
    return accuracy, chosen



# --- stories -------------------------------------------------------------------------------------

@dataclass
class Stories:
    """One side of the probes: each story's layer activations and token ids, one story after another
    (its BOS left out: the same in every story, and an outlier that would own every max), and its record."""

    rows: torch.Tensor  # [tokens, d], the activation run's dtype, on the CPU
    tokens: torch.Tensor  # [tokens] token ids
    lengths: torch.Tensor  # [stories] tokens per story
    records: list[Any]
    source: str

    def __len__(self) -> int:
        return len(self.records)

    def story_of_row(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)

    @classmethod
    def empty(cls, d: int, source: str, dtype: torch.dtype = torch.float32) -> "Stories":
        return cls(torch.zeros(0, d, dtype=dtype), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   [], source)

    @classmethod
    def join(cls, parts: list["Stories"]) -> "Stories":
        """The parts one after another, named by their sources."""
        source = " + ".join(p.source for p in parts if len(p))
        parts = [p for p in parts if len(p)] or parts[:1]
        return cls(torch.cat([p.rows for p in parts]), torch.cat([p.tokens for p in parts]),
                   torch.cat([p.lengths for p in parts]), [r for p in parts for r in p.records], source)


def pool_rows(stories: Stories, pooling: str = POOLING_DENSE) -> torch.Tensor:
    """[stories, d] raw activations pooled over each story's tokens, float32."""
    d = stories.rows.shape[1]
    out = torch.full((len(stories), d), -torch.inf if pooling == "max" else 0.0)
    story = stories.story_of_row()
    step = ENCODE_ROWS * 4
    for lo in range(0, len(story), step):  # a chunk at a time: the run's float16 rows are never all float32
        rows, index = stories.rows[lo:lo + step].float(), story[lo:lo + step]
        if pooling == "max":
            out.scatter_reduce_(0, index.unsqueeze(1).expand(-1, d), rows, "amax")
        else:
            out.index_add_(0, index, rows)
    return out if pooling == "max" else out / stories.lengths.unsqueeze(1)


@torch.no_grad()
def pool_codes(sae: TopKSAE, stories: Stories, pooling: str = POOLING_CODES) -> torch.Tensor:
    """[stories, n_latents] SAE codes pooled over each story's tokens: the sparse codes are scattered
    straight into the pooled table, never made dense."""
    was_training = sae.training
    sae.eval()  # a BatchTopK SAE in training mode would move its threshold
    device = next(sae.parameters()).device
    n = sae.n_latents
    flat = torch.zeros(len(stories) * n)
    story = stories.story_of_row()
    try:
        for lo in range(0, len(story), ENCODE_ROWS):
            values, indices = sae.encode(stories.rows[lo:lo + ENCODE_ROWS].to(device, torch.float32))
            where = (story[lo:lo + ENCODE_ROWS].unsqueeze(1) * n + indices.cpu()).flatten()
            values = values.float().cpu().flatten()
            if pooling == "max":  # codes are >= 0 and the table starts at 0
                flat.scatter_reduce_(0, where, values, "amax")
            else:
                flat.index_add_(0, where, values)
    finally:
        sae.train(was_training)
    pooled = flat.view(len(stories), n)
    return pooled if pooling == "max" else pooled / stories.lengths.unsqueeze(1)


def lexical_vocabulary(train: Stories, min_stories: int = LEXICAL_MIN_STORIES) -> np.ndarray:
    """The token ids that at least `min_stories` training stories contain: the lexical probe's columns
    (a token in one or two stories cannot separate classes on unseen ones)."""
    pairs = np.unique(np.stack([train.story_of_row().numpy(), train.tokens.numpy()]), axis=1)
    ids, counts = np.unique(pairs[1], return_counts=True)
    return ids[counts >= min_stories]


def token_presence(stories: Stories, vocabulary: np.ndarray) -> torch.Tensor:
    """[stories, len(vocabulary)] 1 where the story contains the token: a bag of tokens, max-pooled."""
    out = torch.zeros(len(stories), len(vocabulary))
    tokens = stories.tokens.numpy()
    position = np.searchsorted(vocabulary, tokens).clip(0, max(len(vocabulary) - 1, 0))
    known = (vocabulary[position] == tokens) if len(vocabulary) else np.zeros(len(tokens), bool)
    out[stories.story_of_row()[torch.from_numpy(known)], torch.from_numpy(position[known])] = 1.0
    return out


def _store_documents(run: ActivationRun, start_row: int, stop_row: int, limit: int | None = None,
                     wanted: set[int] | None = None) -> list[tuple[int, int, int, int]]:
    """(document index, first row, end row, first token id) of the run's documents in rows
    [start_row, stop_row), in order: the first `limit`, or those whose index is in `wanted`. Reads
    the token files only as far as it needs to."""
    docs: list[tuple[int, int, int, int]] = []
    missing = len(wanted) if wanted is not None else 0
    offsets = run.shard_offsets()
    for i in range(len(offsets) - 1):
        lo, hi = max(start_row, offsets[i]), min(stop_row, offsets[i + 1])
        if lo >= hi:
            continue
        tokens = run.shard_tokens(i)[lo - offsets[i]:hi - offsets[i]]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(tokens[:, 1])) + 1])
        for s, e in zip(starts, [*starts[1:], len(tokens)]):
            doc = int(tokens[s, 1])
            if docs and docs[-1][0] == doc:  # a document that began in the previous shard
                docs[-1] = (doc, docs[-1][1], int(lo + e), docs[-1][3])
                continue
            if (len(docs) == limit) if wanted is None else not missing:
                return docs
            if wanted is None or doc in wanted:
                docs.append((doc, int(lo + s), int(lo + e), int(tokens[s, 0])))
                missing -= wanted is not None
    return docs


def _store_stories(run: ActivationRun, docs: list[tuple[int, int, int, int]], records: list[Any],
                   source: str) -> Stories:
    """The stored rows of `docs` (as _store_documents gives them), each without its BOS row."""
    dtype = getattr(torch, run.meta["dtype"])
    if not docs:
        return Stories.empty(run.d_model, source, dtype)
    bos = run.meta.get("tokenizer", {}).get("bos_token_id")
    spans = [(lo + (first == bos), hi) for _, lo, hi, first in docs]
    keep = [i for i, (lo, hi) in enumerate(spans) if hi > lo]
    base, end = min(lo for lo, _ in spans), max(hi for _, hi in spans)
    block = run.rows(base, end, dtype=np.dtype(run.meta["dtype"]))
    offsets = run.shard_offsets()
    ids = np.concatenate([run.shard_tokens(i)[max(base, offsets[i]) - offsets[i]:min(end, offsets[i + 1]) - offsets[i], 0]
                          for i in range(len(offsets) - 1) if offsets[i] < end and offsets[i + 1] > base])
    index = np.concatenate([np.arange(spans[i][0], spans[i][1]) - base for i in keep])
    return Stories(torch.from_numpy(np.ascontiguousarray(block[index])), torch.from_numpy(ids[index].astype(np.int64)),
                   torch.tensor([spans[i][1] - spans[i][0] for i in keep]), [records[i] for i in keep], source)


def _embedded_stories(model, tokenizer, layer, texts: list[str], records: list[Any], *, max_length: int,
                      batch_size: int, dtype: torch.dtype, source: str, progress: bool = False,
                      known: dict[str, torch.Tensor] | None = None) -> Stories:
    """Each text run through the model up to the layer (as stage 01 runs it), without its BOS row,
    kept in `dtype` (the activation run's, so SAE inputs match the stored ones). A window of texts whose
    rows `known` holds already (stage 03's splice keeps them: text -> [tokens, d]) is not run again."""
    from tqdm.auto import tqdm

    d = model.config.hidden_size
    known = known or {}
    rows, tokens, lengths, kept = [], [], [], []
    window = 256  # texts per forward window: float32 rows for one window at a time
    bar = tqdm(total=len(texts), desc="probing: embedding stories", unit="text", disable=not progress)
    for lo in range(0, len(texts), window):
        docs = tokenizer(texts[lo:lo + window], truncation=True, max_length=max_length)["input_ids"]
        offsets = [0, *np.cumsum([len(doc) for doc in docs]).tolist()]
        if all(len(known.get(text, ())) == len(doc) for text, doc in zip(texts[lo:lo + window], docs)):
            out = torch.cat([known[text] for text in texts[lo:lo + window]]) if docs else torch.empty(0, d)
        else:
            out = torch.empty(offsets[-1], d, device=next(model.parameters()).device)
            write_document_activations(out, offsets, model, tokenizer, layer, docs,
                                       length_sorted_batches([len(doc) for doc in docs], batch_size))
            out = out.cpu()
        for i, doc in enumerate(docs):
            skip = int(bool(doc) and doc[0] == tokenizer.bos_token_id)
            if len(doc) > skip:
                rows.append(out[offsets[i] + skip:offsets[i + 1]].to(dtype))
                tokens.append(torch.tensor(doc[skip:], dtype=torch.long))
                lengths.append(len(doc) - skip)
                kept.append(records[lo + i])
        bar.update(len(docs))
    bar.close()
    if not kept:
        return Stories.empty(d, source, dtype)
    return Stories(torch.cat(rows), torch.cat(tokens), torch.tensor(lengths), kept, source)


# --- what does not depend on the SAE: stories, tasks, the SAE-free readouts ----------------------------

def label_fields(setting: str, record: Any, text_field: str) -> tuple[list[str], str | None]:
    """(the label fields to probe, None), or ([], the one line that says why probing is skipped),
    from PROBE_LABEL_FIELD and a record of the evaluation texts. A field named but absent is an error."""
    if setting == "none":
        return [], "sparse probing off (PROBE_LABEL_FIELD = 'none')"
    available = [f for f in record if f != text_field] if isinstance(record, dict) else []
    if setting:
        if setting not in available:
            raise ProbingError(f"PROBE_LABEL_FIELD={setting!r} is not a label field of the evaluation texts; "
                               f"their other fields are {available or 'none (plain text)'}. Set it to one of "
                               "them, '' (automatic) or 'none'.")
        return [setting], None
    fields = [f for f in AUTO_FIELDS if f in available]
    if not fields:
        return [], (f"sparse probing skipped: the texts have none of the label fields {', '.join(AUTO_FIELDS)} "
                    f"(their other fields: {', '.join(available) or 'none'}); name one with PROBE_LABEL_FIELD")
    return fields, None


def probe_fields(settings) -> tuple[list[str], str | None]:
    """label_fields for the settings, from the first evaluation record: cheap, so a dataset without
    labels is skipped before any model is loaded."""
    if settings.PROBE_LABEL_FIELD == "none":
        return label_fields("none", None, settings.TEXT_FIELD)
    first = next(open_role_texts(settings, "eval").with_records())
    return label_fields(settings.PROBE_LABEL_FIELD, first[1], settings.TEXT_FIELD)


@dataclass
class ProbeData:
    """Stories, tasks and the SAE-free readouts: everything about the probes that no SAE changes."""

    skipped: str | None = None
    fields: list[str] = field(default_factory=list)
    train: Stories | None = None
    test: Stories | None = None
    tasks: list[Task] = field(default_factory=list)  # kept tasks
    references: list[dict[str, Any]] = field(default_factory=list)  # a kept task's counts and SAE-free readouts
    dropped: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # the thresholds the tasks were kept by

    def summary(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped}
        return {"skipped": None, "pooling": {"sae_codes": POOLING_CODES, "dense": POOLING_DENSE, "lexical": "presence"},
                "ks": list(KS), "metric": "balanced accuracy (0.5 = chance)", "fields": self.fields,
                "train_stories": len(self.train), "train_source": self.train.source,
                "test_stories": len(self.test), "test_source": self.test.source, **self.settings,
                "mean_dense": _mean(r["dense"] for r in self.references),
                "mean_lexical": {str(k): _mean(r["lexical"][str(k)] for r in self.references) for k in KS},
                "tasks": self.references, "dropped": self.dropped}


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _training_pass(stream: TextStream, training: set[int], exclude: set[int], limit: int,
                   heldout: set[int]) -> tuple[list[tuple[int, str, Any]], dict[int, Any]]:
    """One pass over the training texts: the first `limit` that the SAE was trained on (hash in
    `training`, not in `exclude`), as (hash, text, record), and the records of the `heldout` hashes;
    it stops as soon as it has both."""
    taken: list[tuple[int, str, Any]] = []
    seen: set[int] = set()
    found: dict[int, Any] = {}
    for text, record in stream.with_records():
        h = document_hash(text)
        if h in heldout and h not in found:
            found[h] = record
        if len(taken) < limit and h in training and h not in exclude and h not in seen:
            taken.append((h, text, record))
            seen.add(h)
        if len(taken) == limit and len(found) == len(heldout):
            break
    return taken, found


def prepare(settings, run: ActivationRun, heldout_start: int, model, tokenizer, layer,
            progress: bool = True, known: dict[str, torch.Tensor] | None = None) -> ProbeData:
    """The probes' stories, tasks and SAE-free readouts for the activation run, once for any number of SAEs.

    Training side: the first PROBE_TEXTS stories the SAE was trained on, from the run's rows; a run
    saved for training on the fly (ACTIVATION_SOURCE = "model") holds none, so those texts are run
    through the model here (the same stories either way, at PROBE_TEXTS forward passes at most).
    Test side: the evaluation texts (run through the model, unless `known` holds their layer output:
    text -> [tokens, d], as stage 03's splice keeps it), then the run's held-out documents (from
    its rows), PROBE_TEXTS stories in all: none of them trained the SAE, and none is on the
    training side (a text on both is left out of training's).
    """
    fields, skipped = probe_fields(settings)
    if skipped:
        return ProbeData(skipped=skipped)
    limit, dtype = settings.PROBE_TEXTS, getattr(torch, run.meta["dtype"])
    embed = dict(max_length=settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE, dtype=dtype, progress=progress)

    eval_stream = open_role_texts(settings, "eval")
    pairs = list(itertools.islice(eval_stream.with_records(), min(limit, settings.EVAL_DATA_LIMIT or limit)))
    eval_texts = [text for text, _ in pairs]
    evaluation = _embedded_stories(model, tokenizer, layer, eval_texts, [r for _, r in pairs],
                                   source=f"{len(pairs)} evaluation texts of {eval_stream.source}", known=known,
                                   **embed)

    hashes = run.document_hashes()
    eval_hashes = {document_hash(t) for t in eval_texts}
    heldout_docs = [d for d in _store_documents(run, heldout_start, run.n_tokens, limit - len(pairs))
                    if int(hashes[d[0]]) not in eval_hashes]
    # documents before the first held-out one trained the SAE (on the fly: the run lists their hashes first)
    first = _store_documents(run, heldout_start, run.n_tokens, 1)
    first_heldout = first[0][0] if first else len(hashes)
    heldout_hashes = {int(hashes[d[0]]) for d in heldout_docs}
    train_stream = open_role_texts(settings, "train")
    taken, heldout_records = _training_pass(train_stream, {int(h) for h in hashes[:first_heldout]},
                                            eval_hashes | heldout_hashes, limit, heldout_hashes)
    heldout_docs = [d for d in heldout_docs if int(hashes[d[0]]) in heldout_records]
    stored = _store_stories(run, heldout_docs, [heldout_records[int(hashes[d[0]])] for d in heldout_docs],
                            f"{len(heldout_docs)} held-out documents of activation run {run.run_id}")
    test = Stories.join([evaluation, stored])

    if heldout_start > 0:  # the run holds the SAE's training rows
        index_of: dict[int, int] = {}
        for i, h in enumerate(hashes[:first_heldout].tolist()):
            index_of.setdefault(int(h), i)
        wanted = {index_of[h]: record for h, _, record in taken}
        docs = _store_documents(run, 0, heldout_start, wanted=set(wanted))
        train = _store_stories(run, docs, [wanted[d[0]] for d in docs],
                               f"{len(docs)} training documents of activation run {run.run_id}")
    else:
        train = _embedded_stories(model, tokenizer, layer, [t for _, t, _ in taken], [r for _, _, r in taken],
                                  source=f"{len(taken)} training texts of {train_stream.source}, embedded "
                                         "(the run holds no training rows)", **embed)
    for side, stories in (("training", train), ("test", test)):
        if not len(stories):
            return ProbeData(skipped=f"sparse probing skipped: no {side} stories with labels found (are the texts "
                                     f"of {train_stream.source} those of activation run {run.run_id}?)")
    return ProbeData(fields=fields, train=train, test=test,
                     settings={"min_positives": settings.PROBE_MIN_POSITIVES,
                               "min_accuracy": settings.PROBE_MIN_ACCURACY},
                     **references(train, test, fields, settings, tokenizer))


def cross_validated(probe, x: torch.Tensor, y: np.ndarray) -> Any:
    """The mean over the CV_FOLDS folds of the training stories (FOLD_SEED's) of what `probe(x_in, y_in,
    x_out, y_out)` scores on the held-out fold: a float, or a {k: float} dict averaged per k."""
    fold = _folds(y, CV_FOLDS, FOLD_SEED)
    scores = [probe(x[torch.from_numpy(fold != f)], y[fold != f], x[torch.from_numpy(fold == f)], y[fold == f])
              for f in range(CV_FOLDS)]
    if isinstance(scores[0], dict):
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    return float(np.mean(scores))


def references(train: Stories, test: Stories, fields: list[str], settings, tokenizer=None) -> dict[str, Any]:
    """The tasks, each with its two SAE-free readouts (module docstring): the dense probe on all d
    mean-pooled raw dimensions, and the lexical probe on the k tokens that best separate the classes.
    A task is kept when the better of them (at any k), cross-validated on the training stories, reaches
    PROBE_MIN_ACCURACY and the chance bound for the training counts; the others are dropped with the
    reason. Kept tasks are then scored on the test stories, which chose nothing."""
    tasks, dropped = build_tasks(train.records, test.records, fields, settings.PROBE_MIN_POSITIVES)
    x_train, x_test = pool_rows(train), pool_rows(test)
    vocabulary = lexical_vocabulary(train)
    words_train, words_test = token_presence(train, vocabulary), token_presence(test, vocabulary)

    def dense_probe(a, y_a, b, y_b):
        return probe_accuracy(a, y_a, b, y_b, FOLD_SEED)[0]

    def lexical_probe(a, y_a, b, y_b):
        return sparse_probe(a, y_a, b, y_b, FOLD_SEED)[0]

    kept, rows = [], []
    for task in tasks:
        counts = task.counts()
        a, b = torch.from_numpy(task.train >= 0), torch.from_numpy(task.test >= 0)
        y_train, y_test = task.train[a.numpy()], task.test[b.numpy()]
        dense_cv = cross_validated(dense_probe, x_train[a], y_train)
        lexical_cv = cross_validated(lexical_probe, words_train[a], y_train)
        best_cv = max(dense_cv, *lexical_cv.values())
        bound = chance_bound(counts["train_positives"], counts["train_negatives"])
        needed = max(settings.PROBE_MIN_ACCURACY, bound)
        chosen_on = {"dense_cv": dense_cv, "lexical_cv": lexical_cv, "best_sae_free_cv": best_cv,
                     "chance_bound": bound, "needed": needed}
        if best_cv < needed:
            dropped.append({"task": task.name, "field": task.field, "value": task.value, **counts, **chosen_on,
                            "reason": f"no SAE-free readout reaches {needed:.3f} cross-validated on the training "
                                      f"stories (PROBE_MIN_ACCURACY {settings.PROBE_MIN_ACCURACY}, chance + "
                                      f"{CHANCE_SES} SE on {counts['train_positives']} positive training stories "
                                      f"{bound:.3f}): dense {dense_cv:.3f}, lexical {max(lexical_cv.values()):.3f}; "
                                      "the label is not readable from the stories"})
            continue
        dense, lam = probe_accuracy(x_train[a], y_train, x_test[b], y_test, FOLD_SEED)
        lexical, columns = sparse_probe(words_train[a], y_train, words_test[b], y_test, FOLD_SEED)
        chosen = vocabulary[columns[str(max(KS))]].tolist()
        kept.append(task)
        rows.append({"task": task.name, "field": task.field, "value": task.value, **counts, "dense": dense,
                     "dense_l2": lam, "lexical": lexical,
                     "lexical_tokens": tokenizer.convert_ids_to_tokens(chosen) if tokenizer is not None else chosen,
                     "best_sae_free": max(dense, *lexical.values()), **chosen_on})
    return {"tasks": kept, "references": rows, "dropped": dropped}


# --- what an SAE scores ---------------------------------------------------------------------------

def score_sae(sae: TopKSAE, data: ProbeData) -> dict[str, Any]:
    """Each kept task's balanced accuracy at k = 1, 2, 5 latents (chosen by separation_scores on the
    training side) and the latents chosen; the mean over kept tasks at each k."""
    if data.skipped:
        return {"skipped": data.skipped}
    codes_train, codes_test = pool_codes(sae, data.train), pool_codes(sae, data.test)
    rows = []
    for task, reference in zip(data.tasks, data.references):
        a, b = torch.from_numpy(task.train >= 0), torch.from_numpy(task.test >= 0)
        accuracy, latents = sparse_probe(codes_train[a], task.train[a.numpy()], codes_test[b], task.test[b.numpy()],
                                         FOLD_SEED)
        rows.append({**reference, "accuracy": accuracy, "latents": latents})
    return {"skipped": None, "mean": {str(k): _mean(r["accuracy"][str(k)] for r in rows) for k in KS}, "tasks": rows}


def sparse_probing(settings, trained, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 03's sparse probing of its SAE (analysis.TrainedSAE) with the model that `loaded`
    (analysis.LayerModel) holds, or loaded here: the prepared stories and tasks with this SAE's
    accuracies, for store/analysis.json. A dataset without labels is skipped before any model load.
    The evaluation texts whose layer output splice_report kept in `loaded` are not run again."""
    from .analysis import load_layer_model

    _, skipped = probe_fields(settings)
    if skipped:
        return {"skipped": skipped}
    loaded = loaded or load_layer_model(settings)
    data = prepare(settings, trained.run, trained.heldout_start, loaded.model, loaded.tokenizer, loaded.layer, progress,
                   known=loaded.evaluation_rows)
    return {**data.summary(), **score_sae(trained.sae, data)}


def task_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per kept task: its test positives, this SAE's accuracy at each k, and the SAE-free readouts."""
    return [{"task": t["task"], "test positives": t["test_positives"],
             **{f"SAE k={k}": v for k, v in t["accuracy"].items()},
             **{f"lexical k={k}": v for k, v in t["lexical"].items()}, "dense": t["dense"]} for t in result["tasks"]]


def summary_text(result: dict[str, Any]) -> str:
    """The probing result in a few lines: what it ran on, the means, and each dropped task's reason."""
    if result.get("skipped"):
        return result["skipped"]
    lines = [f"sparse probing ({result['metric']}): probes fit on {result['train_source']}, scored on "
             f"{result['test_source']}"]
    if not result["tasks"]:
        lines.append("no task kept: no label is readable from the stories, so there is nothing to compare SAEs on")
    else:
        def means(values: dict[str, float | None]) -> str:
            return ", ".join(f"k = {k} {v:.3f}" for k, v in values.items() if v is not None)

        sae = f"this SAE {means(result['mean'])}; " if "mean" in result else ""  # prepared data alone has no SAE
        lines.append(f"{len(result['tasks'])} tasks kept; mean over them: {sae}lexical (bag of tokens) "
                     f"{means(result['mean_lexical'])}; dense probe on all d raw dimensions {result['mean_dense']:.3f}")
    lines += [f"dropped {d['task']}: {d['reason']}" for d in result["dropped"]]
    return "\n".join(lines)
