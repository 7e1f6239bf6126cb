"""What checking the activations costs stage 02 (issue 11's goal: under 5% of its throughput).

Stage 02 checks every shard once per process before training: the SHA-256 of its activation and
token files, and that every value is finite. This measures that check and one training epoch on
the same run, in one process, and reports the check as a share of a 1-epoch run (the worst case)
and of a run of EPOCHS epochs. The run is the store's current one (stage 01), or, with
--synthetic, a random run of the demo's size (126,648 tokens x 576, float16).

    .venv/bin/python bench/bench_integrity.py [--synthetic] [any setting]
"""
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import save_result, table, timer

from saekit.activations.models import detect_device
from saekit.activations.store import RunWriter, open_run
from saekit.base.settings import load_settings
from saekit.training.train import TrainConfig, train_sae

DEMO_TOKENS, DEMO_D, DEMO_DOCS = 126_648, 576, 1000


def synthetic_run(folder: Path):
    rng = np.random.default_rng(0)
    writer = RunWriter(folder, "synthetic", DEMO_D, "float16", 65536)
    docs = np.arange(DEMO_TOKENS) * DEMO_DOCS // DEMO_TOKENS
    for lo in range(0, DEMO_TOKENS, 16384):
        hi = min(lo + 16384, DEMO_TOKENS)
        writer.add(torch.from_numpy(rng.standard_normal((hi - lo, DEMO_D), np.float32)),
                   torch.zeros(hi - lo, dtype=torch.long), torch.from_numpy(docs[lo:hi]), torch.arange(hi - lo))
    writer.finish({"model_id": "synthetic", "layer_signature": "synthetic", "n_documents": DEMO_DOCS})
    return open_run(folder)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--synthetic"]
    settings = load_settings(args)
    device = detect_device(settings.DEVICE)
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp)) if "--synthetic" in sys.argv else open_run(settings.store)
        check_seconds = []
        for _ in range(3):
            fresh = open_run(run.path.parent.parent, run.run_id)  # a new reader checks every shard again
            with timer() as t:
                fresh.check_all()
            check_seconds.append(t["seconds"])
        check = statistics.median(check_seconds)
        cfg = TrainConfig.from_settings(settings)
        cfg.epochs = 1
        with timer() as t:
            train_sae(fresh, cfg, progress=False, device=device)  # `fresh` is checked already: training alone
        epoch = t["seconds"]
    rows = [{"epochs": 1, "train_s": epoch, "check_s": check, "check_share": check / (epoch + check)},
            {"epochs": settings.EPOCHS, "train_s": epoch * settings.EPOCHS, "check_s": check,
             "check_share": check / (epoch * settings.EPOCHS + check)}]
    print(f"run {run.run_id}: {run.n_tokens} tokens x {run.d_model} ({run.meta['dtype']}), "
          f"{len(run.meta['shards'])} shards, trained on {device}; check runs {check_seconds}")
    print(table(rows, ["epochs", "train_s", "check_s", "check_share"]))
    path = save_result(f"integrity_{device.type}", "python bench/bench_integrity.py " + " ".join(sys.argv[1:]),
                       {"device": str(device), "run_id": run.run_id, "n_tokens": run.n_tokens, "d_model": run.d_model,
                        "dtype": run.meta["dtype"], "check_seconds_runs": check_seconds, "rows": rows,
                        "goal": "check_share < 0.05 of stage 02's time"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
