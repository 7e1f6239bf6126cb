"""bench/gpu_check.py, the script a lent GPU runs first, kept alive while no GPU is lent: its small
mode runs every section on the CPU (slow: CI runs it, `make test` leaves it out)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_small_runs_every_section_on_a_cpu(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--small", "--device=cpu", f"--out={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check_small.json").read_text())
    failed = {name: result[name]["error"] for name in ("copy", "store", "on_the_fly")
              if isinstance(result[name], dict) and "error" in result[name]}
    assert not failed and isinstance(result["steps"], list), failed or result["steps"]
    # every case, batch, outlier setting and kernel path was stepped, and each figure is a time
    assert len(result["steps"]) == 5 * 1 * 2 * 3
    assert {row["kernels"] for row in result["steps"]} == {"old: sparse", "new: dense", "new: dense, float32 choice"}
    assert all(row["ms_per_step"] > 0 and row["memory_check_bytes"] > 0 for row in result["steps"])
    assert any("profile" in row for row in result["steps"])
    for section in ("store", "on_the_fly"):
        assert result[section]["training_vs_steps_only"] > 0
    assert all(result["on_the_fly"][f"source_alone_tokens_per_s_{label}"] > 0
               for label in ("forward_batch_16", "forward_batch_128", "forward_tokens_16384"))
    assert result["command"].startswith("python bench/gpu_check.py --small")
