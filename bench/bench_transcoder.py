"""Transcoder against SAE on the demo's block: the same width, k, epochs and rows, each through stages 02 and 03
as a user runs them (TRAIN_TARGET = sae, transcoder, skip_transcoder).

    .venv/bin/python bench/bench_transcoder.py --STORE_DIR=/tmp/tc_store [--EPOCHS=3] [--out=bench/results]
    .venv/bin/python bench/bench_transcoder.py --STORE_DIR=/tmp/tc_store --collect   # the variants done so far

Stage 01 runs once with the MLP's output stored beside its input (a run with a target serves all three: an SAE
reads the input only). Reported per variant: held-out FVU (of the MLP's input for the SAE, of the MLP's output for
the transcoders), L0, dead latents, and the splice (the SAE at the MLP's input; a transcoder in place of the MLP),
with the ratio of each transcoder's ΔCE to the SAE's measured in the same run. The two FVUs are of different
targets and the two ΔCEs of different replacements, so they say how well each replaces what it stands in for, not
which is the better dictionary; interpretability is stage 04's and the issue's 3-seed comparison, not done here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from common import ROOT, save_result, table

from saekit.base.settings import load_settings

ARGS = sys.argv[1:]
PY = sys.executable


def stage(argv: list[str]) -> None:
    proc = subprocess.run([PY, *argv, *ARGS], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{argv[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


COLLECT = "--collect" in ARGS  # only gather what earlier (perhaps interrupted) runs of this script left in the store
if COLLECT:
    ARGS.remove("--collect")
folder = load_settings(ARGS).store
if not COLLECT and not (folder / "run_id.txt").exists():
    stage(["01_save_activations.py", "--TRAIN_TARGET=transcoder"])


def row(target: str) -> dict:
    """The figures of one variant, from the copies of its analysis and history kept in the store."""
    report = json.loads((folder / f"analysis_{target}.json").read_text())
    history = folder / f"training_history_{target}.json"
    speed = json.loads(history.read_text())["history"][-1]["tokens_per_s"] if history.exists() else None
    splice = report["splice"]
    return {"train_target": target, "sae_id": report["sae_id"], "heldout_fvu": report["heldout"]["fvu"],
            "l0": report["heldout"]["l0"], "dead_fraction": report["heldout"]["dead_fraction"],
            "delta_ce": splice["delta_ce"], "delta_ce_ci95": splice["delta_ce_ci95"], "kl": splice["kl_sae"],
            "ce_recovered_vs_mean": splice["ce_recovered_vs_mean"],
            "mean_ablation_cost": splice["ce_mean"] - splice["ce_clean"],
            "verdict": "PASS" if report["passed"] else "FAIL", "tokens_per_s": speed,
            "spliced": splice.get("spliced_as", "the SAE at the MLP's input")}


rows = []
for target in ("sae", "transcoder", "skip_transcoder"):
    if not COLLECT:
        ARGS.append(f"--TRAIN_TARGET={target}")
        stage(["02_train_sae.py"])
        stage(["-m", "saekit.notebooks", "03_analyze_training.ipynb", "--CONTINUE_AFTER_FAIL=True"])
        ARGS.pop()
        shutil.copy(folder / "analysis.json", folder / f"analysis_{target}.json")
        shutil.copy(folder / "training_history.json", folder / f"training_history_{target}.json")
    if (folder / f"analysis_{target}.json").exists():
        rows.append(row(target))
    for each in rows:
        each["delta_ce_vs_sae"] = each["delta_ce"] / rows[0]["delta_ce"] if rows[0]["train_target"] == "sae" else None
    print(table(rows, ["train_target", "heldout_fvu", "l0", "dead_fraction", "delta_ce", "delta_ce_vs_sae", "kl",
                       "ce_recovered_vs_mean", "verdict", "tokens_per_s"]))
    print(save_result("bench_transcoder", "bench/bench_transcoder.py " + " ".join(ARGS),  # after each variant
                      {"cpu": "AMD EPYC, 2 cores shared with other jobs (timings under load)",
                       "variants_done": [r["train_target"] for r in rows], "rows": rows}))
