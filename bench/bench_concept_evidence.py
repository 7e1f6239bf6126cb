"""Issue 30's figures on a store (a copy of the demo's: this runs stage 04 and writes into it): the labels'
held-out F1 and explained share with the support rule, the export's examples and duplicates, the output
side, dead latents, and sparse probing per task with the SAE-free readouts.

    cp -r /work/demo_store /tmp/evidence_store
    .venv/bin/python bench/bench_concept_evidence.py --STORE_DIR=/tmp/evidence_store [--no-probing]
"""
import argparse
import json
import sys
from collections import Counter

import numpy as np

from common import save_result, table

from saekit.base.settings import load_settings
from saekit.concepts.runner import run_concepts
from saekit.evaluation import analysis, probing

ap = argparse.ArgumentParser()
ap.add_argument("--no-probing", action="store_true")
args, setting_args = ap.parse_known_args()
settings = load_settings(setting_args)

result = run_concepts(settings, progress=False)
latents = list(result["latents"].values())
labels = [c["label"] for c in latents]
scorable = [lab for lab in labels if lab["scorable"]]
f1 = np.array([lab["f1"] for lab in scorable])
record_duplicates = repeats_of_top = 0
export = settings.store / "neuronpedia"
for batch in sorted(export.glob("batch-*.json")):
    for feature in json.loads(batch.read_text())["features"]:
        windows = Counter((tuple(a["tokens"]), tuple(a["values"])) for a in feature["activations"])
        record_duplicates += sum(n - 1 for n in windows.values())
for c in latents:
    top = {(e["doc"], e["pos"]) for e in c["examples"]["top"]}
    repeats_of_top += sum((e["doc"], e["pos"]) in top for e in c["examples"]["quantiles"])
run_settings = json.loads((export / "run_settings.json").read_text())
figures = {
    "live_latents": len(latents), "scorable": len(scorable), "not_scorable": len(latents) - len(scorable),
    "explained": sum(lab["explained"] for lab in labels),
    "explained_share_of_scorable": sum(lab["explained"] for lab in scorable) / max(len(scorable), 1),
    "median_f1_scorable": float(np.median(f1)) if len(f1) else None,
    "mean_f1_scorable": float(np.mean(f1)) if len(f1) else None,
    "median_f1_interval_width": float(np.median([lab["f1_high"] - lab["f1_low"] for lab in scorable]))
    if scorable else None,
    "explained_with_fewer_than_5_scoring_firings": sum(lab["explained"] and lab["scoring_fires"] < 5 for lab in labels),
    "quantile_examples": sum(len(c["examples"]["quantiles"]) for c in latents),
    "quantile_examples_repeating_a_top_example": repeats_of_top,
    "duplicate_activation_records_in_export": record_duplicates,
    "output_side_methods": dict(Counter(c["output_side"]["method"] for c in latents)),
    "dead_latents_exported": run_settings["dead_latents"], "dead_decided_on": run_settings["dead_decided_on"],
    "silent_on_stage_04_texts_not_dead": run_settings["silent_on_these_texts_not_dead"],
    "rules_of_explained": dict(Counter(lab["rule"] for lab in labels if lab["explained"])),
}
print(json.dumps(figures, indent=1))
best = sorted(latents, key=lambda c: (not c["label"]["scorable"], -c["label"]["f1_low"]))[:8]
print(table([{"index": c["index"], "label": c["label"]["text"][:40], "F1": c["label"]["f1"],
              "F1 low": c["label"]["f1_low"], "support": c["label"]["scoring_fires"]} for c in best],
            ["index", "label", "F1", "F1 low", "support"]))

if not args.no_probing:
    trained = analysis.load_trained_sae(settings)
    probed = probing.sparse_probing(settings, trained, progress=False)
    figures["probing"] = {key: probed.get(key) for key in ("mean", "mean_lexical", "mean_dense", "tasks", "dropped")}
    print(probing.summary_text(probed))
    rows = [] if probed.get("skipped") else probing.task_table(probed)
    if rows:
        print(table(rows, list(rows[0])))

path = save_result("concept_evidence", "bench/bench_concept_evidence.py " + " ".join(sys.argv[1:]), figures)
print(f"wrote {path}")
