"""Stage 03's time part by part, on a trained store (the demo's by default), with the splice and the
probing before and after, in one run: the old splice is the code of commit OLD_SPLICE (the whole model
for each variant, batches in the texts' order), loaded from git, and its figures are compared with
the new ones on the same texts; the old probing embeds its evaluation texts again, the new one takes
the splice's rows of them, and the two results are compared. With --notebook, the whole stage too,
headless, on a copy of the store.

    .venv/bin/python bench/bench_stage03.py [--STORE_DIR=/work/demo_store] [--notebook] [--out=FOLDER]

The splice after is counted by torch's FlopCounterMode: its floating-point operations over this
machine's float32 matmul rate, measured in the same run on the model's own MLP shape, are the time
no float32 implementation of the same figures goes under here (`splice_floor_seconds`). The probing
before is the code of commit OLD_PROBING (the Newton step's Hessian in float64, the evaluation texts
embedded again).

It only reads the store (the notebook runs on a copy). Results: bench/results/local/stage03.json
unless --out says otherwise.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import ROOT, dense_fp32_gflops, save_result, table, timer

from saekit.base.settings import load_settings
from saekit.evaluation import analysis, probing, verdict

OLD_SPLICE = "616bd1a"  # the last commit with the plain splice (the whole model four times per batch, unsorted)
OLD_PROBING = "d902bc8"  # the last commit whose probes make and solve their Newton Hessian in float64
FIGURES = ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean", "delta_ce",
           "ce_recovered_vs_zero", "ce_recovered_vs_mean")


def old_module(commit: str, name: str) -> types.ModuleType:
    """saekit.evaluation.<name> as it was at `commit`, from git: a 'before' of this bench, run here."""
    source = subprocess.run(["git", "show", f"{commit}:saekit/evaluation/{name}.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"saekit.evaluation.{name}_old")
    module.__package__ = "saekit.evaluation"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{name}_old.py", "exec"), module.__dict__)  # the project's own past code
    return module



def main() -> None:
    args = sys.argv[1:]
    notebook = "--notebook" in args
    args = [a for a in args if a != "--notebook"]
    if not any(a.startswith("--STORE_DIR=") for a in args):
        args.append("--STORE_DIR=/work/demo_store")
    settings = load_settings(args)
    parts = []

    def part(name, fn):
        with timer() as t:
            value = fn()
        parts.append({"part": name, "seconds": t["seconds"]})
        print(f"{name}: {t['seconds']:.1f} s", flush=True)
        return value

    trained = part("load the SAE and the store", lambda: analysis.load_trained_sae(settings))
    heldout = part("held-out tokens (FVU, L0, dead)", lambda: analysis.heldout_tokens(trained))
    loaded = part("load the model", lambda: analysis.load_layer_model(settings))
    before = part("splice before (whole model per variant, unsorted)",
                  lambda: old_run(old_module(OLD_SPLICE, "splice").splice_metrics, settings, trained, loaded))
    counter = FlopCounterMode(display=False)
    with counter:
        after = part("splice after (fast, length-sorted)",
                     lambda: analysis.splice_report(settings, trained, progress=False, loaded=loaded))
    config = loaded.model.config
    gemm = dense_fp32_gflops(4096, config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size))
    splice_flops = counter.get_total_flops()
    rows, loaded.evaluation_rows = loaded.evaluation_rows, {}
    probes_before = part("sparse probing before (float64 Hessians; its evaluation texts embedded again)",
                         lambda: old_module(OLD_PROBING, "probing").sparse_probing(settings, trained, progress=False,
                                                                                   loaded=loaded))
    loaded.evaluation_rows = rows
    probes = part("sparse probing after (on the splice's rows)",
                  lambda: probing.sparse_probing(settings, trained, progress=False, loaded=loaded))
    part("verdict", lambda: verdict.checks(settings, trained.sae.k, heldout["summary"],
                                           analysis.weight_report(trained), after, trained.sae.architecture))
    differences = {name: abs(after[name] - before[name]) for name in FIGURES}
    result = {"store": str(settings.store), "n_texts": after["n_texts"], "parts": parts,
              "splice_speedup": parts[3]["seconds"] / parts[4]["seconds"],
              "probing_speedup": parts[5]["seconds"] / parts[6]["seconds"],
              "probing_identical": probes == probes_before,
              "largest_figure_difference": max(differences.values()), "figure_differences": differences,
              "splice_tflop": splice_flops / 1e12, "matmul_gflops": gemm,
              "splice_gflops": splice_flops / 1e9 / parts[4]["seconds"],
              "splice_floor_seconds": splice_flops / 1e9 / gemm,
              "probing": {k: probes.get(k) for k in ("n_train", "n_test", "train_source", "test_source") if k in probes},
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if notebook:
        result["notebook_seconds"] = run_notebook_on_copy(settings.store, args)
    print(table(parts, ["part", "seconds"]))
    print(f"probing speed-up {result['probing_speedup']:.2f}x, the same result: {result['probing_identical']}")
    print(f"splice after: {result['splice_tflop']:.1f} TFLOP at {result['splice_gflops']:.0f} GFLOP/s; this machine's "
          f"float32 matmul {gemm:.0f} GFLOP/s, so no float32 splice of these texts goes under "
          f"{result['splice_floor_seconds']:.0f} s here")
    print(f"splice speed-up {result['splice_speedup']:.2f}x; largest |after - before| over the CE/KL figures "
          f"{result['largest_figure_difference']:.2e}; load average {result['load_average'][0]:.2f}")
    if notebook:
        print(f"stage 03 headless, whole: {result['notebook_seconds']:.1f} s")
    print(f"wrote {save_result('stage03', 'python bench/bench_stage03.py ' + ' '.join(sys.argv[1:]), result)}")


def old_run(old_splice, settings, trained, loaded):
    texts = analysis.load_role_texts(settings, "eval")
    return old_splice(loaded.model, loaded.tokenizer, loaded.layer, texts.texts, trained.sae.to(loaded.device),
                      analysis.mean_training_activation(trained.run, trained.heldout_start), settings.MAX_LENGTH,
                      batch_size=settings.BATCH_SIZE_SAVE, progress=False)


def run_notebook_on_copy(store, args) -> float:
    """Seconds of `python -m saekit.notebooks 03_analyze_training.ipynb` on a copy of the store, as a user runs it."""
    with tempfile.TemporaryDirectory() as folder:
        copy = shutil.copytree(store, f"{folder}/store")
        command = [sys.executable, "-m", "saekit.notebooks", "03_analyze_training.ipynb",
                   *[a for a in args if not a.startswith("--STORE_DIR=")], f"--STORE_DIR={copy}"]
        with timer() as t:
            subprocess.run(command, cwd=ROOT, check=True)
        return t["seconds"]


if __name__ == "__main__":
    main()
