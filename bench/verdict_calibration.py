"""Calibrate stage 03's verdict on SAEs known to be broken or working, in one run.

Each SAE is trained (or built) on the store's activations, then measured exactly as stage 03
measures it: held-out reconstruction and sparsity, how far the weights moved from their
initialisation, and CE with it spliced into the model, on the first EVAL_TEXTS evaluation texts
(100, as bench/ce_frontier.py and bench/bench_peers.py: the same texts stage 03 starts with).

    broken:  the untrained initialisation; the SAE after one pass over a tenth of the training
             documents (12 steps, still in warmup), TopK and Matryoshka; the seed's mi_crow recipe (96% dead)
    working: the default run (TopK 8); TopK 32; BatchTopK 8; Matryoshka 8

With --transcoders, transcoders instead (TRAIN_TARGET, on a store whose activation run holds the MLP's output
beside its input: stage 01 with --TRAIN_TARGET=transcoder), measured as stage 03 measures a transcoder:
held-out FVU of the target (the MLP's output), and CE and KL with the transcoder spliced in place of the MLP
(fed the MLP's input from the same forward pass; zero- and mean-ablation remove the MLP), EXCLUDE_TOKENS's
tokens left out of training and of the held-out figures and keeping the MLP's own output in the splice:

    broken:  the untrained transcoder (its decoder starts at zero: it predicts the target's mean); the
             transcoder after 12 steps (one pass over a tenth of the training documents)
    working: the default transcoder (TopK 8); the default skip transcoder

    .venv/bin/python bench/verdict_calibration.py                # ~8 minutes on 2 quiet cores
    .venv/bin/python bench/verdict_calibration.py --with-mi-crow # and mi_crow's recipe (+10 minutes)
    .venv/bin/python bench/verdict_calibration.py --cases=Matryoshka  # only the cases whose name holds it;
                                                  # their rows replace those of the same name in the results
    .venv/bin/python bench/verdict_calibration.py --transcoders --STORE_DIR=/tmp/tc_store  # the transcoders
                                                  # (~6 minutes on 2 cores); the SAE rows stay, and an SAE run
                                                  # keeps the transcoder rows

mi_crow's SaeTrainer takes batches of 32 (3,566 steps an epoch): its training is left out unless
asked for; bench/results/train.json holds its held-out figures from bench/bench_train.py, and
tests/test_verdict.py checks that they fail the verdict whatever its CE.

Writes bench/results/verdict_calibration.json: every figure of every check for each SAE, the verdict
that config.py's thresholds give it, and whether that is the expected one. tests/test_verdict.py
judges the recorded figures again with config.py's thresholds, so a threshold change that lets a
broken SAE pass, or fails a working one, fails the test suite.
"""
import json
import sys
from pathlib import Path

import torch

from common import save_result, table, timer
from history.mi_crow_recipe import MiCrowReconstruction, train_mi_crow

from saekit.activations.data import load_role_texts
from saekit.activations.models import load_model, resolve_layer
from saekit.activations.sources import training_sample
from saekit.activations.store import excluded_token_ids, open_run, role_token_ids
from saekit.base.distributed import World
from saekit.base.settings import load_settings
from saekit.evaluation import verdict
from saekit.evaluation.analysis import mean_training_activation, weight_change
from saekit.evaluation.splice import splice_metrics
from saekit.training.reconstruction import ReconstructionStats
from saekit.training.sae import TopKSAE
from saekit.training.train import (TrainConfig, _Trainer, evaluate, finish_training, geometric_median,
                                   prepare_training, target_width, train_sae)


def untrained(settings, run, heldout_start):
    """The initialisation train_sae starts from, folded to raw activations as a saved SAE is."""
    sample = training_sample(run, 0, heldout_start)
    scale = float(1 / sample.pow(2).sum(1).mean().sqrt())
    sae = TopKSAE(run.d_model, settings.N_LATENTS_MULTIPLIER * run.d_model, settings.TOP_K)
    sae.init_weights(geometric_median(sample * scale), torch.Generator().manual_seed(settings.SEED))
    sae.fold_input_scale(scale)
    init = {"W_enc": sae.W_enc.detach().clone(), "W_dec": sae.W_dec.detach().clone()}
    return sae.eval(), weight_change(sae, init), 0.0


def untrained_transcoder(settings, run, heldout_start):
    """The transcoder train_sae starts from (stage 02's own initialisation, on its training rows), folded to
    raw activations as a saved one is: its decoder is zero, so it predicts the target's mean."""
    cfg = TrainConfig.from_settings(settings)
    device = torch.device("cpu")
    start, source = prepare_training(run, {"": cfg}, None, device, World(), False)
    trainer = _Trainer(cfg, run.d_model, source.n_rows, device, World(), d_out=target_width(run, cfg))
    trainer.initialise(source.sample())
    sae, record = finish_training(trainer, run, start, source, [], None, World())
    return sae, weight_change(sae, record["init"]), 0.0


