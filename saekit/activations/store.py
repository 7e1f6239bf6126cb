"""The activation store: stage 01 writes it, every later stage reads it.

Layout of one run, store/runs/<run_id>/:
    shard_00000.acts.npy     [tokens, d_model]  float16 or float32, memory-mappable
    shard_00000.tokens.npy   [tokens, 3] int32  (token id, document index, position)
    shard_00000.target.npy   [tokens, d_target] a transcoder's target (TRAIN_TARGET): the output of the
                             module TARGET_SIGNATURE names, for the same tokens, from the same forward
    ...
    documents.npy            [n_documents] uint64: each document's hash (data.document_hash)
    metadata.json            model, layer, dataset, tokenizer, settings, counts, dtype, time, and
                             the SHA-256 of every file above; sealed with its own checksum

Only real tokens are stored (padding excluded). A run is written into runs/<run_id>.partial/;
each shard file is written whole and renamed, metadata.json is written last, then the folder is
renamed and store/run_id.txt is replaced. An interrupted run therefore leaves the previous run and
run_id.txt as they were, and only a .partial folder behind, which the next stage 01 removes.

A reader checks each shard once per process, when first opened: its checksum, and that every value
is finite. Corruption stops the stage with one line naming the file, not a model trained on it.
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..base.atomic import atomic_path, write_text
from ..base.distributed import World, barrier, broadcast_object, gather_objects, share
from ..base.errors import PipelineError
from .data import document_hash
from ..base.settings import TOKEN_ROLES
from ..base.integrity import IntegrityError, clean_stale_partials, read_sealed_json, sha256_file, verify_file, \
    write_sealed_json
from .models import length_sorted_batches, resolve_layer, weights_changes, write_document_activations

RUN_ID_FILE = "run_id.txt"
DOCUMENTS_FILE = "documents.npy"
DTYPES = {"float16": np.float16, "float32": np.float32}
RERUN_01 = "Run stage 01 again: python 01_save_activations.py"
FORWARD_WINDOW = 8  # batches of texts sorted by length together


class StoreError(PipelineError, RuntimeError):
    """Missing or mismatched activations, with the stage to run."""


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write `array` atomically; return the file's SHA-256."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object keeps np.save from appending .npy to the temp name
            np.save(f, array)
    return sha256_file(path)


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise IntegrityError(f"{path} is truncated or not an array file ({err}). {RERUN_01}") from None


class RunWriter:
    """Buffers activations and writes them as fixed-size shards of one run.

    Under torchrun every rank has a writer for the same folder, with its own shard names; rank 0
    creates the folder and, once every rank has closed its writer, publishes all their shards."""

    def __init__(self, store_dir: Path, run_id: str, d_model: int, dtype: str, shard_tokens: int,
                 shard_prefix: str = "shard_", create: bool = True, d_target: int = 0):
        if dtype not in DTYPES:
            raise ValueError(f"ACTIVATION_DTYPE must be one of {list(DTYPES)}, got {dtype!r}")
        self.final_dir = Path(store_dir) / "runs" / run_id
        self.dir = self.final_dir.with_name(run_id + ".partial")
        if create:
            self.dir.mkdir(parents=True, exist_ok=False)
            (self.dir / "owner.pid").write_text(str(os.getpid()))  # tells a later run a live writer from a dead one
        self.shard_prefix = shard_prefix
        self.run_id, self.d_model, self.dtype, self.shard_tokens = run_id, d_model, DTYPES[dtype], shard_tokens
        self.d_target = d_target
        self._acts: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, acts: torch.Tensor, token_ids: torch.Tensor, doc_idx: torch.Tensor, positions: torch.Tensor,
            target: torch.Tensor | None = None) -> None:
        """Rows of the layer's output (and, for a run with a target, the target's beside them: kept as one
        array [tokens, d_model + d_target] until each shard is cut in two files)."""
        if self.d_target:
            acts = torch.cat([acts, target.to(acts.device)], 1)
        stored = acts.detach().to("cpu", torch.float32).numpy().astype(self.dtype)
        if not np.isfinite(stored).all():
            bad = sorted(set(doc_idx[torch.from_numpy(~np.isfinite(stored).all(1))].tolist()))
            raise StoreError(f"the layer gave non-finite activations (inf or NaN in {np.dtype(self.dtype).name}) "
                             f"for documents {bad[:10]}; nothing was saved. Use ACTIVATION_DTYPE='float32' if the "
                             "values overflow float16, or check the model.")
        self._acts.append(stored)
        self._tokens.append(torch.stack([token_ids, doc_idx, positions], 1).to(torch.int32).cpu().numpy())
        self._buffered += len(acts)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        acts, tokens = np.concatenate(self._acts), np.concatenate(self._tokens)
        name = f"{self.shard_prefix}{len(self.shards):05d}"
        shard = {"name": name, "n_tokens": int(n),
                 "acts_sha256": _save_npy(self.dir / f"{name}.acts.npy", acts[:n, :self.d_model]),
                 "tokens_sha256": _save_npy(self.dir / f"{name}.tokens.npy", tokens[:n])}
        if self.d_target:
            shard["target_sha256"] = _save_npy(self.dir / f"{name}.target.npy", acts[:n, self.d_model:])
        self.shards.append(shard)
        self._acts, self._tokens = [acts[n:]], [tokens[n:]]
        self._buffered -= n

    def close(self) -> list[dict[str, Any]]:
        """Write the last, shorter shard; return the list of this writer's shards."""
        if self._buffered:
            self._flush(self._buffered)
        return self.shards

    def finish(self, metadata: dict[str, Any], document_hashes: list[int] | None = None,
               shards: list[dict[str, Any]] | None = None) -> Path:
        """Write the documents' hashes and the sealed metadata listing `shards` (by default this
        writer's own) in row order; publish the run."""
        shards = self.close() if shards is None else shards
        metadata = {**metadata, "run_id": self.run_id, "d_model": self.d_model,
                    **({"d_target": self.d_target} if self.d_target else {}),
                    "dtype": np.dtype(self.dtype).name, "n_tokens": sum(s["n_tokens"] for s in shards),
                    "shards": shards}
        if document_hashes is not None:
            metadata["documents_sha256"] = _save_npy(self.dir / DOCUMENTS_FILE, np.array(document_hashes, np.uint64))
        write_sealed_json(self.dir / "metadata.json", metadata)
        (self.dir / "owner.pid").unlink()
        self.dir.rename(self.final_dir)
        write_text(self.final_dir.parent.parent / RUN_ID_FILE, self.run_id + "\n")
        return self.final_dir


