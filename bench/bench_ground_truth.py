"""Which SAE recovers the features its activations are made of? This project's TopK, BatchTopK and Matryoshka
(stage 02's trainer) against SAELens 6's same three, on the same rows of SAELens's own ground-truth generator
(SynthSAEBench, sae_lens.synthetic), at the same width and k, over several seeds, scored by SynthSAEBench's own
eval_sae_on_synthetic_data: MCC, per-latent precision / recall / F1, variance explained, L0, dead, shrinkage.

    make saelens-venv && .venv/bin/python bench/bench_ground_truth.py --out=bench/results   # ~45 min, 2 shared cores
    .venv/bin/python bench/bench_ground_truth.py --seeds=0 --epochs=1 --rows=30000            # a quick check
    .venv/bin/python bench/bench_ground_truth.py --data=/tmp/synth   # keeps the generated data (~5 min) for reruns

The data: SynthSAEBench-16k's recipe (SAELens docs/synth_sae_bench.md) at an eighth of its size, so that 18 SAEs
train on 2 cores in well under an hour: 2,048 true features in 128 dimensions (16x superposition; theirs 16,384 in
768, 21x), Zipfian firing (exponent 0.5, p 0.4 to 5e-4), 16 hierarchy trees of branching 4 and depth 3 (theirs 128:
two thirds of the features in both) whose children are mutually exclusive and scaled by their parent, low-rank
correlation (rank 25, scale 0.1), mean magnitudes 5 to 4 with folded-normal spread, a bias of norm 0.5. The SAEs
are a quarter as wide as the true dictionary (512 latents; theirs 4,096 of 16,384) with k = 8, the true L0 of the
512 most frequent features (theirs k = 25 for the same reason). Every trainer sees the same training rows, for the
same epochs and batch, at stage 02's LR and dead window (SAELens: lr and dead_feature_window set to them, as
bench_peers.py does); Matryoshka's groups are stage 02's default for both.

Each trainer runs in its own process and venv (bench/peers/saekit_train.py, saelens_train.py); the data is made,
and every SAE scored, by bench/peers/saelens_synth.py in SAELens's venv. One SAE of ours is also scored by
saekit.evaluation.ground_truth on the same rows, and the two scorers' figures are compared. Goals checked: each
architecture of ours at least as good as SAELens's in F1 and MCC (seed means), and Matryoshka ahead of BatchTopK in
F1 by more than twice the standard error of the difference of seed means. Writes bench/results/ground_truth.json
(with --out=bench/results; else bench/results/local/).
"""
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

# one thread for this process and every trainer it starts (they inherit it): on 2 shared cores (load 12) two
# threads per process waited on each other: stage 02's TopK took 354 s for 3 epochs with two, 39 s for 4 with one
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from common import ROOT, run_in_venv, save_result, table  # noqa: E402

from saekit.activations.store import RunWriter, open_run  # noqa: E402
from saekit.base.settings import load_settings  # noqa: E402
from saekit.evaluation.ground_truth import score_against_truth  # noqa: E402
from saekit.training.sae import matryoshka_prefix_ends  # noqa: E402
from saekit.training.saelens_format import load_saelens  # noqa: E402
from saekit.training.train import scaled_lr  # noqa: E402

SAELENS = ROOT / "bench" / ".venv-saelens" / "bin" / "python"
PEERS = ROOT / "bench" / "peers"
ARCHITECTURES = ["topk", "batchtopk", "matryoshka"]
FEATURES, D, ROOTS, MULTIPLIER, K = 2048, 128, 16, 4, 8
DATA_SEED = 42  # SynthSAEBench-16k's
EVAL_ROWS, DOC_ROWS, HELDOUT_FRACTION, BATCH = 20_000, 250, 0.02, 1024
METRICS = ["f1", "mcc", "precision", "recall", "explained_variance", "sae_l0", "dead_latents", "shrinkage", "uniqueness"]


def option(name: str, default: str) -> str:
    return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")), default)


if unknown := [a for a in sys.argv[1:] if not a.startswith(("--seeds=", "--epochs=", "--rows=", "--data="))]:
    sys.exit(f"bench_ground_truth.py takes --seeds=, --epochs=, --rows=, --data= and --out=, not {' '.join(unknown)}")
