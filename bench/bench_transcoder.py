"""Transcoder against SAE on the demo's block: the same width, k, epochs and rows, each through stages 02, 03 and 04
as a user runs them (TRAIN_TARGET = sae, transcoder, skip_transcoder), at each seed of --seeds.

    .venv/bin/python bench/bench_transcoder.py --STORE_DIR=/tmp/tc_store [--seeds=0,1,2] [--targets=sae,transcoder]
    .venv/bin/python bench/bench_transcoder.py --STORE_DIR=/tmp/tc_store --collect   # the variants done so far

Stage 01 runs once with the MLP's output stored beside its input (a run with a target serves all three: an SAE
reads the input only). Reported per variant and seed: held-out FVU (of the MLP's input for the SAE, of the MLP's
output for the transcoders), L0, dead latents, and the splice (the SAE at the MLP's input; a transcoder in place of
the MLP), with the ratio of each transcoder's ΔCE to the SAE's measured in the same run. The two FVUs are of
different targets and the two ΔCEs of different replacements, so they say how well each replaces what it stands in
for, not which is the better dictionary.

Interpretability, the question of Paulo et al. (2025): stage 04's labels (the share of scorable live latents whose
held-out label F1 reaches LABEL_MIN_F1, and the median F1) and stage 03's sparse probing (mean balanced accuracy
with the best 1, 2 and 5 latents), per seed, then each figure's mean and spread over seeds per variant and the
transcoder-minus-SAE difference at each seed (the same seed: the same batches and initial draws).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
from common import ROOT, save_result, table

from saekit.base.settings import load_settings
from saekit.concepts.exports import CONCEPTS_DIR, CONCEPTS_FILE, POINTER

ARGS = sys.argv[1:]
PY = sys.executable


def stage(argv: list[str]) -> None:
    proc = subprocess.run([PY, *argv, *ARGS], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{argv[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def option(name: str, default: str) -> list[str]:
    """A bench option --name=a,b (taken out of ARGS, which go to the stages)."""
    given = next((a for a in ARGS if a.startswith(f"--{name}=")), None)
    if given:
        ARGS.remove(given)
    return (given.split("=", 1)[1] if given else default).split(",")


COLLECT = "--collect" in ARGS  # only gather what earlier (perhaps interrupted) runs of this script left in the store
if COLLECT:
    ARGS.remove("--collect")
SEEDS = [int(s) for s in option("seeds", "0")]
TARGETS = option("targets", "sae,transcoder,skip_transcoder")
folder = load_settings(ARGS).store
if not COLLECT and not (folder / "run_id.txt").exists():
    stage(["01_save_activations.py", "--TRAIN_TARGET=transcoder"])


def label_figures(path) -> dict:
    """Stage 04's labels of the live latents: how many are scorable, the share of those explained, median F1."""
    latents = json.loads(path.read_text())["latents"].values()
    scorable = [c["label"] for c in latents if c["label"]["scorable"]]
    return {"live_latents": len(latents), "scorable": len(scorable),
            "explained_share": float(np.mean([lab["explained"] for lab in scorable])) if scorable else None,
            "median_label_f1": float(np.median([lab["f1"] for lab in scorable])) if scorable else None}


def row(tag: str, target: str, seed: int) -> dict:
    """The figures of one variant at one seed, from the copies of its artifacts kept in the store."""
    report = json.loads((folder / f"analysis_{tag}.json").read_text())
    history = folder / f"training_history_{tag}.json"
    speed = json.loads(history.read_text())["history"][-1]["tokens_per_s"] if history.exists() else None
    splice, probes = report["splice"], report.get("sparse_probing") or {}
    labels = folder / f"concepts_{tag}.json"
    return {"train_target": target, "seed": seed, "sae_id": report["sae_id"], "heldout_fvu": report["heldout"]["fvu"],
            "l0": report["heldout"]["l0"], "dead_fraction": report["heldout"]["dead_fraction"],
            "delta_ce": splice["delta_ce"], "delta_ce_ci95": splice["delta_ce_ci95"], "kl": splice["kl_sae"],
            "ce_recovered_vs_mean": splice["ce_recovered_vs_mean"],
            "mean_ablation_cost": splice["ce_mean"] - splice["ce_clean"],
            "verdict": "PASS" if report["passed"] else "FAIL", "tokens_per_s": speed,
            "spliced": splice.get("spliced_as", "the SAE at the MLP's input"),
            **{f"probe_k{k}": v for k, v in (probes.get("mean") or {}).items()},
            **(label_figures(labels) if labels.exists() else {})}


INTERPRETABILITY = ["explained_share", "median_label_f1", "probe_k1", "probe_k2", "probe_k5"]


def over_seeds(rows: list[dict]) -> dict:
    """Per variant, each figure's mean and sd over seeds; per transcoder, its difference from the SAE seed by seed."""
    by = {(r["train_target"], r["seed"]): r for r in rows}
    summary = {}
    for target in dict.fromkeys(r["train_target"] for r in rows):
        mine = [r for r in rows if r["train_target"] == target]
        figures = {}
        for name in ["heldout_fvu", "delta_ce", *INTERPRETABILITY]:
            values = [r[name] for r in mine if r.get(name) is not None]
            if values:
                figures[name] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1
                                 else None, "n": len(values)}
            sae_pairs = [(r[name], by[("sae", r["seed"])].get(name)) for r in mine
                         if target != "sae" and ("sae", r["seed"]) in by and r.get(name) is not None]
            if sae_pairs and all(b is not None for _, b in sae_pairs) and name in INTERPRETABILITY:
                figures[name]["minus_sae_by_seed"] = [a - b for a, b in sae_pairs]
        summary[target] = figures
    return summary


rows = []
for seed in SEEDS:
    for target in TARGETS:
        tag = f"{target}_seed{seed}"
        if not COLLECT:
            ARGS.extend([f"--TRAIN_TARGET={target}", f"--SEED={seed}"])
            stage(["02_train_sae.py"])
            stage(["-m", "saekit.notebooks", "03_analyze_training.ipynb", "--CONTINUE_AFTER_FAIL=True"])
            stage(["-m", "saekit.notebooks", "04_name_sae_concepts.ipynb", "--CONTINUE_AFTER_FAIL=True"])
            del ARGS[-2:]
            for name in ("analysis", "training_history"):
                shutil.copy(folder / f"{name}.json", folder / f"{name}_{tag}.json")
            concepts = folder / CONCEPTS_DIR / (folder / POINTER).read_text().strip() / CONCEPTS_FILE
            shutil.copy(concepts, folder / f"concepts_{tag}.json")
        if (folder / f"analysis_{tag}.json").exists():
            rows.append(row(tag, target, seed))
        sae_ce = {r["seed"]: r["delta_ce"] for r in rows if r["train_target"] == "sae"}
        for each in rows:
            each["delta_ce_vs_sae"] = each["delta_ce"] / sae_ce[each["seed"]] if each["seed"] in sae_ce else None
        print(table(rows, ["train_target", "seed", "heldout_fvu", "l0", "dead_fraction", "delta_ce", "delta_ce_vs_sae",
                           "verdict", *INTERPRETABILITY, "tokens_per_s"]))
        print(save_result("bench_transcoder", "bench/bench_transcoder.py " + " ".join(sys.argv[1:]),  # after each
                          {"cpu": "AMD EPYC, 2 cores (timings under load where other jobs ran)",
                           "variants_done": [[r["train_target"], r["seed"]] for r in rows], "rows": rows,
                           "over_seeds": over_seeds(rows)}))
