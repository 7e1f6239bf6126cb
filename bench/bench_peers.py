"""Stage 02 against SAELens 6 (TopK, BatchTopK and Matryoshka BatchTopK) and EleutherAI's sparsify, on exactly the rows
stage 02 trains on, every SAE scored by the project's metrics on the same held-out rows and texts.

    make bench-peers                                  # venvs, activations if missing, then this
    .venv/bin/python bench/bench_peers.py             # the k = 8 comparison (~25 min on 2 quiet cores)
    .venv/bin/python bench/bench_peers.py --frontier  # also k = 16, 32, 64: this project and the two best peers (~65 min)
    .venv/bin/python bench/bench_peers.py --EPOCHS=1 --eval-texts=8   # a quick check that every trainer runs
    .venv/bin/python bench/bench_peers.py --speed=3   # stage 02 vs sparsify's speed only, alternately, 3 times each (~6 min)
    .venv/bin/python bench/bench_peers.py --only=saekit --SEED=1 --name=bench_peers_saekit_seed1  # this project's
                                                      # SAEs at another seed (seed noise), to bench_peers_saekit_seed1.json
    .venv/bin/python bench/bench_peers.py --transcoder --STORE_DIR=/tmp/tc_store   # transcoders, on a store
                                                      # whose run holds the MLP's output (stage 01, TRAIN_TARGET=transcoder)
    .venv/bin/python bench/bench_peers.py --transcoder --STORE_DIR=/tmp/tc_store --speed=3   # their speed alone

Each trainer runs in its own process (its own venv: bench/.venv-saelens, bench/.venv-sparsify), one
after another, so each is timed alone; only the library's training call is timed (this project's:
train_sae, which includes its per-epoch held-out evaluation). The rows are the store's training
rows [0, heldout_start), handed to the peers as one .npy file and fed in a fresh random order each
epoch; width 4x, batch BATCH_SIZE_TRAIN, EPOCHS epochs for all. Peers run at their library
defaults, and at settings matched to this run's size where the library exposes them: the same LR
and dead window as stage 02 (SAELens: lr, dead_feature_window; sparsify: AuxK 1/32 and
dead_feature_threshold, its sign-SGD LR being on another scale than Adam's).

Every trainer writes its SAE in SAELens's format, read back by saekit.training.saelens_format (TopK, and
BatchTopK and Matryoshka as the JumpReLU with the learned threshold that SAELens saves). Each loaded SAE is checked
against the library's own reconstruction of 512 rows (scorer_max_error).

Every SAE also gets stage 03's sparse probing (saekit.evaluation.probing): the mean balanced accuracy over the
kept tasks with k = 1, 2, 5 latents (columns probe_k1, probe_k2, probe_k5; each task in the JSON). The
stories, tasks and SAE-free readouts are prepared once, from the settings as given (the evaluation
texts of EVAL_DATA_LIMIT, not --eval-texts: the same stories as stage 03), and reused for every SAE.
Writes bench/results/bench_peers.json with the exact settings of every trainer.

With --transcoder: this project's transcoder and skip transcoder (TRAIN_TARGET; TopK unless ARCHITECTURE says
otherwise) against sparsify's (`transcode`, and `skip_connection`), at its defaults and with AuxK matched, on the
input and target rows of [0, heldout_start), EXCLUDE_TOKENS's rows left out for every trainer as stage 02 leaves
them out. sparsify's transcoder is the same function as this project's (bench/peers/sparsify_train.py), so its
weights are loaded into TopKSAE and checked against sparsify's own prediction (scorer_max_error). Scored: the
held-out FVU of the target, L0, dead latents, and ΔCE with each spliced in place of the MLP (as stage 03 splices
a transcoder, the excluded tokens keeping the MLP's own output), and per kind the paired ΔCE difference of this
project's best against sparsify's best; no sparse probing. Writes bench/results/bench_peers_transcoder.json.
"""
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from common import ROOT, run_in_venv, save_result, table

