"""The committed corpus matches its card, and the generator writes valid records."""
import json
import re

import pytest

from conftest import ROOT, run_python

CORPUS = ROOT / "data" / "stories.jsonl"
CARD = ROOT / "data" / "stories.md"


@pytest.fixture(scope="module")
def records():
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


def _card_count(label: str) -> int:
    match = re.search(rf"^\| {re.escape(label)} \| (\d+) \|$", CARD.read_text(), re.M)
    assert match, f"the data card has no row {label!r}"
    return int(match.group(1))


def test_corpus_matches_its_card(records):
    train = [r for r in records if r["split"] == "train"]
    heldout = [r for r in records if r["split"] == "heldout"]
    assert len(train) == _card_count("train split") >= 1000
    assert len(heldout) == _card_count("held-out split") >= 200
    assert len(records) == _card_count("kept")
    assert {r["split"] for r in records} == {"train", "heldout"}


def test_corpus_texts_are_unique_non_empty_and_splits_disjoint(records):
    texts = [r["text"] for r in records]
    assert all(t.strip() for t in texts)
    assert len(set(texts)) == len(texts)
    train = {r["text"] for r in records if r["split"] == "train"}
    assert not train & {r["text"] for r in records if r["split"] == "heldout"}


def test_records_hold_the_prompt_words_and_features(records):
    for r in records:
        assert set(r) == {"id", "split", "text", "verb", "noun", "adjective", "features"}
        assert all(isinstance(r[k], str) and r[k] for k in ("verb", "noun", "adjective"))
        assert isinstance(r["features"], list)


def test_generator_writes_valid_records_with_a_tiny_model(tmp_path, tiny_model, chat_tokenizer):
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    out = tmp_path / "stories.jsonl"
    proc = run_python([str(ROOT / "tools" / "make_corpus.py"), "--model", str(folder), "--out", str(out),
                       "--train", "3", "--heldout", "1", "--batch-size", "4", "--max-new-tokens", "24",
                       "--min-words", "3", "--max-batches", "20"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    made = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["split"] for r in made].count("heldout") == 1 and len(made) == 4
    assert all(r["text"].strip() and r["verb"] and r["noun"] for r in made)
    assert "| kept | 4 |" in out.with_suffix(".md").read_text()
    assert not out.with_name(out.name + ".batches.jsonl").exists()
