"""Stage 05's dashboard: its size and its time to interactive in headless Chromium, at the demo's size
and at the specification's (6,144 latents x 1,000 texts).

    .venv/bin/python bench/bench_dashboard.py [--repeats=3] [--skip-spec] [any setting]

Demo size: the store's own concepts when stage 04 has run there, otherwise made-up codes of the
demo's shape (2,304 latents, 200 texts of 128 tokens, k = 8). Specification size: made-up codes of
6,144 latents and 1,000 texts of 128 tokens, k = 8 (saekit.concepts.synthetic), taken through stage 04's
exports and stage 05's writer like real ones. Random latents make the largest labels ("unexplained
(best attempt: ...)"), so this is the heavy case.

The page records performance.now(), milliseconds since its navigation began, when the table is drawn
and takes clicks (data-ready-ms); opened at #bench it then times a sort by score (data-sort-ms); opened
at #latent-N it records when that latent's view is drawn, its files loaded from disk (data-shown-ms).
Chromium's own start-up is outside these figures; its wall time per run is reported beside them.
Results: bench/results/dashboard.json. Needs chromium (apt-get install -y chromium).
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import save_result, table, timer

from saekit.base.settings import load_settings
from saekit.concepts.exports import build_concepts, open_concepts, publish
from saekit.concepts.synthetic import synthetic_codes, synthetic_lens
from saekit.show import dashboard

GOAL_MS, GOAL_BYTES = 2000, 5_000_000

ap = argparse.ArgumentParser()
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--skip-spec", action="store_true", help="only the demo size")
args, setting_args = ap.parse_known_args()
settings = load_settings(setting_args)
chromium = shutil.which("chromium")
if chromium is None:
    sys.exit("chromium is not installed: apt-get install -y chromium")


def synthetic_concepts(n_latents: int, n_texts: int, folder: Path) -> tuple[dashboard.Concepts, float]:
    words = [f"word{i}" for i in range(5000)]
    codes = synthetic_codes(words, n_texts, 128, n_latents, 8, seed=0)
    live = sorted(set(codes.firing[1].tolist()))
    meta = {"model_id": "synthetic", "layer_signature": "synthetic", "sae_id": None, "k": 8, "dataset": "synthetic",
            "split": "heldout", "naming": None}
    with timer() as t:
        built = build_concepts(codes, synthetic_lens(words, live), meta, top_n=settings.TOP_N_EXAMPLES,
                               context=settings.CONTEXT_TOKENS, per_quantile=settings.QUANTILE_EXAMPLES,
                               non_activating=settings.NON_ACTIVATING_EXAMPLES,
                               scoring_examples=settings.SCORING_EXAMPLES, max_keys=settings.LABEL_MAX_KEYS,
                               min_f1=settings.LABEL_MIN_F1, min_support=settings.LABEL_MIN_SUPPORT)
    publish(folder, built)
    concepts, texts, _ = open_concepts(folder, None)
    latents = {int(i): latent for i, latent in concepts["latents"].items()}
    return dashboard.Concepts(concepts["meta"], latents, texts), t["seconds"]


def open_page(page: Path, fragment: str, profile: Path) -> tuple[dict[str, float], float]:
    """The page's own timings (ms) and Chromium's wall time (s) for one headless load."""
    started = time.perf_counter()
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--dump-dom", f"{page.as_uri()}#{fragment}"],
                          capture_output=True, text=True, timeout=180)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"chromium failed: {proc.stderr[-2000:]}")
    return {key: float(value) for key, value in re.findall(r'data-(ready|sort|shown)-ms="([\d.]+)"', proc.stdout)}, wall


def measure(name: str, concepts: dashboard.Concepts, folder: Path, build_seconds: float | None) -> dict:
    with timer() as t_write:
        page = dashboard.write_dashboard(concepts, folder / "dashboard.html")
    busiest = max(concepts.latents, key=lambda i: concepts.latents[i]["frequency"])
    runs = {"bench": [], f"latent-{busiest}": []}
    walls = []
    for repeat in range(args.repeats):
        for fragment in runs:
            timings, wall = open_page(page, fragment, folder / f"profile-{repeat}-{fragment}")
            runs[fragment].append(timings)
            walls.append(wall)
    median = lambda key, fragment: float(np.median([r[key] for r in runs[fragment]]))  # noqa: E731
    return {"case": name, "latents": concepts.n_latents, "live": len(concepts.latents),
            "texts": concepts.meta["n_texts"], "tokens": concepts.meta["n_tokens"],
            **dashboard.dashboard_size(page), "stage04_build_s": build_seconds, "write_s": t_write["seconds"],
            "interactive_ms": median("ready", "bench"), "sort_by_score_ms": median("sort", "bench"),
            "latent_shown_ms": median("shown", f"latent-{busiest}"), "chromium_wall_s": float(np.median(walls))}


rows = []
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if (settings.store / "concepts_id.txt").exists():
        rows.append(measure("demo store", dashboard.load_concepts(settings), tmp / "demo", None))
    else:
        (tmp / "demo").mkdir()
        concepts, seconds = synthetic_concepts(2304, 200, tmp / "demo")
        rows.append(measure("demo shape, synthetic", concepts, tmp / "demo", seconds))
    if not args.skip_spec:
        (tmp / "spec").mkdir()
        concepts, seconds = synthetic_concepts(6144, 1000, tmp / "spec")
        rows.append(measure("specification, synthetic", concepts, tmp / "spec", seconds))

columns = ["case", "latents", "live", "texts", "page_bytes", "total_bytes", "stage04_build_s", "interactive_ms",
           "sort_by_score_ms", "latent_shown_ms", "chromium_wall_s"]
print(table(rows, columns))
for r in rows:
    print(f"{r['case']}: interactive in {r['interactive_ms']:.0f} ms (goal < {GOAL_MS}), "
          f"{r['total_bytes'] / 1e6:.2f} MB with its files (goal < {GOAL_BYTES / 1e6:.0f} MB at the demo's size)")
save_result("dashboard", "python bench/bench_dashboard.py " + " ".join(sys.argv[1:]),
            {"repeats": args.repeats, "goal_interactive_ms": GOAL_MS, "goal_demo_bytes": GOAL_BYTES, "rows": rows})
