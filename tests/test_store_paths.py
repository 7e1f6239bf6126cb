"""The store's paths and housekeeping: `make clean-store`, STORE_DIR checked first, one rule for relative
paths, and a run's small files checked when the run is opened."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


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

    proc = _run(["make", "--no-print-directory", "clean-store", "STAMP=", f"PY={sys.executable}",
                 f"ARGS=--STORE_DIR={store}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(path.exists() for path in kept), [p for p in kept if not p.exists()]
    assert not any(folder.exists() for folder in stale), [f for f in stale if f.exists()]
    assert live.exists()
    assert f"{store}: 4 unfinished folder(s) removed" in proc.stdout
    # the project's own store/ is not STORE_DIR here: untouched
    assert (sorted(p.name for p in (ROOT / "store").iterdir()) if (ROOT / "store").is_dir() else []) == project_store
