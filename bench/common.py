"""Shared by the benchmarks: settings, timing, peak memory and where results are written."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from saekit.base.atomic import write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results"  # the committed figures the docs quote; a run writes here only when asked


def _results_folder(argv: list[str]) -> Path:
    """Where this run's JSON goes: `--out=FOLDER` (taken off the command line before the bench reads
    it; `--out=bench/results` replaces a committed result), else bench/results/local/, which git
    ignores, so that a user's run never overwrites the figures the docs quote."""
    for arg in list(argv[1:]):
        if arg.startswith("--out="):
            argv.remove(arg)
            return Path(arg.removeprefix("--out=")).resolve()
    return RESULTS / "local"


OUT = _results_folder(sys.argv)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_fp32_gflops(m: int = 4096, k: int = 576, n: int = 2304, repeats: int = 20) -> float:
    """This machine's fp32 matmul throughput on an SAE-shaped product, measured now."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def save_result(name: str, command: str, result: dict[str, Any]) -> Path:
    path = OUT / f"{name}.json"
    write_json(path, {"command": command.strip(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      "torch": torch.__version__, **result})
    return path


def run_in_venv(python: Path, script: Path, *args: str) -> dict[str, Any]:
    """Run a peer's script in its own venv (bench/.venv-*) and return the JSON of its last stdout line;
    stop the bench with the script's output where the venv is missing or the script fails."""
    if not python.exists():
        sys.exit(f"{python} is missing: `make bench-peers` (or `make saelens-venv`) creates the peer venvs")
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}  # sparsify's Triton decoder needs a GPU
    proc = subprocess.run([str(python), str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{script.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, list):  # an interval
        return "[" + ", ".join(map(_fmt, value)) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
