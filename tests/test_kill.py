"""kill -9 at many points of stages 01, 02 and 04: afterwards, every set of artifacts a later stage
accepts belongs together, and a set that does not is refused with one line, never used.

Slow (a stage start per kill point): `make test-all` runs it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_store, run_python, subprocess_env

pytestmark = pytest.mark.slow


def _store_args(tmp_path: Path, smoke_args: list[str]) -> tuple[Path, list[str]]:
    store = tmp_path / "store"
    return store, copy_store(smoke_args, store)


def _command(stage: str) -> list[str]:
    return ["-m", "saekit.notebooks", stage] if stage.endswith(".ipynb") else [stage]


def _kill_after(stage: str, args: list[str], seconds: float) -> bool:
    """Start a stage, SIGKILL it and its children (a notebook's kernel) after `seconds`; True if it
    was still running then."""
    proc = subprocess.Popen([sys.executable, *_command(stage), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=subprocess_env(),
                            start_new_session=True)
    time.sleep(seconds)
    running = proc.poll() is None
    if running:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


def _accepted_sets_belong_together(args: list[str]) -> None:
    from saekit.activations.store import open_run
    from saekit.base.errors import PipelineError
    from saekit.base.settings import load_settings
    from saekit.concepts.exports import POINTER, open_concepts
    from saekit.evaluation.analysis import load_trained_sae

    settings = load_settings(args)
    run = open_run(settings.store)  # stage 01's publication is one rename and one pointer: always whole
    run.check_all()
    try:
        trained = load_trained_sae(settings)
    except PipelineError as err:  # refused with a message: acceptable, as long as it is not used
        assert "do not belong together" in str(err) or "Run stage 02" in str(err) or "Train it again" in str(err)
        return
    assert trained.history["sae_id"] == trained.meta["sae_id"]
    assert trained.run.run_id == trained.meta["activation_run_id"]
    trained.run.check_all()
    if (settings.store / POINTER).exists():
        try:
            concepts, _, _ = open_concepts(settings.store, trained.meta["sae_id"])
        except PipelineError as err:  # concepts of an earlier SAE, refused
            assert "Run stage 04" in str(err) or "rerun" in str(err).lower(), err
            return
        assert concepts["meta"]["sae_id"] == trained.meta["sae_id"]
        exported = settings.store / "neuronpedia" / "run_settings.json"  # absent, or the current set's
        assert not exported.exists() or json.loads(exported.read_text())["concepts_id"] == concepts["meta"]["concepts_id"]


@pytest.mark.parametrize("stage,kill_after_s", [
    ("01_save_activations.py", (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)),
    ("02_train_sae.py", (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)),
    ("04_name_sae_concepts.ipynb", (4.0, 7.0, 9.0, 11.0, 13.0, 16.0, 20.0)),
])
def test_kill_9_never_leaves_a_mismatched_set_that_is_accepted(tmp_path, smoke_args, stage, kill_after_s):
    store, args = _store_args(tmp_path, smoke_args)
    if stage.endswith(".ipynb"):  # a first, complete set of concepts, for the kills to threaten
        _finish(stage, args)
    killed = 0
    for seconds in kill_after_s:
        killed += _kill_after(stage, args + ["--EPOCHS=20"] * (stage == "02_train_sae.py"), seconds)
        _accepted_sets_belong_together(args)
    assert killed >= 3  # the stage was interrupted at several points, not only after it finished
    _finish(stage, args)  # and the next run cleans up and completes
    _accepted_sets_belong_together(args)
    assert not list(store.glob("*/*.partial"))


def _finish(stage: str, args: list[str]) -> None:
    proc = run_python([*_command(stage), *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
