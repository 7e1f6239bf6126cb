"""The store's paths and housekeeping: `make clean-store`, STORE_DIR checked first, one rule for relative
paths, and a run's small files checked when the run is opened."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, subprocess_env


def run_command(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Any command (make, or python with its path), in the tests' subprocess environment."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=subprocess_env())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_make_clean_store_removes_only_unfinished_folders_of_store_dir(tmp_path):
    store = tmp_path / "elsewhere"
    kept = [store / "run_id.txt", store / "runs" / "activations_1" / "metadata.json",
            store / "sae_model" / "topk_sae.pt", store / "concepts" / "20260101-000000-abcdef" / "concepts.json",
            store / "models" / "SmolLM2-135M-Instruct" / "config.json"]
    stale = [store / "runs" / "activations_2.partial", store / "concepts" / "20260102-000000-abcdef.partial",
             store / ".neuronpedia.20260102-000000-abcdef.partial", store / "sae_model" / "saelens.partial"]
    live = store / "runs" / "activations_3.partial"  # a stage writing it now
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "owner.pid").write_text(str(_dead_pid()))
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    project_store = sorted(p.name for p in (ROOT / "store").iterdir()) if (ROOT / "store").is_dir() else []

    proc = run_command(["make", "--no-print-directory", "clean-store", "STAMP=", f"PY={sys.executable}",
                 f"ARGS=--STORE_DIR={store}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(path.exists() for path in kept), [p for p in kept if not p.exists()]
    assert not any(folder.exists() for folder in stale), [f for f in stale if f.exists()]
    assert live.exists()
    assert f"{store}: 4 unfinished folder(s) removed" in proc.stdout
    # the project's own store/ is not STORE_DIR here: untouched
    assert (sorted(p.name for p in (ROOT / "store").iterdir()) if (ROOT / "store").is_dir() else []) == project_store


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and sum(l.startswith("error: ") for l in lines) == 1, proc.stderr
    return lines[-1]


def test_a_store_dir_that_is_a_file_is_named_before_any_work(tmp_path, smoke_args):
    from conftest import with_store

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for store in (a_file, a_file / "store"):
        proc = run_command([sys.executable, str(ROOT / "01_save_activations.py"), *with_store(smoke_args, store)])
        assert f"must be a folder, but {a_file} is a file" in _one_error_line(proc)
        assert "saving activations" not in proc.stderr  # refused before the model or the texts were read
    assert a_file.read_text() == "x"


def test_relative_paths_are_read_from_the_project_folder_whatever_the_working_folder(tmp_path, smoke_args):
    from conftest import with_store

    from saekit.activations.store import open_run

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = tmp_path / "store"
    args = [a for a in with_store(smoke_args, store) if not a.startswith("--HF_DATASET=")]
    # data/stories.jsonl is the project's file: found from another working folder
    proc = run_command([sys.executable, str(ROOT / "01_save_activations.py"), *args, "--HF_DATASET=data/stories.jsonl",
                 "--DATA_LIMIT=8"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open_run(store).meta["dataset"] == str(ROOT / "data" / "stories.jsonl")
    # a relative path that exists only in the working folder is refused, not read from there
    (elsewhere / "mine.jsonl").write_text('{"text": "a cat"}\n')
    proc = run_command([sys.executable, str(ROOT / "01_save_activations.py"), *args, "--HF_DATASET=mine.jsonl"],
                cwd=elsewhere)
    line = _one_error_line(proc)
    assert "relative paths are read from the project folder" in line and str(elsewhere / "mine.jsonl") in line


def test_relative_path_rule_covers_every_path_setting(tmp_path, monkeypatch):
    from saekit.base.settings import PATH_SETTINGS, PROJECT_ROOT, load_settings

    monkeypatch.chdir(tmp_path)
    # a store that exists in the project (a developer's checkout) and one not made yet (a fresh clone)
    for store in ("tests", "store-not-made-yet"):
        settings = load_settings([f"--STORE_DIR={store}", "--HF_DATASET=data/stories.jsonl", "--EVAL_DATASET=data",
                                  "--MODEL_ID=tests", "--NAMING_MODEL_ID=tests"])
        for key in PATH_SETTINGS:
            value = getattr(settings, key)
            assert value == "" or value.startswith(str(PROJECT_ROOT)), (key, value)
    assert not (PROJECT_ROOT / "store-not-made-yet").exists() and not (tmp_path / "store-not-made-yet").exists()
    # words and hub ids are not paths
    settings = load_settings(["--MODEL_ID=org/model", "--NAMING_MODEL_ID=http://localhost:8000/v1"])
    assert (settings.MODEL_ID, settings.NAMING_MODEL_ID, settings.HF_DATASET) == (
        "org/model", "http://localhost:8000/v1", "embedded")


def test_a_corrupt_documents_file_is_caught_when_the_run_is_opened(tmp_path, smoke_args):
    import pytest
    from conftest import copy_store

    from saekit.activations.store import open_run
    from saekit.base.integrity import IntegrityError

    store = tmp_path / "store"
    copy_store(smoke_args, store)
    run_dir = store / "runs" / (store / "run_id.txt").read_text().strip()
    documents = run_dir / "documents.npy"
    data = bytearray(documents.read_bytes())
    data[-1] ^= 0xFF
    documents.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="documents.npy is corrupt"):
        open_run(store)
    documents.unlink()
    with pytest.raises(IntegrityError, match="documents.npy is missing"):
        open_run(store)


def test_one_long_text_does_not_swell_the_exports(tmp_path, smoke_args):
    import json

    from conftest import STORIES, copy_store

    store = tmp_path / "store"
    args = copy_store(smoke_args, store, "concepts*")
    long_text = " ".join(STORIES[::-1]) * 16000  # ~1.2 MB on one line; the model reads MAX_LENGTH=24 tokens of it
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("\n".join(json.dumps({"text": t}) for t in
                                    [long_text, *(f"{b} {a} {b}" for a, b in zip(STORIES, STORIES[1:]))]))
    proc = run_command([sys.executable, "-m", "saekit.concepts.runner", *args, f"--EVAL_DATASET={evaluation}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = store / "concepts" / (store / "concepts_id.txt").read_text().strip()
    for path in [*folder.iterdir(), store / "top_texts.json", *(store / "neuronpedia").rglob("*.json")]:
        assert path.stat().st_size < 300_000, (path, path.stat().st_size)  # before: 1.2 MB an example
    kept = json.loads((folder / "texts.json").read_text())["texts"][0]
    assert long_text.startswith(kept) and 50 < len(kept) < 1000  # the part the model read, no more
