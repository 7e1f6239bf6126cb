"""Stage 02 on every device this machine has, on the same activations, in one run: the CPU is the
baseline; a GPU, where there is one, must reach the same quality (held-out FVU, L0, dead) and
reports its speed as a ratio to the CPU's.

The activations are synthetic and structured like a layer's: sparse sums of 4x576 unit directions
plus noise (d = 576), so a TopK SAE has something real to find.

    .venv/bin/python bench/bench_devices.py [--tokens=200000] [any setting, e.g. --EPOCHS=2]
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import save_result, table, timer

from saekit.activations.store import RunWriter, open_run
from saekit.base.settings import load_settings
from saekit.training.train import TrainConfig, evaluate, train_sae

D, N_FEATURES, ACTIVE, TOKENS_PER_DOC = 576, 2304, 8, 128


def structured_run(folder: Path, n_tokens: int, d: int = D, n_features: int = N_FEATURES):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n_features, d)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    writer = RunWriter(folder, "structured", d, "float16", 65536)
    for lo in range(0, n_tokens, 8192):
        n = min(8192, n_tokens - lo)
        which = rng.integers(0, n_features, (n, ACTIVE))
        coef = rng.exponential(1.0, (n, ACTIVE)).astype(np.float32)
        x = np.einsum("nk,nkd->nd", coef, features[which]) + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
        docs = (lo + np.arange(n)) // TOKENS_PER_DOC
        writer.add(torch.from_numpy(x), torch.zeros(n, dtype=torch.long), torch.from_numpy(docs),
                   torch.from_numpy((lo + np.arange(n)) % TOKENS_PER_DOC))
    writer.finish({"model_id": "structured", "layer_signature": "structured",
                   "n_documents": (n_tokens + TOKENS_PER_DOC - 1) // TOKENS_PER_DOC})
    return open_run(folder)


def main() -> None:
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--tokens="))
    settings = load_settings([a for a in sys.argv[1:] if not a.startswith("--tokens=")])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = structured_run(Path(tmp), int(options.get("tokens", 200_000)))
        for device in devices:
            with timer() as t:
                sae, record = train_sae(run, TrainConfig.from_settings(settings), device=device, progress=False)
            heldout = evaluate(sae.to(device), run, record["heldout_start_row"], run.n_tokens, device=device).summary()
            history = record["history"]
            rows.append({"device": device, "name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                         "train_s": t["seconds"],
                         "epoch_tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history])),
                         "heldout_fvu": heldout["fvu"], "l0": heldout["l0"], "dead": heldout["dead"]})
    for row in rows:
        row["speed_vs_cpu"] = row["epoch_tokens_per_s"] / rows[0]["epoch_tokens_per_s"]
    columns = ["device", "name", "train_s", "epoch_tokens_per_s", "speed_vs_cpu", "heldout_fvu", "l0", "dead"]
    print(f"{run.n_tokens} tokens x {D}, {settings.EPOCHS} epochs, TopK {settings.TOP_K}, "
          f"{settings.N_LATENTS_MULTIPLIER}x latents")
    print(table(rows, columns))
    name = "devices" if len(devices) > 1 else "devices_cpu_only"
    path = save_result(name, "python bench/bench_devices.py " + " ".join(sys.argv[1:]),
                       {"n_tokens": run.n_tokens, "epochs": settings.EPOCHS, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
