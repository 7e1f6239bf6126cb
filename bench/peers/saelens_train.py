"""Train a SAELens 6 TopK, BatchTopK or Matryoshka BatchTopK SAE on stored activation rows; run inside bench/.venv-saelens.

    bench/.venv-saelens/bin/python bench/peers/saelens_train.py '<json spec>'

The spec (written by bench/bench_peers.py) names the rows (.npy, [n, d]), the output folder, the
architecture, k, width, epochs, batch size, seed, and the settings that differ from SAELens's
defaults (lr, dead_feature_window in steps; matryoshka_widths, the prefix ends, for Matryoshka). Rows are fed through SAETrainer's data provider (any
iterator of batches), in a fresh random order each epoch. Only `fit` is timed. The SAE is saved
for inference (SAELens's save_inference_model: BatchTopK and Matryoshka become JumpReLU with its threshold), and
SAELens's own reconstruction of the first rows is saved beside it so the scorer can be checked.
Prints one JSON line: train_seconds, tokens, settings.
"""
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                     MatryoshkaBatchTopKTrainingSAEConfig)
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

spec = json.loads(sys.argv[1])
torch.manual_seed(spec["seed"])
rows = torch.from_numpy(np.load(spec["rows"]).astype(np.float32))
n, d = rows.shape


def batches():
    rng = np.random.default_rng(spec["seed"])
    while True:  # the trainer stops after epochs * n samples
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, spec["batch"]):
            yield rows[order[start:start + spec["batch"]]]


sae_cls, cfg_cls = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
                    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
                    "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)}[spec["architecture"]]
sae_settings = {"matryoshka_widths": spec["matryoshka_widths"]} if spec["architecture"] == "matryoshka" else {}
sae = sae_cls(cfg_cls(d_in=d, d_sae=spec["d_sae"], k=spec["k"], **sae_settings))
trainer_settings = {k: spec[k] for k in ("lr", "dead_feature_window") if spec.get(k) is not None}
lr = trainer_settings.get("lr", SAETrainerConfig.lr)
# SAELens's runner sets lr_end to lr / 10 (used by decaying schedules only; the default is constant)
trainer_cfg = SAETrainerConfig(total_training_samples=spec["epochs"] * n, train_batch_size_samples=spec["batch"],
                               lr_end=lr / 10, **trainer_settings)
trainer = SAETrainer(trainer_cfg, sae, batches())
started = time.perf_counter()
trainer.fit()
seconds = time.perf_counter() - started

out = Path(spec["out"])
sae.save_inference_model(out)
check = rows[:512]
with torch.no_grad():
    save_file({"x": check, "x_hat": SAE.load_from_disk(out)(check)}, str(out / "check.safetensors"))
print(json.dumps({"train_seconds": seconds, "tokens": trainer.n_training_samples,
                  "sae_config": asdict(sae.cfg) | {"metadata": None}, "trainer_config": {
                      k: v for k, v in asdict(trainer_cfg).items() if k != "logger"}}, default=str))