from saekit.activations.data import load_role_texts
from saekit.activations.models import load_model, resolve_layer
from saekit.activations.store import excluded_token_ids, open_run, role_token_ids
from saekit.base.settings import load_settings
from saekit.evaluation import probing
from saekit.evaluation.analysis import mean_training_activation
from saekit.evaluation.splice import paired_difference, splice_metrics
from saekit.evaluation.verdict import measured_on
from saekit.training.sae import TopKSAE, matryoshka_prefix_ends
from saekit.training.saelens_format import load_saelens
from saekit.training.train import evaluate, scaled_lr

EVAL_TEXTS = 100
PYTHONS = {"saekit": Path(sys.executable), "saelens": ROOT / "bench" / ".venv-saelens" / "bin" / "python",
           "sparsify": ROOT / "bench" / ".venv-sparsify" / "bin" / "python"}
SCRIPTS = {name: ROOT / "bench" / "peers" / f"{name}_train.py" for name in PYTHONS}
FRONTIER_K = [16, 32, 64]
COLUMNS = ["trainer", "k", "heldout_fvu", "l0", "dead_pct", "delta_ce", "recovered_vs_mean", "probe_k1", "probe_k2",
           "probe_k5", "train_seconds", "tokens_per_s", "load_before"]
TRANSCODER_COLUMNS = ["trainer", "k", "heldout_fvu", "l0", "dead_pct", "delta_ce", "recovered_vs_mean",
                      "scorer_max_error", "train_seconds", "tokens_per_s", "load_before"]


def train(trainer: str, spec: dict) -> dict:
    return run_in_venv(PYTHONS[trainer], SCRIPTS[trainer], json.dumps(spec))


def load_trained(out: Path) -> TopKSAE:
    """The SAE a trainer wrote in `out`: this project's own file (its transcoders), sparsify's transcoder
    weights under TopKSAE's names, or a SAELens folder (TopK, or JumpReLU: what BatchTopK is saved as)."""
    if (out / "sae.pt").exists():
        return TopKSAE.load(out / "sae.pt")[0]
    if (out / "transcoder.json").exists():
        layout = json.loads((out / "transcoder.json").read_text())
        sae = TopKSAE(layout["d_in"], layout["n_latents"], layout["k"], d_out=layout["d_out"], skip=layout["skip"])
        sae.load_state_dict(load_file(out / "transcoder.safetensors"))
        return sae.eval()
    return load_saelens(out)[0]