seeds = [int(s) for s in option("seeds", "0,1,2").split(",")]
epochs, n_rows = int(option("epochs", "4")), int(option("rows", "250000"))
width = MULTIPLIER * D
settings = load_settings([])  # config.py's recipe: the LR rule, dead window, Matryoshka's groups
lr = settings.LR or scaled_lr(width, settings.LR_BASE, K)  # stage 02's


def flat(result: dict) -> dict:
    return {**{k: v for k, v in result.items() if k != "classification"},
            "f1": result["classification"]["f1_score"], "precision": result["classification"]["precision"],
            "recall": result["classification"]["recall"]}


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    data = Path(option("data", str(tmp)))  # --data=FOLDER keeps the generated data there for the next run
    data_spec = {"out": str(data), "features": FEATURES, "d": D, "roots": ROOTS, "width": width, "rows": n_rows,
                 "eval_rows": EVAL_ROWS, "seed": DATA_SEED}
    if (data / "made.json").exists() and json.loads((data / "made.json").read_text())["spec"] == data_spec:
        made = json.loads((data / "made.json").read_text())
    else:
        made = run_in_venv(SAELENS, PEERS / "saelens_synth.py", "make", json.dumps(data_spec)) | {"spec": data_spec}
        (data / "made.json").write_text(json.dumps(made))
    print(f"SynthSAEBench data: true L0 {made['true_l0']:.2f}, of the {width} most frequent features "
          f"{made['true_l0_top_width']:.2f}; made in {made['seconds']:.0f} s", flush=True)

    # stage 02 reads a store: the rows as one run, in documents of DOC_ROWS rows; the last HELDOUT_FRACTION of
    # them is its held-out check, and the rows before them are what every trainer trains on
    rows = torch.from_numpy(np.load(data / "train_rows.npy"))
    writer = RunWriter(tmp / "store", "synthsaebench", D, "float32", 65536)
    docs = torch.arange(len(rows)) // DOC_ROWS
    writer.add(rows, torch.zeros(len(rows), dtype=torch.long), docs, torch.arange(len(rows)) % DOC_ROWS)
    writer.finish({"model_id": "synthsaebench", "layer_signature": "synthetic", "n_documents": int(docs[-1]) + 1})
    run = open_run(tmp / "store")
    heldout_start = run.heldout_start(HELDOUT_FRACTION)
    np.save(tmp / "rows.npy", run.rows(0, heldout_start))
    window_tokens = min(10_000_000, max(heldout_start // 10, BATCH))  # stage 02's default dead window
    shared = {"epochs": epochs, "batch": BATCH, "k": K, "d_sae": width, "rows": str(tmp / "rows.npy")}
    saekit_args = [f"--STORE_DIR={tmp / 'store'}", f"--N_LATENTS_MULTIPLIER={MULTIPLIER}", f"--TOP_K={K}",
                   f"--EPOCHS={epochs}", f"--BATCH_SIZE_TRAIN={BATCH}", f"--HELDOUT_FRACTION={HELDOUT_FRACTION}"]

    folders, trained = {}, []
    for seed in seeds:
        for architecture in ARCHITECTURES:
            for library in ("saekit", "saelens"):
                name = f"{library} {architecture} seed {seed}"
                out = tmp / name.replace(" ", "_")
                if library == "saekit":
                    spec = {"out": str(out), "overrides": saekit_args + [f"--ARCHITECTURE={architecture}",
                                                                          f"--SEED={seed}"]}
                else:
                    spec = {**shared, "out": str(out), "architecture": architecture, "seed": seed, "lr": lr,
                            "dead_feature_window": -(-window_tokens // BATCH)}
                    if architecture == "matryoshka":
                        spec["matryoshka_widths"] = list(matryoshka_prefix_ends(width, settings.MATRYOSHKA_GROUP_FRACTIONS))
                python = SAELENS if library == "saelens" else Path(sys.executable)
                result = run_in_venv(python, PEERS / f"{library}_train.py", json.dumps(spec))
                folders[name] = str(out)
                trained.append({"sae": name, "library": library, "architecture": architecture, "seed": seed,
                                "train_seconds": result["train_seconds"], "tokens": result["tokens"]})
                print(f"trained {name} in {result['train_seconds']:.0f} s", flush=True)

    scores = run_in_venv(SAELENS, PEERS / "saelens_synth.py", "score", json.dumps({"data": str(data), "saes": folders}))
    results = [{**row, **flat(scores[row["sae"]])} for row in trained]

    # the cross-check: our scorer and SynthSAEBench's on the same SAE and rows
    stored = load_file(str(data / "eval.safetensors"))
    codes = torch.sparse_coo_tensor(stored["indices"], stored["values"], tuple(stored["shape"].tolist()),
                                    check_invariants=True).to_dense()
    x = codes @ stored["feature_vectors"] + stored["bias"]
    checked = results[0]["sae"]
    ours = score_against_truth(load_saelens(folders[checked])[0], x, stored["feature_vectors"], codes).as_dict()
    theirs = scores[checked]
    cross_check = {"sae": checked, "saekit": ours, "synthsaebench": {
        "mcc": theirs["mcc"], "f1": theirs["classification"]["f1_score"],
        "precision": theirs["classification"]["precision"], "recall": theirs["classification"]["recall"],
        "variance_explained": theirs["explained_variance"], "l0": theirs["sae_l0"],
        "dead_fraction": theirs["dead_latents"] / width, "shrinkage": theirs["shrinkage"]}}
    cross_check["max_abs_difference"] = max(abs(ours[k] - cross_check["synthsaebench"][k]) for k in ours)

summary = []
for library in ("saekit", "saelens"):
    for architecture in ARCHITECTURES:
        at = [r for r in results if r["library"] == library and r["architecture"] == architecture]
        row = {"library": library, "architecture": architecture, "seeds": len(at)}
        for metric in METRICS:
            values = [r[metric] for r in at]
            row[metric] = statistics.mean(values)
            row[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        row["train_seconds"] = statistics.mean(r["train_seconds"] for r in at)
        summary.append(row)
print(table(summary, ["library", "architecture", "seeds", "f1", "f1_sd", "mcc", "mcc_sd", "precision", "recall",
                      "explained_variance", "sae_l0", "dead_latents", "shrinkage", "train_seconds"]))


def at(library: str, architecture: str) -> dict:
    return next(r for r in summary if r["library"] == library and r["architecture"] == architecture)


def beyond_noise(a: dict, b: dict, metric: str) -> dict:
    """a - b in seed means, and whether it exceeds twice its standard error (None with one seed)."""
    difference = a[metric] - b[metric]
    if a[f"{metric}_sd"] is None or b[f"{metric}_sd"] is None:
        return {"difference": difference, "standard_error": None, "beyond_noise": None}
    error = (a[f"{metric}_sd"] ** 2 / a["seeds"] + b[f"{metric}_sd"] ** 2 / b["seeds"]) ** 0.5
    return {"difference": difference, "standard_error": error, "beyond_noise": difference > 2 * error}


goals = {"ours_at_least_saelens": {a: {m: {"ours": at("saekit", a)[m], "saelens": at("saelens", a)[m],
                                           "met": at("saekit", a)[m] >= at("saelens", a)[m]} for m in ("f1", "mcc")}
                                   for a in ARCHITECTURES},
         "matryoshka_ahead_of_batchtopk_f1": {lib: beyond_noise(at(lib, "matryoshka"), at(lib, "batchtopk"), "f1")
                                              for lib in ("saekit", "saelens")}}
print(json.dumps(goals, indent=1))
print(f"cross-check on {cross_check['sae']}: largest difference between the two scorers "
      f"{cross_check['max_abs_difference']:.2e}")
path = save_result("ground_truth", "python bench/bench_ground_truth.py " + " ".join(sys.argv[1:]), {
    "data": {"generator": "sae_lens.synthetic.SyntheticModel, SynthSAEBench-16k's recipe at 1/8 size",
             "features": FEATURES, "d": D, "hierarchy_roots": ROOTS, "seed": DATA_SEED, "train_rows": heldout_start,
             "eval_rows": EVAL_ROWS, "true_l0": made["true_l0"], "true_l0_top_width": made["true_l0_top_width"],
             "config": made["config"]},
    "saes": {"width": width, "k": K, "epochs": epochs, "batch": BATCH, "lr": lr, "dead_window_tokens": window_tokens,
             "matryoshka_prefix_ends": list(matryoshka_prefix_ends(width, settings.MATRYOSHKA_GROUP_FRACTIONS))},
    "summary": summary, "goals": goals, "cross_check": cross_check, "results": results})
print(f"wrote {path}")
