"""Where stage 02's training rows come from (ACTIVATION_SOURCE): a source hands out shuffled batches
of activations, already on the training device, and the trainer consumes them.

- "store" (`StoreRows`): the rows stage 01 saved. Right for many epochs over a corpus that fits on
  disk (the specification's flow: 100 epochs over 1,000 stories).
- "model" (`ModelRows`): activations made as training goes, by running the model up to the layer
  over the training texts; nothing but the held-out documents is ever written to disk. Right for
  the hundreds of millions of tokens a production SAE needs (at d = 1,536 in float16, 100M
  tokens cached take 307 GB). Each epoch runs the model again.

Both fill a shuffle buffer of at most SHUFFLE_BUFFER_TOKENS rows on the training device (plus the
fewer than one batch of rows carried over from the previous buffer), shuffle it there, and cut it
into batches: on a GPU the only host work is one permutation per buffer. A buffer of the default
262,144 rows mixes ~2,000 documents of 128 tokens, so no batch is dominated by one document.

A source's place at the end of a buffer (`Position`: the buffer's number, where the next one starts,
the rows carried over) is all it needs to continue, so a checkpoint taken there resumes mid-epoch to
the same batches as an uninterrupted run. The order depends only on (SEED, epoch, buffer).
"""
from __future__ import annotations

import itertools
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..base.distributed import World, gather_objects
from ..base.memory import forward_parts
from .data import document_hash
from .models import length_sorted_batches, span_indices, write_document_activations
from .prefetch import InBackground, ReadAhead
from .store import DTYPES, RERUN_01, ActivationRun, StoreError, heldout_documents

Position = dict[str, Any]  # {"buffer": int, "next": int, ..., "carry": tensor}: where an epoch continues
# On the fly, the texts are read this many buffers ahead and dealt into buffers at random within that
# window, as the store's chunks are: a buffer then mixes documents from across 16 buffers' worth of the
# stream (16 MB of token ids at the default), not one stretch of it (observations.md: ΔCE)
READ_AHEAD_BUFFERS = 16
# FORWARD_BATCH_TOKENS = 0 on a CUDA GPU: forward batches of this many tokens (128 texts of 128), where
# BATCH_SIZE_SAVE's 16 texts leave the GPU waiting on kernel launches (issue 33; no GPU figure measured here)
CUDA_FORWARD_BATCH_TOKENS = 16384


class RowSource(Protocol):
    kind: str  # ACTIVATION_SOURCE
    copies_of_heldout: int  # training documents left out because a held-out document has the same text

    @property
    def n_rows(self) -> int:
        """Training rows in one epoch."""

    def describe(self) -> str:
        """Where the rows come from, in a line."""

    def memory_parts(self) -> dict[str, int]:
        """The large buffers it will hold, in bytes (saekit.base.memory)."""

    def sample(self) -> torch.Tensor:
        """Training rows (float32, CPU) for the input scale and b_dec's starting point."""

    def epoch(self, epoch: int, position: Position | None = None) -> Iterator[tuple[torch.Tensor, Position | None]]:
        """Every training row once, in batches on the device, each with the position after it where
        a checkpoint may be taken (None elsewhere); continues from `position`."""


