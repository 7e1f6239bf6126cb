"""Loading texts: the embedded story corpus, local .txt/.jsonl/.parquet files, and Hugging Face
datasets (a hub id or a local copy of one, through `datasets.load_dataset`).

Every source goes through the same rules: empty and whitespace-only texts are skipped and
counted, a missing text field or an empty result is an error that says what to set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import PipelineError
from .settings import PROJECT_ROOT

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

    def __len__(self) -> int:
        return len(self.texts)

    def summary(self) -> str:
        return f"{len(self.texts)} texts from {self.source} ({self.skipped_empty} empty or whitespace-only skipped)"


def _collect(records: Iterable[Any], text_field: str | None, limit: int | None, source: str) -> Texts:
    texts: list[str] = []
    skipped = 0
    fields: list[str] = []
    for record in records:
        if text_field is None:
            text = record
        else:
            if not fields and isinstance(record, dict):
                fields = list(record)
            if not isinstance(record, dict) or text_field not in record:
                available = list(record) if isinstance(record, dict) else type(record).__name__
                raise DatasetError(
                    f"{source} has no text field {text_field!r}; its fields are {available}. "
                    "Set TEXT_FIELD to one of them."
                )
            text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        texts.append(text)
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise DatasetError(
            f"{source} gave no texts ({skipped} empty or whitespace-only skipped). "
            "Check HF_DATASET, DATA_SPLIT / EVAL_SPLIT and TEXT_FIELD."
        )
    return Texts(texts, source, skipped, fields)


def _jsonl_records(path: Path) -> Iterable[dict]:
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}:{n} is not valid JSON ({err})") from err


def load_texts(dataset: str, split: str = "train", text_field: str = "text", limit: int | None = None) -> Texts:
    """Up to `limit` non-empty texts (0 or None = all) from `dataset`.

    `dataset` is "embedded" (data/stories.jsonl, splits train and heldout), a .txt file (one text a
    line), a .jsonl or .parquet file (the `text_field` column; `split` ignored), or a hub id / local
    dataset folder for `datasets.load_dataset`, read as a stream so a large split is not downloaded
    whole.
    """
    if dataset == EMBEDDED_DATASET:
        if split not in EMBEDDED_SPLITS:
            raise DatasetError(f"the embedded corpus has splits {EMBEDDED_SPLITS}, not {split!r}")
        if not EMBEDDED_CORPUS.exists():
            raise DatasetError(f"{EMBEDDED_CORPUS} is missing; rebuild it with python tools/make_corpus.py")
        records = (r for r in _jsonl_records(EMBEDDED_CORPUS) if r.get("split") == split)
        return _collect(records, text_field, limit, f"the embedded corpus ({split} split)")

    path = Path(dataset)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl", ".parquet"):
        if not path.exists():
            raise DatasetError(f"dataset file {path} does not exist")
        if suffix == ".txt":
            return _collect(path.read_text().splitlines(), None, limit, str(path))
        if suffix == ".jsonl":
            return _collect(_jsonl_records(path), text_field, limit, str(path))
        import pyarrow.parquet as pq

        return _collect(pq.read_table(path).to_pylist(), text_field, limit, str(path))
    return _load_hf(dataset, split, text_field, limit)


def _load_hf(dataset: str, split: str, text_field: str, limit: int | None) -> Texts:
    import datasets

    datasets.disable_progress_bars()
    try:
        stream = datasets.load_dataset(dataset, split=split, streaming=True)
    except ValueError as err:  # an unknown split
        raise DatasetError(f"dataset {dataset!r} has no split {split!r}: {err}") from err
    except Exception as err:  # the hub is unreachable, or no such dataset / folder
        raise DatasetError(
            f"could not load dataset {dataset!r} ({type(err).__name__}: {err}).\n"
            "To fix it: give hub access, or save the dataset to a local folder or a .jsonl/.parquet "
            "file and set HF_DATASET to it, or use the embedded corpus with --preset=local."
        ) from err
    return _collect(stream, text_field, limit, f"{dataset} ({split} split)")
