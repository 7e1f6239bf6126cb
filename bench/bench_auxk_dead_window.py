"""AuxK as Gao et al. cite it against this project's form, and the dead window, on a store's activations.

- `--part=auxk`: each AuxK form at SEEDS. "cited" is Gao et al.'s and the peers' form (openai's
  sparse_autoencoder `normalized_mse(auxk_recons, x - recons + pre_bias)`, sparsify and SAELens): the
  error of the dead latents' reconstruction of the residual divided by the residual's own variance, and
  scaled by min(n_dead / k_aux, 1). "input" divides it by the input's total variance, with no scale
  (this project's form before issue 31, about FVU times weaker), patched in here.
- `--part=window`: DEAD_WINDOW_TOKENS at WINDOWS (0 = stage 02's default), seed 0, stage 02's AuxK.

Each SAE is trained as stage 02 trains (config.py plus any setting given, e.g. `--STORE_DIR=`), scored on
the held-out rows (FVU, latents that never fire there) and spliced into the model on EVAL_TEXTS evaluation
texts: ΔCE with its 95% bootstrap interval over texts, and the paired difference from the first
configuration on the same texts.

    .venv/bin/python bench/bench_auxk_dead_window.py --part=auxk --STORE_DIR=/tmp/store
    .venv/bin/python bench/bench_auxk_dead_window.py --part=window --STORE_DIR=/tmp/store

Writes bench/results/auxk_forms.json or dead_window.json, after every SAE (a partial run keeps its rows).
"""
import subprocess
import sys
from dataclasses import replace

from common import save_result, table, timer

import saekit.training.train as train_module
from saekit.activations.data import load_texts
from saekit.activations.store import open_run
from saekit.base.settings import load_settings
from saekit.evaluation.analysis import load_layer_model, mean_training_activation
from saekit.evaluation.splice import paired_difference, splice_metrics
from saekit.evaluation.verdict import measured_on
from saekit.training.train import TrainConfig, evaluate, train_sae

SEEDS = (0, 1, 2)
WINDOWS = (0, 57_000, 1_000_000)  # default (a tenth of an epoch on the demo: 11,409 tokens), half an epoch, ~nine
EVAL_TEXTS = 100
COLUMNS = ["auxk", "seed", "window", "heldout_fvu", "dead", "dead_in_window", "delta_ce", "delta_ce_ci95",
           "vs_first", "vs_first_ci95", "train_seconds"]

CITED = train_module._Trainer.auxk_term  # stage 02's form


def input_normalised(trainer, x, residual, global_rows):
    """The form before issue 31: the dead latents' error over the input batch's total variance, unscaled
    (one process: `x` is the whole batch)."""
    total_variance = (x - x.mean(0)).pow(2).sum()
    return train_module.auxk_loss(trainer.sae, x, residual, trainer.dead_idx, trainer.k_aux, total_variance)


args = [a for a in sys.argv[1:] if not a.startswith("--part=")]
part = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--part=")), "auxk")
base = load_settings(args)
run = open_run(base.store)
loaded = load_layer_model(base)
texts = load_texts(base.HF_DATASET, base.EVAL_SPLIT, base.TEXT_FIELD, EVAL_TEXTS).texts
if part == "auxk":
    forms = {"cited": CITED, "input": input_normalised}
    plan = [(form, seed, 0) for seed in SEEDS for form in ("cited", "input")]
else:
    forms = {"stage 02": CITED}
    plan = [("stage 02", 0, window) for window in WINDOWS]
cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
            .stdout.splitlines() if line.startswith("Model name")), "unknown")

rows, first = [], None
for form, seed, window in plan:
    train_module._Trainer.auxk_term = forms[form]
    cfg = replace(TrainConfig.from_settings(base), seed=seed, dead_window_tokens=window)
    with timer() as t:
        sae, record = train_sae(run, cfg, progress=False)
    heldout_start = record["heldout_start_row"]
    heldout = evaluate(sae, run, heldout_start, run.n_tokens).summary()
    splice = splice_metrics(loaded.model, loaded.tokenizer, loaded.layer, texts, sae,
                            mean_training_activation(run, heldout_start), base.MAX_LENGTH,
                            batch_size=base.BATCH_SIZE_SAVE, progress=False, keep_per_text=True)
    per_text = splice.pop("per_text")
    first = first or per_text
    vs_first = paired_difference(per_text, first)
    rows.append({"auxk": form, "seed": seed, "window": record["dead_window_tokens"], "heldout_fvu": heldout["fvu"],
                 "dead": heldout["dead"], "dead_in_window": record["history"][-1]["dead_in_window"],
                 "delta_ce": splice["delta_ce"], "delta_ce_ci95": splice["delta_ce_ci95"],
                 "vs_first": vs_first["difference"], "vs_first_ci95": vs_first["ci95"],
                 "train_seconds": t["seconds"], "splice": splice})
    print(table(rows[-1:], COLUMNS), flush=True)
    save_result("auxk_forms" if part == "auxk" else "dead_window",
                "bench/bench_auxk_dead_window.py " + " ".join(sys.argv[1:]),
                {"run_id": run.run_id, **measured_on(base), "cpu": cpu, "eval_texts": len(texts),
                 "results": rows})
print(table(rows, COLUMNS))
