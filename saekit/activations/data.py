"""Loading texts: the embedded story corpus, local .txt/.jsonl/.parquet files, and Hugging Face
datasets (a hub id or a local copy of one, through `datasets.load_dataset`).

Every source goes through the same rules: empty and whitespace-only texts are skipped and
counted, a missing text field or an empty result is an error that says what to set.

Training (stages 01-02) and evaluation (stages 03-05) texts never overlap: `load_role_texts` reads
each from its own split, or, where both come from one source without splits (a local file), splits
it by a hash of each document, the same way every time.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..base.errors import PipelineError
from ..base.settings import PROJECT_ROOT

EMBEDDED_DATASET = "embedded"
EMBEDDED_CORPUS = PROJECT_ROOT / "data" / "stories.jsonl"
EMBEDDED_SPLITS = ("train", "heldout")


class DatasetError(PipelineError, ValueError):
    """A dataset that cannot give texts, with what to do about it."""


@dataclass
class Texts:
    texts: list[str]
    source: str
    skipped_empty: int = 0
    fields: list[str] = field(default_factory=list)
    limit: int | None = None  # how many were asked for (0 or None: all)
    read_from: dict[str, Any] = field(default_factory=dict)  # the file or dataset, split or share (TextStream)

    def hashes(self) -> list[int]:
        return [document_hash(t) for t in self.texts]

    def __len__(self) -> int:
        return len(self.texts)

    def summary(self) -> str:
        return texts_line(len(self.texts), self.limit, self.source, self.skipped_empty)


def texts_line(n: int, limit: int | None, source: str, skipped_empty: int) -> str:
    """How many texts a stage used, from where; with a warning when the source gave fewer than asked
    (a 10% hash share of a file holds fewer than EVAL_DATA_LIMIT sooner than one expects, and the
    labels' F1 halves on half the texts)."""
    line = f"{n} texts from {source} ({skipped_empty} empty or whitespace-only skipped)"
    if limit and n < limit:
        line += (f"\nwarning: fewer texts than asked: {n} of {limit}; {source} has no more. Figures on fewer texts "
                 "are noisier: give more texts, or a larger share or limit.")
    return line


def document_hash(text: str) -> int:
    """A document's identity across stages: the first 8 bytes of its SHA-256, as an unsigned int."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")


class TextStream:
    """The texts of a source, read lazily and in order each time it is iterated, so a stage can go
    through millions of documents without holding them. `skipped_empty` and `fields` are filled in
    as it is read; a pass that finds no text at all stops with an error saying what to check."""

    def __init__(self, records: Callable[[], Iterable[Any]], text_field: str | None, limit: int | None,
                 source: str, keep: Callable[[str], bool] | None = None, read_from: dict[str, Any] | None = None):
        self._records, self.text_field, self.limit, self.source, self._keep = records, text_field, limit, source, keep
        self.skipped_empty = 0
        self.fields: list[str] = []
        # what was read, for the artifacts' metadata: a file has no split to name
        self.read_from: dict[str, Any] = dict(read_from or {"dataset": source})

    def __iter__(self) -> Iterator[str]:
        for text, _ in self.with_records():
            yield text

    def with_records(self) -> Iterator[tuple[str, Any]]:
        """Each text with the record it came from: a dict of all its fields for a .jsonl, .parquet or
        `datasets` source (their other fields carry labels, saekit.evaluation.probing), the line itself for a .txt
        file. Same texts, order, limit and checks as iterating the stream."""
        self.skipped_empty, given = 0, 0
        for record in self._records():
            text = self._text(record)
            if not isinstance(text, str) or not text.strip():
                self.skipped_empty += 1
                continue
            if self._keep is not None and not self._keep(text):
                continue
            yield text, record
            given += 1
            if self.limit and given >= self.limit:
                return
        if not given:
            raise DatasetError(
                f"{self.source} gave no texts ({self.skipped_empty} empty or whitespace-only skipped). "
                "Check HF_DATASET, DATA_SPLIT / EVAL_SPLIT and TEXT_FIELD"
                + (" (and EVAL_SHARE: a split-less file gives evaluation that share of its documents)."
                   if self._keep else "."))

    def _text(self, record: Any) -> Any:
        if self.text_field is None:
            return record
        if not self.fields and isinstance(record, dict):
            self.fields = list(record)
        if not isinstance(record, dict) or self.text_field not in record:
            available = list(record) if isinstance(record, dict) else type(record).__name__
            raise DatasetError(f"{self.source} has no text field {self.text_field!r}; its fields are {available}. "
                               "Set TEXT_FIELD to one of them.")
        return record[self.text_field]

    def read(self) -> Texts:
        """All of it, as a list (evaluation's few hundred texts; stage 01 streams instead)."""
        texts = list(self)
        return Texts(texts, self.source, self.skipped_empty, self.fields, self.limit, dict(self.read_from))


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, or one error naming the line that is not UTF-8."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DatasetError(f"{path}:{n} is not valid UTF-8 (byte {err.start + 1} of the line); "
                                   "save the file as UTF-8") from None


def _jsonl_records(path: Path) -> Iterable[dict]:
    for n, line in _lines(path):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{n} is not valid JSON ({err})") from None


def _parquet_records(path: Path) -> Iterator[dict]:
    """Rows of a parquet file, a batch at a time, so a large file is never held whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path} is not a readable parquet file ({err})") from None


def is_splitless(dataset: str) -> bool:
    """A local file has no splits; the embedded corpus and `datasets` sources do."""
    return Path(dataset).suffix.lower() in (".txt", ".jsonl", ".parquet")


def in_eval_share(text: str, share: float) -> bool:
    """Whether a document of a split-less source belongs to evaluation: decided by its hash alone,
    so it does not depend on the file's order or on how many documents a stage reads."""
    return document_hash(text) < share * 2 ** 64


def load_role_texts(settings, role: str) -> Texts:
    """The texts for training (role "train": DATA_SPLIT, DATA_LIMIT) or evaluation (role "eval":
    EVAL_DATASET or HF_DATASET, EVAL_SPLIT, EVAL_DATA_LIMIT), never overlapping, as a list."""
    return open_role_texts(settings, role).read()


def open_role_texts(settings, role: str) -> TextStream:
    """`load_role_texts` as a stream, read as it is used.

    One split-less source for both: EVAL_SHARE of its documents (by hash) are evaluation's, the
    rest training's. One source with splits: DATA_SPLIT and EVAL_SPLIT must differ.
    """
    train_source = settings.HF_DATASET
    eval_source = settings.EVAL_DATASET or settings.HF_DATASET
    dataset = train_source if role == "train" else eval_source
    split = settings.DATA_SPLIT if role == "train" else settings.EVAL_SPLIT
    limit = settings.DATA_LIMIT if role == "train" else settings.EVAL_DATA_LIMIT
    if _same_source(train_source, eval_source):
        if is_splitless(dataset):
            share = settings.EVAL_SHARE
            keep = (lambda t: in_eval_share(t, share)) if role == "eval" else (lambda t: not in_eval_share(t, share))
            texts = open_texts(dataset, split, settings.TEXT_FIELD, limit, keep=keep)
            part = f"the {share:.0%} evaluation share" if role == "eval" else f"all but the {share:.0%} evaluation share"
            texts.source = f"{dataset} ({part}, chosen by document hash)"
            texts.read_from.update(eval_share=share, side="evaluation" if role == "eval" else "training",
                                   chosen_by="document hash")
            return texts
        if settings.DATA_SPLIT == settings.EVAL_SPLIT:
            raise DatasetError(
                f"DATA_SPLIT and EVAL_SPLIT are both {split!r} of {dataset}: evaluation would score texts the SAE "
                "was trained on. Set EVAL_SPLIT to another split (e.g. validation), or EVAL_DATASET to other texts.")
    return open_texts(dataset, split, settings.TEXT_FIELD, limit)


def check_roles_readable(settings) -> None:
    """Read the first text of training's and of evaluation's source: a split, file or field that
    stage 03 or 04 would not find stops stage 01 before it writes anything, not after training."""
    for role in ("train", "eval"):
        next(iter(open_role_texts(settings, role)))


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def load_texts(dataset: str, split: str = "train", text_field: str = "text", limit: int | None = None) -> Texts:
    """Up to `limit` non-empty texts (0 or None = all) from `dataset`, as a list (see open_texts)."""
    return open_texts(dataset, split, text_field, limit).read()


def open_texts(dataset: str, split: str = "train", text_field: str = "text", limit: int | None = None,
               keep: Callable[[str], bool] | None = None) -> TextStream:
    """Up to `limit` non-empty texts (0 or None = all) from `dataset`, read lazily.

    `dataset` is "embedded" (data/stories.jsonl, splits train and heldout), a .txt file (one text a
    line), a .jsonl or .parquet file (the `text_field` column; `split` ignored), or a hub id / local
    dataset folder for `datasets.load_dataset`, read as a stream so a large split is never
    downloaded or held whole.
    """
    if dataset == EMBEDDED_DATASET:
        if split not in EMBEDDED_SPLITS:
            raise DatasetError(f"the embedded corpus has splits {EMBEDDED_SPLITS}, not {split!r}")
        if not EMBEDDED_CORPUS.exists():
            raise DatasetError(f"{EMBEDDED_CORPUS} is missing; rebuild it with python tools/make_corpus.py")
        return TextStream(lambda: (r for r in _jsonl_records(EMBEDDED_CORPUS) if r.get("split") == split),
                          text_field, limit, f"the embedded corpus ({split} split)", keep,
                          {"dataset": EMBEDDED_DATASET, "file": str(EMBEDDED_CORPUS), "split": split})

    path = Path(dataset)
    suffix = path.suffix.lower()
    if is_splitless(dataset):
        if not path.is_file():
            raise DatasetError(f"dataset file {path} does not exist")
        read_from = {"file": str(path)}
        if suffix == ".txt":
            return TextStream(lambda: (line for _, line in _lines(path)), None, limit, str(path), keep, read_from)
        if suffix == ".jsonl":
            return TextStream(lambda: _jsonl_records(path), text_field, limit, str(path), keep, read_from)
        return TextStream(lambda: _parquet_records(path), text_field, limit, str(path), keep, read_from)
    return TextStream(lambda: _hf_records(dataset, split), text_field, limit, f"{dataset} ({split} split)", keep,
                      {"dataset": dataset, "split": split})


def _hf_records(dataset: str, split: str) -> Iterator[dict]:
    """The records of a `datasets` source; a file it cannot parse is an error that names it. `datasets`
    reads as it streams, so a malformed file shows only here, as a pyarrow or builder error."""
    stream = _hf_stream(dataset, split)
    try:
        yield from stream
    except DatasetError:
        raise
    except Exception as err:
        _name_the_bad_file(Path(dataset))
        raise DatasetError(f"could not read dataset {dataset!r} ({type(err).__name__}: {str(err)[:300]})") from None


def _name_the_bad_file(folder: Path) -> None:
    """Raise the DatasetError naming the file and line of a local dataset folder that does not parse,
    read the way a single file is read; return if there is no such folder or every file reads."""
    if not folder.is_dir():
        return
    readers = {".jsonl": _jsonl_records, ".parquet": _parquet_records}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in readers:
            for _ in readers[path.suffix.lower()](path):
                pass


def _hf_stream(dataset: str, split: str) -> Iterable[dict]:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(dataset, split=split, streaming=True)
    except ValueError as err:  # an unknown split
        raise DatasetError(f"dataset {dataset!r} has no split {split!r}: {err}") from None
    except Exception as err:  # the hub is unreachable, or no such dataset / folder, or a file in it is malformed
        _name_the_bad_file(Path(dataset))
        raise DatasetError(
            f"could not load dataset {dataset!r} ({type(err).__name__}: {err}). "
            "To fix it: give hub access, or save the dataset to a local folder or a .jsonl/.parquet "
            "file and set HF_DATASET to it, or use the embedded corpus with --preset=local."
        ) from None
