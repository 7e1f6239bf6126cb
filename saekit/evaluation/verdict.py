"""Stage 03's answer to "did training work?": checks with thresholds calibrated on SAEs known to be
broken or working (bench/verdict_calibration.py; figures in observations.md), the verdict written
from the run's own figures, and where the SAE sits on the measured ΔCE-vs-L0 frontier.

Whether training worked is a verdict; how good the SAE is, beyond working, is a comparison: the
frontier (bench/ce_frontier.py, bench/bench_peers.py) shows what other settings and trainers reach.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base.errors import PipelineError
from ..base.integrity import read_sealed_json
from ..training.sweep import CHOICE_FILE, chosen_name

FRONTIER_FILES = ("ce_frontier.json", "bench_peers.json")
# how far held-out mean L0 may be from k: TopK keeps exactly k; BatchTopK's inference threshold is
# an estimate from training (measured 1-3% off, observations.md), so it gets room; Matryoshka keeps
# the same threshold
L0_TOLERANCE = {"topk": 0.01, "batchtopk": 0.1, "matryoshka": 0.1}


def checks(settings, k: int | None, heldout: dict[str, float], weights: dict[str, dict[str, float]] | None,
           splice: dict[str, float], architecture: str = "topk") -> list[dict[str, Any]]:
    """Each check with its value, threshold, PASS/FAIL and what a failure means.

    `weights` is None for an SAE whose initialisation is unknown (one loaded from SAE_PATH): the
    two weight-movement checks are then left out, not passed; so is the L0 check for an SAE with
    no k (a JumpReLU SAE made elsewhere). TopK keeps exactly k latents a token; BatchTopK keeps k
    on average in training and, at inference, those above a threshold estimated in training, so
    its L0 may drift from k by up to L0_TOLERANCE.
    """
    rows = [("evaluation texts that stage 01 saw", splice["eval_texts_in_training"], "= 0",
             splice["eval_texts_in_training"] == 0, "the CE figures score texts the SAE was trained on")]
    if k is not None:
        tolerance = L0_TOLERANCE[architecture]
        rows.append(("L0 equals TOP_K" if architecture == "topk" else "mean L0 near TOP_K", heldout["l0"], f"= {k} (±{tolerance:.0%})", abs(heldout["l0"] - k) <= tolerance * k,
                     f"the SAE does not keep k latents per token{' on average' * (architecture != 'topk')}: "
                     "the encoder, its TopK or its threshold is broken"))
    rows += [
        ("dead latents (held-out)", heldout["dead_fraction"], f"<= {settings.MAX_DEAD_FRACTION}",
         heldout["dead_fraction"] <= settings.MAX_DEAD_FRACTION,
         "many latents never fire: training left them dead (the seed's mi_crow recipe leaves 96%)"),
        ("held-out FVU", heldout["fvu"], f"<= {settings.MAX_HELDOUT_FVU}", heldout["fvu"] <= settings.MAX_HELDOUT_FVU,
         "the reconstruction misses too much of the activations' variance"),
        ("CE-loss recovered vs mean-ablation", splice["ce_recovered_vs_mean"], f">= {settings.MIN_CE_RECOVERED}",
         None if ratio_uninformative(settings, splice) else splice["ce_recovered_vs_mean"] >= settings.MIN_CE_RECOVERED,
         "spliced in, the SAE costs the model a large share of what removing the layer costs"),
        ("delta CE (nats)", splice["delta_ce"], f"<= {settings.MAX_DELTA_CE}", splice["delta_ce"] <= settings.MAX_DELTA_CE,
         "spliced in, the SAE raises the model's next-token loss too much"),
    ]
    if weights is not None:
        for name in ("W_enc", "W_dec"):
            change = weights[name]["relative_change"]
            rows.append((f"{name} moved from its initialisation", change, f">= {settings.MIN_WEIGHT_CHANGE}",
                         change >= settings.MIN_WEIGHT_CHANGE, "the weights barely moved: training hardly ran"))
    return [{"check": name, "value": float(value), "threshold": threshold,
             "result": NOT_JUDGED if ok is None else "PASS" if ok else "FAIL", "if_failed": meaning}
            for name, value, threshold, ok, meaning in rows]


NOT_JUDGED = "N/A"


def ablation_cost(splice: dict[str, float]) -> float:
    """What mean-ablating the layer costs the model, in nats: the denominator of "CE recovered"."""
    return splice["ce_mean"] - splice["ce_clean"]


def ratio_uninformative(settings, splice: dict[str, float]) -> bool:
    """Whether "CE recovered" says nothing: mean-ablating the layer costs no more than the ΔCE the
    verdict tolerates anyway (MAX_DELTA_CE), or lowers the loss. Then an SAE could cost more than
    removing the layer and still be within the ΔCE bound, and the ratio swings wildly (a random
    GPT-2 block: -578% of 0.000 nats; a Qwen2 block whose ablation lowered the loss: 106%), so the
    verdict is left to ΔCE and KL."""
    return ablation_cost(splice) <= settings.MAX_DELTA_CE


def passed(check_rows: list[dict[str, Any]]) -> bool:
    """No check failed (a check not judged, such as an uninformative ratio, does not count)."""
    return all(c["result"] != "FAIL" for c in check_rows)


def verdict_text(check_rows: list[dict[str, Any]], heldout: dict[str, float], splice: dict[str, float],
                 k: int | None) -> str:
    """The verdict in words, every figure taken from this run."""
    cost = ablation_cost(splice)
    # a transcoder replaces an MLP: its splice, and what the ablations remove, are the MLP's (analysis.splice_report)
    spliced, layer = (splice["spliced_as"], "MLP") if "spliced_as" in splice else ("spliced into the model", "layer")
    ratio = next((c for c in check_rows if c["check"].startswith("CE-loss recovered")), None)
    if ratio is not None and ratio["result"] == NOT_JUDGED:
        recovered = (f"CE recovered not judged: mean-ablating the {layer} costs {cost:.4f} nats, within the ΔCE the "
                     f"verdict tolerates, so the ratio ({splice['ce_recovered_vs_mean']:.1%}) means nothing here; "
                     f"judged by ΔCE and KL (KL {splice.get('kl_sae', float('nan')):.4f} nats, "
                     f"{splice.get('kl_mean', float('nan')):.4f} mean-ablated)")
    else:
        recovered = (f"{splice['ce_recovered_vs_mean']:.1%}{_interval_text(splice, 'ce_recovered_vs_mean', '.1%')} of "
                     f"the mean-ablation loss recovered (mean-ablating the {layer} costs {cost:.3f} nats)")
    # two sets of held-out tokens: stage 02's rows of the activation run, and the evaluation texts
    heldout_set = f" on {heldout['token_set']}" if "token_set" in heldout else " on stage 02's held-out tokens"
    eval_set = f" on {splice['n_texts']} evaluation texts" if "n_texts" in splice else ""
    of_target = " of the MLP's output" if layer == "MLP" else ""
    figures = (f"held-out FVU{of_target} {heldout['fvu']:.3f}, L0 {heldout['l0']:.2f} (k = {k}), "
               f"{heldout['dead_fraction']:.2%} of latents dead{heldout_set}; {spliced}{eval_set} ΔCE "
               f"{splice['delta_ce']:.4f} nats{_interval_text(splice, 'delta_ce')}, {recovered}")
    failed = [c for c in check_rows if c["result"] == "FAIL"]
    if not failed:
        return f"PASS: training worked. {figures}."
    reasons = "; ".join(f"{c['check']} {c['value']:.4g} (needs {c['threshold']}): {c['if_failed']}" for c in failed)
    return f"FAIL: {reasons}. Figures: {figures}."


MORE_TRAINING = "train on more tokens (DATA_LIMIT, EPOCHS) or keep more latents a token (TOP_K), then rerun 02 and 03"
# what to try when a check fails, by the first words of the check's name
WHAT_TO_TRY = {
    "evaluation texts that stage 01 saw": "evaluate on texts stage 01 did not read: an EVAL_DATASET of other texts, "
                                          "or the EVAL_SPLIT and EVAL_SHARE that stage 01 ran with",
    "L0": "no setting fixes it: the SAE file is not the one stage 02 trained, or its encoder is broken; rerun stage 02",
    "mean L0": "no setting fixes it: the SAE file is not the one stage 02 trained, or its threshold is broken; "
               "rerun stage 02",
    "dead latents": "train on more tokens (DATA_LIMIT, EPOCHS), raise AUXK_COEF (the loss that revives dead latents), "
                    "or use fewer latents (N_LATENTS_MULTIPLIER); then rerun 02 and 03",
    "held-out FVU": MORE_TRAINING,
    "CE-loss recovered": MORE_TRAINING,
    "delta CE": MORE_TRAINING,
    "W_enc moved": "training hardly ran: raise EPOCHS or DATA_LIMIT (LR = 0 picks the learning rate from the SAE's size)",
    "W_dec moved": "training hardly ran: raise EPOCHS or DATA_LIMIT (LR = 0 picks the learning rate from the SAE's size)",
}


def what_to_try(check: dict[str, Any]) -> str:
    return next(advice for start, advice in WHAT_TO_TRY.items() if check["check"].startswith(start))


def terminal_lines(report: dict[str, Any]) -> list[str]:
    """Stage 03's last lines in the terminal (from store/analysis.json): the verdict, and each failing
    check with what to try."""
    failed = [c for c in report["checks"] if c["result"] == "FAIL"]
    if not failed:
        return [f"stage 03 verdict: PASS ({len(report['checks'])} checks, store/analysis.json): training worked"]
    return [f"stage 03 verdict: FAIL, {len(failed)} of {len(report['checks'])} checks (store/analysis.json); stages 04 "
            "and 05 stop unless --CONTINUE_AFTER_FAIL=True",
            *(f"  FAIL {c['check']}: {c['value']:.4g}, needs {c['threshold']} ({c['if_failed']}). Try: {what_to_try(c)}"
              for c in failed)]


class VerdictFailedError(PipelineError):
    pass


def require_passed(settings) -> None:
    """Stages 04 and 05 stop here, with one line, when stage 03 judged this store's SAE a FAIL and
    CONTINUE_AFTER_FAIL is False: the concepts of an SAE that did not train are not worth naming.
    A store that stage 03 has not analysed goes on."""
    path = settings.store / "analysis.json"
    if settings.CONTINUE_AFTER_FAIL:
        return
    choice = settings.store / CHOICE_FILE
    if settings.SWEEP and choice.is_file():  # SWEEP_CHOICE may name another SAE than analysis.json's: its own verdict
        name = chosen_name(settings)
        row = next((r for r in read_sealed_json(choice, "Run stage 03 again.")["table"] if r["name"] == name), None)
        if row is not None:
            if row["verdict"] == "FAIL":
                raise VerdictFailedError(f"stage 03 judged SWEEP's {name!r} a FAIL ({', '.join(row['failed_checks'])}; "
                                         f"store/{CHOICE_FILE} compares the sweep). Choose another with SWEEP_CHOICE, "
                                         "or run this stage anyway with --CONTINUE_AFTER_FAIL=True")
            return
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    if not report.get("passed", True):
        failed = ", ".join(c["check"] for c in report["checks"] if c["result"] == "FAIL")
        raise VerdictFailedError(f"stage 03 judged this SAE a FAIL ({failed}; store/analysis.json says what to try). "
                                 "Retrain it, or run this stage anyway with --CONTINUE_AFTER_FAIL=True")


# What the benchmark results that record no model were measured on: bench/ce_frontier.py and
# bench/bench_peers.py ran on the demo's defaults (SmolLM2-135M, block 15's post_attention_layernorm).
DEMO_MEASURED_ON = {"model_id": "embedded", "layer_signature": "llamaforcausallm_model_layers_15_post_attention_layernorm",
                    "dataset": "embedded"}


def measured_on(settings) -> dict[str, str]:
    """The model, layer and evaluation texts a benchmark result was measured on, for its JSON."""
    return {"model_id": settings.MODEL_ID, "layer_signature": settings.LAYER_SIGNATURE,
            "dataset": settings.EVAL_DATASET or settings.HF_DATASET}


def load_frontier(results_dir: str | Path) -> list[dict[str, Any]]:
    """Measured (trainer, k, L0, ΔCE, CE recovered) points from the benchmark results present.

    Rows come from bench/results/bench_peers.json (this project, SAELens and sparsify at k = 8..64)
    and ce_frontier.json (this project at other settings); rows that recorded no L0 are left out.
    Each point keeps the activation run it was measured on.
    """
    points = []
    for name in FRONTIER_FILES:
        path = Path(results_dir) / name
        if not path.exists():
            continue
        blob = json.loads(path.read_text())
        for row in blob.get("results", []):
            if "l0" not in row or "delta_ce" not in row:
                continue
            points.append({"trainer": row.get("trainer", "saekit"), "setting": row.get("overrides", row.get("setting", "")),
                           "l0": row["l0"], "delta_ce": row["delta_ce"], "ce_recovered_vs_mean": row["recovered_vs_mean"],
                           "heldout_fvu": row["heldout_fvu"], "run_id": blob.get("run_id"), "source": name,
                           **{key: blob.get(key, default) for key, default in DEMO_MEASURED_ON.items()}})
    return points


def same_model_and_layer(points: list[dict[str, Any]], model_id: str, layer_signature: str) -> list[dict[str, Any]]:
    """The frontier points measured on this model and layer: ΔCE on another model or layer says nothing
    about this SAE (a random GPT-2 block's 0.0005 would be "best" of all)."""
    return [p for p in points if p["model_id"] == model_id and p["layer_signature"] == layer_signature]


def frontier_position(points: list[dict[str, Any]], l0: float, delta_ce: float, model_id: str | None = None,
                      layer_signature: str | None = None, dataset: str | None = None) -> str:
    """Where (L0, ΔCE) sits against the best measured ΔCE of each trainer at the nearest L0, among the
    points measured on `model_id` and `layer_signature` (when given); says so when all were measured
    on another model or layer, and when on other texts."""
    if not points:
        return ("No frontier measured yet: run bench/ce_frontier.py and bench/bench_peers.py (make bench-peers) "
                "to compare this SAE with other settings and trainers.")
    if model_id is not None and layer_signature is not None:
        comparable = same_model_and_layer(points, model_id, layer_signature)
        if not comparable:
            elsewhere = sorted({f"{p['model_id']} at {p['layer_signature']}" for p in points})
            return (f"Not placed on the benchmark frontier: it was measured on another model or layer "
                    f"({'; '.join(elsewhere)}), and this SAE reads {model_id} at {layer_signature}. ΔCE on different "
                    f"models does not compare. This SAE: ΔCE {delta_ce:.4f} nats at L0 {l0:.1f}. To place it, run "
                    "bench/ce_frontier.py or bench/bench_peers.py with this run's MODEL_ID and LAYER_SIGNATURE.")
        points = comparable
    nearest_l0 = min({p["l0"] for p in points}, key=lambda v: abs(v - l0))
    near = [p for p in points if abs(p["l0"] - nearest_l0) <= 0.02 * nearest_l0]
    best: dict[str, dict[str, Any]] = {}
    for p in near:
        if p["trainer"] not in best or p["delta_ce"] < best[p["trainer"]]["delta_ce"]:
            best[p["trainer"]] = p
    listed = ", ".join(f"{t} {p['delta_ce']:.4f}" for t, p in sorted(best.items(), key=lambda kv: kv[1]["delta_ce"]))
    runs = sorted({p["run_id"] for p in near if p["run_id"]})
    datasets = sorted({p["dataset"] for p in near})
    texts = ("the same texts" if dataset is not None and datasets == [dataset]
             else f"the evaluation texts of {', '.join(datasets)}" + (f", not this run's {dataset}" if dataset else ""))
    return (f"This SAE: ΔCE {delta_ce:.4f} nats at L0 {l0:.1f}. Best measured at L0 {nearest_l0:.0f}: {listed} "
            f"(measured on {near[0]['model_id']} at {near[0]['layer_signature']}, benchmark activations "
            f"{', '.join(runs)}, on {texts}; compare with care when this run used other activations or texts).")


def _interval_text(splice: dict[str, Any], figure: str, fmt: str = ".4f") -> str:
    """ " (95% CI a-b)" from the splice's bootstrap over texts; "" for figures measured without one."""
    if f"{figure}_ci95" not in splice:
        return ""
    low, high = splice[f"{figure}_ci95"]
    return f" (95% CI {low:{fmt}}-{high:{fmt}} over texts)"
