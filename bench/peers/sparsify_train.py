"""Train an EleutherAI sparsify TopK SAE, or transcoder, on stored activation rows; run inside bench/.venv-sparsify.

    SPARSIFY_DISABLE_TRITON=1 bench/.venv-sparsify/bin/python bench/peers/sparsify_train.py '<json spec>'

sparsify's Trainer.fit hooks a model as it runs over token ids. Here the "model" is one module that
maps row numbers to the stored rows, so the hooked output is exactly stage 02's training rows: each
"sequence" is BATCH row numbers (one step), in a fresh random order each epoch. Settings that differ
from sparsify's defaults come from the spec (auxk_alpha, dead_feature_threshold in tokens). Only
`fit` is timed. The SAE is written in SAELens's TopK format (cfg.json + sae_weights.safetensors:
sparsify encodes ReLU(W_enc (x - b_dec) + b_enc), keeps the top k, decodes with b_dec added, the
same function), with sparsify's own reconstruction of the first rows saved to check the scorer.

A transcoder (spec "transcode", and "skip_connection" for a skip transcoder; the rows file then holds each
row's input, its first d_in columns, and its target beside it): sparsify trains on a hooked module's input
and output, so a second module takes the input rows and returns the target rows of the same row numbers.
sparsify's transcoder computes ReLU(W_enc x + b_enc), keeps the top k, and decodes W_dec^T z + b_dec
(+ W_skip x): x is not centred on b_dec, which is the target's bias. That is the function of this project's
TopKSAE built with d_out (and skip), so the weights are written under its names (transcoder.safetensors,
transcoder.json for the constructor), with sparsify's own prediction of the first rows beside them.
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
transcode = spec.get("transcode", False)
n, d = len(rows), spec.get("d_in", rows.shape[1])
inputs, targets = rows[:, :d].contiguous(), (rows[:, d:].contiguous() if transcode else None)
if transcode and rows.shape[1] != 2 * d:  # sparsify sizes encoder, b_dec and W_skip by the hooked output's width
    sys.exit(f"sparsify's transcoders predict a target as wide as their input ({d}), not {rows.shape[1] - d}")


class StoredRows(nn.Module):
    """The hookpoint: row numbers in, stored activation rows out."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", rows)

    def forward(self, row_numbers: torch.Tensor) -> torch.Tensor:
        return self.rows[row_numbers]


class StoredTargets(StoredRows):
    """A transcoder's hookpoint: its input is the stored input rows, its output the target rows of the same
    row numbers (what the module it stands in for made from those inputs)."""

    def forward(self, inputs: torch.Tensor, row_numbers: torch.Tensor) -> torch.Tensor:
        return self.rows[row_numbers]


class RowsModel(nn.Module):
    """Just enough of a transformers model for sparsify's Trainer: base_model, device, dummy_inputs."""

    dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def __init__(self, rows: torch.Tensor, targets: torch.Tensor | None = None):
        super().__init__()
        self.stored = StoredRows(rows)
        self.target = StoredTargets(targets) if targets is not None else None

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.stored.rows.device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.stored(input_ids)
        return self.target(x, input_ids) if self.target is not None else x


rng = np.random.default_rng(spec["seed"])
steps = [{"input_ids": torch.from_numpy(order[start:start + spec["batch"]])}
         for order in (rng.permutation(n) for _ in range(spec["epochs"]))
         for start in range(0, n, spec["batch"])]
trainer_settings = {k: spec[k] for k in ("auxk_alpha", "dead_feature_threshold") if spec.get(k) is not None}
with tempfile.TemporaryDirectory() as checkpoints:
    coder = SaeConfig(num_latents=spec["d_sae"], k=spec["k"], transcode=transcode,
                      skip_connection=spec.get("skip_connection", False))
    hookpoint = "target" if transcode else "stored"
    cfg = TrainConfig(coder, batch_size=1, hookpoints=[hookpoint], init_seeds=[spec["seed"]], log_to_wandb=False,
                      save_dir=checkpoints, **trainer_settings)
    trainer = Trainer(cfg, steps, RowsModel(inputs, targets))
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
# the schedule-free optimiser trains one sequence of weights and averages another: its eval() swaps in
# the averaged weights, which sparsify's own checkpoints save
for optimizer in trainer.optimizers:
    if hasattr(optimizer, "eval"):
        optimizer.eval()
sae = trainer.saes[hookpoint]

out = Path(spec["out"])
out.mkdir(parents=True, exist_ok=True)
weights = {"W_enc": sae.encoder.weight.detach(), "b_enc": sae.encoder.bias.detach(),
           "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
if transcode:
    if sae.W_skip is not None:  # [d_out, d_in], applied as x W_skip^T by sparsify and TopKSAE alike
        weights["W_skip"] = sae.W_skip.detach()
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "transcoder.safetensors"))
    (out / "transcoder.json").write_text(json.dumps({"d_in": d, "n_latents": sae.num_latents, "k": spec["k"],
                                                     "d_out": sae.W_dec.shape[1], "skip": sae.W_skip is not None}))
else:  # SAELens stores W_enc as [d_in, d_sae]
    save_file({k: v.float().contiguous() for k, v in (weights | {"W_enc": weights["W_enc"].T}).items()},
              str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d, "d_sae": sae.num_latents, "k": spec["k"], "dtype": "float32",
        "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": False, "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "trainer": "eai-sparsify"}}))
check = inputs[:512]
with torch.no_grad():  # sparsify's own prediction (a transcoder's: of the target, from the input)
    save_file({"x": check, "x_hat": sae(check).sae_out.float()}, str(out / "check.safetensors"))
print(json.dumps({"train_seconds": seconds, "tokens": sum(len(s["input_ids"]) for s in steps),
                  "trainer_config": {k: v for k, v in asdict(cfg).items() if k not in ("save_dir",)}}, default=str))