def new_run_id(store_dir: Path) -> str:
    base = "activations_" + datetime.now().strftime("%Y%m%d_%H%M%S")
    run_id, n = base, 1
    while (Path(store_dir) / "runs" / run_id).exists() or (Path(store_dir) / "runs" / f"{run_id}.partial").exists():
        n += 1
        run_id = f"{base}_{n}"
    return run_id


def save_activations(model, tokenizer, texts: Iterable[str], layer_signature: str, store_dir: Path, *,
                     max_length: int, batch_size: int, dtype: str = "float16", shard_tokens: int = 65536,
                     metadata: dict[str, Any] | None = None, run_id: str | None = None,
                     progress: bool = True, world: World = World(), document_offset: int = 0,
                     hashes_before: list[int] | None = None, target_signature: str | None = None) -> Path:
    """Run `texts` through `model` up to the layer and store every real token's activation.

    `texts` may be a stream (data.TextStream) read once, batch by batch: memory does not grow with
    the number of texts. Under torchrun each rank embeds a contiguous share of the texts (a stream
    is counted first) into shards of its own; rank 0 publishes one run whose metadata lists every
    rank's shards in rank order: the same rows, in the same order, as one process makes.
    With `target_signature` (a transcoder's target), that module's output is stored beside each row,
    from the same forward pass. Returns the finished run folder; store/run_id.txt names it.
    """
    layer = resolve_layer(model, layer_signature)
    d_target = 0
    if target_signature is not None:
        target = resolve_layer(model, target_signature, "TARGET_SIGNATURE")
        d_target = _output_width(model, target)
        layer = (layer, target)
        metadata = {**(metadata or {}), "target_signature": target_signature}
    if world.is_main:
        clean_stale_partials(Path(store_dir) / "runs")
    n_texts = len(texts) if hasattr(texts, "__len__") else None
    if world.distributed and n_texts is None:
        n_texts = sum(1 for _ in texts)  # each rank needs its contiguous share: count a stream first
    first, stop = share(n_texts, world) if n_texts is not None else (0, None)
    # texts are read a window at a time and run in batches of similar length: little padding
    batches = _batches(itertools.islice(texts, first, stop), batch_size * FORWARD_WINDOW)
    batches = itertools.chain([next(batches, [])], batches)  # a dataset that cannot be read fails before any write
    run_id = broadcast_object(run_id or (new_run_id(store_dir) if world.is_main else None), world)
    prefix = f"shard_r{world.rank:03d}_" if world.distributed else "shard_"
    writer = RunWriter(store_dir, run_id, model.config.hidden_size, dtype, shard_tokens, prefix, create=world.is_main,
                       d_target=d_target)
    barrier(world)  # the folder exists before any rank writes into it
    try:
        return _embed(model, tokenizer, layer, batches, batch_size, writer, texts, layer_signature, first, stop,
                      max_length, metadata, progress, world, document_offset, hashes_before or [])
    except BaseException:
        if world.is_main:  # leave nothing half-written behind
            shutil.rmtree(writer.dir, ignore_errors=True)
        raise


