"""EXCLUDE_TOKENS on the embedded model: how far BOS rows stand out, and what leaving them out does to the
held-out FVU and ΔCE, at the demo's layer (block 15's post_attention_layernorm, a norm's output) and at a
residual-stream layer (block 15's output).

    .venv/bin/python bench/bench_exclude_tokens.py [--DATA_LIMIT=400 --EPOCHS=5 ...]

For each layer: stage 01 once, then stage 02 and stage 03's held-out FVU and splice (ΔCE) with
EXCLUDE_TOKENS=[] (every row) and the default (BOS and padding). Writes bench/results/exclude_tokens.json.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, save_result

from saekit.activations.store import open_run  # noqa: E402
from saekit.base.settings import load_settings  # noqa: E402
from saekit.evaluation import analysis  # noqa: E402

LAYERS = {"block 15 output (residual stream)": "llamaforcausallm_model_layers_15",
          "demo layer (norm output)": "llamaforcausallm_model_layers_15_post_attention_layernorm"}
MODES = {"every row": "[]", "BOS and padding left out": "['bos', 'pad']"}


def stage(script: str, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-3000:]}")


def bos_norms(store: Path) -> dict[str, float]:
    run = open_run(store)
    ids = run.tokens()[:, 0]
    norms = np.linalg.norm(run.rows(0, run.n_tokens), axis=1)
    bos = ids == run.meta["tokenizer"]["bos_token_id"]
    return {"bos_norm_mean": float(norms[bos].mean()), "other_norm_mean": float(norms[~bos].mean()),
            "ratio": float(norms[bos].mean() / norms[~bos].mean()), "bos_rows": int(bos.sum()),
            "other_rows": int((~bos).sum()), "bos_share_of_sum_sq": float((norms[bos] ** 2).sum() / (norms ** 2).sum())}


def main(extra: list[str]) -> None:
    # the de-quantized embedded model, copied rather than made again (EMBEDDED_CACHE: another store's models/)
    cache = Path(os.environ.get("EMBEDDED_CACHE", ROOT / "store" / "models"))
    results = {"layers": {}}
    for name, layer in LAYERS.items():
        store = Path(tempfile.mkdtemp(prefix="exclude_tokens_"))
        if cache.is_dir():
            shutil.copytree(cache, store / "models")
        args = [f"--STORE_DIR={store}", f"--LAYER_SIGNATURE={layer}", *extra]
        stage("01_save_activations.py", args)
        entry = {"layer_signature": layer, **bos_norms(store)}
        print(name, entry, flush=True)
        for mode, value in MODES.items():
            mode_args = [*args, f"--EXCLUDE_TOKENS={value}"]
            stage("02_train_sae.py", mode_args)
            settings = load_settings(mode_args)
            trained = analysis.load_trained_sae(settings)
            # both SAEs scored the same way: held-out FVU on every row and without BOS, ΔCE with BOS spliced or kept
            scores = {}
            for scored, scored_value in MODES.items():
                scored_settings = load_settings([*args, f"--EXCLUDE_TOKENS={scored_value}"])
                trained.run.exclude_tokens(scored_settings.EXCLUDE_TOKENS)
                summary = analysis.heldout_tokens(trained)["summary"]
                splice = analysis.splice_report(scored_settings, trained, progress=False)
                scores[f"scored on: {scored}"] = {"heldout_fvu": summary["fvu"], "heldout_l0": summary["l0"],
                                                  "delta_ce": splice["delta_ce"],
                                                  "ce_recovered_vs_mean": splice["ce_recovered_vs_mean"]}
            entry[f"trained on: {mode}"] = scores
            print(name, mode, scores, flush=True)
        results["layers"][name] = entry
        shutil.rmtree(store, ignore_errors=True)
        # after each layer, so that a long run leaves what it measured
        print(save_result("exclude_tokens", " ".join(["bench/bench_exclude_tokens.py", *extra]), results))


if __name__ == "__main__":
    main(sys.argv[1:])
