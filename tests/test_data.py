import json

import pytest

from conftest import TINY_LAYER, run_python
from saekit.activations.data import DatasetError, load_texts


def test_jsonl_skips_and_counts_empty_texts(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["a story", "  ", "", "another"]))
    texts = load_texts(str(f))
    assert texts.texts == ["a story", "another"] and texts.skipped_empty == 2


def test_limit_counts_non_empty_texts(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("one\n\ntwo\nthree\n")
    assert load_texts(str(f), limit=2).texts == ["one", "two"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"story": ["x y", "z"]}), f)
    assert load_texts(str(f), text_field="story").texts == ["x y", "z"]


def test_missing_text_field_names_the_fields(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"story": "x"}))
    with pytest.raises(DatasetError, match=r"no text field 'text'; its fields are \['story'\]. Set TEXT_FIELD"):
        load_texts(str(f))


def test_empty_dataset(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("\n   \n")
    with pytest.raises(DatasetError, match="gave no texts"):
        load_texts(str(f))


def test_hub_loading_path_on_a_local_copy(tmp_path):
    """datasets.load_dataset reads a local folder exactly as it reads a hub id."""
    folder = tmp_path / "TinyStories"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"story {i}"}) for i in range(5)))
    (folder / "validation.jsonl").write_text(json.dumps({"text": "held out"}))
    assert load_texts(str(folder), "train", limit=3).texts == ["story 0", "story 1", "story 2"]
    assert load_texts(str(folder), "validation").texts == ["held out"]
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_texts(str(folder), "test")


def test_unreachable_hub_dataset_says_what_to_do():
    with pytest.raises(DatasetError, match="(?s)could not load dataset.*local folder"):
        load_texts("nobody/no-such-dataset-xyz", "train")


def test_embedded_corpus_splits():
    with pytest.raises(DatasetError, match="splits"):
        load_texts("embedded", "validation")


@pytest.mark.parametrize("eval_split", ["tset", "heldout"])
def test_stage_01_refuses_an_evaluation_split_the_folder_lacks_before_writing(tmp_path, tiny_model_dir, eval_split):
    """A folder with train and validation files and EVAL_SPLIT misspelt (or left at its default) passed
    stages 01 and 02 and stopped stage 04; stage 01 now stops, in one line, with nothing written."""
    folder = tmp_path / "my_folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"story {i}"}) for i in range(5)))
    (folder / "validation.jsonl").write_text(json.dumps({"text": "held out"}))
    store = tmp_path / "store"
    proc = run_python(["01_save_activations.py", f"--MODEL_ID={tiny_model_dir}", f"--LAYER_SIGNATURE={TINY_LAYER}",
                       f"--HF_DATASET={folder}", f"--EVAL_SPLIT={eval_split}", f"--STORE_DIR={store}", "--DEVICE=cpu"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: ") and repr(eval_split) in lines[-1], lines[-1]
    assert not (store / "runs").exists() and not (store / "run_id.txt").exists()