def _embed(model, tokenizer, layer, batches, batch_size: int, writer: RunWriter, texts, layer_signature: str, first: int,
           stop: int | None, max_length: int, metadata: dict[str, Any] | None, progress: bool, world: World,
           document_offset: int, hashes_before: list[int]) -> Path:
    started = time.perf_counter()
    bar = tqdm(total=None if stop is None else stop - first, desc="saving activations", unit="text",
               disable=not progress)
    n_tokens, hashes, start = 0, [], first + document_offset
    cut = [0, 0, 0]  # texts longer than max_length; the tokens of theirs kept; the tokens dropped
    for window in batches:
        if not window:
            continue
        docs = tokenizer(window, truncation=True, max_length=max_length)["input_ids"]
        # the length each text would have had uncut: MAX_LENGTH drops the rest without a word otherwise
        for doc, uncut in zip(docs, tokenizer(window, verbose=False)["input_ids"]):
            if len(uncut) > len(doc):
                cut[0] += 1
                cut[1] += len(doc)
                cut[2] += len(uncut) - len(doc)
        lengths = torch.tensor([len(doc) for doc in docs])
        offsets = [0, *torch.cumsum(lengths, 0).tolist()]
        rows = torch.empty(offsets[-1], writer.d_model + writer.d_target, device=next(model.parameters()).device)
        write_document_activations(rows, offsets, model, tokenizer, layer, docs,
                                   length_sorted_batches(lengths.tolist(), batch_size))
        writer.add(rows[:, :writer.d_model], torch.tensor([t for doc in docs for t in doc]),
                   torch.arange(len(docs)).repeat_interleave(lengths) + start,
                   torch.cat([torch.arange(n) for n in lengths.tolist()]), rows[:, writer.d_model:])
        hashes.extend(document_hash(text) for text in window)
        n_tokens += int(lengths.sum())
        start += len(window)
        bar.update(len(window))
        bar.set_postfix(tokens=n_tokens, tok_s=f"{n_tokens / (time.perf_counter() - started):.0f}")
    bar.close()
    shards = [shard for rank_shards in gather_objects(writer.close(), world) for shard in rank_shards]
    all_hashes = hashes_before + [h for rank_hashes in gather_objects(hashes, world) for h in rank_hashes]
    cut_texts, kept, dropped = (sum(counts) for counts in zip(*gather_objects(cut, world)))
    meta = {
        "skipped_empty": getattr(texts, "skipped_empty", 0),
        **(metadata or {}),
        "layer_signature": layer_signature,
        "tokenizer": {"name_or_path": tokenizer.name_or_path, "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer), **role_token_ids(tokenizer),
                      "padding_side": tokenizer.padding_side},
        "n_documents": len(all_hashes),
        "max_length": max_length,
        "cut_at_max_length": {"texts": cut_texts, "their_tokens_dropped": dropped,
                              "share_of_their_tokens_dropped": dropped / (kept + dropped) if dropped else 0.0},
        "padding_excluded": True,
        "seconds": round(time.perf_counter() - started, 2),
        "processes": world.size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if world.is_main:
        writer.finish(meta, all_hashes, shards)
    barrier(world)  # no rank returns before the run is published
    return writer.final_dir


def _output_width(model, module) -> int:
    """The width of `module`'s output, from a forward of one token (a module's own attributes do not say it
    the same way across architectures)."""
    from .models import forward_to_layer

    device = next(model.parameters()).device
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    return int(forward_to_layer(model, module, one, one).shape[-1])


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def role_token_ids(tokenizer) -> dict[str, int | None]:
    """{bos_token_id, eos_token_id, pad_token_id} of a tokenizer: what EXCLUDE_TOKENS's roles name."""
    return {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id", None) for role in TOKEN_ROLES}


def excluded_token_ids(exclude: list, ids_by_role: dict[str, Any]) -> frozenset[int]:
    """The token ids EXCLUDE_TOKENS names: its ids, and the ids of its roles (a role the tokenizer lacks names none)."""
    ids = {ids_by_role.get(f"{item}_token_id") if isinstance(item, str) else item for item in exclude}
    return frozenset(int(i) for i in ids if i is not None)


# --- reading --------------------------------------------------------------------------------

@dataclass
class ActivationRun:
    """A finished run, read lazily: activations are memory-mapped, never loaded whole.

    Each shard is checked (checksum, finite values) the first time this object opens it."""

    path: Path
    meta: dict[str, Any]
    _checked: set[int] = field(default_factory=set, repr=False)
    excluded: frozenset[int] = frozenset()  # token ids whose rows the readers below leave out (EXCLUDE_TOKENS)
    _keep: np.ndarray | None = field(default=None, repr=False)

    def exclude_tokens(self, exclude: list) -> None:
        """Leave the rows of EXCLUDE_TOKENS's tokens out of `kept_rows`, `iter_rows` and `count_kept`: out of
        training and of the held-out metrics. The roles are resolved with the ids stage 01 recorded."""
        self.excluded = excluded_token_ids(exclude, self.meta.get("tokenizer", {}))
        self._keep = None

    def keep(self) -> np.ndarray | None:
        """[n_tokens] True for the rows kept, or None when nothing is excluded; made a shard at a time."""
        if self.excluded and self._keep is None:
            ids = np.array(sorted(self.excluded))
            self._keep = np.concatenate([~np.isin(self.shard_tokens(i)[:, 0], ids)
                                         for i in range(len(self.meta["shards"]))])
        return self._keep if self.excluded else None

    def kept_rows(self, start: int, stop: int, dtype: np.dtype = np.float32, with_target: bool = False) -> np.ndarray:
        """`rows(start, stop)` without the excluded tokens' rows."""
        rows, keep = self.rows(start, stop, dtype, with_target), self.keep()
        return rows if keep is None else rows[keep[start:stop]]

    def count_kept(self, start: int, stop: int) -> int:
        keep = self.keep()
        return stop - start if keep is None else int(keep[start:stop].sum())

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @property
    def n_tokens(self) -> int:
        return self.meta["n_tokens"]

    @property
    def d_model(self) -> int:
        return self.meta["d_model"]

    @property
    def d_target(self) -> int:
        """The width of the transcoder's target stored beside each row; 0 for a run without one."""
        return self.meta.get("d_target", 0)

    @property
    def target_signature(self) -> str | None:
        return self.meta.get("target_signature")

    def _kinds(self) -> tuple[str, ...]:
        return ("acts", "tokens", "target") if self.d_target else ("acts", "tokens")

    def _shard_file(self, i: int, kind: str) -> Path:
        return self.path / f"{self.meta['shards'][i]['name']}.{kind}.npy"

    def check_shard(self, i: int) -> None:
        """Checksums of shard i's files, and finite values, once per process."""
        if i in self._checked:
            return
        shard = self.meta["shards"][i]
        for kind in self._kinds():
            verify_file(self._shard_file(i, kind), shard[f"{kind}_sha256"], RERUN_01)
        for kind, width in (("acts", self.d_model), ("target", self.d_target)):
            if kind not in self._kinds():
                continue
            acts = _load_npy(self._shard_file(i, kind), mmap=True)
            if acts.shape != (shard["n_tokens"], width):
                raise IntegrityError(f"{self._shard_file(i, kind)} holds {acts.shape}, not the "
                                     f"({shard['n_tokens']}, {width}) its metadata says. {RERUN_01}")
            for lo in range(0, len(acts), 65536):
                block = acts[lo:lo + 65536]
                if not np.isfinite(block).all():
                    row = lo + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
                    raise IntegrityError(f"{self._shard_file(i, kind)} has a non-finite value at row {row}. {RERUN_01}")
        self._checked.add(i)

    def check_all(self, progress: bool = False) -> None:
        """Check every shard now, so a stage fails before it writes anything rather than midway."""
        for i in tqdm(range(len(self.meta["shards"])), desc="checking activations", unit="shard",
                      disable=not progress):
            self.check_shard(i)

    def check_small_files(self) -> None:
        """What can be checked in a moment, when the run is opened rather than minutes later: the
        documents' hashes (checksum and length), and that every shard's two files are there, none shorter
        than the rows its metadata lists (the shards' checksums come when each is first read)."""
        if "documents_sha256" in self.meta:
            hashes = self.document_hashes()
            if hashes.shape != (self.meta["n_documents"],):
                raise IntegrityError(f"{self.path / DOCUMENTS_FILE} holds {hashes.shape[0]} hashes, not the "
                                     f"{self.meta['n_documents']} documents its metadata says. {RERUN_01}")
        itemsize = np.dtype(DTYPES[self.meta["dtype"]]).itemsize if self.meta.get("dtype") in DTYPES else 0
        for i, shard in enumerate(self.meta["shards"]):
            for kind, row_bytes in (("acts", self.d_model * itemsize), ("tokens", 3 * 4),
                                    ("target", self.d_target * itemsize))[:len(self._kinds())]:
                path = self._shard_file(i, kind)
                if not path.is_file():
                    raise IntegrityError(f"{path} is missing. {RERUN_01}")
                if path.stat().st_size < shard["n_tokens"] * row_bytes:
                    raise IntegrityError(f"{path} is truncated (shorter than its {shard['n_tokens']} rows). "
                                         f"{RERUN_01}")

    def shard_acts(self, i: int, with_target: bool = False) -> np.ndarray:
        """Shard i's rows, memory-mapped; `with_target`: the target's beside them [n, d_model + d_target]
        (a copy), what a transcoder trains on."""
        self.check_shard(i)
        acts = _load_npy(self._shard_file(i, "acts"), mmap=True)
        if not with_target:
            return acts
        if not self.d_target:
            raise StoreError(f"activation run {self.run_id} stores no transcoder target (stage 01 ran with "
                             f"TRAIN_TARGET='sae'). {RERUN_01} with the current TRAIN_TARGET")
        return _Paired(acts, _load_npy(self._shard_file(i, "target"), mmap=True))

    def shard_tokens(self, i: int) -> np.ndarray:
        self.check_shard(i)
        return _load_npy(self._shard_file(i, "tokens"))

    def document_hashes(self) -> np.ndarray:
        """[n_documents] uint64 hashes of the run's documents, in order (data.document_hash)."""
        if "documents_sha256" not in self.meta:
            raise StoreError(f"activation run {self.run_id} records no document hashes (made by an older "
                             f"version). {RERUN_01}")
        verify_file(self.path / DOCUMENTS_FILE, self.meta["documents_sha256"], RERUN_01)
        return _load_npy(self.path / DOCUMENTS_FILE)

    def count_embedded(self, hashes: Iterable[int]) -> int:
        """How many of these documents (data.document_hash) this run embedded: evaluation must score
        texts that training never saw."""
        seen = set(self.document_hashes().tolist())
        return sum(h in seen for h in hashes)

    def shard_offsets(self) -> np.ndarray:
        """Global row where each shard starts, plus the total at the end."""
        return np.concatenate([[0], np.cumsum([s["n_tokens"] for s in self.meta["shards"]])])

    def tokens(self) -> np.ndarray:
        """[n_tokens, 3] int32: token id, document index, position (small enough to load whole)."""
        return np.concatenate([self.shard_tokens(i) for i in range(len(self.meta["shards"]))])

    def rows(self, start: int, stop: int, dtype: np.dtype = np.float32, with_target: bool = False) -> np.ndarray:
        """Activations of global rows [start, stop), read across shards; `with_target`: with the
        transcoder's target beside each, [rows, d_model + d_target]."""
        offsets = self.shard_offsets()
        parts = []
        for i in range(len(offsets) - 1):
            lo, hi = max(start, offsets[i]), min(stop, offsets[i + 1])
            if lo < hi:
                parts.append(np.asarray(self.shard_acts(i, with_target)[lo - offsets[i]:hi - offsets[i]], dtype=dtype))
        width = self.d_model + self.d_target * with_target
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype)

    def take(self, indices: np.ndarray, with_target: bool = False) -> np.ndarray:
        """Activations of the given global rows (sorted), as float32."""
        offsets = self.shard_offsets()
        parts = []
        for i in range(len(offsets) - 1):
            local = indices[(indices >= offsets[i]) & (indices < offsets[i + 1])] - offsets[i]
            if len(local):
                parts.append(np.asarray(self.shard_acts(i, with_target)[local], dtype=np.float32))
        return np.concatenate(parts)

    def iter_rows(self, start: int, stop: int, chunk: int, with_target: bool = False) -> Iterator[np.ndarray]:
        """Rows [start, stop) a chunk at a time, the excluded tokens' rows left out."""
        for lo in range(start, stop, chunk):
            yield self.kept_rows(lo, min(stop, lo + chunk), with_target=with_target)

    def heldout_start(self, fraction: float) -> int:
        """First row of the held-out documents: the last `fraction` of documents, whole."""
        n_docs = self.meta["n_documents"]
        n_heldout = heldout_documents(n_docs, fraction)
        if not n_heldout:
            return self.n_tokens
        first_doc = n_docs - n_heldout
        offsets = self.shard_offsets()
        for i in range(len(self.meta["shards"])):  # one shard's token file at a time: memory stays flat
            docs = self.shard_tokens(i)[:, 1]
            if docs[-1] >= first_doc:
                return int(offsets[i] + np.searchsorted(docs, first_doc))
        return self.n_tokens


class _Paired:
    """A shard's rows and its target's, indexed together as one [n, d_model + d_target] array: each index
    reads the part it names from both memory maps and joins them."""

    def __init__(self, acts: np.ndarray, target: np.ndarray):
        self.acts, self.target = acts, target

    def __len__(self) -> int:
        return len(self.acts)

    def __getitem__(self, index) -> np.ndarray:
        return np.concatenate([self.acts[index], self.target[index]], axis=-1)


def heldout_documents(n_docs: int, fraction: float) -> int:
    """How many of a run's n_docs documents, the last ones, are held out: HELDOUT_FRACTION of them,
    at least one; an error when none would be left for training."""
    n_heldout = max(1, round(n_docs * fraction)) if fraction > 0 else 0
    if n_heldout >= n_docs:
        raise StoreError(f"HELDOUT_FRACTION={fraction} leaves no training documents out of {n_docs}")
    return n_heldout


def open_run(store_dir: Path, run_id: str | None = None) -> ActivationRun:
    """The run named by store/run_id.txt (or `run_id`), or an error naming the stage to run."""
    store_dir = Path(store_dir)
    if run_id is None:
        id_file = store_dir / RUN_ID_FILE
        if not id_file.exists():
            raise StoreError(f"no activations: {id_file} does not exist. Run stage 01 first: "
                             "python 01_save_activations.py")
        run_id = id_file.read_text().strip()
    path = store_dir / "runs" / run_id
    meta_file = path / "metadata.json"
    if not run_id or not meta_file.exists():
        raise StoreError(f"activation run {run_id!r} is gone or incomplete ({meta_file} missing). {RERUN_01}")
    run = ActivationRun(path, read_sealed_json(meta_file, RERUN_01))
    run.check_small_files()
    return run


def check_same_weights(run: ActivationRun, now: dict[str, Any]) -> None:
    """Stop training on the fly with weights other than those stage 01 read (the folder's files replaced by a
    new revision, say): its held-out rows would come from the old weights and the training rows from the
    new. `now` is models.weights_identity of the model loaded; a run that recorded none is not checked."""
    recorded = run.meta.get("model_weights")
    changes = weights_changes(recorded, now) if recorded is not None else []
    if changes:
        raise StoreError(f"the model's weights changed since stage 01 read them for run {run.run_id} "
                         f"({'; '.join(changes)}): its held-out rows come from the old weights. Run stage 01 again "
                         "(python 01_save_activations.py), or put back the model it read.")


def check_run_matches(run: ActivationRun, model_id: str, layer_signature: str, target: str | None = None) -> None:
    """Stop a stage from mixing activations of another model or layer with the current config; with a
    transcoder's `target` (Settings.target), the run must store that module's output too."""
    problems = []
    if target is not None and run.target_signature != target:
        problems.append(f"transcoder target {run.target_signature!r} (config: {target!r})" if run.target_signature
                        else f"no transcoder target (config: {target!r})")
    if run.meta.get("model_id") != model_id:
        problems.append(f"model {run.meta.get('model_id')!r} (config: {model_id!r})")
    if run.meta.get("layer_signature") != layer_signature:
        problems.append(f"layer {run.meta.get('layer_signature')!r} (config: {layer_signature!r})")
    if problems:
        raise StoreError(f"activation run {run.run_id} was saved with " + " and ".join(problems)
                         + ". Run stage 01 with the current settings (python 01_save_activations.py), "
                         "or pass the settings that run used.")