def _generator(*seed: int) -> torch.Generator:
    """A CPU generator seeded by the tuple (seed, epoch[, buffer]); permutations drawn on the CPU are
    the same whatever the training device."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]))


def smallest_last_batch(batch_size: int) -> int:
    """The fewest rows an epoch's last, partial batch may have: half a batch, and at least two. The
    loss is divided by the batch's own variance, which a handful of rows estimate badly and one row
    not at all (zero variance: an infinite loss); a smaller remainder is dropped for that epoch. The
    rows are reshuffled every epoch, so a different few are dropped each time."""
    return max(2, (batch_size + 1) // 2)


def rows_dropped(n_rows: int, batch_size: int) -> int:
    """The rows an epoch of n_rows leaves out: its remainder, when that is too small a batch."""
    remainder = n_rows % batch_size
    return remainder if remainder < smallest_last_batch(batch_size) else 0


def batches_in_epoch(n_rows: int, batch_size: int) -> int:
    """Steps in an epoch of n_rows: the full batches, and the remainder if it is kept."""
    return -(-(n_rows - rows_dropped(n_rows, batch_size)) // batch_size)


def shuffled_batches(rows: torch.Tensor, generator: torch.Generator, batch_size: int, last: bool,
                     after: Position) -> Iterator[tuple[torch.Tensor, Position | None]]:
    """Batches of `rows` in random order: full ones, and with `last` the remainder too when it is
    at least `smallest_last_batch` (a smaller one is dropped).

    Yields (batch, position): the position, with the rows left over as its carry, comes with the
    buffer's final batch (None elsewhere, and at the end of an epoch). Returns the rows left over."""
    order = torch.randperm(len(rows), generator=generator).to(rows.device)
    n_out = len(rows) // batch_size * batch_size
    if last and len(rows) - n_out >= smallest_last_batch(batch_size):
        n_out = len(rows)
    carry = rows[order[n_out:]]
    starts = range(0, n_out, batch_size)
    for lo in starts:
        at_end = lo == starts[-1] and not last
        yield rows[order[lo:lo + batch_size]], ({**after, "carry": carry} if at_end else None)
    return carry


SAMPLE_ROWS = 16384  # rows that set the input scale and b_dec's starting point


def _spread(start: int, stop: int, n: int) -> np.ndarray:
    return np.unique(np.linspace(start, stop - 1, min(n, stop - start)).astype(np.int64))


def training_sample(run: ActivationRun, start: int, stop: int, n: int = SAMPLE_ROWS) -> torch.Tensor:
    """Up to n stored rows spread evenly over [start, stop), float32; excluded tokens' rows left out."""
    rows, keep = _spread(start, stop, n), run.keep()
    return torch.from_numpy(run.take(rows if keep is None else rows[keep[rows]]))


def evenly_spaced(rows: torch.Tensor, n: int = SAMPLE_ROWS) -> torch.Tensor:
    """Up to n of `rows`, spread evenly, as float32 on the CPU (a sample made on the fly)."""
    return rows[torch.from_numpy(_spread(0, len(rows), n)).to(rows.device)].float().cpu()


def heldout_copies(run: ActivationRun, heldout_fraction: float) -> tuple[int, list[tuple[int, int]]]:
    """The training documents of a stored run whose text is also a held-out one (an exact duplicate in
    the corpus): how many, and their row ranges, which training leaves out, as on the fly
    (`count_training_texts`), so that held-out figures are on tokens training never saw. A run that
    records no document hashes (made outside stage 01) has none to find."""
    if "documents_sha256" not in run.meta:
        return 0, []
    hashes = run.document_hashes()
    first_heldout = len(hashes) - heldout_documents(len(hashes), heldout_fraction)
    copies = np.flatnonzero(np.isin(hashes[:first_heldout], hashes[first_heldout:]))
    if not len(copies):
        return 0, []
    stop = run.heldout_start(heldout_fraction)
    dropped = np.isin(run.tokens()[:stop, 1], copies)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], dropped, [False]]).astype(np.int8)))
    return len(copies), [(int(lo), int(hi)) for lo, hi in zip(edges[::2], edges[1::2])]


