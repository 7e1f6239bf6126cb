"""A sweep of SAEs from one pass (SWEEP) against separate stage 02 runs, on the demo's activations.

- store: stage 02 once per k of KS (TopK, fresh processes, one after the other) against one stage 02
  with SWEEP = those k, on a copy of a store whose stage 01 ran (ACTIVATION_SOURCE = "store"). Goal:
  the sweep in at most 0.6x the separate runs' time. Each SAE's held-out FVU and ΔCE (on EVAL_TEXTS
  evaluation texts) against its separate run, and the largest weight difference: the sweep gives each
  SAE the batches its own run gets, so on one CPU the weights should be the same.
- model: on the fly (ACTIVATION_SOURCE = "model", stage 01 run for it on DATA_LIMIT texts): one
  stage 02 run (the first k) against the sweep of all of KS. Goal: at most 1.6x, since the model's
  forward, the cost on the fly, is paid once for all SAEs. The first k's SAE against the single run's.

Every stage is a fresh process, timed whole (start-up included), as a user runs it. Times on a shared
machine move with its load: the ratios, measured in one run, are what to read.

    .venv/bin/python bench/bench_sweep.py [--store=store] [--parts=store,model] [--EPOCHS=2] [--DATA_LIMIT=200]
                                          [--ks=8,16,32,64] [--eval_texts=50] [--workdir=/tmp]

Writes bench/results/local/sweep.json (sweep_<part>.json for one part; --out=bench/results to replace the
committed figures).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save_result, table

SEPARATE_GOAL, ON_THE_FLY_GOAL = 0.6, 1.6
_MODEL: dict = {}  # the model, loaded once for every splice


def stage(script: str, args: list[str]) -> float:
    """Seconds of one stage run in a fresh process (start-up included)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{script} {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - started


def training_seconds(history: Path) -> float:
    """The seconds stage 02 spent in its epochs' steps (a sweep's: every SAE's steps), from its history; the
    rest of a run is start-up, the checks of the activations, the held-out checks and saving."""
    from saekit.base.integrity import read_sealed_json

    return sum(h["train_tokens"] / h["tokens_per_s"] for h in read_sealed_json(history, "")["history"])


def scores(store: Path, folder: Path, history: Path, args: list[str], eval_texts: int) -> dict:
    """Held-out FVU (stage 02's last check) and ΔCE on `eval_texts` evaluation texts of the SAE in `folder`."""
    from saekit.activations.data import load_role_texts
    from saekit.activations.models import load_model, resolve_layer
    from saekit.activations.store import open_run
    from saekit.base.integrity import read_sealed_json
    from saekit.base.settings import load_settings
    from saekit.evaluation.analysis import mean_training_activation
    from saekit.evaluation.splice import splice_metrics
    from saekit.training.sae import TopKSAE

    settings = load_settings([*args, f"--STORE_DIR={store}", f"--EVAL_DATA_LIMIT={eval_texts}"])
    sae, meta = TopKSAE.load(folder / "topk_sae.pt")
    run = open_run(store, meta["activation_run_id"])
    if not _MODEL:
        _MODEL["loaded"] = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models")
    model, tokenizer = _MODEL["loaded"]
    texts = load_role_texts(settings, "eval").texts
    splice = splice_metrics(model, tokenizer, resolve_layer(model, settings.LAYER_SIGNATURE), texts, sae,
                            mean_training_activation(run, meta["heldout_start_row"]), settings.MAX_LENGTH,
                            batch_size=settings.BATCH_SIZE_SAVE, progress=False)
    last = read_sealed_json(history, "")["history"][-1]
    return {"heldout_fvu": last["heldout_fvu"], "heldout_l0": last["heldout_l0"], "delta_ce": splice["delta_ce"],
            "delta_ce_ci95": list(splice["delta_ce_ci95"]), "sae": sae}


def compare(name: str, alone: dict, swept: dict) -> dict:
    """One SAE of the sweep against its separate run: figures, their differences, the largest weight difference."""
    a, b = alone.pop("sae"), swept.pop("sae")
    weight_diff = max(float((getattr(a, w) - getattr(b, w)).detach().abs().max()) for w in ("W_enc", "b_enc", "W_dec", "b_dec"))
    return {"sae": name, "separate": alone, "sweep": swept, "fvu_difference": swept["heldout_fvu"] - alone["heldout_fvu"],
            "delta_ce_difference": swept["delta_ce"] - alone["delta_ce"], "largest_weight_difference": weight_diff}


def sweep_arg(ks: list[int]) -> str:
    return "--SWEEP=[" + ", ".join(f"{{'TOP_K': {k}}}" for k in ks) + "]"


def from_store(source: Path, tmp: Path, ks: list[int], epochs: int, eval_texts: int) -> dict:
    store = tmp / "store"
    shutil.copytree(source, store, ignore=shutil.ignore_patterns("sae_model", "sweep", "concepts", "notebooks"))
    args = [f"--STORE_DIR={store}", f"--EPOCHS={epochs}", "--ACTIVATION_SOURCE=store"]
    separate, steps = {}, {}
    for k in ks:
        separate[k] = stage("02_train_sae.py", [*args, f"--TOP_K={k}"])
        shutil.move(store / "sae_model", tmp / f"alone_k{k}")
        shutil.move(store / "training_history.json", tmp / f"alone_k{k}" / "training_history.json")
        steps[k] = training_seconds(tmp / f"alone_k{k}" / "training_history.json")
        print(f"store: TopK {k} alone {separate[k]:.0f} s ({steps[k]:.0f} s of steps)", flush=True)
    swept = stage("02_train_sae.py", [*args, sweep_arg(ks)])
    swept_steps = training_seconds(store / "sweep" / f"topk-k{ks[0]}-x4" / "training_history.json")
    print(f"store: sweep of {len(ks)} {swept:.0f} s ({swept_steps:.0f} s of steps)", flush=True)
    quality = [compare(f"topk-k{k}-x4",
                       scores(store, tmp / f"alone_k{k}", tmp / f"alone_k{k}" / "training_history.json", args, eval_texts),
                       scores(store, store / "sweep" / f"topk-k{k}-x4", store / "sweep" / f"topk-k{k}-x4" /
                              "training_history.json", args, eval_texts)) for k in ks]
    ratio = swept / sum(separate.values())
    return {"seconds_separate": separate, "seconds_separate_total": sum(separate.values()), "seconds_sweep": swept,
            "sweep_over_separate": ratio, "step_seconds_separate": steps, "step_seconds_sweep": swept_steps,
            # where the time goes: the steps (each SAE's own, in both flows) and the rest, which the sweep pays once
            "other_seconds_separate_total": sum(separate.values()) - sum(steps.values()),
            "other_seconds_sweep": swept - swept_steps, "goal": SEPARATE_GOAL, "goal_met": ratio <= SEPARATE_GOAL, "quality": quality}


def on_the_fly(source: Path, tmp: Path, ks: list[int], epochs: int, data_limit: int, eval_texts: int) -> dict:
    store = tmp / "online"
    store.mkdir()
    if (source / "models").is_dir():  # the de-quantized embedded model, made once
        (store / "models").symlink_to(source / "models", target_is_directory=True)
    args = [f"--STORE_DIR={store}", f"--EPOCHS={epochs}", "--ACTIVATION_SOURCE=model", f"--DATA_LIMIT={data_limit}"]
    seconds_01 = stage("01_save_activations.py", args)
    single = stage("02_train_sae.py", [*args, f"--TOP_K={ks[0]}"])
    single_steps = training_seconds(store / "training_history.json")  # on the fly, the model's forward included
    print(f"model: stage 01 {seconds_01:.0f} s; TopK {ks[0]} alone {single:.0f} s ({single_steps:.0f} s of epochs)", flush=True)
    swept = stage("02_train_sae.py", [*args, sweep_arg(ks)])
    name = f"topk-k{ks[0]}-x4"
    swept_steps = training_seconds(store / "sweep" / name / "training_history.json")
    print(f"model: sweep of {len(ks)} {swept:.0f} s ({swept_steps:.0f} s of epochs)", flush=True)
    quality = compare(name, scores(store, store / "sae_model", store / "training_history.json", args, eval_texts),
                      scores(store, store / "sweep" / name, store / "sweep" / name / "training_history.json", args,
                             eval_texts))
    ratio = swept / single
    return {"seconds_01": seconds_01, "seconds_one_run": single, "seconds_sweep": swept, "sweep_over_one_run": ratio,
            "epoch_seconds_one_run": single_steps, "epoch_seconds_sweep": swept_steps,
            "goal": ON_THE_FLY_GOAL, "goal_met": ratio <= ON_THE_FLY_GOAL, "quality": [quality]}


def main() -> None:
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    source = Path(options.get("store", ROOT / "store")).resolve()
    parts = options.get("parts", "store,model").split(",")
    ks = [int(k) for k in options.get("ks", "8,16,32,64").split(",")]
    epochs, data_limit = int(options.get("EPOCHS", 2)), int(options.get("DATA_LIMIT", 200))
    eval_texts = int(options.get("eval_texts", 50))
    result = {"ks": ks, "epochs": epochs, "eval_texts": eval_texts, "source_store": str(source),
              "note": "times of whole processes on a shared machine, under load: read the ratios"}
    with tempfile.TemporaryDirectory(dir=options.get("workdir")) as tmp:
        if "store" in parts:
            result["store"] = from_store(source, Path(tmp), ks, epochs, eval_texts)
        if "model" in parts:
            result["model"] = on_the_fly(source, Path(tmp), ks, epochs, data_limit, eval_texts)
            result["model"]["data_limit"] = data_limit
    for part in ("store", "model"):
        if part in result:
            r = result[part]
            print(part, {k: v for k, v in r.items() if k != "quality"})
            print(table([{"sae": q["sae"], "fvu alone": q["separate"]["heldout_fvu"], "fvu sweep": q["sweep"]["heldout_fvu"],
                          "ΔCE alone": q["separate"]["delta_ce"], "ΔCE sweep": q["sweep"]["delta_ce"],
                          "max |Δw|": q["largest_weight_difference"]} for q in r["quality"]],
                        ["sae", "fvu alone", "fvu sweep", "ΔCE alone", "ΔCE sweep", "max |Δw|"]))
    name = "sweep" if {"store", "model"} <= set(parts) else "sweep_" + "_".join(parts)
    print(f"wrote {save_result(name, 'python bench/bench_sweep.py ' + ' '.join(sys.argv[1:]), result)}")


if __name__ == "__main__":
    main()
