"""Fault injection: bad settings, corrupt or hostile files, a full disk, a read-only store.

Each case runs a stage the way a user does and checks four things: the exit code is 1, stderr is
one `error:` line (no traceback) that says what to do, every artifact written before is unchanged
(checksums), and nothing half-written is left for a later stage to use.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import alter_one_character, assert_one_line_error, checksums, run_python

MARKER_CODE = "import pathlib; pathlib.Path({path!r}).write_text('code ran')"


def _run_dir(store: Path) -> Path:
    return store / "runs" / (store / "run_id.txt").read_text().strip()


def _flip(path: Path, offset: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --- settings: checked, ranges included, before anything is written --------------------------------

@pytest.mark.parametrize("script,setting,says", [
    ("02_train_sae.py", "--EPOCHS=0", "EPOCHS=0 must be at least 1"),
    ("02_train_sae.py", "--EPOCHS=-1", "EPOCHS=-1 must be at least 1"),
    ("02_train_sae.py", "--BATCH_SIZE_TRAIN=1", "BATCH_SIZE_TRAIN=1 must be at least 2"),
    ("02_train_sae.py", "--HELDOUT_FRACTION=0.0", "HELDOUT_FRACTION=0.0 must be in (0, 1)"),
    ("02_train_sae.py", "--TOP_K=100000", "TOP_K=100000 must be at most the number of latents"),
    ("02_train_sae.py", "--LR=nan", "LR=nan must be a finite number"),
    ("02_train_sae.py", "--DEVICE=tpu", "DEVICE='tpu' must be auto, cpu, cuda, cuda:N or mps"),
    ("02_train_sae.py", "--ARCHITECTURE='jumprelu'", "ARCHITECTURE='jumprelu' must be one of 'topk', 'batchtopk'"),
    ("01_save_activations.py", "--MAX_LENGTH=0", "MAX_LENGTH=0 must be at least 2"),
    ("01_save_activations.py", "--ACTIVATION_DTYPE='int8'", "ACTIVATION_DTYPE='int8' must be one of"),
])
def test_a_bad_setting_stops_before_anything_is_written(store_copy, script, setting, says):
    store, args = store_copy
    before = checksums(store)
    assert_one_line_error(run_python([script, *args, setting]), says)
    assert checksums(store) == before


def test_the_notebook_runner_gives_settings_errors_one_line(store_copy):
    store, args = store_copy
    assert_one_line_error(run_python(["-m", "saekit.notebooks", "03_analyze_training.ipynb", *args, "--TOP_K=-3"]),
                           "TOP_K=-3 must be at least 1")


def test_a_preset_file_is_read_as_data_never_run(tmp_path):
    marker = tmp_path / "ran"
    preset = tmp_path / "evil.py"
    preset.write_text(f"TOP_K = 4\n{MARKER_CODE.format(path=str(marker))}\n")
    line = assert_one_line_error(run_python(["02_train_sae.py", f"--preset={preset}"]), "evil.py:2")
    assert "read as data" in line and not marker.exists()


# --- files a user receives never run code ------------------------------------------------------------

class _WritesMarker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(path=self.path),))


def _crafted_pickle(path: Path, marker: Path) -> None:
    """A torch-style file whose unpickling would write `marker`: what a hostile SAE or checkpoint holds."""
    torch.save({"format": "saekit.topk_sae/2", "payload": _WritesMarker(str(marker))}, path)


def test_a_crafted_sae_file_runs_no_code(tmp_path):
    from saekit.base.integrity import IntegrityError
    from saekit.training.sae import TopKSAE

    marker = tmp_path / "ran"
    _crafted_pickle(tmp_path / "topk_sae.pt", marker)
    with pytest.raises(IntegrityError, match="asks for .*exec.*no code in it runs"):
        TopKSAE.load(tmp_path / "topk_sae.pt")
    assert not marker.exists()
    # the marker is real: an unrestricted load of the same file does run the code
    torch.load(tmp_path / "topk_sae.pt", weights_only=False)
    assert marker.exists()


def test_a_crafted_checkpoint_runs_no_code_on_resume(store_copy, tmp_path):
    store, args = store_copy
    marker = tmp_path / "ran"
    _crafted_pickle(store / "sae_model" / "checkpoint.pt", marker)
    before = checksums(store)
    assert_one_line_error(run_python(["02_train_sae.py", *args, "--resume"]), "checkpoint.pt", "no code in it runs")
    assert not marker.exists() and checksums(store) == before


# --- corruption is detected, not trained on --------------------------------------------------------------

def _reseal_metadata(run_dir: Path) -> None:
    """Update a run's checksums after changing a shard, as if stage 01 itself had written the values."""
    from saekit.base.integrity import read_sealed_json, sha256_file, write_sealed_json

    meta = read_sealed_json(run_dir / "metadata.json", "")
    for shard in meta["shards"]:
        for kind in ("acts", "tokens"):
            shard[f"{kind}_sha256"] = sha256_file(run_dir / f"{shard['name']}.{kind}.npy")
    write_sealed_json(run_dir / "metadata.json", meta)