@dataclass
class StoreRows:
    """Rows [start, stop) of a stored run, less the `excluded` row ranges (sorted, within the range).

    When the range fits in the buffer, it is read once, kept on the device, and reshuffled every
    epoch. Beyond that the range is cut into chunks read contiguously, in a random chunk order; each
    buffer of chunks goes to the device and is shuffled there, so memory stays flat whatever the
    size of the run."""

    run: ActivationRun
    start: int
    stop: int
    batch_size: int
    buffer_tokens: int
    device: torch.device
    seed: int
    excluded: list[tuple[int, int]] = field(default_factory=list)
    copies_of_heldout: int = 0  # documents the excluded rows belong to
    prefetch: bool = True  # read the next buffer in the background (saekit.activations.prefetch)
    with_target: bool = False  # a transcoder's rows: the target's beside the input's, [rows, d_model + d_target]
    kind = "store"

    def __post_init__(self) -> None:
        self._resident: torch.Tensor | None = None
        # counted once: the mask spans every training row, and n_rows is read every epoch
        self._n_rows = int(self._kept(self.start, self.stop).sum())

    @property
    def n_rows(self) -> int:
        return self._n_rows

    def describe(self) -> str:
        left_out = (f", {self.copies_of_heldout} documents left out as copies of held-out ones"
                    if self.copies_of_heldout else "")
        return f"the stored activations of run {self.run.run_id} ({self.n_rows} training rows{left_out})"

    def memory_parts(self) -> dict[str, int]:
        """Two buffers, each with room for a batch carried over: the one trained on and the next, read
        ahead (or, when the range fits in one, the resident rows and their copy joined to a carry)."""
        rows = min(self.n_rows, self.buffer_tokens + self.batch_size)
        width = self.run.d_model + self.run.d_target * self.with_target
        return {"the shuffle buffer": 2 * rows * width * np.dtype(DTYPES[self.run.meta["dtype"]]).itemsize}

    def _kept(self, lo: int, hi: int) -> np.ndarray:
        """Which of rows [lo, hi) are trained on: neither an excluded token's (EXCLUDE_TOKENS) nor in a document
        that copies a held-out one."""
        tokens_kept = self.run.keep()
        keep = np.ones(hi - lo, bool) if tokens_kept is None else tokens_kept[lo:hi].copy()
        for a, b in self.excluded:
            if a < hi and b > lo:
                keep[max(a, lo) - lo:min(b, hi) - lo] = False
        return keep

    def sample(self) -> torch.Tensor:
        spread = _spread(self.start, self.stop, SAMPLE_ROWS)
        return torch.from_numpy(self.run.take(spread[self._kept(self.start, self.stop)[spread - self.start]],
                                              self.with_target))

    def _read(self, lo: int, hi: int) -> np.ndarray:
        rows = self.run.rows(lo, hi, dtype=DTYPES[self.run.meta["dtype"]], with_target=self.with_target)
        keep = self._kept(lo, hi)
        return rows if keep.all() else rows[keep]

    def _read_buffer(self, chunks: list[tuple[int, int]]) -> np.ndarray:
        return np.concatenate([self._read(lo, hi) for lo, hi in chunks])

    def _buffers(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Each buffer's chunks, in this epoch's order."""
        if self.n_rows <= self.buffer_tokens:
            return [[(self.start, self.stop)]]
        chunk = max(self.batch_size, min(self.buffer_tokens // 16, 16384))
        chunks = [(lo, min(self.stop, lo + chunk)) for lo in range(self.start, self.stop, chunk)]
        order = torch.randperm(len(chunks), generator=_generator(self.seed, epoch)).tolist()
        per_buffer = max(1, self.buffer_tokens // chunk)
        return [[chunks[i] for i in order[b:b + per_buffer]] for b in range(0, len(order), per_buffer)]

    def epoch(self, epoch: int, position: Position | None = None) -> Iterator[tuple[torch.Tensor, Position | None]]:
        """One pass over every row, as (batch, position) in the stored dtype; continues from `position`."""
        buffers = self._buffers(epoch)
        first = position["buffer"] if position else 0
        carry = position["carry"].to(self.device) if position else None
        if first >= len(buffers):
            return
        if len(buffers) == 1:
            if self._resident is None:
                self._resident = torch.from_numpy(self._read(self.start, self.stop)).to(self.device)
            rows = self._resident if carry is None or not len(carry) else torch.cat([carry, self._resident])
            yield from shuffled_batches(rows, _generator(self.seed, epoch, 0), self.batch_size, last=True,
                                        after={"buffer": 1, "next": 0})
            return
        reads = [partial(self._read_buffer, chunks) for chunks in buffers[first:]]
        with ReadAhead(reads, self.device, self.batch_size, background=self.prefetch) as ahead:
            for b in range(first, len(buffers)):
                rows = None  # the previous buffer goes before the one after the next is allocated
                rows = ahead.take(carry)
                carry = yield from shuffled_batches(rows, _generator(self.seed, epoch, b), self.batch_size,
                                                    last=b == len(buffers) - 1, after={"buffer": b + 1, "next": 0})


@dataclass(frozen=True)
class TrainingTexts:
    """What stage 01 recorded of the texts to train on when it saved only the held-out documents:
    every document's hash in order, how many come first for training, and their tokens."""

    hashes: np.ndarray  # uint64, every document stage 01 read (training ones first)
    n_training: int
    n_tokens: int  # training tokens, each document truncated to MAX_LENGTH

    @property
    def heldout(self) -> set[int]:
        return set(self.hashes[self.n_training:].tolist())

    @property
    def copies_of_heldout(self) -> int:
        """Training documents left out as copies of held-out ones."""
        return int(np.isin(self.hashes[:self.n_training], self.hashes[self.n_training:]).sum())


def count_training_texts(texts: Iterable[str], tokenizer, max_length: int, heldout_fraction: float,
                         progress: bool = False, excluded: frozenset[int] = frozenset()) -> tuple[TrainingTexts, int]:
    """Read every text once (tokenize, hash) and decide which are training's: the last
    HELDOUT_FRACTION of documents are held out, as for a stored run, and a training document whose
    text is also a held-out one is left out of training. Tokens counted are those trained on (the
    `excluded` ids left out). Returns the plan and the number left out."""
    hashes, lengths = [], []
    bar = tqdm(desc="counting training texts", unit="text", disable=not progress)
    for group in _groups(texts, 512):
        hashes.extend(document_hash(t) for t in group)
        lengths.extend(sum(t not in excluded for t in ids)
                       for ids in tokenizer(group, truncation=True, max_length=max_length)["input_ids"])
        bar.update(len(group))
    bar.close()
    n_training = len(hashes) - heldout_documents(len(hashes), heldout_fraction)
    heldout = set(hashes[n_training:])
    duplicates = [i for i in range(n_training) if hashes[i] in heldout]
    n_tokens = sum(lengths[:n_training]) - sum(lengths[i] for i in duplicates)
    return TrainingTexts(np.array(hashes, np.uint64), n_training, n_tokens), len(duplicates)


def training_texts_of(run: ActivationRun) -> TrainingTexts:
    """The training texts that `run` (saved with ACTIVATION_SOURCE='model') records, or an error."""
    if run.meta.get("rows") != "heldout":
        raise StoreError(f"activation run {run.run_id} holds every token: it was saved for "
                         "ACTIVATION_SOURCE='store'. Train from it with --ACTIVATION_SOURCE=store, or run stage "
                         "01 with --ACTIVATION_SOURCE=model to save only the held-out documents")
    return TrainingTexts(run.document_hashes(), run.meta["training_documents"], run.meta["training_tokens"])


class ModelRows:
    """Activations of the training texts, made by the model as training consumes them.

    The texts are read READ_AHEAD_BUFFERS buffers ahead (token ids only); their documents are dealt
    at random into buffers of up to `buffer_tokens` tokens; each buffer is run through the model up to
    the layer in batches of similar length (little padding; the forward stops at the layer), and its
    rows are shuffled on the device. A forward batch holds `forward_batch` texts, or with `forward_tokens`
    as many as fit in that many tokens, padding included (`length_sorted_batches`). Under torchrun the
    buffer's forward batches are dealt out among the processes and their rows gathered, so every
    process holds the same buffer, made by the same batches, as one process would. The texts are
    tokenised and hashed in a background thread (`background`), a read-ahead window ahead of the one
    being trained on: the same documents, in the same order, as without it."""

    kind = "model"

    def __init__(self, model, tokenizer, layer, texts: Iterable[str], plan: TrainingTexts, *, d: int, max_length: int,
                 forward_batch: int, batch_size: int, buffer_tokens: int, dtype: str, device: torch.device, seed: int,
                 world: World = World(), excluded: frozenset[int] = frozenset(), forward_tokens: int = 0,
                 background: bool = True):
        self.model, self.tokenizer, self.layer, self.texts, self.plan, self.d = model, tokenizer, layer, texts, plan, d
        self.max_length, self.forward_batch, self.batch_size = max_length, forward_batch, batch_size
        self.forward_tokens, self.background = forward_tokens, background
        self.buffer_tokens, self.dtype = buffer_tokens, getattr(torch, dtype)
        self.device, self.seed, self.world = torch.device(device), seed, world
        self._heldout = plan.heldout
        self._excluded = np.array(sorted(excluded), np.int64)  # these tokens' rows are made, then left out
        self.copies_of_heldout = plan.copies_of_heldout
        self._first: torch.Tensor | None = None  # epoch 0's first buffer, made once for the sample too

    @property
    def n_rows(self) -> int:
        return self.plan.n_tokens

    def memory_parts(self) -> dict[str, int]:
        return {"the shuffle buffer": 2 * (self.buffer_tokens + self.batch_size) * self.d * self.dtype.itemsize,
                # the window trained on, the next one queued and the one after it being tokenised
                "the read-ahead window's token ids": (3 if self.background else 1) * READ_AHEAD_BUFFERS
                * self.buffer_tokens * 4,
                **forward_parts(self.model, self._forward_batch_tokens, self.max_length)}

    @property
    def _forward_batch_tokens(self) -> int:
        """The most tokens, padding included, a forward batch holds: a text longer than forward_tokens runs alone."""
        if self.forward_tokens:
            return max(self.forward_tokens, self.max_length)
        return self.forward_batch * self.max_length

    def describe(self) -> str:
        return (f"the model, on the fly: {self.plan.n_training} training texts ({self.n_rows} tokens) "
                f"each epoch, in buffers of up to {self.buffer_tokens} tokens")

    def _documents(self, first: int) -> Iterator[tuple[int, np.ndarray]]:
        """(index, token ids) of the training documents from index `first` on, each checked against the
        hash stage 01 recorded for it; copies of held-out documents are left out."""
        index = first
        for group in _groups(itertools.islice(self.texts, first, self.plan.n_training), 512):
            ids = self.tokenizer(group, truncation=True, max_length=self.max_length)["input_ids"]
            for text, doc in zip(group, ids):
                digest = document_hash(text)
                if digest != int(self.plan.hashes[index]):
                    raise StoreError(f"training text {index} is not the one stage 01 read (the dataset or "
                                     f"its settings changed). {RERUN_01}")
                if digest not in self._heldout and len(doc):  # a text the tokenizer makes nothing of has no rows
                    yield index, np.asarray(doc, np.int32)  # 4 bytes a token while it waits in the read-ahead
                index += 1
        if index < self.plan.n_training:
            raise StoreError(f"the dataset gave {index} training texts, not the {self.plan.n_training} stage 01 "
                             f"counted (it changed since). {RERUN_01}")

    def _windows(self, first: int) -> Iterator[tuple[list[np.ndarray], int, int]]:
        """(documents, index of the first, index after the last) of each read-ahead window of up to
        READ_AHEAD_BUFFERS buffers' worth of tokens, from document `first` on."""
        docs, tokens, start = [], 0, first
        for index, doc in self._documents(first):
            if docs and tokens + len(doc) > READ_AHEAD_BUFFERS * self.buffer_tokens:
                yield docs, start, index
                docs, tokens, start = [], 0, index
            docs.append(doc)
            tokens += len(doc)
        if docs:
            yield docs, start, self.plan.n_training

    def _buffers(self, epoch: int, position: Position | None) -> Iterator[tuple[list[np.ndarray], Position, bool]]:
        """(documents, the position after them, whether they are the epoch's last) for each buffer.

        A window's documents are dealt into its buffers in an order drawn from (SEED, epoch, the
        window's first document), so a buffer mixes documents from across the window, not only
        neighbours in the stream, and a resumed run finds the same buffers again."""
        skip = position["in_window"] if position else 0
        windows = self._windows(position["next"] if position else 0)
        with (InBackground(windows) if self.background else nullcontext(windows)) as windows:
            for docs, start, end in windows:
                order = torch.randperm(len(docs), generator=_generator(self.seed, epoch, start)).tolist()
                buffers, current, tokens = [], [], 0
                for i in order:
                    if current and tokens + len(docs[i]) > self.buffer_tokens:
                        buffers.append(current)
                        current, tokens = [], 0
                    current.append(docs[i])
                    tokens += len(docs[i])
                buffers.append(current)
                for b in range(skip, len(buffers)):
                    at_end = b == len(buffers) - 1
                    after = {"next": end, "in_window": 0} if at_end else {"next": start, "in_window": b + 1}
                    yield buffers[b], after, at_end and end == self.plan.n_training
                skip = 0

    def _rows(self, docs: list[np.ndarray], carry: torch.Tensor | None = None) -> torch.Tensor:
        """`carry`, then the documents' activations in document order: one tensor on the device in the
        storage dtype, each forward batch's rows written into place (kept as a tensor per document,
        then joined, they fragmented the heap: peak RSS grew 37% for 10x the tokens)."""
        lengths = [len(doc) for doc in docs]
        start = len(carry) if carry is not None else 0
        offsets = (start + np.concatenate([[0], np.cumsum(lengths)])).tolist()
        rows = torch.empty(offsets[-1], self.d, dtype=self.dtype, device=self.device)
        if start:
            rows[:start] = carry
        batches = length_sorted_batches(lengths, self.forward_batch, self.forward_tokens)
        write_document_activations(rows, offsets, self.model, self.tokenizer, self.layer, docs,
                                   batches[self.world.rank::self.world.size])
        if self.world.distributed:  # every process needs the whole buffer to draw the same global batches
            starts, ends = np.array(offsets[:-1]), np.array(offsets[1:])
            made = []  # each process's rows: those of the documents in its share of the batches, in that order
            for rank in range(self.world.size):
                share = [i for batch in batches[rank::self.world.size] for i in batch]
                made.append(torch.from_numpy(span_indices(starts[share], ends[share] - starts[share])).to(self.device))
            shares = gather_objects(rows.index_select(0, made[self.world.rank]).cpu(), self.world)
            for rank, share in enumerate(shares):
                if rank != self.world.rank:
                    rows.index_copy_(0, made[rank], share.to(self.device))
        if not bool(torch.isfinite(rows[start:]).all()):
            raise StoreError(f"the layer gave non-finite activations (inf or NaN in {self.dtype}) for training "
                             "texts; use ACTIVATION_DTYPE='float32' if the values overflow float16, or check the model")
        if len(self._excluded):
            keep = np.concatenate([np.ones(start, bool), ~np.isin(np.concatenate(docs), self._excluded)])
            rows = rows[torch.from_numpy(keep).to(rows.device)]
        return rows

    def sample(self) -> torch.Tensor:
        with closing(self._buffers(0, None)) as buffers:  # its tokenising thread stops here
            docs, _, _ = next(buffers)
        self._first = self._rows(docs)
        return evenly_spaced(self._first)

    def epoch(self, epoch: int, position: Position | None = None) -> Iterator[tuple[torch.Tensor, Position | None]]:
        """One pass over the training texts, as (batch, position); continues from `position`."""
        buffer = position["buffer"] if position else 0
        carry = position["carry"].to(self.device) if position else None
        for docs, after, last in self._buffers(epoch, position):
            rows = None  # the previous buffer goes before the next is made (memory_parts counts two)
            if epoch == 0 and buffer == 0 and self._first is not None:
                rows, self._first = self._first, None
            else:
                rows = self._rows(docs, carry)
            carry = yield from shuffled_batches(rows, _generator(self.seed, epoch, buffer), self.batch_size, last,
                                                after={"buffer": buffer + 1, **after})
            buffer += 1


def _groups(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


# the settings that decide which texts stage 01 counted for training, and how they are tokenized
TEXT_SETTINGS = ("HF_DATASET", "DATA_SPLIT", "EVAL_DATASET", "EVAL_SHARE", "TEXT_FIELD", "DATA_LIMIT", "MAX_LENGTH",
                 "HELDOUT_FRACTION", "EXCLUDE_TOKENS")


def store_rows(settings, run: ActivationRun, device: torch.device) -> StoreRows:
    """ACTIVATION_SOURCE='store': the run's training rows, or an error if it holds none."""
    if run.meta.get("rows") == "heldout":
        raise StoreError(f"activation run {run.run_id} holds only the held-out documents (stage 01 ran with "
                         "ACTIVATION_SOURCE='model'). Train on the fly with --ACTIVATION_SOURCE=model, or run stage "
                         "01 with --ACTIVATION_SOURCE=store to save every token")
    stop = run.heldout_start(settings.HELDOUT_FRACTION)
    copies, excluded = heldout_copies(run, settings.HELDOUT_FRACTION)
    return StoreRows(run, 0, stop, settings.BATCH_SIZE_TRAIN, settings.SHUFFLE_BUFFER_TOKENS, device, settings.SEED,
                     excluded, copies, with_target=settings.target is not None)


def forward_batch_tokens(setting: int, device: torch.device) -> int:
    """FORWARD_BATCH_TOKENS: 0 is CUDA_FORWARD_BATCH_TOKENS on a CUDA GPU, and 0 (BATCH_SIZE_SAVE texts a
    forward batch) elsewhere."""
    return setting or (CUDA_FORWARD_BATCH_TOKENS if torch.device(device).type == "cuda" else 0)


def model_rows(settings, run: ActivationRun, model, tokenizer, device: torch.device,
               world: World = World()) -> ModelRows:
    """ACTIVATION_SOURCE='model': the training texts stage 01 counted, run through `model` as training
    goes; an error if the settings that chose them changed since."""
    from .data import open_role_texts
    from .models import resolve_layer

    plan = training_texts_of(run)
    recorded = run.meta.get("settings", {})
    changed = [f"{key} (stage 01: {recorded.get(key)!r}, now {getattr(settings, key)!r})"
               for key in TEXT_SETTINGS if recorded.get(key) != getattr(settings, key)]
    if changed:
        raise StoreError("training on the fly reads the texts stage 01 counted, but " + ", ".join(changed)
                         + f" changed since. Pass stage 01's values, or {RERUN_01[0].lower()}{RERUN_01[1:]}")
    layer = resolve_layer(model, settings.LAYER_SIGNATURE)
    if settings.target is not None:  # a transcoder's input and target, side by side from one forward
        layer = (layer, resolve_layer(model, settings.target, "TARGET_SIGNATURE"))
    return ModelRows(model, tokenizer, layer, open_role_texts(settings, "train"), plan,
                     d=run.d_model + (run.d_target if settings.target is not None else 0), max_length=settings.MAX_LENGTH,
                     forward_batch=settings.BATCH_SIZE_SAVE, batch_size=settings.BATCH_SIZE_TRAIN,
                     buffer_tokens=settings.SHUFFLE_BUFFER_TOKENS, dtype=run.meta["dtype"], device=device,
                     seed=settings.SEED, world=world, excluded=run.excluded,
                     forward_tokens=forward_batch_tokens(settings.FORWARD_BATCH_TOKENS, device))
