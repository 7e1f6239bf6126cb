"""Stage 03 with SWEEP: every SAE of the sweep scored on the same held-out rows and evaluation texts,
judged by the verdict, and one of them chosen for stages 04-05.

The rule, unless SWEEP_CHOICE names one: among the SAEs that pass the verdict (all of them when none
does), take the lowest ΔCE; of the SAEs that the evaluation texts cannot tell from it (their paired ΔCE
difference from it, over the same texts, has a 95% bootstrap interval reaching 0), choose the one with
the smallest held-out L0, the lower ΔCE breaking a tie. A sparser SAE that the texts cannot tell from
the best is the one worth interpreting. The difference is paired because every SAE is scored on the
same texts: text-to-text spread, which moves all SAEs alike, cancels, so the paired interval is the
one that says whether two SAEs differ (issue 31).
"""
from __future__ import annotations

from typing import Any

from ..base.errors import PipelineError
from ..base.integrity import write_sealed_json
from ..base.settings import Settings
from ..training.sweep import CHOICE_FILE, sweep_variants
from ..training.train import evaluate
from .analysis import LayerModel, load_trained_sae, splice_report, weight_report
from .splice import paired_difference
from .verdict import checks, passed

RULE = ("of the SAEs that pass the verdict (all, when none does), the one with the smallest held-out L0 whose ΔCE the "
        "evaluation texts cannot tell from the lowest (the paired difference's 95% interval reaches 0)")


def compare_sweep(settings: Settings, loaded: LayerModel, progress: bool = True) -> list[dict[str, Any]]:
    """One row per SAE of the sweep: held-out FVU, L0 and dead latents (stage 02's held-out rows, the
    same for all), ΔCE with its 95% interval and CE recovered (the same evaluation texts), the verdict,
    and `delta_ce_minus`: its ΔCE minus each other SAE's on the same texts, [difference, 95% low, high]."""
    rows, heldout, per_text = [], None, {}
    for variant in sweep_variants(settings):
        trained = load_trained_sae(settings, variant.name)
        trained_as = trained.history.get("config", {})
        wanted = {"architecture": variant.cfg.architecture, "k": variant.cfg.k,
                  "n_latents_multiplier": variant.cfg.n_latents_multiplier, "lr": variant.cfg.lr}
        if {key: trained_as.get(key) for key in wanted} != wanted:
            raise PipelineError(f"store/sweep/{variant.name} was trained with other settings than SWEEP's entry "
                                f"({ {key: trained_as.get(key) for key in wanted} }, SWEEP: {wanted}): run stage 02 "
                                "again with this SWEEP")
        where = (trained.run.run_id, trained.heldout_start)
        if heldout not in (None, where):
            raise PipelineError(f"the SAEs of the sweep were trained on different activations ({heldout} and {where}): "
                                "run stage 02 again, so that they are scored on the same held-out rows")
        heldout = where
        summary = evaluate(trained.sae, trained.run, trained.heldout_start, trained.run.n_tokens).summary()
        splice = splice_report(settings, trained, progress=False, loaded=loaded, keep_per_text=True)
        per_text[variant.name] = splice.pop("per_text")
        verdict = checks(settings, trained.sae.k, summary, weight_report(trained), splice, trained.sae.architecture)
        rows.append({"name": variant.name, "architecture": trained.sae.architecture, "k": trained.sae.k,
                     "n_latents": trained.sae.n_latents, "l0": summary["l0"], "fvu": summary["fvu"],
                     "dead_fraction": summary["dead_fraction"], "delta_ce": splice["delta_ce"],
                     "delta_ce_ci95": list(splice["delta_ce_ci95"]), "ce_recovered_vs_mean": splice["ce_recovered_vs_mean"],
                     "verdict": "PASS" if passed(verdict) else "FAIL",
                     "failed_checks": [c["check"] for c in verdict if c["result"] == "FAIL"],
                     "sae_id": trained.meta["sae_id"]})
        if progress:
            print(f"{variant.name}: L0 {summary['l0']:.2f}, FVU {summary['fvu']:.4f}, ΔCE {splice['delta_ce']:.4f}, "
                  f"{rows[-1]['verdict']}")
    for row in rows:
        row["delta_ce_minus"] = {}
    for i, row in enumerate(rows):
        for other in rows[i + 1:]:
            # the bootstrap draws the same texts for every pair, so b - a is a - b negated: one pass a pair
            paired = paired_difference(per_text[row["name"]], per_text[other["name"]])
            low, high = paired["ci95"]
            row["delta_ce_minus"][other["name"]] = [paired["difference"], low, high]
            other["delta_ce_minus"][row["name"]] = [-paired["difference"], -high, -low]
    return rows


def choose(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The SAE the rule (module docstring) picks, and why, in words with the figures."""
    pool = [r for r in rows if r["verdict"] == "PASS"]
    among = f"{len(pool)} of {len(rows)} SAEs pass the verdict" if pool else "no SAE passes the verdict, so all compete"
    pool = pool or rows
    best = min(pool, key=lambda r: r["delta_ce"])
    near = [r for r in pool if r is best or r["delta_ce_minus"][best["name"]][1] <= 0]
    chosen = min(near, key=lambda r: (r["l0"], r["delta_ce"]))
    others = [f"{r['name']} {r['delta_ce_minus'][best['name']][0]:+.4f} (95% CI {r['delta_ce_minus'][best['name']][1]:+.4f}"
              f" to {r['delta_ce_minus'][best['name']][2]:+.4f})" for r in near if r is not best]
    why = (f"{among}; the lowest ΔCE is {best['name']}'s, {best['delta_ce']:.4f}; the texts cannot tell from it "
           f"{', '.join(others) if others else 'no other'} (ΔCE minus its, paired over the same texts); the smallest "
           f"L0 of these: {chosen['name']} (L0 {chosen['l0']:.2f}, ΔCE {chosen['delta_ce']:.4f})")
    return chosen["name"], why


def write_choice(settings: Settings, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """store/sweep_choice.json: the table, the rule's pick and the SAE stages 04-05 read (SWEEP_CHOICE
    where set, else the rule's)."""
    picked, why = choose(rows)
    chosen = settings.SWEEP_CHOICE or picked
    how = f"SWEEP_CHOICE={chosen!r} (the rule would pick {picked!r})" if settings.SWEEP_CHOICE else f"the rule: {why}"
    payload = {"chosen": chosen, "how": how, "rule": RULE, "rule_pick": picked, "table": rows}
    write_sealed_json(settings.store / CHOICE_FILE, payload)
    return payload