@pytest.mark.parametrize("fault,says", [
    ("flip shard bytes", "shard_00000.acts.npy is corrupt"),
    ("truncate shard", "shard_00000.acts.npy is truncated"),
    ("nan in the held-out rows", "has a non-finite value"),
    ("edit metadata", "metadata.json is corrupt"),
    ("truncate metadata", "metadata.json is not valid JSON"),
    ("flip token bytes", "shard_00000.tokens.npy is corrupt"),
])
def test_corrupt_activations_stop_stage_02_and_keep_the_sae(store_copy, fault, says):
    store, args = store_copy
    run_dir = _run_dir(store)
    acts = run_dir / "shard_00000.acts.npy"
    if fault == "flip shard bytes":
        _flip(acts, 200, 64)
    elif fault == "truncate shard":
        acts.write_bytes(acts.read_bytes()[:1000])
    elif fault == "nan in the held-out rows":
        shards = sorted(run_dir.glob("*.acts.npy"))
        values = np.load(shards[-1])
        values[-1] = np.nan
        np.save(shards[-1], values)
        _reseal_metadata(run_dir)
        says = f"{shards[-1].name} has a non-finite value at row {len(values) - 1}"
    elif fault == "edit metadata":
        meta = run_dir / "metadata.json"
        meta.write_text(meta.read_text().replace('"n_tokens": ', '"n_tokens": 1', 1))
    elif fault == "truncate metadata":
        meta = run_dir / "metadata.json"
        meta.write_text(meta.read_text()[:100])
    elif fault == "flip token bytes":
        _flip(run_dir / "shard_00000.tokens.npy", 200, 8)
    before = checksums(store)
    assert_one_line_error(run_python(["02_train_sae.py", *args]), says, "Run stage 01 again")
    assert checksums(store) == before


def test_a_corrupt_sae_stops_the_analysis_notebook_with_one_line(store_copy):
    store, args = store_copy
    _flip(store / "sae_model" / "topk_sae.pt", 2000, 256)
    before = checksums(store)
    # which message depends on where the flipped bytes land (tensor data: checksum; pickle: refused)
    assert_one_line_error(run_python(["-m", "saekit.notebooks", "03_analyze_training.ipynb", *args]),
                           "topk_sae.pt", "corrupt", "Train it again")
    assert checksums(store) == before


def test_a_corrupt_checkpoint_is_refused_on_resume(store_copy):
    store, args = store_copy
    _flip(store / "sae_model" / "checkpoint.pt", 3000, 256)
    before = checksums(store)
    assert_one_line_error(run_python(["02_train_sae.py", *args, "--resume"]), "checkpoint.pt", "Drop --resume")
    assert checksums(store) == before


def test_a_history_from_another_training_is_refused(store_copy):
    from saekit.base.errors import PipelineError
    from saekit.base.integrity import read_sealed_json, write_sealed_json
    from saekit.base.settings import load_settings
    from saekit.evaluation.analysis import load_trained_sae

    store, args = store_copy
    history = read_sealed_json(store / "training_history.json", "")
    write_sealed_json(store / "training_history.json", {**history, "sae_id": "0" * 16})
    with pytest.raises(PipelineError, match="do not belong together"):
        load_trained_sae(load_settings(args))