frontier = "--frontier" in sys.argv
transcoder = "--transcoder" in sys.argv
eval_texts = next((int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--eval-texts=")), EVAL_TEXTS)
speed_repeats = next((int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--speed=")), 0)
only = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")), list(PYTHONS))
default_name = "bench_peers_transcoder" if transcoder else "bench_peers"
result_name = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--name=")), default_name)
args = [a for a in sys.argv[1:] if a not in ("--frontier", "--transcoder")
        and not a.startswith(("--eval-texts=", "--speed=", "--only=", "--name="))]
if unknown := set(only) - set(PYTHONS):
    sys.exit(f"--only takes trainers among {', '.join(PYTHONS)}, not {', '.join(sorted(unknown))}")
if transcoder:  # the settings name the target module; each of this project's trainers sets its own TRAIN_TARGET
    args.append("--TRAIN_TARGET=transcoder")
settings = load_settings(args)
run = open_run(settings.store)
if transcoder:
    if run.target_signature != settings.target:
        sys.exit(f"run {run.run_id} in {settings.store} stores no target {settings.target!r} (it stores "
                 f"{run.target_signature!r}): run stage 01 with --TRAIN_TARGET=transcoder first")
    run.exclude_tokens(settings.EXCLUDE_TOKENS)  # out of every trainer's rows and the held-out metrics, as in stage 02
heldout_start = run.heldout_start(settings.HELDOUT_FRACTION)
train_tokens = run.count_kept(0, heldout_start)
d, n_latents, k = run.d_model, settings.N_LATENTS_MULTIPLIER * run.d_model, settings.TOP_K
window_tokens = settings.DEAD_WINDOW_TOKENS or min(10_000_000, max(train_tokens // 10, settings.BATCH_SIZE_TRAIN))
window_steps = math.ceil(window_tokens / settings.BATCH_SIZE_TRAIN)
matched = f"stage 02's LR, dead window {window_tokens:,} tokens"  # the LR at each k is in the row's spec

model, tokenizer = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models")
layer = resolve_layer(model, settings.LAYER_SIGNATURE)
texts = load_role_texts(load_settings(args + [f"--EVAL_DATA_LIMIT={eval_texts}"]), "eval").texts
mean = mean_training_activation(run, heldout_start, target=transcoder)  # a transcoder's: the MLP output's
# where the SAE is spliced in: a transcoder in place of the MLP, fed the MLP's input (`layer`) of the same forward
spliced_at = resolve_layer(model, settings.target, "TARGET_SIGNATURE") if transcoder else layer
kept = excluded_token_ids(settings.EXCLUDE_TOKENS, role_token_ids(tokenizer)) if transcoder else frozenset()
# the trainers --speed alternates: stage 02 and sparsify at its defaults
speed_pair = (("saekit transcoder", "sparsify transcoder, defaults") if transcoder
              else ("saekit", "sparsify TopK, defaults"))


def transcoder_configurations(k: int) -> list[tuple[str, str, dict]]:
    """(name, trainer, spec extras) at TopK k: this project's transcoder and skip transcoder, and sparsify's, at
    its defaults and with AuxK as in stage 02."""
    auxk = {"auxk_alpha": 1 / 32, "dead_feature_threshold": window_tokens}
    return [
        ("saekit transcoder", "saekit", {"overrides": args + [f"--TOP_K={k}", "--TRAIN_TARGET=transcoder"]}),
        ("saekit skip transcoder", "saekit", {"overrides": args + [f"--TOP_K={k}", "--TRAIN_TARGET=skip_transcoder"]}),
        ("sparsify transcoder, defaults", "sparsify", {"transcode": True}),
        (f"sparsify transcoder, AuxK 1/32, dead window {window_tokens:,} tokens", "sparsify",
         {"transcode": True, **auxk}),
        ("sparsify skip transcoder, defaults", "sparsify", {"transcode": True, "skip_connection": True}),
        (f"sparsify skip transcoder, AuxK 1/32, dead window {window_tokens:,} tokens", "sparsify",
         {"transcode": True, "skip_connection": True, **auxk}),
    ]


def configurations(k: int) -> list[tuple[str, str, dict]]:
    """(name, trainer, spec extras) at TopK k; peers at defaults and at this run's size."""
    if transcoder:
        return transcoder_configurations(k)
    lr = settings.LR or scaled_lr(n_latents, settings.LR_BASE, k)  # stage 02's at this k
    return [
        ("saekit", "saekit", {"overrides": args + [f"--TOP_K={k}"]}),
        ("saekit BatchTopK", "saekit", {"overrides": args + [f"--TOP_K={k}", "--ARCHITECTURE=batchtopk"]}),
        ("saekit Matryoshka", "saekit", {"overrides": args + [f"--TOP_K={k}", "--ARCHITECTURE=matryoshka"]}),
        ("SAELens TopK, defaults", "saelens", {"architecture": "topk"}),
        (f"SAELens TopK, {matched}", "saelens", {"architecture": "topk", "lr": lr, "dead_feature_window": window_steps}),
        ("SAELens BatchTopK, defaults", "saelens", {"architecture": "batchtopk"}),
        (f"SAELens BatchTopK, {matched}", "saelens",
         {"architecture": "batchtopk", "lr": lr, "dead_feature_window": window_steps}),
        (f"SAELens Matryoshka, {matched}, stage 02's groups", "saelens",
         {"architecture": "matryoshka", "lr": lr, "dead_feature_window": window_steps, "matryoshka_widths": list(
             matryoshka_prefix_ends(n_latents, settings.MATRYOSHKA_GROUP_FRACTIONS))}),
        ("sparsify TopK, defaults", "sparsify", {}),
        (f"sparsify TopK, AuxK 1/32, dead window {window_tokens:,} tokens", "sparsify",
         {"auxk_alpha": 1 / 32, "dead_feature_threshold": window_tokens}),
    ]


rows = []
per_text = {}  # (trainer, k) -> its per-text CE sums (saekit.evaluation.splice.PerText)
paired_differences = []
with tempfile.TemporaryDirectory() as tmp:
    rows_file = Path(tmp) / "rows.npy"
    # exactly stage 02's training rows, as stored (a transcoder's: input and target side by side)
    np.save(rows_file, run.kept_rows(0, heldout_start, with_target=transcoder))

    def spec_for(extras: dict, k: int, out: Path) -> dict:
        return {"rows": str(rows_file), "out": str(out), "k": k, "d_sae": n_latents, "epochs": settings.EPOCHS,
                "batch": settings.BATCH_SIZE_TRAIN, "seed": settings.SEED, "d_in": d, "exclude_tokens": transcoder,
                **extras}

    if speed_repeats:  # stage 02 and the fastest peer only, alternately, each timed alone
        timings = []
        for repeat in range(speed_repeats):
            for name, trainer, extras in [c for c in configurations(k) if c[0] in speed_pair]:
                load_before = os.getloadavg()[0]
                trained = train(trainer, spec_for(extras, k, Path(tmp) / f"speed{len(timings)}"))
                timings.append({"trainer": name, "repeat": repeat, "train_seconds": trained["train_seconds"],
                                "tokens_per_s": trained["tokens"] / trained["train_seconds"], "load_before": load_before})
                print(table(timings[-1:], ["trainer", "repeat", "train_seconds", "tokens_per_s", "load_before"]), flush=True)
        median = {name: float(np.median([t["tokens_per_s"] for t in timings if t["trainer"] == name]))
                  for name in speed_pair}
        ratio = median[speed_pair[0]] / median[speed_pair[1]]
        print(f"stage 02 tokens/s vs sparsify at its defaults, medians of {speed_repeats}: {ratio:.3f}x")
        path = save_result(result_name if result_name != default_name else f"{default_name}_speed",
                           "python bench/bench_peers.py " + " ".join(sys.argv[1:]),
                           {"run_id": run.run_id, "train_tokens": train_tokens, "epochs": settings.EPOCHS, "k": k,
                            "median_tokens_per_s": median, "ratio": ratio, "timings": timings})
        print(f"wrote {path}")
        sys.exit(0)

    def measure(name: str, trainer: str, extras: dict, k: int) -> dict:
        out = Path(tmp) / f"sae{len(rows)}"
        spec = spec_for(extras, k, out)
        load_before = os.getloadavg()[0]
        trained = train(trainer, spec)
        scorer = load_trained(out)
        scorer_error = None
        if (out / "check.safetensors").exists():  # the library's own reconstruction of 512 rows
            check = load_file(out / "check.safetensors")
            with torch.no_grad():
                scorer_error = float((scorer(check["x"]) - check["x_hat"]).abs().max())
        heldout = evaluate(scorer, run, heldout_start, run.n_tokens).summary()
        splice = splice_metrics(model, tokenizer, spliced_at, texts, scorer, mean, settings.MAX_LENGTH,
                                batch_size=settings.BATCH_SIZE_SAVE, progress=False, keep_per_text=True, kept=kept,
                                input_layer=layer if transcoder else None)
        per_text[name, k] = splice.pop("per_text")  # for the paired differences below; not in the JSON
        probes = probing.score_sae(scorer, probe_data) if probe_data is not None else {}
        means = probes.get("mean") or {}
        row = {"trainer": name, "library": trainer, "kind": scorer.kind, "k": k, "heldout_fvu": heldout["fvu"],
               "l0": heldout["l0"],
               "dead_pct": 100 * heldout["dead_fraction"], "delta_ce": splice["delta_ce"],
               "recovered_vs_mean": splice["ce_recovered_vs_mean"], "kl": splice["kl_sae"],
               **{f"probe_k{j}": means.get(str(j)) for j in probing.KS},
               "sparse_probing": [{key: t[key] for key in ("task", "accuracy", "latents")} for t in probes.get("tasks", [])],
               "train_seconds": trained["train_seconds"], "tokens_per_s": trained["tokens"] / trained["train_seconds"],
               "load_before": load_before, "scorer_max_error": scorer_error, "heldout": heldout, "splice": splice,
               "settings": {key: v for key, v in trained.items() if key not in ("train_seconds", "tokens")} | {
                   "spec": {key: v for key, v in spec.items() if key not in ("rows", "out")}}}
        print(table([row], columns), flush=True)
        return row

    columns = TRANSCODER_COLUMNS if transcoder else COLUMNS
    probe_data = None if transcoder else probing.prepare(settings, run, heldout_start, model, tokenizer, layer,
                                                         progress=False)  # once for all
    if probe_data is not None:
        print(probing.summary_text(probe_data.summary()), flush=True)
    for name, trainer, extras in configurations(k):
        if trainer in only:
            rows.append(measure(name, trainer, extras, k))
    if frontier:  # at the other k: this project's two architectures and the two peers best at k
        best_peers = sorted((r for r in rows if r["library"] != "saekit"), key=lambda r: r["delta_ce"])[:2]
        for frontier_k in FRONTIER_K:
            configs = configurations(frontier_k)
            for name, trainer, extras in configs[:2] + [c for c in configs if c[0] in {r["trainer"] for r in best_peers}]:
                if trainer in only:
                    rows.append(measure(name, trainer, extras, frontier_k))

print(table(rows, columns))
ours = rows[0]
peers_at_k = [r for r in rows if r["library"] != "saekit" and r["k"] == k]
if ours["library"] == "saekit" and peers_at_k:
    fastest_peer = max(peers_at_k, key=lambda r: r["tokens_per_s"])
    print(f"stage 02 tokens/s vs the fastest peer ({fastest_peer['trainer']}): "
          f"{ours['tokens_per_s'] / fastest_peer['tokens_per_s']:.2f}x")
# per k, and per kind (SAE, transcoder, skip transcoder): like is compared with like
for row_k, kind in sorted({(r["k"], r["kind"]) for r in rows} if peers_at_k else ()):
    at_k = [r for r in rows if r["k"] == row_k and r["kind"] == kind]
    if {r["library"] == "saekit" for r in at_k} != {True, False}:
        continue
    best_ours = min((r for r in at_k if r["library"] == "saekit"), key=lambda r: r["delta_ce"])
    best_peer = min((r for r in at_k if r["library"] != "saekit"), key=lambda r: r["delta_ce"])
    # the two on the same texts: the difference text by text resolves what two separate intervals cannot
    paired = paired_difference(per_text[best_ours["trainer"], row_k], per_text[best_peer["trainer"], row_k])
    paired_differences.append({"k": row_k, "kind": kind, "a": best_ours["trainer"], "b": best_peer["trainer"],
                               "delta_ce": paired})
    print(f"k = {row_k}, {kind}: best here {best_ours['trainer']} ΔCE {best_ours['delta_ce']:.4f} "
          f"at L0 {best_ours['l0']:.2f}; "
          f"best peer {best_peer['trainer']} {best_peer['delta_ce']:.4f} at L0 {best_peer['l0']:.2f}; paired difference "
          f"{paired['difference']:+.4f} (95% CI {paired['ci95'][0]:+.4f} to {paired['ci95'][1]:+.4f} over texts)")
path = save_result(result_name, "python bench/bench_peers.py " + " ".join(sys.argv[1:]),
                   {"run_id": run.run_id, **measured_on(settings), "train_tokens": train_tokens,
                    "heldout_tokens": run.count_kept(heldout_start, run.n_tokens), "eval_texts": len(texts),
                    "epochs": settings.EPOCHS, "batch_size": settings.BATCH_SIZE_TRAIN, "n_latents": n_latents,
                    **({"target_signature": settings.target, "excluded_token_ids": sorted(kept)} if transcoder
                       else {"sparse_probing": probe_data.summary()}), "results": rows,
                    "paired_differences": paired_differences})
print(f"wrote {path}")
