"""Training on the fly (ACTIVATION_SOURCE = "model") against the cached flow (stage 01 saves every
token, stage 02 trains on them), on the same texts, one epoch each, every stage a fresh process.

- embedded: the demo's model and texts. Speed: the whole on-the-fly flow (stage 01 counting the
  texts and saving the held-out ones, then stage 02 embedding and training) against stage 01 of the
  cached flow alone, since the forward is the cost. Quality: held-out FVU and ΔCE (on EVAL_TEXTS
  evaluation texts) of one on-the-fly epoch against one cached epoch, the on-the-fly one through a
  buffer of BUFFER_TOKENS (a quarter of the epoch, so the buffer's mixing is what is measured; the
  cached epoch is one full shuffle), over SEEDS seeds, since one seed's ΔCE moves by a few percent.
- random: bench_scale.py's random 1-block Llama (d = 576) on SMALL and LARGE tokens of random text.
  Speed: on the fly against stage 01 plus stage 02 run back to back; peak RSS of stage 02 on the fly
  at both sizes; disk written by each flow.

    .venv/bin/python bench/bench_online.py [--parts=embedded,random] [--seeds=3] [--small=500000] [--large=5000000]

Writes bench/results/online.json (online_<part>.json for one part).
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save_result, table

BUFFER_TOKENS = 32768
EVAL_TEXTS = 100
RANDOM_LAYER = "llamaforcausallm_model_layers_0_post_attention_layernorm"


def child(out: str, script: str, args: list[str]) -> None:
    """Run a stage script as a user would, in this process, and record its peak RSS."""
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    Path(out).write_text(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss
    across execve, so a child would report its parent's peak (here ~4 GB after the ΔCE splices)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage(script: str, args: list[str]) -> dict:
    """Seconds (the whole process, start-up included) and peak RSS of one stage run."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", out.name, script, *args], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        seconds = time.perf_counter() - started
        if proc.returncode:
            sys.exit(f"{script} {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return {"seconds": seconds, **json.loads(Path(out.name).read_text())}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def flow(source: str, args: list[str], store: Path) -> dict:
    """Stage 01 then one epoch of stage 02 with `source`; times, memory, disk and the run's counts."""
    from saekit.activations.store import open_run
    from saekit.base.integrity import read_sealed_json

    args = [*args, f"--STORE_DIR={store}", f"--ACTIVATION_SOURCE={source}", "--EPOCHS=1"]
    s01 = stage("01_save_activations.py", args)
    s02 = stage("02_train_sae.py", args)
    run = open_run(store)
    history = read_sealed_json(store / "training_history.json", "")
    return {"source": source, "seconds_01": s01["seconds"], "seconds_02": s02["seconds"],
            "peak_rss_mb_02": s02["peak_rss_mb"], "run_bytes": folder_bytes(run.path),
            "tokens_embedded": run.n_tokens + run.meta.get("training_tokens", 0),
            "train_tokens": history["history"][-1]["train_tokens"], "heldout_tokens": run.n_tokens - history["heldout_start_row"],
            "heldout_fvu": history["history"][-1]["heldout_fvu"], "train_tokens_per_s_02": history["history"][-1]["tokens_per_s"]}


def delta_ce(store: Path, settings_args: list[str]) -> float:
    from saekit.activations.data import load_texts
    from saekit.activations.models import load_model, resolve_layer
    from saekit.activations.store import open_run
    from saekit.base.settings import load_settings
    from saekit.evaluation.analysis import mean_training_activation
    from saekit.evaluation.splice import splice_metrics
    from saekit.training.sae import TopKSAE

    settings = load_settings([*settings_args, f"--STORE_DIR={store}"])
    sae, meta = TopKSAE.load(store / "sae_model" / "topk_sae.pt")
    run = open_run(store, meta["activation_run_id"])
    model, tokenizer = load_model(settings.MODEL_ID, "cpu", cache_dir=settings.store / "models")
    texts = load_texts(settings.HF_DATASET, settings.EVAL_SPLIT, settings.TEXT_FIELD, EVAL_TEXTS).texts
    splice = splice_metrics(model, tokenizer, resolve_layer(model, settings.LAYER_SIGNATURE), texts, sae,
                            mean_training_activation(run, meta["heldout_start_row"]), settings.MAX_LENGTH,
                            batch_size=settings.BATCH_SIZE_SAVE, progress=False)
    return splice["delta_ce"]


def quality(store: Path, source: str, seed: int) -> dict:
    """Stage 02 (one epoch, `seed`) again on a store stage 01 already filled: held-out FVU and ΔCE."""
    from saekit.base.integrity import read_sealed_json

    args = [f"--STORE_DIR={store}", f"--ACTIVATION_SOURCE={source}", "--EPOCHS=1", f"--SEED={seed}",
            *[f"--SHUFFLE_BUFFER_TOKENS={BUFFER_TOKENS}"] * (source == "model")]
    stage("02_train_sae.py", args)
    return {"seed": seed, "heldout_fvu": read_sealed_json(store / "training_history.json", "")["history"][-1]["heldout_fvu"],
            "delta_ce": delta_ce(store, [])}


def embedded(tmp: Path, seeds: int) -> dict:
    stores = {name: tmp / f"embedded_{name}" for name in ("store", "model")}
    for store in stores.values():  # the de-quantized embedded model, made once by `make demo` or a stage
        store.mkdir()
        (store / "models").symlink_to(ROOT / "store" / "models", target_is_directory=True)
    cached = flow("store", [], stores["store"])
    online = flow("model", [f"--SHUFFLE_BUFFER_TOKENS={BUFFER_TOKENS}"], stores["model"])
    cached["delta_ce"], online["delta_ce"] = delta_ce(stores["store"], []), delta_ce(stores["model"], [])
    # seed noise: the same comparison with other seeds (the order of the rows, and the initialisation)
    by_seed = [{"seed": 0, "cached": {k: cached[k] for k in ("heldout_fvu", "delta_ce")},
                "online": {k: online[k] for k in ("heldout_fvu", "delta_ce")}}]
    for seed in range(1, seeds):
        by_seed.append({"seed": seed, "cached": quality(stores["store"], "store", seed),
                        "online": quality(stores["model"], "model", seed)})
    mean = {flow_: {k: sum(s[flow_][k] for s in by_seed) / len(by_seed) for k in ("heldout_fvu", "delta_ce")}
            for flow_ in ("cached", "online")}
    return {"cached": cached, "online": online, "by_seed": by_seed, "mean_over_seeds": mean,
            # the forward is the cost: the whole on-the-fly flow against stage 01 alone, the same texts
            "speed_vs_stage_01": cached["seconds_01"] / (online["seconds_01"] + online["seconds_02"]),
            "fvu_change": mean["online"]["heldout_fvu"] / mean["cached"]["heldout_fvu"] - 1,
            "delta_ce_change": mean["online"]["delta_ce"] / mean["cached"]["delta_ce"] - 1,
            "delta_ce_change_by_seed": [s["online"]["delta_ce"] / s["cached"]["delta_ce"] - 1 for s in by_seed],
            "disk_ratio": online["run_bytes"] / cached["run_bytes"],
            "heldout_token_share": cached["heldout_tokens"] / cached["tokens_embedded"]}


def random_model(tmp: Path, sizes: dict[str, int]) -> dict:
    from bench_scale import TOKENS_PER_TEXT, make_model_dir, write_texts

    make_model_dir(tmp / "model")
    results = {}
    for name, n_tokens in sizes.items():
        write_texts(tmp / f"{name}.txt", n_tokens)
        args = [f"--MODEL_ID={tmp / 'model'}", f"--LAYER_SIGNATURE={RANDOM_LAYER}", f"--HF_DATASET={tmp / f'{name}.txt'}",
                "--EVAL_SHARE=0.01", "--DATA_LIMIT=0", f"--MAX_LENGTH={TOKENS_PER_TEXT}", "--BATCH_SIZE_SAVE=64",
                "--DEVICE=cpu"]
        cached = flow("store", args, tmp / f"{name}_store")
        online = flow("model", args, tmp / f"{name}_model")
        results[name] = {"tokens": n_tokens, "cached": cached, "online": online,
                         # stage 01 and one epoch of stage 02 back to back: 1 / (1/r01 + 1/r02)
                         "speed_vs_01_plus_02": (cached["seconds_01"] + cached["seconds_02"])
                         / (online["seconds_01"] + online["seconds_02"]),
                         "disk_ratio": online["run_bytes"] / cached["run_bytes"],
                         "heldout_token_share": cached["heldout_tokens"] / cached["tokens_embedded"],
                         "fvu_change": online["heldout_fvu"] / cached["heldout_fvu"] - 1}
        for path in (tmp / f"{name}_store", tmp / f"{name}_model"):  # 5M tokens take ~6 GB
            subprocess.run(["rm", "-rf", str(path / "runs")], check=True)
    if {"small", "large"} <= set(results):
        results["rss_growth_02_online"] = (results["large"]["online"]["peak_rss_mb_02"]
                                           / results["small"]["online"]["peak_rss_mb_02"] - 1)
    return results


def main() -> None:
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    parts = options.get("parts", "embedded,random").split(",")
    sizes = {"small": int(options.get("small", 500_000)), "large": int(options.get("large", 5_000_000))}
    result = {"buffer_tokens_embedded": BUFFER_TOKENS, "eval_texts": EVAL_TEXTS}
    with tempfile.TemporaryDirectory(dir=options.get("workdir")) as tmp:
        if "embedded" in parts:
            result["embedded"] = embedded(Path(tmp), int(options.get("seeds", 3)))
            e = result["embedded"]
            print(table([{"flow": k, **{c: e[k][c] for c in ("seconds_01", "seconds_02", "heldout_fvu", "delta_ce",
                                                               "run_bytes", "peak_rss_mb_02")}} for k in ("cached", "online")],
                        ["flow", "seconds_01", "seconds_02", "heldout_fvu", "delta_ce", "run_bytes", "peak_rss_mb_02"]))
            print({k: e[k] for k in ("speed_vs_stage_01", "fvu_change", "delta_ce_change", "delta_ce_change_by_seed",
                                     "disk_ratio", "heldout_token_share")}, flush=True)
        if "random" in parts:
            result["random"] = random_model(Path(tmp), sizes)
            for name in sizes:
                r = result["random"][name]
                print(name, table([{"flow": k, **{c: r[k][c] for c in ("seconds_01", "seconds_02", "heldout_fvu",
                                                                       "run_bytes", "peak_rss_mb_02")}}
                                   for k in ("cached", "online")],
                                  ["flow", "seconds_01", "seconds_02", "heldout_fvu", "run_bytes", "peak_rss_mb_02"]))
                print({k: r[k] for k in ("speed_vs_01_plus_02", "disk_ratio", "heldout_token_share", "fvu_change")},
                      flush=True)
            print("stage 02 on the fly, peak RSS growth for 10x the tokens:", result["random"].get("rss_growth_02_online"))
    name = "online" if {"embedded", "random"} <= set(parts) else "online_" + "_".join(parts)
    print(f"wrote {save_result(name, 'python bench/bench_online.py ' + ' '.join(sys.argv[1:]), result)}")


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child(sys.argv[i + 1], sys.argv[i + 2], sys.argv[i + 3:])
    else:
        main()