def test_an_altered_history_is_refused(store_copy):
    from saekit.base.errors import PipelineError
    from saekit.base.settings import load_settings
    from saekit.evaluation.analysis import load_trained_sae

    store, args = store_copy
    alter_one_character(store / "training_history.json")  # still valid JSON: only its checksum tells
    with pytest.raises(PipelineError, match="training_history.json is corrupt"):
        load_trained_sae(load_settings(args))

# --- inputs and the disk --------------------------------------------------------------------------------

def test_invalid_utf8_names_the_file_and_line(store_copy, tmp_path):
    store, args = store_copy
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    before = checksums(store)
    assert_one_line_error(run_python(["01_save_activations.py", *args, f"--HF_DATASET={bad}"]),
                           f"{bad}:2 is not valid UTF-8")
    assert checksums(store) == before


def test_a_folder_that_is_not_a_dataset(store_copy, tmp_path):
    store, args = store_copy
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("not data")
    before = checksums(store)
    assert_one_line_error(run_python(["01_save_activations.py", *args, f"--HF_DATASET={tmp_path / 'notes'}"]),
                           "could not load dataset")
    assert checksums(store) == before


def test_an_unwritable_store_is_named(store_copy, tmp_path):
    _, args = store_copy
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_one_line_error(run_python(["01_save_activations.py", *args, f"--STORE_DIR={blocker / 'store'}"]),
                           str(blocker))


def test_a_full_disk_leaves_the_previous_run_current(store_copy):
    import resource

    store, args = store_copy
    before = checksums(store)

    def limit_file_size():  # ulimit -f: any write past 4 kB fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    assert_one_line_error(run_python(["01_save_activations.py", *args, "--SHARD_TOKENS=100000"],
                                preexec_fn=limit_file_size), "cannot write", "free disk space")
    after = {k: v for k, v in checksums(store).items() if ".partial/" not in k}  # the next run cleans it
    assert after == before  # the old run, run_id.txt and the SAE as they were


def test_a_stale_partial_run_is_cleaned_with_a_line(store_copy):
    store, args = store_copy
    stale = store / "runs" / "activations_old.partial"
    stale.mkdir()
    (stale / "owner.pid").write_text("999999999")
    proc = run_python(["01_save_activations.py", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"removed {stale}" in proc.stdout and not stale.exists()


# --- evaluation never sees training text ---------------------------------------------------------------

def test_train_and_eval_texts_of_one_file_never_overlap(tmp_path):
    from saekit.activations.data import load_role_texts
    from saekit.base.settings import load_settings

    file = tmp_path / "stories.jsonl"
    file.write_text("\n".join(json.dumps({"text": f"story number {i}"}) for i in range(400)))
    settings = load_settings([f"--HF_DATASET={file}", "--DATA_LIMIT=0", "--EVAL_DATA_LIMIT=0", "--EVAL_SHARE=0.2"])
    train, evaluation = load_role_texts(settings, "train"), load_role_texts(settings, "eval")
    assert not set(train.texts) & set(evaluation.texts)
    assert len(train) + len(evaluation) == 400 and 50 < len(evaluation) < 110
    assert "evaluation share" in evaluation.source
    # the split depends on each document alone: reading fewer documents keeps them on the same side
    fewer = load_role_texts(load_settings([f"--HF_DATASET={file}", "--EVAL_DATA_LIMIT=10", "--EVAL_SHARE=0.2"]), "eval")
    assert fewer.texts == evaluation.texts[:10]


def test_one_split_for_both_roles_is_refused(tmp_path):
    from saekit.activations.data import DatasetError, load_role_texts
    from saekit.base.settings import load_settings

    settings = load_settings(["--HF_DATASET=some/hub-dataset", "--DATA_SPLIT=train", "--EVAL_SPLIT=train"])
    with pytest.raises(DatasetError, match="both 'train'.*Set EVAL_SPLIT to another split"):
        load_role_texts(settings, "eval")
