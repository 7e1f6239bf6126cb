"""Stage 02: the project's trainer against mi_crow's SaeTrainer at the specification's settings
(4x latents, TopK 8, batch 32, lr 1e-3, l1 1e-4, the seed's 02_train_sae.py), on the same stored
activations (the store's current run, from stage 01), for the same number of epochs, in one run.
Both are scored by the project's metrics on the same held-out tokens, which neither trains on.
Each trainer runs in its own process, so its peak RSS is its own.

    .venv/bin/python bench/bench_train.py [--EPOCHS=10] [any setting]
"""
import json
import subprocess
import sys

import torch

from common import dense_fp32_gflops, peak_rss_mb, save_result, table, timer
from history.mi_crow_recipe import train_mi_crow

from saekit.activations.store import open_run
from saekit.base.settings import load_settings
from saekit.training.reconstruction import ReconstructionStats
from saekit.training.train import TrainConfig, evaluate, train_sae


def run_ours(settings, run, heldout_start):
    cfg = TrainConfig.from_settings(settings)
    with timer() as t:
        sae, record = train_sae(run, cfg, progress=False)
    stats = evaluate(sae, run, heldout_start, run.n_tokens)
    history = record["history"]
    return {"heldout": stats.summary(), "train_seconds": t["seconds"],
            "tokens_per_s": sum(h["train_tokens"] for h in history) / sum(h["train_tokens"] / h["tokens_per_s"] for h in history),
            "n_latents": sae.n_latents}


def run_mi_crow(settings, run, heldout_start):
    engine, trained = train_mi_crow(settings, run, heldout_start)
    stats = ReconstructionStats(settings.N_LATENTS_MULTIPLIER * run.d_model)
    with torch.no_grad():
        for chunk in run.iter_rows(heldout_start, run.n_tokens, 4096):
            x = torch.from_numpy(chunk)
            _, codes, x_hat = engine(x)
            values, indices = codes.topk(settings.TOP_K, dim=1)
            stats.update(x, x_hat, values, indices)
    return {"heldout": stats.summary(), "train_seconds": trained["train_seconds"],
            "tokens_per_s": heldout_start * settings.EPOCHS / trained["train_seconds"],
            "mi_crow_reported_r2": trained["mi_crow_reported_r2"], "n_latents": stats.n_latents}


if len(sys.argv) > 1 and sys.argv[1] in ("ours", "mi_crow"):
    which, settings = sys.argv[1], load_settings(sys.argv[2:])
    torch.manual_seed(settings.SEED)
    run = open_run(settings.store)
    heldout_start = run.heldout_start(settings.HELDOUT_FRACTION)
    result = (run_ours if which == "ours" else run_mi_crow)(settings, run, heldout_start)
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
    sys.exit(0)

settings = load_settings(sys.argv[1:])
run = open_run(settings.store)
heldout_start = run.heldout_start(settings.HELDOUT_FRACTION)
gflops = dense_fp32_gflops()
d, n = run.d_model, settings.N_LATENTS_MULTIPLIER * run.d_model
dense_ceiling = gflops * 1e9 / (10 * d * n)  # tokens/s if every product of a step were dense (ENVIRONMENT.md)
rows = []
for which in ("ours", "mi_crow"):
    out = subprocess.run([sys.executable, __file__, which, *sys.argv[1:]], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{which} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    h = result["heldout"]
    rows.append({"trainer": which, "heldout_fvu": h["fvu"], "dead_pct": 100 * h["dead_fraction"],
                 "dense": h["dense"], "l0": h["l0"], "tokens_per_s": result["tokens_per_s"],
                 "vs_dense_ceiling": result["tokens_per_s"] / dense_ceiling, "peak_rss_mb": result["peak_rss_mb"],
                 "train_seconds": result["train_seconds"], "mi_crow_reported_r2": result.get("mi_crow_reported_r2")})
ours, mi = rows
print(f"run {run.run_id}: {heldout_start} training tokens, {run.n_tokens - heldout_start} held-out; "
      f"{settings.EPOCHS} epochs; d={d}, n_latents={n}, k={settings.TOP_K}")
print(f"dense fp32 matmul here: {gflops:.0f} GFLOP/s -> dense ceiling {dense_ceiling:.0f} tokens/s")
print(table(rows, ["trainer", "heldout_fvu", "dead_pct", "dense", "l0", "tokens_per_s", "vs_dense_ceiling",
                   "peak_rss_mb", "train_seconds", "mi_crow_reported_r2"]))
print(f"goals: FVU <= 0.6x mi_crow ({ours['heldout_fvu'] / mi['heldout_fvu']:.2f}x), dead <= 1% "
      f"({ours['dead_pct']:.2f}%), tokens/s >= 5x mi_crow ({ours['tokens_per_s'] / mi['tokens_per_s']:.1f}x) "
      f"and >= 0.8 of the dense ceiling ({ours['vs_dense_ceiling']:.2f})")
save_result("train", "python bench/bench_train.py " + " ".join(sys.argv[1:]),
            {"run_id": run.run_id, "epochs": settings.EPOCHS, "dense_fp32_gflops": gflops,
             "dense_ceiling_tokens_per_s": dense_ceiling, "rows": rows})