def ours(overrides):
    def build(settings, run, heldout_start):
        cfg = TrainConfig.from_settings(load_settings(sys.argv[1:] + overrides))
        with timer() as t:
            sae, record = train_sae(run, cfg, progress=False)
        return sae, weight_change(sae, record["init"]), t["seconds"]
    return build


def mi_crow(settings, run, heldout_start):
    engine, trained = train_mi_crow(settings, run, heldout_start)
    # mi_crow's trainer rebuilds its engine with fresh weights inside train(): the initialisation
    # is not kept, so the weight-movement checks are not measured (its dead latents fail it anyway)
    return MiCrowReconstruction(engine), None, trained["train_seconds"]


def heldout_summary(reconstruct, run, heldout_start: int, k: int, n_latents: int) -> dict:
    if isinstance(reconstruct, TopKSAE):
        return evaluate(reconstruct, run, heldout_start, run.n_tokens).summary()
    stats = ReconstructionStats(n_latents)  # mi_crow's engine: its dense codes' top k are the active latents
    with torch.no_grad():
        for chunk in run.iter_rows(heldout_start, run.n_tokens, 4096):
            x = torch.from_numpy(chunk)
            _, codes, x_hat = reconstruct.engine(x)
            values, indices = codes.topk(k, dim=1)
            stats.update(x, x_hat, values, indices)
    return stats.summary()


EVAL_TEXTS = 100
# (name, expected verdict, builder, setting overrides it is measured under)
CASES = [
    ("untrained initialisation", "FAIL", untrained, []),
    ("12 steps (one pass over a tenth of the documents)", "FAIL",
     ours(["--EPOCHS=1", "--HELDOUT_FRACTION=0.91"]), []),
    ("default (TopK 8)", "PASS", ours([]), []),
    ("TopK 32", "PASS", ours(["--TOP_K=32"]), ["--TOP_K=32"]),
    ("BatchTopK 8", "PASS", ours(["--ARCHITECTURE=batchtopk"]), ["--ARCHITECTURE=batchtopk"]),
    ("Matryoshka 8", "PASS", ours(["--ARCHITECTURE=matryoshka"]), ["--ARCHITECTURE=matryoshka"]),
    ("Matryoshka 8, 12 steps", "FAIL", ours(["--EPOCHS=1", "--HELDOUT_FRACTION=0.91", "--ARCHITECTURE=matryoshka"]),
     ["--ARCHITECTURE=matryoshka"]),
]
TRANSCODER = ["--TRAIN_TARGET=transcoder"]
SKIP = ["--TRAIN_TARGET=skip_transcoder"]
TWELVE_STEPS = ["--EPOCHS=1", "--HELDOUT_FRACTION=0.91"]
TRANSCODER_CASES = [
    ("transcoder: untrained initialisation", "FAIL", untrained_transcoder, TRANSCODER),
    ("transcoder: 12 steps (one pass over a tenth of the documents)", "FAIL", ours(TWELVE_STEPS + TRANSCODER),
     TRANSCODER),
    ("transcoder: default (TopK 8)", "PASS", ours(TRANSCODER), TRANSCODER),
    ("skip transcoder: default (TopK 8)", "PASS", ours(SKIP), SKIP),
]
command = "python bench/verdict_calibration.py " + " ".join(sys.argv[1:])
transcoders = "--transcoders" in sys.argv
if transcoders:
    sys.argv.remove("--transcoders")
    CASES = TRANSCODER_CASES
if "--with-mi-crow" in sys.argv:
    sys.argv.remove("--with-mi-crow")
    CASES.insert(2, ("seed's mi_crow recipe (batch 32, lr 1e-3, l1 1e-4)", "FAIL", mi_crow, []))
only = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--cases=")), None)
if only is not None:
    sys.argv = [a for a in sys.argv if not a.startswith("--cases=")]
    CASES = [case for case in CASES if only in case[0]]

base = load_settings(sys.argv[1:] + (TRANSCODER if transcoders else []))
run = open_run(base.store)
kept, target_layer = frozenset(), None
if transcoders:
    if not run.d_target:
        sys.exit(f"--transcoders: run {run.run_id} of {base.store} stores no target: run stage 01 with "
                 "--TRAIN_TARGET=transcoder (or pass --STORE_DIR of a store whose run does)")
    run.exclude_tokens(base.EXCLUDE_TOKENS)  # as stages 02 and 03 do
