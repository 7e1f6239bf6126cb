"""Stage 03's CE goal against the SAE's size, sparsity, epochs and training data, in one run.

Each configuration (a set of setting overrides on top of config.py) trains an SAE on the store's
current activations (stage 01's run) without touching store/sae_model, then splices it into the
model on the same EVAL_SPLIT texts: held-out FVU, ΔCE, CE-loss recovered against mean- and
zero-ablation, and KL, as stage 03 computes them. Fewer training documents are had by holding
more out (HELDOUT_FRACTION), with epochs raised so every configuration takes the same number of
steps; their held-out FVU is then over more documents, their CE over the same texts.

    .venv/bin/python bench/ce_frontier.py                         # the configurations below
    .venv/bin/python bench/ce_frontier.py "--TOP_K=128"           # others, one per argument
    .venv/bin/python bench/ce_frontier.py --name=X "--TOP_K=128"  # ... written to ce_frontier_X.json

The configurations below write bench/results/ce_frontier.json; others, ce_frontier_custom.json (or
ce_frontier_<name>.json).
"""
import shlex
import sys

from common import save_result, table, timer

from saekit.activations.data import load_texts
from saekit.activations.models import load_model, resolve_layer
from saekit.activations.store import open_run
from saekit.base.settings import load_settings
from saekit.evaluation.analysis import mean_training_activation
from saekit.evaluation.splice import paired_difference, splice_metrics
from saekit.evaluation.verdict import measured_on
from saekit.training.train import TrainConfig, evaluate, train_sae

CONFIGURATIONS = [
    "",  # the embedded default
    "--HELDOUT_FRACTION=0.775 --EPOCHS=40",  # a quarter of the training documents
    "--HELDOUT_FRACTION=0.55 --EPOCHS=20",  # half
    "--EPOCHS=30",
    "--TOP_K=16",
    "--TOP_K=32",
    "--TOP_K=64",
    "--N_LATENTS_MULTIPLIER=16 --TOP_K=32",
]
EVAL_TEXTS = 100
COLUMNS = ["overrides", "train_tokens", "heldout_fvu", "dead", "delta_ce", "delta_ce_ci95", "vs_first", "vs_first_ci95",
           "recovered_vs_mean", "recovered_vs_zero", "kl", "train_seconds"]

name = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--name=")), "custom")
configurations = [a for a in sys.argv[1:] if not a.startswith("--name=")] or CONFIGURATIONS
base = load_settings([])
run = open_run(base.store)
model, tokenizer = load_model(base.MODEL_ID, "cpu", cache_dir=base.store / "models")
layer = resolve_layer(model, base.LAYER_SIGNATURE)
texts = load_texts(base.HF_DATASET, base.EVAL_SPLIT, base.TEXT_FIELD, EVAL_TEXTS).texts

rows, first = [], None
for overrides in configurations:
    settings = load_settings(shlex.split(overrides))
    with timer() as t:
        sae, record = train_sae(run, TrainConfig.from_settings(settings), progress=False)
    heldout_start = record["heldout_start_row"]
    heldout = evaluate(sae, run, heldout_start, run.n_tokens).summary()
    splice = splice_metrics(model, tokenizer, layer, texts, sae, mean_training_activation(run, heldout_start),
                            settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE, progress=False, keep_per_text=True)
    per_text = splice.pop("per_text")
    first = first or per_text
    vs_first = paired_difference(per_text, first)  # ΔCE minus the first configuration's, text by text
    row = {"overrides": overrides or "(default)", "train_tokens": heldout_start, "train_seconds": t["seconds"],
           "heldout_fvu": heldout["fvu"], "dead": heldout["dead"], "delta_ce": splice["delta_ce"],
           "delta_ce_ci95": splice["delta_ce_ci95"], "vs_first": vs_first["difference"], "vs_first_ci95": vs_first["ci95"],
           "recovered_vs_mean": splice["ce_recovered_vs_mean"], "recovered_vs_zero": splice["ce_recovered_vs_zero"],
           "kl": splice["kl_sae"], "splice": splice}
    rows.append(row)
    print(table([row], COLUMNS), flush=True)

print(table(rows, COLUMNS))
goal = {"min_recovered_vs_mean": base.MIN_CE_RECOVERED, "max_delta_ce": base.MAX_DELTA_CE}
path = save_result("ce_frontier" if configurations is CONFIGURATIONS else f"ce_frontier_{name}",
                   "bench/ce_frontier.py " + " ".join(shlex.quote(c) for c in sys.argv[1:]),
                   {"run_id": run.run_id, **measured_on(base), "eval_texts": len(texts), "goal": goal,
                    "results": rows})
print(f"wrote {path}")
