"""Train an EleutherAI sparsify TopK SAE on stored activation rows; run inside bench/.venv-sparsify.

    SPARSIFY_DISABLE_TRITON=1 bench/.venv-sparsify/bin/python bench/peers/sparsify_train.py '<json spec>'

sparsify's Trainer.fit hooks a model as it runs over token ids. Here the "model" is one module that
maps row numbers to the stored rows, so the hooked output is exactly stage 02's training rows: each
"sequence" is BATCH row numbers (one step), in a fresh random order each epoch. Settings that differ
from sparsify's defaults come from the spec (auxk_alpha, dead_feature_threshold in tokens). Only
`fit` is timed. The SAE is written in SAELens's TopK format (cfg.json + sae_weights.safetensors:
sparsify encodes ReLU(W_enc (x - b_dec) + b_enc), keeps the top k, decodes with b_dec added, the
same function), with sparsify's own reconstruction of the first rows saved to check the scorer.
Prints one JSON line: train_seconds, tokens, settings.
"""
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sparsify import SaeConfig, Trainer, TrainConfig
from torch import nn

spec = json.loads(sys.argv[1])
torch.manual_seed(spec["seed"])
rows = torch.from_numpy(np.load(spec["rows"]).astype(np.float32))
n, d = rows.shape


class StoredRows(nn.Module):
    """The hookpoint: row numbers in, stored activation rows out."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", rows)

    def forward(self, row_numbers: torch.Tensor) -> torch.Tensor:
        return self.rows[row_numbers]


class RowsModel(nn.Module):
    """Just enough of a transformers model for sparsify's Trainer: base_model, device, dummy_inputs."""

    dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.stored = StoredRows(rows)

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.stored.rows.device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.stored(input_ids)


rng = np.random.default_rng(spec["seed"])
steps = [{"input_ids": torch.from_numpy(order[start:start + spec["batch"]])}
         for order in (rng.permutation(n) for _ in range(spec["epochs"]))
         for start in range(0, n, spec["batch"])]
trainer_settings = {k: spec[k] for k in ("auxk_alpha", "dead_feature_threshold") if spec.get(k) is not None}
with tempfile.TemporaryDirectory() as checkpoints:
    cfg = TrainConfig(SaeConfig(num_latents=spec["d_sae"], k=spec["k"]), batch_size=1, hookpoints=["stored"],
                      init_seeds=[spec["seed"]], log_to_wandb=False, save_dir=checkpoints, **trainer_settings)
    trainer = Trainer(cfg, steps, RowsModel(rows))
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
# the schedule-free optimiser trains one sequence of weights and averages another: its eval() swaps in
# the averaged weights, which sparsify's own checkpoints save
for optimizer in trainer.optimizers:
    if hasattr(optimizer, "eval"):
        optimizer.eval()
sae = trainer.saes["stored"]

out = Path(spec["out"])
out.mkdir(parents=True, exist_ok=True)
weights = {"W_enc": sae.encoder.weight.detach().T, "b_enc": sae.encoder.bias.detach(),
           "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "sae_weights.safetensors"))
(out / "cfg.json").write_text(json.dumps({
    "architecture": "topk", "d_in": d, "d_sae": sae.num_latents, "k": spec["k"], "dtype": "float32",
    "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": False, "normalize_activations": "none",
    "metadata": {"sae_lens_version": "6.0.0", "trainer": "eai-sparsify"}}))
check = rows[:512]
with torch.no_grad():
    save_file({"x": check, "x_hat": sae(check).sae_out.float()}, str(out / "check.safetensors"))
print(json.dumps({"train_seconds": seconds, "tokens": sum(len(s["input_ids"]) for s in steps),
                  "trainer_config": {k: v for k, v in asdict(cfg).items() if k not in ("save_dir",)}}, default=str))