heldout_start = run.heldout_start(base.HELDOUT_FRACTION)
model, tokenizer = load_model(base.MODEL_ID, "cpu", cache_dir=base.store / "models")
layer = resolve_layer(model, base.LAYER_SIGNATURE)
if transcoders:  # spliced in place of the MLP, fed the MLP's input; excluded tokens keep the MLP's own output
    target_layer = resolve_layer(model, base.target, "TARGET_SIGNATURE")
    kept = excluded_token_ids(base.EXCLUDE_TOKENS, role_token_ids(tokenizer))
texts = load_role_texts(load_settings(sys.argv[1:] + [f"--EVAL_DATA_LIMIT={EVAL_TEXTS}"]), "eval")
seen = set(run.document_hashes().tolist())
eval_texts_in_training = sum(h in seen for h in texts.hashes())
mean = mean_training_activation(run, heldout_start, target=transcoders)  # a transcoder's: the MLP output's

COLUMNS = ["sae", "expected", "verdict", "fvu", "dead_pct", "l0", "delta_ce", "recovered_vs_mean", "kl",
           "w_enc_change", "w_dec_change"]
rows = []
for name, expected, build, overrides in CASES:
    settings = load_settings(sys.argv[1:] + overrides)
    torch.manual_seed(settings.SEED)
    reconstruct, weights, seconds = build(settings, run, heldout_start)
    heldout = heldout_summary(reconstruct, run, heldout_start, settings.TOP_K,
                              settings.N_LATENTS_MULTIPLIER * run.d_model)
    splice = splice_metrics(model, tokenizer, target_layer or layer, texts.texts, reconstruct, mean,
                            settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE, progress=False, kept=kept,
                            input_layer=layer if transcoders else None)
    if transcoders:  # as stage 03 words it (analysis.splice_report)
        splice["spliced_as"] = (f"with the {reconstruct.kind.replace('_', ' ')} spliced in place of {settings.target} "
                                f"(its output predicted from {settings.LAYER_SIGNATURE})")
    splice["eval_texts_in_training"] = eval_texts_in_training
    check_rows = verdict.checks(settings, settings.TOP_K, heldout, weights, splice, settings.ARCHITECTURE)
    got = "PASS" if verdict.passed(check_rows) else "FAIL"
    row = {"sae": name, "expected": expected, "verdict": got, "as_expected": got == expected, "k": settings.TOP_K,
           "architecture": settings.ARCHITECTURE, "train_target": settings.TRAIN_TARGET,
           **({"run_id": run.run_id, "eval_texts": len(texts), "target_signature": settings.target, "excluded_token_ids": sorted(kept)}
              if transcoders else {}),
           "train_seconds": seconds, "heldout": heldout, "weights": weights, "splice": splice, "checks": check_rows,
           "fvu": heldout["fvu"], "dead_pct": 100 * heldout["dead_fraction"], "l0": heldout["l0"],
           "delta_ce": splice["delta_ce"], "recovered_vs_mean": splice["ce_recovered_vs_mean"],
           "kl": splice["kl_sae"], "w_enc_change": weights and weights["W_enc"]["relative_change"],
           "w_dec_change": weights and weights["W_dec"]["relative_change"]}
    rows.append(row)
    print(table([row], COLUMNS), flush=True)

print(table(rows, COLUMNS))
thresholds = {key: getattr(base, key) for key in ("MAX_DEAD_FRACTION", "MAX_HELDOUT_FVU", "MIN_CE_RECOVERED",
                                                  "MAX_DELTA_CE", "MIN_WEIGHT_CHANGE")}
# Rows kept, as last measured, beside these: with --cases, every row of another name; a whole run of SAEs
# (or of transcoders) replaces every SAE row (or transcoder row) and keeps the other kind's, which are measured
# on another store.
last = Path(__file__).parent / "results" / "verdict_calibration.json"
previous = json.loads(last.read_text()) if last.exists() else {"results": []}
measured = {r["sae"] for r in rows}
others = [r for r in previous["results"] if r["sae"] not in measured  # rows before TRAIN_TARGET are SAEs'
          and (only is not None or (r.get("train_target", "sae") != "sae") != transcoders)]
if others:
    command = f"{previous['command']}; {command}"
rows = others + rows
run_ids = {"run_id": previous.get("run_id"), "transcoder_run_id": run.run_id} if transcoders else {
    "run_id": run.run_id, "transcoder_run_id": previous.get("transcoder_run_id")}
path = save_result("verdict_calibration", command,
                   {**run_ids, "eval_texts": len(texts), "thresholds": thresholds, "results": rows})
print(f"wrote {path}; every verdict as expected: {all(r['as_expected'] for r in rows)}")
